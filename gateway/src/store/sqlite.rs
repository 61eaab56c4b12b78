//! The embedded store: SQLite in WAL mode.
//!
//! The hot path (publishes, acks, sent marks, device presence, inbox and device reads)
//! runs on rusqlite in `sqlite_hot`: one writer thread *group-commits* everything waiting
//! in its queue in one transaction, so one fsync covers many 202s. Cold paths (API keys,
//! settings, registration, subscriptions, push bookkeeping, message status) stay on
//! sqlx, which also runs the migrations. Reads never wait for the writer (WAL readers
//! see the last commit).

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_protocol::{
    ApnsEnvironment, Platform, PushProviderKind, PushTokenState, RegisterDeviceRequest,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use rusqlite::{params, OptionalExtension};

use super::sqlite_hot::{message_from_parts, Hot, Write, EVENT_ID_SQL};
use super::{
    ApiKeyRecord, DeliveryRow, Device, InboxEntry, NewMessage, PublishOutcome, PushAction,
    PushMark, PushResult, Store, StoreError, StoreResult, StoredMessage,
};
use crate::webhooks::{EventSet, EventType, QueuedEvent};

static MIGRATOR: std::sync::LazyLock<sqlx::migrate::Migrator> =
    std::sync::LazyLock::new(|| super::migrations::migrator(super::migrations::SQLITE));

/// Takes due pushes, leasing them until `?1` (the due poller, every poll): through
/// the partial index of pending pushes, which SQLite uses only when the query repeats
/// its condition verbatim (without it this scanned every unexpired inbox entry).
const TAKE_DUE_SQL: &str = "UPDATE deliveries SET push_due_at = ?1
     WHERE (device_id, seq) IN (
         SELECT device_id, seq FROM deliveries
         WHERE push_state = 'pending' AND push_due_at <= ?2 AND expires_at > ?3
           AND push_state IN ('pending', 'sending')
           AND (acked_at IS NULL OR push_always)
         ORDER BY push_due_at LIMIT ?4)
     RETURNING device_id, seq, push_attempts, message_id";

/// The `push_failed` events of `FAIL_ORPHANS_SQL`'s entries, queued just before it.
static ORPHAN_EVENTS_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO webhook_events (event_id, type, message_id, device_id, user_id, seq, provider, error, at, queued_at, next_attempt_at)
         SELECT {EVENT_ID_SQL}, 'push_failed', d.message_id, d.device_id, v.user_id, d.seq, COALESCE(d.push_provider, v.push_provider), ?1, ?2, ?2, ?2
         FROM deliveries d JOIN devices v ON v.id = d.device_id
         WHERE d.push_state = 'sending' AND d.push_at < ?3 ORDER BY d.device_id, d.seq"
    )
});

/// Records pushes a dead sender left claimed as failed (every poll): through the
/// index of pushes in flight (migration 0007).
const FAIL_ORPHANS_SQL: &str =
    "UPDATE deliveries SET push_state = 'failed', push_at = ?1, reason = ?2
     WHERE push_state = 'sending' AND push_at < ?3";

pub struct SqliteStore {
    read: SqlitePool,
    write: SqlitePool,
    hot: Hot,
    /// Webhook event types to queue (none when webhooks are off).
    events: EventSet,
}

/// The database file inside the data directory.
pub const SQLITE_FILE: &str = "herald.db";

impl SqliteStore {
    /// Opens (creating if needed) `dir/herald.db` and applies the migrations; queues
    /// no webhook events.
    pub async fn open(dir: &Path) -> StoreResult<SqliteStore> {
        SqliteStore::open_with(dir, EventSet::NONE).await
    }

    /// `open`, queueing webhook events of the types in `events`.
    pub async fn open_with(dir: &Path, events: EventSet) -> StoreResult<SqliteStore> {
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
        announce_pending_migrations(&write, &path).await;
        MIGRATOR
            .run(&write)
            .await
            .map_err(|e| StoreError::Other(anyhow::anyhow!("migrating {}: {e}", path.display())))?;
        // One node owns this file: pushes a previous run was sending when it died have
        // an unknown outcome, and a push is never risked twice.
        let mut tx = write.begin().await?;
        if events.contains(EventType::PushFailed) {
            let now = crate::clock::now_ms();
            sqlx::query(&format!(
                "INSERT INTO webhook_events (event_id, type, message_id, device_id, user_id, seq, provider, error, at, queued_at, next_attempt_at)
                 SELECT {EVENT_ID_SQL}, 'push_failed', d.message_id, d.device_id, v.user_id, d.seq, COALESCE(d.push_provider, v.push_provider), ?, ?, ?, ?
                 FROM deliveries d JOIN devices v ON v.id = d.device_id WHERE d.push_state = 'sending' ORDER BY d.device_id, d.seq"
            ))
            .bind(super::ORPHANED_PUSH_REASON)
            .bind(now)
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE deliveries SET push_state = 'failed', reason = ? WHERE push_state = 'sending'",
        )
        .bind(super::ORPHANED_PUSH_REASON)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.read_only(true))
            .await?;
        let hot = Hot::start(&path, events)?;
        Ok(SqliteStore {
            read,
            write,
            hot,
            events,
        })
    }
}

/// Says which migrations an existing database is about to get: some rewrite a table
/// (0006 copies the inbox once), which takes a while on a large store, and the
/// operator should know why the start is slow. Silent on a new database.
async fn announce_pending_migrations(write: &sqlx::SqlitePool, path: &Path) {
    let Ok(applied) = sqlx::query_scalar::<_, i64>("SELECT version FROM _sqlx_migrations")
        .fetch_all(write)
        .await
    else {
        return; // a new database: no migrations table yet
    };
    let pending: Vec<String> = MIGRATOR
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .map(|m| format!("{:04} {}", m.version, m.description))
        .collect();
    if !applied.is_empty() && !pending.is_empty() {
        tracing::info!(
            db = %path.display(),
            ?pending,
            "applying schema migrations before starting (a migration that rewrites a table takes a while on a large store)"
        );
    }
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
        self.hot.api_keys().await
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

    /// Runs on every API request, so it takes the rusqlite reader (one blocking-pool
    /// hop) rather than sqlx, whose worker round trips were 14% of the gateway's CPU
    /// with one publish per request (BENCHMARKS.md, v4). Not cached: a revocation, by
    /// this process, the CLI or another node, holds from the next request.
    async fn api_key_by_hash(&self, hash: &[u8]) -> StoreResult<Option<ApiKeyRecord>> {
        self.hot.api_key_by_hash(hash.to_vec()).await
    }

    async fn claim_device(
        &self,
        device_id: &str,
        user: &str,
        now: i64,
        max_devices: u64,
    ) -> StoreResult<Device> {
        // Connects of known devices only read; a new device is created in the next
        // write group instead of a transaction of its own, where the writer thread
        // counts the user's devices and inserts in one step.
        if let Some(d) = self.hot.device(device_id).await? {
            return if d.user_id == user {
                Ok(d)
            } else {
                Err(StoreError::DeviceOwnedByOtherUser(device_id.into()))
            };
        }
        self.hot
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
        self.hot.device(device_id).await
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
        self.hot
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
        let mut tx = self.write.begin().await?;
        if self.events.contains(EventType::TokenInvalid) {
            let now = crate::clock::now_ms();
            sqlx::query(&format!(
                "INSERT INTO webhook_events (event_id, type, device_id, user_id, provider, error, at, queued_at, next_attempt_at)
                 SELECT {EVENT_ID_SQL}, 'token_invalid', id, user_id, push_provider, ?, ?, ?, ?
                 FROM devices WHERE id = ? AND push_token = ? AND token_state <> 'invalid'"
            ))
            .bind(reason)
            .bind(now)
            .bind(now)
            .bind(now)
            .bind(device_id)
            .bind(token)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE devices SET token_state = 'invalid', token_error = ? WHERE id = ? AND push_token = ?",
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

    // This read and the next two run on every connect: on the rusqlite readers (one
    // blocking-pool hop) rather than sqlx's per-statement worker round trips.
    async fn device_topics(&self, device_id: &str) -> StoreResult<Vec<String>> {
        self.hot
            .column(
                "SELECT topic FROM subscriptions WHERE device_id = ?1 ORDER BY topic",
                device_id,
            )
            .await
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
        let before: Vec<i64> = self
            .hot
            .column(
                "SELECT revoked_before FROM token_revocations WHERE user_id = ?1",
                user,
            )
            .await?;
        Ok(before.first().copied())
    }

    async fn publish(&self, msg: NewMessage) -> StoreResult<PublishOutcome> {
        self.hot
            .write(|reply| Write::Publish(Box::new(msg), reply))
            .await
    }

    async fn publish_batch(
        &self,
        msgs: Vec<NewMessage>,
    ) -> StoreResult<Vec<StoreResult<PublishOutcome>>> {
        self.hot
            .write(|reply| Write::PublishMany(msgs, reply))
            .await
    }

    async fn fetch_after(
        &self,
        device_id: &str,
        after: i64,
        limit: u32,
        now: i64,
    ) -> StoreResult<Vec<InboxEntry>> {
        self.hot.fetch_after(device_id, after, limit, now).await
    }

    async fn ack(&self, device_id: &str, seq: i64, now: i64, wrote_live: bool) -> StoreResult<i64> {
        self.hot
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
        self.hot
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
        // On the writer thread like every hot write: through sqlx it raced the writer
        // for the database's write lock.
        let mut out = self
            .hot
            .run(move |conn| {
                let mut stmt = conn.prepare_cached(TAKE_DUE_SQL)?;
                let taken = stmt
                    .query_map(params![lease_until, now, now, limit as i64], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, String>(3)?,
                        ))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let mut messages: HashMap<String, Arc<StoredMessage>> = HashMap::new();
                let mut out = Vec::with_capacity(taken.len());
                for (device_id, seq, attempts, message_id) in taken {
                    let message = match messages.get(&message_id) {
                        Some(m) => m.clone(),
                        None => {
                            let m = conn
                                .prepare_cached(
                                    "SELECT id, target_kind, target, payload, created_at, expires_at FROM messages WHERE id = ?1",
                                )?
                                .query_row(params![message_id], |r| {
                                    Ok((
                                        r.get::<_, String>(0)?,
                                        r.get::<_, String>(1)?,
                                        r.get::<_, String>(2)?,
                                        r.get::<_, String>(3)?,
                                        r.get::<_, i64>(4)?,
                                        r.get::<_, i64>(5)?,
                                    ))
                                })?;
                            let m = match message_from_parts(m.0, &m.1, m.2, &m.3, m.4, m.5) {
                                Ok(m) => Arc::new(m),
                                Err(e) => return Ok(Err(e)),
                            };
                            messages.insert(message_id, m.clone());
                            m
                        }
                    };
                    out.push(InboxEntry {
                        device_id,
                        seq,
                        message,
                        push_pending: true,
                        push_attempts: attempts as u32,
                    });
                }
                Ok(Ok(out))
            })
            .await?;
        // RETURNING gives no order; settle the oldest first.
        out.sort_by_key(|e| (e.message.created_at, e.seq));
        Ok(out)
    }

    async fn fail_orphaned_pushes(&self, stale_before: i64, now: i64) -> StoreResult<u64> {
        let events = self.events;
        self.hot
            .run(move |conn| {
                if events.contains(EventType::PushFailed) {
                    conn.prepare_cached(&ORPHAN_EVENTS_SQL)?.execute(params![
                        super::ORPHANED_PUSH_REASON,
                        now,
                        stale_before
                    ])?;
                }
                let n = conn.prepare_cached(FAIL_ORPHANS_SQL)?.execute(params![
                    now,
                    super::ORPHANED_PUSH_REASON,
                    stale_before
                ])?;
                Ok(Ok(n as u64))
            })
            .await
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
        let items = items.to_vec();
        self.hot
            .run(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "UPDATE deliveries SET push_state = 'sending', push_at = ?1
                     WHERE device_id = ?2 AND seq = ?3 AND (acked_at IS NULL OR push_always)
                       AND expires_at > ?1 AND push_state = 'pending'",
                )?;
                let mut out = Vec::with_capacity(items.len());
                for (device_id, seq) in &items {
                    out.push(stmt.execute(params![now, device_id, seq])? == 1);
                }
                Ok(Ok(out))
            })
            .await
    }

    async fn record_push_results(&self, results: &[PushResult], now: i64) -> StoreResult<()> {
        let results = results.to_vec();
        let events = self.events;
        self.hot
            .run(move |conn| {
                for r in &results {
                    match &r.action {
                        PushAction::Finish {
                            mark,
                            provider,
                            reason,
                        } => {
                            let (state, kind) = match mark {
                                PushMark::Pushed => ("pushed", EventType::Pushed),
                                PushMark::Failed => ("failed", EventType::PushFailed),
                            };
                            if events.contains(kind) {
                                conn.prepare_cached(&format!(
                                    "INSERT INTO webhook_events (event_id, type, message_id, device_id, user_id, seq, provider, error, at, queued_at, next_attempt_at)
                                     SELECT {EVENT_ID_SQL}, ?1, d.message_id, d.device_id, v.user_id, d.seq, COALESCE(?2, v.push_provider), ?3, ?4, ?4, ?4
                                     FROM deliveries d JOIN devices v ON v.id = d.device_id
                                     WHERE d.device_id = ?5 AND d.seq = ?6"
                                ))?
                                .execute(params![kind.as_str(), provider, reason, now, r.device_id, r.seq])?;
                            }
                            conn.prepare_cached(
                                "UPDATE deliveries SET push_state = ?1, push_at = ?2, push_provider = ?3, reason = ?4
                                 WHERE device_id = ?5 AND seq = ?6",
                            )?
                            .execute(params![state, now, provider, reason, r.device_id, r.seq])?;
                        }
                        PushAction::Retry { due_at, reason } => {
                            conn.prepare_cached(
                                "UPDATE deliveries SET push_state = 'pending', push_due_at = ?1, push_attempts = push_attempts + 1, reason = ?2
                                 WHERE device_id = ?3 AND seq = ?4 AND push_state = 'sending'",
                            )?
                            .execute(params![due_at, reason, r.device_id, r.seq])?;
                        }
                    }
                }
                Ok(Ok(()))
            })
            .await
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
        let expired = self.events.contains(EventType::Expired);
        self.hot
            .run(move |conn| {
                let key = super::EXPIRED_THROUGH_KEY;
                if !expired {
                    // Turned on later, it starts from then, not from an old mark.
                    conn.prepare_cached("DELETE FROM settings WHERE key = ?1")?
                        .execute(params![key])?;
                    return Ok(Ok(()));
                }
                let through: Option<i64> = conn
                    .prepare_cached("SELECT CAST(value AS INTEGER) FROM settings WHERE key = ?1")?
                    .query_row(params![key], |r| r.get(0))
                    .optional()?;
                if let Some(through) = through {
                    conn.prepare_cached(&format!(
                        "INSERT INTO webhook_events (event_id, type, message_id, device_id, user_id, seq, at, queued_at, next_attempt_at)
                         SELECT {EVENT_ID_SQL}, 'expired', d.message_id, d.device_id, v.user_id, d.seq, d.expires_at, ?1, ?1
                         FROM deliveries d JOIN devices v ON v.id = d.device_id
                         WHERE d.expires_at > ?2 AND d.expires_at <= ?1 AND d.acked_at IS NULL
                         ORDER BY d.expires_at"
                    ))?
                    .execute(params![now, through])?;
                }
                conn.prepare_cached(
                    "INSERT INTO settings (key, value) VALUES (?1, ?2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )?
                .execute(params![key, now.to_string()])?;
                Ok(Ok(()))
            })
            .await?;
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

    async fn webhook_due(&self, now: i64, limit: u32) -> StoreResult<(u64, Option<i64>)> {
        let row = sqlx::query(
            "SELECT count(*) AS n, min(queued_at) AS oldest FROM
               (SELECT queued_at FROM webhook_events WHERE next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?)",
        )
        .bind(now)
        .bind(limit as i64)
        .fetch_one(&self.read)
        .await?;
        Ok((row.get::<i64, _>("n") as u64, row.get("oldest")))
    }

    async fn webhook_claim(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> StoreResult<Vec<QueuedEvent>> {
        let rows = sqlx::query(
            "UPDATE webhook_events SET next_attempt_at = ?
             WHERE queue_id IN (SELECT queue_id FROM webhook_events WHERE next_attempt_at <= ?
                                ORDER BY queue_id LIMIT ?)
             RETURNING queue_id, event_id, type, message_id, device_id, user_id, seq, provider, error, at, queued_at, attempts",
        )
        .bind(lease_until)
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&self.write)
        .await?;
        let mut out: Vec<QueuedEvent> = rows.iter().map(queued_event_from_row).collect();
        // RETURNING gives no order; send in queue order.
        out.sort_by_key(|e| e.queue_id);
        Ok(out)
    }

    async fn webhook_delete(&self, queue_ids: &[i64]) -> StoreResult<()> {
        if queue_ids.is_empty() {
            return Ok(());
        }
        let ids = serde_json::to_string(queue_ids).expect("ids serialize");
        sqlx::query(
            "DELETE FROM webhook_events WHERE queue_id IN (SELECT value FROM json_each(?))",
        )
        .bind(ids)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn webhook_retry(&self, items: &[(i64, i64)]) -> StoreResult<()> {
        if items.is_empty() {
            return Ok(());
        }
        let items = serde_json::to_string(items).expect("items serialize");
        sqlx::query(
            "UPDATE webhook_events SET attempts = attempts + 1,
                 next_attempt_at = (SELECT j.value ->> 1 FROM json_each(?1) j WHERE j.value ->> 0 = webhook_events.queue_id)
             WHERE queue_id IN (SELECT value ->> 0 FROM json_each(?1))",
        )
        .bind(items)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn webhook_queue_stats(&self) -> StoreResult<(u64, Option<i64>)> {
        let row = sqlx::query("SELECT count(*) AS n, min(queued_at) AS oldest FROM webhook_events")
            .fetch_one(&self.read)
            .await?;
        Ok((row.get::<i64, _>("n") as u64, row.get("oldest")))
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }
}

fn queued_event_from_row(r: &sqlx::sqlite::SqliteRow) -> QueuedEvent {
    QueuedEvent {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The due poller's statements run on every poll, on the writer thread: each must
    /// reach its rows through a push index, never by walking the inbox (which holds
    /// every retained entry).
    #[tokio::test]
    async fn the_due_pollers_statements_use_the_push_indexes() {
        let tmp = crate::testing::TempDir::new("herald-plans");
        let _store = SqliteStore::open(&tmp.0).await.unwrap();
        let conn = rusqlite::Connection::open(tmp.0.join(SQLITE_FILE)).unwrap();
        for sql in [TAKE_DUE_SQL, FAIL_ORPHANS_SQL, ORPHAN_EVENTS_SQL.as_str()] {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            // Unbound parameters are NULL: the plan does not depend on them.
            let mut rows = stmt.raw_query();
            let mut plan: Vec<String> = Vec::new();
            while let Some(r) = rows.next().unwrap() {
                plan.push(r.get(3).unwrap());
            }
            let inbox: Vec<&String> = plan
                .iter()
                .filter(|step| step.contains("deliveries ") || step.contains(" d "))
                .collect();
            assert!(!inbox.is_empty(), "{plan:?}");
            for step in inbox {
                assert!(
                    step.contains("INDEX deliveries_push_")
                        || step.contains("INDEX deliveries_by_device"),
                    "{sql}\n{plan:?}"
                );
            }
        }
    }
}
