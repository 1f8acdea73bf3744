-- Roony control plane, schema 5: Stripe webhooks. Real-time authorization decisions,
-- authorizations and transactions (settlement), discrepancies and the updates feed down to
-- sidecars. Portable SQL for SQLite and PostgreSQL (one ALTER TABLE per added column).

-- Every Stripe event received (deduplication by Stripe's event id). `response` is the JSON
-- answered to an `issuing_authorization.request`, so a redelivery gets the same answer.
CREATE TABLE stripe_events (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    account TEXT,
    created BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    response TEXT
);

-- Issuing authorizations as Roony decided them (real time) or Stripe reported them.
CREATE TABLE authorizations (
    -- Stripe id (iauth_…)
    id TEXT PRIMARY KEY,
    stripe_card_id TEXT NOT NULL,
    -- NULL when the card is unknown to Roony
    intent_id TEXT,
    agent_id TEXT,
    project_id TEXT,
    org_id TEXT,
    -- Minor units: approved (or requested, if declined)
    amount BIGINT NOT NULL,
    currency TEXT NOT NULL,
    approved BIGINT NOT NULL,
    -- pending | closed | reversed | expired
    status TEXT NOT NULL,
    merchant_name TEXT NOT NULL,
    merchant_city TEXT,
    merchant_country TEXT,
    merchant_category TEXT,
    merchant_network_id TEXT,
    -- JSON array: Roony's reason codes, or Stripe's request reasons
    reasons TEXT NOT NULL,
    -- roony | stripe
    decided_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX authorizations_intent ON authorizations (intent_id, created_at, id);
CREATE INDEX authorizations_card ON authorizations (stripe_card_id, created_at, id);
CREATE INDEX authorizations_created ON authorizations (created_at, id);

-- Settlements (Issuing transactions), rebuilt: the intent and card are unknown for a
-- transaction on a card Roony did not issue; upserted by stripe_transaction_id.
CREATE TABLE settlements_v5 (
    id TEXT PRIMARY KEY,
    intent_id TEXT,
    card_id TEXT,
    stripe_card_id TEXT,
    stripe_transaction_id TEXT UNIQUE,
    authorization_id TEXT,
    -- capture | refund
    kind TEXT NOT NULL,
    -- Minor units, positive (spent for a capture, credited for a refund)
    amount BIGINT NOT NULL,
    currency TEXT NOT NULL,
    merchant_name TEXT,
    merchant_city TEXT,
    merchant_country TEXT,
    merchant_category TEXT,
    merchant_network_id TEXT,
    created_at BIGINT NOT NULL
);
INSERT INTO settlements_v5 (id, intent_id, card_id, stripe_card_id, stripe_transaction_id, kind, amount, currency, created_at)
    SELECT id, intent_id, card_id, card_id, stripe_transaction_id, kind, amount, currency, created_at FROM settlements;
DROP TABLE settlements;
ALTER TABLE settlements_v5 RENAME TO settlements;
CREATE INDEX settlements_intent ON settlements (intent_id, created_at, id);
CREATE INDEX settlements_created ON settlements (created_at, id);
CREATE INDEX settlements_card ON settlements (stripe_card_id, created_at, id);
CREATE INDEX settlements_authorization ON settlements (authorization_id);

-- The merchant (network id) a card is locked to by its first approved authorization.
ALTER TABLE cards ADD COLUMN locked_network_id TEXT;

-- What the sidecar reported about the purchase (used by real-time decisions).
ALTER TABLE intents ADD COLUMN merchant_category TEXT;
ALTER TABLE intents ADD COLUMN expires_at BIGINT;
-- Money state at Stripe, minor units: captured, refunded, and approved authorizations not
-- yet captured, reversed or expired.
ALTER TABLE intents ADD COLUMN captured BIGINT NOT NULL DEFAULT 0;
ALTER TABLE intents ADD COLUMN refunded BIGINT NOT NULL DEFAULT 0;
ALTER TABLE intents ADD COLUMN pending BIGINT NOT NULL DEFAULT 0;

-- Money that moved differently from what was approved.
CREATE TABLE discrepancies (
    id TEXT PRIMARY KEY,
    -- over_capture | force_capture | capture_on_inactive_intent | merchant_mismatch |
    -- unmatched_refund | unknown_card | orphan_card
    kind TEXT NOT NULL,
    intent_id TEXT,
    stripe_card_id TEXT,
    agent_id TEXT,
    project_id TEXT,
    org_id TEXT,
    -- The Stripe object (iauth_…, ipi_…, ic_…)
    stripe_object_id TEXT,
    amount BIGINT,
    currency TEXT,
    details TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    resolved_at BIGINT,
    resolved_by TEXT,
    resolution_note TEXT
);
CREATE INDEX discrepancies_created ON discrepancies (created_at, id);
CREATE INDEX discrepancies_kind_created ON discrepancies (kind, created_at, id);
CREATE INDEX discrepancies_agent_created ON discrepancies (agent_id, created_at, id);
CREATE INDEX discrepancies_project_created ON discrepancies (project_id, created_at, id);
CREATE INDEX discrepancies_intent_created ON discrepancies (intent_id, created_at, id);

-- The updates feed down to sidecars (GET /api/sync/v1/updates): each row is an intent's
-- whole money state after a change.
CREATE TABLE intent_updates (
    seq BIGINT PRIMARY KEY,
    project_id TEXT NOT NULL,
    intent_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX intent_updates_project_seq ON intent_updates (project_id, seq);

-- One row: the last seq handed out, bumped in the same transaction as the rows it numbers
-- (the row lock orders writers, so seqs become visible in increasing order).
CREATE TABLE intent_update_seq (
    id BIGINT PRIMARY KEY,
    seq BIGINT NOT NULL
);
INSERT INTO intent_update_seq (id, seq) VALUES (1, 0);
