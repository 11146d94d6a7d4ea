//! The appservice loop against the outside world: pushed transactions, durable dedup,
//! masquerading on a real Synapse, crash and redelivery.

mod support;

use std::time::{Duration, Instant};

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

fn user(localpart: &str) -> OwnedUserId {
    UserId::parse(format!("@{localpart}:{SERVER_NAME}")).unwrap()
}

/// A homeserver address where nothing listens: these tests act as the homeserver themselves.
fn nowhere() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

#[tokio::test]
async fn bad_requests_get_spec_errors_and_change_nothing() {
    let scratch = Scratch::new("bad-requests");
    let mut roster = Roster::configure(scratch.path(), &nowhere(), "");
    roster.start().await;
    let http = roster.client().clone();
    let url = roster.appservice_url("/_matrix/app/v1/transactions/t-bad");
    let valid =
        json!({ "events": [member_event(ROOM, "@a:roster.test", "@a:roster.test", "join", 1)] });

    let missing = http.put(&url).json(&valid).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(
        missing.json::<Value>().await.unwrap()["errcode"],
        "M_UNAUTHORIZED"
    );

    let wrong = http
        .put(&url)
        .bearer_auth("not-the-hs-token")
        .json(&valid)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 403);
    assert_eq!(
        wrong.json::<Value>().await.unwrap()["errcode"],
        "M_FORBIDDEN"
    );

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
    assert_eq!(not_json.status(), 400);
    assert_eq!(
        not_json.json::<Value>().await.unwrap()["errcode"],
        "M_NOT_JSON"
    );

    let bad_shape = http
        .put(&url)
        .bearer_auth(&roster.hs_token)
        .json(&json!({ "events": "not a list" }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_shape.status(), 400);
    assert_eq!(
        bad_shape.json::<Value>().await.unwrap()["errcode"],
        "M_BAD_JSON"
    );

    // The harness sets appservice.max_body_bytes to 64 KiB.
    let padding = "x".repeat(70 * 1024);
    let oversized = json!({ "events": [member_event(ROOM, "@a:roster.test", "@a:roster.test", "join", 1)], "padding": padding });
    let too_large = http
        .put(&url)
        .bearer_auth(&roster.hs_token)
        .json(&oversized)
        .send()
        .await
        .unwrap();
    assert_eq!(too_large.status(), 413);
    assert_eq!(
        too_large.json::<Value>().await.unwrap()["errcode"],
        "M_TOO_LARGE"
    );

    // Nothing of the above reached the model or the store ...
    assert!(roster.members(ROOM).await.is_empty());
    assert_eq!(
        roster
            .metric("roster_transactions_total", &["outcome=\"applied\""])
            .await,
        0
    );
    assert_eq!(
        roster
            .metric("roster_transactions_total", &["outcome=\"rejected\""])
            .await,
        3
    );
    assert_eq!(
        roster
            .metric("roster_transactions_total", &["outcome=\"unauthorized\""])
            .await,
        1
    );
    assert_eq!(
        roster
            .metric("roster_transactions_total", &["outcome=\"forbidden\""])
            .await,
        2
    );
    // ... so the same id with a valid body is new, not a duplicate.
    let (status, _) = roster.push("t-bad", &valid).await;
    assert_eq!(status, 200);
    assert_eq!(
        roster.membership(ROOM, "@a:roster.test").await.as_deref(),
        Some("join")
    );
    assert_eq!(
        roster
            .metric("roster_transactions_total", &["outcome=\"applied\""])
            .await,
        1
    );

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
    assert_eq!(query.status(), 404);
}

#[tokio::test]
async fn undecodable_events_are_skipped_without_blocking_the_transaction() {
    let scratch = Scratch::new("undecodable");
    let mut roster = Roster::configure(scratch.path(), &nowhere(), "");
    roster.start().await;
    let body = json!({
        "events": [
            { "type": "m.room.member", "room_id": ROOM, "content": {} },
            { "type": "m.room.message", "event_id": "$m", "room_id": ROOM, "sender": "@a:roster.test",
              "origin_server_ts": 1, "content": { "msgtype": "m.text", "body": "hi" } },
            member_event(ROOM, "@b:roster.test", "@b:roster.test", "join", 2),
        ],
        "ephemeral": [{ "type": "m.typing", "room_id": ROOM, "content": { "user_ids": [] } }],
        "de.sorunome.msc2409.ephemeral": [{ "type": "m.typing", "room_id": ROOM, "content": { "user_ids": [] } }],
    });
    let (status, _) = roster.push("t-mixed", &body).await;
    assert_eq!(status, 200);
    assert_eq!(
        roster.membership(ROOM, "@b:roster.test").await.as_deref(),
        Some("join")
    );
    assert_eq!(
        roster.metric("roster_undecodable_events_total", &[]).await,
        1
    );
    assert_eq!(roster.metric("roster_ephemeral_items_total", &[]).await, 2);
}

#[tokio::test]
async fn same_transaction_twice_applies_once_even_across_sigkill() {
    let scratch = Scratch::new("dedup");
    let mut roster = Roster::configure(scratch.path(), &nowhere(), "");
    roster.start().await;
    let join =
        json!({ "events": [member_event(ROOM, "@a:roster.test", "@a:roster.test", "join", 10)] });
    let leave =
        json!({ "events": [member_event(ROOM, "@a:roster.test", "@a:roster.test", "leave", 20)] });

    assert_eq!(roster.push("t1", &join).await.0, 200);
    assert_eq!(roster.push("t2", &leave).await.0, 200);
    // A redelivery of t1 (same id) must not resurrect the join, even with other content.
    assert_eq!(roster.push("t1", &join).await.0, 200);
    assert_eq!(
        roster.membership(ROOM, "@a:roster.test").await.as_deref(),
        Some("leave")
    );
    assert_eq!(
        roster
            .metric("roster_transactions_total", &["outcome=\"applied\""])
            .await,
        2
    );
    assert_eq!(
        roster
            .metric("roster_transactions_total", &["outcome=\"duplicate\""])
            .await,
        1
    );
    assert_eq!(
        roster
            .metric(
                "roster_member_transitions_total",
                &["transition=\"joined\""]
            )
            .await,
        1
    );

    roster.kill9();
    roster.start().await;
    // The model came back from the store, and the ids are still remembered.
    assert_eq!(
        roster.membership(ROOM, "@a:roster.test").await.as_deref(),
        Some("leave")
    );
    assert_eq!(roster.push("t1", &join).await.0, 200);
    assert_eq!(roster.push("t2", &leave).await.0, 200);
    assert_eq!(
        roster
            .metric("roster_transactions_total", &["outcome=\"duplicate\""])
            .await,
        2
    );
    assert_eq!(
        roster
            .metric("roster_transactions_total", &["outcome=\"applied\""])
            .await,
        0
    );
    assert_eq!(
        roster.membership(ROOM, "@a:roster.test").await.as_deref(),
        Some("leave")
    );
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

#[tokio::test]
async fn masquerading_loop_on_real_synapse_with_zero_logins() {
    let scratch = Scratch::new("masquerade");
    let hs_port = free_port();
    let mut roster = Roster::configure(scratch.path(), &format!("http://127.0.0.1:{hs_port}"), "");
    let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
    let logins_at_start = synapse.login_count().await;
    assert_eq!(logins_at_start, 0);
    roster.start().await;
    roster.wait_ready().await;
    let roster_requests_when_ready = roster.metric("roster_homeserver_requests_total", &[]).await;

    // A person's account that roster may act as (non-exclusive namespace).
    let admin_token = synapse.admin_token("admin");
    let admin_devices = synapse.devices(&admin_token, "@admin:roster.test").await;

    // roster's homeserver client, with the as_token only.
    let hs = Homeserver::new(
        &synapse.url(),
        roster::matrix::Tokens::single(Secret::new(roster.as_token.clone())),
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

    // The homeserver pushed all of it to the running roster.
    let room = room.as_str();
    let mut waits = Vec::new();
    for who in [&agent, &bot, &admin] {
        waits.push(roster.wait_membership(room, who.as_str(), "join").await);
    }

    // Changes a person makes on Synapse arrive the same way.
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
    call(
        format!("/_matrix/client/v3/rooms/{room}/invite"),
        &admin_token,
        json!({ "user_id": carol }),
    )
    .await;
    waits.push(roster.wait_membership(room, carol, "invite").await);
    call(
        format!("/_matrix/client/v3/rooms/{room}/join"),
        &carol_token,
        json!({}),
    )
    .await;
    waits.push(roster.wait_membership(room, carol, "join").await);
    call(
        format!("/_matrix/client/v3/rooms/{room}/kick"),
        &admin_token,
        json!({ "user_id": carol }),
    )
    .await;
    waits.push(roster.wait_membership(room, carol, "leave").await);
    call(
        format!("/_matrix/client/v3/rooms/{room}/invite"),
        &admin_token,
        json!({ "user_id": carol }),
    )
    .await;
    waits.push(roster.wait_membership(room, carol, "invite").await);
    call(
        format!("/_matrix/client/v3/rooms/{room}/leave"),
        &carol_token,
        json!({}),
    )
    .await;
    waits.push(roster.wait_membership(room, carol, "leave").await);
    eprintln!("pushed membership reached roster's model after {waits:?}");
    assert_eq!(
        roster
            .metric(
                "roster_member_transitions_total",
                &["transition=\"kicked\""]
            )
            .await,
        1
    );
    assert_eq!(
        roster
            .metric("roster_member_transitions_total", &["transition=\"left\""])
            .await,
        1
    );

    // roster learned all of it without a single request of its own.
    assert_eq!(
        roster.metric("roster_homeserver_requests_total", &[]).await,
        roster_requests_when_ready
    );
    assert_eq!(
        roster
            .metric(
                "roster_homeserver_requests_total",
                &["endpoint=\"joined_members\""]
            )
            .await,
        0
    );

    // Masquerading created no device and no login.
    assert_eq!(synapse.devices(&admin_token, agent.as_str()).await, 0);
    assert_eq!(synapse.devices(&admin_token, bot.as_str()).await, 0);
    assert_eq!(
        synapse.devices(&admin_token, admin.as_str()).await,
        admin_devices
    );
    assert_eq!(synapse.login_count().await, logins_at_start);

    // The counter is live: one failed login attempt moves it, so the checks above could fail.
    let (status, _) = synapse
        .call(
            Method::POST,
            "/_matrix/client/v3/login",
            "",
            Some(json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "nobody" }, "password": "x" })),
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(synapse.login_count().await, logins_at_start + 1);
}

#[tokio::test]
async fn synapse_retry_after_a_crash_is_applied_once_and_the_startup_ping_flushes_it() {
    let scratch = Scratch::new("crash-retry");
    let hs_port = free_port();
    let mut roster = Roster::configure(scratch.path(), &format!("http://127.0.0.1:{hs_port}"), "");
    let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
    roster.env(roster::FAULT_ABORT_AFTER_RECORD, "1");
    roster.start().await;
    roster.wait_ready().await;

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
            Some(json!({ "user_id": "@letta:roster.test" })),
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

    // Let Synapse's backoff grow (retries after 2, 6, 14, 30 s; the next at 62 s), so a retry
    // that arrives soon after the restart is the start-up ping's doing.
    tokio::time::sleep(Duration::from_secs(35)).await;
    roster.clear_env();
    roster.start().await;
    let restarted = Instant::now();
    // Recorded before the crash, so it is in the model at once.
    assert_eq!(
        roster
            .membership(&room, "@letta:roster.test")
            .await
            .as_deref(),
        Some("invite")
    );
    eventually(
        Duration::from_secs(20),
        "Synapse to redeliver the transaction",
        || async {
            (roster
                .metric("roster_transactions_total", &["outcome=\"duplicate\""])
                .await
                >= 1)
                .then_some(())
        },
    )
    .await;
    let redelivered_after = restarted.elapsed();
    eprintln!("Synapse redelivered {redelivered_after:?} after roster restarted");
    // Applied once, before the crash: the redelivery changed nothing. (Transactions Synapse
    // queued after it are new and are applied normally.)
    assert_eq!(
        roster
            .metric(
                "roster_member_transitions_total",
                &["transition=\"invited\""]
            )
            .await,
        0
    );
    assert_eq!(
        roster
            .membership(&room, "@letta:roster.test")
            .await
            .as_deref(),
        Some("invite")
    );
    assert_eq!(synapse.login_count().await, 0);
}
