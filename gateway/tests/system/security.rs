//! The security model (docs/security.md), black box: scoped API keys, device-bound
//! tokens, topic authorisation, revocation, the per-user and per-device caps, the ops
//! endpoints and JWKS rotation. Every rule runs on SQLite and on PostgreSQL, and every
//! refusal is checked for what it leaves behind: nothing.

use crate::common;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::pg::PgDb;
use common::*;
use futures_util::StreamExt;
use herald_gateway::auth::Scope;
use herald_gateway::config::{Config, TopicPolicy};
use herald_gateway::testing::TestGateway;
use herald_protocol::{ClientFrame, ServerFrame};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const TTL: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------------
// Both stores

/// Which store the gateway under test uses; PostgreSQL gets a fresh database.
struct Db {
    pg: Option<PgDb>,
}

impl Db {
    /// The gateway with the product's security defaults, then `customize`.
    async fn gateway(&self, customize: impl FnOnce(&mut Config)) -> TestGateway {
        let url = self.pg.as_ref().map(|p| p.url.clone());
        TestGateway::start_secure_with(move |c| {
            if let Some(url) = url {
                c.store = "postgres".into();
                c.database_url = Some(url);
            }
            customize(c)
        })
        .await
    }
}

async fn run<F, Fut>(postgres: bool, test: F)
where
    F: FnOnce(Arc<Db>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let db = Arc::new(Db {
        pg: if postgres {
            Some(PgDb::create().await)
        } else {
            None
        },
    });
    // In a task, so a failing test still drops its database.
    let result = tokio::spawn(test(db.clone())).await;
    if let Some(pg) = &db.pg {
        pg.drop_db().await;
    }
    if let Err(e) = result {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
        panic!("test task: {e}");
    }
}

macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::run(false, super::$name).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::run(true, super::$name).await
                }
            )*
        }
    };
}

both_stores!(
    api_keys_only_reach_their_scopes,
    tokens_act_for_their_device_only,
    user_wide_tokens_are_a_compatibility_setting,
    devices_per_user_are_capped,
    concurrent_claims_never_pass_the_device_cap,
    claims_policy_limits_what_a_device_subscribes,
    server_policy_leaves_subscriptions_to_the_backend,
    open_policy_is_the_old_behaviour,
    revocation_refuses_old_tokens_and_closes_sessions,
);

// ---------------------------------------------------------------------------------
// Helpers

fn code(v: &Value) -> &str {
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {v}"))
}

fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or_default()
}

async fn send(
    tg: &TestGateway,
    method: reqwest::Method,
    path: &str,
    bearer: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http()
        .request(method, format!("{}{path}", tg.base_url))
        .bearer_auth(bearer);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn put(tg: &TestGateway, path: &str, bearer: &str) -> (u16, Value) {
    send(tg, reqwest::Method::PUT, path, bearer, None).await
}

async fn delete(tg: &TestGateway, path: &str, bearer: &str) -> (u16, Value) {
    send(tg, reqwest::Method::DELETE, path, bearer, None).await
}

async fn topics_of(tg: &TestGateway, device: &str) -> Vec<String> {
    let (s, v) = get(tg, &format!("/v1/devices/{device}/topics"), &tg.api_key).await;
    assert_eq!(s, 200, "{v}");
    serde_json::from_value(v["topics"].clone()).unwrap()
}

async fn register_with(tg: &TestGateway, token: &str, device: &str) -> (u16, Value) {
    send(
        tg,
        reqwest::Method::PUT,
        &format!("/v1/me/devices/{device}"),
        token,
        Some(json!({"platform": "android", "push_provider": "fcm", "push_token": "t"})),
    )
    .await
}

async fn device_exists(tg: &TestGateway, device: &str) -> bool {
    let (s, v) = get(tg, &format!("/v1/devices/{device}"), &tg.api_key).await;
    assert!(s == 200 || s == 404, "{s} {v}");
    s == 200
}

async fn subscribe(d: &mut Device, topic: &str) -> ServerFrame {
    d.send(&ClientFrame::Subscribe {
        topic: topic.into(),
    })
    .await;
    d.frame().await.expect("an answer to subscribe")
}

fn forbidden_topic(f: &ServerFrame) -> bool {
    matches!(f, ServerFrame::Error { code, .. } if code == "forbidden_topic")
}

/// The session is still open and answering.
async fn still_open(d: &mut Device) {
    d.send(&ClientFrame::Ping).await;
    assert_eq!(d.frame().await, Some(ServerFrame::Pong));
}

/// Waits for the server to close the socket; returns the close code and reason.
async fn closed_with(d: &mut Device) -> (CloseCode, String) {
    loop {
        let msg = tokio::time::timeout(WAIT, d.ws.next())
            .await
            .expect("timed out waiting for the close");
        match msg {
            Some(Ok(Message::Close(Some(f)))) => return (f.code, f.reason.to_string()),
            Some(Ok(Message::Close(None))) | None | Some(Err(_)) => {
                panic!("closed without a close frame")
            }
            Some(Ok(_)) => continue,
        }
    }
}

async fn connect_err(tg: &TestGateway, device: &str, token: &str) -> String {
    connect_with_token(&tg.ws_url(device, None), token)
        .await
        .err()
        .unwrap_or_else(|| panic!("{device} connected"))
}

// ---------------------------------------------------------------------------------
// Item 3: scoped API keys

async fn api_keys_only_reach_their_scopes(db: Arc<Db>) {
    let tg = db.gateway(|_| {}).await;
    let admin = tg.api_key.clone();
    let publisher = tg.create_key(&[Scope::Publish]).await;
    let reader = tg.create_key(&[Scope::Read]).await;
    let devices = tg.create_key(&[Scope::Devices]).await;
    let minter = tg.create_key(&[Scope::Tokens]).await;
    let d = connect(&tg, "u", "d1", None).await;
    drop(d);

    // publish: only with `publish`; a refusal names the scope and writes nothing.
    let body = json!({"to": {"device": "d1"}, "data": {"n": 1}});
    let (s, v) = post(&tg, "/v1/messages", &reader, body.clone()).await;
    assert_eq!((s, code(&v)), (403, "forbidden"), "{v}");
    assert!(message(&v).contains("`publish`"), "{v}");
    let batch = json!({"messages": [body.clone(), body.clone()]});
    let (s, v) = post(&tg, "/v1/messages/batch", &reader, batch.clone()).await;
    assert_eq!((s, code(&v)), (403, "forbidden"), "{v}");
    assert!(message(&v).contains("`publish`"), "{v}");
    let (_, dev) = get(&tg, "/v1/devices/d1", &admin).await;
    assert_eq!(dev["last_seq"], 0, "a refused publish wrote nothing");
    let (s, v) = post(&tg, "/v1/messages/batch", &publisher, batch).await;
    assert_eq!(s, 202, "{v}");
    let (s, v) = post(&tg, "/v1/messages", &publisher, body.clone()).await;
    assert_eq!(s, 202, "{v}");
    let id = v["message_id"].as_str().unwrap().to_owned();

    // read: message status, devices, users.
    for path in [
        format!("/v1/messages/{id}"),
        "/v1/devices/d1".into(),
        "/v1/users/u/devices".into(),
        "/v1/devices/d1/topics".into(),
    ] {
        let (s, v) = get(&tg, &path, &publisher).await;
        assert_eq!((s, code(&v)), (403, "forbidden"), "{path}: {v}");
        assert!(message(&v).contains("`read`"), "{v}");
        let (s, v) = get(&tg, &path, &reader).await;
        assert_eq!(s, 200, "{path}: {v}");
    }

    // tokens: minting.
    let mint = json!({"user": "u", "device_id": "d2"});
    let (s, v) = post(&tg, "/v1/tokens", &publisher, mint.clone()).await;
    assert_eq!((s, code(&v)), (403, "forbidden"));
    assert!(message(&v).contains("`tokens`"), "{v}");
    let (s, v) = post(&tg, "/v1/tokens", &minter, mint).await;
    assert_eq!(s, 200, "{v}");

    // devices: topic management, revocation, deletion.
    let (s, v) = put(&tg, "/v1/devices/d1/topics/news", &reader).await;
    assert_eq!((s, code(&v)), (403, "forbidden"));
    assert!(message(&v).contains("`devices`"), "{v}");
    assert!(topics_of(&tg, "d1").await.is_empty());
    let (s, v) = post(&tg, "/v1/users/u/revoke_tokens", &minter, json!({})).await;
    assert_eq!((s, code(&v)), (403, "forbidden"));
    assert!(message(&v).contains("`devices`"), "{v}");
    let (s, v) = delete(&tg, "/v1/devices/d1", &publisher).await;
    assert_eq!((s, code(&v)), (403, "forbidden"));
    assert!(device_exists(&tg, "d1").await, "a refused delete deleted");
    let (s, _) = put(&tg, "/v1/devices/d1/topics/news", &devices).await;
    assert_eq!(s, 204);
    let (s, _) = delete(&tg, "/v1/devices/d1", &devices).await;
    assert_eq!(s, 204);
    assert!(!device_exists(&tg, "d1").await);

    // admin: everything.
    let (s, v) = post(&tg, "/v1/tokens", &admin, json!({"user": "u"})).await;
    assert_eq!(s, 200, "{v}");
}

// ---------------------------------------------------------------------------------
// Item 2: device-bound tokens

async fn tokens_act_for_their_device_only(db: Arc<Db>) {
    let tg = db.gateway(|_| {}).await;
    let token = tg.mint_device_token("carol", "carol-phone", &[], TTL);

    // Another device id with carol's phone token: 403 on every device route, and
    // nothing is created.
    let err = connect_err(&tg, "carol-tablet", &token).await;
    assert!(err.starts_with("HTTP 403"), "{err}");
    assert!(err.contains("carol-phone"), "{err}");
    let (s, v) = register_with(&tg, &token, "carol-tablet").await;
    assert_eq!((s, code(&v)), (403, "forbidden"));
    assert!(!device_exists(&tg, "carol-tablet").await);

    let mut phone = connect_with_token(&tg.ws_url("carol-phone", None), &token)
        .await
        .unwrap();
    let (s, v) = register_with(&tg, &token, "carol-phone").await;
    assert_eq!(s, 200, "{v}");
    // A second device of carol's, with its own token, so sync/ack have a target.
    let tablet = tg.mint_device_token("carol", "carol-tablet", &[], TTL);
    let (s, _) = register_with(&tg, &tablet, "carol-tablet").await;
    assert_eq!(s, 200);
    tg.publish(&herald_protocol::PublishRequest::new(
        herald_protocol::Target::User("carol".into()),
        json!({"n": 1}),
    ))
    .await;
    let (s, v) = get(&tg, "/v1/me/sync?device_id=carol-tablet", &token).await;
    assert_eq!((s, code(&v)), (403, "forbidden"), "{v}");
    let (s, v) = post(
        &tg,
        "/v1/me/ack",
        &token,
        json!({"device_id": "carol-tablet", "seq": 1}),
    )
    .await;
    assert_eq!((s, code(&v)), (403, "forbidden"), "{v}");
    let (_, d) = get(&tg, "/v1/devices/carol-tablet", &tg.api_key).await;
    assert_eq!(d["acked_seq"], 0, "a refused ack acked");
    // The other transports obey the same rule: SSE and long-poll.
    let (s, v) = get(&tg, "/v1/connect/sse?device_id=carol-tablet", &token).await;
    assert_eq!((s, code(&v)), (403, "forbidden"), "{v}");
    let (s, v) = get(&tg, "/v1/me/sync?device_id=carol-tablet&wait=1", &token).await;
    assert_eq!((s, code(&v)), (403, "forbidden"), "{v}");
    let (s, v) = get(&tg, "/v1/me/sync?device_id=carol-phone", &token).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(phone.msg().await.seq, 1);

    // A user-wide token (no `did`) is refused by default, naming the setting.
    let wide = tg.mint_token("carol", TTL);
    let err = connect_err(&tg, "carol-new", &wide).await;
    assert!(
        err.starts_with("HTTP 403") && err.contains("require_device_claim"),
        "{err}"
    );
    let (s, v) = get(&tg, "/v1/me/sync?device_id=carol-phone", &wide).await;
    assert_eq!((s, code(&v)), (403, "forbidden"), "{v}");
    assert!(!device_exists(&tg, "carol-new").await);

    // POST /v1/tokens puts device_id in `did`: that token connects its device only.
    let (s, v) = post(
        &tg,
        "/v1/tokens",
        &tg.api_key,
        json!({"user": "dan", "device_id": "dan-1"}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let minted = v["token"].as_str().unwrap().to_owned();
    assert!(connect_with_token(&tg.ws_url("dan-1", None), &minted)
        .await
        .is_ok());
    assert!(connect_err(&tg, "dan-2", &minted)
        .await
        .starts_with("HTTP 403"));
    // A bad device_id is refused at minting.
    let (s, v) = post(
        &tg,
        "/v1/tokens",
        &tg.api_key,
        json!({"user": "dan", "device_id": "no spaces"}),
    )
    .await;
    assert_eq!((s, code(&v)), (422, "invalid_field"), "{v}");
}

async fn user_wide_tokens_are_a_compatibility_setting(db: Arc<Db>) {
    let tg = db.gateway(|c| c.auth.require_device_claim = false).await;
    let wide = tg.mint_token("erin", TTL);
    assert!(connect_with_token(&tg.ws_url("erin-1", None), &wide)
        .await
        .is_ok());
    let (s, _) = register_with(&tg, &wide, "erin-2").await;
    assert_eq!(s, 200);
    // A token with `did` stays bound even so.
    let bound = tg.mint_device_token("erin", "erin-1", &[], TTL);
    assert!(connect_err(&tg, "erin-2", &bound)
        .await
        .starts_with("HTTP 403"));
}

async fn devices_per_user_are_capped(db: Arc<Db>) {
    let tg = db.gateway(|c| c.limits.max_devices_per_user = 2).await;
    let t = |d: &str| tg.mint_device_token("flo", d, &[], TTL);
    assert!(connect_with_token(&tg.ws_url("flo-1", None), &t("flo-1"))
        .await
        .is_ok());
    let (s, _) = register_with(&tg, &t("flo-2"), "flo-2").await;
    assert_eq!(s, 200);
    // A third: 409 conflict on connect and on register, and no row.
    let err = connect_err(&tg, "flo-3", &t("flo-3")).await;
    assert!(
        err.starts_with("HTTP 409") && err.contains("max_devices_per_user"),
        "{err}"
    );
    let (s, v) = register_with(&tg, &t("flo-3"), "flo-3").await;
    assert_eq!((s, code(&v)), (409, "conflict"), "{v}");
    assert!(!device_exists(&tg, "flo-3").await);
    // Devices it has keep working; other users are not affected.
    assert!(connect_with_token(&tg.ws_url("flo-1", None), &t("flo-1"))
        .await
        .is_ok());
    let other = tg.mint_device_token("gus", "gus-1", &[], TTL);
    assert!(connect_with_token(&tg.ws_url("gus-1", None), &other)
        .await
        .is_ok());
    // Deleting one makes room.
    let (s, _) = delete(&tg, "/v1/devices/flo-2", &tg.api_key).await;
    assert_eq!(s, 204);
    assert!(connect_with_token(&tg.ws_url("flo-3", None), &t("flo-3"))
        .await
        .is_ok());
}

/// Many new devices of one user claimed at once, by register and by connect: the cap
/// is checked where the device is created, so exactly `max` of them exist afterwards
/// (a count read before the claim let every racing claim through).
async fn concurrent_claims_never_pass_the_device_cap(db: Arc<Db>) {
    const MAX: usize = 3;
    const RACING: usize = 24;
    let tg = Arc::new(db.gateway(|c| c.limits.max_devices_per_user = MAX).await);
    let claims = (0..RACING).map(|i| {
        let tg = tg.clone();
        tokio::spawn(async move {
            let id = format!("hal-{i}");
            let token = tg.mint_device_token("hal", &id, &[], TTL);
            if i % 2 == 0 {
                let (s, v) = register_with(&tg, &token, &id).await;
                assert!(s == 200 || (s == 409 && code(&v) == "conflict"), "{s} {v}");
                s == 200
            } else {
                match connect_with_token(&tg.ws_url(&id, None), &token).await {
                    Ok(_) => true,
                    Err(e) if e.starts_with("HTTP 409") => false,
                    Err(e) => panic!("{id}: {e}"),
                }
            }
        })
    });
    let mut admitted = 0;
    for claim in futures_util::future::join_all(claims).await {
        admitted += usize::from(claim.unwrap());
    }
    let (s, v) = get(&tg, "/v1/users/hal/devices", &tg.api_key).await;
    assert_eq!(s, 200, "{v}");
    let stored = v["devices"].as_array().expect("a devices list").len();
    assert_eq!(
        (admitted, stored),
        (MAX, MAX),
        "admitted {admitted}, stored {stored}: {v}"
    );
}

// ---------------------------------------------------------------------------------
// Item 1: topic authorisation

async fn claims_policy_limits_what_a_device_subscribes(db: Arc<Db>) {
    let tg = db.gateway(|c| c.limits.max_topics_per_device = 3).await;
    let alice = tg.mint_device_token("alice", "alice-1", &["news", "user.alice.*"], TTL);
    let mut a = connect_with_token(&tg.ws_url("alice-1", None), &alice)
        .await
        .unwrap();
    assert!(matches!(
        subscribe(&mut a, "news").await,
        ServerFrame::Subscribed { .. }
    ));
    assert!(matches!(
        subscribe(&mut a, "user.alice.inbox").await,
        ServerFrame::Subscribed { .. }
    ));

    // mallory's device asks for alice's topic: refused, nothing stored, session kept,
    // and alice's message does not reach it.
    let mallory = tg.mint_device_token("mallory", "mallory-1", &["news"], TTL);
    let mut m = connect_with_token(&tg.ws_url("mallory-1", None), &mallory)
        .await
        .unwrap();
    for topic in ["alice.private", "user.alice.inbox", "newsroom"] {
        let f = subscribe(&mut m, topic).await;
        assert!(forbidden_topic(&f), "{topic}: {f:?}");
    }
    still_open(&mut m).await;
    assert!(topics_of(&tg, "mallory-1").await.is_empty());
    let r = publish(
        &tg,
        json!({"to": {"topic": "user.alice.inbox"}, "data": {"secret": 1}, "push": "never"}),
    )
    .await;
    assert_eq!(r["recipients"], 1, "{r}");
    assert_eq!(a.msg().await.data["secret"], 1);
    m.quiet_for(Duration::from_millis(300)).await;

    // A token without a `topics` claim may subscribe to nothing.
    let bare = tg.mint_device_token("hal", "hal-1", &[], TTL);
    let mut h = connect_with_token(&tg.ws_url("hal-1", None), &bare)
        .await
        .unwrap();
    assert!(forbidden_topic(&subscribe(&mut h, "news").await));

    // The cap: a fourth topic is refused with too_many_topics, keeping the session.
    assert!(matches!(
        subscribe(&mut a, "user.alice.a").await,
        ServerFrame::Subscribed { .. }
    ));
    let f = subscribe(&mut a, "user.alice.b").await;
    assert!(
        matches!(&f, ServerFrame::Error { code, .. } if code == "too_many_topics"),
        "{f:?}"
    );
    // Re-subscribing to one it has is not a new one.
    assert!(matches!(
        subscribe(&mut a, "news").await,
        ServerFrame::Subscribed { .. }
    ));
    assert_eq!(
        topics_of(&tg, "alice-1").await,
        ["news", "user.alice.a", "user.alice.inbox"]
    );

    // At connect, what the new token no longer allows is dropped.
    drop(a);
    let narrower = tg.mint_device_token("alice", "alice-1", &["news"], TTL);
    let _a = connect_with_token(&tg.ws_url("alice-1", None), &narrower)
        .await
        .unwrap();
    assert_eq!(topics_of(&tg, "alice-1").await, ["news"]);
    let r = publish(
        &tg,
        json!({"to": {"topic": "user.alice.inbox"}, "data": {}, "push": "never"}),
    )
    .await;
    assert_eq!(r["recipients"], 0, "{r}");

    // POST /v1/tokens validates the patterns.
    let (s, v) = post(
        &tg,
        "/v1/tokens",
        &tg.api_key,
        json!({"user": "alice", "device_id": "alice-1", "topics": ["news", "a*b"]}),
    )
    .await;
    assert_eq!((s, code(&v)), (422, "invalid_field"), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("topics[1]"),
        "{v}"
    );
    let (s, v) = post(
        &tg,
        "/v1/tokens",
        &tg.api_key,
        json!({"user": "alice", "device_id": "alice-2", "topics": ["user.alice.*"]}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let mut a2 = connect_with_token(&tg.ws_url("alice-2", None), v["token"].as_str().unwrap())
        .await
        .unwrap();
    assert!(matches!(
        subscribe(&mut a2, "user.alice.x").await,
        ServerFrame::Subscribed { .. }
    ));
    assert!(forbidden_topic(&subscribe(&mut a2, "news").await));
}

async fn server_policy_leaves_subscriptions_to_the_backend(db: Arc<Db>) {
    let tg = db
        .gateway(|c| {
            c.auth.topic_policy = TopicPolicy::Server;
            c.limits.max_topics_per_device = 2;
        })
        .await;
    // Even a token that lists the topic cannot subscribe itself.
    let token = tg.mint_device_token("ivy", "ivy-1", &["*"], TTL);
    let mut d = connect_with_token(&tg.ws_url("ivy-1", None), &token)
        .await
        .unwrap();
    let f = subscribe(&mut d, "news").await;
    assert!(forbidden_topic(&f), "{f:?}");
    still_open(&mut d).await;
    assert!(topics_of(&tg, "ivy-1").await.is_empty());

    // The backend subscribes it.
    let (s, v) = put(&tg, "/v1/devices/ivy-1/topics/news", &tg.api_key).await;
    assert_eq!(s, 204, "{v}");
    let (s, _) = put(&tg, "/v1/devices/ivy-1/topics/news", &tg.api_key).await;
    assert_eq!(s, 204, "idempotent");
    let (s, v) = get(&tg, "/v1/devices/ivy-1/topics", &tg.api_key).await;
    assert_eq!((s, v), (200, json!({"topics": ["news"]})));
    let r = publish(
        &tg,
        json!({"to": {"topic": "news"}, "data": {"n": 7}, "push": "never"}),
    )
    .await;
    assert_eq!(r["recipients"], 1);
    assert_eq!(d.msg().await.data["n"], 7);
    // A reconnect with any token keeps backend subscriptions.
    drop(d);
    let _d = connect_with_token(
        &tg.ws_url("ivy-1", None),
        &tg.mint_device_token("ivy", "ivy-1", &[], TTL),
    )
    .await
    .unwrap();
    assert_eq!(topics_of(&tg, "ivy-1").await, ["news"]);

    // Bad input: unknown device 404, bad topic 422, past the cap 409; nothing stored.
    let (s, v) = put(&tg, "/v1/devices/nobody/topics/news", &tg.api_key).await;
    assert_eq!((s, code(&v)), (404, "not_found"));
    let (s, v) = get(&tg, "/v1/devices/nobody/topics", &tg.api_key).await;
    assert_eq!((s, code(&v)), (404, "not_found"));
    let (s, v) = put(&tg, "/v1/devices/ivy-1/topics/a%20b", &tg.api_key).await;
    assert_eq!((s, code(&v)), (422, "invalid_field"), "{v}");
    let (s, _) = put(&tg, "/v1/devices/ivy-1/topics/sport", &tg.api_key).await;
    assert_eq!(s, 204);
    let (s, v) = put(&tg, "/v1/devices/ivy-1/topics/weather", &tg.api_key).await;
    assert_eq!((s, code(&v)), (409, "conflict"), "{v}");
    assert!(message(&v).contains("max_topics_per_device"), "{v}");
    assert_eq!(topics_of(&tg, "ivy-1").await, ["news", "sport"]);

    let (s, _) = delete(&tg, "/v1/devices/ivy-1/topics/news", &tg.api_key).await;
    assert_eq!(s, 204);
    let (s, _) = delete(&tg, "/v1/devices/ivy-1/topics/news", &tg.api_key).await;
    assert_eq!(s, 204, "idempotent");
    assert_eq!(topics_of(&tg, "ivy-1").await, ["sport"]);
}

async fn open_policy_is_the_old_behaviour(db: Arc<Db>) {
    let tg = db
        .gateway(|c| c.auth.topic_policy = TopicPolicy::Open)
        .await;
    let token = tg.mint_device_token("jo", "jo-1", &[], TTL);
    let mut d = connect_with_token(&tg.ws_url("jo-1", None), &token)
        .await
        .unwrap();
    assert!(matches!(
        subscribe(&mut d, "anything.at.all").await,
        ServerFrame::Subscribed { .. }
    ));
    assert_eq!(topics_of(&tg, "jo-1").await, ["anything.at.all"]);
}

// ---------------------------------------------------------------------------------
// Item 4: revocation

async fn revocation_refuses_old_tokens_and_closes_sessions(db: Arc<Db>) {
    let secret = "0123456789abcdef0123456789abcdef";
    let tg = db
        .gateway(|c| c.auth.jwt_secret = Some(secret.into()))
        .await;
    let old = tg.mint_device_token("kim", "kim-1", &[], TTL);
    let old2 = tg.mint_device_token("kim", "kim-2", &[], TTL);
    let mut d1 = connect_with_token(&tg.ws_url("kim-1", None), &old)
        .await
        .unwrap();
    let mut d2 = connect_with_token(&tg.ws_url("kim-2", None), &old2)
        .await
        .unwrap();
    let other = tg.mint_device_token("lee", "lee-1", &[], TTL);
    let mut bystander = connect_with_token(&tg.ws_url("lee-1", None), &other)
        .await
        .unwrap();

    let (s, v) = post(&tg, "/v1/users/kim/revoke_tokens", &tg.api_key, json!({})).await;
    assert_eq!(s, 204, "{v}");
    for d in [&mut d1, &mut d2] {
        let (code, reason) = closed_with(d).await;
        assert_eq!((code, reason.as_str()), (CloseCode::Policy, "revoked"));
    }
    still_open(&mut bystander).await;

    // The old tokens are refused everywhere; the inbox is untouched.
    let err = connect_err(&tg, "kim-1", &old).await;
    assert!(
        err.starts_with("HTTP 401") && err.contains("revoked"),
        "{err}"
    );
    let (s, v) = get(&tg, "/v1/me/sync?device_id=kim-1", &old).await;
    assert_eq!((s, code(&v)), (401, "unauthorized"), "{v}");
    let (s, _) = register_with(&tg, &old, "kim-1").await;
    assert_eq!(s, 401);
    // A token without `iat` is refused once a revocation exists for its user.
    let no_iat = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "kim", "did": "kim-1", "iss": "herald", "aud": "herald-device",
                "exp": herald_gateway::clock::now_ms() / 1000 + 600}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    assert!(connect_err(&tg, "kim-1", &no_iat)
        .await
        .starts_with("HTTP 401"));
    // ...but not for a user without one.
    let lee_no_iat = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "lee", "did": "lee-2", "iss": "herald", "aud": "herald-device",
                "exp": herald_gateway::clock::now_ms() / 1000 + 600}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    assert!(connect_with_token(&tg.ws_url("lee-2", None), &lee_no_iat)
        .await
        .is_ok());

    // Tokens issued after the revocation's second work.
    let revoked_at = herald_gateway::clock::now_ms() / 1000;
    while herald_gateway::clock::now_ms() / 1000 <= revoked_at {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fresh = tg.mint_device_token("kim", "kim-1", &[], TTL);
    let mut again = connect_with_token(&tg.ws_url("kim-1", None), &fresh)
        .await
        .unwrap();
    still_open(&mut again).await;

    // Unknown users and bad ids: revoking is still fine (a user with no devices
    // yet); a bad id is 422.
    let (s, _) = post(
        &tg,
        "/v1/users/nobody/revoke_tokens",
        &tg.api_key,
        json!({}),
    )
    .await;
    assert_eq!(s, 204);
    let (s, v) = post(&tg, "/v1/users/a%20b/revoke_tokens", &tg.api_key, json!({})).await;
    assert_eq!((s, code(&v)), (422, "invalid_field"), "{v}");
}

// ---------------------------------------------------------------------------------
// Item 6: operational endpoints (no store involved)

#[tokio::test]
async fn metrics_token_guards_metrics() {
    let tg =
        TestGateway::start_secure_with(|c| c.ops.metrics_token = Some("m-secret".into())).await;
    let url = format!("{}/metrics", tg.base_url);
    let r = http().get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(code(&v), "unauthorized");
    let r = http().get(&url).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = http()
        .get(&url)
        .bearer_auth("m-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().await.unwrap().contains("herald_"));
    // Health stays public for load balancers.
    let r = http()
        .get(format!("{}/readyz", tg.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn ops_listener_takes_metrics_off_the_main_port() {
    let tg =
        TestGateway::start_secure_with(|c| c.ops.listen = Some("127.0.0.1:0".parse().unwrap()))
            .await;
    let ops = tg.ops_url.clone().expect("ops listener bound");
    let r = http()
        .get(format!("{}/metrics", tg.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let r = http().get(format!("{ops}/metrics")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().await.unwrap().contains("herald_"));
    let r = http().get(format!("{ops}/readyz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // The ops listener serves nothing else.
    let r = http()
        .get(format!("{ops}/v1/devices/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

// ---------------------------------------------------------------------------------
// Item 5: JWKS

/// An ES256 key pair: the JWK of its public half and a signer.
struct EcKey {
    kid: String,
    pkcs8: Vec<u8>,
    jwk: Value,
}

impl EcKey {
    fn new(kid: &str) -> EcKey {
        use base64::Engine;
        use ring::signature::KeyPair;
        let rng = ring::rand::SystemRandom::new();
        let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng)
            .unwrap()
            .as_ref()
            .to_vec();
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, &pkcs8, &rng).unwrap();
        // Uncompressed point: 0x04 || X || Y.
        let point = pair.public_key().as_ref();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        EcKey {
            kid: kid.into(),
            jwk: json!({
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..65]),
            }),
            pkcs8,
        }
    }

    fn token(&self, user: &str, device: &str) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let now = herald_gateway::clock::now_ms() / 1000;
        jsonwebtoken::encode(
            &header,
            &json!({"sub": user, "did": device, "iss": "herald", "aud": "herald-device",
                    "iat": now, "exp": now + 600}),
            &jsonwebtoken::EncodingKey::from_ec_der(&self.pkcs8),
        )
        .unwrap()
    }
}

/// A JWKS endpoint on 127.0.0.1 whose key set the test changes, counting fetches.
struct JwksServer {
    url: String,
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(keys: Vec<Value>) -> JwksServer {
        let keys = Arc::new(Mutex::new(keys));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (k, f) = (keys.clone(), fetches.clone());
        let app = axum::Router::new().route(
            "/.well-known/jwks.json",
            axum::routing::get(move || {
                let (k, f) = (k.clone(), f.clone());
                async move {
                    f.fetch_add(1, Ordering::SeqCst);
                    axum::Json(json!({"keys": *k.lock().unwrap()}))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        JwksServer {
            url: format!("http://{addr}/.well-known/jwks.json"),
            keys,
            fetches,
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_rotate_by_kid_with_rate_limited_refresh() {
    let k1 = EcKey::new("k1");
    let k2 = EcKey::new("k2");
    // An RSA key of another algorithm in the same set is skipped, not fatal.
    let foreign = json!({"kty": "RSA", "alg": "RS256", "kid": "r1", "n": "sXch", "e": "AQAB"});
    let jwks = JwksServer::start(vec![k1.jwk.clone(), foreign]).await;
    let url = jwks.url.clone();
    let tg = TestGateway::start_secure_with(move |c| {
        c.auth.jwt_algorithm = "ES256".into();
        c.auth.jwks_url = Some(url);
        c.auth.jwks_min_refresh_seconds = 3600;
        c.auth.jwks_refresh_seconds = 3600;
    })
    .await;
    assert_eq!(jwks.fetches(), 1, "fetched once at start");
    assert!(
        connect_with_token(&tg.ws_url("m-1", None), &k1.token("mo", "m-1"))
            .await
            .is_ok()
    );

    // The issuer rotates to k2: the first token naming k2 triggers one refresh.
    jwks.keys.lock().unwrap().push(k2.jwk.clone());
    assert!(
        connect_with_token(&tg.ws_url("m-1", None), &k2.token("mo", "m-1"))
            .await
            .is_ok()
    );
    assert_eq!(jwks.fetches(), 2);
    assert!(
        connect_with_token(&tg.ws_url("m-1", None), &k2.token("mo", "m-1"))
            .await
            .is_ok()
    );
    assert_eq!(jwks.fetches(), 2, "a known kid fetches nothing");

    // Unknown kids: one refresh at most per jwks_min_refresh_seconds, then 401.
    let k3 = EcKey::new("k3");
    for _ in 0..5 {
        let err = connect_err(&tg, "m-1", &k3.token("mo", "m-1")).await;
        assert!(err.starts_with("HTTP 401") && err.contains("k3"), "{err}");
    }
    assert_eq!(
        jwks.fetches(),
        2,
        "rate-limited: the last refresh was just now"
    );
    // A token under a known kid but signed by another key: 401.
    let forged = EcKey::new("k1");
    assert!(connect_err(&tg, "m-1", &forged.token("mo", "m-1"))
        .await
        .starts_with("HTTP 401"));
    // HS256 tokens are not accepted by an ES256 gateway.
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "mo", "did": "m-1", "iss": "herald", "aud": "herald-device",
                "exp": herald_gateway::clock::now_ms() / 1000 + 600}),
        &jsonwebtoken::EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
    )
    .unwrap();
    assert!(connect_err(&tg, "m-1", &hs).await.starts_with("HTTP 401"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_refresh_after_the_minimum_interval() {
    let k1 = EcKey::new("k1");
    let jwks = JwksServer::start(vec![k1.jwk.clone()]).await;
    let url = jwks.url.clone();
    let tg = TestGateway::start_secure_with(move |c| {
        c.auth.jwt_algorithm = "ES256".into();
        c.auth.jwks_url = Some(url);
        c.auth.jwks_min_refresh_seconds = 1;
        c.auth.jwks_refresh_seconds = 3600;
    })
    .await;
    let k2 = EcKey::new("k2");
    // Not published yet: refused, after one refresh.
    assert!(connect_err(&tg, "n-1", &k2.token("ned", "n-1"))
        .await
        .starts_with("HTTP 401"));
    let after_first = jwks.fetches();
    assert_eq!(after_first, 2);
    // Published now; the next unknown-kid refresh is allowed once the interval passed.
    jwks.keys.lock().unwrap().push(k2.jwk.clone());
    let ok = eventually("k2 accepted after the minimum interval", || async {
        connect_with_token(&tg.ws_url("n-1", None), &k2.token("ned", "n-1"))
            .await
            .ok()
    })
    .await;
    drop(ok);
    assert_eq!(jwks.fetches(), 3, "one more fetch, not one per attempt");
    // Rotated out: k1 is refused after the set no longer lists it and a refresh ran.
    jwks.keys.lock().unwrap().retain(|k| k["kid"] != "k1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let k4 = EcKey::new("k4");
    let _ = connect_err(&tg, "n-1", &k4.token("ned", "n-1")).await; // triggers a refresh
    assert!(connect_err(&tg, "n-1", &k1.token("ned", "n-1"))
        .await
        .starts_with("HTTP 401"));
}
