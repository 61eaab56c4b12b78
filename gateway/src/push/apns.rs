//! Apple Push Notification service through the `a2` crate (HTTP/2, token or
//! certificate auth).
//!
//! One a2 client per APNs environment, created on first use: devices registered with
//! `apns_environment = sandbox` (debug builds) go to the development host, the rest to
//! the provider's default (production unless configured). The mapping from a
//! `PushRequest` to payload and headers ([`build_apns_message`]) and from a2's answer
//! to a `PushOutcome` ([`map_apns_result`]) are pure functions, golden-tested, since a2
//! can only talk to Apple's hosts.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use a2::request::payload::{Payload, PayloadLike};
use a2::{
    ClientConfig, CollapseId, DefaultNotificationBuilder, Endpoint, ErrorReason,
    NotificationBuilder, NotificationOptions, PushType,
};
use async_trait::async_trait;
use herald_protocol::{ApnsEnvironment, Notification, Priority, PushContent, PushProviderKind};
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::config::PushConfigError;
use super::payload::{herald_keys, Secret, MAX_PUSH_PAYLOAD_BYTES};
use super::{PushOutcome, PushProvider, PushRequest};

/// How Herald authenticates to APNs.
#[derive(Clone)]
pub enum ApnsAuth {
    /// Provider token signed with a .p8 key (PKCS#8 PEM).
    Token {
        key_pem: Secret<Vec<u8>>,
        key_id: String,
        team_id: String,
    },
    /// TLS client certificate, both parts PEM (the key PKCS#8).
    Certificate {
        cert_pem: Vec<u8>,
        key_pem: Secret<Vec<u8>>,
    },
}

impl fmt::Debug for ApnsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApnsAuth::Token {
                key_id, team_id, ..
            } => f
                .debug_struct("Token")
                .field("key_id", key_id)
                .field("team_id", team_id)
                .field("key_pem", &"<redacted>")
                .finish(),
            ApnsAuth::Certificate { .. } => f
                .debug_struct("Certificate")
                .field("key_pem", &"<redacted>")
                .finish_non_exhaustive(),
        }
    }
}

pub struct ApnsProvider {
    auth: ApnsAuth,
    topic: String,
    default_environment: ApnsEnvironment,
    timeout: Duration,
    // a2's Client derives Debug and would print its current provider token: keep it
    // out of every Debug output (see the manual impl below).
    production: OnceCell<a2::Client>,
    sandbox: OnceCell<a2::Client>,
}

impl fmt::Debug for ApnsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApnsProvider")
            .field("auth", &self.auth)
            .field("topic", &self.topic)
            .field("default_environment", &self.default_environment)
            .finish_non_exhaustive()
    }
}

impl ApnsProvider {
    /// Checks the credentials now (a bad key fails here, not on the first push). The
    /// default environment's client is created here, the other one on first use.
    pub fn new(
        auth: ApnsAuth,
        topic: String,
        default_environment: ApnsEnvironment,
        timeout: Duration,
    ) -> Result<Self, PushConfigError> {
        let provider = ApnsProvider {
            auth,
            topic,
            default_environment,
            timeout,
            production: OnceCell::new(),
            sandbox: OnceCell::new(),
        };
        // Building the default environment's client checks the key (a2 signs a token
        // at once); keep it rather than build it again on the first push.
        let client = provider.make_client(default_environment)?;
        let cell = match default_environment {
            ApnsEnvironment::Production => &provider.production,
            ApnsEnvironment::Sandbox => &provider.sandbox,
        };
        let _ = cell.set(client);
        Ok(provider)
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    fn make_client(&self, env: ApnsEnvironment) -> Result<a2::Client, PushConfigError> {
        let config = ClientConfig {
            endpoint: match env {
                ApnsEnvironment::Production => Endpoint::Production,
                ApnsEnvironment::Sandbox => Endpoint::Sandbox,
            },
            request_timeout_secs: Some(self.timeout.as_secs().max(1)),
            pool_idle_timeout_secs: Some(600),
        };
        match &self.auth {
            ApnsAuth::Token {
                key_pem,
                key_id,
                team_id,
            } => a2::Client::token(
                key_pem.expose().as_slice(),
                key_id.clone(),
                team_id.clone(),
                config,
            )
            .map_err(|e| {
                PushConfigError::invalid(
                    "apns",
                    format!(
                        "the .p8 key (key_file/key_pem) cannot sign APNs tokens ({}); use the \
                         unmodified AuthKey_<key_id>.p8 downloaded from the Apple developer \
                         account",
                        a2_error_kind(&e)
                    ),
                )
            }),
            ApnsAuth::Certificate { cert_pem, key_pem } => {
                a2::Client::certificate_parts(cert_pem, key_pem.expose(), config).map_err(|e| {
                    PushConfigError::invalid(
                        "apns",
                        format!(
                            "certificate_file/certificate_key_file are not a usable PEM \
                             certificate and PKCS#8 key ({})",
                            a2_error_kind(&e)
                        ),
                    )
                })
            }
        }
    }

    async fn client(&self, env: ApnsEnvironment) -> Result<&a2::Client, PushConfigError> {
        let cell = match env {
            ApnsEnvironment::Production => &self.production,
            ApnsEnvironment::Sandbox => &self.sandbox,
        };
        cell.get_or_try_init(|| async { self.make_client(env) })
            .await
    }
}

/// A description of an a2 error that cannot carry key material.
fn a2_error_kind(e: &a2::Error) -> String {
    match e {
        a2::Error::SignerError(_) => "cannot sign with the key".into(),
        a2::Error::UnexpectedKey(_) => "the key is not an EC P-256 PKCS#8 key".into(),
        a2::Error::ReadError(_) => "not valid PEM".into(),
        a2::Error::Tls(inner) => format!("TLS setup failed: {inner}"),
        a2::Error::InvalidCertificate => "invalid certificate".into(),
        other => other.to_string(),
    }
}

#[async_trait]
impl PushProvider for ApnsProvider {
    fn kind(&self) -> PushProviderKind {
        PushProviderKind::Apns
    }

    async fn send(&self, req: &PushRequest) -> PushOutcome {
        let msg = build_apns_message(req, &self.topic);
        let env = req.apns_environment.unwrap_or(self.default_environment);
        let client = match self.client(env).await {
            Ok(c) => c,
            Err(e) => {
                return PushOutcome::AuthError {
                    reason: e.to_string(),
                }
            }
        };
        map_apns_result(client.send(msg.payload()).await)
    }
}

/// Everything one APNs request carries, owned; [`ApnsMessage::payload`] lends it to a2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApnsMessage {
    pub device_token: String,
    pub topic: String,
    pub alert_title: Option<String>,
    pub alert_body: Option<String>,
    pub badge: Option<u32>,
    pub sound: Option<String>,
    /// `content-available: 1` (background push).
    pub content_available: bool,
    /// Herald keys at the top level of the payload (the app's `userInfo`).
    pub custom: BTreeMap<String, String>,
    pub push_type: PushType,
    /// `apns-priority`: 10 (immediately) or 5 (power-considerate).
    pub priority: u8,
    /// `apns-expiration`, Unix seconds.
    pub expiration: Option<u64>,
    pub collapse_id: Option<String>,
    /// True when this is a sync hint rather than the full message.
    pub hint: bool,
}

impl ApnsMessage {
    fn alert_is_visible(&self) -> bool {
        self.alert_title.is_some() || self.alert_body.is_some()
    }

    /// The a2 payload (body plus the options a2 turns into headers).
    pub fn payload(&self) -> Payload<'_> {
        let mut builder = DefaultNotificationBuilder::new();
        if let Some(t) = &self.alert_title {
            builder = builder.set_title(t);
        }
        if let Some(b) = &self.alert_body {
            builder = builder.set_body(b);
        }
        if let Some(b) = self.badge {
            builder = builder.set_badge(b);
        }
        if let Some(s) = &self.sound {
            builder = builder.set_sound(s);
        }
        if self.content_available {
            builder = builder.set_content_available();
        }
        let options = NotificationOptions {
            apns_id: None,
            apns_push_type: Some(self.push_type),
            apns_expiration: self.expiration,
            apns_priority: Some(if self.priority == 10 {
                a2::Priority::High
            } else {
                a2::Priority::Normal
            }),
            apns_topic: Some(&self.topic),
            // Always ≤ 64 bytes by construction (see `collapse_id`).
            apns_collapse_id: self
                .collapse_id
                .as_deref()
                .and_then(|c| CollapseId::new(c).ok()),
        };
        let mut payload = builder.build(&self.device_token, options);
        // A visible alert lets the app's notification service extension run (the SDK's
        // `handle_push` records the message there, so the app does not show it twice
        // when the socket delivers it too); background pushes go to the app itself.
        // (The builder always writes `mutable-content: 0` otherwise.)
        payload.aps.mutable_content = self.alert_is_visible().then_some(1);
        for (k, v) in &self.custom {
            payload
                .data
                .insert(k.as_str(), serde_json::Value::String(v.clone()));
        }
        payload
    }

    /// The JSON body sent to APNs.
    pub fn body_json(&self) -> String {
        self.payload()
            .to_json_string()
            .expect("payload of strings and numbers serializes")
    }

    /// The `apns-*` headers a2 sends for this message (as a2's `build_request` writes
    /// them), for golden tests and debugging.
    pub fn headers(&self) -> BTreeMap<&'static str, String> {
        let payload = self.payload();
        let o = payload.get_options();
        let mut h = BTreeMap::new();
        if let Some(p) = &o.apns_priority {
            h.insert("apns-priority", p.to_string());
        }
        if let Some(t) = &o.apns_push_type {
            h.insert("apns-push-type", t.to_string());
        }
        if let Some(e) = o.apns_expiration {
            h.insert("apns-expiration", e.to_string());
        }
        if let Some(c) = &o.apns_collapse_id {
            h.insert("apns-collapse-id", c.value.to_string());
        }
        if let Some(t) = o.apns_topic {
            h.insert("apns-topic", t.to_string());
        }
        h
    }
}

/// `apns-collapse-id` for a collapse key: the key itself when it fits APNs's 64 bytes,
/// else the hex SHA-256 of it (64 characters), so distinct long keys stay distinct.
pub fn collapse_id(key: &str) -> String {
    if key.len() <= 64 {
        key.to_string()
    } else {
        hex::encode(Sha256::digest(key.as_bytes()))
    }
}

fn visible(n: &Notification) -> bool {
    [&n.title, &n.body, &n.sound]
        .iter()
        .any(|f| f.as_deref().is_some_and(|s| !s.is_empty()))
        || n.badge.is_some()
}

/// Maps one push to an APNs request.
///
/// - Message with a notification, full content: alert (title/body), badge, sound,
///   `herald_data`; push type `alert`, priority 10 for `high`, 5 for `normal`.
/// - Data only (no notification): `content-available: 1`, push type `background`,
///   priority 5 (APNs rejects 10 for background pushes).
/// - `push_content = hint`: a background sync hint (`herald_hint = "1"`), never the
///   notification text.
/// - Full payload over 4096 bytes: the alert without `herald_data` (a sync hint that
///   still shows the notification) if that fits, else a background sync hint.
pub fn build_apns_message(req: &PushRequest, topic: &str) -> ApnsMessage {
    let expiration = (req.expires_at > 0).then_some(req.expires_at as u64);
    let alert_priority = match req.priority {
        Priority::High => 10,
        Priority::Normal => 5,
    };
    let base = ApnsMessage {
        device_token: req.token.clone(),
        topic: topic.to_string(),
        alert_title: None,
        alert_body: None,
        badge: None,
        sound: None,
        content_available: false,
        custom: BTreeMap::new(),
        push_type: PushType::Background,
        priority: 5,
        expiration,
        collapse_id: req.collapse_key.as_deref().map(collapse_id),
        hint: false,
    };
    let background = |hint: bool| ApnsMessage {
        content_available: true,
        custom: herald_keys(req, hint),
        hint,
        ..base.clone()
    };
    let alert = |n: &Notification, hint: bool| ApnsMessage {
        alert_title: n.title.clone().filter(|s| !s.is_empty()),
        alert_body: n.body.clone().filter(|s| !s.is_empty()),
        badge: n.badge,
        sound: n.sound.clone().filter(|s| !s.is_empty()),
        custom: herald_keys(req, hint),
        push_type: PushType::Alert,
        priority: alert_priority,
        hint,
        ..base.clone()
    };
    let fits = |m: &ApnsMessage| m.body_json().len() <= MAX_PUSH_PAYLOAD_BYTES;

    let notification = req.notification.as_ref().filter(|n| visible(n));
    match (req.push_content, notification) {
        (PushContent::Hint, _) => background(true),
        (PushContent::Full, None) => {
            let full = background(false);
            if fits(&full) {
                full
            } else {
                background(true)
            }
        }
        (PushContent::Full, Some(n)) => {
            let full = alert(n, false);
            if fits(&full) {
                return full;
            }
            let alert_hint = alert(n, true);
            if fits(&alert_hint) {
                alert_hint
            } else {
                background(true)
            }
        }
    }
}

/// Maps a2's answer to an outcome.
pub fn map_apns_result(result: Result<a2::Response, a2::Error>) -> PushOutcome {
    match result {
        Ok(_) => PushOutcome::Delivered,
        Err(e) => map_apns_error(&e),
    }
}

pub fn map_apns_error(err: &a2::Error) -> PushOutcome {
    match err {
        a2::Error::ResponseError(resp) => {
            map_apns_response(resp.code, resp.error.as_ref().map(|b| &b.reason))
        }
        a2::Error::ConnectionError(_) | a2::Error::ClientError(_) | a2::Error::ReadError(_) => {
            PushOutcome::Retry {
                reason: format!("apns: {err}"),
                retry_after: None,
            }
        }
        a2::Error::RequestTimeout(secs) => PushOutcome::Retry {
            reason: format!("apns: request timed out after {secs} s"),
            retry_after: None,
        },
        a2::Error::SignerError(_) | a2::Error::UnexpectedKey(_) | a2::Error::Tls(_) => {
            PushOutcome::AuthError {
                reason: format!("apns: {}", a2_error_kind(err)),
            }
        }
        a2::Error::InvalidCertificate => PushOutcome::AuthError {
            reason: "apns: invalid certificate".into(),
        },
        a2::Error::SerializeError(_)
        | a2::Error::InvalidOptions(_)
        | a2::Error::BuildRequestError(_) => PushOutcome::Failed {
            reason: format!("apns: {err}"),
        },
    }
}

/// Maps an APNs status and reason (when a2 could parse one) to an outcome.
pub fn map_apns_response(code: u16, reason: Option<&ErrorReason>) -> PushOutcome {
    let text = match reason {
        Some(r) => format!("apns {code} {r:?}"),
        None => format!("apns {code}"),
    };
    use ErrorReason as R;
    match (code, reason) {
        (200, _) => PushOutcome::Delivered,
        (410, _)
        | (400, Some(R::BadDeviceToken | R::DeviceTokenNotForTopic))
        | (_, Some(R::Unregistered)) => PushOutcome::InvalidToken { reason: text },
        (403, _) => PushOutcome::AuthError { reason: text },
        (429, _) | (500..=599, _) | (_, Some(R::IdleTimeout | R::ServiceUnavailable)) => {
            PushOutcome::Retry {
                reason: text,
                retry_after: None,
            }
        }
        _ => PushOutcome::Failed { reason: text },
    }
}
