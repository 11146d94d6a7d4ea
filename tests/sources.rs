//! Agent sources against a real Letta server, and against a stand-in that misbehaves the
//! ways a Letta server can: errors, garbage, silence, and paging that restarts or never
//! ends. Every case gives a complete listing or an error, never a short or empty one.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use roster::config::Secret;
use roster::metrics::Metrics;
use roster::model::agents::Agent;
use roster::sources::{AgentSource, FileSource, LettaSource, Listing, SourceError};
use serde_json::{Value, json};
use support::*;

/// Long enough for any answer on a busy machine: only the timeout test waits less.
const PATIENT: Duration = Duration::from_secs(60);

fn agent(id: &str, name: &str) -> Agent {
    Agent {
        id: id.into(),
        name: name.into(),
    }
}

fn sorted(mut agents: Vec<Agent>) -> Vec<Agent> {
    agents.sort_by(|a, b| a.id.cmp(&b.id));
    agents
}

/// Five agents, newest first as Letta lists them; two share a name.
fn five() -> Vec<Agent> {
    vec![
        agent("agent-e", "Echo"),
        agent("agent-d", "Twin"),
        agent("agent-c", "Twin"),
        agent("agent-b", "Bravo"),
        agent("agent-a", "Alpha"),
    ]
}

#[derive(Clone, Copy)]
enum Behaviour {
    /// Pages like Letta, including its restart from the first page on an unknown cursor.
    Honest,
    Status(u16),
    /// Cut-off JSON.
    Garbage,
    /// JSON, but not a list of agents.
    NotAList,
    /// Never answers.
    Hang,
    /// Always answers the first page.
    IgnoresAfter,
    /// Always answers a full page of agents it never listed before.
    Endless,
    /// Answers the first page, then 500.
    FailsAfterFirstPage,
}

/// Path and query, and the Authorization header, of one request.
type Seen = (String, Option<String>);

#[derive(Clone)]
struct StandIn {
    agents: Arc<Vec<Agent>>,
    behaviour: Behaviour,
    requests: Arc<Mutex<Vec<Seen>>>,
}

impl StandIn {
    /// Serves on 127.0.0.1:0 until the test's runtime ends; returns its base URL.
    async fn serve(agents: Vec<Agent>, behaviour: Behaviour) -> (String, StandIn) {
        let state = StandIn {
            agents: Arc::new(agents),
            behaviour,
            requests: Default::default(),
        };
        let app = Router::new()
            .route("/v1/agents/", get(list_agents))
            .route("/v1/agents", get(redirect_to_slash))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, state)
    }

    fn requests(&self) -> Vec<Seen> {
        self.requests.lock().unwrap().clone()
    }

    fn page(&self, after: Option<&String>, limit: usize) -> Value {
        // An unknown cursor restarts from the first page, as Letta does.
        let start = after
            .and_then(|id| self.agents.iter().position(|a| &a.id == id))
            .map_or(0, |i| i + 1);
        Value::Array(
            self.agents
                .iter()
                .skip(start)
                .take(limit)
                .map(as_letta)
                .collect(),
        )
    }
}

/// An agent as Letta serializes it: many more fields than roster reads.
fn as_letta(agent: &Agent) -> Value {
    json!({
        "id": agent.id,
        "name": agent.name,
        "agent_type": "memgpt_agent",
        "created_at": "2026-11-21T23:20:53",
        "tools": [{"name": "send_message", "json_schema": {"type": "object"}}],
        "memory": {"blocks": [{"label": "persona", "value": "..."}]},
        "tags": [],
    })
}

async fn redirect_to_slash(uri: Uri) -> Redirect {
    Redirect::temporary(&format!("/v1/agents/?{}", uri.query().unwrap_or("")))
}

async fn list_agents(
    State(stand_in): State<StandIn>,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let nth = {
        let mut requests = stand_in.requests.lock().unwrap();
        let authorization = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        requests.push((uri.to_string(), authorization));
        requests.len()
    };
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(50);
    let after = query.get("after");
    match stand_in.behaviour {
        Behaviour::Honest => Json(stand_in.page(after, limit)).into_response(),
        Behaviour::Status(code) => (
            StatusCode::from_u16(code).unwrap(),
            "{\"detail\": \"Internal\n   Server Error\"}",
        )
            .into_response(),
        Behaviour::Garbage => (
            [("content-type", "application/json")],
            "[{\"id\": \"agent-a\", \"na",
        )
            .into_response(),
        Behaviour::NotAList => Json(json!({"agents": []})).into_response(),
        Behaviour::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
        Behaviour::IgnoresAfter => Json(stand_in.page(None, limit)).into_response(),
        Behaviour::Endless => Json(
            (0..limit)
                .map(|i| as_letta(&agent(&format!("agent-{nth}-{i}"), "Loop")))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Behaviour::FailsAfterFirstPage if nth == 1 => {
            Json(stand_in.page(after, limit)).into_response()
        }
        Behaviour::FailsAfterFirstPage => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn letta(url: &str, page_size: usize) -> LettaSource {
    LettaSource::new(url, None, PATIENT)
        .unwrap()
        .with_page_size(page_size)
}

/// The listing of a misbehaving server: it must be an error, never a listing.
async fn expect_error(source: &LettaSource) -> SourceError {
    match source.list().await {
        Ok(listing) => panic!("a misbehaving server gave a listing: {listing:?}"),
        Err(error) => {
            let message = error.to_string();
            assert!(message.contains(source.url()), "names the URL: {message}");
            assert!(!message.contains('\n'), "one line: {message}");
            error
        }
    }
}

#[tokio::test]
async fn should_page_through_every_agent_keyed_by_id() {
    let (url, stand_in) = StandIn::serve(five(), Behaviour::Honest).await;
    let source = LettaSource::new(&url, Some(Secret::new("letta-secret")), PATIENT)
        .unwrap()
        .with_page_size(2);

    let listing = source.list().await.unwrap();

    assert_eq!(
        listing,
        Listing {
            agents: sorted(five()),
            pages: 3
        }
    );
    let requests = stand_in.requests();
    let paths: Vec<&str> = requests.iter().map(|(path, _)| path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/v1/agents/?limit=2",
            "/v1/agents/?limit=2&after=agent-d",
            "/v1/agents/?limit=2&after=agent-b",
        ]
    );
    for (_, authorization) in &requests {
        assert_eq!(authorization.as_deref(), Some("Bearer letta-secret"));
    }
}

#[tokio::test]
async fn should_read_one_more_page_when_the_last_is_full() {
    let four = five()[1..].to_vec();
    let (url, stand_in) = StandIn::serve(four.clone(), Behaviour::Honest).await;

    let listing = letta(&url, 2).list().await.unwrap();

    assert_eq!(listing.agents, sorted(four));
    assert_eq!(listing.pages, 3, "2 full pages, then an empty one");
    assert_eq!(stand_in.requests().len(), 3);
    assert!(
        stand_in.requests().iter().all(|(_, auth)| auth.is_none()),
        "no token configured, none sent"
    );
}

/// An empty listing is possible, but only as a complete answer: one page, read to its end.
#[tokio::test]
async fn should_list_no_agents_only_when_letta_lists_none() {
    let (url, _) = StandIn::serve(vec![], Behaviour::Honest).await;
    let listing = letta(&url, 2).list().await.unwrap();
    assert_eq!(
        listing,
        Listing {
            agents: vec![],
            pages: 1
        }
    );
}

#[tokio::test]
async fn should_fail_on_http_errors_naming_the_url_and_what_to_check() {
    for (code, hint) in [
        (500, "Letta server's log"),
        (401, "agents.letta_token"),
        (404, "base URL"),
    ] {
        let (url, _) = StandIn::serve(five(), Behaviour::Status(code)).await;
        let error = expect_error(&letta(&url, 2)).await;
        assert!(
            matches!(error, SourceError::Status { status, .. } if status == code),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains(&format!("HTTP {code}")), "{message}");
        assert!(message.contains(hint), "{message}");
        assert_eq!(error.kind(), "http_error");
    }
}

#[tokio::test]
async fn should_fail_on_an_answer_that_is_not_a_list_of_agents() {
    for behaviour in [Behaviour::Garbage, Behaviour::NotAList] {
        let (url, _) = StandIn::serve(five(), behaviour).await;
        let error = expect_error(&letta(&url, 2)).await;
        assert!(
            matches!(error, SourceError::Undecodable { .. }),
            "{error:?}"
        );
        assert!(
            error
                .to_string()
                .contains("is agents.letta_url a Letta server?")
        );
    }
}

#[tokio::test]
async fn should_fail_when_letta_does_not_answer_in_time() {
    let (url, _) = StandIn::serve(five(), Behaviour::Hang).await;
    let source = LettaSource::new(&url, None, Duration::from_secs(1)).unwrap();
    let error = expect_error(&source).await;
    assert!(matches!(error, SourceError::Timeout { .. }), "{error:?}");
}

#[tokio::test]
async fn should_fail_when_letta_is_unreachable() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let error = expect_error(&letta(&url, 2)).await;
    assert!(
        matches!(error, SourceError::Unreachable { .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().to_lowercase().contains("refused"),
        "says why: {error}"
    );
}

/// A failure after some pages discards them: a partial listing would look like deletions.
#[tokio::test]
async fn should_discard_the_pages_read_before_a_failure() {
    let (url, stand_in) = StandIn::serve(five(), Behaviour::FailsAfterFirstPage).await;
    let error = expect_error(&letta(&url, 2)).await;
    assert!(
        matches!(error, SourceError::Status { status: 500, .. }),
        "{error:?}"
    );
    assert_eq!(stand_in.requests().len(), 2);
}

/// Letta answers an unknown `after` with the first page; a server may also ignore it.
/// Either way the repeat ends the listing as an error, after one extra request.
#[tokio::test]
async fn should_stop_with_an_error_when_a_page_repeats() {
    let (url, stand_in) = StandIn::serve(five(), Behaviour::IgnoresAfter).await;
    let error = expect_error(&letta(&url, 2)).await;
    match &error {
        SourceError::RepeatedAgent { id, page, .. } => {
            assert_eq!((id.as_str(), *page), ("agent-e", 2));
        }
        other => panic!("expected RepeatedAgent, got {other:?}"),
    }
    assert_eq!(error.kind(), "repeated_page");
    assert_eq!(stand_in.requests().len(), 2);
}

#[tokio::test]
async fn should_stop_with_an_error_when_paging_never_ends() {
    let (url, stand_in) = StandIn::serve(vec![], Behaviour::Endless).await;
    let source = letta(&url, 3).with_max_agents(10);
    let error = expect_error(&source).await;
    assert!(
        matches!(error, SourceError::TooManyAgents { max: 10, .. }),
        "{error:?}"
    );
    assert_eq!(stand_in.requests().len(), 4, "10 / 3 + 1 pages");
}

#[tokio::test]
async fn should_count_each_poll_by_source_and_outcome() {
    let metrics = Arc::new(Metrics::new());
    let (good, _) = StandIn::serve(five(), Behaviour::Honest).await;
    let (bad, _) = StandIn::serve(five(), Behaviour::Status(500)).await;
    let scratch = Scratch::new("sources-metrics");
    let file = scratch.path().join("agents.yaml");
    std::fs::write(&file, "- {id: agent-a}\n").unwrap();

    let good = AgentSource::letta(letta(&good, 2), metrics.clone());
    let bad = AgentSource::letta(letta(&bad, 2), metrics.clone());
    let file = AgentSource::file(FileSource::new(&file), metrics.clone());
    assert_eq!(good.list().await.unwrap().agents.len(), 5);
    assert!(bad.list().await.is_err());
    assert!(bad.list().await.is_err());
    assert!(file.list().await.is_err());

    let text = metrics.encode();
    for line in [
        "roster_source_polls_total{source=\"letta\",outcome=\"ok\"} 1",
        "roster_source_polls_total{source=\"letta\",outcome=\"http_error\"} 2",
        "roster_source_polls_total{source=\"file\",outcome=\"file_invalid\"} 1",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
}

/// The real thing: Letta 0.11.7 with names that repeat, a rename and a deletion, listed two
/// at a time so paging and Letta's cursor are exercised.
#[tokio::test]
async fn should_follow_a_real_letta_server() {
    let scratch = Scratch::new("sources-letta");
    let letta_server = Letta::start(scratch.path()).await;
    let metrics = Arc::new(Metrics::new());
    // Letta without a password ignores the token; sending one must not break anything.
    let source = LettaSource::new(
        &letta_server.url(),
        Some(Secret::new("not-checked")),
        PATIENT,
    )
    .unwrap()
    .with_page_size(2);
    let source = AgentSource::letta(source, metrics.clone());

    let empty = source.list().await.unwrap();
    assert_eq!((empty.agents.len(), empty.pages), (0, 1));

    let twin_one = letta_server.create_agent("twin").await;
    let twin_two = letta_server.create_agent("twin").await;
    let solo = letta_server.create_agent("solo").await;
    let listing = source.list().await.unwrap();
    assert_eq!(
        listing,
        Listing {
            agents: sorted(vec![
                agent(&twin_one, "twin"),
                agent(&twin_two, "twin"),
                agent(&solo, "solo"),
            ]),
            pages: 2,
        }
    );

    letta_server.rename_agent(&solo, "solo, renamed").await;
    letta_server.delete_agent(&twin_one).await;
    let listing = source.list().await.unwrap();
    assert_eq!(
        listing.agents,
        sorted(vec![
            agent(&twin_two, "twin"),
            agent(&solo, "solo, renamed")
        ])
    );
    assert_eq!(listing.pages, 2, "a full page, then an empty one");

    let one_by_one = LettaSource::new(&letta_server.url(), None, PATIENT)
        .unwrap()
        .with_page_size(1)
        .list()
        .await
        .unwrap();
    assert_eq!(one_by_one.agents, listing.agents);
    assert_eq!(one_by_one.pages, 3);

    assert_eq!(
        sum_samples(
            &metrics.encode(),
            "roster_source_polls_total",
            &["source=\"letta\"", "outcome=\"ok\""]
        ),
        3
    );
}
