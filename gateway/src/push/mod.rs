//! The push route: APNs and FCM behind one trait.
//!
//! `PushProvider` is the seam: the dispatcher decides *whether* and *when* to push and
//! records the outcome on the delivery; a provider only turns one `PushRequest` into one
//! `PushOutcome`. Providers never log or return credentials.

pub mod apns;
pub mod config;
pub mod dispatcher;
pub mod fcm;
pub mod payload;
pub mod stub;

use std::time::Duration;

use async_trait::async_trait;
use herald_protocol::{
    ApnsEnvironment, Notification, Priority, PushContent, PushProviderKind, RawJson,
};

/// One push to one device for one inbox entry.
#[derive(Debug, Clone, PartialEq)]
pub struct PushRequest {
    pub device_id: String,
    pub seq: i64,
    pub message_id: String,
    pub provider: PushProviderKind,
    pub token: String,
    pub apns_environment: Option<ApnsEnvironment>,
    /// Verbatim: a full push carries it as the `herald_data` string.
    pub data: RawJson,
    pub notification: Option<Notification>,
    pub priority: Priority,
    pub collapse_key: Option<String>,
    pub push_content: PushContent,
    /// Unix seconds after which the message is worthless (the message's TTL).
    pub expires_at: i64,
}

impl PushRequest {
    /// The push of one inbox entry to one device's token.
    pub fn for_entry(
        entry: &crate::store::InboxEntry,
        device: &crate::store::Device,
        provider: PushProviderKind,
        token: String,
    ) -> PushRequest {
        let m = &entry.message;
        PushRequest {
            device_id: entry.device_id.clone(),
            seq: entry.seq,
            message_id: m.id.clone(),
            provider,
            token,
            apns_environment: device.apns_environment,
            data: m.payload.data.clone(),
            notification: m.payload.notification.clone(),
            priority: m.payload.priority,
            collapse_key: Some(collapse_key(&m.id, m.payload.collapse_key.as_deref())),
            push_content: m.payload.push_content,
            expires_at: m.expires_at / 1000,
        }
    }
}

/// The collapse identifier every push carries (`apns-collapse-id`, FCM
/// `android.collapse_key`): the message's own `collapse_key` when it has one, else its
/// id. A request whose outcome is unknown (it timed out) is retried, and if both
/// attempts reached the device the second replaces the first instead of stacking.
pub fn collapse_key(message_id: &str, explicit: Option<&str>) -> String {
    explicit.unwrap_or(message_id).to_owned()
}

/// What a provider said about one push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// Accepted by the provider.
    Delivered,
    /// The token is dead (unregistered, malformed, wrong topic): deactivate it.
    InvalidToken { reason: String },
    /// Transient (429, 5xx, connection error): try again, after `retry_after` if given.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Our credentials were refused: loud, not retried per message.
    AuthError { reason: String },
    /// Permanent for this message (payload rejected, ...).
    Failed { reason: String },
}

impl PushOutcome {
    /// Label used in metrics and delivery records.
    pub fn label(&self) -> &'static str {
        match self {
            PushOutcome::Delivered => "delivered",
            PushOutcome::InvalidToken { .. } => "invalid_token",
            PushOutcome::Retry { .. } => "retry",
            PushOutcome::AuthError { .. } => "auth_error",
            PushOutcome::Failed { .. } => "failed",
        }
    }
}

#[async_trait]
pub trait PushProvider: Send + Sync + 'static {
    fn kind(&self) -> PushProviderKind;
    async fn send(&self, req: &PushRequest) -> PushOutcome;
}
