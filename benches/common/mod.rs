//! What the ingestion, memory, flood and sweep benchmarks share: roster (the binary) with N
//! agents provisioned against the in-process stand-in homeserver (`roster::testing`), the
//! transactions fed to it, and memory read from `/proc`.

#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use roster::testing::FakeHomeserver;
use serde_json::{Value, json};

use crate::support::*;

/// roster with `agents` agents provisioned on the stand-in, converged.
pub struct Provisioned {
    pub roster: Roster,
    pub fake: FakeHomeserver,
    /// Every agent room, in agent order.
    pub rooms: Vec<String>,
    pub provision_time: Duration,
}

/// Configures and starts roster against the stand-in homeserver with `agents` agents (no
/// avatars), at log level info (debug logs every membership change, as production does not),
/// and waits until every room exists and nothing is pending. `extra_yaml` is appended to the
/// config. The acting-only registration is removed (the stand-in knows one token), so
/// `@admin` is a user roster invites rather than acts as: the setup differs from production
/// only in who joins the rooms.
pub async fn provision(dir: &Path, agents: usize, extra_yaml: &str) -> Provisioned {
    let agents_file = dir.join("agents.yaml");
    let listing: String = (0..agents)
        .map(|i| format!("- {{id: agent-{i:05x}-bench, name: \"Bench agent {i}\"}}\n"))
        .collect();
    std::fs::write(&agents_file, listing).unwrap();
    let url_placeholder = nowhere();
    let mut roster = Roster::configure(
        dir,
        &url_placeholder,
        &format!(
            "agents:\n  file: {}\n  avatar: none\n{extra_yaml}",
            agents_file.display()
        ),
    );
    for extra in registration_files(&roster.registration).iter().skip(1) {
        std::fs::remove_file(extra).unwrap();
    }
    let fake = FakeHomeserver::start(&roster.as_token, SERVER_NAME, "letta").await;
    roster.env("ROSTER_HOMESERVER__URL", &fake.url);
    roster.env("ROSTER_LOG", "info");
    let started = Instant::now();
    roster.start().await;
    eventually(
        Duration::from_secs(1800),
        &format!("{agents} agents provisioned on the stand-in"),
        || async {
            let status = roster.status().await;
            (status["rooms"] == agents && status["pending"] == 0 && status["running"] == 0)
                .then_some(())
        },
    )
    .await;
    let provision_time = started.elapsed();
    let rooms = {
        let world = fake.world();
        (0..agents)
            .map(|i| {
                let localpart = roster::ids::agent_localpart(&format!("agent-{i:05x}-bench"))
                    .expect("a valid agent id");
                world
                    .aliases
                    .get(&format!("#{localpart}:{SERVER_NAME}"))
                    .unwrap_or_else(|| panic!("the stand-in has no room for {localpart}"))
                    .clone()
            })
            .collect()
    };
    Provisioned {
        roster,
        fake,
        rooms,
        provision_time,
    }
}

/// A member event as Synapse pushes it (full client format, `unsigned.age`).
pub fn synapse_member_event(room: &str, user: &str, n: usize) -> Value {
    json!({
        "type": "m.room.member",
        "room_id": room,
        "sender": user,
        "state_key": user,
        "content": { "membership": "join", "displayname": format!("Person {n}") },
        "event_id": format!("$bench{n:08}-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789ab"),
        "origin_server_ts": 1_700_000_000_000u64 + n as u64,
        "unsigned": { "age": 12 },
    })
}

/// `transactions` bodies of `per_txn` member events each; event `n` joins `@person_<n>` to
/// `rooms[n % rooms.len()]`, so every event is a new membership.
pub fn member_transactions(rooms: &[String], transactions: usize, per_txn: usize) -> Vec<Vec<u8>> {
    (0..transactions)
        .map(|t| {
            let events: Vec<Value> = (0..per_txn)
                .map(|k| {
                    let n = t * per_txn + k;
                    let user = format!("@person_{n}:{SERVER_NAME}");
                    synapse_member_event(&rooms[n % rooms.len()], &user, n)
                })
                .collect();
            serde_json::to_vec(&json!({ "events": events, "ephemeral": [] })).unwrap()
        })
        .collect()
}

/// PUTs each body to `base`'s transaction endpoint in order, one at a time, as a homeserver
/// does, with ids `<prefix>-<index>`; every answer must be 200. Returns the wall time.
pub async fn feed(
    http: &reqwest::Client,
    base: &str,
    hs_token: &str,
    prefix: &str,
    bodies: &[Vec<u8>],
    mut after_each: impl FnMut(usize),
) -> Duration {
    let started = Instant::now();
    for (i, body) in bodies.iter().enumerate() {
        let response = http
            .put(format!("{base}/_matrix/app/v1/transactions/{prefix}-{i}"))
            .bearer_auth(hs_token)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("transaction {i} to {base}: {e}"));
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(status.is_success(), "transaction {i} to {base}: {status} {text}");
        after_each(i);
    }
    started.elapsed()
}

/// A `/proc/<pid>/status` field in bytes (`VmRSS`, `VmHWM`).
pub fn proc_memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        * 1024
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The size of roster's store: the database and its WAL.
pub fn store_bytes(roster: &Roster) -> u64 {
    ["roster.db", "roster.db-wal"]
        .iter()
        .map(|f| std::fs::metadata(roster.dir.join(f)).map_or(0, |m| m.len()))
        .sum()
}

/// The machine and its load, printed under every table.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!("{cores} cores, load average {}", load.join(" "))
}
