//! Credentials: service API keys and device JWTs.
//!
//! API keys are 192-bit random strings, so a fast hash (SHA-256) is safe at rest and
//! lets a key be found by its hash; the comparison is constant-time all the same.
//! Device JWTs have their algorithm pinned by configuration, never taken from the token.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::clock::now_ms;
use crate::config::AuthConfig;
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

/// Creates and stores a new API key; returns the record and the key, which is shown
/// once and never stored.
pub async fn create_api_key(store: &dyn Store, name: &str) -> StoreResult<(ApiKeyRecord, String)> {
    let key = format!("{KEY_PREFIX}{}", random_token(24));
    let record = ApiKeyRecord {
        id: format!("key_{}", random_token(6)),
        name: name.to_owned(),
        prefix: key[..KEY_PREFIX.len() + 8].to_owned(),
        hash: hash_api_key(&key),
        created_at: now_ms(),
        revoked_at: None,
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
}

/// RFC 7519 allows `aud` to be one string or an array of them; jsonwebtoken checks
/// that ours is among them, this only has to accept both shapes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("invalid device token: {0}")]
    Invalid(String),
    #[error("this gateway verifies {0} tokens with a public key and cannot mint tokens; mint them in your backend")]
    CannotMint(String),
}

/// Verifies (and, with HS256, mints) device tokens.
#[derive(Clone)]
pub struct DeviceTokens {
    inner: Arc<TokenKeys>,
}

struct TokenKeys {
    algorithm: Algorithm,
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    issuer: String,
    audience: String,
    max_ttl_seconds: u64,
}

/// Seconds of clock skew allowed on `exp`, `nbf` and the lifetime cap.
const LEEWAY_S: u64 = 5;

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
                    DecodingKey::from_secret(secret.as_bytes()),
                    Some(EncodingKey::from_secret(secret.as_bytes())),
                )
            }
            alg @ ("RS256" | "ES256") => {
                let path = cfg.jwt_public_key_file.as_ref().ok_or_else(|| {
                    anyhow::anyhow!("auth.jwt_algorithm = {alg} needs auth.jwt_public_key_file (a PEM public key)")
                })?;
                let pem = std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
                if alg == "RS256" {
                    (Algorithm::RS256, DecodingKey::from_rsa_pem(&pem)?, None)
                } else {
                    (Algorithm::ES256, DecodingKey::from_ec_pem(&pem)?, None)
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

    pub fn verify(&self, token: &str) -> Result<DeviceClaims, TokenError> {
        let data =
            jsonwebtoken::decode::<DeviceClaims>(token, &self.inner.decoding, &self.validation())
                .map_err(|e| TokenError::Invalid(e.to_string()))?;
        check_sub(&data.claims.sub)?;
        self.check_lifetime(data.claims.exp, (now_ms() / 1000) as u64)?;
        Ok(data.claims)
    }

    fn validation(&self) -> Validation {
        let mut v = Validation::new(self.inner.algorithm);
        v.set_issuer(&[&self.inner.issuer]);
        v.set_audience(&[&self.inner.audience]);
        v.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        // A token not valid yet must not be accepted early (`nbf` is optional).
        v.validate_nbf = true;
        v.leeway = LEEWAY_S;
        v
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

    /// Mints a token for `user` valid for `ttl_seconds`; returns it with its exp.
    pub fn mint(&self, user: &str, ttl_seconds: u64) -> Result<(String, u64), TokenError> {
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
}
