//! The three scenarios, each on both brokers in alternating order, each into a table.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::brokers::{Broker, Device};
use super::cpu::Usage;
use super::load::{self, Mode, Spec};
use super::pair::Pair;
use super::report::{self, Line, Runs};
use super::{conn, order, Plan, CONNECT_CONCURRENCY, FANIN_PAYLOAD, FANIN_WINDOW, P2P_PAYLOADS, P2P_WINDOW};

/// What every scenario needs.
pub struct Bench<'a> {
    pub plan: &'a Plan,
    pub devices: &'a [Device],
    pub runtime: &'a tokio::runtime::Runtime,
    pub clock: Instant,
    pub pair: Pair<'a>,
}

/// The CPU lines every table has (all in % of one core; the machine has 100 per core).
fn cpu_lines<T>(prefix: &str, runs: &Runs<T>, cpu: impl Fn(&T) -> Usage + Copy) -> Vec<Line> {
    vec![
        Line::plain(format!("{prefix}broker CPU (%)"), 0, runs, move |o| {
            let u = cpu(o);
            u.percent(u.broker)
        }),
        Line::plain(format!("{prefix}load gen CPU (%)"), 0, runs, move |o| {
            let u = cpu(o);
            u.percent(u.own)
        }),
        Line::plain(format!("{prefix}machine idle (%)"), 0, runs, move |o| {
            let u = cpu(o);
            u.percent(u.idle)
        }),
        Line::plain(format!("{prefix}machine steal (%)"), 0, runs, move |o| {
            let u = cpu(o);
            u.percent(u.steal)
        }),
    ]
}

impl Bench<'_> {
    /// Runs `one` on each broker in alternating order (a fresh broker process each time when `fresh`),
    /// skipping runs that would overstay the cap.
    fn alternate<T>(
        &self,
        label: &str,
        antumbra_first: bool,
        estimate: Duration,
        fresh: bool,
        mut one: impl FnMut(&Broker) -> Result<T>,
    ) -> Runs<T> {
        let mut runs = Runs::default();
        for index in order(antumbra_first, self.plan.rounds) {
            let name = if index == 0 { "antumbra" } else { "mosquitto" };
            let run = format!("{label} run {} on {name}", runs.of(index).len() + 1);
            eprintln!("  [{:>4.0} s] {run}", self.clock.elapsed().as_secs_f64());
            if self.clock.elapsed() + estimate > self.plan.cap {
                runs.of(index)
                    .push(Err("skipped: the run would pass the time cap".into()));
                continue;
            }
            let result = self
                .pair
                .broker(index, &run, fresh)
                .and_then(|broker| one(&broker))
                .map_err(|e| format!("{e:#}"));
            runs.of(index).push(result);
            std::thread::sleep(Duration::from_secs(1));
            if index == 0 {
                self.pair.check_antumbra(&run);
            }
        }
        runs
    }

    /// `conn-10k`: connect rate, memory per connection; each run on a freshly started broker.
    pub fn conn(&self, antumbra_first: bool) -> String {
        let n = self.plan.conn_devices.min(self.devices.len());
        let devices = &self.devices[..n];
        let estimate = Duration::from_secs(15 + n as u64 / 300);
        let runs = self.alternate("conn-10k", antumbra_first, estimate, true, |broker| {
            self.runtime.block_on(conn::run(broker, devices))
        });
        type O = conn::Outcome;
        let mut lines = vec![
            Line::compared("connect rate (/s)", 1, &runs, |o: &O| o.rate),
            Line::compared("RSS per device (KB)", 1, &runs, O::kb_per_device),
            Line::compared("broker CPU/connect (ms)", 2, &runs, O::cpu_ms_per_connect),
            Line::plain("load gen CPU/connect (ms)", 2, &runs, O::own_cpu_ms_per_connect),
            Line::plain("RSS before (MB)", 1, &runs, |o: &O| mb(o.rss_before)),
            Line::plain("RSS all connected (MB)", 1, &runs, |o: &O| mb(o.rss_with)),
            Line::plain("RSS after leave (MB)", 1, &runs, |o: &O| mb(o.rss_after)),
            Line::plain("connected", 0, &runs, |o: &O| o.connected as f64),
            Line::plain("dropped while idle", 0, &runs, |o: &O| o.dropped as f64),
        ];
        lines.extend(cpu_lines("connecting: ", &runs, |o: &O| o.cpu));
        let title = format!(
            "conn-10k  devices={n}  (mTLS, keep-alive 60 s, {CONNECT_CONCURRENCY} handshakes in flight; each run on a freshly\n          started broker; memory read after 2 s / 3 s settle; CPU in % of one core, 2 cores)"
        );
        let mut notes = report::failures("", &runs);
        notes.extend(outcome_errors("", &runs, |o: &O| &o.errors));
        notes.extend(self.pair.take_pending());
        report::table(&title, &lines, &notes)
    }

    /// `p2p`: 1-to-1 messages through the broker.
    pub fn p2p(&self, antumbra_first: bool) -> String {
        let n = self.plan.p2p_devices.min(self.devices.len());
        let devices = &self.devices[..n];
        let estimate = self.plan.run + Duration::from_secs(6);
        let (mut lines, mut notes) = (Vec::new(), Vec::new());
        let combos = [0u8, 1].into_iter().flat_map(|q| P2P_PAYLOADS.map(|p| (q, p)));
        for (i, (qos, payload)) in combos.enumerate() {
            let spec = Spec {
                mode: Mode::P2p { qos },
                payload,
                window: P2P_WINDOW,
                duration: self.plan.run,
            };
            let name = format!("QoS{qos} {}", size_name(payload));
            let label = format!("p2p {name}");
            let first = antumbra_first == (i % 2 == 0);
            let runs = self.alternate(&label, first, estimate, false, |broker| {
                self.runtime
                    .block_on(load::run(broker, devices, spec, self.clock))
            });
            type O = load::Outcome;
            lines.push(Line::compared(format!("{name} msg/s"), 0, &runs, |o: &O| o.rate));
            lines.push(Line::compared(format!("{name} p50 (ms)"), 2, &runs, |o: &O| {
                quantile_ms(o, 0.5)
            }));
            lines.push(Line::compared(format!("{name} p99 (ms)"), 2, &runs, |o: &O| {
                quantile_ms(o, 0.99)
            }));
            lines.extend(cpu_lines(&format!("{name} "), &runs, |o: &O| o.cpu));
            let what = format!("{name}: ");
            notes.extend(report::failures(&what, &runs));
            notes.extend(outcome_errors(&what, &runs, |o: &O| &o.errors));
            notes.extend(undelivered(&what, &runs));
        }
        let title = format!(
            "p2p  devices={n}  (each device subscribes to devices/{{id}}/p2p and publishes there; window {P2P_WINDOW} per connection;\n     {} s per run; latency = publish -> delivery, so it includes queueing behind the window; CPU in % of one core)",
            self.plan.run.as_secs()
        );
        notes.extend(self.pair.take_pending());
        report::table(&title, &lines, &notes)
    }

    /// `fanin`: QoS 1 telemetry ingest.
    pub fn fanin(&self, antumbra_first: bool) -> String {
        let n = self.plan.fanin_devices.min(self.devices.len());
        let devices = &self.devices[..n];
        let spec = Spec {
            mode: Mode::Fanin,
            payload: FANIN_PAYLOAD,
            window: FANIN_WINDOW,
            duration: self.plan.run,
        };
        let estimate = self.plan.run + Duration::from_secs(10);
        let runs = self.alternate("fanin", antumbra_first, estimate, false, |broker| {
            self.runtime
                .block_on(load::run(broker, devices, spec, self.clock))
        });
        type O = load::Outcome;
        let mut lines = vec![
            Line::compared("ingest (PUBACK/s)", 0, &runs, |o: &O| o.rate),
            Line::compared("p50 pub->PUBACK (ms)", 2, &runs, |o: &O| quantile_ms(o, 0.5)),
            Line::compared("p99 pub->PUBACK (ms)", 2, &runs, |o: &O| quantile_ms(o, 0.99)),
            Line::compared("broker CPU/msg (us)", 1, &runs, O::cpu_us_per_message),
        ];
        lines.extend(cpu_lines("", &runs, |o: &O| o.cpu));
        lines.extend([
            Line::plain("connected", 0, &runs, |o: &O| o.connected as f64),
            Line::plain("published", 0, &runs, |o: &O| o.sent as f64),
            Line::plain("unacked at end", 0, &runs, |o: &O| o.missing as f64),
        ]);
        let title = format!(
            "fanin  devices={n}  (QoS 1, {FANIN_PAYLOAD} B to devices/{{id}}/telemetry, no subscriber; window {FANIN_WINDOW} per connection;\n       {} s per run; CPU in % of one core)",
            self.plan.run.as_secs()
        );
        let mut notes = report::failures("", &runs);
        notes.extend(outcome_errors("", &runs, |o: &O| &o.errors));
        notes.extend(self.pair.take_pending());
        report::table(&title, &lines, &notes)
    }
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn size_name(bytes: usize) -> String {
    if bytes >= 1024 && bytes % 1024 == 0 {
        format!("{}KB", bytes / 1024)
    } else {
        format!("{bytes}B")
    }
}

/// A latency quantile of a run in milliseconds.
fn quantile_ms(outcome: &load::Outcome, q: f64) -> f64 {
    outcome.latency.value_at_quantile(q) as f64 / 1000.0
}

/// Each run's messages published but never delivered, when there were any.
fn undelivered(what: &str, runs: &Runs<load::Outcome>) -> Vec<String> {
    let mut notes = Vec::new();
    for (name, list) in [("antumbra", &runs.antumbra), ("mosquitto", &runs.mosquitto)] {
        for (i, outcome) in list.iter().enumerate() {
            if let Some(o) = outcome.as_ref().ok().filter(|o| o.missing > 0) {
                notes.push(format!(
                    "{what}{name} run {}: {} of {} published never delivered",
                    i + 1,
                    o.missing,
                    o.sent
                ));
            }
        }
    }
    notes
}

/// Connection errors inside runs that otherwise succeeded, one note per run.
fn outcome_errors<T>(
    what: &str,
    runs: &Runs<T>,
    errors: impl Fn(&T) -> &Vec<(String, usize)>,
) -> Vec<String> {
    let mut notes = Vec::new();
    for (name, list) in [("antumbra", &runs.antumbra), ("mosquitto", &runs.mosquitto)] {
        for (i, run) in list.iter().enumerate() {
            if let Ok(outcome) = run {
                let errors = errors(outcome);
                if !errors.is_empty() {
                    notes.push(format!("{what}{name} run {}: {}", i + 1, load::describe(errors)));
                }
            }
        }
    }
    notes
}
