//! Shadows over REST: SQLite + embedded store, and PostgreSQL + Redis.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{assert_error, spawn_app, Backend, TestApp, ADMIN};
use crate::on_both_backends;

on_both_backends!(
    patch_get_and_delete_follow_the_aws_rules,
    versions_and_if_match_guard_against_lost_updates,
    bad_shadow_input_is_refused_and_changes_nothing,
    named_shadows_live_beside_the_classic_one,
    shadow_changes_appear_on_the_event_stream,
);

async fn patch(app: &TestApp, path: &str, body: Value) -> reqwest::Response {
    app.request(Method::PATCH, path, Some(ADMIN))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn patch_get_and_delete_follow_the_aws_rules(backend: Backend) {
    let app = spawn_app(backend).await;
    app.register("thermo").await;
    assert_error(
        app.get("/v1/devices/thermo/shadow").await,
        404,
        "shadow_not_found",
    )
    .await;
    assert_error(app.get("/v1/devices/ghost/shadow").await, 404, "device_not_found").await;
    assert_error(
        patch(
            &app,
            "/v1/devices/ghost/shadow",
            json!({"state": {"desired": {"a": 1}}}),
        )
        .await,
        404,
        "device_not_found",
    )
    .await;

    let res = patch(&app, "/v1/devices/thermo/shadow", json!({"state": {"desired": {"target": 21, "mode": "eco", "light": {"r": 1, "g": 2}}}, "clientToken": "t-1"})).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["etag"], "\"1\"");
    let accepted: Value = res.json().await.unwrap();
    assert_eq!(accepted["version"], 1);
    assert_eq!(accepted["clientToken"], "t-1");
    assert_eq!(accepted["state"]["desired"]["target"], 21);
    assert!(accepted["metadata"]["desired"]["light"]["r"]["timestamp"].is_i64());

    let res = patch(&app, "/v1/devices/thermo/shadow", json!({"state": {"desired": {"mode": null, "light": {"g": null, "b": 3}}, "reported": {"target": 19, "list": [1, 2]}}})).await;
    assert_eq!(res.status(), 200);
    let res = app.get("/v1/devices/thermo/shadow").await;
    assert_eq!(res.headers()["etag"], "\"2\"");
    let doc: Value = res.json().await.unwrap();
    assert_eq!(
        doc["state"]["desired"],
        json!({"target": 21, "light": {"r": 1, "b": 3}}),
        "deep merge, null deletes"
    );
    assert_eq!(doc["state"]["reported"], json!({"target": 19, "list": [1, 2]}));
    assert_eq!(
        doc["state"]["delta"],
        json!({"target": 21, "light": {"r": 1, "b": 3}}),
        "missing in reported counts"
    );
    assert!(doc["metadata"]["desired"]["light"]["b"]["timestamp"].is_i64());
    assert!(
        doc["metadata"]["desired"].get("mode").is_none(),
        "deleted fields leave metadata too"
    );
    assert_eq!(doc["version"], 2);

    // Arrays are replaced whole; a section set to null is removed.
    patch(
        &app,
        "/v1/devices/thermo/shadow",
        json!({"state": {"reported": {"list": [9]}}}),
    )
    .await;
    let doc: Value = app.get("/v1/devices/thermo/shadow").await.json().await.unwrap();
    assert_eq!(doc["state"]["reported"]["list"], json!([9]));
    patch(
        &app,
        "/v1/devices/thermo/shadow",
        json!({"state": {"reported": null}}),
    )
    .await;
    let doc: Value = app.get("/v1/devices/thermo/shadow").await.json().await.unwrap();
    assert!(doc["state"].get("reported").is_none());
    assert_eq!(doc["version"], 4);

    let res = app
        .request(Method::DELETE, "/v1/devices/thermo/shadow", Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let deleted: Value = res.json().await.unwrap();
    assert_eq!(deleted["version"], 4);
    assert_error(
        app.get("/v1/devices/thermo/shadow").await,
        404,
        "shadow_not_found",
    )
    .await;
    let again = app
        .request(Method::DELETE, "/v1/devices/thermo/shadow", Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_error(again, 404, "shadow_not_found").await;
    let res = patch(
        &app,
        "/v1/devices/thermo/shadow",
        json!({"state": {"desired": {"x": 1}}}),
    )
    .await;
    let accepted: Value = res.json().await.unwrap();
    assert_eq!(
        accepted["version"], 5,
        "the version never goes back, not even after delete"
    );

    // Deleting the device forgets its shadow documents before it answers; the version goes on.
    let res = app
        .request(Method::DELETE, "/v1/devices/thermo", Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    app.register("thermo").await;
    assert_error(
        app.get("/v1/devices/thermo/shadow").await,
        404,
        "shadow_not_found",
    )
    .await;
    let res = patch(
        &app,
        "/v1/devices/thermo/shadow",
        json!({"state": {"desired": {"y": 2}}}),
    )
    .await;
    let accepted: Value = res.json().await.unwrap();
    assert_eq!(
        accepted["version"], 6,
        "the version never goes back, not even after the device is deleted and registered again"
    );
    let shadow: Value = app.get("/v1/devices/thermo/shadow").await.json().await.unwrap();
    assert_eq!(
        shadow["state"],
        json!({"desired": {"y": 2}, "delta": {"y": 2}}),
        "nothing of the old document"
    );
}

async fn versions_and_if_match_guard_against_lost_updates(backend: Backend) {
    let app = spawn_app(backend).await;
    app.register("v-dev").await;
    patch(
        &app,
        "/v1/devices/v-dev/shadow",
        json!({"state": {"desired": {"a": 1}}}),
    )
    .await;

    let res = patch(
        &app,
        "/v1/devices/v-dev/shadow",
        json!({"state": {"desired": {"a": 2}}, "version": 5}),
    )
    .await;
    assert_eq!(res.status(), 409);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        (body["code"].clone(), body["version"].clone()),
        (json!("version_conflict"), json!(1))
    );
    assert_eq!(
        body["document"]["state"]["desired"]["a"], 1,
        "the conflict carries the current document"
    );

    let res = app
        .request(Method::PATCH, "/v1/devices/v-dev/shadow", Some(ADMIN))
        .header("If-Match", "\"0\"")
        .json(&json!({"state": {"desired": {"a": 3}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 412);
    assert_eq!(res.headers()["etag"], "\"1\"");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "precondition_failed");

    let etag = app.get("/v1/devices/v-dev/shadow").await.headers()["etag"]
        .to_str()
        .unwrap()
        .to_owned();
    let res = app
        .request(Method::PATCH, "/v1/devices/v-dev/shadow", Some(ADMIN))
        .header("If-Match", &etag)
        .json(&json!({"state": {"desired": {"a": 4}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["etag"], "\"2\"");
    let ok = patch(
        &app,
        "/v1/devices/v-dev/shadow",
        json!({"state": {"desired": {"a": 5}}, "version": 2}),
    )
    .await;
    assert_eq!(ok.status(), 200);
    let doc: Value = app.get("/v1/devices/v-dev/shadow").await.json().await.unwrap();
    assert_eq!(
        (doc["state"]["desired"]["a"].clone(), doc["version"].clone()),
        (json!(5), json!(3))
    );

    let del = app
        .request(Method::DELETE, "/v1/devices/v-dev/shadow", Some(ADMIN))
        .header("If-Match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 412);
    assert_eq!(
        app.get("/v1/devices/v-dev/shadow").await.status(),
        200,
        "the refused delete changed nothing"
    );
}

async fn bad_shadow_input_is_refused_and_changes_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    app.register("b-dev").await;
    patch(
        &app,
        "/v1/devices/b-dev/shadow",
        json!({"state": {"desired": {"keep": true}}}),
    )
    .await;
    let cases = [
        (json!({"state": {"desired": 5}}), 400, "invalid_request"),
        (json!({"state": []}), 400, "invalid_request"),
        (json!({"state": {}}), 400, "invalid_request"),
        (json!({"desired": {"a": 1}}), 400, "invalid_request"),
        (
            json!({"state": {"desired": {"a": [1, null]}}}),
            400,
            "invalid_request",
        ),
        (
            json!({"state": {"desired": {"a": 1}}, "version": "1"}),
            400,
            "invalid_request",
        ),
        (
            json!({"state": {"desired": {"a": 1}}, "clientToken": "x".repeat(65)}),
            400,
            "invalid_request",
        ),
        (
            json!({"state": {"desired": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}}}),
            400,
            "invalid_request",
        ),
        (
            json!({"state": {"desired": {"blob": "x".repeat(66 * 1024 - 100)}}}),
            413,
            "payload_too_large",
        ),
    ];
    for (body, status, code) in cases {
        assert_error(patch(&app, "/v1/devices/b-dev/shadow", body).await, status, code).await;
    }
    let raw = app
        .request(Method::PATCH, "/v1/devices/b-dev/shadow", Some(ADMIN))
        .header("content-type", "application/json")
        .body("{\"state\":")
        .send()
        .await
        .unwrap();
    assert_error(raw, 400, "invalid_json").await;
    assert_error(
        app.get("/v1/devices/b-dev/shadow?name=bad%20name").await,
        400,
        "invalid_request",
    )
    .await;
    let bad_etag = app
        .request(Method::PATCH, "/v1/devices/b-dev/shadow", Some(ADMIN))
        .header("If-Match", "\"abc\"")
        .json(&json!({"state": {"desired": {"a": 1}}}))
        .send()
        .await
        .unwrap();
    assert_error(bad_etag, 400, "invalid_request").await;
    let doc: Value = app.get("/v1/devices/b-dev/shadow").await.json().await.unwrap();
    assert_eq!(
        (doc["state"]["desired"].clone(), doc["version"].clone()),
        (json!({"keep": true}), json!(1)),
        "nothing changed"
    );
    let read_only: Value = app
        .post("/v1/api-keys", json!({"name": "ro", "scope": "read"}))
        .await
        .json()
        .await
        .unwrap();
    let ro = read_only["token"].as_str().unwrap();
    let res = app
        .request(Method::PATCH, "/v1/devices/b-dev/shadow", Some(ro))
        .json(&json!({"state": {"desired": {"a": 1}}}))
        .send()
        .await
        .unwrap();
    assert_error(res, 403, "forbidden").await;
    assert_eq!(
        app.request(Method::GET, "/v1/devices/b-dev/shadow", Some(ro))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

async fn named_shadows_live_beside_the_classic_one(backend: Backend) {
    let app = spawn_app(backend).await;
    app.register("n-dev").await;
    patch(
        &app,
        "/v1/devices/n-dev/shadow",
        json!({"state": {"desired": {"classic": 1}}}),
    )
    .await;
    let res = patch(
        &app,
        "/v1/devices/n-dev/shadow?name=config",
        json!({"state": {"desired": {"named": 1}}}),
    )
    .await;
    let accepted: Value = res.json().await.unwrap();
    assert_eq!(accepted["version"], 1, "a named shadow has its own version");
    let named: Value = app
        .get("/v1/devices/n-dev/shadow?name=config")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(named["state"]["desired"], json!({"named": 1}));
    let classic: Value = app.get("/v1/devices/n-dev/shadow").await.json().await.unwrap();
    assert_eq!(classic["state"]["desired"], json!({"classic": 1}));
    assert_error(
        app.get("/v1/devices/n-dev/shadow?name=other").await,
        404,
        "shadow_not_found",
    )
    .await;
}

async fn shadow_changes_appear_on_the_event_stream(backend: Backend) {
    use futures_util::StreamExt;
    let app = spawn_app(backend).await;
    app.register("e-dev").await;
    let res = app
        .request(Method::GET, "/v1/events?device_id=e-dev", Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut stream = res.bytes_stream();
    patch(
        &app,
        "/v1/devices/e-dev/shadow",
        json!({"state": {"desired": {"a": 1}}}),
    )
    .await;
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !text.contains("shadow.updated") && tokio::time::Instant::now() < deadline {
        if let Ok(Some(Ok(chunk))) =
            tokio::time::timeout(std::time::Duration::from_secs(1), stream.next()).await
        {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    assert!(text.contains("event: shadow.updated"), "{text}");
    assert!(text.contains("\"version\":1"), "{text}");
}
