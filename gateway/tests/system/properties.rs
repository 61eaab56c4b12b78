//! Property tests of the hostile-input edges (#13): generated client frames, publish
//! bodies, query strings and device tokens, sent to the real gateway over real
//! sockets. Whatever arrives: no panic, no 5xx, and a rejected request writes nothing.
//! Each property runs a fixed number of cases, so CI spends seconds here; a failure
//! prints the minimal input proptest shrank it to.

use crate::common;

use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use herald_gateway::testing::{http_request, TestGateway};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::Message;

use common::{connect, get, register};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(RunnerConfig {
        cases,
        // Shrinking re-runs a failing case against the gateway, each failure possibly
        // waiting out a timeout; bound it so a failure is reported in about a minute.
        max_shrink_iters: 16,
        failure_persistence: None,
        ..RunnerConfig::default()
    })
}

/// Field names the gateway knows, so generated bodies reach past the first check.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "to", "user", "device", "topic", "data", "ttl_seconds", "push", "priority",
            "collapse_key", "notification", "title", "body", "sound", "idempotency_key",
            "push_content", "type", "seq", "messages",
        ])
        .prop_map(str::to_owned),
        1 => "[a-z_]{1,8}",
        1 => "\\PC{0,6}",
    ]
}

/// Strings that are ids, nearly ids, or hostile.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => "[A-Za-z0-9._:@-]{1,12}",
        1 => Just("prop-user".to_owned()),
        1 => Just("x".repeat(129)),
        1 => "\\PC{0,16}",
        1 => prop::sample::select(vec!["", " ", "a b", "\u{0}", "é", "../x", "%ff", "always", "never", "fallback", "high"])
            .prop_map(str::to_owned),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop_oneof![Just(0.5f64), Just(-1e300), Just(1e308)].prop_map(Value::from),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A publish body: often nearly valid (a real target, some known options), sometimes
/// anything at all.
fn publish_body() -> impl Strategy<Value = Value> {
    let to = prop_oneof![
        2 => Just(json!({"user": "prop-user"})),
        1 => Just(json!({"device": "prop-dev"})),
        1 => text().prop_map(|u| json!({"user": u})),
        1 => json_value(),
    ];
    let extras = prop::collection::btree_map(key(), json_value(), 0..3);
    prop_oneof![
        4 => (to, json_value(), extras).prop_map(|(to, data, extras)| {
            let mut body = Map::new();
            body.insert("to".into(), to);
            body.insert("data".into(), data);
            for (k, v) in extras {
                body.insert(k, v);
            }
            Value::Object(body)
        }),
        1 => json_value(),
    ]
}

/// What the device's inbox holds, as the backend sees it.
async fn last_seq(tg: &TestGateway) -> i64 {
    let (status, d) = get(tg, "/v1/devices/prop-dev", &tg.api_key).await;
    assert_eq!(status, 200, "{d}");
    d["last_seq"].as_i64().expect("last_seq")
}

#[test]
fn generated_publish_bodies_never_fail_the_server_and_rejections_write_nothing() {
    let rt = runtime();
    let tg = rt.block_on(async {
        let tg = TestGateway::start_with(|c| {
            c.limits.publish_rate_per_key = 1_000_000;
            c.limits.publish_burst_per_key = 1_000_000;
        })
        .await;
        register(&tg, "prop-user", "prop-dev", None).await;
        tg
    });
    let url = format!("{}/v1/messages", tg.base_url);
    runner(160)
        .run(&publish_body(), |body| {
            rt.block_on(async {
                let before = last_seq(&tg).await;
                let (status, answer) =
                    http_request("POST", &url, &tg.api_key, Some(&body.to_string())).await;
                let after = last_seq(&tg).await;
                prop_assert!(status < 500, "{status} {answer} for {body}");
                if status == 202 {
                    let v: Value = serde_json::from_str(&answer).unwrap();
                    let reached = v["recipients"].as_i64().unwrap();
                    prop_assert!(after - before <= reached, "{answer}");
                } else {
                    prop_assert!(
                        [400, 404, 413, 422].contains(&status),
                        "{status} {answer} for {body}"
                    );
                    prop_assert_eq!(after, before, "a {} wrote to the inbox: {}", status, body);
                }
                Ok::<(), TestCaseError>(())
            })
        })
        .unwrap();
    rt.block_on(tg.stop());
}

#[test]
fn generated_bytes_as_a_publish_body_are_400_and_write_nothing() {
    let rt = runtime();
    let tg = rt.block_on(async {
        let tg = TestGateway::start().await;
        register(&tg, "prop-user", "prop-dev", None).await;
        tg
    });
    let url = format!("{}/v1/messages", tg.base_url);
    // Mostly JSON-shaped text with a defect; UTF-8 only, as the test client sends text.
    let body = prop_oneof![
        "[{}\\[\\]\",:0-9a-z\\\\ ]{0,40}",
        "\\PC{0,40}",
        Just(r#"{"to":{"user":"prop-user"},"to":{"user":"mallory"},"data":{}}"#.to_owned()),
        Just(r#"{"to":{"user":"prop-user"},"data":{}"#.to_owned()),
        Just(r#"[{"to":{"user":"prop-user"},"data":{}}]"#.to_owned()),
    ];
    runner(120)
        .run(&body, |body| {
            rt.block_on(async {
                let before = last_seq(&tg).await;
                let (status, answer) = http_request("POST", &url, &tg.api_key, Some(&body)).await;
                prop_assert!(status < 500, "{status} {answer} for {body:?}");
                if status != 202 {
                    prop_assert_eq!(last_seq(&tg).await, before, "{} wrote: {:?}", status, body);
                    // Every error is the documented JSON shape.
                    let v: Value = serde_json::from_str(&answer)
                        .map_err(|e| TestCaseError::fail(format!("{e}: {answer}")))?;
                    prop_assert!(v["error"]["code"].is_string(), "{answer}");
                }
                Ok::<(), TestCaseError>(())
            })
        })
        .unwrap();
    rt.block_on(tg.stop());
}

/// A generated client frame: a known type with generated fields, or any text.
fn client_frame() -> impl Strategy<Value = String> {
    let typed = (
        prop::sample::select(vec![
            "ack",
            "ping",
            "subscribe",
            "unsubscribe",
            "msg",
            "hello",
        ]),
        prop::collection::btree_map(key(), json_value(), 0..3),
        prop_oneof![
            any::<i64>().prop_map(Value::from),
            text().prop_map(Value::from)
        ],
    )
        .prop_map(|(t, fields, v)| {
            let mut frame = Map::new();
            frame.insert("type".into(), Value::from(t));
            match t {
                "ack" => frame.insert("seq".into(), v),
                _ => frame.insert("topic".into(), v),
            };
            for (k, v) in fields {
                frame.insert(k, v);
            }
            Value::Object(frame).to_string()
        });
    prop_oneof![4 => typed, 1 => "\\PC{0,30}", 1 => json_value().prop_map(|v| v.to_string())]
}

#[test]
fn generated_client_frames_get_an_answer_or_a_documented_close() {
    let rt = runtime();
    let tg = rt.block_on(TestGateway::start());
    // TestRunner takes an `Fn`: the session it replaces after a close lives in a cell.
    let dev = std::cell::RefCell::new(rt.block_on(connect(&tg, "frames", "frames-dev", None)));
    runner(200)
        .run(&client_frame(), |text| {
            let mut dev = dev.borrow_mut();
            rt.block_on(async {
                dev.ws.send(Message::Text(text.clone().into())).await.ok();
                dev.ws
                    .send(Message::Text(r#"{"type":"ping"}"#.into()))
                    .await
                    .ok();
                // The session answers our ping (after any error or subscription answer
                // to the generated frame), or closes with a documented code.
                loop {
                    let next = tokio::time::timeout(Duration::from_secs(3), dev.ws.next())
                        .await
                        .map_err(|_| TestCaseError::fail(format!("no answer after {text}")))?;
                    match next {
                        Some(Ok(Message::Text(t))) => {
                            let v: Value = serde_json::from_str(t.as_str()).unwrap();
                            if v["type"] == "pong" {
                                return Ok(());
                            }
                            prop_assert!(v["type"] != "msg", "{t}");
                        }
                        Some(Ok(Message::Close(Some(close)))) => {
                            let code = u16::from(close.code);
                            prop_assert!(
                                [1002, 1008, 1009].contains(&code),
                                "close {code} after {text}"
                            );
                            break;
                        }
                        Some(Ok(_)) => {}
                        other => {
                            return Err(TestCaseError::fail(format!(
                                "connection dropped without a close frame after {text}: {other:?}"
                            )))
                        }
                    }
                }
                // Closed as documented: carry on with a fresh session.
                *dev = connect(&tg, "frames", "frames-dev", None).await;
                Ok(())
            })
        })
        .unwrap();
    rt.block_on(async {
        let (status, d) = get(&tg, "/v1/devices/frames-dev", &tg.api_key).await;
        assert_eq!(status, 200);
        // Nothing was delivered, so no generated ack may have moved the cursor.
        assert_eq!(d["acked_seq"], 0, "{d}");
        tg.stop().await;
    });
}

/// Query strings as an attacker writes them: known keys, any values, broken escapes.
fn query() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        "[A-Za-z0-9._-]{0,10}",
        "-?[0-9]{1,25}",
        Just("%".to_owned()),
        Just("%a\u{e9}".to_owned()),
        Just("%ff%fe".to_owned()),
        Just("%c3%28".to_owned()),
        Just("%00".to_owned()),
        "[%&=+;a-f0-9]{0,12}",
    ];
    let pair = (
        prop::sample::select(vec![
            "device_id",
            "after",
            "limit",
            "wait",
            "access_token",
            "x",
            "",
        ]),
        value,
    )
        .prop_map(|(k, v)| format!("{k}={v}"));
    prop::collection::vec(pair, 0..5).prop_map(|pairs| pairs.join("&"))
}

#[test]
fn generated_query_strings_and_tokens_never_fail_the_server() {
    let rt = runtime();
    let tg = rt.block_on(TestGateway::start());
    let token = tg.mint_device_token("q-user", "q-dev", &["*"], Duration::from_secs(600));
    let routes = ["/v1/me/sync", "/v1/connect", "/v1/connect/sse"];
    runner(150)
        .run(
            &(prop::sample::select(routes.to_vec()), query()),
            |(route, q)| {
                rt.block_on(async {
                    let url = format!("{}{route}?{q}", tg.base_url);
                    let (status, answer) = http_request("GET", &url, &token, None).await;
                    prop_assert!(status < 500, "{status} {answer} for {route}?{q}");
                    Ok::<(), TestCaseError>(())
                })
            },
        )
        .unwrap();

    // Tokens: the valid one with a generated defect (a byte changed, a part dropped or
    // swapped, a forged header), or text that is not a token at all.
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let forged_header = prop::sample::select(vec![
        r#"{"alg":"none","typ":"JWT"}"#,
        r#"{"alg":"RS256","typ":"JWT"}"#,
        r#"{"alg":"HS512"}"#,
        r#"{"alg":"HS256","kid":"../../x"}"#,
        r#"{}"#,
    ])
    .prop_map(move |h| b64.encode(h));
    let defect = prop_oneof![
        (0..token.len(), any::<u8>()).prop_map({
            let token = token.clone();
            move |(i, b)| {
                let mut bytes = token.clone().into_bytes();
                bytes[i] = b'!' + b % 90;
                String::from_utf8_lossy(&bytes).into_owned()
            }
        }),
        (0..token.len()).prop_map({
            let token = token.clone();
            move |n| token[..n].to_owned()
        }),
        forged_header.prop_map({
            let parts = parts.clone();
            move |h| format!("{h}.{}.{}", parts[1], parts[2])
        }),
        Just(format!("{}.{}.{}", parts[1], parts[0], parts[2])),
        Just(format!("{}.{}.", parts[0], parts[1])),
        "[A-Za-z0-9._~+/=-]{0,60}",
    ];
    runner(150)
        .run(&defect, |bad| {
            rt.block_on(async {
                let url = format!("{}/v1/me/sync?device_id=q-dev", tg.base_url);
                let (status, answer) = http_request("GET", &url, &bad, None).await;
                prop_assert!(status < 500, "{status} {answer} for token {bad:?}");
                if bad != token {
                    prop_assert_eq!(status, 401, "{} for token {:?}", answer, bad);
                }
                Ok::<(), TestCaseError>(())
            })
        })
        .unwrap();
    rt.block_on(tg.stop());
}
