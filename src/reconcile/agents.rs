//! Provisions agent rooms and keeps them converged: runs the planner's actions through the
//! homeserver client, one agent at a time per key, and records what it did through `state`.
//!
//! Contract (kube-runtime style): `reconcile_agent(key)` reads the current model, acts, and
//! returns an [`Outcome`]; the controller's error policy turns a failure into a retry delay
//! or a report. Triggers carry only the agent id, so every run is idempotent.

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
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};

use crate::Shared;
use crate::ids::Identities;
use crate::lifecycle::effects::IdentityEffects;
use crate::matrix::{Homeserver, MatrixError};
use crate::metrics::{ActionLabels, ResultLabels};
use crate::model::agents::{
    Action, PlanInput, RequiredMember, RoomRecord, plan_agent, plan_removal,
};
use crate::model::{Membership, ObservedMember};
use crate::retry::Outcome;
use crate::state::StateError;

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
        let required = required_members(shared.config.ids());
        let list_creator_power = !room_version_has_implicit_creators(default_room_version);
        Agents {
            shared,
            hs,
            required,
            effects,
            list_creator_power,
        }
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
            return error.outcome();
        }
        for round in 0..MAX_ROUNDS {
            let Some((actions, record)) = self.plan(agent_id, round == 0) else {
                return Outcome::Done(());
            };
            if actions.is_empty() {
                if record.removing {
                    if let Err(e) = self.shared.state.retire_agent(agent_id.to_owned()).await {
                        return ActionError::from(e).outcome();
                    }
                    tracing::info!(agent = agent_id, "agent removed: room left and unlinked");
                }
                return Outcome::Done(());
            }
            let mut record = record;
            for action in actions {
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

    /// The actions the agent's room needs now, and its record; `None` when there is
    /// nothing to look after (unknown, retired, or not desired yet).
    fn plan(&self, agent_id: &str, count_cache: bool) -> Option<(Vec<Action>, RoomRecord)> {
        let space = self.shared.state.read(|m| m.agents.space.clone());
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
                    let plan = plan_agent(&PlanInput {
                        agent,
                        agent_user: &agent_user,
                        bot: &self.ids().bot,
                        record,
                        required: &self.required,
                        space: space.as_deref(),
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
            } => self.ensure_room(record, &alias_localpart, &name).await?,
            Action::Invite { room, by, user } => {
                match self.hs.invite(&by, &room, &user).await {
                    Ok(()) => state.expect(&room, &user, Membership::Invite),
                    // Already in the room (the model was behind): the join decides.
                    Err(e) if e.is_forbidden() => {
                        tracing::debug!(%room, %user, error = %e, "invite refused; trying to join")
                    }
                    Err(e) => return Err(e.into()),
                }
                if !self.ids().can_act_as(&user) {
                    record.invited_external.insert(user);
                    state.save_agent(record.clone()).await?;
                }
            }
            Action::Join { room, user } => {
                self.hs.join(&user, &room).await?;
                state.expect(&room, &user, Membership::Join);
            }
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
                state.save_agent(record.clone()).await?;
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
                state.save_agent(record.clone()).await?;
            }
            Action::LinkSpace { room, space, by } => {
                let via = vec![self.ids().server_name.clone()];
                self.hs
                    .send_state(
                        &self.ids().bot,
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
                state.save_agent(record.clone()).await?;
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

    /// Finds the room by its alias (the homeserver is the truth), else creates it.
    async fn ensure_room(
        &self,
        record: &mut RoomRecord,
        localpart: &str,
        name: &str,
    ) -> Result<(), ActionError> {
        let agent_user = self.ids().agent_user(localpart);
        let created_user = self.hs.register(localpart).await? == crate::matrix::Registered::Created;
        let alias = self.ids().agent_alias(localpart);
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
                Err(e) => return Err(e.into()),
            };
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
            if created_user {
                self.hs.set_display_name(&agent_user, name).await?;
                record.applied_name = Some(name.to_owned());
            }
            record.settings_applied = true;
            record.room_id = Some(room);
        }
        self.shared.state.save_agent(record.clone()).await?;
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

    /// Reads who is joined to `room` and records the differences; returns the drift found.
    pub async fn read_room(
        &self,
        room: &RoomId,
        agent_user: &UserId,
    ) -> Result<usize, ActionError> {
        let state = &self.shared.state;
        let asked_at = state.read(|m| m.last_seq());
        let joined = read_joined(&self.hs, room, agent_user, &self.ids().bot).await?;
        let changes = state.record_read(room.to_owned(), joined, asked_at).await?;
        if !changes.is_empty() {
            let joined = changes
                .iter()
                .filter(|c| c.state.membership == Membership::Join)
                .count();
            tracing::info!(
                %room,
                now_joined = joined,
                now_left = changes.len() - joined,
                "drift: the homeserver disagrees with the model"
            );
        }
        Ok(changes.len())
    }

    /// Reads every managed room (or those of `only`) and schedules the ones that drifted.
    /// Returns (rooms read, drift found).
    pub async fn sweep(&self, only: Option<&BTreeSet<String>>) -> (usize, usize) {
        let targets: Vec<(String, OwnedRoomId, OwnedUserId)> = self.shared.state.read(|model| {
            model
                .agents
                .live_records(only)
                .filter_map(|r| {
                    Some((
                        r.agent_id.clone(),
                        r.room_id.clone()?,
                        self.ids().agent_user(&r.localpart),
                    ))
                })
                .collect()
        });
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
                    self.shared.state.forget_room(room);
                    self.shared.queue.schedule(agent_id);
                }
            }
        }
        (targets.len(), drift)
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
            tracing::warn!(agent = agent_id, members = ?now, "required members roster will not touch");
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
    use crate::config::{Config, Secret};
    use crate::model::agents::Agent;
    use crate::testing::{FakeHomeserver, shared};
    use std::time::Duration;

    const ADMIN: &str = "@admin:ex.org";
    const BOT: &str = "@letta:ex.org";
    const AGENT: &str = "@agent_1:ex.org";
    const ALIAS: &str = "#agent_1:ex.org";

    struct Fixture {
        hs: FakeHomeserver,
        shared: Arc<Shared>,
        agents: Agents,
    }

    /// roster's parts over a fake homeserver where `@admin` exists, with agent `agent-1`
    /// ("One") desired.
    async fn fixture() -> Fixture {
        let placeholder = shared(Config::from_yaml("homeserver: {server_name: ex.org}").unwrap());
        let as_token = placeholder.registration.as_token.clone();
        let hs = FakeHomeserver::start(&as_token, "ex.org", "letta").await;
        hs.world().users.insert(ADMIN.into(), Default::default());
        let config = Config::from_yaml(&format!(
            "homeserver: {{server_name: ex.org, url: '{}'}}",
            hs.url
        ))
        .unwrap();
        let mut shared = Arc::try_unwrap(shared(config)).ok().expect("one owner");
        shared.registration = placeholder.registration.clone();
        let shared = Arc::new(shared);
        let client = Homeserver::from_config(
            &shared.config,
            Secret::new(as_token),
            shared.metrics.clone(),
        );
        let agents = Agents::new(shared.clone(), client, "12", None);
        let agent = Agent {
            id: "agent-1".into(),
            name: "One".into(),
        };
        shared
            .state
            .observe_listing(vec![agent], 0, 1_000)
            .await
            .unwrap();
        Fixture { hs, shared, agents }
    }

    impl Fixture {
        async fn space(&self) -> OwnedRoomId {
            let space = self.agents.ensure_space().await.unwrap();
            self.shared.state.set_space(space.clone()).await.unwrap();
            space
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
        assert_eq!(f.agents.reconcile_agent("agent-1").await, Outcome::Done(()));
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
        assert_eq!(f.agents.reconcile_agent("agent-1").await, Outcome::Done(()));
        assert_eq!(f.hs.world().requests.len(), before);
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
        assert_eq!(f.agents.reconcile_agent("agent-1").await, Outcome::Done(()));
    }

    /// The homeserver did it but the store refused: the run says retry, nothing is
    /// recorded, and the retry repeats the (idempotent) action and records it.
    #[tokio::test]
    async fn should_retry_an_action_the_store_could_not_record() {
        let f = fixture().await;
        f.space().await;
        assert_eq!(f.agents.reconcile_agent("agent-1").await, Outcome::Done(()));
        let renamed = Agent {
            id: "agent-1".into(),
            name: "Two".into(),
        };
        f.shared
            .state
            .observe_listing(vec![renamed], 1, 1_000)
            .await
            .unwrap();
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
        assert_eq!(f.agents.reconcile_agent("agent-1").await, Outcome::Done(()));
        assert_eq!(f.record().applied_name.as_deref(), Some("Two"));
    }

    /// A kicked required member is invited back and rejoined from the model alone, and a
    /// banned one is reported, never touched.
    #[tokio::test]
    async fn should_repair_a_kick_and_leave_a_ban_alone() {
        let f = fixture().await;
        f.space().await;
        assert_eq!(f.agents.reconcile_agent("agent-1").await, Outcome::Done(()));
        let room = f.record().room_id.unwrap();
        let kick = |user: &str, membership: &str, n: u64| crate::model::MemberEvent {
            room_id: room.clone(),
            user_id: ruma::UserId::parse(user).unwrap(),
            sender: ruma::UserId::parse(AGENT).unwrap(),
            membership: crate::model::Membership::parse(membership).unwrap(),
            displayname: None,
            avatar_url: None,
            event_id: format!("$kick{n}").try_into().unwrap(),
            origin_server_ts: n,
        };
        f.hs.world()
            .rooms
            .get_mut(room.as_str())
            .unwrap()
            .members
            .insert(ADMIN.into(), "leave".into());
        f.shared
            .state
            .record_transaction("t1".into(), 1, vec![kick(ADMIN, "leave", 1)])
            .await
            .unwrap();
        let reads = f.hs.world().count("joined_members");
        assert_eq!(f.agents.reconcile_agent("agent-1").await, Outcome::Done(()));
        assert_eq!(
            f.hs.world().rooms[room.as_str()].membership(ADMIN),
            Some("join")
        );
        assert_eq!(f.hs.world().count("joined_members"), reads, "no read");

        f.shared
            .state
            .record_transaction("t2".into(), 2, vec![kick(BOT, "ban", 2)])
            .await
            .unwrap();
        let before = f.hs.world().requests.len();
        assert_eq!(f.agents.reconcile_agent("agent-1").await, Outcome::Done(()));
        assert_eq!(f.hs.world().requests.len(), before, "a ban is not fought");
        let blocked = f.shared.state.status(|s| s.blocked.clone());
        assert_eq!(blocked["agent-1"], vec![format!("{BOT} (banned)")]);
    }

    /// Drift the homeserver never pushed (a change made while roster was away): the sweep
    /// reads it, schedules the room, and the next run repairs it.
    #[tokio::test]
    async fn should_find_drift_in_a_sweep_and_repair_it() {
        let f = fixture().await;
        f.space().await;
        assert_eq!(f.agents.reconcile_agent("agent-1").await, Outcome::Done(()));
        let room = f.record().room_id.unwrap();
        // The model shows @admin joined (its join was expected, then read or pushed).
        let asked = f.shared.state.read(|m| m.last_seq());
        let joined = read_joined(
            &f.agents.hs,
            &room,
            &ruma::UserId::parse(AGENT).unwrap(),
            &ruma::UserId::parse(BOT).unwrap(),
        )
        .await
        .unwrap();
        f.shared
            .state
            .record_read(room.clone(), joined, asked)
            .await
            .unwrap();
        f.hs.world()
            .rooms
            .get_mut(room.as_str())
            .unwrap()
            .members
            .insert(ADMIN.into(), "leave".into());
        assert_eq!(f.agents.reconcile_agent("agent-1").await, Outcome::Done(()));
        assert_eq!(
            f.hs.world().rooms[room.as_str()].membership(ADMIN),
            Some("leave"),
            "without a push or a read, the model does not know"
        );
        assert_eq!(f.agents.sweep(None).await, (1, 1));
        assert_eq!(
            f.shared.queue.counts().0,
            1,
            "the drifted room is scheduled"
        );
        assert_eq!(f.agents.reconcile_agent("agent-1").await, Outcome::Done(()));
        assert_eq!(
            f.hs.world().rooms[room.as_str()].membership(ADMIN),
            Some("join")
        );
    }

    /// `invalidate` forgets a room; the next run reads it before deciding anything.
    #[tokio::test]
    async fn should_read_an_invalidated_room_before_acting() {
        let f = fixture().await;
        f.space().await;
        assert_eq!(f.agents.reconcile_agent("agent-1").await, Outcome::Done(()));
        let room = f.record().room_id.unwrap();
        let reads = f.hs.world().count("joined_members");
        f.shared.state.forget_room(&room);
        assert_eq!(f.agents.reconcile_agent("agent-1").await, Outcome::Done(()));
        assert_eq!(f.hs.world().count("joined_members"), reads + 1);
    }

    #[tokio::test]
    async fn should_create_the_space_once_and_find_it_again() {
        let f = fixture().await;
        let first = f.agents.ensure_space().await.unwrap();
        let second = f.agents.ensure_space().await.unwrap();
        assert_eq!(first, second);
        assert_eq!(f.hs.world().count("createRoom"), 1);
    }

    #[test]
    fn should_know_which_room_versions_rank_creators_implicitly() {
        assert!(room_version_has_implicit_creators("12"));
        assert!(room_version_has_implicit_creators("org.matrix.hydra.11"));
        assert!(!room_version_has_implicit_creators("10"));
        assert!(!room_version_has_implicit_creators("11"));
    }
}
