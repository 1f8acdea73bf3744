-- Roony control plane, schema 2: sidecar identities and the configuration revision that
-- policy distribution (sync) is keyed on. Portable SQL for SQLite and PostgreSQL.

-- Sidecars: each serves the agents of one project. The token is shown once; only its
-- SHA-256 hex is stored, located by a token id derived from the token.
CREATE TABLE sidecars (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects (id),
    name TEXT NOT NULL,
    token_id TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX sidecars_created ON sidecars (created_at, id);

-- One row: bumped (UPDATE ... SET revision = revision + 1 RETURNING revision) in the same
-- transaction as every write that changes what a bundle contains.
CREATE TABLE config_revision (
    id BIGINT PRIMARY KEY,
    revision BIGINT NOT NULL
);
INSERT INTO config_revision (id, revision) VALUES (1, 0);
