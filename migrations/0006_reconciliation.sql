-- Roony control plane, schema 6: reconciliation with Stripe. One row per run (periodic or
-- on demand): when it ran, how it ended and its report (JSON: totals and every difference
-- found between Stripe and the ledger, with what was done about it).
CREATE TABLE reconciliation_runs (
    -- rcn_…
    id TEXT PRIMARY KEY,
    started_at BIGINT NOT NULL,
    finished_at BIGINT NOT NULL,
    -- ok | failed
    status TEXT NOT NULL,
    -- Authorizations and transactions created at or after this time were compared
    since BIGINT NOT NULL,
    -- system | admin_token
    actor_type TEXT NOT NULL,
    actor_id TEXT NOT NULL,
    report TEXT NOT NULL,
    -- = started_at (keyset pagination, newest first)
    created_at BIGINT NOT NULL
);
CREATE INDEX reconciliation_runs_created ON reconciliation_runs (created_at, id);
CREATE INDEX reconciliation_runs_status ON reconciliation_runs (status, started_at);
