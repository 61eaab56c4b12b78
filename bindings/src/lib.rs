//! UniFFI surface of the Herald SDK for Swift and Kotlin.
//!
//! Synchronous functions, objects, records, enums and callback interfaces only (no
//! `async fn`: the SDK runs its own runtime). Every fallible call throws
//! `HeraldError` (Swift) / `HeraldException` (Kotlin), a typed enum.

use std::sync::Arc;
use std::time::Duration;

use herald_sdk as sdk;

#[cfg(target_os = "android")]
mod android;

uniffi::setup_scaffolding!();

/// Errors of every call (Swift `HeraldError`, Kotlin `HeraldException`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, uniffi::Error)]
pub enum HeraldError {
    #[error("invalid configuration: {detail}")]
    InvalidConfig { detail: String },
    #[error("network error: {detail}")]
    Network { detail: String },
    /// The gateway's TLS certificate was refused (untrusted, expired, wrong name, or
    /// a pin mismatch with `pinnedSpkiSha256`). Not terminal: retried with backoff.
    #[error("certificate refused: {detail}")]
    Certificate { detail: String },
    #[error("timed out: {detail}")]
    Timeout { detail: String },
    #[error("unauthorized: {detail}")]
    Unauthorized { detail: String },
    #[error("forbidden: {detail}")]
    Forbidden { detail: String },
    #[error("device not found: {detail}")]
    DeviceNotFound { detail: String },
    #[error("token provider failed: {detail}")]
    TokenProvider { detail: String },
    #[error("gateway answered {status} {code}: {detail}")]
    Server {
        status: u16,
        code: String,
        detail: String,
    },
    #[error("rate limited, retry after {retry_after_ms:?} ms")]
    RateLimited { retry_after_ms: Option<u64> },
    #[error("storage error: {detail}")]
    Storage { detail: String },
    #[error("not a Herald push payload")]
    NotHeraldPush,
    #[error("invalid push payload: {detail}")]
    InvalidPayload { detail: String },
    #[error("protocol error: {detail}")]
    Protocol { detail: String },
    #[error("client is closed")]
    Closed,
    /// A callback (token provider) threw something that is not a `HeraldError`.
    #[error("callback failed: {detail}")]
    Callback { detail: String },
}

impl From<sdk::Error> for HeraldError {
    fn from(e: sdk::Error) -> Self {
        use sdk::Error as E;
        match e {
            E::InvalidConfig(detail) => HeraldError::InvalidConfig { detail },
            E::Network(detail) => HeraldError::Network { detail },
            E::Certificate(detail) => HeraldError::Certificate { detail },
            E::Timeout(detail) => HeraldError::Timeout { detail },
            E::Unauthorized(detail) => HeraldError::Unauthorized { detail },
            E::Forbidden(detail) => HeraldError::Forbidden { detail },
            E::DeviceNotFound(detail) => HeraldError::DeviceNotFound { detail },
            E::TokenProvider(detail) => HeraldError::TokenProvider { detail },
            E::Server {
                status,
                code,
                message,
            } => HeraldError::Server {
                status,
                code,
                detail: message,
            },
            E::RateLimited { retry_after } => HeraldError::RateLimited {
                retry_after_ms: retry_after.map(|d| d.as_millis() as u64),
            },
            E::Storage(detail) => HeraldError::Storage { detail },
            E::NotHeraldPush => HeraldError::NotHeraldPush,
            E::InvalidPayload(detail) => HeraldError::InvalidPayload { detail },
            E::Protocol(detail) => HeraldError::Protocol { detail },
            E::Closed => HeraldError::Closed,
        }
    }
}

impl From<uniffi::UnexpectedUniFFICallbackError> for HeraldError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        HeraldError::Callback { detail: e.reason }
    }
}

/// The transport a session runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Transport {
    WebSocket,
    /// Server-Sent Events (a proxy refused WebSocket upgrades, or forced).
    Sse,
    /// Long-poll (neither WebSocket nor SSE got through, or forced).
    LongPoll,
}

/// `ClientConfig.transport`: which transport to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum TransportPreference {
    /// WebSocket, falling back to SSE then long-poll where WebSocket upgrades are
    /// refused (WebSocket is retried every 5 minutes and on `networkChanged(true)`).
    Auto,
    WebSocket,
    Sse,
    LongPoll,
}

/// Connection state (see the SDK docs).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum ConnectionState {
    Disconnected,
    Connecting,
    /// Messages flow over `transport`.
    Connected {
        transport: Transport,
    },
    WaitingToReconnect {
        delay_ms: u64,
    },
    Suspended,
    Closed,
}

impl From<sdk::ConnectionState> for ConnectionState {
    fn from(s: sdk::ConnectionState) -> Self {
        match s {
            sdk::ConnectionState::Disconnected => ConnectionState::Disconnected,
            sdk::ConnectionState::Connecting => ConnectionState::Connecting,
            sdk::ConnectionState::Connected { transport } => ConnectionState::Connected {
                transport: match transport {
                    sdk::TransportKind::WebSocket => Transport::WebSocket,
                    sdk::TransportKind::Sse => Transport::Sse,
                    sdk::TransportKind::LongPoll => Transport::LongPoll,
                },
            },
            sdk::ConnectionState::WaitingToReconnect { delay_ms } => {
                ConnectionState::WaitingToReconnect { delay_ms }
            }
            sdk::ConnectionState::Suspended => ConnectionState::Suspended,
            sdk::ConnectionState::Closed => ConnectionState::Closed,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct HeraldNotification {
    pub title: Option<String>,
    pub body: Option<String>,
    pub badge: Option<u32>,
    pub sound: Option<String>,
}

/// One message. `data_json` is the message's `data` as JSON text.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct HeraldMessage {
    pub seq: i64,
    pub id: String,
    pub data_json: String,
    pub notification: Option<HeraldNotification>,
    /// RFC 3339; empty when the message came from a push payload alone.
    pub sent_at: String,
}

impl From<sdk::InboxMessage> for HeraldMessage {
    fn from(m: sdk::InboxMessage) -> Self {
        HeraldMessage {
            seq: m.seq,
            id: m.id,
            data_json: m.data.to_string(),
            notification: m.notification.map(|n| HeraldNotification {
                title: n.title,
                body: n.body,
                badge: n.badge,
                sound: n.sound,
            }),
            sent_at: m.sent_at,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum PushProvider {
    Apns,
    Fcm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum ApnsEnvironment {
    Sandbox,
    Production,
}

/// The gateway's view of this device after a push-token registration.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct DeviceRegistration {
    pub device_id: String,
    pub user: String,
    /// "none", "active" or "invalid".
    pub push_token_state: String,
    pub online: bool,
    pub last_seq: i64,
    pub acked_seq: i64,
}

/// Client configuration; only `base_url` and `data_dir` are required.
#[derive(Debug, Clone, uniffi::Record)]
pub struct ClientConfig {
    /// `http(s)://host[:port]` of the gateway.
    pub base_url: String,
    /// This installation's stable device id. `null`/`nil`: the SDK generates a
    /// random one (UUID v4) once and keeps it in `data_dir` (read it with
    /// `deviceId()`; `reset()` forgets it).
    #[uniffi(default = None)]
    pub device_id: Option<String>,
    /// Directory for the SDK's SQLite file (e.g. Application Support / filesDir). An
    /// app and its notification service extension / FCM service may share it (App
    /// Group container): the SDK coordinates the two processes through the file.
    pub data_dir: String,
    #[uniffi(default = true)]
    pub suspend_in_background: bool,
    #[uniffi(default = 500)]
    pub backoff_min_ms: u64,
    #[uniffi(default = 30000)]
    pub backoff_max_ms: u64,
    #[uniffi(default = 10000)]
    pub connect_timeout_ms: u64,
    #[uniffi(default = 10000)]
    pub request_timeout_ms: u64,
    /// Client ping interval; `None` uses the gateway's heartbeat.
    #[uniffi(default = None)]
    pub heartbeat_ms: Option<u64>,
    /// In the foreground: ping this often and reconnect when nothing answers within
    /// `pong_timeout_ms` (a dead network is noticed in ~15 s instead of ~52 s).
    /// 0: heartbeats only.
    #[uniffi(default = 10000)]
    pub foreground_ping_ms: u64,
    #[uniffi(default = 5000)]
    pub pong_timeout_ms: u64,
    /// Deadline of `handlePush` (sync, record and ack), well under the ~30 s an iOS
    /// notification service extension gets.
    #[uniffi(default = 20000)]
    pub push_deadline_ms: u64,
    /// `null`/`nil`: `Auto`.
    #[uniffi(default = None)]
    pub transport: Option<TransportPreference>,
    /// Certificate pinning: base64 SHA-256 digests of SubjectPublicKeyInfos (as
    /// `openssl x509 -pubkey | openssl pkey -pubin -outform der | openssl dgst
    /// -sha256 -binary | base64` prints; a `sha256/` prefix is accepted). When not
    /// empty, the gateway's certificate or an intermediate it sends must have one of
    /// these keys, on top of the platform's validation. Pin a backup key. Empty
    /// (default): no pinning.
    #[uniffi(default = [])]
    pub pinned_spki_sha256: Vec<String>,
}

/// What `handlePush` did.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct HandledPush {
    /// The new messages the push brings (recorded as handled: never also given to
    /// the listener, nor by another process sharing the data directory).
    pub messages: Vec<HeraldMessage>,
    /// The gateway confirmed the ack before `handlePush` returned. False: the ack
    /// failed or missed the deadline (the next connect or push sends it).
    pub acked: bool,
}

/// Counters of one client.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ClientStats {
    pub connect_attempts: u64,
    pub connections: u64,
    /// Sessions established after the first one.
    pub reconnects: u64,
    pub messages_delivered: u64,
    /// Not given to the listener: handled already (replay, or the other process).
    pub duplicates_skipped: u64,
    /// Round trip of the last client ping, in ms.
    pub last_rtt_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// Receives the SDK's log lines (forward them to os_log / Logcat). Called on one
/// SDK thread (`herald-sdk-log`), in order.
#[uniffi::export(callback_interface)]
pub trait HeraldLogger: Send + Sync {
    fn log(&self, level: LogLevel, message: String);
}

struct LoggerAdapter(Box<dyn HeraldLogger>);

impl sdk::Logger for LoggerAdapter {
    fn log(&self, level: sdk::LogLevel, message: String) {
        let level = match level {
            sdk::LogLevel::Error => LogLevel::Error,
            sdk::LogLevel::Warn => LogLevel::Warn,
            sdk::LogLevel::Info => LogLevel::Info,
            sdk::LogLevel::Debug => LogLevel::Debug,
            sdk::LogLevel::Trace => LogLevel::Trace,
        };
        self.0.log(level, message);
    }
}

/// Sends the SDK's log lines at `level` and above to `logger` (process-wide);
/// `null`/`nil` stops.
#[uniffi::export]
pub fn set_logger(logger: Option<Box<dyn HeraldLogger>>, level: LogLevel) {
    let level = match level {
        LogLevel::Error => sdk::LogLevel::Error,
        LogLevel::Warn => sdk::LogLevel::Warn,
        LogLevel::Info => sdk::LogLevel::Info,
        LogLevel::Debug => sdk::LogLevel::Debug,
        LogLevel::Trace => sdk::LogLevel::Trace,
    };
    sdk::set_logger(
        logger.map(|l| std::sync::Arc::new(LoggerAdapter(l)) as std::sync::Arc<dyn sdk::Logger>),
        level,
    );
}

/// Error passed to `HeraldListener.onError`.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ErrorEvent {
    pub error: HeraldError,
    /// True when the client stopped reconnecting (call `connect()` to try again).
    pub terminal: bool,
}

/// The app's listener. Called on one SDK thread, in order (dispatch to the UI
/// thread yourself).
#[uniffi::export(callback_interface)]
pub trait HeraldListener: Send + Sync {
    fn on_state_changed(&self, state: ConnectionState);
    /// A new message. Returning is the acknowledgement: the SDK commits it as
    /// handled before the next message, then acks it to the gateway. If the process
    /// dies, at most the one message whose `onMessage` was running is delivered
    /// again on the next start: de-duplicate that one by `id`.
    fn on_message(&self, message: HeraldMessage);
    /// An error; when `event.terminal`, `on_state_changed(Disconnected)` came first.
    fn on_error(&self, event: ErrorEvent);
    /// The gateway confirmed a subscribe (`subscribed`) or unsubscribe.
    fn on_subscription_changed(&self, topic: String, subscribed: bool);
    /// The gateway refused a subscribe (`subscribe`) or unsubscribe; `code` is its
    /// error code (e.g. `forbidden_topic`). A refused subscribe is not re-sent.
    fn on_subscription_failed(&self, topic: String, subscribe: bool, code: String, message: String);
}

/// Supplies device JWTs (fetch one from your backend). Called on an SDK background
/// thread when no valid token is held, when it expired, or once after a 401. May
/// block; throw a `HeraldError` (e.g. `TokenProvider`) when no token can be had.
#[uniffi::export(callback_interface)]
pub trait TokenProvider: Send + Sync {
    /// A token for `device_id`: the client's effective device id (the configured
    /// one, or the generated one when `ClientConfig.deviceId` was null). The
    /// gateway requires it as the token's `did` claim, so have your backend mint
    /// the token for exactly this id.
    fn fetch_token(&self, device_id: String) -> Result<String, HeraldError>;
}

struct ListenerAdapter(Box<dyn HeraldListener>);

impl sdk::Listener for ListenerAdapter {
    fn on_state_changed(&self, state: sdk::ConnectionState) {
        self.0.on_state_changed(state.into());
    }
    fn on_message(&self, message: sdk::InboxMessage) {
        self.0.on_message(message.into());
    }
    fn on_error(&self, error: sdk::Error, terminal: bool) {
        self.0.on_error(ErrorEvent {
            error: error.into(),
            terminal,
        });
    }
    fn on_subscription_changed(&self, topic: String, subscribed: bool) {
        self.0.on_subscription_changed(topic, subscribed);
    }
    fn on_subscription_failed(
        &self,
        topic: String,
        subscribe: bool,
        code: String,
        message: String,
    ) {
        self.0
            .on_subscription_failed(topic, subscribe, code, message);
    }
}

struct TokenAdapter(Box<dyn TokenProvider>);

impl sdk::TokenProvider for TokenAdapter {
    fn fetch_token(&self, device_id: &str) -> Result<String, String> {
        self.0
            .fetch_token(device_id.to_string())
            .map_err(|e| e.to_string())
    }
}

/// A Herald client. Create one per device id; call `close()` when done (also done
/// when the object is destroyed).
#[derive(uniffi::Object)]
pub struct HeraldClient {
    inner: sdk::HeraldClient,
}

#[uniffi::export]
impl HeraldClient {
    /// Opens the local store and starts the SDK threads; does not connect yet.
    #[uniffi::constructor]
    pub fn new(
        config: ClientConfig,
        listener: Box<dyn HeraldListener>,
        token_provider: Box<dyn TokenProvider>,
    ) -> Result<Arc<Self>, HeraldError> {
        let mut c = sdk::Config::new(
            config.base_url,
            config.device_id.unwrap_or_default(),
            config.data_dir,
        );
        c.suspend_in_background = config.suspend_in_background;
        c.backoff_min = Duration::from_millis(config.backoff_min_ms);
        c.backoff_max = Duration::from_millis(config.backoff_max_ms);
        c.connect_timeout = Duration::from_millis(config.connect_timeout_ms.max(1));
        c.request_timeout = Duration::from_millis(config.request_timeout_ms.max(1));
        c.heartbeat = config.heartbeat_ms.map(Duration::from_millis);
        c.foreground_ping = (config.foreground_ping_ms > 0)
            .then(|| Duration::from_millis(config.foreground_ping_ms));
        c.pong_timeout = Duration::from_millis(config.pong_timeout_ms.max(1));
        c.push_deadline = Duration::from_millis(config.push_deadline_ms.max(1));
        c.transport = match config.transport.unwrap_or(TransportPreference::Auto) {
            TransportPreference::Auto => sdk::TransportPreference::Auto,
            TransportPreference::WebSocket => sdk::TransportPreference::WebSocket,
            TransportPreference::Sse => sdk::TransportPreference::Sse,
            TransportPreference::LongPoll => sdk::TransportPreference::LongPoll,
        };
        c.pinned_spki_sha256 = config.pinned_spki_sha256;
        let inner = sdk::HeraldClient::new(
            c,
            Arc::new(ListenerAdapter(listener)),
            Arc::new(TokenAdapter(token_provider)),
        )?;
        Ok(Arc::new(HeraldClient { inner }))
    }

    /// Connect and stay connected (reconnecting with backoff).
    pub fn connect(&self) {
        self.inner.connect();
    }

    /// Close the connection and stop reconnecting.
    pub fn disconnect(&self) {
        self.inner.disconnect();
    }

    /// Report connectivity changes (NWPathMonitor / ConnectivityManager).
    pub fn network_changed(&self, available: bool) {
        self.inner.network_changed(available);
    }

    pub fn app_foreground(&self) {
        self.inner.app_foreground();
    }

    pub fn app_background(&self) {
        self.inner.app_background();
    }

    pub fn subscribe(&self, topic: String) -> Result<(), HeraldError> {
        Ok(self.inner.subscribe(&topic)?)
    }

    pub fn unsubscribe(&self, topic: String) -> Result<(), HeraldError> {
        Ok(self.inner.unsubscribe(&topic)?)
    }

    /// Fetch pending messages over HTTP; they arrive through the listener.
    pub fn sync_now(&self) {
        self.inner.sync_now();
    }

    /// Turns an APNs userInfo / FCM data payload (JSON) into the new messages it
    /// brings (fetching the body of a sync hint), records them as handled and acks
    /// them, all within `pushDeadlineMs`. Returned messages are NOT also given to
    /// the listener. Blocking: call from a background thread; `shutdown()` right
    /// after is safe.
    pub fn handle_push(&self, payload_json: String) -> Result<HandledPush, HeraldError> {
        Ok(self.inner.handle_push(&payload_json)?.into())
    }

    /// `handlePush` with its own deadline (e.g. what the extension has left).
    pub fn handle_push_within(
        &self,
        payload_json: String,
        deadline_ms: u64,
    ) -> Result<HandledPush, HeraldError> {
        Ok(self
            .inner
            .handle_push_within(&payload_json, Duration::from_millis(deadline_ms))?
            .into())
    }

    /// Logout / account switch: removes this device's push token from the gateway
    /// (no more pushes). Blocking: call from a background thread.
    pub fn unregister(&self) -> Result<(), HeraldError> {
        Ok(self.inner.unregister()?)
    }

    /// Logout / account switch: disconnects and forgets the local state (cursor,
    /// handled ids, topics, the generated device id). Create a new client after.
    pub fn reset(&self) -> Result<(), HeraldError> {
        Ok(self.inner.reset()?)
    }

    /// This client's device id (the generated one when the config gave none).
    pub fn device_id(&self) -> String {
        self.inner.device_id().to_string()
    }

    /// Counters: reconnects, last ping RTT, messages delivered / skipped.
    pub fn stats(&self) -> ClientStats {
        let s = self.inner.stats();
        ClientStats {
            connect_attempts: s.connect_attempts,
            connections: s.connections,
            reconnects: s.reconnects,
            messages_delivered: s.messages_delivered,
            duplicates_skipped: s.duplicates_skipped,
            last_rtt_ms: s.last_rtt_ms,
        }
    }

    /// Registers this device's push token with the gateway. Blocking: call from a
    /// background thread.
    pub fn register_push_token(
        &self,
        provider: PushProvider,
        token: String,
        environment: Option<ApnsEnvironment>,
    ) -> Result<DeviceRegistration, HeraldError> {
        let provider = match provider {
            PushProvider::Apns => sdk::PushProviderKind::Apns,
            PushProvider::Fcm => sdk::PushProviderKind::Fcm,
        };
        let environment = environment.map(|e| match e {
            ApnsEnvironment::Sandbox => sdk::ApnsEnvironment::Sandbox,
            ApnsEnvironment::Production => sdk::ApnsEnvironment::Production,
        });
        let d = self
            .inner
            .register_push_token(provider, &token, environment)?;
        Ok(DeviceRegistration {
            device_id: d.device_id,
            user: d.user,
            push_token_state: d.push_token.as_str().to_string(),
            online: d.online,
            last_seq: d.last_seq,
            acked_seq: d.acked_seq,
        })
    }

    pub fn state(&self) -> ConnectionState {
        self.inner.state().into()
    }

    /// Stop everything; the listener receives `Closed` last. Waits at most 0.5 s
    /// (safe on the main thread); queued messages not yet given to the listener
    /// come again on the next start.
    /// (Named `shutdown` because Kotlin's generated `close()` is `AutoCloseable`'s,
    /// which frees the object — and shuts down too.)
    pub fn shutdown(&self) {
        self.inner.close();
    }
}

impl From<sdk::PushOutcome> for HandledPush {
    fn from(o: sdk::PushOutcome) -> Self {
        HandledPush {
            messages: o.messages.into_iter().map(Into::into).collect(),
            acked: o.acked,
        }
    }
}

/// True when the payload (JSON) is a Herald push.
#[uniffi::export]
pub fn is_herald_push(payload_json: String) -> bool {
    sdk::is_herald_push(&payload_json)
}

/// The `exp` claim of a JWT (seconds since the epoch), unverified.
#[uniffi::export]
pub fn jwt_expiry(token: String) -> Option<u64> {
    sdk::jwt_expiry(&token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_one_to_one() {
        let e: HeraldError = sdk::Error::Forbidden("x".into()).into();
        assert_eq!(e, HeraldError::Forbidden { detail: "x".into() });
        let e: HeraldError = sdk::Error::RateLimited {
            retry_after: Some(Duration::from_secs(2)),
        }
        .into();
        assert_eq!(
            e,
            HeraldError::RateLimited {
                retry_after_ms: Some(2000)
            }
        );
    }

    struct Nop;
    impl HeraldListener for Nop {
        fn on_state_changed(&self, _: ConnectionState) {}
        fn on_message(&self, _: HeraldMessage) {}
        fn on_error(&self, _: ErrorEvent) {}
        fn on_subscription_changed(&self, _: String, _: bool) {}
        fn on_subscription_failed(&self, _: String, _: bool, _: String, _: String) {}
    }
    struct NoToken;
    impl TokenProvider for NoToken {
        fn fetch_token(&self, _: String) -> Result<String, HeraldError> {
            Err(HeraldError::TokenProvider {
                detail: "none".into(),
            })
        }
    }

    #[test]
    fn bad_url_is_a_typed_error() {
        let r = HeraldClient::new(
            ClientConfig {
                base_url: "not a url".into(),
                device_id: Some("d".into()),
                data_dir: std::env::temp_dir().to_string_lossy().into_owned(),
                suspend_in_background: true,
                backoff_min_ms: 500,
                backoff_max_ms: 30000,
                connect_timeout_ms: 1000,
                request_timeout_ms: 1000,
                heartbeat_ms: None,
                foreground_ping_ms: 10000,
                pong_timeout_ms: 5000,
                push_deadline_ms: 20000,
                transport: None,
                pinned_spki_sha256: vec![],
            },
            Box::new(Nop),
            Box::new(NoToken),
        );
        assert!(matches!(r, Err(HeraldError::InvalidConfig { .. })));
    }
}
