//! Sends pending pushes with a bounded pool of workers and records every outcome.
//!
//! The queue is the store: an entry needing a push is marked `pending` in the same
//! transaction that creates it (or on ack timeout), so a push survives a crash. The
//! in-memory channel is only a fast path; when it is full, or after a restart, the
//! poller finds due pushes in the store. `Store::claim_push` makes each push happen at
//! most once and never after an ack; retries are rescheduled in the store with
//! exponential backoff (or the provider's Retry-After), not held in memory.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use herald_protocol::{PushProviderKind, PushTokenState};
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

use super::{PushOutcome, PushProvider, PushRequest};
use crate::clock::now_ms;
use crate::metrics::Metrics;
use crate::store::{InboxEntry, PushMark, Store};

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
    /// A claim older than this is taken over (its worker died).
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

/// Fresh pending pushes were queued by their publisher; the poller leaves them this
/// long before treating them as missed.
const FRESH_GRACE_MS: i64 = 2_000;

#[derive(Clone)]
pub struct PushDispatcher {
    queue: mpsc::Sender<InboxEntry>,
    store: Arc<dyn Store>,
    metrics: Metrics,
}

struct Worker {
    store: Arc<dyn Store>,
    providers: HashMap<PushProviderKind, Arc<dyn PushProvider>>,
    metrics: Metrics,
    settings: Arc<PushSettings>,
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
        let rx = Arc::new(Mutex::new(rx));
        let settings = Arc::new(settings);
        let providers: HashMap<_, _> = providers.into_iter().map(|p| (p.kind(), p)).collect();
        for _ in 0..settings.workers.max(1) {
            let worker = Worker {
                store: store.clone(),
                providers: providers.clone(),
                metrics: metrics.clone(),
                settings: settings.clone(),
            };
            let (rx, shutdown) = (rx.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    let next = tokio::select! {
                        e = async { rx.lock().await.recv().await } => e,
                        _ = shutdown.cancelled() => None,
                    };
                    let Some(entry) = next else { break };
                    worker.metrics.push_queue_depth.dec();
                    worker.push(entry).await;
                }
            });
        }
        let dispatcher = PushDispatcher {
            queue: tx,
            store: store.clone(),
            metrics,
        };
        tokio::spawn(poll_due(dispatcher.clone(), settings, shutdown));
        dispatcher
    }

    /// Queues a pending push; never blocks. When the queue is full the push stays
    /// pending in the store and the poller sends it later.
    pub fn enqueue(&self, entry: InboxEntry) {
        if self.queue.try_send(entry).is_ok() {
            self.metrics.push_queue_depth.inc();
        }
    }

    /// Marks entries that had no push as pending (ack timeout, session lost) and
    /// queues them.
    pub fn request(&self, entries: Vec<InboxEntry>) {
        if entries.is_empty() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            for entry in entries {
                match this
                    .store
                    .request_push(&entry.device_id, entry.seq, now_ms())
                    .await
                {
                    Ok(true) => this.enqueue(entry),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot request push"),
                }
            }
        });
    }
}

async fn poll_due(
    dispatcher: PushDispatcher,
    settings: Arc<PushSettings>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(settings.poll_interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        // Only look when the fast path has room; otherwise the queue is busy anyway.
        let room = dispatcher.queue.capacity();
        if room == 0 {
            continue;
        }
        let now = now_ms();
        let stale_before = now - settings.stale_claim.as_millis() as i64;
        match dispatcher
            .store
            .due_pushes(now, FRESH_GRACE_MS, stale_before, room.min(1024) as u32)
            .await
        {
            Ok(due) => {
                for entry in due {
                    dispatcher.enqueue(entry);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read due pushes"),
        }
    }
}

enum Attempt {
    Done(PushMark, Option<PushProviderKind>, Option<String>),
    Retry(Option<PushProviderKind>, String, Option<Duration>),
}

impl Worker {
    async fn push(&self, entry: InboxEntry) {
        let now = now_ms();
        match self
            .store
            .claim_push(&entry.device_id, entry.seq, now)
            .await
        {
            Ok(true) => {}
            Ok(false) => return, // acked, expired, or another worker has it
            Err(e) => {
                tracing::warn!(error = %e, device = %entry.device_id, "cannot claim push");
                return;
            }
        }
        let result = match self.attempt(&entry).await {
            Attempt::Retry(kind, reason, retry_after) => {
                let attempts = entry.push_attempts + 1;
                if attempts >= self.settings.max_attempts {
                    Attempt::Done(
                        PushMark::Failed,
                        kind,
                        Some(format!("gave up after {attempts} attempts: {reason}")),
                    )
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
                    let due = now_ms() + wait.as_millis() as i64;
                    if let Err(e) = self
                        .store
                        .retry_push(&entry.device_id, entry.seq, due, &reason)
                        .await
                    {
                        tracing::warn!(error = %e, "cannot reschedule push");
                    }
                    return;
                }
            }
            done => done,
        };
        let Attempt::Done(mark, provider, reason) = result else {
            return;
        };
        if let Err(e) = self
            .store
            .finish_push(
                &entry.device_id,
                entry.seq,
                mark,
                provider.map(|p| p.as_str()),
                reason.as_deref(),
                now_ms(),
            )
            .await
        {
            tracing::warn!(error = %e, device = %entry.device_id, "cannot record push outcome");
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
        let m = &entry.message;
        let req = PushRequest {
            device_id: entry.device_id.clone(),
            seq: entry.seq,
            message_id: m.id.clone(),
            provider: kind,
            token: token.clone(),
            apns_environment: device.apns_environment,
            data: m.payload.data.clone(),
            notification: m.payload.notification.clone(),
            priority: m.payload.priority,
            collapse_key: m.payload.collapse_key.clone(),
            push_content: m.payload.push_content,
            expires_at: m.expires_at / 1000,
        };
        let outcome = provider.send(&req).await;
        self.count(kind.as_str(), outcome.label());
        match outcome {
            PushOutcome::Delivered => Attempt::Done(PushMark::Pushed, Some(kind), None),
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
