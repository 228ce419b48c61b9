//! `conn-10k`: many devices connect over mutual TLS and stay idle; connect rate and broker memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant as TokioInstant;

use super::brokers::{rss_kb, Broker, Device};
use super::client;
use super::cpu::{Meter, Usage};
use super::load::{describe, note};
use super::packet::{self, Packet};
use super::CONNECT_CONCURRENCY;

/// Settle time with everyone connected before memory is read.
const SETTLE_CONNECTED: Duration = Duration::from_secs(2);
/// Settle time after everyone left before memory is read.
const SETTLE_GONE: Duration = Duration::from_secs(3);
/// Keep-alive the devices announce.
const KEEP_ALIVE_SECS: u16 = 60;

/// Figures of one run on one broker.
#[derive(Debug)]
pub struct Outcome {
    /// Devices that got a CONNACK.
    pub connected: usize,
    /// Connections per second, first CONNECT to last CONNACK.
    pub rate: f64,
    /// Broker resident memory before, with everyone connected, and after everyone left (KiB).
    pub rss_before: u64,
    pub rss_with: u64,
    pub rss_after: u64,
    /// CPU used from the first CONNECT to the last CONNACK.
    pub cpu: Usage,
    /// Connections the broker closed while they idled.
    pub dropped: usize,
    /// Connect failures, first few distinct messages with counts.
    pub errors: Vec<(String, usize)>,
}

impl Outcome {
    /// Resident KiB per connected device.
    pub fn kb_per_device(&self) -> f64 {
        (self.rss_with as f64 - self.rss_before as f64) / self.connected.max(1) as f64
    }

    /// Broker CPU milliseconds per connection (TLS handshake, CONNECT, CONNACK).
    pub fn cpu_ms_per_connect(&self) -> f64 {
        self.cpu.broker * 1000.0 / self.connected.max(1) as f64
    }

    /// The load generator's CPU milliseconds per connection.
    pub fn own_cpu_ms_per_connect(&self) -> f64 {
        self.cpu.own * 1000.0 / self.connected.max(1) as f64
    }
}

/// Connects every device in `devices` (at most [`CONNECT_CONCURRENCY`] handshakes at once), holds them, then
/// disconnects them all.
pub async fn run(broker: &Broker, devices: &[Device]) -> Result<Outcome> {
    let rss_before = rss_kb(broker.pid)?;
    let meter = Meter::start(broker.pid);
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let dropped = Arc::new(AtomicUsize::new(0));
    let (report_tx, mut report_rx) =
        mpsc::channel::<Result<(Instant, Instant), String>>(devices.len().max(1));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(devices.len());
    for device in devices {
        let (addr, tls, id) = (broker.addr, device.tls.clone(), device.id.clone());
        let (permits, report_tx, mut stop_rx, dropped) = (
            permits.clone(),
            report_tx.clone(),
            stop_rx.clone(),
            dropped.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let Ok(permit) = permits.acquire().await else {
                return;
            };
            let began = Instant::now();
            let connected = tokio::time::timeout(
                Duration::from_secs(30),
                client::connect(addr, tls, &id, KEEP_ALIVE_SECS),
            )
            .await;
            let done = Instant::now();
            drop(permit);
            let (mut reader, mut writer) = match connected {
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) => {
                    let _ = report_tx.send(Err(format!("{e:#}"))).await;
                    return;
                }
                Err(_) => {
                    let _ = report_tx.send(Err("timed out after 30 s".into())).await;
                    return;
                }
            };
            let _ = report_tx.send(Ok((began, done))).await;
            drop(report_tx);
            // Idle until told to leave; ping at half the keep-alive; give up after 10 minutes regardless.
            let give_up = TokioInstant::now() + Duration::from_secs(600);
            let mut ping = tokio::time::interval_at(
                TokioInstant::now() + Duration::from_secs(u64::from(KEEP_ALIVE_SECS) / 2),
                Duration::from_secs(u64::from(KEEP_ALIVE_SECS) / 2),
            );
            loop {
                tokio::select! {
                    _ = async { let _ = stop_rx.wait_for(|stop| *stop).await; } => break,
                    _ = tokio::time::sleep_until(give_up) => break,
                    _ = ping.tick() => {
                        packet::pingreq(&mut writer.buf);
                        if writer.send().await.is_err() {
                            dropped.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                    packet = reader.next() => match packet {
                        Ok(Packet::PingResp) => {}
                        _ => {
                            dropped.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    },
                }
            }
            writer.disconnect().await;
        }));
    }
    drop(report_tx);

    let mut errors = Vec::new();
    let (mut connected, mut first, mut last) = (0usize, None::<Instant>, None::<Instant>);
    let deadline = TokioInstant::now() + Duration::from_secs(300);
    for _ in 0..devices.len() {
        match tokio::time::timeout_at(deadline, report_rx.recv()).await {
            Ok(Some(Ok((began, done)))) => {
                connected += 1;
                first = Some(first.map_or(began, |f| f.min(began)));
                last = Some(last.map_or(done, |l| l.max(done)));
            }
            Ok(Some(Err(e))) => note(&mut errors, e),
            Ok(None) => break,
            Err(_) => {
                note(&mut errors, "connecting did not finish within 300 s".into());
                break;
            }
        }
    }
    let cpu = meter.read();
    let rate = match (first, last) {
        (Some(first), Some(last)) if connected > 0 => {
            connected as f64 / last.duration_since(first).as_secs_f64().max(1e-6)
        }
        _ => {
            let _ = stop_tx.send(true);
            bail!("no device connected: {}", describe(&errors));
        }
    };
    tokio::time::sleep(SETTLE_CONNECTED).await;
    let rss_with = rss_kb(broker.pid)?;
    let _ = stop_tx.send(true);
    let leave_deadline = TokioInstant::now() + Duration::from_secs(60);
    for mut task in tasks {
        if tokio::time::timeout_at(leave_deadline, &mut task).await.is_err() {
            task.abort();
            note(&mut errors, "a connection did not close within 60 s".into());
        }
    }
    tokio::time::sleep(SETTLE_GONE).await;
    let rss_after = rss_kb(broker.pid)?;
    Ok(Outcome {
        connected,
        rate,
        rss_before,
        rss_with,
        rss_after,
        cpu,
        dropped: dropped.load(Ordering::Relaxed),
        errors,
    })
}
