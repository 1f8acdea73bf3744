-- Roony control plane, schema 8: the sidecar's risk score of each intent, in the ledger.
-- Portable SQL for SQLite and PostgreSQL (one ALTER per column for SQLite).
ALTER TABLE intents ADD COLUMN risk_score BIGINT;
-- JSON array of risk signal codes (e.g. ["split_purchase","burst"]).
ALTER TABLE intents ADD COLUMN risk_signals TEXT NOT NULL DEFAULT '[]';
