//! Who is connected to this node: device id → live session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{InboxEntry, StoredMessage};

/// What the rest of the gateway can tell a session.
#[derive(Debug)]
pub enum SessionEvent {
    /// A freshly committed inbox entry, with the instant the publish committed.
    /// Boxed: a session's queue allocates its first block of slots up front, so the
    /// slot size is paid by every idle connection.
    /// The third field is the entry's weight in the queue's byte budget.
    Deliver(Box<(InboxEntry, Instant, usize)>),
    /// The device acked up to this seq over HTTP (`POST /v1/me/ack`): the session
    /// must not treat those entries as unacked any more.
    AckedElsewhere(i64),
    /// Notifications may have been missed (the cluster bus was down): re-read the
    /// inbox after the last seq sent.
    Resync,
}

/// Why a session was told to go away from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickReason {
    /// Its send queue was full: it reads slower than messages arrive.
    SlowConsumer,
    /// The same device connected again.
    Replaced,
    /// The device was deleted.
    Deleted,
    /// Its user's tokens were revoked (`POST /v1/users/{user}/revoke_tokens`).
    Revoked,
    /// An operator or test asked.
    Kicked,
}

#[derive(Clone)]
pub struct SessionHandle {
    pub session_id: u64,
    pub events: mpsc::Sender<SessionEvent>,
    kill: CancellationToken,
    reason: std::sync::Arc<Mutex<Option<KickReason>>>,
    progress: Arc<SessionProgress>,
    queued: QueuedBytes,
}

/// Bytes of entries queued for a session and not yet taken by it: frames alone would
/// let one stuck session pin 1,024 × 64 KiB.
#[derive(Clone)]
pub struct QueuedBytes {
    bytes: Arc<AtomicUsize>,
    max: usize,
}

impl QueuedBytes {
    /// Reserves room for `weight` bytes; one entry is always let in, however large,
    /// so a message bigger than the budget still reaches a session that keeps up.
    fn reserve(&self, weight: usize) -> bool {
        let before = self.bytes.fetch_add(weight, Ordering::AcqRel);
        if before > 0 && before + weight > self.max {
            self.bytes.fetch_sub(weight, Ordering::AcqRel);
            return false;
        }
        true
    }

    pub fn release(&self, weight: usize) {
        self.bytes.fetch_sub(weight, Ordering::AcqRel);
    }
}

/// An entry's weight in a session queue's byte budget: about its size on the wire.
/// `data` is kept as the text received, so this costs no serialising.
pub fn entry_weight(message: &StoredMessage) -> usize {
    let data = message.payload.data.get().len();
    let notification = message.payload.notification.as_ref().map_or(0, |n| {
        [&n.title, &n.body, &n.sound]
            .iter()
            .map(|f| f.as_ref().map_or(0, String::len))
            .sum()
    });
    // Ids, seq, timestamps and framing.
    data + notification + 160
}

/// How far a session got, readable without the session task: a task stuck writing to
/// a socket that stopped draining cannot answer anything, and a due push must not
/// wait for it.
#[derive(Debug, Default)]
pub struct SessionProgress {
    /// Highest seq queued to the session.
    queued: AtomicI64,
    /// Highest seq the session wrote to its socket (live or by replay).
    written: AtomicI64,
    /// Highest seq the session's own acks stored (with the entries' sent marks).
    acked: AtomicI64,
}

impl SessionProgress {
    /// Called by the session after each entry it wrote.
    pub fn wrote(&self, seq: i64) {
        self.written.fetch_max(seq, Ordering::Relaxed);
    }

    /// Called by the session after its ack write, with the acked seq it returned.
    pub fn acked(&self, seq: i64) {
        self.acked.fetch_max(seq, Ordering::Relaxed);
    }

    /// Entries up to here need no separate sent mark: the session's ack recorded them.
    pub fn acked_through(&self) -> i64 {
        self.acked.load(Ordering::Relaxed)
    }

    fn had(&self, seq: i64) -> bool {
        seq <= self.queued.load(Ordering::Relaxed) || seq <= self.written.load(Ordering::Relaxed)
    }
}

/// What became of an entry offered to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Queued: the session will write it.
    Taken,
    /// The queue was full: the session was kicked as a slow consumer (it catches up
    /// by replay when it reconnects).
    Full,
    /// The session already ended.
    Gone,
    /// Offered as due: this session already had the entry (queued or written) and no
    /// ack came by its due time. It gets no second chance: the entry is pushed.
    Overdue,
}

impl SessionHandle {
    pub fn kick(&self, reason: KickReason) {
        self.reason.lock().unwrap().get_or_insert(reason);
        self.kill.cancel();
    }

    /// Queues a committed entry without ever waiting on the session. `weight` is
    /// `entry_weight(&entry.message)`.
    pub fn offer(
        &self,
        entry: InboxEntry,
        committed_at: Instant,
        weight: usize,
        metrics: &Metrics,
    ) -> Offer {
        if self.events.is_closed() {
            return Offer::Gone;
        }
        if !self.queued.reserve(weight) {
            self.kick(KickReason::SlowConsumer);
            return Offer::Full;
        }
        let seq = entry.seq;
        match self.events.try_send(SessionEvent::Deliver(Box::new((
            entry,
            committed_at,
            weight,
        )))) {
            Ok(()) => {
                self.progress.queued.fetch_max(seq, Ordering::Relaxed);
                metrics.session_queue_depth.inc();
                Offer::Taken
            }
            Err(TrySendError::Full(_)) => {
                self.queued.release(weight);
                self.kick(KickReason::SlowConsumer);
                Offer::Full
            }
            Err(TrySendError::Closed(_)) => {
                self.queued.release(weight);
                Offer::Gone
            }
        }
    }

    /// Offers an entry whose push is due (`DeliveryRouter::settle_due`): taken only if
    /// this session never had it, e.g. when the node that committed it died before
    /// ringing the doorbell. One this session had and did not get acked is `Overdue`.
    pub fn offer_due(&self, entry: InboxEntry, metrics: &Metrics) -> Offer {
        if self.progress.had(entry.seq) {
            return Offer::Overdue;
        }
        let weight = entry_weight(&entry.message);
        self.offer(entry, Instant::now(), weight, metrics)
    }
}

/// The receiving half held by the session itself.
pub struct SessionInbox {
    pub session_id: u64,
    pub events: mpsc::Receiver<SessionEvent>,
    pub kill: CancellationToken,
    reason: std::sync::Arc<Mutex<Option<KickReason>>>,
    pub progress: Arc<SessionProgress>,
    pub queued: QueuedBytes,
}

impl SessionInbox {
    pub fn kick_reason(&self) -> Option<KickReason> {
        *self.reason.lock().unwrap()
    }
}

const SHARDS: usize = 64;

/// Sharded so that 100k sessions connecting at once do not queue on one lock.
pub struct SessionRegistry {
    shards: Vec<Mutex<HashMap<String, SessionHandle>>>,
    next_id: AtomicU64,
    queue_capacity: usize,
    queue_bytes: usize,
    /// Each session's `kill` is a child of this: shutdown reaches every session through
    /// the one token it already waits on, with no shared lock polled per wakeup.
    shutdown: CancellationToken,
}

impl SessionRegistry {
    /// Each session may have `queue_capacity` entries, of `queue_bytes` in all, queued.
    /// Cancelling `shutdown` kills every session, with no kick reason.
    pub fn new(
        queue_capacity: usize,
        queue_bytes: usize,
        shutdown: &CancellationToken,
    ) -> SessionRegistry {
        SessionRegistry {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next_id: AtomicU64::new(1),
            queue_capacity,
            queue_bytes,
            shutdown: shutdown.clone(),
        }
    }

    fn shard(&self, device_id: &str) -> &Mutex<HashMap<String, SessionHandle>> {
        // FNV-1a: cheap and good enough to spread device ids.
        let mut h: u64 = 0xcbf29ce484222325;
        for b in device_id.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        &self.shards[(h as usize) % SHARDS]
    }

    /// Registers a new session for `device_id`, replacing (and kicking) an older one.
    pub fn register(&self, device_id: &str) -> SessionInbox {
        let (tx, rx) = mpsc::channel(self.queue_capacity);
        let kill = self.shutdown.child_token();
        let reason = std::sync::Arc::new(Mutex::new(None));
        let session_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let progress = Arc::new(SessionProgress::default());
        let queued = QueuedBytes {
            bytes: Arc::new(AtomicUsize::new(0)),
            max: self.queue_bytes,
        };
        let handle = SessionHandle {
            session_id,
            events: tx,
            kill: kill.clone(),
            reason: reason.clone(),
            progress: progress.clone(),
            queued: queued.clone(),
        };
        let old = self
            .shard(device_id)
            .lock()
            .unwrap()
            .insert(device_id.to_owned(), handle);
        if let Some(old) = old {
            old.kick(KickReason::Replaced);
        }
        SessionInbox {
            session_id,
            events: rx,
            kill,
            reason,
            progress,
            queued,
        }
    }

    /// Removes the entry only if it still belongs to `session_id`.
    pub fn deregister(&self, device_id: &str, session_id: u64) {
        let mut shard = self.shard(device_id).lock().unwrap();
        if shard.get(device_id).map(|h| h.session_id) == Some(session_id) {
            shard.remove(device_id);
        }
    }

    pub fn get(&self, device_id: &str) -> Option<SessionHandle> {
        self.shard(device_id)
            .lock()
            .unwrap()
            .get(device_id)
            .cloned()
    }

    /// The handle of the session `session_id`, if it is still the device's current one.
    pub fn current(&self, device_id: &str, session_id: u64) -> Option<SessionHandle> {
        self.get(device_id).filter(|h| h.session_id == session_id)
    }

    /// Sends `event()` to every session that has room for it; returns how many got it.
    pub fn broadcast(&self, event: impl Fn() -> SessionEvent) -> usize {
        let handles: Vec<SessionHandle> = self
            .shards
            .iter()
            .flat_map(|s| s.lock().unwrap().values().cloned().collect::<Vec<_>>())
            .collect();
        handles
            .iter()
            .filter(|h| h.events.try_send(event()).is_ok())
            .count()
    }

    pub fn is_online(&self, device_id: &str) -> bool {
        self.shard(device_id)
            .lock()
            .unwrap()
            .contains_key(device_id)
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn kick(&self, device_id: &str, reason: KickReason) -> bool {
        match self.get(device_id) {
            Some(h) => {
                h.kick(reason);
                true
            }
            None => false,
        }
    }
}
