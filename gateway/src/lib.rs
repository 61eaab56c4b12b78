//! Herald gateway: REST publish, durable per-device inboxes, live WebSocket delivery
//! with acks, and push fallback. See ARCHITECTURE.md for the map.

pub mod api;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod error;
pub mod limiter;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod push;
pub mod registry;
pub mod request_id;
pub mod server;
pub mod session;
pub mod settings;
pub mod store;
pub mod testing;
pub mod validate;
pub mod webhooks;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{AppContext, AppState, RateLimiter};
use crate::auth::DeviceTokens;
use crate::clock::now_ms;
use crate::cluster::ClusterBus;
use crate::config::Config;
use crate::delivery::{DeliveryRouter, DuePolling, SentRecorder};
use crate::metrics::Metrics;
use crate::push::dispatcher::PushDispatcher;
use crate::push::PushProvider;
use crate::registry::SessionRegistry;
use crate::session::SessionConfig;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::store::Store;
use crate::webhooks::{WebhookDispatcher, WebhookSettings};

/// Opens the store named by the config and applies its migrations.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let events = config.webhooks.validate()?;
    match config.store.as_str() {
        "sqlite" => Ok(Arc::new(
            SqliteStore::open_with(&config.data_dir, events).await?,
        )),
        "postgres" => {
            let url = config.database_url.as_deref().ok_or_else(|| {
                anyhow::anyhow!(
                    "store \"postgres\" needs database_url (config key, or HERALD_DATABASE_URL), e.g. postgres://herald:secret@127.0.0.1:5432/herald"
                )
            })?;
            Ok(Arc::new(PostgresStore::open_with(url, events).await?))
        }
        other => anyhow::bail!("store {other:?} is not supported; use \"sqlite\" or \"postgres\""),
    }
}

/// A built gateway: store open, port bound, background tasks running.
pub struct Application {
    listener: TcpListener,
    /// `ops.listen`: metrics (and health) on an address of their own.
    ops_listener: Option<TcpListener>,
    state: AppState,
}

impl Application {
    /// Builds with the push providers the config names (stubs if `push.stub`).
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        validate::check(&config)?;
        let providers = validate::push_providers(&config)?;
        if providers.is_empty() {
            tracing::warn!("no push provider configured ([push.fcm] / [push.apns]); offline devices are reached only when they reconnect");
        }
        Application::build_checked(config, providers).await
    }

    pub async fn build_with(
        config: Config,
        providers: Vec<Arc<dyn PushProvider>>,
    ) -> anyhow::Result<Application> {
        // The checks `herald config check` makes, before anything is created or bound.
        validate::check(&config)?;
        Application::build_checked(config, providers).await
    }

    /// `build_with` once `validate::check` has passed.
    async fn build_checked(
        config: Config,
        providers: Vec<Arc<dyn PushProvider>>,
    ) -> anyhow::Result<Application> {
        let metrics = Metrics::new();
        let store: Arc<dyn Store> = Arc::new(crate::store::timed::TimedStore::new(
            open_store(&config).await?,
            metrics.store_ops.clone(),
        ));
        let listener = TcpListener::bind(config.listen).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {}: {e}; choose another address with --listen or HERALD_LISTEN",
                config.listen
            )
        })?;
        let ops_listener = match config.ops.listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen on ops.listen {addr}: {e}; choose another address (HERALD_OPS__LISTEN)"
                )
            })?),
            None => None,
        };
        let tokens = DeviceTokens::from_config(&config.auth, store.as_ref()).await?;
        let cluster = ClusterBus::connect(&config, &metrics).await?;
        let shutdown = CancellationToken::new();
        let registry = Arc::new(SessionRegistry::new(
            config.delivery.session_queue,
            config.delivery.session_queue_bytes,
            &shutdown,
        ));
        cluster.spawn_resync(registry.clone());
        let push_settings = config.push.settings();
        let due_polling = DuePolling {
            interval: push_settings.poll_interval,
            lease: Duration::from_millis(config.delivery.ack_timeout_ms),
            stale_claim: push_settings.stale_claim,
        };
        let push = PushDispatcher::start(
            store.clone(),
            providers,
            metrics.clone(),
            push_settings,
            shutdown.clone(),
        );
        let router = DeliveryRouter {
            registry: registry.clone(),
            store: store.clone(),
            push,
            metrics: metrics.clone(),
            sent: SentRecorder::start(store.clone()),
            cluster,
        };
        router.spawn_due_poller(due_polling, shutdown.clone());
        if let Some(settings) = WebhookSettings::from_config(&config.webhooks) {
            WebhookDispatcher::spawn(store.clone(), settings, metrics.clone(), shutdown.clone())?;
        }
        let d = &config.delivery;
        let session_cfg = SessionConfig {
            heartbeat: Duration::from_millis(d.heartbeat_ms),
            ack_timeout: Duration::from_millis(d.ack_timeout_ms),
            write_timeout: Duration::from_millis(d.write_timeout_ms.max(1)),
            replay_batch: d.replay_batch,
            shutdown_reconnect_ms: d.shutdown_reconnect_ms,
            max_topics: config.limits.max_topics_per_device,
        };
        let l = &config.limits;
        let state = AppState::new(AppContext {
            publish_limiter: Arc::new(RateLimiter::new(
                l.publish_rate_per_key,
                l.publish_burst_per_key,
            )),
            connect_limiter: Arc::new(RateLimiter::new(
                l.connect_rate_per_ip,
                l.connect_burst_per_ip,
            )),
            config: Arc::new(config),
            store,
            tokens,
            router,
            registry,
            metrics,
            session_cfg: Arc::new(session_cfg),
            shutdown,
            sessions: TaskTracker::new(),
        });
        state.publish_limiter.spawn_cleanup(state.shutdown.clone());
        state.connect_limiter.spawn_cleanup(state.shutdown.clone());
        spawn_sweeper(&state);
        Ok(Application {
            listener,
            ops_listener,
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    /// Where `ops.listen` is bound, if it is set.
    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.ops_listener
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener"))
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then: refuses new work, tells every client to
    /// reconnect elsewhere, lets in-flight requests (and their commits) finish, for
    /// at most `limits.shutdown_drain_ms`: a client holding a request half-sent must
    /// not keep the process alive.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let token = state.shutdown.clone();
        let limits = server::ServerLimits::from_config(&state.config.limits);
        let drain = Duration::from_millis(state.config.limits.shutdown_drain_ms);
        let app = api::app(self.state);
        let signal_token = token.clone();
        tokio::spawn(async move {
            shutdown.await;
            signal_token.cancel();
        });
        if let Some(ops) = self.ops_listener {
            let ops_app = api::ops_app(state.clone());
            let ops_token = token.clone();
            tokio::spawn(async move {
                let served = axum::serve(ops, ops_app)
                    .with_graceful_shutdown(async move { ops_token.cancelled().await })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "ops listener failed");
                }
            });
        }
        let conns = TaskTracker::new();
        let abort = CancellationToken::new();
        server::serve(
            self.listener,
            app,
            limits,
            state.metrics.clone(),
            token,
            conns.clone(),
            abort.clone(),
        )
        .await;
        conns.close();
        state.sessions.close();
        let drained = tokio::time::timeout(drain, async {
            tokio::join!(conns.wait(), state.sessions.wait());
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                drain_ms = drain.as_millis() as u64,
                "connections still open after limits.shutdown_drain_ms; closing them"
            );
            abort.cancel();
        }
        Ok(())
    }
}

/// Deletes inbox entries long past their expiry, so the store does not grow forever.
fn spawn_sweeper(state: &AppState) {
    let store = state.store.clone();
    let shutdown = state.shutdown.clone();
    let every = Duration::from_millis(state.config.delivery.sweep_interval_ms.max(100));
    let retention_ms = state.config.delivery.retention_seconds as i64 * 1000;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    match store.sweep(now_ms(), retention_ms).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(deleted = n, "swept expired inbox entries"),
                        Err(e) => tracing::warn!(error = %e, "sweep failed"),
                    }
                }
                _ = shutdown.cancelled() => break,
            }
        }
    });
}
