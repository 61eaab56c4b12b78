//! `herald-device`: a phone in a terminal. Connects with a device token, prints every
//! message once as it arrives (the SDK acks it after printing), optionally subscribes to
//! topics and registers a (fake) push token — so Herald can be tried with curl and this.
//! The flags below `--count` exercise the SDK's mobile rules from a shell: handle a
//! push like an extension, log out, a slow app, the logger and the counters.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use herald_sdk::{
    ApnsEnvironment, Config, ConnectionState, Error, HeraldClient, InboxMessage, Listener,
    LogLevel, Logger, PushProviderKind, TransportPreference,
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
    /// This device's id (default: one the SDK generates once and keeps in the data dir).
    #[arg(long)]
    device: Option<String>,
    /// Device JWT bound to this device (mint one with `herald token mint --user U
    /// --device-id D`, D being --device, or POST /v1/tokens with `device_id`).
    #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
    token: String,
    /// Where the SDK keeps its cursor and seen ids (default: ./herald-device-data/<device>,
    /// or ./herald-device-data/generated without --device).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Topics to subscribe to (repeatable).
    #[arg(long)]
    subscribe: Vec<String>,
    /// Topics to unsubscribe from (repeatable).
    #[arg(long)]
    unsubscribe: Vec<String>,
    /// Register a push token, as `fcm:<token>` or `apns:<token>`.
    #[arg(long)]
    push: Option<String>,
    /// Exit 0 after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Exit 1 if not done after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Handle this push payload (APNs userInfo / FCM data, JSON) like a notification
    /// service extension, print what it brings, and exit without connecting.
    #[arg(long, value_name = "JSON")]
    handle_push: Option<String>,
    /// Deadline of --handle-push, in ms (default: the SDK's 20 s).
    #[arg(long)]
    push_deadline_ms: Option<u64>,
    /// Log out: remove this device's push token from the gateway, forget the local
    /// state (cursor, topics, generated device id), and exit.
    #[arg(long)]
    logout: bool,
    /// Take this long over each message (a slow app), in ms.
    #[arg(long, default_value_t = 0)]
    slow_ms: u64,
    /// Foreground liveness ping interval in ms (0: heartbeats only).
    #[arg(long)]
    foreground_ping_ms: Option<u64>,
    /// Print the SDK's log lines at this level and above: error, warn, info, debug, trace.
    #[arg(long)]
    log: Option<String>,
    /// Print the SDK's counters when exiting.
    #[arg(long)]
    stats: bool,
    /// Transport: auto (WebSocket, falling back to Server-Sent Events then long-poll
    /// where a proxy refuses WebSocket upgrades), ws, sse or poll.
    #[arg(long, default_value = "auto", value_parser = parse_transport)]
    transport: TransportPreference,
}

fn parse_transport(s: &str) -> Result<TransportPreference, String> {
    s.parse()
}

enum Event {
    Message,
    Fatal(String),
}

struct Printer(mpsc::Sender<Event>, Duration);

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
        std::thread::sleep(self.1);
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
    fn on_subscription_failed(
        &self,
        topic: String,
        subscribe: bool,
        code: String,
        message: String,
    ) {
        println!(
            "[topic] {topic} {} refused: {code}: {message}",
            if subscribe {
                "subscribe"
            } else {
                "unsubscribe"
            }
        );
    }
}

struct StderrLogger;

impl Logger for StderrLogger {
    fn log(&self, level: LogLevel, message: String) {
        eprintln!("[log] {level:?} {message}");
    }
}

fn log_level(name: &str) -> Result<LogLevel, String> {
    Ok(match name {
        "error" => LogLevel::Error,
        "warn" => LogLevel::Warn,
        "info" => LogLevel::Info,
        "debug" => LogLevel::Debug,
        "trace" => LogLevel::Trace,
        _ => {
            return Err(format!(
                "--log takes error, warn, info, debug or trace, not {name:?}"
            ))
        }
    })
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    if let Some(level) = &args.log {
        herald_sdk::set_logger(Some(Arc::new(StderrLogger)), log_level(level)?);
    }
    let device = args.device.clone().unwrap_or_default();
    let data_dir = args.data_dir.clone().unwrap_or_else(|| {
        PathBuf::from("herald-device-data").join(if device.is_empty() {
            "generated"
        } else {
            &device
        })
    });
    let (tx, rx) = mpsc::channel();
    let token = args.token.clone();
    let mut config = Config::new(&args.url, device, data_dir);
    if let Some(ms) = args.foreground_ping_ms {
        config.foreground_ping = (ms > 0).then(|| Duration::from_millis(ms));
    }
    config.transport = args.transport;
    if let Some(ms) = args.push_deadline_ms {
        config.push_deadline = Duration::from_millis(ms.max(1));
    }
    let client = HeraldClient::new(
        config,
        Arc::new(Printer(tx, Duration::from_millis(args.slow_ms))),
        Arc::new(move |_: &str| Ok::<_, String>(token.clone())),
    )
    .map_err(|e| format!("{e}; check --url and --device"))?;
    println!("[device] {}", client.device_id());
    let result = run_client(&args, &client, rx);
    client.close();
    if args.stats {
        println!("[stats] {:?}", client.stats());
    }
    result
}

fn run_client(args: &Args, client: &HeraldClient, rx: mpsc::Receiver<Event>) -> Result<(), String> {
    if args.logout {
        client
            .unregister()
            .map_err(|e| format!("removing the push token failed: {e}"))?;
        client
            .reset()
            .map_err(|e| format!("clearing local state failed: {e}"))?;
        println!("[logout] push token removed, local state cleared");
        return Ok(());
    }
    if let Some(payload) = &args.handle_push {
        let outcome = client
            .handle_push(payload)
            .map_err(|e| format!("handle_push: {e}"))?;
        for m in &outcome.messages {
            println!("[push-msg] seq={} id={} data={}", m.seq, m.id, m.data);
        }
        println!(
            "[push] {} message(s), acked={}",
            outcome.messages.len(),
            outcome.acked
        );
        return Ok(());
    }
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
    for topic in &args.unsubscribe {
        client
            .unsubscribe(topic)
            .map_err(|e| format!("unsubscribe {topic}: {e}"))?;
    }
    client.connect();
    let deadline = args
        .timeout
        .map(|s| std::time::Instant::now() + Duration::from_secs(s));
    let mut received = 0;
    loop {
        if args.count.is_some_and(|c| received >= c) {
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
