//! Where shadow documents live: one trait, two implementations that pass one conformance suite.
//!
//! Both keep a version counter apart from the document, so a version never goes back, not even after a delete
//! and a re-create. Writes are compare-and-set on that version: the service reads, merges in Rust, and writes
//! only if nobody wrote in between, retrying otherwise — so concurrent updates never lose one and the store does
//! only a small, fixed amount of work per update.

mod embedded;
mod redis;

use std::future::Future;
use std::sync::Arc;

use antumbra_wire::DeviceId;

use super::document::Document;
pub use embedded::EmbeddedStore;
pub use redis::RedisStore;

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

    pub(crate) fn name_str(&self) -> &str {
        self.name.as_ref().map_or("", ShadowName::as_str)
    }
}

/// What a store holds for a key.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stored {
    /// The document, if one exists (not deleted); shared, so handing it out copies nothing.
    pub document: Option<Arc<Document>>,
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

    /// What to base an update on: like [`ShadowStore::load`], but it may be what this process last saw rather
    /// than a fresh read, when the compare-and-set that follows would catch anything newer (the caller then
    /// loads again).
    fn load_for_update(&self, key: &ShadowKey) -> impl Future<Output = Result<Stored, StoreError>> + Send {
        self.load(key)
    }

    /// Writes `document` (or deletes the document when `None`) and sets the version to `version`, only if the
    /// stored version is still `expected`. Returns false when it is not (someone wrote in between).
    fn compare_and_set(
        &self,
        key: &ShadowKey,
        expected: u64,
        version: u64,
        document: Option<&Arc<Document>>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The names of `device`'s named shadows, unordered. Every one that holds a document is listed; one whose
    /// document was deleted may be listed too.
    fn named(&self, device: &DeviceId) -> impl Future<Output = Result<Vec<ShadowName>, StoreError>> + Send;

    /// Forgets every shadow document of a device (when the device is deleted). The versions stay, so a device
    /// registered again under the same id continues them: a version never goes back.
    fn purge(&self, device: &DeviceId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Drops what this process remembers of a device's shadows, writing nothing: another instance purged them.
    fn forget(&self, device: &DeviceId);

    /// Checks the backend answers.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

fn decode(text: &str) -> Result<Document, StoreError> {
    Document::from_stored_str(text).map_err(StoreError::Corrupt)
}

/// A document as the stores keep it: its `documents` view with its timestamp beside it, or, without a
/// timestamp, the older storage form ([`Document::to_stored_string`]).
fn document_from(text: bytes::Bytes, timestamp: Option<i64>) -> Result<Document, StoreError> {
    match timestamp {
        Some(timestamp) => Document::from_view(text, timestamp).map_err(StoreError::Corrupt),
        None => decode(std::str::from_utf8(&text).map_err(|e| StoreError::Corrupt(e.to_string()))?),
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
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

    async fn load_for_update(&self, key: &ShadowKey) -> Result<Stored, StoreError> {
        match self {
            Store::Embedded(s) => s.load_for_update(key).await,
            Store::Redis(s) => s.load_for_update(key).await,
        }
    }

    async fn compare_and_set(
        &self,
        key: &ShadowKey,
        expected: u64,
        version: u64,
        document: Option<&Arc<Document>>,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(s) => s.compare_and_set(key, expected, version, document).await,
            Store::Redis(s) => s.compare_and_set(key, expected, version, document).await,
        }
    }

    async fn named(&self, device: &DeviceId) -> Result<Vec<ShadowName>, StoreError> {
        match self {
            Store::Embedded(s) => s.named(device).await,
            Store::Redis(s) => s.named(device).await,
        }
    }

    async fn purge(&self, device: &DeviceId) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.purge(device).await,
            Store::Redis(s) => s.purge(device).await,
        }
    }

    fn forget(&self, device: &DeviceId) {
        match self {
            Store::Embedded(s) => s.forget(device),
            Store::Redis(s) => s.forget(device),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.ping().await,
            Store::Redis(s) => s.ping().await,
        }
    }
}
