//! `roster adopt` from every shape the old bot leaves its mappings in (its JSON object keyed
//! by agent id, its early JSON list, and PostgreSQL exports of its later `agent_mappings`
//! table as CSV and JSON, all in `tests/fixtures/legacy/`), on a real Synapse whose rooms the
//! "old bot" made: the rooms get their aliases, `plan` wants to create none of them, and
//! `serve` converges on them creating only the space.

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::*;

/// One fixture and what adopting it must do. `rooms` are the fixture's room ids of agents
/// whose rooms the test makes (replaced in the file by the real ids); every other room in
/// the file does not exist on the homeserver.
struct Shape {
    file: &'static str,
    rooms: &'static [(&'static str, &'static str)],
    missing: &'static [&'static str],
    conflicts: &'static [&'static str],
    skipped: &'static [&'static str],
}

const SHAPES: &[Shape] = &[
    Shape {
        file: "agent_user_mappings.json",
        rooms: &[(
            "agent-1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c01",
            "!objLiveRoom00001:roster.test",
        )],
        missing: &["agent-4d5e6f7a-8b9c-4d0e-9f2a-3b4c5d6e7f04"],
        conflicts: &["agent-3c4d5e6f-7a8b-4c9d-8e1f-2a3b4c5d6e03"],
        skipped: &["agent-2b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d02"],
    },
    Shape {
        file: "agent_user_mappings.list.json",
        rooms: &[(
            "agent-5e6f7a8b-9c0d-4e1f-8a3b-4c5d6e7f8a05",
            "!listLiveRoom0005:roster.test",
        )],
        missing: &["agent-6f7a8b9c-0d1e-4f2a-9b4c-5d6e7f8a9b06"],
        conflicts: &[],
        skipped: &[],
    },
    Shape {
        file: "agent_mappings.csv",
        rooms: &[(
            "agent-3f1d2c4b-8e9a-4b7c-a1d2-0e9f8c7b6a51",
            "!pgCsvLiveRoom0001:roster.test",
        )],
        missing: &[],
        conflicts: &[],
        skipped: &[
            "agent-5a6b7c8d-1e2f-4a3b-8c4d-5e6f7a8b9c02",
            "agent-9c8b7a6d-5e4f-4a3b-9c2d-1e0f9a8b7c03",
        ],
    },
    Shape {
        file: "agent_mappings.json",
        rooms: &[(
            "agent-c41e0b7a-2d3f-4e5a-b6c7-d8e9f0a1b2c4",
            "!pgJsonLiveRoom004:roster.test",
        )],
        missing: &[],
        conflicts: &[],
        skipped: &["agent-d52f1c8b-3e4a-4f5b-8c7d-e9f0a1b2c3d5"],
    },
];

/// Runs `roster adopt -c config --legacy-mappings mappings`.
fn adopt(config: &std::path::Path, mappings: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["adopt", "-c"])
        .arg(config)
        .arg("--legacy-mappings")
        .arg(mappings)
        .output()
        .unwrap()
}

fn localpart(agent_id: &str) -> String {
    format!(
        "agent_{}",
        agent_id
            .trim_start_matches("agent-")
            .to_lowercase()
            .replace('-', "_")
    )
}

/// The agent ids at the start of each report line, in order.
fn agents_of(report: &Value, key: &str) -> Vec<String> {
    report[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} in {report}"))
        .iter()
        .map(|line| {
            let line = line.as_str().unwrap();
            line.split([' ', ':']).next().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test]
async fn adopts_from_every_shape_of_the_old_bots_mappings_on_synapse() {
    let scratch = Scratch::new("adopt-shapes");
    let live: Vec<&str> = SHAPES
        .iter()
        .flat_map(|s| s.rooms.iter().map(|(agent, _)| *agent))
        .collect();
    let agents_file = scratch.path().join("agents.yaml");
    let agents_yaml: String = live
        .iter()
        .map(|id| format!("- {{id: {id}, name: \"Adopted {}\"}}\n", &id[6..10]))
        .collect();
    std::fs::write(&agents_file, agents_yaml).unwrap();
    let hs_port = free_port();
    let mut roster = Roster::configure(
        scratch.path(),
        &format!("http://127.0.0.1:{hs_port}"),
        &format!("agents:\n  file: {}\n", agents_file.display()),
    );
    let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
    let admin = synapse.admin_token("admin");
    // The old bot's rooms: made by a password user, without an alias, the agent at power
    // 100. (Agent users are registered through the appservice: once roster's registration
    // is loaded, Synapse reserves @agent_* for it.)
    let legacy = synapse.admin_token("legacybot");
    let http = roster.client().clone();
    let call = |method: Method, path: String, body: Value| {
        let request = http
            .request(method, format!("{}{path}", synapse.url()))
            .bearer_auth(&roster.as_token)
            .json(&body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    };
    let mut real_rooms = Vec::new();
    for (agent, _) in SHAPES.iter().flat_map(|s| s.rooms) {
        let user = format!("@{}:{SERVER_NAME}", localpart(agent));
        let (status, body) = call(
            Method::POST,
            "/_matrix/client/v3/register".into(),
            json!({ "type": "m.login.application_service", "username": localpart(agent), "inhibit_login": true }),
        )
        .await;
        assert_eq!(status, 200, "register {user}: {body}");
        let room = synapse
            .create_room(
                &legacy,
                json!({ "preset": "private_chat", "name": format!("Old {agent}"), "invite": [user],
                        "power_level_content_override": { "users": { user.clone(): 100 } } }),
            )
            .await;
        let (status, body) = call(
            Method::POST,
            format!("/_matrix/client/v3/rooms/{room}/join?user_id={user}"),
            json!({}),
        )
        .await;
        assert_eq!(status, 200, "{user} joins {room}: {body}");
        real_rooms.push(room);
    }
    let rooms_before = synapse_rooms(&synapse, &admin).await;

    let mut rooms = real_rooms.iter();
    for shape in SHAPES {
        let mut text =
            std::fs::read_to_string(repo_root().join("tests/fixtures/legacy").join(shape.file))
                .unwrap();
        let mut adopted_rooms = Vec::new();
        for (agent, placeholder) in shape.rooms {
            let room = rooms.next().unwrap();
            assert!(text.contains(placeholder), "{}: {placeholder}", shape.file);
            text = text.replace(placeholder, room);
            adopted_rooms.push((*agent, room.clone()));
        }
        let file = scratch.path().join(shape.file);
        std::fs::write(&file, &text).unwrap();
        let output = adopt(&roster.config, &file);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{}: {stderr}", shape.file);
        assert_eq!(
            stderr.contains("not taken over"),
            !shape.conflicts.is_empty(),
            "{}: conflicts are said on stderr: {stderr}",
            shape.file
        );
        assert!(
            !stdout.contains("secret") && !stderr.contains("secret"),
            "{}: passwords are never printed",
            shape.file
        );
        let report: Value = serde_json::from_str(&stdout).unwrap();
        let adopted: Vec<&str> = shape.rooms.iter().map(|(agent, _)| *agent).collect();
        assert_eq!(agents_of(&report, "adopted"), adopted, "{}", shape.file);
        assert_eq!(
            agents_of(&report, "missing_rooms"),
            shape.missing,
            "{}",
            shape.file
        );
        assert_eq!(
            agents_of(&report, "conflicts"),
            shape.conflicts,
            "{}",
            shape.file
        );
        assert_eq!(
            agents_of(&report, "skipped"),
            shape.skipped,
            "{}",
            shape.file
        );
        for (agent, room) in &adopted_rooms {
            let (status, body) = synapse
                .call(
                    Method::GET,
                    &format!(
                        "/_matrix/client/v3/directory/room/%23{}:{SERVER_NAME}",
                        localpart(agent)
                    ),
                    &admin,
                    None,
                )
                .await;
            assert_eq!(status, 200, "{}: alias of {agent}: {body}", shape.file);
            assert_eq!(body["room_id"], room.as_str(), "{}", shape.file);
        }
    }
    // A removed agent's room stays without an alias: it was skipped, not adopted.
    let (status, _) = synapse
        .call(
            Method::GET,
            &format!(
                "/_matrix/client/v3/directory/room/%23{}:{SERVER_NAME}",
                localpart("agent-5a6b7c8d-1e2f-4a3b-8c4d-5e6f7a8b9c02")
            ),
            &admin,
            None,
        )
        .await;
    assert_eq!(status, 404);

    // The runbook's check: the dry run creates no room for an adopted agent.
    let plan = std::process::Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["plan", "--json", "-c"])
        .arg(&roster.config)
        .output()
        .unwrap();
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let plan: Value = serde_json::from_slice(&plan.stdout).unwrap();
    let planned = plan["agents"].as_array().unwrap();
    assert_eq!(planned.len(), live.len(), "{plan}");
    for agent in planned {
        let actions: Vec<&str> = agent["actions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["action"].as_str().unwrap())
            .collect();
        assert!(
            !actions.contains(&"ensure_room"),
            "{}: {actions:?}",
            agent["agent_id"]
        );
        assert!(
            real_rooms.iter().any(|r| agent["room"] == r.as_str()),
            "{agent}"
        );
    }
    assert_eq!(synapse_rooms(&synapse, &admin).await, rooms_before);

    // serve takes the rooms over as they are: only the space is created.
    roster.start().await;
    roster.wait_converged(live.len()).await;
    assert_eq!(
        roster
            .metric(
                "roster_homeserver_requests_total",
                &["endpoint=\"create_room\""]
            )
            .await,
        1
    );
    assert_eq!(synapse_rooms(&synapse, &admin).await, rooms_before + 1);
    eventually(
        Duration::from_secs(60),
        "the bot in every adopted room",
        || async {
            for room in &real_rooms {
                let member = roster
                    .membership(room, &format!("@letta:{SERVER_NAME}"))
                    .await;
                if member.as_deref() != Some("join") {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;

    // adopt beside the running serve is refused before it changes anything: the serve
    // would never see what it wrote.
    let output = adopt(&roster.config, &scratch.path().join(SHAPES[0].file));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "adopt ran beside serve: {stderr}");
    assert!(stderr.contains("is in use by another roster"), "{stderr}");

    synapse.assert_no_logins().await;
    roster.assert_no_secrets_in_logs(&[]);
}

async fn synapse_rooms(synapse: &Synapse, admin: &str) -> u64 {
    let (status, body) = synapse
        .call(
            Method::GET,
            "/_synapse/admin/v1/rooms?limit=1000",
            admin,
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["total_rooms"].as_u64().unwrap()
}
