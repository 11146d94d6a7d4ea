//! Lists the agents that should exist, from a Letta server or an agents file.
//!
//! Invariants:
//! - A listing is complete or it is an error. A Letta error, a timeout, an undecodable or
//!   oversized answer, a page that repeats an agent, more agents than the bound, or an
//!   unreadable, empty or invalid file never becomes an empty or shortened listing, so no
//!   failure can look like "all agents deleted". What an absent agent means (removal after
//!   the grace period) is the reconciler's decision, not this module's.
//! - Agents are keyed by id (names are not unique): a listing holds each id once, sorted by id.
//! - Bounded: every Letta request has a timeout, every page and file a byte bound, and a
//!   listing stops at `max_agents`, so a misbehaving server cannot make it loop or grow.
//! - Knows nothing of the homeserver.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{AgentsConfig, Secret};
use crate::ids::agent_localpart;
use crate::metrics::{Metrics, SourceLabels};
use crate::model::agents::{Agent, HistoryMessage, HistoryRole};

/// Agents asked for per Letta request: Letta's own default.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// A listing with more agents than this is refused: far above any real deployment, low
/// enough that a server which pages forever is caught after a few hundred requests.
pub const DEFAULT_MAX_AGENTS: usize = 10_000;
/// Upper bound on one Letta request, body included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// A Letta agent carries its memory, tools and system prompt (10-50 KB each in 0.11), so a
/// page of 50 is a few MB; this only stops an endless body.
const MAX_PAGE_BYTES: usize = 64 << 20;
/// An agents file larger than this is certainly not a hand-written list.
const MAX_FILE_BYTES: u64 = 16 << 20;

/// Agents a source lists, complete: only a listing that reached its end is ever returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Unique by id, sorted by id.
    pub agents: Vec<Agent>,
    /// Letta requests (or file reads) it took; at least 1, so an empty listing is one that
    /// was read to its end, never a default.
    pub pages: usize,
}

/// Why a source could not list its agents. Messages name the URL or file and what to do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    #[error(
        "agents.letta_url and agents.file are both set; agents come from one source: unset one"
    )]
    BothConfigured,
    #[error("agents.letta_url {url:?} is not an http(s) URL; expected e.g. http://letta:8283")]
    InvalidUrl { url: String },
    #[error(
        "cannot reach Letta at {url}: {reason}; check agents.letta_url and that Letta is running"
    )]
    Unreachable { url: String, reason: String },
    #[error("Letta did not answer {url} within {timeout:?}; is it overloaded or down?")]
    Timeout { url: String, timeout: Duration },
    #[error("Letta answered {url} with HTTP {status}: {body}; {hint}", hint = status_hint(.status))]
    Status {
        url: String,
        status: u16,
        /// The start of the answer, on one line.
        body: String,
    },
    #[error(
        "Letta's answer to {url} is not a JSON list of agents ({reason}); is agents.letta_url a Letta server?"
    )]
    Undecodable { url: String, reason: String },
    #[error(
        "Letta's answer to {url} is larger than {max_bytes} bytes; is agents.letta_url a Letta server?"
    )]
    TooLarge { url: String, max_bytes: usize },
    #[error(
        "Letta listed agent {id} again on page {page} ({url}): it restarted from the first page, \
         as it does when the `after` cursor is unknown (an agent deleted while paging) or when \
         it ignores `after`; the incomplete listing was discarded, the next poll retries"
    )]
    RepeatedAgent {
        url: String,
        id: String,
        page: usize,
    },
    #[error(
        "Letta listed more than {max} agents (last page {url}); roster reads at most {max}, \
         is Letta paging in a loop?"
    )]
    TooManyAgents { url: String, max: usize },
    #[error("cannot read agents file {path}: {reason}; check agents.file")]
    FileUnreadable { path: PathBuf, reason: String },
    #[error("agents file {path} is empty (half written?); write [] to list no agents")]
    FileEmpty { path: PathBuf },
    #[error("agents file {path} is not a YAML list of {{id, name}}: {reason}")]
    FileSyntax { path: PathBuf, reason: String },
    #[error("agents file {path}, entry {entry}: {reason}")]
    FileEntry {
        path: PathBuf,
        /// 1-based, as an operator counts.
        entry: usize,
        reason: String,
    },
}

impl SourceError {
    /// A short stable name for the kind of failure: the `outcome` label of
    /// `roster_source_polls_total`, and a key for status.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceError::BothConfigured | SourceError::InvalidUrl { .. } => "misconfigured",
            SourceError::Unreachable { .. } => "unreachable",
            SourceError::Timeout { .. } => "timeout",
            SourceError::Status { .. } => "http_error",
            SourceError::Undecodable { .. } | SourceError::TooLarge { .. } => "undecodable",
            SourceError::RepeatedAgent { .. } => "repeated_page",
            SourceError::TooManyAgents { .. } => "too_many_agents",
            SourceError::FileUnreadable { .. } => "file_unreadable",
            SourceError::FileEmpty { .. }
            | SourceError::FileSyntax { .. }
            | SourceError::FileEntry { .. } => "file_invalid",
        }
    }
}

fn status_hint(status: &u16) -> &'static str {
    match status {
        401 | 403 => "check agents.letta_token (LETTA_TOKEN)",
        404 => "check that agents.letta_url is the Letta server's base URL",
        500.. => "see the Letta server's log",
        _ => "is agents.letta_url a Letta server?",
    }
}

/// The agents a polling loop asks for: a Letta server or an agents file, counted in
/// `roster_source_polls_total{source,outcome}` and logged on every `list`.
pub struct AgentSource {
    kind: Kind,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
enum Kind {
    Letta(LettaSource),
    File(FileSource),
}

impl AgentSource {
    /// The source `agents` configures: Letta when `letta_url` is set, the file when `file`
    /// is, `None` when neither (agents then come only from the admin API), an error when both.
    pub fn from_config(
        agents: &AgentsConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Option<AgentSource>, SourceError> {
        match (&agents.letta_url, &agents.file) {
            (Some(_), Some(_)) => Err(SourceError::BothConfigured),
            (Some(url), None) => {
                let letta = LettaSource::new(url, agents.letta_token.clone(), DEFAULT_TIMEOUT)?;
                Ok(Some(AgentSource::letta(letta, metrics)))
            }
            (None, Some(path)) => Ok(Some(AgentSource::file(FileSource::new(path), metrics))),
            (None, None) => Ok(None),
        }
    }

    pub fn letta(source: LettaSource, metrics: Arc<Metrics>) -> AgentSource {
        AgentSource {
            kind: Kind::Letta(source),
            metrics,
        }
    }

    pub fn file(source: FileSource, metrics: Arc<Metrics>) -> AgentSource {
        AgentSource {
            kind: Kind::File(source),
            metrics,
        }
    }

    /// `letta` or `file`: the `source` label of the metric, and a name for logs and status.
    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Letta(_) => "letta",
            Kind::File(_) => "file",
        }
    }

    /// Lists every agent, or fails; counts and logs the outcome.
    pub async fn list(&self) -> Result<Listing, SourceError> {
        let listed = match &self.kind {
            Kind::Letta(letta) => letta.list().await,
            Kind::File(file) => file.list().await,
        };
        let outcome = match &listed {
            Ok(listing) => {
                tracing::debug!(
                    source = self.name(),
                    agents = listing.agents.len(),
                    pages = listing.pages,
                    "listed agents"
                );
                "ok"
            }
            Err(error) => {
                tracing::warn!(source = self.name(), error = %error, "cannot list agents");
                error.kind()
            }
        };
        self.metrics
            .source_polls
            .get_or_create(&SourceLabels {
                source: self.name(),
                outcome,
            })
            .inc();
        listed
    }
}

impl fmt::Debug for AgentSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentSource")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for AgentSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Letta(letta) => write!(f, "Letta at {}", letta.list_url),
            Kind::File(file) => write!(f, "agents file {}", file.path.display()),
        }
    }
}

/// Lists agents from a Letta server: `GET {base}/v1/agents/?limit=N&after=ID`, page by page.
#[derive(Debug, Clone)]
pub struct LettaSource {
    http: reqwest::Client,
    /// `{base}/v1/agents/`: without the trailing slash Letta answers 307.
    list_url: reqwest::Url,
    token: Option<Secret>,
    timeout: Duration,
    page_size: usize,
    max_agents: usize,
}

impl LettaSource {
    /// A source for the Letta server at `base_url` (e.g. `http://letta:8283`, a path prefix
    /// is kept), sending `token` as a bearer token when set.
    pub fn new(
        base_url: &str,
        token: Option<Secret>,
        timeout: Duration,
    ) -> Result<LettaSource, SourceError> {
        let invalid = || SourceError::InvalidUrl {
            url: base_url.to_owned(),
        };
        let list_url =
            reqwest::Url::parse(&format!("{}/v1/agents/", base_url.trim_end_matches('/')))
                .map_err(|_| invalid())?;
        if !matches!(list_url.scheme(), "http" | "https") || list_url.query().is_some() {
            return Err(invalid());
        }
        let http = crate::http_client(timeout);
        Ok(LettaSource {
            http,
            list_url,
            token,
            timeout,
            page_size: DEFAULT_PAGE_SIZE,
            max_agents: DEFAULT_MAX_AGENTS,
        })
    }

    /// Agents asked for per request (at least 1).
    pub fn with_page_size(mut self, page_size: usize) -> LettaSource {
        self.page_size = page_size.max(1);
        self
    }

    /// More agents than this make the listing an error.
    pub fn with_max_agents(mut self, max_agents: usize) -> LettaSource {
        self.max_agents = max_agents;
        self
    }

    /// `{base}/v1/agents/`, for logs and status.
    pub fn url(&self) -> &str {
        self.list_url.as_str()
    }

    /// Reads pages until a short one.
    ///
    /// Terminates: a page either is short (the end), repeats an id (an error: Letta
    /// silently restarts from the first page when `after` is unknown, so what was read is
    /// not the whole list), or adds `page_size` new ids, and more than `max_agents` ids is
    /// an error. So at most `max_agents / page_size + 1` requests are made.
    pub async fn list(&self) -> Result<Listing, SourceError> {
        let mut seen = HashSet::new();
        let mut agents = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            pages += 1;
            let url = self.page_url(after.as_deref());
            let page = self.page(&url).await?;
            let full = page.len() >= self.page_size;
            after = page.last().map(|agent| agent.id.clone());
            for agent in page {
                if !seen.insert(agent.id.clone()) {
                    return Err(SourceError::RepeatedAgent {
                        url: url.into(),
                        id: agent.id,
                        page: pages,
                    });
                }
                agents.push(agent);
            }
            if agents.len() > self.max_agents {
                return Err(SourceError::TooManyAgents {
                    url: url.into(),
                    max: self.max_agents,
                });
            }
            if !full {
                break;
            }
        }
        agents.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Listing { agents, pages })
    }

    fn page_url(&self, after: Option<&str>) -> reqwest::Url {
        let mut url = self.list_url.clone();
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("limit", &self.page_size.to_string());
            if let Some(after) = after {
                query.append_pair("after", after);
            }
        }
        url
    }

    async fn page(&self, url: &reqwest::Url) -> Result<Vec<Agent>, SourceError> {
        let agents: Vec<Agent> = self.get_json(url).await?;
        if let Some(position) = agents.iter().position(|a| a.id.trim().is_empty()) {
            return Err(SourceError::Undecodable {
                url: url.to_string(),
                reason: format!("agent [{position}] has an empty id"),
            });
        }
        Ok(agents)
    }

    /// `GET url` with the token; the body (bounded) decoded as `T`, or a named error.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &reqwest::Url,
    ) -> Result<T, SourceError> {
        let mut request = self
            .http
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(token) = &self.token {
            request = request.bearer_auth(token.expose());
        }
        let transport = |error: reqwest::Error| {
            if error.is_timeout() {
                SourceError::Timeout {
                    url: url.to_string(),
                    timeout: self.timeout,
                }
            } else {
                SourceError::Unreachable {
                    url: url.to_string(),
                    reason: crate::error_chain(&error.without_url()),
                }
            }
        };
        let mut response = request.send().await.map_err(transport)?;
        let status = response.status();
        let mut body = Vec::new();
        let mut truncated = false;
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_PAGE_BYTES {
                truncated = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            return Err(SourceError::Status {
                url: url.to_string(),
                status: status.as_u16(),
                body: snippet(&body),
            });
        }
        if truncated {
            return Err(SourceError::TooLarge {
                url: url.to_string(),
                max_bytes: MAX_PAGE_BYTES,
            });
        }
        let deserializer = &mut serde_json::Deserializer::from_slice(&body);
        serde_path_to_error::deserialize(deserializer).map_err(|e| SourceError::Undecodable {
            url: url.to_string(),
            reason: format!("{e}; the answer starts with {:?}", snippet(&body)),
        })
    }

    /// The agent's last `limit` user and assistant messages, oldest first.
    ///
    /// Letta 0.11 answers `GET /v1/agents/{id}/messages?limit=N` with the newest N stored
    /// messages, oldest first, of every kind (system, reasoning, tool calls); pages further
    /// back with `before=<oldest id>`. Only user and assistant messages with text count;
    /// Letta's own JSON notices posing as user messages (login, heartbeat) are skipped.
    ///
    /// Letta counts rows it does not list against N (the tool return stored after every
    /// assistant message), so pages ask for twice the messages wanted, and a short page
    /// does not mean the start was reached: pages go back until enough messages are found,
    /// or a page brings no message not seen before (the start, or a server ignoring
    /// `before`).
    pub async fn recent_messages(
        &self,
        agent_id: &str,
        limit: u32,
    ) -> Result<Vec<HistoryMessage>, SourceError> {
        const MAX_PAGES: usize = 10;
        let mut base = self.list_url.clone();
        base.path_segments_mut()
            .map_err(|_| SourceError::InvalidUrl {
                url: self.list_url.to_string(),
            })?
            .pop_if_empty()
            .push(agent_id)
            .push("messages");
        let mut found: Vec<HistoryMessage> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut before: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut url = base.clone();
            {
                let mut query = url.query_pairs_mut();
                query.append_pair("limit", &limit.max(1).saturating_mul(2).to_string());
                if let Some(before) = &before {
                    query.append_pair("before", before);
                }
            }
            let page: Vec<LettaMessage> = self.get_json(&url).await?;
            before = page.first().map(|m| m.id.clone());
            let page: Vec<LettaMessage> =
                page.into_iter().filter(|m| !seen.contains(&m.id)).collect();
            if page.is_empty() {
                break;
            }
            seen.extend(page.iter().map(|m| m.id.clone()));
            let mut older: Vec<HistoryMessage> =
                page.into_iter().filter_map(LettaMessage::history).collect();
            older.dedup_by(|a, b| a.id == b.id && a.role == b.role);
            older.append(&mut found);
            found = older;
            if found.len() >= limit as usize {
                break;
            }
        }
        let skip = found.len().saturating_sub(limit as usize);
        Ok(found.split_off(skip))
    }
}

/// One message as Letta lists it; only what roster uses.
#[derive(serde::Deserialize)]
struct LettaMessage {
    id: String,
    message_type: String,
    #[serde(default)]
    content: Option<serde_json::Value>,
    #[serde(default)]
    date: Option<String>,
    #[serde(default)]
    is_err: Option<bool>,
}

impl LettaMessage {
    fn history(self) -> Option<HistoryMessage> {
        let role = match self.message_type.as_str() {
            "user_message" => HistoryRole::User,
            "assistant_message" => HistoryRole::Assistant,
            _ => return None,
        };
        if self.is_err == Some(true) {
            return None;
        }
        let text = match self.content? {
            serde_json::Value::String(text) => text,
            serde_json::Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join(""),
            _ => return None,
        };
        // Letta's notices (login, heartbeat, system alerts) are JSON objects with a type.
        if role == HistoryRole::User
            && serde_json::from_str::<serde_json::Value>(&text)
                .is_ok_and(|v| v.get("type").is_some_and(|t| t.is_string()))
        {
            return None;
        }
        if text.trim().is_empty() {
            return None;
        }
        Some(HistoryMessage {
            at_ms: self
                .date
                .as_deref()
                .and_then(crate::clock::parse_rfc3339_ms),
            id: self.id,
            role,
            text,
        })
    }
}

/// The first 200 characters of `body`, on one line.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(800)]);
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &one_line[..cut]),
        None if one_line.is_empty() => "(no body)".into(),
        None => one_line,
    }
}

/// Lists agents from a YAML file: a list of `{id, name}` (other keys are ignored), read
/// whole on every poll (a hand-written file is small).
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> FileSource {
        FileSource { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and checks the whole file ([`read_agents_file`], off the async runtime).
    pub async fn list(&self) -> Result<Listing, SourceError> {
        let path = self.path.clone();
        let agents = tokio::task::spawn_blocking(move || read_agents_file(&path))
            .await
            .map_err(|error| SourceError::FileUnreadable {
                path: self.path.clone(),
                reason: error.to_string(),
            })??;
        Ok(Listing { agents, pages: 1 })
    }
}

/// Reads and checks an agents file, blocking: what [`FileSource::list`] lists and what
/// `check-config` checks before anything starts.
pub fn read_agents_file(path: &Path) -> Result<Vec<Agent>, SourceError> {
    let unreadable = |error: std::io::Error| SourceError::FileUnreadable {
        path: path.to_owned(),
        reason: error.to_string(),
    };
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(SourceError::FileUnreadable {
            path: path.to_owned(),
            reason: format!("it is larger than {MAX_FILE_BYTES} bytes"),
        });
    }
    let text = std::fs::read_to_string(path).map_err(unreadable)?;
    parse_agents_file(path, &text)
}

/// Parses an agents file's text (`path` only names it in errors): every entry needs a
/// non-empty `id` that makes a Matrix user and a non-empty `name`; two entries may not share
/// an id or map to the same Matrix user. Sorted by id.
pub fn parse_agents_file(path: &Path, text: &str) -> Result<Vec<Agent>, SourceError> {
    let syntax = |reason: String| SourceError::FileSyntax {
        path: path.to_owned(),
        reason,
    };
    let items = match serde_yaml::from_str::<serde_yaml::Value>(text) {
        Ok(serde_yaml::Value::Sequence(items)) => items,
        Ok(serde_yaml::Value::Null) => {
            return Err(SourceError::FileEmpty {
                path: path.to_owned(),
            });
        }
        Ok(_) => return Err(syntax("the top level is not a list".into())),
        Err(error) => return Err(syntax(error.to_string())),
    };
    let mut by_id: HashMap<String, usize> = HashMap::new();
    let mut by_localpart: HashMap<String, (usize, String)> = HashMap::new();
    let mut agents = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let entry = index + 1;
        let fail = |reason: String| SourceError::FileEntry {
            path: path.to_owned(),
            entry,
            reason,
        };
        let agent: Agent = serde_yaml::from_value(item)
            .map_err(|e| fail(format!("{e}; expected {{id: ..., name: ...}}")))?;
        if agent.id.trim().is_empty() {
            return Err(fail("id is empty".into()));
        }
        let Some(localpart) = agent_localpart(&agent.id) else {
            return Err(fail(format!(
                "id {:?} has no letter, digit or '_' to make a Matrix user from",
                agent.id
            )));
        };
        if agent.name.trim().is_empty() {
            return Err(fail(format!("name of {:?} is empty", agent.id)));
        }
        if let Some(first) = by_id.insert(agent.id.clone(), entry) {
            return Err(fail(format!(
                "id {:?} is also entry {first}; ids must be unique",
                agent.id
            )));
        }
        if let Some((first, other)) =
            by_localpart.insert(localpart.clone(), (entry, agent.id.clone()))
        {
            return Err(fail(format!(
                "id {:?} makes the same Matrix user ({localpart}) as entry {first} ({other:?})",
                agent.id
            )));
        }
        agents.push(agent);
    }
    agents.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(agents)
}

impl crate::reconcile::ListAgents for AgentSource {
    fn describe(&self) -> String {
        self.to_string()
    }

    fn keeps_history(&self) -> bool {
        matches!(self.kind, Kind::Letta(_))
    }

    fn history(
        &self,
        agent_id: &str,
        limit: u32,
    ) -> futures::future::BoxFuture<'_, Result<Option<Vec<HistoryMessage>>, String>> {
        let agent_id = agent_id.to_owned();
        Box::pin(async move {
            match &self.kind {
                Kind::Letta(letta) => letta
                    .recent_messages(&agent_id, limit)
                    .await
                    .map(Some)
                    .map_err(|e| e.to_string()),
                Kind::File(_) => Ok(None),
            }
        })
    }

    fn list(&self) -> futures::future::BoxFuture<'_, Result<Vec<Agent>, String>> {
        Box::pin(async move {
            AgentSource::list(self)
                .await
                .map(|listing| listing.agents)
                .map_err(|e| e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, name: &str) -> Agent {
        Agent {
            id: id.into(),
            name: name.into(),
        }
    }

    fn parse(text: &str) -> Result<Vec<Agent>, SourceError> {
        parse_agents_file(Path::new("/etc/roster/agents.yaml"), text)
    }

    fn parse_err(text: &str) -> String {
        let message = parse(text).expect_err(text).to_string();
        assert!(
            message.contains("/etc/roster/agents.yaml"),
            "names the file: {message}"
        );
        assert!(!message.contains('\n'), "one line: {message}");
        message
    }

    #[test]
    fn should_parse_agents_sorted_by_id_keeping_repeated_names() {
        let agents = parse(
            "- {id: agent-b, name: Helper}\n\
             - id: agent-a\n  name: Helper\n  description: ignored\n",
        )
        .unwrap();
        assert_eq!(
            agents,
            vec![agent("agent-a", "Helper"), agent("agent-b", "Helper")]
        );
    }

    #[test]
    fn should_accept_an_empty_list_but_not_an_empty_file() {
        assert_eq!(parse("[]").unwrap(), vec![]);
        for empty in ["", "\n", "# no agents yet\n", "~"] {
            let message = parse_err(empty);
            assert!(message.contains("write []"), "{message}");
        }
    }

    #[test]
    fn should_reject_duplicate_ids_naming_both_entries() {
        let message = parse_err(
            "- {id: agent-a, name: One}\n- {id: agent-b, name: Two}\n- {id: agent-a, name: Three}\n",
        );
        assert!(message.contains("entry 3"), "{message}");
        assert!(message.contains("entry 1"), "{message}");
        assert!(message.contains("agent-a"), "{message}");
    }

    #[test]
    fn should_reject_ids_that_make_the_same_matrix_user() {
        let message = parse_err("- {id: agent-AB-1, name: One}\n- {id: agent-ab_1, name: Two}\n");
        assert!(message.contains("entry 2"), "{message}");
        assert!(message.contains("entry 1"), "{message}");
        assert!(message.contains("agent_ab_1"), "{message}");
    }

    #[test]
    fn should_name_the_entry_of_a_bad_entry() {
        for (text, needles) in [
            (
                "- {id: agent-a, name: A}\n- {id: agent-b}\n",
                &["entry 2", "name"][..],
            ),
            (
                "- {id: agent-a, name: A}\n- agent-b\n",
                &["entry 2", "{id: ..., name: ...}"],
            ),
            ("- {id: [1], name: A}\n", &["entry 1", "id"]),
            ("- {id: '  ', name: A}\n", &["entry 1", "id is empty"]),
            (
                "- {id: '!!!', name: A}\n",
                &["entry 1", "\"!!!\"", "Matrix user"],
            ),
            (
                "- {id: agent-a, name: ''}\n",
                &["entry 1", "name", "agent-a"],
            ),
        ] {
            let message = parse_err(text);
            for needle in needles {
                assert!(message.contains(needle), "{message:?} lacks {needle:?}");
            }
        }
    }

    #[test]
    fn should_reject_a_file_that_is_not_a_list() {
        for (text, needle) in [
            ("agents:\n  - {id: a, name: A}\n", "not a list"),
            ("- {id: a, name: A\n", "YAML"),
        ] {
            let message = parse_err(text);
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        }
    }

    #[tokio::test]
    async fn should_read_the_file_each_time_and_name_it_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agents.yaml");
        let source = FileSource::new(&path);
        let message = source.list().await.unwrap_err().to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        std::fs::write(&path, "- {id: agent-a, name: A}\n").unwrap();
        assert_eq!(
            source.list().await.unwrap().agents,
            vec![agent("agent-a", "A")]
        );
        std::fs::write(&path, "- {id: agent-a, name: B}\n").unwrap();
        assert_eq!(
            source.list().await.unwrap().agents,
            vec![agent("agent-a", "B")]
        );
        std::fs::write(
            &path,
            "- {id: agent-a, name: A}\n- {id: agent-a, name: A}\n",
        )
        .unwrap();
        assert!(matches!(
            source.list().await,
            Err(SourceError::FileEntry { entry: 2, .. })
        ));
    }

    #[test]
    fn should_build_page_urls_with_the_trailing_slash_letta_needs() {
        for base in ["http://letta:8283", "http://letta:8283/"] {
            let source = LettaSource::new(base, None, DEFAULT_TIMEOUT).unwrap();
            assert_eq!(source.url(), "http://letta:8283/v1/agents/");
        }
        let source = LettaSource::new("https://host/letta/", None, DEFAULT_TIMEOUT)
            .unwrap()
            .with_page_size(2);
        assert_eq!(
            source.page_url(None).as_str(),
            "https://host/letta/v1/agents/?limit=2"
        );
        assert_eq!(
            source.page_url(Some("agent-1 2&x")).as_str(),
            "https://host/letta/v1/agents/?limit=2&after=agent-1+2%26x"
        );
        for bad in [
            "letta:8283",
            "ftp://letta",
            "not a url",
            "http://letta/?x=1",
        ] {
            let error = LettaSource::new(bad, None, DEFAULT_TIMEOUT).unwrap_err();
            assert!(matches!(error, SourceError::InvalidUrl { .. }), "{bad}");
            assert!(error.to_string().contains("agents.letta_url"));
        }
    }

    #[test]
    fn should_take_agents_from_exactly_one_configured_source() {
        let metrics = Arc::new(Metrics::new());
        let mut config = AgentsConfig::default();
        assert!(
            AgentSource::from_config(&config, metrics.clone())
                .unwrap()
                .is_none()
        );
        config.file = Some("agents.yaml".into());
        let file = AgentSource::from_config(&config, metrics.clone())
            .unwrap()
            .unwrap();
        assert_eq!(file.name(), "file");
        assert_eq!(file.to_string(), "agents file agents.yaml");
        config.letta_url = Some("http://letta:8283".into());
        assert!(matches!(
            AgentSource::from_config(&config, metrics.clone()),
            Err(SourceError::BothConfigured)
        ));
        config.file = None;
        let letta = AgentSource::from_config(&config, metrics).unwrap().unwrap();
        assert_eq!(letta.name(), "letta");
        assert_eq!(letta.to_string(), "Letta at http://letta:8283/v1/agents/");
    }

    #[test]
    fn should_keep_error_bodies_short_and_on_one_line() {
        assert_eq!(
            snippet(b"  Internal\n  Server   Error "),
            "Internal Server Error"
        );
        let long = snippet("é".repeat(1000).as_bytes());
        assert_eq!(long.chars().count(), 203);
        assert_eq!(snippet(b" \n"), "(no body)");
    }
}
