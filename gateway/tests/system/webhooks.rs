//! Delivery webhooks (docs/webhooks.md), black-box: the real gateway (in-process, and
//! the `herald` binary for kill -9) POSTing to a real HTTP receiver on 127.0.0.1,
//! on SQLite (`*_sqlite`) and PostgreSQL (`*_postgres`).
//!
//! Every POST the receiver gets is checked against the documented signature with an
//! independent HMAC (ring), not the gateway's own code.

use crate::common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use common::pg::PgDb;
use common::process::HeraldProcess;
use common::{connect, eventually_within, publish, register};
use herald_gateway::clock::now_ms;
use herald_gateway::config::Config;
use herald_gateway::push::PushOutcome;
use herald_gateway::testing::{TempDir, TestGateway};
use serde_json::{json, Value};

const SECRET: &str = "whsec-test-3f9a";
const LONG: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------
// The receiver

#[derive(Clone, Debug)]
struct Post {
    /// Receiver's wall clock when the POST arrived (unix ms).
    at_ms: i64,
    status: u16,
    signature: String,
    body: String,
}

impl Post {
    fn events(&self) -> Vec<Value> {
        let v: Value = serde_json::from_str(&self.body).expect("JSON body");
        v["events"].as_array().expect("events array").clone()
    }
}

#[derive(Default)]
struct RecvState {
    posts: Vec<Post>,
    /// POSTs that arrived, answered or not yet.
    arrived: usize,
    /// Every POST as it arrived (unix ms, body), including those the sender gave up on
    /// (its handler is dropped when the sender closes the connection).
    arrivals: Vec<(i64, String)>,
    /// Statuses to answer, first in first out; 200 once exhausted (or `always`).
    script: VecDeque<u16>,
    always: Option<u16>,
    /// Sleep this long before answering.
    delay: Duration,
}

#[derive(Clone)]
struct Receiver {
    url: String,
    state: Arc<Mutex<RecvState>>,
}

async fn receive(
    State(state): State<Arc<Mutex<RecvState>>>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let at_ms = now_ms();
    let (status, delay) = {
        let mut s = state.lock().unwrap();
        s.arrived += 1;
        s.arrivals.push((at_ms, body.clone()));
        let status = s.always.or_else(|| s.script.pop_front()).unwrap_or(200);
        (status, s.delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let signature = headers
        .get("herald-signature")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert_eq!(
        headers.get("content-type").unwrap(),
        "application/json",
        "content type"
    );
    state.lock().unwrap().posts.push(Post {
        at_ms,
        status,
        signature,
        body,
    });
    StatusCode::from_u16(status).unwrap()
}

impl Receiver {
    async fn start() -> Receiver {
        let state = Arc::new(Mutex::new(RecvState::default()));
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, state }
    }

    fn script(&self, statuses: &[u16]) {
        self.state.lock().unwrap().script = statuses.iter().copied().collect();
    }

    fn always(&self, status: Option<u16>) {
        self.state.lock().unwrap().always = status;
    }

    fn delay(&self, d: Duration) {
        self.state.lock().unwrap().delay = d;
    }

    fn posts(&self) -> Vec<Post> {
        self.state.lock().unwrap().posts.clone()
    }

    /// Events of the POSTs answered 2xx.
    fn accepted(&self) -> Vec<Value> {
        self.posts()
            .iter()
            .filter(|p| p.status < 300)
            .flat_map(|p| p.events())
            .collect()
    }

    /// Waits for an accepted event of `kind` about (`message_id`, `device`).
    async fn event(&self, kind: &str, message_id: Option<&str>, device: &str) -> Value {
        eventually_within(LONG, &format!("{kind} event for {device}"), || {
            let found = self.accepted().into_iter().find(|e| {
                e["type"] == kind
                    && e["device_id"] == device
                    && message_id.is_none_or(|m| e["message_id"] == m)
            });
            async move { found }
        })
        .await
    }
}

/// The documented check, written independently of the gateway: `t=<unix>,v1=<hex>`,
/// v1 = HMAC-SHA256(secret, "<t>.<body>").
fn signature_verifies(secret: &str, header: &str, body: &str) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v),
            Some(("v1", v)) => v1 = Some(v),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let Ok(mac) = hex::decode(v1) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::verify(&key, format!("{t}.{body}").as_bytes(), &mac).is_ok()
}

fn assert_all_signed(rx: &Receiver) {
    let now = now_ms() / 1000;
    for p in rx.posts() {
        assert!(
            signature_verifies(SECRET, &p.signature, &p.body),
            "bad signature {:?} on {}",
            p.signature,
            p.body
        );
        assert!(!signature_verifies("other-secret", &p.signature, &p.body));
        let t: i64 = p.signature["t=".len()..]
            .split(',')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((now - t).abs() < 120, "t={t} is not the time of sending");
    }
}

// ---------------------------------------------------------------------------------
// Gateways on either store

#[derive(Clone, Copy)]
enum Kind {
    Sqlite,
    Postgres,
}

struct Fixture {
    tg: TestGateway,
    db: Option<Arc<PgDb>>,
}

impl Fixture {
    async fn drop_db(self) {
        let db = self.db.clone();
        self.tg.stop().await;
        if let Some(db) = db {
            if Arc::strong_count(&db) == 1 {
                db.drop_db().await;
            }
        }
    }
}

fn webhooks_on(c: &mut Config, rx: &Receiver) {
    c.webhooks.url = Some(rx.url.clone());
    c.webhooks.secret = Some(SECRET.into());
    c.webhooks.base_backoff_ms = 100;
    c.webhooks.max_backoff_ms = 400;
    c.webhooks.timeout_ms = 2_000;
    c.push.poll_interval_ms = 50;
    c.delivery.sweep_interval_ms = 200;
}

async fn gateway(
    kind: Kind,
    db: Option<Arc<PgDb>>,
    rx: &Receiver,
    customize: impl FnOnce(&mut Config),
) -> Fixture {
    let db = match (kind, db) {
        (Kind::Postgres, None) => Some(Arc::new(PgDb::create().await)),
        (_, db) => db,
    };
    let url = db.as_ref().map(|d| d.url.clone());
    let tg = TestGateway::start_with(|c| {
        if let Some(url) = url {
            c.store = "postgres".into();
            c.database_url = Some(url);
        }
        webhooks_on(c, rx);
        customize(c);
    })
    .await;
    Fixture { tg, db }
}

macro_rules! both_stores {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Kind::Sqlite).await })+
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Kind::Postgres).await })+
        }
    };
}

both_stores!(
    each_event_type_fires_when_its_state_change_commits,
    only_the_configured_event_types_are_sent,
    batches_hold_at_most_100_events_and_leave_within_a_second,
    a_failing_receiver_gets_the_same_events_again_until_it_accepts,
    a_receiver_that_hangs_does_not_slow_publish_or_delivery,
    a_post_that_times_out_is_sent_again_with_the_same_event_ids,
    events_older_than_max_age_are_dropped_and_counted_not_retried,
    entries_acked_at_once_are_delivered_once_and_shown_sent,
);

fn is_rfc3339(s: &Value) -> bool {
    let s = s.as_str().unwrap_or("");
    s.len() == 24 && s.ends_with('Z') && s.as_bytes()[10] == b'T'
}

// ---------------------------------------------------------------------------------
// Tests

async fn each_event_type_fires_when_its_state_change_commits(kind: Kind) {
    let rx = Receiver::start().await;
    let f = gateway(kind, None, &rx, |_| {}).await;
    let tg = &f.tg;

    // delivered + acked: a live WebSocket.
    let mut live = connect(tg, "alice", "phone", None).await;
    let m = publish(
        tg,
        json!({"to": {"device": "phone"}, "data": {"n": 1}, "push": "never"}),
    )
    .await;
    let mid = m["message_id"].as_str().unwrap().to_owned();
    let msg = live.msg().await;
    let delivered = rx.event("delivered", Some(&mid), "phone").await;
    assert_eq!(delivered["user"], "alice");
    assert_eq!(delivered["seq"], msg.seq);
    assert!(is_rfc3339(&delivered["at"]), "{delivered}");
    assert!(
        rx.accepted().iter().all(|e| e["type"] != "acked"),
        "acked before the ack"
    );
    live.ack(msg.seq).await;
    let acked = rx.event("acked", Some(&mid), "phone").await;
    assert_eq!(acked["seq"], msg.seq);

    // pushed: an offline device with a token, through the (stub) provider.
    register(tg, "bob", "tablet", Some(("fcm", "tok-good"))).await;
    let m = publish(
        tg,
        json!({"to": {"device": "tablet"}, "data": {}, "push": "always"}),
    )
    .await;
    let pushed = rx.event("pushed", m["message_id"].as_str(), "tablet").await;
    assert_eq!(pushed["provider"], "fcm");
    assert_eq!(pushed["user"], "bob");
    assert_eq!(tg.fcm.sent().len(), 1);

    // push_failed: nothing to push to.
    register(tg, "carol", "watch", None).await;
    let m = publish(
        tg,
        json!({"to": {"device": "watch"}, "data": {}, "push": "always"}),
    )
    .await;
    let failed = rx
        .event("push_failed", m["message_id"].as_str(), "watch")
        .await;
    assert!(
        failed["error"].as_str().unwrap().contains("no push token"),
        "{failed}"
    );

    // token_invalid: the provider says the token is dead.
    register(tg, "dave", "old-phone", Some(("fcm", "tok-dead"))).await;
    tg.fcm.script(vec![PushOutcome::InvalidToken {
        reason: "UNREGISTERED".into(),
    }]);
    let m = publish(
        tg,
        json!({"to": {"device": "old-phone"}, "data": {}, "push": "always"}),
    )
    .await;
    let invalid = rx.event("token_invalid", None, "old-phone").await;
    assert_eq!(invalid["provider"], "fcm");
    assert_eq!(invalid["user"], "dave");
    assert!(invalid["error"].as_str().unwrap().contains("UNREGISTERED"));
    rx.event("push_failed", m["message_id"].as_str(), "old-phone")
        .await;

    // expired: TTL ran out with no ack.
    register(tg, "erin", "sleepy", None).await;
    let m = publish(
        tg,
        json!({"to": {"device": "sleepy"}, "data": {}, "push": "never", "ttl_seconds": 1}),
    )
    .await;
    let expired = rx
        .event("expired", m["message_id"].as_str(), "sleepy")
        .await;
    assert!(is_rfc3339(&expired["at"]));

    // Nothing else: each state change once, nothing for what did not happen.
    let all = rx.accepted();
    let count = |kind: &str, device: &str| {
        all.iter()
            .filter(|e| e["type"] == kind && e["device_id"] == device)
            .count()
    };
    assert_eq!(count("delivered", "phone"), 1);
    assert_eq!(count("acked", "phone"), 1);
    assert_eq!(count("pushed", "phone"), 0, "push never");
    assert_eq!(count("expired", "phone"), 0, "acked, not expired");
    assert_eq!(count("pushed", "tablet"), 1);
    assert_eq!(count("token_invalid", "old-phone"), 1);
    assert_eq!(count("expired", "sleepy"), 1);
    let ids: HashSet<&str> = all.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), all.len(), "event ids are unique");
    assert!(ids
        .iter()
        .all(|id| id.starts_with("evt_") && id.len() == 36));
    assert_all_signed(&rx);
    f.drop_db().await;
}

async fn only_the_configured_event_types_are_sent(kind: Kind) {
    let rx = Receiver::start().await;
    let f = gateway(kind, None, &rx, |c| {
        c.webhooks.events = vec!["acked".into()];
        c.webhooks.batch_delay_ms = 100;
    })
    .await;
    let tg = &f.tg;
    let mut live = connect(tg, "alice", "phone", None).await;
    let m = publish(
        tg,
        json!({"to": {"device": "phone"}, "data": {}, "push": "always"}),
    )
    .await;
    let msg = live.msg().await;
    live.ack(msg.seq).await;
    rx.event("acked", m["message_id"].as_str(), "phone").await;
    // Anything else would have been queued by now and posted within batch_delay.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let kinds: Vec<String> = rx
        .posts()
        .iter()
        .flat_map(|p| p.events())
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, vec!["acked"]);
    let (depth, _) = tg.state.store.webhook_queue_stats().await.unwrap();
    assert_eq!(depth, 0, "other types are not even queued");
    f.drop_db().await;
}

async fn batches_hold_at_most_100_events_and_leave_within_a_second(kind: Kind) {
    let rx = Receiver::start().await;
    // The default batch delay (1 s).
    let f = gateway(kind, None, &rx, |c| c.delivery.sweep_interval_ms = 300).await;
    let tg = &f.tg;
    register(tg, "erin", "sleepy", None).await;
    // 250 entries expiring together: one sweep queues 250 `expired` events at once.
    let messages: Vec<Value> = (0..250)
        .map(|i| json!({"to": {"device": "sleepy"}, "data": {"i": i}, "push": "never", "ttl_seconds": 1}))
        .collect();
    let (status, body) = common::post(
        tg,
        "/v1/messages/batch",
        &tg.api_key,
        json!({ "messages": messages }),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    eventually_within(LONG, "250 expired events", || {
        let n = rx.accepted().len();
        async move { (n >= 250).then_some(()) }
    })
    .await;
    let posts = rx.posts();
    let sizes: Vec<usize> = posts.iter().map(|p| p.events().len()).collect();
    assert!(sizes.iter().all(|&n| n <= 100), "{sizes:?}");
    assert_eq!(
        sizes.iter().filter(|&&n| n == 100).count(),
        2,
        "a full queue goes out in full batches: {sizes:?}"
    );
    assert_eq!(rx.accepted().len(), 250);

    // One lone event waits for company at most batch_delay (1 s), then goes alone.
    let mut live = connect(tg, "alice", "phone", None).await;
    let m = publish(
        tg,
        json!({"to": {"device": "phone"}, "data": {}, "push": "never"}),
    )
    .await;
    live.msg().await;
    rx.event("delivered", m["message_id"].as_str(), "phone")
        .await;
    let post = rx
        .posts()
        .into_iter()
        .find(|p| p.body.contains(m["message_id"].as_str().unwrap()))
        .unwrap();
    let queued_ms = {
        // `at` of a delivered event is when it was queued (the sent mark's commit).
        let ev = &post.events()[0];
        parse_rfc3339_ms(ev["at"].as_str().unwrap())
    };
    let waited = post.at_ms - queued_ms;
    assert!(
        (0..1_300).contains(&waited),
        "posted {waited} ms after it was queued (batch_delay 1000 ms)"
    );
    assert_all_signed(&rx);
    f.drop_db().await;
}

/// A device that acks each message as it arrives: its acks record the entries as sent
/// (`SentRecorder` drops the sent marks they cover), so each entry still gets exactly
/// one `delivered` event, never after its `acked` one, and shows `sent_at`.
async fn entries_acked_at_once_are_delivered_once_and_shown_sent(kind: Kind) {
    let rx = Receiver::start().await;
    let f = gateway(kind, None, &rx, |c| c.webhooks.batch_delay_ms = 100).await;
    let tg = &f.tg;
    let mut live = connect(tg, "alice", "phone", None).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let m = publish(
            tg,
            json!({"to": {"device": "phone"}, "data": {"i": i}, "push": "never"}),
        )
        .await;
        let msg = live.msg().await;
        live.ack(msg.seq).await;
        ids.push(m["message_id"].as_str().unwrap().to_owned());
    }
    // One more, never acked: its sent mark is written after the hold-back.
    let last = publish(
        tg,
        json!({"to": {"device": "phone"}, "data": {}, "push": "never"}),
    )
    .await;
    live.msg().await;
    rx.event("delivered", last["message_id"].as_str(), "phone")
        .await;
    for id in &ids {
        let acked = rx.event("acked", Some(id), "phone").await;
        let all = rx.accepted();
        let delivered: Vec<&Value> = all
            .iter()
            .filter(|e| e["type"] == "delivered" && e["message_id"] == id.as_str())
            .collect();
        assert_eq!(delivered.len(), 1, "{id}: {delivered:?}");
        let at = |e: &Value| parse_rfc3339_ms(e["at"].as_str().unwrap());
        assert!(at(delivered[0]) <= at(&acked), "{delivered:?} {acked}");
        let (status, body) = common::get(tg, &format!("/v1/messages/{id}"), &tg.api_key).await;
        assert_eq!(status, 200);
        let d = &body["deliveries"][0];
        assert_eq!(d["state"], "acked", "{body}");
        assert!(is_rfc3339(&d["sent_at"]), "{body}");
    }
    let (_, body) = common::get(
        tg,
        &format!("/v1/messages/{}", last["message_id"].as_str().unwrap()),
        &tg.api_key,
    )
    .await;
    assert_eq!(body["deliveries"][0]["state"], "sent", "{body}");
    f.drop_db().await;
}

/// `2026-11-22T10:00:00.123Z` → unix ms.
fn parse_rfc3339_ms(s: &str) -> i64 {
    let n = |r: std::ops::Range<usize>| s[r].parse::<i64>().unwrap();
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    let (hh, mm, ss, ms) = (n(11..13), n(14..16), n(17..19), n(20..23));
    // days_from_civil (Howard Hinnant)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + ms
}

async fn a_failing_receiver_gets_the_same_events_again_until_it_accepts(kind: Kind) {
    let rx = Receiver::start().await;
    rx.script(&[500, 503]);
    let f = gateway(kind, None, &rx, |c| c.webhooks.batch_delay_ms = 100).await;
    let tg = &f.tg;
    let mut live = connect(tg, "alice", "phone", None).await;
    let m = publish(
        tg,
        json!({"to": {"device": "phone"}, "data": {}, "push": "never"}),
    )
    .await;
    let msg = live.msg().await;
    live.ack(msg.seq).await;
    let mid = m["message_id"].as_str();
    rx.event("delivered", mid, "phone").await;
    rx.event("acked", mid, "phone").await;
    let posts = rx.posts();
    assert!(posts.len() >= 3, "{posts:?}");
    assert_eq!(posts[0].status, 500);
    assert_eq!(posts[1].status, 503);
    // Every event refused was later accepted with the same id; none accepted twice.
    let refused: HashSet<String> = posts
        .iter()
        .filter(|p| p.status >= 300)
        .flat_map(|p| p.events())
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    let accepted: Vec<String> = rx
        .accepted()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    let accepted_set: HashSet<String> = accepted.iter().cloned().collect();
    assert!(!refused.is_empty());
    assert!(refused.is_subset(&accepted_set), "{refused:?} {accepted:?}");
    assert_eq!(
        accepted.len(),
        accepted_set.len(),
        "no duplicates once accepted"
    );
    assert_eq!(accepted.len(), 2, "delivered + acked");
    // Each retry waited for its backoff (base 100 ms, so at least 50 ms with jitter).
    assert!(posts[1].at_ms - posts[0].at_ms >= 50, "{posts:?}");

    let metrics = metrics_once_they_show(tg, "herald_webhook_queue_depth 0").await;
    assert!(
        metrics.contains("herald_webhook_posts_total{result=\"retry\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("herald_webhook_queue_lag_seconds 0"),
        "{metrics}"
    );
    assert!(metrics.contains("herald_webhook_posts_total{result=\"dropped\"} 0"));
    assert_all_signed(&rx);
    f.drop_db().await;
}

async fn a_receiver_that_hangs_does_not_slow_publish_or_delivery(kind: Kind) {
    let rx = Receiver::start().await;
    rx.delay(Duration::from_secs(30));
    let f = gateway(kind, None, &rx, |c| {
        c.webhooks.batch_delay_ms = 10;
        c.webhooks.timeout_ms = 30_000;
    })
    .await;
    let tg = &f.tg;
    let mut live = connect(tg, "alice", "phone", None).await;
    // The first event's POST is now stuck in the receiver.
    let m = publish(tg, json!({"to": {"device": "phone"}, "data": {}})).await;
    let msg = live.msg().await;
    live.ack(msg.seq).await;
    eventually_within(LONG, "a POST stuck in the receiver", || {
        let s = rx.state.lock().unwrap();
        let stuck = s.arrived == 1 && s.posts.is_empty();
        async move { stuck.then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = m;
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..100 {
        let t = Instant::now();
        publish(
            tg,
            json!({"to": {"device": "phone"}, "data": {"i": i}, "push": "never"}),
        )
        .await;
        let got = live.msg().await;
        live.ack(got.seq).await;
        slowest = slowest.max(t.elapsed());
    }
    let total = started.elapsed();
    assert!(
        slowest < Duration::from_millis(500) && total < Duration::from_secs(10),
        "publish→delivery slowest {slowest:?}, total {total:?} with the receiver hung"
    );
    // Meanwhile the events wait in the store.
    // (the last acks are sent without waiting for their commit).
    eventually_within(LONG, "200 events queued", || async {
        let (depth, _) = tg.state.store.webhook_queue_stats().await.unwrap();
        (depth >= 200).then_some(())
    })
    .await;
    f.drop_db().await;
}

async fn metrics_text(tg: &TestGateway) -> String {
    reqwest::get(format!("{}/metrics", tg.base_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The gateway's metrics, once they contain `line` (e.g. a counter at its value).
async fn metrics_once_they_show(tg: &TestGateway, line: &str) -> String {
    eventually_within(LONG, &format!("{line} in the metrics"), || async {
        let text = metrics_text(tg).await;
        text.contains(line).then_some(text)
    })
    .await
}

/// One delivered + acked message: two events.
async fn deliver_and_ack(tg: &TestGateway) {
    let mut live = connect(tg, "alice", "phone", None).await;
    publish(
        tg,
        json!({"to": {"device": "phone"}, "data": {}, "push": "never"}),
    )
    .await;
    let msg = live.msg().await;
    live.ack(msg.seq).await;
}

/// `webhooks.timeout_ms`: a receiver that takes longer has not accepted the batch, so
/// the same events (same ids: the receiver de-duplicates) are posted again.
async fn a_post_that_times_out_is_sent_again_with_the_same_event_ids(kind: Kind) {
    let rx = Receiver::start().await;
    rx.delay(Duration::from_secs(2));
    let f = gateway(kind, None, &rx, |c| {
        c.webhooks.batch_delay_ms = 10;
        c.webhooks.timeout_ms = 300;
    })
    .await;
    let tg = &f.tg;
    deliver_and_ack(tg).await;
    eventually_within(LONG, "a second POST while the first still hangs", || {
        let arrived = rx.state.lock().unwrap().arrived;
        async move { (arrived >= 2).then_some(()) }
    })
    .await;
    rx.delay(Duration::ZERO);
    let arrivals = rx.state.lock().unwrap().arrivals.clone();
    let ids = |body: &str| -> HashSet<String> {
        let v: Value = serde_json::from_str(body).unwrap();
        v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let timed_out = ids(&arrivals[0].1);
    // Sent again only after the timeout, not while the POST could still succeed.
    assert!(arrivals[1].0 - arrivals[0].0 >= 300, "{arrivals:?}");
    // Once the receiver answers in time, the events of the POST that timed out are
    // accepted under the same ids.
    eventually_within(LONG, "the timed-out events accepted", || {
        let accepted: HashSet<String> = rx
            .accepted()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        let done = timed_out.is_subset(&accepted);
        async move { done.then_some(()) }
    })
    .await;
    let metrics = metrics_once_they_show(tg, "herald_webhook_queue_depth 0").await;
    let retries = metrics
        .lines()
        .find_map(|l| l.strip_prefix("herald_webhook_posts_total{result=\"retry\"} "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(retries.is_some_and(|n| n >= 1), "{metrics}");
    assert_all_signed(&rx);
    f.drop_db().await;
}

/// `webhooks.max_age_hours`: events that are still undelivered that long after they were
/// queued are dropped (and counted) at their next failure, not retried forever. With 0
/// every event is past its age at its first failure.
async fn events_older_than_max_age_are_dropped_and_counted_not_retried(kind: Kind) {
    let rx = Receiver::start().await;
    rx.always(Some(500));
    let f = gateway(kind, None, &rx, |c| {
        c.webhooks.batch_delay_ms = 10;
        c.webhooks.max_age_hours = 0;
    })
    .await;
    let tg = &f.tg;
    deliver_and_ack(tg).await;
    let metrics = metrics_once_they_show(tg, "herald_webhook_events_dropped_total 2").await;
    assert!(
        metrics.contains("herald_webhook_queue_depth 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("herald_webhook_posts_total{result=\"retry\"} 0"),
        "{metrics}"
    );
    let (depth, _) = tg.state.store.webhook_queue_stats().await.unwrap();
    assert_eq!(depth, 0, "nothing left to retry");
    // Several backoffs (100–400 ms) later, nothing was posted again.
    let posted = rx.posts().len();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(rx.posts().len(), posted, "a dropped event was posted again");
    assert_all_signed(&rx);
    f.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_postgres_nodes_never_post_the_same_event() {
    let rx = Receiver::start().await;
    // Slow answers: each node holds its claimed batch for a while.
    rx.delay(Duration::from_millis(300));
    let a = gateway(Kind::Postgres, None, &rx, |c| {
        c.webhooks.batch_delay_ms = 10;
    })
    .await;
    let b = gateway(Kind::Postgres, a.db.clone(), &rx, |c| {
        c.webhooks.batch_delay_ms = 10;
    })
    .await;
    register(&a.tg, "erin", "sleepy", None).await;
    let messages: Vec<Value> = (0..400)
        .map(|i| json!({"to": {"device": "sleepy"}, "data": {"i": i}, "push": "never", "ttl_seconds": 1}))
        .collect();
    let (status, _) = common::post(
        &a.tg,
        "/v1/messages/batch",
        &a.tg.api_key,
        json!({ "messages": messages }),
    )
    .await;
    assert_eq!(status, 202);
    eventually_within(LONG, "400 expired events", || {
        let n = rx.accepted().len();
        async move { (n >= 400).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let all = rx.accepted();
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for e in &all {
        *seen
            .entry((
                e["message_id"].as_str().unwrap().to_owned(),
                e["type"].as_str().unwrap().to_owned(),
            ))
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 400);
    assert!(
        seen.values().all(|&n| n == 1),
        "an entry's expiry was reported by both nodes, or a batch was posted twice"
    );
    assert_eq!(all.len(), 400);
    assert!(rx.posts().len() >= 4);
    b.drop_db().await;
    a.drop_db().await;
}

#[tokio::test]
async fn queued_events_survive_kill_9_and_are_sent_after_restart() {
    let rx = Receiver::start().await;
    rx.always(Some(500));
    let tmp = TempDir::new("herald-webhook-crash");
    let envs = [
        ("HERALD_WEBHOOKS__URL", rx.url.as_str()),
        ("HERALD_WEBHOOKS__SECRET", SECRET),
        ("HERALD_WEBHOOKS__BASE_BACKOFF_MS", "100"),
        ("HERALD_WEBHOOKS__MAX_BACKOFF_MS", "200"),
        ("HERALD_WEBHOOKS__BATCH_DELAY_MS", "50"),
        ("HERALD_PUSH__STUB", "true"),
    ];
    let mut gw = HeraldProcess::spawn(&tmp.0, &[], &envs);
    let api_key = gw.api_key.clone().unwrap();
    let http = reqwest::Client::new();
    let token: Value = http
        .post(format!("{}/v1/tokens", gw.base))
        .bearer_auth(&api_key)
        .json(&json!({"user": "bob", "device_id": "tablet"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["token"].as_str().unwrap();
    let r = http
        .put(format!("{}/v1/me/devices/tablet", gw.base))
        .bearer_auth(token)
        .json(&json!({"platform": "android", "push_provider": "fcm", "push_token": "t1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r: Value = http
            .post(format!("{}/v1/messages", gw.base))
            .bearer_auth(&api_key)
            .json(&json!({"to": {"device": "tablet"}, "data": {}, "push": "always"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(r["message_id"].as_str().unwrap().to_owned());
    }
    // All three `pushed` events were offered and refused at least once.
    let refused = eventually_within(LONG, "three refused events", || {
        let events: HashMap<String, String> = rx
            .posts()
            .iter()
            .flat_map(|p| p.events())
            .map(|e| {
                (
                    e["message_id"].as_str().unwrap().to_owned(),
                    e["id"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        async move { (events.len() == 3).then_some(events) }
    })
    .await;
    gw.kill_9();
    rx.always(None);
    let gw = HeraldProcess::spawn(&tmp.0, &[], &envs);
    let accepted = eventually_within(LONG, "events accepted after restart", || {
        let acc = rx.accepted();
        async move { (acc.len() >= 3).then_some(acc) }
    })
    .await;
    let got: HashMap<String, String> = accepted
        .iter()
        .map(|e| {
            (
                e["message_id"].as_str().unwrap().to_owned(),
                e["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(got, refused, "same events, same ids, after kill -9");
    for id in &ids {
        assert!(got.contains_key(id));
    }
    assert_all_signed(&rx);
    drop(gw);
}

#[tokio::test]
async fn unknown_event_names_and_a_missing_secret_stop_the_start() {
    let tmp = TempDir::new("herald-webhook-cfg");
    for (envs, expect) in [
        (
            vec![
                ("HERALD_WEBHOOKS__URL", "http://127.0.0.1:9/hook"),
                ("HERALD_WEBHOOKS__SECRET", "s"),
                ("HERALD_WEBHOOKS__EVENTS", "delivered,read"),
            ],
            "unknown event \"read\"",
        ),
        (
            vec![("HERALD_WEBHOOKS__URL", "http://127.0.0.1:9/hook")],
            "webhooks.secret",
        ),
    ] {
        let out = std::process::Command::new(common::process::BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&tmp.0)
            .envs(envs.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{err}");
        assert!(
            !tmp.0.join("herald.db").exists(),
            "refused before any side effect"
        );
    }
}

/// Writes a real signed POST (body, header, secret) where `HERALD_WEBHOOK_FIXTURE_DIR`
/// says, for scripts/test.d/webhooks-verify.sh to check the docs' Python and Node
/// snippets against; without it, checks the same POST here.
#[tokio::test]
async fn a_real_signed_post_for_the_docs_snippets() {
    let rx = Receiver::start().await;
    let f = gateway(Kind::Sqlite, None, &rx, |c| c.webhooks.batch_delay_ms = 50).await;
    let tg = &f.tg;
    let mut live = connect(tg, "alice", "phone", None).await;
    let m = publish(
        tg,
        json!({"to": {"device": "phone"}, "data": {"ünïcode": "✓"}, "push": "never"}),
    )
    .await;
    live.msg().await;
    rx.event("delivered", m["message_id"].as_str(), "phone")
        .await;
    let post = rx.posts().remove(0);
    assert!(signature_verifies(SECRET, &post.signature, &post.body));
    if let Some(dir) = std::env::var_os("HERALD_WEBHOOK_FIXTURE_DIR") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("body.json"), &post.body).unwrap();
        std::fs::write(dir.join("signature.txt"), &post.signature).unwrap();
        std::fs::write(dir.join("secret.txt"), SECRET).unwrap();
    }
    f.drop_db().await;
}
