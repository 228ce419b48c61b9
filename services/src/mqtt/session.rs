//! One device connection, from its first byte to its last: CONNECT checks, takeover, the read/write loop
//! between the socket and the router, and the end (router teardown, will, presence).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use antumbra_wire::DeviceId;
use bytes::BytesMut;
use futures_util::FutureExt;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectProperties, DisconnectReasonCode,
    LastWill, LastWillProperties, Packet, Publish,
};
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout, Instant};

use super::codec::{sniff, Codec, Sniff, Version};
use super::metrics::AuthFailure;
use super::{acl, sessions, shadow, FrontDoor};
use crate::events::DisconnectReason;
use crate::registry::{CertificateStatus, RegistryError};

/// Who the transport says the client is.
pub(super) enum Identity {
    /// Proven by a client certificate.
    Certificate(super::tls::PeerIdentity),
    /// The development listener: the client id is taken at its word (loopback only).
    Development,
}

/// How a session ended, as seen by the loop.
enum End {
    /// A DISCONNECT; MQTT 5 may set the session's expiry anew in it.
    Client {
        with_will: bool,
        expiry: Option<u32>,
    },
    KeepAlive,
    Network,
    RouterClosed,
    Kicked(DisconnectReason),
    Acl,
}

impl End {
    fn reason(&self) -> DisconnectReason {
        match self {
            End::Client { .. } => DisconnectReason::ClientDisconnect,
            End::KeepAlive => DisconnectReason::KeepAliveTimeout,
            End::Network | End::RouterClosed => DisconnectReason::NetworkError,
            End::Kicked(reason) => *reason,
            End::Acl => DisconnectReason::AclViolation,
        }
    }

    /// Whether the will is published: on every end but a clean DISCONNECT and a server shutdown.
    fn fires_will(&self) -> bool {
        match self {
            End::Client { with_will, .. } => *with_will,
            End::Kicked(DisconnectReason::ServerShutdown) => false,
            _ => true,
        }
    }
}

/// Serves one connection until it ends.
///
/// The task of an idle device holds this future for hours, and a future is as large as its largest state, so
/// the opening (CONNECT, checks, takeover, attach) and the closing run boxed: only the loop's state stays.
pub(super) async fn serve<S>(door: Arc<FrontDoor>, mut io: S, identity: Identity, remote: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::new();
    let Some(mut open) = Box::pin(open(&door, &mut io, &mut buf, identity, remote)).await else {
        return;
    };
    let end = run(
        &door,
        &open.device,
        &mut open.codec,
        &mut io,
        &mut buf,
        &mut open.link,
        &mut open.claim.kicked,
        open.keep_alive,
        &open.seen,
    )
    .await;
    Box::pin(close(&door, &mut io, open, end)).await;
}

/// A session between its CONNACK and its end.
struct Open<'a> {
    device: DeviceId,
    codec: Codec,
    link: Link,
    claim: sessions::Claim<'a>,
    keep_alive: Duration,
    /// How long the router keeps the session after it ends, as agreed at CONNECT.
    expiry: Duration,
    session: u64,
    seen: crate::presence::SeenClock,
    will: Option<Box<(LastWill, Option<LastWillProperties>)>>,
}

/// From the first byte to the CONNACK: `None` when the connection was refused or went away.
async fn open<'a, S>(
    door: &'a Arc<FrontDoor>,
    io: &mut S,
    buf: &mut BytesMut,
    identity: Identity,
    remote: SocketAddr,
) -> Option<Open<'a>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let connect = timeout(door.settings.connect_timeout, read_connect(door, io, buf)).await;
    let Ok(Some((codec, packet))) = connect else {
        door.metrics.auth_failed(AuthFailure::BadConnect);
        tracing::debug!(%remote, "no valid CONNECT in time");
        return None;
    };
    let Packet::Connect(connect, connect_props, will, will_props, _) = packet else {
        door.metrics.auth_failed(AuthFailure::BadConnect);
        return None;
    };
    let receive_maximum = connect_props.as_ref().and_then(|p| p.receive_maximum);
    if receive_maximum == Some(0) {
        // MQTT 5 §3.1.2.11.3: a Receive Maximum of 0 is a protocol error.
        door.metrics.auth_failed(AuthFailure::BadConnect);
        tracing::info!(%remote, client_id = %connect.client_id, "MQTT connection refused: Receive Maximum 0");
        refuse(&codec, io, ConnectReturnCode::ProtocolError).await;
        return None;
    }

    let (device, serial) = match admit(door, &identity, &connect.client_id, will.as_ref()).await {
        Ok(admitted) => admitted,
        Err((failure, v4, v5, why)) => {
            door.metrics.auth_failed(failure);
            tracing::info!(%remote, client_id = %connect.client_id, reason = why, "MQTT connection refused");
            refuse(&codec, io, if codec.version() == Version::V4 { v4 } else { v5 }).await;
            return None;
        }
    };

    let mut claim = door.sessions.claim(&device, serial);
    if let Some(reason) = claim.take_over().await {
        tracing::info!(device_id = %device, reason = reason.as_str(), "connection superseded before it attached");
        return None;
    }
    if door.sessions.attached() >= door.settings.max_connections {
        door.metrics.auth_failed(AuthFailure::ConnectionLimit);
        tracing::warn!(device_id = %device, limit = door.settings.max_connections, "connection limit reached");
        let code = if codec.version() == Version::V4 {
            ConnectReturnCode::ServiceUnavailable
        } else {
            ConnectReturnCode::ServerBusy
        };
        refuse(&codec, io, code).await;
        return None;
    }
    let asked = connect_props.and_then(|p| p.session_expiry_interval);
    let (expiry, granted) = session_expiry(
        door.settings.session_expiry,
        codec.version(),
        connect.clean_session,
        asked,
    );
    let attached = (door.attach)(device.to_string(), connect.clean_session, expiry, receive_maximum).await;
    let Ok((tx, rx, ack)) = attached else {
        tracing::error!(device_id = %device, "the router refused the session");
        let code = if codec.version() == Version::V4 {
            ConnectReturnCode::ServiceUnavailable
        } else {
            ConnectReturnCode::ServerUnavailable
        };
        refuse(&codec, io, code).await;
        return None;
    };
    claim.mark_attached();
    let session_present = match ack {
        Notification::DeviceAck(ack) => match Packet::from(ack) {
            Packet::ConnAck(ack, _) => ack.session_present,
            _ => false,
        },
        _ => false,
    };
    let connack = Packet::ConnAck(
        ConnAck {
            session_present,
            code: ConnectReturnCode::Success,
        },
        (codec.version() == Version::V5).then(|| ConnAckProperties {
            session_expiry_interval: granted,
            max_packet_size: Some(door.settings.max_packet_bytes as u32),
            // QoS 2 publishes the device may have waiting for their PUBRELs (QoS 1 ones are acknowledged as read).
            receive_max: Some(rumqttd::RECEIVE_MAXIMUM),
            retain_available: Some(1),
            wildcard_subscription_available: Some(1),
            shared_subscription_available: Some(0),
            subscription_identifiers_available: Some(0),
            ..Default::default()
        }),
    );
    let (session, seen) = door.presence.connected(&device, remote.to_string()).await;
    claim.record_session(session);
    door.metrics.connected();
    tracing::info!(device_id = %device, session, %remote, version = ?codec.version(), "device connected");

    let mut open = Open {
        device,
        codec,
        link: Link {
            tx,
            rx,
            bytes_out: BytesMut::new(),
            subscriptions: shadow::Subscriptions::new(session_present),
        },
        claim,
        keep_alive: Duration::from_secs(u64::from(connect.keep_alive)) * 3 / 2,
        expiry,
        session,
        seen,
        will: will.map(|will| Box::new((will, will_props))),
    };
    if open
        .link
        .write(door, &open.codec, io, vec![connack])
        .await
        .is_err()
    {
        close(door, io, open, End::Network).await;
        return None;
    }
    Some(open)
}

/// The end of a session: the MQTT 5 reason, the router let go, the will, presence.
async fn close<S>(door: &Arc<FrontDoor>, io: &mut S, mut open: Open<'_>, end: End)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (device, session) = (&open.device, open.session);
    let reason = end.reason();
    if open.codec.version() == Version::V5 {
        if let Some(code) = server_reason_code(&end) {
            let packet = Packet::Disconnect(Disconnect { reason_code: code }, None);
            let _ = timeout(
                Duration::from_secs(1),
                open.link.write(door, &open.codec, io, vec![packet]),
            )
            .await;
        }
    }
    let expiry = match end {
        End::Client {
            expiry: Some(asked), ..
        } => disconnect_expiry(door.settings.session_expiry, open.expiry, asked),
        _ => None,
    };
    open.link.detach(expiry).await;
    if end.fires_will() {
        if let Some(will) = open.will.take() {
            let (will, props) = *will;
            publish_will(door, device, open.claim.token(), will, props);
        }
    }
    door.presence.disconnected(device, session, reason);
    door.metrics.disconnected(reason);
    tracing::info!(device_id = %device, session, reason = reason.as_str(), "device disconnected");
    let _ = timeout(Duration::from_secs(1), io.shutdown()).await;
}

/// How long the router keeps a session after its client leaves, and the Session Expiry Interval to tell an
/// MQTT 5 client when it asked for more than `max`. MQTT 3.1.1: `max` for a persistent session, none for a
/// clean one. MQTT 5: what the client asks (absent: 0, the session ends with the connection; `u32::MAX`: for
/// ever), at most `max`.
fn session_expiry(
    max: Duration,
    version: Version,
    clean: bool,
    asked: Option<u32>,
) -> (Duration, Option<u32>) {
    if version != Version::V5 {
        return (if clean { Duration::ZERO } else { max }, None);
    }
    let asked = rumqttd::protocol::session_expiry(asked.unwrap_or(0));
    if asked <= max {
        (asked, None)
    } else {
        // `u32::MAX` would say "for ever": the longest finite interval instead.
        (max, Some(interval_secs(max).min(u32::MAX - 1)))
    }
}

/// The session's expiry an MQTT 5 DISCONNECT asks for (`asked` seconds), as the router is to apply it: capped at
/// `max`; ignored (`None`) when the session was agreed with none, since MQTT 5 makes a non-zero value then a
/// protocol error (§3.14.2.2.2) and the session is not kept either way.
fn disconnect_expiry(max: Duration, agreed: Duration, asked: u32) -> Option<u32> {
    if agreed.is_zero() && asked != 0 {
        return None;
    }
    Some(asked.min(interval_secs(max)))
}

/// `max` as an MQTT 5 Session Expiry Interval, in seconds (at most `u32::MAX`).
fn interval_secs(max: Duration) -> u32 {
    u32::try_from(max.as_secs()).unwrap_or(u32::MAX)
}

/// Reads until a whole CONNECT is buffered; `None` for anything else (a 3.1 client gets its refusal first).
async fn read_connect<S>(door: &FrontDoor, io: &mut S, buf: &mut BytesMut) -> Option<(Codec, Packet)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match sniff(buf) {
            Sniff::Incomplete => {}
            Sniff::Connect(version) => {
                let mut codec = Codec::new(version, door.settings.max_packet_bytes);
                loop {
                    match codec.read_connect(buf) {
                        Ok(Some(packet)) => return Some((codec, packet)),
                        Ok(None) => {}
                        Err(_) => return None,
                    }
                    if buf.len() > door.settings.max_packet_bytes || io.read_buf(buf).await.ok()? == 0 {
                        return None;
                    }
                }
            }
            Sniff::Unsupported(level) => {
                if level != 0 {
                    // CONNACK 0x01, "unacceptable protocol version", in the 3.1/3.1.1 encoding every client reads.
                    let _ = io.write_all(&[0x20, 0x02, 0x00, 0x01]).await;
                    let _ = io.flush().await;
                }
                return None;
            }
        }
        if buf.len() > 1024 || io.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

type Refusal = (AuthFailure, ConnectReturnCode, ConnectReturnCode, &'static str);

/// Checks the CONNECT against the transport's identity, the registry and the ACL.
async fn admit(
    door: &FrontDoor,
    identity: &Identity,
    client_id: &str,
    will: Option<&LastWill>,
) -> Result<(DeviceId, Option<String>), Refusal> {
    use ConnectReturnCode::{
        ClientIdentifierNotValid as BadId, NotAuthorized, ServerUnavailable, ServiceUnavailable,
    };
    let lookup_failed = |_: RegistryError| {
        (
            AuthFailure::RegistryUnavailable,
            ServiceUnavailable,
            ServerUnavailable,
            "registry unavailable",
        )
    };
    let (device, serial) = match identity {
        Identity::Certificate(peer) => {
            if client_id != peer.device.as_str() {
                return Err((
                    AuthFailure::ClientIdMismatch,
                    BadId,
                    BadId,
                    "client id is not the certificate's device id",
                ));
            }
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let on_record = door.known.is_authoritative()
                && peer
                    .on_record
                    .is_some_and(|print| door.known.lookup_fingerprint(&print, now).is_some());
            let status = if on_record {
                Ok(CertificateStatus::Active)
            } else {
                door.registry.certificate_status(&peer.device, &peer.serial).await
            };
            match status {
                Ok(CertificateStatus::Active) => {}
                Ok(_) => {
                    return Err((
                        AuthFailure::Revoked,
                        NotAuthorized,
                        NotAuthorized,
                        "certificate is revoked",
                    ))
                }
                Err(RegistryError::NotFound) => {
                    return Err((
                        AuthFailure::Revoked,
                        NotAuthorized,
                        NotAuthorized,
                        "certificate is not on record",
                    ))
                }
                Err(e) => return Err(lookup_failed(e)),
            }
            (peer.device.clone(), Some(peer.serial.clone()))
        }
        Identity::Development => {
            let Ok(device) = DeviceId::parse(client_id) else {
                return Err((
                    AuthFailure::ClientIdMismatch,
                    BadId,
                    BadId,
                    "client id is not a device id",
                ));
            };
            match door.registry.device_exists(&device).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err((
                        AuthFailure::ClientIdMismatch,
                        NotAuthorized,
                        NotAuthorized,
                        "unknown device",
                    ))
                }
                Err(e) => return Err(lookup_failed(e)),
            }
            (device, None)
        }
    };
    if let Some(will) = will {
        let topic = std::str::from_utf8(&will.topic).unwrap_or("");
        if !acl::may_publish(&device, topic) {
            return Err((
                AuthFailure::BadConnect,
                NotAuthorized,
                NotAuthorized,
                "will topic is outside the device's topics",
            ));
        }
    }
    Ok((device, serial))
}

async fn refuse<S: AsyncWrite + Unpin>(codec: &Codec, io: &mut S, code: ConnectReturnCode) {
    let mut out = BytesMut::new();
    if codec
        .write(
            Packet::ConnAck(
                ConnAck {
                    session_present: false,
                    code,
                },
                None,
            ),
            &mut out,
        )
        .is_ok()
    {
        let _ = timeout(Duration::from_secs(1), async {
            let _ = io.write_all(&out).await;
            let _ = io.flush().await;
            let _ = io.shutdown().await;
        })
        .await;
    }
}

/// The session's router link, its write buffer, and what the device subscribed to through it.
struct Link {
    tx: LinkTx,
    rx: LinkRx,
    bytes_out: BytesMut,
    subscriptions: shadow::Subscriptions,
}

impl Link {
    async fn write<S: AsyncWrite + Unpin>(
        &mut self,
        door: &FrontDoor,
        codec: &Codec,
        io: &mut S,
        packets: Vec<Packet>,
    ) -> std::io::Result<()> {
        let count = packets.len() as u64;
        for packet in packets {
            codec
                .write(packet, &mut self.bytes_out)
                .map_err(std::io::Error::other)?;
        }
        let bytes = self.bytes_out.len() as u64;
        // Bounded: while it waits, the session reads nothing and sees no kick, so a device that stops reading
        // would hold it for ever.
        let written = timeout(door.settings.write_timeout, async {
            io.write_all(&self.bytes_out).await?;
            io.flush().await
        })
        .await;
        match written {
            Ok(result) => result?,
            Err(_) => {
                tracing::info!(
                    timeout_secs = door.settings.write_timeout.as_secs(),
                    "the device stopped reading what it is sent"
                );
                return Err(std::io::ErrorKind::TimedOut.into());
            }
        }
        self.bytes_out.clear();
        if self.bytes_out.capacity() > 64 * 1024 {
            self.bytes_out = BytesMut::with_capacity(256);
        }
        door.metrics.sent(count, bytes);
        Ok(())
    }

    /// Tells the router the session is over and waits (bounded) until it has let go: this frees the router's
    /// slot and keeps a persistent session for the client's return.
    /// `expiry`: the session's expiry set anew by an MQTT 5 DISCONNECT, in seconds.
    async fn detach(&mut self, expiry: Option<u32>) {
        let disconnect = Packet::Disconnect(
            Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection,
            },
            expiry.map(|secs| DisconnectProperties {
                session_expiry_interval: Some(secs),
                reason_string: None,
                user_properties: Vec::new(),
                server_reference: None,
            }),
        );
        if self.tx.send(disconnect).await.is_err() {
            return;
        }
        let _ = timeout(Duration::from_secs(2), async {
            while self.rx.next().await.is_ok() {}
        })
        .await;
    }
}

/// How long what the router has for a device may wait while the device's packets keep the session reading.
const DELIVERY_DUE: Duration = Duration::from_millis(20);

/// Writes to the device the router's notification `note` (`LinkRx::next`'s answer) and every one already
/// queued behind it; asks the router for more when it said it would wait to be asked.
async fn deliver<S>(
    door: &FrontDoor,
    codec: &mut Codec,
    io: &mut S,
    link: &mut Link,
    note: Result<Option<Notification>, LinkError>,
) -> Option<End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Ok(mut pending) = note else {
        return Some(End::RouterClosed);
    };
    let mut unschedule = false;
    let mut packets = Vec::new();
    loop {
        match pending {
            Some(Notification::Unschedule) => unschedule = true,
            Some(note) => packets.extend(Option::<Packet>::from(note)),
            None => {}
        }
        match link.rx.next().now_or_never() {
            Some(Ok(Some(next))) => pending = Some(next),
            _ => break,
        }
    }
    if !packets.is_empty() && link.write(door, codec, io, packets).await.is_err() {
        return Some(End::Network);
    }
    // Boxed: its future carries a whole router event, and the session's state lives as long as the device.
    if unschedule && Box::pin(link.rx.wake()).await.is_err() {
        return Some(End::RouterClosed);
    }
    None
}

#[allow(clippy::too_many_arguments)]
async fn run<S>(
    door: &FrontDoor,
    device: &DeviceId,
    codec: &mut Codec,
    io: &mut S,
    buf: &mut BytesMut,
    link: &mut Link,
    kicked: &mut tokio::sync::mpsc::Receiver<DisconnectReason>,
    keep_alive: Duration,
    seen: &crate::presence::SeenClock,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let far = Duration::from_secs(86_400 * 365);
    let period = if keep_alive.is_zero() { far } else { keep_alive };
    // One timer for the session, moved on only when it fires early: a new `sleep_until` on every turn of the
    // loop registered and removed a timer entry per packet.
    let mut last_read = Instant::now();
    // When the router's notifications last had their turn.
    let mut delivered = last_read;
    let keep_alive_timer = sleep_until(last_read + period);
    tokio::pin!(keep_alive_timer);
    loop {
        make_room(buf);
        tokio::select! {
            biased;
            reason = kicked.recv() => {
                let reason = reason.unwrap_or(DisconnectReason::ServerShutdown);
                // Bytes the device sent before it was told to go come first: a clean DISCONNECT that arrived while
                // this task waited for its turn (a busy machine) ends the session as the device asked, without the
                // will, and a request in the same bytes is still handled.
                if let Some(Ok(n @ 1..)) = io.read_buf(buf).now_or_never() {
                    if let Some(end) = handle_read(door, device, codec, buf, link, n).await {
                        return end;
                    }
                }
                return End::Kicked(reason);
            }
            read = io.read_buf(buf) => {
                let n = match read {
                    Ok(0) | Err(_) => return End::Network,
                    Ok(n) => n,
                };
                last_read = Instant::now();
                seen.touch();
                if let Some(end) = handle_read(door, device, codec, buf, link, n).await {
                    return end;
                }
                // Reads come first in this loop, so while the device's packets arrive faster than they are
                // handled (a busy machine, a device streaming) the read branch is always ready, and what the router
                // has for the device waited until the device paused: seconds, every reply at once. So past
                // `DELIVERY_DUE` since the router's last turn, when the device has sent more already, what the
                // router has goes out before that is handled. Only then: when nothing more is waiting, the loop
                // gives the router its turn anyway, with all it has by then (one write; taking its notifications
                // after every read sent them a few at a time, and cost a fifth of the saturated rate). Once per
                // turn of the loop, so that a kick is still seen between reads.
                if Instant::now().duration_since(delivered) >= DELIVERY_DUE {
                    make_room(buf);
                    if let Some(read) = io.read_buf(buf).now_or_never() {
                        let n = match read {
                            Ok(0) | Err(_) => return End::Network,
                            Ok(n) => n,
                        };
                        delivered = Instant::now();
                        let ended = match link.rx.next().now_or_never() {
                            Some(note) => deliver(door, codec, io, link, note).await,
                            None => None,
                        };
                        last_read = Instant::now();
                        seen.touch();
                        // The bytes read come first even when the write failed: a DISCONNECT among them ends the
                        // session as the device asked (no will).
                        if let Some(end) = handle_read(door, device, codec, buf, link, n).await {
                            return end;
                        }
                        if let Some(end) = ended {
                            return end;
                        }
                    }
                }
            }
            _ = &mut keep_alive_timer => {
                let due = last_read + period;
                if due <= Instant::now() {
                    return End::KeepAlive;
                }
                keep_alive_timer.as_mut().reset(due);
            }
            note = link.rx.next() => {
                delivered = Instant::now();
                if let Some(end) = deliver(door, codec, io, link, note).await {
                    return end;
                }
            }
        }
    }
}

/// Room a read has at least: what a device usually sends at once (a request, its acks) fits whole.
const READ_ROOM: usize = 256;

/// Gives the next read into `buf` at least [`READ_ROOM`] bytes. Once packets were split off the buffer, its own
/// spare room is what their allocation has left, and a read takes only that (64 bytes when none was left): a
/// 150-byte update then came in two or three reads, each a turn of the session loop for a packet not yet whole
/// (a third of all reads under load). The allocation is taken back when every packet read from it is gone.
fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_ROOM {
        buf.reserve(2 * READ_ROOM);
    }
}

/// Handles the `n` bytes just read into `buf`: the packets go to the router, the shadow and OTA work is done.
/// `Some` when the session ends here (DISCONNECT, a topic outside the device's, a protocol error, no router).
async fn handle_read(
    door: &FrontDoor,
    device: &DeviceId,
    codec: &mut Codec,
    buf: &mut BytesMut,
    link: &mut Link,
    n: usize,
) -> Option<End> {
    let mut packets = Vec::new();
    let mut shadow_work = Vec::new();
    let outcome = loop {
        match codec.read(buf) {
            Ok(None) => break None,
            Ok(Some(Packet::Disconnect(d, props))) => {
                break Some(End::Client {
                    with_will: d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage,
                    expiry: props.and_then(|p| p.session_expiry_interval),
                })
            }
            Ok(Some(packet)) if !allowed(device, &packet) => break Some(End::Acl),
            Ok(Some(packet)) => {
                shadow::collect(device, &packet, &mut shadow_work);
                link.subscriptions.note(&packet);
                packets.push(packet);
            }
            Err(e) => {
                tracing::debug!(device_id = %device, error = %e, "protocol error");
                break Some(End::Network);
            }
        }
    };
    door.metrics.received(packets.len() as u64, n as u64);
    let mut relay = shadow::Relay::new(&mut link.tx, &link.subscriptions, packets);
    // Boxed: the shadow work's future is large, and the session's state lives as long as the device.
    Box::pin(shadow::perform_all(
        &door.shadows,
        &door.ota,
        device,
        shadow_work,
        &mut relay,
    ))
    .await;
    if !relay.flush() {
        return Some(End::RouterClosed);
    }
    if buf.capacity() > 64 * 1024 && buf.is_empty() {
        *buf = BytesMut::with_capacity(512);
    }
    outcome
}

/// Topic isolation for one packet from the device.
fn allowed(device: &DeviceId, packet: &Packet) -> bool {
    match packet {
        Packet::Publish(publish, _) => {
            std::str::from_utf8(&publish.topic).is_ok_and(|t| acl::may_publish(device, t))
        }
        Packet::Subscribe(subscribe, _) => subscribe
            .filters
            .iter()
            .all(|f| acl::may_subscribe(device, &f.path)),
        _ => true,
    }
}

/// The MQTT 5 DISCONNECT reason the server sends when it ends the session itself.
fn server_reason_code(end: &End) -> Option<DisconnectReasonCode> {
    Some(match end {
        End::KeepAlive => DisconnectReasonCode::KeepAliveTimeout,
        End::Acl | End::Kicked(DisconnectReason::Revoked) => DisconnectReasonCode::NotAuthorized,
        End::Kicked(DisconnectReason::Takeover) => DisconnectReasonCode::SessionTakenOver,
        End::Kicked(DisconnectReason::ServerShutdown) => DisconnectReasonCode::ServerShuttingDown,
        _ => return None,
    })
}

/// Publishes the will now, or after the MQTT 5 will delay unless the device has reconnected by then.
fn publish_will(
    door: &Arc<FrontDoor>,
    device: &DeviceId,
    token: u64,
    will: LastWill,
    props: Option<LastWillProperties>,
) {
    // At the will's QoS: delivered at the lower of that and each subscription's.
    let qos = will.qos;
    let packet = Packet::Publish(
        Publish::new(will.topic, will.message, will.retain).from_platform(qos),
        None,
    );
    let delay = props.and_then(|p| p.delay_interval).unwrap_or(0);
    if delay == 0 {
        let _ = door.platform.send(packet);
        return;
    }
    let (door, device) = (door.clone(), device.clone());
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(u64::from(delay))).await;
        // Reconnected in the meantime: a newer claim holds the device, the will is dropped (MQTT 5 §3.1.3.2.2).
        if !door.sessions.holds_other_than(&device, token) {
            let _ = door.platform.send(packet);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_expiry_follows_the_protocol_and_the_servers_maximum() {
        let hour = Duration::from_secs(3600);
        let secs = Duration::from_secs;
        // MQTT 3.1.1: the server's for a persistent session, none for a clean one; the CONNACK says nothing.
        assert_eq!(session_expiry(hour, Version::V4, false, None), (hour, None));
        assert_eq!(
            session_expiry(hour, Version::V4, true, None),
            (Duration::ZERO, None)
        );
        // MQTT 5: what the client asks (absent is 0), whatever Clean Start says ...
        assert_eq!(
            session_expiry(hour, Version::V5, false, None),
            (Duration::ZERO, None)
        );
        assert_eq!(
            session_expiry(hour, Version::V5, true, Some(60)),
            (secs(60), None)
        );
        assert_eq!(session_expiry(hour, Version::V5, false, Some(3600)), (hour, None));
        // ... up to the server's, which the CONNACK then states ("for ever" included).
        assert_eq!(
            session_expiry(hour, Version::V5, false, Some(3601)),
            (hour, Some(3600))
        );
        assert_eq!(
            session_expiry(hour, Version::V5, false, Some(u32::MAX)),
            (hour, Some(3600))
        );
        assert_eq!(
            session_expiry(Duration::ZERO, Version::V5, false, Some(5)),
            (Duration::ZERO, Some(0))
        );
        // A maximum beyond what the CONNACK can state is stated as its longest finite interval.
        let long = secs(u64::from(u32::MAX) + 10);
        assert_eq!(
            session_expiry(long, Version::V5, false, Some(u32::MAX)),
            (long, Some(u32::MAX - 1))
        );
    }

    #[test]
    fn a_disconnect_may_shorten_the_expiry_but_not_make_one_from_none() {
        let hour = Duration::from_secs(3600);
        assert_eq!(disconnect_expiry(hour, hour, 0), Some(0), "drop the session now");
        assert_eq!(disconnect_expiry(hour, Duration::from_secs(60), 600), Some(600));
        assert_eq!(disconnect_expiry(hour, hour, u32::MAX), Some(3600), "capped");
        assert_eq!(
            disconnect_expiry(hour, Duration::ZERO, 60),
            None,
            "a protocol error: ignored"
        );
        assert_eq!(disconnect_expiry(hour, Duration::ZERO, 0), Some(0));
    }
}
