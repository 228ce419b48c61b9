-- Last known MQTT presence of each device. The broker's front door keeps the live state in memory and writes
-- changes here (batched), so status survives restarts and `GET /v1/devices?online=` can filter in SQL.
CREATE TABLE device_presence (
    device_id               TEXT PRIMARY KEY,
    online                  BIGINT NOT NULL,     -- 0 | 1
    session                 BIGINT NOT NULL,     -- only ever increases
    connected_at            BIGINT,
    disconnected_at         BIGINT,
    last_seen_at            BIGINT,
    last_disconnect_reason  TEXT,
    remote_addr             TEXT
);
CREATE INDEX device_presence_online ON device_presence (online, device_id);
