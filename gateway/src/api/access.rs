//! Every HTTP request: a request id (`x-request-id`, see `crate::request_id`), an
//! access log line (tower-http `TraceLayer`: method, route, request id, the client's IP
//! as `server.trusted_proxies` resolves it, status, latency) and
//! `herald_http_request_duration_seconds{route,method,status}`.
//!
//! The access log names the matched route template (`/v1/devices/{id}`), never the
//! raw path or query: ids, `access_token` query parameters and headers (API keys,
//! device tokens) stay out of the logs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use tower_http::classify::ServerErrorsFailureClass;
use tower_http::trace::TraceLayer;
use tracing::Span;

use super::ClientIp;
use crate::metrics::Metrics;
use crate::proxy::TrustedProxies;
use crate::request_id::{RequestId, HEADER};

/// What the outermost middleware needs: the metrics it records and the proxies whose
/// forwarded addresses it believes.
#[derive(Clone)]
struct AccessState {
    metrics: Metrics,
    proxies: Arc<TrustedProxies>,
}

/// Wraps `router` (whose routes are all added) with request ids, the access log and
/// the HTTP metrics.
pub fn layer(router: Router, metrics: Metrics, proxies: TrustedProxies) -> Router {
    let state = AccessState {
        metrics,
        proxies: Arc::new(proxies),
    };
    router
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let id = req
                        .extensions()
                        .get::<RequestId>()
                        .map(RequestId::as_str)
                        .unwrap_or_default();
                    let span = tracing::info_span!(
                        "http",
                        method = %req.method(),
                        route = route(req),
                        request_id = %id,
                        client_ip = tracing::field::Empty,
                    );
                    if let Some(ClientIp(ip)) = req.extensions().get::<ClientIp>() {
                        span.record("client_ip", tracing::field::display(ip));
                    }
                    span
                })
                .on_request(())
                .on_response(|res: &Response, latency: Duration, _span: &Span| {
                    tracing::info!(
                        target: "herald::access",
                        status = res.status().as_u16(),
                        latency_ms = latency.as_secs_f64() * 1000.0,
                        "request"
                    )
                })
                .on_failure(
                    |failure: ServerErrorsFailureClass, latency: Duration, _span: &Span| {
                        // Only errors of the body stream reach here as such; a 5xx
                        // status is already in the access line.
                        if let ServerErrorsFailureClass::Error(e) = failure {
                            tracing::warn!(
                                target: "herald::access",
                                error = %e,
                                latency_ms = latency.as_secs_f64() * 1000.0,
                                "response failed"
                            )
                        }
                    },
                ),
        )
        .layer(axum::middleware::from_fn_with_state(state, request_id))
}

/// The route template the router matched, or `unmatched` (a 404 of the router), so
/// the label's values stay few.
fn route(req: &Request) -> &str {
    req.extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
        .unwrap_or("unmatched")
}

/// Standard methods by name, anything else as `other` (bounded label values).
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Chooses the request id and resolves the client's IP once (the access log and the
/// handlers read them as the request's `RequestId` / `ClientIp` extensions), times the
/// request, returns the id in the response.
async fn request_id(
    State(AccessState { metrics, proxies }): State<AccessState>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let id = RequestId::from_header(req.headers().get(HEADER).map(|v| v.as_bytes()));
    let value = HeaderValue::from_str(id.as_str()).expect("request ids are visible ASCII");
    req.extensions_mut().insert(id);
    // Behind a load balancer the TCP peer is the balancer: the client is whom it
    // forwarded, for the rate limits and the log alike.
    if let Some(peer) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
        let ip = proxies.client_ip(peer.0.ip(), req.headers());
        req.extensions_mut().insert(ClientIp(ip));
    }
    let route = route(&req).to_owned();
    let method = method_label(req.method());
    let mut res = next.run(req).await;
    res.headers_mut().insert(HEADER, value);
    metrics
        .http_requests
        .with_label_values(&[route.as_str(), method, res.status().as_str()])
        .observe(started.elapsed().as_secs_f64());
    res
}
