//! Auth failures and bad input: a clear JSON error with the right status, and nothing
//! changed.

use crate::common;

use std::time::Duration;

use common::*;
use herald_gateway::testing::TestGateway;
use serde_json::{json, Value};

async fn raw_post(
    tg: &TestGateway,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = http()
        .post(format!("{}{path}", tg.base_url))
        .header("Content-Type", "application/json")
        .body(body.to_owned());
    if let Some(a) = auth {
        req = req.bearer_auth(a);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, resp.json().await.unwrap_or(Value::Null), headers)
}

fn code(v: &Value) -> &str {
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {v}"))
}

fn forge(claims: Value, alg: jsonwebtoken::Algorithm, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[tokio::test]
async fn service_routes_demand_a_valid_api_key() {
    let tg = TestGateway::start().await;
    let body = r#"{"to":{"user":"u"},"data":{}}"#;
    let (s, v, h) = raw_post(&tg, "/v1/messages", None, body).await;
    assert_eq!((s, code(&v)), (401, "unauthorized"));
    assert_eq!(h.get("www-authenticate").unwrap(), "Bearer");
    let (s, v, _) = raw_post(&tg, "/v1/messages", Some("hk_0000"), body).await;
    assert_eq!((s, code(&v)), (401, "unauthorized"));
    let device_token = tg.mint_token("u", Duration::from_secs(60));
    let (s, v, _) = raw_post(&tg, "/v1/messages", Some(&device_token), body).await;
    assert_eq!((s, code(&v)), (403, "forbidden"));
    let (s, v) = get(&tg, "/v1/devices/x", "nope").await;
    assert_eq!((s, code(&v)), (401, "unauthorized"));
}

#[tokio::test]
async fn device_routes_demand_a_valid_pinned_jwt() {
    let tg = TestGateway::start().await;
    let secret = tg
        .state
        .store
        .setting("device_token_secret")
        .await
        .unwrap()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let good = json!({"sub": "u", "exp": now + 60, "iss": "herald", "aud": "herald-device"});
    let cases = [
        (
            "expired",
            forge(
                json!({"sub": "u", "exp": now - 120, "iss": "herald", "aud": "herald-device"}),
                jsonwebtoken::Algorithm::HS256,
                secret.as_bytes(),
            ),
        ),
        (
            "wrong issuer",
            forge(
                json!({"sub": "u", "exp": now + 60, "iss": "evil", "aud": "herald-device"}),
                jsonwebtoken::Algorithm::HS256,
                secret.as_bytes(),
            ),
        ),
        (
            "wrong audience",
            forge(
                json!({"sub": "u", "exp": now + 60, "iss": "herald", "aud": "other"}),
                jsonwebtoken::Algorithm::HS256,
                secret.as_bytes(),
            ),
        ),
        (
            "other algorithm",
            forge(
                good.clone(),
                jsonwebtoken::Algorithm::HS512,
                secret.as_bytes(),
            ),
        ),
        (
            "wrong secret",
            forge(
                good.clone(),
                jsonwebtoken::Algorithm::HS256,
                b"not-the-secret-not-the-secret-xx",
            ),
        ),
        ("alg none", {
            use base64::Engine;
            let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            format!(
                "{}.{}.",
                e.encode(r#"{"alg":"none","typ":"JWT"}"#),
                e.encode(good.to_string())
            )
        }),
        ("garbage", "not-a-jwt".to_owned()),
    ];
    for (what, token) in cases {
        let (s, v) = get(&tg, "/v1/me/sync?device_id=d&after=0", &token).await;
        assert_eq!((s, code(&v)), (401, "unauthorized"), "{what}: {v}");
        let err = connect_with_token(&tg.ws_url("d", None), &token)
            .await
            .err()
            .unwrap();
        assert!(err.starts_with("HTTP 401"), "{what}: {err}");
    }
    let forged_ok = forge(good, jsonwebtoken::Algorithm::HS256, secret.as_bytes());
    assert!(connect_with_token(&tg.ws_url("d", None), &forged_ok)
        .await
        .is_ok());
    // An API key is not a device credential.
    let (s, v) = get(&tg, "/v1/me/sync?device_id=d&after=0", &tg.api_key).await;
    assert_eq!((s, code(&v)), (403, "forbidden"));
    // The token may come as a query parameter on connect.
    let token = tg.mint_token("u", Duration::from_secs(60));
    let url = format!("{}&access_token={token}", tg.ws_url("d", None));
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    drop(ws);
}

#[tokio::test]
async fn a_device_id_cannot_be_taken_over_by_another_user() {
    let tg = TestGateway::start().await;
    register(&tg, "owner", "shared-id", Some(("fcm", "owner-token"))).await;
    let thief = tg.mint_token("thief", Duration::from_secs(60));
    let err = connect_with_token(&tg.ws_url("shared-id", None), &thief)
        .await
        .err()
        .unwrap();
    assert!(err.starts_with("HTTP 403"), "{err}");
    let resp = http()
        .put(format!("{}/v1/me/devices/shared-id", tg.base_url))
        .bearer_auth(&thief)
        .json(&json!({"platform": "ios", "push_provider": "apns", "push_token": "thief-token"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let (_, d) = get(&tg, "/v1/devices/shared-id", &tg.api_key).await;
    assert_eq!(d["user"], "owner");
    assert_eq!(d["push_provider"], "fcm");
}

#[tokio::test]
async fn bad_input_gets_a_precise_error_and_changes_nothing() {
    let tg = TestGateway::start_with(|c| c.limits.max_message_bytes = 2048).await;
    register(&tg, "u", "d", None).await;
    let key = tg.api_key.clone();
    let cases: Vec<(&str, String, u16, &str, &str)> = vec![
        ("malformed", "{\"to\":".into(), 400, "malformed", ""),
        ("not json", "hello".into(), 400, "malformed", ""),
        (
            "unknown field",
            r#"{"to":{"device":"d"},"data":{},"colour":1}"#.into(),
            422,
            "invalid_field",
            "colour",
        ),
        (
            "wrong type",
            r#"{"to":{"device":"d"},"data":{},"ttl_seconds":"soon"}"#.into(),
            422,
            "invalid_field",
            "ttl_seconds",
        ),
        (
            "bad enum",
            r#"{"to":{"device":"d"},"data":{},"push":"sometimes"}"#.into(),
            422,
            "invalid_field",
            "push",
        ),
        (
            "two targets",
            r#"{"to":{"device":"d","user":"u"},"data":{}}"#.into(),
            422,
            "invalid_field",
            "to: has both `device` and `user`; expected an object with exactly one of `user`, `device`, `topic`",
        ),
        (
            "empty target",
            r#"{"to":{},"data":{}}"#.into(),
            422,
            "invalid_field",
            "to: empty; expected an object with exactly one of",
        ),
        (
            "null target",
            r#"{"to":null,"data":{}}"#.into(),
            422,
            "invalid_field",
            "to: invalid type: null, expected an object with exactly one of",
        ),
        (
            "target as a string",
            r#"{"to":"u","data":{}}"#.into(),
            422,
            "invalid_field",
            r#"to: invalid type: string "u", expected an object with exactly one of"#,
        ),
        (
            "unknown target kind",
            r#"{"to":{"group":"g"},"data":{}}"#.into(),
            422,
            "invalid_field",
            "to: unknown variant `group`, expected one of `user`, `device`, `topic`",
        ),
        (
            "target id not a string",
            r#"{"to":{"user":5},"data":{}}"#.into(),
            422,
            "invalid_field",
            "to.user: invalid type: integer `5`, expected a string",
        ),
        (
            "missing target",
            r#"{"data":{}}"#.into(),
            422,
            "invalid_field",
            "to",
        ),
        (
            "data not object",
            r#"{"to":{"device":"d"},"data":[1]}"#.into(),
            422,
            "invalid_field",
            "data",
        ),
        (
            "ttl zero",
            r#"{"to":{"device":"d"},"data":{},"ttl_seconds":0}"#.into(),
            422,
            "invalid_field",
            "ttl_seconds",
        ),
        (
            "ttl too long",
            r#"{"to":{"device":"d"},"data":{},"ttl_seconds":99999999}"#.into(),
            422,
            "invalid_field",
            "ttl_seconds",
        ),
        (
            "negative ttl",
            r#"{"to":{"device":"d"},"data":{},"ttl_seconds":-1}"#.into(),
            422,
            "invalid_field",
            "ttl_seconds",
        ),
        (
            "bad id",
            r#"{"to":{"device":"d d"},"data":{}}"#.into(),
            422,
            "invalid_field",
            "to.device",
        ),
        (
            "empty id",
            r#"{"to":{"user":""},"data":{}}"#.into(),
            422,
            "invalid_field",
            "to.user",
        ),
        (
            "long collapse key",
            format!(
                r#"{{"to":{{"device":"d"}},"data":{{}},"collapse_key":"{}"}}"#,
                "c".repeat(65)
            ),
            422,
            "invalid_field",
            "collapse_key",
        ),
        (
            "too large",
            format!(
                r#"{{"to":{{"device":"d"}},"data":{{"pad":"{}"}}}}"#,
                "x".repeat(4096)
            ),
            413,
            "too_large",
            "",
        ),
        (
            "unknown device",
            r#"{"to":{"device":"ghost"},"data":{}}"#.into(),
            404,
            "not_found",
            "ghost",
        ),
    ];
    for (what, body, status, want_code, mention) in cases {
        let (s, v, _) = raw_post(&tg, "/v1/messages", Some(&key), &body).await;
        assert_eq!(s, status, "{what}: {v}");
        assert_eq!(code(&v), want_code, "{what}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(mention),
            "{what}: {v}"
        );
    }
    // Wrong content type.
    let resp = http()
        .post(format!("{}/v1/messages", tg.base_url))
        .bearer_auth(&key)
        .body(r#"{"to":{"device":"d"},"data":{}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    // Bad query parameters and registrations.
    let token = tg.mint_token("u", Duration::from_secs(60));
    let (s, v) = get(&tg, "/v1/me/sync?device_id=d&after=abc", &token).await;
    assert_eq!((s, code(&v)), (422, "invalid_field"), "{v}");
    let (s, v) = get(&tg, "/v1/me/sync?device_id=d&limit=0", &token).await;
    assert_eq!((s, code(&v)), (422, "invalid_field"), "{v}");
    let (s, v) = get(&tg, "/v1/me/sync?device_id=nope", &token).await;
    assert_eq!((s, code(&v)), (404, "not_found"), "{v}");
    let resp = http()
        .put(format!("{}/v1/me/devices/d", tg.base_url))
        .bearer_auth(&token)
        .json(&json!({"platform": "ios", "push_token": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let resp = http()
        .put(format!("{}/v1/me/devices/d", tg.base_url))
        .bearer_auth(&token)
        .json(&json!({"platform": "windows-phone"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let (s, v) = post(
        &tg,
        "/v1/tokens",
        &key,
        json!({"user": "u", "ttl_seconds": 0}),
    )
    .await;
    assert_eq!((s, code(&v)), (422, "invalid_field"));
    let (s, v) = get(&tg, "/v1/messages/msg_nope", &key).await;
    assert_eq!((s, code(&v)), (404, "not_found"));
    let resp = http()
        .delete(format!("{}/v1/messages/x", tg.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);

    // Nothing of the above reached an inbox.
    let (_, d) = get(&tg, "/v1/devices/d", &key).await;
    assert_eq!(d["last_seq"], 0);
    assert_eq!(d["platform"], "android");
}

#[tokio::test]
async fn hostile_bodies_never_get_a_server_error() {
    let tg = TestGateway::start().await;
    register(&tg, "u", "d", None).await;
    let fragments = [
        "{",
        "}",
        "[",
        "]",
        "\"to\"",
        ":",
        ",",
        "{\"device\":\"d\"}",
        "\"data\"",
        "null",
        "1e999",
        "\"\\u0000\"",
        "-1",
        "true",
        "\"push\"",
        "\"always\"",
        "{}",
        "\"ttl_seconds\"",
        "18446744073709551616",
        "\"notification\"",
        "\"\u{1F600}\"",
    ];
    let mut seed: u64 = 0x9E3779B97F4A7C15;
    for _ in 0..300 {
        let mut body = String::new();
        for _ in 0..(seed % 12 + 1) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            body.push_str(fragments[(seed % fragments.len() as u64) as usize]);
        }
        let (s, v, _) = raw_post(&tg, "/v1/messages", Some(&tg.api_key), &body).await;
        assert!(s < 500, "{body} → {s} {v}");
        if s != 202 {
            assert!(v["error"]["code"].is_string(), "{body} → {v}");
        }
    }
}

#[tokio::test]
async fn publish_rate_limit_answers_429_with_retry_after() {
    let tg = TestGateway::start_with(|c| {
        c.limits.publish_rate_per_key = 1;
        c.limits.publish_burst_per_key = 3;
    })
    .await;
    register(&tg, "u", "d", None).await;
    let body = r#"{"to":{"device":"d"},"data":{},"push":"never"}"#;
    for _ in 0..3 {
        let (s, _, _) = raw_post(&tg, "/v1/messages", Some(&tg.api_key), body).await;
        assert_eq!(s, 202);
    }
    let (s, v, h) = raw_post(&tg, "/v1/messages", Some(&tg.api_key), body).await;
    assert_eq!((s, code(&v)), (429, "rate_limited"));
    assert!(
        h.get("retry-after")
            .unwrap()
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    let (_, d) = get(&tg, "/v1/devices/d", &tg.api_key).await;
    assert_eq!(d["last_seq"], 3);
}

#[tokio::test]
async fn health_and_readiness() {
    let tg = TestGateway::start().await;
    let r = http()
        .get(format!("{}/healthz", tg.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = http()
        .get(format!("{}/readyz", tg.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

/// Sends `head` (request line and headers, raw bytes) and returns (status, body).
async fn raw_request(tg: &TestGateway, head: &[u8]) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(tg.base_url.trim_start_matches("http://"))
        .await
        .unwrap();
    s.write_all(head).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("gateway answered")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_request_past_its_deadline_is_a_json_408_and_stores_nothing() {
    let tg = TestGateway::start_with(|c| c.limits.request_timeout_ms = 300).await;
    register(&tg, "u", "d", None).await;
    let body = r#"{"to":{"device":"d"},"data":{"n":1}}"#;
    // The headers and a third of the body, then nothing more.
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: herald\r\nConnection: close\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{}",
        tg.api_key,
        body.len(),
        &body[..body.len() / 3]
    );
    let started = std::time::Instant::now();
    let (s, v) = raw_request(&tg, head.as_bytes()).await;
    assert_eq!((s, code(&v)), (408, "timeout"), "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("300 ms") && message.contains("idempotency_key"),
        "{v}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    let (_, d) = get(&tg, "/v1/devices/d", &tg.api_key).await;
    assert_eq!(d["last_seq"], 0, "{d}");
}

#[tokio::test]
async fn a_percent_before_a_multibyte_character_is_not_a_panic() {
    let tg = TestGateway::start().await;
    let mut head = b"GET /v1/connect?device_id=d&access_token=%a".to_vec();
    head.extend_from_slice("é".as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let (s, v) = raw_request(&tg, &head).await;
    assert_eq!((s, code(&v)), (401, "unauthorized"), "{v}");
}

#[tokio::test]
async fn invalid_utf8_in_a_path_segment_is_a_json_error() {
    let tg = TestGateway::start().await;
    for path in [
        "/v1/messages/%ff",
        "/v1/devices/%ff",
        "/v1/users/%c3%28/devices",
    ] {
        let (s, v) = get(&tg, path, &tg.api_key).await;
        assert_eq!((s, code(&v)), (422, "invalid_field"), "{path}: {v}");
    }
    let token = tg.mint_token("u", Duration::from_secs(60));
    let resp = http()
        .put(format!("{}/v1/me/devices/%ff", tg.base_url))
        .bearer_auth(token)
        .json(&json!({"platform": "android"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(code(&v), "invalid_field", "{v}");
}

#[tokio::test]
async fn jwt_nbf_sub_aud_and_lifetime_are_checked() {
    const SECRET: &str = "0123456789abcdef0123456789abcdef-hardening";
    let tg = TestGateway::start_with(|c| {
        c.auth.jwt_secret = Some(SECRET.into());
        c.auth.max_token_ttl_seconds = 3600;
    })
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = |sub: &str, extra: Value| {
        let mut c = json!({"sub": sub, "exp": now + 600, "iss": "herald", "aud": "herald-device"});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        forge(c, jsonwebtoken::Algorithm::HS256, SECRET.as_bytes())
    };
    let register_with = |token: String| {
        let url = format!("{}/v1/me/devices/jwt-dev", tg.base_url);
        async move {
            let resp = http()
                .put(url)
                .bearer_auth(token)
                .json(&json!({"platform": "android"}))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let refused = [
        ("nbf in an hour", claims("u", json!({"nbf": now + 3600}))),
        ("sub with a space", claims("a b", json!({}))),
        ("sub with a quote", claims("x' OR '1'='1", json!({}))),
        ("sub with NUL", claims("a\0b", json!({}))),
        ("sub not ASCII", claims("é", json!({}))),
        (
            "valid until 2900",
            claims("u", json!({"exp": 29_000_000_000u64})),
        ),
        (
            "past the lifetime cap",
            claims("u", json!({"exp": now + 3600 + 60})),
        ),
        (
            "aud array without ours",
            claims("u", json!({"aud": ["other", "another"]})),
        ),
    ];
    for (what, token) in refused {
        let (s, v) = register_with(token).await;
        assert_eq!((s, code(&v)), (401, "unauthorized"), "{what}: {v}");
    }
    // Nothing was registered by the refused tokens.
    let (s, _) = get(&tg, "/v1/devices/jwt-dev", &tg.api_key).await;
    assert_eq!(s, 404);

    let accepted = [
        ("plain", claims("u", json!({}))),
        ("nbf passed", claims("u", json!({"nbf": now - 10}))),
        (
            "aud array with ours (RFC 7519)",
            claims("u", json!({"aud": ["other", "herald-device"]})),
        ),
        (
            "at the lifetime cap",
            claims("u", json!({"exp": now + 3600})),
        ),
    ];
    for (what, token) in accepted {
        let (s, v) = register_with(token).await;
        assert_eq!(s, 200, "{what}: {v}");
    }
}

#[tokio::test]
async fn unsubscribe_validates_its_topic() {
    let tg = TestGateway::start().await;
    let mut dev = connect(&tg, "u", "d", None).await;
    dev.send(&herald_protocol::ClientFrame::Unsubscribe {
        topic: "a b".into(),
    })
    .await;
    match dev.frame().await {
        Some(herald_protocol::ServerFrame::Error { code, .. }) => assert_eq!(code, "invalid_topic"),
        other => panic!("expected invalid_topic, got {other:?}"),
    }
}

#[tokio::test]
async fn json_bodies_are_objects_of_a_json_media_type_without_duplicate_keys() {
    let tg = TestGateway::start().await;
    register(&tg, "u", "d", None).await;
    let send = |content_type: &'static str, body: &'static str| {
        let req = http()
            .post(format!("{}/v1/messages", tg.base_url))
            .bearer_auth(&tg.api_key)
            .header("Content-Type", content_type)
            .body(body);
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let ok = r#"{"to":{"device":"d"},"data":{}}"#;
    for ct in [
        "text/html+json",
        "application/jsonp",
        "application/json-seq",
        "text/plain",
    ] {
        let (s, v) = send(ct, ok).await;
        assert_eq!((s, code(&v)), (400, "malformed"), "{ct}: {v}");
    }
    let (s, v) = send("application/json", r#"[{"device":"d"},{}]"#).await;
    assert_eq!((s, code(&v)), (422, "invalid_field"), "array: {v}");
    let (s, v) = send(
        "application/json",
        r#"{"to":{"device":"d","device":"other"},"data":{}}"#,
    )
    .await;
    assert_eq!((s, code(&v)), (400, "malformed"), "duplicate key: {v}");
    let (s, v) = send(
        "application/json",
        r#"{"to":{"device":"other"},"to":{"device":"d"},"data":{}}"#,
    )
    .await;
    assert_eq!((s, code(&v)), (400, "malformed"), "duplicate key: {v}");
    // Nothing of the above reached the inbox.
    let (_, d) = get(&tg, "/v1/devices/d", &tg.api_key).await;
    assert_eq!(d["last_seq"], 0, "{d}");

    for ct in ["Application/JSON", "application/json; charset=UTF-8"] {
        let (s, v) = send(ct, ok).await;
        assert_eq!(s, 202, "{ct}: {v}");
    }
    let (_, d) = get(&tg, "/v1/devices/d", &tg.api_key).await;
    assert_eq!(d["last_seq"], 2, "{d}");
}
