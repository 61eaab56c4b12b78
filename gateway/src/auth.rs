//! Credentials: service API keys and device JWTs.
//!
//! API keys are 192-bit random strings, so a fast hash (SHA-256) is safe at rest and
//! lets a key be found by its hash; the comparison is constant-time all the same.
//! Device JWTs have their algorithm pinned by configuration, never taken from the token.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::clock::now_ms;
use crate::config::{AuthConfig, TopicPolicy};
use crate::store::{ApiKeyRecord, Store, StoreResult};

const KEY_PREFIX: &str = "hk_";
const SECRET_SETTING: &str = "device_token_secret";

pub fn hash_api_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// What an API key may do. `Admin` is every scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Publish,
    Read,
    Devices,
    Tokens,
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Scope::Publish,
        Scope::Read,
        Scope::Devices,
        Scope::Tokens,
        Scope::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Publish => "publish",
            Scope::Read => "read",
            Scope::Devices => "devices",
            Scope::Tokens => "tokens",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// `"publish,read"` → scopes, sorted and without repeats.
    pub fn parse_list(list: &str) -> Result<Vec<Scope>, String> {
        let mut out = Vec::new();
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let scope = Scope::parse(part).ok_or_else(|| {
                format!("unknown scope {part:?}; scopes are publish, read, devices, tokens, admin")
            })?;
            out.push(scope);
        }
        if out.is_empty() {
            return Err("name at least one scope: publish, read, devices, tokens, admin".into());
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    pub fn join(scopes: &[Scope]) -> String {
        scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Creates and stores a new API key; returns the record and the key, which is shown
/// once and never stored.
pub async fn create_api_key(
    store: &dyn Store,
    name: &str,
    scopes: &[Scope],
) -> StoreResult<(ApiKeyRecord, String)> {
    let key = format!("{KEY_PREFIX}{}", random_token(24));
    let record = ApiKeyRecord {
        id: format!("key_{}", random_token(6)),
        name: name.to_owned(),
        prefix: key[..KEY_PREFIX.len() + 8].to_owned(),
        hash: hash_api_key(&key),
        created_at: now_ms(),
        revoked_at: None,
        scopes: scopes.to_vec(),
    };
    store.create_api_key(&record).await?;
    Ok((record, key))
}

/// The key record if `presented` is a live API key.
pub async fn verify_api_key(
    store: &dyn Store,
    presented: &str,
) -> StoreResult<Option<ApiKeyRecord>> {
    if !presented.starts_with(KEY_PREFIX) || presented.len() > 128 {
        return Ok(None);
    }
    let hash = hash_api_key(presented);
    Ok(store
        .api_key_by_hash(&hash)
        .await?
        .filter(|k| bool::from(k.hash.ct_eq(&hash)) && k.revoked_at.is_none()))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceClaims {
    pub sub: String,
    pub exp: u64,
    #[serde(default)]
    pub iat: u64,
    pub iss: String,
    pub aud: Audience,
    /// The one device this token may act for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub did: Option<String>,
    /// Topics the device may subscribe to itself: exact names or prefixes ending in `*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topics: Option<Vec<String>>,
}

/// RFC 7519 allows `aud` to be one string or an array of them; jsonwebtoken checks
/// that ours is among them, this only has to accept both shapes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// A topic pattern is a topic, or a prefix of one followed by `*` (`*` alone: any).
pub fn validate_topic_pattern(pattern: &str) -> Result<(), String> {
    match pattern.strip_suffix('*') {
        Some("") => Ok(()),
        Some(prefix) => herald_protocol::validate_id(prefix),
        None => herald_protocol::validate_id(pattern),
    }
}

pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => pattern == topic,
    }
}

/// Which topics one session's device may subscribe to itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicAccess {
    Any,
    None,
    Patterns(Vec<String>),
}

impl TopicAccess {
    pub fn new(policy: TopicPolicy, claims: &DeviceClaims) -> TopicAccess {
        match policy {
            TopicPolicy::Open => TopicAccess::Any,
            TopicPolicy::Server => TopicAccess::None,
            TopicPolicy::Claims => TopicAccess::Patterns(claims.topics.clone().unwrap_or_default()),
        }
    }

    pub fn allows(&self, topic: &str) -> bool {
        match self {
            TopicAccess::Any => true,
            TopicAccess::None => false,
            TopicAccess::Patterns(p) => p.iter().any(|p| topic_matches(p, topic)),
        }
    }

    /// Why `topic` was refused, for the `forbidden_topic` error.
    pub fn refusal(&self, topic: &str) -> String {
        match self {
            TopicAccess::None => format!(
                "devices cannot subscribe themselves (auth.topic_policy = \"server\"); your backend subscribes devices to {topic}"
            ),
            _ => format!("this device token's `topics` claim does not allow {topic}"),
        }
    }
}

fn token_kid(token: &str) -> Result<String, TokenError> {
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| TokenError::Invalid(e.to_string()))?;
    header.kid.ok_or_else(|| {
        TokenError::Invalid(
            "the token has no kid; with auth.jwks_url every token names its key".into(),
        )
    })
}

/// What a minted token grants besides its user.
#[derive(Debug, Clone, Default)]
pub struct Grant {
    pub device_id: Option<String>,
    pub topics: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("invalid device token: {0}")]
    Invalid(String),
    #[error("this gateway verifies {0} tokens with a public key and cannot mint tokens; mint them in your backend")]
    CannotMint(String),
    #[error("invalid device token: no key with kid {0:?} in the JWKS (auth.jwks_url)")]
    UnknownKid(String),
}

/// Verifies (and, with HS256, mints) device tokens.
#[derive(Clone)]
pub struct DeviceTokens {
    inner: Arc<TokenKeys>,
}

struct TokenKeys {
    algorithm: Algorithm,
    /// How signatures are checked: one configured key, or a JWKS picked by `kid`.
    decoding: Verifier,
    encoding: Option<EncodingKey>,
    issuer: String,
    audience: String,
    max_ttl_seconds: u64,
}

/// Seconds of clock skew allowed on `exp`, `nbf` and the lifetime cap.
const LEEWAY_S: u64 = 5;

enum Verifier {
    Key(DecodingKey),
    Jwks(Arc<Jwks>),
}

/// The keys of `auth.jwks_url`, by `kid`: fetched at start, again every
/// `jwks_refresh_seconds`, and when a token names a `kid` not in the set (at most once
/// per `jwks_min_refresh_seconds`, so forged kids cannot make Herald hammer the
/// issuer).
struct Jwks {
    url: String,
    algorithm: Algorithm,
    http: reqwest::Client,
    keys: RwLock<HashMap<String, DecodingKey>>,
    /// When the last fetch started; held across a fetch so concurrent unknown kids
    /// wait for one fetch instead of starting their own.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    min_interval: Duration,
}

impl Jwks {
    async fn fetch(&self) -> anyhow::Result<usize> {
        let resp = self
            .http
            .get(&self.url)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("cannot fetch auth.jwks_url {}: {e}", self.url))?;
        let status = resp.status();
        if !status.is_success() {
            anyhow::bail!("auth.jwks_url {} answered {status}", self.url);
        }
        let doc: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| anyhow::anyhow!("auth.jwks_url {} is not JSON: {e}", self.url))?;
        let listed = doc
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or_else(|| anyhow::anyhow!("auth.jwks_url {} has no \"keys\" array", self.url))?;
        let mut keys = HashMap::new();
        // Keys Herald cannot use (other algorithms, encryption keys, no kid) are
        // skipped, not fatal: issuers publish several kinds in one set.
        for raw in listed {
            let Ok(jwk) = serde_json::from_value::<jsonwebtoken::jwk::Jwk>(raw.clone()) else {
                continue;
            };
            if let Some(key) = self.usable(&jwk) {
                keys.insert(jwk.common.key_id.clone().unwrap_or_default(), key);
            }
        }
        let n = keys.len();
        *self.keys.write().unwrap() = keys;
        Ok(n)
    }

    fn usable(&self, jwk: &jsonwebtoken::jwk::Jwk) -> Option<DecodingKey> {
        use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, KeyAlgorithm, PublicKeyUse};
        jwk.common.key_id.as_ref()?;
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            return None;
        }
        let fits = match (self.algorithm, &jwk.algorithm) {
            (Algorithm::RS256, AlgorithmParameters::RSA(_)) => true,
            (Algorithm::ES256, AlgorithmParameters::EllipticCurve(p)) => {
                p.curve == EllipticCurve::P256
            }
            _ => false,
        };
        let alg_fits = match jwk.common.key_algorithm {
            None => true,
            Some(KeyAlgorithm::RS256) => self.algorithm == Algorithm::RS256,
            Some(KeyAlgorithm::ES256) => self.algorithm == Algorithm::ES256,
            Some(_) => false,
        };
        if !(fits && alg_fits) {
            return None;
        }
        DecodingKey::from_jwk(jwk).ok()
    }

    fn key(&self, kid: &str) -> Option<DecodingKey> {
        self.keys.read().unwrap().get(kid).cloned()
    }

    /// Fetches the set again for an unknown `kid`, unless the last fetch was too
    /// recent; true if the kid is known afterwards.
    async fn refresh_for(&self, kid: &str) -> bool {
        let mut last = self.last_fetch.lock().await;
        if self.key(kid).is_some() {
            return true;
        }
        if last.is_some_and(|t| t.elapsed() < self.min_interval) {
            return false;
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(n) => tracing::info!(keys = n, kid, "JWKS refreshed for an unknown kid"),
            Err(e) => tracing::warn!(error = %e, "JWKS refresh failed"),
        }
        self.key(kid).is_some()
    }

    fn spawn_refresh(jwks: &Arc<Jwks>, every: Duration) {
        let weak: Weak<Jwks> = Arc::downgrade(jwks);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(jwks) = weak.upgrade() else { return };
                *jwks.last_fetch.lock().await = Some(Instant::now());
                if let Err(e) = jwks.fetch().await {
                    tracing::warn!(error = %e, "JWKS refresh failed; keeping the keys we have");
                }
            }
        });
    }
}

impl DeviceTokens {
    /// Builds the verifier from config; with HS256 and no configured secret, the
    /// secret is generated once and kept in the store.
    pub async fn from_config(cfg: &AuthConfig, store: &dyn Store) -> anyhow::Result<DeviceTokens> {
        let (algorithm, decoding, encoding) = match cfg.jwt_algorithm.to_ascii_uppercase().as_str()
        {
            "HS256" => {
                let secret = match &cfg.jwt_secret {
                    Some(s) if s.len() >= 32 => s.clone(),
                    Some(_) => anyhow::bail!(
                        "auth.jwt_secret must be at least 32 characters; generate one with `openssl rand -hex 32`"
                    ),
                    None => store.init_setting(SECRET_SETTING, &random_token(32)).await?,
                };
                (
                    Algorithm::HS256,
                    Verifier::Key(DecodingKey::from_secret(secret.as_bytes())),
                    Some(EncodingKey::from_secret(secret.as_bytes())),
                )
            }
            alg @ ("RS256" | "ES256") => {
                let algorithm = if alg == "RS256" {
                    Algorithm::RS256
                } else {
                    Algorithm::ES256
                };
                match (&cfg.jwks_url, &cfg.jwt_public_key_file) {
                    (Some(_), Some(_)) => anyhow::bail!(
                        "set one of auth.jwks_url and auth.jwt_public_key_file, not both"
                    ),
                    (Some(url), None) => {
                        let jwks = Arc::new(Jwks {
                            url: url.clone(),
                            algorithm,
                            http: reqwest::Client::builder()
                                .timeout(Duration::from_secs(10))
                                .build()?,
                            keys: RwLock::new(HashMap::new()),
                            // The first unknown kid after start may fetch at once: a
                            // restart must not delay a rotation by the interval.
                            last_fetch: tokio::sync::Mutex::new(None),
                            min_interval: Duration::from_secs(cfg.jwks_min_refresh_seconds),
                        });
                        // A wrong URL is a configuration error: refuse to start
                        // rather than answer every device with 401.
                        let n = jwks.fetch().await?;
                        tracing::info!(url = %url, keys = n, "JWKS loaded");
                        Jwks::spawn_refresh(
                            &jwks,
                            Duration::from_secs(cfg.jwks_refresh_seconds.max(1)),
                        );
                        (algorithm, Verifier::Jwks(jwks), None)
                    }
                    (None, Some(path)) => {
                        let pem = std::fs::read(path)
                            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
                        let key = if algorithm == Algorithm::RS256 {
                            DecodingKey::from_rsa_pem(&pem)?
                        } else {
                            DecodingKey::from_ec_pem(&pem)?
                        };
                        (algorithm, Verifier::Key(key), None)
                    }
                    (None, None) => anyhow::bail!(
                        "auth.jwt_algorithm = {alg} needs auth.jwks_url (a JWKS) or auth.jwt_public_key_file (a PEM public key)"
                    ),
                }
            }
            other => anyhow::bail!(
                "auth.jwt_algorithm {other:?} is not supported; use HS256, RS256 or ES256"
            ),
        };
        Ok(DeviceTokens {
            inner: Arc::new(TokenKeys {
                algorithm,
                decoding,
                encoding,
                issuer: cfg.jwt_issuer.clone(),
                audience: cfg.jwt_audience.clone(),
                max_ttl_seconds: cfg.max_token_ttl_seconds,
            }),
        })
    }

    /// Verifies with the keys at hand; an unknown `kid` is `TokenError::UnknownKid`.
    pub fn verify(&self, token: &str) -> Result<DeviceClaims, TokenError> {
        match &self.inner.decoding {
            Verifier::Key(key) => self.verify_with(token, key),
            Verifier::Jwks(jwks) => {
                let kid = token_kid(token)?;
                match jwks.key(&kid) {
                    Some(key) => self.verify_with(token, &key),
                    None => Err(TokenError::UnknownKid(kid)),
                }
            }
        }
    }

    /// `verify`, but an unknown `kid` first refreshes the JWKS (rate-limited): the
    /// issuer may have rotated to a key published after the last fetch.
    pub async fn verify_fresh(&self, token: &str) -> Result<DeviceClaims, TokenError> {
        match self.verify(token) {
            Err(TokenError::UnknownKid(kid)) => {
                let Verifier::Jwks(jwks) = &self.inner.decoding else {
                    return Err(TokenError::UnknownKid(kid));
                };
                if jwks.refresh_for(&kid).await {
                    self.verify(token)
                } else {
                    Err(TokenError::UnknownKid(kid))
                }
            }
            other => other,
        }
    }

    fn verify_with(&self, token: &str, key: &DecodingKey) -> Result<DeviceClaims, TokenError> {
        let mut v = Validation::new(self.inner.algorithm);
        v.set_issuer(&[&self.inner.issuer]);
        v.set_audience(&[&self.inner.audience]);
        v.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        // A token not valid yet must not be accepted early (`nbf` is optional).
        v.validate_nbf = true;
        v.leeway = LEEWAY_S;
        let data = jsonwebtoken::decode::<DeviceClaims>(token, key, &v)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        check_sub(&data.claims.sub)?;
        if let Some(did) = &data.claims.did {
            herald_protocol::validate_id(did)
                .map_err(|m| TokenError::Invalid(format!("did (device id) {m}")))?;
        }
        for p in data.claims.topics.iter().flatten() {
            validate_topic_pattern(p)
                .map_err(|m| TokenError::Invalid(format!("topics pattern {p:?} {m}")))?;
        }
        self.check_lifetime(data.claims.exp, (now_ms() / 1000) as u64)?;
        Ok(data.claims)
    }

    /// A token valid for longer than `auth.max_token_ttl_seconds` from now was not
    /// minted under this gateway's rules (a leaked long-lived token cannot be revoked
    /// by waiting).
    fn check_lifetime(&self, exp: u64, now: u64) -> Result<(), TokenError> {
        let max = self.inner.max_ttl_seconds;
        if exp > now.saturating_add(max).saturating_add(LEEWAY_S) {
            return Err(TokenError::Invalid(format!(
                "exp is more than auth.max_token_ttl_seconds ({max} s) from now"
            )));
        }
        Ok(())
    }

    /// Mints a user-wide token (no `did`, no `topics`) valid for `ttl_seconds`.
    pub fn mint(&self, user: &str, ttl_seconds: u64) -> Result<(String, u64), TokenError> {
        self.mint_grant(user, &Grant::default(), ttl_seconds)
    }

    /// Mints a token for `user` valid for `ttl_seconds`; returns it with its exp.
    pub fn mint_grant(
        &self,
        user: &str,
        grant: &Grant,
        ttl_seconds: u64,
    ) -> Result<(String, u64), TokenError> {
        let Some(key) = &self.inner.encoding else {
            return Err(TokenError::CannotMint(format!(
                "{:?}",
                self.inner.algorithm
            )));
        };
        let now = (now_ms() / 1000) as u64;
        let claims = DeviceClaims {
            sub: user.to_owned(),
            exp: now + ttl_seconds,
            iat: now,
            iss: self.inner.issuer.clone(),
            aud: Audience::One(self.inner.audience.clone()),
            did: grant.device_id.clone(),
            topics: grant.topics.clone(),
        };
        let token = jsonwebtoken::encode(&Header::new(self.inner.algorithm), &claims, key)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        Ok((token, claims.exp))
    }
}

/// `sub` addresses the user (`to.user`, device ownership): it follows the id rule, or
/// the user could never be reached.
fn check_sub(sub: &str) -> Result<(), TokenError> {
    herald_protocol::validate_id(sub).map_err(|m| TokenError::Invalid(format!("sub {m}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_hash_is_stable_and_distinct() {
        assert_eq!(hash_api_key("hk_a"), hash_api_key("hk_a"));
        assert_ne!(hash_api_key("hk_a"), hash_api_key("hk_b"));
    }

    #[test]
    fn topic_patterns() {
        assert!(topic_matches("news", "news"));
        assert!(!topic_matches("news", "news2"));
        assert!(topic_matches("user.alice.*", "user.alice.inbox"));
        assert!(!topic_matches("user.alice.*", "user.alicex"));
        assert!(topic_matches("*", "anything"));
        assert!(validate_topic_pattern("user.alice.*").is_ok());
        assert!(validate_topic_pattern("*").is_ok());
        assert!(validate_topic_pattern("a*b").is_err());
        assert!(validate_topic_pattern("").is_err());
        assert_eq!(
            Scope::parse_list("read, publish,read").unwrap(),
            vec![Scope::Publish, Scope::Read]
        );
        assert!(Scope::parse_list("root").is_err());
    }
}
