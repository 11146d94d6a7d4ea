//! Holds what roster knows about room membership and computes what each new fact changes.
//!
//! Invariants: no I/O, no async, no clock. Every input carries its own order
//! (`origin_server_ts`, then `event_id`), so applying the same events in any order, or
//! twice, leaves the same state: redelivered and out-of-order transactions are harmless.

pub mod agents;
pub mod identity;

use std::collections::HashMap;

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::Serialize;

/// A user's membership in a room, as `m.room.member` states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
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

/// Where a member state sits in the room's history; newer wins.
///
/// The homeserver's timestamp is the only order an appservice is given across
/// transactions; the event id breaks ties so the choice is the same on every replay.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct EventOrder {
    pub origin_server_ts: u64,
    pub event_id: OwnedEventId,
}

/// One `m.room.member` event, reduced to what the model uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberEvent {
    pub room_id: OwnedRoomId,
    pub user_id: OwnedUserId,
    pub sender: OwnedUserId,
    pub membership: Membership,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
    pub order: EventOrder,
}

/// What roster knows of one user in one room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberState {
    pub membership: Membership,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
    /// Who caused the last change (differs from the member on invite, kick, ban).
    pub sender: OwnedUserId,
    pub order: EventOrder,
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
    /// Same membership and profile under a newer event: nothing changed.
    Unchanged,
    /// The event was already applied.
    Duplicate,
    /// An event older than the state already known: ignored.
    Stale,
}

impl Transition {
    /// Whether the state changed, so it must be recorded and may need action.
    pub fn changes_state(self) -> bool {
        !matches!(self, Transition::Duplicate | Transition::Stale)
    }
}

/// One event's outcome: the key, the transition and the state to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub room_id: OwnedRoomId,
    pub user_id: OwnedUserId,
    pub transition: Transition,
    pub state: MemberState,
}

/// Observed membership of every room roster has heard of, and what lifecycle events said
/// about identity users.
#[derive(Debug, Default, Clone)]
pub struct Model {
    rooms: HashMap<OwnedRoomId, HashMap<OwnedUserId, MemberState>>,
    pub identities: identity::Identities,
    pub agents: agents::AgentBook,
    /// Effects roster caused whose events have not been pushed yet: without them a run
    /// triggered by an earlier event would repeat an action already taken.
    expected: HashMap<(OwnedRoomId, OwnedUserId), Membership>,
}

impl Model {
    pub fn new() -> Self {
        Self::default()
    }

    /// The known state of `user` in `room`.
    pub fn member(&self, room: &RoomId, user: &UserId) -> Option<&MemberState> {
        self.rooms.get(room)?.get(user)
    }

    /// The membership roster should plan with: what it just caused, else what it was told.
    pub fn effective_membership(&self, room: &RoomId, user: &UserId) -> Option<Membership> {
        self.expected
            .get(&(room.to_owned(), user.to_owned()))
            .copied()
            .or_else(|| self.member(room, user).map(|m| m.membership))
    }

    /// Records that roster's own action will make `user`'s membership `membership`.
    /// The next pushed event about the same member replaces this.
    pub fn expect(&mut self, room: &RoomId, user: &UserId, membership: Membership) {
        self.expected
            .insert((room.to_owned(), user.to_owned()), membership);
    }

    /// Every known member state of `room`, in no particular order.
    pub fn members(&self, room: &RoomId) -> impl Iterator<Item = (&OwnedUserId, &MemberState)> {
        self.rooms.get(room).into_iter().flatten()
    }

    pub fn rooms(&self) -> impl Iterator<Item = &OwnedRoomId> {
        self.rooms.keys()
    }

    /// A deactivated user is never invited or rejoined.
    pub fn is_deactivated(&self, user: &UserId) -> bool {
        self.identities.is_deactivated(user)
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Computes what `events` would change, in order, without changing the model.
    ///
    /// Callers record the returned changes durably and then `commit` them, so a failed
    /// write leaves the model as it was and a redelivery is applied in full.
    pub fn preview(&self, events: &[MemberEvent]) -> Vec<Change> {
        // Later events in the same batch see earlier ones through this overlay.
        let mut overlay: HashMap<(&RoomId, &UserId), MemberState> = HashMap::new();
        let mut changes = Vec::new();
        for event in events {
            let key = (event.room_id.as_ref(), event.user_id.as_ref());
            let before = overlay.get(&key).or_else(|| self.member(key.0, key.1));
            let transition = transition(before, event);
            if !transition.changes_state() {
                continue;
            }
            let state = MemberState {
                membership: event.membership,
                displayname: event.displayname.clone(),
                avatar_url: event.avatar_url.clone(),
                sender: event.sender.clone(),
                order: event.order.clone(),
            };
            overlay.insert(key, state.clone());
            changes.push(Change {
                room_id: event.room_id.clone(),
                user_id: event.user_id.clone(),
                transition,
                state,
            });
        }
        changes
    }

    /// Applies changes from `preview` (or restored from the store).
    pub fn commit(&mut self, changes: impl IntoIterator<Item = Change>) {
        for change in changes {
            self.restore(change.room_id, change.user_id, change.state);
        }
    }

    /// Puts back a recorded state unless a newer one is already known.
    pub fn restore(&mut self, room: OwnedRoomId, user: OwnedUserId, state: MemberState) {
        self.expected.remove(&(room.clone(), user.clone()));
        let members = self.rooms.entry(room).or_default();
        match members.get(&user) {
            Some(known) if known.order >= state.order => {}
            _ => {
                members.insert(user, state);
            }
        }
    }

    /// Reconciles the model with a `joined_members` read of `room` taken at `now_ms`.
    ///
    /// A read is newer than anything pushed before it: listed users become joined, users the
    /// model showed joined but the read does not list become left. Invites and bans are not
    /// in the read and stay as they are. Returns the differences (drift), to record.
    pub fn observe_joined(
        &self,
        room: &RoomId,
        joined: &[(OwnedUserId, Option<String>, Option<String>)],
        now_ms: u64,
    ) -> Vec<Change> {
        // Newer than what the model holds even if the homeserver's clock runs ahead.
        let order = |user: &UserId| EventOrder {
            origin_server_ts: self
                .member(room, user)
                .map_or(now_ms, |k| now_ms.max(k.order.origin_server_ts + 1)),
            event_id: format!("$roster-read-{now_ms}-{}", user.localpart())
                .try_into()
                .expect("a valid synthetic event id"),
        };
        let mut changes = Vec::new();
        for (user, displayname, avatar_url) in joined {
            let known = self.member(room, user);
            if known.is_some_and(|k| k.membership == Membership::Join) {
                continue;
            }
            changes.push(Change {
                room_id: room.to_owned(),
                user_id: user.clone(),
                transition: Transition::Joined,
                state: MemberState {
                    membership: Membership::Join,
                    displayname: displayname.clone(),
                    avatar_url: avatar_url.clone(),
                    sender: user.clone(),
                    order: order(user),
                },
            });
        }
        for (user, state) in self.members(room) {
            let still_joined = joined.iter().any(|(u, _, _)| u == user);
            if state.membership == Membership::Join && !still_joined {
                changes.push(Change {
                    room_id: room.to_owned(),
                    user_id: user.clone(),
                    transition: Transition::Left,
                    state: MemberState {
                        membership: Membership::Leave,
                        displayname: None,
                        avatar_url: None,
                        sender: user.clone(),
                        order: order(user),
                    },
                });
            }
        }
        changes
    }

    /// Whether the model has any knowledge of `room`.
    pub fn knows_room(&self, room: &RoomId) -> bool {
        self.rooms.get(room).is_some_and(|m| !m.is_empty())
            || self.expected.keys().any(|(r, _)| r == room)
    }

    /// Drops what the model knows of `room`, so the next look reads it afresh.
    pub fn forget_room(&mut self, room: &RoomId) {
        self.rooms.remove(room);
        self.expected.retain(|(r, _), _| r != room);
    }

    /// Applies events at once: `preview` then `commit`. For callers with nothing to record.
    pub fn apply(&mut self, events: &[MemberEvent]) -> Vec<Change> {
        let changes = self.preview(events);
        self.commit(changes.clone());
        changes
    }
}

fn transition(before: Option<&MemberState>, event: &MemberEvent) -> Transition {
    use Membership::*;
    if let Some(known) = before {
        if known.order == event.order {
            return Transition::Duplicate;
        }
        if known.order > event.order {
            return Transition::Stale;
        }
    }
    let previous = before.map(|s| s.membership);
    let by_self = event.sender == event.user_id;
    match (previous, event.membership) {
        (Some(Join), Join) => {
            let known = before.expect("previous membership implies a state");
            if known.displayname == event.displayname && known.avatar_url == event.avatar_url {
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
mod tests {
    use super::*;
    use ruma::{owned_room_id, owned_user_id};

    const ROOM: &str = "!room:example.org";

    struct Ev {
        user: &'static str,
        sender: &'static str,
        membership: Membership,
        name: Option<&'static str>,
        ts: u64,
    }

    fn ev(user: &'static str, membership: Membership, ts: u64) -> Ev {
        Ev {
            user,
            sender: user,
            membership,
            name: None,
            ts,
        }
    }

    impl Ev {
        fn by(mut self, sender: &'static str) -> Self {
            self.sender = sender;
            self
        }
        fn named(mut self, name: &'static str) -> Self {
            self.name = Some(name);
            self
        }
        fn build(&self) -> MemberEvent {
            MemberEvent {
                room_id: owned_room_id!("!room:example.org"),
                user_id: UserId::parse(self.user).unwrap(),
                sender: UserId::parse(self.sender).unwrap(),
                membership: self.membership,
                displayname: self.name.map(Into::into),
                avatar_url: None,
                order: EventOrder {
                    origin_server_ts: self.ts,
                    event_id: format!("$e{}_{}", self.ts, self.user.len())
                        .try_into()
                        .unwrap(),
                },
            }
        }
    }

    fn transitions(model: &mut Model, events: &[Ev]) -> Vec<Transition> {
        let built: Vec<_> = events.iter().map(Ev::build).collect();
        let all: Vec<_> = built
            .iter()
            .map(|e| {
                let changes = model.apply(std::slice::from_ref(e));
                changes.first().map(|c| c.transition).unwrap_or_else(|| {
                    // Filtered out: report why.
                    super::transition(model.member(&e.room_id, &e.user_id), e)
                })
            })
            .collect();
        all
    }

    fn membership_of(model: &Model, user: &str) -> Option<Membership> {
        model
            .member(
                RoomId::parse(ROOM).unwrap().as_ref(),
                UserId::parse(user).unwrap().as_ref(),
            )
            .map(|s| s.membership)
    }

    const ALICE: &str = "@alice:example.org";
    const ADMIN: &str = "@admin:example.org";

    #[test]
    fn should_follow_invite_join_leave() {
        let mut model = Model::new();
        let got = transitions(
            &mut model,
            &[
                ev(ALICE, Membership::Invite, 1).by(ADMIN),
                ev(ALICE, Membership::Join, 2),
                ev(ALICE, Membership::Leave, 3),
            ],
        );
        assert_eq!(
            got,
            vec![Transition::Invited, Transition::Joined, Transition::Left]
        );
        assert_eq!(membership_of(&model, ALICE), Some(Membership::Leave));
    }

    #[test]
    fn should_tell_kick_from_leave() {
        let mut model = Model::new();
        let got = transitions(
            &mut model,
            &[
                ev(ALICE, Membership::Join, 1),
                ev(ALICE, Membership::Leave, 2).by(ADMIN),
            ],
        );
        assert_eq!(got, vec![Transition::Joined, Transition::Kicked]);
    }

    #[test]
    fn should_follow_ban_and_unban() {
        let mut model = Model::new();
        let got = transitions(
            &mut model,
            &[
                ev(ALICE, Membership::Join, 1),
                ev(ALICE, Membership::Ban, 2).by(ADMIN),
                ev(ALICE, Membership::Leave, 3).by(ADMIN),
            ],
        );
        assert_eq!(
            got,
            vec![Transition::Joined, Transition::Banned, Transition::Unbanned]
        );
    }

    #[test]
    fn should_record_knock_and_rejected_invite() {
        let mut model = Model::new();
        let got = transitions(
            &mut model,
            &[
                ev(ALICE, Membership::Knock, 1),
                ev(ALICE, Membership::Invite, 2).by(ADMIN),
                ev(ALICE, Membership::Leave, 3),
            ],
        );
        assert_eq!(
            got,
            vec![Transition::Knocked, Transition::Invited, Transition::Left]
        );
    }

    #[test]
    fn should_treat_join_after_join_as_profile_change() {
        let mut model = Model::new();
        let got = transitions(
            &mut model,
            &[
                ev(ALICE, Membership::Join, 1).named("Alice"),
                ev(ALICE, Membership::Join, 2).named("Alice B."),
                ev(ALICE, Membership::Join, 3).named("Alice B."),
            ],
        );
        assert_eq!(
            got,
            vec![
                Transition::Joined,
                Transition::ProfileChanged,
                Transition::Unchanged
            ]
        );
        let state = model
            .member(
                &owned_room_id!("!room:example.org"),
                &UserId::parse(ALICE).unwrap(),
            )
            .unwrap();
        assert_eq!(state.displayname.as_deref(), Some("Alice B."));
    }

    #[test]
    fn should_apply_a_duplicate_once() {
        let mut model = Model::new();
        let join = ev(ALICE, Membership::Join, 1).build();
        assert_eq!(model.apply(std::slice::from_ref(&join)).len(), 1);
        assert!(model.apply(std::slice::from_ref(&join)).is_empty());
        assert_eq!(
            super::transition(model.member(&join.room_id, &join.user_id), &join),
            Transition::Duplicate
        );
    }

    #[test]
    fn should_ignore_an_event_older_than_the_known_state() {
        let mut model = Model::new();
        let leave = ev(ALICE, Membership::Leave, 5).build();
        let join = ev(ALICE, Membership::Join, 4).build();
        model.apply(&[leave]);
        assert!(model.apply(std::slice::from_ref(&join)).is_empty());
        assert_eq!(
            super::transition(model.member(&join.room_id, &join.user_id), &join),
            Transition::Stale
        );
        assert_eq!(membership_of(&model, ALICE), Some(Membership::Leave));
    }

    #[test]
    fn should_reach_the_same_state_in_any_delivery_order() {
        let events: Vec<MemberEvent> = [
            ev(ALICE, Membership::Invite, 1).by(ADMIN),
            ev(ALICE, Membership::Join, 2),
            ev(ADMIN, Membership::Join, 3),
            ev(ALICE, Membership::Leave, 4).by(ADMIN),
            ev(ADMIN, Membership::Join, 5).named("Boss"),
        ]
        .iter()
        .map(Ev::build)
        .collect();
        let mut in_order = Model::new();
        in_order.apply(&events);
        let mut reversed = Model::new();
        for e in events.iter().rev() {
            reversed.apply(std::slice::from_ref(e));
        }
        let mut twice = Model::new();
        twice.apply(&events);
        twice.apply(&events);
        for model in [&reversed, &twice] {
            assert_eq!(membership_of(model, ALICE), Some(Membership::Leave));
            assert_eq!(membership_of(model, ADMIN), Some(Membership::Join));
            assert_eq!(
                model.member(&events[0].room_id, &events[4].user_id),
                in_order.member(&events[0].room_id, &events[4].user_id)
            );
        }
    }

    #[test]
    fn should_see_earlier_events_of_the_same_batch_in_preview() {
        let model = Model::new();
        let batch: Vec<_> = [
            ev(ALICE, Membership::Join, 1),
            ev(ALICE, Membership::Join, 1),
            ev(ALICE, Membership::Leave, 2),
        ]
        .iter()
        .map(Ev::build)
        .collect();
        let changes = model.preview(&batch);
        let got: Vec<_> = changes.iter().map(|c| c.transition).collect();
        assert_eq!(got, vec![Transition::Joined, Transition::Left]);
        assert_eq!(model.room_count(), 0, "preview changes nothing");
    }

    #[test]
    fn should_keep_the_newer_state_on_restore() {
        let mut model = Model::new();
        let newer = ev(ALICE, Membership::Join, 9).build();
        let older = ev(ALICE, Membership::Leave, 3).build();
        model.apply(&[newer]);
        let change = Model::new().apply(&[older]).remove(0);
        model.restore(change.room_id, change.user_id, change.state);
        assert_eq!(membership_of(&model, ALICE), Some(Membership::Join));
        let user = owned_user_id!("@alice:example.org");
        assert_eq!(
            model.members(&owned_room_id!("!room:example.org")).count(),
            1
        );
        assert!(
            model
                .member(&owned_room_id!("!other:example.org"), &user)
                .is_none()
        );
    }
}
