//! The SDK against the real gateway (`herald_gateway::testing::TestGateway`): drops in
//! the middle of a burst, gateway restart, app restart, push handling, token refresh,
//! terminal errors. Every wait is bounded.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_gateway::testing::{TempDir, TestGateway};
use herald_protocol::{PublishRequest, PushContent, PushPolicy, PushProviderKind, Target};
use herald_sdk::{Config, ConnectionState, Error, HeraldClient, TokenProvider, TransportKind};
use herald_system_tests::{publish_n, test_config, wait_until, Recorder, T};
use serde_json::json;

/// Mints tokens for `user` through the test gateway, bound to the device id the SDK
/// asks for (`did`) and allowed every topic, counting calls.
struct Minter {
    tg_tokens: Arc<dyn Fn(&str) -> String + Send + Sync>,
    calls: AtomicU32,
    devices: Mutex<Vec<String>>,
}

impl TokenProvider for Minter {
    fn fetch_token(&self, device_id: &str) -> Result<String, String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.devices.lock().unwrap().push(device_id.to_string());
        Ok((self.tg_tokens)(device_id))
    }
}

fn minter(tg: &TestGateway, user: &str) -> Arc<Minter> {
    let secret_tokens = tg.state.tokens.clone();
    let user = user.to_string();
    Arc::new(Minter {
        tg_tokens: Arc::new(move |device| {
            let grant = herald_gateway::auth::Grant {
                device_id: Some(device.to_string()),
                topics: Some(vec!["*".to_string()]),
            };
            secret_tokens.mint_grant(&user, &grant, 3600).unwrap().0
        }),
        calls: AtomicU32::new(0),
        devices: Mutex::new(Vec::new()),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_in_the_middle_of_a_burst_lose_and_repeat_nothing() {
    let tg = TestGateway::start().await;
    let dir = TempDir::new("sdk-burst");
    let rec = Arc::new(Recorder::default());
    let client = HeraldClient::new(
        test_config(&tg.base_url, "burst-1", &dir),
        rec.clone(),
        minter(&tg, "alice"),
    )
    .unwrap();
    client.connect();
    wait_until("connected", T, || {
        rec.connected_over() == Some(TransportKind::WebSocket)
    })
    .await;
    for chunk in 0..5 {
        publish_n(&tg, "burst-1", chunk * 40 + 1..=chunk * 40 + 40).await;
        // Cut the live session abruptly, mid-stream.
        tg.kick("burst-1");
    }
    wait_until("200 messages", T, || rec.seqs().len() >= 200).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rec.ns(),
        (1..=200).collect::<Vec<_>>(),
        "every message once, in order"
    );
    let seqs = rec.seqs();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let states = rec.states.lock().unwrap().clone();
    assert!(states
        .iter()
        .any(|s| matches!(s, ConnectionState::WaitingToReconnect { .. })));
    // Everything got acked (cumulatively, after the listener).
    wait_until("acked", T, || {
        futures_lite_block(async {
            tg.state
                .store
                .device("burst-1")
                .await
                .unwrap()
                .unwrap()
                .acked_seq
        }) == 200
    })
    .await;
    client.close();
    assert_eq!(rec.state(), Some(ConnectionState::Closed));
    tg.stop().await;
}

/// Runs a store query from the sync `wait_until` closure.
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_restart_resumes() {
    let mut tg = TestGateway::start().await;
    let dir = TempDir::new("sdk-restart-gw");
    let rec = Arc::new(Recorder::default());
    let client = HeraldClient::new(
        test_config(&tg.base_url, "gw-1", &dir),
        rec.clone(),
        minter(&tg, "alice"),
    )
    .unwrap();
    client.subscribe("news").unwrap();
    client.connect();
    wait_until("connected", T, || {
        rec.connected_over() == Some(TransportKind::WebSocket)
    })
    .await;
    publish_n(&tg, "gw-1", 1..=5).await;
    wait_until("5 messages", T, || rec.seqs().len() == 5).await;
    tg.restart().await;
    publish_n(&tg, "gw-1", 6..=10).await;
    wait_until("10 messages", T, || rec.seqs().len() >= 10).await;
    // Subscriptions restored after the reconnect: a topic message arrives.
    wait_until("re-subscribed", T, || {
        rec.subscriptions
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, s)| t == "news" && *s)
            .count()
            >= 2
    })
    .await;
    let mut req = PublishRequest::new(Target::Topic("news".into()), json!({ "n": 11 }));
    req.push = PushPolicy::Never;
    tg.publish(&req).await;
    wait_until("11 messages", T, || rec.seqs().len() >= 11).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rec.ns(), (1..=11).collect::<Vec<_>>());
    client.close();
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_restart_neither_repeats_nor_loses() {
    let tg = TestGateway::start().await;
    let dir = TempDir::new("sdk-restart-app");
    let first = Arc::new(Recorder::default());
    {
        let client = HeraldClient::new(
            test_config(&tg.base_url, "app-1", &dir),
            first.clone(),
            minter(&tg, "alice"),
        )
        .unwrap();
        client.connect();
        wait_until("connected", T, || {
            first.connected_over() == Some(TransportKind::WebSocket)
        })
        .await;
        publish_n(&tg, "app-1", 1..=5).await;
        wait_until("5 messages", T, || first.seqs().len() == 5).await;
        // Dropped without an explicit close (the app is killed / restarted).
    }
    publish_n(&tg, "app-1", 6..=8).await; // while the app is not running
    let second = Arc::new(Recorder::default());
    let client = HeraldClient::new(
        test_config(&tg.base_url, "app-1", &dir),
        second.clone(),
        minter(&tg, "alice"),
    )
    .unwrap();
    client.connect();
    wait_until("3 messages", T, || second.seqs().len() >= 3).await;
    publish_n(&tg, "app-1", 9..=9).await;
    wait_until("4 messages", T, || second.seqs().len() >= 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(first.ns(), [1, 2, 3, 4, 5]);
    assert_eq!(second.ns(), [6, 7, 8, 9], "no repeats, no loss");
    client.close();
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_owned_by_another_user_is_terminal() {
    let tg = TestGateway::start().await;
    let dir = TempDir::new("sdk-403");
    // alice owns the device.
    let alice = Arc::new(Recorder::default());
    let a = HeraldClient::new(
        test_config(&tg.base_url, "owned-1", &dir),
        alice.clone(),
        minter(&tg, "alice"),
    )
    .unwrap();
    a.connect();
    wait_until("alice connected", T, || {
        alice.connected_over() == Some(TransportKind::WebSocket)
    })
    .await;
    a.close();
    // bob tries to use it.
    let dir2 = TempDir::new("sdk-403b");
    let bob = Arc::new(Recorder::default());
    let tokens = minter(&tg, "bob");
    let b = HeraldClient::new(
        test_config(&tg.base_url, "owned-1", &dir2),
        bob.clone(),
        tokens.clone(),
    )
    .unwrap();
    b.connect();
    wait_until("terminal error", T, || {
        !bob.errors.lock().unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let errors = bob.errors.lock().unwrap().clone();
    assert!(
        matches!(errors[..], [(Error::Forbidden(_), true)]),
        "{errors:?}"
    );
    assert_eq!(bob.state(), Some(ConnectionState::Disconnected));
    let connecting = bob
        .states
        .lock()
        .unwrap()
        .iter()
        .filter(|s| **s == ConnectionState::Connecting)
        .count();
    assert_eq!(connecting, 1, "no retries after a terminal error");
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 1);
    b.close();
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_and_expired_tokens_are_refreshed() {
    let tg = TestGateway::start().await;
    let dir = TempDir::new("sdk-token");
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let mint = tg.state.tokens.clone();
    // 1st: garbage (401 → fetch again); 2nd: valid but expiring within the margin;
    // later: valid for an hour.
    let provider = move |_: &str| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        Ok::<_, String>(match n {
            0 => "not-a-jwt".to_string(),
            1 => mint.mint("alice", 5).unwrap().0,
            _ => mint.mint("alice", 3600).unwrap().0,
        })
    };
    let rec = Arc::new(Recorder::default());
    let client = HeraldClient::new(
        test_config(&tg.base_url, "tok-1", &dir),
        rec.clone(),
        Arc::new(provider),
    )
    .unwrap();
    client.connect();
    wait_until("connected", T, || {
        rec.connected_over() == Some(TransportKind::WebSocket)
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one refetch after the 401");
    // The held token expires within the margin: the reconnect fetches a new one.
    tg.kick("tok-1");
    wait_until("third token", T, || calls.load(Ordering::SeqCst) == 3).await;
    wait_until("reconnected", T, || {
        rec.connected_over() == Some(TransportKind::WebSocket)
    })
    .await;
    assert!(rec
        .errors
        .lock()
        .unwrap()
        .iter()
        .all(|(_, terminal)| !terminal));
    client.close();
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_hint_is_fetched_once_and_not_delivered_again_live() {
    let tg = TestGateway::start().await;
    let dir = TempDir::new("sdk-push");
    let rec = Arc::new(Recorder::default());
    let client = HeraldClient::new(
        test_config(&tg.base_url, "push-1", &dir),
        rec.clone(),
        minter(&tg, "alice"),
    )
    .unwrap();
    let device = tokio::task::block_in_place(|| {
        client.register_push_token(PushProviderKind::Fcm, "fcm-token-1", None)
    })
    .unwrap();
    assert_eq!(device.device_id, "push-1");
    assert_eq!(device.push_token.as_str(), "active");
    // Offline: the gateway pushes a content-free hint.
    let mut req = PublishRequest::new(Target::Device("push-1".into()), json!({"n": 1}));
    req.push_content = PushContent::Hint;
    tg.publish(&req).await;
    wait_until("push sent", T, || !tg.fcm.sent().is_empty()).await;
    let sent = tg.fcm.sent()[0].clone();
    let payload = herald_gateway::push::payload::herald_keys(&sent, true);
    let payload = serde_json::to_string(&payload).unwrap();
    let got = tokio::task::block_in_place(|| client.handle_push(&payload)).unwrap();
    assert_eq!(got.messages.len(), 1);
    assert_eq!(got.messages[0].data, json!({"n": 1}));
    // Recorded and acked before it returned: the gateway says so already.
    assert!(got.acked);
    let (_, status) = herald_gateway::testing::http_request(
        "GET",
        &format!("{}/v1/messages/{}", tg.base_url, got.messages[0].id),
        &tg.api_key,
        None,
    )
    .await;
    assert!(status.contains(r#""state":"acked""#), "{status}");
    // The same push again: nothing new.
    assert!(tokio::task::block_in_place(|| client.handle_push(&payload))
        .unwrap()
        .messages
        .is_empty());
    assert!(matches!(
        tokio::task::block_in_place(|| client.handle_push(r#"{"other":"app"}"#)),
        Err(Error::NotHeraldPush)
    ));
    // Connecting does not deliver it again; new messages still flow.
    client.connect();
    wait_until("connected", T, || {
        rec.connected_over() == Some(TransportKind::WebSocket)
    })
    .await;
    publish_n(&tg, "push-1", 2..=2).await;
    wait_until("live message", T, || !rec.seqs().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rec.ns(), [2]);
    // A full push of a message that arrived live is a duplicate.
    let full = herald_gateway::push::payload::herald_keys(
        &herald_gateway::push::PushRequest {
            seq: 2,
            message_id: rec.messages.lock().unwrap()[0].id.clone(),
            ..sent
        },
        false,
    );
    let full = serde_json::to_string(&full).unwrap();
    assert!(tokio::task::block_in_place(|| client.handle_push(&full))
        .unwrap()
        .messages
        .is_empty());
    client.close();
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_gateway_backs_off_and_network_events_are_honoured() {
    // Nothing listens on this port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = TempDir::new("sdk-offline");
    let rec = Arc::new(Recorder::default());
    let mut c = Config::new(format!("http://127.0.0.1:{port}"), "off-1", dir.0.clone());
    c.backoff_min = Duration::from_millis(100);
    c.backoff_max = Duration::from_millis(400);
    let client = HeraldClient::new(
        c,
        rec.clone(),
        Arc::new(|_: &str| Ok::<_, String>("t".into())),
    )
    .unwrap();
    client.connect();
    wait_until("retrying", T, || {
        rec.states
            .lock()
            .unwrap()
            .iter()
            .filter(|s| matches!(s, ConnectionState::WaitingToReconnect { .. }))
            .count()
            >= 3
    })
    .await;
    client.network_changed(false);
    wait_until("suspended", T, || {
        rec.state() == Some(ConnectionState::Suspended)
    })
    .await;
    let n = rec.states.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rec.states.lock().unwrap().len(), n, "quiet while offline");
    client.network_changed(true);
    wait_until("connecting again", T, || {
        rec.states.lock().unwrap().len() > n
    })
    .await;
    assert_eq!(rec.states.lock().unwrap()[n], ConnectionState::Connecting);
    client.disconnect();
    wait_until("disconnected", T, || {
        rec.state() == Some(ConnectionState::Disconnected)
    })
    .await;
    client.close();
    assert_eq!(rec.state(), Some(ConnectionState::Closed));
}

/// A TCP proxy whose existing connections can be frozen: bytes stop flowing both ways
/// but the sockets stay open (a phone that lost its network without a FIN/RST).
struct FreezingProxy {
    addr: std::net::SocketAddr,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl FreezingProxy {
    async fn start(upstream: std::net::SocketAddr) -> FreezingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let g = generation.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let mine = g.load(Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, g.clone(), mine));
                tokio::spawn(pump(sr, cw, g.clone(), mine));
            }
        });
        FreezingProxy { addr, generation }
    }

    /// Freezes every connection open now; new ones work.
    fn freeze_current(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    generation: Arc<std::sync::atomic::AtomicU64>,
    mine: u64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if generation.load(Ordering::SeqCst) != mine {
            // Frozen: swallow everything, keep the sockets open for a while.
            tokio::time::sleep(Duration::from_secs(60)).await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_network_drop_is_detected_and_nothing_is_lost() {
    let tg = TestGateway::start_with(|c| {
        c.delivery.heartbeat_ms = 1000;
        c.delivery.ack_timeout_ms = 3000;
    })
    .await;
    let upstream: std::net::SocketAddr = tg.base_url.trim_start_matches("http://").parse().unwrap();
    let proxy = FreezingProxy::start(upstream).await;
    let dir = TempDir::new("sdk-freeze");
    let rec = Arc::new(Recorder::default());
    let mut c = test_config(&tg.base_url, "freeze-1", &dir);
    c.base_url = format!("http://{}", proxy.addr);
    let client = HeraldClient::new(c, rec.clone(), minter(&tg, "alice")).unwrap();
    client.connect();
    wait_until("connected", T, || {
        rec.connected_over() == Some(TransportKind::WebSocket)
    })
    .await;
    publish_n(&tg, "freeze-1", 1..=5).await;
    wait_until("5 messages", T, || rec.seqs().len() == 5).await;
    let before = std::time::Instant::now();
    proxy.freeze_current();
    publish_n(&tg, "freeze-1", 6..=10).await;
    wait_until("10 messages", T, || rec.seqs().len() >= 10).await;
    // Detected by the heartbeat (2 x 1 s + grace), not by a TCP timeout.
    assert!(
        before.elapsed() < Duration::from_secs(10),
        "{:?}",
        before.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rec.ns(), (1..=10).collect::<Vec<_>>());
    client.close();
    tg.stop().await;
}

/// Under the product's security defaults (`did` required), a client whose device id
/// the SDK generated still gets a token it can use: the provider is told the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_device_id_is_given_to_the_token_provider() {
    let tg = TestGateway::start_secure_with(|_| {}).await;
    let dir = TempDir::new("sdk-did");
    let rec = Arc::new(Recorder::default());
    let tokens = minter(&tg, "alice");
    let client = HeraldClient::new(
        test_config(&tg.base_url, "", &dir),
        rec.clone(),
        tokens.clone(),
    )
    .unwrap();
    let device = client.device_id().to_string();
    assert!(!device.is_empty());
    client.connect();
    wait_until("connected", T, || {
        rec.connected_over() == Some(TransportKind::WebSocket)
    })
    .await;
    publish_n(&tg, &device, 1..=1).await;
    wait_until("message", T, || rec.ns() == vec![1]).await;
    let registered = tokio::task::block_in_place(|| {
        client.register_push_token(PushProviderKind::Fcm, "fcm-did", None)
    })
    .unwrap();
    assert_eq!(registered.device_id, device);
    let asked = tokens.devices.lock().unwrap().clone();
    assert!(!asked.is_empty());
    assert!(asked.iter().all(|d| *d == device), "asked for {asked:?}");
    client.close();
    tg.stop().await;
}
