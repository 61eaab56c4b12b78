//! Transports beyond WebSocket, against the real server: Server-Sent Events
//! (`GET /v1/connect/sse`) and long-poll (`GET /v1/me/sync?wait=S`).

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use herald_gateway::testing::TestGateway;
use herald_protocol::ServerFrame;
use serde_json::{json, Value};

/// One SSE event as the client sees it.
#[derive(Debug, Clone, PartialEq)]
struct Event {
    id: Option<String>,
    event: String,
    data: String,
}

/// A minimal EventSource: a streaming GET and the event-stream parser.
struct Sse {
    resp: reqwest::Response,
    buf: String,
}

impl Sse {
    async fn open(
        tg: &TestGateway,
        user: &str,
        device: &str,
        after: Option<i64>,
        last_event_id: Option<i64>,
    ) -> Sse {
        let token = tg.mint_token(user, Duration::from_secs(600));
        let mut url = format!("{}/v1/connect/sse?device_id={device}", tg.base_url);
        if let Some(a) = after {
            url.push_str(&format!("&after={a}"));
        }
        let mut req = http()
            .get(url)
            .bearer_auth(token)
            .header("Accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(
            resp.headers().get("content-type").unwrap(),
            "text/event-stream"
        );
        let mut sse = Sse {
            resp,
            buf: String::new(),
        };
        let welcome = sse.event().await.expect("welcome event");
        assert_eq!(welcome.event, "welcome", "{welcome:?}");
        sse
    }

    /// The next event (comments skipped); None when the stream ended.
    async fn event(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = Event {
                    id: None,
                    event: "message".into(),
                    data: String::new(),
                };
                let mut data_lines = Vec::new();
                for line in block.lines() {
                    if line.starts_with(':') || line.is_empty() {
                        continue;
                    }
                    let (field, value) = line.split_once(": ").unwrap_or((line, ""));
                    match field {
                        "id" => ev.id = Some(value.to_owned()),
                        "event" => ev.event = value.to_owned(),
                        "data" => data_lines.push(value.to_owned()),
                        other => panic!("unexpected field {other} in {block:?}"),
                    }
                }
                if data_lines.is_empty() && ev.id.is_none() {
                    continue; // a comment-only block: the heartbeat
                }
                ev.data = data_lines.join("\n");
                return Some(ev);
            }
            let chunk = tokio::time::timeout(WAIT, self.resp.chunk())
                .await
                .expect("timed out waiting for an SSE event");
            match chunk {
                Ok(Some(bytes)) => self.buf.push_str(std::str::from_utf8(&bytes).unwrap()),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    async fn msg(&mut self) -> (Option<String>, herald_protocol::InboxMessage) {
        let ev = self.event().await.expect("msg event");
        assert_eq!(ev.event, "msg", "{ev:?}");
        match serde_json::from_str::<ServerFrame>(&ev.data).expect("a server frame") {
            ServerFrame::Msg(m) => (ev.id, m),
            other => panic!("expected msg, got {other:?}"),
        }
    }

    /// Events until the stream ends.
    async fn rest(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(ev) = self.event().await {
            out.push(ev);
        }
        out
    }
}

async fn ack_http(tg: &TestGateway, user: &str, device: &str, seq: i64) {
    let token = tg.mint_token(user, Duration::from_secs(600));
    let (status, v) = post(
        tg,
        "/v1/me/ack",
        &token,
        json!({"device_id": device, "seq": seq}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test]
async fn sse_replays_then_delivers_live_and_resumes_by_last_event_id() {
    let tg = TestGateway::start().await;
    register(&tg, "u", "d1", None).await;
    publish(&tg, json!({"to": {"device": "d1"}, "data": {"n": 1}})).await;
    publish(&tg, json!({"to": {"device": "d1"}, "data": {"n": 2}})).await;

    let mut sse = Sse::open(&tg, "u", "d1", Some(0), None).await;
    for n in 1..=2 {
        let (id, m) = sse.msg().await;
        assert_eq!(id.as_deref(), Some(n.to_string().as_str()));
        assert_eq!(m.seq, n);
        assert_eq!(m.data, json!({ "n": n }));
    }
    let (_, device) = get(&tg, "/v1/devices/d1", &tg.api_key).await;
    assert_eq!(device["online"], true);
    let r = publish(&tg, json!({"to": {"device": "d1"}, "data": {"n": 3}})).await;
    let (id, m) = sse.msg().await;
    assert_eq!((id.as_deref(), m.seq), (Some("3"), 3));
    assert_eq!(m.id, r["message_id"].as_str().unwrap());
    drop(sse);

    eventually("offline after the stream closed", || async {
        let (_, d) = get(&tg, "/v1/devices/d1", &tg.api_key).await;
        (d["online"] == false).then_some(())
    })
    .await;
    publish(&tg, json!({"to": {"device": "d1"}, "data": {"n": 4}})).await;
    // EventSource reconnects with the URL it was opened with (after=0) and the id of
    // the last event it got: the header wins.
    let mut sse = Sse::open(&tg, "u", "d1", Some(0), Some(3)).await;
    let (id, m) = sse.msg().await;
    assert_eq!((id.as_deref(), m.seq), (Some("4"), 4));
}

#[tokio::test]
async fn sse_acks_over_http_and_an_unacked_entry_times_out_to_one_push() {
    let tg = TestGateway::start_with(|c| c.delivery.ack_timeout_ms = 400).await;
    register(&tg, "u", "d2", Some(("fcm", "fcm-token-sse"))).await;
    let mut sse = Sse::open(&tg, "u", "d2", None, None).await;

    publish(&tg, json!({"to": {"device": "d2"}, "data": {"n": 1}})).await;
    assert_eq!(sse.msg().await.1.seq, 1);
    ack_http(&tg, "u", "d2", 1).await;
    // Acked in time: the session stays and nothing is pushed.
    let r = publish(&tg, json!({"to": {"device": "d2"}, "data": {"n": 2}})).await;
    assert_eq!(sse.msg().await.1.seq, 2);
    assert!(tg.fcm.sent().is_empty());

    // Not acked: the session is judged half-open, closed with 1008, and pushed once.
    let rest = sse.rest().await;
    assert_eq!(rest.len(), 2, "{rest:?}");
    assert_eq!(rest[0].event, "error");
    assert!(rest[0].data.contains("ack_timeout"), "{rest:?}");
    assert_eq!(rest[1].event, "close");
    let close: Value = serde_json::from_str(&rest[1].data).unwrap();
    assert_eq!(close["code"], 1008);
    let sent = eventually("push", || async {
        let s = tg.fcm.sent();
        (!s.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].seq, 2);
    assert_eq!(sent[0].message_id, r["message_id"].as_str().unwrap());
    let (_, d) = get(&tg, "/v1/devices/d2", &tg.api_key).await;
    assert_eq!(d["acked_seq"], 1);
}

#[tokio::test]
async fn sse_and_websocket_sessions_replace_each_other() {
    let tg = TestGateway::start().await;
    let mut ws = connect(&tg, "u", "d3", None).await;
    let mut sse = Sse::open(&tg, "u", "d3", None, None).await;
    // The WebSocket session was replaced.
    assert!(ws.frame().await.is_none());
    publish(&tg, json!({"to": {"device": "d3"}, "data": {"via": "sse"}})).await;
    assert_eq!(sse.msg().await.1.data, json!({"via": "sse"}));
    ack_http(&tg, "u", "d3", 1).await;

    let mut ws = connect(&tg, "u", "d3", Some(1)).await;
    let rest = sse.rest().await;
    assert_eq!(
        rest.last().map(|e| e.event.as_str()),
        Some("close"),
        "{rest:?}"
    );
    let close: Value = serde_json::from_str(&rest.last().unwrap().data).unwrap();
    assert_eq!(close["reason"], "replaced by a newer session");
    publish(&tg, json!({"to": {"device": "d3"}, "data": {"via": "ws"}})).await;
    assert_eq!(ws.msg().await.data, json!({"via": "ws"}));
}

#[tokio::test]
async fn sse_clients_are_told_to_reconnect_on_shutdown() {
    let tg = TestGateway::start().await;
    let mut sse = Sse::open(&tg, "u", "d4", None, None).await;
    let stopping = tokio::spawn(tg.stop());
    let rest = sse.rest().await;
    let kinds: Vec<&str> = rest.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["reconnect", "close"], "{rest:?}");
    let close: Value = serde_json::from_str(&rest[1].data).unwrap();
    assert_eq!(close["code"], 1001);
    tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
}

#[tokio::test]
async fn sse_requests_are_checked_before_anything_is_stored() {
    let tg = TestGateway::start().await;
    let token = tg.mint_token("u", Duration::from_secs(600));
    let url = |q: &str| format!("{}/v1/connect/sse?{q}", tg.base_url);

    let resp = http()
        .get(url("device_id=d5"))
        .bearer_auth(&token)
        .header("Accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 406);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_acceptable");

    let resp = http()
        .get(url("device_id=d5"))
        .bearer_auth(&token)
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);

    let resp = http().get(url("device_id=d5")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);

    let resp = http()
        .get(url("device_id=not%20valid"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    // None of the refusals created the device.
    let (status, _) = get(&tg, "/v1/devices/d5", &tg.api_key).await;
    assert_eq!(status, 404);

    // EventSource cannot set headers: the token may come as `access_token`.
    let mut resp = http()
        .get(url(&format!("device_id=d5&access_token={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let first = tokio::time::timeout(WAIT, resp.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.starts_with(b"event: welcome\n"), "{first:?}");
}

async fn sync(tg: &TestGateway, user: &str, query: &str) -> (u16, Value) {
    let token = tg.mint_token(user, Duration::from_secs(600));
    get(tg, &format!("/v1/me/sync?{query}"), &token).await
}

#[tokio::test]
async fn long_poll_answers_at_once_when_entries_wait() {
    let tg = TestGateway::start().await;
    register(&tg, "u", "p1", None).await;
    publish(&tg, json!({"to": {"device": "p1"}, "data": {"n": 1}})).await;
    let started = Instant::now();
    let (status, v) = sync(&tg, "u", "device_id=p1&after=0&wait=30").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["messages"][0]["seq"], 1);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn long_poll_holds_until_a_message_arrives_and_counts_as_online() {
    let tg = TestGateway::start().await;
    register(&tg, "u", "p2", None).await;
    let held = {
        let token = tg.mint_token("u", Duration::from_secs(600));
        let url = format!("{}/v1/me/sync?device_id=p2&after=0&wait=30", tg.base_url);
        tokio::spawn(async move {
            let resp = http().get(url).bearer_auth(token).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        })
    };
    eventually("online while held", || async {
        let (_, d) = get(&tg, "/v1/devices/p2", &tg.api_key).await;
        (d["online"] == true).then_some(())
    })
    .await;
    let r = publish(&tg, json!({"to": {"device": "p2"}, "data": {"n": 1}})).await;
    let (status, v) = tokio::time::timeout(WAIT, held).await.unwrap().unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["messages"].as_array().unwrap().len(), 1);
    assert_eq!(v["messages"][0]["data"], json!({"n": 1}));
    assert_eq!(v["last_seq"], 1);
    // What the held request returned counts as sent, and the device is offline again.
    let id = r["message_id"].as_str().unwrap().to_owned();
    eventually("sent state", || async {
        let (_, m) = get(&tg, &format!("/v1/messages/{id}"), &tg.api_key).await;
        (m["deliveries"][0]["state"] == "sent").then_some(())
    })
    .await;
    let (_, d) = get(&tg, "/v1/devices/p2", &tg.api_key).await;
    assert_eq!(d["online"], false);
}

#[tokio::test]
async fn long_poll_answers_empty_after_its_wait_and_bounds_it() {
    let tg = TestGateway::start().await;
    register(&tg, "u", "p3", None).await;
    let started = Instant::now();
    let (status, v) = sync(&tg, "u", "device_id=p3&after=0&wait=1").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["messages"], json!([]));
    assert!(started.elapsed() >= Duration::from_secs(1));

    let (status, v) = sync(&tg, "u", "device_id=p3&after=0&wait=61").await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"]["code"], "invalid_field");
}

/// A held long-poll answers (empty) as soon as the gateway starts to shut down, not
/// when its wait or the drain runs out.
#[tokio::test]
async fn a_held_long_poll_answers_at_once_on_shutdown() {
    let tg = TestGateway::start_with(|c| c.limits.shutdown_drain_ms = 30_000).await;
    register(&tg, "u", "p5", None).await;
    let token = tg.mint_token("u", Duration::from_secs(600));
    let url = format!("{}/v1/me/sync?device_id=p5&after=0&wait=30", tg.base_url);
    let poll = tokio::spawn(async move {
        let resp = http().get(url).bearer_auth(token).send().await.unwrap();
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
    });
    eventually("the long-poll held (device online)", || async {
        let (_, d) = get(&tg, "/v1/devices/p5", &tg.api_key).await;
        (d["online"] == true).then_some(())
    })
    .await;
    let started = Instant::now();
    let stopping = tokio::spawn(tg.stop());
    let (status, v) = tokio::time::timeout(WAIT, poll).await.unwrap().unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["messages"], json!([]));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_long_poll_is_replaced_by_a_websocket_session() {
    let tg = TestGateway::start().await;
    register(&tg, "u", "p4", None).await;
    let held = {
        let token = tg.mint_token("u", Duration::from_secs(600));
        let url = format!("{}/v1/me/sync?device_id=p4&after=0&wait=30", tg.base_url);
        tokio::spawn(async move {
            let resp = http().get(url).bearer_auth(token).send().await.unwrap();
            resp.json::<Value>().await.unwrap()
        })
    };
    eventually("online while held", || async {
        let (_, d) = get(&tg, "/v1/devices/p4", &tg.api_key).await;
        (d["online"] == true).then_some(())
    })
    .await;
    let started = Instant::now();
    let mut ws = connect(&tg, "u", "p4", None).await;
    let v = tokio::time::timeout(WAIT, held).await.unwrap().unwrap();
    assert_eq!(v["messages"], json!([]));
    assert!(started.elapsed() < Duration::from_secs(10));
    publish(&tg, json!({"to": {"device": "p4"}, "data": {"n": 1}})).await;
    assert_eq!(ws.msg().await.seq, 1);
}

#[tokio::test]
async fn a_long_poll_acks_its_cursor_and_an_unacked_entry_falls_back_to_push() {
    let tg = TestGateway::start_with(|c| c.delivery.ack_timeout_ms = 400).await;
    register(&tg, "u", "p5", Some(("fcm", "fcm-token-poll"))).await;
    let hold = |after: i64| {
        let token = tg.mint_token("u", Duration::from_secs(600));
        let url = format!(
            "{}/v1/me/sync?device_id=p5&after={after}&wait=30",
            tg.base_url
        );
        tokio::spawn(async move {
            let resp = http().get(url).bearer_auth(token).send().await.unwrap();
            resp.json::<Value>().await.unwrap()
        })
    };
    let online = || async {
        let (_, d) = get(&tg, "/v1/devices/p5", &tg.api_key).await;
        (d["online"] == true).then_some(())
    };

    // Polled and then acknowledged by the next poll's cursor: never pushed.
    let held = hold(0);
    eventually("online while held", online).await;
    publish(&tg, json!({"to": {"device": "p5"}, "data": {"n": 1}})).await;
    let v = tokio::time::timeout(WAIT, held).await.unwrap().unwrap();
    assert_eq!(v["messages"][0]["seq"], 1);
    let next = hold(1);
    eventually("acked by the cursor", || async {
        let (_, d) = get(&tg, "/v1/devices/p5", &tg.api_key).await;
        (d["acked_seq"] == 1).then_some(())
    })
    .await;

    // Polled, and the device then went quiet: pushed once after the ack timeout.
    let r = publish(&tg, json!({"to": {"device": "p5"}, "data": {"n": 2}})).await;
    let v = tokio::time::timeout(WAIT, next).await.unwrap().unwrap();
    assert_eq!(v["messages"][0]["seq"], 2);
    let sent = eventually("push", || async {
        let s = tg.fcm.sent();
        (!s.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].seq, 2);
    assert_eq!(sent[0].message_id, r["message_id"].as_str().unwrap());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        tg.fcm.sent().len(),
        1,
        "seq 1 was acked and seq 2 pushed once"
    );
}
