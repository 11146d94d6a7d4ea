//! A 10,000-room sweep (not a test): `deploy/bench.sh sweep` or
//! `cargo bench --bench sweep -- [ROOMS [READ_LATENCY_MS]]`.
//!
//! Against the in-process stand-in homeserver (`roster::testing::FakeHomeserver`), not
//! Synapse: Synapse here creates about 6 agent rooms a second, so 10,000 rooms would take
//! about half an hour before the sweep could even start. Between roster and the stand-in sits
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

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use common::*;
use serde_json::{Value, json};
use support::*;

/// Forwards everything to the stand-in; holds `joined_members` reads for `latency`.
struct Proxy {
    target: String,
    http: reqwest::Client,
    latency: Duration,
    in_flight: AtomicU64,
    peak: AtomicU64,
    reads: AtomicU64,
}

impl Proxy {
    /// Starts serving on 127.0.0.1; returns its URL.
    async fn start(self: &Arc<Self>) -> String {
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    /// Zeroes the peak and the read count; returns the reads counted so far.
    fn reset(&self) -> u64 {
        self.peak.store(0, Ordering::SeqCst);
        self.reads.swap(0, Ordering::SeqCst)
    }
}

async fn forward(
    State(proxy): State<Arc<Proxy>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let read = uri.path().ends_with("/joined_members");
    if read {
        let now = proxy.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        proxy.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(proxy.latency).await;
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = proxy
        .http
        .request(method, format!("{}{path}", proxy.target))
        .body(body);
    for name in ["authorization", "content-type"] {
        if let Some(value) = headers.get(name) {
            request = request.header(name, value);
        }
    }
    let answer = match request.send().await {
        Ok(response) => {
            let status = response.status();
            let kind = response.headers().get("content-type").cloned();
            let bytes = response.bytes().await.unwrap_or_default();
            let mut out = (status, bytes).into_response();
            if let Some(kind) = kind {
                out.headers_mut().insert("content-type", kind);
            }
            out
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    if read {
        proxy.in_flight.fetch_sub(1, Ordering::SeqCst);
        proxy.reads.fetch_add(1, Ordering::SeqCst);
    }
    answer
}

#[tokio::main]
async fn main() {
    let mut numbers = std::env::args().skip(1).filter_map(|a| a.parse::<u64>().ok());
    let rooms = numbers.next().unwrap_or(10_000) as usize;
    let latency = Duration::from_millis(numbers.next().unwrap_or(10));
    let scratch = Scratch::new("bench-sweep");
    let dir = scratch.path();

    // The same setup as `common::provision`, with the proxy in front of the stand-in.
    let agents_file = dir.join("agents.yaml");
    let listing: String = (0..rooms)
        .map(|i| format!("- {{id: agent-{i:05x}-bench, name: \"Bench agent {i}\"}}\n"))
        .collect();
    std::fs::write(&agents_file, listing).unwrap();
    let mut roster = Roster::configure(
        dir,
        &nowhere(),
        &format!("agents:\n  file: {}\n  avatar: none\n", agents_file.display()),
    );
    for extra in registration_files(&roster.registration).iter().skip(1) {
        std::fs::remove_file(extra).unwrap();
    }
    let fake = roster::testing::FakeHomeserver::start(&roster.as_token, SERVER_NAME, "letta").await;
    let proxy = Arc::new(Proxy {
        target: fake.url.clone(),
        http: reqwest::Client::new(),
        latency,
        in_flight: AtomicU64::new(0),
        peak: AtomicU64::new(0),
        reads: AtomicU64::new(0),
    });
    let proxy_url = proxy.start().await;
    roster.env("ROSTER_HOMESERVER__URL", &proxy_url);
    roster.env("ROSTER_LOG", "info");
    let max_concurrent = roster::config::Config::load(
        &roster.config,
        true,
        &std::collections::BTreeMap::new(),
    )
    .unwrap()
    .homeserver
    .max_concurrent_requests;

    let started = Instant::now();
    roster.start().await;
    eventually(
        Duration::from_secs(3600),
        &format!("{rooms} agents provisioned"),
        || async {
            let status = roster.status().await;
            (status["rooms"] == rooms
                && status["pending"] == 0
                && status["running"] == 0
                && status["last_sync"].is_object())
            .then_some(())
        },
    )
    .await;
    let provision_time = started.elapsed();

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
    let manual_peak = proxy.peak.load(Ordering::SeqCst);
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
    let startup_peak = proxy.peak.load(Ordering::SeqCst);
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
