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
use crate::registry::{entry_weight, Offer, SessionRegistry};
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

/// Coalesces "written to a live session" marks into few store writes, so live
/// delivery does not pay one database write per message.
#[derive(Clone)]
pub struct SentRecorder {
    tx: mpsc::Sender<(String, i64, i64)>,
}

impl SentRecorder {
    pub fn start(store: Arc<dyn Store>) -> SentRecorder {
        let (tx, mut rx) = mpsc::channel::<(String, i64, i64)>(65_536);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(1024);
            while rx.recv_many(&mut batch, 1024).await > 0 {
                if let Err(e) = store.mark_sent(&batch, now_ms()).await {
                    tracing::warn!(error = %e, "cannot record sent marks");
                }
                batch.clear();
                // Let marks accumulate a little between writes under load.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        SentRecorder { tx }
    }

    /// Best effort: `sent_at` is informational (the ack is what counts), so under
    /// extreme load a mark is dropped rather than queued without bound.
    pub fn record(&self, device_id: &str, from: i64, to: i64) {
        let _ = self.tx.try_send((device_id.to_owned(), from, to));
    }
}
