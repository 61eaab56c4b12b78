//! `TestGateway`: the real gateway on 127.0.0.1:0 with a temporary SQLite store and
//! recording push providers, for integration tests here and in the SDK.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use herald_protocol::{PublishRequest, PublishResponse, PushProviderKind};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::AppState;
use crate::auth::Scope;
use crate::config::Config;
use crate::push::stub::StubProvider;
use crate::push::PushProvider;
use crate::registry::KickReason;
use crate::Application;

pub struct TestGateway {
    pub base_url: String,
    /// `http://` base of the `ops.listen` listener, when the config sets one.
    pub ops_url: Option<String>,
    pub api_key: String,
    pub data_dir: PathBuf,
    pub config: Config,
    pub apns: StubProvider,
    pub fcm: StubProvider,
    pub state: AppState,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _tmp: Arc<TempDir>,
}

/// Removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl TestGateway {
    pub async fn start() -> TestGateway {
        TestGateway::start_with(|_| {}).await
    }

    /// The gateway with the compatibility values `auth.topic_policy = "open"` and
    /// `auth.require_device_claim = false`, because the SDK's and the delivery tests'
    /// devices mint user-wide tokens and subscribe freely; `customize` sees them and
    /// may set the product defaults back (the security tests do: `start_secure_with`).
    pub async fn start_with(customize: impl FnOnce(&mut Config)) -> TestGateway {
        let tmp = Arc::new(TempDir::new("herald-test"));
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: tmp.0.clone(),
            ..Config::default()
        };
        config.auth.topic_policy = crate::config::TopicPolicy::Open;
        config.auth.require_device_claim = false;
        customize(&mut config);
        let apns = StubProvider::new(PushProviderKind::Apns);
        let fcm = StubProvider::new(PushProviderKind::Fcm);
        let (state, stop, task, addr, ops_addr) = launch(config.clone(), &apns, &fcm).await;
        config.listen = addr;
        if let Some(ops) = ops_addr {
            config.ops.listen = Some(ops);
        }
        let (_, api_key) =
            crate::auth::create_api_key(state.store.as_ref(), "test", &[Scope::Admin])
                .await
                .expect("create api key");
        TestGateway {
            base_url: format!("http://{addr}"),
            ops_url: ops_addr.map(|a| format!("http://{a}")),
            api_key,
            data_dir: tmp.0.clone(),
            config,
            apns,
            fcm,
            state,
            stop: Some(stop),
            task: Some(task),
            _tmp: tmp,
        }
    }

    /// The gateway with the product's security defaults (`auth.topic_policy =
    /// "claims"`, `auth.require_device_claim = true`), then `customize`.
    pub async fn start_secure_with(customize: impl FnOnce(&mut Config)) -> TestGateway {
        TestGateway::start_with(|c| {
            let defaults = crate::config::AuthConfig::default();
            c.auth.topic_policy = defaults.topic_policy;
            c.auth.require_device_claim = defaults.require_device_claim;
            customize(c)
        })
        .await
    }

    /// A new API key with these scopes.
    pub async fn create_key(&self, scopes: &[Scope]) -> String {
        crate::auth::create_api_key(self.state.store.as_ref(), "scoped", scopes)
            .await
            .expect("create api key")
            .1
    }

    /// A token bound to `device` (its `did`) that may subscribe to `topics`.
    pub fn mint_device_token(
        &self,
        user: &str,
        device: &str,
        topics: &[&str],
        ttl: Duration,
    ) -> String {
        let grant = crate::auth::Grant {
            device_id: Some(device.to_owned()),
            topics: Some(topics.iter().map(|t| t.to_string()).collect()),
        };
        self.state
            .tokens
            .mint_grant(user, &grant, ttl.as_secs().max(1))
            .expect("HS256 gateway mints")
            .0
    }

    /// `ws://` URL of the connect route for `device_id`.
    pub fn ws_url(&self, device_id: &str, after: Option<i64>) -> String {
        let mut url = format!(
            "{}/v1/connect?device_id={device_id}",
            self.base_url.replacen("http://", "ws://", 1)
        );
        if let Some(a) = after {
            url.push_str(&format!("&after={a}"));
        }
        url
    }

    pub fn mint_token(&self, user: &str, ttl: Duration) -> String {
        self.state
            .tokens
            .mint(user, ttl.as_secs().max(1))
            .expect("HS256 gateway mints")
            .0
    }

    /// Publishes over real HTTP; panics unless the gateway answers 202.
    pub async fn publish(&self, req: &PublishRequest) -> PublishResponse {
        let resp = reqwest_post(
            &format!("{}/v1/messages", self.base_url),
            &self.api_key,
            req,
        )
        .await;
        assert_eq!(resp.0, 202, "publish failed: {}", resp.1);
        serde_json::from_str(&resp.1).expect("publish response")
    }

    /// Closes the device's live session from the server side, abruptly.
    pub fn kick(&self, device_id: &str) -> bool {
        self.state.registry.kick(device_id, KickReason::Kicked)
    }

    /// Stops and starts again on the same data directory and port.
    pub async fn restart(&mut self) {
        self.shutdown().await;
        let (state, stop, task, _, _) = launch(self.config.clone(), &self.apns, &self.fcm).await;
        self.state = state;
        self.stop = Some(stop);
        self.task = Some(task);
    }

    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn launch(
    config: Config,
    apns: &StubProvider,
    fcm: &StubProvider,
) -> (
    AppState,
    oneshot::Sender<()>,
    JoinHandle<anyhow::Result<()>>,
    std::net::SocketAddr,
    Option<std::net::SocketAddr>,
) {
    // Stubs record pushes, unless the test configured a real provider (e.g. FCM
    // pointed at a mock server).
    let mut providers: Vec<Arc<dyn PushProvider>> = Vec::new();
    match &config.push.apns {
        Some(cfg) => providers.push(cfg.build().expect("apns config")),
        None => providers.push(Arc::new(apns.clone())),
    }
    match &config.push.fcm {
        Some(cfg) => providers.push(cfg.build().expect("fcm config")),
        None => providers.push(Arc::new(fcm.clone())),
    }
    // Rebinding the same port right after a stop can briefly fail; retry a little.
    let mut attempt = 0;
    let app = loop {
        match Application::build_with(config.clone(), providers.clone()).await {
            Ok(app) => break app,
            Err(e) if attempt < 50 => {
                attempt += 1;
                tracing::debug!(error = %e, "gateway start failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("gateway did not start: {e:#}"),
        }
    };
    let addr = app.local_addr();
    let ops_addr = app.ops_addr();
    let state = app.state().clone();
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    (state, stop, task, addr, ops_addr)
}

/// Minimal HTTP/1.1 POST over a TCP socket, so the library does not need an HTTP
/// client dependency just for tests. Returns (status, body).
pub async fn reqwest_post(url: &str, bearer: &str, body: &impl serde::Serialize) -> (u16, String) {
    http_request(
        "POST",
        url,
        bearer,
        Some(&serde_json::to_string(body).unwrap()),
    )
    .await
}

pub async fn http_request(
    method: &str,
    url: &str,
    bearer: &str,
    body: Option<&str>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .expect("connect gateway");
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {bearer}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(req.as_bytes())
        .await
        .expect("write request");
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.expect("read response");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
