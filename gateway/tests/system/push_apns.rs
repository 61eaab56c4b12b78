//! APNs: golden tests of the payload and headers built for every message shape, of
//! the mapping of a2's answers to outcomes, and of building the provider from config.
//! (a2 only talks to Apple's hosts, so nothing here sends.)

use std::collections::BTreeMap;

use a2::{ErrorBody, ErrorReason, PushType, Response};
use base64::Engine;
use herald_gateway::push::apns::{
    build_apns_message, collapse_id, map_apns_error, map_apns_response, map_apns_result,
};
use herald_gateway::push::config::ApnsConfig;
use herald_gateway::push::{PushOutcome, PushRequest};
use herald_protocol::{ApnsEnvironment, Notification, Priority, PushContent, PushProviderKind};
use serde_json::{json, Value};

const TOPIC: &str = "com.example.herald";

fn request() -> PushRequest {
    PushRequest {
        device_id: "dev-1".into(),
        seq: 12,
        message_id: "msg-1".into(),
        provider: PushProviderKind::Apns,
        token: "a1b2c3".into(),
        apns_environment: None,
        data: json!({"order": 17}).into(),
        notification: None,
        priority: Priority::Normal,
        collapse_key: None,
        push_content: PushContent::Full,
        expires_at: 1_900_000_000,
    }
}

fn notification() -> Notification {
    Notification {
        title: Some("New order".into()),
        body: Some("Order 17 is ready".into()),
        badge: Some(2),
        sound: Some("default".into()),
    }
}

/// Body (parsed) and headers of the request built for `req`.
fn golden(req: &PushRequest) -> (Value, BTreeMap<&'static str, String>) {
    let msg = build_apns_message(req, TOPIC);
    let body = msg.body_json();
    assert!(body.len() <= 4096, "payload {} bytes", body.len());
    (serde_json::from_str(&body).unwrap(), msg.headers())
}

fn headers(pairs: &[(&'static str, &str)]) -> BTreeMap<&'static str, String> {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

fn full_keys() -> Value {
    json!({"herald_id": "msg-1", "herald_seq": "12", "herald_device": "dev-1",
           "herald_data": "{\"order\":17}"})
}

fn hint_keys() -> Value {
    json!({"herald_id": "msg-1", "herald_seq": "12", "herald_device": "dev-1",
           "herald_hint": "1"})
}

fn with_aps(aps: Value, keys: Value) -> Value {
    let mut v = keys;
    v["aps"] = aps;
    v
}

#[test]
fn alert_high_priority_with_collapse() {
    let req = PushRequest {
        notification: Some(notification()),
        priority: Priority::High,
        collapse_key: Some("orders".into()),
        ..request()
    };
    let (body, h) = golden(&req);
    assert_eq!(
        body,
        with_aps(
            json!({"alert": {"title": "New order", "body": "Order 17 is ready"},
                   "badge": 2, "sound": "default", "mutable-content": 1}),
            full_keys()
        )
    );
    assert_eq!(
        h,
        headers(&[
            ("apns-priority", "10"),
            ("apns-push-type", "alert"),
            ("apns-expiration", "1900000000"),
            ("apns-collapse-id", "orders"),
            ("apns-topic", TOPIC),
        ])
    );
    let msg = build_apns_message(&req, TOPIC);
    assert_eq!(msg.push_type, PushType::Alert);
    assert!(!msg.hint);
}

#[test]
fn alert_normal_priority_body_only() {
    let req = PushRequest {
        notification: Some(Notification {
            body: Some("Just a body".into()),
            ..Default::default()
        }),
        ..request()
    };
    let (body, h) = golden(&req);
    assert_eq!(
        body,
        with_aps(
            json!({"alert": "Just a body", "mutable-content": 1}),
            full_keys()
        )
    );
    assert_eq!(
        h,
        headers(&[
            ("apns-priority", "5"),
            ("apns-push-type", "alert"),
            ("apns-expiration", "1900000000"),
            ("apns-topic", TOPIC),
        ])
    );
}

#[test]
fn badge_only_is_an_alert_push_without_alert_text() {
    let req = PushRequest {
        notification: Some(Notification {
            badge: Some(0),
            ..Default::default()
        }),
        priority: Priority::High,
        ..request()
    };
    let (body, h) = golden(&req);
    assert_eq!(body, with_aps(json!({"badge": 0}), full_keys()));
    assert_eq!(h["apns-push-type"], "alert");
    assert_eq!(h["apns-priority"], "10");
}

#[test]
fn data_only_is_a_background_push_at_priority_5() {
    for priority in [Priority::High, Priority::Normal] {
        let req = PushRequest {
            priority,
            notification: Some(Notification::default()), // nothing visible
            ..request()
        };
        let (body, h) = golden(&req);
        assert_eq!(body, with_aps(json!({"content-available": 1}), full_keys()));
        assert_eq!(
            h,
            headers(&[
                ("apns-priority", "5"),
                ("apns-push-type", "background"),
                ("apns-expiration", "1900000000"),
                ("apns-topic", TOPIC),
            ])
        );
    }
}

#[test]
fn requested_hint_never_carries_content() {
    let req = PushRequest {
        notification: Some(notification()),
        push_content: PushContent::Hint,
        priority: Priority::High,
        ..request()
    };
    let (body, h) = golden(&req);
    assert_eq!(body, with_aps(json!({"content-available": 1}), hint_keys()));
    assert_eq!(h["apns-push-type"], "background");
    assert_eq!(h["apns-priority"], "5");
    assert!(build_apns_message(&req, TOPIC).hint);
}

#[test]
fn oversized_data_keeps_the_alert_as_a_hint() {
    let req = PushRequest {
        data: json!({"blob": "x".repeat(5000)}).into(),
        notification: Some(notification()),
        priority: Priority::High,
        ..request()
    };
    let (body, h) = golden(&req);
    assert_eq!(
        body,
        with_aps(
            json!({"alert": {"title": "New order", "body": "Order 17 is ready"},
                   "badge": 2, "sound": "default", "mutable-content": 1}),
            hint_keys()
        )
    );
    assert_eq!(h["apns-push-type"], "alert");
    assert_eq!(h["apns-priority"], "10");
}

#[test]
fn oversized_alert_or_data_only_becomes_a_background_hint() {
    let huge_alert = PushRequest {
        notification: Some(Notification {
            title: Some("t".repeat(5000)),
            ..Default::default()
        }),
        priority: Priority::High,
        ..request()
    };
    let huge_data = PushRequest {
        data: json!("y".repeat(5000)).into(),
        ..request()
    };
    for req in [huge_alert, huge_data] {
        let (body, h) = golden(&req);
        assert_eq!(body, with_aps(json!({"content-available": 1}), hint_keys()));
        assert_eq!(h["apns-push-type"], "background");
        assert_eq!(h["apns-priority"], "5");
    }
}

#[test]
fn payload_just_under_the_limit_stays_full() {
    // Grow the data until one more byte would turn the push into a hint.
    let mut n = 3800;
    loop {
        let req = PushRequest {
            data: json!("z".repeat(n + 1)).into(),
            ..request()
        };
        if build_apns_message(&req, TOPIC).hint {
            break;
        }
        n += 1;
        assert!(n < 4096, "never became a hint");
    }
    let req = PushRequest {
        data: json!("z".repeat(n)).into(),
        ..request()
    };
    let msg = build_apns_message(&req, TOPIC);
    assert_eq!(msg.body_json().len(), 4096);
    assert!(!msg.hint);
}

#[test]
fn collapse_ids_fit_64_bytes() {
    assert_eq!(collapse_id("short"), "short");
    let exact = "k".repeat(64);
    assert_eq!(collapse_id(&exact), exact);
    let long_a = collapse_id(&"a".repeat(100));
    let long_b = collapse_id(&format!("{}b", "a".repeat(99)));
    assert_eq!(long_a.len(), 64);
    assert_ne!(long_a, long_b);
    let req = PushRequest {
        collapse_key: Some("c".repeat(200)),
        ..request()
    };
    assert_eq!(golden(&req).1["apns-collapse-id"].len(), 64);
}

#[test]
fn no_expiration_header_without_expiry() {
    let req = PushRequest {
        expires_at: 0,
        ..request()
    };
    assert!(!golden(&req).1.contains_key("apns-expiration"));
}

fn response(code: u16, reason: Option<ErrorReason>) -> a2::Error {
    a2::Error::ResponseError(Response {
        error: reason.map(|reason| ErrorBody {
            reason,
            timestamp: None,
        }),
        apns_id: None,
        code,
    })
}

#[test]
fn response_mapping() {
    use ErrorReason as R;
    let table: Vec<(u16, Option<ErrorReason>, &str)> = vec![
        (410, Some(R::Unregistered), "invalid_token"),
        (410, None, "invalid_token"),
        (400, Some(R::BadDeviceToken), "invalid_token"),
        (400, Some(R::DeviceTokenNotForTopic), "invalid_token"),
        (403, Some(R::InvalidProviderToken), "auth_error"),
        (403, Some(R::ExpiredProviderToken), "auth_error"),
        (403, Some(R::MissingProviderToken), "auth_error"),
        (403, Some(R::BadCertificate), "auth_error"),
        (403, Some(R::BadCertificateEnvironment), "auth_error"),
        (403, None, "auth_error"),
        (429, Some(R::TooManyRequests), "retry"),
        (429, Some(R::TooManyProviderTokenUpdates), "retry"),
        (500, Some(R::InternalServerError), "retry"),
        (503, Some(R::ServiceUnavailable), "retry"),
        (503, Some(R::Shutdown), "retry"),
        (502, None, "retry"),
        (400, Some(R::IdleTimeout), "retry"),
        (400, Some(R::BadCollapseId), "failed"),
        (400, Some(R::BadTopic), "failed"),
        (400, Some(R::TopicDisallowed), "failed"),
        (400, Some(R::PayloadEmpty), "failed"),
        (413, Some(R::PayloadTooLarge), "failed"),
        (405, Some(R::MethodNotAllowed), "failed"),
        (404, Some(R::BadPath), "failed"),
        (400, None, "failed"),
    ];
    for (code, reason, label) in table {
        let direct = map_apns_response(code, reason.as_ref());
        assert_eq!(direct.label(), label, "{code} {reason:?}: {direct:?}");
        let via_error = map_apns_error(&response(code, reason));
        assert_eq!(via_error, direct);
    }
    assert_eq!(
        map_apns_error(&response(410, Some(R::Unregistered))),
        PushOutcome::InvalidToken {
            reason: "apns 410 Unregistered".into()
        }
    );
    assert_eq!(
        map_apns_error(&response(429, Some(R::TooManyRequests))),
        PushOutcome::Retry {
            reason: "apns 429 TooManyRequests".into(),
            retry_after: None
        }
    );
    assert_eq!(
        map_apns_result(Ok(Response {
            error: None,
            apns_id: Some("id".into()),
            code: 200
        })),
        PushOutcome::Delivered
    );
}

#[test]
fn transport_errors_are_retried() {
    let timeout = map_apns_error(&a2::Error::RequestTimeout(10));
    assert_eq!(
        timeout,
        PushOutcome::Retry {
            reason: "apns: request timed out after 10 s".into(),
            retry_after: None
        }
    );
    let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
    assert_eq!(map_apns_error(&a2::Error::ReadError(io)).label(), "retry");
    assert_eq!(
        map_apns_error(&a2::Error::InvalidOptions("bad".into())).label(),
        "failed"
    );
    assert_eq!(
        map_apns_error(&a2::Error::InvalidCertificate).label(),
        "auth_error"
    );
}

/// A fresh EC P-256 key in the PKCS#8 PEM form of Apple's .p8 files (test-only).
fn test_p8() -> String {
    let rng = ring::rand::SystemRandom::new();
    let doc = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(doc.as_ref());
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        lines.join("\n")
    )
}

/// Also checks that building needs no async runtime.
#[test]
fn provider_builds_from_a_p8_key_and_hides_it() {
    let pem = test_p8();
    let dir = std::env::temp_dir().join(format!("herald-push-apns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("AuthKey_TESTKEY123.p8");
    std::fs::write(&path, &pem).unwrap();
    let cfg = ApnsConfig {
        key_file: Some(path),
        key_id: Some("TESTKEY123".into()),
        team_id: Some("TEAM123456".into()),
        topic: Some(TOPIC.into()),
        default_environment: ApnsEnvironment::Sandbox,
        ..Default::default()
    };
    let provider = cfg.provider().expect("p8 key accepted");
    assert_eq!(provider.topic(), TOPIC);
    let body = pem.lines().nth(1).unwrap().to_string();
    let debug = format!("{provider:?} {cfg:?}");
    assert!(!debug.contains(&body), "{debug}");
    let arc = cfg.build().unwrap();
    assert_eq!(arc.kind(), PushProviderKind::Apns);

    let inline = ApnsConfig {
        key_file: None,
        key_pem: Some(pem.clone()),
        ..cfg.clone()
    };
    assert!(inline.provider().is_ok());
    assert!(!format!("{inline:?}").contains(&body));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_keys_and_pkcs12_are_explained() {
    let err = ApnsConfig {
        key_pem: Some("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into()),
        key_id: Some("K".into()),
        team_id: Some("T".into()),
        topic: Some(TOPIC.into()),
        ..Default::default()
    }
    .provider()
    .unwrap_err()
    .to_string();
    assert!(err.contains(".p8"), "{err}");
    assert!(!err.contains("AAAA"), "{err}");

    let dir = std::env::temp_dir().join(format!("herald-push-apns-p12-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p12 = dir.join("cert.p12");
    std::fs::write(&p12, [0x30u8, 0x82, 0x01, 0x00]).unwrap();
    let err = ApnsConfig {
        certificate_file: Some(p12),
        certificate_password: Some("pw".into()),
        topic: Some(TOPIC.into()),
        ..Default::default()
    }
    .provider()
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("PKCS#12") && err.contains("openssl pkcs12"),
        "{err}"
    );
    assert!(!err.contains("pw\""), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// What the dispatcher sends for an inbox entry: `apns-collapse-id` is the message's
/// own collapse key if it has one, else its id, on every attempt, so a retry of a
/// request that timed out replaces the notification instead of stacking a second one.
#[test]
fn every_push_of_an_entry_carries_its_collapse_id() {
    use herald_gateway::store::{Device, InboxEntry, MessagePayload, StoredMessage};
    use herald_protocol::{PushPolicy, PushTokenState, Target};
    use std::sync::Arc;

    let entry = |collapse_key: Option<&str>, attempts: u32| InboxEntry {
        device_id: "dev-1".into(),
        seq: 12,
        message: Arc::new(StoredMessage::new(
            "msg_0192a".into(),
            Target::Device("dev-1".into()),
            MessagePayload {
                data: json!({"order": 17}).into(),
                notification: Some(notification()),
                push: PushPolicy::Fallback,
                push_content: PushContent::Full,
                priority: Priority::High,
                collapse_key: collapse_key.map(str::to_owned),
            },
            1_800_000_000_000,
            1_900_000_000_000,
        )),
        push_pending: true,
        push_attempts: attempts,
    };
    let device = Device {
        id: "dev-1".into(),
        user_id: "u".into(),
        platform: None,
        push_provider: Some(PushProviderKind::Apns),
        push_token: Some("a1b2c3".into()),
        apns_environment: Some(ApnsEnvironment::Sandbox),
        token_state: PushTokenState::Active,
        token_error: None,
        last_seq: 12,
        acked_seq: 0,
        last_seen: None,
    };
    for attempts in [0, 1, 4] {
        let req = PushRequest::for_entry(
            &entry(None, attempts),
            &device,
            PushProviderKind::Apns,
            "a1b2c3".into(),
        );
        assert_eq!(golden(&req).1["apns-collapse-id"], "msg_0192a");
        let req = PushRequest::for_entry(
            &entry(Some("orders"), attempts),
            &device,
            PushProviderKind::Apns,
            "a1b2c3".into(),
        );
        assert_eq!(golden(&req).1["apns-collapse-id"], "orders");
    }
}
