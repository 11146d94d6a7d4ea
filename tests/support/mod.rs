//! Test harness: real peers started by the project's own scripts on 127.0.0.1, and roster
//! itself as a child process (so tests can SIGKILL and restart it).
//!
//! Every process is stopped on drop. When a test fails, its directory (configs, logs,
//! databases) is kept and its path printed.

#![allow(dead_code)]

pub mod features;
pub mod identity;
pub mod tuwunel;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const SERVER_NAME: &str = "roster.test";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A port for a server a test starts, free now and handed out once per process.
///
/// Taken below the kernel's ephemeral range: a port from `bind(0)` comes from that range,
/// and any outgoing connection made before the server binds (tests make many) may be given
/// it, so the server fails with "address in use". Each process starts at its own offset, so
/// a bench beside the tests does not walk the same ports.
pub fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(32768);
    let low = 10_000.min(ephemeral_low / 2);
    let span = ephemeral_low - low;
    let offset = u64::from(std::process::id()) * 7919 % span;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < span, "no free port left in {low}..{ephemeral_low}");
        let port = u16::try_from(low + (offset + n) % span).expect("a port number");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A homeserver address where nothing listens (tests that act as the homeserver themselves).
pub fn nowhere() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

/// A scratch directory kept (and printed) when the test panics.
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(&format!("roster-{name}-"))
            .tempdir()
            .expect("create a temp dir");
        Scratch { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!(
                "test failed; its files are kept in {}",
                dir.keep().display()
            );
        }
    }
}

/// SIGTERM, then SIGKILL after `grace`: the exit status if the process ended by itself.
fn stop(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    // A frozen process (a fault test's SIGSTOP) acts on SIGTERM only once it runs again.
    send_signal(child.id(), "CONT");
    send_signal(child.id(), "TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Sends `signal` (`STOP`, `CONT`, `HUP`, ...) to process `pid` with kill(1).
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// The id of a running peer process, for fault tests.
fn running_pid(child: &Option<Child>, what: &str) -> u32 {
    child
        .as_ref()
        .unwrap_or_else(|| panic!("{what} is not running"))
        .id()
}

fn peer_script(name: &str) -> PathBuf {
    repo_root().join("deploy/peers").join(name)
}

fn run_script(script: &str, args: &[&str]) -> String {
    let output = Command::new(peer_script(script))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(
        output.status.success(),
        "{script} {args:?} failed: {}",
        output.status
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Polls `check` until it returns `Some`, or panics with `what` after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The registration files `roster registration` wrote for `registration`: the file itself,
/// then any `<stem>-*.yaml` beside it (an acting-only registration, `registration-acting.yaml`,
/// where roster writes one), sorted.
pub fn registration_files(registration: &Path) -> Vec<PathBuf> {
    let stem = registration
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("a registration file name");
    let prefix = format!("{stem}-");
    let mut siblings: Vec<PathBuf> = std::fs::read_dir(registration.parent().unwrap())
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".yaml"))
                })
                .collect()
        })
        .unwrap_or_default();
    siblings.sort();
    let mut files = vec![registration.to_owned()];
    files.extend(siblings);
    files
}

/// The `as_token` and `hs_token` of every registration file of `registration`.
fn registration_tokens(registration: &Path) -> Vec<String> {
    registration_files(registration)
        .iter()
        .flat_map(|file| {
            let reg: Value = serde_yaml::from_str(&std::fs::read_to_string(file).unwrap())
                .unwrap_or_else(|e| panic!("{} is not YAML: {e}", file.display()));
            ["as_token", "hs_token"]
                .into_iter()
                .filter_map(move |key| reg[key].as_str().map(str::to_owned))
        })
        .collect()
}

/// A real Synapse, installed and started by `deploy/peers/synapse.sh`.
pub struct Synapse {
    child: Option<Child>,
    pub dir: PathBuf,
    pub port: u16,
    pub metrics_port: u16,
    http: reqwest::Client,
    /// Failed logins this harness made since Synapse last started (its counters restart
    /// with it): the only logins Synapse may count.
    failed_logins: AtomicU64,
    /// The registrations' tokens and every access token `admin_token` handed out: none
    /// may appear in Synapse's logs (checked on drop).
    secrets: std::sync::Mutex<Vec<String>>,
}

impl Synapse {
    /// Starts Synapse on `port` with the appservice `registration` and the registrations
    /// roster wrote beside it (see [`registration_files`]).
    pub async fn start(dir: &Path, port: u16, registration: &Path) -> Synapse {
        Synapse::start_with_rate_limits(dir, port, registration, "generous").await
    }

    /// [`Synapse::start`] with `synapse.sh`'s `--rate-limits` (`generous` or `tight`: a few
    /// actions per second per user, for tests that roster honours rate limiting).
    pub async fn start_with_rate_limits(
        dir: &Path,
        port: u16,
        registration: &Path,
        rate_limits: &str,
    ) -> Synapse {
        run_script("synapse.sh", &["install"]);
        let metrics_port = free_port();
        let dir = dir.join("synapse");
        let (port_arg, metrics_arg) = (port.to_string(), metrics_port.to_string());
        let mut args = vec![
            "init",
            dir.to_str().unwrap(),
            "--port",
            &port_arg,
            "--metrics-port",
            &metrics_arg,
            "--server-name",
            SERVER_NAME,
            "--rate-limits",
            rate_limits,
        ];
        let registrations = registration_files(registration);
        for file in &registrations {
            args.extend(["--registration", file.to_str().unwrap()]);
        }
        run_script("synapse.sh", &args);
        let mut synapse = Synapse {
            child: None,
            dir,
            port,
            metrics_port,
            http: reqwest::Client::new(),
            failed_logins: AtomicU64::new(0),
            secrets: std::sync::Mutex::new(registration_tokens(registration)),
        };
        synapse.spawn().await;
        synapse
    }

    async fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("stdout.log")).unwrap();
        let child = Command::new(peer_script("synapse.sh"))
            .arg("run")
            .arg(&self.dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start synapse");
        self.child = Some(child);
        self.failed_logins.store(0, Ordering::SeqCst);
        let url = format!("{}/_matrix/client/versions", self.url());
        let http = self.http.clone();
        eventually(Duration::from_secs(60), "synapse to answer", || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let ok = http.get(&url).send().await.ok()?.status().is_success();
                ok.then_some(())
            }
        })
        .await;
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child, Duration::from_secs(10));
        }
    }

    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// The homeserver's process id.
    pub fn pid(&self) -> u32 {
        running_pid(&self.child, "synapse")
    }

    /// SIGSTOP: the process keeps its sockets but answers nothing (a partition as roster
    /// sees it: connections open, no reply) until [`Synapse::thaw`].
    pub fn freeze(&self) {
        send_signal(self.pid(), "STOP");
    }

    /// SIGCONT after [`Synapse::freeze`].
    pub fn thaw(&self) {
        send_signal(self.pid(), "CONT");
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Registers an admin user with the shared secret (no `/login`) and returns its token.
    pub fn admin_token(&self, user: &str) -> String {
        let token = run_script(
            "synapse.sh",
            &["admin-token", self.dir.to_str().unwrap(), user],
        )
        .trim()
        .to_owned();
        self.secrets.lock().unwrap().push(token.clone());
        token
    }

    pub async fn metrics_text(&self) -> String {
        self.http
            .get(format!(
                "http://127.0.0.1:{}/_synapse/metrics",
                self.metrics_port
            ))
            .send()
            .await
            .expect("synapse metrics listener answers")
            .text()
            .await
            .unwrap()
    }

    /// Synapse's own count of `POST /login` requests (any outcome).
    pub async fn login_count(&self) -> u64 {
        sum_samples(
            &self.metrics_text().await,
            "synapse_http_server_requests_received_total",
            &["method=\"POST\"", "servlet=\"LoginRestServlet\""],
        )
    }

    /// Every client-API request Synapse received, whoever sent it.
    pub async fn requests_received_total(&self) -> u64 {
        sum_samples(
            &self.metrics_text().await,
            "synapse_http_server_requests_received_total",
            &[],
        )
    }

    /// Asserts that Synapse counted no login since it (re)started other than the failed ones
    /// this harness made, then makes one more failed login and sees it counted: the counter
    /// is live, so the zero could have failed.
    pub async fn assert_no_logins(&self) {
        let made = self.failed_logins.load(Ordering::SeqCst);
        assert_eq!(
            self.login_count().await,
            made,
            "Synapse counted logins other than the {made} failed ones the test made"
        );
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/_matrix/client/v3/login",
                "",
                Some(json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "nobody" }, "password": "x" })),
            )
            .await;
        assert_eq!(status, 403, "a login with a wrong password fails: {body}");
        let made = self.failed_logins.fetch_add(1, Ordering::SeqCst) + 1;
        eventually(
            Duration::from_secs(10),
            "Synapse to count the test's failed login",
            || async { (self.login_count().await == made).then_some(()) },
        )
        .await;
    }

    /// Synapse's count of requests it received, by servlet name.
    pub async fn requests_received(&self, servlet: &str) -> u64 {
        sum_samples(
            &self.metrics_text().await,
            "synapse_http_server_requests_received_total",
            &[&format!("servlet=\"{servlet}\"")],
        )
    }

    /// A client-server or admin API call with `token`; returns status and JSON body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url()))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("synapse answers");
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    pub async fn create_room(&self, token: &str, body: Value) -> String {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/_matrix/client/v3/createRoom",
                token,
                Some(body),
            )
            .await;
        assert_eq!(status, 200, "createRoom: {body}");
        body["room_id"].as_str().unwrap().to_owned()
    }

    /// `GET /_synapse/admin/v2/users/{user}` (has `deactivated`, `erased`, `displayname`,
    /// `avatar_url`); `None` when the user does not exist.
    pub async fn admin_user(&self, admin_token: &str, user: &str) -> Option<Value> {
        let (status, body) = self
            .call(
                reqwest::Method::GET,
                &format!("/_synapse/admin/v2/users/{user}"),
                admin_token,
                None,
            )
            .await;
        match status {
            200 => Some(body),
            404 => None,
            _ => panic!("admin user {user}: {status} {body}"),
        }
    }

    pub async fn devices(&self, admin_token: &str, user: &str) -> usize {
        let (status, body) = self
            .call(
                reqwest::Method::GET,
                &format!("/_synapse/admin/v2/users/{user}/devices"),
                admin_token,
                None,
            )
            .await;
        assert_eq!(status, 200, "devices of {user}: {body}");
        body["devices"].as_array().map(Vec::len).unwrap_or(0)
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        self.stop();
        // Every test that runs Synapse checks its logs for the tokens in play.
        if !std::thread::panicking() {
            let secrets = self.secrets.lock().unwrap().clone();
            assert_no_secret_in_log_files(&self.dir, &secrets);
        }
    }
}

/// Panics, naming the file, when a `*.log` file under `dir` holds one of `secrets`.
pub fn assert_no_secret_in_log_files(dir: &Path, secrets: &[String]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            assert_no_secret_in_log_files(&path, secrets);
        } else if path.extension().is_some_and(|e| e == "log") {
            let text =
                String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned();
            for secret in secrets.iter().filter(|s| !s.is_empty()) {
                assert!(
                    !text.contains(secret.as_str()),
                    "{} holds a token of the test",
                    path.display()
                );
            }
        }
    }
}

/// A real Letta server, installed and started by `deploy/peers/letta.sh`.
pub struct Letta {
    child: Option<Child>,
    pub dir: PathBuf,
    pub port: u16,
    http: reqwest::Client,
}

impl Letta {
    /// Starts Letta with its SQLite database in `dir` and waits until it is healthy.
    pub async fn start(dir: &Path) -> Letta {
        run_script("letta.sh", &["install"]);
        let dir = dir.join("letta");
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let log_path = dir.join("stdout.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(peer_script("letta.sh"))
            .args(["run", dir.to_str().unwrap(), "--port", &port.to_string()])
            // Letta writes openapi_letta.json into its working directory.
            .current_dir(&dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start letta");
        let mut letta = Letta {
            child: Some(child),
            dir,
            port,
            // Creating an agent offline is slow on a busy machine.
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
        };
        // 10-30 s when idle; much more on a busy 2-core machine.
        let deadline = Instant::now() + Duration::from_secs(300);
        let health = format!("{}/v1/health/", letta.url());
        loop {
            if let Some(status) = letta.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "letta exited ({status}) before answering; see {}",
                    log_path.display()
                );
            }
            let answered = letta.http.get(&health).send().await;
            if answered.is_ok_and(|r| r.status().is_success()) {
                return letta;
            }
            assert!(
                Instant::now() < deadline,
                "letta did not answer {health} within 300 s; see {}",
                log_path.display()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.url()));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("letta answers");
        let status = response.status();
        let body = response.json().await.unwrap_or(Value::Null);
        assert!(
            status.is_success(),
            "letta {method} {path}: {status} {body}"
        );
        body
    }

    /// Creates an agent (offline: the free model is never called) and returns its id.
    pub async fn create_agent(&self, name: &str) -> String {
        let body =
            json!({"name": name, "model": "letta/letta-free", "embedding": "letta/letta-free"});
        let agent = self
            .call(reqwest::Method::POST, "/v1/agents/", Some(body))
            .await;
        agent["id"]
            .as_str()
            .expect("a created agent has an id")
            .to_owned()
    }

    pub async fn rename_agent(&self, id: &str, name: &str) {
        self.call(
            reqwest::Method::PATCH,
            &format!("/v1/agents/{id}"),
            Some(json!({"name": name})),
        )
        .await;
    }

    pub async fn delete_agent(&self, id: &str) {
        self.call(reqwest::Method::DELETE, &format!("/v1/agents/{id}"), None)
            .await;
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child, Duration::from_secs(15));
        }
    }

    pub fn pid(&self) -> u32 {
        running_pid(&self.child, "letta")
    }

    /// SIGSTOP until [`Letta::thaw`]: requests to it hang.
    pub fn freeze(&self) {
        send_signal(self.pid(), "STOP");
    }

    pub fn thaw(&self) {
        send_signal(self.pid(), "CONT");
    }
}

impl Drop for Letta {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A response's HTTP status and Matrix `errcode` (empty when it carries none).
pub async fn status_and_errcode(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (
        status,
        body["errcode"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Sums the samples of `name` whose labels contain every one of `labels`.
pub fn sum_samples(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// roster running as a child process with its own config, registration and store.
pub struct Roster {
    child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub registration: PathBuf,
    pub appservice_port: u16,
    pub admin_port: u16,
    pub admin_token: String,
    pub hs_token: String,
    pub as_token: String,
    /// Every token of every registration file (the acting-only one's too): none may be
    /// logged.
    registration_tokens: Vec<String>,
    extra_env: Vec<(String, String)>,
    starts: u32,
    http: reqwest::Client,
}

impl Roster {
    /// Writes a config pointing at `homeserver_url` and generates the registration with
    /// `roster registration`, as an operator would. Does not start roster.
    pub fn configure(dir: &Path, homeserver_url: &str, extra_yaml: &str) -> Roster {
        let dir = dir.join("roster");
        std::fs::create_dir_all(&dir).unwrap();
        let appservice_port = free_port();
        let admin_port = free_port();
        let admin_token = format!("admin-{}", uuid_like());
        let config = dir.join("config.yaml");
        let registration = dir.join("registration.yaml");
        std::fs::write(
            &config,
            format!(
                "homeserver:\n  url: {homeserver_url}\n  server_name: {SERVER_NAME}\n  request_timeout: 10s\n\
                 appservice:\n  registration: {}\n  listen: 127.0.0.1:{appservice_port}\n  max_body_bytes: 65536\n\
                 admin:\n  listen: 127.0.0.1:{admin_port}\n  token: {admin_token}\n\
                 store:\n  path: {}\n{extra_yaml}",
                registration.display(),
                dir.join("roster.db").display(),
            ),
        )
        .unwrap();
        let status = Command::new(env!("CARGO_BIN_EXE_roster"))
            .args(["registration", "-c"])
            .arg(&config)
            .status()
            .unwrap();
        assert!(status.success(), "roster registration failed");
        let reg: Value = serde_yaml::from_str(&std::fs::read_to_string(&registration).unwrap())
            .expect("registration is YAML");
        let registration_tokens = registration_tokens(&registration);
        Roster {
            child: None,
            dir,
            config,
            registration,
            appservice_port,
            admin_port,
            admin_token,
            hs_token: reg["hs_token"].as_str().unwrap().to_owned(),
            as_token: reg["as_token"].as_str().unwrap().to_owned(),
            registration_tokens,
            extra_env: Vec::new(),
            starts: 0,
            http: reqwest::Client::new(),
        }
    }

    /// The `as_token` of every registration file (where roster writes an acting-only
    /// registration, it acts as its users with that file's token).
    pub fn as_tokens(&self) -> Vec<String> {
        registration_files(&self.registration)
            .iter()
            .filter_map(|file| {
                let reg: Value =
                    serde_yaml::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
                reg["as_token"].as_str().map(str::to_owned)
            })
            .collect()
    }

    /// Takes `other`'s registration files (so both are one appservice) in place of its own.
    pub fn use_registrations_of(&mut self, other: &Roster) {
        let dir = self.registration.parent().unwrap().to_owned();
        for file in registration_files(&self.registration) {
            std::fs::remove_file(file).unwrap();
        }
        for file in registration_files(&other.registration) {
            let target = if file == other.registration {
                self.registration.clone()
            } else {
                dir.join(file.file_name().unwrap())
            };
            std::fs::copy(&file, target).unwrap();
        }
        self.as_token = other.as_token.clone();
        self.hs_token = other.hs_token.clone();
        self.registration_tokens = other.registration_tokens.clone();
    }

    pub fn env(&mut self, key: &str, value: &str) {
        self.extra_env.push((key.into(), value.into()));
    }

    pub fn clear_env(&mut self) {
        self.extra_env.clear();
    }

    /// Starts `roster serve` and waits until its admin listener answers. `free_port` can
    /// hand out a port another process takes before roster binds it: when roster says its
    /// admin port is in use, it is started again on another one (the appservice port is in
    /// the registration the homeserver holds, so that one cannot move).
    pub async fn start(&mut self) {
        for _ in 0..3 {
            if self.start_once().await {
                return;
            }
            let (_, log) = self.logs().pop().unwrap();
            assert!(
                log.contains("(admin.listen): Address already in use"),
                "roster stopped at start-up:\n{log}"
            );
            self.child = None;
            let config = std::fs::read_to_string(&self.config).unwrap();
            let port = free_port();
            let config = config.replace(
                &format!("listen: 127.0.0.1:{}\n", self.admin_port),
                &format!("listen: 127.0.0.1:{port}\n"),
            );
            std::fs::write(&self.config, config).unwrap();
            self.admin_port = port;
        }
        panic!("roster found no free admin port in 3 tries");
    }

    /// Whether roster's admin listener answered (false: it stopped first).
    async fn start_once(&mut self) -> bool {
        assert!(self.child.is_none(), "roster is already running");
        self.starts += 1;
        let log =
            std::fs::File::create(self.dir.join(format!("roster-{}.log", self.starts))).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_roster"));
        command
            .args(["serve", "-c"])
            .arg(&self.config)
            .env("ROSTER_LOG", "roster=debug,info")
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (key, value) in &self.extra_env {
            command.env(key, value);
        }
        self.child = Some(command.spawn().expect("start roster"));
        let url = self.admin_url("/health");
        let http = self.http.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        // Until it answers, or stops (a port taken meanwhile: `start` decides).
        while !self.has_exited() {
            if http.get(&url).send().await.is_ok() {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after 30s waiting for roster to listen"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    pub async fn wait_ready(&self) {
        let url = self.admin_url("/ready");
        let http = self.http.clone();
        eventually(Duration::from_secs(60), "roster to be ready", || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let ok = http.get(&url).send().await.ok()?.status().is_success();
                ok.then_some(())
            }
        })
        .await;
    }

    /// Sends `signal` (e.g. `HUP`) to the running roster.
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("roster is running");
        let status = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Runs a `roster` subcommand with this roster's config; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let output = Command::new(env!("CARGO_BIN_EXE_roster"))
            .args(args)
            .arg("-c")
            .arg(&self.config)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    pub fn pid(&self) -> u32 {
        running_pid(&self.child, "roster")
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child, Duration::from_secs(10));
        }
    }

    /// SIGTERM, as systemd stops roster: its exit status if it ended within `grace`, or
    /// `None` when it had to be killed.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        stop(&mut self.child.take()?, grace)
    }

    /// Whether the process ended by itself (e.g. an injected fault).
    pub fn has_exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().ok().flatten().is_some(),
            None => true,
        }
    }

    pub fn forget_exited(&mut self) {
        if self.has_exited() {
            self.child = None;
        }
    }

    pub fn appservice_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.appservice_port)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("roster metrics")
            .text()
            .await
            .unwrap()
    }

    pub async fn metric(&self, name: &str, labels: &[&str]) -> u64 {
        sum_samples(&self.metrics().await, name, labels)
    }

    /// The model's members of `room`: user id -> membership.
    pub async fn members(&self, room: &str) -> Vec<(String, String)> {
        let body: Value = self
            .http
            .get(self.admin_url(&format!("/admin/v1/rooms/{room}/members")))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .expect("roster admin API answers")
            .json()
            .await
            .unwrap();
        body["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["user_id"].as_str().unwrap().to_owned(),
                    m["membership"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    pub async fn membership(&self, room: &str, user: &str) -> Option<String> {
        self.members(room)
            .await
            .into_iter()
            .find(|(u, _)| u == user)
            .map(|(_, m)| m)
    }

    /// Waits until the model shows `user` with `membership` in `room`; returns the wait.
    pub async fn wait_membership(&self, room: &str, user: &str, membership: &str) -> Duration {
        let started = Instant::now();
        eventually(
            Duration::from_secs(20),
            &format!("{user} to be {membership} in {room} in roster's model"),
            || async {
                (self.membership(room, user).await.as_deref() == Some(membership)).then_some(())
            },
        )
        .await;
        started.elapsed()
    }

    /// Pushes a transaction the way a homeserver does (PUT with the hs_token).
    pub async fn push(&self, txn_id: &str, body: &Value) -> (u16, Value) {
        let response = self
            .http
            .put(self.appservice_url(&format!("/_matrix/app/v1/transactions/{txn_id}")))
            .bearer_auth(&self.hs_token)
            .json(body)
            .send()
            .await
            .expect("roster answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.http
    }

    /// Pushes raw `body` to `path_and_query` (a legacy path, an `access_token` parameter,
    /// bytes that are not UTF-8), with `bearer` as the `Authorization` token if given.
    pub async fn push_to(
        &self,
        path_and_query: &str,
        bearer: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .put(self.appservice_url(path_and_query))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("roster answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// An admin-listener call with `token` (none: no `Authorization` header); returns the
    /// status and the JSON body (`Null` when the body is not JSON).
    pub async fn admin_call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, self.admin_url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .expect("roster's admin listener answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `GET /admin/v1/status` (the typed status report, as JSON).
    pub async fn status(&self) -> Value {
        let (status, body) = self
            .admin_call(
                reqwest::Method::GET,
                "/admin/v1/status",
                Some(&self.admin_token),
                None,
            )
            .await;
        assert_eq!(status, 200, "status: {body}");
        body
    }

    /// `roster_transactions_total{outcome}`.
    pub async fn transactions(&self, outcome: &str) -> u64 {
        self.metric(
            "roster_transactions_total",
            &[&format!("outcome=\"{outcome}\"")],
        )
        .await
    }

    /// `roster_member_transitions_total{transition}`.
    pub async fn transitions(&self, transition: &str) -> u64 {
        self.metric(
            "roster_member_transitions_total",
            &[&format!("transition=\"{transition}\"")],
        )
        .await
    }

    /// `roster_homeserver_requests_total`, of one endpoint or (`None`) all of them.
    pub async fn homeserver_requests(&self, endpoint: Option<&str>) -> u64 {
        match endpoint {
            Some(endpoint) => {
                self.metric(
                    "roster_homeserver_requests_total",
                    &[&format!("endpoint=\"{endpoint}\"")],
                )
                .await
            }
            None => self.metric("roster_homeserver_requests_total", &[]).await,
        }
    }

    /// `roster_lifecycle_events_total{type,outcome}`.
    pub async fn lifecycle_events(&self, event: &str, outcome: &str) -> u64 {
        self.metric(
            "roster_lifecycle_events_total",
            &[
                &format!("type=\"{event}\""),
                &format!("outcome=\"{outcome}\""),
            ],
        )
        .await
    }

    /// Waits until roster's start-up ping succeeded: the homeserver reached roster's
    /// `/_matrix/app/v1/ping` (`/ready` does not wait for it).
    pub async fn wait_pinged(&self) {
        eventually(
            Duration::from_secs(120),
            "the homeserver to answer roster's start-up ping",
            || async {
                let ok = self
                    .metric("roster_homeserver_pings_total", &["outcome=\"ok\""])
                    .await;
                let status = self.status().await;
                (ok >= 1 && status["ping"]["last_ok_at_ms"].is_u64()).then_some(())
            },
        )
        .await;
    }

    /// Waits until roster reports `rooms` agent rooms for as many agents, nothing pending,
    /// nothing running and a finished sync; returns that status.
    pub async fn wait_converged(&self, rooms: usize) -> Value {
        eventually(
            Duration::from_secs(300),
            &format!("{rooms} rooms converged"),
            || async {
                let status = self.status().await;
                let done = status["rooms"] == rooms
                    && status["agents"] == rooms
                    && status["pending"] == 0
                    && status["running"] == 0
                    && status["last_sync"].is_object();
                done.then_some(status)
            },
        )
        .await
    }

    /// Removes `admin.token` from the config (the admin API is then off); takes effect at
    /// the next start.
    pub fn without_admin_token(&mut self) {
        let config = std::fs::read_to_string(&self.config).unwrap();
        let line = format!("  token: {}\n", self.admin_token);
        assert!(config.contains(&line), "the harness wrote admin.token");
        std::fs::write(&self.config, config.replace(&line, "")).unwrap();
    }

    /// Every log this roster wrote (one per start), in order.
    pub fn logs(&self) -> Vec<(PathBuf, String)> {
        (1..=self.starts)
            .map(|n| {
                let path = self.dir.join(format!("roster-{n}.log"));
                let text = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
                (path, text)
            })
            .collect()
    }

    /// No log roster wrote holds the as_token, the hs_token, the admin token, a token of any
    /// registration file or any of `extra` (other credentials the test gave it). Each log must show roster started, so
    /// an empty or missing log cannot pass for a clean one.
    pub fn assert_no_secrets_in_logs(&self, extra: &[&str]) {
        let logs = self.logs();
        assert!(!logs.is_empty(), "roster was never started");
        let mut secrets = vec![
            ("as_token", self.as_token.as_str()),
            ("hs_token", self.hs_token.as_str()),
            ("admin token", self.admin_token.as_str()),
        ];
        secrets.extend(
            self.registration_tokens
                .iter()
                .map(|t| ("registration token", t.as_str())),
        );
        secrets.extend(extra.iter().map(|s| ("a credential the test passed", *s)));
        for (path, text) in &logs {
            assert!(
                text.contains("roster starting"),
                "{} does not look like a roster log",
                path.display()
            );
            for (what, secret) in &secrets {
                assert!(!secret.is_empty(), "an empty {what} proves nothing");
                assert!(
                    !text.contains(secret),
                    "{} holds the {what}",
                    path.display()
                );
            }
        }
    }
}

/// Waits until neither roster nor Synapse count a new request for 3 s in a row (the
/// effects of earlier actions have settled); returns both counters then.
pub async fn wait_quiet(roster: &Roster, synapse: &Synapse) -> (u64, u64) {
    eventually(
        Duration::from_secs(180),
        "roster's and Synapse's request counters to stop moving",
        || async {
            let before = (
                roster.homeserver_requests(None).await,
                synapse.requests_received_total().await,
            );
            tokio::time::sleep(Duration::from_secs(3)).await;
            let after = (
                roster.homeserver_requests(None).await,
                synapse.requests_received_total().await,
            );
            (before == after).then_some(after)
        },
    )
    .await
}

/// Every roster a test started is checked for leaked secrets when it is dropped, so the
/// whole suite's logs are scanned, not only those of tests that ask.
impl Drop for Roster {
    fn drop(&mut self) {
        self.stop();
        // Every test that runs roster checks its logs for the tokens in play.
        if !std::thread::panicking() {
            let mut secrets = vec![
                self.as_token.clone(),
                self.hs_token.clone(),
                self.admin_token.clone(),
            ];
            secrets.extend(self.registration_tokens.iter().cloned());
            assert_no_secret_in_log_files(&self.dir, &secrets);
        }
    }
}

/// A member event as a homeserver pushes it.
pub fn member_event(room: &str, user: &str, sender: &str, membership: &str, ts: u64) -> Value {
    json!({
        "type": "m.room.member",
        "event_id": format!("$ev{ts}{}", user.len()),
        "room_id": room,
        "sender": sender,
        "state_key": user,
        "origin_server_ts": ts,
        "content": { "membership": membership },
    })
}

pub fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{nanos:x}{:x}", std::process::id())
}

/// A real Kafka-protocol broker (tansu, in-memory storage), installed and started by
/// `deploy/peers/tansu.sh` on a free port, with its topics created before roster starts.
pub struct Tansu {
    child: Option<Child>,
    pub port: u16,
    pub partitions: i32,
    /// The TLS terminator every client goes through, when started behind one.
    pub tls: Option<TlsFront>,
    producer: rdkafka::producer::FutureProducer,
}

/// stunnel (`deploy/peers/stunnel.sh`) terminating TLS for the broker, with a CA made for
/// the test: the broker advertises this port, so every client must speak TLS to it.
pub struct TlsFront {
    child: Option<Child>,
    pub port: u16,
    /// The test CA's certificate (PEM), for `ssl.ca.location`.
    pub ca: PathBuf,
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child, Duration::from_secs(5));
        }
    }
}

/// A librdkafka client config for `brokers`, over TLS trusting `ca` when given.
fn kafka_client(brokers: &str, ca: Option<&Path>) -> rdkafka::ClientConfig {
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    if let Some(ca) = ca {
        config
            .set("security.protocol", "ssl")
            .set("ssl.ca.location", ca.to_str().unwrap());
    }
    config
}

/// What a test consumer read from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

impl Tansu {
    pub async fn start(dir: &Path, partitions: i32, topics: &[&str]) -> Tansu {
        Tansu::launch(dir, partitions, topics, false, None).await
    }

    /// A broker of another cluster (its own cluster id): what a move to new brokers, or a
    /// cluster rebuilt, looks like to a client.
    pub async fn start_in_cluster(
        dir: &Path,
        partitions: i32,
        topics: &[&str],
        cluster_id: &str,
    ) -> Tansu {
        Tansu::launch(dir, partitions, topics, false, Some(cluster_id)).await
    }

    /// The broker reachable only through a TLS terminator with a test CA: it advertises the
    /// terminator's port, so roster and the test's own clients must all speak TLS.
    pub async fn start_behind_tls(dir: &Path, partitions: i32, topics: &[&str]) -> Tansu {
        Tansu::launch(dir, partitions, topics, true, None).await
    }

    async fn launch(
        dir: &Path,
        partitions: i32,
        topics: &[&str],
        tls: bool,
        cluster_id: Option<&str>,
    ) -> Tansu {
        run_script("tansu.sh", &["install"]);
        let tls_port = tls.then(free_port);
        // Seen once in CI: the broker listened, then was gone before its topics were made
        // (its log empty). A broker that does not get its topics is started again, on a
        // fresh port, at most twice more; what happened is printed.
        let mut attempt = 1;
        let (child, port) = loop {
            let (mut child, port) = Tansu::spawn(dir, tls_port, cluster_id).await;
            let mut args = vec![
                "topic".to_owned(),
                "--port".into(),
                port.to_string(),
                "--partitions".into(),
                partitions.to_string(),
            ];
            args.extend(topics.iter().map(|t| t.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let made = Command::new(peer_script("tansu.sh"))
                .args(&args)
                .status()
                .expect("run tansu.sh topic");
            if made.success() {
                break (child, port);
            }
            let exited = child.try_wait().ok().flatten();
            let log = std::fs::read_to_string(dir.join("tansu.log")).unwrap_or_default();
            eprintln!(
                "tansu on port {port}: topics not made ({made}); broker exited: {exited:?}; log: {log:?}"
            );
            let _ = child.kill();
            let _ = child.wait();
            assert!(attempt < 3, "tansu did not get its topics in 3 attempts");
            attempt += 1;
        };
        let tls = match tls_port {
            Some(tls_port) => Some(TlsFront::start(dir, tls_port, port).await),
            None => None,
        };
        let brokers = format!("127.0.0.1:{}", tls.as_ref().map_or(port, |t| t.port));
        let producer = kafka_client(&brokers, tls.as_ref().map(|t| t.ca.as_path()))
            .set("message.timeout.ms", "10000")
            .create()
            .expect("a producer for the test broker");
        Tansu {
            child: Some(child),
            port,
            partitions,
            tls,
            producer,
        }
    }

    /// Starts a broker on a fresh port (advertising `advertised` when given) and waits
    /// until it listens.
    async fn spawn(
        dir: &Path,
        advertised: Option<u16>,
        cluster_id: Option<&str>,
    ) -> (std::process::Child, u16) {
        let port = free_port();
        let mut run = vec!["run".to_owned(), "--port".into(), port.to_string()];
        if let Some(advertised) = advertised {
            run.extend(["--advertised-port".into(), advertised.to_string()]);
        }
        let log = std::fs::File::create(dir.join("tansu.log")).unwrap();
        let mut command = Command::new(peer_script("tansu.sh"));
        // tansu reads its cluster id (default `tansu_cluster`) from the environment.
        if let Some(cluster_id) = cluster_id {
            command.env("CLUSTER_ID", cluster_id);
        }
        let child = command
            .args(&run)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tansu");
        eventually(Duration::from_secs(20), "tansu to listen", || async move {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        })
        .await;
        (child, port)
    }

    /// Where clients connect: the TLS terminator when there is one.
    pub fn brokers(&self) -> String {
        format!(
            "127.0.0.1:{}",
            self.tls.as_ref().map_or(self.port, |t| t.port)
        )
    }

    /// A client config for this broker (TLS with the test CA when behind the terminator).
    pub fn client(&self) -> rdkafka::ClientConfig {
        kafka_client(&self.brokers(), self.tls.as_ref().map(|t| t.ca.as_path()))
    }

    pub fn pid(&self) -> u32 {
        running_pid(&self.child, "tansu")
    }

    /// SIGSTOP until [`Tansu::thaw`]: the broker keeps its connections and answers nothing.
    pub fn freeze(&self) {
        send_signal(self.pid(), "STOP");
    }

    pub fn thaw(&self) {
        send_signal(self.pid(), "CONT");
    }

    /// The `lifecycle:` section for roster: this broker, the group join speed-ups the
    /// peers README asks for in tests, and `earliest` (the memory storage's high watermark
    /// is wrong, so `latest` would be too).
    pub fn lifecycle_yaml(&self, topic: &str, group: &str, extra: &str) -> String {
        let tls = self.tls.as_ref().map_or(String::new(), |t| {
            format!(
                ", security.protocol: ssl, ssl.ca.location: {}",
                t.ca.display()
            )
        });
        format!(
            "lifecycle:\n  enabled: true\n  brokers: {}\n  topic: {topic}\n  group_id: {group}\n  \
             start_from: earliest\n  kafka: {{session.timeout.ms: 6000, heartbeat.interval.ms: 500{tls}}}\n{extra}",
            self.brokers()
        )
    }

    /// Produces one message; returns where it landed.
    pub async fn produce(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&str>,
        headers: &[(&str, &str)],
        payload: &[u8],
    ) -> (i32, i64) {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::FutureRecord;
        let mut owned = OwnedHeaders::new();
        for (k, v) in headers {
            owned = owned.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let mut record: FutureRecord<'_, str, [u8]> =
            FutureRecord::to(topic).payload(payload).headers(owned);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if let Some(k) = key {
            record = record.key(k);
        }
        let delivery = self
            .producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
        (delivery.partition, delivery.offset)
    }

    /// Produces `body` (JSON) to `topic` with an `event_type` header, keyed by `key`.
    pub async fn produce_event(
        &self,
        topic: &str,
        key: Option<&str>,
        event_type: &str,
        body: &Value,
    ) -> (i32, i64) {
        let payload = serde_json::to_vec(body).unwrap();
        self.produce(topic, None, key, &[("event_type", event_type)], &payload)
            .await
    }

    /// Produces to `topic`, for users `from..to` (ids `identity::uuid(salt, n)`), a
    /// creation and two renames each (`user-<n>-v1`, then `user-<n>-v2`), keyed by user;
    /// returns where each landed.
    pub async fn produce_renamed_users(
        &self,
        topic: &str,
        salt: u32,
        from: u32,
        to: u32,
    ) -> Vec<(i32, i64)> {
        use identity::{created, profile, uuid};
        let mut produced = Vec::new();
        for n in from..to {
            let id = uuid(salt, n);
            let key = Some(id.as_str());
            produced.push(
                self.produce_event(topic, key, "UserCreatedEvent", &created(&id, "x"))
                    .await,
            );
            for round in 1..=2 {
                let name = format!("user-{n}-v{round}");
                let body = profile(&id, "u", Some(&name), None);
                produced.push(
                    self.produce_event(topic, key, "UserProfileUpdatedEvent", &body)
                        .await,
                );
            }
        }
        produced
    }

    /// Per partition, the offset after the last message of `produced` (-1: none there).
    /// The memory storage's high watermark is wrong, so tests count what they produced.
    pub fn ends(&self, produced: &[(i32, i64)]) -> Vec<i64> {
        (0..self.partitions)
            .map(|p| {
                produced
                    .iter()
                    .filter(|(q, _)| *q == p)
                    .map(|(_, o)| o + 1)
                    .max()
                    .unwrap_or(-1)
            })
            .collect()
    }

    /// Waits until `group` committed every message of `produced` on `topic`, and no more.
    pub async fn wait_committed(&self, group: &str, topic: &str, produced: &[(i32, i64)]) {
        let expected = self.ends(produced);
        eventually(
            Duration::from_secs(60),
            &format!("committed offsets to reach {expected:?}"),
            || async { (self.committed(group, topic) == expected).then_some(()) },
        )
        .await;
    }

    /// The group's committed position per partition (-1: nothing committed).
    pub fn committed(&self, group: &str, topic: &str) -> Vec<i64> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
        // Not subscribed: reads the group's offsets without joining it.
        let consumer: BaseConsumer = self
            .client()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut list = TopicPartitionList::new();
        for p in 0..self.partitions {
            list.add_partition(topic, p);
        }
        let committed = consumer
            .committed_offsets(list, Duration::from_secs(10))
            .expect("committed offsets");
        (0..self.partitions)
            .map(
                |p| match committed.find_partition(topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => -1,
                },
            )
            .collect()
    }

    /// Every message of `topic`, read from the beginning until `expected` arrived (or 20 s).
    pub async fn read_all(&self, topic: &str, expected: usize) -> Vec<Record> {
        use rdkafka::Message;
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::Headers;
        use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
        let consumer: BaseConsumer = self
            .client()
            .set("group.id", format!("reader-{}", uuid_like()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut list = TopicPartitionList::new();
        for p in 0..self.partitions {
            list.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&list).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut records = Vec::new();
        while records.len() < expected && Instant::now() < deadline {
            // A short blocking poll: roster runs in its own process, nothing else waits here.
            let polled = consumer.poll(Duration::from_millis(200));
            if let Some(Ok(m)) = polled {
                records.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers: m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                                .collect()
                        })
                        .unwrap_or_default(),
                });
            }
        }
        records
    }
}

impl TlsFront {
    /// Makes a test CA and a certificate for 127.0.0.1 in `dir/tls`, then terminates TLS on
    /// `port` for the plaintext broker on `broker_port`.
    async fn start(dir: &Path, port: u16, broker_port: u16) -> TlsFront {
        run_script("stunnel.sh", &["install"]);
        let certs = dir.join("tls");
        run_script("stunnel.sh", &["certs", certs.to_str().unwrap()]);
        let log = std::fs::File::create(dir.join("stunnel.log")).unwrap();
        let child = Command::new(peer_script("stunnel.sh"))
            .args(["run", "--port", &port.to_string()])
            .args(["--connect", &broker_port.to_string()])
            .args(["--certs", certs.to_str().unwrap()])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start stunnel");
        eventually(
            Duration::from_secs(20),
            "stunnel to listen",
            || async move {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        TlsFront {
            child: Some(child),
            port,
            ca: certs.join("ca.pem"),
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child, Duration::from_secs(5));
        }
    }
}
