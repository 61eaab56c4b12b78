//! FcmProvider against an in-process mock of FCM HTTP v1 and Google's OAuth token
//! endpoint (real HTTP on 127.0.0.1). The mock verifies the JWT assertion's RS256
//! signature with the public half of a key generated at test time, checks its claims,
//! issues access tokens and checks them on `messages:send`.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use herald_gateway::push::config::FcmConfig;
use herald_gateway::push::{PushOutcome, PushProvider, PushRequest};
use herald_protocol::{Notification, Priority, PushContent, PushProviderKind};
use serde_json::{json, Value};

use crate::common;
use common::fcm_mock::*;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn request(token: &str) -> PushRequest {
    PushRequest {
        device_id: "dev-1".into(),
        seq: 12,
        message_id: "msg-1".into(),
        provider: PushProviderKind::Fcm,
        token: token.into(),
        apns_environment: None,
        data: json!({"order": 17}).into(),
        notification: None,
        priority: Priority::Normal,
        collapse_key: None,
        push_content: PushContent::Full,
        expires_at: now() + 3600,
    }
}

/// The `ttl` of a sent body, checked against the expected seconds (±2 s of test time).
fn take_ttl(body: &mut Value, expected: i64) {
    let ttl = body["message"]["android"]
        .as_object_mut()
        .unwrap()
        .remove("ttl")
        .unwrap();
    let secs: i64 = ttl.as_str().unwrap().trim_end_matches('s').parse().unwrap();
    assert!((expected - 2..=expected).contains(&secs), "ttl {ttl}");
}

#[tokio::test]
async fn notification_push_is_delivered_with_exact_body() {
    let mock = MockFcm::start(3600).await;
    let fcm = mock.provider();
    let req = PushRequest {
        notification: Some(Notification {
            title: Some("New order".into()),
            body: Some("Order 17 is ready".into()),
            badge: Some(2),
            sound: Some("default".into()),
        }),
        priority: Priority::High,
        collapse_key: Some("orders".into()),
        ..request("fcm-token-a")
    };
    assert_eq!(fcm.send(&req).await, PushOutcome::Delivered);
    mock.assert_no_problems();
    let mut body = mock.bodies().remove(0);
    take_ttl(&mut body, 3600);
    assert_eq!(
        body,
        json!({"message": {
            "token": "fcm-token-a",
            "notification": {"title": "New order", "body": "Order 17 is ready"},
            "data": {
                "herald_id": "msg-1",
                "herald_seq": "12",
                "herald_device": "dev-1",
                "herald_data": "{\"order\":17}"
            },
            "android": {
                "priority": "high",
                "collapse_key": "orders",
                "notification": {"sound": "default", "notification_count": 2}
            }
        }})
    );
}

#[tokio::test]
async fn data_only_push_has_no_notification_and_normal_priority() {
    let mock = MockFcm::start(3600).await;
    let fcm = mock.provider();
    let req = PushRequest {
        expires_at: now() + 600,
        ..request("fcm-token-b")
    };
    assert_eq!(fcm.send(&req).await, PushOutcome::Delivered);
    let mut body = mock.bodies().remove(0);
    take_ttl(&mut body, 600);
    assert_eq!(
        body,
        json!({"message": {
            "token": "fcm-token-b",
            "data": {
                "herald_id": "msg-1",
                "herald_seq": "12",
                "herald_device": "dev-1",
                "herald_data": "{\"order\":17}"
            },
            "android": {"priority": "normal"}
        }})
    );
    mock.assert_no_problems();
}

#[tokio::test]
async fn oversized_and_hint_pushes_carry_only_herald_keys() {
    let mock = MockFcm::start(3600).await;
    let fcm = mock.provider();
    let big = PushRequest {
        data: json!({"blob": "x".repeat(5000)}).into(),
        ..request("fcm-token-c")
    };
    assert_eq!(fcm.send(&big).await, PushOutcome::Delivered);
    let private = PushRequest {
        push_content: PushContent::Hint,
        notification: Some(Notification {
            title: Some("secret title".into()),
            ..Default::default()
        }),
        ..request("fcm-token-c")
    };
    assert_eq!(fcm.send(&private).await, PushOutcome::Delivered);
    let hint = json!({"herald_id": "msg-1", "herald_seq": "12", "herald_device": "dev-1",
                      "herald_hint": "1"});
    for body in mock.bodies() {
        assert_eq!(body["message"]["data"], hint, "{body}");
        assert!(body["message"].get("notification").is_none(), "{body}");
        assert!(serde_json::to_vec(&body).unwrap().len() < 4096);
    }
    mock.assert_no_problems();
}

#[tokio::test]
async fn access_token_is_cached_across_sends() {
    let mock = MockFcm::start(3600).await;
    let fcm = mock.provider();
    for i in 0..5 {
        let outcome = fcm.send(&request(&format!("tok-{i}"))).await;
        assert_eq!(outcome, PushOutcome::Delivered);
    }
    assert_eq!(mock.token_requests(), 1);
    assert_eq!(mock.send_requests(), 5);
    mock.assert_no_problems();
}

#[tokio::test]
async fn access_token_is_refreshed_shortly_before_expiry() {
    // 61 s lifetime minus the 60 s margin: usable for one second.
    let mock = MockFcm::start(61).await;
    let fcm = mock.provider();
    assert_eq!(fcm.send(&request("t")).await, PushOutcome::Delivered);
    assert_eq!(fcm.send(&request("t")).await, PushOutcome::Delivered);
    assert_eq!(mock.token_requests(), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(fcm.send(&request("t")).await, PushOutcome::Delivered);
    assert_eq!(mock.token_requests(), 2);
    mock.assert_no_problems();
}

#[tokio::test]
async fn revoked_token_is_refreshed_once_on_401() {
    let mock = MockFcm::start(3600).await;
    let fcm = mock.provider();
    assert_eq!(fcm.send(&request("t")).await, PushOutcome::Delivered);
    let first = mock.state.issued.lock().unwrap()[0].clone();
    mock.state.revoked.lock().unwrap().insert(first);
    assert_eq!(fcm.send(&request("t")).await, PushOutcome::Delivered);
    assert_eq!(mock.token_requests(), 2);
    assert_eq!(mock.send_requests(), 3);
    mock.assert_no_problems();
}

#[tokio::test]
async fn persistent_401_is_an_auth_error_after_one_refresh() {
    let mock = MockFcm::start(3600).await;
    let fcm = mock.provider();
    mock.state.refuse_all.store(true, Ordering::SeqCst);
    let outcome = fcm.send(&request("t")).await;
    let PushOutcome::AuthError { reason } = &outcome else {
        panic!("{outcome:?}");
    };
    assert!(
        reason.contains("401") && reason.contains("UNAUTHENTICATED"),
        "{reason}"
    );
    assert!(!reason.contains("ya29"), "{reason}");
    assert_eq!(mock.token_requests(), 2);
    assert_eq!(mock.send_requests(), 2);
}

#[tokio::test]
async fn refused_assertion_is_an_auth_error_without_secrets() {
    let mock = MockFcm::start(3600).await;
    let fcm = mock.provider();
    mock.state.refuse_grant.store(true, Ordering::SeqCst);
    let outcome = fcm.send(&request("t")).await;
    let PushOutcome::AuthError { reason } = &outcome else {
        panic!("{outcome:?}");
    };
    assert!(reason.contains("invalid_grant"), "{reason}");
    assert!(
        !reason.contains("BEGIN") && !reason.contains("eyJ"),
        "{reason}"
    );
    assert_eq!(mock.send_requests(), 0);
    let debug = format!("{fcm:?}");
    assert!(
        !debug.contains("PRIVATE KEY") && !debug.contains("ya29"),
        "{debug}"
    );
    let cfg_debug = format!("{:?}", mock.config());
    assert!(!cfg_debug.contains("PRIVATE KEY"), "{cfg_debug}");
}

#[tokio::test]
async fn unregistered_token_is_invalid() {
    let mock = MockFcm::start(3600).await;
    let fcm = mock.provider();
    mock.script(
        404,
        vec![],
        google_error(
            404,
            "NOT_FOUND",
            "Requested entity was not found.",
            json!([{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                    "errorCode": "UNREGISTERED"}]),
        ),
    );
    assert_eq!(
        fcm.send(&request("dead")).await,
        PushOutcome::InvalidToken {
            reason: "fcm 404 UNREGISTERED: Requested entity was not found.".into()
        }
    );
}

#[tokio::test]
async fn invalid_argument_on_token_is_invalid_other_invalid_argument_fails() {
    let mock = MockFcm::start(3600).await;
    let fcm = mock.provider();
    mock.script(
        400,
        vec![],
        google_error(
            400,
            "INVALID_ARGUMENT",
            "The registration token is not a valid FCM registration token",
            json!([{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                    "errorCode": "INVALID_ARGUMENT"}]),
        ),
    );
    mock.script(
        400,
        vec![],
        google_error(
            400,
            "INVALID_ARGUMENT",
            "Invalid value at 'message.android.collapse_key'",
            json!([{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                    "errorCode": "INVALID_ARGUMENT"}]),
        ),
    );
    assert_eq!(fcm.send(&request("garbage")).await.label(), "invalid_token");
    let outcome = fcm.send(&request("ok")).await;
    assert!(
        matches!(&outcome, PushOutcome::Failed { reason } if reason.contains("collapse_key")),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn quota_and_unavailable_are_retried() {
    let mock = MockFcm::start(3600).await;
    let fcm = mock.provider();
    mock.script(
        429,
        vec![("retry-after", "7".into())],
        google_error(
            429,
            "RESOURCE_EXHAUSTED",
            "Quota exceeded.",
            json!([{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                    "errorCode": "QUOTA_EXCEEDED"}]),
        ),
    );
    mock.script(
        503,
        vec![],
        google_error(
            503,
            "UNAVAILABLE",
            "The service is currently unavailable.",
            json!([]),
        ),
    );
    let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
    mock.script(500, vec![("retry-after", date)], json!({}));
    assert_eq!(
        fcm.send(&request("t")).await,
        PushOutcome::Retry {
            reason: "fcm 429 QUOTA_EXCEEDED: Quota exceeded.".into(),
            retry_after: Some(Duration::from_secs(7)),
        }
    );
    assert_eq!(
        fcm.send(&request("t")).await,
        PushOutcome::Retry {
            reason: "fcm 503 UNAVAILABLE: The service is currently unavailable.".into(),
            retry_after: None,
        }
    );
    let PushOutcome::Retry {
        retry_after: Some(after),
        ..
    } = fcm.send(&request("t")).await
    else {
        panic!("500 with an HTTP-date Retry-After");
    };
    assert!(after <= Duration::from_secs(30) && after >= Duration::from_secs(27));
}

#[tokio::test]
async fn unreachable_or_slow_fcm_is_retried() {
    // Nothing listens on this port any more.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mock = MockFcm::start(3600).await;
    let cfg = FcmConfig {
        base_url: Some(format!("http://127.0.0.1:{port}")),
        ..mock.config()
    };
    let outcome = cfg.provider().unwrap().send(&request("t")).await;
    assert_eq!(outcome.label(), "retry", "{outcome:?}");

    let cfg = FcmConfig {
        timeout_ms: 300,
        ..mock.config()
    };
    let fcm = cfg.provider().unwrap();
    mock.state.send_delay_ms.store(1_000, Ordering::SeqCst);
    let outcome = fcm.send(&request("t")).await;
    assert!(
        matches!(&outcome, PushOutcome::Retry { reason, .. } if reason.contains("timed out")),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn many_concurrent_sends_share_one_client_and_one_token() {
    let mock = MockFcm::start(3600).await;
    let fcm: Arc<dyn PushProvider> = mock.config().build().unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let fcm = fcm.clone();
        tasks.push(tokio::spawn(async move {
            fcm.send(&PushRequest {
                seq: i,
                ..request(&format!("tok-{i}"))
            })
            .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), PushOutcome::Delivered);
    }
    assert_eq!(mock.token_requests(), 1);
    assert_eq!(mock.send_requests(), 200);
    let seqs: HashSet<String> = mock
        .bodies()
        .iter()
        .map(|b| {
            b["message"]["data"]["herald_seq"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(seqs.len(), 200);
    mock.assert_no_problems();
}

#[tokio::test]
async fn service_account_file_and_project_override() {
    let mock = MockFcm::start(3600).await;
    let dir = std::env::temp_dir().join(format!("herald-push-fcm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("service-account.json");
    std::fs::write(&path, mock.config().service_account_json.unwrap()).unwrap();
    let cfg = FcmConfig {
        service_account_json: None,
        service_account_file: Some(path.clone()),
        ..mock.config()
    };
    assert_eq!(
        cfg.provider().unwrap().send(&request("t")).await,
        PushOutcome::Delivered
    );
    let other = FcmConfig {
        project_id: Some("other-project".into()),
        ..cfg
    }
    .provider()
    .unwrap();
    assert!(other
        .send_url()
        .ends_with("/v1/projects/other-project/messages:send"));
    std::fs::remove_dir_all(&dir).ok();
}
