//! Provisions N agents (default 200) from cold on a real Synapse and, in the same run and on
//! the same Synapse, measures Synapse's own floor for the same rooms. Not a test: run with
//! `deploy/bench.sh provision [N]` or `cargo bench --bench provision -- [N]`.
//!
//! Four runs, in this order, each at roster's default `homeserver.max_concurrent_requests`
//! agents at a time:
//! 1. roster, from an empty store, until its status shows N rooms and nothing pending;
//! 2. the createRoom floor: per agent, register the agent user with the appservice token and
//!    one `createRoom` as that user with the body roster sends (private, named, topic, alias,
//!    two invites, history and guest settings, space parent, power levels);
//! 3. the joined floor: the above, then the required members (their stand-ins, below) join
//!    and the bot's stand-in adds the space child: the members and links roster's rooms end
//!    with;
//! 4. the end-state floor: every request a client needs to reach roster's end state: the
//!    joined floor plus display name, avatar upload and set.
//!
//! Nothing is shared between runs: each floor has its own agents and aliases, and its own
//! stand-ins for the required members and for the space, fresh users in the appservice's
//! namespace who start in no room, as roster's bot and `@admin` do from cold: whatever a
//! join or a space child costs for each room the user or space already has, every run pays
//! it from the same start. roster keeps running (idle) during the floors: Synapse pushes it
//! their events as it would in production; roster's request counter before and after shows
//! it stayed out. Each run still finds Synapse's database holding the rooms of the runs
//! before it.
//!
//! Beside each run's wall time it prints the CPU Synapse and roster spent on it, and where
//! Synapse's went by its own per-servlet and background-process metrics. Synapse is the
//! bottleneck here: its CPU per agent says what each part of the end state costs.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use support::*;

/// What the floor runs need to act like roster's createRoom.
struct Floor {
    http: reqwest::Client,
    base: String,
    /// The pushed registration's token: the floors' users are all in its `@agent_` namespace.
    token: String,
    /// How many required members roster's rooms have (the bot first).
    required_members: usize,
    server_name: String,
    list_creator_power: bool,
}

/// One floor run's stand-ins for roster's required members and space.
struct Cast {
    /// Stands in for the bot: creates the space and adds each room to it.
    bot: String,
    /// Every required member's stand-in (the bot's first), invited at creation.
    required: Vec<String>,
    space: String,
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

    /// Registers a user in the appservice's namespace, as roster does (no login).
    async fn register(&self, requests: &mut u64, localpart: &str) {
        self.call(
            requests,
            Method::POST,
            "/_matrix/client/v3/register",
            &self.token,
            None,
            Body::Json(json!({
                "type": "m.login.application_service", "username": localpart, "inhibit_login": true
            })),
        )
        .await;
    }

    /// Registers a run's stand-ins for the required members and creates its space, before
    /// the run's clock starts (roster's run counts its space: one request in thousands).
    async fn cast(&self, reach: Reach) -> Cast {
        let prefix = reach.prefix();
        let mut uncounted = 0;
        let mut required = Vec::new();
        for j in 0..self.required_members {
            let localpart = format!("agent_{prefix}member{j}");
            self.register(&mut uncounted, &localpart).await;
            required.push(format!("@{localpart}:{}", self.server_name));
        }
        let bot = required[0].clone();
        let space = self
            .call(
                &mut uncounted,
                Method::POST,
                "/_matrix/client/v3/createRoom",
                &self.token,
                Some(&bot),
                Body::Json(json!({
                    "name": format!("Floor space {prefix}"),
                    "preset": "private_chat",
                    "creation_content": { "type": "m.space" },
                })),
            )
            .await["room_id"]
            .as_str()
            .expect("a space id")
            .to_owned();
        Cast {
            bot,
            required,
            space,
        }
    }

    /// Provisions one agent; returns the requests it took.
    async fn agent(&self, i: usize, reach: Reach, cast: &Cast) -> u64 {
        let prefix = reach.prefix();
        let localpart = format!("agent_{prefix}{i:05x}");
        let name = format!("Floor agent {prefix}{i}");
        let user = format!("@{localpart}:{}", self.server_name);
        let mut requests = 0;
        self.register(&mut requests, &localpart).await;
        if reach == Reach::EndState {
            self.call(
                &mut requests,
                Method::PUT,
                &format!("/_matrix/client/v3/profile/{}/displayname", encode(&user)),
                &self.token,
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
                    &self.token,
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
                &self.token,
                Some(&user),
                Body::Json(json!({ "avatar_url": mxc })),
            )
            .await;
        }
        let mut users = serde_json::Map::new();
        if self.list_creator_power {
            users.insert(user.clone(), 100.into());
        }
        for member in &cast.required {
            users.insert(member.clone(), 50.into());
        }
        let created = self
            .call(
                &mut requests,
                Method::POST,
                "/_matrix/client/v3/createRoom",
                &self.token,
                Some(&user),
                Body::Json(json!({
                    "room_alias_name": localpart,
                    "name": name,
                    "topic": roster::model::agents::topic_for(&name),
                    "preset": "private_chat",
                    "invite": cast.required,
                    "initial_state": [
                        { "type": "m.space.parent", "state_key": cast.space,
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
        if reach != Reach::Created {
            for member in &cast.required {
                self.call(
                    &mut requests,
                    Method::POST,
                    &format!("/_matrix/client/v3/join/{}", encode(&room)),
                    &self.token,
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
                    encode(&cast.space),
                    encode(&room)
                ),
                &self.token,
                Some(&cast.bot),
                Body::Json(json!({ "via": [self.server_name] })),
            )
            .await;
        }
        requests
    }

    /// Provisions `n` agents, `concurrency` at a time; returns wall time and requests.
    async fn run(
        &self,
        n: usize,
        concurrency: usize,
        reach: Reach,
        cast: &Cast,
    ) -> (Duration, u64) {
        let started = Instant::now();
        let requests: u64 = futures::stream::iter(0..n)
            .map(|i| self.agent(i, reach, cast))
            .buffer_unordered(concurrency)
            .fold(0, |sum, r| async move { sum + r })
            .await;
        (started.elapsed(), requests)
    }
}

/// How far a floor run takes each agent.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Registered, and its room created with both invites pending.
    Created,
    /// Also the two required members joined and the room in the space: roster's members.
    Joined,
    /// Also the display name and avatar: all of roster's end state.
    EndState,
}

impl Reach {
    /// Keeps each run's users and aliases apart.
    fn prefix(self) -> &'static str {
        match self {
            Reach::Created => "c",
            Reach::Joined => "j",
            Reach::EndState => "e",
        }
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
    /// The run's short name, as a column heading.
    column: &'static str,
    wall: Duration,
    requests: u64,
    synapse: SynapseCpu,
    /// roster's own CPU seconds in the run (it hears the floors' rooms pushed too).
    roster_cpu: f64,
}

/// A process's CPU seconds (user + system) from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/stat: {e}"));
    // The fields after the command's closing parenthesis; utime and stime are the 12th and
    // 13th of them, in clock ticks (100 per second on Linux).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("a stat line")
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Sums a metric's samples by the value of one label.
fn by_label(text: &str, metric: &str, label: &str) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    let key = format!("{label}=\"");
    for line in text.lines().filter(|l| {
        l.strip_prefix(metric)
            .is_some_and(|rest| rest.starts_with('{'))
    }) {
        let value = line.split(&key).nth(1).and_then(|s| s.split('"').next());
        let sample = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let (Some(value), Some(sample)) = (value, sample) {
            *sums.entry(value.to_owned()).or_default() += sample;
        }
    }
    sums
}

/// Synapse's CPU seconds: its whole process, and what it attributes to each servlet (the
/// request itself) and to each background process (work a request set off).
#[derive(Default)]
struct SynapseCpu {
    process: f64,
    parts: BTreeMap<String, f64>,
}

impl SynapseCpu {
    fn read(text: &str) -> Self {
        let mut parts = BTreeMap::new();
        for (metric, label, kind) in [
            (
                "synapse_http_server_response_ru_utime_seconds_total",
                "servlet",
                "request",
            ),
            (
                "synapse_http_server_response_ru_stime_seconds_total",
                "servlet",
                "request",
            ),
            (
                "synapse_background_process_ru_utime_seconds_total",
                "name",
                "background",
            ),
            (
                "synapse_background_process_ru_stime_seconds_total",
                "name",
                "background",
            ),
        ] {
            for (name, seconds) in by_label(text, metric, label) {
                *parts.entry(format!("{kind} {name}")).or_default() += seconds;
            }
        }
        let process = text
            .lines()
            .find_map(|l| l.strip_prefix("process_cpu_seconds_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        SynapseCpu { process, parts }
    }

    /// What was spent between `before` and `self`.
    fn since(&self, before: &SynapseCpu) -> SynapseCpu {
        let parts = self
            .parts
            .iter()
            .map(|(k, v)| (k.clone(), v - before.parts.get(k).unwrap_or(&0.0)))
            .filter(|(_, v)| *v > 0.0)
            .collect();
        SynapseCpu {
            process: self.process - before.process,
            parts,
        }
    }
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
        // No periodic sweep: its reads would land in the floors' runs.
        &format!(
            "agents:\n  file: {}\nsync:\n  interval: 1d\n",
            agents_file.display()
        ),
    );
    let config = roster::config::Config::load(&roster.config, true, &BTreeMap::new())
        .expect("the harness's config loads");
    let concurrency = config.homeserver.max_concurrent_requests;
    let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
    // @admin must exist: it is a required member of every room.
    let _admin_token = synapse.admin_token("admin");

    let cpu_at_start = SynapseCpu::read(&synapse.metrics_text().await);
    let started = Instant::now();
    roster.start().await;
    let roster_pid = roster.pid();
    eventually(Duration::from_secs(3600), "agents provisioned", || async {
        let status = roster.status().await;
        (status["rooms"] == n && status["pending"] == 0 && status["running"] == 0).then_some(())
    })
    .await;
    let roster_wall = started.elapsed();
    let cpu_after_roster = SynapseCpu::read(&synapse.metrics_text().await);
    let roster_cpu_after_roster = cpu_seconds(roster_pid);
    eprintln!("roster done in {:.1} s", roster_wall.as_secs_f64());
    let metrics = roster.metrics().await;
    let roster_requests = sum_samples(&metrics, "roster_homeserver_requests_total", &[]);

    let ids = config.ids();
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
        token: roster.as_token.clone(),
        required_members: ids.required_members.len(),
        server_name: ids.server_name.to_string(),
        list_creator_power: !implicit_creators,
    };
    let mut rows = vec![Row {
        run: "roster, from cold",
        column: "roster",
        wall: roster_wall,
        requests: roster_requests,
        synapse: cpu_after_roster.since(&cpu_at_start),
        roster_cpu: roster_cpu_after_roster,
    }];
    for (reach, run, column) in [
        (
            Reach::Created,
            "Synapse floor: register + createRoom",
            "createRoom floor",
        ),
        (
            Reach::Joined,
            "Synapse floor: + the required members joined, space child",
            "joined floor",
        ),
        (
            Reach::EndState,
            "Synapse floor: roster's end state (+ display name, avatar)",
            "end-state floor",
        ),
    ] {
        let cast = floor.cast(reach).await;
        let cpu_before = SynapseCpu::read(&synapse.metrics_text().await);
        let roster_cpu_before = cpu_seconds(roster_pid);
        let (wall, requests) = floor.run(n, concurrency, reach, &cast).await;
        let cpu_after = SynapseCpu::read(&synapse.metrics_text().await);
        let roster_cpu_after = cpu_seconds(roster_pid);
        eprintln!("{column} done in {:.1} s", wall.as_secs_f64());
        rows.push(Row {
            run,
            column,
            wall,
            requests,
            synapse: cpu_after.since(&cpu_before),
            roster_cpu: roster_cpu_after - roster_cpu_before,
        });
    }
    let roster_requests_after = roster.homeserver_requests(None).await;
    let logins = synapse.login_count().await;

    println!(
        "Provisioning {n} agents on Synapse (room version {default_version}), {concurrency} at a time, same run, in this order"
    );
    println!();
    println!(
        "| run | agents | wall time | requests | requests/agent | agents/s | Synapse CPU | roster CPU | roster / this |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {n} | {:.1} s | {} | {:.2} | {:.1} | {:.1} s | {:.1} s | {:.2}x |",
            row.run,
            row.wall.as_secs_f64(),
            row.requests,
            row.requests as f64 / n as f64,
            n as f64 / row.wall.as_secs_f64(),
            row.synapse.process,
            row.roster_cpu,
            roster_wall.as_secs_f64() / row.wall.as_secs_f64(),
        );
    }
    println!();
    println!(
        "Where Synapse's CPU went, ms per agent (requests and the background work they set off):"
    );
    println!();
    let columns: Vec<&str> = rows.iter().map(|r| r.column).collect();
    println!("| part | {} |", columns.join(" | "));
    println!("|---{}|", "|---".repeat(columns.len()));
    // The parts that cost most in any run, then the rest, then what Synapse attributes to
    // no request and no background process (its reactor, garbage collection, threads).
    let most = |part: &String| {
        rows.iter()
            .map(|r| r.synapse.parts.get(part).copied().unwrap_or(0.0))
            .fold(0.0, f64::max)
    };
    let mut parts: Vec<&String> = rows.iter().flat_map(|r| r.synapse.parts.keys()).collect();
    parts.sort();
    parts.dedup();
    parts.sort_by(|a, b| most(b).total_cmp(&most(a)));
    let (shown, rest) = parts.split_at(parts.len().min(16));
    let per_agent = |seconds: f64| format!("{:.1}", seconds * 1000.0 / n as f64);
    let line = |label: &str, seconds: &dyn Fn(&SynapseCpu) -> f64| {
        let cells: Vec<String> = rows
            .iter()
            .map(|r| per_agent(seconds(&r.synapse)))
            .collect();
        println!("| {label} | {} |", cells.join(" | "));
    };
    for part in shown {
        line(part, &|cpu| cpu.parts.get(*part).copied().unwrap_or(0.0));
    }
    line(&format!("{} other parts", rest.len()), &|cpu| {
        rest.iter().filter_map(|p| cpu.parts.get(*p)).sum()
    });
    line("not attributed", &|cpu| {
        cpu.process - cpu.parts.values().sum::<f64>()
    });
    line("**Synapse process**", &|cpu| cpu.process);
    println!();
    println!(
        "Logins counted by Synapse: {logins}. roster's requests while the floors ran: {}.",
        roster_requests_after - roster_requests
    );
    println!();
    println!("| roster endpoint | requests | per agent |");
    println!("|---|---|---|");
    for (endpoint, count) in by_label(&metrics, "roster_homeserver_requests_total", "endpoint") {
        println!("| {endpoint} | {count} | {:.2} |", count / n as f64);
    }
}
