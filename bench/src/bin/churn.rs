//! Connection churn against publishing (#13 item 7): does a storm of connects or
//! closes stall the publishes of other users? One real `herald` process (release
//! build, embedded SQLite) serves a steady publisher — one message at a time to a
//! device that stays connected, at a fixed rate — while N other devices connect for
//! the first time (a device claim each) and then all close at once (a presence write
//! each). Reports the publish round-trip latency (request → 202, i.e. the durable
//! commit) in each phase: quiet, connect storm, close storm, after.
//!
//! cargo build --release -p herald-gateway --bin herald -p herald-bench --bin churn
//! target/release/churn [devices=2300] [rate=200]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use herald_gateway::testing::TempDir;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Every run stops by itself after this long.
const DEADLINE: Duration = Duration::from_secs(120);

struct Gateway {
    child: Child,
    base: String,
    api_key: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_gateway(dir: &std::path::Path) -> anyhow::Result<Gateway> {
    let bin = match std::env::var("HERALD_BIN") {
        Ok(p) => p.into(),
        Err(_) => std::env::current_exe()?.with_file_name("herald"),
    };
    anyhow::ensure!(
        bin.exists(),
        "{} not found: build it with `cargo build --release -p herald-gateway --bin herald` (or set HERALD_BIN)",
        bin.display()
    );
    let mut child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        // Our own setting, not the gateway's: it would warn of an unknown HERALD_ variable.
        .env_remove("HERALD_BIN")
        .env("HERALD_LOG", "warn")
        .env("HERALD_LIMITS__PUBLISH_RATE_PER_KEY", "1000000")
        .env("HERALD_LIMITS__PUBLISH_BURST_PER_KEY", "1000000")
        .env("HERALD_LIMITS__CONNECT_RATE_PER_IP", "100000")
        .env("HERALD_LIMITS__CONNECT_BURST_PER_IP", "100000")
        .env("HERALD_LIMITS__MAX_DEVICES_PER_USER", "100000")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut api_key = None;
    for line in out.lines() {
        let line = line?;
        if let Some(k) = line.strip_prefix("API key (service routes):") {
            api_key = Some(k.trim().to_owned());
        }
        if let Some(base) = line.strip_prefix("herald listening on ") {
            return Ok(Gateway {
                child,
                base: base.trim().to_owned(),
                api_key: api_key.ok_or_else(|| anyhow::anyhow!("no API key printed"))?,
            });
        }
    }
    anyhow::bail!("herald exited before listening (its log is above)")
}

fn ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0
}

async fn token(http: &reqwest::Client, gw: &Gateway, device: &str) -> anyhow::Result<String> {
    let v: Value = http
        .post(format!("{}/v1/tokens", gw.base))
        .bearer_auth(&gw.api_key)
        .json(&json!({"user": "churn", "device_id": device}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(v["token"].as_str().unwrap_or_default().to_owned())
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(gw: &Gateway, device: &str, token: &str) -> anyhow::Result<Ws> {
    let url = format!(
        "{}/v1/connect?device_id={device}",
        gw.base.replacen("http://", "ws://", 1)
    );
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse()?);
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "herald.v1".parse()?);
    Ok(tokio_tungstenite::connect_async(req).await?.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let devices = *args.first().unwrap_or(&2300) as usize;
    let rate = *args.get(1).unwrap_or(&200);
    anyhow::ensure!(
        (1..=10_000).contains(&devices) && (1..=5_000).contains(&rate),
        "bounded: 1..=10000 devices, 1..=5000 publishes/s"
    );
    let tmp = TempDir::new("herald-bench-churn");
    let gw = Arc::new(spawn_gateway(&tmp.0)?);
    let http = reqwest::Client::new();

    // Tokens first, so the storms below are only connects and closes.
    eprintln!("minting {devices} tokens…");
    let mut tokens = Vec::with_capacity(devices);
    for d in 0..devices {
        tokens.push(token(&http, &gw, &format!("c{d}")).await?);
    }
    // The device the publisher targets stays connected and drains its socket.
    let probe_token = token(&http, &gw, "probe").await?;
    let mut probe = connect(&gw, "probe", &probe_token).await?;
    tokio::spawn(async move {
        while let Some(Ok(msg)) = probe.next().await {
            if let Message::Text(t) = msg {
                let f: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                if f["type"] == "msg" {
                    let ack = json!({"type": "ack", "seq": f["seq"]}).to_string();
                    let _ = probe.send(Message::Text(ack.into())).await;
                }
            }
        }
    });

    // phase name, when it started
    let phases: Arc<Mutex<Vec<(&'static str, Instant)>>> =
        Arc::new(Mutex::new(vec![("quiet", Instant::now())]));
    let samples: Arc<Mutex<Vec<(Instant, Duration, bool)>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let publisher = {
        let (gw, http, samples, stop) = (gw.clone(), http.clone(), samples.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let t0 = Instant::now();
            while !stop.is_cancelled() && t0.elapsed() < DEADLINE {
                tick.tick().await;
                let (gw, http, samples) = (gw.clone(), http.clone(), samples.clone());
                // Concurrent, so one stalled request does not hide the others' latency.
                tokio::spawn(async move {
                    let sent = Instant::now();
                    let ok = http
                        .post(format!("{}/v1/messages", gw.base))
                        .bearer_auth(&gw.api_key)
                        .json(
                            &json!({"to": {"device": "probe"}, "data": {"n": 1}, "push": "never"}),
                        )
                        .send()
                        .await
                        .is_ok_and(|r| r.status().as_u16() == 202);
                    samples.lock().unwrap().push((sent, sent.elapsed(), ok));
                });
            }
        })
    };
    let phase = |name| phases.lock().unwrap().push((name, Instant::now()));

    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("connect storm: {devices} first connects…");
    phase("connect storm");
    let started = Instant::now();
    let mut conns = Vec::with_capacity(devices);
    let mut pending = futures_util::stream::iter(tokens.iter().enumerate().map(|(d, t)| {
        let gw = gw.clone();
        async move { connect(&gw, &format!("c{d}"), t).await }
    }))
    .buffer_unordered(64);
    while let Some(ws) = pending.next().await {
        conns.push(ws?);
        anyhow::ensure!(
            started.elapsed() < DEADLINE,
            "connects did not finish in time"
        );
    }
    let connect_s = started.elapsed().as_secs_f64();
    phase("connected");
    tokio::time::sleep(Duration::from_secs(2)).await;

    eprintln!("close storm: {devices} closes at once…");
    phase("close storm");
    let started = Instant::now();
    futures_util::future::join_all(conns.iter_mut().map(|ws| ws.close(None))).await;
    let close_s = started.elapsed().as_secs_f64();
    drop(conns);
    tokio::time::sleep(Duration::from_secs(3)).await;
    phase("after");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    publisher.await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let phases = phases.lock().unwrap().clone();
    let samples = samples.lock().unwrap().clone();
    let mut report = json!({
        "devices": devices,
        "publish_rate": rate,
        "connect_storm_seconds": connect_s,
        "close_calls_seconds": close_s,
        "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    });
    for (i, (name, from)) in phases.iter().enumerate() {
        let to = phases.get(i + 1).map(|p| p.1);
        let mut lat: Vec<Duration> = samples
            .iter()
            .filter(|(at, _, _)| at >= from && to.is_none_or(|t| *at < t))
            .map(|(_, d, _)| *d)
            .collect();
        lat.sort();
        let failed = samples
            .iter()
            .filter(|(at, _, ok)| at >= from && to.is_none_or(|t| *at < t) && !ok)
            .count();
        report[name] = json!({
            "publishes": lat.len(),
            "failed": failed,
            "p50_ms": ms(&lat, 0.5),
            "p99_ms": ms(&lat, 0.99),
            "max_ms": ms(&lat, 1.0),
        });
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
