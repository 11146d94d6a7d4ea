//! Serves operators: `/health`, `/ready`, `/metrics`, and `/admin/v1/*` behind the admin
//! bearer token (compared in constant time). Read-only views of the shared state.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ruma::RoomId;
use serde::Serialize;
use subtle::ConstantTimeEq;

use crate::Shared;
use crate::model::MemberState;

pub fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/status", get(status))
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
        .with_state(shared)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
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
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
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

async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    if shared.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the homeserver ping has not succeeded yet\n",
        )
            .into_response()
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

#[derive(Serialize)]
struct Status {
    ready: bool,
    rooms: usize,
    transactions_remembered: u64,
    last_homeserver_ping_ms: Option<u64>,
    homeserver_requests: u64,
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    let worker = shared.clone();
    let remembered = tokio::task::spawn_blocking(move || worker.store.transaction_count()).await;
    let transactions_remembered = match remembered {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    axum::Json(Status {
        ready: shared.is_ready(),
        rooms: shared.model().room_count(),
        transactions_remembered,
        last_homeserver_ping_ms: shared.last_homeserver_ping_ms(),
        homeserver_requests: shared.metrics.homeserver_request_total(),
    })
    .into_response()
}

#[derive(Serialize)]
struct Member<'a> {
    user_id: &'a str,
    #[serde(flatten)]
    state: &'a MemberState,
}

/// The model's view of one room: what the homeserver pushed, not a fresh read.
async fn room_members(State(shared): State<Arc<Shared>>, Path(room_id): Path<String>) -> Response {
    let Ok(room_id) = RoomId::parse(room_id.as_str()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "not a room id; expected e.g. !abc:example.org",
        );
    };
    let model = shared.model();
    let mut members: Vec<Member<'_>> = model
        .members(&room_id)
        .map(|(user, state)| Member {
            user_id: user.as_str(),
            state,
        })
        .collect();
    members.sort_by(|a, b| a.user_id.cmp(b.user_id));
    axum::Json(serde_json::json!({ "room_id": room_id, "members": members })).into_response()
}

/// `POST /admin/v1/replay {"partition": P, "offset": O}`: the lifecycle consumer
/// re-consumes partition P from offset O (effects are idempotent, so this is safe).
#[derive(serde::Deserialize)]
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
        Err(e @ ReplayError::NotAssigned { .. }) => error(StatusCode::CONFLICT, &e.to_string()),
        Err(e @ ReplayError::BadOffset(_)) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e @ ReplayError::Failed(_)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}
