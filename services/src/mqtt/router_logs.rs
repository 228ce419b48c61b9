//! The router's filter logs are trimmed to what their readers still need (`vendor/rumqttd/ANTUMBRA.md`, item 9):
//! these tests drive the real router through local links and check that trimming never takes a message a
//! reader still needs: a persistent session's unacknowledged and offline messages, and a subscriber that falls
//! behind.

use std::time::Duration;

use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Filter, Packet, PubAck, PubAckReason, Publish, PublishProperties, QoS,
    RetainForwardRule, Subscribe,
};
use rumqttd::{Notification, Router};

use super::{router_config, MqttSettings};

/// Longer than a few trim intervals (100 ms), with router traffic in between so that trimming runs.
async fn let_the_router_trim(platform: &mut LinkTx) {
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        platform
            .send(Packet::Publish(Publish::new("elsewhere/tick", "t", false), None))
            .await
            .unwrap();
    }
}

/// A router of its own, and a clean-session link to it for each of `client_ids`, in order.
pub(super) async fn router_with(client_ids: &[&str]) -> Vec<(LinkTx, LinkRx)> {
    let router = Router::new(0, router_config(&MqttSettings::default())).spawn();
    let mut links = Vec::new();
    for id in client_ids {
        let (tx, rx, _) = LinkBuilder::new(id, router.clone()).build_async().await.unwrap();
        links.push((tx, rx));
    }
    links
}

async fn subscribe(tx: &mut LinkTx, rx: &mut LinkRx, filter: &str, qos: QoS) {
    subscribe_with(tx, rx, filter, qos, false).await
}

/// Subscribes to `filter` (MQTT 5 No Local when `nolocal`) and waits for the SUBACK.
pub(super) async fn subscribe_with(tx: &mut LinkTx, rx: &mut LinkRx, filter: &str, qos: QoS, nolocal: bool) {
    let filter = Filter {
        path: filter.into(),
        qos,
        nolocal,
        preserve_retain: false,
        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
    };
    subscribe_to(tx, rx, filter).await
}

/// Subscribes with `filter`'s options and waits for the SUBACK.
pub(super) async fn subscribe_to(tx: &mut LinkTx, rx: &mut LinkRx, filter: Filter) {
    let subscribe = Subscribe {
        pkid: 1,
        filters: vec![filter],
    };
    tx.send(Packet::Subscribe(subscribe, None)).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), rx.next()).await {
            Ok(Ok(Some(Notification::DeviceAck(_)))) => return,
            Ok(Ok(Some(_) | None)) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    }
}

/// The next forwarded publish: (packet id, dup, payload).
async fn forwarded(rx: &mut LinkRx) -> (u16, bool, String) {
    let publish = next_forward(rx, Duration::from_secs(5))
        .await
        .expect("no publish forwarded");
    let wire = publish.serialize();
    let pkid = u16::from_be_bytes([wire[1], wire[2]]);
    let payload = String::from_utf8(publish.payload.to_vec()).unwrap();
    (pkid, wire[0] & 0b1000 != 0, payload)
}

/// The next publish the router forwards to `rx` within `wait`, or `None`. Asks for more when the router says
/// the link's share is used up, as a session does once it has written what it got.
pub(super) async fn next_forward(rx: &mut LinkRx, wait: Duration) -> Option<Publish> {
    next_forward_with(rx, wait).await.map(|(publish, _)| publish)
}

/// [`next_forward`] with the publish's properties.
async fn next_forward_with(rx: &mut LinkRx, wait: Duration) -> Option<(Publish, Option<PublishProperties>)> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, rx.next()).await {
            Ok(Ok(Some(Notification::Unschedule))) => rx.wake().await.unwrap(),
            Ok(Ok(Some(Notification::Forward(forward)))) => {
                return Some((forward.publish, forward.properties))
            }
            // Ok(None): a wake-up whose notifications an earlier read already took.
            Ok(Ok(Some(_) | None)) => {}
            Ok(Err(e)) => panic!("link closed: {e:?}"),
            Err(_) => return None,
        }
    }
}

async fn detach(tx: &mut LinkTx, rx: &mut LinkRx) {
    let disconnect = Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
    };
    tx.send(Packet::Disconnect(disconnect, None)).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), async { while rx.next().await.is_ok() {} }).await;
}

#[tokio::test]
async fn a_persistent_session_gets_its_unacked_and_offline_messages_after_the_logs_were_trimmed() {
    let router = Router::new(0, router_config(&MqttSettings::default())).spawn();
    let (mut platform, _platform_rx, _) = LinkBuilder::new("platform", router.clone())
        .build_async()
        .await
        .unwrap();
    let (mut tx, mut rx, _) = LinkBuilder::new("dev-a", router.clone())
        .clean_session(false)
        .build_async()
        .await
        .unwrap();
    subscribe(&mut tx, &mut rx, "devices/dev-a/#", QoS::AtLeastOnce).await;
    for payload in ["m1", "m2", "m3"] {
        // At QoS 1, as the platform publishes (delivered at the lower of that and the subscription's).
        let publish = Publish::new("devices/dev-a/inbox", payload, false).from_platform(QoS::AtLeastOnce);
        platform.send(Packet::Publish(publish, None)).await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(forwarded(&mut rx).await);
    }
    assert_eq!(
        got.iter().map(|(_, _, p)| p.as_str()).collect::<Vec<_>>(),
        ["m1", "m2", "m3"]
    );
    // Only m1 is acknowledged; m2 and m3 stay in flight.
    let ack = PubAck {
        pkid: got[0].0,
        reason: PubAckReason::Success,
    };
    tx.send(Packet::PubAck(ack, None)).await.unwrap();
    let_the_router_trim(&mut platform).await;
    detach(&mut tx, &mut rx).await;

    for payload in ["offline-1", "offline-2"] {
        // At QoS 1, as the platform publishes (delivered at the lower of that and the subscription's).
        let publish = Publish::new("devices/dev-a/inbox", payload, false).from_platform(QoS::AtLeastOnce);
        platform.send(Packet::Publish(publish, None)).await.unwrap();
    }
    let_the_router_trim(&mut platform).await;

    let (_tx, mut rx, connack) = LinkBuilder::new("dev-a", router.clone())
        .clean_session(false)
        .build_async()
        .await
        .unwrap();
    match connack {
        Notification::DeviceAck(_) => {}
        other => panic!("no CONNACK: {other:?}"),
    }
    let mut again = Vec::new();
    for _ in 0..4 {
        again.push(forwarded(&mut rx).await);
    }
    let payloads: Vec<&str> = again.iter().map(|(_, _, p)| p.as_str()).collect();
    assert_eq!(payloads, ["m2", "m3", "offline-1", "offline-2"]);
    // Sent again as they were (MQTT §4.4): their packet ids, DUP set; the new ones after them, DUP clear.
    assert_eq!((again[0].0, again[0].1), (got[1].0, true));
    assert_eq!((again[1].0, again[1].1), (got[2].0, true));
    assert!(!again[2].1 && !again[3].1 && again[2].0 != again[1].0);
}

/// A QoS 0 message delivered after an unacknowledged QoS 1 one is not delivered again when the session
/// resumes: only unacknowledged publishes are sent again (the router used to restart each filter from its
/// oldest unacknowledged message).
#[tokio::test]
async fn a_resumed_session_gets_only_its_unacknowledged_messages_again() {
    let router = Router::new(0, router_config(&MqttSettings::default())).spawn();
    let (mut platform, _platform_rx, _) = LinkBuilder::new("platform", router.clone())
        .build_async()
        .await
        .unwrap();
    let attach = || {
        LinkBuilder::new("dev-z", router.clone())
            .clean_session(false)
            .build_async()
    };
    let (mut tx, mut rx, _) = attach().await.unwrap();
    subscribe(&mut tx, &mut rx, "devices/dev-z/#", QoS::AtLeastOnce).await;
    // The last one published retained: it goes to the live subscription with RETAIN clear, and comes again so.
    for (payload, qos, retain) in [
        ("q1-a", QoS::AtLeastOnce, false),
        ("q0", QoS::AtMostOnce, false),
        ("q1-b", QoS::AtLeastOnce, true),
    ] {
        let publish = Publish::new("devices/dev-z/inbox", payload, retain);
        let publish = match qos {
            QoS::AtMostOnce => publish,
            qos => publish.from_platform(qos),
        };
        platform.send(Packet::Publish(publish, None)).await.unwrap();
    }
    // (payload, RETAIN, DUP) of each publish forwarded within half a second of the last.
    async fn forwards(rx: &mut LinkRx) -> Vec<(String, bool, bool)> {
        let mut got = Vec::new();
        while let Some(publish) = next_forward(rx, Duration::from_millis(500)).await {
            let header = publish.serialize()[0];
            let payload = String::from_utf8(publish.payload.to_vec()).unwrap();
            got.push((payload, header & 1 == 1, header & 0b1000 != 0));
        }
        got
    }
    let expected = |list: &[(&str, bool, bool)]| {
        list.iter()
            .map(|(p, r, d)| (p.to_string(), *r, *d))
            .collect::<Vec<_>>()
    };
    let first = forwards(&mut rx).await;
    assert_eq!(
        first,
        expected(&[
            ("q1-a", false, false),
            ("q0", false, false),
            ("q1-b", false, false)
        ])
    );
    detach(&mut tx, &mut rx).await;
    let_the_router_trim(&mut platform).await;

    let (_tx, mut rx, _) = attach().await.unwrap();
    let again = forwards(&mut rx).await;
    assert_eq!(again, expected(&[("q1-a", false, true), ("q1-b", false, true)]));
}

/// A retained message sent for a subscription is in no log: left unacknowledged, it comes again when the
/// persistent session resumes, as it went (packet id, RETAIN) with DUP set, before a message logged after it.
#[tokio::test]
async fn a_resumed_session_gets_its_unacknowledged_retained_message_again() {
    let router = Router::new(0, router_config(&MqttSettings::default())).spawn();
    let (mut platform, _platform_rx, _) = LinkBuilder::new("platform", router.clone())
        .build_async()
        .await
        .unwrap();
    let retained = Publish::new("devices/dev-r/config", "kept", true).from_platform(QoS::AtLeastOnce);
    platform.send(Packet::Publish(retained, None)).await.unwrap();
    let attach = || {
        LinkBuilder::new("dev-r", router.clone())
            .clean_session(false)
            .build_async()
    };
    let (mut tx, mut rx, _) = attach().await.unwrap();
    subscribe(&mut tx, &mut rx, "devices/dev-r/#", QoS::AtLeastOnce).await;
    // (payload, packet id, RETAIN, DUP), from the wire form.
    let seen = |publish: &Publish| {
        let wire = publish.serialize();
        (
            String::from_utf8_lossy(&publish.payload).into_owned(),
            u16::from_be_bytes([wire[1], wire[2]]),
            wire[0] & 1 == 1,
            wire[0] & 0b1000 != 0,
        )
    };
    let first = next_forward(&mut rx, Duration::from_secs(5))
        .await
        .expect("retained message");
    let (payload, first_pkid, retain, dup) = seen(&first);
    assert_eq!((payload.as_str(), retain, dup), ("kept", true, false));
    let live = Publish::new("devices/dev-r/inbox", "live", false).from_platform(QoS::AtLeastOnce);
    platform.send(Packet::Publish(live, None)).await.unwrap();
    let second = next_forward(&mut rx, Duration::from_secs(5))
        .await
        .expect("live message");
    let (payload, second_pkid, ..) = seen(&second);
    assert_eq!(payload, "live");
    assert_ne!(first_pkid, second_pkid);
    // Neither is acknowledged.
    detach(&mut tx, &mut rx).await;
    let_the_router_trim(&mut platform).await;

    let (_tx, mut rx, _) = attach().await.unwrap();
    let mut again = Vec::new();
    while let Some(publish) = next_forward(&mut rx, Duration::from_millis(500)).await {
        again.push(publish);
    }
    assert_eq!(
        again.iter().map(seen).collect::<Vec<_>>(),
        [
            ("kept".to_string(), first_pkid, true, true),
            ("live".to_string(), second_pkid, false, true)
        ]
    );
    assert_eq!(again[0].topic.as_ref(), b"devices/dev-r/config");
}

/// A session that comes back with a smaller Receive Maximum gets its unacknowledged publishes again only as
/// fast as it acknowledges them (MQTT 5 §3.1.2.11.3), and new ones only after them; leaving in between keeps
/// their order.
#[tokio::test]
async fn resends_on_resume_keep_to_the_new_receive_maximum() {
    let router = Router::new(0, router_config(&MqttSettings::default())).spawn();
    let (mut platform, _platform_rx, _) = LinkBuilder::new("platform", router.clone())
        .build_async()
        .await
        .unwrap();
    let attach = |receive_max| {
        LinkBuilder::new("dev-m", router.clone())
            .clean_session(false)
            .receive_maximum(receive_max)
            .build_async()
    };
    let (mut tx, mut rx, _) = attach(None).await.unwrap();
    subscribe(&mut tx, &mut rx, "devices/dev-m/#", QoS::AtLeastOnce).await;
    let message = |payload: &'static str| {
        let publish = Publish::new("devices/dev-m/inbox", payload, false).from_platform(QoS::AtLeastOnce);
        Packet::Publish(publish, None)
    };
    for payload in ["a", "b", "c"] {
        platform.send(message(payload)).await.unwrap();
    }
    for _ in 0..3 {
        forwarded(&mut rx).await;
    }
    // None acknowledged; the device comes back taking one at a time, and leaves again after the first.
    detach(&mut tx, &mut rx).await;
    platform.send(message("new")).await.unwrap();
    let (mut tx, mut rx, _) = attach(Some(1)).await.unwrap();
    let first = next_forward(&mut rx, Duration::from_secs(2))
        .await
        .expect("a resend");
    assert_eq!(first.payload.as_ref(), b"a");
    detach(&mut tx, &mut rx).await;
    // Back again: still in order, one at a time.
    let (mut tx, mut rx, _) = attach(Some(1)).await.unwrap();
    let mut got = Vec::new();
    while let Some(publish) = next_forward(&mut rx, Duration::from_secs(2)).await {
        let wire = publish.serialize();
        let (pkid, dup) = (u16::from_be_bytes([wire[1], wire[2]]), wire[0] & 0b1000 != 0);
        got.push((String::from_utf8_lossy(&publish.payload).into_owned(), dup));
        // Nothing more until this one is acknowledged.
        let early = next_forward(&mut rx, Duration::from_millis(300)).await;
        assert!(
            early.is_none(),
            "sent past the Receive Maximum: {got:?} then {early:?}"
        );
        let ack = PubAck {
            pkid,
            reason: PubAckReason::Success,
        };
        tx.send(Packet::PubAck(ack, None)).await.unwrap();
    }
    let expected = [("a", true), ("b", true), ("c", true), ("new", false)];
    assert_eq!(got, expected.map(|(p, d)| (p.to_owned(), d)));
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_gets_every_message_after_the_logs_were_trimmed() {
    let mut links = router_with(&["platform", "dev-b"]).await;
    let (mut tx, mut rx) = links.pop().unwrap();
    let (mut platform, _platform_rx) = links.pop().unwrap();
    subscribe(&mut tx, &mut rx, "devices/dev-b/#", QoS::AtMostOnce).await;
    // More than the router hands a connection at once (200), none of them read yet.
    const COUNT: usize = 1_000;
    for i in 0..COUNT {
        let publish = Publish::new("devices/dev-b/telemetry".to_string(), i.to_string(), false);
        platform.send(Packet::Publish(publish, None)).await.unwrap();
    }
    let_the_router_trim(&mut platform).await;
    for i in 0..COUNT {
        let (_, _, payload) = forwarded(&mut rx).await;
        assert_eq!(payload, i.to_string());
        if i % 100 == 99 {
            // Read in rounds with trims in between, as a slow device would.
            let_the_router_trim(&mut platform).await;
        }
    }
}

/// Publishes retained messages `(topic, payload, Message Expiry Interval)` at QoS 1 through `platform`.
async fn publish_retained(platform: &mut LinkTx, messages: &[(&'static str, &'static str, u32)]) {
    for (topic, payload, expiry) in messages {
        let properties = PublishProperties {
            message_expiry_interval: Some(*expiry),
            ..Default::default()
        };
        let retained = Publish::new(*topic, *payload, true).from_platform(QoS::AtLeastOnce);
        platform
            .send(Packet::Publish(retained, Some(properties)))
            .await
            .unwrap();
    }
}

/// Forwarded publishes until none comes for `quiet`: (payload, Message Expiry Interval).
async fn expiries(rx: &mut LinkRx, quiet: Duration) -> Vec<(String, Option<u32>)> {
    let mut got = Vec::new();
    while let Some((publish, properties)) = next_forward_with(rx, quiet).await {
        let payload = String::from_utf8_lossy(&publish.payload).into_owned();
        got.push((payload, properties.and_then(|p| p.message_expiry_interval)));
    }
    got.sort();
    got
}

/// A retained message resent when a persistent session resumes carries what is left of its MQTT 5 Message Expiry
/// Interval then, not what was left when it was first sent (MQTT 5 §3.3.2.3.3); one that expired meanwhile is
/// not sent again (as a logged message is not, and as Mosquitto does).
#[tokio::test]
async fn a_resent_retained_message_counts_its_expiry_down_from_its_first_sending() {
    let router = Router::new(0, router_config(&MqttSettings::default())).spawn();
    let messages = [
        ("devices/dev-x/config", "kept", 60),
        ("devices/dev-x/brief", "brief", 1),
    ];
    let (mut platform, _platform_rx, _) = LinkBuilder::new("platform", router.clone())
        .build_async()
        .await
        .unwrap();
    publish_retained(&mut platform, &messages).await;
    let published = std::time::Instant::now();
    let attach = || {
        LinkBuilder::new("dev-x", router.clone())
            .clean_session(false)
            .build_async()
    };
    let (mut tx, mut rx, _) = attach().await.unwrap();
    subscribe(&mut tx, &mut rx, "devices/dev-x/#", QoS::AtLeastOnce).await;
    let first = expiries(&mut rx, Duration::from_millis(500)).await;
    assert_eq!(
        first,
        [("brief".to_owned(), Some(1)), ("kept".to_owned(), Some(60))]
    );
    // Neither is acknowledged; the session resumes two seconds later.
    detach(&mut tx, &mut rx).await;
    tokio::time::sleep(Duration::from_millis(2_100).saturating_sub(published.elapsed())).await;
    let (_tx, mut rx, _) = attach().await.unwrap();
    let again = expiries(&mut rx, Duration::from_millis(500)).await;
    let waited = published.elapsed().as_secs_f64();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].0, "kept");
    // Whole seconds are counted: 60 less the time waited, give or take a second.
    let off = f64::from(again[0].1.unwrap()) - (60.0 - waited);
    assert!(off.abs() <= 1.0, "{again:?} after {waited:.1} s");
}

/// Retained messages that wait for places in a subscription's in-flight window (here one place: Receive
/// Maximum 1) have their expiry counted when they are sent, not when they were read at SUBSCRIBE: one that
/// expired while it waited is not sent.
#[tokio::test]
async fn retained_messages_waiting_for_the_window_expire_meanwhile() {
    let router = Router::new(0, router_config(&MqttSettings::default())).spawn();
    let messages = [
        ("devices/dev-w/a", "brief-a", 1),
        ("devices/dev-w/b", "brief-b", 1),
    ];
    let (mut platform, _platform_rx, _) = LinkBuilder::new("platform", router.clone())
        .build_async()
        .await
        .unwrap();
    publish_retained(&mut platform, &messages).await;
    let (mut tx, mut rx, _) = LinkBuilder::new("dev-w", router.clone())
        .receive_maximum(Some(1))
        .build_async()
        .await
        .unwrap();
    subscribe(&mut tx, &mut rx, "devices/dev-w/#", QoS::AtLeastOnce).await;
    let (pkid, _, payload) = forwarded(&mut rx).await;
    assert!(payload.starts_with("brief-"), "{payload}");
    assert!(
        next_forward(&mut rx, Duration::from_millis(300)).await.is_none(),
        "one place in the window"
    );
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    let ack = PubAck {
        pkid,
        reason: PubAckReason::Success,
    };
    tx.send(Packet::PubAck(ack, None)).await.unwrap();
    let late = next_forward(&mut rx, Duration::from_millis(700)).await;
    assert!(late.is_none(), "sent after its expiry: {late:?}");
}
