//! The push route end to end: the real gateway, its FCM HTTP v1 client, and a mock FCM
//! + OAuth server speaking the real protocol.

use crate::common;

use std::time::Duration;

use common::fcm_mock::{google_error, MockFcm};
use common::*;
use herald_gateway::testing::TestGateway;
use serde_json::{json, Value};

async fn gateway_with_mock(
    mock: &MockFcm,
    customize: impl FnOnce(&mut herald_gateway::config::Config),
) -> TestGateway {
    let fcm = mock.config();
    TestGateway::start_with(move |c| {
        c.push.fcm = Some(fcm);
        c.push.base_backoff_ms = 50;
        c.push.poll_interval_ms = 50;
        c.delivery.ack_timeout_ms = 400;
        customize(c);
    })
    .await
}

async fn status(tg: &TestGateway, id: &str) -> Value {
    get(tg, &format!("/v1/messages/{id}"), &tg.api_key).await.1
}

async fn wait_state(tg: &TestGateway, id: &str, state: &str) -> Value {
    eventually(&format!("state {state}"), || async {
        let v = status(tg, id).await;
        (v["deliveries"][0]["state"] == state).then_some(v["deliveries"][0].clone())
    })
    .await
}

#[tokio::test]
async fn offline_device_gets_exactly_one_push_with_the_v1_body() {
    let mock = MockFcm::start(3600).await;
    let tg = gateway_with_mock(&mock, |_| {}).await;
    register(&tg, "u", "droid", Some(("fcm", "fcm-token-A"))).await;
    let r = publish(&tg, json!({
        "to": {"device": "droid"}, "data": {"order": 7},
        "notification": {"title": "Hi", "body": "There"}, "priority": "high", "collapse_key": "c1"
    }))
    .await;
    let id = r["message_id"].as_str().unwrap();
    let d = wait_state(&tg, id, "pushed").await;
    assert_eq!(d["push_provider"], "fcm");
    assert!(d["pushed_at"].is_string());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bodies = mock.bodies();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let m = &bodies[0]["message"];
    assert_eq!(m["token"], "fcm-token-A");
    assert_eq!(m["notification"], json!({"title": "Hi", "body": "There"}));
    assert_eq!(m["data"]["herald_id"], id);
    assert_eq!(m["data"]["herald_seq"], "1");
    assert_eq!(m["data"]["herald_device"], "droid");
    assert_eq!(
        serde_json::from_str::<Value>(m["data"]["herald_data"].as_str().unwrap()).unwrap(),
        json!({"order": 7})
    );
    assert_eq!(m["android"]["priority"], "high");
    // The message's own collapse key wins over its id.
    assert_eq!(m["android"]["collapse_key"], "c1");
    assert_eq!(mock.token_requests(), 1);
    mock.assert_no_problems();
    let metrics = metrics_text(&tg).await;
    assert!(
        metrics.contains("herald_pushes_total{outcome=\"delivered\",provider=\"fcm\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn online_device_that_acks_gets_no_fallback_push_but_always_pushes() {
    let mock = MockFcm::start(3600).await;
    let tg = gateway_with_mock(&mock, |_| {}).await;
    register(&tg, "u", "droid", Some(("fcm", "tok"))).await;
    let mut dev = connect(&tg, "u", "droid", None).await;
    let fallback = publish(&tg, json!({"to": {"device": "droid"}, "data": {"p": 1}})).await;
    let always = publish(
        &tg,
        json!({"to": {"device": "droid"}, "data": {"p": 2}, "push": "always"}),
    )
    .await;
    assert_eq!(dev.msg().await.seq, 1);
    assert_eq!(dev.msg().await.seq, 2);
    dev.ack(2).await;
    wait_state(&tg, fallback["message_id"].as_str().unwrap(), "acked").await;
    wait_state(&tg, always["message_id"].as_str().unwrap(), "acked").await;
    // Past the ack timeout and the poller's grace: still exactly the one `always` push.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let bodies = mock.bodies();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert_eq!(
        bodies[0]["message"]["data"]["herald_id"],
        always["message_id"]
    );
}

#[tokio::test]
async fn ack_timeout_falls_back_to_push() {
    let mock = MockFcm::start(3600).await;
    let tg = gateway_with_mock(&mock, |_| {}).await;
    register(&tg, "u", "droid", Some(("fcm", "tok"))).await;
    let mut dev = connect(&tg, "u", "droid", None).await;
    let r = publish(&tg, json!({"to": {"device": "droid"}, "data": {}})).await;
    assert_eq!(dev.msg().await.seq, 1);
    // Half-open: the client never acks.
    wait_state(&tg, r["message_id"].as_str().unwrap(), "pushed").await;
    assert_eq!(mock.bodies().len(), 1);
}

#[tokio::test]
async fn unregistered_token_is_deactivated_and_not_used_again() {
    let mock = MockFcm::start(3600).await;
    let tg = gateway_with_mock(&mock, |_| {}).await;
    register(&tg, "u", "droid", Some(("fcm", "dead-token"))).await;
    mock.script(404, vec![], google_error(404, "NOT_FOUND", "Requested entity was not found.",
        json!([{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}])));
    let first = publish(&tg, json!({"to": {"device": "droid"}, "data": {}})).await;
    let d = wait_state(&tg, first["message_id"].as_str().unwrap(), "push_failed").await;
    assert!(
        d["reason"].as_str().unwrap().contains("UNREGISTERED"),
        "{d}"
    );
    let (_, device) = get(&tg, "/v1/devices/droid", &tg.api_key).await;
    assert_eq!(device["push_token"], "invalid");
    let second = publish(&tg, json!({"to": {"device": "droid"}, "data": {}})).await;
    let d = wait_state(&tg, second["message_id"].as_str().unwrap(), "push_failed").await;
    assert!(d["reason"].as_str().unwrap().contains("invalidated"), "{d}");
    assert_eq!(mock.send_requests(), 1, "no send to a dead token");
    // Re-registering activates it again.
    register(&tg, "u", "droid", Some(("fcm", "fresh-token"))).await;
    let third = publish(&tg, json!({"to": {"device": "droid"}, "data": {}})).await;
    wait_state(&tg, third["message_id"].as_str().unwrap(), "pushed").await;
    assert_eq!(
        mock.bodies().last().unwrap()["message"]["token"],
        "fresh-token"
    );
}

#[tokio::test]
async fn rate_limited_push_honours_retry_after_then_succeeds() {
    let mock = MockFcm::start(3600).await;
    let tg = gateway_with_mock(&mock, |_| {}).await;
    register(&tg, "u", "droid", Some(("fcm", "tok"))).await;
    mock.script(
        429,
        vec![("retry-after", "1".into())],
        google_error(429, "RESOURCE_EXHAUSTED", "quota", json!([])),
    );
    let started = std::time::Instant::now();
    let r = publish(&tg, json!({"to": {"device": "droid"}, "data": {}})).await;
    wait_state(&tg, r["message_id"].as_str().unwrap(), "pushed").await;
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "Retry-After ignored: {:?}",
        started.elapsed()
    );
    assert_eq!(mock.send_requests(), 2);
    assert_eq!(mock.bodies().len(), 2);
}

#[tokio::test]
async fn unavailable_provider_exhausts_retries_then_push_failed() {
    let mock = MockFcm::start(3600).await;
    let tg = gateway_with_mock(&mock, |c| c.push.max_attempts = 3).await;
    register(&tg, "u", "droid", Some(("fcm", "tok"))).await;
    for _ in 0..10 {
        mock.script(
            503,
            vec![],
            google_error(503, "UNAVAILABLE", "try later", json!([])),
        );
    }
    let r = publish(&tg, json!({"to": {"device": "droid"}, "data": {}})).await;
    let d = wait_state(&tg, r["message_id"].as_str().unwrap(), "push_failed").await;
    let reason = d["reason"].as_str().unwrap();
    assert!(reason.contains("gave up after 3 attempts"), "{reason}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(mock.send_requests(), 3);
}

#[tokio::test]
async fn refused_credentials_are_loud_in_readyz_and_recorded() {
    let mock = MockFcm::start(3600).await;
    let tg = gateway_with_mock(&mock, |_| {}).await;
    register(&tg, "u", "droid", Some(("fcm", "tok"))).await;
    mock.state
        .refuse_all
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let r = publish(&tg, json!({"to": {"device": "droid"}, "data": {}})).await;
    let d = wait_state(&tg, r["message_id"].as_str().unwrap(), "push_failed").await;
    assert!(d["reason"].as_str().unwrap().contains("auth"), "{d}");
    let body = http()
        .get(format!("{}/readyz", tg.base_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.contains("push fcm: DEGRADED"), "{body}");
    // The next accepted push clears it.
    mock.state
        .refuse_all
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let r = publish(&tg, json!({"to": {"device": "droid"}, "data": {}})).await;
    wait_state(&tg, r["message_id"].as_str().unwrap(), "pushed").await;
    let body = http()
        .get(format!("{}/readyz", tg.base_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "ready\n");
}

#[tokio::test]
async fn a_slow_provider_blocks_neither_publishing_nor_live_delivery() {
    let mock = MockFcm::start(3600).await;
    let tg = gateway_with_mock(&mock, |c| c.push.workers = 2).await;
    mock.state
        .send_delay_ms
        .store(5_000, std::sync::atomic::Ordering::SeqCst);
    for i in 0..20 {
        register(&tg, "off", &format!("offline-{i}"), Some(("fcm", "tok"))).await;
    }
    let mut live = connect(&tg, "on", "online", None).await;
    let started = std::time::Instant::now();
    // 20 pushes stuck behind a 5 s provider with 2 workers...
    publish(&tg, json!({"to": {"user": "off"}, "data": {}})).await;
    // ...and live traffic still flows at once.
    for i in 0..10 {
        publish(&tg, json!({"to": {"device": "online"}, "data": {"i": i}})).await;
        let m = live.msg().await;
        live.ack(m.seq).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_socket_that_stops_draining_still_gets_its_fallback_pushes() {
    let mock = MockFcm::start(3600).await;
    let tg = gateway_with_mock(&mock, |c| {
        c.limits.max_body_bytes = 256 * 1024;
        c.limits.max_message_bytes = 256 * 1024;
    })
    .await;
    register(&tg, "u", "droid", Some(("fcm", "tok"))).await;
    // A live socket whose reader stopped (a suspended app): a tiny receive window, and
    // nothing read after the handshake, so the server's writes soon block.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    let stream = socket
        .connect(tg.base_url.trim_start_matches("http://").parse().unwrap())
        .await
        .unwrap();
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        tg.ws_url("droid", None),
    )
    .unwrap();
    let token = tg.mint_token("u", Duration::from_secs(600));
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "herald.v1".parse().unwrap());
    let (_stalled, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    eventually("online", || async {
        let (_, d) = get(&tg, "/v1/devices/droid", &tg.api_key).await;
        (d["online"] == true).then_some(())
    })
    .await;

    // Publish until the socket's buffers (several MB on loopback) are full and the
    // session task is stuck in a write: entries wait behind it and nothing moves.
    let big = "x".repeat(100 * 1024);
    let mut ids = Vec::new();
    loop {
        assert!(ids.len() < 300, "the socket never stopped draining");
        let n = ids.len();
        let r = publish(
            &tg,
            json!({"to": {"device": "droid"}, "data": {"n": n, "pad": big}}),
        )
        .await;
        ids.push(r["message_id"].as_str().unwrap().to_owned());
        let written = metric(&tg, "herald_delivered_live_total").await;
        if written + 2 <= ids.len() as u64 {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            if metric(&tg, "herald_delivered_live_total").await == written {
                break;
            }
        }
    }
    // Every one is pushed once its ack is overdue: the first ones the session wrote,
    // the one it is stuck on and the ones still queued behind it alike.
    for id in &ids {
        eventually_within(Duration::from_secs(20), &format!("{id} pushed"), || async {
            (status(&tg, id).await["deliveries"][0]["state"] == "pushed").then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pushed: Vec<String> = mock
        .bodies()
        .iter()
        .map(|b| {
            b["message"]["data"]["herald_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let mut want = ids.clone();
    want.sort();
    let mut got = pushed.clone();
    got.sort();
    assert_eq!(got, want, "each message pushed exactly once");
    mock.assert_no_problems();
}

#[tokio::test]
async fn a_timed_out_push_is_retried_under_the_message_id_as_collapse_key() {
    let mock = MockFcm::start(3600).await;
    let tg = gateway_with_mock(&mock, |c| {
        c.push.fcm.as_mut().unwrap().timeout_ms = 300;
    })
    .await;
    register(&tg, "u", "droid", Some(("fcm", "tok"))).await;
    // The first request outlives the client's timeout: FCM may or may not have shown it.
    mock.state
        .send_delay_ms
        .store(1500, std::sync::atomic::Ordering::SeqCst);
    let r = publish(
        &tg,
        json!({"to": {"device": "droid"}, "data": {"n": 1},
        "notification": {"title": "Hi"}}),
    )
    .await;
    let id = r["message_id"].as_str().unwrap();
    eventually("first attempt", || async {
        (mock.send_requests() >= 1).then_some(())
    })
    .await;
    mock.state
        .send_delay_ms
        .store(0, std::sync::atomic::Ordering::SeqCst);
    let d = wait_state(&tg, id, "pushed").await;
    assert_eq!(d["push_provider"], "fcm");
    assert_eq!(mock.send_requests(), 2, "retried once");
    // Every attempt the mock saw carries the same collapse key, the message id (it
    // has none of its own): if both reached the device, the second replaces the first.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let bodies = mock.bodies();
    assert!(!bodies.is_empty());
    for b in &bodies {
        assert_eq!(b["message"]["android"]["collapse_key"], id, "{b}");
        assert_eq!(b["message"]["data"]["herald_id"], id);
    }
    mock.assert_no_problems();
}

#[tokio::test]
async fn a_removed_push_token_is_never_used_again() {
    let mock = MockFcm::start(3600).await;
    let tg = gateway_with_mock(&mock, |_| {}).await;
    register(&tg, "u", "droid", Some(("fcm", "tok-before-logout"))).await;
    let path = format!("{}/v1/me/devices/droid/push_token", tg.base_url);
    // Another user may not remove it.
    let thief = tg.mint_token("thief", Duration::from_secs(60));
    let resp = http()
        .delete(&path)
        .bearer_auth(&thief)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let (_, device) = get(&tg, "/v1/devices/droid", &tg.api_key).await;
    assert_eq!(device["push_token"], "active");
    // The owner removes it; twice is fine.
    let owner = tg.mint_token("u", Duration::from_secs(60));
    for _ in 0..2 {
        let resp = http()
            .delete(&path)
            .bearer_auth(&owner)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 204);
    }
    let (_, device) = get(&tg, "/v1/devices/droid", &tg.api_key).await;
    assert_eq!(device["push_token"], "none", "{device}");
    assert_eq!(device["platform"], "android", "the device itself stays");
    let r = publish(&tg, json!({"to": {"device": "droid"}, "data": {}})).await;
    let d = wait_state(&tg, r["message_id"].as_str().unwrap(), "push_failed").await;
    assert!(
        d["reason"].as_str().unwrap().contains("no push token"),
        "{d}"
    );
    assert_eq!(mock.send_requests(), 0, "nothing sent to the removed token");
    // An unknown device is a JSON 404.
    let resp = http()
        .delete(format!("{}/v1/me/devices/nobody/push_token", tg.base_url))
        .bearer_auth(&owner)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found", "{body}");
}
