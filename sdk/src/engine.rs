//! The connection state machine. Runs as one task on the SDK's runtime; owns the
//! store, the backoff and the connection; is driven by [`Command`]s (public calls,
//! "listener returned" notices, results of background HTTP tasks) and by what the
//! connection yields. Generic over [`Transport`] so tests drive it with a fake.
//!
//! Phases: `Idle` (Disconnected, or Suspended when the app wants a connection but is
//! in the background / offline) → `Connect` (Connecting) → session (Connected) →
//! `Wait` (WaitingToReconnect) → `Connect` … Terminal errors go back to `Idle` with
//! `wanted = false`.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use herald_protocol::{ClientFrame, InboxMessage, ServerFrame};
use rand::rngs::StdRng;
use rand::Rng;
use tokio::sync::mpsc::{UnboundedReceiver, WeakUnboundedSender};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};
use url::Url;

use crate::backoff::Backoff;
use crate::http::Api;
use crate::log::{log, Counters};
use crate::push::{PushInfo, PushOutcome};
use crate::store::Store;
use crate::token::Tokens;
use crate::transport::{ConnectError, Connection, Incoming, Transport};
use crate::{ConnectionState, Error, TransportKind, TransportPreference};

pub(crate) type Reply<T> = mpsc::SyncSender<Result<T, Error>>;
/// One store for the engine and the listener thread (which commits the cursor).
pub(crate) type SharedStore = Arc<Mutex<Store>>;

pub(crate) fn lock(store: &SharedStore) -> MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(|e| e.into_inner())
}

/// Inputs of the engine.
pub(crate) enum Command {
    Connect,
    Disconnect,
    Network(bool),
    Foreground,
    Background,
    Subscribe(String),
    Unsubscribe(String),
    SyncNow,
    /// `handle_push`: answer (recorded and acked, or why not) by the deadline.
    HandlePush(PushInfo, Instant, Reply<PushOutcome>),
    /// The `handle_push` caller was gone when its messages were ready.
    PushUndelivered(Vec<InboxMessage>),
    /// Forget the local state (logout); stops connecting.
    Reset(Reply<()>),
    /// The app's listener returned for this message (its cursor is committed).
    Handled {
        seq: i64,
    },
    /// Shut down. (The listener thread commits what it finishes by itself.)
    Close,
    /// Result of a background `GET /v1/me/sync`.
    SyncDone {
        result: Result<Vec<InboxMessage>, Error>,
        push: Option<PendingPush>,
    },
}

pub(crate) struct PendingPush {
    info: PushInfo,
    deadline: Instant,
    reply: Reply<PushOutcome>,
}

/// How the listener thread treats a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Of the ordered stream, handed over in seq order: claimed (unless another
    /// process handled it) right before `on_message`, and the cursor is committed
    /// up to its seq right after, before the next message.
    Stream,
    /// Already recorded elsewhere (a `handle_push` whose caller went away).
    Direct,
}

/// Outputs of the engine, delivered to the app's listener in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    State(ConnectionState),
    Message(InboxMessage, Delivery),
    Error {
        error: Error,
        terminal: bool,
    },
    Subscription {
        topic: String,
        subscribed: bool,
    },
    /// The gateway refused a subscribe (`subscribe = true`) or unsubscribe.
    SubscriptionFailed {
        topic: String,
        subscribe: bool,
        code: String,
        message: String,
    },
}

/// Tunables of the engine (from [`crate::Config`]).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub base: Url,
    pub device_id: String,
    pub suspend_in_background: bool,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub healthy_session: Duration,
    pub connect_timeout: Duration,
    pub heartbeat: Option<Duration>,
    /// In the foreground: ping this often and expect traffic within `pong_timeout`.
    pub foreground_ping: Option<Duration>,
    pub pong_timeout: Duration,
    pub max_token_failures: u32,
    pub sync_max_pages: u32,
    pub transport: TransportPreference,
    /// In fallback (auto): how often WebSocket is tried again.
    pub websocket_retry: Duration,
}

pub(crate) struct Engine<T: Transport> {
    s: Arc<Settings>,
    transport: Arc<T>,
    tokens: Arc<Tokens>,
    api: Arc<Api>,
    store: SharedStore,
    events: mpsc::Sender<Event>,
    cmd_rx: UnboundedReceiver<Command>,
    cmd_tx: WeakUnboundedSender<Command>,
    shared_state: Arc<Mutex<ConnectionState>>,
    counters: Arc<Counters>,
    state: ConnectionState,
    rng: StdRng,
    backoff: Backoff,
    wanted: bool,
    network: bool,
    foreground: bool,
    /// Wanted topics and unconfirmed unsubscribes (mirrors the store).
    topics: BTreeSet<String>,
    unsubscribe_pending: BTreeSet<String>,
    /// Subscribe (`true`) / unsubscribe frames sent and not answered yet, in order.
    topic_requests: VecDeque<(String, bool)>,
    /// Highest seq of the ordered stream (live or sync) handed to the app or skipped.
    high: i64,
    /// Handed to the listener, not yet returned.
    in_flight: BTreeSet<i64>,
    /// Highest cursor acknowledged to the gateway.
    acked: i64,
    /// 401s in a row on connect.
    unauthorized: u32,
    sync_running: bool,
    tasks: JoinSet<()>,
    /// Frames to send once the session is up.
    outbox: Vec<ClientFrame>,
    /// Auto mode: the transport WebSocket fell back to (`None`: WebSocket works).
    fallback: Option<TransportKind>,
    /// In fallback: when to try WebSocket again.
    ws_retry_at: Instant,
    /// This attempt is such a retry: any failure goes straight back to `fallback`.
    retrying_ws: bool,
    /// Connect attempts in a row that timed out (no answer, or no welcome).
    handshake_timeouts: u32,
}

enum Phase {
    Idle,
    Connect,
    Wait(Duration),
    Stop,
}

/// What a command means for the current phase.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    /// Connect now (connect(), network back, foreground).
    Now,
    Stop,
}

enum AttemptError {
    Token(Error),
    Connect(ConnectError, String),
    Timeout,
}

/// Grace added to "two heartbeats without traffic".
const DEAD_GRACE: Duration = Duration::from_secs(2);
/// How long a connection may stay silent after the network changed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshake timeouts in a row after which auto mode checks whether plain HTTP gets
/// through (and then falls back).
const TIMEOUTS_BEFORE_FALLBACK: u32 = 2;
/// Until the welcome tells the real value.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);

pub(crate) struct EngineParts<T> {
    pub settings: Arc<Settings>,
    pub transport: Arc<T>,
    pub tokens: Arc<Tokens>,
    pub api: Arc<Api>,
    pub store: SharedStore,
    pub events: mpsc::Sender<Event>,
    pub cmd_rx: UnboundedReceiver<Command>,
    pub cmd_tx: WeakUnboundedSender<Command>,
    pub shared_state: Arc<Mutex<ConnectionState>>,
    pub counters: Arc<Counters>,
    pub rng: StdRng,
}

impl<T: Transport> Engine<T> {
    pub fn new(p: EngineParts<T>) -> Self {
        let (high, saved_topics) = {
            let db = lock(&p.store);
            let topics = db.topics().unwrap_or_else(|e| {
                log!(Error, "cannot read saved topics: {e}");
                Vec::new()
            });
            (db.cursor(), topics)
        };
        let mut topics = BTreeSet::new();
        let mut unsubscribe_pending = BTreeSet::new();
        for (topic, wanted) in saved_topics {
            if wanted {
                topics.insert(topic);
            } else {
                unsubscribe_pending.insert(topic);
            }
        }
        Engine {
            backoff: Backoff::new(p.settings.backoff_min, p.settings.backoff_max),
            s: p.settings,
            transport: p.transport,
            tokens: p.tokens,
            api: p.api,
            store: p.store,
            events: p.events,
            cmd_rx: p.cmd_rx,
            cmd_tx: p.cmd_tx,
            shared_state: p.shared_state,
            counters: p.counters,
            state: ConnectionState::Disconnected,
            rng: p.rng,
            wanted: false,
            network: true,
            foreground: true,
            topics,
            unsubscribe_pending,
            topic_requests: VecDeque::new(),
            high,
            in_flight: BTreeSet::new(),
            acked: high,
            unauthorized: 0,
            sync_running: false,
            tasks: JoinSet::new(),
            outbox: Vec::new(),
            fallback: None,
            ws_retry_at: Instant::now(),
            retrying_ws: false,
            handshake_timeouts: 0,
        }
    }

    fn db(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    pub async fn run(mut self) {
        let mut phase = Phase::Idle;
        loop {
            phase = match phase {
                Phase::Idle => self.idle().await,
                Phase::Connect => self.connect().await,
                Phase::Wait(d) => self.wait(d).await,
                Phase::Stop => break,
            };
        }
        self.finish().await;
    }

    fn should_connect(&self) -> bool {
        self.wanted && self.network && (self.foreground || !self.s.suspend_in_background)
    }

    fn set_state(&mut self, state: ConnectionState) {
        if self.state != state {
            self.state = state.clone();
            *self.shared_state.lock().unwrap_or_else(|e| e.into_inner()) = state.clone();
            let _ = self.events.send(Event::State(state));
        }
    }

    fn report(&self, error: Error, terminal: bool) {
        let _ = self.events.send(Event::Error { error, terminal });
    }

    fn terminal(&mut self, error: Error) -> Phase {
        log!(Warn, "giving up: {error}");
        self.wanted = false;
        // The state first: an app that reacts to a terminal error by reading the
        // connection state (or rendering both) must see it already stopped.
        self.set_state(ConnectionState::Disconnected);
        self.report(error, true);
        Phase::Idle
    }

    fn next_backoff(&mut self) -> Phase {
        Phase::Wait(self.backoff.next_delay(&mut self.rng))
    }

    async fn idle(&mut self) -> Phase {
        loop {
            if self.should_connect() {
                return Phase::Connect;
            }
            let state = if self.wanted {
                ConnectionState::Suspended
            } else {
                ConnectionState::Disconnected
            };
            self.set_state(state);
            let Some(cmd) = self.cmd_rx.recv().await else {
                return Phase::Stop;
            };
            if self.handle(cmd, false) == Flow::Stop {
                return Phase::Stop;
            }
            self.http_ack();
        }
    }

    async fn wait(&mut self, delay: Duration) -> Phase {
        self.set_state(ConnectionState::WaitingToReconnect {
            delay_ms: delay.as_millis() as u64,
        });
        let deadline = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = sleep_until(deadline) => return Phase::Connect,
                cmd = self.cmd_rx.recv() => {
                    let Some(cmd) = cmd else { return Phase::Stop };
                    let flow = self.handle(cmd, false);
                    if flow == Flow::Stop {
                        return Phase::Stop;
                    }
                    if !self.should_connect() {
                        return Phase::Idle;
                    }
                    if flow == Flow::Now {
                        self.backoff.reset();
                        return Phase::Connect;
                    }
                    self.http_ack();
                }
            }
        }
    }

    /// The transport of the next attempt.
    fn pick_transport(&mut self) -> TransportKind {
        self.retrying_ws = false;
        match self.s.transport {
            TransportPreference::WebSocket => TransportKind::WebSocket,
            TransportPreference::Sse => TransportKind::Sse,
            TransportPreference::LongPoll => TransportKind::LongPoll,
            TransportPreference::Auto => match self.fallback {
                None => TransportKind::WebSocket,
                Some(_) if Instant::now() >= self.ws_retry_at => {
                    self.retrying_ws = true;
                    TransportKind::WebSocket
                }
                Some(k) => k,
            },
        }
    }

    /// `kind` does not get through here (auto mode): the next transport, at once.
    fn fall_back(&mut self, kind: TransportKind, why: &str) -> Option<Phase> {
        if self.s.transport != TransportPreference::Auto {
            return None;
        }
        self.handshake_timeouts = 0;
        self.ws_retry_at = Instant::now() + self.s.websocket_retry;
        if self.retrying_ws {
            // WebSocket still does not get through: back to what works.
            log!(
                Info,
                "WebSocket still unavailable ({why}); staying on {:?}",
                self.fallback
            );
            self.retrying_ws = false;
            return Some(Phase::Connect);
        }
        let next = match kind {
            TransportKind::WebSocket => TransportKind::Sse,
            TransportKind::Sse => TransportKind::LongPoll,
            TransportKind::LongPoll => return None,
        };
        log!(
            Warn,
            "{} unavailable ({why}); falling back to {}",
            kind.name(),
            next.name()
        );
        self.fallback = Some(next);
        Some(Phase::Connect)
    }

    /// A connect attempt timed out (no answer, or no welcome in time). Twice in a row
    /// while plain HTTP reaches the gateway (auto mode): fall back.
    async fn on_handshake_timeout(&mut self, kind: TransportKind) -> Phase {
        self.handshake_timeouts += 1;
        let auto = self.s.transport == TransportPreference::Auto;
        if auto && (self.retrying_ws || self.handshake_timeouts >= TIMEOUTS_BEFORE_FALLBACK) {
            let reachable = tokio::time::timeout(
                self.s.connect_timeout,
                self.transport.http_reachable(&self.s.base),
            )
            .await
            .unwrap_or(false);
            if reachable {
                if let Some(p) = self.fall_back(kind, "handshakes time out while HTTP works") {
                    return p;
                }
            }
        }
        self.next_backoff()
    }

    async fn connect(&mut self) -> Phase {
        // Android before `HeraldAndroid.init(context)`: say so instead of retrying.
        if let Err(e) = crate::tls::ready_for(&self.s.base) {
            return self.terminal(e);
        }
        self.set_state(ConnectionState::Connecting);
        let kind = self.pick_transport();
        Counters::inc(&self.counters.connect_attempts);
        let transport = self.transport.clone();
        let tokens = self.tokens.clone();
        let s = self.s.clone();
        // Resume after what the app has handled (not merely received): messages still
        // with the listener are replayed and skipped, so nothing is acked early. Read
        // from the file: another process may have handled more.
        let after = {
            let mut db = self.db();
            db.refresh().unwrap_or(db.cursor())
        };
        let attempt = async move {
            let token = tokens.get().await.map_err(AttemptError::Token)?;
            let connect = transport.connect(kind, &s.base, &s.device_id, after, &token.value);
            match tokio::time::timeout(s.connect_timeout, connect).await {
                Err(_) => Err(AttemptError::Timeout),
                Ok(Err(e)) => Err(AttemptError::Connect(e, token.value)),
                Ok(Ok(conn)) => Ok(conn),
            }
        };
        tokio::pin!(attempt);
        let outcome = loop {
            tokio::select! {
                r = &mut attempt => break r,
                cmd = self.cmd_rx.recv() => {
                    let Some(cmd) = cmd else { return Phase::Stop };
                    let is_network_up = matches!(cmd, Command::Network(true));
                    if self.handle(cmd, false) == Flow::Stop {
                        return Phase::Stop;
                    }
                    if !self.should_connect() {
                        return Phase::Idle;
                    }
                    if is_network_up {
                        // A new network (Wi-Fi → cellular): this attempt may be stuck on
                        // the old one until the connect timeout; start over at once.
                        log!(Debug, "network changed during a connect attempt; retrying at once");
                        self.backoff.reset();
                        return Phase::Connect;
                    }
                }
            }
        };
        match outcome {
            Ok(conn) => self.session(conn, after, kind).await,
            Err(AttemptError::Token(e)) => {
                if self.tokens.consecutive_failures().await >= self.s.max_token_failures {
                    self.terminal(e)
                } else {
                    self.report(e, false);
                    self.next_backoff()
                }
            }
            Err(AttemptError::Timeout) => {
                log!(Debug, "connect attempt ({}) timed out", kind.name());
                self.on_handshake_timeout(kind).await
            }
            Err(AttemptError::Connect(ConnectError::Network(e), _)) => {
                log!(Debug, "connect failed ({}): {e}", kind.name());
                if self.retrying_ws {
                    if let Some(p) = self.fall_back(kind, &e) {
                        return p;
                    }
                }
                self.next_backoff()
            }
            Err(AttemptError::Connect(ConnectError::NotHere(why), _)) => {
                if let Some(p) = self.fall_back(kind, &why) {
                    return p;
                }
                // Forced transport, or long-poll does not get through either.
                self.report(Error::Network(why), false);
                self.next_backoff()
            }
            Err(AttemptError::Connect(ConnectError::Certificate(e), _)) => {
                // Not silent like other network errors: the app should know.
                log!(Warn, "certificate refused: {e}");
                self.report(Error::Certificate(e), false);
                self.next_backoff()
            }
            Err(AttemptError::Connect(ConnectError::Rejected { status, error }, token)) => {
                if status == 401 {
                    self.tokens.invalidate(&token).await;
                    self.unauthorized += 1;
                    if self.unauthorized >= 2 {
                        return self.terminal(error);
                    }
                    // Once: retry at once with a fresh token.
                    return Phase::Connect;
                }
                if error.is_terminal() {
                    return self.terminal(error);
                }
                let min = match &error {
                    Error::RateLimited { retry_after } => retry_after.unwrap_or_default(),
                    _ => Duration::ZERO,
                };
                self.report(error, false);
                match self.next_backoff() {
                    Phase::Wait(d) => Phase::Wait(d.max(min)),
                    p => p,
                }
            }
        }
    }

    /// Client ping interval now: the foreground ping when the app is in front (if
    /// configured and shorter), else the heartbeat.
    fn ping_interval(&self, heartbeat: Duration) -> Duration {
        match self.s.foreground_ping {
            Some(fg) if self.foreground => fg.min(heartbeat),
            _ => heartbeat,
        }
    }

    async fn session(&mut self, mut conn: T::Conn, after: i64, kind: TransportKind) -> Phase {
        let started = Instant::now();
        let can_ping = conn.can_ping();
        // In fallback: end the session (resuming at once) when WebSocket is due a retry.
        let ws_retry = (self.s.transport == TransportPreference::Auto
            && kind != TransportKind::WebSocket)
            .then_some(self.ws_retry_at);
        // Highest seq this session has carried: acks never go beyond it (the gateway
        // refuses acks of seqs it has not sent on the session).
        let mut carried = after;
        // Connecting with `after` acknowledges it.
        self.acked = self.acked.max(after);
        self.topic_requests.clear();
        let mut welcomed = false;
        let mut heartbeat = self.s.heartbeat.unwrap_or(DEFAULT_HEARTBEAT);
        let mut last_rx = Instant::now();
        let mut next_ping = Instant::now() + self.ping_interval(heartbeat);
        // Traffic must arrive by then (a ping in the foreground, a network change).
        let mut probe: Option<Instant> = None;
        // When the last client ping went out (for the RTT).
        let mut ping_sent: Option<Instant> = None;
        let end = |engine: &mut Self, welcomed: bool| {
            if welcomed && started.elapsed() >= engine.s.healthy_session {
                engine.backoff.reset();
            }
            engine.next_backoff()
        };
        loop {
            let mut dead_at = if welcomed {
                last_rx + heartbeat * 2 + DEAD_GRACE
            } else {
                started + self.s.connect_timeout
            };
            if let Some(p) = probe {
                dead_at = dead_at.min(p);
            }
            tokio::select! {
                biased;
                cmd = self.cmd_rx.recv() => {
                    let Some(cmd) = cmd else {
                        conn.close().await;
                        return Phase::Stop;
                    };
                    let is_network_up = matches!(cmd, Command::Network(true));
                    let is_foreground = matches!(cmd, Command::Foreground);
                    let flow = self.handle(cmd, welcomed);
                    if flow == Flow::Stop {
                        conn.close().await;
                        return Phase::Stop;
                    }
                    if !self.should_connect() {
                        conn.close().await;
                        return Phase::Idle;
                    }
                    if is_network_up && welcomed && !can_ping {
                        // A stream cannot be probed: it may be bound to the old
                        // network. Resume on the new one (and try WebSocket again).
                        conn.close().await;
                        self.ws_retry_at = Instant::now();
                        return Phase::Connect;
                    }
                    if (is_network_up || is_foreground) && welcomed && can_ping {
                        // The old socket may be bound to the old network, or have died
                        // while the app was in the background: probe it.
                        self.outbox.push(ClientFrame::Ping);
                        ping_sent = Some(Instant::now());
                        probe = Some(Instant::now() + self.s.pong_timeout.min(PROBE_TIMEOUT).min(heartbeat));
                        next_ping = Instant::now() + self.ping_interval(heartbeat);
                    }
                }
                incoming = conn.recv() => {
                    last_rx = Instant::now();
                    probe = None;
                    match incoming {
                        None => return end(self, welcomed),
                        Some(Err(e)) => {
                            log!(Debug, "connection error: {e}");
                            return end(self, welcomed);
                        }
                        Some(Ok(Incoming::Activity)) => {}
                        Some(Ok(Incoming::Frame(frame))) => match frame {
                            ServerFrame::Welcome { heartbeat_s, last_seq, .. } => {
                                let cursor = self.db().cursor();
                                if last_seq < cursor {
                                    // The gateway's inbox is not the one our cursor counts in
                                    // (device re-created, store restored): none of its seqs is
                                    // known to be handled, so start over from 0. Resuming at
                                    // `last_seq` would ack entries this app never saw.
                                    conn.close().await;
                                    if !self.in_flight.is_empty() {
                                        // The listener still holds old-inbox messages, whose
                                        // seqs mean nothing in the new one: reset once handled.
                                        return self.next_backoff();
                                    }
                                    log!(Warn, "gateway last_seq {last_seq} < cursor {cursor}; resetting");
                                    if let Err(e) = self.db().reset(0) {
                                        self.report(e, false);
                                    }
                                    self.high = 0;
                                    self.acked = 0;
                                    return Phase::Connect;
                                }
                                welcomed = true;
                                self.unauthorized = 0;
                                self.handshake_timeouts = 0;
                                if kind == TransportKind::WebSocket && self.fallback.take().is_some() {
                                    log!(Info, "WebSocket gets through again");
                                }
                                Counters::inc(&self.counters.connections);
                                heartbeat = self.s.heartbeat.unwrap_or(Duration::from_secs(heartbeat_s.max(1)));
                                next_ping = Instant::now() + self.ping_interval(heartbeat);
                                self.set_state(ConnectionState::Connected { transport: kind });
                                let mut frames: Vec<ClientFrame> = self
                                    .topics
                                    .iter()
                                    .map(|t| ClientFrame::Subscribe { topic: t.clone() })
                                    .collect();
                                // Kept until the gateway confirms (they survive restarts).
                                frames.extend(
                                    self.unsubscribe_pending
                                        .iter()
                                        .map(|topic| ClientFrame::Unsubscribe { topic: topic.clone() }),
                                );
                                frames.append(&mut self.outbox);
                                self.outbox = frames;
                            }
                            ServerFrame::Msg(m) => {
                                carried = carried.max(m.seq);
                                self.on_stream_message(m);
                            }
                            ServerFrame::Pong => {
                                if let Some(sent) = ping_sent.take() {
                                    let rtt = sent.elapsed().as_millis() as u64;
                                    self.counters.last_rtt_ms.store(rtt + 1, std::sync::atomic::Ordering::Relaxed);
                                }
                            }
                            ServerFrame::Subscribed { topic } => self.on_topic_answer(topic, true),
                            ServerFrame::Unsubscribed { topic } => self.on_topic_answer(topic, false),
                            ServerFrame::Reconnect { after_ms } => {
                                conn.close().await;
                                // A planned drain, not a failure; spread clients a little.
                                self.backoff.reset();
                                let jitter = self.rng.gen_range(0..=self.s.backoff_min.as_millis() as u64);
                                return Phase::Wait(Duration::from_millis(after_ms.saturating_add(jitter)));
                            }
                            ServerFrame::Error { code, message } => self.on_error_frame(code, message),
                        },
                    }
                }
                _ = sleep_until(next_ping), if welcomed => {
                    self.outbox.push(ClientFrame::Ping);
                    ping_sent = Some(Instant::now());
                    let interval = self.ping_interval(heartbeat);
                    if interval < heartbeat && probe.is_none() && can_ping {
                        // Foreground liveness: a pong (or any traffic) must come soon.
                        probe = Some(Instant::now() + self.s.pong_timeout);
                    }
                    next_ping = Instant::now() + interval;
                }
                _ = sleep_until(dead_at) => {
                    log!(Info, "connection silent, reconnecting");
                    conn.close().await;
                    if !welcomed {
                        return self.on_handshake_timeout(kind).await;
                    }
                    return end(self, welcomed);
                }
                _ = sleep_until(ws_retry.unwrap_or(dead_at)), if welcomed && ws_retry.is_some() => {
                    log!(Info, "trying WebSocket again");
                    conn.close().await;
                    return Phase::Connect;
                }
            }
            if welcomed {
                let cursor = self.db().cursor().min(carried);
                if cursor > self.acked {
                    self.outbox.push(ClientFrame::Ack { seq: cursor });
                    self.acked = cursor;
                }
                for frame in std::mem::take(&mut self.outbox) {
                    match &frame {
                        ClientFrame::Subscribe { topic } => {
                            self.topic_requests.push_back((topic.clone(), true))
                        }
                        ClientFrame::Unsubscribe { topic } => {
                            self.topic_requests.push_back((topic.clone(), false))
                        }
                        _ => {}
                    }
                    if let Err(e) = conn.send(&frame).await {
                        log!(Debug, "send failed: {e}");
                        return end(self, welcomed);
                    }
                }
            }
        }
    }

    /// `subscribed` / `unsubscribed` from the gateway.
    fn on_topic_answer(&mut self, topic: String, subscribed: bool) {
        if let Some(i) = self
            .topic_requests
            .iter()
            .position(|(t, s)| *t == topic && *s == subscribed)
        {
            self.topic_requests.remove(i);
        }
        if !subscribed && !self.topics.contains(&topic) {
            self.unsubscribe_pending.remove(&topic);
            if let Err(e) = self.db().forget_topic(&topic, Some(false)) {
                self.report(e, false);
            }
        }
        let _ = self.events.send(Event::Subscription { topic, subscribed });
    }

    /// An `error` frame. Frames are answered in order, so a refusal of a topic
    /// request (e.g. `forbidden_topic`) belongs to the oldest unanswered request whose
    /// topic the message names — or, for a topic error code, to the oldest one.
    fn on_error_frame(&mut self, code: String, message: String) {
        let by_name = self
            .topic_requests
            .iter()
            .position(|(t, _)| message.contains(t.as_str()));
        let idx = by_name
            .or_else(|| (code.contains("topic") && !self.topic_requests.is_empty()).then_some(0));
        let Some((topic, subscribe)) = idx.and_then(|i| self.topic_requests.remove(i)) else {
            self.report(Error::Protocol(format!("{code}: {message}")), false);
            return;
        };
        log!(
            Warn,
            "gateway refused to {} {topic}: {code}: {message}",
            if subscribe {
                "subscribe to"
            } else {
                "unsubscribe from"
            }
        );
        if subscribe {
            // Refused: do not ask again on every reconnect.
            self.topics.remove(&topic);
            if let Err(e) = self.db().forget_topic(&topic, Some(true)) {
                self.report(e, false);
            }
        }
        let _ = self.events.send(Event::SubscriptionFailed {
            topic,
            subscribe,
            code,
            message,
        });
    }

    /// Cursor: everything at or below it was handled (the listener returned).
    fn cursor_now(&self) -> i64 {
        match self.in_flight.first() {
            Some(min) => min - 1,
            None => self.high,
        }
    }

    fn record(&mut self, seq: i64, id: &str) {
        let cursor = self.cursor_now();
        let r = self.db().record_handled(seq, id, cursor);
        if let Err(e) = r {
            self.report(e, false);
        }
    }

    /// A message of the ordered stream (live or sync, seqs increasing).
    fn on_stream_message(&mut self, m: InboxMessage) {
        if m.seq <= self.high {
            Counters::inc(&self.counters.duplicates_skipped);
            return; // already handed over in this process
        }
        self.high = m.seq;
        let handled = self.db().is_handled(m.seq, &m.id);
        match handled {
            Ok(true) => {
                // Got it through a push before, or another process handled it.
                Counters::inc(&self.counters.duplicates_skipped);
                self.record(m.seq, &m.id)
            }
            _ => {
                self.in_flight.insert(m.seq);
                let _ = self.events.send(Event::Message(m, Delivery::Stream));
            }
        }
    }

    /// The listener thread finished a message (and committed its cursor): only the
    /// in-memory view and, when a push-handled seq was passed meanwhile, the cursor
    /// beyond it are left to do.
    fn on_handled(&mut self, seq: i64) {
        self.in_flight.remove(&seq);
        let cursor = self.cursor_now();
        let r = self.db().advance(cursor);
        if let Err(e) = r {
            self.report(e, false);
        }
    }

    fn spawn_sync(&mut self, push: Option<PendingPush>) {
        let api = self.api.clone();
        let after = self.high;
        let pages = self.s.sync_max_pages;
        let tx = self.cmd_tx.clone();
        self.tasks.spawn(async move {
            let result = match push.as_ref().map(|p| p.deadline) {
                // Leave time to record and ack before the caller's deadline.
                Some(deadline) => {
                    let until = deadline - (deadline - Instant::now()) / 4;
                    match tokio::time::timeout_at(until, api.sync_all(after, pages)).await {
                        Ok(r) => r,
                        Err(_) => Err(Error::Timeout("sync did not finish in time".into())),
                    }
                }
                None => api.sync_all(after, pages).await,
            };
            if let Some(tx) = tx.upgrade() {
                let _ = tx.send(Command::SyncDone { result, push });
            }
        });
    }

    /// Acks over HTTP what was handled while no session is up (background sync).
    fn http_ack(&mut self) {
        let cursor = self.db().cursor();
        if cursor > self.acked && self.network {
            self.acked = cursor;
            let api = self.api.clone();
            self.tasks.spawn(async move {
                if let Err(e) = api.ack(cursor).await {
                    log!(Debug, "ack over HTTP failed: {e}");
                }
            });
        }
        // Reap finished tasks.
        while self.tasks.try_join_next().is_some() {}
    }

    fn handle(&mut self, cmd: Command, connected: bool) -> Flow {
        match cmd {
            Command::Connect => {
                self.wanted = true;
                return Flow::Now;
            }
            Command::Disconnect => self.wanted = false,
            Command::Network(up) => {
                self.network = up;
                if up {
                    // A new network may let WebSocket through.
                    self.ws_retry_at = Instant::now();
                    return Flow::Now;
                }
            }
            Command::Foreground => {
                self.foreground = true;
                return Flow::Now;
            }
            Command::Background => self.foreground = false,
            Command::Subscribe(topic) => {
                if let Err(e) = self.db().set_topic(&topic, true) {
                    self.report(e, false);
                }
                self.unsubscribe_pending.remove(&topic);
                if self.topics.insert(topic.clone()) && connected {
                    self.outbox.push(ClientFrame::Subscribe { topic });
                }
            }
            Command::Unsubscribe(topic) => {
                if let Err(e) = self.db().set_topic(&topic, false) {
                    self.report(e, false);
                }
                self.topics.remove(&topic);
                // Kept (in the store too) until the gateway confirms, so an unsubscribe
                // made offline is sent after a restart.
                self.unsubscribe_pending.insert(topic.clone());
                if connected {
                    self.outbox.push(ClientFrame::Unsubscribe { topic });
                }
            }
            Command::SyncNow => {
                if !self.sync_running {
                    self.sync_running = true;
                    self.spawn_sync(None);
                }
            }
            Command::HandlePush(info, deadline, reply) => {
                let mine = info
                    .device_id
                    .as_deref()
                    .is_none_or(|d| d == self.s.device_id);
                let seen = info.seq <= self.high
                    || self
                        .db()
                        .is_handled(info.seq, &info.message_id)
                        .unwrap_or(false);
                if !mine || seen {
                    let _ = reply.send(Ok(PushOutcome {
                        messages: Vec::new(),
                        acked: true,
                    }));
                } else {
                    self.spawn_sync(Some(PendingPush {
                        info,
                        deadline,
                        reply,
                    }));
                }
            }
            Command::PushUndelivered(messages) => {
                for m in messages {
                    let _ = self.db().unclaim(m.seq);
                    self.in_flight.insert(m.seq);
                    let _ = self.events.send(Event::Message(m, Delivery::Direct));
                }
            }
            Command::Reset(reply) => {
                self.wanted = false;
                let r = self.db().clear(&self.s.device_id);
                self.high = 0;
                self.acked = 0;
                self.in_flight.clear();
                self.topics.clear();
                self.unsubscribe_pending.clear();
                self.topic_requests.clear();
                self.outbox.clear();
                let _ = reply.send(r);
            }
            Command::Handled { seq } => self.on_handled(seq),
            Command::Close => return Flow::Stop,
            Command::SyncDone { result, push } => self.on_sync_done(result, push),
        }
        Flow::Continue
    }

    fn on_sync_done(
        &mut self,
        result: Result<Vec<InboxMessage>, Error>,
        push: Option<PendingPush>,
    ) {
        let Some(PendingPush {
            info,
            deadline,
            reply,
        }) = push
        else {
            self.sync_running = false;
            match result {
                Ok(messages) => messages.into_iter().for_each(|m| self.on_stream_message(m)),
                Err(e) => self.report(e, false),
            }
            return;
        };
        // handle_push: new messages go back to the caller, not to the listener. Each
        // is recorded as handled here (in a transaction that first checks the other
        // process did not take it), before the caller gets it.
        let mut out = Vec::new();
        let sync_error = match result {
            Ok(messages) => {
                for m in messages {
                    if m.seq <= self.high {
                        continue;
                    }
                    self.high = m.seq;
                    let fresh = self.db().claim_for_push(m.seq, &m.id);
                    match fresh {
                        Ok(true) => out.push(m),
                        Ok(false) => Counters::inc(&self.counters.duplicates_skipped),
                        // Better twice than never.
                        Err(e) => {
                            log!(Error, "cannot record message {}: {e}", m.id);
                            out.push(m)
                        }
                    }
                }
                None
            }
            Err(e) => Some(e),
        };
        let cursor = self.cursor_now();
        if let Err(e) = self.db().advance(cursor) {
            self.report(e, false);
        }
        // The pushed message itself, if the sync did not bring it (offline, or beyond
        // the pages fetched) and the push carried its content: deliver it out of order
        // (recorded by id; the cursor does not move past the gap).
        if info.seq > self.high && !out.iter().any(|m| m.seq == info.seq) {
            if let Some(m) = info.to_message() {
                if self.db().claim_for_push(m.seq, &m.id).unwrap_or(true) {
                    out.push(m);
                }
            }
        }
        if out.is_empty() {
            if let Some(e) = sync_error {
                let _ = reply.send(Err(e));
                return;
            }
        }
        // Ack before answering: the caller (an extension) may be suspended or killed
        // right after, and an ack that never left keeps the delivery `pushed`.
        let cursor = self.db().cursor();
        let need_ack = cursor > self.acked;
        if need_ack {
            self.acked = cursor;
        }
        let api = self.api.clone();
        let tx = self.cmd_tx.clone();
        self.tasks.spawn(async move {
            let acked = if need_ack {
                match tokio::time::timeout_at(deadline, api.ack(cursor)).await {
                    Ok(Ok(_)) => true,
                    Ok(Err(e)) => {
                        log!(Info, "push: ack of {cursor} failed: {e}");
                        false
                    }
                    Err(_) => {
                        log!(Info, "push: ack of {cursor} not answered in time");
                        false
                    }
                }
            } else {
                true
            };
            let out_of_order = out.iter().any(|m| m.seq > cursor);
            let outcome = PushOutcome {
                messages: out,
                acked: acked && !out_of_order,
            };
            if let Err(mpsc::SendError(Ok(outcome))) = reply.send(Ok(outcome)) {
                // The caller is gone: hand the messages to the listener instead.
                if let Some(tx) = tx.upgrade() {
                    let _ = tx.send(Command::PushUndelivered(outcome.messages));
                }
            }
        });
    }

    async fn finish(&mut self) {
        self.tasks.shutdown().await;
        self.set_state(ConnectionState::Closed);
    }
}
