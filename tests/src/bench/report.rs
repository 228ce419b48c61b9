//! Tables of figures (antumbra, Mosquitto, ratio) and a description of the machine.

use std::fmt::Write as _;
use std::process::Command;

/// Every run of one measurement on both brokers, in the order they ran.
pub struct Runs<T> {
    /// Antumbra's runs.
    pub antumbra: Vec<Result<T, String>>,
    /// Mosquitto's runs.
    pub mosquitto: Vec<Result<T, String>>,
}

impl<T> Default for Runs<T> {
    fn default() -> Self {
        Self {
            antumbra: Vec::new(),
            mosquitto: Vec::new(),
        }
    }
}

impl<T> Runs<T> {
    /// The runs of broker `index` (0 = antumbra, 1 = mosquitto).
    pub fn of(&mut self, index: usize) -> &mut Vec<Result<T, String>> {
        if index == 0 {
            &mut self.antumbra
        } else {
            &mut self.mosquitto
        }
    }
}

/// One line of a table: a figure from each broker's successful runs.
pub struct Line {
    label: String,
    antumbra: Vec<f64>,
    mosquitto: Vec<f64>,
    decimals: usize,
    ratio: bool,
}

impl Line {
    /// A line with the ratio antumbra/mosquitto.
    pub fn compared<T>(
        label: impl Into<String>,
        decimals: usize,
        runs: &Runs<T>,
        value: impl Fn(&T) -> f64,
    ) -> Self {
        let values = |list: &[Result<T, String>]| list.iter().flatten().map(&value).collect();
        Self {
            label: label.into(),
            antumbra: values(&runs.antumbra),
            mosquitto: values(&runs.mosquitto),
            decimals,
            ratio: true,
        }
    }

    /// A line without a ratio (counts, absolute sizes).
    pub fn plain<T>(
        label: impl Into<String>,
        decimals: usize,
        runs: &Runs<T>,
        value: impl Fn(&T) -> f64,
    ) -> Self {
        Self {
            ratio: false,
            ..Self::compared(label, decimals, runs, value)
        }
    }
}

/// The failed runs, one note each, prefixed with `what`.
pub fn failures<T>(what: &str, runs: &Runs<T>) -> Vec<String> {
    let mut notes = Vec::new();
    for (name, list) in [("antumbra", &runs.antumbra), ("mosquitto", &runs.mosquitto)] {
        for (i, run) in list.iter().enumerate() {
            if let Err(e) = run {
                notes.push(format!("{what}{name} run {}: FAILED: {e}", i + 1));
            }
        }
    }
    notes
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// The table: mean over each broker's successful runs, the ratio, and each run's value when there were
/// several; then the notes (failures, connection errors).
pub fn table(title: &str, lines: &[Line], notes: &[String]) -> String {
    let several = lines
        .iter()
        .any(|l| l.antumbra.len() > 1 || l.mosquitto.len() > 1);
    let mut out = format!("{title}\n");
    let _ = write!(
        out,
        "{:<30}{:>13}{:>13}{:>8}",
        "", "antumbra", "mosquitto", "ratio"
    );
    if several {
        out.push_str("   per run (antumbra | mosquitto)");
    }
    out.push('\n');
    for line in lines {
        let fmt = |v: f64| format!("{v:.prec$}", prec = line.decimals);
        let cell = |v: &[f64]| mean(v).map_or("failed".to_owned(), fmt);
        let ratio = match (line.ratio, mean(&line.antumbra), mean(&line.mosquitto)) {
            (true, Some(a), Some(m)) if m != 0.0 => format!("{:.2}", a / m),
            _ => String::new(),
        };
        let _ = write!(
            out,
            "{:<30}{:>13}{:>13}{:>8}",
            line.label,
            cell(&line.antumbra),
            cell(&line.mosquitto),
            ratio
        );
        if several {
            let list = |v: &[f64]| v.iter().map(|v| fmt(*v)).collect::<Vec<_>>().join(" ");
            let _ = write!(out, "   {} | {}", list(&line.antumbra), list(&line.mosquitto));
        }
        out.push('\n');
    }
    for note in notes {
        let _ = writeln!(out, "  ! {note}");
    }
    out
}

/// Output of a command, first line, or `unknown`.
fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// nproc, CPU model, memory, kernel, and the versions of both brokers.
pub fn machine(
    antumbra_bin: &std::path::Path,
    mosquitto_bin: &std::path::Path,
    workspace: &std::path::Path,
) -> String {
    let mut out = machine_and_antumbra(antumbra_bin, workspace);
    let _ = writeln!(
        out,
        "  mosquitto        : {}",
        first_line(&mosquitto_bin.display().to_string(), &["-h"])
    );
    let _ = writeln!(out, "  load generator   : this tool, tokio multi-thread runtime with 2 workers, rustls (ring), on the same cores");
    out
}

/// The first line a program prints for `args` (its version), or `unknown`.
#[allow(dead_code)] // used by shadow-bench only (this module is compiled into both tools)
pub fn version_of(program: &str, args: &[&str]) -> String {
    first_line(program, args)
}

/// `machine` and the lines that describe it (nproc, CPU model, memory, kernel) and antumbra's version.
pub fn machine_and_antumbra(antumbra_bin: &std::path::Path, workspace: &std::path::Path) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or("unknown".into(), |kb| {
            format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0)
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let git = first_line(
        "git",
        &[
            "-C",
            &workspace.display().to_string(),
            "describe",
            "--always",
            "--dirty",
            "--tags",
        ],
    );
    let mut out = String::from("machine\n");
    let _ = writeln!(out, "  cpus (nproc)     : {cpus}");
    let _ = writeln!(out, "  cpu model        : {model}");
    let _ = writeln!(out, "  memory           : {mem}");
    let _ = writeln!(out, "  kernel           : {}", kernel.trim());
    let _ = writeln!(
        out,
        "  antumbra         : {} (git {git}, {})",
        first_line(&antumbra_bin.display().to_string(), &["--version"]),
        antumbra_bin.display()
    );
    out
}
