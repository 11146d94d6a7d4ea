//! No token reaches a log: roster and a real Synapse go through a typical day (start-up,
//! provisioning, a transaction with a wrong token, the legacy `access_token` parameter,
//! status, a sync, a restart), then every log file either of them wrote is read and must
//! hold none of the tokens in play.

mod support;

use std::path::{Path, PathBuf};

use support::{Roster, Scratch, Synapse, free_port, member_event};

/// Every file under `dir` whose name ends in `.log` (Synapse's `homeserver.log` and
/// `stdout.log`, one `roster-N.log` per start).
fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "log") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

#[tokio::test]
async fn no_token_appears_in_any_log_of_roster_or_synapse() {
    let scratch = Scratch::new("no-tokens");
    let hs_port = free_port();
    let agents_file = scratch.path().join("agents.yaml");
    std::fs::write(&agents_file, "- {id: agent-tok, name: \"Agent Tok\"}\n").unwrap();
    let mut roster = Roster::configure(
        scratch.path(),
        &format!("http://127.0.0.1:{hs_port}"),
        &format!("agents:\n  file: {}\n", agents_file.display()),
    );
    let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
    let synapse_admin = synapse.admin_token("admin");
    roster.start().await;
    roster.wait_pinged().await;
    roster.wait_converged(1).await;
    let (code, found) = synapse
        .call(
            reqwest::Method::GET,
            "/_matrix/client/v3/directory/room/%23agent_tok:roster.test",
            &synapse_admin,
            None,
        )
        .await;
    assert_eq!(code, 200, "the agent room has its alias: {found}");
    let room = found["room_id"].as_str().unwrap().to_owned();

    // A transaction with a wrong token, one with none, and the legacy query parameter with
    // the wrong and then the right token: the right one must not be logged from the URL.
    let event = member_event(
        &room,
        "@someone:roster.test",
        "@someone:roster.test",
        "join",
        1,
    );
    let body = serde_json::to_vec(&serde_json::json!({ "events": [event] })).unwrap();
    let path = "/_matrix/app/v1/transactions/no-tokens-1";
    let wrong = format!("{}-wrong", roster.hs_token);
    assert_eq!(
        roster.push_to(path, Some(&wrong), body.clone()).await.0,
        403
    );
    assert_eq!(roster.push_to(path, None, body.clone()).await.0, 401);
    let legacy = format!("{path}?access_token={}", roster.hs_token);
    assert_eq!(roster.push_to(&legacy, None, body.clone()).await.0, 200);
    assert_eq!(roster.transactions("forbidden").await, 1);
    assert_eq!(roster.transactions("unauthorized").await, 1);

    // The admin API with a wrong token and the right one; the CLI's status and sync.
    let (code, _) = roster
        .admin_call(reqwest::Method::GET, "/admin/v1/status", Some(&wrong), None)
        .await;
    assert_eq!(code, 403, "a wrong admin token is refused");
    let (ok, status_out, status_err) = roster.cli(&["status"]);
    assert!(ok, "roster status: {status_err}");
    let (ok, sync_out, sync_err) = roster.cli(&["sync", "--wait"]);
    assert!(ok, "roster sync: {sync_err}");

    // A restart: start-up logs the config it read (every secret in it must stay hidden).
    roster.stop();
    roster.start().await;
    roster.wait_pinged().await;
    roster.wait_converged(1).await;
    roster.stop();
    drop(synapse);

    let mut tokens: Vec<(&str, String)> = vec![
        ("as_token", roster.as_token.clone()),
        ("hs_token", roster.hs_token.clone()),
        ("roster admin token", roster.admin_token.clone()),
        ("Synapse admin's access token", synapse_admin.clone()),
    ];
    tokens.extend(
        roster
            .as_tokens()
            .into_iter()
            .map(|t| ("acting-only as_token", t)),
    );
    for (what, token) in &tokens {
        assert!(token.len() >= 16, "a short {what} proves nothing");
    }
    let files = log_files(scratch.path());
    let names: Vec<String> = files
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for expected in ["homeserver.log", "roster-1.log", "roster-2.log"] {
        assert!(
            names.iter().any(|n| n == expected),
            "no {expected} among {names:?}"
        );
    }
    // The logs saw the traffic: an empty or unrelated log cannot pass for a clean one.
    let synapse_log = std::fs::read_to_string(
        files
            .iter()
            .find(|f| f.ends_with("homeserver.log"))
            .unwrap(),
    )
    .unwrap();
    assert!(
        synapse_log.contains("user_id=%40agent_tok") || synapse_log.contains("user_id=@agent_tok"),
        "Synapse's log shows roster acting as the agent"
    );
    assert!(synapse_log.contains("/_synapse/admin/v1/register"));
    roster.assert_no_secrets_in_logs(&[&synapse_admin]);
    let mut scanned = 0;
    for file in &files {
        let text = String::from_utf8_lossy(&std::fs::read(file).unwrap()).into_owned();
        scanned += text.len();
        for (what, token) in &tokens {
            assert!(
                !text.contains(token.as_str()),
                "{} holds the {what}",
                file.display()
            );
        }
    }
    for (what, output) in [
        ("roster status", &status_out),
        ("roster sync", &sync_out),
        ("roster status", &status_err),
        ("roster sync", &sync_err),
    ] {
        for (secret, token) in &tokens {
            assert!(
                !output.contains(token.as_str()),
                "{what} printed the {secret}"
            );
        }
    }
    eprintln!(
        "scanned {} log files, {scanned} bytes: no token",
        files.len()
    );
}

/// The scan every `Roster` and `Synapse` of the suite runs on drop finds a token in a log
/// file in a subdirectory, and passes a log without one.
#[test]
fn the_log_scan_finds_a_token_in_a_nested_log_file() {
    let scratch = Scratch::new("log-scan");
    let nested = scratch.path().join("synapse");
    std::fs::create_dir_all(&nested).unwrap();
    std::fs::write(
        nested.join("homeserver.log"),
        "GET /x token=syt_leaked_0123\n",
    )
    .unwrap();
    std::fs::write(nested.join("notes.txt"), "syt_other_4567").unwrap();
    let secrets = |s: &str| vec![s.to_owned()];
    support::assert_no_secret_in_log_files(scratch.path(), &secrets("syt_other_4567"));
    let found = std::panic::catch_unwind(|| {
        support::assert_no_secret_in_log_files(scratch.path(), &secrets("syt_leaked_0123"))
    });
    assert!(
        found.is_err(),
        "a token in homeserver.log must fail the scan"
    );
}
