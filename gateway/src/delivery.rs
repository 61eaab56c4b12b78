//! After a publish commits: hand each inbox entry to its live session, or to push.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_protocol::PushPolicy;
use tokio::sync::mpsc;

use crate::clock::now_ms;
use crate::cluster::ClusterBus;
use crate::metrics::Metrics;
use crate::push::dispatcher::PushDispatcher;
use crate::registry::{Offer, SessionRegistry};
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

impl DeliveryRouter {
    /// Routes committed entries. Never blocks on a session: a full queue means the
    /// session is a slow consumer; it is closed and will catch up by replay.
    pub fn route(&self, entries: Vec<InboxEntry>, committed_at: Instant) {
        let mut missed = Vec::new();
        let mut remote = Vec::new();
        for entry in entries {
            let live = self.registry.get(&entry.device_id).is_some_and(|handle| {
                handle.offer(entry.clone(), committed_at, &self.metrics) == Offer::Taken
            });
            if !live && self.cluster.is_clustered() {
                // The publish transaction only knew this node's sessions, so the entry
                // may carry a fallback push that another node's session makes moot.
                remote.push(entry);
            } else if entry.push_pending {
                self.push.enqueue(entry);
            } else if !live && entry.message.payload.push == PushPolicy::Fallback {
                // Live when the transaction looked, gone now: fall back after all.
                missed.push(entry);
            }
        }
        self.push.request(missed);
        if !remote.is_empty() {
            let router = self.clone();
            tokio::spawn(async move { router.route_remote(remote).await });
        }
    }

    /// Offers entries to sessions on other nodes, then settles their pushes: one a
    /// session took needs no fallback push; one nobody took gets it.
    async fn route_remote(&self, entries: Vec<InboxEntry>) {
        let mut cancel = Vec::new();
        let mut missed = Vec::new();
        for (entry, live) in self.cluster.deliver_remote(entries).await {
            let fallback = entry.message.payload.push == PushPolicy::Fallback;
            match (live, entry.push_pending) {
                (true, true) if fallback => cancel.push((entry.device_id.clone(), entry.seq)),
                (_, true) => self.push.enqueue(entry),
                (false, false) if fallback => missed.push(entry),
                _ => {}
            }
        }
        if !cancel.is_empty() {
            // If this fails the push stays pending and is sent later: a notification
            // the device did not need, never a lost message.
            if let Err(e) = self.store.cancel_pushes(&cancel).await {
                tracing::warn!(error = %e, "cannot cancel fallback pushes of remotely delivered entries");
            }
        }
        self.push.request(missed);
    }

    /// Entries a session sent but that were not acked in time.
    pub fn ack_timed_out(&self, entries: Vec<InboxEntry>) {
        self.push.request(
            entries
                .into_iter()
                .filter(|e| e.message.payload.push == PushPolicy::Fallback)
                .collect(),
        );
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
