use clap::Parser;
use herald_gateway::cli::{self, Cli, Command};
use herald_gateway::config::LogFormat;
use herald_gateway::{logging, validate, Application};

/// glibc's malloc and free were 11–16% of the workers' samples under load; mimalloc
/// (thread-local free lists) took 10–16% off the gateway's CPU per message and did
/// not grow an idle connection (BENCHMARKS.md, v5). Only the binary: the library,
/// its tests and the SDK keep the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let format = log_format(&cli);
    let guard = logging::init(format);
    if let Err(e) = run(cli, format).await {
        match format {
            LogFormat::Text => eprintln!("error: {e:#}"),
            LogFormat::Json => eprintln!("{}", logging::json_line("ERROR", &format!("{e:#}"), &[])),
        }
        drop(guard);
        std::process::exit(1);
    }
}

/// `log_format` of the effective config; when the config does not load (the command
/// reports why), `HERALD_LOG_FORMAT` as it is.
fn log_format(cli: &Cli) -> LogFormat {
    match cli.global.load_config() {
        Ok(cfg) => cfg.log_format,
        Err(_) => match std::env::var("HERALD_LOG_FORMAT").as_deref() {
            Ok("json") => LogFormat::Json,
            _ => LogFormat::Text,
        },
    }
}

async fn run(cli: Cli, format: LogFormat) -> anyhow::Result<()> {
    let config = || cli.global.load_config();
    match cli.command {
        Command::Serve(args) => {
            let mut cfg = config()?;
            for warning in validate::unknown_env_vars(std::env::vars().map(|(k, _)| k)) {
                tracing::warn!("{warning}");
            }
            if let Some(listen) = args.listen {
                cfg.listen = listen;
            }
            let app = Application::build(cfg).await?;
            let addr = app.local_addr();
            let base = app.state().config.public_url(addr);
            if let Some(banner) =
                cli::first_start_banner(app.state().store.as_ref(), &app.state().tokens, &base)
                    .await?
            {
                banner.print(format);
            }
            tracing::info!(%addr, data_dir = %app.state().config.data_dir.display(), "herald listening");
            if let Some(ops) = app.ops_addr() {
                tracing::info!(addr = %ops, "ops listener (metrics, health) listening");
            }
            // A stable line on stdout, after the banner, for scripts and tests.
            println!(
                "{}",
                logging::stdout_line(
                    format,
                    &format!("herald listening on {base}"),
                    &[("url", base.clone().into())]
                )
            );
            app.run_until_stopped(shutdown_signal()).await?;
            tracing::info!("herald stopped");
        }
        // The docs describe the settings, not this machine's: no config is loaded.
        Command::Config {
            action: cli::ConfigAction::Docs,
        } => print!(
            "{}",
            herald_gateway::settings::markdown().map_err(anyhow::Error::msg)?
        ),
        Command::Config { action } => cli::run_config(&config()?, action)?,
        Command::Healthcheck(args) => cli::run_healthcheck(&config()?, args).await?,
        Command::Keys { action } => cli::run_keys(&config()?, action).await?,
        Command::Token { action } => cli::run_token(&config()?, action).await?,
        Command::Demo { .. } => {
            eprintln!("error: {}", cli::DEMO_MOVED);
            std::process::exit(2);
        }
        Command::Openapi => println!("{}", herald_gateway::api::openapi::spec_pretty()),
        Command::Migrate => {
            let cfg = config()?;
            cli::open_or_create_store(&cfg).await?;
            match cfg.store.as_str() {
                "sqlite" => eprintln!("store at {} is up to date", cfg.data_dir.display()),
                other => eprintln!("{other} store is up to date"),
            }
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown requested: telling clients to reconnect, finishing in-flight work");
}
