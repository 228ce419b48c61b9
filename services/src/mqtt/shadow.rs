//! The platform side of a device session: requests the device publishes on its shadow and OTA topics, and the
//! replays when it subscribes (its pending shadow delta, its open OTA job). The packets still go to the router
//! as usual (acks, retained messages, other subscriptions); this is what the platform does with them besides.

use antumbra_wire::topics::{parse_shadow_request, shadow_delta, ShadowOp};
use antumbra_wire::DeviceId;
use bytes::Bytes;
use rumqttd::local::LinkTx;
use rumqttd::protocol::{matches, Packet};

use crate::shadow::store::{ShadowKey, ShadowName};
use crate::shadow::{Courier, Outgoing, Shadows};

/// Something the platform does for a packet.
pub(super) enum Work {
    /// A request on `…/shadow[/name/{n}]/{op}`.
    Request {
        name: Option<String>,
        op: ShadowOp,
        payload: Bytes,
    },
    /// The device subscribed to this shadow's delta topic.
    Replay(ShadowKey),
    /// The device subscribed to the delta topic of every named shadow it has.
    ReplayNamed,
    /// An OTA progress or outcome report.
    OtaUpdate(Bytes),
    /// The device subscribed to its OTA job topic.
    OtaReplay,
}

/// Notes the shadow work a packet from `device` asks for.
pub(super) fn collect(device: &DeviceId, packet: &Packet, work: &mut Vec<Work>) {
    match packet {
        Packet::Publish(publish, _) => {
            let Ok(topic) = std::str::from_utf8(&publish.topic) else {
                return;
            };
            if topic == antumbra_wire::ota::update_topic(device) {
                work.push(Work::OtaUpdate(publish.payload.clone()));
            }
            if let Some(request) = parse_shadow_request(device, topic) {
                work.push(Work::Request {
                    name: request.name.map(str::to_owned),
                    op: request.op,
                    payload: publish.payload.clone(),
                });
            }
        }
        Packet::Subscribe(subscribe, _) => {
            for filter in &subscribe.filters {
                work.extend(
                    delta_subscriptions(device, &filter.path)
                        .into_iter()
                        .map(Work::Replay),
                );
                if covers_every_named_delta(device, &filter.path) {
                    work.push(Work::ReplayNamed);
                }
                if matches(&antumbra_wire::ota::job_topic(device), &filter.path) {
                    work.push(Work::OtaReplay);
                }
            }
        }
        _ => {}
    }
}

/// The shadows whose delta topic `filter` covers: the classic one when the filter matches its delta topic, and
/// a named one when the filter names it literally (`devices/{id}/shadow/name/{name}/update/delta` or a filter
/// with wildcards after the name).
fn delta_subscriptions(device: &DeviceId, filter: &str) -> Vec<ShadowKey> {
    let mut keys = Vec::new();
    if matches(&shadow_delta(device), filter) {
        keys.push(ShadowKey::classic(device.clone()));
    }
    let named_prefix = format!("devices/{device}/shadow/name/");
    if let Some(rest) = filter.strip_prefix(&named_prefix) {
        if let Some((name, tail)) = rest.split_once('/') {
            if let Ok(name) = ShadowName::parse(name) {
                if matches("update/delta", tail) {
                    keys.push(ShadowKey {
                        device: device.clone(),
                        name: Some(name),
                    });
                }
            }
        }
    }
    keys
}

/// A session's way into the router for what it read and what the platform answers: the device's packets are
/// held until the first reply, or the end of the read, and go in the same push as that reply.
///
/// A shadow request costs the router one wake-up and the device one write (its PUBACK and its `accepted` in one
/// TLS record) instead of two of each, and no hop through the platform link. The replies are pushed while the
/// shadow's stripe is held (see [`Courier`]), so they reach the router in the order of the changes, like the
/// outbox's. They all go to this device's own topics, which only this session may subscribe to.
pub(super) struct Relay<'a> {
    tx: &'a mut LinkTx,
    held: Vec<Packet>,
    closed: bool,
}

impl<'a> Relay<'a> {
    /// Holds `packets`, read from the device, for the router.
    pub(super) fn new(tx: &'a mut LinkTx, packets: Vec<Packet>) -> Self {
        Self {
            tx,
            held: packets,
            closed: false,
        }
    }

    /// Hands the router what is held; `false` once the router is gone.
    pub(super) fn flush(&mut self) -> bool {
        self.deliver(Vec::new());
        !self.closed
    }
}

impl Courier for Relay<'_> {
    fn deliver(&mut self, messages: Vec<Outgoing>) {
        let mut packets = std::mem::take(&mut self.held);
        packets.extend(messages.into_iter().map(super::outgoing_packet));
        if !self.closed && !super::forward(self.tx, packets) {
            self.closed = true;
        }
    }
}

/// Whether `filter` has a wildcard where a named shadow's delta topic has the name, so that it covers the delta
/// topic of every named shadow of `device`. Probed with a name no shadow can have (U+0001): only a wildcard
/// matches it.
fn covers_every_named_delta(device: &DeviceId, filter: &str) -> bool {
    matches(
        &format!("devices/{device}/shadow/name/\u{1}/update/delta"),
        filter,
    )
}

/// Does the work: shadow replies go through `relay`, OTA messages through the outbox.
pub(super) async fn perform(
    shadows: &Shadows,
    ota: &crate::ota::Ota,
    device: &DeviceId,
    work: Work,
    relay: &mut Relay<'_>,
) {
    if !matches!(work, Work::Request { .. }) {
        // A replay reads the store after the SUBSCRIBE is in the router's hands: a change made in between is
        // then delivered to the new subscription rather than lost. OTA messages take the outbox, after these.
        relay.flush();
    }
    match work {
        Work::OtaUpdate(payload) => ota.handle_device_update(device, &payload).await,
        Work::OtaReplay => {
            if let Err(e) = ota.replay(device).await {
                tracing::warn!(device_id = %device, error = %e, "could not replay the OTA job");
            }
        }
        Work::Request { name, op, payload } => {
            shadows
                .handle_device_request(device, name.as_deref(), op, &payload, relay)
                .await
        }
        Work::Replay(key) => {
            if let Err(e) = shadows.replay(&key, relay).await {
                tracing::warn!(device_id = %device, error = %e, "could not replay the shadow delta");
            }
        }
        Work::ReplayNamed => {
            if let Err(e) = shadows.replay_named(device, relay).await {
                tracing::warn!(device_id = %device, error = %e, "could not replay the named shadows' deltas");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_filters_are_recognised() {
        let d = DeviceId::parse("lamp").unwrap();
        let classic = |f| {
            delta_subscriptions(&d, f)
                .iter()
                .filter(|k| k.name.is_none())
                .count()
        };
        for f in [
            "devices/lamp/shadow/update/delta",
            "devices/lamp/#",
            "devices/lamp/shadow/#",
            "devices/lamp/shadow/update/+",
            "devices/lamp/+/update/delta",
        ] {
            assert_eq!(classic(f), 1, "{f}");
        }
        for f in [
            "devices/lamp/shadow/update/accepted",
            "devices/lamp/telemetry",
            "devices/lamp/shadow/name/x/update/delta",
        ] {
            assert_eq!(classic(f), 0, "{f}");
        }
        for f in [
            "devices/lamp/shadow/name/+/update/delta",
            "devices/lamp/shadow/name/+/update/+",
            "devices/lamp/shadow/name/#",
            "devices/lamp/shadow/#",
            "devices/lamp/#",
            "devices/lamp/+/name/+/update/delta",
        ] {
            assert!(covers_every_named_delta(&d, f), "{f}");
            assert!(
                delta_subscriptions(&d, f).iter().all(|k| k.name.is_none()),
                "{f}: no one named shadow is replayed twice"
            );
        }
        for f in [
            "devices/lamp/shadow/name/cfg/update/delta",
            "devices/lamp/shadow/name/+/update/accepted",
            "devices/lamp/shadow/update/delta",
            "devices/other/shadow/name/+/update/delta",
        ] {
            assert!(!covers_every_named_delta(&d, f), "{f}");
        }
        let named = delta_subscriptions(&d, "devices/lamp/shadow/name/cfg/update/delta");
        assert_eq!(named.len(), 1);
        assert_eq!(named[0].name.as_ref().unwrap().as_str(), "cfg");
        assert_eq!(delta_subscriptions(&d, "devices/lamp/shadow/name/cfg/#").len(), 1);
    }
}
