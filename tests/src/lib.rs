//! Helpers for end-to-end tests: start the real `antumbra` binary as a child process, read where it listens
//! from what it prints, and stop it with a signal.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

/// A running `antumbra serve`.
pub struct Server {
    /// The child process.
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Everything it printed on stdout up to the end of its start-up banner.
    pub banner: Vec<String>,
    /// Lines it prints on stderr (logs), as they come.
    pub logs: mpsc::Receiver<String>,
}

impl Server {
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
        loop {
            let line = match out_rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let logs: Vec<String> = logs.try_iter().collect();
                    panic!("antumbra printed no banner; stdout {banner:?}; logs {logs:#?}");
                }
            };
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
            banner,
            logs,
        }
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
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
