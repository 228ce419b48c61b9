//! The REST side of `shadow-bench`: paced `PATCH`es of desired state (timed to the device's delta by the
//! fleet) and `GET` throughput with `wrk`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio::time::Instant as TokioInstant;

use crate::bench::brokers::{debian_bin, Guard};
use crate::bench::cpu::{process_secs, Meter, Usage};
use crate::bench::load::{histogram, now_ns};

/// Most PATCHes waiting for their response at once; when the server falls behind further, PATCHes are skipped
/// (and counted) rather than queued in the tool.
const PATCHES_IN_FLIGHT: usize = 256;

/// What the PATCH driver saw.
pub struct Patches {
    /// Sent within the phase.
    pub sent: u64,
    /// Answered 200.
    pub ok: u64,
    /// Answered otherwise, or failed: first few distinct errors with counts.
    pub failed: Vec<(String, usize)>,
    /// Not sent because [`PATCHES_IN_FLIGHT`] were already waiting.
    pub skipped: u64,
    /// PATCH sent → response, µs.
    pub response: Histogram<u64>,
}

/// PATCHes `{"state":{"desired":{"target":<send time, ns>}}}` at `rate` per second from `start` to `end`,
/// round robin over `devices`, on a keep-alive connection pool.
pub async fn patch_paced(
    base: String,
    token: String,
    devices: Vec<String>,
    rate: f64,
    start: Instant,
    end: Instant,
    clock: Instant,
) -> Result<Patches> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(PATCHES_IN_FLIGHT)
        // Below actix's keep-alive (5 s): a connection the server is closing is never picked for a request (one
        // PATCH in 10,000 failed that way in a full run).
        .pool_idle_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .build()?;
    let permits = Arc::new(Semaphore::new(PATCHES_IN_FLIGHT));
    let shared = Arc::new(Mutex::new(Patches {
        sent: 0,
        ok: 0,
        failed: Vec::new(),
        skipped: 0,
        response: histogram(),
    }));
    let period = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let mut requests = Vec::new();
    let mut due = start;
    let mut i = 0usize;
    while due < end && !devices.is_empty() {
        tokio::time::sleep_until(TokioInstant::from_std(due)).await;
        due += period;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared.lock().expect("patch counts").skipped += 1;
            continue;
        };
        let url = format!("{base}/v1/devices/{}/shadow", devices[i % devices.len()]);
        i += 1;
        let (http, token, shared) = (http.clone(), token.clone(), shared.clone());
        requests.push(tokio::spawn(async move {
            let stamp = now_ns(clock);
            let body = format!(r#"{{"state":{{"desired":{{"target":{stamp}}}}}}}"#);
            let sent = Instant::now();
            let res = http
                .patch(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            let outcome = match res {
                Ok(res) if res.status().as_u16() == 200 => {
                    let _ = res.bytes().await;
                    Ok(())
                }
                Ok(res) => Err(format!("PATCH answered {}", res.status())),
                Err(e) => Err(format!("PATCH failed: {e}")),
            };
            let took = sent.elapsed().as_micros() as u64;
            let mut p = shared.lock().expect("patch counts");
            p.sent += 1;
            match outcome {
                Ok(()) => {
                    p.ok += 1;
                    p.response.saturating_record(took);
                }
                Err(e) => crate::bench::load::note(&mut p.failed, e),
            }
            drop(permit);
        }));
    }
    let deadline = TokioInstant::from_std(end) + Duration::from_secs(12);
    for mut request in requests {
        if tokio::time::timeout_at(deadline, &mut request).await.is_err() {
            request.abort();
        }
    }
    let mut p = shared.lock().expect("patch counts");
    Ok(Patches {
        sent: p.sent,
        ok: p.ok,
        failed: std::mem::take(&mut p.failed),
        skipped: p.skipped,
        response: p.response.clone(),
    })
}

/// `wrk`'s figures for one run.
#[derive(Debug)]
pub struct Wrk {
    /// Requests per second (all responses).
    pub rate: f64,
    /// Latency percentiles, ms.
    pub p50: f64,
    /// 99th percentile, ms.
    pub p99: f64,
    /// Responses that were not 2xx/3xx.
    pub non_2xx: u64,
    /// Socket errors (connect, read, write, timeout), summed.
    pub socket_errors: u64,
    /// CPU over the run (the broker's is antumbra's).
    pub cpu: Usage,
    /// wrk's own CPU seconds.
    pub wrk_cpu: f64,
    /// The command line, for the report.
    pub command: String,
}

/// Path of `wrk`, installing the Debian package when it is missing.
pub fn wrk_bin() -> Result<PathBuf> {
    debian_bin("/usr/bin/wrk", "wrk")
}

/// Runs `wrk` against `path` of `base` (a Lua script picks a random device per request when `path` contains
/// `{device}`), measuring antumbra's (`pid`) and wrk's CPU.
#[allow(clippy::too_many_arguments)]
pub fn wrk(
    bin: &Path,
    dir: &Path,
    base: &str,
    token: &str,
    path: &str,
    devices: usize,
    duration: Duration,
    connections: usize,
    pid: u32,
) -> Result<Wrk> {
    let script = dir.join("wrk-devices.lua");
    std::fs::write(
        &script,
        format!(
            "-- shadow-bench: one random device of bench-00001..bench-{devices:05} per request\n\
             local path = \"{path}\"\n\
             request = function()\n\
             \x20 local id = string.format(\"bench-%05d\", math.random(1, {devices}))\n\
             \x20 return wrk.format(\"GET\", (string.gsub(path, \"{{device}}\", id)))\n\
             end\n"
        ),
    )?;
    let secs = duration.as_secs().max(1);
    let args = vec![
        "-t2".to_owned(),
        format!("-c{connections}"),
        format!("-d{secs}s"),
        "--latency".to_owned(),
        "-H".to_owned(),
        format!("Authorization: Bearer {token}"),
        "-s".to_owned(),
        script.display().to_string(),
        base.to_owned(),
    ];
    let command = format!(
        "wrk -t2 -c{connections} -d{secs}s --latency -H 'Authorization: Bearer <admin token>' -s <random device> {base}{path}"
    );
    let child = Command::new(bin)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting wrk")?;
    let wrk_pid = child.id();
    let meter = Meter::start(pid);
    let wrk_start = process_secs(wrk_pid).unwrap_or(0.0);
    // wrk's CPU: the last reading before it exits (at most 100 ms short).
    let mut wrk_last = wrk_start;
    let mut cpu = None;
    let mut guard = Guard::new(child);
    let started = Instant::now();
    let output = loop {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(secs) = process_secs(wrk_pid) {
            wrk_last = secs;
        }
        if cpu.is_none() && started.elapsed() >= duration {
            cpu = Some(meter.read());
        }
        if started.elapsed() > duration + Duration::from_secs(30) {
            bail!("wrk did not finish");
        }
        if !guard.is_running() {
            break guard.output()?;
        }
    };
    let text = String::from_utf8_lossy(&output.0).into_owned();
    let rate = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk's output: {text} {}", output.1))?;
    let percentile = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .and_then(|v| duration_ms(v.trim()))
            .unwrap_or(f64::NAN)
    };
    let non_2xx = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let socket_errors = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|v| {
            v.split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Ok(Wrk {
        rate,
        p50: percentile("50%"),
        p99: percentile("99%"),
        non_2xx,
        socket_errors,
        cpu: cpu.unwrap_or_else(|| meter.read()),
        wrk_cpu: wrk_last - wrk_start,
        command,
    })
}

/// `1.23ms`, `456.00us`, `1.20s` → milliseconds.
fn duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (value, unit) = text.split_at(split);
    let value: f64 = value.trim().parse().ok()?;
    Some(match unit.trim() {
        "us" => value / 1000.0,
        "ms" => value,
        "s" => value * 1000.0,
        "m" => value * 60_000.0,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::duration_ms;

    #[test]
    fn wrk_durations() {
        assert_eq!(duration_ms("1.50ms"), Some(1.5));
        assert_eq!(duration_ms("250.00us"), Some(0.25));
        assert_eq!(duration_ms("1.20s"), Some(1200.0));
        assert_eq!(duration_ms("x"), None);
    }
}
