//! The platform's in-process event bus: presence changes, revocations, deletions (and, later, shadow changes).
//!
//! A `tokio::sync::broadcast` channel: publishers never block, and a subscriber that falls behind loses the
//! oldest events and learns how many (the SSE stream tells its client). The MQTT front door listens for
//! revocations here to drop live connections; `/v1/events` streams everything to applications.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::broadcast;
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
        Self {
            tx: broadcast::channel(65_536).0,
        }
    }

    /// Publishes; having no subscriber is fine.
    pub fn publish(&self, event: PlatformEvent) {
        let _ = self.tx.send(event);
    }

    /// A new subscription, seeing events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<PlatformEvent> {
        self.tx.subscribe()
    }
}
