//! Talks to a running `serve` through its admin API, for the CLI's client commands
//! (`status`, `sync`, `replay`), and renders their answers for a terminal.
//!
//! They need only the admin URL and token: from flags or the environment
//! (`ROSTER_ADMIN_URL`, `ROSTER_ADMIN__LISTEN`, `ROSTER_ADMIN__TOKEN`), else the `admin`
//! section of the config file;
//! the rest of the config is not read. The token is sent only to that address and never
//! printed.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::admin::{ReplayRequest, StatusReport, Target};
use crate::config::Secret;
use crate::lifecycle::Replayed;
use crate::state::SyncSummary;

/// The variable naming the admin API's URL for client commands.
pub const URL_VAR: &str = "ROSTER_ADMIN_URL";
/// The variable holding the admin token (the config key `admin.token` from the environment).
pub const TOKEN_VAR: &str = "ROSTER_ADMIN__TOKEN";
/// The variable overriding `admin.listen`, which serve listens on: the CLI follows it.
pub const LISTEN_VAR: &str = "ROSTER_ADMIN__LISTEN";

/// How long a request that serve answers at once (status, a sync queued without waiting)
/// may take: a stopped or wedged serve must not hang the CLI and the scripts around it.
/// `sync --wait` and `replay` wait for work, so only their connection is bounded.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to serve may take, for every request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error(
        "no admin token: set {TOKEN_VAR}, or admin.token in the config file passed with -c (the API is off without it)"
    )]
    NoToken,
    #[error(
        "cannot read {path}: {reason}; pass the config with -c, or set {URL_VAR} and {TOKEN_VAR}"
    )]
    Config { path: String, reason: String },
    #[error("{0:?} is not an admin URL; expected e.g. http://127.0.0.1:9010")]
    BadUrl(String),
    #[error("{var}={value:?} is not an IP address and port; expected e.g. 127.0.0.1:9010")]
    BadListen { var: &'static str, value: String },
    #[error(
        "cannot reach roster's admin API at {url}: {reason}; is `roster serve` running there? (--admin-url, {URL_VAR} or admin.listen)"
    )]
    Unreachable { url: String, reason: String },
    #[error(
        "roster's admin API at {url} did not answer within {}s; is `roster serve` stopped or stuck? check its log and GET {url}/health",
        .after.as_secs()
    )]
    NoAnswer { url: String, after: Duration },
    #[error("roster answered HTTP {status}: {message}")]
    Refused { status: u16, message: String },
    #[error(
        "roster's answer from {url} is not what this roster expects ({reason}); are both the same version?"
    )]
    Undecodable { url: String, reason: String },
}

/// The `admin` section of a config file, read leniently: client commands need nothing else.
#[derive(Deserialize, Default)]
struct AdminOnly {
    #[serde(default)]
    admin: AdminSection,
}

#[derive(Deserialize, Default)]
struct AdminSection {
    listen: Option<SocketAddr>,
    token: Option<String>,
}

/// A client of one running roster's admin API.
pub struct AdminClient {
    base: String,
    token: Secret,
    /// Where the token came from, named when roster refuses it.
    token_from: String,
    http: reqwest::Client,
}

impl AdminClient {
    /// Resolves the URL and token: `url` (a flag), then the environment, then the config
    /// file (`config`, or `config.yaml` when it exists), then `http://127.0.0.1:9010`.
    pub fn resolve(
        url: Option<String>,
        config: Option<&Path>,
        env: &BTreeMap<String, String>,
    ) -> Result<AdminClient, OperatorError> {
        let file = read_admin_section(config)?;
        let base = match url.or_else(|| env.get(URL_VAR).cloned()) {
            Some(url) => url,
            None => {
                let from_env = match env.get(LISTEN_VAR) {
                    Some(text) => Some(text.trim().parse::<SocketAddr>().map_err(|_| {
                        OperatorError::BadListen {
                            var: LISTEN_VAR,
                            value: text.clone(),
                        }
                    })?),
                    None => None,
                };
                let mut addr = from_env
                    .or(file.listen)
                    .unwrap_or_else(|| "127.0.0.1:9010".parse().expect("a valid address"));
                if addr.ip().is_unspecified() {
                    addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
                }
                format!("http://{addr}")
            }
        };
        let parsed = reqwest::Url::parse(&base).map_err(|_| OperatorError::BadUrl(base.clone()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(OperatorError::BadUrl(base));
        }
        let (token, token_from) = match env.get(TOKEN_VAR).filter(|t| !t.is_empty()) {
            Some(token) => (token.clone(), TOKEN_VAR.to_owned()),
            None => {
                let token = file
                    .token
                    .filter(|t| !t.is_empty())
                    .ok_or(OperatorError::NoToken)?;
                let file = config.map_or("the config file".into(), |p| p.display().to_string());
                (token, format!("admin.token in {file}"))
            }
        };
        Ok(AdminClient {
            base: base.trim_end_matches('/').to_owned(),
            token: Secret::new(token),
            token_from,
            http: reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .build()
                .expect("a TLS backend is compiled in"),
        })
    }

    pub async fn status(&self) -> Result<StatusReport, OperatorError> {
        self.call(
            reqwest::Method::GET,
            "status",
            None::<&()>,
            Some(ANSWER_TIMEOUT),
        )
        .await
    }

    /// Asks for a sync; with `wait`, returns its summary.
    pub async fn sync(&self, target: &Target) -> Result<Option<SyncSummary>, OperatorError> {
        if target.wait {
            self.call(reqwest::Method::POST, "sync", Some(target), None)
                .await
                .map(Some)
        } else {
            self.call::<serde_json::Value>(
                reqwest::Method::POST,
                "sync",
                Some(target),
                Some(ANSWER_TIMEOUT),
            )
            .await
            .map(|_| None)
        }
    }

    /// Asks the running consumer to re-consume `partition` from `offset`.
    pub async fn replay(&self, partition: i32, offset: i64) -> Result<Replayed, OperatorError> {
        let request = ReplayRequest { partition, offset };
        self.call(reqwest::Method::POST, "replay", Some(&request), None)
            .await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl serde::Serialize>,
        timeout: Option<Duration>,
    ) -> Result<T, OperatorError> {
        let url = format!("{}/admin/v1/{path}", self.base);
        let mut request = self
            .http
            .request(method, &url)
            .bearer_auth(self.token.expose());
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        let unreachable = |error: reqwest::Error| match timeout {
            Some(after) if error.is_timeout() && !error.is_connect() => OperatorError::NoAnswer {
                url: self.base.clone(),
                after,
            },
            _ => OperatorError::Unreachable {
                url: self.base.clone(),
                reason: crate::error_chain(&error.without_url()),
            },
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(unreachable)?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "no reason given".into());
            let message = if status == 401 || status == 403 {
                format!(
                    "{message} (the token came from {}; serve reads admin.token from its own config and environment)",
                    self.token_from
                )
            } else {
                message
            };
            return Err(OperatorError::Refused { status, message });
        }
        serde_json::from_slice(&bytes).map_err(|e| OperatorError::Undecodable {
            url,
            reason: e.to_string(),
        })
    }
}

fn read_admin_section(config: Option<&Path>) -> Result<AdminSection, OperatorError> {
    let (path, required) = match config {
        Some(path) => (path, true),
        None => (Path::new("config.yaml"), false),
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            return Ok(AdminSection::default());
        }
        Err(e) => {
            return Err(OperatorError::Config {
                path: path.display().to_string(),
                reason: e.to_string(),
            });
        }
    };
    let parsed: AdminOnly = serde_yaml::from_str::<Option<AdminOnly>>(&text)
        .map_err(|e| OperatorError::Config {
            path: path.display().to_string(),
            reason: format!("its admin section is not valid: {e}"),
        })?
        .unwrap_or_default();
    Ok(parsed.admin)
}

/// A time as an operator reads it: seconds ago.
fn ago(at_ms: Option<u64>, now_ms: u64) -> String {
    match at_ms {
        Some(at) => format!("{}s ago", now_ms.saturating_sub(at) / 1000),
        None => "never".into(),
    }
}

/// A few lines an operator reads at a glance; `--json` has everything.
pub fn render_status(s: &StatusReport, now_ms: u64) -> String {
    let r = &s.reconcile;
    let mut out = format!(
        "roster {}  ready: {}\nagents: {}  rooms: {}  retired: {}\npending: {}  running: {}  failed: {}  blocked: {}\n",
        s.version,
        s.ready,
        s.agents,
        s.rooms,
        s.retired,
        s.pending,
        s.running,
        r.failed.len(),
        r.blocked.len(),
    );
    // `last_error` is cleared by a ping that works: when set, the latest ping failed.
    out += &match (&r.ping.last_error, r.ping.last_ok_at_ms) {
        (Some(error), last_ok) => format!(
            "homeserver ping: failing: {error} (last ok {})\n",
            ago(last_ok, now_ms)
        ),
        (None, Some(at)) => format!("homeserver ping: ok {}\n", ago(Some(at), now_ms)),
        (None, None) => "homeserver ping: not yet\n".into(),
    };
    if let Some(error) = &r.homeserver.last_error {
        out += &format!(
            "homeserver: last error {}: {error} (last answer {})\n",
            ago(r.homeserver.last_error_at_ms, now_ms),
            ago(r.homeserver.last_ok_at_ms, now_ms)
        );
    }
    if let Some(running) = &r.sync_running {
        out += &format!(
            "sync running: {}, started {}\n",
            running.trigger,
            ago(Some(running.started_at_ms), now_ms)
        );
    }
    if let Some(sync) = &r.last_sync {
        out += &format!(
            "last sync {}: {}\n",
            ago(Some(sync.started_at_ms), now_ms),
            render_summary(sync)
        );
    }
    if let Some(source) = &r.source {
        out += &format!(
            "source: {} ({} agents; last ok {}; last error: {})\n",
            source.source,
            source.agents_listed,
            ago(source.health.last_ok_at_ms, now_ms),
            source.health.last_error.as_deref().unwrap_or("-")
        );
    }
    out += &format!(
        "cache hit ratio: {}  memberships: {}\n",
        s.cache_hit_ratio()
            .map_or("-".into(), |r| format!("{r:.3}")),
        s.memberships,
    );
    out += &match s.lifecycle_partitions {
        Some(held) => format!(
            "lifecycle: {held} partitions held, lag {} messages\n",
            s.lifecycle_lag_messages
        ),
        None => "lifecycle: off\n".into(),
    };
    if let Some(error) = &r.lifecycle_broker_error {
        out += &format!(
            "lifecycle broker error {}: {}\n",
            ago(Some(error.at_ms), now_ms),
            error.message
        );
    }
    for stall in &r.lifecycle_stalled {
        out += &format!(
            "lifecycle partition {} stalled at offset {} for {}s: {}\n",
            stall.partition,
            stall.offset,
            stall.stalled_for_ms / 1000,
            stall.reason
        );
    }
    for (agent, reason) in &r.failed {
        out += &format!("failed {agent}: {reason}\n");
    }
    for (room, import) in &s.history_import_failures {
        out += &format!(
            "history import failed for {} in {room}: {}\n",
            import.agent_id,
            import.detail.as_deref().unwrap_or("no reason given")
        );
    }
    for (agent, members) in &r.blocked {
        out += &format!("blocked {agent}: {}\n", members.join(", "));
    }
    out
}

/// One line for a finished sync.
pub fn render_summary(sync: &SyncSummary) -> String {
    format!(
        "{} ({} ms, {} agents, {} rooms read, {} drifted, {} actions, {} failed{})",
        sync.trigger,
        sync.duration_ms,
        sync.agents,
        sync.rooms_read,
        sync.drift,
        sync.actions,
        sync.failed,
        sync.source_error
            .as_ref()
            .map(|e| format!("; source error: {e}"))
            .unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::env;
    use std::time::Duration;

    #[test]
    fn should_need_only_the_admin_url_and_token() {
        let dir = tempfile::tempdir().unwrap();
        let client = AdminClient::resolve(
            Some("http://10.0.0.5:9010/".into()),
            None,
            &env(&[(TOKEN_VAR, "t")]),
        )
        .unwrap();
        assert_eq!(client.base, "http://10.0.0.5:9010");
        // A config with nothing but the admin section is enough (no server_name).
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            "admin: {listen: '0.0.0.0:9999', token: from-file}\n",
        )
        .unwrap();
        let client = AdminClient::resolve(None, Some(&config), &env(&[])).unwrap();
        assert_eq!(client.base, "http://127.0.0.1:9999");
        assert_eq!(client.token.expose(), "from-file");
        assert_eq!(
            client.token_from,
            format!("admin.token in {}", config.display())
        );
        let client =
            AdminClient::resolve(None, Some(&config), &env(&[(URL_VAR, "http://h:1")])).unwrap();
        assert_eq!(client.base, "http://h:1");
        // serve listens where ROSTER_ADMIN__LISTEN says: the CLI follows it.
        let client = AdminClient::resolve(
            None,
            Some(&config),
            &env(&[(LISTEN_VAR, "127.0.0.1:9011"), (TOKEN_VAR, "t")]),
        )
        .unwrap();
        assert_eq!(client.base, "http://127.0.0.1:9011");
        assert_eq!(client.token_from, TOKEN_VAR);
        let bad = AdminClient::resolve(None, Some(&config), &env(&[(LISTEN_VAR, "localhost")]))
            .err()
            .unwrap();
        assert!(
            bad.to_string().contains(LISTEN_VAR) && bad.to_string().contains("\"localhost\""),
            "{bad}"
        );
    }

    #[test]
    fn should_show_a_sync_under_way() {
        let report = report(crate::state::Status {
            sync_running: Some(crate::state::SyncRunning {
                trigger: "interval".into(),
                started_at_ms: 1_000,
            }),
            ..Default::default()
        });
        let shown = render_status(&report, 121_000);
        assert!(
            shown.contains("sync running: interval, started 120s ago"),
            "{shown}"
        );
        // A report from a roster that does not know the field still reads.
        let mut json = serde_json::to_value(&report).unwrap();
        json.as_object_mut().unwrap().remove("sync_running");
        let older: StatusReport = serde_json::from_value(json).unwrap();
        assert!(!render_status(&older, 121_000).contains("sync running"));
    }

    fn report(reconcile: crate::state::Status) -> StatusReport {
        StatusReport {
            version: "0.1.0".into(),
            ready: true,
            agents: 1,
            rooms: 1,
            retired: 0,
            pending: 0,
            running: 0,
            reconcile,
            membership_cache_hits: 0,
            membership_cache_misses: 0,
            memberships: 0,
            deactivated_users: 0,
            lifecycle_lag_messages: 0,
            lifecycle_partitions: None,
            transactions_remembered: 0,
            homeserver_requests: 0,
            history_import_failures: Default::default(),
        }
    }

    /// Whether syncs still happen is read from when the last one ran: a summary without
    /// its time looks the same a minute or a week later.
    #[test]
    fn should_say_when_the_last_sync_ran() {
        let shown = render_status(
            &report(crate::state::Status {
                last_sync: Some(SyncSummary {
                    trigger: "interval".into(),
                    started_at_ms: 1_000,
                    duration_ms: 2_000,
                    agents: 3,
                    rooms_read: 3,
                    drift: 0,
                    actions: 0,
                    failed: 0,
                    source_error: None,
                }),
                ..Default::default()
            }),
            3_601_000,
        );
        assert!(
            shown.contains("last sync 3600s ago: interval (2000 ms,"),
            "{shown}"
        );
    }

    /// A ping that worked once and fails now is failing: "ok" must not lead the line.
    #[test]
    fn should_show_a_failing_ping_as_failing() {
        let ping = |last_ok_at_ms, last_error: Option<&str>| crate::state::Status {
            ping: crate::state::PingStatus {
                last_ok_at_ms,
                round_trip_ms: None,
                last_error: last_error.map(str::to_owned),
            },
            ..Default::default()
        };
        let line = |status| {
            render_status(&report(status), 1_201_000)
                .lines()
                .find(|l| l.starts_with("homeserver ping:"))
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            line(ping(Some(1_000), Some("HTTP 502"))),
            "homeserver ping: failing: HTTP 502 (last ok 1200s ago)"
        );
        assert_eq!(
            line(ping(None, Some("HTTP 502"))),
            "homeserver ping: failing: HTTP 502 (last ok never)"
        );
        assert_eq!(
            line(ping(Some(1_000), None)),
            "homeserver ping: ok 1200s ago"
        );
        assert_eq!(line(ping(None, None)), "homeserver ping: not yet");
    }

    /// A consumer holding no partition consumes nothing while its lag reads 0: the line
    /// says how many it holds, and a roster without lifecycle says so instead of "lag 0".
    #[test]
    fn should_show_the_partitions_lifecycle_holds() {
        let line = |partitions| {
            let mut report = report(Default::default());
            report.lifecycle_partitions = partitions;
            render_status(&report, 0)
                .lines()
                .find(|l| l.starts_with("lifecycle"))
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            line(Some(0)),
            "lifecycle: 0 partitions held, lag 0 messages"
        );
        assert_eq!(
            line(Some(3)),
            "lifecycle: 3 partitions held, lag 0 messages"
        );
        assert_eq!(line(None), "lifecycle: off");
        // A report from a roster without the field reads as "off", not as an error.
        let mut json = serde_json::to_value(report(Default::default())).unwrap();
        json.as_object_mut().unwrap().remove("lifecycle_partitions");
        let older: StatusReport = serde_json::from_value(json).unwrap();
        assert_eq!(older.lifecycle_partitions, None);
    }

    /// A serve that accepts connections and never answers (stopped, wedged) must not hang
    /// `roster status` and the scripts around it: it fails, naming the address. The clock
    /// is paused, so the wait costs no real time.
    #[tokio::test(start_paused = true)]
    async fn should_give_up_on_a_status_that_never_comes() {
        // Connections complete in the kernel's backlog; nothing ever reads or answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        let client =
            AdminClient::resolve(Some(url.clone()), None, &env(&[(TOKEN_VAR, "t")])).unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(24 * 3600), client.status())
            .await
            .expect("roster status gives up on its own");
        let error = answer.expect_err("no status from a silent server");
        let message = error.to_string();
        assert!(
            message.contains(&url) && message.contains("did not answer within"),
            "{message}"
        );
    }

    #[test]
    fn should_say_what_is_missing() {
        let none = AdminClient::resolve(None, None, &env(&[])).err().unwrap();
        assert!(none.to_string().contains(TOKEN_VAR), "{none}");
        let missing = AdminClient::resolve(None, Some(Path::new("/nonexistent.yaml")), &env(&[]))
            .err()
            .unwrap();
        assert!(
            missing.to_string().contains("/nonexistent.yaml"),
            "{missing}"
        );
        let bad = AdminClient::resolve(Some("ftp://x".into()), None, &env(&[(TOKEN_VAR, "t")]))
            .err()
            .unwrap();
        assert!(bad.to_string().contains("ftp://x"), "{bad}");
    }
}
