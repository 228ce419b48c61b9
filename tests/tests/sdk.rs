//! The Rust device SDK against the real `antumbra` process: register through REST, connect with the SDK,
//! desired state through REST arrives as deltas — live, after the device was offline, and across a server
//! restart.

use std::time::Duration;

use antumbra_e2e::{runtime, DeviceFiles, Server};
use antumbra_sdk::{Config, Credentials, Device, Error};
use serde_json::{json, Value};

const TOKEN: &str = "sdk-e2e-admin-token-0123456789ab";

fn start(dir: &std::path::Path, http: &str, mqtts: &str) -> Server {
    Server::start(
        &[
            "--data-dir",
            dir.join("data").to_str().unwrap(),
            "--http",
            http,
            "--mqtts",
            mqtts,
        ],
        &[("ANTUMBRA_ADMIN_TOKEN", TOKEN)],
    )
}

fn connect(server_port: u16, d: &DeviceFiles) -> Device {
    let credentials = Credentials::from_files(&d.cert, &d.key, &d.ca).unwrap();
    assert_eq!(
        credentials.device_id().as_str(),
        d.id,
        "the client id comes from the certificate"
    );
    let mut config = Config::new("localhost", server_port, credentials);
    config.max_backoff = Duration::from_secs(1);
    config.request_timeout = Duration::from_secs(5);
    Device::connect(config).unwrap()
}

fn patch(base: &str, id: &str, body: Value) -> Value {
    let res = reqwest::blocking::Client::new()
        .patch(format!("{base}/v1/devices/{id}/shadow"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json().unwrap()
}

#[test]
fn live_deltas_reports_and_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let d = server.register(TOKEN, "thermo-1", dir.path());
    let base = server.base.clone();
    runtime().block_on(async move {
        let device = connect(server.mqtts_port, &d);
        device.wait_connected(Duration::from_secs(10)).await.unwrap();
        let shadow = device.shadow();
        let mut deltas = shadow.deltas();
        assert!(matches!(
            shadow.get().await,
            Err(Error::Rejected { code: 404, .. })
        ));

        let v1 = shadow.report(json!({"temperature": 19.5})).await.unwrap();
        assert_eq!(v1, 1);
        let base2 = base.clone();
        tokio::task::spawn_blocking(move || {
            patch(&base2, "thermo-1", json!({"state": {"desired": {"target": 21}}}))
        })
        .await
        .unwrap();
        let delta = tokio::time::timeout(Duration::from_secs(5), deltas.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((delta.state.clone(), delta.version), (json!({"target": 21}), 2));
        #[derive(serde::Deserialize)]
        struct Desired {
            target: Option<f64>,
        }
        assert_eq!(delta.parse::<Desired>().unwrap().target, Some(21.0));

        let v3 = shadow.report(json!({"target": 21})).await.unwrap();
        assert_eq!(v3, 3);
        let doc = shadow.get().await.unwrap();
        assert_eq!((doc.delta.clone(), doc.version), (json!({}), 3));
        assert_eq!(doc.reported, json!({"temperature": 19.5, "target": 21}));

        match shadow.update(json!({"reported": {"x": 1}}), Some(1)).await {
            Err(Error::Rejected {
                code: 409,
                version: Some(3),
                ..
            }) => {}
            other => panic!("expected a 409 naming version 3, got {other:?}"),
        }
        assert!(matches!(
            shadow.update(json!({"reported": 5}), None).await,
            Err(Error::Rejected { code: 400, .. })
        ));

        let named = device.named_shadow("config");
        assert_eq!(named.report(json!({"mode": "eco"})).await.unwrap(), 1);
        assert_eq!(named.get().await.unwrap().reported, json!({"mode": "eco"}));
        device.disconnect().await;
    });
}

#[test]
fn desired_state_set_while_offline_arrives_on_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let d = server.register(TOKEN, "label-7", dir.path());
    let base = server.base.clone();
    let port = server.mqtts_port;
    patch(&base, "label-7", json!({"state": {"reported": {"price": 1}}}));
    patch(&base, "label-7", json!({"state": {"desired": {"price": 2}}}));
    let last = patch(
        &base,
        "label-7",
        json!({"state": {"desired": {"price": 3, "color": "red"}}}),
    );
    runtime().block_on(async move {
        let device = connect(port, &d);
        let mut deltas = device.shadow().deltas();
        let delta = tokio::time::timeout(Duration::from_secs(10), deltas.next())
            .await
            .expect("a delta on connect")
            .unwrap();
        assert_eq!(delta.state, json!({"price": 3, "color": "red"}));
        assert_eq!(Some(delta.version), last["version"].as_u64());
        // The replay on subscribe and the SDK's own get both carry this version: it arrives once.
        assert!(
            tokio::time::timeout(Duration::from_millis(700), deltas.next())
                .await
                .is_err(),
            "no duplicate"
        );
        device.disconnect().await;
    });
}

#[test]
fn a_server_restart_mid_session_loses_no_desired_state() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let d = server.register(TOKEN, "purifier-3", dir.path());
    let (http, mqtts) = (
        server.base.trim_start_matches("http://").to_owned(),
        server.mqtts_port,
    );
    let runtime = runtime();
    let device = runtime.block_on(async {
        let device = connect(mqtts, &d);
        device.wait_connected(Duration::from_secs(10)).await.unwrap();
        device
    });
    let mut deltas = device.shadow().deltas();
    patch(
        &server.base,
        "purifier-3",
        json!({"state": {"desired": {"fan": 1}}}),
    );
    let first = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), deltas.next())
            .await
            .unwrap()
            .unwrap()
    });
    assert_eq!(first.state, json!({"fan": 1}));

    // Restart the server on the same ports; set desired state before the device has reconnected.
    assert!(server.terminate().success());
    let server = start(dir.path(), &http, &format!("127.0.0.1:{mqtts}"));
    patch(
        &server.base,
        "purifier-3",
        json!({"state": {"desired": {"fan": 2, "mode": "night"}}}),
    );
    let again = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(15), deltas.next())
            .await
            .expect("resynced")
            .unwrap()
    });
    assert_eq!(again.state, json!({"fan": 2, "mode": "night"}));
    assert_eq!(again.version, 2);
    runtime.block_on(async {
        device.wait_connected(Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            device
                .shadow()
                .report(json!({"fan": 2, "mode": "night"}))
                .await
                .unwrap(),
            3
        );
        device.disconnect().await;
    });
    let doc: Value = server.get_json(TOKEN, "/v1/devices/purifier-3/shadow");
    assert!(doc["state"].get("delta").is_none(), "{doc}");
}

#[test]
fn the_thermostat_and_ota_examples_run_as_the_readme_says() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let d = server.register(TOKEN, "thermostat-17", dir.path());
    let port = server.mqtts_port.to_string();
    let args = [
        port.as_str(),
        d.cert.to_str().unwrap(),
        d.key.to_str().unwrap(),
        d.ca.to_str().unwrap(),
    ];
    let mut thermostat = antumbra_e2e::Proc(
        Command::new(antumbra_e2e::example_bin("thermostat"))
            .arg("localhost")
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = thermostat.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    assert_eq!(
        lines.recv_timeout(Duration::from_secs(20)).unwrap(),
        "connected as thermostat-17"
    );
    assert!(antumbra_e2e::eventually(Duration::from_secs(10), || {
        server.get_json(TOKEN, "/v1/devices/thermostat-17/shadow")["state"]["reported"]["target"] == 20.0
    }));
    patch(
        &server.base,
        "thermostat-17",
        json!({"state": {"desired": {"target": 22.5}}}),
    );
    let line = lines.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(line.starts_with("desired target 22.5"), "{line}");
    assert!(antumbra_e2e::eventually(Duration::from_secs(10), || {
        server.get_json(TOKEN, "/v1/devices/thermostat-17/shadow")["state"]
            .get("delta")
            .is_none()
    }));
    thermostat.kill();

    // The OTA client takes a deployment's job through to SUCCEEDED.
    let (status, _) = {
        let res = reqwest::blocking::Client::new()
            .patch(format!("{}/v1/devices/thermostat-17", server.base))
            .bearer_auth(TOKEN)
            .json(&json!({"attributes": {"model": "th-1"}}))
            .send()
            .unwrap();
        (res.status().as_u16(), ())
    };
    assert_eq!(status, 200);
    let mut client = antumbra_e2e::Proc(
        Command::new(antumbra_e2e::example_bin("ota_client"))
            .arg("localhost")
            .args(args)
            .arg("1.0.0")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut out = BufReader::new(client.0.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok);
    assert!(out.next().unwrap().contains("runs firmware 1.0.0"));
    let http = reqwest::blocking::Client::new();
    let fw: Value = http
        .post(format!("{}/v1/firmware", server.base))
        .bearer_auth(TOKEN)
        .json(&json!({"version": "1.1.0", "models": ["th-1"], "url": "https://fw.example/th-1.1.0.bin", "sha256": "cd".repeat(32), "size": 2048}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let dep: Value = http
        .post(format!("{}/v1/deployments", server.base))
        .bearer_auth(TOKEN)
        .json(&json!({"firmware_id": fw["id"], "target": {"device_ids": ["thermostat-17"]}, "policy": {}}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let id = dep["id"].as_str().unwrap().to_owned();
    assert!(out.next().unwrap().contains("install 1.1.0"));
    assert!(out.next().unwrap().ends_with("is \"SUCCEEDED\""));
    assert!(antumbra_e2e::eventually(Duration::from_secs(10), || server
        .get_json(TOKEN, &format!("/v1/deployments/{id}"))["status"]
        == "completed"));
    client.kill();
}
