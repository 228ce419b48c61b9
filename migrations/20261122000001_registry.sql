-- Registry schema. Portable between SQLite and PostgreSQL: TEXT, BIGINT and nothing engine-specific, so one
-- repository layer and one test suite serve both. Times are Unix epoch milliseconds (UTC).

CREATE TABLE devices (
    id          TEXT PRIMARY KEY,
    name        TEXT,
    attributes  TEXT NOT NULL,          -- JSON object
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE device_tags (
    device_id   TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    tag         TEXT NOT NULL,
    PRIMARY KEY (device_id, tag)
);
CREATE INDEX device_tags_by_tag ON device_tags (tag, device_id);

-- Certificates outlive their device: a deleted device's certificates stay on record, revoked, so a revoked
-- serial is refused for as long as it would otherwise be valid.
CREATE TABLE certificates (
    serial              TEXT PRIMARY KEY,   -- lowercase hex
    device_id           TEXT NOT NULL,
    fingerprint_sha256  TEXT NOT NULL UNIQUE,
    pem                 TEXT NOT NULL,
    key_origin          TEXT NOT NULL,      -- 'generated' | 'csr'
    not_before          BIGINT NOT NULL,
    not_after           BIGINT NOT NULL,
    status              TEXT NOT NULL,      -- 'active' | 'revoked'
    created_at          BIGINT NOT NULL,
    revoked_at          BIGINT,
    revocation_reason   TEXT
);
CREATE INDEX certificates_by_device ON certificates (device_id, created_at);

-- API keys: only a SHA-256 of the secret is stored. Tokens carry 256 random bits, so a fast hash is enough and
-- lets a request find its key by the hash alone.
CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    scope        TEXT NOT NULL,             -- 'read' | 'admin'
    secret_hash  TEXT NOT NULL UNIQUE,
    created_at   BIGINT NOT NULL,
    revoked_at   BIGINT
);
