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
use herald_protocol::{ApnsEnvironment, Notification, Priority, PushContent, PushProviderKind};
use serde_json::Value;

/// One push to one device for one inbox entry.
#[derive(Debug, Clone, PartialEq)]
pub struct PushRequest {
    pub device_id: String,
    pub seq: i64,
    pub message_id: String,
    pub provider: PushProviderKind,
    pub token: String,
    pub apns_environment: Option<ApnsEnvironment>,
    pub data: Value,
    pub notification: Option<Notification>,
    pub priority: Priority,
    pub collapse_key: Option<String>,
    pub push_content: PushContent,
    /// Unix seconds after which the message is worthless (the message's TTL).
    pub expires_at: i64,
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
