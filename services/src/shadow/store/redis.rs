//! The production store: Redis. One hash per shadow (`d` document, `t` its timestamp, `v` version); writes are
//! a Lua compare-and-set on the version, so the merge stays in Rust and Redis does a small, fixed amount of work.
//!
//! `d` is the document's `documents` view (state and metadata, as `…/update/documents` carries it), so an update
//! serializes the document once for the message and the store. A `d` without `t` is the older storage form
//! (`Document::to_stored_string`), still read.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use antumbra_wire::DeviceId;

use super::{backend, document_from, ShadowKey, ShadowName, ShadowStore, StoreError, Stored};
use crate::cluster::{manager_config, REDIS_DEADLINE};
use crate::shadow::document::Document;

/// Compare-and-set in one round trip: the document, its timestamp and its version live in one hash (`d`, `t`,
/// `v`); a shadow's first write also adds its name to the device's index (KEYS[2]). A few microseconds inside
/// Redis: the merge was done in Rust.
const CAS_SCRIPT: &str = r#"
local current = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if current ~= tonumber(ARGV[1]) then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], 'd', 't')
  redis.call('HSET', KEYS[1], 'v', ARGV[2])
else
  redis.call('HSET', KEYS[1], 'd', ARGV[3], 't', ARGV[5], 'v', ARGV[2])
end
if current == 0 then redis.call('SADD', KEYS[2], ARGV[4]) end
return 1
"#;

/// Most shadows whose last known state this process keeps for its next update; past it, it starts again empty.
const RECENT: usize = 50_000;

/// The production store: Redis, keys `{prefix}shadow/{device}/{name}` (hash fields `d` document, `v` version)
/// plus a set `{prefix}shadows/{device}` of a device's names for purging (a purge keeps `v` and the set).
#[derive(Clone)]
pub struct RedisStore {
    client: redis::Client,
    conn: std::sync::Arc<std::sync::RwLock<redis::aio::ConnectionManager>>,
    rebuilding: std::sync::Arc<std::sync::atomic::AtomicBool>,
    prefix: String,
    cas: redis::Script,
    /// What this process last read or wrote per shadow, to base its next update on without a read: the
    /// version-checked write catches anything another instance wrote since, and the service then reads again.
    recent: std::sync::Arc<std::sync::Mutex<HashMap<ShadowKey, Stored>>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url`; every key starts with `prefix` (e.g. `antumbra:`).
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(backend)?;
        let config = manager_config().set_number_of_retries(2);
        let conn = redis::aio::ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(backend)?;
        Ok(Self {
            client,
            conn: std::sync::Arc::new(std::sync::RwLock::new(conn)),
            rebuilding: Default::default(),
            prefix: prefix.to_owned(),
            cas: redis::Script::new(CAS_SCRIPT),
            recent: Default::default(),
        })
    }

    fn connection(&self) -> redis::aio::ConnectionManager {
        self.conn.read().expect("redis connection lock").clone()
    }

    /// After a failure, builds a fresh connection in the background (one at a time, retrying until Redis is
    /// back) and swaps it in, so the store recovers on its own however the old connection died.
    fn rebuild(&self) {
        use std::sync::atomic::Ordering;
        if self.rebuilding.swap(true, Ordering::AcqRel) {
            return;
        }
        let (client, slot, flag) = (self.client.clone(), self.conn.clone(), self.rebuilding.clone());
        tokio::spawn(async move {
            loop {
                let config = manager_config();
                match redis::aio::ConnectionManager::new_with_config(client.clone(), config).await {
                    Ok(conn) => {
                        *slot.write().expect("redis connection lock") = conn;
                        tracing::info!("reconnected to Redis");
                        break;
                    }
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
                }
            }
            flag.store(false, Ordering::Release);
        });
    }

    async fn bounded<T>(&self, call: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        let result = bounded(call).await;
        if result.is_err() {
            self.rebuild();
        }
        result
    }

    fn key(&self, key: &ShadowKey) -> String {
        self.shadow_key(&key.device, key.name_str())
    }

    /// The hash of `device`'s shadow named `name` as the index lists it (`""`: the classic shadow).
    fn shadow_key(&self, device: &DeviceId, name: &str) -> String {
        format!("{}shadow/{}/{}", self.prefix, device, name)
    }

    fn index(&self, device: &DeviceId) -> String {
        format!("{}shadows/{}", self.prefix, device)
    }
}

/// `call` within [`REDIS_DEADLINE`] (the bridge's deadline), else the store reports itself unavailable: a
/// request fails fast with 503 while Redis is away instead of waiting on reconnect attempts.
async fn bounded<T>(call: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    tokio::time::timeout(REDIS_DEADLINE, call)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Backend(format!(
                "Redis did not answer within {REDIS_DEADLINE:?}"
            )))
        })
}

impl ShadowStore for RedisStore {
    async fn load(&self, key: &ShadowKey) -> Result<Stored, StoreError> {
        let recent = self.recent().get(key).cloned();
        if let Some(recent) = recent {
            if self.bounded(self.still_current(key, &recent)).await? {
                return Ok(recent);
            }
        }
        let stored = self.bounded(self.load_unbounded(key)).await?;
        self.remember(key, Some(stored.clone()));
        Ok(stored)
    }

    /// Hands over this process's memory of `key` (so an update can change the document in place), or reads it.
    async fn load_for_update(&self, key: &ShadowKey) -> Result<Stored, StoreError> {
        let recent = self.recent().remove(key);
        match recent {
            Some(stored) => Ok(stored),
            None => self.load(key).await,
        }
    }

    async fn compare_and_set(
        &self,
        key: &ShadowKey,
        expected: u64,
        version: u64,
        document: Option<&Arc<Document>>,
    ) -> Result<bool, StoreError> {
        let done = self
            .bounded(self.cas_unbounded(key, expected, version, document))
            .await;
        let known = match &done {
            Ok(true) => Some(Stored {
                document: document.cloned(),
                version,
            }),
            _ => None,
        };
        self.remember(key, known);
        done
    }

    /// The device's index: every shadow ever written, deleted ones included (a purge keeps the index).
    async fn named(&self, device: &DeviceId) -> Result<Vec<ShadowName>, StoreError> {
        let names = self.bounded(self.indexed(device)).await?;
        // The classic shadow is listed as "", which is no shadow name.
        Ok(names
            .iter()
            .filter_map(|name| ShadowName::parse(name).ok())
            .collect())
    }

    async fn purge(&self, device: &DeviceId) -> Result<(), StoreError> {
        self.forget(device);
        self.bounded(self.purge_unbounded(device)).await
    }

    fn forget(&self, device: &DeviceId) {
        self.recent().retain(|key, _| key.device != *device);
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.bounded(async {
            let mut conn = self.connection();
            let _: String = redis::cmd("PING").query_async(&mut conn).await.map_err(backend)?;
            Ok(())
        })
        .await
    }
}

impl RedisStore {
    fn recent(&self) -> std::sync::MutexGuard<'_, HashMap<ShadowKey, Stored>> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes what `key` now holds, or forgets it (`None`: unknown, e.g. after a lost compare-and-set).
    fn remember(&self, key: &ShadowKey, stored: Option<Stored>) {
        let mut recent = self.recent();
        match stored {
            Some(stored) => {
                if recent.len() >= RECENT {
                    recent.clear();
                }
                recent.insert(key.clone(), stored);
            }
            None => {
                recent.remove(key);
            }
        }
    }

    /// Whether Redis still holds `recent` under `key`, asking only for the version and whether a document is
    /// there: every write that stores a document raises the version and a delete keeps it but removes the
    /// document, so the two together name the content (a `GET` then needs no document over the wire and no
    /// parsing).
    async fn still_current(&self, key: &ShadowKey, recent: &Stored) -> Result<bool, StoreError> {
        let mut conn = self.connection();
        let redis_key = self.key(key);
        let (version, has_document): (Option<u64>, bool) = redis::pipe()
            .cmd("HGET")
            .arg(&redis_key)
            .arg("v")
            .cmd("HEXISTS")
            .arg(&redis_key)
            .arg("d")
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(version.unwrap_or(0) == recent.version && has_document == recent.document.is_some())
    }

    async fn load_unbounded(&self, key: &ShadowKey) -> Result<Stored, StoreError> {
        let mut conn = self.connection();
        let (document, timestamp, version): (Option<Vec<u8>>, Option<i64>, Option<u64>) = redis::cmd("HMGET")
            .arg(self.key(key))
            .arg("d")
            .arg("t")
            .arg("v")
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        let document = document
            .map(|text| document_from(text.into(), timestamp))
            .transpose()?;
        Ok(Stored {
            document: document.map(Arc::new),
            version: version.unwrap_or(0),
        })
    }

    async fn cas_unbounded(
        &self,
        key: &ShadowKey,
        expected: u64,
        version: u64,
        document: Option<&Arc<Document>>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.connection();
        let view: &[u8] = document.map_or(b"", |d| d.view_bytes());
        let done: i64 = self
            .cas
            .key(self.key(key))
            .key(self.index(&key.device))
            .arg(expected)
            .arg(version)
            .arg(view)
            .arg(key.name_str())
            .arg(document.map_or(0, |d| d.timestamp))
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(done == 1)
    }

    /// The names in `device`'s index (`""`: the classic shadow).
    async fn indexed(&self, device: &DeviceId) -> Result<Vec<String>, StoreError> {
        let mut conn = self.connection();
        redis::cmd("SMEMBERS")
            .arg(self.index(device))
            .query_async(&mut conn)
            .await
            .map_err(backend)
    }

    async fn purge_unbounded(&self, device: &DeviceId) -> Result<(), StoreError> {
        let names = self.indexed(device).await?;
        let mut conn = self.connection();
        // The documents go; each shadow's version (`v`) and the index stay, so a device registered again under this
        // id continues its versions (a version never goes back) and a later purge still finds every shadow.
        let mut pipe = redis::pipe();
        for name in &names {
            pipe.cmd("HDEL")
                .arg(self.shadow_key(device, name))
                .arg("d")
                .arg("t")
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await.map_err(backend)?;
        Ok(())
    }
}
