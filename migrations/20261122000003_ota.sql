-- OTA: the firmware catalogue, deployments and per-device jobs with every transition on record.

CREATE TABLE firmware (
    id             TEXT PRIMARY KEY,
    version        TEXT NOT NULL,
    models         TEXT NOT NULL,        -- JSON array of hardware models
    url            TEXT NOT NULL,
    sha256         TEXT NOT NULL,
    size           BIGINT NOT NULL,
    signature      TEXT,
    release_notes  TEXT,
    created_at     BIGINT NOT NULL
);

-- One row per (model, version): a version exists once per hardware model.
CREATE TABLE firmware_models (
    firmware_id  TEXT NOT NULL REFERENCES firmware (id) ON DELETE CASCADE,
    model        TEXT NOT NULL,
    version      TEXT NOT NULL,
    PRIMARY KEY (model, version)
);

CREATE TABLE deployments (
    id               TEXT PRIMARY KEY,
    firmware_id      TEXT NOT NULL REFERENCES firmware (id),
    target           TEXT NOT NULL,      -- JSON, as requested
    policy           TEXT NOT NULL,      -- JSON, as requested
    devices          TEXT NOT NULL,      -- JSON array of device ids, resolved at start, in wave order
    waves            TEXT NOT NULL,      -- JSON array of wave sizes
    allow_downgrade  BIGINT NOT NULL,
    status           TEXT NOT NULL,      -- running | paused | completed | aborted | canceled
    status_reason    TEXT,
    current_wave     BIGINT NOT NULL,    -- 0-based index of the newest wave started
    wave_done_at     BIGINT,             -- when the current wave finished (for the minimum wait)
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);

CREATE TABLE jobs (
    id             TEXT PRIMARY KEY,
    deployment_id  TEXT NOT NULL REFERENCES deployments (id),
    device_id      TEXT NOT NULL,
    wave           BIGINT NOT NULL,
    status         TEXT NOT NULL,
    step           TEXT,
    progress       BIGINT,
    reason         TEXT,
    queued_at      BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);
CREATE INDEX jobs_by_deployment ON jobs (deployment_id, wave);
CREATE INDEX jobs_by_device ON jobs (device_id, status);

CREATE TABLE job_transitions (
    job_id    TEXT NOT NULL REFERENCES jobs (id),
    at        BIGINT NOT NULL,
    status    TEXT NOT NULL,
    step      TEXT,
    progress  BIGINT,
    reason    TEXT
);
CREATE INDEX job_transitions_by_job ON job_transitions (job_id, at);
