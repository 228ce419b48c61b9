//! The embedded broker through clients we did not write: mosquitto_pub / mosquitto_sub and Eclipse Paho
//! (Python), over mutual TLS with certificates issued by the REST API of a real `antumbra` process.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use antumbra_e2e::{eventually, paho, paho_connected, pub_, sub, DeviceFiles, Proc, Server};
use serde_json::Value;

const TOKEN: &str = "mqtt-e2e-admin-token-0123456789";

// shadow-bench's lean MQTT client: it can write without ever reading, which no stock client here does.
#[path = "../src/bench/client.rs"]
#[allow(dead_code)]
mod client;
#[path = "../src/bench/packet.rs"]
#[allow(dead_code)]
mod packet;

fn start(dir: &Path) -> Server {
    start_with(dir, &[])
}

/// A server on free loopback ports, data in `dir/data`, with `extra` arguments.
fn start_with(dir: &Path, extra: &[&str]) -> Server {
    Server::start_in(&dir.join("data"), extra, &[("ANTUMBRA_ADMIN_TOKEN", TOKEN)])
}

fn status(server: &Server, id: &str) -> Value {
    server.get_json(TOKEN, &format!("/v1/devices/{id}/status"))
}

fn finish(mut child: Proc) -> Output {
    child.output(Duration::from_secs(20))
}

/// Every pair of publish and subscription QoS, on both protocol versions: each message comes back once, at the
/// lower of the two (MQTT 3.1.1 and 5, §3.8.4), as Mosquitto delivers it.
#[test]
fn devices_round_trip_their_own_topics_at_every_qos_on_both_protocol_versions() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "sensor-1", dir.path());
    for version in [None, Some("--v5")] {
        for sub_qos in ["0", "1", "2"] {
            for pub_qos in ["0", "1", "2"] {
                let topic = format!("devices/sensor-1/loop/s{sub_qos}p{pub_qos}");
                let mut args = vec![
                    "--topic",
                    topic.as_str(),
                    "--qos",
                    sub_qos,
                    "--pub-qos",
                    pub_qos,
                    "--count",
                    "10",
                    "--payload",
                    "m",
                ];
                args.extend(version);
                let out = paho(&server, &d, "loopback", &args).output().unwrap();
                let stdout = String::from_utf8_lossy(&out.stdout);
                let what = format!("{version:?} subscribed at {sub_qos}, published at {pub_qos}");
                assert!(
                    out.status.success(),
                    "{what}: {stdout} {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let delivered = sub_qos.min(pub_qos);
                assert!(
                    stdout.contains(&format!("ok qos=[{delivered}]")),
                    "{what}: delivered at {delivered} expected: {stdout}"
                );
            }
        }
    }
}

#[test]
fn retained_messages_reach_a_later_mosquitto_subscriber_on_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "lamp-7", dir.path());
    for version in ["mqttv311", "mqttv5"] {
        let topic = format!("devices/lamp-7/state/{version}");
        let out = pub_(
            &server,
            &d,
            "lamp-7",
            &topic,
            "on",
            &["-r", "-q", "1", "-V", version],
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let out = finish(sub(&server, &d, &topic, 1, 5, &["-V", version]));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(&format!("{topic} on")), "{version}: {stdout}");
    }
}

#[test]
fn other_devices_topics_and_wildcards_disconnect_the_device_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let a = server.register(TOKEN, "dev-a", dir.path());
    let b = server.register(TOKEN, "dev-b", dir.path());

    // B listens on its own topic for anything A might sneak in.
    let b_listens = paho_connected(
        &server,
        &b,
        "subscribe",
        &["--topic", "devices/dev-b/#", "--qos", "1", "--timeout", "6"],
    );

    for filter in ["devices/dev-b/#", "#", "+/dev-b/x", "devices/+/cmd", "$SYS/#"] {
        let before = server.metric("antumbra_mqtt_acl_violations_total");
        let session = status(&server, "dev-a")["session"].as_u64().unwrap_or(0);
        let child = sub(&server, &a, filter, 1, 2, &[]);
        // Read while mosquitto_sub runs: it reconnects about a second after being dropped, and its last
        // session may end by its own timeout instead.
        assert!(
            eventually(Duration::from_secs(5), || {
                let s = status(&server, "dev-a");
                s["session"].as_u64().unwrap_or(0) > session && s["last_disconnect_reason"] == "acl_violation"
            }),
            "{filter}: not dropped for an ACL violation: {}",
            status(&server, "dev-a")
        );
        let out = finish(child);
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("devices/dev-b"),
            "{filter} leaked"
        );
        assert!(
            server.metric("antumbra_mqtt_acl_violations_total") > before,
            "{filter} was not counted"
        );
    }
    let before = server.metric("antumbra_mqtt_acl_violations_total");
    let out = pub_(&server, &a, "dev-a", "devices/dev-b/cmd", "evil", &["-q", "1"]);
    assert!(
        !out.status.success(),
        "the publish outside its topics is not acknowledged"
    );
    assert!(server.metric("antumbra_mqtt_acl_violations_total") > before);
    let out = finish(b_listens);
    assert_eq!(
        out.status.code(),
        Some(3),
        "B received nothing: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn wrong_client_id_foreign_ca_expired_and_revoked_certificates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "gate-1", dir.path());
    let ok = pub_(&server, &d, "gate-1", "devices/gate-1/hello", "x", &[]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));

    let wrong_id = pub_(&server, &d, "gate-2", "devices/gate-1/hello", "x", &[]);
    assert!(!wrong_id.status.success());
    assert!(
        String::from_utf8_lossy(&wrong_id.stderr).contains("identifier rejected"),
        "{}",
        String::from_utf8_lossy(&wrong_id.stderr)
    );
    let wrong_id_v5 = pub_(
        &server,
        &d,
        "gate-2",
        "devices/gate-1/hello",
        "x",
        &["-V", "mqttv5"],
    );
    assert!(!wrong_id_v5.status.success());
    assert!(server.metric("antumbra_mqtt_auth_failures_total{reason=\"client_id_mismatch\"}") >= 2.0);

    // A certificate for the same device id from another CA.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    openssl(
        &foreign,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "30",
            "-subj",
            "/CN=Foreign CA",
        ],
    );
    openssl(
        &foreign,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "dev.key",
            "-out",
            "dev.csr",
            "-subj",
            "/CN=gate-1",
        ],
    );
    openssl(
        &foreign,
        &[
            "x509",
            "-req",
            "-in",
            "dev.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-out",
            "dev.crt",
        ],
    );
    let forged = DeviceFiles {
        cert: foreign.join("dev.crt"),
        key: foreign.join("dev.key"),
        ..clone_files(&d)
    };
    let before = server.metric("antumbra_mqtt_auth_failures_total{reason=\"tls_handshake\"}");
    let out = pub_(&server, &forged, "gate-1", "devices/gate-1/hello", "x", &[]);
    assert!(!out.status.success(), "a certificate from another CA is refused");
    assert!(eventually(Duration::from_secs(3), || server.metric(
        "antumbra_mqtt_auth_failures_total{reason=\"tls_handshake\"}"
    ) > before));

    // An expired certificate signed by the platform CA itself.
    let expired = expired_certificate(dir.path(), "gate-1");
    let expired = DeviceFiles {
        cert: expired.0,
        key: expired.1,
        ..clone_files(&d)
    };
    let out = pub_(&server, &expired, "gate-1", "devices/gate-1/hello", "x", &[]);
    assert!(!out.status.success(), "an expired certificate is refused");

    // Revoked through REST: refused at CONNECT.
    revoke(&server, "gate-1", &d.serial);
    let out = pub_(&server, &d, "gate-1", "devices/gate-1/hello", "x", &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not authorised"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn clone_files(d: &DeviceFiles) -> DeviceFiles {
    DeviceFiles {
        id: d.id.clone(),
        cert: d.cert.clone(),
        key: d.key.clone(),
        ca: d.ca.clone(),
        serial: d.serial.clone(),
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client certificate for `cn`, signed by the platform CA (from the data dir), valid only in January 2020.
fn expired_certificate(dir: &Path, cn: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let work = dir.join("expired");
    std::fs::create_dir_all(work.join("db")).unwrap();
    std::fs::write(work.join("db/index.txt"), "").unwrap();
    std::fs::write(work.join("db/serial"), "4a01\n").unwrap();
    std::fs::write(
        work.join("ca.cnf"),
        "[ca]\ndefault_ca = x\n[x]\ndatabase = db/index.txt\nnew_certs_dir = db\nserial = db/serial\n\
         default_md = sha256\npolicy = p\nunique_subject = no\n[p]\ncommonName = supplied\n[ext]\n\
         extendedKeyUsage = clientAuth\nbasicConstraints = CA:FALSE\n",
    )
    .unwrap();
    let pki = dir.join("data/pki");
    openssl(
        &work,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "dev.key",
            "-out",
            "dev.csr",
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    openssl(
        &work,
        &[
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-cert",
            pki.join("ca.crt").to_str().unwrap(),
            "-keyfile",
            pki.join("ca.key").to_str().unwrap(),
            "-in",
            "dev.csr",
            "-out",
            "dev.crt",
            "-startdate",
            "20200101000000Z",
            "-enddate",
            "20200201000000Z",
            "-extensions",
            "ext",
            "-notext",
        ],
    );
    (work.join("dev.crt"), work.join("dev.key"))
}

fn revoke(server: &Server, id: &str, serial: &str) {
    let res = reqwest::blocking::Client::new()
        .post(format!(
            "{}/v1/devices/{id}/certificates/{serial}/revoke",
            server.base
        ))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"reason": "key_compromise"}))
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
}

/// A restarted process holds the active certificates of its CA in memory and admits them without a chain check
/// or a registry query: revocation and deletion must still refuse them.
#[test]
fn after_a_restart_certificates_on_record_connect_and_revoked_or_deleted_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let kept = server.register(TOKEN, "lock-1", dir.path());
    let revoked = server.register(TOKEN, "lock-2", dir.path());
    let deleted = server.register(TOKEN, "lock-3", dir.path());
    assert!(server.terminate().success());

    let server = start(dir.path());
    for (d, id) in [(&kept, "lock-1"), (&revoked, "lock-2"), (&deleted, "lock-3")] {
        let out = pub_(&server, d, id, &format!("devices/{id}/hello"), "x", &[]);
        assert!(
            out.status.success(),
            "{id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let refused = || server.metric("antumbra_mqtt_auth_failures_total{reason=\"certificate_revoked\"}");
    let before = refused();
    revoke(&server, "lock-2", &revoked.serial);
    let res = reqwest::blocking::Client::new()
        .delete(format!("{}/v1/devices/lock-3", server.base))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    for (d, id) in [(&revoked, "lock-2"), (&deleted, "lock-3")] {
        let out = pub_(&server, d, id, &format!("devices/{id}/hello"), "x", &[]);
        assert!(!out.status.success(), "{id} still connects");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not authorised"),
            "{id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(refused(), before + 2.0);
    let out = pub_(&server, &kept, "lock-1", "devices/lock-1/hello", "x", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Issued by this process: on record from the start.
    let fresh = server.register(TOKEN, "lock-4", dir.path());
    let out = pub_(&server, &fresh, "lock-4", "devices/lock-4/hello", "x", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn revoking_a_certificate_drops_the_live_connection_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "meter-3", dir.path());
    let mut device = paho_connected(&server, &d, "hold", &[]);
    assert_eq!(status(&server, "meter-3")["online"], true);
    let revoked_at = Instant::now();
    revoke(&server, "meter-3", &d.serial);
    assert!(
        eventually(Duration::from_secs(5), || status(&server, "meter-3")["online"]
            == false),
        "still online after revocation"
    );
    assert!(revoked_at.elapsed() < Duration::from_secs(5));
    let s = status(&server, "meter-3");
    assert_eq!(s["last_disconnect_reason"], "revoked");
    assert_eq!(
        server.metric("antumbra_mqtt_disconnects_total{reason=\"revoked\"}"),
        1.0
    );
    // paho keeps retrying; every retry is refused, so the device stays offline.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(status(&server, "meter-3")["online"], false);
    device.kill();
}

#[test]
fn an_idle_tcp_connection_does_not_block_another_devices_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "fast-1", dir.path());
    let idle: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(("127.0.0.1", server.mqtts_port)).unwrap())
        .collect();
    let started = Instant::now();
    let out = pub_(&server, &d, "fast-1", "devices/fast-1/x", "hello", &["-q", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "handshake waited for idle sockets: {:?}",
        started.elapsed()
    );
    drop(idle);
}

/// The retained value on `topic`, read by mosquitto_sub as the device (empty when none arrives in 2 s).
fn retained(server: &Server, d: &DeviceFiles, topic: &str) -> String {
    let out = finish(sub(server, d, topic, 1, 2, &[]));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn wills_fire_on_abrupt_loss_keep_alive_timeout_and_takeover_but_not_on_clean_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "valve-9", dir.path());
    let topic = "devices/valve-9/status";
    let will =
        |payload: &'static str| vec!["--will-topic", topic, "--will-payload", payload, "--will-retain"];
    let reset = || {
        assert!(pub_(&server, &d, "valve-9", topic, "alive", &["-r", "-q", "1"])
            .status
            .success())
    };

    // Clean DISCONNECT: no will.
    reset();
    let out = paho(&server, &d, "clean", &will("gone-clean")).output().unwrap();
    assert!(out.status.success());
    assert!(eventually(Duration::from_secs(5), || status(&server, "valve-9")
        ["last_disconnect_reason"]
        == "client_disconnect"));
    assert_eq!(retained(&server, &d, topic), format!("{topic} alive"));

    // Abrupt loss (process killed, socket closed without DISCONNECT): the will fires.
    reset();
    let mut child = paho_connected(&server, &d, "hold", &will("gone-killed"));
    child.kill();
    assert!(eventually(Duration::from_secs(5), || status(&server, "valve-9")
        ["online"]
        == false));
    assert_eq!(
        status(&server, "valve-9")["last_disconnect_reason"],
        "network_error"
    );
    assert_eq!(retained(&server, &d, topic), format!("{topic} gone-killed"));

    // Keep-alive timeout: connected, then silent; after 1.5 × 1 s the server ends it and the will fires.
    reset();
    let mut child = paho_connected(
        &server,
        &d,
        "silent",
        &[will("gone-silent"), vec!["--keepalive", "1"]].concat(),
    );
    assert!(eventually(Duration::from_secs(6), || status(&server, "valve-9")
        ["last_disconnect_reason"]
        == "keep_alive_timeout"));
    child.kill();
    assert_eq!(retained(&server, &d, topic), format!("{topic} gone-silent"));

    // Takeover: the same device connects again while its first session lives; the old will fires at once.
    reset();
    let mut child = paho_connected(&server, &d, "hold", &will("gone-takeover"));
    let seen = retained(&server, &d, topic);
    assert_eq!(
        seen,
        format!("{topic} gone-takeover"),
        "the replaced session's will is published right away"
    );
    child.kill();
}

#[test]
fn status_and_event_stream_follow_connect_clean_disconnect_kill_and_takeover() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "cam-5", dir.path());
    let _other = server.register(TOKEN, "cam-6", dir.path());
    let never: Value = status(&server, "cam-5");
    assert_eq!(
        (never["online"].clone(), never["session"].clone()),
        (Value::Bool(false), Value::from(0))
    );

    let events = server.events(TOKEN, "?device_id=cam-5");
    let next = || events.recv_timeout(Duration::from_secs(10)).expect("an event");

    // Connect, then a clean disconnect.
    let out = pub_(&server, &d, "cam-5", "devices/cam-5/x", "1", &[]);
    assert!(out.status.success());
    let c1 = next();
    assert_eq!(
        (c1["type"].as_str(), c1["device_id"].as_str()),
        (Some("device.connected"), Some("cam-5"))
    );
    let e = next();
    assert_eq!(
        (e["type"].as_str(), e["reason"].as_str(), e["online"].as_bool()),
        (
            Some("device.disconnected"),
            Some("client_disconnect"),
            Some(false)
        )
    );

    // Connect and hold; a second connection takes over: the device never shows offline.
    let mut first = paho_connected(&server, &d, "hold", &[]);
    let c2 = next();
    assert_eq!(c2["type"], "device.connected");
    assert!(
        c2["session"].as_u64() > c1["session"].as_u64(),
        "session numbers only increase"
    );
    let s = status(&server, "cam-5");
    assert_eq!(
        (s["online"].clone(), s["session"].clone()),
        (Value::Bool(true), c2["session"].clone())
    );
    let taker = sub(&server, &d, "devices/cam-5/#", 1, 4, &[]);
    let mut takeover_seen = false;
    let mut c3 = Value::Null;
    for _ in 0..2 {
        let e = next();
        match e["type"].as_str() {
            Some("device.disconnected") => {
                assert_eq!(
                    (e["reason"].as_str(), e["online"].as_bool(), &e["session"]),
                    (Some("takeover"), Some(true), &c2["session"])
                );
                takeover_seen = true;
            }
            Some("device.connected") => c3 = e,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(takeover_seen);
    assert!(c3["session"].as_u64() > c2["session"].as_u64());
    let s = status(&server, "cam-5");
    assert_eq!(
        (s["online"].clone(), s["session"].clone()),
        (Value::Bool(true), c3["session"].clone())
    );
    let listed: Value = server.get_json(TOKEN, "/v1/devices?online=true");
    assert!(
        eventually(Duration::from_secs(3), || server
            .get_json(TOKEN, "/v1/devices?online=true")["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == "cam-5")),
        "{listed}"
    );
    let offline: Value = server.get_json(TOKEN, "/v1/devices?online=false");
    assert!(offline["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x["id"] != "cam-5"));
    assert!(offline["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["id"] == "cam-6"));

    // Kill the taker abruptly (SIGKILL on mosquitto_sub): network error, offline. paho (first) would reconnect,
    // so it is killed first.
    first.kill();
    let mut taker = taker;
    taker.kill();
    let e = next();
    assert_eq!(
        (e["type"].as_str(), e["reason"].as_str(), e["online"].as_bool()),
        (Some("device.disconnected"), Some("network_error"), Some(false))
    );
    let s = status(&server, "cam-5");
    assert_eq!(s["online"], false);
    assert_eq!(s["last_disconnect_reason"], "network_error");
    assert!(
        s["last_seen_at"].is_string() && s["disconnected_at"].is_string() && s["remote_addr"].is_string()
    );
    assert!(eventually(Duration::from_secs(3), || server
        .get_json(TOKEN, "/v1/devices?online=false")["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["id"] == "cam-5")));
}

#[test]
fn metrics_count_connections_messages_and_disconnect_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "m-1", dir.path());
    for _ in 0..3 {
        assert!(pub_(&server, &d, "m-1", "devices/m-1/x", "1", &["-q", "1"])
            .status
            .success());
    }
    assert!(eventually(Duration::from_secs(3), || server.metric(
        "antumbra_mqtt_disconnects_total{reason=\"client_disconnect\"}"
    ) == 3.0));
    assert_eq!(server.metric("antumbra_mqtt_connects_total"), 3.0);
    assert_eq!(server.metric("antumbra_mqtt_connections"), 0.0);
    assert!(server.metric("antumbra_mqtt_messages_in_total") >= 3.0);
    assert!(
        server.metric("antumbra_mqtt_messages_out_total") >= 6.0,
        "CONNACK and PUBACK each time"
    );
}

/// paho's `persist` mode on `devices/{id}/cmd` with `args`: what it printed after "connected" (the session line,
/// then the payload that came back or "nothing").
fn persist(server: &Server, d: &DeviceFiles, args: &[&str], subscribe: bool, payload: &str) -> Vec<String> {
    let topic = format!("devices/{}/cmd", d.id);
    let mut args = args.to_vec();
    args.extend(["--topic", &topic, "--payload", payload, "--timeout", "2"]);
    if subscribe {
        args.push("--subscribe");
    }
    let out = paho(server, d, "persist", &args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with("devices/"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn persistent_sessions_keep_subscriptions_and_clean_sessions_start_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "keeper", dir.path());
    let run = |clean: &str, subscribe: bool, payload: &str| {
        persist(&server, &d, &["--clean-session", clean], subscribe, payload)
    };
    assert_eq!(run("0", true, "one"), ["session_present=0", "one"]);
    // Same client, persistent session: the router kept the subscription, no SUBSCRIBE needed.
    assert_eq!(run("0", false, "two"), ["session_present=1", "two"]);
    // A clean session drops it: nothing comes back without subscribing.
    assert_eq!(run("1", false, "three"), ["session_present=0", "nothing"]);
}

#[test]
fn persistent_sessions_expire_and_mqtt5_clients_get_the_expiry_they_ask_for_up_to_the_servers() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), &["--mqtt-session-expiry-secs", "3"]);
    let d = server.register(TOKEN, "sleeper", dir.path());
    let past_expiry = || std::thread::sleep(Duration::from_millis(4500));

    // MQTT 3.1.1: a persistent session is kept for the server's expiry, then it is gone with its subscription.
    let v4 = |subscribe, payload| persist(&server, &d, &["--clean-session", "0"], subscribe, payload);
    assert_eq!(v4(true, "one"), ["session_present=0", "one"]);
    assert_eq!(v4(false, "two"), ["session_present=1", "two"]);
    past_expiry();
    assert_eq!(v4(false, "three"), ["session_present=0", "nothing"]);

    let v5 = |expiry: Option<&str>, clean_start: &str, subscribe, payload| {
        let mut args = vec!["--v5", "--clean-session", clean_start];
        if let Some(expiry) = expiry {
            args.extend(["--session-expiry", expiry]);
        }
        persist(&server, &d, &args, subscribe, payload)
    };
    // MQTT 5 without a Session Expiry Interval (0): the session ends with the connection, Clean Start or not.
    assert_eq!(
        v5(None, "1", true, "four"),
        ["session_present=0 session_expiry=-", "four"]
    );
    assert_eq!(
        v5(None, "0", false, "five"),
        ["session_present=0 session_expiry=-", "nothing"]
    );
    // Asking for 2 s, under the server's 3: kept (Clean Start only drops an earlier session), CONNACK silent.
    assert_eq!(
        v5(Some("2"), "1", true, "six"),
        ["session_present=0 session_expiry=-", "six"]
    );
    assert_eq!(
        v5(Some("2"), "0", false, "seven"),
        ["session_present=1 session_expiry=-", "seven"]
    );
    // Asking for more than the server keeps: its CONNACK says 3, and 3 s it is.
    assert_eq!(
        v5(Some("3600"), "0", false, "eight"),
        ["session_present=1 session_expiry=3", "eight"]
    );
    past_expiry();
    assert_eq!(
        v5(Some("3600"), "0", false, "nine"),
        ["session_present=0 session_expiry=3", "nothing"]
    );
    // A DISCONNECT may end the session at once (Session Expiry Interval 0 in it).
    let args = [
        "--v5",
        "--clean-session",
        "1",
        "--session-expiry",
        "2",
        "--disconnect-expiry",
        "0",
    ];
    assert_eq!(
        persist(&server, &d, &args, true, "ten"),
        ["session_present=0 session_expiry=-", "ten"]
    );
    assert_eq!(
        v5(Some("2"), "0", false, "eleven"),
        ["session_present=0 session_expiry=-", "nothing"]
    );
}

#[test]
fn connection_limit_and_maximum_packet_size_come_from_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(
        dir.path(),
        &["--mqtt-max-connections", "1", "--mqtt-max-packet-bytes", "1024"],
    );
    let a = server.register(TOKEN, "one", dir.path());
    let b = server.register(TOKEN, "two", dir.path());
    let _holder = paho_connected(&server, &a, "hold", &[]);
    let out = pub_(&server, &b, "two", "devices/two/x", "1", &[]);
    assert!(!out.status.success(), "the second device is over the limit");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unavailable"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        server.metric("antumbra_mqtt_auth_failures_total{reason=\"connection_limit\"}"),
        1.0
    );
    drop(_holder);
    assert!(eventually(Duration::from_secs(5), || server
        .metric("antumbra_mqtt_connections")
        == 0.0));

    let small = "x".repeat(900);
    assert!(pub_(&server, &b, "two", "devices/two/x", &small, &["-q", "1"])
        .status
        .success());
    let big = "x".repeat(2000);
    let out = pub_(&server, &b, "two", "devices/two/x", &big, &["-q", "1"]);
    assert!(
        !out.status.success(),
        "a packet over the maximum ends the session"
    );
    assert!(eventually(Duration::from_secs(3), || status(&server, "two")
        ["last_disconnect_reason"]
        == "network_error"));
}

/// A device that reconnects resumes its TLS session (a stateless ticket), skipping the certificate checks of a
/// full handshake, and is still the device its certificate names: shown with a stock `openssl s_client`.
#[test]
fn a_reconnecting_device_resumes_its_tls_session_and_keeps_its_identity() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "resumer-1", dir.path());
    let session = dir.path().join("tls-session.pem");
    // MQTT 3.1.1 CONNECT, clean session, keep-alive 60 s, client id "resumer-1".
    let mut connect = vec![
        0x10, 0x15, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x09,
    ];
    connect.extend_from_slice(b"resumer-1");
    let handshake = |session_flag: &str| -> Vec<u8> {
        use std::io::Write;
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{}", server.mqtts_port),
            ])
            .args(["-servername", "localhost", "-CAfile", d.ca.to_str().unwrap()])
            .args(["-cert", d.cert.to_str().unwrap(), "-key", d.key.to_str().unwrap()])
            .args([session_flag, session.to_str().unwrap()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&connect).unwrap();
        // Long enough for the CONNACK and the session ticket, then EOF ends s_client.
        std::thread::sleep(Duration::from_millis(1500));
        drop(stdin);
        finish(Proc(child)).stdout
    };
    let connack = |out: &[u8]| out.windows(4).any(|w| w == [0x20, 0x02, 0x00, 0x00]);

    let first = handshake("-sess_out");
    assert!(connack(&first), "{}", String::from_utf8_lossy(&first));
    assert!(String::from_utf8_lossy(&first).contains("New, TLSv1.3"));
    let second = handshake("-sess_in");
    let text = String::from_utf8_lossy(&second);
    assert!(text.contains("Reused, TLSv1.3"), "not resumed: {text}");
    assert!(connack(&second), "resumed session refused: {text}");
    assert_eq!(status(&server, "resumer-1")["session"], 2);
}

/// A device that stops reading while it is sent messages is disconnected once a write to it has waited
/// `--mqtt-write-timeout-secs`: its session no longer waits for ever, unable to read, time out or be kicked.
#[test]
fn a_device_that_stops_reading_is_disconnected_after_the_write_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), &["--mqtt-write-timeout-secs", "2"]);
    let d = server.register(TOKEN, "deaf-1", dir.path());
    let (ca, cert, key) = d.pems();
    let tls = client::tls_config(&ca, &cert, &key).unwrap();
    let addr = server.mqtts_addr();
    let runtime = antumbra_e2e::runtime();
    let (reader, flood) = runtime.block_on(async {
        let (mut reader, mut writer) = client::connect(addr, tls, "deaf-1", 60).await.unwrap();
        client::subscribe(&mut reader, &mut writer, "devices/deaf-1/echo", 0)
            .await
            .unwrap();
        // Its own messages come back to it, and it never reads them: the socket buffers fill, then the
        // session's write to it waits.
        let payload = vec![b'x'; 16 * 1024];
        let flood = tokio::spawn(async move {
            for _ in 0..4_000 {
                packet::publish_payload(&mut writer.buf, "devices/deaf-1/echo", 0, 0, &payload);
                if writer.send().await.is_err() {
                    return;
                }
            }
        });
        (reader, flood)
    });
    let online = |v: &Value| v["online"] == true;
    assert!(
        online(&status(&server, "deaf-1")),
        "{}",
        status(&server, "deaf-1")
    );
    let gone = eventually(Duration::from_secs(40), || !online(&status(&server, "deaf-1")));
    flood.abort();
    drop(reader);
    assert!(gone, "still online: {}", status(&server, "deaf-1"));
    assert!(server.wait_for_log("stopped reading", Duration::from_secs(5)));
}

/// The messages a `steps` run of mqtt_client.py printed: (topic, payload).
fn steps_messages(out: &Output) -> Vec<(String, String)> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (topic, rest) = l.split_once(' ')?;
            let (_retain, payload) = rest.split_once(' ')?;
            Some((topic.to_owned(), payload.to_owned()))
        })
        .collect()
}

/// MQTT 5 No Local, with Paho: a device subscribed to its whole tree with No Local gets the platform's replies
/// but not its own messages; subscribing again without it replaces the subscription.
#[test]
fn no_local_subscriptions_skip_the_devices_own_messages_but_not_the_platforms() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "nl-lamp", dir.path());
    let steps = [
        "sub devices/nl-lamp/# nl",
        "pub devices/nl-lamp/echo own",
        r#"pub devices/nl-lamp/shadow/update {"state":{"reported":{"on":true}}}"#,
        "wait 2",
        "sleep 0.5",
        "sub devices/nl-lamp/#",
        "pub devices/nl-lamp/echo again",
        "wait 3",
        "sleep 0.5",
    ];
    let mut args = vec!["--v5"];
    for step in steps {
        args.extend(["--step", step]);
    }
    let out = paho(&server, &d, "steps", &args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let mut topics: Vec<String> = steps_messages(&out).into_iter().map(|(t, _)| t).collect();
    topics[..2].sort();
    assert_eq!(
        topics,
        [
            "devices/nl-lamp/shadow/update/accepted",
            "devices/nl-lamp/shadow/update/documents",
            "devices/nl-lamp/echo",
        ],
        "{stdout}"
    );
}

/// The platform's own link into the broker has a client id no device can have: a device registered as
/// `antumbra-platform` (a valid device id) connects as itself and takes nothing over.
#[test]
fn a_device_named_like_the_platform_link_does_not_take_it_over() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let namesake = server.register(TOKEN, "antumbra-platform", dir.path());
    let lamp = server.register(TOKEN, "pl-lamp", dir.path());
    let mut held = paho_connected(&server, &namesake, "hold", &[]);
    let mut listener = sub(&server, &lamp, "devices/pl-lamp/shadow/update/delta", 1, 15, &[]);
    std::thread::sleep(Duration::from_millis(500));
    // A REST change reaches the device through the platform's link.
    let res = reqwest::blocking::Client::new()
        .patch(format!("{}/v1/devices/pl-lamp/shadow", server.base))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"state": {"desired": {"on": true}}}))
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    let out = listener.output(Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("\"on\":true"),
        "no delta: {stdout}"
    );
    assert_eq!(status(&server, "antumbra-platform")["online"], true);
    held.kill();
}

/// A persistent session that comes back gets its unacknowledged QoS 1 messages again, with their packet ids and
/// DUP set (MQTT 3.1.1 and 5 §4.4), and not the QoS 0 message delivered between them: rumqttd restarted each
/// filter from its oldest unacknowledged message, delivering everything after it again. A publisher's DUP (a
/// retransmission) is not passed on to the subscriber.
#[test]
fn a_resumed_session_gets_its_unacknowledged_messages_again_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "resumer-q", dir.path());
    let (ca, cert, key) = d.pems();
    let tls = client::tls_config(&ca, &cert, &key).unwrap();
    let addr = server.mqtts_addr();
    let topic = "devices/resumer-q/inbox";
    let (first, again) = antumbra_e2e::runtime().block_on(async {
        let (mut reader, mut writer) = client::connect_session(addr, tls.clone(), "resumer-q", 60, false)
            .await
            .unwrap();
        client::subscribe(&mut reader, &mut writer, topic, 1)
            .await
            .unwrap();
        packet::publish_payload(&mut writer.buf, topic, 1, 1, b"a");
        packet::publish_payload(&mut writer.buf, topic, 0, 0, b"z");
        // Sent as a retransmission (DUP): subscribers get it without (MQTT §3.3.1.1).
        let at = writer.buf.len();
        packet::publish_payload(&mut writer.buf, topic, 1, 2, b"b");
        writer.buf[at] |= 0b1000;
        writer.send().await.unwrap();
        // Read the three deliveries and acknowledge none, then drop the connection.
        let first = publishes(&mut reader, 3).await;
        drop((reader, writer));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (mut reader, _writer) = client::connect_session(addr, tls, "resumer-q", 60, false)
            .await
            .unwrap();
        (first, publishes(&mut reader, 3).await)
    });
    let (a, b) = (&first[0], &first[2]);
    assert_eq!(
        first.iter().map(|p| (p.0.as_str(), p.1, p.3)).collect::<Vec<_>>(),
        [("a", 1, false), ("z", 0, false), ("b", 1, false)]
    );
    assert_eq!(
        again,
        [
            ("a".to_owned(), 1, a.2, true, false),
            ("b".to_owned(), 1, b.2, true, false)
        ],
        "the unacknowledged ones again, as they were, and nothing else"
    );
}

/// A retained message the broker sent for a subscription, left unacknowledged, comes again when the persistent
/// session resumes: same packet id, RETAIN and DUP set (rumqttd keeps retained messages out of its logs, so it
/// used to have nothing to send again).
#[test]
fn a_resumed_session_gets_its_unacknowledged_retained_message_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "resumer-r", dir.path());
    let (ca, cert, key) = d.pems();
    let tls = client::tls_config(&ca, &cert, &key).unwrap();
    let addr = server.mqtts_addr();
    let topic = "devices/resumer-r/settings";
    let (first, again) = antumbra_e2e::runtime().block_on(async {
        let (mut reader, mut writer) = client::connect_session(addr, tls.clone(), "resumer-r", 60, false)
            .await
            .unwrap();
        let at = writer.buf.len();
        packet::publish_payload(&mut writer.buf, topic, 1, 1, b"kept");
        writer.buf[at] |= 1; // RETAIN
        writer.send().await.unwrap();
        let ack = reader.next().await.unwrap();
        assert!(matches!(ack, packet::Packet::PubAck { packet_id: 1 }), "{ack:?}");
        client::subscribe(&mut reader, &mut writer, topic, 1)
            .await
            .unwrap();
        // The retained message, not acknowledged; then the connection drops.
        let first = publishes(&mut reader, 1).await;
        drop((reader, writer));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (mut reader, _writer) = client::connect_session(addr, tls, "resumer-r", 60, false)
            .await
            .unwrap();
        (first, publishes(&mut reader, 2).await)
    });
    assert_eq!(first.len(), 1, "no retained message on SUBSCRIBE: {first:?}");
    let (_, qos, pkid, dup, retain) = first[0].clone();
    assert_eq!((qos, dup, retain), (1, false, true));
    assert_eq!(again, [("kept".to_owned(), 1, pkid, true, true)]);
}

// Hand-built MQTT 5 packets: the lean client speaks 3.1.1 (its parser reads a v5 PUBLISH's empty property
// length as the first payload byte, and a v5 SUBACK's as its granted QoS 0, which is all these tests need).

/// A packet of type `first` (with its flags) whose body is under 128 bytes.
fn v5_packet(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut out = vec![first, body.len() as u8];
    out.extend_from_slice(body);
    out
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// CONNECT, MQTT 5, clean start, keep-alive 60 s, with a Receive Maximum.
fn v5_connect(client_id: &str, receive_max: u16) -> Vec<u8> {
    let mut body = Vec::new();
    put_string(&mut body, "MQTT");
    body.extend_from_slice(&[5, 0x02, 0, 60]);
    body.extend_from_slice(&[3, 0x21]); // properties: Receive Maximum
    body.extend_from_slice(&receive_max.to_be_bytes());
    put_string(&mut body, client_id);
    v5_packet(0x10, &body)
}

/// SUBSCRIBE (packet id 1, no properties) to `filter` at `qos`.
fn v5_subscribe(filter: &str, qos: u8) -> Vec<u8> {
    let mut body = vec![0, 1, 0];
    put_string(&mut body, filter);
    body.push(qos);
    v5_packet(0x82, &body)
}

/// PUBLISH at QoS 1 or 2, no properties.
fn v5_publish(topic: &str, qos: u8, packet_id: u16, payload: &str) -> Vec<u8> {
    let mut body = Vec::new();
    put_string(&mut body, topic);
    body.extend_from_slice(&packet_id.to_be_bytes());
    body.push(0);
    body.extend_from_slice(payload.as_bytes());
    v5_packet(0x30 | (qos << 1), &body)
}

/// An MQTT 5 PUBREL may carry properties (here a Reason String): rumqttd matched only one without, so such a
/// PUBREL was ignored, no PUBCOMP came and the QoS 2 message was never published.
#[test]
fn a_pubrel_with_properties_completes_the_qos2_flow() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "q2-label", dir.path());
    let (ca, cert, key) = d.pems();
    let tls = client::tls_config(&ca, &cert, &key).unwrap();
    let topic = "devices/q2-label/inbox";
    let seen = antumbra_e2e::runtime().block_on(async {
        let connect = v5_connect("q2-label", 10);
        let (mut reader, mut writer) = client::connect_with(server.mqtts_addr(), tls, &connect)
            .await
            .unwrap();
        writer.buf.extend(v5_subscribe(topic, 0));
        writer.buf.extend(v5_publish(topic, 2, 7, "exactly"));
        writer.send().await.unwrap();
        let mut seen = Vec::new();
        while let Ok(packet) = tokio::time::timeout(Duration::from_millis(700), reader.next()).await {
            match packet.unwrap() {
                packet::Packet::Other(5) => {
                    seen.push("PUBREC".to_owned());
                    // PUBREL: packet id 7, reason Success, properties: Reason String "ok".
                    let pubrel = v5_packet(0x62, &[0, 7, 0, 5, 0x1F, 0, 2, b'o', b'k']);
                    writer.buf.extend(pubrel);
                    writer.send().await.unwrap();
                }
                packet::Packet::Other(7) => seen.push("PUBCOMP".to_owned()),
                packet::Packet::Publish { payload, .. } => {
                    // After the empty property length the lean parser leaves in.
                    seen.push(String::from_utf8_lossy(&payload[1..]).into_owned());
                }
                _ => {}
            }
        }
        seen
    });
    // The PUBCOMP and the delivery to the subscription may come in either order.
    let mut after = seen.get(1..).unwrap_or_default().to_vec();
    after.sort();
    assert_eq!(
        (seen.first().map(String::as_str), after),
        (Some("PUBREC"), vec!["PUBCOMP".to_owned(), "exactly".to_owned()]),
        "{seen:?}"
    );
}

/// A PUBREL for a packet id the broker holds no message for (its PUBLISH went on an earlier connection, or it
/// was released already) gets a PUBCOMP and the connection goes on: rumqttd disconnected the client, which sent
/// the PUBREL again on every reconnection.
#[test]
fn an_unknown_pubrel_gets_a_pubcomp_and_the_connection_stays() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "q2-stray", dir.path());
    let (ca, cert, key) = d.pems();
    let tls = client::tls_config(&ca, &cert, &key).unwrap();
    let seen = antumbra_e2e::runtime().block_on(async {
        let connect = v5_connect("q2-stray", 10);
        let (mut reader, mut writer) = client::connect_with(server.mqtts_addr(), tls, &connect)
            .await
            .unwrap();
        writer.buf.extend(v5_packet(0x62, &[0, 9])); // PUBREL 9, never published
        writer.buf.extend(v5_packet(0xC0, &[])); // PINGREQ
        writer.send().await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            match tokio::time::timeout(Duration::from_secs(5), reader.next()).await {
                Ok(Ok(packet)) => seen.push(format!("{packet:?}")),
                Ok(Err(e)) => {
                    seen.push(format!("error: {e}"));
                    break;
                }
                Err(_) => {
                    seen.push("nothing within 5 s".to_owned());
                    break;
                }
            }
        }
        seen
    });
    assert_eq!(seen, ["Other(7)", "PingResp"]);
}

/// A QoS 2 delivery holds its place in the client's Receive Maximum until its PUBCOMP (MQTT 5 §4.9), and the
/// PUBCOMP lets the next one go (rumqttd freed the place at PUBREC and did not look again at PUBCOMP).
#[test]
fn a_qos2_delivery_holds_its_place_until_its_pubcomp() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "q2-window", dir.path());
    let (ca, cert, key) = d.pems();
    let tls = client::tls_config(&ca, &cert, &key).unwrap();
    let topic = "devices/q2-window/inbox";
    let seen = antumbra_e2e::runtime().block_on(async {
        let connect = v5_connect("q2-window", 1);
        let (mut reader, mut writer) = client::connect_with(server.mqtts_addr(), tls, &connect)
            .await
            .unwrap();
        writer.buf.extend(v5_subscribe(topic, 2));
        writer.buf.extend(v5_publish(topic, 2, 1, "first"));
        writer.buf.extend(v5_publish(topic, 2, 2, "second"));
        writer.send().await.unwrap();
        // What arrives, answering the broker as a client that is slow with its PUBCOMP.
        let mut seen = Vec::new();
        let mut ours = [1u16, 2].into_iter();
        let (mut delivered, mut held_pubcomp) = (None, None);
        loop {
            // Long while a delivery is due (a slow machine), short to show that none comes.
            let due = held_pubcomp.is_none() && seen.len() < 3;
            let wait = Duration::from_millis(if due { 5_000 } else { 700 });
            let Ok(packet) = tokio::time::timeout(wait, reader.next()).await else {
                // Quiet: send the PUBCOMP held back, if any, and see what it lets through.
                let Some(id) = held_pubcomp.take() else { break };
                seen.push("(PUBCOMP)".to_owned());
                writer.buf.extend(v5_packet(0x70, &u16::to_be_bytes(id)));
                writer.send().await.unwrap();
                continue;
            };
            match packet.unwrap() {
                // PUBREC for one of our publishes (in order): release it.
                packet::Packet::Other(5) => {
                    let id = ours.next().expect("a PUBREC too many");
                    writer.buf.extend(v5_packet(0x62, &u16::to_be_bytes(id)));
                }
                packet::Packet::Publish {
                    packet_id, payload, ..
                } => {
                    let id = packet_id.unwrap();
                    seen.push(String::from_utf8_lossy(&payload[1..]).into_owned());
                    delivered = Some(id);
                    writer.buf.extend(v5_packet(0x50, &u16::to_be_bytes(id))); // PUBREC
                }
                // PUBREL for the delivery: its PUBCOMP waits until the line is quiet.
                packet::Packet::Other(6) => held_pubcomp = delivered,
                _ => {}
            }
            writer.send().await.unwrap();
        }
        seen
    });
    assert_eq!(seen, ["first", "(PUBCOMP)", "second", "(PUBCOMP)"]);
}

/// MQTT 5 Receive Maximum: the broker never has more QoS 1 publishes unacknowledged at a client than the client
/// said it takes (§3.1.2.11.3); rumqttd ignored it and sent up to 100. A Receive Maximum of 0 is refused.
#[test]
fn the_broker_keeps_to_the_clients_receive_maximum() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "rm-label", dir.path());
    let (ca, cert, key) = d.pems();
    let tls = client::tls_config(&ca, &cert, &key).unwrap();
    let addr = server.mqtts_addr();
    let topic = "devices/rm-label/inbox";
    let connect = |receive_max: u16| v5_connect("rm-label", receive_max);
    let publishes = antumbra_e2e::runtime().block_on(async {
        let refused = client::connect_with(addr, tls.clone(), &connect(0)).await;
        let refusal = format!("{:#}", refused.err().expect("Receive Maximum 0 accepted"));
        assert!(refusal.contains("return code 130"), "{refusal}"); // 0x82 Protocol Error

        let (mut reader, mut writer) = client::connect_with(addr, tls, &connect(2)).await.unwrap();
        writer.buf.extend(v5_subscribe(topic, 1));
        for id in 1..=5u16 {
            writer.buf.extend(v5_publish(topic, 1, id, &format!("m{id}")));
        }
        writer.send().await.unwrap();
        // Packet ids of the deliveries that come: `expected` of them within 5 s (a slow machine), then any more
        // within half a second of the last.
        async fn deliveries(reader: &mut client::Reader, expected: usize) -> Vec<u16> {
            let mut ids = Vec::new();
            loop {
                let wait = Duration::from_millis(if ids.len() < expected { 5_000 } else { 500 });
                let Ok(packet) = tokio::time::timeout(wait, reader.next()).await else {
                    return ids;
                };
                if let packet::Packet::Publish { packet_id, .. } = packet.unwrap() {
                    ids.push(packet_id.unwrap());
                }
            }
        }
        let mut rounds = vec![deliveries(&mut reader, 2).await];
        // Acknowledging one lets one more through, and so on.
        while rounds.iter().map(Vec::len).sum::<usize>() < 5 && rounds.len() < 8 {
            let Some(oldest) = rounds.iter().flatten().nth(rounds.len() - 1).copied() else {
                break;
            };
            packet::puback(&mut writer.buf, oldest);
            writer.send().await.unwrap();
            rounds.push(deliveries(&mut reader, 1).await);
        }
        rounds
    });
    assert_eq!(
        publishes.iter().map(Vec::len).collect::<Vec<_>>(),
        [2, 1, 1, 1],
        "deliveries per round: {publishes:?}"
    );
}

/// A device's QoS 2 publish the broker received (PUBREC) but that the connection lost before its PUBREL is kept
/// with the persistent session: the PUBREL on the next connection publishes it (rumqttd kept a connection's QoS
/// 2 state with the connection only, so the message was lost and the PUBREL refused).
#[test]
fn a_qos2_publish_released_on_the_next_connection_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "resumer-2", dir.path());
    let (ca, cert, key) = d.pems();
    let tls = client::tls_config(&ca, &cert, &key).unwrap();
    let addr = server.mqtts_addr();
    let topic = "devices/resumer-2/inbox";
    let got = antumbra_e2e::runtime().block_on(async {
        let (mut reader, mut writer) = client::connect_session(addr, tls.clone(), "resumer-2", 60, false)
            .await
            .unwrap();
        client::subscribe(&mut reader, &mut writer, topic, 0)
            .await
            .unwrap();
        packet::publish_payload(&mut writer.buf, topic, 2, 5, b"exactly-once");
        writer.send().await.unwrap();
        let pubrec = reader.next().await.unwrap();
        assert!(matches!(pubrec, packet::Packet::Other(5)), "{pubrec:?}");
        // The connection drops before the PUBREL.
        drop((reader, writer));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (mut reader, mut writer) = client::connect_session(addr, tls, "resumer-2", 60, false)
            .await
            .unwrap();
        writer.buf.extend_from_slice(&[0x62, 2, 0, 5]); // PUBREL 5
        writer.send().await.unwrap();
        let mut got = Vec::new();
        while let Ok(packet) = tokio::time::timeout(Duration::from_secs(2), reader.next()).await {
            match packet.unwrap() {
                packet::Packet::Publish { payload, .. } => {
                    got.push(String::from_utf8_lossy(&payload).into_owned())
                }
                other => got.push(format!("{other:?}")),
            }
            if got.len() == 2 {
                break;
            }
        }
        got.sort();
        got
    });
    assert_eq!(got, ["Other(7)", "exactly-once"]);
}

/// A device may have at most the broker's Receive Maximum (100, announced in an MQTT 5 CONNACK) QoS 2 publishes
/// waiting for their PUBRELs; the next one ends its connection (rumqttd kept them without bound): an MQTT 5
/// client is told why (DISCONNECT, Receive Maximum exceeded), an MQTT 3.1.1 client, which has no server
/// DISCONNECT, sees the connection close.
#[test]
fn qos2_publishes_waiting_for_pubrel_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "q2-flood", dir.path());
    let (ca, cert, key) = d.pems();
    let tls = client::tls_config(&ca, &cert, &key).unwrap();
    let topic = "devices/q2-flood/inbox";
    let flood = |v5: bool| {
        let tls = tls.clone();
        antumbra_e2e::runtime().block_on(async {
            let (mut reader, mut writer) = match v5 {
                true => client::connect_with(server.mqtts_addr(), tls, &v5_connect("q2-flood", 10)).await,
                false => client::connect(server.mqtts_addr(), tls, "q2-flood", 60).await,
            }
            .unwrap();
            for id in 1..=101u16 {
                match v5 {
                    true => writer.buf.extend(v5_publish(topic, 2, id, "held")),
                    false => packet::publish_payload(&mut writer.buf, topic, 2, id, b"held"),
                }
            }
            writer.send().await.unwrap();
            let mut pubrecs = 0;
            let end = loop {
                match tokio::time::timeout(Duration::from_secs(5), reader.next()).await {
                    Ok(Ok(packet::Packet::Other(5))) => pubrecs += 1,
                    Ok(Ok(other)) => break format!("{other:?}"),
                    Ok(Err(e)) => break format!("{e}"),
                    Err(_) => break "still connected after 5 s".to_owned(),
                }
            };
            (pubrecs, end)
        })
    };
    let (pubrecs, end) = flood(false);
    assert_eq!(pubrecs, 100);
    assert!(end.contains("closed"), "{end}");
    let (pubrecs, end) = flood(true);
    assert_eq!(pubrecs, 100);
    // 0x93: Receive Maximum exceeded.
    assert_eq!(end, "Disconnect { reason: 147 }");
}

/// A publish as received: (payload, QoS, packet id, DUP, RETAIN).
type Received = (String, u8, Option<u16>, bool, bool);

/// Up to `count` publishes the broker sends within a second of each other.
async fn publishes(reader: &mut client::Reader, count: usize) -> Vec<Received> {
    let mut got = Vec::new();
    while got.len() < count {
        let Ok(packet) = tokio::time::timeout(Duration::from_secs(1), reader.next()).await else {
            break;
        };
        if let packet::Packet::Publish {
            qos,
            dup,
            retain,
            packet_id,
            payload,
            ..
        } = packet.unwrap()
        {
            got.push((
                String::from_utf8_lossy(&payload).into_owned(),
                qos,
                packet_id,
                dup,
                retain,
            ));
        }
    }
    got
}

/// MQTT 5 Retain Handling and Retain As Published, and MQTT 3.1.1's rule that a SUBSCRIBE sends the retained
/// messages again even for a filter the session has, with Paho.
#[test]
fn retained_messages_follow_the_subscription_options() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let d = server.register(TOKEN, "ret-lamp", dir.path());
    let topic = "devices/ret-lamp/state";
    let run = |v5: bool, steps: &[String]| {
        let mut args = if v5 { vec!["--v5"] } else { vec![] };
        for step in steps {
            args.extend(["--step", step.as_str()]);
        }
        let out = paho(&server, &d, "steps", &args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{stdout}");
        // "<retain> <payload>" per message.
        let lines: Vec<String> = stdout
            .lines()
            .filter_map(|l| l.strip_prefix(topic)?.strip_prefix(' ').map(str::to_owned))
            .collect();
        lines
    };
    let v5 = run(
        true,
        &[
            format!("pubr {topic} on"),
            // Retain Handling 2: no retained message for this subscription.
            format!("sub {topic} rh=2"),
            "sleep 0.5".to_owned(),
            // The same filter again, Retain Handling 0 and Retain As Published: the retained message, then a
            // live retained publish with its RETAIN flag.
            format!("sub {topic} rap"),
            "wait 1".to_owned(),
            format!("pubr {topic} off"),
            "wait 2".to_owned(),
            // Again without Retain As Published: the retained message, then a live one with the flag cleared.
            format!("sub {topic}"),
            "wait 3".to_owned(),
            format!("pubr {topic} dim"),
            "wait 4".to_owned(),
            "sleep 0.3".to_owned(),
        ],
    );
    assert_eq!(v5, ["1 on", "1 off", "1 off", "0 dim"]);
    let v4 = run(
        false,
        &[
            format!("sub {topic}"),
            "wait 1".to_owned(),
            format!("sub {topic}"),
            "wait 2".to_owned(),
            "sleep 0.3".to_owned(),
        ],
    );
    assert_eq!(v4, ["1 dim", "1 dim"]);
}
