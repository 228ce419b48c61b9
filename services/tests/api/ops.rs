use reqwest::Method;
use serde_json::Value;

use crate::helpers::{assert_error, spawn_app, Backend, ADMIN};
use crate::on_both_backends;

on_both_backends!(
    health_readiness_spec_and_docs_are_served_without_a_key,
    head_answers_every_get_route_as_get_without_a_body,
);

async fn health_readiness_spec_and_docs_are_served_without_a_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let health: Value = app
        .request(Method::GET, "/healthz", None)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let ready: Value = app
        .request(Method::GET, "/readyz", None)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");

    let spec = app
        .request(Method::GET, "/openapi.json", None)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        spec,
        antumbra::http::openapi::document(),
        "the served spec is the generated one"
    );

    // HEAD answers as GET without a body; other methods are 405 with the JSON error body.
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let head = app.request(Method::HEAD, path, None).send().await.unwrap();
        assert_eq!(head.status(), 200, "HEAD {path}");
        assert!(head.bytes().await.unwrap().is_empty(), "HEAD {path} has no body");
        let post = app.request(Method::POST, path, None).send().await.unwrap();
        assert_error(post, 405, "method_not_allowed").await;
    }
    let post = app
        .request(Method::POST, "/v1/events", None)
        .send()
        .await
        .unwrap();
    assert_error(post, 405, "method_not_allowed").await;

    let docs = app.request(Method::GET, "/docs", None).send().await.unwrap();
    assert_eq!(docs.status(), 200);
    let html = docs.text().await.unwrap();
    assert!(
        html.contains("api-reference") && html.contains("\"/v1/devices\""),
        "docs page embeds the spec"
    );
}

/// The committed `openapi/openapi.json` must be what the code generates. Regenerate with
/// `cargo run -p antumbra -- openapi --out openapi/openapi.json`.
#[test]
fn committed_openapi_document_is_up_to_date() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi/openapi.json");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == antumbra::http::openapi::document(),
        "openapi/openapi.json is stale: run `cargo run -p antumbra -- openapi --out openapi/openapi.json` and commit"
    );
}

/// Every operation documents its error responses with an example, and every path has a summary.
#[test]
fn every_operation_documents_its_errors_with_examples() {
    let spec: Value = serde_json::from_str(&antumbra::http::openapi::document()).unwrap();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(
                op["summary"].is_string() || op["description"].is_string(),
                "{method} {path} has no description"
            );
            for (status, response) in op["responses"].as_object().unwrap() {
                if status.starts_with('4') || status.starts_with('5') {
                    let example = &response["content"]["application/json"]["example"];
                    assert!(
                        example["code"].is_string(),
                        "{method} {path} {status} has no error example"
                    );
                }
            }
        }
    }
}

async fn head_answers_every_get_route_as_get_without_a_body(backend: Backend) {
    let app = spawn_app(backend).await;
    app.register("lamp").await;
    let patched = app
        .request(Method::PATCH, "/v1/devices/lamp/shadow", Some(ADMIN))
        .json(&serde_json::json!({"state": {"desired": {"on": true}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    for path in [
        "/v1/devices",
        "/v1/devices/lamp",
        "/v1/devices/lamp/status",
        "/v1/devices/lamp/shadow",
        "/v1/devices/lamp/certificate",
        "/v1/devices/lamp/certificates",
        "/v1/ca",
        "/v1/api-keys",
        "/v1/firmware",
        "/v1/deployments",
    ] {
        let get = app.request(Method::GET, path, Some(ADMIN)).send().await.unwrap();
        let head = app.request(Method::HEAD, path, Some(ADMIN)).send().await.unwrap();
        assert_eq!(get.status(), 200, "GET {path}");
        assert_eq!(head.status(), 200, "HEAD {path}");
        for header in ["content-type", "etag"] {
            assert_eq!(
                get.headers().get(header),
                head.headers().get(header),
                "{header} of HEAD {path}"
            );
        }
        assert!(head.bytes().await.unwrap().is_empty(), "HEAD {path} has no body");
    }
    // HEAD is GET in every other way: the same key check and the same errors, still without a body.
    let anonymous = app
        .request(Method::HEAD, "/v1/devices", None)
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let missing = app
        .request(Method::HEAD, "/v1/devices/ghost/shadow", Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert!(missing.bytes().await.unwrap().is_empty());
    // The event stream is GET only.
    let events = app
        .request(Method::HEAD, "/v1/events", Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 405);
}
