//! The device registry in SQL: devices and their tags, certificates, API keys, and the platform CA's record.
//!
//! Repository code only: it stores and finds records and knows nothing of HTTP or of how certificates are
//! made. Writes that belong together take a [`Tx`] so the caller decides where the transaction ends.

mod api_keys;
mod ca;
mod certificates;
mod devices;

pub use api_keys::{ApiKeyRecord, Scope};
pub use ca::{CaOrigin, StoredCa};
pub use certificates::{ActiveCertificate, CertificateRecord, CertificateStatus, KeyOrigin, NewCertificate};
pub use devices::{Device, DeviceChanges, DeviceQuery, NewDevice};

use sqlx::AnyPool;
use time::OffsetDateTime;

/// An open transaction on the registry database.
pub type Tx = sqlx::Transaction<'static, sqlx::Any>;

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The record does not exist.
    #[error("not found")]
    NotFound,
    /// A record with the same key exists.
    #[error("already exists")]
    Conflict,
    /// A stored value could not be read back (corrupt or hand-edited row).
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The database failed or is unreachable.
    #[error("database: {0}")]
    Sql(sqlx::Error),
}

impl RegistryError {
    /// Whether the database is away (down, unreachable, restarting, out of connections) rather than the
    /// request being wrong: worth a 503 and a retry, not a 500.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Sql(e) => sql_unavailable(e),
            _ => false,
        }
    }
}

fn sql_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed
        // A connection that died mid-conversation (the server went away) surfaces as a protocol error.
        | sqlx::Error::Protocol(_) => true,
        // SQLSTATE class 08: connection exception; 57P01..57P03: the server is shutting down, crashed or is
        // not accepting connections yet; 53300: too many connections.
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "53300"),
        _ => false,
    }
}

impl From<sqlx::Error> for RegistryError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::RowNotFound => Self::NotFound,
            sqlx::Error::Database(db) if db.is_unique_violation() => Self::Conflict,
            _ => Self::Sql(e),
        }
    }
}

/// The registry database.
#[derive(Debug, Clone)]
pub struct Registry {
    pool: AnyPool,
    engine: crate::db::Engine,
    /// Recently authenticated API keys (see `active_api_key_by_hash`).
    keys: std::sync::Arc<api_keys::KeyCache>,
}

impl Registry {
    /// Wraps a connected, migrated pool.
    pub fn new(pool: AnyPool) -> Self {
        let engine = crate::db::Engine::of(pool.connect_options().database_url.as_str())
            .unwrap_or(crate::db::Engine::Postgres);
        Self {
            pool,
            engine,
            keys: Default::default(),
        }
    }

    /// Starts a transaction.
    pub async fn begin(&self) -> Result<Tx, RegistryError> {
        Ok(self.pool.begin().await?)
    }

    /// Checks the database answers.
    pub async fn ping(&self) -> Result<(), RegistryError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// A registry on a SQLite file in `dir`, created and migrated: for unit tests.
    #[cfg(test)]
    pub(crate) async fn sqlite_in(dir: &std::path::Path) -> Self {
        let url = crate::db::sqlite_url(&dir.join("registry.db"));
        Self::new(crate::db::connect(&url).await.expect("test database"))
    }

    /// The engine behind the pool.
    pub(crate) fn engine(&self) -> crate::db::Engine {
        self.engine
    }

    /// The pool, for repository functions.
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

/// Milliseconds since the Unix epoch, as stored.
pub(crate) fn to_millis(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The inverse of [`to_millis`].
pub(crate) fn from_millis(ms: i64) -> Result<OffsetDateTime, RegistryError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| RegistryError::Corrupt(format!("timestamp {ms}: {e}")))
}

/// Now, at the millisecond precision the database keeps.
pub(crate) fn now() -> OffsetDateTime {
    from_millis(to_millis(OffsetDateTime::now_utc())).expect("the current time is representable")
}
