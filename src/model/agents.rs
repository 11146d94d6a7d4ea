//! Desired agents: who should have a Matrix user and room, and under which names.
//!
//! Pure: sources produce listings, this module turns them into desired state.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};

use super::{Membership, Model};
use crate::avatar::Look;
use crate::ids::agent_localpart;

/// One agent as a source lists it. `id` is the key: names are not unique.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Agent {
    pub id: String,
    pub name: String,
}

/// What roster has done for one agent's room: its promises, kept in the store.
///
/// The homeserver stays the truth: `room_id` is found again by the room's alias when this
/// record is lost, and membership comes from the model, not from here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomRecord {
    pub agent_id: String,
    pub localpart: String,
    /// The name the source last listed: the desired state survives a restart during a
    /// source outage.
    #[serde(default)]
    pub name: String,
    pub room_id: Option<OwnedRoomId>,
    /// The name last written to the room name and the agent's display name.
    pub applied_name: Option<String>,
    pub space_linked: bool,
    /// History visible to members and guests forbidden were set (at creation, or once on
    /// a room roster adopted or found again).
    #[serde(default)]
    pub settings_applied: bool,
    /// Users roster cannot act as; they are invited once, never again.
    #[serde(default)]
    pub invited_external: BTreeSet<OwnedUserId>,
    /// The topic last written to the room.
    #[serde(default)]
    pub applied_topic: Option<String>,
    /// The avatar roster last set on the agent's user.
    #[serde(default)]
    pub avatar: Option<AppliedAvatar>,
    /// A person set the agent's avatar by hand: roster leaves it alone for good.
    #[serde(default)]
    pub avatar_hand_set: bool,
    /// The room's `m.space.parent` was set (at creation, or by linking).
    #[serde(default)]
    pub space_parent_set: bool,
    /// roster created the room with history import on and has not imported yet.
    #[serde(default)]
    pub history_pending: bool,
    /// roster sent `createRoom` and has not seen its answer: a room then found by the alias
    /// is the one it created (answer lost), not an older one (store lost).
    #[serde(default)]
    pub create_sent: bool,
    /// When the agent was first missing from a good listing; cleared when it is back.
    pub missing_since_ms: Option<u64>,
    /// Absent past the grace period: its removal is under way. Only this (never a mere
    /// absence from `desired`, e.g. before the first listing) lets roster leave a room.
    #[serde(default)]
    pub removing: bool,
    /// The agent was removed and its room left; nothing more is done for it.
    pub retired: bool,
}

impl RoomRecord {
    /// The record once the agent's removal is done: nothing more is done for it.
    pub fn retired(mut self) -> RoomRecord {
        self.retired = true;
        self.removing = false;
        self.space_linked = false;
        self
    }
}

/// Who said a message in an agent's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryRole {
    User,
    Assistant,
}

/// One message of an agent's history, as its source keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryMessage {
    /// The source's id: the message's transaction id comes from it, so it is posted once.
    pub id: String,
    pub role: HistoryRole,
    pub text: String,
    pub at_ms: Option<u64>,
}

/// The topic of an agent's room.
pub fn topic_for(name: &str) -> String {
    format!("Letta agent {name}")
}

/// What picture an agent should have (from `agents.avatar`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AvatarWant {
    /// The generated picture with this look.
    Generated { look: Look },
    /// One image for every agent: an `mxc://` URI or an `http(s)://` URL.
    Image { url: String },
}

/// The avatar roster set on an agent's user, and what it showed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedAvatar {
    pub want: AvatarWant,
    pub mxc: String,
}

/// A member every agent room must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequiredMember {
    pub user: OwnedUserId,
    /// roster may act as this user (local and inside its namespaces): it can join them.
    /// Otherwise the user can only be invited, once.
    pub masquerade: bool,
}

/// One step towards the desired state of an agent room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Find the room by its alias, or create it: the user (named, with its picture), the
    /// room (name, topic, settings, space parent) and the invites in one request.
    EnsureRoom {
        alias_localpart: String,
        name: String,
        avatar: Option<AvatarWant>,
    },
    Invite {
        room: OwnedRoomId,
        by: OwnedUserId,
        user: OwnedUserId,
    },
    Join {
        room: OwnedRoomId,
        user: OwnedUserId,
    },
    Leave {
        room: OwnedRoomId,
        user: OwnedUserId,
    },
    ApplySettings {
        room: OwnedRoomId,
        by: OwnedUserId,
    },
    SetName {
        room: OwnedRoomId,
        user: OwnedUserId,
        name: String,
    },
    SetTopic {
        room: OwnedRoomId,
        by: OwnedUserId,
        topic: String,
    },
    /// Set the agent user's avatar, unless a person replaced the one roster set
    /// (`replaces`, the `mxc://` roster set before) or set one before roster did.
    SetAvatar {
        user: OwnedUserId,
        want: AvatarWant,
        replaces: Option<String>,
    },
    LinkSpace {
        room: OwnedRoomId,
        space: OwnedRoomId,
        by: OwnedUserId,
        /// Also set the room's `m.space.parent` (not set at creation).
        parent: bool,
    },
    /// Post the agent's last messages from Letta into the room roster created.
    ImportHistory {
        room: OwnedRoomId,
        user: OwnedUserId,
    },
    UnlinkSpace {
        room: OwnedRoomId,
        space: OwnedRoomId,
    },
    Deactivate {
        user: OwnedUserId,
    },
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::EnsureRoom { .. } => "ensure_room",
            Action::Invite { .. } => "invite",
            Action::Join { .. } => "join",
            Action::Leave { .. } => "leave",
            Action::ApplySettings { .. } => "apply_settings",
            Action::SetName { .. } => "set_name",
            Action::SetTopic { .. } => "set_topic",
            Action::SetAvatar { .. } => "set_avatar",
            Action::LinkSpace { .. } => "link_space",
            Action::ImportHistory { .. } => "import_history",
            Action::UnlinkSpace { .. } => "unlink_space",
            Action::Deactivate { .. } => "deactivate",
        }
    }
}

/// The actions an agent room needs, and what the model let roster skip.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Members the model shows in place: no action (`roster_membership_cache_total{hit}`).
    pub hits: u32,
    /// Members the model shows missing: an action follows.
    pub misses: u32,
    /// Members roster will not touch, with why (banned): reported, never retried.
    pub blocked: Vec<(OwnedUserId, &'static str)>,
}

/// Everything the planner reads; it changes nothing.
pub struct PlanInput<'a> {
    pub agent: &'a Agent,
    pub agent_user: &'a UserId,
    pub bot: &'a UserId,
    pub record: &'a RoomRecord,
    pub required: &'a [RequiredMember],
    pub space: Option<&'a RoomId>,
    /// The picture the agent should have; `None` when `agents.avatar` is `none`.
    pub avatar: Option<&'a AvatarWant>,
    pub model: &'a Model,
}

/// The smallest set of actions that brings one agent room to its desired state.
pub fn plan_agent(input: &PlanInput<'_>) -> Plan {
    let mut plan = Plan::default();
    if input.model.is_deactivated(input.agent_user) {
        // Listed again after its removal deactivated it (or deleted through lifecycle): a
        // deactivated user can neither join nor make a room, and roster does not bring
        // users back. Said in status instead of failing at every run.
        plan.blocked
            .push((input.agent_user.to_owned(), "deactivated"));
        return plan;
    }
    let Some(room) = input.record.room_id.clone() else {
        plan.actions.push(Action::EnsureRoom {
            alias_localpart: input.record.localpart.clone(),
            name: input.agent.name.clone(),
            avatar: input.avatar.cloned(),
        });
        return plan;
    };
    let agent_user = input.agent_user.to_owned();
    let membership = |user: &UserId| input.model.effective_membership(&room, user);

    // The agent itself: the bot (power 50) can invite it back if it ever left.
    ensure_joined(
        &mut plan,
        &room,
        &agent_user,
        input.bot,
        membership(&agent_user),
    );
    for required in input.required {
        let user = &required.user;
        if input.model.is_deactivated(user) {
            continue;
        }
        let now = membership(user);
        if required.masquerade {
            ensure_joined(&mut plan, &room, user, &agent_user, now);
        } else {
            match now {
                Some(Membership::Join | Membership::Invite) => plan.hits += 1,
                Some(Membership::Ban) => plan.blocked.push((user.clone(), "banned")),
                _ if input.record.invited_external.contains(user) => plan.hits += 1,
                _ => {
                    plan.misses += 1;
                    plan.actions.push(Action::Invite {
                        room: room.clone(),
                        by: agent_user.clone(),
                        user: user.clone(),
                    });
                }
            }
        }
    }
    if !input.record.settings_applied {
        plan.actions.push(Action::ApplySettings {
            room: room.clone(),
            by: agent_user.clone(),
        });
    }
    if input.record.applied_name.as_deref() != Some(input.agent.name.as_str()) {
        plan.actions.push(Action::SetName {
            room: room.clone(),
            user: agent_user.clone(),
            name: input.agent.name.clone(),
        });
    }
    let topic = topic_for(&input.agent.name);
    if input.record.applied_topic.as_deref() != Some(topic.as_str()) {
        plan.actions.push(Action::SetTopic {
            room: room.clone(),
            by: agent_user.clone(),
            topic,
        });
    }
    if let Some(want) = input.avatar
        && !input.record.avatar_hand_set
        && input.record.avatar.as_ref().map(|a| &a.want) != Some(want)
    {
        plan.actions.push(Action::SetAvatar {
            user: agent_user.clone(),
            want: want.clone(),
            replaces: input.record.avatar.as_ref().map(|a| a.mxc.clone()),
        });
    }
    if let Some(space) = input.space
        && !input.record.space_linked
    {
        plan.actions.push(Action::LinkSpace {
            room: room.clone(),
            space: space.to_owned(),
            by: agent_user.clone(),
            parent: !input.record.space_parent_set,
        });
    }
    // Last, once the room is complete and the agent in it.
    if input.record.history_pending
        && input.model.effective_membership(&room, &agent_user) == Some(Membership::Join)
    {
        plan.actions.push(Action::ImportHistory {
            room,
            user: agent_user,
        });
    }
    plan
}

/// The space as roster keeps it: people are in it like in agent rooms.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceRecord {
    pub room_id: Option<OwnedRoomId>,
    /// Users roster cannot act as; they are invited once, never again.
    #[serde(default)]
    pub invited_external: BTreeSet<OwnedUserId>,
}

/// The actions that bring the space's required members in: the bot (its creator) invites,
/// the members join; users roster cannot act as are invited once.
pub fn plan_space(
    space: &RoomId,
    record: &SpaceRecord,
    bot: &UserId,
    required: &[RequiredMember],
    model: &Model,
) -> Plan {
    let mut plan = Plan::default();
    let membership = |user: &UserId| model.effective_membership(space, user);
    for required in required {
        let user = &required.user;
        if model.is_deactivated(user) {
            continue;
        }
        let now = membership(user);
        if user == bot {
            // Nobody else can invite the creator back; a join works if it is invited.
            match now {
                Some(Membership::Join) => plan.hits += 1,
                Some(Membership::Ban) => plan.blocked.push((user.clone(), "banned")),
                _ => {
                    plan.misses += 1;
                    plan.actions.push(Action::Join {
                        room: space.to_owned(),
                        user: user.clone(),
                    });
                }
            }
        } else if required.masquerade {
            ensure_joined(&mut plan, space, user, bot, now);
        } else {
            match now {
                Some(Membership::Join | Membership::Invite) => plan.hits += 1,
                Some(Membership::Ban) => plan.blocked.push((user.clone(), "banned")),
                _ if record.invited_external.contains(user) => plan.hits += 1,
                _ => {
                    plan.misses += 1;
                    plan.actions.push(Action::Invite {
                        room: space.to_owned(),
                        by: bot.to_owned(),
                        user: user.clone(),
                    });
                }
            }
        }
    }
    plan
}

fn ensure_joined(
    plan: &mut Plan,
    room: &RoomId,
    user: &UserId,
    inviter: &UserId,
    now: Option<Membership>,
) {
    let join = Action::Join {
        room: room.to_owned(),
        user: user.to_owned(),
    };
    match now {
        Some(Membership::Join) => plan.hits += 1,
        Some(Membership::Ban) => plan.blocked.push((user.to_owned(), "banned")),
        Some(Membership::Invite) => {
            plan.misses += 1;
            plan.actions.push(join);
        }
        _ => {
            plan.misses += 1;
            plan.actions.push(Action::Invite {
                room: room.to_owned(),
                by: inviter.to_owned(),
                user: user.to_owned(),
            });
            plan.actions.push(join);
        }
    }
}

/// What retiring an agent takes: out of the space, required members out of the room.
pub fn plan_removal(
    record: &RoomRecord,
    agent_user: &UserId,
    required: &[RequiredMember],
    space: Option<&RoomId>,
    model: &Model,
    deactivate_agent: bool,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let Some(room) = record.room_id.clone() else {
        return actions;
    };
    if let Some(space) = space
        && record.space_linked
    {
        actions.push(Action::UnlinkSpace {
            room: room.clone(),
            space: space.to_owned(),
        });
    }
    for required in required.iter().filter(|r| r.masquerade) {
        let present = matches!(
            model.effective_membership(&room, &required.user),
            Some(Membership::Join | Membership::Invite)
        );
        if present {
            actions.push(Action::Leave {
                room: room.clone(),
                user: required.user.clone(),
            });
        }
    }
    if deactivate_agent && !model.is_deactivated(agent_user) {
        actions.push(Action::Deactivate {
            user: agent_user.to_owned(),
        });
    }
    actions
}

/// What a good listing means for the agents roster knows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ListingOutcome {
    /// Agents new, renamed, or back: their rooms need a look.
    pub changed: Vec<String>,
    /// Agents absent for longer than the grace period: to be retired.
    pub expired: Vec<String>,
}

/// Desired agents and roster's records of their rooms.
#[derive(Debug, Default, Clone)]
pub struct AgentBook {
    pub desired: BTreeMap<String, Agent>,
    /// The "Letta Agents" space, once found or created.
    pub space: SpaceRecord,
    pub records: BTreeMap<String, RoomRecord>,
    room_index: HashMap<OwnedRoomId, String>,
}

impl AgentBook {
    /// Puts back a record read from the store, with the agent it was last listed as.
    pub fn restore(&mut self, record: RoomRecord) {
        if !record.retired && !record.removing && !record.name.is_empty() {
            self.desired
                .entry(record.agent_id.clone())
                .or_insert_with(|| Agent {
                    id: record.agent_id.clone(),
                    name: record.name.clone(),
                });
        }
        self.update(record);
    }

    /// `record`, a copy taken when a run planned and changed by its actions (room, what was
    /// applied), with the listing's fields (name, absence, removal) as they are now: a
    /// listing may have changed them while the action ran. What to save and `update`.
    pub fn with_listing(&self, mut record: RoomRecord) -> RoomRecord {
        if let Some(now) = self.records.get(&record.agent_id) {
            record.name.clone_from(&now.name);
            record.missing_since_ms = now.missing_since_ms;
            record.removing = now.removing;
            record.retired = now.retired;
        }
        record
    }

    /// Replaces a record after an action changed it.
    pub fn update(&mut self, record: RoomRecord) {
        // A record that moved to another room (its alias followed) leaves the old one.
        let moved_from = self
            .records
            .get(&record.agent_id)
            .and_then(|old| old.room_id.clone())
            .filter(|old| record.room_id.as_ref() != Some(old));
        if let Some(old) = moved_from
            && self.room_index.get(&old) == Some(&record.agent_id)
        {
            self.room_index.remove(&old);
        }
        if let Some(room) = &record.room_id {
            self.room_index
                .insert(room.clone(), record.agent_id.clone());
        }
        self.records.insert(record.agent_id.clone(), record);
    }

    pub fn agent_for_room(&self, room: &RoomId) -> Option<&str> {
        self.room_index.get(room).map(String::as_str)
    }

    /// Splits `listed` into the agents that may have their user and room, and those left
    /// out with the agent whose user and alias their id makes too (`agent-1` and `1` both
    /// make `@agent_1`). An agent with a live record keeps its own; a newcomer whose
    /// localpart a live record or an agent listed before it holds is left out, so it never
    /// takes over (renames, then leaves or deactivates) another agent's room and user.
    pub fn without_taken_localparts(
        &self,
        listed: Vec<Agent>,
    ) -> (Vec<Agent>, Vec<(Agent, String)>) {
        let mut holders: HashMap<String, String> = self
            .records
            .values()
            .filter(|r| !r.retired)
            .map(|r| (r.localpart.clone(), r.agent_id.clone()))
            .collect();
        let mut kept = Vec::with_capacity(listed.len());
        let mut left_out = Vec::new();
        for agent in listed {
            let live = self.records.get(&agent.id).is_some_and(|r| !r.retired);
            if !live && let Some(localpart) = agent_localpart(&agent.id) {
                match holders.get(&localpart) {
                    Some(holder) if *holder != agent.id => {
                        let holder = holder.clone();
                        left_out.push((agent, holder));
                        continue;
                    }
                    _ => {
                        holders.insert(localpart, agent.id.clone());
                    }
                }
            }
            kept.push(agent);
        }
        (kept, left_out)
    }

    /// Applies a complete, successful listing observed at `now_ms`.
    ///
    /// Never called for a failed listing: a Letta outage must not look like "every agent
    /// was deleted". Absence only counts once it lasted `grace_ms`.
    pub fn observe_listing(
        &mut self,
        agents: &[Agent],
        now_ms: u64,
        grace_ms: u64,
    ) -> ListingOutcome {
        let mut outcome = ListingOutcome::default();
        let listed: BTreeMap<&str, &Agent> = agents.iter().map(|a| (a.id.as_str(), a)).collect();
        for agent in listed.values() {
            let Some(localpart) = agent_localpart(&agent.id) else {
                continue;
            };
            let record = self
                .records
                .entry(agent.id.clone())
                .or_insert_with(|| RoomRecord {
                    agent_id: agent.id.clone(),
                    localpart,
                    ..RoomRecord::default()
                });
            let was_missing = record.missing_since_ms.take().is_some();
            let revived =
                std::mem::take(&mut record.retired) | std::mem::take(&mut record.removing);
            record.name = agent.name.clone();
            let renamed = self.desired.get(&agent.id).map(|a| &a.name) != Some(&agent.name);
            if renamed || was_missing || revived {
                outcome.changed.push(agent.id.clone());
            }
            self.desired.insert(agent.id.clone(), (*agent).clone());
        }
        for (id, record) in self.records.iter_mut() {
            if record.retired || listed.contains_key(id.as_str()) {
                continue;
            }
            let since = *record.missing_since_ms.get_or_insert(now_ms);
            if !record.removing && now_ms.saturating_sub(since) >= grace_ms {
                record.removing = true;
                self.desired.remove(id);
                outcome.expired.push(id.clone());
            }
        }
        outcome
    }

    /// Marks an agent retired after its removal actions succeeded.
    /// The record of an agent whose removal is still under way, retired; `None` when the
    /// agent came back (or is unknown) meanwhile.
    pub fn retirement(&self, agent_id: &str) -> Option<RoomRecord> {
        let record = self.records.get(agent_id).filter(|r| r.removing)?;
        Some(record.clone().retired())
    }

    /// Retires an agent whose removal is still under way (see [`AgentBook::retirement`]).
    pub fn retire(&mut self, agent_id: &str) -> Option<RoomRecord> {
        let retired = self.retirement(agent_id)?;
        self.desired.remove(agent_id);
        self.update(retired.clone());
        Some(retired)
    }

    /// Whether roster looks after `room`: an agent room it recorded, or the space.
    pub fn manages_room(&self, room: &RoomId) -> bool {
        self.room_index.contains_key(room) || self.space.room_id.as_deref() == Some(room)
    }

    /// Records roster still looks after (not retired), all or those of `only`.
    pub fn live_records<'a>(
        &'a self,
        only: Option<&'a BTreeSet<String>>,
    ) -> impl Iterator<Item = &'a RoomRecord> {
        self.records
            .values()
            .filter(|r| !r.retired)
            .filter(move |r| only.is_none_or(|o| o.contains(&r.agent_id)))
    }

    /// Agents that should have a room now.
    pub fn active(&self) -> impl Iterator<Item = (&Agent, &RoomRecord)> {
        self.desired
            .values()
            .filter_map(|a| Some((a, self.records.get(&a.id)?)))
            .filter(|(_, r)| !r.retired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::model::MemberEvent;
    use ruma::{owned_room_id, owned_user_id};

    fn agent(name: &str) -> Agent {
        Agent {
            id: "agent-1".into(),
            name: name.into(),
        }
    }

    fn required() -> Vec<RequiredMember> {
        vec![
            RequiredMember {
                user: owned_user_id!("@letta:ex.org"),
                masquerade: true,
            },
            RequiredMember {
                user: owned_user_id!("@admin:ex.org"),
                masquerade: true,
            },
            RequiredMember {
                user: owned_user_id!("@ops:other.org"),
                masquerade: false,
            },
        ]
    }

    fn record_with_room() -> RoomRecord {
        RoomRecord {
            agent_id: "agent-1".into(),
            localpart: "agent_1".into(),
            room_id: Some(owned_room_id!("!r:ex.org")),
            applied_name: Some("One".into()),
            applied_topic: Some(topic_for("One")),
            space_linked: true,
            space_parent_set: true,
            settings_applied: true,
            ..RoomRecord::default()
        }
    }

    fn member(model: &mut Model, user: &str, membership: Membership, ts: u64) {
        let user = UserId::parse(user).unwrap();
        model.apply(&[MemberEvent {
            room_id: owned_room_id!("!r:ex.org"),
            user_id: user.clone(),
            sender: user,
            membership,
            displayname: None,
            avatar_url: None,
            event_id: format!("$e{ts}").try_into().unwrap(),
            origin_server_ts: ts,
        }]);
    }

    fn plan(model: &Model, record: &RoomRecord, name: &str) -> Plan {
        plan_with_avatar(model, record, name, None)
    }

    /// `record` as roster leaves it after applying a rename to `name`.
    fn renamed(record: &mut RoomRecord, name: &str) {
        record.applied_name = Some(name.into());
        record.applied_topic = Some(topic_for(name));
    }

    fn plan_with_avatar(
        model: &Model,
        record: &RoomRecord,
        name: &str,
        avatar: Option<&AvatarWant>,
    ) -> Plan {
        let agent = agent(name);
        let required = required();
        plan_agent(&PlanInput {
            agent: &agent,
            agent_user: &owned_user_id!("@agent_1:ex.org"),
            bot: &owned_user_id!("@letta:ex.org"),
            record,
            required: &required,
            space: Some(&owned_room_id!("!space:ex.org")),
            avatar,
            model,
        })
    }

    fn generated(name: &str) -> AvatarWant {
        AvatarWant::Generated {
            look: crate::avatar::look("agent-1", name),
        }
    }

    fn converged_model() -> Model {
        let mut model = Model::new();
        member(&mut model, "@agent_1:ex.org", Membership::Join, 1);
        member(&mut model, "@letta:ex.org", Membership::Join, 2);
        member(&mut model, "@admin:ex.org", Membership::Join, 3);
        member(&mut model, "@ops:other.org", Membership::Invite, 4);
        model
    }

    /// A record that moved to another room (its alias followed) no longer claims the old
    /// one: events there are not kept for it, and the room can be collected.
    #[test]
    fn should_forget_the_old_room_of_a_record_that_moved() {
        let mut book = AgentBook::default();
        let old = record_with_room();
        book.update(old.clone());
        let moved = RoomRecord {
            room_id: Some(owned_room_id!("!new:ex.org")),
            ..old
        };
        book.update(moved);
        assert!(!book.manages_room(&owned_room_id!("!r:ex.org")));
        assert_eq!(
            book.agent_for_room(&owned_room_id!("!new:ex.org")),
            Some("agent-1")
        );
    }

    #[test]
    fn should_ensure_the_room_first() {
        let record = RoomRecord {
            agent_id: "agent-1".into(),
            localpart: "agent_1".into(),
            ..RoomRecord::default()
        };
        let plan = plan(&Model::new(), &record, "One");
        assert_eq!(
            plan.actions,
            vec![Action::EnsureRoom {
                alias_localpart: "agent_1".into(),
                name: "One".into(),
                avatar: None,
            }]
        );
    }

    #[test]
    fn should_do_nothing_when_converged() {
        let plan = plan(&converged_model(), &record_with_room(), "One");
        assert!(plan.actions.is_empty(), "{plan:?}");
        assert_eq!(plan.hits, 4);
        assert_eq!(plan.misses, 0);
    }

    #[test]
    fn should_reinvite_and_rejoin_a_kicked_required_member() {
        let mut model = converged_model();
        member(&mut model, "@admin:ex.org", Membership::Leave, 10);
        let plan = plan(&model, &record_with_room(), "One");
        let room = owned_room_id!("!r:ex.org");
        assert_eq!(
            plan.actions,
            vec![
                Action::Invite {
                    room: room.clone(),
                    by: owned_user_id!("@agent_1:ex.org"),
                    user: owned_user_id!("@admin:ex.org")
                },
                Action::Join {
                    room,
                    user: owned_user_id!("@admin:ex.org")
                },
            ]
        );
        assert_eq!(plan.misses, 1);
    }

    #[test]
    fn should_not_repeat_an_action_whose_event_is_still_on_its_way() {
        let mut model = converged_model();
        let room = owned_room_id!("!r:ex.org");
        let admin = owned_user_id!("@admin:ex.org");
        member(&mut model, "@admin:ex.org", Membership::Leave, 10);
        model.expect(&room, &admin, Membership::Join);
        assert!(plan(&model, &record_with_room(), "One").actions.is_empty());
        // The next pushed event about admin replaces the expectation, whatever it says.
        member(&mut model, "@admin:ex.org", Membership::Leave, 11);
        assert_eq!(plan(&model, &record_with_room(), "One").actions.len(), 2);
    }

    #[test]
    fn should_accept_a_pending_invite_by_joining() {
        let mut model = converged_model();
        member(&mut model, "@letta:ex.org", Membership::Invite, 10);
        let plan = plan(&model, &record_with_room(), "One");
        assert_eq!(
            plan.actions,
            vec![Action::Join {
                room: owned_room_id!("!r:ex.org"),
                user: owned_user_id!("@letta:ex.org")
            }]
        );
    }

    #[test]
    fn should_report_a_banned_member_instead_of_acting() {
        let mut model = converged_model();
        member(&mut model, "@admin:ex.org", Membership::Ban, 10);
        let plan = plan(&model, &record_with_room(), "One");
        assert!(plan.actions.is_empty());
        assert_eq!(
            plan.blocked,
            vec![(owned_user_id!("@admin:ex.org"), "banned")]
        );
    }

    #[test]
    fn should_never_touch_a_deactivated_member() {
        let mut model = converged_model();
        member(&mut model, "@admin:ex.org", Membership::Leave, 10);
        model
            .identities
            .mark_deactivated(owned_user_id!("@admin:ex.org"));
        assert!(plan(&model, &record_with_room(), "One").actions.is_empty());
    }

    #[test]
    fn should_report_an_agent_whose_user_is_deactivated_instead_of_acting() {
        let mut model = converged_model();
        member(&mut model, "@admin:ex.org", Membership::Leave, 10);
        model
            .identities
            .mark_deactivated(owned_user_id!("@agent_1:ex.org"));
        for record in [record_with_room(), RoomRecord::default()] {
            let plan = plan(&model, &record, "Renamed");
            assert!(plan.actions.is_empty(), "{:?}", plan.actions);
            assert_eq!(
                plan.blocked,
                vec![(owned_user_id!("@agent_1:ex.org"), "deactivated")]
            );
        }
    }

    #[test]
    fn should_invite_an_outside_user_once() {
        let mut model = converged_model();
        member(&mut model, "@ops:other.org", Membership::Leave, 10);
        let mut record = record_with_room();
        let first = plan(&model, &record, "One");
        assert_eq!(first.actions.len(), 1);
        assert_eq!(first.actions[0].kind(), "invite");
        record
            .invited_external
            .insert(owned_user_id!("@ops:other.org"));
        assert!(plan(&model, &record, "One").actions.is_empty());
    }

    #[test]
    fn should_rename_retopic_and_link_the_space() {
        let mut record = record_with_room();
        record.space_linked = false;
        let plan = plan(&converged_model(), &record, "Renamed");
        let kinds: Vec<_> = plan.actions.iter().map(Action::kind).collect();
        assert_eq!(kinds, vec!["set_name", "set_topic", "link_space"]);
        assert!(plan.actions.contains(&Action::SetTopic {
            room: owned_room_id!("!r:ex.org"),
            by: owned_user_id!("@agent_1:ex.org"),
            topic: "Letta agent Renamed".into()
        }));
        assert!(matches!(
            plan.actions[2],
            Action::LinkSpace { parent: false, .. }
        ));
    }

    #[test]
    fn should_set_the_avatar_only_when_the_picture_changes() {
        let model = converged_model();
        let quiet = |record: &RoomRecord, name, want| {
            plan_with_avatar(&model, record, name, want)
                .actions
                .is_empty()
        };
        let mut record = record_with_room();
        let want = generated("One");
        let first = plan_with_avatar(&model, &record, "One", Some(&want));
        assert_eq!(
            first.actions,
            vec![Action::SetAvatar {
                user: owned_user_id!("@agent_1:ex.org"),
                want: want.clone(),
                replaces: None
            }]
        );
        record.avatar = Some(AppliedAvatar {
            want: want.clone(),
            mxc: "mxc://ex.org/a".into(),
        });
        assert!(quiet(&record, "One", Some(&want)));
        // A rename keeping the first letter keeps the picture.
        renamed(&mut record, "Only");
        let same_letter = generated("Only");
        assert_eq!(same_letter, want);
        assert!(quiet(&record, "Only", Some(&same_letter)));
        // Another first letter: a new picture, replacing the one roster set.
        renamed(&mut record, "Two");
        let other = generated("Two");
        assert_eq!(
            plan_with_avatar(&model, &record, "Two", Some(&other)).actions,
            vec![Action::SetAvatar {
                user: owned_user_id!("@agent_1:ex.org"),
                want: other.clone(),
                replaces: Some("mxc://ex.org/a".into())
            }]
        );
        // A person set one by hand, or avatars are off: nothing.
        record.avatar_hand_set = true;
        assert!(quiet(&record, "Two", Some(&other)));
        record.avatar_hand_set = false;
        assert!(quiet(&record, "Two", None));
    }

    #[test]
    fn should_import_history_last_once_the_agent_is_in_its_room() {
        let mut record = record_with_room();
        record.history_pending = true;
        let mut model = Model::new();
        member(&mut model, "@letta:ex.org", Membership::Join, 2);
        member(&mut model, "@admin:ex.org", Membership::Join, 3);
        member(&mut model, "@ops:other.org", Membership::Invite, 4);
        let kinds: Vec<_> = plan(&model, &record, "One")
            .actions
            .iter()
            .map(Action::kind)
            .collect();
        assert_eq!(kinds, vec!["invite", "join"], "not before the agent joined");
        member(&mut model, "@agent_1:ex.org", Membership::Join, 5);
        assert_eq!(
            plan(&model, &record, "One").actions,
            vec![Action::ImportHistory {
                room: owned_room_id!("!r:ex.org"),
                user: owned_user_id!("@agent_1:ex.org")
            }]
        );
    }

    #[test]
    fn should_bring_required_members_into_the_space() {
        let space = owned_room_id!("!space:ex.org");
        let mut model = Model::new();
        let join = |model: &mut Model, user: &str, membership, n: u64| {
            let user = UserId::parse(user).unwrap();
            model.apply(&[MemberEvent {
                room_id: space.clone(),
                user_id: user.clone(),
                sender: user,
                membership,
                displayname: None,
                avatar_url: None,
                event_id: format!("$s{n}").try_into().unwrap(),
                origin_server_ts: n,
            }]);
        };
        join(&mut model, "@letta:ex.org", Membership::Join, 1);
        let mut record = SpaceRecord {
            room_id: Some(space.clone()),
            ..SpaceRecord::default()
        };
        let bot = owned_user_id!("@letta:ex.org");
        let plan = plan_space(&space, &record, &bot, &required(), &model);
        assert_eq!(
            plan.actions,
            vec![
                Action::Invite {
                    room: space.clone(),
                    by: bot.clone(),
                    user: owned_user_id!("@admin:ex.org")
                },
                Action::Join {
                    room: space.clone(),
                    user: owned_user_id!("@admin:ex.org")
                },
                Action::Invite {
                    room: space.clone(),
                    by: bot.clone(),
                    user: owned_user_id!("@ops:other.org")
                },
            ]
        );
        join(&mut model, "@admin:ex.org", Membership::Join, 2);
        record
            .invited_external
            .insert(owned_user_id!("@ops:other.org"));
        let converged = plan_space(&space, &record, &bot, &required(), &model);
        assert!(converged.actions.is_empty());
        assert_eq!(converged.hits, 3);
        // Kicked from the space: back by the bot's invite.
        join(&mut model, "@admin:ex.org", Membership::Leave, 3);
        assert_eq!(
            plan_space(&space, &record, &bot, &required(), &model)
                .actions
                .len(),
            2
        );
    }

    #[test]
    fn should_retire_only_after_the_grace_period() {
        let mut book = AgentBook::default();
        let a = Agent {
            id: "agent-a".into(),
            name: "A".into(),
        };
        let b = Agent {
            id: "agent-b".into(),
            name: "B".into(),
        };
        // Listings where only `a` is present: what expires at `at`.
        let only_a = |book: &mut AgentBook, at| {
            book.observe_listing(std::slice::from_ref(&a), at, 100)
                .expired
        };
        let first = book.observe_listing(&[a.clone(), b.clone()], 0, 100);
        assert_eq!(
            first.changed,
            vec!["agent-a".to_string(), "agent-b".to_string()]
        );
        assert!(
            book.observe_listing(&[a.clone(), b.clone()], 10, 100)
                .changed
                .is_empty()
        );
        // b missing: not removed before the grace period ...
        assert!(only_a(&mut book, 20).is_empty());
        assert!(only_a(&mut book, 119).is_empty());
        // ... coming back resets the clock ...
        assert_eq!(
            book.observe_listing(&[a.clone(), b.clone()], 120, 100)
                .changed,
            vec!["agent-b".to_string()]
        );
        assert!(only_a(&mut book, 200).is_empty());
        // ... and consistent absence past it expires the agent.
        assert_eq!(only_a(&mut book, 300), vec!["agent-b".to_string()]);
        assert!(book.retire("agent-b").is_some());
        assert!(only_a(&mut book, 400).is_empty());
        assert_eq!(book.active().count(), 1);
    }

    #[test]
    fn should_keep_the_listing_when_an_action_saves_a_stale_copy() {
        let mut book = AgentBook::default();
        let b = agent("B");
        book.observe_listing(std::slice::from_ref(&b), 0, 100);
        book.observe_listing(&[], 10, 100);
        assert_eq!(
            book.observe_listing(&[], 200, 100).expired,
            vec![b.id.clone()]
        );
        // A removal run copies the record, then unlinks the space ...
        let mut planned = book.records[&b.id].clone();
        assert!(planned.removing);
        // ... while a listing brings the agent back under a new name ...
        let back = Agent {
            name: "B again".into(),
            ..b.clone()
        };
        book.observe_listing(std::slice::from_ref(&back), 210, 100);
        // ... and the run saves its copy afterwards.
        planned.space_linked = false;
        let saved = book.with_listing(planned);
        book.update(saved.clone());
        assert!(!saved.space_linked, "what the action did is kept");
        assert!(!saved.removing, "the agent is back: not removing");
        assert_eq!(saved.name, "B again");
        assert_eq!(saved.missing_since_ms, None);
        assert_eq!(book.records[&b.id], saved);
        assert_eq!(
            book.retire(&b.id),
            None,
            "an agent that came back is not retired"
        );
        assert!(!book.records[&b.id].retired);
    }

    #[test]
    fn should_keep_desired_agents_across_a_restart() {
        let mut book = AgentBook::default();
        book.observe_listing(&[agent("One")], 0, 100);
        let mut restarted = AgentBook::default();
        for record in book.records.values() {
            restarted.restore(record.clone());
        }
        assert_eq!(restarted.desired["agent-1"].name, "One");
        assert!(
            restarted
                .observe_listing(&[agent("One")], 1, 100)
                .changed
                .is_empty()
        );
    }

    #[test]
    fn should_follow_a_rename() {
        let mut book = AgentBook::default();
        book.observe_listing(&[agent("One")], 0, 100);
        assert_eq!(
            book.observe_listing(&[agent("Two")], 1, 100).changed,
            vec!["agent-1".to_string()]
        );
        assert_eq!(book.desired["agent-1"].name, "Two");
    }

    /// Ids that make one localpart: the agent with a live record keeps it; among
    /// newcomers, the first listed; once the holder is retired, another may take it.
    #[test]
    fn should_leave_out_agents_whose_localpart_another_holds() {
        let named = |id: &str| Agent {
            id: id.into(),
            name: id.into(),
        };
        let ids = |agents: &[Agent]| agents.iter().map(|a| a.id.clone()).collect::<Vec<_>>();
        let mut book = AgentBook::default();
        let (kept, left_out) =
            book.without_taken_localparts(vec![named("1"), named("agent-1"), named("agent-2")]);
        assert_eq!(ids(&kept), ["1", "agent-2"]);
        assert_eq!(left_out, vec![(named("agent-1"), "1".to_owned())]);

        book.observe_listing(&kept, 0, 100);
        let (kept, left_out) = book.without_taken_localparts(vec![named("agent-1")]);
        assert_eq!((kept, left_out.len()), (vec![], 1), "the record holds it");

        book.observe_listing(&[], 1, 100);
        book.observe_listing(&[], 200, 100);
        book.retire("1").expect("its removal was under way");
        let (kept, _) = book.without_taken_localparts(vec![named("agent-1"), named("1")]);
        assert_eq!(ids(&kept), ["agent-1"], "the retired record holds nothing");
    }

    #[test]
    fn should_plan_removal_of_present_members_only() {
        let mut model = converged_model();
        member(&mut model, "@admin:ex.org", Membership::Leave, 10);
        let agent_user = owned_user_id!("@agent_1:ex.org");
        let space = owned_room_id!("!space:ex.org");
        let plan = |model: &Model, deactivate| {
            plan_removal(
                &record_with_room(),
                &agent_user,
                &required(),
                Some(&space),
                model,
                deactivate,
            )
            .iter()
            .map(Action::kind)
            .collect::<Vec<_>>()
        };
        // admin already left; the bot leaves; the outside user is not roster's to move.
        assert_eq!(plan(&model, false), vec!["unlink_space", "leave"]);
        assert_eq!(
            plan(&model, true),
            vec!["unlink_space", "leave", "deactivate"]
        );
        model.identities.mark_deactivated(agent_user.clone());
        assert_eq!(plan(&model, true), vec!["unlink_space", "leave"]);
    }
}
