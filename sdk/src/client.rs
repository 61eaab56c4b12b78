//! The public client: owns the SDK's runtime thread (engine + HTTP tasks) and the
//! listener thread. Every call only sends a command, except `handle_push`,
//! `register_push_token`, `unregister` and `reset`, which wait (bounded) for their
//! answer.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use herald_protocol::{
    ApnsEnvironment, DeviceInfo, InboxMessage, Platform, PushProviderKind, RegisterDeviceRequest,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::mpsc::UnboundedSender;
use url::Url;

use crate::engine::{lock, Command, Delivery, Engine, EngineParts, Event, Settings, SharedStore};
use crate::http::Api;
use crate::http_transport::HttpTransport;
use crate::log::{log, Counters, Stats};
use crate::push::PushOutcome;
use crate::store::Store;
use crate::token::{TokenProvider, Tokens};
use crate::transport::{Transports, WsTransport};
use crate::{ConnectionState, Error, TransportPreference};

/// Client configuration. `Config::new` gives the defaults of the product brief.
#[derive(Debug, Clone)]
pub struct Config {
    /// `http(s)://host[:port][/prefix]` of the gateway.
    pub base_url: String,
    /// This installation's device id (stable across launches). Empty: the SDK
    /// generates a random one (UUID v4) once and keeps it in `data_dir`
    /// ([`HeraldClient::device_id`] tells it; `reset()` forgets it).
    pub device_id: String,
    /// Directory where the SDK keeps its SQLite file (cursor, handled ids, topics).
    /// An app and its extension / push service may share it (an app group
    /// container): they coordinate through the file.
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
    /// While the app is in the foreground: ping this often (if shorter than the
    /// heartbeat) and declare the connection dead when nothing comes back within
    /// `pong_timeout`. `None`: heartbeats only (dead after two silent heartbeats).
    /// Off in the background, where the radio's battery cost matters more.
    pub foreground_ping: Option<Duration>,
    /// How long a foreground ping (or the probe after `network_changed(true)` /
    /// `app_foreground()`) waits for traffic.
    pub pong_timeout: Duration,
    /// Default deadline of [`HeraldClient::handle_push`]: well under the ~30 s an
    /// iOS notification service extension gets.
    pub push_deadline: Duration,
    /// Consecutive token provider failures after which the client gives up.
    pub max_token_failures: u32,
    /// Which transport to use: `Auto` (default) is WebSocket, falling back to
    /// Server-Sent Events and then long-poll where the network refuses WebSocket
    /// upgrades; the others force one transport.
    pub transport: TransportPreference,
    /// After a fallback, how often WebSocket is tried again (also on every
    /// `network_changed(true)`).
    pub websocket_retry: Duration,
    /// Certificate pinning: base64 SHA-256 digests of SubjectPublicKeyInfos (optionally
    /// prefixed `sha256/`). When not empty, the gateway's certificate or one of the
    /// intermediates it sends must have one of these keys, in addition to passing the
    /// platform's validation; otherwise the connection fails (`Error::Network`, "certificate
    /// pin mismatch"). Pin a backup key too. Empty (default): no pinning.
    pub pinned_spki_sha256: Vec<String>,
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
            foreground_ping: Some(Duration::from_secs(10)),
            pong_timeout: Duration::from_secs(5),
            push_deadline: Duration::from_secs(20),
            max_token_failures: 3,
            transport: TransportPreference::Auto,
            websocket_retry: Duration::from_secs(300),
            pinned_spki_sha256: Vec::new(),
        }
    }
}

/// The app's callbacks. All of them are called on one dedicated SDK thread, in
/// order; a callback must not block for long (the next message waits for it, and the
/// gateway closes a session whose messages are not acked within `ack_timeout_s`).
pub trait Listener: Send + Sync {
    /// Every change of the connection state.
    fn on_state_changed(&self, state: ConnectionState);
    /// A new message. When this returns, the message is recorded as handled in the
    /// SDK's store (committed before the next message is given to you) and then
    /// acknowledged to the gateway.
    ///
    /// Guarantee across a crash or kill of the process: nothing is lost, and at most
    /// **the one message whose `on_message` was running** is delivered again on the
    /// next start (the SDK cannot know whether you finished it). Make handling
    /// idempotent for that one, e.g. by de-duplicating on `message.id`. Persist what
    /// you need before returning: returning is the acknowledgement.
    fn on_message(&self, message: InboxMessage);
    /// An error. `terminal`: the client stopped reconnecting (403, device deleted,
    /// token rejected twice, token provider failing); call `connect()` to try again.
    /// A terminal error comes after `on_state_changed(Disconnected)`, never before.
    fn on_error(&self, error: Error, terminal: bool) {
        let _ = (error, terminal);
    }
    /// The gateway confirmed a subscribe/unsubscribe.
    fn on_subscription_changed(&self, topic: String, subscribed: bool) {
        let _ = (topic, subscribed);
    }
    /// The gateway refused a subscribe (`subscribe = true`) or unsubscribe, with the
    /// code of its `error` frame (e.g. `forbidden_topic`). A refused subscribe is
    /// forgotten (not re-sent on reconnect).
    fn on_subscription_failed(
        &self,
        topic: String,
        subscribe: bool,
        code: String,
        message: String,
    ) {
        let _ = (topic, subscribe, code, message);
    }
}

/// How long `register_push_token` / `unregister` wait at most.
const BLOCKING_CALL_LIMIT: Duration = Duration::from_secs(120);
/// How long `close()` waits for the SDK threads before leaving them to finish alone.
const CLOSE_WAIT: Duration = Duration::from_millis(500);

/// A Herald client: one connection, one cursor, one listener.
pub struct HeraldClient {
    cmd: UnboundedSender<Command>,
    rt: tokio::runtime::Handle,
    api: Arc<Api>,
    state: Arc<Mutex<ConnectionState>>,
    threads: Mutex<Option<(JoinHandle<()>, JoinHandle<()>)>>,
    /// Disconnected once both SDK threads ended.
    threads_done: Mutex<Option<mpsc::Receiver<()>>>,
    listener_thread: ThreadId,
    device_id: String,
    counters: Arc<Counters>,
    closing: Arc<AtomicBool>,
    push_deadline: Duration,
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
        let mut config = config;
        if config.device_id.is_empty() {
            config.device_id = crate::store::generated_device_id(&config.data_dir)?;
        }
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
        let tls = crate::tls::client_config(crate::tls::parse_pins(&config.pinned_spki_sha256)?)?;
        let store: SharedStore = Arc::new(Mutex::new(Store::open(&config.data_dir, &scope)?));
        let tokens = Arc::new(Tokens::new(token_provider, &config.device_id));
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
                Some(&tls),
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
            foreground_ping: config.foreground_ping.filter(|d| !d.is_zero()),
            pong_timeout: config.pong_timeout.max(Duration::from_millis(100)),
            max_token_failures: config.max_token_failures.max(1),
            sync_max_pages: 20,
            transport: config.transport,
            websocket_retry: config.websocket_retry.max(Duration::from_secs(1)),
        });
        let transport = {
            let _guard = rt.enter();
            // A long-poll is held for a heartbeat (the engine's liveness check
            // expects an answer within two).
            let poll_wait = config.heartbeat.unwrap_or(Duration::from_secs(25));
            Transports {
                ws: WsTransport::new(tls.clone()),
                http: HttpTransport::new(api.clone(), config.connect_timeout, poll_wait, &tls),
            }
        };
        let (cmd_tx, cmd_rx) = tokio::sync::mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::channel();
        let state = Arc::new(Mutex::new(ConnectionState::Disconnected));
        let counters = Arc::new(Counters::default());
        let engine = Engine::new(EngineParts {
            settings,
            transport: Arc::new(transport),
            tokens,
            api: api.clone(),
            store: store.clone(),
            events: ev_tx,
            cmd_rx,
            cmd_tx: cmd_tx.downgrade(),
            shared_state: state.clone(),
            counters: counters.clone(),
            rng: StdRng::from_entropy(),
        });
        let handle = rt.handle().clone();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let io_done = done_tx.clone();
        let io = std::thread::Builder::new()
            .name("herald-sdk-io".into())
            .spawn(move || {
                let _done = io_done;
                rt.block_on(engine.run());
                // Not waiting: a token provider still running must not hold up close().
                rt.shutdown_background();
            })
            .map_err(|e| Error::InvalidConfig(format!("cannot start thread: {e}")))?;
        let back = cmd_tx.clone();
        let closing = Arc::new(AtomicBool::new(false));
        let d = Dispatcher {
            store,
            counters: counters.clone(),
            closing: closing.clone(),
        };
        let listener_thread = std::thread::Builder::new()
            .name("herald-sdk-listener".into())
            .spawn(move || {
                let _done = done_tx;
                d.run(ev_rx, listener, back)
            })
            .map_err(|e| Error::InvalidConfig(format!("cannot start thread: {e}")))?;
        Ok(HeraldClient {
            cmd: cmd_tx,
            rt: handle,
            api,
            state,
            listener_thread: listener_thread.thread().id(),
            threads: Mutex::new(Some((io, listener_thread))),
            threads_done: Mutex::new(Some(done_rx)),
            device_id: config.device_id,
            counters,
            closing,
            push_deadline: config.push_deadline,
        })
    }

    /// This client's device id (the generated one when the config gave none).
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// Counters (reconnects, last ping RTT, messages delivered / skipped).
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
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

    /// Subscribe this device to a topic. Saved in the store (survives restarts) and
    /// re-sent after every reconnect; the gateway's answer goes to
    /// `on_subscription_changed` or `on_subscription_failed`.
    pub fn subscribe(&self, topic: &str) -> Result<(), Error> {
        validate_id("topic", topic)?;
        self.send(Command::Subscribe(topic.to_string()));
        Ok(())
    }

    /// Unsubscribe. Saved until the gateway confirms, so one made offline is sent
    /// on the next connect, even after an app restart.
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

    /// Handles an APNs `userInfo` / FCM data payload (as JSON) within
    /// `Config::push_deadline`; see [`handle_push_within`](Self::handle_push_within).
    pub fn handle_push(&self, payload_json: &str) -> Result<PushOutcome, Error> {
        self.handle_push_within(payload_json, self.push_deadline)
    }

    /// Handles an APNs `userInfo` / FCM data payload (as JSON). Returns the new
    /// messages it brings — fetched with `GET /v1/me/sync` (a hint, or any gap before
    /// it), or taken from the payload when the gateway cannot be reached. Messages
    /// returned here are **not** given to the listener (nor by another process on
    /// the same data directory): they are recorded as handled, and the ack has
    /// reached the gateway (`acked`) or failed, before this returns. A duplicate push
    /// returns no messages. Errors: `NotHeraldPush`, `InvalidPayload`, or the network
    /// error of a hint that could not be fetched.
    ///
    /// Returns within `deadline` (plus a little): sync, recording and ack share it.
    /// Blocks: call it from a background thread. `close()` right after is safe.
    pub fn handle_push_within(
        &self,
        payload_json: &str,
        deadline: Duration,
    ) -> Result<PushOutcome, Error> {
        let info = crate::push::parse_push(payload_json)?;
        if info
            .device_id
            .as_deref()
            .is_some_and(|d| d != self.device_id)
        {
            return Ok(PushOutcome {
                messages: Vec::new(),
                acked: true,
            });
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let until = tokio::time::Instant::now() + deadline;
        self.cmd
            .send(Command::HandlePush(info, until, tx))
            .map_err(|_| Error::Closed)?;
        // The engine answers by the deadline; the margin covers its bookkeeping.
        self.wait(rx, deadline + Duration::from_secs(1))
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
        self.wait(rx, BLOCKING_CALL_LIMIT)
    }

    /// Logout / account switch, step 1: removes this device's push token from the
    /// gateway (`DELETE /v1/me/devices/{id}/push_token`), so no more pushes come.
    /// Succeeds when the gateway has no such device either. Blocks (up to the
    /// request timeout): call it from a background thread, with the old user's token
    /// provider still in place.
    pub fn unregister(&self) -> Result<(), Error> {
        let (tx, rx) = mpsc::sync_channel(1);
        let api = self.api.clone();
        self.rt.spawn(async move {
            let _ = tx.send(api.remove_push_token().await);
        });
        self.wait(rx, BLOCKING_CALL_LIMIT)
    }

    /// Logout / account switch, step 2: disconnects and forgets this client's local
    /// state — cursor, handled ids, saved topics, and the generated device id (a
    /// device id belongs to the first user that used it, so the next user must get
    /// a new one: create a new client afterwards). The gateway keeps the device.
    pub fn reset(&self) -> Result<(), Error> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.cmd
            .send(Command::Reset(tx))
            .map_err(|_| Error::Closed)?;
        self.wait(rx, Duration::from_secs(10))
    }

    fn wait<T>(&self, rx: mpsc::Receiver<Result<T, Error>>, limit: Duration) -> Result<T, Error> {
        match rx.recv_timeout(limit) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::Timeout("no answer".into())),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::Closed),
        }
    }

    /// The current connection state.
    pub fn state(&self) -> ConnectionState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops everything; the listener gets `Closed` last. Messages still queued for
    /// the listener are not given to it (they come again on the next start); one
    /// whose `on_message` is running finishes and is recorded. Waits at most
    /// 0.5 s for the SDK threads (never seconds: safe on a UI thread), then lets
    /// them finish alone. Idempotent; also done on drop.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.send(Command::Close);
        let on_listener_thread = std::thread::current().id() == self.listener_thread;
        let threads = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let done = self
            .threads_done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let (Some((io, listener)), Some(done)) = (threads, done) else {
            return;
        };
        // Called from a listener callback: that thread ends by itself after this
        // callback returns, so do not wait for it.
        if on_listener_thread {
            drop(listener);
            let _ = io.join();
            return;
        }
        let deadline = Instant::now() + CLOSE_WAIT;
        loop {
            match done.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(()) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = io.join();
                    let _ = listener.join();
                    return;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    log!(
                        Info,
                        "close: the listener is still busy; not waiting for it"
                    );
                    return;
                }
            }
        }
    }
}

impl Drop for HeraldClient {
    fn drop(&mut self) {
        self.close();
    }
}

struct Dispatcher {
    store: SharedStore,
    counters: Arc<Counters>,
    closing: Arc<AtomicBool>,
}

impl Dispatcher {
    /// The listener thread: calls the app in order. A message of the ordered stream
    /// is claimed in the store right before `on_message` (skipped if another process
    /// handled it) and its cursor committed right after, before the next one: a
    /// crash repeats at most the message being handled. Then the engine is told
    /// (it acks).
    fn run(
        self,
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
                Event::Message(m, delivery) => {
                    if self.closing.load(Ordering::SeqCst) {
                        continue; // not handed over, not recorded: comes again next time
                    }
                    let seq = m.seq;
                    self.message(m, delivery, &*listener);
                    if let Some(back) = back.upgrade() {
                        let _ = back.send(Command::Handled { seq });
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
                Event::SubscriptionFailed {
                    topic,
                    subscribe,
                    code,
                    message,
                } => {
                    let _ = catch_unwind(AssertUnwindSafe(|| {
                        listener.on_subscription_failed(topic, subscribe, code, message)
                    }));
                }
            }
        }
    }

    fn message(&self, m: InboxMessage, delivery: Delivery, listener: &dyn Listener) {
        let (seq, id) = (m.seq, m.id.clone());
        let fresh = match delivery {
            Delivery::Direct => true,
            Delivery::Stream => lock(&self.store)
                .begin_delivery(seq, &id)
                .unwrap_or_else(|e| {
                    // Better twice than never.
                    log!(Error, "cannot claim message {id}: {e}");
                    true
                }),
        };
        if fresh {
            Counters::inc(&self.counters.messages_delivered);
            if catch_unwind(AssertUnwindSafe(|| listener.on_message(m))).is_err() {
                // Counted as handled: redelivering a message that crashes the app's
                // listener would loop forever.
                log!(Error, "listener panicked on message {id} (seq {seq})");
            }
        } else {
            Counters::inc(&self.counters.duplicates_skipped);
        }
        if delivery == Delivery::Stream {
            if let Err(e) = lock(&self.store).finish_delivery(seq, &id, seq) {
                log!(Error, "cannot save the cursor after message {id}: {e}");
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
