//! The SDK over Server-Sent Events and long-poll against the real gateway: forced
//! (`TransportPreference::Sse` / `LongPoll`), and chosen automatically behind a real
//! TCP proxy that refuses WebSocket upgrades (a 403 page, or the upgrade headers
//! stripped) but passes plain HTTP. Every message once, in order, acked in the
//! gateway's delivery record; the state names the transport. Every wait is bounded.

use std::sync::Arc;
use std::time::Duration;

use herald_gateway::testing::{TempDir, TestGateway};
use herald_sdk::{Config, ConnectionState, HeraldClient, TransportKind, TransportPreference};
use herald_system_tests::{publish_n, test_config, wait_until, Recorder, T};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to the first request of each TCP connection.
#[derive(Clone, Copy, PartialEq)]
enum Block {
    /// WebSocket upgrades get a 403 page (not the gateway's JSON error).
    Refuse403,
    /// Upgrade headers are removed; the gateway sees a plain GET.
    StripUpgrade,
    /// WebSocket upgrades and event streams get a 403 page.
    RefuseWsAndSse,
}

/// A local HTTP proxy in front of the gateway (reverse-proxy style: the client's base
/// URL points at it). Returns its base URL.
async fn proxy(upstream: &str, block: Block) -> String {
    let upstream = upstream
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let _ = relay(client, &upstream, block).await;
            });
        }
    });
    format!("http://{addr}")
}

async fn relay(mut client: TcpStream, upstream: &str, block: Block) -> std::io::Result<()> {
    // Read the first request head.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte).await? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let lower = text.to_ascii_lowercase();
    let is_upgrade = lower.contains("\r\nupgrade: websocket");
    let is_sse = lower.starts_with("get /v1/connect/sse");
    let refuse = match block {
        Block::Refuse403 => is_upgrade,
        Block::RefuseWsAndSse => is_upgrade || is_sse,
        Block::StripUpgrade => false,
    };
    if refuse {
        let body = "<html><body>Blocked by corporate policy</body></html>";
        let answer = format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        client.write_all(answer.as_bytes()).await?;
        return client.shutdown().await;
    }
    let head = if block == Block::StripUpgrade && is_upgrade {
        text.split("\r\n")
            .filter(|line| {
                let l = line.to_ascii_lowercase();
                !(l.starts_with("upgrade:")
                    || l.starts_with("connection:")
                    || l.starts_with("sec-websocket-"))
            })
            .collect::<Vec<_>>()
            .join("\r\n")
            .into_bytes()
    } else {
        head
    };
    let mut server = TcpStream::connect(upstream).await?;
    server.write_all(&head).await?;
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}

fn config(base: &str, device: &str, dir: &TempDir, transport: TransportPreference) -> Config {
    let mut c = test_config(base, device, dir);
    c.transport = transport;
    c
}

fn client(
    tg: &TestGateway,
    base: &str,
    device: &str,
    dir: &TempDir,
    transport: TransportPreference,
    rec: Arc<Recorder>,
) -> HeraldClient {
    let token = tg.mint_device_token("alice", device, &["*"], Duration::from_secs(3600));
    HeraldClient::new(
        config(base, device, dir, transport),
        rec,
        Arc::new(move |_: &str| Ok::<_, String>(token.clone())),
    )
    .unwrap()
}

async fn delivery_state(tg: &TestGateway, id: &str, device: &str) -> String {
    let v: Value = reqwest::Client::new()
        .get(format!("{}/v1/messages/{id}", tg.base_url))
        .bearer_auth(&tg.api_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == device)
        .map(|d| d["state"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

async fn all_acked(tg: &TestGateway, ids: &[String], device: &str) {
    let deadline = tokio::time::Instant::now() + T;
    for id in ids {
        loop {
            let state = delivery_state(tg, id, device).await;
            if state == "acked" {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} is {state:?}, not acked"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Connects through `base`, expects `transport`, delivers 1..=40 (with `kick`, the
/// session is closed from the server side after the first deliveries), and checks once / in order / acked.
async fn deliver_over(
    tg: &TestGateway,
    base: &str,
    device: &str,
    pref: TransportPreference,
    transport: TransportKind,
    kick: bool,
) {
    let dir = TempDir::new("sdk-fallback");
    let rec = Arc::new(Recorder::default());
    let c = client(tg, base, device, &dir, pref, rec.clone());
    c.connect();
    wait_until(&format!("connected over {transport:?}"), T, || {
        rec.connected_over() == Some(transport)
    })
    .await;
    let mut ids = publish_n(tg, device, 1..=20).await;
    if kick {
        wait_until("some delivered", T, || !rec.ns().is_empty()).await;
        tg.kick(device);
    }
    ids.extend(publish_n(tg, device, 21..=40).await);
    wait_until("40 messages", T, || rec.ns().len() >= 40).await;
    all_acked(tg, &ids, device).await;
    assert_eq!(rec.ns(), (1..=40).collect::<Vec<_>>(), "once, in order");
    wait_until("connected again", T, || {
        rec.connected_over() == Some(transport)
    })
    .await;
    let states = rec.states.lock().unwrap().clone();
    assert!(
        states.iter().all(|s| !matches!(
            s,
            ConnectionState::Connected { transport: t } if *t != transport
        )),
        "{states:?}"
    );
    c.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_answering_403_to_upgrades_gets_sse() {
    let tg = TestGateway::start().await;
    let base = proxy(&tg.base_url, Block::Refuse403).await;
    deliver_over(
        &tg,
        &base,
        "fb-403",
        TransportPreference::Auto,
        TransportKind::Sse,
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_stripping_the_upgrade_gets_sse() {
    let tg = TestGateway::start().await;
    let base = proxy(&tg.base_url, Block::StripUpgrade).await;
    deliver_over(
        &tg,
        &base,
        "fb-strip",
        TransportPreference::Auto,
        TransportKind::Sse,
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_refusing_websocket_and_event_streams_gets_long_poll() {
    let tg = TestGateway::start().await;
    let base = proxy(&tg.base_url, Block::RefuseWsAndSse).await;
    deliver_over(
        &tg,
        &base,
        "fb-poll",
        TransportPreference::Auto,
        TransportKind::LongPoll,
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_sse_and_long_poll_against_the_gateway() {
    let tg = TestGateway::start().await;
    let base = tg.base_url.clone();
    deliver_over(
        &tg,
        &base,
        "forced-sse",
        TransportPreference::Sse,
        TransportKind::Sse,
        true,
    )
    .await;
    deliver_over(
        &tg,
        &base,
        "forced-poll",
        TransportPreference::LongPoll,
        TransportKind::LongPoll,
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_proxy_auto_stays_on_websocket() {
    let tg = TestGateway::start().await;
    let base = tg.base_url.clone();
    deliver_over(
        &tg,
        &base,
        "auto-ws",
        TransportPreference::Auto,
        TransportKind::WebSocket,
        false,
    )
    .await;
}

/// A graceful gateway restart under an SSE and a long-poll client: both resume on
/// their transport, nothing lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_and_long_poll_clients_resume_across_a_gateway_restart() {
    let mut tg = TestGateway::start().await;
    let base = tg.base_url.clone();
    let mut clients = Vec::new();
    for (device, pref, kind) in [
        ("restart-sse", TransportPreference::Sse, TransportKind::Sse),
        (
            "restart-poll",
            TransportPreference::LongPoll,
            TransportKind::LongPoll,
        ),
    ] {
        let dir = TempDir::new("sdk-fallback-restart");
        let rec = Arc::new(Recorder::default());
        let c = client(&tg, &base, device, &dir, pref, rec.clone());
        c.connect();
        wait_until("connected", T, || rec.connected_over() == Some(kind)).await;
        publish_n(&tg, device, 1..=5).await;
        wait_until("5 messages", T, || rec.ns().len() >= 5).await;
        clients.push((device, kind, rec, c, dir));
    }
    tg.restart().await;
    for (device, kind, rec, _, _) in &clients {
        let ids = publish_n(&tg, device, 6..=10).await;
        wait_until("10 messages", T, || rec.ns().len() >= 10).await;
        all_acked(&tg, &ids, device).await;
        assert_eq!(rec.ns(), (1..=10).collect::<Vec<_>>(), "{device}");
        wait_until("connected again", T, || rec.connected_over() == Some(*kind)).await;
    }
    for (_, _, _, c, _) in clients {
        c.close();
    }
}
