//! Agent provisioning on a real Synapse: rooms, space, required members, drift repair from
//! pushed events, a quiet steady state, and recovery from a lost store. Synapse's login
//! counter stays at zero throughout.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::features::*;
use support::*;

fn agent_ids(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("agent-{i:04x}-e2e"), format!("Agent {i}")))
        .collect()
}

impl AgentStack {
    async fn total_rooms(&self) -> u64 {
        self.seen().get("/_synapse/admin/v1/rooms?limit=1000").await["total_rooms"]
            .as_u64()
            .unwrap()
    }

    async fn space_children(&self) -> BTreeSet<String> {
        let space = self.seen().space().await;
        let state = self
            .seen()
            .get(&format!("/_synapse/admin/v1/rooms/{space}/state"))
            .await;
        state["state"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "m.space.child")
            .filter(|e| {
                e["content"]["via"]
                    .as_array()
                    .is_some_and(|v| !v.is_empty())
            })
            .map(|e| e["state_key"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Checks every agent has its user, display name, aliased room, members and space link.
    async fn assert_provisioned(&self, agents: &[(String, String)]) {
        let children = self.space_children().await;
        for (id, name) in agents {
            let lp = agent_localpart(id);
            let user = format!("@{lp}:{SERVER_NAME}");
            let profile = self
                .seen()
                .get(&format!("/_synapse/admin/v2/users/{user}"))
                .await;
            assert_eq!(profile["displayname"], name.as_str(), "{user}");
            let room = self
                .seen()
                .room_for_alias(&lp)
                .await
                .unwrap_or_else(|| panic!("#{lp} resolves"));
            let joined = self.seen().joined(&room).await;
            for member in [user.as_str(), BOT, ADMIN] {
                assert!(
                    joined.contains(member),
                    "{member} joined in {room}: {joined:?}"
                );
            }
            assert!(children.contains(&room), "{room} is in the space");
            let details = self
                .seen()
                .get(&format!("/_synapse/admin/v1/rooms/{room}"))
                .await;
            assert_eq!(details["name"], name.as_str());
            assert_eq!(details["join_rules"], "invite");
            assert_eq!(details["guest_access"], "forbidden");
            assert_eq!(details["history_visibility"], "shared");
        }
    }

    /// The agent kicks someone (it holds the highest power), by masquerading in the test.
    async fn kick_as_agent(&self, agent_lp: &str, room: &str, user: &str) {
        let response = self
            .roster
            .client()
            .post(format!(
                "{}/_matrix/client/v3/rooms/{room}/kick?user_id=@{agent_lp}:{SERVER_NAME}",
                self.synapse.url()
            ))
            .bearer_auth(&self.roster.as_token)
            .json(&json!({ "user_id": user, "reason": "test" }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "kick {user}");
    }

    /// The state roster gives a room it creates (README, agent provisioning): the agent
    /// created it; topic "Letta agent <name>"; required members at power 50, the agent at
    /// 100 where the room version does not already rank the creator above every level; the
    /// space links both ways, the child by the bot, the canonical parent by the agent.
    async fn assert_created_room_state(&self, agents: &[(String, String)]) {
        let space = self.seen().space().await;
        let space_state = self.state(&space).await;
        for (id, name) in agents {
            let agent = format!("@{}:{SERVER_NAME}", agent_localpart(id));
            let room = self
                .seen()
                .room_for_alias(&agent_localpart(id))
                .await
                .unwrap();
            let state = self.state(&room).await;
            let event = |kind: &str, key: &str| {
                state
                    .iter()
                    .find(|e| e["type"] == kind && e["state_key"] == key)
                    .unwrap_or_else(|| panic!("{room} has no {kind} {key:?}: {state:?}"))
                    .clone()
            };
            let create = event("m.room.create", "");
            assert_eq!(
                create["sender"],
                agent.as_str(),
                "{room} created by the agent"
            );
            assert_eq!(
                event("m.room.topic", "")["content"]["topic"],
                format!("Letta agent {name}"),
                "{room}"
            );
            let users = event("m.room.power_levels", "")["content"]["users"].clone();
            for required in [BOT, ADMIN] {
                assert_eq!(users[required], 50, "{required} in {room}: {users}");
            }
            let version: u32 = create["content"]["room_version"]
                .as_str()
                .unwrap_or("1")
                .parse()
                .unwrap_or(0);
            if version < 12 {
                assert_eq!(users[agent.as_str()], 100, "{room} v{version}: {users}");
            } else {
                assert!(
                    users.get(agent.as_str()).is_none(),
                    "v{version} forbids listing the creator: {users}"
                );
            }
            let parent = event("m.space.parent", &space);
            assert_eq!(parent["sender"], agent.as_str(), "{room}");
            assert_eq!(parent["content"]["canonical"], true, "{room}: {parent}");
            assert!(
                parent["content"]["via"]
                    .as_array()
                    .is_some_and(|v| !v.is_empty()),
                "{parent}"
            );
            let child = space_state
                .iter()
                .find(|e| e["type"] == "m.space.child" && e["state_key"] == room.as_str())
                .unwrap_or_else(|| panic!("the space has no child {room}"));
            assert_eq!(child["sender"], BOT, "{child}");
        }
    }

    /// The current state events of `room`, as Synapse's admin API lists them.
    async fn state(&self, room: &str) -> Vec<Value> {
        self.seen()
            .get(&format!("/_synapse/admin/v1/rooms/{room}/state"))
            .await["state"]
            .as_array()
            .unwrap()
            .clone()
    }
}

#[tokio::test]
async fn provisions_56_agents_repairs_kicks_from_pushed_events_and_stays_quiet() {
    let agents = agent_ids(56);
    let mut stack = AgentStack::start("provision-56", &agents, "  poll_interval: 1s\n").await;
    stack.roster.start().await;
    stack.roster.wait_ready().await;
    let started = Instant::now();
    stack.roster.wait_converged(56).await;
    eprintln!("56 agents converged in {:?}", started.elapsed());
    stack.assert_provisioned(&agents).await;
    stack.assert_created_room_state(&agents).await;
    stack.assert_no_logins_and_no_secrets_logged().await;

    // Kick the bot and @admin: both are back, because of the pushed events alone.
    let lp = agent_localpart(&agents[7].0);
    let room = stack.seen().room_for_alias(&lp).await.unwrap();
    let reads_before = stack
        .roster
        .metric(
            "roster_homeserver_requests_total",
            &["endpoint=\"joined_members\""],
        )
        .await;
    stack.kick_as_agent(&lp, &room, BOT).await;
    stack.kick_as_agent(&lp, &room, ADMIN).await;
    let kicked = Instant::now();
    eventually(
        Duration::from_secs(30),
        "bot and admin rejoined",
        || async {
            let joined = stack.seen().joined(&room).await;
            (joined.contains(BOT) && joined.contains(ADMIN)).then_some(())
        },
    )
    .await;
    eprintln!("kicked members were back after {:?}", kicked.elapsed());
    assert_eq!(
        stack
            .roster
            .metric(
                "roster_homeserver_requests_total",
                &["endpoint=\"joined_members\""]
            )
            .await,
        reads_before,
        "repair must not read the room"
    );
    assert!(
        stack
            .roster
            .metric(
                "roster_member_transitions_total",
                &["transition=\"kicked\""]
            )
            .await
            >= 2
    );

    // Steady state: 30 s with nothing changing (the file is polled every second) costs the
    // homeserver nothing, by roster's count and by Synapse's. The window opens once the
    // repair's own effects have settled: neither counter moved for 3 s.
    stack.roster.wait_converged(56).await;
    let (roster_before, synapse_before) = wait_quiet(&stack.roster, &stack.synapse).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(stack.roster.homeserver_requests(None).await, roster_before);
    assert_eq!(
        stack.synapse.requests_received_total().await,
        synapse_before
    );

    // The model answers without the homeserver: a pushed event that changes nothing
    // schedules the room, whose plan finds its 3 members (agent, bot, @admin) in place:
    // 3 hits, no miss, no request.
    let cache = |result: &'static str| {
        let roster = &stack.roster;
        async move {
            roster
                .metric(
                    "roster_membership_cache_total",
                    &[&format!("result=\"{result}\"")],
                )
                .await
        }
    };
    let (hits_before, misses_before) = (cache("hit").await, cache("miss").await);
    let noop = json!({ "events": [{
        "type": "m.room.member", "event_id": format!("$noop-{}", uuid_like()), "room_id": room,
        "sender": BOT, "state_key": BOT, "origin_server_ts": 1,
        "content": { "membership": "join", "displayname": "letta" },
    }]});
    let (status, _) = stack
        .roster
        .push(&format!("noop-{}", uuid_like()), &noop)
        .await;
    assert_eq!(status, 200);
    eventually(
        Duration::from_secs(60),
        "the pushed room to be planned",
        || async { (cache("hit").await > hits_before).then_some(()) },
    )
    .await;
    stack.roster.wait_converged(56).await;
    assert_eq!(cache("hit").await, hits_before + 3);
    assert_eq!(cache("miss").await, misses_before);
    assert_eq!(stack.roster.homeserver_requests(None).await, roster_before);
    assert_eq!(
        stack.synapse.requests_received_total().await,
        synapse_before
    );
    stack.assert_no_logins_and_no_secrets_logged().await;
    drop(stack.scratch);
}

#[tokio::test]
async fn follows_renames_and_removals_and_survives_a_lost_store_without_new_rooms() {
    let mut agents = agent_ids(6);
    let mut stack = AgentStack::start(
        "rename-remove-store",
        &agents,
        "  poll_interval: 1s\n  removal_grace: 3s\n  deactivate_removed: true\n",
    )
    .await;
    stack.roster.start().await;
    stack.roster.wait_converged(6).await;
    stack.assert_provisioned(&agents).await;
    let rooms_after_provisioning = stack.total_rooms().await;

    // Delete the store and restart: the rooms are found by their aliases.
    stack.roster.stop();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(stack.roster.dir.join(format!("roster.db{suffix}")));
    }
    stack.roster.start().await;
    stack.roster.wait_converged(6).await;
    assert_eq!(
        stack.total_rooms().await,
        rooms_after_provisioning,
        "no new room"
    );
    // Exactly one alias lookup and one member read per room, plus the space's: the space is
    // found by its alias at start-up (1 lookup) and read by the start-up sweep (1 read); the
    // lost store leaves no agent room id, so the sweep reads no agent room; each agent's run
    // tries createRoom first, which Synapse refuses with M_ROOM_IN_USE before creating
    // anything (the alias exists), then finds the room by its alias (6 lookups) and reads its
    // members once as the agent (6 reads) before planning. Nothing reads again: the sweep
    // interval is 10 minutes, and pushes carry the rest.
    assert_eq!(
        stack
            .roster
            .homeserver_requests(Some("resolve_alias"))
            .await,
        6 + 1,
        "alias lookups"
    );
    assert_eq!(
        stack
            .roster
            .homeserver_requests(Some("joined_members"))
            .await,
        6 + 1,
        "member reads"
    );
    assert_eq!(
        stack
            .roster
            .metric(
                "roster_homeserver_requests_total",
                &["endpoint=\"create_room\"", "status=\"400\""]
            )
            .await,
        6,
        "one refused createRoom per existing room"
    );
    assert_eq!(
        stack.roster.homeserver_requests(Some("create_room")).await,
        6,
        "none created"
    );
    assert_eq!(
        stack
            .roster
            .metric(
                "roster_homeserver_requests_total",
                &["endpoint=\"register\"", "status=\"200\""]
            )
            .await,
        0,
        "no user created"
    );
    stack.assert_provisioned(&agents).await;

    // Rename one agent and remove another from the file.
    agents[0].1 = "Renamed agent".into();
    let removed = agents.remove(5);
    stack.write_agents(&agents);
    let removed_room = stack
        .seen()
        .room_for_alias(&agent_localpart(&removed.0))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "rename and removal applied",
        || async {
            let status = stack.roster.status().await;
            (status["agents"] == 5 && status["retired"] == 1 && status["pending"] == 0)
                .then_some(())
        },
    )
    .await;
    stack.assert_provisioned(&agents).await;
    let joined = stack.seen().joined(&removed_room).await;
    assert!(
        !joined.contains(BOT) && !joined.contains(ADMIN),
        "required members left: {joined:?}"
    );
    assert!(
        !stack.space_children().await.contains(&removed_room),
        "unlinked from the space"
    );
    let removed_user = stack
        .seen()
        .get(&format!(
            "/_synapse/admin/v2/users/@{}:{SERVER_NAME}",
            agent_localpart(&removed.0)
        ))
        .await;
    assert_eq!(
        removed_user["deactivated"], true,
        "agents.deactivate_removed"
    );
    stack.assert_no_logins_and_no_secrets_logged().await;
    drop(stack.scratch);
}

#[tokio::test]
async fn adopts_rooms_the_old_bot_made_and_creates_no_room_for_them() {
    let agents = vec![("agent-old1".to_string(), "Old one".to_string())];
    let mut stack = AgentStack::start("adopt", &agents, "  poll_interval: 1s\n").await;
    let synapse = &stack.synapse;
    // The old bot's world: a password user created the room, without an alias, and gave the
    // agent user the highest power. (The agent user is registered through the appservice
    // here: Synapse reserves @agent_* for roster once its registration is loaded.)
    let legacy_token = synapse.admin_token("legacybot");
    let http = stack.roster.client().clone();
    let register = http
        .post(format!("{}/_matrix/client/v3/register", synapse.url()))
        .bearer_auth(&stack.roster.as_token)
        .json(&json!({ "type": "m.login.application_service", "username": "agent_old1", "inhibit_login": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(register.status(), 200);
    let agent = format!("@agent_old1:{SERVER_NAME}");
    let room = synapse
        .create_room(
            &legacy_token,
            json!({ "preset": "private_chat", "name": "Old one", "invite": [agent],
                    "power_level_content_override": { "users": { agent.clone(): 100 } } }),
        )
        .await;
    let join = http
        .post(format!(
            "{}/_matrix/client/v3/rooms/{room}/join?user_id={agent}",
            synapse.url()
        ))
        .bearer_auth(&stack.roster.as_token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(join.status(), 200);

    let mappings = stack.scratch.path().join("agent_user_mappings.json");
    std::fs::write(
        &mappings,
        json!([
            { "agent_id": "agent-old1", "agent_name": "Old one", "matrix_user_id": agent,
              "matrix_password": "hunter2-secret", "room_id": room, "created_at": "2025-01-01" },
            { "agent_id": "agent-old2", "agent_name": "Gone", "matrix_user_id": "@agent_old2:roster.test",
              "matrix_password": "hunter2-secret", "room_id": "!gone:roster.test" },
        ])
        .to_string(),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["adopt", "-c"])
        .arg(&stack.roster.config)
        .arg("--legacy-mappings")
        .arg(&mappings)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "adopt failed: {stderr}");
    assert!(
        !stdout.contains("hunter2") && !stderr.contains("hunter2"),
        "passwords are never printed"
    );
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["adopted"], json!(["agent-old1"]));
    assert_eq!(report["missing_rooms"].as_array().unwrap().len(), 1);
    assert_eq!(
        stack.seen().room_for_alias("agent_old1").await.as_deref(),
        Some(room.as_str())
    );

    // The dry run sees the adopted room and what it still needs, and changes nothing.
    let rooms_before_plan = stack.total_rooms().await;
    let plan = std::process::Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["plan", "--json", "-c"])
        .arg(&stack.roster.config)
        .output()
        .unwrap();
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let plan: Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(plan["space_exists"], false);
    assert_eq!(plan["agents"][0]["room"], room.as_str());
    let kinds: Vec<&str> = plan["agents"][0]["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"join") && kinds.contains(&"set_name"),
        "{kinds:?}"
    );
    assert!(!kinds.contains(&"ensure_room"), "{kinds:?}");
    assert_eq!(stack.total_rooms().await, rooms_before_plan);
    assert!(
        !stack.seen().joined(&room).await.contains(BOT),
        "the plan took no action"
    );
    stack.roster.start().await;
    stack.roster.wait_converged(1).await;
    stack.assert_provisioned(&agents).await;
    assert_eq!(
        stack.seen().room_for_alias("agent_old1").await.as_deref(),
        Some(room.as_str())
    );
    // Only the space was created; the agent's room is the old one.
    assert_eq!(
        stack
            .roster
            .metric(
                "roster_homeserver_requests_total",
                &["endpoint=\"create_room\""]
            )
            .await,
        1
    );
    stack.assert_no_logins_and_no_secrets_logged().await;
    drop(stack.scratch);
}

#[tokio::test]
async fn provisions_from_a_real_letta_and_follows_a_rename_and_a_deletion() {
    let scratch = Scratch::new("letta-agents");
    let letta = Letta::start(scratch.path()).await;
    let ids = [
        letta.create_agent("Alpha").await,
        letta.create_agent("Beta").await,
        letta.create_agent("Beta").await, // names are not unique; ids are
    ];
    let hs_port = free_port();
    let mut roster = Roster::configure(
        scratch.path(),
        &format!("http://127.0.0.1:{hs_port}"),
        &format!(
            "agents:\n  letta_url: {}\n  poll_interval: 1s\n  removal_grace: 3s\n",
            letta.url()
        ),
    );
    let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
    let admin_token = synapse.admin_token("admin");
    roster.start().await;
    let stack = AgentStack {
        scratch,
        synapse,
        roster,
        admin_token,
        agents_file: Default::default(),
    };
    stack.roster.wait_converged(3).await;
    let mut agents: Vec<(String, String)> = ids
        .iter()
        .cloned()
        .zip(["Alpha", "Beta", "Beta"].map(String::from))
        .collect();
    stack.assert_provisioned(&agents).await;

    letta.rename_agent(&ids[0], "Alpha Prime").await;
    letta.delete_agent(&ids[2]).await;
    agents[0].1 = "Alpha Prime".into();
    let deleted = agents.remove(2);
    let deleted_room = stack
        .seen()
        .room_for_alias(&agent_localpart(&deleted.0))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "rename and deletion applied",
        || async {
            let status = stack.roster.status().await;
            let renamed = stack
                .seen()
                .get(&format!(
                    "/_synapse/admin/v2/users/@{}:{SERVER_NAME}",
                    agent_localpart(&ids[0])
                ))
                .await["displayname"]
                == "Alpha Prime";
            (renamed && status["agents"] == 2 && status["retired"] == 1 && status["pending"] == 0)
                .then_some(())
        },
    )
    .await;
    stack.assert_provisioned(&agents).await;
    let joined = stack.seen().joined(&deleted_room).await;
    assert!(
        !joined.contains(BOT) && !joined.contains(ADMIN),
        "{joined:?}"
    );
    stack.assert_no_logins_and_no_secrets_logged().await;
    drop(stack.scratch);
}

/// A Letta stand-in whose answers the test switches: the agents, a 500, or garbage.
mod flaky_letta {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU8, Ordering};

    use axum::Router;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;

    pub const HEALTHY: u8 = 0;
    pub const FAILING: u8 = 1;
    pub const GARBAGE: u8 = 2;

    pub async fn serve(agents: serde_json::Value) -> (String, Arc<AtomicU8>) {
        let mode = Arc::new(AtomicU8::new(HEALTHY));
        let state = (mode.clone(), agents);
        let app = Router::new()
            .route("/v1/agents/", get(list))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, mode)
    }

    async fn list(
        axum::extract::State((mode, agents)): axum::extract::State<(
            Arc<AtomicU8>,
            serde_json::Value,
        )>,
        axum::extract::Query(query): axum::extract::Query<
            std::collections::HashMap<String, String>,
        >,
    ) -> Response {
        match mode.load(Ordering::SeqCst) {
            HEALTHY if query.contains_key("after") => {
                axum::Json(serde_json::json!([])).into_response()
            }
            HEALTHY => axum::Json(agents).into_response(),
            FAILING => (StatusCode::INTERNAL_SERVER_ERROR, "database is locked").into_response(),
            _ => (StatusCode::OK, "<html>maintenance</html>").into_response(),
        }
    }
}

#[tokio::test]
async fn a_letta_outage_removes_no_agent_and_shows_in_status() {
    use std::sync::atomic::Ordering;
    let scratch = Scratch::new("letta-down");
    let listing = json!([
        { "id": "agent-aaaa-1", "name": "One" },
        { "id": "agent-bbbb-2", "name": "Two" },
    ]);
    let (url, mode) = flaky_letta::serve(listing).await;
    let hs_port = free_port();
    let mut roster = Roster::configure(
        scratch.path(),
        &format!("http://127.0.0.1:{hs_port}"),
        &format!("agents:\n  letta_url: {url}\n  poll_interval: 1s\n  removal_grace: 1s\n"),
    );
    let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
    let admin_token = synapse.admin_token("admin");
    roster.start().await;
    let stack = AgentStack {
        scratch,
        synapse,
        roster,
        admin_token,
        agents_file: Default::default(),
    };
    stack.roster.wait_converged(2).await;

    for (failure, expected) in [
        (flaky_letta::FAILING, "HTTP 500: database is locked"),
        (flaky_letta::GARBAGE, "is not a JSON list of agents"),
    ] {
        mode.store(failure, Ordering::SeqCst);
        let error = eventually(Duration::from_secs(30), "the outage in status", || async {
            let status = stack.roster.status().await;
            status["source"]["last_error"].as_str().map(str::to_owned)
        })
        .await;
        assert!(error.contains(expected), "{error}");
        // Well past the grace period: a failed listing never counts as absence.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let status = stack.roster.status().await;
        assert_eq!(status["agents"], 2, "{status}");
        assert_eq!(status["retired"], 0, "{status}");
        assert!(status["source"]["last_error"].is_string(), "{status}");
        mode.store(flaky_letta::HEALTHY, Ordering::SeqCst);
        eventually(Duration::from_secs(30), "recovery in status", || async {
            stack.roster.status().await["source"]["last_error"]
                .is_null()
                .then_some(())
        })
        .await;
    }
    assert_eq!(stack.roster.status().await["retired"], 0);

    // A restart during an outage keeps the desired agents: drift is still repaired.
    mode.store(flaky_letta::FAILING, Ordering::SeqCst);
    let mut stack = stack;
    stack.roster.stop();
    stack.roster.start().await;
    // Repair needs Synapse's pushes: wait until it reaches the restarted roster.
    stack.roster.wait_pinged().await;
    eventually(
        Duration::from_secs(30),
        "the outage in status after restart",
        || async {
            stack.roster.status().await["source"]["last_error"]
                .is_string()
                .then_some(())
        },
    )
    .await;
    let lp = agent_localpart("agent-aaaa-1");
    let room = stack.seen().room_for_alias(&lp).await.unwrap();
    stack.kick_as_agent(&lp, &room, ADMIN).await;
    eventually(
        Duration::from_secs(60),
        "admin rejoined during the outage",
        || async {
            stack
                .seen()
                .joined(&room)
                .await
                .contains(ADMIN)
                .then_some(())
        },
    )
    .await;
    let status = stack.roster.status().await;
    assert_eq!(status["agents"], 2, "{status}");
    assert_eq!(status["retired"], 0, "{status}");
    stack.assert_no_logins_and_no_secrets_logged().await;
    drop(stack.scratch);
}

#[tokio::test]
async fn sighup_and_roster_sync_read_the_agents_file_at_once() {
    let mut agents = agent_ids(1);
    // An hour between polls: only the operator's triggers can explain a quick change.
    let mut stack = AgentStack::start("manual-sync", &agents, "  poll_interval: 1h\n").await;
    stack.roster.start().await;
    stack.roster.wait_converged(1).await;

    agents = agent_ids(2);
    stack.write_agents(&agents);
    stack.roster.signal("HUP");
    stack.roster.wait_converged(2).await;
    eventually(
        Duration::from_secs(60),
        "the SIGHUP sync to finish",
        || async {
            (stack.roster.status().await["last_sync"]["trigger"] == "sighup").then_some(())
        },
    )
    .await;
    let runs = |trigger: &'static str| {
        let roster = &stack.roster;
        async move {
            roster
                .metric(
                    "roster_sync_runs_total",
                    &[&format!("trigger=\"{trigger}\"")],
                )
                .await
        }
    };
    assert_eq!(runs("sighup").await, 1);
    assert_eq!(runs("manual").await, 0);

    agents = agent_ids(3);
    stack.write_agents(&agents);
    let (ok, stdout, stderr) = stack.roster.cli(&["sync", "--wait", "--json"]);
    assert!(ok, "{stderr}");
    let summary: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["trigger"], "manual");
    assert_eq!(summary["agents"], 3);
    assert_eq!(summary["failed"], 0);
    assert!(summary["started_at_ms"].is_u64(), "{summary}");
    stack.assert_provisioned(&agents).await;
    stack.assert_created_room_state(&agents).await;
    // Without --json, one line for a person.
    let (ok, stdout, stderr) = stack
        .roster
        .cli(&["sync", "--agent", &agents[0].0, "--wait"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.starts_with("sync finished: manual (") && stdout.contains("1 agents"),
        "{stdout}"
    );
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    assert_eq!(runs("manual").await, 2);

    let (ok, stdout, stderr) = stack.roster.cli(&["status"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("agents: 3"), "{stdout}");
    let (ok, stdout, stderr) = stack.roster.cli(&["status", "--json"]);
    assert!(ok, "{stderr}");
    let status: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["agents"], 3, "{status}");
    assert_eq!(status["last_sync"]["trigger"], "manual", "{status}");
    assert!(status["ping"]["last_ok_at_ms"].is_u64(), "{status}");
    assert!(status["membership_cache_hits"].is_u64(), "{status}");
    let (ok, _, stderr) = stack.roster.cli(&["sync", "--agent", "agent-nobody"]);
    assert!(!ok);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("agent-nobody"), "{stderr}");
    stack.assert_no_logins_and_no_secrets_logged().await;
    drop(stack.scratch);
}
