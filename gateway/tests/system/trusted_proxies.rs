//! `server.trusted_proxies`, black box: the per-IP connect rate limit of a real gateway
//! sees the client behind a trusted proxy (`X-Forwarded-For`, `Forwarded`), and ignores
//! those headers from anyone else. Every request here comes from 127.0.0.1: the test
//! plays the proxy.

use crate::common;

use std::time::Duration;

use common::eventually_within;
use herald_gateway::proxy::TrustedProxies;
use herald_gateway::testing::TestGateway;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// One token a second, a burst of one: a second connect from the same IP is refused.
async fn gateway(trusted: &[&str]) -> TestGateway {
    let trusted = TrustedProxies::parse(trusted.iter().copied()).unwrap();
    TestGateway::start_with(move |c| {
        c.limits.connect_rate_per_ip = 1;
        c.limits.connect_burst_per_ip = 1;
        c.server.trusted_proxies = trusted;
    })
    .await
}

/// `GET /v1/connect/sse` with `headers`: the status, `Retry-After`, and the error
/// code. A session that opened (200) is closed again by dropping the response.
async fn sse(
    tg: &TestGateway,
    device: &str,
    headers: &[(&str, &str)],
) -> (u16, Option<String>, Value) {
    let token = tg.mint_device_token("u", device, &["*"], Duration::from_secs(600));
    let mut req = common::http()
        .get(format!("{}/v1/connect/sse?device_id={device}", tg.base_url))
        .bearer_auth(token)
        .header("accept", "text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = if status == 200 {
        // The stream stays open: read its first event (the welcome), then drop it.
        let mut resp = resp;
        let first = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
            .await
            .expect("first SSE event")
            .unwrap();
        assert!(first.is_some());
        Value::Null
    } else {
        resp.json().await.unwrap_or(Value::Null)
    };
    (status, retry, body)
}

fn xff(v: &str) -> [(&'static str, &str); 1] {
    [("x-forwarded-for", v)]
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_client_has_its_own_bucket() {
    let tg = gateway(&["127.0.0.0/8"]).await;
    // Two clients behind the proxy: one connect each passes...
    assert_eq!(sse(&tg, "a1", &xff("203.0.113.1")).await.0, 200);
    assert_eq!(sse(&tg, "b1", &xff("203.0.113.2")).await.0, 200);
    // ...and each one's second is refused, with the documented 429.
    let (s, retry, body) = sse(&tg, "a2", &xff("203.0.113.1")).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (429, Some("rate_limited")),
        "{body}"
    );
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(sse(&tg, "b2", &xff("203.0.113.2")).await.0, 429);
    // The rightmost address that is not a trusted proxy is the client: a forged
    // leftmost hop, or a second proxy in the chain, changes nothing.
    assert_eq!(
        sse(&tg, "a3", &xff("198.51.100.99, 203.0.113.1")).await.0,
        429
    );
    assert_eq!(sse(&tg, "a4", &xff("203.0.113.1, 127.0.0.2")).await.0, 429);
    assert_eq!(
        sse(&tg, "c1", &xff("203.0.113.1, 203.0.113.3")).await.0,
        200
    );
    // `Forwarded` (RFC 7239) when there is no X-Forwarded-For.
    let fwd = [("forwarded", "for=\"[2001:db8::5]:4711\";proto=https")];
    assert_eq!(sse(&tg, "d1", &fwd).await.0, 200);
    assert_eq!(sse(&tg, "d2", &fwd).await.0, 429);
    // Without a header the proxy itself is the client: one bucket for 127.0.0.1.
    assert_eq!(sse(&tg, "p1", &[]).await.0, 200);
    assert_eq!(sse(&tg, "p2", &[]).await.0, 429);

    // The WebSocket route uses the same address.
    let ws = |device: &'static str, ip: &'static str| {
        let url = tg.ws_url(device, None);
        let token = tg.mint_device_token("u", device, &["*"], Duration::from_secs(600));
        async move {
            let mut req = url.into_client_request().unwrap();
            let h = req.headers_mut();
            h.insert("authorization", format!("Bearer {token}").parse().unwrap());
            h.insert("sec-websocket-protocol", "herald.v1".parse().unwrap());
            h.insert("x-forwarded-for", ip.parse().unwrap());
            match tokio_tungstenite::connect_async(req).await {
                Ok((_ws, resp)) => resp.status().as_u16(),
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
                Err(e) => panic!("{e}"),
            }
        }
    };
    assert_eq!(ws("w1", "192.0.2.10").await, 101);
    assert_eq!(ws("w2", "192.0.2.11").await, 101);
    assert_eq!(ws("w3", "192.0.2.10").await, 429);
    tg.stop().await;
}

#[tokio::test]
async fn proxy_headers_from_an_untrusted_peer_are_ignored() {
    for trusted in [&[][..], &["10.0.0.0/8", "::1/128"][..]] {
        let tg = gateway(trusted).await;
        assert_eq!(sse(&tg, "a1", &xff("203.0.113.1")).await.0, 200);
        // A spoofed X-Forwarded-For (or Forwarded) does not buy a new bucket: the
        // peer, 127.0.0.1, is the client and its one token is spent.
        let (s, retry, body) = sse(&tg, "a2", &xff("203.0.113.2")).await;
        assert_eq!(
            (s, body["error"]["code"].as_str()),
            (429, Some("rate_limited")),
            "{trusted:?} {body}"
        );
        assert_eq!(retry.as_deref(), Some("1"));
        assert_eq!(
            sse(&tg, "a3", &[("forwarded", "for=203.0.113.3")]).await.0,
            429
        );
        assert_eq!(tg.state.connect_limiter.len(), 1, "one bucket, the peer's");
        tg.stop().await;
    }
}

#[tokio::test]
async fn many_client_addresses_do_not_grow_the_limiter_without_bound() {
    // One connect a second per IP, burst 1: a bucket is full again a second after its
    // connect, and the gateway forgets full buckets every second.
    let tg = TestGateway::start_with(|c| {
        c.limits.connect_rate_per_ip = 1;
        c.limits.connect_burst_per_ip = 1;
        c.server.trusted_proxies = TrustedProxies::parse(["127.0.0.1"]).unwrap();
    })
    .await;
    assert_eq!(
        tg.state.connect_limiter.cleanup_interval(),
        Duration::from_secs(1)
    );
    let token = tg.mint_token("u", Duration::from_secs(600));
    let client = common::http();
    for round in 0..2u32 {
        // 600 client addresses; a device id that is not valid stops each connect right
        // after the rate limit (422), so no session is opened.
        for i in 0..600u32 {
            let ip = format!("198.18.{}.{}", round * 3 + i / 250, i % 250);
            let r = client
                .get(format!("{}/v1/connect/sse?device_id=%20", tg.base_url))
                .bearer_auth(&token)
                .header("accept", "text/event-stream")
                .header("x-forwarded-for", ip)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 422);
        }
        let tracked = tg.state.connect_limiter.len();
        assert!(tracked > 0, "round {round}: the limiter tracked no address");
        eventually_within(
            Duration::from_secs(5),
            "the limiter to forget full buckets",
            || async { tg.state.connect_limiter.is_empty().then_some(()) },
        )
        .await;
    }
    tg.stop().await;
}
