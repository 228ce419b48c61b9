//! API keys, stored as SHA-256 hashes of their secret.

use sqlx::any::AnyRow;
use sqlx::Row;
use time::OffsetDateTime;

use super::{from_millis, to_millis, Registry, RegistryError};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Read anything, change nothing.
    Read,
    /// Everything, including managing keys.
    Admin,
}

impl Scope {
    /// The stored and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Result<Self, RegistryError> {
        match s {
            "read" => Ok(Self::Read),
            "admin" => Ok(Self::Admin),
            other => Err(RegistryError::Corrupt(format!("api key scope {other:?}"))),
        }
    }
}

/// An API key on record (never its secret).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeyRecord {
    /// Public identifier.
    pub id: String,
    /// Operator-chosen name.
    pub name: String,
    /// What it may do.
    pub scope: Scope,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When it was revoked.
    pub revoked_at: Option<OffsetDateTime>,
}

const COLUMNS: &str = "id, name, scope, created_at, revoked_at";

impl Registry {
    /// Stores a key by the hash of its secret.
    pub async fn insert_api_key(&self, key: &ApiKeyRecord, secret_hash: &str) -> Result<(), RegistryError> {
        sqlx::query(&format!(
            "INSERT INTO api_keys ({COLUMNS}, secret_hash) VALUES ($1, $2, $3, $4, NULL, $5)"
        ))
        .bind(key.id.clone())
        .bind(key.name.clone())
        .bind(key.scope.as_str())
        .bind(to_millis(key.created_at))
        .bind(secret_hash.to_owned())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Inserts the key or, when its id exists, replaces its secret and un-revokes it (the configured admin key).
    ///
    /// Instances of a cluster start at once with the same key. One statement keeps them from tripping over each
    /// other on the id, but PostgreSQL's ON CONFLICT only arbitrates the id: the second insert can still meet the
    /// first's uncommitted row in the secret's unique index and fail. Once the first has committed, the same
    /// statement finds the id taken and updates, so a conflict is tried again (a secret truly used by another
    /// key conflicts every time and is returned).
    pub async fn upsert_api_key(&self, key: &ApiKeyRecord, secret_hash: &str) -> Result<(), RegistryError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.upsert_api_key_once(key, secret_hash).await {
                Err(RegistryError::Conflict) if attempts < 3 => continue,
                other => return other,
            }
        }
    }

    async fn upsert_api_key_once(&self, key: &ApiKeyRecord, secret_hash: &str) -> Result<(), RegistryError> {
        sqlx::query(&format!(
            "INSERT INTO api_keys ({COLUMNS}, secret_hash) VALUES ($1, $2, $3, $4, NULL, $5) \
             ON CONFLICT (id) DO UPDATE SET name = $2, scope = $3, created_at = $4, revoked_at = NULL, \
             secret_hash = $5"
        ))
        .bind(key.id.clone())
        .bind(key.name.clone())
        .bind(key.scope.as_str())
        .bind(to_millis(key.created_at))
        .bind(secret_hash.to_owned())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The active key whose secret hashes to `secret_hash`.
    ///
    /// Every REST request asks this, so a key found active is remembered for [`KEY_CACHE_TTL`]: a `GET` of a
    /// shadow otherwise pays a database query for its key (measured with `shadow-bench`). A revocation through
    /// this process forgets them all at once; one made through another instance of a cluster takes effect here
    /// within the TTL. Unknown and revoked keys are never remembered.
    pub async fn active_api_key_by_hash(
        &self,
        secret_hash: &str,
    ) -> Result<Option<ApiKeyRecord>, RegistryError> {
        if let Some(key) = self.keys.get(secret_hash) {
            return Ok(Some(key));
        }
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM api_keys WHERE secret_hash = $1 AND revoked_at IS NULL"
        ))
        .bind(secret_hash.to_owned())
        .fetch_optional(self.pool())
        .await?;
        let key = row.as_ref().map(key_from_row).transpose()?;
        if let Some(key) = &key {
            self.keys.put(secret_hash, key.clone());
        }
        Ok(key)
    }

    /// One key by id.
    pub async fn api_key(&self, id: &str) -> Result<ApiKeyRecord, RegistryError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1"))
            .bind(id.to_owned())
            .fetch_optional(self.pool())
            .await?
            .ok_or(RegistryError::NotFound)?;
        key_from_row(&row)
    }

    /// Every key, oldest first.
    pub async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, RegistryError> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM api_keys ORDER BY created_at, id"))
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(key_from_row).collect()
    }

    /// Revokes a key; [`RegistryError::NotFound`] when it does not exist, `Conflict` when already revoked.
    pub async fn revoke_api_key(&self, id: &str, at: OffsetDateTime) -> Result<ApiKeyRecord, RegistryError> {
        self.keys.clear();
        self.api_key(id).await?;
        let done = sqlx::query("UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
            .bind(id.to_owned())
            .bind(to_millis(at))
            .execute(self.pool())
            .await?;
        // Again after the write: a request between the first clear and the write may have remembered the key.
        self.keys.clear();
        if done.rows_affected() == 0 {
            return Err(RegistryError::Conflict);
        }
        self.api_key(id).await
    }
}

/// How long an authenticated key is trusted without asking the database again.
pub const KEY_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// Keys remembered at most; the table is emptied when full.
const KEY_CACHE_CAPACITY: usize = 10_000;

/// Recently authenticated keys by secret hash, with when they were looked up.
#[derive(Debug, Default)]
pub(crate) struct KeyCache(
    std::sync::Mutex<std::collections::HashMap<String, (ApiKeyRecord, std::time::Instant)>>,
);

impl KeyCache {
    fn get(&self, secret_hash: &str) -> Option<ApiKeyRecord> {
        let table = self.0.lock().expect("key cache");
        let (key, at) = table.get(secret_hash)?;
        (at.elapsed() < KEY_CACHE_TTL).then(|| key.clone())
    }

    fn put(&self, secret_hash: &str, key: ApiKeyRecord) {
        let mut table = self.0.lock().expect("key cache");
        if table.len() >= KEY_CACHE_CAPACITY {
            table.clear();
        }
        table.insert(secret_hash.to_owned(), (key, std::time::Instant::now()));
    }

    fn clear(&self) {
        self.0.lock().expect("key cache").clear();
    }
}

fn key_from_row(row: &AnyRow) -> Result<ApiKeyRecord, RegistryError> {
    Ok(ApiKeyRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        scope: Scope::parse(&row.try_get::<String, _>("scope")?)?,
        created_at: from_millis(row.try_get("created_at")?)?,
        revoked_at: row
            .try_get::<Option<i64>, _>("revoked_at")?
            .map(from_millis)
            .transpose()?,
    })
}
