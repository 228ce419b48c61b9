//! Message load: every device connection publishes as fast as its in-flight window allows, either back to
//! itself through the broker (`p2p`) or as telemetry nobody subscribes to (`fanin`, counted by PUBACK).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant as TokioInstant;

use super::brokers::{Broker, Device};
use super::client::{self, Reader, Writer};
use super::cpu::{Meter, Usage};
use super::packet::{self, Packet};
use super::CONNECT_CONCURRENCY;

/// Packet ids (and so the most unacked publishes) per connection.
pub const SLOTS: usize = 1024;
/// At QoS 0 a message not back within this long is counted lost and leaves the window.
const LOSS_TIMEOUT: Duration = Duration::from_secs(1);
/// How long after the run a connection waits for what is still in flight.
const DRAIN: Duration = Duration::from_secs(3);

/// What each connection does.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Subscribe to `devices/{id}/p2p`, publish there at this QoS, count deliveries.
    P2p { qos: u8 },
    /// Publish QoS 1 to `devices/{id}/telemetry`, count PUBACKs.
    Fanin,
}

/// One load run.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// What to do.
    pub mode: Mode,
    /// Payload bytes (the first 8 are the send stamp).
    pub payload: usize,
    /// Most messages in flight per connection.
    pub window: usize,
    /// Measured time.
    pub duration: Duration,
}

/// Figures of one run on one broker.
#[derive(Debug)]
pub struct Outcome {
    /// Connections that took part.
    pub connected: usize,
    /// Deliveries (p2p) or PUBACKs (fanin) per second within the measured time.
    pub rate: f64,
    /// Latency: publish → delivery (p2p) or publish → PUBACK (fanin), microseconds.
    pub latency: Histogram<u64>,
    /// Messages published, in all.
    pub sent: u64,
    /// Published but never delivered (p2p) or never acknowledged (fanin) by the end of the drain.
    pub missing: u64,
    /// CPU used within the measured time.
    pub cpu: Usage,
    /// Messages counted within the measured time.
    pub counted: u64,
    /// Connect failures and connection errors, first few distinct messages with counts.
    pub errors: Vec<(String, usize)>,
}

impl Outcome {
    /// Broker CPU microseconds per counted message.
    pub fn cpu_us_per_message(&self) -> f64 {
        self.cpu.broker * 1e6 / self.counted.max(1) as f64
    }
}

/// Send stamps by packet id, for QoS 1 publishes not yet acknowledged.
pub struct Inflight {
    sent_at: Vec<Option<u64>>,
    next: usize,
    /// Publishes not yet acknowledged.
    pub len: usize,
}

impl Default for Inflight {
    fn default() -> Self {
        Self::new()
    }
}

impl Inflight {
    /// No publish in flight; at most [`SLOTS`] at once.
    pub fn new() -> Self {
        Self {
            sent_at: vec![None; SLOTS],
            next: 0,
            len: 0,
        }
    }

    /// A free packet id for a publish sent at `stamp`. The caller keeps `len` below [`SLOTS`].
    pub fn take(&mut self, stamp: u64) -> u16 {
        loop {
            let slot = self.next;
            self.next = (self.next + 1) % SLOTS;
            if self.sent_at[slot].is_none() {
                self.sent_at[slot] = Some(stamp);
                self.len += 1;
                return slot as u16 + 1;
            }
        }
    }

    /// Frees `packet_id`; its send stamp, or `None` when it was not in flight.
    pub fn release(&mut self, packet_id: u16) -> Option<u64> {
        let stamp = self
            .sent_at
            .get_mut(usize::from(packet_id).checked_sub(1)?)?
            .take()?;
        self.len -= 1;
        Some(stamp)
    }
}

/// Nanoseconds since `clock`.
pub fn now_ns(clock: Instant) -> u64 {
    clock.elapsed().as_nanos() as u64
}

/// A latency histogram in microseconds, 1 µs to 60 s, 2 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds")
}

/// What one connection counted.
struct Counts {
    counted: u64,
    sent: u64,
    missing: u64,
    latency: Histogram<u64>,
}

/// Runs `spec` with `devices` against `broker`: all connect (and subscribe) first, then all start together.
pub async fn run(broker: &Broker, devices: &[Device], spec: Spec, clock: Instant) -> Result<Outcome> {
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(devices.len().max(1));
    let (go_tx, go_rx) = watch::channel::<Option<(Instant, Instant)>>(None);
    let mut tasks = Vec::with_capacity(devices.len());
    for device in devices {
        let (addr, tls, id) = (broker.addr, device.tls.clone(), device.id.clone());
        let (permits, ready_tx, mut go_rx) = (permits.clone(), ready_tx.clone(), go_rx.clone());
        tasks.push(tokio::spawn(async move {
            let setup = async {
                let _permit = permits.acquire().await?;
                let (mut reader, mut writer) = client::connect(addr, tls, &id, 60).await?;
                if let Mode::P2p { .. } = spec.mode {
                    client::subscribe(&mut reader, &mut writer, &format!("devices/{id}/p2p"), 1).await?;
                }
                anyhow::Ok((reader, writer))
            };
            let (mut reader, mut writer) = match tokio::time::timeout(Duration::from_secs(30), setup).await {
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) => {
                    let _ = ready_tx.send(Err(format!("connect: {e:#}"))).await;
                    return None;
                }
                Err(_) => {
                    let _ = ready_tx.send(Err("connect: timed out after 30 s".into())).await;
                    return None;
                }
            };
            let _ = ready_tx.send(Ok(())).await;
            drop(ready_tx);
            let (start, end) = match go_rx.wait_for(Option::is_some).await {
                Ok(go) => go.expect("waited for Some"),
                Err(_) => return None,
            };
            let result = drive(&mut reader, &mut writer, &id, spec, clock, start, end).await;
            writer.disconnect().await;
            Some(result)
        }));
    }
    drop(ready_tx);

    let mut errors = Vec::new();
    let mut connected = 0;
    let setup_deadline = TokioInstant::now() + Duration::from_secs(120);
    for _ in 0..devices.len() {
        match tokio::time::timeout_at(setup_deadline, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => connected += 1,
            Ok(Some(Err(e))) => note(&mut errors, e),
            Ok(None) => break,
            Err(_) => {
                note(&mut errors, "setup did not finish within 120 s".into());
                break;
            }
        }
    }
    if connected == 0 {
        let _ = go_tx.send(None);
        for task in tasks {
            task.abort();
        }
        bail!("no connection: {}", describe(&errors));
    }
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + spec.duration;
    let _ = go_tx.send(Some((start, end)));
    tokio::time::sleep_until(TokioInstant::from_std(start)).await;
    let meter = Meter::start(broker.pid);
    tokio::time::sleep_until(TokioInstant::from_std(end)).await;
    let cpu = meter.read();

    let mut latency = histogram();
    let (mut counted, mut sent, mut missing) = (0, 0, 0);
    let join_deadline = TokioInstant::from_std(end) + DRAIN + Duration::from_secs(15);
    for mut task in tasks {
        let joined = tokio::time::timeout_at(join_deadline, &mut task).await;
        if joined.is_err() {
            task.abort();
        }
        match joined {
            Ok(Ok(Some(Ok(c)))) => {
                counted += c.counted;
                sent += c.sent;
                missing += c.missing;
                latency.add(&c.latency)?;
            }
            Ok(Ok(Some(Err(e)))) => note(&mut errors, format!("during the run: {e:#}")),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => note(&mut errors, format!("task: {e}")),
            Err(_) => note(&mut errors, "a connection did not finish in time".into()),
        }
    }
    Ok(Outcome {
        connected,
        rate: counted as f64 / spec.duration.as_secs_f64(),
        latency,
        sent,
        missing,
        cpu,
        counted,
        errors,
    })
}

/// Counts an error message (first 5 distinct ones are kept).
pub fn note(errors: &mut Vec<(String, usize)>, message: String) {
    if let Some(e) = errors.iter_mut().find(|(m, _)| *m == message) {
        e.1 += 1;
    } else if errors.len() < 5 {
        errors.push((message, 1));
    } else if let Some(last) = errors.last_mut() {
        last.1 += 1;
    }
}

/// The errors as one line.
pub fn describe(errors: &[(String, usize)]) -> String {
    errors
        .iter()
        .map(|(m, n)| format!("{n} × {m}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// One connection's publish/receive loop: send while the window allows, then wait for at least one packet.
async fn drive(
    reader: &mut Reader,
    writer: &mut Writer,
    id: &str,
    spec: Spec,
    clock: Instant,
    start: Instant,
    end: Instant,
) -> Result<Counts> {
    let (qos, topic) = match spec.mode {
        Mode::P2p { qos } => (qos, format!("devices/{id}/p2p")),
        Mode::Fanin => (1, format!("devices/{id}/telemetry")),
    };
    let p2p = matches!(spec.mode, Mode::P2p { .. });
    let window = spec.window.clamp(1, SLOTS - 1) as u64;
    let end_ns = end.duration_since(clock).as_nanos() as u64;
    let drain_until = TokioInstant::from_std(end) + DRAIN;
    let mut inflight = Inflight::new();
    let mut c = Counts {
        counted: 0,
        sent: 0,
        missing: 0,
        latency: histogram(),
    };
    // Deliveries received, and QoS 0 messages given up as lost.
    let (mut received, mut lost) = (0u64, 0u64);
    let mut progress = TokioInstant::now();
    tokio::time::sleep_until(TokioInstant::from_std(start)).await;
    loop {
        let sending = Instant::now() < end;
        let waiting_for = |sent: u64, received: u64, lost: u64, unacked: usize| {
            if p2p {
                sent.saturating_sub(received + lost).max(unacked as u64)
            } else {
                unacked as u64
            }
        };
        if sending {
            while waiting_for(c.sent, received, lost, inflight.len) < window {
                let stamp = now_ns(clock);
                let packet_id = if qos > 0 { inflight.take(stamp) } else { 0 };
                packet::publish(&mut writer.buf, &topic, qos, packet_id, stamp, spec.payload);
                c.sent += 1;
            }
        } else if waiting_for(c.sent, received, lost, inflight.len) == 0 {
            break;
        }
        writer.send().await?;
        let wait_until = if sending {
            (progress + LOSS_TIMEOUT).min(TokioInstant::from_std(end))
        } else {
            drain_until
        };
        let first = match tokio::time::timeout_at(wait_until, reader.next()).await {
            Ok(packet) => Some(packet?),
            Err(_) if !sending => break,
            Err(_) => {
                if TokioInstant::now() >= progress + LOSS_TIMEOUT {
                    // Nothing came back for a while: whatever is still out is lost (QoS 0, or a broker that
                    // dropped a queued QoS 1 delivery); free the window so the run goes on.
                    if p2p {
                        lost = c.sent.saturating_sub(received);
                    }
                    progress = TokioInstant::now();
                }
                None
            }
        };
        let mut next = first;
        while let Some(packet) = next {
            progress = TokioInstant::now();
            let now = now_ns(clock);
            match packet {
                Packet::Publish {
                    qos: got,
                    packet_id,
                    payload,
                    ..
                } => {
                    received += 1;
                    if got > 0 {
                        packet::puback(&mut writer.buf, packet_id.unwrap_or_default());
                    }
                    if p2p && now < end_ns {
                        c.counted += 1;
                        let sent_at = packet::stamp(&payload).unwrap_or(now);
                        c.latency.saturating_record(now.saturating_sub(sent_at) / 1000);
                    }
                }
                Packet::PubAck { packet_id } => {
                    if let Some(sent_at) = inflight.release(packet_id) {
                        if !p2p && now < end_ns {
                            c.counted += 1;
                            c.latency.saturating_record(now.saturating_sub(sent_at) / 1000);
                        }
                    }
                }
                Packet::PingResp => {}
                other => bail!("unexpected packet {other:?}"),
            }
            next = reader.buffered()?;
        }
    }
    writer.send().await?;
    c.missing = if p2p {
        c.sent.saturating_sub(received)
    } else {
        inflight.len as u64
    };
    Ok(c)
}
