//! The connection state machine. Runs as one task on the SDK's runtime; owns the
//! store, the backoff and the connection; is driven by [`Command`]s (public calls,
//! "listener returned" notices, results of background HTTP tasks) and by what the
//! connection yields. Generic over [`Transport`] so tests drive it with a fake.
//!
//! Phases: `Idle` (Disconnected, or Suspended when the app wants a connection but is
//! in the background / offline) → `Connect` (Connecting) → session (Connected) →
//! `Wait` (WaitingToReconnect) → `Connect` … Terminal errors go back to `Idle` with
//! `wanted = false`.

use std::collections::BTreeSet;
use std::sync::{mpsc, Arc, Mutex};
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
use crate::push::PushInfo;
use crate::store::Store;
use crate::token::Tokens;
use crate::transport::{ConnectError, Connection, Incoming, Transport};
use crate::{ConnectionState, Error};

pub(crate) type Reply<T> = mpsc::SyncSender<Result<T, Error>>;

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
    HandlePush(PushInfo, Reply<Vec<InboxMessage>>),
    /// The app's listener returned for this message.
    Handled {
        seq: i64,
        id: String,
    },
    /// Shut down; with `drain`, first wait (bounded) for the listener to finish the
    /// messages already handed to it so their cursor is persisted.
    Close {
        drain: bool,
    },
    /// Result of a background `GET /v1/me/sync`.
    SyncDone {
        result: Result<Vec<InboxMessage>, Error>,
        push: Option<(PushInfo, Reply<Vec<InboxMessage>>)>,
    },
}

/// Outputs of the engine, delivered to the app's listener in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    State(ConnectionState),
    Message(InboxMessage),
    Error { error: Error, terminal: bool },
    Subscription { topic: String, subscribed: bool },
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
    pub max_token_failures: u32,
    pub sync_max_pages: u32,
}

pub(crate) struct Engine<T: Transport> {
    s: Arc<Settings>,
    transport: Arc<T>,
    tokens: Arc<Tokens>,
    api: Arc<Api>,
    store: Store,
    events: mpsc::Sender<Event>,
    cmd_rx: UnboundedReceiver<Command>,
    cmd_tx: WeakUnboundedSender<Command>,
    shared_state: Arc<Mutex<ConnectionState>>,
    state: ConnectionState,
    rng: StdRng,
    backoff: Backoff,
    wanted: bool,
    network: bool,
    foreground: bool,
    topics: BTreeSet<String>,
    unsubscribe_pending: BTreeSet<String>,
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
    drain_on_close: bool,
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
/// Until the welcome tells the real value.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
/// Bound on waiting for the listener at close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct EngineParts<T> {
    pub settings: Arc<Settings>,
    pub transport: Arc<T>,
    pub tokens: Arc<Tokens>,
    pub api: Arc<Api>,
    pub store: Store,
    pub events: mpsc::Sender<Event>,
    pub cmd_rx: UnboundedReceiver<Command>,
    pub cmd_tx: WeakUnboundedSender<Command>,
    pub shared_state: Arc<Mutex<ConnectionState>>,
    pub rng: StdRng,
}

impl<T: Transport> Engine<T> {
    pub fn new(p: EngineParts<T>) -> Self {
        let high = p.store.cursor();
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
            state: ConnectionState::Disconnected,
            rng: p.rng,
            wanted: false,
            network: true,
            foreground: true,
            topics: BTreeSet::new(),
            unsubscribe_pending: BTreeSet::new(),
            high,
            in_flight: BTreeSet::new(),
            acked: high,
            unauthorized: 0,
            sync_running: false,
            tasks: JoinSet::new(),
            outbox: Vec::new(),
            drain_on_close: false,
        }
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
        tracing::warn!("herald: giving up: {error}");
        self.wanted = false;
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

    async fn connect(&mut self) -> Phase {
        self.set_state(ConnectionState::Connecting);
        let transport = self.transport.clone();
        let tokens = self.tokens.clone();
        let s = self.s.clone();
        // Resume after what the app has handled (not merely received): messages still
        // with the listener are replayed and skipped, so nothing is acked early.
        let after = self.store.cursor();
        let attempt = async move {
            let token = tokens.get().await.map_err(AttemptError::Token)?;
            let connect = transport.connect(&s.base, &s.device_id, after, &token.value);
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
                    if self.handle(cmd, false) == Flow::Stop {
                        return Phase::Stop;
                    }
                    if !self.should_connect() {
                        return Phase::Idle;
                    }
                }
            }
        };
        match outcome {
            Ok(conn) => self.session(conn, after).await,
            Err(AttemptError::Token(e)) => {
                if self.tokens.consecutive_failures().await >= self.s.max_token_failures {
                    self.terminal(e)
                } else {
                    self.report(e, false);
                    self.next_backoff()
                }
            }
            Err(AttemptError::Timeout) => self.next_backoff(),
            Err(AttemptError::Connect(ConnectError::Network(e), _)) => {
                tracing::debug!("herald: connect failed: {e}");
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

    async fn session(&mut self, mut conn: T::Conn, after: i64) -> Phase {
        let started = Instant::now();
        // Highest seq this session has carried: acks never go beyond it (the gateway
        // refuses acks of seqs it has not sent on the session).
        let mut carried = after;
        // Connecting with `after` acknowledges it.
        self.acked = self.acked.max(after);
        let mut welcomed = false;
        let mut heartbeat = self.s.heartbeat.unwrap_or(DEFAULT_HEARTBEAT);
        let mut last_rx = Instant::now();
        let mut next_ping = Instant::now() + heartbeat;
        let mut probe: Option<Instant> = None;
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
                    let flow = self.handle(cmd, welcomed);
                    if flow == Flow::Stop {
                        conn.close().await;
                        return Phase::Stop;
                    }
                    if !self.should_connect() {
                        conn.close().await;
                        return Phase::Idle;
                    }
                    if is_network_up && welcomed {
                        // The old socket may be bound to the old network: probe it.
                        self.outbox.push(ClientFrame::Ping);
                        probe = Some(Instant::now() + PROBE_TIMEOUT.min(heartbeat));
                    }
                }
                incoming = conn.recv() => {
                    last_rx = Instant::now();
                    probe = None;
                    match incoming {
                        None => return end(self, welcomed),
                        Some(Err(e)) => {
                            tracing::debug!("herald: connection error: {e}");
                            return end(self, welcomed);
                        }
                        Some(Ok(Incoming::Activity)) => {}
                        Some(Ok(Incoming::Frame(frame))) => match frame {
                            ServerFrame::Welcome { heartbeat_s, last_seq, .. } => {
                                if last_seq < self.store.cursor() {
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
                                    tracing::warn!("herald: gateway last_seq {last_seq} < cursor {}; resetting", self.store.cursor());
                                    if let Err(e) = self.store.reset(0) {
                                        self.report(e, false);
                                    }
                                    self.high = 0;
                                    self.acked = 0;
                                    return Phase::Connect;
                                }
                                welcomed = true;
                                self.unauthorized = 0;
                                heartbeat = self.s.heartbeat.unwrap_or(Duration::from_secs(heartbeat_s.max(1)));
                                next_ping = Instant::now() + heartbeat;
                                self.set_state(ConnectionState::Connected);
                                let mut frames: Vec<ClientFrame> = self
                                    .topics
                                    .iter()
                                    .map(|t| ClientFrame::Subscribe { topic: t.clone() })
                                    .collect();
                                frames.extend(
                                    std::mem::take(&mut self.unsubscribe_pending)
                                        .into_iter()
                                        .map(|topic| ClientFrame::Unsubscribe { topic }),
                                );
                                frames.append(&mut self.outbox);
                                self.outbox = frames;
                            }
                            ServerFrame::Msg(m) => {
                                carried = carried.max(m.seq);
                                self.on_stream_message(m);
                            }
                            ServerFrame::Pong => {}
                            ServerFrame::Subscribed { topic } => {
                                let _ = self.events.send(Event::Subscription { topic, subscribed: true });
                            }
                            ServerFrame::Unsubscribed { topic } => {
                                let _ = self.events.send(Event::Subscription { topic, subscribed: false });
                            }
                            ServerFrame::Reconnect { after_ms } => {
                                conn.close().await;
                                // A planned drain, not a failure; spread clients a little.
                                self.backoff.reset();
                                let jitter = self.rng.gen_range(0..=self.s.backoff_min.as_millis() as u64);
                                return Phase::Wait(Duration::from_millis(after_ms.saturating_add(jitter)));
                            }
                            ServerFrame::Error { code, message } => {
                                self.report(Error::Protocol(format!("{code}: {message}")), false);
                            }
                        },
                    }
                }
                _ = sleep_until(next_ping), if welcomed => {
                    self.outbox.push(ClientFrame::Ping);
                    next_ping = Instant::now() + heartbeat;
                }
                _ = sleep_until(dead_at) => {
                    tracing::debug!("herald: connection silent, reconnecting");
                    conn.close().await;
                    return end(self, welcomed);
                }
            }
            if welcomed {
                let cursor = self.store.cursor().min(carried);
                if cursor > self.acked {
                    self.outbox.push(ClientFrame::Ack { seq: cursor });
                    self.acked = cursor;
                }
                for frame in std::mem::take(&mut self.outbox) {
                    if let Err(e) = conn.send(&frame).await {
                        tracing::debug!("herald: send failed: {e}");
                        return end(self, welcomed);
                    }
                }
            }
        }
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
        if let Err(e) = self.store.record_handled(seq, id, cursor) {
            self.report(e, false);
        }
    }

    /// A message of the ordered stream (live or sync, seqs increasing).
    fn on_stream_message(&mut self, m: InboxMessage) {
        if m.seq <= self.high {
            return; // already handed over in this process
        }
        self.high = m.seq;
        match self.store.is_handled(m.seq, &m.id) {
            Ok(true) => self.record(m.seq, &m.id), // got it through a push before
            _ => {
                self.in_flight.insert(m.seq);
                let _ = self.events.send(Event::Message(m));
            }
        }
    }

    fn on_handled(&mut self, seq: i64, id: &str) {
        self.in_flight.remove(&seq);
        self.record(seq, id);
    }

    fn spawn_sync(&mut self, push: Option<(PushInfo, Reply<Vec<InboxMessage>>)>) {
        let api = self.api.clone();
        let after = self.high;
        let pages = self.s.sync_max_pages;
        let tx = self.cmd_tx.clone();
        self.tasks.spawn(async move {
            let result = api.sync_all(after, pages).await;
            if let Some(tx) = tx.upgrade() {
                let _ = tx.send(Command::SyncDone { result, push });
            }
        });
    }

    /// Acks over HTTP what was handled while no session is up (background sync).
    fn http_ack(&mut self) {
        let cursor = self.store.cursor();
        if cursor > self.acked && self.network {
            self.acked = cursor;
            let api = self.api.clone();
            self.tasks.spawn(async move {
                if let Err(e) = api.ack(cursor).await {
                    tracing::debug!("herald: ack over HTTP failed: {e}");
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
                    return Flow::Now;
                }
            }
            Command::Foreground => {
                self.foreground = true;
                return Flow::Now;
            }
            Command::Background => self.foreground = false,
            Command::Subscribe(topic) => {
                self.unsubscribe_pending.remove(&topic);
                if self.topics.insert(topic.clone()) && connected {
                    self.outbox.push(ClientFrame::Subscribe { topic });
                }
            }
            Command::Unsubscribe(topic) => {
                self.topics.remove(&topic);
                if connected {
                    self.outbox.push(ClientFrame::Unsubscribe { topic });
                } else {
                    self.unsubscribe_pending.insert(topic);
                }
            }
            Command::SyncNow => {
                if !self.sync_running {
                    self.sync_running = true;
                    self.spawn_sync(None);
                }
            }
            Command::HandlePush(info, reply) => {
                let mine = info
                    .device_id
                    .as_deref()
                    .is_none_or(|d| d == self.s.device_id);
                let seen = info.seq <= self.high
                    || self
                        .store
                        .is_handled(info.seq, &info.message_id)
                        .unwrap_or(false);
                if !mine || seen {
                    let _ = reply.send(Ok(Vec::new()));
                } else {
                    self.spawn_sync(Some((info, reply)));
                }
            }
            Command::Handled { seq, id } => self.on_handled(seq, &id),
            Command::Close { drain } => {
                self.drain_on_close = drain;
                return Flow::Stop;
            }
            Command::SyncDone { result, push } => self.on_sync_done(result, push),
        }
        Flow::Continue
    }

    fn on_sync_done(
        &mut self,
        result: Result<Vec<InboxMessage>, Error>,
        push: Option<(PushInfo, Reply<Vec<InboxMessage>>)>,
    ) {
        let Some((info, reply)) = push else {
            self.sync_running = false;
            match result {
                Ok(messages) => messages.into_iter().for_each(|m| self.on_stream_message(m)),
                Err(e) => self.report(e, false),
            }
            return;
        };
        // handle_push: new messages go back to the caller, not to the listener.
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        let sync_error = match result {
            Ok(messages) => {
                for m in messages {
                    if m.seq <= self.high {
                        continue;
                    }
                    self.high = m.seq;
                    if self.store.is_handled(m.seq, &m.id).unwrap_or(false) {
                        skipped.push((m.seq, m.id));
                    } else {
                        out.push(m);
                    }
                }
                None
            }
            Err(e) => Some(e),
        };
        for (seq, id) in skipped {
            self.record(seq, &id);
        }
        // The pushed message itself, if the sync did not bring it (offline, or beyond
        // the pages fetched) and the push carried its content: deliver it out of order
        // (recorded by id; the cursor does not move past the gap).
        let mut out_of_order = None;
        if info.seq > self.high && !out.iter().any(|m| m.seq == info.seq) {
            out_of_order = info.to_message();
        }
        if out.is_empty() && out_of_order.is_none() {
            if let Some(e) = sync_error {
                let _ = reply.send(Err(e));
                return;
            }
        }
        let mut all = out.clone();
        all.extend(out_of_order.clone());
        match reply.send(Ok(all)) {
            Ok(()) => {
                for m in &out {
                    self.record(m.seq, &m.id);
                }
                if let Some(m) = out_of_order {
                    let cursor = self.store.cursor();
                    if let Err(e) = self.store.record_handled(m.seq, &m.id, cursor) {
                        self.report(e, false);
                    }
                }
            }
            Err(_) => {
                // The caller is gone: hand the messages to the listener instead.
                for m in out {
                    self.in_flight.insert(m.seq);
                    let _ = self.events.send(Event::Message(m));
                }
            }
        }
    }

    async fn finish(&mut self) {
        if self.drain_on_close {
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            while !self.in_flight.is_empty() {
                tokio::select! {
                    _ = sleep_until(deadline) => break,
                    cmd = self.cmd_rx.recv() => match cmd {
                        Some(Command::Handled { seq, id }) => self.on_handled(seq, &id),
                        Some(Command::HandlePush(_, reply)) => {
                            let _ = reply.send(Err(Error::Closed));
                        }
                        Some(_) => {}
                        None => break,
                    },
                }
            }
        }
        self.tasks.shutdown().await;
        self.set_state(ConnectionState::Closed);
    }
}
