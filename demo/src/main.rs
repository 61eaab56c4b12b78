//! `herald-demo`: walks through delivery on this machine (live + ack, offline → push,
//! catch-up, statuses). It was `herald demo`; see demo.rs for what it starts.

mod demo;

use clap::{Parser, ValueEnum};
use herald_protocol::PushProviderKind;

/// Walk through delivery on this machine: live + ack, offline → push, catch-up.
///
/// Starts its own gateway (temporary directory, 127.0.0.1:0), a device on the client
/// SDK and a push provider that prints what APNs/FCM would receive. Exits 0 when every
/// step behaved as told, 1 naming the step that did not.
#[derive(Debug, Parser)]
#[command(name = "herald-demo", version)]
struct Args {
    /// Whose push payload to show.
    #[arg(long, value_enum, default_value_t = Platform::Fcm)]
    platform: Platform,
    /// Keep the temporary directory (gateway store, device store) instead of removing it.
    #[arg(long)]
    keep: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Platform {
    /// Apple Push Notification service: the aps payload and apns-* headers.
    Apns,
    /// Firebase Cloud Messaging: the HTTP v1 `message` body.
    Fcm,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    // The demo tells its story on stdout; the gateway's routine logs would drown it.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let platform = match args.platform {
        Platform::Apns => PushProviderKind::Apns,
        Platform::Fcm => PushProviderKind::Fcm,
    };
    if let Err(e) = demo::run(demo::DemoOptions {
        platform,
        keep: args.keep,
    })
    .await
    {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
