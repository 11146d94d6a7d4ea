//! Provisions agent rooms and keeps them converged: runs the planner's actions through the
//! homeserver client, one agent at a time per key, and records what it did through `state`.
//!
//! Contract (kube-runtime style): `reconcile_agent(key)` reads the current model, acts, and
//! returns an [`Outcome`]; the controller's error policy turns a failure into a retry delay
//! or a report. Triggers carry only the agent id, so every run is idempotent.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use ruma::api::client::room::create_room;
use ruma::events::room::guest_access::{GuestAccess, RoomGuestAccessEventContent};
use ruma::events::room::history_visibility::{
    HistoryVisibility, RoomHistoryVisibilityEventContent,
};
use ruma::events::room::name::RoomNameEventContent;
use ruma::events::room::topic::RoomTopicEventContent;
use ruma::events::space::child::SpaceChildEventContent;
use ruma::events::space::parent::SpaceParentEventContent;
use ruma::events::{InitialStateEvent, StateEventType};
use ruma::room::RoomType;
use ruma::serde::Raw;
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};

use crate::Shared;
use crate::config::AvatarSetting;
use crate::fetch::{AvatarFetcher, Reach, redact_url};
use crate::ids::Identities;
use crate::lifecycle::effects::IdentityEffects;
use crate::matrix::{Homeserver, MatrixError};
use crate::metrics::{ActionLabels, OutcomeLabels, ResultLabels};
use crate::model::agents::{
    Action, Agent, AppliedAvatar, AvatarWant, HistoryMessage, HistoryRole, PlanInput,
    RequiredMember, RoomRecord, SpaceRecord, plan_agent, plan_removal, plan_space, topic_for,
};
use crate::model::{Membership, ObservedMember};
use crate::reconcile::ListAgents;
use crate::reconcile::queue::Key;
use crate::retry::Outcome;
use crate::state::StateError;
use crate::store::{HistoryImport, Upload};

/// What a sweep read and found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepSummary {
    pub rooms_read: usize,
    pub rooms_drifted: usize,
    /// Member states the reads corrected.
    pub changes: usize,
}

/// Re-plans within one run at most this often (create, then join, then name, then space).
const MAX_ROUNDS: usize = 6;

/// Why one action failed.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error(transparent)]
    Homeserver(#[from] MatrixError),
    /// The homeserver did it, roster could not record it: the next run does it again
    /// (every action is idempotent).
    #[error("done on the homeserver, but not recorded: {0}")]
    Store(#[from] StateError),
}

impl ActionError {
    /// Retry or report: a store failure is worth retrying, a homeserver error as it is.
    fn outcome(&self) -> Outcome {
        match self {
            ActionError::Homeserver(e) => Outcome::from_error(e),
            ActionError::Store(e) => Outcome::Retry {
                reason: format!("done on the homeserver, but not recorded: {e}"),
                retry_after: None,
            },
        }
    }
}

/// Reads who is joined to `room`, as `first` (normally the agent, always a member), else
/// as the bot. The one read the reconciler and the offline commands share.
pub async fn read_joined(
    hs: &Homeserver,
    room: &RoomId,
    first: &UserId,
    bot: &UserId,
) -> Result<Vec<ObservedMember>, MatrixError> {
    let joined = match hs.joined_members(first, room).await {
        Ok(joined) => joined,
        Err(e) if e.is_forbidden() && first != bot => hs.joined_members(bot, room).await?,
        Err(e) => return Err(e),
    };
    Ok(joined
        .into_iter()
        .map(|(user, m)| ObservedMember {
            user,
            displayname: m.displayname,
            avatar_url: m.avatar_url,
        })
        .collect())
}

/// The picture `agent` should have under `setting` (`agents.avatar`).
pub fn avatar_for(setting: &AvatarSetting, agent: &Agent) -> Option<AvatarWant> {
    match setting {
        AvatarSetting::Generated => Some(AvatarWant::Generated {
            look: crate::avatar::look(&agent.id, &agent.name),
        }),
        AvatarSetting::None => None,
        AvatarSetting::Image(url) => Some(AvatarWant::Image { url: url.clone() }),
    }
}

/// The members every agent room needs, and which of them roster can act as.
pub fn required_members(ids: &Identities) -> Vec<RequiredMember> {
    ids.required_members
        .iter()
        .map(|user| RequiredMember {
            user: user.clone(),
            masquerade: ids.can_act_as(user),
        })
        .collect()
}

/// The agent-room side of the reconciler.
pub struct Agents {
    shared: Arc<Shared>,
    hs: Homeserver,
    required: Vec<RequiredMember>,
    /// Deactivates removed agents' users, per homeserver flavor (`agents.deactivate_removed`).
    effects: Option<Arc<IdentityEffects>>,
    /// Where agents' history comes from (`agents.history_import`).
    history: Option<Arc<dyn ListAgents>>,
    /// Room versions before 12 need the creator listed at power 100 in a power-level
    /// override; version 12 forbids listing creators (they rank above every level).
    list_creator_power: bool,
    /// Fetches an `https://` `agents.avatar` (with the lifecycle avatar bounds).
    images: AvatarFetcher,
    /// When fetching that image last failed: no agent tries again for a while, so a sweep
    /// does not wait out one timeout per agent.
    image_failed_at: std::sync::Mutex<Option<Instant>>,
}

/// How long after a failed `agents.avatar` fetch no agent fetches it again.
const IMAGE_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The longest history message posted; longer ones are cut with an ellipsis.
const MAX_HISTORY_CHARS: usize = 4000;

impl Agents {
    pub fn new(
        shared: Arc<Shared>,
        hs: Homeserver,
        default_room_version: &str,
        effects: Option<Arc<IdentityEffects>>,
        history: Option<Arc<dyn ListAgents>>,
    ) -> Agents {
        let required = required_members(shared.config.ids());
        let list_creator_power = !room_version_has_implicit_creators(default_room_version);
        let lifecycle = &shared.config.lifecycle;
        // agents.avatar is the operator's own URL: it may point inside the network.
        let images = AvatarFetcher::new(
            lifecycle.avatar_fetch_timeout,
            lifecycle.avatar_max_bytes,
            Reach::Any,
        );
        Agents {
            shared,
            hs,
            required,
            effects,
            history,
            list_creator_power,
            images,
            image_failed_at: std::sync::Mutex::new(None),
        }
    }

    fn avatar_for(&self, agent: &Agent) -> Option<AvatarWant> {
        avatar_for(&self.shared.config.agents.avatar, agent)
    }

    fn ids(&self) -> &Identities {
        self.shared.config.ids()
    }

    /// Finds the "Letta Agents" space by its alias, creating it once.
    pub async fn ensure_space(&self) -> Result<OwnedRoomId, MatrixError> {
        let alias = &self.ids().space_alias;
        if let Some(room) = self.hs.resolve_alias(alias).await? {
            return Ok(room);
        }
        let agents = &self.shared.config.agents;
        let mut request = create_room::v3::Request::new();
        request.room_alias_name = Some(alias.alias().to_owned());
        request.name = Some(agents.space_name.clone());
        request.preset = Some(create_room::v3::RoomPreset::PrivateChat);
        let mut creation = create_room::v3::CreationContent::new();
        creation.room_type = Some(RoomType::Space);
        request.creation_content = Some(Raw::new(&creation).expect("creation content serializes"));
        match self.hs.create_room(&self.ids().bot, request).await {
            Ok(room) => {
                tracing::info!(space = %room, "created the agents space");
                Ok(room)
            }
            // Another roster (or a lost store) created it meanwhile: use that one.
            Err(e) if is_room_in_use(&e) => self.hs.resolve_alias(alias).await?.ok_or(e),
            Err(e) => Err(e),
        }
    }

    /// Brings the room `key` names to its desired state.
    pub async fn reconcile(&self, key: &Key) -> Outcome {
        match key {
            Key::Agent(id) => self.reconcile_agent(id).await,
            Key::Space => self.reconcile_space().await,
        }
    }

    /// Brings the space's required members in, like in an agent room.
    pub async fn reconcile_space(&self) -> Outcome {
        let space = self.shared.state.read(|m| m.agents.space.clone());
        let Some(room) = space.room_id.clone() else {
            return Outcome::Done(());
        };
        if !self.shared.state.read(|m| m.knows_room(&room)) {
            let bot = self.ids().bot.clone();
            if let Err(error) = self.read_room(&room, &bot).await {
                self.count_action("read_room", "error");
                return error.outcome();
            }
        }
        for round in 0..MAX_ROUNDS {
            let plan = self
                .shared
                .state
                .read(|model| plan_space(&room, &space, &self.ids().bot, &self.required, model));
            if round == 0 {
                self.count_cache("(space)", plan.hits, plan.misses);
            }
            self.report_blocked("(space)", &plan.blocked);
            if plan.actions.is_empty() {
                return Outcome::Done(());
            }
            let mut record = self.shared.state.read(|m| m.agents.space.clone());
            for action in plan.actions {
                let kind = action.kind();
                match self.execute_in_space(&mut record, action).await {
                    Ok(()) => self.count_action(kind, "ok"),
                    Err(error) => {
                        self.count_action(kind, "error");
                        return error.outcome();
                    }
                }
            }
        }
        Outcome::Done(())
    }

    /// Takes one membership action in the space.
    async fn execute_in_space(
        &self,
        record: &mut SpaceRecord,
        action: Action,
    ) -> Result<(), ActionError> {
        match action {
            Action::Invite { room, by, user } => {
                if self.invite(&room, &by, &user).await? {
                    record.invited_external.insert(user);
                    self.shared.state.save_space(record.clone()).await?;
                }
            }
            Action::Join { room, user } => self.join(&room, &user).await?,
            other => unreachable!("the space plan has only invites and joins: {other:?}"),
        }
        Ok(())
    }

    /// Invites `user` as `by`. An invite refused because the model was behind (the user is
    /// in already) is fine: the join decides. Returns whether roster cannot act as the user,
    /// who is then invited once and never again (the caller records it).
    async fn invite(&self, room: &RoomId, by: &UserId, user: &UserId) -> Result<bool, ActionError> {
        match self.hs.invite(by, room, user).await {
            Ok(()) => self.shared.state.expect(room, user, Membership::Invite),
            Err(e) if e.is_forbidden() => {
                tracing::debug!(%room, %user, error = %e, "invite refused; trying to join")
            }
            Err(e) => return Err(e.into()),
        }
        Ok(!self.ids().can_act_as(user))
    }

    async fn join(&self, room: &RoomId, user: &UserId) -> Result<(), ActionError> {
        match self.hs.join(user, room).await {
            Ok(()) => {
                self.shared.state.expect(room, user, Membership::Join);
                Ok(())
            }
            Err(e) if e.is_forbidden() => {
                // The model may hold an invite the homeserver no longer has (its rejection
                // or revocation never pushed): the retry reads the room, then invites again.
                self.shared.state.forget_room(room);
                Err(e.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Brings one agent's room to its desired state (or retires it).
    pub async fn reconcile_agent(&self, agent_id: &str) -> Outcome {
        // A room whose state was invalidated is read before anything is decided about it.
        let unknown_room = self.shared.state.read(|model| {
            model
                .agents
                .records
                .get(agent_id)
                .filter(|r| !r.retired)
                .and_then(|r| Some((r.room_id.clone()?, self.ids().agent_user(&r.localpart))))
                .filter(|(room, _)| !model.knows_room(room))
        });
        if let Some((room, agent_user)) = unknown_room
            && let Err(error) = self.read_room(&room, &agent_user).await
        {
            self.count_action("read_room", "error");
            let shut_out = matches!(&error, ActionError::Homeserver(e) if e.is_forbidden() || e.is_not_found());
            if !shut_out {
                return error.outcome();
            }
            match self.follow_alias(agent_id, &room).await {
                Ok(true) => {}
                Ok(false) => return error.outcome(),
                Err(error) => return error.outcome(),
            }
        }
        for round in 0..MAX_ROUNDS {
            let Some((actions, record)) = self.plan(agent_id, round == 0) else {
                return Outcome::Done(());
            };
            if actions.is_empty() {
                if record.removing {
                    match self.shared.state.retire_agent(agent_id.to_owned()).await {
                        Ok(true) => {
                            tracing::info!(
                                agent = agent_id,
                                "agent removed: room left and unlinked"
                            )
                        }
                        Ok(false) => continue,
                        Err(e) => return ActionError::from(e).outcome(),
                    }
                }
                return Outcome::Done(());
            }
            let removal = record.removing;
            let mut record = record;
            for action in actions {
                // The listing may bring the agent back while its removal runs: nothing more
                // of the removal (a deactivation cannot be undone); plan again.
                if removal && !self.still_removing(agent_id) {
                    tracing::info!(agent = agent_id, "agent listed again; its removal stops");
                    break;
                }
                let kind = action.kind();
                match self.execute(&mut record, action).await {
                    Ok(()) => self.count_action(kind, "ok"),
                    Err(error) => {
                        self.count_action(kind, "error");
                        tracing::debug!(agent = agent_id, kind, %error, "action failed");
                        return error.outcome();
                    }
                }
            }
        }
        Outcome::Done(())
    }

    fn still_removing(&self, agent_id: &str) -> bool {
        self.shared
            .state
            .read(|m| m.agents.records.get(agent_id).is_some_and(|r| r.removing))
    }

    /// Neither the agent nor the bot can read `room`: if the agent's alias no longer points
    /// to it (the room was deleted, which removes its aliases, or the alias was moved), the
    /// record follows the alias: to the room it points to now, or to none, so the next
    /// plan creates the room again. Returns whether the record changed.
    async fn follow_alias(&self, agent_id: &str, room: &RoomId) -> Result<bool, ActionError> {
        let Some(mut record) = self
            .shared
            .state
            .read(|m| m.agents.records.get(agent_id).cloned())
        else {
            return Ok(false);
        };
        let alias = self.ids().agent_alias(&record.localpart);
        let now = self.hs.resolve_alias(&alias).await?;
        if now.as_deref() == Some(room) {
            return Ok(false);
        }
        tracing::warn!(
            agent = agent_id,
            %room,
            now = ?now,
            "the agent's room is gone (deleted, or its alias moved); following the alias"
        );
        record.room_id = now;
        record.settings_applied = false;
        record.applied_topic = None;
        record.space_linked = false;
        record.space_parent_set = false;
        record.invited_external.clear();
        record.history_pending = false;
        self.shared.state.save_agent(record).await?;
        Ok(true)
    }

    /// The actions the agent's room needs now, and its record; `None` when there is
    /// nothing to look after (unknown, retired, or not desired yet).
    fn plan(&self, agent_id: &str, count_cache: bool) -> Option<(Vec<Action>, RoomRecord)> {
        let space = self.shared.state.read(|m| m.agents.space.room_id.clone());
        let (actions, record, blocked, hits, misses) = self.shared.state.read(|model| {
            let record = model.agents.records.get(agent_id).filter(|r| !r.retired)?;
            let agent_user = self.ids().agent_user(&record.localpart);
            match model
                .agents
                .desired
                .get(agent_id)
                .filter(|_| !record.removing)
            {
                Some(agent) => {
                    let avatar = self.avatar_for(agent);
                    let plan = plan_agent(&PlanInput {
                        agent,
                        agent_user: &agent_user,
                        bot: &self.ids().bot,
                        record,
                        required: &self.required,
                        space: space.as_deref(),
                        avatar: avatar.as_ref(),
                        model,
                    });
                    Some((
                        plan.actions,
                        record.clone(),
                        plan.blocked,
                        plan.hits,
                        plan.misses,
                    ))
                }
                // Not (yet) desired, e.g. before the first good listing: hands off.
                None if !record.removing => None,
                None => {
                    let actions = plan_removal(
                        record,
                        &agent_user,
                        &self.required,
                        space.as_deref(),
                        model,
                        self.shared.config.agents.deactivate_removed,
                    );
                    Some((actions, record.clone(), Vec::new(), 0, 0))
                }
            }
        })?;
        if count_cache {
            self.count_cache(agent_id, hits, misses);
        }
        self.report_blocked(agent_id, &blocked);
        Some((actions, record))
    }

    /// Takes one action and records what it changed.
    pub async fn execute(
        &self,
        record: &mut RoomRecord,
        action: Action,
    ) -> Result<(), ActionError> {
        let state = &self.shared.state;
        match action {
            Action::EnsureRoom {
                alias_localpart,
                name,
                avatar,
            } => {
                self.ensure_room(record, &alias_localpart, &name, avatar)
                    .await?
            }
            Action::Invite { room, by, user } => {
                if self.invite(&room, &by, &user).await? {
                    record.invited_external.insert(user);
                    state.save_agent(record.clone()).await?;
                }
            }
            Action::Join { room, user } => self.join(&room, &user).await?,
            Action::Leave { room, user } => {
                match self.hs.leave(&user, &room).await {
                    Ok(()) => {}
                    Err(e) if e.is_forbidden() || e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
                state.expect(&room, &user, Membership::Leave);
            }
            Action::ApplySettings { room, by } => {
                self.hs
                    .set_room_state(
                        &by,
                        &room,
                        &RoomHistoryVisibilityEventContent::new(HistoryVisibility::Shared),
                    )
                    .await?;
                self.hs
                    .set_room_state(
                        &by,
                        &room,
                        &RoomGuestAccessEventContent::new(GuestAccess::Forbidden),
                    )
                    .await?;
                record.settings_applied = true;
                state.save_agent(record.clone()).await?;
            }
            Action::SetName { room, user, name } => {
                self.hs
                    .set_room_state(&user, &room, &RoomNameEventContent::new(name.clone()))
                    .await?;
                self.hs.set_display_name(&user, &name).await?;
                record.applied_name = Some(name);
                state.save_agent(record.clone()).await?;
            }
            Action::SetTopic { room, by, topic } => {
                self.hs
                    .set_room_state(&by, &room, &RoomTopicEventContent::new(topic.clone()))
                    .await?;
                record.applied_topic = Some(topic);
                state.save_agent(record.clone()).await?;
            }
            Action::SetAvatar {
                user,
                want,
                replaces,
            } => {
                self.set_avatar(record, &user, want, replaces, false)
                    .await?
            }
            Action::LinkSpace {
                room,
                space,
                by,
                parent,
            } => {
                let via = vec![self.ids().server_name.clone()];
                self.hs
                    .send_state(
                        &self.ids().bot,
                        &space,
                        room.as_str(),
                        &SpaceChildEventContent::new(via.clone()),
                    )
                    .await?;
                if parent {
                    self.hs
                        .send_state(&by, &room, space.as_str(), &space_parent(via))
                        .await?;
                }
                record.space_linked = true;
                record.space_parent_set = true;
                state.save_agent(record.clone()).await?;
            }
            Action::ImportHistory { room, user } => {
                self.import_history(record, &room, &user).await?
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
                    }
                    .into());
                }
            },
            Action::UnlinkSpace { room, space } => {
                self.hs
                    .send_raw_state(
                        &self.ids().bot,
                        &space,
                        &StateEventType::SpaceChild.to_string(),
                        room.as_str(),
                        serde_json::json!({}),
                    )
                    .await?;
                record.space_linked = false;
                state.save_agent(record.clone()).await?;
            }
        }
        Ok(())
    }

    /// Creates the agent's room, or finds it by its alias (the homeserver is the truth).
    ///
    /// The cheap order: the user is registered and given its name and picture before any
    /// room exists (no member events to rewrite), then one `createRoom` carries the name,
    /// topic, settings, space parent, power levels and invites. The alias makes it safe:
    /// when the room exists (a lost store), `createRoom` is refused with `M_ROOM_IN_USE`
    /// before creating anything, and the room is found by its alias instead.
    async fn ensure_room(
        &self,
        record: &mut RoomRecord,
        localpart: &str,
        name: &str,
        avatar: Option<AvatarWant>,
    ) -> Result<(), ActionError> {
        let agent_user = self.ids().agent_user(localpart);
        let created_user = self.hs.register(localpart).await? == crate::matrix::Registered::Created;
        if created_user {
            self.hs.set_display_name(&agent_user, name).await?;
            record.applied_name = Some(name.to_owned());
            if let Some(want) = avatar {
                self.set_avatar(record, &agent_user, want, None, true)
                    .await?;
            }
        }
        let space = self.shared.state.read(|m| m.agents.space.room_id.clone());
        let request = self.room_request(localpart, name, &agent_user, space.as_deref());
        if !record.create_sent {
            record.create_sent = true;
            self.shared.state.save_agent(record.clone()).await?;
        }
        let imports_history = self.history.as_ref().is_some_and(|h| h.keeps_history())
            && self.shared.config.agents.history_import > 0;
        match self.hs.create_room(&agent_user, request).await {
            Ok(room) => {
                tracing::info!(agent = %record.agent_id, %room, "created the agent room");
                let state = &self.shared.state;
                state.expect(&room, &agent_user, Membership::Join);
                for required in &self.required {
                    state.expect(&room, &required.user, Membership::Invite);
                }
                record.invited_external.extend(
                    self.required
                        .iter()
                        .filter(|r| !r.masquerade)
                        .map(|r| r.user.clone()),
                );
                record.applied_topic = Some(topic_for(name));
                record.settings_applied = true;
                record.space_parent_set = space.is_some();
                record.history_pending = imports_history;
                record.room_id = Some(room);
            }
            Err(e) if is_room_in_use(&e) => {
                let alias = self.ids().agent_alias(localpart);
                let room = self.hs.resolve_alias(&alias).await?.ok_or(e)?;
                tracing::info!(agent = %record.agent_id, %room, "found the agent room by its alias");
                self.read_room(&room, &agent_user).await?;
                // Made by the createRoom whose answer was lost: nothing was imported into
                // it yet. Otherwise (a lost store) it may hold its history already.
                record.history_pending = record.create_sent && imports_history;
                record.room_id = Some(room);
            }
            Err(e) => return Err(e.into()),
        }
        record.create_sent = false;
        self.shared.state.save_agent(record.clone()).await?;
        Ok(())
    }

    /// Sets `want` as `user`'s avatar, uploading each distinct image once. Unless the user
    /// was just created, first checks the avatar it has: one roster did not set (`replaces`,
    /// or none at all) is a person's choice and is left alone for good.
    async fn set_avatar(
        &self,
        record: &mut RoomRecord,
        user: &UserId,
        want: AvatarWant,
        replaces: Option<String>,
        fresh_user: bool,
    ) -> Result<(), ActionError> {
        if self.image_unavailable(&want).await? {
            // Nothing to set: ask the homeserver nothing about it either.
            return Ok(());
        }
        if !fresh_user {
            let current = self.hs.avatar_url(user).await?;
            if current.is_some() && current != replaces {
                tracing::info!(%user, "the agent's avatar was set by hand; leaving it");
                self.count_avatar("left_alone");
                record.avatar_hand_set = true;
                self.shared.state.save_agent(record.clone()).await?;
                return Ok(());
            }
        }
        let Some(mxc) = self.avatar_mxc(&want).await? else {
            return Ok(());
        };
        self.hs
            .set_avatar_url(user, ruma::OwnedMxcUri::from(mxc.as_str()))
            .await?;
        self.count_avatar("set");
        record.avatar = Some(AppliedAvatar { want, mxc });
        self.shared.state.save_agent(record.clone()).await?;
        Ok(())
    }

    /// The `mxc://` of `want`: uploaded once per distinct image (by content hash, or by URL),
    /// remembered in the store. None when an `https://` image cannot be fetched now: the
    /// agent goes without an avatar until a later run can (it never blocks the room).
    async fn avatar_mxc(&self, want: &AvatarWant) -> Result<Option<String>, ActionError> {
        let (source, image) = match want {
            AvatarWant::Image { url } if url.starts_with("mxc://") => return Ok(Some(url.clone())),
            AvatarWant::Image { url } => (crate::avatar::url_key(url), None),
            AvatarWant::Generated { look } => {
                let png = crate::avatar::render(*look);
                (
                    format!("sha256:{}", crate::avatar::content_hash(&png)),
                    Some(png),
                )
            }
        };
        if let Some(known) = self.shared.state.upload(&source).await? {
            self.count_avatar("reused");
            return Ok(Some(known.mxc));
        }
        let (bytes, content_type, filename) = match image {
            Some(png) => (png, "image/png", "avatar.png".to_owned()),
            None => {
                let AvatarWant::Image { url } = want else {
                    unreachable!("only images are fetched")
                };
                match self.fetch_image(url).await {
                    Some(image) => (
                        image.bytes,
                        image.content_type,
                        image.filename.unwrap_or_else(|| "avatar".to_owned()),
                    ),
                    None => return Ok(None),
                }
            }
        };
        let mxc = self
            .hs
            .upload(&self.ids().bot, content_type, Some(filename), bytes)
            .await?
            .to_string();
        self.shared
            .state
            .record_upload(
                &source,
                Upload {
                    mxc: mxc.clone(),
                    uploaded_ms: crate::clock::now_ms(),
                },
            )
            .await?;
        self.count_avatar("uploaded");
        Ok(Some(mxc))
    }

    /// Whether `want` is an `https://` image never uploaded whose fetch failed within the
    /// quiet period: roster cannot have it now.
    async fn image_unavailable(&self, want: &AvatarWant) -> Result<bool, ActionError> {
        let AvatarWant::Image { url } = want else {
            return Ok(false);
        };
        if url.starts_with("mxc://") || !self.image_recently_failed() {
            return Ok(false);
        }
        Ok(self
            .shared
            .state
            .upload(&crate::avatar::url_key(url))
            .await?
            .is_none())
    }

    fn image_recently_failed(&self) -> bool {
        self.image_failed_at
            .lock()
            .unwrap()
            .is_some_and(|at| at.elapsed() < IMAGE_RETRY_AFTER)
    }

    /// Fetches the `https://` image of `agents.avatar`; a failure is logged and counted
    /// once per quiet period, and none is retried before it has passed.
    async fn fetch_image(&self, url: &str) -> Option<crate::fetch::Avatar> {
        if self.image_recently_failed() {
            return None;
        }
        match self.images.fetch(url).await {
            Ok(image) => Some(image),
            Err(error) => {
                *self.image_failed_at.lock().unwrap() = Some(Instant::now());
                self.count_avatar("fetch_failed");
                tracing::warn!(
                    url = %redact_url(url),
                    %error,
                    "cannot fetch agents.avatar; agents go without it and roster tries again in a minute"
                );
                None
            }
        }
    }

    /// Posts the agent's last messages into the room roster created, once. Each message's
    /// transaction id is its source id, and progress is recorded after every message, so a
    /// retry or a restart goes on after the last one posted and posts nothing twice. A
    /// source error leaves the room without history and shows in status; it never blocks
    /// the room.
    async fn import_history(
        &self,
        record: &mut RoomRecord,
        room: &RoomId,
        agent_user: &UserId,
    ) -> Result<(), ActionError> {
        let limit = self.shared.config.agents.history_import;
        let fetched = match &self.history {
            Some(source) => source.history(&record.agent_id, limit).await,
            None => Ok(None),
        };
        let earlier = self
            .shared
            .state
            .history_import(room)
            .filter(|i| i.outcome == "started");
        let mut progress = HistoryImport {
            agent_id: record.agent_id.clone(),
            outcome: "done".into(),
            posted: earlier.as_ref().map_or(0, |i| i.posted),
            last_posted: earlier.and_then(|i| i.last_posted),
            detail: None,
            at_ms: crate::clock::now_ms(),
        };
        match fetched {
            Ok(None) => progress.detail = Some("the agent source keeps no history".into()),
            Ok(Some(messages)) => {
                // Go on after the last message an interrupted import posted.
                let start = progress
                    .last_posted
                    .as_ref()
                    .and_then(|last| messages.iter().position(|m| &history_key(m) == last))
                    .map_or(0, |at| at + 1);
                for message in &messages[start..] {
                    let (txn, content) = history_content(message);
                    self.hs
                        .send_message(agent_user, room, &txn, content, message.at_ms)
                        .await?;
                    progress.posted += 1;
                    progress.last_posted = Some(history_key(message));
                    progress.outcome = "started".into();
                    self.shared
                        .state
                        .record_history_import(room.to_owned(), progress.clone())
                        .await?;
                }
                progress.outcome = "done".into();
            }
            Err(error) => {
                tracing::warn!(agent = %record.agent_id, %room, %error, "cannot read the agent's history; the room starts empty");
                progress.outcome = "failed".into();
                progress.detail = Some(error);
            }
        }
        self.shared
            .metrics
            .history_imports
            .get_or_create(&OutcomeLabels {
                outcome: if progress.outcome == "done" {
                    "done"
                } else {
                    "failed"
                },
            })
            .inc();
        progress.at_ms = crate::clock::now_ms();
        let posted = progress.posted;
        let done = progress.outcome == "done";
        self.shared
            .state
            .record_history_import(room.to_owned(), progress)
            .await?;
        record.history_pending = false;
        self.shared.state.save_agent(record.clone()).await?;
        if done {
            tracing::info!(agent = %record.agent_id, %room, posted, "imported the agent's history");
        }
        Ok(())
    }

    fn room_request(
        &self,
        localpart: &str,
        name: &str,
        agent_user: &UserId,
        space: Option<&RoomId>,
    ) -> create_room::v3::Request {
        let mut request = create_room::v3::Request::new();
        request.room_alias_name = Some(localpart.to_owned());
        request.name = Some(name.to_owned());
        request.topic = Some(topic_for(name));
        request.preset = Some(create_room::v3::RoomPreset::PrivateChat);
        request.invite = self.required.iter().map(|r| r.user.clone()).collect();
        if let Some(space) = space {
            let via = vec![self.ids().server_name.clone()];
            request
                .initial_state
                .push(InitialStateEvent::new(space.to_owned(), space_parent(via)).to_raw_any());
        }
        request.initial_state.extend([
            InitialStateEvent::with_empty_state_key(RoomHistoryVisibilityEventContent::new(
                HistoryVisibility::Shared,
            ))
            .to_raw_any(),
            InitialStateEvent::with_empty_state_key(RoomGuestAccessEventContent::new(
                GuestAccess::Forbidden,
            ))
            .to_raw_any(),
        ]);
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

    /// Reads who is joined to `room` and records the differences; returns the drift found.
    pub async fn read_room(
        &self,
        room: &RoomId,
        agent_user: &UserId,
    ) -> Result<usize, ActionError> {
        let state = &self.shared.state;
        let (asked_at, known) = state.read(|m| (m.last_seq(), m.knows_room(room)));
        let joined = read_joined(&self.hs, room, agent_user, &self.ids().bot).await?;
        let found = state.record_read(room.to_owned(), joined, asked_at).await?;
        let changes = &found.changes;
        if !known {
            // A room the model did not hold (a new room, or one forgotten by invalidate):
            // what it learns is not drift.
            tracing::debug!(%room, members = changes.len(), "room read; the model learnt its members");
        } else if found.drift() > 0 {
            let joined = changes
                .iter()
                .filter(|c| c.state.membership == Membership::Join)
                .count();
            tracing::info!(
                %room,
                now_joined = joined,
                now_left = changes.len() - joined,
                expected_joins_not_there = found.unconfirmed_joins,
                "drift: the homeserver disagrees with the model"
            );
        }
        Ok(found.drift())
    }

    /// Reads every managed room (or those of `only`; the space with a whole sweep) and
    /// schedules the ones that drifted. At most `sweep_concurrency` reads at once, so pushed
    /// repairs keep the rest of the homeserver's permits; with `spread`, the reads are spaced
    /// over that time instead of going in one burst.
    pub async fn sweep(
        &self,
        only: Option<&BTreeSet<String>>,
        spread: Option<Duration>,
    ) -> SweepSummary {
        let mut targets: Vec<(Key, OwnedRoomId, OwnedUserId)> = self.shared.state.read(|model| {
            model
                .agents
                .live_records(only)
                .filter_map(|r| {
                    Some((
                        Key::agent(&r.agent_id),
                        r.room_id.clone()?,
                        self.ids().agent_user(&r.localpart),
                    ))
                })
                .collect()
        });
        if only.is_none()
            && let Some(space) = self.shared.state.read(|m| m.agents.space.room_id.clone())
        {
            targets.push((Key::Space, space, self.ids().bot.clone()));
        }
        let gap = spread
            .map(|total| total / targets.len().max(1) as u32)
            .unwrap_or_default();
        let concurrency = (self.shared.config.homeserver.max_concurrent_requests / 2).max(1);
        // Each read's time counts from the sweep's start, not from when a slot frees up:
        // waits counted from there would add up over the slots, far past `spread`.
        let start = tokio::time::Instant::now();
        let reads: Vec<_> = targets
            .iter()
            .enumerate()
            .map(|(n, (key, room, reader))| {
                self.sweep_one(key, room, reader, start + gap * n as u32)
            })
            .collect();
        let changes: Vec<usize> = futures::stream::iter(reads)
            .buffer_unordered(concurrency)
            .collect()
            .await;
        SweepSummary {
            rooms_read: targets.len(),
            rooms_drifted: changes.iter().filter(|c| **c > 0).count(),
            changes: changes.iter().sum(),
        }
    }

    /// One sweep read, at `at`: schedules the room when it drifted or cannot be read.
    async fn sweep_one(
        &self,
        key: &Key,
        room: &RoomId,
        reader: &UserId,
        at: tokio::time::Instant,
    ) -> usize {
        if at > tokio::time::Instant::now() {
            tokio::time::sleep_until(at).await;
        }
        match self.read_room(room, reader).await {
            Ok(0) => 0,
            Ok(changes) => {
                self.shared.queue.schedule(key);
                changes
            }
            Err(e) => {
                // Unknown state: forget the room so the next run reads it afresh.
                tracing::warn!(key = %key, %room, error = %e, "cannot read room; invalidating it");
                self.shared.state.forget_room(room);
                self.shared.queue.schedule(key);
                0
            }
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

    fn count_avatar(&self, outcome: &'static str) {
        self.shared
            .metrics
            .avatars
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn count_action(&self, kind: &'static str, outcome: &'static str) {
        self.shared
            .metrics
            .actions
            .get_or_create(&ActionLabels { kind, outcome })
            .inc();
        if outcome == "ok" {
            self.shared.state.status(|s| s.actions_ok += 1);
        }
    }

    fn report_blocked(&self, agent_id: &str, blocked: &[(OwnedUserId, &'static str)]) {
        let now: Vec<String> = blocked
            .iter()
            .map(|(u, why)| format!("{u} ({why})"))
            .collect();
        let news = self.shared.state.status(|status| {
            if now.is_empty() {
                status.blocked.remove(agent_id);
                false
            } else if status.blocked.get(agent_id) != Some(&now) {
                status.blocked.insert(agent_id.to_owned(), now.clone());
                true
            } else {
                false
            }
        });
        if news {
            tracing::warn!(agent = agent_id, members = ?now, "members roster will not touch (banned or deactivated)");
            self.shared
                .metrics
                .actions
                .get_or_create(&ActionLabels {
                    kind: "join",
                    outcome: "blocked",
                })
                .inc_by(blocked.len() as u64);
        }
    }
}

/// The canonical `m.space.parent` an agent room carries.
fn space_parent(via: Vec<ruma::OwnedServerName>) -> SpaceParentEventContent {
    let mut parent = SpaceParentEventContent::new(via);
    parent.canonical = true;
    parent
}

/// Which message of a history this is: its source id and role (Letta lists a reasoning and
/// an assistant message under one id).
fn history_key(message: &HistoryMessage) -> String {
    let role = match message.role {
        HistoryRole::User => "user",
        HistoryRole::Assistant => "assistant",
    };
    format!("{}-{role}", message.id)
}

/// A history message's transaction id (from its source id, so it is posted once) and
/// content: plain text, bounded, marked as imported history, without any relation.
fn history_content(message: &HistoryMessage) -> (String, serde_json::Value) {
    let role = match message.role {
        HistoryRole::User => "user",
        HistoryRole::Assistant => "assistant",
    };
    let mut text: String = message
        .text
        .trim()
        .chars()
        .take(MAX_HISTORY_CHARS)
        .collect();
    if message.text.trim().chars().count() > MAX_HISTORY_CHARS {
        text.push('…');
    }
    let body = match message.role {
        HistoryRole::User => format!("User: {text}"),
        HistoryRole::Assistant => text,
    };
    let txn: String = format!("letta-history-{}", history_key(message))
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let content = serde_json::json!({
        "msgtype": "m.text",
        "body": body,
        "m.letta_historical": true,
        "m.letta_role": role,
    });
    (txn, content)
}

fn is_room_in_use(error: &MatrixError) -> bool {
    matches!(error.kind(), Some(ruma::api::error::ErrorKind::RoomInUse))
}

/// Room version 12 (and the hydra preview) make creators rank above power levels.
fn room_version_has_implicit_creators(version: &str) -> bool {
    version == "org.matrix.hydra.11" || version.parse::<u32>().is_ok_and(|v| v >= 12)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::agents::Agent;
    use crate::testing::FakeHomeserver;
    use std::time::Duration;

    const ADMIN: &str = "@admin:ex.org";
    const BOT: &str = "@letta:ex.org";
    const AGENT: &str = "@agent_1:ex.org";
    const ALIAS: &str = "#agent_1:ex.org";

    /// An agent source whose history the test sets (`None`: an agents file).
    struct Source {
        history: std::sync::Mutex<Result<Option<Vec<HistoryMessage>>, String>>,
        asked: std::sync::atomic::AtomicUsize,
    }

    impl ListAgents for Source {
        fn describe(&self) -> String {
            "test source".into()
        }
        fn keeps_history(&self) -> bool {
            true
        }
        fn list(&self) -> futures::future::BoxFuture<'_, Result<Vec<Agent>, String>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn history(
            &self,
            _agent_id: &str,
            _limit: u32,
        ) -> futures::future::BoxFuture<'_, Result<Option<Vec<HistoryMessage>>, String>> {
            self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let answer = self.history.lock().unwrap().clone();
            Box::pin(async move { answer })
        }
    }

    fn said(id: &str, role: HistoryRole, text: &str, at_ms: u64) -> HistoryMessage {
        HistoryMessage {
            id: id.into(),
            role,
            text: text.into(),
            at_ms: Some(at_ms),
        }
    }

    struct Fixture {
        hs: FakeHomeserver,
        shared: Arc<Shared>,
        agents: Agents,
        source: Arc<Source>,
    }

    /// roster's parts over a fake homeserver where `@admin` exists, with agent `agent-1`
    /// ("One") desired; avatars off and no history unless `extra` says otherwise.
    async fn fixture() -> Fixture {
        fixture_with("agents: {avatar: none, history_import: 0}").await
    }

    /// `fixture()` with agent-1's room provisioned, and that room.
    async fn provisioned() -> (Fixture, OwnedRoomId) {
        let f = fixture().await;
        f.space().await;
        f.converge().await;
        let room = f.record().room_id.unwrap();
        (f, room)
    }

    async fn fixture_with(extra: &str) -> Fixture {
        fixture_on("", extra).await
    }

    /// `fixture_with`, with `homeserver` fields added to the homeserver section.
    async fn fixture_on(homeserver: &str, extra: &str) -> Fixture {
        let (hs, shared) = crate::testing::stack_with(homeserver, extra).await;
        hs.world().users.insert(ADMIN.into(), Default::default());
        let client = crate::testing::client(&shared);
        let source = Arc::new(Source {
            history: std::sync::Mutex::new(Ok(None)),
            asked: Default::default(),
        });
        let agents = Agents::new(
            shared.clone(),
            client,
            "12",
            None,
            Some(source.clone() as Arc<dyn ListAgents>),
        );
        let agent = Agent {
            id: "agent-1".into(),
            name: "One".into(),
        };
        shared
            .state
            .observe_listing(vec![agent], 0, 1_000)
            .await
            .unwrap();
        Fixture {
            hs,
            shared,
            agents,
            source,
        }
    }

    impl Fixture {
        async fn space(&self) -> OwnedRoomId {
            let space = self.agents.ensure_space().await.unwrap();
            self.shared.state.set_space(space.clone()).await.unwrap();
            space
        }

        /// `user`'s membership in `room` changes on the homeserver (by `sender`), and the
        /// homeserver pushes it.
        async fn pushed(&self, room: &RoomId, user: &str, sender: &str, membership: Membership) {
            self.changed_unpushed(room, user, membership);
            self.pushed_only(room, user, sender, membership).await;
        }

        /// An event pushed to roster that the homeserver's rooms do not show (an echo
        /// of something older, arriving late).
        async fn pushed_only(
            &self,
            room: &RoomId,
            user: &str,
            sender: &str,
            membership: Membership,
        ) {
            // Each push is its own transaction and event, also with no request between.
            static PUSHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            let n = PUSHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let event = crate::model::MemberEvent {
                room_id: room.to_owned(),
                user_id: ruma::UserId::parse(user).unwrap(),
                sender: ruma::UserId::parse(sender).unwrap(),
                membership,
                displayname: None,
                avatar_url: None,
                event_id: format!("$pushed{n}").try_into().unwrap(),
                origin_server_ts: n,
            };
            self.shared
                .state
                .record_transaction(format!("t{n}"), n, vec![event])
                .await
                .unwrap();
        }

        /// `user`'s membership in `room` changes on the homeserver, which does not say so.
        fn changed_unpushed(&self, room: &RoomId, user: &str, membership: Membership) {
            self.hs
                .world()
                .rooms
                .get_mut(room.as_str())
                .unwrap()
                .members
                .insert(user.into(), membership.as_str().into());
        }

        /// The source lists agent-1 as `name` now (`at_ms`).
        async fn list_as(&self, name: &str, at_ms: u64) {
            let agent = Agent {
                id: "agent-1".into(),
                name: name.into(),
            };
            self.shared
                .state
                .observe_listing(vec![agent], at_ms, 1_000)
                .await
                .unwrap();
        }

        /// Runs agent-1's reconciler and expects it done.
        async fn converge(&self) {
            assert_eq!(
                self.agents.reconcile_agent("agent-1").await,
                Outcome::Done(())
            );
        }

        /// Reads `room` and the space, as a sweep would: the stand-in pushes no echoes of
        /// roster's own actions, so this is how the model learns who is in them.
        async fn learn_by_reading(&self, room: &RoomId) {
            let space = self
                .shared
                .state
                .read(|m| m.agents.space.room_id.clone())
                .unwrap();
            for (room, reader) in [(room, AGENT), (&*space, BOT)] {
                self.agents
                    .read_room(room, &ruma::UserId::parse(reader).unwrap())
                    .await
                    .unwrap();
            }
        }

        /// The requests roster sent since the first `before`, as "METHOD path".
        fn sent_since(&self, before: usize) -> Vec<String> {
            self.hs.world().requests[before..]
                .iter()
                .map(|r| format!("{} {}", r.method, r.path))
                .collect()
        }

        /// `user`'s membership in `room` on the homeserver.
        fn membership(&self, room: &RoomId, user: &str) -> Option<String> {
            self.hs.world().rooms[room.as_str()]
                .membership(user)
                .map(str::to_owned)
        }

        fn record(&self) -> RoomRecord {
            self.shared
                .state
                .read(|m| m.agents.records["agent-1"].clone())
        }
    }

    #[tokio::test]
    async fn should_provision_an_agent_room_and_record_it() {
        let f = fixture().await;
        let space = f.space().await;
        f.converge().await;
        let room_id = {
            let w = f.hs.world();
            let room_id = w.aliases[ALIAS].clone();
            let room = &w.rooms[&room_id];
            for user in [AGENT, BOT, ADMIN] {
                assert_eq!(room.membership(user), Some("join"), "{user}");
            }
            assert_eq!(w.users[AGENT].displayname.as_deref(), Some("One"));
            assert!(
                w.rooms[space.as_str()]
                    .state
                    .contains_key(&("m.space.child".into(), room_id.clone()))
            );
            assert!(
                room.state
                    .contains_key(&("m.space.parent".into(), space.to_string()))
            );
            room_id
        };
        let record = f.record();
        assert_eq!(
            record.room_id.as_deref().map(|r| r.as_str()),
            Some(room_id.as_str())
        );
        assert_eq!(record.applied_name.as_deref(), Some("One"));
        assert!(record.space_linked && record.settings_applied);
        // Converged: another run sends nothing.
        let before = f.hs.world().requests.len();
        f.converge().await;
        assert_eq!(f.hs.world().requests.len(), before);
    }

    /// The space deleted (its alias gone) and made again at the next start: the agent
    /// rooms go into the new one.
    #[tokio::test]
    async fn should_link_every_room_into_a_space_made_again() {
        let f = fixture().await;
        let old = f.space().await;
        f.converge().await;
        f.hs.world()
            .aliases
            .retain(|_, room| room.as_str() != old.as_str());
        let new = f.space().await;
        assert_ne!(new, old);
        assert!(!f.record().space_linked, "not in the new space yet");
        f.converge().await;
        let w = f.hs.world();
        let room_id = w.aliases[ALIAS].clone();
        assert!(
            w.rooms[new.as_str()]
                .state
                .contains_key(&("m.space.child".into(), room_id.clone()))
        );
        assert!(
            w.rooms[&room_id]
                .state
                .contains_key(&("m.space.parent".into(), new.to_string()))
        );
        drop(w);
        assert!(f.record().space_linked);
    }

    #[tokio::test]
    async fn should_report_outcomes_the_error_policy_can_use() {
        let f = fixture().await;
        f.space().await;
        // A homeserver that is away: retry, no server hint.
        f.hs.fail("/createRoom", 502, "M_UNKNOWN", "bad gateway", 1);
        assert!(matches!(
            f.agents.reconcile_agent("agent-1").await,
            Outcome::Retry {
                retry_after: None,
                ..
            }
        ));
        // Rate limited: retry when the homeserver says.
        f.hs.rate_limit("/createRoom", 2_500, 1);
        assert_eq!(
            f.agents.reconcile_agent("agent-1").await,
            Outcome::Retry {
                reason:
                    "homeserver refused create_room: HTTP 429 M_LIMIT_EXCEEDED: Too Many Requests"
                        .into(),
                retry_after: Some(Duration::from_millis(2_500)),
            }
        );
        // Refused for good.
        f.hs.fail("/createRoom", 403, "M_FORBIDDEN", "no", 1);
        assert!(matches!(
            f.agents.reconcile_agent("agent-1").await,
            Outcome::Refused(reason) if reason.contains("403")
        ));
        assert_eq!(f.hs.world().rooms.len(), 1, "only the space");
        f.converge().await;
    }

    /// The homeserver did it but the store refused: the run says retry, nothing is
    /// recorded, and the retry repeats the (idempotent) action and records it.
    #[tokio::test]
    async fn should_retry_an_action_the_store_could_not_record() {
        let f = fixture().await;
        f.space().await;
        f.converge().await;
        f.list_as("Two", 1).await;
        f.shared.state.fail_writes(true);
        let outcome = f.agents.reconcile_agent("agent-1").await;
        assert!(
            matches!(&outcome, Outcome::Retry { reason, .. } if reason.contains("not recorded")),
            "{outcome:?}"
        );
        assert_eq!(f.record().applied_name.as_deref(), Some("One"));
        assert_eq!(
            f.hs.world().users[AGENT].displayname.as_deref(),
            Some("Two"),
            "the homeserver has it"
        );
        f.shared.state.fail_writes(false);
        f.converge().await;
        assert_eq!(f.record().applied_name.as_deref(), Some("Two"));
    }

    /// A kicked required member is invited back and rejoined from the model alone, and a
    /// banned one is reported, never touched.
    #[tokio::test]
    async fn should_repair_a_kick_and_leave_a_ban_alone() {
        let (f, room) = provisioned().await;
        f.pushed(&room, ADMIN, AGENT, Membership::Leave).await;
        let reads = f.hs.world().count("joined_members");
        f.converge().await;
        assert_eq!(f.membership(&room, ADMIN).as_deref(), Some("join"));
        assert_eq!(f.hs.world().count("joined_members"), reads, "no read");

        f.pushed(&room, BOT, AGENT, Membership::Ban).await;
        let before = f.hs.world().requests.len();
        f.converge().await;
        assert_eq!(f.hs.world().requests.len(), before, "a ban is not fought");
        let blocked = f.shared.state.status(|s| s.blocked.clone());
        assert_eq!(blocked["agent-1"], vec![format!("{BOT} (banned)")]);
    }

    /// An agent room deleted on the homeserver (everyone removed, its alias gone, as
    /// Synapse's room deletion does): roster makes the room again instead of failing on
    /// the dead one at every run.
    #[tokio::test]
    async fn should_make_the_room_again_when_it_was_deleted() {
        let (f, room) = provisioned().await;
        {
            let mut w = f.hs.world();
            w.aliases.remove(ALIAS);
            for membership in w.rooms.get_mut(room.as_str()).unwrap().members.values_mut() {
                *membership = "leave".into();
            }
        }
        // The kicks were pushed: the agent's own, then roster's read of the room.
        f.pushed(&room, AGENT, BOT, Membership::Leave).await;
        f.shared.state.forget_room(&room);
        let first = f.agents.reconcile_agent("agent-1").await;
        assert_eq!(
            first,
            Outcome::Done(()),
            "followed the alias in the same run"
        );
        let new = f.record().room_id.expect("a room again");
        assert_ne!(new, room);
        let w = f.hs.world();
        assert_eq!(w.aliases[ALIAS], new.as_str());
        for user in [AGENT, BOT, ADMIN] {
            assert_eq!(
                w.rooms[new.as_str()].membership(user),
                Some("join"),
                "{user}"
            );
        }
    }

    /// An invite the model holds that the homeserver no longer has (the leave was never
    /// pushed: tuwunel drops queued events over a restart): the refused join makes roster
    /// read the room, and the retry invites again.
    #[tokio::test]
    async fn should_invite_again_when_a_remembered_invite_is_gone() {
        let (f, room) = provisioned().await;
        // The echo of @admin's join came; later an invite of @admin did, its leave did not.
        f.pushed(&room, ADMIN, ADMIN, Membership::Join).await;
        f.pushed(&room, ADMIN, AGENT, Membership::Invite).await;
        f.changed_unpushed(&room, ADMIN, Membership::Leave);
        let refused = f.agents.reconcile_agent("agent-1").await;
        assert!(matches!(refused, Outcome::Refused(_)), "{refused:?}");
        f.converge().await;
        assert_eq!(f.membership(&room, ADMIN).as_deref(), Some("join"));
        // Converged: another run sends nothing.
        let before = f.hs.world().requests.len();
        f.converge().await;
        assert_eq!(f.hs.world().requests.len(), before);
    }

    /// Drift the homeserver never pushed (a change made while roster was away): the sweep
    /// reads it, schedules the room, and the next run repairs it.
    #[tokio::test]
    async fn should_find_drift_in_a_sweep_and_repair_it() {
        let (f, room) = provisioned().await;
        // The model shows @admin joined (its join was expected, then read or pushed).
        f.learn_by_reading(&room).await;
        f.changed_unpushed(&room, ADMIN, Membership::Leave);
        f.converge().await;
        assert_eq!(
            f.hs.world().rooms[room.as_str()].membership(ADMIN),
            Some("leave"),
            "without a push or a read, the model does not know"
        );
        let swept = f.agents.sweep(None, None).await;
        assert_eq!(
            (swept.rooms_read, swept.rooms_drifted),
            (2, 1),
            "the room and the space"
        );
        assert_eq!(
            f.shared.queue.counts().0,
            1,
            "the drifted room is scheduled"
        );
        f.converge().await;
        assert_eq!(f.membership(&room, ADMIN).as_deref(), Some("join"));
    }

    /// `invalidate` forgets a room; the next run reads it before deciding anything.
    #[tokio::test]
    async fn should_read_an_invalidated_room_before_acting() {
        let (f, room) = provisioned().await;
        let reads = f.hs.world().count("joined_members");
        f.shared.state.forget_room(&room);
        f.converge().await;
        assert_eq!(f.hs.world().count("joined_members"), reads + 1);
    }

    /// People see the space: the required members are joined to it, and a kick from it is
    /// repaired from the pushed event like in an agent room.
    #[tokio::test]
    async fn should_keep_the_required_members_in_the_space() {
        let f = fixture().await;
        let space = f.space().await;
        assert_eq!(f.agents.reconcile(&Key::Space).await, Outcome::Done(()));
        let members = f.hs.world().rooms[space.as_str()].members.clone();
        assert_eq!(members.get(BOT).map(String::as_str), Some("join"));
        assert_eq!(members.get(ADMIN).map(String::as_str), Some("join"));
        let before = f.hs.world().requests.len();
        assert_eq!(f.agents.reconcile(&Key::Space).await, Outcome::Done(()));
        assert_eq!(
            f.hs.world().requests.len(),
            before,
            "converged: nothing sent"
        );

        f.pushed(&space, ADMIN, BOT, Membership::Leave).await;
        assert_eq!(f.agents.reconcile(&Key::Space).await, Outcome::Done(()));
        assert_eq!(
            f.hs.world().rooms[space.as_str()].membership(ADMIN),
            Some("join")
        );
    }

    #[tokio::test]
    async fn should_follow_a_rename_with_the_topic() {
        let (f, room) = provisioned().await;
        let topic = |f: &Fixture| {
            f.hs.world().rooms[room.as_str()].state[&("m.room.topic".to_string(), String::new())]
                ["topic"]
                .clone()
        };
        assert_eq!(topic(&f), "Letta agent One");
        f.list_as("Two", 1).await;
        f.converge().await;
        assert_eq!(topic(&f), "Letta agent Two");
        assert_eq!(f.record().applied_topic.as_deref(), Some("Letta agent Two"));
    }

    /// Agent ids that make the same user and alias (`agent-1` and `1` are both
    /// `@agent_1`): the second listed is left out, so it never takes over the first's room,
    /// and its removal cannot take the required members out of that room.
    #[tokio::test]
    async fn should_leave_out_an_agent_whose_id_makes_another_agents_user() {
        let (f, room) = provisioned().await;
        let one = Agent {
            id: "agent-1".into(),
            name: "One".into(),
        };
        let twin = Agent {
            id: "1".into(),
            name: "Twin".into(),
        };
        let listed = |agents: Vec<Agent>, at_ms| {
            let state = &f.shared.state;
            async move { state.observe_listing(agents, at_ms, 1_000).await.unwrap() }
        };
        listed(vec![one.clone(), twin.clone()], 1).await;
        assert_eq!(f.agents.reconcile_agent("1").await, Outcome::Done(()));
        assert_eq!(
            f.hs.world().users[AGENT].displayname.as_deref(),
            Some("One"),
            "the twin did not rename agent-1's user"
        );
        // The twin goes away past the grace period.
        listed(vec![one.clone()], 10).await;
        listed(vec![one], 2_000).await;
        assert_eq!(f.agents.reconcile_agent("1").await, Outcome::Done(()));
        for user in [AGENT, BOT, ADMIN] {
            assert_eq!(f.membership(&room, user).as_deref(), Some("join"), "{user}");
        }
        assert_eq!(f.record().room_id.as_ref(), Some(&room));
        assert!(
            f.shared.state.read(|m| !m.agents.records.contains_key("1")),
            "the twin has no record"
        );
    }

    /// An agent name longer than a homeserver takes as a display name (Synapse: 256
    /// characters) still gets its room and user, named with the name cut short; a later
    /// run, and a listing of the same name again, send nothing.
    #[tokio::test]
    async fn should_provision_an_agent_whose_name_is_too_long_for_a_display_name() {
        let f = fixture().await;
        f.space().await;
        let long = format!("Agent {}", "é".repeat(400));
        f.list_as(&long, 1).await;
        f.converge().await;
        let shown = f.hs.world().users[AGENT].displayname.clone().unwrap();
        assert!(
            shown.chars().count() <= 256,
            "{} characters",
            shown.chars().count()
        );
        assert!(shown.starts_with("Agent éé"), "{shown}");
        let room = f.record().room_id.expect("the room was created");
        let name = f.hs.world().rooms[room.as_str()].state
            [&("m.room.name".to_string(), String::new())]["name"]
            .clone();
        assert_eq!(name, shown.as_str());

        f.learn_by_reading(&room).await;
        let before = f.hs.world().requests.len();
        f.list_as(&long, 2).await;
        f.converge().await;
        assert_eq!(f.sent_since(before), Vec::<String>::new());
    }

    /// Generated avatars: uploaded once per distinct picture, set before the room exists,
    /// changed on a rename only when the letter changes, and a hand-set one left alone.
    #[tokio::test]
    async fn should_give_agents_generated_avatars_and_respect_hand_set_ones() {
        let f = fixture_with("agents: {history_import: 0}").await;
        f.space().await;
        f.converge().await;
        let first = f.hs.world().users[AGENT].avatar_url.clone().unwrap();
        assert_eq!(f.hs.world().uploads.len(), 1);
        let png = f.hs.world().uploads[0].clone();
        assert!(png.starts_with(b"\x89PNG"), "a PNG was uploaded");
        assert_eq!(f.hs.world().count("/avatar_url"), 1, "set once, not read");

        // Same first letter: the same picture, nothing sent for the avatar.
        f.list_as("Orion", 1).await;
        f.converge().await;
        assert_eq!(f.hs.world().count("/avatar_url"), 1);
        // Another letter: one new upload, checked then set.
        f.list_as("Zed", 2).await;
        f.converge().await;
        assert_eq!(f.hs.world().uploads.len(), 2);
        let second = f.hs.world().users[AGENT].avatar_url.clone().unwrap();
        assert_ne!(first, second);
        // Back to "O": that picture was uploaded before and is reused.
        f.list_as("Omega", 3).await;
        f.converge().await;
        assert_eq!(f.hs.world().uploads.len(), 2, "reused");
        assert_eq!(
            f.hs.world().users[AGENT].avatar_url.as_deref(),
            Some(first.as_str())
        );
        // A person sets one by hand: roster never touches it again.
        f.hs.world().users.get_mut(AGENT).unwrap().avatar_url = Some("mxc://ex.org/mine".into());
        f.list_as("Zeta", 4).await;
        f.converge().await;
        assert_eq!(
            f.hs.world().users[AGENT].avatar_url.as_deref(),
            Some("mxc://ex.org/mine")
        );
        assert!(f.record().avatar_hand_set);
    }

    /// `agents.avatar: https://...`: fetched once and uploaded once for every agent; an
    /// answer that is not an image leaves the agents without one, and the room is made.
    #[tokio::test]
    async fn should_fetch_an_image_avatar_once_and_never_block_the_room_on_it() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let fetches = Arc::new(AtomicU64::new(0));
        let served = fetches.clone();
        let png = crate::avatar::render(crate::avatar::look("agent-x", "X"));
        let app = axum::Router::new()
            .route(
                "/agent.png",
                axum::routing::get(move || {
                    served.fetch_add(1, Ordering::SeqCst);
                    let png = png.clone();
                    async move { ([("content-type", "image/png")], png) }
                }),
            )
            .route(
                "/page.html",
                axum::routing::get(|| async { ([("content-type", "text/html")], "<html>") }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        let f = fixture_with(&format!(
            "agents: {{avatar: 'http://{at}/agent.png', history_import: 0}}"
        ))
        .await;
        f.space().await;
        f.converge().await;
        let set = f.hs.world().users[AGENT].avatar_url.clone();
        assert!(set.is_some(), "the agent got the configured image");
        assert_eq!(f.hs.world().uploads.len(), 1);
        assert!(f.hs.world().uploads[0].starts_with(b"\x89PNG"));
        // Another run, a rename: the URL is known, nothing is fetched or uploaded again.
        f.list_as("Renamed", 1).await;
        f.converge().await;
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "fetched once");
        assert_eq!(f.hs.world().uploads.len(), 1, "uploaded once");

        let g = fixture_with(&format!(
            "agents: {{avatar: 'http://{at}/page.html', history_import: 0}}"
        ))
        .await;
        g.space().await;
        g.converge().await;
        assert!(g.record().room_id.is_some(), "the room is made regardless");
        assert_eq!(g.hs.world().users[AGENT].avatar_url, None);
        assert!(g.hs.world().uploads.is_empty());
        // Runs within the quiet period have no image to set, so they ask nothing about it
        // (not the agent's profile either).
        let asked = g.hs.world().count("/avatar_url");
        g.converge().await;
        g.converge().await;
        assert_eq!(g.hs.world().count("/avatar_url"), asked);
    }

    #[tokio::test]
    async fn should_set_no_avatar_when_avatars_are_off() {
        let f = fixture().await;
        f.space().await;
        f.converge().await;
        assert_eq!(f.hs.world().users[AGENT].avatar_url, None);
        assert!(f.hs.world().uploads.is_empty());
    }

    /// History: posted once, in order, as the agent, marked historical, with the source's
    /// timestamps; a retry posts nothing twice; other roles never reach the room.
    #[tokio::test]
    async fn should_import_history_once_into_a_room_it_created() {
        let f = fixture_with("agents: {avatar: none, history_import: 15}").await;
        *f.source.history.lock().unwrap() = Ok(Some(vec![
            said("message-1", HistoryRole::User, "hello", 1_000),
            said("message-2", HistoryRole::Assistant, "hi there", 2_000),
        ]));
        f.space().await;
        // The first post fails once: the retry must not post the first message twice.
        f.hs.fail(
            "/send/m.room.message/letta-history-message-2",
            502,
            "M_UNKNOWN",
            "busy",
            1,
        );
        assert!(matches!(
            f.agents.reconcile_agent("agent-1").await,
            Outcome::Retry { .. }
        ));
        f.converge().await;
        let room = f.record().room_id.unwrap();
        let messages = f.hs.world().rooms[room.as_str()].messages.clone();
        let bodies: Vec<_> = messages
            .iter()
            .map(|(sender, content, ts, _)| {
                assert_eq!(sender, AGENT);
                assert_eq!(content["m.letta_historical"], true);
                assert!(content.get("m.relates_to").is_none());
                (content["body"].as_str().unwrap().to_owned(), *ts)
            })
            .collect();
        assert_eq!(
            bodies,
            vec![
                ("User: hello".to_owned(), Some(1_000)),
                ("hi there".to_owned(), Some(2_000))
            ]
        );
        assert!(!f.record().history_pending);
        assert_eq!(
            f.hs.world().count("/send/m.room.message/"),
            3,
            "the retry went on after the first message: it posted the second only"
        );
        let import = f.shared.state.history_import(&room).unwrap();
        assert_eq!((import.outcome.as_str(), import.posted), ("done", 2));
        // Runs once: later runs do not ask again.
        f.converge().await;
        assert_eq!(f.source.asked.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// A createRoom that took effect but whose answer was lost: the retry finds the room by
    /// its alias, and it is the room roster made, so its history is imported (once). A room
    /// found by its alias after the store was lost may hold its history already: nothing is
    /// imported into it.
    #[tokio::test]
    async fn should_import_history_into_a_room_whose_creation_answer_was_lost() {
        let f = fixture_with("agents: {avatar: none, history_import: 15}").await;
        *f.source.history.lock().unwrap() = Ok(Some(vec![said(
            "message-1",
            HistoryRole::User,
            "hello",
            1_000,
        )]));
        f.space().await;
        let spaces = f.hs.world().count("/createRoom");
        f.hs.lose_answer("/createRoom", 1);
        assert!(matches!(
            f.agents.reconcile_agent("agent-1").await,
            Outcome::Retry { .. }
        ));
        assert!(f.record().create_sent, "the lost createRoom is remembered");
        f.converge().await;
        assert_eq!(
            f.hs.world().count("/createRoom") - spaces,
            2,
            "the retry was refused: in use"
        );
        let room = f.record().room_id.unwrap();
        let posted = || f.hs.world().rooms[room.as_str()].messages.len();
        assert_eq!(posted(), 1, "the history was imported into the found room");
        assert!(!f.record().create_sent && !f.record().history_pending);

        // The store is lost: the record starts over and the room is found by its alias.
        let record = f.record();
        f.shared
            .state
            .save_agent(RoomRecord {
                agent_id: record.agent_id,
                localpart: record.localpart,
                name: record.name,
                ..RoomRecord::default()
            })
            .await
            .unwrap();
        f.converge().await;
        assert_eq!(f.record().room_id.as_ref(), Some(&room));
        assert_eq!(posted(), 1, "nothing imported twice");
    }

    #[tokio::test]
    async fn should_leave_the_room_empty_and_say_so_when_the_source_fails() {
        let f = fixture_with("agents: {avatar: none, history_import: 15}").await;
        *f.source.history.lock().unwrap() = Err("Letta is down".into());
        f.space().await;
        f.converge().await;
        let room = f.record().room_id.unwrap();
        assert!(f.hs.world().rooms[room.as_str()].messages.is_empty());
        let failed = f.shared.state.failed_history_imports();
        assert_eq!(failed[&room].detail.as_deref(), Some("Letta is down"));
        for user in [AGENT, BOT, ADMIN] {
            assert_eq!(
                f.hs.world().rooms[room.as_str()].membership(user),
                Some("join"),
                "provisioning went on"
            );
        }
    }

    #[tokio::test]
    async fn should_create_the_space_once_and_find_it_again() {
        let f = fixture().await;
        let first = f.agents.ensure_space().await.unwrap();
        let second = f.agents.ensure_space().await.unwrap();
        assert_eq!(first, second);
        assert_eq!(f.hs.world().count("createRoom"), 1);
    }

    /// A room forgotten (a sweep read failed, a join was refused, invalidate) and then
    /// touched by one pushed event is read before anything is planned: that event alone is
    /// not the room. A converged room gets nothing; a removed agent's room is left by the
    /// required members before the agent is retired.
    #[tokio::test]
    async fn should_read_a_forgotten_room_though_an_event_about_it_came_since() {
        let (f, room) = provisioned().await;
        f.shared.state.forget_room(&room);
        f.pushed(
            &room,
            "@someone:ex.org",
            "@someone:ex.org",
            Membership::Join,
        )
        .await;
        let before = f.hs.world().requests.len();
        f.converge().await;
        let sent = f.sent_since(before);
        assert!(
            sent.iter().all(|r| r.contains("/joined_members")),
            "a converged room is only read: {sent:#?}"
        );
        assert_eq!(sent.len(), 1);

        f.shared
            .state
            .observe_listing(vec![], 10, 1_000)
            .await
            .unwrap();
        f.shared
            .state
            .observe_listing(vec![], 2_000, 1_000)
            .await
            .unwrap();
        assert!(f.record().removing);
        f.shared.state.forget_room(&room);
        f.pushed(&room, AGENT, AGENT, Membership::Join).await;
        f.converge().await;
        assert!(f.record().retired);
        assert_eq!(f.membership(&room, ADMIN).as_deref(), Some("leave"));
        assert_eq!(f.membership(&room, BOT).as_deref(), Some("leave"));
    }

    /// The echo of roster's invite, pushed after its join was answered, does not undo
    /// what the join did: nothing is sent again.
    #[tokio::test]
    async fn should_not_join_again_when_the_echo_of_its_invite_comes_after_the_join() {
        let (f, room) = provisioned().await;
        f.pushed(&room, ADMIN, AGENT, Membership::Leave).await;
        f.converge().await;
        assert_eq!(f.membership(&room, ADMIN).as_deref(), Some("join"));
        // On the homeserver @admin is joined.
        f.pushed_only(&room, ADMIN, AGENT, Membership::Invite).await;
        let before = f.hs.world().requests.len();
        f.converge().await;
        let sent = f.sent_since(before);
        assert!(sent.is_empty(), "nothing changed, yet: {sent:#?}");
    }

    /// A join roster expects but whose echo never came, and that the homeserver no longer
    /// shows (its leave was lost too), is drift when the sweep reads the room: the room is
    /// scheduled and repaired.
    #[tokio::test]
    async fn should_schedule_a_room_whose_expected_join_a_sweep_does_not_find() {
        let (f, room) = provisioned().await;
        f.learn_by_reading(&room).await;
        f.pushed(&room, ADMIN, AGENT, Membership::Leave).await;
        f.converge().await;
        // Only the echo of the invite comes; the join's and a later leave's are lost.
        f.pushed(&room, ADMIN, AGENT, Membership::Invite).await;
        f.changed_unpushed(&room, ADMIN, Membership::Leave);
        let admin = ruma::UserId::parse(ADMIN).unwrap();
        assert_eq!(
            f.shared
                .state
                .read(|m| m.effective_membership(&room, &admin)),
            Some(Membership::Join)
        );
        let swept = f.agents.sweep(None, None).await;
        assert!(swept.rooms_drifted >= 1, "{swept:?}");
        assert_eq!(f.shared.queue.counts().0, 1, "the room is scheduled");
        // The model still holds the invite's echo: the join is refused, the room read
        // again, and the next run invites and joins.
        let first = f.agents.reconcile_agent("agent-1").await;
        assert!(matches!(first, Outcome::Refused(_)), "{first:?}");
        f.converge().await;
        assert_eq!(f.membership(&room, ADMIN).as_deref(), Some("join"));
    }

    /// The periodic sweep spreads its reads over the time it is given, from the sweep's
    /// start: each read used to wait its share only once a slot let it start, so with
    /// `max_concurrent_requests / 2` slots the waits piled up (56 rooms and a 600 s
    /// interval: 20 minutes instead of 5; 1,000 rooms: 5 hours).
    #[tokio::test]
    async fn should_spread_the_sweep_over_the_time_given_not_longer() {
        let f = fixture_on(
            "max_concurrent_requests: 2",
            "agents: {avatar: none, history_import: 0}",
        )
        .await;
        for n in 0..20 {
            f.shared
                .state
                .save_agent(RoomRecord {
                    agent_id: format!("agent-s{n}"),
                    localpart: format!("agent_s{n}"),
                    room_id: Some(RoomId::parse(format!("!s{n}:ex.org")).unwrap()),
                    ..RoomRecord::default()
                })
                .await
                .unwrap();
        }
        let spread = Duration::from_secs(1);
        let started = std::time::Instant::now();
        let swept = f.agents.sweep(None, Some(spread)).await;
        let took = started.elapsed();
        assert_eq!(swept.rooms_read, 20);
        // Waits that pile up take 0.05 s x (0 + 1 + ... + 19) = 9.5 s here: the margin
        // up to 5 s is for a busy machine, not for the sweep.
        assert!(took >= spread * 9 / 10, "the reads are spread: {took:?}");
        assert!(took < spread * 5, "no longer than the spread: {took:?}");
    }

    #[test]
    fn should_know_which_room_versions_rank_creators_implicitly() {
        assert!(room_version_has_implicit_creators("12"));
        assert!(room_version_has_implicit_creators("org.matrix.hydra.11"));
        assert!(!room_version_has_implicit_creators("10"));
        assert!(!room_version_has_implicit_creators("11"));
    }
}
