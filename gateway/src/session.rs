//! One device's live WebSocket session.
//!
//! Written over any `Stream + Sink` of WebSocket messages so it can be driven without
//! a socket. The order of operations is what makes replay → live gap-free:
//! 1. register in the `SessionRegistry` (from now on every commit is also queued here),
//! 2. replay the store after the client's cursor,
//! 3. forward queued entries, skipping seqs already sent. Two publishes committed in
//!    one group are routed by two tasks, so seq n+1 can reach the queue just before
//!    seq n: an entry that arrives early waits (at most `GAP_WAIT`) for the ones before
//!    it, and only a gap that does not fill in time is read from the store.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use herald_protocol::{ClientFrame, ServerFrame};
use tokio::time::{interval_at, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::auth::TopicAccess;
use crate::clock::now_ms;
use crate::delivery::DeliveryRouter;
use crate::registry::{KickReason, QueuedBytes, SessionEvent, SessionInbox, SessionProgress};
use crate::store::{InboxEntry, StoreError};

/// Longest an entry that arrived ahead of its predecessor waits for it before the gap
/// is read from the store. The predecessor is normally a task switch away; reading it
/// back instead was 15% of the gateway's CPU under batch load (BENCHMARKS.md, #12).
const GAP_WAIT: Duration = Duration::from_millis(25);
/// At most this many entries wait for a gap; one more reads the gap at once.
const MAX_EARLY: usize = 256;

pub struct SessionConfig {
    pub heartbeat: Duration,
    pub ack_timeout: Duration,
    /// Longest a single socket write may wait for the peer to make room; past it the
    /// session is closed as a stuck consumer.
    pub write_timeout: Duration,
    pub replay_batch: u32,
    pub shutdown_reconnect_ms: u64,
    /// `limits.max_topics_per_device`.
    pub max_topics: usize,
}

/// Why a session ended (metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    ClientClosed,
    HeartbeatTimeout,
    AckTimeout,
    SlowConsumer,
    /// A write did not complete within `write_timeout`: the peer stopped reading.
    WriteTimeout,
    /// The client sent a frame or message above `limits.max_ws_frame_bytes`.
    TooLarge,
    Replaced,
    Deleted,
    Revoked,
    Kicked,
    Shutdown,
    ProtocolError,
    StoreError,
    SocketError,
}

impl CloseReason {
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::AckTimeout => "ack_timeout",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::TooLarge => "too_large",
            CloseReason::Replaced => "replaced",
            CloseReason::Deleted => "deleted",
            CloseReason::Revoked => "revoked",
            CloseReason::Kicked => "kicked",
            CloseReason::Shutdown => "shutdown",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::StoreError => "store_error",
            CloseReason::SocketError => "socket_error",
        }
    }
}

struct Session<'a, S, E> {
    socket: S,
    device_id: String,
    topics: TopicAccess,
    router: &'a DeliveryRouter,
    cfg: &'a SessionConfig,
    /// Highest seq written to the socket.
    last_sent: i64,
    welcome_last_seq: i64,
    /// Written but not yet acked, oldest first, with when they were written.
    unacked: VecDeque<(InboxEntry, Instant)>,
    last_heard: Instant,
    /// Shared with the registry, so a due push can tell what this session wrote.
    progress: Arc<SessionProgress>,
    /// Entries that arrived ahead of a gap, waiting for it until `gap_deadline`.
    early: BTreeMap<i64, (InboxEntry, std::time::Instant)>,
    gap_deadline: Option<Instant>,
    /// A frame read while folding acks that was not one: handled before the socket is
    /// read again. Boxed, since every idle connection carries this field.
    held: Option<Box<Option<Result<Message, E>>>>,
}

/// Most buffered frames one ack write folds in, so a flood of acks cannot keep a
/// session from its deliveries.
const MAX_FOLDED_ACKS: usize = 1024;

type SessionResult = Result<(), CloseReason>;

/// Where a session starts, as settled by the connect request.
pub struct SessionStart {
    pub device_id: String,
    /// The client's cursor (highest seq it has), already checked against `last_seq`.
    pub after: i64,
    /// The device's highest assigned seq when it connected, for the welcome.
    pub last_seq: i64,
    /// The topics the device may subscribe to itself (from its token and the policy).
    pub topics: TopicAccess,
}

/// Runs the session to its end and returns why it ended.
pub async fn run_session<S, E>(
    socket: S,
    start: SessionStart,
    mut inbox: SessionInbox,
    router: &DeliveryRouter,
    cfg: &SessionConfig,
    shutdown: CancellationToken,
) -> CloseReason
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin,
    E: std::error::Error + 'static,
{
    let mut session = Session {
        socket,
        device_id: start.device_id,
        topics: start.topics,
        router,
        cfg,
        last_sent: start.after,
        welcome_last_seq: start.last_seq,
        unacked: VecDeque::new(),
        last_heard: Instant::now(),
        progress: inbox.progress.clone(),
        early: BTreeMap::new(),
        gap_deadline: None,
        held: None,
    };
    let kill = inbox.kill.clone();
    let queued = inbox.queued.clone();
    // Biased: a kick cancels `kill` before the registry drops the session's sender,
    // so checking `kill` first reports why (replaced, deleted…) instead of the closed
    // queue the session loop would see. `kill` is a child of `shutdown` (see
    // `SessionRegistry::new`): the loop polls one token of its own on every wakeup,
    // not the server-wide one whose lock all sessions would share.
    let result = tokio::select! {
        biased;
        _ = kill.cancelled() => Err(match inbox.kick_reason() {
            Some(KickReason::SlowConsumer) => CloseReason::SlowConsumer,
            Some(KickReason::Replaced) => CloseReason::Replaced,
            Some(KickReason::Deleted) => CloseReason::Deleted,
            Some(KickReason::Revoked) => CloseReason::Revoked,
            None if shutdown.is_cancelled() => CloseReason::Shutdown,
            _ => CloseReason::Kicked,
        }),
        r = session.run(&mut inbox, &queued) => r,
    };
    let reason = match result {
        Ok(()) => CloseReason::ClientClosed,
        Err(r) => r,
    };
    if reason == CloseReason::Shutdown {
        let frame = ServerFrame::Reconnect {
            after_ms: cfg.shutdown_reconnect_ms,
        };
        let _ = Box::pin(session.send_frame(&frame)).await;
    }
    // Whatever is still queued stays in the inbox and is replayed on reconnect.
    inbox.events.close();
    while let Ok(event) = inbox.events.try_recv() {
        if matches!(event, SessionEvent::Deliver(..)) {
            router.metrics.session_queue_depth.dec();
        }
    }
    Box::pin(session.finish(reason)).await;
    reason
}

impl<S, E> Session<'_, S, E>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin,
    E: std::error::Error + 'static,
{
    async fn run(&mut self, inbox: &mut SessionInbox, queued: &QueuedBytes) -> SessionResult {
        // `last_seq` was read by the connect request: a second read here could fail
        // and report 0, which a client takes for "device re-created" and resets.
        let welcome = ServerFrame::Welcome {
            session_id: format!("s{}", inbox.session_id),
            heartbeat_s: self.cfg.heartbeat.as_secs().max(1),
            ack_timeout_s: self.cfg.ack_timeout.as_secs().max(1),
            last_seq: self.welcome_last_seq,
        };
        // Work that runs once or per event is boxed: the session future lives as long
        // as the connection, and its size is the largest state it can be in, paid by
        // every idle connection (see BENCHMARKS.md).
        Box::pin(self.send_frame(&welcome)).await?;
        // The first page asks for what the welcome's `last_seq` says is there (one
        // more, to tell a full page): most sessions start caught up or a few entries
        // behind, and the store serves so small a page as a point read.
        let expected = (self.welcome_last_seq - self.last_sent).max(0) as u64 + 1;
        let first_page = expected.min(self.cfg.replay_batch as u64) as u32;
        Box::pin(self.fill_from_store(i64::MAX, first_page)).await?;

        let mut heartbeat = interval_at(Instant::now() + self.cfg.heartbeat, self.cfg.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            if let Some(frame) = self.held.take() {
                if Box::pin(self.on_frame(*frame)).await? {
                    return Ok(());
                }
                continue;
            }
            let ack_deadline = self
                .unacked
                .front()
                .map(|(_, at)| *at + self.cfg.ack_timeout);
            let gap_deadline = self.gap_deadline;
            tokio::select! {
                biased;
                frame = self.socket.next() => {
                    if Box::pin(self.on_frame(frame)).await? {
                        return Ok(());
                    }
                }
                event = inbox.events.recv() => match event {
                    Some(SessionEvent::Deliver(delivery)) => {
                        let (entry, committed_at, weight) = *delivery;
                        queued.release(weight);
                        self.router.metrics.session_queue_depth.dec();
                        Box::pin(self.on_deliver(entry, committed_at)).await?;
                    }
                    Some(SessionEvent::AckedElsewhere(seq)) => {
                        while self.unacked.front().is_some_and(|(e, _)| e.seq <= seq) {
                            self.unacked.pop_front();
                        }
                    }
                    Some(SessionEvent::Resync) => Box::pin(async {
                        self.fill_from_store(i64::MAX, self.cfg.replay_batch).await?;
                        self.drain_early().await
                    })
                    .await?,
                    None => return Err(CloseReason::Kicked),
                },
                _ = heartbeat.tick() => {
                    if self.last_heard.elapsed() > self.cfg.heartbeat * 2 {
                        return Err(CloseReason::HeartbeatTimeout);
                    }
                    Box::pin(self.send(Message::Ping(Default::default()))).await?;
                }
                // One timer for both deadlines: every idle session pays for the
                // futures of this loop, so no second `Sleep`.
                _ = sleep_until_opt(earliest(gap_deadline, ack_deadline)) => {
                    if gap_deadline.is_some_and(|d| d <= Instant::now()) {
                        Box::pin(self.fill_gap()).await?;
                        continue;
                    }
                    let frame = ServerFrame::Error {
                        code: "ack_timeout".into(),
                        message: format!(
                            "seq {} was not acked within {} ms; reconnect and resume",
                            self.unacked.front().map(|(e, _)| e.seq).unwrap_or_default(),
                            self.cfg.ack_timeout.as_millis()
                        ),
                    };
                    let _ = Box::pin(self.send_frame(&frame)).await;
                    return Err(CloseReason::AckTimeout);
                }
            }
        }
    }

    /// What the socket gave; returns true when the client closed the connection.
    async fn on_frame(&mut self, frame: Option<Result<Message, E>>) -> Result<bool, CloseReason> {
        match frame {
            None => Ok(true),
            Some(Err(e)) => Err(read_error_reason(&e)),
            Some(Ok(msg)) => {
                self.last_heard = Instant::now();
                self.on_client_message(msg).await
            }
        }
    }

    /// Returns true when the client closed the connection.
    async fn on_client_message(&mut self, msg: Message) -> Result<bool, CloseReason> {
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => return Ok(true),
            Message::Ping(_) | Message::Pong(_) => return Ok(false),
            Message::Binary(_) => {
                self.send_error(
                    "bad_frame",
                    "binary frames are not supported; send JSON text",
                )
                .await?;
                return Ok(false);
            }
        };
        let frame: ClientFrame = match serde_json::from_str(text.as_str()) {
            Ok(f) => f,
            Err(e) => {
                self.send_error("bad_frame", &format!("cannot parse frame: {e}"))
                    .await?;
                return Ok(false);
            }
        };
        match frame {
            ClientFrame::Ping => self.send_frame(&ServerFrame::Pong).await?,
            ClientFrame::Ack { seq } => self.on_ack(seq).await?,
            ClientFrame::Subscribe { topic } => {
                if let Err(m) = crate::api::validate_id(&topic) {
                    self.send_error("invalid_topic", &format!("topic {m}"))
                        .await?;
                } else if !self.topics.allows(&topic) {
                    let message = self.topics.refusal(&topic);
                    self.send_error("forbidden_topic", &message).await?;
                } else if let Some(n) = self.topics_full(&topic).await? {
                    let message = format!(
                        "this device is subscribed to {n} topics, the maximum (limits.max_topics_per_device); unsubscribe one first"
                    );
                    self.send_error("too_many_topics", &message).await?;
                } else {
                    self.router
                        .store
                        .subscribe(&self.device_id, &topic)
                        .await
                        .map_err(|e| self.store_error("subscribe", e))?;
                    self.send_frame(&ServerFrame::Subscribed { topic }).await?;
                }
            }
            ClientFrame::Unsubscribe { topic } => {
                if let Err(m) = crate::api::validate_id(&topic) {
                    self.send_error("invalid_topic", &format!("topic {m}"))
                        .await?;
                    return Ok(false);
                }
                self.router
                    .store
                    .unsubscribe(&self.device_id, &topic)
                    .await
                    .map_err(|e| self.store_error("unsubscribe", e))?;
                self.send_frame(&ServerFrame::Unsubscribed { topic })
                    .await?;
            }
        }
        Ok(false)
    }

    /// How many topics the device has, when `topic` would be one too many.
    async fn topics_full(&mut self, topic: &str) -> Result<Option<usize>, CloseReason> {
        let topics = self
            .router
            .store
            .device_topics(&self.device_id)
            .await
            .map_err(|_| CloseReason::StoreError)?;
        let full = topics.len() >= self.cfg.max_topics && !topics.iter().any(|t| t == topic);
        Ok(full.then_some(topics.len()))
    }

    async fn on_ack(&mut self, seq: i64) -> SessionResult {
        if seq > self.last_sent {
            // Acking what was never sent would skip messages: refuse, keep the session.
            return self
                .send_error(
                    "bad_ack",
                    &format!("ack {seq} is beyond the last sent seq {}", self.last_sent),
                )
                .await;
        }
        let seq = self.fold_buffered_acks(seq);
        let mut n = 0;
        while self.unacked.front().is_some_and(|(e, _)| e.seq <= seq) {
            self.unacked.pop_front();
            n += 1;
        }
        self.router.metrics.acked.inc_by(n);
        // Every entry this ack covers was written by this session (its acks cannot go
        // past `last_sent`, and it started after the cursor it was given), so the ack
        // also records them as sent and the sent marks of them are dropped.
        let acked = self
            .router
            .store
            .ack(&self.device_id, seq, now_ms(), true)
            .await
            .map_err(|e| self.store_error("ack", e))?;
        self.progress.acked(acked);
        Ok(())
    }

    /// An ack is cumulative, so the client's later acks that are already buffered go
    /// into this one store write instead of one write each: under load a client acks
    /// faster than one write commits, and the writes were a third of the SQLite
    /// writer's work (BENCHMARKS.md, v5). Only what is buffered now is taken; the
    /// first frame that is not a valid ack is held for the loop.
    fn fold_buffered_acks(&mut self, mut seq: i64) -> i64 {
        for _ in 0..MAX_FOLDED_ACKS {
            let Some(frame) = self.socket.next().now_or_never() else {
                break;
            };
            let next = match &frame {
                Some(Ok(Message::Text(t))) => match serde_json::from_str(t.as_str()) {
                    Ok(ClientFrame::Ack { seq }) if seq <= self.last_sent => Some(seq),
                    _ => None,
                },
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => Some(seq),
                _ => None,
            };
            self.last_heard = Instant::now();
            match next {
                Some(s) => seq = seq.max(s),
                None => {
                    self.held = Some(Box::new(frame));
                    break;
                }
            }
        }
        seq
    }

    async fn on_deliver(
        &mut self,
        entry: InboxEntry,
        committed_at: std::time::Instant,
    ) -> SessionResult {
        if entry.seq <= self.last_sent {
            return Ok(()); // already sent by replay or gap fill
        }
        if entry.seq > self.last_sent + 1 {
            // An earlier seq is committed but its entry is still on its way: wait for it.
            self.early.insert(entry.seq, (entry, committed_at));
            if self.early.len() > MAX_EARLY {
                return self.fill_gap().await;
            }
            self.gap_deadline
                .get_or_insert_with(|| Instant::now() + GAP_WAIT);
            return Ok(());
        }
        self.send_live(entry, committed_at).await?;
        self.drain_early().await
    }

    async fn send_live(
        &mut self,
        entry: InboxEntry,
        committed_at: std::time::Instant,
    ) -> SessionResult {
        self.router
            .metrics
            .publish_to_deliver
            .observe(committed_at.elapsed().as_secs_f64());
        self.router.metrics.delivered_live.inc();
        self.send_entry(entry).await
    }

    /// Sends the early entries that now follow `last_sent`, forgets those already sent.
    async fn drain_early(&mut self) -> SessionResult {
        while let Some(first) = self.early.first_entry() {
            let seq = *first.key();
            if seq > self.last_sent + 1 {
                break;
            }
            let (entry, committed_at) = first.remove();
            if seq == self.last_sent + 1 {
                self.send_live(entry, committed_at).await?;
            }
        }
        if self.early.is_empty() {
            self.gap_deadline = None;
        }
        Ok(())
    }

    /// The gap before the early entries did not fill in time (the entry was lost to a
    /// full queue, or offered by a node that died): read everything up to the last
    /// early entry from the store, which has it all committed.
    async fn fill_gap(&mut self) -> SessionResult {
        self.gap_deadline = None;
        let Some(&upto) = self.early.keys().next_back() else {
            return Ok(());
        };
        self.fill_from_store(upto, self.cfg.replay_batch).await?;
        // Sent from the store now, or expired in the meantime (the store no longer
        // returns it, as a replay would not): either way settled.
        self.early.clear();
        Ok(())
    }

    /// Sends the stored entries after `last_sent` up to `upto` (inclusive),
    /// `first_page` entries in the first read and `delivery.replay_batch` in each one
    /// after it.
    async fn fill_from_store(&mut self, upto: i64, first_page: u32) -> SessionResult {
        let mut limit = first_page;
        loop {
            let page = self
                .router
                .store
                .fetch_after(&self.device_id, self.last_sent, limit, now_ms())
                .await
                .map_err(|e| self.store_error("fetch_after", e))?;
            let full = page.len() == limit as usize;
            limit = self.cfg.replay_batch;
            let mut sent_any = false;
            for entry in page {
                if entry.seq > upto {
                    return Ok(());
                }
                self.router.metrics.replayed.inc();
                self.send_entry(entry).await?;
                sent_any = true;
            }
            if !full || !sent_any {
                return Ok(());
            }
        }
    }

    async fn send_entry(&mut self, entry: InboxEntry) -> SessionResult {
        self.send(Message::Text(Utf8Bytes::from(entry.msg_frame())))
            .await?;
        tracing::debug!(
            device_id = %self.device_id,
            seq = entry.seq,
            message_id = %entry.message.id,
            request_id = crate::request_id::field(&entry.message.id),
            "delivered"
        );
        self.router.sent.record(
            &self.device_id,
            self.last_sent + 1,
            entry.seq,
            Some(self.progress.clone()),
        );
        self.last_sent = entry.seq;
        self.progress.wrote(entry.seq);
        self.unacked.push_back((entry, Instant::now()));
        Ok(())
    }

    async fn send_error(&mut self, code: &str, message: &str) -> SessionResult {
        self.send_frame(&ServerFrame::Error {
            code: code.into(),
            message: message.into(),
        })
        .await
    }

    async fn send_frame(&mut self, frame: &ServerFrame) -> SessionResult {
        let text = serde_json::to_string(frame).expect("frames serialize");
        self.send(Message::Text(Utf8Bytes::from(text))).await
    }

    /// Writes with a deadline: with the peer's receive window at zero a write never
    /// completes, and nothing else (acks, heartbeats, shutdown) would run meanwhile.
    async fn send(&mut self, msg: Message) -> SessionResult {
        match tokio::time::timeout(self.cfg.write_timeout, self.socket.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(CloseReason::SocketError),
            Err(_) => Err(CloseReason::WriteTimeout),
        }
    }

    /// A store error ends the session (1011); it is logged, since the client only sees
    /// "internal error".
    fn store_error(&self, op: &str, e: StoreError) -> CloseReason {
        tracing::error!(device = %self.device_id, op, error = %e, "store error in a session; closing it (1011)");
        CloseReason::StoreError
    }

    async fn finish(&mut self, reason: CloseReason) {
        let (code, text) = match reason {
            CloseReason::Shutdown => (1001, "server shutting down"),
            CloseReason::SlowConsumer => (1008, "slow consumer: reconnect and resume"),
            CloseReason::WriteTimeout => (1008, "not reading: reconnect and resume"),
            CloseReason::AckTimeout => (1008, "ack timeout"),
            CloseReason::HeartbeatTimeout => (1001, "heartbeat timeout"),
            CloseReason::Replaced => (1000, "replaced by a newer session"),
            CloseReason::Deleted => (1008, "device deleted"),
            CloseReason::TooLarge => (1009, "frame too large"),
            CloseReason::Revoked => (1008, "revoked"),
            CloseReason::ProtocolError => (1002, "protocol error"),
            CloseReason::StoreError => (1011, "internal error"),
            _ => (1000, "bye"),
        };
        // Bounded: a peer that stopped reading (slow consumer, write timeout) cannot
        // take the close frame, and must not keep the device "online" meanwhile.
        let grace = self.cfg.write_timeout.min(Duration::from_secs(1));
        match reason {
            // Flushes the echo of the client's Close, which tungstenite queued on read.
            CloseReason::ClientClosed => {
                let _ = tokio::time::timeout(grace, self.socket.close()).await;
            }
            CloseReason::SocketError => {}
            _ => {
                let close = Message::Close(Some(CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(text),
                }));
                let _ = tokio::time::timeout(grace, self.socket.send(close)).await;
            }
        }
        // No push is requested here: every fallback entry has carried its due time
        // since its commit (`store::push_due_at`), and whoever finds it due pushes it,
        // even while a session task is stuck writing to a socket that stopped draining.
    }
}

/// What a read error means for the close code: the peer sent too much (1009), broke
/// the protocol (1002), or the connection is gone.
fn read_error_reason<E: std::error::Error + 'static>(e: &E) -> CloseReason {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(ws) = err.downcast_ref::<tungstenite::Error>() {
            return match ws {
                tungstenite::Error::Capacity(_) => CloseReason::TooLarge,
                tungstenite::Error::Protocol(_) | tungstenite::Error::Utf8(_) => {
                    CloseReason::ProtocolError
                }
                _ => CloseReason::SocketError,
            };
        }
        cur = err.source();
    }
    CloseReason::SocketError
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Shared by the HTTP layer: the pieces a session needs.
pub struct SessionDeps {
    pub router: DeliveryRouter,
    pub cfg: SessionConfig,
}

pub type SharedSessionDeps = Arc<SessionDeps>;
