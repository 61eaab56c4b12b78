//! The real `herald` binary: first start, CLI, graceful shutdown, and kill -9 during a
//! publish burst losing nothing that was answered 202.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::process::{toml_string, HeraldProcess, BIN};
use common::{connect_with_token, WAIT};
use herald_gateway::testing::TempDir;
use herald_protocol::ServerFrame;
use serde_json::json;

fn spawn(data_dir: &Path) -> HeraldProcess {
    HeraldProcess::spawn(data_dir, &[], &[])
}

fn spawn_with(data_dir: &Path, extra: &[&str]) -> HeraldProcess {
    HeraldProcess::spawn(data_dir, extra, &[])
}

fn cli(data_dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run herald");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ws_url(base: &str, device: &str, after: i64) -> String {
    format!(
        "{}/v1/connect?device_id={device}&after={after}",
        base.replacen("http://", "ws://", 1)
    )
}

async fn register(base: &str, token: &str, device: &str) {
    let r = reqwest::Client::new()
        .put(format!("{base}/v1/me/devices/{device}"))
        .bearer_auth(token)
        .json(&json!({"platform": "ios"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn cli_manages_keys_and_mints_tokens() {
    let tmp = TempDir::new("herald-cli");
    let (ok, key, _) = cli(&tmp.0, &["keys", "create", "--name", "backend"]);
    assert!(ok);
    assert!(
        key.starts_with("hk_") && !key.contains(char::is_whitespace),
        "{key}"
    );
    let (ok, list, _) = cli(&tmp.0, &["keys", "list"]);
    assert!(ok);
    assert!(list.contains("backend") && !list.contains(&key), "{list}");
    let (ok, token, _) = cli(
        &tmp.0,
        &["token", "mint", "--user", "zoe", "--device-id", "zoe-phone"],
    );
    assert!(ok);
    assert_eq!(token.split('.').count(), 3, "{token}");

    let gw = spawn(&tmp.0);
    assert!(gw.api_key.is_none(), "a key exists: no first-start banner");
    let mut gw = gw;
    let http = reqwest::Client::new();
    let publish = |k: String| {
        let http = http.clone();
        let base = gw.base.clone();
        async move {
            http.post(format!("{base}/v1/messages"))
                .bearer_auth(k)
                .json(&json!({"to": {"user": "zoe"}, "data": {}}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(publish(key.clone()).await, 202);
    // The CLI-minted token works against the running gateway.
    let dev = connect_with_token(&ws_url(&gw.base, "zoe-phone", 0), &token).await;
    assert!(dev.is_ok());
    let id = list.split('\t').next().unwrap().to_owned();
    let (ok, _, _) = cli(&tmp.0, &["keys", "revoke", &id]);
    assert!(ok);
    assert_eq!(publish(key).await, 401);
    let (ok, _, err) = cli(&tmp.0, &["keys", "revoke", "key_nope"]);
    assert!(!ok && err.contains("herald keys list"), "{err}");
    gw.child.kill().unwrap();
}

#[tokio::test]
async fn sigterm_tells_clients_to_reconnect_and_exits_zero() {
    let tmp = TempDir::new("herald-term");
    let mut gw = spawn(&tmp.0);
    let api_key = gw.api_key.clone().expect("first start prints an API key");
    let (_, token, _) = cli(
        &tmp.0,
        &["token", "mint", "--user", "t", "--device-id", "t1"],
    );
    let mut dev = connect_with_token(&ws_url(&gw.base, "t1", 0), &token)
        .await
        .unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/messages", gw.base))
        .bearer_auth(&api_key)
        .json(&json!({"to": {"device": "t1"}, "data": {"before": "shutdown"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(dev.msg().await.seq, 1);
    let status = Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    match dev.frame().await {
        Some(ServerFrame::Reconnect { after_ms }) => assert!(after_ms > 0),
        other => panic!("expected reconnect, got {other:?}"),
    }
    assert!(dev.frame().await.is_none());
    let exit = tokio::task::spawn_blocking(move || gw.child.wait().map(|s| (s, gw)))
        .await
        .unwrap()
        .unwrap()
        .0;
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test]
async fn kill_9_during_a_publish_burst_loses_nothing_answered_202() {
    let tmp = TempDir::new("herald-crash");
    let mut gw = spawn(&tmp.0);
    let api_key = gw.api_key.clone().unwrap();
    let (_, token, _) = cli(
        &tmp.0,
        &["token", "mint", "--user", "crash", "--device-id", "victim"],
    );
    register(&gw.base, &token, "victim").await;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut publishers = Vec::new();
    for w in 0..8 {
        let (base, key, tx) = (gw.base.clone(), api_key.clone(), tx.clone());
        publishers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 0..10_000 {
                let r = http
                    .post(format!("{base}/v1/messages"))
                    .bearer_auth(&key)
                    .json(&json!({"to": {"device": "victim"}, "data": {"w": w, "i": i}, "push": "never"}))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().as_u16() == 202 => {
                        let v: serde_json::Value = r.json().await.unwrap();
                        let _ = tx.send(v["message_id"].as_str().unwrap().to_owned());
                    }
                    // The gateway died mid-request: not acknowledged, no promise.
                    _ => break,
                }
            }
        }));
    }
    drop(tx);
    // Let the burst run, then kill without warning.
    let mut accepted = Vec::new();
    while accepted.len() < 300 {
        accepted.push(
            tokio::time::timeout(WAIT, rx.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    gw.child.kill().unwrap();
    gw.child.wait().unwrap();
    for p in publishers {
        p.await.unwrap();
    }
    while let Some(id) = rx.recv().await {
        accepted.push(id);
    }

    let gw = spawn(&tmp.0);
    let mut dev = connect_with_token(&ws_url(&gw.base, "victim", 0), &token)
        .await
        .unwrap();
    let mut received = std::collections::HashSet::new();
    let mut expected_seq = 1;
    let device: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/v1/devices/victim", gw.base))
        .bearer_auth(&api_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let last_seq = device["last_seq"].as_i64().unwrap();
    assert!(last_seq as usize >= accepted.len());
    while expected_seq <= last_seq {
        let m = dev.msg().await;
        assert_eq!(m.seq, expected_seq, "replay has no gaps");
        expected_seq += 1;
        received.insert(m.id);
        if m.seq % 100 == 0 {
            dev.ack(m.seq).await;
        }
    }
    let lost: Vec<_> = accepted
        .iter()
        .filter(|id| !received.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} accepted messages lost: {:?}",
        lost.len(),
        accepted.len(),
        &lost[..lost.len().min(5)]
    );
    let mut gw = gw;
    gw.child.kill().unwrap();
}

#[tokio::test]
async fn kill_9_during_a_batch_publish_burst_loses_nothing_answered_202() {
    let tmp = TempDir::new("herald-crash-batch");
    let mut gw = spawn(&tmp.0);
    let api_key = gw.api_key.clone().unwrap();
    let (_, token, _) = cli(
        &tmp.0,
        &["token", "mint", "--user", "crash", "--device-id", "victim"],
    );
    register(&gw.base, &token, "victim").await;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<String>>();
    let mut publishers = Vec::new();
    for w in 0..4 {
        let (base, key, tx) = (gw.base.clone(), api_key.clone(), tx.clone());
        publishers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for b in 0..1_000 {
                let messages: Vec<_> = (0..50)
                    .map(|i| json!({"to": {"device": "victim"}, "data": {"w": w, "b": b, "i": i}, "push": "never"}))
                    .collect();
                let r = http
                    .post(format!("{base}/v1/messages/batch"))
                    .bearer_auth(&key)
                    .json(&json!({ "messages": messages }))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().as_u16() == 202 => {
                        let v: serde_json::Value = r.json().await.unwrap();
                        let ids = v["results"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|r| r["message_id"].as_str().expect("accepted item").to_owned())
                            .collect();
                        let _ = tx.send(ids);
                    }
                    // The gateway died mid-request: not acknowledged, no promise.
                    _ => break,
                }
            }
        }));
    }
    drop(tx);
    // Let the burst run, then kill without warning.
    let mut accepted = Vec::new();
    while accepted.len() < 1_000 {
        accepted.extend(
            tokio::time::timeout(WAIT, rx.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    gw.child.kill().unwrap();
    gw.child.wait().unwrap();
    for p in publishers {
        p.await.unwrap();
    }
    while let Some(ids) = rx.recv().await {
        accepted.extend(ids);
    }

    let gw = spawn(&tmp.0);
    let http = reqwest::Client::new();
    let mut received = std::collections::HashSet::new();
    let mut after = 0;
    loop {
        let page: serde_json::Value = http
            .get(format!(
                "{}/v1/me/sync?device_id=victim&after={after}&limit=500",
                gw.base
            ))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for m in page["messages"].as_array().unwrap() {
            let seq = m["seq"].as_i64().unwrap();
            assert_eq!(seq, after + 1, "the inbox has no gaps");
            after = seq;
            received.insert(m["id"].as_str().unwrap().to_owned());
        }
        if page["has_more"] != true {
            break;
        }
    }
    // A batch is all or nothing: every item of a batch is stored, or none.
    assert_eq!(received.len() % 50, 0, "{} stored", received.len());
    let lost: Vec<_> = accepted
        .iter()
        .filter(|id| !received.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} accepted messages lost: {:?}",
        lost.len(),
        accepted.len(),
        &lost[..lost.len().min(5)]
    );
    let mut gw = gw;
    gw.child.kill().unwrap();
}

#[tokio::test]
async fn bad_config_fails_with_a_message_naming_the_problem() {
    let tmp = TempDir::new("herald-badcfg");
    let file = tmp.0.join("herald.toml");
    std::fs::write(&file, "listen = 12\n").unwrap();
    let out = Command::new(BIN)
        .args(["migrate", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("herald.toml") && err.contains("listen"),
        "{err}"
    );
    let _ = Duration::from_secs(0);
}

#[tokio::test]
async fn a_push_waiting_for_retry_survives_kill_9_and_is_sent_once() {
    use common::fcm_mock::{google_error, MockFcm};
    let mock = MockFcm::start(3600).await;
    let tmp = TempDir::new("herald-push-restart");
    let fcm = mock.config();
    let config = tmp.0.join("herald.toml");
    std::fs::write(
        &config,
        format!(
            "[push]\nbase_backoff_ms = 50\npoll_interval_ms = 50\n[push.fcm]\nservice_account_json = {}\nbase_url = {:?}\n",
            toml_string(fcm.service_account_json.as_deref().unwrap()),
            fcm.base_url.as_deref().unwrap(),
        ),
    )
    .unwrap();
    let config_arg = config.to_str().unwrap();
    let mut gw = spawn_with(&tmp.0, &["--config", config_arg]);
    let api_key = gw.api_key.clone().unwrap();
    let (_, token, _) = cli(
        &tmp.0,
        &["token", "mint", "--user", "p", "--device-id", "pd"],
    );
    let r = reqwest::Client::new()
        .put(format!("{}/v1/me/devices/pd", gw.base))
        .bearer_auth(&token)
        .json(&json!({"platform": "android", "push_provider": "fcm", "push_token": "tok-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // FCM is overloaded and asks for 2 s.
    mock.script(
        429,
        vec![("retry-after", "2".into())],
        google_error(429, "RESOURCE_EXHAUSTED", "quota", json!([])),
    );
    let r: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v1/messages", gw.base))
        .bearer_auth(&api_key)
        .json(&json!({"to": {"device": "pd"}, "data": {"k": "v"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = r["message_id"].as_str().unwrap().to_owned();
    let status = |base: String| {
        let (key, id) = (api_key.clone(), id.clone());
        async move {
            let v: serde_json::Value = reqwest::Client::new()
                .get(format!("{base}/v1/messages/{id}"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["deliveries"][0].clone()
        }
    };
    // Wait until the 429 is recorded as a scheduled retry, then kill the gateway.
    common::eventually("retry scheduled", || {
        let s = status(gw.base.clone());
        async move {
            s.await["reason"]
                .as_str()
                .is_some_and(|r| r.contains("RESOURCE_EXHAUSTED") || r.contains("429"))
                .then_some(())
        }
    })
    .await;
    assert_eq!(mock.send_requests(), 1);
    gw.child.kill().unwrap();
    gw.child.wait().unwrap();

    let gw = spawn_with(&tmp.0, &["--config", config_arg]);
    let d = common::eventually("pushed after restart", || {
        let s = status(gw.base.clone());
        async move {
            let d = s.await;
            (d["state"] == "pushed").then_some(d)
        }
    })
    .await;
    assert_eq!(d["push_provider"], "fcm");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(mock.send_requests(), 2, "one refused attempt, one push");
    assert_eq!(mock.bodies().len(), 2);
    mock.assert_no_problems();
}

#[tokio::test]
async fn commands_on_a_missing_store_refuse_instead_of_creating_one() {
    let tmp = TempDir::new("herald-nostore");
    let missing = tmp.0.join("herald-data");
    for args in [
        &["keys", "list"][..],
        &["keys", "revoke", "key_x"],
        &["token", "mint", "--user", "zoe"],
    ] {
        let (ok, out, err) = cli(&missing, args);
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(
            err.contains("no Herald store in") && err.contains("--data-dir"),
            "{args:?}: {err}"
        );
        assert!(!missing.exists(), "{args:?} created {}", missing.display());
    }
    // Creating a key may create the store, and says where.
    let (ok, key, err) = cli(&missing, &["keys", "create"]);
    assert!(ok && key.starts_with("hk_"), "{err}");
    assert!(err.contains("created a new store in"), "{err}");
    let (ok, list, err) = cli(&missing, &["keys", "list"]);
    assert!(ok && list.contains("default"), "{err}");
    let (ok, _, err) = cli(&missing, &["keys", "create", "--name", "second"]);
    assert!(ok && !err.contains("created a new store"), "{err}");
}

#[test]
fn errors_name_their_cause_once_and_listen_belongs_to_serve() {
    let out = Command::new(BIN)
        .args(["migrate", "--config", "/nonexistent/herald.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/herald.toml"), "{err}");
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    // --listen only does something for `serve`, so no other command takes it.
    let out = Command::new(BIN)
        .args(["keys", "list", "--listen", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let help = Command::new(BIN).args(["keys", "--help"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&help.stdout).contains("--listen"));
    let help = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--listen"));
}

#[tokio::test]
async fn first_start_banner_shows_the_readme_client_and_how_to_use_the_secret() {
    let tmp = TempDir::new("herald-banner");
    let mut out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&tmp.0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    let stdout = out.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut text = String::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let done = line.starts_with("herald listening on");
            text.push_str(&line);
            text.push('\n');
            if done {
                break;
            }
        }
        text
    });
    let deadline = std::time::Instant::now() + WAIT;
    while !reader.is_finished() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = out.kill();
    let _ = out.wait();
    banner.push_str(&reader.join().unwrap());
    assert!(banner.contains("herald listening on"), "{banner}");
    assert!(
        banner.contains("npx --yes wscat@6 -s herald.v1"),
        "{banner}"
    );
    assert!(!banner.contains("websocat"), "{banner}");
    assert!(banner.contains("not hex-decoded"), "{banner}");
}

#[test]
fn herald_demo_points_to_its_own_binary() {
    for args in [
        &["demo"][..],
        &["demo", "--platform", "apns", "--keep"],
        &["demo", "--help"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("cargo build --release -p herald-demo")
                && err.contains("target/release/herald-demo"),
            "{args:?}: {err}"
        );
    }
}
