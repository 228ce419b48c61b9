//! Running several instances on one Redis: every instance hears what the others do, through Redis pub/sub.
//!
//! - **Device messages** (shadow replies and deltas, OTA jobs): the shadow and OTA services queue them on an
//!   outbox. A message for a device connected to this instance goes straight to its broker (see
//!   `mqtt::platform_link`); any other goes to Redis, and every instance routes what it hears into its own broker,
//!   so a device gets them on whichever instance holds its connection.
//! - **Events** that other instances must act on: a session started (they close a stale session of the same
//!   device as a takeover and record the device online there), a session ended, a certificate revoked or a
//!   device deleted (they drop its connections). Each message carries its instance id; an instance ignores its
//!   own. What an instance hears goes to its bus as heard (`EventBus::publish_heard`), so its event streams
//!   show the whole cluster, and it is never sent on again.
//! - **Shadow changes**, for the event streams of other instances, only while one of them has a stream open:
//!   such an instance says so every few seconds ([`Message::Watching`]); the others send their shadow events
//!   until they have not heard it for [`WATCH_LAPSE`]. A fleet's updates cost no Redis traffic when no one
//!   watches.
//!
//! No consensus of our own: Redis orders the messages, PostgreSQL and the shadow store hold the state.

use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::events::{EventBus, PlatformEvent};
use crate::presence::Presence;
use crate::shadow::Outgoing;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Message {
    Outgoing {
        topic: String,
        payload: String,
    },
    Event {
        event: PlatformEvent,
    },
    /// The sender has applications watching its event stream.
    Watching,
}

/// How often an instance with an event stream open says so.
const WATCH_PERIOD: Duration = Duration::from_secs(5);
/// How long the others keep sending shadow events after they last heard it.
const WATCH_LAPSE: Duration = Duration::from_secs(16);

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    from: String,
    #[serde(flatten)]
    message: Message,
}

/// Longest a Redis call of this process may take (the bridge, liveness, the shadow store). A call that hangs (a
/// connection half-dead, a reconnect that does not finish) must not stall every device message behind it.
pub(crate) const REDIS_DEADLINE: Duration = Duration::from_secs(2);

/// `call`, failing with an I/O error when Redis has not answered within [`REDIS_DEADLINE`].
pub(crate) async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, redis::RedisError>>,
) -> Result<T, redis::RedisError> {
    tokio::time::timeout(REDIS_DEADLINE, call)
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "Redis did not answer",
                format!("within {REDIS_DEADLINE:?}"),
            )))
        })
}
/// After a failed publish, how long messages are dropped at once instead of each trying to reconnect.
const PUBLISH_BACKOFF: Duration = Duration::from_millis(250);

/// A connection manager's settings for a Redis connection of this process: connecting and each answer within
/// [`REDIS_DEADLINE`], one retry.
pub(crate) fn manager_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(REDIS_DEADLINE)
        .set_response_timeout(REDIS_DEADLINE)
        .set_number_of_retries(1)
}

/// Starts the bridge: drains `outbox` (the messages for devices not connected here) to Redis, feeds what Redis carries into the returned receiver (for the
/// broker), forwards the local events other instances need, and applies theirs here.
pub async fn bridge(
    url: &str,
    prefix: &str,
    instance: String,
    outbox: mpsc::UnboundedReceiver<Outgoing>,
    events: EventBus,
    presence: std::sync::Arc<Presence>,
    registry: crate::registry::Registry,
) -> Result<mpsc::UnboundedReceiver<Outgoing>, redis::RedisError> {
    let channel = format!("{prefix}cluster");
    let client = redis::Client::open(url)?;
    let publisher = redis::aio::ConnectionManager::new_with_config(client.clone(), manager_config()).await?;
    let (to_broker, from_cluster) = mpsc::unbounded_channel();

    let lost = std::sync::Arc::new(tokio::sync::Notify::new());
    let publisher = Publisher {
        client: client.clone(),
        conn: Some(publisher),
        retry_after: None,
        channel: channel.clone(),
        lost: lost.clone(),
        backlog: std::collections::VecDeque::new(),
    };
    tokio::spawn(publish_loop(publisher, instance.clone(), outbox, events.clone()));
    let here = Here {
        instance,
        events,
        presence,
        registry,
    };
    tokio::spawn(subscribe_loop(lost, client, channel, to_broker, here));
    Ok(from_cluster)
}

/// Whether the other instances get `event`: always what they act on, shadow changes while one watches.
fn shared(event: &PlatformEvent, bus: &EventBus) -> bool {
    match event {
        PlatformEvent::Connected { .. }
        | PlatformEvent::Disconnected { .. }
        | PlatformEvent::CertificateRevoked { .. }
        | PlatformEvent::DeviceDeleted { .. } => true,
        PlatformEvent::ShadowUpdated { .. } | PlatformEvent::ShadowDeleted { .. } => bus.watched_elsewhere(),
        PlatformEvent::SessionMoved { .. } => false,
    }
}

/// Most messages published in one round trip to Redis.
const PUBLISH_BATCH: usize = 256;

/// The publishing side's connection, rebuilt after any failure.
struct Publisher {
    client: redis::Client,
    /// `None` after a failure, until a new connection is made.
    conn: Option<redis::aio::ConnectionManager>,
    /// No reconnect attempt before this, after a failure.
    retry_after: Option<tokio::time::Instant>,
    channel: String,
    /// Told after a failure: the subscription may be just as dead without noticing (no traffic, no keep-alive).
    lost: std::sync::Arc<tokio::sync::Notify>,
    /// Events not sent yet (Redis away), sent first once it is back; at most [`BACKLOG`], oldest dropped first.
    backlog: std::collections::VecDeque<String>,
}

/// Most events kept for the cluster while Redis is away.
const BACKLOG: usize = 100_000;

impl Publisher {
    /// Whether events wait to be sent.
    fn behind(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Publishes `texts`, then `events` after those that waited, in order, as one pipeline (one round trip),
    /// every step bounded by [`REDIS_DEADLINE`]. While Redis is away device messages are dropped (a device is resynced from
    /// the store when it next subscribes); events wait for it to come back, so the other instances' presence
    /// catches up on what they could not hear.
    async fn publish(&mut self, texts: &[String], events: Vec<String>) {
        self.backlog.extend(events);
        if self.backlog.len() > BACKLOG {
            let dropped = self.backlog.len() - BACKLOG;
            self.backlog.drain(..dropped);
            tracing::warn!(dropped, "Redis away too long: oldest cluster events dropped");
        }
        let conn = match &self.conn {
            Some(conn) => conn.clone(),
            None => {
                if self.retry_after.is_some_and(|t| tokio::time::Instant::now() < t) {
                    return;
                }
                let fresh = tokio::time::timeout(
                    REDIS_DEADLINE,
                    redis::aio::ConnectionManager::new_with_config(self.client.clone(), manager_config()),
                )
                .await;
                match fresh {
                    Ok(Ok(conn)) => {
                        tracing::info!("cluster publisher reconnected to Redis");
                        self.retry_after = None;
                        self.conn = Some(conn.clone());
                        conn
                    }
                    _ => {
                        self.retry_after = Some(tokio::time::Instant::now() + PUBLISH_BACKOFF);
                        return;
                    }
                }
            }
        };
        let mut conn = conn;
        let mut pipe = redis::pipe();
        for text in texts {
            pipe.cmd("PUBLISH").arg(&self.channel).arg(text).ignore();
        }
        // Events in pipelines of a bounded size, each dropped from the backlog once it is through: a long backlog
        // neither runs into the deadline as one pipeline nor goes out twice after a partial failure.
        let mut result = Ok(());
        loop {
            let chunk = self.backlog.len().min(PUBLISH_BATCH);
            for text in self.backlog.range(..chunk) {
                pipe.cmd("PUBLISH").arg(&self.channel).arg(text).ignore();
            }
            if chunk == 0 && texts.is_empty() {
                break;
            }
            result = bounded(pipe.query_async::<()>(&mut conn)).await;
            if result.is_err() {
                break;
            }
            self.backlog.drain(..chunk);
            if self.backlog.is_empty() {
                break;
            }
            pipe = redis::pipe();
        }
        let Err(error) = result else {
            return;
        };
        tracing::warn!(%error, "could not publish to the cluster; reconnecting");
        self.conn = None;
        self.retry_after = None;
        self.lost.notify_one();
    }
}

async fn publish_loop(
    mut publisher: Publisher,
    instance: String,
    mut outbox: mpsc::UnboundedReceiver<Outgoing>,
    bus: EventBus,
) {
    let mut events = bus.subscribe();
    let Some(mut republished) = bus.take_republished() else {
        tracing::error!("a second cluster bridge on one event bus");
        return;
    };
    let mut watching = tokio::time::interval(WATCH_PERIOD);
    watching.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let envelope = |message: Message| {
        serde_json::to_string(&Envelope {
            from: instance.clone(),
            message,
        })
        .unwrap_or_default()
    };
    let outgoing = |out: Outgoing| Message::Outgoing {
        topic: out.topic,
        payload: String::from_utf8_lossy(&out.payload).into_owned(),
    };
    let (mut queued, mut texts, mut shared_events) = (
        Vec::with_capacity(PUBLISH_BATCH),
        Vec::with_capacity(PUBLISH_BATCH),
        Vec::new(),
    );
    loop {
        tokio::select! {
            // Whatever is queued goes in one round trip: one PUBLISH each, in order.
            n = outbox.recv_many(&mut queued, PUBLISH_BATCH) => {
                if n == 0 { break }
                texts.extend(queued.drain(..).map(|out| envelope(outgoing(out))));
            },
            // Said at once when the first stream opens, so the others start sending shadow events now.
            _ = bus.first_watcher() => texts.push(envelope(Message::Watching)),
            // Also the moment to try again to send events that wait for Redis.
            _ = watching.tick() => {
                if bus.watched() {
                    texts.push(envelope(Message::Watching));
                } else if !publisher.behind() {
                    continue;
                }
            },
            event = events.recv() => match event {
                Ok(event) if shared(&event, &bus) => {
                    // A republished event waiting now was sent before this one (a session is republished under
                    // the presence lock, and only while it is still open): it goes first.
                    while let Ok(earlier) = republished.try_recv() {
                        shared_events.push(envelope(Message::Event { event: earlier }));
                    }
                    shared_events.push(envelope(Message::Event { event }));
                }
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "cluster bridge lagged behind local events");
                    continue;
                }
                Err(_) => break,
            },
            event = republished.recv() => match event {
                Some(event) => shared_events.push(envelope(Message::Event { event })),
                None => break,
            },
        }
        publisher
            .publish(&texts, std::mem::take(&mut shared_events))
            .await;
        texts.clear();
    }
    tracing::info!("cluster publisher stopped");
}

/// What the subscribing side applies heard messages to.
struct Here {
    /// This instance's id: its own messages come back from Redis and are skipped.
    instance: String,
    events: EventBus,
    presence: std::sync::Arc<Presence>,
    registry: crate::registry::Registry,
}

impl Here {
    /// After the subscription was lost and made again: what was said meanwhile is gone, so presence catches up
    /// from the database once the others have stored what they did (after [`RECONCILE_DELAY`]).
    fn catch_up(&self, since: std::time::Instant) {
        let (presence, registry, instance) = (
            self.presence.clone(),
            self.registry.clone(),
            self.instance.clone(),
        );
        tokio::spawn(async move {
            tokio::time::sleep(RECONCILE_DELAY).await;
            match presence.reconcile(&registry, &instance, since).await {
                Ok(0) => {}
                Ok(devices) => tracing::info!(devices, "presence caught up from the database"),
                Err(e) => tracing::warn!(error = %e, "could not catch presence up from the database"),
            }
        });
    }
}

/// How long after a new subscription presence is read back from the database: well past the presence writer's
/// gap, so what the other instances did while this one could not hear them is stored.
const RECONCILE_DELAY: Duration = Duration::from_secs(1);

async fn subscribe_loop(
    lost: std::sync::Arc<tokio::sync::Notify>,
    client: redis::Client,
    channel: String,
    to_broker: mpsc::UnboundedSender<Outgoing>,
    here: Here,
) {
    let mut first = true;
    loop {
        let subscribed = bounded(async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok(pubsub)
        })
        .await;
        let mut pubsub = match subscribed {
            Ok(pubsub) => pubsub,
            Err(error) => {
                tracing::warn!(%error, "cluster subscription failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        // A failed publish from before this subscription says nothing about it.
        let _ = tokio::time::timeout(Duration::ZERO, lost.notified()).await;
        tracing::info!(%channel, "subscribed to the cluster channel");
        if !first {
            here.catch_up(std::time::Instant::now());
        }
        first = false;
        let mut stream = pubsub.on_message();
        loop {
            let msg = tokio::select! {
                msg = stream.next() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
                _ = lost.notified() => break,
            };
            let Ok(text) = msg.get_payload::<String>() else {
                continue;
            };
            let Ok(envelope) = serde_json::from_str::<Envelope>(&text) else {
                continue;
            };
            match envelope.message {
                // Every instance, this one included, routes device messages into its own broker.
                Message::Outgoing { topic, payload } => {
                    let _ = to_broker.send(Outgoing {
                        topic,
                        payload: payload.into_bytes(),
                    });
                }
                _ if envelope.from == here.instance => {}
                Message::Event { event } => apply_remote(event, &envelope.from, &here.events, &here.presence),
                Message::Watching => {
                    here.events
                        .watched_elsewhere_until(tokio::time::Instant::now() + WATCH_LAPSE);
                }
            }
        }
        tracing::warn!("cluster subscription ended; resubscribing");
    }
}

/// What another instance published: applied to this instance's presence and sessions, then passed on to its
/// bus as heard (for the event streams and the front door; never forwarded again).
fn apply_remote(event: PlatformEvent, from: &str, events: &EventBus, presence: &Presence) {
    use crate::events::DisconnectReason;
    match &event {
        PlatformEvent::Connected {
            device_id,
            session,
            remote_addr,
            at,
        } => {
            let Ok(device) = antumbra_wire::DeviceId::parse(device_id.clone()) else {
                return;
            };
            // A local session of the same device is stale now, the device moved to another instance, unless
            // the local one is newer: an instance that was taken for dead announces its sessions again, late.
            if presence.remote_connected(&device, *session, remote_addr.clone(), *at, from) {
                events.publish(PlatformEvent::SessionMoved {
                    device_id: device_id.clone(),
                    session: *session,
                });
            }
        }
        PlatformEvent::Disconnected {
            device_id,
            session,
            reason,
            at,
            ..
        } => {
            let Ok(device) = antumbra_wire::DeviceId::parse(device_id.clone()) else {
                return;
            };
            if *reason != DisconnectReason::Takeover
                && !presence.remote_disconnected(&device, *session, *reason, *at)
            {
                return;
            }
        }
        PlatformEvent::CertificateRevoked { .. }
        | PlatformEvent::DeviceDeleted { .. }
        | PlatformEvent::ShadowUpdated { .. }
        | PlatformEvent::ShadowDeleted { .. } => {}
        PlatformEvent::SessionMoved { .. } => return,
    }
    events.publish_heard(event);
}
