-- In a cluster, the instance holding each device's latest session (a random id an instance draws at start; NULL on
-- a single node). Every instance keeps a heartbeat key in Redis; when an instance stops beating (it crashed or was
-- cut off), the others mark the devices it held offline, by this column, and an instance that starts keeps online
-- the devices that live instances hold instead of marking every stored session ended.
ALTER TABLE device_presence ADD COLUMN instance TEXT;
CREATE INDEX device_presence_instance ON device_presence (instance, online);
