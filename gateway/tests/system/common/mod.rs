//! Helpers for black-box tests: real HTTP, real WebSockets.
#![allow(dead_code)]

pub mod certs;
pub mod fcm_mock;
pub mod pg;
pub mod process;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald_gateway::testing::TestGateway;
use herald_protocol::{ClientFrame, InboxMessage, ServerFrame};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const WAIT: Duration = Duration::from_secs(10);

pub struct Device {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub welcome: ServerFrame,
}

pub fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// Connects `device` with a token bound to it (its `did`) that allows every topic.
pub async fn connect(tg: &TestGateway, user: &str, device: &str, after: Option<i64>) -> Device {
    let token = tg.mint_device_token(user, device, &["*"], Duration::from_secs(600));
    connect_with_token(&tg.ws_url(device, after), &token)
        .await
        .unwrap_or_else(|e| panic!("connect {device}: {e}"))
}

pub async fn connect_with_token(url: &str, token: &str) -> Result<Device, String> {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "herald.v1".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(r) => format!(
                "HTTP {} {}",
                r.status().as_u16(),
                String::from_utf8_lossy(r.body().as_deref().unwrap_or_default())
            ),
            other => other.to_string(),
        })?;
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "herald.v1"
    );
    let welcome = next_frame(&mut ws).await.expect("welcome frame");
    assert!(
        matches!(welcome, ServerFrame::Welcome { .. }),
        "{welcome:?}"
    );
    Ok(Device { ws, welcome })
}

/// Next JSON frame, skipping control frames; None when the socket closed.
pub async fn next_frame(
    ws: &mut WebSocketStream<MaybeTlsStream<TcpStream>>,
) -> Option<ServerFrame> {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for a frame")?;
        match msg {
            Ok(Message::Text(t)) => {
                return Some(serde_json::from_str(t.as_str()).expect("server frame"))
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

impl Device {
    pub async fn frame(&mut self) -> Option<ServerFrame> {
        next_frame(&mut self.ws).await
    }

    pub async fn msg(&mut self) -> InboxMessage {
        match self.frame().await {
            Some(ServerFrame::Msg(m)) => m,
            other => panic!("expected msg, got {other:?}"),
        }
    }

    /// Asserts nothing arrives within `d`.
    pub async fn quiet_for(&mut self, d: Duration) {
        if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(d, self.ws.next()).await {
            panic!("unexpected frame {t}");
        }
    }

    pub async fn send(&mut self, f: &ClientFrame) {
        self.ws
            .send(Message::Text(serde_json::to_string(f).unwrap().into()))
            .await
            .unwrap();
    }

    pub async fn ack(&mut self, seq: i64) {
        self.send(&ClientFrame::Ack { seq }).await;
    }
}

/// The gateway's `/metrics` text.
pub async fn metrics_text(tg: &TestGateway) -> String {
    http()
        .get(format!("{}/metrics", tg.base_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// One series of `/metrics`, named with its labels (`herald_x_total{op="ack"}`); 0
/// when the gateway has not reported it.
pub async fn metric(tg: &TestGateway, series: &str) -> u64 {
    metrics_text(tg)
        .await
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .parse::<f64>()
                .ok()
        })
        .map_or(0, |v| v as u64)
}

pub async fn post(tg: &TestGateway, path: &str, bearer: &str, body: Value) -> (u16, Value) {
    let resp = http()
        .post(format!("{}{path}", tg.base_url))
        .bearer_auth(bearer)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let v = resp.json().await.unwrap_or(Value::Null);
    (status, v)
}

pub async fn get(tg: &TestGateway, path: &str, bearer: &str) -> (u16, Value) {
    let resp = http()
        .get(format!("{}{path}", tg.base_url))
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let v = resp.json().await.unwrap_or(Value::Null);
    (status, v)
}

pub async fn publish(tg: &TestGateway, body: Value) -> Value {
    let (status, v) = post(tg, "/v1/messages", &tg.api_key, body).await;
    assert_eq!(status, 202, "{v}");
    v
}

/// Registers a device for `user` (no push token) so it can be targeted.
pub async fn register(
    tg: &TestGateway,
    user: &str,
    device: &str,
    push: Option<(&str, &str)>,
) -> Value {
    let token = tg.mint_device_token(user, device, &["*"], Duration::from_secs(600));
    let mut body = serde_json::json!({"platform": "android"});
    if let Some((provider, t)) = push {
        body["push_provider"] = provider.into();
        body["push_token"] = t.into();
    }
    let resp = http()
        .put(format!("{}/v1/me/devices/{device}", tg.base_url))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.json().await.unwrap()
}

/// Polls `f` until it returns Some or the wait runs out.
pub async fn eventually<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_within(WAIT, what, f).await
}

/// `eventually` with a wait of its own.
pub async fn eventually_within<T, F, Fut>(wait: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
