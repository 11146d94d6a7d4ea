//! A flood of member events for rooms roster does not manage (issue 8 item 4; not a test):
//! `deploy/bench.sh flood` or `cargo bench --bench flood -- [EVENTS]`.
//!
//! roster with 20 agents provisioned on the in-process stand-in homeserver is pushed
//! 150,000 `m.room.member` joins (50 per transaction, one transaction at a time) of users it
//! does not own into 1,000 rooms it does not manage. Every 10 % of the flood it prints
//! roster's RSS, its store's size (database + WAL) and the events it counted as unmanaged:
//! they should stay flat while the unmanaged count climbs.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use support::*;

const AGENTS: usize = 20;
const PER_TXN: usize = 50;
const ROOMS: usize = 1_000;

struct Sample {
    pushed: usize,
    rss: u64,
    store: u64,
    unmanaged: u64,
    recorded: u64,
}

async fn sample(roster: &Roster, pushed: usize) -> Sample {
    let pid = roster.pid();
    Sample {
        pushed,
        rss: proc_memory(pid, "VmRSS"),
        store: store_bytes(roster),
        unmanaged: roster.metric("roster_unmanaged_events_total", &[]).await,
        recorded: roster.metric("roster_member_transitions_total", &[]).await,
    }
}

#[tokio::main]
async fn main() {
    let events: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(150_000);
    let transactions = events.div_ceil(PER_TXN);
    let scratch = Scratch::new("bench-flood");
    let provisioned = provision(scratch.path(), AGENTS, "", std::time::Duration::ZERO).await;
    let roster = &provisioned.roster;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let bodies: Vec<Vec<u8>> = (0..transactions)
        .map(|t| {
            let events: Vec<Value> = (0..PER_TXN)
                .map(|k| {
                    let n = t * PER_TXN + k;
                    let room = format!("!flood{:06}xYzAbCdEf:{SERVER_NAME}", n % ROOMS);
                    synapse_member_event(&room, &format!("@person_{n}:{SERVER_NAME}"), n)
                })
                .collect();
            serde_json::to_vec(&json!({ "events": events })).unwrap()
        })
        .collect();
    let mut samples = vec![sample(roster, 0).await];
    let step = (transactions / 10).max(1);
    let http = reqwest::Client::new();
    let mut pushed = 0;
    for chunk in bodies.chunks(step) {
        let prefix = format!("flood{pushed}");
        feed(
            &http,
            &roster.appservice_url(""),
            &roster.hs_token,
            &prefix,
            chunk,
            |_| {},
        )
        .await;
        pushed += chunk.len() * PER_TXN;
        samples.push(sample(roster, pushed).await);
    }
    let pid = roster.pid();

    println!(
        "Flood: {events} member events for {ROOMS} unmanaged rooms, {PER_TXN} per transaction; roster manages {AGENTS} agent rooms"
    );
    println!();
    println!(
        "| events pushed | roster VmRSS | store (db + wal) | counted unmanaged | member changes recorded |"
    );
    println!("|---|---|---|---|---|");
    for s in &samples {
        println!(
            "| {} | {} | {} | {} | {} |",
            s.pushed,
            mib(s.rss),
            mib(s.store),
            s.unmanaged,
            s.recorded
        );
    }
    println!();
    println!(
        "Peak RSS (VmHWM): {}. Machine: {}",
        mib(proc_memory(pid, "VmHWM")),
        machine()
    );
}
