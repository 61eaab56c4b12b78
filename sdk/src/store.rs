//! Local persistence (SQLite, one small file in the app's data directory): the
//! cursor (highest seq of the ordered stream the app has handled), the ids of
//! messages handled out of order (pushes) or recently, the messages being handed to
//! a listener right now (claims), the topics the app wants, and a generated device id.
//!
//! Everything but the device id is keyed by a scope (`base_url|device_id`): seqs are
//! per device and per gateway, so switching either starts from a fresh cursor.
//!
//! Two processes may share the file (an app and its notification service extension /
//! FCM service). So every decision is taken inside a write transaction (`BEGIN
//! IMMEDIATE`) that first reads what the other process may have written: the cursor
//! only moves up (max-merge), and a message is handed out only if nobody handled it.
//! The in-memory cursor is a cache of what this process last read or wrote.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::Error;

/// File created in the app's data directory.
pub const FILE_NAME: &str = "herald-sdk.sqlite3";
/// How many handled ids are kept below the cursor (for de-dup by id).
const RECENT_IDS: i64 = 512;
/// Pruning runs once per this many writes, not on every message.
const PRUNE_EVERY: u32 = 256;
/// A claim younger than this, by another process, keeps a push from handing the
/// same message out (the app is showing it right now). Longer than an iOS
/// extension's ~30 s budget; a claim of a process that died is overridden by the
/// ordered stream at once and by pushes after this.
const CLAIM_LEASE_MS: i64 = 60_000;
/// How long a write waits for the other process's transaction.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Store {
    conn: Connection,
    scope: String,
    cursor: i64,
    /// Tells this process's claims from another's.
    owner: String,
    writes: u32,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn open_conn(dir: &Path) -> Result<Connection, Error> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Storage(format!("cannot create {}: {e}", dir.display())))?;
    let conn = Connection::open(dir.join(FILE_NAME))?;
    prepare(&conn)?;
    Ok(conn)
}

fn prepare(conn: &Connection) -> Result<(), Error> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL + NORMAL: a commit survives the process being killed (not necessarily a
    // power cut) and costs a write(2), no fsync: cheap enough to commit per message.
    let _: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    conn.execute_batch(
        "PRAGMA synchronous=NORMAL;
         CREATE TABLE IF NOT EXISTS cursor (
             scope TEXT PRIMARY KEY NOT NULL,
             seq INTEGER NOT NULL
         );
         CREATE TABLE IF NOT EXISTS handled (
             scope TEXT NOT NULL,
             seq INTEGER NOT NULL,
             id TEXT NOT NULL,
             PRIMARY KEY (scope, seq)
         );
         CREATE INDEX IF NOT EXISTS handled_id ON handled (scope, id);
         CREATE TABLE IF NOT EXISTS claims (
             scope TEXT NOT NULL,
             seq INTEGER NOT NULL,
             id TEXT NOT NULL,
             owner TEXT NOT NULL,
             at_ms INTEGER NOT NULL,
             PRIMARY KEY (scope, seq)
         );
         CREATE TABLE IF NOT EXISTS topics (
             scope TEXT NOT NULL,
             topic TEXT NOT NULL,
             wanted INTEGER NOT NULL,
             PRIMARY KEY (scope, topic)
         );
         CREATE TABLE IF NOT EXISTS meta (
             key TEXT PRIMARY KEY NOT NULL,
             value TEXT NOT NULL
         );",
    )?;
    Ok(())
}

fn new_uuid_v4() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The device id generated for this data directory, created (UUID v4) on first use.
/// Both processes sharing the directory get the same one.
pub fn generated_device_id(dir: &Path) -> Result<String, Error> {
    let mut conn = open_conn(dir)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let existing: Option<String> = tx
        .query_row("SELECT value FROM meta WHERE key = 'device_id'", [], |r| {
            r.get(0)
        })
        .optional()?;
    let id = match existing {
        Some(id) => id,
        None => {
            let id = new_uuid_v4();
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('device_id', ?1)",
                params![id],
            )?;
            id
        }
    };
    tx.commit()?;
    Ok(id)
}

impl Store {
    pub fn open(dir: &Path, scope: &str) -> Result<Store, Error> {
        Self::init(open_conn(dir)?, scope)
    }

    pub fn open_in_memory(scope: &str) -> Result<Store, Error> {
        let conn = Connection::open_in_memory()?;
        prepare(&conn)?;
        Self::init(conn, scope)
    }

    fn init(conn: Connection, scope: &str) -> Result<Store, Error> {
        let mut s = Store {
            conn,
            scope: scope.to_string(),
            cursor: 0,
            owner: new_uuid_v4(),
            writes: 0,
        };
        s.refresh()?;
        Ok(s)
    }

    /// Everything up to and including this seq was handled (as last read or written
    /// by this process; see [`refresh`](Self::refresh)).
    pub fn cursor(&self) -> i64 {
        self.cursor
    }

    fn read_cursor(conn: &Connection, scope: &str) -> Result<i64, Error> {
        Ok(conn
            .query_row(
                "SELECT seq FROM cursor WHERE scope = ?1",
                params![scope],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0))
    }

    /// Re-reads the cursor (another process may have moved it).
    pub fn refresh(&mut self) -> Result<i64, Error> {
        self.cursor = Self::read_cursor(&self.conn, &self.scope)?;
        Ok(self.cursor)
    }

    /// True when the message was handled before, by this process or another (at or
    /// below the cursor, or handled out of order through a push).
    pub fn is_handled(&self, seq: i64, id: &str) -> Result<bool, Error> {
        if seq <= self.cursor {
            return Ok(true);
        }
        let found: bool = self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM cursor WHERE scope = ?1 AND seq >= ?2)
                 OR EXISTS (SELECT 1 FROM handled WHERE scope = ?1 AND (seq = ?2 OR id = ?3))",
            params![self.scope, seq, id],
            |r| r.get(0),
        )?;
        Ok(found)
    }

    /// Called right before a message of the ordered stream goes to the listener.
    /// False when it was handled already (by another process); otherwise it is
    /// claimed, so a push handled meanwhile in the other process does not hand it
    /// out too. A claim never hides a message from the ordered stream: if this
    /// process dies in the listener, the next start delivers it again.
    pub fn begin_delivery(&mut self, seq: i64, id: &str) -> Result<bool, Error> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let cursor = Self::read_cursor(&tx, &self.scope)?;
        let done: bool = seq <= cursor
            || tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM handled WHERE scope = ?1 AND (seq = ?2 OR id = ?3))",
                params![self.scope, seq, id],
                |r| r.get(0),
            )?;
        if !done {
            tx.execute(
                "INSERT OR REPLACE INTO claims (scope, seq, id, owner, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![self.scope, seq, id, self.owner, now_ms()],
            )?;
        }
        tx.commit()?;
        self.cursor = cursor;
        Ok(!done)
    }

    /// The listener returned for a message of the ordered stream: in one transaction,
    /// drop its claim and move the cursor up to `new_cursor` (max-merged with what
    /// another process wrote). The message is remembered by id only when the cursor
    /// does not cover it.
    pub fn finish_delivery(&mut self, seq: i64, id: &str, new_cursor: i64) -> Result<(), Error> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "DELETE FROM claims WHERE scope = ?1 AND seq = ?2",
            params![self.scope, seq],
        )?;
        let cursor = Self::merge_cursor(&tx, &self.scope, new_cursor)?;
        if seq > cursor {
            tx.execute(
                "INSERT OR IGNORE INTO handled (scope, seq, id) VALUES (?1, ?2, ?3)",
                params![self.scope, seq, id],
            )?;
        }
        Self::maybe_prune(&mut self.writes, &self.scope, &tx, cursor)?;
        tx.commit()?;
        self.cursor = cursor;
        Ok(())
    }

    /// Writes `max(stored, new_cursor)`; returns it.
    fn merge_cursor(tx: &Connection, scope: &str, new_cursor: i64) -> Result<i64, Error> {
        let cursor: i64 = tx.query_row(
            "INSERT INTO cursor (scope, seq) VALUES (?1, ?2)
             ON CONFLICT (scope) DO UPDATE SET seq = MAX(seq, excluded.seq)
             RETURNING seq",
            params![scope, new_cursor],
            |r| r.get(0),
        )?;
        Ok(cursor)
    }

    fn maybe_prune(
        writes: &mut u32,
        scope: &str,
        tx: &Connection,
        cursor: i64,
    ) -> Result<(), Error> {
        *writes += 1;
        if !(*writes).is_multiple_of(PRUNE_EVERY) {
            return Ok(());
        }
        tx.execute(
            "DELETE FROM handled WHERE scope = ?1 AND seq <= ?2 AND seq < (
                 SELECT seq FROM handled WHERE scope = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?3)",
            params![scope, cursor, RECENT_IDS],
        )?;
        tx.execute(
            "DELETE FROM claims WHERE scope = ?1 AND (seq <= ?2 OR at_ms < ?3)",
            params![scope, cursor, now_ms() - 10 * CLAIM_LEASE_MS],
        )?;
        Ok(())
    }

    /// Records that the app handled `(seq, id)` and moves the cursor up to
    /// `new_cursor` (never down), in one transaction.
    pub fn record_handled(&mut self, seq: i64, id: &str, new_cursor: i64) -> Result<(), Error> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT OR IGNORE INTO handled (scope, seq, id) VALUES (?1, ?2, ?3)",
            params![self.scope, seq, id],
        )?;
        let cursor = Self::merge_cursor(&tx, &self.scope, new_cursor)?;
        Self::maybe_prune(&mut self.writes, &self.scope, &tx, cursor)?;
        tx.commit()?;
        self.cursor = cursor;
        Ok(())
    }

    /// For a message a push brings: true (and recorded as handled) when nobody
    /// handled it and no other live process is handing it out; false otherwise.
    pub fn claim_for_push(&mut self, seq: i64, id: &str) -> Result<bool, Error> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let cursor = Self::read_cursor(&tx, &self.scope)?;
        let taken: bool = seq <= cursor
            || tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM handled WHERE scope = ?1 AND (seq = ?2 OR id = ?3))
                     OR EXISTS (SELECT 1 FROM claims WHERE scope = ?1 AND seq = ?2
                                AND owner <> ?4 AND at_ms > ?5)",
                params![self.scope, seq, id, self.owner, now_ms() - CLAIM_LEASE_MS],
                |r| r.get(0),
            )?;
        if !taken {
            tx.execute(
                "INSERT OR IGNORE INTO handled (scope, seq, id) VALUES (?1, ?2, ?3)",
                params![self.scope, seq, id],
            )?;
        }
        tx.commit()?;
        self.cursor = cursor;
        Ok(!taken)
    }

    /// Undoes [`claim_for_push`](Self::claim_for_push) (the caller went away before
    /// it got the message).
    pub fn unclaim(&mut self, seq: i64) -> Result<(), Error> {
        self.conn.execute(
            "DELETE FROM handled WHERE scope = ?1 AND seq = ?2",
            params![self.scope, seq],
        )?;
        Ok(())
    }

    /// Moves the cursor up without a message (e.g. the ordered stream passed a seq the
    /// app already got through a push).
    pub fn advance(&mut self, new_cursor: i64) -> Result<(), Error> {
        if new_cursor <= self.cursor {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let cursor = Self::merge_cursor(&tx, &self.scope, new_cursor)?;
        tx.commit()?;
        self.cursor = cursor;
        Ok(())
    }

    /// The gateway's inbox is behind our cursor (device deleted and re-created, data
    /// restored from an older backup): start over from its `last_seq`.
    pub fn reset(&mut self, cursor: i64) -> Result<(), Error> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM handled WHERE scope = ?1", params![self.scope])?;
        tx.execute("DELETE FROM claims WHERE scope = ?1", params![self.scope])?;
        tx.execute(
            "INSERT INTO cursor (scope, seq) VALUES (?1, ?2)
             ON CONFLICT (scope) DO UPDATE SET seq = excluded.seq",
            params![self.scope, cursor],
        )?;
        tx.commit()?;
        self.cursor = cursor;
        Ok(())
    }

    /// Forgets everything of this scope (logout): cursor, handled ids, claims,
    /// topics; and `device_id` if it was the generated one, since a device id belongs
    /// to the first user that used it (the next user needs a new one).
    pub fn clear(&mut self, device_id: &str) -> Result<(), Error> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for table in ["cursor", "handled", "claims", "topics"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE scope = ?1"),
                params![self.scope],
            )?;
        }
        tx.execute(
            "DELETE FROM meta WHERE key = 'device_id' AND value = ?1",
            params![device_id],
        )?;
        tx.commit()?;
        self.cursor = 0;
        Ok(())
    }

    /// Topics the app asked for: `(topic, true)` to subscribe, `(topic, false)` for
    /// an unsubscribe the gateway has not confirmed yet.
    pub fn topics(&self) -> Result<Vec<(String, bool)>, Error> {
        let mut stmt = self
            .conn
            .prepare("SELECT topic, wanted FROM topics WHERE scope = ?1 ORDER BY topic")?;
        let rows = stmt
            .query_map(params![self.scope], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// The app subscribed (`true`) or unsubscribed (`false`).
    pub fn set_topic(&mut self, topic: &str, wanted: bool) -> Result<(), Error> {
        self.conn.execute(
            "INSERT INTO topics (scope, topic, wanted) VALUES (?1, ?2, ?3)
             ON CONFLICT (scope, topic) DO UPDATE SET wanted = excluded.wanted",
            params![self.scope, topic, wanted],
        )?;
        Ok(())
    }

    /// Forgets a topic (its unsubscribe was confirmed, or the gateway refused it).
    /// `only_if`: forget it only while it is still in that state.
    pub fn forget_topic(&mut self, topic: &str, only_if: Option<bool>) -> Result<(), Error> {
        match only_if {
            Some(wanted) => self.conn.execute(
                "DELETE FROM topics WHERE scope = ?1 AND topic = ?2 AND wanted = ?3",
                params![self.scope, topic, wanted],
            )?,
            None => self.conn.execute(
                "DELETE FROM topics WHERE scope = ?1 AND topic = ?2",
                params![self.scope, topic],
            )?,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "herald-store-{name}-{}-{}",
            std::process::id(),
            new_uuid_v4()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn cursor_and_handled_ids_survive_reopen() {
        let dir = temp_dir("reopen");
        {
            let mut s = Store::open(&dir, "a").unwrap();
            assert_eq!(s.cursor(), 0);
            s.record_handled(1, "m1", 1).unwrap();
            // seq 3 handled out of order (push), cursor stays at 1.
            s.record_handled(3, "m3", 1).unwrap();
            assert_eq!(s.cursor(), 1);
        }
        let mut s = Store::open(&dir, "a").unwrap();
        assert_eq!(s.cursor(), 1);
        assert!(s.is_handled(1, "x").unwrap());
        assert!(!s.is_handled(2, "m2").unwrap());
        assert!(s.is_handled(3, "m3").unwrap());
        assert!(s.is_handled(9, "m3").unwrap(), "de-dup by id too");
        s.advance(3).unwrap();
        assert!(s.is_handled(2, "m2").unwrap());
        // Another scope has its own cursor.
        let other = Store::open(&dir, "b").unwrap();
        assert_eq!(other.cursor(), 0);
        s.reset(0).unwrap();
        assert!(!s.is_handled(3, "m3").unwrap());
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn old_ids_are_pruned() {
        let mut s = Store::open_in_memory("a").unwrap();
        for seq in 1..=2000 {
            s.record_handled(seq, &format!("m{seq}"), seq).unwrap();
        }
        let n: i64 = s
            .conn
            .query_row("SELECT COUNT(*) FROM handled", [], |r| r.get(0))
            .unwrap();
        assert!(n <= RECENT_IDS + PRUNE_EVERY as i64, "{n}");
        assert!(s.is_handled(5, "m5").unwrap());
    }

    #[test]
    fn two_processes_never_move_the_cursor_down_nor_hand_out_twice() {
        let dir = temp_dir("two");
        let mut app = Store::open(&dir, "a").unwrap();
        let mut ext = Store::open(&dir, "a").unwrap();
        // The extension handles 1..=5 through a push; the app's cache still says 0.
        for seq in 1..=5 {
            assert!(ext.claim_for_push(seq, &format!("m{seq}")).unwrap());
        }
        ext.advance(5).unwrap();
        assert_eq!(app.cursor(), 0, "stale cache");
        // The app, with its stale cache, finishes seq 2: the cursor stays at 5.
        app.finish_delivery(2, "m2", 2).unwrap();
        assert_eq!(app.cursor(), 5);
        assert_eq!(Store::open(&dir, "a").unwrap().cursor(), 5);
        // What the extension handled is not handed out by the app.
        assert!(!app.begin_delivery(4, "m4").unwrap());
        // The app claims 6; a push for 6 in the extension yields to it...
        assert!(app.begin_delivery(6, "m6").unwrap());
        assert!(!ext.claim_for_push(6, "m6").unwrap());
        // ...while the app's own next start (a new owner) delivers it again.
        let mut restarted = Store::open(&dir, "a").unwrap();
        assert!(restarted.begin_delivery(6, "m6").unwrap());
        restarted.finish_delivery(6, "m6", 6).unwrap();
        assert!(!ext.claim_for_push(6, "m6").unwrap());
        // A push the app did not claim goes to the extension once.
        assert!(ext.claim_for_push(8, "m8").unwrap());
        assert!(!app.begin_delivery(8, "m8").unwrap());
        drop((app, ext, restarted));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn generated_device_id_is_a_stable_uuid_v4() {
        let dir = temp_dir("id");
        let a = generated_device_id(&dir).unwrap();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4", "{a}");
        assert!("89ab".contains(&a[19..20]), "{a}");
        assert_eq!(generated_device_id(&dir).unwrap(), a);
        assert_ne!(generated_device_id(&temp_dir("id2")).unwrap(), a);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn topics_persist_until_forgotten() {
        let dir = temp_dir("topics");
        {
            let mut s = Store::open(&dir, "a").unwrap();
            s.set_topic("news", true).unwrap();
            s.set_topic("sport", true).unwrap();
            s.set_topic("sport", false).unwrap();
        }
        let mut s = Store::open(&dir, "a").unwrap();
        assert_eq!(
            s.topics().unwrap(),
            [("news".to_string(), true), ("sport".to_string(), false)]
        );
        s.forget_topic("sport", Some(true)).unwrap();
        assert_eq!(s.topics().unwrap().len(), 2, "still an unsubscribe");
        s.forget_topic("sport", Some(false)).unwrap();
        s.clear("d").unwrap();
        assert!(s.topics().unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
