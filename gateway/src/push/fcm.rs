//! Firebase Cloud Messaging, HTTP v1 API (`projects/{id}/messages:send`).
//!
//! Auth: an RS256 JWT signed with the service account's key is exchanged at the OAuth
//! token endpoint for an access token, which is cached until a minute before it
//! expires and refreshed once when FCM answers 401. One `reqwest::Client` is shared by
//! every send, so requests reuse pooled (HTTP/2 with FCM) connections.

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use herald_protocol::{Priority, PushContent, PushProviderKind};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;

use super::config::PushConfigError;
use super::payload::{
    clip, herald_keys, parse_retry_after, unix_now, Secret, MAX_PUSH_PAYLOAD_BYTES,
};
use super::{PushOutcome, PushProvider, PushRequest};

/// OAuth scope for sending with FCM.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// A cached access token is replaced this long before it expires.
const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// FCM's ceiling on `android.ttl` (28 days).
const MAX_TTL_SECONDS: i64 = 28 * 24 * 3600;

/// The fields Herald uses from a Google service-account JSON key.
#[derive(Clone, Deserialize)]
pub struct ServiceAccount {
    #[serde(default)]
    pub project_id: Option<String>,
    pub client_email: String,
    #[serde(default)]
    pub private_key_id: Option<String>,
    private_key: String,
    #[serde(default)]
    pub token_uri: Option<String>,
}

impl fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .field("private_key", &"<redacted>")
            .field("token_uri", &self.token_uri)
            .finish()
    }
}

impl ServiceAccount {
    /// Parses a service-account JSON key. Errors never quote the input (it holds the key).
    pub fn from_json(text: &str) -> Result<Self, PushConfigError> {
        serde_json::from_str::<ServiceAccount>(text).map_err(|e| {
            let msg = e.to_string();
            let what = if msg.starts_with("missing field") {
                // "missing field `client_email` at line 1 column 2": safe, and useful.
                msg
            } else {
                format!(
                    "malformed JSON ({:?} error at line {} column {})",
                    e.classify(),
                    e.line(),
                    e.column()
                )
            };
            PushConfigError::invalid(
                "fcm",
                format!(
                    "the service account is not a Google service-account JSON key: {what}; \
                     download a new key from the Firebase console (Project settings > \
                     Service accounts)"
                ),
            )
        })
    }

    /// A service account from parts (tests, embedding).
    pub fn new(
        project_id: Option<String>,
        client_email: String,
        private_key_pem: String,
        token_uri: Option<String>,
    ) -> Self {
        ServiceAccount {
            project_id,
            client_email,
            private_key_id: None,
            private_key: private_key_pem,
            token_uri,
        }
    }
}

/// Endpoint and transport settings of an [`FcmProvider`].
#[derive(Debug, Clone)]
pub struct FcmOptions {
    /// Overrides the service account's `project_id`.
    pub project_id: Option<String>,
    /// `https://fcm.googleapis.com` unless testing.
    pub base_url: String,
    /// Overrides the service account's `token_uri`.
    pub token_uri: Option<String>,
    /// Timeout of one HTTP request.
    pub timeout: Duration,
}

impl FcmOptions {
    pub const DEFAULT_BASE_URL: &'static str = "https://fcm.googleapis.com";
}

impl Default for FcmOptions {
    fn default() -> Self {
        FcmOptions {
            project_id: None,
            base_url: Self::DEFAULT_BASE_URL.to_string(),
            token_uri: None,
            timeout: Duration::from_secs(10),
        }
    }
}

struct CachedToken {
    token: Secret<String>,
    refresh_at: Instant,
}

pub struct FcmProvider {
    http: reqwest::Client,
    send_url: String,
    token_uri: String,
    project_id: String,
    client_email: String,
    key_id: Option<String>,
    key: EncodingKey,
    /// Held while a token is fetched, so concurrent sends share one refresh.
    token: Mutex<Option<CachedToken>>,
}

impl fmt::Debug for FcmProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FcmProvider")
            .field("send_url", &self.send_url)
            .field("token_uri", &self.token_uri)
            .field("client_email", &self.client_email)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: i64,
    exp: i64,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Failure to get an access token, already in outcome form.
type TokenResult = Result<Secret<String>, PushOutcome>;

impl FcmProvider {
    pub fn new(account: ServiceAccount, options: FcmOptions) -> Result<Self, PushConfigError> {
        let project_id = options
            .project_id
            .clone()
            .or(account.project_id.clone())
            .filter(|p| !p.is_empty())
            .ok_or(PushConfigError::Missing {
                section: "fcm",
                field: "project_id",
                hint: "the service account has no project_id; set project_id to the Firebase \
                       project id",
            })?;
        let token_uri = options
            .token_uri
            .clone()
            .or(account.token_uri.clone())
            .unwrap_or_else(|| DEFAULT_TOKEN_URI.to_string());
        let key = EncodingKey::from_rsa_pem(account.private_key.as_bytes()).map_err(|_| {
            PushConfigError::invalid(
                "fcm",
                "the service account's private_key is not an RSA private key in PEM form; \
                 download a new key from the Firebase console",
            )
        })?;
        let base = options.base_url.trim_end_matches('/');
        for (name, url) in [("base_url", base), ("token_uri", token_uri.as_str())] {
            if reqwest::Url::parse(url).is_err() {
                return Err(PushConfigError::invalid(
                    "fcm",
                    format!("{name} {url:?} is not a valid URL"),
                ));
            }
        }
        let http = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                PushConfigError::invalid("fcm", format!("cannot build the HTTP client: {e}"))
            })?;
        Ok(FcmProvider {
            http,
            send_url: format!("{base}/v1/projects/{project_id}/messages:send"),
            token_uri,
            project_id,
            client_email: account.client_email,
            key_id: account.private_key_id,
            key,
            token: Mutex::new(None),
        })
    }

    pub fn project_id(&self) -> &str {
        &self.project_id
    }

    /// The URL messages are posted to.
    pub fn send_url(&self) -> &str {
        &self.send_url
    }

    /// A valid access token: the cached one unless it is close to expiry or is `stale`
    /// (just refused by FCM), else a fresh one.
    async fn access_token(&self, stale: Option<&Secret<String>>) -> TokenResult {
        let mut cached = self.token.lock().await;
        if let Some(c) = cached.as_ref() {
            if Instant::now() < c.refresh_at && Some(&c.token) != stale {
                return Ok(c.token.clone());
            }
        }
        *cached = None;
        let (token, lifetime) = self.fetch_token().await?;
        let refresh_at = Instant::now() + lifetime.saturating_sub(TOKEN_REFRESH_MARGIN);
        *cached = Some(CachedToken {
            token: token.clone(),
            refresh_at,
        });
        Ok(token)
    }

    async fn fetch_token(&self) -> Result<(Secret<String>, Duration), PushOutcome> {
        let iat = unix_now();
        let claims = AssertionClaims {
            iss: &self.client_email,
            scope: FCM_SCOPE,
            aud: &self.token_uri,
            iat,
            exp: iat + 3600,
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.key_id.clone();
        let assertion = jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| {
            PushOutcome::AuthError {
                reason: format!("fcm: cannot sign the OAuth assertion: {e}"),
            }
        })?;
        let resp = self
            .http
            .post(&self.token_uri)
            .form(&[("grant_type", JWT_BEARER_GRANT), ("assertion", &assertion)])
            .send()
            .await
            .map_err(|e| PushOutcome::Retry {
                reason: format!("fcm oauth: {}", describe_transport_error(&e)),
                retry_after: None,
            })?;
        let status = resp.status();
        let retry_after = retry_after_of(&resp);
        let body = resp.text().await.unwrap_or_default();
        if status.is_success() {
            let answer: TokenAnswer =
                serde_json::from_str(&body).map_err(|_| PushOutcome::AuthError {
                    reason: format!(
                        "fcm oauth: token endpoint answered {status} without an access_token"
                    ),
                })?;
            let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(3600));
            return Ok((Secret::new(answer.access_token), lifetime));
        }
        // The error body is `{"error": "invalid_grant", "error_description": ...}`: no
        // secrets, so it is quoted (clipped) to say what is wrong.
        let detail = oauth_error_detail(&body);
        let reason = format!("fcm oauth: token endpoint answered {status}: {detail}");
        if status.as_u16() == 429 || status.is_server_error() || status.as_u16() == 408 {
            Err(PushOutcome::Retry {
                reason,
                retry_after,
            })
        } else {
            Err(PushOutcome::AuthError { reason })
        }
    }
}

fn oauth_error_detail(body: &str) -> String {
    #[derive(Deserialize)]
    struct OAuthError {
        error: Option<String>,
        error_description: Option<String>,
    }
    match serde_json::from_str::<OAuthError>(body) {
        Ok(OAuthError {
            error,
            error_description,
        }) => clip(
            &[error, error_description]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(": "),
            200,
        ),
        Err(_) => clip(body, 200),
    }
}

fn retry_after_of(resp: &reqwest::Response) -> Option<Duration> {
    resp.headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()))
}

fn describe_transport_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "request timed out".to_string()
    } else if e.is_connect() {
        format!("cannot connect: {}", error_chain(e))
    } else {
        error_chain(e)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    clip(&s, 300)
}

#[async_trait]
impl PushProvider for FcmProvider {
    fn kind(&self) -> PushProviderKind {
        PushProviderKind::Fcm
    }

    async fn send(&self, req: &PushRequest) -> PushOutcome {
        let body = build_fcm_message(req, unix_now());
        let mut refused: Option<Secret<String>> = None;
        loop {
            let token = match self.access_token(refused.as_ref()).await {
                Ok(t) => t,
                Err(outcome) => return outcome,
            };
            let resp = match self
                .http
                .post(&self.send_url)
                .bearer_auth(token.expose())
                .json(&body)
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    return PushOutcome::Retry {
                        reason: format!("fcm: {}", describe_transport_error(&e)),
                        retry_after: None,
                    }
                }
            };
            let status = resp.status().as_u16();
            if status == 401 && refused.is_none() {
                // The token may have been revoked or expired early: one fresh try.
                refused = Some(token);
                continue;
            }
            let retry_after = retry_after_of(&resp);
            let text = match resp.text().await {
                Ok(t) => t,
                Err(e) if status == 200 => {
                    tracing::debug!(error = %e, "fcm: accepted, but reading the answer failed");
                    String::new()
                }
                Err(e) => {
                    return PushOutcome::Retry {
                        reason: format!(
                            "fcm {status}: reading the answer failed: {}",
                            describe_transport_error(&e)
                        ),
                        retry_after,
                    }
                }
            };
            return map_fcm_response(status, retry_after, &text);
        }
    }
}

/// The v1 request body (`{"message": {...}}`) for one push at Unix time `now`.
///
/// Full content: `data` holds the Herald keys with `herald_data`, and `notification`
/// the title/body when the message has one. Sync hint (asked for, or the full payload
/// over 4096 bytes): `data` holds the Herald keys with `herald_hint = "1"`; an oversized
/// full message keeps its notification if that still fits, a `hint` message never
/// carries one.
pub fn build_fcm_message(req: &PushRequest, now: i64) -> Value {
    let visible = req.notification.as_ref().filter(|n| {
        n.title.as_deref().is_some_and(|t| !t.is_empty())
            || n.body.as_deref().is_some_and(|b| !b.is_empty())
    });
    let notification_json = |n: &herald_protocol::Notification| {
        let mut m = Map::new();
        if let Some(t) = &n.title {
            m.insert("title".into(), Value::String(t.clone()));
        }
        if let Some(b) = &n.body {
            m.insert("body".into(), Value::String(b.clone()));
        }
        Value::Object(m)
    };

    let (data, notification) = match req.push_content {
        PushContent::Hint => (herald_keys(req, true), None),
        PushContent::Full => {
            let data = herald_keys(req, false);
            let notification = visible.map(notification_json);
            if fcm_payload_size(&data, notification.as_ref()) <= MAX_PUSH_PAYLOAD_BYTES {
                (data, notification)
            } else {
                let data = herald_keys(req, true);
                let notification = notification
                    .filter(|n| fcm_payload_size(&data, Some(n)) <= MAX_PUSH_PAYLOAD_BYTES);
                (data, notification)
            }
        }
    };

    let mut android = Map::new();
    android.insert(
        "priority".into(),
        json!(match req.priority {
            Priority::High => "high",
            Priority::Normal => "normal",
        }),
    );
    let ttl = (req.expires_at - now).clamp(0, MAX_TTL_SECONDS);
    android.insert("ttl".into(), json!(format!("{ttl}s")));
    if let Some(key) = &req.collapse_key {
        android.insert("collapse_key".into(), json!(key));
    }
    if let (Some(_), Some(n)) = (&notification, visible) {
        let mut an = Map::new();
        if let Some(sound) = &n.sound {
            an.insert("sound".into(), json!(sound));
        }
        if let Some(badge) = n.badge {
            an.insert("notification_count".into(), json!(badge));
        }
        if !an.is_empty() {
            android.insert("notification".into(), Value::Object(an));
        }
    }

    let mut message = Map::new();
    message.insert("token".into(), json!(req.token));
    if let Some(n) = notification {
        message.insert("notification".into(), n);
    }
    message.insert("data".into(), json!(data));
    message.insert("android".into(), Value::Object(android));
    json!({ "message": message })
}

/// Bytes FCM counts against its 4096-byte payload limit (data and notification), as
/// their JSON encoding: a slight overestimate, never an underestimate.
fn fcm_payload_size(
    data: &std::collections::BTreeMap<String, String>,
    notification: Option<&Value>,
) -> usize {
    let data_len = serde_json::to_vec(data).map(|v| v.len()).unwrap_or(0);
    let notif_len = notification
        .and_then(|n| serde_json::to_vec(n).ok())
        .map(|v| v.len())
        .unwrap_or(0);
    data_len + notif_len
}

#[derive(Deserialize, Default)]
struct GoogleErrorBody {
    #[serde(default)]
    error: GoogleError,
}

#[derive(Deserialize, Default)]
struct GoogleError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<Value>,
}

impl GoogleError {
    /// `details[@type=...FcmError].errorCode`, e.g. `UNREGISTERED`.
    fn fcm_error_code(&self) -> Option<&str> {
        self.details.iter().find_map(|d| {
            let ty = d.get("@type")?.as_str()?;
            if ty.ends_with("google.firebase.fcm.v1.FcmError") {
                d.get("errorCode")?.as_str()
            } else {
                None
            }
        })
    }

    /// Whether a `google.rpc.BadRequest` field violation, or the message, is about the
    /// registration token.
    fn concerns_token(&self) -> bool {
        let field_violation = self.details.iter().any(|d| {
            d.get("fieldViolations")
                .and_then(Value::as_array)
                .is_some_and(|vs| {
                    vs.iter()
                        .any(|v| v.get("field").and_then(Value::as_str) == Some("message.token"))
                })
        });
        let msg = self.message.to_ascii_lowercase();
        field_violation || msg.contains("registration token") || msg.contains("message.token")
    }
}

/// Maps FCM's answer to an outcome. 401 reaches here only after the one retry with a
/// fresh token.
pub fn map_fcm_response(status: u16, retry_after: Option<Duration>, body: &str) -> PushOutcome {
    if (200..300).contains(&status) {
        return PushOutcome::Delivered;
    }
    let err = serde_json::from_str::<GoogleErrorBody>(body)
        .unwrap_or_default()
        .error;
    let code = err
        .fcm_error_code()
        .filter(|c| !c.is_empty())
        .unwrap_or(err.status.as_str());
    let reason = {
        let mut r = format!("fcm {status}");
        if !code.is_empty() {
            r.push(' ');
            r.push_str(code);
        }
        if !err.message.is_empty() {
            r.push_str(": ");
            r.push_str(&clip(&err.message, 200));
        }
        r
    };
    match status {
        404 if code == "UNREGISTERED" => PushOutcome::InvalidToken { reason },
        400 if (code == "INVALID_ARGUMENT" || err.status == "INVALID_ARGUMENT")
            && err.concerns_token() =>
        {
            PushOutcome::InvalidToken { reason }
        }
        // Unregistered tokens are sometimes reported with 400 as well.
        400 if code == "UNREGISTERED" => PushOutcome::InvalidToken { reason },
        // The token belongs to another Firebase project: dead for us.
        403 if code == "SENDER_ID_MISMATCH" => PushOutcome::InvalidToken { reason },
        401 | 403 => PushOutcome::AuthError { reason },
        408 | 429 | 500..=599 => PushOutcome::Retry {
            reason,
            retry_after,
        },
        _ => PushOutcome::Failed { reason },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_protocol::Notification;

    fn req() -> PushRequest {
        PushRequest {
            device_id: "dev-1".into(),
            seq: 7,
            message_id: "msg-1".into(),
            provider: PushProviderKind::Fcm,
            token: "fcm-token-1".into(),
            apns_environment: None,
            data: json!({"order": 17}).into(),
            notification: None,
            priority: Priority::Normal,
            collapse_key: None,
            push_content: PushContent::Full,
            expires_at: 0,
        }
    }

    #[test]
    fn data_only_body() {
        let r = PushRequest {
            expires_at: 1_000_000 + 3600,
            ..req()
        };
        assert_eq!(
            build_fcm_message(&r, 1_000_000),
            json!({"message": {
                "token": "fcm-token-1",
                "data": {"herald_id": "msg-1", "herald_seq": "7", "herald_device": "dev-1",
                         "herald_data": "{\"order\":17}"},
                "android": {"priority": "normal", "ttl": "3600s"}
            }})
        );
    }

    #[test]
    fn notification_body_with_sound_badge_collapse() {
        let r = PushRequest {
            notification: Some(Notification {
                title: Some("Hi".into()),
                body: Some("there".into()),
                badge: Some(3),
                sound: Some("default".into()),
            }),
            priority: Priority::High,
            collapse_key: Some("chat-9".into()),
            expires_at: 100,
            ..req()
        };
        assert_eq!(
            build_fcm_message(&r, 200),
            json!({"message": {
                "token": "fcm-token-1",
                "notification": {"title": "Hi", "body": "there"},
                "data": {"herald_id": "msg-1", "herald_seq": "7", "herald_device": "dev-1",
                         "herald_data": "{\"order\":17}"},
                "android": {"priority": "high", "ttl": "0s", "collapse_key": "chat-9",
                            "notification": {"sound": "default", "notification_count": 3}}
            }})
        );
    }

    #[test]
    fn hint_and_oversize() {
        let hint_data = json!({"herald_id": "msg-1", "herald_seq": "7",
                               "herald_device": "dev-1", "herald_hint": "1"});
        let n = Notification {
            title: Some("Hi".into()),
            ..Default::default()
        };
        // Asked-for hint: no notification, no data.
        let r = PushRequest {
            push_content: PushContent::Hint,
            notification: Some(n.clone()),
            ..req()
        };
        let m = build_fcm_message(&r, 0);
        assert_eq!(m["message"]["data"], hint_data);
        assert!(m["message"].get("notification").is_none());
        // Oversized data: hint, notification kept.
        let r = PushRequest {
            data: json!({"blob": "x".repeat(5000)}).into(),
            notification: Some(n),
            ..req()
        };
        let m = build_fcm_message(&r, 0);
        assert_eq!(m["message"]["data"], hint_data);
        assert_eq!(m["message"]["notification"], json!({"title": "Hi"}));
        // Oversized notification too: plain hint.
        let r = PushRequest {
            notification: Some(Notification {
                body: Some("y".repeat(5000)),
                ..Default::default()
            }),
            ..req()
        };
        let m = build_fcm_message(&r, 0);
        assert_eq!(m["message"]["data"], hint_data);
        assert!(m["message"].get("notification").is_none());
        // Just under the limit stays full.
        let r = PushRequest {
            data: json!("z".repeat(3900)).into(),
            ..req()
        };
        assert!(build_fcm_message(&r, 0)["message"]["data"]
            .get("herald_data")
            .is_some());
    }

    fn google_error(code: u16, status: &str, message: &str, details: Value) -> String {
        json!({"error": {"code": code, "status": status, "message": message,
                         "details": details}})
        .to_string()
    }

    #[test]
    fn response_mapping() {
        let fcm_err = |c: &str| {
            json!([{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                    "errorCode": c}])
        };
        assert_eq!(map_fcm_response(200, None, "{}"), PushOutcome::Delivered);
        let unreg = google_error(
            404,
            "NOT_FOUND",
            "Requested entity was not found.",
            fcm_err("UNREGISTERED"),
        );
        assert_eq!(
            map_fcm_response(404, None, &unreg),
            PushOutcome::InvalidToken {
                reason: "fcm 404 UNREGISTERED: Requested entity was not found.".into()
            }
        );
        let bad_token = google_error(
            400,
            "INVALID_ARGUMENT",
            "The registration token is not a valid FCM registration token",
            fcm_err("INVALID_ARGUMENT"),
        );
        assert_eq!(
            map_fcm_response(400, None, &bad_token).label(),
            "invalid_token"
        );
        let violation = google_error(
            400,
            "INVALID_ARGUMENT",
            "Invalid value",
            json!([{"@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{"field": "message.token",
                                         "description": "Invalid registration token"}]}]),
        );
        assert_eq!(
            map_fcm_response(400, None, &violation).label(),
            "invalid_token"
        );
        let bad_ttl = google_error(
            400,
            "INVALID_ARGUMENT",
            "Invalid value at 'message.android.ttl'",
            fcm_err("INVALID_ARGUMENT"),
        );
        assert_eq!(map_fcm_response(400, None, &bad_ttl).label(), "failed");
        let mismatch = google_error(403, "PERMISSION_DENIED", "", fcm_err("SENDER_ID_MISMATCH"));
        assert_eq!(
            map_fcm_response(403, None, &mismatch).label(),
            "invalid_token"
        );
        let denied = google_error(403, "PERMISSION_DENIED", "no", json!([]));
        assert_eq!(map_fcm_response(403, None, &denied).label(), "auth_error");
        assert_eq!(map_fcm_response(401, None, "").label(), "auth_error");
        assert_eq!(
            map_fcm_response(429, Some(Duration::from_secs(7)), "not json"),
            PushOutcome::Retry {
                reason: "fcm 429".into(),
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(map_fcm_response(503, None, "").label(), "retry");
        assert_eq!(map_fcm_response(500, None, "").label(), "retry");
        assert_eq!(map_fcm_response(413, None, "").label(), "failed");
    }

    #[test]
    fn service_account_errors_do_not_quote_input() {
        let err = ServiceAccount::from_json("\"-----BEGIN PRIVATE KEY----- SECRET\"")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("SECRET"), "{err}");
        let err = ServiceAccount::from_json(r#"{"private_key": "SECRET"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("client_email"), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
        let sa = ServiceAccount::from_json(
            r#"{"type": "service_account", "project_id": "p", "client_email": "a@b",
                "private_key": "SECRET", "token_uri": "http://t"}"#,
        )
        .unwrap();
        assert!(!format!("{sa:?}").contains("SECRET"));
        let err = FcmProvider::new(sa, FcmOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("private_key"), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
    }
}
