//! Delivery webhooks (docs/webhooks.md): what happened to each inbox entry, POSTed to
//! the backend in signed batches.
//!
//! The queue is the store (`webhook_events`): an event is written in the transaction of
//! the state change that causes it, so it exists exactly when that change committed.
//! The [`WebhookDispatcher`] (one per node, only when `webhooks.url` is set) claims due
//! events with a lease, POSTs at most [`MAX_BATCH`] of them, and deletes them only after
//! a 2xx; otherwise they come due again after an exponential backoff with jitter, until
//! they are older than `max_age_hours` and are dropped (counted). Publish, ack and push
//! paths only ever insert rows; nothing on them waits for the receiver.

use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::clock::{now_ms, rfc3339};
use crate::metrics::Metrics;
use crate::store::Store;

/// Events per POST, at most.
pub const MAX_BATCH: usize = 100;

/// The event types, as named on the wire and in `webhooks.events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Delivered,
    Acked,
    Pushed,
    PushFailed,
    Expired,
    TokenInvalid,
}

impl EventType {
    pub const ALL: [EventType; 6] = [
        EventType::Delivered,
        EventType::Acked,
        EventType::Pushed,
        EventType::PushFailed,
        EventType::Expired,
        EventType::TokenInvalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Delivered => "delivered",
            EventType::Acked => "acked",
            EventType::Pushed => "pushed",
            EventType::PushFailed => "push_failed",
            EventType::Expired => "expired",
            EventType::TokenInvalid => "token_invalid",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|e| e.as_str() == s)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Which event types the store records: empty when webhooks are off, so nothing is
/// queued that nobody would send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventSet(u8);

impl EventSet {
    pub const NONE: EventSet = EventSet(0);

    pub fn all() -> EventSet {
        EventSet::from_iter(EventType::ALL)
    }

    pub fn contains(self, e: EventType) -> bool {
        self.0 & e.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl FromIterator<EventType> for EventSet {
    fn from_iter<I: IntoIterator<Item = EventType>>(iter: I) -> Self {
        EventSet(iter.into_iter().fold(0, |acc, e| acc | e.bit()))
    }
}

/// `[webhooks]` (env `HERALD_WEBHOOKS__*`). Off while `url` is unset.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Where batches are POSTed (`HERALD_WEBHOOKS__URL`); unset = webhooks off and no
    /// event is queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// HMAC-SHA256 key of the `Herald-Signature` header (`HERALD_WEBHOOKS__SECRET`);
    /// required when `url` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Event types to send (`HERALD_WEBHOOKS__EVENTS`, comma-separated in the env).
    /// Default: all of `delivered`, `acked`, `pushed`, `push_failed`, `expired`,
    /// `token_invalid`.
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub events: Vec<String>,
    /// Longest wait after the first event of a batch is queued before it is POSTed
    /// (a batch also goes out as soon as it holds 100 events).
    pub batch_delay_ms: u64,
    /// Timeout of one POST; a POST that times out is retried like a non-2xx.
    pub timeout_ms: u64,
    /// First retry delay of a failed batch; doubles per attempt (with jitter) up to
    /// `max_backoff_ms`.
    pub base_backoff_ms: u64,
    /// Longest wait between two attempts of one batch.
    pub max_backoff_ms: u64,
    /// Events still undelivered this long after they were queued are dropped (and
    /// counted in `herald_webhook_posts_total{result="dropped"}`).
    pub max_age_hours: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            url: None,
            secret: None,
            events: EventType::ALL
                .iter()
                .map(|e| e.as_str().to_owned())
                .collect(),
            batch_delay_ms: 1_000,
            timeout_ms: 10_000,
            base_backoff_ms: 1_000,
            max_backoff_ms: 300_000,
            max_age_hours: 72,
        }
    }
}

impl WebhooksConfig {
    /// The event types to queue: none while `url` is unset. Errors name the bad
    /// setting, so `herald serve` refuses to start on them.
    pub fn validate(&self) -> anyhow::Result<EventSet> {
        let mut set = Vec::new();
        for name in &self.events {
            let name = name.trim();
            match EventType::parse(name) {
                Some(e) => set.push(e),
                None => anyhow::bail!(
                    "webhooks.events: unknown event {name:?}; use any of delivered, acked, pushed, push_failed, expired, token_invalid"
                ),
            }
        }
        let Some(url) = &self.url else {
            return Ok(EventSet::NONE);
        };
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| anyhow::anyhow!("webhooks.url {url:?} is not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            anyhow::bail!("webhooks.url {url:?}: use an http:// or https:// URL");
        }
        if self.secret.as_deref().unwrap_or("").is_empty() {
            anyhow::bail!(
                "webhooks.url is set but webhooks.secret is not (HERALD_WEBHOOKS__SECRET): every batch is signed with it"
            );
        }
        if set.is_empty() {
            anyhow::bail!("webhooks.events is empty; unset webhooks.url to turn webhooks off");
        }
        Ok(EventSet::from_iter(set))
    }
}

/// A TOML list, or one comma-separated string (how an env variable spells a list).
fn list_or_comma_separated<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(v) => v,
        Either::Text(t) => t
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

/// One queued event, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedEvent {
    /// The queue row (ordering, deletion); not sent.
    pub queue_id: i64,
    /// `evt_` + 32 hex digits, assigned when queued and sent unchanged on every retry.
    pub id: String,
    pub kind: String,
    pub message_id: Option<String>,
    pub device_id: String,
    pub user: Option<String>,
    pub seq: Option<i64>,
    pub provider: Option<String>,
    pub error: Option<String>,
    /// When it happened (unix ms).
    pub at: i64,
    pub queued_at: i64,
    pub attempts: u32,
}

/// One event on the wire.
#[derive(Debug, Serialize)]
struct WireEvent<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    at: String,
    message_id: Option<&'a str>,
    device_id: &'a str,
    user: Option<&'a str>,
    seq: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// The POST body: `{"events":[…]}`.
pub fn render_batch(events: &[QueuedEvent]) -> String {
    #[derive(Serialize)]
    struct Body<'a> {
        events: Vec<WireEvent<'a>>,
    }
    let body = Body {
        events: events
            .iter()
            .map(|e| WireEvent {
                id: &e.id,
                kind: &e.kind,
                at: rfc3339(e.at),
                message_id: e.message_id.as_deref(),
                device_id: &e.device_id,
                user: e.user.as_deref(),
                seq: e.seq,
                provider: e.provider.as_deref(),
                error: e.error.as_deref(),
            })
            .collect(),
    };
    serde_json::to_string(&body).expect("events serialize")
}

/// `Herald-Signature`: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &str, unix_seconds: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(unix_seconds.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!(
        "t={unix_seconds},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// Delay before attempt `attempts + 1` of a failed event: `base * 2^attempts`, capped,
/// then a random point in its upper half (so nodes and batches that failed together
/// do not retry together).
pub fn backoff(base: Duration, max: Duration, attempts: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempts.min(20)).min(max);
    let half = exp / 2;
    half + rand::thread_rng().gen_range(Duration::ZERO..=half)
}

#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub url: String,
    pub secret: String,
    pub batch_delay: Duration,
    pub timeout: Duration,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    pub max_age: Duration,
    /// How often the store is looked at for due events.
    pub poll_interval: Duration,
}

impl WebhookSettings {
    /// `None` when webhooks are off.
    pub fn from_config(c: &WebhooksConfig) -> Option<WebhookSettings> {
        Some(WebhookSettings {
            url: c.url.clone()?,
            secret: c.secret.clone().unwrap_or_default(),
            batch_delay: Duration::from_millis(c.batch_delay_ms),
            timeout: Duration::from_millis(c.timeout_ms.max(1)),
            base_backoff: Duration::from_millis(c.base_backoff_ms.max(1)),
            max_backoff: Duration::from_millis(c.max_backoff_ms.max(c.base_backoff_ms).max(1)),
            max_age: Duration::from_secs(c.max_age_hours.saturating_mul(3600)),
            poll_interval: Duration::from_millis(c.batch_delay_ms.clamp(10, 100)),
        })
    }
}

/// Posts queued events until shutdown. One batch at a time per node; nodes sharing a
/// PostgreSQL store never post the same event at once (claims are leases).
pub struct WebhookDispatcher {
    store: std::sync::Arc<dyn Store>,
    settings: WebhookSettings,
    metrics: Metrics,
    client: reqwest::Client,
}

impl WebhookDispatcher {
    pub fn spawn(
        store: std::sync::Arc<dyn Store>,
        settings: WebhookSettings,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let d = WebhookDispatcher {
            store,
            settings,
            metrics,
            client,
        };
        tokio::spawn(async move { d.run(shutdown).await });
        Ok(())
    }

    async fn run(self, shutdown: CancellationToken) {
        let mut last_stats = 0i64;
        loop {
            let now = now_ms();
            if now - last_stats >= 1_000 {
                last_stats = now;
                self.update_gauges(now).await;
            }
            let posted = tokio::select! {
                r = self.step(now) => r,
                _ = shutdown.cancelled() => return,
            };
            match posted {
                // A full batch went out: more may be waiting.
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "webhook dispatcher: store failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn update_gauges(&self, now: i64) {
        match self.store.webhook_queue_stats().await {
            Ok((depth, oldest)) => {
                self.metrics.webhook_queue_depth.set(depth as i64);
                let lag = oldest.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0);
                self.metrics.webhook_queue_lag.set(lag);
            }
            Err(e) => tracing::warn!(error = %e, "webhook queue stats failed"),
        }
    }

    /// Posts one batch if one is ready; `Ok(true)` if a full batch was posted.
    async fn step(&self, now: i64) -> crate::store::StoreResult<bool> {
        let s = &self.settings;
        let (due, oldest) = self.store.webhook_due(now, MAX_BATCH as u32).await?;
        let Some(oldest) = oldest else {
            return Ok(false);
        };
        // Polled every `poll_interval`: post one poll early rather than one poll late,
        // so no event waits longer than `batch_delay` for its batch.
        let ready_at = oldest + s.batch_delay.saturating_sub(s.poll_interval).as_millis() as i64;
        if (due as usize) < MAX_BATCH && now < ready_at {
            return Ok(false);
        }
        // The lease outlives the POST's timeout, so no other node takes these events
        // while this one may still deliver them.
        let lease_until = now + s.timeout.as_millis() as i64 + 5_000;
        let events = self
            .store
            .webhook_claim(now, lease_until, MAX_BATCH as u32)
            .await?;
        if events.is_empty() {
            return Ok(false);
        }
        let full = events.len() == MAX_BATCH;
        let body = render_batch(&events);
        let sig = signature(&s.secret, now_ms() / 1000, &body);
        let sent = self
            .client
            .post(&s.url)
            .header("content-type", "application/json")
            .header("Herald-Signature", sig)
            .body(body)
            .send()
            .await;
        let failure = match sent {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("receiver answered {}", r.status())),
            Err(e) => Some(format!("POST failed: {e}")),
        };
        let ids: Vec<i64> = events.iter().map(|e| e.queue_id).collect();
        let Some(failure) = failure else {
            self.store.webhook_delete(&ids).await?;
            self.metrics.webhook_posts.with_label_values(&["ok"]).inc();
            return Ok(full);
        };
        let now = now_ms();
        let too_old = now - s.max_age.as_millis() as i64;
        let (dropped, retried): (Vec<&QueuedEvent>, Vec<&QueuedEvent>) =
            events.iter().partition(|e| e.queued_at < too_old);
        let retries: Vec<(i64, i64)> = retried
            .iter()
            .map(|e| {
                let wait = backoff(s.base_backoff, s.max_backoff, e.attempts);
                (e.queue_id, now + wait.as_millis() as i64)
            })
            .collect();
        self.store.webhook_retry(&retries).await?;
        if dropped.is_empty() {
            tracing::warn!(events = events.len(), reason = %failure, "webhook batch not delivered; retrying");
            self.metrics
                .webhook_posts
                .with_label_values(&["retry"])
                .inc();
        } else {
            let ids: Vec<i64> = dropped.iter().map(|e| e.queue_id).collect();
            self.store.webhook_delete(&ids).await?;
            tracing::error!(
                dropped = ids.len(),
                retried = retries.len(),
                reason = %failure,
                "webhook events older than webhooks.max_age_hours dropped undelivered"
            );
            self.metrics
                .webhook_posts
                .with_label_values(&["dropped"])
                .inc();
            self.metrics.webhook_events_dropped.inc_by(ids.len() as u64);
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_t_dot_body() {
        // Computed independently: python3 -c 'import hmac,hashlib;
        // print(hmac.new(b"key", b"1700000000.{}", hashlib.sha256).hexdigest())'
        assert_eq!(
            signature("key", 1_700_000_000, "{}"),
            "t=1700000000,v1=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
    }

    #[test]
    fn unknown_event_is_refused_by_name() {
        let c = WebhooksConfig {
            events: vec!["delivered".into(), "read".into()],
            ..Default::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("\"read\""), "{err}");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        let b0 = backoff(base, max, 0);
        assert!(b0 >= Duration::from_millis(50) && b0 <= base, "{b0:?}");
        let b10 = backoff(base, max, 10);
        assert!(b10 >= max / 2 && b10 <= max, "{b10:?}");
    }
}
