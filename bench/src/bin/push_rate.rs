//! Push fallback throughput: N offline devices with FCM tokens, one publish to their
//! user per round, timed until the mock FCM (real HTTP, OAuth token exchange included)
//! has accepted every push and every delivery record says `pushed`.
//!
//! cargo run --release -p herald-bench --bin push_rate -- [devices] [rounds] [workers]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::{Json, Router};
use herald_gateway::config::Config;
use herald_gateway::push::config::FcmConfig;
use herald_gateway::testing::TempDir;
use herald_gateway::Application;
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use serde_json::json;

/// Every run stops by itself after this long.
const DEADLINE: Duration = Duration::from_secs(180);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let devices = *args.first().unwrap_or(&10_000);
    let rounds = *args.get(1).unwrap_or(&3);
    let workers = *args.get(2).unwrap_or(&64) as usize;
    anyhow::ensure!(
        devices <= 200_000 && rounds <= 20,
        "bounded: at most 200k devices, 20 rounds"
    );
    let started = Instant::now();

    // Mock FCM: token endpoint + messages:send, counting accepted pushes.
    let sent = Arc::new(AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mock = format!("http://{}", listener.local_addr()?);
    let counter = sent.clone();
    let app = Router::new()
        .route(
            "/token",
            post(|| async { Json(json!({"access_token": "bench-token", "expires_in": 3600, "token_type": "Bearer"})) }),
        )
        .route(
            "/v1/projects/{project}/{action}",
            post(move || {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::Relaxed);
                    Json(json!({"name": "projects/bench/messages/1"}))
                }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });

    eprintln!("generating a service-account key…");
    let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048)?;
    let account = json!({
        "type": "service_account", "project_id": "bench", "private_key_id": "k1",
        "private_key": key.to_pkcs8_pem(LineEnding::LF)?.to_string(),
        "client_email": "bench@bench.iam.gserviceaccount.com", "token_uri": format!("{mock}/token"),
    });

    let tmp = TempDir::new("herald-bench-push");
    let mut config = Config {
        listen: "127.0.0.1:0".parse()?,
        data_dir: tmp.0.clone(),
        ..Config::default()
    };
    config.push.workers = workers;
    config.push.fcm = Some(FcmConfig {
        service_account_json: Some(account.to_string()),
        base_url: Some(mock.clone()),
        timeout_ms: 10_000,
        ..Default::default()
    });
    config.limits.max_recipients = 200_000;
    let gw = Application::build(config).await?;
    let base = format!("http://{}", gw.local_addr());
    let store = gw.state().store.clone();
    let (_, api_key) = herald_gateway::auth::create_api_key(
        store.as_ref(),
        "bench",
        &[herald_gateway::auth::Scope::Admin],
    )
    .await?;

    eprintln!("registering {devices} offline devices with FCM tokens…");
    let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", tmp.0.join("herald.db").display()))
        .await?;
    let mut tx = db.begin().await?;
    for i in 0..devices {
        sqlx::query(
            "INSERT INTO devices (id, user_id, platform, push_provider, push_token, token_state, created_at)
             VALUES (?, 'bench', 'android', 'fcm', ?, 'active', 0)",
        )
        .bind(format!("dev-{i}"))
        .bind(format!("fcm-token-{i}"))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    db.close().await;

    let stop = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(gw.run_until_stopped(async move {
        let _ = stop.1.await;
    }));
    let http = reqwest::Client::new();
    let mut rates = Vec::new();
    let mut push_rates = Vec::new();
    for round in 1..=rounds {
        let before = sent.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let resp: serde_json::Value = http
            .post(format!("{base}/v1/messages"))
            .bearer_auth(&api_key)
            .json(&json!({"to": {"user": "bench"}, "data": {"round": round}, "notification": {"title": "Bench", "body": "round"}}))
            .send()
            .await?
            .json()
            .await?;
        let publish_ms = t0.elapsed().as_millis();
        let id = resp["message_id"].as_str().unwrap_or_default().to_owned();
        anyhow::ensure!(
            resp["recipients"] == devices,
            "unexpected publish answer {resp}"
        );
        let mut last_report = Instant::now();
        while sent.load(Ordering::Relaxed) - before < devices {
            anyhow::ensure!(started.elapsed() < DEADLINE, "deadline reached");
            if last_report.elapsed() > Duration::from_secs(2) {
                eprintln!(
                    "  round {round}: {} / {devices} pushed",
                    sent.load(Ordering::Relaxed) - before
                );
                last_report = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let elapsed = t0.elapsed();
        // Every delivery record must say pushed (outcomes recorded, not just sent).
        let recorded = loop {
            let (_, rows) = store.message(&id).await?.expect("message stored");
            let pushed = rows
                .iter()
                .filter(|r| r.push_state.as_deref() == Some("pushed"))
                .count();
            if pushed as u64 == devices || started.elapsed() > DEADLINE {
                break t0.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let rate = devices as f64 / elapsed.as_secs_f64();
        // The push route alone: from the 202 (entries committed, pushes pending) on.
        let push_only = devices as f64 / (elapsed.as_secs_f64() - publish_ms as f64 / 1000.0);
        rates.push(rate);
        push_rates.push(push_only);
        println!(
            "round {round}: publish 202 in {publish_ms} ms; {devices} pushes accepted by mock FCM {:.3} s after the call = {rate:.0} pushes/s end to end, {push_only:.0} pushes/s after the 202; all recorded as pushed after {:.3} s",
            elapsed.as_secs_f64(),
            recorded.as_secs_f64()
        );
    }
    let _ = stop.0.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    let mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    let push_mean = push_rates.iter().sum::<f64>() / push_rates.len().max(1) as f64;
    println!(
        "push_rate: devices={devices} rounds={rounds} workers={workers} mean={mean:.0} pushes/s end to end, {push_mean:.0} pushes/s after the 202"
    );
    Ok(())
}
