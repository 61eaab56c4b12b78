//! `POST /v1/messages/batch` against the real server, on SQLite and on PostgreSQL:
//! per-item results in request order, envelope errors that write nothing, delivery,
//! and rate limiting by items.

use crate::common;

use std::time::Duration;

use common::pg::PgDb;
use common::*;
use herald_gateway::config::Config;
use herald_gateway::testing::{http_request, TestGateway};
use herald_protocol::{ClientFrame, ServerFrame};
use serde_json::{json, Value};

async fn on_sqlite(customize: impl FnOnce(&mut Config)) -> (TestGateway, Option<PgDb>) {
    (TestGateway::start_with(customize).await, None)
}

async fn on_postgres(customize: impl FnOnce(&mut Config)) -> (TestGateway, Option<PgDb>) {
    let db = PgDb::create().await;
    let url = db.url.clone();
    let tg = TestGateway::start_with(move |c| {
        c.store = "postgres".into();
        c.database_url = Some(url);
        customize(c);
    })
    .await;
    (tg, Some(db))
}

async fn batch(tg: &TestGateway, body: &str) -> (u16, Value) {
    let (s, text) = http_request(
        "POST",
        &format!("{}/v1/messages/batch", tg.base_url),
        &tg.api_key,
        Some(body),
    )
    .await;
    (s, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn last_seq(tg: &TestGateway, device: &str) -> i64 {
    let (s, d) = get(tg, &format!("/v1/devices/{device}"), &tg.api_key).await;
    assert_eq!(s, 200, "{d}");
    d["last_seq"].as_i64().unwrap()
}

async fn items_get_their_own_results_in_order(tg: &TestGateway) {
    register(tg, "bo", "bo-phone", None).await;
    register(tg, "bo", "bo-tablet", None).await;
    let mut dev = connect(tg, "bo", "bo-phone", None).await;
    dev.send(&ClientFrame::Ping).await;
    assert_eq!(dev.frame().await, Some(ServerFrame::Pong));

    let body = json!({"messages": [
        {"to": {"device": "bo-phone"}, "data": {"n": 1}, "push": "never"},
        {"to": {"device": "bo-phone"}, "data": [1, 2]},
        {"to": {"device": "nobody"}, "data": {"n": 3}},
        {"to": {"user": "bo"}, "data": {"n": 4}, "push": "never", "idempotency_key": "k4"},
        {"to": {"device": "bo-phone"}, "data": {"n": 5}, "colour": "red"},
        {"to": {"device": "bo-phone"}, "data": {"n": 6}, "idempotency_key": "k4"},
        {"to": {"device": "bo-phone"}, "data": {"n": 7}, "push": "never", "ttl_seconds": 0},
        {"to": {"device": "bo-phone"}, "data": {"n": 8}, "push": "never"},
        {"to": {"device": "bo-phone", "user": "bo"}, "data": {"n": 9}},
    ]});
    let (s, v) = batch(tg, &body.to_string()).await;
    assert_eq!(s, 202, "{v}");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 9, "{v}");
    assert_eq!(
        (r[0]["recipients"].as_u64(), &r[0]["duplicate"]),
        (Some(1), &json!(false))
    );
    // Item i was refused with `code`, in a message starting `to:`, `data:`… as given.
    let refused = |i: usize, code: &str, message_starts: &str| {
        assert_eq!(r[i]["error"]["code"], code, "item {i}: {v}");
        let message = r[i]["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(message_starts), "item {i}: {v}");
    };
    refused(1, "invalid_field", "data:");
    refused(2, "not_found", "device nobody");
    assert_eq!(r[3]["recipients"], 2, "{v}");
    refused(4, "invalid_field", "colour: unknown field");
    assert_eq!(r[5]["duplicate"], true, "{v}");
    assert_eq!(r[5]["message_id"], r[3]["message_id"], "{v}");
    refused(6, "invalid_field", "ttl_seconds:");
    assert_eq!(r[7]["duplicate"], false, "{v}");
    refused(8, "invalid_field", "to: has both `device` and `user`");

    // The accepted items arrive live, in request order, and nothing else does.
    for (seq, (n, item)) in [(1, 0), (4, 3), (8, 7)].into_iter().enumerate() {
        let m = dev.msg().await;
        assert_eq!(m.seq, seq as i64 + 1);
        assert_eq!(m.data, json!({ "n": n }));
        assert_eq!(m.id, r[item]["message_id"].as_str().unwrap());
    }
    dev.quiet_for(Duration::from_millis(300)).await;
    assert_eq!(last_seq(tg, "bo-phone").await, 3);
    assert_eq!(last_seq(tg, "bo-tablet").await, 1);
    let (s, status) = get(
        tg,
        &format!("/v1/messages/{}", r[3]["message_id"].as_str().unwrap()),
        &tg.api_key,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(status["deliveries"].as_array().unwrap().len(), 2);
}

async fn a_bad_envelope_writes_nothing(tg: &TestGateway) {
    register(tg, "cy", "cy-phone", None).await;
    let item = json!({"to": {"device": "cy-phone"}, "data": {}, "push": "never"});
    // Empty items, so 501 of them fit the 2 KiB body limit and the count is what fails.
    let many: Vec<Value> = (0..501).map(|_| json!({})).collect();
    let cases: Vec<(String, u16)> = vec![
        ("not json".into(), 400),
        (format!(r#"{{"messages": [{item}]"#), 400),
        ("[1]".into(), 422),
        ("{}".into(), 422),
        (r#"{"messages": {}}"#.into(), 422),
        (json!({"messages": []}).to_string(), 422),
        (json!({ "messages": many }).to_string(), 422),
        (json!({"messages": [item], "extra": 1}).to_string(), 422),
    ];
    for (body, want) in cases {
        let (s, v) = batch(tg, &body).await;
        assert_eq!(s, want, "{body:.80}: {v}");
        assert!(v["error"]["code"].is_string(), "{v}");
    }
    // Larger than limits.max_batch_bytes (2 KiB here).
    let big: Vec<Value> = (0..40).map(|_| item.clone()).collect();
    let (s, v) = batch(tg, &json!({ "messages": big }).to_string()).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (413, Some("too_large")),
        "{v}"
    );
    // An Idempotency-Key header has no meaning for a batch.
    let resp = http()
        .post(format!("{}/v1/messages/batch", tg.base_url))
        .bearer_auth(&tg.api_key)
        .header("Idempotency-Key", "x")
        .json(&json!({"messages": [item]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    assert_eq!(last_seq(tg, "cy-phone").await, 0);
    // A valid batch still goes through.
    let (s, v) = batch(tg, &json!({"messages": [item, item]}).to_string()).await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(last_seq(tg, "cy-phone").await, 2);
}

fn small_batches(c: &mut Config) {
    c.limits.max_batch_bytes = 2048;
}

#[tokio::test]
async fn sqlite_items_get_their_own_results_in_order() {
    let (tg, _) = on_sqlite(|_| {}).await;
    items_get_their_own_results_in_order(&tg).await;
}

#[tokio::test]
async fn postgres_items_get_their_own_results_in_order() {
    let (tg, db) = on_postgres(|_| {}).await;
    items_get_their_own_results_in_order(&tg).await;
    tg.stop().await;
    db.unwrap().drop_db().await;
}

#[tokio::test]
async fn sqlite_a_bad_envelope_writes_nothing() {
    let (tg, _) = on_sqlite(small_batches).await;
    a_bad_envelope_writes_nothing(&tg).await;
}

#[tokio::test]
async fn postgres_a_bad_envelope_writes_nothing() {
    let (tg, db) = on_postgres(small_batches).await;
    a_bad_envelope_writes_nothing(&tg).await;
    tg.stop().await;
    db.unwrap().drop_db().await;
}

#[tokio::test]
async fn rate_limiting_counts_items() {
    let tg = TestGateway::start_with(|c| {
        c.limits.publish_rate_per_key = 1;
        c.limits.publish_burst_per_key = 10;
    })
    .await;
    register(&tg, "di", "di-phone", None).await;
    let item = json!({"to": {"device": "di-phone"}, "data": {}, "push": "never"});
    let eight: Vec<Value> = (0..8).map(|_| item.clone()).collect();
    let (s, v) = batch(&tg, &json!({ "messages": eight }).to_string()).await;
    assert_eq!(s, 202, "{v}");
    // 2 tokens left: another 8 items are refused whole, and write nothing.
    let (s, v) = batch(&tg, &json!({ "messages": eight }).to_string()).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("rate_limited")),
        "{v}"
    );
    assert_eq!(last_seq(&tg, "di-phone").await, 8);
    let (s, v) = batch(&tg, &json!({"messages": [item, item]}).to_string()).await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(last_seq(&tg, "di-phone").await, 10);
}
