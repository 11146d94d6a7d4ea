//! Keeps roster's own promises on disk: which transactions were acknowledged, the member
//! states of the rooms roster looks after, its agent-room records, deactivated users.
//!
//! SQLite in WAL mode with `synchronous = FULL`: a commit has reached the disk before the
//! homeserver is told 200. Calls block; only `state` calls them, off the async runtime. The
//! homeserver stays the truth: losing this file costs a resync, never duplicate rooms.
//!
//! The schema carries a version (`PRAGMA user_version`) and migrates forward in one
//! transaction at open; a store newer than this binary is refused, and so is one it cannot
//! write (SQLite would open it for reading only, without an error). A new store's directory
//! is created 0700 and its files 0600 (they list who is in which room).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use crate::model::agents::RoomRecord;
use crate::model::{Change, MemberDetail, MemberState, Membership};

/// The schema this binary writes. Every version below it has a migration in `MIGRATIONS`.
pub const SCHEMA_VERSION: i64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open store {path}: {source}; check store.path and its directory's permissions")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("cannot create the store directory {path}: {source}; check store.path")]
    Directory {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "store {path} has schema version {found}, newer than this roster knows ({known}); run the newer roster, or move the file away to resync from the homeserver"
    )]
    TooNew {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("cannot migrate store {path} to schema version {to}: {source}")]
    Migrate {
        path: String,
        to: i64,
        source: rusqlite::Error,
    },
    #[error(
        "store {path} is in use by another roster (a running serve or adopt, maybe another \
         replica on the same volume); stop it first: two writers would each keep a model \
         the other does not see"
    )]
    InUse { path: String },
    #[error("cannot lock {path}: {source}; check that the store's directory is writable")]
    Lock {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "store {path} cannot be written: {source}; check the owner and mode of the file and of \
         its -wal and -shm files beside it"
    )]
    ReadOnly {
        path: String,
        source: rusqlite::Error,
    },
    #[error("store write failed: {0}")]
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

/// What the store knows of a transaction id and the events it came with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    New,
    /// The same id with the same events (or recorded before events were noted): a retry.
    Duplicate,
    /// The same id with other events: the homeserver's counter started again.
    Reused,
}

/// A recorded member state, as restored at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMember {
    pub room_id: ruma::OwnedRoomId,
    pub user_id: ruma::OwnedUserId,
    pub state: MemberState,
    pub detail: MemberDetail,
}

pub struct Store {
    // A std Mutex: every use is a short synchronous SQLite call on a blocking thread.
    conn: Mutex<Connection>,
    /// Held (locked) while this store is open for writing: see [`Store::open`].
    _writer: Option<std::fs::File>,
}

/// Version 1: the schema roster shipped first (created without a version number).
const V1: &str = "
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

/// Version 2: member states are ordered by delivery (`seq`), not by the homeserver's
/// timestamps; a state learnt from a read has no event id; a `meta` table keeps single
/// values (the space). Member states of rooms roster does not look after are dropped.
const V2: &str = "
CREATE TABLE members_v2 (
    room_id          TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    membership       TEXT NOT NULL,
    seq              INTEGER NOT NULL,
    event_id         TEXT,
    origin_server_ts INTEGER NOT NULL,
    sender           TEXT NOT NULL,
    displayname      TEXT,
    avatar_url       TEXT,
    PRIMARY KEY (room_id, user_id)
);
INSERT INTO members_v2
    SELECT room_id, user_id, membership,
           row_number() OVER (ORDER BY origin_server_ts, event_id),
           CASE WHEN event_id LIKE '$roster-read-%' THEN NULL ELSE event_id END,
           origin_server_ts, sender, displayname, avatar_url
    FROM members
    WHERE room_id IN (SELECT json_extract(record, '$.room_id') FROM agent_rooms)
       OR user_id LIKE '@agent\\_%' ESCAPE '\\';
DROP TABLE members;
ALTER TABLE members_v2 RENAME TO members;
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// Version 3: what roster last applied to each identity user's profile (so an unchanged
/// update sends nothing), media it uploaded by source (avatar URLs, generated pictures), and
/// the history imported into new agent rooms.
const V3: &str = "
CREATE TABLE identity_profiles (
    user_id       TEXT PRIMARY KEY,
    displayname   TEXT,
    avatar_source TEXT,
    avatar_mxc    TEXT,
    updated_ms    INTEGER NOT NULL
);
CREATE TABLE uploads (
    source      TEXT PRIMARY KEY,
    mxc         TEXT NOT NULL,
    uploaded_ms INTEGER NOT NULL
);
CREATE TABLE history_imports (
    room_id     TEXT PRIMARY KEY,
    agent_id    TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    posted      INTEGER NOT NULL,
    last_posted TEXT,
    detail      TEXT,
    at_ms       INTEGER NOT NULL
);
";

/// Version 4: where the lifecycle event whose profile parts roster last applied sits
/// (partition and offset), so a redelivery of it, or of an older one, sends nothing. Unknown
/// (NULL) for profiles recorded before.
const V4: &str = "
ALTER TABLE identity_profiles ADD COLUMN applied_partition INTEGER;
ALTER TABLE identity_profiles ADD COLUMN applied_offset INTEGER;
";

/// Version 5: a digest of each transaction's member event ids, so an id the homeserver
/// hands out again (its counter restarted: `appservice.id` changed, its database restored)
/// with other events is told from a retry. Unknown (NULL) for ids recorded before.
const V5: &str = "
ALTER TABLE transactions ADD COLUMN events TEXT;
";

const MIGRATIONS: &[(i64, &str)] = &[(1, V1), (2, V2), (3, V3), (4, V4), (5, V5)];

pub use crate::model::identity::{AppliedProfile, EventPosition};

/// Media roster uploaded, by where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub mxc: String,
    pub uploaded_ms: u64,
}

/// How importing an agent's history into its new room went.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HistoryImport {
    pub agent_id: String,
    /// `started` (under way, or interrupted), `done` or `failed`.
    pub outcome: String,
    pub posted: u32,
    /// The last message posted (its source id and role), so an interrupted import goes on
    /// after it instead of posting from the start.
    #[serde(default)]
    pub last_posted: Option<String>,
    pub detail: Option<String>,
    pub at_ms: u64,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let display = path.display().to_string();
        let open_err = |source| StoreError::Open {
            path: display.clone(),
            source,
        };
        create_private_dir(path.parent()).map_err(|source| StoreError::Directory {
            path: display.clone(),
            source,
        })?;
        let writer = lock_writer(path)?;
        let is_new = !path.exists();
        let conn = Connection::open(path).map_err(open_err)?;
        if is_new {
            restrict(path);
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        migrate(&conn, &display)?;
        check_writable(&conn, &display)?;
        if is_new {
            // The WAL and shared-memory files appear with the first write.
            for suffix in ["-wal", "-shm"] {
                restrict(&path.with_file_name(format!(
                    "{}{suffix}",
                    path.file_name().unwrap_or_default().to_string_lossy()
                )));
            }
        }
        Ok(Store {
            conn: Mutex::new(conn),
            _writer: Some(writer),
        })
    }

    /// Opens an existing store to read it, migrating nothing (for `roster plan`).
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        let display = path.display().to_string();
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|source| StoreError::Open {
                path: display.clone(),
                source,
            })?;
        let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path: display,
                found,
                known: SCHEMA_VERSION,
            });
        }
        Ok(Store {
            conn: Mutex::new(conn),
            _writer: None,
        })
    }

    /// An in-memory store for unit tests and benchmarks.
    pub fn in_memory() -> Result<Store, StoreError> {
        let conn = Connection::open_in_memory()?;
        migrate(&conn, ":memory:")?;
        Ok(Store {
            conn: Mutex::new(conn),
            _writer: None,
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written: its own
        // transaction rolls back, so the connection is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The schema version of the open store.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// Refuses (or allows again) every write, as a full or read-only disk would.
    #[cfg(any(test, feature = "testing"))]
    pub fn set_read_only(&self, read_only: bool) {
        self.conn()
            .pragma_update(None, "query_only", read_only)
            .expect("query_only can be set");
    }

    #[cfg(test)]
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

    /// Whether `txn_id` came before, and with the same `events` (see [`Seen`]).
    pub fn seen_transaction(&self, txn_id: &str, events: &str) -> Result<Seen, StoreError> {
        let recorded: Option<Option<String>> = self
            .conn()
            .query_row(
                "SELECT events FROM transactions WHERE txn_id = ?1",
                [txn_id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(match recorded {
            None => Seen::New,
            Some(None) => Seen::Duplicate,
            Some(Some(before)) if before == events => Seen::Duplicate,
            Some(Some(_)) => Seen::Reused,
        })
    }

    /// Records the transaction id, the digest of its `events` and the member states it
    /// changed, atomically; an id recorded before with other events is recorded again.
    pub fn record_transaction(
        &self,
        txn_id: &str,
        events: &str,
        received_ms: u64,
        changes: &[Change],
    ) -> Result<Recorded, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let inserted = tx.execute(
            "INSERT INTO transactions (txn_id, received_ms, events) VALUES (?1, ?2, ?3)
             ON CONFLICT (txn_id) DO UPDATE
                SET received_ms = excluded.received_ms, events = excluded.events
                WHERE transactions.events IS NOT NULL AND transactions.events != excluded.events",
            params![txn_id, received_ms as i64, events],
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

    /// Records what a read of `room` found (`changes`) and drops the room's other member
    /// states but those of `keep`, atomically: a room the model forgot keeps in the store
    /// only what the model holds of it again. Returns how many states were dropped.
    pub fn record_room_read(
        &self,
        room: &ruma::RoomId,
        changes: &[Change],
        keep: &std::collections::HashSet<&ruma::UserId>,
    ) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let stored: Vec<String> = {
            let mut query = tx.prepare_cached("SELECT user_id FROM members WHERE room_id = ?1")?;
            query
                .query_map([room.as_str()], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        let mut dropped = 0;
        {
            let mut delete =
                tx.prepare_cached("DELETE FROM members WHERE room_id = ?1 AND user_id = ?2")?;
            for user in stored {
                let kept =
                    <&ruma::UserId>::try_from(user.as_str()).is_ok_and(|user| keep.contains(user));
                if !kept {
                    dropped += delete.execute(params![room.as_str(), user])?;
                }
            }
        }
        upsert_members(&tx, changes)?;
        tx.commit()?;
        Ok(dropped)
    }

    /// Saves agent-room records, all or none.
    pub fn save_room_records(&self, records: &[RoomRecord]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO agent_rooms (agent_id, record) VALUES (?1, ?2)
                 ON CONFLICT (agent_id) DO UPDATE SET record = excluded.record",
            )?;
            for record in records {
                let json = serde_json::to_string(record).expect("a record serializes");
                upsert.execute(params![record.agent_id, json])?;
            }
        }
        tx.commit()?;
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
            "SELECT room_id, user_id, membership, seq, event_id, origin_server_ts, sender,
                    displayname, avatar_url
             FROM members",
        )?;
        let rows = query.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, Option<String>>(4)?,
                row.get::<_, i64>(5)?,
                row.get::<_, String>(6)?,
                row.get::<_, Option<String>>(7)?,
                row.get::<_, Option<String>>(8)?,
            ))
        })?;
        let mut members = Vec::new();
        for row in rows {
            let (room, user, membership, seq, event_id, ts, sender, displayname, avatar_url) = row?;
            let corrupt = || StoreError::Corrupt(format!("members row {room} {user}"));
            let detail = MemberDetail {
                event_id: event_id
                    .map(|e| e.try_into().map_err(|_| corrupt()))
                    .transpose()?,
                sender: sender.try_into().map_err(|_| corrupt())?,
                displayname,
                avatar_url,
            };
            let membership = Membership::parse(&membership).ok_or_else(corrupt)?;
            members.push(StoredMember {
                room_id: room.clone().try_into().map_err(|_| corrupt())?,
                user_id: user.clone().try_into().map_err(|_| corrupt())?,
                state: detail.state(membership, seq as u64, ts as u64),
                detail,
            });
        }
        Ok(members)
    }

    /// Drops the member states of `rooms` (rooms roster no longer looks after).
    pub fn forget_rooms(&self, rooms: &[ruma::OwnedRoomId]) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut dropped = 0;
        {
            let mut delete = tx.prepare_cached("DELETE FROM members WHERE room_id = ?1")?;
            for room in rooms {
                dropped += delete.execute([room.as_str()])?;
            }
        }
        tx.commit()?;
        Ok(dropped)
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

    /// A single value kept under `key` (e.g. the space's room id).
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    /// Forgets which event applied each identity profile (the profiles stay); returns how
    /// many had one.
    pub fn clear_applied_positions(&self) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "UPDATE identity_profiles SET applied_partition = NULL, applied_offset = NULL
             WHERE applied_partition IS NOT NULL",
            [],
        )?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    pub fn identity_profile(
        &self,
        user: &ruma::UserId,
    ) -> Result<Option<AppliedProfile>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT displayname, avatar_source, avatar_mxc, applied_partition, applied_offset
                 FROM identity_profiles WHERE user_id = ?1",
                [user.as_str()],
                |r| {
                    let partition: Option<i32> = r.get(3)?;
                    let offset: Option<i64> = r.get(4)?;
                    Ok(AppliedProfile {
                        displayname: r.get(0)?,
                        avatar_source: r.get(1)?,
                        avatar_mxc: r.get(2)?,
                        applied_at: partition
                            .zip(offset)
                            .map(|(partition, offset)| EventPosition { partition, offset }),
                    })
                },
            )
            .optional()?)
    }

    /// Saves several users' applied profiles in one commit, so they share one fsync.
    pub fn save_identity_profiles(
        &self,
        rows: &[(&ruma::UserId, &AppliedProfile, u64)],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO identity_profiles (user_id, displayname, avatar_source, avatar_mxc,
                   updated_ms, applied_partition, applied_offset)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (user_id) DO UPDATE SET displayname = excluded.displayname,
                   avatar_source = excluded.avatar_source, avatar_mxc = excluded.avatar_mxc,
                   updated_ms = excluded.updated_ms, applied_partition = excluded.applied_partition,
                   applied_offset = excluded.applied_offset",
            )?;
            for (user, profile, at_ms) in rows {
                upsert.execute(params![
                    user.as_str(),
                    profile.displayname,
                    profile.avatar_source,
                    profile.avatar_mxc,
                    *at_ms as i64,
                    profile.applied_at.map(|at| at.partition),
                    profile.applied_at.map(|at| at.offset),
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn upload(&self, source: &str) -> Result<Option<Upload>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT mxc, uploaded_ms FROM uploads WHERE source = ?1",
                [source],
                |r| {
                    Ok(Upload {
                        mxc: r.get(0)?,
                        uploaded_ms: r.get::<_, i64>(1)? as u64,
                    })
                },
            )
            .optional()?)
    }

    pub fn save_upload(&self, source: &str, upload: &Upload) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO uploads (source, mxc, uploaded_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (source) DO UPDATE SET mxc = excluded.mxc, uploaded_ms = excluded.uploaded_ms",
            params![source, upload.mxc, upload.uploaded_ms as i64],
        )?;
        Ok(())
    }

    pub fn history_imports(&self) -> Result<Vec<(ruma::OwnedRoomId, HistoryImport)>, StoreError> {
        let conn = self.conn();
        let mut query = conn.prepare(
            "SELECT room_id, agent_id, outcome, posted, last_posted, detail, at_ms FROM history_imports",
        )?;
        let rows = query.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                HistoryImport {
                    agent_id: r.get(1)?,
                    outcome: r.get(2)?,
                    posted: r.get::<_, i64>(3)? as u32,
                    last_posted: r.get(4)?,
                    detail: r.get(5)?,
                    at_ms: r.get::<_, i64>(6)? as u64,
                },
            ))
        })?;
        let mut imports = Vec::new();
        for row in rows {
            let (room, import) = row?;
            let room = ruma::OwnedRoomId::try_from(room.as_str())
                .map_err(|_| StoreError::Corrupt(format!("history_imports row {room}")))?;
            imports.push((room, import));
        }
        Ok(imports)
    }

    pub fn save_history_import(
        &self,
        room: &ruma::RoomId,
        import: &HistoryImport,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO history_imports (room_id, agent_id, outcome, posted, last_posted, detail, at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (room_id) DO UPDATE SET outcome = excluded.outcome,
               posted = excluded.posted, last_posted = excluded.last_posted,
               detail = excluded.detail, at_ms = excluded.at_ms",
            params![
                room.as_str(),
                import.agent_id,
                import.outcome,
                import.posted as i64,
                import.last_posted,
                import.detail,
                import.at_ms as i64
            ],
        )?;
        Ok(())
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

    /// Member rows kept, for status and benchmarks.
    pub fn member_count(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT count(*) FROM members", [], |r| r.get::<_, i64>(0))?
            as u64)
    }
}

/// Brings the schema to `SCHEMA_VERSION`, one transaction per open.
fn migrate(conn: &Connection, path: &str) -> Result<(), StoreError> {
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found,
            known: SCHEMA_VERSION,
        });
    }
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    let migrate_err = |source| StoreError::Migrate {
        path: path.to_owned(),
        to: SCHEMA_VERSION,
        source,
    };
    conn.execute_batch("BEGIN IMMEDIATE").map_err(migrate_err)?;
    let run = || -> rusqlite::Result<()> {
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
            conn.execute_batch(sql)?;
            conn.pragma_update(None, "user_version", version)?;
        }
        conn.execute_batch("COMMIT")
    };
    if let Err(source) = run() {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(migrate_err(source));
    }
    Ok(())
}

/// Proves the store can be written. SQLite opens a file it may not write, or whose `-wal`
/// or `-shm` it may not write, for reading only and without an error; every write would
/// then fail after roster said it was ready.
fn check_writable(conn: &Connection, path: &str) -> Result<(), StoreError> {
    let read_only = |source| StoreError::ReadOnly {
        path: path.to_owned(),
        source,
    };
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(read_only)?;
    // Rewriting the version is a write that changes nothing.
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE; PRAGMA user_version = {version}; COMMIT;"
    ))
    .map_err(|source| {
        let _ = conn.execute_batch("ROLLBACK");
        read_only(source)
    })
}

/// Creates the store's directory (0700) when it does not exist.
fn create_private_dir(dir: Option<&Path>) -> std::io::Result<()> {
    let Some(dir) = dir.filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if dir.exists() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Locks `<store>.lock` for as long as the returned file is open. SQLite would let a second
/// process write the same file, but each roster keeps the model in memory, so a second
/// writer (an `adopt` beside a running `serve`, two replicas on one volume) would go
/// unseen by the first. The kernel releases the lock when the process dies, SIGKILL too.
fn lock_writer(path: &Path) -> Result<std::fs::File, StoreError> {
    let display = path.display().to_string();
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    let lock_path = path.with_file_name(name);
    let mut options = std::fs::OpenOptions::new();
    options.create(true).truncate(false).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options
        .open(&lock_path)
        .map_err(|source| StoreError::Lock {
            path: lock_path.display().to_string(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse { path: display }),
        Err(std::fs::TryLockError::Error(source)) => Err(StoreError::Lock {
            path: lock_path.display().to_string(),
            source,
        }),
    }
}

/// Makes a file roster created readable by its owner only.
fn restrict(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
}

fn upsert_members(tx: &rusqlite::Transaction<'_>, changes: &[Change]) -> Result<(), StoreError> {
    let mut upsert = tx.prepare_cached(
        "INSERT INTO members
           (room_id, user_id, membership, seq, event_id, origin_server_ts, sender, displayname, avatar_url)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (room_id, user_id) DO UPDATE SET
           membership = excluded.membership, seq = excluded.seq, event_id = excluded.event_id,
           origin_server_ts = excluded.origin_server_ts, sender = excluded.sender,
           displayname = excluded.displayname, avatar_url = excluded.avatar_url",
    )?;
    for change in changes {
        let (s, d) = (&change.state, &change.detail);
        upsert.execute(params![
            change.room_id.as_str(),
            change.user_id.as_str(),
            s.membership.as_str(),
            s.seq as i64,
            d.event_id.as_ref().map(|e| e.as_str()),
            s.origin_server_ts as i64,
            d.sender.as_str(),
            d.displayname,
            d.avatar_url,
        ])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MemberEvent, Model};
    use ruma::{owned_room_id, owned_user_id};

    fn join(n: u64) -> MemberEvent {
        MemberEvent {
            room_id: owned_room_id!("!r:example.org"),
            user_id: owned_user_id!("@a:example.org"),
            sender: owned_user_id!("@a:example.org"),
            membership: Membership::Join,
            displayname: Some("A".into()),
            avatar_url: None,
            event_id: format!("$ev{n}").try_into().unwrap(),
            origin_server_ts: n,
        }
    }

    #[test]
    fn should_record_a_transaction_id_once() {
        let store = Store::in_memory().unwrap();
        let changes = Model::new().preview(&[join(1)]);
        assert_eq!(
            store.record_transaction("t1", "e1", 10, &changes).unwrap(),
            Recorded::New
        );
        assert_eq!(store.seen_transaction("t1", "e1").unwrap(), Seen::Duplicate);
        assert_eq!(
            store.record_transaction("t1", "e1", 11, &changes).unwrap(),
            Recorded::Duplicate
        );
        assert!(store.has_transaction("t1").unwrap());
        assert!(!store.has_transaction("t2").unwrap());
        assert_eq!(store.seen_transaction("t2", "e1").unwrap(), Seen::New);
        // The homeserver's counter started again: the same id, other events.
        assert_eq!(store.seen_transaction("t1", "e2").unwrap(), Seen::Reused);
        assert_eq!(
            store.record_transaction("t1", "e2", 12, &changes).unwrap(),
            Recorded::New
        );
        assert_eq!(store.seen_transaction("t1", "e2").unwrap(), Seen::Duplicate);
        assert_eq!(store.seen_transaction("t1", "e1").unwrap(), Seen::Reused);
    }

    #[test]
    fn should_refuse_a_second_writer_while_the_store_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("roster.db");
        let first = Store::open(&path).unwrap();
        let refused = Store::open(&path)
            .err()
            .expect("a second writer is refused");
        assert!(matches!(refused, StoreError::InUse { .. }), "{refused}");
        assert!(refused.to_string().contains("roster.db"), "{refused}");
        // A reader (roster plan) is not a writer.
        Store::open_read_only(&path).unwrap();
        drop(first);
        Store::open(&path).expect("free again once the first is closed");
    }

    #[test]
    fn should_restore_recorded_members_across_reopen_with_private_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/roster.db");
        let changes = Model::new().preview(&[join(1)]);
        {
            let store = Store::open(&path).unwrap();
            store.record_transaction("t1", "e1", 10, &changes).unwrap();
        }
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("state")), 0o700);
        assert_eq!(mode(&path), 0o600);
        let store = Store::open(&path).unwrap();
        let members = store.members().unwrap();
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].state, changes[0].state);
        assert_eq!(members[0].detail, changes[0].detail);
        assert!(store.has_transaction("t1").unwrap());
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    }

    #[test]
    fn should_keep_room_records_and_meta() {
        let store = Store::in_memory().unwrap();
        let mut record = RoomRecord {
            agent_id: "agent-1".into(),
            localpart: "agent_1".into(),
            ..RoomRecord::default()
        };
        store.save_room_records(&[record.clone()]).unwrap();
        record.room_id = Some(owned_room_id!("!r:example.org"));
        store.save_room_records(&[record.clone()]).unwrap();
        assert_eq!(store.room_records().unwrap(), vec![record]);
        assert_eq!(store.meta("space").unwrap(), None);
        store.set_meta("space", "!s:example.org").unwrap();
        store.set_meta("space", "!t:example.org").unwrap();
        assert_eq!(
            store.meta("space").unwrap().as_deref(),
            Some("!t:example.org")
        );
    }

    #[test]
    fn should_keep_profiles_uploads_and_history_imports() {
        let store = Store::in_memory().unwrap();
        let user = owned_user_id!("@nova-1:example.org");
        assert_eq!(store.identity_profile(&user).unwrap(), None);
        let profile = AppliedProfile {
            displayname: Some("A".into()),
            avatar_source: Some("https://x/a.png".into()),
            avatar_mxc: Some("mxc://example.org/a".into()),
            applied_at: None,
        };
        store
            .save_identity_profiles(&[(&user, &profile, 1)])
            .unwrap();
        assert_eq!(
            store.identity_profile(&user).unwrap(),
            Some(profile.clone())
        );
        let moved = profile.at(EventPosition {
            partition: 3,
            offset: 12,
        });
        store.save_identity_profiles(&[(&user, &moved, 2)]).unwrap();
        assert_eq!(store.identity_profile(&user).unwrap(), Some(moved));
        let upload = Upload {
            mxc: "mxc://example.org/u".into(),
            uploaded_ms: 5,
        };
        store.save_upload("sha256:ab", &upload).unwrap();
        assert_eq!(store.upload("sha256:ab").unwrap(), Some(upload));
        assert_eq!(store.upload("sha256:cd").unwrap(), None);
        let import = HistoryImport {
            agent_id: "agent-1".into(),
            outcome: "done".into(),
            posted: 3,
            last_posted: Some("message-3-assistant".into()),
            detail: None,
            at_ms: 9,
        };
        let room = owned_room_id!("!r:example.org");
        store.save_history_import(&room, &import).unwrap();
        assert_eq!(store.history_imports().unwrap(), vec![(room, import)]);
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
                .record_transaction(&format!("t{i}"), "", i * 100, &[])
                .unwrap();
        }
        // Ids received before 300 go by age; of the rest the newest 5 stay.
        assert_eq!(store.prune_transactions(300, 5).unwrap(), 5);
        assert_eq!(store.transaction_count().unwrap(), 5);
        assert!(store.has_transaction("t9").unwrap());
        assert!(store.has_transaction("t5").unwrap());
        assert!(!store.has_transaction("t4").unwrap());
    }

    /// A store written by the first schema (no version number) opens, keeps what roster
    /// looks after in delivery order, and drops the member states of other rooms.
    #[test]
    fn should_migrate_a_version_1_store_and_prune_unmanaged_rooms() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("roster.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(V1).unwrap();
            let record = r#"{"agent_id":"agent-1","localpart":"agent_1","name":"One","room_id":"!agent:ex.org","applied_name":"One","space_linked":true,"missing_since_ms":null,"retired":false}"#;
            conn.execute("INSERT INTO agent_rooms VALUES ('agent-1', ?1)", [record])
                .unwrap();
            for (room, user, ts, event) in [
                ("!agent:ex.org", "@admin:ex.org", 20, "$b"),
                ("!agent:ex.org", "@letta:ex.org", 10, "$a"),
                ("!other:ex.org", "@admin:ex.org", 5, "$c"),
                (
                    "!other:ex.org",
                    "@agent_1:ex.org",
                    6,
                    "$roster-read-6-agent_1",
                ),
            ] {
                conn.execute(
                    "INSERT INTO members VALUES (?1, ?2, 'join', NULL, NULL, ?2, ?3, ?4)",
                    params![room, user, ts, event],
                )
                .unwrap();
            }
            conn.execute("INSERT INTO transactions VALUES ('t1', 1)", [])
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        let mut members: Vec<_> = store
            .members()
            .unwrap()
            .into_iter()
            .map(|m| {
                (
                    m.room_id.to_string(),
                    m.user_id.to_string(),
                    m.state.seq,
                    m.detail.event_id.map(|e| e.to_string()),
                )
            })
            .collect();
        members.sort();
        assert_eq!(
            members,
            vec![
                (
                    "!agent:ex.org".into(),
                    "@admin:ex.org".into(),
                    3,
                    Some("$b".into())
                ),
                (
                    "!agent:ex.org".into(),
                    "@letta:ex.org".into(),
                    2,
                    Some("$a".into())
                ),
                ("!other:ex.org".into(), "@agent_1:ex.org".into(), 1, None),
            ],
            "kept in timestamp order; another room's states kept only for roster's own users"
        );
        assert!(store.has_transaction("t1").unwrap());
        assert_eq!(
            store.seen_transaction("t1", "any events").unwrap(),
            Seen::Duplicate,
            "recorded before events were noted: a retry, as before"
        );
        assert_eq!(store.room_records().unwrap()[0].agent_id, "agent-1");
        drop(store);
        // Opening again is a no-op.
        assert_eq!(Store::open(&path).unwrap().members().unwrap().len(), 3);
    }

    /// A version 3 store keeps its applied profiles; where they were applied from is
    /// unknown until the next one is recorded.
    #[test]
    fn should_migrate_a_version_3_store_keeping_applied_profiles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("roster.db");
        {
            let conn = Connection::open(&path).unwrap();
            for sql in [V1, V2, V3] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 3).unwrap();
            conn.execute(
                "INSERT INTO identity_profiles VALUES ('@nova-1:ex.org', 'A', NULL, NULL, 1)",
                [],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        let user = owned_user_id!("@nova-1:ex.org");
        let kept = store.identity_profile(&user).unwrap().unwrap();
        assert_eq!(kept.displayname.as_deref(), Some("A"));
        assert_eq!(kept.applied_at, None);
        let at = EventPosition {
            partition: 0,
            offset: 11,
        };
        store
            .save_identity_profiles(&[(&user, &kept.clone().at(at), 2)])
            .unwrap();
        drop(store);
        let reopened = Store::open(&path).unwrap();
        assert_eq!(
            reopened
                .identity_profile(&user)
                .unwrap()
                .unwrap()
                .applied_at,
            Some(at)
        );
    }

    /// Makes `file` unwritable for this process, whoever runs it (`chattr +i` when root's
    /// permissions win over the mode); `None` when that cannot be done here.
    fn unwritable(file: &Path) -> Option<Unwritable> {
        use std::os::unix::fs::PermissionsExt;
        let writable = || std::fs::OpenOptions::new().write(true).open(file).is_ok();
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o400)).unwrap();
        if !writable() {
            return Some(Unwritable(file.to_owned(), false));
        }
        let chattr = |flag| {
            std::process::Command::new("chattr")
                .arg(flag)
                .arg(file)
                .status()
                .is_ok_and(|s| s.success())
        };
        if chattr("+i") && !writable() {
            return Some(Unwritable(file.to_owned(), true));
        }
        None
    }

    /// Gives the file back its permissions (and its mutability) when dropped.
    struct Unwritable(std::path::PathBuf, bool);

    impl Drop for Unwritable {
        fn drop(&mut self) {
            use std::os::unix::fs::PermissionsExt;
            if self.1 {
                let _ = std::process::Command::new("chattr")
                    .arg("-i")
                    .arg(&self.0)
                    .status();
            }
            let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o600));
        }
    }

    /// SQLite opens a file it may not write for reading only, and a WAL store whose `-wal`
    /// and `-shm` it may not write (left by an operator's `sqlite3` as another user) without
    /// a word: roster then said ready and failed every write, answering every transaction
    /// 500 and repeating its homeserver actions whose record could not be saved. Such a
    /// store is refused at open, naming it.
    #[test]
    fn should_refuse_a_store_it_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("roster.db");
        drop(Store::open(&path).unwrap());
        let Some(read_only) = unwritable(&path) else {
            eprintln!("skipped: this process cannot be kept from writing a file");
            return;
        };
        let error = Store::open(&path)
            .err()
            .expect("a read-only store is refused");
        assert!(matches!(error, StoreError::ReadOnly { .. }), "{error}");
        assert!(error.to_string().contains("roster.db"), "{error}");
        drop(read_only);
        // What it opened read-only it left read-only too: the -wal and -shm take the file's
        // mode. The error names them; once they are writable, so is the store.
        for suffix in ["-wal", "-shm"] {
            let file = dir.path().join(format!("roster.db{suffix}"));
            if file.exists() {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
        Store::open(&path).unwrap().set_meta("k", "v").unwrap();
    }

    #[test]
    fn should_refuse_a_store_newer_than_the_binary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("roster.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .unwrap();
        }
        let error = Store::open(&path).err().unwrap().to_string();
        assert!(error.contains("newer than this roster knows"), "{error}");
        assert!(error.contains(&path.display().to_string()), "{error}");
    }
}
