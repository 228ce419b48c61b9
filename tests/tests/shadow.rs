//! Shadows through the real process and stock MQTT clients: offline replay to a plain `mosquitto_sub`,
//! deltas to an online device, and the device-side request topics (update, get, delete; named shadows).

use std::time::Duration;

use antumbra_e2e::{eventually, mosquitto, paho, paho_connected, sub, DeviceFiles, Server};
use serde_json::{json, Value};

// shadow-bench's lean MQTT client: it writes as fast as the socket takes bytes, which no stock client here does.
#[path = "../src/bench/client.rs"]
#[allow(dead_code)]
mod client;
#[path = "../src/bench/packet.rs"]
#[allow(dead_code)]
mod packet;

const TOKEN: &str = "shadow-e2e-admin-token-0123456789";

fn start(dir: &std::path::Path) -> Server {
    Server::start(
        &[
            "--data-dir",
            dir.join("data").to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
            "--mqtts",
            "127.0.0.1:0",
        ],
        &[("ANTUMBRA_ADMIN_TOKEN", TOKEN)],
    )
}

fn patch(server: &Server, id: &str, body: Value) -> Value {
    patch_query(server, id, "", body)
}

/// PATCH of `id`'s shadow with `query` after the path (e.g. `?name=cfg`); asserts 200.
fn patch_query(server: &Server, id: &str, query: &str, body: Value) -> Value {
    let res = reqwest::blocking::Client::new()
        .patch(format!("{}/v1/devices/{id}/shadow{query}", server.base))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json().unwrap()
}

/// Lines "topic payload" printed by mosquitto_sub -v, payloads parsed.
fn messages(out: &std::process::Output) -> Vec<(String, Value)> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(t, p)| (t.to_owned(), serde_json::from_str(p).unwrap_or(Value::Null)))
        .collect()
}

/// A paho `request`: subscribe to `reply`, publish `payload` on `topic`, collect `count` replies.
fn request(
    server: &Server,
    d: &DeviceFiles,
    topic: &str,
    payload: &str,
    reply: &str,
    count: usize,
) -> Vec<(String, Value)> {
    let count = count.to_string();
    let out = paho(
        server,
        d,
        "request",
        &[
            "--topic",
            topic,
            "--payload",
            payload,
            "--reply",
            reply,
            "--count",
            &count,
            "--qos",
            "1",
        ],
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "no reply on {reply}: {stdout}");
    stdout
        .lines()
        .skip(1)
        .filter_map(|l| {
            let (topic, rest) = l.split_once(' ')?;
            let (_retain, payload) = rest.split_once(' ')?;
            Some((
                topic.to_owned(),
                serde_json::from_str(payload).unwrap_or(Value::Null),
            ))
        })
        .collect()
}

#[test]
fn desired_state_set_while_offline_reaches_a_plain_mosquitto_sub_as_one_delta() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "label-1", dir.path());
    patch(
        &server,
        "label-1",
        json!({"state": {"reported": {"price": 199, "color": "white"}}}),
    );
    patch(&server, "label-1", json!({"state": {"desired": {"price": 249}}}));
    patch(
        &server,
        "label-1",
        json!({"state": {"desired": {"color": "red"}}}),
    );
    let last = patch(
        &server,
        "label-1",
        json!({"state": {"desired": {"price": 299, "blink": true}}}),
    );
    let version = last["version"].as_u64().unwrap();

    // No persistent session, no get: a plain subscription to the delta topic.
    let out =
        sub(&server, &d, "devices/label-1/shadow/update/delta", 2, 3, &[]).output(Duration::from_secs(20));
    let got = messages(&out);
    assert_eq!(
        got.len(),
        1,
        "several offline changes collapse into one delta: {got:?}"
    );
    let (topic, delta) = &got[0];
    assert_eq!(topic, "devices/label-1/shadow/update/delta");
    assert_eq!(
        delta["state"],
        json!({"price": 299, "color": "red", "blink": true}),
        "every pending field, latest values"
    );
    assert_eq!(delta["version"].as_u64(), Some(version), "the latest version");
    assert!(delta["metadata"]["price"]["timestamp"].is_i64());

    // MQTT 5 and a wildcard subscription replay too.
    let out = sub(&server, &d, "devices/label-1/#", 1, 3, &["-V", "mqttv5"]).output(Duration::from_secs(20));
    assert!(messages(&out)
        .iter()
        .any(|(t, m)| t.ends_with("/update/delta") && m["state"]["price"] == 299));
}

#[test]
fn named_shadows_replay_to_a_wildcard_subscription_too() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "label-2", dir.path());
    let named = |name: &str, body: Value| patch_query(&server, "label-2", &format!("?name={name}"), body);
    named("cfg", json!({"state": {"desired": {"interval": 30}}}));
    let cfg = named("cfg", json!({"state": {"desired": {"mode": "eco"}}}));
    named("leds", json!({"state": {"reported": {"on": false}}}));
    let leds = named("leds", json!({"state": {"desired": {"on": false}}}));
    assert!(leds["state"].get("delta").is_none(), "leds has nothing pending");
    patch(&server, "label-2", json!({"state": {"desired": {"price": 5}}}));

    // The SDK's filter: one delta per named shadow with something pending, none for the classic one.
    let out = sub(
        &server,
        &d,
        "devices/label-2/shadow/name/+/update/delta",
        2,
        3,
        &[],
    )
    .output(Duration::from_secs(20));
    let got = messages(&out);
    assert_eq!(got.len(), 1, "only cfg has a delta: {got:?}");
    assert_eq!(got[0].0, "devices/label-2/shadow/name/cfg/update/delta");
    assert_eq!(got[0].1["state"], json!({"interval": 30, "mode": "eco"}));
    assert_eq!(got[0].1["version"], cfg["version"]);

    // Everything under the device: the classic delta and the named one.
    let out = sub(&server, &d, "devices/label-2/#", 3, 3, &[]).output(Duration::from_secs(20));
    let mut topics: Vec<String> = messages(&out).into_iter().map(|(t, _)| t).collect();
    topics.sort();
    assert_eq!(
        topics,
        [
            "devices/label-2/shadow/name/cfg/update/delta",
            "devices/label-2/shadow/update/delta"
        ]
    );
}

#[test]
fn an_online_device_gets_the_delta_at_once_and_reporting_it_clears_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "purifier-1", dir.path());
    let mut listener = paho_connected(
        &server,
        &d,
        "subscribe",
        &[
            "--topic",
            "devices/purifier-1/shadow/update/delta",
            "--qos",
            "1",
            "--count",
            "1",
            "--timeout",
            "10",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    patch(&server, "purifier-1", json!({"state": {"desired": {"fan": 3}}}));
    let out = listener.output(Duration::from_secs(15));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("devices/purifier-1/shadow/update/delta") && stdout.contains("\"fan\":3"),
        "{stdout}"
    );

    // The device reports what it applied over MQTT: accepted, and the delta is gone.
    let replies = request(
        &server,
        &d,
        "devices/purifier-1/shadow/update",
        r#"{"state":{"reported":{"fan":3}},"clientToken":"r-1"}"#,
        "devices/purifier-1/shadow/update/accepted",
        1,
    );
    assert_eq!(replies[0].1["clientToken"], "r-1");
    assert_eq!(replies[0].1["state"]["reported"]["fan"], 3);
    let doc: Value = server.get_json(TOKEN, "/v1/devices/purifier-1/shadow");
    assert!(doc["state"].get("delta").is_none(), "{doc}");
    assert_eq!(doc["state"]["reported"]["fan"], 3);
}

/// A device whose requests arrive faster than its session answers them still gets answers while it keeps
/// sending. The session reads before it writes, and it used to write only once the device's socket ran dry: a
/// device streaming updates (or a machine too busy for its devices) got every reply at once, when it paused.
#[test]
fn a_device_streaming_updates_gets_replies_while_it_streams() {
    /// How long the device streams, and how fast: far above what one session answers (the updates of each read
    /// wait for their write to the store), so that its socket never runs dry.
    const STREAM_FOR: Duration = Duration::from_secs(6);
    const BURST: usize = 400;
    const EVERY: Duration = Duration::from_millis(10);
    /// How far behind the session must fall for the test to show anything.
    const BEHIND: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "streamer-1", dir.path());
    let (ca, cert, key) = d.pems();
    let tls = client::tls_config(&ca, &cert, &key).unwrap();
    let addr = server.mqtts_addr();
    let runtime = antumbra_e2e::runtime();
    let (sent, answered, first) = runtime.block_on(async {
        let (mut reader, mut writer) = client::connect(addr, tls, "streamer-1", 60).await.unwrap();
        client::subscribe(
            &mut reader,
            &mut writer,
            "devices/streamer-1/shadow/update/accepted",
            0,
        )
        .await
        .unwrap();
        let mut stream = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut seq = 0usize;
            while start.elapsed() < STREAM_FOR {
                for _ in 0..BURST {
                    seq += 1;
                    let request =
                        format!(r#"{{"state":{{"reported":{{"seq":{seq}}}}},"clientToken":"{seq}"}}"#);
                    packet::publish_payload(
                        &mut writer.buf,
                        "devices/streamer-1/shadow/update",
                        0,
                        0,
                        request.as_bytes(),
                    );
                }
                writer.send().await.unwrap();
                tokio::time::sleep(EVERY).await;
            }
            seq
        });
        // The replies that come while the device is still streaming.
        let mut answered = 0usize;
        let mut first = None;
        loop {
            tokio::select! {
                sent = &mut stream => return (sent.unwrap(), answered, first),
                packet = reader.next() => {
                    if let packet::Packet::Publish { topic, payload, .. } = packet.unwrap() {
                        if topic.ends_with(b"/update/accepted") {
                            answered += 1;
                            first.get_or_insert_with(|| serde_json::from_slice::<Value>(&payload).unwrap());
                        }
                    }
                }
            }
        }
    });
    assert!(
        answered > 0,
        "none of {sent} updates was answered while the device streamed them"
    );
    let first = first.unwrap();
    assert_eq!(first["clientToken"], "1", "{first}");
    // The session was behind (its socket did not run dry), or this shows nothing.
    assert!(
        answered + BEHIND < sent,
        "{answered} of {sent} updates answered while streaming: the session kept up"
    );
}

/// The next packet from the broker within `wait`.
async fn next_packet(reader: &mut client::Reader, wait: Duration) -> Option<packet::Packet> {
    let next = tokio::time::timeout(wait, reader.next()).await;
    next.ok().map(|p| p.unwrap())
}

/// A SUBSCRIBE or UNSUBSCRIBE read together with an update counts for that update's replies, as the broker
/// sees the packets in that order (the platform makes only the replies a device's filters take).
#[test]
fn subscriptions_read_with_an_update_count_for_its_replies() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "batch-1", dir.path());
    let (ca, cert, key) = d.pems();
    let tls = client::tls_config(&ca, &cert, &key).unwrap();
    let addr = server.mqtts_addr();
    let base = "devices/batch-1/shadow/update";
    let update = |t: u32| format!(r#"{{"state":{{"reported":{{"t":{t}}}}}}}"#);
    let seen = antumbra_e2e::runtime().block_on(async {
        let (mut reader, mut writer) = client::connect(addr, tls, "batch-1", 60).await.unwrap();
        // One write each, so that the session reads the packets together.
        packet::subscribe(&mut writer.buf, 1, &format!("{base}/documents"), 0);
        packet::publish_payload(&mut writer.buf, base, 0, 0, update(1).as_bytes());
        writer.send().await.unwrap();
        let mut seen = Vec::new();
        while let Some(packet) = next_packet(&mut reader, Duration::from_secs(5)).await {
            let done = matches!(&packet, packet::Packet::Publish { .. });
            seen.push(packet);
            if done {
                break;
            }
        }
        packet::unsubscribe(&mut writer.buf, 2, &format!("{base}/documents"));
        packet::subscribe(&mut writer.buf, 3, &format!("{base}/accepted"), 0);
        packet::publish_payload(&mut writer.buf, base, 0, 0, update(2).as_bytes());
        packet::publish_payload(&mut writer.buf, base, 0, 0, update(3).as_bytes());
        writer.send().await.unwrap();
        let mut accepted = 0;
        while let Some(packet) = next_packet(&mut reader, Duration::from_secs(5)).await {
            accepted += usize::from(matches!(&packet, packet::Packet::Publish { .. }));
            seen.push(packet);
            if accepted == 2 {
                break;
            }
        }
        // Time for a `documents` that should not come.
        seen.extend(next_packet(&mut reader, Duration::from_millis(500)).await);
        seen
    });
    let summary: Vec<String> = seen
        .iter()
        .map(|p| match p {
            packet::Packet::Publish { topic, payload, .. } => {
                let v: Value = serde_json::from_slice(payload).unwrap();
                let version = v["version"].as_u64().or(v["current"]["version"].as_u64());
                let suffix = String::from_utf8_lossy(topic)
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_owned();
                format!("{suffix} {}", version.unwrap())
            }
            packet::Packet::SubAck { packet_id, .. } => format!("suback {packet_id}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        summary,
        [
            "suback 1",
            "documents 1",
            "Other(11)",
            "suback 3",
            "accepted 2",
            "accepted 3"
        ]
    );
}

#[test]
fn device_requests_get_accepted_or_rejected_with_aws_codes() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "gw-9", dir.path());
    let base = "devices/gw-9/shadow";

    let r = request(
        &server,
        &d,
        &format!("{base}/get"),
        "",
        &format!("{base}/get/+"),
        1,
    );
    assert_eq!(r[0].0, format!("{base}/get/rejected"));
    assert_eq!(r[0].1["code"], 404);

    let r = request(
        &server,
        &d,
        &format!("{base}/update"),
        r#"{"state":{"reported":{"t":20}},"clientToken":"a"}"#,
        &format!("{base}/update/+"),
        2,
    );
    let topics: Vec<_> = r
        .iter()
        .map(|(t, _)| t.rsplit('/').next().unwrap().to_owned())
        .collect();
    assert!(
        topics.contains(&"accepted".to_owned()) && topics.contains(&"documents".to_owned()),
        "{topics:?}"
    );
    let documents = &r.iter().find(|(t, _)| t.ends_with("/documents")).unwrap().1;
    assert_eq!(documents["previous"], Value::Null);
    assert_eq!(documents["current"]["state"]["reported"]["t"], 20);
    assert_eq!(documents["current"]["version"], 1);

    for (payload, code, token) in [
        ("{not json", 400, None),
        (r#"{"state":{"reported":5},"clientToken":"b"}"#, 400, Some("b")),
        (
            r#"{"state":{"reported":{"t":1}},"version":7,"clientToken":"c"}"#,
            409,
            Some("c"),
        ),
        (r#"{"state":{"reported":{"a":[null]}}}"#, 400, None),
    ] {
        let r = request(
            &server,
            &d,
            &format!("{base}/update"),
            payload,
            &format!("{base}/update/rejected"),
            1,
        );
        assert_eq!(r[0].1["code"], code, "{payload}");
        assert!(r[0].1["message"].is_string());
        if let Some(token) = token {
            assert_eq!(r[0].1["clientToken"], token);
        }
        if code == 409 {
            assert_eq!(r[0].1["version"], 1, "a conflict names the current version");
        }
    }
    let doc: Value = server.get_json(TOKEN, "/v1/devices/gw-9/shadow");
    assert_eq!(
        (doc["version"].clone(), doc["state"]["reported"].clone()),
        (json!(1), json!({"t": 20})),
        "rejections change nothing"
    );

    let r = request(
        &server,
        &d,
        &format!("{base}/get"),
        r#"{"clientToken":"g"}"#,
        &format!("{base}/get/accepted"),
        1,
    );
    assert_eq!(
        (
            r[0].1["state"]["reported"]["t"].clone(),
            r[0].1["clientToken"].clone()
        ),
        (json!(20), json!("g"))
    );

    // Named shadow, then delete over MQTT.
    let r = request(
        &server,
        &d,
        &format!("{base}/name/cfg/update"),
        r#"{"state":{"reported":{"mode":"x"}}}"#,
        &format!("{base}/name/cfg/update/accepted"),
        1,
    );
    assert_eq!(r[0].1["version"], 1);
    let named: Value = server.get_json(TOKEN, "/v1/devices/gw-9/shadow?name=cfg");
    assert_eq!(named["state"]["reported"]["mode"], "x");
    let r = request(
        &server,
        &d,
        &format!("{base}/delete"),
        "",
        &format!("{base}/delete/accepted"),
        1,
    );
    assert_eq!(r[0].1["version"], 1);
    let gone = reqwest::blocking::Client::new()
        .get(format!("{}/v1/devices/gw-9/shadow", server.base))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    assert_eq!(gone.status(), 404);

    // mosquitto_rr, a stock request/response client, reads the named shadow.
    let out = mosquitto(
        "mosquitto_rr",
        &server,
        &d,
        &[
            "-i",
            "gw-9",
            "-t",
            &format!("{base}/name/cfg/get"),
            "-e",
            &format!("{base}/name/cfg/get/accepted"),
            "-m",
            "{}",
            "-W",
            "5",
        ],
    )
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("\"mode\":\"x\""),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Shadow messages go at QoS 1, as AWS IoT sends them, so each subscription gets them at the lower of 1 and its
/// own QoS (a plain `mosquitto_sub -q 0` at 0, `-q 2` at 1).
#[test]
fn shadow_messages_come_at_the_lower_of_qos_1_and_the_subscriptions() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "qos-lamp", dir.path());
    for (sub_qos, delivered) in [("0", "0"), ("1", "1"), ("2", "1")] {
        let mut listener = sub(
            &server,
            &d,
            "devices/qos-lamp/shadow/update/delta",
            1,
            15,
            &["-q", sub_qos, "-F", "%q %t %p"],
        );
        std::thread::sleep(Duration::from_millis(500));
        patch(
            &server,
            "qos-lamp",
            json!({"state": {"desired": {"level": sub_qos}}}),
        );
        let out = listener.output(Duration::from_secs(20));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "subscribed at {sub_qos}: {stdout}");
        assert!(
            stdout.starts_with(&format!("{delivered} devices/qos-lamp/shadow/update/delta ")),
            "subscribed at {sub_qos}, expected the delta at {delivered}: {stdout}"
        );
    }
}

/// The platform makes only the shadow messages the device's subscriptions take (only the device may subscribe to
/// its topics): subscribing or unsubscribing mid-session counts from the next update on, and a resumed persistent
/// session, whose subscriptions the broker restored without a SUBSCRIBE, still gets everything it subscribed to.
#[test]
fn shadow_replies_follow_the_devices_subscriptions_also_across_a_resumed_session() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "sub-lamp", dir.path());
    let base = "devices/sub-lamp/shadow";
    let update = |t: u32| format!(r#"{{"state":{{"reported":{{"t":{t}}}}}}}"#);
    let steps = [
        format!("sub {base}/update/accepted"),
        format!("pub {base}/update {}", update(1)),
        "wait 1".to_owned(),
        format!("sub {base}/update/documents"),
        format!("pub {base}/update {}", update(2)),
        "wait 3".to_owned(),
        format!("unsub {base}/update/accepted"),
        format!("pub {base}/update {}", update(3)),
        "wait 4".to_owned(),
        // Time for an `accepted` that should not come.
        "sleep 0.5".to_owned(),
    ];
    let mut args = Vec::new();
    for step in &steps {
        args.extend(["--step", step.as_str()]);
    }
    let out = paho(&server, &d, "steps", &args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let mut seen: Vec<(String, u64)> = stdout
        .lines()
        .filter_map(|l| {
            let (topic, rest) = l.split_once(' ')?;
            let (_retain, payload) = rest.split_once(' ')?;
            let v: Value = serde_json::from_str(payload).ok()?;
            let version = v["version"].as_u64().or(v["current"]["version"].as_u64())?;
            Some((topic.rsplit('/').next()?.to_owned(), version))
        })
        .collect();
    // The router keeps each filter's order, not the order across filters.
    seen.sort();
    let expected = [
        ("accepted", 1),
        ("accepted", 2),
        ("documents", 2),
        ("documents", 3),
    ];
    assert_eq!(seen, expected.map(|(t, v)| (t.to_owned(), v)), "{stdout}");

    // A persistent session subscribed to `documents` only, then resumed without subscribing again.
    let persist = |subscribe: bool, t: u32| {
        let payload = update(t);
        let topic = format!("{base}/update");
        let reply = format!("{base}/update/documents");
        let mut args = vec!["--clean-session", "0", "--topic", &topic, "--reply", &reply];
        args.extend(["--payload", &payload, "--timeout", "5"]);
        if subscribe {
            args.push("--subscribe");
        }
        let out = paho(&server, &d, "persist", &args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{stdout}");
        let present = stdout
            .lines()
            .find_map(|l| l.strip_prefix("session_present="))
            .unwrap_or_default()
            .to_owned();
        let last: Value =
            serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or(Value::Null);
        (present, last["current"]["version"].clone(), stdout)
    };
    let (present, version, stdout) = persist(true, 4);
    assert_eq!((present.as_str(), version), ("0", json!(4)), "{stdout}");
    let (present, version, stdout) = persist(false, 5);
    assert_eq!((present.as_str(), version), ("1", json!(5)), "{stdout}");
}

#[test]
fn a_device_cannot_touch_another_devices_shadow() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let a = server.register(TOKEN, "sh-a", dir.path());
    server.register(TOKEN, "sh-b", dir.path());
    patch(&server, "sh-b", json!({"state": {"desired": {"secret": 1}}}));
    let out = paho(
        &server,
        &a,
        "request",
        &[
            "--topic",
            "devices/sh-b/shadow/update",
            "--payload",
            r#"{"state":{"desired":{"secret":2}}}"#,
            "--reply",
            "devices/sh-a/shadow/update/+",
            "--timeout",
            "2",
        ],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let doc: Value = server.get_json(TOKEN, "/v1/devices/sh-b/shadow");
    assert_eq!(
        (doc["state"]["desired"]["secret"].clone(), doc["version"].clone()),
        (json!(1), json!(1))
    );
    assert!(eventually(Duration::from_secs(3), || server
        .metric("antumbra_mqtt_acl_violations_total")
        >= 1.0));
}

/// The embedded store answers an update only once it is in its file: PATCHes answered 200 from several
/// clients at once, then SIGKILL, then a restart on the same data directory shows every one of them.
#[test]
fn acknowledged_updates_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path());
    server.register(TOKEN, "durable-1", dir.path());
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let base = server.base.clone();
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::new();
                for i in 0..25 {
                    let res = http
                        .patch(format!("{base}/v1/devices/durable-1/shadow"))
                        .bearer_auth(TOKEN)
                        .json(&json!({"state": {"desired": {format!("t{t}_{i}"): i}}}))
                        .send()
                        .unwrap();
                    assert_eq!(res.status(), 200);
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    drop(server);

    let server = start(dir.path());
    let doc: Value = server.get_json(TOKEN, "/v1/devices/durable-1/shadow");
    assert_eq!(doc["version"], 100, "{doc}");
    assert_eq!(doc["state"]["desired"].as_object().unwrap().len(), 100);
}
