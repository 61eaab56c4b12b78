//! One behaviour, two databases: every test here is an `async fn(Arc<dyn Store>)` and
//! runs against SQLite (`sqlite::name`) and PostgreSQL (`postgres::name`).
//!
//! PostgreSQL: `postgres://postgres@127.0.0.1:5432/test` unless
//! `HERALD_TEST_DATABASE_URL` says otherwise; each test creates its own database
//! (`herald_t_<uuid>`) and drops it afterwards, so tests run in parallel. When the
//! server is unreachable the PostgreSQL tests fail (never skip): start it with
//! `scripts/ensure-services.sh`.

use crate::common;

use std::future::Future;
use std::sync::Arc;

use herald_gateway::auth::Scope;
use herald_gateway::store::postgres::PostgresStore;
use herald_gateway::store::sqlite::SqliteStore;
use herald_gateway::store::{
    push_due_at, ApiKeyRecord, InboxEntry, MessagePayload, NewMessage, PublishOutcome, PushMark,
    Store, StoreError,
};
use herald_gateway::testing::TempDir;
use herald_protocol::{
    ApnsEnvironment, DeliveryState, Platform, Priority, PushContent, PushPolicy, PushProviderKind,
    PushTokenState, RegisterDeviceRequest, Target,
};
use serde_json::json;

const T0: i64 = 1_700_000_000_000;
const DAY: i64 = 24 * 3600 * 1000;
/// The ack timeout the tests' publishes schedule fallback pushes with.
const ACK: i64 = 5_000;
/// The per-user device cap of claims that are not about the cap: none (some fixtures
/// give one user more devices than the default cap of 100).
const CAP: u64 = u64::MAX;

// ---------------------------------------------------------------------------------
// Fixtures

async fn run_sqlite<F, Fut>(test: F)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let tmp = TempDir::new("herald-conformance");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&tmp.0).await.expect("open sqlite"));
    test(store).await;
}

async fn run_postgres<F, Fut>(test: F)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let db = common::pg::PgDb::create().await;
    let opened = PostgresStore::open(&db.url).await;
    let store: Arc<dyn Store> = match opened {
        Ok(s) => Arc::new(s),
        Err(e) => {
            db.drop_db().await;
            panic!("open postgres store: {e}");
        }
    };
    // In a task, so a failing test still drops its database.
    let result = tokio::spawn(test(store)).await;
    db.drop_db().await;
    if let Err(e) = result {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
        panic!("test task: {e}");
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::run_sqlite(super::$name).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::run_postgres(super::$name).await
                }
            )*
        }
    };
}

conformance!(
    settings_are_initialised_once,
    api_keys_create_find_revoke,
    claim_device_ownership,
    concurrent_claims_have_one_winner,
    register_and_invalidate_token,
    subscriptions,
    claims_stop_at_the_user_device_cap,
    token_revocations_only_move_forward,
    publish_assigns_increasing_seqs_per_device,
    concurrent_publishes_to_one_device_are_gapless,
    fetch_after_orders_limits_and_hides_expired,
    ack_is_clamped_and_monotonic,
    idempotency_key_returns_duplicate,
    concurrent_idempotency_key_creates_once,
    idempotency_key_expires_after_window,
    too_many_recipients_writes_nothing,
    large_user_and_topic_publishes_give_each_recipient_its_next_seq,
    unknown_device_is_not_found_and_writes_nothing,
    batch_publish_answers_each_item_in_order,
    publish_schedules_push_by_policy,
    claim_push_only_once,
    concurrent_claims_push_once,
    no_claim_after_ack_or_expiry,
    retry_push_is_due_later_with_attempts,
    orphaned_claim_fails_and_is_never_resent,
    ack_cancels_scheduled_pushes,
    ack_leaves_always_pushes_due,
    taking_due_pushes_leases_them,
    concurrent_takes_are_disjoint,
    concurrent_batch_claims_push_once,
    finish_push_shows_in_delivery_state,
    delete_device_removes_inbox,
    sweep_deletes_old_entries,
    message_status_rows,
    ack_from_the_writing_session_records_sent,
    concurrent_writes_with_refused_items_commit_the_others,
    concurrent_acks_of_many_devices_each_ack_their_own,
);

// ---------------------------------------------------------------------------------
// Helpers

fn payload(push: PushPolicy) -> MessagePayload {
    MessagePayload {
        data: json!({"text": "hello", "n": 1}).into(),
        notification: None,
        push,
        push_content: PushContent::Full,
        priority: Priority::Normal,
        collapse_key: None,
    }
}

fn new_msg(target: Target, now: i64) -> NewMessage {
    NewMessage {
        id: uuid::Uuid::now_v7().to_string(),
        api_key_id: "key1".into(),
        target,
        payload: payload(PushPolicy::Never),
        created_at: now,
        expires_at: now + DAY,
        idempotency_key: None,
        idempotency_since: now - DAY,
        max_recipients: 1000,
        push_due_at: None,
    }
}

/// Sets the push policy and, as the publish route does, the push's due time.
fn set_push(m: &mut NewMessage, push: PushPolicy) {
    m.payload.push = push;
    m.push_due_at = push_due_at(push, m.created_at, ACK);
}

fn to_device(d: &str) -> Target {
    Target::Device(d.into())
}

fn created(outcome: PublishOutcome) -> Vec<InboxEntry> {
    match outcome {
        PublishOutcome::Created { entries } => entries,
        other => panic!("expected Created, got {other:?}"),
    }
}

async fn publish_ok(store: &Arc<dyn Store>, msg: NewMessage) -> Vec<InboxEntry> {
    created(store.publish(msg).await.expect("publish"))
}

async fn device(store: &Arc<dyn Store>, id: &str, user: &str) {
    store
        .claim_device(id, user, T0, CAP)
        .await
        .expect("claim device");
}

async fn device_ids(store: &Arc<dyn Store>, user: &str) -> Vec<String> {
    let devices = store.user_devices(user).await.unwrap();
    devices.into_iter().map(|d| d.id).collect()
}

/// How many of the racing claims got their device; the others must have hit the cap.
async fn admitted_claims(
    tasks: Vec<tokio::task::JoinHandle<Result<herald_gateway::store::Device, StoreError>>>,
) -> usize {
    let mut admitted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => admitted += 1,
            Err(StoreError::DeviceCapReached { .. }) => {}
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    admitted
}

/// Publishes one message to `d` with the given push policy, device offline.
async fn one_entry(store: &Arc<dyn Store>, d: &str, push: PushPolicy, now: i64) -> InboxEntry {
    let mut m = new_msg(to_device(d), now);
    set_push(&mut m, push);
    let mut entries = publish_ok(store, m).await;
    assert_eq!(entries.len(), 1);
    entries.remove(0)
}

async fn delivery_state(store: &Arc<dyn Store>, msg_id: &str, d: &str, now: i64) -> DeliveryState {
    let (_, rows) = store.message(msg_id).await.unwrap().expect("message");
    rows.iter()
        .find(|r| r.device_id == d)
        .expect("delivery row")
        .to_wire(now)
        .state
}

fn ios(token: Option<&str>) -> RegisterDeviceRequest {
    RegisterDeviceRequest {
        platform: Platform::Ios,
        push_provider: Some(PushProviderKind::Apns),
        push_token: token.map(str::to_owned),
        apns_environment: Some(ApnsEnvironment::Sandbox),
    }
}

// ---------------------------------------------------------------------------------
// Tests

async fn settings_are_initialised_once(store: Arc<dyn Store>) {
    assert_eq!(store.setting("s").await.unwrap(), None);
    assert_eq!(store.init_setting("s", "first").await.unwrap(), "first");
    assert_eq!(store.init_setting("s", "second").await.unwrap(), "first");
    assert_eq!(store.setting("s").await.unwrap().as_deref(), Some("first"));
    store.ping().await.unwrap();
}

async fn api_keys_create_find_revoke(store: Arc<dyn Store>) {
    let k1 = ApiKeyRecord {
        id: "id1".into(),
        name: "first".into(),
        prefix: "hk_aaaa".into(),
        hash: vec![1, 2, 3, 0, 255],
        created_at: T0,
        revoked_at: None,
        scopes: vec![Scope::Publish, Scope::Read],
    };
    let k2 = ApiKeyRecord {
        id: "id2".into(),
        name: "second".into(),
        prefix: "hk_bbbb".into(),
        hash: vec![9; 32],
        created_at: T0 + 1,
        revoked_at: None,
        scopes: vec![Scope::Admin],
    };
    store.create_api_key(&k2).await.unwrap();
    store.create_api_key(&k1).await.unwrap();
    assert_eq!(
        store.api_keys().await.unwrap(),
        vec![k1.clone(), k2.clone()]
    );
    assert_eq!(
        store.api_key_by_hash(&k1.hash).await.unwrap(),
        Some(k1.clone())
    );
    assert_eq!(store.api_key_by_hash(&[7, 7]).await.unwrap(), None);
    // Same hash twice is refused.
    let mut dup = k1.clone();
    dup.id = "id3".into();
    assert!(store.create_api_key(&dup).await.is_err());

    assert_eq!(store.revoke_api_key("hk_aaaa", T0 + 5).await.unwrap(), 1);
    assert_eq!(store.revoke_api_key("hk_aaaa", T0 + 6).await.unwrap(), 0);
    assert_eq!(store.revoke_api_key("id2", T0 + 7).await.unwrap(), 1);
    assert_eq!(store.revoke_api_key("nope", T0 + 7).await.unwrap(), 0);
    let found = store.api_key_by_hash(&k1.hash).await.unwrap().unwrap();
    assert_eq!(found.revoked_at, Some(T0 + 5));
    let all = store.api_keys().await.unwrap();
    assert_eq!(all[1].revoked_at, Some(T0 + 7));
}

async fn claim_device_ownership(store: Arc<dyn Store>) {
    let d = store.claim_device("d1", "alice", T0, CAP).await.unwrap();
    assert_eq!(d.user_id, "alice");
    assert_eq!((d.last_seq, d.acked_seq), (0, 0));
    assert_eq!(d.token_state, PushTokenState::None);
    assert_eq!(d.last_seen, Some(T0));
    // Idempotent for the owner.
    let again = store
        .claim_device("d1", "alice", T0 + 10, CAP)
        .await
        .unwrap();
    assert_eq!(again.id, "d1");
    let err = store.claim_device("d1", "bob", T0, CAP).await.unwrap_err();
    assert!(
        matches!(err, StoreError::DeviceOwnedByOtherUser(ref id) if id == "d1"),
        "{err:?}"
    );
    let err = store
        .register_device("d1", "bob", &ios(Some("t")), T0, CAP)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::DeviceOwnedByOtherUser(_)),
        "{err:?}"
    );
    assert_eq!(store.device("d1").await.unwrap().unwrap().user_id, "alice");
    assert!(store.device("d2").await.unwrap().is_none());

    device(&store, "d0", "alice").await;
    device(&store, "x", "bob").await;
    assert_eq!(device_ids(&store, "alice").await, ["d0", "d1"]);
    store.touch_device("d1", T0 + 99).await.unwrap();
    assert_eq!(
        store.device("d1").await.unwrap().unwrap().last_seen,
        Some(T0 + 99)
    );
}

async fn concurrent_claims_have_one_winner(store: Arc<dyn Store>) {
    for round in 0..20 {
        let id = format!("dev{round}");
        let mut tasks = Vec::new();
        for user in ["alice", "bob", "carol"] {
            let (store, id) = (store.clone(), id.clone());
            tasks.push(tokio::spawn(async move {
                store
                    .claim_device(&id, user, T0, CAP)
                    .await
                    .map(|d| d.user_id)
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(user) => winners.push(user),
                Err(StoreError::DeviceOwnedByOtherUser(_)) => {}
                Err(e) => panic!("unexpected error: {e:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let owner = store.device(&id).await.unwrap().unwrap().user_id;
        assert_eq!(owner, winners[0]);
    }
}

async fn register_and_invalidate_token(store: Arc<dyn Store>) {
    let d = store
        .register_device("d1", "alice", &ios(Some("tok1")), T0, CAP)
        .await
        .unwrap();
    assert_eq!(d.platform, Some(Platform::Ios));
    assert_eq!(d.push_provider, Some(PushProviderKind::Apns));
    assert_eq!(d.apns_environment, Some(ApnsEnvironment::Sandbox));
    assert_eq!(d.push_token.as_deref(), Some("tok1"));
    assert_eq!(d.token_state, PushTokenState::Active);

    // Another token than the stored one: nothing happens.
    store
        .invalidate_push_token("d1", "other", "Unregistered")
        .await
        .unwrap();
    let d = store.device("d1").await.unwrap().unwrap();
    assert_eq!(d.token_state, PushTokenState::Active);

    store
        .invalidate_push_token("d1", "tok1", "BadDeviceToken")
        .await
        .unwrap();
    let d = store.device("d1").await.unwrap().unwrap();
    assert_eq!(d.token_state, PushTokenState::Invalid);
    assert_eq!(d.token_error.as_deref(), Some("BadDeviceToken"));

    // Re-registering revives it; invalidating the old token then does nothing.
    let d = store
        .register_device("d1", "alice", &ios(Some("tok2")), T0 + 1, CAP)
        .await
        .unwrap();
    assert_eq!(d.token_state, PushTokenState::Active);
    assert_eq!(d.token_error, None);
    store
        .invalidate_push_token("d1", "tok1", "Unregistered")
        .await
        .unwrap();
    let d = store.device("d1").await.unwrap().unwrap();
    assert_eq!(d.token_state, PushTokenState::Active);
    assert_eq!(d.push_token.as_deref(), Some("tok2"));

    let d = store
        .register_device("d1", "alice", &ios(None), T0 + 2, CAP)
        .await
        .unwrap();
    assert_eq!(d.token_state, PushTokenState::None);
    assert_eq!(d.push_token, None);
}

async fn subscriptions(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    store.subscribe("d1", "news").await.unwrap();
    store.subscribe("d1", "news").await.unwrap();
    store.subscribe("d1", "Alerts").await.unwrap();
    assert_eq!(store.device_topics("d1").await.unwrap(), ["Alerts", "news"]);
    store.unsubscribe("d1", "news").await.unwrap();
    assert_eq!(store.device_topics("d1").await.unwrap(), ["Alerts"]);
}

async fn claims_stop_at_the_user_device_cap(store: Arc<dyn Store>) {
    let claim = |id: &'static str, user: &'static str| {
        let store = store.clone();
        async move { store.claim_device(id, user, T0, 2).await }
    };
    claim("d1", "alice").await.unwrap();
    claim("d2", "alice").await.unwrap();
    claim("b1", "bob").await.unwrap();
    let err = claim("d3", "alice").await.unwrap_err();
    assert!(
        matches!(err, StoreError::DeviceCapReached { ref user, count: 2, max: 2 } if user == "alice"),
        "{err:?}"
    );
    let err = store
        .register_device("d3", "alice", &ios(Some("t")), T0, 2)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::DeviceCapReached { .. }),
        "{err:?}"
    );
    assert!(store.device("d3").await.unwrap().is_none());
    // At the cap, the devices the user has still claim; others' do not count.
    assert_eq!(claim("d1", "alice").await.unwrap().id, "d1");
    claim("b2", "bob").await.unwrap();
    // Deleting one makes room.
    assert!(store.delete_device("d1").await.unwrap());
    claim("d3", "alice").await.unwrap();
    assert_eq!(device_ids(&store, "alice").await, ["d2", "d3"]);

    // Claims of new devices racing each other: exactly the cap gets through.
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.claim_device(&format!("c{i}"), "carol", T0, 5).await })
        })
        .collect();
    assert_eq!(admitted_claims(tasks).await, 5);
    assert_eq!(store.user_devices("carol").await.unwrap().len(), 5);
}

async fn token_revocations_only_move_forward(store: Arc<dyn Store>) {
    assert_eq!(store.tokens_revoked_before("alice").await.unwrap(), None);
    store.revoke_user_tokens("alice", 1_000).await.unwrap();
    assert_eq!(
        store.tokens_revoked_before("alice").await.unwrap(),
        Some(1_000)
    );
    // A revocation with an older mark (a node with a slow clock) does not undo one.
    store.revoke_user_tokens("alice", 900).await.unwrap();
    assert_eq!(
        store.tokens_revoked_before("alice").await.unwrap(),
        Some(1_000)
    );
    store.revoke_user_tokens("alice", 2_000).await.unwrap();
    assert_eq!(
        store.tokens_revoked_before("alice").await.unwrap(),
        Some(2_000)
    );
    assert_eq!(store.tokens_revoked_before("bob").await.unwrap(), None);
}

async fn publish_assigns_increasing_seqs_per_device(store: Arc<dyn Store>) {
    device(&store, "a1", "alice").await;
    device(&store, "a2", "alice").await;
    device(&store, "b1", "bob").await;
    store.subscribe("a2", "t").await.unwrap();
    store.subscribe("b1", "t").await.unwrap();

    let e = publish_ok(&store, new_msg(to_device("a1"), T0)).await;
    assert_eq!(
        e.iter()
            .map(|e| (e.device_id.as_str(), e.seq))
            .collect::<Vec<_>>(),
        [("a1", 1)]
    );
    let e = publish_ok(&store, new_msg(Target::User("alice".into()), T0)).await;
    assert_eq!(
        e.iter()
            .map(|e| (e.device_id.as_str(), e.seq))
            .collect::<Vec<_>>(),
        [("a1", 2), ("a2", 1)]
    );
    let e = publish_ok(&store, new_msg(Target::Topic("t".into()), T0)).await;
    assert_eq!(
        e.iter()
            .map(|e| (e.device_id.as_str(), e.seq))
            .collect::<Vec<_>>(),
        [("a2", 2), ("b1", 1)]
    );
    // Nobody listening: created with no entries.
    let e = publish_ok(&store, new_msg(Target::Topic("empty".into()), T0)).await;
    assert!(e.is_empty());
    let e = publish_ok(&store, new_msg(Target::User("nobody".into()), T0)).await;
    assert!(e.is_empty());

    assert_eq!(store.device("a1").await.unwrap().unwrap().last_seq, 2);
    assert_eq!(store.device("a2").await.unwrap().unwrap().last_seq, 2);
    assert_eq!(store.device("b1").await.unwrap().unwrap().last_seq, 1);

    let m = new_msg(Target::User("alice".into()), T0);
    let id = m.id.clone();
    publish_ok(&store, m).await;
    let (stored, rows) = store.message(&id).await.unwrap().unwrap();
    assert_eq!(stored.target, Target::User("alice".into()));
    assert_eq!(stored.payload, payload(PushPolicy::Never));
    assert_eq!((stored.created_at, stored.expires_at), (T0, T0 + DAY));
    assert_eq!(
        rows.iter()
            .map(|r| (r.device_id.as_str(), r.seq))
            .collect::<Vec<_>>(),
        [("a1", 3), ("a2", 3)]
    );
}

async fn concurrent_publishes_to_one_device_are_gapless(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    device(&store, "d2", "alice").await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            // Mix single-device and fan-out publishes: both take d1's seqs.
            let target = if i % 5 == 0 {
                Target::User("alice".into())
            } else {
                to_device("d1")
            };
            let entries = created(store.publish(new_msg(target, T0)).await.unwrap());
            entries
                .into_iter()
                .find(|e| e.device_id == "d1")
                .unwrap()
                .seq
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort();
    assert_eq!(seqs, (1..=50).collect::<Vec<i64>>());
    let d1 = store.device("d1").await.unwrap().unwrap();
    assert_eq!(d1.last_seq, 50);
    let inbox = store.fetch_after("d1", 0, 100, T0).await.unwrap();
    assert_eq!(
        inbox.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=50).collect::<Vec<i64>>()
    );
    assert_eq!(store.device("d2").await.unwrap().unwrap().last_seq, 10);
}

async fn fetch_after_orders_limits_and_hides_expired(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let mut m = new_msg(to_device("d1"), T0 + i);
        // seq 2 and 4 expire early.
        if i == 1 || i == 3 {
            m.expires_at = T0 + 1000;
        }
        m.payload.data = json!({"i": i}).into();
        ids.push(m.id.clone());
        publish_ok(&store, m).await;
    }
    let all = store.fetch_after("d1", 0, 100, T0 + 10).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(all[2].message.id, ids[2]);
    assert_eq!(all[2].message.payload.data, json!({"i": 2}).into());
    let wire: herald_protocol::ServerFrame = serde_json::from_str(&all[0].msg_frame()).unwrap();
    let herald_protocol::ServerFrame::Msg(wire) = wire else {
        panic!("{wire:?}")
    };
    assert_eq!((wire.seq, wire.id.as_str()), (1, ids[0].as_str()));
    assert_eq!(wire.data, json!({"i": 0}));

    let page = store.fetch_after("d1", 2, 2, T0 + 10).await.unwrap();
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
    let live = store.fetch_after("d1", 0, 100, T0 + 1000).await.unwrap();
    assert_eq!(live.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 3, 5, 6]);
    assert!(store
        .fetch_after("d1", 6, 100, T0)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .fetch_after("nope", 0, 100, T0)
        .await
        .unwrap()
        .is_empty());
}

async fn ack_is_clamped_and_monotonic(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    for _ in 0..3 {
        publish_ok(&store, new_msg(to_device("d1"), T0)).await;
    }
    assert_eq!(store.ack("d1", 2, T0 + 1, false).await.unwrap(), 2);
    // Backwards: ignored.
    assert_eq!(store.ack("d1", 1, T0 + 2, false).await.unwrap(), 2);
    // Beyond the last assigned seq: clamped.
    assert_eq!(store.ack("d1", 99, T0 + 3, false).await.unwrap(), 3);
    let d = store.device("d1").await.unwrap().unwrap();
    assert_eq!((d.acked_seq, d.last_seq), (3, 3));
    assert_eq!(d.last_seen, Some(T0 + 3));
    // New messages after a clamped ack are not considered acked.
    let e = publish_ok(&store, new_msg(to_device("d1"), T0)).await;
    assert_eq!(e[0].seq, 4);
    assert_eq!(
        delivery_state(&store, &e[0].message.id, "d1", T0 + 4).await,
        DeliveryState::Queued
    );
    assert_eq!(store.ack("d1", 0, T0 + 4, false).await.unwrap(), 3);
    assert!(matches!(
        store.ack("nope", 1, T0, false).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn idempotency_key_returns_duplicate(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    device(&store, "d2", "alice").await;
    let mut m = new_msg(Target::User("alice".into()), T0);
    m.idempotency_key = Some("k".into());
    let first_id = m.id.clone();
    assert_eq!(publish_ok(&store, m).await.len(), 2);

    let mut again = new_msg(to_device("d1"), T0 + 1000);
    again.idempotency_key = Some("k".into());
    let again_id = again.id.clone();
    match store.publish(again).await.unwrap() {
        PublishOutcome::Duplicate {
            message_id,
            recipients,
        } => {
            assert_eq!(message_id, first_id);
            assert_eq!(recipients, 2);
        }
        other => panic!("expected Duplicate, got {other:?}"),
    }
    assert!(store.message(&again_id).await.unwrap().is_none());
    assert_eq!(store.device("d1").await.unwrap().unwrap().last_seq, 1);

    // Keys are per API key.
    let mut other_key = new_msg(to_device("d1"), T0 + 1000);
    other_key.api_key_id = "key2".into();
    other_key.idempotency_key = Some("k".into());
    assert_eq!(publish_ok(&store, other_key).await[0].seq, 2);
}

async fn concurrent_idempotency_key_creates_once(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut m = new_msg(to_device("d1"), T0);
            m.idempotency_key = Some("same".into());
            let id = m.id.clone();
            (id, store.publish(m).await.unwrap())
        }));
    }
    let mut created_ids = Vec::new();
    let mut duplicate_of = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            (id, PublishOutcome::Created { entries }) => {
                assert_eq!(entries.len(), 1);
                created_ids.push(id);
            }
            (_, PublishOutcome::Duplicate { message_id, .. }) => duplicate_of.push(message_id),
        }
    }
    assert_eq!(created_ids.len(), 1, "exactly one publish creates");
    assert_eq!(duplicate_of.len(), 19);
    assert!(duplicate_of.iter().all(|id| *id == created_ids[0]));
    assert_eq!(store.device("d1").await.unwrap().unwrap().last_seq, 1);
}

async fn idempotency_key_expires_after_window(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    let mut old = new_msg(to_device("d1"), T0);
    old.idempotency_key = Some("k".into());
    let old_id = old.id.clone();
    publish_ok(&store, old).await;

    // A day later the window starts after the first message: the key is free again.
    let later = T0 + DAY + 1;
    let mut fresh = new_msg(to_device("d1"), later);
    fresh.idempotency_key = Some("k".into());
    fresh.idempotency_since = later - DAY;
    let fresh_id = fresh.id.clone();
    let e = publish_ok(&store, fresh).await;
    assert_eq!(e[0].seq, 2);
    assert_ne!(fresh_id, old_id);

    let mut third = new_msg(to_device("d1"), later + 5);
    third.idempotency_key = Some("k".into());
    third.idempotency_since = later + 5 - DAY;
    match store.publish(third).await.unwrap() {
        PublishOutcome::Duplicate { message_id, .. } => assert_eq!(message_id, fresh_id),
        other => panic!("expected Duplicate, got {other:?}"),
    }
    // The old message itself is still there.
    assert!(store.message(&old_id).await.unwrap().is_some());
}

async fn too_many_recipients_writes_nothing(store: Arc<dyn Store>) {
    for d in ["d1", "d2", "d3"] {
        device(&store, d, "alice").await;
        store.subscribe(d, "t").await.unwrap();
    }
    for target in [Target::User("alice".into()), Target::Topic("t".into())] {
        let mut m = new_msg(target, T0);
        m.max_recipients = 2;
        m.idempotency_key = Some("k".into());
        let id = m.id.clone();
        let err = store.publish(m).await.unwrap_err();
        assert!(matches!(err, StoreError::TooManyRecipients(3)), "{err:?}");
        assert!(store.message(&id).await.unwrap().is_none());
    }
    for d in ["d1", "d2", "d3"] {
        assert_eq!(store.device(d).await.unwrap().unwrap().last_seq, 0);
    }
    // The rejected idempotency key was not consumed.
    let mut m = new_msg(Target::User("alice".into()), T0);
    m.idempotency_key = Some("k".into());
    assert_eq!(publish_ok(&store, m).await.len(), 3);
}

/// A publish to many devices (more than one multi-row insert's worth, and a rest):
/// every recipient, and only a recipient, gets one entry at its own next seq.
async fn large_user_and_topic_publishes_give_each_recipient_its_next_seq(store: Arc<dyn Store>) {
    const N: usize = 150;
    let ids: Vec<String> = (0..N).map(|i| format!("crowd-{i:03}")).collect();
    for (i, d) in ids.iter().enumerate() {
        device(&store, d, "crowd").await;
        // Every third device is not subscribed; every fifth has an entry already.
        if i % 3 != 0 {
            store.subscribe(d, "news").await.unwrap();
        }
        if i % 5 == 0 {
            publish_ok(&store, new_msg(to_device(d), T0)).await;
        }
    }
    device(&store, "bystander", "someone-else").await;
    let before = |i: usize| i64::from(i.is_multiple_of(5));

    let topic = new_msg(Target::Topic("news".into()), T0 + 1);
    let topic_id = topic.id.clone();
    let entries = publish_ok(&store, topic).await;
    assert_eq!(entries.len(), (0..N).filter(|i| i % 3 != 0).count());
    let user = new_msg(Target::User("crowd".into()), T0 + 2);
    let user_id = user.id.clone();
    assert_eq!(publish_ok(&store, user).await.len(), N);

    for (i, d) in ids.iter().enumerate() {
        let got = store.fetch_after(d, 0, 10, T0 + 3).await.unwrap();
        let mut want = Vec::new();
        if i % 3 != 0 {
            want.push((before(i) + 1, topic_id.clone()));
        }
        want.push((before(i) + want.len() as i64 + 1, user_id.clone()));
        let got: Vec<(i64, String)> = got
            .iter()
            .filter(|e| e.message.created_at > T0)
            .map(|e| (e.seq, e.message.id.clone()))
            .collect();
        assert_eq!(got, want, "{d}");
        assert_eq!(
            store.device(d).await.unwrap().unwrap().last_seq,
            want.last().unwrap().0
        );
    }
    assert_eq!(
        store.device("bystander").await.unwrap().unwrap().last_seq,
        0
    );
}

async fn unknown_device_is_not_found_and_writes_nothing(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    let mut m = new_msg(to_device("ghost"), T0);
    m.idempotency_key = Some("k".into());
    let id = m.id.clone();
    let err = store.publish(m).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    assert!(store.message(&id).await.unwrap().is_none());
    assert!(store.device("ghost").await.unwrap().is_none());
    // The store is still healthy and the key still free.
    let mut m = new_msg(to_device("d1"), T0);
    m.idempotency_key = Some("k".into());
    assert_eq!(publish_ok(&store, m).await[0].seq, 1);
}

async fn batch_publish_answers_each_item_in_order(store: Arc<dyn Store>) {
    for d in ["d1", "d2"] {
        device(&store, d, "alice").await;
    }
    let ok1 = new_msg(to_device("d1"), T0);
    let ghost = new_msg(to_device("ghost"), T0);
    let mut keyed = new_msg(Target::User("alice".into()), T0);
    keyed.idempotency_key = Some("k".into());
    let mut too_many = new_msg(Target::User("alice".into()), T0);
    too_many.max_recipients = 1;
    let mut same_key = new_msg(to_device("d1"), T0);
    same_key.idempotency_key = Some("k".into());
    let ok2 = new_msg(to_device("d1"), T0);
    let ids: Vec<String> = [&ok1, &ghost, &keyed, &too_many, &same_key, &ok2]
        .iter()
        .map(|m| m.id.clone())
        .collect();
    let results = store
        .publish_batch(vec![ok1, ghost, keyed, too_many, same_key, ok2])
        .await
        .expect("batch commits");
    assert_eq!(results.len(), 6);
    let mut results = results.into_iter();
    let seqs = |r: Option<Result<PublishOutcome, StoreError>>| {
        created(r.unwrap().unwrap())
            .iter()
            .map(|e| (e.device_id.clone(), e.seq))
            .collect::<Vec<_>>()
    };
    assert_eq!(seqs(results.next()), [("d1".to_string(), 1)]);
    let err = results.next().unwrap().unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    assert_eq!(
        seqs(results.next()),
        [("d1".to_string(), 2), ("d2".to_string(), 1)]
    );
    let err = results.next().unwrap().unwrap_err();
    assert!(matches!(err, StoreError::TooManyRecipients(2)), "{err:?}");
    // The key was taken by an earlier item of the same batch.
    match results.next().unwrap().unwrap() {
        PublishOutcome::Duplicate {
            message_id,
            recipients,
        } => assert_eq!((message_id.as_str(), recipients), (ids[2].as_str(), 2)),
        other => panic!("expected Duplicate, got {other:?}"),
    }
    assert_eq!(seqs(results.next()), [("d1".to_string(), 3)]);
    // Refused items wrote nothing.
    for i in [1, 3, 4] {
        assert!(store.message(&ids[i]).await.unwrap().is_none(), "item {i}");
    }
    let inbox = store.fetch_after("d1", 0, 100, T0).await.unwrap();
    assert_eq!(
        inbox
            .iter()
            .map(|e| e.message.id.as_str())
            .collect::<Vec<_>>(),
        [ids[0].as_str(), ids[2].as_str(), ids[5].as_str()]
    );
    assert_eq!(store.device("d2").await.unwrap().unwrap().last_seq, 1);
}

async fn publish_schedules_push_by_policy(store: Arc<dyn Store>) {
    device(&store, "on", "alice").await;
    device(&store, "off", "alice").await;
    // Whether a device looks live does not enter the store: every entry of a message
    // gets the same due time, from its policy alone.
    let cases = [
        (PushPolicy::Fallback, Some(T0 + ACK)),
        (PushPolicy::Always, Some(T0)),
        (PushPolicy::Never, None),
    ];
    for (policy, due) in cases {
        let mut m = new_msg(Target::User("alice".into()), T0);
        set_push(&mut m, policy);
        assert_eq!(m.push_due_at, due);
        let id = m.id.clone();
        let e = publish_ok(&store, m).await;
        let pending: Vec<(&str, bool)> = e
            .iter()
            .map(|e| (e.device_id.as_str(), e.push_pending))
            .collect();
        let p = due.is_some();
        assert_eq!(pending, [("off", p), ("on", p)], "{policy:?}");
        assert!(e.iter().all(|e| e.push_attempts == 0));
        let (_, rows) = store.message(&id).await.unwrap().unwrap();
        let states: Vec<Option<&str>> = rows.iter().map(|r| r.push_state.as_deref()).collect();
        let want = p.then_some("pending");
        assert_eq!(states, [want, want], "{policy:?}");
        // Due exactly at its due time, not a millisecond before.
        if let Some(due) = due {
            assert!(store
                .take_due_pushes(due - 1, due + DAY, 10)
                .await
                .unwrap()
                .is_empty());
            let taken = store.take_due_pushes(due, due + 10, 10).await.unwrap();
            assert_eq!(taken.len(), 2, "{policy:?}");
            assert!(taken.iter().all(|t| t.message.id == id && t.push_pending));
        }
    }
}

async fn claim_push_only_once(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    let e = one_entry(&store, "d1", PushPolicy::Fallback, T0).await;
    assert!(e.push_pending);
    assert!(store.claim_push("d1", e.seq, T0 + 1).await.unwrap());
    assert!(!store.claim_push("d1", e.seq, T0 + 2).await.unwrap());
    // Never pending: nothing to claim.
    let n = one_entry(&store, "d1", PushPolicy::Never, T0).await;
    assert!(!store.claim_push("d1", n.seq, T0 + 1).await.unwrap());
    assert!(!store.claim_push("d1", 999, T0 + 1).await.unwrap());
}

async fn concurrent_claims_push_once(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    let mut seqs = Vec::new();
    for _ in 0..10 {
        seqs.push(one_entry(&store, "d1", PushPolicy::Always, T0).await.seq);
    }
    for seq in seqs {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store.claim_push("d1", seq, T0 + 5).await.unwrap()
            }));
        }
        let mut wins = 0;
        for t in tasks {
            wins += t.await.unwrap() as usize;
        }
        assert_eq!(wins, 1, "seq {seq}");
    }
}

async fn no_claim_after_ack_or_expiry(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    let a = one_entry(&store, "d1", PushPolicy::Fallback, T0).await;
    store.ack("d1", a.seq, T0 + 1, false).await.unwrap();
    assert!(!store.claim_push("d1", a.seq, T0 + 2).await.unwrap());

    let b = one_entry(&store, "d1", PushPolicy::Fallback, T0).await;
    assert!(!store.claim_push("d1", b.seq, T0 + DAY).await.unwrap());
    assert!(store.claim_push("d1", b.seq, T0 + DAY - 1).await.unwrap());

    // Acked or expired entries are not due either.
    assert!(store
        .take_due_pushes(T0 + 10_000, T0 + 10_001, 100)
        .await
        .unwrap()
        .iter()
        .all(|e| e.seq != a.seq));
    assert!(store
        .take_due_pushes(T0 + DAY, T0 + DAY + 1, 100)
        .await
        .unwrap()
        .is_empty());
}

async fn retry_push_is_due_later_with_attempts(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    let e = one_entry(&store, "d1", PushPolicy::Fallback, T0).await;
    assert!(store
        .take_due_pushes(T0 + ACK - 1, T0 + DAY, 10)
        .await
        .unwrap()
        .is_empty());
    let due = store
        .take_due_pushes(T0 + ACK, T0 + ACK + 1, 10)
        .await
        .unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].seq, due[0].push_attempts), (e.seq, 0));
    assert!(due[0].push_pending);
    assert_eq!(due[0].message.id, e.message.id);

    assert!(store.claim_push("d1", e.seq, T0 + 6000).await.unwrap());
    // Claimed: not due, whatever its lease said.
    assert!(store
        .take_due_pushes(T0 + 7000, T0 + 7001, 10)
        .await
        .unwrap()
        .is_empty());
    store
        .retry_push("d1", e.seq, T0 + 20_000, "429 Too Many Requests")
        .await
        .unwrap();
    assert!(store
        .take_due_pushes(T0 + 19_999, T0 + 19_999, 10)
        .await
        .unwrap()
        .is_empty());
    let due = store
        .take_due_pushes(T0 + 20_000, T0 + 20_000, 10)
        .await
        .unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].push_attempts, 1);

    assert!(store.claim_push("d1", e.seq, T0 + 20_000).await.unwrap());
    store
        .retry_push("d1", e.seq, T0 + 30_000, "503")
        .await
        .unwrap();
    // retry_push only acts on a claimed push.
    store
        .retry_push("d1", e.seq, T0 + 90_000, "ignored")
        .await
        .unwrap();
    let due = store
        .take_due_pushes(T0 + 30_000, T0 + 30_000, 10)
        .await
        .unwrap();
    assert_eq!(due[0].push_attempts, 2);
    let (_, rows) = store.message(&e.message.id).await.unwrap().unwrap();
    assert_eq!(rows[0].reason.as_deref(), Some("503"));

    // Oldest first, limit honoured.
    let f = one_entry(&store, "d1", PushPolicy::Always, T0 - 10).await;
    let due = store
        .take_due_pushes(T0 + 40_000, T0 + 40_000, 10)
        .await
        .unwrap();
    assert_eq!(
        due.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [f.seq, e.seq]
    );
    assert_eq!(
        store
            .take_due_pushes(T0 + 40_000, T0 + 40_000, 1)
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn orphaned_claim_fails_and_is_never_resent(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    let e = one_entry(&store, "d1", PushPolicy::Fallback, T0).await;
    let t1 = T0 + 1000;
    assert!(store.claim_push("d1", e.seq, t1).await.unwrap());
    // The sender died mid-request. Its claim is never claimable or due again...
    assert!(!store.claim_push("d1", e.seq, t1 + DAY / 2).await.unwrap());
    assert!(store
        .take_due_pushes(t1 + ACK, t1 + ACK, 10)
        .await
        .unwrap()
        .is_empty());
    // ...not settled while it may still be in flight...
    assert_eq!(store.fail_orphaned_pushes(t1, t1 + 10).await.unwrap(), 0);
    // ...and once stale, recorded as failed with an unknown outcome, exactly once.
    assert_eq!(
        store.fail_orphaned_pushes(t1 + 1, t1 + 20).await.unwrap(),
        1
    );
    assert_eq!(
        store.fail_orphaned_pushes(t1 + 1, t1 + 30).await.unwrap(),
        0
    );
    let (_, rows) = store.message(&e.message.id).await.unwrap().unwrap();
    let w = rows[0].to_wire(t1 + 40);
    assert_eq!(w.state, DeliveryState::PushFailed);
    assert_eq!(
        w.reason.as_deref(),
        Some(herald_gateway::store::ORPHANED_PUSH_REASON)
    );
    assert!(!store.claim_push("d1", e.seq, t1 + 50).await.unwrap());
    assert!(store
        .take_due_pushes(t1 + ACK, t1 + ACK, 10)
        .await
        .unwrap()
        .is_empty());
}

/// `push: "always"` pushes as well as delivering live: an ack, however early, cancels
/// neither the first attempt nor a retry (it does cancel `fallback` pushes, above).
async fn ack_leaves_always_pushes_due(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    // Acked before any worker claimed it (a device faster than the push queue).
    let first = one_entry(&store, "d1", PushPolicy::Always, T0).await;
    // Acked while waiting for a retry.
    let retried = one_entry(&store, "d1", PushPolicy::Always, T0).await;
    assert!(store.claim_push("d1", retried.seq, T0 + 1).await.unwrap());
    store
        .retry_push("d1", retried.seq, T0 + 2, "503")
        .await
        .unwrap();
    store.ack("d1", retried.seq, T0 + 3, false).await.unwrap();
    assert_eq!(
        delivery_state(&store, &first.message.id, "d1", T0 + 4).await,
        DeliveryState::Acked
    );
    let due = store
        .take_due_pushes(T0 + DAY - 1, T0 + DAY, 10)
        .await
        .unwrap();
    let mut seqs: Vec<i64> = due.iter().map(|e| e.seq).collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        [first.seq, retried.seq],
        "both still due after the ack"
    );
    assert!(store.claim_push("d1", first.seq, T0 + 5).await.unwrap());
    assert!(store.claim_push("d1", retried.seq, T0 + 5).await.unwrap());
    // Claimed once only, as every push.
    assert!(!store.claim_push("d1", first.seq, T0 + 6).await.unwrap());
}

async fn ack_cancels_scheduled_pushes(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    let acked = one_entry(&store, "d1", PushPolicy::Fallback, T0).await;
    let sending = one_entry(&store, "d1", PushPolicy::Fallback, T0).await;
    let retried = one_entry(&store, "d1", PushPolicy::Fallback, T0).await;
    let later = one_entry(&store, "d1", PushPolicy::Fallback, T0).await;
    assert!(store.claim_push("d1", sending.seq, T0 + 1).await.unwrap());
    assert!(store.claim_push("d1", retried.seq, T0 + 1).await.unwrap());
    store
        .retry_push("d1", retried.seq, T0 + 2, "503")
        .await
        .unwrap();
    // Acked before the due time: the scheduled pushes are gone (not due, not
    // claimable); the one a worker is sending keeps its claim.
    store.ack("d1", retried.seq, T0 + 3, false).await.unwrap();
    let due = store
        .take_due_pushes(T0 + DAY - 1, T0 + DAY, 10)
        .await
        .unwrap();
    assert_eq!(due.iter().map(|e| e.seq).collect::<Vec<_>>(), [later.seq]);
    assert!(!store.claim_push("d1", acked.seq, T0 + 4).await.unwrap());
    assert!(!store.claim_push("d1", retried.seq, T0 + 4).await.unwrap());
    let (_, rows) = store.message(&acked.message.id).await.unwrap().unwrap();
    assert_eq!(rows[0].push_state, None);
    assert_eq!(rows[0].to_wire(T0 + 5).state, DeliveryState::Acked);
    let (_, rows) = store.message(&sending.message.id).await.unwrap().unwrap();
    assert_eq!(rows[0].push_state.as_deref(), Some("sending"));
    store
        .finish_push(
            "d1",
            sending.seq,
            PushMark::Pushed,
            Some("fcm"),
            None,
            T0 + 6,
        )
        .await
        .unwrap();
    // The state is what was observed: acked wins, the push stays on record.
    let (_, rows) = store.message(&sending.message.id).await.unwrap().unwrap();
    assert_eq!(rows[0].push_state.as_deref(), Some("pushed"));
    assert_eq!(rows[0].to_wire(T0 + 7).state, DeliveryState::Acked);
}

async fn taking_due_pushes_leases_them(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    let e = one_entry(&store, "d1", PushPolicy::Fallback, T0).await;
    let t = T0 + ACK;
    assert_eq!(
        store.take_due_pushes(t, t + ACK, 10).await.unwrap().len(),
        1
    );
    // Taken: nobody else finds it until the lease ends...
    assert!(store
        .take_due_pushes(t + ACK - 1, t + 2 * ACK, 10)
        .await
        .unwrap()
        .is_empty());
    // ...then it is due again (its finder died, or a session took it and did not ack).
    let again = store
        .take_due_pushes(t + ACK, t + 2 * ACK, 10)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].seq, again[0].push_attempts), (e.seq, 0));
    // Taking is not claiming: the claim still decides who sends it.
    assert!(store.claim_push("d1", e.seq, t + ACK + 1).await.unwrap());
    assert!(!store.claim_push("d1", e.seq, t + ACK + 2).await.unwrap());
}

async fn concurrent_takes_are_disjoint(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    let mut seqs = Vec::new();
    for _ in 0..60 {
        seqs.push(one_entry(&store, "d1", PushPolicy::Fallback, T0).await.seq);
    }
    // Four "nodes" poll at once, each taking at most 20.
    let t = T0 + ACK;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.take_due_pushes(t, t + ACK, 20).await.unwrap()
        }));
    }
    let mut taken = Vec::new();
    for task in tasks {
        taken.extend(task.await.unwrap().into_iter().map(|e| e.seq));
    }
    let n = taken.len();
    taken.sort();
    taken.dedup();
    assert_eq!(taken.len(), n, "an entry was taken twice");
    // What nobody took is still due.
    let rest = store.take_due_pushes(t, t + ACK, 100).await.unwrap();
    assert_eq!(n + rest.len(), seqs.len());
}

async fn concurrent_batch_claims_push_once(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    let mut items = Vec::new();
    for _ in 0..40 {
        let e = one_entry(&store, "d1", PushPolicy::Fallback, T0).await;
        items.push(("d1".to_string(), e.seq));
    }
    // Four "nodes" claim overlapping batches at once, in different orders.
    let mut tasks = Vec::new();
    for n in 0..4usize {
        let store = store.clone();
        let mut mine = items.clone();
        mine.rotate_left(n * 10);
        if n % 2 == 1 {
            mine.reverse();
        }
        tasks.push(tokio::spawn(async move {
            let won = store.claim_pushes(&mine, T0 + 5).await.unwrap();
            mine.into_iter()
                .zip(won)
                .filter(|(_, w)| *w)
                .map(|(i, _)| i)
                .collect::<Vec<_>>()
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        winners.extend(t.await.unwrap());
    }
    winners.sort();
    let mut expected = items.clone();
    expected.sort();
    assert_eq!(winners, expected, "every push claimed exactly once");
}

async fn finish_push_shows_in_delivery_state(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    let ok = one_entry(&store, "d1", PushPolicy::Fallback, T0).await;
    assert!(store.claim_push("d1", ok.seq, T0 + 1).await.unwrap());
    store
        .finish_push("d1", ok.seq, PushMark::Pushed, Some("apns"), None, T0 + 2)
        .await
        .unwrap();
    let (_, rows) = store.message(&ok.message.id).await.unwrap().unwrap();
    let w = rows[0].to_wire(T0 + 3);
    assert_eq!(w.state, DeliveryState::Pushed);
    assert_eq!(w.push_provider.as_deref(), Some("apns"));
    assert!(w.pushed_at.is_some());
    assert!(!store.claim_push("d1", ok.seq, T0 + 4).await.unwrap());
    assert!(store
        .take_due_pushes(T0 + DAY - 1, T0 + DAY, 10)
        .await
        .unwrap()
        .is_empty());

    let bad = one_entry(&store, "d1", PushPolicy::Fallback, T0).await;
    assert!(store.claim_push("d1", bad.seq, T0 + 1).await.unwrap());
    store
        .finish_push(
            "d1",
            bad.seq,
            PushMark::Failed,
            Some("fcm"),
            Some("UNREGISTERED"),
            T0 + 2,
        )
        .await
        .unwrap();
    let (_, rows) = store.message(&bad.message.id).await.unwrap().unwrap();
    let w = rows[0].to_wire(T0 + 3);
    assert_eq!(w.state, DeliveryState::PushFailed);
    assert_eq!(w.reason.as_deref(), Some("UNREGISTERED"));

    // A late ack wins over the push outcome.
    store.ack("d1", bad.seq, T0 + 5, false).await.unwrap();
    assert_eq!(
        delivery_state(&store, &bad.message.id, "d1", T0 + 6).await,
        DeliveryState::Acked
    );
}

async fn delete_device_removes_inbox(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    device(&store, "d2", "alice").await;
    store.subscribe("d1", "t").await.unwrap();
    let m = new_msg(Target::User("alice".into()), T0);
    let id = m.id.clone();
    publish_ok(&store, m).await;
    one_entry(&store, "d1", PushPolicy::Always, T0).await;

    assert!(store.delete_device("d1").await.unwrap());
    assert!(!store.delete_device("d1").await.unwrap());
    assert!(store.device("d1").await.unwrap().is_none());
    assert!(store
        .fetch_after("d1", 0, 100, T0)
        .await
        .unwrap()
        .is_empty());
    assert!(store.device_topics("d1").await.unwrap().is_empty());
    assert!(store
        .take_due_pushes(T0 + 1000, T0 + 1000, 10)
        .await
        .unwrap()
        .is_empty());
    let (_, rows) = store.message(&id).await.unwrap().unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r.device_id.as_str())
            .collect::<Vec<_>>(),
        ["d2"]
    );
    // Topic fan-out no longer reaches it; re-claiming starts a fresh inbox.
    assert!(publish_ok(&store, new_msg(Target::Topic("t".into()), T0))
        .await
        .is_empty());
    let d = store.claim_device("d1", "bob", T0, CAP).await.unwrap();
    assert_eq!((d.user_id.as_str(), d.last_seq), ("bob", 0));
}

async fn sweep_deletes_old_entries(store: Arc<dyn Store>) {
    device(&store, "d1", "alice").await;
    let mut short = new_msg(to_device("d1"), T0);
    short.expires_at = T0 + 1000;
    let short_id = short.id.clone();
    publish_ok(&store, short).await;
    let long = new_msg(to_device("d1"), T0);
    let long_id = long.id.clone();
    publish_ok(&store, long).await;

    // Expired but within retention: kept for status queries.
    assert_eq!(store.sweep(T0 + 2000, 5000).await.unwrap(), 0);
    assert!(store.message(&short_id).await.unwrap().is_some());
    assert_eq!(store.sweep(T0 + 7000, 5000).await.unwrap(), 1);
    assert!(store.message(&short_id).await.unwrap().is_none());
    let (_, rows) = store.message(&long_id).await.unwrap().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        store
            .fetch_after("d1", 0, 10, T0 + 7000)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>(),
        [2]
    );
    // Seqs keep increasing after a sweep.
    assert_eq!(one_entry(&store, "d1", PushPolicy::Never, T0).await.seq, 3);
}

async fn message_status_rows(store: Arc<dyn Store>) {
    for d in ["a", "b", "c", "d"] {
        device(&store, d, "alice").await;
    }
    let mut m = new_msg(Target::User("alice".into()), T0);
    set_push(&mut m, PushPolicy::Fallback);
    let id = m.id.clone();
    let e = publish_ok(&store, m).await;
    assert_eq!(e.len(), 4);
    store
        .mark_sent(&[("a".into(), 1, 1), ("b".into(), 1, 5)], T0 + 10)
        .await
        .unwrap();
    // A second mark does not move sent_at.
    store
        .mark_sent(&[("a".into(), 1, 1)], T0 + 20)
        .await
        .unwrap();
    store.mark_sent(&[], T0 + 20).await.unwrap();
    store.ack("a", 1, T0 + 30, false).await.unwrap();
    assert!(store.claim_push("c", 1, T0 + 40).await.unwrap());
    store
        .finish_push("c", 1, PushMark::Pushed, Some("fcm"), None, T0 + 50)
        .await
        .unwrap();

    let (msg, rows) = store.message(&id).await.unwrap().unwrap();
    assert_eq!(msg.id, id);
    let now = T0 + 60;
    let wire: Vec<_> = rows.iter().map(|r| r.to_wire(now)).collect();
    assert_eq!(
        wire.iter()
            .map(|w| (w.device_id.as_str(), w.state))
            .collect::<Vec<_>>(),
        [
            ("a", DeliveryState::Acked),
            ("b", DeliveryState::Sent),
            ("c", DeliveryState::Pushed),
            ("d", DeliveryState::Queued),
        ]
    );
    assert_eq!(rows[0].sent_at, Some(T0 + 10));
    assert_eq!(rows[0].acked_at, Some(T0 + 30));
    assert_eq!(rows[1].sent_at, Some(T0 + 10));
    assert_eq!(rows[2].push_at, Some(T0 + 50));
    assert_eq!(rows[2].push_provider.as_deref(), Some("fcm"));
    assert_eq!(rows[3].push_state.as_deref(), Some("pending"));
    assert_eq!(rows[3].to_wire(T0 + DAY).state, DeliveryState::Expired);
    assert!(store.message("missing").await.unwrap().is_none());
}

/// An ack from the session that wrote the entries (`wrote_live`) records them as sent
/// when no sent mark has yet, so that mark need not be written; an earlier mark keeps
/// its time; an ack from anywhere else (HTTP, a resume cursor) records nothing as sent.
async fn ack_from_the_writing_session_records_sent(store: Arc<dyn Store>) {
    for d in ["live", "marked", "http"] {
        device(&store, d, "alice").await;
    }
    let mut ids = Vec::new();
    for i in 0..3 {
        let m = new_msg(Target::User("alice".into()), T0 + i);
        ids.push(m.id.clone());
        publish_ok(&store, m).await;
    }
    store
        .mark_sent(&[("marked".into(), 1, 1)], T0 + 10)
        .await
        .unwrap();
    // seqs 1 and 2 of each device; seq 3 is neither acked nor marked.
    assert_eq!(store.ack("live", 2, T0 + 30, true).await.unwrap(), 2);
    assert_eq!(store.ack("marked", 2, T0 + 30, true).await.unwrap(), 2);
    assert_eq!(store.ack("http", 2, T0 + 30, false).await.unwrap(), 2);
    // A repeated live ack changes nothing.
    assert_eq!(store.ack("live", 2, T0 + 40, true).await.unwrap(), 2);

    let sent = |rows: &[herald_gateway::store::DeliveryRow], d: &str| {
        let r = rows.iter().find(|r| r.device_id == d).unwrap();
        (r.sent_at, r.acked_at)
    };
    let (_, first) = store.message(&ids[0]).await.unwrap().unwrap();
    assert_eq!(sent(&first, "live"), (Some(T0 + 30), Some(T0 + 30)));
    assert_eq!(sent(&first, "marked"), (Some(T0 + 10), Some(T0 + 30)));
    assert_eq!(sent(&first, "http"), (None, Some(T0 + 30)));
    let (_, second) = store.message(&ids[1]).await.unwrap().unwrap();
    assert_eq!(sent(&second, "live"), (Some(T0 + 30), Some(T0 + 30)));
    assert_eq!(sent(&second, "marked"), (Some(T0 + 30), Some(T0 + 30)));
    let (_, third) = store.message(&ids[2]).await.unwrap().unwrap();
    assert!(third
        .iter()
        .all(|r| r.sent_at.is_none() && r.acked_at.is_none()));
}

/// Many writes at once (so they share commit groups), some of them refused: the
/// refused ones get their own error and write nothing, every other one is committed,
/// and the seqs stay gap-free.
async fn concurrent_writes_with_refused_items_commit_the_others(store: Arc<dyn Store>) {
    for d in ["d1", "d2", "d3"] {
        device(&store, d, "alice").await;
    }
    let mut tasks = Vec::new();
    for i in 0..60 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut m = match i % 20 {
                7 => new_msg(to_device("ghost"), T0),
                13 => {
                    let mut m = new_msg(Target::User("alice".into()), T0);
                    m.max_recipients = 2;
                    m
                }
                _ => new_msg(to_device(["d1", "d2", "d3"][i % 3]), T0),
            };
            if i % 20 == 7 {
                m.idempotency_key = Some(format!("k{i}"));
            }
            let id = m.id.clone();
            (i, id, store.publish(m).await)
        }));
    }
    // Acks of an unknown device in the middle of it.
    let ghost_ack = {
        let store = store.clone();
        tokio::spawn(async move { store.ack("ghost", 1, T0, false).await })
    };
    let mut per_device: std::collections::HashMap<String, Vec<i64>> = Default::default();
    for t in tasks {
        let (i, id, result) = t.await.unwrap();
        match i % 20 {
            7 => {
                let err = result.unwrap_err();
                assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
                assert!(store.message(&id).await.unwrap().is_none());
            }
            13 => {
                let err = result.unwrap_err();
                assert!(matches!(err, StoreError::TooManyRecipients(3)), "{err:?}");
                assert!(store.message(&id).await.unwrap().is_none());
            }
            _ => {
                for e in created(result.unwrap()) {
                    per_device.entry(e.device_id).or_default().push(e.seq);
                }
                assert!(store.message(&id).await.unwrap().is_some());
            }
        }
    }
    let err = ghost_ack.await.unwrap().unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    for (d, mut seqs) in per_device {
        seqs.sort_unstable();
        let n = seqs.len() as i64;
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "{d}");
        assert_eq!(store.device(&d).await.unwrap().unwrap().last_seq, n, "{d}");
    }
    // The refused idempotency keys were not consumed.
    for i in [7, 27, 47] {
        let mut m = new_msg(to_device("d1"), T0);
        m.idempotency_key = Some(format!("k{i}"));
        assert_eq!(publish_ok(&store, m).await.len(), 1);
    }
}

/// A fan-out's acks arrive at once, one per device, and share commit groups (PostgreSQL
/// writes a group's acks with one statement per step): each must still ack exactly its
/// own device's entries, cancel their fallback pushes, record `sent` only for a live
/// ack, and answer its own acked seq; an unknown device or a second ack of a device in
/// the same group must not disturb the others.
async fn concurrent_acks_of_many_devices_each_ack_their_own(store: Arc<dyn Store>) {
    const N: usize = 150;
    let ids: Vec<String> = (0..N).map(|i| format!("a{i:03}")).collect();
    for d in &ids {
        device(&store, d, "fleet").await;
    }
    let mut msgs = Vec::new();
    for i in 0..3 {
        let mut m = new_msg(Target::User("fleet".into()), T0 + i);
        m.max_recipients = N;
        set_push(&mut m, PushPolicy::Fallback);
        msgs.push(m.id.clone());
        assert_eq!(publish_ok(&store, m).await.len(), N);
    }
    // Device i acks seq i % 4 (0 acks nothing; 3 is the last); every tenth device
    // (i % 10 == 5) acks a second time, seq 3, at once; even devices ack live.
    let expected = |i: usize| if i % 10 == 5 { 3 } else { (i % 4) as i64 };
    let now = |i: usize| T0 + 100 + i as i64;
    let mut tasks = Vec::new();
    for (i, d) in ids.iter().enumerate() {
        let mut acks = vec![(i % 4) as i64];
        if i % 10 == 5 {
            acks.push(3);
        }
        for seq in acks {
            let (store, d) = (store.clone(), d.clone());
            tasks.push(tokio::spawn(async move {
                let r = store.ack(&d, seq, now(i), i % 2 == 0).await;
                (i, seq, r)
            }));
        }
        if i % 15 == 0 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                (
                    usize::MAX,
                    1,
                    store.ack(&format!("ghost{i}"), 1, T0, true).await,
                )
            }));
        }
    }
    for t in tasks {
        let (i, seq, r) = t.await.unwrap();
        if i == usize::MAX {
            assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");
            continue;
        }
        let acked = r.expect("ack");
        // Its own ack is in, and nothing past what the device's acks asked for.
        assert!(
            acked >= seq && acked <= expected(i),
            "{i}: ack {seq} → {acked}"
        );
    }
    for (i, d) in ids.iter().enumerate() {
        let dev = store.device(d).await.unwrap().unwrap();
        assert_eq!((dev.acked_seq, dev.last_seq), (expected(i), 3), "{d}");
    }
    for (j, id) in msgs.iter().enumerate() {
        let seq = j as i64 + 1;
        let (_, rows) = store.message(id).await.unwrap().unwrap();
        assert_eq!(rows.len(), N);
        for r in rows {
            let i: usize = r.device_id[1..].parse().unwrap();
            let acked = seq <= expected(i);
            let at = acked.then(|| now(i));
            assert_eq!(r.acked_at, at, "{} seq {seq}", r.device_id);
            assert_eq!(
                r.sent_at,
                at.filter(|_| i.is_multiple_of(2)),
                "{} seq {seq}",
                r.device_id
            );
            let push = (!acked).then(|| "pending".to_owned());
            assert_eq!(r.push_state, push, "{} seq {seq}", r.device_id);
        }
    }
    // Only the unacked entries are still due for a push (the last was due at T0 + 2 + ACK).
    let t = T0 + 2 + ACK;
    let mut due: Vec<(String, i64)> = store
        .take_due_pushes(t, t + ACK, 1_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.device_id, e.seq))
        .collect();
    due.sort();
    let mut want: Vec<(String, i64)> = ids
        .iter()
        .enumerate()
        .flat_map(|(i, d)| (expected(i) + 1..=3).map(move |s| (d.clone(), s)))
        .collect();
    want.sort();
    assert_eq!(due, want);
}

/// Two gateway nodes on one PostgreSQL database: two stores, each with its own group
/// commit, written to at once.
mod two_nodes {
    use super::*;

    async fn with_two_stores<F, Fut>(test: F)
    where
        F: FnOnce(Arc<dyn Store>, Arc<dyn Store>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let db = common::pg::PgDb::create().await;
        let opened = async {
            let a = PostgresStore::open(&db.url).await?;
            let b = PostgresStore::open(&db.url).await?;
            Ok::<_, StoreError>((a, b))
        }
        .await;
        let (a, b) = match opened {
            Ok(s) => s,
            Err(e) => {
                db.drop_db().await;
                panic!("open postgres stores: {e}");
            }
        };
        let result = tokio::spawn(test(Arc::new(a), Arc::new(b))).await;
        db.drop_db().await;
        if let Err(e) = result {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
            panic!("test task: {e}");
        }
    }

    /// New devices of one user claimed on both nodes at once: the per-user lock makes
    /// the cap hold across nodes (each node's count alone misses the other's claims).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn claims_on_two_nodes_stop_at_the_user_device_cap() {
        with_two_stores(|a, b| async move {
            let nodes = [a, b];
            for round in 0..5 {
                let user = format!("u{round}");
                let tasks: Vec<_> = (0..30)
                    .map(|i| {
                        let (store, user) = (nodes[i % 2].clone(), user.clone());
                        tokio::spawn(async move {
                            store
                                .claim_device(&format!("{user}-{i}"), &user, T0, 4)
                                .await
                        })
                    })
                    .collect();
                let admitted = admitted_claims(tasks).await;
                let stored = nodes[0].user_devices(&user).await.unwrap().len();
                assert_eq!((admitted, stored), (4, 4), "round {round}");
            }
        })
        .await;
    }

    const DEVICES: usize = 8;

    /// Publishers on both nodes (single publishes, fan-outs and batches) and, at the
    /// same time, each device's acks and sent marks alternating between the nodes.
    /// Every device's seqs come out 1..=n without gaps or repeats, each seq is the
    /// entry the publisher was told, every ack only moves forward and never beyond
    /// what was assigned, and the final acks land on every entry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_publishes_and_acks_on_two_nodes_are_gapless() {
        with_two_stores(|a, b| async move {
            let nodes = [a, b];
            for d in 0..DEVICES {
                let user = if d < DEVICES / 2 { "alice" } else { "bob" };
                device(&nodes[d % 2], &format!("d{d}"), user).await;
            }
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut publishers = Vec::new();
            for p in 0..24usize {
                let store = nodes[p % 2].clone();
                publishers.push(tokio::spawn(async move {
                    let mut got: Vec<(String, i64, String)> = Vec::new();
                    for k in 0..15usize {
                        let msgs: Vec<NewMessage> = match (p + k) % 5 {
                            0 => vec![new_msg(
                                Target::User(if k % 2 == 0 { "alice" } else { "bob" }.into()),
                                T0,
                            )],
                            1 => (0..3)
                                .map(|j| {
                                    new_msg(to_device(&format!("d{}", (p + k + j) % DEVICES)), T0)
                                })
                                .collect(),
                            _ => vec![new_msg(
                                to_device(&format!("d{}", (p * 3 + k) % DEVICES)),
                                T0,
                            )],
                        };
                        let ids: Vec<String> = msgs.iter().map(|m| m.id.clone()).collect();
                        let outcomes = if msgs.len() == 1 {
                            vec![store.publish(msgs.into_iter().next().unwrap()).await]
                        } else {
                            store.publish_batch(msgs).await.expect("batch commits")
                        };
                        for (id, outcome) in ids.into_iter().zip(outcomes) {
                            for e in created(outcome.expect("publish")) {
                                assert_eq!(e.message.id, id);
                                got.push((e.device_id, e.seq, id.clone()));
                            }
                        }
                    }
                    got
                }));
            }
            let mut ackers = Vec::new();
            for d in 0..DEVICES {
                let nodes = nodes.clone();
                let done = done.clone();
                ackers.push(tokio::spawn(async move {
                    let id = format!("d{d}");
                    let (mut acked, mut marked) = (0, 0);
                    let mut turn = d;
                    loop {
                        let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                        let store = &nodes[turn % 2];
                        turn += 1;
                        let last = store.device(&id).await.unwrap().unwrap().last_seq;
                        if last > marked {
                            store
                                .mark_sent(&[(id.clone(), marked + 1, last)], T0 + 1)
                                .await
                                .unwrap();
                            marked = last;
                        }
                        // Sometimes beyond what exists: clamped, never past last_seq.
                        let want = if turn % 3 == 0 { last + 5 } else { last };
                        let now = store.ack(&id, want, T0 + 2, false).await.unwrap();
                        assert!(now >= acked, "{id}: ack went back from {acked} to {now}");
                        let after = store.device(&id).await.unwrap().unwrap();
                        assert!(
                            now <= after.last_seq,
                            "{id}: acked {now} beyond last {}",
                            after.last_seq
                        );
                        acked = now;
                        if finished {
                            return;
                        }
                        tokio::task::yield_now().await;
                    }
                }));
            }
            let mut entries: Vec<(String, i64, String)> = Vec::new();
            for p in publishers {
                entries.extend(p.await.unwrap());
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            for a in ackers {
                a.await.unwrap();
            }

            let mut per_device: std::collections::BTreeMap<String, Vec<(i64, String)>> =
                Default::default();
            for (d, seq, id) in &entries {
                per_device
                    .entry(d.clone())
                    .or_default()
                    .push((*seq, id.clone()));
            }
            assert_eq!(per_device.len(), DEVICES);
            for (d, mut got) in per_device {
                got.sort();
                let n = got.len() as i64;
                assert_eq!(
                    got.iter().map(|g| g.0).collect::<Vec<_>>(),
                    (1..=n).collect::<Vec<_>>(),
                    "{d}: seqs"
                );
                for store in &nodes {
                    let dev = store.device(&d).await.unwrap().unwrap();
                    assert_eq!(
                        (dev.last_seq, dev.acked_seq),
                        (n, n),
                        "{d}: every ack landed"
                    );
                    let inbox = store.fetch_after(&d, 0, 10_000, T0).await.unwrap();
                    assert_eq!(
                        inbox
                            .iter()
                            .map(|e| (e.seq, e.message.id.clone()))
                            .collect::<Vec<_>>(),
                        got,
                        "{d}: the inbox holds what each publisher was told"
                    );
                }
            }
            // Every entry is acked and marked sent.
            let ids: std::collections::BTreeSet<&String> = entries.iter().map(|e| &e.2).collect();
            for id in ids {
                let (_, rows) = nodes[0].message(id).await.unwrap().unwrap();
                for r in rows {
                    assert!(r.acked_at.is_some(), "{id} on {}: not acked", r.device_id);
                    assert!(
                        r.sent_at.is_some(),
                        "{id} on {}: not marked sent",
                        r.device_id
                    );
                }
            }
        })
        .await
    }

    /// One idempotency key published from both nodes at once: one message, everyone
    /// else is told it is a duplicate of that one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_idempotency_key_on_two_nodes_creates_once() {
        with_two_stores(|a, b| async move {
            device(&a, "d1", "alice").await;
            let mut tasks = Vec::new();
            for i in 0..30 {
                let store = if i % 2 == 0 { a.clone() } else { b.clone() };
                tasks.push(tokio::spawn(async move {
                    let mut m = new_msg(to_device("d1"), T0);
                    m.idempotency_key = Some("same".into());
                    let id = m.id.clone();
                    (id, store.publish(m).await.unwrap())
                }));
            }
            let (mut made, mut dups) = (Vec::new(), Vec::new());
            for t in tasks {
                match t.await.unwrap() {
                    (id, PublishOutcome::Created { .. }) => made.push(id),
                    (
                        _,
                        PublishOutcome::Duplicate {
                            message_id,
                            recipients,
                        },
                    ) => {
                        assert_eq!(recipients, 1);
                        dups.push(message_id)
                    }
                }
            }
            assert_eq!(made.len(), 1);
            assert!(dups.iter().all(|d| *d == made[0]));
            assert_eq!(a.device("d1").await.unwrap().unwrap().last_seq, 1);
        })
        .await
    }

    /// A write the server refuses (here a NUL byte, which PostgreSQL text cannot hold)
    /// fails its own caller only; the writes grouped with it are committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_write_the_database_refuses_fails_alone() {
        with_two_stores(|a, _b| async move {
            device(&a, "d1", "alice").await;
            let mut tasks = Vec::new();
            for i in 0..40 {
                let store = a.clone();
                tasks.push(tokio::spawn(async move {
                    let mut m = new_msg(to_device("d1"), T0);
                    if i == 17 {
                        m.api_key_id = "bad\0key".into();
                    }
                    let id = m.id.clone();
                    (i, id, store.publish(m).await)
                }));
            }
            let mut seqs = Vec::new();
            for t in tasks {
                let (i, id, result) = t.await.unwrap();
                if i == 17 {
                    assert!(result.is_err(), "the refused write reports an error");
                    assert!(a.message(&id).await.unwrap().is_none());
                } else {
                    seqs.extend(
                        created(result.expect("grouped writes commit"))
                            .iter()
                            .map(|e| e.seq),
                    );
                    assert!(a.message(&id).await.unwrap().is_some());
                }
            }
            seqs.sort_unstable();
            assert_eq!(seqs, (1..=39).collect::<Vec<i64>>());
        })
        .await
    }
}

/// SQLite migration 0006 rewrites the inbox table into insertion order: what a
/// database of the older layout held is still there afterwards, in order, still one
/// row per (device, seq), and seqs go on from where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_inbox_written_before_migration_0006_survives_it() {
    use herald_gateway::store::migrations::{migrator, SQLITE};
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};
    use std::str::FromStr;

    let tmp = TempDir::new("herald-migrate-0006");
    let path = tmp.0.join(herald_gateway::store::sqlite::SQLITE_FILE);
    let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
        .unwrap()
        .create_if_missing(true);
    let before: Vec<(&str, &str)> = SQLITE
        .iter()
        .copied()
        .filter(|(name, _)| *name < "0006")
        .collect();
    assert_eq!(before.len(), 3, "0001, 0004 and 0005 come before 0006");
    {
        let pool = SqlitePool::connect_with(opts.clone()).await.unwrap();
        migrator(&before).run(&pool).await.unwrap();
        let ddl: String =
            sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE name = 'deliveries'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert!(ddl.contains("WITHOUT ROWID"), "the old layout: {ddl}");
        sqlx::query(
            "INSERT INTO devices (id, user_id, last_seq, created_at) VALUES ('dev-a', 'u1', 2, ?)",
        )
        .bind(T0)
        .execute(&pool)
        .await
        .unwrap();
        // Inserted out of seq order, as no real inbox is: order comes from the index.
        // Seq 1 waits for its `always` push, which the rewrite must mark as such.
        for seq in [2i64, 1] {
            let id = format!("msg_before_0006_{seq}");
            let policy = if seq == 1 {
                PushPolicy::Always
            } else {
                PushPolicy::Never
            };
            let body = serde_json::to_string(&payload(policy)).unwrap();
            let push_state = (seq == 1).then_some("pending");
            sqlx::query(
                "INSERT INTO messages (id, api_key_id, target_kind, target, payload, recipients, created_at, expires_at)
                 VALUES (?, 'key1', 'device', 'dev-a', ?, 1, ?, ?)",
            )
            .bind(&id)
            .bind(&body)
            .bind(T0)
            .bind(T0 + DAY)
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO deliveries (device_id, seq, message_id, expires_at, push_state, push_due_at)
                 VALUES ('dev-a', ?, ?, ?, ?, ?)",
            )
            .bind(seq)
            .bind(&id)
            .bind(T0 + DAY)
            .bind(push_state)
            .bind(push_state.map(|_| T0))
            .execute(&pool)
            .await
            .unwrap();
        }
        pool.close().await;
    }

    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&tmp.0).await.expect("migrate"));
    let old = store.fetch_after("dev-a", 0, 10, T0).await.unwrap();
    let seen: Vec<(i64, &str)> = old.iter().map(|e| (e.seq, e.message.id.as_str())).collect();
    assert_eq!(
        seen,
        [(1, "msg_before_0006_1"), (2, "msg_before_0006_2")],
        "the inbox survives the rewrite, in seq order"
    );
    assert_eq!(
        old[0].message.payload.data.get(),
        payload(PushPolicy::Never).data.get()
    );
    let new = publish_ok(&store, new_msg(to_device("dev-a"), T0)).await;
    assert_eq!(new[0].seq, 3, "seqs go on after the rewrite");
    let all = store.fetch_after("dev-a", 0, 10, T0).await.unwrap();
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    // The `always` push of seq 1 outlives an ack, as one written after 0006 would.
    store.ack("dev-a", 2, T0 + 1, false).await.unwrap();
    let due = store.take_due_pushes(T0 + 2, T0 + 3, 10).await.unwrap();
    assert_eq!(due.iter().map(|e| e.seq).collect::<Vec<_>>(), [1]);
    drop(store);

    let pool = SqlitePool::connect_with(opts).await.unwrap();
    let ddl: String = sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE name = 'deliveries'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        !ddl.contains("WITHOUT ROWID"),
        "rows in insertion order: {ddl}"
    );
    let duplicate = sqlx::query(
        "INSERT INTO deliveries (device_id, seq, message_id, expires_at) VALUES ('dev-a', 1, 'x', 0)",
    )
    .execute(&pool)
    .await;
    let err = duplicate.expect_err("still one row per (device, seq)");
    assert!(err.to_string().contains("UNIQUE"), "{err}");
}

/// The due poller runs every `push.poll_interval_ms` on every node: its statements must
/// reach the partial push indexes, not scan the inbox, which holds every retained entry.
/// With sequential scans priced out, a plan that still scans `deliveries` means a
/// statement's predicate no longer implies its index's (SQLite's twin of this test is
/// `the_due_pollers_statements_use_the_push_indexes`).
#[tokio::test]
async fn postgres_due_poller_statements_use_the_push_indexes() {
    use herald_gateway::store::postgres::{FAIL_ORPHANS_SQL, TAKE_DUE_SQL};
    use sqlx::{Connection, Executor, Row};
    let db = common::pg::PgDb::create().await;
    let url = db.url.clone();
    let result = tokio::spawn(async move {
        let _migrated = PostgresStore::open(&url)
            .await
            .expect("open postgres store");
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        conn.execute("SET enable_seqscan = off").await.unwrap();
        for (sql, args, index) in [
            (TAKE_DUE_SQL, "(1000, 2000, 100)", "deliveries_push_due"),
            (
                FAIL_ORPHANS_SQL.as_str(),
                "(1000, 'orphaned', 500, true)",
                "deliveries_push_sending",
            ),
        ] {
            conn.execute(format!("PREPARE plan_check AS {sql}").as_str())
                .await
                .unwrap();
            let plan: Vec<String> = sqlx::query(&format!("EXPLAIN EXECUTE plan_check{args}"))
                .fetch_all(&mut conn)
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<String, _>(0))
                .collect();
            conn.execute("DEALLOCATE plan_check").await.unwrap();
            let plan = plan.join("\n");
            assert!(!plan.contains("Seq Scan on deliveries"), "{sql}\n{plan}");
            assert!(plan.contains(index), "{sql}: no {index}\n{plan}");
        }
    })
    .await;
    db.drop_db().await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}
