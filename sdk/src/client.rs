//! The connection: one rumqttc event loop in a background task that reconnects with jittered exponential
//! backoff, resubscribes and resynchronises every shadow in use after each (re)connect, and routes replies.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use antumbra_wire::topics::{parse_shadow_reply, shadow_filters, shadow_topic};
use antumbra_wire::DeviceId;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeFilter, TlsConfiguration, Transport};
use serde_json::{json, Value};
use tokio::sync::{broadcast, oneshot, watch};

use crate::shadow::{Delta, Shadow};
use crate::{Config, Error};

/// A reply to a request: accepted (payload) or rejected (error).
pub(crate) type Reply = Result<Value, Error>;

/// Per-shadow state kept across reconnects.
pub(crate) struct ShadowState {
    pub(crate) deltas: broadcast::Sender<Delta>,
    /// Version of the newest delta handed to the application; older or equal ones are stale.
    pub(crate) last_delta: u64,
}

pub(crate) struct Inner {
    pub(crate) device_id: DeviceId,
    pub(crate) client: AsyncClient,
    pub(crate) request_timeout: Duration,
    pub(crate) pending: Mutex<HashMap<String, oneshot::Sender<Reply>>>,
    pub(crate) shadows: Mutex<HashMap<Option<String>, ShadowState>>,
    pub(crate) jobs: broadcast::Sender<antumbra_wire::ota::JobDocument>,
    last_job: Mutex<Option<(String, antumbra_wire::ota::JobStatus)>>,
    next_token: AtomicU64,
    token_prefix: String,
    connected: watch::Sender<bool>,
}

impl Inner {
    pub(crate) fn token(&self) -> String {
        format!(
            "{}-{}",
            self.token_prefix,
            self.next_token.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Publishes a request at QoS 1 and waits for the reply carrying its `clientToken`.
    pub(crate) async fn request(&self, name: Option<&str>, op: &str, mut body: Value) -> Reply {
        let token = self.token();
        body["clientToken"] = json!(token);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("pending lock")
            .insert(token.clone(), tx);
        let topic = shadow_topic(&self.device_id, name, op);
        let sent = self
            .client
            .publish(topic, QoS::AtLeastOnce, false, body.to_string())
            .await;
        if sent.is_err() {
            self.pending.lock().expect("pending lock").remove(&token);
            return Err(Error::Closed);
        }
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(Error::Disconnected),
            Err(_) => {
                self.pending.lock().expect("pending lock").remove(&token);
                Err(Error::Timeout(self.request_timeout))
            }
        }
    }

    /// The delta channel of a shadow, created on first use (and then resynchronised on every reconnect).
    pub(crate) fn deltas(&self, name: Option<&str>) -> broadcast::Receiver<Delta> {
        let mut shadows = self.shadows.lock().expect("shadows lock");
        shadows
            .entry(name.map(str::to_owned))
            .or_insert_with(|| ShadowState {
                deltas: broadcast::channel(64).0,
                last_delta: 0,
            })
            .deltas
            .subscribe()
    }

    /// Hands a delta to the application unless it is stale (not newer than the last one handed over).
    fn offer_delta(&self, name: Option<&str>, state: Value, version: u64) {
        let mut shadows = self.shadows.lock().expect("shadows lock");
        let entry = shadows
            .entry(name.map(str::to_owned))
            .or_insert_with(|| ShadowState {
                deltas: broadcast::channel(64).0,
                last_delta: 0,
            });
        if version <= entry.last_delta {
            tracing::debug!(version, last = entry.last_delta, "stale delta dropped");
            return;
        }
        entry.last_delta = version;
        let _ = entry.deltas.send(Delta { state, version });
    }

    /// Publishes an OTA report and waits for the platform's verdict (keyed by job id).
    pub(crate) async fn ota_request(&self, update: &antumbra_wire::ota::JobUpdate) -> Reply {
        let key = format!("ota:{}", update.job_id);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(key.clone(), tx);
        let body = serde_json::to_vec(update).map_err(|e| Error::Payload(e.to_string()))?;
        let topic = antumbra_wire::ota::update_topic(&self.device_id);
        if self
            .client
            .publish(topic, QoS::AtLeastOnce, false, body)
            .await
            .is_err()
        {
            self.pending.lock().expect("pending lock").remove(&key);
            return Err(Error::Closed);
        }
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(Error::Disconnected),
            Err(_) => {
                self.pending.lock().expect("pending lock").remove(&key);
                Err(Error::Timeout(self.request_timeout))
            }
        }
    }

    fn route_ota(&self, topic: &str, payload: &[u8]) {
        let job_topic = antumbra_wire::ota::job_topic(&self.device_id);
        let update_topic = antumbra_wire::ota::update_topic(&self.device_id);
        if topic == job_topic {
            match serde_json::from_slice::<antumbra_wire::ota::JobDocument>(payload) {
                Ok(job) => {
                    let key = (job.job_id.clone(), job.status);
                    let mut last = self.last_job.lock().expect("job lock");
                    if last.as_ref() != Some(&key) {
                        *last = Some(key);
                        let _ = self.jobs.send(job);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "job document is not what the SDK expects"),
            }
            return;
        }
        let Ok(body) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        let (key, reply) = if topic == format!("{update_topic}/accepted") {
            (body["id"].as_str().map(str::to_owned), Ok(body.clone()))
        } else if topic == format!("{update_topic}/rejected") {
            let error = Error::Rejected {
                code: body["code"].as_u64().unwrap_or(0) as u16,
                message: body["message"].as_str().unwrap_or_default().to_owned(),
                version: None,
            };
            (body["jobId"].as_str().map(str::to_owned), Err(error))
        } else {
            return;
        };
        if let Some(job) = key {
            if let Some(waiter) = self
                .pending
                .lock()
                .expect("pending lock")
                .remove(&format!("ota:{job}"))
            {
                let _ = waiter.send(reply);
            }
        }
    }

    fn route(&self, topic: &str, payload: &[u8]) {
        if topic.starts_with(&format!("devices/{}/ota/", self.device_id)) {
            self.route_ota(topic, payload);
            return;
        }
        let Some((name, suffix)) = parse_shadow_reply(&self.device_id, topic) else {
            return;
        };
        let Ok(body) = serde_json::from_slice::<Value>(payload) else {
            tracing::warn!(topic, "reply is not JSON");
            return;
        };
        match suffix {
            "update/delta" => {
                if let (Some(state), Some(version)) = (body.get("state"), body["version"].as_u64()) {
                    self.offer_delta(name, state.clone(), version);
                }
            }
            "get/accepted" | "update/accepted" | "delete/accepted" => {
                if suffix == "get/accepted" {
                    // A get (ours on reconnect, or the application's) also tells of any delta pending.
                    if let (Some(delta), Some(version)) =
                        (body["state"].get("delta"), body["version"].as_u64())
                    {
                        self.offer_delta(name, delta.clone(), version);
                    }
                }
                self.answer(&body, Ok(body.clone()));
            }
            "get/rejected" | "update/rejected" | "delete/rejected" => {
                let error = Error::Rejected {
                    code: body["code"].as_u64().unwrap_or(0) as u16,
                    message: body["message"].as_str().unwrap_or_default().to_owned(),
                    version: body["version"].as_u64(),
                };
                self.answer(&body, Err(error));
            }
            _ => {}
        }
    }

    fn answer(&self, body: &Value, reply: Reply) {
        let Some(token) = body["clientToken"].as_str() else {
            return;
        };
        if let Some(waiter) = self.pending.lock().expect("pending lock").remove(token) {
            let _ = waiter.send(reply);
        }
    }

    /// After a (re)connect: subscribe to the shadow replies and deltas (the platform then replays pending
    /// deltas) and ask for every shadow in use, so whatever changed while away reaches the application.
    fn resync(&self) {
        let filters = shadow_filters(&self.device_id).map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce));
        let _ = self.client.try_subscribe_many(filters);
        // The platform sends the open OTA job, if any, as soon as this subscription is in place.
        let _ = self
            .client
            .try_subscribe(format!("devices/{}/ota/#", self.device_id), QoS::AtLeastOnce);
        let names: Vec<Option<String>> = self
            .shadows
            .lock()
            .expect("shadows lock")
            .keys()
            .cloned()
            .collect();
        for name in names {
            let body = json!({ "clientToken": format!("{}-resync", self.token_prefix) });
            let topic = shadow_topic(&self.device_id, name.as_deref(), "get");
            let _ = self
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, body.to_string());
        }
    }

    /// A dropped connection fails the requests in flight: their replies would never come.
    fn fail_pending(&self) {
        for (_, waiter) in self.pending.lock().expect("pending lock").drain() {
            let _ = waiter.send(Err(Error::Disconnected));
        }
    }
}

/// A connected device. Cheap to clone; the connection lives until every clone is dropped or
/// [`Device::disconnect`] is called.
#[derive(Clone)]
pub struct Device {
    inner: Arc<Inner>,
    connected: watch::Receiver<bool>,
    task: Arc<tokio::task::AbortHandle>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("device_id", &self.inner.device_id)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Starts connecting (in the background) and returns at once; the connection is retried forever with
    /// jittered exponential backoff. Use [`Device::wait_connected`] to wait for the first CONNACK.
    pub fn connect(config: Config) -> Result<Device, Error> {
        config.check()?;
        let device_id = config.credentials.device_id().clone();
        let mut options = MqttOptions::new(device_id.as_str(), config.host.clone(), config.port);
        options.set_keep_alive(config.keep_alive);
        options.set_clean_session(true);
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            config.credentials.tls_config()?,
        )));
        let (client, eventloop) = AsyncClient::new(options, 64);
        let (connected_tx, connected) = watch::channel(false);
        let inner = Arc::new(Inner {
            device_id,
            client,
            request_timeout: config.request_timeout,
            pending: Mutex::new(HashMap::new()),
            shadows: Mutex::new(HashMap::new()),
            jobs: broadcast::channel(16).0,
            last_job: Mutex::new(None),
            next_token: AtomicU64::new(1),
            token_prefix: format!("{:08x}", rand::random::<u32>()),
            connected: connected_tx,
        });
        let task = tokio::spawn(drive(
            inner.clone(),
            eventloop,
            config.min_backoff,
            config.max_backoff,
        ));
        Ok(Device {
            inner,
            connected,
            task: Arc::new(task.abort_handle()),
        })
    }

    /// The device id (from the certificate).
    pub fn id(&self) -> &DeviceId {
        &self.inner.device_id
    }

    /// Waits until the device is connected (or `limit` passes; then `Err(Timeout)`).
    pub async fn wait_connected(&self, limit: Duration) -> Result<(), Error> {
        let mut rx = self.connected.clone();
        tokio::time::timeout(limit, rx.wait_for(|c| *c))
            .await
            .map_err(|_| Error::Timeout(limit))?
            .map_err(|_| Error::Closed)?;
        Ok(())
    }

    /// Whether the device is connected now.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// The classic shadow.
    pub fn shadow(&self) -> Shadow {
        Shadow::new(self.inner.clone(), None)
    }

    /// A named shadow.
    pub fn named_shadow(&self, name: &str) -> Shadow {
        Shadow::new(self.inner.clone(), Some(name.to_owned()))
    }

    /// Firmware updates: the job stream and progress reports.
    pub fn ota(&self) -> crate::ota::Ota {
        crate::ota::Ota::new(self.inner.clone(), self.shadow())
    }

    /// Disconnects cleanly (MQTT DISCONNECT: no will) and stops reconnecting.
    pub async fn disconnect(&self) {
        let _ = self.inner.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.task.abort();
    }
}

async fn drive(inner: Arc<Inner>, mut eventloop: rumqttc::EventLoop, min: Duration, max: Duration) {
    let mut backoff = min;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!(device_id = %inner.device_id, "connected");
                backoff = min;
                // Subscriptions are queued before anyone learns of the connection, so a request made right after
                // `wait_connected` cannot overtake them and miss its reply.
                inner.resync();
                inner.connected.send_replace(true);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => inner.route(&publish.topic, &publish.payload),
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                inner.connected.send_replace(false);
                inner.fail_pending();
                return;
            }
            Ok(_) => {}
            Err(e) => {
                if inner.connected.send_replace(false) {
                    tracing::warn!(device_id = %inner.device_id, error = %e, "connection lost; reconnecting");
                } else {
                    tracing::debug!(device_id = %inner.device_id, error = %e, "connect failed; retrying");
                }
                inner.fail_pending();
                let jitter = rand::random::<f64>() * 0.5 + 0.75;
                tokio::time::sleep(backoff.mul_f64(jitter)).await;
                backoff = (backoff * 2).min(max);
            }
        }
    }
}
