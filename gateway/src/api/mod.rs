//! HTTP surface: `app(state) -> Router`, extractors for the two kinds of credentials,
//! and the JSON body extractor that turns serde's complaints into 400/413/422.

pub mod access;
pub mod device;
pub mod openapi;
pub mod ops;
pub mod service;
pub mod sse;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::path::ErrorKind;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::routing::{delete, get, post, put};
use axum::Router;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{verify_api_key, DeviceClaims, DeviceTokens, Scope};
use crate::config::Config;
use crate::delivery::DeliveryRouter;
use crate::error::AppError;
pub use crate::limiter::RateLimiter;
use crate::metrics::Metrics;
use crate::registry::SessionRegistry;
use crate::session::SessionConfig;
use crate::store::{ApiKeyRecord, Store};

/// Everything a handler may need. Cloned by every request's `State` extractor, so it
/// is one `Arc`: one reference count instead of one per metric, limiter and handle.
#[derive(Clone)]
pub struct AppState(Arc<AppContext>);

impl AppState {
    pub fn new(context: AppContext) -> AppState {
        AppState(Arc::new(context))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppContext;
    fn deref(&self) -> &AppContext {
        &self.0
    }
}

/// What `AppState` shares.
pub struct AppContext {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub tokens: DeviceTokens,
    pub router: DeliveryRouter,
    pub registry: Arc<SessionRegistry>,
    pub metrics: Metrics,
    pub session_cfg: Arc<SessionConfig>,
    pub publish_limiter: Arc<RateLimiter>,
    pub connect_limiter: Arc<RateLimiter>,
    /// Cancelled when the gateway begins to shut down.
    pub shutdown: CancellationToken,
    /// Live WebSocket sessions, awaited on shutdown.
    pub sessions: TaskTracker,
}

impl AppContext {
    /// Presence: a live session on this node or, in cluster mode, on any other.
    pub async fn is_online(&self, device_id: &str) -> bool {
        self.registry.is_online(device_id) || self.router.cluster.is_live_remote(device_id).await
    }
}

pub fn app(state: AppState) -> Router {
    let limits = &state.config.limits;
    let publish = Router::new()
        .route("/v1/messages", post(service::publish))
        .layer(DefaultBodyLimit::max(limits.max_message_bytes));
    let batch = Router::new()
        .route("/v1/messages/batch", post(service::publish_batch))
        .layer(DefaultBodyLimit::max(limits.max_batch_bytes));
    let api = Router::new()
        .route("/v1/messages/{id}", get(service::message_status))
        .route(
            "/v1/devices/{id}",
            get(service::get_device).delete(service::delete_device),
        )
        .route("/v1/users/{user}/devices", get(service::user_devices))
        .route(
            "/v1/users/{user}/revoke_tokens",
            post(service::revoke_tokens),
        )
        .route("/v1/devices/{id}/topics", get(service::device_topics))
        .route(
            "/v1/devices/{id}/topics/{topic}",
            put(service::subscribe_device).delete(service::unsubscribe_device),
        )
        .route("/v1/tokens", post(service::mint_token))
        .route("/v1/me/devices/{device_id}", put(device::register_device))
        .route(
            "/v1/me/devices/{device_id}/push_token",
            delete(device::remove_push_token),
        )
        .route("/v1/me/ack", post(device::ack))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .merge(publish)
        .merge(batch)
        .layer(axum::middleware::from_fn_with_state(
            Duration::from_millis(limits.request_timeout_ms),
            request_deadline,
        ));
    // A long-poll is held up to MAX_SYNC_WAIT_S on purpose: its own, longer bound.
    let long_poll = Router::new().route("/v1/me/sync", get(device::sync)).layer(
        axum::middleware::from_fn_with_state(
            Duration::from_millis(limits.request_timeout_ms)
                + Duration::from_secs(device::MAX_SYNC_WAIT_S),
            request_deadline,
        ),
    );
    let mut router = Router::new()
        .merge(api)
        .merge(long_poll)
        .route("/v1/connect", get(device::connect))
        .route("/v1/connect/sse", get(sse::connect))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/openapi.json", get(openapi::serve));
    // With an ops listener, metrics are not served to whoever reaches the main port.
    if state.config.ops.listen.is_none() {
        router = router.route("/metrics", get(ops::metrics));
    }
    let metrics = state.metrics.clone();
    let proxies = state.config.server.trusted_proxies.clone();
    let router = router
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .with_state(state);
    access::layer(router, metrics, proxies)
}

/// The `ops.listen` listener: health, readiness and metrics only.
pub fn ops_app(state: AppState) -> Router {
    let metrics = state.metrics.clone();
    let proxies = state.config.server.trusted_proxies.clone();
    let router = Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .with_state(state);
    access::layer(router, metrics, proxies)
}

/// Answers `408 timeout` (a JSON error like every other) when the inner route has not
/// answered within the limit; the route's future is dropped there, as a client that
/// gave up would drop it.
async fn request_deadline(
    axum::extract::State(limit): axum::extract::State<Duration>,
    req: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => axum::response::IntoResponse::into_response(AppError::Timeout {
            after_ms: limit.as_millis() as u64,
        }),
    }
}

pub use herald_protocol::validate_id;

pub fn require_id(field: &str, value: &str) -> Result<(), AppError> {
    validate_id(value).map_err(|m| AppError::invalid(field, m))
}

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A service caller, authenticated by API key.
pub struct ServiceAuth(pub ApiKeyRecord);

impl ServiceAuth {
    /// 403 `forbidden` naming the scope the key lacks.
    pub fn require(&self, scope: Scope) -> Result<(), AppError> {
        if self.0.allows(scope) {
            return Ok(());
        }
        Err(AppError::Forbidden(format!(
            "this API key ({}) lacks the `{}` scope; it has: {}. Create a key with it: `herald keys create --name NAME --scope {}`",
            self.0.id,
            scope.as_str(),
            Scope::join(&self.0.scopes),
            scope.as_str()
        )))
    }
}

impl FromRequestParts<AppState> for ServiceAuth {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let token = bearer(parts).ok_or_else(|| {
            AppError::Unauthorized(
                "missing credentials: send `Authorization: Bearer <api-key>`".into(),
            )
        })?;
        if let Some(key) = verify_api_key(state.store.as_ref(), token).await? {
            return Ok(ServiceAuth(key));
        }
        if state.tokens.verify(token).is_ok() {
            return Err(AppError::Forbidden(
                "a device token cannot call service routes; use an API key".into(),
            ));
        }
        Err(AppError::Unauthorized("invalid or revoked API key".into()))
    }
}

/// A device, authenticated by its JWT (`sub` = user).
pub struct DeviceAuth(pub DeviceClaims);

impl FromRequestParts<AppState> for DeviceAuth {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let query_token = parts.uri.query().and_then(|q| {
            url_param(q, "access_token")
                .filter(|_| matches!(parts.uri.path(), "/v1/connect" | "/v1/connect/sse"))
        });
        let token = bearer(parts)
            .map(str::to_owned)
            .or(query_token)
            .ok_or_else(|| {
                AppError::Unauthorized(
                    "missing credentials: send `Authorization: Bearer <device-token>`".into(),
                )
            })?;
        match state.tokens.verify_fresh(&token).await {
            Ok(claims) => {
                // The mark is in the store, so a revocation made on any node holds here.
                if let Some(before) = state.store.tokens_revoked_before(&claims.sub).await? {
                    if claims.iat <= before as u64 {
                        return Err(AppError::Unauthorized(format!(
                            "this device token was revoked (tokens of user {} issued at or before {} are refused); fetch a new one",
                            claims.sub,
                            crate::clock::rfc3339(before.saturating_mul(1000)),
                        )));
                    }
                }
                Ok(DeviceAuth(claims))
            }
            Err(e) => {
                if verify_api_key(state.store.as_ref(), &token)
                    .await?
                    .is_some()
                {
                    Err(AppError::Forbidden(
                        "an API key cannot call device routes; use a device token".into(),
                    ))
                } else {
                    Err(AppError::Unauthorized(e.to_string()))
                }
            }
        }
    }
}

fn url_param(query: &str, name: &str) -> Option<String> {
    // Decodes bytes, not `&str` slices: a `%` before a multi-byte character must not
    // split it (that panicked the request's task).
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// JSON body whose rejections are Herald errors: 400 when it is not JSON at all (or
/// lacks a JSON content type), 413 too large, 422 naming the field when the JSON does
/// not fit the schema. Parsing in two steps keeps "not JSON" and "wrong JSON" apart.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AppError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_json_media_type);
        if !is_json {
            return Err(AppError::Malformed(
                "send the body with `Content-Type: application/json`".into(),
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    AppError::TooLarge(
                        "request body is larger than the configured limit (limits.max_message_bytes for a message, limits.max_batch_bytes for a batch)".into(),
                    )
                } else {
                    AppError::Malformed(rejection.body_text())
                }
            })?;
        let malformed = |e: serde_json::Error| AppError::Malformed(format!("malformed JSON: {e}"));
        // serde_json keeps the last of duplicate keys; a proxy may read the first and
        // see another target. Refuse them rather than guess. This pass also checks the
        // syntax, so below only the shape can be wrong: 400 here, 422 there.
        serde_json::from_slice::<NoDuplicateKeys>(&bytes).map_err(malformed)?;
        // Every body is an object; serde would otherwise read a struct from an array.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(AppError::invalid("body", "must be a JSON object"));
        }
        // Straight from the bytes (no `Value` in between), so raw JSON fields such as
        // `data` keep their exact text.
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        match serde_path_to_error::deserialize::<_, T>(&mut de) {
            Ok(v) => de.end().map(|()| ApiJson(v)).map_err(malformed),
            Err(e) => {
                let path = e.path().to_string();
                let field = if path.is_empty() || path == "." {
                    "body".to_owned()
                } else {
                    path
                };
                Err(AppError::invalid(field, e.into_inner().to_string()))
            }
        }
    }
}

/// `application/json` or `application/<anything>+json`, parameters (charset) allowed,
/// compared case-insensitively as RFC 9110 says media types are.
fn is_json_media_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json")
            || (subtype.len() > 5
                && subtype.is_char_boundary(subtype.len() - 5)
                && subtype[subtype.len() - 5..].eq_ignore_ascii_case("+json")))
}

/// Parses any JSON and fails on an object with a repeated key, at any depth.
struct NoDuplicateKeys;

impl<'de> serde::Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = NoDuplicateKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E>(self, _: bool) -> Result<NoDuplicateKeys, E> {
                Ok(NoDuplicateKeys)
            }
            fn visit_i64<E>(self, _: i64) -> Result<NoDuplicateKeys, E> {
                Ok(NoDuplicateKeys)
            }
            fn visit_u64<E>(self, _: u64) -> Result<NoDuplicateKeys, E> {
                Ok(NoDuplicateKeys)
            }
            fn visit_f64<E>(self, _: f64) -> Result<NoDuplicateKeys, E> {
                Ok(NoDuplicateKeys)
            }
            fn visit_str<E>(self, _: &str) -> Result<NoDuplicateKeys, E> {
                Ok(NoDuplicateKeys)
            }
            fn visit_unit<E>(self) -> Result<NoDuplicateKeys, E> {
                Ok(NoDuplicateKeys)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<NoDuplicateKeys, A::Error> {
                while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
                Ok(NoDuplicateKeys)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<NoDuplicateKeys, A::Error> {
                let mut seen = std::collections::HashSet::new();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if !seen.insert(key.to_string()) {
                        return Err(serde::de::Error::custom(format_args!(
                            "duplicate key {key:?}"
                        )));
                    }
                    map.next_value::<NoDuplicateKeys>()?;
                }
                Ok(NoDuplicateKeys)
            }
        }
        d.deserialize_any(Visit)
    }
}

/// Query string with Herald errors (422 naming the parameter).
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                let text = e.body_text();
                let detail = text
                    .split_once("query string: ")
                    .map(|(_, d)| d.to_owned())
                    .unwrap_or(text);
                Err(AppError::invalid("query", detail))
            }
            Err(other) => Err(AppError::Malformed(other.body_text())),
        }
    }
}

/// Path parameters with Herald errors: axum answers a `%ff` in a segment with plain
/// text, where every other rejection is the documented JSON error.
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => match e.kind() {
                ErrorKind::InvalidUtf8InPathParam { key } => {
                    Err(AppError::invalid(key.as_str(), "is not valid UTF-8"))
                }
                _ => Err(AppError::invalid("path", e.body_text())),
            },
            Err(other) => Err(AppError::Malformed(other.body_text())),
        }
    }
}

/// The client's IP address: the TCP peer's, or, when the peer is one of
/// `server.trusted_proxies`, the address it forwarded (`X-Forwarded-For`, `Forwarded`).
/// Resolved once per request by `access::layer`; per-IP rate limits and logs use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, AppError> {
        parts
            .extensions
            .get::<ClientIp>()
            .copied()
            .ok_or_else(|| AppError::Internal(anyhow::anyhow!("no peer address on the request")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_media_types() {
        for ok in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/merge-patch+json",
        ] {
            assert!(is_json_media_type(ok), "{ok}");
        }
        for bad in [
            "application/jsonp",
            "text/html+json",
            "application/json-seq",
            "text/json",
            "application/+json",
            "",
        ] {
            assert!(!is_json_media_type(bad), "{bad}");
        }
    }

    #[test]
    fn duplicate_keys_are_found_at_any_depth() {
        let parse = |s: &str| serde_json::from_str::<NoDuplicateKeys>(s).is_ok();
        assert!(parse(
            r#"{"to":{"user":"a"},"data":{"x":[{"a":1},{"a":2}]}}"#
        ));
        assert!(!parse(r#"{"to":{"user":"a","user":"b"}}"#));
        assert!(!parse(r#"{"to":{"user":"a"},"to":{"user":"b"}}"#));
        assert!(!parse(r#"[{"k":1,"k":2}]"#));
        assert!(!parse(r#"{"a\u0062":1,"ab":2}"#));
    }

    #[test]
    fn query_params_are_decoded() {
        assert_eq!(
            url_param("a=1&access_token=x%2Ey", "access_token").as_deref(),
            Some("x.y")
        );
        assert_eq!(url_param("a=1", "access_token"), None);
        assert_eq!(
            url_param("access_token=%a\u{e9}", "access_token").as_deref(),
            Some("%a\u{e9}")
        );
    }
}
