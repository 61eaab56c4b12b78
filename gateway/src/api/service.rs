//! Service routes (API key): publish, message status, devices, tokens.

use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Extension;
use axum::Json;
use herald_protocol::{
    BatchItemResult, DeviceInfo, DeviceList, MessageStatus, PublishBatchResponse, PublishRequest,
    PublishResponse, Target, TokenRequest, TokenResponse, TopicList, MAX_BATCH_ITEMS,
};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{require_id, ApiJson, ApiPath, AppState, ServiceAuth};
use crate::auth::{Grant, Scope};
use crate::clock::{now_ms, rfc3339};
use crate::error::AppError;
use crate::registry::KickReason;
use crate::request_id::RequestId;
use crate::store::{push_due_at, MessagePayload, NewMessage, PublishOutcome};

const IDEMPOTENCY_WINDOW_MS: i64 = 24 * 3600 * 1000;

pub async fn publish(
    State(state): State<AppState>,
    auth: ServiceAuth,
    headers: HeaderMap,
    Extension(request_id): Extension<RequestId>,
    ApiJson(req): ApiJson<PublishRequest>,
) -> Result<impl IntoResponse, AppError> {
    auth.require(Scope::Publish)?;
    let key = auth.0;
    state
        .publish_limiter
        .check(&key.id)
        .map_err(|retry_after_s| AppError::RateLimited { retry_after_s })?;
    if state.shutdown.is_cancelled() {
        return Err(AppError::Unavailable);
    }
    let idempotency_key = idempotency_key(&headers, &req)?;
    let msg = new_message(&state, &key.id, req, idempotency_key, now_ms())?;
    let (message_id, to) = (msg.id.clone(), msg.target.clone());
    let outcome = state.store.publish(msg).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(settle(
            &state,
            message_id,
            &to,
            outcome,
            Instant::now(),
            &request_id,
        )),
    ))
}

/// `POST /v1/messages/batch`: the items are parsed one by one, so one bad item gets
/// its own error instead of failing the envelope.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchEnvelope {
    messages: Vec<Box<RawValue>>,
}

pub async fn publish_batch(
    State(state): State<AppState>,
    auth: ServiceAuth,
    headers: HeaderMap,
    Extension(request_id): Extension<RequestId>,
    ApiJson(batch): ApiJson<BatchEnvelope>,
) -> Result<impl IntoResponse, AppError> {
    auth.require(Scope::Publish)?;
    let key = auth.0;
    let n = batch.messages.len();
    if n == 0 || n > MAX_BATCH_ITEMS {
        return Err(AppError::invalid(
            "messages",
            format!("must hold 1 to {MAX_BATCH_ITEMS} messages, got {n}"),
        ));
    }
    if headers.contains_key("idempotency-key") {
        return Err(AppError::invalid(
            "Idempotency-Key",
            "a batch has no key of its own; give each message its idempotency_key",
        ));
    }
    state
        .publish_limiter
        .check_n(&key.id, n as u32)
        .map_err(|retry_after_s| AppError::RateLimited { retry_after_s })?;
    if state.shutdown.is_cancelled() {
        return Err(AppError::Unavailable);
    }
    let now = now_ms();
    let max_bytes = state.config.limits.max_message_bytes;
    // Per item: the message to store, or the error that item answers with.
    let prepared: Vec<Result<NewMessage, AppError>> = batch
        .messages
        .iter()
        .map(|raw| {
            if raw.get().len() > max_bytes {
                return Err(AppError::TooLarge(format!(
                    "message is larger than limits.max_message_bytes ({max_bytes} bytes)"
                )));
            }
            let req = parse_item(raw.get())?;
            let key_ = idempotency_key(&HeaderMap::new(), &req)?;
            new_message(&state, &key.id, req, key_, now)
        })
        .collect();
    let msgs: Vec<NewMessage> = prepared
        .iter()
        .filter_map(|p| p.as_ref().ok().cloned())
        .collect();
    let ids: Vec<(String, Target)> = msgs
        .iter()
        .map(|m| (m.id.clone(), m.target.clone()))
        .collect();
    let mut stored = if msgs.is_empty() {
        Vec::new()
    } else {
        state.store.publish_batch(msgs).await?
    }
    .into_iter()
    .zip(ids);
    let committed_at = Instant::now();
    let results = prepared
        .into_iter()
        .map(|p| {
            let outcome = p.and_then(|_| {
                let (outcome, (id, to)) = stored.next().expect("one outcome per stored item");
                outcome
                    .map(|o| settle(&state, id, &to, o, committed_at, &request_id))
                    .map_err(AppError::from)
            });
            match outcome {
                Ok(r) => BatchItemResult::Ok(r),
                Err(e) => BatchItemResult::Err(e.body()),
            }
        })
        .collect();
    Ok((StatusCode::ACCEPTED, Json(PublishBatchResponse { results })))
}

/// One batch item, with the errors `POST /v1/messages` gives for the same body.
fn parse_item(text: &str) -> Result<PublishRequest, AppError> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize::<_, PublishRequest>(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path.is_empty() || path == "." {
            "body".to_owned()
        } else {
            path
        };
        AppError::invalid(field, e.into_inner().to_string())
    })
}

/// Validates a publish body into the message to store.
fn new_message(
    state: &AppState,
    api_key_id: &str,
    req: PublishRequest,
    idempotency_key: Option<String>,
    now: i64,
) -> Result<NewMessage, AppError> {
    require_id(&format!("to.{}", req.to.kind()), req.to.value())?;
    if !req.data.is_object() {
        return Err(AppError::invalid("data", "must be a JSON object"));
    }
    let delivery = &state.config.delivery;
    let ttl = req.ttl_seconds.unwrap_or(delivery.default_ttl_seconds);
    if ttl == 0 || ttl > delivery.max_ttl_seconds {
        return Err(AppError::invalid(
            "ttl_seconds",
            format!("must be between 1 and {}", delivery.max_ttl_seconds),
        ));
    }
    if let Some(c) = &req.collapse_key {
        if c.is_empty() || c.len() > 64 {
            return Err(AppError::invalid("collapse_key", "must be 1 to 64 bytes"));
        }
    }
    if let Some(n) = &req.notification {
        for (field, value) in [("title", &n.title), ("body", &n.body), ("sound", &n.sound)] {
            if value.as_ref().is_some_and(|v| v.len() > 4096) {
                return Err(AppError::invalid(
                    format!("notification.{field}"),
                    "must be at most 4096 bytes",
                ));
            }
        }
    }
    Ok(NewMessage {
        id: format!("msg_{}", uuid::Uuid::now_v7().simple()),
        api_key_id: api_key_id.to_owned(),
        target: req.to,
        payload: MessagePayload {
            data: req.data,
            notification: req.notification,
            push: req.push,
            push_content: req.push_content,
            priority: req.priority,
            collapse_key: req.collapse_key,
        },
        created_at: now,
        expires_at: now + (ttl as i64) * 1000,
        idempotency_key,
        idempotency_since: now - IDEMPOTENCY_WINDOW_MS,
        max_recipients: state.config.limits.max_recipients,
        push_due_at: push_due_at(req.push, now, delivery.ack_timeout_ms as i64),
    })
}

/// Hands a committed publish to delivery and says what the backend is told.
fn settle(
    state: &AppState,
    message_id: String,
    to: &Target,
    outcome: PublishOutcome,
    committed_at: Instant,
    request_id: &RequestId,
) -> PublishResponse {
    match outcome {
        PublishOutcome::Created { entries } => {
            let recipients = entries.len() as u64;
            // Before routing, so the delivery and push log lines find it.
            crate::request_id::remember(&message_id, request_id);
            state.metrics.published.inc();
            state.metrics.inbox_entries.inc_by(recipients);
            state.router.route(entries, committed_at);
            PublishResponse {
                message_id,
                hint: no_recipients_hint(to, recipients),
                recipients,
                duplicate: false,
            }
        }
        PublishOutcome::Duplicate {
            message_id,
            recipients,
        } => PublishResponse {
            message_id,
            hint: no_recipients_hint(to, recipients),
            recipients,
            duplicate: true,
        },
    }
}

/// A 202 with `recipients: 0` looks like success; say that nothing was kept, and why,
/// since inboxes exist per device and a device that appears later gets nothing.
fn no_recipients_hint(to: &Target, recipients: u64) -> Option<String> {
    if recipients > 0 {
        return None;
    }
    match to {
        Target::User(u) => Some(format!(
            "user {u} has no devices, so nothing was stored: a device exists once it connects \
             (GET /v1/connect) or registers (PUT /v1/me/devices/{{id}}), and gets only messages sent after that"
        )),
        Target::Topic(t) => Some(format!(
            "no device is subscribed to topic {t}, so nothing was stored: only devices subscribed \
             when a message is sent get it"
        )),
        // An unknown device is a 404 before anything is stored.
        Target::Device(_) => None,
    }
}

fn idempotency_key(headers: &HeaderMap, req: &PublishRequest) -> Result<Option<String>, AppError> {
    let header = match headers.get("idempotency-key") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| AppError::invalid("Idempotency-Key", "must be visible ASCII"))?
                .to_owned(),
        ),
        None => None,
    };
    let key = match (header, &req.idempotency_key) {
        (Some(h), Some(b)) if &h != b => {
            return Err(AppError::invalid(
                "idempotency_key",
                "differs from the Idempotency-Key header; send one or make them equal",
            ))
        }
        (Some(h), _) => Some(h),
        (None, b) => b.clone(),
    };
    if let Some(k) = &key {
        if k.is_empty() || k.len() > 255 || k.chars().any(|c| c.is_control()) {
            return Err(AppError::invalid(
                "idempotency_key",
                "must be 1 to 255 printable characters",
            ));
        }
    }
    Ok(key)
}

pub async fn message_status(
    State(state): State<AppState>,
    auth: ServiceAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<MessageStatus>, AppError> {
    auth.require(Scope::Read)?;
    let (msg, rows) = state
        .store
        .message(&id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no message {id}")))?;
    let now = now_ms();
    Ok(Json(MessageStatus {
        message_id: msg.id,
        to: msg.target,
        data: msg.payload.data,
        notification: msg.payload.notification,
        push: msg.payload.push,
        push_content: msg.payload.push_content,
        priority: msg.payload.priority,
        collapse_key: msg.payload.collapse_key,
        created_at: rfc3339(msg.created_at),
        expires_at: rfc3339(msg.expires_at),
        deliveries: rows.iter().map(|r| r.to_wire(now)).collect(),
    }))
}

pub async fn get_device(
    State(state): State<AppState>,
    auth: ServiceAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<DeviceInfo>, AppError> {
    auth.require(Scope::Read)?;
    let device = state
        .store
        .device(&id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no device {id}")))?;
    let online = state.is_online(&id).await;
    Ok(Json(device.to_wire(online)))
}

pub async fn user_devices(
    State(state): State<AppState>,
    auth: ServiceAuth,
    ApiPath(user): ApiPath<String>,
) -> Result<Json<DeviceList>, AppError> {
    auth.require(Scope::Read)?;
    let devices = state.store.user_devices(&user).await?;
    let online =
        futures_util::future::join_all(devices.iter().map(|d| state.is_online(&d.id))).await;
    Ok(Json(DeviceList {
        devices: devices
            .iter()
            .zip(online)
            .map(|(d, online)| d.to_wire(online))
            .collect(),
    }))
}

pub async fn delete_device(
    State(state): State<AppState>,
    auth: ServiceAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, AppError> {
    auth.require(Scope::Devices)?;
    if !state.store.delete_device(&id).await? {
        return Err(AppError::NotFound(format!("no device {id}")));
    }
    state.registry.kick(&id, KickReason::Deleted);
    state.router.cluster.kick_deleted(&id).await;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn mint_token(
    State(state): State<AppState>,
    auth: ServiceAuth,
    ApiJson(req): ApiJson<TokenRequest>,
) -> Result<Json<TokenResponse>, AppError> {
    auth.require(Scope::Tokens)?;
    require_id("user", &req.user)?;
    if let Some(d) = &req.device_id {
        require_id("device_id", d)?;
    }
    if let Some(topics) = &req.topics {
        for (i, p) in topics.iter().enumerate() {
            crate::auth::validate_topic_pattern(p).map_err(|m| {
                AppError::invalid(
                    format!("topics[{i}]"),
                    format!("{m} (a topic, or a prefix ending in `*`)"),
                )
            })?;
        }
    }
    let auth = &state.config.auth;
    let ttl = req.ttl_seconds.unwrap_or(auth.default_token_ttl_seconds);
    if ttl == 0 || ttl > auth.max_token_ttl_seconds {
        return Err(AppError::invalid(
            "ttl_seconds",
            format!("must be between 1 and {}", auth.max_token_ttl_seconds),
        ));
    }
    let grant = Grant {
        device_id: req.device_id,
        topics: req.topics,
    };
    let (token, exp) = state
        .tokens
        .mint_grant(&req.user, &grant, ttl)
        .map_err(|e| match e {
            crate::auth::TokenError::CannotMint(m) => AppError::Conflict(m),
            other => AppError::Internal(anyhow::anyhow!(other.to_string())),
        })?;
    Ok(Json(TokenResponse {
        token,
        expires_at: rfc3339(exp as i64 * 1000),
    }))
}

/// Revokes every device token of `user` issued up to now and closes the user's live
/// sessions, on every node.
pub async fn revoke_tokens(
    State(state): State<AppState>,
    auth: ServiceAuth,
    ApiPath(user): ApiPath<String>,
) -> Result<StatusCode, AppError> {
    auth.require(Scope::Devices)?;
    require_id("user", &user)?;
    // Whole seconds, like `iat`: a token minted in this second is refused too, because
    // it cannot be told apart from one minted just before the revocation.
    let before = now_ms().div_euclid(1000);
    state.store.revoke_user_tokens(&user, before).await?;
    for device in state.store.user_devices(&user).await? {
        state.registry.kick(&device.id, KickReason::Revoked);
        state.router.cluster.kick_revoked(&device.id).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn existing_device(state: &AppState, id: &str) -> Result<(), AppError> {
    require_id("device_id", id)?;
    match state.store.device(id).await? {
        Some(_) => Ok(()),
        None => Err(AppError::NotFound(format!("no device {id}"))),
    }
}

pub async fn device_topics(
    State(state): State<AppState>,
    auth: ServiceAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<TopicList>, AppError> {
    auth.require(Scope::Read)?;
    existing_device(&state, &id).await?;
    Ok(Json(TopicList {
        topics: state.store.device_topics(&id).await?,
    }))
}

/// Backend-managed subscription: bypasses `auth.topic_policy`, not the per-device cap.
pub async fn subscribe_device(
    State(state): State<AppState>,
    auth: ServiceAuth,
    ApiPath((id, topic)): ApiPath<(String, String)>,
) -> Result<StatusCode, AppError> {
    auth.require(Scope::Devices)?;
    require_id("topic", &topic)?;
    existing_device(&state, &id).await?;
    check_topic_cap(&state, &id, &topic).await?;
    state.store.subscribe(&id, &topic).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn unsubscribe_device(
    State(state): State<AppState>,
    auth: ServiceAuth,
    ApiPath((id, topic)): ApiPath<(String, String)>,
) -> Result<StatusCode, AppError> {
    auth.require(Scope::Devices)?;
    require_id("topic", &topic)?;
    existing_device(&state, &id).await?;
    state.store.unsubscribe(&id, &topic).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `limits.max_topics_per_device`: a new subscription past it is a 409 `conflict`
/// (re-subscribing to a topic the device has is not new).
pub async fn check_topic_cap(
    state: &AppState,
    device_id: &str,
    topic: &str,
) -> Result<(), AppError> {
    let max = state.config.limits.max_topics_per_device;
    let topics = state.store.device_topics(device_id).await?;
    if topics.len() >= max && !topics.iter().any(|t| t == topic) {
        return Err(AppError::Conflict(format!(
            "device {device_id} is subscribed to {} topics, the maximum (limits.max_topics_per_device = {max}); unsubscribe one first",
            topics.len()
        )));
    }
    Ok(())
}
