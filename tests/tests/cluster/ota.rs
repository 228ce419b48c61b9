//! OTA across instances: a deployment made through one instance reaches a device connected to another, its
//! reports there are on record for the first, and a staged rollout driven by every instance gives each device
//! exactly one job.

use std::time::Duration;

use antumbra_e2e::{eventually, runtime, DeviceFiles, Server};
use serde_json::{json, Value};

use super::{api, cluster, sdk_device};

/// Registers a device of hardware model `model` through `server`, writing its credentials into `dir`.
fn register_model(server: &Server, dir: &std::path::Path, id: &str, model: &str) -> DeviceFiles {
    let (code, body, _) = api(
        server,
        reqwest::Method::POST,
        "/v1/devices",
        Some(json!({"id": id, "attributes": {"model": model}})),
    );
    assert_eq!(code, 201, "{body}");
    DeviceFiles::from_registration(&body, dir)
}

fn firmware(server: &Server, version: &str, model: &str) -> String {
    let (code, body, _) = api(
        server,
        reqwest::Method::POST,
        "/v1/firmware",
        Some(
            json!({"version": version, "models": [model], "url": format!("https://fw.example/{version}.bin"),
                    "sha256": "cd".repeat(32), "size": 2048}),
        ),
    );
    assert_eq!(code, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

fn jobs(server: &Server, deployment: &str) -> Vec<Value> {
    let (code, body, _) = api(
        server,
        reqwest::Method::GET,
        &format!("/v1/deployments/{deployment}/jobs"),
        None,
    );
    assert_eq!(code, 200, "{body}");
    body.as_array().unwrap().clone()
}

#[test]
fn a_deployment_made_on_one_instance_reaches_a_device_on_the_other_and_its_reports_are_recorded() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let d = register_model(&c.a, dir.path(), "pump-7", "pump-v2");
    let runtime = runtime();
    let (device, mut job_feed) = runtime.block_on(async {
        let device = sdk_device(c.b.mqtts_port, &d);
        device.wait_connected(Duration::from_secs(10)).await.unwrap();
        let feed = device.ota().jobs();
        device.ota().report_version("1.0.0").await.unwrap();
        (device, feed)
    });
    let fw = firmware(&c.a, "1.1.0", "pump-v2");
    let (code, dep, _) = api(
        &c.a,
        reqwest::Method::POST,
        "/v1/deployments",
        Some(json!({"firmware_id": fw, "target": {"device_ids": ["pump-7"]},
                    "policy": {"device_timeout_secs": 120}})),
    );
    assert_eq!(code, 201, "{dep}");
    let deployment = dep["id"].as_str().unwrap().to_owned();

    // The job reaches the device on B, pushed at once.
    let job = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), job_feed.next()).await })
        .expect("the job document arrives on B")
        .expect("the job stream is open");
    assert_eq!(
        (job.deployment_id.as_str(), job.firmware.version.as_str()),
        (deployment.as_str(), "1.1.0")
    );
    // Its progress, reported on B, is on record for A.
    let ota = device.ota();
    let accepted = runtime
        .block_on(ota.progress(&job.job_id, antumbra_sdk::JobStep::Downloading, 40))
        .unwrap();
    assert_eq!(accepted["status"], "IN_PROGRESS", "{accepted}");
    let on_a = jobs(&c.a, &deployment);
    assert_eq!(on_a.len(), 1, "{on_a:?}");
    assert_eq!(
        (
            on_a[0]["status"].clone(),
            on_a[0]["step"].clone(),
            on_a[0]["progress"].clone()
        ),
        (json!("IN_PROGRESS"), json!("DOWNLOADING"), json!(40)),
        "{}",
        on_a[0]
    );
    runtime.block_on(async {
        ota.report_version("1.1.0").await.unwrap();
        let done = ota.succeed(&job.job_id).await.unwrap();
        assert_eq!(done["status"], "SUCCEEDED", "{done}");
    });
    assert!(
        eventually(Duration::from_secs(10), || {
            api(
                &c.a,
                reqwest::Method::GET,
                &format!("/v1/deployments/{deployment}"),
                None,
            )
            .1["status"]
                == "completed"
        }),
        "A sees the deployment completed"
    );
}

#[test]
fn a_staged_rollout_over_devices_on_both_instances_gives_each_device_exactly_one_job() {
    // Both instances run the rollout engine on the same deployments: a wave must still start only once.
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime();
    let mut handles = Vec::new();
    for i in 0..6 {
        let id = format!("valve-{i}");
        let d = register_model(&c.a, dir.path(), &id, "valve-v1");
        let port = if i % 2 == 0 {
            c.a.mqtts_port
        } else {
            c.b.mqtts_port
        };
        let device = runtime.block_on(async { sdk_device(port, &d) });
        handles.push(runtime.spawn(async move {
            device.wait_connected(Duration::from_secs(20)).await.unwrap();
            let ota = device.ota();
            let mut feed = ota.jobs();
            ota.report_version("1.0.0").await.unwrap();
            while let Some(job) = feed.next().await {
                if job.status != antumbra_sdk::JobStatus::Queued {
                    continue;
                }
                ota.progress(&job.job_id, antumbra_sdk::JobStep::Installing, 80)
                    .await
                    .unwrap();
                ota.report_version(&job.firmware.version).await.unwrap();
                ota.succeed(&job.job_id).await.unwrap();
            }
        }));
    }
    assert!(eventually(Duration::from_secs(20), || {
        c.a.metric("antumbra_mqtt_connections") + c.b.metric("antumbra_mqtt_connections") == 6.0
    }));
    let fw = firmware(&c.b, "1.2.0", "valve-v1");
    let (code, dep, _) = api(
        &c.b,
        reqwest::Method::POST,
        "/v1/deployments",
        Some(
            json!({"firmware_id": fw, "target": {"attributes": {"model": "valve-v1"}},
                    "policy": {"wave_size": 2, "min_wait_secs": 0, "device_timeout_secs": 120}}),
        ),
    );
    assert_eq!(code, 201, "{dep}");
    let deployment = dep["id"].as_str().unwrap().to_owned();
    let status = |s: &Server| {
        api(
            s,
            reqwest::Method::GET,
            &format!("/v1/deployments/{deployment}"),
            None,
        )
        .1
    };
    assert!(
        eventually(Duration::from_secs(60), || status(&c.a)["status"] == "completed"),
        "{}",
        status(&c.a)
    );
    let all = jobs(&c.b, &deployment);
    let mut devices: Vec<&str> = all.iter().map(|j| j["device_id"].as_str().unwrap()).collect();
    devices.sort();
    assert_eq!(
        devices,
        ["valve-0", "valve-1", "valve-2", "valve-3", "valve-4", "valve-5"],
        "one job per device: {all:?}"
    );
    assert!(all.iter().all(|j| j["status"] == "SUCCEEDED"), "{all:?}");
    for h in handles {
        h.abort();
    }
}
