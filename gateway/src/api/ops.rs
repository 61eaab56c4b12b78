//! Operations: health, readiness, metrics, and JSON for unknown routes.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;

use subtle::ConstantTimeEq;

use super::AppState;
use crate::error::AppError;
use crate::store::StoreError;

pub async fn healthz() -> &'static str {
    "ok\n"
}

pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_string(),
        );
    }
    if let Err(problem) = state.router.cluster.health() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cluster bus unavailable: {problem}\n"),
        );
    }
    // A store that hangs (network loss) must not hang the load balancer's probe.
    let ping = tokio::time::timeout(std::time::Duration::from_secs(2), state.store.ping()).await;
    match ping.unwrap_or_else(|_| Err(StoreError::Other(anyhow::anyhow!("no answer within 2 s")))) {
        Ok(()) => {
            // A push credential problem does not make the node unready (live delivery
            // and publishing still work), but it must be impossible to miss.
            let mut body = "ready\n".to_string();
            for (kind, problem) in state.router.push.health.problems() {
                body.push_str(&format!("push {}: DEGRADED: {problem}\n", kind.as_str()));
            }
            (StatusCode::OK, body)
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store unavailable: {e}\n"),
        ),
    }
}

pub async fn metrics(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<impl IntoResponse, AppError> {
    if let Some(expected) = &state.config.ops.metrics_token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .unwrap_or("");
        // Compared as hashes, so the comparison time says nothing about the token.
        let ok = crate::auth::hash_api_key(presented).ct_eq(&crate::auth::hash_api_key(expected));
        if !bool::from(ok) {
            return Err(AppError::Unauthorized(
                "metrics need `Authorization: Bearer <ops.metrics_token>`".into(),
            ));
        }
    }
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    ))
}

pub async fn not_found() -> AppError {
    AppError::NotFound("no such route; see docs/protocol.md".into())
}

pub async fn method_not_allowed() -> impl IntoResponse {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(herald_protocol::ErrorBody {
            error: herald_protocol::ErrorDetail {
                code: "method_not_allowed".into(),
                message: "this route does not accept that method; see docs/protocol.md".into(),
            },
        }),
    )
}
