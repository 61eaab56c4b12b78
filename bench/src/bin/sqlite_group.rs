//! The SQLite store's group commit, measured two ways on the real schema (#12, item 1):
//!
//! - `per-row`: what `store/sqlite_hot.rs` does — one writer thread, cached prepared
//!   statements, each publish/mark-sent/ack its own statements (8 per message);
//! - `set-based`: the same writes as a handful of multi-row statements per group
//!   (`INSERT … VALUES (…),(…)`, `UPDATE … FROM (VALUES …) RETURNING`).
//!
//! and the inbox table in two layouts (`--layout`, see there).
//!
//! Each group holds `--group` device-targeted publishes, the sent marks of the
//! previous group's entries and their acks, committed in one `BEGIN IMMEDIATE`
//! transaction with WAL and `synchronous=FULL`, exactly like the gateway. Both
//! variants must leave the same rows behind; the run checks that before it reports.
//!
//! ```sh
//! cargo run --release -p herald-bench --bin sqlite_group -- --messages 100000 --group 256
//! ```
//! Prints one JSON line per variant and round: wall and thread-CPU µs per message
//! (publish + sent mark + ack), statements per group, and the commit (fsync) share.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::{Parser, ValueEnum};
use rusqlite::{params, params_from_iter, Connection, TransactionBehavior};

#[derive(Parser)]
struct Args {
    /// Messages published in all (each one: publish, sent mark, ack).
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Publishes per group (the gateway's writer takes up to 256 writes per group).
    #[arg(long, default_value_t = 256)]
    group: usize,
    /// Registered devices; message i goes to device i mod devices.
    #[arg(long, default_value_t = 1_000)]
    devices: usize,
    /// Rounds per variant, alternating variants so drift hits both alike.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, value_enum, default_value_t = Only::Both)]
    only: Only,
    /// Where the databases go (a fresh file per run; removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The inbox table's layout: `rowid` is the schema's (migration 0006): rows in
    /// insertion order with a unique index on (device_id, seq), so the sent marks and
    /// acks of one group touch the pages the previous group appended to; `clustered`
    /// is the layout before it, a `WITHOUT ROWID` table keyed by (device_id, seq),
    /// where a group dirties a page per device.
    #[arg(long, value_enum, default_value_t = Layout::Rowid)]
    layout: Layout,
    /// Turn off WAL checkpoints and report the WAL bytes written per message (the
    /// page images each commit appends); timings of such a run are not comparable.
    #[arg(long)]
    wal_volume: bool,
    /// The writer connection's page cache in MiB (`PRAGMA cache_size`; SQLite's
    /// default is 2 MiB). 0 keeps SQLite's default.
    #[arg(long, default_value_t = 0)]
    cache_mib: i64,
}

#[derive(Clone, Copy, PartialEq, ValueEnum, Debug)]
enum Layout {
    Clustered,
    Rowid,
}

/// The `clustered` layout, the schema's before migration 0006: same columns and
/// indexes, rows kept in (device_id, seq) order.
const CLUSTERED_DELIVERIES: &str = "
    DROP TABLE deliveries;
    CREATE TABLE deliveries (
        device_id     TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
        seq           INTEGER NOT NULL,
        message_id    TEXT NOT NULL,
        expires_at    INTEGER NOT NULL,
        sent_at       INTEGER,
        acked_at      INTEGER,
        push_state    TEXT,
        push_due_at   INTEGER,
        push_attempts INTEGER NOT NULL DEFAULT 0,
        push_at       INTEGER,
        push_provider TEXT,
        reason        TEXT,
        push_always   INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (device_id, seq)
    ) WITHOUT ROWID;
    CREATE INDEX deliveries_by_message ON deliveries (message_id);
    CREATE INDEX deliveries_by_expiry ON deliveries (expires_at);
    CREATE INDEX deliveries_push_due ON deliveries (push_due_at) WHERE push_state IN ('pending', 'sending');
";

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Only {
    Both,
    PerRow,
    SetBased,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Variant {
    PerRow,
    SetBased,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::PerRow => "per-row",
            Variant::SetBased => "set-based",
        }
    }
}

/// One publish of the workload, as the writer receives it.
struct Publish {
    id: String,
    device: String,
    payload: &'static str,
    created_at: i64,
    expires_at: i64,
}

/// An entry to mark sent and ack in the next group.
#[derive(Clone)]
struct Entry {
    device: String,
    seq: i64,
}

const PAYLOAD: &str = r#"{"data":{"n":"0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567"}}"#;
const TTL_MS: i64 = 86_400_000;

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.group >= 1 && args.messages >= 1 && args.devices >= 1);
    ensure!(
        args.messages <= 10_000_000,
        "--messages: at most 10,000,000"
    );
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let variants: Vec<Variant> = match args.only {
        Only::Both => vec![Variant::PerRow, Variant::SetBased],
        Only::PerRow => vec![Variant::PerRow],
        Only::SetBased => vec![Variant::SetBased],
    };
    let mut checksums: HashMap<&str, String> = HashMap::new();
    for round in 1..=args.rounds {
        for &v in &variants {
            let path = dir.join(format!(
                "herald-sqlite-group-{}-{}.db",
                std::process::id(),
                v.name()
            ));
            let (report, checksum) = run(&args, v, &path)?;
            remove_db(&path);
            println!("{{\"round\":{round},{report}}}");
            if let Some(prev) = checksums.insert(v.name(), checksum.clone()) {
                ensure!(prev == checksum, "{}: rows differ between rounds", v.name());
            }
        }
    }
    if variants.len() == 2 {
        ensure!(
            checksums["per-row"] == checksums["set-based"],
            "the two variants left different rows behind: {} vs {}",
            checksums["per-row"],
            checksums["set-based"]
        );
        eprintln!("both variants left the same rows behind");
    }
    Ok(())
}

fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

fn open(path: &Path, layout: Layout, wal_volume: bool, cache_mib: i64) -> Result<Connection> {
    remove_db(path);
    let conn = Connection::open(path).with_context(|| format!("open {}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.set_prepared_statement_cache_capacity(64);
    if cache_mib > 0 {
        conn.pragma_update(None, "cache_size", -cache_mib * 1024)?;
    }
    for (_, sql) in herald_gateway::store::migrations::SQLITE {
        conn.execute_batch(sql)?;
    }
    if layout == Layout::Clustered {
        conn.execute_batch(CLUSTERED_DELIVERIES)?;
    }
    if wal_volume {
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
    }
    Ok(conn)
}

fn run(args: &Args, variant: Variant, path: &Path) -> Result<(String, String)> {
    let mut conn = open(path, args.layout, args.wal_volume, args.cache_mib)?;
    {
        let tx = conn.transaction()?;
        let mut add = tx.prepare(
            "INSERT INTO devices (id, user_id, created_at, last_seen) VALUES (?1, ?2, 0, 0)",
        )?;
        for d in 0..args.devices {
            add.execute(params![device_id(d), format!("user-{}", d % 100)])?;
        }
        drop(add);
        tx.commit()?;
    }
    let progress_every = (args.messages / 10).max(1);
    let mut to_ack: Vec<Entry> = Vec::new();
    let mut statements = 0usize;
    let mut groups = 0usize;
    let mut commit_time = Duration::ZERO;
    let cpu0 = thread_cpu();
    let t0 = Instant::now();
    let mut next = 0usize;
    let now = 1_800_000_000_000i64;
    while next < args.messages || !to_ack.is_empty() {
        let n = args.group.min(args.messages - next);
        let publishes: Vec<Publish> = (next..next + n)
            .map(|i| Publish {
                id: format!("msg_{i:012}"),
                device: device_id(i % args.devices),
                payload: PAYLOAD,
                created_at: now,
                expires_at: now + TTL_MS,
            })
            .collect();
        next += n;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (entries, stmts) = match variant {
            Variant::PerRow => per_row::group(&tx, &publishes, &to_ack, now)?,
            Variant::SetBased => set_based::group(&tx, &publishes, &to_ack, now)?,
        };
        let c = Instant::now();
        tx.commit()?;
        commit_time += c.elapsed();
        statements += stmts;
        groups += 1;
        ensure!(entries.len() == n, "every publish yields one entry");
        to_ack = entries;
        if next % progress_every < n && n > 0 {
            eprintln!("  {} {}/{}", variant.name(), next, args.messages);
        }
    }
    let wall = t0.elapsed();
    let cpu = thread_cpu() - cpu0;
    let m = args.messages as f64;
    let wal_kib_per_msg = if args.wal_volume {
        let wal = std::fs::metadata(format!("{}-wal", path.display()))?.len();
        format!("{:.2}", wal as f64 / 1024.0 / m)
    } else {
        "null".into()
    };
    let report = format!(
        "\"variant\":\"{}\",\"layout\":\"{:?}\",\"cache_mib\":{},\"wal_kib_per_msg\":{wal_kib_per_msg},\"messages\":{},\"group\":{},\"devices\":{},\"groups\":{},\"wall_us_per_msg\":{:.2},\"cpu_us_per_msg\":{:.2},\"msgs_per_s\":{:.0},\"statements_per_group\":{:.1},\"commit_share\":{:.2}",
        variant.name(),
        args.layout,
        args.cache_mib,
        args.messages,
        args.group,
        args.devices,
        groups,
        wall.as_secs_f64() * 1e6 / m,
        cpu.as_secs_f64() * 1e6 / m,
        m / wall.as_secs_f64(),
        statements as f64 / groups as f64,
        commit_time.as_secs_f64() / wall.as_secs_f64(),
    );
    Ok((report, checksum(&conn)?))
}

fn device_id(d: usize) -> String {
    format!("device-{d:05}")
}

/// What both variants must agree on: every inbox row and every device's counters.
fn checksum(conn: &Connection) -> Result<String> {
    let (rows, seqs, sent, acked, pending): (i64, i64, i64, i64, i64) = conn.query_row(
        "SELECT count(*), sum(seq), count(sent_at), count(acked_at), count(push_state) FROM deliveries",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    )?;
    let (last, acked_seq): (i64, i64) = conn.query_row(
        "SELECT sum(last_seq), sum(acked_seq) FROM devices",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let messages: i64 = conn.query_row("SELECT count(*) FROM messages", [], |r| r.get(0))?;
    Ok(format!(
        "messages={messages} rows={rows} seqs={seqs} sent={sent} acked={acked} pending={pending} last={last} acked_seq={acked_seq}"
    ))
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_THREAD_CPUTIME_ID exists on every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The statements of `store/sqlite_hot.rs` (`publish_one` for a device target without
/// an idempotency key, the `MarkSent` update, `ack_one`), webhook events off.
mod per_row {
    use super::*;

    pub fn group(
        tx: &Connection,
        publishes: &[Publish],
        to_ack: &[Entry],
        now: i64,
    ) -> Result<(Vec<Entry>, usize)> {
        let mut stmts = 0;
        let mut entries = Vec::with_capacity(publishes.len());
        for p in publishes {
            let found: String = tx
                .prepare_cached("SELECT id FROM devices WHERE id = ?1")?
                .query_row(params![p.device], |r| r.get(0))?;
            tx.prepare_cached(
                "INSERT INTO messages (id, api_key_id, target_kind, target, payload, recipients, created_at, expires_at, idempotency_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![p.id, "key", "device", p.device, p.payload, 1, p.created_at, p.expires_at, None::<String>])?;
            let seq: i64 = tx
                .prepare_cached(
                    "UPDATE devices SET last_seq = last_seq + 1 WHERE id = ?1 RETURNING last_seq",
                )?
                .query_row(params![found], |r| r.get(0))?;
            tx.prepare_cached(
                "INSERT INTO deliveries (device_id, seq, message_id, expires_at, push_state, push_due_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![found, seq, p.id, p.expires_at, "pending", now + 30_000])?;
            stmts += 4;
            entries.push(Entry { device: found, seq });
        }
        for e in to_ack {
            tx.prepare_cached(
                "UPDATE deliveries SET sent_at = ?1 WHERE device_id = ?2 AND seq >= ?3 AND seq <= ?4 AND sent_at IS NULL",
            )?
            .execute(params![now, e.device, e.seq, e.seq])?;
            stmts += 1;
        }
        for e in to_ack {
            let (acked, last): (i64, i64) = tx
                .prepare_cached("SELECT acked_seq, last_seq FROM devices WHERE id = ?1")?
                .query_row(params![e.device], |r| Ok((r.get(0)?, r.get(1)?)))?;
            stmts += 1;
            let target = e.seq.min(last);
            if target > acked {
                tx.prepare_cached(
                    "UPDATE deliveries SET acked_at = ?1,
                            push_state = CASE WHEN push_state = 'pending' AND NOT push_always THEN NULL ELSE push_state END,
                            push_due_at = CASE WHEN push_state = 'pending' AND NOT push_always THEN NULL ELSE push_due_at END
                     WHERE device_id = ?2 AND seq > ?3 AND seq <= ?4 AND acked_at IS NULL",
                )?
                .execute(params![now, e.device, acked, target])?;
                tx.prepare_cached(
                    "UPDATE devices SET acked_seq = ?1, last_seen = ?2 WHERE id = ?3",
                )?
                .execute(params![target, now, e.device])?;
                stmts += 2;
            }
        }
        Ok((entries, stmts))
    }
}

/// The same writes as multi-row statements: per group, one statement (or one per
/// chunk of up to `CHUNK` rows) for each of: device lookup, message insert, seq
/// update, inbox insert, sent marks, ack bounds, inbox acks, device acks.
mod set_based {
    use super::*;
    use rusqlite::types::Value;

    /// Rows per multi-row statement; groups are split into power-of-two chunks so a
    /// handful of cached statements serve every group size.
    const CHUNK: usize = 128;

    /// Splits `n` rows into chunk sizes from the cached set (128, 64, …, 1).
    fn chunks(mut n: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut size = CHUNK;
        while n > 0 {
            while size > n {
                size /= 2;
            }
            out.push(size);
            n -= size;
        }
        out
    }

    fn values(rows: usize, cols: usize) -> String {
        let row = format!("({})", vec!["?"; cols].join(","));
        vec![row; rows].join(",")
    }

    /// Runs `sql(values_clause)` over `rows` (each `cols` values) in cached chunks,
    /// collecting what each row of the result maps to.
    fn each_chunk<T>(
        tx: &Connection,
        rows: &[Vec<Value>],
        cols: usize,
        sql: impl Fn(&str) -> String,
        mut map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
        stmts: &mut usize,
    ) -> Result<Vec<T>> {
        let mut out = Vec::new();
        let mut at = 0;
        for size in chunks(rows.len()) {
            let mut stmt = tx.prepare_cached(&sql(&values(size, cols)))?;
            let flat = rows[at..at + size].iter().flatten();
            let mut q = stmt.query(params_from_iter(flat))?;
            while let Some(r) = q.next()? {
                out.push(map(r)?);
            }
            at += size;
            *stmts += 1;
        }
        Ok(out)
    }

    pub fn group(
        tx: &Connection,
        publishes: &[Publish],
        to_ack: &[Entry],
        now: i64,
    ) -> Result<(Vec<Entry>, usize)> {
        let mut stmts = 0;
        // How many entries each device gets in this group, in first-seen order.
        let mut per_device: Vec<(String, i64)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for p in publishes {
            let i = *index.entry(p.device.as_str()).or_insert_with(|| {
                per_device.push((p.device.clone(), 0));
                per_device.len() - 1
            });
            per_device[i].1 += 1;
        }
        let ids: Vec<Vec<Value>> = per_device
            .iter()
            .map(|(d, _)| vec![Value::Text(d.clone())])
            .collect();
        let known = each_chunk(
            tx,
            &ids,
            1,
            |v| format!("SELECT id FROM devices WHERE id IN (VALUES {v})"),
            |r| r.get::<_, String>(0),
            &mut stmts,
        )?;
        ensure!(known.len() == per_device.len(), "unknown device in group");

        let messages: Vec<Vec<Value>> = publishes
            .iter()
            .map(|p| {
                vec![
                    Value::Text(p.id.clone()),
                    Value::Text("key".into()),
                    Value::Text("device".into()),
                    Value::Text(p.device.clone()),
                    Value::Text(p.payload.into()),
                    Value::Integer(1),
                    Value::Integer(p.created_at),
                    Value::Integer(p.expires_at),
                    Value::Null,
                ]
            })
            .collect();
        each_chunk(
            tx,
            &messages,
            9,
            |v| {
                format!("INSERT INTO messages (id, api_key_id, target_kind, target, payload, recipients, created_at, expires_at, idempotency_key) VALUES {v}")
            },
            |_| Ok(()),
            &mut stmts,
        )?;

        let bumps: Vec<Vec<Value>> = per_device
            .iter()
            .map(|(d, n)| vec![Value::Text(d.clone()), Value::Integer(*n)])
            .collect();
        let last: HashMap<String, i64> = each_chunk(
            tx,
            &bumps,
            2,
            |v| format!("UPDATE devices SET last_seq = last_seq + b.column2 FROM (VALUES {v}) AS b WHERE devices.id = b.column1 RETURNING devices.id, devices.last_seq"),
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
            &mut stmts,
        )?
        .into_iter()
        .collect();
        // Seqs in publish order: a device's first entry of the group gets last - n + 1.
        let mut next_seq: HashMap<&str, i64> = per_device
            .iter()
            .map(|(d, n)| (d.as_str(), last[d] - n + 1))
            .collect();
        let mut entries = Vec::with_capacity(publishes.len());
        let mut rows = Vec::with_capacity(publishes.len());
        for p in publishes {
            let seq = next_seq.get_mut(p.device.as_str()).expect("counted");
            rows.push(vec![
                Value::Text(p.device.clone()),
                Value::Integer(*seq),
                Value::Text(p.id.clone()),
                Value::Integer(p.expires_at),
                Value::Text("pending".into()),
                Value::Integer(now + 30_000),
            ]);
            entries.push(Entry {
                device: p.device.clone(),
                seq: *seq,
            });
            *seq += 1;
        }
        each_chunk(
            tx,
            &rows,
            6,
            |v| {
                format!("INSERT INTO deliveries (device_id, seq, message_id, expires_at, push_state, push_due_at) VALUES {v}")
            },
            |_| Ok(()),
            &mut stmts,
        )?;

        if !to_ack.is_empty() {
            let ranges: Vec<Vec<Value>> = to_ack
                .iter()
                .map(|e| {
                    vec![
                        Value::Text(e.device.clone()),
                        Value::Integer(e.seq),
                        Value::Integer(e.seq),
                    ]
                })
                .collect();
            let with_now = |sql: String| sql.replace("?NOW", &now.to_string());
            each_chunk(
                tx,
                &ranges,
                3,
                |v| {
                    with_now(format!("UPDATE deliveries SET sent_at = ?NOW FROM (VALUES {v}) AS r WHERE deliveries.device_id = r.column1 AND deliveries.seq >= r.column2 AND deliveries.seq <= r.column3 AND deliveries.sent_at IS NULL"))
                },
                |_| Ok(()),
                &mut stmts,
            )?;
            // A device acked twice in one group keeps its highest ack.
            let mut acks: Vec<(String, i64)> = Vec::new();
            let mut at: HashMap<&str, usize> = HashMap::new();
            for e in to_ack {
                match at.get(e.device.as_str()) {
                    Some(&i) => acks[i].1 = acks[i].1.max(e.seq),
                    None => {
                        at.insert(e.device.as_str(), acks.len());
                        acks.push((e.device.clone(), e.seq));
                    }
                }
            }
            let acks: Vec<Vec<Value>> = acks
                .into_iter()
                .map(|(d, s)| vec![Value::Text(d), Value::Integer(s)])
                .collect();
            // Inbox rows first (they need the old acked_seq), then the devices.
            each_chunk(
                tx,
                &acks,
                2,
                |v| {
                    with_now(format!(
                    "UPDATE deliveries SET acked_at = ?NOW,
                            push_state = CASE WHEN push_state = 'pending' AND NOT push_always THEN NULL ELSE push_state END,
                            push_due_at = CASE WHEN push_state = 'pending' AND NOT push_always THEN NULL ELSE push_due_at END
                     FROM (VALUES {v}) AS a JOIN devices v ON v.id = a.column1
                     WHERE deliveries.device_id = a.column1 AND deliveries.seq > v.acked_seq
                       AND deliveries.seq <= min(a.column2, v.last_seq) AND deliveries.acked_at IS NULL"
                ))
                },
                |_| Ok(()),
                &mut stmts,
            )?;
            each_chunk(
                tx,
                &acks,
                2,
                |v| {
                    with_now(format!(
                    "UPDATE devices SET acked_seq = min(a.column2, devices.last_seq), last_seen = ?NOW
                     FROM (VALUES {v}) AS a
                     WHERE devices.id = a.column1 AND min(a.column2, devices.last_seq) > devices.acked_seq"
                ))
                },
                |_| Ok(()),
                &mut stmts,
            )?;
        }
        Ok((entries, stmts))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn chunks_cover_every_size() {
            for n in 0..600 {
                let c = super::chunks(n);
                assert_eq!(c.iter().sum::<usize>(), n);
                assert!(c.iter().all(|s| s.is_power_of_two() && *s <= super::CHUNK));
            }
        }
    }
}
