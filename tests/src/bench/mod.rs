//! `mqtt-bench`: antumbra's MQTT broker against Mosquitto on the same machine, same certificates, same
//! device isolation, alternating runs.
//!
//! - `brokers`: the two broker processes, device registration through REST, resident memory;
//! - `packet` and `client`: a lean MQTT 3.1.1 client over mutual TLS (tokio-rustls);
//! - `conn` (`conn-10k`) and `load` (`p2p`, `fanin`): the scenarios, named as in the EMQ benchmark suite;
//! - `pair`: the two live brokers, restarted when one breaks (reported as an incident) or for a fresh run;
//! - `cpu`: CPU used by the broker, this tool and the machine (idle, hypervisor steal) over an interval;
//! - `scenarios`: each scenario on both brokers, alternating, into a table;
//! - `report`: tables and the machine description.
//!
//! Everything runs on 127.0.0.1; every loop is bounded by a count and a deadline, and a watchdog ends the
//! run (and the brokers it started) if it overstays its cap. It prints figures and asserts nothing.

pub mod brokers;
pub mod client;
mod conn;
pub mod cpu;
pub mod load;
pub mod packet;
mod pair;
pub mod report;
mod scenarios;

use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};

use brokers::{Antumbra, LogLines, Mosquitto};
use pair::{Pair, Starter};
use scenarios::Bench;

/// TLS handshakes (and CONNECTs) in flight at once, per broker.
pub const CONNECT_CONCURRENCY: usize = 256;
/// Most devices connected at once: the fd limit here is 20,000 per process, for the broker and for us.
const MAX_DEVICES: usize = 10_000;
/// Unacknowledged / undelivered publishes per connection in `p2p`.
const P2P_WINDOW: usize = 100;
/// Unacknowledged publishes per connection in `fanin` (1,000 connections: 10,000 in flight in all).
const FANIN_WINDOW: usize = 10;
/// Payload sizes of `p2p`.
const P2P_PAYLOADS: [usize; 3] = [16, 256, 1024];
/// Payload size of `fanin`.
const FANIN_PAYLOAD: usize = 256;

/// Benchmarks antumbra's MQTT broker against Mosquitto on loopback (prints figures, asserts nothing).
#[derive(Debug, Parser)]
#[command(name = "mqtt-bench")]
pub struct Args {
    /// Which scenario to run.
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    pub scenario: Scenario,
    /// Devices in conn-10k [default: 10000; --quick: 1000; at most 10000].
    #[arg(long)]
    pub devices: Option<usize>,
    /// Smaller counts and 2 s runs: about a minute in all.
    #[arg(long)]
    pub quick: bool,
    /// Runs per broker for each measurement, alternating brokers [default: 2; --quick: 1].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// RUST_LOG for antumbra (its log is summarised at the end).
    #[arg(long, default_value = "warn")]
    pub antumbra_log: String,
    /// Keep the temporary directory (configs, certificates, both brokers' logs) and print its path.
    #[arg(long)]
    pub keep_dir: bool,
}

/// The scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// conn-10k, then p2p, then fanin.
    All,
    /// Devices connect over mTLS and idle: connect rate and memory per connection.
    #[value(name = "conn-10k")]
    Conn10k,
    /// 1-to-1 messages (each device publishes to its own subscription), QoS 0/1, 16 B/256 B/1 KB.
    P2p,
    /// Many devices publish QoS 1 telemetry: broker ingest rate (PUBACKs/s).
    Fanin,
}

/// Counts and durations for this run.
struct Plan {
    conn_devices: usize,
    p2p_devices: usize,
    fanin_devices: usize,
    run: Duration,
    rounds: usize,
    cap: Duration,
    scenarios: Vec<Scenario>,
}

impl Plan {
    fn new(args: &Args) -> Self {
        let quick = args.quick;
        let scenarios = match args.scenario {
            Scenario::All => vec![Scenario::Conn10k, Scenario::P2p, Scenario::Fanin],
            one => vec![one],
        };
        Self {
            conn_devices: args
                .devices
                .unwrap_or(if quick { 1_000 } else { MAX_DEVICES })
                .clamp(1, MAX_DEVICES),
            p2p_devices: if quick { 20 } else { 100 },
            fanin_devices: if quick { 200 } else { 1_000 },
            run: Duration::from_secs(if quick { 2 } else { 5 }),
            rounds: args.rounds.unwrap_or(if quick { 1 } else { 2 }).clamp(1, 5),
            cap: Duration::from_secs(if quick { 180 } else { 600 }),
            scenarios,
        }
    }

    fn devices_needed(&self) -> usize {
        self.scenarios
            .iter()
            .map(|s| match s {
                Scenario::Conn10k => self.conn_devices,
                Scenario::P2p => self.p2p_devices,
                Scenario::Fanin => self.fanin_devices,
                Scenario::All => 0,
            })
            .max()
            .unwrap_or(0)
    }
}

/// A 32-character admin token from the kernel's random source.
pub fn random_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Ends the brokers we started and the process if the run overstays `limit`.
pub fn watchdog(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("over the time cap of {} s, stopping", limit.as_secs());
        let pids = brokers::CHILDREN.lock().map(|p| p.clone()).unwrap_or_default();
        for pid in pids {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        std::process::exit(2);
    });
}

/// Broker order for `rounds` rounds: antumbra first when `antumbra_first`, then alternating.
fn order(antumbra_first: bool, rounds: usize) -> Vec<usize> {
    let first = usize::from(!antumbra_first);
    (0..rounds * 2).map(|i| (first + i) % 2).collect()
}

/// Runs everything and prints the figures.
pub fn run(args: &Args) -> Result<()> {
    let clock = Instant::now();
    let plan = Plan::new(args);
    watchdog(plan.cap + Duration::from_secs(60));
    println!("mqtt-bench: antumbra vs Mosquitto, MQTT 3.1.1 over mutual TLS on 127.0.0.1");
    println!(
        "  note: this machine has {} cores; each broker and this load generator (tokio, 2 workers) share them,",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("  so figures compare the brokers under the same load, they are not either broker's capacity.");
    println!(
        "  plan: {:?}, conn-10k devices={}, p2p devices={}, fanin devices={}, runs of {} s, {} round(s) per broker, cap {} s",
        plan.scenarios,
        plan.conn_devices,
        plan.p2p_devices,
        plan.fanin_devices,
        plan.run.as_secs(),
        plan.rounds,
        plan.cap.as_secs()
    );

    let antumbra_bin = brokers::antumbra_bin()?;
    let mosquitto_bin = brokers::mosquitto_bin()?;
    let dir = tempfile::Builder::new().prefix("mqtt-bench-").tempdir()?;
    let token = random_token()?;
    let logs = std::sync::Arc::new(LogLines::new(&dir.path().join("antumbra.log")));
    let antumbra = Antumbra::start(
        &antumbra_bin,
        dir.path(),
        &token,
        20_000,
        &args.antumbra_log,
        logs.clone(),
    )?;
    println!(
        "\nantumbra: {} serve --data-dir {}/data --http 127.0.0.1:0 --mqtts 127.0.0.1:0 --mqtt-max-connections 20000",
        antumbra_bin.display(),
        dir.path().display()
    );
    println!(
        "  env ANTUMBRA_ADMIN_TOKEN=<32 chars> RUST_LOG={}; REST {}, MQTT {}",
        args.antumbra_log, antumbra.base, antumbra.broker.addr
    );

    let ca_pem = antumbra.ca_pem()?;
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, &ca_pem)?;
    let need = plan.devices_needed();
    let threads = 12;
    let (devices, took) =
        brokers::register(&antumbra.base, &token, &ca_pem, need, threads).context("registering devices")?;
    println!(
        "  registered {} devices through REST with {threads} threads in {:.1} s: {:.0} registrations/s",
        devices.len(),
        took.as_secs_f64(),
        devices.len() as f64 / took.as_secs_f64().max(1e-6)
    );

    let mosquitto = Mosquitto::start(
        &mosquitto_bin,
        dir.path(),
        &ca_file,
        &antumbra.data_dir.join("pki"),
    )?;
    let mosquitto_log = mosquitto.log_file.clone();
    println!(
        "\nmosquitto: {} -c {}/mosquitto.conf, listening on {}",
        mosquitto_bin.display(),
        dir.path().display(),
        mosquitto.broker.addr
    );
    println!("  written-down settings (mosquitto.conf; mosquitto.acl is `pattern readwrite devices/%u/#`):");
    for line in mosquitto.config.lines().filter(|l| !l.starts_with('#')) {
        println!("    {line}");
    }
    println!();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let starter = Starter {
        antumbra_bin: &antumbra_bin,
        mosquitto_bin: &mosquitto_bin,
        dir: dir.path(),
        token: &token,
        log_filter: &args.antumbra_log,
        logs: logs.clone(),
        ca_file: &ca_file,
    };
    let bench = Bench {
        plan: &plan,
        devices: &devices,
        runtime: &runtime,
        clock,
        pair: Pair::new(starter, antumbra, mosquitto),
    };
    for (i, scenario) in plan.scenarios.iter().enumerate() {
        let antumbra_first = i % 2 == 0;
        let text = match scenario {
            Scenario::Conn10k => bench.conn(antumbra_first),
            Scenario::P2p => bench.p2p(antumbra_first),
            Scenario::Fanin => bench.fanin(antumbra_first),
            Scenario::All => String::new(),
        };
        println!("{text}");
    }
    let ending = bench.pair.finish();
    drop(runtime);

    let state = |running: bool| {
        if running {
            "running at the end"
        } else {
            "NOT running at the end"
        }
    };
    println!("broker health");
    println!(
        "  antumbra : {}; {} incident(s); {} log line(s) (RUST_LOG={}; full log {}/antumbra.log), by message:",
        state(ending.antumbra_running),
        ending.incidents.len(),
        logs.count.load(std::sync::atomic::Ordering::Relaxed),
        args.antumbra_log,
        dir.path().display()
    );
    for incident in &ending.incidents {
        println!("    ! {incident}");
    }
    for (n, first) in logs.summary().iter().take(12) {
        println!("    {n:>7} x {first}");
    }
    let mosquitto_log = std::fs::read_to_string(&mosquitto_log).unwrap_or_default();
    println!(
        "  mosquitto: {}; {} log line(s) at warning or above",
        state(ending.mosquitto_running),
        mosquitto_log.lines().count()
    );
    for line in mosquitto_log.lines().take(10) {
        println!("    {line}");
    }
    println!(
        "\n{}",
        report::machine(&antumbra_bin, &mosquitto_bin, &brokers::workspace_root())
    );
    println!("total time {:.0} s", clock.elapsed().as_secs_f64());
    if args.keep_dir {
        println!("kept {}", dir.keep().display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::order;

    #[test]
    fn brokers_alternate() {
        assert_eq!(order(true, 2), vec![0, 1, 0, 1]);
        assert_eq!(order(false, 1), vec![1, 0]);
    }
}
