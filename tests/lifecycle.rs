//! Identity lifecycle events from a real Kafka-protocol broker (tansu) into a real Synapse,
//! by masquerading only: every accepted message shape, dead letters, SIGKILL mid-batch,
//! Synapse away, replay; and the tuwunel path against a stand-in that answers the way
//! tuwunel's source says it does.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use reqwest::Method;
use serde_json::{Value, json};
use support::*;

const TOPIC: &str = "nova.identity.events";
const DLQ: &str = "nova.identity.events.dlq";
const GROUP: &str = "roster";
const PARTITIONS: i32 = 3;

/// A UUID unique to this test run and `n`.
fn uuid(salt: u32, n: u32) -> String {
    let run = std::process::id() & 0xffff;
    format!("{salt:08x}-{run:04x}-4000-8000-{n:012x}")
}

fn nova(uuid: &str) -> String {
    format!("@nova-{uuid}:{SERVER_NAME}")
}

fn created(uuid: &str, username: &str) -> Value {
    json!({ "user_id": uuid, "username": username, "email": format!("{username}@mail.example"), "created_at": "2026-11-21T00:00:00Z" })
}

fn profile(uuid: &str, username: &str, display_name: Option<&str>, avatar: Option<&str>) -> Value {
    json!({ "user_id": uuid, "username": username, "display_name": display_name, "bio": "hi",
            "avatar_url": avatar, "is_verified": false, "follower_count": 0, "updated_at": "2026-11-21T00:00:00Z" })
}

fn deleted(uuid: &str, soft_delete: bool) -> Value {
    json!({ "user_id": uuid, "deleted_at": "2026-11-21T00:00:00Z", "soft_delete": soft_delete })
}

fn envelope(event_type: Option<&str>, data: Value) -> Value {
    let mut v = json!({ "event_id": uuid_like(), "timestamp": "2026-11-21T00:00:00Z", "schema_version": "1.0",
                        "source": "identity-service", "correlation_id": uuid_like(), "data": data });
    if let Some(t) = event_type {
        v["event_type"] = json!(t);
    }
    v
}

fn with_type(mut bare: Value, event_type: &str) -> Value {
    bare["event_type"] = json!(event_type);
    bare
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

/// Synapse + tansu + a configured (not started) roster consuming `TOPIC`.
struct Stack {
    scratch: Scratch,
    tansu: Tansu,
    synapse: Synapse,
    roster: Roster,
    admin: String,
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

    async fn produce(
        &self,
        key: Option<&str>,
        event_type: Option<&str>,
        body: &Value,
    ) -> (i32, i64) {
        let headers: Vec<(&str, &str)> =
            event_type.map(|t| ("event_type", t)).into_iter().collect();
        // Like the identity service, key by user unless told otherwise: an unkeyed message
        // lands on a random partition, and order is only kept within one.
        let user_key = body["data"]["user_id"]
            .as_str()
            .or(body["user_id"].as_str())
            .map(str::to_owned);
        let key = key.or(user_key.as_deref());
        self.tansu
            .produce(TOPIC, None, key, &headers, &bytes(body))
            .await
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

    async fn wait_committed(&self, expected: &[i64]) {
        eventually(
            Duration::from_secs(30),
            &format!("committed offsets to reach {expected:?}"),
            || async {
                let committed = self.tansu.committed(GROUP, TOPIC);
                (committed == expected).then_some(())
            },
        )
        .await;
    }

    async fn events(&self, event: &str, outcome: &str) -> u64 {
        self.roster
            .metric(
                "roster_lifecycle_events_total",
                &[
                    &format!("type=\"{event}\""),
                    &format!("outcome=\"{outcome}\""),
                ],
            )
            .await
    }
}

fn display_name(u: &Value) -> Option<&str> {
    u["displayname"].as_str()
}

/// Ends after the highest produced offset of each partition (tansu's memory storage reports
/// a wrong high watermark, so count what was produced instead).
fn ends(produced: &[(i32, i64)]) -> Vec<i64> {
    (0..PARTITIONS)
        .map(|p| {
            produced
                .iter()
                .filter(|(q, _)| *q == p)
                .map(|(_, o)| o + 1)
                .max()
                .unwrap_or(-1)
        })
        .collect()
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
    let stack = Stack::new("lifecycle-shapes", "").await;
    let avatars = avatar_server().await;
    let (alice, bob, carol, dora, eve, ghost) = (
        uuid(1, 1),
        uuid(1, 2),
        uuid(1, 3),
        uuid(1, 4),
        uuid(1, 5),
        uuid(1, 6),
    );
    // A user that exists before any event (made by an admin, not by roster).
    let _ = stack.synapse.admin_token(&format!("nova-{dora}"));
    let logins_at_start = stack.synapse.login_count().await;

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
    stack.wait_committed(&ends(&produced)).await;

    assert_eq!(stack.events("created", "applied").await, 3);
    assert_eq!(stack.events("profile_updated", "applied").await, 4);
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
    stack.wait_committed(&ends(&produced)).await;
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
    stack.wait_committed(&ends(&produced)).await;

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
    stack.wait_committed(&ends(&produced)).await;
    assert_eq!(
        stack.events("created", "skipped").await,
        1,
        "remembered across restart"
    );
    let alice_user = stack.user(&nova(&alice)).await.unwrap();
    assert_eq!(alice_user["displayname"], Value::Null);
    assert_eq!(stack.synapse.login_count().await, logins_at_start);
    assert_eq!(logins_at_start, 0);
}

#[tokio::test]
async fn poison_messages_go_to_the_dead_letter_topic_and_later_events_apply() {
    let stack = Stack::new("lifecycle-poison", "").await;
    let (a, b) = (uuid(2, 1), uuid(2, 2));
    let mut produced = Vec::new();
    let trace = [("event_type", "UserCreatedEvent"), ("trace_id", "t-1")];
    // Not JSON, a created event without a username, and an avatar Synapse refuses (400).
    produced.push(
        stack
            .tansu
            .produce(TOPIC, Some(0), Some("poison-1"), &trace, b"{not json")
            .await,
    );
    produced.push(
        stack
            .tansu
            .produce(
                TOPIC,
                Some(0),
                Some("poison-2"),
                &[("event_type", "UserCreatedEvent")],
                &bytes(&json!({ "user_id": a })),
            )
            .await,
    );
    produced.push(
        stack
            .tansu
            .produce(
                TOPIC,
                Some(0),
                Some(&a),
                &[("event_type", "UserCreatedEvent")],
                &bytes(&created(&a, "a")),
            )
            .await,
    );
    let too_long = format!("mxc://roster.test/{}", "x".repeat(1100));
    produced.push(
        stack
            .tansu
            .produce(
                TOPIC,
                Some(0),
                Some(&a),
                &[("event_type", "UserProfileUpdatedEvent")],
                &bytes(&profile(&a, "a", Some("A"), Some(&too_long))),
            )
            .await,
    );
    // The partition moves on.
    produced.push(
        stack
            .tansu
            .produce(
                TOPIC,
                Some(0),
                Some(&b),
                &[("event_type", "UserCreatedEvent")],
                &bytes(&created(&b, "b")),
            )
            .await,
    );
    produced.push(
        stack
            .tansu
            .produce(
                TOPIC,
                Some(0),
                Some(&a),
                &[("event_type", "UserProfileUpdatedEvent")],
                &bytes(&profile(&a, "a", Some("A2"), None)),
            )
            .await,
    );
    let mut roster = stack.roster;
    roster.start().await;
    let stack = Stack { roster, ..stack };

    stack
        .wait_user(&nova(&b), "created after the poison", |u| {
            display_name(u) == Some("b")
        })
        .await;
    stack
        .wait_user(&nova(&a), "updated after its refused update", |u| {
            display_name(u) == Some("A2")
        })
        .await;
    stack.wait_committed(&ends(&produced)).await;

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
    assert_eq!(stack.synapse.login_count().await, 0);
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
        ends(&produced),
        "not everything was committed before the kill"
    );

    roster.start().await;
    let stack = Stack { roster, ..stack };
    for n in 0..USERS {
        let want = format!("user-{n}-v2");
        stack
            .wait_user(&nova(&uuid(3, n)), &format!("display name {want}"), |u| {
                display_name(u) == Some(want.as_str())
            })
            .await;
    }
    stack.wait_committed(&ends(&produced)).await;
    assert_eq!(stack.synapse.login_count().await, 0);
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
    stack.wait_committed(&ends(&produced)).await;
    let committed_before = stack.tansu.committed(GROUP, TOPIC);
    assert_eq!(stack.synapse.login_count().await, 0);

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
    stack.wait_committed(&ends(&produced)).await;
    assert_eq!(stack.events("profile_updated", "skipped").await, 0);
    assert_eq!(
        stack.roster.metric("roster_dead_letters_total", &[]).await,
        0
    );
    assert_eq!(stack.synapse.login_count().await, 0);
}

fn roster_cli(roster: &Roster, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(args)
        .arg("-c")
        .arg(&roster.config)
        .output()
        .unwrap()
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
    stack.wait_committed(&ends(&produced)).await;

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
    let output = roster_cli(
        &stack.roster,
        &[
            "replay",
            "--partition",
            &partition.to_string(),
            "--offset",
            &offset.to_string(),
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains(&format!("partition {partition} from offset {offset}"))
    );
    stack
        .wait_user(&nova(&id), "the replayed name", |u| {
            display_name(u) == Some("Replayed")
        })
        .await;
    stack.wait_committed(&ends(&produced)).await;

    let output = roster_cli(
        &stack.roster,
        &["replay", "--partition", "42", "--offset", "0"],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not assigned") && stderr.lines().count() == 1,
        "{stderr}"
    );
    assert_eq!(stack.synapse.login_count().await, 0);
}

/// A homeserver address where nothing listens.
fn nowhere() -> String {
    format!("http://127.0.0.1:{}", free_port())
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
    let mut produced = Vec::new();
    produced.push(
        tansu
            .produce(
                TOPIC,
                None,
                Some(&id),
                &[("event_type", "UserCreatedEvent")],
                &bytes(&created(&id, "x")),
            )
            .await,
    );
    produced.push(
        tansu
            .produce(
                TOPIC,
                None,
                Some(&id),
                &[("event_type", "UserDeletedEvent")],
                &bytes(&deleted(&id, false)),
            )
            .await,
    );
    roster.start().await;
    eventually(Duration::from_secs(30), "committed to the end", || async {
        (tansu.committed(GROUP, TOPIC) == ends(&produced)).then_some(())
    })
    .await;
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
            roster
                .metric(
                    "roster_homeserver_requests_total",
                    &[&format!("endpoint=\"{endpoint}\"")]
                )
                .await,
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
    assert!(!log.contains(&roster.as_token), "no tokens in logs");
}

#[tokio::test]
async fn kafka_disabled_starts_no_consumer() {
    let scratch = Scratch::new("lifecycle-off");
    let mut roster = Roster::configure(scratch.path(), &nowhere(), "");
    roster.start().await;
    let output = roster_cli(&roster, &["replay", "--partition", "0", "--offset", "0"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not running") && stderr.contains("KAFKA_ENABLED"),
        "{stderr}"
    );
    let log = std::fs::read_to_string(roster.dir.join("roster-1.log")).unwrap();
    assert!(!log.contains("lifecycle consumer started"));
}

// ---------------------------------------------------------------------------------------
// tuwunel, as its source says it behaves (DESIGN.md): appservices get no
// /account/deactivate bypass (interactive auth is demanded), and the admin API
// `POST /_synapse/admin/v1/deactivate/{user}` deactivates without leaving rooms or
// clearing the profile. Masquerading as a user who does not exist is M_FORBIDDEN.

#[derive(Default, Debug, Clone)]
struct StandinUser {
    displayname: Option<String>,
    avatar_url: Option<String>,
    deactivated: bool,
    erased: bool,
}

#[derive(Default)]
struct Standin {
    as_token: String,
    admin_token: String,
    users: HashMap<String, StandinUser>,
    rooms: HashMap<String, HashSet<String>>,
    account_deactivate_calls: usize,
    admin_deactivations: Vec<(String, bool)>,
    uploads: usize,
}

type Shared = Arc<Mutex<Standin>>;

fn matrix_error(status: StatusCode, errcode: &str, error: &str) -> Response {
    (
        status,
        axum::Json(json!({ "errcode": errcode, "error": error })),
    )
        .into_response()
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::to_owned)
}

/// A refusal: status, errcode, message.
type Refusal = (StatusCode, &'static str, &'static str);

fn refuse((status, errcode, error): Refusal) -> Response {
    matrix_error(status, errcode, error)
}

/// The user the appservice acts as, or the refusal tuwunel gives.
fn sender(
    state: &Standin,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Result<String, Refusal> {
    if bearer(headers).as_deref() != Some(state.as_token.as_str()) {
        return Err((
            StatusCode::UNAUTHORIZED,
            "M_UNKNOWN_TOKEN",
            "Unknown access token.",
        ));
    }
    let user = query
        .get("user_id")
        .cloned()
        .unwrap_or_else(|| format!("@letta:{SERVER_NAME}"));
    if !state.users.contains_key(&user) {
        return Err((StatusCode::FORBIDDEN, "M_FORBIDDEN", "User does not exist."));
    }
    Ok(user)
}

async fn tuwunel_standin(as_token: &str, admin_token: &str) -> (String, Shared) {
    let mut state = Standin {
        as_token: as_token.to_owned(),
        admin_token: admin_token.to_owned(),
        ..Standin::default()
    };
    state
        .users
        .insert(format!("@letta:{SERVER_NAME}"), StandinUser::default());
    let shared: Shared = Arc::new(Mutex::new(state));
    type Q = Query<HashMap<String, String>>;
    let app = Router::new()
        .route(
            "/_matrix/federation/v1/version",
            get(|| async { axum::Json(json!({ "server": { "name": "Tuwunel", "version": "1.4.6" } })) }),
        )
        .route(
            "/_matrix/client/v3/register",
            post(|State(s): State<Shared>, headers: HeaderMap, axum::Json(body): axum::Json<Value>| async move {
                let mut s = s.lock().unwrap();
                if bearer(&headers).as_deref() != Some(s.as_token.as_str()) {
                    return matrix_error(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "Unknown access token.");
                }
                let user = format!("@{}:{SERVER_NAME}", body["username"].as_str().unwrap_or_default());
                if s.users.contains_key(&user) {
                    return matrix_error(StatusCode::BAD_REQUEST, "M_USER_IN_USE", "User ID already taken.");
                }
                s.users.insert(user.clone(), StandinUser::default());
                axum::Json(json!({ "user_id": user })).into_response()
            }),
        )
        .route(
            "/_matrix/client/v3/account/whoami",
            get(|State(s): State<Shared>, headers: HeaderMap, Query(q): Q| async move {
                let s = s.lock().unwrap();
                match sender(&s, &headers, &q) {
                    Ok(user) => axum::Json(json!({ "user_id": user })).into_response(),
                    Err(refusal) => refuse(refusal),
                }
            }),
        )
        .route(
            "/_matrix/client/v3/profile/{user}/{field}",
            put(
                |State(s): State<Shared>, headers: HeaderMap, Query(q): Q, Path((user, field)): Path<(String, String)>, axum::Json(body): axum::Json<Value>| async move {
                    let mut s = s.lock().unwrap();
                    let me = match sender(&s, &headers, &q) {
                        Ok(me) => me,
                        Err(refusal) => return refuse(refusal),
                    };
                    if me != user {
                        return matrix_error(StatusCode::FORBIDDEN, "M_FORBIDDEN", "Not your profile.");
                    }
                    // An absent value removes the field.
                    let value = body[field.as_str()].as_str().map(str::to_owned);
                    let profile = s.users.get_mut(&user).unwrap();
                    match field.as_str() {
                        "displayname" => profile.displayname = value,
                        "avatar_url" => profile.avatar_url = value,
                        _ => return matrix_error(StatusCode::BAD_REQUEST, "M_UNRECOGNIZED", "field"),
                    }
                    axum::Json(json!({})).into_response()
                },
            ),
        )
        .route(
            "/_matrix/media/v3/upload",
            post(|State(s): State<Shared>, headers: HeaderMap, Query(q): Q| async move {
                let mut s = s.lock().unwrap();
                if let Err(refusal) = sender(&s, &headers, &q) {
                    return refuse(refusal);
                }
                s.uploads += 1;
                axum::Json(json!({ "content_uri": format!("mxc://{SERVER_NAME}/standin{}", s.uploads) })).into_response()
            }),
        )
        .route(
            "/_matrix/client/v3/joined_rooms",
            get(|State(s): State<Shared>, headers: HeaderMap, Query(q): Q| async move {
                let s = s.lock().unwrap();
                let me = match sender(&s, &headers, &q) {
                    Ok(me) => me,
                    Err(refusal) => return refuse(refusal),
                };
                let rooms: Vec<&String> = s.rooms.iter().filter(|(_, m)| m.contains(&me)).map(|(r, _)| r).collect();
                axum::Json(json!({ "joined_rooms": rooms })).into_response()
            }),
        )
        .route(
            "/_matrix/client/v3/rooms/{room}/leave",
            post(|State(s): State<Shared>, headers: HeaderMap, Query(q): Q, Path(room): Path<String>| async move {
                let mut s = s.lock().unwrap();
                let me = match sender(&s, &headers, &q) {
                    Ok(me) => me,
                    Err(refusal) => return refuse(refusal),
                };
                if let Some(members) = s.rooms.get_mut(&room) {
                    members.remove(&me);
                }
                axum::Json(json!({})).into_response()
            }),
        )
        .route(
            "/_matrix/client/v3/account/deactivate",
            post(|State(s): State<Shared>| async move {
                s.lock().unwrap().account_deactivate_calls += 1;
                // No appservice bypass: interactive auth, always.
                (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(json!({ "flows": [{ "stages": ["m.login.password"] }], "params": {}, "session": "s1" })),
                )
                    .into_response()
            }),
        )
        .route(
            "/_synapse/admin/v1/deactivate/{user}",
            post(|State(s): State<Shared>, headers: HeaderMap, Path(user): Path<String>, axum::Json(body): axum::Json<Value>| async move {
                let mut s = s.lock().unwrap();
                if bearer(&headers).as_deref() != Some(s.admin_token.as_str()) {
                    return matrix_error(StatusCode::FORBIDDEN, "M_FORBIDDEN", "Only server admins can use this API.");
                }
                let erase = body["erase"].as_bool().unwrap_or(false);
                let Some(profile) = s.users.get_mut(&user) else {
                    return matrix_error(StatusCode::NOT_FOUND, "M_NOT_FOUND", "User not found");
                };
                // Neither leaves rooms nor clears the profile.
                profile.deactivated = true;
                profile.erased |= erase;
                s.admin_deactivations.push((user, erase));
                axum::Json(json!({ "id_server_unbind_result": "success" })).into_response()
            }),
        )
        .route(
            "/_matrix/client/v1/appservice/{id}/ping",
            post(|| async { axum::Json(json!({ "duration_ms": 1 })) }),
        )
        .fallback(|| async { matrix_error(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "Unrecognized request") })
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), shared)
}

#[tokio::test]
async fn tuwunel_standin_deactivates_with_the_admin_token_then_leaves_rooms_and_clears_profile() {
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
    let (url, standin) = tuwunel_standin(&roster.as_token, admin_token).await;
    roster.env("MATRIX_HOMESERVER_URL", &url);
    roster.env("ROSTER_HOMESERVER__URL", &url);
    roster.env("MATRIX_ADMIN_TOKEN", admin_token);
    let (hard, soft, ghost) = (uuid(7, 1), uuid(7, 2), uuid(7, 3));
    let rooms = ["!a:roster.test", "!b:roster.test"];
    let mut produced = Vec::new();
    for (id, name) in [(&hard, "hard"), (&soft, "soft")] {
        produced.push(
            tansu
                .produce(
                    TOPIC,
                    None,
                    Some(id),
                    &[("event_type", "UserCreatedEvent")],
                    &bytes(&created(id, name)),
                )
                .await,
        );
        produced.push(
            tansu
                .produce(
                    TOPIC,
                    None,
                    Some(id),
                    &[("event_type", "UserProfileUpdatedEvent")],
                    &bytes(&profile(id, name, None, Some("mxc://roster.test/pic"))),
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
    produced.push(
        tansu
            .produce(
                TOPIC,
                None,
                Some(&hard),
                &[("event_type", "UserDeletedEvent")],
                &bytes(&deleted(&hard, false)),
            )
            .await,
    );
    produced.push(
        tansu
            .produce(
                TOPIC,
                None,
                Some(&soft),
                &[("event_type", "UserDeletedEvent")],
                &bytes(&deleted(&soft, true)),
            )
            .await,
    );
    produced.push(
        tansu
            .produce(
                TOPIC,
                None,
                Some(&ghost),
                &[("event_type", "UserDeletedEvent")],
                &bytes(&deleted(&ghost, true)),
            )
            .await,
    );
    eventually(Duration::from_secs(60), "committed to the end", || async {
        (tansu.committed(GROUP, TOPIC) == ends(&produced)).then_some(())
    })
    .await;

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
    let metric =
        |labels: &'static [&'static str]| roster.metric("roster_lifecycle_events_total", labels);
    assert_eq!(
        metric(&["type=\"deleted\"", "outcome=\"applied\""]).await,
        2
    );
    assert_eq!(
        metric(&["type=\"deleted\"", "outcome=\"missing_user\""]).await,
        1
    );
    let log = std::fs::read_to_string(roster.dir.join("roster-1.log")).unwrap();
    assert!(log.contains("Tuwunel"), "detected by flavor auto");
    assert!(
        !log.contains(admin_token),
        "the admin token is never logged"
    );
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
    let (url, _standin) = tuwunel_standin(&roster.as_token, "unused").await;
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
}

/// Users `from..to`, each created and renamed twice (`user-<n>-v2` last), keyed by user.
async fn batch(tansu: &Tansu, from: u32, to: u32) -> Vec<(i32, i64)> {
    let mut produced = Vec::new();
    for n in from..to {
        let id = uuid(8, n);
        let key = Some(id.as_str());
        let create = bytes(&created(&id, "x"));
        produced.push(
            tansu
                .produce(
                    TOPIC,
                    None,
                    key,
                    &[("event_type", "UserCreatedEvent")],
                    &create,
                )
                .await,
        );
        for round in 1..=2 {
            let name = format!("user-{n}-v{round}");
            let update = bytes(&profile(&id, "u", Some(&name), None));
            produced.push(
                tansu
                    .produce(
                        TOPIC,
                        None,
                        key,
                        &[("event_type", "UserProfileUpdatedEvent")],
                        &update,
                    )
                    .await,
            );
        }
    }
    produced
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
    std::fs::copy(&stack.roster.registration, &second.registration).unwrap();
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
    stack.wait_committed(&ends(&produced)).await;
    assert_eq!(second.metric("roster_dead_letters_total", &[]).await, 0);
    assert_eq!(stack.synapse.login_count().await, 0);
}
