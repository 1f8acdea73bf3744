-- The admin dashboard: roles of admin users, their sessions.
-- admin_users (0001) already holds email, name and the argon2id PHC string.
ALTER TABLE admin_users ADD COLUMN role TEXT NOT NULL DEFAULT 'viewer';
ALTER TABLE admin_users ADD COLUMN updated_at BIGINT;

-- A signed-in browser. Only SHA-256 of the cookie's secret is stored; `id` is the public
-- key id derived from it (what audit events name). `csrf_hash` is SHA-256 of the session's
-- CSRF token (the token is derived from the cookie secret, never stored).
CREATE TABLE admin_sessions (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES admin_users (id),
    token_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT,
    user_agent TEXT,
    address TEXT
);
CREATE INDEX admin_sessions_user ON admin_sessions (user_id, revoked_at);
