//! Provisions N agents (default 200) from cold on a real Synapse and, in the same run and on
//! the same Synapse, measures Synapse's own floor for the same rooms. Not a test: run with
//! `deploy/bench.sh provision [N]` or `cargo bench --bench provision -- [N]`.
//!
//! Three runs, in this order, each at roster's default `homeserver.max_concurrent_requests`
//! agents at a time:
//! 1. roster, from an empty store, until its status shows N rooms and nothing pending;
//! 2. the createRoom floor: per agent, register the agent user with the appservice token and
//!    one `createRoom` as that user with the body roster sends (private, named, topic, alias,
//!    two invites, history and guest settings, space parent, power levels);
//! 3. the end-state floor: every request a client needs to reach roster's end state: the
//!    floor above plus display name, avatar upload and set, the two required members
//!    joining, and the space child.
//!
//! The floors' agents are distinct users and aliases, so nothing is shared between runs.
//! roster keeps running (idle) during the floors: Synapse pushes it their invites as it
//! would in production; roster's request counter before and after shows it stayed out.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use support::*;

/// What one floor run needs to act like roster's createRoom.
struct Floor {
    http: reqwest::Client,
    base: String,
    /// The pushed registration's token (bot, agents) and the acting-only one's (required
    /// members such as `@admin`); the same when roster writes one registration.
    pushed_token: String,
    acting_token: String,
    bot: String,
    /// Every required member (the bot first), invited at creation.
    required: Vec<String>,
    space: String,
    server_name: String,
    list_creator_power: bool,
}

impl Floor {
    /// One request; counts it in `requests`.
    async fn call(
        &self,
        requests: &mut u64,
        method: Method,
        path: &str,
        token: &str,
        as_user: Option<&str>,
        body: Body,
    ) -> Value {
        *requests += 1;
        let mut url = format!("{}{path}", self.base);
        if let Some(user) = as_user {
            let sep = if path.contains('?') { '&' } else { '?' };
            url.push_str(&format!("{sep}user_id={}", encode(user)));
        }
        let mut request = self.http.request(method.clone(), &url).bearer_auth(token);
        request = match body {
            Body::Json(v) => request.json(&v),
            Body::Png(bytes) => request.header("content-type", "image/png").body(bytes),
        };
        let response = request.send().await.expect("synapse answers");
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert!(
            status.is_success(),
            "floor {method} {path}: {status} {body}"
        );
        body
    }

    /// Provisions one agent; returns the requests it took.
    async fn agent(&self, i: usize, end_state: bool, prefix: &str) -> u64 {
        let localpart = format!("agent_{prefix}{i:05x}");
        let name = format!("Floor agent {prefix}{i}");
        let user = format!("@{localpart}:{}", self.server_name);
        let mut requests = 0;
        self.call(
            &mut requests,
            Method::POST,
            "/_matrix/client/v3/register",
            &self.pushed_token,
            None,
            Body::Json(json!({
                "type": "m.login.application_service", "username": localpart, "inhibit_login": true
            })),
        )
        .await;
        if end_state {
            self.call(
                &mut requests,
                Method::PUT,
                &format!("/_matrix/client/v3/profile/{}/displayname", encode(&user)),
                &self.pushed_token,
                Some(&user),
                Body::Json(json!({ "displayname": name })),
            )
            .await;
            let agent_id = format!("agent-{prefix}{i:05x}");
            let png = roster::avatar::render(roster::avatar::look(&agent_id, &name));
            let uploaded = self
                .call(
                    &mut requests,
                    Method::POST,
                    "/_matrix/media/v3/upload",
                    &self.pushed_token,
                    Some(&user),
                    Body::Png(png),
                )
                .await;
            let mxc = uploaded["content_uri"]
                .as_str()
                .expect("an mxc uri")
                .to_owned();
            self.call(
                &mut requests,
                Method::PUT,
                &format!("/_matrix/client/v3/profile/{}/avatar_url", encode(&user)),
                &self.pushed_token,
                Some(&user),
                Body::Json(json!({ "avatar_url": mxc })),
            )
            .await;
        }
        let mut users = serde_json::Map::new();
        if self.list_creator_power {
            users.insert(user.clone(), 100.into());
        }
        for member in &self.required {
            users.insert(member.clone(), 50.into());
        }
        let created = self
            .call(
                &mut requests,
                Method::POST,
                "/_matrix/client/v3/createRoom",
                &self.pushed_token,
                Some(&user),
                Body::Json(json!({
                    "room_alias_name": localpart,
                    "name": name,
                    "topic": roster::model::agents::topic_for(&name),
                    "preset": "private_chat",
                    "invite": self.required,
                    "initial_state": [
                        { "type": "m.space.parent", "state_key": self.space,
                          "content": { "via": [self.server_name], "canonical": true } },
                        { "type": "m.room.history_visibility", "state_key": "",
                          "content": { "history_visibility": "shared" } },
                        { "type": "m.room.guest_access", "state_key": "",
                          "content": { "guest_access": "forbidden" } },
                    ],
                    "power_level_content_override": { "users": users },
                })),
            )
            .await;
        let room = created["room_id"].as_str().expect("a room id").to_owned();
        if end_state {
            for member in &self.required {
                let token = if *member == self.bot {
                    &self.pushed_token
                } else {
                    &self.acting_token
                };
                self.call(
                    &mut requests,
                    Method::POST,
                    &format!("/_matrix/client/v3/join/{}", encode(&room)),
                    token,
                    Some(member),
                    Body::Json(json!({})),
                )
                .await;
            }
            self.call(
                &mut requests,
                Method::PUT,
                &format!(
                    "/_matrix/client/v3/rooms/{}/state/m.space.child/{}",
                    encode(&self.space),
                    encode(&room)
                ),
                &self.pushed_token,
                Some(&self.bot),
                Body::Json(json!({ "via": [self.server_name] })),
            )
            .await;
        }
        requests
    }

    /// Provisions `n` agents, `concurrency` at a time; returns wall time and requests.
    async fn run(&self, n: usize, concurrency: usize, end_state: bool) -> (Duration, u64) {
        let prefix = if end_state { "e" } else { "c" };
        let started = Instant::now();
        let requests: u64 = futures::stream::iter(0..n)
            .map(|i| self.agent(i, end_state, prefix))
            .buffer_unordered(concurrency)
            .fold(0, |sum, r| async move { sum + r })
            .await;
        (started.elapsed(), requests)
    }
}

enum Body {
    Json(Value),
    Png(Vec<u8>),
}

/// Percent-encodes a path segment or query value (Matrix ids carry `@ ! # :`).
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Row {
    run: &'static str,
    wall: Duration,
    requests: u64,
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200);
    let scratch = Scratch::new("bench-provision");
    let agents_file = scratch.path().join("agents.yaml");
    let listing: String = (0..n)
        .map(|i| format!("- {{id: agent-{i:05x}-bench, name: \"Bench agent {i}\"}}\n"))
        .collect();
    std::fs::write(&agents_file, listing).unwrap();
    let hs_port = free_port();
    let mut roster = Roster::configure(
        scratch.path(),
        &format!("http://127.0.0.1:{hs_port}"),
        &format!("agents:\n  file: {}\n", agents_file.display()),
    );
    let config = roster::config::Config::load(&roster.config, true, &BTreeMap::new())
        .expect("the harness's config loads");
    let concurrency = config.homeserver.max_concurrent_requests;
    let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
    // @admin must exist: it is a required member of every room.
    let _admin_token = synapse.admin_token("admin");

    let started = Instant::now();
    roster.start().await;
    let status = eventually(Duration::from_secs(3600), "agents provisioned", || async {
        let status = roster.status().await;
        (status["rooms"] == n && status["pending"] == 0 && status["running"] == 0).then_some(status)
    })
    .await;
    let roster_wall = started.elapsed();
    let metrics = roster.metrics().await;
    let roster_requests = sum_samples(&metrics, "roster_homeserver_requests_total", &[]);

    let ids = config.ids();
    let tokens = roster.as_tokens();
    let acting_token = tokens
        .iter()
        .find(|t| **t != roster.as_token)
        .unwrap_or(&roster.as_token)
        .clone();
    let (_, capabilities) = synapse
        .call(
            Method::GET,
            "/_matrix/client/v3/capabilities",
            &roster.as_token,
            None,
        )
        .await;
    let default_version = capabilities["capabilities"]["m.room_versions"]["default"]
        .as_str()
        .unwrap_or("10")
        .to_owned();
    let implicit_creators = default_version == "org.matrix.hydra.11"
        || default_version.parse::<u32>().is_ok_and(|v| v >= 12);
    let floor = Floor {
        http: reqwest::Client::new(),
        base: synapse.url(),
        pushed_token: roster.as_token.clone(),
        acting_token,
        bot: ids.bot.to_string(),
        required: ids.required_members.iter().map(|u| u.to_string()).collect(),
        space: status["space"]
            .as_str()
            .expect("roster's status names the space")
            .to_owned(),
        server_name: ids.server_name.to_string(),
        list_creator_power: !implicit_creators,
    };
    let (create_wall, create_requests) = floor.run(n, concurrency, false).await;
    let (end_wall, end_requests) = floor.run(n, concurrency, true).await;
    let roster_requests_after = roster.homeserver_requests(None).await;
    let logins = synapse.login_count().await;

    let rows = [
        Row {
            run: "roster, from cold",
            wall: roster_wall,
            requests: roster_requests,
        },
        Row {
            run: "Synapse floor: register + createRoom",
            wall: create_wall,
            requests: create_requests,
        },
        Row {
            run: "Synapse floor: roster's end state (+ name, avatar, 2 joins, space child)",
            wall: end_wall,
            requests: end_requests,
        },
    ];
    println!(
        "Provisioning {n} agents on Synapse (room version {default_version}), {concurrency} at a time, same run, in this order"
    );
    println!();
    println!("| run | agents | wall time | requests | requests/agent | agents/s | roster / this |");
    println!("|---|---|---|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {n} | {:.1} s | {} | {:.2} | {:.1} | {:.2}x |",
            row.run,
            row.wall.as_secs_f64(),
            row.requests,
            row.requests as f64 / n as f64,
            n as f64 / row.wall.as_secs_f64(),
            roster_wall.as_secs_f64() / row.wall.as_secs_f64(),
        );
    }
    println!();
    println!(
        "Logins counted by Synapse: {logins}. roster's requests while the floors ran: {}.",
        roster_requests_after - roster_requests
    );
    println!();
    println!("| roster endpoint | requests | per agent |");
    println!("|---|---|---|");
    let mut by_endpoint: BTreeMap<String, u64> = BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("roster_homeserver_requests_total{"))
    {
        let endpoint = line
            .split("endpoint=\"")
            .nth(1)
            .and_then(|s| s.split('"').next());
        let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let (Some(endpoint), Some(value)) = (endpoint, value) {
            *by_endpoint.entry(endpoint.to_owned()).or_default() += value as u64;
        }
    }
    for (endpoint, count) in by_endpoint {
        println!("| {endpoint} | {count} | {:.2} |", count as f64 / n as f64);
    }
}
