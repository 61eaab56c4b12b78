//! Logs, request ids and metrics, black-box: the real `herald` binary with
//! `HERALD_LOG_FORMAT=json`, and a real gateway scraped after real traffic.

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::BIN;
use common::{connect, connect_with_token, http, metrics_text, publish, register, WAIT};
use herald_gateway::testing::{TempDir, TestGateway};
use serde_json::{json, Value};

/// `herald serve` with JSON logs; every stdout and stderr line is kept.
struct JsonHerald {
    child: Child,
    base: String,
    api_key: String,
    lines: Arc<Mutex<Vec<(&'static str, String)>>>,
}

impl Drop for JsonHerald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl JsonHerald {
    fn spawn(data_dir: &std::path::Path) -> JsonHerald {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("HERALD_LOG_FORMAT", "json")
            .env("HERALD_LOG", "info,herald_gateway=debug")
            .env("HERALD_PUSH__STUB", "true")
            // This test's requests come from loopback: as if through a local proxy.
            .env("HERALD_SERVER__TRUSTED_PROXIES", "127.0.0.1/32")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn herald");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for (name, pipe) in [
            (
                "stdout",
                Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            ),
            ("stderr", Box::new(child.stderr.take().unwrap())),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push((name, line));
                }
            });
        }
        let deadline = Instant::now() + WAIT;
        let (mut base, mut api_key) = (None, None);
        while base.is_none() || api_key.is_none() {
            assert!(Instant::now() < deadline, "no address/API key: {lines:?}");
            std::thread::sleep(Duration::from_millis(20));
            for (_, line) in lines.lock().unwrap().iter() {
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                if let Some(url) = v["fields"]["url"].as_str() {
                    base = Some(url.to_owned());
                }
                if let Some(k) = v["fields"]["api_key"].as_str() {
                    api_key = Some(k.to_owned());
                }
            }
        }
        JsonHerald {
            child,
            base: base.unwrap(),
            api_key: api_key.unwrap(),
            lines,
        }
    }

    /// Every line so far, each parsed as JSON (a line that is not JSON fails).
    fn json_lines(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(stream, line)| {
                let v: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{stream} line is not JSON ({e}): {line}"));
                assert!(
                    v.is_object() && v["timestamp"].is_string() && v["level"].is_string(),
                    "{stream} line is not a log object: {line}"
                );
                v
            })
            .collect()
    }

    fn raw(&self) -> Vec<(&'static str, String)> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a log line with `fields.message == message` matching `pred`.
    async fn wait_for(&self, message: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(v) = self
                .json_lines()
                .into_iter()
                .find(|v| v["fields"]["message"] == message && pred(v))
            {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no {message:?} line; log: {:#?}",
                self.raw()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn json_logs_access_log_and_request_id_through_delivery_and_push() {
    let tmp = TempDir::new("herald-jsonlog");
    let gw = JsonHerald::spawn(&tmp.0);
    let http = http();

    // A device token from the service API, the device registered with a push token.
    let token: Value = http
        .post(format!("{}/v1/tokens", gw.base))
        .bearer_auth(&gw.api_key)
        .json(&json!({"user": "obs-user", "device_id": "obs-phone"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["token"].as_str().unwrap().to_owned();
    let r = http
        .put(format!("{}/v1/me/devices/obs-phone", gw.base))
        .bearer_auth(&token)
        .json(
            &json!({"platform": "android", "push_provider": "fcm", "push_token": "fcm-obs-token"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // Connected with the token in the query string (as browsers must): it must not
    // reach the logs.
    let ws_url = format!(
        "{}/v1/connect?device_id=obs-phone&access_token={token}",
        gw.base.replacen("http://", "ws://", 1)
    );
    let mut device = connect_with_token(&ws_url, &token).await.unwrap();

    // Published with a request id: the session delivers it and (push "always") the
    // push goes out; both log lines carry the publish's id.
    let rid = "abc-req-0123456789";
    let r = http
        .post(format!("{}/v1/messages", gw.base))
        .bearer_auth(&gw.api_key)
        .header("x-request-id", rid)
        .json(&json!({"to": {"device": "obs-phone"}, "data": {"k": 1}, "push": "always"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(r.headers()["x-request-id"], rid);
    let body: Value = r.json().await.unwrap();
    let message_id = body["message_id"].as_str().unwrap().to_owned();
    let msg = device.msg().await;
    device.ack(msg.seq).await;

    let delivered = gw
        .wait_for("delivered", |v| v["fields"]["message_id"] == message_id)
        .await;
    assert_eq!(delivered["fields"]["request_id"], rid, "{delivered}");
    assert_eq!(delivered["fields"]["device_id"], "obs-phone");
    let pushed = gw
        .wait_for("push", |v| v["fields"]["message_id"] == message_id)
        .await;
    assert_eq!(pushed["fields"]["request_id"], rid, "{pushed}");
    assert_eq!(pushed["fields"]["outcome"], "pushed", "{pushed}");

    // The access line: route template, status, latency, request id (a span field).
    let access = gw
        .wait_for("request", |v| v["span"]["request_id"] == rid)
        .await;
    assert_eq!(access["target"], "herald::access");
    assert_eq!(access["span"]["route"], "/v1/messages");
    assert_eq!(access["span"]["method"], "POST");
    assert_eq!(access["fields"]["status"], 202);
    assert!(access["fields"]["latency_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(access["span"]["client_ip"], "127.0.0.1", "{access}");

    // Behind a trusted proxy the access line names the client it forwarded.
    let r = http
        .get(format!("{}/healthz", gw.base))
        .header("x-request-id", "via-proxy-1")
        .header("x-forwarded-for", "203.0.113.7")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let access = gw
        .wait_for("request", |v| v["span"]["request_id"] == "via-proxy-1")
        .await;
    assert_eq!(access["span"]["client_ip"], "203.0.113.7", "{access}");

    // A malformed id is replaced by a generated one; ids in paths become the template.
    let r = http
        .get(format!("{}/v1/devices/obs-phone", gw.base))
        .bearer_auth(&gw.api_key)
        .header("x-request-id", "has space")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_ne!(generated, "has space");
    let access = gw
        .wait_for("request", |v| v["span"]["request_id"] == generated.as_str())
        .await;
    assert_eq!(access["span"]["route"], "/v1/devices/{id}", "{access}");
    assert_eq!(access["fields"]["status"], 200);

    // The WebSocket upgrade's access line names the route, not the query.
    gw.wait_for("request", |v| {
        v["span"]["route"] == "/v1/connect" && v["fields"]["status"] == 101
    })
    .await;

    drop(device);
    let sent = Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    gw.wait_for("herald stopped", |_| true).await;

    // Every line on both streams is one JSON object; no credential is in the logs
    // (the first-start line on stdout shows the admin key once, on purpose).
    let lines = gw.json_lines();
    assert!(lines.len() > 10, "{lines:#?}");
    for (stream, line) in gw.raw() {
        assert!(!line.contains(&token), "device token logged: {line}");
        assert!(!line.contains("fcm-obs-token"), "push token logged: {line}");
        if stream == "stderr" {
            assert!(!line.contains(&gw.api_key), "API key logged: {line}");
        }
    }
}

/// Counts of a metric's series whose labels include all of `labels`.
fn series_value(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .reduce(|a, b| a + b)
}

#[tokio::test]
async fn metrics_by_route_store_op_and_push_lag_after_real_traffic() {
    let tg = TestGateway::start().await;
    register(&tg, "m-user", "m-online", Some(("fcm", "tok-online"))).await;
    register(&tg, "m-user", "m-offline", Some(("apns", "tok-offline"))).await;
    let mut online = connect(&tg, "m-user", "m-online", None).await;
    // To the user: live to one device, pushed to the other (fallback, no session).
    publish(&tg, json!({"to": {"user": "m-user"}, "data": {"n": 1}})).await;
    let m = online.msg().await;
    online.ack(m.seq).await;
    common::eventually("the offline device's push", || async {
        (tg.apns.sent().len() == 1).then_some(())
    })
    .await;
    // Routes with ids, and a 404 of the router.
    let (s, _) = common::get(&tg, "/v1/devices/m-online", &tg.api_key).await;
    assert_eq!(s, 200);
    let (s, _) = common::get(&tg, "/v1/devices/nope", &tg.api_key).await;
    assert_eq!(s, 404);
    let (s, _) = common::get(&tg, "/no/such/route", &tg.api_key).await;
    assert_eq!(s, 404);
    // A reconnect replays from the store (fetch).
    drop(online);
    let _again = connect(&tg, "m-user", "m-online", Some(0)).await;

    let text = common::eventually("store ops and the push lag observed", || async {
        let text = metrics_text(&tg).await;
        let have = |op: &str| {
            series_value(
                &text,
                "herald_store_op_duration_seconds_count",
                &[("op", op)],
            )
            .is_some_and(|n| n > 0.0)
        };
        (["publish", "fetch", "ack", "claim"]
            .iter()
            .all(|op| have(op))
            && text.contains("herald_sessions_closed_total{")
            && series_value(&text, "herald_push_queue_lag_seconds_count", &[])
                .is_some_and(|n| n >= 1.0))
        .then_some(text)
    })
    .await;
    let count = |labels: &[(&str, &str)]| {
        series_value(&text, "herald_http_request_duration_seconds_count", labels)
            .unwrap_or_else(|| panic!("no series {labels:?} in\n{text}"))
    };
    assert!(
        count(&[
            ("route", "/v1/messages"),
            ("method", "POST"),
            ("status", "202")
        ]) >= 1.0
    );
    assert!(
        count(&[
            ("route", "/v1/devices/{id}"),
            ("method", "GET"),
            ("status", "200")
        ]) >= 1.0
    );
    assert!(
        count(&[
            ("route", "/v1/devices/{id}"),
            ("method", "GET"),
            ("status", "404")
        ]) >= 1.0
    );
    assert!(count(&[("route", "unmatched"), ("method", "GET"), ("status", "404")]) >= 1.0);
    assert!(count(&[("route", "/v1/connect"), ("status", "101")]) >= 1.0);
    assert!(count(&[("route", "/v1/me/devices/{device_id}"), ("method", "PUT")]) >= 2.0);
    // Every metric the dashboard and the alerts use is exported (they cannot drift).
    let exported: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let used = dashboard_and_alert_metrics();
    assert!(used.len() >= 15, "{used:?}");
    let missing: Vec<&String> = used
        .iter()
        .filter(|n| !exported.contains(&n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/grafana/herald.json or docs/prometheus/alerts.yml use metrics the gateway does not export: {missing:?}"
    );
    // Buckets exist per series, and no raw id became a label value.
    assert!(text.contains(
        "herald_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/messages\",status=\"202\",le=\"+Inf\"}"
    ));
    for raw in ["m-online", "nope", "/no/such/route"] {
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("herald_http_") && l.contains(raw)),
            "raw path {raw} in a label"
        );
    }
}

#[tokio::test]
async fn request_ids_are_echoed_kept_or_generated() {
    let tg = TestGateway::start().await;
    let get = |id: Option<String>| {
        let mut req = http().get(format!("{}/healthz", tg.base_url));
        if let Some(id) = id {
            req = req.header("x-request-id", id);
        }
        async move {
            let r = req.send().await.unwrap();
            r.headers()["x-request-id"].to_str().unwrap().to_owned()
        }
    };
    assert_eq!(
        get(Some("trace-42.a:b/c_d".into())).await,
        "trace-42.a:b/c_d"
    );
    let max = "x".repeat(64);
    assert_eq!(get(Some(max.clone())).await, max);
    for bad in ["x".repeat(65), "a b".into(), "a\"b".into(), "".into()] {
        let got = get(Some(bad.clone())).await;
        assert_ne!(got, bad);
        assert_eq!(got.len(), 32, "{got}");
        assert!(got.bytes().all(|b| b.is_ascii_hexdigit()), "{got}");
    }
    let a = get(None).await;
    let b = get(None).await;
    assert_eq!(a.len(), 32);
    assert_ne!(a, b, "each request gets its own id");
}

/// The metric families docs/grafana/herald.json and docs/prometheus/alerts.yml name
/// (`_bucket`/`_count`/`_sum` series folded into their histogram).
fn dashboard_and_alert_metrics() -> Vec<String> {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let mut text = std::fs::read_to_string(docs.join("grafana/herald.json")).unwrap();
    serde_json::from_str::<Value>(&text).expect("the dashboard is JSON");
    text.push_str(&std::fs::read_to_string(docs.join("prometheus/alerts.yml")).unwrap());
    let mut names: Vec<String> = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("herald_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if !preceded {
            let mut name = &text[start..end];
            for suffix in ["_bucket", "_count", "_sum"] {
                if let Some(base) = name.strip_suffix(suffix) {
                    if base.ends_with("_seconds") {
                        name = base;
                    }
                }
            }
            if !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
        i = end;
    }
    names
}
