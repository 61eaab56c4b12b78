//! Device tokens: the app's [`TokenProvider`] callback, expiry read from the JWT
//! payload (not verified: the gateway does that), and the "never loop on a bad token"
//! bookkeeping.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

use crate::Error;

/// Supplies device JWTs. The app fetches one from its backend (which mints them, or
/// asks the gateway's `POST /v1/tokens`).
///
/// `device_id` is the client's effective device id: the configured one, or the one
/// the SDK generated (and persisted) when the config gave none. The gateway requires
/// device tokens to carry it as their `did` claim, so the backend must mint the token
/// for exactly this id.
///
/// Called on a background thread of the SDK (never the listener thread), at most once
/// at a time, when the SDK holds no token, when the held one is expired (or expires
/// within 30 s), or once after the gateway rejected it with 401. It may block (network
/// call); it is abandoned after 30 s. Return `Err` with a description when no token can
/// be had: the SDK retries with backoff and gives up (terminal error) after 3
/// consecutive failures.
pub trait TokenProvider: Send + Sync {
    fn fetch_token(&self, device_id: &str) -> Result<String, String>;
}

impl<F> TokenProvider for F
where
    F: Fn(&str) -> Result<String, String> + Send + Sync,
{
    fn fetch_token(&self, device_id: &str) -> Result<String, String> {
        self(device_id)
    }
}

/// Seconds before `exp` at which a token is treated as expired.
const EXPIRY_MARGIN_S: u64 = 30;
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// The `exp` claim (seconds since the epoch) of a JWT, without verifying anything.
pub fn jwt_expiry(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    match &claims["exp"] {
        serde_json::Value::Number(n) => n.as_u64().or_else(|| n.as_f64().map(|f| f as u64)),
        _ => None,
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Default)]
struct Held {
    token: Option<String>,
    exp: Option<u64>,
    consecutive_failures: u32,
}

/// A token obtained for one request or connect attempt.
#[derive(Debug, Clone)]
pub(crate) struct Token {
    pub value: String,
    /// Fetched from the provider for this very attempt.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fresh: bool,
}

pub(crate) struct Tokens {
    provider: Arc<dyn TokenProvider>,
    /// The effective device id, passed to every `fetch_token`.
    device_id: Arc<str>,
    held: tokio::sync::Mutex<Held>,
}

impl Tokens {
    pub fn new(provider: Arc<dyn TokenProvider>, device_id: &str) -> Self {
        Tokens {
            provider,
            device_id: device_id.into(),
            held: tokio::sync::Mutex::new(Held::default()),
        }
    }

    /// The held token if still valid, else a new one from the provider. A token just
    /// fetched is used even if it looks expired (the gateway decides; a 401 then counts
    /// as the one allowed rejection).
    pub async fn get(&self) -> Result<Token, Error> {
        let mut held = self.held.lock().await;
        if let Some(t) = &held.token {
            let valid = held.exp.is_none_or(|exp| exp > now_s() + EXPIRY_MARGIN_S);
            if valid {
                return Ok(Token {
                    value: t.clone(),
                    fresh: false,
                });
            }
        }
        held.token = None;
        let provider = self.provider.clone();
        let device_id = self.device_id.clone();
        let fetched = tokio::time::timeout(
            FETCH_TIMEOUT,
            tokio::task::spawn_blocking(move || provider.fetch_token(&device_id)),
        )
        .await;
        let result = match fetched {
            Err(_) => Err("token provider did not answer within 30 s".to_string()),
            Ok(Err(join)) => Err(format!("token provider panicked: {join}")),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Ok(Ok(t))) if t.trim().is_empty() => {
                Err("token provider returned an empty token".into())
            }
            Ok(Ok(Ok(t))) => Ok(t.trim().to_string()),
        };
        match result {
            Ok(t) => {
                held.consecutive_failures = 0;
                held.exp = jwt_expiry(&t);
                held.token = Some(t.clone());
                Ok(Token {
                    value: t,
                    fresh: true,
                })
            }
            Err(e) => {
                held.consecutive_failures += 1;
                Err(Error::TokenProvider(e))
            }
        }
    }

    /// The gateway rejected `token`: forget it (unless it was already replaced).
    pub async fn invalidate(&self, token: &str) {
        let mut held = self.held.lock().await;
        if held.token.as_deref() == Some(token) {
            held.token = None;
            held.exp = None;
        }
    }

    /// Provider failures in a row.
    pub async fn consecutive_failures(&self) -> u32 {
        self.held.lock().await.consecutive_failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn jwt(claims: serde_json::Value) -> String {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            e.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
            e.encode(claims.to_string())
        )
    }

    #[test]
    fn expiry_is_read_without_verification() {
        assert_eq!(
            jwt_expiry(&jwt(serde_json::json!({"sub":"u","exp":1234}))),
            Some(1234)
        );
        assert_eq!(jwt_expiry(&jwt(serde_json::json!({"sub":"u"}))), None);
        assert_eq!(jwt_expiry("not a jwt"), None);
        assert_eq!(jwt_expiry("a.!!!.c"), None);
    }

    #[tokio::test]
    async fn fetches_when_none_expired_or_invalidated() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let provider = move |device: &str| {
            assert_eq!(device, "dev-1");
            let n = c.fetch_add(1, Ordering::SeqCst);
            // The first token is already expired, later ones are good for an hour.
            let exp = if n == 0 { now_s() - 10 } else { now_s() + 3600 };
            Ok(jwt(serde_json::json!({"sub":"u","exp":exp,"n":n})))
        };
        let tokens = Tokens::new(Arc::new(provider), "dev-1");
        let t1 = tokens.get().await.unwrap();
        assert!(t1.fresh);
        // Expired: fetched again.
        let t2 = tokens.get().await.unwrap();
        assert!(t2.fresh);
        assert_ne!(t1.value, t2.value);
        // Valid: reused.
        let t3 = tokens.get().await.unwrap();
        assert!(!t3.fresh);
        assert_eq!(t3.value, t2.value);
        // Rejected: fetched again.
        tokens.invalidate(&t3.value).await;
        assert!(tokens.get().await.unwrap().fresh);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn provider_failures_are_counted() {
        let tokens = Tokens::new(
            Arc::new(|_: &str| Err::<String, _>("offline".to_string())),
            "d",
        );
        for i in 1..=3 {
            assert!(matches!(tokens.get().await, Err(Error::TokenProvider(_))));
            assert_eq!(tokens.consecutive_failures().await, i);
        }
        let empty = Tokens::new(Arc::new(|_: &str| Ok::<_, String>("  ".to_string())), "d");
        assert!(empty.get().await.is_err());
    }
}
