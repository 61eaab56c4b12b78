use clap::Parser;
use herald_gateway::cli::{self, Cli, Command};
use herald_gateway::Application;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let default_filter = "info,sqlx=warn";
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // Its fallback for a failed log write is eprintln!, which panics when stderr is
        // a closed pipe (`herald serve | head`): the logging task (shutdown's, say)
        // would die with it. A lost log line must cost only the line.
        .log_internal_errors(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .init();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = || cli.global.load_config();
    match cli.command {
        Command::Serve(args) => {
            let mut cfg = config()?;
            if let Some(listen) = args.listen {
                cfg.listen = listen;
            }
            let app = Application::build(cfg).await?;
            let addr = app.local_addr();
            let base = app.state().config.public_url(addr);
            cli::first_start_banner(app.state().store.as_ref(), &app.state().tokens, &base).await?;
            tracing::info!(%addr, data_dir = %app.state().config.data_dir.display(), "herald listening");
            if let Some(ops) = app.ops_addr() {
                tracing::info!(addr = %ops, "ops listener (metrics, health) listening");
            }
            // A stable line on stdout, after the banner, for scripts and tests.
            println!("herald listening on {base}");
            app.run_until_stopped(shutdown_signal()).await?;
            tracing::info!("herald stopped");
        }
        Command::Keys { action } => cli::run_keys(&config()?, action).await?,
        Command::Token { action } => cli::run_token(&config()?, action).await?,
        Command::Demo { .. } => {
            eprintln!("error: {}", cli::DEMO_MOVED);
            std::process::exit(2);
        }
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
