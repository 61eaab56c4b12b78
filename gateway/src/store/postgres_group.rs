//! The PostgreSQL hot path: group commit.
//!
//! Publishes (single and batch), acks, `sent_at` marks, device claims and presence
//! updates go to one task per store over a bounded channel. The task takes everything
//! waiting (up to `MAX_GROUP` writes' worth), runs it in one transaction with set-based
//! statements over the whole group (arrays bound as parameters, `unnest`), commits, and
//! only then answers each caller. A group costs a fixed number of round trips however
//! many writes it holds:
//!
//! 1. claims: the claiming users' advisory locks (the device cap, in key order), one
//!    read of which ids exist and one count of the new ones' users' devices, one
//!    `INSERT … SELECT FROM unnest … ON CONFLICT DO NOTHING` (ids in order) of those
//!    within their cap, and one read of the claimed rows;
//! 2. reads: existing idempotency keys, and the devices of user and topic targets;
//! 3. one `SELECT … ORDER BY id FOR UPDATE` of every device the group writes
//!    (recipients, acked, touched): the lock serialises seq assignment and acks per
//!    device across all nodes, in one global order, so groups cannot deadlock on
//!    devices;
//! 4. validation and seq assignment in memory (a refused item takes no part in the
//!    writes), then one `INSERT` of the messages, one `UPDATE devices` (last_seq,
//!    acked_seq, last_seen), one `INSERT` of the inbox entries;
//! 5. one ordered `SELECT … FOR UPDATE` of the inbox rows the group's acks and sent
//!    marks touch, then one `UPDATE` for the acks and one for the marks;
//! 6. `COMMIT`.
//!
//! A lost race (another node committed an idempotency key the group wants) or a
//! deadlock rolls the whole group back and runs it again; any other database error
//! fails every caller of the group, and nothing of it is stored.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use herald_protocol::{PushPolicy, Target};
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::{mpsc, oneshot};

use super::postgres::{device_from_row, is_retryable, DEVICE_COLUMNS};
use super::{
    Device, InboxEntry, NewMessage, PublishOutcome, StoreError, StoreResult, StoredMessage,
};
use crate::webhooks::{EventSet, EventType};

/// Writes (a batch counts its messages) committed in one transaction at most.
const MAX_GROUP: usize = 512;
/// Writes waiting for the group task at most; callers wait beyond that.
const QUEUE: usize = 4096;
/// Times a group runs again after a lost key race or a deadlock.
const ATTEMPTS: usize = 5;

type Reply<T> = oneshot::Sender<StoreResult<T>>;

/// A write that waits for its group's commit.
pub(super) enum Write {
    /// One publish request: a single message, or a batch that shares one commit.
    Publish {
        msgs: Vec<NewMessage>,
        reply: Reply<Vec<StoreResult<PublishOutcome>>>,
    },
    Ack {
        device_id: String,
        seq: i64,
        now: i64,
        /// The entries were written to the acking session (`Store::ack`).
        wrote_live: bool,
        reply: Reply<i64>,
    },
    MarkSent {
        ranges: Vec<(String, i64, i64)>,
        now: i64,
        reply: Reply<()>,
    },
    Touch {
        device_id: String,
        now: i64,
        reply: Reply<()>,
    },
    Claim {
        device_id: String,
        user: String,
        now: i64,
        /// The user's device cap (`limits.max_devices_per_user`).
        max_devices: u64,
        reply: Reply<Device>,
    },
}

/// What a write produced, held until the group committed.
enum Outcome {
    Publish(Vec<StoreResult<PublishOutcome>>),
    Ack(StoreResult<i64>),
    Unit,
    Device(StoreResult<Device>),
}

impl Write {
    fn weight(&self) -> usize {
        match self {
            Write::Publish { msgs, .. } => msgs.len().max(1),
            Write::MarkSent { ranges, .. } => ranges.len().max(1),
            _ => 1,
        }
    }

    fn answer(self, outcome: Outcome) {
        match (self, outcome) {
            (Write::Publish { reply, .. }, Outcome::Publish(r)) => {
                let _ = reply.send(Ok(r));
            }
            (Write::Ack { reply, .. }, Outcome::Ack(r)) => {
                let _ = reply.send(r);
            }
            (Write::MarkSent { reply, .. } | Write::Touch { reply, .. }, Outcome::Unit) => {
                let _ = reply.send(Ok(()));
            }
            (Write::Claim { reply, .. }, Outcome::Device(r)) => {
                let _ = reply.send(r);
            }
            _ => unreachable!("outcomes are produced in the order and kind of their writes"),
        }
    }

    fn fail(self, err: &dyn Fn() -> StoreError) {
        match self {
            Write::Publish { reply, .. } => {
                let _ = reply.send(Err(err()));
            }
            Write::Ack { reply, .. } => {
                let _ = reply.send(Err(err()));
            }
            Write::MarkSent { reply, .. } | Write::Touch { reply, .. } => {
                let _ = reply.send(Err(err()));
            }
            Write::Claim { reply, .. } => {
                let _ = reply.send(Err(err()));
            }
        }
    }
}

/// The handle of a store's group-commit task.
pub(super) struct Group {
    writes: mpsc::Sender<Write>,
}

impl Group {
    pub(super) fn start(pool: PgPool, events: EventSet) -> Group {
        let (writes, rx) = mpsc::channel(QUEUE);
        tokio::spawn(group_loop(pool, rx, events));
        Group { writes }
    }

    /// Hands a write to the group task and waits for its group's commit.
    pub(super) async fn write<T>(&self, make: impl FnOnce(Reply<T>) -> Write) -> StoreResult<T> {
        let stopped = || StoreError::Other(anyhow::anyhow!("store group commit stopped"));
        let (reply, rx) = oneshot::channel();
        self.writes.send(make(reply)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

async fn group_loop(pool: PgPool, mut rx: mpsc::Receiver<Write>, events: EventSet) {
    let mut batch: Vec<Write> = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.recv().await {
        let mut weight = first.weight();
        batch.push(first);
        while weight < MAX_GROUP {
            match rx.try_recv() {
                Ok(w) => {
                    weight += w.weight();
                    batch.push(w);
                }
                Err(_) => break,
            }
        }
        match commit_group(&pool, &batch, events).await {
            Ok(outcomes) => {
                for (write, outcome) in batch.drain(..).zip(outcomes) {
                    write.answer(outcome);
                }
            }
            Err(GroupError::Conflict) => {
                tracing::warn!(writes = batch.len(), "write group kept conflicting");
                for write in batch.drain(..) {
                    write.fail(&conflict);
                }
            }
            // The server refused a statement (not a lost connection): one write may be
            // poisoning the group. Commit its writes one by one instead, so only that
            // one fails.
            Err(GroupError::Db(e @ sqlx::Error::Database(_))) if batch.len() > 1 => {
                tracing::warn!(error = %e, writes = batch.len(), "write group refused; committing its writes one by one");
                commit_singly(&pool, batch.drain(..), events).await;
            }
            Err(GroupError::Db(e)) => {
                // Rolled back: nothing of this group was stored, so every caller is
                // told it failed (no publish got a 202).
                tracing::error!(error = %e, "write group failed to commit");
                let msg = e.to_string();
                for write in batch.drain(..) {
                    write.fail(&|| StoreError::Other(anyhow::anyhow!("commit failed: {msg}")));
                }
            }
        }
    }
}

async fn commit_singly(pool: &PgPool, writes: impl Iterator<Item = Write>, events: EventSet) {
    let mut writes = writes.peekable();
    while let Some(write) = writes.next() {
        match commit_group(pool, std::slice::from_ref(&write), events).await {
            Ok(mut outcomes) => write.answer(outcomes.pop().expect("one outcome")),
            Err(GroupError::Conflict) => write.fail(&conflict),
            Err(GroupError::Db(e)) => {
                tracing::error!(error = %e, "write failed to commit");
                let msg = e.to_string();
                let fail = || StoreError::Other(anyhow::anyhow!("commit failed: {msg}"));
                write.fail(&fail);
                if !matches!(e, sqlx::Error::Database(_)) {
                    // The database is gone, not this write: the others would only wait
                    // for the same failure.
                    for w in writes.by_ref() {
                        w.fail(&fail);
                    }
                }
            }
        }
    }
}

fn conflict() -> StoreError {
    StoreError::Conflict(
        "the write kept conflicting with concurrent writes on other nodes; retry".into(),
    )
}

enum GroupError {
    Conflict,
    Db(sqlx::Error),
}

async fn commit_group(
    pool: &PgPool,
    batch: &[Write],
    events: EventSet,
) -> Result<Vec<Outcome>, GroupError> {
    for _ in 0..ATTEMPTS {
        let mut tx = pool.begin().await.map_err(GroupError::Db)?;
        match run_group(&mut tx, batch, events).await {
            Ok(Some(outcomes)) => {
                tx.commit().await.map_err(GroupError::Db)?;
                return Ok(outcomes);
            }
            // Another node committed a key this group wanted: run it again, and the
            // items with that key find the winner's message.
            Ok(None) => tx.rollback().await.map_err(GroupError::Db)?,
            Err(e) if is_retryable(&e) => {
                tracing::debug!(error = %e, "write group retried");
                drop(tx);
            }
            Err(e) => return Err(GroupError::Db(e)),
        }
    }
    Err(GroupError::Conflict)
}

/// A device row the group holds locked, with what the group does to it.
struct LockedDevice {
    last_seq: i64,
    acked_seq: i64,
    orig_last: i64,
    orig_acked: i64,
    seen: Option<i64>,
}

/// What becomes of one message of the group.
enum Plan {
    Refused(StoreError),
    /// An earlier message (committed before) holds the key.
    Duplicate {
        message_id: String,
        recipients: u64,
    },
    /// The message at this index of the group holds the key.
    SameAs(usize),
    Create {
        devices: Vec<String>,
        /// A message whose key is past the window: its key is released.
        release: Option<String>,
    },
}

/// Runs the group in `conn`'s transaction. `Ok(None)`: a race was lost, roll back and
/// run again.
async fn run_group(
    conn: &mut PgConnection,
    batch: &[Write],
    events: EventSet,
) -> Result<Option<Vec<Outcome>>, sqlx::Error> {
    let pubs: Vec<&NewMessage> = batch
        .iter()
        .flat_map(|w| match w {
            Write::Publish { msgs, .. } => msgs.iter().collect(),
            _ => Vec::new(),
        })
        .collect();

    // 1. Claims.
    let (claimed, capped) = claim_devices(conn, batch).await?;

    // 2a. Idempotency keys already taken.
    type Key<'a> = (&'a str, &'a str);
    let mut taken: HashMap<(String, String), (String, i64, i64)> = HashMap::new();
    let keyed: Vec<Key> = pubs
        .iter()
        .filter_map(|m| Some((m.api_key_id.as_str(), m.idempotency_key.as_deref()?)))
        .collect();
    if !keyed.is_empty() {
        let api: Vec<&str> = keyed.iter().map(|k| k.0).collect();
        let key: Vec<&str> = keyed.iter().map(|k| k.1).collect();
        let rows = sqlx::query(
            "SELECT m.id, m.api_key_id, m.idempotency_key, m.recipients, m.created_at
             FROM messages m
             WHERE m.idempotency_key IS NOT NULL
               AND (m.api_key_id, m.idempotency_key) IN (SELECT * FROM unnest($1::TEXT[], $2::TEXT[]))",
        )
        .bind(&api)
        .bind(&key)
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            taken.insert(
                (row.get("api_key_id"), row.get("idempotency_key")),
                (row.get("id"), row.get("recipients"), row.get("created_at")),
            );
        }
    }
    let fresh_duplicate = |m: &NewMessage| -> Option<(String, i64)> {
        let key = m.idempotency_key.as_ref()?;
        let (id, recipients, created_at) = taken.get(&(m.api_key_id.clone(), key.clone()))?;
        (*created_at >= m.idempotency_since).then(|| (id.clone(), *recipients))
    };

    // 2b. The devices of user and topic targets.
    let mut users: Vec<&str> = Vec::new();
    let mut topics: Vec<&str> = Vec::new();
    for m in &pubs {
        if fresh_duplicate(m).is_some() {
            continue;
        }
        match &m.target {
            Target::User(u) => users.push(u),
            Target::Topic(t) => topics.push(t),
            Target::Device(_) => {}
        }
    }
    let mut by_user: HashMap<String, Vec<String>> = HashMap::new();
    let mut by_topic: HashMap<String, Vec<String>> = HashMap::new();
    if !users.is_empty() || !topics.is_empty() {
        let rows = sqlx::query(
            "SELECT 'u' AS k, user_id AS v, id AS d FROM devices WHERE user_id = ANY($1)
             UNION ALL
             SELECT 't', topic, device_id FROM subscriptions WHERE topic = ANY($2)",
        )
        .bind(&users)
        .bind(&topics)
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            let map = if row.get::<&str, _>("k") == "u" {
                &mut by_user
            } else {
                &mut by_topic
            };
            map.entry(row.get("v")).or_default().push(row.get("d"));
        }
    }
    let candidates = |m: &NewMessage| -> Vec<String> {
        match &m.target {
            Target::Device(d) => vec![d.clone()],
            Target::User(u) => by_user.get(u).cloned().unwrap_or_default(),
            Target::Topic(t) => by_topic.get(t).cloned().unwrap_or_default(),
        }
    };

    // 3. Lock every device the group writes, in one global order.
    let mut lock: Vec<String> = Vec::new();
    for m in &pubs {
        if fresh_duplicate(m).is_some() {
            continue;
        }
        let c = candidates(m);
        if c.len() <= m.max_recipients {
            lock.extend(c);
        }
    }
    for w in batch {
        match w {
            Write::Ack { device_id, .. } | Write::Touch { device_id, .. } => {
                lock.push(device_id.clone())
            }
            _ => {}
        }
    }
    lock.sort_unstable();
    lock.dedup();
    let mut locked: HashMap<String, LockedDevice> = HashMap::with_capacity(lock.len());
    if !lock.is_empty() {
        let rows = sqlx::query(
            r#"SELECT id, last_seq, acked_seq FROM devices WHERE id = ANY($1)
               ORDER BY id COLLATE "C" FOR UPDATE"#,
        )
        .bind(&lock)
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            let (last, acked): (i64, i64) = (row.get("last_seq"), row.get("acked_seq"));
            locked.insert(
                row.get("id"),
                LockedDevice {
                    last_seq: last,
                    acked_seq: acked,
                    orig_last: last,
                    orig_acked: acked,
                    seen: None,
                },
            );
        }
    }

    // 4. Decide each message in group order; refused ones take no part in the writes.
    let mut plans: Vec<Plan> = Vec::with_capacity(pubs.len());
    let mut in_group: HashMap<Key, usize> = HashMap::new();
    for (i, m) in pubs.iter().enumerate() {
        let key = m
            .idempotency_key
            .as_deref()
            .map(|k| (m.api_key_id.as_str(), k));
        if let Some(&j) = key.as_ref().and_then(|k| in_group.get(k)) {
            plans.push(Plan::SameAs(j));
            continue;
        }
        if let Some((message_id, recipients)) = fresh_duplicate(m) {
            plans.push(Plan::Duplicate {
                message_id,
                recipients: recipients as u64,
            });
            continue;
        }
        let release = m
            .idempotency_key
            .as_ref()
            .and_then(|k| taken.get(&(m.api_key_id.clone(), k.clone())))
            .map(|(id, _, _)| id.clone());
        let c = candidates(m);
        if let Target::Device(d) = &m.target {
            if !locked.contains_key(d) {
                plans.push(Plan::Refused(StoreError::NotFound(format!(
                    "device {d} is not registered"
                ))));
                continue;
            }
        }
        if c.len() > m.max_recipients {
            plans.push(Plan::Refused(StoreError::TooManyRecipients(c.len())));
            continue;
        }
        // Recipients deleted between the lookup and the lock are left out.
        let mut devices: Vec<String> = c.into_iter().filter(|d| locked.contains_key(d)).collect();
        devices.sort_unstable();
        devices.dedup();
        if let Some(k) = key {
            in_group.insert(k, i);
        }
        plans.push(Plan::Create { devices, release });
    }

    let releases: Vec<&str> = plans
        .iter()
        .filter_map(|p| match p {
            Plan::Create {
                release: Some(id), ..
            } => Some(id.as_str()),
            _ => None,
        })
        .collect();
    if !releases.is_empty() {
        sqlx::query("UPDATE messages SET idempotency_key = NULL WHERE id = ANY($1)")
            .bind(&releases)
            .execute(&mut *conn)
            .await?;
    }

    // The messages, one statement.
    let creating: Vec<(usize, &NewMessage, &Vec<String>)> = plans
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match p {
            Plan::Create { devices, .. } => Some((i, pubs[i], devices)),
            _ => None,
        })
        .collect();
    if !creating.is_empty() {
        let mut payloads = Vec::with_capacity(creating.len());
        for (_, m, _) in &creating {
            payloads.push(
                serde_json::to_string(&m.payload).map_err(|e| sqlx::Error::Encode(e.into()))?,
            );
        }
        let inserted: Vec<String> = sqlx::query_scalar(
            "INSERT INTO messages (id, api_key_id, target_kind, target, payload, recipients, created_at, expires_at, idempotency_key)
             SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[],
                                  $6::BIGINT[], $7::BIGINT[], $8::BIGINT[], $9::TEXT[])
             ON CONFLICT (api_key_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
             RETURNING id",
        )
        .bind(creating.iter().map(|c| c.1.id.as_str()).collect::<Vec<_>>())
        .bind(creating.iter().map(|c| c.1.api_key_id.as_str()).collect::<Vec<_>>())
        .bind(creating.iter().map(|c| c.1.target.kind()).collect::<Vec<_>>())
        .bind(creating.iter().map(|c| c.1.target.value()).collect::<Vec<_>>())
        .bind(&payloads)
        .bind(creating.iter().map(|c| c.2.len() as i64).collect::<Vec<_>>())
        .bind(creating.iter().map(|c| c.1.created_at).collect::<Vec<_>>())
        .bind(creating.iter().map(|c| c.1.expires_at).collect::<Vec<_>>())
        .bind(
            creating
                .iter()
                .map(|c| c.1.idempotency_key.as_deref())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut *conn)
        .await?;
        if inserted.len() != creating.len() {
            // A key committed by another node since our lookup.
            return Ok(None);
        }
    }

    // Seqs in group order, then acks (which see this group's publishes) and presence.
    let mut results: Vec<Option<StoreResult<PublishOutcome>>> = Vec::with_capacity(pubs.len());
    let (mut del_dev, mut del_seq, mut del_msg, mut del_exp, mut del_state, mut del_due) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut del_always: Vec<bool> = vec![];
    for (i, plan) in plans.into_iter().enumerate() {
        results.push(Some(match plan {
            Plan::Refused(e) => Err(e),
            Plan::Duplicate {
                message_id,
                recipients,
            } => Ok(PublishOutcome::Duplicate {
                message_id,
                recipients,
            }),
            Plan::SameAs(j) => {
                let recipients = match &results[j] {
                    Some(Ok(PublishOutcome::Created { entries })) => entries.len() as u64,
                    _ => unreachable!("a key is held by a message the group creates"),
                };
                Ok(PublishOutcome::Duplicate {
                    message_id: pubs[j].id.clone(),
                    recipients,
                })
            }
            Plan::Create { devices, .. } => {
                let m = pubs[i];
                let stored = Arc::new(StoredMessage::new(
                    m.id.clone(),
                    m.target.clone(),
                    m.payload.clone(),
                    m.created_at,
                    m.expires_at,
                ));
                let mut entries = Vec::with_capacity(devices.len());
                for device_id in devices {
                    let d = locked.get_mut(&device_id).expect("recipients are locked");
                    d.last_seq += 1;
                    del_dev.push(device_id.clone());
                    del_seq.push(d.last_seq);
                    del_msg.push(m.id.as_str());
                    del_exp.push(m.expires_at);
                    del_state.push(m.push_due_at.map(|_| "pending"));
                    del_due.push(m.push_due_at);
                    del_always.push(m.payload.push == PushPolicy::Always);
                    entries.push(InboxEntry {
                        device_id,
                        seq: d.last_seq,
                        message: stored.clone(),
                        push_pending: m.push_due_at.is_some(),
                        push_attempts: 0,
                    });
                }
                Ok(PublishOutcome::Created { entries })
            }
        }));
    }

    let (mut ack_dev, mut ack_lo, mut ack_hi, mut ack_now) = (vec![], vec![], vec![], vec![]);
    let mut ack_live: Vec<bool> = vec![];
    // Entries recorded as sent by this group, for their `delivered` events: the sent
    // marks, and the ranges an ack from the session that wrote them covers.
    let (mut dlv_dev, mut dlv_lo, mut dlv_hi, mut dlv_now) = (vec![], vec![], vec![], vec![]);
    let mut ack_results: Vec<StoreResult<i64>> = Vec::new();
    for w in batch {
        match w {
            Write::Ack {
                device_id,
                seq,
                now,
                wrote_live,
                ..
            } => ack_results.push(match locked.get_mut(device_id) {
                None => Err(StoreError::NotFound(format!(
                    "device {device_id} is not registered"
                ))),
                Some(d) => {
                    // An ack beyond what was assigned cannot be honest; clamp rather
                    // than let a buggy client skip messages that do not exist yet.
                    let target = (*seq).min(d.last_seq);
                    if target > d.acked_seq {
                        ack_dev.push(device_id.as_str());
                        ack_lo.push(d.acked_seq + 1);
                        ack_hi.push(target);
                        ack_now.push(*now);
                        ack_live.push(*wrote_live);
                        if *wrote_live {
                            dlv_dev.push(device_id.as_str());
                            dlv_lo.push(d.acked_seq + 1);
                            dlv_hi.push(target);
                            dlv_now.push(*now);
                        }
                        d.acked_seq = target;
                        d.seen = d.seen.max(Some(*now));
                    }
                    Ok(d.acked_seq)
                }
            }),
            Write::Touch { device_id, now, .. } => {
                if let Some(d) = locked.get_mut(device_id) {
                    d.seen = d.seen.max(Some(*now));
                }
            }
            _ => {}
        }
    }

    // The devices, one statement.
    let (mut dev_id, mut dev_last, mut dev_acked, mut dev_seen) = (vec![], vec![], vec![], vec![]);
    for (id, d) in &locked {
        if d.last_seq != d.orig_last || d.acked_seq != d.orig_acked || d.seen.is_some() {
            dev_id.push(id.as_str());
            dev_last.push(d.last_seq);
            dev_acked.push(d.acked_seq);
            dev_seen.push(d.seen);
        }
    }
    if !dev_id.is_empty() {
        sqlx::query(
            "UPDATE devices d SET last_seq = c.last_seq, acked_seq = c.acked_seq,
                    last_seen = COALESCE(c.seen, d.last_seen)
             FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[])
                  AS c(id, last_seq, acked_seq, seen)
             WHERE d.id = c.id",
        )
        .bind(&dev_id)
        .bind(&dev_last)
        .bind(&dev_acked)
        .bind(&dev_seen)
        .execute(&mut *conn)
        .await?;
    }

    // The inbox entries, one statement.
    if !del_dev.is_empty() {
        sqlx::query(
            "INSERT INTO deliveries (device_id, seq, message_id, expires_at, push_state, push_due_at, push_always)
             SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::TEXT[], $4::BIGINT[], $5::TEXT[], $6::BIGINT[], $7::BOOLEAN[])",
        )
        .bind(&del_dev)
        .bind(&del_seq)
        .bind(&del_msg)
        .bind(&del_exp)
        .bind(&del_state)
        .bind(&del_due)
        .bind(&del_always)
        .execute(&mut *conn)
        .await?;
    }

    // Acks and sent marks: lock their rows in one order first (a single UPDATE locks
    // in whatever order its plan visits rows, and two groups marking overlapping
    // rows could deadlock), then one UPDATE each.
    let (mut sent_dev, mut sent_lo, mut sent_hi, mut sent_now) = (vec![], vec![], vec![], vec![]);
    for w in batch {
        if let Write::MarkSent { ranges, now, .. } = w {
            for (d, lo, hi) in ranges {
                sent_dev.push(d.as_str());
                sent_lo.push(*lo);
                sent_hi.push(*hi);
                sent_now.push(*now);
            }
        }
    }
    if !ack_dev.is_empty() || !sent_dev.is_empty() {
        let all_dev: Vec<&str> = ack_dev.iter().chain(&sent_dev).copied().collect();
        let all_lo: Vec<i64> = ack_lo.iter().chain(&sent_lo).copied().collect();
        let all_hi: Vec<i64> = ack_hi.iter().chain(&sent_hi).copied().collect();
        sqlx::query(
            r#"SELECT d.seq FROM deliveries d
               JOIN unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[]) AS r(device_id, lo, hi)
                 ON d.device_id = r.device_id AND d.seq >= r.lo AND d.seq <= r.hi
               ORDER BY d.device_id COLLATE "C", d.seq
               FOR UPDATE OF d"#,
        )
        .bind(&all_dev)
        .bind(&all_lo)
        .bind(&all_hi)
        .execute(&mut *conn)
        .await?;
    }
    // Webhook events of the entries acked and sent for the first time, before the
    // updates that make them so (same transaction: the event exists iff the change
    // committed).
    if !ack_dev.is_empty() && events.contains(EventType::Acked) {
        queue_range_events(
            conn,
            EventType::Acked,
            "d.acked_at IS NULL",
            (&ack_dev, &ack_lo, &ack_hi, &ack_now),
        )
        .await?;
    }
    dlv_dev.extend(&sent_dev);
    dlv_lo.extend(&sent_lo);
    dlv_hi.extend(&sent_hi);
    dlv_now.extend(&sent_now);
    if !dlv_dev.is_empty() && events.contains(EventType::Delivered) {
        queue_range_events(
            conn,
            EventType::Delivered,
            "d.sent_at IS NULL",
            (&dlv_dev, &dlv_lo, &dlv_hi, &dlv_now),
        )
        .await?;
    }
    if !ack_dev.is_empty() {
        // The ack cancels the entries' scheduled fallback pushes; `always` pushes, and
        // pushes already being sent or settled, keep theirs.
        sqlx::query(
            "UPDATE deliveries d SET acked_at = r.now,
                    sent_at = CASE WHEN r.live THEN coalesce(d.sent_at, r.now) ELSE d.sent_at END,
                    push_state = CASE WHEN d.push_state = 'pending' AND NOT d.push_always THEN NULL ELSE d.push_state END,
                    push_due_at = CASE WHEN d.push_state = 'pending' AND NOT d.push_always THEN NULL ELSE d.push_due_at END
             FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::BOOLEAN[]) AS r(device_id, lo, hi, now, live)
             WHERE d.device_id = r.device_id AND d.seq >= r.lo AND d.seq <= r.hi AND d.acked_at IS NULL",
        )
        .bind(&ack_dev)
        .bind(&ack_lo)
        .bind(&ack_hi)
        .bind(&ack_now)
        .bind(&ack_live)
        .execute(&mut *conn)
        .await?;
    }
    if !sent_dev.is_empty() {
        sqlx::query(
            "UPDATE deliveries d SET sent_at = r.now
             FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[]) AS r(device_id, lo, hi, now)
             WHERE d.device_id = r.device_id AND d.seq >= r.lo AND d.seq <= r.hi AND d.sent_at IS NULL",
        )
        .bind(&sent_dev)
        .bind(&sent_lo)
        .bind(&sent_hi)
        .bind(&sent_now)
        .execute(&mut *conn)
        .await?;
    }

    // Every write's outcome, in the order of the writes.
    let mut results = results
        .into_iter()
        .map(|r| r.expect("every message planned"));
    let mut ack_results = ack_results.into_iter();
    let outcomes = batch
        .iter()
        .map(|w| match w {
            Write::Publish { msgs, .. } => {
                Outcome::Publish(results.by_ref().take(msgs.len()).collect())
            }
            Write::Ack { .. } => Outcome::Ack(ack_results.next().expect("one per ack")),
            Write::MarkSent { .. } | Write::Touch { .. } => Outcome::Unit,
            Write::Claim {
                device_id, user, ..
            } => Outcome::Device(match claimed.get(device_id) {
                None => Err(capped
                    .get(&(device_id.as_str(), user.as_str()))
                    .map(|&(count, max)| StoreError::DeviceCapReached {
                        user: user.clone(),
                        count,
                        max,
                    })
                    .unwrap_or_else(|| {
                        StoreError::NotFound(format!("device {device_id} was deleted meanwhile"))
                    })),
                Some(d) if d.user_id != *user => {
                    Err(StoreError::DeviceOwnedByOtherUser(device_id.clone()))
                }
                Some(d) => Ok(d.clone()),
            }),
        })
        .collect();
    Ok(Some(outcomes))
}

/// Advisory-lock class of the per-user device cap (`pg_advisory_xact_lock(class, key)`),
/// so Herald's locks do not collide with another application's in the same database.
const DEVICE_CAP_LOCK_CLASS: i32 = 0x4852_4c44; // "HRLD"

/// The user's key in `DEVICE_CAP_LOCK_CLASS`: FNV-1a of the id, fixed so that every
/// node and every version takes the same lock for the same user. Two users sharing a
/// key only wait for each other.
fn device_cap_lock_key(user: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in user.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h as i32
}

/// Claimed device per id, and the claims refused by their user's cap
/// (`(device, user)` → `(devices the user has, cap)`).
type Claims<'a> = (
    HashMap<String, Device>,
    HashMap<(&'a str, &'a str), (u64, u64)>,
);

/// The group's device claims, in id order (two groups claiming the same new ids cannot
/// deadlock); among claims of one id the first in the group wins. A new device counts
/// against its user's cap: the group first takes each claiming user's advisory lock, in
/// key order (groups cannot deadlock on them, and a group holds no row lock yet), so
/// the count and the insert are one step across nodes; under READ COMMITTED the count
/// after the lock sees every device of whoever held it before.
async fn claim_devices<'a>(
    conn: &mut PgConnection,
    batch: &'a [Write],
) -> Result<Claims<'a>, sqlx::Error> {
    let mut claims: Vec<(&str, &str, i64, u64)> = batch
        .iter()
        .filter_map(|w| match w {
            Write::Claim {
                device_id,
                user,
                now,
                max_devices,
                ..
            } => Some((device_id.as_str(), user.as_str(), *now, *max_devices)),
            _ => None,
        })
        .collect();
    let mut claimed: HashMap<String, Device> = HashMap::new();
    let mut capped = HashMap::new();
    if claims.is_empty() {
        return Ok((claimed, capped));
    }
    claims.sort_by(|a, b| a.0.cmp(b.0));
    let mut keys: Vec<i32> = claims.iter().map(|c| device_cap_lock_key(c.1)).collect();
    keys.sort_unstable();
    keys.dedup();
    sqlx::query(
        "SELECT pg_advisory_xact_lock($1, t.k)
         FROM unnest($2::INT4[]) WITH ORDINALITY AS t(k, n) ORDER BY t.n",
    )
    .bind(DEVICE_CAP_LOCK_CLASS)
    .bind(&keys)
    .execute(&mut *conn)
    .await?;

    let ids: Vec<&str> = claims.iter().map(|c| c.0).collect();
    let existing: HashSet<String> = sqlx::query_scalar("SELECT id FROM devices WHERE id = ANY($1)")
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
    let mut new_users: Vec<&str> = claims
        .iter()
        .filter(|c| !existing.contains(c.0))
        .map(|c| c.1)
        .collect();
    new_users.sort_unstable();
    new_users.dedup();
    let mut owned: HashMap<String, u64> = HashMap::new();
    if !new_users.is_empty() {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT user_id, COUNT(*) FROM devices WHERE user_id = ANY($1) GROUP BY user_id",
        )
        .bind(&new_users)
        .fetch_all(&mut *conn)
        .await?;
        owned = rows.into_iter().map(|(u, n)| (u, n as u64)).collect();
    }
    let mut inserts: Vec<(&str, &str, i64)> = Vec::new();
    for &(id, user, now, max) in &claims {
        // Claims are in id order, so an earlier claim of this id is the last insert.
        if existing.contains(id) || inserts.last().is_some_and(|c| c.0 == id) {
            continue;
        }
        let n = owned.entry(user.to_owned()).or_default();
        if *n >= max {
            capped.insert((id, user), (*n, max));
        } else {
            *n += 1;
            inserts.push((id, user, now));
        }
    }
    if !inserts.is_empty() {
        let ids: Vec<&str> = inserts.iter().map(|c| c.0).collect();
        let users: Vec<&str> = inserts.iter().map(|c| c.1).collect();
        let nows: Vec<i64> = inserts.iter().map(|c| c.2).collect();
        sqlx::query(
            "INSERT INTO devices (id, user_id, created_at, last_seen)
             SELECT t.id, t.u, t.c, t.c FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[])
                  WITH ORDINALITY AS t(id, u, c, n)
             ORDER BY t.n
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&ids)
        .bind(&users)
        .bind(&nows)
        .execute(&mut *conn)
        .await?;
    }
    let rows = sqlx::query(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ANY($1)"
    ))
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    for row in &rows {
        let d = device_from_row(row);
        claimed.insert(d.id.clone(), d);
    }
    Ok((claimed, capped))
}

/// SQL of a new webhook event id: `evt_` + 32 random hex digits.
pub(super) const EVENT_ID_SQL: &str = "'evt_' || replace(gen_random_uuid()::text, '-', '')";

/// Queues a `kind` event for every entry in the ranges `(device, lo..=hi)` that
/// matches `cond` (on `deliveries d`); an entry in two ranges gets one event.
async fn queue_range_events(
    conn: &mut PgConnection,
    kind: EventType,
    cond: &str,
    (dev, lo, hi, now): (&[&str], &[i64], &[i64], &[i64]),
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO webhook_events (event_id, type, message_id, device_id, user_id, seq, at, queued_at, next_attempt_at)
         SELECT {EVENT_ID_SQL}, $5, e.message_id, e.device_id, e.user_id, e.seq, e.at, e.at, e.at FROM (
             SELECT d.message_id, d.device_id, v.user_id, d.seq, min(r.now) AS at
             FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[]) AS r(device_id, lo, hi, now)
             JOIN deliveries d ON d.device_id = r.device_id AND d.seq >= r.lo AND d.seq <= r.hi AND {cond}
             JOIN devices v ON v.id = d.device_id
             GROUP BY d.message_id, d.device_id, v.user_id, d.seq
             ORDER BY d.device_id, d.seq) e"
    ))
    .bind(dev)
    .bind(lo)
    .bind(hi)
    .bind(now)
    .bind(kind.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(())
}
