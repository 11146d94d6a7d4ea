use super::*;
use proptest::prelude::*;
use ruma::{owned_room_id, owned_user_id};

const ALICE: &str = "@alice:example.org";
const ADMIN: &str = "@admin:example.org";

fn room() -> OwnedRoomId {
    owned_room_id!("!room:example.org")
}

/// An event about `user` with a unique id `n`; `ts` defaults to `n`.
#[derive(Debug, Clone)]
struct Ev {
    user: &'static str,
    sender: &'static str,
    membership: Membership,
    name: Option<&'static str>,
    n: u64,
    ts: u64,
}

fn ev(user: &'static str, membership: Membership, n: u64) -> Ev {
    Ev {
        user,
        sender: user,
        membership,
        name: None,
        n,
        ts: n,
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
    fn at(mut self, ts: u64) -> Self {
        self.ts = ts;
        self
    }
    fn build(&self) -> MemberEvent {
        MemberEvent {
            room_id: room(),
            user_id: UserId::parse(self.user).unwrap(),
            sender: UserId::parse(self.sender).unwrap(),
            membership: self.membership,
            displayname: self.name.map(Into::into),
            avatar_url: None,
            event_id: format!("$e{}", self.n).try_into().unwrap(),
            origin_server_ts: self.ts,
        }
    }
}

/// Delivers each event in its own transaction; the transition each made (`None`: ignored).
fn deliver(model: &mut Model, events: &[Ev]) -> Vec<Option<Transition>> {
    events
        .iter()
        .map(|e| {
            model
                .apply(&[e.build()])
                .first()
                .map(|change| change.transition)
        })
        .collect()
}

fn membership_of(model: &Model, user: &str) -> Option<Membership> {
    model
        .member(&room(), UserId::parse(user).unwrap().as_ref())
        .map(|s| s.membership)
}

fn observed(user: &str) -> ObservedMember {
    ObservedMember {
        user: UserId::parse(user).unwrap(),
        displayname: None,
        avatar_url: None,
    }
}

#[test]
fn should_follow_invite_join_leave() {
    let mut model = Model::new();
    let got = deliver(
        &mut model,
        &[
            ev(ALICE, Membership::Invite, 1).by(ADMIN),
            ev(ALICE, Membership::Join, 2),
            ev(ALICE, Membership::Leave, 3),
        ],
    );
    use Transition::*;
    assert_eq!(got, vec![Some(Invited), Some(Joined), Some(Left)]);
    assert_eq!(membership_of(&model, ALICE), Some(Membership::Leave));
}

#[test]
fn should_tell_kick_from_leave_and_follow_ban_and_unban() {
    let mut model = Model::new();
    let got = deliver(
        &mut model,
        &[
            ev(ALICE, Membership::Join, 1),
            ev(ALICE, Membership::Leave, 2).by(ADMIN),
            ev(ALICE, Membership::Ban, 3).by(ADMIN),
            ev(ALICE, Membership::Leave, 4).by(ADMIN),
            ev(ALICE, Membership::Knock, 5),
        ],
    );
    use Transition::*;
    assert_eq!(
        got,
        vec![
            Some(Joined),
            Some(Kicked),
            Some(Banned),
            Some(Unbanned),
            Some(Knocked)
        ]
    );
}

#[test]
fn should_treat_join_after_join_as_profile_change_or_nothing() {
    let mut model = Model::new();
    let got = deliver(
        &mut model,
        &[
            ev(ALICE, Membership::Join, 1).named("Alice"),
            ev(ALICE, Membership::Join, 2).named("Alice B."),
            ev(ALICE, Membership::Join, 3).named("Alice B."),
        ],
    );
    use Transition::*;
    assert_eq!(
        got,
        vec![Some(Joined), Some(ProfileChanged), Some(Unchanged)]
    );
}

#[test]
fn should_apply_a_redelivered_event_once() {
    let mut model = Model::new();
    let got = deliver(
        &mut model,
        &[
            ev(ALICE, Membership::Join, 1),
            ev(ALICE, Membership::Join, 1),
            ev(ALICE, Membership::Leave, 2),
            // An old event delivered again after a newer one: still a duplicate.
            ev(ALICE, Membership::Join, 1),
        ],
    );
    assert_eq!(
        got,
        vec![Some(Transition::Joined), None, Some(Transition::Left), None]
    );
    assert_eq!(membership_of(&model, ALICE), Some(Membership::Leave));
}

/// The finding: a member event from the far future used to outrank every later one.
#[test]
fn should_not_let_a_future_timestamp_outrank_a_later_delivery() {
    let mut model = Model::new();
    deliver(
        &mut model,
        &[
            ev(ADMIN, Membership::Join, 1),
            ev(ADMIN, Membership::Leave, 2).at(9_007_199_254_740_991),
            ev(ADMIN, Membership::Join, 3).at(10),
            ev(ADMIN, Membership::Leave, 4).by(ALICE).at(11),
        ],
    );
    assert_eq!(membership_of(&model, ADMIN), Some(Membership::Leave));
    let state = model
        .member(&room(), &owned_user_id!("@admin:example.org"))
        .unwrap();
    assert_eq!(
        state.origin_server_ts, 11,
        "kept for operators, not for order"
    );
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
    assert!(changes[0].state.seq < changes[1].state.seq);
}

#[test]
fn should_keep_the_later_state_on_restore() {
    let mut model = Model::new();
    let later = Model::new().apply(&[ev(ALICE, Membership::Join, 9).build()]);
    let mut earlier = Model::new().apply(&[ev(ALICE, Membership::Leave, 3).build()]);
    earlier[0].state.seq = 0;
    let mut restored = later[0].state;
    restored.seq = 5;
    model.restore(room(), owned_user_id!("@alice:example.org"), restored);
    model.restore(
        room(),
        owned_user_id!("@alice:example.org"),
        earlier[0].state,
    );
    assert_eq!(membership_of(&model, ALICE), Some(Membership::Join));
    assert_eq!(model.last_seq(), 5, "new facts come after restored ones");
}

#[test]
fn should_turn_a_read_into_drift_and_supersede_only_what_came_before_it() {
    let mut model = Model::new();
    deliver(
        &mut model,
        &[
            ev("@agent:example.org", Membership::Join, 1),
            ev(ADMIN, Membership::Join, 2),
        ],
    );
    let asked_at = model.last_seq();
    // While the read is in flight, alice's join is pushed: newer than the read.
    deliver(&mut model, &[ev(ALICE, Membership::Join, 3)]);
    let joined = [observed("@agent:example.org"), observed("@eve:example.org")];
    let mut drift: Vec<_> = model
        .observe_joined(&room(), &joined, asked_at)
        .into_iter()
        .map(|c| (c.user_id.to_string(), c.state.membership))
        .collect();
    drift.sort();
    assert_eq!(
        drift,
        vec![
            ("@admin:example.org".into(), Membership::Leave),
            ("@eve:example.org".into(), Membership::Join)
        ]
    );
    // A read is newer than a future-dated event delivered before it.
    deliver(&mut model, &[ev(ADMIN, Membership::Join, 4).at(u64::MAX)]);
    let asked_at = model.last_seq();
    let changes = model.observe_joined(&room(), &[observed("@agent:example.org")], asked_at);
    model.commit(changes);
    assert_eq!(membership_of(&model, ADMIN), Some(Membership::Leave));
}

#[test]
fn should_forget_a_room_and_drop_unkept_rooms() {
    let mut model = Model::new();
    model.apply(&[ev(ALICE, Membership::Join, 1).build()]);
    model.expect(
        &room(),
        &owned_user_id!("@bob:example.org"),
        Membership::Join,
    );
    assert!(model.knows_room(&room()));
    model.forget_room(&room());
    assert!(!model.knows_room(&room()));
    // An invite of roster's user into some room roster does not look after: dropped once
    // older than the given sequence number, never while newer.
    model.apply(&[ev(ALICE, Membership::Join, 2).build()]);
    let after = model.last_seq() + 1;
    assert!(model.unmanaged_rooms_before(model.last_seq()).is_empty());
    let stale = model.unmanaged_rooms_before(after);
    assert_eq!(stale, vec![room()]);
    model.forget_room(&stale[0]);
    assert_eq!(model.room_count(), 0);
}

#[test]
fn should_never_drop_a_room_roster_looks_after() {
    let mut model = Model::new();
    model.apply(&[ev(ALICE, Membership::Join, 1).build()]);
    model.agents.update(crate::model::agents::RoomRecord {
        agent_id: "agent-1".into(),
        localpart: "agent_1".into(),
        room_id: Some(room()),
        ..Default::default()
    });
    assert!(model.unmanaged_rooms_before(u64::MAX).is_empty());
}

// --- properties -------------------------------------------------------------------------

const USERS: [&str; 3] = [ALICE, ADMIN, "@bob:example.org"];
const SENDERS: [&str; 2] = [ALICE, ADMIN];
const MEMBERSHIPS: [Membership; 5] = [
    Membership::Invite,
    Membership::Join,
    Membership::Leave,
    Membership::Ban,
    Membership::Knock,
];

/// A history of distinct events with arbitrary (hostile) timestamps.
fn history() -> impl Strategy<Value = Vec<Ev>> {
    prop::collection::vec(
        (
            0..USERS.len(),
            0..SENDERS.len(),
            0..MEMBERSHIPS.len(),
            any::<u64>(),
        ),
        1..40,
    )
    .prop_map(|raw| {
        raw.into_iter()
            .enumerate()
            .map(|(n, (user, sender, membership, ts))| {
                ev(USERS[user], MEMBERSHIPS[membership], n as u64 + 1)
                    .by(SENDERS[sender])
                    .at(ts)
            })
            .collect()
    })
}

fn final_memberships(model: &Model) -> Vec<Option<Membership>> {
    USERS.iter().map(|u| membership_of(model, u)).collect()
}

/// What the last delivery said about each user: the truth any model must reach.
fn last_said(events: &[Ev]) -> Vec<Option<Membership>> {
    USERS
        .iter()
        .map(|u| {
            events
                .iter()
                .rev()
                .find(|e| e.user == *u)
                .map(|e| e.membership)
        })
        .collect()
}

proptest! {
    /// No crafted timestamp stops a later real change from being applied.
    #[test]
    fn prop_the_last_delivery_wins_whatever_the_timestamps(events in history()) {
        let mut model = Model::new();
        deliver(&mut model, &events);
        prop_assert_eq!(final_memberships(&model), last_said(&events));
    }

    /// Any interleaving of duplicates and redeliveries converges to the clean delivery.
    #[test]
    fn prop_duplicates_and_redeliveries_change_nothing(
        events in history(),
        redeliveries in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..30),
        batch_sizes in prop::collection::vec(1usize..5, 1..20),
    ) {
        // Insert copies of already delivered events at later points.
        let mut stream: Vec<MemberEvent> = events.iter().map(Ev::build).collect();
        for (what, at) in redeliveries {
            let at = at.index(stream.len() + 1);
            if at == 0 { continue; }
            let copy = stream[what.index(at)].clone();
            stream.insert(at, copy);
        }
        // Deliver the stream in batches of varying size (transactions).
        let mut model = Model::new();
        let mut rest = &stream[..];
        for size in batch_sizes.iter().cycle() {
            if rest.is_empty() { break; }
            let (batch, tail) = rest.split_at((*size).min(rest.len()));
            model.apply(batch);
            rest = tail;
        }
        let mut clean = Model::new();
        deliver(&mut clean, &events);
        prop_assert_eq!(final_memberships(&model), final_memberships(&clean));
        prop_assert_eq!(final_memberships(&model), last_said(&events));
    }

    /// A read supersedes what came before it was asked and nothing delivered after.
    #[test]
    fn prop_a_read_supersedes_only_earlier_facts(
        before in history(),
        listed in prop::collection::vec(any::<bool>(), USERS.len()),
        after in history(),
    ) {
        let mut model = Model::new();
        deliver(&mut model, &before);
        let asked_at = model.last_seq();
        // Events delivered while the read is in flight (ids after `before`'s).
        let after: Vec<Ev> = after
            .into_iter()
            .map(|mut e| { e.n += 1000; e })
            .collect();
        deliver(&mut model, &after);
        let joined: Vec<ObservedMember> = USERS
            .iter()
            .zip(&listed)
            .filter(|(_, l)| **l)
            .map(|(u, _)| observed(u))
            .collect();
        let changes = model.observe_joined(&room(), &joined, asked_at);
        model.commit(changes);
        for (i, user) in USERS.iter().enumerate() {
            let now = membership_of(&model, user);
            match after.iter().rev().find(|e| e.user == *user) {
                Some(newer) => prop_assert_eq!(now, Some(newer.membership)),
                None if listed[i] => prop_assert_eq!(now, Some(Membership::Join)),
                None => prop_assert_ne!(now, Some(Membership::Join)),
            }
        }
    }
}

/// Events pushed about a forgotten room are kept but do not make it known: only a read
/// does, so nothing is planned from the one member an event names.
#[test]
fn should_know_a_forgotten_room_again_only_once_it_is_read() {
    let mut model = Model::new();
    model.apply(&[ev(ALICE, Membership::Join, 1).build()]);
    model.forget_room(&room());
    model.apply(&[ev(ADMIN, Membership::Join, 2).build()]);
    assert!(!model.knows_room(&room()));
    assert_eq!(
        model.effective_membership(&room(), &owned_user_id!("@admin:example.org")),
        Some(Membership::Join),
        "the pushed event is kept"
    );
    model.read_recorded(&room(), model.last_seq(), &[]);
    assert!(model.knows_room(&room()));
    // Dropped for good, a room leaves nothing behind.
    model.forget_room(&room());
    model.drop_room(&room());
    assert!(!model.knows_room(&room()));
    assert!(model.unread.is_empty());
}

/// An invite pushed while roster expects the join it made (the invite's late echo) keeps
/// that expectation; a read of the room ends it, so a join whose echo never came is not
/// taken as done for good.
#[test]
fn should_keep_an_expected_join_over_an_invite_until_the_room_is_read() {
    let admin = owned_user_id!("@admin:example.org");
    let mut model = Model::new();
    model.expect(&room(), &admin, Membership::Join);
    model.apply(&[ev(ADMIN, Membership::Invite, 1).by(ALICE).build()]);
    assert_eq!(
        model.effective_membership(&room(), &admin),
        Some(Membership::Join)
    );
    // A read asked before the join was expected says nothing of it.
    assert_eq!(model.read_recorded(&room(), 0, &[]), 0);
    assert_eq!(
        model.effective_membership(&room(), &admin),
        Some(Membership::Join)
    );
    // One asked after it, not showing the join, ends it: drift.
    assert_eq!(model.read_recorded(&room(), model.last_seq(), &[]), 1);
    assert_eq!(
        model.effective_membership(&room(), &admin),
        Some(Membership::Invite)
    );
    // Any other event about the member ends the expectation at once.
    model.expect(&room(), &admin, Membership::Join);
    model.apply(&[ev(ADMIN, Membership::Leave, 2).build()]);
    assert_eq!(
        model.effective_membership(&room(), &admin),
        Some(Membership::Leave)
    );
}

/// A read asked after roster's join that shows the member joined, while the echo of the
/// invite before it came in flight (newer than the read): no drift, the join still expected.
#[test]
fn should_take_a_read_showing_the_expected_join_as_no_drift_when_the_invite_echo_is_newer() {
    let admin = owned_user_id!("@admin:example.org");
    let mut model = Model::new();
    model.apply(&[ev(ALICE, Membership::Join, 1).build()]);
    model.expect(&room(), &admin, Membership::Join);
    let asked = model.last_seq();
    model.apply(&[ev(ADMIN, Membership::Invite, 2).by(ALICE).build()]);
    let joined = [observed(ALICE), observed(ADMIN)];
    let changes = model.observe_joined(&room(), &joined, asked);
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(model.read_recorded(&room(), asked, &joined), 0);
    assert_eq!(
        model.effective_membership(&room(), &admin),
        Some(Membership::Join)
    );
}
