//! Device shadows: the document engine (pure), request parsing and limits, the stores, and the service that
//! REST and MQTT both call.
//!
//! Every accepted change is written with compare-and-set and then announced on the outbox: `accepted`,
//! `documents` and — whenever one remains — `delta`, on the device's own topics. The MQTT front door drains the
//! outbox into the router, so a device that is online gets its delta at once; a device that is offline gets it
//! the moment it subscribes to its delta topic again (see [`Shadows::replay`]).

pub mod document;
pub mod request;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;

use antumbra_wire::topics::shadow_topic;
use antumbra_wire::DeviceId;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::events::{EventBus, PlatformEvent};
use crate::presence::Presence;
use crate::registry::{self, Registry};
use document::{Document, Patch};
use request::{Limits, PlainRequest, ShadowError, UpdateRequest};
use store::{ShadowKey, ShadowName, ShadowStore, Store, StoreError, Stored};

/// How often an update retries when another writer (another instance) got in between.
const MAX_ATTEMPTS: usize = 32;
/// Lock stripes: updates to one shadow queue behind each other inside this process, so compare-and-set only
/// ever races against other instances.
const STRIPES: usize = 256;
/// Most requests one shadow may have in flight in this process (written, or queued behind the one being written);
/// one more is answered 429 at once instead of joining an ever longer queue. AWS IoT allows 10 per shadow.
pub const MAX_IN_FLIGHT: usize = 100;
/// How long a device found in the registry is taken to exist without asking again (REST requests only; the
/// MQTT side knows its device). Deleting a device forgets it at once on every instance (see [`Shadows::forget`]);
/// this bounds how stale the answer can be should that notice be missed.
const KNOWN_DEVICE_FOR: std::time::Duration = std::time::Duration::from_secs(10);
/// Most devices remembered as existing; past it the memory starts again empty.
const KNOWN_DEVICES: usize = 100_000;

/// A message for a device topic, queued for the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// The topic.
    pub topic: String,
    /// The JSON payload.
    pub payload: Vec<u8>,
}

/// Where the messages of a change go. A change hands them over while it still holds its shadow's stripe, so
/// the messages of two changes of one shadow reach the broker in the order the changes were written.
pub trait Courier: Send {
    /// Takes the messages of one change (or one reply), in order.
    fn deliver(&mut self, messages: Vec<Outgoing>);

    /// Whether a message on `topic` would reach anyone. A change does not make the messages nobody would
    /// receive; a courier that cannot tell says yes.
    fn wants(&self, _topic: &str) -> bool {
        true
    }
}

/// The outbox, which the broker drains: REST changes and everything not made by a device session.
impl Courier for &mpsc::UnboundedSender<Outgoing> {
    fn deliver(&mut self, messages: Vec<Outgoing>) {
        for message in messages {
            let _ = self.send(message);
        }
    }
}

/// The result of an accepted update.
#[derive(Debug, Clone)]
pub struct Updated {
    /// The `accepted` reply, serialized.
    pub accepted: Vec<u8>,
    /// The document as it now is.
    pub document: Arc<Document>,
}

/// The shadow service.
#[derive(Debug, Clone)]
pub struct Shadows {
    store: Store,
    limits: Limits,
    registry: Registry,
    events: EventBus,
    outbox: mpsc::UnboundedSender<Outgoing>,
    stripes: std::sync::Arc<Vec<tokio::sync::Mutex<()>>>,
    /// Requests in flight per shadow (see [`MAX_IN_FLIGHT`]); a shadow with none has no entry.
    in_flight: std::sync::Arc<std::sync::Mutex<HashMap<ShadowKey, usize>>>,
    /// Devices recently found in the registry, and when (a plain mutex: held for a map lookup, never across an
    /// await).
    known: std::sync::Arc<std::sync::Mutex<HashMap<DeviceId, std::time::Instant>>>,
    /// Who is connected to this instance (see [`Shadows::with_presence`]).
    presence: Option<Arc<Presence>>,
}

impl From<StoreError> for ShadowError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Backend(e) => ShadowError::Unavailable(e),
            StoreError::Corrupt(e) => ShadowError::Internal(e),
        }
    }
}

fn now_secs() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl Shadows {
    /// The service over `store`; messages for devices go to the returned receiver (the broker drains it).
    pub fn new(
        store: Store,
        limits: Limits,
        registry: Registry,
        events: EventBus,
    ) -> (Self, mpsc::UnboundedReceiver<Outgoing>) {
        let (outbox, rx) = mpsc::unbounded_channel();
        let stripes = std::sync::Arc::new((0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect());
        (
            Self {
                store,
                limits,
                registry,
                events,
                outbox,
                stripes,
                in_flight: Default::default(),
                known: Default::default(),
                presence: None,
            },
            rx,
        )
    }

    /// Takes a device connected to this instance for one that exists, without asking the registry: a REST
    /// request for such a device costs no database query. Its deletion ends its session, and [`Shadows::forget`]
    /// (called before the deletion is answered, and on its event on every instance) makes presence forget it at
    /// once.
    pub fn with_presence(mut self, presence: Arc<Presence>) -> Self {
        self.presence = Some(presence);
        self
    }

    /// A sender into the outbox, for other services that message devices (OTA).
    pub fn outbox(&self) -> mpsc::UnboundedSender<Outgoing> {
        self.outbox.clone()
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Checks the store answers.
    pub async fn ping(&self) -> Result<(), ShadowError> {
        Ok(self.store.ping().await?)
    }

    /// Parses a shadow name from a topic or query.
    pub fn key(device: &DeviceId, name: Option<&str>) -> Result<ShadowKey, ShadowError> {
        let name = name
            .map(ShadowName::parse)
            .transpose()
            .map_err(ShadowError::BadRequest)?;
        Ok(ShadowKey {
            device: device.clone(),
            name,
        })
    }

    fn stripe(&self, key: &ShadowKey) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        key.hash(&mut h);
        &self.stripes[(h.finish() as usize) % STRIPES]
    }

    async fn ensure_device(&self, device: &DeviceId) -> Result<(), ShadowError> {
        let known = |known: &HashMap<DeviceId, std::time::Instant>| {
            known
                .get(device)
                .is_some_and(|at| at.elapsed() < KNOWN_DEVICE_FOR)
        };
        if known(&self.known.lock().expect("known devices")) {
            return Ok(());
        }
        if self.presence.as_ref().is_some_and(|p| p.connected_here(device)) {
            return Ok(());
        }
        match self.registry.device_exists(device).await {
            Ok(true) => {
                let mut known = self.known.lock().expect("known devices");
                if known.len() >= KNOWN_DEVICES {
                    known.clear();
                }
                known.insert(device.clone(), std::time::Instant::now());
                Ok(())
            }
            Ok(false) => Err(ShadowError::UnknownDevice(format!("device {device} not found"))),
            Err(e) if e.is_unavailable() => Err(ShadowError::DatabaseUnavailable(e.to_string())),
            Err(e) => Err(ShadowError::Internal(e.to_string())),
        }
    }

    /// Applies an update: read, merge in Rust, compare-and-set, retrying when another writer got in between.
    /// `known_device` skips the registry check (the MQTT side has authenticated the device already). Its
    /// messages go to the outbox.
    pub async fn update(
        &self,
        key: &ShadowKey,
        request: &UpdateRequest,
        known_device: bool,
    ) -> Result<Updated, ShadowError> {
        let (document, accepted) = self
            .update_via(key, request, known_device, &mut &self.outbox)
            .await?;
        let accepted = accepted.unwrap_or_else(|| accepted_reply(request, &document, document.timestamp));
        Ok(Updated { accepted, document })
    }

    /// [`Shadows::update`], its messages handed to `courier`: the document written, and the `accepted` reply
    /// when the courier wanted it.
    #[tracing::instrument(skip_all, fields(device_id = %key.device, shadow = key.name.as_ref().map(|n| n.as_str())))]
    async fn update_via(
        &self,
        key: &ShadowKey,
        request: &UpdateRequest,
        known_device: bool,
        courier: &mut dyn Courier,
    ) -> Result<(Arc<Document>, Option<Vec<u8>>), ShadowError> {
        if !known_device {
            self.ensure_device(&key.device).await?;
        }
        let now = now_secs();
        let limits = self.limits;
        let (_turn, write, previous_view) = self
            .write(key, |stored| {
                check_version(request.version, stored.version)?;
                // The stored document becomes the next version in place when nothing else holds it (the
                // store handed over its memory of it); only the previous version's serialized view is kept.
                let (previous_view, mut next) = match stored.document {
                    Some(document) => (Some(document.view_bytes().clone()), document),
                    None => (
                        None,
                        Arc::new(Document {
                            version: stored.version,
                            ..Document::default()
                        }),
                    ),
                };
                Arc::make_mut(&mut next).apply(&request.desired, &request.reported, now);
                if let Some(size) = next.state_over(limits.max_state_bytes) {
                    return Err(request::too_large(size, &limits));
                }
                let write = Write {
                    version: next.version,
                    document: Some(next),
                };
                Ok((write, previous_view))
            })
            .await?;
        let next = write.document.expect("an update writes a document");
        let accepted = self.announce_update(key, previous_view.as_deref(), &next, now, request, courier);
        Ok((next, accepted))
    }

    /// The current document; 404 when there is none.
    pub async fn get(&self, key: &ShadowKey, known_device: bool) -> Result<Document, ShadowError> {
        self.get_shared(key, known_device).await.map(Arc::unwrap_or_clone)
    }

    /// [`Shadows::get`] without copying the document out of the store's memory.
    pub async fn get_shared(
        &self,
        key: &ShadowKey,
        known_device: bool,
    ) -> Result<Arc<Document>, ShadowError> {
        if !known_device {
            self.ensure_device(&key.device).await?;
        }
        self.store.load(key).await?.document.ok_or_else(|| not_found(key))
    }

    /// Deletes the document (its version number is kept, so the next document continues from it). Its message
    /// goes to the outbox.
    pub async fn delete(
        &self,
        key: &ShadowKey,
        request: &PlainRequest,
        known_device: bool,
    ) -> Result<Value, ShadowError> {
        self.delete_via(key, request, known_device, &mut &self.outbox)
            .await
    }

    /// [`Shadows::delete`], its message handed to `courier`.
    async fn delete_via(
        &self,
        key: &ShadowKey,
        request: &PlainRequest,
        known_device: bool,
        courier: &mut dyn Courier,
    ) -> Result<Value, ShadowError> {
        if !known_device {
            self.ensure_device(&key.device).await?;
        }
        let (_turn, _, version) = self
            .write(key, |stored| {
                let Some(document) = stored.document else {
                    return Err(not_found(key));
                };
                check_version(request.version, stored.version)?;
                let write = Write {
                    version: stored.version,
                    document: None,
                };
                Ok((write, document.version))
            })
            .await?;
        let mut reply = json!({ "version": version, "timestamp": now_secs() });
        if let Some(token) = &request.client_token {
            reply["clientToken"] = json!(token);
        }
        courier.deliver(vec![json_message(key, "delete/accepted", &reply)]);
        self.events.publish(PlatformEvent::ShadowDeleted {
            device_id: key.device.to_string(),
            name: key.name.as_ref().map(|n| n.as_str().to_owned()),
            version,
            at: registry::now(),
        });
        Ok(reply)
    }

    /// Read → decide → compare-and-set under this shadow's stripe, retrying (after a short random pause) when
    /// another instance wrote in between. `decide` takes what is stored and returns the write and what the caller
    /// keeps of the old state. Returns the stripe's guard, so the caller announces the change before the next
    /// change of the same shadow is made.
    async fn write<T>(
        &self,
        key: &ShadowKey,
        mut decide: impl FnMut(Stored) -> Result<(Write, T), ShadowError>,
    ) -> Result<(tokio::sync::MutexGuard<'_, ()>, Write, T), ShadowError> {
        let _in_flight = InFlight::enter(&self.in_flight, key)?;
        let turn = self.stripe(key).lock().await;
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 1 {
                backoff(attempt).await;
            }
            // The first attempt may start from what this process last saw (one store round trip per update
            // instead of two); a lost compare-and-set, or a version conflict found on it, reads afresh.
            let stored = if attempt == 0 {
                self.store.load_for_update(key).await?
            } else {
                self.store.load(key).await?
            };
            let expected = stored.version;
            let (write, kept) = match decide(stored) {
                Err(ShadowError::VersionConflict { .. }) if attempt == 0 => continue,
                decided => decided?,
            };
            if self
                .store
                .compare_and_set(key, expected, write.version, write.document.as_ref())
                .await?
            {
                return Ok((turn, write, kept));
            }
        }
        Err(ShadowError::TooManyRequests)
    }

    /// Drops the documents of a deleted device's shadows, keeping their versions. Called once, by the instance
    /// that deleted the device, before it answers; every instance then [`Shadows::forget`]s on the event.
    pub async fn purge(&self, device: &DeviceId) -> Result<(), ShadowError> {
        self.forget(device);
        Ok(self.store.purge(device).await?)
    }

    /// Drops what this process remembers of a deleted device (that it exists, its shadows), writing nothing. A
    /// purge here instead could arrive after the device was registered again and wipe its new documents.
    pub fn forget(&self, device: &DeviceId) {
        self.known.lock().expect("known devices").remove(device);
        // Its session here may outlive the deletion by a moment (it is ended on the deletion's event): from now
        // on the session no longer vouches for the device.
        if let Some(presence) = &self.presence {
            presence.forget(device);
        }
        self.store.forget(device);
    }

    /// Offline replay: hands `courier` the current delta of `key` (if any) on its delta topic. Called when the
    /// device subscribes to that topic, so desired state set while it was away reaches it as one delta, latest
    /// version.
    pub async fn replay(&self, key: &ShadowKey, courier: &mut dyn Courier) -> Result<bool, ShadowError> {
        let stored = self.store.load(key).await?;
        match stored.document.as_deref().and_then(Document::delta_message) {
            Some(delta) => {
                courier.deliver(vec![json_message(key, "update/delta", &delta)]);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Offline replay for a subscription that covers the delta topic of every named shadow of `device` (a
    /// wildcard in the name's place, as in `devices/{id}/shadow/name/+/update/delta` or `devices/{id}/#`): the
    /// pending delta of each named shadow that has one.
    pub async fn replay_named(
        &self,
        device: &DeviceId,
        courier: &mut dyn Courier,
    ) -> Result<(), ShadowError> {
        for name in self.store.named(device).await? {
            let key = ShadowKey {
                device: device.clone(),
                name: Some(name),
            };
            self.replay(&key, courier).await?;
        }
        Ok(())
    }

    /// Handles a request a device published on `…/shadow[/name/{n}]/{op}`: its replies, and every other message
    /// the change makes, go to `courier`.
    pub async fn handle_device_request(
        &self,
        device: &DeviceId,
        name: Option<&str>,
        op: antumbra_wire::topics::ShadowOp,
        payload: &[u8],
        courier: &mut dyn Courier,
    ) {
        use antumbra_wire::topics::ShadowOp;
        // The op's rejected reply. Only a rejection needs the token read apart from the request (which may not
        // parse).
        let rejected = |key: &ShadowKey, e: &ShadowError| {
            let token = request::client_token_of(payload, &self.limits);
            json_message(
                key,
                &format!("{}/rejected", op.as_str()),
                &rejection(e, token.as_deref()),
            )
        };
        let key = match Self::key(device, name) {
            Ok(key) => key,
            Err(e) => {
                // A name that is not a shadow name: reply on the classic shadow's rejected topic for that op.
                courier.deliver(vec![rejected(&ShadowKey::classic(device.clone()), &e)]);
                return;
            }
        };
        let result = match op {
            ShadowOp::Update => match request::parse_update(payload, &self.limits) {
                Ok(request) => self.update_via(&key, &request, true, courier).await.map(|_| ()),
                Err(e) => Err(e),
            },
            ShadowOp::Get => match request::parse_plain(payload, &self.limits) {
                Ok(request) => self.get_shared(&key, true).await.map(|doc| {
                    let reply = doc.to_json_bytes(request.client_token.as_deref());
                    courier.deliver(vec![message(&key, "get/accepted", reply)]);
                }),
                Err(e) => Err(e),
            },
            ShadowOp::Delete => match request::parse_plain(payload, &self.limits) {
                Ok(request) => self.delete_via(&key, &request, true, courier).await.map(|_| ()),
                Err(e) => Err(e),
            },
        };
        if let Err(e) = result {
            tracing::debug!(device_id = %device, op = op.as_str(), error = %e, "shadow request rejected");
            courier.deliver(vec![rejected(&key, &e)]);
        }
    }

    /// Handles updates a device published on one shadow's update topic and that were read together, in order.
    /// When each of them applies (it parses, names no version, and keeps the document within the limits), they
    /// are written with one compare-and-set: each still gets its own version, `accepted` reply, `documents`
    /// message, delta and event, and their messages reach `courier` in one delivery. Otherwise each is handled
    /// on its own, as [`Shadows::handle_device_request`] does.
    pub async fn handle_device_updates(
        &self,
        device: &DeviceId,
        name: Option<&str>,
        payloads: &[&[u8]],
        courier: &mut dyn Courier,
    ) {
        use antumbra_wire::topics::ShadowOp;
        if payloads.len() > 1 && self.update_together(device, name, payloads, courier).await {
            return;
        }
        for payload in payloads {
            self.handle_device_request(device, name, ShadowOp::Update, payload, courier)
                .await;
        }
    }

    /// The one compare-and-set of [`Shadows::handle_device_updates`]; `false` when it was not made, and nothing
    /// was written or handed to `courier`.
    async fn update_together(
        &self,
        device: &DeviceId,
        name: Option<&str>,
        payloads: &[&[u8]],
        courier: &mut dyn Courier,
    ) -> bool {
        let Ok(key) = Self::key(device, name) else {
            return false;
        };
        let mut requests = Vec::with_capacity(payloads.len());
        for payload in payloads {
            match request::parse_update(payload, &self.limits) {
                Ok(request) if request.version.is_none() => requests.push(request),
                _ => return false,
            }
        }
        let Ok(_in_flight) = InFlight::enter(&self.in_flight, &key) else {
            return false;
        };
        let _turn = self.stripe(&key).lock().await;
        // A document taken from the store and then not written is read afresh by the next update (see
        // `ShadowStore::load_for_update`).
        let Ok(stored) = self.store.load_for_update(&key).await else {
            return false;
        };
        let expected = stored.version;
        let existed = stored.document.is_some();
        let mut next = stored.document.unwrap_or_else(|| {
            Arc::new(Document {
                version: stored.version,
                ..Document::default()
            })
        });
        let now = now_secs();
        let topics = UpdateTopics::wanted(&key, courier);
        let wants_documents = topics.documents.is_some();
        let limit = self.limits.max_state_bytes;
        // Each `documents` message carries the version before and the one after: the views of every version.
        let mut previous_view = (wants_documents && existed).then(|| next.view_bytes().clone());
        let document = Arc::make_mut(&mut next);
        let mut messages = Vec::with_capacity(requests.len());
        let mut versions = Vec::with_capacity(requests.len());
        for (i, request) in requests.iter().enumerate() {
            document.apply(&request.desired, &request.reported, now);
            // Every version within the limit, as one at a time; measured on its view when that is serialized
            // anyway (the last, which is written; each when `documents` messages are wanted).
            let over = match i + 1 == requests.len() || wants_documents {
                true => document.state_over(limit),
                false => Some(document.state_size()).filter(|size| *size > limit),
            };
            if over.is_some() {
                return false;
            }
            topics.messages(previous_view.as_deref(), document, now, request, &mut messages);
            if wants_documents {
                previous_view = Some(document.view_bytes().clone());
            }
            versions.push((document.version, reported_firmware(&request.reported, document)));
        }
        match self
            .store
            .compare_and_set(&key, expected, next.version, Some(&next))
            .await
        {
            Ok(true) => {}
            // Another instance wrote in between: each goes on its own, from a fresh read.
            Ok(false) => return false,
            // Whether it was written is not known (an answer that did not come in time): a fresh read tells. Not
            // written: each goes on its own. Unknown still: each is answered with the error, none tried again.
            Err(e) => match self.store.load(&key).await {
                Ok(now)
                    if now.version == next.version
                        && now
                            .document
                            .as_ref()
                            .is_some_and(|d| d.view_bytes() == next.view_bytes()) => {}
                Ok(now) if now.version == expected => return false,
                _ => {
                    let e = ShadowError::from(e);
                    let rejections = requests.iter().map(|request| {
                        let reply = rejection(&e, request.client_token.as_deref());
                        json_message(&key, "update/rejected", &reply)
                    });
                    courier.deliver(rejections.collect());
                    return true;
                }
            },
        }
        courier.deliver(messages);
        for (version, reported_firmware) in versions {
            self.publish_updated(&key, version, reported_firmware);
        }
        true
    }

    /// Hands `courier` the messages of an update it wants (`accepted`, `documents`, `delta` when one remains)
    /// and tells the event bus; returns the `accepted` reply when it was made.
    fn announce_update(
        &self,
        key: &ShadowKey,
        previous_view: Option<&[u8]>,
        next: &Document,
        now: i64,
        request: &UpdateRequest,
        courier: &mut dyn Courier,
    ) -> Option<Vec<u8>> {
        let topics = UpdateTopics::wanted(key, courier);
        let mut messages = Vec::with_capacity(3);
        topics.messages(previous_view, next, now, request, &mut messages);
        // The `accepted` reply comes first when it was made.
        let accepted = messages.first().filter(|_| topics.accepted.is_some());
        let accepted = accepted.map(|m| m.payload.clone());
        courier.deliver(messages);
        self.publish_updated(key, next.version, reported_firmware(&request.reported, next));
        accepted
    }

    /// Tells the event bus that `key` is at `version` now, when anyone reads it: an application watching (here or,
    /// in a cluster, elsewhere), or the OTA rollback check (a classic shadow whose update reported its firmware).
    /// An event made for nobody woke each of the bus's subscribers (OTA, the revocation listener, the cluster
    /// bridge) for every update, and took a copy each: at a paced 10,000 updates/s, p99 publish->accepted was
    /// 12-23 ms with the event and 5.2-5.6 ms without it, in three alternating pairs (BENCH.md, session 17).
    fn publish_updated(&self, key: &ShadowKey, version: u64, reported_firmware: Option<String>) {
        let for_ota = key.name.is_none() && reported_firmware.is_some();
        if !for_ota && !self.events.shadow_changes_watched() {
            return;
        }
        self.events.publish(PlatformEvent::ShadowUpdated {
            device_id: key.device.to_string(),
            name: key.name.as_ref().map(|n| n.as_str().to_owned()),
            version,
            at: registry::now(),
            reported_firmware,
        });
    }
}

/// The topics of an update's messages that a courier wants (`None`: not wanted, not made).
struct UpdateTopics {
    accepted: Option<String>,
    documents: Option<String>,
    delta: Option<String>,
}

impl UpdateTopics {
    fn wanted(key: &ShadowKey, courier: &dyn Courier) -> Self {
        let topic = |suffix| {
            let topic = shadow_topic(&key.device, key.name.as_ref().map(ShadowName::as_str), suffix);
            courier.wants(&topic).then_some(topic)
        };
        Self {
            accepted: topic("update/accepted"),
            documents: topic("update/documents"),
            delta: topic("update/delta"),
        }
    }

    /// Adds to `out` the messages of the update `request` that made `next` (from the version whose view is
    /// `previous_view`): `accepted`, `documents`, and `delta` when one remains, those wanted, in that order.
    fn messages(
        &self,
        previous_view: Option<&[u8]>,
        next: &Document,
        now: i64,
        request: &UpdateRequest,
        out: &mut Vec<Outgoing>,
    ) {
        if let Some(topic) = &self.accepted {
            out.push(Outgoing {
                topic: topic.clone(),
                payload: accepted_reply(request, next, now),
            });
        }
        if let Some(topic) = &self.documents {
            let token = request.client_token.as_deref();
            out.push(Outgoing {
                topic: topic.clone(),
                payload: document::documents_message(previous_view, next, token),
            });
        }
        if let Some(topic) = &self.delta {
            if let Some(delta) = next.delta_message() {
                out.push(Outgoing {
                    topic: topic.clone(),
                    payload: serde_json::to_vec(&delta).unwrap_or_default(),
                });
            }
        }
    }
}

/// A message on one of the shadow's topics (`suffix` after `…/shadow[/name/{n}]/`).
fn message(key: &ShadowKey, suffix: &str, payload: Vec<u8>) -> Outgoing {
    let topic = shadow_topic(&key.device, key.name.as_ref().map(ShadowName::as_str), suffix);
    Outgoing { topic, payload }
}

fn json_message(key: &ShadowKey, suffix: &str, payload: &Value) -> Outgoing {
    message(key, suffix, serde_json::to_vec(payload).unwrap_or_default())
}

/// One request counted against its shadow's [`MAX_IN_FLIGHT`] until dropped (also when its future is).
struct InFlight<'a> {
    counts: &'a std::sync::Mutex<HashMap<ShadowKey, usize>>,
    key: &'a ShadowKey,
}

impl<'a> InFlight<'a> {
    fn enter(
        counts: &'a std::sync::Mutex<HashMap<ShadowKey, usize>>,
        key: &'a ShadowKey,
    ) -> Result<Self, ShadowError> {
        let mut map = counts.lock().expect("in-flight counts");
        let count = map.entry(key.clone()).or_default();
        if *count >= MAX_IN_FLIGHT {
            return Err(ShadowError::TooManyRequests);
        }
        *count += 1;
        Ok(Self { counts, key })
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut map = self.counts.lock().expect("in-flight counts");
        if let Some(count) = map.get_mut(self.key) {
            *count -= 1;
            if *count == 0 {
                map.remove(self.key);
            }
        }
    }
}

/// The firmware version the device reports (`reported.firmware.version`), when this update reported its
/// `firmware`: what OTA needs to see a rollback, without reading the shadow again.
fn reported_firmware(patch: &Patch, next: &Document) -> Option<String> {
    match patch {
        Patch::Merge(fields) if fields.contains_key("firmware") => next.firmware_version().map(str::to_owned),
        _ => None,
    }
}

/// A short random pause before retrying a lost compare-and-set, growing with the attempt.
async fn backoff(attempt: usize) {
    let ceiling = 200u64 << attempt.min(6);
    tokio::time::sleep(std::time::Duration::from_micros(rand::random::<u64>() % ceiling)).await;
}

fn not_found(key: &ShadowKey) -> ShadowError {
    match &key.name {
        Some(name) => ShadowError::NotFound(format!(
            "no shadow named {:?} for device {}",
            name.as_str(),
            key.device
        )),
        None => ShadowError::NotFound(format!("no shadow for device {}", key.device)),
    }
}

/// 409 unless the request names no version or the current one.
fn check_version(expected: Option<u64>, current: u64) -> Result<(), ShadowError> {
    match expected {
        Some(expected) if expected != current => Err(ShadowError::VersionConflict { current }),
        _ => Ok(()),
    }
}

/// What a change writes: the document (`None` deletes it) and the version.
struct Write {
    document: Option<Arc<Document>>,
    version: u64,
}

/// The `accepted` reply, serialized: the request's state, metadata stamped for each field in it, version,
/// timestamp, token (fields in alphabetical order, as in every other message).
fn accepted_reply(request: &UpdateRequest, next: &Document, now: i64) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Accepted<'a> {
        #[serde(rename = "clientToken", skip_serializing_if = "Option::is_none")]
        client_token: Option<&'a str>,
        metadata: Sections<'a>,
        state: Echo<'a>,
        timestamp: i64,
        version: u64,
    }
    /// The request's `state` as it came (`null` for a section it removed), from the patches it was read into.
    #[derive(serde::Serialize)]
    struct Echo<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        desired: Option<Option<&'a serde_json::Map<String, Value>>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reported: Option<Option<&'a serde_json::Map<String, Value>>>,
    }
    fn echo(patch: &Patch) -> Option<Option<&serde_json::Map<String, Value>>> {
        match patch {
            Patch::Merge(fields) => Some(Some(fields)),
            Patch::Remove => Some(None),
            Patch::Absent => None,
        }
    }
    #[derive(serde::Serialize)]
    struct Sections<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        desired: Option<Stamped<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reported: Option<Stamped<'a>>,
    }
    fn stamped(patch: &Patch, now: i64) -> Option<Stamped<'_>> {
        match patch {
            Patch::Merge(fields) => Some(Stamped::Fields(fields, now)),
            Patch::Remove => Some(Stamped::Leaf(now)),
            Patch::Absent => None,
        }
    }
    serde_json::to_vec(&Accepted {
        client_token: request.client_token.as_deref(),
        metadata: Sections {
            desired: stamped(&request.desired, now),
            reported: stamped(&request.reported, now),
        },
        state: Echo {
            desired: echo(&request.desired),
            reported: echo(&request.reported),
        },
        timestamp: now,
        version: next.version,
    })
    .unwrap_or_default()
}

/// Metadata of an `accepted` reply, written as it is serialized: each field of the request stamped with `now`
/// (`null`s included; the same tree as `document::request_metadata`, which the tests compare it with).
enum Stamped<'a> {
    Fields(&'a serde_json::Map<String, Value>, i64),
    Leaf(i64),
}

impl serde::Serialize for Stamped<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match *self {
            Stamped::Leaf(now) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("timestamp", &now)?;
                map.end()
            }
            Stamped::Fields(fields, now) => {
                let mut map = serializer.serialize_map(Some(fields.len()))?;
                for (key, value) in fields {
                    match value {
                        Value::Object(inner) => map.serialize_entry(key, &Stamped::Fields(inner, now))?,
                        _ => map.serialize_entry(key, &Stamped::Leaf(now))?,
                    }
                }
                map.end()
            }
        }
    }
}

/// The `rejected` reply, AWS style.
pub fn rejection(error: &ShadowError, token: Option<&str>) -> Value {
    let mut reply = json!({ "code": error.code(), "message": error.to_string(), "timestamp": now_secs() });
    if let ShadowError::VersionConflict { current } = error {
        reply["version"] = json!(current);
    }
    if let Some(token) = token {
        reply["clientToken"] = json!(token);
    }
    reply
}

#[cfg(test)]
mod conformance;

#[cfg(test)]
mod tests {
    use super::*;
    use document::request_metadata;

    /// The reply as a `Value` (how it was built before it was serialized directly).
    fn accepted_value(request: &UpdateRequest, state: &Value, version: u64, now: i64) -> Value {
        let mut metadata = serde_json::Map::new();
        for (section, patch) in [("desired", &request.desired), ("reported", &request.reported)] {
            match patch {
                Patch::Merge(fields) => {
                    metadata.insert(section.into(), Value::Object(request_metadata(fields, now)));
                }
                Patch::Remove => {
                    metadata.insert(section.into(), json!({ "timestamp": now }));
                }
                Patch::Absent => {}
            }
        }
        let mut reply = json!({ "state": state, "metadata": metadata, "version": version, "timestamp": now });
        if let Some(token) = &request.client_token {
            reply["clientToken"] = json!(token);
        }
        reply
    }

    #[test]
    fn the_accepted_reply_echoes_the_request_with_stamped_metadata() {
        let limits = Limits::default();
        for body in [
            json!({"state": {"desired": {"a": 1, "b": {"c": null, "d": [1, 2]}, "e": {}}}, "clientToken": "t\"1"}),
            json!({"state": {"reported": {"x": "y"}, "desired": null}}),
            json!({"state": {"reported": null}, "version": 3}),
        ] {
            let request = request::parse_update(body.to_string().as_bytes(), &limits).unwrap();
            let next = Document {
                version: 4,
                ..Document::default()
            };
            assert_eq!(
                accepted_reply(&request, &next, 1_795_000_000),
                serde_json::to_vec(&accepted_value(&request, &body["state"], 4, 1_795_000_000)).unwrap(),
                "{body}"
            );
        }
    }
}
