//! `herald-device`: a phone in a terminal. Connects with a device token, prints every
//! message once as it arrives (the SDK acks it after printing), optionally subscribes to
//! topics and registers a (fake) push token — so Herald can be tried with curl and this.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use herald_sdk::{
    ApnsEnvironment, Config, ConnectionState, Error, HeraldClient, InboxMessage, Listener,
    PushProviderKind,
};

#[derive(Debug, Parser)]
#[command(
    name = "herald-device",
    version,
    about = "A terminal device for Herald"
)]
struct Args {
    /// Gateway base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// This device's id.
    #[arg(long)]
    device: String,
    /// Device JWT (mint one with `herald token mint --user U` or POST /v1/tokens).
    #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
    token: String,
    /// Where the SDK keeps its cursor and seen ids (default: ./herald-device-data/<device>).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Topics to subscribe to (repeatable).
    #[arg(long)]
    subscribe: Vec<String>,
    /// Register a push token, as `fcm:<token>` or `apns:<token>`.
    #[arg(long)]
    push: Option<String>,
    /// Exit 0 after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Exit 1 if not done after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
}

enum Event {
    Message,
    Fatal(String),
}

struct Printer(mpsc::Sender<Event>);

impl Listener for Printer {
    fn on_state_changed(&self, state: ConnectionState) {
        println!("[state] {state:?}");
    }
    fn on_message(&self, m: InboxMessage) {
        let notification = m
            .notification
            .as_ref()
            .map(|n| {
                format!(
                    " notification={}",
                    serde_json::to_string(n).unwrap_or_default()
                )
            })
            .unwrap_or_default();
        println!(
            "[msg] seq={} id={} data={}{notification}",
            m.seq, m.id, m.data
        );
        let _ = self.0.send(Event::Message);
    }
    fn on_error(&self, error: Error, terminal: bool) {
        eprintln!(
            "[error] {error}{}",
            if terminal { " (giving up)" } else { "" }
        );
        if terminal {
            let _ = self.0.send(Event::Fatal(error.to_string()));
        }
    }
    fn on_subscription_changed(&self, topic: String, subscribed: bool) {
        println!(
            "[topic] {topic} {}",
            if subscribed {
                "subscribed"
            } else {
                "unsubscribed"
            }
        );
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("herald-device-data").join(&args.device));
    let (tx, rx) = mpsc::channel();
    let token = args.token.clone();
    let client = HeraldClient::new(
        Config::new(&args.url, &args.device, data_dir),
        Arc::new(Printer(tx)),
        Arc::new(move || Ok::<_, String>(token.clone())),
    )
    .map_err(|e| format!("{e}; check --url and --device"))?;
    if let Some(push) = &args.push {
        let (kind, token) = match push.split_once(':') {
            Some(("fcm", t)) => (PushProviderKind::Fcm, t),
            Some(("apns", t)) => (PushProviderKind::Apns, t),
            _ => return Err("--push takes fcm:<token> or apns:<token>".into()),
        };
        let env = (kind == PushProviderKind::Apns).then_some(ApnsEnvironment::Sandbox);
        let info = client
            .register_push_token(kind, token, env)
            .map_err(|e| format!("registering the push token failed: {e}"))?;
        println!(
            "[push] registered {:?} token, state {:?}",
            kind, info.push_token
        );
    }
    for topic in &args.subscribe {
        client
            .subscribe(topic)
            .map_err(|e| format!("subscribe {topic}: {e}"))?;
    }
    client.connect();
    let deadline = args
        .timeout
        .map(|s| std::time::Instant::now() + Duration::from_secs(s));
    let mut received = 0;
    loop {
        if args.count.is_some_and(|c| received >= c) {
            client.close();
            return Ok(());
        }
        let wait = match deadline {
            Some(d) => d.saturating_duration_since(std::time::Instant::now()),
            None => Duration::from_secs(3600),
        };
        match rx.recv_timeout(wait) {
            Ok(Event::Message) => received += 1,
            Ok(Event::Fatal(e)) => return Err(e),
            Err(mpsc::RecvTimeoutError::Timeout) if deadline.is_some() => {
                client.close();
                return Err(format!(
                    "timed out after {} s with {received} message(s)",
                    args.timeout.unwrap_or_default()
                ));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err("SDK stopped".into()),
        }
    }
}
