//! The platform's in-process event bus: presence changes, revocations, deletions, shadow changes.
//!
//! `tokio::sync::broadcast` channels: publishers never block, and a subscriber that falls behind loses the
//! oldest events and learns how many (the SSE stream tells its client). Two of them: what happened on this
//! instance, and what this instance heard from the other instances of its cluster (`crate::cluster`). The cluster
//! bridge forwards only the first, so nothing heard is sent back; the MQTT front door (revocations, deletions)
//! and `/v1/events` read both ([`EventBus::subscribe_fleet`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::{broadcast, Notify};
use utoipa::ToSchema;

/// Why a device's MQTT session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DisconnectReason {
    /// The client sent DISCONNECT.
    ClientDisconnect,
    /// Nothing arrived within 1.5 × the keep-alive interval.
    KeepAliveTimeout,
    /// The connection broke (reset, EOF without DISCONNECT, TLS or protocol error).
    NetworkError,
    /// The same device connected again; the new session replaced this one.
    Takeover,
    /// Its certificate was revoked, or the device deleted.
    Revoked,
    /// It published or subscribed outside its own topics.
    AclViolation,
    /// The server shut down.
    ServerShutdown,
}

impl DisconnectReason {
    /// The wire name (also the metrics label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientDisconnect => "client_disconnect",
            Self::KeepAliveTimeout => "keep_alive_timeout",
            Self::NetworkError => "network_error",
            Self::Takeover => "takeover",
            Self::Revoked => "revoked",
            Self::AclViolation => "acl_violation",
            Self::ServerShutdown => "server_shutdown",
        }
    }

    /// Every reason, for metrics.
    pub const ALL: [Self; 7] = [
        Self::ClientDisconnect,
        Self::KeepAliveTimeout,
        Self::NetworkError,
        Self::Takeover,
        Self::Revoked,
        Self::AclViolation,
        Self::ServerShutdown,
    ];

    /// Parses [`DisconnectReason::as_str`] back.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Something that happened on the platform.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type")]
pub enum PlatformEvent {
    /// A device's MQTT session started.
    #[serde(rename = "device.connected")]
    Connected {
        /// The device.
        device_id: String,
        /// Its new session number (only ever increases).
        session: u64,
        /// Remote address of the connection.
        remote_addr: String,
        /// When.
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// A device's MQTT session ended. `online` stays true on a takeover: a newer session holds the device.
    #[serde(rename = "device.disconnected")]
    Disconnected {
        /// The device.
        device_id: String,
        /// The session that ended.
        session: u64,
        /// Why.
        reason: DisconnectReason,
        /// Whether the device is still online (through a newer session).
        online: bool,
        /// When.
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// A certificate was revoked; connections using it are dropped.
    #[serde(rename = "certificate.revoked")]
    CertificateRevoked {
        /// The device.
        device_id: String,
        /// The certificate's serial.
        serial: String,
        /// When.
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// A shadow document changed.
    #[serde(rename = "shadow.updated")]
    ShadowUpdated {
        /// The device.
        device_id: String,
        /// The named shadow, absent for the classic shadow.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// The new version.
        version: u64,
        /// When.
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
        /// The firmware version the device reported in this update (`reported.firmware.version`), if it reported
        /// its `firmware`; for this instance's OTA rollback check, not sent anywhere.
        #[serde(skip)]
        reported_firmware: Option<String>,
    },
    /// A shadow document was deleted.
    #[serde(rename = "shadow.deleted")]
    ShadowDeleted {
        /// The device.
        device_id: String,
        /// The named shadow, absent for the classic shadow.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// The version deleted.
        version: u64,
        /// When.
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// In a cluster: another instance started session `session` of the device; a local session of it is stale.
    #[serde(rename = "device.session_moved")]
    SessionMoved {
        /// The device.
        device_id: String,
        /// The newer session.
        session: u64,
    },
    /// A device was deleted; its connections are dropped.
    #[serde(rename = "device.deleted")]
    DeviceDeleted {
        /// The device.
        device_id: String,
        /// When.
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
}

impl PlatformEvent {
    /// The device the event is about.
    pub fn device_id(&self) -> &str {
        match self {
            Self::Connected { device_id, .. }
            | Self::Disconnected { device_id, .. }
            | Self::CertificateRevoked { device_id, .. }
            | Self::DeviceDeleted { device_id, .. }
            | Self::ShadowUpdated { device_id, .. }
            | Self::SessionMoved { device_id, .. }
            | Self::ShadowDeleted { device_id, .. } => device_id,
        }
    }
}

/// The bus. Cloning shares it.
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<PlatformEvent>,
    /// Events of other instances, heard through the cluster.
    heard: broadcast::Sender<PlatformEvent>,
    /// Events this instance announced before and the rest of the cluster missed, for the cluster bridge only
    /// (see [`EventBus::republish`]). Unbounded: a re-announcement is one event per open session, at once.
    republished: tokio::sync::mpsc::UnboundedSender<PlatformEvent>,
    /// Its receiving end, until the cluster bridge takes it.
    republished_rx: Arc<std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<PlatformEvent>>>>,
    /// Applications watching the events (`/v1/events` streams open on this instance).
    watchers: Arc<AtomicUsize>,
    /// Told when the first application starts watching.
    first_watcher: Arc<Notify>,
    /// In a cluster: until when an application watches on another instance, in nanoseconds after `since`
    /// (0: none has said so). An atomic, as every shadow update reads it.
    watched_elsewhere_until: Arc<AtomicU64>,
    /// When the bus was made: the origin of `watched_elsewhere_until`.
    since: tokio::time::Instant,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    /// A bus that keeps up to 65,536 events for slow subscribers (a burst of 10,000 connects must not make the
    /// revocation listener miss a revocation).
    pub fn new() -> Self {
        let (republished, republished_rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            tx: broadcast::channel(65_536).0,
            heard: broadcast::channel(65_536).0,
            republished,
            republished_rx: Arc::new(std::sync::Mutex::new(Some(republished_rx))),
            watchers: Arc::new(AtomicUsize::new(0)),
            first_watcher: Arc::new(Notify::new()),
            watched_elsewhere_until: Arc::new(AtomicU64::new(0)),
            since: tokio::time::Instant::now(),
        }
    }

    /// Publishes something that happened on this instance; having no subscriber is fine.
    pub fn publish(&self, event: PlatformEvent) {
        let _ = self.tx.send(event);
    }

    /// Publishes an event another instance of the cluster published.
    pub fn publish_heard(&self, event: PlatformEvent) {
        let _ = self.heard.send(event);
    }

    /// Announces again, to the other instances of the cluster only, something this instance published before
    /// and they missed (see `crate::liveness`); this instance's own streams saw it the first time.
    pub fn republish(&self, event: PlatformEvent) {
        let _ = self.republished.send(event);
    }

    /// The [`EventBus::republish`]ed events, for the one cluster bridge (`None` once taken).
    pub fn take_republished(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<PlatformEvent>> {
        self.republished_rx.lock().expect("republished receiver").take()
    }

    /// A new subscription to this instance's events, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<PlatformEvent> {
        self.tx.subscribe()
    }

    /// A new subscription to the events of the whole cluster (this instance's and those heard), from now on.
    pub fn subscribe_fleet(&self) -> FleetEvents {
        FleetEvents {
            local: self.tx.subscribe(),
            heard: self.heard.subscribe(),
            watching: None,
        }
    }

    /// [`EventBus::subscribe_fleet`] for an application (an event stream): while it lives, the other instances
    /// of the cluster are asked to send their shadow changes too, which they otherwise keep to themselves.
    pub fn watch(&self) -> FleetEvents {
        let mut events = self.subscribe_fleet();
        if self.watchers.fetch_add(1, Ordering::SeqCst) == 0 {
            self.first_watcher.notify_one();
        }
        events.watching = Some(self.watchers.clone());
        events
    }

    /// Whether an application watches the events here.
    pub fn watched(&self) -> bool {
        self.watchers.load(Ordering::SeqCst) > 0
    }

    /// In a cluster: another instance said an application watches there; it is taken to watch until `until`.
    pub fn watched_elsewhere_until(&self, until: tokio::time::Instant) {
        let nanos = until.saturating_duration_since(self.since).as_nanos();
        self.watched_elsewhere_until
            .store(u64::try_from(nanos).unwrap_or(u64::MAX).max(1), Ordering::Relaxed);
    }

    /// Whether an application on another instance of the cluster watches (see
    /// [`EventBus::watched_elsewhere_until`]).
    pub fn watched_elsewhere(&self) -> bool {
        let until = self.watched_elsewhere_until.load(Ordering::Relaxed);
        until != 0 && self.since.elapsed().as_nanos() < u128::from(until)
    }

    /// Whether shadow changes have a reader beyond this instance's own services: an application watching here
    /// or, in a cluster, elsewhere. The shadow service makes its `shadow.updated` events only then (and for the
    /// OTA rollback check); `shadow.deleted`, rare, is always made.
    pub fn shadow_changes_watched(&self) -> bool {
        self.watched() || self.watched_elsewhere()
    }

    /// Resolves when the first application starts watching (at once if one started since the last call).
    pub async fn first_watcher(&self) {
        self.first_watcher.notified().await
    }
}

/// A subscription to this instance's events and those heard from the rest of the cluster.
#[derive(Debug)]
pub struct FleetEvents {
    local: broadcast::Receiver<PlatformEvent>,
    heard: broadcast::Receiver<PlatformEvent>,
    /// The watcher count this subscription is in, if it is an application's.
    watching: Option<Arc<AtomicUsize>>,
}

impl Drop for FleetEvents {
    fn drop(&mut self) {
        if let Some(watchers) = &self.watching {
            watchers.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl FleetEvents {
    /// The next event from either source; `Lagged` when this subscription fell behind on one of them.
    pub async fn recv(&mut self) -> Result<PlatformEvent, broadcast::error::RecvError> {
        tokio::select! {
            event = self.local.recv() => event,
            event = self.heard.recv() => event,
        }
    }
}
