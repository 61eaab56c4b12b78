//! The embedded store: SQLite in WAL mode.
//!
//! SQLite has one writer at a time, so writes go through a pool of one connection and
//! publishes are *group-committed*: a writer task takes every publish waiting in its
//! queue and commits them in one transaction, so one fsync covers many 202s. Reads use a
//! separate pool and never wait for the writer (WAL readers see the last commit).

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_protocol::{
    ApnsEnvironment, Platform, PushProviderKind, PushTokenState, RegisterDeviceRequest, Target,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::{
    ApiKeyRecord, DeliveryRow, Device, InboxEntry, MessagePayload, NewMessage, PublishOutcome,
    PushAction, PushMark, PushResult, Store, StoreError, StoreResult, StoredMessage,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// Writes (publishes and acks) committed in one transaction at most.
const MAX_GROUP: usize = 256;

/// A write that waits for its group's commit: every fsync is shared by up to
/// `MAX_GROUP` publishes and acks, which is what lets one SQLite writer keep up with
/// many devices acking at once.
enum GroupWrite {
    Publish(
        Box<NewMessage>,
        oneshot::Sender<StoreResult<PublishOutcome>>,
    ),
    Ack {
        device_id: String,
        seq: i64,
        now: i64,
        reply: oneshot::Sender<StoreResult<i64>>,
    },
}

enum GroupOutcome {
    Publish(StoreResult<PublishOutcome>),
    Ack(StoreResult<i64>),
}

impl GroupWrite {
    fn answer(self, outcome: GroupOutcome) {
        match (self, outcome) {
            (GroupWrite::Publish(_, reply), GroupOutcome::Publish(r)) => {
                let _ = reply.send(r);
            }
            (GroupWrite::Ack { reply, .. }, GroupOutcome::Ack(r)) => {
                let _ = reply.send(r);
            }
            _ => unreachable!("outcomes are produced in the order and kind of their writes"),
        }
    }

    fn fail(self, msg: &str) {
        let err = || StoreError::Other(anyhow::anyhow!("commit failed: {msg}"));
        match self {
            GroupWrite::Publish(_, reply) => {
                let _ = reply.send(Err(err()));
            }
            GroupWrite::Ack { reply, .. } => {
                let _ = reply.send(Err(err()));
            }
        }
    }
}

pub struct SqliteStore {
    read: SqlitePool,
    write: SqlitePool,
    writes: mpsc::Sender<GroupWrite>,
}

/// The database file inside the data directory.
pub const SQLITE_FILE: &str = "herald.db";

impl SqliteStore {
    /// Opens (creating if needed) `dir/herald.db` and applies the migrations.
    pub async fn open(dir: &Path) -> StoreResult<SqliteStore> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Other(anyhow::anyhow!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
        let path = dir.join(SQLITE_FILE);
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a 202 means the commit reached the disk, not just the OS cache.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone())
            .await?;
        MIGRATOR
            .run(&write)
            .await
            .map_err(|e| StoreError::Other(anyhow::anyhow!("migrating {}: {e}", path.display())))?;
        // One node owns this file: pushes a previous run was sending when it died have
        // an unknown outcome, and a push is never risked twice.
        sqlx::query(
            "UPDATE deliveries SET push_state = 'failed', reason = ? WHERE push_state = 'sending'",
        )
        .bind(super::ORPHANED_PUSH_REASON)
        .execute(&write)
        .await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.read_only(true))
            .await?;
        let (writes, rx) = mpsc::channel(4096);
        tokio::spawn(group_commit_loop(write.clone(), rx));
        Ok(SqliteStore {
            read,
            write,
            writes,
        })
    }
}

impl SqliteStore {
    /// Hands a write to the group-commit writer and waits for its group's commit.
    async fn group_write<T>(
        &self,
        write: GroupWrite,
        rx: oneshot::Receiver<StoreResult<T>>,
    ) -> StoreResult<T> {
        let stopped = || StoreError::Other(anyhow::anyhow!("store writer stopped"));
        self.writes.send(write).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

async fn group_commit_loop(pool: SqlitePool, mut rx: mpsc::Receiver<GroupWrite>) {
    let mut batch = Vec::with_capacity(MAX_GROUP);
    while rx.recv_many(&mut batch, MAX_GROUP).await > 0 {
        match commit_group(&pool, &batch).await {
            Ok(outcomes) => {
                for (write, outcome) in batch.drain(..).zip(outcomes) {
                    write.answer(outcome);
                }
            }
            Err(e) => {
                // The transaction rolled back: nothing of this group was stored, so
                // every caller is told it failed (no publish got a 202).
                tracing::error!(error = %e, "write group failed to commit");
                let msg = e.to_string();
                for write in batch.drain(..) {
                    write.fail(&msg);
                }
            }
        }
    }
}

async fn commit_group(
    pool: &SqlitePool,
    batch: &[GroupWrite],
) -> Result<Vec<GroupOutcome>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for write in batch {
        let outcome = match write {
            GroupWrite::Publish(msg, _) => match publish_one(&mut tx, msg).await {
                Err(StoreError::Db(e)) => return Err(e),
                r => GroupOutcome::Publish(r),
            },
            GroupWrite::Ack {
                device_id,
                seq,
                now,
                ..
            } => match ack_one(&mut tx, device_id, *seq, *now).await {
                Err(StoreError::Db(e)) => return Err(e),
                r => GroupOutcome::Ack(r),
            },
        };
        outcomes.push(outcome);
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// Cumulative ack inside a group's transaction; returns the acked seq afterwards.
async fn ack_one(
    conn: &mut SqliteConnection,
    device_id: &str,
    seq: i64,
    now: i64,
) -> StoreResult<i64> {
    let row = sqlx::query("SELECT acked_seq, last_seq FROM devices WHERE id = ?")
        .bind(device_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("device {device_id} is not registered")))?;
    let acked: i64 = row.get("acked_seq");
    let last: i64 = row.get("last_seq");
    // An ack beyond what was assigned cannot be honest; clamp rather than let a
    // buggy client skip messages that do not exist yet.
    let target = seq.min(last);
    if target > acked {
        // The ack cancels the entries' scheduled pushes (and keeps them out of the
        // push-due index); pushes already being sent or settled keep their record.
        sqlx::query(
            "UPDATE deliveries SET acked_at = ?,
                    push_state = CASE WHEN push_state = 'pending' THEN NULL ELSE push_state END,
                    push_due_at = CASE WHEN push_state = 'pending' THEN NULL ELSE push_due_at END
             WHERE device_id = ? AND seq > ? AND seq <= ? AND acked_at IS NULL",
        )
        .bind(now)
        .bind(device_id)
        .bind(acked)
        .bind(target)
        .execute(&mut *conn)
        .await?;
        sqlx::query("UPDATE devices SET acked_seq = ?, last_seen = ? WHERE id = ?")
            .bind(target)
            .bind(now)
            .bind(device_id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(target.max(acked))
}

/// Validation happens before any write, so a rejected message leaves no trace in the
/// shared transaction.
async fn publish_one(conn: &mut SqliteConnection, msg: &NewMessage) -> StoreResult<PublishOutcome> {
    if let Some(key) = &msg.idempotency_key {
        let row = sqlx::query(
            "SELECT id, recipients, created_at FROM messages WHERE api_key_id = ? AND idempotency_key = ?",
        )
        .bind(&msg.api_key_id)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(row) = row {
            let created_at: i64 = row.get("created_at");
            if created_at >= msg.idempotency_since {
                return Ok(PublishOutcome::Duplicate {
                    message_id: row.get("id"),
                    recipients: row.get::<i64, _>("recipients") as u64,
                });
            }
            // Older than the idempotency window: the key is free again.
            sqlx::query("UPDATE messages SET idempotency_key = NULL WHERE id = ?")
                .bind(row.get::<String, _>("id"))
                .execute(&mut *conn)
                .await?;
        }
    }

    let devices: Vec<String> = match &msg.target {
        Target::Device(d) => {
            let found = sqlx::query_scalar::<_, String>("SELECT id FROM devices WHERE id = ?")
                .bind(d)
                .fetch_optional(&mut *conn)
                .await?;
            match found {
                Some(id) => vec![id],
                None => {
                    return Err(StoreError::NotFound(format!(
                        "device {d} is not registered"
                    )))
                }
            }
        }
        Target::User(u) => {
            sqlx::query_scalar("SELECT id FROM devices WHERE user_id = ? ORDER BY id")
                .bind(u)
                .fetch_all(&mut *conn)
                .await?
        }
        Target::Topic(t) => {
            sqlx::query_scalar(
                "SELECT device_id FROM subscriptions WHERE topic = ? ORDER BY device_id",
            )
            .bind(t)
            .fetch_all(&mut *conn)
            .await?
        }
    };
    if devices.len() > msg.max_recipients {
        return Err(StoreError::TooManyRecipients(devices.len()));
    }

    let payload = serde_json::to_string(&msg.payload).map_err(anyhow::Error::new)?;
    sqlx::query(
        "INSERT INTO messages (id, api_key_id, target_kind, target, payload, recipients, created_at, expires_at, idempotency_key)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&msg.id)
    .bind(&msg.api_key_id)
    .bind(msg.target.kind())
    .bind(msg.target.value())
    .bind(&payload)
    .bind(devices.len() as i64)
    .bind(msg.created_at)
    .bind(msg.expires_at)
    .bind(&msg.idempotency_key)
    .execute(&mut *conn)
    .await?;

    let stored = Arc::new(StoredMessage::new(
        msg.id.clone(),
        msg.target.clone(),
        msg.payload.clone(),
        msg.created_at,
        msg.expires_at,
    ));
    let mut entries = Vec::with_capacity(devices.len());
    for device_id in devices {
        let seq: i64 = sqlx::query_scalar(
            "UPDATE devices SET last_seq = last_seq + 1 WHERE id = ? RETURNING last_seq",
        )
        .bind(&device_id)
        .fetch_one(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO deliveries (device_id, seq, message_id, expires_at, push_state, push_due_at)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&device_id)
        .bind(seq)
        .bind(&msg.id)
        .bind(msg.expires_at)
        .bind(msg.push_due_at.map(|_| "pending"))
        .bind(msg.push_due_at)
        .execute(&mut *conn)
        .await?;
        entries.push(InboxEntry {
            device_id,
            seq,
            message: stored.clone(),
            push_pending: msg.push_due_at.is_some(),
            push_attempts: 0,
        });
    }
    Ok(PublishOutcome::Created { entries })
}

fn device_from_row(row: &sqlx::sqlite::SqliteRow) -> Device {
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

fn message_from_parts(
    id: String,
    kind: &str,
    target: String,
    payload: &str,
    created_at: i64,
    expires_at: i64,
) -> StoreResult<StoredMessage> {
    let target = match kind {
        "user" => Target::User(target),
        "device" => Target::Device(target),
        _ => Target::Topic(target),
    };
    let payload: MessagePayload = serde_json::from_str(payload)
        .map_err(|e| StoreError::Other(anyhow::anyhow!("message {id} payload: {e}")))?;
    Ok(StoredMessage::new(
        id, target, payload, created_at, expires_at,
    ))
}

fn key_from_row(row: &sqlx::sqlite::SqliteRow) -> ApiKeyRecord {
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

const DEVICE_COLUMNS: &str = "id, user_id, platform, push_provider, push_token, apns_environment, token_state, token_error, last_seq, acked_seq, last_seen";

#[async_trait]
impl Store for SqliteStore {
    async fn setting(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE key = ?")
                .bind(key)
                .fetch_optional(&self.read)
                .await?,
        )
    }

    async fn init_setting(&self, key: &str, value: &str) -> StoreResult<String> {
        sqlx::query("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&self.write)
            .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE key = ?")
                .bind(key)
                .fetch_one(&self.write)
                .await?,
        )
    }

    async fn create_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, name, prefix, hash, created_at, revoked_at, scopes) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&key.id)
        .bind(&key.name)
        .bind(&key.prefix)
        .bind(&key.hash)
        .bind(key.created_at)
        .bind(key.revoked_at)
        .bind(crate::auth::Scope::join(&key.scopes))
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        let rows = sqlx::query("SELECT * FROM api_keys ORDER BY created_at, id")
            .fetch_all(&self.read)
            .await?;
        Ok(rows.iter().map(key_from_row).collect())
    }

    async fn revoke_api_key(&self, id_or_prefix: &str, now: i64) -> StoreResult<u64> {
        let res = sqlx::query(
            "UPDATE api_keys SET revoked_at = ? WHERE (id = ? OR prefix = ?) AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(id_or_prefix)
        .bind(id_or_prefix)
        .execute(&self.write)
        .await?;
        Ok(res.rows_affected())
    }

    async fn api_key_by_hash(&self, hash: &[u8]) -> StoreResult<Option<ApiKeyRecord>> {
        let row = sqlx::query("SELECT * FROM api_keys WHERE hash = ?")
            .bind(hash)
            .fetch_optional(&self.read)
            .await?;
        Ok(row.as_ref().map(key_from_row))
    }

    async fn claim_device(&self, device_id: &str, user: &str, now: i64) -> StoreResult<Device> {
        if let Some(d) = self.device(device_id).await? {
            return if d.user_id == user {
                Ok(d)
            } else {
                Err(StoreError::DeviceOwnedByOtherUser(device_id.into()))
            };
        }
        sqlx::query(
            "INSERT INTO devices (id, user_id, created_at, last_seen) VALUES (?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        )
        .bind(device_id)
        .bind(user)
        .bind(now)
        .bind(now)
        .execute(&self.write)
        .await?;
        let row = sqlx::query(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?"
        ))
        .bind(device_id)
        .fetch_one(&self.write)
        .await?;
        let d = device_from_row(&row);
        if d.user_id != user {
            return Err(StoreError::DeviceOwnedByOtherUser(device_id.into()));
        }
        Ok(d)
    }

    async fn register_device(
        &self,
        device_id: &str,
        user: &str,
        req: &RegisterDeviceRequest,
        now: i64,
    ) -> StoreResult<Device> {
        self.claim_device(device_id, user, now).await?;
        let token_state = if req.push_token.is_some() {
            PushTokenState::Active
        } else {
            PushTokenState::None
        };
        sqlx::query(
            "UPDATE devices SET platform = ?, push_provider = ?, push_token = ?, apns_environment = ?,
                    token_state = ?, token_error = NULL, last_seen = ?
             WHERE id = ? AND user_id = ?",
        )
        .bind(req.platform.as_str())
        .bind(req.push_provider.map(|p| p.as_str()))
        .bind(&req.push_token)
        .bind(req.apns_environment.map(|e| e.as_str()))
        .bind(token_state.as_str())
        .bind(now)
        .bind(device_id)
        .bind(user)
        .execute(&self.write)
        .await?;
        let row = sqlx::query(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?"
        ))
        .bind(device_id)
        .fetch_one(&self.write)
        .await?;
        Ok(device_from_row(&row))
    }

    async fn device(&self, device_id: &str) -> StoreResult<Option<Device>> {
        let row = sqlx::query(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?"
        ))
        .bind(device_id)
        .fetch_optional(&self.read)
        .await?;
        Ok(row.as_ref().map(device_from_row))
    }

    async fn user_devices(&self, user: &str) -> StoreResult<Vec<Device>> {
        let rows = sqlx::query(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE user_id = ? ORDER BY id"
        ))
        .bind(user)
        .fetch_all(&self.read)
        .await?;
        Ok(rows.iter().map(device_from_row).collect())
    }

    async fn delete_device(&self, device_id: &str) -> StoreResult<bool> {
        let mut tx = self.write.begin().await?;
        sqlx::query("DELETE FROM deliveries WHERE device_id = ?")
            .bind(device_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM subscriptions WHERE device_id = ?")
            .bind(device_id)
            .execute(&mut *tx)
            .await?;
        let res = sqlx::query("DELETE FROM devices WHERE id = ?")
            .bind(device_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(res.rows_affected() > 0)
    }

    async fn touch_device(&self, device_id: &str, now: i64) -> StoreResult<()> {
        sqlx::query("UPDATE devices SET last_seen = ? WHERE id = ?")
            .bind(now)
            .bind(device_id)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    async fn invalidate_push_token(
        &self,
        device_id: &str,
        token: &str,
        reason: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE devices SET token_state = 'invalid', token_error = ? WHERE id = ? AND push_token = ?",
        )
        .bind(reason)
        .bind(device_id)
        .bind(token)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn subscribe(&self, device_id: &str, topic: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO subscriptions (topic, device_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(topic)
        .bind(device_id)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn unsubscribe(&self, device_id: &str, topic: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM subscriptions WHERE topic = ? AND device_id = ?")
            .bind(topic)
            .bind(device_id)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    async fn device_topics(&self, device_id: &str) -> StoreResult<Vec<String>> {
        Ok(
            sqlx::query_scalar(
                "SELECT topic FROM subscriptions WHERE device_id = ? ORDER BY topic",
            )
            .bind(device_id)
            .fetch_all(&self.read)
            .await?,
        )
    }

    async fn count_user_devices(&self, user: &str) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE user_id = ?")
            .bind(user)
            .fetch_one(&self.read)
            .await?;
        Ok(n as u64)
    }

    async fn revoke_user_tokens(&self, user: &str, before: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO token_revocations (user_id, revoked_before) VALUES (?, ?)
             ON CONFLICT (user_id) DO UPDATE SET revoked_before = MAX(revoked_before, excluded.revoked_before)",
        )
        .bind(user)
        .bind(before)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn tokens_revoked_before(&self, user: &str) -> StoreResult<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT revoked_before FROM token_revocations WHERE user_id = ?")
                .bind(user)
                .fetch_optional(&self.read)
                .await?,
        )
    }

    async fn publish(&self, msg: NewMessage) -> StoreResult<PublishOutcome> {
        let (tx, rx) = oneshot::channel();
        self.group_write(GroupWrite::Publish(Box::new(msg), tx), rx)
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
             WHERE d.device_id = ? AND d.seq > ? AND d.expires_at > ?
             ORDER BY d.seq LIMIT ?",
        )
        .bind(device_id)
        .bind(after)
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&self.read)
        .await?;
        // A fan-out message appears in many inboxes; parse its body once per page.
        let mut cache: HashMap<String, Arc<StoredMessage>> = HashMap::new();
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.get("id");
            let message = match cache.get(&id) {
                Some(m) => m.clone(),
                None => {
                    let m = Arc::new(message_from_parts(
                        id.clone(),
                        row.get("target_kind"),
                        row.get("target"),
                        row.get("payload"),
                        row.get("created_at"),
                        row.get("expires_at"),
                    )?);
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

    async fn ack(&self, device_id: &str, seq: i64, now: i64) -> StoreResult<i64> {
        let (reply, rx) = oneshot::channel();
        let write = GroupWrite::Ack {
            device_id: device_id.to_owned(),
            seq,
            now,
            reply,
        };
        self.group_write(write, rx).await
    }

    async fn mark_sent(&self, ranges: &[(String, i64, i64)], now: i64) -> StoreResult<()> {
        let mut tx = self.write.begin().await?;
        for (device_id, from, to) in ranges {
            sqlx::query(
                "UPDATE deliveries SET sent_at = ? WHERE device_id = ? AND seq >= ? AND seq <= ? AND sent_at IS NULL",
            )
            .bind(now)
            .bind(device_id)
            .bind(from)
            .bind(to)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn claim_push(&self, device_id: &str, seq: i64, now: i64) -> StoreResult<bool> {
        let claimed = self
            .claim_pushes(&[(device_id.to_owned(), seq)], now)
            .await?;
        Ok(claimed[0])
    }
    async fn retry_push(
        &self,
        device_id: &str,
        seq: i64,
        due_at: i64,
        reason: &str,
    ) -> StoreResult<()> {
        let result = PushResult {
            device_id: device_id.to_owned(),
            seq,
            action: PushAction::Retry {
                due_at,
                reason: reason.to_owned(),
            },
        };
        self.record_push_results(&[result], crate::clock::now_ms())
            .await
    }
    async fn take_due_pushes(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> StoreResult<Vec<InboxEntry>> {
        let mut tx = self.write.begin().await?;
        let taken = sqlx::query(
            "UPDATE deliveries SET push_due_at = ?
             WHERE (device_id, seq) IN (
                 SELECT device_id, seq FROM deliveries
                 WHERE push_state = 'pending' AND push_due_at <= ? AND expires_at > ? AND acked_at IS NULL
                 ORDER BY push_due_at LIMIT ?)
             RETURNING device_id, seq, push_attempts, message_id",
        )
        .bind(lease_until)
        .bind(now)
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await?;
        let mut messages: HashMap<String, Arc<StoredMessage>> = HashMap::new();
        let mut out = Vec::with_capacity(taken.len());
        for row in taken {
            let id: String = row.get("message_id");
            let message = match messages.get(&id) {
                Some(m) => m.clone(),
                None => {
                    let m = sqlx::query(
                        "SELECT id, target_kind, target, payload, created_at, expires_at FROM messages WHERE id = ?",
                    )
                    .bind(&id)
                    .fetch_one(&mut *tx)
                    .await?;
                    let m = Arc::new(message_from_parts(
                        m.get("id"),
                        m.get("target_kind"),
                        m.get("target"),
                        m.get("payload"),
                        m.get("created_at"),
                        m.get("expires_at"),
                    )?);
                    messages.insert(id, m.clone());
                    m
                }
            };
            out.push(InboxEntry {
                device_id: row.get("device_id"),
                seq: row.get("seq"),
                message,
                push_pending: true,
                push_attempts: row.get::<i64, _>("push_attempts") as u32,
            });
        }
        tx.commit().await?;
        // RETURNING gives no order; settle the oldest first.
        out.sort_by_key(|e| (e.message.created_at, e.seq));
        Ok(out)
    }

    async fn fail_orphaned_pushes(&self, stale_before: i64, now: i64) -> StoreResult<u64> {
        let res = sqlx::query(
            "UPDATE deliveries SET push_state = 'failed', push_at = ?, reason = ?
             WHERE push_state = 'sending' AND push_at < ?",
        )
        .bind(now)
        .bind(super::ORPHANED_PUSH_REASON)
        .bind(stale_before)
        .execute(&self.write)
        .await?;
        Ok(res.rows_affected())
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
        let result = PushResult {
            device_id: device_id.to_owned(),
            seq,
            action: PushAction::Finish {
                mark,
                provider: provider.map(str::to_owned),
                reason: reason.map(str::to_owned),
            },
        };
        self.record_push_results(&[result], now).await
    }
    async fn claim_pushes(&self, items: &[(String, i64)], now: i64) -> StoreResult<Vec<bool>> {
        let mut tx = self.write.begin().await?;
        let mut out = Vec::with_capacity(items.len());
        for (device_id, seq) in items {
            let res = sqlx::query(
                "UPDATE deliveries SET push_state = 'sending', push_at = ?
                 WHERE device_id = ? AND seq = ? AND acked_at IS NULL AND expires_at > ?
                   AND push_state = 'pending'",
            )
            .bind(now)
            .bind(device_id)
            .bind(seq)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            out.push(res.rows_affected() == 1);
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn record_push_results(&self, results: &[PushResult], now: i64) -> StoreResult<()> {
        let mut tx = self.write.begin().await?;
        for r in results {
            match &r.action {
                PushAction::Finish {
                    mark,
                    provider,
                    reason,
                } => {
                    let state = match mark {
                        PushMark::Pushed => "pushed",
                        PushMark::Failed => "failed",
                    };
                    sqlx::query(
                        "UPDATE deliveries SET push_state = ?, push_at = ?, push_provider = ?, reason = ?
                         WHERE device_id = ? AND seq = ?",
                    )
                    .bind(state)
                    .bind(now)
                    .bind(provider)
                    .bind(reason)
                    .bind(&r.device_id)
                    .bind(r.seq)
                    .execute(&mut *tx)
                    .await?;
                }
                PushAction::Retry { due_at, reason } => {
                    sqlx::query(
                        "UPDATE deliveries SET push_state = 'pending', push_due_at = ?, push_attempts = push_attempts + 1, reason = ?
                         WHERE device_id = ? AND seq = ? AND push_state = 'sending'",
                    )
                    .bind(due_at)
                    .bind(reason)
                    .bind(&r.device_id)
                    .bind(r.seq)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn message(&self, id: &str) -> StoreResult<Option<(StoredMessage, Vec<DeliveryRow>)>> {
        let Some(row) = sqlx::query(
            "SELECT id, target_kind, target, payload, created_at, expires_at FROM messages WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.read)
        .await?
        else {
            return Ok(None);
        };
        let msg = message_from_parts(
            row.get("id"),
            row.get("target_kind"),
            row.get("target"),
            row.get("payload"),
            row.get("created_at"),
            row.get("expires_at"),
        )?;
        let rows = sqlx::query(
            "SELECT device_id, seq, expires_at, sent_at, acked_at, push_state, push_at, push_provider, reason
             FROM deliveries WHERE message_id = ? ORDER BY device_id",
        )
        .bind(id)
        .fetch_all(&self.read)
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
        let mut tx = self.write.begin().await?;
        let res = sqlx::query("DELETE FROM deliveries WHERE expires_at < ?")
            .bind(cutoff)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM messages WHERE expires_at < ?")
            .bind(cutoff)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(res.rows_affected())
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }
}
