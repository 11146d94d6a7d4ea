//! Issue 9's traps as an operator meets them, through the real `roster` binary:
//! `check-config` names each one in one line and fails; `serve` refuses to start on them with
//! one line; `registration` refuses an address the homeserver cannot reach and warns when it
//! writes somewhere `serve` does not read; secrets from the environment arrive verbatim; and
//! `/ready` does not wait for a real Synapse that cannot reach roster yet.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use support::features::*;
use support::*;

/// Runs `roster args` with extra environment; returns (success, stdout, stderr). Bounded:
/// a command still running after 60 s is killed and fails the test.
fn run(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_roster"));
    command
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("run roster");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("roster {args:?} still running after 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A copy of `roster`'s config named `name`, edited by `edit`.
fn variant(roster: &Roster, name: &str, edit: impl FnOnce(String) -> String) -> PathBuf {
    let path = roster.dir.join(format!("config-{name}.yaml"));
    std::fs::write(
        &path,
        edit(std::fs::read_to_string(&roster.config).unwrap()),
    )
    .unwrap();
    path
}

/// Copies roster's registration pair into `dir` (mode kept), editing each file's YAML;
/// returns the pushed one's path.
fn registration_copy(roster: &Roster, dir: &str, edit: impl Fn(usize, &mut Value)) -> PathBuf {
    let target = roster.dir.join(dir);
    std::fs::create_dir_all(&target).unwrap();
    for (n, file) in registration_files(&roster.registration).iter().enumerate() {
        let mut yaml: Value =
            serde_yaml::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        edit(n, &mut yaml);
        let copy = target.join(file.file_name().unwrap());
        std::fs::write(&copy, serde_yaml::to_string(&yaml).unwrap()).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    target.join(roster.registration.file_name().unwrap())
}

/// A config whose `appservice.registration` is `registration`.
fn with_registration(roster: &Roster, name: &str, registration: &Path) -> PathBuf {
    let from = format!("registration: {}", roster.registration.display());
    variant(roster, name, |c| {
        assert!(c.contains(&from));
        c.replace(&from, &format!("registration: {}", registration.display()))
    })
}

/// `check-config` on `config` fails, and one line of its report starts with `prefix` and
/// holds every one of `needles`; `serve` then refuses to start, with that problem (or the
/// one `check-config` lists first) as its one-line reason. Returns check-config's problems.
fn assert_trap(config: &Path, prefix: &str, needles: &[&str]) -> Vec<String> {
    let (ok, stdout, stderr) = run(&["check-config", "-c", path_str(config)], &[]);
    assert!(!ok, "check-config passed {}: {stdout}", config.display());
    let lines: Vec<String> = stderr.lines().map(str::to_owned).collect();
    let (summary, problems) = lines.split_last().expect("check-config says why");
    assert!(
        summary.starts_with("roster: ")
            && summary
                .ends_with("problem(s) in the configuration; fix them and run check-config again"),
        "{stderr}"
    );
    assert_eq!(
        summary,
        &format!(
            "roster: {} problem(s) in the configuration; fix them and run check-config again",
            problems.len()
        )
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with(prefix) && needles.iter().all(|n| p.contains(n))),
        "no line starts with {prefix:?} and holds {needles:?}:\n{stderr}"
    );

    // serve runs the same checks first, and stops with one line.
    let (ok, _, stderr) = run(&["serve", "-c", path_str(config)], &[("ROSTER_LOG", "off")]);
    assert!(!ok, "serve started with {}", config.display());
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    let more = if problems.len() > 1 {
        format!(
            " (and {} more: run `roster check-config`)",
            problems.len() - 1
        )
    } else {
        String::new()
    };
    assert_eq!(lines[0], format!("roster: {}{more}", problems[0]));
    problems.to_vec()
}

#[tokio::test]
async fn check_config_names_each_trap_in_one_line_and_serve_refuses_to_start_on_it() {
    let scratch = Scratch::new("traps");
    let roster = Roster::configure(scratch.path(), &nowhere(), "");
    let config = path_str(&roster.config).to_owned();
    let (ok, stdout, stderr) = run(&["check-config", "-c", &config], &[]);
    assert!(ok, "the harness's config is sound: {stderr}");
    assert_eq!(
        stdout.trim(),
        "ok: the config is valid; roster is registered with a pushed and an acting-only registration"
    );

    // Listening everywhere without saying how the homeserver gets there.
    let listen = format!("listen: 127.0.0.1:{}", roster.appservice_port);
    let everywhere = variant(&roster, "everywhere", |c| {
        c.replace(
            &listen,
            &format!("listen: 0.0.0.0:{}", roster.appservice_port),
        )
    });
    let problems = assert_trap(
        &everywhere,
        &format!(
            "appservice.url: not set while appservice.listen is 0.0.0.0:{}, which the homeserver cannot reach;",
            roster.appservice_port
        ),
        &["set it to how the homeserver reaches roster"],
    );
    assert!(
        problems[0].starts_with("appservice.url: "),
        "named first: {problems:?}"
    );
    // With appservice.url set, that trap is gone (the registration still names the old URL).
    let (_, _, stderr) = run(
        &["check-config", "-c", path_str(&everywhere)],
        &[(
            "ROSTER_APPSERVICE__URL",
            &format!("http://127.0.0.1:{}", roster.appservice_port),
        )],
    );
    assert!(!stderr.contains("appservice.url: not set"), "{stderr}");

    // A registration made for another homeserver: its namespaces do not match.
    let elsewhere = variant(&roster, "elsewhere", |c| {
        c.replace("server_name: roster.test", "server_name: other.test")
    });
    assert_trap(
        &elsewhere,
        &format!(
            "appservice.registration: {}: the namespaces lack ",
            roster.registration.display()
        ),
        &[
            "other\\.test",
            "regenerate with `roster registration --force`",
        ],
    );

    // Tokens that do not fit: a placeholder pasted in, and the acting registration reusing
    // the pushed registration's token.
    let placeholder = registration_copy(&roster, "placeholder", |n, yaml| {
        if n == 0 {
            yaml["as_token"] = json!("CHANGE_ME");
        }
    });
    assert_trap(
        &with_registration(&roster, "placeholder", &placeholder),
        &format!("appservice.registration: {}: ", placeholder.display()),
        &[
            "as_token and hs_token must be at least 32 characters",
            "regenerate",
        ],
    );
    let shared_token = registration_copy(&roster, "shared-token", |n, yaml| {
        if n == 1 {
            yaml["as_token"] = json!(roster.as_token);
        }
    });
    assert_trap(
        &with_registration(&roster, "shared-token", &shared_token),
        "appservice.acting_registration: ",
        &["id and as_token must differ from the pushed registration's"],
    );

    // No registration file at all, and one every user can read.
    let missing = roster.dir.join("nowhere/registration.yaml");
    assert_trap(
        &with_registration(&roster, "missing", &missing),
        &format!(
            "appservice.registration: cannot read registration {}: ",
            missing.display()
        ),
        &["generate one with `roster registration`"],
    );
    let readable = registration_copy(&roster, "readable", |_, _| {});
    std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_trap(
        &with_registration(&roster, "readable", &readable),
        &format!(
            "appservice.registration: {} is readable by every user (mode 644)",
            readable.display()
        ),
        &["chmod 600 it"],
    );

    // A store roster cannot create: its directory is a file (nobody can write there, root
    // included).
    let blocker = roster.dir.join("not-a-directory");
    std::fs::write(&blocker, "").unwrap();
    let store_from = format!("path: {}", roster.dir.join("roster.db").display());
    let unwritable = variant(&roster, "store", |c| {
        assert!(c.contains(&store_from));
        c.replace(
            &store_from,
            &format!("path: {}", blocker.join("roster.db").display()),
        )
    });
    assert_trap(
        &unwritable,
        &format!("store.path: cannot create files in {}", blocker.display()),
        &["make the directory writable by roster's user"],
    );
    drop(scratch);
}

#[tokio::test]
async fn registration_refuses_an_unreachable_url_and_warns_when_serve_reads_elsewhere() {
    let scratch = Scratch::new("registration-cli");
    let roster = Roster::configure(scratch.path(), &nowhere(), "");
    let fresh = roster.dir.join("fresh/registration.yaml");
    std::fs::create_dir_all(fresh.parent().unwrap()).unwrap();
    let listen = format!("listen: 127.0.0.1:{}", roster.appservice_port);
    let everywhere = with_registration(&roster, "fresh", &fresh);
    let everywhere = {
        let text = std::fs::read_to_string(&everywhere).unwrap();
        std::fs::write(
            &everywhere,
            text.replace(
                &listen,
                &format!("listen: 0.0.0.0:{}", roster.appservice_port),
            ),
        )
        .unwrap();
        everywhere
    };

    // 0.0.0.0 without appservice.url: refused in one line, nothing written.
    let (ok, _, stderr) = run(&["registration", "-c", path_str(&everywhere)], &[]);
    assert!(!ok, "registration wrote a URL the homeserver cannot reach");
    assert_eq!(
        stderr.trim(),
        format!(
            "roster: appservice.listen is 0.0.0.0:{}, which the homeserver cannot reach; set appservice.url to how the homeserver reaches roster, e.g. http://roster:9009",
            roster.appservice_port
        )
    );
    assert!(!fresh.exists());
    // With the URL given, it is written.
    let (ok, _, stderr) = run(
        &["registration", "-c", path_str(&everywhere)],
        &[("ROSTER_APPSERVICE__URL", "http://roster:9009")],
    );
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let written: Value = serde_yaml::from_str(&std::fs::read_to_string(&fresh).unwrap()).unwrap();
    assert_eq!(written["url"], "http://roster:9009");

    // -o somewhere serve does not read: written, with a warning naming the key to set.
    let config = with_registration(&roster, "elsewhere", &roster.dir.join("serve-reads.yaml"));
    let other = roster.dir.join("other.yaml");
    let (ok, _, stderr) = run(
        &[
            "registration",
            "-c",
            path_str(&config),
            "-o",
            path_str(&other),
        ],
        &[],
    );
    assert!(ok, "{stderr}");
    let warning: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(
        warning,
        [format!(
            "warning: -o {} is not appservice.registration ({}), which serve reads: set appservice.registration to it (or ROSTER_APPSERVICE__REGISTRATION)",
            other.display(),
            roster.dir.join("serve-reads.yaml").display()
        )
        .as_str()],
        "{stderr}"
    );
    for file in [other.clone(), roster.dir.join("other-acting.yaml")] {
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
    assert!(!roster.dir.join("serve-reads.yaml").exists());
    // The trap the warning is about, and its fix.
    let (ok, _, stderr) = run(&["check-config", "-c", path_str(&config)], &[]);
    assert!(
        !ok && stderr.contains("cannot read registration"),
        "{stderr}"
    );
    let (ok, stdout, stderr) = run(
        &["check-config", "-c", path_str(&config)],
        &[("ROSTER_APPSERVICE__REGISTRATION", path_str(&other))],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.starts_with("ok: "), "{stdout}");
    // -o naming the file serve reads: no warning.
    let same = roster.dir.join("same.yaml");
    let config = with_registration(&roster, "same", &same);
    let (ok, _, stderr) = run(
        &[
            "registration",
            "-c",
            path_str(&config),
            "-o",
            path_str(&same),
        ],
        &[],
    );
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    drop(scratch);
}

/// Secrets from the environment reach the running server as they were written: a value is
/// read as YAML only where the key's type needs it. The admin token is checked through
/// `roster status` (which reads it from the environment too); the Letta token through a
/// Letta stand-in (named as such) that records the `Authorization` header roster sends.
#[tokio::test]
async fn environment_secrets_reach_a_running_serve_verbatim() {
    let scratch = Scratch::new("env-secrets");
    let standin = LettaStandIn::start(json!([]), 500).await;
    let hs_port = free_port();
    let mut roster = Roster::configure(
        scratch.path(),
        &format!("http://127.0.0.1:{hs_port}"),
        &format!(
            "agents:\n  letta_url: {}\n  poll_interval: 1s\n",
            standin.url
        ),
    );
    // roster asks its agent source once the homeserver has the bot's user.
    let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
    let config = path_str(&roster.config).to_owned();
    // (value, what YAML would have made of it)
    let secrets = [
        ("abc #def", "abc"),
        ("0x1F", "31"),
        ("~", ""),
        ("key: value", ""),
        ("'quoted'", "quoted"),
        ("\"double\"", "double"),
        // (Trailing spaces cannot be told apart: HTTP drops them from a header's value.)
        ("  two leading spaces", "two leading spaces"),
    ];
    let mut seen_headers = 0;
    for (secret, as_yaml) in secrets {
        // The admin token cannot start or end with spaces (bearer tokens are trimmed).
        let admin = if secret.trim() == secret {
            secret
        } else {
            "fine"
        };
        roster.clear_env();
        roster.env("ROSTER_ADMIN__TOKEN", admin);
        roster.env("ROSTER_AGENTS__LETTA_TOKEN", secret);
        roster.start().await;
        roster.wait_ready().await;
        let (ok, stdout, stderr) = run(
            &["status", "--json", "-c", &config],
            &[("ROSTER_ADMIN__TOKEN", admin)],
        );
        assert!(ok, "status with admin.token {admin:?}: {stderr}");
        let status: Value = serde_json::from_str(&stdout).unwrap();
        assert!(status["ready"].as_bool().unwrap(), "{status}");
        let (code, _) = roster
            .admin_call(Method::GET, "/admin/v1/status", Some(admin), None)
            .await;
        assert_eq!(code, 200, "the exact token {admin:?}");
        if !as_yaml.is_empty() && admin == secret {
            let (ok, _, stderr) = run(
                &["status", "-c", &config],
                &[("ROSTER_ADMIN__TOKEN", as_yaml)],
            );
            assert!(!ok, "{as_yaml:?} is not the token {secret:?}");
            assert!(
                stderr.contains("403") || stderr.to_lowercase().contains("forbidden"),
                "{stderr}"
            );
        }
        let header = eventually(
            Duration::from_secs(30),
            "the Letta stand-in to be asked",
            || async {
                let all = standin.authorization();
                all.get(seen_headers).cloned()
            },
        )
        .await;
        assert_eq!(
            header,
            Some(format!("Bearer {secret}")),
            "letta token {secret:?}"
        );
        roster.stop();
        seen_headers = standin.authorization().len();
    }
    synapse.assert_no_logins().await;
    roster.assert_no_secrets_in_logs(&["abc #def", "key: value", "two leading spaces"]);
    drop(scratch);
}

/// Readiness fits Kubernetes: a Service routes to a pod only once it is ready, so the
/// homeserver cannot reach roster before. Here a real Synapse reaches roster through an
/// address that answers only later (a TCP forwarder the test starts): `/ready` is 200 at once,
/// the failed ping shows in status and metrics and is retried in the background, and once
/// the address answers the ping succeeds.
#[tokio::test]
async fn ready_before_synapse_can_reach_roster_and_the_ping_is_retried_until_it_can() {
    let scratch = Scratch::new("ready-before-ping");
    let hs_port = free_port();
    let mut roster = Roster::configure(scratch.path(), &format!("http://127.0.0.1:{hs_port}"), "");
    let service_port = free_port();
    let service = format!("http://127.0.0.1:{service_port}");
    let mut pushed: Value =
        serde_yaml::from_str(&std::fs::read_to_string(&roster.registration).unwrap()).unwrap();
    pushed["url"] = json!(service);
    std::fs::write(
        &roster.registration,
        serde_yaml::to_string(&pushed).unwrap(),
    )
    .unwrap();
    roster.env("ROSTER_APPSERVICE__URL", &service);
    let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
    roster.start().await;
    roster.wait_ready().await;
    let failed_pings = || async {
        roster
            .metric("roster_homeserver_pings_total", &["outcome=\"error\""])
            .await
    };
    eventually(
        Duration::from_secs(120),
        "two failed pings, the second a background retry",
        || async { (failed_pings().await >= 2).then_some(()) },
    )
    .await;
    let status = roster.status().await;
    assert!(status["ready"].as_bool().unwrap(), "{status}");
    assert!(status["ping"]["last_ok_at_ms"].is_null(), "{status}");
    assert!(status["ping"]["last_error"].is_string(), "{status}");
    assert!(status["pinged_by_homeserver_at_ms"].is_null(), "{status}");
    assert_eq!(roster.metric("roster_homeserver_ping_ok", &[]).await, 0);
    let (code, _) = roster.admin_call(Method::GET, "/ready", None, None).await;
    assert_eq!(code, 200);

    // The address starts answering: the next retry's ping goes through, both ways.
    forward_tcp(service_port, roster.appservice_port).await;
    roster.wait_pinged().await;
    let status = roster.status().await;
    assert!(status["ping"]["last_error"].is_null(), "{status}");
    assert!(status["pinged_by_homeserver_at_ms"].is_u64(), "{status}");
    assert_eq!(roster.metric("roster_homeserver_ping_ok", &[]).await, 1);
    let (code, _) = roster.admin_call(Method::GET, "/ready", None, None).await;
    assert_eq!(code, 200);
    synapse.assert_no_logins().await;
    roster.assert_no_secrets_in_logs(&[]);
    drop(scratch);
}

/// The configs shipped in deploy/ (the Kubernetes ConfigMap's `config.yaml` and the compose
/// one) pass `check-config` with registrations `roster registration` wrote for them: only
/// the paths that live in a Secret, volume or state directory are pointed at a scratch
/// directory, through the same environment overrides an operator would use.
#[test]
fn the_deployment_configs_pass_check_config() {
    let configmap: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/k8s/configmap.yaml")).unwrap(),
    )
    .unwrap();
    let k8s = configmap["data"]["config.yaml"]
        .as_str()
        .expect("the ConfigMap carries config.yaml")
        .to_owned();
    let compose = std::fs::read_to_string(repo_root().join("deploy/compose/config.yaml")).unwrap();
    let agents_file = repo_root().join("deploy/compose/agents.yaml");

    for (name, text) in [("k8s", k8s), ("compose", compose)] {
        let scratch = Scratch::new(&format!("deploy-{name}"));
        let dir = scratch.path();
        let config = dir.join("config.yaml");
        std::fs::write(&config, text).unwrap();
        let registration = dir.join("registration/registration.yaml");
        let acting = dir.join("registration/registration-acting.yaml");
        let store = dir.join("state/roster.db");
        let env = [
            ("ROSTER_APPSERVICE__REGISTRATION", path_str(&registration)),
            ("ROSTER_APPSERVICE__ACTING_REGISTRATION", path_str(&acting)),
            ("ROSTER_STORE__PATH", path_str(&store)),
            ("ROSTER_AGENTS__FILE", path_str(&agents_file)),
        ];
        let env: Vec<_> = if name == "compose" {
            env.to_vec()
        } else {
            env[..3].to_vec()
        };
        std::fs::create_dir_all(registration.parent().unwrap()).unwrap();
        std::fs::create_dir_all(store.parent().unwrap()).unwrap();
        let (ok, stdout, stderr) = run(&["registration", "-c", path_str(&config)], &env);
        assert!(ok, "{name}: registration failed: {stdout}{stderr}");
        assert!(registration.exists() && acting.exists(), "{name}: {stderr}");

        let (ok, stdout, stderr) = run(&["check-config", "-c", path_str(&config)], &env);
        assert!(
            ok,
            "{name}: check-config refused the shipped config: {stdout}{stderr}"
        );
        assert!(
            stdout.contains("a pushed and an acting-only registration"),
            "{name}: check-config should say both registrations are in use: {stdout}"
        );
    }
}

/// Mistakes made before roster reads anything: a config file that is not where `-c` says
/// (its cause shown once, not twice), and an override typed with one underscore (not read,
/// so it is named with the spelling that is).
#[test]
fn a_missing_config_file_and_a_mistyped_override_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.yaml");
    let (ok, _, stderr) = run(&["check-config", "-c", path_str(&missing)], &[]);
    assert!(!ok, "a missing config file is an error");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("nope.yaml"), "{stderr}");
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "the cause is shown once: {stderr}"
    );

    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "homeserver: {server_name: example.org}\n").unwrap();
    let (_, _, stderr) = run(
        &["check-config", "-c", path_str(&config)],
        &[("ROSTER_SYNC_INTERVAL", "5m")],
    );
    assert!(
        stderr.contains("ROSTER_SYNC_INTERVAL is not read")
            && stderr.contains("ROSTER_SYNC__INTERVAL"),
        "{stderr}"
    );
}

/// `serve` whose stderr reader went away (a `| tee` or `| head` ended, a log collector
/// restarted) still logs without failing and still stops on SIGTERM: a failed log write
/// is dropped, never a panic in the task that logged it (the signal handler among them).
#[test]
fn serve_stops_on_sigterm_after_its_stderr_reader_is_gone() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "homeserver: {{server_name: example.org, url: 'http://127.0.0.1:{}'}}\nappservice: {{registration: {}, listen: '127.0.0.1:{}'}}\nadmin: {{listen: '127.0.0.1:{}'}}\nstore: {{path: {}}}\n",
            free_port(),
            dir.path().join("registration.yaml").display(),
            free_port(),
            free_port(),
            dir.path().join("roster.db").display()
        ),
    )
    .unwrap();
    let (ok, _, stderr) = run(&["registration", "-c", path_str(&config)], &[]);
    assert!(ok, "{stderr}");

    let mut child = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["serve", "-c", path_str(&config)])
        .env("ROSTER_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run roster serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("ready"));
    assert!(ready, "serve did not start");
    drop(lines);
    // It keeps logging (the homeserver is not there) into the closed pipe.
    std::thread::sleep(Duration::from_secs(2));
    let pid = child.id().to_string();
    let term = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(term.success());
    // As long as systemd gives it (TimeoutStopSec): a liveness bound, not a speed check.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("serve ignored SIGTERM once its stderr reader was gone");
    };
    assert!(status.success(), "{status:?}");
}
