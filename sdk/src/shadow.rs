//! The shadow API: `get`, `report`, `update`, `delete`, and the stream of deltas.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::client::Inner;
use crate::Error;

/// What the platform wants changed: the desired fields that differ from reported, and the shadow version.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    /// The delta state (a JSON object).
    pub state: Value,
    /// The shadow version it belongs to.
    pub version: u64,
}

impl Delta {
    /// The delta as a typed value (typically a struct of `Option` fields).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_value(self.state.clone()).map_err(|e| Error::Payload(e.to_string()))
    }
}

/// A shadow document as the platform returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Desired state (an empty object when there is none).
    pub desired: Value,
    /// Reported state (an empty object when there is none).
    pub reported: Value,
    /// The delta (an empty object when desired and reported agree).
    pub delta: Value,
    /// The version.
    pub version: u64,
}

/// One shadow of the device (the classic one or a named one).
#[derive(Clone)]
pub struct Shadow {
    inner: Arc<Inner>,
    name: Option<String>,
}

impl std::fmt::Debug for Shadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shadow")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A stream of deltas. Every delta that is newer than the last one delivered arrives once, including the one
/// replayed after a reconnect; stale ones are dropped.
pub struct Deltas {
    rx: broadcast::Receiver<Delta>,
}

impl Deltas {
    /// The next delta; `None` when the device is gone.
    pub async fn next(&mut self) -> Option<Delta> {
        loop {
            match self.rx.recv().await {
                Ok(delta) => return Some(delta),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next delta as a typed value.
    pub async fn next_as<T: DeserializeOwned>(&mut self) -> Option<Result<(T, u64), Error>> {
        let delta = self.next().await?;
        Some(delta.parse().map(|state| (state, delta.version)))
    }
}

impl Shadow {
    pub(crate) fn new(inner: Arc<Inner>, name: Option<String>) -> Self {
        // Registering the shadow now makes every reconnect resynchronise it.
        drop(inner.deltas(name.as_deref()));
        Self { inner, name }
    }

    /// Deltas of this shadow, from now on (and after every reconnect, whatever changed while away).
    pub fn deltas(&self) -> Deltas {
        Deltas {
            rx: self.inner.deltas(self.name.as_deref()),
        }
    }

    /// The whole document. A shadow that does not exist yet is `Err(Rejected { code: 404, .. })`.
    pub async fn get(&self) -> Result<Document, Error> {
        let reply = self.inner.request(self.name.as_deref(), "get", json!({})).await?;
        let state = &reply["state"];
        let part = |k: &str| state.get(k).cloned().unwrap_or_else(|| json!({}));
        Ok(Document {
            desired: part("desired"),
            reported: part("reported"),
            delta: part("delta"),
            version: reply["version"].as_u64().unwrap_or(0),
        })
    }

    /// Reports state (merged into `reported`); returns the new version.
    pub async fn report(&self, reported: impl Serialize) -> Result<u64, Error> {
        let reported = serde_json::to_value(reported).map_err(|e| Error::Payload(e.to_string()))?;
        self.update(json!({ "reported": reported }), None).await
    }

    /// A raw update (`{"desired": …, "reported": …}`), optionally only at `version`; returns the new version.
    /// A version conflict is `Err(Rejected { code: 409, version: Some(current), .. })`.
    pub async fn update(&self, state: Value, version: Option<u64>) -> Result<u64, Error> {
        let mut body = json!({ "state": state });
        if let Some(version) = version {
            body["version"] = json!(version);
        }
        let reply = self.inner.request(self.name.as_deref(), "update", body).await?;
        reply["version"]
            .as_u64()
            .ok_or_else(|| Error::Payload("accepted reply without version".into()))
    }

    /// Deletes the document; returns the version deleted.
    pub async fn delete(&self) -> Result<u64, Error> {
        let reply = self
            .inner
            .request(self.name.as_deref(), "delete", json!({}))
            .await?;
        Ok(reply["version"].as_u64().unwrap_or(0))
    }
}
