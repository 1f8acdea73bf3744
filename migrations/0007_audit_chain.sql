-- The tamper-evident audit trail (issue 8): every audit event appended from now on is a
-- link of one hash chain (`chain_seq` from 1, `prev_hash`, `hash`; see `src/audit`).
-- Events written before this migration keep chain_seq NULL: they are outside the chain.
ALTER TABLE audit_events ADD COLUMN chain_seq BIGINT;
CREATE UNIQUE INDEX audit_events_chain ON audit_events (chain_seq);

-- One row (id = 1): the last link. Appending takes this row's lock
-- (`UPDATE audit_chain SET seq = seq + 1 … RETURNING`), which serializes appends across
-- transactions and replicas.
CREATE TABLE audit_chain (
    id BIGINT PRIMARY KEY,
    seq BIGINT NOT NULL,
    head TEXT NOT NULL
);
INSERT INTO audit_chain (id, seq, head)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
