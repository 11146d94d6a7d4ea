//! Lifecycle benchmark (not a test): `cargo bench --bench lifecycle`.
//!
//! Prints two tables:
//! 1. throughput of decode -> model -> effects with the homeserver replaced by a local
//!    stand-in that answers at once (so roster alone is measured): in process, and end to
//!    end through a real tansu broker and the `roster` binary;
//! 2. produce -> effect latency on a real Synapse at 100 events/s, where "effect" is the
//!    moment roster logged the event applied, i.e. Synapse had answered the last request;
//! 3. no-op updates: 10,000 profile updates for 500 users where only `follower_count`
//!    changes, after one real update each (name and an `http` avatar): the homeserver
//!    requests and avatar fetches they cost, remembering what was applied and uploaded, and
//!    with that memory off (as roster was before). `cargo bench --bench lifecycle -- noop`
//!    prints this table alone.
//!
//! Needs the peers of the integration tests (installed by deploy/peers/*.sh on demand).
//! Bounded: every phase has a fixed event count and a deadline; all traffic is on 127.0.0.1.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use roster::config::Config;
use roster::lifecycle::effects::{Applied, IdentityEffects};
use roster::lifecycle::{Decoded, decode};
use roster::matrix::Homeserver;
use roster::model::identity::{EventPosition, PlanOptions};
use roster::retry::Outcome;
use roster::testing::FakeHomeserver;
use serde_json::{Value, json};
use support::*;

const TOPIC: &str = "nova.identity.events";
const DLQ: &str = "nova.identity.events.dlq";
const IN_PROCESS_EVENTS: usize = 20_000;
const END_TO_END_EVENTS: usize = 20_000;
const LATENCY_RATE: u64 = 100;
const LATENCY_EVENTS: usize = 2_000;

fn uuid(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

/// A realistic mix in every accepted shape: created, profile updates (mxc avatars), and
/// deletions, as (key, event_type header, payload).
fn events(count: usize, users: usize) -> Vec<(String, Option<&'static str>, Vec<u8>)> {
    (0..count)
        .map(|i| {
            let id = uuid(i % users);
            let (round, rounds) = (i / users, count.div_ceil(users));
            let (event_type, data) = match round {
                0 => ("UserCreatedEvent", json!({ "user_id": id, "username": format!("u{i}"), "email": "x@example.org" })),
                r if r + 1 == rounds => ("identity.user.deleted", json!({ "user_id": id, "soft_delete": true })),
                _ => (
                    "UserProfileUpdatedEvent",
                    json!({ "user_id": id, "username": "u", "display_name": format!("name {i}"),
                            "avatar_url": "mxc://bench.test/avatar", "is_verified": false, "follower_count": 1 }),
                ),
            };
            let body: Value = if i % 2 == 0 {
                json!({ "event_id": i.to_string(), "timestamp": "t", "schema_version": "1", "source": "bench",
                        "correlation_id": "c", "data": data })
            } else {
                data
            };
            let header = (i % 3 != 0).then_some(event_type);
            let body = if header.is_none() {
                let mut b = body;
                b["event_type"] = json!(event_type);
                b
            } else {
                body
            };
            (id, header, serde_json::to_vec(&body).unwrap())
        })
        .collect()
}

struct Row {
    stage: String,
    events: usize,
    seconds: f64,
}

async fn in_process() -> Vec<Row> {
    let placeholder = roster::testing::shared(
        Config::from_yaml("homeserver: {server_name: bench.test}").unwrap(),
    );
    let as_token = placeholder.registration.as_token.clone();
    let fake = FakeHomeserver::start(&as_token, "bench.test", "letta").await;
    let config = Config::from_yaml(&format!(
        "homeserver: {{server_name: bench.test, url: '{}', flavor: synapse, max_concurrent_requests: 64}}",
        fake.url
    ))
    .unwrap();
    let shared = roster::testing::shared(config);
    let metrics = shared.metrics.clone();
    let options = PlanOptions {
        create_missing_users: true,
    };
    let input = events(IN_PROCESS_EVENTS, 1_000);

    // decode + plan only: roster's own CPU per event.
    let started = Instant::now();
    let mut planned = 0;
    for (_, header, payload) in &input {
        if let Ok(Decoded::Event(event)) = decode(header.map(str::as_bytes), Some(payload)) {
            let plan = shared.state.read(|m| {
                m.identities
                    .plan(&event, &shared.config.ids().server_name, options)
            });
            planned += plan.effects.len();
        }
    }
    let decode_plan = started.elapsed().as_secs_f64();
    assert!(planned > 0);

    // decode -> plan -> effects on the stand-in, one user at a time, 16 users at once
    // (lifecycle.max_in_flight_users default).
    let homeserver = Homeserver::new(
        &fake.url,
        roster::matrix::Tokens::single(roster::config::Secret::new(as_token)),
        Duration::from_secs(10),
        64,
        metrics,
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let effects = Arc::new(
        IdentityEffects::start(shared.clone(), homeserver, &shutdown)
            .await
            .unwrap()
            .unwrap(),
    );
    let with_effects = apply_updates(&shared, &effects, input).await;
    vec![
        Row {
            stage: "decode -> model (plan), in process".into(),
            events: IN_PROCESS_EVENTS,
            seconds: decode_plan,
        },
        Row {
            stage: "decode -> model -> effects on stand-in HS, in process, 16 users in flight"
                .into(),
            events: IN_PROCESS_EVENTS,
            seconds: with_effects,
        },
    ]
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp as tracing writes it.
fn parse_timestamp(text: &str) -> f64 {
    let (date, time) = text.trim_end_matches('Z').split_once('T').unwrap();
    let mut d = date.split('-').map(|x| x.parse::<i64>().unwrap());
    let (y, m, day) = (d.next().unwrap(), d.next().unwrap(), d.next().unwrap());
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut t = time.split(':');
    let (h, min) = (
        t.next().unwrap().parse::<f64>().unwrap(),
        t.next().unwrap().parse::<f64>().unwrap(),
    );
    let s: f64 = t.next().unwrap().parse().unwrap();
    days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s
}

/// `(partition, offset) -> applied at` from roster's JSON log.
fn applied_times(log: &str) -> std::collections::HashMap<(i64, i64), f64> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|v| v["fields"]["message"] == "lifecycle event applied")
        .map(|v| {
            let f = &v["fields"];
            (
                (
                    f["partition"].as_i64().unwrap(),
                    f["offset"].as_i64().unwrap(),
                ),
                parse_timestamp(v["timestamp"].as_str().unwrap()),
            )
        })
        .collect()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `END_TO_END_EVENTS` events for `users` users produced before roster starts, then
/// consumed through the broker. With few users a user's updates wait together and the
/// newest supersedes the others; with one event per user every event is applied.
async fn end_to_end(users: usize) -> Row {
    let scratch = Scratch::new("bench-e2e");
    let tansu = Tansu::start(scratch.path(), 3, &[TOPIC, DLQ]).await;
    let mut roster = Roster::configure(
        scratch.path(),
        "http://127.0.0.1:9",
        &tansu.lifecycle_yaml(TOPIC, "bench", ""),
    );
    let fake = FakeHomeserver::start(&roster.as_token, SERVER_NAME, "letta").await;
    // The acting-only registration's token acts as the @nova- users.
    for token in roster.as_tokens() {
        fake.accept_token(&token);
    }
    roster.env("ROSTER_HOMESERVER__URL", &fake.url);
    roster.env("ROSTER_HOMESERVER__FLAVOR", "synapse");
    roster.env("ROSTER_LOG", "info");
    roster.env("ROSTER_LOG_FORMAT", "json");
    let input = events(END_TO_END_EVENTS, users);
    let sends = input.iter().map(|(key, header, payload)| {
        let headers: Vec<(&str, &str)> = header.map(|h| ("event_type", h)).into_iter().collect();
        let tansu = &tansu;
        async move {
            tansu
                .produce(TOPIC, None, Some(key), &headers, payload)
                .await
        }
    });
    let produced: Vec<(i32, i64)> = futures::stream::iter(sends)
        .buffer_unordered(256)
        .collect()
        .await;
    roster.start().await;
    // Every event ends with an outcome counted once: applied, unchanged, superseded by a
    // newer update of the same user (coalesced), ... Done when all are counted.
    let deadline = Instant::now() + Duration::from_secs(300);
    let (done_at, metrics) = loop {
        let metrics = roster.metrics().await;
        let counted = sum_samples(&metrics, "roster_lifecycle_events_total", &[]);
        if counted >= produced.len() as u64 || Instant::now() > deadline {
            break (now(), metrics);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let outcome = |o: &str| {
        sum_samples(
            &metrics,
            "roster_lifecycle_events_total",
            &[&format!("outcome=\"{o}\"")],
        )
    };
    let counted = sum_samples(&metrics, "roster_lifecycle_events_total", &[]);
    assert_eq!(
        counted,
        produced.len() as u64,
        "every event has its outcome"
    );
    // From the moment roster was given the partitions: the group join is the broker's.
    let log = std::fs::read_to_string(roster.dir.join("roster-1.log")).unwrap();
    let assigned_at = log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|v| v["fields"]["message"] == "lifecycle partitions assigned")
        .map(|v| parse_timestamp(v["timestamp"].as_str().unwrap()))
        .expect("roster logs the assignment");
    Row {
        stage: format!(
            "Kafka (tansu) -> roster binary -> stand-in HS, end to end, {users} users \
             ({} applied, {} superseded, {} unchanged)",
            outcome("applied"),
            outcome("superseded"),
            outcome("unchanged")
        ),
        events: produced.len(),
        seconds: done_at - assigned_at,
    }
}

struct Latency {
    target_rate: u64,
    events: usize,
    rate: f64,
    sustained: f64,
    p50: f64,
    p99: f64,
    max: f64,
}

/// Latency phases on one real Synapse: (events/s, events). The first is the rate the old
/// consumer was specified for (100/s);
/// the second shows the latency when Synapse keeps up.
const LATENCY_PHASES: [(u64, usize); 2] = [(LATENCY_RATE, LATENCY_EVENTS), (40, 800)];

async fn latency_on_synapse() -> Vec<Latency> {
    let scratch = Scratch::new("bench-latency");
    let tansu = Tansu::start(scratch.path(), 3, &[TOPIC, DLQ]).await;
    let hs_port = free_port();
    let mut roster = Roster::configure(
        scratch.path(),
        &format!("http://127.0.0.1:{hs_port}"),
        &tansu.lifecycle_yaml(TOPIC, "bench", ""),
    );
    let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
    roster.env("ROSTER_LOG", "info");
    roster.env("ROSTER_LOG_FORMAT", "json");
    roster.start().await;
    roster.wait_ready().await;
    let log_path = roster.dir.join("roster-1.log");
    let applied = || applied_times(&std::fs::read_to_string(&log_path).unwrap_or_default());
    const USERS: usize = 200;
    // Users exist first (created events, not measured).
    for n in 0..USERS {
        let body = json!({ "user_id": uuid(n), "username": format!("user{n}") });
        tansu
            .produce(
                TOPIC,
                None,
                Some(&uuid(n)),
                &[("event_type", "UserCreatedEvent")],
                &serde_json::to_vec(&body).unwrap(),
            )
            .await;
    }
    eventually(Duration::from_secs(120), "users created", || async {
        (applied().len() >= USERS).then_some(())
    })
    .await;

    let mut results = Vec::new();
    let mut serial = 0;
    for (target_rate, count) in LATENCY_PHASES {
        let mut sent = Vec::with_capacity(count);
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / target_rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let started = Instant::now();
        let first_send = now();
        for _ in 0..count {
            tick.tick().await;
            serial += 1;
            let id = uuid(serial % USERS);
            let body =
                json!({ "user_id": id, "username": "u", "display_name": format!("name {serial}") });
            let at = now();
            let where_ = tansu
                .produce(
                    TOPIC,
                    None,
                    Some(&id),
                    &[("event_type", "UserProfileUpdatedEvent")],
                    &serde_json::to_vec(&body).unwrap(),
                )
                .await;
            sent.push((where_, at));
        }
        let rate = count as f64 / started.elapsed().as_secs_f64();
        let times = eventually(Duration::from_secs(300), "every update applied", || async {
            let times = applied();
            sent.iter()
                .all(|(w, _)| times.contains_key(&(w.0 as i64, w.1)))
                .then_some(times)
        })
        .await;
        let mut latencies: Vec<f64> = sent
            .iter()
            .map(|((p, o), at)| (times[&(*p as i64, *o)] - at) * 1000.0)
            .collect();
        let last_applied = sent
            .iter()
            .map(|((p, o), _)| times[&(*p as i64, *o)])
            .fold(f64::MIN, f64::max);
        latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let pick = |q: f64| {
            latencies[((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1]
        };
        results.push(Latency {
            target_rate,
            events: latencies.len(),
            rate,
            sustained: count as f64 / (last_applied - first_send),
            p50: pick(0.50),
            p99: pick(0.99),
            max: *latencies.last().unwrap(),
        });
    }
    assert_eq!(synapse.login_count().await, 0);
    results
}

const NOOP_USERS: usize = 500;
const NOOP_UPDATES: usize = 10_000;
const NOOP_PICTURES: usize = 50;

struct NoopRow {
    stage: String,
    updates: usize,
    requests: u64,
    fetches: usize,
    seconds: f64,
}

/// Serves a picture of its own at each path on 127.0.0.1 (a PNG header, then the path)
/// and counts the requests.
async fn picture_server() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0";
    let fetched = Arc::new(AtomicUsize::new(0));
    let counter = fetched.clone();
    let app = axum::Router::new().route(
        "/{name}",
        axum::routing::get(
            move |axum::extract::Path(name): axum::extract::Path<String>| {
                counter.fetch_add(1, Ordering::SeqCst);
                let picture = [PNG, name.as_bytes()].concat();
                async { ([("content-type", "image/png")], picture) }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), fetched)
}

/// Applies `events` (user key, event type header, payload) in process, one user at a
/// time in order, 16 users at once (`lifecycle.max_in_flight_users`); returns how long it
/// took.
async fn apply_updates(
    shared: &Arc<roster::Shared>,
    effects: &Arc<IdentityEffects>,
    events: Vec<(String, Option<&'static str>, Vec<u8>)>,
) -> f64 {
    let options = PlanOptions {
        create_missing_users: true,
    };
    type Chain = Vec<(Option<&'static str>, Vec<u8>)>;
    let mut per_user: std::collections::BTreeMap<String, Chain> = Default::default();
    for (user, header, payload) in events {
        per_user.entry(user).or_default().push((header, payload));
    }
    let started = Instant::now();
    futures::stream::iter(per_user.into_values())
        .for_each_concurrent(16, |chain| async move {
            for (header, payload) in chain {
                let Ok(decoded) = decode(header.map(str::as_bytes), Some(&payload)) else {
                    panic!("bench events decode");
                };
                let event = decoded.event().expect("an identity event");
                let plan = shared.state.read(|m| {
                    m.identities
                        .plan(event, &shared.config.ids().server_name, options)
                });
                let outcome = effects.apply(&plan, next_position()).await;
                assert!(
                    matches!(
                        outcome,
                        Outcome::Done(Applied::Taken(_) | Applied::Unchanged)
                    ),
                    "{outcome:?}"
                );
            }
        })
        .await;
    started.elapsed().as_secs_f64()
}

/// Where the next event sits: every call a later offset, as Kafka delivers a partition (a
/// user's events are applied in order, so each is later than the one applied before it; an
/// offset seen again would be a redelivery, which roster does not apply twice).
fn next_position() -> EventPosition {
    static NEXT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    EventPosition {
        partition: 0,
        offset: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    }
}

/// One real update per user, then `NOOP_UPDATES` that change only `follower_count`, on a
/// fresh stand-in homeserver; `remember: false` turns off what roster remembers.
async fn noop_updates(remember: bool) -> Vec<NoopRow> {
    use std::sync::atomic::Ordering;
    let placeholder = roster::testing::shared(
        Config::from_yaml("homeserver: {server_name: bench.test}").unwrap(),
    );
    let as_token = placeholder.registration.as_token.clone();
    let fake = FakeHomeserver::start(&as_token, "bench.test", "letta").await;
    let config = Config::from_yaml(&format!(
        // The pictures are served on loopback.
        "homeserver: {{server_name: bench.test, url: '{}', flavor: synapse, max_concurrent_requests: 64}}\n\
         lifecycle: {{avatar_allow_private: true}}",
        fake.url
    ))
    .unwrap();
    let shared = roster::testing::shared(config);
    let homeserver = Homeserver::new(
        &fake.url,
        roster::matrix::Tokens::single(roster::config::Secret::new(as_token)),
        Duration::from_secs(10),
        64,
        shared.metrics.clone(),
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let effects = IdentityEffects::start(shared.clone(), homeserver, &shutdown)
        .await
        .unwrap()
        .unwrap();
    let effects = Arc::new(if remember {
        effects
    } else {
        effects.without_memory()
    });
    let (pictures, fetched) = picture_server().await;
    let created = (0..NOOP_USERS)
        .map(|n| {
            let body = json!({ "user_id": uuid(n), "username": format!("user{n}") });
            (
                uuid(n),
                Some("UserCreatedEvent"),
                serde_json::to_vec(&body).unwrap(),
            )
        })
        .collect();
    apply_updates(&shared, &effects, created).await;
    let update = |n: usize, followers: usize| {
        let body = json!({ "user_id": uuid(n), "username": format!("user{n}"),
            "display_name": format!("User {n}"), "bio": "hi",
            "avatar_url": format!("{pictures}/pic{}.png", n % NOOP_PICTURES),
            "is_verified": false, "follower_count": followers, "updated_at": "t" });
        (
            uuid(n),
            Some("UserProfileUpdatedEvent"),
            serde_json::to_vec(&body).unwrap(),
        )
    };
    let memory = if remember {
        "remembering what was applied"
    } else {
        "memory off (as before)"
    };
    let mut rows = Vec::new();
    for (stage, updates) in [
        (
            format!(
                "one real update per user (name + http avatar, {NOOP_PICTURES} pictures), {memory}"
            ),
            (0..NOOP_USERS).map(|n| update(n, 0)).collect::<Vec<_>>(),
        ),
        (
            format!("{NOOP_UPDATES} follower_count-only updates, {memory}"),
            (0..NOOP_UPDATES)
                .map(|i| update(i % NOOP_USERS, i + 1))
                .collect(),
        ),
    ] {
        let (requests, fetches) = (
            shared.metrics.homeserver_requests_sent(),
            fetched.load(Ordering::SeqCst),
        );
        let count = updates.len();
        let seconds = apply_updates(&shared, &effects, updates).await;
        rows.push(NoopRow {
            stage,
            updates: count,
            requests: shared.metrics.homeserver_requests_sent() - requests,
            fetches: fetched.load(Ordering::SeqCst) - fetches,
            seconds,
        });
    }
    rows
}

fn print_throughput(rows: &[Row]) {
    println!();
    println!("| lifecycle throughput (homeserver: local stand-in) | events | seconds | events/s |");
    println!("|---|---:|---:|---:|");
    for row in rows {
        println!(
            "| {} | {} | {:.2} | {:.0} |",
            row.stage,
            row.events,
            row.seconds,
            row.events as f64 / row.seconds
        );
    }
}

fn print_noop(rows: &[NoopRow]) {
    println!();
    println!(
        "| lifecycle no-op updates ({NOOP_USERS} users, stand-in HS, in process) | updates | homeserver requests | avatar fetches | seconds |"
    );
    println!("|---|---:|---:|---:|---:|");
    for row in rows {
        println!(
            "| {} | {} | {} | {} | {:.2} |",
            row.stage, row.updates, row.requests, row.fetches, row.seconds
        );
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // `noop` or `throughput` runs that part alone.
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    runtime.block_on(async {
        if only.as_deref() == Some("throughput") {
            let mut rows = in_process().await;
            rows.push(end_to_end(2_000).await);
            rows.push(end_to_end(END_TO_END_EVENTS).await);
            print_throughput(&rows);
            return;
        }
        let mut noop = noop_updates(true).await;
        noop.extend(noop_updates(false).await);
        if only.as_deref() == Some("noop") {
            print_noop(&noop);
            return;
        }
        let mut rows = in_process().await;
        rows.push(end_to_end(2_000).await);
        rows.push(end_to_end(END_TO_END_EVENTS).await);
        let latency = latency_on_synapse().await;
        print_throughput(&rows);
        println!();
        println!(
            "| produce -> effect on real Synapse (display-name updates, 200 users) | events | produced/s | applied/s | p50 ms | p99 ms | max ms |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for l in &latency {
            println!(
                "| at {} events/s | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                l.target_rate, l.events, l.rate, l.sustained, l.p50, l.p99, l.max
            );
        }
        print_noop(&noop);
    });
}
