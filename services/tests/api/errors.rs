//! Every bad input gets a 4xx with a stable code, and leaves nothing half-written.

use std::process::Command;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{assert_error, spawn_app, Backend, TestApp, ADMIN};
use crate::on_both_backends;

on_both_backends!(
    malformed_or_mistyped_bodies_are_400,
    invalid_device_ids_are_400_in_body_and_path,
    duplicate_registration_is_409_and_keeps_the_first,
    oversized_bodies_are_413,
    bad_csrs_are_refused_and_leave_no_device_behind,
    unknown_routes_methods_and_devices_answer_json,
);

async fn raw_post(app: &TestApp, path: &str, body: &'static str) -> reqwest::Response {
    app.request(Method::POST, path, Some(ADMIN))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn device_count(app: &TestApp) -> usize {
    let list: Value = app.get("/v1/devices").await.json().await.unwrap();
    list["items"].as_array().unwrap().len()
}

async fn malformed_or_mistyped_bodies_are_400(backend: Backend) {
    let app = spawn_app(backend).await;
    assert_error(
        raw_post(&app, "/v1/devices", "{\"id\": ").await,
        400,
        "invalid_json",
    )
    .await;
    assert_error(
        raw_post(&app, "/v1/devices", "not json").await,
        400,
        "invalid_json",
    )
    .await;
    assert_error(
        raw_post(&app, "/v1/devices", "{\"id\": 5}").await,
        400,
        "invalid_request",
    )
    .await;
    assert_error(
        raw_post(&app, "/v1/devices", "{\"id\": \"a\", \"tags\": \"x\"}").await,
        400,
        "invalid_request",
    )
    .await;
    assert_error(
        raw_post(&app, "/v1/devices", "{\"id\": \"a\", \"attributes\": [1]}").await,
        400,
        "invalid_request",
    )
    .await;
    assert_error(
        raw_post(&app, "/v1/devices", "{\"id\": \"a\", \"colour\": \"red\"}").await,
        400,
        "invalid_request",
    )
    .await;
    assert_error(raw_post(&app, "/v1/devices", "[]").await, 400, "invalid_request").await;
    let long_name = json!({"id": "a", "name": "n".repeat(257)});
    assert_error(app.post("/v1/devices", long_name).await, 400, "invalid_request").await;
    let many_tags = json!({"id": "a", "tags": (0..65).map(|i| format!("t{i}")).collect::<Vec<_>>()});
    assert_error(app.post("/v1/devices", many_tags).await, 400, "invalid_request").await;
    let text = app
        .request(Method::POST, "/v1/devices", Some(ADMIN))
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_error(text, 415, "unsupported_media_type").await;
    let bad_limit = app.get("/v1/devices?limit=0").await;
    assert_error(bad_limit, 400, "invalid_request").await;
    assert_error(app.get("/v1/devices?limit=abc").await, 400, "invalid_request").await;
    assert_eq!(device_count(&app).await, 0, "nothing was written");
}

async fn invalid_device_ids_are_400_in_body_and_path(backend: Backend) {
    let app = spawn_app(backend).await;
    for bad in [
        "",
        "a/b",
        "a+b",
        "a#b",
        "$SYS",
        "with space",
        "ü",
        &"x".repeat(129),
    ] {
        assert_error(
            app.post("/v1/devices", json!({"id": bad})).await,
            400,
            "invalid_device_id",
        )
        .await;
    }
    for bad in ["a+b", "%23", "%24SYS", "with%20space"] {
        assert_error(
            app.get(&format!("/v1/devices/{bad}")).await,
            400,
            "invalid_device_id",
        )
        .await;
    }
    assert_eq!(
        app.post("/v1/devices", json!({"id": "x".repeat(128)}))
            .await
            .status(),
        201,
        "128 is allowed"
    );
    assert_eq!(device_count(&app).await, 1);
}

async fn duplicate_registration_is_409_and_keeps_the_first(backend: Backend) {
    let app = spawn_app(backend).await;
    let first = app.register("dup").await;
    assert_error(
        app.post("/v1/devices", json!({"id": "dup", "name": "second"}))
            .await,
        409,
        "device_already_exists",
    )
    .await;
    let d: Value = app.get("/v1/devices/dup").await.json().await.unwrap();
    assert_eq!(d["name"], Value::Null, "the first registration stands");
    let certs: Value = app
        .get("/v1/devices/dup/certificates")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        certs.as_array().unwrap().len(),
        1,
        "no second certificate was recorded"
    );
    assert_eq!(certs[0]["serial"], first["certificate"]["serial"]);
    // Ids are case-sensitive: DUP is another device.
    assert_eq!(app.post("/v1/devices", json!({"id": "DUP"})).await.status(), 201);
}

async fn oversized_bodies_are_413(backend: Backend) {
    let app = spawn_app(backend).await;
    let huge = json!({"id": "big", "attributes": {"blob": "x".repeat(70 * 1024)}});
    assert_error(app.post("/v1/devices", huge).await, 413, "payload_too_large").await;
    // Under the body limit but over the attribute limit: 400 with the reason.
    let large = json!({"id": "big", "attributes": {"blob": "x".repeat(20 * 1024)}});
    assert_error(app.post("/v1/devices", large).await, 400, "invalid_request").await;
    assert_eq!(device_count(&app).await, 0);
}

fn openssl_csr(dir: &std::path::Path, keygen: &[&str], cn: &str) -> String {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args([
            "req",
            "-new",
            "-nodes",
            "-keyout",
            "csr-key.pem",
            "-subj",
            &format!("/CN={cn}"),
        ])
        .args(keygen)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

async fn bad_csrs_are_refused_and_leave_no_device_behind(backend: Backend) {
    let app = spawn_app(backend).await;
    let p256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"];
    let cases = [
        ("garbage", "invalid_csr"),
        (
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "invalid_csr",
        ),
    ];
    for (csr, code) in cases {
        assert_error(
            app.post("/v1/devices", json!({"id": "csr-dev", "csr": csr}))
                .await,
            400,
            code,
        )
        .await;
    }
    let other = openssl_csr(app.dir.path(), &p256, "someone-else");
    assert_error(
        app.post("/v1/devices", json!({"id": "csr-dev", "csr": other}))
            .await,
        400,
        "csr_subject_mismatch",
    )
    .await;
    let weak = openssl_csr(app.dir.path(), &["-newkey", "rsa:1024"], "csr-dev");
    assert_error(
        app.post("/v1/devices", json!({"id": "csr-dev", "csr": weak}))
            .await,
        400,
        "weak_key",
    )
    .await;
    // A certificate in place of a CSR.
    let ca = app
        .request(Method::GET, "/v1/ca", None)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_error(
        app.post("/v1/devices", json!({"id": "csr-dev", "csr": ca})).await,
        400,
        "invalid_csr",
    )
    .await;

    assert_error(app.get("/v1/devices/csr-dev").await, 404, "device_not_found").await;
    assert_eq!(
        device_count(&app).await,
        0,
        "a failed issuance leaves no device behind"
    );

    // The same id registers fine with a good CSR afterwards.
    let good = openssl_csr(app.dir.path(), &p256, "csr-dev");
    assert_eq!(
        app.post("/v1/devices", json!({"id": "csr-dev", "csr": good}))
            .await
            .status(),
        201
    );
    // And a bad CSR on issue leaves the certificate list as it was.
    let other = openssl_csr(app.dir.path(), &p256, "nope");
    assert_error(
        app.post("/v1/devices/csr-dev/certificates", json!({"csr": other}))
            .await,
        400,
        "csr_subject_mismatch",
    )
    .await;
    let certs: Value = app
        .get("/v1/devices/csr-dev/certificates")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(certs.as_array().unwrap().len(), 1);
}

async fn unknown_routes_methods_and_devices_answer_json(backend: Backend) {
    let app = spawn_app(backend).await;
    assert_error(app.get("/v1/devices/ghost").await, 404, "device_not_found").await;
    assert_error(
        app.get("/v1/devices/ghost/certificates").await,
        404,
        "device_not_found",
    )
    .await;
    assert_error(
        app.post("/v1/devices/ghost/certificates", json!({})).await,
        404,
        "device_not_found",
    )
    .await;
    assert_error(app.get("/v1/nowhere").await, 404, "not_found").await;
    let put = app
        .request(Method::PUT, "/v1/devices", Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_error(put, 405, "method_not_allowed").await;
}
