//! Transaction ingestion side by side (not a test): roster, a minimal mautrix-python
//! appservice and a minimal matrix-appservice-bridge appservice (benches/peers/), each fed
//! the same transactions over loopback one at a time, as a homeserver sends them. Run with
//! `deploy/bench.sh ingest` (it installs the peers' packages) or
//! `cargo bench --bench ingest -- [TRANSACTIONS [EVENTS_PER_TRANSACTION]]`.
//!
//! Each program runs alone, in turn. Every event is a new `m.room.member` join; for roster
//! the rooms are its managed agent rooms (provisioned first on the in-process stand-in
//! homeserver), so it records every one. "Done" is when the program has counted every
//! event: for roster that is the last 200 (it records before it answers); the peers
//! answer first and handle after, so their count is polled until complete.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use support::*;

const AGENTS: usize = 200;

struct Row {
    name: String,
    /// Member events counted when the run ended (all of them unless it gave up waiting).
    counted: u64,
    ack: Duration,
    done: Duration,
    idle_rss: u64,
    peak_rss: u64,
    durable: &'static str,
}

/// A peer appservice process, stopped on drop.
struct Peer {
    child: Child,
    base: String,
}

impl Peer {
    fn start(program: &Path, args: &[&str], env: &[(&str, &str)], dir: &Path, log: &str) -> Peer {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join(log)).unwrap();
        let mut command = Command::new(program);
        command
            .args(args)
            .arg(port.to_string())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Peer {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn count(&self, http: &reqwest::Client) -> Option<u64> {
        let body: Value = http
            .get(format!("{}/count", self.base))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        body["count"].as_u64()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cache_dir(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap())
            .join(".cache/roster")
            .join(default)
    })
}

/// The installed version of a Python distribution in `venv` (from its dist-info name).
fn python_version(venv: &Path, dist: &str) -> String {
    let lib = venv.join("lib");
    std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|py| {
            std::fs::read_dir(py.path().join("site-packages"))
                .into_iter()
                .flatten()
                .flatten()
        })
        .find_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let rest = name.strip_prefix(&format!("{dist}-"))?;
            rest.strip_suffix(".dist-info").map(str::to_owned)
        })
        .unwrap_or_else(|| {
            panic!(
                "{dist} is not installed in {}; run deploy/bench.sh ingest",
                venv.display()
            )
        })
}

fn node_version(modules: &Path, package: &str) -> String {
    let manifest = modules.join(package).join("package.json");
    let text = std::fs::read_to_string(&manifest).unwrap_or_else(|e| {
        panic!(
            "{} is not installed ({e}); run deploy/bench.sh ingest",
            manifest.display()
        )
    });
    let json: Value = serde_json::from_str(&text).unwrap();
    json["version"].as_str().unwrap().to_owned()
}

/// Feeds `peer` and waits until it counted every event, or `patience` after the last
/// acknowledgement (then the row shows how far it got).
#[allow(clippy::too_many_arguments)]
async fn run_peer(
    name: String,
    peer: Peer,
    http: &reqwest::Client,
    hs_token: &str,
    bodies: &[Vec<u8>],
    expected: u64,
    patience: Duration,
    durable: &'static str,
) -> Row {
    eventually(
        Duration::from_secs(120),
        &format!("{name} to listen"),
        || async { peer.count(http).await },
    )
    .await;
    let pid = peer.child.id();
    let idle_rss = proc_memory(pid, "VmRSS");
    let started = Instant::now();
    let ack = feed(http, &peer.base, hs_token, "bench", bodies, |_| {}).await;
    let give_up = Instant::now() + patience;
    let counted = loop {
        let counted = peer.count(http).await.unwrap_or(0);
        if counted >= expected || Instant::now() > give_up {
            break counted;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let done = started.elapsed();
    assert!(
        counted <= expected,
        "{name} counted {counted} of {expected}: more than it was sent"
    );
    Row {
        name,
        counted,
        ack,
        done,
        idle_rss,
        peak_rss: proc_memory(pid, "VmHWM"),
        durable,
    }
}

#[tokio::main]
async fn main() {
    let mut numbers = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse::<usize>().ok());
    let transactions = numbers.next().unwrap_or(2_000);
    let per_txn = numbers.next().unwrap_or(50);
    let expected = (transactions * per_txn) as u64;
    let venv = cache_dir("BENCH_VENV", "bench-venv");
    let node_modules = cache_dir("BENCH_NODE", "bench-node").join("node_modules");
    let mautrix_version = python_version(&venv, "mautrix");
    let bridge_version = node_version(&node_modules, "matrix-appservice-bridge");
    let scratch = Scratch::new("bench-ingest");
    let http = reqwest::Client::new();
    let mut rows = Vec::new();

    // roster first: its agent rooms name the rooms every program is fed.
    let provisioned = provision(scratch.path(), AGENTS, "", std::time::Duration::ZERO).await;
    let bodies = member_transactions(&provisioned.rooms, transactions, per_txn);
    let roster = &provisioned.roster;
    let pid = roster.pid();
    let idle_rss = proc_memory(pid, "VmRSS");
    let before = roster.metric("roster_member_transitions_total", &[]).await;
    let wall = feed(
        &http,
        &roster.appservice_url(""),
        &roster.hs_token,
        "bench",
        &bodies,
        |_| {},
    )
    .await;
    let recorded = roster.metric("roster_member_transitions_total", &[]).await - before;
    assert_eq!(recorded, expected, "roster recorded every member event");
    rows.push(Row {
        name: format!("roster {}", env!("CARGO_PKG_VERSION")),
        counted: recorded,
        ack: wall,
        done: wall,
        idle_rss,
        peak_rss: proc_memory(pid, "VmHWM"),
        durable: "yes: SQLite commit (WAL, synchronous=FULL) before the 200",
    });
    drop(provisioned);

    // Throwaway tokens: the peers talk to nobody but this benchmark.
    let hs_token = format!("hs-{}", uuid_like());
    let as_token = format!("as-{}", uuid_like());
    let tokens = [
        ("HS_TOKEN", hs_token.as_str()),
        ("AS_TOKEN", as_token.as_str()),
    ];

    let peer = Peer::start(
        &venv.join("bin/python"),
        &[support::repo_root()
            .join("benches/peers/mautrix_counter.py")
            .to_str()
            .unwrap()],
        &tokens,
        &scratch.path().join("mautrix"),
        "mautrix.log",
    );
    rows.push(
        run_peer(
            format!("mautrix-python {mautrix_version}"),
            peer,
            &http,
            &hs_token,
            &bodies,
            expected,
            Duration::from_secs(600),
            "no: 200 before its handlers run (background tasks); txn ids in memory; state file saved at most every 60 s",
        )
        .await,
    );

    let node_path = node_modules.to_str().unwrap();
    for (mode, patience) in [("lean", 600), ("defaults", 120)] {
        let mut env = tokens.to_vec();
        env.push(("NODE_PATH", node_path));
        env.push(("BRIDGE_MODE", mode));
        let peer = Peer::start(
            Path::new("node"),
            &[support::repo_root()
                .join("benches/peers/bridge_counter.js")
                .to_str()
                .unwrap()],
            &env,
            &scratch.path().join(format!("bridge-{mode}")),
            "bridge.log",
        );
        let shape = if mode == "lean" {
            "no stores, no event queue"
        } else {
            "defaults: NeDB stores, single queue"
        };
        rows.push(
            run_peer(
                format!("matrix-appservice-bridge {bridge_version} ({shape})"),
                peer,
                &http,
                &hs_token,
                &bodies,
                expected,
                Duration::from_secs(patience),
                "no: 200 right after emitting the events; only the last txn id, in memory; stores are not written for events",
            )
            .await,
        );
    }

    println!(
        "Ingestion: {transactions} transactions x {per_txn} m.room.member events = {expected} events, PUT one at a time over loopback"
    );
    println!();
    println!(
        "| appservice | all acknowledged | all counted | events/s | idle RSS | peak RSS (VmHWM) | acknowledges after a durable write |"
    );
    println!("|---|---|---|---|---|---|---|");
    for row in &rows {
        let counted = if row.counted == expected {
            format!("{:.1} s", row.done.as_secs_f64())
        } else {
            format!(
                "gave up: {} of {expected} after {:.1} s",
                row.counted,
                row.done.as_secs_f64()
            )
        };
        println!(
            "| {} | {:.1} s | {counted} | {:.0} | {} | {} | {} |",
            row.name,
            row.ack.as_secs_f64(),
            row.counted as f64 / row.done.as_secs_f64(),
            mib(row.idle_rss),
            mib(row.peak_rss),
            row.durable
        );
    }
    println!();
    println!("Machine: {}", machine());
}
