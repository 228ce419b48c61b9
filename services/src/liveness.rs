//! Which instances of a cluster are alive: each keeps a heartbeat key in Redis that lapses when it stops.
//!
//! Every instance adds its id to one set (`{prefix}instances`) at start and refreshes `{prefix}instance:{id}`
//! every [`BEAT`] with a time to live of [`LAPSE`]. Every [`BEAT`] each instance also looks, in a task of its own
//! so that a slow look never delays the heartbeat, for ids in the set whose key has lapsed: the devices such an
//! instance held are offline (`server_shutdown`), in the database and in this instance's memory and event
//! streams ([`Presence::held_by_dead`]); then the id leaves the set. Several
//! instances may do this for the same dead one at once: every step is idempotent. An instance that was only
//! cut off or stalled finds itself out of the set at its next beat: it enters again and announces the sessions
//! it still holds ([`Presence::reannounce`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::cluster::bounded;
use crate::presence::Presence;
use crate::registry::Registry;

/// How often an instance beats and looks for dead ones.
pub const BEAT: Duration = Duration::from_secs(5);
/// How long a heartbeat lives: an instance that has not beaten for this long is dead.
pub const LAPSE: Duration = Duration::from_secs(15);

/// This instance's place in the cluster's liveness.
#[derive(Clone)]
pub struct Liveness {
    conn: ConnectionManager,
    prefix: String,
    /// This instance's id (random, drawn at start).
    pub instance: String,
}

impl std::fmt::Debug for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Liveness")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl Liveness {
    /// Joins: draws an id, beats once and enters the set of instances.
    pub async fn join(conn: ConnectionManager, prefix: &str) -> Result<Self, redis::RedisError> {
        let this = Self {
            conn,
            prefix: prefix.to_owned(),
            instance: format!("{:016x}", rand::random::<u64>()),
        };
        this.beat().await?;
        this.enter_set().await?;
        Ok(this)
    }

    async fn enter_set(&self) -> Result<(), redis::RedisError> {
        self.set_command("SADD", &self.instance).await
    }

    /// Takes `instance` out of the set of instances.
    async fn leave_set(&self, instance: &str) -> Result<(), redis::RedisError> {
        self.set_command("SREM", instance).await
    }

    /// `command` (SADD, SREM) on the set of instances, for `instance`.
    async fn set_command(&self, command: &str, instance: &str) -> Result<(), redis::RedisError> {
        let mut conn = self.conn.clone();
        bounded(
            redis::cmd(command)
                .arg(self.set_key())
                .arg(instance)
                .query_async::<()>(&mut conn),
        )
        .await
    }

    fn set_key(&self) -> String {
        format!("{}instances", self.prefix)
    }

    fn beat_key(&self, instance: &str) -> String {
        format!("{}instance:{instance}", self.prefix)
    }

    async fn beat(&self) -> Result<(), redis::RedisError> {
        let mut conn = self.conn.clone();
        let mut set = redis::cmd("SET");
        set.arg(self.beat_key(&self.instance))
            .arg(1)
            .arg("PX")
            .arg(LAPSE.as_millis() as u64);
        bounded(set.query_async::<()>(&mut conn)).await
    }

    /// Stops this instance's heartbeat at once (on a clean stop): the others mark offline at their next look
    /// whatever it still held, instead of after [`LAPSE`].
    pub async fn leave(&self) {
        let mut conn = self.conn.clone();
        let mut del = redis::cmd("DEL");
        del.arg(self.beat_key(&self.instance));
        if let Err(e) = bounded(del.query_async::<()>(&mut conn)).await {
            tracing::warn!(error = %e, "could not remove this instance's heartbeat from Redis");
        }
    }

    /// The other instances of the set, each with whether its heartbeat lives.
    pub async fn others(&self) -> Result<Vec<(String, bool)>, redis::RedisError> {
        let mut conn = self.conn.clone();
        let members: Vec<String> =
            bounded(redis::cmd("SMEMBERS").arg(self.set_key()).query_async(&mut conn)).await?;
        let members: Vec<String> = members.into_iter().filter(|m| *m != self.instance).collect();
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for member in &members {
            pipe.cmd("EXISTS").arg(self.beat_key(member));
        }
        let alive: Vec<bool> = bounded(pipe.query_async(&mut conn)).await?;
        Ok(members.into_iter().zip(alive).collect())
    }

    /// The ids of the other instances whose heartbeat lives.
    pub async fn alive(&self) -> Result<HashSet<String>, redis::RedisError> {
        Ok(self
            .others()
            .await?
            .into_iter()
            .filter_map(|(id, alive)| alive.then_some(id))
            .collect())
    }

    /// Beats every [`BEAT`]; beside it, every [`BEAT`], rejoins when dropped and marks offline the devices of
    /// instances that stopped beating. Apart, so that a slow sweep or announcement (a database that is slow to
    /// answer, a fleet of devices to mark) never holds the heartbeat back until the others take this instance for
    /// dead too.
    pub fn spawn(self, presence: Arc<Presence>, registry: Registry) {
        let beating = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let heart = (self.clone(), beating.clone());
        tokio::spawn(async move {
            let (this, beating) = heart;
            let mut ticks = tokio::time::interval(BEAT);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let beat = this.beat().await;
                if let Err(e) = &beat {
                    tracing::warn!(error = %e, "could not renew this instance's heartbeat in Redis");
                }
                beating.store(beat.is_ok(), std::sync::atomic::Ordering::Relaxed);
            }
        });
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(BEAT);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                // Without a heartbeat, joining again would only be undone by the next sweep elsewhere.
                if !beating.load(std::sync::atomic::Ordering::Relaxed) {
                    continue;
                }
                if let Err(e) = self.rejoin_if_dropped(&presence, &registry).await {
                    tracing::warn!(error = %e, "could not check this instance's place in the cluster");
                }
                if let Err(e) = self.sweep(&presence, &registry).await {
                    tracing::warn!(error = %e, "could not look for stopped instances");
                }
            }
        });
    }

    /// When the others took this instance for dead (its heartbeat lapsed while it was cut off from Redis or
    /// stalled, and a sweep removed it from the set), it enters the set again and re-announces the sessions it
    /// still holds ([`Presence::reannounce`]): without this, its devices would stay offline everywhere else
    /// until they reconnected.
    async fn rejoin_if_dropped(&self, presence: &Presence, registry: &Registry) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        let member: bool = bounded(
            redis::cmd("SISMEMBER")
                .arg(self.set_key())
                .arg(&self.instance)
                .query_async(&mut conn),
        )
        .await?;
        if member {
            return Ok(());
        }
        tracing::warn!(
            instance = %self.instance,
            "the cluster took this instance for dead (no heartbeat for {LAPSE:?}); joining again"
        );
        // Back in the set first, so that a sweep that starts from here on leaves what is announced next alone;
        // should the announcement fail, out again, and the next beat tries once more.
        self.enter_set().await?;
        match presence.reannounce(registry, &self.instance).await {
            Ok((announced, closed)) => {
                tracing::info!(announced, closed, "sessions announced to the cluster again");
                Ok(())
            }
            Err(e) => {
                let _ = self.leave_set(&self.instance).await;
                Err(e.into())
            }
        }
    }

    async fn sweep(&self, presence: &Presence, registry: &Registry) -> anyhow::Result<()> {
        for (dead, _) in self.others().await?.into_iter().filter(|(_, alive)| !alive) {
            let devices = presence.held_by_dead(registry, &dead).await?;
            tracing::info!(instance = %dead, devices, "an instance stopped beating; its devices are offline");
            self.leave_set(&dead).await?;
        }
        Ok(())
    }
}
