//! Durable state: API keys, devices, topics, messages and per-device inboxes.
//!
//! `Store` is the one seam between the delivery model and a database. Every method is
//! a complete, atomic unit: when `publish` returns `Ok`, the inbox entries are
//! committed and survive a crash. Implementations: `sqlite` (embedded default) and
//! `postgres` (shared by several gateway nodes).

/// Public so bench/'s SQLite micro-benchmark runs against the real schema.
pub mod migrations;
pub mod postgres;
mod postgres_group;
pub mod sqlite;
mod sqlite_hot;
pub mod timed;

use std::sync::Arc;

use async_trait::async_trait;
use std::sync::OnceLock;

use herald_protocol::{
    ApnsEnvironment, DeliveryRecord, DeliveryState, Notification, Platform, Priority, PushContent,
    PushPolicy, PushProviderKind, PushTokenState, RawJson, RegisterDeviceRequest, Target,
};
use serde::{Deserialize, Serialize};

use crate::clock::rfc3339;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("device {0} belongs to another user")]
    DeviceOwnedByOtherUser(String),
    #[error("{0}")]
    Conflict(String),
    /// A claim of a new device beyond the user's cap (`claim_device`'s `max_devices`).
    #[error("user {user} already has {count} devices, the maximum ({max})")]
    DeviceCapReached { user: String, count: u64, max: u64 },
    #[error("too many recipients: {0}")]
    TooManyRecipients(usize),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The body of a message as stored once and shared by all its inbox entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessagePayload {
    /// Verbatim as the backend sent it.
    pub data: RawJson,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification: Option<Notification>,
    pub push: PushPolicy,
    pub push_content: PushContent,
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collapse_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub id: String,
    pub target: Target,
    pub payload: MessagePayload,
    /// Unix milliseconds.
    pub created_at: i64,
    pub expires_at: i64,
    /// Everything of the wire form after `seq`, rendered once and shared by every
    /// device the message fans out to (see [`StoredMessage::wire_tail`]).
    pub wire_tail: OnceLock<Box<str>>,
}

impl StoredMessage {
    pub fn new(
        id: String,
        target: Target,
        payload: MessagePayload,
        created_at: i64,
        expires_at: i64,
    ) -> StoredMessage {
        StoredMessage {
            id,
            target,
            payload,
            created_at,
            expires_at,
            wire_tail: OnceLock::new(),
        }
    }

    /// `,"id":…,"data":…,"notification":…,"sent_at":…}`: the fields of a delivered
    /// message (`InboxMessage` in herald-protocol, same order) after its per-device
    /// `seq`. `data` is copied verbatim, never re-encoded.
    pub fn wire_tail(&self) -> &str {
        self.wire_tail.get_or_init(|| {
            let mut out = String::with_capacity(self.payload.data.get().len() + 96);
            out.push_str(",\"id\":");
            out.push_str(&json(&self.id));
            out.push_str(",\"data\":");
            out.push_str(self.payload.data.get());
            if let Some(n) = &self.payload.notification {
                out.push_str(",\"notification\":");
                out.push_str(&json(n));
            }
            out.push_str(",\"sent_at\":");
            out.push_str(&json(&rfc3339(self.created_at)));
            out.push('}');
            out.into_boxed_str()
        })
    }
}

/// Strings and notifications always serialize.
fn json<T: Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("wire fields serialize")
}

/// When an entry's push is due if nothing settles it first (unix ms): the one place
/// the push policy becomes data. `always`: at once. `fallback`: one ack timeout after
/// the commit, whether or not the device looks live right now; the router brings it
/// forward when it learns nobody is there, an ack before then cancels it, and
/// whoever finds it due first offers it to a live session before pushing
/// (`DeliveryRouter::settle_due`). `never`: no push.
pub fn push_due_at(policy: PushPolicy, created_at: i64, ack_timeout_ms: i64) -> Option<i64> {
    match policy {
        PushPolicy::Always => Some(created_at),
        PushPolicy::Fallback => Some(created_at + ack_timeout_ms),
        PushPolicy::Never => None,
    }
}

/// The setting holding the last `expires_at` (unix ms) the sweeper queued `expired`
/// webhook events up to.
pub const EXPIRED_THROUGH_KEY: &str = "webhooks.expired_through";

/// Recorded on a push whose sender stopped between claiming it and recording the
/// provider's answer.
pub const ORPHANED_PUSH_REASON: &str = "push outcome unknown: the node sending it stopped mid-request; not sent again (at most one push per message), the message stays in the inbox for the next sync";

/// A message to append to every inbox its target resolves to.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: String,
    pub api_key_id: String,
    pub target: Target,
    pub payload: MessagePayload,
    pub created_at: i64,
    pub expires_at: i64,
    pub idempotency_key: Option<String>,
    /// Idempotency keys older than this (unix ms) no longer match.
    pub idempotency_since: i64,
    pub max_recipients: usize,
    /// From [`push_due_at`]; `None` stores no push.
    pub push_due_at: Option<i64>,
}

/// One entry of one device's inbox.
#[derive(Debug, Clone)]
pub struct InboxEntry {
    pub device_id: String,
    pub seq: i64,
    pub message: Arc<StoredMessage>,
    /// A push is scheduled for this entry (it has a due time and is not settled).
    pub push_pending: bool,
    /// Push attempts made so far.
    pub push_attempts: u32,
}

impl InboxEntry {
    /// The WebSocket `msg` frame: `{"type":"msg","seq":…}` + the message's shared tail.
    pub fn msg_frame(&self) -> String {
        self.render(r#"{"type":"msg","seq":"#)
    }

    /// One item of `GET /v1/me/sync`'s `messages`.
    pub fn sync_item(&self) -> String {
        self.render(r#"{"seq":"#)
    }

    fn render(&self, head: &str) -> String {
        let tail = self.message.wire_tail();
        let mut out = String::with_capacity(head.len() + 20 + tail.len());
        out.push_str(head);
        out.push_str(&self.seq.to_string());
        out.push_str(tail);
        out
    }
}

#[derive(Debug, Clone)]
pub enum PublishOutcome {
    /// Committed: one entry per recipient device, in seq order per device.
    Created { entries: Vec<InboxEntry> },
    /// The idempotency key matched an earlier message; nothing was created.
    Duplicate { message_id: String, recipients: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: String,
    pub user_id: String,
    pub platform: Option<Platform>,
    pub push_provider: Option<PushProviderKind>,
    pub push_token: Option<String>,
    pub apns_environment: Option<ApnsEnvironment>,
    pub token_state: PushTokenState,
    pub token_error: Option<String>,
    pub last_seq: i64,
    pub acked_seq: i64,
    pub last_seen: Option<i64>,
}

impl Device {
    pub fn to_wire(&self, online: bool) -> herald_protocol::DeviceInfo {
        herald_protocol::DeviceInfo {
            device_id: self.id.clone(),
            user: self.user_id.clone(),
            platform: self.platform,
            online,
            last_seen: self.last_seen.map(rfc3339),
            push_provider: self.push_provider,
            push_token: self.token_state,
            push_token_error: self.token_error.clone(),
            apns_environment: self.apns_environment,
            last_seq: self.last_seq,
            acked_seq: self.acked_seq,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: String,
    pub name: String,
    /// First characters of the key, shown in listings so operators can tell keys apart.
    pub prefix: String,
    pub hash: Vec<u8>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    pub scopes: Vec<crate::auth::Scope>,
}

impl ApiKeyRecord {
    pub fn allows(&self, scope: crate::auth::Scope) -> bool {
        self.scopes
            .iter()
            .any(|s| *s == scope || *s == crate::auth::Scope::Admin)
    }
}

/// Stored form of a key's scopes; a value this version does not know grants nothing.
pub fn scopes_from_text(text: &str) -> Vec<crate::auth::Scope> {
    text.split(',')
        .filter_map(crate::auth::Scope::parse)
        .collect()
}

/// Push bookkeeping of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushMark {
    Pushed,
    Failed,
}

/// What to record about one push attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushResult {
    pub device_id: String,
    pub seq: i64,
    pub action: PushAction,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushAction {
    /// Final: pushed or failed, with provider and reason.
    Finish {
        mark: PushMark,
        provider: Option<String>,
        reason: Option<String>,
    },
    /// Back to pending, due at `due_at` (unix ms), one attempt counted.
    Retry { due_at: i64, reason: String },
}

/// One row of a message's delivery status, before rendering.
#[derive(Debug, Clone)]
pub struct DeliveryRow {
    pub device_id: String,
    pub seq: i64,
    pub expires_at: i64,
    pub sent_at: Option<i64>,
    pub acked_at: Option<i64>,
    pub push_state: Option<String>,
    pub push_at: Option<i64>,
    pub push_provider: Option<String>,
    pub reason: Option<String>,
}

impl DeliveryRow {
    /// The state is derived from what happened, so concurrent steps (a late ack racing
    /// a push) can never leave it contradicting the timestamps.
    pub fn to_wire(&self, now: i64) -> DeliveryRecord {
        let state = if self.acked_at.is_some() {
            DeliveryState::Acked
        } else if self.push_state.as_deref() == Some("pushed") {
            DeliveryState::Pushed
        } else if self.push_state.as_deref() == Some("failed") {
            DeliveryState::PushFailed
        } else if self.expires_at <= now {
            DeliveryState::Expired
        } else if self.sent_at.is_some() {
            DeliveryState::Sent
        } else {
            DeliveryState::Queued
        };
        // Once the device has the message, a push that failed on the way is history that
        // only misleads ("pushed_at" and "no push token registered" on a delivered
        // message read as a push that went out); a push that was sent stays visible.
        let failed_push_superseded =
            state == DeliveryState::Acked && self.push_state.as_deref() != Some("pushed");
        let push = |v: &Option<String>| v.clone().filter(|_| !failed_push_superseded);
        DeliveryRecord {
            device_id: self.device_id.clone(),
            seq: self.seq,
            state,
            sent_at: self.sent_at.map(rfc3339),
            acked_at: self.acked_at.map(rfc3339),
            pushed_at: push(&self.push_at.map(rfc3339)),
            push_provider: push(&self.push_provider),
            reason: push(&self.reason),
        }
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn setting(&self, key: &str) -> StoreResult<Option<String>>;
    /// Stores `value` unless the key exists; returns what is stored afterwards.
    async fn init_setting(&self, key: &str, value: &str) -> StoreResult<String>;

    async fn create_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()>;
    async fn api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>>;
    /// Revokes by id or prefix; returns how many keys were revoked.
    async fn revoke_api_key(&self, id_or_prefix: &str, now: i64) -> StoreResult<u64>;
    async fn api_key_by_hash(&self, hash: &[u8]) -> StoreResult<Option<ApiKeyRecord>>;

    /// Creates the device for `user` if new; fails if another user owns it, or with
    /// `DeviceCapReached` if it is new and `user` already owns `max_devices`. The count
    /// and the insert are one step (one writer thread; on PostgreSQL under a per-user
    /// lock), so racing claims never pass the cap, whatever node they reach.
    async fn claim_device(
        &self,
        device_id: &str,
        user: &str,
        now: i64,
        max_devices: u64,
    ) -> StoreResult<Device>;
    /// `claim_device`, then the push registration.
    async fn register_device(
        &self,
        device_id: &str,
        user: &str,
        req: &RegisterDeviceRequest,
        now: i64,
        max_devices: u64,
    ) -> StoreResult<Device>;
    async fn device(&self, device_id: &str) -> StoreResult<Option<Device>>;
    async fn user_devices(&self, user: &str) -> StoreResult<Vec<Device>>;
    /// Deletes the device, its inbox and subscriptions.
    async fn delete_device(&self, device_id: &str) -> StoreResult<bool>;
    async fn touch_device(&self, device_id: &str, now: i64) -> StoreResult<()>;
    /// Marks the token dead, unless it was replaced meanwhile.
    async fn invalidate_push_token(
        &self,
        device_id: &str,
        token: &str,
        reason: &str,
    ) -> StoreResult<()>;

    async fn subscribe(&self, device_id: &str, topic: &str) -> StoreResult<()>;
    async fn unsubscribe(&self, device_id: &str, topic: &str) -> StoreResult<()>;
    async fn device_topics(&self, device_id: &str) -> StoreResult<Vec<String>>;

    /// Tokens of `user` issued at or before `before` (unix seconds) are revoked; a later
    /// revocation moves the mark forward, never back.
    async fn revoke_user_tokens(&self, user: &str, before: i64) -> StoreResult<()>;
    /// The revocation mark of `user`, if any.
    async fn tokens_revoked_before(&self, user: &str) -> StoreResult<Option<i64>>;

    /// Appends the message to every target inbox in one durable transaction.
    async fn publish(&self, msg: NewMessage) -> StoreResult<PublishOutcome>;
    /// `publish` for each message, all in one durable transaction; a message that is
    /// refused (unknown device, too many recipients) gets its own error and writes
    /// nothing. `Err` means nothing of the batch was stored.
    async fn publish_batch(
        &self,
        msgs: Vec<NewMessage>,
    ) -> StoreResult<Vec<StoreResult<PublishOutcome>>>;
    /// Unexpired entries with seq > `after`, ascending, at most `limit`.
    async fn fetch_after(
        &self,
        device_id: &str,
        after: i64,
        limit: u32,
        now: i64,
    ) -> StoreResult<Vec<InboxEntry>>;
    /// Cumulative ack; returns the device's acked seq afterwards (never decreases). The
    /// entries it acks lose their pending push: an ack before the due time cancels it.
    ///
    /// `wrote_live`: every entry the ack covers beyond the stored ack was written to
    /// the live session sending it; the ack then also records them as sent (with
    /// their `delivered` events) if no sent mark has yet, so that mark need not be
    /// written at all (`SentRecorder`).
    async fn ack(&self, device_id: &str, seq: i64, now: i64, wrote_live: bool) -> StoreResult<i64>;
    /// Records that entries `(device, from..=to)` were written to a live session.
    async fn mark_sent(&self, ranges: &[(String, i64, i64)], now: i64) -> StoreResult<()>;
    /// Claims a pending push for sending: true for exactly one caller, never once the
    /// entry is acked or expired.
    async fn claim_push(&self, device_id: &str, seq: i64, now: i64) -> StoreResult<bool>;
    /// Puts a claimed push back as pending, due at `due_at`, counting one attempt.
    async fn retry_push(
        &self,
        device_id: &str,
        seq: i64,
        due_at: i64,
        reason: &str,
    ) -> StoreResult<()>;
    /// Takes pending pushes due by `now` (unacked, unexpired), oldest first: in the same
    /// statement each one's due time moves to `lease_until`, so one finder at a time
    /// settles it, and if that finder dies the entry is found again at `lease_until`.
    async fn take_due_pushes(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> StoreResult<Vec<InboxEntry>>;
    /// Claims older than `stale_before` belong to a sender that died mid-request, so
    /// whether the provider got them is unknown. They are recorded as failed with
    /// `ORPHANED_PUSH_REASON`, never sent again: a push goes out at most once.
    async fn fail_orphaned_pushes(&self, stale_before: i64, now: i64) -> StoreResult<u64>;
    async fn finish_push(
        &self,
        device_id: &str,
        seq: i64,
        mark: PushMark,
        provider: Option<&str>,
        reason: Option<&str>,
        now: i64,
    ) -> StoreResult<()>;
    /// `claim_push` for many entries; stores override it to use one transaction.
    async fn claim_pushes(&self, items: &[(String, i64)], now: i64) -> StoreResult<Vec<bool>> {
        let mut out = Vec::with_capacity(items.len());
        for (device_id, seq) in items {
            out.push(self.claim_push(device_id, *seq, now).await?);
        }
        Ok(out)
    }
    /// Records many push outcomes; stores override it to use one transaction.
    async fn record_push_results(&self, results: &[PushResult], now: i64) -> StoreResult<()> {
        for r in results {
            match &r.action {
                PushAction::Finish {
                    mark,
                    provider,
                    reason,
                } => {
                    self.finish_push(
                        &r.device_id,
                        r.seq,
                        *mark,
                        provider.as_deref(),
                        reason.as_deref(),
                        now,
                    )
                    .await?
                }
                PushAction::Retry { due_at, reason } => {
                    self.retry_push(&r.device_id, r.seq, *due_at, reason)
                        .await?
                }
            }
        }
        Ok(())
    }
    async fn message(&self, id: &str) -> StoreResult<Option<(StoredMessage, Vec<DeliveryRow>)>>;

    // Delivery webhooks (docs/webhooks.md). Events are queued by the writes above, in
    // their own transactions, for the types the store was opened with; these move them.
    /// Due events (next attempt at or before `now`), counted up to `limit`, and the
    /// oldest due event's `queued_at`.
    async fn webhook_due(&self, now: i64, limit: u32) -> StoreResult<(u64, Option<i64>)>;
    /// Takes up to `limit` due events, oldest first; in the same statement each one's
    /// next attempt moves to `lease_until`, so no other node takes it meanwhile (and it
    /// comes due again if this one dies).
    async fn webhook_claim(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> StoreResult<Vec<crate::webhooks::QueuedEvent>>;
    /// Removes delivered (or dropped) events.
    async fn webhook_delete(&self, queue_ids: &[i64]) -> StoreResult<()>;
    /// `(queue_id, next_attempt_at)`: puts claimed events back, one attempt counted.
    async fn webhook_retry(&self, items: &[(i64, i64)]) -> StoreResult<()>;
    /// Events queued, and the oldest one's `queued_at`.
    async fn webhook_queue_stats(&self) -> StoreResult<(u64, Option<i64>)>;

    /// Deletes inbox entries that expired more than `retention_ms` ago; returns count.
    /// With the `expired` webhook on, first queues an `expired` event for every entry
    /// whose TTL ran out unacked since the previous sweep.
    async fn sweep(&self, now: i64, retention_ms: i64) -> StoreResult<u64>;
    async fn ping(&self) -> StoreResult<()>;
}
