//! Subscription options the router applies (`vendor/rumqttd/ANTUMBRA.md`, item 15): MQTT 5 No Local, and a
//! second SUBSCRIBE to a filter replacing the subscription. Driven through the real router with local links, as
//! the sessions attach to it.

use std::time::Duration;

use rumqttd::local::LinkTx;
use rumqttd::protocol::{Packet, Publish, QoS};

use super::router_logs::{next_forward, router_with, subscribe_to, subscribe_with};

/// How long a message that should not come is waited for.
const NOTHING_FOR: Duration = Duration::from_millis(300);

async fn publish(tx: &mut LinkTx, topic: &str, payload: &str, retain: bool) {
    let publish = Publish::new(topic.to_owned(), payload.to_owned(), retain);
    tx.send(Packet::Publish(publish, None)).await.unwrap();
}

fn payload(publish: &Publish) -> String {
    String::from_utf8_lossy(&publish.payload).into_owned()
}

/// The QoS a publish is forwarded at, from its fixed header.
fn qos(publish: &Publish) -> u8 {
    (publish.serialize()[0] >> 1) & 0b11
}

#[tokio::test]
async fn no_local_skips_only_what_the_client_itself_published() {
    let mut links = router_with(&["platform", "dev-a", "dev-b"]).await;
    let (mut tx_b, mut rx_b) = links.pop().unwrap();
    let (mut tx, mut rx) = links.pop().unwrap();
    let (mut platform, _platform_rx) = links.pop().unwrap();
    publish(&mut tx, "devices/dev-a/state", "own-retained", true).await;
    subscribe_with(&mut tx, &mut rx, "devices/dev-a/#", QoS::AtLeastOnce, true).await;

    publish(&mut tx, "devices/dev-a/echo", "own", false).await;
    // The platform's reply on the device's own link (as a session relays shadow replies) is not the device's.
    let reply =
        Publish::new("devices/dev-a/shadow/update/accepted", "reply", false).from_platform(QoS::AtLeastOnce);
    tx.send(Packet::Publish(reply, None)).await.unwrap();
    publish(&mut platform, "devices/dev-a/echo", "platform", false).await;
    let mut got = Vec::new();
    while let Some(p) = next_forward(&mut rx, NOTHING_FOR).await {
        got.push(payload(&p));
    }
    assert_eq!(
        got,
        ["reply", "platform"],
        "neither the retained message nor the echo is the client's to get"
    );

    // Another client's No Local subscription gets what dev-a published, retained message included.
    subscribe_with(&mut tx_b, &mut rx_b, "devices/dev-a/state", QoS::AtMostOnce, true).await;
    let retained = next_forward(&mut rx_b, Duration::from_secs(5))
        .await
        .expect("retained");
    assert_eq!(payload(&retained), "own-retained");

    // SUBSCRIBE again without No Local: it replaces the subscription, so dev-a's own messages come back, the
    // retained one first (sent again for the new SUBSCRIBE).
    subscribe_with(&mut tx, &mut rx, "devices/dev-a/#", QoS::AtLeastOnce, false).await;
    publish(&mut tx, "devices/dev-a/echo", "own-again", false).await;
    let mut again = Vec::new();
    while let Some(p) = next_forward(&mut rx, NOTHING_FOR).await {
        again.push(payload(&p));
    }
    assert_eq!(again, ["own-retained", "own-again"]);
}

#[tokio::test]
async fn a_second_subscribe_to_a_filter_replaces_its_qos() {
    let mut links = router_with(&["platform", "dev-q"]).await;
    let (mut tx, mut rx) = links.pop().unwrap();
    let (mut platform, _platform_rx) = links.pop().unwrap();
    let send = |qos| Publish::new("devices/dev-q/cmd", "x", false).from_platform(qos);
    subscribe_with(&mut tx, &mut rx, "devices/dev-q/cmd", QoS::AtMostOnce, false).await;
    platform
        .send(Packet::Publish(send(QoS::AtLeastOnce), None))
        .await
        .unwrap();
    let first = next_forward(&mut rx, Duration::from_secs(5))
        .await
        .expect("first");
    assert_eq!(qos(&first), 0);

    subscribe_with(&mut tx, &mut rx, "devices/dev-q/cmd", QoS::AtLeastOnce, false).await;
    platform
        .send(Packet::Publish(send(QoS::AtLeastOnce), None))
        .await
        .unwrap();
    let second = next_forward(&mut rx, Duration::from_secs(5))
        .await
        .expect("second");
    assert_eq!(qos(&second), 1);
    assert!(
        next_forward(&mut rx, NOTHING_FOR).await.is_none(),
        "one subscription, one delivery"
    );
}

/// The next acknowledgement the router sends `rx` within `wait`, as a packet.
async fn next_ack(rx: &mut rumqttd::local::LinkRx, wait: Duration) -> Option<Packet> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, rx.next()).await {
            Ok(Ok(Some(rumqttd::Notification::DeviceAck(ack)))) => return Some(Packet::from(ack)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("link closed: {e:?}"),
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn every_unsubscribe_gets_one_unsuback_with_a_reason_per_filter() {
    use rumqttd::protocol::{UnsubAckReason, Unsubscribe};

    let (mut tx, mut rx) = router_with(&["dev-u"]).await.pop().unwrap();
    subscribe_with(&mut tx, &mut rx, "devices/dev-u/a", QoS::AtLeastOnce, false).await;
    subscribe_with(&mut tx, &mut rx, "devices/dev-u/b", QoS::AtLeastOnce, false).await;
    let unsubscribe = |pkid, filters: &[&str]| {
        let filters = filters.iter().map(|f| (*f).to_owned()).collect();
        Packet::Unsubscribe(Unsubscribe { pkid, filters }, None)
    };

    let filters = ["devices/dev-u/a", "devices/dev-u/none", "devices/dev-u/b"];
    tx.send(unsubscribe(7, &filters)).await.unwrap();
    match next_ack(&mut rx, Duration::from_secs(5)).await {
        Some(Packet::UnsubAck(ack, _)) => {
            assert_eq!(ack.pkid, 7);
            assert_eq!(
                ack.reasons,
                [
                    UnsubAckReason::Success,
                    UnsubAckReason::NoSubscriptionExisted,
                    UnsubAckReason::Success
                ]
            );
        }
        other => panic!("no UNSUBACK: {other:?}"),
    }
    assert!(
        next_ack(&mut rx, NOTHING_FOR).await.is_none(),
        "one UNSUBACK per UNSUBSCRIBE"
    );

    // Nothing subscribed any more: still acknowledged.
    tx.send(unsubscribe(8, &["devices/dev-u/a"])).await.unwrap();
    match next_ack(&mut rx, Duration::from_secs(5)).await {
        Some(Packet::UnsubAck(ack, _)) => {
            assert_eq!(
                (ack.pkid, ack.reasons),
                (8, vec![UnsubAckReason::NoSubscriptionExisted])
            )
        }
        other => panic!("no UNSUBACK: {other:?}"),
    }
}

/// A No Local reader whose whole read is its own messages goes on reading: the other messages after them are
/// delivered without waiting for another publish.
#[tokio::test]
async fn no_local_reads_past_a_long_run_of_the_clients_own_messages() {
    let (mut tx, mut rx) = router_with(&["dev-n"]).await.pop().unwrap();
    subscribe_with(&mut tx, &mut rx, "devices/dev-n/#", QoS::AtLeastOnce, true).await;
    // More of its own than one read takes (the in-flight window, 100), then the platform's, in one batch.
    let mut packets: Vec<Packet> = (0..150)
        .map(|i| {
            Packet::Publish(
                Publish::new("devices/dev-n/echo".to_owned(), i.to_string(), false),
                None,
            )
        })
        .collect();
    let reply =
        Publish::new("devices/dev-n/shadow/update/accepted", "reply", false).from_platform(QoS::AtLeastOnce);
    packets.push(Packet::Publish(reply, None));
    assert!(super::forward(&mut tx, packets));
    let got = next_forward(&mut rx, Duration::from_secs(5))
        .await
        .expect("the platform's reply");
    assert_eq!(payload(&got), "reply");
}

/// An UNSUBSCRIBE in the same batch as a publish that woke the subscription ends it all the same: nothing
/// published after it comes, and subscribing again gives one subscription, not two.
#[tokio::test]
async fn an_unsubscribe_ends_a_subscription_its_batch_just_woke() {
    use rumqttd::protocol::Unsubscribe;

    let mut links = router_with(&["platform", "dev-w"]).await;
    let (mut tx, mut rx) = links.pop().unwrap();
    let (mut platform, _platform_rx) = links.pop().unwrap();
    let filter = "devices/dev-w/cmd";
    subscribe_with(&mut tx, &mut rx, filter, QoS::AtMostOnce, false).await;
    let unsubscribe = Unsubscribe {
        pkid: 9,
        filters: vec![filter.to_owned()],
    };
    let batch = vec![
        Packet::Publish(Publish::new(filter, "before", false), None),
        Packet::Unsubscribe(unsubscribe, None),
    ];
    assert!(super::forward(&mut tx, batch));
    // "before" may come or not (it was published before the UNSUBSCRIBE); nothing after it may.
    while next_forward(&mut rx, NOTHING_FOR).await.is_some() {}
    publish(&mut platform, filter, "after", false).await;
    assert!(
        next_forward(&mut rx, NOTHING_FOR).await.is_none(),
        "delivered after the UNSUBACK"
    );

    subscribe_with(&mut tx, &mut rx, filter, QoS::AtMostOnce, false).await;
    publish(&mut platform, filter, "again", false).await;
    let again = next_forward(&mut rx, Duration::from_secs(5))
        .await
        .expect("again");
    assert_eq!(payload(&again), "again");
    assert!(
        next_forward(&mut rx, NOTHING_FOR).await.is_none(),
        "one subscription, one delivery"
    );
}

/// The RETAIN flag of a forwarded publish.
fn retained(publish: &Publish) -> bool {
    publish.serialize()[0] & 1 == 1
}

fn options(
    path: &str,
    preserve_retain: bool,
    rule: rumqttd::protocol::RetainForwardRule,
) -> rumqttd::protocol::Filter {
    rumqttd::protocol::Filter {
        path: path.to_owned(),
        qos: QoS::AtMostOnce,
        nolocal: false,
        preserve_retain,
        retain_forward_rule: rule,
    }
}

/// MQTT 5 Retain As Published: a live message keeps the RETAIN flag it was published with only for a
/// subscription that asks; retained messages sent for a subscription always have it.
#[tokio::test]
async fn retain_as_published_keeps_the_flag_of_live_messages() {
    use rumqttd::protocol::RetainForwardRule::OnEverySubscribe;

    let mut links = router_with(&["platform", "dev-r", "dev-s"]).await;
    let (mut plain_tx, mut plain_rx) = links.pop().unwrap();
    let (mut rap_tx, mut rap_rx) = links.pop().unwrap();
    let (mut platform, _platform_rx) = links.pop().unwrap();
    publish(&mut platform, "devices/dev-r/state", "old", true).await;
    subscribe_to(
        &mut rap_tx,
        &mut rap_rx,
        options("devices/dev-r/#", true, OnEverySubscribe),
    )
    .await;
    subscribe_to(
        &mut plain_tx,
        &mut plain_rx,
        options("devices/dev-r/#", false, OnEverySubscribe),
    )
    .await;
    for rx in [&mut rap_rx, &mut plain_rx] {
        let sent = next_forward(rx, Duration::from_secs(5)).await.expect("retained");
        assert_eq!((payload(&sent), retained(&sent)), ("old".to_owned(), true));
    }
    publish(&mut platform, "devices/dev-r/state", "new", true).await;
    publish(&mut platform, "devices/dev-r/event", "plain", false).await;
    let mut flags = Vec::new();
    for rx in [&mut rap_rx, &mut plain_rx] {
        for _ in 0..2 {
            let p = next_forward(rx, Duration::from_secs(5)).await.expect("live");
            flags.push((payload(&p), retained(&p)));
        }
    }
    let expected = [("new", true), ("plain", false), ("new", false), ("plain", false)];
    assert_eq!(flags, expected.map(|(p, r)| (p.to_owned(), r)));
}

/// MQTT 5 Retain Handling (and MQTT 3.1.1's rule): retained messages are sent on every SUBSCRIBE (0), only
/// for a new subscription (1), or never (2).
#[tokio::test]
async fn retain_handling_decides_when_retained_messages_are_sent() {
    use rumqttd::protocol::RetainForwardRule::{Never, OnEverySubscribe, OnNewSubscribe};

    let mut links = router_with(&["platform", "dev-h"]).await;
    let (mut tx, mut rx) = links.pop().unwrap();
    let (mut platform, _platform_rx) = links.pop().unwrap();
    let filter = "devices/dev-h/state";
    publish(&mut platform, filter, "kept", true).await;
    let mut got = Vec::new();
    for rule in [
        Never,
        OnNewSubscribe,
        OnNewSubscribe,
        OnEverySubscribe,
        OnEverySubscribe,
    ] {
        // Never on a new subscription, then the same filter subscribed again with each rule.
        subscribe_to(&mut tx, &mut rx, options(filter, false, rule.clone())).await;
        let sent = next_forward(&mut rx, NOTHING_FOR).await.map(|p| payload(&p));
        got.push((format!("{rule:?}"), sent));
        if matches!(rule, Never) {
            // Start again with no subscription, so the next one is new.
            let unsubscribe = rumqttd::protocol::Unsubscribe {
                pkid: 5,
                filters: vec![filter.to_owned()],
            };
            tx.send(Packet::Unsubscribe(unsubscribe, None)).await.unwrap();
        }
    }
    let kept = Some("kept".to_owned());
    let expected = [
        ("Never", None),
        ("OnNewSubscribe", kept.clone()),
        ("OnNewSubscribe", None),
        ("OnEverySubscribe", kept.clone()),
        ("OnEverySubscribe", kept),
    ];
    assert_eq!(got, expected.map(|(r, p)| (r.to_owned(), p)));
}

/// More retained messages than one in-flight window (100 at QoS 1) all reach a new QoS 1 subscription, in rounds
/// as it acknowledges those above QoS 0 (upstream sent what fit and dropped the rest), whether they were
/// published at QoS 1 (each takes a slot) or at QoS 0 (none does: nothing to wait for).
#[tokio::test]
async fn every_retained_message_reaches_a_subscription_whatever_the_window() {
    use rumqttd::protocol::{PubAck, PubAckReason};

    for published_at in [QoS::AtLeastOnce, QoS::AtMostOnce] {
        let mut links = router_with(&["platform", "dev-m"]).await;
        let (mut tx, mut rx) = links.pop().unwrap();
        let (mut platform, _platform_rx) = links.pop().unwrap();
        const RETAINED: usize = 150;
        for i in 0..RETAINED {
            let topic = format!("devices/dev-m/state/{i}");
            let publish = Publish::new(topic, i.to_string(), true);
            let publish = match published_at {
                QoS::AtMostOnce => publish,
                qos => publish.from_platform(qos),
            };
            platform.send(Packet::Publish(publish, None)).await.unwrap();
        }
        subscribe_with(&mut tx, &mut rx, "devices/dev-m/#", QoS::AtLeastOnce, false).await;
        let mut got = std::collections::BTreeSet::new();
        while let Some(publish) = next_forward(&mut rx, Duration::from_secs(2)).await {
            got.insert(payload(&publish));
            if qos(&publish) == 0 {
                continue;
            }
            // Acknowledged as received, as a device does: the window frees up for the rest.
            let wire = publish.serialize();
            let pkid = u16::from_be_bytes([wire[1], wire[2]]);
            let ack = PubAck {
                pkid,
                reason: PubAckReason::Success,
            };
            tx.send(Packet::PubAck(ack, None)).await.unwrap();
        }
        assert_eq!(got.len(), RETAINED, "published at {published_at:?}");
    }
}

/// A retained message with an MQTT 5 Message Expiry Interval reaches each subscription with what is left of the
/// interval, however often it was read before (rumqttd took the time waited off the stored interval at every read,
/// so it expired early).
#[tokio::test]
async fn a_retained_messages_expiry_counts_the_time_waited_once() {
    use rumqttd::protocol::{PublishProperties, RetainForwardRule::OnEverySubscribe};

    let mut links = router_with(&["platform", "dev-e"]).await;
    let (mut tx, mut rx) = links.pop().unwrap();
    let (mut platform, _platform_rx) = links.pop().unwrap();
    let filter = "devices/dev-e/state";
    let properties = PublishProperties {
        message_expiry_interval: Some(60),
        ..Default::default()
    };
    let publish = Publish::new(filter, "lamp-on", true);
    let published = std::time::Instant::now();
    platform
        .send(Packet::Publish(publish, Some(properties)))
        .await
        .unwrap();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        // Each SUBSCRIBE (Retain Handling 0) sends the retained message again.
        subscribe_to(&mut tx, &mut rx, options(filter, false, OnEverySubscribe)).await;
        let forward = loop {
            match tokio::time::timeout(Duration::from_secs(5), rx.next()).await {
                Ok(Ok(Some(rumqttd::Notification::Forward(forward)))) => break forward,
                Ok(Ok(_)) => {}
                other => panic!("no retained message: {other:?}"),
            }
        };
        let left = forward.properties.and_then(|p| p.message_expiry_interval);
        let waited = published.elapsed().as_secs_f64();
        // Whole seconds are counted: what is left is 60 less the time waited, give or take a second.
        let off = f64::from(left.expect("an expiry interval")) - (60.0 - waited);
        assert!(off.abs() <= 1.0, "{left:?} s left after {waited:.1} s");
    }
}
