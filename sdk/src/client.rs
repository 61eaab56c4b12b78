//! The public client: owns the SDK's runtime thread (engine + HTTP tasks) and the
//! listener thread. Every call only sends a command, except `handle_push` and
//! `register_push_token`, which wait (bounded) for their network answer.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

use herald_protocol::{
    ApnsEnvironment, DeviceInfo, InboxMessage, Platform, PushProviderKind, RegisterDeviceRequest,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::mpsc::UnboundedSender;
use url::Url;

use crate::engine::{Command, Engine, EngineParts, Event, Settings};
use crate::http::Api;
use crate::store::Store;
use crate::token::{TokenProvider, Tokens};
use crate::transport::WsTransport;
use crate::{ConnectionState, Error};

/// Client configuration. `Config::new` gives the defaults of the product brief.
#[derive(Debug, Clone)]
pub struct Config {
    /// `http(s)://host[:port][/prefix]` of the gateway.
    pub base_url: String,
    /// This installation's device id (stable across launches; the app generates it).
    pub device_id: String,
    /// Directory where the SDK keeps its SQLite file (cursor, handled ids).
    pub data_dir: PathBuf,
    /// Close the connection and go `Suspended` when the app is in the background.
    pub suspend_in_background: bool,
    /// Ceiling of the first reconnect delay (full jitter), doubled per failure.
    pub backoff_min: Duration,
    /// Largest reconnect delay ceiling.
    pub backoff_max: Duration,
    /// A session that lasted this long resets the backoff.
    pub healthy_session: Duration,
    /// Connect attempt (token + TCP + TLS + upgrade + welcome) time limit.
    pub connect_timeout: Duration,
    /// Time limit of each HTTP request.
    pub request_timeout: Duration,
    /// Client ping interval; `None` uses the gateway's `heartbeat_s`.
    pub heartbeat: Option<Duration>,
    /// Consecutive token provider failures after which the client gives up.
    pub max_token_failures: u32,
}

impl Config {
    pub fn new(
        base_url: impl Into<String>,
        device_id: impl Into<String>,
        data_dir: impl Into<PathBuf>,
    ) -> Self {
        Config {
            base_url: base_url.into(),
            device_id: device_id.into(),
            data_dir: data_dir.into(),
            suspend_in_background: true,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            healthy_session: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            heartbeat: None,
            max_token_failures: 3,
        }
    }
}

/// The app's callbacks. All of them are called on one dedicated SDK thread, in
/// order; a callback must not block for long (the next message waits for it, and the
/// gateway closes a session whose messages are not acked within `ack_timeout_s`).
pub trait Listener: Send + Sync {
    /// Every change of the connection state.
    fn on_state_changed(&self, state: ConnectionState);
    /// A new message, exactly once. It is acknowledged to the gateway (and recorded
    /// locally as handled) after this returns.
    fn on_message(&self, message: InboxMessage);
    /// An error. `terminal`: the client stopped reconnecting (403, device deleted,
    /// token rejected twice, token provider failing); call `connect()` to try again.
    fn on_error(&self, error: Error, terminal: bool) {
        let _ = (error, terminal);
    }
    /// The gateway confirmed a subscribe/unsubscribe.
    fn on_subscription_changed(&self, topic: String, subscribed: bool) {
        let _ = (topic, subscribed);
    }
}

/// How long `handle_push` / `register_push_token` wait at most.
const BLOCKING_CALL_LIMIT: Duration = Duration::from_secs(120);

/// A Herald client: one connection, one cursor, one listener.
pub struct HeraldClient {
    cmd: UnboundedSender<Command>,
    rt: tokio::runtime::Handle,
    api: Arc<Api>,
    state: Arc<Mutex<ConnectionState>>,
    threads: Mutex<Option<(JoinHandle<()>, JoinHandle<()>)>>,
    listener_thread: ThreadId,
    device_id: String,
}

fn validate_id(what: &str, id: &str) -> Result<(), Error> {
    // The gateway's own rule: an id it would refuse must fail here, not on every reconnect.
    herald_protocol::validate_id(id).map_err(|m| Error::InvalidConfig(format!("{what} {m}")))
}

fn parse_base(base_url: &str) -> Result<Url, Error> {
    let url = Url::parse(base_url.trim())
        .map_err(|e| Error::InvalidConfig(format!("base_url {base_url:?}: {e}")))?;
    match url.scheme() {
        "http" | "https" | "ws" | "wss" if url.host().is_some() => Ok(url),
        _ => Err(Error::InvalidConfig(format!(
            "base_url {base_url:?} must be an http(s):// URL with a host"
        ))),
    }
}

impl HeraldClient {
    /// Creates the client (opens the local store, starts the SDK threads). Does not
    /// connect: call [`connect`](Self::connect). A client that only handles pushes
    /// (e.g. in a notification service extension) never needs to connect.
    pub fn new(
        config: Config,
        listener: Arc<dyn Listener>,
        token_provider: Arc<dyn TokenProvider>,
    ) -> Result<HeraldClient, Error> {
        let base = parse_base(&config.base_url)?;
        validate_id("device_id", &config.device_id)?;
        let http_base = {
            let mut u = base.clone();
            let scheme = if matches!(base.scheme(), "https" | "wss") {
                "https"
            } else {
                "http"
            };
            let _ = u.set_scheme(scheme);
            u
        };
        let scope = format!(
            "{}|{}",
            http_base.as_str().trim_end_matches('/'),
            config.device_id
        );
        let store = Store::open(&config.data_dir, &scope)?;
        let tokens = Arc::new(Tokens::new(token_provider));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("herald-sdk-io")
            .build()
            .map_err(|e| Error::InvalidConfig(format!("cannot start runtime: {e}")))?;
        let api = {
            let _guard = rt.enter();
            Arc::new(Api::new(
                http_base.clone(),
                config.device_id.clone(),
                tokens.clone(),
                config.request_timeout,
            )?)
        };
        let settings = Arc::new(Settings {
            base: http_base,
            device_id: config.device_id.clone(),
            suspend_in_background: config.suspend_in_background,
            backoff_min: config.backoff_min,
            backoff_max: config.backoff_max,
            healthy_session: config.healthy_session,
            connect_timeout: config.connect_timeout,
            heartbeat: config.heartbeat,
            max_token_failures: config.max_token_failures.max(1),
            sync_max_pages: 20,
        });
        let (cmd_tx, cmd_rx) = tokio::sync::mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::channel();
        let state = Arc::new(Mutex::new(ConnectionState::Disconnected));
        let engine = Engine::new(EngineParts {
            settings,
            transport: Arc::new(WsTransport),
            tokens,
            api: api.clone(),
            store,
            events: ev_tx,
            cmd_rx,
            cmd_tx: cmd_tx.downgrade(),
            shared_state: state.clone(),
            rng: StdRng::from_entropy(),
        });
        let handle = rt.handle().clone();
        let io = std::thread::Builder::new()
            .name("herald-sdk-io".into())
            .spawn(move || {
                rt.block_on(engine.run());
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| Error::InvalidConfig(format!("cannot start thread: {e}")))?;
        let back = cmd_tx.clone();
        let listener_thread = std::thread::Builder::new()
            .name("herald-sdk-listener".into())
            .spawn(move || dispatch(ev_rx, listener, back))
            .map_err(|e| Error::InvalidConfig(format!("cannot start thread: {e}")))?;
        Ok(HeraldClient {
            cmd: cmd_tx,
            rt: handle,
            api,
            state,
            listener_thread: listener_thread.thread().id(),
            threads: Mutex::new(Some((io, listener_thread))),
            device_id: config.device_id,
        })
    }

    fn send(&self, cmd: Command) {
        let _ = self.cmd.send(cmd);
    }

    /// Start (and keep) a connection: reconnects with backoff until `disconnect()`,
    /// `close()` or a terminal error.
    pub fn connect(&self) {
        self.send(Command::Connect);
    }

    /// Close the connection and stop reconnecting (state `Disconnected`).
    pub fn disconnect(&self) {
        self.send(Command::Disconnect);
    }

    /// The OS reported connectivity. `false`: close, go `Suspended`, no retries until
    /// `true`, which reconnects at once (or probes a live connection).
    pub fn network_changed(&self, available: bool) {
        self.send(Command::Network(available));
    }

    /// The app came to the foreground: reconnect at once if waiting or suspended.
    pub fn app_foreground(&self) {
        self.send(Command::Foreground);
    }

    /// The app went to the background: `Suspended` when `suspend_in_background`.
    pub fn app_background(&self) {
        self.send(Command::Background);
    }

    /// Subscribe this device to a topic; kept and re-sent after every reconnect.
    pub fn subscribe(&self, topic: &str) -> Result<(), Error> {
        validate_id("topic", topic)?;
        self.send(Command::Subscribe(topic.to_string()));
        Ok(())
    }

    pub fn unsubscribe(&self, topic: &str) -> Result<(), Error> {
        validate_id("topic", topic)?;
        self.send(Command::Unsubscribe(topic.to_string()));
        Ok(())
    }

    /// Fetch what is pending over HTTP (`GET /v1/me/sync`) and deliver it to the
    /// listener, without opening a WebSocket. Errors go to `on_error`.
    pub fn sync_now(&self) {
        self.send(Command::SyncNow);
    }

    /// Handles an APNs `userInfo` / FCM data payload (as JSON). Returns the new
    /// messages it brings — fetched with `GET /v1/me/sync` (a hint, or any gap before
    /// it), or taken from the payload when the gateway cannot be reached. Messages
    /// returned here are **not** given to the listener, and are recorded as handled
    /// (and acked) before this returns: each message reaches the app exactly once,
    /// through the listener or through this return value. A duplicate push returns an
    /// empty list. Errors: `NotHeraldPush`, `InvalidPayload`, or the network error of a
    /// hint that could not be fetched.
    ///
    /// Blocks (up to the request timeouts): call it from a background thread.
    pub fn handle_push(&self, payload_json: &str) -> Result<Vec<InboxMessage>, Error> {
        let info = crate::push::parse_push(payload_json)?;
        if info
            .device_id
            .as_deref()
            .is_some_and(|d| d != self.device_id)
        {
            return Ok(Vec::new());
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.cmd
            .send(Command::HandlePush(info, tx))
            .map_err(|_| Error::Closed)?;
        self.wait(rx)
    }

    /// Registers (or updates) this device's push token: `PUT /v1/me/devices/{id}`.
    /// The platform is iOS for APNs and Android for FCM. Blocks (up to the request
    /// timeout): call it from a background thread.
    pub fn register_push_token(
        &self,
        provider: PushProviderKind,
        token: &str,
        environment: Option<ApnsEnvironment>,
    ) -> Result<DeviceInfo, Error> {
        if token.trim().is_empty() {
            return Err(Error::InvalidConfig("push token is empty".into()));
        }
        let req = RegisterDeviceRequest {
            platform: match provider {
                PushProviderKind::Apns => Platform::Ios,
                PushProviderKind::Fcm => Platform::Android,
            },
            push_provider: Some(provider),
            push_token: Some(token.trim().to_string()),
            apns_environment: match provider {
                PushProviderKind::Apns => environment,
                PushProviderKind::Fcm => None,
            },
        };
        let (tx, rx) = mpsc::sync_channel(1);
        let api = self.api.clone();
        self.rt.spawn(async move {
            let _ = tx.send(api.register_device(&req).await);
        });
        self.wait(rx)
    }

    fn wait<T>(&self, rx: mpsc::Receiver<Result<T, Error>>) -> Result<T, Error> {
        match rx.recv_timeout(BLOCKING_CALL_LIMIT) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::Timeout("no answer".into())),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::Closed),
        }
    }

    /// The current connection state.
    pub fn state(&self) -> ConnectionState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops everything and joins the SDK threads; the listener gets `Closed` last.
    /// Messages already given to the listener get (up to 2 s) to finish so their
    /// cursor is saved. Idempotent; also done on drop.
    pub fn close(&self) {
        let on_listener_thread = std::thread::current().id() == self.listener_thread;
        self.send(Command::Close {
            drain: !on_listener_thread,
        });
        let threads = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((io, listener)) = threads {
            let _ = io.join();
            // Called from a listener callback: that thread ends by itself after this
            // callback returns (the engine is gone, so its channel closes).
            if !on_listener_thread {
                let _ = listener.join();
            }
        }
    }
}

impl Drop for HeraldClient {
    fn drop(&mut self) {
        self.close();
    }
}

/// The listener thread: calls the app in order; reports back which messages the app
/// finished (only then are they recorded and acked).
fn dispatch(
    events: mpsc::Receiver<Event>,
    listener: Arc<dyn Listener>,
    back: UnboundedSender<Command>,
) {
    // Without this, the channel would stay open because we hold a sender.
    let back = back.downgrade();
    while let Ok(event) = events.recv() {
        match event {
            Event::State(state) => {
                let _ = catch_unwind(AssertUnwindSafe(|| listener.on_state_changed(state)));
            }
            Event::Message(m) => {
                let (seq, id) = (m.seq, m.id.clone());
                if catch_unwind(AssertUnwindSafe(|| listener.on_message(m))).is_err() {
                    // Counted as handled: redelivering a message that crashes the app's
                    // listener would loop forever.
                    tracing::error!("herald: listener panicked on message {id} (seq {seq})");
                }
                if let Some(back) = back.upgrade() {
                    let _ = back.send(Command::Handled { seq, id });
                }
            }
            Event::Error { error, terminal } => {
                let _ = catch_unwind(AssertUnwindSafe(|| listener.on_error(error, terminal)));
            }
            Event::Subscription { topic, subscribed } => {
                let _ = catch_unwind(AssertUnwindSafe(|| {
                    listener.on_subscription_changed(topic, subscribed)
                }));
            }
        }
    }
}

#[cfg(test)]
mod id_rule_tests {
    use super::validate_id;

    #[test]
    fn ids_the_gateway_refuses_are_refused_here() {
        assert!(validate_id("topic", "news.eu-1").is_ok());
        for bad in ["my phone", "a/b", "", "caf\u{e9}"] {
            assert!(validate_id("topic", bad).is_err(), "{bad:?}");
        }
    }
}
