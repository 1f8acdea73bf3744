-- Roony control plane, schema 14: relay cards expire. The relay takes the card's
-- `roony_expires` (bounded by the agent's card_ttl_seconds) and keeps it here; a card
-- counts at its spending limit against every budget period while it is live (not canceled
-- and not expired, since it can still be spent), and at what it spent once it is canceled or
-- expired (real-time authorizations of an expired relay card are declined). Cards claimed
-- before this schema get the longest lifetime a policy allows (7 days).
-- Portable SQL for SQLite and PostgreSQL.

ALTER TABLE relay_cards ADD COLUMN expires_at BIGINT;
UPDATE relay_cards SET expires_at = created_at + 604800 WHERE expires_at IS NULL;
CREATE INDEX relay_cards_live ON relay_cards (canceled_at, expires_at);
