//! The appservice loop against the outside world: pushed transactions, durable dedup, the
//! legacy routes, the admin API's guard, masquerading on a real Synapse, crash and
//! redelivery.

mod support;

use std::time::Duration;

use reqwest::Method;
use roster::config::Secret;
use roster::matrix::{Homeserver, Registered};
use roster::metrics::Metrics;
use ruma::api::client::room::create_room;
use ruma::serde::Raw;
use ruma::{OwnedUserId, UserId};
use serde_json::{Value, json};
use support::*;

const ROOM: &str = "!pushed:roster.test";
/// roster's own users: their member events are kept in any room. (Events about other users
/// are kept only in rooms roster looks after: agent rooms and the space.)
const AGENT_A: &str = "@agent_a:roster.test";
const AGENT_B: &str = "@agent_b:roster.test";
const BOT: &str = "@letta:roster.test";

fn user(localpart: &str) -> OwnedUserId {
    UserId::parse(format!("@{localpart}:{SERVER_NAME}")).unwrap()
}

#[tokio::test]
async fn bad_requests_get_spec_errors_and_change_nothing() {
    let scratch = Scratch::new("bad-requests");
    let mut roster = Roster::configure(scratch.path(), &nowhere(), "");
    roster.start().await;
    let http = roster.client().clone();
    let url = roster.appservice_url("/_matrix/app/v1/transactions/t-bad");
    let valid = json!({ "events": [member_event(ROOM, AGENT_A, AGENT_A, "join", 1)] });

    let missing = http.put(&url).json(&valid).send().await.unwrap();
    assert_eq!(
        status_and_errcode(missing).await,
        (401, "M_UNAUTHORIZED".into())
    );

    let wrong = http
        .put(&url)
        .bearer_auth("not-the-hs-token")
        .json(&valid)
        .send()
        .await
        .unwrap();
    assert_eq!(status_and_errcode(wrong).await, (403, "M_FORBIDDEN".into()));

    let wrong_query = http
        .put(format!("{url}?access_token=not-the-hs-token"))
        .json(&valid)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_query.status(), 403);

    let not_json = http
        .put(&url)
        .bearer_auth(&roster.hs_token)
        .header("content-type", "application/json")
        .body("{\"events\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_and_errcode(not_json).await,
        (400, "M_NOT_JSON".into())
    );

    let bad_shape = http
        .put(&url)
        .bearer_auth(&roster.hs_token)
        .json(&json!({ "events": "not a list" }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_and_errcode(bad_shape).await,
        (400, "M_BAD_JSON".into())
    );

    // The harness sets appservice.max_body_bytes to 64 KiB.
    let padding = "x".repeat(70 * 1024);
    let oversized =
        json!({ "events": [member_event(ROOM, AGENT_A, AGENT_A, "join", 1)], "padding": padding });
    let too_large = http
        .put(&url)
        .bearer_auth(&roster.hs_token)
        .json(&oversized)
        .send()
        .await
        .unwrap();
    assert_eq!(
        status_and_errcode(too_large).await,
        (413, "M_TOO_LARGE".into())
    );

    // Requests that are not transactions (a port scan, the CLI pointed at the wrong
    // listener, a homeserver query with a wrong token) are refused without being counted
    // as transactions the homeserver failed to push.
    let admin_path = http
        .get(roster.appservice_url("/admin/v1/status"))
        .send()
        .await
        .unwrap();
    let (status, body) = (admin_path.status(), admin_path.text().await.unwrap());
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("M_UNRECOGNIZED") && body.contains("admin.listen"),
        "{body}"
    );
    let wrong_query = http
        .get(roster.appservice_url("/_matrix/app/v1/users/@agent_x:roster.test"))
        .bearer_auth("not-the-hs-token")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_query.status(), 403);

    // Nothing of the above reached the model or the store ...
    assert!(roster.members(ROOM).await.is_empty());
    assert_eq!(roster.transactions("applied").await, 0);
    assert_eq!(roster.transactions("rejected").await, 3);
    assert_eq!(roster.transactions("unauthorized").await, 1);
    assert_eq!(roster.transactions("forbidden").await, 2);
    // ... so the same id with a valid body is new, not a duplicate.
    let (status, _) = roster.push("t-bad", &valid).await;
    assert_eq!(status, 200);
    assert_eq!(
        roster.membership(ROOM, AGENT_A).await.as_deref(),
        Some("join")
    );
    assert_eq!(roster.transactions("applied").await, 1);

    // Other routes are guarded by the same token.
    let ping = http
        .post(roster.appservice_url("/_matrix/app/v1/ping"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(ping.status(), 401);
    let query = http
        .get(roster.appservice_url("/_matrix/app/v1/users/@letta:roster.test"))
        .bearer_auth(&roster.hs_token)
        .send()
        .await
        .unwrap();
    assert_eq!(query.status(), 200, "the bot is roster's user");
    let query = http
        .get(roster.appservice_url("/_matrix/app/v1/users/@stranger:roster.test"))
        .bearer_auth(&roster.hs_token)
        .send()
        .await
        .unwrap();
    assert_eq!(status_and_errcode(query).await, (404, "M_NOT_FOUND".into()));
    roster.assert_no_secrets_in_logs(&[]);
}

#[tokio::test]
async fn undecodable_events_are_skipped_without_blocking_the_transaction() {
    let scratch = Scratch::new("undecodable");
    let mut roster = Roster::configure(scratch.path(), &nowhere(), "");
    roster.start().await;
    let body = json!({
        "events": [
            { "type": "m.room.member", "room_id": ROOM, "content": {} },
            { "type": "m.room.message", "event_id": "$m", "room_id": ROOM, "sender": AGENT_A,
              "origin_server_ts": 1, "content": { "msgtype": "m.text", "body": "hi" } },
            member_event(ROOM, AGENT_B, AGENT_B, "join", 2),
        ],
        "ephemeral": [{ "type": "m.typing", "room_id": ROOM, "content": { "user_ids": [] } }],
        "de.sorunome.msc2409.ephemeral": [{ "type": "m.typing", "room_id": ROOM, "content": { "user_ids": [] } }],
    });
    let (status, _) = roster.push("t-mixed", &body).await;
    assert_eq!(status, 200);
    assert_eq!(
        roster.membership(ROOM, AGENT_B).await.as_deref(),
        Some("join")
    );
    assert_eq!(
        roster.metric("roster_undecodable_events_total", &[]).await,
        1
    );
    assert_eq!(roster.metric("roster_ephemeral_items_total", &[]).await, 2);

    // Bytes that are not UTF-8 inside one event spoil that event only: the rest applies.
    let spoiled = member_event(ROOM, AGENT_A, AGENT_A, "join", 3)
        .to_string()
        .replace("\"join\"", "\"join\",\"displayname\":\"XX\"");
    let (before, after) = spoiled.split_at(spoiled.find("XX").unwrap());
    let mut bytes = b"{\"events\":[".to_vec();
    bytes.extend_from_slice(before.as_bytes());
    bytes.extend_from_slice(&[0xff, 0xfe]);
    bytes.extend_from_slice(&after.as_bytes()[2..]);
    bytes.push(b',');
    bytes.extend_from_slice(
        member_event(ROOM, AGENT_B, AGENT_B, "leave", 4)
            .to_string()
            .as_bytes(),
    );
    bytes.extend_from_slice(b"]}");
    assert!(std::str::from_utf8(&bytes).is_err());
    let (status, body) = roster
        .push_to(
            "/_matrix/app/v1/transactions/t-spoiled",
            Some(&roster.hs_token),
            bytes,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        roster.membership(ROOM, AGENT_B).await.as_deref(),
        Some("leave")
    );
    assert_eq!(roster.membership(ROOM, AGENT_A).await, None);
    assert_eq!(
        roster.metric("roster_undecodable_events_total", &[]).await,
        2
    );
    roster.assert_no_secrets_in_logs(&[]);
}

/// Member events of rooms roster does not look after, about users it does not own, are
/// acknowledged (the homeserver's queue moves on), counted, and kept nowhere; events whose
/// sender or member is roster's own user are kept in any room.
#[tokio::test]
async fn events_of_rooms_roster_does_not_look_after_are_acknowledged_counted_and_dropped() {
    let scratch = Scratch::new("unmanaged");
    let mut roster = Roster::configure(scratch.path(), &nowhere(), "");
    roster.start().await;
    let body = json!({ "events": [
        member_event(ROOM, "@stranger:roster.test", "@stranger:roster.test", "join", 1),
        member_event(ROOM, "@carol:roster.test", "@admin:roster.test", "invite", 2),
        // roster's own user as the sender ...
        member_event(ROOM, "@dave:roster.test", BOT, "invite", 3),
        // ... or as the member.
        member_event(ROOM, AGENT_A, AGENT_A, "join", 4),
    ]});
    let (status, _) = roster.push("t-unmanaged", &body).await;
    assert_eq!(status, 200);
    assert_eq!(roster.transactions("applied").await, 1);
    assert_eq!(roster.metric("roster_unmanaged_events_total", &[]).await, 2);
    let kept = vec![
        (AGENT_A.to_owned(), "join".to_owned()),
        ("@dave:roster.test".to_owned(), "invite".to_owned()),
    ];
    assert_eq!(roster.members(ROOM).await, kept);

    // Not in the store either; and a redelivery is a duplicate, not counted again.
    roster.kill9();
    roster.start().await;
    assert_eq!(roster.members(ROOM).await, kept);
    assert_eq!(roster.push("t-unmanaged", &body).await.0, 200);
    assert_eq!(roster.transactions("duplicate").await, 1);
    assert_eq!(roster.metric("roster_unmanaged_events_total", &[]).await, 0);
    assert_eq!(roster.members(ROOM).await, kept);
    roster.assert_no_secrets_in_logs(&[]);
}

#[tokio::test]
async fn same_transaction_twice_applies_once_even_across_sigkill() {
    let scratch = Scratch::new("dedup");
    let mut roster = Roster::configure(scratch.path(), &nowhere(), "");
    roster.start().await;
    let join = json!({ "events": [member_event(ROOM, AGENT_A, AGENT_A, "join", 10)] });
    let leave = json!({ "events": [member_event(ROOM, AGENT_A, AGENT_A, "leave", 20)] });
    // A retry carries the same events; its body may differ (`unsigned.age` grows).
    let mut join_retried = join.clone();
    join_retried["events"][0]["unsigned"] = json!({ "age": 5000 });

    assert_eq!(roster.push("t1", &join).await.0, 200);
    assert_eq!(roster.push("t2", &leave).await.0, 200);
    assert_eq!(roster.push("t1", &join_retried).await.0, 200);
    assert_eq!(
        roster.membership(ROOM, AGENT_A).await.as_deref(),
        Some("leave")
    );
    assert_eq!(roster.transactions("applied").await, 2);
    assert_eq!(roster.transactions("duplicate").await, 1);
    assert_eq!(roster.transitions("joined").await, 1);
    assert_eq!(roster.transitions("left").await, 1);

    roster.kill9();
    roster.start().await;
    // The model came back from the store, and the ids are still remembered.
    assert_eq!(
        roster.membership(ROOM, AGENT_A).await.as_deref(),
        Some("leave")
    );
    assert_eq!(roster.push("t1", &join_retried).await.0, 200);
    assert_eq!(roster.push("t2", &leave).await.0, 200);
    assert_eq!(roster.transactions("duplicate").await, 2);
    assert_eq!(roster.transactions("applied").await, 0);
    assert_eq!(
        roster.membership(ROOM, AGENT_A).await.as_deref(),
        Some("leave")
    );

    // An id handed out again with other events (the homeserver's counter started over:
    // appservice.id changed, its database restored) is news, not a retry: a newer join.
    let rejoin = json!({ "events": [member_event(ROOM, AGENT_A, AGENT_A, "join", 30)] });
    assert_eq!(roster.push("t1", &rejoin).await.0, 200);
    assert_eq!(roster.transactions("applied").await, 1);
    assert_eq!(
        roster.membership(ROOM, AGENT_A).await.as_deref(),
        Some("join")
    );
    roster.assert_no_secrets_in_logs(&[]);
}

/// The README's legacy routes: the unprefixed `/transactions/{txnId}` (and user and alias
/// queries), and the hs_token in the `access_token` query parameter.
#[tokio::test]
async fn legacy_path_and_access_token_parameter_are_accepted() {
    let scratch = Scratch::new("legacy");
    let mut roster = Roster::configure(scratch.path(), &nowhere(), "");
    roster.start().await;
    let hs_token = roster.hs_token.clone();
    let body = |membership: &str, ts: u64| {
        json!({ "events": [member_event(ROOM, AGENT_A, AGENT_A, membership, ts)] })
            .to_string()
            .into_bytes()
    };

    // The legacy path with the token in the query only.
    let (status, answer) = roster
        .push_to(
            &format!("/transactions/t-legacy?access_token={hs_token}"),
            None,
            body("join", 1),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        roster.membership(ROOM, AGENT_A).await.as_deref(),
        Some("join")
    );
    // One id space for both paths: the same transaction on the prefixed path is a
    // duplicate.
    let (status, _) = roster
        .push_to(
            "/_matrix/app/v1/transactions/t-legacy",
            Some(&hs_token),
            body("join", 1),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(roster.transactions("duplicate").await, 1);
    assert_eq!(
        roster.membership(ROOM, AGENT_A).await.as_deref(),
        Some("join")
    );
    // The prefixed path takes the query parameter too.
    let (status, _) = roster
        .push_to(
            &format!("/_matrix/app/v1/transactions/t-query?access_token={hs_token}"),
            None,
            body("leave", 3),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        roster.membership(ROOM, AGENT_A).await.as_deref(),
        Some("leave")
    );
    assert_eq!(roster.transactions("applied").await, 2);

    // The legacy path is guarded like the prefixed one.
    let (status, answer) = roster
        .push_to("/transactions/t-none", None, body("join", 4))
        .await;
    assert_eq!(
        (status, &answer["errcode"]),
        (401, &json!("M_UNAUTHORIZED"))
    );
    let (status, answer) = roster
        .push_to(
            "/transactions/t-wrong?access_token=not-the-hs-token",
            None,
            body("join", 5),
        )
        .await;
    assert_eq!((status, &answer["errcode"]), (403, &json!("M_FORBIDDEN")));
    assert_eq!(
        roster.membership(ROOM, AGENT_A).await.as_deref(),
        Some("leave")
    );

    // The legacy user and alias queries, token in the query.
    let http = roster.client();
    let user = http
        .get(roster.appservice_url(&format!(
            "/users/@letta:roster.test?access_token={hs_token}"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(user.status(), 200, "the bot is roster's user");
    let alias = http
        .get(roster.appservice_url(&format!(
            "/rooms/%23nowhere:roster.test?access_token={hs_token}"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(status_and_errcode(alias).await, (404, "M_NOT_FOUND".into()));
    roster.assert_no_secrets_in_logs(&[]);
}

/// Every `/admin/v1/` route needs `Authorization: Bearer <admin.token>` (any case of
/// "bearer"): missing 401, wrong 403, and 403 for everyone when `admin.token` is unset. Every
/// refusal is a Matrix JSON error. `/health`, `/ready` and `/metrics` are open, and `/ready`
/// does not wait for the homeserver.
#[tokio::test]
async fn admin_api_refuses_without_the_token_with_matrix_errors() {
    let scratch = Scratch::new("admin-auth");
    // Nothing listens at the homeserver's address.
    let mut roster = Roster::configure(scratch.path(), &nowhere(), "");
    roster.start().await;
    let routes = [
        (Method::GET, "/admin/v1/status"),
        (Method::POST, "/admin/v1/sync"),
        (Method::POST, "/admin/v1/invalidate"),
        (Method::GET, "/admin/v1/rooms/!r:roster.test/members"),
        (Method::POST, "/admin/v1/replay"),
    ];
    let refused = |status: u16, answer: &Value, want: (u16, &str), what: &str| {
        assert_eq!(status, want.0, "{what}: {answer}");
        assert_eq!(answer["errcode"], want.1, "{what}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: a Matrix error says why: {answer}"
        );
    };
    for (method, path) in &routes {
        let (status, answer) = roster.admin_call(method.clone(), path, None, None).await;
        refused(
            status,
            &answer,
            (401, "M_MISSING_TOKEN"),
            &format!("{path} without a token"),
        );
        let (status, answer) = roster
            .admin_call(method.clone(), path, Some("not-the-admin-token"), None)
            .await;
        refused(
            status,
            &answer,
            (403, "M_FORBIDDEN"),
            &format!("{path} with a wrong token"),
        );
    }
    // The right token, with the scheme in lower case.
    let status = roster
        .client()
        .get(roster.admin_url("/admin/v1/status"))
        .header("authorization", format!("bearer {}", roster.admin_token))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    let (status, members) = roster
        .admin_call(
            Method::GET,
            "/admin/v1/rooms/!r:roster.test/members",
            Some(&roster.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{members}");

    // Ready at once although the homeserver is unreachable; the ping failure shows.
    let (status, _) = roster.admin_call(Method::GET, "/ready", None, None).await;
    assert_eq!(status, 200);
    eventually(
        Duration::from_secs(30),
        "the failed start-up ping in status and metrics",
        || async {
            let status = roster.status().await;
            let failed = roster
                .metric("roster_homeserver_pings_total", &["outcome=\"error\""])
                .await;
            (status["ping"]["last_error"].is_string()
                && status["ping"]["last_ok_at_ms"].is_null()
                && failed >= 1)
                .then_some(())
        },
    )
    .await;
    assert_eq!(roster.metric("roster_homeserver_ping_ok", &[]).await, 0);
    let (ok, stdout, stderr) = roster.cli(&["status", "--json"]);
    assert!(ok, "{stderr}");
    let status: Value = serde_json::from_str(&stdout).unwrap();
    assert!(status["ping"]["last_error"].is_string(), "{status}");

    // With admin.token unset, the API is off for everyone, token or not.
    roster.stop();
    roster.without_admin_token();
    roster.start().await;
    for (method, path) in &routes {
        for token in [None, Some(roster.admin_token.as_str())] {
            let (status, answer) = roster.admin_call(method.clone(), path, token, None).await;
            refused(
                status,
                &answer,
                (403, "M_FORBIDDEN"),
                &format!("{path}, API off"),
            );
            assert!(
                answer["error"].as_str().unwrap().contains("admin.token"),
                "says how to turn it on: {answer}"
            );
        }
    }
    for path in ["/health", "/ready", "/metrics"] {
        let status = roster
            .client()
            .get(roster.admin_url(path))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{path} needs no token");
    }
    let (ok, _, stderr) = roster.cli(&["status"]);
    assert!(!ok);
    assert!(stderr.contains("ROSTER_ADMIN__TOKEN"), "{stderr}");
    roster.assert_no_secrets_in_logs(&[]);
}

/// Power levels as DESIGN asks: required members 50; the agent is the creator, which room
/// version 12 (Synapse's default) ranks above every power level and forbids listing.
fn agent_room() -> create_room::v3::Request {
    let mut request = create_room::v3::Request::new();
    request.preset = Some(create_room::v3::RoomPreset::PrivateChat);
    request.name = Some("Agent X".into());
    let power = json!({ "users": {
        format!("@letta:{SERVER_NAME}"): 50,
        format!("@admin:{SERVER_NAME}"): 50,
    }});
    request.power_level_content_override = Some(Raw::from_json(
        serde_json::value::to_raw_value(&power).unwrap(),
    ));
    request
}

/// roster's homeserver client on a real Synapse, with the as_token only: register, whoami,
/// create, invite, join, name, read, a refused kick. Then the homeserver's pushes: the
/// memberships of roster's own users arrive from any room; a person's changes in an agent
/// room roster looks after arrive too, and cost roster not one request of its own; a
/// person's join elsewhere is acknowledged and dropped. No device, no login.
#[tokio::test]
async fn masquerading_loop_on_real_synapse_with_zero_logins() {
    let scratch = Scratch::new("masquerade");
    let hs_port = free_port();
    // One agent for roster to look after: its room is where a person's changes are watched.
    let agents_file = scratch.path().join("agents.yaml");
    std::fs::write(&agents_file, "- {id: agent-m, name: \"Agent M\"}\n").unwrap();
    let mut roster = Roster::configure(
        scratch.path(),
        &format!("http://127.0.0.1:{hs_port}"),
        &format!("agents:\n  file: {}\n", agents_file.display()),
    );
    let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
    // A person's account that roster may act as (non-exclusive namespace); required in
    // every agent room, so it exists before roster starts.
    let admin_token = synapse.admin_token("admin");
    let admin_devices = synapse.devices(&admin_token, "@admin:roster.test").await;
    roster.start().await;
    roster.wait_pinged().await;
    roster.wait_converged(1).await;
    let (roster_requests_when_quiet, _) = wait_quiet(&roster, &synapse).await;
    let reads_when_quiet = roster.homeserver_requests(Some("joined_members")).await;

    // roster's homeserver client with roster's two tokens (the acting-only registration's
    // for @admin), in a room of the test's own.
    let tokens = roster.as_tokens();
    assert_eq!(tokens.len(), 2, "a pushed and an acting-only registration");
    let hs = Homeserver::new(
        &synapse.url(),
        roster::matrix::Tokens::pair(
            Secret::new(roster.as_token.clone()),
            Secret::new(
                tokens
                    .iter()
                    .find(|t| **t != roster.as_token)
                    .unwrap()
                    .clone(),
            ),
            SERVER_NAME.try_into().unwrap(),
            |localpart| localpart == "admin" || localpart.starts_with("nova-"),
        ),
        Duration::from_secs(30),
        4,
        std::sync::Arc::new(Metrics::new()),
    );
    let (agent, bot, admin) = (user("agent_x"), user("letta"), user("admin"));
    assert_eq!(hs.register("agent_x").await.unwrap(), Registered::Created);
    assert_eq!(
        hs.register("agent_x").await.unwrap(),
        Registered::AlreadyExists
    );
    assert_eq!(hs.whoami(Some(&agent)).await.unwrap(), agent);
    let room = hs.create_room(&agent, agent_room()).await.unwrap();
    hs.invite(&agent, &room, &bot).await.unwrap();
    hs.invite(&agent, &room, &admin).await.unwrap();
    hs.join(&bot, &room).await.unwrap();
    hs.join(&admin, &room).await.unwrap();
    hs.set_display_name(&agent, "Agent X").await.unwrap();
    let joined = hs.joined_members(&agent, &room).await.unwrap();
    assert!(
        joined.contains_key(&bot) && joined.contains_key(&admin) && joined.contains_key(&agent)
    );
    let forbidden = hs.kick(&bot, &room, &agent, None).await.unwrap_err();
    assert!(
        forbidden.is_forbidden(),
        "power 50 cannot kick power 100: {forbidden}"
    );

    // The homeserver pushed it to the running roster: the memberships of roster's own
    // users are kept (this room is not one roster looks after) ...
    let room = room.as_str();
    let mut waits = Vec::new();
    for who in [&agent, &bot] {
        waits.push(roster.wait_membership(room, who.as_str(), "join").await);
    }
    // ... and so is the invite roster's user sent @admin, but not @admin's own join.
    eventually(
        Duration::from_secs(30),
        "@admin's join to be dropped",
        || async { (roster.metric("roster_unmanaged_events_total", &[]).await >= 1).then_some(()) },
    )
    .await;
    assert_eq!(
        roster.membership(room, admin.as_str()).await.as_deref(),
        Some("invite")
    );

    // Changes a person makes on Synapse in the agent room arrive the same way.
    assert!(
        roster.status().await["space"].is_string(),
        "the space exists"
    );
    let (status, body) = synapse
        .call(
            Method::GET,
            "/_matrix/client/v3/directory/room/%23agent_m:roster.test",
            &admin_token,
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let managed = body["room_id"].as_str().unwrap().to_owned();
    let carol_token = synapse.admin_token("carol");
    let carol = "@carol:roster.test";
    let call = |path: String, token: &str, body: Value| {
        let token = token.to_owned();
        let synapse = &synapse;
        async move {
            let (status, body) = synapse.call(Method::POST, &path, &token, Some(body)).await;
            assert_eq!(status, 200, "{path}: {body}");
        }
    };
    let room = managed.as_str();
    let (as_admin, carol_invited) = (admin_token.as_str(), json!({ "user_id": carol }));
    let steps = [
        ("invite", as_admin, carol_invited.clone(), "invite"),
        ("join", carol_token.as_str(), json!({}), "join"),
        ("kick", as_admin, carol_invited.clone(), "leave"),
        ("invite", as_admin, carol_invited, "invite"),
        ("leave", carol_token.as_str(), json!({}), "leave"),
    ];
    for (action, token, body, membership) in steps {
        call(
            format!("/_matrix/client/v3/rooms/{room}/{action}"),
            token,
            body,
        )
        .await;
        waits.push(roster.wait_membership(room, carol, membership).await);
    }
    eprintln!("pushed membership reached roster's model after {waits:?}");
    assert_eq!(roster.transitions("kicked").await, 1);
    assert_eq!(roster.transitions("left").await, 1);

    // roster learned all of it without a single request of its own (each change scheduled
    // the agent room, whose plan needed nothing).
    let status = roster.wait_converged(1).await;
    assert_eq!(status["failed"], json!({}), "{status}");
    assert_eq!(
        roster.homeserver_requests(None).await,
        roster_requests_when_quiet
    );
    assert_eq!(
        roster.homeserver_requests(Some("joined_members")).await,
        reads_when_quiet
    );

    // Masquerading created no device and no login.
    assert_eq!(synapse.devices(&admin_token, agent.as_str()).await, 0);
    assert_eq!(synapse.devices(&admin_token, bot.as_str()).await, 0);
    assert_eq!(
        synapse.devices(&admin_token, admin.as_str()).await,
        admin_devices
    );
    synapse.assert_no_logins().await;
    roster.assert_no_secrets_in_logs(&[&admin_token, &carol_token]);
}

/// Synapse redelivers a transaction roster recorded but never answered (it crashed): the
/// redelivery is a duplicate and changes nothing. After the restart roster pings Synapse, and
/// Synapse pings roster back: its ping servlet then forces the retry of what it queued
/// (`force_retry` in Synapse's `AppservicePingRestServlet`), so nothing waits for Synapse's
/// own backoff.
#[tokio::test]
async fn synapse_retry_after_a_crash_is_applied_once_and_the_startup_ping_reaches_synapse() {
    let scratch = Scratch::new("crash-retry");
    let hs_port = free_port();
    let mut roster = Roster::configure(scratch.path(), &format!("http://127.0.0.1:{hs_port}"), "");
    let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
    const PING: &str = "AppservicePingRestServlet";
    assert_eq!(synapse.requests_received(PING).await, 0);
    roster.env(roster::FAULT_ABORT_AFTER_RECORD, "1");
    roster.start().await;
    roster.wait_pinged().await;
    let pings_before_crash = synapse.requests_received(PING).await;
    assert!(pings_before_crash >= 1, "Synapse counted roster's ping");

    // A person outside roster's namespaces invites the bot: the invite is the first event
    // Synapse pushes; roster records it and dies before the 200.
    let admin_token = synapse.admin_token("carol");
    let room = synapse
        .create_room(&admin_token, json!({ "preset": "private_chat" }))
        .await;
    let (status, body) = synapse
        .call(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{room}/invite"),
            &admin_token,
            Some(json!({ "user_id": BOT })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    eventually(
        Duration::from_secs(30),
        "roster to abort after recording",
        || {
            let exited = roster.has_exited();
            async move { exited.then_some(()) }
        },
    )
    .await;
    roster.forget_exited();

    roster.clear_env();
    roster.start().await;
    // Recorded before the crash, so it is in the model at once.
    assert_eq!(
        roster.membership(&room, BOT).await.as_deref(),
        Some("invite")
    );
    // The start-up ping: roster asked Synapse (Synapse's servlet counted it), Synapse pinged
    // roster back (roster saw it), and roster counted the round trip ok, once.
    roster.wait_pinged().await;
    assert!(synapse.requests_received(PING).await > pings_before_crash);
    assert!(
        roster.status().await["pinged_by_homeserver_at_ms"].is_u64(),
        "Synapse pinged roster back"
    );
    assert_eq!(
        roster
            .metric("roster_homeserver_pings_total", &["outcome=\"ok\""])
            .await,
        1
    );
    assert_eq!(roster.metric("roster_homeserver_ping_ok", &[]).await, 1);
    eventually(
        Duration::from_secs(120),
        "Synapse to redeliver the transaction",
        || async { (roster.transactions("duplicate").await >= 1).then_some(()) },
    )
    .await;
    // Applied once, before the crash: the redelivery changed nothing. (Transactions Synapse
    // queued after it are new and are applied normally.)
    assert_eq!(roster.transitions("invited").await, 0);
    assert_eq!(
        roster.membership(&room, BOT).await.as_deref(),
        Some("invite")
    );
    synapse.assert_no_logins().await;
    roster.assert_no_secrets_in_logs(&[&admin_token]);
}
