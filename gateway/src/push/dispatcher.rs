//! Sends pending pushes with a bounded pool of workers and records every outcome.
//!
//! The queue is the store: an entry that may need a push gets its due time in the
//! transaction that creates it (`store::push_due_at`), so a push survives a crash. The
//! in-memory channel is only a fast path; when it is full, or after a restart, the due
//! poller (`DeliveryRouter`) finds due pushes in the store. `Store::claim_push` makes
//! each push happen at most once and never after an ack; retries are rescheduled in the
//! store with exponential backoff (or the provider's Retry-After), not held in memory.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_protocol::{PushProviderKind, PushTokenState};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{PushOutcome, PushProvider, PushRequest};
use crate::clock::now_ms;
use crate::metrics::Metrics;
use crate::store::{InboxEntry, PushAction, PushMark, PushResult, Store};

#[derive(Debug, Clone)]
pub struct PushSettings {
    pub workers: usize,
    pub queue: usize,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Attempts per push before it is recorded as `push_failed`.
    pub max_attempts: u32,
    /// How often the store is searched for due and orphaned pushes.
    pub poll_interval: Duration,
    /// A claim older than this belongs to a sender that died mid-request: recorded as
    /// failed (outcome unknown), never re-sent. Far above any provider timeout.
    pub stale_claim: Duration,
}

impl Default for PushSettings {
    fn default() -> Self {
        PushSettings {
            workers: 64,
            queue: 65_536,
            base_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            max_attempts: 5,
            poll_interval: Duration::from_millis(500),
            stale_claim: Duration::from_secs(60),
        }
    }
}

#[derive(Clone)]
pub struct PushDispatcher {
    /// Each push with the instant it became due here (for `push_queue_lag_seconds`).
    queue: mpsc::Sender<(InboxEntry, Instant)>,
    metrics: Metrics,
    pub health: PushHealth,
}

/// The last credential problem per provider, cleared by the next accepted push, so
/// `/readyz` can say loudly that pushes are being refused.
#[derive(Clone, Default)]
pub struct PushHealth(Arc<std::sync::Mutex<HashMap<PushProviderKind, String>>>);

impl PushHealth {
    fn set(&self, kind: PushProviderKind, problem: Option<String>) {
        let mut map = self.0.lock().unwrap();
        match problem {
            Some(p) => {
                map.insert(kind, p);
            }
            None => {
                map.remove(&kind);
            }
        }
    }

    /// (provider, problem) for every provider whose credentials were last refused.
    pub fn problems(&self) -> Vec<(PushProviderKind, String)> {
        let mut v: Vec<_> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(k, p)| (*k, p.clone()))
            .collect();
        v.sort_by_key(|(k, _)| k.as_str());
        v
    }
}

struct Worker {
    store: Arc<dyn Store>,
    providers: HashMap<PushProviderKind, Arc<dyn PushProvider>>,
    metrics: Metrics,
    settings: Arc<PushSettings>,
    health: PushHealth,
}

impl PushDispatcher {
    pub fn start(
        store: Arc<dyn Store>,
        providers: Vec<Arc<dyn PushProvider>>,
        metrics: Metrics,
        settings: PushSettings,
        shutdown: CancellationToken,
    ) -> PushDispatcher {
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let settings = Arc::new(settings);
        let providers: HashMap<_, _> = providers.into_iter().map(|p| (p.kind(), p)).collect();
        let health = PushHealth::default();
        let worker = Arc::new(Worker {
            store: store.clone(),
            providers,
            metrics: metrics.clone(),
            settings: settings.clone(),
            health: health.clone(),
        });
        let (results_tx, results_rx) = mpsc::channel(settings.queue.max(1));
        tokio::spawn(claim_and_send(rx, worker, results_tx, shutdown.clone()));
        tokio::spawn(record_results(store.clone(), results_rx));
        PushDispatcher {
            queue: tx,
            metrics,
            health,
        }
    }

    /// Queues a pending push; never blocks. When the queue is full the push stays
    /// pending in the store and the poller sends it later.
    pub fn enqueue(&self, entry: InboxEntry) {
        if self.queue.try_send((entry, Instant::now())).is_ok() {
            self.metrics.push_queue_depth.inc();
        }
    }

    /// Free slots of the in-memory queue (the due poller takes no more than this).
    pub fn room(&self) -> usize {
        self.queue.capacity()
    }
}

/// Claims queued pushes in batches (one store transaction per batch) and sends each
/// claimed one on its own task, at most `workers` at a time.
async fn claim_and_send(
    mut queue: mpsc::Receiver<(InboxEntry, Instant)>,
    worker: Arc<Worker>,
    results: mpsc::Sender<PushResult>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(worker.settings.workers.max(1)));
    let mut batch = Vec::with_capacity(CLAIM_BATCH);
    loop {
        let n = tokio::select! {
            n = queue.recv_many(&mut batch, CLAIM_BATCH) => n,
            _ = shutdown.cancelled() => 0,
        };
        if n == 0 {
            return;
        }
        worker.metrics.push_queue_depth.sub(n as i64);
        let claiming = Instant::now();
        for (_, due) in &batch {
            worker
                .metrics
                .push_queue_lag
                .observe(claiming.duration_since(*due).as_secs_f64());
        }
        let keys: Vec<(String, i64)> = batch
            .iter()
            .map(|(e, _)| (e.device_id.clone(), e.seq))
            .collect();
        let claimed = match worker.store.claim_pushes(&keys, now_ms()).await {
            Ok(c) => c,
            Err(e) => {
                // Still pending in the store: the poller brings them back.
                tracing::warn!(error = %e, "cannot claim pushes");
                batch.clear();
                continue;
            }
        };
        for ((entry, _), won) in batch.drain(..).zip(claimed) {
            if !won {
                continue; // acked, expired, or another worker has it
            }
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("semaphore open"),
                _ = shutdown.cancelled() => return,
            };
            let (worker, results) = (worker.clone(), results.clone());
            tokio::spawn(async move {
                let result = worker.push(entry).await;
                drop(permit);
                let _ = results.send(result).await;
            });
        }
    }
}

/// Writes outcomes in batches: one transaction for everything that finished meanwhile.
async fn record_results(store: Arc<dyn Store>, mut results: mpsc::Receiver<PushResult>) {
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    while results.recv_many(&mut batch, RECORD_BATCH).await > 0 {
        if let Err(e) = store.record_push_results(&batch, now_ms()).await {
            // The claims go stale and are retried by the poller: at-least-once.
            tracing::warn!(error = %e, "cannot record push outcomes");
        }
        batch.clear();
    }
}

const CLAIM_BATCH: usize = 512;
const RECORD_BATCH: usize = 1024;

enum Attempt {
    Done(PushMark, Option<PushProviderKind>, Option<String>),
    Retry(Option<PushProviderKind>, String, Option<Duration>),
}

impl Worker {
    /// Sends one claimed push and decides what to record.
    async fn push(&self, entry: InboxEntry) -> PushResult {
        let action = match self.attempt(&entry).await {
            Attempt::Done(mark, provider, reason) => PushAction::Finish {
                mark,
                provider: provider.map(|p| p.as_str().to_owned()),
                reason,
            },
            Attempt::Retry(kind, reason, retry_after) => {
                let attempts = entry.push_attempts + 1;
                if attempts >= self.settings.max_attempts {
                    PushAction::Finish {
                        mark: PushMark::Failed,
                        provider: kind.map(|p| p.as_str().to_owned()),
                        reason: Some(format!("gave up after {attempts} attempts: {reason}")),
                    }
                } else {
                    let backoff = self
                        .settings
                        .base_backoff
                        .saturating_mul(1 << (attempts - 1).min(16))
                        .min(self.settings.max_backoff);
                    // The provider's Retry-After wins when it gives one (bounded, so a
                    // hostile value cannot park a push past any sensible TTL).
                    let wait = retry_after
                        .unwrap_or(backoff)
                        .min(self.settings.max_backoff * 10);
                    PushAction::Retry {
                        due_at: now_ms() + wait.as_millis() as i64,
                        reason,
                    }
                }
            }
        };
        let (outcome, provider, reason) = match &action {
            PushAction::Finish {
                mark,
                provider,
                reason,
            } => (
                if *mark == PushMark::Pushed {
                    "pushed"
                } else {
                    "failed"
                },
                provider.as_deref(),
                reason.as_deref(),
            ),
            PushAction::Retry { reason, .. } => ("retry", None, Some(reason.as_str())),
        };
        tracing::info!(
            device_id = %entry.device_id,
            seq = entry.seq,
            message_id = %entry.message.id,
            request_id = crate::request_id::field(&entry.message.id),
            outcome,
            provider = provider.unwrap_or(""),
            reason = reason.unwrap_or(""),
            attempt = entry.push_attempts + 1,
            "push"
        );
        PushResult {
            device_id: entry.device_id,
            seq: entry.seq,
            action,
        }
    }

    async fn attempt(&self, entry: &InboxEntry) -> Attempt {
        let device = match self.store.device(&entry.device_id).await {
            Ok(Some(d)) => d,
            Ok(None) => {
                return Attempt::Done(PushMark::Failed, None, Some("device deleted".into()))
            }
            Err(e) => return Attempt::Retry(None, format!("store error: {e}"), None),
        };
        let (Some(kind), Some(token)) = (device.push_provider, device.push_token.clone()) else {
            self.count("none", "no_token");
            return Attempt::Done(
                PushMark::Failed,
                None,
                Some("no push token registered".into()),
            );
        };
        if device.token_state == PushTokenState::Invalid {
            self.count(kind.as_str(), "token_invalid");
            return Attempt::Done(
                PushMark::Failed,
                Some(kind),
                Some(
                    "push token was invalidated by the provider; waiting for a new registration"
                        .into(),
                ),
            );
        }
        let Some(provider) = self.providers.get(&kind) else {
            self.count(kind.as_str(), "not_configured");
            return Attempt::Done(
                PushMark::Failed,
                Some(kind),
                Some(format!("push provider {} is not configured", kind.as_str())),
            );
        };
        let req = PushRequest::for_entry(entry, &device, kind, token.clone());
        let outcome = provider.send(&req).await;
        self.count(kind.as_str(), outcome.label());
        match outcome {
            PushOutcome::Delivered => {
                self.health.set(kind, None);
                Attempt::Done(PushMark::Pushed, Some(kind), None)
            }
            PushOutcome::InvalidToken { reason } => {
                if let Err(e) = self
                    .store
                    .invalidate_push_token(&entry.device_id, &token, &reason)
                    .await
                {
                    tracing::warn!(error = %e, "cannot invalidate push token");
                }
                Attempt::Done(PushMark::Failed, Some(kind), Some(reason))
            }
            PushOutcome::AuthError { reason } => {
                tracing::error!(provider = kind.as_str(), %reason, "push provider refused our credentials; fix the push configuration");
                self.health.set(
                    kind,
                    Some(format!(
                        "credentials refused at {}: {reason}",
                        crate::clock::rfc3339(now_ms())
                    )),
                );
                Attempt::Done(
                    PushMark::Failed,
                    Some(kind),
                    Some(format!("provider auth error: {reason}")),
                )
            }
            PushOutcome::Failed { reason } => {
                Attempt::Done(PushMark::Failed, Some(kind), Some(reason))
            }
            PushOutcome::Retry {
                reason,
                retry_after,
            } => Attempt::Retry(Some(kind), reason, retry_after),
        }
    }

    fn count(&self, provider: &str, outcome: &str) {
        self.metrics
            .pushes
            .with_label_values(&[provider, outcome])
            .inc();
    }
}
