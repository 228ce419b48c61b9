//! `spawn_app`: the real application on a free port, with a fresh database (SQLite file or a new PostgreSQL
//! database) and a fresh data dir per test. Nothing is shared between tests.

use std::path::Path;
use std::process::Command;

use antumbra::config::{LogFormat, Settings};
use antumbra::startup::Application;
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{json, Value};
use sqlx::{Connection, Executor};

pub const ADMIN: &str = "test-admin-token-0123456789";

#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// A database URL for a fresh, empty database on the backend.
pub async fn fresh_database(backend: Backend, dir: &Path) -> String {
    match backend {
        Backend::Sqlite => antumbra::db::sqlite_url(&dir.join("registry.db")),
        Backend::Postgres => {
            let server = std::env::var("ANTUMBRA_TEST_POSTGRES_URL").expect(
                "ANTUMBRA_TEST_POSTGRES_URL is not set: run the suite with tests/run.sh, which starts a private \
                 PostgreSQL, or point it at a server you own",
            );
            let name = format!("antumbra_test_{}", hex_id());
            let mut conn = sqlx::PgConnection::connect(&server)
                .await
                .expect("connect to the test PostgreSQL");
            conn.execute(format!("CREATE DATABASE {name}").as_str())
                .await
                .unwrap();
            let (base, _) = server.rsplit_once('/').unwrap();
            format!("{base}/{name}")
        }
    }
}

fn hex_id() -> String {
    let bytes: [u8; 8] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn settings(dir: &Path, database_url: String) -> Settings {
    Settings {
        data_dir: dir.join("data"),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        mqtts_addr: "127.0.0.1:0".parse().unwrap(),
        database_url,
        redis_url: None,
        redis_prefix: format!("test{}:", hex_id()),
        admin_token: Some(ADMIN.into()),
        mqtt_dns_names: vec!["localhost".into()],
        ca: None,
        cert_validity_days: 30,
        max_body_bytes: 64 * 1024,
        log_format: LogFormat::Text,
        shutdown_timeout_secs: 5,
        mqtt_plain_addr: None,
        mqtt: antumbra::mqtt::MqttSettings::default(),
        shadow_limits: Default::default(),
    }
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    antumbra::telemetry::init_for_tests();
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database(backend, dir.path()).await;
    let app = Application::build(settings(dir.path(), url))
        .await
        .expect("the app builds");
    let base = format!("http://{}", app.http_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    TestApp {
        base,
        client: reqwest::Client::new(),
        dir,
        _stop: stop,
    }
}

impl TestApp {
    pub fn request(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let req = self.client.request(method, format!("{}{path}", self.base));
        match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    pub async fn get(&self, path: &str) -> Response {
        self.request(Method::GET, path, Some(ADMIN)).send().await.unwrap()
    }

    pub async fn post(&self, path: &str, body: Value) -> Response {
        self.request(Method::POST, path, Some(ADMIN))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn register(&self, id: &str) -> Value {
        let res = self.post("/v1/devices", json!({ "id": id })).await;
        assert_eq!(res.status(), 201, "registering {id}");
        res.json().await.unwrap()
    }
}

/// Asserts the status and the stable error code of an error response.
pub async fn assert_error(res: Response, status: u16, code: &str) -> Value {
    assert_eq!(res.status().as_u16(), status, "status for expected code {code}");
    let body: Value = res.json().await.expect("error bodies are JSON");
    assert_eq!(body["code"], code, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    body
}

/// `openssl verify` of a client certificate against a CA: an independent verifier.
pub fn openssl_verify(dir: &Path, ca_pem: &str, cert_pem: &str) -> bool {
    std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
    std::fs::write(dir.join("leaf.pem"), cert_pem).unwrap();
    Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
        .arg(dir.join("ca.pem"))
        .arg(dir.join("leaf.pem"))
        .status()
        .expect("openssl is installed")
        .success()
}

/// The public key of a certificate or private key, as openssl prints it.
pub fn openssl_public_key(dir: &Path, pem: &str, is_cert: bool) -> String {
    let file = dir.join("pub-src.pem");
    std::fs::write(&file, pem).unwrap();
    let args: &[&str] = if is_cert {
        &["x509", "-noout", "-pubkey", "-in"]
    } else {
        &["pkey", "-pubout", "-in"]
    };
    let out = Command::new("openssl").args(args).arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs each listed test against SQLite and against PostgreSQL.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test] async fn $name() { super::$name($crate::helpers::Backend::Sqlite).await } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $name() { super::$name($crate::helpers::Backend::Postgres).await } )*
        }
    };
}
