//! Wire types shared by the gateway, the SDK and the tests.
//!
//! Everything a client or a backend puts on the wire is defined here once, so the
//! gateway and the SDK cannot drift apart. `docs/protocol.md` is the prose reference
//! for these types; a change here must be reflected there.

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;

/// WebSocket subprotocol spoken on `GET /v1/connect`.
pub const SUBPROTOCOL: &str = "herald.v1";

/// Limits on identifiers (device ids, user ids, topics, keys). Bounded so a hostile
/// client cannot make the store index megabyte-long keys.
pub const MAX_ID_LEN: usize = 128;

/// The one rule for identifiers (device ids, user ids, topics): 1–128 characters of
/// `[A-Za-z0-9._:@-]`, so they are safe in URLs, NATS subjects and logs. The gateway
/// refuses anything else, so a client that checked with a looser rule would keep
/// sending what can never be accepted. `Err` says what is wrong, to prefix with a name.
pub fn validate_id(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > MAX_ID_LEN {
        return Err(format!(
            "is {} bytes long; the maximum is {MAX_ID_LEN}",
            value.len()
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '-')))
    {
        return Err(format!(
            "contains {c:?}; only letters, digits and . _ : @ - are allowed"
        ));
    }
    Ok(())
}

/// JSON text kept byte for byte as the backend sent it: `data` is delivered as-is, so
/// a number like `123456789012345678901234567890` must never pass through an `f64`.
/// Cloning shares the text.
///
/// serde cannot hand raw JSON through internally tagged or untagged enums (it buffers
/// them into its own value type first), so this type only appears in plain structs.
#[derive(Clone)]
pub struct RawJson(Arc<RawValue>);

impl RawJson {
    /// The JSON text, exactly as received.
    pub fn get(&self) -> &str {
        self.0.get()
    }
    /// Parses `text`, keeping it verbatim.
    pub fn from_text(text: impl Into<String>) -> serde_json::Result<RawJson> {
        RawValue::from_string(text.into()).map(|r| RawJson(Arc::from(r)))
    }
    pub fn is_object(&self) -> bool {
        // RawValue holds one valid JSON value without surrounding whitespace.
        self.get().starts_with('{')
    }
    /// The text parsed into a `Value` (numbers beyond `f64` lose precision there).
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.get()).expect("RawJson holds valid JSON")
    }
}

impl From<Value> for RawJson {
    fn from(v: Value) -> RawJson {
        RawJson(Arc::from(
            serde_json::value::to_raw_value(&v).expect("a Value serializes"),
        ))
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &RawJson) -> bool {
        self.get() == other.get()
    }
}

impl std::fmt::Debug for RawJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.get())
    }
}

impl std::fmt::Display for RawJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.get())
    }
}

impl Serialize for RawJson {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for RawJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RawJson, D::Error> {
        Box::<RawValue>::deserialize(d).map(|r| RawJson(Arc::from(r)))
    }
}

/// In the OpenAPI spec `data` is a JSON object (the gateway refuses anything else).
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for RawJson {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::Object)
            .description(Some(
                "Any JSON object, delivered to the app as the exact text sent.",
            ))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for RawJson {}

/// Where a message goes. Exactly one of the three.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    User(String),
    Device(String),
    Topic(String),
}

/// What `to` must be, for the errors that name it: serde's derived enum answered an
/// empty object, `null` and two keys alike with "expected value".
const TARGET_SHAPE: &str =
    r#"an object with exactly one of `user`, `device`, `topic`, e.g. {"user": "alice"}"#;

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TargetVisitor;
        impl<'de> serde::de::Visitor<'de> for TargetVisitor {
            type Value = Target;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(TARGET_SHAPE)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Target, A::Error> {
                use serde::de::Error;
                const KINDS: &[&str] = &["user", "device", "topic"];
                // Read as text, not as an enum, so that an unknown kind is an error of
                // `to` itself rather than of a key path that cannot be named.
                let Some(kind) = map.next_key::<String>()? else {
                    return Err(A::Error::custom(format_args!(
                        "empty; expected {TARGET_SHAPE}"
                    )));
                };
                let make = match kind.as_str() {
                    "user" => Target::User,
                    "device" => Target::Device,
                    "topic" => Target::Topic,
                    other => return Err(A::Error::unknown_variant(other, KINDS)),
                };
                let target = make(map.next_value()?);
                if let Some(other) = map.next_key::<String>()? {
                    return Err(A::Error::custom(format_args!(
                        "has both `{}` and `{other}`; expected {TARGET_SHAPE}",
                        target.kind()
                    )));
                }
                Ok(target)
            }
        }
        d.deserialize_map(TargetVisitor)
    }
}

impl Target {
    pub fn kind(&self) -> &'static str {
        match self {
            Target::User(_) => "user",
            Target::Device(_) => "device",
            Target::Topic(_) => "topic",
        }
    }
    pub fn value(&self) -> &str {
        match self {
            Target::User(v) | Target::Device(v) | Target::Topic(v) => v,
        }
    }
}

/// The visible part of a notification, as shown by the OS when the app is not running.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notification {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub badge: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sound: Option<String>,
}

/// When a message may go through APNs/FCM.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushPolicy {
    /// Push only when the message was not delivered live (offline, or no ack in time).
    #[default]
    Fallback,
    /// Push as well as live delivery.
    Always,
    /// Never push; the device gets it live or on its next sync.
    Never,
}

impl PushPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PushPolicy::Fallback => "fallback",
            PushPolicy::Always => "always",
            PushPolicy::Never => "never",
        }
    }
}

/// What a push carries.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushContent {
    /// Data and notification, when they fit the provider's limit.
    #[default]
    Full,
    /// Only message id and seq; the app fetches the body (privacy, or too large).
    Hint,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    High,
    #[default]
    Normal,
}

/// `POST /v1/messages`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub to: Target,
    #[serde(default = "empty_object")]
    pub data: RawJson,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification: Option<Notification>,
    #[serde(default)]
    pub push: PushPolicy,
    #[serde(default)]
    pub push_content: PushContent,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collapse_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

fn empty_object() -> RawJson {
    RawJson::from_text("{}").expect("valid JSON")
}

impl PublishRequest {
    /// A message to `to` with `data` and every option at its default.
    pub fn new(to: Target, data: Value) -> Self {
        PublishRequest {
            to,
            data: data.into(),
            notification: None,
            push: PushPolicy::default(),
            push_content: PushContent::default(),
            ttl_seconds: None,
            priority: Priority::default(),
            collapse_key: None,
            idempotency_key: None,
        }
    }
}

/// `202` answer of `POST /v1/messages`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishResponse {
    pub message_id: String,
    pub recipients: u64,
    /// True when an earlier message with the same idempotency key was returned.
    #[serde(default)]
    pub duplicate: bool,
    /// Set when `recipients` is 0: why nothing was stored, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// Most messages one `POST /v1/messages/batch` may carry.
pub const MAX_BATCH_ITEMS: usize = 500;

/// `POST /v1/messages/batch`: each item is exactly a `POST /v1/messages` body.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishBatchRequest {
    #[cfg_attr(feature = "openapi", schema(min_items = 1, max_items = 500))]
    pub messages: Vec<PublishRequest>,
}

/// `202` answer of `POST /v1/messages/batch`: one result per item, in request order.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishBatchResponse {
    pub results: Vec<BatchItemResult>,
}

/// What happened to one item of a batch.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BatchItemResult {
    Ok(PublishResponse),
    Err(ErrorBody),
}

/// Per-device delivery state of a message.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    Queued,
    Sent,
    Acked,
    Pushed,
    PushFailed,
    Expired,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Queued => "queued",
            DeliveryState::Sent => "sent",
            DeliveryState::Acked => "acked",
            DeliveryState::Pushed => "pushed",
            DeliveryState::PushFailed => "push_failed",
            DeliveryState::Expired => "expired",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => DeliveryState::Queued,
            "sent" => DeliveryState::Sent,
            "acked" => DeliveryState::Acked,
            "pushed" => DeliveryState::Pushed,
            "push_failed" => DeliveryState::PushFailed,
            "expired" => DeliveryState::Expired,
            _ => return None,
        })
    }
}

/// One device's view of one message, in `GET /v1/messages/{id}`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub device_id: String,
    pub seq: i64,
    pub state: DeliveryState,
    /// RFC 3339 times (UTC) of each step that happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_provider: Option<String>,
    /// Why a push failed, or why the message was not delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `GET /v1/messages/{id}`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageStatus {
    pub message_id: String,
    pub to: Target,
    pub data: RawJson,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification: Option<Notification>,
    pub push: PushPolicy,
    pub push_content: PushContent,
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collapse_key: Option<String>,
    pub created_at: String,
    pub expires_at: String,
    pub deliveries: Vec<DeliveryRecord>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    Ios,
    Android,
    Other,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Ios => "ios",
            Platform::Android => "android",
            Platform::Other => "other",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ios" => Some(Platform::Ios),
            "android" => Some(Platform::Android),
            "other" => Some(Platform::Other),
            _ => None,
        }
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushProviderKind {
    Apns,
    Fcm,
}

impl PushProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PushProviderKind::Apns => "apns",
            PushProviderKind::Fcm => "fcm",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "apns" => Some(PushProviderKind::Apns),
            "fcm" => Some(PushProviderKind::Fcm),
            _ => None,
        }
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApnsEnvironment {
    Sandbox,
    Production,
}

impl ApnsEnvironment {
    pub fn as_str(self) -> &'static str {
        match self {
            ApnsEnvironment::Sandbox => "sandbox",
            ApnsEnvironment::Production => "production",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sandbox" => Some(ApnsEnvironment::Sandbox),
            "production" => Some(ApnsEnvironment::Production),
            _ => None,
        }
    }
}

/// `PUT /v1/me/devices/{device_id}`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterDeviceRequest {
    pub platform: Platform,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_provider: Option<PushProviderKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apns_environment: Option<ApnsEnvironment>,
}

/// State of a device's push token.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushTokenState {
    /// No token registered.
    None,
    Active,
    /// The provider said the token is dead; no pushes until re-registered.
    Invalid,
}

impl PushTokenState {
    pub fn as_str(self) -> &'static str {
        match self {
            PushTokenState::None => "none",
            PushTokenState::Active => "active",
            PushTokenState::Invalid => "invalid",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(PushTokenState::None),
            "active" => Some(PushTokenState::Active),
            "invalid" => Some(PushTokenState::Invalid),
            _ => None,
        }
    }
}

/// `GET /v1/devices/{id}` and the items of `GET /v1/users/{user}/devices`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub device_id: String,
    pub user: String,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub platform: Option<Platform>,
    pub online: bool,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub last_seen: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub push_provider: Option<PushProviderKind>,
    pub push_token: PushTokenState,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub push_token_error: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub apns_environment: Option<ApnsEnvironment>,
    /// Highest seq assigned to this device's inbox.
    pub last_seq: i64,
    /// Highest seq the device acknowledged.
    pub acked_seq: i64,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceList {
    pub devices: Vec<DeviceInfo>,
}

/// `POST /v1/tokens`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// Binds the token to this one device (the `did` claim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Topics the device may subscribe to itself (the `topics` claim): exact topics or
    /// prefixes ending in `*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topics: Option<Vec<String>>,
}

/// `GET /v1/devices/{id}/topics`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicList {
    pub topics: Vec<String>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenResponse {
    pub token: String,
    pub expires_at: String,
}

/// One inbox entry as delivered to a device (WebSocket `msg` frame, sync item), as a
/// client parses it. The gateway does not build this type: it writes `data` verbatim
/// into pre-rendered frames (a `Value` here would round numbers through `f64`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboxMessage {
    pub seq: i64,
    pub id: String,
    pub data: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification: Option<Notification>,
    pub sent_at: String,
}

/// `GET /v1/me/sync`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncResponse {
    pub messages: Vec<InboxMessage>,
    /// True when more entries follow; call again with `after` = last seq.
    pub has_more: bool,
    /// Highest seq assigned to this device (what a fully caught-up client has).
    pub last_seq: i64,
}

/// `POST /v1/me/ack`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckRequest {
    pub device_id: String,
    pub seq: i64,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckResponse {
    pub acked_seq: i64,
}

/// Every error answer: `{"error": {"code", "message"}}`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// Frames the gateway sends on the WebSocket (JSON text, tagged by `type`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        session_id: String,
        heartbeat_s: u64,
        ack_timeout_s: u64,
        /// Highest seq assigned to this device when the session started.
        last_seq: i64,
    },
    Msg(InboxMessage),
    Pong,
    /// Subscription confirmed (answer to `subscribe`/`unsubscribe`).
    Subscribed {
        topic: String,
    },
    Unsubscribed {
        topic: String,
    },
    /// The server is going away: reconnect after the delay (to any node).
    Reconnect {
        after_ms: u64,
    },
    Error {
        code: String,
        message: String,
    },
}

/// Frames a device sends on the WebSocket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Cumulative: everything up to and including `seq` was received.
    Ack {
        seq: i64,
    },
    Ping,
    Subscribe {
        topic: String,
    },
    Unsubscribe {
        topic: String,
    },
}

/// Keys Herald puts into push payloads (APNs `userInfo`, FCM `data`) so the SDK can
/// recognise its pushes and sync.
pub mod push_keys {
    /// Marker object key in the APNs payload / prefix of FCM data keys.
    pub const HERALD: &str = "herald";
    pub const MESSAGE_ID: &str = "herald_id";
    pub const SEQ: &str = "herald_seq";
    pub const DEVICE_ID: &str = "herald_device";
    /// "1" when the push is a content-free sync hint.
    pub const HINT: &str = "herald_hint";
    /// JSON-encoded `data` of the message in a full push.
    pub const DATA: &str = "herald_data";
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn publish_request_defaults_and_round_trip() {
        let req: PublishRequest =
            serde_json::from_value(json!({"to": {"user": "u1"}, "data": {"k": 1}})).unwrap();
        assert_eq!(req.to, Target::User("u1".into()));
        assert_eq!(req.push, PushPolicy::Fallback);
        assert_eq!(req.push_content, PushContent::Full);
        assert_eq!(req.priority, Priority::Normal);
        let back: PublishRequest =
            serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn ids_follow_one_rule() {
        assert!(validate_id("device-1.a_b:c@d").is_ok());
        assert!(validate_id(&"x".repeat(MAX_ID_LEN)).is_ok());
        for bad in ["", "my phone", "a/b", "é", "a\0b", "x' OR '1'='1"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_id(&"x".repeat(MAX_ID_LEN + 1)).is_err());
    }

    #[test]
    fn data_keeps_the_exact_text() {
        let body = r#"{"to":{"user":"u1"},"data":{"n": 123456789012345678901234567890, "f":1.50}}"#;
        let req: PublishRequest = serde_json::from_str(body).unwrap();
        assert_eq!(
            req.data.get(),
            r#"{"n": 123456789012345678901234567890, "f":1.50}"#
        );
        assert!(req.data.is_object());
        let again = serde_json::to_string(&req).unwrap();
        assert!(
            again.contains(r#""data":{"n": 123456789012345678901234567890, "f":1.50}"#),
            "{again}"
        );
        let defaulted: PublishRequest = serde_json::from_str(r#"{"to":{"user":"u1"}}"#).unwrap();
        assert_eq!(defaulted.data.get(), "{}");
        let list: PublishRequest =
            serde_json::from_str(r#"{"to":{"user":"u1"},"data":[1]}"#).unwrap();
        assert!(!list.data.is_object());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_value::<PublishRequest>(
            json!({"to": {"user": "u1"}, "data": {}, "colour": "red"}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        assert!(serde_json::from_value::<PublishRequest>(
            json!({"to": {"user": "u1", "device": "d"}})
        )
        .is_err());
    }

    #[test]
    fn frames_are_tagged_by_type() {
        let f = ServerFrame::Reconnect { after_ms: 500 };
        assert_eq!(
            serde_json::to_value(&f).unwrap(),
            json!({"type": "reconnect", "after_ms": 500})
        );
        let c: ClientFrame = serde_json::from_str(r#"{"type":"ack","seq":7}"#).unwrap();
        assert_eq!(c, ClientFrame::Ack { seq: 7 });
        let m = ServerFrame::Msg(InboxMessage {
            seq: 1,
            id: "m".into(),
            data: json!({}),
            notification: None,
            sent_at: "t".into(),
        });
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["type"], "msg");
        assert_eq!(v["seq"], 1);
    }
}
