//! End-to-end: the real `antumbra` binary, driven by real clients (reqwest, curl, openssl).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use antumbra_e2e::{wait_with_timeout, Server};
use serde_json::{json, Value};

const TOKEN: &str = "e2e-admin-token-0123456789abcdef";

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::new()
}

#[test]
fn first_start_generates_an_admin_key_once_and_a_restart_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    let args = [
        "--data-dir",
        data_arg,
        "--http",
        "127.0.0.1:0",
        "--mqtts",
        "127.0.0.1:0",
    ];

    let server = Server::start(&args, &[]);
    let banner = server.banner.join("\n");
    assert!(banner.contains("API docs : http://127.0.0.1:"), "{banner}");
    assert!(banner.contains("MQTT     : mqtts://127.0.0.1:"), "{banner}");
    let token = server.banner.last().unwrap().trim().to_owned();
    assert!(token.starts_with("ant_"), "{banner}");
    let file = std::fs::read_to_string(data.join("admin-token")).unwrap();
    assert_eq!(file.trim(), token);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| std::fs::metadata(data.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("admin-token"), 0o600);
        assert_eq!(mode("pki/ca.key"), 0o600);
        assert_eq!(mode("pki/server.key"), 0o600);
    }
    let reg: Value = client()
        .post(format!("{}/v1/devices", server.base))
        .bearer_auth(&token)
        .json(&json!({"id": "persisted"}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let ca = reg["ca_chain_pem"].as_str().unwrap().to_owned();
    assert!(server.terminate().success());

    // The database keeps only a hash: the token's text is nowhere in it.
    let db = std::fs::read(data.join("antumbra.db")).unwrap();
    assert!(!db.windows(token.len()).any(|w| w == token.as_bytes()));

    let server = Server::start(&args, &[]);
    let banner = server.banner.join("\n");
    assert!(
        !banner.contains("ant_"),
        "the token is printed only on first start: {banner}"
    );
    let device: Value = client()
        .get(format!("{}/v1/devices/persisted", server.base))
        .bearer_auth(&token)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(device["id"], "persisted", "registry survives a restart");
    let ca_again = client()
        .get(format!("{}/v1/ca", server.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(ca_again, ca, "the CA is loaded, not recreated");
}

#[test]
fn config_file_env_and_flags_layer_in_that_order() {
    let dir = tempfile::tempdir().unwrap();
    let file_dir = dir.path().join("from-file");
    let env_dir = dir.path().join("from-env");
    let config = dir.path().join("antumbra.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nhttp_addr = \"127.0.0.1:1\"\nmqtts_addr = \"127.0.0.1:0\"\nmqtt_dns_names = [\"mqtt.test\"]\nlog_format = \"json\"\n",
            file_dir.to_str().unwrap()
        ),
    )
    .unwrap();
    let server = Server::start(
        &["--config", config.to_str().unwrap(), "--http", "127.0.0.1:0"],
        &[
            ("ANTUMBRA_DATA_DIR", env_dir.to_str().unwrap()),
            ("ANTUMBRA_ADMIN_TOKEN", TOKEN),
        ],
    );
    assert!(
        !server.base.ends_with(":1"),
        "the flag overrides the file's address"
    );
    assert!(
        env_dir.join("pki/ca.crt").exists(),
        "the environment overrides the file's data dir"
    );
    assert!(!file_dir.exists());
    // The MQTT server certificate carries the file's DNS name.
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(env_dir.join("pki/server.crt"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("DNS:mqtt.test"));
    // JSON logs, from the file.
    let first_log = server.logs.recv_timeout(Duration::from_secs(10)).unwrap();
    let parsed: Value = serde_json::from_str(&first_log).unwrap_or_else(|_| panic!("not JSON: {first_log}"));
    assert!(parsed["level"].is_string());
    // Port 0 logs the bound address too.
    let ok = client().get(format!("{}/readyz", server.base)).send().unwrap();
    assert_eq!(ok.status(), 200);
}

#[test]
fn bad_configuration_fails_fast_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "htp_addr = \"127.0.0.1:0\"\n").unwrap();
    let out = Command::new(antumbra_e2e::antumbra_bin())
        .args(["serve", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("htp_addr"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new(antumbra_e2e::antumbra_bin())
        .args([
            "serve",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
        ])
        .env("ANTUMBRA_ADMIN_TOKEN", " ")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ANTUMBRA_ADMIN_TOKEN is empty"));
}

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &[
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
            "--mqtts",
            "127.0.0.1:0",
        ],
        &[("ANTUMBRA_ADMIN_TOKEN", TOKEN)],
    );
    let addr = server.base.trim_start_matches("http://").to_owned();
    let body = json!({"id": "in-flight"}).to_string();
    let (head, tail) = body.split_at(body.len() / 2);
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // A request answered on this connection first proves that a worker holds it: a connection still in the
    // listen backlog at SIGTERM is refused, as by any server, and is not what this test is about.
    write!(stream, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let healthz = read_one_response(&mut stream);
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    write!(
        stream,
        "POST /v1/devices HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{head}",
        body.len()
    )
    .unwrap();
    stream.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let mut server = server;
    server.signal_term();
    std::thread::sleep(Duration::from_millis(500));
    stream.write_all(tail.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 201"),
        "the request in flight completes: {response}"
    );
    let status = wait_with_timeout(&mut server.child, Duration::from_secs(20));
    assert!(status.success(), "clean exit after SIGTERM: {status}");
    assert!(
        TcpStream::connect(&addr).is_err(),
        "nothing listens after shutdown"
    );
}

/// Reads one HTTP/1.1 response with a `Content-Length` body, leaving the connection open.
fn read_one_response(stream: &mut TcpStream) -> String {
    let mut bytes = Vec::new();
    let mut byte = [0u8];
    while !bytes.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        bytes.push(byte[0]);
    }
    let head = String::from_utf8(bytes).unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .expect("Content-Length");
    let mut body = vec![0; length];
    stream.read_exact(&mut body).unwrap();
    head + &String::from_utf8(body).unwrap()
}

/// Runs the README's walkthrough as written (curl, jq, openssl) against a fresh server.
#[test]
fn readme_walkthrough_works_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find("<!-- walkthrough:start -->")
        .expect("walkthrough start marker");
    let end = readme
        .find("<!-- walkthrough:end -->")
        .expect("walkthrough end marker");
    let block = &readme[start..end];
    let script: String = block
        .lines()
        .skip_while(|l| !l.starts_with("```sh"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(script.contains("openssl verify"));

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &[
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
            "--mqtts",
            "127.0.0.1:0",
        ],
        &[],
    );
    let script = script
        .replace("http://127.0.0.1:8080", &server.base)
        .replace("-p 8883", &format!("-p {}", server.mqtts_port));
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "walkthrough failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.matches(": OK").count(),
        2,
        "both certificates verify: {stdout}"
    );
    assert!(stdout.contains("shelf-0042\n"), "{stdout}");
    assert!(
        stdout.contains("devices/shelf-0042/hello hello from shelf-0042\n"),
        "the device read its retained message: {stdout}"
    );
    assert!(
        stdout.contains("client_disconnect\n"),
        "status after the device disconnected: {stdout}"
    );
    assert!(stdout.trim_end().ends_with("revoked"), "{stdout}");
    // The key saved from the response belongs to the certificate downloaded.
    let pubkey = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
            .stdout
    };
    assert_eq!(
        pubkey(&["x509", "-noout", "-pubkey", "-in", "shelf-0042.crt"]),
        pubkey(&["pkey", "-pubout", "-in", "shelf-0042.key"])
    );
}

/// The binary on PostgreSQL (`DATABASE_URL`), as production runs it.
#[test]
fn serves_from_postgresql_when_database_url_says_so() {
    let server_url = std::env::var("ANTUMBRA_TEST_POSTGRES_URL")
        .expect("ANTUMBRA_TEST_POSTGRES_URL is not set: run the suite with tests/run.sh");
    let name = format!("antumbra_e2e_{}", std::process::id());
    let created = Command::new("psql")
        .args([&server_url, "-qc", &format!("CREATE DATABASE {name}")])
        .status()
        .unwrap();
    assert!(created.success());
    let url = format!("{}/{name}", server_url.rsplit_once('/').unwrap().0);

    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--http",
        "127.0.0.1:0",
        "--mqtts",
        "127.0.0.1:0",
    ];
    let env = [("DATABASE_URL", url.as_str()), ("ANTUMBRA_ADMIN_TOKEN", TOKEN)];
    let server = Server::start(&args, &env);
    let res = client()
        .post(format!("{}/v1/devices", server.base))
        .bearer_auth(TOKEN)
        .json(&json!({"id": "pg-device", "tags": ["pg"]}))
        .send()
        .unwrap();
    assert_eq!(res.status(), 201);
    assert!(
        !dir.path().join("antumbra.db").exists(),
        "no SQLite file when PostgreSQL is configured"
    );
    let rows = Command::new("psql")
        .args([&url, "-tAc", "SELECT id FROM devices"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&rows.stdout).trim(),
        "pg-device",
        "the row is in PostgreSQL"
    );
    assert!(server.terminate().success());
}
