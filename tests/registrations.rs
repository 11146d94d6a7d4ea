//! Two registrations, one of them silent (issue 10, item 0), on the real Synapse: people's
//! own chats (`@admin` alone, two Nova users) reach roster as zero transactions, while agent
//! rooms are still pushed and a kicked `@admin` is repaired from the push. A legacy single
//! registration keeps working, and `check-config` says which is in use.

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::features::*;
use support::*;

const AGENT_ID: &str = "agent-sr01-e2e";

/// Synapse with `@admin`, and roster with one agent; with `legacy`, roster's two
/// registrations are first merged into one file holding every namespace, as roster wrote it
/// before the pair.
async fn start(name: &str, legacy: bool) -> AgentStack {
    let agents = [(AGENT_ID, "Sentinel")];
    AgentStack::start_with(name, &agents, "  poll_interval: 1s\n", |roster| {
        if legacy {
            merge_into_one_registration(&roster.registration);
        }
    })
    .await
}

impl AgentStack {
    /// (Synapse's pushed transactions to roster, roster's received transactions), once
    /// neither has moved for 3 s.
    async fn transactions_when_quiet(&self) -> (u64, u64) {
        eventually(
            Duration::from_secs(180),
            "pushed transactions to stop moving",
            || async {
                let counts = || async {
                    (
                        pushed_transactions(&self.synapse, "roster").await,
                        self.roster.metric("roster_transactions_total", &[]).await,
                    )
                };
                let before = counts().await;
                tokio::time::sleep(Duration::from_secs(3)).await;
                (counts().await == before).then_some(before)
            },
        )
        .await
    }

    /// A message from `@admin` in the agent room: Synapse must push it (the bot and the
    /// agent are members). Waits until roster received it, then until pushes are quiet.
    async fn control_message(&self, before: (u64, u64)) -> (u64, u64) {
        let room = self.seen().agent_room(AGENT_ID).await;
        self.seen().say(&room, "hello, agent").await;
        eventually(
            Duration::from_secs(60),
            "the agent-room message to reach roster",
            || async {
                let received = self.roster.metric("roster_transactions_total", &[]).await;
                (received > before.1).then_some(())
            },
        )
        .await;
        self.transactions_when_quiet().await
    }

    /// The agent kicks `@admin` from its room; `@admin` is back from the pushed event, with
    /// no room read.
    async fn kick_admin_and_see_it_repaired(&self) {
        let room = self.seen().agent_room(AGENT_ID).await;
        let reads = self
            .roster
            .homeserver_requests(Some("joined_members"))
            .await;
        let kicks = self.roster.transitions("kicked").await;
        let member = || async {
            let event = self
                .seen()
                .state_event(&room, "m.room.member", ADMIN)
                .await
                .expect("@admin has a member event");
            (
                event["content"]["membership"].as_str().unwrap().to_owned(),
                event["event_id"].as_str().unwrap().to_owned(),
            )
        };
        let (membership, joined_event) = member().await;
        assert_eq!(membership, "join");
        let (status, body) = as_user(
            &self.synapse,
            &self.roster.as_token,
            &agent_user(AGENT_ID),
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{room}/kick"),
            Some(json!({ "user_id": ADMIN, "reason": "test" })),
        )
        .await;
        assert_eq!(status, 200, "kick @admin: {body}");
        eventually(
            Duration::from_secs(60),
            "@admin rejoined the agent room",
            || async {
                let (membership, event) = member().await;
                (membership == "join"
                    && event != joined_event
                    && self.roster.transitions("kicked").await > kicks)
                    .then_some(())
            },
        )
        .await;
        self.roster.wait_converged(1).await;
        assert_eq!(
            self.roster
                .homeserver_requests(Some("joined_members"))
                .await,
            reads,
            "repaired from the push, without reading the room"
        );
    }
}

/// Rewrites `registration` (and the acting-only one beside it) into one file holding every
/// namespace, as roster wrote it before the pair: the bot, the agents and `@admin` and
/// `@nova-*`, one id, one pair of tokens, the URL. The file stays 0600.
fn merge_into_one_registration(registration: &std::path::Path) {
    let files = registration_files(registration);
    assert_eq!(files.len(), 2, "roster wrote a pair: {files:?}");
    let read = |path: &std::path::Path| -> Value {
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let mut single = read(&files[0]);
    let acting = read(&files[1]);
    let users = single["namespaces"]["users"].as_array_mut().unwrap();
    users.extend(
        acting["namespaces"]["users"]
            .as_array()
            .unwrap()
            .iter()
            .cloned(),
    );
    std::fs::remove_file(&files[1]).unwrap();
    std::fs::write(registration, serde_yaml::to_string(&single).unwrap()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(registration, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test]
async fn people_chats_reach_roster_as_zero_transactions_and_agent_rooms_still_push() {
    let mut stack = start("silent", false).await;
    let files = registration_files(&stack.roster.registration);
    assert_eq!(files.len(), 2, "{files:?}");
    let acting: Value = serde_yaml::from_str(&std::fs::read_to_string(&files[1]).unwrap()).unwrap();
    assert!(
        acting["url"].is_null(),
        "the acting-only registration is silent: {acting:?}"
    );
    assert_eq!(acting["id"], "roster-acting");
    let acting_token = acting["as_token"].as_str().unwrap().to_owned();
    let (ok, stdout, stderr) = stack.roster.cli(&["check-config"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("a pushed and an acting-only registration"),
        "{stdout}"
    );
    stack.roster.start().await;
    stack.roster.wait_pinged().await;
    stack.roster.wait_converged(1).await;
    let before = stack.transactions_when_quiet().await;

    // @admin alone in a room of its own, 50 messages.
    let own = stack
        .synapse
        .create_room(
            &stack.admin_token,
            json!({ "preset": "private_chat", "name": "notes" }),
        )
        .await;
    for n in 0..50 {
        stack.seen().say(&own, &format!("note {n}")).await;
    }
    // Two Nova users, registered through the acting-only registration (masquerading, no
    // login), chat: 50 messages between them.
    let nova = [
        format!("nova-{}", identity::uuid(0x51, 1)),
        format!("nova-{}", identity::uuid(0x51, 2)),
    ];
    let user = |n: usize| format!("@{}:{SERVER_NAME}", nova[n]);
    for localpart in &nova {
        register_as_appservice(&stack.synapse, &acting_token, localpart).await;
    }
    let (status, body) = as_user(
        &stack.synapse,
        &acting_token,
        &user(0),
        Method::POST,
        "/_matrix/client/v3/createRoom",
        Some(json!({ "preset": "private_chat", "invite": [user(1)] })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let chat = body["room_id"].as_str().unwrap().to_owned();
    let (status, body) = as_user(
        &stack.synapse,
        &acting_token,
        &user(1),
        Method::POST,
        &format!("/_matrix/client/v3/rooms/{chat}/join"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for n in 0..50 {
        let (status, body) = as_user(
            &stack.synapse,
            &acting_token,
            &user(n % 2),
            Method::PUT,
            &format!("/_matrix/client/v3/rooms/{chat}/send/m.room.message/chat{n}"),
            Some(json!({ "msgtype": "m.text", "body": format!("hi {n}") })),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(stack.seen().messages(&chat).await.len(), 50);

    // One message in the agent room is pushed, and Synapse pushes in stream order: once it
    // arrived, anything the chats above made Synapse push would have arrived before it.
    let after = stack.control_message(before).await;
    eprintln!("pushed transactions (Synapse's, roster's): {before:?} -> {after:?}");
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1, 1),
        "only the agent-room message was pushed (Synapse's count, roster's count)"
    );
    assert_eq!(
        pushed_transactions(&stack.synapse, "roster-acting").await,
        0
    );

    // Kicking @admin from the agent room is still repaired from the pushed event.
    stack.kick_admin_and_see_it_repaired().await;
    stack.assert_no_logins_and_no_secrets_logged().await;
    drop(stack.scratch);
}

#[tokio::test]
async fn a_legacy_single_registration_keeps_working_and_check_config_says_so() {
    let mut stack = start("legacy-registration", true).await;
    assert_eq!(registration_files(&stack.roster.registration).len(), 1);
    let (ok, stdout, stderr) = stack.roster.cli(&["check-config"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("one legacy registration"), "{stdout}");
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");

    stack.roster.start().await;
    stack.roster.wait_pinged().await;
    stack.roster.wait_converged(1).await;
    let seen = stack.seen();
    let room = seen.agent_room(AGENT_ID).await;
    let space = seen.space().await;
    let agent = agent_user(AGENT_ID);
    eventually(
        Duration::from_secs(60),
        "agent room and space provisioned",
        || async {
            let joined = seen.joined(&room).await;
            let in_space = seen.joined(&space).await;
            ([agent.as_str(), BOT, ADMIN]
                .iter()
                .all(|m| joined.contains(*m))
                && in_space.contains(ADMIN))
            .then_some(())
        },
    )
    .await;
    assert!(
        stack.roster.logs()[0]
            .1
            .contains("roster runs with one legacy registration"),
        "the log says so"
    );

    // What the pair avoids: with one registration, @admin's own chat is pushed to roster.
    let before = stack.transactions_when_quiet().await;
    let own = stack
        .synapse
        .create_room(
            &stack.admin_token,
            json!({ "preset": "private_chat", "name": "notes" }),
        )
        .await;
    for n in 0..10 {
        seen.say(&own, &format!("note {n}")).await;
    }
    let after = stack.control_message(before).await;
    eprintln!("pushed transactions (Synapse's, roster's): {before:?} -> {after:?}");
    assert!(
        after.0 - before.0 > 1 && after.1 - before.1 > 1,
        "@admin's own room reached roster: {before:?} -> {after:?}"
    );

    stack.kick_admin_and_see_it_repaired().await;
    stack.assert_no_logins_and_no_secrets_logged().await;
    drop(stack.scratch);
}
