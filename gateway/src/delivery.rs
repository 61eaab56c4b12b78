//! After a publish commits: hand each inbox entry to its live session, and settle its
//! push. The push is data (`store::push_due_at`): every entry that may need one is
//! stored with a due time, an ack cancels it, and this module is the one place that
//! decides what happens when it is due.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_protocol::PushPolicy;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::cluster::{ClusterBus, Reach};
use crate::metrics::Metrics;
use crate::push::dispatcher::PushDispatcher;
use crate::registry::{entry_weight, Offer, SessionProgress, SessionRegistry};
use crate::store::{InboxEntry, Store};

#[derive(Clone)]
pub struct DeliveryRouter {
    pub registry: Arc<SessionRegistry>,
    pub store: Arc<dyn Store>,
    pub push: PushDispatcher,
    pub metrics: Metrics,
    pub sent: SentRecorder,
    pub cluster: ClusterBus,
}

/// How the store is searched for due pushes.
#[derive(Debug, Clone)]
pub struct DuePolling {
    pub interval: Duration,
    /// A taken entry is found again after this long if its finder did not settle it
    /// (died, or could not reach the session that may have it): the ack timeout, the
    /// fresh ack window a session gets when a due entry is offered to it.
    pub lease: Duration,
    /// A claim older than this belongs to a sender that died mid-request.
    pub stale_claim: Duration,
}

impl DeliveryRouter {
    /// Routes committed entries. Never blocks on a session: a full queue means the
    /// session is a slow consumer; it is closed and will catch up by replay.
    ///
    /// Pushes are only ever brought forward here, never decided against: an `always`
    /// entry and a `fallback` entry nobody took live are queued for push at once; one
    /// a session took keeps its due time, so if no ack comes by then it is pushed by
    /// whoever finds it due, even if this node dies first.
    pub fn route(&self, entries: Vec<InboxEntry>, committed_at: Instant) {
        let mut remote = Vec::new();
        for entry in entries {
            let live = self.registry.get(&entry.device_id).is_some_and(|handle| {
                let weight = entry_weight(&entry.message);
                handle.offer(entry.clone(), committed_at, weight, &self.metrics) == Offer::Taken
            });
            // Whatever the push policy, a device with no session here may have one on
            // another node: live delivery does not depend on the push.
            let elsewhere = !live && self.cluster.is_clustered();
            match entry.message.payload.push {
                PushPolicy::Always => {
                    if elsewhere {
                        remote.push(entry.clone());
                    }
                    self.push.enqueue(entry);
                }
                PushPolicy::Fallback if live => {}
                PushPolicy::Fallback if elsewhere => remote.push(entry),
                PushPolicy::Fallback => self.push.enqueue(entry),
                PushPolicy::Never if elsewhere => remote.push(entry),
                PushPolicy::Never => {}
            }
        }
        if !remote.is_empty() {
            let router = self.clone();
            tokio::spawn(async move {
                for (entry, reach) in router.cluster.deliver_remote(remote, false).await {
                    // Only a `fallback` entry is pushed for want of a session: `always`
                    // was queued above, `never` never is.
                    if reach == Reach::Offline && entry.message.payload.push == PushPolicy::Fallback
                    {
                        router.push.enqueue(entry);
                    }
                }
            });
        }
    }

    /// Settles entries whose push is due (taken from the store by the poller): a
    /// `fallback` entry not yet attempted goes first to a live session that never had
    /// it (this node's, or another's over the bus) and is pushed otherwise; retries and
    /// `always` entries are pushed. The store's claim stays the one arbiter: whatever
    /// happens here, a push goes out at most once and never after an ack.
    pub async fn settle_due(&self, entries: Vec<InboxEntry>) {
        let mut remote = Vec::new();
        for entry in entries {
            if entry.message.payload.push != PushPolicy::Fallback || entry.push_attempts > 0 {
                self.push.enqueue(entry);
                continue;
            }
            match self.registry.get(&entry.device_id) {
                // Taken: the session gets one ack timeout from now (the take moved the
                // due time by the lease).
                Some(handle) => match handle.offer_due(entry.clone(), &self.metrics) {
                    Offer::Taken => self.metrics.due_offered_live.inc(),
                    Offer::Full | Offer::Gone | Offer::Overdue => self.push.enqueue(entry),
                },
                None if self.cluster.is_clustered() => remote.push(entry),
                None => self.push.enqueue(entry),
            }
        }
        for (entry, reach) in self.cluster.deliver_remote(remote, true).await {
            match reach {
                Reach::Live => self.metrics.due_offered_live.inc(),
                Reach::Offline => self.push.enqueue(entry),
                // Some node may have the device; it is found again when the lease
                // ends, by any node.
                Reach::Unknown => {}
            }
        }
    }

    /// Polls the store for due pushes and settles them, and records claims orphaned by
    /// a sender that died.
    pub fn spawn_due_poller(&self, polling: DuePolling, shutdown: CancellationToken) {
        let router = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(polling.interval);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                router.poll_due_once(&polling).await;
            }
        });
    }

    async fn poll_due_once(&self, polling: &DuePolling) {
        let now = now_ms();
        let stale_before = now - polling.stale_claim.as_millis() as i64;
        match self.store.fail_orphaned_pushes(stale_before, now).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                pushes = n,
                "pushes claimed by a sender that stopped mid-request are recorded as failed (outcome unknown), not sent twice"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot settle orphaned pushes"),
        }
        // Only take what the push queue has room for.
        let room = self.push.room();
        if room == 0 {
            return;
        }
        // A node cut off the bus cannot ask whether a session elsewhere would take an
        // entry; it leaves due entries to the nodes that can.
        if self.cluster.health().is_err() {
            return;
        }
        let lease_until = now + polling.lease.as_millis() as i64;
        match self
            .store
            .take_due_pushes(now, lease_until, room.min(1024) as u32)
            .await
        {
            Ok(due) if !due.is_empty() => self.settle_due(due).await,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read due pushes"),
        }
    }
}

/// How long a sent mark waits before it is written, at least (and at most twice
/// this): long enough for the usual ack to come first, since an ack from the session
/// that wrote the entries records them as sent in its own store write
/// (`Store::ack(.., wrote_live)`), and the mark is then dropped unwritten.
pub const SENT_MARK_DELAY: Duration = Duration::from_millis(100);

/// Most marks held back at once; beyond this they are written without waiting.
const MAX_HELD_MARKS: usize = 65_536;

/// One "written to a live session" mark: entries `from..=to` of a device, and the
/// writing session's progress when it acks over the same connection.
type SentMark = (String, i64, i64, Option<Arc<SessionProgress>>);

/// Coalesces "written to a live session" marks into few store writes, so live
/// delivery does not pay one database write per message: a mark waits
/// `SENT_MARK_DELAY`, is dropped if its session's ack has recorded it meanwhile, and
/// the rest are merged per device into one range each.
#[derive(Clone)]
pub struct SentRecorder {
    tx: mpsc::Sender<SentMark>,
}

impl SentRecorder {
    pub fn start(store: Arc<dyn Store>) -> SentRecorder {
        let (tx, mut rx) = mpsc::channel::<SentMark>(MAX_HELD_MARKS);
        tokio::spawn(async move {
            // `waiting` has waited at least one tick; `young` arrived since the last.
            let (mut young, mut waiting) = (Vec::new(), Vec::new());
            let mut tick = tokio::time::interval(SENT_MARK_DELAY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    n = rx.recv_many(&mut young, 4096) => {
                        if n == 0 {
                            waiting.append(&mut young);
                            write_sent_marks(&*store, &mut waiting).await;
                            return;
                        }
                        if young.len() + waiting.len() < MAX_HELD_MARKS {
                            continue;
                        }
                        waiting.append(&mut young);
                    }
                    _ = tick.tick() => {}
                }
                write_sent_marks(&*store, &mut waiting).await;
                std::mem::swap(&mut young, &mut waiting);
            }
        });
        SentRecorder { tx }
    }

    /// Best effort: `sent_at` is informational (the ack is what counts), so under
    /// extreme load a mark is dropped rather than queued without bound. `acks` is the
    /// writing session's progress if its acks record what they cover as sent.
    pub fn record(&self, device_id: &str, from: i64, to: i64, acks: Option<Arc<SessionProgress>>) {
        let _ = self.tx.try_send((device_id.to_owned(), from, to, acks));
    }
}

/// Writes what is left of `marks` once acks are taken off, one range per run of a
/// device's consecutive entries, and empties it.
async fn write_sent_marks(store: &dyn Store, marks: &mut Vec<SentMark>) {
    let ranges = unacked_ranges(marks);
    marks.clear();
    if ranges.is_empty() {
        return;
    }
    if let Err(e) = store.mark_sent(&ranges, now_ms()).await {
        tracing::warn!(error = %e, "cannot record sent marks");
    }
}

/// The parts of `marks` their sessions have not acked, merged per device into
/// disjoint ranges (two sessions of one device, an old and its replacement, may mark
/// overlapping or out-of-order ranges).
fn unacked_ranges(marks: &mut [SentMark]) -> Vec<(String, i64, i64)> {
    let mut left: Vec<(String, i64, i64)> = marks
        .iter_mut()
        .filter_map(|(device_id, from, to, acks)| {
            let from = match acks {
                Some(p) => (*from).max(p.acked_through() + 1),
                None => *from,
            };
            (from <= *to).then(|| (std::mem::take(device_id), from, *to))
        })
        .collect();
    left.sort_unstable_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut out: Vec<(String, i64, i64)> = Vec::with_capacity(left.len());
    for (device_id, from, to) in left {
        match out.last_mut() {
            Some(last) if last.0 == device_id && last.2 + 1 >= from => last.2 = last.2.max(to),
            _ => out.push((device_id, from, to)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acked_through(seq: i64) -> Option<Arc<SessionProgress>> {
        let p = Arc::new(SessionProgress::default());
        p.acked(seq);
        Some(p)
    }

    #[test]
    fn marks_lose_what_their_session_acked_and_merge_per_device() {
        let a = acked_through(3);
        let mut marks: Vec<SentMark> = vec![
            ("a".into(), 1, 1, a.clone()),
            ("b".into(), 1, 1, None),
            ("a".into(), 2, 2, a.clone()),
            ("b".into(), 2, 4, None),
            ("a".into(), 3, 5, a.clone()),
            ("a".into(), 6, 6, a.clone()),
            // Not adjacent: a separate range.
            ("b".into(), 9, 9, None),
            // Wholly acked by its session.
            ("c".into(), 1, 2, acked_through(2)),
            // A replaced session (acked through 6) and its successor (nothing acked
            // yet) marked overlapping ranges, the later one lower.
            ("d".into(), 5, 8, acked_through(6)),
            ("d".into(), 6, 6, None),
            ("d".into(), 3, 4, None),
        ];
        assert_eq!(
            unacked_ranges(&mut marks),
            [
                ("a".to_owned(), 4, 6),
                ("b".to_owned(), 1, 4),
                ("b".to_owned(), 9, 9),
                ("d".to_owned(), 3, 4),
                ("d".to_owned(), 6, 8)
            ]
        );
    }
}
