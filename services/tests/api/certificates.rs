use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{assert_error, openssl_verify, spawn_app, Backend, ADMIN};
use crate::on_both_backends;

on_both_backends!(
    current_certificate_downloads_as_pem_or_json,
    issue_rotate_and_revoke_keep_a_truthful_record,
    revocation_errors_are_clear,
);

async fn current_certificate_downloads_as_pem_or_json(backend: Backend) {
    let app = spawn_app(backend).await;
    let reg = app.register("cam-1").await;
    let pem = reg["certificate"]["pem"].as_str().unwrap();

    let res = app.get("/v1/devices/cam-1/certificate").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/x-pem-file");
    assert!(res.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .contains("cam-1.crt"));
    assert_eq!(res.text().await.unwrap(), pem);

    let by_accept = app
        .request(Method::GET, "/v1/devices/cam-1/certificate", Some(ADMIN))
        .header("Accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(by_accept.headers()["content-type"], "application/json");
    let body: Value = by_accept.json().await.unwrap();
    assert_eq!(body["pem"], pem);
    assert_eq!(body["serial"], reg["certificate"]["serial"]);

    let by_query: Value = app
        .get("/v1/devices/cam-1/certificate?format=json")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(by_query, body);
    assert_error(
        app.get("/v1/devices/cam-1/certificate?format=der").await,
        400,
        "invalid_request",
    )
    .await;
    assert_error(
        app.get("/v1/devices/nobody/certificate").await,
        404,
        "device_not_found",
    )
    .await;
}

async fn issue_rotate_and_revoke_keep_a_truthful_record(backend: Backend) {
    let app = spawn_app(backend).await;
    let reg = app.register("gw-1").await;
    let first = reg["certificate"]["serial"].as_str().unwrap().to_owned();
    let ca = reg["ca_chain_pem"].as_str().unwrap().to_owned();

    // Rotation: a new certificate, the old one still active beside it.
    let res = app
        .request(Method::POST, "/v1/devices/gw-1/certificates/rotate", Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let rotated: Value = res.json().await.unwrap();
    let second = rotated["certificate"]["serial"].as_str().unwrap().to_owned();
    assert!(rotated["certificate_pem"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(rotated["certificate_pem"], rotated["certificate"]["pem"]);
    assert_ne!(first, second);
    assert_eq!(rotated["still_active"], json!([first]));
    assert!(rotated["private_key_pem"].is_string());
    assert!(openssl_verify(
        app.dir.path(),
        &ca,
        rotated["certificate"]["pem"].as_str().unwrap()
    ));

    // Issue with a CSR: no key comes back.
    let id = antumbra_sdk::DeviceId::parse("gw-1").unwrap();
    let made = antumbra_sdk::provisioning::KeyAndCsr::generate(&id).unwrap();
    let res = app
        .post("/v1/devices/gw-1/certificates", json!({"csr": made.csr_pem()}))
        .await;
    assert_eq!(res.status(), 201);
    let third: Value = res.json().await.unwrap();
    assert!(third.get("private_key_pem").is_none());
    assert!(third.get("still_active").is_none());
    let third = third["certificate"]["serial"].as_str().unwrap().to_owned();

    // The newest active certificate is the current one.
    let current: Value = app
        .get("/v1/devices/gw-1/certificate?format=json")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(current["serial"], third.as_str());

    // Revoke the newest with a reason; the current one falls back to the next active.
    let res = app
        .post(
            &format!("/v1/devices/gw-1/certificates/{third}/revoke"),
            json!({"reason": "key_compromise"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let revoked: Value = res.json().await.unwrap();
    assert_eq!(revoked["status"], "revoked");
    assert_eq!(revoked["revocation_reason"], "key_compromise");
    let current: Value = app
        .get("/v1/devices/gw-1/certificate?format=json")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(current["serial"], second.as_str());

    let one: Value = app
        .get(&format!("/v1/devices/gw-1/certificates/{third}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["status"], "revoked");
    let all: Value = app
        .get("/v1/devices/gw-1/certificates")
        .await
        .json()
        .await
        .unwrap();
    let statuses: Vec<_> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["serial"].clone(), c["status"].clone()))
        .collect();
    assert_eq!(statuses.len(), 3);
    assert!(statuses.contains(&(json!(first), json!("active"))));
    assert!(statuses.contains(&(json!(second), json!("active"))));
    assert!(statuses.contains(&(json!(third), json!("revoked"))));

    // Revoke without a body: reason `unspecified`. Then nothing is active, so rotation is refused.
    for serial in [&first, &second] {
        let res = app
            .request(
                Method::POST,
                &format!("/v1/devices/gw-1/certificates/{serial}/revoke"),
                Some(ADMIN),
            )
            .send()
            .await
            .unwrap();
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["revocation_reason"], "unspecified");
    }
    let res = app
        .request(Method::POST, "/v1/devices/gw-1/certificates/rotate", Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_error(res, 409, "no_active_certificate").await;
    assert_error(
        app.get("/v1/devices/gw-1/certificate").await,
        409,
        "no_active_certificate",
    )
    .await;
}

async fn revocation_errors_are_clear(backend: Backend) {
    let app = spawn_app(backend).await;
    let reg = app.register("r-1").await;
    let serial = reg["certificate"]["serial"].as_str().unwrap().to_owned();
    let path = format!("/v1/devices/r-1/certificates/{serial}/revoke");
    assert_error(
        app.post(&path, json!({"reason": "lost-it"})).await,
        400,
        "invalid_request",
    )
    .await;
    assert_eq!(app.post(&path, json!({})).await.status(), 200);
    assert_error(
        app.post(&path, json!({})).await,
        409,
        "certificate_already_revoked",
    )
    .await;
    assert_error(
        app.post("/v1/devices/r-1/certificates/00ff/revoke", json!({}))
            .await,
        404,
        "certificate_not_found",
    )
    .await;
    assert_error(
        app.get("/v1/devices/r-1/certificates/00ff").await,
        404,
        "certificate_not_found",
    )
    .await;
    assert_error(
        app.post(
            &format!("/v1/devices/r-2/certificates/{serial}/revoke"),
            json!({}),
        )
        .await,
        404,
        "device_not_found",
    )
    .await;
}
