//! Identity lifecycle events from a real Kafka-protocol broker (tansu) into a real Synapse,
//! by masquerading only: every accepted message shape (legacy-shaped ones too), dead letters,
//! SIGKILL mid-batch, Synapse away, replay, only what changed is sent, `start_from`; and the
//! tuwunel path against a stand-in that emulates tuwunel (`support::tuwunel`).

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use reqwest::Method;
use serde_json::{Value, json};
use support::identity::*;
use support::*;

const TOPIC: &str = "nova.identity.events";
const DLQ: &str = "nova.identity.events.dlq";
const GROUP: &str = "roster";
const PARTITIONS: i32 = 3;

/// Synapse + tansu + a configured (not started) roster consuming `TOPIC`.
struct Stack {
    tansu: Tansu,
    synapse: Synapse,
    roster: Roster,
    admin: String,
    /// Last: dropped after the processes, so their logs are still there to scan.
    scratch: Scratch,
}

impl Stack {
    async fn new(name: &str, lifecycle_extra: &str) -> Stack {
        let scratch = Scratch::new(name);
        let tansu = Tansu::start(scratch.path(), PARTITIONS, &[TOPIC, DLQ]).await;
        let hs_port = free_port();
        let roster = Roster::configure(
            scratch.path(),
            &format!("http://127.0.0.1:{hs_port}"),
            &tansu.lifecycle_yaml(TOPIC, GROUP, lifecycle_extra),
        );
        let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
        let admin = synapse.admin_token("admin");
        Stack {
            scratch,
            tansu,
            synapse,
            roster,
            admin,
        }
    }

    /// Produces `body` to `TOPIC`, keyed like the identity service does (by user) unless
    /// `key` says otherwise: an unkeyed message lands on a random partition, and order is
    /// only kept within one. `event_type`, if given, goes in the header.
    async fn produce(
        &self,
        key: Option<&str>,
        event_type: Option<&str>,
        body: &Value,
    ) -> (i32, i64) {
        let headers: Vec<(&str, &str)> =
            event_type.map(|t| ("event_type", t)).into_iter().collect();
        let user_key = user_key(body);
        let key = key.or(user_key.as_deref());
        self.tansu
            .produce(TOPIC, None, key, &headers, &bytes(body))
            .await
    }

    /// Produces `events` as (event type header, body), adding their positions to `produced`.
    async fn produce_all(&self, produced: &mut Vec<(i32, i64)>, events: &[(&str, Value)]) {
        for (event_type, body) in events {
            produced.push(self.produce(None, Some(event_type), body).await);
        }
    }

    /// Produces `events`, waits until all of `produced` is committed, and returns what roster
    /// sent the homeserver meanwhile as (names, avatars, uploads), checked against Synapse.
    async fn writes_of(
        &self,
        produced: &mut Vec<(i32, i64)>,
        events: &[(&str, Value)],
    ) -> (u64, u64, u64) {
        let before = Writes::now(self).await;
        self.produce_all(produced, events).await;
        self.wait_committed(produced).await;
        Writes::now(self).await.since(before)
    }

    /// Waits until users 0..`users` of `uuid` group `group` show the name of their last
    /// update, `user-N-v2`.
    async fn wait_last_names(&self, group: u32, users: u32) {
        for n in 0..users {
            let want = format!("user-{n}-v2");
            self.wait_user(
                &nova(&uuid(group, n)),
                &format!("display name {want}"),
                |u| display_name(u) == Some(want.as_str()),
            )
            .await;
        }
    }

    /// Neither roster nor Synapse counted a request since the counts given.
    async fn assert_sent_nothing_since(&self, roster_before: u64, synapse_before: u64) {
        assert_eq!(self.roster.homeserver_requests(None).await, roster_before);
        assert_eq!(self.synapse.requests_received_total().await, synapse_before);
    }

    async fn user(&self, user: &str) -> Option<Value> {
        self.synapse.admin_user(&self.admin, user).await
    }

    /// Waits until `check` holds for `user`'s admin view on Synapse.
    async fn wait_user(&self, user: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        eventually(
            Duration::from_secs(60),
            &format!("{user}: {what}"),
            || async { self.user(user).await.filter(|u| check(u)) },
        )
        .await
    }

    async fn wait_committed(&self, produced: &[(i32, i64)]) {
        self.tansu.wait_committed(GROUP, TOPIC, produced).await;
    }

    async fn events(&self, event: &str, outcome: &str) -> u64 {
        self.roster.lifecycle_events(event, outcome).await
    }
}

fn display_name(u: &Value) -> Option<&str> {
    u["displayname"].as_str()
}

/// A PNG small enough to read in a test, served by the test as an avatar.
const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89\0\0\0\rIDATx\x9cc\xf8\xff\xff?\0\x05\xfe\x02\xfe\xa7\x35\x81\x84\0\0\0\0IEND\xaeB`\x82";

/// Serves `/avatar.png` (an image) and `/not-an-image` (HTML) on 127.0.0.1.
async fn avatar_server() -> String {
    let app = Router::new()
        .route(
            "/avatar.png",
            get(|| async { ([("content-type", "image/png")], PNG) }),
        )
        .route(
            "/not-an-image",
            get(|| async { ([("content-type", "text/html")], "<html>hello</html>") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test]
async fn every_event_shape_has_its_effect_on_synapse() {
    // The test serves its avatars on loopback, which roster refuses by default.
    let stack = Stack::new("lifecycle-shapes", "  avatar_allow_private: true\n").await;
    let avatars = avatar_server().await;
    let (alice, bob, carol, dora, eve, ghost, frank) = (
        uuid(1, 1),
        uuid(1, 2),
        uuid(1, 3),
        uuid(1, 4),
        uuid(1, 5),
        uuid(1, 6),
        uuid(1, 7),
    );
    // A user that exists before any event (made by an admin, not by roster).
    let _ = stack.synapse.admin_token(&format!("nova-{dora}"));

    let mut produced = Vec::new();
    // created: header type, bare body; field type in an envelope; header + envelope.
    produced.push(
        stack
            .produce(
                Some(&alice),
                Some("identity.user.created"),
                &created(&alice, "alice"),
            )
            .await,
    );
    produced.push(
        stack
            .produce(
                Some(&bob),
                None,
                &envelope(Some("UserCreatedEvent"), created(&bob, "bob")),
            )
            .await,
    );
    produced.push(
        stack
            .produce(
                None,
                Some("UserCreatedEvent"),
                &envelope(None, created(&carol, "carol")),
            )
            .await,
    );
    // profile_updated: both spellings, header and field, envelope and bare; mxc and http avatars.
    produced.push(
        stack
            .produce(
                Some(&alice),
                Some("UserProfileUpdatedEvent"),
                &envelope(
                    None,
                    profile(
                        &alice,
                        "alice",
                        Some("Alice A."),
                        Some("mxc://roster.test/alicepic"),
                    ),
                ),
            )
            .await,
    );
    let bob_avatar = format!("{avatars}/avatar.png");
    produced.push(
        stack
            .produce(
                Some(&bob),
                None,
                &with_type(
                    profile(&bob, "bob2", None, Some(&bob_avatar)),
                    "identity.user.profile_updated",
                ),
            )
            .await,
    );
    produced.push(
        stack
            .produce(
                Some(&dora),
                None,
                &envelope(
                    Some("identity.user.profile_updated"),
                    profile(&dora, "dora", Some("Dora D."), None),
                ),
            )
            .await,
    );
    // A user nobody created: created first (lifecycle.create_missing_users defaults to true).
    produced.push(
        stack
            .produce(
                Some(&eve),
                Some("identity.user.profile_updated"),
                &profile(&eve, "eve", Some("Eve"), None),
            )
            .await,
    );
    // Legacy-shaped (identity-service versions before event_type): no type anywhere, the
    // envelope's data alone says created, then profile updated.
    produced.push(
        stack
            .produce(
                Some(&frank),
                None,
                &envelope(None, created(&frank, "frank")),
            )
            .await,
    );
    produced.push(
        stack
            .produce(
                Some(&frank),
                None,
                &envelope(None, profile(&frank, "frank", Some("Frank F."), None)),
            )
            .await,
    );
    // An unknown type: skipped and counted.
    produced.push(
        stack
            .produce(
                Some(&eve),
                Some("identity.user.logged_in"),
                &json!({ "user_id": eve }),
            )
            .await,
    );
    // deleted: soft (kept profile), hard in an envelope with field type (erased), a ghost.
    produced.push(
        stack
            .produce(None, Some("identity.user.deleted"), &deleted(&carol, true))
            .await,
    );
    produced.push(
        stack
            .produce(
                Some(&alice),
                None,
                &envelope(Some("UserDeletedEvent"), deleted(&alice, false)),
            )
            .await,
    );
    produced.push(
        stack
            .produce(
                Some(&ghost),
                Some("UserDeletedEvent"),
                &deleted(&ghost, false),
            )
            .await,
    );

    let mut roster = stack.roster;
    roster.start().await;
    let stack = Stack { roster, ..stack };

    let user = stack
        .wait_user(
            &nova(&bob),
            "display name bob2 and an uploaded avatar",
            |u| display_name(u) == Some("bob2") && u["avatar_url"].as_str().is_some(),
        )
        .await;
    let avatar = user["avatar_url"].as_str().unwrap().to_owned();
    assert!(avatar.starts_with("mxc://roster.test/"), "{avatar}");
    let media_id = avatar.rsplit('/').next().unwrap();
    let download = stack
        .roster
        .client()
        .get(format!(
            "{}/_matrix/client/v1/media/download/roster.test/{media_id}",
            stack.synapse.url()
        ))
        .bearer_auth(&stack.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), 200);
    assert_eq!(
        download.bytes().await.unwrap().as_ref(),
        PNG,
        "the fetched image was uploaded as is"
    );

    stack
        .wait_user(&nova(&dora), "pre-created user renamed", |u| {
            display_name(u) == Some("Dora D.")
        })
        .await;
    stack
        .wait_user(&nova(&eve), "missing user created and named", |u| {
            display_name(u) == Some("Eve")
        })
        .await;
    stack
        .wait_user(&nova(&frank), "legacy-shaped events applied", |u| {
            display_name(u) == Some("Frank F.")
        })
        .await;
    let carol_user = stack
        .wait_user(&nova(&carol), "soft-deleted user deactivated", |u| {
            u["deactivated"] == json!(true)
        })
        .await;
    assert_eq!(carol_user["erased"], json!(false));
    assert_eq!(
        display_name(&carol_user),
        Some("carol"),
        "a soft delete keeps the profile"
    );
    let alice_user = stack
        .wait_user(
            &nova(&alice),
            "hard-deleted user deactivated and erased",
            |u| u["deactivated"] == json!(true) && u["erased"] == json!(true),
        )
        .await;
    assert_eq!(
        alice_user["displayname"],
        Value::Null,
        "erased: {alice_user}"
    );
    assert_eq!(
        alice_user["avatar_url"],
        Value::Null,
        "erased: {alice_user}"
    );
    stack.wait_committed(&produced).await;

    assert_eq!(stack.events("created", "applied").await, 4);
    assert_eq!(stack.events("profile_updated", "applied").await, 5);
    for kind in ["created", "profile_updated"] {
        assert_eq!(
            stack
                .roster
                .metric(
                    "roster_lifecycle_legacy_shaped_total",
                    &[&format!("type=\"{kind}\"")]
                )
                .await,
            1,
            "{kind}"
        );
    }
    assert_eq!(stack.events("deleted", "applied").await, 2);
    assert_eq!(stack.events("deleted", "missing_user").await, 1);
    assert_eq!(stack.events("unknown", "skipped").await, 1);
    assert!(
        stack.user(&nova(&ghost)).await.is_none(),
        "a deletion never creates a user"
    );
    assert_eq!(
        stack.roster.metric("roster_dead_letters_total", &[]).await,
        0
    );

    // The model learnt the deactivation: a later update to alice is skipped, and stays so
    // after a restart (the store remembers).
    let late = stack
        .produce(
            Some(&alice),
            Some("UserProfileUpdatedEvent"),
            &profile(&alice, "alice", Some("Back"), None),
        )
        .await;
    produced.push(late);
    stack.wait_committed(&produced).await;
    assert_eq!(stack.events("profile_updated", "skipped").await, 1);
    // A failed avatar fetch keeps the old avatar; the name still changes.
    produced.push(
        stack
            .produce(
                Some(&bob),
                Some("UserProfileUpdatedEvent"),
                &profile(
                    &bob,
                    "bob",
                    Some("Bob B."),
                    Some(&format!("{avatars}/not-an-image")),
                ),
            )
            .await,
    );
    let bob_user = stack
        .wait_user(&nova(&bob), "renamed with the old avatar", |u| {
            display_name(u) == Some("Bob B.")
        })
        .await;
    assert_eq!(bob_user["avatar_url"].as_str(), Some(avatar.as_str()));
    stack.wait_committed(&produced).await;

    let Stack {
        mut roster,
        synapse,
        tansu,
        scratch,
        admin,
    } = stack;
    roster.stop();
    roster.start().await;
    let stack = Stack {
        roster,
        synapse,
        tansu,
        scratch,
        admin,
    };
    produced.push(
        stack
            .produce(
                Some(&alice),
                Some("UserCreatedEvent"),
                &created(&alice, "alice-again"),
            )
            .await,
    );
    stack.wait_committed(&produced).await;
    assert_eq!(
        stack.events("created", "skipped").await,
        1,
        "remembered across restart"
    );
    let alice_user = stack.user(&nova(&alice)).await.unwrap();
    assert_eq!(alice_user["displayname"], Value::Null);
    stack.synapse.assert_no_logins().await;
    stack.roster.assert_no_secrets_in_logs(&[&stack.admin]);
}

#[tokio::test]
async fn poison_messages_go_to_the_dead_letter_topic_and_later_events_apply() {
    let stack = Stack::new("lifecycle-poison", "").await;
    let (a, b) = (uuid(2, 1), uuid(2, 2));
    let mut produced = Vec::new();
    let trace = [("event_type", "UserCreatedEvent"), ("trace_id", "t-1")];
    // Every message goes to partition 0: the later ones show that it moves on.
    let tansu = &stack.tansu;
    let to_partition_0 = |key: &str, event_type: &'static str, body: &Value| {
        let (key, body) = (key.to_owned(), bytes(body));
        async move {
            tansu
                .produce(
                    TOPIC,
                    Some(0),
                    Some(&key),
                    &[("event_type", event_type)],
                    &body,
                )
                .await
        }
    };
    // Not JSON, a created event without a username, and an avatar Synapse refuses (400).
    produced.push(
        stack
            .tansu
            .produce(TOPIC, Some(0), Some("poison-1"), &trace, b"{not json")
            .await,
    );
    produced.push(to_partition_0("poison-2", "UserCreatedEvent", &json!({ "user_id": a })).await);
    produced.push(to_partition_0(&a, "UserCreatedEvent", &created(&a, "a")).await);
    let too_long = format!("mxc://roster.test/{}", "x".repeat(1100));
    produced.push(
        to_partition_0(
            &a,
            "UserProfileUpdatedEvent",
            &profile(&a, "a", Some("A"), Some(&too_long)),
        )
        .await,
    );
    // The partition moves on.
    produced.push(to_partition_0(&b, "UserCreatedEvent", &created(&b, "b")).await);
    // An avatar URL pointing inside roster's network (here loopback, as cloud metadata at
    // 169.254.169.254 would be): the name is applied, the URL is never requested.
    let (inside, fetched) = counting_avatar_server().await;
    let inside = inside.replace("127.0.0.1", "localhost");
    produced.push(
        to_partition_0(
            &b,
            "UserProfileUpdatedEvent",
            &profile(&b, "b", Some("B"), Some(&format!("{inside}/b.png"))),
        )
        .await,
    );
    produced.push(
        to_partition_0(
            &a,
            "UserProfileUpdatedEvent",
            &profile(&a, "a", Some("A2"), None),
        )
        .await,
    );
    let mut roster = stack.roster;
    roster.start().await;
    let stack = Stack { roster, ..stack };

    let b_user = stack
        .wait_user(&nova(&b), "created and renamed after the poison", |u| {
            display_name(u) == Some("B")
        })
        .await;
    assert!(b_user["avatar_url"].is_null(), "{b_user}");
    stack
        .wait_user(&nova(&a), "updated after its refused update", |u| {
            display_name(u) == Some("A2")
        })
        .await;
    stack.wait_committed(&produced).await;

    let letters = stack.tansu.read_all(DLQ, 3).await;
    assert_eq!(letters.len(), 3, "{letters:?}");
    let by_key: HashMap<String, &Record> = letters
        .iter()
        .map(|r| (String::from_utf8(r.key.clone().unwrap()).unwrap(), r))
        .collect();
    let garbage = by_key["poison-1"];
    assert_eq!(garbage.payload.as_deref(), Some(b"{not json".as_slice()));
    assert_eq!(
        garbage.header("trace_id").as_deref(),
        Some("t-1"),
        "original headers kept"
    );
    assert_eq!(
        garbage.header("event_type").as_deref(),
        Some("UserCreatedEvent")
    );
    assert!(
        garbage.header("reason").unwrap().contains("not JSON"),
        "{:?}",
        garbage.header("reason")
    );
    assert_eq!(garbage.header("original_offset").as_deref(), Some("0"));
    let incomplete = by_key["poison-2"];
    assert_eq!(
        incomplete.header("reason").as_deref(),
        Some("created event lacks username")
    );
    let refused = by_key[a.as_str()];
    let reason = refused.header("reason").unwrap();
    assert!(reason.contains("HTTP 400"), "{reason}");
    assert_eq!(
        refused.payload.as_deref(),
        Some(bytes(&profile(&a, "a", Some("A"), Some(&too_long))).as_slice())
    );

    assert_eq!(
        stack.roster.metric("roster_dead_letters_total", &[]).await,
        3
    );
    assert_eq!(stack.events("undecodable", "dead_lettered").await, 2);
    assert_eq!(stack.events("profile_updated", "dead_lettered").await, 1);
    assert_eq!(
        fetched.load(Ordering::SeqCst),
        0,
        "the inside URL was never requested"
    );
    let logs = stack.roster.logs();
    assert!(
        logs.iter().any(
            |(_, text)| text.contains("localhost is a private, loopback or link-local address")
        ),
        "the refusal is logged with what to set"
    );
    stack.synapse.assert_no_logins().await;
    stack.roster.assert_no_secrets_in_logs(&[&stack.admin]);
}

#[tokio::test]
async fn sigkill_mid_batch_loses_nothing_and_commits_to_the_end() {
    let stack = Stack::new("lifecycle-sigkill", "").await;
    const USERS: u32 = 40;
    let mut produced = Vec::new();
    for n in 0..USERS {
        let id = uuid(3, n);
        produced.push(
            stack
                .produce(
                    Some(&id),
                    Some("UserCreatedEvent"),
                    &created(&id, &format!("user-{n}")),
                )
                .await,
        );
        for round in 1..=2 {
            let name = format!("user-{n}-v{round}");
            produced.push(
                stack
                    .produce(
                        Some(&id),
                        Some("UserProfileUpdatedEvent"),
                        &profile(&id, "u", Some(&name), None),
                    )
                    .await,
            );
        }
    }
    let total = produced.len() as u64;
    let mut roster = stack.roster;
    roster.start().await;
    let applied_at_kill = eventually(
        Duration::from_secs(60),
        "some events to be applied",
        || async {
            let applied = roster
                .metric("roster_lifecycle_events_total", &["outcome=\"applied\""])
                .await;
            (applied >= 40).then_some(applied)
        },
    )
    .await;
    roster.kill9();
    assert!(
        applied_at_kill < total,
        "killed mid-batch: {applied_at_kill} of {total} applied"
    );
    let committed_at_kill = stack.tansu.committed(GROUP, TOPIC);
    eprintln!("killed after {applied_at_kill} of {total} applied; committed {committed_at_kill:?}");
    assert_ne!(
        committed_at_kill,
        stack.tansu.ends(&produced),
        "not everything was committed before the kill"
    );

    roster.start().await;
    let stack = Stack { roster, ..stack };
    stack.wait_last_names(3, USERS).await;
    stack.wait_committed(&produced).await;
    stack.synapse.assert_no_logins().await;
    stack.roster.assert_no_secrets_in_logs(&[&stack.admin]);
}

/// A backlog far larger than `max_buffered_events`: while the buffer is full roster takes
/// no message, and takes the rest as it drains. Every event gets its outcome, each user ends
/// at its last update, and everything is committed.
#[tokio::test]
async fn a_backlog_larger_than_the_buffer_is_taken_as_it_drains() {
    let mut stack = Stack::new(
        "lifecycle-small-buffer",
        "  max_buffered_events: 3\n  max_in_flight_users: 2\n",
    )
    .await;
    const USERS: u32 = 15;
    let mut produced = Vec::new();
    for n in 0..USERS {
        let id = uuid(11, n);
        let mut events = vec![("UserCreatedEvent", created(&id, &format!("user-{n}")))];
        for round in 1..=2 {
            let name = format!("user-{n}-v{round}");
            events.push((
                "UserProfileUpdatedEvent",
                profile(&id, "u", Some(&name), None),
            ));
        }
        stack.produce_all(&mut produced, &events).await;
    }
    stack.roster.start().await;
    stack.wait_committed(&produced).await;
    stack.wait_last_names(11, USERS).await;
    let outcomes = stack
        .roster
        .metric("roster_lifecycle_events_total", &[])
        .await;
    assert_eq!(
        outcomes,
        produced.len() as u64,
        "every event has one outcome"
    );
    stack.synapse.assert_no_logins().await;
    stack.roster.assert_no_secrets_in_logs(&[&stack.admin]);
}

#[tokio::test]
async fn synapse_away_commits_nothing_and_applies_in_order_per_user_when_back() {
    let mut stack = Stack::new("lifecycle-synapse-away", "").await;
    let warm = uuid(4, 99);
    let mut produced = vec![
        stack
            .produce(
                Some(&warm),
                Some("UserCreatedEvent"),
                &created(&warm, "warm"),
            )
            .await,
    ];
    stack.roster.start().await;
    stack.roster.wait_ready().await;
    stack
        .wait_user(&nova(&warm), "the warm-up user", |u| {
            display_name(u) == Some("warm")
        })
        .await;
    stack.wait_committed(&produced).await;
    let committed_before = stack.tansu.committed(GROUP, TOPIC);
    stack.synapse.assert_no_logins().await;

    stack.synapse.stop();
    const USERS: u32 = 5;
    for n in 0..USERS {
        let id = uuid(4, n);
        let key = Some(id.as_str());
        produced.push(
            stack
                .produce(
                    key,
                    Some("UserCreatedEvent"),
                    &created(&id, &format!("name-{n}-0")),
                )
                .await,
        );
        for round in 1..=2 {
            let name = format!("name-{n}-{round}");
            produced.push(
                stack
                    .produce(
                        key,
                        Some("UserProfileUpdatedEvent"),
                        &profile(&id, "u", Some(&name), None),
                    )
                    .await,
            );
        }
        // Applied before the updates, this would make them skipped (deactivated users are
        // never renamed): the final name proves the order.
        produced.push(
            stack
                .produce(key, Some("UserDeletedEvent"), &deleted(&id, true))
                .await,
        );
    }
    eventually(
        Duration::from_secs(30),
        "roster to retry against the absent Synapse",
        || async {
            (stack
                .roster
                .metric("roster_lifecycle_events_total", &["outcome=\"retried\""])
                .await
                >= 3)
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        stack.tansu.committed(GROUP, TOPIC),
        committed_before,
        "nothing committed while Synapse is away"
    );
    assert_eq!(
        stack.events("created", "applied").await,
        1,
        "only the warm-up"
    );
    assert_eq!(
        stack.roster.metric("roster_dead_letters_total", &[]).await,
        0,
        "transient failures are never dead letters"
    );
    // A replay forward would commit past the events waiting for Synapse: refused.
    let waiting = &produced[1..];
    let (partition, last) = waiting
        .iter()
        .filter(|(p, _)| waiting.iter().filter(|(q, _)| q == p).count() > 1)
        .max_by_key(|(_, offset)| *offset)
        .copied()
        .expect("a partition with two events waiting");
    let (ok, _, stderr) = stack.roster.cli(&[
        "replay",
        "--partition",
        &partition.to_string(),
        "--offset",
        &last.to_string(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("HTTP 400")
            && stderr.contains(&format!("past partition {partition}'s position"))
            && stderr.contains("never skips events"),
        "{stderr}"
    );
    assert_eq!(
        stack.tansu.committed(GROUP, TOPIC),
        committed_before,
        "the refused replay committed nothing"
    );

    stack.synapse.restart().await;
    for n in 0..USERS {
        let want = format!("name-{n}-2");
        let user = stack
            .wait_user(&nova(&uuid(4, n)), "deactivated after its updates", |u| {
                u["deactivated"] == json!(true)
            })
            .await;
        assert_eq!(
            display_name(&user),
            Some(want.as_str()),
            "in order per user: {user}"
        );
    }
    stack.wait_committed(&produced).await;
    assert_eq!(stack.events("profile_updated", "skipped").await, 0);
    assert_eq!(
        stack.roster.metric("roster_dead_letters_total", &[]).await,
        0
    );
    stack.synapse.assert_no_logins().await;
    stack.roster.assert_no_secrets_in_logs(&[&stack.admin]);
}

#[tokio::test]
async fn replay_reapplies_events_from_an_offset() {
    let mut stack = Stack::new("lifecycle-replay", "").await;
    let id = uuid(5, 1);
    let mut produced = vec![
        stack
            .produce(Some(&id), Some("UserCreatedEvent"), &created(&id, "named"))
            .await,
    ];
    let (partition, offset) = stack
        .produce(
            Some(&id),
            Some("UserProfileUpdatedEvent"),
            &profile(&id, "u", Some("Replayed"), None),
        )
        .await;
    produced.push((partition, offset));
    stack.roster.start().await;
    stack
        .wait_user(&nova(&id), "named", |u| display_name(u) == Some("Replayed"))
        .await;
    stack.wait_committed(&produced).await;

    // Someone renames the user behind roster's back; a replay puts the event's name back.
    let (status, body) = stack
        .synapse
        .call(
            Method::PUT,
            &format!("/_synapse/admin/v2/users/{}", nova(&id)),
            &stack.admin,
            Some(json!({ "displayname": "Changed" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    stack
        .wait_user(&nova(&id), "renamed by hand", |u| {
            display_name(u) == Some("Changed")
        })
        .await;
    let (ok, stdout, stderr) = stack.roster.cli(&[
        "replay",
        "--partition",
        &partition.to_string(),
        "--offset",
        &offset.to_string(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout.trim(),
        format!("replaying {TOPIC} partition {partition} from offset {offset}")
    );
    stack
        .wait_user(&nova(&id), "the replayed name", |u| {
            display_name(u) == Some("Replayed")
        })
        .await;
    stack.wait_committed(&produced).await;

    // A partition nothing came from (its position unknown): its start skips nothing.
    let empty = (partition + 1) % PARTITIONS;
    let (ok, stdout, stderr) =
        stack
            .roster
            .cli(&["replay", "--partition", &empty.to_string(), "--offset", "0"]);
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout.trim(),
        format!("replaying {TOPIC} partition {empty} from offset 0")
    );

    let (ok, _, stderr) = stack
        .roster
        .cli(&["replay", "--partition", "42", "--offset", "0"]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "{TOPIC} has no partition 42; its partitions are 0..={}",
            PARTITIONS - 1
        )) && stderr.contains("HTTP 400")
            && stderr.lines().count() == 1,
        "{stderr}"
    );
    // An offset outside the partition's range is refused, naming the range.
    for outside in ["--offset=-5", "--offset=1000000"] {
        let (ok, _, stderr) =
            stack
                .roster
                .cli(&["replay", "--partition", &partition.to_string(), outside]);
        assert!(!ok, "{outside}");
        eprintln!("replay {outside}: {}", stderr.trim());
        assert!(
            stderr.contains("HTTP 400")
                && stderr.contains("outside partition")
                && stderr.lines().count() == 1,
            "{outside}: {stderr}"
        );
    }
    stack.synapse.assert_no_logins().await;
    stack.roster.assert_no_secrets_in_logs(&[&stack.admin]);
}

#[tokio::test]
async fn matrix_disabled_consumes_logs_and_commits_without_matrix_actions() {
    let scratch = Scratch::new("lifecycle-matrix-off");
    let tansu = Tansu::start(scratch.path(), PARTITIONS, &[TOPIC, DLQ]).await;
    let mut roster = Roster::configure(
        scratch.path(),
        &nowhere(),
        &tansu.lifecycle_yaml(TOPIC, GROUP, ""),
    );
    roster.env("MATRIX_ENABLED", "false");
    let id = uuid(6, 1);
    let produced = vec![
        tansu
            .produce_event(TOPIC, Some(&id), "UserCreatedEvent", &created(&id, "x"))
            .await,
        tansu
            .produce_event(TOPIC, Some(&id), "UserDeletedEvent", &deleted(&id, false))
            .await,
    ];
    roster.start().await;
    tansu.wait_committed(GROUP, TOPIC, &produced).await;
    // The only consumer of the group holds every partition of the topic.
    assert_eq!(
        roster
            .metric(
                "roster_lifecycle_partitions",
                &[&format!("topic=\"{TOPIC}\"")]
            )
            .await,
        PARTITIONS as u64
    );
    let metric =
        |labels: &'static [&'static str]| roster.metric("roster_lifecycle_events_total", labels);
    assert_eq!(metric(&["outcome=\"matrix_disabled\""]).await, 2);
    assert_eq!(metric(&["outcome=\"applied\""]).await, 0);
    for endpoint in [
        "set_display_name",
        "deactivate",
        "federation_version",
        "upload",
    ] {
        assert_eq!(
            roster.homeserver_requests(Some(endpoint)).await,
            0,
            "{endpoint}"
        );
    }
    let log = std::fs::read_to_string(roster.dir.join("roster-1.log")).unwrap();
    assert!(log.contains("no Matrix action"), "logged");
    assert!(
        !log.contains("x@mail.example"),
        "no e-mail addresses in logs"
    );
    roster.assert_no_secrets_in_logs(&[]);
}

/// With `lifecycle.enabled` false no consumer starts; with it true, the same config starts
/// one at once. `homeserver.flavor: synapse` keeps the identity effects from asking the
/// (absent) homeserver anything first, so a consumer that starts would log its marker
/// straight away instead of looping on the homeserver before it, as the control shows.
#[tokio::test]
async fn kafka_disabled_starts_no_consumer() {
    let scratch = Scratch::new("lifecycle-off");
    // A broker address where nothing listens: creating a consumer does not connect.
    let lifecycle = format!(
        "lifecycle:\n  enabled: false\n  brokers: 127.0.0.1:{}\n  topic: {TOPIC}\n  group_id: {GROUP}\n",
        free_port()
    );
    let mut roster = Roster::configure(scratch.path(), &nowhere(), &lifecycle);
    roster.env("ROSTER_HOMESERVER__FLAVOR", "synapse");
    roster.start().await;
    // The homeserver is unreachable: the fifth failed ping comes after four backoffs
    // (0.25 + 0.5 + 1 + 2 s), long after a consumer started with roster would have said so.
    eventually(
        Duration::from_secs(60),
        "the fifth failed start-up ping",
        || async {
            let log = std::fs::read_to_string(roster.dir.join("roster-1.log")).unwrap();
            log.lines()
                .any(|l| {
                    l.contains("the homeserver cannot ping roster yet") && l.contains("attempt=5 ")
                })
                .then_some(())
        },
    )
    .await;
    let log = std::fs::read_to_string(roster.dir.join("roster-1.log")).unwrap();
    assert!(!log.contains("lifecycle consumer started"), "{log}");
    // No consumer, no partitions gauge: the alert on a consumer holding none stays quiet.
    let metrics = roster.metrics().await;
    assert!(
        !metrics.contains("roster_lifecycle_partitions"),
        "{metrics}"
    );
    let (ok, status, _) = roster.cli(&["status"]);
    assert!(ok && status.contains("\nlifecycle: off\n"), "{status}");
    let (ok, _, stderr) = roster.cli(&["replay", "--partition", "0", "--offset", "0"]);
    assert!(!ok);
    assert!(
        stderr.contains("not running") && stderr.contains("KAFKA_ENABLED"),
        "{stderr}"
    );
    roster.stop();

    // The control: the same config with KAFKA_ENABLED=true starts the consumer at once.
    roster.env("KAFKA_ENABLED", "true");
    roster.start().await;
    eventually(
        Duration::from_secs(30),
        "the consumer's start marker",
        || async {
            let log = std::fs::read_to_string(roster.dir.join("roster-2.log")).unwrap();
            log.contains("lifecycle consumer started").then_some(())
        },
    )
    .await;
    let (ok, _, stderr) = roster.cli(&["replay", "--partition", "0", "--offset", "0"]);
    assert!(!ok);
    assert!(
        !stderr.contains("not running"),
        "the running consumer answers: {stderr}"
    );
    // A consumer that cannot reach its brokers holds no partition, and says so: lag and
    // stalls stay 0 there, so this is the only metric that shows it consumes nothing.
    let held = format!("roster_lifecycle_partitions{{topic=\"{TOPIC}\"}} 0");
    let metrics = roster.metrics().await;
    assert!(metrics.contains(&held), "{held} missing in\n{metrics}");
    let (ok, status, _) = roster.cli(&["status"]);
    assert!(
        ok && status.contains("\nlifecycle: 0 partitions held, lag 0 messages\n"),
        "{status}"
    );
    roster.assert_no_secrets_in_logs(&[]);
}

/// On tuwunel roster must leave the user's rooms and clear its profile as the user first
/// (the admin deactivation does neither, and a deactivated user can no longer act), then
/// deactivate it with the admin token. The stand-in refuses a deactivated user's actions, so
/// the opposite order would leave the rooms and the profile as they were.
#[tokio::test]
async fn tuwunel_standin_leaves_and_clears_as_the_user_then_deactivates_with_the_admin_token() {
    let scratch = Scratch::new("lifecycle-tuwunel");
    let tansu = Tansu::start(scratch.path(), PARTITIONS, &[TOPIC, DLQ]).await;
    // The stand-in needs roster's as_token, which `configure` generates: configure against a
    // placeholder first, then point roster at the stand-in through the environment.
    let mut roster = Roster::configure(
        scratch.path(),
        &nowhere(),
        &tansu.lifecycle_yaml(TOPIC, GROUP, ""),
    );
    let admin_token = "standin-admin-token";
    let (url, standin) = tuwunel::start(&roster.as_tokens(), admin_token).await;
    roster.env("MATRIX_HOMESERVER_URL", &url);
    roster.env("ROSTER_HOMESERVER__URL", &url);
    roster.env("MATRIX_ADMIN_TOKEN", admin_token);
    let (hard, soft, ghost) = (uuid(7, 1), uuid(7, 2), uuid(7, 3));
    let rooms = ["!a:roster.test", "!b:roster.test"];
    let mut produced = Vec::new();
    for (id, name) in [(&hard, "hard"), (&soft, "soft")] {
        produced.push(
            tansu
                .produce_event(TOPIC, Some(id), "UserCreatedEvent", &created(id, name))
                .await,
        );
        produced.push(
            tansu
                .produce_event(
                    TOPIC,
                    Some(id),
                    "UserProfileUpdatedEvent",
                    &profile(id, name, None, Some("mxc://roster.test/pic")),
                )
                .await,
        );
    }
    roster.start().await;
    eventually(
        Duration::from_secs(60),
        "both users created with avatars",
        || async {
            let s = standin.lock().unwrap();
            let ok = [&hard, &soft].iter().all(|id| {
                s.users
                    .get(&nova(id))
                    .is_some_and(|u| u.avatar_url.as_deref() == Some("mxc://roster.test/pic"))
            });
            ok.then_some(())
        },
    )
    .await;
    {
        // They joined rooms in the meantime.
        let mut s = standin.lock().unwrap();
        for room in rooms {
            s.rooms.insert(
                room.into(),
                [nova(&hard), nova(&soft)].into_iter().collect(),
            );
        }
    }
    for (id, soft_delete) in [(&hard, false), (&soft, true), (&ghost, true)] {
        produced.push(
            tansu
                .produce_event(
                    TOPIC,
                    Some(id),
                    "UserDeletedEvent",
                    &deleted(id, soft_delete),
                )
                .await,
        );
    }
    tansu.wait_committed(GROUP, TOPIC, &produced).await;

    {
        let s = standin.lock().unwrap();
        let hard_user = &s.users[&nova(&hard)];
        assert!(hard_user.deactivated && hard_user.erased, "{hard_user:?}");
        assert_eq!(hard_user.displayname, None, "profile cleared by roster");
        assert_eq!(hard_user.avatar_url, None, "profile cleared by roster");
        let soft_user = &s.users[&nova(&soft)];
        assert!(soft_user.deactivated && !soft_user.erased, "{soft_user:?}");
        assert_eq!(
            soft_user.displayname.as_deref(),
            Some("soft"),
            "a soft delete keeps the profile"
        );
        for room in rooms {
            assert!(
                s.rooms[room].is_empty(),
                "{room} left by both: {:?}",
                s.rooms[room]
            );
        }
        // The order that works: as the user first, the admin deactivation last.
        let mut leaves: Vec<String> = rooms.iter().map(|r| format!("leave {r}")).collect();
        leaves.sort();
        let mut hard_journal = s.journal_of(&nova(&hard));
        let creation = hard_journal
            .iter()
            .position(|w| w.starts_with("leave"))
            .expect("the hard-deleted user left rooms");
        let mut deletion = hard_journal.split_off(creation);
        deletion[..2].sort();
        let mut want = leaves.clone();
        want.extend([
            "displayname".into(),
            "avatar_url".into(),
            "admin_deactivate".into(),
        ]);
        assert_eq!(deletion, want, "hard delete: leave, clear, then deactivate");
        let mut soft_journal = s.journal_of(&nova(&soft));
        let creation = soft_journal
            .iter()
            .position(|w| w.starts_with("leave"))
            .expect("the soft-deleted user left rooms");
        let mut deletion = soft_journal.split_off(creation);
        deletion[..2].sort();
        let mut want = leaves;
        want.push("admin_deactivate".into());
        assert_eq!(deletion, want, "soft delete: leave, then deactivate");
        assert_eq!(
            s.refused_deactivated, 0,
            "roster never acted as a deactivated user"
        );
        assert_eq!(
            s.account_deactivate_calls, 0,
            "roster knows tuwunel has no appservice bypass"
        );
        let mut deactivations = s.admin_deactivations.clone();
        deactivations.sort();
        let mut want = vec![(nova(&hard), true), (nova(&soft), false)];
        want.sort();
        assert_eq!(deactivations, want);
        assert!(!s.users.contains_key(&nova(&ghost)));
    }
    assert_eq!(roster.lifecycle_events("deleted", "applied").await, 2);
    assert_eq!(roster.lifecycle_events("deleted", "missing_user").await, 1);
    let log = std::fs::read_to_string(roster.dir.join("roster-1.log")).unwrap();
    assert!(log.contains("Tuwunel"), "detected by flavor auto");
    roster.assert_no_secrets_in_logs(&[admin_token]);
}

#[tokio::test]
async fn tuwunel_standin_without_an_admin_token_stops_start_up_with_a_clear_error() {
    let scratch = Scratch::new("lifecycle-tuwunel-no-token");
    let tansu = Tansu::start(scratch.path(), PARTITIONS, &[TOPIC, DLQ]).await;
    let roster = Roster::configure(
        scratch.path(),
        &nowhere(),
        &tansu.lifecycle_yaml(TOPIC, GROUP, ""),
    );
    let (url, _standin) = tuwunel::start(&roster.as_tokens(), "unused").await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["serve", "-c"])
        .arg(&roster.config)
        .env("ROSTER_HOMESERVER__URL", &url)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("roster kept running without the admin token tuwunel needs");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("roster: ")
            && last.contains("Tuwunel")
            && last.contains("homeserver.admin_token"),
        "{stderr}"
    );
    assert!(stderr.contains("roster starting"), "{stderr}");
    for (what, secret) in [
        ("as_token", &roster.as_token),
        ("hs_token", &roster.hs_token),
        ("admin token", &roster.admin_token),
    ] {
        assert!(!stderr.contains(secret.as_str()), "the {what} was logged");
    }
}

/// Users `from..to`, each created and renamed twice (`user-<n>-v2` last), keyed by user.
async fn batch(tansu: &Tansu, from: u32, to: u32) -> Vec<(i32, i64)> {
    tansu.produce_renamed_users(TOPIC, 8, from, to).await
}

#[tokio::test]
async fn partitions_handed_between_two_rosters_lose_nothing() {
    let stack = Stack::new("lifecycle-rebalance", "").await;
    // A second roster in the same group, with the same registration (one appservice).
    let mut second = Roster::configure(
        &stack.scratch.path().join("second"),
        &stack.synapse.url(),
        &stack.tansu.lifecycle_yaml(TOPIC, GROUP, ""),
    );
    second.use_registrations_of(&stack.roster);
    // One appservice, one URL for the homeserver to push to (as behind one Service): the
    // registration's, which is the first's listener.
    second.env("ROSTER_APPSERVICE__URL", &stack.roster.appservice_url(""));
    let mut produced = batch(&stack.tansu, 0, 30).await;
    let mut first = stack.roster;
    first.start().await;
    let stack = Stack {
        roster: first,
        ..stack
    };
    eventually(
        Duration::from_secs(60),
        "the first roster to apply some",
        || async { (stack.events("profile_updated", "applied").await >= 10).then_some(()) },
    )
    .await;
    second.start().await;
    produced.extend(batch(&stack.tansu, 30, 60).await);
    eventually(
        Duration::from_secs(60),
        "the second roster to take partitions",
        || async {
            let applied = second
                .metric("roster_lifecycle_events_total", &["outcome=\"applied\""])
                .await;
            (applied > 0).then_some(())
        },
    )
    .await;
    // The first leaves gracefully: its partitions (and what it finished) go to the second.
    let Stack {
        mut roster,
        synapse,
        tansu,
        scratch,
        admin,
    } = stack;
    roster.stop();
    let stack = Stack {
        roster,
        synapse,
        tansu,
        scratch,
        admin,
    };
    produced.extend(batch(&stack.tansu, 60, 70).await);
    for n in 0..70 {
        let want = format!("user-{n}-v2");
        stack
            .wait_user(&nova(&uuid(8, n)), &format!("display name {want}"), |u| {
                display_name(u) == Some(want.as_str())
            })
            .await;
    }
    stack.wait_committed(&produced).await;
    assert_eq!(second.metric("roster_dead_letters_total", &[]).await, 0);
    stack.synapse.assert_no_logins().await;
    stack.roster.assert_no_secrets_in_logs(&[&stack.admin]);
    second.assert_no_secrets_in_logs(&[&stack.admin]);
}

/// Serves a picture of its own at each path on 127.0.0.1 (the test PNG, the path after
/// its end) and counts the requests it answered.
async fn counting_avatar_server() -> (String, Arc<AtomicUsize>) {
    let fetched = Arc::new(AtomicUsize::new(0));
    let counter = fetched.clone();
    let app = Router::new().route(
        "/{name}",
        get(
            move |axum::extract::Path(name): axum::extract::Path<String>| {
                counter.fetch_add(1, Ordering::SeqCst);
                let picture = [PNG, name.as_bytes()].concat();
                async { ([("content-type", "image/png")], picture) }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), fetched)
}

/// The profile writes and uploads roster made, by roster's count and by Synapse's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Writes {
    /// Synapse: requests to its profile field servlet (display name and avatar alike).
    synapse_profile: u64,
    /// Synapse: media uploads.
    synapse_uploads: u64,
    names: u64,
    avatars: u64,
    uploads: u64,
}

impl Writes {
    async fn now(stack: &Stack) -> Writes {
        Writes {
            synapse_profile: stack
                .synapse
                .requests_received("ProfileFieldRestServlet")
                .await,
            synapse_uploads: stack.synapse.requests_received("UploadServlet").await,
            names: stack
                .roster
                .homeserver_requests(Some("set_display_name"))
                .await,
            avatars: stack
                .roster
                .homeserver_requests(Some("set_avatar_url"))
                .await,
            uploads: stack.roster.homeserver_requests(Some("upload")).await,
        }
    }

    /// What was sent since `before`, as (names, avatars, uploads), after checking that
    /// Synapse counted the same requests roster did.
    fn since(self, before: Writes) -> (u64, u64, u64) {
        let (names, avatars, uploads) = (
            self.names - before.names,
            self.avatars - before.avatars,
            self.uploads - before.uploads,
        );
        assert_eq!(
            self.synapse_profile - before.synapse_profile,
            names + avatars,
            "Synapse's profile requests and roster's agree: {before:?} -> {self:?}"
        );
        assert_eq!(
            self.synapse_uploads - before.synapse_uploads,
            uploads,
            "Synapse's uploads and roster's agree: {before:?} -> {self:?}"
        );
        (names, avatars, uploads)
    }
}

/// Issue 10: nothing changed, nothing is sent. Profile updates that change only what roster
/// does not apply (follower counts) send Synapse nothing, before and after a restart; a
/// change sends exactly its part; an avatar URL is fetched and uploaded once.
#[tokio::test]
async fn profile_updates_send_the_homeserver_only_what_changed() {
    let mut stack = Stack::new("lifecycle-unchanged", "  avatar_allow_private: true\n").await;
    let (avatars, fetched) = counting_avatar_server().await;
    let (pic1, pic2) = (format!("{avatars}/one.png"), format!("{avatars}/two.png"));
    let (alice, bob, carol) = (uuid(9, 1), uuid(9, 2), uuid(9, 3));
    let update = |id: &str, name: &str, avatar: &str, followers: u32| {
        let mut body = profile(id, "u", Some(name), Some(avatar));
        body["follower_count"] = json!(followers);
        ("UserProfileUpdatedEvent", body)
    };
    let created = |id: &str, name: &str| ("UserCreatedEvent", created(id, name));
    stack.roster.start().await;
    let mut produced = Vec::new();
    stack
        .produce_all(
            &mut produced,
            &[
                created(&alice, "alice"),
                created(&bob, "bob"),
                update(&alice, "Alice", &pic1, 0),
            ],
        )
        .await;
    let first = stack
        .wait_user(&nova(&alice), "named, with an avatar", |u| {
            display_name(u) == Some("Alice") && u["avatar_url"].as_str().is_some()
        })
        .await;
    let mxc1 = first["avatar_url"].as_str().unwrap().to_owned();
    stack.wait_committed(&produced).await;
    assert_eq!(fetched.load(Ordering::SeqCst), 1);

    // Unchanged: 20 updates where only the follower count moves send nothing at all, by
    // Synapse's count of every request it received and by roster's.
    let (roster_before, synapse_before) = wait_quiet(&stack.roster, &stack.synapse).await;
    let applied_before = stack.events("profile_updated", "applied").await;
    let unchanged: Vec<_> = (1..=20)
        .map(|followers| update(&alice, "Alice", &pic1, followers))
        .collect();
    stack.produce_all(&mut produced, &unchanged).await;
    stack.wait_committed(&produced).await;
    let unchanged = stack.events("profile_updated", "unchanged").await;
    let superseded = stack.events("profile_updated", "superseded").await;
    eprintln!("20 follower-count updates: {unchanged} unchanged, {superseded} superseded");
    assert!(unchanged >= 1, "the newest one at least was checked");
    assert_eq!(unchanged + superseded, 20);
    assert_eq!(
        stack.events("profile_updated", "applied").await,
        applied_before
    );
    stack
        .assert_sent_nothing_since(roster_before, synapse_before)
        .await;
    assert_eq!(fetched.load(Ordering::SeqCst), 1, "nothing fetched either");

    // A new name alone: one display-name request, no avatar request, no upload.
    let sent = stack
        .writes_of(&mut produced, &[update(&alice, "Alice A.", &pic1, 21)])
        .await;
    assert_eq!(sent, (1, 0, 0));
    let user = stack.user(&nova(&alice)).await.unwrap();
    assert_eq!(display_name(&user), Some("Alice A."));
    assert_eq!(user["avatar_url"].as_str(), Some(mxc1.as_str()));

    // A new avatar alone: fetched and uploaded once, set once, the name left alone.
    let sent = stack
        .writes_of(&mut produced, &[update(&alice, "Alice A.", &pic2, 22)])
        .await;
    assert_eq!(sent, (0, 1, 1));
    assert_eq!(fetched.load(Ordering::SeqCst), 2);
    let user = stack.user(&nova(&alice)).await.unwrap();
    let mxc2 = user["avatar_url"].as_str().unwrap().to_owned();
    assert_ne!(mxc2, mxc1);

    // A repeated avatar URL (another user names the first picture) is not fetched or
    // uploaded again: its mxc:// is reused.
    let sent = stack
        .writes_of(&mut produced, &[update(&bob, "Bob", &pic1, 0)])
        .await;
    let bob_user = stack
        .wait_user(&nova(&bob), "renamed, with the reused avatar", |u| {
            display_name(u) == Some("Bob")
        })
        .await;
    assert_eq!(bob_user["avatar_url"].as_str(), Some(mxc1.as_str()));
    assert_eq!(sent, (1, 1, 0));
    assert_eq!(
        fetched.load(Ordering::SeqCst),
        2,
        "the picture was not fetched again"
    );

    // After a restart the store decides: an unchanged update still sends nothing.
    stack.roster.stop();
    stack.roster.start().await;
    stack.roster.wait_ready().await;
    let (roster_before, synapse_before) = wait_quiet(&stack.roster, &stack.synapse).await;
    let again = [
        update(&alice, "Alice A.", &pic2, 99),
        update(&bob, "Bob", &pic1, 99),
    ];
    stack.produce_all(&mut produced, &again).await;
    stack.wait_committed(&produced).await;
    assert_eq!(stack.events("profile_updated", "unchanged").await, 2);
    assert_eq!(stack.events("profile_updated", "applied").await, 0);
    stack
        .assert_sent_nothing_since(roster_before, synapse_before)
        .await;
    assert_eq!(fetched.load(Ordering::SeqCst), 2);

    // And a created user whose next update names its username again: nothing sent for it.
    let carol_again = (
        "UserProfileUpdatedEvent",
        profile(&carol, "carol", None, None),
    );
    let sent = stack
        .writes_of(&mut produced, &[created(&carol, "carol"), carol_again])
        .await;
    assert_eq!(sent, (1, 0, 0));
    assert_eq!(stack.events("profile_updated", "unchanged").await, 3);
    stack.synapse.assert_no_logins().await;
    stack.roster.assert_no_secrets_in_logs(&[&stack.admin]);
}

/// Issue 9: a consumer group with no committed offsets starts where `lifecycle.start_from`
/// says: `latest` skips the events the topic still retains, `earliest` (the default)
/// applies them.
#[tokio::test]
async fn start_from_latest_skips_retained_events_and_earliest_applies_them() {
    let mut stack = Stack::new("lifecycle-start-from", "").await;
    let (retained, fresh) = (uuid(10, 1), uuid(10, 2));
    stack
        .produce(None, Some("UserCreatedEvent"), &created(&retained, "old"))
        .await;

    stack.roster.env("ROSTER_LIFECYCLE__START_FROM", "latest");
    stack.roster.env("KAFKA_CONSUMER_GROUP_ID", "roster-latest");
    stack.roster.start().await;
    // A new event is applied once the group has its position: produce one until it is (an
    // event produced before the position was taken is skipped too, as `latest` says).
    let mut attempt = 0;
    eventually(
        Duration::from_secs(90),
        "an event produced after start to be applied",
        || {
            attempt += 1;
            let name = format!("new-{attempt}");
            let stack = &stack;
            let fresh = &fresh;
            async move {
                stack
                    .produce(None, Some("UserCreatedEvent"), &created(fresh, &name))
                    .await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                stack.user(&nova(fresh)).await.map(|_| ())
            }
        },
    )
    .await;
    // The retained event was produced before the group existed: with `latest` its user is
    // never created, though a later event of another user was applied.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        stack.user(&nova(&retained)).await.is_none(),
        "start_from: latest applied a retained event"
    );
    assert!(stack.events("created", "applied").await >= 1);

    // The same topic, a new group starting from the earliest retained event: applied.
    stack.roster.stop();
    stack.roster.clear_env();
    stack
        .roster
        .env("KAFKA_CONSUMER_GROUP_ID", "roster-earliest");
    stack.roster.start().await;
    stack
        .wait_user(&nova(&retained), "the retained event applied", |u| {
            display_name(u) == Some("old")
        })
        .await;
    stack.synapse.assert_no_logins().await;
    stack.roster.assert_no_secrets_in_logs(&[&stack.admin]);
}

/// roster moved to another Kafka cluster (the same topic name, `lifecycle.brokers` changed,
/// or the same address in front of a rebuilt cluster): the new topic's offsets start again
/// at 0, so positions applied from the old cluster must not make its updates look applied
/// already. The first update there is applied, not dropped as `already_applied`.
#[tokio::test]
async fn updates_from_a_new_cluster_are_not_held_back_by_the_old_clusters_offsets() {
    let mut stack = Stack::new("lifecycle-new-cluster", "").await;
    let id = uuid(12, 1);
    stack.roster.start().await;
    let mut produced = Vec::new();
    let rename = |name: &str| {
        (
            "UserProfileUpdatedEvent",
            profile(&id, "u", Some(name), None),
        )
    };
    stack
        .produce_all(
            &mut produced,
            &[
                ("UserCreatedEvent", created(&id, "x")),
                rename("v1"),
                rename("v2"),
                rename("v3"),
            ],
        )
        .await;
    stack.wait_committed(&produced).await;
    stack
        .wait_user(&nova(&id), "display name v3", |u| {
            display_name(u) == Some("v3")
        })
        .await;
    stack.roster.stop();

    let dir = stack.scratch.path().join("cluster-b");
    std::fs::create_dir_all(&dir).unwrap();
    let moved = Tansu::start_in_cluster(&dir, PARTITIONS, &[TOPIC, DLQ], "cluster-b").await;
    stack
        .roster
        .env("ROSTER_LIFECYCLE__BROKERS", &moved.brokers());
    stack.roster.start().await;
    let (name, body) = rename("moved");
    let at = moved.produce_event(TOPIC, Some(&id), name, &body).await;
    assert!(
        produced.iter().any(|&(p, o)| p == at.0 && o >= at.1),
        "the new cluster's offset {at:?} is one the old cluster applied already"
    );
    moved.wait_committed(GROUP, TOPIC, &[at]).await;
    let user = stack.user(&nova(&id)).await.unwrap();
    assert_eq!(
        display_name(&user),
        Some("moved"),
        "the update from the new cluster was applied"
    );
    assert_eq!(stack.events("profile_updated", "already_applied").await, 0);
    let log = std::fs::read_to_string(stack.roster.dir.join("roster-2.log")).unwrap();
    assert!(log.contains("cluster=cluster-b"), "known by its cluster id");
}
