//! Cross-node delivery in cluster mode: three real `herald` processes (release build)
//! on one fresh PostgreSQL database and the machine's NATS. N devices connect over
//! WebSockets, spread over the nodes; every message is published to a node *other*
//! than the one holding its device (`--same-node` publishes to the device's own node,
//! for comparison). Devices ack everything. Reports delivered messages/s and
//! publish→deliver latency (the publisher's send time, carried in the message, to the
//! device's receive time; one clock, one machine), and the CPU time spent per
//! delivered message by the three `herald` processes and by this run's PostgreSQL
//! backends (from /proc, between the first publish and the last delivery).
//!
//! cargo build --release -p herald-gateway --bin herald -p herald-bench --bin cluster_rate
//! target/release/cluster_rate [devices=300] [messages=20000] [publishers=64] [--same-node] [--batch=N] [--push=fallback]
//!
//! `--batch=N`: each publisher takes N messages at a time and sends them as
//! `POST /v1/messages/batch`, one request per node they go to (default 1: one
//! `POST /v1/messages` per message).
//!
//! `--push=fallback`: messages carry `"push": "fallback"` (default `never`), so their
//! inbox rows hold a scheduled push that each ack cancels (no provider is configured
//! and the ack timeout is 60 s: nothing is pushed).
//!
//! `HERALD_BENCH_PG_SETUP=<sql>`: run on the fresh database once the nodes have
//! migrated it and before anything is published, to measure a storage setting (say
//! `ALTER TABLE deliveries SET (fillfactor = 70)`) against the same binary.
//! After the run it prints the WAL written and the inbox's updates (all, and how many
//! were HOT: written beside the old row version without touching an index).
//!
//! Needs PostgreSQL (HERALD_BENCH_DATABASE_URL, default
//! postgres://postgres@127.0.0.1:5432/test, a role that may CREATE DATABASE) and NATS
//! (HERALD_BENCH_NATS_URL, default nats://127.0.0.1:4222): `scripts/ensure-services.sh`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use herald_gateway::testing::TempDir;
use serde_json::{json, Value};
use sqlx::{Connection, Executor, PgConnection};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Every run stops by itself after this long.
const DEADLINE: Duration = Duration::from_secs(180);
const NODES: usize = 3;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

struct Node {
    child: Child,
    base: String,
    api_key: Option<String>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn herald_binary() -> anyhow::Result<std::path::PathBuf> {
    if let Ok(p) = std::env::var("HERALD_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("herald");
    anyhow::ensure!(
        bin.exists(),
        "{} not found: build it first with `cargo build --release -p herald-gateway --bin herald` (or set HERALD_BIN)",
        bin.display()
    );
    Ok(bin)
}

fn spawn_node(config: &std::path::Path, dir: &std::path::Path) -> anyhow::Result<Node> {
    let mut child = Command::new(herald_binary()?)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(dir)
        // Our own setting, not the gateway's: it would warn of an unknown HERALD_ variable.
        .env_remove("HERALD_BIN")
        .env("HERALD_LOG", "warn")
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
            return Ok(Node {
                child,
                base: base.trim().to_owned(),
                api_key,
            });
        }
    }
    anyhow::bail!("herald exited before listening (its log is above)")
}

/// User + system CPU time of a process so far, in seconds (Linux: /proc, USER_HZ = 100).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces) in parentheses.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// The PostgreSQL backends serving this run's database (not this connection), with
/// their CPU time so far.
async fn pg_backends(conn: &mut PgConnection) -> anyhow::Result<Vec<(u32, f64)>> {
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(conn)
    .await?;
    Ok(pids
        .into_iter()
        .filter_map(|p| Some((p as u32, cpu_seconds(p as u32)?)))
        .collect())
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let load = Load {
        devices: *args.first().unwrap_or(&300) as usize,
        messages: *args.get(1).unwrap_or(&20_000) as usize,
        publishers: *args.get(2).unwrap_or(&64) as usize,
        same_node: std::env::args().any(|a| a == "--same-node"),
        batch: std::env::args()
            .find_map(|a| a.strip_prefix("--batch=").map(str::to_owned))
            .map_or(Ok(1), |n| n.parse())?,
        push: match std::env::args().find_map(|a| a.strip_prefix("--push=").map(str::to_owned)) {
            None => "never",
            Some(p) if p == "never" => "never",
            Some(p) if p == "fallback" => "fallback",
            Some(p) => anyhow::bail!("--push={p}: give never or fallback"),
        },
    };
    anyhow::ensure!(
        (1..=20_000).contains(&load.devices)
            && load.messages <= 1_000_000
            && load.publishers >= 1
            && (1..=500).contains(&load.batch),
        "bounded: 1..=20000 devices, at most 1,000,000 messages, batches of 1..=500"
    );
    let started = Instant::now();

    // A fresh database for this run, dropped at the end.
    let admin_url = std::env::var("HERALD_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let nats_url =
        std::env::var("HERALD_BENCH_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let db = format!("herald_bench_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&admin_url).await.map_err(|e| {
        anyhow::anyhow!("PostgreSQL at {admin_url}: {e}; start it with scripts/ensure-services.sh")
    })?;
    admin
        .execute(format!("CREATE DATABASE {db}").as_str())
        .await?;
    let mut db_url = url::Url::parse(&admin_url)?;
    db_url.set_path(&format!("/{db}"));

    let result = run(&load, db_url.as_str(), &nats_url).await;
    let _ = admin
        .execute(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)").as_str())
        .await;
    result?;
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// What one run sends: the command line's numbers and flags.
struct Load {
    devices: usize,
    messages: usize,
    publishers: usize,
    same_node: bool,
    batch: usize,
    push: &'static str,
}

async fn run(load: &Load, db_url: &str, nats_url: &str) -> anyhow::Result<()> {
    let &Load {
        devices,
        messages,
        publishers,
        same_node,
        batch,
        push,
    } = load;
    let tmp = TempDir::new("herald-bench-cluster");
    let config = tmp.0.join("herald.toml");
    std::fs::write(
        &config,
        format!(
            "store = \"postgres\"\ndatabase_url = {db}\nbus = \"nats\"\n\
             [nats]\nurl = {nats}\nsubject_prefix = \"bench{pid}\"\n\
             [limits]\npublish_rate_per_key = 1000000\npublish_burst_per_key = 1000000\n\
             connect_rate_per_ip = 100000\nconnect_burst_per_ip = 100000\n\
             [delivery]\nack_timeout_ms = 60000\n",
            db = toml::Value::String(db_url.into()),
            nats = toml::Value::String(nats_url.into()),
            pid = std::process::id(),
        ),
    )?;
    eprintln!("starting {NODES} nodes…");
    let mut nodes = Vec::new();
    for i in 0..NODES {
        let dir = tmp.0.join(format!("node{i}"));
        std::fs::create_dir_all(&dir)?;
        nodes.push(spawn_node(&config, &dir)?);
    }
    let api_key = nodes[0].api_key.clone().expect("first start prints a key");
    let bases: Vec<String> = nodes.iter().map(|n| n.base.clone()).collect();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(publishers)
        .build()?;

    eprintln!("connecting {devices} devices…");
    let delivered = Arc::new(AtomicU64::new(0));
    let latencies: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::with_capacity(messages)));
    let mut readers = Vec::new();
    for d in 0..devices {
        let token: Value = http
            .post(format!("{}/v1/tokens", bases[0]))
            .bearer_auth(&api_key)
            .json(&json!({"user": format!("u{d}"), "device_id": format!("d{d}")}))
            .send()
            .await?
            .json()
            .await?;
        let token = token["token"].as_str().unwrap().to_owned();
        let url = format!(
            "{}/v1/connect?device_id=d{d}&after=0",
            bases[d % NODES].replacen("http://", "ws://", 1)
        );
        let mut req = url.into_client_request()?;
        req.headers_mut()
            .insert("Authorization", format!("Bearer {token}").parse()?);
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "herald.v1".parse()?);
        let (ws, _) = tokio_tungstenite::connect_async(req).await?;
        let (mut tx, mut rx) = ws.split();
        let (delivered, latencies) = (delivered.clone(), latencies.clone());
        readers.push(tokio::spawn(async move {
            while let Some(Ok(msg)) = rx.next().await {
                let text = match msg {
                    Message::Text(text) => text,
                    Message::Close(reason) => {
                        eprintln!("  d{d}: the gateway closed the session: {reason:?}");
                        break;
                    }
                    _ => continue,
                };
                let frame: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
                if frame["type"] == "error" {
                    eprintln!("  d{d}: {text}");
                }
                if frame["type"] != "msg" {
                    continue;
                }
                let received = now_us();
                if let Some(t) = frame["data"]["t"].as_u64() {
                    latencies.lock().unwrap().push(received.saturating_sub(t));
                }
                delivered.fetch_add(1, Ordering::Relaxed);
                let ack = json!({"type": "ack", "seq": frame["seq"]}).to_string();
                if tx.send(Message::Text(ack.into())).await.is_err() {
                    break;
                }
            }
        }));
    }
    // Let every session finish its (empty) replay.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mode = if same_node { "same node" } else { "cross node" };
    eprintln!("publishing {messages} messages ({mode}) with {publishers} concurrent publishers, {batch} per request…");
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut pg = PgConnection::connect(db_url).await?;
    if let Ok(setup) = std::env::var("HERALD_BENCH_PG_SETUP") {
        eprintln!("storage setup: {setup}");
        pg.execute(setup.as_str()).await?;
    }
    let wal0: i64 = sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::BIGINT")
        .fetch_one(&mut pg)
        .await?;
    let herald_cpu0: f64 = nodes.iter().filter_map(|n| cpu_seconds(n.child.id())).sum();
    let pg_cpu0 = pg_backends(&mut pg).await?;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..publishers {
        let (http, bases, api_key) = (http.clone(), bases.clone(), api_key.clone());
        let (next, errors) = (next.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let start = next.fetch_add(batch as u64, Ordering::Relaxed) as usize;
                if start >= messages || t0.elapsed() > DEADLINE {
                    return;
                }
                let mut per_node: Vec<Vec<Value>> = vec![Vec::new(); NODES];
                for i in start..(start + batch).min(messages) {
                    let d = i % devices;
                    let node = if same_node {
                        d % NODES
                    } else {
                        (d + 1) % NODES
                    };
                    per_node[node].push(json!({"to": {"device": format!("d{d}")}, "data": {"t": now_us()}, "push": push}));
                }
                for (node, mut items) in per_node.into_iter().enumerate() {
                    let failed = match items.len() {
                        0 => continue,
                        1 => {
                            let ok = http
                                .post(format!("{}/v1/messages", bases[node]))
                                .bearer_auth(&api_key)
                                .json(&items.pop().unwrap())
                                .send()
                                .await
                                .is_ok_and(|r| r.status().as_u16() == 202);
                            u64::from(!ok)
                        }
                        n => {
                            let answer = http
                                .post(format!("{}/v1/messages/batch", bases[node]))
                                .bearer_auth(&api_key)
                                .json(&json!({ "messages": items }))
                                .send()
                                .await;
                            match answer {
                                Ok(r) if r.status().as_u16() == 202 => {
                                    let body: Value = r.json().await.unwrap_or_default();
                                    body["results"].as_array().map_or(n as u64, |rs| {
                                        rs.iter().filter(|r| r.get("error").is_some()).count()
                                            as u64
                                    })
                                }
                                _ => n as u64,
                            }
                        }
                    };
                    errors.fetch_add(failed, Ordering::Relaxed);
                }
            }
        }));
    }
    let mut last = 0;
    while delivered.load(Ordering::Relaxed) + errors.load(Ordering::Relaxed) < messages as u64 {
        anyhow::ensure!(
            t0.elapsed() < DEADLINE,
            "deadline: only {} of {messages} delivered",
            delivered.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = delivered.load(Ordering::Relaxed);
        if now / 5000 != last / 5000 {
            eprintln!("  {now} delivered…");
        }
        last = now;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let herald_cpu = nodes
        .iter()
        .filter_map(|n| cpu_seconds(n.child.id()))
        .sum::<f64>()
        - herald_cpu0;
    // Backends that existed at the start count from there; newer ones from their start.
    let pg_cpu: f64 = pg_backends(&mut pg)
        .await?
        .into_iter()
        .map(|(pid, now)| {
            now - pg_cpu0
                .iter()
                .find(|(p, _)| *p == pid)
                .map_or(0.0, |(_, then)| *then)
        })
        .sum();
    for t in tasks {
        t.await?;
    }
    for r in &readers {
        r.abort();
    }
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_unstable();
    let n = delivered.load(Ordering::Relaxed);
    let per_msg = |cpu: f64| cpu * 1e6 / n.max(1) as f64;
    println!(
        "{mode}, {batch} per request: {n} delivered of {messages} to {devices} devices on {NODES} nodes in {elapsed:.2} s = {:.0} msg/s; publish→deliver ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}; errors {}; CPU: herald {herald_cpu:.2} s = {:.0} µs/msg, postgres backends {pg_cpu:.2} s = {:.0} µs/msg",
        n as f64 / elapsed,
        percentile(&lat, 0.50),
        percentile(&lat, 0.90),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0),
        errors.load(Ordering::Relaxed),
        per_msg(herald_cpu),
        per_msg(pg_cpu),
    );
    // Acks of the last deliveries may still be on their way; the statistics are
    // flushed by each backend at most once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (wal1, upd, hot): (i64, i64, i64) = sqlx::query_as(
        "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::BIGINT, n_tup_upd, n_tup_hot_upd
         FROM pg_stat_user_tables WHERE relname = 'deliveries'",
    )
    .fetch_one(&mut pg)
    .await?;
    println!(
        "PostgreSQL: WAL {:.0} bytes/msg (the whole server's); inbox updates {upd}, HOT {hot} ({:.0}%)",
        (wal1 - wal0) as f64 / n.max(1) as f64,
        hot as f64 * 100.0 / upd.max(1) as f64
    );
    drop(nodes);
    Ok(())
}
