//! Keeps roster's own promises on disk: which transactions were acknowledged and the member
//! states they recorded.
//!
//! SQLite in WAL mode with `synchronous = FULL`: a commit has reached the disk before the
//! homeserver is told 200. Calls block; async callers use `spawn_blocking`. The homeserver
//! stays the truth: losing this file costs a resync, never duplicate rooms.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use crate::model::agents::RoomRecord;
use crate::model::{Change, EventOrder, MemberState, Membership};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open store {path}: {source}; check store.path and its directory's permissions")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("store query failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store holds an unreadable row ({0}); delete the store to resync from the homeserver")]
    Corrupt(String),
}

/// Whether `record_transaction` stored something new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    New,
    /// The id was recorded before: the caller applies nothing again.
    Duplicate,
}

/// A recorded member state, as restored at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMember {
    pub room_id: ruma::OwnedRoomId,
    pub user_id: ruma::OwnedUserId,
    pub state: MemberState,
}

pub struct Store {
    // A std Mutex: every use is a short synchronous SQLite call inside spawn_blocking.
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS transactions (
    txn_id      TEXT PRIMARY KEY,
    received_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS transactions_received ON transactions(received_ms);
CREATE TABLE IF NOT EXISTS members (
    room_id          TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    membership       TEXT NOT NULL,
    displayname      TEXT,
    avatar_url       TEXT,
    sender           TEXT NOT NULL,
    origin_server_ts INTEGER NOT NULL,
    event_id         TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE TABLE IF NOT EXISTS agent_rooms (
    agent_id TEXT PRIMARY KEY,
    record   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deactivated_users (
    user_id TEXT PRIMARY KEY,
    at_ms   INTEGER NOT NULL
);
";

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    /// An in-memory store for unit tests and benchmarks.
    pub fn in_memory() -> Result<Store, StoreError> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written: its own
        // transaction rolls back, so the connection is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn has_transaction(&self, txn_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM transactions WHERE txn_id = ?1",
                [txn_id],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Records the transaction id and the member states it changed, atomically.
    pub fn record_transaction(
        &self,
        txn_id: &str,
        received_ms: u64,
        changes: &[Change],
    ) -> Result<Recorded, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let inserted = tx.execute(
            "INSERT OR IGNORE INTO transactions (txn_id, received_ms) VALUES (?1, ?2)",
            params![txn_id, received_ms as i64],
        )?;
        if inserted == 0 {
            return Ok(Recorded::Duplicate);
        }
        upsert_members(&tx, changes)?;
        tx.commit()?;
        Ok(Recorded::New)
    }

    /// Records member states learned outside a transaction (a `joined_members` read).
    pub fn record_member_changes(&self, changes: &[Change]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        upsert_members(&tx, changes)?;
        tx.commit()?;
        Ok(())
    }

    pub fn save_room_record(&self, record: &RoomRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(record).expect("a record serializes");
        self.conn().execute(
            "INSERT INTO agent_rooms (agent_id, record) VALUES (?1, ?2)
             ON CONFLICT (agent_id) DO UPDATE SET record = excluded.record",
            params![record.agent_id, json],
        )?;
        Ok(())
    }

    pub fn room_records(&self) -> Result<Vec<RoomRecord>, StoreError> {
        let conn = self.conn();
        let mut query = conn.prepare("SELECT agent_id, record FROM agent_rooms")?;
        let rows = query.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })?;
        let mut records = Vec::new();
        for row in rows {
            let (agent_id, json) = row?;
            records
                .push(serde_json::from_str(&json).map_err(|e| {
                    StoreError::Corrupt(format!("agent_rooms row {agent_id}: {e}"))
                })?);
        }
        Ok(records)
    }

    /// Every recorded member state, to rebuild the model at start-up.
    pub fn members(&self) -> Result<Vec<StoredMember>, StoreError> {
        let conn = self.conn();
        let mut query = conn.prepare(
            "SELECT room_id, user_id, membership, displayname, avatar_url, sender, origin_server_ts, event_id
             FROM members",
        )?;
        let rows = query.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, Option<String>>(3)?,
                row.get::<_, Option<String>>(4)?,
                row.get::<_, String>(5)?,
                row.get::<_, i64>(6)?,
                row.get::<_, String>(7)?,
            ))
        })?;
        let mut members = Vec::new();
        for row in rows {
            let (room, user, membership, displayname, avatar_url, sender, ts, event_id) = row?;
            let corrupt = || StoreError::Corrupt(format!("members row {room} {user}"));
            members.push(StoredMember {
                room_id: room.clone().try_into().map_err(|_| corrupt())?,
                user_id: user.clone().try_into().map_err(|_| corrupt())?,
                state: MemberState {
                    membership: Membership::parse(&membership).ok_or_else(corrupt)?,
                    displayname,
                    avatar_url,
                    sender: sender.try_into().map_err(|_| corrupt())?,
                    order: EventOrder {
                        origin_server_ts: ts as u64,
                        event_id: event_id.try_into().map_err(|_| corrupt())?,
                    },
                },
            });
        }
        Ok(members)
    }

    /// Records that `user` was deactivated (idempotent).
    pub fn record_deactivated(&self, user: &ruma::UserId, at_ms: u64) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT OR IGNORE INTO deactivated_users (user_id, at_ms) VALUES (?1, ?2)",
            params![user.as_str(), at_ms as i64],
        )?;
        Ok(())
    }

    pub fn deactivated_users(&self) -> Result<Vec<ruma::OwnedUserId>, StoreError> {
        let conn = self.conn();
        let mut query = conn.prepare("SELECT user_id FROM deactivated_users")?;
        let rows = query.query_map([], |row| row.get::<_, String>(0))?;
        let mut users = Vec::new();
        for row in rows {
            let raw = row?;
            users.push(
                ruma::OwnedUserId::try_from(raw.as_str())
                    .map_err(|_| StoreError::Corrupt(format!("deactivated_users row {raw}")))?,
            );
        }
        Ok(users)
    }

    /// Forgets transaction ids older than `before_ms`, then all but the newest `keep`.
    pub fn prune_transactions(&self, before_ms: u64, keep: usize) -> Result<usize, StoreError> {
        let conn = self.conn();
        let by_age = conn.execute(
            "DELETE FROM transactions WHERE received_ms < ?1",
            [before_ms as i64],
        )?;
        let by_count = conn.execute(
            "DELETE FROM transactions WHERE rowid IN (
                 SELECT rowid FROM transactions ORDER BY received_ms DESC, rowid DESC LIMIT -1 OFFSET ?1)",
            [keep as i64],
        )?;
        Ok(by_age + by_count)
    }

    pub fn transaction_count(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT count(*) FROM transactions", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }
}

fn upsert_members(tx: &rusqlite::Transaction<'_>, changes: &[Change]) -> Result<(), StoreError> {
    let mut upsert = tx.prepare_cached(
        "INSERT INTO members
           (room_id, user_id, membership, displayname, avatar_url, sender, origin_server_ts, event_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (room_id, user_id) DO UPDATE SET
           membership = excluded.membership, displayname = excluded.displayname,
           avatar_url = excluded.avatar_url, sender = excluded.sender,
           origin_server_ts = excluded.origin_server_ts, event_id = excluded.event_id",
    )?;
    for change in changes {
        let s = &change.state;
        upsert.execute(params![
            change.room_id.as_str(),
            change.user_id.as_str(),
            s.membership.as_str(),
            s.displayname,
            s.avatar_url,
            s.sender.as_str(),
            s.order.origin_server_ts as i64,
            s.order.event_id.as_str(),
        ])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MemberEvent, Model};
    use ruma::{owned_room_id, owned_user_id};

    fn join(ts: u64) -> MemberEvent {
        MemberEvent {
            room_id: owned_room_id!("!r:example.org"),
            user_id: owned_user_id!("@a:example.org"),
            sender: owned_user_id!("@a:example.org"),
            membership: Membership::Join,
            displayname: Some("A".into()),
            avatar_url: None,
            order: EventOrder {
                origin_server_ts: ts,
                event_id: format!("$ev{ts}").try_into().unwrap(),
            },
        }
    }

    #[test]
    fn should_record_a_transaction_id_once() {
        let store = Store::in_memory().unwrap();
        let changes = Model::new().preview(&[join(1)]);
        assert_eq!(
            store.record_transaction("t1", 10, &changes).unwrap(),
            Recorded::New
        );
        assert_eq!(
            store.record_transaction("t1", 11, &changes).unwrap(),
            Recorded::Duplicate
        );
        assert!(store.has_transaction("t1").unwrap());
        assert!(!store.has_transaction("t2").unwrap());
    }

    #[test]
    fn should_restore_recorded_members_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("roster.db");
        {
            let store = Store::open(&path).unwrap();
            let changes = Model::new().preview(&[join(1)]);
            store.record_transaction("t1", 10, &changes).unwrap();
        }
        let store = Store::open(&path).unwrap();
        let members = store.members().unwrap();
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].state.membership, Membership::Join);
        assert_eq!(members[0].state.displayname.as_deref(), Some("A"));
        assert!(store.has_transaction("t1").unwrap());
    }

    #[test]
    fn should_keep_room_records() {
        let store = Store::in_memory().unwrap();
        let mut record = RoomRecord {
            agent_id: "agent-1".into(),
            localpart: "agent_1".into(),
            ..RoomRecord::default()
        };
        store.save_room_record(&record).unwrap();
        record.room_id = Some(ruma::owned_room_id!("!r:example.org"));
        store.save_room_record(&record).unwrap();
        assert_eq!(store.room_records().unwrap(), vec![record]);
    }

    #[test]
    fn should_remember_deactivated_users() {
        let store = Store::in_memory().unwrap();
        let user = owned_user_id!("@nova-1:example.org");
        store.record_deactivated(&user, 1).unwrap();
        store.record_deactivated(&user, 2).unwrap();
        assert_eq!(store.deactivated_users().unwrap(), vec![user]);
    }

    #[test]
    fn should_prune_transaction_ids_by_age_and_count() {
        let store = Store::in_memory().unwrap();
        for i in 0..10u64 {
            store
                .record_transaction(&format!("t{i}"), i * 100, &[])
                .unwrap();
        }
        // Ids received before 300 go by age; of the rest the newest 5 stay.
        assert_eq!(store.prune_transactions(300, 5).unwrap(), 5);
        assert_eq!(store.transaction_count().unwrap(), 5);
        assert!(store.has_transaction("t9").unwrap());
        assert!(store.has_transaction("t5").unwrap());
        assert!(!store.has_transaction("t4").unwrap());
    }
}
