//! The two brokers under test as child processes: `antumbra serve` (which also registers the devices) and
//! Mosquitto configured to use antumbra's CA and server certificate, so one device certificate works on both.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::client;

/// Pids of the brokers we started, so the watchdog can end them (and only them) if the run overstays.
pub static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Distinct log messages kept for the summary; more are only counted.
const KEPT_PATTERNS: usize = 50;

/// One broker as the scenarios see it.
#[derive(Debug, Clone)]
pub struct Broker {
    /// Its MQTT/TLS address on loopback.
    pub addr: SocketAddr,
    /// Its process id, for resident memory.
    pub pid: u32,
}

/// A child process that is killed and reaped when dropped.
pub struct Guard(Child);

impl Guard {
    /// Takes charge of `child` (and lists it for the watchdog).
    pub fn new(child: Child) -> Self {
        CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        Self(child)
    }
}

// Used by shadow-bench only (this module is compiled into both tools).
#[allow(dead_code)]
impl Guard {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    /// What it printed on its piped stdout and stderr (read to the end: call it once it has exited).
    pub fn output(&mut self) -> Result<(Vec<u8>, String)> {
        let mut out = Vec::new();
        let mut err = String::new();
        if let Some(mut stdout) = self.0.stdout.take() {
            stdout.read_to_end(&mut out)?;
        }
        if let Some(mut stderr) = self.0.stderr.take() {
            stderr.read_to_string(&mut err)?;
        }
        Ok((out, err))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let pid = self.0.id();
        if matches!(self.0.try_wait(), Ok(None)) {
            // SIGTERM first, so the broker can close its sessions; SIGKILL if it takes too long.
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
        CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| *p != pid);
    }
}

/// What a broker logged: every line goes to a file; the summary groups lines by their message with the
/// timestamp, colours and numbers taken out.
pub struct LogLines {
    file: Mutex<Option<std::fs::File>>,
    /// (message pattern, count, first line), first [`KEPT_PATTERNS`] patterns.
    patterns: Mutex<Vec<(String, usize, String)>>,
    /// Lines seen.
    pub count: AtomicUsize,
    /// Panics reported (`panicked at`).
    pub panics: AtomicUsize,
    /// Whether the last record was a panic (its message follows on the next line).
    after_panic: std::sync::atomic::AtomicBool,
}

impl LogLines {
    /// Appends to `path` (a restarted broker keeps adding to the same file and summary).
    pub fn new(path: &Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok();
        Self {
            file: Mutex::new(file),
            patterns: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            panics: AtomicUsize::new(0),
            after_panic: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn push(&self, line: String) {
        use std::io::Write;
        let line = strip_ansi(&line);
        self.count.fetch_add(1, Ordering::Relaxed);
        if let Some(file) = self.file.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = writeln!(file, "{line}");
        }
        let panic = line.contains("panicked at");
        let record = panic || line.starts_with(|c: char| c.is_ascii_digit());
        let after_panic = self.after_panic.swap(panic, Ordering::Relaxed);
        let mut patterns = self.patterns.lock().unwrap_or_else(|e| e.into_inner());
        if !record {
            // A continuation (backtrace, panic message): only the panic's message joins its record.
            if let Some(last) = patterns.last_mut().filter(|_| after_panic) {
                last.2.push_str(" -- ");
                last.2.push_str(line.trim());
            }
            return;
        }
        if panic {
            self.panics.fetch_add(1, Ordering::Relaxed);
            // Each panic is its own entry, so its message can join it.
            let key = format!("panic {}", patterns.len());
            patterns.push((key, 1, line));
            return;
        }
        let pattern = pattern(&line);
        if let Some(p) = patterns.iter_mut().find(|p| p.0 == pattern) {
            p.1 += 1;
        } else if patterns.len() < KEPT_PATTERNS {
            patterns.push((pattern, 1, line));
        }
    }

    /// Panics first, then distinct messages with their counts and first occurrence, most frequent first.
    pub fn summary(&self) -> Vec<(usize, String)> {
        let patterns = self.patterns.lock().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<_> = patterns.iter().collect();
        list.sort_by_key(|(key, n, _)| (!key.starts_with("panic "), std::cmp::Reverse(*n)));
        list.into_iter()
            .map(|(_, n, first)| (*n, first.clone()))
            .collect()
    }
}

/// The line without ANSI colour sequences.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The line without its leading timestamp and with digit runs as `#`, so repeats group together.
fn pattern(line: &str) -> String {
    let rest = line.split_once(' ').map_or(line, |(first, rest)| {
        if first.starts_with(|c: char| c.is_ascii_digit()) {
            rest
        } else {
            line
        }
    });
    let mut out = String::with_capacity(rest.len());
    for c in rest.chars() {
        if c.is_ascii_digit() {
            if !out.ends_with('#') {
                out.push('#');
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Workspace root (tests/..).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `ANTUMBRA_BIN`, else `target/release/antumbra`, built first when missing.
pub fn antumbra_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("ANTUMBRA_BIN") {
        return Ok(bin.into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let bin = target.join("release/antumbra");
    if !bin.exists() {
        println!("{} is missing: cargo build --release -p antumbra", bin.display());
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["build", "--release", "-p", "antumbra"])
            .current_dir(workspace_root())
            .status()
            .context("running cargo build")?;
        if !status.success() || !bin.exists() {
            bail!("cargo build --release -p antumbra failed ({status})");
        }
    }
    Ok(bin)
}

/// A running `antumbra serve`.
pub struct Antumbra {
    child: Guard,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The broker's view for the scenarios.
    pub broker: Broker,
    /// Its data directory (holds `pki/server.crt` and `pki/server.key`).
    pub data_dir: PathBuf,
    /// What it logged on stderr (`RUST_LOG=warn` by default: warnings and errors).
    pub logs: Arc<LogLines>,
}

impl Antumbra {
    /// Starts antumbra on free loopback ports with a fresh data directory under `dir`.
    pub fn start(
        bin: &Path,
        dir: &Path,
        token: &str,
        max_connections: usize,
        log_filter: &str,
        logs: Arc<LogLines>,
    ) -> Result<Self> {
        Self::start_with(bin, dir, token, max_connections, log_filter, logs, &[])
    }

    /// [`Antumbra::start`] with extra environment (e.g. `REDIS_URL` for the Redis shadow store).
    pub fn start_with(
        bin: &Path,
        dir: &Path,
        token: &str,
        max_connections: usize,
        log_filter: &str,
        logs: Arc<LogLines>,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let data_dir = dir.join("data");
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--http", "127.0.0.1:0", "--mqtts", "127.0.0.1:0"])
            .args(["--mqtt-max-connections", &max_connections.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, _) in std::env::vars() {
            if key.starts_with("ANTUMBRA_") || key == "DATABASE_URL" || key == "REDIS_URL" {
                cmd.env_remove(key);
            }
        }
        cmd.env("ANTUMBRA_ADMIN_TOKEN", token)
            .env("RUST_LOG", log_filter)
            .env("NO_COLOR", "1")
            .envs(env.iter().copied());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("antumbra stdout")?;
        let stderr = child.stderr.take().context("antumbra stderr")?;
        let child = Guard::new(child);
        let pid = child.0.id();

        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.push(line);
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Keeps reading after the banner so the pipe never fills.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });

        let (mut base, mut mqtts) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        while base.is_none() || mqtts.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).map_err(|_| {
                let logs: Vec<_> = logs.summary().into_iter().map(|(_, line)| line).collect();
                anyhow!(
                    "antumbra printed no complete banner within 60 s; its log:\n{}",
                    logs.join("\n")
                )
            })?;
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("REST API : ") {
                base = Some(rest.trim_end_matches("/v1").to_owned());
            }
            if let Some(rest) = line.strip_prefix("MQTT     : mqtts://") {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                mqtts = Some(
                    addr.parse::<SocketAddr>()
                        .with_context(|| format!("MQTT address in {line:?}"))?,
                );
            }
        }
        let (Some(base), Some(addr)) = (base, mqtts) else {
            unreachable!("the loop ends only when both are known")
        };
        Ok(Self {
            child,
            base,
            broker: Broker { addr, pid },
            data_dir,
            logs,
        })
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.0.try_wait(), Ok(None))
    }

    /// Status code of `GET /readyz`.
    pub fn readyz(&self) -> Result<u16> {
        Ok(reqwest::blocking::get(format!("{}/readyz", self.base))?
            .status()
            .as_u16())
    }

    /// The CA certificate (PEM), from `GET /v1/ca`.
    pub fn ca_pem(&self) -> Result<String> {
        let res = reqwest::blocking::get(format!("{}/v1/ca", self.base))?;
        if !res.status().is_success() {
            bail!("GET /v1/ca answered {}", res.status());
        }
        Ok(res.text()?)
    }
}

/// A registered device, ready to connect.
pub struct Device {
    /// Device id = MQTT client id = certificate CN.
    pub id: String,
    /// Its TLS client configuration.
    pub tls: Arc<rustls::ClientConfig>,
}

/// Registers `count` devices (`bench-00001`, …) through REST with `threads` parallel clients; returns them
/// in id order and how long it took.
pub fn register(
    base: &str,
    token: &str,
    ca_pem: &str,
    count: usize,
    threads: usize,
) -> Result<(Vec<Device>, Duration)> {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let results: Vec<Result<Vec<(usize, Device)>>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                scope.spawn(|| -> Result<Vec<(usize, Device)>> {
                    let http = reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(30))
                        .build()?;
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            return Ok(mine);
                        }
                        let id = format!("bench-{:05}", i + 1);
                        let res = http
                            .post(format!("{base}/v1/devices"))
                            .bearer_auth(token)
                            .json(&serde_json::json!({ "id": id }))
                            .send()
                            .with_context(|| format!("registering {id}"))?;
                        let status = res.status();
                        if status.as_u16() != 201 {
                            let body = res.text().unwrap_or_default();
                            bail!("registering {id}: {status} {body}");
                        }
                        let body: serde_json::Value = res.json()?;
                        let cert = body["certificate"]["pem"].as_str().context("certificate.pem")?;
                        let key = body["private_key_pem"].as_str().context("private_key_pem")?;
                        let tls = client::tls_config(ca_pem, cert, key)
                            .with_context(|| format!("TLS config of {id}"))?;
                        mine.push((i, Device { id, tls }));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow!("a registration thread panicked")))
            })
            .collect()
    });
    let elapsed = started.elapsed();
    let mut devices = Vec::with_capacity(count);
    for part in results {
        devices.extend(part?);
    }
    devices.sort_by_key(|(i, _)| *i);
    Ok((devices.into_iter().map(|(_, d)| d).collect(), elapsed))
}

/// A running Mosquitto.
pub struct Mosquitto {
    child: Guard,
    /// The broker's view for the scenarios.
    pub broker: Broker,
    /// The configuration file as written (the "written-down settings").
    pub config: String,
    /// Its log file (errors and warnings only).
    pub log_file: PathBuf,
}

/// Path of the Mosquitto binary, installing the Debian package when it is missing.
pub fn mosquitto_bin() -> Result<PathBuf> {
    debian_bin("/usr/sbin/mosquitto", "mosquitto")
}

/// `bin`, installing the Debian package `package` with apt-get (after `apt-get update` if the first try fails)
/// when it is missing.
pub fn debian_bin(bin: &str, package: &str) -> Result<PathBuf> {
    let bin = PathBuf::from(bin);
    if !bin.exists() {
        eprintln!("{} is missing: apt-get install -y {package}", bin.display());
        let install = || {
            Command::new("apt-get")
                .args(["install", "-y", package])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
        };
        if !install().is_ok_and(|s| s.success()) {
            let _ = Command::new("apt-get")
                .arg("update")
                .stdout(Stdio::null())
                .status();
            install().context("running apt-get")?;
        }
        if !bin.exists() {
            bail!("could not install {package} (try `apt-get install -y {package}` as root)");
        }
    }
    Ok(bin)
}

/// A free loopback port (bound, then released: a small race we accept for a local tool).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Mosquitto {
    /// Writes the config (antumbra's CA and server certificate, mTLS, per-device ACL) into `dir` and starts
    /// Mosquitto in the foreground.
    pub fn start(bin: &Path, dir: &Path, ca_file: &Path, pki_dir: &Path) -> Result<Self> {
        let port = free_port()?;
        let acl_file = dir.join("mosquitto.acl");
        std::fs::write(&acl_file, "pattern readwrite devices/%u/#\n")?;
        let log_file = dir.join("mosquitto.log");
        let config = format!(
            "# mqtt-bench: Mosquitto as the reference broker, same CA, server certificate and device isolation\n\
             # as antumbra; log level like antumbra's RUST_LOG=warn.\n\
             user root\n\
             per_listener_settings false\n\
             allow_anonymous false\n\
             acl_file {acl}\n\
             persistence false\n\
             max_inflight_messages 100\n\
             max_queued_messages 10000\n\
             log_dest file {log}\n\
             log_type error\n\
             log_type warning\n\
             listener {port} 127.0.0.1\n\
             max_connections -1\n\
             set_tcp_nodelay true\n\
             cafile {ca}\n\
             certfile {cert}\n\
             keyfile {key}\n\
             require_certificate true\n\
             use_identity_as_username true\n",
            acl = acl_file.display(),
            log = log_file.display(),
            ca = ca_file.display(),
            cert = pki_dir.join("server.crt").display(),
            key = pki_dir.join("server.key").display(),
        );
        let conf_file = dir.join("mosquitto.conf");
        std::fs::write(&conf_file, &config)?;
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("mosquitto.stderr"))?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut child = Guard::new(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.0.try_wait() {
                let mut why = String::new();
                for f in [dir.join("mosquitto.stderr"), log_file.clone()] {
                    let _ = std::fs::File::open(f).and_then(|mut f| f.read_to_string(&mut why));
                }
                bail!("mosquitto exited at start ({status}): {why}");
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("mosquitto did not listen on {addr} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let pid = child.0.id();
        Ok(Self {
            child,
            broker: Broker { addr, pid },
            config,
            log_file,
        })
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.0.try_wait(), Ok(None))
    }
}

/// Resident memory of a process in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for pid {pid}"))
}
