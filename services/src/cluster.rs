//! Running several instances on one Redis: every instance hears what the others do, through Redis pub/sub.
//!
//! - **Device messages** (shadow replies and deltas, OTA jobs): the shadow and OTA services queue them on an
//!   outbox; in a cluster the outbox goes to Redis and every instance routes what it hears into its own broker,
//!   so a device gets them on whichever instance holds its connection.
//! - **Events** that other instances must act on: a session started (they close a stale session of the same
//!   device as a takeover and record the device online there), a session ended, a certificate revoked or a
//!   device deleted (they drop its connections). Each message carries its instance id; an instance ignores its
//!   own.
//!
//! No consensus of our own: Redis orders the messages, PostgreSQL and the shadow store hold the state.

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::events::{EventBus, PlatformEvent};
use crate::presence::Presence;
use crate::shadow::Outgoing;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Message {
    Outgoing { topic: String, payload: String },
    Event { event: PlatformEvent },
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    from: String,
    #[serde(flatten)]
    message: Message,
}

/// Starts the bridge: drains `outbox` to Redis, feeds what Redis carries into the returned receiver (for the
/// broker), forwards the local events other instances need, and applies theirs here.
pub async fn bridge(
    url: &str,
    prefix: &str,
    outbox: mpsc::UnboundedReceiver<Outgoing>,
    events: EventBus,
    presence: std::sync::Arc<Presence>,
) -> Result<mpsc::UnboundedReceiver<Outgoing>, redis::RedisError> {
    let instance = format!("{:016x}", rand::random::<u64>());
    let channel = format!("{prefix}cluster");
    let client = redis::Client::open(url)?;
    let publisher = redis::aio::ConnectionManager::new(client.clone()).await?;
    let (to_broker, from_cluster) = mpsc::unbounded_channel();

    let lost = std::sync::Arc::new(tokio::sync::Notify::new());
    tokio::spawn(publish_loop(
        lost.clone(),
        client.clone(),
        publisher,
        channel.clone(),
        instance.clone(),
        outbox,
        events.subscribe(),
    ));
    tokio::spawn(subscribe_loop(
        lost, client, channel, instance, to_broker, events, presence,
    ));
    Ok(from_cluster)
}

fn shared(event: &PlatformEvent) -> bool {
    matches!(
        event,
        PlatformEvent::Connected { .. }
            | PlatformEvent::Disconnected { .. }
            | PlatformEvent::CertificateRevoked { .. }
            | PlatformEvent::DeviceDeleted { .. }
    )
}

async fn publish_loop(
    lost: std::sync::Arc<tokio::sync::Notify>,
    client: redis::Client,
    mut conn: redis::aio::ConnectionManager,
    channel: String,
    instance: String,
    mut outbox: mpsc::UnboundedReceiver<Outgoing>,
    mut events: tokio::sync::broadcast::Receiver<PlatformEvent>,
) {
    loop {
        let message = tokio::select! {
            out = outbox.recv() => match out {
                Some(out) => Message::Outgoing { topic: out.topic, payload: String::from_utf8_lossy(&out.payload).into_owned() },
                None => break,
            },
            event = events.recv() => match event {
                Ok(event) if shared(&event) => Message::Event { event },
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "cluster bridge lagged behind local events");
                    continue;
                }
                Err(_) => break,
            },
        };
        let text = serde_json::to_string(&Envelope {
            from: instance.clone(),
            message,
        })
        .unwrap_or_default();
        // A message that cannot be published while Redis is away is dropped: device messages are resynced from
        // the store when the device next subscribes, and events are also held by the database. After a failure
        // the connection is rebuilt, however the old one died, and the message tried once more.
        let publish = |mut conn: redis::aio::ConnectionManager, text: String, channel: String| async move {
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(text)
                .query_async::<i64>(&mut conn)
                .await
        };
        if let Err(e) = publish(conn.clone(), text.clone(), channel.clone()).await {
            tracing::warn!(error = %e, "could not publish to the cluster; reconnecting");
            // The subscription may be just as dead without noticing (no traffic, no keep-alive): renew it too.
            lost.notify_one();
            let fresh = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                redis::aio::ConnectionManager::new(client.clone()),
            )
            .await;
            if let Ok(Ok(fresh)) = fresh {
                conn = fresh;
                let _ = publish(conn.clone(), text, channel.clone()).await;
            }
        }
    }
}

async fn subscribe_loop(
    lost: std::sync::Arc<tokio::sync::Notify>,
    client: redis::Client,
    channel: String,
    instance: String,
    to_broker: mpsc::UnboundedSender<Outgoing>,
    events: EventBus,
    presence: std::sync::Arc<Presence>,
) {
    loop {
        let mut pubsub = match client.get_async_pubsub().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cluster subscription failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
        };
        if let Err(e) = pubsub.subscribe(&channel).await {
            tracing::warn!(error = %e, "cluster subscription failed; retrying");
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            continue;
        }
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
                Message::Event { event } if envelope.from != instance => {
                    apply_remote(&event, &events, &presence)
                }
                Message::Event { .. } => {}
            }
        }
        tracing::warn!("cluster subscription ended; resubscribing");
    }
}

fn apply_remote(event: &PlatformEvent, events: &EventBus, presence: &Presence) {
    use crate::events::DisconnectReason;
    match event {
        PlatformEvent::Connected {
            device_id,
            session,
            remote_addr,
            at,
        } => {
            if let Ok(device) = antumbra_wire::DeviceId::parse(device_id.clone()) {
                presence.remote_connected(&device, *session, remote_addr.clone(), *at);
                // A local session of the same device is stale now: the device moved to another instance.
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
            if let Ok(device) = antumbra_wire::DeviceId::parse(device_id.clone()) {
                if *reason != DisconnectReason::Takeover {
                    presence.remote_disconnected(&device, *session, *reason, *at);
                }
            }
        }
        PlatformEvent::CertificateRevoked { .. } | PlatformEvent::DeviceDeleted { .. } => {
            events.publish(event.clone())
        }
        _ => {}
    }
}
