-- Roony control plane, schema 9: Stripe credentials. One connection per organization
-- (Stripe Connect OAuth, or the direct mode's restricted key from the environment, which is
-- never stored), and the single-use OAuth `state` values of connections being made.
-- Portable SQL for SQLite and PostgreSQL.

CREATE TABLE stripe_connections (
    org_id TEXT PRIMARY KEY,
    -- connect | direct
    mode TEXT NOT NULL,
    -- acct_… (the connected account)
    account_id TEXT,
    -- Sealed with the control plane's secrets key: v1:<key id>:<nonce>:<ciphertext>,
    -- bound to (org id, column). NULL in direct mode and once disconnected.
    access_token TEXT,
    refresh_token TEXT,
    -- The key the tokens are sealed with (rotation).
    key_id TEXT,
    scope TEXT,
    livemode BIGINT NOT NULL DEFAULT 0,
    -- connected | disconnected
    status TEXT NOT NULL,
    connected_at BIGINT,
    refreshed_at BIGINT,
    disconnected_at BIGINT,
    -- disconnected | deauthorized | …
    disconnect_reason TEXT,
    updated_at BIGINT NOT NULL
);
CREATE INDEX stripe_connections_account ON stripe_connections (account_id);

-- OAuth `state` values (stored as SHA-256 hashes), bound to the admin session that began
-- the flow (its binding's hash), single-use, expiring.
CREATE TABLE oauth_states (
    state_hash TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    session_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
CREATE INDEX oauth_states_expires ON oauth_states (expires_at);
