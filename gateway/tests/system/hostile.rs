//! Hostile and broken clients on real sockets: a cursor from another inbox, frames too
//! large, a client that stops reading. Each loses nothing and stops nothing.

use crate::common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use herald_gateway::registry::KickReason;
use herald_gateway::testing::TestGateway;
use herald_protocol::ServerFrame;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// Completes the WebSocket upgrade by hand, so the test controls every byte and the
/// receive buffer. Returns the stream and what was read past the 101 response.
async fn raw_ws(
    tg: &TestGateway,
    user: &str,
    device: &str,
    recv_buffer: Option<u32>,
) -> (TcpStream, Vec<u8>) {
    let addr = tg.config.listen;
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        // Set before connecting, so the window the gateway sees is small from the start.
        socket.set_recv_buffer_size(size).unwrap();
    }
    let mut s = socket.connect(addr).await.unwrap();
    let token = tg.mint_token(user, Duration::from_secs(600));
    let req = format!(
        "GET /v1/connect?device_id={device} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: herald.v1\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let end = loop {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .expect("upgrade answer")
            .unwrap();
        assert!(n > 0, "closed during the upgrade");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (s, buf[end..].to_vec())
}

/// Reads server frames (unmasked) until a Close; returns its code, or None if the
/// connection ended without one.
async fn close_code(s: &mut TcpStream, mut buf: Vec<u8>) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // Parse every complete frame in `buf`.
        while buf.len() >= 2 {
            let opcode = buf[0] & 0x0f;
            let (len, at) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if buf.len() < at + len {
                break;
            }
            if opcode == 8 {
                return Some(u16::from_be_bytes([buf[at], buf[at + 1]]));
            }
            buf.drain(..at + len);
        }
        let mut chunk = [0u8; 4096];
        let n = match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return None,
            Err(_) => panic!("no close within {WAIT:?}"),
        };
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A masked client frame header announcing `len` payload bytes.
fn frame_header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
    let mut h = vec![if fin { 0x80 } else { 0 } | opcode];
    match len {
        0..=125 => h.push(0x80 | len as u8),
        126..=65535 => {
            h.push(0x80 | 126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            h.push(0x80 | 127);
            h.extend_from_slice(&len.to_be_bytes());
        }
    }
    h.extend_from_slice(&[0, 0, 0, 0]); // mask of zeros: payload goes as is
    h
}

/// The value of the sample whose line starts with `prefix` (0 when absent).
fn metric(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

fn closed_count(metrics: &str, reason: &str) -> u64 {
    metric(
        metrics,
        &format!("herald_sessions_closed_total{{reason=\"{reason}\"}} "),
    )
}

async fn online(tg: &TestGateway, device: &str) -> bool {
    let (_, d) = get(tg, &format!("/v1/devices/{device}"), &tg.api_key).await;
    d["online"] == true
}

#[tokio::test]
async fn a_cursor_beyond_last_seq_acks_nothing_and_skips_nothing() {
    let tg = TestGateway::start().await;
    register(&tg, "u", "d", None).await;
    let first = publish(&tg, json!({"to": {"device": "d"}, "data": {"n": 1}})).await;
    publish(&tg, json!({"to": {"device": "d"}, "data": {"n": 2}})).await;

    // The app kept cursor 5 from a deleted incarnation of the device.
    let mut dev = connect(&tg, "u", "d", Some(5)).await;
    match dev.welcome {
        ServerFrame::Welcome { last_seq, .. } => assert_eq!(last_seq, 2),
        ref other => panic!("{other:?}"),
    }
    // Nothing was acked by the bogus cursor: the two entries are still delivered.
    assert_eq!(dev.msg().await.seq, 1);
    assert_eq!(dev.msg().await.seq, 2);
    let (_, status) = get(
        &tg,
        &format!("/v1/messages/{}", first["message_id"].as_str().unwrap()),
        &tg.api_key,
    )
    .await;
    assert_ne!(status["deliveries"][0]["state"], "acked", "{status}");
    // An ack up to the bogus cursor is refused, and later entries are not skipped.
    dev.ack(5).await;
    match dev.frame().await {
        Some(ServerFrame::Error { code, .. }) => assert_eq!(code, "bad_ack"),
        other => panic!("expected bad_ack, got {other:?}"),
    }
    publish(&tg, json!({"to": {"device": "d"}, "data": {"n": 3}})).await;
    assert_eq!(dev.msg().await.seq, 3);
    let (_, d) = get(&tg, "/v1/devices/d", &tg.api_key).await;
    assert_eq!(d["acked_seq"], 0, "{d}");
}

#[tokio::test]
async fn oversize_frames_are_closed_with_1009() {
    let tg = TestGateway::start().await;

    // One real 20 KB frame (the limit is 16 KiB).
    let mut dev = connect(&tg, "u", "d1", None).await;
    dev.ws
        .send(Message::Text("x".repeat(20_000).into()))
        .await
        .unwrap();
    assert_eq!(ws_close_code(&mut dev).await, Some(CloseCode::Size));

    // 2 GiB announced; only the header is sent.
    let (mut s, rest) = raw_ws(&tg, "u", "d2", None).await;
    s.write_all(&frame_header(true, 1, 2 << 30)).await.unwrap();
    assert_eq!(close_code(&mut s, rest).await, Some(1009));

    // More than 16 KiB in 4 KiB fragments.
    let (mut s, rest) = raw_ws(&tg, "u", "d3", None).await;
    let piece = vec![b'x'; 4096];
    for i in 0..5 {
        let opcode = if i == 0 { 1 } else { 0 };
        let mut f = frame_header(i == 4, opcode, piece.len() as u64);
        f.extend_from_slice(&piece);
        if s.write_all(&f).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut s, rest).await, Some(1009));
    assert_eq!(closed_count(&metrics_text(&tg).await, "too_large"), 3);
}

/// The close code the server sent, skipping other frames.
async fn ws_close_code(dev: &mut Device) -> Option<CloseCode> {
    loop {
        match tokio::time::timeout(WAIT, dev.ws.next())
            .await
            .expect("close")
        {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

#[tokio::test]
async fn a_client_close_is_echoed_and_a_slow_consumer_gets_1008() {
    let tg = TestGateway::start().await;
    let mut dev = connect(&tg, "u", "d", None).await;
    dev.ws.close(None).await.unwrap();
    // tungstenite reports the server's echo as a Close message before the end.
    assert!(
        matches!(
            tokio::time::timeout(WAIT, dev.ws.next()).await.unwrap(),
            Some(Ok(Message::Close(_)))
        ),
        "the server did not echo the close"
    );

    let mut dev = connect(&tg, "u", "d", None).await;
    assert!(tg.state.registry.kick("d", KickReason::SlowConsumer));
    assert_eq!(ws_close_code(&mut dev).await, Some(CloseCode::Policy));
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_and_loses_nothing() {
    let tg = TestGateway::start_with(|c| {
        c.delivery.write_timeout_ms = 1_000;
        // Only the write deadline can end this session.
        c.delivery.ack_timeout_ms = 120_000;
        c.delivery.heartbeat_ms = 120_000;
        c.delivery.session_queue = 100_000;
        c.delivery.session_queue_bytes = 1 << 30;
        c.limits.publish_rate_per_key = 100_000;
        c.limits.publish_burst_per_key = 100_000;
    })
    .await;
    register(&tg, "u", "d", Some(("fcm", "fcm-token-1"))).await;
    let (_stuck, _) = raw_ws(&tg, "u", "d", Some(4096)).await;
    eventually("online", || async { online(&tg, "d").await.then_some(()) }).await;
    let pad = "x".repeat(48 * 1024);
    let mut n = 0;
    // Enough to fill the socket buffers on both sides (a few MiB on loopback), bounded.
    while n < 300 && closed_count(&metrics_text(&tg).await, "write_timeout") == 0 {
        publish(&tg, json!({"to": {"device": "d"}, "data": {"pad": pad}})).await;
        n += 1;
        if n % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eventually("write_timeout close", || async {
        (closed_count(&metrics_text(&tg).await, "write_timeout") == 1).then_some(())
    })
    .await;
    eventually("offline", || async {
        (!online(&tg, "d").await).then_some(())
    })
    .await;
    // Everything stayed in the inbox.
    let mut dev = connect(&tg, "u", "d", Some(0)).await;
    for seq in 1..=n {
        assert_eq!(dev.msg().await.seq, seq);
    }
}

#[tokio::test]
async fn session_queue_is_bounded_in_bytes() {
    let tg = TestGateway::start_with(|c| {
        c.delivery.write_timeout_ms = 120_000;
        c.delivery.ack_timeout_ms = 120_000;
        c.delivery.heartbeat_ms = 120_000;
        c.delivery.session_queue = 100_000;
        c.delivery.session_queue_bytes = 256 * 1024;
        c.limits.publish_rate_per_key = 100_000;
        c.limits.publish_burst_per_key = 100_000;
    })
    .await;
    register(&tg, "u", "d", None).await;
    let (_stuck, _) = raw_ws(&tg, "u", "d", Some(4096)).await;
    eventually("online", || async { online(&tg, "d").await.then_some(()) }).await;
    let pad = "x".repeat(48 * 1024);
    let mut n = 0;
    while n < 300 && closed_count(&metrics_text(&tg).await, "slow_consumer") == 0 {
        publish(
            &tg,
            json!({"to": {"device": "d"}, "data": {"pad": pad}, "push": "never"}),
        )
        .await;
        n += 1;
    }
    // The kicked session may still be giving its close frame (bounded to 1 s) a chance.
    eventually(
        &format!("{n} messages of 48 KiB queued and the session cut off as a slow consumer"),
        || async { (closed_count(&metrics_text(&tg).await, "slow_consumer") == 1).then_some(()) },
    )
    .await;
    eventually("offline", || async {
        (!online(&tg, "d").await).then_some(())
    })
    .await;
    let mut dev = connect(&tg, "u", "d", Some(0)).await;
    for seq in 1..=n {
        assert_eq!(dev.msg().await.seq, seq);
    }
}

/// True when the gateway closed `s` (EOF or reset) within `within`; whatever it
/// wrote before closing is skipped.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

async fn tcp_from(tg: &TestGateway, local_ip: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{local_ip}:0").parse().unwrap())
        .unwrap();
    socket.connect(tg.config.listen).await.unwrap()
}

/// Reads what the gateway answers at once on a fresh connection, if anything.
async fn first_bytes(s: &mut TcpStream, within: Duration) -> String {
    let mut buf = vec![0u8; 1024];
    match tokio::time::timeout(within, s.read(&mut buf)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        _ => String::new(),
    }
}

#[tokio::test]
async fn trickled_silent_idle_and_stalled_connections_are_closed() {
    let tg = TestGateway::start_with(|c| {
        c.limits.header_read_timeout_ms = 500;
        c.limits.idle_timeout_ms = 1_000;
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(tcp_from(&tg, "127.0.0.1").await);
    }
    let mut trickling = Vec::new();
    for _ in 0..20 {
        let mut s = tcp_from(&tg, "127.0.0.1").await;
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        trickling.push(s);
    }
    let trickler = tokio::spawn(async move {
        // A header byte every 100 ms: always "active", never complete.
        for _ in 0..50 {
            for s in trickling.iter_mut() {
                let _ = s.write_all(b"X").await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        trickling
    });
    // A keep-alive connection that made one request and then went quiet.
    let mut idle = tcp_from(&tg, "127.0.0.1").await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(first_bytes(&mut idle, WAIT)
        .await
        .starts_with("HTTP/1.1 200"));
    // A body that stops halfway, on a route outside the request timeout's reach too.
    let mut stalled = tcp_from(&tg, "127.0.0.1").await;
    stalled
        .write_all(
            format!(
                "POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"to\":",
                tg.api_key
            )
            .as_bytes(),
        )
        .await
        .unwrap();

    // Bounds: generous against a loaded machine, far below "never".
    let bound = Duration::from_secs(5);
    for s in silent.iter_mut() {
        assert!(
            closed_within(s, bound).await,
            "a silent connection stayed open"
        );
    }
    assert!(
        closed_within(&mut idle, bound).await,
        "an idle keep-alive connection stayed open"
    );
    assert!(
        closed_within(&mut stalled, bound).await,
        "a stalled body kept its connection"
    );
    let mut trickling = trickler.await.unwrap();
    for s in trickling.iter_mut() {
        assert!(
            closed_within(s, Duration::from_millis(100)).await,
            "a trickling header kept its connection for 5 s"
        );
    }
    // And the gateway still answers.
    let (s, _) = get(&tg, "/v1/devices/nobody", &tg.api_key).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn open_connections_are_capped_globally_and_per_ip() {
    let tg = TestGateway::start_with(|c| {
        c.limits.max_connections = 6;
        c.limits.max_connections_per_ip = 4;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tcp_from(&tg, "127.0.0.1").await);
    }
    // The fifth from the same address is refused at once, with a JSON 503.
    let mut over = tcp_from(&tg, "127.0.0.1").await;
    let answer = first_bytes(&mut over, WAIT).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("\"code\":\"unavailable\""), "{answer}");
    // Another address still gets in, up to the global cap.
    for _ in 0..2 {
        let mut s = tcp_from(&tg, "127.0.0.2").await;
        assert_eq!(first_bytes(&mut s, Duration::from_millis(200)).await, "");
        held.push(s);
    }
    let mut over = tcp_from(&tg, "127.0.0.3").await;
    let answer = first_bytes(&mut over, WAIT).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    // Closing connections frees their slots.
    drop(held);
    let metrics = eventually("a free slot", || async {
        let resp = http()
            .get(format!("{}/metrics", tg.base_url))
            .send()
            .await
            .ok()?;
        (resp.status() == 200).then_some(())?;
        resp.text().await.ok()
    })
    .await;
    // (The polling above may itself have been refused while slots were freed.)
    for cap in ["max_connections_per_ip", "max_connections"] {
        let line = format!("herald_connections_refused_total{{cap=\"{cap}\"}} ");
        assert!(metric(&metrics, &line) >= 1, "{cap}: {metrics}");
    }
    assert!(
        metric(&metrics, "herald_http_connections ") >= 1,
        "{metrics}"
    );
}

#[tokio::test]
async fn cleartext_http2_is_not_spoken() {
    let tg = TestGateway::start().await;
    let mut s = tcp_from(&tg, "127.0.0.1").await;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let answer = first_bytes(&mut s, WAIT).await;
    // An HTTP/2 server would answer with a SETTINGS frame (type 4) first.
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4") || answer.starts_with("HTTP/1.1 5"),
        "{answer:?}"
    );
}
