-- One-use dashboard forms whose repetition would do harm (create an agent, rotate its key):
-- each rendering carries a random nonce; the first submission records its SHA-256 here and a
-- second one (a browser's "resubmit" on refresh, a double click) is refused. Rows older than
-- a day are deleted when new ones arrive.
CREATE TABLE form_nonces (
    nonce_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX form_nonces_created ON form_nonces (created_at);
