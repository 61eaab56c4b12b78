//! The `herald` command line: serve, keys, token, migrate, demo.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::clock::rfc3339;
use crate::config::Config;
use crate::store::sqlite::SQLITE_FILE;
use crate::store::Store;

#[derive(Debug, Parser)]
#[command(name = "herald", version, about = "Herald notification gateway")]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// TOML config file (HERALD_* environment variables override it).
    #[arg(long, global = true, env = "HERALD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory of the embedded SQLite store (default ./herald-data).
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on, e.g. 127.0.0.1:8080 (port 0 picks a free one).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// Base URL to ask (default: `listen`, with 0.0.0.0 / :: asked on loopback).
    #[arg(long)]
    pub url: Option<String>,
    /// Ask `/readyz` (store and cluster bus reachable) instead of `/healthz`.
    #[arg(long)]
    pub ready: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Manage service API keys.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Device tokens.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Apply store migrations and exit.
    Migrate,
    /// Print the OpenAPI 3.1 document of the HTTP API (what `GET /openapi.json` serves).
    Openapi,
    /// Exit 0 when the gateway of this configuration answers `/healthz` (`--ready`:
    /// `/readyz`) within 3 s; for container health checks (the image has no curl).
    Healthcheck(HealthcheckArgs),
    /// The configuration: validate it (`check`), show it (`print`), document it (`docs`).
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Moved to its own binary, `herald-demo` (the server no longer carries the client SDK).
    #[command(hide = true, disable_help_flag = true)]
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// What `herald demo` says: the demo is `herald-demo` now, so that the server binary
/// does not link the client SDK (and its dependencies) only for it.
pub const DEMO_MOVED: &str = "`herald demo` is now its own binary, `herald-demo`: \
build it with `cargo build --release -p herald-demo` and run `target/release/herald-demo` \
(same options: --platform fcm|apns, --keep)";

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Validate the configuration (defaults, then --config, then HERALD_* variables) as
    /// `serve` would, without creating, opening or binding anything; warn about
    /// HERALD_* variables that are not settings. Exits 1 when `serve` would refuse it.
    Check,
    /// Print the effective configuration as TOML, secrets redacted.
    Print,
    /// Print docs/configuration.md: every setting with its environment variable, type,
    /// default and description, generated from the config types.
    Docs,
}

#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Create a key; the key alone is printed on stdout, once.
    Create {
        #[arg(long, default_value = "default")]
        name: String,
        /// What the key may do, comma-separated: publish, read, devices, tokens, admin
        /// (admin is all of them). Give a backend only what it needs.
        #[arg(long, default_value = "admin")]
        scope: String,
    },
    /// List keys (never the keys themselves).
    List,
    /// Revoke a key by id or prefix.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Mint a device JWT for a user; the token alone is printed on stdout.
    Mint {
        #[arg(long)]
        user: String,
        /// The one device the token may act for (its `did` claim); device routes refuse
        /// tokens without one unless auth.require_device_claim = false.
        #[arg(long)]
        device_id: Option<String>,
        /// Topics the device may subscribe to, comma-separated; a prefix ends in `*`
        /// (e.g. `news,user.alice.*`).
        #[arg(long)]
        topics: Option<String>,
        /// Lifetime in seconds (default: auth.default_token_ttl_seconds).
        #[arg(long)]
        ttl: Option<u64>,
    },
}

impl GlobalArgs {
    pub fn load_config(&self) -> anyhow::Result<Config> {
        let mut cfg = Config::load(self.config.as_deref())?;
        if let Some(d) = &self.data_dir {
            cfg.data_dir = d.clone();
        }
        Ok(cfg)
    }
}

/// Opens the store of a command that only makes sense on an existing one. The SQLite
/// store is a directory relative to where the command runs: run from elsewhere,
/// `open_store` would quietly create a second, empty store there and list no keys.
async fn open_existing_store(cfg: &Config) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    if cfg.store == "sqlite" && !cfg.data_dir.join(SQLITE_FILE).exists() {
        anyhow::bail!(
            "no Herald store in {}: run this in the directory where `herald serve` runs, \
             or pass --data-dir (HERALD_DATA_DIR) or --config",
            absolute(&cfg.data_dir).display()
        );
    }
    crate::open_store(cfg).await
}

/// Opens the store of a command that may create it (`keys create`, `migrate`), saying
/// so when it does, for the same reason as above.
pub async fn open_or_create_store(cfg: &Config) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    let creating = cfg.store == "sqlite" && !cfg.data_dir.join(SQLITE_FILE).exists();
    let store = crate::open_store(cfg).await?;
    if creating {
        eprintln!(
            "created a new store in {} (no store was there)",
            absolute(&cfg.data_dir).display()
        );
    }
    Ok(store)
}

fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

pub async fn run_keys(cfg: &Config, action: KeysAction) -> anyhow::Result<()> {
    let store = match action {
        KeysAction::Create { .. } => open_or_create_store(cfg).await?,
        _ => open_existing_store(cfg).await?,
    };
    match action {
        KeysAction::Create { name, scope } => {
            let scopes = crate::auth::Scope::parse_list(&scope)
                .map_err(|m| anyhow::anyhow!("--scope: {m}"))?;
            let (record, key) = crate::auth::create_api_key(store.as_ref(), &name, &scopes).await?;
            eprintln!(
                "created API key {} ({}, scopes {}); it is shown only now:",
                record.id,
                record.name,
                crate::auth::Scope::join(&record.scopes)
            );
            println!("{key}");
        }
        KeysAction::List => {
            let keys = store.api_keys().await?;
            if keys.is_empty() {
                eprintln!("no API keys; create one with `herald keys create`");
            }
            for k in keys {
                let state = match k.revoked_at {
                    Some(t) => format!("revoked {}", rfc3339(t)),
                    None => "active".into(),
                };
                println!(
                    "{}\t{}…\t{}\t{}\tcreated {}\t{}",
                    k.id,
                    k.prefix,
                    k.name,
                    crate::auth::Scope::join(&k.scopes),
                    rfc3339(k.created_at),
                    state
                );
            }
        }
        KeysAction::Revoke { id } => {
            let n = store.revoke_api_key(&id, crate::clock::now_ms()).await?;
            if n == 0 {
                anyhow::bail!("no active key matches {id:?}; see `herald keys list`");
            }
            eprintln!("revoked {n} key(s)");
        }
    }
    Ok(())
}

pub async fn run_token(cfg: &Config, action: TokenAction) -> anyhow::Result<()> {
    let TokenAction::Mint {
        user,
        device_id,
        topics,
        ttl,
    } = action;
    crate::api::validate_id(&user).map_err(|m| anyhow::anyhow!("--user {m}"))?;
    if let Some(d) = &device_id {
        crate::api::validate_id(d).map_err(|m| anyhow::anyhow!("--device-id {m}"))?;
    }
    let topics: Option<Vec<String>> = topics.map(|t| {
        t.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect()
    });
    for p in topics.iter().flatten() {
        crate::auth::validate_topic_pattern(p)
            .map_err(|m| anyhow::anyhow!("--topics: {p:?} {m}"))?;
    }
    let store = open_existing_store(cfg).await?;
    let tokens = crate::auth::DeviceTokens::from_config(&cfg.auth, store.as_ref()).await?;
    let ttl = ttl.unwrap_or(cfg.auth.default_token_ttl_seconds);
    if ttl == 0 || ttl > cfg.auth.max_token_ttl_seconds {
        anyhow::bail!(
            "--ttl must be between 1 and {} (auth.max_token_ttl_seconds): the gateway refuses longer-lived tokens",
            cfg.auth.max_token_ttl_seconds
        );
    }
    let grant = crate::auth::Grant {
        device_id: device_id.clone(),
        topics,
    };
    let (token, exp) = tokens.mint_grant(&user, &grant, ttl)?;
    eprintln!(
        "device token for user {user}{}, expires {}",
        device_id
            .map(|d| format!(" and device {d}"))
            .unwrap_or_default(),
        rfc3339(exp as i64 * 1000)
    );
    println!("{token}");
    Ok(())
}

/// On first start: create an API key and print it with a copy-paste example.
pub async fn first_start_banner(
    store: &dyn crate::store::Store,
    tokens: &crate::auth::DeviceTokens,
    base_url: &str,
) -> anyhow::Result<Option<Banner>> {
    if !store.api_keys().await?.is_empty() {
        return Ok(None);
    }
    let (_, key) =
        crate::auth::create_api_key(store, "default", &[crate::auth::Scope::Admin]).await?;
    let secret = store.setting("device_token_secret").await?;
    // A device id as the SDK makes one: random, so no other user can guess and take it.
    let device_id = uuid::Uuid::new_v4().to_string();
    let grant = crate::auth::Grant {
        device_id: Some(device_id.clone()),
        topics: Some(vec!["news".into(), "user.alice.*".into()]),
    };
    let example_token = tokens.mint_grant("alice", &grant, 3600).ok().map(|t| t.0);
    Ok(Some(Banner {
        key,
        secret,
        device_id,
        example_token,
        base_url: base_url.to_owned(),
    }))
}

/// What the first start shows once: the admin API key, the HS256 secret, an example.
pub struct Banner {
    pub key: String,
    pub secret: Option<String>,
    pub device_id: String,
    pub example_token: Option<String>,
    pub base_url: String,
}

impl Banner {
    /// On stdout: the text banner, or (`log_format = "json"`) one JSON line with the
    /// same values as fields.
    pub fn print(&self, format: crate::config::LogFormat) {
        if format == crate::config::LogFormat::Json {
            let mut fields: Vec<(&str, serde_json::Value)> = vec![
                ("api_key", self.key.clone().into()),
                ("example_device_id", self.device_id.clone().into()),
            ];
            if let Some(s) = &self.secret {
                fields.push(("device_token_secret", s.clone().into()));
            }
            if let Some(t) = &self.example_token {
                fields.push(("example_device_token", t.clone().into()));
            }
            println!(
                "{}",
                crate::logging::json_line(
                    "INFO",
                    "Herald first start: keep these, they are shown only once",
                    &fields
                )
            );
            return;
        }
        let (key, base_url, device_id) = (&self.key, &self.base_url, &self.device_id);
        let ws = base_url.replacen("http://", "ws://", 1);
        println!("\n=== Herald first start: keep these, they are shown only once ===");
        println!("API key (service routes):      {key}");
        println!("  (scope admin: every service route; give each backend a narrower key,\n   e.g. `herald keys create --name sender --scope publish`)");
        if let Some(s) = &self.secret {
            println!("device-token secret (HS256):   {s}");
            println!("  (the HMAC key is this text as it is, not hex-decoded; see README, \"Device tokens from your backend\")");
        }
        println!("\nSend a message to user alice:");
        println!(
            "  curl -sS -X POST {base_url}/v1/messages -H 'Authorization: Bearer {key}' \\\n    -H 'Content-Type: application/json' -d '{{\"to\":{{\"user\":\"alice\"}},\"data\":{{\"text\":\"hello\"}}}}'"
        );
        if let Some(t) = &self.example_token {
            println!("\nA device token for alice's device {device_id} (1 h; topics news, user.alice.*;\nmint more with POST /v1/tokens or `herald token mint --user alice --device-id ID`):");
            println!("  {t}");
            println!("Connect that device (wscat, as in README):");
            println!(
                "  npx --yes wscat@6 -s herald.v1 -H 'Authorization: Bearer {t}' -c '{ws}/v1/connect?device_id={device_id}'"
            );
        }
        println!("=================================================================\n");
    }
}

/// `herald config check|print|docs`. `check` exits 1 (through the error) when `serve`
/// would refuse the configuration; it prints every problem, not only the first.
pub fn run_config(cfg: &Config, action: ConfigAction) -> anyhow::Result<()> {
    use crate::validate;
    match action {
        ConfigAction::Check => {
            for w in validate::unknown_env_vars(std::env::vars().map(|(k, _)| k)) {
                eprintln!("warning: {w}");
            }
            let mut problems = validate::problems(cfg);
            let providers = match validate::push_providers(cfg) {
                Ok(p) => p.len(),
                Err(e) => {
                    problems.push(format!("{e:#}"));
                    0
                }
            };
            if providers == 0 && problems.is_empty() {
                eprintln!(
                    "warning: no push provider configured ([push.fcm] / [push.apns]); offline \
                     devices are reached only when they reconnect"
                );
            }
            if !problems.is_empty() {
                for p in &problems {
                    eprintln!("error: {p}");
                }
                anyhow::bail!(
                    "the configuration has {} problem{}; `herald serve` would refuse to start",
                    problems.len(),
                    if problems.len() == 1 { "" } else { "s" }
                );
            }
            let store = match cfg.store.as_str() {
                "sqlite" => format!("sqlite in {}", absolute(&cfg.data_dir).display()),
                _ => format!(
                    "postgres at {}",
                    validate::redact_url(cfg.database_url.as_deref().unwrap_or(""))
                ),
            };
            println!(
                "configuration OK: listen {}, store {store}, bus {}, {providers} push provider(s) \
                 (not checked: reaching the database, NATS and the JWKS URL)",
                cfg.listen, cfg.bus
            );
        }
        ConfigAction::Print => {
            println!(
                "# The effective Herald configuration (defaults, then --config, then HERALD_*\n\
                 # variables); secrets are <redacted>, inline keys never printed."
            );
            print!("{}", validate::redacted_toml(cfg)?);
        }
        ConfigAction::Docs => print!(
            "{}",
            crate::settings::markdown().map_err(anyhow::Error::msg)?
        ),
    }
    Ok(())
}

/// `herald healthcheck`: GET `/healthz` (or `/readyz`) of the local gateway.
pub async fn run_healthcheck(cfg: &Config, args: HealthcheckArgs) -> anyhow::Result<()> {
    let base = match args.url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => {
            let mut addr = cfg.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr {
                    std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            format!("http://{addr}")
        }
    };
    let url = format!("{base}/{}", if args.ready { "readyz" } else { "healthz" });
    let response = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()?
        .get(&url)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("{url}: {status}: {}", body.trim());
    }
    println!("{url}: {}", body.trim());
    Ok(())
}
