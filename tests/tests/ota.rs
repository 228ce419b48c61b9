//! OTA through the real REST API and real MQTT connections (the SDK): a staged rollout over 50 simulated
//! devices that pauses at its failure threshold, an offline device that gets its job on reconnect, a rollback
//! that fails a succeeded job, a cancel that stops further waves, and bad device reports refused.

use std::collections::HashSet;
use std::time::Duration;

use antumbra_e2e::{eventually, runtime, DeviceFiles, Server};
use antumbra_sdk::{Config, Credentials, Device, Error, JobStatus, JobStep};
use serde_json::{json, Value};

const TOKEN: &str = "ota-e2e-admin-token-0123456789ab";

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

fn api(server: &Server, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::blocking::Client::new()
        .request(method, format!("{}{path}", server.base))
        .bearer_auth(TOKEN);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let res = req.send().unwrap();
    let status = res.status().as_u16();
    (status, res.json().unwrap_or(Value::Null))
}

/// Registers a device with a hardware model and tags, writing its credentials.
fn register(server: &Server, dir: &std::path::Path, id: &str, model: &str, tags: &[&str]) -> DeviceFiles {
    let (status, body) = api(
        server,
        reqwest::Method::POST,
        "/v1/devices",
        Some(json!({"id": id, "attributes": {"model": model}, "tags": tags})),
    );
    assert_eq!(status, 201, "{body}");
    DeviceFiles::from_registration(&body, dir)
}

fn firmware(server: &Server, version: &str, models: &[&str]) -> String {
    let (status, body) = api(
        server,
        reqwest::Method::POST,
        "/v1/firmware",
        Some(
            json!({"version": version, "models": models, "url": format!("https://fw.example/{version}.bin"), "sha256": "ab".repeat(32), "size": 1024}),
        ),
    );
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

fn connect(port: u16, d: &DeviceFiles) -> Device {
    let mut config = Config::new(
        "localhost",
        port,
        Credentials::from_files(&d.cert, &d.key, &d.ca).unwrap(),
    );
    config.max_backoff = Duration::from_secs(1);
    Device::connect(config).unwrap()
}

/// A simulated device: reports 1.0.0, then for each job downloads, installs and succeeds — or fails.
async fn simulate(device: Device, fail: bool) {
    device.wait_connected(Duration::from_secs(20)).await.unwrap();
    let ota = device.ota();
    let mut jobs = ota.jobs();
    ota.report_version("1.0.0").await.unwrap();
    while let Some(job) = jobs.next().await {
        if job.status != JobStatus::Queued {
            continue;
        }
        ota.progress(&job.job_id, JobStep::Downloading, 50).await.unwrap();
        ota.progress(&job.job_id, JobStep::Installing, 90).await.unwrap();
        if fail {
            ota.fail(&job.job_id, "flash write error").await.unwrap();
        } else {
            ota.report_version(&job.firmware.version).await.unwrap();
            let done = ota.succeed(&job.job_id).await.unwrap();
            assert_eq!(done["status"], "SUCCEEDED", "{done}");
        }
    }
}

fn deployment(server: &Server, id: &str) -> Value {
    api(
        server,
        reqwest::Method::GET,
        &format!("/v1/deployments/{id}"),
        None,
    )
    .1
}

#[test]
fn a_staged_rollout_over_fifty_devices_pauses_at_its_failure_threshold_and_cancel_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let mut devices = Vec::new();
    for i in 0..50 {
        devices.push(register(
            &server,
            dir.path(),
            &format!("esl-{i:02}"),
            "esl-2.9",
            &["fleet"],
        ));
    }
    // Two devices of another model: refused up front.
    register(&server, dir.path(), "esl-x1", "esl-4.2", &["fleet"]);
    register(&server, dir.path(), "esl-x2", "esl-4.2", &["fleet"]);
    let fw = firmware(&server, "2.0.0", &["esl-2.9"]);

    let runtime = runtime();
    let port = server.mqtts_port;
    // Wave 1 is esl-00..esl-05 (all succeed); in wave 2 (esl-06..esl-20) every even device fails.
    let failing: HashSet<usize> = (6..21).filter(|i| i % 2 == 0).collect();
    let handles: Vec<_> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let device = runtime.block_on(async { connect(port, d) });
            runtime.spawn(simulate(device, failing.contains(&i)))
        })
        .collect();
    assert!(eventually(Duration::from_secs(30), || server
        .metric("antumbra_mqtt_connections")
        >= 50.0));

    let (status, dep) = api(
        &server,
        reqwest::Method::POST,
        "/v1/deployments",
        Some(json!({"firmware_id": fw, "target": {"tag": "fleet"},
            "policy": {"wave_percentages": [10, 40, 100], "min_wait_secs": 0, "device_timeout_secs": 120,
                       "failure_threshold": {"percent": 10, "action": "pause"}}})),
    );
    assert_eq!(status, 201, "{dep}");
    let id = dep["id"].as_str().unwrap().to_owned();
    assert_eq!(dep["devices"], 52);
    let sizes: Vec<_> = dep["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["devices"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [6, 15, 31]);
    assert_eq!(
        dep["counts"]["rejected"], 2,
        "incompatible hardware is refused up front"
    );

    assert!(
        eventually(Duration::from_secs(60), || deployment(&server, &id)["status"]
            == "paused"),
        "{}",
        deployment(&server, &id)
    );
    let paused = deployment(&server, &id);
    assert!(
        paused["status_reason"]
            .as_str()
            .unwrap()
            .contains("failure threshold"),
        "{paused}"
    );
    assert_eq!(paused["waves"][0]["counts"]["succeeded"], 6, "{paused}");
    assert!(
        paused["waves"][1]["counts"]["failed"].as_u64().unwrap() >= 6,
        "{paused}"
    );
    assert_eq!(
        paused["waves"][2]["started"], false,
        "the rollout stopped before wave 3: {paused}"
    );
    assert_eq!(paused["waves"][2]["counts"]["queued"], 0);

    // Every transition is on record with its time.
    let (_, jobs) = api(
        &server,
        reqwest::Method::GET,
        &format!("/v1/deployments/{id}/jobs"),
        None,
    );
    let done = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["device_id"] == "esl-00")
        .unwrap();
    let steps: Vec<_> = done["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["status"].clone(), t["step"].clone()))
        .collect();
    assert_eq!(
        steps,
        [
            (json!("QUEUED"), Value::Null),
            (json!("IN_PROGRESS"), json!("DOWNLOADING")),
            (json!("IN_PROGRESS"), json!("INSTALLING")),
            (json!("SUCCEEDED"), Value::Null),
        ]
    );
    let failed = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["device_id"] == "esl-06")
        .unwrap();
    assert_eq!(
        (failed["status"].clone(), failed["reason"].clone()),
        (json!("FAILED"), json!("flash write error"))
    );
    let rejected = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["device_id"] == "esl-x1")
        .unwrap();
    assert!(rejected["reason"]
        .as_str()
        .unwrap()
        .contains("incompatible hardware"));

    // Cancel: still no wave 3, and the firmware cannot be deleted while a deployment uses it.
    let (status, canceled) = api(
        &server,
        reqwest::Method::POST,
        &format!("/v1/deployments/{id}/cancel"),
        None,
    );
    assert_eq!((status, canceled["status"].clone()), (200, json!("canceled")));
    std::thread::sleep(Duration::from_secs(1));
    let after = deployment(&server, &id);
    assert_eq!(
        (after["status"].clone(), after["waves"][2]["started"].clone()),
        (json!("canceled"), json!(false))
    );
    let (status, body) = api(
        &server,
        reqwest::Method::POST,
        &format!("/v1/deployments/{id}/resume"),
        None,
    );
    assert_eq!(
        (status, body["code"].clone()),
        (409, json!("invalid_deployment_state"))
    );
    let (status, body) = api(
        &server,
        reqwest::Method::DELETE,
        &format!("/v1/firmware/{fw}"),
        None,
    );
    assert_eq!((status, body["code"].clone()), (409, json!("firmware_in_use")));
    for h in handles {
        h.abort();
    }
}

#[test]
fn an_offline_device_gets_its_job_on_reconnect_and_a_rollback_fails_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let a = register(&server, dir.path(), "pump-a", "p1", &[]);
    let b = register(&server, dir.path(), "pump-b", "p1", &[]);
    let fw = firmware(&server, "3.1.0", &["p1"]);
    let runtime = runtime();
    let port = server.mqtts_port;

    let device_a = runtime.block_on(async { connect(port, &a) });
    let a_task = runtime.spawn(simulate(device_a.clone(), false));
    runtime
        .block_on(device_a.wait_connected(Duration::from_secs(10)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // pump-b is offline when the deployment starts.
    let (status, dep) = api(
        &server,
        reqwest::Method::POST,
        "/v1/deployments",
        Some(
            json!({"firmware_id": fw, "target": {"device_ids": ["pump-a", "pump-b"]}, "policy": {"device_timeout_secs": 120}}),
        ),
    );
    assert_eq!(status, 201, "{dep}");
    let id = dep["id"].as_str().unwrap().to_owned();
    assert!(eventually(Duration::from_secs(20), || deployment(&server, &id)
        ["counts"]["succeeded"]
        == 1));
    assert_eq!(
        deployment(&server, &id)["counts"]["queued"],
        1,
        "pump-b's job waits"
    );

    // pump-b connects: its job arrives without anything else happening.
    let device_b = runtime.block_on(async { connect(port, &b) });
    let b_task = runtime.spawn(simulate(device_b, false));
    assert!(
        eventually(Duration::from_secs(20), || deployment(&server, &id)["status"]
            == "completed"),
        "{}",
        deployment(&server, &id)
    );
    let done = deployment(&server, &id);
    assert_eq!(done["counts"]["succeeded"], 2);

    // A rollback: pump-a reports the old version again while the deployment is still active.
    let (_, dep2) = api(
        &server,
        reqwest::Method::POST,
        "/v1/deployments",
        Some(
            json!({"firmware_id": firmware(&server, "3.2.0", &["p1"]), "target": {"device_ids": ["pump-a"]},
            "policy": {"device_timeout_secs": 120, "wave_size": 1, "min_wait_secs": 3600}}),
        ),
    );
    let id2 = dep2["id"].as_str().unwrap().to_owned();
    assert!(eventually(Duration::from_secs(20), || deployment(&server, &id2)
        ["counts"]["succeeded"]
        == 1));
    // Its one wave is done, but the minimum wait follows the last wave too: still running.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(deployment(&server, &id2)["status"], "running");
    runtime.block_on(async { device_a.ota().report_version("3.1.0").await.unwrap() });
    assert!(
        eventually(Duration::from_secs(5), || deployment(&server, &id2)["counts"]
            ["failed"]
            == 1),
        "{}",
        deployment(&server, &id2)
    );
    let (_, jobs) = api(
        &server,
        reqwest::Method::GET,
        &format!("/v1/deployments/{id2}/jobs"),
        None,
    );
    assert!(
        jobs[0]["reason"].as_str().unwrap().contains("rolled back"),
        "{jobs}"
    );
    a_task.abort();
    b_task.abort();
}

#[test]
fn bad_device_reports_are_rejected_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let a = register(&server, dir.path(), "cam-a", "c1", &[]);
    register(&server, dir.path(), "cam-b", "c1", &[]);
    let fw = firmware(&server, "1.1.0", &["c1"]);
    let (_, dep) = api(
        &server,
        reqwest::Method::POST,
        "/v1/deployments",
        Some(json!({"firmware_id": fw, "target": {"device_ids": ["cam-a", "cam-b"]}, "policy": {}})),
    );
    let id = dep["id"].as_str().unwrap().to_owned();
    let (_, jobs) = api(
        &server,
        reqwest::Method::GET,
        &format!("/v1/deployments/{id}/jobs"),
        None,
    );
    let job_of = |dev: &str| {
        jobs.as_array()
            .unwrap()
            .iter()
            .find(|j| j["device_id"] == dev)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (job_a, job_b) = (job_of("cam-a"), job_of("cam-b"));
    let runtime = runtime();
    let port = server.mqtts_port;
    runtime.block_on(async {
        let device = connect(port, &a);
        device.wait_connected(Duration::from_secs(10)).await.unwrap();
        let ota = device.ota();
        let code = |r: Result<Value, Error>| match r {
            Err(Error::Rejected { code, .. }) => code,
            other => panic!("expected a rejection, got {other:?}"),
        };
        assert_eq!(
            code(ota.progress("job_000000000000", JobStep::Downloading, 1).await),
            404,
            "unknown job"
        );
        assert_eq!(
            code(ota.progress(&job_b, JobStep::Downloading, 1).await),
            403,
            "another device's job"
        );
        assert_eq!(
            code(ota.progress(&job_a, JobStep::Downloading, 101).await),
            400,
            "progress over 100"
        );
        // Success without reporting the new version: the platform trusts the shadow, so the job fails.
        let failed = ota.succeed(&job_a).await.unwrap();
        assert_eq!(failed["status"], "FAILED");
        assert!(
            failed["reason"].as_str().unwrap().contains("no firmware version"),
            "{failed}"
        );
        assert_eq!(
            code(ota.progress(&job_a, JobStep::Installing, 5).await),
            409,
            "a finished job takes no more reports"
        );
        device.disconnect().await;
    });
    let (_, jobs) = api(
        &server,
        reqwest::Method::GET,
        &format!("/v1/deployments/{id}/jobs"),
        None,
    );
    let b_job = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["device_id"] == "cam-b")
        .unwrap();
    assert_eq!(
        (
            b_job["status"].clone(),
            b_job["transitions"].as_array().unwrap().len()
        ),
        (json!("QUEUED"), 1),
        "cam-b's job untouched"
    );
}

#[test]
fn the_firmware_catalogue_validates_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let good = json!({"version": "1.0.0", "models": ["m1"], "url": "https://fw.example/a.bin", "sha256": "0f".repeat(32), "size": 10});
    let (status, created) = api(&server, reqwest::Method::POST, "/v1/firmware", Some(good.clone()));
    assert_eq!(status, 201);
    let (status, body) = api(&server, reqwest::Method::POST, "/v1/firmware", Some(good.clone()));
    assert_eq!(
        (status, body["code"].clone()),
        (409, json!("firmware_version_exists"))
    );
    let mut other_model = good.clone();
    other_model["models"] = json!(["m2"]);
    assert_eq!(
        api(&server, reqwest::Method::POST, "/v1/firmware", Some(other_model)).0,
        201,
        "same version, other model"
    );
    for (field, value) in [
        ("version", json!("1.0")),
        ("models", json!([])),
        ("models", json!(["bad model"])),
        ("url", json!("ftp://x")),
        ("sha256", json!("xyz")),
        ("size", json!(0)),
        ("size", json!(-1)),
        ("signature", json!("")),
    ] {
        let mut body = good.clone();
        body[field] = value.clone();
        body["version"] = if field == "version" { value } else { json!("9.9.9") };
        let (status, err) = api(&server, reqwest::Method::POST, "/v1/firmware", Some(body));
        assert_eq!(status, 400, "{field}: {err}");
    }
    let (_, list) = api(&server, reqwest::Method::GET, "/v1/firmware?model=m1", None);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let id = created["id"].as_str().unwrap();
    assert_eq!(
        api(
            &server,
            reqwest::Method::DELETE,
            &format!("/v1/firmware/{id}"),
            None
        )
        .0,
        204
    );
    assert_eq!(
        api(&server, reqwest::Method::GET, &format!("/v1/firmware/{id}"), None).1["code"],
        "firmware_not_found"
    );
    let (status, body) = api(
        &server,
        reqwest::Method::POST,
        "/v1/deployments",
        Some(json!({"firmware_id": "fw_nope", "target": {"tag": "x"}, "policy": {}})),
    );
    assert_eq!((status, body["code"].clone()), (400, json!("invalid_request")));
}

#[test]
fn downgrades_are_refused_devices_time_out_and_an_abort_cancels_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let ahead = register(&server, dir.path(), "gw-ahead", "g1", &[]);
    register(&server, dir.path(), "gw-silent-1", "g1", &[]);
    register(&server, dir.path(), "gw-silent-2", "g1", &[]);
    register(&server, dir.path(), "gw-later", "g1", &[]);
    let runtime = runtime();
    let port = server.mqtts_port;
    // gw-ahead already runs 5.0.0.
    runtime.block_on(async {
        let device = connect(port, &ahead);
        device.wait_connected(Duration::from_secs(10)).await.unwrap();
        device.ota().report_version("5.0.0").await.unwrap();
        device.disconnect().await;
    });
    let old = firmware(&server, "4.0.0", &["g1"]);
    let (_, dep) = api(
        &server,
        reqwest::Method::POST,
        "/v1/deployments",
        Some(json!({"firmware_id": old, "target": {"device_ids": ["gw-ahead"]}, "policy": {}})),
    );
    let (_, jobs) = api(
        &server,
        reqwest::Method::GET,
        &format!("/v1/deployments/{}/jobs", dep["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(jobs[0]["status"], "REJECTED");
    assert!(
        jobs[0]["reason"].as_str().unwrap().contains("downgrade"),
        "{jobs}"
    );
    let (_, allowed) = api(
        &server,
        reqwest::Method::POST,
        "/v1/deployments",
        Some(
            json!({"firmware_id": old, "target": {"device_ids": ["gw-ahead"]}, "policy": {}, "allow_downgrade": true}),
        ),
    );
    assert_eq!(
        allowed["counts"]["queued"], 1,
        "allowed when the deployment says so"
    );

    // Two silent devices time out after 1 s; the threshold (count 2) aborts; the last wave never starts.
    let new = firmware(&server, "6.0.0", &["g1"]);
    let (status, dep) = api(
        &server,
        reqwest::Method::POST,
        "/v1/deployments",
        Some(
            json!({"firmware_id": new, "target": {"device_ids": ["gw-silent-1", "gw-silent-2", "gw-later"]},
            "policy": {"wave_size": 2, "device_timeout_secs": 1, "failure_threshold": {"count": 2, "action": "abort"}}}),
        ),
    );
    assert_eq!(status, 201, "{dep}");
    let id = dep["id"].as_str().unwrap().to_owned();
    assert!(
        eventually(Duration::from_secs(10), || deployment(&server, &id)["status"]
            == "aborted"),
        "{}",
        deployment(&server, &id)
    );
    let d = deployment(&server, &id);
    assert_eq!(d["counts"]["timed_out"], 2, "{d}");
    assert_eq!(d["waves"][1]["started"], false, "{d}");
    assert!(d["status_reason"].as_str().unwrap().contains("failure threshold"));
    let (_, jobs) = api(
        &server,
        reqwest::Method::GET,
        &format!("/v1/deployments/{id}/jobs"),
        None,
    );
    let timed_out = &jobs.as_array().unwrap()[0];
    assert_eq!(
        timed_out["transitions"].as_array().unwrap().last().unwrap()["status"],
        "TIMED_OUT"
    );
}
