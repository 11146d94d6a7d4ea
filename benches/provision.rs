//! Provisions N agents (default 200) from cold on a real Synapse and prints wall time and
//! homeserver requests per agent. Not a test: run with `deploy/bench.sh provision` or
//! `cargo bench --bench provision -- [N]`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;

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
    let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
    // @admin must exist: it is a required member of every room.
    let _admin_token = synapse.admin_token("admin");
    let started = Instant::now();
    roster.start().await;
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(3600), "agents provisioned", || async {
        let status: serde_json::Value = http
            .get(roster.admin_url("/admin/v1/status"))
            .bearer_auth(&roster.admin_token)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (status["rooms"] == n && status["pending"] == 0 && status["running"] == 0).then_some(())
    })
    .await;
    let wall = started.elapsed();
    let metrics = roster.metrics().await;
    let total = sum_samples(&metrics, "roster_homeserver_requests_total", &[]);
    println!("| agents | wall time | requests | requests/agent | agents/s | logins |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {n} | {:.1} s | {total} | {:.2} | {:.1} | {} |",
        wall.as_secs_f64(),
        total as f64 / n as f64,
        n as f64 / wall.as_secs_f64(),
        synapse.login_count().await
    );
    println!();
    println!("| endpoint | requests |");
    println!("|---|---|");
    let mut by_endpoint: Vec<(String, u64)> = metrics
        .lines()
        .filter(|l| l.starts_with("roster_homeserver_requests_total{"))
        .filter_map(|l| {
            let endpoint = l.split("endpoint=\"").nth(1)?.split('"').next()?.to_owned();
            let value = l.rsplit(' ').next()?.parse::<f64>().ok()? as u64;
            Some((endpoint, value))
        })
        .collect();
    by_endpoint.sort();
    by_endpoint.dedup_by(|a, b| {
        if a.0 == b.0 {
            b.1 += a.1;
            true
        } else {
            false
        }
    });
    for (endpoint, count) in by_endpoint {
        println!("| {endpoint} | {count} |");
    }
}
