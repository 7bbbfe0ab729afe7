-- The gateway's jobs, shared by its replicas. `scope` is one gateway (namespace and
-- fleets), so several gateways may share one database without seeing each other's jobs.
-- Ids and key ids sort by bytes ("C"), as the embedded store's index does.
CREATE TABLE gateway_jobs (
    scope      text NOT NULL,
    id         text COLLATE "C" NOT NULL,
    created_at bigint NOT NULL,
    key_id     text COLLATE "C",
    -- 0 queued, 1 running, 2 and up final.
    state      smallint NOT NULL,
    body       bytea NOT NULL,
    PRIMARY KEY (scope, id)
);
CREATE INDEX gateway_jobs_by_time ON gateway_jobs (scope, created_at, id);
CREATE INDEX gateway_jobs_by_key ON gateway_jobs (scope, key_id, created_at, id)
    WHERE key_id IS NOT NULL;
CREATE INDEX gateway_jobs_unfinished ON gateway_jobs (scope, created_at, id)
    WHERE state < 2;

-- `<key id>/<Idempotency-Key>` → the job it was first used for; deleted with its job.
CREATE TABLE gateway_idempotency (
    scope  text NOT NULL,
    key    text NOT NULL,
    job_id text COLLATE "C" NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX gateway_idempotency_by_job ON gateway_idempotency (scope, job_id);

-- Which replica dispatches a gateway's jobs and holds its pods' websockets, until when.
-- `epoch` grows with each new holder.
CREATE TABLE gateway_leases (
    scope    text PRIMARY KEY,
    holder   text NOT NULL,
    address  text NOT NULL,
    deadline timestamptz NOT NULL,
    epoch    bigint NOT NULL
);
