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
