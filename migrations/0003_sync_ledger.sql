-- Roony control plane, schema 3: the sidecars' ledger (events up), administrators' decisions
-- on pending intents (down through the bundle) and leases of shared budgets. Portable SQL
-- for SQLite and PostgreSQL (SQLite needs one ALTER TABLE per added column).

-- The intent as its sidecar last reported it (events up). `version` is the sidecar's
-- per-intent version: a snapshot is applied only if it is newer than the one held.
ALTER TABLE intents ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE intents ADD COLUMN sidecar_id TEXT;
-- The last status the sidecar reported (`status` may hold an administrator's decision the
-- sidecar has not acted on yet).
ALTER TABLE intents ADD COLUMN sidecar_status TEXT;
-- Minor units held against budgets at the sidecar (0 once released).
ALTER TABLE intents ADD COLUMN reserved BIGINT NOT NULL DEFAULT 0;
ALTER TABLE intents ADD COLUMN status_reason TEXT;
-- An administrator's decision on a pending_approval intent: approved | declined.
ALTER TABLE intents ADD COLUMN admin_decision TEXT;
ALTER TABLE intents ADD COLUMN admin_note TEXT;
ALTER TABLE intents ADD COLUMN admin_actor TEXT;
ALTER TABLE intents ADD COLUMN admin_decided_at BIGINT;
-- The approvals a project's bundle carries: admin_decision set, sidecar still pending.
CREATE INDEX intents_project_sidecar_status ON intents (project_id, sidecar_status, id);

-- Allowances of shared (org and project) budgets held by sidecars, per period bucket.
-- Invariant kept by the lease endpoint: for each (budget_id, bucket_start), the sum of
-- `granted` never exceeds the budget's limit at the time of each grant.
CREATE TABLE budget_leases (
    budget_id TEXT NOT NULL,
    -- Unix seconds of the bucket's start (UTC); 0 for all_time budgets.
    bucket_start BIGINT NOT NULL,
    sidecar_id TEXT NOT NULL,
    -- Minor units.
    granted BIGINT NOT NULL,
    -- The sidecar's lease request sequence number that set this row.
    seq BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (budget_id, bucket_start, sidecar_id)
);
CREATE INDEX budget_leases_sidecar ON budget_leases (sidecar_id, budget_id, bucket_start);
