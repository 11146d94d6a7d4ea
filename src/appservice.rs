//! Serves the routes the homeserver calls: transactions, ping, user and alias queries.
//!
//! Thin ingress: check the hs_token in constant time, bound the body, decode with
//! `ruma-appservice-api`, record durably, update the model, answer. A transaction is
//! answered 200 only after its membership changes are in the store; an id seen before is
//! answered 200 and applied nothing again. This module never calls the homeserver.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use ruma::api::IncomingRequestExt;
use ruma::api::appservice::event::push_events;
use ruma::api::error::{ErrorKind, StandardErrorBody};
use ruma::events::room::member::RoomMemberEvent;
use ruma::events::{AnyTimelineEvent, TimelineEventType};
use ruma::serde::Raw;
use subtle::ConstantTimeEq;

use crate::Shared;
use crate::metrics::{OutcomeLabels, TransitionLabels};
use crate::model::{Change, EventOrder, MemberEvent, Membership};
use crate::store::Recorded;

/// Every route the homeserver may call, the legacy unprefixed ones included.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/_matrix/app/v1/transactions/{txn_id}",
            put(push_transaction),
        )
        .route("/transactions/{txn_id}", put(push_transaction))
        .route("/_matrix/app/v1/ping", post(ping))
        .route(
            "/_matrix/app/v1/users/{user_id}",
            axum::routing::get(query_user),
        )
        .route("/users/{user_id}", axum::routing::get(query_user))
        .route(
            "/_matrix/app/v1/rooms/{alias}",
            axum::routing::get(query_room_alias),
        )
        .route("/rooms/{alias}", axum::routing::get(query_room_alias))
        .fallback(unknown_route)
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            require_hs_token,
        ))
        .with_state(shared)
}

/// A Matrix error response: `{"errcode": ..., "error": ...}` with `status`.
pub fn matrix_error(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Response {
    Rejection::new(status, kind, message).into_response()
}

/// A refused request, kept small until it becomes a response.
pub struct Rejection(Box<(StatusCode, StandardErrorBody)>);

impl Rejection {
    fn new(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Rejection {
        Rejection(Box::new((
            status,
            StandardErrorBody::new(kind, message.into()),
        )))
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let (status, body) = *self.0;
        (status, axum::Json(body)).into_response()
    }
}

fn empty_ok() -> Response {
    (StatusCode::OK, axum::Json(serde_json::json!({}))).into_response()
}

/// Reads the hs_token from `Authorization: Bearer` or the legacy `access_token` parameter.
fn presented_token(request: &Request) -> Option<String> {
    if let Some(value) = request.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        return value.strip_prefix("Bearer ").map(|t| t.trim().to_owned());
    }
    let query = request.uri().query()?;
    url_query_param(query, "access_token")
}

fn url_query_param(query: &str, name: &str) -> Option<String> {
    reqwest::Url::parse(&format!("http://x/?{query}"))
        .ok()?
        .query_pairs()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

async fn require_hs_token(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let expected = shared.registration.hs_token.as_bytes();
    match presented_token(&request) {
        None => {
            count(&shared, "unauthorized");
            matrix_error(
                StatusCode::UNAUTHORIZED,
                ErrorKind::Unauthorized,
                "missing hs_token: send it as Authorization: Bearer",
            )
        }
        Some(token) if !bool::from(token.as_bytes().ct_eq(expected)) => {
            count(&shared, "forbidden");
            matrix_error(
                StatusCode::FORBIDDEN,
                ErrorKind::Forbidden,
                "wrong hs_token: it must match the registration roster was started with",
            )
        }
        Some(_) => next.run(request).await,
    }
}

fn count(shared: &Shared, outcome: &'static str) {
    shared
        .metrics
        .transactions
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
}

async fn push_transaction(
    State(shared): State<Arc<Shared>>,
    Path(txn_id): Path<String>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = match read_body(body, shared.config.appservice.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(rejection) => {
            count(&shared, "rejected");
            return rejection.into_response();
        }
    };
    let txn = match decode_transaction(&parts, &bytes, &txn_id) {
        Ok(txn) => txn,
        Err(rejection) => {
            count(&shared, "rejected");
            return rejection.into_response();
        }
    };
    shared.metrics.ephemeral_items.inc_by(txn.ephemeral as u64);
    if txn.undecodable > 0 {
        shared
            .metrics
            .undecodable_events
            .inc_by(txn.undecodable as u64);
    }

    let worker = shared.clone();
    let member_events = txn.member_events;
    let recorded =
        tokio::task::spawn_blocking(move || record(&worker, &txn_id, &member_events)).await;
    match recorded {
        Ok(Ok((Recorded::New, changes))) => {
            count(&shared, "applied");
            if shared.fault_abort_after_record {
                // Test-only fault injection (ROSTER_FAULT_ABORT_AFTER_RECORD): die after the
                // durable write and before the 200, the worst moment for a crash.
                tracing::error!("fault injection: aborting after recording a transaction");
                std::process::abort();
            }
            schedule_managed_rooms(&shared, &changes);
            for change in &changes {
                tracing::debug!(
                    room = %change.room_id,
                    user = %change.user_id,
                    transition = ?change.transition,
                    "membership changed"
                );
                shared
                    .metrics
                    .member_transitions
                    .get_or_create(&TransitionLabels {
                        transition: transition_label(change),
                    })
                    .inc();
            }
            empty_ok()
        }
        Ok(Ok((Recorded::Duplicate, _))) => {
            count(&shared, "duplicate");
            tracing::debug!("transaction already recorded; acknowledged again");
            empty_ok()
        }
        Ok(Err(e)) => {
            count(&shared, "error");
            tracing::error!(error = %e, "cannot record transaction; the homeserver will retry");
            matrix_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorKind::Unknown,
                "roster could not record the transaction; retry later",
            )
        }
        Err(join_error) => {
            count(&shared, "error");
            tracing::error!(error = %join_error, "recording a transaction panicked");
            matrix_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorKind::Unknown,
                "roster could not record the transaction; retry later",
            )
        }
    }
}

/// Hands changes in agent rooms to the reconciler (by key; it reads the model itself).
fn schedule_managed_rooms(shared: &Shared, changes: &[Change]) {
    let agents: std::collections::BTreeSet<String> = {
        let model = shared.model();
        changes
            .iter()
            .filter_map(|c| model.agents.agent_for_room(&c.room_id).map(str::to_owned))
            .collect()
    };
    for agent in agents {
        shared.queue.schedule(&agent);
    }
}

/// Dedupes and durably records a transaction, then applies it to the model.
///
/// Runs under the model's write lock, so transactions are recorded one at a time and the
/// model never holds a change the store does not.
fn record(
    shared: &Shared,
    txn_id: &str,
    events: &[MemberEvent],
) -> Result<(Recorded, Vec<Change>), crate::store::StoreError> {
    let mut model = shared.model_mut();
    if shared.store.has_transaction(txn_id)? {
        return Ok((Recorded::Duplicate, Vec::new()));
    }
    let changes = model.preview(events);
    let recorded = shared
        .store
        .record_transaction(txn_id, now_ms(), &changes)?;
    if recorded == Recorded::New {
        model.commit(changes.clone());
    }
    Ok((recorded, changes))
}

fn transition_label(change: &Change) -> &'static str {
    use crate::model::Transition::*;
    match change.transition {
        Invited => "invited",
        Joined => "joined",
        ProfileChanged => "profile_changed",
        Left => "left",
        Kicked => "kicked",
        Banned => "banned",
        Unbanned => "unbanned",
        Knocked => "knocked",
        Unchanged => "unchanged",
        Duplicate => "duplicate",
        Stale => "stale",
    }
}

async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, Rejection> {
    to_bytes(body, limit).await.map_err(|e| {
        // to_bytes reports an oversized body as a length-limit error in its source chain.
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            Rejection::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorKind::TooLarge,
                format!("transaction body exceeds {limit} bytes (appservice.max_body_bytes)"),
            )
        } else {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                ErrorKind::Unknown,
                format!("cannot read the request body: {e}"),
            )
        }
    })
}

/// What roster takes from one pushed transaction.
struct DecodedTransaction {
    member_events: Vec<MemberEvent>,
    undecodable: usize,
    ephemeral: usize,
}

/// MSC2409's unstable name for `ephemeral`, which homeservers still send.
#[derive(serde::Deserialize)]
struct UnstableEphemeral {
    #[serde(default, rename = "de.sorunome.msc2409.ephemeral")]
    ephemeral: Vec<serde::de::IgnoredAny>,
}

fn decode_transaction(
    parts: &http::request::Parts,
    bytes: &[u8],
    txn_id: &str,
) -> Result<DecodedTransaction, Rejection> {
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
        return Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::NotJson,
            format!("transaction body is not JSON: {e}"),
        ));
    }
    let mut builder = http::Request::builder()
        .method(http::Method::PUT)
        .uri(parts.uri.clone());
    if let Some(headers) = builder.headers_mut() {
        *headers = parts.headers.clone();
    }
    let http_request = builder
        .body(bytes)
        .expect("parts came from a valid request");
    let request = push_events::v1::Request::try_from_http_request(http_request, &[txn_id])
        .map_err(|e| {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                ErrorKind::BadJson,
                format!("transaction body is not an appservice transaction: {e}"),
            )
        })?;
    // Ephemeral data is lossy by design (no redelivery); roster only counts it.
    let unstable = serde_json::from_slice::<UnstableEphemeral>(bytes)
        .map(|u| u.ephemeral.len())
        .unwrap_or(0);
    let mut decoded = DecodedTransaction {
        member_events: Vec::new(),
        undecodable: 0,
        ephemeral: request.ephemeral.len() + unstable,
    };
    for raw in &request.events {
        match member_event(raw) {
            Ok(Some(event)) => decoded.member_events.push(event),
            Ok(None) => {}
            Err(e) => {
                // One bad event must not block the homeserver's queue: skip it, loudly.
                decoded.undecodable += 1;
                let event_id = raw.get_field::<String>("event_id").ok().flatten();
                tracing::warn!(event_id = ?event_id, error = %e, "skipping undecodable event");
            }
        }
    }
    Ok(decoded)
}

/// The model's view of an `m.room.member` event; `None` for other event types.
fn member_event(raw: &Raw<AnyTimelineEvent>) -> Result<Option<MemberEvent>, String> {
    let kind = raw
        .get_field::<TimelineEventType>("type")
        .map_err(|e| e.to_string())?
        .ok_or("event has no type")?;
    if kind != TimelineEventType::RoomMember {
        return Ok(None);
    }
    let event: RoomMemberEvent = raw
        .deserialize_as_unchecked()
        .map_err(|e| format!("bad m.room.member event: {e}"))?;
    let Some(membership) = Membership::parse(event.membership().as_str()) else {
        return Ok(None);
    };
    let (displayname, avatar_url) = match &event {
        RoomMemberEvent::Original(original) => (
            original.content.displayname.clone(),
            original.content.avatar_url.as_ref().map(|u| u.to_string()),
        ),
        RoomMemberEvent::Redacted(_) => (None, None),
    };
    let user_id = ruma::UserId::parse(event.state_key().as_str())
        .map_err(|e| format!("bad state_key: {e}"))?;
    Ok(Some(MemberEvent {
        room_id: event.room_id().to_owned(),
        user_id,
        sender: event.sender().to_owned(),
        membership,
        displayname,
        avatar_url,
        order: EventOrder {
            origin_server_ts: event.origin_server_ts().get().into(),
            event_id: event.event_id().to_owned(),
        },
    }))
}

async fn ping(State(shared): State<Arc<Shared>>) -> Response {
    tracing::debug!("homeserver pinged");
    shared.note_homeserver_ping();
    empty_ok()
}

async fn query_user(State(shared): State<Arc<Shared>>, Path(user_id): Path<String>) -> Response {
    if shared.manages_user(&user_id) {
        empty_ok()
    } else {
        matrix_error(
            StatusCode::NOT_FOUND,
            ErrorKind::NotFound,
            "roster does not provide this user",
        )
    }
}

async fn query_room_alias(Path(_alias): Path<String>) -> Response {
    // roster creates agent rooms itself, never on demand from an alias lookup.
    matrix_error(
        StatusCode::NOT_FOUND,
        ErrorKind::NotFound,
        "roster does not create rooms on demand",
    )
}

async fn unknown_route() -> Response {
    matrix_error(
        StatusCode::NOT_FOUND,
        ErrorKind::Unrecognized,
        "unrecognized appservice endpoint",
    )
}

/// Whole-second wall clock in milliseconds, for transaction bookkeeping.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}
