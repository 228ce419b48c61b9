-- The platform CA, shared by every instance on this database that was given no CA files of its own. The first
-- instance to start stores one (INSERT ... ON CONFLICT DO NOTHING, so instances starting at once agree on the
-- first row written) and every other instance loads it. At most one row. The private key is PEM in clear: it is
-- exactly as protected as the database and its backups are.

CREATE TABLE certificate_authority (
    id          BIGINT PRIMARY KEY CHECK (id = 1),
    cert_pem    TEXT NOT NULL,
    key_pem     TEXT NOT NULL,
    origin      TEXT NOT NULL,      -- 'generated' | 'imported' (from a data directory's pki/ca.crt and ca.key)
    created_at  BIGINT NOT NULL
);
