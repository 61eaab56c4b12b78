//! Decides nothing about *whether* to push (the router does); sends pushes with a
//! bounded pool of workers, retries transient failures, and records every outcome.

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

/// Attempts per push before it is recorded as failed.
const MAX_ATTEMPTS: u32 = 5;

#[derive(Clone)]
pub struct PushDispatcher {
    queue: mpsc::Sender<InboxEntry>,
    metrics: Metrics,
}

pub struct PushSettings {
    pub workers: usize,
    pub queue: usize,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for PushSettings {
    fn default() -> Self {
        PushSettings {
            workers: 32,
            queue: 100_000,
            base_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
        }
    }
}

struct Worker {
    store: Arc<dyn Store>,
    providers: HashMap<PushProviderKind, Arc<dyn PushProvider>>,
    metrics: Metrics,
    settings: Arc<PushSettings>,
    shutdown: CancellationToken,
}

impl PushDispatcher {
    pub fn start(
        store: Arc<dyn Store>,
        providers: Vec<Arc<dyn PushProvider>>,
        metrics: Metrics,
        settings: PushSettings,
        shutdown: CancellationToken,
    ) -> PushDispatcher {
        let (tx, rx) = mpsc::channel(settings.queue);
        let rx = Arc::new(Mutex::new(rx));
        let settings = Arc::new(settings);
        let providers: HashMap<_, _> = providers.into_iter().map(|p| (p.kind(), p)).collect();
        for _ in 0..settings.workers {
            let worker = Worker {
                store: store.clone(),
                providers: providers.clone(),
                metrics: metrics.clone(),
                settings: settings.clone(),
                shutdown: shutdown.clone(),
            };
            let rx = rx.clone();
            tokio::spawn(async move {
                loop {
                    let next = tokio::select! {
                        e = async { rx.lock().await.recv().await } => e,
                        _ = worker.shutdown.cancelled() => None,
                    };
                    let Some(entry) = next else { break };
                    worker.metrics.push_queue_depth.dec();
                    worker.push(entry).await;
                }
            });
        }
        PushDispatcher { queue: tx, metrics }
    }

    /// Queues a push of `entry`; never blocks the caller. When the queue is full the
    /// push is recorded as failed rather than held in unbounded memory.
    pub fn enqueue(&self, store: &Arc<dyn Store>, entry: InboxEntry) {
        match self.queue.try_send(entry) {
            Ok(()) => self.metrics.push_queue_depth.inc(),
            Err(e) => {
                let entry = e.into_inner();
                self.metrics
                    .pushes
                    .with_label_values(&["none", "queue_full"])
                    .inc();
                let store = store.clone();
                tokio::spawn(async move {
                    if let Ok(true) = store
                        .claim_push(&entry.device_id, entry.seq, now_ms())
                        .await
                    {
                        let _ = store
                            .finish_push(
                                &entry.device_id,
                                entry.seq,
                                PushMark::Failed,
                                None,
                                Some("push queue full"),
                                now_ms(),
                            )
                            .await;
                    }
                });
            }
        }
    }
}

impl Worker {
    async fn push(&self, entry: InboxEntry) {
        let now = now_ms();
        // The claim makes a push happen at most once per entry, and never after an ack.
        match self
            .store
            .claim_push(&entry.device_id, entry.seq, now)
            .await
        {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(error = %e, device = %entry.device_id, "cannot claim push");
                return;
            }
        }
        let (mark, provider, reason) = self.attempt(&entry).await;
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

    async fn attempt(
        &self,
        entry: &InboxEntry,
    ) -> (PushMark, Option<PushProviderKind>, Option<String>) {
        let device = match self.store.device(&entry.device_id).await {
            Ok(Some(d)) => d,
            Ok(None) => return (PushMark::Failed, None, Some("device deleted".into())),
            Err(e) => return (PushMark::Failed, None, Some(format!("store error: {e}"))),
        };
        let (Some(kind), Some(token)) = (device.push_provider, device.push_token.clone()) else {
            self.count("none", "no_token");
            return (
                PushMark::Failed,
                None,
                Some("no push token registered".into()),
            );
        };
        if device.token_state == PushTokenState::Invalid {
            self.count(kind.as_str(), "token_invalid");
            return (
                PushMark::Failed,
                Some(kind),
                Some("push token was invalidated by the provider".into()),
            );
        }
        let Some(provider) = self.providers.get(&kind) else {
            self.count(kind.as_str(), "not_configured");
            return (
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
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = provider.send(&req).await;
            self.count(kind.as_str(), outcome.label());
            match outcome {
                PushOutcome::Delivered => return (PushMark::Pushed, Some(kind), None),
                PushOutcome::InvalidToken { reason } => {
                    let _ = self
                        .store
                        .invalidate_push_token(&entry.device_id, &token, &reason)
                        .await;
                    return (PushMark::Failed, Some(kind), Some(reason));
                }
                PushOutcome::AuthError { reason } => {
                    tracing::error!(provider = kind.as_str(), %reason, "push provider refused our credentials");
                    return (
                        PushMark::Failed,
                        Some(kind),
                        Some(format!("provider auth error: {reason}")),
                    );
                }
                PushOutcome::Failed { reason } => {
                    return (PushMark::Failed, Some(kind), Some(reason))
                }
                PushOutcome::Retry {
                    reason,
                    retry_after,
                } => {
                    if attempt >= MAX_ATTEMPTS || now_ms() >= m.expires_at {
                        return (
                            PushMark::Failed,
                            Some(kind),
                            Some(format!("gave up after {attempt} attempts: {reason}")),
                        );
                    }
                    let backoff = self
                        .settings
                        .base_backoff
                        .saturating_mul(1 << (attempt - 1))
                        .min(self.settings.max_backoff);
                    let wait = retry_after
                        .unwrap_or(backoff)
                        .min(self.settings.max_backoff);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.shutdown.cancelled() => {
                            return (PushMark::Failed, Some(kind), Some(format!("shutdown during retry: {reason}")));
                        }
                    }
                }
            }
        }
    }

    fn count(&self, provider: &str, outcome: &str) {
        self.metrics
            .pushes
            .with_label_values(&[provider, outcome])
            .inc();
    }
}
