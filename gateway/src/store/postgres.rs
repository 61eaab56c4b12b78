//! The shared store: PostgreSQL, for several gateway nodes on one database.
//!
//! Behaviour is the same as `sqlite.rs` (that file is the reference); what differs is
//! how it stays correct when several nodes write at once:
//! - publishes (single and batch), acks, sent marks, device claims and presence go
//!   through a group commit per node (`postgres_group.rs`): everything waiting runs in
//!   one transaction of set-based statements, and every caller is answered after the
//!   commit;
//! - seqs are assigned while the recipients' device rows are locked (one
//!   `SELECT … ORDER BY id FOR UPDATE` per group, held until commit), so seqs of one
//!   device are assigned in commit order on every node and groups cannot deadlock
//!   each other on devices;
//! - the unique index on `(api_key_id, idempotency_key)` arbitrates concurrent
//!   publishes with one key on different nodes: the losing group's insert does
//!   nothing, it rolls back and runs again, and then finds the winner's message
//!   (`Duplicate`);
//! - `claim_pushes` locks the candidate rows `FOR UPDATE SKIP LOCKED` and flips them
//!   to `sending` in the same statement: rows another node is claiming right now are
//!   skipped (that node sends them), and a row whose claim committed meanwhile no
//!   longer matches when PostgreSQL re-checks it, so exactly one node wins each push;
//! - `sending` rows are *not* reset at open (another node may be sending them); a
//!   claim older than the stale limit belongs to a node that died, and is recorded as
//!   failed with an unknown outcome (`fail_orphaned_pushes`), never sent twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_protocol::{
    ApnsEnvironment, Platform, PushProviderKind, PushTokenState, RegisterDeviceRequest, Target,
};
use sqlx::postgres::{PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, PgPool, Row};

use super::postgres_group::{Group, Write, EVENT_ID_SQL};
use super::{
    ApiKeyRecord, DeliveryRow, Device, InboxEntry, MessagePayload, NewMessage, PublishOutcome,
    PushAction, PushMark, PushResult, Store, StoreError, StoreResult, StoredMessage,
    ORPHANED_PUSH_REASON,
};
use crate::webhooks::{EventSet, EventType, QueuedEvent};

/// The due poller's take: `$1` now, `$2` the lease's end, `$3` the most rows. Public
/// for the test that checks it reaches `deliveries_push_due` (migration 0001) rather
/// than scanning the inbox.
pub const TAKE_DUE_SQL: &str = "WITH taken AS (
         UPDATE deliveries d SET push_due_at = $2
         WHERE (d.device_id, d.seq) IN (
             SELECT device_id, seq FROM deliveries
             WHERE push_state = 'pending' AND push_due_at <= $1 AND expires_at > $1
               AND (acked_at IS NULL OR push_always)
             ORDER BY push_due_at LIMIT $3
             FOR UPDATE SKIP LOCKED)
         RETURNING d.device_id, d.seq, d.push_attempts, d.message_id)
     SELECT t.device_id, t.seq, t.push_attempts, m.id, m.target_kind, m.target, m.payload, m.created_at, m.expires_at
     FROM taken t JOIN messages m ON m.id = t.message_id
     ORDER BY m.created_at, t.seq";

/// Fails pushes left `sending` by a sender that died (`$1` now, `$2` the reason, `$3`
/// the stale bound, `$4` whether to queue `push_failed` events), in one statement: the
/// rows it fails are the rows it queues events for, whichever node runs it. Public for
/// the test that checks it reaches `deliveries_push_sending` (migration 0007).
pub static FAIL_ORPHANS_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH failed AS (
             UPDATE deliveries SET push_state = 'failed', push_at = $1, reason = $2
             WHERE push_state = 'sending' AND push_at < $3
             RETURNING device_id, seq, message_id, push_provider),
         queued AS (
             INSERT INTO webhook_events (event_id, type, message_id, device_id, user_id, seq, provider, error, at, queued_at, next_attempt_at)
             SELECT {EVENT_ID_SQL}, 'push_failed', f.message_id, f.device_id, v.user_id, f.seq, COALESCE(f.push_provider, v.push_provider), $2, $1, $1, $1
             FROM failed f JOIN devices v ON v.id = f.device_id WHERE $4)
         SELECT count(*) AS n FROM failed"
    )
});

static MIGRATOR: std::sync::LazyLock<sqlx::migrate::Migrator> =
    std::sync::LazyLock::new(|| super::migrations::migrator(super::migrations::POSTGRES));

/// Connections per gateway node.
const POOL_SIZE: u32 = 16;

pub struct PostgresStore {
    pool: PgPool,
    /// Publishes, acks, sent marks, claims and presence: group commit.
    group: Group,
    /// Webhook event types to queue (none when webhooks are off).
    events: EventSet,
}

impl PostgresStore {
    /// Connects to `database_url` (`postgres://user:pass@host:5432/db`) and applies
    /// the migrations (sqlx takes an advisory lock, so nodes may start together).
    pub async fn open(database_url: &str) -> StoreResult<PostgresStore> {
        PostgresStore::open_with(database_url, EventSet::NONE).await
    }

    /// `open`, queueing webhook events of the types in `events`.
    pub async fn open_with(database_url: &str, events: EventSet) -> StoreResult<PostgresStore> {
        let shown = redact(database_url);
        // One direct connection first: the pool would only report "timed out", this
        // says why (refused, bad password, no such database).
        let probe = PgConnection::connect(database_url).await.map_err(|e| {
            StoreError::Other(anyhow::anyhow!(
                "cannot connect to PostgreSQL at {shown}: {e}"
            ))
        })?;
        let _ = probe.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(Duration::from_secs(10))
            .connect(database_url)
            .await
            .map_err(|e| {
                StoreError::Other(anyhow::anyhow!(
                    "cannot connect to PostgreSQL at {shown}: {e}"
                ))
            })?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Other(anyhow::anyhow!("migrating {shown}: {e}")))?;
        let group = Group::start(pool.clone(), events);
        Ok(PostgresStore {
            pool,
            group,
            events,
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable database_url>".into(),
    }
}

/// 40001 serialization_failure, 40P01 deadlock_detected: nothing was committed.
pub(super) fn is_retryable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("40001") | Some("40P01")))
}

pub(super) fn device_from_row(row: &PgRow) -> Device {
    Device {
        id: row.get("id"),
        user_id: row.get("user_id"),
        platform: row
            .get::<Option<String>, _>("platform")
            .and_then(|s| Platform::parse(&s)),
        push_provider: row
            .get::<Option<String>, _>("push_provider")
            .and_then(|s| PushProviderKind::parse(&s)),
        push_token: row.get("push_token"),
        apns_environment: row
            .get::<Option<String>, _>("apns_environment")
            .and_then(|s| ApnsEnvironment::parse(&s)),
        token_state: PushTokenState::parse(row.get::<&str, _>("token_state"))
            .unwrap_or(PushTokenState::None),
        token_error: row.get("token_error"),
        last_seq: row.get("last_seq"),
        acked_seq: row.get("acked_seq"),
        last_seen: row.get("last_seen"),
    }
}

fn message_from_row(row: &PgRow) -> StoreResult<StoredMessage> {
    let id: String = row.get("id");
    let target: String = row.get("target");
    let target = match row.get::<&str, _>("target_kind") {
        "user" => Target::User(target),
        "device" => Target::Device(target),
        _ => Target::Topic(target),
    };
    let payload: MessagePayload = serde_json::from_str(row.get::<&str, _>("payload"))
        .map_err(|e| StoreError::Other(anyhow::anyhow!("message {id} payload: {e}")))?;
    Ok(StoredMessage::new(
        id,
        target,
        payload,
        row.get("created_at"),
        row.get("expires_at"),
    ))
}

fn key_from_row(row: &PgRow) -> ApiKeyRecord {
    ApiKeyRecord {
        id: row.get("id"),
        name: row.get("name"),
        prefix: row.get("prefix"),
        hash: row.get("hash"),
        created_at: row.get("created_at"),
        revoked_at: row.get("revoked_at"),
        scopes: super::scopes_from_text(row.get("scopes")),
    }
}

pub(super) const DEVICE_COLUMNS: &str = "id, user_id, platform, push_provider, push_token, apns_environment, token_state, token_error, last_seq, acked_seq, last_seen";
const KEY_COLUMNS: &str = "id, name, prefix, hash, created_at, revoked_at, scopes";

impl PostgresStore {
    async fn device_on(&self, device_id: &str) -> StoreResult<Option<Device>> {
        let row = sqlx::query(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1"
        ))
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(device_from_row))
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn setting(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn init_setting(&self, key: &str, value: &str) -> StoreResult<String> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
                .bind(key)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn create_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, name, prefix, hash, created_at, revoked_at, scopes) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&key.id)
        .bind(&key.name)
        .bind(&key.prefix)
        .bind(&key.hash)
        .bind(key.created_at)
        .bind(key.revoked_at)
        .bind(crate::auth::Scope::join(&key.scopes))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        let rows = sqlx::query(&format!(
            r#"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id COLLATE "C""#
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(key_from_row).collect())
    }

    async fn revoke_api_key(&self, id_or_prefix: &str, now: i64) -> StoreResult<u64> {
        let res = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE (id = $2 OR prefix = $2) AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(id_or_prefix)
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected())
    }

    async fn api_key_by_hash(&self, hash: &[u8]) -> StoreResult<Option<ApiKeyRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE hash = $1"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(key_from_row))
    }

    async fn claim_device(
        &self,
        device_id: &str,
        user: &str,
        now: i64,
        max_devices: u64,
    ) -> StoreResult<Device> {
        // Insert-if-absent, then read, in the next group: whichever node's insert won,
        // everyone reads the same owner afterwards.
        self.group
            .write(|reply| Write::Claim {
                device_id: device_id.to_owned(),
                user: user.to_owned(),
                now,
                max_devices,
                reply,
            })
            .await
    }

    async fn register_device(
        &self,
        device_id: &str,
        user: &str,
        req: &RegisterDeviceRequest,
        now: i64,
        max_devices: u64,
    ) -> StoreResult<Device> {
        self.claim_device(device_id, user, now, max_devices).await?;
        let token_state = if req.push_token.is_some() {
            PushTokenState::Active
        } else {
            PushTokenState::None
        };
        let row = sqlx::query(&format!(
            "UPDATE devices SET platform = $1, push_provider = $2, push_token = $3, apns_environment = $4,
                    token_state = $5, token_error = NULL, last_seen = $6
             WHERE id = $7 AND user_id = $8
             RETURNING {DEVICE_COLUMNS}"
        ))
        .bind(req.platform.as_str())
        .bind(req.push_provider.map(|p| p.as_str()))
        .bind(&req.push_token)
        .bind(req.apns_environment.map(|e| e.as_str()))
        .bind(token_state.as_str())
        .bind(now)
        .bind(device_id)
        .bind(user)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(device_from_row(&row)),
            // Deleted (or re-created by someone else) between claim and update.
            None => match self.device_on(device_id).await? {
                Some(d) if d.user_id != user => {
                    Err(StoreError::DeviceOwnedByOtherUser(device_id.into()))
                }
                Some(d) => Ok(d),
                None => Err(StoreError::NotFound(format!(
                    "device {device_id} was deleted meanwhile"
                ))),
            },
        }
    }

    async fn device(&self, device_id: &str) -> StoreResult<Option<Device>> {
        self.device_on(device_id).await
    }

    async fn user_devices(&self, user: &str) -> StoreResult<Vec<Device>> {
        let rows = sqlx::query(&format!(
            r#"SELECT {DEVICE_COLUMNS} FROM devices WHERE user_id = $1 ORDER BY id COLLATE "C""#
        ))
        .bind(user)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(device_from_row).collect())
    }

    async fn delete_device(&self, device_id: &str) -> StoreResult<bool> {
        // Inbox and subscriptions go with it (ON DELETE CASCADE), in one statement.
        let res = sqlx::query("DELETE FROM devices WHERE id = $1")
            .bind(device_id)
            .execute(&self.pool)
            .await?;
        Ok(res.rows_affected() > 0)
    }

    async fn touch_device(&self, device_id: &str, now: i64) -> StoreResult<()> {
        self.group
            .write(|reply| Write::Touch {
                device_id: device_id.to_owned(),
                now,
                reply,
            })
            .await
    }

    async fn invalidate_push_token(
        &self,
        device_id: &str,
        token: &str,
        reason: &str,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        if self.events.contains(EventType::TokenInvalid) {
            let now = crate::clock::now_ms();
            // FOR UPDATE: of two nodes invalidating at once, one queues the event.
            sqlx::query(&format!(
                "INSERT INTO webhook_events (event_id, type, device_id, user_id, provider, error, at, queued_at, next_attempt_at)
                 SELECT {EVENT_ID_SQL}, 'token_invalid', id, user_id, push_provider, $1, $2, $2, $2
                 FROM (SELECT id, user_id, push_provider FROM devices
                       WHERE id = $3 AND push_token = $4 AND token_state <> 'invalid' FOR UPDATE) v"
            ))
            .bind(reason)
            .bind(now)
            .bind(device_id)
            .bind(token)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE devices SET token_state = 'invalid', token_error = $1 WHERE id = $2 AND push_token = $3",
        )
        .bind(reason)
        .bind(device_id)
        .bind(token)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn subscribe(&self, device_id: &str, topic: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO subscriptions (topic, device_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(topic)
        .bind(device_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn unsubscribe(&self, device_id: &str, topic: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM subscriptions WHERE topic = $1 AND device_id = $2")
            .bind(topic)
            .bind(device_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn device_topics(&self, device_id: &str) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            r#"SELECT topic FROM subscriptions WHERE device_id = $1 ORDER BY topic COLLATE "C""#,
        )
        .bind(device_id)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn revoke_user_tokens(&self, user: &str, before: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO token_revocations (user_id, revoked_before) VALUES ($1, $2)
             ON CONFLICT (user_id) DO UPDATE
             SET revoked_before = GREATEST(token_revocations.revoked_before, excluded.revoked_before)",
        )
        .bind(user)
        .bind(before)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn tokens_revoked_before(&self, user: &str) -> StoreResult<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT revoked_before FROM token_revocations WHERE user_id = $1")
                .bind(user)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn publish(&self, msg: NewMessage) -> StoreResult<PublishOutcome> {
        let mut results = self
            .group
            .write(|reply| Write::Publish {
                msgs: vec![msg],
                reply,
            })
            .await?;
        results.pop().expect("one result per message")
    }

    async fn publish_batch(
        &self,
        msgs: Vec<NewMessage>,
    ) -> StoreResult<Vec<StoreResult<PublishOutcome>>> {
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        self.group
            .write(|reply| Write::Publish { msgs, reply })
            .await
    }

    async fn fetch_after(
        &self,
        device_id: &str,
        after: i64,
        limit: u32,
        now: i64,
    ) -> StoreResult<Vec<InboxEntry>> {
        let rows = sqlx::query(
            "SELECT d.seq, m.id, m.target_kind, m.target, m.payload, m.created_at, m.expires_at
             FROM deliveries d JOIN messages m ON m.id = d.message_id
             WHERE d.device_id = $1 AND d.seq > $2 AND d.expires_at > $3
             ORDER BY d.seq LIMIT $4",
        )
        .bind(device_id)
        .bind(after)
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        // A fan-out message appears in many inboxes; parse its body once per page.
        let mut cache: HashMap<String, Arc<StoredMessage>> = HashMap::new();
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.get("id");
            let message = match cache.get(&id) {
                Some(m) => m.clone(),
                None => {
                    let m = Arc::new(message_from_row(&row)?);
                    cache.insert(id, m.clone());
                    m
                }
            };
            out.push(InboxEntry {
                device_id: device_id.to_owned(),
                seq: row.get("seq"),
                message,
                push_pending: false,
                push_attempts: 0,
            });
        }
        Ok(out)
    }

    async fn ack(&self, device_id: &str, seq: i64, now: i64, wrote_live: bool) -> StoreResult<i64> {
        self.group
            .write(|reply| Write::Ack {
                device_id: device_id.to_owned(),
                seq,
                now,
                wrote_live,
                reply,
            })
            .await
    }

    async fn mark_sent(&self, ranges: &[(String, i64, i64)], now: i64) -> StoreResult<()> {
        if ranges.is_empty() {
            return Ok(());
        }
        self.group
            .write(|reply| Write::MarkSent {
                ranges: ranges.to_vec(),
                now,
                reply,
            })
            .await
    }

    async fn claim_push(&self, device_id: &str, seq: i64, now: i64) -> StoreResult<bool> {
        let claimed = self
            .claim_pushes(&[(device_id.to_owned(), seq)], now)
            .await?;
        Ok(claimed[0])
    }

    async fn claim_pushes(&self, items: &[(String, i64)], now: i64) -> StoreResult<Vec<bool>> {
        let devices: Vec<&str> = items.iter().map(|(d, _)| d.as_str()).collect();
        let seqs: Vec<i64> = items.iter().map(|(_, s)| *s).collect();
        let won: Vec<(String, i64)> = sqlx::query_as(
            "WITH wanted AS (
                 SELECT d.device_id, d.seq FROM deliveries d
                 JOIN unnest($2::TEXT[], $3::BIGINT[]) AS r(device_id, seq)
                   ON d.device_id = r.device_id AND d.seq = r.seq
                 WHERE d.push_state = 'pending' AND (d.acked_at IS NULL OR d.push_always)
                   AND d.expires_at > $1
                 FOR UPDATE OF d SKIP LOCKED)
             UPDATE deliveries d SET push_state = 'sending', push_at = $1
             FROM wanted w WHERE d.device_id = w.device_id AND d.seq = w.seq
             RETURNING d.device_id, d.seq",
        )
        .bind(now)
        .bind(&devices)
        .bind(&seqs)
        .fetch_all(&self.pool)
        .await?;
        let won: std::collections::HashSet<(String, i64)> = won.into_iter().collect();
        Ok(items.iter().map(|item| won.contains(item)).collect())
    }

    async fn record_push_results(&self, results: &[PushResult], now: i64) -> StoreResult<()> {
        let (mut fin_dev, mut fin_seq, mut fin_state, mut fin_provider, mut fin_reason) =
            (vec![], vec![], vec![], vec![], vec![]);
        let (mut re_dev, mut re_seq, mut re_due, mut re_reason) = (vec![], vec![], vec![], vec![]);
        for r in results {
            match &r.action {
                PushAction::Finish {
                    mark,
                    provider,
                    reason,
                } => {
                    fin_dev.push(r.device_id.as_str());
                    fin_seq.push(r.seq);
                    fin_state.push(match mark {
                        PushMark::Pushed => "pushed",
                        PushMark::Failed => "failed",
                    });
                    fin_provider.push(provider.as_deref());
                    fin_reason.push(reason.as_deref());
                }
                PushAction::Retry { due_at, reason } => {
                    re_dev.push(r.device_id.as_str());
                    re_seq.push(r.seq);
                    re_due.push(*due_at);
                    re_reason.push(reason.as_str());
                }
            }
        }
        let mut tx = self.pool.begin().await?;
        if !fin_dev.is_empty() {
            let kinds: Vec<&str> = fin_state
                .iter()
                .map(|s| match *s {
                    "pushed" => EventType::Pushed,
                    _ => EventType::PushFailed,
                })
                .map(|k| {
                    if self.events.contains(k) {
                        k.as_str()
                    } else {
                        ""
                    }
                })
                .collect();
            if kinds.iter().any(|k| !k.is_empty()) {
                sqlx::query(&format!(
                    "INSERT INTO webhook_events (event_id, type, message_id, device_id, user_id, seq, provider, error, at, queued_at, next_attempt_at)
                     SELECT {EVENT_ID_SQL}, r.kind, d.message_id, d.device_id, v.user_id, d.seq, COALESCE(r.provider, v.push_provider), r.reason, $1, $1, $1
                     FROM unnest($2::TEXT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[], $6::TEXT[])
                          AS r(device_id, seq, kind, provider, reason)
                     JOIN deliveries d ON d.device_id = r.device_id AND d.seq = r.seq
                     JOIN devices v ON v.id = d.device_id
                     WHERE r.kind <> ''"
                ))
                .bind(now)
                .bind(&fin_dev)
                .bind(&fin_seq)
                .bind(&kinds)
                .bind(&fin_provider)
                .bind(&fin_reason)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "UPDATE deliveries d SET push_state = r.state, push_at = $1, push_provider = r.provider, reason = r.reason
                 FROM unnest($2::TEXT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[], $6::TEXT[])
                      AS r(device_id, seq, state, provider, reason)
                 WHERE d.device_id = r.device_id AND d.seq = r.seq",
            )
            .bind(now)
            .bind(&fin_dev)
            .bind(&fin_seq)
            .bind(&fin_state)
            .bind(&fin_provider)
            .bind(&fin_reason)
            .execute(&mut *tx)
            .await?;
        }
        if !re_dev.is_empty() {
            sqlx::query(
                "UPDATE deliveries d SET push_state = 'pending', push_due_at = r.due_at,
                        push_attempts = d.push_attempts + 1, reason = r.reason
                 FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[])
                      AS r(device_id, seq, due_at, reason)
                 WHERE d.device_id = r.device_id AND d.seq = r.seq AND d.push_state = 'sending'",
            )
            .bind(&re_dev)
            .bind(&re_seq)
            .bind(&re_due)
            .bind(&re_reason)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn fail_orphaned_pushes(&self, stale_before: i64, now: i64) -> StoreResult<u64> {
        let queue = self.events.contains(EventType::PushFailed);
        // One statement: the rows it fails are the rows it queues events for, whichever
        // node runs it (another node's concurrent run finds them no longer 'sending').
        let res = sqlx::query(FAIL_ORPHANS_SQL.as_str())
            .bind(now)
            .bind(ORPHANED_PUSH_REASON)
            .bind(stale_before)
            .bind(queue)
            .fetch_one(&self.pool)
            .await?;
        Ok(res.get::<i64, _>("n") as u64)
    }

    async fn retry_push(
        &self,
        device_id: &str,
        seq: i64,
        due_at: i64,
        reason: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE deliveries SET push_state = 'pending', push_due_at = $1, push_attempts = push_attempts + 1, reason = $2
             WHERE device_id = $3 AND seq = $4 AND push_state = 'sending'",
        )
        .bind(due_at)
        .bind(reason)
        .bind(device_id)
        .bind(seq)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn take_due_pushes(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> StoreResult<Vec<InboxEntry>> {
        // SKIP LOCKED: nodes polling at once take disjoint rows, and a row taken by
        // one no longer matches `push_due_at <= now` for the others.
        let rows = sqlx::query(TAKE_DUE_SQL)
            .bind(now)
            .bind(lease_until)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let message = Arc::new(message_from_row(&row)?);
            out.push(InboxEntry {
                device_id: row.get("device_id"),
                seq: row.get("seq"),
                message,
                push_pending: true,
                push_attempts: row.get::<i64, _>("push_attempts") as u32,
            });
        }
        Ok(out)
    }

    async fn finish_push(
        &self,
        device_id: &str,
        seq: i64,
        mark: PushMark,
        provider: Option<&str>,
        reason: Option<&str>,
        now: i64,
    ) -> StoreResult<()> {
        let state = match mark {
            PushMark::Pushed => "pushed",
            PushMark::Failed => "failed",
        };
        sqlx::query(
            "UPDATE deliveries SET push_state = $1, push_at = $2, push_provider = $3, reason = $4
             WHERE device_id = $5 AND seq = $6",
        )
        .bind(state)
        .bind(now)
        .bind(provider)
        .bind(reason)
        .bind(device_id)
        .bind(seq)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn message(&self, id: &str) -> StoreResult<Option<(StoredMessage, Vec<DeliveryRow>)>> {
        let Some(row) = sqlx::query(
            "SELECT id, target_kind, target, payload, created_at, expires_at FROM messages WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let msg = message_from_row(&row)?;
        let rows = sqlx::query(
            r#"SELECT device_id, seq, expires_at, sent_at, acked_at, push_state, push_at, push_provider, reason
             FROM deliveries WHERE message_id = $1 ORDER BY device_id COLLATE "C""#,
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        let deliveries = rows
            .iter()
            .map(|r| DeliveryRow {
                device_id: r.get("device_id"),
                seq: r.get("seq"),
                expires_at: r.get("expires_at"),
                sent_at: r.get("sent_at"),
                acked_at: r.get("acked_at"),
                push_state: r.get("push_state"),
                push_at: r.get("push_at"),
                push_provider: r.get("push_provider"),
                reason: r.get("reason"),
            })
            .collect();
        Ok(Some((msg, deliveries)))
    }

    async fn sweep(&self, now: i64, retention_ms: i64) -> StoreResult<u64> {
        let cutoff = now - retention_ms;
        let mut tx = self.pool.begin().await?;
        let key = super::EXPIRED_THROUGH_KEY;
        if self.events.contains(EventType::Expired) {
            // The row lock makes the nodes' sweeps take turns: each entry's TTL is
            // reported by one of them, once.
            let through: Option<String> =
                sqlx::query_scalar("SELECT value FROM settings WHERE key = $1 FOR UPDATE")
                    .bind(key)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(through) = through.and_then(|t| t.parse::<i64>().ok()) {
                if through < now {
                    sqlx::query(&format!(
                        "INSERT INTO webhook_events (event_id, type, message_id, device_id, user_id, seq, at, queued_at, next_attempt_at)
                         SELECT {EVENT_ID_SQL}, 'expired', d.message_id, d.device_id, v.user_id, d.seq, d.expires_at, $1, $1
                         FROM deliveries d JOIN devices v ON v.id = d.device_id
                         WHERE d.expires_at > $2 AND d.expires_at <= $1 AND d.acked_at IS NULL
                         ORDER BY d.expires_at"
                    ))
                    .bind(now)
                    .bind(through)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            sqlx::query(
                "INSERT INTO settings (key, value) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET value = GREATEST(settings.value::BIGINT, excluded.value::BIGINT)::TEXT",
            )
            .bind(key)
            .bind(now.to_string())
            .execute(&mut *tx)
            .await?;
        } else {
            // Turned on later, it starts from then, not from an old mark.
            sqlx::query("DELETE FROM settings WHERE key = $1")
                .bind(key)
                .execute(&mut *tx)
                .await?;
        }
        let res = sqlx::query("DELETE FROM deliveries WHERE expires_at < $1")
            .bind(cutoff)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM messages WHERE expires_at < $1")
            .bind(cutoff)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(res.rows_affected())
    }

    async fn webhook_due(&self, now: i64, limit: u32) -> StoreResult<(u64, Option<i64>)> {
        let row = sqlx::query(
            "SELECT count(*) AS n, min(queued_at) AS oldest FROM
               (SELECT queued_at FROM webhook_events WHERE next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT $2) e",
        )
        .bind(now)
        .bind(limit as i64)
        .fetch_one(&self.pool)
        .await?;
        Ok((row.get::<i64, _>("n") as u64, row.get("oldest")))
    }

    async fn webhook_claim(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> StoreResult<Vec<QueuedEvent>> {
        // Rows another node is claiming are skipped; a row whose claim committed
        // meanwhile fails the re-checked `next_attempt_at <= now`: one node per event.
        let rows = sqlx::query(
            "UPDATE webhook_events SET next_attempt_at = $1
             WHERE queue_id IN (SELECT queue_id FROM webhook_events WHERE next_attempt_at <= $2
                                ORDER BY queue_id LIMIT $3 FOR UPDATE SKIP LOCKED)
               AND next_attempt_at <= $2
             RETURNING queue_id, event_id, type, message_id, device_id, user_id, seq, provider, error, at, queued_at, attempts",
        )
        .bind(lease_until)
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<QueuedEvent> = rows
            .iter()
            .map(|r| QueuedEvent {
                queue_id: r.get("queue_id"),
                id: r.get("event_id"),
                kind: r.get("type"),
                message_id: r.get("message_id"),
                device_id: r.get("device_id"),
                user: r.get("user_id"),
                seq: r.get("seq"),
                provider: r.get("provider"),
                error: r.get("error"),
                at: r.get("at"),
                queued_at: r.get("queued_at"),
                attempts: r.get::<i64, _>("attempts") as u32,
            })
            .collect();
        out.sort_by_key(|e| e.queue_id);
        Ok(out)
    }

    async fn webhook_delete(&self, queue_ids: &[i64]) -> StoreResult<()> {
        if queue_ids.is_empty() {
            return Ok(());
        }
        sqlx::query("DELETE FROM webhook_events WHERE queue_id = ANY($1)")
            .bind(queue_ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn webhook_retry(&self, items: &[(i64, i64)]) -> StoreResult<()> {
        if items.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = items.iter().map(|i| i.0).collect();
        let at: Vec<i64> = items.iter().map(|i| i.1).collect();
        sqlx::query(
            "UPDATE webhook_events w SET attempts = w.attempts + 1, next_attempt_at = r.at
             FROM unnest($1::BIGINT[], $2::BIGINT[]) AS r(queue_id, at)
             WHERE w.queue_id = r.queue_id",
        )
        .bind(&ids)
        .bind(&at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn webhook_queue_stats(&self) -> StoreResult<(u64, Option<i64>)> {
        let row = sqlx::query("SELECT count(*) AS n, min(queued_at) AS oldest FROM webhook_events")
            .fetch_one(&self.pool)
            .await?;
        Ok((row.get::<i64, _>("n") as u64, row.get("oldest")))
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
