//! An in-process mock of FCM HTTP v1 and Google's OAuth token endpoint (real HTTP on
//! 127.0.0.1). It verifies the JWT assertion's RS256 signature with the public half of
//! a key generated at test time, checks its claims, issues access tokens and checks
//! them on `messages:send`. Shared by the provider tests and the end-to-end push tests.
#![allow(dead_code)]

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use herald_gateway::push::config::FcmConfig;
use herald_gateway::push::fcm::FcmProvider;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use serde::Deserialize;
use serde_json::{json, Value};

pub const CLIENT_EMAIL: &str = "herald-test@test-project.iam.gserviceaccount.com";
pub const PROJECT: &str = "test-project";

/// Test-only RSA key pair (private PKCS#8 PEM, public SPKI PEM), made once per run.
pub fn test_keys() -> &'static (String, String) {
    static KEYS: OnceLock<(String, String)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("rsa keygen");
        let private = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
        let public = key
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        (private, public)
    })
}

pub struct Scripted {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Value,
}

#[derive(Default)]
pub struct MockState {
    pub token_uri: String,
    pub expires_in: u64,
    pub token_requests: AtomicUsize,
    pub send_requests: AtomicUsize,
    pub issued: Mutex<Vec<String>>,
    pub revoked: Mutex<HashSet<String>>,
    /// Answer 401 to every send, whatever the token.
    pub refuse_all: AtomicBool,
    /// Refuse the assertion at the token endpoint (invalid_grant).
    pub refuse_grant: AtomicBool,
    /// Delay every send by this much (timeouts).
    pub send_delay_ms: AtomicUsize,
    pub script: Mutex<VecDeque<Scripted>>,
    pub bodies: Mutex<Vec<Value>>,
    /// Anything the mock found wrong with a request; must stay empty.
    pub problems: Mutex<Vec<String>>,
}

pub struct MockFcm {
    pub state: Arc<MockState>,
    pub base_url: String,
}

impl MockFcm {
    pub async fn start(expires_in: u64) -> MockFcm {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(MockState {
            token_uri: format!("{base_url}/token"),
            expires_in,
            ..Default::default()
        });
        let app = Router::new()
            .route("/token", post(token))
            .route("/v1/projects/{project}/{action}", post(send))
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        MockFcm { state, base_url }
    }

    pub fn config(&self) -> FcmConfig {
        let account = json!({
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": "test-key-1",
            "private_key": test_keys().0,
            "client_email": CLIENT_EMAIL,
            "client_id": "1",
            "token_uri": self.state.token_uri,
        });
        FcmConfig {
            service_account_json: Some(account.to_string()),
            base_url: Some(self.base_url.clone()),
            timeout_ms: 2_000,
            ..Default::default()
        }
    }

    pub fn provider(&self) -> FcmProvider {
        self.config().provider().expect("provider builds")
    }

    pub fn script(&self, status: u16, headers: Vec<(&'static str, String)>, body: Value) {
        self.state.script.lock().unwrap().push_back(Scripted {
            status,
            headers,
            body,
        });
    }

    pub fn token_requests(&self) -> usize {
        self.state.token_requests.load(Ordering::SeqCst)
    }

    pub fn send_requests(&self) -> usize {
        self.state.send_requests.load(Ordering::SeqCst)
    }

    pub fn bodies(&self) -> Vec<Value> {
        self.state.bodies.lock().unwrap().clone()
    }

    pub fn assert_no_problems(&self) {
        let p = self.state.problems.lock().unwrap();
        assert!(p.is_empty(), "mock saw bad requests: {p:?}");
    }
}

#[derive(Deserialize)]
struct TokenForm {
    grant_type: String,
    assertion: String,
}

#[derive(Deserialize)]
struct AssertionClaims {
    iss: String,
    scope: String,
    aud: String,
    iat: i64,
    exp: i64,
}

async fn token(State(s): State<Arc<MockState>>, Form(form): Form<TokenForm>) -> Response {
    s.token_requests.fetch_add(1, Ordering::SeqCst);
    let problem = |msg: String| {
        s.problems.lock().unwrap().push(msg.clone());
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant", "error_description": msg})),
        )
            .into_response()
    };
    if form.grant_type != "urn:ietf:params:oauth:grant-type:jwt-bearer" {
        return problem(format!("grant_type {}", form.grant_type));
    }
    let header = match jsonwebtoken::decode_header(&form.assertion) {
        Ok(h) => h,
        Err(e) => return problem(format!("assertion header: {e}")),
    };
    if header.alg != Algorithm::RS256 || header.kid.as_deref() != Some("test-key-1") {
        return problem(format!("assertion header {header:?}"));
    }
    let key = DecodingKey::from_rsa_pem(test_keys().1.as_bytes()).unwrap();
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[&s.token_uri]);
    validation.set_issuer(&[CLIENT_EMAIL]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
    let claims = match jsonwebtoken::decode::<AssertionClaims>(&form.assertion, &key, &validation) {
        Ok(d) => d.claims,
        Err(e) => return problem(format!("assertion rejected: {e}")),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    if claims.scope != "https://www.googleapis.com/auth/firebase.messaging"
        || claims.iss != CLIENT_EMAIL
        || claims.aud != s.token_uri
        || claims.exp - claims.iat != 3600
        || (claims.iat - now).abs() > 60
    {
        return problem(format!(
            "claims scope={} iat={} exp={}",
            claims.scope, claims.iat, claims.exp
        ));
    }
    if s.refuse_grant.load(Ordering::SeqCst) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."})),
        )
            .into_response();
    }
    let mut issued = s.issued.lock().unwrap();
    let access_token = format!("ya29.test-access-token-{}", issued.len() + 1);
    issued.push(access_token.clone());
    Json(json!({"access_token": access_token, "expires_in": s.expires_in, "token_type": "Bearer"}))
        .into_response()
}

pub fn google_error(code: u16, status: &str, message: &str, details: Value) -> Value {
    json!({"error": {"code": code, "message": message, "status": status, "details": details}})
}

async fn send(
    State(s): State<Arc<MockState>>,
    Path((project, action)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    s.send_requests.fetch_add(1, Ordering::SeqCst);
    let delay = s.send_delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay as u64)).await;
    }
    if project != PROJECT || action != "messages:send" {
        s.problems
            .lock()
            .unwrap()
            .push(format!("path {project}/{action}"));
        return StatusCode::NOT_FOUND.into_response();
    }
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string();
    let known = s.issued.lock().unwrap().contains(&bearer);
    let revoked = s.revoked.lock().unwrap().contains(&bearer);
    if !known || revoked || s.refuse_all.load(Ordering::SeqCst) {
        let e = google_error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
            json!([]),
        );
        return (StatusCode::UNAUTHORIZED, Json(e)).into_response();
    }
    // What FCM itself would refuse.
    let msg = &body["message"];
    let data_ok = msg["data"]
        .as_object()
        .is_some_and(|d| d.values().all(Value::is_string));
    if !msg["token"].is_string() || !data_ok || msg.get("apns").is_some() {
        s.problems.lock().unwrap().push(format!("bad body {body}"));
        let e = google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload", json!([]));
        return (StatusCode::BAD_REQUEST, Json(e)).into_response();
    }
    s.bodies.lock().unwrap().push(body);
    let next = s.script.lock().unwrap().pop_front();
    match next {
        None => Json(json!({"name": format!("projects/{PROJECT}/messages/0:1")})).into_response(),
        Some(sc) => {
            let mut resp =
                (StatusCode::from_u16(sc.status).unwrap(), Json(sc.body)).into_response();
            for (k, v) in sc.headers {
                resp.headers_mut().insert(k, v.parse().unwrap());
            }
            resp
        }
    }
}
