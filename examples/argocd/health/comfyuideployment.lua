-- Argo CD health check for sdfleet.io/ComfyUIDeployment: maps the controller's status
-- conditions to Healthy, Progressing or Degraded.
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
local degraded = condition("Degraded")
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = degraded.reason .. ": " .. (degraded.message or "")
elseif ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
else
  hs.status = "Progressing"
  if ready ~= nil then
    hs.message = ready.reason .. ": " .. (ready.message or "")
  else
    hs.message = "Waiting for the Ready condition"
  end
end
return hs
