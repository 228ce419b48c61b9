use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{assert_error, openssl_public_key, openssl_verify, spawn_app, Backend, ADMIN};
use crate::on_both_backends;

on_both_backends!(
    registration_with_a_generated_key_returns_a_verifiable_certificate_and_its_key,
    registration_with_a_csr_keeps_the_key_on_the_device,
    devices_are_read_listed_by_page_and_filtered_by_tag,
    update_changes_only_what_is_given,
    delete_removes_the_device_and_revokes_its_certificates,
);

async fn registration_with_a_generated_key_returns_a_verifiable_certificate_and_its_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let res = app
        .post("/v1/devices", json!({"id": "shelf-0042", "name": "Aisle 4", "attributes": {"model": "esl-2.9"}, "tags": ["esl", "berlin"]}))
        .await;
    assert_eq!(res.status(), 201);
    assert_eq!(res.headers()["location"], "/v1/devices/shelf-0042");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["device"]["id"], "shelf-0042");
    assert_eq!(body["device"]["name"], "Aisle 4");
    assert_eq!(body["device"]["attributes"], json!({"model": "esl-2.9"}));
    assert_eq!(body["device"]["tags"], json!(["berlin", "esl"]));
    let cert = body["certificate"]["pem"].as_str().unwrap();
    assert_eq!(body["certificate_pem"], body["certificate"]["pem"]);
    let ca = body["ca_chain_pem"].as_str().unwrap();
    let key = body["private_key_pem"]
        .as_str()
        .expect("the generated key is returned once");
    assert!(
        openssl_verify(app.dir.path(), ca, cert),
        "openssl verifies the device certificate"
    );
    assert_eq!(
        openssl_public_key(app.dir.path(), cert, true),
        openssl_public_key(app.dir.path(), key, false)
    );
    assert_eq!(body["certificate"]["status"], "active");
    assert_eq!(body["certificate"]["key_origin"], "generated");
    assert_eq!(
        body["certificate"]["fingerprint_sha256"].as_str().unwrap().len(),
        64
    );

    // The key is never stored: nothing the API serves later contains it.
    for path in [
        "/v1/devices/shelf-0042",
        "/v1/devices/shelf-0042/certificates",
        "/v1/devices/shelf-0042/certificate?format=json",
    ] {
        let text = app.get(path).await.text().await.unwrap();
        assert!(!text.contains("PRIVATE KEY"), "{path} leaks a key");
    }
    // Nor is it in the database file (SQLite) — read the raw bytes.
    if let Backend::Sqlite = backend {
        let raw = std::fs::read(app.dir.path().join("registry.db")).unwrap();
        let key_body: String = key.lines().nth(1).unwrap().to_owned();
        assert!(!raw.windows(key_body.len()).any(|w| w == key_body.as_bytes()));
    }
    // The CA served publicly is the one in the response.
    let served = app.request(Method::GET, "/v1/ca", None).send().await.unwrap();
    assert_eq!(served.status(), 200);
    assert_eq!(served.headers()["content-type"], "application/x-pem-file");
    assert_eq!(served.text().await.unwrap(), ca);
}

async fn registration_with_a_csr_keeps_the_key_on_the_device(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = antumbra_sdk::DeviceId::parse("thermo:17").unwrap();
    let made = antumbra_sdk::provisioning::KeyAndCsr::generate(&id).unwrap();
    let res = app
        .post("/v1/devices", json!({"id": "thermo:17", "csr": made.csr_pem()}))
        .await;
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    assert!(
        body.get("private_key_pem").is_none(),
        "no key when the device made its own"
    );
    assert_eq!(body["certificate"]["key_origin"], "csr");
    let cert = body["certificate"]["pem"].as_str().unwrap();
    assert!(openssl_verify(
        app.dir.path(),
        body["ca_chain_pem"].as_str().unwrap(),
        cert
    ));
    assert_eq!(
        openssl_public_key(app.dir.path(), cert, true),
        openssl_public_key(app.dir.path(), made.private_key_pem(), false),
        "the certificate carries the device's own key"
    );
}

async fn devices_are_read_listed_by_page_and_filtered_by_tag(backend: Backend) {
    let app = spawn_app(backend).await;
    for i in 0..5 {
        let tags = if i % 2 == 0 {
            json!(["even"])
        } else {
            json!(["odd"])
        };
        let res = app
            .post("/v1/devices", json!({"id": format!("dev-{i}"), "tags": tags}))
            .await;
        assert_eq!(res.status(), 201);
    }
    let one: Value = app.get("/v1/devices/dev-3").await.json().await.unwrap();
    assert_eq!(one["id"], "dev-3");
    assert_eq!(one["tags"], json!(["odd"]));

    let mut seen = Vec::new();
    let mut path = "/v1/devices?limit=2".to_owned();
    loop {
        let page: Value = app.get(&path).await.json().await.unwrap();
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(items.iter().map(|d| d["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/devices?limit=2&after={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ["dev-0", "dev-1", "dev-2", "dev-3", "dev-4"]);

    let even: Value = app.get("/v1/devices?tag=even").await.json().await.unwrap();
    let ids: Vec<_> = even["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].clone())
        .collect();
    assert_eq!(ids, [json!("dev-0"), json!("dev-2"), json!("dev-4")]);
    assert!(even["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["tags"] == json!(["even"])));
    let none: Value = app.get("/v1/devices?tag=nope").await.json().await.unwrap();
    assert_eq!(none["items"], json!([]));
    assert!(none.get("next_cursor").is_none());
}

async fn update_changes_only_what_is_given(backend: Backend) {
    let app = spawn_app(backend).await;
    app.post(
        "/v1/devices",
        json!({"id": "lamp", "name": "Lamp", "attributes": {"a": 1}, "tags": ["x"]}),
    )
    .await;
    let patch = |body: Value| {
        app.request(Method::PATCH, "/v1/devices/lamp", Some(ADMIN))
            .json(&body)
            .send()
    };

    let res = patch(json!({"tags": ["y", "z"]})).await.unwrap();
    assert_eq!(res.status(), 200);
    let d: Value = res.json().await.unwrap();
    assert_eq!(
        (d["name"].clone(), d["attributes"].clone(), d["tags"].clone()),
        (json!("Lamp"), json!({"a": 1}), json!(["y", "z"]))
    );
    // RFC 3339 drops trailing zeros of the fraction, so compare instants, not strings.
    let at = |field: &str| {
        time::OffsetDateTime::parse(
            d[field].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    assert!(at("updated_at") >= at("created_at"));

    let d: Value = patch(json!({"name": null, "attributes": {"b": true}}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(d["name"], Value::Null);
    assert_eq!(d["attributes"], json!({"b": true}));
    let again: Value = app.get("/v1/devices/lamp").await.json().await.unwrap();
    assert_eq!(again, d, "what PATCH answered is what was stored");

    assert_error(
        patch(json!({"tags": ["bad tag"]})).await.unwrap(),
        400,
        "invalid_request",
    )
    .await;
    assert_error(patch(json!({"name": 5})).await.unwrap(), 400, "invalid_request").await;
    let missing = app
        .request(Method::PATCH, "/v1/devices/ghost", Some(ADMIN))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_error(missing, 404, "device_not_found").await;
}

async fn delete_removes_the_device_and_revokes_its_certificates(backend: Backend) {
    let app = spawn_app(backend).await;
    let first = app.register("gone").await;
    let serial = first["certificate"]["serial"].as_str().unwrap().to_owned();
    let res = app
        .request(Method::DELETE, "/v1/devices/gone", Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    assert_error(app.get("/v1/devices/gone").await, 404, "device_not_found").await;
    let again = app
        .request(Method::DELETE, "/v1/devices/gone", Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_error(again, 404, "device_not_found").await;

    // Re-registering the id starts afresh, and the old certificate is on record as revoked.
    app.register("gone").await;
    let certs: Value = app
        .get("/v1/devices/gone/certificates")
        .await
        .json()
        .await
        .unwrap();
    let old = certs
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["serial"] == serial.as_str())
        .expect("old cert on record");
    assert_eq!(old["status"], "revoked");
    assert_eq!(old["revocation_reason"], "cessation_of_operation");
    assert!(old["revoked_at"].is_string());
}
