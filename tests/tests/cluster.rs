//! Several `antumbra serve` processes on loopback sharing a real PostgreSQL and a real Redis (started by
//! tests/run.sh), as a cluster runs behind a load balancer. Here: a device on B gets the delta PATCHed on A, a
//! device that moves from B to A is never shown offline and B's stale socket is closed, a revocation on A drops
//! and refuses the device on B, desired state set on A while a device was away reaches it on B as one delta, the
//! event stream of A carries what happens on B (once), presence stays fleet-wide when an instance restarts or
//! dies, and an instance taken for dead while it stalled announces its devices again when it resumes.
//! - `pki`: instances share the CA kept in the database (or the operator's files, which take precedence);
//! - `ota`: deployments made on one instance reach devices on another, rollouts run on every instance;
//! - `faults`: Redis restarting, PostgreSQL going away, an instance killed with SIGKILL;
//! - `readme`: the README's two-process recipe, run as written;
//! - `servers`: private redis-server and PostgreSQL processes for the fault tests.

#[path = "cluster/faults.rs"]
mod faults;
#[path = "cluster/ota.rs"]
mod ota;
#[path = "cluster/pki.rs"]
mod pki;
#[path = "cluster/readme.rs"]
mod readme;
#[path = "cluster/servers.rs"]
mod servers;

use std::time::Duration;

use antumbra_e2e::{eventually, paho_connected, pub_, runtime, sub, DeviceFiles, Proc, Server};
use serde_json::{json, Value};

const TOKEN: &str = "cluster-e2e-admin-token-0123456789";

struct Cluster {
    a: Server,
    b: Server,
    _dir: tempfile::TempDir,
}

/// A fresh database of its own on the test PostgreSQL (tests/run.sh starts it).
fn test_database() -> String {
    let pg = std::env::var("ANTUMBRA_TEST_POSTGRES_URL")
        .expect("ANTUMBRA_TEST_POSTGRES_URL is not set: run tests/run.sh");
    let name = format!("antumbra_cluster_{:08x}", rand_u32());
    let created = std::process::Command::new("psql")
        .args([&pg, "-qc", &format!("CREATE DATABASE {name}")])
        .status()
        .unwrap();
    assert!(created.success());
    format!("{}/{name}", pg.rsplit_once('/').unwrap().0)
}

/// The test Redis (tests/run.sh starts it) and a key prefix of this test's own.
fn test_redis() -> (String, String) {
    let redis = std::env::var("ANTUMBRA_TEST_REDIS_URL")
        .expect("ANTUMBRA_TEST_REDIS_URL is not set: run tests/run.sh");
    (redis, format!("antumbra_cluster_{:08x}:", rand_u32()))
}

/// `antumbra serve` on free loopback ports with its own data directory `dir/name`.
fn instance(dir: &std::path::Path, name: &str, env: &[(&str, &str)], extra: &[&str]) -> Server {
    Server::start_in(&dir.join(name), extra, env)
}

/// Two instances on the database `db` and the test Redis. Nothing else is shared: B finds the CA that A
/// created in the database.
fn cluster_on(db: &str) -> Cluster {
    let env = ClusterEnv::new(db);
    let env = env.vars();
    let dir = tempfile::tempdir().unwrap();
    let a = instance(dir.path(), "a", &env, &[]);
    let b = instance(dir.path(), "b", &env, &[]);
    Cluster { a, b, _dir: dir }
}

/// The environment of one test's instances: its database, the test Redis under a key prefix of its own, the
/// admin token.
struct ClusterEnv {
    db: String,
    redis: String,
    prefix: String,
}

impl ClusterEnv {
    fn new(db: &str) -> Self {
        let (redis, prefix) = test_redis();
        Self {
            db: db.to_owned(),
            redis,
            prefix,
        }
    }

    fn vars(&self) -> [(&str, &str); 4] {
        [
            ("DATABASE_URL", self.db.as_str()),
            ("REDIS_URL", self.redis.as_str()),
            ("ANTUMBRA_REDIS_PREFIX", self.prefix.as_str()),
            ("ANTUMBRA_ADMIN_TOKEN", TOKEN),
        ]
    }
}

fn cluster() -> Cluster {
    cluster_on(&test_database())
}

/// Different on every call, also between tests running at once in this process and across runs.
fn rand_u32() -> u32 {
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (nanos ^ std::process::id().rotate_left(16)).wrapping_add(call.rotate_right(4))
}

fn status(server: &Server, id: &str) -> Value {
    server.get_json(TOKEN, &format!("/v1/devices/{id}/status"))
}

/// A REST call with the admin key: status, JSON body (null when none) and how long the answer took.
fn api(server: &Server, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value, Duration) {
    let started = std::time::Instant::now();
    let mut req = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
        .request(method, format!("{}{path}", server.base))
        .bearer_auth(TOKEN);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let res = req.send().unwrap();
    let status = res.status().as_u16();
    (status, res.json().unwrap_or(Value::Null), started.elapsed())
}

fn readiness(server: &Server) -> u16 {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
        .get(format!("{}/readyz", server.base))
        .send()
        .unwrap()
        .status()
        .as_u16()
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

#[test]
fn desired_state_set_on_one_instance_while_offline_is_one_delta_when_the_device_comes_back_on_the_other() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let d = c.a.register(TOKEN, "late-riser", dir.path());
    // A device already on B, its subscriptions proven by a round trip, serves as a barrier (below).
    let runtime = runtime();
    let beacon = c.a.register(TOKEN, "beacon", dir.path());
    let beacon = runtime.block_on(async {
        let device = sdk_device(c.b.mqtts_port, &beacon);
        device.wait_connected(Duration::from_secs(10)).await.unwrap();
        device.shadow().report(json!({"up": true})).await.unwrap();
        device
    });
    let mut beacon_deltas = beacon.shadow().deltas();
    for desired in [
        json!({"light": "on"}),
        json!({"schedule": {"start": "07:00", "days": [1, 2, 3]}}),
        json!({"light": "dim", "level": 30}),
    ] {
        let (code, body, _) = api(
            &c.a,
            reqwest::Method::PATCH,
            "/v1/devices/late-riser/shadow",
            Some(json!({"state": {"desired": desired}})),
        );
        assert_eq!(code, 200, "{body}");
    }
    // The live deltas of those changes went through Redis to every instance, addressed to nobody. Once the
    // beacon's delta, PATCHed after them, has reached it on B, B has handled them too (Redis delivers a channel
    // in order): what late-riser gets next is the replay alone.
    api(
        &c.a,
        reqwest::Method::PATCH,
        "/v1/devices/beacon/shadow",
        Some(json!({"state": {"desired": {"blink": true}}})),
    );
    let barrier = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), beacon_deltas.next()).await })
        .expect("the beacon's delta arrives")
        .expect("the delta stream is open");
    assert_eq!(barrier.state["blink"], true);
    // A plain MQTT client on B: clean session, subscribed to its delta topic only, never asking for the shadow.
    // It waits for two messages for 8 s, so that a second delta would show.
    let mut listener = sub(&c.b, &d, "devices/late-riser/shadow/update/delta", 2, 8, &[]);
    let out = listener.output(Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one delta: {stdout}");
    let payload = lines[0]
        .strip_prefix("devices/late-riser/shadow/update/delta ")
        .unwrap_or_else(|| panic!("{stdout}"));
    let delta: Value = serde_json::from_str(payload).unwrap();
    assert_eq!(
        delta["state"],
        json!({"light": "dim", "level": 30, "schedule": {"start": "07:00", "days": [1, 2, 3]}}),
        "every pending field, newest values: {delta}"
    );
    assert_eq!(delta["version"], 3, "{delta}");
}

/// Waits for the next event on `events` for which `wanted` holds, skipping others; panics after `limit`.
fn next_event(
    events: &std::sync::mpsc::Receiver<Value>,
    limit: Duration,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match events.recv_timeout(left) {
            Ok(event) if wanted(&event) => return event,
            Ok(_) => {}
            Err(_) => panic!("no such event within {limit:?}"),
        }
    }
}

#[test]
fn the_event_stream_of_one_instance_carries_the_events_of_the_other_once() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let d = c.a.register(TOKEN, "lamp-1", dir.path());
    let events = c.a.events(TOKEN, "?device_id=lamp-1");
    let of = |kind: &'static str| move |e: &Value| e["type"] == kind;
    let wait = Duration::from_secs(10);

    let mut device = paho_connected(&c.b, &d, "hold", &[]);
    let connected = next_event(&events, wait, of("device.connected"));
    assert_eq!(connected["session"], status(&c.b, "lamp-1")["session"]);

    // A shadow change made through B, while A has a stream open.
    let (code, _, _) = api(
        &c.b,
        reqwest::Method::PATCH,
        "/v1/devices/lamp-1/shadow",
        Some(json!({"state": {"desired": {"on": true}}})),
    );
    assert_eq!(code, 200);
    let updated = next_event(&events, wait, of("shadow.updated"));
    assert_eq!(updated["version"], 1);

    // A revocation through B: A hears it, and the disconnect it causes on B.
    let (code, _, _) = api(
        &c.b,
        reqwest::Method::POST,
        &format!("/v1/devices/lamp-1/certificates/{}/revoke", d.serial),
        Some(json!({"reason": "key_compromise"})),
    );
    assert_eq!(code, 200);
    next_event(&events, wait, of("certificate.revoked"));
    let gone = next_event(&events, wait, of("device.disconnected"));
    assert_eq!(
        (gone["reason"].as_str(), gone["online"].as_bool()),
        (Some("revoked"), Some(false))
    );
    device.kill();

    // Each event once: nothing heard from the other instance is sent back to it and heard again.
    let mut echoes = Vec::new();
    while let Ok(event) = events.recv_timeout(Duration::from_secs(2)) {
        echoes.push(event);
    }
    assert!(echoes.is_empty(), "events heard twice: {echoes:?}");
}

#[test]
fn presence_stays_fleet_wide_when_an_instance_restarts_and_when_one_dies() {
    let env = ClusterEnv::new(&test_database());
    let env = env.vars();
    let dir = tempfile::tempdir().unwrap();
    let a = instance(dir.path(), "a", &env, &[]);
    let mut b = instance(dir.path(), "b", &env, &[]);
    let d = a.register(TOKEN, "fan-3", dir.path());
    let _device = paho_connected(&b, &d, "silent", &["--keepalive", "60"]);
    assert!(eventually(Duration::from_secs(5), || status(&a, "fan-3")
        ["online"]
        == true));

    // A stops and starts again: B still holds the device, so A shows it online, and lists it so.
    let status_a = a.terminate();
    assert!(status_a.success());
    let a = instance(dir.path(), "a", &env, &[]);
    let s = status(&a, "fan-3");
    assert_eq!(
        s["online"], true,
        "a restarted instance keeps a device that B holds online: {s}"
    );
    let online = a.get_json(TOKEN, "/v1/devices?online=true");
    assert!(
        online["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|dev| dev["id"] == "fan-3"),
        "{online}"
    );

    // B dies without a word: within its heartbeat's lapse, A shows the device offline and says so on its stream.
    let events = a.events(TOKEN, "?device_id=fan-3");
    b.child.kill().unwrap();
    let _ = b.child.wait();
    let gone = next_event(&events, Duration::from_secs(40), |e| {
        e["type"] == "device.disconnected"
    });
    assert_eq!(
        (gone["reason"].as_str(), gone["online"].as_bool()),
        (Some("server_shutdown"), Some(false))
    );
    let s = status(&a, "fan-3");
    assert_eq!(
        (s["online"].as_bool(), s["last_disconnect_reason"].as_str()),
        (Some(false), Some("server_shutdown")),
        "{s}"
    );
    assert!(eventually(Duration::from_secs(5), || {
        let online = a.get_json(TOKEN, "/v1/devices?online=true");
        online["items"].as_array().unwrap().is_empty()
    }));
}

#[test]
fn an_instance_taken_for_dead_while_it_stalled_announces_its_devices_again() {
    let env = ClusterEnv::new(&test_database());
    let env = env.vars();
    let dir = tempfile::tempdir().unwrap();
    let a = instance(dir.path(), "a", &env, &[]);
    let b = instance(dir.path(), "b", &env, &[]);
    let d = a.register(TOKEN, "pump-7", dir.path());
    let _device = paho_connected(&b, &d, "silent", &["--keepalive", "120"]);
    assert!(eventually(Duration::from_secs(5), || status(&a, "pump-7")
        ["online"]
        == true));
    let session = status(&b, "pump-7")["session"].clone();
    assert!(session.as_u64().unwrap() > 0, "{session}");
    let events = a.events(TOKEN, "?device_id=pump-7");

    // B stalls (as under a VM pause, or cut off from Redis) past its heartbeat's lapse: A takes it for dead.
    b.signal("STOP");
    let gone = next_event(&events, Duration::from_secs(40), |e| {
        e["type"] == "device.disconnected"
    });
    assert_eq!(gone["reason"], "server_shutdown", "{gone}");
    assert_eq!(status(&a, "pump-7")["online"], false);

    // B resumes. The device's connection to it never dropped: within a beat B finds itself out of the cluster,
    // joins again and announces the session, and A shows the device online in it, stored and on its stream.
    b.signal("CONT");
    let back = next_event(&events, Duration::from_secs(20), |e| {
        e["type"] == "device.connected"
    });
    assert_eq!(back["session"], session, "{back}");
    let s = status(&a, "pump-7");
    assert_eq!((&s["online"], &s["session"]), (&json!(true), &session), "{s}");
    assert!(
        eventually(Duration::from_secs(5), || {
            let online = a.get_json(TOKEN, "/v1/devices?online=true");
            online["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|dev| dev["id"] == "pump-7")
        }),
        "the database holds the device online again"
    );
    let s = status(&b, "pump-7");
    assert_eq!((&s["online"], &s["session"]), (&json!(true), &session), "{s}");
    // A session announced late never closes the device's session where it is: B's stays.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(status(&b, "pump-7")["online"], true);
}

/// `redis-cli` on the test Redis with `args`; its output, trimmed.
fn redis_cli(redis: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-u", redis])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "redis-cli {args:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An instance keeps beating while its look for dead instances is held up (here by a table lock in
/// PostgreSQL): a slow sweep used to delay the next heartbeat, and past the lapse the others would have taken
/// a live instance for dead.
#[test]
fn the_heartbeat_goes_on_while_a_sweep_for_dead_instances_is_held_up() {
    let db = test_database();
    let env = ClusterEnv::new(&db);
    let (redis, prefix) = (env.redis.clone(), env.prefix.clone());
    let vars = env.vars();
    let dir = tempfile::tempdir().unwrap();
    let _a = instance(dir.path(), "a", &vars, &[]);
    let beat_key = redis_cli(&redis, &["--scan", "--pattern", &format!("{prefix}instance:*")]);
    assert!(
        !beat_key.is_empty() && !beat_key.contains('\n'),
        "one heartbeat: {beat_key:?}"
    );

    // An instance that stopped beating, and a lock that holds up the sweep that marks its devices offline.
    let set = format!("{prefix}instances");
    redis_cli(&redis, &["SADD", &set, "ghost"]);
    // Longer than a lapse (15 s) less a beat (5 s): held up in the beat loop, the heartbeat would lapse below.
    const HELD: u64 = 20;
    let lock = std::process::Command::new("psql")
        .args([
            &db,
            "-qc",
            &format!(
                "BEGIN; LOCK TABLE device_presence IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep({HELD}); COMMIT;"
            ),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = Proc(lock);

    // Over the lock, the heartbeat's time to live never falls far: a beat every 5 s renews it to 15 s.
    let mut lowest = i64::MAX;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(HELD - 1) {
        let ttl: i64 = redis_cli(&redis, &["PTTL", &beat_key]).parse().unwrap();
        lowest = lowest.min(ttl);
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        redis_cli(&redis, &["SISMEMBER", &set, "ghost"]),
        "1",
        "the sweep was not held up"
    );
    assert!(
        lowest > 8_000,
        "the heartbeat's time to live fell to {lowest} ms during a held-up sweep"
    );
    drop(lock);
    // The sweep finishes once the lock is gone.
    assert!(eventually(Duration::from_secs(20), || redis_cli(
        &redis,
        &["SISMEMBER", &set, "ghost"]
    ) == "0"));
}
