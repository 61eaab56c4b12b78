//! WebSocket load generator for Herald and its peers (see BENCHMARKS.md).
//!
//! Opens many WebSocket devices from many loopback source addresses (127.1.x.y, so the
//! ephemeral port range of one address is not the limit), drives publishes over REST,
//! and prints one JSON report: connections held, server RSS (from /proc), messages/s
//! delivered and acked, publish→deliver latency percentiles, catch-up time, errors.
//! Every run is bounded by `--max-seconds` and stops by itself.
//!
//! Targets (`--target`): `herald` (the gateway: device JWTs minted here with its HS256
//! secret, publishes to `/v1/messages` with an API key), `floor` (bench's own
//! `floor` server: same frames, no store, no auth) and `socketio` (bench/peers/socketio:
//! Engine.IO v4 over WebSocket, `42["msg",{…}]` events, publishes to `/publish`).
//! `--batch N` publishes N messages per request (`/v1/messages/batch`, `/publish/batch`).
//! `--transport sse` (Herald only) holds Server-Sent Events streams
//! (`GET /v1/connect/sse`) instead of WebSockets and acks over `POST /v1/me/ack`.
//!
//! Every report carries the server's CPU time (user + system, from /proc, over the
//! measured window) and the machine's load average, so runs on a shared machine can be
//! judged.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

type Ws = WebSocketStream<TcpStream>;

/// A handshake (TCP, upgrade, hello, subscribe) slower than this counts as an error.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(30);

/// After the last delivery, how long the server gets to take the last acks before its
/// CPU time is read (the window includes it, so it is kept short).
const ACK_SETTLE: Duration = Duration::from_millis(300);

/// Bound of `--restart-command`.
const RESTART_LIMIT: Duration = Duration::from_secs(60);

/// Runs the restart command (bounded) and returns the new server pid it printed last.
async fn restart_server(command: &str) -> anyhow::Result<u32> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run --restart-command")?;
    let out = tokio::time::timeout(RESTART_LIMIT, child.wait_with_output())
        .await
        .context("--restart-command took longer than 60 s")??;
    anyhow::ensure!(
        out.status.success(),
        "--restart-command failed: {}",
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("--restart-command printed no pid last: {text:?}"))
}

#[derive(Debug, Parser)]
#[command(about = "Herald WebSocket load generator; every run is bounded and stops by itself")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum TargetKind {
    Herald,
    Floor,
    Socketio,
    Pushpin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Addressee {
    /// `{"device": …}`.
    Device,
    /// `{"user": …}`: the device's user, who has that one device.
    User,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Transport {
    /// WebSocket (every target).
    Ws,
    /// Server-Sent Events with acks over HTTP (`--target herald` only).
    Sse,
}

#[derive(Debug, Clone, Args)]
struct Common {
    /// Which server listens on --url (decides the WebSocket and publish protocol).
    #[arg(long, value_enum, default_value = "herald")]
    target: TargetKind,
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Where publishes go when that is not --url (Pushpin: its GRIP origin).
    #[arg(long)]
    publish_url: Option<String>,
    /// Herald API key for POST /v1/messages.
    #[arg(long, env = "HERALD_API_KEY")]
    api_key: Option<String>,
    /// Herald's HS256 device-token secret (auth.jwt_secret), to mint device JWTs here.
    #[arg(long, env = "HERALD_JWT_SECRET")]
    jwt_secret: Option<String>,
    /// Processes whose RSS, with their children's, is reported (the server under test;
    /// comma-separated when it is several, like Pushpin and its origin).
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Loopback source addresses to spread client sockets over (127.1.0.1, …).
    #[arg(long, default_value_t = 64)]
    source_addrs: u32,
    /// Size of the padding string in every published message's data.
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// WebSocket handshakes in flight at once.
    #[arg(long, default_value_t = 512)]
    connect_concurrency: usize,
    /// Publish requests in flight at once.
    #[arg(long, default_value_t = 128)]
    publish_concurrency: usize,
    /// Messages per publish request: 1 uses the single-message route (`POST /v1/messages`,
    /// `/publish`), more use the batch route (`POST /v1/messages/batch`, `/publish/batch`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=500))]
    batch: u64,
    /// How devices connect: WebSocket, or Server-Sent Events with acks over
    /// `POST /v1/me/ack` (Herald only; idle, throughput and latency scenarios).
    #[arg(long, value_enum, default_value = "ws")]
    transport: Transport,
    /// Prefix of device ids (devices are PREFIX-0 … PREFIX-(N-1), each its own user).
    #[arg(long, default_value = "bench")]
    device_prefix: String,
    /// Whom throughput and latency publishes address: a device, or its user (each
    /// device is its own user, so the same device receives it; `--target herald` only).
    #[arg(long, value_enum, default_value = "device")]
    to: Addressee,
    /// Hard wall-clock bound of the whole run; it exits (code 3) when it is reached.
    #[arg(long, default_value_t = 300)]
    max_seconds: u64,
    /// Stop waiting for outstanding deliveries once none has arrived for this long, and
    /// report what did arrive (a server that dropped connections never delivers the rest).
    #[arg(long, default_value_t = 15)]
    stall_seconds: u64,
    /// Do not ack messages (to see what acks cost the server; Herald then closes
    /// sessions after its ack timeout, so keep such runs shorter than that).
    #[arg(long)]
    no_ack: bool,
    /// Also write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Clone, Subcommand)]
enum Scenario {
    /// Hold N idle connections and report server RSS per connection.
    Idle {
        #[arg(long, default_value_t = 100_000)]
        connections: usize,
        /// How long to hold them once all are open.
        #[arg(long, default_value_t = 10)]
        hold_seconds: u64,
    },
    /// Targeted 1:1 publishes to random connected devices as fast as --rate allows;
    /// every message is acked by its device.
    Throughput {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value_t = 500_000)]
        messages: u64,
        /// Publish rate asked for (messages/s).
        #[arg(long, default_value_t = 50_000)]
        rate: u64,
    },
    /// Targeted publishes at a fixed rate; reports the latency distribution.
    Latency {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// N devices subscribed to one topic; one publish per round, timed until every
    /// subscriber has it (`round_seconds`) and until the publish was answered
    /// (`accepted_seconds`).
    Fanout {
        #[arg(long, default_value_t = 100_000)]
        subscribers: usize,
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
    /// N clients disconnect, messages are published to them while away, all reconnect
    /// at once; timed until every client has every message (Herald only: the peers keep
    /// no inbox).
    Reconnect {
        #[arg(long, default_value_t = 50_000)]
        clients: usize,
        /// Topic messages published while the clients are away.
        #[arg(long, default_value_t = 3)]
        messages: u32,
        /// Restart the server while the clients are away (after the publishes), with
        /// --restart-command.
        #[arg(long)]
        restart: bool,
        /// Shell command that stops the server, starts it again on the same store, waits
        /// until it listens, and prints the new server's pid as its last line
        /// (bench/run.sh sets BENCH_RESTART_COMMAND for Herald).
        #[arg(long, env = "BENCH_RESTART_COMMAND")]
        restart_command: Option<String>,
    },
}

/// Counters shared by every client task.
struct Stats {
    started: Instant,
    delivered: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    /// Client connections open right now.
    alive: AtomicU64,
    duplicates: AtomicU64,
    gaps: AtomicU64,
    /// Ack requests sent over HTTP (SSE: one acks everything received so far).
    ack_requests: AtomicU64,
    /// Publish → deliver, microseconds.
    latency: Mutex<Histogram<u64>>,
    first_error: Mutex<Option<String>>,
}

impl Stats {
    fn new() -> Arc<Stats> {
        Arc::new(Stats {
            started: Instant::now(),
            delivered: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            alive: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            ack_requests: AtomicU64::new(0),
            latency: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()),
            first_error: Mutex::new(None),
        })
    }

    fn micros(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.first_error.lock().unwrap().get_or_insert(what);
    }
}

/// The protocol differences between targets, in one place.
struct Target {
    kind: TargetKind,
    base: String,
    publish_base: String,
    server: SocketAddr,
    api_key: Option<String>,
    jwt: Option<jsonwebtoken::EncodingKey>,
    http: reqwest::Client,
    /// SSE acks: one pooled keep-alive connection per device at most.
    ack_http: reqwest::Client,
    payload: String,
    no_ack: bool,
    batch: u64,
    transport: Transport,
}

#[derive(Debug, Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    seq: i64,
    #[serde(default)]
    last_seq: i64,
    #[serde(default)]
    data: Option<FrameData>,
}

#[derive(Debug, Deserialize)]
struct FrameData {
    #[serde(default)]
    t: u64,
}

/// What a client reads from its socket.
enum Incoming {
    Frame(Frame),
    /// Engine.IO ping: answer with a pong.
    EnginePing,
    Other,
}

impl Target {
    fn new(c: &Common) -> anyhow::Result<Target> {
        let url =
            reqwest::Url::parse(&c.url).context("--url must be like http://127.0.0.1:8080")?;
        let host = url.host_str().context("--url needs a host")?;
        let ip: IpAddr = if host == "localhost" {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.parse().context("--url host must be an IP address")?
        };
        anyhow::ensure!(
            ip.is_loopback(),
            "the load generator only targets loopback addresses (127.0.0.0/8), not {ip}"
        );
        let port = url.port_or_known_default().context("--url needs a port")?;
        let jwt = match (c.target, &c.jwt_secret) {
            (TargetKind::Herald, Some(s)) => Some(jsonwebtoken::EncodingKey::from_secret(s.as_bytes())),
            (TargetKind::Herald, None) => bail!(
                "--target herald needs --jwt-secret (the gateway's auth.jwt_secret, e.g. HERALD_AUTH__JWT_SECRET)"
            ),
            _ => None,
        };
        if c.target == TargetKind::Herald && c.api_key.is_none() {
            bail!("--target herald needs --api-key (create one with `herald keys create`)");
        }
        if c.transport == Transport::Sse && c.target != TargetKind::Herald {
            bail!("--transport sse needs --target herald");
        }
        Ok(Target {
            kind: c.target,
            base: c.url.trim_end_matches('/').to_owned(),
            publish_base: c
                .publish_url
                .as_deref()
                .unwrap_or(&c.url)
                .trim_end_matches('/')
                .to_owned(),
            server: SocketAddr::new(ip, port),
            api_key: c.api_key.clone(),
            jwt,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(c.publish_concurrency)
                .timeout(Duration::from_secs(60))
                .build()?,
            ack_http: reqwest::Client::builder()
                .pool_max_idle_per_host(usize::MAX)
                .timeout(Duration::from_secs(60))
                .build()?,
            payload: "x".repeat(c.payload_bytes),
            no_ack: c.no_ack,
            batch: c.batch,
            transport: c.transport,
        })
    }

    /// A token for the device named like its user, as a backend would mint it: bound
    /// to the device (`did`) and allowed the bench topics.
    fn device_token(&self, device: &str) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let claims = json!({
            "sub": device, "did": device, "topics": ["bench-*"],
            "iat": now, "exp": now + 3600, "iss": "herald", "aud": "herald-device",
        });
        let key = self.jwt.as_ref().context("no JWT secret")?;
        Ok(jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            key,
        )?)
    }

    fn ws_url(&self, device: &str, after: Option<i64>) -> String {
        let ws = self.base.replacen("http://", "ws://", 1);
        let after = after.map(|a| format!("&after={a}")).unwrap_or_default();
        match self.kind {
            TargetKind::Herald => format!("{ws}/v1/connect?device_id={device}{after}"),
            TargetKind::Floor | TargetKind::Pushpin => format!("{ws}/ws?device_id={device}"),
            TargetKind::Socketio => {
                format!("{ws}/socket.io/?EIO=4&transport=websocket&device_id={device}")
            }
        }
    }

    /// Opens one device's WebSocket from `source` and waits for the server's hello.
    /// Returns the socket and the server's last seq for the device (Herald only).
    async fn open(
        &self,
        source: IpAddr,
        device: &str,
        after: Option<i64>,
    ) -> anyhow::Result<(Ws, i64)> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(self.server).await?;
        stream.set_nodelay(true)?;
        let mut req = self.ws_url(device, after).into_client_request()?;
        if self.kind == TargetKind::Herald {
            let token = self.device_token(device)?;
            let h = req.headers_mut();
            h.insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {token}"))?,
            );
            h.insert(
                "sec-websocket-protocol",
                HeaderValue::from_static("herald.v1"),
            );
        }
        // Small client buffers: 100k clients with the 128 KiB default would not fit.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let (mut ws, _) =
            tokio_tungstenite::client_async_with_config(req, stream, Some(config)).await?;
        let last_seq = match self.kind {
            TargetKind::Herald | TargetKind::Floor | TargetKind::Pushpin => loop {
                match self.read(&mut ws).await? {
                    Incoming::Frame(f) if f.kind == "welcome" => break f.last_seq,
                    Incoming::Frame(f) => bail!("expected welcome, got {}", f.kind),
                    _ => {}
                }
            },
            TargetKind::Socketio => {
                // Engine.IO open packet ("0{…}"), then the Socket.IO connect ("40").
                let open = next_text(&mut ws).await?;
                anyhow::ensure!(open.starts_with('0'), "expected Engine.IO open, got {open}");
                ws.send(Message::text("40")).await?;
                let connected = next_text(&mut ws).await?;
                anyhow::ensure!(
                    connected.starts_with("40"),
                    "expected Socket.IO connect, got {connected}"
                );
                0
            }
        };
        Ok((ws, last_seq))
    }

    async fn read(&self, ws: &mut Ws) -> anyhow::Result<Incoming> {
        let text = next_text(ws).await?;
        Ok(self.parse(&text))
    }

    fn parse(&self, text: &str) -> Incoming {
        match self.kind {
            TargetKind::Herald | TargetKind::Floor | TargetKind::Pushpin => {
                match serde_json::from_str(text) {
                    Ok(f) => Incoming::Frame(f),
                    Err(_) => Incoming::Other,
                }
            }
            TargetKind::Socketio => {
                if text == "2" {
                    return Incoming::EnginePing;
                }
                match text
                    .strip_prefix("42")
                    .map(serde_json::from_str::<(String, Frame)>)
                {
                    Some(Ok((_, f))) => Incoming::Frame(f),
                    _ => Incoming::Other,
                }
            }
        }
    }

    fn encode(&self, frame: serde_json::Value) -> Message {
        match self.kind {
            TargetKind::Herald | TargetKind::Floor | TargetKind::Pushpin => {
                Message::text(frame.to_string())
            }
            TargetKind::Socketio => {
                let event = frame["type"].as_str().unwrap_or("").to_owned();
                Message::text(format!("42{}", json!([event, frame])))
            }
        }
    }

    /// Publishes `to.len()` messages stamped `t`, in one request: the batch route when
    /// `--batch` > 1, else the single one. Ok((messages accepted, recipients)); an item
    /// refused inside a batch counts as an error.
    async fn publish_many(
        &self,
        stats: &Stats,
        to: Vec<serde_json::Value>,
        t: u64,
    ) -> anyhow::Result<(u64, u64)> {
        if self.batch == 1 && to.len() == 1 {
            let recipients = self.publish(to.into_iter().next().unwrap(), t).await?;
            return Ok((1, recipients));
        }
        let messages: Vec<_> = to
            .into_iter()
            .map(|to| json!({"to": to, "data": {"t": t, "pad": self.payload}, "push": "never"}))
            .collect();
        let req = match self.kind {
            TargetKind::Herald => self
                .http
                .post(format!("{}/v1/messages/batch", self.base))
                .bearer_auth(self.api_key.as_deref().unwrap_or_default()),
            TargetKind::Floor | TargetKind::Socketio | TargetKind::Pushpin => self
                .http
                .post(format!("{}/publish/batch", self.publish_base)),
        };
        let resp = req.json(&json!({"messages": messages})).send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        if status.as_u16() != 202 {
            bail!("batch publish answered {status}: {text}");
        }
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let (mut ok, mut recipients) = (0, 0);
        for item in v["results"]
            .as_array()
            .context("batch answer without results")?
        {
            if item.get("error").is_some() {
                stats.error(format!("batch item refused: {item}"));
            } else {
                ok += 1;
                recipients += item["recipients"].as_u64().unwrap_or(0);
            }
        }
        Ok((ok, recipients))
    }

    /// Publishes one message; Ok(recipients) on 202.
    async fn publish(&self, to: serde_json::Value, t: u64) -> anyhow::Result<u64> {
        let body = json!({"to": to, "data": {"t": t, "pad": self.payload}, "push": "never"});
        let req = match self.kind {
            TargetKind::Herald => self
                .http
                .post(format!("{}/v1/messages", self.base))
                .bearer_auth(self.api_key.as_deref().unwrap_or_default()),
            TargetKind::Floor | TargetKind::Socketio | TargetKind::Pushpin => {
                self.http.post(format!("{}/publish", self.publish_base))
            }
        };
        let resp = req.json(&body).send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        if status.as_u16() != 202 {
            bail!("publish answered {status}: {text}");
        }
        let v: serde_json::Value = serde_json::from_str(&text)?;
        Ok(v["recipients"].as_u64().unwrap_or(0))
    }
}

/// One Server-Sent Events stream over a plain HTTP/1.1 connection (bound to a chosen
/// source address, which an HTTP client library would not allow per connection).
struct Sse {
    stream: BufReader<TcpStream>,
    /// `Transfer-Encoding: chunked`: bytes left in the current chunk.
    chunked: bool,
    chunk_left: usize,
    /// The unfinished line and event being parsed, and complete events not yet taken.
    line: Vec<u8>,
    event: String,
    data: String,
    ready: std::collections::VecDeque<(String, String)>,
}

impl Sse {
    async fn open(
        target: &Target,
        source: IpAddr,
        device: &str,
        after: Option<i64>,
    ) -> anyhow::Result<(Sse, i64)> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let mut stream = socket.connect(target.server).await?;
        stream.set_nodelay(true)?;
        let token = target.device_token(device)?;
        let after = after.map(|a| format!("&after={a}")).unwrap_or_default();
        let request = format!(
            "GET /v1/connect/sse?device_id={device}{after}&access_token={token} HTTP/1.1\r\n\
             Host: {}\r\nAccept: text/event-stream\r\n\r\n",
            target.server
        );
        stream.write_all(request.as_bytes()).await?;
        let mut stream = BufReader::with_capacity(2048, stream);
        let mut status = String::new();
        stream.read_line(&mut status).await?;
        let mut chunked = false;
        loop {
            let mut header = String::new();
            if stream.read_line(&mut header).await? == 0 {
                bail!("connection closed in the SSE answer's headers");
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        if status.split_whitespace().nth(1) != Some("200") {
            let mut body = vec![0; 512];
            let n = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut body))
                .await
                .unwrap_or(Ok(0))
                .unwrap_or(0);
            bail!(
                "SSE connect answered {}: {}",
                status.trim_end(),
                String::from_utf8_lossy(&body[..n])
            );
        }
        let mut sse = Sse {
            stream,
            chunked,
            chunk_left: 0,
            line: Vec::new(),
            event: String::new(),
            data: String::new(),
            ready: Default::default(),
        };
        let (event, data) = sse.next_event().await?;
        anyhow::ensure!(
            event == "welcome",
            "expected the welcome event, got {event}"
        );
        let welcome: Frame = serde_json::from_str(&data)?;
        Ok((sse, welcome.last_seq))
    }

    /// Whether a complete event is waiting (read from the socket, not yet taken).
    fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The next event: (name, data).
    async fn next_event(&mut self) -> anyhow::Result<(String, String)> {
        let mut buf = [0u8; 2048];
        loop {
            if let Some(ev) = self.ready.pop_front() {
                return Ok(ev);
            }
            let n = self.read_body(&mut buf).await?;
            for &b in &buf[..n] {
                if b == b'\n' {
                    self.end_line();
                } else {
                    self.line.push(b);
                }
            }
        }
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        let line = String::from_utf8_lossy(line.strip_suffix(b"\r").unwrap_or(&line));
        if line.is_empty() {
            if !self.data.is_empty() || !self.event.is_empty() {
                let event = std::mem::take(&mut self.event);
                let data = std::mem::take(&mut self.data);
                self.ready.push_back((event, data));
            }
        } else if let Some(v) = line.strip_prefix("event:") {
            self.event = v.trim_start().to_owned();
        } else if let Some(v) = line.strip_prefix("data:") {
            if !self.data.is_empty() {
                self.data.push('\n');
            }
            self.data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
        // `id:` (the seq is in the data too) and `: comments` are skipped.
    }

    /// Reads body bytes, undoing the chunked encoding.
    async fn read_body(&mut self, buf: &mut [u8]) -> anyhow::Result<usize> {
        if !self.chunked {
            let n = self.stream.read(buf).await?;
            anyhow::ensure!(n > 0, "SSE stream closed");
            return Ok(n);
        }
        if self.chunk_left == 0 {
            let mut size = String::new();
            anyhow::ensure!(
                self.stream.read_line(&mut size).await? > 0,
                "SSE stream closed"
            );
            let hex = size.trim().split(';').next().unwrap_or("");
            self.chunk_left = usize::from_str_radix(hex, 16)
                .with_context(|| format!("bad chunk size {size:?}"))?;
            anyhow::ensure!(self.chunk_left > 0, "SSE stream ended");
        }
        let want = buf.len().min(self.chunk_left);
        let n = self.stream.read(&mut buf[..want]).await?;
        anyhow::ensure!(n > 0, "SSE stream closed");
        self.chunk_left -= n;
        if self.chunk_left == 0 {
            let mut crlf = [0u8; 2];
            self.stream.read_exact(&mut crlf).await?;
        }
        Ok(n)
    }
}

async fn next_text(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        match ws.next().await {
            None => bail!("connection closed"),
            Some(Err(e)) => bail!("socket error: {e}"),
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Close(c))) => bail!("closed by server: {c:?}"),
            Some(Ok(_)) => {}
        }
    }
}

/// 127.1.0.1, 127.1.0.2, … : one per `source_addrs`, client i uses i % n.
fn source_ip(i: usize, n: u32) -> IpAddr {
    let k = (i as u32) % n.max(1);
    IpAddr::V4(Ipv4Addr::new(127, 1, (k / 250) as u8, (k % 250 + 1) as u8))
}

/// RSS of `roots` and every process below them (Pushpin runs as several processes).
fn rss_kib(roots: &[u32]) -> Option<u64> {
    tree_sum(roots, process_rss_kib)
}

/// User + system CPU seconds used so far by `roots` and every process below them.
fn cpu_seconds(roots: &[u32]) -> Option<f64> {
    tree_sum(roots, process_cpu_ticks).map(|ticks| ticks as f64 / CLOCK_TICKS)
}

/// `f` summed over `roots` (each must answer) and their descendants.
fn tree_sum(roots: &[u32], f: impl Fn(u32) -> Option<u64>) -> Option<u64> {
    if roots.is_empty() {
        return None;
    }
    let mut total = 0;
    for &root in roots {
        total += f(root)?;
    }
    let mut parents = roots.to_vec();
    // Few processes on this machine: a scan of /proc per level is cheap enough.
    while let Some(parent) = parents.pop() {
        for child in child_pids(parent) {
            total += f(child).unwrap_or(0);
            parents.push(child);
        }
    }
    Some(total)
}

/// USER_HZ: the unit of /proc/PID/stat's times (100 on Linux).
const CLOCK_TICKS: f64 = 100.0;

/// The host's CPU as `/proc/cpuinfo` names it: the same build needed ~2.8x the CPU per
/// message on one VM host as on another (BENCHMARKS.md, v8), so reports say which.
fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_owned())
}

/// utime + stime of one process (all its threads), in clock ticks.
fn process_cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After "pid (comm)": state ppid pgrp session tty tpgid flags minflt cminflt majflt
    // cmajflt utime stime …
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Server and load-generator CPU from a start point, for "CPU per message".
struct CpuWindow {
    started: Instant,
    server: Option<f64>,
    own: Option<f64>,
}

impl CpuWindow {
    fn start(server: &[u32]) -> CpuWindow {
        CpuWindow {
            started: Instant::now(),
            server: cpu_seconds(server),
            own: cpu_seconds(&[std::process::id()]),
        }
    }

    /// Writes the CPU used since `start` into the report, per message when `messages` > 0.
    fn report(
        &self,
        r: &mut serde_json::Map<String, serde_json::Value>,
        server: &[u32],
        messages: u64,
    ) {
        let seconds = self.started.elapsed().as_secs_f64();
        let server_cpu = self.server.zip(cpu_seconds(server)).map(|(a, b)| b - a);
        let own = self
            .own
            .zip(cpu_seconds(&[std::process::id()]))
            .map(|(a, b)| b - a);
        r.insert("cpu_window_seconds".into(), json!(seconds));
        r.insert("server_cpu_seconds".into(), json!(server_cpu));
        r.insert(
            "server_cpu_percent".into(),
            json!(server_cpu.map(|c| 100.0 * c / seconds)),
        );
        r.insert(
            "server_cpu_us_per_message".into(),
            json!(server_cpu
                .filter(|_| messages > 0)
                .map(|c| c * 1e6 / messages as f64)),
        );
        r.insert("loadgen_cpu_seconds".into(), json!(own));
    }
}

fn process_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn child_pids(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // /proc/PID/stat: "pid (comm) state ppid …"; comm may contain spaces.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|st| {
                    st.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                })
                == Some(parent)
        })
        .collect()
}

/// One connected device: reads until `stop`, acks every message, records latency.
/// `Stats::alive` counts it from its spawn until it returns.
struct Client {
    index: usize,
    conn: Conn,
    /// Highest seq received (the cursor to reconnect with).
    last_seq: Arc<AtomicI64>,
}

/// A device's open connection (moved once, into its client task: the size of the
/// larger variant costs nothing).
#[allow(clippy::large_enum_variant)]
enum Conn {
    Ws(Ws),
    /// The stream, and the device id (for its acks over HTTP).
    Sse(Sse, String),
}

async fn run_client(target: Arc<Target>, stats: Arc<Stats>, c: Client, stop: CancellationToken) {
    match c.conn {
        Conn::Ws(ws) => {
            let c = WsClient {
                index: c.index,
                ws,
                last_seq: c.last_seq,
            };
            client_loop(&target, &stats, c, stop).await
        }
        Conn::Sse(sse, device) => {
            sse_client_loop(&target, &stats, c.index, sse, device, c.last_seq, stop).await
        }
    }
    stats.alive.fetch_sub(1, Ordering::Relaxed);
}

struct WsClient {
    index: usize,
    ws: Ws,
    last_seq: Arc<AtomicI64>,
}

/// Counts a received `msg` (order, duplicates, latency); false for a duplicate.
fn on_msg(stats: &Stats, last_seq: &AtomicI64, f: &Frame) -> bool {
    let last = last_seq.load(Ordering::Relaxed);
    if f.seq <= last {
        stats.duplicates.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    if f.seq != last + 1 {
        stats.gaps.fetch_add(1, Ordering::Relaxed);
    }
    last_seq.store(f.seq, Ordering::Relaxed);
    if let Some(d) = &f.data {
        let now = stats.micros();
        let _ = stats
            .latency
            .lock()
            .unwrap()
            .record(now.saturating_sub(d.t).max(1));
    }
    stats.delivered.fetch_add(1, Ordering::Relaxed);
    true
}

/// An SSE device: reads events until `stop`; once it has taken every event it has read,
/// acks the highest seq with one `POST /v1/me/ack` (cumulative), as an SSE client would.
async fn sse_client_loop(
    target: &Target,
    stats: &Stats,
    index: usize,
    mut sse: Sse,
    device: String,
    last_seq: Arc<AtomicI64>,
    stop: CancellationToken,
) {
    let token = match target.device_token(&device) {
        Ok(t) => t,
        Err(e) => return stats.error(format!("client {index}: {e:#}")),
    };
    let ack_url = format!("{}/v1/me/ack", target.base);
    let mut acked = last_seq.load(Ordering::Relaxed);
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            e = sse.next_event() => e,
        };
        let (event, data) = match event {
            Ok(e) => e,
            Err(e) => return stats.error(format!("client {index}: {e:#}")),
        };
        match event.as_str() {
            "msg" => match serde_json::from_str::<Frame>(&data) {
                Ok(f) => {
                    on_msg(stats, &last_seq, &f);
                }
                Err(e) => stats.error(format!("client {index}: bad msg event: {e}")),
            },
            "error" | "close" => {
                stats.error(format!("client {index}: {event} event: {data}"));
                if event == "close" {
                    return;
                }
            }
            _ => {}
        }
        let seq = last_seq.load(Ordering::Relaxed);
        if target.no_ack || sse.has_ready() || seq <= acked {
            continue;
        }
        let sent = target
            .ack_http
            .post(&ack_url)
            .bearer_auth(&token)
            .json(&json!({"device_id": device, "seq": seq}))
            .send()
            .await;
        match sent {
            Ok(resp) if resp.status().is_success() => {
                let _ = resp.bytes().await;
                stats
                    .acked
                    .fetch_add((seq - acked) as u64, Ordering::Relaxed);
                stats.ack_requests.fetch_add(1, Ordering::Relaxed);
                acked = seq;
            }
            Ok(resp) => {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                return stats.error(format!("client {index}: ack answered {status}: {text}"));
            }
            Err(e) => return stats.error(format!("client {index}: ack failed: {e}")),
        }
    }
}

async fn client_loop(target: &Target, stats: &Stats, mut c: WsClient, stop: CancellationToken) {
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            m = c.ws.next() => m,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(frame))) => {
                stats.error(format!("client {} closed by server: {frame:?}", c.index));
                return;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                stats.error(format!("client {}: {e}", c.index));
                return;
            }
            None => {
                stats.error(format!("client {}: connection closed", c.index));
                return;
            }
        };
        match target.parse(text.as_str()) {
            Incoming::EnginePing if c.ws.send(Message::text("3")).await.is_err() => {
                stats.error(format!("client {}: cannot answer ping", c.index));
                return;
            }
            Incoming::Frame(f) if f.kind == "msg" => {
                if !on_msg(stats, &c.last_seq, &f) {
                    continue;
                }
                if target.no_ack {
                    continue;
                }
                if c.ws
                    .send(target.encode(json!({"type": "ack", "seq": f.seq})))
                    .await
                    .is_err()
                {
                    stats.error(format!("client {}: ack failed", c.index));
                    return;
                }
                stats.acked.fetch_add(1, Ordering::Relaxed);
            }
            Incoming::Frame(f) if f.kind == "error" => {
                stats.error(format!("client {}: server error frame", c.index));
            }
            _ => {}
        }
    }
    let _ = c.ws.close(None).await;
}

struct Fleet {
    stop: CancellationToken,
    cursors: Vec<Arc<AtomicI64>>,
    tasks: tokio::task::JoinSet<()>,
    connected: usize,
    connect_seconds: f64,
    /// Server CPU seconds spent while the fleet connected.
    connect_cpu_seconds: Option<f64>,
    /// (connections, server RSS KiB) while the fleet was opening.
    rss_samples: Vec<(usize, u64)>,
}

/// A device whose handshake is done, with what its client task needs.
type Opened = (
    usize,
    Conn,
    Arc<AtomicI64>,
    Arc<Target>,
    Arc<Stats>,
    CancellationToken,
);

fn start_client(tasks: &mut tokio::task::JoinSet<()>, opened: Opened) {
    let (index, conn, last_seq, target, stats, stop) = opened;
    stats.alive.fetch_add(1, Ordering::Relaxed);
    let client = Client {
        index,
        conn,
        last_seq,
    };
    tasks.spawn(run_client(target, stats, client, stop));
}

/// Opens devices `0..n` (optionally subscribing each to `topic`), `concurrency`
/// handshakes at a time; `after` gives each device's cursor for a reconnect.
async fn open_fleet(
    target: &Arc<Target>,
    stats: &Arc<Stats>,
    common: &Common,
    n: usize,
    topic: Option<&str>,
    cursors: Option<Vec<Arc<AtomicI64>>>,
) -> Fleet {
    let started = Instant::now();
    let cpu_before = cpu_seconds(&common.server_pid);
    let stop = CancellationToken::new();
    let cursors = cursors.unwrap_or_else(|| (0..n).map(|_| Arc::new(AtomicI64::new(0))).collect());
    let limit = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let connected = Arc::new(AtomicU64::new(0));
    let mut opening = tokio::task::JoinSet::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut rss_samples = vec![(0, rss_kib(&common.server_pid).unwrap_or(0))];
    let step = (n / 20).max(1);
    for (i, cursor) in cursors.iter().enumerate() {
        let permit = limit.clone().acquire_owned().await.unwrap();
        let (target, stats, stop, opened_count) = (
            target.clone(),
            stats.clone(),
            stop.clone(),
            connected.clone(),
        );
        let cursor = cursor.clone();
        let device = format!("{}-{i}", common.device_prefix);
        let source = source_ip(i, common.source_addrs);
        let topic = topic.map(str::to_owned);
        let after = if cursor.load(Ordering::Relaxed) > 0 {
            Some(cursor.load(Ordering::Relaxed))
        } else {
            None
        };
        opening.spawn(async move {
            let opened = tokio::time::timeout(HANDSHAKE_LIMIT, async {
                if target.transport == Transport::Sse {
                    let (sse, _) = Sse::open(&target, source, &device, after).await?;
                    return anyhow::Ok(Conn::Sse(sse, device.clone()));
                }
                let (mut ws, _) = target.open(source, &device, after).await?;
                if let Some(topic) = topic {
                    ws.send(target.encode(json!({"type": "subscribe", "topic": topic})))
                        .await?;
                    loop {
                        match target.read(&mut ws).await? {
                            Incoming::Frame(f) if f.kind == "subscribed" => break,
                            Incoming::EnginePing => ws.send(Message::text("3")).await?,
                            _ => {}
                        }
                    }
                }
                anyhow::Ok(Conn::Ws(ws))
            })
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no welcome within {HANDSHAKE_LIMIT:?}")));
            drop(permit);
            match opened {
                Ok(ws) => {
                    opened_count.fetch_add(1, Ordering::Relaxed);
                    Some((i, ws, cursor, target, stats, stop))
                }
                Err(e) => {
                    stats.error(format!("connect {device}: {e:#}"));
                    None
                }
            }
        });
        while let Some(done) = opening.try_join_next() {
            if let Ok(Some(opened)) = done {
                start_client(&mut tasks, opened);
            }
        }
        if (i + 1) % step == 0 {
            if let Some(rss) = rss_kib(&common.server_pid) {
                rss_samples.push((connected.load(Ordering::Relaxed) as usize, rss));
            }
        }
    }
    while let Some(done) = opening.join_next().await {
        if let Ok(Some(opened)) = done {
            start_client(&mut tasks, opened);
        }
    }
    let connected = connected.load(Ordering::Relaxed) as usize;
    if let Some(rss) = rss_kib(&common.server_pid) {
        rss_samples.push((connected, rss));
    }
    Fleet {
        stop,
        cursors,
        tasks,
        connected,
        connect_seconds: started.elapsed().as_secs_f64(),
        connect_cpu_seconds: cpu_before
            .zip(cpu_seconds(&common.server_pid))
            .map(|(a, b)| b - a),
        rss_samples,
    }
}

impl Fleet {
    async fn close(mut self) -> Vec<Arc<AtomicI64>> {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.cursors
    }
}

/// Publishes `count` messages at `rate`/s, `--batch` per request, `to(i)` choosing
/// each one's recipient. Returns (published OK, seconds spent publishing).
async fn publish_paced(
    target: &Arc<Target>,
    stats: &Arc<Stats>,
    concurrency: usize,
    count: u64,
    rate: u64,
    to: impl Fn(u64) -> serde_json::Value,
) -> (u64, f64) {
    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(concurrency.max(1)));
    let ok = Arc::new(AtomicU64::new(0));
    let mut inflight = tokio::task::JoinSet::new();
    let batch = target.batch.max(1);
    for first in (0..count).step_by(batch as usize) {
        let due = started + Duration::from_secs_f64(first as f64 / rate.max(1) as f64);
        tokio::time::sleep_until(due.into()).await;
        let permit = limit.clone().acquire_owned().await.unwrap();
        let (target, stats, ok) = (target.clone(), stats.clone(), ok.clone());
        let recipients: Vec<_> = (first..count.min(first + batch)).map(&to).collect();
        inflight.spawn(async move {
            match target
                .publish_many(&stats, recipients, stats.micros())
                .await
            {
                Ok((n, _)) => {
                    ok.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => stats.error(format!("{e:#}")),
            }
            drop(permit);
        });
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
    (ok.load(Ordering::Relaxed), started.elapsed().as_secs_f64())
}

/// Waits until `delivered` reaches `expected`, `limit` passes, or nothing new has been
/// delivered for `stall`. Returns whether everything arrived, and when the last delivery
/// seen did (so a partial run's rate is not diluted by the time spent waiting).
async fn wait_delivered(
    stats: &Stats,
    expected: u64,
    limit: Duration,
    stall: Duration,
) -> (bool, Instant) {
    let deadline = Instant::now() + limit;
    let mut seen = stats.delivered.load(Ordering::Relaxed);
    let mut last_progress = Instant::now();
    loop {
        let now = Instant::now();
        let delivered = stats.delivered.load(Ordering::Relaxed);
        if delivered >= expected {
            return (true, now);
        }
        if delivered != seen {
            seen = delivered;
            last_progress = now;
        }
        if now > deadline || now - last_progress > stall {
            return (false, last_progress);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn latency_report(stats: &Stats) -> serde_json::Value {
    let h = stats.latency.lock().unwrap();
    let ms = |v: u64| v as f64 / 1000.0;
    // The distribution, for the plots: value at each of these percentiles.
    let points: Vec<(f64, f64)> = [
        1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9,
        99.99, 100.0,
    ]
    .iter()
    .map(|&p| (p, ms(h.value_at_percentile(p))))
    .collect();
    json!({
        "samples": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "max_ms": ms(h.max()),
        "percentiles_ms": points,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bound = Duration::from_secs(cli.common.max_seconds);
    match tokio::time::timeout(bound, run(cli)).await {
        Ok(result) => result,
        Err(_) => {
            eprintln!(
                "loadgen: stopped at the --max-seconds bound ({} s); use smaller sizes or a larger bound",
                bound.as_secs()
            );
            std::process::exit(3);
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut common = cli.common;
    if common.transport == Transport::Sse
        && matches!(
            cli.scenario,
            Scenario::Fanout { .. } | Scenario::Reconnect { .. }
        )
    {
        bail!("--transport sse runs the idle, throughput and latency scenarios");
    }
    if common.to == Addressee::User && common.target != TargetKind::Herald {
        bail!("--to user needs --target herald (the peers only know devices)");
    }
    let target = Arc::new(Target::new(&common)?);
    let stats = Stats::new();
    let baseline_rss = rss_kib(&common.server_pid);
    let wait_limit = Duration::from_secs(common.max_seconds);
    let stall_limit = Duration::from_secs(common.stall_seconds);
    let mut report = json!({
        "target": common.target,
        "scenario": format!("{:?}", cli.scenario).split_whitespace().next().unwrap_or("").to_owned(),
        "args": format!("{:?}", cli.scenario),
        "payload_bytes": common.payload_bytes,
        "batch": common.batch,
        "to": common.to,
        "transport": common.transport,
        "acks": !common.no_ack,
        "server_rss_baseline_kib": baseline_rss,
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
        "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_owned(),
        "cpu_model": cpu_model(),
    });
    let r = report.as_object_mut().unwrap();

    match cli.scenario {
        Scenario::Idle {
            connections,
            hold_seconds,
        } => {
            let fleet = open_fleet(&target, &stats, &common, connections, None, None).await;
            tokio::time::sleep(Duration::from_secs(hold_seconds)).await;
            let rss = rss_kib(&common.server_pid);
            r.insert(
                "connections_held".into(),
                json!(stats.alive.load(Ordering::Relaxed)),
            );
            r.insert("connect_seconds".into(), json!(fleet.connect_seconds));
            r.insert(
                "connect_per_second".into(),
                json!(fleet.connected as f64 / fleet.connect_seconds),
            );
            r.insert(
                "server_cpu_us_per_connect".into(),
                json!(fleet
                    .connect_cpu_seconds
                    .map(|c| c * 1e6 / fleet.connected.max(1) as f64)),
            );
            r.insert("server_rss_kib".into(), json!(rss));
            if let (Some(base), Some(now)) = (baseline_rss, rss) {
                let per = now.saturating_sub(base) as f64 / fleet.connected.max(1) as f64;
                r.insert("server_rss_per_connection_kib".into(), json!(per));
            }
            r.insert("rss_samples".into(), json!(fleet.rss_samples));
            fleet.close().await;
        }
        Scenario::Throughput { .. } | Scenario::Latency { .. } => {
            let (connections, messages, rate) = match cli.scenario {
                Scenario::Throughput {
                    connections,
                    messages,
                    rate,
                } => (connections, messages, rate),
                Scenario::Latency {
                    connections,
                    rate,
                    seconds,
                } => (connections, rate * seconds, rate),
                _ => unreachable!("matched above"),
            };
            let run = TargetedRun {
                connections,
                messages,
                rate,
                wait_limit,
                stall_limit,
            };
            targeted(&target, &stats, &common, r, run).await;
        }
        Scenario::Fanout {
            subscribers,
            rounds,
        } => {
            let fleet = open_fleet(
                &target,
                &stats,
                &common,
                subscribers,
                Some("bench-fanout"),
                None,
            )
            .await;
            r.insert(
                "connections_held".into(),
                json!(stats.alive.load(Ordering::Relaxed)),
            );
            r.insert("connect_seconds".into(), json!(fleet.connect_seconds));
            let mut round_seconds = vec![];
            // Until the publish's answer: its commit, before any delivery.
            let mut accepted_seconds = vec![];
            let cpu = CpuWindow::start(&common.server_pid);
            for _ in 0..rounds {
                let before = stats.delivered.load(Ordering::Relaxed);
                let started = Instant::now();
                match target
                    .publish(json!({"topic": "bench-fanout"}), stats.micros())
                    .await
                {
                    Ok(n) => {
                        accepted_seconds.push(started.elapsed().as_secs_f64());
                        let (all, at) =
                            wait_delivered(&stats, before + n, wait_limit, stall_limit).await;
                        round_seconds.push(all.then(|| (at - started).as_secs_f64()));
                    }
                    Err(e) => stats.error(format!("{e:#}")),
                }
            }
            // Let the last round's acks reach the server before reading its CPU.
            tokio::time::sleep(ACK_SETTLE).await;
            cpu.report(
                r,
                &common.server_pid,
                stats.delivered.load(Ordering::Relaxed),
            );
            r.insert("round_seconds".into(), json!(round_seconds));
            r.insert("accepted_seconds".into(), json!(accepted_seconds));
            r.insert("server_rss_kib".into(), json!(rss_kib(&common.server_pid)));
            fleet.close().await;
        }
        Scenario::Reconnect {
            clients,
            messages,
            restart,
            restart_command,
        } => {
            if restart && restart_command.is_none() {
                bail!("--restart needs --restart-command (or BENCH_RESTART_COMMAND)");
            }
            if common.target != TargetKind::Herald {
                bail!("the reconnect scenario needs a server that keeps an inbox; only --target herald does");
            }
            let fleet =
                open_fleet(&target, &stats, &common, clients, Some("bench-storm"), None).await;
            r.insert(
                "connections_held".into(),
                json!(stats.alive.load(Ordering::Relaxed)),
            );
            r.insert("connect_seconds".into(), json!(fleet.connect_seconds));
            let cursors = fleet.close().await;
            let before: Vec<i64> = cursors.iter().map(|c| c.load(Ordering::Relaxed)).collect();
            let away = Instant::now();
            let mut published = 0;
            for _ in 0..messages {
                match target
                    .publish(json!({"topic": "bench-storm"}), stats.micros())
                    .await
                {
                    Ok(n) => published += n,
                    Err(e) => stats.error(format!("{e:#}")),
                }
            }
            r.insert("published_while_away".into(), json!(published));
            r.insert(
                "publish_while_away_seconds".into(),
                json!(away.elapsed().as_secs_f64()),
            );
            if let Some(command) = restart_command.filter(|_| restart) {
                let restarting = Instant::now();
                let pid = restart_server(&command).await?;
                r.insert(
                    "restart_seconds".into(),
                    json!(restarting.elapsed().as_secs_f64()),
                );
                common.server_pid = vec![pid];
                r.insert(
                    "server_rss_after_restart_kib".into(),
                    json!(rss_kib(&common.server_pid)),
                );
            }
            let cpu = CpuWindow::start(&common.server_pid);
            // Latency here would count the time away; only catch-up time matters.
            let storm = Instant::now();
            let delivered_before = stats.delivered.load(Ordering::Relaxed);
            let fleet = open_fleet(&target, &stats, &common, clients, None, Some(cursors)).await;
            r.insert("reconnected".into(), json!(fleet.connected));
            r.insert("reconnect_seconds".into(), json!(fleet.connect_seconds));
            r.insert(
                "reconnect_per_second".into(),
                json!(fleet.connected as f64 / fleet.connect_seconds),
            );
            let (all, at) = wait_delivered(
                &stats,
                delivered_before + published,
                wait_limit,
                stall_limit,
            )
            .await;
            r.insert(
                "catch_up_seconds".into(),
                json!(all.then(|| (at - storm).as_secs_f64())),
            );
            let missing: i64 = fleet
                .cursors
                .iter()
                .zip(&before)
                .map(|(c, b)| (b + messages as i64 - c.load(Ordering::Relaxed)).max(0))
                .sum();
            r.insert("messages_lost".into(), json!(missing));
            tokio::time::sleep(ACK_SETTLE).await;
            cpu.report(
                r,
                &common.server_pid,
                stats.delivered.load(Ordering::Relaxed) - delivered_before,
            );
            r.insert("server_rss_kib".into(), json!(rss_kib(&common.server_pid)));
            fleet.close().await;
            stats.latency.lock().unwrap().reset();
        }
    }

    r.insert(
        "delivered".into(),
        json!(stats.delivered.load(Ordering::Relaxed)),
    );
    r.insert("acked".into(), json!(stats.acked.load(Ordering::Relaxed)));
    r.insert(
        "duplicates".into(),
        json!(stats.duplicates.load(Ordering::Relaxed)),
    );
    r.insert("gaps".into(), json!(stats.gaps.load(Ordering::Relaxed)));
    r.insert("errors".into(), json!(stats.errors.load(Ordering::Relaxed)));
    r.insert(
        "first_error".into(),
        json!(*stats.first_error.lock().unwrap()),
    );
    r.insert("latency".into(), latency_report(&stats));
    r.insert(
        "wall_seconds".into(),
        json!(stats.started.elapsed().as_secs_f64()),
    );
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &common.out {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

struct TargetedRun {
    connections: usize,
    messages: u64,
    rate: u64,
    wait_limit: Duration,
    stall_limit: Duration,
}

/// Throughput and latency: targeted publishes to random devices of the fleet.
async fn targeted(
    target: &Arc<Target>,
    stats: &Arc<Stats>,
    common: &Common,
    r: &mut serde_json::Map<String, serde_json::Value>,
    run: TargetedRun,
) {
    let TargetedRun {
        connections,
        messages,
        rate,
        wait_limit,
        stall_limit,
    } = run;
    let fleet = open_fleet(target, stats, common, connections, None, None).await;
    r.insert(
        "connections_held".into(),
        json!(stats.alive.load(Ordering::Relaxed)),
    );
    r.insert("connect_seconds".into(), json!(fleet.connect_seconds));
    let prefix = common.device_prefix.clone();
    let key = match common.to {
        Addressee::Device => "device",
        Addressee::User => "user",
    };
    let n = connections.max(1) as u64;
    let cpu = CpuWindow::start(&common.server_pid);
    // A fixed multiplicative step spreads consecutive messages over the devices.
    let started = Instant::now();
    let (published, publish_seconds) = publish_paced(
        target,
        stats,
        common.publish_concurrency,
        messages,
        rate,
        |i| json!({key: format!("{prefix}-{}", i.wrapping_mul(7_919) % n)}),
    )
    .await;
    let (all, last_delivery) = wait_delivered(stats, published, wait_limit, stall_limit).await;
    let elapsed = last_delivery - started;
    r.insert("rate_asked".into(), json!(rate));
    r.insert("published".into(), json!(published));
    r.insert(
        "publish_per_second".into(),
        json!(published as f64 / publish_seconds),
    );
    r.insert("all_delivered".into(), json!(all));
    r.insert(
        "delivered_per_second".into(),
        json!(stats.delivered.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64()),
    );
    r.insert(
        "acked_per_second".into(),
        json!(stats.acked.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64()),
    );
    // The acks of the last deliveries are still on their way: let them in, then count
    // the server's CPU over publish + delivery + acks, per delivered message.
    tokio::time::sleep(ACK_SETTLE).await;
    cpu.report(
        r,
        &common.server_pid,
        stats.delivered.load(Ordering::Relaxed),
    );
    r.insert(
        "ack_requests".into(),
        json!(stats.ack_requests.load(Ordering::Relaxed)),
    );
    r.insert("server_rss_kib".into(), json!(rss_kib(&common.server_pid)));
    fleet.close().await;
}
