//! Online status of devices, from the MQTT front door's own connection events (not from wills).
//!
//! Memory holds the truth for live sessions; every change is also queued to a writer task that upserts it into
//! `device_presence`, so status survives restarts and the device list can filter on it in SQL. Session numbers
//! come from one counter that starts above anything stored, so they only ever increase — which is what lets a
//! takeover (the same device reconnecting before its old socket died) never show the device offline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use antumbra_wire::DeviceId;
use sqlx::Row;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::events::{DisconnectReason, EventBus, PlatformEvent};
use crate::registry::{self, from_millis, to_millis, Registry, RegistryError};

/// A device's status.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceStatus {
    /// Whether a session holds the device now.
    pub online: bool,
    /// Number of the latest session (0: never connected).
    pub session: u64,
    /// When the latest session started.
    pub connected_at: Option<OffsetDateTime>,
    /// When the last session ended.
    pub disconnected_at: Option<OffsetDateTime>,
    /// When the device last sent anything.
    pub last_seen_at: Option<OffsetDateTime>,
    /// Why the last session ended.
    pub last_disconnect_reason: Option<DisconnectReason>,
    /// Remote address of the latest session.
    pub remote_addr: Option<String>,
}

impl DeviceStatus {
    fn never() -> Self {
        Self {
            online: false,
            session: 0,
            connected_at: None,
            disconnected_at: None,
            last_seen_at: None,
            last_disconnect_reason: None,
            remote_addr: None,
        }
    }
}

/// Handle a session keeps to report activity cheaply (one atomic store per read burst).
#[derive(Debug, Clone)]
pub struct SeenClock(Arc<AtomicI64>);

impl SeenClock {
    /// Records activity now.
    pub fn touch(&self) {
        self.0
            .store(to_millis(OffsetDateTime::now_utc()), Ordering::Relaxed);
    }
}

struct Entry {
    status: DeviceStatus,
    seen: Option<Arc<AtomicI64>>,
    /// In a cluster: the other instance holding the device's session, while it is online there.
    holder: Option<String>,
    /// In a cluster: when the status last changed on news from another instance (see [`Presence::reconcile`]).
    heard_at: Option<std::time::Instant>,
}

impl Entry {
    /// Its status, with the last activity of a session open here read from its clock.
    fn status_now(&self) -> DeviceStatus {
        let mut status = self.status.clone();
        if let Some(seen) = &self.seen {
            status.last_seen_at = from_millis(seen.load(Ordering::Relaxed)).ok();
        }
        status
    }

    fn never() -> Self {
        Self {
            status: DeviceStatus::never(),
            seen: None,
            holder: None,
            heard_at: None,
        }
    }
}

/// What a cluster instance knows of the cluster when it loads presence.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// This instance's id.
    pub instance: String,
    /// The other instances whose heartbeat lives.
    pub alive: std::collections::HashSet<String>,
}

/// The presence service.
pub struct Presence {
    entries: Mutex<HashMap<DeviceId, Entry>>,
    next_session: AtomicU64,
    /// In a cluster: a Redis counter shared by every instance, so session numbers grow fleet-wide.
    shared_counter: Option<(redis::aio::ConnectionManager, String)>,
    events: EventBus,
    writer: mpsc::UnboundedSender<(DeviceId, DeviceStatus)>,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence").finish_non_exhaustive()
    }
}

impl Presence {
    /// Loads stored presence. Devices stored as online were cut off when the last process stopped: they are
    /// marked offline with `server_shutdown`, except, in a cluster, those that a live instance holds. Starts the
    /// writer task.
    pub async fn load(
        registry: &Registry,
        events: EventBus,
        cluster: Option<ClusterView>,
    ) -> Result<Arc<Self>, RegistryError> {
        let now = registry::now();
        let mut entries = HashMap::new();
        let mut max_session = 0u64;
        let (writer, queue) = mpsc::unbounded_channel();
        for (id, mut status, holder) in stored_rows(registry).await? {
            max_session = max_session.max(status.session);
            // The live instance that still holds an online device's session, if one does.
            let holder = holder
                .filter(|holder| status.online && cluster.as_ref().is_some_and(|c| c.alive.contains(holder)));
            if status.online && holder.is_none() {
                status.online = false;
                status.disconnected_at = Some(now);
                status.last_disconnect_reason = Some(DisconnectReason::ServerShutdown);
                let _ = writer.send((id.clone(), status.clone()));
            }
            entries.insert(
                id,
                Entry {
                    status,
                    seen: None,
                    holder,
                    heard_at: None,
                },
            );
        }
        // In a cluster, each stored session names this instance as its holder.
        tokio::spawn(write_behind(registry.clone(), queue, cluster.map(|c| c.instance)));
        Ok(Arc::new(Self {
            entries: Mutex::new(entries),
            next_session: AtomicU64::new(max_session + 1),
            shared_counter: None,
            events,
            writer,
        }))
    }

    /// Draws session numbers from the Redis counter `key` (raised above every number stored here), so they
    /// only ever grow across every instance of a cluster.
    pub async fn share_counter(
        self: Arc<Self>,
        conn: redis::aio::ConnectionManager,
        key: String,
    ) -> Arc<Self> {
        let floor = self.next_session.load(Ordering::Relaxed);
        let mut c = conn.clone();
        let current: Option<u64> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut c)
            .await
            .unwrap_or(None);
        if current.is_none_or(|v| v < floor) {
            let _: Result<(), _> = redis::cmd("SET").arg(&key).arg(floor).query_async(&mut c).await;
        }
        let mut this = Arc::try_unwrap(self)
            .unwrap_or_else(|_| panic!("presence is shared before the cluster is set up"));
        this.shared_counter = Some((conn, key));
        Arc::new(this)
    }

    async fn next_session(&self) -> u64 {
        if let Some((conn, key)) = &self.shared_counter {
            let mut c = conn.clone();
            match redis::cmd("INCR").arg(key).query_async::<u64>(&mut c).await {
                Ok(n) => {
                    self.next_session.fetch_max(n + 1, Ordering::Relaxed);
                    return n;
                }
                Err(e) => tracing::warn!(error = %e, "shared session counter unavailable; counting locally"),
            }
        }
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Instance `holder` started a session of `device`: it is online there, with that session number. `true`
    /// when that session is newer than any this instance knew of the device (a session of it here is stale).
    pub fn remote_connected(
        &self,
        device: &DeviceId,
        session: u64,
        remote_addr: String,
        at: OffsetDateTime,
        holder: &str,
    ) -> bool {
        let mut entries = self.entries.lock().expect("presence lock");
        let entry = entries.entry(device.clone()).or_insert_with(Entry::never);
        let remote = DeviceStatus {
            session,
            connected_at: Some(at),
            ..DeviceStatus::never()
        };
        // A session open here gives way only to one newer in time too (numbers drawn while the shared counter
        // was out of reach are per instance), e.g. one announced late from a backlog.
        let newer = if entry.seen.is_some() {
            supersedes(&remote, &entry.status)
        } else {
            session > entry.status.session
        };
        // The same session again: its instance announces it once more (it was taken for dead meanwhile).
        let again = session == entry.status.session && entry.seen.is_none();
        if newer || again {
            entry.status.online = true;
            entry.status.session = session;
            entry.status.connected_at = Some(at);
            entry.status.last_seen_at = Some(at);
            entry.status.remote_addr = Some(remote_addr);
            entry.seen = None;
            entry.holder = Some(holder.to_owned());
            entry.heard_at = Some(std::time::Instant::now());
        }
        self.next_session.fetch_max(session + 1, Ordering::Relaxed);
        newer
    }

    /// Another instance ended session `session` of `device`. `false` when that very end is known here already
    /// (caught up from the database before the event, which waited for Redis, arrived).
    pub fn remote_disconnected(
        &self,
        device: &DeviceId,
        session: u64,
        reason: DisconnectReason,
        at: OffsetDateTime,
    ) -> bool {
        let mut entries = self.entries.lock().expect("presence lock");
        if let Some(entry) = entries.get_mut(device) {
            let known = &entry.status;
            if known.session == session
                && !known.online
                && known.disconnected_at.map(to_millis) == Some(to_millis(at))
            {
                return false;
            }
            if entry.status.session == session && reason != DisconnectReason::Takeover {
                entry.status.online = false;
                entry.status.disconnected_at = Some(at);
                entry.status.last_disconnect_reason = Some(reason);
                entry.holder = None;
                entry.heard_at = Some(std::time::Instant::now());
            }
        }
        true
    }

    /// Instance `dead` stopped beating (see `crate::liveness`): the devices it held are offline
    /// (`server_shutdown`), in the database and here; this instance's event streams hear each disconnect.
    /// Returns how many devices this instance had online there.
    pub async fn held_by_dead(&self, registry: &Registry, dead: &str) -> Result<usize, RegistryError> {
        let now = registry::now();
        // A device that has since connected elsewhere has another instance (and a newer session) in its row.
        sqlx::query(
            "UPDATE device_presence SET online = 0, disconnected_at = $1, last_disconnect_reason = $2 \
             WHERE instance = $3 AND online = 1",
        )
        .bind(to_millis(now))
        .bind(DisconnectReason::ServerShutdown.as_str())
        .bind(dead)
        .execute(registry.pool())
        .await?;
        let ended: Vec<(DeviceId, u64)> = {
            let mut entries = self.entries.lock().expect("presence lock");
            entries
                .iter_mut()
                .filter(|(_, entry)| entry.holder.as_deref() == Some(dead))
                .map(|(device, entry)| {
                    entry.holder = None;
                    entry.heard_at = Some(std::time::Instant::now());
                    entry.status.online = false;
                    entry.status.disconnected_at = Some(now);
                    entry.status.last_disconnect_reason = Some(DisconnectReason::ServerShutdown);
                    (device.clone(), entry.status.session)
                })
                .collect()
        };
        for (device, session) in &ended {
            self.events.publish_heard(PlatformEvent::Disconnected {
                device_id: device.to_string(),
                session: *session,
                reason: DisconnectReason::ServerShutdown,
                online: false,
                at: now,
            });
        }
        Ok(ended.len())
    }

    /// This instance was taken for dead by the others (cut off from Redis, or stalled, for longer than the
    /// heartbeat's lapse): they stored its devices offline and show them so. Every session still open here is
    /// stored and announced to them again, unless its device has a newer session on record (it connected to
    /// another instance meanwhile): that session here is stale and closes as a takeover. Returns how many
    /// sessions were announced and how many closed.
    pub async fn reannounce(
        &self,
        registry: &Registry,
        instance: &str,
    ) -> Result<(usize, usize), RegistryError> {
        let stored: HashMap<DeviceId, (DeviceStatus, Option<String>)> = stored_rows(registry)
            .await?
            .into_iter()
            .map(|(id, status, holder)| (id, (status, holder)))
            .collect();
        let (mut announced, mut heard, mut moved) = (0, Vec::new(), Vec::new());
        {
            // Decided and sent under the lock, on what holds now: a session that ends meanwhile is either not
            // announced at all or announced before its end, in the writer's queue and on the bus.
            let mut entries = self.entries.lock().expect("presence lock");
            for (device, entry) in entries.iter_mut() {
                if entry.seen.is_none() || !entry.status.online {
                    continue;
                }
                match stored.get(device) {
                    // The device has a newer session elsewhere: this instance missed the news.
                    Some((on_record, holder))
                        if supersedes(on_record, &entry.status) && holder.as_deref() != Some(instance) =>
                    {
                        if on_record.online {
                            heard.push(connected_event(device, on_record));
                        }
                        moved.push((device.clone(), on_record.session));
                        entry.holder = holder.clone().filter(|_| on_record.online);
                        entry.status = on_record.clone();
                        entry.seen = None;
                        entry.heard_at = Some(std::time::Instant::now());
                    }
                    // Stored with this instance as its holder again (the upsert never overwrites a newer session).
                    _ => {
                        let status = entry.status_now();
                        self.events.republish(connected_event(device, &status));
                        let _ = self.writer.send((device.clone(), status));
                        announced += 1;
                    }
                }
            }
        }
        let closed = moved.len();
        self.announce_catch_up(heard, moved);
        Ok((announced, closed))
    }

    /// Tells this instance what it caught up on: its streams hear `heard`, and each of its sessions in `moved`
    /// (device, the newer session elsewhere) closes as a takeover.
    fn announce_catch_up(&self, heard: Vec<PlatformEvent>, moved: Vec<(DeviceId, u64)>) {
        for (device, session) in moved {
            self.events.publish(PlatformEvent::SessionMoved {
                device_id: device.to_string(),
                session,
            });
        }
        for event in heard {
            self.events.publish_heard(event);
        }
    }

    /// What this instance missed while it could not hear the cluster (its Redis subscription dropped, Redis
    /// restarted, another instance's messages were lost): every instance stores its sessions in the database
    /// whatever Redis does, so a device held elsewhere takes its stored status when that is newer than what is
    /// known here (a newer session, or the end of the known one). Entries heard of after `since` are fresher
    /// than this read and left alone. A session of this instance whose device has a newer session elsewhere on
    /// record closes as a takeover. This instance's streams hear each change. Returns how many devices changed.
    pub async fn reconcile(
        &self,
        registry: &Registry,
        instance: &str,
        since: std::time::Instant,
    ) -> Result<usize, RegistryError> {
        let rows = stored_rows(registry).await?;
        let (mut heard, mut moved, mut changed) = (Vec::new(), Vec::new(), 0);
        {
            let mut entries = self.entries.lock().expect("presence lock");
            for (device, stored, holder) in rows {
                if holder.as_deref() == Some(instance) {
                    continue;
                }
                let entry = entries.entry(device.clone()).or_insert_with(Entry::never);
                if entry.heard_at.is_some_and(|at| at > since) {
                    continue;
                }
                let known = &entry.status;
                let newer = stored.session > known.session;
                let ended = stored.session == known.session && known.online && !stored.online;
                if !(newer || ended && entry.seen.is_none()) {
                    continue;
                }
                if entry.seen.is_some() && !supersedes(&stored, known) {
                    continue;
                }
                changed += 1;
                if entry.seen.is_some() {
                    moved.push((device.clone(), stored.session));
                }
                let was_online = known.online;
                heard.extend(match (stored.online, was_online) {
                    (true, _) => Some(connected_event(&device, &stored)),
                    (false, true) => Some(PlatformEvent::Disconnected {
                        device_id: device.to_string(),
                        session: stored.session,
                        reason: stored
                            .last_disconnect_reason
                            .unwrap_or(DisconnectReason::NetworkError),
                        online: false,
                        at: stored.disconnected_at.unwrap_or_else(registry::now),
                    }),
                    (false, false) => None,
                });
                entry.holder = holder.filter(|_| stored.online);
                entry.status = stored;
                entry.seen = None;
                entry.heard_at = Some(std::time::Instant::now());
            }
        }
        self.announce_catch_up(heard, moved);
        Ok(changed)
    }

    /// A session of `device` started: returns its number and the clock it reports activity on.
    pub async fn connected(&self, device: &DeviceId, remote_addr: String) -> (u64, SeenClock) {
        let session = self.next_session().await;
        let now = registry::now();
        let seen = Arc::new(AtomicI64::new(to_millis(now)));
        let status = {
            let mut entries = self.entries.lock().expect("presence lock");
            let entry = entries.entry(device.clone()).or_insert_with(Entry::never);
            entry.holder = None;
            entry.status.online = true;
            entry.status.session = session;
            entry.status.connected_at = Some(now);
            entry.status.last_seen_at = Some(now);
            entry.status.remote_addr = Some(remote_addr.clone());
            entry.seen = Some(seen.clone());
            entry.status.clone()
        };
        let _ = self.writer.send((device.clone(), status));
        self.events.publish(PlatformEvent::Connected {
            device_id: device.to_string(),
            session,
            remote_addr,
            at: now,
        });
        (session, SeenClock(seen))
    }

    /// Session `session` of `device` ended. The device goes offline only if no newer session holds it.
    pub fn disconnected(&self, device: &DeviceId, session: u64, reason: DisconnectReason) {
        let now = registry::now();
        let (online, status) = {
            let mut entries = self.entries.lock().expect("presence lock");
            let Some(entry) = entries.get_mut(device) else {
                return;
            };
            // A takeover never shows the device offline: the session that replaces it is already connecting.
            if entry.status.session == session && reason != DisconnectReason::Takeover {
                if let Some(seen) = entry.seen.take() {
                    entry.status.last_seen_at =
                        Some(from_millis(seen.load(Ordering::Relaxed)).unwrap_or(now));
                }
                entry.status.online = false;
                entry.status.disconnected_at = Some(now);
                entry.status.last_disconnect_reason = Some(reason);
                (false, Some(entry.status.clone()))
            } else {
                (entry.status.online, None)
            }
        };
        if let Some(status) = status {
            let _ = self.writer.send((device.clone(), status));
        }
        self.events.publish(PlatformEvent::Disconnected {
            device_id: device.to_string(),
            session,
            reason,
            online,
            at: now,
        });
    }

    /// A device's status (never connected: offline, session 0).
    pub fn status(&self, device: &DeviceId) -> DeviceStatus {
        let entries = self.entries.lock().expect("presence lock");
        match entries.get(device) {
            Some(entry) => entry.status_now(),
            None => DeviceStatus::never(),
        }
    }

    /// Whether `device` has a session open on this instance. Such a device exists: deleting it ends the session.
    pub fn connected_here(&self, device: &DeviceId) -> bool {
        self.entries
            .lock()
            .expect("presence lock")
            .get(device)
            .is_some_and(|entry| entry.status.online && entry.seen.is_some())
    }

    /// Forgets a deleted device.
    pub fn forget(&self, device: &DeviceId) {
        self.entries.lock().expect("presence lock").remove(device);
    }
}

/// The `device_presence` columns [`stored_status`] reads, and the holder (`instance`).
const STATUS_COLUMNS: &str = "online, session, connected_at, disconnected_at, last_seen_at, \
                              last_disconnect_reason, remote_addr, instance";

/// `Connected` for the session `status` holds.
fn connected_event(device: &DeviceId, status: &DeviceStatus) -> PlatformEvent {
    PlatformEvent::Connected {
        device_id: device.to_string(),
        session: status.session,
        remote_addr: status.remote_addr.clone().unwrap_or_default(),
        at: status.connected_at.unwrap_or_else(registry::now),
    }
}

/// Whether `stored`, a session of the device on another instance, is newer than `local`, a session open here:
/// by number, and not older in time. Numbers drawn while the cluster's shared counter was out of reach come
/// from each instance's own count, so on their own they do not say which session came last.
fn supersedes(stored: &DeviceStatus, local: &DeviceStatus) -> bool {
    /// How far apart the instances' clocks may be: within it, the number decides.
    const SKEW: time::Duration = time::Duration::seconds(5);
    stored.session > local.session && stored.connected_at.map(|at| at + SKEW) >= local.connected_at
}

/// Every stored status, with its holder (`instance`), read and parsed in full before anyone acts on it.
async fn stored_rows(
    registry: &Registry,
) -> Result<Vec<(DeviceId, DeviceStatus, Option<String>)>, RegistryError> {
    let rows = sqlx::query(&format!(
        "SELECT device_id, {STATUS_COLUMNS} FROM device_presence"
    ))
    .fetch_all(registry.pool())
    .await?;
    let mut stored = Vec::with_capacity(rows.len());
    for row in rows {
        let Ok(id) = DeviceId::parse(row.try_get::<String, _>("device_id")?) else {
            continue;
        };
        stored.push((id, stored_status(&row)?, row.try_get("instance")?));
    }
    Ok(stored)
}

/// A status as stored (a row with [`STATUS_COLUMNS`]).
fn stored_status(row: &sqlx::any::AnyRow) -> Result<DeviceStatus, RegistryError> {
    let millis = |name: &str| -> Result<Option<OffsetDateTime>, RegistryError> {
        row.try_get::<Option<i64>, _>(name)?.map(from_millis).transpose()
    };
    Ok(DeviceStatus {
        online: row.try_get::<i64, _>("online")? != 0,
        session: row.try_get::<i64, _>("session")?.max(0) as u64,
        connected_at: millis("connected_at")?,
        disconnected_at: millis("disconnected_at")?,
        last_seen_at: millis("last_seen_at")?,
        last_disconnect_reason: row
            .try_get::<Option<String>, _>("last_disconnect_reason")?
            .and_then(|r| DisconnectReason::parse(&r)),
        remote_addr: row.try_get("remote_addr")?,
    })
}

/// Upserts queued statuses, batching whatever accumulated while the previous batch was written.
async fn write_behind(
    registry: Registry,
    mut queue: mpsc::UnboundedReceiver<(DeviceId, DeviceStatus)>,
    instance: Option<String>,
) {
    let mut batch = Vec::new();
    // Statuses not stored yet: kept across a database outage (newer changes merge in) and retried, so a device
    // that left while the database was away is not shown online for good.
    let mut pending: HashMap<DeviceId, DeviceStatus> = HashMap::new();
    loop {
        let open = if pending.is_empty() {
            queue.recv_many(&mut batch, 512).await > 0
        } else {
            // A failed write is retried after RETRY even when nothing new arrives.
            !matches!(
                tokio::time::timeout(RETRY, queue.recv_many(&mut batch, 512)).await,
                Ok(0)
            )
        };
        if !open {
            break;
        }
        // Only the newest status of each device matters.
        for (id, status) in batch.drain(..) {
            pending.insert(id, status);
        }
        match upsert(&registry, &pending, instance.as_deref()).await {
            Ok(()) => {
                pending.clear();
                // Changes that arrive meanwhile make the next batch. Each commit waits for the disk (an fsync on
                // SQLite); back to back, as a wave of connects made them, they were a tenth of the broker's CPU.
                tokio::time::sleep(WRITE_GAP).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, devices = pending.len(), "could not store presence; retrying");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
    if !pending.is_empty() {
        let _ = upsert(&registry, &pending, instance.as_deref()).await;
    }
}

/// Least time between two presence commits: the most a stored status (what `GET /v1/devices?online=` filters
/// on) lags memory, besides the write itself. A lone change after a quiet spell is written at once.
const WRITE_GAP: Duration = Duration::from_millis(50);

/// How long the presence writer waits before it tries a failed write again.
const RETRY: Duration = Duration::from_secs(1);

/// Stores `statuses`, each with `instance` (this instance, in a cluster) as the holder of its session.
async fn upsert(
    registry: &Registry,
    statuses: &HashMap<DeviceId, DeviceStatus>,
    instance: Option<&str>,
) -> Result<(), RegistryError> {
    let statuses: Vec<_> = statuses.iter().collect();
    let mut tx = registry.begin().await?;
    // One statement per chunk of devices: each statement is a round trip to the database (for SQLite, to its
    // worker thread), and a wave of connects queues thousands of statuses at once.
    for chunk in statuses.chunks(UPSERT_CHUNK) {
        let mut sql = String::from(
            "INSERT INTO device_presence (device_id, online, session, connected_at, disconnected_at, \
             last_seen_at, last_disconnect_reason, remote_addr, instance) VALUES ",
        );
        sql.push_str(&crate::db::values_list(registry.engine(), chunk.len(), 9));
        sql.push_str(
            " ON CONFLICT (device_id) DO UPDATE SET online = excluded.online, session = excluded.session, \
             connected_at = excluded.connected_at, disconnected_at = excluded.disconnected_at, \
             last_seen_at = excluded.last_seen_at, last_disconnect_reason = excluded.last_disconnect_reason, \
             remote_addr = excluded.remote_addr, instance = excluded.instance \
             WHERE device_presence.session <= excluded.session",
        );
        let mut query = sqlx::query(&sql);
        for (id, s) in chunk {
            query = query
                .bind(id.as_str())
                .bind(i64::from(s.online))
                .bind(s.session as i64)
                .bind(s.connected_at.map(to_millis))
                .bind(s.disconnected_at.map(to_millis))
                .bind(s.last_seen_at.map(to_millis))
                .bind(s.last_disconnect_reason.map(|r| r.as_str()))
                .bind(s.remote_addr.clone())
                .bind(instance);
        }
        query.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Devices per presence statement (9 parameters each; SQLite allows 32,766 per statement, PostgreSQL 65,535).
const UPSERT_CHUNK: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    fn session(number: u64, at_secs: i64) -> DeviceStatus {
        DeviceStatus {
            online: true,
            session: number,
            connected_at: Some(OffsetDateTime::from_unix_timestamp(1_795_000_000 + at_secs).unwrap()),
            ..DeviceStatus::never()
        }
    }

    #[test]
    fn a_session_elsewhere_supersedes_a_local_one_only_if_newer_by_number_and_not_older_in_time() {
        assert!(supersedes(&session(8, 10), &session(7, 5)));
        assert!(
            supersedes(&session(8, 5), &session(7, 5)),
            "same instant: the number decides"
        );
        assert!(
            supersedes(&session(8, 2), &session(7, 5)),
            "within the clocks' skew: the number decides"
        );
        assert!(!supersedes(&session(7, 10), &session(7, 5)), "the same session");
        assert!(!supersedes(&session(6, 10), &session(7, 5)), "an older number");
        // Drawn while the shared counter was out of reach: a higher number, yet the session here came later.
        assert!(!supersedes(&session(9, -10), &session(7, 5)));
    }
}
