//! The SQLite hot path: one writer thread owning a rusqlite connection, and a few
//! reader connections used from tokio's blocking pool.
//!
//! Why not sqlx here: sqlx-sqlite runs each statement on a worker thread and hands
//! every row and result back through a channel, so a publish (several statements) is
//! several thread round trips, and their futex wakeups topped the profile. This writer
//! thread runs a whole group (up to `MAX_GROUP` publishes, acks, sent marks and device
//! presence updates) in one transaction with cached prepared statements and no thread
//! hop between statements: one hop in, one commit (fsync), one hop out per caller.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use herald_protocol::{
    ApnsEnvironment, Platform, PushPolicy, PushProviderKind, PushTokenState, Target,
};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use crate::webhooks::{EventSet, EventType};

use super::{
    ApiKeyRecord, Device, InboxEntry, MessagePayload, NewMessage, PublishOutcome, StoreError,
    StoreResult, StoredMessage,
};

/// Writes committed in one transaction at most.
const MAX_GROUP: usize = 256;

/// The writer connection's page cache, in KiB.
const WRITER_CACHE_KIB: i64 = 32 * 1024;

/// Outer error: the database failed and the whole group rolls back. Inner: this one
/// write was refused (unknown device, too many recipients) and the group goes on.
pub(super) type WriteResult<T> = Result<StoreResult<T>, rusqlite::Error>;

type Reply<T> = oneshot::Sender<StoreResult<T>>;

/// A write that waits for its group's commit.
pub(super) enum Write {
    Publish(Box<NewMessage>, Reply<PublishOutcome>),
    /// Several publishes that must share one commit (one batch request).
    PublishMany(Vec<NewMessage>, Reply<Vec<StoreResult<PublishOutcome>>>),
    Ack {
        device_id: String,
        seq: i64,
        now: i64,
        /// The entries were written to the acking session (`Store::ack`).
        wrote_live: bool,
        reply: Reply<i64>,
    },
    MarkSent {
        ranges: Vec<(String, i64, i64)>,
        now: i64,
        reply: Reply<()>,
    },
    Touch {
        device_id: String,
        now: i64,
        reply: Reply<()>,
    },
    Claim {
        device_id: String,
        user: String,
        now: i64,
        /// The user's device cap (`limits.max_devices_per_user`).
        max_devices: u64,
        reply: Reply<Device>,
    },
    /// Any other write (push bookkeeping): a closure run in the group's transaction.
    Run(Box<dyn RunWrite>),
}

/// A closure write with its reply, type-erased so one queue carries them all.
pub(super) trait RunWrite: Send {
    fn exec(&mut self, conn: &Connection) -> rusqlite::Result<()>;
    fn answer(self: Box<Self>);
    fn fail(self: Box<Self>, msg: &str);
}

type RunFn<T> = Box<dyn FnOnce(&Connection) -> WriteResult<T> + Send>;

struct Closure<T> {
    f: Option<RunFn<T>>,
    out: Option<StoreResult<T>>,
    reply: Reply<T>,
}

impl<T: Send> RunWrite for Closure<T> {
    fn exec(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let f = self.f.take().expect("a write runs once");
        self.out = Some(f(conn)?);
        Ok(())
    }
    fn answer(self: Box<Self>) {
        let out = self.out.expect("answered after it ran");
        let _ = self.reply.send(out);
    }
    fn fail(self: Box<Self>, msg: &str) {
        let _ = self.reply.send(Err(commit_failed(msg)));
    }
}

fn commit_failed(msg: &str) -> StoreError {
    StoreError::Other(anyhow::anyhow!("commit failed: {msg}"))
}

/// What a write produced, held until the group committed: nobody hears "done" for a
/// write whose transaction could still roll back.
enum Outcome {
    Publish(StoreResult<PublishOutcome>),
    PublishMany(Vec<StoreResult<PublishOutcome>>),
    Ack(StoreResult<i64>),
    Unit(StoreResult<()>),
    Device(StoreResult<Device>),
    /// Kept inside the `Run` write itself.
    Ran,
}

impl Write {
    fn answer(self, outcome: Outcome) {
        match (self, outcome) {
            (Write::Publish(_, reply), Outcome::Publish(r)) => {
                let _ = reply.send(r);
            }
            (Write::PublishMany(_, reply), Outcome::PublishMany(r)) => {
                let _ = reply.send(Ok(r));
            }
            (Write::Ack { reply, .. }, Outcome::Ack(r)) => {
                let _ = reply.send(r);
            }
            (Write::MarkSent { reply, .. } | Write::Touch { reply, .. }, Outcome::Unit(r)) => {
                let _ = reply.send(r);
            }
            (Write::Claim { reply, .. }, Outcome::Device(r)) => {
                let _ = reply.send(r);
            }
            (Write::Run(w), Outcome::Ran) => w.answer(),
            _ => unreachable!("outcomes are produced in the order and kind of their writes"),
        }
    }

    fn fail(self, msg: &str) {
        let err = commit_failed;
        match self {
            Write::Publish(_, reply) => {
                let _ = reply.send(Err(err(msg)));
            }
            Write::PublishMany(_, reply) => {
                let _ = reply.send(Err(err(msg)));
            }
            Write::Ack { reply, .. } => {
                let _ = reply.send(Err(err(msg)));
            }
            Write::MarkSent { reply, .. } | Write::Touch { reply, .. } => {
                let _ = reply.send(Err(err(msg)));
            }
            Write::Claim { reply, .. } => {
                let _ = reply.send(Err(err(msg)));
            }
            Write::Run(w) => w.fail(msg),
        }
    }
}

fn open(path: &Path, flags: OpenFlags) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    // FULL: a 202 means the commit reached the disk, not just the OS cache.
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Off on the hot connections: their only writes to a child table are inbox rows,
    // each after a read or update of its device row in the same transaction found
    // the device, so the parent check repeated that lookup (−8% CPU per message with
    // batches, BENCHMARKS.md v5). Devices are deleted with their inbox and
    // subscriptions on the sqlx pool, where foreign keys stay on.
    conn.pragma_update(None, "foreign_keys", false)?;
    // A statement that changes many rows inside the group's transaction (a topic
    // publish updates every subscriber's device row) keeps a statement journal, to
    // undo just that statement if it fails. Past 64 KiB SQLite spills it to a temp
    // file, a pwrite per page on the writer thread (2% of the gateway's time in a 10k
    // fan-out, BENCHMARKS.md v7). It never outlives its statement and durability does
    // not rest on it, so it stays in memory.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

fn db_err(e: rusqlite::Error) -> StoreError {
    StoreError::Other(anyhow::Error::new(e))
}

/// The writer thread's handle plus the reader connections.
pub(super) struct Hot {
    writes: mpsc::Sender<Write>,
    readers: Arc<Readers>,
}

impl Hot {
    /// Starts the writer thread on `path` (already migrated, in WAL mode).
    pub(super) fn start(path: &Path, events: EventSet) -> StoreResult<Hot> {
        let conn = open(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )
        .map_err(db_err)?;
        // SQLite's default page cache (2 MiB) is smaller than what a 10k fan-out
        // touches (every subscriber's device row and new inbox row, and their
        // indexes): the writer read ~6,600 pages back per round, a pread each
        // (BENCHMARKS.md v7). Pages are only held once touched.
        conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)
            .map_err(db_err)?;
        let (writes, rx) = mpsc::channel(4096);
        std::thread::Builder::new()
            .name("herald-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, events))
            .map_err(|e| StoreError::Other(anyhow::anyhow!("cannot start the writer: {e}")))?;
        Ok(Hot {
            writes,
            readers: Arc::new(Readers {
                path: path.to_owned(),
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(tokio::sync::Semaphore::new(MAX_READERS)),
            }),
        })
    }

    /// Hands a write to the writer thread and waits for its group's commit.
    pub(super) async fn write<T>(&self, make: impl FnOnce(Reply<T>) -> Write) -> StoreResult<T> {
        let stopped = || StoreError::Other(anyhow::anyhow!("store writer stopped"));
        let (reply, rx) = oneshot::channel();
        self.writes.send(make(reply)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Runs `f` in the next write group's transaction; its result is returned once the
    /// group committed. An outer `Err` from `f` fails the whole group.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> WriteResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        self.write(|reply| {
            Write::Run(Box::new(Closure {
                f: Some(Box::new(f)),
                out: None,
                reply,
            }))
        })
        .await
    }

    /// Runs `f` on a reader connection in the blocking pool: one thread hop for the
    /// whole read instead of one per statement.
    pub(super) async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let readers = self.readers.clone();
        // Held by the blocking task, so a caller that gives up does not free a slot
        // whose connection is still in use.
        let permit = self
            .readers
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the reader semaphore is never closed");
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = readers.take()?;
            let out = f(&conn);
            readers.put(conn);
            out
        })
        .await
        .map_err(|e| StoreError::Other(anyhow::anyhow!("store reader failed: {e}")))?
    }

    /// Runs a point read (an indexed lookup of a row or a few) on the calling worker,
    /// under the same `MAX_READERS` bound as `read`. Such a read takes microseconds;
    /// handing it to the blocking pool cost more than the read itself: at one publish
    /// per request the API key lookup's thread hop and the pool's futex wakeups were a
    /// third of the gateway's CPU (BENCHMARKS.md, v5). It never falls back to the pool
    /// when every reader is busy: in a connect storm that fallback fed itself (pool
    /// reads hold their connections for a thread hop, so more reads found none idle)
    /// and some runs stayed at 230 µs per connect instead of 90.
    pub(super) async fn read_point<T>(
        &self,
        f: impl FnOnce(&Connection) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let _permit = self
            .readers
            .permits
            .acquire()
            .await
            .expect("the reader semaphore is never closed");
        // Nothing below awaits: a caller that gives up cannot leave a read half done.
        let conn = self.readers.take()?;
        let out = f(&conn);
        self.readers.put(conn);
        out
    }

    pub(super) async fn device(&self, device_id: &str) -> StoreResult<Option<Device>> {
        let id = device_id.to_owned();
        self.read_point(move |conn| device_by_id(conn, &id).map_err(db_err))
            .await
    }

    /// The first column of every row `sql` returns for one text parameter.
    pub(super) async fn column<T: rusqlite::types::FromSql + Send + 'static>(
        &self,
        sql: &'static str,
        param: &str,
    ) -> StoreResult<Vec<T>> {
        let param = param.to_owned();
        self.read_point(move |conn| {
            conn.prepare_cached(sql)
                .and_then(|mut stmt| stmt.query_map(params![param], |r| r.get(0))?.collect())
                .map_err(db_err)
        })
        .await
    }

    pub(super) async fn api_key_by_hash(&self, hash: Vec<u8>) -> StoreResult<Option<ApiKeyRecord>> {
        self.read_point(move |conn| {
            conn.prepare_cached(
                "SELECT id, name, prefix, hash, created_at, revoked_at, scopes FROM api_keys WHERE hash = ?1",
            )
            .and_then(|mut stmt| stmt.query_row(params![hash], api_key_from_row).optional())
            .map_err(db_err)
        })
        .await
    }

    /// Every API key, oldest first (`herald keys list`).
    pub(super) async fn api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT id, name, prefix, hash, created_at, revoked_at, scopes FROM api_keys ORDER BY created_at, id",
            )
            .and_then(|mut stmt| stmt.query_map([], api_key_from_row)?.collect())
            .map_err(db_err)
        })
        .await
    }

    pub(super) async fn fetch_after(
        &self,
        device_id: &str,
        after: i64,
        limit: u32,
        now: i64,
    ) -> StoreResult<Vec<InboxEntry>> {
        let id = device_id.to_owned();
        let read = move |conn: &Connection| fetch_after(conn, &id, after, limit, now);
        if limit <= SMALL_PAGE {
            self.read_point(read).await
        } else {
            self.read(read).await
        }
    }
}

/// A row of `SELECT id, name, prefix, hash, created_at, revoked_at, scopes FROM api_keys`.
fn api_key_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ApiKeyRecord> {
    Ok(ApiKeyRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        prefix: r.get(2)?,
        hash: r.get(3)?,
        created_at: r.get(4)?,
        revoked_at: r.get(5)?,
        scopes: super::scopes_from_text(&r.get::<_, String>(6)?),
    })
}

/// An inbox page of at most this many entries is read like a point read: a session
/// that starts caught up or a few entries behind (most of them) asks for so few
/// (`Session::run`), and a connect storm's pages were most of the blocking pool's
/// work (BENCHMARKS.md, v5).
const SMALL_PAGE: u32 = 16;

/// Reads that may run at once, hence reader connections that may exist. Unbounded
/// (up to tokio's 512 blocking threads), a storm of 20,000 connecting devices, four
/// reads each, opened hundreds of connections and threads that then contended for
/// SQLite's shared WAL index: 460 connects/s with timeouts instead of 1,740
/// (BENCHMARKS.md, v4). Each read is an indexed lookup of microseconds, so a few
/// connections keep both cores busy.
const MAX_READERS: usize = 4;

/// Reader connections, opened on demand and kept for reuse; at most `MAX_READERS`.
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<tokio::sync::Semaphore>,
}

impl Readers {
    fn take(&self) -> StoreResult<Connection> {
        if let Some(c) = self.idle.lock().expect("reader pool").pop() {
            return Ok(c);
        }
        open(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(db_err)
    }

    fn put(&self, conn: Connection) {
        self.idle.lock().expect("reader pool").push(conn);
    }
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<Write>, events: EventSet) {
    let mut batch: Vec<Write> = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        match commit_group(&mut conn, &mut batch, events) {
            Ok(outcomes) => {
                for (write, outcome) in batch.drain(..).zip(outcomes) {
                    write.answer(outcome);
                }
            }
            Err(e) => {
                // The transaction rolled back: nothing of this group was stored, so
                // every caller is told it failed (no publish got a 202).
                tracing::error!(error = %e, "write group failed to commit");
                let msg = e.to_string();
                for write in batch.drain(..) {
                    write.fail(&msg);
                }
            }
        }
    }
}

fn commit_group(
    conn: &mut Connection,
    batch: &mut [Write],
    events: EventSet,
) -> rusqlite::Result<Vec<Outcome>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for write in batch.iter_mut() {
        if let Write::Run(w) = write {
            w.exec(&tx)?;
            outcomes.push(Outcome::Ran);
            continue;
        }
        outcomes.push(match &*write {
            Write::Publish(msg, _) => Outcome::Publish(publish_one(&tx, msg)?),
            Write::PublishMany(msgs, _) => {
                let mut results = Vec::with_capacity(msgs.len());
                for msg in msgs {
                    results.push(publish_one(&tx, msg)?);
                }
                Outcome::PublishMany(results)
            }
            Write::Ack {
                device_id,
                seq,
                now,
                wrote_live,
                ..
            } => Outcome::Ack(ack_one(&tx, device_id, *seq, *now, *wrote_live, events)?),
            Write::MarkSent { ranges, now, .. } => {
                let mut stmt = tx.prepare_cached(
                    "UPDATE deliveries SET sent_at = ?1 WHERE device_id = ?2 AND seq >= ?3 AND seq <= ?4 AND sent_at IS NULL",
                )?;
                for (device_id, from, to) in ranges {
                    if events.contains(EventType::Delivered) {
                        queue_entry_events(
                            &tx,
                            EventType::Delivered,
                            "d.sent_at IS NULL",
                            device_id,
                            *from,
                            *to,
                            *now,
                        )?;
                    }
                    stmt.execute(params![now, device_id, from, to])?;
                }
                Outcome::Unit(Ok(()))
            }
            Write::Touch { device_id, now, .. } => {
                tx.prepare_cached("UPDATE devices SET last_seen = ?1 WHERE id = ?2")?
                    .execute(params![now, device_id])?;
                Outcome::Unit(Ok(()))
            }
            Write::Claim {
                device_id,
                user,
                now,
                max_devices,
                ..
            } => Outcome::Device(claim_one(&tx, device_id, user, *now, *max_devices)?),
            Write::Run(_) => unreachable!("ran above"),
        });
    }
    tx.commit()?;
    Ok(outcomes)
}

/// Claims `device_id` for `user`; a new device only while `user` has fewer than
/// `max_devices`. The count and the insert share the writer's transaction, so claims
/// racing through other requests are counted one after the other.
fn claim_one(
    conn: &Connection,
    device_id: &str,
    user: &str,
    now: i64,
    max_devices: u64,
) -> WriteResult<Device> {
    let d = match device_by_id(conn, device_id)? {
        Some(d) => d,
        None => {
            let count: i64 = conn
                .prepare_cached("SELECT COUNT(*) FROM devices WHERE user_id = ?1")?
                .query_row(params![user], |r| r.get(0))?;
            if count as u64 >= max_devices {
                return Ok(Err(StoreError::DeviceCapReached {
                    user: user.to_owned(),
                    count: count as u64,
                    max: max_devices,
                }));
            }
            conn.prepare_cached(
                "INSERT INTO devices (id, user_id, created_at, last_seen) VALUES (?1, ?2, ?3, ?3)",
            )?
            .execute(params![device_id, user, now])?;
            device_by_id(conn, device_id)?.expect("inserted in this transaction")
        }
    };
    if d.user_id != user {
        return Ok(Err(StoreError::DeviceOwnedByOtherUser(device_id.into())));
    }
    Ok(Ok(d))
}

/// Cumulative ack; returns the acked seq afterwards.
fn ack_one(
    conn: &Connection,
    device_id: &str,
    seq: i64,
    now: i64,
    wrote_live: bool,
    events: EventSet,
) -> WriteResult<i64> {
    let row = conn
        .prepare_cached("SELECT acked_seq, last_seq FROM devices WHERE id = ?1")?
        .query_row(params![device_id], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })
        .optional()?;
    let Some((acked, last)) = row else {
        return Ok(Err(StoreError::NotFound(format!(
            "device {device_id} is not registered"
        ))));
    };
    // An ack beyond what was assigned cannot be honest; clamp rather than let a
    // buggy client skip messages that do not exist yet.
    let target = seq.min(last);
    if target > acked {
        if events.contains(EventType::Acked) {
            queue_entry_events(
                conn,
                EventType::Acked,
                "d.acked_at IS NULL",
                device_id,
                acked + 1,
                target,
                now,
            )?;
        }
        if wrote_live && events.contains(EventType::Delivered) {
            queue_entry_events(
                conn,
                EventType::Delivered,
                "d.sent_at IS NULL",
                device_id,
                acked + 1,
                target,
                now,
            )?;
        }
        // The ack cancels the entries' scheduled fallback pushes (and keeps them out of
        // the push-due index); `always` pushes, and pushes already being sent or
        // settled, keep theirs.
        conn.prepare_cached(
            "UPDATE deliveries SET acked_at = ?1,
                    sent_at = CASE WHEN ?5 THEN coalesce(sent_at, ?1) ELSE sent_at END,
                    push_state = CASE WHEN push_state = 'pending' AND NOT push_always THEN NULL ELSE push_state END,
                    push_due_at = CASE WHEN push_state = 'pending' AND NOT push_always THEN NULL ELSE push_due_at END
             WHERE device_id = ?2 AND seq > ?3 AND seq <= ?4 AND acked_at IS NULL",
        )?
        .execute(params![now, device_id, acked, target, wrote_live])?;
        conn.prepare_cached("UPDATE devices SET acked_seq = ?1, last_seen = ?2 WHERE id = ?3")?
            .execute(params![target, now, device_id])?;
    }
    Ok(Ok(target.max(acked)))
}

/// SQL of a new webhook event id: `evt_` + 32 random hex digits.
pub(super) const EVENT_ID_SQL: &str = "'evt_' || lower(hex(randomblob(16)))";

/// Queues a `kind` webhook event, at `now`, for each entry `(device_id, from..=to)`
/// matching `cond` (on `deliveries d`), in the caller's transaction: run before the
/// update that makes `cond` false, so each entry gets its event once.
pub(super) fn queue_entry_events(
    conn: &Connection,
    kind: EventType,
    cond: &str,
    device_id: &str,
    from: i64,
    to: i64,
    now: i64,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(&format!(
        "INSERT INTO webhook_events (event_id, type, message_id, device_id, user_id, seq, at, queued_at, next_attempt_at)
         SELECT {EVENT_ID_SQL}, ?1, d.message_id, d.device_id, v.user_id, d.seq, ?2, ?2, ?2
         FROM deliveries d JOIN devices v ON v.id = d.device_id
         WHERE d.device_id = ?3 AND d.seq >= ?4 AND d.seq <= ?5 AND {cond}
         ORDER BY d.seq"
    ))?
    .execute(params![kind.as_str(), now, device_id, from, to])
}

/// Validation happens before any write, so a refused message leaves no trace in the
/// shared transaction.
fn publish_one(conn: &Connection, msg: &NewMessage) -> WriteResult<PublishOutcome> {
    if let Some(key) = &msg.idempotency_key {
        let row = conn
            .prepare_cached(
                "SELECT id, recipients, created_at FROM messages WHERE api_key_id = ?1 AND idempotency_key = ?2",
            )?
            .query_row(params![msg.api_key_id, key], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .optional()?;
        if let Some((id, recipients, created_at)) = row {
            if created_at >= msg.idempotency_since {
                return Ok(Ok(PublishOutcome::Duplicate {
                    message_id: id,
                    recipients: recipients as u64,
                }));
            }
            // Older than the idempotency window: the key is free again.
            conn.prepare_cached("UPDATE messages SET idempotency_key = NULL WHERE id = ?1")?
                .execute(params![id])?;
        }
    }

    // Each recipient's next seq, `(device, seq)`. A user's or a topic's recipients are
    // counted (a user's by reading them) before anything is written, so a refused
    // publish writes nothing; then all of them get their seq in one statement: one per
    // recipient was half of a large fan-out's time.
    let recipients: Vec<(String, i64)> = match &msg.target {
        Target::Device(_) if msg.max_recipients < 1 => {
            return Ok(Err(StoreError::TooManyRecipients(1)))
        }
        // A read then an update, not `UPDATE … RETURNING`: SQLite collects RETURNING
        // rows in an ephemeral table, a temporary B-tree opened and closed on every
        // execution, and this runs once per message (−4% CPU per message with batches,
        // BENCHMARKS.md v11). The writer's transaction holds the database, so nothing
        // can change the seq between the two.
        Target::Device(d) => match conn
            .prepare_cached("SELECT last_seq + 1 FROM devices WHERE id = ?1")?
            .query_row(params![d], |r| r.get::<_, i64>(0))
            .optional()?
        {
            Some(seq) => {
                conn.prepare_cached("UPDATE devices SET last_seq = ?2 WHERE id = ?1")?
                    .execute(params![d, seq])?;
                vec![(d.clone(), seq)]
            }
            None => {
                return Ok(Err(StoreError::NotFound(format!(
                    "device {d} is not registered"
                ))))
            }
        },
        // A user has a few devices (`limits.max_devices_per_user`): like one device, its
        // next seqs are read (the read doubles as the count), then written.
        Target::User(user) => {
            let mut assigned = conn
                .prepare_cached("SELECT id, last_seq + 1 FROM devices WHERE user_id = ?1")?
                .query_map(params![user], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<(String, i64)>>>()?;
            if assigned.len() > msg.max_recipients {
                return Ok(Err(StoreError::TooManyRecipients(assigned.len())));
            }
            if !assigned.is_empty() {
                conn.prepare_cached(
                    "UPDATE devices SET last_seq = last_seq + 1 WHERE user_id = ?1",
                )?
                .execute(params![user])?;
            }
            // The inbox index takes them best in key order.
            assigned.sort_unstable();
            assigned
        }
        // A topic may have 10,000s of subscribers: one statement gives them all their
        // seqs, and its ephemeral RETURNING table is paid once for all of them.
        Target::Topic(topic) => {
            let count: i64 = conn
                .prepare_cached("SELECT count(*) FROM subscriptions WHERE topic = ?1")?
                .query_row(params![topic], |r| r.get(0))?;
            if count as usize > msg.max_recipients {
                return Ok(Err(StoreError::TooManyRecipients(count as usize)));
            }
            let mut assigned = Vec::with_capacity(count as usize);
            let mut stmt = conn.prepare_cached(
                "UPDATE devices SET last_seq = last_seq + 1
                 WHERE id IN (SELECT device_id FROM subscriptions WHERE topic = ?1)
                 RETURNING id, last_seq",
            )?;
            let mut rows = stmt.query(params![topic])?;
            while let Some(r) = rows.next()? {
                assigned.push((r.get::<_, String>(0)?, r.get::<_, i64>(1)?));
            }
            // RETURNING has no order; the inbox index takes them best in key order.
            assigned.sort_unstable();
            assigned
        }
    };
    let devices_len = recipients.len();

    let payload = serde_json::to_string(&msg.payload)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    conn.prepare_cached(
        "INSERT INTO messages (id, api_key_id, target_kind, target, payload, recipients, created_at, expires_at, idempotency_key)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        msg.id,
        msg.api_key_id,
        msg.target.kind(),
        msg.target.value(),
        payload,
        devices_len as i64,
        msg.created_at,
        msg.expires_at,
        msg.idempotency_key,
    ])?;

    let stored = Arc::new(StoredMessage::new(
        msg.id.clone(),
        msg.target.clone(),
        msg.payload.clone(),
        msg.created_at,
        msg.expires_at,
    ));
    let (push_state, push_due_at) = push_at_publish(msg);
    let always = msg.payload.push == PushPolicy::Always;
    // Binds `(device, seq)` as row `i` of an inbox INSERT.
    let bind_row =
        |stmt: &mut rusqlite::Statement<'_>, i: usize, (device_id, seq): &(String, i64)| {
            let at = i * 7;
            stmt.raw_bind_parameter(at + 1, device_id)?;
            stmt.raw_bind_parameter(at + 2, seq)?;
            stmt.raw_bind_parameter(at + 3, &msg.id)?;
            stmt.raw_bind_parameter(at + 4, msg.expires_at)?;
            stmt.raw_bind_parameter(at + 5, push_state)?;
            stmt.raw_bind_parameter(at + 6, push_due_at)?;
            stmt.raw_bind_parameter(at + 7, always)
        };
    // Many rows per INSERT: the statement's fixed cost is paid once per chunk.
    let mut chunks = recipients.chunks_exact(INSERT_CHUNK);
    if devices_len >= INSERT_CHUNK {
        static SQL: LazyLock<String> = LazyLock::new(|| insert_deliveries_sql(INSERT_CHUNK));
        let mut insert = conn.prepare_cached(&SQL)?;
        for chunk in chunks.by_ref() {
            for (i, row) in chunk.iter().enumerate() {
                bind_row(&mut insert, i, row)?;
            }
            insert.raw_execute()?;
        }
    }
    static ONE_ROW_SQL: LazyLock<String> = LazyLock::new(|| insert_deliveries_sql(1));
    let mut insert = conn.prepare_cached(&ONE_ROW_SQL)?;
    for row in chunks.remainder() {
        bind_row(&mut insert, 0, row)?;
        insert.raw_execute()?;
    }
    let entries = recipients
        .into_iter()
        .map(|(device_id, seq)| InboxEntry {
            device_id,
            seq,
            message: stored.clone(),
            push_pending: push_state.is_some(),
            push_attempts: 0,
        })
        .collect();
    Ok(Ok(PublishOutcome::Created { entries }))
}

/// Inbox rows per multi-row INSERT of a large publish (7 parameters each).
const INSERT_CHUNK: usize = 64;

/// `INSERT INTO deliveries … VALUES (…), …` with `rows` rows of parameters.
fn insert_deliveries_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO deliveries (device_id, seq, message_id, expires_at, push_state, push_due_at, push_always) VALUES ",
    );
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        let at = i * 7;
        sql.push_str(&format!(
            "(?{},?{},?{},?{},?{},?{},?{})",
            at + 1,
            at + 2,
            at + 3,
            at + 4,
            at + 5,
            at + 6,
            at + 7
        ));
    }
    sql
}

/// The push columns (`push_state`, `push_due_at`) a new inbox entry starts with.
fn push_at_publish(msg: &NewMessage) -> (Option<&'static str>, Option<i64>) {
    (msg.push_due_at.map(|_| "pending"), msg.push_due_at)
}

const DEVICE_COLUMNS: &str = "id, user_id, platform, push_provider, push_token, apns_environment, token_state, token_error, last_seq, acked_seq, last_seen";

fn device_by_id(conn: &Connection, device_id: &str) -> rusqlite::Result<Option<Device>> {
    conn.prepare_cached(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"
    ))?
    .query_row(params![device_id], |r| {
        Ok(Device {
            id: r.get(0)?,
            user_id: r.get(1)?,
            platform: r
                .get::<_, Option<String>>(2)?
                .and_then(|s| Platform::parse(&s)),
            push_provider: r
                .get::<_, Option<String>>(3)?
                .and_then(|s| PushProviderKind::parse(&s)),
            push_token: r.get(4)?,
            apns_environment: r
                .get::<_, Option<String>>(5)?
                .and_then(|s| ApnsEnvironment::parse(&s)),
            token_state: PushTokenState::parse(&r.get::<_, String>(6)?)
                .unwrap_or(PushTokenState::None),
            token_error: r.get(7)?,
            last_seq: r.get(8)?,
            acked_seq: r.get(9)?,
            last_seen: r.get(10)?,
        })
    })
    .optional()
}

fn fetch_after(
    conn: &Connection,
    device_id: &str,
    after: i64,
    limit: u32,
    now: i64,
) -> StoreResult<Vec<InboxEntry>> {
    struct Row {
        seq: i64,
        id: String,
        kind: String,
        target: String,
        payload: String,
        created_at: i64,
        expires_at: i64,
    }
    let rows: Vec<Row> = conn
        .prepare_cached(
            "SELECT d.seq, m.id, m.target_kind, m.target, m.payload, m.created_at, m.expires_at
             FROM deliveries d JOIN messages m ON m.id = d.message_id
             WHERE d.device_id = ?1 AND d.seq > ?2 AND d.expires_at > ?3
             ORDER BY d.seq LIMIT ?4",
        )
        .and_then(|mut stmt| {
            stmt.query_map(params![device_id, after, now, limit as i64], |r| {
                Ok(Row {
                    seq: r.get(0)?,
                    id: r.get(1)?,
                    kind: r.get(2)?,
                    target: r.get(3)?,
                    payload: r.get(4)?,
                    created_at: r.get(5)?,
                    expires_at: r.get(6)?,
                })
            })?
            .collect()
        })
        .map_err(db_err)?;
    // A fan-out message appears in many inboxes; parse its body once per page.
    let mut cache: HashMap<String, Arc<StoredMessage>> = HashMap::new();
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let message = match cache.get(&row.id) {
            Some(m) => m.clone(),
            None => {
                let m = Arc::new(message_from_parts(
                    row.id.clone(),
                    &row.kind,
                    row.target,
                    &row.payload,
                    row.created_at,
                    row.expires_at,
                )?);
                cache.insert(row.id, m.clone());
                m
            }
        };
        out.push(InboxEntry {
            device_id: device_id.to_owned(),
            seq: row.seq,
            message,
            push_pending: false,
            push_attempts: 0,
        });
    }
    Ok(out)
}

pub(super) fn message_from_parts(
    id: String,
    kind: &str,
    target: String,
    payload: &str,
    created_at: i64,
    expires_at: i64,
) -> StoreResult<StoredMessage> {
    let target = match kind {
        "user" => Target::User(target),
        "device" => Target::Device(target),
        _ => Target::Topic(target),
    };
    let payload: MessagePayload = serde_json::from_str(payload)
        .map_err(|e| StoreError::Other(anyhow::anyhow!("message {id} payload: {e}")))?;
    Ok(StoredMessage::new(
        id, target, payload, created_at, expires_at,
    ))
}
