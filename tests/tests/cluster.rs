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

/// A private redis-server (append-only file on) that a test may stop and restart.
struct PrivateRedis {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = PrivateRedis {
            dir: tempfile::tempdir().unwrap(),
            port,
            child: None,
        };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (tests/run.sh installs it)");
        self.child = Some(child);
        assert!(eventually(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        }));
    }

    fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            let _ = child.wait();
        }
        std::thread::sleep(Duration::from_millis(500));
        self.spawn();
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn sdk_device(port: u16, d: &DeviceFiles) -> antumbra_sdk::Device {
    let mut config = antumbra_sdk::Config::new(
        "localhost",
        port,
        antumbra_sdk::Credentials::from_files(&d.cert, &d.key, &d.ca).unwrap(),
    );
    config.max_backoff = Duration::from_millis(500);
    config.request_timeout = Duration::from_secs(3);
    antumbra_sdk::Device::connect(config).unwrap()
}

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

#[test]
fn a_redis_restart_mid_traffic_loses_no_accepted_update_and_readiness_follows_it() {
    let mut redis = PrivateRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("REDIS_URL", redis.url()),
        ("ANTUMBRA_ADMIN_TOKEN", TOKEN.to_owned()),
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let device = runtime.block_on(async {
        let device = sdk_device(server.mqtts_port, &d);
        device.wait_connected(Duration::from_secs(10)).await.unwrap();
        device
    });
    let traffic = {
        let device = device.clone();
        runtime.spawn(async move { report_for(&device, Duration::from_secs(6), 0).await })
    };
    std::thread::sleep(Duration::from_secs(2));
    if let Some(mut c) = redis.child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
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
    assert!(!more.is_empty(), "updates resume once Redis is back");
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let device = runtime.block_on(async {
        let device = sdk_device(port, &d);
        device.wait_connected(Duration::from_secs(10)).await.unwrap();
        device
    });
    let traffic = {
        let device = device.clone();
        runtime.spawn(async move { report_for(&device, Duration::from_secs(3), 0).await })
    };
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
