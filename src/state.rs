//! Owns what roster knows and has promised: the membership model, the store behind it, and
//! the reconciler's status. Every change goes through a verb here.
//!
//! Invariants:
//! - A verb persists first, then commits to the model: the model never holds a change the
//!   store does not, and a failed write leaves both as they were and returns an error the
//!   caller must handle (nothing is promised before it is durable).
//! - Writes run one at a time, under the model's write lock, off the async runtime.
//! - Nothing outside this module sees the lock or the connection: readers get a closure.
//! - Expectations (`expect`) and invalidations (`forget_room`) change the model only: they
//!   are roster's guesses about the next pushed event, not promises. The read that ends an
//!   invalidation drops from the store what the model forgot, so a restart brings back the
//!   read, not the forgotten states.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};

use crate::ids::Identities;
use crate::model::agents::{Agent, ListingOutcome, RoomRecord, SpaceRecord};
use crate::model::{Change, MemberEvent, Membership, Model, ObservedMember};
use crate::store::{AppliedProfile, HistoryImport, Seen, Store, StoreError, Upload};

/// Identity profiles kept in memory in front of the store.
const PROFILE_CACHE: u64 = 100_000;

/// The `meta` key of the agents space's record (JSON).
const SPACE_KEY: &str = "space";
/// The lifecycle topic the applied positions of identity profiles come from.
const LIFECYCLE_TOPIC_KEY: &str = "lifecycle_topic";

/// What tells a retried transaction from another one under a reused id: its member
/// events, by id (a retry carries the same ones; its bodies may differ in `unsigned.age`).
fn events_digest(events: &[MemberEvent]) -> String {
    let mut ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    ids.sort_unstable();
    crate::avatar::content_hash(ids.join("\n").as_bytes())
}

/// What a read of a room found that the model did not show.
#[derive(Debug)]
pub struct ReadFound {
    /// Members whose state the read changed (recorded).
    pub changes: Vec<Change>,
    /// Joins roster expected from its own actions that the read did not show.
    pub unconfirmed_joins: usize,
}

impl ReadFound {
    /// How much the homeserver disagreed with the model.
    pub fn drift(&self) -> usize {
        self.changes.len() + self.unconfirmed_joins
    }
}

/// A verb could not keep its promise; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store worker stopped unexpectedly: {0}")]
    Worker(String),
    /// A batched write failed (the store error, as text: every writer in the batch gets it).
    #[error("{0}")]
    ProfileWrite(String),
}

/// Whether a transaction was new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Recorded, with the membership changes it made, and how many member events were
    /// about rooms roster does not look after (acknowledged, not kept).
    New {
        changes: Vec<Change>,
        dropped: usize,
    },
    /// The id was recorded before: nothing was applied again.
    Duplicate,
}

/// What operators see of the reconciler: the space, the source, the last sync, failures.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub space: Option<OwnedRoomId>,
    pub source: Option<SourceStatus>,
    pub last_sync: Option<SyncSummary>,
    /// The sync under way, if any (the periodic one spreads its reads over minutes).
    #[serde(default)]
    pub sync_running: Option<SyncRunning>,
    /// Agents whose work gave up, with the reason.
    pub failed: BTreeMap<String, String>,
    /// Agents with members roster will not touch: a banned required member, a deactivated
    /// agent user.
    pub blocked: BTreeMap<String, Vec<String>>,
    /// Failures in a row per agent, for the error policy.
    #[serde(skip)]
    pub attempts: BTreeMap<String, u32>,
    /// Homeserver actions that succeeded since start-up.
    pub actions_ok: u64,
    /// roster asking the homeserver to ping it back (start-up, retried until it works).
    pub ping: PingStatus,
    /// When the homeserver last called roster's `/_matrix/app/v1/ping`.
    pub pinged_by_homeserver_at_ms: Option<u64>,
    /// Lifecycle partitions that cannot move past a message.
    pub lifecycle_stalled: Vec<StalledPartition>,
    /// The Kafka client's last error (unreachable broker, TLS, SASL) since partitions were
    /// last assigned.
    pub lifecycle_broker_error: Option<BrokerError>,
    /// Whether the homeserver answers roster's requests, as the last ones showed.
    #[serde(default)]
    pub homeserver: Health,
}

/// A Kafka client error, as librdkafka reported it, with what to check.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BrokerError {
    pub message: String,
    pub at_ms: u64,
}

/// A peer as roster's own requests find it. For the homeserver, a request that got no answer
/// (timeout, refused connection) or a 5xx sets `last_error`; any other answer clears it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Health {
    pub last_ok_at_ms: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<u64>,
}

impl Health {
    /// Records one request's outcome: `Err` with the reason when the peer failed it.
    pub fn observe(&mut self, outcome: Result<(), String>, now_ms: u64) {
        match outcome {
            Ok(()) => {
                self.last_ok_at_ms = Some(now_ms);
                self.last_error = None;
            }
            Err(reason) => {
                self.last_error = Some(reason);
                self.last_error_at_ms = Some(now_ms);
            }
        }
    }
}

/// A lifecycle partition waiting on one message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StalledPartition {
    pub partition: i32,
    /// The oldest message that cannot be done yet.
    pub offset: i64,
    pub stalled_for_ms: u64,
    pub reason: String,
}

/// Whether the homeserver can reach roster, as the last start-up ping showed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PingStatus {
    pub last_ok_at_ms: Option<u64>,
    pub round_trip_ms: Option<u64>,
    pub last_error: Option<String>,
}

/// The agent source as the last listing left it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceStatus {
    pub source: String,
    pub agents_listed: usize,
    #[serde(flatten)]
    pub health: Health,
}

/// What one reconciliation run did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SyncSummary {
    /// `startup`, `interval`, `manual` (admin API or `roster sync`) or `sighup`.
    pub trigger: String,
    pub started_at_ms: u64,
    pub duration_ms: u64,
    pub agents: usize,
    pub rooms_read: usize,
    pub drift: usize,
    pub actions: u64,
    pub failed: usize,
    pub source_error: Option<String>,
}

/// A sync that has started and not finished.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SyncRunning {
    pub trigger: String,
    pub started_at_ms: u64,
}

/// The one owner of roster's model, store and status. Cheap to clone.
#[derive(Clone)]
pub struct State {
    inner: Arc<Inner>,
}

struct Inner {
    model: RwLock<Model>,
    store: Store,
    status: Mutex<Status>,
    /// Who roster's own users are: their events are kept in any room.
    ids: Identities,
    /// What roster last applied to identity profiles: the store decides, this bounded cache
    /// spares it the reads.
    profiles: moka::sync::Cache<OwnedUserId, AppliedProfile>,
    /// History imported into new agent rooms, by room.
    history: Mutex<BTreeMap<OwnedRoomId, HistoryImport>>,
    /// Applied identity profiles on their way to the store ([`profile_writer`]).
    profile_writes: std::sync::mpsc::Sender<ProfileWrite>,
}

/// One applied profile to store, and where to say how that went.
struct ProfileWrite {
    user: OwnedUserId,
    profile: AppliedProfile,
    at_ms: u64,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// Most profiles one commit takes.
const PROFILE_BATCH: usize = 256;

/// Stores applied identity profiles on a thread of its own, with group commit: the writes
/// that arrive while one commit reaches the disk go together in the next, so concurrent
/// lifecycle events share an fsync instead of waiting in line for one each. Each writer
/// hears back only after its commit. Ends when the state is gone.
fn profile_writer(state: std::sync::Weak<Inner>, writes: std::sync::mpsc::Receiver<ProfileWrite>) {
    while let Ok(first) = writes.recv() {
        let mut batch = vec![first];
        while batch.len() < PROFILE_BATCH
            && let Ok(next) = writes.try_recv()
        {
            batch.push(next);
        }
        let Some(inner) = state.upgrade() else {
            return;
        };
        let rows: Vec<_> = batch
            .iter()
            .map(|w| (w.user.as_ref(), &w.profile, w.at_ms))
            .collect();
        let outcome = inner
            .store
            .save_identity_profiles(&rows)
            .map_err(|e| e.to_string());
        // The cache follows the store here, where the write happened, not in the caller: a
        // caller aborted while waiting (a revoked partition) would leave it stale.
        for write in &batch {
            match &outcome {
                Ok(()) => inner
                    .profiles
                    .insert(write.user.clone(), write.profile.clone()),
                Err(_) => inner.profiles.invalidate(&write.user),
            }
        }
        drop(inner);
        for write in batch {
            let _ = write.done.send(outcome.clone());
        }
    }
}

impl State {
    /// Rebuilds the model from `store`.
    pub fn open(store: Store, ids: Identities) -> Result<State, StoreError> {
        let mut model = Model::new();
        for member in store.members()? {
            model.restore(member.room_id, member.user_id, member.state);
        }
        for record in store.room_records()? {
            // A record whose user id cannot exist on this server (over 255 bytes) would make
            // every later step fail: leave it out, loudly.
            if !ids.fits_agent_localpart(&record.localpart) {
                tracing::warn!(
                    agent = %record.agent_id,
                    localpart = %record.localpart,
                    "ignoring a stored agent room record: its user id would be invalid on this server"
                );
                continue;
            }
            model.agents.restore(record);
        }
        for user in store.deactivated_users()? {
            model.identities.mark_deactivated(user);
        }
        if let Some(space) = store.meta(SPACE_KEY)? {
            model.agents.space = serde_json::from_str(&space)
                .map_err(|e| StoreError::Corrupt(format!("meta row space: {e}")))?;
        }
        let history = store.history_imports()?.into_iter().collect();
        let (profile_writes, queued) = std::sync::mpsc::channel();
        let inner = Arc::new(Inner {
            model: RwLock::new(model),
            store,
            status: Mutex::new(Status::default()),
            ids,
            profiles: moka::sync::Cache::new(PROFILE_CACHE),
            history: Mutex::new(history),
            profile_writes,
        });
        let state = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("roster-profiles".into())
            .spawn(move || profile_writer(state, queued))
            .expect("the system starts a thread");
        Ok(State { inner })
    }

    /// Reads the model. Keep `f` short: writers wait for it.
    pub fn read<R>(&self, f: impl FnOnce(&Model) -> R) -> R {
        // The model is only written by whole verbs; a panic elsewhere cannot leave it
        // half-applied, so a poisoned lock still holds a consistent model.
        let model = self.inner.model.read().unwrap_or_else(|p| p.into_inner());
        f(&model)
    }

    /// Reads or updates the status (not persisted: it describes this run).
    pub fn status<R>(&self, f: impl FnOnce(&mut Status) -> R) -> R {
        let mut status = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut status)
    }

    /// Runs `f` with the store and the model under the write lock, off the runtime.
    async fn write<R, F>(&self, f: F) -> Result<R, StateError>
    where
        F: FnOnce(&Store, &mut Model) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        let inner = self.inner.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut model = inner.model.write().unwrap_or_else(|p| p.into_inner());
            f(&inner.store, &mut model)
        })
        .await
        .map_err(|e| StateError::Worker(e.to_string()))?;
        Ok(done?)
    }

    /// Dedupes and records a pushed transaction: its id and the member states it changed
    /// in one store transaction, then the model.
    ///
    /// Only rooms roster looks after are kept (agent rooms, the space), and any event whose
    /// sender or member is roster's own user: the events of a room roster has just created
    /// may arrive before it recorded the room. The rest is acknowledged and dropped.
    pub async fn record_transaction(
        &self,
        txn_id: String,
        received_at_ms: u64,
        mut events: Vec<MemberEvent>,
    ) -> Result<Recorded, StateError> {
        let inner = self.inner.clone();
        let digest = events_digest(&events);
        self.write(move |store, model| {
            match store.seen_transaction(&txn_id, &digest)? {
                Seen::Duplicate => return Ok(Recorded::Duplicate),
                Seen::Reused => tracing::warn!(
                    txn_id,
                    "transaction id seen before with other events: the homeserver's counter \
                     started again (appservice.id changed, or its database restored); applying it"
                ),
                Seen::New => {}
            }
            let before = events.len();
            events.retain(|e| {
                model.agents.manages_room(&e.room_id)
                    || inner.ids.owns(&e.sender)
                    || inner.ids.owns(&e.user_id)
            });
            let dropped = before - events.len();
            let changes = model.preview(&events);
            match store.record_transaction(&txn_id, &digest, received_at_ms, &changes)? {
                crate::store::Recorded::Duplicate => Ok(Recorded::Duplicate),
                crate::store::Recorded::New => {
                    model.commit(changes.clone());
                    Ok(Recorded::New { changes, dropped })
                }
            }
        })
        .await
    }

    /// Notes the lifecycle topic events come from (named with its Kafka cluster by the
    /// consumer). Applied positions are offsets in one topic; read against another
    /// (`lifecycle.topic` changed, or the same name on another cluster) they would hold back
    /// real updates as already applied, so they are forgotten (the profiles stay: an unchanged
    /// update still sends nothing). Returns how many profiles lost their position.
    pub async fn use_lifecycle_topic(&self, topic: String) -> Result<usize, StateError> {
        let inner = self.inner.clone();
        self.write(move |store, _| {
            let recorded = store.meta(LIFECYCLE_TOPIC_KEY)?;
            if recorded.as_deref() == Some(topic.as_str()) {
                return Ok(0);
            }
            // Positions recorded before the topic was noted came from the configured one.
            let cleared = match recorded {
                Some(_) => store.clear_applied_positions()?,
                None => 0,
            };
            store.set_meta(LIFECYCLE_TOPIC_KEY, &topic)?;
            if cleared > 0 {
                inner.profiles.invalidate_all();
            }
            Ok(cleared)
        })
        .await
    }

    /// Forgets, in the store and the model, the rooms roster does not look after whose
    /// member states all came before `seq` (see `Model::unmanaged_rooms_before`): anyone
    /// can invite roster's user into rooms, and what is kept must stay bounded. Returns
    /// how many rooms went.
    pub async fn forget_unmanaged_rooms(&self, seq: u64) -> Result<usize, StateError> {
        self.write(move |store, model| {
            let rooms = model.unmanaged_rooms_before(seq);
            if !rooms.is_empty() {
                store.forget_rooms(&rooms)?;
                for room in &rooms {
                    model.drop_room(room);
                }
            }
            Ok(rooms.len())
        })
        .await
    }

    /// Records what a `joined_members` read of `room`, asked for when the model's last
    /// fact was `asked_at_seq`, showed; returns the drift it found.
    pub async fn record_read(
        &self,
        room: OwnedRoomId,
        joined: Vec<ObservedMember>,
        asked_at_seq: u64,
    ) -> Result<ReadFound, StateError> {
        self.write(move |store, model| {
            let changes = model.observe_joined(&room, &joined, asked_at_seq);
            if model.is_forgotten(&room) {
                // The store still holds what the model forgot of the room: only what the
                // model holds again (pushed since, or this read) may come back at a restart.
                let keep: HashSet<&UserId> = model
                    .members(&room)
                    .map(|(user, _)| &**user)
                    .chain(changes.iter().map(|c| &*c.user_id))
                    .collect();
                store.record_room_read(&room, &changes, &keep)?;
            } else if !changes.is_empty() {
                store.record_member_changes(&changes)?;
            }
            if !changes.is_empty() {
                model.commit(changes.clone());
            }
            let unconfirmed_joins = model.read_recorded(&room, asked_at_seq, &joined);
            Ok(ReadFound {
                changes,
                unconfirmed_joins,
            })
        })
        .await
    }

    /// Saves what roster has done for one agent's room (`record` is the run's copy; the
    /// listing's fields are kept as they are now: `AgentBook::with_listing`).
    pub async fn save_agent(&self, record: RoomRecord) -> Result<(), StateError> {
        self.write(move |store, model| {
            let record = model.agents.with_listing(record);
            store.save_room_records(std::slice::from_ref(&record))?;
            model.agents.update(record);
            Ok(())
        })
        .await
    }

    /// Applies a complete, successful listing taken at `now_ms`; the records it changed
    /// (new agents, absence clocks) are saved first, so the grace period survives restarts.
    pub async fn observe_listing(
        &self,
        agents: Vec<Agent>,
        now_ms: u64,
        grace_ms: u64,
    ) -> Result<ListingOutcome, StateError> {
        // An agent whose user id cannot exist here is never provisioned; say so each time.
        // Its name is cut to what a homeserver takes as a display name.
        let agents: Vec<Agent> = agents
            .into_iter()
            .filter(|agent| match self.inner.ids.agent_localpart(&agent.id) {
                Ok(_) => true,
                Err(error) => {
                    tracing::warn!(%error, "skipping agent");
                    false
                }
            })
            .map(|agent| Agent {
                name: crate::ids::display_name(&agent.name).into_owned(),
                ..agent
            })
            .collect();
        self.write(move |store, model| {
            let (agents, left_out) = model.agents.without_taken_localparts(agents);
            for (agent, holder) in &left_out {
                tracing::warn!(
                    agent = %agent.id,
                    holder = %holder,
                    "skipping agent: its id makes the same Matrix user and room alias as \
                     the holder's; give one of them another id"
                );
            }
            let mut book = model.agents.clone();
            let outcome = book.observe_listing(&agents, now_ms, grace_ms);
            let touched: Vec<RoomRecord> = book
                .records
                .values()
                .filter(|r| model.agents.records.get(&r.agent_id) != Some(*r))
                .cloned()
                .collect();
            store.save_room_records(&touched)?;
            model.agents = book;
            Ok(outcome)
        })
        .await
    }

    /// Records the agents space, found or created (a different room starts a new record).
    /// A space that replaces another (the old one deleted, its alias gone) has no agent
    /// rooms in it yet: every room's link is forgotten, so each is linked again.
    pub async fn set_space(&self, space: OwnedRoomId) -> Result<(), StateError> {
        let current = self.read(|m| m.agents.space.room_id.clone());
        if current.as_ref() == Some(&space) {
            return Ok(());
        }
        let record = SpaceRecord {
            room_id: Some(space),
            ..SpaceRecord::default()
        };
        self.write(move |store, model| {
            let unlinked: Vec<RoomRecord> = model
                .agents
                .records
                .values()
                .filter(|r| r.space_linked || r.space_parent_set)
                .map(|r| RoomRecord {
                    space_linked: false,
                    space_parent_set: false,
                    ..r.clone()
                })
                .collect();
            // The links first: a crash between the two writes leaves rooms to link again,
            // never rooms that look linked to a space they are not in.
            store.save_room_records(&unlinked)?;
            let json = serde_json::to_string(&record).expect("a space record serializes");
            store.set_meta(SPACE_KEY, &json)?;
            for r in unlinked {
                model.agents.update(r);
            }
            model.agents.space = record;
            Ok(())
        })
        .await
    }

    /// Saves what roster has done for the space.
    pub async fn save_space(&self, record: SpaceRecord) -> Result<(), StateError> {
        self.write(move |store, model| {
            let json = serde_json::to_string(&record).expect("a space record serializes");
            store.set_meta(SPACE_KEY, &json)?;
            model.agents.space = record;
            Ok(())
        })
        .await
    }

    /// Marks an agent retired after its removal actions succeeded; returns `false` when
    /// the agent came back meanwhile (and is not retired).
    pub async fn retire_agent(&self, agent_id: String) -> Result<bool, StateError> {
        self.write(move |store, model| {
            let Some(retired) = model.agents.retirement(&agent_id) else {
                return Ok(false);
            };
            store.save_room_records(&[retired])?;
            model.agents.retire(&agent_id);
            Ok(true)
        })
        .await
    }

    /// Records that `user` was deactivated; returns whether this is news.
    pub async fn record_deactivated(
        &self,
        user: OwnedUserId,
        at_ms: u64,
    ) -> Result<bool, StateError> {
        self.write(move |store, model| {
            store.record_deactivated(&user, at_ms)?;
            Ok(model.identities.mark_deactivated(user))
        })
        .await
    }

    /// Runs `f` with the store alone, off the runtime (for what the model does not hold).
    async fn blocking<R, F>(&self, f: F) -> Result<R, StateError>
    where
        F: FnOnce(&Store) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        let inner = self.inner.clone();
        let done = tokio::task::spawn_blocking(move || f(&inner.store))
            .await
            .map_err(|e| StateError::Worker(e.to_string()))?;
        Ok(done?)
    }

    /// What roster last applied to `user`'s profile (nothing known: all `None`).
    pub async fn applied_profile(&self, user: &UserId) -> Result<AppliedProfile, StateError> {
        if let Some(known) = self.inner.profiles.get(user) {
            return Ok(known);
        }
        let owned = user.to_owned();
        let stored = self
            .blocking(move |store| store.identity_profile(&owned))
            .await?
            .unwrap_or_default();
        Ok(self.remember_stored_profile(user, stored))
    }

    /// Caches a profile read from the store unless a write got there first: the profile
    /// writer puts each committed profile in the cache, and a read that began before that
    /// commit holds the older one.
    fn remember_stored_profile(&self, user: &UserId, stored: AppliedProfile) -> AppliedProfile {
        self.inner
            .profiles
            .entry(user.to_owned())
            .or_insert(stored)
            .into_value()
    }

    /// Records what was applied to `user`'s profile.
    pub async fn record_applied_profile(
        &self,
        user: OwnedUserId,
        profile: AppliedProfile,
        at_ms: u64,
    ) -> Result<(), StateError> {
        let (done, stored) = tokio::sync::oneshot::channel();
        let write = ProfileWrite {
            user,
            profile,
            at_ms,
            done,
        };
        let stopped = || StateError::Worker("the profile writer stopped".into());
        self.inner
            .profile_writes
            .send(write)
            .map_err(|_| stopped())?;
        stored
            .await
            .map_err(|_| stopped())?
            .map_err(StateError::ProfileWrite)?;
        Ok(())
    }

    /// The media uploaded from `source` (`url:<url>` or `sha256:<hex>`), if any.
    pub async fn upload(&self, source: &str) -> Result<Option<Upload>, StateError> {
        let source = source.to_owned();
        self.blocking(move |store| store.upload(&source)).await
    }

    pub async fn record_upload(&self, source: &str, upload: Upload) -> Result<(), StateError> {
        let source = source.to_owned();
        self.blocking(move |store| store.save_upload(&source, &upload))
            .await
    }

    /// How the history import of `room` went, if one ran.
    pub fn history_import(&self, room: &RoomId) -> Option<HistoryImport> {
        self.history().get(room).cloned()
    }

    /// Imports that failed, for status.
    pub fn failed_history_imports(&self) -> BTreeMap<OwnedRoomId, HistoryImport> {
        self.history()
            .iter()
            .filter(|(_, i)| i.outcome == "failed")
            .map(|(r, i)| (r.clone(), i.clone()))
            .collect()
    }

    pub async fn record_history_import(
        &self,
        room: OwnedRoomId,
        import: HistoryImport,
    ) -> Result<(), StateError> {
        let (key, kept) = (room.clone(), import.clone());
        self.blocking(move |store| store.save_history_import(&room, &import))
            .await?;
        self.history().insert(key, kept);
        Ok(())
    }

    fn history(&self) -> std::sync::MutexGuard<'_, BTreeMap<OwnedRoomId, HistoryImport>> {
        self.inner.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that roster's own action will make `user`'s membership `membership`; the next
    /// pushed event about the member replaces this.
    pub fn expect(&self, room: &RoomId, user: &UserId, membership: Membership) {
        self.model_mut().expect(room, user, membership);
    }

    /// Forgets what the model knows of `room`, so it is read before anything is decided.
    pub fn forget_room(&self, room: &RoomId) {
        self.model_mut().forget_room(room);
    }

    fn model_mut(&self) -> std::sync::RwLockWriteGuard<'_, Model> {
        self.inner.model.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets transaction ids older than `before_ms`, then all but the newest `keep`.
    pub async fn prune_transactions(
        &self,
        before_ms: u64,
        keep: usize,
    ) -> Result<usize, StateError> {
        self.write(move |store, _| store.prune_transactions(before_ms, keep))
            .await
    }

    /// Transaction ids remembered for dedup.
    pub async fn transaction_count(&self) -> Result<u64, StateError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.store.transaction_count())
            .await
            .map_err(|e| StateError::Worker(e.to_string()))?
            .map_err(StateError::from)
    }

    /// Makes every store write fail from now on (or not): lets tests prove that a failed
    /// write is never acknowledged or committed.
    #[cfg(any(test, feature = "testing"))]
    pub fn fail_writes(&self, fail: bool) {
        self.inner.store.set_read_only(fail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::{owned_room_id, owned_user_id};

    #[test]
    fn should_show_a_homeserver_error_until_the_next_answer() {
        let mut hs = Health::default();
        hs.observe(Ok(()), 1);
        hs.observe(Err("did not answer".into()), 2);
        assert_eq!(hs.last_error.as_deref(), Some("did not answer"));
        assert_eq!((hs.last_ok_at_ms, hs.last_error_at_ms), (Some(1), Some(2)));
        hs.observe(Ok(()), 3);
        assert_eq!(hs.last_error, None);
        assert_eq!((hs.last_ok_at_ms, hs.last_error_at_ms), (Some(3), Some(2)));
    }

    fn event(room: &str, user: &str, n: u64) -> MemberEvent {
        let user = UserId::parse(user).unwrap();
        MemberEvent {
            room_id: RoomId::parse(room).unwrap(),
            user_id: user.clone(),
            sender: user,
            membership: Membership::Join,
            displayname: None,
            avatar_url: None,
            event_id: format!("$e{n}").try_into().unwrap(),
            origin_server_ts: n,
        }
    }

    fn join(user: &str, n: u64) -> MemberEvent {
        event("!r:ex.org", user, n)
    }

    fn member(state: &State, room: &str, user: &str) -> Option<Membership> {
        let (room, user) = (RoomId::parse(room).unwrap(), UserId::parse(user).unwrap());
        state.read(|m| m.member(&room, &user).map(|s| s.membership))
    }

    fn reopen(dir: &std::path::Path) -> State {
        let ids = Identities::new("ex.org", "letta", None, "letta-agents").unwrap();
        State::open(Store::open(&dir.join("roster.db")).unwrap(), ids).unwrap()
    }

    /// A state whose agent `agent-1` has the room `!r:ex.org`.
    async fn with_agent_room(dir: &std::path::Path) -> State {
        let state = reopen(dir);
        state
            .save_agent(RoomRecord {
                agent_id: "agent-1".into(),
                localpart: "agent_1".into(),
                name: "One".into(),
                room_id: Some(owned_room_id!("!r:ex.org")),
                ..RoomRecord::default()
            })
            .await
            .unwrap();
        state
    }

    /// Positions of one topic must not hold back the events of another.
    #[tokio::test]
    async fn should_forget_applied_positions_when_the_lifecycle_topic_changes() {
        use crate::model::identity::EventPosition;
        let dir = tempfile::tempdir().unwrap();
        let state = reopen(dir.path());
        let user = owned_user_id!("@nova-1:ex.org");
        let at = EventPosition {
            partition: 0,
            offset: 5000,
        };
        let profile = AppliedProfile {
            displayname: Some("Ann".into()),
            ..AppliedProfile::default()
        }
        .at(at);
        state
            .record_applied_profile(user.clone(), profile.clone(), 1)
            .await
            .unwrap();
        let topic = |t: &str| state.use_lifecycle_topic(t.into());
        assert_eq!(
            topic("nova.identity.events").await.unwrap(),
            0,
            "first noted"
        );
        assert_eq!(topic("nova.identity.events").await.unwrap(), 0);
        assert!(state.applied_profile(&user).await.unwrap().covers(at));
        assert_eq!(topic("nova.identity.events.v2").await.unwrap(), 1);
        let kept = state.applied_profile(&user).await.unwrap();
        assert!(
            !kept.covers(at),
            "an offset of the old topic holds nothing back"
        );
        assert_eq!(
            kept.displayname.as_deref(),
            Some("Ann"),
            "the profile stays"
        );
        drop(state);
        let state = reopen(dir.path());
        assert!(!state.applied_profile(&user).await.unwrap().covers(at));
        assert_eq!(
            state
                .use_lifecycle_topic("nova.identity.events.v2".into())
                .await
                .unwrap(),
            0
        );
    }

    /// Anyone can invite roster's user into rooms; what that leaves in the store goes at
    /// the next full sync, for good, while agent rooms stay.
    #[tokio::test]
    async fn should_forget_rooms_roster_does_not_look_after_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let state = with_agent_room(dir.path()).await;
        let invited = MemberEvent {
            membership: Membership::Invite,
            sender: owned_user_id!("@stranger:ex.org"),
            ..event("!elsewhere:ex.org", "@letta:ex.org", 2)
        };
        state
            .record_transaction("t1".into(), 1, vec![join("@a:ex.org", 1), invited])
            .await
            .unwrap();
        let sync_started = state.read(|m| m.last_seq()) + 1;
        let late = event("!late:ex.org", "@letta:ex.org", 3);
        state
            .record_transaction("t2".into(), 2, vec![late])
            .await
            .unwrap();
        assert_eq!(state.forget_unmanaged_rooms(sync_started).await.unwrap(), 1);
        assert_eq!(member(&state, "!elsewhere:ex.org", "@letta:ex.org"), None);
        assert_eq!(
            member(&state, "!late:ex.org", "@letta:ex.org"),
            Some(Membership::Join),
            "arrived during the sync: kept until the next"
        );
        assert_eq!(
            member(&state, "!r:ex.org", "@a:ex.org"),
            Some(Membership::Join)
        );
        drop(state);
        let state = reopen(dir.path());
        assert_eq!(member(&state, "!elsewhere:ex.org", "@letta:ex.org"), None);
        assert_eq!(
            member(&state, "!r:ex.org", "@a:ex.org"),
            Some(Membership::Join)
        );
    }

    /// A room forgotten to be read afresh (`POST /admin/v1/invalidate`, a failed read, a
    /// refused join) is what the read then shows, also after a restart: the states it
    /// forgot must not come back from the store. Here a ban whose lifting was never pushed,
    /// which no read can clear (reads list joined members only), and a join that ended.
    #[tokio::test]
    async fn should_not_bring_back_what_a_forgotten_room_lost_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let state = with_agent_room(dir.path()).await;
        let banned = MemberEvent {
            membership: Membership::Ban,
            sender: owned_user_id!("@mod:ex.org"),
            ..join("@admin:ex.org", 2)
        };
        state
            .record_transaction(
                "t1".into(),
                1,
                vec![join("@a:ex.org", 1), banned, join("@b:ex.org", 3)],
            )
            .await
            .unwrap();
        let room = owned_room_id!("!r:ex.org");
        state.forget_room(&room);
        let asked_at = state.read(|m| m.last_seq());
        let joined = vec![ObservedMember {
            user: owned_user_id!("@a:ex.org"),
            displayname: None,
            avatar_url: None,
        }];
        state
            .record_read(room.clone(), joined, asked_at)
            .await
            .unwrap();
        let now = |state: &State| {
            ["@a:ex.org", "@admin:ex.org", "@b:ex.org"].map(|user| member(state, "!r:ex.org", user))
        };
        let read = [Some(Membership::Join), None, None];
        assert_eq!(now(&state), read);
        drop(state);
        let state = reopen(dir.path());
        assert_eq!(now(&state), read, "after a restart too");
    }

    #[tokio::test]
    async fn should_record_a_transaction_once_and_keep_it_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let state = with_agent_room(dir.path()).await;
        let recorded = state
            .record_transaction("t1".into(), 1, vec![join("@a:ex.org", 1)])
            .await
            .unwrap();
        assert!(
            matches!(recorded, Recorded::New { ref changes, dropped: 0 } if changes.len() == 1)
        );
        // A retry: the same id with the same events (its body may differ in `unsigned`).
        let again = state
            .record_transaction("t1".into(), 2, vec![join("@a:ex.org", 1)])
            .await
            .unwrap();
        assert_eq!(again, Recorded::Duplicate);
        drop(state);
        let state = reopen(dir.path());
        assert_eq!(
            member(&state, "!r:ex.org", "@a:ex.org"),
            Some(Membership::Join)
        );
        assert_eq!(
            state
                .record_transaction("t1".into(), 3, vec![join("@a:ex.org", 1)])
                .await
                .unwrap(),
            Recorded::Duplicate,
            "across a restart too"
        );
        assert_eq!(state.transaction_count().await.unwrap(), 1);
    }

    /// The homeserver's transaction counter started again (`appservice.id` changed, its
    /// database restored): the same id with other events is news, not a retry.
    #[tokio::test]
    async fn should_apply_a_reused_transaction_id_that_brings_other_events() {
        let dir = tempfile::tempdir().unwrap();
        let state = with_agent_room(dir.path()).await;
        state
            .record_transaction("1".into(), 1, vec![join("@a:ex.org", 1)])
            .await
            .unwrap();
        let kicked = MemberEvent {
            membership: Membership::Leave,
            sender: owned_user_id!("@mod:ex.org"),
            ..join("@a:ex.org", 2)
        };
        let reused = state
            .record_transaction("1".into(), 2, vec![kicked])
            .await
            .unwrap();
        assert!(matches!(reused, Recorded::New { ref changes, .. } if changes.len() == 1));
        assert_eq!(
            member(&state, "!r:ex.org", "@a:ex.org"),
            Some(Membership::Leave)
        );
        assert_eq!(state.transaction_count().await.unwrap(), 1);
    }

    /// The finding: every member event of every room a namespaced user is in was kept.
    #[tokio::test]
    async fn should_keep_only_rooms_it_looks_after_and_its_own_users() {
        let dir = tempfile::tempdir().unwrap();
        let state = with_agent_room(dir.path()).await;
        state
            .set_space(owned_room_id!("!space:ex.org"))
            .await
            .unwrap();
        let recorded = state
            .record_transaction(
                "t1".into(),
                1,
                vec![
                    event("!r:ex.org", "@admin:ex.org", 1),
                    event("!space:ex.org", "@admin:ex.org", 2),
                    event("!elsewhere:ex.org", "@admin:ex.org", 3),
                    event("!elsewhere:ex.org", "@nova-1:ex.org", 4),
                    // A room roster just created, before it recorded it.
                    event("!new:ex.org", "@agent_2:ex.org", 5),
                    event("!new:ex.org", "@letta:ex.org", 6),
                ],
            )
            .await
            .unwrap();
        let Recorded::New { changes, dropped } = recorded else {
            panic!("new")
        };
        assert_eq!((changes.len(), dropped), (4, 2));
        assert_eq!(member(&state, "!elsewhere:ex.org", "@admin:ex.org"), None);
        assert_eq!(
            member(&state, "!new:ex.org", "@letta:ex.org"),
            Some(Membership::Join)
        );
        drop(state);
        let state = reopen(dir.path());
        assert_eq!(state.read(|m| m.room_count()), 3, "nor in the store");
        assert_eq!(
            state.read(|m| m.agents.space.room_id.clone()),
            Some(owned_room_id!("!space:ex.org"))
        );
    }

    /// An agent id that would make a user id over 255 bytes never enters the model or the
    /// store (the reconciler could not build its user); a stored one is ignored on open.
    #[tokio::test]
    async fn should_skip_an_agent_whose_user_id_would_pass_255_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let state = reopen(dir.path());
        let long = Agent {
            id: format!("agent-{}", "a".repeat(250)),
            name: "Long".into(),
        };
        let short = Agent {
            id: "agent-2".into(),
            name: "Two".into(),
        };
        let outcome = state
            .observe_listing(vec![long.clone(), short], 0, 1000)
            .await
            .unwrap();
        assert_eq!(outcome.changed, vec!["agent-2".to_owned()]);
        assert!(state.read(|m| !m.agents.records.contains_key(&long.id)));
        state
            .save_agent(RoomRecord {
                agent_id: long.id.clone(),
                localpart: format!("agent_{}", "a".repeat(250)),
                ..RoomRecord::default()
            })
            .await
            .unwrap();
        drop(state);
        let state = reopen(dir.path());
        let ids: Vec<String> = state.read(|m| m.agents.records.keys().cloned().collect());
        assert_eq!(ids, vec!["agent-2".to_owned()]);
    }

    /// Every verb: when the store refuses the write, the caller gets the error and neither
    /// the model nor the store changed; once the store is back, the same call succeeds.
    #[tokio::test]
    async fn should_change_nothing_when_the_store_fails_on_any_verb() {
        let dir = tempfile::tempdir().unwrap();
        let state = with_agent_room(dir.path()).await;
        let agent = Agent {
            id: "agent-1".into(),
            name: "One".into(),
        };
        let leaving = Agent {
            id: "agent-2".into(),
            name: "Two".into(),
        };
        for (listed, at) in [
            (vec![agent.clone(), leaving], 0),
            (vec![agent.clone()], 100),
        ] {
            state.observe_listing(listed, at, 1000).await.unwrap();
        }
        // agent-2 absent past the grace period: its removal is under way.
        state
            .observe_listing(vec![agent.clone()], 1200, 1000)
            .await
            .unwrap();
        assert!(state.read(|m| m.agents.records["agent-2"].removing));
        state.fail_writes(true);

        let err = state
            .record_transaction("t1".into(), 1, vec![join("@a:ex.org", 1)])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("store"), "{err}");
        assert_eq!(member(&state, "!r:ex.org", "@a:ex.org"), None);

        let joined = vec![ObservedMember {
            user: owned_user_id!("@b:ex.org"),
            displayname: None,
            avatar_url: None,
        }];
        assert!(
            state
                .record_read(owned_room_id!("!r:ex.org"), joined.clone(), 0)
                .await
                .is_err()
        );
        assert_eq!(member(&state, "!r:ex.org", "@b:ex.org"), None);

        let mut record = state.read(|m| m.agents.records["agent-1"].clone());
        record.applied_name = Some("One".into());
        assert!(state.save_agent(record.clone()).await.is_err());
        assert_eq!(
            state.read(|m| m.agents.records["agent-1"].applied_name.clone()),
            None
        );

        assert!(
            state
                .set_space(owned_room_id!("!space:ex.org"))
                .await
                .is_err()
        );
        assert_eq!(state.read(|m| m.agents.space.room_id.clone()), None);

        // Absent from a listing past the grace period: the expiry is not promised either.
        assert!(state.observe_listing(vec![], 2000, 1000).await.is_err());
        assert_eq!(
            state.read(|m| m.agents.records["agent-1"].missing_since_ms),
            None
        );

        assert!(state.retire_agent("agent-2".into()).await.is_err());
        assert!(!state.read(|m| m.agents.records["agent-2"].retired));
        assert!(
            !state.retire_agent("agent-1".into()).await.unwrap(),
            "not being removed: not retired, nothing written"
        );

        let user = owned_user_id!("@nova-1:ex.org");
        assert!(state.record_deactivated(user.clone(), 1).await.is_err());
        assert!(!state.read(|m| m.is_deactivated(&user)));

        let profile = AppliedProfile {
            displayname: Some("N".into()),
            ..AppliedProfile::default()
        };
        assert!(
            state
                .record_applied_profile(user.clone(), profile.clone(), 1)
                .await
                .is_err()
        );
        assert_eq!(
            state.applied_profile(&user).await.unwrap(),
            AppliedProfile::default(),
            "not cached either"
        );
        let upload = Upload {
            mxc: "mxc://ex.org/u".into(),
            uploaded_ms: 1,
        };
        assert!(
            state
                .record_upload("sha256:ab", upload.clone())
                .await
                .is_err()
        );
        let import = HistoryImport {
            agent_id: "agent-1".into(),
            outcome: "done".into(),
            posted: 2,
            last_posted: None,
            detail: None,
            at_ms: 1,
        };
        let room = owned_room_id!("!r:ex.org");
        assert!(
            state
                .record_history_import(room.clone(), import.clone())
                .await
                .is_err()
        );
        assert_eq!(state.history_import(&room), None);

        // Nothing reached the disk either.
        state.fail_writes(false);
        drop(state);
        let state = reopen(dir.path());
        assert_eq!(state.transaction_count().await.unwrap(), 0);
        assert_eq!(member(&state, "!r:ex.org", "@a:ex.org"), None);
        assert_eq!(member(&state, "!r:ex.org", "@b:ex.org"), None);
        assert!(!state.read(|m| m.is_deactivated(&user)));
        assert_eq!(state.read(|m| m.agents.space.room_id.clone()), None);
        assert_eq!(
            state.read(|m| m.agents.records["agent-1"].applied_name.clone()),
            None
        );

        // And every verb works once the store does.
        state
            .record_transaction("t1".into(), 1, vec![join("@a:ex.org", 1)])
            .await
            .unwrap();
        state
            .record_read(owned_room_id!("!r:ex.org"), joined, 0)
            .await
            .unwrap();
        state.save_agent(record).await.unwrap();
        assert!(state.record_deactivated(user.clone(), 1).await.unwrap());
        assert!(state.retire_agent("agent-2".into()).await.unwrap());
        state
            .record_applied_profile(user.clone(), profile.clone(), 1)
            .await
            .unwrap();
        state
            .record_upload("sha256:ab", upload.clone())
            .await
            .unwrap();
        state
            .record_history_import(room.clone(), import.clone())
            .await
            .unwrap();
        drop(state);
        let state = reopen(dir.path());
        assert_eq!(
            member(&state, "!r:ex.org", "@a:ex.org"),
            Some(Membership::Join)
        );
        assert_eq!(
            member(&state, "!r:ex.org", "@b:ex.org"),
            Some(Membership::Join)
        );
        assert!(state.read(|m| m.is_deactivated(&user)));
        assert!(state.read(|m| m.agents.records["agent-2"].retired));
        assert_eq!(state.applied_profile(&user).await.unwrap(), profile);
        assert_eq!(state.upload("sha256:ab").await.unwrap(), Some(upload));
        assert_eq!(state.history_import(&room), Some(import));
    }

    /// An applied profile that sets the display name only.
    fn named(name: &str) -> AppliedProfile {
        AppliedProfile {
            displayname: Some(name.into()),
            ..AppliedProfile::default()
        }
    }

    /// A caller that stops waiting for its profile write (its job aborted by a revoke)
    /// does not leave the cache behind the store: the next update compares against what
    /// was written.
    #[tokio::test]
    async fn should_keep_the_cache_with_the_store_when_a_profile_writer_is_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let state = reopen(dir.path());
        let user = owned_user_id!("@nova-1:ex.org");
        state
            .record_applied_profile(user.clone(), named("A"), 1)
            .await
            .unwrap();
        assert_eq!(state.applied_profile(&user).await.unwrap(), named("A"));
        let writer = {
            let (state, user) = (state.clone(), user.clone());
            tokio::spawn(async move { state.record_applied_profile(user, named("B"), 2).await })
        };
        // The write is queued (the task waits for its answer); the task is then aborted.
        tokio::task::yield_now().await;
        writer.abort();
        let stored = || {
            let (state, user) = (state.clone(), user.clone());
            async move {
                state
                    .blocking(move |store| store.identity_profile(&user))
                    .await
                    .unwrap()
            }
        };
        for _ in 0..600 {
            if stored().await == Some(named("B")) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(
            stored().await,
            Some(named("B")),
            "the write was carried out"
        );
        assert_eq!(state.applied_profile(&user).await.unwrap(), named("B"));
    }

    /// A store read that began before a profile write committed does not replace what
    /// the writer put in the cache: the next update is compared with the newer profile.
    #[tokio::test]
    async fn should_not_let_an_earlier_store_read_replace_a_written_profile() {
        let dir = tempfile::tempdir().unwrap();
        let state = reopen(dir.path());
        let user = owned_user_id!("@nova-1:ex.org");
        state
            .record_applied_profile(user.clone(), named("B"), 2)
            .await
            .unwrap();
        // What a read that found "A" in the store before the write committed would cache.
        assert_eq!(state.remember_stored_profile(&user, named("A")), named("B"));
        assert_eq!(state.applied_profile(&user).await.unwrap(), named("B"));
    }

    /// Profiles written side by side go to the store in shared commits; each writer hears
    /// back after its own is stored, and every one is there after a reopen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn should_store_every_profile_written_side_by_side() {
        let dir = tempfile::tempdir().unwrap();
        let state = reopen(dir.path());
        let profile = |n: usize| AppliedProfile {
            displayname: Some(format!("User {n}")),
            ..AppliedProfile::default()
        };
        let user = |n: usize| UserId::parse(format!("@nova-{n}:ex.org")).unwrap();
        let writes = (0..300).map(|n| {
            let state = state.clone();
            tokio::spawn(async move { state.record_applied_profile(user(n), profile(n), 1).await })
        });
        for written in futures::future::join_all(writes).await {
            written.unwrap().unwrap();
        }
        drop(state);
        let reopened = reopen(dir.path());
        for n in 0..300 {
            assert_eq!(
                reopened.applied_profile(&user(n)).await.unwrap(),
                profile(n)
            );
        }
    }
}
