//! The delivery model against the real server: live, replay, fan-out, acks, TTL,
//! idempotency, ack timeout → push, slow consumers.

use crate::common;

use std::time::Duration;

use common::*;
use herald_gateway::registry::{entry_weight, Offer};
use herald_gateway::store::{InboxEntry, MessagePayload, NewMessage, PublishOutcome};
use herald_gateway::testing::TestGateway;
use herald_protocol::{ClientFrame, Priority, PushContent, PushPolicy, ServerFrame, Target};
use serde_json::json;

#[tokio::test]
async fn live_delivery_then_ack_is_recorded() {
    let tg = TestGateway::start().await;
    let mut dev = connect(&tg, "alice", "phone", None).await;
    // The session answers pings only once its initial replay is done; publishing
    // before that could make this message a replay instead of a live delivery.
    dev.send(&ClientFrame::Ping).await;
    assert_eq!(dev.frame().await, Some(ServerFrame::Pong));
    let r = publish(
        &tg,
        json!({"to": {"device": "phone"}, "data": {"text": "hi"}}),
    )
    .await;
    assert_eq!(r["recipients"], 1);
    let m = dev.msg().await;
    assert_eq!(m.seq, 1);
    assert_eq!(m.data, json!({"text": "hi"}));
    assert_eq!(m.id, r["message_id"].as_str().unwrap());
    dev.ack(1).await;
    let id = r["message_id"].as_str().unwrap().to_owned();
    let status = eventually("acked state", || async {
        let (_, v) = get(&tg, &format!("/v1/messages/{id}"), &tg.api_key).await;
        (v["deliveries"][0]["state"] == "acked").then_some(v)
    })
    .await;
    assert_eq!(status["deliveries"][0]["device_id"], "phone");
    assert!(status["deliveries"][0]["acked_at"].is_string());
    // Delivered live: the fallback policy pushed nothing.
    assert!(tg.fcm.sent().is_empty() && tg.apns.sent().is_empty());
    let (_, device) = get(&tg, "/v1/devices/phone", &tg.api_key).await;
    assert_eq!(device["online"], true);
    assert_eq!(device["acked_seq"], 1);
    let metrics = metrics_text(&tg).await;
    assert!(
        metrics.contains("herald_delivered_live_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("herald_publish_to_deliver_seconds_count 1"));
    assert!(metrics.contains("herald_connections 1"));
}

#[tokio::test]
async fn offline_messages_replay_in_order_then_live_follows() {
    let tg = TestGateway::start().await;
    register(&tg, "bob", "tablet", None).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let r = publish(&tg, json!({"to": {"device": "tablet"}, "data": {"n": i}})).await;
        ids.push(r["message_id"].as_str().unwrap().to_owned());
    }
    let mut dev = connect(&tg, "bob", "tablet", Some(0)).await;
    for (i, id) in ids.iter().enumerate() {
        let m = dev.msg().await;
        assert_eq!(m.seq, i as i64 + 1);
        assert_eq!(&m.id, id);
        assert_eq!(m.data["n"], i);
    }
    publish(&tg, json!({"to": {"device": "tablet"}, "data": {"n": 20}})).await;
    assert_eq!(dev.msg().await.seq, 21);
    dev.ack(21).await;
    dev.quiet_for(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn publishes_during_replay_are_neither_lost_nor_reordered() {
    let tg = TestGateway::start_with(|c| c.delivery.replay_batch = 7).await;
    register(&tg, "bob", "d1", None).await;
    for i in 0..50 {
        publish(&tg, json!({"to": {"device": "d1"}, "data": {"n": i}})).await;
    }
    let mut dev = connect(&tg, "bob", "d1", Some(0)).await;
    let tg_ref = &tg;
    let publisher = async move {
        for i in 50..100 {
            publish(tg_ref, json!({"to": {"device": "d1"}, "data": {"n": i}})).await;
        }
    };
    let reader = async {
        let mut seqs = Vec::new();
        while seqs.len() < 100 {
            let m = dev.msg().await;
            seqs.push(m.seq);
        }
        seqs
    };
    let ((), seqs) = tokio::join!(publisher, reader);
    assert_eq!(seqs, (1..=100).collect::<Vec<i64>>());
}

#[tokio::test]
async fn reconnect_with_a_stale_cursor_replays_from_it() {
    let tg = TestGateway::start().await;
    let mut dev = connect(&tg, "carol", "p", None).await;
    for i in 0..5 {
        publish(&tg, json!({"to": {"user": "carol"}, "data": {"n": i}})).await;
    }
    for s in 1..=5 {
        assert_eq!(dev.msg().await.seq, s);
    }
    dev.ack(5).await;
    drop(dev);
    // The app lost its local state after seq 2: it asks again from there.
    let mut dev = connect(&tg, "carol", "p", Some(2)).await;
    for s in 3..=5 {
        assert_eq!(dev.msg().await.seq, s);
    }
    dev.quiet_for(Duration::from_millis(200)).await;
    drop(dev);
    // Without a cursor the server resumes after the last ack: nothing to replay.
    let mut dev = connect(&tg, "carol", "p", None).await;
    dev.quiet_for(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn user_fan_out_reaches_every_device_of_the_user_only() {
    let tg = TestGateway::start().await;
    let mut a = connect(&tg, "dave", "dave-phone", None).await;
    let mut b = connect(&tg, "dave", "dave-tablet", None).await;
    let mut other = connect(&tg, "erin", "erin-phone", None).await;
    register(&tg, "dave", "dave-laptop", None).await;
    let r = publish(&tg, json!({"to": {"user": "dave"}, "data": {"x": 1}})).await;
    assert_eq!(r["recipients"], 3);
    assert_eq!(a.msg().await.id, r["message_id"].as_str().unwrap());
    assert_eq!(b.msg().await.id, r["message_id"].as_str().unwrap());
    other.quiet_for(Duration::from_millis(200)).await;
    let (_, status) = get(
        &tg,
        &format!("/v1/messages/{}", r["message_id"].as_str().unwrap()),
        &tg.api_key,
    )
    .await;
    let states: Vec<_> = status["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device_id"].as_str().unwrap().to_owned(),
                d["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(states.len(), 3);
    // The laptop is offline with no push token: the push route failed, visibly.
    assert!(
        states.contains(&("dave-laptop".into(), "push_failed".into()))
            || states.contains(&("dave-laptop".into(), "queued".into())),
        "{states:?}"
    );
    let (_, list) = get(&tg, "/v1/users/dave/devices", &tg.api_key).await;
    assert_eq!(list["devices"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn topic_fan_out_reaches_subscribers_and_survives_reconnect() {
    let tg = TestGateway::start().await;
    let mut subs = Vec::new();
    for i in 0..5 {
        let mut d = connect(&tg, &format!("u{i}"), &format!("dev{i}"), None).await;
        d.send(&ClientFrame::Subscribe {
            topic: "news".into(),
        })
        .await;
        assert_eq!(
            d.frame().await,
            Some(ServerFrame::Subscribed {
                topic: "news".into()
            })
        );
        subs.push(d);
    }
    let mut outsider = connect(&tg, "x", "outsider", None).await;
    let r = publish(
        &tg,
        json!({"to": {"topic": "news"}, "data": {"h": "headline"}}),
    )
    .await;
    assert_eq!(r["recipients"], 5);
    for d in &mut subs {
        assert_eq!(d.msg().await.data["h"], "headline");
    }
    outsider.quiet_for(Duration::from_millis(200)).await;
    // Subscriptions are stored: they hold across reconnects; unsubscribe removes one.
    subs[0]
        .send(&ClientFrame::Unsubscribe {
            topic: "news".into(),
        })
        .await;
    assert_eq!(
        subs[0].frame().await,
        Some(ServerFrame::Unsubscribed {
            topic: "news".into()
        })
    );
    drop(subs);
    let r = publish(&tg, json!({"to": {"topic": "news"}, "data": {}})).await;
    assert_eq!(r["recipients"], 4);
}

#[tokio::test]
async fn idempotency_key_returns_the_first_message_and_creates_nothing() {
    let tg = TestGateway::start().await;
    let mut dev = connect(&tg, "f", "fd", None).await;
    let body = json!({"to": {"device": "fd"}, "data": {"k": 1}, "idempotency_key": "order-42"});
    let first = publish(&tg, body.clone()).await;
    let second = publish(&tg, body).await;
    assert_eq!(first["message_id"], second["message_id"]);
    assert_eq!(second["duplicate"], true);
    // The header form is the same key.
    let resp = common::http()
        .post(format!("{}/v1/messages", tg.base_url))
        .bearer_auth(&tg.api_key)
        .header("Idempotency-Key", "order-42")
        .json(&json!({"to": {"device": "fd"}, "data": {"k": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let third: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(third["message_id"], first["message_id"]);
    assert_eq!(dev.msg().await.seq, 1);
    dev.quiet_for(Duration::from_millis(300)).await;
    let (_, device) = get(&tg, "/v1/devices/fd", &tg.api_key).await;
    assert_eq!(device["last_seq"], 1);
}

#[tokio::test]
async fn expired_messages_are_not_replayed_and_show_expired() {
    let tg = TestGateway::start().await;
    register(&tg, "g", "gd", None).await;
    let short = publish(
        &tg,
        json!({"to": {"device": "gd"}, "data": {"v": "short"}, "ttl_seconds": 1, "push": "never"}),
    )
    .await;
    publish(
        &tg,
        json!({"to": {"device": "gd"}, "data": {"v": "long"}, "push": "never"}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let mut dev = connect(&tg, "g", "gd", Some(0)).await;
    let m = dev.msg().await;
    assert_eq!((m.seq, m.data["v"].as_str()), (2, Some("long")));
    dev.quiet_for(Duration::from_millis(200)).await;
    let (_, status) = get(
        &tg,
        &format!("/v1/messages/{}", short["message_id"].as_str().unwrap()),
        &tg.api_key,
    )
    .await;
    assert_eq!(status["deliveries"][0]["state"], "expired");
    // Sync over HTTP skips it too.
    let token = tg.mint_token("g", Duration::from_secs(60));
    let (_, sync) = get(&tg, "/v1/me/sync?device_id=gd&after=0", &token).await;
    assert_eq!(sync["messages"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn unacked_live_message_times_out_closes_session_and_is_pushed_once() {
    let tg = TestGateway::start_with(|c| c.delivery.ack_timeout_ms = 300).await;
    register(&tg, "h", "hd", Some(("fcm", "fcm-token-1"))).await;
    let mut dev = connect(&tg, "h", "hd", None).await;
    let r = publish(&tg, json!({"to": {"device": "hd"}, "data": {"a": 1}})).await;
    assert_eq!(dev.msg().await.seq, 1);
    // No ack: the session is judged half-open.
    match dev.frame().await {
        Some(ServerFrame::Error { code, .. }) => assert_eq!(code, "ack_timeout"),
        other => panic!("expected ack_timeout, got {other:?}"),
    }
    assert!(dev.frame().await.is_none(), "session should close");
    let sent = eventually("push", || async {
        let s = tg.fcm.sent();
        (!s.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].token, "fcm-token-1");
    assert_eq!(sent[0].seq, 1);
    assert_eq!(sent[0].message_id, r["message_id"].as_str().unwrap());
    let id = r["message_id"].as_str().unwrap().to_owned();
    eventually("pushed state", || async {
        let (_, v) = get(&tg, &format!("/v1/messages/{id}"), &tg.api_key).await;
        (v["deliveries"][0]["state"] == "pushed").then_some(())
    })
    .await;
    // Reconnecting replays it (still unacked) without a second push.
    let mut dev = connect(&tg, "h", "hd", None).await;
    assert_eq!(dev.msg().await.seq, 1);
    dev.ack(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(tg.fcm.sent().len(), 1);
}

#[tokio::test]
async fn push_policies_decide_who_gets_pushed() {
    let tg = TestGateway::start().await;
    register(&tg, "i", "online", Some(("apns", "apns-online"))).await;
    register(&tg, "i", "offline", Some(("apns", "apns-offline"))).await;
    let mut dev = connect(&tg, "i", "online", None).await;
    publish(&tg, json!({"to": {"user": "i"}, "data": {"p": "fallback"}})).await;
    publish(
        &tg,
        json!({"to": {"user": "i"}, "data": {"p": "always"}, "push": "always"}),
    )
    .await;
    publish(
        &tg,
        json!({"to": {"user": "i"}, "data": {"p": "never"}, "push": "never"}),
    )
    .await;
    for s in 1..=3 {
        let m = dev.msg().await;
        assert_eq!(m.seq, s);
        dev.ack(s).await;
    }
    let pushes = eventually("3 pushes", || async {
        let s = tg.apns.sent();
        (s.len() >= 3).then_some(s)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut got: Vec<(String, String)> = tg
        .apns
        .sent()
        .iter()
        .map(|p| {
            (
                p.token.clone(),
                p.data.to_value()["p"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(pushes.len(), 3);
    assert_eq!(
        got,
        vec![
            ("apns-offline".into(), "always".into()),
            ("apns-offline".into(), "fallback".into()),
            ("apns-online".into(), "always".into()),
        ]
    );
}

#[tokio::test]
async fn slow_consumer_is_disconnected_and_catches_up_by_replay() {
    let tg = TestGateway::start_with(|c| {
        c.delivery.session_queue = 4;
        c.limits.publish_burst_per_key = 100_000;
        c.limits.publish_rate_per_key = 100_000;
    })
    .await;
    register(&tg, "s", "sd", None).await;
    let dev = connect(&tg, "s", "sd", None).await;
    // The client never reads: its socket buffers fill, the session's queue fills, and
    // the gateway cuts it off instead of buffering without bound.
    let big = "x".repeat(32 * 1024);
    let mut n = 0;
    let closed_slow = || async {
        let text = metrics_text(&tg).await;
        text.contains("herald_sessions_closed_total{reason=\"slow_consumer\"} 1")
    };
    while n < 400 && !closed_slow().await {
        publish(
            &tg,
            json!({"to": {"device": "sd"}, "data": {"pad": big}, "push": "never"}),
        )
        .await;
        n += 1;
    }
    // The kicked session may still be giving its close frame (bounded to 1 s) a chance.
    eventually("slow consumer disconnected", || async {
        closed_slow().await.then_some(())
    })
    .await;
    eventually("offline", || async {
        let (_, d) = get(&tg, "/v1/devices/sd", &tg.api_key).await;
        (d["online"] == false).then_some(())
    })
    .await;
    drop(dev);
    let mut dev = connect(&tg, "s", "sd", Some(0)).await;
    for s in 1..=n {
        assert_eq!(dev.msg().await.seq, s);
    }
}

#[tokio::test]
async fn http_sync_and_ack_serve_background_apps() {
    let tg = TestGateway::start().await;
    register(&tg, "j", "jd", None).await;
    for i in 0..5 {
        publish(
            &tg,
            json!({"to": {"device": "jd"}, "data": {"i": i}, "push": "never"}),
        )
        .await;
    }
    let token = tg.mint_token("j", Duration::from_secs(60));
    let (s, page) = get(&tg, "/v1/me/sync?device_id=jd&after=0&limit=3", &token).await;
    assert_eq!(s, 200);
    assert_eq!(page["has_more"], true);
    assert_eq!(page["last_seq"], 5);
    let seqs: Vec<i64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    let (_, page) = get(&tg, "/v1/me/sync?device_id=jd&after=3&limit=3", &token).await;
    assert_eq!(page["has_more"], false);
    assert_eq!(page["messages"].as_array().unwrap().len(), 2);
    let (s, ack) = post(
        &tg,
        "/v1/me/ack",
        &token,
        json!({"device_id": "jd", "seq": 5}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(ack["acked_seq"], 5);
    let (s, err) = post(
        &tg,
        "/v1/me/ack",
        &token,
        json!({"device_id": "jd", "seq": 99}),
    )
    .await;
    assert_eq!(s, 422, "{err}");
    // Another user's token cannot read this inbox.
    let intruder = tg.mint_token("mallory", Duration::from_secs(60));
    let (s, _) = get(&tg, "/v1/me/sync?device_id=jd&after=0", &intruder).await;
    assert_eq!(s, 403);
}

#[tokio::test]
async fn deleting_a_device_closes_its_session_and_forgets_it() {
    let tg = TestGateway::start().await;
    let mut dev = connect(&tg, "k", "kd", None).await;
    let resp = common::http()
        .delete(format!("{}/v1/devices/kd", tg.base_url))
        .bearer_auth(&tg.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    assert!(dev.frame().await.is_none());
    let (s, _) = get(&tg, "/v1/devices/kd", &tg.api_key).await;
    assert_eq!(s, 404);
    let (s, e) = post(
        &tg,
        "/v1/messages",
        &tg.api_key,
        json!({"to": {"device": "kd"}, "data": {}}),
    )
    .await;
    assert_eq!(s, 404, "{e}");
}

#[tokio::test]
async fn app_level_ping_gets_pong_and_bad_frames_get_errors() {
    let tg = TestGateway::start().await;
    let mut dev = connect(&tg, "l", "ld", None).await;
    dev.send(&ClientFrame::Ping).await;
    assert_eq!(dev.frame().await, Some(ServerFrame::Pong));
    use futures_util::SinkExt;
    dev.ws
        .send(tokio_tungstenite::tungstenite::Message::Text(
            "{nope".into(),
        ))
        .await
        .unwrap();
    assert!(
        matches!(dev.frame().await, Some(ServerFrame::Error { code, .. }) if code == "bad_frame")
    );
    dev.ack(50).await;
    assert!(
        matches!(dev.frame().await, Some(ServerFrame::Error { code, .. }) if code == "bad_ack")
    );
    // Oversized frames are refused by closing the connection.
    let huge = format!(
        "{{\"type\":\"subscribe\",\"topic\":\"{}\"}}",
        "a".repeat(64 * 1024)
    );
    let _ = dev
        .ws
        .send(tokio_tungstenite::tungstenite::Message::Text(huge.into()))
        .await;
    assert!(dev.frame().await.is_none());
    // The session is still usable after reconnect.
    let mut dev = connect(&tg, "l", "ld", None).await;
    dev.send(&ClientFrame::Ping).await;
    assert_eq!(dev.frame().await, Some(ServerFrame::Pong));
}

#[tokio::test]
async fn silent_client_is_dropped_after_two_heartbeats() {
    let tg = TestGateway::start_with(|c| c.delivery.heartbeat_ms = 200).await;
    // tungstenite answers pings only while the socket is read; a client that never
    // reads looks dead to the server.
    let dev = connect(&tg, "m", "md", None).await;
    eventually("offline", || async {
        let (_, d) = get(&tg, "/v1/devices/md", &tg.api_key).await;
        (d["online"] == false).then_some(())
    })
    .await;
    drop(dev);
}

#[tokio::test]
async fn an_ack_over_http_satisfies_the_live_session() {
    let tg = TestGateway::start_with(|c| c.delivery.ack_timeout_ms = 500).await;
    register(&tg, "n", "nd", Some(("fcm", "tok"))).await;
    let mut dev = connect(&tg, "n", "nd", None).await;
    publish(&tg, json!({"to": {"device": "nd"}, "data": {}})).await;
    assert_eq!(dev.msg().await.seq, 1);
    // The app acks through HTTP (e.g. from a background handler), not the socket.
    let token = tg.mint_token("n", Duration::from_secs(60));
    let (s, _) = post(
        &tg,
        "/v1/me/ack",
        &token,
        json!({"device_id": "nd", "seq": 1}),
    )
    .await;
    assert_eq!(s, 200);
    // Past the ack timeout the session is still up and nothing was pushed.
    tokio::time::sleep(Duration::from_millis(900)).await;
    dev.send(&ClientFrame::Ping).await;
    assert_eq!(dev.frame().await, Some(ServerFrame::Pong));
    assert!(tg.fcm.sent().is_empty());
}

/// The WebSocket buffers are configurable and small by default (idle connections
/// dominate); frames many times larger than the read buffer must still cross whole in
/// both directions.
#[tokio::test]
async fn frames_larger_than_the_configured_ws_buffers_cross_whole() {
    use futures_util::SinkExt;
    let tg = TestGateway::start_with(|c| {
        c.limits.ws_read_buffer_bytes = 512;
        c.limits.ws_write_buffer_bytes = 0;
        c.limits.ws_max_write_buffer_bytes = 64 * 1024;
    })
    .await;
    let mut dev = connect(&tg, "alice", "phone", None).await;
    let big = "b".repeat(12 * 1024);
    publish(
        &tg,
        json!({"to": {"device": "phone"}, "data": {"big": big}}),
    )
    .await;
    let m = dev.msg().await;
    assert_eq!(m.data["big"].as_str().unwrap().len(), 12 * 1024);
    // An ack frame padded to 8 KiB (JSON allows the whitespace) is read across many
    // 512-byte reads and still counts.
    let padded = format!(
        "{{\"type\":\"ack\",{}\"seq\":{}}}",
        " ".repeat(8 * 1024),
        m.seq
    );
    dev.ws
        .send(tokio_tungstenite::tungstenite::Message::Text(padded.into()))
        .await
        .unwrap();
    eventually("acked_seq 1", || async {
        let (_, d) = get(&tg, "/v1/devices/phone", &tg.api_key).await;
        (d["acked_seq"] == 1).then_some(())
    })
    .await;
}

/// GET /v1/messages/{id} of `id` once `pred` holds for its first delivery.
async fn delivery_when(
    tg: &TestGateway,
    id: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    eventually(what, || async {
        let (_, v) = get(tg, &format!("/v1/messages/{id}"), &tg.api_key).await;
        pred(&v["deliveries"][0]).then(|| v["deliveries"][0].clone())
    })
    .await
}

#[tokio::test]
async fn a_delivered_message_does_not_show_the_push_that_failed_before() {
    let tg = TestGateway::start().await;
    register(&tg, "frank", "frank-phone", None).await;
    let r = publish(&tg, json!({"to": {"user": "frank"}, "data": {"n": 1}})).await;
    let id = r["message_id"].as_str().unwrap().to_owned();
    let failed = delivery_when(&tg, &id, "push_failed", |d| d["state"] == "push_failed").await;
    assert_eq!(failed["reason"], "no push token registered", "{failed}");
    let mut dev = connect(&tg, "frank", "frank-phone", None).await;
    assert_eq!(dev.msg().await.seq, 1);
    dev.ack(1).await;
    let acked = delivery_when(&tg, &id, "acked", |d| d["state"] == "acked").await;
    assert!(acked["acked_at"].is_string(), "{acked}");
    for field in ["pushed_at", "push_provider", "reason"] {
        assert!(acked.get(field).is_none(), "{field} in {acked}");
    }
}

#[tokio::test]
async fn a_delivered_message_still_shows_a_push_that_was_sent() {
    let tg = TestGateway::start().await;
    register(&tg, "gina", "gina-phone", Some(("fcm", "tok-gina"))).await;
    let r = publish(&tg, json!({"to": {"user": "gina"}, "data": {"n": 1}})).await;
    let id = r["message_id"].as_str().unwrap().to_owned();
    delivery_when(&tg, &id, "pushed", |d| d["state"] == "pushed").await;
    let mut dev = connect(&tg, "gina", "gina-phone", None).await;
    assert_eq!(dev.msg().await.seq, 1);
    dev.ack(1).await;
    let acked = delivery_when(&tg, &id, "acked", |d| d["state"] == "acked").await;
    assert!(acked["pushed_at"].is_string(), "{acked}");
    assert_eq!(acked["push_provider"], "fcm", "{acked}");
}

#[tokio::test]
async fn a_publish_that_reaches_nobody_says_why() {
    let tg = TestGateway::start().await;
    let r = publish(&tg, json!({"to": {"user": "nobody"}, "data": {}})).await;
    assert_eq!(r["recipients"], 0);
    let hint = r["hint"].as_str().unwrap_or_default();
    assert!(hint.contains("user nobody has no devices"), "{r}");
    let r = publish(&tg, json!({"to": {"topic": "empty"}, "data": {}})).await;
    assert!(
        r["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("topic empty"),
        "{r}"
    );
    register(&tg, "somebody", "sb-phone", None).await;
    let r = publish(&tg, json!({"to": {"user": "somebody"}, "data": {}})).await;
    assert_eq!(r["recipients"], 1);
    assert!(r.get("hint").is_none(), "{r}");
}

#[tokio::test]
async fn device_info_has_every_documented_field() {
    let tg = TestGateway::start().await;
    register(&tg, "hank", "hank-phone", None).await;
    let (status, d) = get(&tg, "/v1/devices/hank-phone", &tg.api_key).await;
    assert_eq!(status, 200);
    // docs/protocol.md, "Devices": fields without a value are null, not missing.
    for field in [
        "device_id",
        "user",
        "platform",
        "online",
        "last_seen",
        "push_provider",
        "push_token",
        "push_token_error",
        "apns_environment",
        "last_seq",
        "acked_seq",
    ] {
        assert!(d.get(field).is_some(), "{field} missing from {d}");
    }
    assert!(
        d["push_provider"].is_null() && d["apns_environment"].is_null(),
        "{d}"
    );
    assert_eq!(d["push_token"], "none");
}

/// Next text frame exactly as the server wrote it.
async fn raw_text_frame(dev: &mut Device) -> String {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(WAIT, dev.ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.as_str().to_owned(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

async fn raw_http(
    tg: &TestGateway,
    method: &str,
    path: &str,
    bearer: &str,
    body: Option<&str>,
) -> (u16, String) {
    herald_gateway::testing::http_request(method, &format!("{}{path}", tg.base_url), bearer, body)
        .await
}

#[tokio::test]
async fn data_arrives_as_the_exact_json_text_the_backend_sent() {
    let tg = TestGateway::start().await;
    // Beyond f64 and i64/u64, with spacing, a trailing zero and keys out of order: any
    // parse and re-serialise would change some of it.
    let data = r#"{"big": 123456789012345678901234567890, "f":1.50, "z":{"k" : [1, 2]}, "a":-0.0}"#;
    let mut phone = connect(&tg, "ada", "ada-phone", None).await;
    let mut tablet = connect(&tg, "ada", "ada-tablet", None).await;
    for dev in [&mut phone, &mut tablet] {
        dev.send(&ClientFrame::Ping).await;
        assert_eq!(dev.frame().await, Some(ServerFrame::Pong));
    }
    let body =
        format!(r#"{{"to": {{"user": "ada"}}, "data": {data}, "notification": {{"title": "t"}}}}"#);
    let (s, resp) = raw_http(&tg, "POST", "/v1/messages", &tg.api_key, Some(&body)).await;
    assert_eq!(s, 202, "{resp}");
    let resp: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(resp["recipients"], 2);
    let id = resp["message_id"].as_str().unwrap().to_owned();

    let expected_data = format!(r#""data":{data},"#);
    // Live over the WebSocket, to each device of the fan-out.
    for dev in [&mut phone, &mut tablet] {
        let text = raw_text_frame(dev).await;
        assert!(text.contains(&expected_data), "{text}");
        assert!(text.starts_with(r#"{"type":"msg","seq":1,"#), "{text}");
        // Still the frame every client parses.
        let frame: ServerFrame = serde_json::from_str(&text).unwrap();
        let ServerFrame::Msg(m) = frame else {
            panic!("{text}")
        };
        assert_eq!((m.seq, m.id.as_str()), (1, id.as_str()));
        assert_eq!(m.notification.unwrap().title.as_deref(), Some("t"));
    }
    // Replayed on a new connection (read back from the store).
    drop(phone);
    let mut again = connect(&tg, "ada", "ada-phone", Some(0)).await;
    let text = raw_text_frame(&mut again).await;
    assert!(text.contains(&expected_data), "{text}");
    // Over HTTP sync, and in the message status.
    let token = tg.mint_token("ada", Duration::from_secs(60));
    let (s, page) = raw_http(
        &tg,
        "GET",
        "/v1/me/sync?device_id=ada-tablet&after=0",
        &token,
        None,
    )
    .await;
    assert_eq!(s, 200, "{page}");
    assert!(page.contains(&expected_data), "{page}");
    let page: serde_json::Value = serde_json::from_str(&page).unwrap();
    assert_eq!(page["messages"][0]["seq"], 1);
    assert_eq!(page["has_more"], false);
    assert_eq!(page["last_seq"], 1);
    let (s, status) = raw_http(&tg, "GET", &format!("/v1/messages/{id}"), &tg.api_key, None).await;
    assert_eq!(s, 200, "{status}");
    assert!(status.contains(&format!(r#""data":{data}"#)), "{status}");
}

/// A message for `device` committed to the store the way the publish route does, but
/// not routed: the test hands its entry to the session itself, in any order.
async fn commit_unrouted(tg: &TestGateway, device: &str, n: u32) -> InboxEntry {
    let now = herald_gateway::clock::now_ms();
    let msg = NewMessage {
        id: uuid::Uuid::now_v7().to_string(),
        api_key_id: "test".into(),
        target: Target::Device(device.into()),
        payload: MessagePayload {
            data: json!({ "n": n }).into(),
            notification: None,
            push: PushPolicy::Never,
            push_content: PushContent::Full,
            priority: Priority::Normal,
            collapse_key: None,
        },
        created_at: now,
        expires_at: now + 3_600_000,
        idempotency_key: None,
        idempotency_since: now,
        max_recipients: 10,
        push_due_at: None,
    };
    match tg.state.store.publish(msg).await.unwrap() {
        PublishOutcome::Created { mut entries } if entries.len() == 1 => entries.remove(0),
        other => panic!("expected one entry, got {other:?}"),
    }
}

/// Connects and waits until the session's initial replay is done (it answers pings
/// only then), so what follows is live delivery.
async fn connect_after_replay(tg: &TestGateway, user: &str, device: &str) -> Device {
    let mut dev = connect(tg, user, device, None).await;
    dev.send(&ClientFrame::Ping).await;
    assert_eq!(dev.frame().await, Some(ServerFrame::Pong));
    dev
}

fn offer(tg: &TestGateway, entry: InboxEntry) {
    let handle = tg
        .state
        .registry
        .get(&entry.device_id)
        .expect("a live session");
    let weight = entry_weight(&entry.message);
    let offered = handle.offer(entry, std::time::Instant::now(), weight, &tg.state.metrics);
    assert_eq!(offered, Offer::Taken);
}

/// Two publishes committed in one group are routed by two tasks, so seq 2 can reach the
/// session before seq 1: it waits for seq 1 instead of reading the store.
#[tokio::test]
async fn entries_routed_out_of_seq_order_are_sent_in_order_without_a_store_read() {
    let tg = TestGateway::start().await;
    let mut dev = connect_after_replay(&tg, "alice", "phone").await;
    let first = commit_unrouted(&tg, "phone", 1).await;
    let second = commit_unrouted(&tg, "phone", 2).await;
    assert_eq!((first.seq, second.seq), (1, 2));
    let replayed_before = tg.state.metrics.replayed.get();
    offer(&tg, second);
    tokio::time::sleep(Duration::from_millis(5)).await;
    offer(&tg, first);
    let (a, b) = (dev.msg().await, dev.msg().await);
    assert_eq!((a.seq, a.data["n"].as_u64()), (1, Some(1)));
    assert_eq!((b.seq, b.data["n"].as_u64()), (2, Some(2)));
    assert_eq!(
        tg.state.metrics.replayed.get(),
        replayed_before,
        "nothing re-read"
    );
    assert_eq!(tg.state.metrics.delivered_live.get(), 2);
    dev.quiet_for(Duration::from_millis(100)).await;
}

/// The entry before an early one never comes (lost to a full queue, or its node died
/// before routing it): after a short wait the gap is read from the store, in order.
#[tokio::test]
async fn a_gap_that_does_not_fill_is_read_from_the_store_in_order() {
    let tg = TestGateway::start().await;
    let mut dev = connect_after_replay(&tg, "alice", "phone").await;
    let _never_routed = commit_unrouted(&tg, "phone", 1).await;
    let second = commit_unrouted(&tg, "phone", 2).await;
    offer(&tg, second);
    let (a, b) = (dev.msg().await, dev.msg().await);
    assert_eq!((a.seq, a.data["n"].as_u64()), (1, Some(1)));
    assert_eq!((b.seq, b.data["n"].as_u64()), (2, Some(2)));
    assert!(
        tg.state.metrics.replayed.get() >= 1,
        "the gap came from the store"
    );
    dev.quiet_for(Duration::from_millis(100)).await;
    dev.ack(2).await;
}

const ACK_WRITES: &str = "herald_store_op_duration_seconds_count{op=\"ack\"}";

#[tokio::test]
async fn buffered_acks_are_one_store_write_and_frames_after_them_still_answer() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let tg = TestGateway::start().await;
    let mut dev = connect(&tg, "fold", "fold-1", None).await;
    dev.send(&ClientFrame::Ping).await;
    assert_eq!(dev.frame().await, Some(ServerFrame::Pong));
    let mut ids = Vec::new();
    for i in 0..40 {
        let r = publish(&tg, json!({"to": {"device": "fold-1"}, "data": {"n": i}})).await;
        ids.push(r["message_id"].as_str().unwrap().to_owned());
    }
    for seq in 1..=40 {
        assert_eq!(dev.msg().await.seq, seq);
    }
    let before = metric(&tg, ACK_WRITES).await;
    // 40 acks, an app-level ping and an ack beyond what was sent, in one TCP write:
    // the server finds them buffered together.
    let text = |f: &ClientFrame| Message::Text(serde_json::to_string(f).unwrap().into());
    for seq in 1..=40 {
        dev.ws.feed(text(&ClientFrame::Ack { seq })).await.unwrap();
    }
    dev.ws.feed(text(&ClientFrame::Ping)).await.unwrap();
    dev.ws
        .feed(text(&ClientFrame::Ack { seq: 99 }))
        .await
        .unwrap();
    dev.ws.flush().await.unwrap();
    // The frames after the acks are answered, in order.
    assert_eq!(dev.frame().await, Some(ServerFrame::Pong));
    assert!(
        matches!(dev.frame().await, Some(ServerFrame::Error { code, .. }) if code == "bad_ack")
    );
    // Every entry is acked, through far fewer than 40 store writes (one per ack
    // before acks were folded).
    let (_, device) = get(&tg, "/v1/devices/fold-1", &tg.api_key).await;
    assert_eq!(device["acked_seq"], 40);
    for id in [&ids[0], &ids[19], &ids[39]] {
        let (_, v) = get(&tg, &format!("/v1/messages/{id}"), &tg.api_key).await;
        assert_eq!(v["deliveries"][0]["state"], "acked", "{v}");
    }
    let writes = metric(&tg, ACK_WRITES).await - before;
    assert!((1..=3).contains(&writes), "{writes} ack writes for 40 acks");
    // The session goes on as before.
    publish(&tg, json!({"to": {"device": "fold-1"}, "data": {"n": 40}})).await;
    assert_eq!(dev.msg().await.seq, 41);
}
