//! A 10,000-room sweep (not a test): `deploy/bench.sh sweep` or
//! `cargo bench --bench sweep -- [ROOMS [READ_LATENCY_MS]]`.
//!
//! Against the in-process stand-in homeserver (`roster::testing::FakeHomeserver`), not
//! Synapse: Synapse here creates under 3 agent rooms a second (`deploy/bench.sh provision`:
//! 200 bare createRooms in 75 s), so 10,000 rooms would take over an hour before the sweep
//! could even start. Between roster and the stand-in sits
//! a small proxy that holds every `joined_members` read for a fixed latency (default 10 ms,
//! as a loaded homeserver might take) and counts the reads in flight, so the peak
//! concurrency roster allows is seen, not hidden by an instant answer.
//!
//! 1. roster provisions the rooms (not timed here: setup);
//! 2. a manual full sync (`POST /admin/v1/sync` with `wait`): wall time, rooms read, peak
//!    concurrent reads;
//! 3. a restart, whose start-up sync reads every room again; right after start, one agent
//!    room's bot is kicked on the stand-in and the kick is pushed to roster: how long the
//!    repair (the bot's rejoin) takes while the start-up reads run, and how many rooms the
//!    sweep had read by then.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "common/mod.rs"]
mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use support::*;

#[tokio::main]
async fn main() {
    let mut numbers = std::env::args().skip(1).filter_map(|a| a.parse::<u64>().ok());
    let rooms = numbers.next().unwrap_or(10_000) as usize;
    let latency = Duration::from_millis(numbers.next().unwrap_or(10));
    let scratch = Scratch::new("bench-sweep");
    let dir = scratch.path();

    let max_concurrent = roster::config::Config::from_yaml("homeserver: {server_name: x.org}")
        .unwrap()
        .homeserver
        .max_concurrent_requests;
    let provisioned = provision(dir, rooms, "", latency).await;
    let Provisioned {
        mut roster,
        fake,
        proxy,
        provision_time,
        ..
    } = provisioned;

    // A manual full sync.
    proxy.reset();
    let started = Instant::now();
    let (status, summary) = roster
        .admin_call(
            reqwest::Method::POST,
            "/admin/v1/sync",
            Some(&roster.admin_token),
            Some(json!({ "wait": true })),
        )
        .await;
    let manual_wall = started.elapsed();
    assert_eq!(status, 200, "manual sync: {summary}");
    let manual_peak = proxy.peak_reads.load(Ordering::SeqCst);
    let manual_reads = proxy.reset();

    // A restart: the start-up sync reads every room; a kick is pushed meanwhile.
    roster.stop();
    let victim = {
        let localpart =
            roster::ids::agent_localpart(&format!("agent-{:05x}-bench", rooms - 1)).unwrap();
        fake.world()
            .aliases
            .get(&format!("#{localpart}:{SERVER_NAME}"))
            .unwrap()
            .clone()
    };
    let bot = format!("@letta:{SERVER_NAME}");
    let started = Instant::now();
    roster.start().await;
    fake.world()
        .rooms
        .get_mut(&victim)
        .unwrap()
        .members
        .insert(bot.clone(), "leave".into());
    let kick = json!({ "events": [{
        "type": "m.room.member", "room_id": victim, "sender": format!("@person_kicker:{SERVER_NAME}"),
        "state_key": bot, "content": { "membership": "leave" },
        "event_id": format!("$kick{}", uuid_like()), "origin_server_ts": 1_800_000_000_000u64,
    }]});
    let pushed_at = Instant::now();
    let (code, body) = roster.push(&format!("kick-{}", uuid_like()), &kick).await;
    assert_eq!(code, 200, "the kick is acknowledged: {body}");
    let reads_at_repair = eventually(
        Duration::from_secs(600),
        "the kicked bot to be rejoined",
        || async {
            let joined = fake.world().rooms[&victim].membership(&bot) == Some("join");
            joined.then(|| proxy.reads.load(Ordering::SeqCst))
        },
    )
    .await;
    let repair = pushed_at.elapsed();
    let startup: Value = eventually(
        Duration::from_secs(3600),
        "the start-up sync to finish",
        || async {
            let status = roster.status().await;
            status["last_sync"].is_object().then(|| status["last_sync"].clone())
        },
    )
    .await;
    let startup_wall = started.elapsed();
    let startup_peak = proxy.peak_reads.load(Ordering::SeqCst);
    let startup_reads = proxy.reads.load(Ordering::SeqCst);

    println!(
        "Sweep of {rooms} agent rooms (+ the space) against the in-process stand-in homeserver; every joined_members read held {} ms by a proxy; roster's homeserver.max_concurrent_requests = {max_concurrent}",
        latency.as_millis()
    );
    println!();
    println!(
        "| sweep | wall time | rooms read (summary) | reads seen | peak concurrent reads | reads/s |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| manual full sync (POST /admin/v1/sync, wait) | {:.1} s | {} | {manual_reads} | {manual_peak} | {:.0} |",
        manual_wall.as_secs_f64(),
        summary["rooms_read"],
        manual_reads as f64 / manual_wall.as_secs_f64()
    );
    println!(
        "| start-up sync after a restart (process start to summary) | {:.1} s | {} | {startup_reads} | {startup_peak} | {:.0} |",
        startup_wall.as_secs_f64(),
        startup["rooms_read"],
        startup_reads as f64 / startup_wall.as_secs_f64()
    );
    println!();
    println!(
        "A kick pushed right after the restart was repaired (bot rejoined) in {:.2} s, when the start-up sweep had read {reads_at_repair} of {} rooms.",
        repair.as_secs_f64(),
        startup_reads
    );
    println!(
        "Setup (not part of the sweep): {rooms} agents provisioned in {:.0} s. Machine: {}",
        provision_time.as_secs_f64(),
        machine()
    );
}
