//! Local persistence (SQLite, one small file in the app's data directory): the
//! cursor (highest seq of the ordered stream the app has handled) and the ids of
//! recently handled messages, so neither a reconnect nor an app restart repeats or
//! loses a message.
//!
//! Everything is keyed by a scope (`base_url|device_id`): seqs are per device and per
//! gateway, so switching either starts from a fresh cursor.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use crate::Error;

/// File created in the app's data directory.
pub const FILE_NAME: &str = "herald-sdk.sqlite3";
/// How many handled ids are kept below the cursor (for de-dup by id).
const RECENT_IDS: i64 = 512;

pub struct Store {
    conn: Connection,
    scope: String,
    cursor: i64,
}

impl Store {
    pub fn open(dir: &Path, scope: &str) -> Result<Store, Error> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Storage(format!("cannot create {}: {e}", dir.display())))?;
        let conn = Connection::open(dir.join(FILE_NAME))?;
        Self::init(conn, scope)
    }

    pub fn open_in_memory(scope: &str) -> Result<Store, Error> {
        Self::init(Connection::open_in_memory()?, scope)
    }

    fn init(conn: Connection, scope: &str) -> Result<Store, Error> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL + NORMAL: a commit survives an app crash (not necessarily a power cut).
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
             CREATE INDEX IF NOT EXISTS handled_id ON handled (scope, id);",
        )?;
        let cursor = conn
            .query_row(
                "SELECT seq FROM cursor WHERE scope = ?1",
                params![scope],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        Ok(Store {
            conn,
            scope: scope.to_string(),
            cursor,
        })
    }

    /// Everything up to and including this seq was handled.
    pub fn cursor(&self) -> i64 {
        self.cursor
    }

    /// True when the message was handled before (at or below the cursor, or handled
    /// out of order through a push).
    pub fn is_handled(&self, seq: i64, id: &str) -> Result<bool, Error> {
        if seq <= self.cursor {
            return Ok(true);
        }
        let found: Option<i64> = self
            .conn
            .query_row(
                "SELECT seq FROM handled WHERE scope = ?1 AND (seq = ?2 OR id = ?3) LIMIT 1",
                params![self.scope, seq, id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(found.is_some())
    }

    /// Records that the app handled `(seq, id)` and moves the cursor up to
    /// `new_cursor` (never down), in one transaction.
    pub fn record_handled(&mut self, seq: i64, id: &str, new_cursor: i64) -> Result<(), Error> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR IGNORE INTO handled (scope, seq, id) VALUES (?1, ?2, ?3)",
            params![self.scope, seq, id],
        )?;
        let cursor = new_cursor.max(self.cursor);
        if cursor != self.cursor {
            tx.execute(
                "INSERT INTO cursor (scope, seq) VALUES (?1, ?2)
                 ON CONFLICT (scope) DO UPDATE SET seq = excluded.seq",
                params![self.scope, cursor],
            )?;
            // Keep the most recent ids only.
            tx.execute(
                "DELETE FROM handled WHERE scope = ?1 AND seq <= ?2 AND seq < (
                     SELECT seq FROM handled WHERE scope = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?3)",
                params![self.scope, cursor, RECENT_IDS],
            )?;
        }
        tx.commit()?;
        self.cursor = cursor;
        Ok(())
    }

    /// Moves the cursor up without a message (e.g. the ordered stream passed a seq the
    /// app already got through a push).
    pub fn advance(&mut self, new_cursor: i64) -> Result<(), Error> {
        if new_cursor <= self.cursor {
            return Ok(());
        }
        self.conn.execute(
            "INSERT INTO cursor (scope, seq) VALUES (?1, ?2)
             ON CONFLICT (scope) DO UPDATE SET seq = excluded.seq",
            params![self.scope, new_cursor],
        )?;
        self.cursor = new_cursor;
        Ok(())
    }

    /// The gateway's inbox is behind our cursor (device deleted and re-created, data
    /// restored from an older backup): start over from its `last_seq`.
    pub fn reset(&mut self, cursor: i64) -> Result<(), Error> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM handled WHERE scope = ?1", params![self.scope])?;
        tx.execute(
            "INSERT INTO cursor (scope, seq) VALUES (?1, ?2)
             ON CONFLICT (scope) DO UPDATE SET seq = excluded.seq",
            params![self.scope, cursor],
        )?;
        tx.commit()?;
        self.cursor = cursor;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_and_handled_ids_survive_reopen() {
        let dir = std::env::temp_dir().join(format!("herald-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
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
        assert!(n <= RECENT_IDS + 1, "{n}");
        assert!(s.is_handled(5, "m5").unwrap());
    }
}
