//! What the ingestion, memory, flood and sweep benchmarks share: roster (the binary) with N
//! agents provisioned against the in-process stand-in homeserver (`roster::testing`), the
//! transactions fed to it, and memory read from `/proc`.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use roster::testing::FakeHomeserver;
use serde_json::{Value, json};

use crate::support::*;

/// Sits between roster and the stand-in homeserver: `joined_members` reads are held for
/// `read_latency` (as a loaded homeserver takes) and counted, with the most in flight at once.
pub struct Proxy {
    target: String,
    http: reqwest::Client,
    pub read_latency: Duration,
    in_flight: AtomicU64,
    pub peak_reads: AtomicU64,
    pub reads: AtomicU64,
    /// Microseconds reads spent at the proxy and the stand-in, summed.
    read_micros: AtomicU64,
    /// When the first read since the last reset arrived and the last one was answered.
    read_span: std::sync::Mutex<Option<(Instant, Instant)>>,
}

impl Proxy {
    async fn start(self) -> (Arc<Proxy>, String) {
        let proxy = Arc::new(self);
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(proxy.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (proxy, url)
    }

    /// Zeroes the peak and the read count; returns the reads counted so far.
    pub fn reset(&self) -> u64 {
        self.peak_reads.store(0, Ordering::SeqCst);
        *self.read_span.lock().unwrap() = None;
        self.read_micros.store(0, Ordering::SeqCst);
        self.reads.swap(0, Ordering::SeqCst)
    }

    /// The mean time a read spent at the proxy and the stand-in since the last reset.
    pub fn mean_read(&self) -> Duration {
        let reads = self.reads.load(Ordering::SeqCst).max(1);
        Duration::from_micros(self.read_micros.load(Ordering::SeqCst) / reads)
    }

    /// From the first read's arrival to the last read's answer, since the last reset.
    pub fn read_span(&self) -> Duration {
        self.read_span
            .lock()
            .unwrap()
            .map_or(Duration::ZERO, |(first, last)| last - first)
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
    let arrived = Instant::now();
    if read {
        let now = proxy.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        proxy.peak_reads.fetch_max(now, Ordering::SeqCst);
        if !proxy.read_latency.is_zero() {
            tokio::time::sleep(proxy.read_latency).await;
        }
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = proxy
        .http
        .request(method, format!("{}{path}", proxy.target))
        .body(body);
    if let Some(kind) = headers.get("content-type") {
        request = request.header("content-type", kind);
    }
    if let Some(token) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        request = request.bearer_auth(token);
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
        proxy
            .read_micros
            .fetch_add(arrived.elapsed().as_micros() as u64, Ordering::SeqCst);
        let mut span = proxy.read_span.lock().unwrap();
        let first = span.map_or(arrived, |(first, _)| first.min(arrived));
        *span = Some((first, Instant::now()));
    }
    answer
}

/// roster with `agents` agents provisioned on the stand-in, converged.
pub struct Provisioned {
    pub roster: Roster,
    pub fake: FakeHomeserver,
    pub proxy: Arc<Proxy>,
    /// Every agent room, in agent order.
    pub rooms: Vec<String>,
    pub provision_time: Duration,
}

/// Configures and starts roster against the stand-in homeserver with `agents` agents (no
/// avatars), at log level info (debug logs every membership change, as production does not),
/// and waits until every room exists, nothing is pending and the start-up sync finished.
/// `extra_yaml` is appended to the config; roster reaches the stand-in through a [`Proxy`]
/// holding reads for `read_latency`.
pub async fn provision(
    dir: &Path,
    agents: usize,
    extra_yaml: &str,
    read_latency: Duration,
) -> Provisioned {
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
    let fake = FakeHomeserver::start(&roster.as_token, SERVER_NAME, "letta").await;
    // The acting-only registration's token acts as @admin.
    for token in roster.as_tokens() {
        fake.accept_token(&token);
    }
    // @admin exists on a real homeserver before roster starts (it is a person).
    let registered = reqwest::Client::new()
        .post(format!("{}/_matrix/client/v3/register", fake.url))
        .bearer_auth(&roster.as_token)
        .json(&json!({ "type": "m.login.application_service", "username": "admin" }))
        .send()
        .await
        .expect("the stand-in answers");
    assert!(
        registered.status().is_success(),
        "register @admin on the stand-in"
    );
    let (proxy, proxy_url) = Proxy {
        target: fake.url.clone(),
        http: reqwest::Client::new(),
        read_latency,
        in_flight: AtomicU64::new(0),
        peak_reads: AtomicU64::new(0),
        reads: AtomicU64::new(0),
        read_micros: AtomicU64::new(0),
        read_span: std::sync::Mutex::new(None),
    }
    .start()
    .await;
    roster.env("ROSTER_HOMESERVER__URL", &proxy_url);
    roster.env("ROSTER_LOG", "info");
    let started = Instant::now();
    roster.start().await;
    eventually(
        Duration::from_secs(1800),
        &format!("{agents} agents provisioned on the stand-in"),
        || async {
            let status = roster.status().await;
            (status["rooms"] == agents
                && status["pending"] == 0
                && status["running"] == 0
                && status["last_sync"].is_object())
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
        proxy,
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
        assert!(
            status.is_success(),
            "transaction {i} to {base}: {status} {text}"
        );
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
