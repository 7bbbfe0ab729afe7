-- Argo CD health check for sdfleet.io/ModelSet: Healthy once the catalog is listed
-- (Ready) and every node holds its revision (Synced).
local hs = {}
local function condition(t)
  if obj.status ~= nil and obj.status.conditions ~= nil then
    for _, c in ipairs(obj.status.conditions) do
      if c.type == t then return c end
    end
  end
  return nil
end

if obj.status == nil or obj.status.observedGeneration == nil
    or (obj.metadata.generation ~= nil and obj.status.observedGeneration < obj.metadata.generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the sdfleet controller to observe the latest spec"
  return hs
end

local ready = condition("Ready")
local synced = condition("Synced")
if ready ~= nil and ready.status == "False" then
  hs.status = "Degraded"
  hs.message = ready.reason .. ": " .. (ready.message or "")
elseif synced ~= nil and synced.status == "False" and synced.reason == "SyncFailed" then
  hs.status = "Degraded"
  hs.message = synced.reason .. ": " .. (synced.message or "")
elseif ready ~= nil and ready.status == "True" and synced ~= nil and synced.status == "True" then
  hs.status = "Healthy"
  hs.message = synced.message or "Synced"
else
  hs.status = "Progressing"
  if synced ~= nil then
    hs.message = synced.reason .. ": " .. (synced.message or "")
  else
    hs.message = "Listing the catalog"
  end
end
return hs
