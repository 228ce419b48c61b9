//! The devices of `shadow-bench`: one MQTT connection each (mutual TLS, the lean client of `mqtt-bench`), all
//! connected once and then driven through the same phases in step: a warm-up, saturated shadow updates, raw
//! publish→subscribe, and a paced run during which the tool also changes desired state over REST.
//!
//! A device subscribes (QoS 1) to its shadow topics (see [`Subscriptions`]) and to `devices/{id}/raw`. A shadow update carries its send time (ns since the tool started) as its `clientToken`,
//! which `accepted` echoes; a raw message carries it in its first 8 bytes; a desired change made over REST
//! carries it as the desired field `target`, which the delta repeats.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{timeout_at, Instant as TokioInstant};

use crate::bench::brokers::Device;
use crate::bench::client::{self, Reader, Writer};
use crate::bench::load::{histogram, note, now_ns, Inflight, SLOTS};
use crate::bench::packet::{self, Packet};
use crate::bench::CONNECT_CONCURRENCY;

/// How long after a phase a device waits for what is still in flight.
const DRAIN: Duration = Duration::from_secs(3);
/// A saturated device that hears nothing for this long gives up what it has in flight (counted missing).
const STALL: Duration = Duration::from_secs(5);
/// How long after a paced phase a device keeps listening for deltas of the last REST changes.
const TAIL: Duration = Duration::from_millis(300);
/// Keep-alive of the device connections: longer than any pause between phases.
const KEEP_ALIVE_SECS: u16 = 300;

/// How a device subscribes to its shadow topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Subscriptions {
    /// As antumbra's SDK does (`antumbra_sdk::topics::shadow_filters`): six filters, the `accepted` and
    /// `rejected` replies of every operation and `update/delta`, classic and named.
    Sdk,
    /// Three filters, `…/shadow/update/accepted`, `…/rejected` and `…/delta`, as AWS IoT's device SDKs do.
    Aws,
}

impl Subscriptions {
    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Subscriptions::Sdk => "sdk",
            Subscriptions::Aws => "aws",
        }
    }

    fn filters(self, id: &str) -> Vec<String> {
        let mut filters = match self {
            Subscriptions::Sdk => {
                let id = antumbra_sdk::DeviceId::parse(id).expect("the tool's device ids are valid");
                antumbra_sdk::topics::shadow_filters(&id).to_vec()
            }
            Subscriptions::Aws => ["accepted", "rejected", "delta"]
                .iter()
                .map(|s| format!("devices/{id}/shadow/update/{s}"))
                .collect(),
        };
        filters.push(format!("devices/{id}/raw"));
        filters
    }
}

/// What every device does in a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// One update with the device's whole reported state (20 fields; about 1.3 KB stored with metadata).
    Warmup,
    /// Reported updates at QoS 1, at most `window` per device waiting for their `accepted`.
    Saturated { window: usize },
    /// QoS 1 publishes to the device's own `devices/{id}/raw`, at most `window` per device not yet delivered
    /// back: the broker alone, the same connections, the same payload size.
    Raw { window: usize },
    /// One reported update per device every `period`, devices evenly staggered; a delta is answered by
    /// reporting its value with the next update, as a device would.
    Paced { period: Duration },
    /// Disconnect.
    Stop,
}

#[derive(Debug, Clone, Copy)]
struct Phase {
    seq: u64,
    work: Work,
    start: Instant,
    end: Instant,
}

/// What the devices counted in one phase.
pub struct Counts {
    /// `accepted` (shadow phases) or deliveries (raw) counted: received within the phase when saturated, for
    /// updates sent within it when paced.
    pub counted: u64,
    /// Updates or messages sent.
    pub sent: u64,
    /// `rejected` replies to our updates.
    pub rejected: u64,
    /// Sent but never answered (or delivered) by the end of the drain.
    pub missing: u64,
    /// publish → `accepted` (or → delivery), µs.
    pub latency: Histogram<u64>,
    /// Deltas received for REST changes made within the phase.
    pub deltas: u64,
    /// REST PATCH sent → delta received by the device, µs.
    pub delta_latency: Histogram<u64>,
    /// Paced: how late each update left against its schedule, µs (the load generator's own lag).
    pub late: Histogram<u64>,
    /// Paced: per `SLICE` of send time, the answers timed, those over `SLOW`, and the slowest (µs), to tell
    /// a tail spread over the phase from one burst.
    pub timeline: Vec<Slice>,
}

/// The span of one `timeline` entry.
pub const SLICE: Duration = Duration::from_millis(250);
/// An answer slower than this counts as slow in the timeline (the paced target).
const SLOW_US: u64 = 5_000;

/// One `SLICE` of a paced phase.
#[derive(Clone, Copy, Default)]
pub struct Slice {
    pub timed: u64,
    pub slow: u64,
    pub max_us: u64,
}

impl Counts {
    fn new() -> Self {
        Self {
            counted: 0,
            sent: 0,
            rejected: 0,
            missing: 0,
            latency: histogram(),
            deltas: 0,
            delta_latency: histogram(),
            late: histogram(),
            timeline: Vec::new(),
        }
    }

    /// Records an answer sent at `sent_ns` (of the phase starting at `start_ns`) that took `us`.
    fn time(&mut self, start_ns: u64, sent_ns: u64, us: u64) {
        self.latency.saturating_record(us);
        let at = (sent_ns.saturating_sub(start_ns) / SLICE.as_nanos() as u64) as usize;
        if at < 4 * 60 * 60 {
            if self.timeline.len() <= at {
                self.timeline.resize(at + 1, Slice::default());
            }
            let slice = &mut self.timeline[at];
            slice.timed += 1;
            slice.slow += u64::from(us > SLOW_US);
            slice.max_us = slice.max_us.max(us);
        }
    }

    fn add(&mut self, other: &Counts) {
        self.counted += other.counted;
        self.sent += other.sent;
        self.rejected += other.rejected;
        self.missing += other.missing;
        self.deltas += other.deltas;
        let _ = self.latency.add(&other.latency);
        let _ = self.delta_latency.add(&other.delta_latency);
        let _ = self.late.add(&other.late);
        if self.timeline.len() < other.timeline.len() {
            self.timeline.resize(other.timeline.len(), Slice::default());
        }
        for (mine, theirs) in self.timeline.iter_mut().zip(&other.timeline) {
            mine.timed += theirs.timed;
            mine.slow += theirs.slow;
            mine.max_us = mine.max_us.max(theirs.max_us);
        }
    }
}

/// The connected devices and the phase they are told to run.
pub struct Fleet {
    control: watch::Sender<Option<Phase>>,
    results: mpsc::UnboundedReceiver<(u64, Result<Counts, String>)>,
    tasks: Vec<JoinHandle<()>>,
    seq: u64,
    /// Devices still connected.
    pub alive: usize,
    /// Connect failures and connection errors (first few distinct messages, counted).
    pub errors: Vec<(String, usize)>,
    /// Bytes of one saturated or paced update request (the raw messages are the same size).
    pub update_bytes: usize,
}

impl Fleet {
    /// Connects and subscribes every device (at most [`CONNECT_CONCURRENCY`] handshakes at once, 30 s each,
    /// 120 s in all); the devices that made it wait for their first phase.
    pub async fn connect(
        addr: SocketAddr,
        devices: &[Device],
        subscriptions: Subscriptions,
        clock: Instant,
    ) -> Result<Fleet> {
        let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
        let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(devices.len().max(1));
        let (control, control_rx) = watch::channel::<Option<Phase>>(None);
        let (results_tx, results) = mpsc::unbounded_channel();
        let count = devices.len();
        let mut tasks = Vec::with_capacity(count);
        for (index, device) in devices.iter().enumerate() {
            let (tls, id) = (device.tls.clone(), device.id.clone());
            let (permits, ready_tx, control_rx, results_tx) = (
                permits.clone(),
                ready_tx.clone(),
                control_rx.clone(),
                results_tx.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let setup = async {
                    let _permit = permits.acquire().await?;
                    let (mut reader, mut writer) = client::connect(addr, tls, &id, KEEP_ALIVE_SECS).await?;
                    for filter in subscriptions.filters(&id) {
                        client::subscribe(&mut reader, &mut writer, &filter, 1).await?;
                    }
                    anyhow::Ok(Conn::new(&id, reader, writer))
                };
                let conn = match tokio::time::timeout(Duration::from_secs(30), setup).await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(e)) => {
                        let _ = ready_tx.send(Err(format!("connect: {e:#}"))).await;
                        return;
                    }
                    Err(_) => {
                        let _ = ready_tx.send(Err("connect: timed out after 30 s".into())).await;
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(())).await;
                drop(ready_tx);
                conn.serve(index, count, control_rx, results_tx, clock).await;
            }));
        }
        drop(ready_tx);
        let mut errors = Vec::new();
        let mut alive = 0;
        let deadline = TokioInstant::now() + Duration::from_secs(120);
        for _ in 0..count {
            match timeout_at(deadline, ready_rx.recv()).await {
                Ok(Some(Ok(()))) => alive += 1,
                Ok(Some(Err(e))) => note(&mut errors, e),
                Ok(None) => break,
                Err(_) => {
                    note(&mut errors, "connecting did not finish within 120 s".into());
                    break;
                }
            }
        }
        if alive == 0 {
            for task in &tasks {
                task.abort();
            }
            bail!("no device connected: {}", crate::bench::load::describe(&errors));
        }
        let mut sample = Vec::new();
        update_payload(&mut sample, 123_456, 1_234_567_890_123, None);
        Ok(Fleet {
            control,
            results,
            tasks,
            seq: 0,
            alive,
            errors,
            update_bytes: sample.len(),
        })
    }

    /// Tells every device to run `work` from 200 ms from now for `duration`; returns (start, end).
    pub fn schedule(&mut self, work: Work, duration: Duration) -> (Instant, Instant) {
        self.seq += 1;
        let start = Instant::now() + Duration::from_millis(200);
        let end = start + duration;
        let _ = self.control.send(Some(Phase {
            seq: self.seq,
            work,
            start,
            end,
        }));
        (start, end)
    }

    /// Waits for every live device's counts of the phase last scheduled (ending at `end`); a device whose
    /// connection failed is noted and drops out of later phases.
    pub async fn collect(&mut self, end: Instant) -> Counts {
        let mut total = Counts::new();
        let deadline = TokioInstant::from_std(end) + DRAIN + Duration::from_secs(15);
        let mut heard = 0;
        while heard < self.alive {
            match timeout_at(deadline, self.results.recv()).await {
                Ok(Some((seq, result))) if seq == self.seq => {
                    heard += 1;
                    match result {
                        Ok(counts) => total.add(&counts),
                        Err(e) => {
                            note(&mut self.errors, format!("during a phase: {e}"));
                            self.alive -= 1;
                            heard -= 1;
                        }
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    note(
                        &mut self.errors,
                        format!("{} device(s) did not report within the drain", self.alive - heard),
                    );
                    break;
                }
            }
        }
        total
    }

    /// Disconnects every device (bounded).
    pub async fn stop(mut self) {
        self.schedule(Work::Stop, Duration::ZERO);
        let deadline = TokioInstant::now() + Duration::from_secs(15);
        for task in &mut self.tasks {
            if timeout_at(deadline, &mut *task).await.is_err() {
                task.abort();
            }
        }
    }
}

/// One device's connection and what it remembers between updates.
struct Conn {
    reader: Reader,
    writer: Writer,
    update_topic: String,
    raw_topic: String,
    inflight: Inflight,
    payload: Vec<u8>,
    seq: u64,
    /// The last desired `target` a delta brought (each REST change is timed once).
    last_target: Option<u64>,
    /// A `target` to report with the next update, which clears the delta.
    ack_target: Option<u64>,
}

/// Nanoseconds since `clock` at `at`.
fn ns_at(clock: Instant, at: Instant) -> u64 {
    at.saturating_duration_since(clock).as_nanos() as u64
}

impl Conn {
    fn new(id: &str, reader: Reader, writer: Writer) -> Self {
        Self {
            reader,
            writer,
            update_topic: format!("devices/{id}/shadow/update"),
            raw_topic: format!("devices/{id}/raw"),
            inflight: Inflight::new(),
            payload: Vec::with_capacity(1024),
            seq: 0,
            last_target: None,
            ack_target: None,
        }
    }

    /// Runs each phase it is told to, reporting its counts, until `Stop` or a failure.
    async fn serve(
        mut self,
        index: usize,
        count: usize,
        mut control: watch::Receiver<Option<Phase>>,
        results: mpsc::UnboundedSender<(u64, Result<Counts, String>)>,
        clock: Instant,
    ) {
        let mut seen = 0;
        loop {
            let phase = match control.wait_for(|p| p.is_some_and(|p| p.seq > seen)).await {
                Ok(p) => p.expect("waited for Some"),
                Err(_) => return,
            };
            seen = phase.seq;
            let result = match phase.work {
                Work::Stop => {
                    self.writer.disconnect().await;
                    return;
                }
                Work::Warmup => self.warmup(phase, clock).await,
                Work::Saturated { window } => self.saturated(phase, false, window, clock).await,
                Work::Raw { window } => self.saturated(phase, true, window, clock).await,
                Work::Paced { period } => self.paced(phase, period, index, count, clock).await,
            };
            let failed = result.is_err();
            let _ = results.send((phase.seq, result.map_err(|e| format!("{e:#}"))));
            if failed {
                return;
            }
        }
    }

    /// Queues one shadow update (QoS 1) stamped `stamp`.
    fn queue_update(&mut self, stamp: u64, warmup: bool) {
        self.seq += 1;
        self.payload.clear();
        if warmup {
            warmup_payload(&mut self.payload, stamp);
        } else {
            update_payload(&mut self.payload, self.seq, stamp, self.ack_target.take());
        }
        let packet_id = self.inflight.take(stamp);
        packet::publish_payload(
            &mut self.writer.buf,
            &self.update_topic,
            1,
            packet_id,
            &self.payload,
        );
    }

    async fn warmup(&mut self, phase: Phase, clock: Instant) -> Result<Counts> {
        let mut c = Counts::new();
        // Every device's first update is sent at the phase's start, so every answer (up to the drain's end)
        // counts: the burst of 1,000 first updates takes longer than the phase itself.
        let window = Window::new(clock, &phase, true);
        tokio::time::sleep_until(TokioInstant::from_std(phase.start)).await;
        self.queue_update(now_ns(clock), true);
        c.sent = 1;
        let mut pending = 1;
        self.writer.send().await?;
        let until = TokioInstant::from_std(phase.end) + DRAIN;
        while pending > 0 {
            let Ok(packet) = timeout_at(until, self.reader.next()).await else {
                break;
            };
            self.handle(packet?, &window, &mut c, &mut pending)?;
            self.writer.send().await?;
        }
        c.missing = pending;
        Ok(c)
    }

    /// Keeps `window` requests in flight until the end, then drains.
    async fn saturated(&mut self, phase: Phase, raw: bool, window: usize, clock: Instant) -> Result<Counts> {
        let mut c = Counts::new();
        let span = Window::new(clock, &phase, false);
        let raw_bytes = {
            let mut sample = Vec::new();
            update_payload(&mut sample, 123_456, 1_234_567_890_123, None);
            sample.len()
        };
        let drain_until = TokioInstant::from_std(phase.end) + DRAIN;
        let mut pending = 0u64;
        let mut progress = TokioInstant::now();
        tokio::time::sleep_until(TokioInstant::from_std(phase.start)).await;
        loop {
            let sending = Instant::now() < phase.end;
            if sending {
                while (pending as usize) < window && self.inflight.len < SLOTS - 1 {
                    let stamp = now_ns(clock);
                    if raw {
                        let packet_id = self.inflight.take(stamp);
                        packet::publish(
                            &mut self.writer.buf,
                            &self.raw_topic,
                            1,
                            packet_id,
                            stamp,
                            raw_bytes,
                        );
                    } else {
                        self.queue_update(stamp, false);
                    }
                    c.sent += 1;
                    pending += 1;
                }
            } else if pending == 0 {
                break;
            }
            self.writer.send().await?;
            let until = if sending {
                (progress + STALL).min(TokioInstant::from_std(phase.end))
            } else {
                drain_until
            };
            let first = match timeout_at(until, self.reader.next()).await {
                Ok(packet) => Some(packet?),
                Err(_) if !sending => break,
                Err(_) => {
                    if TokioInstant::now() >= progress + STALL {
                        c.missing += pending;
                        pending = 0;
                        progress = TokioInstant::now();
                    }
                    None
                }
            };
            let mut next = first;
            while let Some(packet) = next {
                progress = TokioInstant::now();
                self.handle(packet, &span, &mut c, &mut pending)?;
                next = self.reader.buffered()?;
            }
        }
        self.writer.send().await?;
        c.missing += pending;
        Ok(c)
    }

    /// One update every `period`, this device's first at `index / count` of a period after the start.
    async fn paced(
        &mut self,
        phase: Phase,
        period: Duration,
        index: usize,
        count: usize,
        clock: Instant,
    ) -> Result<Counts> {
        let mut c = Counts::new();
        let span = Window::new(clock, &phase, true);
        let mut due = phase.start + period.mul_f64(index as f64 / count.max(1) as f64);
        let tail_until = phase.end + TAIL;
        let drain_until = phase.end + DRAIN;
        let mut pending = 0u64;
        loop {
            let now = Instant::now();
            if due < phase.end && now >= due {
                c.late
                    .saturating_record(now.duration_since(due).as_micros() as u64);
                self.queue_update(now_ns(clock), false);
                self.writer.send().await?;
                c.sent += 1;
                pending += 1;
                due += period;
                continue;
            }
            if due >= phase.end && ((now >= tail_until && pending == 0) || now >= drain_until) {
                break;
            }
            let wake = if due < phase.end {
                due
            } else if pending == 0 {
                tail_until
            } else {
                drain_until
            };
            if let Ok(packet) = timeout_at(TokioInstant::from_std(wake), self.reader.next()).await {
                let mut next = Some(packet?);
                while let Some(packet) = next {
                    self.handle(packet, &span, &mut c, &mut pending)?;
                    next = self.reader.buffered()?;
                }
                self.writer.send().await?;
            }
        }
        c.missing = pending;
        Ok(c)
    }

    /// Accounts for one packet from the broker (PUBACKs to its QoS 1 deliveries are queued for the next send).
    fn handle(&mut self, packet: Packet, span: &Window, c: &mut Counts, pending: &mut u64) -> Result<()> {
        let now = now_ns(span.clock);
        match packet {
            Packet::Publish {
                qos,
                packet_id,
                topic,
                payload,
                ..
            } => {
                if qos > 0 {
                    packet::puback(&mut self.writer.buf, packet_id.unwrap_or_default());
                }
                if topic.ends_with(b"/accepted") || topic.ends_with(b"/rejected") {
                    // Replies to REST changes carry no clientToken; replies to an earlier phase are older.
                    let Some(stamp) = client_token(&payload).filter(|s| *s >= span.start_ns) else {
                        return Ok(());
                    };
                    *pending = pending.saturating_sub(1);
                    if topic.ends_with(b"/rejected") {
                        c.rejected += 1;
                    } else if span.counts(stamp, now) {
                        c.counted += 1;
                        c.time(span.start_ns, stamp, now.saturating_sub(stamp) / 1000);
                    }
                } else if topic.ends_with(b"/delta") {
                    if let Some(target) = target(&payload) {
                        if self.last_target != Some(target) {
                            self.last_target = Some(target);
                            self.ack_target = Some(target);
                            if target >= span.start_ns && target < span.end_ns {
                                c.deltas += 1;
                                c.delta_latency
                                    .saturating_record(now.saturating_sub(target) / 1000);
                            }
                        }
                    }
                } else if topic.ends_with(b"/raw") {
                    let stamp = packet::stamp(&payload).unwrap_or(now);
                    if stamp >= span.start_ns {
                        *pending = pending.saturating_sub(1);
                        if span.counts(stamp, now) {
                            c.counted += 1;
                            c.latency.saturating_record(now.saturating_sub(stamp) / 1000);
                        }
                    }
                }
            }
            Packet::PubAck { packet_id } => {
                self.inflight.release(packet_id);
            }
            Packet::PingResp => {}
            other => bail!("unexpected packet {other:?}"),
        }
        Ok(())
    }
}

/// A phase in nanoseconds of the tool's clock, and what counts in it.
struct Window {
    clock: Instant,
    start_ns: u64,
    end_ns: u64,
    /// Paced: every answer to a request sent within the phase counts; saturated: answers received within it.
    by_send_time: bool,
}

impl Window {
    fn new(clock: Instant, phase: &Phase, by_send_time: bool) -> Self {
        Self {
            clock,
            start_ns: ns_at(clock, phase.start),
            end_ns: ns_at(clock, phase.end),
            by_send_time,
        }
    }

    fn counts(&self, sent: u64, now: u64) -> bool {
        if self.by_send_time {
            sent < self.end_ns
        } else {
            now < self.end_ns
        }
    }
}

/// A saturated or paced update: four fields change (about 120 bytes); `target` acknowledges a delta.
fn update_payload(out: &mut Vec<u8>, seq: u64, stamp: u64, target: Option<u64>) {
    let mut text = String::with_capacity(160);
    let _ = write!(
        text,
        r#"{{"state":{{"reported":{{"temperature":{}.{},"humidity":{},"seq":{seq},"uptime":{}"#,
        18 + seq % 8,
        seq % 10,
        35 + seq % 20,
        seq * 10
    );
    if let Some(target) = target {
        let _ = write!(text, r#","target":{target}"#);
    }
    let _ = write!(text, r#"}}}},"clientToken":"{stamp}"}}"#);
    out.extend_from_slice(text.as_bytes());
}

/// The warm-up update: a whole device state of 20 fields, some nested.
fn warmup_payload(out: &mut Vec<u8>, stamp: u64) {
    let text = format!(
        r#"{{"state":{{"reported":{{"temperature":21.5,"humidity":40,"seq":0,"uptime":0,"firmware":"1.4.2","battery":97,"rssi":-61,"mode":"auto","fan":2,"led":true,"location":{{"building":"B7","floor":3,"room":"3.14"}},"sensors":{{"co2":412,"voc":0.12,"pm25":3}},"network":{{"ssid":"plant-4","ip":"10.1.2.3","channel":6}},"config":{{"interval":10,"thresholds":[18,24]}}}}}},"clientToken":"{stamp}"}}"#
    );
    out.extend_from_slice(text.as_bytes());
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

fn digits(bytes: &[u8]) -> Option<u64> {
    let end = bytes
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(bytes.len());
    std::str::from_utf8(bytes.get(..end)?).ok()?.parse().ok()
}

/// The numeric `clientToken` of a reply, if it has one.
fn client_token(payload: &[u8]) -> Option<u64> {
    const KEY: &[u8] = br#""clientToken":""#;
    let at = find(payload, KEY, 0)? + KEY.len();
    digits(&payload[at..])
}

/// The desired `target` in a delta: the first `"target":` followed by a number (its metadata is an object).
fn target(payload: &[u8]) -> Option<u64> {
    const KEY: &[u8] = br#""target":"#;
    let mut from = 0;
    while let Some(at) = find(payload, KEY, from) {
        let value = at + KEY.len();
        if payload.get(value).is_some_and(u8::is_ascii_digit) {
            return digits(&payload[value..]);
        }
        from = value;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_json_and_stamps_come_back_out() {
        let mut out = Vec::new();
        update_payload(&mut out, 7, 99, Some(42));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["state"]["reported"]["target"], 42);
        assert_eq!(client_token(&out), Some(99));
        out.clear();
        warmup_payload(&mut out, 5);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["state"]["reported"].as_object().unwrap().len(), 14);
        let delta =
            br#"{"metadata":{"target":{"timestamp":1795340000}},"state":{"target":123456789},"version":3}"#;
        assert_eq!(target(delta), Some(123_456_789));
        assert_eq!(target(br#"{"state":{"other":1}}"#), None);
    }
}
