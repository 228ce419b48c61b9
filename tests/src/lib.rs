//! Helpers for end-to-end tests: start the real `antumbra` binary as a child process, read where it listens
//! from what it prints, and stop it with a signal.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Path of the `antumbra` binary under test: `ANTUMBRA_BIN`, else the workspace's debug build (which
/// `cargo test --workspace` builds before any test runs, for the antumbra package's own tests).
pub fn antumbra_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("ANTUMBRA_BIN") {
        return bin.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/antumbra");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p antumbra` (tests/run.sh does)",
        bin.display()
    );
    bin
}

/// Path of an SDK example binary (built by `cargo test --workspace`, which builds examples).
pub fn example_bin(name: &str) -> PathBuf {
    let bin = antumbra_bin().with_file_name("examples").join(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p antumbra-sdk --examples`",
        bin.display()
    );
    bin
}

/// A running `antumbra serve`.
pub struct Server {
    /// The child process.
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Port of the MQTT/TLS listener.
    pub mqtts_port: u16,
    /// Everything it printed on stdout up to the end of its start-up banner.
    pub banner: Vec<String>,
    /// Lines it prints on stderr (logs), as they come.
    pub logs: mpsc::Receiver<String>,
}

impl Server {
    /// Starts `antumbra serve` on free loopback ports (HTTP, MQTT over TLS) with its data in `data`, `extra`
    /// arguments and `env`.
    pub fn start_in(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut args = vec![
            "--data-dir",
            data.to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
            "--mqtts",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        Server::start(&args, env)
    }

    /// Starts `antumbra serve` with `args` and `env` (on top of a cleared ANTUMBRA_* environment) and waits
    /// for its banner.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(antumbra_bin());
        cmd.arg("serve")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        for (key, _) in std::env::vars() {
            if key.starts_with("ANTUMBRA_")
                || key == "DATABASE_URL"
                || key == "REDIS_URL"
                || key == "RUST_LOG"
            {
                cmd.env_remove(key);
            }
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().expect("antumbra starts");
        let (out_tx, out_rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = out_tx.send(line);
            }
        });
        let (log_tx, logs) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = log_tx.send(line);
            }
        });
        let mut banner = Vec::new();
        let mut base = None;
        let mut mqtts_port = None;
        loop {
            let line = match out_rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let logs: Vec<String> = logs.try_iter().collect();
                    panic!("antumbra printed no banner; stdout {banner:?}; logs {logs:#?}");
                }
            };
            if let Some(rest) = line.trim().strip_prefix("MQTT     : mqtts://") {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                mqtts_port = addr.rsplit(':').next().and_then(|p| p.parse().ok());
            }
            if let Some(rest) = line.trim().strip_prefix("REST API : ") {
                base = Some(rest.trim_end_matches("/v1").to_owned());
            }
            let done = line.trim().starts_with("Admin API key");
            banner.push(line);
            if done {
                // A generated key is printed on the line after.
                if banner.last().is_some_and(|l| l.contains("generated now")) {
                    banner.push(out_rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default());
                }
                break;
            }
        }
        Server {
            child,
            base: base.expect("banner names the REST address"),
            mqtts_port: mqtts_port.expect("banner names the MQTT address"),
            banner,
            logs,
        }
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) {
        self.signal("TERM");
    }

    /// Reads the server's log until a line contains `needle`; `false` after `limit`. The lines read are gone
    /// from [`Server::logs`].
    pub fn wait_for_log(&self, needle: &str, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.logs.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }

    /// Sends the signal `name` (`TERM`, `STOP`, `CONT`, …) to the server.
    pub fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{name}");
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.signal_term();
        wait_with_timeout(&mut self.child, Duration::from_secs(30))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows the server's side of the story: the log lines the test did not read itself, up
        // to the last few hundred (the test harness prints a failed test's stderr).
        if std::thread::panicking() {
            const KEEP: usize = 400;
            let mut tail = std::collections::VecDeque::with_capacity(KEEP);
            let mut skipped = 0usize;
            // The reader thread ends with the process's stderr; wait for it briefly.
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            loop {
                match self.logs.recv_timeout(Duration::from_millis(100)) {
                    Ok(line) => {
                        if tail.len() == KEEP {
                            tail.pop_front();
                            skipped += 1;
                        }
                        tail.push_back(line);
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(mpsc::RecvTimeoutError::Timeout) if std::time::Instant::now() > deadline => break,
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                }
            }
            eprintln!("---- antumbra's log ({skipped} earlier lines left out) ----");
            for line in tail {
                eprintln!("{line}");
            }
            eprintln!("---- end of antumbra's log ----");
        }
    }
}

/// Waits for a child, killing it (and panicking) after `limit`.
pub fn wait_with_timeout(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A registered device's credentials, written as files for command-line clients.
pub struct DeviceFiles {
    /// Device id.
    pub id: String,
    /// Certificate (PEM) path.
    pub cert: PathBuf,
    /// Private key (PEM) path.
    pub key: PathBuf,
    /// CA certificate (PEM) path.
    pub ca: PathBuf,
    /// Certificate serial.
    pub serial: String,
}

impl DeviceFiles {
    /// Writes the certificate, key and CA of a `POST /v1/devices` answer (platform-made key) into `dir`.
    pub fn from_registration(body: &serde_json::Value, dir: &Path) -> DeviceFiles {
        let id = body["device"]["id"]
            .as_str()
            .expect("the answer names the device");
        let write = |name: String, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        DeviceFiles {
            id: id.to_owned(),
            cert: write(format!("{id}.crt"), body["certificate"]["pem"].as_str().unwrap()),
            key: write(format!("{id}.key"), body["private_key_pem"].as_str().unwrap()),
            ca: write("ca.crt".into(), body["ca_chain_pem"].as_str().unwrap()),
            serial: body["certificate"]["serial"].as_str().unwrap().to_owned(),
        }
    }

    /// The CA, certificate and key PEMs, read back from their files.
    pub fn pems(&self) -> (String, String, String) {
        let read = |path: &Path| std::fs::read_to_string(path).unwrap();
        (read(&self.ca), read(&self.cert), read(&self.key))
    }
}

/// A runtime for a test that drives async clients: two workers, as on the 2-core CI machine.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

impl Server {
    /// The MQTT/TLS listener's address.
    pub fn mqtts_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.mqtts_port))
    }

    /// Registers a device through REST with `token` and writes its certificate, key and the CA into `dir`.
    pub fn register(&self, token: &str, id: &str, dir: &Path) -> DeviceFiles {
        let res = reqwest::blocking::Client::new()
            .post(format!("{}/v1/devices", self.base))
            .bearer_auth(token)
            .json(&serde_json::json!({ "id": id }))
            .send()
            .expect("register request");
        assert_eq!(res.status(), 201, "registering {id}");
        DeviceFiles::from_registration(&res.json().unwrap(), dir)
    }

    /// GET a JSON document with `token`.
    pub fn get_json(&self, token: &str, path: &str) -> serde_json::Value {
        reqwest::blocking::Client::new()
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    /// Opens `GET /v1/events` (`query`: e.g. `?device_id=x`, or empty) with `token`; each event's JSON `data`
    /// arrives on the returned channel, read by a thread of its own.
    pub fn events(&self, token: &str, query: &str) -> std::sync::mpsc::Receiver<serde_json::Value> {
        use std::io::BufRead;
        let (tx, events) = std::sync::mpsc::channel();
        let res = reqwest::blocking::Client::builder()
            .timeout(None)
            .build()
            .unwrap()
            .get(format!("{}/v1/events{query}", self.base))
            .bearer_auth(token)
            .send()
            .unwrap();
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(res).lines().map_while(Result::ok) {
                if let Some(data) = line.strip_prefix("data: ") {
                    let _ = tx.send(serde_json::from_str(data).unwrap());
                }
            }
        });
        events
    }

    /// The value of one Prometheus sample line (`name{labels}`), 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        let text = reqwest::blocking::get(format!("{}/metrics", self.base))
            .unwrap()
            .text()
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or(0.0)
    }
}

/// Polls `check` every 50 ms until it returns true or `limit` passes; returns whether it did.
pub fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    check()
}

/// Arguments that make mosquitto_pub/mosquitto_sub connect as a device over mutual TLS.
pub fn mosquitto_tls_args(port: u16, device: &DeviceFiles) -> Vec<String> {
    vec![
        "-h".into(),
        "localhost".into(),
        "-p".into(),
        port.to_string(),
        "--cafile".into(),
        device.ca.display().to_string(),
        "--cert".into(),
        device.cert.display().to_string(),
        "--key".into(),
        device.key.display().to_string(),
    ]
}

/// A child process that is killed and reaped when dropped, so no test leaves one behind.
pub struct Proc(pub Child);

impl Proc {
    /// Waits (killing it after `limit`) and returns its exit status and what it printed.
    pub fn output(&mut self, limit: Duration) -> std::process::Output {
        use std::io::Read;
        let status = wait_with_timeout(&mut self.0, limit);
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        if let Some(mut out) = self.0.stdout.take() {
            let _ = out.read_to_end(&mut stdout);
        }
        if let Some(mut err) = self.0.stderr.take() {
            let _ = err.read_to_end(&mut stderr);
        }
        std::process::Output {
            status,
            stdout,
            stderr,
        }
    }

    /// Kills it now and reaps it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---- stock MQTT clients ---------------------------------------------------------------------------------------

/// `mosquitto_pub`/`mosquitto_sub`/`mosquitto_rr` connected as `device` (mutual TLS).
pub fn mosquitto(tool: &str, server: &Server, device: &DeviceFiles, args: &[&str]) -> Command {
    let mut cmd = std::process::Command::new(tool);
    cmd.args(mosquitto_tls_args(server.mqtts_port, device)).args(args);
    cmd
}

pub fn pub_(
    server: &Server,
    device: &DeviceFiles,
    client_id: &str,
    topic: &str,
    msg: &str,
    extra: &[&str],
) -> Output {
    let mut args = vec!["-i", client_id, "-t", topic, "-m", msg];
    args.extend_from_slice(extra);
    mosquitto("mosquitto_pub", server, device, &args)
        .output()
        .unwrap()
}

/// mosquitto_sub waiting for `count` messages (or `wait` seconds), printing "topic payload".
pub fn sub(
    server: &Server,
    device: &DeviceFiles,
    topic: &str,
    count: u32,
    wait: u32,
    extra: &[&str],
) -> Proc {
    let (count, wait) = (count.to_string(), wait.to_string());
    let mut args = vec![
        "-i",
        device.id.as_str(),
        "-t",
        topic,
        "-v",
        "-C",
        &count,
        "-W",
        &wait,
    ];
    args.extend_from_slice(extra);
    let mut cmd = mosquitto("mosquitto_sub", server, device, &args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    Proc(cmd.spawn().unwrap())
}

pub fn paho(server: &Server, device: &DeviceFiles, mode: &str, args: &[&str]) -> Command {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/mqtt_client.py");
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(script).arg(mode).args([
        "--port",
        &server.mqtts_port.to_string(),
        "--ca",
        device.ca.to_str().unwrap(),
        "--cert",
        device.cert.to_str().unwrap(),
        "--key",
        device.key.to_str().unwrap(),
        "--id",
        &device.id,
    ]);
    cmd.args(args);
    cmd
}

/// Spawns a paho client and waits until it prints "connected".
pub fn paho_connected(server: &Server, device: &DeviceFiles, mode: &str, args: &[&str]) -> Proc {
    let mut child = Proc(
        paho(server, device, mode, args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "connected", "paho {mode}: {line}");
    child
}
