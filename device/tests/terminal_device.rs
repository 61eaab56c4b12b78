//! The `herald-device` binary against a real gateway: it prints what is published to
//! it, once, registers its push token, and exits when told.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use herald_gateway::testing::{http_request, TempDir, TestGateway};
use herald_protocol::{PublishRequest, Target};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_herald-device");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prints_live_and_backlog_messages_once_and_registers_push() {
    let tg = TestGateway::start().await;
    let token = tg.mint_token("ann", Duration::from_secs(600));
    let data = TempDir::new("herald-device");
    // A message waiting before the device ever connects: delivered as backlog.
    let claim = http_request(
        "PUT",
        &format!("{}/v1/me/devices/term-1", tg.base_url),
        &token,
        Some(r#"{"platform":"other"}"#),
    )
    .await;
    assert_eq!(claim.0, 200, "{}", claim.1);
    tg.publish(&PublishRequest::new(
        Target::Device("term-1".into()),
        json!({"n": "backlog"}),
    ))
    .await;

    let mut child = Command::new(BIN)
        .args([
            "--url",
            &tg.base_url,
            "--device",
            "term-1",
            "--push",
            "fcm:fake-token",
        ])
        .args([
            "--subscribe",
            "news",
            "--count",
            "3",
            "--timeout",
            "30",
            "--data-dir",
        ])
        .arg(&data.0)
        .env("HERALD_TOKEN", &token)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Waits until some line printed so far (in any order) contains `what`.
    let mut lines: Vec<String> = Vec::new();
    let mut saw = |what: &str| {
        while !lines.iter().any(|l| l.contains(what)) {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no {what}; got {lines:?}"));
            lines.push(line);
        }
        lines.iter().find(|l| l.contains(what)).unwrap().clone()
    };
    assert!(saw("[push]").contains("Active"));
    saw("[topic] news subscribed");
    saw(r#"data={"n":"backlog"}"#);
    tg.publish(&PublishRequest::new(
        Target::Device("term-1".into()),
        json!({"n": "live"}),
    ))
    .await;
    saw(r#"data={"n":"live"}"#);
    tg.publish(&PublishRequest::new(
        Target::Topic("news".into()),
        json!({"n": "topic"}),
    ))
    .await;
    saw(r#"data={"n":"topic"}"#);
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("[msg]")).count(),
        3,
        "{lines:?}"
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    // Restarted on the same data dir: only what is new, nothing repeated.
    tg.publish(&PublishRequest::new(
        Target::Device("term-1".into()),
        json!({"n": "fourth"}),
    ))
    .await;
    let out = Command::new(BIN)
        .args([
            "--url",
            &tg.base_url,
            "--device",
            "term-1",
            "--count",
            "1",
            "--timeout",
            "30",
        ])
        .arg("--data-dir")
        .arg(&data.0)
        .env("HERALD_TOKEN", &token)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let msgs: Vec<&str> = stdout.lines().filter(|l| l.starts_with("[msg]")).collect();
    assert_eq!(msgs.len(), 1, "{stdout}");
    assert!(
        msgs[0].contains("seq=4") && msgs[0].contains("fourth"),
        "{stdout}"
    );
    let (_, device) = http_request(
        "GET",
        &format!("{}/v1/devices/term-1", tg.base_url),
        &tg.api_key,
        None,
    )
    .await;
    let device: serde_json::Value = serde_json::from_str(&device).unwrap();
    assert_eq!(device["push_provider"], "fcm");
    // The first run's cursor (seq 3) reached the gateway at the latest on reconnect.
    assert!(device["acked_seq"].as_i64().unwrap() >= 3, "{device}");
}

#[test]
fn a_bad_url_fails_with_a_message_saying_what_to_check() {
    let out = Command::new(BIN)
        .args([
            "--url",
            "not a url",
            "--device",
            "d",
            "--token",
            "t",
            "--timeout",
            "5",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--url"), "{err}");
}

/// Publishes `n` messages to `device` (over the real HTTP API).
async fn backlog(tg: &TestGateway, device: &str, n: usize) {
    for i in 0..n {
        tg.publish(&PublishRequest::new(
            Target::Device(device.into()),
            json!({ "n": i }),
        ))
        .await;
    }
}

/// Starts herald-device on `data`, returns it and its `[msg]` ids as they come.
fn spawn_device(
    tg: &TestGateway,
    token: &str,
    device: &str,
    data: &TempDir,
    extra: &[&str],
) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(["--url", &tg.base_url, "--device", device, "--timeout", "60"])
        .args(extra)
        .arg("--data-dir")
        .arg(&data.0)
        .env("HERALD_TOKEN", token)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("[msg] ") {
                let id = rest.split(' ').nth(1).unwrap_or_default().to_string();
                let _ = tx.send(id);
            }
        }
    });
    (child, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_1000_message_replay_repeats_at_most_one_per_kill() {
    let tg = TestGateway::start().await;
    let token = tg.mint_token("ann", Duration::from_secs(600));
    let data = TempDir::new("herald-device-kill");
    let claim = http_request(
        "PUT",
        &format!("{}/v1/me/devices/kill-1", tg.base_url),
        &token,
        Some(r#"{"platform":"other"}"#),
    )
    .await;
    assert_eq!(claim.0, 200, "{}", claim.1);
    const TOTAL: usize = 1000;
    backlog(&tg, "kill-1", TOTAL).await;
    let mut ids: Vec<String> = Vec::new();
    // Killed (SIGKILL) at full replay speed, wherever it is, three times.
    for kill_after in [120, 200, 260] {
        let (mut child, rx) = spawn_device(&tg, &token, "kill-1", &data, &[]);
        let mut this_run = 0;
        while this_run < kill_after {
            ids.push(rx.recv_timeout(Duration::from_secs(30)).expect("replay"));
            this_run += 1;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // What was printed before the kill landed counts too (read to EOF).
        ids.extend(rx.iter());
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert!(
            distinct.len() < TOTAL,
            "the replay was over before the kill"
        );
    }
    let distinct_so_far = ids.iter().collect::<std::collections::HashSet<_>>().len();
    let (mut child, rx) = spawn_device(
        &tg,
        &token,
        "kill-1",
        &data,
        &["--count", &(TOTAL - distinct_so_far + 1).to_string()],
    );
    // The last run may start with the one repeated message: count distinct ones.
    while ids.iter().collect::<std::collections::HashSet<_>>().len() < TOTAL {
        ids.push(
            rx.recv_timeout(Duration::from_secs(30))
                .expect("rest of the replay"),
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    let repeats = ids.len() - distinct.len();
    println!(
        "{} deliveries of {TOTAL} messages over 3 SIGKILLs: {repeats} repeated",
        ids.len()
    );
    assert_eq!(distinct.len(), TOTAL);
    assert!(repeats <= 3, "{repeats} repeats over 3 kills");
    for (i, id) in ids.iter().enumerate() {
        if ids[..i].contains(id) {
            assert_eq!(&ids[i - 1], id, "repeat of an older message at {i}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_for_push_logout_and_generated_id() {
    let tg = TestGateway::start().await;
    let token = tg.mint_token("ann", Duration::from_secs(600));
    let data = TempDir::new("herald-device-flags");
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["--url", &tg.base_url, "--timeout", "30"])
            .args(args)
            .arg("--data-dir")
            .arg(&data.0)
            .env("HERALD_TOKEN", &token)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    // No --device: a generated UUID, the same on the next run.
    let first = run(&["--push", "fcm:flag-token", "--count", "0"]);
    let id = first
        .lines()
        .find_map(|l| l.strip_prefix("[device] "))
        .unwrap()
        .to_string();
    assert_eq!(id.len(), 36, "{first}");
    let resp = tg
        .publish(&PublishRequest::new(
            Target::Device(id.clone()),
            json!({"n": "pushed"}),
        ))
        .await;
    let payload = format!(
        r#"{{"herald_id":"{}","herald_seq":"1","herald_device":"{id}","herald_hint":"1"}}"#,
        resp.message_id
    );
    let pushed = run(&["--handle-push", &payload, "--stats"]);
    assert!(pushed.contains(&format!("[device] {id}")), "{pushed}");
    assert!(pushed.contains(r#"data={"n":"pushed"}"#), "{pushed}");
    assert!(
        pushed.contains("[push] 1 message(s), acked=true"),
        "{pushed}"
    );
    let again = run(&["--handle-push", &payload]);
    assert!(again.contains("[push] 0 message(s)"), "{again}");
    let device = |tg: &TestGateway, id: String| {
        let url = format!("{}/v1/devices/{id}", tg.base_url);
        let key = tg.api_key.clone();
        async move {
            let (_, body) = http_request("GET", &url, &key, None).await;
            serde_json::from_str::<serde_json::Value>(&body).unwrap()
        }
    };
    let d = device(&tg, id.clone()).await;
    assert_eq!(d["push_token"], "active");
    assert_eq!(d["acked_seq"], 1, "{d}");
    let out = run(&["--logout"]);
    assert!(out.contains("[logout]"), "{out}");
    assert_eq!(device(&tg, id.clone()).await["push_token"], "none");
    // The generated id is gone with the local state: the next user gets a new one.
    let next = run(&["--count", "0"]);
    assert!(!next.contains(&id), "{next}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_flag_forces_sse_or_long_poll() {
    let tg = TestGateway::start().await;
    for (flag, kind) in [("sse", "Sse"), ("poll", "LongPoll"), ("ws", "WebSocket")] {
        let device = format!("term-{flag}");
        let token = tg.mint_device_token("ann", &device, &["*"], Duration::from_secs(600));
        let claim = http_request(
            "PUT",
            &format!("{}/v1/me/devices/{device}", tg.base_url),
            &token,
            Some(r#"{"platform":"other"}"#),
        )
        .await;
        assert_eq!(claim.0, 200, "{}", claim.1);
        backlog(&tg, &device, 3).await;
        let data = TempDir::new("herald-device-transport");
        let out = tokio::task::spawn_blocking({
            let (url, device, token, dir) = (
                tg.base_url.clone(),
                device.clone(),
                token.clone(),
                data.0.clone(),
            );
            move || {
                Command::new(BIN)
                    .args(["--url", &url, "--device", &device, "--transport", flag])
                    .args(["--count", "3", "--timeout", "30", "--data-dir"])
                    .arg(dir)
                    .env("HERALD_TOKEN", token)
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{flag}: {stdout}");
        assert!(
            stdout.contains(&format!("[state] Connected {{ transport: {kind} }}")),
            "{flag}: {stdout}"
        );
        assert_eq!(stdout.matches("[msg] ").count(), 3, "{flag}: {stdout}");
    }
    let out = Command::new(BIN)
        .args(["--token", "t", "--transport", "pigeon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("auto, ws, sse or poll"));
}
