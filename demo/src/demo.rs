//! `herald-demo`: the delivery story on one machine, checked as it runs.
//!
//! Everything is real except the device's network and the push provider: a gateway on
//! a temporary SQLite directory (127.0.0.1:0, short ack timeout), a device on the real
//! SDK (`herald-sdk`) connecting over a real WebSocket, and a backend talking plain HTTP.
//! The device connects through a TCP relay the demo can silence, which is how a phone
//! going into a tunnel looks to the gateway: the socket stays open, nothing arrives. The
//! push provider renders what APNs/FCM would receive with the gateway's own payload
//! builders and answers "accepted".
//!
//! Each step checks what it tells, with bounded waits; the first surprise ends the demo
//! with an error, so a broken delivery path cannot print a happy story.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use async_trait::async_trait;
use herald_protocol::{
    ApnsEnvironment, DeliveryRecord, DeliveryState, DeviceInfo, InboxMessage, MessageStatus,
    Notification, PublishRequest, PublishResponse, PushProviderKind, PushTokenState, Target,
    TokenRequest, TokenResponse,
};
use herald_sdk::{ConnectionState, HeraldClient, Listener};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

use herald_gateway::config::Config;
use herald_gateway::push::apns::build_apns_message;
use herald_gateway::push::fcm::{build_fcm_message, FcmOptions};
use herald_gateway::push::{PushOutcome, PushProvider, PushRequest};
use herald_gateway::Application;

const USER: &str = "alice";
const DEVICE: &str = "phone-1";
/// Short, so the push fallback of a silent device happens within the demo's seconds.
const ACK_TIMEOUT: Duration = Duration::from_millis(1500);
/// Upper bound of every wait for something the story expects to happen.
const STEP_WAIT: Duration = Duration::from_secs(15);
const APNS_TOPIC: &str = "com.example.herald-demo";
const FCM_PROJECT: &str = "herald-demo";
/// Shaped like real tokens (APNs: 32 bytes hex), never sent anywhere.
const DEMO_APNS_TOKEN: &str = "5f2d8c0e7a1b4c6d9e3f0a2b4c6d8e0f1a3b5c7d9e1f3a5b7c9d1e3f5a7b9c1d";
const DEMO_FCM_TOKEN: &str = "demo-fcm-registration-token";

pub struct DemoOptions {
    /// Whose payload the push step shows.
    pub platform: PushProviderKind,
    /// Leave the temporary directory in place (its path is printed).
    pub keep: bool,
}

/// Runs the story; `Err` says which step did not behave as told.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = DemoDir::create(opts.keep)?;
    println!(
        "Herald demo: a gateway, a phone on the Rust SDK and a push provider, all on this machine."
    );
    println!(
        "Data directory: {} ({})",
        dir.path.display(),
        if opts.keep {
            "kept at exit because of --keep"
        } else {
            "removed at exit; --keep keeps it"
        }
    );
    let (push_tx, pushes) = mpsc::unbounded_channel();
    let provider = Arc::new(RenderingPushProvider {
        kind: opts.platform,
        rendered: push_tx,
    });
    let gateway = DemoGateway::start(&dir.path, provider).await?;
    let result = story(&opts, &dir.path, &gateway, pushes).await;
    gateway.stop().await;
    let dir_path = dir.path.clone();
    let removed = dir.finish();
    match result {
        Ok(()) => {
            match removed {
                Some(path) => println!("Removed the data directory {}.", path.display()),
                None if opts.keep => {
                    println!("Kept the data directory {}.", dir_path.display())
                }
                None => {}
            }
            println!(
                "Demo complete in {:.1} s: every step behaved as described.",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err(e) => Err(e.context(
            "the demo's story did not hold; rerun with HERALD_LOG=debug to see the gateway's side",
        )),
    }
}

async fn story(
    opts: &DemoOptions,
    dir: &Path,
    gateway: &DemoGateway,
    mut pushes: mpsc::UnboundedReceiver<RenderedPush>,
) -> anyhow::Result<()> {
    let platform = opts.platform;
    let backend = Backend::new(&gateway.base_url, &gateway.api_key)?;

    step(1, "Gateway started");
    println!(
        "    listening on {} (SQLite in {}/gateway)",
        gateway.base_url,
        dir.display()
    );
    println!(
        "    ack timeout {} ms: a live message not acked by then goes to push",
        ACK_TIMEOUT.as_millis()
    );
    println!(
        "    backend API key {}… created; a device token for user {USER} and device {DEVICE} minted with POST /v1/tokens",
        &gateway.api_key[..10]
    );
    let token = backend
        .mint_token(USER)
        .await
        .context("step 1: mint a device token")?;

    step(2, "The device connects");
    let relay = NetworkRelay::start(gateway.addr).await?;
    let mut device = Device::start(&relay.base_url(), &dir.join("device"), token)?;
    let (push_token, environment) = match platform {
        PushProviderKind::Apns => (DEMO_APNS_TOKEN, Some(ApnsEnvironment::Sandbox)),
        PushProviderKind::Fcm => (DEMO_FCM_TOKEN, None),
    };
    device
        .register_push_token(platform, push_token, environment)
        .await
        .context("step 2: register the push token")?;
    println!(
        "    {DEVICE} (user {USER}) registered its {} token with PUT /v1/me/devices/{DEVICE}",
        provider_name(platform)
    );
    device.client.connect();
    device.wait_connected().await.context("step 2: connect")?;
    let info = backend.device(DEVICE).await?;
    if !info.online || info.push_token != PushTokenState::Active {
        bail!("step 2: the gateway reports {DEVICE} online={} push_token={:?}; expected online with an active push token", info.online, info.push_token);
    }
    println!("    gateway: {DEVICE} online, push token active");

    step(3, "A message delivered live and acked");
    let first = backend
        .publish(json!({"text": "hello, live"}), None)
        .await
        .context("step 3: publish")?;
    println!(
        "    backend: POST /v1/messages → 202, message {}",
        first.message_id
    );
    let got = device
        .next_message()
        .await
        .context("step 3: live delivery")?;
    expect_message(&got, &first.message_id, 1).context("step 3")?;
    println!(
        "    {DEVICE} received seq {} {} live over the WebSocket: {}",
        got.seq, got.id, got.data
    );
    let record = backend
        .wait_for_state(&first.message_id, DeliveryState::Acked)
        .await
        .context("step 3: the SDK's ack")?;
    println!(
        "    the SDK acked it after the app's callback returned; gateway: {} at {}",
        record.state.as_str(),
        time_of_day(record.acked_at.as_deref())
    );

    step(4, "The device goes offline");
    relay.set_online(false);
    println!("    the phone enters a tunnel: its socket stays open but no byte gets through");
    println!("    (the demo's relay between the SDK and the gateway drops everything from now on)");

    step(5, "A message falls back to push");
    let second = backend
        .publish(
            json!({"text": "while you were away"}),
            Some(Notification {
                title: Some("Herald demo".into()),
                body: Some("A message while you were away".into()),
                ..Notification::default()
            }),
        )
        .await
        .context("step 5: publish")?;
    println!(
        "    backend: POST /v1/messages → 202, message {}",
        second.message_id
    );
    println!(
        "    the gateway writes it to the open session and waits up to {} ms for an ack…",
        ACK_TIMEOUT.as_millis()
    );
    let push = tokio::time::timeout(STEP_WAIT + ACK_TIMEOUT, pushes.recv())
        .await
        .map_err(|_| {
            anyhow!(
                "step 5: no push within {} s of the ack timeout",
                STEP_WAIT.as_secs()
            )
        })?
        .ok_or_else(|| anyhow!("step 5: the push provider is gone"))?;
    if push.message_id != second.message_id || push.seq != 2 {
        bail!(
            "step 5: the push was for {} seq {}, expected {} seq 2",
            push.message_id,
            push.seq,
            second.message_id
        );
    }
    println!(
        "    no ack came: the gateway closed the session (ack_timeout) and handed seq 2 to push"
    );
    println!(
        "    {} would receive (body pretty-printed here):",
        provider_name(platform)
    );
    push.print();
    let record = backend
        .wait_for_state(&second.message_id, DeliveryState::Pushed)
        .await
        .context("step 5: the push outcome")?;
    println!(
        "    gateway: {} via {} at {}",
        record.state.as_str(),
        record.push_provider.as_deref().unwrap_or("?"),
        time_of_day(record.pushed_at.as_deref())
    );
    device
        .expect_no_message()
        .context("step 5: the device was offline")?;

    step(6, "The device comes back and catches up");
    relay.set_online(true);
    println!("    network back: the SDK reconnects by itself and resumes after its stored cursor (seq 1)");
    device.wait_connected().await.context("step 6: reconnect")?;
    let got = device.next_message().await.context("step 6: catch-up")?;
    expect_message(&got, &second.message_id, 2).context("step 6")?;
    println!(
        "    {DEVICE} received seq {} {} from the inbox replay: {}",
        got.seq, got.id, got.data
    );
    backend
        .wait_for_state(&second.message_id, DeliveryState::Acked)
        .await
        .context("step 6: the SDK's ack")?;
    println!("    the SDK acked it; the gateway's record keeps both: pushed, then acked");

    step(
        7,
        "Delivery status of each message, as a backend reads it (GET /v1/messages/{id})",
    );
    let mut rows = Vec::new();
    for (label, id) in [
        ("hello, live", &first.message_id),
        ("while you were away", &second.message_id),
    ] {
        let status = backend.status(id).await?;
        let [record] = status.deliveries.as_slice() else {
            bail!(
                "step 7: {id} has {} deliveries, expected 1",
                status.deliveries.len()
            );
        };
        rows.push((label, id.clone(), record.clone()));
    }
    print_table(&rows);
    let (_, _, live) = &rows[0];
    let (_, _, pushed) = &rows[1];
    if live.state != DeliveryState::Acked || live.pushed_at.is_some() {
        bail!("step 7: the live message should be acked and never pushed, got {live:?}");
    }
    if pushed.state != DeliveryState::Acked
        || pushed.pushed_at.is_none()
        || pushed.push_provider.as_deref() != Some(provider_name(platform))
    {
        bail!(
            "step 7: the offline message should be pushed via {} and then acked, got {pushed:?}",
            provider_name(platform)
        );
    }

    device.close().await;
    drop(relay);
    Ok(())
}

fn step(n: u32, title: &str) {
    println!("\n[{n}] {title}");
}

fn provider_name(kind: PushProviderKind) -> &'static str {
    match kind {
        PushProviderKind::Apns => "apns",
        PushProviderKind::Fcm => "fcm",
    }
}

fn expect_message(got: &InboxMessage, id: &str, seq: i64) -> anyhow::Result<()> {
    if got.id != id || got.seq != seq {
        bail!(
            "the device received {} seq {}, expected {id} seq {seq}",
            got.id,
            got.seq
        );
    }
    Ok(())
}

/// `HH:MM:SS.mmm` of an RFC 3339 time, or `-`.
fn time_of_day(rfc3339: Option<&str>) -> &str {
    rfc3339.and_then(|t| t.get(11..23)).unwrap_or("-")
}

fn print_table(rows: &[(&str, String, DeliveryRecord)]) {
    let header = format!(
        "    {:<36}  {:<21}  {:<7}  {:>3}  {:<6}  {:<12}  {:<18}  {:<12}",
        "message", "data.text", "device", "seq", "state", "sent", "pushed", "acked"
    );
    println!("{}", header.trim_end());
    for (label, id, r) in rows {
        let pushed = match (&r.pushed_at, &r.push_provider) {
            (Some(at), Some(p)) => format!("{} ({p})", time_of_day(Some(at))),
            _ => "-".to_string(),
        };
        println!(
            "    {:<36}  {:<21}  {:<7}  {:>3}  {:<6}  {:<12}  {:<18}  {:<12}",
            id,
            format!("\"{label}\""),
            r.device_id,
            r.seq,
            r.state.as_str(),
            time_of_day(r.sent_at.as_deref()),
            pushed,
            time_of_day(r.acked_at.as_deref()),
        );
    }
}

/// The temporary directory of one demo run; removed unless `keep`.
struct DemoDir {
    path: PathBuf,
    keep: bool,
}

impl DemoDir {
    fn create(keep: bool) -> anyhow::Result<DemoDir> {
        let path = std::env::temp_dir().join(format!(
            "herald-demo-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&path).with_context(|| {
            format!(
                "cannot create {}; set TMPDIR to a writable directory",
                path.display()
            )
        })?;
        Ok(DemoDir { path, keep })
    }

    /// Removes the directory unless kept; returns its path if it was removed.
    fn finish(mut self) -> Option<PathBuf> {
        if self.keep {
            return None;
        }
        self.keep = true;
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => Some(self.path.clone()),
            Err(e) => {
                eprintln!("warning: could not remove {}: {e}", self.path.display());
                None
            }
        }
    }
}

impl Drop for DemoDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The gateway of the demo, served on 127.0.0.1:0 until `stop`.
struct DemoGateway {
    addr: SocketAddr,
    base_url: String,
    api_key: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl DemoGateway {
    async fn start(dir: &Path, provider: Arc<dyn PushProvider>) -> anyhow::Result<DemoGateway> {
        let mut config = Config {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            data_dir: dir.join("gateway"),
            ..Config::default()
        };
        config.delivery.ack_timeout_ms = ACK_TIMEOUT.as_millis() as u64;
        let app = Application::build_with(config, vec![provider])
            .await
            .context("step 1: start the gateway")?;
        let addr = app.local_addr();
        // Only what the demo's backend does: a key per backend role, never `admin`.
        use herald_gateway::auth::Scope;
        let (_, api_key) = herald_gateway::auth::create_api_key(
            app.state().store.as_ref(),
            "demo",
            &[Scope::Publish, Scope::Read, Scope::Tokens],
        )
        .await
        .context("step 1: create an API key")?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        Ok(DemoGateway {
            addr,
            base_url: format!("http://{addr}"),
            api_key,
            stop,
            task,
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        match tokio::time::timeout(Duration::from_secs(15), self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("warning: the gateway stopped with an error: {e:#}"),
            Ok(Err(e)) => eprintln!("warning: the gateway task failed: {e}"),
            Err(_) => eprintln!("warning: the gateway did not stop within 15 s"),
        }
    }
}

/// What APNs or FCM would receive for one push: built by the same functions the real
/// providers send with.
struct RenderedPush {
    message_id: String,
    seq: i64,
    request_line: String,
    headers: Vec<(String, String)>,
    body: Value,
}

impl RenderedPush {
    fn render(req: &PushRequest, now: i64) -> RenderedPush {
        let (request_line, headers, body) = match req.provider {
            PushProviderKind::Fcm => (
                format!(
                    "POST {}/v1/projects/{FCM_PROJECT}/messages:send",
                    FcmOptions::DEFAULT_BASE_URL
                ),
                vec![("content-type".to_string(), "application/json".to_string())],
                build_fcm_message(req, now),
            ),
            PushProviderKind::Apns => {
                let msg = build_apns_message(req, APNS_TOPIC);
                let host = match req.apns_environment {
                    Some(ApnsEnvironment::Production) => "api.push.apple.com",
                    _ => "api.sandbox.push.apple.com",
                };
                let body = serde_json::from_str(&msg.body_json())
                    .expect("the APNs payload builder writes JSON");
                (
                    format!("POST https://{host}/3/device/{}", req.token),
                    msg.headers()
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                    body,
                )
            }
        };
        RenderedPush {
            message_id: req.message_id.clone(),
            seq: req.seq,
            request_line,
            headers,
            body,
        }
    }

    fn print(&self) {
        println!("      {}", self.request_line);
        for (name, value) in &self.headers {
            println!("      {name}: {value}");
        }
        let body = serde_json::to_string_pretty(&self.body).expect("JSON value serializes");
        for line in body.lines() {
            println!("      {line}");
        }
    }
}

/// A push provider that renders each push as the real provider would send it, hands
/// it to the story, and answers "accepted".
struct RenderingPushProvider {
    kind: PushProviderKind,
    rendered: mpsc::UnboundedSender<RenderedPush>,
}

#[async_trait]
impl PushProvider for RenderingPushProvider {
    fn kind(&self) -> PushProviderKind {
        self.kind
    }

    async fn send(&self, req: &PushRequest) -> PushOutcome {
        let _ = self.rendered.send(RenderedPush::render(
            req,
            herald_gateway::clock::now_ms() / 1000,
        ));
        PushOutcome::Delivered
    }
}

/// The backend's side: plain HTTP with the API key.
struct Backend {
    http: reqwest::Client,
    base: String,
    api_key: String,
}

impl Backend {
    fn new(base: &str, api_key: &str) -> anyhow::Result<Backend> {
        Ok(Backend {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            base: base.to_string(),
            api_key: api_key.to_string(),
        })
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
        expect: u16,
    ) -> anyhow::Result<T> {
        let resp = request
            .bearer_auth(&self.api_key)
            .send()
            .await
            .with_context(|| format!("{what}: request failed"))?;
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        if status != expect {
            bail!("{what} answered {status} (expected {expect}): {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("{what}: unexpected answer {body}"))
    }

    async fn mint_token(&self, user: &str) -> anyhow::Result<String> {
        let req = TokenRequest {
            user: user.to_string(),
            ttl_seconds: Some(3600),
            // Bound to the demo's one device: device routes refuse other tokens.
            device_id: Some(DEVICE.to_string()),
            topics: None,
        };
        let resp: TokenResponse = self
            .call(
                self.http
                    .post(format!("{}/v1/tokens", self.base))
                    .json(&req),
                "POST /v1/tokens",
                200,
            )
            .await?;
        Ok(resp.token)
    }

    async fn publish(
        &self,
        data: Value,
        notification: Option<Notification>,
    ) -> anyhow::Result<PublishResponse> {
        let mut req = PublishRequest::new(Target::User(USER.to_string()), data);
        req.notification = notification;
        let resp: PublishResponse = self
            .call(
                self.http
                    .post(format!("{}/v1/messages", self.base))
                    .json(&req),
                "POST /v1/messages",
                202,
            )
            .await?;
        if resp.recipients != 1 {
            bail!(
                "POST /v1/messages reached {} devices, expected {DEVICE} alone",
                resp.recipients
            );
        }
        Ok(resp)
    }

    async fn status(&self, message_id: &str) -> anyhow::Result<MessageStatus> {
        self.call(
            self.http
                .get(format!("{}/v1/messages/{message_id}", self.base)),
            "GET /v1/messages/{id}",
            200,
        )
        .await
    }

    async fn device(&self, device_id: &str) -> anyhow::Result<DeviceInfo> {
        self.call(
            self.http
                .get(format!("{}/v1/devices/{device_id}", self.base)),
            "GET /v1/devices/{id}",
            200,
        )
        .await
    }

    /// Polls the message's delivery to the demo device until it is in `want`.
    async fn wait_for_state(
        &self,
        message_id: &str,
        want: DeliveryState,
    ) -> anyhow::Result<DeliveryRecord> {
        let deadline = Instant::now() + STEP_WAIT;
        loop {
            let status = self.status(message_id).await?;
            let record = status
                .deliveries
                .into_iter()
                .find(|d| d.device_id == DEVICE)
                .ok_or_else(|| anyhow!("{message_id} has no delivery to {DEVICE}"))?;
            if record.state == want {
                return Ok(record);
            }
            if record.state == DeliveryState::PushFailed {
                bail!(
                    "{message_id} is push_failed ({}), expected {}",
                    record.reason.as_deref().unwrap_or("no reason given"),
                    want.as_str()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{message_id} is still {} after {} s, expected {}",
                    record.state.as_str(),
                    STEP_WAIT.as_secs(),
                    want.as_str()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

enum DeviceEvent {
    State(ConnectionState),
    Message(InboxMessage),
    Error { error: String, terminal: bool },
}

/// Hands the SDK's callbacks to the story.
struct Forwarder(mpsc::UnboundedSender<DeviceEvent>);

impl Listener for Forwarder {
    fn on_state_changed(&self, state: ConnectionState) {
        let _ = self.0.send(DeviceEvent::State(state));
    }
    fn on_message(&self, message: InboxMessage) {
        let _ = self.0.send(DeviceEvent::Message(message));
    }
    fn on_error(&self, error: herald_sdk::Error, terminal: bool) {
        let _ = self.0.send(DeviceEvent::Error {
            error: error.to_string(),
            terminal,
        });
    }
}

/// The simulated phone: a `HeraldClient` and the events of its listener.
struct Device {
    client: Arc<HeraldClient>,
    events: mpsc::UnboundedReceiver<DeviceEvent>,
}

impl Device {
    fn start(base_url: &str, data_dir: &Path, token: String) -> anyhow::Result<Device> {
        let mut config = herald_sdk::Config::new(base_url, DEVICE, data_dir);
        // Quick retries, so coming back online shows within a second.
        config.backoff_min = Duration::from_millis(200);
        config.backoff_max = Duration::from_secs(1);
        config.connect_timeout = Duration::from_secs(3);
        let (tx, events) = mpsc::unbounded_channel();
        let client = HeraldClient::new(
            config,
            Arc::new(Forwarder(tx)),
            // The demo's token is minted for DEVICE already (its `did`).
            Arc::new(move |_: &str| Ok::<_, String>(token.clone())),
        )
        .context("step 2: start the SDK client")?;
        Ok(Device {
            client: Arc::new(client),
            events,
        })
    }

    async fn register_push_token(
        &self,
        kind: PushProviderKind,
        token: &str,
        environment: Option<ApnsEnvironment>,
    ) -> anyhow::Result<()> {
        let client = self.client.clone();
        let token = token.to_string();
        // The SDK call blocks until the gateway answers.
        tokio::task::spawn_blocking(move || client.register_push_token(kind, &token, environment))
            .await??;
        Ok(())
    }

    /// Next event within `STEP_WAIT`; prints connection changes; fails on a terminal error.
    async fn next_event(&mut self, deadline: Instant) -> anyhow::Result<DeviceEvent> {
        let event = tokio::time::timeout_at(deadline.into(), self.events.recv())
            .await
            .map_err(|_| {
                anyhow!(
                    "nothing happened on {DEVICE} within {} s",
                    STEP_WAIT.as_secs()
                )
            })?
            .ok_or_else(|| anyhow!("the SDK client stopped"))?;
        match &event {
            DeviceEvent::State(ConnectionState::Connected { .. }) => {
                println!("    {DEVICE}: connected (WebSocket open, welcome received)")
            }
            DeviceEvent::State(ConnectionState::WaitingToReconnect { delay_ms }) => {
                println!("    {DEVICE}: connection lost, the SDK retries in {delay_ms} ms")
            }
            DeviceEvent::Error {
                error,
                terminal: true,
            } => bail!("the SDK gave up: {error}"),
            _ => {}
        }
        Ok(event)
    }

    async fn wait_connected(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + STEP_WAIT;
        loop {
            match self.next_event(deadline).await? {
                DeviceEvent::State(ConnectionState::Connected { .. }) => return Ok(()),
                DeviceEvent::Message(m) => bail!(
                    "{DEVICE} received {} seq {} before it reported connected",
                    m.id,
                    m.seq
                ),
                _ => {}
            }
        }
    }

    async fn next_message(&mut self) -> anyhow::Result<InboxMessage> {
        let deadline = Instant::now() + STEP_WAIT;
        loop {
            if let DeviceEvent::Message(m) = self.next_event(deadline).await? {
                return Ok(m);
            }
        }
    }

    /// Fails if a message reached the app (drains what the SDK reported so far).
    fn expect_no_message(&mut self) -> anyhow::Result<()> {
        while let Ok(event) = self.events.try_recv() {
            match event {
                DeviceEvent::Message(m) => {
                    bail!("{DEVICE} received {} seq {} while offline", m.id, m.seq)
                }
                DeviceEvent::State(ConnectionState::WaitingToReconnect { delay_ms }) => {
                    println!("    {DEVICE}: connection lost, the SDK retries in {delay_ms} ms")
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn close(self) {
        let client = self.client;
        let _ = tokio::task::spawn_blocking(move || client.close()).await;
    }
}

/// The device's network: a TCP relay between the SDK and the gateway. Offline, it
/// drops every byte both ways (open sockets stay open, as in a tunnel) and hangs up
/// new connections at once. A side that closes is still passed on, so the SDK learns
/// when the gateway gives up on the session.
struct NetworkRelay {
    addr: SocketAddr,
    online: Arc<AtomicBool>,
    accept: JoinHandle<()>,
}

impl NetworkRelay {
    async fn start(gateway: SocketAddr) -> anyhow::Result<NetworkRelay> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("step 2: bind the device's network relay on 127.0.0.1")?;
        let addr = listener.local_addr()?;
        let online = Arc::new(AtomicBool::new(true));
        let accept_online = online.clone();
        let accept = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((device, _)) = listener.accept().await {
                if accept_online.load(Ordering::SeqCst) {
                    connections.spawn(relay_connection(device, gateway, accept_online.clone()));
                }
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(NetworkRelay {
            addr,
            online,
            accept,
        })
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set_online(&self, online: bool) {
        self.online.store(online, Ordering::SeqCst);
    }
}

impl Drop for NetworkRelay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn relay_connection(device: TcpStream, gateway: SocketAddr, online: Arc<AtomicBool>) {
    let Ok(upstream) = TcpStream::connect(gateway).await else {
        return;
    };
    let (device_read, device_write) = device.into_split();
    let (gateway_read, gateway_write) = upstream.into_split();
    tokio::join!(
        pass_bytes(device_read, gateway_write, online.clone()),
        pass_bytes(gateway_read, device_write, online),
    );
}

async fn pass_bytes(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, online: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if online.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}
