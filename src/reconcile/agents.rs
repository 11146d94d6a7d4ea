//! Provisions agent rooms and keeps them converged: runs the planner's actions through the
//! homeserver client, one agent at a time per key, with retries and a loop guard.
//!
//! Contract (kube-runtime style): `reconcile_agent(key)` reads the current model, acts, and
//! returns when to look again; `error_policy` turns a failure into a retry delay or a
//! report. Triggers carry only the agent id, so every run is idempotent.

use std::collections::BTreeSet;
use std::sync::Arc;

use ruma::api::client::room::create_room;
use ruma::events::room::guest_access::{GuestAccess, RoomGuestAccessEventContent};
use ruma::events::room::history_visibility::{
    HistoryVisibility, RoomHistoryVisibilityEventContent,
};
use ruma::events::room::name::RoomNameEventContent;
use ruma::events::space::child::SpaceChildEventContent;
use ruma::events::space::parent::SpaceParentEventContent;
use ruma::events::{EmptyStateKey, InitialStateEvent, StateEventType};
use ruma::room::RoomType;
use ruma::serde::Raw;
use ruma::{OwnedRoomAliasId, OwnedRoomId, OwnedUserId, RoomAliasId, RoomId, UserId};

use super::Outcome;
use crate::Shared;
use crate::appservice::now_ms;
use crate::config::Identities;
use crate::matrix::{Homeserver, MatrixError};
use crate::metrics::{ActionLabels, ResultLabels};
use crate::model::agents::{
    Action, PlanInput, RequiredMember, RoomRecord, plan_agent, plan_removal,
};
use crate::model::{Change, Membership};
use crate::reconcile::identity::IdentityEffects;
use crate::registration::{AGENT_PREFIX, IDENTITY_PREFIX};

/// An action that failed this many runs in a row is reported and left alone until the next
/// sweep, manual sync or pushed change.
pub const MAX_ATTEMPTS: u32 = 5;

/// Re-plans within one run at most this often (create, then join, then name, then space).
const MAX_ROUNDS: usize = 6;

/// The agent-room side of the reconciler.
pub struct Agents {
    shared: Arc<Shared>,
    hs: Homeserver,
    required: Vec<RequiredMember>,
    /// Deactivates removed agents' users, per homeserver flavor (`agents.deactivate_removed`).
    effects: Option<Arc<IdentityEffects>>,
    /// Room versions before 12 need the creator listed at power 100 in a power-level
    /// override; version 12 forbids listing creators (they rank above every level).
    list_creator_power: bool,
}

impl Agents {
    pub fn new(
        shared: Arc<Shared>,
        hs: Homeserver,
        default_room_version: &str,
        effects: Option<Arc<IdentityEffects>>,
    ) -> Agents {
        let required = required_members(&shared.ids);
        let list_creator_power = !room_version_has_implicit_creators(default_room_version);
        Agents {
            shared,
            hs,
            required,
            effects,
            list_creator_power,
        }
    }

    fn agent_user(&self, localpart: &str) -> OwnedUserId {
        UserId::parse_with_server_name(localpart, &self.shared.ids.server_name)
            .expect("agent localparts are valid")
    }

    fn alias(&self, localpart: &str) -> OwnedRoomAliasId {
        RoomAliasId::parse(format!("#{localpart}:{}", self.shared.ids.server_name))
            .expect("agent localparts are valid alias localparts")
    }

    /// Finds the "Letta Agents" space by its alias, creating it once.
    pub async fn ensure_space(&self) -> Result<OwnedRoomId, MatrixError> {
        let agents = &self.shared.config.agents;
        let alias = RoomAliasId::parse(format!(
            "#{}:{}",
            agents.space_alias, self.shared.ids.server_name
        ))
        .expect("validated space alias");
        if let Some(room) = self.hs.resolve_alias(&alias).await? {
            return Ok(room);
        }
        let mut request = create_room::v3::Request::new();
        request.room_alias_name = Some(agents.space_alias.clone());
        request.name = Some(agents.space_name.clone());
        request.preset = Some(create_room::v3::RoomPreset::PrivateChat);
        let mut creation = create_room::v3::CreationContent::new();
        creation.room_type = Some(RoomType::Space);
        request.creation_content = Some(Raw::new(&creation).expect("creation content serializes"));
        match self.hs.create_room(&self.shared.ids.bot, request).await {
            Ok(room) => {
                tracing::info!(space = %room, "created the agents space");
                Ok(room)
            }
            // Another roster (or a lost store) created it meanwhile: use that one.
            Err(e) if is_room_in_use(&e) => self.hs.resolve_alias(&alias).await?.ok_or(e),
            Err(e) => Err(e),
        }
    }

    /// Brings one agent's room to its desired state (or retires it).
    pub async fn reconcile_agent(&self, agent_id: &str) -> Outcome {
        // A room whose state was invalidated is read before anything is decided about it.
        let unknown_room = {
            let model = self.shared.model();
            model
                .agents
                .records
                .get(agent_id)
                .filter(|r| !r.retired)
                .and_then(|r| Some((r.room_id.clone()?, self.agent_user(&r.localpart))))
                .filter(|(room, _)| !model.knows_room(room))
        };
        if let Some((room, agent_user)) = unknown_room
            && let Err(error) = self.read_room(&room, &agent_user).await
        {
            self.count_action("read_room", "error");
            return self.error_policy(agent_id, "read_room", &error);
        }
        for round in 0..MAX_ROUNDS {
            let (actions, record) = {
                let model = self.shared.model();
                let Some(record) = model.agents.records.get(agent_id).cloned() else {
                    return Outcome::Done;
                };
                if record.retired {
                    return Outcome::Done;
                }
                let agent_user = self.agent_user(&record.localpart);
                let space = self.shared.status().space.clone();
                match model
                    .agents
                    .desired
                    .get(agent_id)
                    .filter(|_| !record.removing)
                {
                    Some(agent) => {
                        let plan = plan_agent(&PlanInput {
                            agent,
                            agent_user: &agent_user,
                            bot: &self.shared.ids.bot,
                            record: &record,
                            required: &self.required,
                            space: space.as_deref(),
                            model: &model,
                        });
                        if round == 0 {
                            self.count_cache(agent_id, plan.hits, plan.misses);
                        }
                        self.report_blocked(agent_id, &plan.blocked);
                        (plan.actions, record)
                    }
                    // Not (yet) desired, e.g. before the first good listing: hands off.
                    None if !record.removing => return Outcome::Done,
                    None => {
                        let actions = plan_removal(
                            &record,
                            &agent_user,
                            &self.required,
                            space.as_deref(),
                            &model,
                            self.shared.config.agents.deactivate_removed,
                        );
                        if actions.is_empty() {
                            drop(model);
                            self.retire(agent_id);
                            return Outcome::Done;
                        }
                        (actions, record)
                    }
                }
            };
            if actions.is_empty() {
                self.shared.status_mut().failed.remove(agent_id);
                return Outcome::Done;
            }
            let mut record = record;
            for action in actions {
                let kind = action.kind();
                match self.execute(&mut record, action).await {
                    Ok(()) => self.count_action(kind, "ok"),
                    Err(error) => {
                        self.count_action(kind, "error");
                        return self.error_policy(agent_id, kind, &error);
                    }
                }
            }
        }
        Outcome::Done
    }

    fn retire(&self, agent_id: &str) {
        let record = {
            let mut model = self.shared.model_mut();
            model.agents.retire(agent_id);
            model.agents.records.get(agent_id).cloned()
        };
        if let Some(record) = record {
            self.save(&record);
        }
        tracing::info!(agent = agent_id, "agent removed: room left and unlinked");
    }

    fn error_policy(&self, agent_id: &str, kind: &'static str, error: &MatrixError) -> Outcome {
        let attempts = {
            let mut status = self.shared.status_mut();
            let attempts = status.attempts.entry(agent_id.to_owned()).or_default();
            *attempts += 1;
            *attempts
        };
        if let Some(wait) = error.retry_after() {
            return Outcome::RetryIn(wait);
        }
        if attempts >= MAX_ATTEMPTS {
            let reason = format!("{kind} failed {attempts} times: {error}");
            tracing::warn!(agent = agent_id, %reason, "giving up until the next sweep or sync");
            self.count_action(kind, "gave_up");
            let mut status = self.shared.status_mut();
            status.attempts.remove(agent_id);
            status.failed.insert(agent_id.to_owned(), reason);
            return Outcome::GaveUp;
        }
        tracing::debug!(agent = agent_id, attempts, %error, "{kind} failed; will retry");
        Outcome::RetryIn(super::backoff(attempts))
    }

    async fn execute(&self, record: &mut RoomRecord, action: Action) -> Result<(), MatrixError> {
        match action {
            Action::EnsureRoom {
                alias_localpart,
                name,
            } => self.ensure_room(record, &alias_localpart, &name).await?,
            Action::Invite { room, by, user } => {
                match self.hs.invite(&by, &room, &user).await {
                    Ok(()) => self
                        .shared
                        .model_mut()
                        .expect(&room, &user, Membership::Invite),
                    // Already in the room (the model was behind): the join decides.
                    Err(e) if e.is_forbidden() => {
                        tracing::debug!(%room, %user, error = %e, "invite refused; trying to join")
                    }
                    Err(e) => return Err(e),
                }
                if !self.can_masquerade(&user) {
                    record.invited_external.insert(user);
                    self.save(record);
                }
            }
            Action::Join { room, user } => {
                self.hs.join(&user, &room).await?;
                self.shared
                    .model_mut()
                    .expect(&room, &user, Membership::Join);
            }
            Action::Leave { room, user } => {
                match self.hs.leave(&user, &room).await {
                    Ok(()) => {}
                    Err(e) if e.is_forbidden() || e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
                self.shared
                    .model_mut()
                    .expect(&room, &user, Membership::Leave);
            }
            Action::ApplySettings { room, by } => {
                self.hs
                    .send_state(
                        &by,
                        &room,
                        &EmptyStateKey,
                        &RoomHistoryVisibilityEventContent::new(HistoryVisibility::Shared),
                    )
                    .await?;
                self.hs
                    .send_state(
                        &by,
                        &room,
                        &EmptyStateKey,
                        &RoomGuestAccessEventContent::new(GuestAccess::Forbidden),
                    )
                    .await?;
                record.settings_applied = true;
                self.save(record);
            }
            Action::SetName { room, user, name } => {
                self.hs
                    .send_state(
                        &user,
                        &room,
                        &EmptyStateKey,
                        &RoomNameEventContent::new(name.clone()),
                    )
                    .await?;
                self.hs.set_display_name(&user, &name).await?;
                record.applied_name = Some(name);
                self.save(record);
            }
            Action::LinkSpace { room, space, by } => {
                let via = vec![self.shared.ids.server_name.clone()];
                self.hs
                    .send_state(
                        &self.shared.ids.bot,
                        &space,
                        room.as_str(),
                        &SpaceChildEventContent::new(via.clone()),
                    )
                    .await?;
                let mut parent = SpaceParentEventContent::new(via);
                parent.canonical = true;
                self.hs
                    .send_state(&by, &room, space.as_str(), &parent)
                    .await?;
                record.space_linked = true;
                self.save(record);
            }
            Action::Deactivate { user } => match &self.effects {
                Some(effects) => {
                    effects.deactivate_agent_user(&user).await?;
                    tracing::info!(%user, "deactivated the removed agent's user");
                }
                None => {
                    return Err(MatrixError::Request {
                        endpoint: "deactivate",
                        message: "the homeserver flavor is unknown; see the start-up log".into(),
                    });
                }
            },
            Action::UnlinkSpace { room, space } => {
                self.hs
                    .send_raw_state(
                        &self.shared.ids.bot,
                        &space,
                        &StateEventType::SpaceChild.to_string(),
                        room.as_str(),
                        serde_json::json!({}),
                    )
                    .await?;
                record.space_linked = false;
                self.save(record);
            }
        }
        Ok(())
    }

    /// Finds the room by its alias (the homeserver is the truth), else creates it.
    async fn ensure_room(
        &self,
        record: &mut RoomRecord,
        localpart: &str,
        name: &str,
    ) -> Result<(), MatrixError> {
        let agent_user = self.agent_user(localpart);
        let created_user = self.hs.register(localpart).await? == crate::matrix::Registered::Created;
        let alias = self.alias(localpart);
        if let Some(room) = self.hs.resolve_alias(&alias).await? {
            tracing::info!(agent = %record.agent_id, %room, "found the agent room by its alias");
            self.read_room(&room, &agent_user).await?;
            record.room_id = Some(room);
        } else {
            let room = match self
                .hs
                .create_room(&agent_user, self.room_request(localpart, name, &agent_user))
                .await
            {
                Ok(room) => room,
                Err(e) if is_room_in_use(&e) => self.hs.resolve_alias(&alias).await?.ok_or(e)?,
                Err(e) => return Err(e),
            };
            tracing::info!(agent = %record.agent_id, %room, "created the agent room");
            {
                let mut model = self.shared.model_mut();
                model.expect(&room, &agent_user, Membership::Join);
                for required in &self.required {
                    model.expect(&room, &required.user, Membership::Invite);
                }
            }
            record.invited_external.extend(
                self.required
                    .iter()
                    .filter(|r| !r.masquerade)
                    .map(|r| r.user.clone()),
            );
            if created_user {
                self.hs.set_display_name(&agent_user, name).await?;
                record.applied_name = Some(name.to_owned());
            }
            record.settings_applied = true;
            record.room_id = Some(room);
        }
        self.shared.model_mut().agents.update(record.clone());
        self.save(record);
        Ok(())
    }

    fn room_request(
        &self,
        localpart: &str,
        name: &str,
        agent_user: &UserId,
    ) -> create_room::v3::Request {
        let mut request = create_room::v3::Request::new();
        request.room_alias_name = Some(localpart.to_owned());
        request.name = Some(name.to_owned());
        request.topic = Some(format!("Letta agent {name}"));
        request.preset = Some(create_room::v3::RoomPreset::PrivateChat);
        request.invite = self.required.iter().map(|r| r.user.clone()).collect();
        request.initial_state = vec![
            InitialStateEvent::with_empty_state_key(RoomHistoryVisibilityEventContent::new(
                HistoryVisibility::Shared,
            ))
            .to_raw_any(),
            InitialStateEvent::with_empty_state_key(RoomGuestAccessEventContent::new(
                GuestAccess::Forbidden,
            ))
            .to_raw_any(),
        ];
        let mut users = serde_json::Map::new();
        if self.list_creator_power {
            users.insert(agent_user.to_string(), 100.into());
        }
        for required in &self.required {
            users.insert(required.user.to_string(), 50.into());
        }
        let power = serde_json::json!({ "users": users });
        request.power_level_content_override = Some(Raw::from_json(
            serde_json::value::to_raw_value(&power).expect("power levels serialize"),
        ));
        request
    }

    /// Reads who is joined to `room` and corrects the model; returns the drift found.
    ///
    /// Reads as the agent (always a member); falls back to the bot.
    pub async fn read_room(
        &self,
        room: &RoomId,
        agent_user: &UserId,
    ) -> Result<usize, MatrixError> {
        let joined = match self.hs.joined_members(agent_user, room).await {
            Ok(joined) => joined,
            Err(e) if e.is_forbidden() => {
                self.hs.joined_members(&self.shared.ids.bot, room).await?
            }
            Err(e) => return Err(e),
        };
        let joined: Vec<_> = joined
            .into_iter()
            .map(|(user, m)| (user, m.displayname, m.avatar_url))
            .collect();
        let changes: Vec<Change> = {
            let mut model = self.shared.model_mut();
            let changes = model.observe_joined(room, &joined, now_ms());
            model.commit(changes.clone());
            changes
        };
        if !changes.is_empty() {
            let store_changes = changes.clone();
            let shared = self.shared.clone();
            let _ = tokio::task::spawn_blocking(move || {
                shared.store.record_member_changes(&store_changes)
            })
            .await
            .map_err(|e| tracing::warn!(error = %e, "recording a read panicked"))
            .map(|r| r.map_err(|e| tracing::warn!(error = %e, "cannot record a read")));
            for change in &changes {
                tracing::info!(
                    %room,
                    user = %change.user_id,
                    now = change.state.membership.as_str(),
                    "drift: the homeserver disagrees with the model"
                );
            }
        }
        Ok(changes.len())
    }

    /// Reads every managed room (or those of `only`) and schedules the ones that drifted.
    /// Returns (rooms read, drift found).
    pub async fn sweep(&self, only: Option<&BTreeSet<String>>) -> (usize, usize) {
        let targets: Vec<(String, OwnedRoomId, OwnedUserId)> = {
            let model = self.shared.model();
            model
                .agents
                .live_records(only)
                .filter_map(|r| {
                    Some((
                        r.agent_id.clone(),
                        r.room_id.clone()?,
                        self.agent_user(&r.localpart),
                    ))
                })
                .collect()
        };
        let mut drift = 0;
        for (agent_id, room, agent_user) in &targets {
            match self.read_room(room, agent_user).await {
                Ok(0) => {}
                Ok(n) => {
                    drift += n;
                    self.shared.queue.schedule(agent_id);
                }
                Err(e) => {
                    // Unknown state: forget the cached room so the next run starts afresh.
                    tracing::warn!(agent = %agent_id, %room, error = %e, "cannot read room; invalidating it");
                    self.shared.model_mut().forget_room(room);
                    self.shared.queue.schedule(agent_id);
                }
            }
        }
        (targets.len(), drift)
    }

    fn can_masquerade(&self, user: &UserId) -> bool {
        in_namespace(&self.shared.ids, user)
    }

    fn save(&self, record: &RoomRecord) {
        self.shared.model_mut().agents.update(record.clone());
        if let Err(e) = self.shared.store.save_room_record(record) {
            tracing::warn!(agent = %record.agent_id, error = %e, "cannot save room record");
        }
    }

    fn count_cache(&self, agent_id: &str, hits: u32, misses: u32) {
        let metrics = &self.shared.metrics;
        if hits > 0 {
            tracing::debug!(
                agent = agent_id,
                hits,
                "model shows members in place; no action"
            );
            metrics
                .membership_cache
                .get_or_create(&ResultLabels { result: "hit" })
                .inc_by(hits.into());
        }
        if misses > 0 {
            metrics
                .membership_cache
                .get_or_create(&ResultLabels { result: "miss" })
                .inc_by(misses.into());
        }
    }

    fn count_action(&self, kind: &'static str, outcome: &'static str) {
        self.shared
            .metrics
            .actions
            .get_or_create(&ActionLabels { kind, outcome })
            .inc();
        if outcome == "ok" {
            self.shared.status_mut().actions_ok += 1;
        }
    }

    fn report_blocked(&self, agent_id: &str, blocked: &[(OwnedUserId, &'static str)]) {
        let mut status = self.shared.status_mut();
        if blocked.is_empty() {
            status.blocked.remove(agent_id);
            return;
        }
        let now: Vec<String> = blocked
            .iter()
            .map(|(u, why)| format!("{u} ({why})"))
            .collect();
        if status.blocked.get(agent_id) != Some(&now) {
            tracing::warn!(agent = agent_id, members = ?now, "required members roster will not touch");
            for _ in blocked {
                self.shared
                    .metrics
                    .actions
                    .get_or_create(&ActionLabels {
                        kind: "join",
                        outcome: "blocked",
                    })
                    .inc();
            }
            status.blocked.insert(agent_id.to_owned(), now);
        }
    }
}

fn is_room_in_use(error: &MatrixError) -> bool {
    matches!(error.kind(), Some(ruma::api::error::ErrorKind::RoomInUse))
}

/// Whether the registration lets roster act as `user` (bot, agents, identities, or a
/// configured required member on this server).
fn in_namespace(ids: &Identities, user: &UserId) -> bool {
    let local = user.localpart();
    user.server_name() == ids.server_name
        && (user == ids.bot
            || local.starts_with(AGENT_PREFIX)
            || local.starts_with(IDENTITY_PREFIX)
            || ids.required_members.iter().any(|m| m == user))
}

/// The members every agent room needs, and which of them roster can act as.
pub fn required_members(ids: &Identities) -> Vec<RequiredMember> {
    ids.required_members
        .iter()
        .map(|user| RequiredMember {
            user: user.clone(),
            masquerade: in_namespace(ids, user),
        })
        .collect()
}

/// Room version 12 (and the hydra preview) make creators rank above power levels.
fn room_version_has_implicit_creators(version: &str) -> bool {
    version == "org.matrix.hydra.11" || version.parse::<u32>().is_ok_and(|v| v >= 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_know_which_room_versions_rank_creators_implicitly() {
        assert!(room_version_has_implicit_creators("12"));
        assert!(room_version_has_implicit_creators("org.matrix.hydra.11"));
        assert!(!room_version_has_implicit_creators("10"));
        assert!(!room_version_has_implicit_creators("11"));
    }
}
