-- Roony control plane, schema 4: admin tokens managed through the admin API. Portable SQL
-- for SQLite and PostgreSQL.

-- How the token came to be: `bootstrap` (the bootstrap token of `roony control-plane
-- --admin-token` / `roony dev`; every row before schema 4 was one) or `api` (POST
-- /admin_tokens). Ensuring a bootstrap token revokes the other active bootstrap tokens of
-- its name; `api` tokens are never replaced that way.
ALTER TABLE admin_tokens ADD COLUMN source TEXT NOT NULL DEFAULT 'bootstrap';
-- GET /admin_tokens, newest first.
CREATE INDEX admin_tokens_created ON admin_tokens (created_at, id);
