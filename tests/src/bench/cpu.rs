//! CPU use over a measured interval: the broker's, this tool's, and the machine's idle and steal time (the
//! development machines are 2-core VMs whose hypervisor takes a varying share; without it the spread between
//! runs is hard to read).

use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

/// Clock ticks per second of `/proc` times.
fn ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat` (all its threads).
pub fn process_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3; utime and stime are 14 and 15.
    let (_, after) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    Some((field(14)? + field(15)?) / ticks())
}

/// Machine-wide idle (idle + iowait) and steal core-seconds, from the `cpu` line of `/proc/stat`.
fn machine_secs() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …
    Some(((v.get(3)? + v.get(4)?) / ticks(), v.get(7)? / ticks()))
}

/// CPU seconds used over an interval; NaN where a reading failed.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// The broker process.
    pub broker: f64,
    /// This load generator.
    pub own: f64,
    /// Idle, all cores.
    pub idle: f64,
    /// Taken by the hypervisor, all cores.
    pub steal: f64,
    /// Wall-clock seconds of the interval.
    pub wall: f64,
}

impl Usage {
    /// `secs` as a percentage of one core over the interval.
    pub fn percent(&self, secs: f64) -> f64 {
        secs * 100.0 / self.wall
    }
}

/// Readings at the start of an interval.
pub struct Meter {
    pid: u32,
    at: Instant,
    broker: Option<f64>,
    own: Option<f64>,
    machine: Option<(f64, f64)>,
}

impl Meter {
    /// Starts measuring, for broker process `pid`.
    pub fn start(pid: u32) -> Self {
        Self {
            pid,
            at: Instant::now(),
            broker: process_secs(pid),
            own: process_secs(std::process::id()),
            machine: machine_secs(),
        }
    }

    /// What was used since [`Meter::start`].
    pub fn read(&self) -> Usage {
        let delta = |a: Option<f64>, b: Option<f64>| a.zip(b).map_or(f64::NAN, |(a, b)| b - a);
        let machine = machine_secs();
        Usage {
            broker: delta(self.broker, process_secs(self.pid)),
            own: delta(self.own, process_secs(std::process::id())),
            idle: delta(self.machine.map(|m| m.0), machine.map(|m| m.0)),
            steal: delta(self.machine.map(|m| m.1), machine.map(|m| m.1)),
            wall: self.at.elapsed().as_secs_f64(),
        }
    }
}
