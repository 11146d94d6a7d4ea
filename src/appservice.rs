//! Serves the routes the homeserver calls: transactions, ping, user and alias queries.
//!
//! Thin ingress: check the hs_token in constant time, bound the body, decode with
//! `ruma-appservice-api`, record through `state`, answer. A transaction is answered 200
//! only after its membership changes are in the store; an id seen before is answered 200
//! and applied nothing again. One event that cannot be decoded (bad fields, invalid UTF-8)
//! is skipped and counted; it never holds back the rest of the homeserver's queue. Every
//! error is a Matrix JSON error. This module never calls the homeserver.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use ruma::api::IncomingRequestExt;
use ruma::api::appservice::event::push_events;
use ruma::api::error::ErrorKind;
use ruma::events::room::member::RoomMemberEvent;
use ruma::events::{AnyTimelineEvent, TimelineEventType};
use ruma::serde::Raw;
use ruma::{OwnedRoomId, RoomId};
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;

use crate::Shared;
use crate::clock::now_ms;
use crate::http::{Rejection, bearer_token, json_errors, matrix_error, read_body};
use crate::metrics::{OutcomeLabels, TransitionLabels};
use crate::model::{MemberEvent, Membership};
use crate::reconcile::queue::Key;
use crate::state::Recorded;

/// Every route the homeserver may call, the legacy unprefixed ones included.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/_matrix/app/v1/transactions/{txn_id}",
            put(push_transaction),
        )
        .route("/transactions/{txn_id}", put(push_transaction))
        .route("/_matrix/app/v1/ping", post(ping))
        .route("/_matrix/app/v1/users/{user_id}", get(query_user))
        .route("/users/{user_id}", get(query_user))
        .route("/_matrix/app/v1/rooms/{alias}", get(query_room_alias))
        .route("/rooms/{alias}", get(query_room_alias))
        // Only the routes above need the token: a request for any other path is answered
        // 404 and never counted as a refused transaction.
        .route_layer(middleware::from_fn_with_state(
            shared.clone(),
            require_hs_token,
        ))
        .fallback(unknown_route)
        .layer(middleware::map_response(json_errors))
        .with_state(shared)
}

fn empty_ok() -> Response {
    (StatusCode::OK, axum::Json(serde_json::json!({}))).into_response()
}

/// Reads the hs_token from `Authorization: Bearer` or the legacy `access_token` parameter.
fn presented_token(request: &Request) -> Option<String> {
    if request.headers().contains_key(header::AUTHORIZATION) {
        return bearer_token(request).map(str::to_owned);
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
    // roster_transactions_total counts transactions; a query or ping refused is not one.
    let is_transaction = request.method() == http::Method::PUT;
    let refused = |outcome| {
        if is_transaction {
            count(&shared, outcome);
        }
    };
    match presented_token(&request) {
        None => {
            refused("unauthorized");
            matrix_error(
                StatusCode::UNAUTHORIZED,
                ErrorKind::Unauthorized,
                "missing hs_token: send it as Authorization: Bearer",
            )
        }
        Some(token) if !bool::from(token.as_bytes().ct_eq(expected)) => {
            refused("forbidden");
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
    let decoded = match read_body(body, shared.config.appservice.max_body_bytes).await {
        Ok(bytes) => decode_transaction(&parts, &bytes, &txn_id),
        Err(error) => Err(error.rejection("appservice.max_body_bytes")),
    };
    let txn = match decoded {
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
    // Kept for a retry of this transaction: see `Recorded::Duplicate` below.
    let rooms: BTreeSet<OwnedRoomId> = txn
        .member_events
        .iter()
        .map(|e| e.room_id.clone())
        .collect();
    let recorded = shared
        .state
        .record_transaction(txn_id, now_ms(), txn.member_events)
        .await;
    match recorded {
        Ok(Recorded::New { changes, dropped }) => {
            count(&shared, "applied");
            if shared.fault_abort_after_record {
                // Test-only fault injection (ROSTER_FAULT_ABORT_AFTER_RECORD): die after the
                // durable write and before the 200, the worst moment for a crash.
                tracing::error!("fault injection: aborting after recording a transaction");
                std::process::abort();
            }
            if dropped > 0 {
                shared.metrics.unmanaged_events.inc_by(dropped as u64);
            }
            schedule_managed_rooms(&shared, changes.iter().map(|c| &*c.room_id));
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
                        transition: change.transition.label(),
                    })
                    .inc();
            }
            empty_ok()
        }
        Ok(Recorded::Duplicate) => {
            count(&shared, "duplicate");
            tracing::debug!("transaction already recorded; acknowledged again");
            // The first delivery may have been recorded after the homeserver gave up on it
            // (the write finishes, the handler is dropped before it schedules): hand its
            // rooms over again. A run with nothing to change sends nothing.
            schedule_managed_rooms(&shared, rooms.iter().map(|r| &**r));
            empty_ok()
        }
        Err(e) => {
            count(&shared, "error");
            tracing::error!(error = %e, "cannot record transaction; the homeserver will retry");
            matrix_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorKind::Unknown,
                "roster could not record the transaction; retry later",
            )
        }
    }
}

/// Hands agent rooms and the space among `rooms` to the reconciler (by key; it reads the
/// model itself).
fn schedule_managed_rooms<'a>(shared: &Shared, rooms: impl Iterator<Item = &'a RoomId>) {
    let keys: BTreeSet<Key> = shared.state.read(|model| {
        rooms
            .filter_map(|room| {
                if model.agents.space.room_id.as_deref() == Some(room) {
                    return Some(Key::Space);
                }
                model.agents.agent_for_room(room).map(Key::agent)
            })
            .collect()
    });
    for key in keys {
        shared.queue.schedule_pushed(&key);
    }
}

/// Decodes a transaction body as `PUT /_matrix/app/v1/transactions/{txn}` would: the member
/// events roster keeps and the count of events it skipped, or why the body is refused. For
/// fuzzing and tools; the route uses the same decoder.
pub fn parse_transaction(body: &[u8]) -> Result<(Vec<MemberEvent>, usize), String> {
    let (parts, ()) = http::Request::builder()
        .method("PUT")
        .uri("/_matrix/app/v1/transactions/fuzz")
        .header(header::CONTENT_TYPE, "application/json")
        .body(())
        .expect("a valid request")
        .into_parts();
    decode_transaction(&parts, body, "fuzz")
        .map(|t| (t.member_events, t.undecodable))
        .map_err(|r| format!("{:?}", r.into_response().status()))
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
    // Invalid UTF-8 spoils only the events that hold it: they are dropped, the rest goes on.
    let (body, spoiled) = match std::str::from_utf8(bytes) {
        Ok(_) => (std::borrow::Cow::Borrowed(bytes), 0),
        Err(_) => {
            let (clean, spoiled) = without_spoiled_events(bytes)?;
            (std::borrow::Cow::Owned(clean.into_bytes()), spoiled)
        }
    };
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
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
        .body(body.as_ref())
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
    let unstable = serde_json::from_slice::<UnstableEphemeral>(&body)
        .map(|u| u.ephemeral.len())
        .unwrap_or(0);
    let mut decoded = DecodedTransaction {
        member_events: Vec::new(),
        undecodable: spoiled,
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
    if spoiled > 0 {
        tracing::warn!(
            events = spoiled,
            "skipping events with invalid UTF-8 in a transaction"
        );
    }
    Ok(decoded)
}

/// A body with invalid UTF-8: the same text without the events that hold invalid bytes, and
/// how many were dropped. Invalid bytes outside `events` make the body unreadable.
///
/// Everything kept is the homeserver's text byte for byte (only the `events` array is
/// rebuilt from its kept elements), so a kept event decodes exactly as it would in a body
/// without invalid bytes: no re-serialisation that would merge duplicate keys or act on
/// serde_json's private `$serde_json::private::RawValue` key.
fn without_spoiled_events(bytes: &[u8]) -> Result<(String, usize), Rejection> {
    let not_json = |detail: String| {
        Rejection::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::NotJson,
            format!("transaction body is not JSON: {detail}"),
        )
    };
    // Replace each invalid sequence with U+FFFD, remembering where each replacement went.
    let mut text = String::with_capacity(bytes.len());
    let mut spoiled_at = Vec::new();
    for chunk in bytes.utf8_chunks() {
        text.push_str(chunk.valid());
        if !chunk.invalid().is_empty() {
            spoiled_at.push(text.len());
            text.push(char::REPLACEMENT_CHARACTER);
        }
    }
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        events: Option<&'a RawValue>,
    }
    let body: Body<'_> = serde_json::from_str(&text).map_err(|e| not_json(e.to_string()))?;
    let base = text.as_ptr() as usize;
    let span = |raw: &RawValue| {
        let start = raw.get().as_ptr() as usize - base;
        start..start + raw.get().len()
    };
    let Some(array) = body.events else {
        return Err(not_json(
            "invalid UTF-8 outside the events; the transaction cannot be read".into(),
        ));
    };
    let elements: Vec<&RawValue> = serde_json::from_str(array.get()).map_err(|e| {
        Rejection::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::BadJson,
            format!("transaction events are not a list: {e}"),
        )
    })?;
    // `elements` borrow from `array`, which borrows from `text`: their spans are in `text`.
    let (kept, spoiled): (Vec<&RawValue>, Vec<&RawValue>) = elements
        .into_iter()
        .partition(|raw| !spoiled_at.iter().any(|at| span(raw).contains(at)));
    let in_events = spoiled_at
        .iter()
        .filter(|at| spoiled.iter().any(|raw| span(raw).contains(at)))
        .count();
    if in_events < spoiled_at.len() {
        return Err(not_json(
            "invalid UTF-8 outside the events; the transaction cannot be read".into(),
        ));
    }
    let array_span = span(array);
    let mut clean = String::with_capacity(text.len());
    clean.push_str(&text[..array_span.start]);
    clean.push('[');
    for (i, raw) in kept.iter().enumerate() {
        if i > 0 {
            clean.push(',');
        }
        clean.push_str(raw.get());
    }
    clean.push(']');
    clean.push_str(&text[array_span.end..]);
    Ok((clean, spoiled.len()))
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
    let event: RoomMemberEvent = match raw.deserialize_as_unchecked() {
        Ok(event) => event,
        // A badly typed optional field (`reason: {}`, a numeric display name) must not
        // hide the membership itself: read what roster needs and nothing else.
        Err(full) => {
            return member_event_core(raw)
                .map(Some)
                .map_err(|core| format!("bad m.room.member event: {full}; {core}"));
        }
    };
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
        event_id: event.event_id().to_owned(),
        origin_server_ts: event.origin_server_ts().get().into(),
    }))
}

/// The fields of a member event roster keeps, each typed as the spec says; the display
/// name and avatar only when they are strings.
#[derive(serde::Deserialize)]
struct MemberEventCore {
    room_id: ruma::OwnedRoomId,
    sender: ruma::OwnedUserId,
    state_key: ruma::OwnedUserId,
    event_id: ruma::OwnedEventId,
    origin_server_ts: ruma::MilliSecondsSinceUnixEpoch,
    content: MemberContentCore,
}

#[derive(serde::Deserialize)]
struct MemberContentCore {
    membership: ruma::events::room::member::MembershipState,
    #[serde(default)]
    displayname: serde_json::Value,
    #[serde(default)]
    avatar_url: serde_json::Value,
}

fn member_event_core(raw: &Raw<AnyTimelineEvent>) -> Result<MemberEvent, String> {
    let core: MemberEventCore = raw.deserialize_as_unchecked().map_err(|e| e.to_string())?;
    let membership = Membership::parse(core.content.membership.as_str())
        .ok_or_else(|| format!("unknown membership {}", core.content.membership))?;
    let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
    Ok(MemberEvent {
        room_id: core.room_id,
        user_id: core.state_key,
        sender: core.sender,
        membership,
        displayname: text(&core.content.displayname),
        avatar_url: text(&core.content.avatar_url),
        event_id: core.event_id,
        origin_server_ts: core.origin_server_ts.get().into(),
    })
}

async fn ping(State(shared): State<Arc<Shared>>) -> Response {
    tracing::debug!("homeserver pinged");
    shared
        .state
        .status(|s| s.pinged_by_homeserver_at_ms = Some(now_ms()));
    empty_ok()
}

async fn query_user(State(shared): State<Arc<Shared>>, Path(user_id): Path<String>) -> Response {
    if shared.provides_user(&user_id) {
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
        "unrecognized appservice endpoint; this is roster's appservice listener \
         (appservice.listen), the admin API is on admin.listen",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{Body, to_bytes};

    fn parts() -> http::request::Parts {
        http::Request::builder()
            .method("PUT")
            .uri("/_matrix/app/v1/transactions/t1")
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn member(n: u32, displayname: &str) -> String {
        format!(
            r#"{{"type":"m.room.member","event_id":"$e{n}","room_id":"!r:ex.org","sender":"@u{n}:ex.org","state_key":"@u{n}:ex.org","origin_server_ts":{n},"content":{{"membership":"join","displayname":"{displayname}"}}}}"#
        )
    }

    /// A leave whose `reason` is not a string, a join whose display name is a number: the
    /// memberships still count; only the ill-typed extras are dropped.
    #[test]
    fn should_read_the_membership_of_an_event_with_an_ill_typed_optional_field() {
        let leave = r#"{"type":"m.room.member","event_id":"$k","room_id":"!r:ex.org","sender":"@mod:ex.org","state_key":"@admin:ex.org","origin_server_ts":7,"content":{"membership":"leave","reason":{}}}"#;
        let join = r#"{"type":"m.room.member","event_id":"$j","room_id":"!r:ex.org","sender":"@u:ex.org","state_key":"@u:ex.org","origin_server_ts":8,"content":{"membership":"join","displayname":5,"avatar_url":"mxc://ex.org/a"}}"#;
        let broken = r#"{"type":"m.room.member","event_id":"$b","room_id":"!r:ex.org","sender":"@u:ex.org","state_key":"not a user","origin_server_ts":9,"content":{"membership":"join"}}"#;
        let body = format!(r#"{{"events":[{leave},{join},{broken}]}}"#);
        let decoded = match decode_transaction(&parts(), body.as_bytes(), "t1") {
            Ok(decoded) => decoded,
            Err(rejection) => panic!("{:?}", rejection.into_response().status()),
        };
        assert_eq!(
            decoded.undecodable, 1,
            "a state_key that is no user id is still refused"
        );
        let [left, joined] = decoded.member_events.as_slice() else {
            panic!("{:?}", decoded.member_events);
        };
        assert_eq!(
            (left.user_id.as_str(), left.membership, left.sender.as_str()),
            ("@admin:ex.org", Membership::Leave, "@mod:ex.org")
        );
        assert_eq!(left.origin_server_ts, 7);
        assert_eq!(joined.membership, Membership::Join);
        assert_eq!(joined.displayname, None);
        assert_eq!(joined.avatar_url.as_deref(), Some("mxc://ex.org/a"));
    }

    #[test]
    fn should_skip_only_the_event_with_invalid_utf8() {
        let second = member(2, "XX");
        let (before, after) = second.split_at(second.find("XX").unwrap());
        let mut body = Vec::new();
        body.extend_from_slice(b"{\"events\":[");
        body.extend_from_slice(member(1, "ok").as_bytes());
        body.push(b',');
        body.extend_from_slice(before.as_bytes());
        // The second event's display name holds bytes that are not UTF-8.
        body.extend_from_slice(&[0xff, 0xfe]);
        body.extend_from_slice(&after.as_bytes()[2..]);
        body.push(b',');
        body.extend_from_slice(member(3, "also ok").as_bytes());
        body.extend_from_slice(b"]}");
        let decoded = decode_transaction(&parts(), &body, "t1").unwrap_or_else(|r| {
            panic!("{:?}", r.into_response().status());
        });
        let users: Vec<_> = decoded
            .member_events
            .iter()
            .map(|e| e.user_id.to_string())
            .collect();
        assert_eq!(users, vec!["@u1:ex.org", "@u3:ex.org"]);
        assert_eq!(decoded.undecodable, 1);
    }

    #[test]
    fn should_refuse_invalid_utf8_outside_the_events() {
        let mut body = format!(r#"{{"events":[{}],"x":""#, member(1, "ok")).into_bytes();
        body.extend_from_slice(&[0xff]);
        body.extend_from_slice(b"\"}");
        let rejection = decode_transaction(&parts(), &body, "t1").err().unwrap();
        assert_eq!(rejection.into_response().status(), StatusCode::BAD_REQUEST);
    }

    /// A body whose first event holds invalid UTF-8, followed by `others`.
    fn spoiled_then(others: &[&str]) -> Vec<u8> {
        let mut body = b"{\"events\":[".to_vec();
        let spoiled = member(9, "XX");
        let (before, after) = spoiled.split_at(spoiled.find("XX").unwrap());
        body.extend_from_slice(before.as_bytes());
        body.extend_from_slice(&[0xc3, 0x28]);
        body.extend_from_slice(&after.as_bytes()[2..]);
        for other in others {
            body.push(b',');
            body.extend_from_slice(other.as_bytes());
        }
        body.extend_from_slice(b"]}");
        body
    }

    fn decoded_users(body: &[u8]) -> (Vec<String>, usize) {
        let decoded = decode_transaction(&parts(), body, "t1")
            .unwrap_or_else(|r| panic!("{:?}", r.into_response().status()));
        let users = decoded
            .member_events
            .iter()
            .map(|e| e.user_id.to_string())
            .collect();
        (users, decoded.undecodable)
    }

    /// An event that repeats a key is refused by the decoder; an invalid byte elsewhere in
    /// the transaction must not turn it into a different, accepted event by merging keys.
    #[test]
    fn should_decode_kept_events_as_sent_when_another_holds_invalid_utf8() {
        let repeated = member(1, "x").replace(
            r#""state_key":"@u1:ex.org""#,
            r#""state_key":"@u1:ex.org","state_key":"@admin:ex.org""#,
        );
        let clean = format!(r#"{{"events":[{repeated}]}}"#);
        let (users, undecodable) = decoded_users(clean.as_bytes());
        assert_eq!((users.len(), undecodable), (0, 1), "{users:?}");
        let (users, undecodable) = decoded_users(&spoiled_then(&[&repeated, &member(2, "ok")]));
        assert_eq!(users, vec!["@u2:ex.org"]);
        assert_eq!(undecodable, 2, "the spoiled event and the repeated-key one");
    }

    /// serde_json reads an object whose first key is `$serde_json::private::RawValue` as the
    /// JSON inside its string: an event hidden that way must stay an undecodable object.
    #[test]
    fn should_not_unwrap_raw_value_keys_when_another_event_holds_invalid_utf8() {
        let hidden =
            serde_json::json!({ "$serde_json::private::RawValue": member(1, "x") }).to_string();
        let clean = format!(r#"{{"events":[{hidden}]}}"#);
        assert_eq!(decoded_users(clean.as_bytes()), (vec![], 1));
        assert_eq!(
            decoded_users(&spoiled_then(&[&hidden, &member(2, "ok")])),
            (vec!["@u2:ex.org".to_owned()], 2)
        );
    }

    #[test]
    fn should_refuse_invalid_utf8_when_there_are_no_events() {
        for body in [
            &b"{\"x\":\"\xff\"}"[..],
            b"{\"events\":null,\"x\":\"\xff\"}",
            b"[\"\xff\"]",
        ] {
            let rejection = decode_transaction(&parts(), body, "t1").err().unwrap();
            assert_eq!(rejection.into_response().status(), StatusCode::BAD_REQUEST);
        }
    }

    /// The finding's rule for transactions: a store that cannot write gets the homeserver a
    /// 500 (it retries), and nothing reaches the model; once it can, the same id applies.
    #[tokio::test]
    async fn should_answer_500_and_keep_nothing_when_the_store_fails() {
        use tower::ServiceExt;
        let shared = crate::testing::shared(
            crate::config::Config::from_yaml("homeserver: {server_name: ex.org}").unwrap(),
        );
        let app = router(shared.clone());
        let put = |token: &str| {
            let body = format!(
                r#"{{"events":[{}]}}"#,
                member(1, "x").replace("@u1:ex.org", "@agent_a:ex.org")
            );
            Request::builder()
                .method("PUT")
                .uri("/_matrix/app/v1/transactions/t1")
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body))
                .unwrap()
        };
        let token = shared.registration.hs_token.clone();
        shared.state.fail_writes(true);
        let answer = app.clone().oneshot(put(&token)).await.unwrap();
        assert_eq!(answer.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = to_bytes(answer.into_body(), 1024).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["errcode"], "M_UNKNOWN");
        let agent = ruma::UserId::parse("@agent_a:ex.org").unwrap();
        let room = ruma::RoomId::parse("!r:ex.org").unwrap();
        assert!(shared.state.read(|m| m.member(&room, &agent).is_none()));
        shared.state.fail_writes(false);
        let answer = app.oneshot(put(&token)).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        assert!(shared.state.read(|m| m.member(&room, &agent).is_some()));
    }

    /// A first delivery recorded after the homeserver gave up on it (its handler dropped
    /// before it scheduled anything): the retry, a duplicate, still hands the room over.
    #[tokio::test]
    async fn should_schedule_the_rooms_of_a_retried_transaction() {
        use tower::ServiceExt;
        let shared = crate::testing::shared(
            crate::config::Config::from_yaml("homeserver: {server_name: ex.org}").unwrap(),
        );
        crate::testing::record_agent_room(&shared).await;
        let admin_left = r#"{"type":"m.room.member","room_id":"!r:ex.org","sender":"@mod:ex.org","state_key":"@admin:ex.org","event_id":"$kick","origin_server_ts":1,"content":{"membership":"leave"}}"#;
        let body = format!(r#"{{"events":[{admin_left}]}}"#);
        let events = match decode_transaction(&parts(), body.as_bytes(), "t1") {
            Ok(decoded) => decoded.member_events,
            Err(rejection) => panic!("{:?}", rejection.into_response().status()),
        };
        assert_eq!(events.len(), 1);
        let recorded = shared
            .state
            .record_transaction("t1".into(), 1, events)
            .await;
        assert!(matches!(recorded, Ok(Recorded::New { .. })));
        let key = Key::agent("agent-a");
        assert!(
            shared.queue.settled(std::slice::from_ref(&key)),
            "nothing scheduled yet"
        );

        let retry = Request::builder()
            .method("PUT")
            .uri("/_matrix/app/v1/transactions/t1")
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", shared.registration.hs_token),
            )
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap();
        let answer = router(shared.clone()).oneshot(retry).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        assert!(
            !shared.queue.settled(&[key]),
            "the agent's room is due for a run"
        );
    }
}
