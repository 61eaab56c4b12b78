//! Settings: defaults, then a TOML file, then `HERALD_*` environment variables.
//!
//! Env names are the upper-cased TOML path joined by `__` below the top level, e.g.
//! `HERALD_LISTEN`, `HERALD_DATA_DIR`, `HERALD_LIMITS__MAX_MESSAGE_BYTES`,
//! `HERALD_AUTH__JWT_ISSUER`. Every setting can be overridden that way. A list
//! setting takes one comma-separated value (`HERALD_SERVER__TRUSTED_PROXIES`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP/WebSocket server binds.
    pub listen: SocketAddr,
    /// Where the embedded SQLite store lives.
    pub data_dir: PathBuf,
    /// Which store to use: "sqlite" (embedded default) or "postgres" (shared by
    /// several nodes; needs `database_url`).
    pub store: String,
    /// PostgreSQL URL for `store = "postgres"`, e.g.
    /// `postgres://herald:secret@db:5432/herald` (env `HERALD_DATABASE_URL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// How nodes tell each other about live sessions: "local" (one node, the default)
    /// or "nats" (cluster mode; needs `store = "postgres"` and the `[nats]` section).
    pub bus: String,
    pub nats: NatsConfig,
    /// Public base URL printed in examples (defaults to http://{listen}).
    pub public_url: Option<String>,
    pub auth: AuthConfig,
    pub delivery: DeliveryConfig,
    pub limits: LimitsConfig,
    pub push: PushConfig,
    pub ops: OpsConfig,
    /// Log lines on stderr: `text` (human-readable, the default) or `json` (one JSON
    /// object per line, span fields included; `serve` also prints its stdout lines as
    /// JSON then). Env `HERALD_LOG_FORMAT`. Which lines: `HERALD_LOG` (an
    /// `EnvFilter`, default `info,sqlx=warn`).
    pub log_format: LogFormat,
    /// Delivery webhooks (docs/webhooks.md); off while `webhooks.url` is unset.
    pub webhooks: crate::webhooks::WebhooksConfig,
    pub server: ServerConfig,
}

/// `log_format`: how log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// How the HTTP server sees its clients.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// CIDRs (or addresses) of the proxies/load balancers in front of Herald, e.g.
    /// `["10.0.0.0/8"]` (env `HERALD_SERVER__TRUSTED_PROXIES`, comma-separated). A
    /// request from one of them is attributed to the client its `X-Forwarded-For` (the
    /// rightmost address that is not a trusted proxy) or `Forwarded` header names; per-IP
    /// rate limits and logs use that address. Default: empty, no proxy header is
    /// believed and the TCP peer is the client.
    pub trusted_proxies: crate::proxy::TrustedProxies,
}

/// Where operational endpoints are served and who may read them (docs/security.md).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsConfig {
    /// A second listener for `/metrics` (and `/healthz`, `/readyz`), e.g. an address
    /// only the monitoring network reaches; `/metrics` then leaves the main listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// When set, `/metrics` answers only `Authorization: Bearer <metrics_token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_token: Option<String>,
}

/// Which topics a device may subscribe to itself (`auth.topic_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopicPolicy {
    /// Only topics its token's `topics` claim allows.
    Claims,
    /// None: the backend subscribes devices (`PUT /v1/devices/{id}/topics/{topic}`).
    Server,
    /// Any topic (Herald before the security model; opt-in).
    Open,
}

/// The NATS bus between nodes (`bus = "nats"`); see docs/operations.md.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// NATS server(s), comma-separated, e.g. `nats://10.0.0.5:4222,nats://10.0.0.6:4222`.
    pub url: String,
    /// First token of every subject Herald uses, so several clusters can share a NATS.
    pub subject_prefix: String,
    /// How long a node waits for the node holding a device's session to answer; past
    /// it the device is treated as offline (its entries stay in the inbox regardless).
    pub request_timeout_ms: u64,
    /// Refuse to talk to NATS without TLS (env `HERALD_NATS__TLS_REQUIRED`, default
    /// false). A `tls://` URL or any `tls_*` file below also turns TLS on.
    pub tls_required: bool,
    /// PEM file of the CA(s) that signed the NATS server's certificate; they replace
    /// the system's roots (env `HERALD_NATS__TLS_CA_FILE`; default none: the system's
    /// roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and its key (PEM) for mutual TLS (env
    /// `HERALD_NATS__TLS_CERT_FILE`, `HERALD_NATS__TLS_KEY_FILE`; both or neither).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) of `tls_cert_file` (env `HERALD_NATS__TLS_KEY_FILE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// NATS credentials file (`.creds`: user JWT + NKey seed) for decentralized auth
    /// (env `HERALD_NATS__CREDS_FILE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<PathBuf>,
    /// User and password (env `HERALD_NATS__USER`, `HERALD_NATS__PASSWORD`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Password of `user` (env `HERALD_NATS__PASSWORD`); a secret, redacted by
    /// `herald config print`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Authentication token (env `HERALD_NATS__TOKEN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            subject_prefix: "herald".into(),
            request_timeout_ms: 2_000,
            tls_required: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            creds_file: None,
            user: None,
            password: None,
            token: None,
        }
    }
}

/// Device tokens (JWTs): how they are signed and checked; see docs/security.md.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `HS256` (secret generated on first start, or `jwt_secret`), `RS256` or `ES256`
    /// (`jwt_public_key_file`; Herald then cannot mint tokens itself).
    pub jwt_algorithm: String,
    /// HS256 secret; when unset, one is generated and kept in the store.
    pub jwt_secret: Option<String>,
    /// PEM public key for RS256/ES256.
    pub jwt_public_key_file: Option<PathBuf>,
    /// `iss` claim of minted tokens; tokens with another `iss` are refused.
    pub jwt_issuer: String,
    /// `aud` claim of minted tokens; tokens with another `aud` are refused.
    pub jwt_audience: String,
    /// Lifetime of tokens minted by `POST /v1/tokens` and `herald token mint`.
    pub default_token_ttl_seconds: u64,
    /// Longest lifetime a token may ask for (`ttl_seconds`, `--ttl`) or carry.
    pub max_token_ttl_seconds: u64,
    /// Which topics devices may subscribe to themselves: claims | server | open.
    pub topic_policy: TopicPolicy,
    /// Device routes refuse tokens without a `did` (device id) claim.
    pub require_device_claim: bool,
    /// RS256/ES256: verify with the keys of this JWKS (picked by `kid`) instead of
    /// `jwt_public_key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// How often the JWKS is fetched again; an unknown `kid` also triggers a fetch, at
    /// most once per `jwks_min_refresh_seconds`.
    pub jwks_refresh_seconds: u64,
    /// Least time between two JWKS fetches, however many unknown `kid`s arrive.
    pub jwks_min_refresh_seconds: u64,
}

/// Live delivery over WebSockets, inbox lifetimes and housekeeping.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// A live message not acked within this is handed to push and the session closed.
    pub ack_timeout_ms: u64,
    /// Server heartbeat; a client silent for two of them is dropped.
    pub heartbeat_ms: u64,
    /// Lifetime of a message published without `ttl_seconds`.
    pub default_ttl_seconds: u64,
    /// Largest `ttl_seconds` a publish may ask for (400 past it).
    pub max_ttl_seconds: u64,
    /// Frames queued per session before it is treated as a slow consumer.
    pub session_queue: usize,
    /// Bytes (about the size on the wire) queued per session before it is treated as
    /// a slow consumer; one entry is always let in, however large.
    pub session_queue_bytes: usize,
    /// Longest one WebSocket write may wait for the client to read; past it the
    /// session is closed (1008) and its unacked entries fall back to push.
    pub write_timeout_ms: u64,
    /// Most entries per replay page on connect (the first page asks only for what the
    /// device's `last_seq` says is missing) and max `limit` of `/v1/me/sync`.
    pub replay_batch: u32,
    /// `reconnect.after_ms` sent to clients on graceful shutdown.
    pub shutdown_reconnect_ms: u64,
    /// How often expired inbox entries are marked and old ones deleted.
    pub sweep_interval_ms: u64,
    /// How long acked/expired entries are kept after expiry, for status queries.
    pub retention_seconds: u64,
}

/// Sizes, rates, timeouts and connection caps that protect the gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest `POST /v1/messages` body (413 past it), and largest item of a batch.
    pub max_message_bytes: usize,
    /// Largest `POST /v1/messages/batch` body (413 past it).
    pub max_batch_bytes: usize,
    /// Largest WebSocket frame/message a client may send.
    pub max_ws_frame_bytes: usize,
    /// Read buffer of each WebSocket. tokio-tungstenite's default (128 KiB) would be
    /// most of an idle connection's memory; clients send small frames (acks, pings), and
    /// larger ones still arrive, in several reads. 2 KiB: BENCHMARKS.md.
    pub ws_read_buffer_bytes: usize,
    /// Bytes a WebSocket collects before writing them out; 0 writes each frame at once.
    pub ws_write_buffer_bytes: usize,
    /// Bytes a WebSocket may hold unwritten before sending fails (the session then
    /// closes). tokio-tungstenite's default is unbounded.
    pub ws_max_write_buffer_bytes: usize,
    /// Largest request body of other routes.
    pub max_body_bytes: usize,
    /// Sustained publishes per second per API key (429 past it and the burst).
    pub publish_rate_per_key: u32,
    /// Publishes one API key may send at once above `publish_rate_per_key`.
    pub publish_burst_per_key: u32,
    /// New WebSocket connections per second per client IP.
    pub connect_rate_per_ip: u32,
    /// New WebSocket connections one client IP may open at once above `connect_rate_per_ip`.
    pub connect_burst_per_ip: u32,
    /// Recipients one publish may fan out to (topics).
    pub max_recipients: usize,
    /// Longest a REST request may take; past it the answer is 408 `timeout` (a
    /// `/v1/me/sync` long-poll gets this plus its wait).
    pub request_timeout_ms: u64,
    /// A request head (request line and headers) must be complete this long after the
    /// connection is ready for it: after it opens, or after the previous response on a
    /// keep-alive connection, so this also closes idle keep-alive connections.
    pub header_read_timeout_ms: u64,
    /// An HTTP connection on which no byte moved for this long is closed (slow bodies,
    /// clients that do not read their response). WebSockets have heartbeats instead.
    pub idle_timeout_ms: u64,
    /// Open TCP connections (WebSockets included); past it new ones get 503 and are
    /// closed. 0: the open-file limit minus 64, so the gateway never runs out of
    /// descriptors for its store and health checks.
    pub max_connections: usize,
    /// Open connections per client IP; 0 = no cap. Off by default: behind a load
    /// balancer or carrier NAT many devices share one address.
    pub max_connections_per_ip: usize,
    /// On SIGTERM: how long in-flight requests and sessions get to finish before the
    /// process exits anyway.
    pub shutdown_drain_ms: u64,
    /// Topics one device may be subscribed to.
    pub max_topics_per_device: usize,
    /// Devices one user may own; claiming one more is 409 `conflict`.
    pub max_devices_per_user: usize,
}

/// Push fallback (APNs, FCM) for devices without a live session; see docs/push.md.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Use recording stub providers for APNs and FCM (tests, demo).
    pub stub: bool,
    /// Concurrent pushes in flight.
    pub workers: usize,
    /// Pushes queued in memory; beyond it they wait in the store.
    pub queue: usize,
    /// Attempts before a push is recorded as failed.
    pub max_attempts: u32,
    /// Wait before the first retry of a failed push; doubles with each attempt.
    pub base_backoff_ms: u64,
    /// Longest wait between two attempts of one push.
    pub max_backoff_ms: u64,
    /// How often the store is searched for due retries and orphaned pushes.
    pub poll_interval_ms: u64,
    /// A push claimed longer ago than this was being sent by a node that died: it is
    /// recorded as failed (outcome unknown), never sent twice. Keep it well above the
    /// providers' request timeouts.
    pub stale_claim_ms: u64,
    /// Firebase Cloud Messaging (HTTP v1); see docs/push.md.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fcm: Option<crate::push::config::FcmConfig>,
    /// Apple Push Notification service; see docs/push.md.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apns: Option<crate::push::config::ApnsConfig>,
}

impl Default for PushConfig {
    fn default() -> Self {
        let d = crate::push::dispatcher::PushSettings::default();
        PushConfig {
            stub: false,
            workers: d.workers,
            queue: d.queue,
            max_attempts: d.max_attempts,
            base_backoff_ms: d.base_backoff.as_millis() as u64,
            max_backoff_ms: d.max_backoff.as_millis() as u64,
            poll_interval_ms: d.poll_interval.as_millis() as u64,
            stale_claim_ms: d.stale_claim.as_millis() as u64,
            fcm: None,
            apns: None,
        }
    }
}

impl PushConfig {
    pub fn settings(&self) -> crate::push::dispatcher::PushSettings {
        use std::time::Duration;
        crate::push::dispatcher::PushSettings {
            workers: self.workers,
            queue: self.queue,
            base_backoff: Duration::from_millis(self.base_backoff_ms),
            max_backoff: Duration::from_millis(self.max_backoff_ms),
            max_attempts: self.max_attempts.max(1),
            poll_interval: Duration::from_millis(self.poll_interval_ms.max(10)),
            stale_claim: Duration::from_millis(self.stale_claim_ms.max(1_000)),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".parse().unwrap(),
            data_dir: PathBuf::from("herald-data"),
            store: "sqlite".into(),
            database_url: None,
            bus: "local".into(),
            nats: NatsConfig::default(),
            public_url: None,
            auth: AuthConfig::default(),
            delivery: DeliveryConfig::default(),
            limits: LimitsConfig::default(),
            push: PushConfig::default(),
            ops: OpsConfig::default(),
            log_format: LogFormat::Text,
            webhooks: Default::default(),
            server: ServerConfig::default(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_algorithm: "HS256".into(),
            jwt_secret: None,
            jwt_public_key_file: None,
            jwt_issuer: "herald".into(),
            jwt_audience: "herald-device".into(),
            default_token_ttl_seconds: 3600,
            max_token_ttl_seconds: 30 * 24 * 3600,
            topic_policy: TopicPolicy::Claims,
            require_device_claim: true,
            jwks_url: None,
            jwks_refresh_seconds: 300,
            jwks_min_refresh_seconds: 10,
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            ack_timeout_ms: 10_000,
            heartbeat_ms: 25_000,
            default_ttl_seconds: 24 * 3600,
            max_ttl_seconds: 28 * 24 * 3600,
            session_queue: 1024,
            session_queue_bytes: 1024 * 1024,
            write_timeout_ms: 10_000,
            replay_batch: 500,
            shutdown_reconnect_ms: 1_000,
            sweep_interval_ms: 30_000,
            retention_seconds: 24 * 3600,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_bytes: 64 * 1024,
            max_batch_bytes: 4 * 1024 * 1024,
            max_ws_frame_bytes: 16 * 1024,
            ws_read_buffer_bytes: 2 * 1024,
            ws_write_buffer_bytes: 0,
            ws_max_write_buffer_bytes: 256 * 1024,
            max_body_bytes: 16 * 1024,
            publish_rate_per_key: 2_000,
            publish_burst_per_key: 4_000,
            connect_rate_per_ip: 1_000,
            connect_burst_per_ip: 2_000,
            max_recipients: 200_000,
            request_timeout_ms: 30_000,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections: 0,
            max_connections_per_ip: 0,
            shutdown_drain_ms: 10_000,
            max_topics_per_device: 256,
            max_devices_per_user: 100,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // `source` is printed by whoever prints the chain (`{:#}`); naming it here too
    // printed the OS error twice.
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

impl Config {
    /// Defaults, overridden by `file` (if given), overridden by `HERALD_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut value = toml::Value::try_from(Config::default()).expect("defaults serialize");
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let overlay: toml::Value =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::Parse {
                        path: path.to_owned(),
                        message: e.to_string(),
                    })?;
            merge(&mut value, overlay);
            // Validate the file alone first so errors name the file.
            value
                .clone()
                .try_into::<Config>()
                .map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?;
        }
        let mut vars: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("HERALD_"))
            .collect();
        vars.sort();
        for (var, raw) in vars {
            let path: Vec<String> = var["HERALD_".len()..]
                .split("__")
                .map(|s| s.to_ascii_lowercase())
                .collect();
            if !path_exists(&value, &path) {
                // Unknown HERALD_* variables (e.g. HERALD_LOG) are not ours to judge.
                continue;
            }
            set_path(&mut value, &path, parse_env_value(&raw));
            if value.clone().try_into::<Config>().is_err() {
                // "12345" may be meant as a string (a project id, a key id).
                set_path(&mut value, &path, toml::Value::String(raw.clone()));
            }
            value
                .clone()
                .try_into::<Config>()
                .map_err(|e| ConfigError::Env {
                    var: var.clone(),
                    message: e.to_string(),
                })?;
        }
        value.try_into::<Config>().map_err(|e| ConfigError::Parse {
            path: file.map(Path::to_owned).unwrap_or_default(),
            message: e.to_string(),
        })
    }

    pub fn public_url(&self, bound: SocketAddr) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("http://{bound}"))
    }
}

fn merge(base: &mut toml::Value, overlay: toml::Value) {
    match (base, overlay) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// Optional settings are absent from the serialized defaults, so a key counts when the
/// settings catalogue (every field of the config types) has it, even with no value yet.
fn path_exists(value: &toml::Value, path: &[String]) -> bool {
    if let Ok(catalog) = crate::settings::catalog() {
        if catalog.get(&path.join(".")).is_some() {
            return true;
        }
    }
    let mut cur = value;
    for key in path {
        match cur.get(key) {
            Some(v) => cur = v,
            None => return false,
        }
    }
    true
}

fn set_path(value: &mut toml::Value, path: &[String], new: toml::Value) {
    let mut cur = value;
    for key in &path[..path.len() - 1] {
        let table = cur.as_table_mut().expect("path_exists checked tables");
        cur = table
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    if let Some(t) = cur.as_table_mut() {
        t.insert(path[path.len() - 1].clone(), new);
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    match raw {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(raw.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env_override_defaults() {
        let dir = std::env::temp_dir().join(format!("herald-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("herald.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9999\"\n[limits]\nmax_message_bytes = 1000\n",
        )
        .unwrap();
        let cfg = Config::load(Some(&file)).unwrap();
        assert_eq!(cfg.listen.port(), 9999);
        assert_eq!(cfg.limits.max_message_bytes, 1000);
        assert_eq!(cfg.delivery.ack_timeout_ms, 10_000);

        std::fs::write(&file, "colour = 1\n").unwrap();
        let err = Config::load(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn env_values_are_typed() {
        let mut v = toml::Value::try_from(Config::default()).unwrap();
        let path = vec!["limits".to_string(), "max_message_bytes".to_string()];
        assert!(path_exists(&v, &path));
        set_path(&mut v, &path, parse_env_value("123"));
        let cfg: Config = v.try_into().unwrap();
        assert_eq!(cfg.limits.max_message_bytes, 123);
    }

    #[test]
    fn database_url_is_settable_from_env() {
        let mut v = toml::Value::try_from(Config::default()).unwrap();
        let path = vec!["database_url".to_string()];
        assert!(path_exists(&v, &path));
        set_path(&mut v, &path, parse_env_value("postgres://h@db/herald"));
        let cfg: Config = v.try_into().unwrap();
        assert_eq!(cfg.database_url.as_deref(), Some("postgres://h@db/herald"));
        assert_eq!(Config::default().database_url, None);
    }

    #[test]
    fn trusted_proxies_from_env_are_comma_separated() {
        let mut v = toml::Value::try_from(Config::default()).unwrap();
        let path = vec!["server".to_string(), "trusted_proxies".to_string()];
        assert!(path_exists(&v, &path));
        set_path(&mut v, &path, parse_env_value("10.0.0.0/8, 127.0.0.1"));
        let cfg: Config = v.clone().try_into().unwrap();
        assert_eq!(
            cfg.server.trusted_proxies.to_string(),
            "10.0.0.0/8,127.0.0.1/32"
        );
        assert!(Config::default().server.trusted_proxies.is_empty());
        set_path(&mut v, &path, parse_env_value("10.0.0.0/8,lb"));
        let err = v.try_into::<Config>().unwrap_err().to_string();
        assert!(err.contains("`lb` is not a CIDR"), "{err}");
    }
}
