//! The OpenAPI 3.1 description of the HTTP API, built by utoipa from the protocol types
//! (`herald-protocol` with its `openapi` feature) and served at `GET /openapi.json`.
//!
//! One stub per operation below says which types and errors a route has; the handlers
//! stay in `service.rs`, `device.rs`, `sse.rs` and `ops.rs`. A unit test compares the
//! routes of `app()` with the spec's paths, so a route without an entry fails the build's
//! tests, and gateway/tests/system/openapi.rs validates real answers against these schemas.
//! `herald openapi` prints the same document.

use axum::http::header;
use axum::response::IntoResponse;
use serde_json::{json, Value};
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{AllOfBuilder, ObjectBuilder, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, Response};
use utoipa::{Modify, OpenApi, ToResponse};

use herald_protocol::{
    AckRequest, AckResponse, ApnsEnvironment, BatchItemResult, DeliveryRecord, DeliveryState,
    DeviceInfo, DeviceList, ErrorBody, ErrorDetail, InboxMessage, MessageStatus, Notification,
    Platform, Priority, PublishBatchRequest, PublishBatchResponse, PublishRequest, PublishResponse,
    PushContent, PushPolicy, PushProviderKind, PushTokenState, RegisterDeviceRequest, SyncResponse,
    Target, TokenRequest, TokenResponse, TopicList,
};

/// Every `error.code` the gateway answers with (docs/protocol.md, "Errors").
pub const ERROR_CODES: &[&str] = &[
    "malformed",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "not_acceptable",
    "conflict",
    "too_large",
    "invalid_field",
    "rate_limited",
    "unavailable",
    "internal",
];

/// `GET /openapi.json`, no credentials.
pub async fn serve() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        spec_json().to_string(),
    )
}

/// The document as JSON: utoipa's output plus the one thing its derives cannot say
/// (the closed list of error codes).
pub fn spec_json() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the spec serializes");
    if let Some(code) = doc.pointer_mut("/components/schemas/ErrorDetail/properties/code") {
        code["enum"] = json!(ERROR_CODES);
    }
    // The publish answer's `message_id` is the status route's `id` (a link: clients and
    // schemathesis's stateful phase follow it; scripts/gen-backend-docs.py too).
    if let Some(accepted) = doc.pointer_mut("/paths/~1v1~1messages/post/responses/202") {
        accepted["links"] = json!({"message_status": {
            "operationId": "message_status",
            "parameters": {"id": "$response.body#/message_id"},
            "description": "What happened to the message on each device.",
        }});
    }
    doc
}

/// The document, pretty-printed (what `herald openapi` prints).
pub fn spec_pretty() -> String {
    serde_json::to_string_pretty(&spec_json()).expect("the spec serializes")
}

/// `{"error": {"code": CODE, "message"}}` with `code` fixed to this status's one code.
fn error_response(code: &str, description: &str, headers: &[(&str, &str)]) -> RefOr<Response> {
    let pinned = ObjectBuilder::new().property(
        "error",
        ObjectBuilder::new().property(
            "code",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some([code])),
        ),
    );
    let schema = AllOfBuilder::new()
        .item(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
            "ErrorBody",
        )))
        .item(pinned);
    let mut response = ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new().schema(Some(schema)).build(),
    );
    for (name, what) in headers {
        response = response.header(
            *name,
            HeaderBuilder::new()
                .schema(ObjectBuilder::new().schema_type(Type::String))
                .description(Some(*what))
                .build(),
        );
    }
    response.build().into()
}

macro_rules! error_responses {
    ($($name:ident => $code:literal, $desc:literal $(, $h:literal = $hd:literal)*;)*) => {$(
        #[doc = $desc]
        pub struct $name;
        impl<'s> ToResponse<'s> for $name {
            fn response() -> (&'s str, RefOr<Response>) {
                (stringify!($name), error_response($code, $desc, &[$(($h, $hd)),*]))
            }
        }
    )*};
}

error_responses! {
    Malformed => "malformed", "The body is not JSON (or has a repeated key), or there is no `Content-Type: application/json`.";
    Unauthorized => "unauthorized", "No credentials, an unknown or revoked API key, or an invalid, expired or revoked device token.",
        "WWW-Authenticate" = "`Bearer`";
    Forbidden => "forbidden", "The right kind of caller without the right: an API key without the route's scope, a device token on a service route (or the reverse), a token bound to another device, a device of another user.";
    NotFound => "not_found", "Unknown message, device or route.";
    NotAcceptable => "not_acceptable", "`Accept` excludes `text/event-stream`.";
    Conflict => "conflict", "A cap would be exceeded (`limits.max_devices_per_user`, `limits.max_topics_per_device`), or the gateway cannot mint tokens (RS256/ES256).";
    TooLarge => "too_large", "The body is larger than the route's limit (`limits.max_message_bytes`, `limits.max_batch_bytes`, `limits.max_body_bytes`).";
    Invalid => "invalid_field", "Valid JSON (or a query or path) that does not fit: unknown field, wrong type, value out of range. The message starts with the field path.";
    RateLimited => "rate_limited", "Per-API-key publish rate or per-IP connect rate exceeded.",
        "Retry-After" = "Seconds to wait.";
    Unavailable => "unavailable", "The gateway is shutting down or at its connection cap; retry against another node.",
        "Retry-After" = "Seconds to wait.";
    Internal => "internal", "The store failed; nothing of the request was stored.";
    Timeout => "timeout", "The request took longer than `limits.request_timeout_ms`. A publish answered so may still have been stored: retry it with the same `idempotency_key`.";
}

/// One event of `GET /v1/connect/sse` (besides `: heartbeat` comment lines).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct SseEvent {
    /// The frame's `type` (`welcome`, `msg`, `pong`, `subscribed`, `unsubscribed`,
    /// `reconnect`, `error`), or `close` before the stream ends.
    event: String,
    /// The frame's JSON, as on the WebSocket; for `close`, `{"code", "reason"}`.
    data: String,
    /// The seq, on `msg` events.
    id: Option<String>,
}

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (`hk_` + 48 hex) from `herald keys create` or the first start: `Authorization: Bearer hk_…`. Each key has scopes (publish, read, devices, tokens; admin has them all): an operation's security requirement names the scope it needs, and a key without it is 403.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "device_jwt",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A device token: a JWT signed with the algorithm the gateway is configured for (HS256 with its secret, or RS256/ES256 with a public key or JWKS), claims `sub` (user), `exp`, `iss`, `aud`, optionally `did`, `topics`, `iat`, `nbf` (docs/protocol.md, \"Device tokens\").",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "access_token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "access_token",
                "The device token as a query parameter, on `GET /v1/connect` and `GET /v1/connect/sse` only (for clients that cannot set headers).",
            ))),
        );
        components.add_security_scheme(
            "metrics_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`ops.metrics_token`, when it is set: `Authorization: Bearer <token>`.",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Herald",
        description = "Herald notification gateway: backends publish with an API key, devices receive over WebSocket, SSE or long-poll with a device token. The prose reference is docs/protocol.md.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        paths::publish,
        paths::publish_batch,
        paths::message_status,
        paths::get_device,
        paths::delete_device,
        paths::user_devices,
        paths::revoke_tokens,
        paths::device_topics,
        paths::subscribe_device,
        paths::unsubscribe_device,
        paths::mint_token,
        paths::register_device,
        paths::remove_push_token,
        paths::sync,
        paths::ack,
        paths::connect,
        paths::connect_sse,
        paths::healthz,
        paths::readyz,
        paths::metrics,
        paths::openapi,
    ),
    components(
        schemas(
            AckRequest, AckResponse, ApnsEnvironment, BatchItemResult, DeliveryRecord,
            DeliveryState, DeviceInfo, DeviceList, ErrorBody, ErrorDetail, InboxMessage,
            MessageStatus, Notification, Platform, Priority, PublishBatchRequest,
            PublishBatchResponse, PublishRequest, PublishResponse, PushContent, PushPolicy,
            PushProviderKind, PushTokenState, RegisterDeviceRequest, SyncResponse, Target,
            TokenRequest, TokenResponse, TopicList, SseEvent,
        ),
        responses(
            Malformed, Unauthorized, Forbidden, NotFound, NotAcceptable, Conflict, TooLarge,
            Invalid, RateLimited, Unavailable, Internal, Timeout,
        ),
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "service", description = "Backend routes, API key"),
        (name = "device", description = "Device routes, device token"),
        (name = "ops", description = "Health, readiness, metrics, this document"),
    ),
)]
pub struct ApiDoc;

/// One stub per operation: only their `#[utoipa::path]` attributes are used.
#[allow(dead_code)]
mod paths {
    use super::*;

    /// Publish one message.
    ///
    /// Answered only after every inbox entry is durably committed. `recipients: 0`
    /// means nothing was stored (`hint` says why).
    #[utoipa::path(post, path = "/v1/messages", tag = "service",
        security(("api_key" = ["publish"])),
        params(("Idempotency-Key" = Option<String>, Header,
            description = "Same as the body's `idempotency_key` (if both are sent they must be equal).")),
        request_body(content = PublishRequest, example = json!({
            "to": {"user": "alice"},
            "data": {"text": "Your order shipped", "order": 42},
            "notification": {"title": "Shipped", "body": "Order 42 is on its way"},
            "push": "fallback",
            "ttl_seconds": 86400,
            "collapse_key": "order-42",
            "idempotency_key": "order-42-shipped"
        })),
        responses(
            (status = 202, description = "Committed (or a duplicate of an earlier message).", body = PublishResponse),
            (status = 400, response = Malformed), (status = 401, response = Unauthorized),
            (status = 403, response = Forbidden), (status = 404, response = NotFound),
            (status = 408, response = Timeout), (status = 413, response = TooLarge),
            (status = 422, response = Invalid), (status = 429, response = RateLimited),
            (status = 500, response = Internal), (status = 503, response = Unavailable),
        ))]
    fn publish() {}

    /// Publish up to 500 messages in one commit.
    ///
    /// One result per item, in request order; an item that fails gets its own error
    /// and writes nothing, the others go on.
    #[utoipa::path(post, path = "/v1/messages/batch", tag = "service",
        security(("api_key" = ["publish"])),
        request_body(content = PublishBatchRequest, example = json!({"messages": [
            {"to": {"device": "phone-1"}, "data": {"n": 1}},
            {"to": {"user": "bob"}, "data": {"n": 2}, "push": "never", "idempotency_key": "n-2"}
        ]})),
        responses(
            (status = 202, description = "Every accepted item is committed.", body = PublishBatchResponse),
            (status = 400, response = Malformed), (status = 401, response = Unauthorized),
            (status = 403, response = Forbidden), (status = 408, response = Timeout),
            (status = 413, response = TooLarge), (status = 422, response = Invalid),
            (status = 429, response = RateLimited), (status = 500, response = Internal),
            (status = 503, response = Unavailable),
        ))]
    fn publish_batch() {}

    /// A message and what happened to it on each device.
    #[utoipa::path(get, path = "/v1/messages/{id}", tag = "service",
        security(("api_key" = ["read"])),
        params(("id" = String, Path, description = "The `message_id` of the publish answer.", example = "msg_01939a6b7e2c7d3f8a1b2c3d4e5f6071")),
        responses(
            (status = 200, description = "The message and its deliveries.", body = MessageStatus),
            (status = 401, response = Unauthorized), (status = 403, response = Forbidden),
            (status = 404, response = NotFound), (status = 408, response = Timeout),
            (status = 422, response = Invalid), (status = 500, response = Internal),
        ))]
    fn message_status() {}

    /// A device.
    #[utoipa::path(get, path = "/v1/devices/{id}", tag = "service",
        security(("api_key" = ["read"])),
        params(("id" = String, Path, description = "Device id.", example = "phone-1")),
        responses(
            (status = 200, description = "The device.", body = DeviceInfo),
            (status = 401, response = Unauthorized), (status = 403, response = Forbidden),
            (status = 404, response = NotFound), (status = 408, response = Timeout),
            (status = 422, response = Invalid), (status = 500, response = Internal),
        ))]
    fn get_device() {}

    /// Delete a device, its inbox and subscriptions; closes its live session.
    #[utoipa::path(delete, path = "/v1/devices/{id}", tag = "service",
        security(("api_key" = ["devices"])),
        params(("id" = String, Path, description = "Device id.", example = "phone-1")),
        responses(
            (status = 204, description = "Deleted."),
            (status = 401, response = Unauthorized), (status = 403, response = Forbidden),
            (status = 404, response = NotFound), (status = 408, response = Timeout),
            (status = 422, response = Invalid), (status = 500, response = Internal),
        ))]
    fn delete_device() {}

    /// Every device of a user.
    #[utoipa::path(get, path = "/v1/users/{user}/devices", tag = "service",
        security(("api_key" = ["read"])),
        params(("user" = String, Path, description = "User id (a device token's `sub`).", example = "alice")),
        responses(
            (status = 200, description = "The user's devices (none: an empty list).", body = DeviceList),
            (status = 401, response = Unauthorized), (status = 403, response = Forbidden),
            (status = 408, response = Timeout), (status = 422, response = Invalid),
            (status = 500, response = Internal),
        ))]
    fn user_devices() {}

    /// Revoke every device token of a user issued up to now.
    #[utoipa::path(post, path = "/v1/users/{user}/revoke_tokens", tag = "service",
        security(("api_key" = ["devices"])),
        params(("user" = String, Path, description = "User id.", example = "bob")),
        responses(
            (status = 204, description = "Revoked; the user's live sessions close with 1008 `revoked`."),
            (status = 401, response = Unauthorized), (status = 403, response = Forbidden),
            (status = 408, response = Timeout), (status = 422, response = Invalid),
            (status = 500, response = Internal),
        ))]
    fn revoke_tokens() {}

    /// The topics a device is subscribed to (sorted).
    #[utoipa::path(get, path = "/v1/devices/{id}/topics", tag = "service",
        security(("api_key" = ["read"])),
        params(("id" = String, Path, description = "Device id.", example = "phone-1")),
        responses(
            (status = 200, description = "Sorted topics.", body = TopicList),
            (status = 401, response = Unauthorized), (status = 403, response = Forbidden),
            (status = 404, response = NotFound), (status = 408, response = Timeout),
            (status = 422, response = Invalid), (status = 500, response = Internal),
        ))]
    fn device_topics() {}

    /// Subscribe a device to a topic (idempotent).
    #[utoipa::path(put, path = "/v1/devices/{id}/topics/{topic}", tag = "service",
        security(("api_key" = ["devices"])),
        params(("id" = String, Path, description = "Device id.", example = "phone-1"),
            ("topic" = String, Path, description = "Topic.", example = "news")),
        responses(
            (status = 204, description = "Subscribed."),
            (status = 401, response = Unauthorized), (status = 403, response = Forbidden),
            (status = 404, response = NotFound), (status = 408, response = Timeout),
            (status = 409, response = Conflict), (status = 422, response = Invalid),
            (status = 500, response = Internal),
        ))]
    fn subscribe_device() {}

    /// Unsubscribe a device from a topic (idempotent).
    #[utoipa::path(delete, path = "/v1/devices/{id}/topics/{topic}", tag = "service",
        security(("api_key" = ["devices"])),
        params(("id" = String, Path, description = "Device id.", example = "phone-1"),
            ("topic" = String, Path, description = "Topic.", example = "news")),
        responses(
            (status = 204, description = "Unsubscribed."),
            (status = 401, response = Unauthorized), (status = 403, response = Forbidden),
            (status = 404, response = NotFound), (status = 408, response = Timeout),
            (status = 422, response = Invalid), (status = 500, response = Internal),
        ))]
    fn unsubscribe_device() {}

    /// Mint a device token (HS256 gateways only).
    #[utoipa::path(post, path = "/v1/tokens", tag = "service",
        security(("api_key" = ["tokens"])),
        request_body(content = TokenRequest, example = json!({
            "user": "alice", "device_id": "phone-1", "topics": ["news", "user.alice.*"], "ttl_seconds": 3600
        })),
        responses(
            (status = 200, description = "A device token.", body = TokenResponse),
            (status = 400, response = Malformed), (status = 401, response = Unauthorized),
            (status = 403, response = Forbidden), (status = 408, response = Timeout),
            (status = 409, response = Conflict), (status = 413, response = TooLarge),
            (status = 422, response = Invalid), (status = 500, response = Internal),
        ))]
    fn mint_token() {}

    /// Register a device and its push token.
    #[utoipa::path(put, path = "/v1/me/devices/{device_id}", tag = "device",
        security(("device_jwt" = [])),
        params(("device_id" = String, Path, description = "Device id (the token's `did`).", example = "phone-1")),
        request_body(content = RegisterDeviceRequest, example = json!({
            "platform": "android", "push_provider": "fcm", "push_token": "fcm-registration-token"
        })),
        responses(
            (status = 200, description = "The device as stored.", body = DeviceInfo),
            (status = 400, response = Malformed), (status = 401, response = Unauthorized),
            (status = 403, response = Forbidden), (status = 408, response = Timeout),
            (status = 409, response = Conflict), (status = 413, response = TooLarge),
            (status = 422, response = Invalid), (status = 500, response = Internal),
        ))]
    fn register_device() {}

    /// Forget the device's push token (logout).
    #[utoipa::path(delete, path = "/v1/me/devices/{device_id}/push_token", tag = "device",
        security(("device_jwt" = [])),
        params(("device_id" = String, Path, description = "Device id (the token's `did`).", example = "phone-1")),
        responses(
            (status = 204, description = "No push token any more (idempotent)."),
            (status = 401, response = Unauthorized), (status = 403, response = Forbidden),
            (status = 404, response = NotFound), (status = 408, response = Timeout),
            (status = 422, response = Invalid), (status = 500, response = Internal),
        ))]
    fn remove_push_token() {}

    /// Catch-up over HTTP; with `wait`, a long-poll.
    #[utoipa::path(get, path = "/v1/me/sync", tag = "device",
        security(("device_jwt" = [])),
        params(
            ("device_id" = String, Query, description = "Device id.", example = "phone-1"),
            ("after" = Option<i64>, Query, minimum = 0, description = "Entries with a greater seq (default 0)."),
            ("limit" = Option<u32>, Query, minimum = 1, description = "At most this many (default 100, max `delivery.replay_batch`)."),
            ("wait" = Option<u64>, Query, minimum = 0, maximum = 60, description = "Long-poll: hold up to this many seconds when nothing is waiting."),
        ),
        responses(
            (status = 200, description = "Entries after `after`, ascending.", body = SyncResponse),
            (status = 401, response = Unauthorized), (status = 403, response = Forbidden),
            (status = 404, response = NotFound), (status = 408, response = Timeout),
            (status = 422, response = Invalid), (status = 500, response = Internal),
        ))]
    fn sync() {}

    /// Cumulative acknowledgement.
    #[utoipa::path(post, path = "/v1/me/ack", tag = "device",
        security(("device_jwt" = [])),
        request_body(content = AckRequest, example = json!({"device_id": "phone-1", "seq": 1})),
        responses(
            (status = 200, description = "The device's acked seq now.", body = AckResponse),
            (status = 400, response = Malformed), (status = 401, response = Unauthorized),
            (status = 403, response = Forbidden), (status = 404, response = NotFound),
            (status = 408, response = Timeout), (status = 413, response = TooLarge),
            (status = 422, response = Invalid), (status = 500, response = Internal),
        ))]
    fn ack() {}

    /// The WebSocket session (subprotocol `herald.v1`; frames in docs/protocol.md).
    #[utoipa::path(get, path = "/v1/connect", tag = "device",
        security(("device_jwt" = []), ("access_token" = [])),
        params(
            ("device_id" = String, Query, description = "Device id.", example = "phone-1"),
            ("after" = Option<i64>, Query, minimum = 0, description = "Highest seq the device already has."),
        ),
        responses(
            (status = 101, description = "Switched to the WebSocket."),
            (status = 400, response = Malformed), (status = 401, response = Unauthorized),
            (status = 403, response = Forbidden), (status = 409, response = Conflict),
            (status = 422, response = Invalid), (status = 429, response = RateLimited),
            (status = 500, response = Internal), (status = 503, response = Unavailable),
        ))]
    fn connect() {}

    /// The session as Server-Sent Events.
    #[utoipa::path(get, path = "/v1/connect/sse", tag = "device",
        security(("device_jwt" = []), ("access_token" = [])),
        params(
            ("device_id" = String, Query, description = "Device id.", example = "phone-1"),
            ("after" = Option<i64>, Query, minimum = 0, description = "Highest seq the device already has."),
            ("Last-Event-ID" = Option<String>, Header, description = "Resumes like `after` and wins over it."),
        ),
        responses(
            (status = 200, description = "The event stream: one event per server frame.", content_type = "text/event-stream", body = SseEvent),
            (status = 401, response = Unauthorized), (status = 403, response = Forbidden),
            (status = 406, response = NotAcceptable), (status = 409, response = Conflict),
            (status = 422, response = Invalid), (status = 429, response = RateLimited),
            (status = 500, response = Internal), (status = 503, response = Unavailable),
        ))]
    fn connect_sse() {}

    /// Liveness.
    #[utoipa::path(get, path = "/healthz", tag = "ops",
        responses((status = 200, description = "`ok`", content_type = "text/plain", body = String)))]
    fn healthz() {}

    /// Readiness: the store answers and, in cluster mode, NATS is reachable.
    #[utoipa::path(get, path = "/readyz", tag = "ops",
        responses(
            (status = 200, description = "`ready`, plus a line per degraded push provider", content_type = "text/plain", body = String),
            (status = 503, description = "Not ready, and why", content_type = "text/plain", body = String),
        ))]
    fn readyz() {}

    /// Prometheus metrics (on this listener only when `ops.listen` is not set).
    #[utoipa::path(get, path = "/metrics", tag = "ops",
        security((), ("metrics_token" = [])),
        responses(
            (status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
            (status = 401, response = Unauthorized),
        ))]
    fn metrics() {}

    /// This document.
    #[utoipa::path(get, path = "/openapi.json", tag = "ops",
        responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object)))]
    fn openapi() {}
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// `(METHOD, path)` of every `.route(...)` in `app()`, read from its source: axum's
    /// `Router` does not list its routes, and a route added there without an entry here
    /// must fail this test.
    fn router_routes() -> BTreeSet<(String, String)> {
        let src = include_str!("mod.rs");
        let start = src.find("pub fn app(").expect("app() in api/mod.rs");
        let end = src[start..].find("\n}\n").expect("end of app()") + start;
        let body = &src[start..end];
        let mut routes = BTreeSet::new();
        let mut rest = body;
        while let Some(at) = rest.find(".route(") {
            let call = &rest[at + ".route(".len()..];
            let mut depth = 1;
            let close = call
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .expect("balanced .route(...)")
                .0;
            let args = &call[..close];
            let path = args.split('"').nth(1).expect("a path literal").to_owned();
            for method in ["get", "post", "put", "delete", "patch", "head", "options"] {
                let pat = format!("{method}(");
                let mut from = 0;
                while let Some(i) = args[from..].find(&pat) {
                    let i = from + i;
                    let before = args[..i].chars().last();
                    if !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                        routes.insert((method.to_uppercase(), path.clone()));
                    }
                    from = i + pat.len();
                }
            }
            rest = &call[close..];
        }
        routes
    }

    fn spec_routes() -> BTreeSet<(String, String)> {
        let doc = spec_json();
        let mut routes = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                routes.insert((method.to_uppercase(), path.clone()));
            }
        }
        routes
    }

    #[test]
    fn every_route_of_the_router_is_in_the_spec_and_back() {
        let router = router_routes();
        // The parser must see the routes it is meant to see, or the comparison is empty.
        assert!(router.contains(&("POST".into(), "/v1/messages".into())));
        assert!(router.contains(&("DELETE".into(), "/v1/devices/{id}/topics/{topic}".into())));
        assert!(router.len() >= 20, "{router:?}");
        let spec = spec_routes();
        let missing: Vec<_> = router.difference(&spec).collect();
        assert!(
            missing.is_empty(),
            "routes without an OpenAPI entry: {missing:?}"
        );
        let extra: Vec<_> = spec.difference(&router).collect();
        assert!(
            extra.is_empty(),
            "OpenAPI entries without a route: {extra:?}"
        );
    }

    #[test]
    fn the_spec_is_openapi_3_1_with_errors_and_security() {
        let doc = spec_json();
        assert_eq!(doc["openapi"], "3.1.0");
        let codes = &doc["components"]["schemas"]["ErrorDetail"]["properties"]["code"]["enum"];
        assert_eq!(codes.as_array().unwrap().len(), ERROR_CODES.len());
        for scheme in ["api_key", "device_jwt", "access_token", "metrics_token"] {
            assert!(
                doc["components"]["securitySchemes"][scheme].is_object(),
                "{scheme}"
            );
        }
        // Every operation documents its errors: an authenticated one at least 401.
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if op.get("security").is_some() && path != "/metrics" {
                    assert!(
                        op["responses"]["401"].is_object(),
                        "{method} {path} has no 401"
                    );
                }
            }
        }
    }
}
