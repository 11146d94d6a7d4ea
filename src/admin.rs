//! Serves operators: `/health`, `/ready`, `/metrics`, and `/admin/v1/*` behind the admin
//! bearer token (compared in constant time). Every refusal is a Matrix JSON error.
//!
//! [`StatusReport`] is the typed status both this API and the CLI use; its counters come
//! from the metric handles, never from the exposition text.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ruma::RoomId;
use ruma::api::error::ErrorKind;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::Shared;
use crate::http::{bearer_token, json_errors, matrix_error};
use crate::metrics::ResultLabels;
use crate::model::MemberState;
use crate::reconcile::{SyncRequest, Trigger};

pub fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/status", get(status))
        .route("/sync", post(sync))
        .route("/invalidate", post(invalidate))
        .route("/rooms/{room_id}/members", get(room_members))
        .route("/replay", post(replay))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            require_admin_token,
        ));
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .nest("/admin/v1", api)
        .layer(middleware::map_response(json_errors))
        .with_state(shared)
}

fn error(status: StatusCode, message: &str) -> Response {
    let kind = match status {
        StatusCode::NOT_FOUND => ErrorKind::NotFound,
        StatusCode::FORBIDDEN => ErrorKind::Forbidden,
        StatusCode::UNAUTHORIZED => ErrorKind::MissingToken,
        StatusCode::BAD_REQUEST => ErrorKind::BadJson,
        _ => ErrorKind::Unknown,
    };
    matrix_error(status, kind, message)
}

async fn require_admin_token(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = shared.config.admin.token.as_ref() else {
        return error(
            StatusCode::FORBIDDEN,
            "the admin API is off: set admin.token (ROSTER_ADMIN__TOKEN) to enable it",
        );
    };
    match bearer_token(&request) {
        None => error(
            StatusCode::UNAUTHORIZED,
            "missing admin token: send Authorization: Bearer <admin.token>",
        ),
        Some(token) if !bool::from(token.as_bytes().ct_eq(expected.expose().as_bytes())) => {
            error(StatusCode::FORBIDDEN, "wrong admin token")
        }
        Some(_) => next.run(request).await,
    }
}

/// Listeners bound, store open, config valid: a Service may route the homeserver here.
/// Whether the homeserver can reach roster is reported in status, not here.
async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    if shared.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "not ready: starting")
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.encode(),
    )
        .into_response()
}

/// What `GET /admin/v1/status` answers and `roster status` prints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub version: String,
    pub ready: bool,
    /// Agents the source lists (or the store remembers during a source outage).
    pub agents: usize,
    /// Agent rooms roster looks after.
    pub rooms: usize,
    pub retired: usize,
    /// Agent rooms waiting for the reconciler, and being reconciled now.
    pub pending: usize,
    pub running: usize,
    #[serde(flatten)]
    pub reconcile: crate::state::Status,
    /// Membership checks the model answered without an action, and those that needed one.
    pub membership_cache_hits: u64,
    pub membership_cache_misses: u64,
    /// Member states the model holds.
    pub memberships: usize,
    pub deactivated_users: usize,
    /// Lifecycle messages not yet consumed (a count of messages).
    pub lifecycle_lag_messages: i64,
    /// Partitions of `lifecycle.topic` this consumer holds; absent while lifecycle is off.
    /// 0 with lifecycle on means nothing is consumed (brokers unreachable, no such topic,
    /// or the group's other members hold them all), whatever the lag says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle_partitions: Option<i64>,
    pub transactions_remembered: u64,
    /// Homeserver requests sent since start-up.
    pub homeserver_requests: u64,
    /// History imports that failed, by room: the rooms started empty.
    pub history_import_failures: std::collections::BTreeMap<String, crate::store::HistoryImport>,
}

impl StatusReport {
    /// Share of membership checks the model answered without an action.
    pub fn cache_hit_ratio(&self) -> Option<f64> {
        let total = self.membership_cache_hits + self.membership_cache_misses;
        (total > 0).then(|| self.membership_cache_hits as f64 / total as f64)
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    let transactions_remembered = match shared.state.transaction_count().await {
        Ok(n) => n,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    let cache = |result| {
        shared
            .metrics
            .membership_cache
            .get_or_create(&ResultLabels { result })
            .get()
    };
    let (agents, rooms, retired, deactivated_users, memberships) = shared.state.read(|model| {
        let records = &model.agents.records;
        (
            model.agents.desired.len(),
            records
                .values()
                .filter(|r| !r.retired && r.room_id.is_some())
                .count(),
            records.values().filter(|r| r.retired).count(),
            model.identities.deactivated_count(),
            model.membership_count(),
        )
    });
    let (pending, running) = shared.queue.counts();
    axum::Json(StatusReport {
        version: env!("CARGO_PKG_VERSION").into(),
        ready: shared.is_ready(),
        agents,
        rooms,
        retired,
        pending,
        running,
        reconcile: shared.state.status(|s| s.clone()),
        membership_cache_hits: cache("hit"),
        membership_cache_misses: cache("miss"),
        memberships,
        deactivated_users,
        lifecycle_lag_messages: shared.metrics.lifecycle_lag.get(),
        lifecycle_partitions: shared.config.lifecycle.enabled.then(|| {
            shared
                .metrics
                .lifecycle_partitions(&shared.config.lifecycle.topic)
                .get()
        }),
        transactions_remembered,
        homeserver_requests: shared.metrics.homeserver_requests_sent(),
        history_import_failures: shared
            .state
            .failed_history_imports()
            .into_iter()
            .map(|(room, import)| (room.to_string(), import))
            .collect(),
    })
    .into_response()
}

/// Which rooms an operator request is about: a room id or an agent id, else all. Unknown
/// fields are refused: a misspelt `room_id` must not widen the request to every agent.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default)]
    pub wait: bool,
}

fn target_agents(
    shared: &Shared,
    target: &Target,
) -> Result<Option<BTreeSet<String>>, (StatusCode, String)> {
    shared.state.read(|model| {
        let mut agents = BTreeSet::new();
        if let Some(room) = &target.room {
            let agent = if room.starts_with('#') {
                // An agent room's alias names it as well as its id does.
                let ids = shared.config.ids();
                // A retired record may share the alias with the live agent that took its
                // localpart since: the live one is meant.
                model
                    .agents
                    .records
                    .values()
                    .filter(|r| ids.agent_alias(&r.localpart).as_str() == room)
                    .min_by_key(|r| r.retired)
                    .map(|r| r.agent_id.clone())
            } else {
                RoomId::parse(room.as_str())
                    .ok()
                    .and_then(|room| model.agents.agent_for_room(&room).map(str::to_owned))
            };
            match agent {
                Some(agent) => agents.insert(agent),
                None => {
                    return Err((
                        StatusCode::NOT_FOUND,
                        format!(
                            "{room} is not an agent room roster manages; give its room id \
                             (!...) or alias (#agent_...)"
                        ),
                    ));
                }
            };
        }
        if let Some(agent) = &target.agent {
            if !model.agents.records.contains_key(agent) {
                return Err((
                    StatusCode::NOT_FOUND,
                    format!("agent {agent} is unknown; check the id in the agent source"),
                ));
            }
            agents.insert(agent.clone());
        }
        Ok((!agents.is_empty()).then_some(agents))
    })
}

/// The target of a sync or invalidate request: no body means all. A body must say it is
/// JSON: one without `Content-Type` is refused, never taken for "no body" (every agent).
struct TargetBody(Result<Target, String>);

impl<S: Send + Sync> FromRequest<S> for TargetBody {
    type Rejection = std::convert::Infallible;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let hint = "send \"room\" or \"agent\" (and \"wait\"), or no body for every agent";
        if request.headers().contains_key(header::CONTENT_TYPE) {
            let target = axum::Json::<Target>::from_request(request, state).await;
            return Ok(TargetBody(target.map(|json| json.0).map_err(|rejection| {
                format!("{}; {hint}", rejection.body_text())
            })));
        }
        let body = axum::body::Bytes::from_request(request, state).await;
        Ok(TargetBody(match body {
            Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Ok(Target::default()),
            Ok(_) => Err(format!(
                "the request has a body but no Content-Type; send it with \
                 Content-Type: application/json; {hint}"
            )),
            Err(rejection) => Err(format!("{}; {hint}", rejection.body_text())),
        }))
    }
}

/// Asks for an immediate reconciliation; with `wait`, answers with its summary.
async fn sync(State(shared): State<Arc<Shared>>, body: TargetBody) -> Response {
    let target = match body.0 {
        Ok(target) => target,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let agents = match target_agents(&shared, &target) {
        Ok(agents) => agents,
        Err((status, message)) => return error(status, &message),
    };
    let (reply, summary) = tokio::sync::oneshot::channel();
    let request = SyncRequest {
        trigger: Trigger::Manual,
        agents,
        reply: target.wait.then_some(reply),
    };
    if shared.sync_requests.try_send(request).is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many sync requests waiting; they coalesce, so retry in a moment",
        );
    }
    if !target.wait {
        return (
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({ "queued": true })),
        )
            .into_response();
    }
    match summary.await {
        Ok(summary) => axum::Json(summary).into_response(),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "roster is shutting down or has no agent source; the sync did not run",
        ),
    }
}

/// Forgets what the model knows of the targeted rooms, so they are read before acting.
async fn invalidate(State(shared): State<Arc<Shared>>, body: TargetBody) -> Response {
    let target = match body.0 {
        Ok(target) => target,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let agents = match target_agents(&shared, &target) {
        Ok(agents) => agents,
        Err((status, message)) => return error(status, &message),
    };
    let rooms: Vec<(String, ruma::OwnedRoomId)> = shared.state.read(|model| {
        model
            .agents
            .live_records(agents.as_ref())
            .filter_map(|r| Some((r.agent_id.clone(), r.room_id.clone()?)))
            .collect()
    });
    for (agent, room) in &rooms {
        shared.state.forget_room(room);
        shared
            .queue
            .schedule(&crate::reconcile::queue::Key::agent(agent));
    }
    axum::Json(serde_json::json!({ "invalidated": rooms.len() })).into_response()
}

#[derive(Serialize)]
struct Member {
    user_id: String,
    #[serde(flatten)]
    state: MemberState,
}

/// The model's view of one room: what the homeserver pushed, not a fresh read.
async fn room_members(State(shared): State<Arc<Shared>>, Path(room_id): Path<String>) -> Response {
    let Ok(room_id) = RoomId::parse(room_id.as_str()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "not a room id; expected e.g. !abc:example.org",
        );
    };
    let mut members: Vec<Member> = shared.state.read(|model| {
        model
            .members(&room_id)
            .map(|(user, state)| Member {
                user_id: user.to_string(),
                state: *state,
            })
            .collect()
    });
    members.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    axum::Json(serde_json::json!({ "room_id": room_id, "members": members })).into_response()
}

/// `POST /admin/v1/replay {"partition": P, "offset": O}`: the lifecycle consumer
/// re-consumes partition P from offset O (effects are idempotent, so this is safe).
#[derive(Debug, Serialize, Deserialize)]
pub struct ReplayRequest {
    pub partition: i32,
    pub offset: i64,
}

async fn replay(
    State(shared): State<Arc<Shared>>,
    body: Result<axum::Json<ReplayRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    use crate::lifecycle::ReplayError;
    let Ok(axum::Json(request)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected a JSON body {\"partition\": P, \"offset\": O}",
        );
    };
    match shared
        .lifecycle
        .replay(request.partition, request.offset)
        .await
    {
        Ok(replayed) => axum::Json(replayed).into_response(),
        Err(e @ ReplayError::NotRunning) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        Err(e @ (ReplayError::NotAssigned { .. } | ReplayError::NoPosition { .. })) => {
            error(StatusCode::CONFLICT, &e.to_string())
        }
        Err(
            e @ (ReplayError::OutOfRange { .. }
            | ReplayError::NoSuchPartition { .. }
            | ReplayError::Ahead { .. }),
        ) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e @ ReplayError::Failed(_)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{Body, to_bytes};
    use tower::ServiceExt;

    const TOKEN: &str = "an-admin-token-for-this-test-only-0123";

    async fn post(shared: &Arc<Shared>, path: &str, body: Option<&str>) -> (StatusCode, String) {
        let mut request = axum::http::Request::builder()
            .method("POST")
            .uri(path)
            .header(axum::http::header::AUTHORIZATION, format!("Bearer {TOKEN}"));
        if body.is_some() {
            request = request.header(axum::http::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
            .unwrap();
        let answer = router(shared.clone()).oneshot(request).await.unwrap();
        let status = answer.status();
        let body = to_bytes(answer.into_body(), 64 * 1024).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// A roster with the admin API on and one agent room, `!r:ex.org` (`#agent_a:ex.org`).
    async fn with_agent_room() -> Arc<Shared> {
        let shared = crate::testing::shared(
            crate::config::Config::from_yaml(&format!(
                "homeserver: {{server_name: ex.org}}\nadmin: {{token: {TOKEN}}}"
            ))
            .unwrap(),
        );
        crate::testing::record_agent_room(&shared).await;
        shared
    }

    /// A misspelt field must not turn a request about one room into one about every agent
    /// (forgetting every room means reading them all again).
    #[tokio::test]
    async fn should_refuse_unknown_fields_instead_of_targeting_every_agent() {
        let shared = with_agent_room().await;
        for path in ["/admin/v1/invalidate", "/admin/v1/sync"] {
            let (status, body) = post(&shared, path, Some(r#"{"room_id": "!r:ex.org"}"#)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
            assert!(body.contains("unknown field `room_id`"), "{path}: {body}");
            assert!(
                body.contains("or no body for every agent"),
                "{path}: {body}"
            );
        }
        assert!(shared.queue.counts() == (0, 0), "nothing was scheduled");

        let (status, body) = post(
            &shared,
            "/admin/v1/invalidate",
            Some(r#"{"room": "!r:ex.org"}"#),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains("\"invalidated\":1"), "{body}");
        let (status, body) = post(&shared, "/admin/v1/invalidate", None).await;
        assert_eq!(status, StatusCode::OK, "no body: every agent; {body}");
    }

    /// A body sent without `Content-Type` (Python's `requests.post(url, data=...)`, `curl
    /// -H 'Content-Type:'`) is not "no body": ignoring it would turn a request about one
    /// room into one about every agent, as a misspelt field would.
    #[tokio::test]
    async fn should_refuse_a_body_without_a_content_type_instead_of_targeting_every_agent() {
        let shared = with_agent_room().await;
        for path in ["/admin/v1/invalidate", "/admin/v1/sync"] {
            let request = axum::http::Request::builder()
                .method("POST")
                .uri(path)
                .header(axum::http::header::AUTHORIZATION, format!("Bearer {TOKEN}"))
                .body(Body::from(r#"{"room": "!other:ex.org"}"#))
                .unwrap();
            let answer = router(shared.clone()).oneshot(request).await.unwrap();
            let status = answer.status();
            let body = to_bytes(answer.into_body(), 64 * 1024).await.unwrap();
            let body = String::from_utf8_lossy(&body);
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
            assert!(body.contains("Content-Type"), "{path}: {body}");
            assert!(body.contains("M_BAD_JSON"), "{path}: {body}");
        }
        assert!(shared.queue.counts() == (0, 0), "nothing was scheduled");
    }

    /// Agents whose ids made the same localpart: once the first is retired, the other may
    /// hold it, and its alias names the live one, whatever order the records come in.
    #[tokio::test]
    async fn should_take_the_live_agent_for_an_alias_retired_agents_had_too() {
        let shared = with_agent_room().await;
        // Records are kept in id order: these come before "agent-a".
        for old in ["1", "a"] {
            shared
                .state
                .save_agent(crate::model::agents::RoomRecord {
                    agent_id: old.into(),
                    localpart: "agent_a".into(),
                    retired: true,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        let target = Target {
            room: Some("#agent_a:ex.org".into()),
            ..Target::default()
        };
        assert_eq!(
            target_agents(&shared, &target).unwrap(),
            Some(BTreeSet::from(["agent-a".to_owned()]))
        );
    }

    /// An agent room is named by its id or its alias; any other room is refused, saying so.
    #[tokio::test]
    async fn should_take_an_agent_room_by_id_or_alias() {
        let shared = with_agent_room().await;
        for room in ["!r:ex.org", "#agent_a:ex.org"] {
            let target = Target {
                room: Some(room.into()),
                ..Target::default()
            };
            let agents = target_agents(&shared, &target).unwrap();
            assert_eq!(
                agents,
                Some(BTreeSet::from(["agent-a".to_owned()])),
                "{room}"
            );
        }
        for room in ["!other:ex.org", "#agent_b:ex.org", "#agent_a:other.org"] {
            let target = Target {
                room: Some(room.into()),
                ..Target::default()
            };
            let (status, message) = target_agents(&shared, &target).unwrap_err();
            assert_eq!(status, StatusCode::NOT_FOUND, "{room}");
            assert!(message.contains("alias (#agent_...)"), "{message}");
        }
    }
}
