//! Helpers for the tests of what people and operators meet (tests/people.rs,
//! tests/registrations.rs, tests/operator.rs): reads on the real Synapse as a person or its
//! admin would make them, real Letta agents that already have a conversation, and small
//! stand-ins, each named as one: a pass-through proxy in front of Synapse that can hold
//! roster's requests, a TCP forwarder that appears late, and a Letta stand-in whose history
//! endpoint fails.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use reqwest::Method;
use serde_json::{Value, json};

use super::{Letta, Roster, SERVER_NAME, Scratch, Synapse, free_port};

pub const BOT: &str = "@letta:roster.test";
pub const ADMIN: &str = "@admin:roster.test";

/// The agents file roster reads: `- {id, name}` per agent.
pub fn agents_yaml(agents: &[(impl AsRef<str>, impl AsRef<str>)]) -> String {
    agents
        .iter()
        .map(|(id, name)| format!("- {{id: {}, name: \"{}\"}}\n", id.as_ref(), name.as_ref()))
        .collect()
}

/// Synapse with `@admin` registered (a person's account, and the server's admin), and
/// roster provisioning agents from a file. Each test file adds the helpers only it needs.
pub struct AgentStack {
    pub synapse: Synapse,
    pub roster: Roster,
    /// `@admin`'s own access token.
    pub admin_token: String,
    pub agents_file: PathBuf,
    /// Last: dropped after the processes, so their logs are still there to scan.
    pub scratch: Scratch,
}

impl AgentStack {
    /// `extra_yaml` continues the `agents:` section (indented) or adds sections after it.
    pub async fn start(
        name: &str,
        agents: &[(impl AsRef<str>, impl AsRef<str>)],
        extra_yaml: &str,
    ) -> AgentStack {
        AgentStack::start_with(name, agents, extra_yaml, |_| {}).await
    }

    /// As `start`, with `before_synapse` run on roster's files before Synapse reads them.
    pub async fn start_with(
        name: &str,
        agents: &[(impl AsRef<str>, impl AsRef<str>)],
        extra_yaml: &str,
        before_synapse: impl FnOnce(&Roster),
    ) -> AgentStack {
        let scratch = Scratch::new(name);
        let agents_file = scratch.path().join("agents.yaml");
        std::fs::write(&agents_file, agents_yaml(agents)).unwrap();
        let hs_port = free_port();
        let roster = Roster::configure(
            scratch.path(),
            &format!("http://127.0.0.1:{hs_port}"),
            &format!("agents:\n  file: {}\n{extra_yaml}", agents_file.display()),
        );
        before_synapse(&roster);
        let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
        let admin_token = synapse.admin_token("admin");
        AgentStack {
            synapse,
            roster,
            admin_token,
            agents_file,
            scratch,
        }
    }

    /// Synapse as `@admin` sees it.
    pub fn seen(&self) -> Seen<'_> {
        Seen::new(&self.synapse, &self.admin_token)
    }

    pub fn write_agents(&self, agents: &[(impl AsRef<str>, impl AsRef<str>)]) {
        std::fs::write(&self.agents_file, agents_yaml(agents)).unwrap();
    }

    /// Zero logins by Synapse's live counter; no credential in any roster log.
    pub async fn assert_no_logins_and_no_secrets_logged(&self) {
        self.synapse.assert_no_logins().await;
        self.roster.assert_no_secrets_in_logs(&[&self.admin_token]);
    }
}

/// The localpart of agent `id`'s user and room alias (the old bot's scheme, which roster keeps).
pub fn agent_localpart(id: &str) -> String {
    let x: String = id
        .strip_prefix("agent-")
        .unwrap_or(id)
        .to_lowercase()
        .replace('-', "_")
        .chars()
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
        .collect();
    format!("agent_{x}")
}

pub fn agent_user(id: &str) -> String {
    format!("@{}:{SERVER_NAME}", agent_localpart(id))
}

/// Synapse seen with one account's token (a person's, or the server admin's).
pub struct Seen<'a> {
    pub synapse: &'a Synapse,
    pub token: String,
}

impl<'a> Seen<'a> {
    pub fn new(synapse: &'a Synapse, token: &str) -> Seen<'a> {
        Seen {
            synapse,
            token: token.to_owned(),
        }
    }

    /// A GET that must answer 200.
    pub async fn get(&self, path: &str) -> Value {
        let (status, body) = self
            .synapse
            .call(Method::GET, path, &self.token, None)
            .await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    pub async fn room_for_alias(&self, localpart: &str) -> Option<String> {
        let (status, body) = self
            .synapse
            .call(
                Method::GET,
                &format!("/_matrix/client/v3/directory/room/%23{localpart}:{SERVER_NAME}"),
                &self.token,
                None,
            )
            .await;
        (status == 200).then(|| body["room_id"].as_str().unwrap().to_owned())
    }

    pub async fn space(&self) -> String {
        self.room_for_alias("letta-agents")
            .await
            .expect("the agents space has its alias")
    }

    pub async fn agent_room(&self, agent_id: &str) -> String {
        let lp = agent_localpart(agent_id);
        self.room_for_alias(&lp)
            .await
            .unwrap_or_else(|| panic!("#{lp} resolves"))
    }

    /// Joined members of `room` (admin API).
    pub async fn joined(&self, room: &str) -> BTreeSet<String> {
        self.get(&format!("/_synapse/admin/v1/rooms/{room}/members"))
            .await["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().to_owned())
            .collect()
    }

    /// The current state event `kind`/`key` of `room` (admin API), if any.
    pub async fn state_event(&self, room: &str, kind: &str, key: &str) -> Option<Value> {
        self.get(&format!("/_synapse/admin/v1/rooms/{room}/state"))
            .await["state"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"] == kind && e["state_key"] == key)
            .cloned()
    }

    /// Every `m.room.message` of `room`, oldest first (admin API, whoever is a member).
    pub async fn messages(&self, room: &str) -> Vec<Value> {
        let body = self
            .get(&format!(
                "/_synapse/admin/v1/rooms/{room}/messages?dir=f&limit=1000"
            ))
            .await;
        body["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "m.room.message")
            .cloned()
            .collect()
    }

    /// The admin API's view of `user` (`displayname`, `avatar_url`, ...).
    pub async fn user(&self, user: &str) -> Value {
        self.get(&format!("/_synapse/admin/v2/users/{user}")).await
    }

    /// How many files `user` uploaded, by Synapse's own media list.
    pub async fn uploads_by(&self, user: &str) -> u64 {
        self.get(&format!("/_synapse/admin/v1/users/{user}/media?limit=100"))
            .await["total"]
            .as_u64()
            .unwrap()
    }

    /// Downloads `mxc` (authenticated media); returns the bytes.
    pub async fn download(&self, mxc: &str) -> Vec<u8> {
        let rest = mxc.strip_prefix("mxc://").expect("an mxc:// URI");
        let response = reqwest::Client::new()
            .get(format!(
                "{}/_matrix/client/v1/media/download/{rest}",
                self.synapse.url()
            ))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("synapse answers");
        assert_eq!(response.status(), 200, "download {mxc}");
        response.bytes().await.unwrap().to_vec()
    }

    /// Uploads `bytes` as this account; returns the `mxc://`.
    pub async fn upload(&self, bytes: Vec<u8>, content_type: &str) -> String {
        let response = reqwest::Client::new()
            .post(format!(
                "{}/_matrix/media/v3/upload?filename=mine.png",
                self.synapse.url()
            ))
            .bearer_auth(&self.token)
            .header("content-type", content_type)
            .body(bytes)
            .send()
            .await
            .expect("synapse answers");
        assert_eq!(response.status(), 200, "upload");
        let body: Value = response.json().await.unwrap();
        body["content_uri"].as_str().unwrap().to_owned()
    }

    /// Sends a text message to `room` as this account; returns the event id.
    pub async fn say(&self, room: &str, text: &str) -> String {
        let txn = super::uuid_like();
        let (status, body) = self
            .synapse
            .call(
                Method::PUT,
                &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}"),
                &self.token,
                Some(json!({ "msgtype": "m.text", "body": text })),
            )
            .await;
        assert_eq!(status, 200, "send to {room}: {body}");
        body["event_id"].as_str().unwrap().to_owned()
    }
}

/// A client-server call as `user`, by appservice masquerading with `as_token`.
pub async fn as_user(
    synapse: &Synapse,
    as_token: &str,
    user: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let sep = if path.contains('?') { '&' } else { '?' };
    synapse
        .call(
            method,
            &format!("{path}{sep}user_id={user}"),
            as_token,
            body,
        )
        .await
}

/// Registers `localpart` through the appservice whose `as_token` this is (no login).
pub async fn register_as_appservice(synapse: &Synapse, as_token: &str, localpart: &str) {
    let (status, body) = synapse
        .call(
            Method::POST,
            "/_matrix/client/v3/register",
            as_token,
            Some(json!({ "type": "m.login.application_service", "username": localpart, "inhibit_login": true })),
        )
        .await;
    assert_eq!(status, 200, "register {localpart}: {body}");
}

/// `synapse_appservice_api_sent_transactions_total{service}`: transactions Synapse pushed to
/// the appservice with this id.
pub async fn pushed_transactions(synapse: &Synapse, service: &str) -> u64 {
    let text = reqwest::get(format!(
        "http://127.0.0.1:{}/_synapse/metrics",
        synapse.metrics_port
    ))
    .await
    .expect("synapse metrics")
    .text()
    .await
    .unwrap();
    super::sum_samples(
        &text,
        "synapse_appservice_api_sent_transactions_total",
        &[&format!("service=\"{service}\"")],
    )
}

impl Letta {
    /// Creates an agent offline with a conversation already stored: `(role, text)` pairs,
    /// role `user` or `assistant`. Letta stores an assistant message as a `send_message`
    /// tool call (listed as an `assistant_message`) and adds its own system message first.
    pub async fn create_agent_with_history(
        &self,
        name: &str,
        conversation: &[(&str, &str)],
    ) -> String {
        let sequence: Vec<Value> = conversation
            .iter()
            .map(|(role, text)| json!({ "role": role, "content": text }))
            .collect();
        let body = json!({ "name": name, "model": "letta/letta-free", "embedding": "letta/letta-free",
                           "initial_message_sequence": sequence });
        let agent = self.call(Method::POST, "/v1/agents/", Some(body)).await;
        agent["id"]
            .as_str()
            .expect("a created agent has an id")
            .to_owned()
    }

    /// `GET /v1/agents/{id}/messages?limit=N`: the newest N, oldest first.
    pub async fn messages(&self, agent: &str, limit: u32) -> Vec<Value> {
        self.call(
            Method::GET,
            &format!("/v1/agents/{agent}/messages?limit={limit}"),
            None,
        )
        .await
        .as_array()
        .expect("a list of messages")
        .clone()
    }

    /// Dates stored message `id` at `at` (`YYYY-MM-DD HH:MM:SS`, UTC). Letta's API cannot
    /// date a message (every message of `initial_message_sequence` gets the same second),
    /// so the test writes Letta's own `messages.created_at`, as a conversation spread over
    /// time leaves it; listing order is Letta's sequence id, which this does not touch.
    pub fn date_message(&self, id: &str, at: &str) {
        let db = rusqlite::Connection::open(self.dir.join(".letta/sqlite.db"))
            .expect("open Letta's sqlite database");
        db.busy_timeout(std::time::Duration::from_secs(30)).unwrap();
        let changed = db
            .execute(
                "UPDATE messages SET created_at = ?1 WHERE id = ?2",
                (format!("{at}.000000"), id),
            )
            .unwrap();
        assert_eq!(changed, 1, "one stored message {id}");
    }
}

/// A pass-through proxy (the test's own, not a homeserver) in front of the real Synapse:
/// roster's `homeserver.url` points here. It forwards every request as it is, and counts
/// message sends (`PUT .../send/m.room.message/{txnId}`) by transaction id. After
/// `pass_sends` sends it still forwards a send to Synapse (the message is posted) but holds
/// the answer back for good, so roster never learns the send succeeded.
pub struct HsProxy {
    pub url: String,
    state: Arc<ProxyState>,
}

struct ProxyState {
    target: String,
    http: reqwest::Client,
    pass_sends: AtomicU64,
    sends: Mutex<Vec<String>>,
    held: AtomicU64,
}

impl HsProxy {
    pub async fn start(target: &str) -> HsProxy {
        let state = Arc::new(ProxyState {
            target: target.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
            pass_sends: AtomicU64::new(u64::MAX),
            sends: Mutex::new(Vec::new()),
            held: AtomicU64::new(0),
        });
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        HsProxy { url, state }
    }

    /// Answers only the first `n` message sends from now on (counting every send so far).
    pub fn hold_sends_after(&self, n: u64) {
        self.state.pass_sends.store(n, Ordering::SeqCst);
    }

    /// Answers every send again (held answers stay held).
    pub fn answer_all(&self) {
        self.state.pass_sends.store(u64::MAX, Ordering::SeqCst);
    }

    /// The transaction ids of every message send, in the order they arrived.
    pub fn sends(&self) -> Vec<String> {
        self.state.sends.lock().unwrap().clone()
    }

    /// Sends whose answer is held back.
    pub fn held(&self) -> u64 {
        self.state.held.load(Ordering::SeqCst)
    }
}

async fn forward(
    axum::extract::State(state): axum::extract::State<Arc<ProxyState>>,
    request: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(body, 64 << 20).await.unwrap();
    let send = parts
        .uri
        .path()
        .split_once("/send/m.room.message/")
        .map(|(_, txn)| txn.to_owned());
    let number = send.as_ref().map(|txn| {
        let mut sends = state.sends.lock().unwrap();
        sends.push(txn.clone());
        sends.len() as u64
    });
    let mut outgoing = state
        .http
        .request(parts.method.clone(), format!("{}{path}", state.target))
        .body(bytes.to_vec());
    for name in ["authorization", "content-type"] {
        if let Some(value) = parts.headers.get(name) {
            outgoing = outgoing.header(name, value.clone());
        }
    }
    let answer = match outgoing.send().await {
        Ok(answer) => answer,
        Err(e) => {
            return (axum::http::StatusCode::BAD_GATEWAY, e.to_string()).into_response();
        }
    };
    let status = answer.status().as_u16();
    let content_type = answer.headers().get("content-type").cloned();
    let body = answer.bytes().await.unwrap_or_default();
    if number.is_some_and(|n| n > state.pass_sends.load(Ordering::SeqCst)) {
        state.held.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<()>().await;
    }
    let mut response = (
        axum::http::StatusCode::from_u16(status).unwrap(),
        body.to_vec(),
    )
        .into_response();
    if let Some(content_type) = content_type {
        response.headers_mut().insert("content-type", content_type);
    }
    response
}

/// Forwards TCP connections from `127.0.0.1:listen` to `127.0.0.1:target` from now on:
/// an address that starts answering late, as a Kubernetes Service does once a pod is ready.
pub async fn forward_tcp(listen: u16, target: u16) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", listen))
        .await
        .unwrap_or_else(|e| panic!("bind 127.0.0.1:{listen}: {e}"));
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) =
                    tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

/// A Letta stand-in (not the real server): lists `agents` as Letta does and answers every
/// agent's `/messages` with `messages_status` and a fixed body. Remembers the
/// `Authorization` header of every request it got, and counts history reads.
pub struct LettaStandIn {
    pub url: String,
    state: Arc<StandInState>,
}

struct StandInState {
    agents: Value,
    messages_status: u16,
    authorization: Mutex<Vec<Option<String>>>,
    history_reads: AtomicU64,
}

impl LettaStandIn {
    pub async fn start(agents: Value, messages_status: u16) -> LettaStandIn {
        let state = Arc::new(StandInState {
            agents,
            messages_status,
            authorization: Mutex::new(Vec::new()),
            history_reads: AtomicU64::new(0),
        });
        let app = axum::Router::new()
            .route("/v1/agents/", axum::routing::get(standin_list))
            .route(
                "/v1/agents/{id}/messages",
                axum::routing::get(standin_messages),
            )
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        LettaStandIn { url, state }
    }

    /// The `Authorization` headers received, in order (`None`: the request had none).
    pub fn authorization(&self) -> Vec<Option<String>> {
        self.state.authorization.lock().unwrap().clone()
    }

    pub fn history_reads(&self) -> u64 {
        self.state.history_reads.load(Ordering::SeqCst)
    }
}

fn remember_authorization(state: &StandInState, headers: &axum::http::HeaderMap) {
    state.authorization.lock().unwrap().push(
        headers
            .get("authorization")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
    );
}

async fn standin_list(
    axum::extract::State(state): axum::extract::State<Arc<StandInState>>,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
    headers: axum::http::HeaderMap,
) -> axum::Json<Value> {
    remember_authorization(&state, &headers);
    if query.contains_key("after") {
        return axum::Json(json!([]));
    }
    axum::Json(state.agents.clone())
}

async fn standin_messages(
    axum::extract::State(state): axum::extract::State<Arc<StandInState>>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    remember_authorization(&state, &headers);
    state.history_reads.fetch_add(1, Ordering::SeqCst);
    (
        axum::http::StatusCode::from_u16(state.messages_status).unwrap(),
        "database is locked",
    )
        .into_response()
}
