//! A private `redis-server` for the Redis shadow store: a free loopback port, no persistence, its own
//! directory, stopped (by pid) when the tool is done with it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::brokers::{debian_bin, free_port, Guard};

/// A running private Redis.
pub struct RedisServer {
    guard: Guard,
    /// `redis://127.0.0.1:PORT/0`.
    pub url: String,
    /// The command line, for the report.
    pub command: String,
}

/// Path of `redis-server`, installing the Debian package when it is missing.
fn redis_bin() -> Result<PathBuf> {
    debian_bin("/usr/bin/redis-server", "redis-server")
}

impl RedisServer {
    /// Starts `redis-server` in the foreground on a free loopback port, with `dir` as its directory, and waits
    /// until it answers PING.
    pub fn start(dir: &Path) -> Result<Self> {
        let bin = redis_bin()?;
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let args = [
            "--port".to_owned(),
            port.to_string(),
            "--bind".to_owned(),
            "127.0.0.1".to_owned(),
            "--save".to_owned(),
            String::new(),
            "--appendonly".to_owned(),
            "no".to_owned(),
            "--dir".to_owned(),
            dir.display().to_string(),
            "--logfile".to_owned(),
            dir.join("redis.log").display().to_string(),
        ];
        let child = Command::new(&bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut guard = Guard::new(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pong(addr) {
            if !guard.is_running() {
                let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
                bail!("redis-server exited at start: {log}");
            }
            if Instant::now() > deadline {
                bail!("redis-server did not answer on {addr} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            guard,
            url: format!("redis://{addr}/0"),
            command: format!(
                "{} --port {port} --bind 127.0.0.1 --save '' --appendonly no (no persistence)",
                bin.display()
            ),
        })
    }

    /// Its process id (for its CPU time).
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }
}

fn pong(addr: SocketAddr) -> bool {
    let Ok(mut tcp) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    tcp.write_all(b"PING\r\n").is_ok() && tcp.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
