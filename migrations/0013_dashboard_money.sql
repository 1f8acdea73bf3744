-- Roony control plane, schema 13: what the dashboard's money views need.
-- Portable SQL for SQLite and PostgreSQL.

-- The sentences of the latest sidecar decision's reasons, as the agent was told them
-- (JSON array of strings, in the order of `reasons`; NULL when the sidecar sent none, e.g.
-- an older sidecar, and once an administrator decided the intent).
ALTER TABLE intents ADD COLUMN reason_messages TEXT;
