//! The floor for the benchmarks: the least a WebSocket push server can do on the same
//! stack as Herald (axum + tokio-tungstenite), with no store, no auth and no acks kept.
//!
//! It speaks Herald's frames so the same load generator drives it:
//! `GET /ws?device_id=D` → `{"type":"welcome"}`, then `{"type":"msg","seq":N,"data":…}`;
//! client `{"type":"subscribe","topic":T}` → `{"type":"subscribed"}`; client acks are read
//! and dropped. `POST /publish` with `{"to":{"device":D}|{"topic":T},"data":{…}}` → 202
//! `{"recipients":N}`; `POST /publish/batch` with `{"messages":[<publish body>, …]}` → 202
//! `{"results":[{"recipients":N}, …]}`, like Herald's `POST /v1/messages/batch`. One task
//! and one bounded queue per connection, like Herald.
//!
//! floor [--listen 127.0.0.1:8091] [--read-buffer 4096] [--max-write-buffer 262144]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, value::RawValue};
use tokio::sync::mpsc;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8091")]
    listen: std::net::SocketAddr,
    /// WebSocket read buffer per connection (Herald's default is the same).
    #[arg(long, default_value_t = 4096)]
    read_buffer: usize,
    #[arg(long, default_value_t = 256 * 1024)]
    max_write_buffer: usize,
    /// Frames queued per connection before it is dropped as a slow consumer.
    #[arg(long, default_value_t = 1024)]
    queue: usize,
}

type Outbox = mpsc::Sender<Arc<str>>;

const SHARDS: usize = 64;

struct Floor {
    devices: Vec<Mutex<HashMap<String, Outbox>>>,
    topics: Mutex<HashMap<String, Vec<Outbox>>>,
    args: Args,
}

impl Floor {
    fn shard(&self, device: &str) -> &Mutex<HashMap<String, Outbox>> {
        let h = device
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        &self.devices[h % SHARDS]
    }
}

#[derive(Deserialize)]
struct ConnectParams {
    device_id: String,
}

#[derive(Deserialize)]
struct Publish<'a> {
    to: Recipient,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// `POST /publish/batch`: `{"messages":[<publish body>, …]}`, like Herald's
/// `POST /v1/messages/batch`.
#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    messages: Vec<Publish<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Recipient {
    Device(String),
    Topic(String),
}

#[derive(Deserialize)]
struct ClientFrame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    topic: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let floor = Arc::new(Floor {
        devices: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        topics: Mutex::new(HashMap::new()),
        args,
    });
    let app = Router::new()
        .route("/ws", get(connect))
        .route("/publish", post(publish))
        .route("/publish/batch", post(publish_batch))
        .with_state(floor);
    println!("floor listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

async fn connect(
    State(floor): State<Arc<Floor>>,
    Query(params): Query<ConnectParams>,
    ws: WebSocketUpgrade,
) -> axum::response::Response {
    ws.read_buffer_size(floor.args.read_buffer)
        .write_buffer_size(0)
        .max_write_buffer_size(floor.args.max_write_buffer)
        .on_upgrade(move |socket| session(floor, params.device_id, socket))
}

async fn session(floor: Arc<Floor>, device: String, socket: WebSocket) {
    let (tx, mut rx) = mpsc::channel::<Arc<str>>(floor.args.queue);
    floor
        .shard(&device)
        .lock()
        .unwrap()
        .insert(device.clone(), tx.clone());
    let (mut sink, mut stream) = socket.split();
    let mut seq: u64 = 0;
    if sink
        .send(Message::text(r#"{"type":"welcome","last_seq":0}"#))
        .await
        .is_ok()
    {
        loop {
            tokio::select! {
                data = rx.recv() => {
                    let Some(data) = data else { break };
                    seq += 1;
                    let frame = format!(r#"{{"type":"msg","seq":{seq},"data":{data}}}"#);
                    if sink.send(Message::text(frame)).await.is_err() { break; }
                }
                incoming = stream.next() => match incoming {
                    Some(Ok(Message::Text(t))) => {
                        let Ok(frame) = serde_json::from_str::<ClientFrame>(t.as_str()) else { continue };
                        if let ("subscribe", Some(topic)) = (frame.kind.as_str(), frame.topic) {
                            floor.topics.lock().unwrap().entry(topic.clone()).or_default().push(tx.clone());
                            let reply = json!({"type": "subscribed", "topic": topic}).to_string();
                            if sink.send(Message::text(reply)).await.is_err() { break; }
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                }
            }
        }
    }
    let mut shard = floor.shard(&device).lock().unwrap();
    if shard.get(&device).is_some_and(|t| t.same_channel(&tx)) {
        shard.remove(&device);
    }
}

async fn publish(
    State(floor): State<Arc<Floor>>,
    body: String,
) -> (StatusCode, Json<serde_json::Value>) {
    let Ok(req) = serde_json::from_str::<Publish>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "body must be {\"to\":{\"device\"|\"topic\":…},\"data\":{…}}"})),
        );
    };
    let recipients = floor.deliver(req);
    (
        StatusCode::ACCEPTED,
        Json(json!({"recipients": recipients})),
    )
}

async fn publish_batch(
    State(floor): State<Arc<Floor>>,
    body: String,
) -> (StatusCode, Json<serde_json::Value>) {
    let Ok(batch) = serde_json::from_str::<Batch>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "body must be {\"messages\":[{\"to\":…,\"data\":…}, …]}"})),
        );
    };
    let results: Vec<_> = batch
        .messages
        .into_iter()
        .map(|m| json!({"recipients": floor.deliver(m)}))
        .collect();
    (StatusCode::ACCEPTED, Json(json!({"results": results})))
}

impl Floor {
    /// Hands one message to its recipients' queues; returns how many took it.
    fn deliver(&self, req: Publish) -> usize {
        let data: Arc<str> = Arc::from(req.data.get());
        let targets: Vec<Outbox> = match req.to {
            Recipient::Device(d) => self
                .shard(&d)
                .lock()
                .unwrap()
                .get(&d)
                .cloned()
                .into_iter()
                .collect(),
            Recipient::Topic(t) => {
                let mut topics = self.topics.lock().unwrap();
                let subscribers = topics.entry(t).or_default();
                subscribers.retain(|s| !s.is_closed());
                subscribers.clone()
            }
        };
        // Like Herald: never wait on a client; a full queue drops the frame.
        targets
            .iter()
            .filter(|t| t.try_send(data.clone()).is_ok())
            .count()
    }
}
