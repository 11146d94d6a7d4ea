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
    let mut numbers = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse::<u64>().ok());
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

    // Manual full syncs: the first records the memberships the stand-in never pushed (a real
    // homeserver pushes the joins that follow createRoom), so every room drifts; the second
    // is the steady state.
    let mut manual = Vec::new();
    for _ in 0..2 {
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
        assert_eq!(status, 200, "manual sync: {summary}");
        let wall = started.elapsed();
        let peak = proxy.peak_reads.load(Ordering::SeqCst);
        let span = proxy.read_span();
        let mean = proxy.mean_read();
        manual.push((wall, summary, span, mean, proxy.reset(), peak));
    }

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
    // Push the kick once the start-up sweep is a tenth through its reads.
    eventually(
        Duration::from_secs(600),
        "the start-up sweep to read a tenth of the rooms",
        || async { (proxy.reads.load(Ordering::SeqCst) as usize > rooms / 10).then_some(()) },
    )
    .await;
    let reads_at_kick = proxy.reads.load(Ordering::SeqCst);
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
            status["last_sync"]
                .is_object()
                .then(|| status["last_sync"].clone())
        },
    )
    .await;
    let startup_wall = started.elapsed();
    let startup_peak = proxy.peak_reads.load(Ordering::SeqCst);
    let startup_span = proxy.read_span();
    let startup_mean = proxy.mean_read();
    let startup_reads = proxy.reads.load(Ordering::SeqCst);

    println!(
        "Sweep of {rooms} agent rooms (+ the space) against the in-process stand-in homeserver; every joined_members read held {} ms by a proxy; roster's homeserver.max_concurrent_requests = {max_concurrent}",
        latency.as_millis()
    );
    println!();
    println!(
        "| sync | wall time | of it, first read to last answer | rooms read | rooms drifted | reads seen by the stand-in | peak concurrent reads | reads/s while reading | mean read at the stand-in |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let labels = [
        "first manual full sync (records what the stand-in never pushed)",
        "second manual full sync (steady state)",
    ];
    for (label, (wall, summary, span, mean, reads, peak)) in labels.iter().zip(&manual) {
        println!(
            "| {label} | {:.1} s | {:.1} s | {} | {} | {reads} | {peak} | {:.0} | {:.1} ms |",
            wall.as_secs_f64(),
            span.as_secs_f64(),
            summary["rooms_read"],
            summary["drift"],
            *reads as f64 / span.as_secs_f64(),
            mean.as_secs_f64() * 1000.0
        );
    }
    println!(
        "| start-up sync after a restart (process start to summary) | {:.1} s | {:.1} s | {} | {} | {startup_reads} | {startup_peak} | {:.0} | {:.1} ms |",
        startup_wall.as_secs_f64(),
        startup_span.as_secs_f64(),
        startup["rooms_read"],
        startup["drift"],
        startup_reads as f64 / startup_span.as_secs_f64(),
        startup_mean.as_secs_f64() * 1000.0
    );
    println!();
    println!(
        "A kick of the bot pushed when the start-up sweep had read {reads_at_kick} rooms was repaired (bot rejoined) {:.2} s later, at {reads_at_repair} of {startup_reads} reads.",
        repair.as_secs_f64(),
    );
    println!(
        "Setup (not part of the sweep): {rooms} agents provisioned in {:.0} s. Machine: {}",
        provision_time.as_secs_f64(),
        machine()
    );
}
