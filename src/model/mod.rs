//! Holds what roster knows about room membership and computes what each new fact changes.
//!
//! Invariants: no I/O, no async, no clock.
//!
//! Ordering (why it holds for Matrix): a homeserver delivers an appservice's transactions
//! one at a time, in the order the events happened on it, so **delivery order** is the
//! order. Each accepted fact gets the next delivery sequence number and a later one always
//! wins. Timestamps (`origin_server_ts`) are set by whichever server sent the event and
//! skew or lie, so they order nothing: a crafted future timestamp cannot outrank a later
//! delivery. Redelivered events are recognised by event id (the member's current event,
//! and a bounded window of recent ids) and change nothing. A `joined_members` read
//! supersedes everything delivered before the read was asked for, and nothing after it.
//!
//! Member states are compact (hashes instead of ids and names): memory per membership is
//! part of roster's budget. The store keeps the full details beside them.

pub mod agents;
pub mod identity;

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::Serialize;

/// Recent event ids remembered to recognise redeliveries beyond a member's current event.
const RECENT_EVENTS: usize = 16_384;

/// A user's membership in a room, as `m.room.member` states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Membership {
    Invite,
    Join,
    Leave,
    Ban,
    Knock,
}

impl Membership {
    pub fn as_str(self) -> &'static str {
        match self {
            Membership::Invite => "invite",
            Membership::Join => "join",
            Membership::Leave => "leave",
            Membership::Ban => "ban",
            Membership::Knock => "knock",
        }
    }

    /// Unknown values (custom memberships) are not modelled.
    pub fn parse(text: &str) -> Option<Membership> {
        Some(match text {
            "invite" => Membership::Invite,
            "join" => Membership::Join,
            "leave" => Membership::Leave,
            "ban" => Membership::Ban,
            "knock" => Membership::Knock,
            _ => return None,
        })
    }
}

/// One `m.room.member` event, reduced to what roster uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberEvent {
    pub room_id: OwnedRoomId,
    pub user_id: OwnedUserId,
    pub sender: OwnedUserId,
    pub membership: Membership,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
    pub event_id: OwnedEventId,
    /// Shown and stored, never used to order.
    pub origin_server_ts: u64,
}

/// A member as a `joined_members` read lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedMember {
    pub user: OwnedUserId,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
}

/// What roster knows of one user in one room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemberState {
    pub membership: Membership,
    /// Delivery order: a later fact wins.
    pub seq: u64,
    /// The homeserver's timestamp of the event, for operators only.
    pub origin_server_ts: u64,
    /// Hash of the event id that set this state (0 for a read): its redelivery is a duplicate.
    #[serde(skip)]
    event: u64,
    /// Hash of display name and avatar: a join after a join is a profile change or nothing.
    #[serde(skip)]
    profile: u64,
}

/// What the store keeps of a member state beside the state itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDetail {
    /// `None` for a state learnt from a read.
    pub event_id: Option<OwnedEventId>,
    pub sender: OwnedUserId,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
}

impl MemberDetail {
    /// Rebuilds the state a stored row describes.
    pub fn state(&self, membership: Membership, seq: u64, origin_server_ts: u64) -> MemberState {
        MemberState {
            membership,
            seq,
            origin_server_ts,
            event: self.event_id.as_ref().map_or(0, |e| hash(e.as_str())),
            profile: profile_hash(self.displayname.as_deref(), self.avatar_url.as_deref()),
        }
    }
}

/// What an event meant, given what was known before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Invited,
    Joined,
    /// join -> join: a new display name or avatar, not a re-join.
    ProfileChanged,
    /// The member left by themself (or rejected an invite).
    Left,
    /// Someone else removed the member (kick, or withdrew an invite).
    Kicked,
    Banned,
    Unbanned,
    Knocked,
    /// Same membership and profile under a new event: nothing changed.
    Unchanged,
}

impl Transition {
    /// The `transition` label of `roster_member_transitions_total`.
    pub fn label(self) -> &'static str {
        match self {
            Transition::Invited => "invited",
            Transition::Joined => "joined",
            Transition::ProfileChanged => "profile_changed",
            Transition::Left => "left",
            Transition::Kicked => "kicked",
            Transition::Banned => "banned",
            Transition::Unbanned => "unbanned",
            Transition::Knocked => "knocked",
            Transition::Unchanged => "unchanged",
        }
    }
}

/// One accepted fact: the key, what it meant, the state to record and its details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub room_id: OwnedRoomId,
    pub user_id: OwnedUserId,
    pub transition: Transition,
    pub state: MemberState,
    pub detail: MemberDetail,
}

/// Observed membership of the rooms roster looks after, and what lifecycle events said
/// about identity users.
#[derive(Debug, Default, Clone)]
pub struct Model {
    rooms: HashMap<OwnedRoomId, HashMap<OwnedUserId, MemberState>>,
    pub identities: identity::Identities,
    pub agents: agents::AgentBook,
    /// Effects roster caused whose events have not been pushed yet: without them a run
    /// triggered by an earlier event would repeat an action already taken.
    /// Each with the sequence number it took, to tell a read asked before it from one
    /// asked after.
    expected: HashMap<(OwnedRoomId, OwnedUserId), (Membership, u64)>,
    /// Rooms forgotten to be read afresh and not read since: the events pushed meanwhile
    /// are kept, but they are a partial view that nothing may be planned from.
    unread: HashSet<OwnedRoomId>,
    /// The sequence number the next accepted fact (or expectation) gets.
    next_seq: u64,
    /// Hashes of recently accepted event ids, oldest first, and the same as a set.
    recent: VecDeque<u64>,
    recent_set: HashSet<u64>,
}

impl Model {
    pub fn new() -> Self {
        Model {
            next_seq: 1,
            ..Self::default()
        }
    }

    /// The known state of `user` in `room`.
    pub fn member(&self, room: &RoomId, user: &UserId) -> Option<&MemberState> {
        self.rooms.get(room)?.get(user)
    }

    /// The membership roster should plan with: what it just caused, else what it was told.
    pub fn effective_membership(&self, room: &RoomId, user: &UserId) -> Option<Membership> {
        self.expected
            .get(&(room.to_owned(), user.to_owned()))
            .map(|(membership, _)| *membership)
            .or_else(|| self.member(room, user).map(|m| m.membership))
    }

    /// Records that roster's own action will make `user`'s membership `membership`.
    /// The next pushed event about the same member replaces this.
    pub fn expect(&mut self, room: &RoomId, user: &UserId, membership: Membership) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.expected
            .insert((room.to_owned(), user.to_owned()), (membership, seq));
    }

    /// Every known member state of `room`, in no particular order.
    pub fn members(&self, room: &RoomId) -> impl Iterator<Item = (&OwnedUserId, &MemberState)> {
        self.rooms.get(room).into_iter().flatten()
    }

    pub fn rooms(&self) -> impl Iterator<Item = &OwnedRoomId> {
        self.rooms.keys()
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Member states held, over all rooms.
    pub fn membership_count(&self) -> usize {
        self.rooms.values().map(HashMap::len).sum()
    }

    /// A deactivated user is never invited or rejoined.
    pub fn is_deactivated(&self, user: &UserId) -> bool {
        self.identities.is_deactivated(user)
    }

    /// The sequence number of the last accepted fact: a read asked for now supersedes
    /// everything up to it.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Computes what `events`, delivered in this order, would change, without changing the
    /// model.
    ///
    /// Callers record the returned changes durably and then `commit` them, so a failed
    /// write leaves the model as it was and a redelivery is applied in full.
    pub fn preview(&self, events: &[MemberEvent]) -> Vec<Change> {
        // Later events in the same batch see earlier ones through these overlays.
        let mut overlay: HashMap<(&RoomId, &UserId), MemberState> = HashMap::new();
        let mut batch_events: HashSet<u64> = HashSet::new();
        let mut seq = self.next_seq;
        let mut changes = Vec::new();
        for event in events {
            let event_hash = hash(event.event_id.as_str());
            if self.recent_set.contains(&event_hash) || !batch_events.insert(event_hash) {
                continue;
            }
            let key = (event.room_id.as_ref(), event.user_id.as_ref());
            let before = overlay
                .get(&key)
                .or_else(|| self.member(key.0, key.1))
                .copied();
            if before.is_some_and(|b| b.event == event_hash) {
                continue;
            }
            let state = MemberState {
                membership: event.membership,
                seq,
                origin_server_ts: event.origin_server_ts,
                event: event_hash,
                profile: profile_hash(event.displayname.as_deref(), event.avatar_url.as_deref()),
            };
            seq += 1;
            overlay.insert(key, state);
            changes.push(Change {
                room_id: event.room_id.clone(),
                user_id: event.user_id.clone(),
                transition: transition(before.as_ref(), &state, event.sender == event.user_id),
                state,
                detail: MemberDetail {
                    event_id: Some(event.event_id.clone()),
                    sender: event.sender.clone(),
                    displayname: event.displayname.clone(),
                    avatar_url: event.avatar_url.clone(),
                },
            });
        }
        changes
    }

    /// Applies changes from `preview` or `observe_joined`.
    pub fn commit(&mut self, changes: impl IntoIterator<Item = Change>) {
        for change in changes {
            if change.state.event != 0 {
                self.remember_event(change.state.event);
            }
            self.restore(change.room_id, change.user_id, change.state);
        }
    }

    /// Puts back a recorded state unless a later one is already known.
    pub fn restore(&mut self, room: OwnedRoomId, user: OwnedUserId, state: MemberState) {
        self.next_seq = self.next_seq.max(state.seq + 1);
        let key = (room.clone(), user.clone());
        // The echo of the invite that came before roster's own join may arrive after the
        // join was answered; an invite cannot follow a join, so it leaves that in place.
        let echo_of_earlier_invite = state.membership == Membership::Invite
            && self.expected.get(&key).map(|(m, _)| *m) == Some(Membership::Join);
        if !echo_of_earlier_invite {
            self.expected.remove(&key);
        }
        let members = self.rooms.entry(room).or_default();
        match members.get(&user) {
            Some(known) if known.seq >= state.seq => {}
            _ => {
                members.insert(user, state);
            }
        }
    }

    fn remember_event(&mut self, event: u64) {
        if self.recent_set.insert(event) {
            self.recent.push_back(event);
            if self.recent.len() > RECENT_EVENTS
                && let Some(oldest) = self.recent.pop_front()
            {
                self.recent_set.remove(&oldest);
            }
        }
    }

    /// Reconciles the model with a `joined_members` read of `room`, asked for when the
    /// model's last fact was `asked_at_seq`.
    ///
    /// The read supersedes what was delivered before it was asked for: listed users become
    /// joined, users the model showed joined but the read does not list become left.
    /// Invites and bans are not in the read and stay as they are; so does any member whose
    /// state was delivered after the read was asked for (that fact is newer than the read).
    /// Returns the differences (drift), to record.
    pub fn observe_joined(
        &self,
        room: &RoomId,
        joined: &[ObservedMember],
        asked_at_seq: u64,
    ) -> Vec<Change> {
        let mut seq = self.next_seq;
        let mut changes = Vec::new();
        let mut change = |user: &UserId, membership, member: Option<&ObservedMember>| {
            let detail = MemberDetail {
                event_id: None,
                sender: user.to_owned(),
                displayname: member.and_then(|m| m.displayname.clone()),
                avatar_url: member.and_then(|m| m.avatar_url.clone()),
            };
            let state = detail.state(membership, seq, 0);
            seq += 1;
            let transition = if membership == Membership::Join {
                Transition::Joined
            } else {
                Transition::Left
            };
            changes.push(Change {
                room_id: room.to_owned(),
                user_id: user.to_owned(),
                transition,
                state,
                detail,
            });
        };
        let newer_than_read = |user: &UserId| {
            self.member(room, user)
                .is_some_and(|k| k.seq > asked_at_seq)
        };
        for member in joined {
            let known = self.member(room, &member.user);
            if known.is_some_and(|k| k.membership == Membership::Join)
                || newer_than_read(&member.user)
            {
                continue;
            }
            change(&member.user, Membership::Join, Some(member));
        }
        for (user, state) in self.members(room) {
            let still_joined = joined.iter().any(|m| &m.user == user);
            if state.membership == Membership::Join && !still_joined && !newer_than_read(user) {
                change(user, Membership::Leave, None);
            }
        }
        changes
    }

    /// Whether the model knows `room` well enough to plan from: it holds something of it,
    /// and the room was read since it was last forgotten.
    pub fn knows_room(&self, room: &RoomId) -> bool {
        !self.unread.contains(room)
            && (self.rooms.get(room).is_some_and(|m| !m.is_empty())
                || self.expected.keys().any(|(r, _)| r == room))
    }

    /// Whether `room` was forgotten (`forget_room`) and not read since.
    pub fn is_forgotten(&self, room: &RoomId) -> bool {
        self.unread.contains(room)
    }

    /// Drops what the model knows of `room`, so the next look reads it afresh; until that
    /// read is recorded (`read_recorded`), events pushed about it do not make it known.
    pub fn forget_room(&mut self, room: &RoomId) {
        self.drop_room(room);
        self.unread.insert(room.to_owned());
    }

    /// Notes that a read of `room`, asked for when the model's last fact was
    /// `asked_at_seq`, was recorded: the model knows the room again, and the joins roster
    /// expected there before the read was asked are what the read showed. Returns how many
    /// of them the read did not confirm (a join whose echo never came, or that was undone
    /// unseen): drift, as much as a change the read found.
    pub fn read_recorded(
        &mut self,
        room: &RoomId,
        asked_at_seq: u64,
        joined: &[ObservedMember],
    ) -> usize {
        self.unread.remove(room);
        let ended: Vec<OwnedUserId> = self
            .expected
            .iter()
            .filter(|((r, _), (membership, seq))| {
                r == room && *membership == Membership::Join && *seq <= asked_at_seq
            })
            .map(|((_, user), _)| user.clone())
            .collect();
        let mut unconfirmed = 0;
        for user in ended {
            let listed = joined.iter().any(|m| m.user == user);
            let model_joined =
                self.member(room, &user).map(|m| m.membership) == Some(Membership::Join);
            if listed && !model_joined {
                // Joined by the read, but the model holds a newer fact (the invite's echo,
                // come while the read was on its way): the join's echo is still due.
                continue;
            }
            if !listed {
                unconfirmed += 1;
            }
            self.expected.remove(&(room.to_owned(), user));
        }
        unconfirmed
    }

    /// Drops `room` for good (a room roster does not look after).
    pub fn drop_room(&mut self, room: &RoomId) {
        self.rooms.remove(room);
        self.expected.retain(|(r, _), _| r != room);
        self.unread.remove(room);
    }

    /// Rooms roster does not look after whose every state came before `seq`. They were
    /// kept only because one of roster's own users was in the event (an invite from
    /// anyone, a room being created before it was recorded) and serve nothing later.
    pub fn unmanaged_rooms_before(&self, seq: u64) -> Vec<OwnedRoomId> {
        self.rooms
            .iter()
            .filter(|(room, members)| {
                !self.agents.manages_room(room) && members.values().all(|m| m.seq < seq)
            })
            .map(|(room, _)| room.clone())
            .collect()
    }

    /// Applies events at once: `preview` then `commit`.
    #[cfg(test)]
    pub fn apply(&mut self, events: &[MemberEvent]) -> Vec<Change> {
        let changes = self.preview(events);
        self.commit(changes.clone());
        changes
    }
}

/// A process-local hash: stored states keep the full ids and are hashed again on restore.
fn hash(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    // 0 means "no event" (a read).
    hasher.finish().max(1)
}

fn profile_hash(displayname: Option<&str>, avatar_url: Option<&str>) -> u64 {
    let mut hasher = DefaultHasher::new();
    (displayname, avatar_url).hash(&mut hasher);
    hasher.finish()
}

fn transition(before: Option<&MemberState>, now: &MemberState, by_self: bool) -> Transition {
    use Membership::*;
    match (before.map(|s| s.membership), now.membership) {
        (Some(Join), Join) => {
            if before.is_some_and(|b| b.profile == now.profile) {
                Transition::Unchanged
            } else {
                Transition::ProfileChanged
            }
        }
        (Some(same), now) if same == now => Transition::Unchanged,
        (_, Join) => Transition::Joined,
        (_, Invite) => Transition::Invited,
        (_, Ban) => Transition::Banned,
        (_, Knock) => Transition::Knocked,
        (Some(Ban), Leave) => Transition::Unbanned,
        (_, Leave) if by_self => Transition::Left,
        (_, Leave) => Transition::Kicked,
    }
}

#[cfg(test)]
mod tests;
