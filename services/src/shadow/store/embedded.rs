//! The embedded, durable store: a SQLite file of its own in the data dir (WAL), the default when no Redis is
//! configured. It belongs to one antumbra process, which is therefore its only writer.
//!
//! So the store keeps in memory every shadow it has read or written, with its version: reads are answered
//! from there and compare-and-set is decided there, without a query. Writes go to the file through one writer
//! task, which commits whatever is queued as a single statement (group commit: one transaction, one WAL write
//! for many updates). A compare-and-set returns only once its write is committed, so no update is acknowledged
//! before it is in the file; with `synchronous = NORMAL` under WAL a commit is in the operating system once
//! written, so killing the process loses nothing acknowledged (only a power loss can take the last commits).
//!
//! An update changes the document it is given in place: the memory lends it out (keeping its view, which is
//! what the file holds) rather than sharing it, which would make the update copy the whole document first. The
//! file holds each document as its `documents` view, the form the update serializes anyway (for its size check
//! and the `documents` message), with its timestamp beside it; rows of earlier releases (the older storage
//! form, no timestamp) are still read.
//!
//! The WAL is checkpointed by a task of its own, on its own connection, never inside a commit. SQLite's
//! automatic checkpoint runs in the commit that crosses its threshold: it copies up to 1,000 pages and syncs
//! both files while every update queued behind that commit waits (milliseconds on a quiet disk, seconds on a
//! busy one). A passive checkpoint copies while the writer goes on. But the WAL only starts over once it is
//! wholly copied with no write in between, which continuous writes never allow; so past `RESTART_FRAMES`,
//! once its passive checkpoints have caught up with the writer (or the WAL reached `WAL_LIMIT_FRAMES`), the
//! checkpointer holds the writer back for one last checkpoint of what came in meanwhile, and starts the WAL
//! over. Should the checkpointer still fall behind (a machine too busy to give it its turns), the writer starts
//! the WAL over itself once it passes `WAL_LIMIT_FRAMES`.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use antumbra_wire::DeviceId;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Row, SqlitePool};
use tokio::sync::{mpsc, oneshot, watch};

use super::{backend, document_from, ShadowKey, ShadowName, ShadowStore, StoreError, Stored};
use crate::shadow::document::Document;

/// Most shadows kept in memory; past it, some that have nothing left to write are forgotten (and read from the
/// file again when needed).
const REMEMBERED: usize = 50_000;
/// Most rows in one commit (5 parameters each, well under SQLite's 32,766).
const BATCH: usize = 1_000;
/// How often a compare-and-set re-reads a shadow that was forgotten while it read it.
const READ_ATTEMPTS: usize = 8;
/// How often the WAL is checkpointed while writes come in.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// WAL frames (pages) past which the checkpointer holds the writer back to start the WAL over (16 MiB with
/// SQLite's 4 KiB pages). Below it, the WAL starts over by itself whenever the writes pause.
const RESTART_FRAMES: i64 = 4_096;
/// WAL frames past which the writer is held back for a RESTART even when the passive checkpoints could not
/// catch up with it (64 MiB).
const WAL_LIMIT_FRAMES: i64 = 16_384;
/// SQLite's page size (the default), hence the size of a WAL frame's page.
const PAGE_BYTES: u64 = 4_096;
/// Passive checkpoints, at most, to catch up with the writer before holding it back.
const CATCH_UP_PASSES: usize = 3;
/// New frames after a passive checkpoint few enough to copy while the writer waits.
const CAUGHT_UP_FRAMES: i64 = 64;
/// How long a checkpoint that starts the WAL over waits for readers to leave it.
const READERS_PATIENCE: Duration = Duration::from_millis(100);

/// The embedded store (cheap to clone: clones share the memory and the writer).
#[derive(Clone)]
pub struct EmbeddedStore {
    pool: SqlitePool,
    memory: Arc<Mutex<Memory>>,
    writer: mpsc::UnboundedSender<Job>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

/// What the store knows. A plain mutex: it is held for a map lookup and a clone, never across an await.
#[derive(Default)]
struct Memory {
    shadows: HashMap<ShadowKey, Known>,
    /// Grows whenever shadows are forgotten, so that a read from the file that began before cannot put back a
    /// state older than one written in between.
    forgotten: u64,
}

struct Known {
    version: u64,
    document: Held,
    /// Writes queued and not yet committed: such a shadow is never forgotten.
    unwritten: u32,
}

/// A shadow's document as the memory holds it.
enum Held {
    /// No document (never written, or deleted).
    Absent,
    /// The document, shared with whoever read it.
    Here(Arc<Document>),
    /// Lent to an update ([`EmbeddedStore::load_for_update`]), which changes it in place: what is kept is its
    /// view and timestamp, as the file has them, from which a read (or an update that failed, and so never put
    /// its document back) rebuilds it.
    Lent { view: bytes::Bytes, timestamp: i64 },
}

impl From<Option<Arc<Document>>> for Held {
    fn from(document: Option<Arc<Document>>) -> Self {
        document.map_or(Held::Absent, Held::Here)
    }
}

/// What the memory has for a shadow, taken under its lock: the document (or none), or a lent one's view, which
/// the reader parses after letting go of the lock.
enum Seen {
    Ready(Stored),
    Lent {
        view: bytes::Bytes,
        timestamp: i64,
        version: u64,
    },
}

impl Known {
    fn seen(&self) -> Seen {
        match &self.document {
            Held::Absent => Seen::Ready(Stored {
                document: None,
                version: self.version,
            }),
            Held::Here(document) => Seen::Ready(Stored {
                document: Some(document.clone()),
                version: self.version,
            }),
            Held::Lent { view, timestamp } => Seen::Lent {
                view: view.clone(),
                timestamp: *timestamp,
                version: self.version,
            },
        }
    }

    /// Lends `document` out (see [`Held::Lent`]) if it is what the memory holds. Its view must be serialized
    /// already (the caller does it outside the lock).
    fn lend(&mut self, document: &Arc<Document>) {
        if matches!(&self.document, Held::Here(here) if Arc::ptr_eq(here, document)) {
            // The memory's reference goes: the update's is then the only one, unless a reader still holds one.
            self.document = Held::Lent {
                view: document.view_bytes().clone(),
                timestamp: document.timestamp,
            };
        }
    }
}

impl Memory {
    fn remember(&mut self, key: &ShadowKey, stored: Stored) {
        if self.shadows.len() >= REMEMBERED {
            let mut excess = self.shadows.len() - REMEMBERED * 3 / 4;
            self.shadows.retain(|_, known| {
                let forget = excess > 0 && known.unwritten == 0;
                excess -= usize::from(forget);
                !forget
            });
            self.forgotten += 1;
        }
        self.shadows.insert(
            key.clone(),
            Known {
                version: stored.version,
                document: stored.document.into(),
                unwritten: 0,
            },
        );
    }

    fn forget_device(&mut self, device: &DeviceId) {
        self.shadows.retain(|key, _| key.device != *device);
        self.forgotten += 1;
    }
}

/// The writer's connection to the file.
struct File {
    connection: SqliteConnection,
    /// Held for each write; the checkpointer takes it to hold the writer back.
    turn: Arc<tokio::sync::Mutex<()>>,
    /// Told after each write.
    committed: watch::Sender<()>,
    /// The WAL file, whose size the writer watches (see [`File::write`]).
    wal: std::path::PathBuf,
}

impl File {
    /// Runs one write in its turn (see [`Checkpointer`]) and tells the checkpointer.
    async fn write<'q>(
        &mut self,
        query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    ) -> Result<(), String> {
        let turn = self.turn.lock().await;
        let result = query
            .execute(&mut self.connection)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        // The backstop for a checkpointer that cannot keep up (a machine too busy for its turns): past the WAL's
        // bound the writer starts it over itself, so that it never grows much beyond.
        let wal_bytes = std::fs::metadata(&self.wal).map_or(0, |m| m.len());
        if wal_bytes > WAL_LIMIT_FRAMES as u64 * PAGE_BYTES {
            if let Err(e) = checkpoint(&mut self.connection, "RESTART").await {
                tracing::warn!(error = %e, wal_bytes, "starting the shadow store's WAL over failed");
            }
        }
        drop(turn);
        self.committed.send_replace(());
        result
    }
}

/// Work for the writer task, done in the order queued.
enum Job {
    Put {
        key: ShadowKey,
        version: u64,
        /// The document's view and timestamp; `None` deletes the document.
        view: Option<(bytes::Bytes, i64)>,
        done: oneshot::Sender<Result<(), String>>,
    },
    Purge {
        device: DeviceId,
        done: oneshot::Sender<Result<(), String>>,
    },
}

impl EmbeddedStore {
    /// Opens (creating) `path` and starts its writer task.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(backend)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL under WAL: a crash never corrupts, and the last commits survive a process crash; only a
            // power loss can take the most recent ones.
            .synchronous(SqliteSynchronous::Normal)
            // Checkpoints are the checkpointer's (see the module's documentation); a WAL file that grew past
            // this is cut back to it when it starts over.
            .pragma("wal_autocheckpoint", "0")
            .pragma("journal_size_limit", (32 << 20).to_string());
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            // A file handle in this process: no ping before each use (see `db::connect`).
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await
            .map_err(backend)?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS shadows (device_id TEXT NOT NULL, name TEXT NOT NULL, document TEXT, \
             version INTEGER NOT NULL, timestamp INTEGER, PRIMARY KEY (device_id, name))",
        )
        .execute(&pool)
        .await
        .map_err(backend)?;
        // A file of an earlier release has no timestamp column: its documents are in the older storage form.
        let has_timestamp: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM pragma_table_info('shadows') WHERE name = 'timestamp'")
                .fetch_one(&pool)
                .await
                .map_err(backend)?;
        if has_timestamp == 0 {
            sqlx::query("ALTER TABLE shadows ADD COLUMN timestamp INTEGER")
                .execute(&pool)
                .await
                .map_err(backend)?;
        }
        let file = File {
            connection: options.connect().await.map_err(backend)?,
            turn: Arc::default(),
            committed: watch::channel(()).0,
            wal: wal_path(path),
        };
        let checkpointer = Checkpointer {
            // While it holds the writer back, it waits this long at most for readers to leave the WAL.
            connection: (options.clone().busy_timeout(READERS_PATIENCE))
                .connect()
                .await
                .map_err(backend)?,
            turn: file.turn.clone(),
            commits: file.committed.subscribe(),
        };
        let memory = Arc::new(Mutex::new(Memory::default()));
        let (writer, jobs) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(file, jobs, memory.clone()));
        tokio::spawn(checkpointer.run());
        Ok(Self { pool, memory, writer })
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the memory had for `key`: a lent document is rebuilt from its view outside the lock, and put back
    /// for the readers that follow while the memory still has that view (the update it was lent to may have
    /// written the next version meanwhile, or failed: then what was read is still what the file held when the
    /// read began).
    fn resolve(&self, key: &ShadowKey, seen: Seen) -> Result<Stored, StoreError> {
        let (view, timestamp, version) = match seen {
            Seen::Ready(stored) => return Ok(stored),
            Seen::Lent {
                view,
                timestamp,
                version,
            } => (view, timestamp, version),
        };
        let document = Arc::new(Document::from_view(view.clone(), timestamp).map_err(StoreError::Corrupt)?);
        if let Some(known) = self.memory().shadows.get_mut(key) {
            if matches!(&known.document, Held::Lent { view: lent, .. } if lent.as_ptr() == view.as_ptr()) {
                known.document = Held::Here(document.clone());
            }
        }
        Ok(Stored {
            document: Some(document),
            version,
        })
    }

    /// Reads `key` from the file and remembers it, unless the memory learnt of it meanwhile (a read or a write:
    /// at least as new as the file) or forgot shadows since the read began.
    async fn read_and_remember(&self, key: &ShadowKey) -> Result<Stored, StoreError> {
        let since = self.memory().forgotten;
        let stored = self.read(key).await?;
        let seen = {
            let mut memory = self.memory();
            match memory.shadows.get(key) {
                Some(known) => known.seen(),
                None => {
                    if memory.forgotten == since {
                        memory.remember(key, stored.clone());
                    }
                    return Ok(stored);
                }
            }
        };
        self.resolve(key, seen)
    }

    async fn read(&self, key: &ShadowKey) -> Result<Stored, StoreError> {
        let row =
            sqlx::query("SELECT document, timestamp, version FROM shadows WHERE device_id = ? AND name = ?")
                .bind(key.device.as_str())
                .bind(key.name_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(backend)?;
        let Some(row) = row else {
            return Ok(Stored::default());
        };
        let document: Option<String> = row.try_get("document").map_err(backend)?;
        let timestamp: Option<i64> = row.try_get("timestamp").map_err(backend)?;
        let version: i64 = row.try_get("version").map_err(backend)?;
        let document = match document.map(|text| bytes::Bytes::from(text.into_bytes())) {
            None => None,
            Some(text) => Some(match document_from(text.clone(), timestamp) {
                // The older form with a timestamp beside it: written by an earlier release after this one (which
                // never touches the column).
                Err(e) if timestamp.is_some() => document_from(text, None).map_err(|_| e)?,
                read => read?,
            }),
        };
        Ok(Stored {
            document: document.map(Arc::new),
            version: version as u64,
        })
    }

    async fn queue(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<(), String>>) -> Job,
    ) -> Result<(), StoreError> {
        let (done, result) = oneshot::channel();
        self.writer
            .send(job(done))
            .map_err(|_| StoreError::Backend("the shadow store's writer has stopped".into()))?;
        result
            .await
            .map_err(|_| StoreError::Backend("the shadow store's writer has stopped".into()))?
            .map_err(StoreError::Backend)
    }
}

impl ShadowStore for EmbeddedStore {
    async fn load(&self, key: &ShadowKey) -> Result<Stored, StoreError> {
        let seen = self.memory().shadows.get(key).map(Known::seen);
        match seen {
            Some(seen) => self.resolve(key, seen),
            None => self.read_and_remember(key).await,
        }
    }

    /// Lends the document out of memory (see [`Held::Lent`]), so the update changes it without a copy.
    async fn load_for_update(&self, key: &ShadowKey) -> Result<Stored, StoreError> {
        let stored = self.load(key).await?;
        if let Some(document) = &stored.document {
            // Serialized (for a document read in the older storage form) outside the lock.
            document.view_bytes();
            if let Some(known) = self.memory().shadows.get_mut(key) {
                known.lend(document);
            }
        }
        Ok(stored)
    }

    async fn compare_and_set(
        &self,
        key: &ShadowKey,
        expected: u64,
        version: u64,
        document: Option<&Arc<Document>>,
    ) -> Result<bool, StoreError> {
        // Serialized (if it was not yet: an update's size check does it) before taking the lock.
        let mut view = Some(document.map(|d| (d.view_bytes().clone(), d.timestamp)));
        for _ in 0..READ_ATTEMPTS {
            // Decided under the lock: lost, queued (its commit to wait for), or not known yet.
            let decided = {
                let mut memory = self.memory();
                match memory.shadows.get_mut(key) {
                    Some(known) if known.version != expected => return Ok(false),
                    Some(known) => {
                        known.version = version;
                        known.document = document.cloned().into();
                        known.unwritten += 1;
                        // Queued under the lock, so the writer commits in the order versions were given out.
                        let (done, result) = oneshot::channel();
                        let job = Job::Put {
                            key: key.clone(),
                            version,
                            view: view.take().flatten(),
                            done,
                        };
                        if self.writer.send(job).is_err() {
                            return Err(StoreError::Backend(
                                "the shadow store's writer has stopped".into(),
                            ));
                        }
                        Ok(result)
                    }
                    None => Err(memory.forgotten),
                }
            };
            match decided {
                Ok(result) => {
                    return match result.await {
                        Ok(Ok(())) => Ok(true),
                        Ok(Err(e)) => Err(StoreError::Backend(e)),
                        Err(_) => Err(StoreError::Backend(
                            "the shadow store's writer has stopped".into(),
                        )),
                    }
                }
                Err(since) => {
                    let stored = self.read(key).await?;
                    let mut memory = self.memory();
                    if !memory.shadows.contains_key(key) && memory.forgotten == since {
                        memory.remember(key, stored);
                    }
                }
            }
        }
        Err(StoreError::Backend(
            "the shadow store is too busy forgetting; retry".into(),
        ))
    }

    /// From the file: a compare-and-set returns only once its write is committed, so every change that was
    /// answered is there.
    async fn named(&self, device: &DeviceId) -> Result<Vec<ShadowName>, StoreError> {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM shadows WHERE device_id = ? AND name <> '' AND document IS NOT NULL",
        )
        .bind(device.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        Ok(names
            .iter()
            .filter_map(|name| ShadowName::parse(name).ok())
            .collect())
    }

    async fn purge(&self, device: &DeviceId) -> Result<(), StoreError> {
        self.forget(device);
        let result = self
            .queue(|done| Job::Purge {
                device: device.clone(),
                done,
            })
            .await;
        // Anything read from the file before the purge was committed is stale now.
        self.forget(device);
        result
    }

    fn forget(&self, device: &DeviceId) {
        self.memory().forget_device(device);
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }
}

/// Commits the queued writes: consecutive puts as one statement, a purge on its own, in queue order.
async fn write_loop(mut file: File, mut jobs: mpsc::UnboundedReceiver<Job>, memory: Arc<Mutex<Memory>>) {
    let mut held = None;
    loop {
        let job = match held.take() {
            Some(job) => job,
            None => match jobs.recv().await {
                Some(job) => job,
                None => break,
            },
        };
        match job {
            Job::Purge { device, done } => {
                // The documents go; the versions stay, so a device registered again under this id continues
                // them (a version never goes back).
                let result = file
                    .write(
                        sqlx::query(
                            "UPDATE shadows SET document = NULL, timestamp = NULL WHERE device_id = ?",
                        )
                        .bind(device.as_str()),
                    )
                    .await;
                let _ = done.send(result);
            }
            put => {
                let mut batch = vec![put];
                while batch.len() < BATCH {
                    match jobs.try_recv() {
                        Ok(job @ Job::Put { .. }) => batch.push(job),
                        Ok(other) => {
                            held = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let result = commit(&mut file, &batch).await;
                let mut memory = memory.lock().unwrap_or_else(|e| e.into_inner());
                for job in &batch {
                    if let Job::Put { key, .. } = job {
                        let Some(known) = memory.shadows.get_mut(key) else {
                            continue;
                        };
                        known.unwritten = known.unwritten.saturating_sub(1);
                        // Not in the file: once no later write of it is queued (those go on from what the memory
                        // has, and commit it), it is read again from the file. Forgotten then, not before: a read
                        // from the file in between would put back a version older than the queued write's.
                        if result.is_err() && known.unwritten == 0 {
                            memory.shadows.remove(key);
                            memory.forgotten += 1;
                        }
                    }
                }
                drop(memory);
                for job in batch {
                    if let Job::Put { done, .. } = job {
                        let _ = done.send(result.clone());
                    }
                }
            }
        }
    }
}

/// Checkpoints the WAL (see the module's documentation).
struct Checkpointer {
    connection: SqliteConnection,
    turn: Arc<tokio::sync::Mutex<()>>,
    commits: watch::Receiver<()>,
}

impl Checkpointer {
    /// Checkpoints after writes, at most every `CHECKPOINT_EVERY`, until the writer stops.
    async fn run(mut self) {
        while self.commits.changed().await.is_ok() {
            if let Err(e) = self.checkpoint().await {
                tracing::warn!(error = %e, "checkpointing the shadow store's WAL failed");
            }
            tokio::time::sleep(CHECKPOINT_EVERY).await;
        }
    }

    async fn checkpoint(&mut self) -> Result<(), sqlx::Error> {
        let mut frames = checkpoint(&mut self.connection, "PASSIVE").await?;
        if frames < RESTART_FRAMES {
            return Ok(());
        }
        // Catch up with what came in meanwhile, still beside the writer, so that it waits for little.
        let mut caught_up = false;
        for _ in 0..CATCH_UP_PASSES {
            let before = frames;
            frames = checkpoint(&mut self.connection, "PASSIVE").await?;
            if frames < before {
                // The WAL started over by itself (the writes paused).
                return Ok(());
            }
            if frames - before <= CAUGHT_UP_FRAMES {
                caught_up = true;
                break;
            }
        }
        // Not caught up: try again next time, unless the WAL has grown past its bound.
        if caught_up || frames >= WAL_LIMIT_FRAMES {
            // The rest is copied, and the WAL started over, while the writer waits.
            let _turn = self.turn.lock().await;
            checkpoint(&mut self.connection, "RESTART").await?;
        }
        Ok(())
    }
}

/// Runs one checkpoint in `mode`; returns the frames the WAL had.
async fn checkpoint(connection: &mut SqliteConnection, mode: &str) -> Result<i64, sqlx::Error> {
    let row = sqlx::query(&format!("PRAGMA wal_checkpoint({mode})"))
        .fetch_one(&mut *connection)
        .await?;
    row.try_get(1)
}

/// Writes every shadow of the batch (the last write of each) in one statement.
async fn commit(file: &mut File, batch: &[Job]) -> Result<(), String> {
    type Row<'a> = (u64, Option<(&'a str, i64)>);
    let mut last: HashMap<&ShadowKey, Row<'_>> = HashMap::with_capacity(batch.len());
    for job in batch {
        if let Job::Put {
            key, version, view, ..
        } = job
        {
            let view = match view {
                Some((bytes, timestamp)) => Some((
                    std::str::from_utf8(bytes).map_err(|e| format!("a document view is not UTF-8: {e}"))?,
                    *timestamp,
                )),
                None => None,
            };
            last.insert(key, (*version, view));
        }
    }
    let mut sql = String::from("INSERT INTO shadows (device_id, name, document, timestamp, version) VALUES ");
    sql.push_str(&crate::db::values_list(crate::db::Engine::Sqlite, last.len(), 5));
    sql.push_str(
        " ON CONFLICT (device_id, name) DO UPDATE SET document = excluded.document, \
         timestamp = excluded.timestamp, version = excluded.version",
    );
    let mut query = sqlx::query(&sql);
    for (key, (version, view)) in &last {
        query = query
            .bind(key.device.as_str())
            .bind(key.name_str())
            .bind(view.map(|(text, _)| text))
            .bind(view.map(|(_, timestamp)| timestamp))
            .bind(*version as i64);
    }
    file.write(query).await
}

/// The WAL file SQLite keeps beside the database at `path`.
fn wal_path(path: &Path) -> std::path::PathBuf {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    wal.into()
}
