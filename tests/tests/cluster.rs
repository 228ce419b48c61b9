//! Two `antumbra serve` processes on loopback sharing a real PostgreSQL and a real Redis (started by
//! tests/run.sh), and one CA: a device on B gets the delta PATCHed on A, presence is fleet-wide, a device that
//! moves from B to A is never shown offline and B's stale socket is closed, a revocation on A drops and refuses
//! the device on B.

use std::time::Duration;

use antumbra_e2e::{eventually, paho_connected, pub_, DeviceFiles, Server};
use serde_json::{json, Value};

const TOKEN: &str = "cluster-e2e-admin-token-0123456789";

struct Cluster {
    a: Server,
    b: Server,
    _dir: tempfile::TempDir,
}

fn cluster() -> Cluster {
    let pg = std::env::var("ANTUMBRA_TEST_POSTGRES_URL")
        .expect("ANTUMBRA_TEST_POSTGRES_URL is not set: run tests/run.sh");
    let redis = std::env::var("ANTUMBRA_TEST_REDIS_URL")
        .expect("ANTUMBRA_TEST_REDIS_URL is not set: run tests/run.sh");
    let name = format!("antumbra_cluster_{:08x}", rand_u32());
    let created = std::process::Command::new("psql")
        .args([&pg, "-qc", &format!("CREATE DATABASE {name}")])
        .status()
        .unwrap();
    assert!(created.success());
    let db = format!("{}/{name}", pg.rsplit_once('/').unwrap().0);
    let prefix = format!("{name}:");
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("DATABASE_URL", db.as_str()),
        ("REDIS_URL", redis.as_str()),
        ("ANTUMBRA_REDIS_PREFIX", prefix.as_str()),
        ("ANTUMBRA_ADMIN_TOKEN", TOKEN),
    ];
    let a_dir = dir.path().join("a");
    let a = Server::start(
        &[
            "--data-dir",
            a_dir.to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
            "--mqtts",
            "127.0.0.1:0",
        ],
        &env,
    );
    // Shared PKI: B uses A's CA (in production both get it from a secret).
    let (ca_cert, ca_key) = (a_dir.join("pki/ca.crt"), a_dir.join("pki/ca.key"));
    let b = Server::start(
        &[
            "--data-dir",
            dir.path().join("b").to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
            "--mqtts",
            "127.0.0.1:0",
            "--ca-cert",
            ca_cert.to_str().unwrap(),
            "--ca-key",
            ca_key.to_str().unwrap(),
        ],
        &env,
    );
    Cluster { a, b, _dir: dir }
}

fn rand_u32() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    nanos ^ std::process::id().rotate_left(16)
}

fn status(server: &Server, id: &str) -> Value {
    server.get_json(TOKEN, &format!("/v1/devices/{id}/status"))
}

#[test]
fn a_desired_change_on_one_instance_reaches_a_device_on_the_other() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let d = c.a.register(TOKEN, "label-1", dir.path());
    // Connected to B.
    let mut listener = paho_connected(
        &c.b,
        &d,
        "subscribe",
        &[
            "--topic",
            "devices/label-1/shadow/update/delta",
            "--qos",
            "1",
            "--timeout",
            "10",
        ],
    );
    assert!(
        eventually(Duration::from_secs(5), || status(&c.a, "label-1")["online"]
            == true),
        "A sees the device online on B"
    );
    let res = reqwest::blocking::Client::new()
        .patch(format!("{}/v1/devices/label-1/shadow", c.a.base))
        .bearer_auth(TOKEN)
        .json(&json!({"state": {"desired": {"price": 299}}}))
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    let out = listener.output(Duration::from_secs(15));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("\"price\":299"),
        "{stdout}"
    );
}

#[test]
fn a_device_moving_between_instances_is_never_offline_and_the_stale_socket_closes() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let d: DeviceFiles = c.a.register(TOKEN, "mover", dir.path());
    // A silent client on B (it will not reconnect when B closes it).
    let _stale = paho_connected(&c.b, &d, "silent", &["--keepalive", "60"]);
    assert!(eventually(Duration::from_secs(5), || status(&c.b, "mover")
        ["online"]
        == true));
    let first = status(&c.b, "mover")["session"].as_u64().unwrap();
    // The device reconnects through the load balancer and lands on A.
    let _moved = paho_connected(&c.a, &d, "hold", &[]);
    assert!(
        eventually(Duration::from_secs(5), || c
            .b
            .metric("antumbra_mqtt_disconnects_total{reason=\"takeover\"}")
            == 1.0),
        "B closed its stale socket as a takeover"
    );
    assert!(eventually(Duration::from_secs(5), || c
        .b
        .metric("antumbra_mqtt_connections")
        == 0.0));
    for server in [&c.a, &c.b] {
        let s = status(server, "mover");
        assert_eq!(s["online"], true, "never offline: {s}");
        assert!(
            s["session"].as_u64().unwrap() > first,
            "the newer session wins everywhere: {s}"
        );
    }
}

#[test]
fn a_revocation_on_one_instance_drops_and_refuses_the_device_on_the_other() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let d = c.a.register(TOKEN, "meter-9", dir.path());
    let _device = paho_connected(&c.b, &d, "silent", &["--keepalive", "60"]);
    assert!(eventually(Duration::from_secs(5), || c
        .b
        .metric("antumbra_mqtt_connections")
        == 1.0));
    let res = reqwest::blocking::Client::new()
        .post(format!(
            "{}/v1/devices/meter-9/certificates/{}/revoke",
            c.a.base, d.serial
        ))
        .bearer_auth(TOKEN)
        .json(&json!({"reason": "key_compromise"}))
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        eventually(Duration::from_secs(5), || c
            .b
            .metric("antumbra_mqtt_disconnects_total{reason=\"revoked\"}")
            == 1.0),
        "B dropped the live connection"
    );
    let out = pub_(&c.b, &d, "meter-9", "devices/meter-9/x", "1", &[]);
    assert!(!out.status.success(), "B refuses the revoked certificate");
    assert!(eventually(Duration::from_secs(5), || status(&c.a, "meter-9")
        ["last_disconnect_reason"]
        == "revoked"));
}
