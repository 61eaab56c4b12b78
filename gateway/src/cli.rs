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
pub enum KeysAction {
    /// Create a key; the key alone is printed on stdout, once.
    Create {
        #[arg(long, default_value = "default")]
        name: String,
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
        KeysAction::Create { name } => {
            let (record, key) = crate::auth::create_api_key(store.as_ref(), &name).await?;
            eprintln!(
                "created API key {} ({}); it is shown only now:",
                record.id, record.name
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
                    "{}\t{}…\t{}\tcreated {}\t{}",
                    k.id,
                    k.prefix,
                    k.name,
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
    let TokenAction::Mint { user, ttl } = action;
    crate::api::validate_id(&user).map_err(|m| anyhow::anyhow!("--user {m}"))?;
    let store = open_existing_store(cfg).await?;
    let tokens = crate::auth::DeviceTokens::from_config(&cfg.auth, store.as_ref()).await?;
    let ttl = ttl.unwrap_or(cfg.auth.default_token_ttl_seconds);
    if ttl == 0 || ttl > cfg.auth.max_token_ttl_seconds {
        anyhow::bail!(
            "--ttl must be between 1 and {} (auth.max_token_ttl_seconds): the gateway refuses longer-lived tokens",
            cfg.auth.max_token_ttl_seconds
        );
    }
    let (token, exp) = tokens.mint(&user, ttl)?;
    eprintln!(
        "device token for user {user}, expires {}",
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
) -> anyhow::Result<()> {
    if !store.api_keys().await?.is_empty() {
        return Ok(());
    }
    let (_, key) = crate::auth::create_api_key(store, "default").await?;
    let secret = store.setting("device_token_secret").await?;
    let example_token = tokens.mint("alice", 3600).ok().map(|t| t.0);
    let ws = base_url.replacen("http://", "ws://", 1);
    println!("\n=== Herald first start: keep these, they are shown only once ===");
    println!("API key (service routes):      {key}");
    if let Some(s) = secret {
        println!("device-token secret (HS256):   {s}");
        println!("  (the HMAC key is this text as it is, not hex-decoded; see README, \"Device tokens from your backend\")");
    }
    println!("\nSend a message to user alice:");
    println!(
        "  curl -sS -X POST {base_url}/v1/messages -H 'Authorization: Bearer {key}' \\\n    -H 'Content-Type: application/json' -d '{{\"to\":{{\"user\":\"alice\"}},\"data\":{{\"text\":\"hello\"}}}}'"
    );
    if let Some(t) = example_token {
        println!("\nA device token for alice (1 h; mint more with POST /v1/tokens or `herald token mint --user alice`):");
        println!("  {t}");
        println!("Connect a device (wscat, as in README):");
        println!(
            "  npx --yes wscat@6 -s herald.v1 -H 'Authorization: Bearer {t}' -c '{ws}/v1/connect?device_id=phone-1'"
        );
    }
    println!("=================================================================\n");
    Ok(())
}
