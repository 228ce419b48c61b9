use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{assert_error, spawn_app, Backend, ADMIN};
use crate::on_both_backends;

on_both_backends!(
    requests_without_a_valid_key_get_401,
    read_keys_read_and_admin_keys_write,
    revoked_keys_stop_working_and_secrets_are_never_listed,
);

async fn requests_without_a_valid_key_get_401(backend: Backend) {
    let app = spawn_app(backend).await;
    let none = app
        .request(Method::GET, "/v1/devices", None)
        .send()
        .await
        .unwrap();
    assert_eq!(none.headers()["www-authenticate"], "Bearer realm=\"antumbra\"");
    assert_error(none, 401, "unauthorized").await;
    let wrong = app
        .request(Method::GET, "/v1/devices", Some("ant_not-a-real-key"))
        .send()
        .await
        .unwrap();
    assert_error(wrong, 401, "unauthorized").await;
    let basic = app
        .request(Method::GET, "/v1/devices", None)
        .basic_auth("admin", Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_error(basic, 401, "unauthorized").await;
    let post = app
        .request(Method::POST, "/v1/devices", None)
        .json(&json!({"id": "x"}))
        .send()
        .await
        .unwrap();
    assert_error(post, 401, "unauthorized").await;
}

async fn read_keys_read_and_admin_keys_write(backend: Backend) {
    let app = spawn_app(backend).await;
    app.register("d1").await;
    let res = app
        .post("/v1/api-keys", json!({"name": "dashboard", "scope": "read"}))
        .await;
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.unwrap();
    let read = created["token"].as_str().unwrap().to_owned();
    assert!(read.starts_with("ant_"));
    assert_eq!(created["key"]["scope"], "read");

    let ok = app
        .request(Method::GET, "/v1/devices/d1", Some(&read))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let ok = app
        .request(Method::GET, "/v1/devices/d1/certificate", Some(&read))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    for (method, path, body) in [
        (Method::POST, "/v1/devices", json!({"id": "d2"})),
        (Method::PATCH, "/v1/devices/d1", json!({"name": "n"})),
        (Method::DELETE, "/v1/devices/d1", json!(null)),
        (Method::POST, "/v1/devices/d1/certificates/rotate", json!({})),
        (
            Method::POST,
            "/v1/api-keys",
            json!({"name": "escalate", "scope": "admin"}),
        ),
        (Method::GET, "/v1/api-keys", json!(null)),
    ] {
        let res = app
            .request(method.clone(), path, Some(&read))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_error(res, 403, "forbidden").await;
    }
    // Nothing the read key tried took effect.
    assert_eq!(app.get("/v1/devices/d1").await.status(), 200);
    assert_error(app.get("/v1/devices/d2").await, 404, "device_not_found").await;

    // A second admin key can do admin things.
    let admin2: Value = app
        .post("/v1/api-keys", json!({"name": "ops", "scope": "admin"}))
        .await
        .json()
        .await
        .unwrap();
    let admin2 = admin2["token"].as_str().unwrap();
    let res = app
        .request(Method::POST, "/v1/devices", Some(admin2))
        .json(&json!({"id": "d3"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);

    assert_error(
        app.post("/v1/api-keys", json!({"name": "x", "scope": "root"}))
            .await,
        400,
        "invalid_request",
    )
    .await;
    assert_error(
        app.post("/v1/api-keys", json!({"name": "  ", "scope": "read"}))
            .await,
        400,
        "invalid_request",
    )
    .await;
}

async fn revoked_keys_stop_working_and_secrets_are_never_listed(backend: Backend) {
    let app = spawn_app(backend).await;
    let created: Value = app
        .post("/v1/api-keys", json!({"name": "temp", "scope": "read"}))
        .await
        .json()
        .await
        .unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    let id = created["key"]["id"].as_str().unwrap().to_owned();

    let list = app.get("/v1/api-keys").await.text().await.unwrap();
    assert!(list.contains(&id));
    assert!(!list.contains(&token), "the token is never listed");
    assert!(!list.contains(ADMIN), "nor the admin token");
    let keys: Value = serde_json::from_str(&list).unwrap();
    assert!(keys
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["id"] == "admin" && k["scope"] == "admin"));
    // Used once before it is revoked: the key is then remembered, and the revocation must still count at once.
    let before = app
        .request(Method::GET, "/v1/devices", Some(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(before.status(), 200);

    let res = app
        .request(Method::DELETE, &format!("/v1/api-keys/{id}"), Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert!(body["revoked_at"].is_string());
    let after = app
        .request(Method::GET, "/v1/devices", Some(&token))
        .send()
        .await
        .unwrap();
    assert_error(after, 401, "unauthorized").await;
    let again = app
        .request(Method::DELETE, &format!("/v1/api-keys/{id}"), Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_error(again, 409, "api_key_already_revoked").await;
    let unknown = app
        .request(Method::DELETE, "/v1/api-keys/key_000000000000", Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_error(unknown, 404, "api_key_not_found").await;
}
