//! What people see (issue 11), on the real Synapse and the real Letta: `@admin` in the
//! "Letta Agents" space with every agent room in its hierarchy, topics that follow renames
//! (and `plan` showing them first), generated avatars uploaded once per picture and never
//! over a person's own, and an agent's Letta history in its new room, once, in order, across
//! a SIGKILL. Synapse's login counter stays at zero throughout.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::features::*;
use support::*;

impl AgentStack {
    /// `roster plan --json` while roster may be stopped: the plan of each agent, by id.
    fn plan(&self) -> BTreeMap<String, Vec<Value>> {
        let (ok, stdout, stderr) = self.roster.cli(&["plan", "--json"]);
        assert!(ok, "roster plan failed: {stderr}");
        let plan: Value = serde_json::from_str(&stdout).expect("plan --json prints JSON");
        plan["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["agent_id"].as_str().unwrap().to_owned(),
                    a["actions"].as_array().unwrap().clone(),
                )
            })
            .collect()
    }
}

/// `(room_id, name)` of every room a space hierarchy lists.
fn hierarchy_rooms(hierarchy: &Value) -> BTreeMap<String, String> {
    hierarchy["rooms"]
        .as_array()
        .expect("a hierarchy lists rooms")
        .iter()
        .map(|r| {
            (
                r["room_id"].as_str().unwrap().to_owned(),
                r["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The membership event of `user` in `room` now: (membership, event id).
async fn member_event(seen: &Seen<'_>, room: &str, user: &str) -> (String, String) {
    let event = seen
        .state_event(room, "m.room.member", user)
        .await
        .unwrap_or_else(|| panic!("{user} has no member event in {room}"));
    (
        event["content"]["membership"].as_str().unwrap().to_owned(),
        event["event_id"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn admin_is_in_the_space_sees_every_agent_room_and_is_back_after_a_kick() {
    let agents = [
        ("agent-sp01-e2e", "Atlas"),
        ("agent-sp02-e2e", "Boreas"),
        ("agent-sp03-e2e", "Ceto"),
    ];
    let mut stack = AgentStack::start("space", &agents, "  poll_interval: 1s\n").await;
    stack.roster.start().await;
    // Repair needs Synapse's pushes: wait until Synapse reaches roster.
    stack.roster.wait_pinged().await;
    stack.roster.wait_converged(3).await;
    let seen = Seen::new(&stack.synapse, &stack.admin_token);
    let space = seen.space().await;
    eventually(
        Duration::from_secs(60),
        "@admin and the bot joined to the space",
        || async {
            let joined = seen.joined(&space).await;
            (joined.contains(ADMIN) && joined.contains(BOT)).then_some(())
        },
    )
    .await;

    // As the person, with its own token: the space and every agent room, by name.
    let mut expected = BTreeMap::from([(space.clone(), "Letta Agents".to_owned())]);
    for (id, name) in agents {
        expected.insert(seen.agent_room(id).await, name.to_owned());
    }
    let hierarchy_path = format!("/_matrix/client/v1/rooms/{space}/hierarchy");
    assert_eq!(
        hierarchy_rooms(&seen.get(&hierarchy_path).await),
        expected,
        "@admin's hierarchy of the space"
    );

    // The bot (the space's creator) kicks @admin: it is back from the pushed event alone.
    let reads_before = stack
        .roster
        .homeserver_requests(Some("joined_members"))
        .await;
    let kicks_before = stack.roster.transitions("kicked").await;
    let (membership, joined_event) = member_event(&seen, &space, ADMIN).await;
    assert_eq!(membership, "join");
    let (status, body) = as_user(
        &stack.synapse,
        &stack.roster.as_token,
        BOT,
        Method::POST,
        &format!("/_matrix/client/v3/rooms/{space}/kick"),
        Some(json!({ "user_id": ADMIN, "reason": "test" })),
    )
    .await;
    assert_eq!(status, 200, "kick @admin from the space: {body}");
    eventually(
        Duration::from_secs(60),
        "@admin to be joined to the space again",
        || async {
            let (membership, event) = member_event(&seen, &space, ADMIN).await;
            (membership == "join" && event != joined_event).then_some(())
        },
    )
    .await;
    assert!(
        stack.roster.transitions("kicked").await > kicks_before,
        "roster learned of the kick from Synapse's push"
    );
    stack.roster.wait_converged(3).await;
    assert_eq!(
        stack
            .roster
            .homeserver_requests(Some("joined_members"))
            .await,
        reads_before,
        "the repair read no room"
    );
    assert_eq!(
        hierarchy_rooms(&seen.get(&hierarchy_path).await),
        expected,
        "@admin sees the space again"
    );
    stack.assert_no_logins_and_no_secrets_logged().await;
    drop(stack.scratch);
}

#[tokio::test]
async fn a_rename_updates_name_display_name_and_topic_and_plan_shows_it_first() {
    let before = [("agent-rn01-e2e", "Orion"), ("agent-rn02-e2e", "Lyra")];
    let after = [("agent-rn01-e2e", "Vega"), ("agent-rn02-e2e", "Lyra")];
    let mut stack = AgentStack::start("rename-topic", &before, "  poll_interval: 1s\n").await;
    stack.roster.start().await;
    stack.roster.wait_converged(2).await;
    let seen = Seen::new(&stack.synapse, &stack.admin_token);
    let room = seen.agent_room(before[0].0).await;
    let agent = agent_user(before[0].0);
    // What a person sees of the room and the agent: (room name, topic, display name).
    let looks = || async {
        let name = seen.state_event(&room, "m.room.name", "").await;
        let topic = seen.state_event(&room, "m.room.topic", "").await;
        (
            name.map(|e| e["content"]["name"].clone()),
            topic.map(|e| e["content"]["topic"].clone()),
            seen.user(&agent).await["displayname"].clone(),
        )
    };
    let looks_as = |name: &str| {
        (
            Some(json!(name)),
            Some(json!(format!("Letta agent {name}"))),
            json!(name),
        )
    };
    assert_eq!(looks().await, looks_as("Orion"));

    // Renamed while roster is away: the dry run shows what is pending, and takes no action.
    stack.roster.stop();
    stack.write_agents(&after);
    let plan = stack.plan();
    let kinds = |actions: &[Value]| -> Vec<String> {
        actions
            .iter()
            .map(|a| a["action"].as_str().unwrap().to_owned())
            .collect()
    };
    let renamed = &plan[after[0].0];
    assert!(
        renamed.contains(&json!({ "action": "set_topic", "room": room, "by": agent, "topic": "Letta agent Vega" })),
        "plan shows the new topic: {renamed:?}"
    );
    assert!(
        renamed.iter().any(|a| a["action"] == "set_name"
            && a["name"] == "Vega"
            && a["room"] == room.as_str()),
        "plan shows the new name: {renamed:?}"
    );
    // Orion -> Vega: another first letter, so the generated picture changes too.
    assert!(
        renamed.iter().any(|a| a["action"] == "set_avatar"
            && a["want"]["look"]["glyph"] == "V"
            && a["replaces"].is_string()),
        "plan shows the new picture replacing roster's: {renamed:?}"
    );
    assert_eq!(kinds(renamed).len(), 3, "only the rename: {renamed:?}");
    assert!(plan[after[1].0].is_empty(), "{plan:?}");
    let (ok, text, stderr) = stack.roster.cli(&["plan"]);
    assert!(ok, "{stderr}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("agent-rn01-e2e (Vega): ")
                && l.contains("set_topic")
                && l.contains("Letta agent Vega")),
        "{text}"
    );
    assert_eq!(looks().await, looks_as("Orion"), "the plan changed nothing");

    // roster applies it, and the plan is then empty.
    stack.roster.start().await;
    eventually(Duration::from_secs(60), "the rename on Synapse", || async {
        (looks().await == looks_as("Vega")).then_some(())
    })
    .await;
    stack.roster.wait_converged(2).await;
    let plan = stack.plan();
    for (id, _) in after {
        assert!(plan[id].is_empty(), "{id} has nothing to do: {plan:?}");
    }
    stack.assert_no_logins_and_no_secrets_logged().await;
    drop(stack.scratch);
}

/// `roster_avatars_total{outcome}`.
async fn avatars_total(roster: &Roster, outcome: &str) -> u64 {
    roster
        .metric("roster_avatars_total", &[&format!("outcome=\"{outcome}\"")])
        .await
}

/// Checks `png` is a PNG of 256x256 pixels and a few KB.
fn assert_generated_png(png: &[u8], what: &str) {
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{what} is a PNG: starts with {:?}",
        &png[..png.len().min(8)]
    );
    assert_eq!(&png[12..16], b"IHDR", "{what}");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((width, height), (256, 256), "{what}");
    assert!(png.len() < 16 * 1024, "{what} is a few KB: {}", png.len());
}

#[tokio::test]
async fn generated_avatars_are_uploaded_once_per_picture_and_a_hand_set_one_is_left_alone() {
    let ids = ["agent-av01-e2e", "agent-av02-e2e", "agent-av03-e2e"];
    let mut stack = AgentStack::start(
        "avatars",
        &[(ids[0], "Alice"), (ids[1], "Bob"), (ids[2], "Cleo")],
        "  poll_interval: 1s\n",
    )
    .await;
    stack.roster.start().await;
    stack.roster.wait_converged(3).await;
    let seen = Seen::new(&stack.synapse, &stack.admin_token);
    let avatar = |id: &'static str| {
        let seen = &seen;
        async move { seen.user(&agent_user(id)).await["avatar_url"].clone() }
    };

    // Three agents, three pictures: one upload each, by roster's count and by Synapse's.
    let mut first = Vec::new();
    for id in ids {
        let mxc = avatar(id).await;
        let mxc = mxc
            .as_str()
            .unwrap_or_else(|| panic!("{id} has an avatar: {mxc}"))
            .to_owned();
        assert_generated_png(&seen.download(&mxc).await, id);
        first.push(mxc);
    }
    assert_eq!(
        first
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3,
        "{first:?}"
    );
    assert_eq!(avatars_total(&stack.roster, "uploaded").await, 3);
    assert_eq!(avatars_total(&stack.roster, "set").await, 3);
    assert_eq!(seen.uploads_by(BOT).await, 3);

    // A person gives Cleo a picture of their own.
    let mine = seen
        .upload(
            roster::avatar::render(roster::avatar::Look {
                glyph: 'M',
                colour: [10, 20, 30],
            }),
            "image/png",
        )
        .await;
    let (status, body) = stack
        .synapse
        .call(
            Method::PUT,
            &format!("/_synapse/admin/v2/users/{}", agent_user(ids[2])),
            &stack.admin_token,
            Some(json!({ "avatar_url": mine })),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // Renames: the same first letter keeps the picture; another letter changes it, except
    // where a person chose the picture.
    stack.write_agents(&[(ids[0], "Ada"), (ids[1], "Zed"), (ids[2], "Xena")]);
    eventually(Duration::from_secs(60), "the renames applied", || async {
        let mut names = Vec::new();
        for id in ids {
            names.push(seen.user(&agent_user(id)).await["displayname"].clone());
        }
        (names == [json!("Ada"), json!("Zed"), json!("Xena")]
            && avatars_total(&stack.roster, "left_alone").await == 1
            && avatars_total(&stack.roster, "set").await == 4)
            .then_some(())
    })
    .await;
    stack.roster.wait_converged(3).await;
    assert_eq!(
        avatar(ids[0]).await,
        first[0].as_str(),
        "A to A: same picture"
    );
    let zed = avatar(ids[1]).await.as_str().unwrap().to_owned();
    assert_ne!(zed, first[1], "B to Z: a new picture");
    assert_generated_png(&seen.download(&zed).await, "Zed's avatar");
    assert_eq!(
        avatar(ids[2]).await,
        mine.as_str(),
        "the person's picture stays"
    );
    assert_eq!(avatars_total(&stack.roster, "uploaded").await, 4);
    assert_eq!(avatars_total(&stack.roster, "set").await, 4);
    assert_eq!(seen.uploads_by(BOT).await, 4);

    // Back to B: that picture was uploaded before and is reused, not uploaded again.
    stack.write_agents(&[(ids[0], "Ada"), (ids[1], "Bobby"), (ids[2], "Xena")]);
    eventually(
        Duration::from_secs(60),
        "Bobby to get the B picture back",
        || async { (avatar(ids[1]).await == first[1].as_str()).then_some(()) },
    )
    .await;
    stack.roster.wait_converged(3).await;
    assert_eq!(avatars_total(&stack.roster, "uploaded").await, 4);
    assert_eq!(avatars_total(&stack.roster, "reused").await, 1);
    assert_eq!(seen.uploads_by(BOT).await, 4);

    // agents.avatar: none: a new agent gets no picture; nothing is uploaded or taken away.
    stack.roster.stop();
    stack.roster.env("ROSTER_AGENTS__AVATAR", "none");
    stack.write_agents(&[
        (ids[0], "Ada"),
        (ids[1], "Bobby"),
        (ids[2], "Xena"),
        ("agent-av04-e2e", "Dora"),
    ]);
    stack.roster.start().await;
    stack.roster.wait_converged(4).await;
    let dora = seen.user(&agent_user("agent-av04-e2e")).await;
    assert_eq!(dora["displayname"], "Dora", "Dora was provisioned");
    assert!(dora["avatar_url"].is_null(), "no avatar: {dora}");
    assert_eq!(avatars_total(&stack.roster, "uploaded").await, 0);
    assert_eq!(avatars_total(&stack.roster, "set").await, 0);
    assert_eq!(seen.uploads_by(BOT).await, 4);
    assert_eq!(avatar(ids[0]).await, first[0].as_str());
    stack.assert_no_logins_and_no_secrets_logged().await;
    drop(stack.scratch);
}

/// A conversation as a person had it with the agent; the sixth message is longer than
/// roster posts.
fn conversation() -> Vec<(&'static str, String)> {
    let long = format!("Start with the Alfama. {}", "Tiles and trams. ".repeat(300));
    vec![
        ("user", "Good morning, can you help me plan a trip?".into()),
        ("assistant", "Of course. Where would you like to go?".into()),
        ("user", "Lisbon, for three days in May.".into()),
        (
            "assistant",
            "Lisbon in May is lovely: mild, sunny, not yet crowded.".into(),
        ),
        ("user", "What should I see first?".into()),
        ("assistant", long),
        ("user", "And where should I eat?".into()),
        (
            "assistant",
            "Try the pastelarias in Belém, and a tasca in Alfama for dinner.".into(),
        ),
        ("user", "Thank you!".into()),
        ("assistant", "Have a wonderful trip.".into()),
    ]
}

/// What roster posts for a message: user messages say so, bodies are cut at 4000 characters.
fn posted_body(role: &str, text: &str) -> String {
    let text = text.trim();
    let mut body: String = text.chars().take(4000).collect();
    if text.chars().count() > 4000 {
        body.push('…');
    }
    match role {
        "user" => format!("User: {body}"),
        _ => body,
    }
}

/// 2025-03-01T10:00:00Z, when the conversation began.
const CONVERSATION_START: u64 = 1_740_823_200;

/// The agent's history on the real Letta server, imported into the room roster creates:
/// the newest `history_import` user and assistant messages, once each, in order, as the
/// agent, marked historical, without a relation, at Letta's times.
///
/// The interruption is forced with a pass-through proxy in front of Synapse: it lets the
/// first two history posts through, forwards the third to Synapse (so Synapse holds it) but
/// never answers it; the test SIGKILLs roster as soon as Synapse shows the third message.
/// The restarted roster posts the whole import again with the same transaction ids, and
/// Synapse answers the three it already has with their events instead of posting them twice.
#[tokio::test]
async fn history_from_a_real_letta_appears_once_in_order_even_across_a_sigkill() {
    const IMPORT: usize = 8;
    let scratch = Scratch::new("history-letta");
    let letta = Letta::start(scratch.path()).await;
    let conversation = conversation();
    let pairs: Vec<(&str, &str)> = conversation
        .iter()
        .map(|(role, text)| (*role, text.as_str()))
        .collect();
    let agent_id = letta.create_agent_with_history("Historian", &pairs).await;
    // Spread the conversation over time, a message every 37 s.
    let listed: Vec<Value> = letta
        .messages(&agent_id, 50)
        .await
        .into_iter()
        .filter(|m| m["message_type"] == "user_message" || m["message_type"] == "assistant_message")
        .collect();
    assert_eq!(
        listed.len(),
        conversation.len(),
        "Letta lists the conversation: {listed:?}"
    );
    let mut expected = Vec::new();
    for (n, (message, (role, text))) in listed.iter().zip(&conversation).enumerate() {
        assert_eq!(
            message["message_type"],
            format!("{role}_message"),
            "Letta keeps the order"
        );
        let at = CONVERSATION_START + 37 * n as u64;
        let (minute, second) = (
            (at - CONVERSATION_START) / 60,
            (at - CONVERSATION_START) % 60,
        );
        letta.date_message(
            message["id"].as_str().unwrap(),
            &format!("2025-03-01 10:{minute:02}:{second:02}"),
        );
        expected.push((posted_body(role, text), at * 1000));
    }
    let dated = letta.messages(&agent_id, 50).await;
    assert!(
        dated
            .iter()
            .any(|m| m["date"] == "2025-03-01T10:00:37+00:00"),
        "Letta lists the dates the test wrote: {dated:?}"
    );
    let expected: Vec<(String, u64)> = expected.split_off(expected.len() - IMPORT);

    let hs_port = free_port();
    let proxy = HsProxy::start(&format!("http://127.0.0.1:{hs_port}")).await;
    let mut roster = Roster::configure(
        scratch.path(),
        &proxy.url,
        &format!(
            "agents:\n  letta_url: {}\n  poll_interval: 1s\n  avatar: none\n  history_import: {IMPORT}\n",
            letta.url()
        ),
    );
    let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
    let admin_token = synapse.admin_token("admin");
    let seen = Seen::new(&synapse, &admin_token);
    let lp = agent_localpart(&agent_id);
    let agent = agent_user(&agent_id);

    proxy.hold_sends_after(2);
    roster.start().await;
    let room = eventually(
        Duration::from_secs(120),
        "the third history message on Synapse, its answer held back",
        || async {
            if proxy.held() == 0 {
                return None;
            }
            let room = seen.room_for_alias(&lp).await?;
            (seen.messages(&room).await.len() == 3).then_some(room)
        },
    )
    .await;
    roster.kill9();
    let bodies = |messages: &[Value]| -> Vec<(String, u64)> {
        messages
            .iter()
            .map(|m| {
                (
                    m["content"]["body"].as_str().unwrap().to_owned(),
                    m["origin_server_ts"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(bodies(&seen.messages(&room).await), expected[..3].to_vec());
    let first_run = proxy.sends();
    assert_eq!(first_run.len(), 3, "{first_run:?}");

    // The restarted roster imports again from the start; nothing appears twice.
    proxy.answer_all();
    roster.start().await;
    roster.wait_converged(1).await;
    eventually(
        Duration::from_secs(120),
        "the restarted import to finish",
        || async {
            let done = roster
                .metric("roster_history_imports_total", &["outcome=\"done\""])
                .await;
            (done == 1).then_some(())
        },
    )
    .await;
    let messages = seen.messages(&room).await;
    assert_eq!(
        bodies(&messages),
        expected,
        "once each, in order, at Letta's times"
    );
    for message in &messages {
        assert_eq!(message["sender"], agent.as_str(), "{message}");
        assert_eq!(message["content"]["msgtype"], "m.text", "{message}");
        assert_eq!(message["content"]["m.letta_historical"], true, "{message}");
        assert!(
            message["content"].get("m.relates_to").is_none(),
            "no relation: {message}"
        );
    }
    // roster recorded the two answered posts: the restart went on after the second, and
    // posted the third (forwarded, never answered) again under the same transaction id.
    let sends = proxy.sends();
    assert_eq!(
        sends.len(),
        3 + (IMPORT - 2),
        "only the unanswered third was posted again: {sends:?}"
    );
    assert_eq!(sends[2], sends[3], "with the same transaction id");
    assert_eq!(
        sends
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        IMPORT,
        "one transaction id per message: {sends:?}"
    );

    // The import ran once: a later start does not post again.
    roster.stop();
    roster.start().await;
    roster.wait_converged(1).await;
    assert_eq!(roster.metric("roster_history_imports_total", &[]).await, 0);
    assert_eq!(proxy.sends().len(), 3 + (IMPORT - 2));
    assert_eq!(seen.messages(&room).await.len(), IMPORT);
    synapse.assert_no_logins().await;
    roster.assert_no_secrets_in_logs(&[&admin_token]);
    drop(scratch);
}

/// roster provisioning one agent from a Letta stand-in (named as such: it lists the agent
/// like Letta and answers its history with HTTP 500), once converged.
async fn history_failure_stack(name: &str) -> (AgentStack, LettaStandIn) {
    let scratch = Scratch::new(name);
    let standin = LettaStandIn::start(
        json!([{ "id": "agent-hf01-e2e", "name": "Forgetful" }]),
        500,
    )
    .await;
    let hs_port = free_port();
    let mut roster = Roster::configure(
        scratch.path(),
        &format!("http://127.0.0.1:{hs_port}"),
        &format!(
            "agents:\n  letta_url: {}\n  poll_interval: 1s\n  avatar: none\n  history_import: 15\n",
            standin.url
        ),
    );
    let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
    let admin_token = synapse.admin_token("admin");
    roster.start().await;
    roster.wait_converged(1).await;
    let stack = AgentStack {
        scratch,
        synapse,
        roster,
        admin_token,
        agents_file: Default::default(),
    };
    (stack, standin)
}

#[tokio::test]
async fn a_letta_history_failure_leaves_an_empty_room_and_provisioning_goes_on() {
    let (mut stack, standin) = history_failure_stack("history-down").await;
    let seen = Seen::new(&stack.synapse, &stack.admin_token);
    let room = seen.agent_room("agent-hf01-e2e").await;
    let agent = agent_user("agent-hf01-e2e");
    eventually(
        Duration::from_secs(60),
        "the failed import counted",
        || async {
            let failed = stack
                .roster
                .metric("roster_history_imports_total", &["outcome=\"failed\""])
                .await;
            (failed == 1).then_some(())
        },
    )
    .await;
    assert!(standin.history_reads() >= 1, "roster asked for the history");
    assert_eq!(
        seen.messages(&room).await,
        Vec::<Value>::new(),
        "the room is empty"
    );
    let joined = seen.joined(&room).await;
    for member in [agent.as_str(), BOT, ADMIN] {
        assert!(joined.contains(member), "{member} joined: {joined:?}");
    }
    let topic = seen.state_event(&room, "m.room.topic", "").await.unwrap();
    assert_eq!(topic["content"]["topic"], "Letta agent Forgetful");
    let log = &stack.roster.logs()[0].1;
    assert!(
        log.contains("cannot read the agent's history") && log.contains("500"),
        "the log says why"
    );
    // The failed import is recorded and runs once: a restart does not ask again.
    let reads = standin.history_reads();
    stack.roster.stop();
    stack.roster.start().await;
    stack.roster.wait_converged(1).await;
    assert_eq!(standin.history_reads(), reads);
    assert_eq!(seen.messages(&room).await, Vec::<Value>::new());
    stack.assert_no_logins_and_no_secrets_logged().await;
    drop(stack.scratch);
}

/// Issue 11: "A Letta error leaves the room without history and is shown in status".
#[tokio::test]
async fn a_failed_history_import_shows_in_status() {
    let (stack, _standin) = history_failure_stack("history-status").await;
    let room = stack.seen().agent_room("agent-hf01-e2e").await;
    let status = eventually(
        Duration::from_secs(60),
        "the failed import in status",
        || async {
            let status = stack.roster.status().await;
            let text = status.to_string();
            (text.contains(&room) && text.contains("500")).then_some(status)
        },
    )
    .await;
    let (ok, text, stderr) = stack.roster.cli(&["status"]);
    assert!(ok, "{stderr}");
    assert!(
        text.contains(&room),
        "roster status names the room: {text}\n{status}"
    );
    stack.assert_no_logins_and_no_secrets_logged().await;
    drop(stack.scratch);
}
