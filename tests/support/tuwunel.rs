//! A stand-in that emulates tuwunel where roster's identity effects meet it, as tuwunel's
//! source (1.9.0) says it behaves:
//!
//! - appservices get no `/account/deactivate` bypass: interactive auth is always demanded;
//! - the admin API `POST /_synapse/admin/v1/deactivate/{user}` (admin token) deactivates
//!   without leaving rooms or clearing the profile;
//! - masquerading (`?user_id=`) as a user who does not exist is `M_FORBIDDEN`, and so is
//!   acting as a deactivated user: a deactivated account cannot act, so leaving its rooms and
//!   clearing its profile must come before the deactivation.
//!
//! It serves on 127.0.0.1:0 in the test's runtime and records what was done, in order.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::{Value, json};

use super::SERVER_NAME;

#[derive(Default, Debug, Clone)]
pub struct User {
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
    pub deactivated: bool,
    pub erased: bool,
}

#[derive(Default)]
pub struct Tuwunel {
    /// The appservice tokens it accepts (one per registration).
    pub as_tokens: Vec<String>,
    pub admin_token: String,
    pub users: HashMap<String, User>,
    /// Room id -> joined users.
    pub rooms: HashMap<String, HashSet<String>>,
    pub account_deactivate_calls: usize,
    /// (user, erase) per admin deactivation.
    pub admin_deactivations: Vec<(String, bool)>,
    /// (user, what) for every change made, in order: `leave <room>`, `displayname`,
    /// `avatar_url`, `admin_deactivate`.
    pub journal: Vec<(String, String)>,
    /// Requests refused because the user acting was deactivated.
    pub refused_deactivated: usize,
    pub uploads: usize,
}

impl Tuwunel {
    /// What was done to or as `user`, in order.
    pub fn journal_of(&self, user: &str) -> Vec<String> {
        self.journal
            .iter()
            .filter(|(u, _)| u == user)
            .map(|(_, what)| what.clone())
            .collect()
    }
}

pub type Shared = Arc<Mutex<Tuwunel>>;

fn matrix_error(status: StatusCode, errcode: &str, error: &str) -> Response {
    (
        status,
        axum::Json(json!({ "errcode": errcode, "error": error })),
    )
        .into_response()
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::to_owned)
}

/// A refusal: status, errcode, message.
type Refusal = (StatusCode, &'static str, &'static str);

fn refuse((status, errcode, error): Refusal) -> Response {
    matrix_error(status, errcode, error)
}

/// The user the appservice acts as, or the refusal tuwunel gives.
fn sender(
    state: &mut Tuwunel,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Result<String, Refusal> {
    if !bearer(headers).is_some_and(|t| state.as_tokens.contains(&t)) {
        return Err((
            StatusCode::UNAUTHORIZED,
            "M_UNKNOWN_TOKEN",
            "Unknown access token.",
        ));
    }
    let user = query
        .get("user_id")
        .cloned()
        .unwrap_or_else(|| format!("@letta:{SERVER_NAME}"));
    match state.users.get(&user) {
        None => Err((StatusCode::FORBIDDEN, "M_FORBIDDEN", "User does not exist.")),
        Some(u) if u.deactivated => {
            state.refused_deactivated += 1;
            Err((
                StatusCode::FORBIDDEN,
                "M_FORBIDDEN",
                "User is deactivated and cannot act.",
            ))
        }
        Some(_) => Ok(user),
    }
}

type Q = Query<HashMap<String, String>>;

/// Starts the stand-in for an appservice with `as_tokens` (those of all its registrations);
/// `admin_token` is a server admin's. `@letta` exists. Returns its base URL and its state.
pub async fn start(as_tokens: &[String], admin_token: &str) -> (String, Shared) {
    let mut state = Tuwunel {
        as_tokens: as_tokens.to_vec(),
        admin_token: admin_token.to_owned(),
        ..Tuwunel::default()
    };
    state
        .users
        .insert(format!("@letta:{SERVER_NAME}"), User::default());
    let shared: Shared = Arc::new(Mutex::new(state));
    let app = Router::new()
        .route(
            "/_matrix/federation/v1/version",
            get(|| async {
                axum::Json(json!({ "server": { "name": "Tuwunel", "version": "1.4.6" } }))
            }),
        )
        .route("/_matrix/client/v3/register", post(register))
        .route("/_matrix/client/v3/account/whoami", get(whoami))
        .route("/_matrix/client/v3/profile/{user}", get(get_profile))
        .route(
            "/_matrix/client/v3/profile/{user}/{field}",
            put(set_profile),
        )
        .route("/_matrix/media/v3/upload", post(upload))
        .route("/_matrix/client/v3/joined_rooms", get(joined_rooms))
        .route("/_matrix/client/v3/rooms/{room}/leave", post(leave))
        .route(
            "/_matrix/client/v3/account/deactivate",
            post(account_deactivate),
        )
        .route(
            "/_synapse/admin/v1/deactivate/{user}",
            post(admin_deactivate),
        )
        .route(
            "/_matrix/client/v1/appservice/{id}/ping",
            post(|| async { axum::Json(json!({ "duration_ms": 1 })) }),
        )
        .fallback(|| async {
            matrix_error(
                StatusCode::NOT_FOUND,
                "M_UNRECOGNIZED",
                "Unrecognized request",
            )
        })
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), shared)
}

async fn register(
    State(s): State<Shared>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let mut s = s.lock().unwrap();
    if !bearer(&headers).is_some_and(|t| s.as_tokens.contains(&t)) {
        return matrix_error(
            StatusCode::UNAUTHORIZED,
            "M_UNKNOWN_TOKEN",
            "Unknown access token.",
        );
    }
    let user = format!(
        "@{}:{SERVER_NAME}",
        body["username"].as_str().unwrap_or_default()
    );
    if s.users.contains_key(&user) {
        return matrix_error(
            StatusCode::BAD_REQUEST,
            "M_USER_IN_USE",
            "User ID already taken.",
        );
    }
    s.users.insert(user.clone(), User::default());
    axum::Json(json!({ "user_id": user })).into_response()
}

async fn whoami(State(s): State<Shared>, headers: HeaderMap, Query(q): Q) -> Response {
    let mut s = s.lock().unwrap();
    match sender(&mut s, &headers, &q) {
        Ok(user) => axum::Json(json!({ "user_id": user })).into_response(),
        Err(refusal) => refuse(refusal),
    }
}

/// tuwunel answers a profile of a local user who does not exist with 404 M_NOT_FOUND.
async fn get_profile(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Q,
    Path(user): Path<String>,
) -> Response {
    let mut s = s.lock().unwrap();
    if let Err(refusal) = sender(&mut s, &headers, &q) {
        return refuse(refusal);
    }
    match s.users.get(&user) {
        Some(u) => axum::Json(json!({ "displayname": u.displayname, "avatar_url": u.avatar_url }))
            .into_response(),
        None => matrix_error(
            StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
            "Profile was not found.",
        ),
    }
}

async fn set_profile(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Q,
    Path((user, field)): Path<(String, String)>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let mut s = s.lock().unwrap();
    let me = match sender(&mut s, &headers, &q) {
        Ok(me) => me,
        Err(refusal) => return refuse(refusal),
    };
    if me != user {
        return matrix_error(StatusCode::FORBIDDEN, "M_FORBIDDEN", "Not your profile.");
    }
    // An absent value removes the field.
    let value = body[field.as_str()].as_str().map(str::to_owned);
    let profile = s.users.get_mut(&user).unwrap();
    match field.as_str() {
        "displayname" => profile.displayname = value,
        "avatar_url" => profile.avatar_url = value,
        _ => return matrix_error(StatusCode::BAD_REQUEST, "M_UNRECOGNIZED", "field"),
    }
    s.journal.push((user, field));
    axum::Json(json!({})).into_response()
}

async fn upload(State(s): State<Shared>, headers: HeaderMap, Query(q): Q) -> Response {
    let mut s = s.lock().unwrap();
    if let Err(refusal) = sender(&mut s, &headers, &q) {
        return refuse(refusal);
    }
    s.uploads += 1;
    axum::Json(json!({ "content_uri": format!("mxc://{SERVER_NAME}/standin{}", s.uploads) }))
        .into_response()
}

async fn joined_rooms(State(s): State<Shared>, headers: HeaderMap, Query(q): Q) -> Response {
    let mut s = s.lock().unwrap();
    let me = match sender(&mut s, &headers, &q) {
        Ok(me) => me,
        Err(refusal) => return refuse(refusal),
    };
    let rooms: Vec<&String> = s
        .rooms
        .iter()
        .filter(|(_, m)| m.contains(&me))
        .map(|(r, _)| r)
        .collect();
    axum::Json(json!({ "joined_rooms": rooms })).into_response()
}

async fn leave(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Q,
    Path(room): Path<String>,
) -> Response {
    let mut s = s.lock().unwrap();
    let me = match sender(&mut s, &headers, &q) {
        Ok(me) => me,
        Err(refusal) => return refuse(refusal),
    };
    if let Some(members) = s.rooms.get_mut(&room) {
        members.remove(&me);
    }
    s.journal.push((me, format!("leave {room}")));
    axum::Json(json!({})).into_response()
}

async fn account_deactivate(State(s): State<Shared>) -> Response {
    s.lock().unwrap().account_deactivate_calls += 1;
    // No appservice bypass: interactive auth, always.
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(
            json!({ "flows": [{ "stages": ["m.login.password"] }], "params": {}, "session": "s1" }),
        ),
    )
        .into_response()
}

async fn admin_deactivate(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(user): Path<String>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let mut s = s.lock().unwrap();
    if bearer(&headers).as_deref() != Some(s.admin_token.as_str()) {
        return matrix_error(
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            "Only server admins can use this API.",
        );
    }
    let erase = body["erase"].as_bool().unwrap_or(false);
    let Some(profile) = s.users.get_mut(&user) else {
        return matrix_error(StatusCode::NOT_FOUND, "M_NOT_FOUND", "User not found");
    };
    // Neither leaves rooms nor clears the profile.
    profile.deactivated = true;
    profile.erased |= erase;
    s.admin_deactivations.push((user.clone(), erase));
    s.journal.push((user, "admin_deactivate".into()));
    axum::Json(json!({ "id_server_unbind_result": "success" })).into_response()
}
