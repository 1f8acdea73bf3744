-- Roony control plane, schema 11: every card the issuing relay creates for a sidecar. One
-- row per intent (one card per intent), inserted before the request goes to Stripe (so
-- concurrent creations see each other) and completed with Stripe's card id. Budgets are
-- bounded at the relay by these rows: a live card counts at its spending limit, a canceled
-- one at what it spent (the Stripe ledger's captures, refunds and pending authorizations).
-- Portable SQL for SQLite and PostgreSQL.

CREATE TABLE relay_cards (
    intent_id TEXT PRIMARY KEY,
    -- ic_…; NULL until Stripe answered with the card (or when its answer never came).
    card_id TEXT UNIQUE,
    agent_id TEXT NOT NULL,
    project_id TEXT NOT NULL,
    org_id TEXT NOT NULL,
    sidecar_id TEXT NOT NULL,
    -- ISO 4217 code (upper case) and minor units: the card's one all-time spending limit.
    currency TEXT NOT NULL,
    spending_limit BIGINT NOT NULL,
    -- SHA-256 hex of the Idempotency-Key the card was created with (a retry must repeat it).
    idempotency_key_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    canceled_at BIGINT
);
CREATE INDEX relay_cards_agent_created ON relay_cards (agent_id, created_at);
CREATE INDEX relay_cards_project_created ON relay_cards (project_id, created_at);
CREATE INDEX relay_cards_org_created ON relay_cards (org_id, created_at);
