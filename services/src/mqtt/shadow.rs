//! The platform side of a device session: requests the device publishes on its shadow and OTA topics, and the
//! replays when it subscribes (its pending shadow delta, its open OTA job). The packets still go to the router
//! as usual (acks, retained messages, other subscriptions); this is what the platform does with them besides.

use antumbra_wire::topics::{parse_shadow_request, shadow_delta, ShadowOp};
use antumbra_wire::DeviceId;
use bytes::Bytes;
use rumqttd::local::LinkTx;
use rumqttd::protocol::{has_wildcards, matches, Packet};

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

/// Most filters a session keeps track of; a device with more is taken to want every message (see
/// [`Subscriptions`]).
const TRACKED_FILTERS: usize = 32;

/// The filters a session's device has subscribed to, as the session read them: what the platform need not
/// build because nobody would receive it. Only the device may subscribe to its own topics, so a message on
/// them that none of its filters matches goes nowhere (the router would log it and drop it unread).
///
/// A filter is noted when its SUBSCRIBE is read, before the replies of anything read after it are made, and
/// goes when its UNSUBSCRIBE is read; both reach the router ahead of those replies (see [`Relay`]), so the
/// router and this list agree on every reply. A filter the router refused is kept, which only costs a message
/// built for nothing. A resumed session's filters were restored by the router and are not known here: it wants
/// everything, as does a device with more than [`TRACKED_FILTERS`].
#[derive(Debug)]
pub(super) struct Subscriptions(Option<Vec<Tracked>>);

/// A filter, and whether it has a wildcard (a filter without one matches only the topic spelled the same, which
/// is a comparison of bytes rather than of levels).
#[derive(Debug)]
struct Tracked {
    filter: String,
    wildcard: bool,
}

impl Subscriptions {
    /// For a session that starts with no subscriptions (`resumed` false), or with the router's (true).
    pub(super) fn new(resumed: bool) -> Self {
        Self((!resumed).then(Vec::new))
    }

    /// Follows the device's SUBSCRIBE and UNSUBSCRIBE packets.
    pub(super) fn note(&mut self, packet: &Packet) {
        let Some(filters) = &mut self.0 else {
            return;
        };
        match packet {
            Packet::Subscribe(subscribe, _) => {
                for filter in &subscribe.filters {
                    if !filters.iter().any(|t| t.filter == filter.path) {
                        filters.push(Tracked {
                            filter: filter.path.clone(),
                            wildcard: has_wildcards(&filter.path),
                        });
                    }
                }
                if filters.len() > TRACKED_FILTERS {
                    self.0 = None;
                }
            }
            Packet::Unsubscribe(unsubscribe, _) => {
                filters.retain(|t| !unsubscribe.filters.contains(&t.filter));
            }
            _ => {}
        }
    }

    /// Whether a message on `topic` would reach the device.
    pub(super) fn cover(&self, topic: &str) -> bool {
        self.0.as_ref().is_none_or(|filters| {
            filters.iter().any(|t| match t.wildcard {
                true => matches(topic, &t.filter),
                false => topic == t.filter,
            })
        })
    }
}

/// A session's way into the router for what it read and what the platform answers: the device's packets are
/// held until the first reply, or the end of the read, and go in the same push as that reply.
///
/// A shadow request costs the router one wake-up and the device one write (its PUBACK and its `accepted` in one
/// TLS record) instead of two of each, and no hop through the platform link. The replies are pushed while the
/// shadow's stripe is held (see [`Courier`]), so they reach the router in the order of the changes, like the
/// outbox's. They all go to this device's own topics, which only this session may subscribe to: a reply its
/// filters do not match is not made (see [`Subscriptions`]).
pub(super) struct Relay<'a> {
    tx: &'a mut LinkTx,
    subscriptions: &'a Subscriptions,
    held: Vec<Packet>,
    closed: bool,
}

impl<'a> Relay<'a> {
    /// Holds `packets`, read from the device, for the router.
    pub(super) fn new(tx: &'a mut LinkTx, subscriptions: &'a Subscriptions, packets: Vec<Packet>) -> Self {
        Self {
            tx,
            subscriptions,
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

    fn wants(&self, topic: &str) -> bool {
        self.subscriptions.cover(topic)
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

/// Does the work of one read, in order: consecutive updates of one shadow go together (see
/// [`Shadows::handle_device_updates`]).
pub(super) async fn perform_all(
    shadows: &Shadows,
    ota: &crate::ota::Ota,
    device: &DeviceId,
    work: Vec<Work>,
    relay: &mut Relay<'_>,
) {
    let mut work = work.into_iter().peekable();
    while let Some(next) = work.next() {
        let Work::Request {
            name,
            op: ShadowOp::Update,
            payload,
        } = next
        else {
            perform(shadows, ota, device, next, relay).await;
            continue;
        };
        let mut payloads = vec![payload];
        let same_shadow =
            |w: &Work| matches!(w, Work::Request { name: n, op: ShadowOp::Update, .. } if *n == name);
        while let Some(Work::Request { payload, .. }) = work.next_if(same_shadow) {
            payloads.push(payload);
        }
        let payloads: Vec<&[u8]> = payloads.iter().map(|p| p.as_ref()).collect();
        shadows
            .handle_device_updates(device, name.as_deref(), &payloads, relay)
            .await;
    }
}

/// Does the work: shadow replies go through `relay`, OTA messages through the outbox.
async fn perform(
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
    use rumqttd::protocol::{Filter, QoS, RetainForwardRule, Subscribe, Unsubscribe};

    fn subscribe(filters: &[&str]) -> Packet {
        let filters = filters
            .iter()
            .map(|f| Filter {
                path: (*f).to_owned(),
                qos: QoS::AtLeastOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::OnEverySubscribe,
            })
            .collect();
        Packet::Subscribe(Subscribe { pkid: 1, filters }, None)
    }

    fn unsubscribe(filters: &[&str]) -> Packet {
        let filters = filters.iter().map(|f| (*f).to_owned()).collect();
        Packet::Unsubscribe(Unsubscribe { pkid: 2, filters }, None)
    }

    #[test]
    fn subscriptions_follow_the_devices_filters_and_cover_everything_when_unknown() {
        let accepted = "devices/d/shadow/update/accepted";
        let documents = "devices/d/shadow/update/documents";
        let mut s = Subscriptions::new(false);
        assert!(!s.cover(accepted));
        s.note(&subscribe(&[accepted, "devices/d/shadow/update/+"]));
        assert!(s.cover(accepted) && s.cover(documents));
        assert!(!s.cover("devices/d/shadow/update/accepted/x") && !s.cover("devices/d/shadow/update"));
        s.note(&unsubscribe(&["devices/d/shadow/update/+"]));
        assert!(s.cover(accepted) && !s.cover(documents));
        // The same filter twice is one subscription: one UNSUBSCRIBE ends it.
        s.note(&subscribe(&[accepted]));
        s.note(&unsubscribe(&[accepted]));
        assert!(!s.cover(accepted));
        s.note(&subscribe(&["devices/d/#"]));
        assert!(s.cover(documents) && !s.cover("devices/e/shadow/update/documents"));

        // A resumed session's filters are the router's: everything may be wanted.
        let mut resumed = Subscriptions::new(true);
        resumed.note(&unsubscribe(&["devices/d/#"]));
        assert!(resumed.cover(documents));

        // An UNSUBSCRIBE of a filter never subscribed changes nothing.
        s.note(&unsubscribe(&["devices/d/shadow/#"]));
        assert!(s.cover(documents));

        // Up to TRACKED_FILTERS it tells; past them it stops.
        let mut many = Subscriptions::new(false);
        let filters: Vec<String> = (0..=TRACKED_FILTERS)
            .map(|i| format!("devices/d/x/{i}"))
            .collect();
        let filters: Vec<&str> = filters.iter().map(String::as_str).collect();
        many.note(&subscribe(&filters[..TRACKED_FILTERS]));
        assert!(!many.cover(documents));
        many.note(&subscribe(&filters[TRACKED_FILTERS..]));
        assert!(many.cover(documents));
    }

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
