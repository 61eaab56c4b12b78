//! The state machine driven by a fake transport, on tokio's paused clock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use herald_protocol::{ClientFrame, InboxMessage, ServerFrame};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;
use url::Url;

use crate::engine::{Command, Engine, EngineParts, Event, Settings};
use crate::http::Api;
use crate::log::Counters;
use crate::store::Store;
use crate::token::{TokenProvider, Tokens};
use crate::transport::{ConnectError, Connection, Incoming, Transport};
use crate::{ConnectionState, Error, TransportKind, TransportPreference};

/// What the fake does on the next connect attempt.
enum Outcome {
    Fail(ConnectError),
    /// Accept; the test drives the server side through the handle.
    Accept(ServerSide),
    /// Never answer (SYN to a network that is gone).
    Hang,
}

struct ServerSide {
    to_client: UnboundedReceiver<Option<Incoming>>,
    from_client: UnboundedSender<ClientFrame>,
}

/// The test's end of an accepted connection.
struct Peer {
    tx: UnboundedSender<Option<Incoming>>,
    rx: UnboundedReceiver<ClientFrame>,
}

impl Peer {
    fn frame(&self, f: ServerFrame) {
        let _ = self.tx.send(Some(Incoming::Frame(f)));
    }
    fn welcome(&self, heartbeat_s: u64, last_seq: i64) {
        self.frame(ServerFrame::Welcome {
            session_id: "s".into(),
            heartbeat_s,
            ack_timeout_s: 10,
            last_seq,
        });
    }
    fn msg(&self, seq: i64) {
        self.frame(ServerFrame::Msg(msg(seq)));
    }
    fn sent(&mut self) -> Vec<ClientFrame> {
        let mut v = vec![];
        while let Ok(f) = self.rx.try_recv() {
            v.push(f);
        }
        v
    }
}

fn msg(seq: i64) -> InboxMessage {
    InboxMessage {
        seq,
        id: format!("m{seq}"),
        data: serde_json::json!({"n": seq}),
        notification: None,
        sent_at: "t".into(),
    }
}

fn accept() -> (Outcome, Peer) {
    let (tx, to_client) = unbounded_channel();
    let (from_client, rx) = unbounded_channel();
    (
        Outcome::Accept(ServerSide {
            to_client,
            from_client,
        }),
        Peer { tx, rx },
    )
}

#[derive(Default)]
struct Fake {
    script: Mutex<VecDeque<Outcome>>,
    /// (when, after, token) of every attempt.
    attempts: Mutex<Vec<(Instant, i64, String)>>,
    /// The transport of every attempt.
    kinds: Mutex<Vec<TransportKind>>,
    /// What `http_reachable` answers.
    http_works: AtomicBool,
}

impl Fake {
    fn push(&self, o: Outcome) {
        self.script.lock().unwrap().push_back(o);
    }
    fn attempts(&self) -> Vec<(Instant, i64, String)> {
        self.attempts.lock().unwrap().clone()
    }
    fn kinds(&self) -> Vec<TransportKind> {
        self.kinds.lock().unwrap().clone()
    }
}

struct FakeConn(ServerSide, TransportKind);

impl Connection for FakeConn {
    fn can_ping(&self) -> bool {
        self.1 == TransportKind::WebSocket
    }
    async fn send(&mut self, frame: &ClientFrame) -> Result<(), String> {
        self.0
            .from_client
            .send(frame.clone())
            .map_err(|_| "closed".to_string())
    }
    async fn recv(&mut self) -> Option<Result<Incoming, String>> {
        self.0.to_client.recv().await.flatten().map(Ok)
    }
    async fn close(&mut self) {}
}

impl Transport for Fake {
    type Conn = FakeConn;
    async fn connect(
        &self,
        kind: TransportKind,
        _: &Url,
        _: &str,
        after: i64,
        token: &str,
    ) -> Result<FakeConn, ConnectError> {
        self.attempts
            .lock()
            .unwrap()
            .push((Instant::now(), after, token.to_string()));
        self.kinds.lock().unwrap().push(kind);
        let next = self.script.lock().unwrap().pop_front();
        match next {
            Some(Outcome::Accept(s)) => Ok(FakeConn(s, kind)),
            Some(Outcome::Fail(e)) => Err(e),
            Some(Outcome::Hang) => std::future::pending().await,
            None => Err(ConnectError::Network("refused".into())),
        }
    }
    async fn http_reachable(&self, _: &Url) -> bool {
        self.http_works.load(Ordering::SeqCst)
    }
}

struct Harness {
    fake: Arc<Fake>,
    cmd: UnboundedSender<Command>,
    events: mpsc::Receiver<Event>,
    seen: Vec<Event>,
    token_calls: Arc<AtomicU32>,
    counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

fn settings() -> Settings {
    Settings {
        base: Url::parse("http://127.0.0.1:9").unwrap(),
        device_id: "d1".into(),
        suspend_in_background: true,
        backoff_min: Duration::from_millis(500),
        backoff_max: Duration::from_secs(30),
        healthy_session: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(10),
        heartbeat: None,
        foreground_ping: None,
        pong_timeout: Duration::from_secs(5),
        max_token_failures: 3,
        sync_max_pages: 2,
        transport: TransportPreference::Auto,
        websocket_retry: Duration::from_secs(300),
    }
}

fn start_with(provider: Arc<dyn TokenProvider>, store: Store) -> Harness {
    start_full(provider, store, settings())
}

fn start_full(provider: Arc<dyn TokenProvider>, store: Store, settings: Settings) -> Harness {
    let fake = Arc::new(Fake::default());
    let s = Arc::new(settings);
    let tokens = Arc::new(Tokens::new(provider, &s.device_id));
    let api = Arc::new(
        Api::new(
            s.base.clone(),
            s.device_id.clone(),
            tokens.clone(),
            Duration::from_secs(1),
            None,
        )
        .unwrap(),
    );
    let (cmd_tx, cmd_rx) = unbounded_channel();
    let (ev_tx, events) = mpsc::channel();
    let counters = Arc::new(Counters::default());
    let engine = Engine::new(EngineParts {
        settings: s,
        transport: fake.clone(),
        tokens,
        api,
        store: Arc::new(Mutex::new(store)),
        events: ev_tx,
        cmd_rx,
        cmd_tx: cmd_tx.downgrade(),
        shared_state: Arc::new(Mutex::new(ConnectionState::Disconnected)),
        counters: counters.clone(),
        rng: StdRng::seed_from_u64(42),
    });
    let task = tokio::spawn(engine.run());
    Harness {
        fake,
        cmd: cmd_tx,
        events,
        seen: vec![],
        token_calls: Arc::new(AtomicU32::new(0)),
        counters,
        task,
    }
}

fn start() -> Harness {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let provider = move |device: &str| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        Ok::<_, String>(format!("token-{device}-{n}"))
    };
    let mut h = start_with(Arc::new(provider), Store::open_in_memory("t").unwrap());
    h.token_calls = calls;
    h
}

impl Harness {
    fn send(&self, c: Command) {
        self.cmd.send(c).unwrap();
    }
    /// Lets the engine run for `d` of (paused) time and collects its events.
    async fn run_for(&mut self, d: Duration) {
        tokio::time::sleep(d).await;
        self.collect();
    }
    async fn wait_attempts(&mut self, n: usize) {
        for _ in 0..100_000 {
            if self.fake.attempts().len() >= n {
                self.collect();
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("no attempt {n}");
    }
    fn collect(&mut self) {
        while let Ok(e) = self.events.try_recv() {
            self.seen.push(e);
        }
    }
    fn states(&self) -> Vec<ConnectionState> {
        self.seen
            .iter()
            .filter_map(|e| match e {
                Event::State(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }
    fn last_state(&self) -> Option<ConnectionState> {
        self.states().last().cloned()
    }
    fn messages(&self) -> Vec<i64> {
        self.seen
            .iter()
            .filter_map(|e| match e {
                Event::Message(m, _) => Some(m.seq),
                _ => None,
            })
            .collect()
    }
    fn errors(&self) -> Vec<(Error, bool)> {
        self.seen
            .iter()
            .filter_map(|e| match e {
                Event::Error { error, terminal } => Some((error.clone(), *terminal)),
                _ => None,
            })
            .collect()
    }
    async fn close(mut self) {
        self.send(Command::Close);
        tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .expect("engine stops")
            .unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn reconnect_delays_follow_full_jitter_backoff() {
    let mut h = start();
    h.send(Command::Connect);
    h.run_for(Duration::from_secs(120)).await;
    let attempts = h.fake.attempts();
    assert!(attempts.len() >= 8, "{} attempts", attempts.len());
    let waits: Vec<u64> = h
        .states()
        .iter()
        .filter_map(|s| match s {
            ConnectionState::WaitingToReconnect { delay_ms } => Some(*delay_ms),
            _ => None,
        })
        .collect();
    let mut ceiling = 500u64;
    for (i, pair) in attempts.windows(2).enumerate() {
        let gap = (pair[1].0 - pair[0].0).as_millis() as u64;
        assert!(gap <= ceiling, "attempt {i}: gap {gap} > ceiling {ceiling}");
        // The reported delay is the one actually waited (paused clock: exact).
        assert_eq!(gap, waits[i], "attempt {i}");
        ceiling = (ceiling * 2).min(30_000);
    }
    // Not everything at the minimum: the ceilings grow.
    assert!(waits.iter().skip(4).any(|w| *w > 500), "{waits:?}");
    assert!(waits.iter().all(|w| *w <= 30_000));
    // Connecting / WaitingToReconnect alternate.
    let states = h.states();
    assert_eq!(states[0], ConnectionState::Connecting);
    assert!(matches!(
        states[1],
        ConnectionState::WaitingToReconnect { .. }
    ));
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn healthy_session_resets_backoff_and_reconnect_frame_is_honoured() {
    let mut h = start();
    // Failures grow the backoff...
    for _ in 0..6 {
        h.fake
            .push(Outcome::Fail(ConnectError::Network("down".into())));
    }
    let (o, peer) = accept();
    h.fake.push(o);
    let (o2, peer2) = accept();
    h.fake.push(o2);
    h.send(Command::Connect);
    h.wait_attempts(7).await;
    peer.welcome(30, 0);
    h.run_for(Duration::from_secs(20)).await;
    assert_eq!(
        h.last_state(),
        Some(ConnectionState::Connected {
            transport: TransportKind::WebSocket
        })
    );
    // The server drains: reconnect after at least 3 s, at most 3 s + backoff_min.
    let drained_at = Instant::now();
    peer.frame(ServerFrame::Reconnect { after_ms: 3000 });
    h.run_for(Duration::from_secs(4)).await;
    let attempts = h.fake.attempts();
    assert_eq!(attempts.len(), 8);
    let waited = attempts[7].0 - drained_at;
    assert!(
        waited >= Duration::from_millis(3000) && waited <= Duration::from_millis(3500),
        "{waited:?}"
    );
    // Healthy session then a drop: the next delay starts from the minimum again.
    peer2.welcome(30, 0);
    h.run_for(Duration::from_secs(15)).await;
    drop(peer2);
    h.run_for(Duration::from_millis(10)).await;
    match h.last_state() {
        Some(ConnectionState::WaitingToReconnect { delay_ms }) => {
            assert!(delay_ms <= 500, "{delay_ms}")
        }
        other => panic!("{other:?}"),
    }
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn dead_connection_is_detected_after_two_heartbeats() {
    let mut h = start();
    let (o, mut peer) = accept();
    h.fake.push(o);
    h.send(Command::Connect);
    h.run_for(Duration::from_millis(1)).await;
    peer.welcome(5, 0);
    h.run_for(Duration::from_millis(1)).await;
    let welcomed = Instant::now();
    // Pings every heartbeat while silent...
    h.run_for(Duration::from_millis(10_500)).await;
    let pings = peer
        .sent()
        .into_iter()
        .filter(|f| *f == ClientFrame::Ping)
        .count();
    assert_eq!(pings, 2);
    assert_eq!(h.fake.attempts().len(), 1, "still trusting the connection");
    // ...and gives up after 2 heartbeats + grace (12 s) of silence.
    h.run_for(Duration::from_secs(3)).await;
    let attempts = h.fake.attempts();
    assert!(attempts.len() >= 2);
    let gap = attempts[1].0 - welcomed;
    assert!(
        gap >= Duration::from_secs(12) && gap <= Duration::from_millis(12_600),
        "{gap:?}"
    );
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn offline_is_quiet_and_network_back_reconnects_at_once() {
    let mut h = start();
    h.send(Command::Connect);
    h.run_for(Duration::from_secs(5)).await;
    let before = h.fake.attempts().len();
    h.send(Command::Network(false));
    h.run_for(Duration::from_secs(600)).await;
    assert_eq!(h.last_state(), Some(ConnectionState::Suspended));
    assert_eq!(h.fake.attempts().len(), before, "no attempts while offline");
    let (o, _peer) = accept();
    h.fake.push(o);
    let back = Instant::now();
    h.send(Command::Network(true));
    h.run_for(Duration::from_millis(1)).await;
    let attempts = h.fake.attempts();
    assert_eq!(attempts.len(), before + 1);
    assert!(attempts[before].0 - back < Duration::from_millis(2));
    // Background suspends, foreground reconnects at once.
    h.send(Command::Background);
    h.run_for(Duration::from_secs(60)).await;
    assert_eq!(h.last_state(), Some(ConnectionState::Suspended));
    let n = h.fake.attempts().len();
    h.send(Command::Foreground);
    h.run_for(Duration::from_millis(1)).await;
    assert_eq!(h.fake.attempts().len(), n + 1);
    h.close().await;
}

fn rejected(status: u16, error: Error) -> Outcome {
    Outcome::Fail(ConnectError::Rejected { status, error })
}

#[tokio::test(start_paused = true)]
async fn forbidden_is_terminal() {
    let mut h = start();
    h.fake.push(rejected(
        403,
        Error::Forbidden("owned by another user".into()),
    ));
    h.send(Command::Connect);
    h.run_for(Duration::from_secs(300)).await;
    assert_eq!(h.fake.attempts().len(), 1);
    assert_eq!(h.last_state(), Some(ConnectionState::Disconnected));
    let errors = h.errors();
    assert_eq!(errors.len(), 1);
    assert!(matches!(errors[0], (Error::Forbidden(_), true)));
    // Listeners see the client stopped before they hear why.
    let disconnected = h
        .seen
        .iter()
        .rposition(|e| matches!(e, Event::State(ConnectionState::Disconnected)))
        .expect("a Disconnected state");
    let error = h
        .seen
        .iter()
        .position(|e| matches!(e, Event::Error { terminal: true, .. }))
        .expect("the terminal error");
    assert!(disconnected < error, "state after the error: {:?}", h.seen);
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn unauthorized_refetches_once_then_gives_up() {
    let mut h = start();
    h.fake
        .push(rejected(401, Error::Unauthorized("expired".into())));
    h.fake
        .push(rejected(401, Error::Unauthorized("bad".into())));
    h.send(Command::Connect);
    h.run_for(Duration::from_secs(300)).await;
    let attempts = h.fake.attempts();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].2, "token-d1-0", "the token of the device id");
    assert_eq!(attempts[1].2, "token-d1-1", "a fresh token after the 401");
    assert_eq!(attempts[1].0, attempts[0].0, "retried at once");
    assert_eq!(h.token_calls.load(Ordering::SeqCst), 2);
    assert!(matches!(h.errors()[..], [(Error::Unauthorized(_), true)]));
    assert_eq!(h.last_state(), Some(ConnectionState::Disconnected));
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn failing_token_provider_is_terminal_after_three_tries() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let provider = move |_: &str| {
        c.fetch_add(1, Ordering::SeqCst);
        Err::<String, _>("backend down".to_string())
    };
    let mut h = start_with(Arc::new(provider), Store::open_in_memory("t").unwrap());
    h.send(Command::Connect);
    h.run_for(Duration::from_secs(300)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(h.fake.attempts().is_empty());
    let errors = h.errors();
    assert_eq!(errors.len(), 3);
    assert!(!errors[0].1 && !errors[1].1 && errors[2].1);
    assert_eq!(h.last_state(), Some(ConnectionState::Disconnected));
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn messages_once_in_order_acked_after_the_listener() {
    let mut h = start();
    let (o, mut peer) = accept();
    h.fake.push(o);
    h.send(Command::Subscribe("news".into()));
    h.send(Command::Connect);
    h.run_for(Duration::from_millis(1)).await;
    peer.welcome(30, 3);
    for seq in [1, 2, 2, 1, 3] {
        peer.msg(seq);
    }
    h.run_for(Duration::from_millis(10)).await;
    assert_eq!(h.messages(), [1, 2, 3]);
    assert_eq!(
        peer.sent(),
        [ClientFrame::Subscribe {
            topic: "news".into()
        }]
    );
    // Nothing acked until the listener returns; then cumulatively.
    h.send(Command::Handled { seq: 1 });
    h.send(Command::Handled { seq: 2 });
    h.run_for(Duration::from_millis(10)).await;
    let acks: Vec<_> = peer.sent();
    assert_eq!(acks.last(), Some(&ClientFrame::Ack { seq: 2 }));
    // Drop: reconnects after the highest seq handed over, re-subscribes.
    let (o, mut peer2) = accept();
    h.fake.push(o);
    drop(peer);
    h.run_for(Duration::from_secs(1)).await;
    let attempts = h.fake.attempts();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[1].1, 2, "after the last handled seq");
    peer2.welcome(30, 4);
    peer2.msg(3);
    peer2.msg(4);
    h.send(Command::Handled { seq: 3 });
    h.run_for(Duration::from_millis(10)).await;
    assert_eq!(h.messages(), [1, 2, 3, 4]);
    let sent = peer2.sent();
    assert!(sent.contains(&ClientFrame::Subscribe {
        topic: "news".into()
    }));
    assert_eq!(sent.last(), Some(&ClientFrame::Ack { seq: 3 }));
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn handled_cursor_survives_restart() {
    let dir = std::env::temp_dir().join(format!("herald-engine-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    {
        let mut h = start_with(
            Arc::new(|_: &str| Ok::<_, String>("t".into())),
            Store::open(&dir, "s").unwrap(),
        );
        let (o, peer) = accept();
        h.fake.push(o);
        h.send(Command::Connect);
        h.run_for(Duration::from_millis(1)).await;
        peer.welcome(30, 2);
        peer.msg(1);
        peer.msg(2);
        h.run_for(Duration::from_millis(1)).await;
        // The app finished only seq 1 before it died.
        h.send(Command::Handled { seq: 1 });
        h.run_for(Duration::from_millis(1)).await;
        h.close().await;
    }
    let mut h = start_with(
        Arc::new(|_: &str| Ok::<_, String>("t".into())),
        Store::open(&dir, "s").unwrap(),
    );
    let (o, peer) = accept();
    h.fake.push(o);
    h.send(Command::Connect);
    h.run_for(Duration::from_millis(1)).await;
    assert_eq!(
        h.fake.attempts()[0].1,
        1,
        "resumes after the last handled seq"
    );
    peer.welcome(30, 2);
    peer.msg(2);
    h.run_for(Duration::from_millis(1)).await;
    assert_eq!(h.messages(), [2]);
    h.close().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(start_paused = true)]
async fn network_change_during_a_connect_attempt_retries_at_once() {
    let mut h = start();
    // The attempt on the old network hangs (10 s connect timeout).
    h.fake.push(Outcome::Hang);
    let (o, _peer) = accept();
    h.fake.push(o);
    h.send(Command::Connect);
    h.wait_attempts(1).await;
    h.run_for(Duration::from_secs(1)).await;
    assert_eq!(h.last_state(), Some(ConnectionState::Connecting));
    let switched = Instant::now();
    h.send(Command::Network(true));
    h.run_for(Duration::from_millis(1)).await;
    let attempts = h.fake.attempts();
    assert_eq!(attempts.len(), 2, "a new attempt at once");
    assert!(attempts[1].0 - switched < Duration::from_millis(2));
    h.close().await;
}

fn fg_settings() -> Settings {
    Settings {
        foreground_ping: Some(Duration::from_secs(10)),
        pong_timeout: Duration::from_secs(5),
        suspend_in_background: false,
        ..settings()
    }
}

fn start_fg() -> Harness {
    start_full(
        Arc::new(|_: &str| Ok::<_, String>("t".into())),
        Store::open_in_memory("t").unwrap(),
        fg_settings(),
    )
}

/// Silence from `welcome` (heartbeat 25 s, as the gateway's default) until the
/// client gives up on the connection.
async fn time_to_notice_a_dead_network(h: &mut Harness) -> Duration {
    let (o, peer) = accept();
    h.fake.push(o);
    h.send(Command::Connect);
    h.run_for(Duration::from_millis(1)).await;
    peer.welcome(25, 0);
    h.run_for(Duration::from_millis(1)).await;
    let silent_from = Instant::now();
    for _ in 0..120 {
        h.run_for(Duration::from_millis(500)).await;
        if h.fake.attempts().len() >= 2 {
            break;
        }
    }
    let attempts = h.fake.attempts();
    assert!(attempts.len() >= 2, "never noticed");
    drop(peer);
    attempts[1].0 - silent_from
}

#[tokio::test(start_paused = true)]
async fn foreground_ping_notices_a_dead_network_in_15_s_background_in_52() {
    let mut h = start_fg();
    let fg = time_to_notice_a_dead_network(&mut h).await;
    // Ping at 10 s, no answer by 15 s.
    assert!(
        fg >= Duration::from_secs(15) && fg <= Duration::from_millis(15_600),
        "{fg:?}"
    );
    h.close().await;
    // In the background only heartbeats: 2 × 25 s + 2 s.
    let mut h = start_fg();
    h.send(Command::Background);
    let bg = time_to_notice_a_dead_network(&mut h).await;
    assert!(
        bg >= Duration::from_secs(52) && bg <= Duration::from_millis(52_600),
        "{bg:?}"
    );
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn foreground_ping_answered_keeps_the_connection_and_measures_rtt() {
    let mut h = start_fg();
    let (o, mut peer) = accept();
    h.fake.push(o);
    h.send(Command::Connect);
    h.run_for(Duration::from_millis(1)).await;
    peer.welcome(25, 0);
    for _ in 0..6000 {
        // Answer each ping 40 ms later, as a healthy gateway does.
        h.run_for(Duration::from_millis(10)).await;
        if peer.sent().contains(&ClientFrame::Ping) {
            h.run_for(Duration::from_millis(40)).await;
            peer.frame(ServerFrame::Pong);
        }
    }
    h.run_for(Duration::from_millis(1)).await;
    assert_eq!(h.fake.attempts().len(), 1, "a live connection was dropped");
    assert_eq!(
        h.last_state(),
        Some(ConnectionState::Connected {
            transport: TransportKind::WebSocket
        })
    );
    let stats = h.counters.snapshot();
    assert!((40..=50).contains(&stats.last_rtt_ms.unwrap()), "{stats:?}");
    assert_eq!((stats.connections, stats.reconnects), (1, 0));
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn topics_are_saved_re_sent_and_refusals_reported() {
    let dir = std::env::temp_dir().join(format!("herald-topics-{}", uuid::Uuid::new_v4()));
    let token = || Arc::new(|_: &str| Ok::<_, String>("t".into()));
    {
        // Offline: subscribe two, unsubscribe one confirmed earlier; then the app dies.
        let h = start_with(token(), Store::open(&dir, "s").unwrap());
        h.send(Command::Subscribe("news".into()));
        h.send(Command::Subscribe("secret".into()));
        h.send(Command::Unsubscribe("old".into()));
        h.close().await;
    }
    let mut h = start_with(token(), Store::open(&dir, "s").unwrap());
    let (o, mut peer) = accept();
    h.fake.push(o);
    h.send(Command::Connect);
    h.run_for(Duration::from_millis(1)).await;
    peer.welcome(30, 0);
    h.run_for(Duration::from_millis(1)).await;
    let topic = |t: &str| t.to_string();
    assert_eq!(
        peer.sent(),
        [
            ClientFrame::Subscribe {
                topic: topic("news")
            },
            ClientFrame::Subscribe {
                topic: topic("secret")
            },
            ClientFrame::Unsubscribe {
                topic: topic("old")
            },
        ]
    );
    peer.frame(ServerFrame::Subscribed {
        topic: topic("news"),
    });
    peer.frame(ServerFrame::Error {
        code: "forbidden_topic".into(),
        message: "not allowed to subscribe to secret".into(),
    });
    peer.frame(ServerFrame::Unsubscribed {
        topic: topic("old"),
    });
    h.run_for(Duration::from_millis(1)).await;
    let answers: Vec<_> = h
        .seen
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::Subscription { .. } | Event::SubscriptionFailed { .. }
            )
        })
        .cloned()
        .collect();
    assert_eq!(
        answers,
        [
            Event::Subscription {
                topic: topic("news"),
                subscribed: true
            },
            Event::SubscriptionFailed {
                topic: topic("secret"),
                subscribe: true,
                code: "forbidden_topic".into(),
                message: "not allowed to subscribe to secret".into(),
            },
            Event::Subscription {
                topic: topic("old"),
                subscribed: false
            },
        ]
    );
    assert!(
        h.errors().is_empty(),
        "a topic refusal is not a connection error"
    );
    h.close().await;
    // Next start: only the granted topic is asked for again.
    let mut h = start_with(token(), Store::open(&dir, "s").unwrap());
    let (o, mut peer) = accept();
    h.fake.push(o);
    h.send(Command::Connect);
    h.run_for(Duration::from_millis(1)).await;
    peer.welcome(30, 0);
    h.run_for(Duration::from_millis(1)).await;
    assert_eq!(
        peer.sent(),
        [ClientFrame::Subscribe {
            topic: topic("news")
        }]
    );
    h.close().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

fn not_here() -> Outcome {
    Outcome::Fail(ConnectError::NotHere("proxy said 403".into()))
}

use TransportKind::{LongPoll, Sse, WebSocket};

#[tokio::test(start_paused = true)]
async fn refused_upgrades_fall_back_to_sse_then_poll_and_websocket_is_retried() {
    let mut h = start();
    // A proxy refuses the upgrade, then the event stream: long-poll, at once.
    h.fake.push(not_here());
    h.fake.push(not_here());
    let (o, mut poll) = accept();
    h.fake.push(o);
    h.send(Command::Connect);
    h.run_for(Duration::from_millis(1)).await;
    assert_eq!(h.fake.kinds(), [WebSocket, Sse, LongPoll]);
    let attempts = h.fake.attempts();
    assert_eq!(
        attempts[2].0, attempts[0].0,
        "no backoff between the transports"
    );
    poll.welcome(25, 2);
    poll.msg(1);
    poll.msg(2);
    h.run_for(Duration::from_millis(10)).await;
    assert_eq!(
        h.last_state(),
        Some(ConnectionState::Connected {
            transport: LongPoll
        })
    );
    assert_eq!(h.messages(), [1, 2]);
    h.send(Command::Handled { seq: 1 });
    h.send(Command::Handled { seq: 2 });
    h.run_for(Duration::from_millis(10)).await;
    assert_eq!(poll.sent().last(), Some(&ClientFrame::Ack { seq: 2 }));
    // Kept alive by held polls answering; nothing happens until the WebSocket retry
    // (5 min after the fallback): then WebSocket once, and straight back to long-poll.
    h.fake.push(not_here());
    let (o, poll2) = accept();
    h.fake.push(o);
    for _ in 0..14 {
        let _ = poll.tx.send(Some(Incoming::Activity));
        h.run_for(Duration::from_secs(20)).await;
    }
    assert_eq!(
        h.fake.attempts().len(),
        3,
        "no pings over long-poll, no probe"
    );
    let _ = poll.tx.send(Some(Incoming::Activity));
    h.run_for(Duration::from_secs(21)).await;
    assert_eq!(
        h.fake.kinds(),
        [WebSocket, Sse, LongPoll, WebSocket, LongPoll]
    );
    let attempts = h.fake.attempts();
    let retried = attempts[3].0 - attempts[0].0;
    assert!(
        retried >= Duration::from_secs(300) && retried < Duration::from_secs(301),
        "{retried:?}"
    );
    assert_eq!(attempts[4].0, attempts[3].0);
    assert_eq!(attempts[4].1, 2, "resumes after what was handled");
    poll2.welcome(25, 2);
    h.run_for(Duration::from_millis(10)).await;
    // A network change tries WebSocket at once; once it works, it is kept.
    let (o, ws) = accept();
    h.fake.push(o);
    h.send(Command::Network(true));
    h.run_for(Duration::from_millis(10)).await;
    assert_eq!(h.fake.kinds().last(), Some(&WebSocket));
    ws.welcome(30, 2);
    h.run_for(Duration::from_millis(10)).await;
    assert_eq!(
        h.last_state(),
        Some(ConnectionState::Connected {
            transport: WebSocket
        })
    );
    drop(ws);
    h.run_for(Duration::from_secs(5)).await;
    let kinds = h.fake.kinds();
    assert!(kinds.len() > 7);
    assert!(kinds[6..].iter().all(|k| *k == WebSocket), "{kinds:?}");
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn handshake_timeouts_fall_back_only_while_plain_http_works() {
    let mut h = start();
    // A dead network: handshakes time out and HTTP fails too — no fallback.
    for _ in 0..3 {
        h.fake.push(Outcome::Hang);
    }
    h.send(Command::Connect);
    h.wait_attempts(3).await;
    assert_eq!(h.fake.kinds(), [WebSocket, WebSocket, WebSocket]);
    // A middlebox that swallows upgrades: HTTP answers, so the next timeout falls back.
    h.fake.http_works.store(true, Ordering::SeqCst);
    let (o, sse) = accept();
    h.fake.push(o);
    h.wait_attempts(4).await;
    let attempts = h.fake.attempts();
    assert_eq!(
        attempts[3].0 - attempts[2].0,
        Duration::from_secs(10),
        "right after the third timeout"
    );
    assert_eq!(h.fake.kinds()[3], Sse);
    sse.welcome(25, 0);
    h.run_for(Duration::from_millis(10)).await;
    assert_eq!(
        h.last_state(),
        Some(ConnectionState::Connected { transport: Sse })
    );
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn an_event_stream_without_welcome_counts_as_a_handshake_timeout() {
    let mut h = start();
    h.fake.http_works.store(true, Ordering::SeqCst);
    h.fake.push(not_here());
    // A buffering proxy: the stream opens, nothing comes through.
    let (o1, _sse1) = accept();
    let (o2, _sse2) = accept();
    h.fake.push(o1);
    h.fake.push(o2);
    h.send(Command::Connect);
    h.wait_attempts(4).await;
    assert_eq!(h.fake.kinds(), [WebSocket, Sse, Sse, LongPoll]);
    h.close().await;
}

#[tokio::test(start_paused = true)]
async fn gateway_refusals_and_forced_transports_do_not_fall_back() {
    // The gateway's own 403 is final, whatever the transport.
    let mut h = start();
    h.fake
        .push(rejected(403, Error::Forbidden("not yours".into())));
    h.send(Command::Connect);
    h.run_for(Duration::from_secs(60)).await;
    assert_eq!(h.fake.kinds(), [WebSocket]);
    h.close().await;
    // A forced transport that does not get through: reported, retried with backoff.
    let mut s = settings();
    s.transport = TransportPreference::Sse;
    let mut h = start_full(
        Arc::new(|_: &str| Ok::<_, String>("t".into())),
        Store::open_in_memory("t").unwrap(),
        s,
    );
    h.fake.push(not_here());
    h.fake.push(not_here());
    h.send(Command::Connect);
    h.wait_attempts(3).await;
    assert_eq!(h.fake.kinds(), [Sse, Sse, Sse]);
    assert!(h.fake.attempts()[1].0 > h.fake.attempts()[0].0, "backoff");
    assert!(matches!(h.errors()[..], [(Error::Network(_), false), ..]));
    h.close().await;
}
