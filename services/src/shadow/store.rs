//! Where shadow documents live: one trait, two implementations that pass one conformance suite.
//!
//! Both keep a version counter apart from the document, so a version never goes back, not even after a delete
//! and a re-create. Writes are compare-and-set on that version: the service reads, merges in Rust, and writes
//! only if nobody wrote in between, retrying otherwise — so concurrent updates never lose one and the store does
//! only a small, fixed amount of work per update.

use std::future::Future;
use std::path::Path;
use std::str::FromStr;

use antumbra_wire::DeviceId;
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use super::document::Document;

/// A shadow name: 1–64 of `A-Z a-z 0-9 - _ :` (the AWS rule); the classic shadow has none.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShadowName(String);

impl ShadowName {
    /// Parses a name.
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "shadow name {s:?} is invalid: 1 to 64 characters of A-Z a-z 0-9 - _ :"
            ))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Which shadow: a device's classic shadow or one of its named shadows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShadowKey {
    /// The device.
    pub device: DeviceId,
    /// The name, `None` for the classic shadow.
    pub name: Option<ShadowName>,
}

impl ShadowKey {
    /// The classic shadow of `device`.
    pub fn classic(device: DeviceId) -> Self {
        Self { device, name: None }
    }

    fn name_str(&self) -> &str {
        self.name.as_ref().map_or("", ShadowName::as_str)
    }
}

/// What a store holds for a key.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stored {
    /// The document, if one exists (not deleted).
    pub document: Option<Document>,
    /// The last version ever written (0: never).
    pub version: u64,
}

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed or is unreachable.
    #[error("{0}")]
    Backend(String),
    /// A stored value is not a document.
    #[error("corrupt shadow document: {0}")]
    Corrupt(String),
}

/// A shadow store.
pub trait ShadowStore: Send + Sync {
    /// The document and version stored under `key`.
    fn load(&self, key: &ShadowKey) -> impl Future<Output = Result<Stored, StoreError>> + Send;

    /// Writes `document` (or deletes the document when `None`) and sets the version to `version`, only if the
    /// stored version is still `expected`. Returns false when it is not (someone wrote in between).
    fn compare_and_set(
        &self,
        key: &ShadowKey,
        expected: u64,
        version: u64,
        document: Option<&Document>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Forgets every shadow of a device (when the device is deleted), versions included.
    fn purge(&self, device: &DeviceId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Checks the backend answers.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

fn decode(text: &str) -> Result<Document, StoreError> {
    let value: Value = serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Document::from_stored(&value).ok_or_else(|| StoreError::Corrupt("unexpected shape".into()))
}

// ---- embedded: a SQLite file in the data dir -----------------------------------------------------------------

/// The embedded, durable store: a SQLite file of its own (WAL), the default when no Redis is configured.
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    pool: SqlitePool,
}

impl EmbeddedStore {
    /// Opens (creating) `path`.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(backend)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL under WAL: a crash never corrupts, and the last commits survive a process crash; only a
            // power loss can take the most recent ones.
            .synchronous(SqliteSynchronous::Normal);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(backend)?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS shadows (device_id TEXT NOT NULL, name TEXT NOT NULL, document TEXT, \
             version INTEGER NOT NULL, PRIMARY KEY (device_id, name))",
        )
        .execute(&pool)
        .await
        .map_err(backend)?;
        Ok(Self { pool })
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl ShadowStore for EmbeddedStore {
    async fn load(&self, key: &ShadowKey) -> Result<Stored, StoreError> {
        let row = sqlx::query("SELECT document, version FROM shadows WHERE device_id = ? AND name = ?")
            .bind(key.device.as_str())
            .bind(key.name_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        let Some(row) = row else {
            return Ok(Stored::default());
        };
        let document: Option<String> = row.try_get("document").map_err(backend)?;
        let version: i64 = row.try_get("version").map_err(backend)?;
        Ok(Stored {
            document: document.as_deref().map(decode).transpose()?,
            version: version as u64,
        })
    }

    async fn compare_and_set(
        &self,
        key: &ShadowKey,
        expected: u64,
        version: u64,
        document: Option<&Document>,
    ) -> Result<bool, StoreError> {
        let text = document.map(|d| d.to_stored().to_string());
        let done = if expected == 0 {
            sqlx::query("INSERT INTO shadows (device_id, name, document, version) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING")
                .bind(key.device.as_str())
                .bind(key.name_str())
                .bind(text)
                .bind(version as i64)
                .execute(&self.pool)
                .await
        } else {
            sqlx::query("UPDATE shadows SET document = ?, version = ? WHERE device_id = ? AND name = ? AND version = ?")
                .bind(text)
                .bind(version as i64)
                .bind(key.device.as_str())
                .bind(key.name_str())
                .bind(expected as i64)
                .execute(&self.pool)
                .await
        };
        Ok(done.map_err(backend)?.rows_affected() == 1)
    }

    async fn purge(&self, device: &DeviceId) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM shadows WHERE device_id = ?")
            .bind(device.as_str())
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }
}

// ---- Redis ---------------------------------------------------------------------------------------------------

/// Compare-and-set in one round trip: the document and its version live in one hash (`d`, `v`).
const CAS_SCRIPT: &str = r#"
local current = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if current ~= tonumber(ARGV[1]) then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], 'd') else redis.call('HSET', KEYS[1], 'd', ARGV[3]) end
redis.call('HSET', KEYS[1], 'v', ARGV[2])
return 1
"#;

/// The production store: Redis, keys `{prefix}shadow/{device}/{name}` (hash fields `d` document, `v` version)
/// plus a set `{prefix}shadows/{device}` of a device's names for purging.
#[derive(Clone)]
pub struct RedisStore {
    client: redis::Client,
    conn: std::sync::Arc<std::sync::RwLock<redis::aio::ConnectionManager>>,
    rebuilding: std::sync::Arc<std::sync::atomic::AtomicBool>,
    prefix: String,
    cas: redis::Script,
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
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(std::time::Duration::from_secs(2))
            .set_response_timeout(std::time::Duration::from_secs(2))
            .set_number_of_retries(2);
        let conn = redis::aio::ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(backend)?;
        Ok(Self {
            client,
            conn: std::sync::Arc::new(std::sync::RwLock::new(conn)),
            rebuilding: Default::default(),
            prefix: prefix.to_owned(),
            cas: redis::Script::new(CAS_SCRIPT),
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
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(std::time::Duration::from_secs(2))
                    .set_response_timeout(std::time::Duration::from_secs(2))
                    .set_number_of_retries(1);
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
        format!("{}shadow/{}/{}", self.prefix, key.device, key.name_str())
    }

    fn index(&self, device: &DeviceId) -> String {
        format!("{}shadows/{}", self.prefix, device)
    }
}

/// Longest a Redis call may take before the store reports itself unavailable: a request fails fast with 503
/// while Redis is away instead of waiting on reconnect attempts.
const REDIS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

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
        self.bounded(self.load_unbounded(key)).await
    }

    async fn compare_and_set(
        &self,
        key: &ShadowKey,
        expected: u64,
        version: u64,
        document: Option<&Document>,
    ) -> Result<bool, StoreError> {
        self.bounded(self.cas_unbounded(key, expected, version, document))
            .await
    }

    async fn purge(&self, device: &DeviceId) -> Result<(), StoreError> {
        self.bounded(self.purge_unbounded(device)).await
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
    async fn load_unbounded(&self, key: &ShadowKey) -> Result<Stored, StoreError> {
        let mut conn = self.connection();
        let (document, version): (Option<String>, Option<u64>) = redis::cmd("HMGET")
            .arg(self.key(key))
            .arg("d")
            .arg("v")
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(Stored {
            document: document.as_deref().map(decode).transpose()?,
            version: version.unwrap_or(0),
        })
    }

    async fn cas_unbounded(
        &self,
        key: &ShadowKey,
        expected: u64,
        version: u64,
        document: Option<&Document>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.connection();
        let text = document.map(|d| d.to_stored().to_string()).unwrap_or_default();
        let done: i64 = self
            .cas
            .key(self.key(key))
            .arg(expected)
            .arg(version)
            .arg(text)
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        if done == 1 && expected == 0 {
            let _: i64 = redis::cmd("SADD")
                .arg(self.index(&key.device))
                .arg(key.name_str())
                .query_async(&mut conn)
                .await
                .map_err(backend)?;
        }
        Ok(done == 1)
    }

    async fn purge_unbounded(&self, device: &DeviceId) -> Result<(), StoreError> {
        let mut conn = self.connection();
        let names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.index(device))
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        let mut keys: Vec<String> = names
            .iter()
            .map(|n| format!("{}shadow/{}/{}", self.prefix, device, n))
            .collect();
        keys.push(self.index(device));
        let _: i64 = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(())
    }
}

/// The configured store.
#[derive(Debug, Clone)]
pub enum Store {
    /// Embedded SQLite file.
    Embedded(EmbeddedStore),
    /// Redis.
    Redis(RedisStore),
}

impl ShadowStore for Store {
    async fn load(&self, key: &ShadowKey) -> Result<Stored, StoreError> {
        match self {
            Store::Embedded(s) => s.load(key).await,
            Store::Redis(s) => s.load(key).await,
        }
    }

    async fn compare_and_set(
        &self,
        key: &ShadowKey,
        expected: u64,
        version: u64,
        document: Option<&Document>,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(s) => s.compare_and_set(key, expected, version, document).await,
            Store::Redis(s) => s.compare_and_set(key, expected, version, document).await,
        }
    }

    async fn purge(&self, device: &DeviceId) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.purge(device).await,
            Store::Redis(s) => s.purge(device).await,
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.ping().await,
            Store::Redis(s) => s.ping().await,
        }
    }
}
