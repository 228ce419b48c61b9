//! Faults: Redis restarting mid-traffic, PostgreSQL going away and coming back, an instance killed with SIGKILL,
//! an instance stalled while Redis restarted and its device moved, a device leaving while Redis is away.

use std::time::Duration;

use antumbra_e2e::{eventually, paho_connected, pub_, runtime, DeviceFiles, Server};
use serde_json::{json, Value};

use super::servers::{PrivatePostgres, PrivateRedis};
use super::{api, cluster_on, readiness, sdk_device, status, TOKEN};

/// Reports `field_{i}` one by one for `duration`; returns the fields whose report was accepted.
async fn report_for(device: &antumbra_sdk::Device, duration: Duration, start: usize) -> Vec<String> {
    let shadow = device.shadow();
    let mut accepted = Vec::new();
    let deadline = tokio::time::Instant::now() + duration;
    let mut i = start;
    while tokio::time::Instant::now() < deadline {
        let field = format!("f{i}");
        if shadow.report(json!({ &field: i })).await.is_ok() {
            accepted.push(field);
        }
        i += 1;
    }
    accepted
}

/// Connects the device through `port` and starts it reporting for `duration` in the background.
fn connect_and_report(
    runtime: &tokio::runtime::Runtime,
    port: u16,
    d: &DeviceFiles,
    duration: Duration,
) -> (antumbra_sdk::Device, tokio::task::JoinHandle<Vec<String>>) {
    let device = runtime.block_on(async {
        let device = sdk_device(port, d);
        device.wait_connected(Duration::from_secs(10)).await.unwrap();
        device
    });
    let traffic = {
        let device = device.clone();
        runtime.spawn(async move { report_for(&device, duration, 0).await })
    };
    (device, traffic)
}

#[test]
fn a_redis_restart_mid_traffic_loses_no_accepted_update_and_readiness_follows_it() {
    let mut redis = PrivateRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("REDIS_URL", redis.url()),
        ("ANTUMBRA_ADMIN_TOKEN", TOKEN.to_owned()),
        ("RUST_LOG", "info,antumbra=debug".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start(
        &[
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
            "--mqtts",
            "127.0.0.1:0",
        ],
        &env,
    );
    let d = server.register(TOKEN, "busy-1", dir.path());
    let runtime = runtime();
    let (device, traffic) = connect_and_report(&runtime, server.mqtts_port, &d, Duration::from_secs(6));
    std::thread::sleep(Duration::from_secs(2));
    redis.kill();
    // Redis gone: readiness turns red and the REST shadow answers 503 with a code, quickly.
    let ready = reqwest::blocking::Client::new()
        .get(format!("{}/readyz", server.base))
        .send()
        .unwrap();
    assert_eq!(ready.status(), 503);
    let started = std::time::Instant::now();
    let res = reqwest::blocking::Client::new()
        .get(format!("{}/v1/devices/busy-1/shadow", server.base))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.json::<Value>().unwrap()["code"], "shadow_store_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "no hanging: {:?}",
        started.elapsed()
    );
    assert_eq!(
        server.metric("antumbra_mqtt_connections"),
        1.0,
        "MQTT connections stay up"
    );
    redis.spawn();
    let accepted = runtime.block_on(traffic).unwrap();
    assert!(!accepted.is_empty());
    assert!(eventually(Duration::from_secs(10), || reqwest::blocking::get(
        format!("{}/readyz", server.base)
    )
    .unwrap()
    .status()
        == 200));
    let doc: Value = server.get_json(TOKEN, "/v1/devices/busy-1/shadow");
    let reported = doc["state"]["reported"].as_object().unwrap();
    for field in &accepted {
        assert!(reported.contains_key(field), "accepted update {field} was lost");
    }
    // And it goes on after the restart.
    let more = runtime.block_on(async { report_for(&device, Duration::from_secs(15), 100_000).await });
    if more.is_empty() {
        let logs: Vec<String> = server.logs.try_iter().collect();
        panic!("updates resume once Redis is back; logs:\n{}", logs.join("\n"));
    }
    // A clean restart (SIGTERM, append-only file) keeps every accepted update too.
    redis.restart();
    assert!(eventually(Duration::from_secs(10), || reqwest::blocking::get(
        format!("{}/readyz", server.base)
    )
    .unwrap()
    .status()
        == 200));
    let doc: Value = server.get_json(TOKEN, "/v1/devices/busy-1/shadow");
    assert!(more
        .iter()
        .chain(&accepted)
        .all(|f| doc["state"]["reported"].get(f).is_some()));
}

#[test]
fn an_instance_killed_with_sigkill_loses_no_accepted_update() {
    let redis = PrivateRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let url = redis.url();
    let env = [("REDIS_URL", url.as_str()), ("ANTUMBRA_ADMIN_TOKEN", TOKEN)];
    let args = |http: &str, mqtts: &str| {
        vec![
            "--data-dir".to_owned(),
            dir.path().join("data").display().to_string(),
            "--http".into(),
            http.into(),
            "--mqtts".into(),
            mqtts.into(),
        ]
    };
    let first_args = args("127.0.0.1:0", "127.0.0.1:0");
    let first: Vec<&str> = first_args.iter().map(String::as_str).collect();
    let mut server = Server::start(&first, &env);
    let d = server.register(TOKEN, "crashy", dir.path());
    let (http, port) = (
        server.base.trim_start_matches("http://").to_owned(),
        server.mqtts_port,
    );
    let runtime = runtime();
    let (_device, traffic) = connect_and_report(&runtime, port, &d, Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(1500));
    server.child.kill().unwrap();
    let _ = server.child.wait();
    let accepted = runtime.block_on(traffic).unwrap();
    assert!(!accepted.is_empty());
    let again_args = args(&http, &format!("127.0.0.1:{port}"));
    let again: Vec<&str> = again_args.iter().map(String::as_str).collect();
    let server = Server::start(&again, &env);
    let doc: Value = server.get_json(TOKEN, "/v1/devices/crashy/shadow");
    let reported = doc["state"]["reported"].as_object().unwrap();
    for field in &accepted {
        assert!(reported.contains_key(field), "accepted update {field} was lost");
    }
}

#[test]
fn postgresql_going_away_turns_readiness_red_and_rest_to_503_while_mqtt_stays_up_and_then_all_resumes() {
    let pg = PrivatePostgres::start();
    let c = cluster_on(&pg.url());
    let dir = tempfile::tempdir().unwrap();
    let steady = c.a.register(TOKEN, "steady", dir.path());
    let late = c.a.register(TOKEN, "late", dir.path());
    let runtime = runtime();
    let device = runtime.block_on(async {
        let device = sdk_device(c.b.mqtts_port, &steady);
        device.wait_connected(Duration::from_secs(10)).await.unwrap();
        device
    });
    assert!(eventually(Duration::from_secs(5), || status(&c.a, "steady")
        ["online"]
        == true));
    let session = status(&c.b, "steady")["session"].as_u64().unwrap();
    let leaver_files = c.a.register(TOKEN, "leaver", dir.path());
    let leaver = runtime.block_on(async {
        let device = sdk_device(c.b.mqtts_port, &leaver_files);
        device.wait_connected(Duration::from_secs(10)).await.unwrap();
        device
    });
    let stored_online = |id: &str| -> String {
        let out = std::process::Command::new("psql")
            .args([pg.url().as_str(), "-tAc"])
            .arg(format!(
                "SELECT online FROM device_presence WHERE device_id = '{id}'"
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(eventually(Duration::from_secs(10), || stored_online("leaver") == "1"));

    pg.stop();

    for server in [&c.a, &c.b] {
        assert!(
            eventually(Duration::from_secs(10), || readiness(server) != 200),
            "readiness turns red"
        );
    }
    // REST calls that need the database answer 503 with a code, in seconds rather than hanging.
    let calls = [
        (reqwest::Method::GET, "/v1/devices", None),
        (reqwest::Method::GET, "/v1/devices/steady/status", None),
        (
            reqwest::Method::POST,
            "/v1/devices",
            Some(json!({"id": "during"})),
        ),
        (reqwest::Method::GET, "/v1/devices/steady/shadow", None),
    ];
    for (method, path, body) in calls {
        for server in [&c.a, &c.b] {
            let (code, body, took) = api(server, method.clone(), path, body.clone());
            assert_eq!(code, 503, "{method} {path}: {body}");
            assert_eq!(body["code"], "database_unavailable", "{method} {path}: {body}");
            assert!(took < Duration::from_secs(10), "{method} {path} took {took:?}");
        }
    }
    // The MQTT session stays up, and its shadow (in Redis) keeps working.
    assert_eq!(
        c.b.metric("antumbra_mqtt_connections"),
        2.0,
        "steady and leaver stay connected"
    );
    runtime
        .block_on(device.shadow().report(json!({"during_outage": true})))
        .expect("a connected device reports while the database is away");
    // A new CONNECT cannot be checked against the registry: it is refused promptly, not left hanging.
    let started = std::time::Instant::now();
    let out = pub_(&c.b, &late, "late", "devices/late/hello", "1", &[]);
    assert!(
        !out.status.success(),
        "a CONNECT is refused while the registry is away"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "refused in {:?}",
        started.elapsed()
    );
    assert!(c.b.metric("antumbra_mqtt_auth_failures_total{reason=\"registry_unavailable\"}") >= 1.0);
    // A device leaves while the database is away: its presence is written once the database is back.
    runtime.block_on(leaver.disconnect());
    drop(leaver);

    pg.start_server();

    for server in [&c.a, &c.b] {
        assert!(
            eventually(Duration::from_secs(30), || readiness(server) == 200),
            "readiness turns green again"
        );
    }
    assert!(
        eventually(Duration::from_secs(15), || stored_online("leaver") == "0"),
        "the departure during the outage is stored afterwards"
    );
    let after = c.a.register(TOKEN, "after", dir.path());
    let out = pub_(&c.b, &after, "after", "devices/after/hello", "1", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = pub_(&c.b, &late, "late", "devices/late/hello", "1", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The session that was up all along is still the same one, and a change made on A reaches it on B.
    let s = status(&c.a, "steady");
    assert_eq!(s["online"], true, "{s}");
    assert_eq!(s["session"].as_u64(), Some(session), "never dropped: {s}");
    let mut deltas = device.shadow().deltas();
    let (code, body, _) = api(
        &c.a,
        reqwest::Method::PATCH,
        "/v1/devices/steady/shadow",
        Some(json!({"state": {"desired": {"mode": "eco"}}})),
    );
    assert_eq!(code, 200, "{body}");
    let delta = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), deltas.next()).await })
        .expect("the delta arrives")
        .expect("the delta stream is open");
    assert_eq!(delta.state["mode"], "eco", "{:?}", delta.state);
    let doc = c.a.get_json(TOKEN, "/v1/devices/steady/shadow");
    assert_eq!(doc["state"]["reported"]["during_outage"], true, "{doc}");
}

/// An instance stalled while Redis restarted misses everything said on Redis meanwhile, here that its device
/// moved to the other instance. When it resumes it finds itself out of the cluster (taken for dead), sees the
/// newer session on record and closes its stale session instead of announcing it; the device's session on the
/// other instance is left alone.
/// Two instances on a database of their own and the private `redis`, their data under `dir`.
fn pair_on(redis: &PrivateRedis, dir: &std::path::Path) -> (Server, Server) {
    let (db, redis_url) = (super::test_database(), redis.url());
    let env = [
        ("DATABASE_URL", db.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("ANTUMBRA_ADMIN_TOKEN", TOKEN),
    ];
    (
        super::instance(dir, "a", &env, &[]),
        super::instance(dir, "b", &env, &[]),
    )
}

#[test]
fn an_instance_that_missed_a_move_while_cut_off_closes_its_stale_session() {
    let mut redis = PrivateRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair_on(&redis, dir.path());
    let d = a.register(TOKEN, "valve-2", dir.path());
    let _stale = paho_connected(&b, &d, "silent", &["--keepalive", "120"]);
    assert!(eventually(Duration::from_secs(5), || status(&a, "valve-2")
        ["online"]
        == true));
    let first = status(&b, "valve-2")["session"].as_u64().unwrap();

    b.signal("STOP");
    redis.restart();
    // The device reconnects through the load balancer and lands on A; B, stalled and cut off, misses it.
    let _moved = paho_connected(&a, &d, "hold", &[]);
    let moved = status(&a, "valve-2")["session"].as_u64().unwrap();
    assert!(moved > first, "{moved} > {first}");
    assert!(
        a.wait_for_log("an instance stopped beating", Duration::from_secs(40)),
        "A takes B for dead once its heartbeat lapses"
    );

    b.signal("CONT");
    assert!(
        b.wait_for_log("sessions announced to the cluster again", Duration::from_secs(30)),
        "B finds itself out of the cluster and joins again"
    );
    const TAKEOVERS: &str = "antumbra_mqtt_disconnects_total{reason=\"takeover\"}";
    assert!(
        eventually(Duration::from_secs(10), || b.metric(TAKEOVERS) == 1.0
            && b.metric("antumbra_mqtt_connections") == 0.0),
        "B closed its stale socket as a takeover"
    );
    for (name, server) in [("A", &a), ("B", &b)] {
        let s = status(server, "valve-2");
        assert_eq!(
            (s["online"].as_bool(), s["session"].as_u64()),
            (Some(true), Some(moved)),
            "{name} shows the device online in its newer session: {s}"
        );
    }
    assert_eq!(a.metric(TAKEOVERS), 0.0, "A's session was left alone");
    assert_eq!(a.metric("antumbra_mqtt_connections"), 1.0);
}

/// A device leaves B while Redis is away: B could not say so, and A could not have heard it. Once Redis is back,
/// A catches up (from the database, and from B's event, which waited): the device is offline on A too, and A's
/// event stream says so once.
#[test]
fn a_device_that_left_while_redis_was_away_is_offline_everywhere_once_it_is_back() {
    let mut redis = PrivateRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair_on(&redis, dir.path());
    let d = a.register(TOKEN, "tap-4", dir.path());
    let mut device = paho_connected(&b, &d, "hold", &[]);
    assert!(eventually(Duration::from_secs(5), || status(&a, "tap-4")
        ["online"]
        == true));
    let session = status(&b, "tap-4")["session"].clone();

    redis.kill();
    device.kill();
    assert!(eventually(Duration::from_secs(10), || status(&b, "tap-4")
        ["online"]
        == false));
    assert_eq!(status(&a, "tap-4")["online"], true, "A cannot know yet");
    // A stream opened now on A, while Redis is still away.
    let events = a.events(TOKEN, "?device_id=tap-4");
    redis.spawn();

    let gone = super::next_event(&events, Duration::from_secs(20), |e| {
        e["type"] == "device.disconnected"
    });
    assert_eq!(gone["session"], session, "{gone}");
    assert_eq!(gone["online"], false, "{gone}");
    let s = status(&a, "tap-4");
    assert_eq!((&s["online"], &s["session"]), (&json!(false), &session), "{s}");
    // B's own event, which waited for Redis, arrives too (within a beat) and is not shown again.
    let mut again = Vec::new();
    while let Ok(event) = events.recv_timeout(Duration::from_secs(7)) {
        again.push(event);
    }
    assert!(
        again.iter().all(|e| e["type"] != "device.disconnected"),
        "the disconnect shown twice: {again:?}"
    );
}
