//! `shadow-bench`: device shadow throughput and latency over MQTT and REST, on the embedded store and on Redis,
//! with the raw broker rate of the same run beside it so the shadow's overhead shows.
//!
//! - `fleet`: the device connections and the phases they run (warm-up, saturated, raw, paced);
//! - `rest`: paced REST `PATCH`es of desired state, and `GET` throughput with `wrk`;
//! - `redis`: the private `redis-server` behind the Redis store.
//!
//! For each store it starts antumbra (fresh data directory), registers the devices through REST, connects them
//! all over mutual TLS and measures, in this order: raw publish→subscribe and saturated shadow updates
//! (alternating, `rounds` times), a paced run with REST changes, then `GET` with `wrk`. Everything runs on
//! 127.0.0.1; every phase has a count and a deadline; it prints figures and asserts nothing.

mod fleet;
mod redis;
mod rest;

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};

use crate::bench::brokers::{self, Antumbra, LogLines};
use crate::bench::cpu::{process_secs, Meter, Usage};
use crate::bench::load::describe;
use crate::bench::report;
use fleet::{Counts, Fleet, Subscriptions, Work};
use redis::RedisServer;

/// Benchmarks device shadows over MQTT and REST on both stores (prints figures, asserts nothing).
#[derive(Debug, Parser)]
#[command(name = "shadow-bench")]
pub struct Args {
    /// Which shadow store(s).
    #[arg(long, value_enum, default_value_t = StoreKind::Both)]
    pub store: StoreKind,
    /// How devices subscribe to their shadow topics [default: both; --quick: sdk].
    #[arg(long, value_enum)]
    pub subscriptions: Option<SubscriptionsArg>,
    /// Devices (one MQTT connection each) [default: 1000].
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Shadow updates (or raw messages) in flight per device in the saturated phases.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    /// Reported updates per second, all devices together, in the paced phase.
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,
    /// REST PATCHes of desired state per second during the paced phase (timed to the device's delta).
    #[arg(long, default_value_t = 1_000.0)]
    pub patch_rate: f64,
    /// Rounds of (raw, saturated) per store [default: 2; --quick: 1].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Shorter phases and one round: about a minute and a half in all.
    #[arg(long)]
    pub quick: bool,
    /// RUST_LOG for antumbra (its log is summarised at the end).
    #[arg(long, default_value = "warn")]
    pub antumbra_log: String,
    /// Keep the temporary directory (antumbra's data and logs, Redis's log) and print its path.
    #[arg(long)]
    pub keep_dir: bool,
}

/// The shadow stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// Embedded, then Redis.
    Both,
    /// The embedded store (SQLite file in the data dir; the default without REDIS_URL).
    Embedded,
    /// Redis (a private redis-server started by the tool).
    Redis,
}

impl StoreKind {
    fn name(self) -> &'static str {
        match self {
            StoreKind::Both => "both",
            StoreKind::Embedded => "embedded",
            StoreKind::Redis => "redis",
        }
    }
}

/// How devices subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SubscriptionsArg {
    /// `sdk` for each store, then `aws` for each store.
    Both,
    /// The six reply and delta filters of antumbra's SDK per device (classic and named shadows).
    Sdk,
    /// `accepted`, `rejected` and `delta` filters per device, as AWS IoT's device SDKs.
    Aws,
}

/// One column of the report: a store, and how the devices subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Setup {
    store: StoreKind,
    subscriptions: Subscriptions,
}

impl Setup {
    fn name(self) -> String {
        format!("{}/{}", self.store.name(), self.subscriptions.name())
    }
}

/// Counts and durations for this run.
struct Plan {
    setups: Vec<Setup>,
    devices: usize,
    window: usize,
    rate: f64,
    patch_rate: f64,
    rounds: usize,
    run: Duration,
    paced: Duration,
    wrk: Duration,
    cap: Duration,
}

impl Plan {
    fn new(args: &Args) -> Self {
        let quick = args.quick;
        let stores = match args.store {
            StoreKind::Both => vec![StoreKind::Embedded, StoreKind::Redis],
            one => vec![one],
        };
        let styles = match args.subscriptions.unwrap_or(if quick {
            SubscriptionsArg::Sdk
        } else {
            SubscriptionsArg::Both
        }) {
            SubscriptionsArg::Both => vec![Subscriptions::Sdk, Subscriptions::Aws],
            SubscriptionsArg::Sdk => vec![Subscriptions::Sdk],
            SubscriptionsArg::Aws => vec![Subscriptions::Aws],
        };
        let mut setups = Vec::new();
        for subscriptions in &styles {
            for store in &stores {
                setups.push(Setup {
                    store: *store,
                    subscriptions: *subscriptions,
                });
            }
        }
        Self {
            setups,
            devices: args.devices.clamp(1, 10_000),
            window: args.window.clamp(1, 64),
            rate: args.rate.clamp(1.0, 1e6),
            patch_rate: args.patch_rate.clamp(0.0, 1e5),
            rounds: args.rounds.unwrap_or(if quick { 1 } else { 2 }).clamp(1, 5),
            run: Duration::from_secs(if quick { 3 } else { 5 }),
            paced: Duration::from_secs(if quick { 4 } else { 10 }),
            wrk: Duration::from_secs(if quick { 3 } else { 5 }),
            cap: Duration::from_secs(if quick { 180 } else { 600 }),
        }
    }

    /// A generous estimate of one setup's time, to skip one that would pass the cap.
    fn per_setup(&self) -> Duration {
        let phases = (self.run + Duration::from_secs(2)) * 2 * self.rounds as u32
            + self.paced
            + Duration::from_secs(4)
            + self.wrk * 2;
        phases + Duration::from_secs(10) + Duration::from_millis(3 * self.devices as u64)
    }
}

// Row labels, shared by the table and the targets.
const SATURATED: &str = "shadow updates/s, saturated";
const PACED_P99: &str = "paced p99 pub->accepted (ms)";
const DELTA_P99: &str = "PATCH->delta p99 (ms)";
const GET_RATE: &str = "GET shadow req/s (wrk)";

/// One store's figures: rows of values (one per run), in the order they were first measured.
#[derive(Default)]
struct Figures {
    rows: Vec<(String, Vec<f64>, usize)>,
    notes: Vec<String>,
}

impl Figures {
    fn put(&mut self, label: &str, value: f64, decimals: usize) {
        match self.rows.iter_mut().find(|r| r.0 == label) {
            Some(row) => row.1.push(value),
            None => self.rows.push((label.to_owned(), vec![value], decimals)),
        }
    }

    fn mean(&self, label: &str) -> Option<f64> {
        let row = self.rows.iter().find(|r| r.0 == label)?;
        (!row.1.is_empty()).then(|| row.1.iter().sum::<f64>() / row.1.len() as f64)
    }

    /// CPU rows of one phase, in % of one core (the machine has 200): antumbra, Redis, this tool (and wrk),
    /// idle, steal, and what is left — other processes on the machine, which make a run noisy.
    fn cpu(&mut self, phase: &str, cpu: &Usage, redis_secs: Option<f64>, wrk_secs: Option<f64>) {
        self.put(&format!("{phase}: antumbra CPU (%)"), cpu.percent(cpu.broker), 0);
        if let Some(secs) = redis_secs {
            self.put(&format!("{phase}: redis-server CPU (%)"), cpu.percent(secs), 0);
        }
        self.put(&format!("{phase}: load gen CPU (%)"), cpu.percent(cpu.own), 0);
        if let Some(secs) = wrk_secs {
            self.put(&format!("{phase}: wrk CPU (%)"), cpu.percent(secs), 0);
        }
        self.put(&format!("{phase}: machine idle (%)"), cpu.percent(cpu.idle), 0);
        self.put(&format!("{phase}: machine steal (%)"), cpu.percent(cpu.steal), 0);
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as f64;
        let accounted =
            cpu.broker + cpu.own + redis_secs.unwrap_or(0.0) + wrk_secs.unwrap_or(0.0) + cpu.idle + cpu.steal;
        let other = (cores * cpu.wall - accounted).max(0.0);
        self.put(
            &format!("{phase}: other processes CPU (%)"),
            cpu.percent(other),
            0,
        );
    }
}

/// Longest wait for the server to go quiet before the paced phase.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// Waits until antumbra (and Redis) use under a tenth of a core over 200 ms, so that the paced phase measures a
/// steady rate rather than the tail of the saturated one (its queues, checkpoints and trims); returns the wait.
async fn settle(pid: u32, redis_pid: Option<u32>) -> Duration {
    const SLICE: Duration = Duration::from_millis(200);
    let began = Instant::now();
    let busy = || process_secs(pid).unwrap_or(0.0) + redis_pid.and_then(process_secs).unwrap_or(0.0);
    let mut before = busy();
    while began.elapsed() < SETTLE_LIMIT {
        tokio::time::sleep(SLICE).await;
        let now = busy();
        if now - before < SLICE.as_secs_f64() / 10.0 {
            break;
        }
        before = now;
    }
    began.elapsed()
}

fn ms(histogram: &hdrhistogram::Histogram<u64>, quantile: f64) -> f64 {
    if histogram.is_empty() {
        f64::NAN
    } else {
        histogram.value_at_quantile(quantile) as f64 / 1000.0
    }
}

/// What every store's run shares.
struct Shared<'a> {
    plan: &'a Plan,
    antumbra_bin: &'a Path,
    wrk_bin: &'a Path,
    dir: &'a Path,
    token: &'a str,
    log_filter: &'a str,
    runtime: &'a tokio::runtime::Runtime,
    clock: Instant,
}

/// Runs a phase on the fleet and measures CPU over it (antumbra's, this tool's, Redis's if any, the machine's).
async fn measure(
    fleet: &mut Fleet,
    work: Work,
    duration: Duration,
    pid: u32,
    redis_pid: Option<u32>,
) -> (Counts, Usage, Option<f64>) {
    let (start, end) = fleet.schedule(work, duration);
    tokio::time::sleep_until(start.into()).await;
    let meter = Meter::start(pid);
    let redis_before = redis_pid.and_then(process_secs);
    tokio::time::sleep_until(end.into()).await;
    let cpu = meter.read();
    let redis = redis_pid
        .and_then(process_secs)
        .zip(redis_before)
        .map(|(after, before)| after - before);
    (fleet.collect(end).await, cpu, redis)
}

/// Everything for one setup, on a freshly started antumbra (and Redis): the router keeps every filter it has
/// seen, so setups never share a process.
fn bench_setup(setup: Setup, cx: &Shared) -> Result<Figures> {
    let plan = cx.plan;
    let store = setup.store;
    let dir = cx.dir.join(setup.name().replace('/', "-"));
    std::fs::create_dir_all(&dir)?;
    let redis = match store {
        StoreKind::Redis => Some(RedisServer::start(&dir.join("redis"))?),
        _ => None,
    };
    let mut env = Vec::new();
    if let Some(redis) = &redis {
        env.push(("REDIS_URL", redis.url.as_str()));
        env.push(("ANTUMBRA_REDIS_PREFIX", "shadow-bench:"));
        println!("  redis: {}", redis.command);
    }
    let logs = Arc::new(LogLines::new(&dir.join("antumbra.log")));
    let antumbra = Antumbra::start_with(
        cx.antumbra_bin,
        &dir,
        cx.token,
        20_000,
        cx.log_filter,
        logs.clone(),
        &env,
    )?;
    let pid = antumbra.broker.pid;
    let redis_pid = redis.as_ref().map(RedisServer::pid);
    println!(
        "  antumbra: serve --data-dir {}/data --http 127.0.0.1:0 --mqtts 127.0.0.1:0{}; REST {}, MQTT {}",
        dir.display(),
        if redis.is_some() {
            " with REDIS_URL (Redis store and cluster bridge)"
        } else {
            " (embedded store: data/shadows.db)"
        },
        antumbra.base,
        antumbra.broker.addr
    );
    let ca_pem = antumbra.ca_pem()?;
    let (devices, took) = brokers::register(&antumbra.base, cx.token, &ca_pem, plan.devices, 12)
        .context("registering devices")?;
    println!(
        "  registered {} devices through REST in {:.1} s",
        devices.len(),
        took.as_secs_f64()
    );
    let ids: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
    let mut f = Figures::default();
    let window = plan.window;

    cx.runtime.block_on(async {
        let connecting = Instant::now();
        let mut fleet = Fleet::connect(antumbra.broker.addr, &devices, setup.subscriptions, cx.clock).await?;
        println!(
            "  connected {} devices (mTLS, {} subscriptions + devices/{{id}}/raw) in {:.1} s; update request {} bytes",
            fleet.alive,
            match setup.subscriptions {
                Subscriptions::Sdk => "SDK: +/accepted, +/rejected, update/delta, the same named",
                Subscriptions::Aws => "accepted, rejected, delta",
            },
            connecting.elapsed().as_secs_f64(),
            fleet.update_bytes
        );
        f.put("devices connected", fleet.alive as f64, 0);

        let (warmup, _, _) = measure(&mut fleet, Work::Warmup, Duration::from_secs(1), pid, redis_pid).await;
        eprintln!(
            "  [{}] warm-up: {} of {} first updates accepted (p99 {:.1} ms)",
            setup.name(),
            warmup.counted,
            warmup.sent,
            ms(&warmup.latency, 0.99)
        );
        f.put("warm-up updates accepted", warmup.counted as f64, 0);

        for round in 1..=plan.rounds {
            let (raw, raw_cpu, raw_redis) =
                measure(&mut fleet, Work::Raw { window }, plan.run, pid, redis_pid).await;
            let (sat, sat_cpu, sat_redis) =
                measure(&mut fleet, Work::Saturated { window }, plan.run, pid, redis_pid).await;
            let secs = plan.run.as_secs_f64();
            let (raw_rate, sat_rate) = (raw.counted as f64 / secs, sat.counted as f64 / secs);
            eprintln!(
                "  [{}] round {round}: raw {raw_rate:.0} msg/s, shadow {sat_rate:.0} updates/s",
                setup.name()
            );
            f.put("raw pub->sub msg/s (QoS 1)", raw_rate, 0);
            f.put(SATURATED, sat_rate, 0);
            f.put("shadow / raw", sat_rate / raw_rate.max(1.0), 2);
            f.put("saturated p50 pub->accepted (ms)", ms(&sat.latency, 0.5), 1);
            f.put("saturated p99 pub->accepted (ms)", ms(&sat.latency, 0.99), 1);
            f.put("raw p50 pub->delivery (ms)", ms(&raw.latency, 0.5), 1);
            f.put("raw p99 pub->delivery (ms)", ms(&raw.latency, 0.99), 1);
            f.put(
                "antumbra CPU per update (us)",
                sat_cpu.broker * 1e6 / sat.counted.max(1) as f64,
                1,
            );
            if let Some(secs) = sat_redis {
                f.put("redis CPU per update (us)", secs * 1e6 / sat.counted.max(1) as f64, 1);
            }
            f.put(
                "antumbra CPU per raw msg (us)",
                raw_cpu.broker * 1e6 / raw.counted.max(1) as f64,
                1,
            );
            f.cpu("saturated", &sat_cpu, sat_redis, None);
            f.cpu("raw", &raw_cpu, raw_redis, None);
            f.put("saturated rejected", sat.rejected as f64, 0);
            f.put("saturated missing", sat.missing as f64 + raw.missing as f64, 0);
        }

        // Paced device updates with REST changes of desired state alongside, from a quiet server.
        let settled = settle(pid, redis_pid).await;
        eprintln!(
            "  [{}] quiet {:.1} s after the saturated phase{}",
            setup.name(),
            settled.as_secs_f64(),
            if settled >= SETTLE_LIMIT { " (gave up waiting)" } else { "" }
        );
        f.put("quiet after saturation (s)", settled.as_secs_f64(), 1);
        let period = Duration::from_secs_f64(fleet.alive as f64 / plan.rate);
        let (start, end) = fleet.schedule(Work::Paced { period }, plan.paced);
        let patches = tokio::spawn(rest::patch_paced(
            antumbra.base.clone(),
            cx.token.to_owned(),
            ids.clone(),
            plan.patch_rate,
            start,
            end,
            cx.clock,
        ));
        tokio::time::sleep_until(start.into()).await;
        let meter = Meter::start(pid);
        let redis_before = redis_pid.and_then(process_secs);
        tokio::time::sleep_until(end.into()).await;
        let cpu = meter.read();
        let redis_secs = redis_pid
            .and_then(process_secs)
            .zip(redis_before)
            .map(|(a, b)| a - b);
        let paced = fleet.collect(end).await;
        let patches = patches.await??;
        let secs = plan.paced.as_secs_f64();
        eprintln!(
            "  [{}] paced: {:.0} updates/s accepted, p99 {:.2} ms; {:.0} PATCH/s, PATCH->delta p99 {:.2} ms",
            setup.name(),
            paced.counted as f64 / secs,
            ms(&paced.latency, 0.99),
            patches.ok as f64 / secs,
            ms(&paced.delta_latency, 0.99)
        );
        eprintln!(
            "  [{}] paced timeline, per {} ms of send time (% of answers over 5 ms/slowest ms): {}",
            setup.name(),
            fleet::SLICE.as_millis(),
            timeline(&paced.timeline)
        );
        f.put("paced: updates/s asked", plan.rate, 0);
        f.put("paced: updates/s accepted", paced.counted as f64 / secs, 0);
        f.put("paced p50 pub->accepted (ms)", ms(&paced.latency, 0.5), 2);
        f.put(PACED_P99, ms(&paced.latency, 0.99), 2);
        f.put("paced p99.9 pub->accepted (ms)", ms(&paced.latency, 0.999), 2);
        f.put("paced: send lateness p99 (ms)", ms(&paced.late, 0.99), 2);
        f.put("PATCH/s answered 200", patches.ok as f64 / secs, 0);
        f.put("PATCH->delta p50 (ms)", ms(&paced.delta_latency, 0.5), 2);
        f.put(DELTA_P99, ms(&paced.delta_latency, 0.99), 2);
        f.put("PATCH response p99 (ms)", ms(&patches.response, 0.99), 2);
        f.put("deltas timed / PATCHes ok", paced.deltas as f64 / patches.ok.max(1) as f64, 3);
        f.cpu("paced", &cpu, redis_secs, None);
        f.put("paced: missing accepted", paced.missing as f64, 0);
        f.put("paced: rejected", paced.rejected as f64, 0);
        if patches.skipped > 0 {
            f.notes.push(format!(
                "{} PATCHes not sent: 256 were already waiting for a response",
                patches.skipped
            ));
        }
        if !patches.failed.is_empty() {
            f.notes.push(format!("PATCH failures: {}", describe(&patches.failed)));
        }
        if !fleet.errors.is_empty() {
            f.notes.push(format!("device errors: {}", describe(&fleet.errors)));
        }
        fleet.stop().await;
        anyhow::Ok(())
    })?;
    // Let antumbra finish with the 1,000 departures (presence, memory) before measuring GET.
    std::thread::sleep(Duration::from_secs(3));

    // REST GET does not depend on how devices subscribe: measured once per store.
    let first_of_store = plan.setups.iter().find(|s| s.store == store) == Some(&setup);
    let connections = 64;
    for (label, path, key) in [
        ("GET shadow", "/v1/devices/{device}/shadow", GET_RATE),
        ("GET /healthz", "/healthz", "GET /healthz req/s (wrk)"),
    ]
    .into_iter()
    .filter(|_| first_of_store)
    {
        match rest::wrk(
            cx.wrk_bin,
            &dir,
            &antumbra.base,
            cx.token,
            path,
            plan.devices,
            plan.wrk,
            connections,
            pid,
        ) {
            Ok(w) => {
                eprintln!("  [{}] {label}: {:.0} req/s", setup.name(), w.rate);
                f.put(key, w.rate, 0);
                f.put(&format!("{label} p50 (ms)"), w.p50, 2);
                f.put(&format!("{label} p99 (ms)"), w.p99, 2);
                f.cpu(label, &w.cpu, None, Some(w.wrk_cpu));
                if w.non_2xx > 0 || w.socket_errors > 0 {
                    f.notes.push(format!(
                        "{label}: {} non-2xx responses, {} socket errors",
                        w.non_2xx, w.socket_errors
                    ));
                }
                if label == "GET shadow" {
                    f.notes.push(format!("wrk: {}", w.command));
                }
            }
            Err(e) => f.notes.push(format!("{label}: wrk failed: {e:#}")),
        }
    }
    if let (Some(get), Some(health)) = (f.mean(GET_RATE), f.mean("GET /healthz req/s (wrk)")) {
        f.put("GET shadow / healthz", get / health.max(1.0), 2);
    }

    let panics = logs.panics.load(std::sync::atomic::Ordering::Relaxed);
    let lines = logs.count.load(std::sync::atomic::Ordering::Relaxed);
    f.notes.push(format!(
        "antumbra log: {lines} line(s) at RUST_LOG={}, {panics} panic(s); {}/antumbra.log",
        cx.log_filter,
        dir.display()
    ));
    for (n, first) in logs.summary().iter().take(6) {
        f.notes.push(format!("  {n:>6} x {first}"));
    }
    drop(antumbra);
    drop(redis);
    Ok(f)
}

/// The table: one column per store (mean of its runs), then each run's values when there were several.
fn table(stores: &[(Setup, Figures)]) -> String {
    let mut labels: Vec<(String, usize)> = Vec::new();
    for (_, f) in stores {
        for (label, _, decimals) in &f.rows {
            if !labels.iter().any(|(l, _)| l == label) {
                labels.push((label.clone(), *decimals));
            }
        }
    }
    let mut out = String::new();
    let _ = write!(out, "{:<40}", "");
    for (store, _) in stores {
        let _ = write!(out, "{:>15}", store.name());
    }
    out.push_str("   per run\n");
    for (label, decimals) in &labels {
        let _ = write!(out, "{label:<40}");
        let mut runs = Vec::new();
        for (_, f) in stores {
            let values = f
                .rows
                .iter()
                .find(|r| &r.0 == label)
                .map(|r| r.1.clone())
                .unwrap_or_default();
            let cell = match f.mean(label) {
                Some(v) if v.is_nan() => "-".to_owned(),
                Some(v) => format!("{v:.decimals$}"),
                None => "-".to_owned(),
            };
            let _ = write!(out, "{cell:>15}");
            runs.push(
                values
                    .iter()
                    .map(|v| format!("{v:.decimals$}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        if stores.iter().any(|(_, f)| {
            f.rows
                .iter()
                .find(|r| &r.0 == label)
                .is_some_and(|r| r.1.len() > 1)
        }) {
            let _ = write!(out, "   {}", runs.join(" | "));
        }
        out.push('\n');
    }
    out
}

/// The targets against what was measured.
fn targets(stores: &[(Setup, Figures)], plan: &Plan) -> String {
    let mut out = String::from("targets (issue #4; 2-core machine, load generator included)\n");
    let checks: [(&str, &str, bool, f64, Option<StoreKind>); 4] = [
        (
            "shadow updates/s saturated >= 30,000 (Redis)",
            SATURATED,
            true,
            30_000.0,
            Some(StoreKind::Redis),
        ),
        ("p99 publish->accepted < 5 ms, paced", PACED_P99, false, 5.0, None),
        ("p99 PATCH->delta < 5 ms, paced", DELTA_P99, false, 5.0, None),
        ("GET shadow >= 20,000 req/s (wrk)", GET_RATE, true, 20_000.0, None),
    ];
    for (text, label, at_least, bound, only) in checks {
        let mut cells = Vec::new();
        for (store, f) in stores {
            if only.is_some_and(|o| o != store.store) {
                continue;
            }
            let cell = match f.mean(label) {
                Some(v) if !v.is_nan() => {
                    let met = if at_least { v >= bound } else { v < bound };
                    format!(
                        "{}: {v:.prec$} {}",
                        store.name(),
                        if met { "met" } else { "NOT met" },
                        prec = if at_least { 0 } else { 2 }
                    )
                }
                _ => format!("{}: not measured", store.name()),
            };
            cells.push(cell);
        }
        if !cells.is_empty() {
            let _ = writeln!(out, "  {text:<46} {}", cells.join("; "));
        }
    }
    let _ = writeln!(
        out,
        "  (paced = {:.0} reported updates/s from the devices plus {:.0} REST PATCH/s)",
        plan.rate, plan.patch_rate
    );
    out
}

/// Runs everything and prints the figures.
pub fn run(args: &Args) -> Result<()> {
    let clock = Instant::now();
    let plan = Plan::new(args);
    crate::bench::watchdog(plan.cap + Duration::from_secs(60));
    println!("shadow-bench: device shadows over MQTT (mutual TLS) and REST on 127.0.0.1, per shadow store");
    println!(
        "  note: this machine has {} cores; antumbra, Redis and this load generator (tokio, 2 workers) share them.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  plan: {:?} (store/subscriptions), {} devices, window {} per device, saturated/raw phases of {} s x {} \
         round(s), paced {} s at {:.0} updates/s + {:.0} PATCH/s, wrk {} s; cap {} s",
        plan.setups.iter().map(|s| s.name()).collect::<Vec<_>>(),
        plan.devices,
        plan.window,
        plan.run.as_secs(),
        plan.rounds,
        plan.paced.as_secs(),
        plan.rate,
        plan.patch_rate,
        plan.wrk.as_secs(),
        plan.cap.as_secs()
    );
    if plan.devices < 1000 {
        println!("  note: fewer than 1,000 devices; the issue's figures are for 1,000+");
    }
    let antumbra_bin = brokers::antumbra_bin()?;
    let wrk_bin = rest::wrk_bin()?;
    let dir = tempfile::Builder::new().prefix("shadow-bench-").tempdir()?;
    let token = crate::bench::random_token()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cx = Shared {
        plan: &plan,
        antumbra_bin: &antumbra_bin,
        wrk_bin: &wrk_bin,
        dir: dir.path(),
        token: &token,
        log_filter: &args.antumbra_log,
        runtime: &runtime,
        clock,
    };
    let mut done = Vec::new();
    for setup in &plan.setups {
        println!(
            "\n{}: {} store, devices subscribe as {}",
            setup.name(),
            setup.store.name(),
            match setup.subscriptions {
                Subscriptions::Sdk =>
                    "antumbra's SDK (+/accepted, +/rejected, update/delta, classic and named)",
                Subscriptions::Aws => "AWS IoT's SDKs (update/accepted, update/rejected, update/delta)",
            }
        );
        if clock.elapsed() + plan.per_setup() > plan.cap {
            println!(
                "  skipped: it would pass the time cap of {} s",
                plan.cap.as_secs()
            );
            continue;
        }
        match bench_setup(*setup, &cx) {
            Ok(figures) => done.push((*setup, figures)),
            Err(e) => println!("  FAILED: {e:#}"),
        }
    }
    drop(runtime);

    println!(
        "\nfigures (CPU in % of one core, the machine has 200; latencies from HDR histograms; saturated latency \
         includes queueing behind the window)"
    );
    println!("{}", table(&done));
    for (store, f) in &done {
        for note in &f.notes {
            println!("  {} ! {note}", store.name());
        }
    }
    println!("\n{}", targets(&done, &plan));
    let mut machine = report::machine_and_antumbra(&antumbra_bin, &brokers::workspace_root());
    let _ = writeln!(
        machine,
        "  redis-server     : {}",
        report::version_of("redis-server", &["--version"])
    );
    let _ = writeln!(
        machine,
        "  wrk              : {}",
        report::version_of(&wrk_bin.display().to_string(), &["-v"])
    );
    let _ = writeln!(
        machine,
        "  load generator   : this tool, tokio multi-thread runtime with 2 workers, rustls (ring), on the same cores"
    );
    println!("{machine}");
    println!("total time {:.0} s", clock.elapsed().as_secs_f64());
    if args.keep_dir {
        println!("kept {}", dir.keep().display());
    }
    Ok(())
}

/// `12/21` per slice: the share of slow answers in per cent, and the slowest in ms.
fn timeline(slices: &[fleet::Slice]) -> String {
    slices
        .iter()
        .map(|s| {
            format!(
                "{:.0}/{:.0}",
                100.0 * s.slow as f64 / s.timed.max(1) as f64,
                s.max_us as f64 / 1000.0
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}
