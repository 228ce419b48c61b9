//! The embedded MQTT broker: our front door in front of rumqttd's router.
//!
//! rumqttd 0.20's own listener lacks what a device platform needs (topic ACL, certificate identity, presence,
//! a handshake timeout, a correct will on takeover; see `shared/RUMQTTD.md`), and its connection types are
//! private. So this module owns everything up to the router:
//!
//! - [`serve_tls`] accepts TCP, runs the TLS handshake (client certificate required, chained to the platform
//!   CA) in its own task under a timeout, so a silent socket never delays anyone else;
//! - `session` reads the CONNECT itself (MQTT 3.1.1 and 5 on one port), checks the client id against the
//!   certificate and the certificate against the registry (revocation), serialises takeovers, enforces the
//!   per-device topic ACL on every PUBLISH and SUBSCRIBE, keeps its own keep-alive deadline, publishes wills,
//!   and reports presence;
//! - the router (one `rumqttd::Router`, reached through a local link per session) does routing, QoS 0/1/2,
//!   retained messages and persistent sessions.

mod acl;
mod codec;
pub mod kx;
mod memory;
pub mod metrics;
#[cfg(test)]
mod router_logs;
#[cfg(test)]
mod router_subscriptions;
mod session;
mod sessions;
mod shadow;
#[cfg(test)]
mod test_pki;
pub mod tls;
mod verifier;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::Packet;
use rumqttd::{Notification, Router, RouterConfig};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

use crate::events::{DisconnectReason, EventBus, PlatformEvent};
use crate::ota::Ota;
use crate::pki::known::KnownCertificates;
use crate::presence::Presence;
use crate::registry::Registry;
use crate::shadow::{Outgoing, Shadows};
pub use metrics::Metrics;
use sessions::Sessions;

/// Broker limits and timeouts.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// Most device sessions at once; more are refused at CONNECT.
    pub max_connections: usize,
    /// Largest MQTT packet accepted, in bytes.
    pub max_packet_bytes: usize,
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// How long after the handshake the CONNECT may take.
    pub connect_timeout: Duration,
    /// Longest a persistent session is kept after its client leaves (MQTT 3.1.1 `clean_session` 0: always this
    /// long; MQTT 5: what the client asks, up to this).
    pub session_expiry: Duration,
    /// Longest a write to a device may wait for the device to take it (a client that stops reading); past it the
    /// session ends as a network error.
    pub write_timeout: Duration,
}

impl Default for MqttSettings {
    fn default() -> Self {
        Self {
            max_connections: 50_000,
            max_packet_bytes: 256 * 1024,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            // AWS IoT Core's default.
            session_expiry: Duration::from_secs(3600),
            write_timeout: Duration::from_secs(60),
        }
    }
}

/// The way to the other instances of a cluster: device messages for devices not connected here go out on `to`;
/// `from` brings messages for devices (other instances', and this one's own come back) to route here.
#[derive(Debug)]
pub struct ClusterLink {
    /// Messages for the cluster.
    pub to: mpsc::UnboundedSender<Outgoing>,
    /// Messages from the cluster.
    pub from: mpsc::UnboundedReceiver<Outgoing>,
}

/// The client id of the platform's own link into the router. An `@` is never in a device id, so no device's
/// session can take this one over (the router ends a session when another attaches with its client id).
const PLATFORM_CLIENT_ID: &str = "antumbra@platform";

/// What attaching a session to the router gives: the link and the router's CONNACK.
type Attached = Result<(LinkTx, LinkRx, Notification), String>;

/// Attaches a session to the router: client id, clean start (a saved session is not resumed), how long the
/// session is kept after the client leaves, the client's MQTT 5 Receive Maximum → the link and the router's
/// CONNACK. Async, so a CONNECT does not hop through the blocking pool.
type Attach = Arc<
    dyn Fn(
            String,
            bool,
            Duration,
            Option<u16>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Attached> + Send>>
        + Send
        + Sync,
>;

/// Everything the sessions share.
pub struct FrontDoor {
    settings: MqttSettings,
    attach: Attach,
    platform: mpsc::UnboundedSender<Packet>,
    sessions: Sessions,
    presence: Arc<Presence>,
    registry: Registry,
    metrics: Arc<Metrics>,
    shadows: Shadows,
    ota: Ota,
    /// Certificates the platform issued and holds on record (see [`KnownCertificates`]).
    known: Arc<KnownCertificates>,
}

impl std::fmt::Debug for FrontDoor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontDoor")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Errors starting the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The router's platform link could not be attached.
    #[error("router: {0}")]
    Router(String),
}

impl FrontDoor {
    /// Starts the router (its own thread) and the platform link, which publishes wills and everything the shadow
    /// service queues on its outbox, and listens for revocations. With a `cluster`, outbox messages for devices
    /// that have no session here go to the cluster instead, and what the cluster sends is routed here.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        settings: MqttSettings,
        registry: Registry,
        presence: Arc<Presence>,
        events: EventBus,
        metrics: Arc<Metrics>,
        shadows: Shadows,
        ota: Ota,
        outbox: mpsc::UnboundedReceiver<Outgoing>,
        cluster: Option<ClusterLink>,
        known: Arc<KnownCertificates>,
    ) -> Result<Arc<Self>, BrokerError> {
        let router_tx = Router::new(0, router_config(&settings)).spawn();
        // The router's channel type names a private rumqttd type, so it lives only inside this closure.
        let attach: Attach = Arc::new(
            move |client_id: String, clean: bool, expiry: Duration, receive_max| {
                let router_tx = router_tx.clone();
                Box::pin(async move {
                    LinkBuilder::new(&client_id, router_tx)
                        .clean_session(clean)
                        .session_expiry(Some(expiry))
                        .receive_maximum(receive_max)
                        .build_async()
                        .await
                        .map_err(|e: LinkError| e.to_string())
                })
            },
        );
        let (tx, rx, _) = attach(PLATFORM_CLIENT_ID.into(), true, Duration::ZERO, None)
            .await
            .map_err(BrokerError::Router)?;
        let (platform, queue) = mpsc::unbounded_channel();
        let door = Arc::new(Self {
            settings,
            attach,
            platform,
            sessions: Sessions::default(),
            presence,
            registry,
            metrics,
            shadows,
            ota,
            known,
        });
        tokio::spawn(platform_link(
            PlatformLink {
                tx,
                rx,
                queue,
                outbox,
                cluster,
            },
            Arc::downgrade(&door),
        ));
        tokio::spawn(drop_revoked(door.clone(), events.subscribe_fleet()));
        tokio::spawn(memory::trim_after_departures(Arc::downgrade(&door)));
        Ok(door)
    }

    /// Ends every session (`server_shutdown`) and waits, bounded, until they are gone.
    pub async fn shutdown(&self) {
        let asked = self.sessions.kick_all(DisconnectReason::ServerShutdown);
        tracing::info!(sessions = asked, "closing MQTT sessions");
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while !self.sessions.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    /// Whether the device a topic belongs to has a session on this instance.
    fn holds_device_of(&self, topic: &str) -> bool {
        antumbra_wire::topics::device_of(topic).is_some_and(|device| self.sessions.holds(device))
    }

    /// The broker's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// A router sized for a fleet, not the sample config: every device filter gets a small log (one segment of
/// 1 MiB, at most two), and connections are capped a little above the session limit (platform links count).
fn router_config(settings: &MqttSettings) -> RouterConfig {
    RouterConfig {
        max_connections: settings.max_connections + 16,
        max_outgoing_packet_count: 200,
        max_segment_size: 1024 * 1024,
        max_segment_count: 2,
        custom_segment: Some(HashMap::new()),
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

/// The platform's own link to the router and what feeds it.
struct PlatformLink {
    tx: LinkTx,
    rx: LinkRx,
    /// Wills.
    queue: mpsc::UnboundedReceiver<Packet>,
    /// Shadow and OTA messages made on this instance.
    outbox: mpsc::UnboundedReceiver<Outgoing>,
    cluster: Option<ClusterLink>,
}

/// Feeds platform publishes (wills, shadow replies and deltas) to the router and drains the link's replies.
/// Publishes go in at QoS 0; the router delivers each at the QoS its subscriber asked for.
///
/// In a cluster, a message for a device connected here goes straight to the router; any other goes through
/// the cluster (Redis) to whichever instance holds the device, this one included should the device arrive in
/// the meantime. A device that moves to another instance at the very moment a message for it is made here
/// may miss that one message; what it carries is in the shadow store and is replayed when the device
/// subscribes to its delta topic on its new instance.
async fn platform_link(link: PlatformLink, door: std::sync::Weak<FrontDoor>) {
    let PlatformLink {
        mut tx,
        mut rx,
        mut queue,
        mut outbox,
        cluster,
    } = link;
    let (to_cluster, mut from_cluster) = match cluster {
        Some(ClusterLink { to, from }) => (Some(to), Some(from)),
        None => (None, None),
    };
    let (mut batch, mut remote) = (Vec::with_capacity(OUTBOX_BATCH), Vec::new());
    loop {
        tokio::select! {
            packet = queue.recv() => match packet {
                Some(packet) => if tx.send(packet).await.is_err() { break },
                None => break,
            },
            // Everything queued goes at once: one router wake-up for the lot (a shadow update alone queues
            // accepted, documents and often delta).
            n = outbox.recv_many(&mut batch, OUTBOX_BATCH) => {
                if n == 0 { break }
                let door = door.upgrade();
                let packets = batch
                    .drain(..)
                    .filter_map(|message| match (&to_cluster, &door) {
                        (Some(to_cluster), Some(door)) if !door.holds_device_of(&message.topic) => {
                            to_cluster.send(message).err().map(|lost| outgoing_packet(lost.0))
                        }
                        _ => Some(outgoing_packet(message)),
                    })
                    .collect();
                if !forward(&mut tx, packets) { break }
            },
            n = recv_many_or_pending(&mut from_cluster, &mut remote) => {
                if n == 0 { break }
                if !forward(&mut tx, remote.drain(..).map(outgoing_packet).collect()) { break }
            },
            note = rx.next() => match note {
                Ok(Some(Notification::Unschedule)) => if rx.wake().await.is_err() { break },
                Ok(_) => {}
                Err(_) => break,
            },
        }
    }
    tracing::warn!("platform MQTT link ended");
}

/// `recv_many` on a channel that may not exist (no cluster): then it never completes.
async fn recv_many_or_pending(
    channel: &mut Option<mpsc::UnboundedReceiver<Outgoing>>,
    batch: &mut Vec<Outgoing>,
) -> usize {
    match channel {
        Some(channel) => channel.recv_many(batch, OUTBOX_BATCH).await,
        None => std::future::pending().await,
    }
}

/// Most outbox messages handed to the router at once.
const OUTBOX_BATCH: usize = 256;

/// A platform message as the router takes it.
fn outgoing_packet(message: Outgoing) -> Packet {
    let publish = rumqttd::protocol::Publish::new(
        bytes::Bytes::from(message.topic),
        bytes::Bytes::from(message.payload),
        false,
    );
    // QoS 1, as AWS IoT sends shadow messages; delivered at the lower of that and the subscription's QoS.
    Packet::Publish(publish.from_platform(rumqttd::protocol::QoS::AtLeastOnce), None)
}

/// Hands packets to the router: all but the last through the link's buffer, the last with one notification.
/// `false` when the router is gone.
fn forward(tx: &mut LinkTx, mut packets: Vec<Packet>) -> bool {
    let Some(last) = packets.pop() else { return true };
    tx.buffer().extend(packets);
    tx.push(last).is_ok()
}

/// Drops live sessions whose certificate was revoked or whose device was deleted.
async fn drop_revoked(door: Arc<FrontDoor>, mut events: crate::events::FleetEvents) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match events.recv().await {
            Ok(PlatformEvent::CertificateRevoked {
                device_id, serial, ..
            }) => {
                if let Ok(device) = antumbra_wire::DeviceId::parse(device_id) {
                    // Revoked here, it is gone from the table already; revoked on another instance, now.
                    door.known.forget(&device, Some(&serial));
                    door.sessions
                        .kick(&device, Some(&serial), DisconnectReason::Revoked);
                }
            }
            Ok(PlatformEvent::SessionMoved { device_id, session }) => {
                if let Ok(device) = antumbra_wire::DeviceId::parse(device_id) {
                    // Only a session older than the one elsewhere is stale; the device may have come back here
                    // since, or be connecting here right now.
                    door.sessions.kick_older(&device, session);
                }
            }
            Ok(PlatformEvent::DeviceDeleted { device_id, .. }) => {
                if let Ok(device) = antumbra_wire::DeviceId::parse(device_id) {
                    door.known.forget(&device, None);
                    door.sessions.kick(&device, None, DisconnectReason::Revoked);
                    door.presence.forget(&device);
                    // The deleting instance purged the store before it answered.
                    door.shadows.forget(&device);
                }
            }
            Ok(_) => {}
            Err(RecvError::Lagged(n)) => tracing::warn!(missed = n, "revocation listener lagged"),
            Err(RecvError::Closed) => break,
        }
    }
}

/// Accepts mutual-TLS connections until `shutdown` resolves. Each handshake runs in its own task under the
/// handshake timeout: nothing is awaited in the accept loop.
pub async fn serve_tls(
    door: Arc<FrontDoor>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (door, acceptor) = (door.clone(), acceptor.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(door.settings.handshake_timeout, acceptor.accept(tcp)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    door.metrics.auth_failed(metrics::AuthFailure::Handshake);
                    tracing::info!(%remote, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    door.metrics.auth_failed(metrics::AuthFailure::HandshakeTimeout);
                    tracing::info!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            match tls::identify(&door.known, tls.get_ref().1.peer_certificates()) {
                // A task of its own: a task keeps the allocation of its largest state for life, and the
                // handshake's state is not worth keeping next to every idle device.
                Ok(peer) => {
                    let identity = session::Identity::Certificate(peer);
                    drop(tokio::spawn(session::serve(door, tls, identity, remote)));
                }
                Err(e) => {
                    door.metrics.auth_failed(metrics::AuthFailure::Handshake);
                    tracing::info!(%remote, error = %e, "client certificate names no device");
                }
            }
        });
    }
    tracing::info!("MQTT TLS listener stopped");
}

/// Accepts plain-TCP connections (development only; the caller binds it to loopback) until `shutdown`.
pub async fn serve_plain(
    door: Arc<FrontDoor>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(session::serve(
            door.clone(),
            tcp,
            session::Identity::Development,
            remote,
        ));
    }
    tracing::info!("MQTT plain listener stopped");
}
