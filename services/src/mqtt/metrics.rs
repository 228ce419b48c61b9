//! Broker counters, rendered as Prometheus text at `/metrics`. Plain atomics: the hot path pays one relaxed
//! add per message.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use crate::events::DisconnectReason;

/// Why a connection was refused before it became a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// TLS handshake failed (untrusted or expired certificate, not TLS at all, ...).
    Handshake,
    /// The handshake did not finish in time.
    HandshakeTimeout,
    /// The certificate is revoked or unknown to the registry.
    Revoked,
    /// The MQTT client id is not the certificate's device id.
    ClientIdMismatch,
    /// The first packet was not a valid CONNECT in time.
    BadConnect,
    /// The connection limit is reached.
    ConnectionLimit,
    /// The registry could not be asked (database away): refused as "server unavailable".
    RegistryUnavailable,
}

impl AuthFailure {
    const ALL: [Self; 7] = [
        Self::Handshake,
        Self::HandshakeTimeout,
        Self::Revoked,
        Self::ClientIdMismatch,
        Self::BadConnect,
        Self::ConnectionLimit,
        Self::RegistryUnavailable,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Handshake => "tls_handshake",
            Self::HandshakeTimeout => "tls_handshake_timeout",
            Self::Revoked => "certificate_revoked",
            Self::ClientIdMismatch => "client_id_mismatch",
            Self::BadConnect => "bad_connect",
            Self::ConnectionLimit => "connection_limit",
            Self::RegistryUnavailable => "registry_unavailable",
        }
    }
}

/// All broker counters.
#[derive(Debug, Default)]
pub struct Metrics {
    connections: AtomicI64,
    connects: AtomicU64,
    disconnects: [AtomicU64; DisconnectReason::ALL.len()],
    auth_failures: [AtomicU64; AuthFailure::ALL.len()],
    acl_violations: AtomicU64,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl Metrics {
    /// A session started.
    pub fn connected(&self) {
        self.connects.fetch_add(1, Relaxed);
        self.connections.fetch_add(1, Relaxed);
    }

    /// A session ended.
    pub fn disconnected(&self, reason: DisconnectReason) {
        self.connections.fetch_sub(1, Relaxed);
        let i = DisconnectReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.disconnects[i].fetch_add(1, Relaxed);
        if reason == DisconnectReason::AclViolation {
            self.acl_violations.fetch_add(1, Relaxed);
        }
    }

    /// A connection was refused.
    pub fn auth_failed(&self, why: AuthFailure) {
        let i = AuthFailure::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.auth_failures[i].fetch_add(1, Relaxed);
    }

    /// Packets and bytes read from devices.
    pub fn received(&self, packets: u64, bytes: u64) {
        self.messages_in.fetch_add(packets, Relaxed);
        self.bytes_in.fetch_add(bytes, Relaxed);
    }

    /// Packets and bytes written to devices.
    pub fn sent(&self, packets: u64, bytes: u64) {
        self.messages_out.fetch_add(packets, Relaxed);
        self.bytes_out.fetch_add(bytes, Relaxed);
    }

    /// Live sessions now.
    pub fn connections(&self) -> i64 {
        self.connections.load(Relaxed)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        gauge(
            "antumbra_mqtt_connections",
            "MQTT sessions open now.",
            "gauge",
            self.connections().to_string(),
        );
        gauge(
            "antumbra_mqtt_connects_total",
            "MQTT sessions started.",
            "counter",
            self.connects.load(Relaxed).to_string(),
        );
        gauge(
            "antumbra_mqtt_acl_violations_total",
            "Sessions ended for publishing or subscribing outside their topics.",
            "counter",
            self.acl_violations.load(Relaxed).to_string(),
        );
        gauge(
            "antumbra_mqtt_messages_in_total",
            "MQTT packets received from devices.",
            "counter",
            self.messages_in.load(Relaxed).to_string(),
        );
        gauge(
            "antumbra_mqtt_messages_out_total",
            "MQTT packets sent to devices.",
            "counter",
            self.messages_out.load(Relaxed).to_string(),
        );
        gauge(
            "antumbra_mqtt_bytes_in_total",
            "Bytes of MQTT received from devices.",
            "counter",
            self.bytes_in.load(Relaxed).to_string(),
        );
        gauge(
            "antumbra_mqtt_bytes_out_total",
            "Bytes of MQTT sent to devices.",
            "counter",
            self.bytes_out.load(Relaxed).to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP antumbra_mqtt_disconnects_total MQTT sessions ended, by reason."
        );
        let _ = writeln!(out, "# TYPE antumbra_mqtt_disconnects_total counter");
        for (reason, n) in DisconnectReason::ALL.iter().zip(&self.disconnects) {
            let _ = writeln!(
                out,
                "antumbra_mqtt_disconnects_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                n.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP antumbra_mqtt_auth_failures_total Connections refused before a session, by reason."
        );
        let _ = writeln!(out, "# TYPE antumbra_mqtt_auth_failures_total counter");
        for (why, n) in AuthFailure::ALL.iter().zip(&self.auth_failures) {
            let _ = writeln!(
                out,
                "antumbra_mqtt_auth_failures_total{{reason=\"{}\"}} {}",
                why.as_str(),
                n.load(Relaxed)
            );
        }
        out
    }
}
