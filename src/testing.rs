//! Test support (feature `testing`, never in a release build): an in-process fake
//! homeserver that answers the client-server calls roster makes the way Synapse does, with
//! faults on demand, and a `Shared` to run roster's parts against it.
//!
//! Unit tests of the reconciler and the lifecycle worker, and the benchmarks that isolate
//! roster's own speed, use it. Integration tests use a real Synapse instead.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::Shared;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::state::State as RosterState;
use crate::store::Store;

/// A user the fake homeserver knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
    pub deactivated: bool,
}

/// A room: memberships, state (by type and state key) and messages sent.
#[derive(Debug, Clone, Default)]
pub struct Room {
    pub members: BTreeMap<String, String>,
    pub state: BTreeMap<(String, String), Value>,
    /// (sender, content, `ts` query parameter, transaction id).
    pub messages: Vec<(String, Value, Option<u64>, String)>,
}

impl Room {
    pub fn membership(&self, user: &str) -> Option<&str> {
        self.members.get(user).map(String::as_str)
    }
}

/// One request the fake homeserver answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// The user the appservice acted as (`?user_id=`), if any.
    pub as_user: Option<String>,
}

/// A planned refusal: requests whose path contains `path` get `status` and `body`, `times`
/// times (`u32::MAX`: until cleared).
#[derive(Debug, Clone)]
struct Fault {
    method: Option<Method>,
    path: String,
    status: StatusCode,
    body: Value,
    times: u32,
    /// The request takes effect and only its answer is the fault (a lost answer).
    answer_lost: bool,
}

/// Everything the fake homeserver holds.
#[derive(Debug, Default)]
pub struct World {
    pub as_token: String,
    /// Further appservice tokens accepted (an acting-only registration's).
    pub other_tokens: Vec<String>,
    pub server_name: String,
    pub bot: String,
    pub users: BTreeMap<String, Profile>,
    pub rooms: BTreeMap<String, Room>,
    pub aliases: BTreeMap<String, String>,
    pub requests: Vec<Seen>,
    pub uploads: Vec<Vec<u8>>,
    /// What `GET /_matrix/federation/v1/version` names.
    pub server_software: String,
    faults: Vec<Fault>,
    next_room: u64,
    next_event: u64,
}

impl World {
    /// Requests whose path contains `fragment`.
    pub fn count(&self, fragment: &str) -> usize {
        self.requests
            .iter()
            .filter(|s| s.path.contains(fragment))
            .count()
    }

    pub fn room_by_alias(&self, alias: &str) -> Option<&Room> {
        self.rooms.get(self.aliases.get(alias)?)
    }
}

/// The fake homeserver, serving on 127.0.0.1.
#[derive(Clone)]
pub struct FakeHomeserver {
    pub url: String,
    world: Arc<Mutex<World>>,
}

impl FakeHomeserver {
    /// Starts one that accepts `as_token` for `server_name`, with the bot `@bot:server`.
    pub async fn start(as_token: &str, server_name: &str, bot_localpart: &str) -> FakeHomeserver {
        let world = World {
            as_token: as_token.to_owned(),
            server_name: server_name.to_owned(),
            bot: format!("@{bot_localpart}:{server_name}"),
            server_software: "Synapse".into(),
            ..World::default()
        };
        let world = Arc::new(Mutex::new(world));
        let app = Router::new().fallback(answer).with_state(world.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake homeserver");
        let url = format!("http://{}", listener.local_addr().expect("an address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeHomeserver { url, world }
    }

    /// Accepts `token` too, as a homeserver does each registration's `as_token`.
    pub fn accept_token(&self, token: &str) {
        self.world().other_tokens.push(token.to_owned());
    }

    pub fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses requests whose path contains `path` with `status`, `errcode` and `message`,
    /// `times` times.
    pub fn fail(&self, path: &str, status: u16, errcode: &str, message: &str, times: u32) {
        self.world().faults.push(Fault {
            method: None,
            path: path.to_owned(),
            status: StatusCode::from_u16(status).expect("a status code"),
            body: json!({ "errcode": errcode, "error": message }),
            times,
            answer_lost: false,
        });
    }

    /// Carries out requests whose path contains `path`, then answers 504 as a proxy would
    /// whose wait ran out: the answer is lost, the effect is not. `times` times.
    pub fn lose_answer(&self, path: &str, times: u32) {
        self.world().faults.push(Fault {
            method: None,
            path: path.to_owned(),
            status: StatusCode::GATEWAY_TIMEOUT,
            body: json!({ "errcode": "M_UNKNOWN", "error": "Gateway Timeout" }),
            times,
            answer_lost: true,
        });
    }

    /// Rate-limits requests whose path contains `path`: 429 `M_LIMIT_EXCEEDED` with
    /// `retry_after_ms`, `times` times.
    pub fn rate_limit(&self, path: &str, retry_after_ms: u64, times: u32) {
        self.world().faults.push(Fault {
            method: None,
            path: path.to_owned(),
            status: StatusCode::TOO_MANY_REQUESTS,
            body: json!({ "errcode": "M_LIMIT_EXCEEDED", "error": "Too Many Requests", "retry_after_ms": retry_after_ms }),
            times,
            answer_lost: false,
        });
    }

    /// Clears every planned refusal.
    pub fn heal(&self) {
        self.world().faults.clear();
    }
}

/// A `Shared` for `config` (validated) over an in-memory store, with the registration roster
/// would generate; the sync channel's receiver is dropped.
pub fn shared(config: Config) -> Arc<Shared> {
    let registration = crate::registration::generate(&config)
        .expect("a registration")
        .pushed;
    let state = RosterState::open(
        Store::in_memory().expect("an in-memory store"),
        config.ids().clone(),
    )
    .expect("a state");
    Arc::new(Shared::new(
        config,
        registration,
        state,
        Arc::new(Metrics::new()),
        tokio::sync::mpsc::channel(8).0,
    ))
}

/// Records that agent `agent-a` (`@agent_a`) has the room `!r:ex.org`.
pub async fn record_agent_room(shared: &Shared) {
    shared
        .state
        .save_agent(crate::model::agents::RoomRecord {
            agent_id: "agent-a".into(),
            localpart: "agent_a".into(),
            room_id: Some(ruma::owned_room_id!("!r:ex.org")),
            ..Default::default()
        })
        .await
        .expect("the record is saved");
}

/// A fake homeserver for `ex.org` (bot `@letta`) and a `Shared` whose config points at it,
/// with `extra` YAML appended to the config (e.g. `agents: {avatar: none}`).
pub async fn stack(extra: &str) -> (FakeHomeserver, Arc<Shared>) {
    stack_with("", extra).await
}

/// `stack`, with `homeserver` fields added to the homeserver section (e.g.
/// `flavor: synapse`).
pub async fn stack_with(homeserver: &str, extra: &str) -> (FakeHomeserver, Arc<Shared>) {
    let registration = crate::registration::generate(
        &Config::from_yaml("homeserver: {server_name: ex.org}").expect("a config"),
    )
    .expect("a registration")
    .pushed;
    let hs = FakeHomeserver::start(&registration.as_token, "ex.org", "letta").await;
    let config = Config::from_yaml(&format!(
        "homeserver: {{server_name: ex.org, url: '{}', {homeserver}}}\n{extra}",
        hs.url
    ))
    .expect("a config");
    let state = RosterState::open(
        Store::in_memory().expect("an in-memory store"),
        config.ids().clone(),
    )
    .expect("a state");
    let shared = Arc::new(Shared::new(
        config,
        registration,
        state,
        Arc::new(Metrics::new()),
        tokio::sync::mpsc::channel(8).0,
    ));
    (hs, shared)
}

/// The homeserver client of `shared`: its configured URL, its registration's token.
pub fn client(shared: &Shared) -> crate::matrix::Homeserver {
    crate::matrix::Homeserver::from_config(
        &shared.config,
        &crate::registration::Registrations {
            pushed: shared.registration.clone(),
            acting: None,
        },
        shared.metrics.clone(),
    )
}

/// The room `room` when `me` is joined to it, else the refusal Synapse gives.
fn joined_room<'a>(
    rooms: &'a mut BTreeMap<String, Room>,
    room: &str,
    me: &str,
) -> Result<&'a mut Room, Box<Response>> {
    let Some(r) = rooms.get_mut(room) else {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
            "Unknown room",
        )));
    };
    if r.membership(me) != Some("join") {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            "You are not in the room",
        )));
    }
    Ok(r)
}

fn error(status: StatusCode, errcode: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "errcode": errcode, "error": message })),
    )
        .into_response()
}

fn ok(body: Value) -> Response {
    axum::Json(body).into_response()
}

fn decode(segment: &str) -> String {
    percent_decode(segment)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(uri: &Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

async fn answer(
    State(world): State<Arc<Mutex<World>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut w = world.lock().unwrap_or_else(|p| p.into_inner());
    let path = uri.path().to_owned();
    let as_user = query(&uri, "user_id");
    w.requests.push(Seen {
        method: method.to_string(),
        path: path.clone(),
        as_user: as_user.clone(),
    });
    if let Some(fault) = w.faults.iter_mut().find(|f| {
        f.times > 0 && path.contains(&f.path) && f.method.as_ref().is_none_or(|m| m == method)
    }) {
        fault.times = fault.times.saturating_sub(1);
        let (status, fault_body, lost) = (fault.status, fault.body.clone(), fault.answer_lost);
        if lost {
            // The request takes effect; only its answer is replaced.
            let _ = handle(&mut w, method, uri, headers, body);
        }
        return (status, axum::Json(fault_body)).into_response();
    }
    handle(&mut w, method, uri, headers, body)
}

/// What the fake homeserver does with a request that no planned fault refuses.
fn handle(w: &mut World, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().to_owned();
    let as_user = query(&uri, "user_id");
    if path == "/_matrix/federation/v1/version" {
        let name = w.server_software.clone();
        return ok(json!({ "server": { "name": name, "version": "test" } }));
    }
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Alias lookups need no token (as on Synapse); everything else needs the as_token.
    let public = method == Method::GET
        && (path.starts_with("/_matrix/client/v3/directory/room/")
            || path.starts_with("/_matrix/client/v3/profile/"));
    match bearer {
        Some(token) if token != w.as_token && !w.other_tokens.iter().any(|t| t == token) => {
            return error(
                StatusCode::UNAUTHORIZED,
                "M_UNKNOWN_TOKEN",
                "Unknown access token.",
            );
        }
        None if !public => {
            return error(
                StatusCode::UNAUTHORIZED,
                "M_MISSING_TOKEN",
                "Missing access token.",
            );
        }
        _ => {}
    }
    let raw = body;
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    let me = as_user.unwrap_or_else(|| w.bot.clone());
    let segments: Vec<String> = path.split('/').skip(1).map(decode).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let registered = me == w.bot || w.users.contains_key(&me);
    let needs_user = !matches!(segments.as_slice(), ["_matrix", "client", "v3", "register"]);
    if needs_user && !registered {
        return error(
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            "Application service has not registered this user",
        );
    }
    if needs_user && w.users.get(&me).is_some_and(|p| p.deactivated) {
        return error(StatusCode::FORBIDDEN, "M_FORBIDDEN", "User is deactivated");
    }
    let server = w.server_name.clone();
    match (method.as_str(), segments.as_slice()) {
        ("POST", ["_matrix", "client", "v3", "register"]) => {
            let user = format!(
                "@{}:{server}",
                body["username"].as_str().unwrap_or_default()
            );
            if w.users.contains_key(&user) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "M_USER_IN_USE",
                    "User ID already taken.",
                );
            }
            w.users.insert(user.clone(), Profile::default());
            ok(json!({ "user_id": user }))
        }
        ("GET", ["_matrix", "client", "v3", "account", "whoami"]) => ok(json!({ "user_id": me })),
        ("GET", ["_matrix", "client", "v3", "capabilities"]) => ok(json!({
            "capabilities": { "m.room_versions": { "default": "12", "available": { "12": "stable", "11": "stable" } } }
        })),
        ("POST", ["_matrix", "client", "v1", "appservice", _, "ping"]) => {
            ok(json!({ "duration_ms": 1 }))
        }
        ("GET", ["_matrix", "client", "v3", "directory", "room", alias]) => {
            match w.aliases.get(*alias) {
                Some(room) => ok(json!({ "room_id": room, "servers": [server] })),
                None => error(StatusCode::NOT_FOUND, "M_NOT_FOUND", "Room alias not found"),
            }
        }
        ("PUT", ["_matrix", "client", "v3", "directory", "room", alias]) => {
            if w.aliases.contains_key(*alias) {
                return error(
                    StatusCode::CONFLICT,
                    "M_UNKNOWN",
                    "Room alias already exists",
                );
            }
            let room = body["room_id"].as_str().unwrap_or_default().to_owned();
            w.aliases.insert(alias.to_string(), room);
            ok(json!({}))
        }
        ("POST", ["_matrix", "client", "v3", "createRoom"]) => {
            if let Some(local) = body["room_alias_name"].as_str() {
                let alias = format!("#{local}:{server}");
                if w.aliases.contains_key(&alias) {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "M_ROOM_IN_USE",
                        "Room alias already taken",
                    );
                }
            }
            w.next_room += 1;
            let room_id = format!("!room{}:{server}", w.next_room);
            let mut room = Room::default();
            room.members.insert(me.clone(), "join".into());
            for invitee in body["invite"].as_array().into_iter().flatten() {
                if let Some(user) = invitee.as_str() {
                    room.members.insert(user.to_owned(), "invite".into());
                }
            }
            for event in body["initial_state"].as_array().into_iter().flatten() {
                let key = (
                    event["type"].as_str().unwrap_or_default().to_owned(),
                    event["state_key"].as_str().unwrap_or_default().to_owned(),
                );
                room.state.insert(key, event["content"].clone());
            }
            for (field, kind) in [("name", "m.room.name"), ("topic", "m.room.topic")] {
                if let Some(value) = body[field].as_str() {
                    let key = if field == "name" { "name" } else { "topic" };
                    room.state
                        .insert((kind.into(), String::new()), json!({ key: value }));
                }
            }
            if let Some(local) = body["room_alias_name"].as_str() {
                w.aliases
                    .insert(format!("#{local}:{server}"), room_id.clone());
            }
            w.rooms.insert(room_id.clone(), room);
            ok(json!({ "room_id": room_id }))
        }
        ("POST", ["_matrix", "client", "v3", "rooms", room, "invite"]) => {
            let target = body["user_id"].as_str().unwrap_or_default().to_owned();
            let r = match joined_room(&mut w.rooms, room, &me) {
                Ok(r) => r,
                Err(refused) => return *refused,
            };
            match r.membership(&target) {
                Some("join") => error(StatusCode::FORBIDDEN, "M_FORBIDDEN", "already in the room"),
                Some("ban") => error(StatusCode::FORBIDDEN, "M_FORBIDDEN", "user is banned"),
                _ => {
                    r.members.insert(target, "invite".into());
                    ok(json!({}))
                }
            }
        }
        ("POST", ["_matrix", "client", "v3", "join", room])
        | ("POST", ["_matrix", "client", "v3", "rooms", room, "join"]) => {
            let room = room.to_string();
            let Some(r) = w.rooms.get_mut(&room) else {
                return error(StatusCode::NOT_FOUND, "M_NOT_FOUND", "Unknown room");
            };
            match r.membership(&me) {
                Some("invite" | "join") => {
                    r.members.insert(me, "join".into());
                    ok(json!({ "room_id": room }))
                }
                _ => error(StatusCode::FORBIDDEN, "M_FORBIDDEN", "You are not invited"),
            }
        }
        ("POST", ["_matrix", "client", "v3", "rooms", room, "leave"]) => {
            let Some(r) = w.rooms.get_mut(*room) else {
                return error(StatusCode::NOT_FOUND, "M_NOT_FOUND", "Unknown room");
            };
            r.members.insert(me, "leave".into());
            ok(json!({}))
        }
        ("GET", ["_matrix", "client", "v3", "rooms", room, "joined_members"]) => {
            let users = w.users.clone();
            let r = match joined_room(&mut w.rooms, room, &me) {
                Ok(r) => r,
                Err(refused) => return *refused,
            };
            let joined: serde_json::Map<String, Value> = r
                .members
                .iter()
                .filter(|(_, m)| *m == "join")
                .map(|(u, _)| {
                    let profile = users.get(u).cloned().unwrap_or_default();
                    (
                        u.clone(),
                        json!({ "display_name": profile.displayname, "avatar_url": profile.avatar_url }),
                    )
                })
                .collect();
            ok(json!({ "joined": joined }))
        }
        (
            "PUT",
            [
                "_matrix",
                "client",
                "v3",
                "rooms",
                room,
                "state",
                kind,
                rest @ ..,
            ],
        ) => {
            let key = rest.join("/");
            let next = w.next_event + 1;
            w.next_event = next;
            let r = match joined_room(&mut w.rooms, room, &me) {
                Ok(r) => r,
                Err(refused) => return *refused,
            };
            r.state.insert((kind.to_string(), key), body);
            ok(json!({ "event_id": format!("$state{next}") }))
        }
        ("PUT", ["_matrix", "client", "v3", "rooms", room, "send", _kind, txn]) => {
            let ts = query(&uri, "ts").and_then(|t| t.parse().ok());
            let txn = txn.to_string();
            let r = match joined_room(&mut w.rooms, room, &me) {
                Ok(r) => r,
                Err(refused) => return *refused,
            };
            // A repeated transaction id is the same event (idempotent), as on Synapse.
            if let Some(at) = r
                .messages
                .iter()
                .position(|(sender, _, _, t)| *sender == me && *t == txn)
            {
                return ok(json!({ "event_id": format!("$msg{at}") }));
            }
            r.messages.push((me, body, ts, txn));
            ok(json!({ "event_id": format!("$msg{}", r.messages.len() - 1) }))
        }
        ("GET", ["_matrix", "client", "v3", "profile", user]) => match w.users.get(*user) {
            Some(profile) => {
                ok(json!({ "displayname": profile.displayname, "avatar_url": profile.avatar_url }))
            }
            None => error(
                StatusCode::NOT_FOUND,
                "M_NOT_FOUND",
                "Profile was not found",
            ),
        },
        ("GET", ["_matrix", "client", "v3", "profile", user, field]) => {
            let profile = w.users.get(*user).cloned().unwrap_or_default();
            let value = match *field {
                "displayname" => profile.displayname,
                "avatar_url" => profile.avatar_url,
                _ => None,
            };
            match value {
                Some(value) => ok(json!({ *field: value })),
                None => error(
                    StatusCode::NOT_FOUND,
                    "M_NOT_FOUND",
                    "Profile field not set",
                ),
            }
        }
        ("PUT", ["_matrix", "client", "v3", "profile", user, field]) => {
            if *user != me {
                return error(StatusCode::FORBIDDEN, "M_FORBIDDEN", "Not your profile");
            }
            let value = body[*field].as_str().map(str::to_owned);
            // Synapse's limit (handlers/profile.py, MAX_DISPLAYNAME_LEN), in characters.
            if *field == "displayname" && value.as_ref().is_some_and(|v| v.chars().count() > 256) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "M_UNKNOWN",
                    "Displayname is too long (max 256)",
                );
            }
            let profile = w.users.entry(me.clone()).or_default();
            match *field {
                "displayname" => profile.displayname = value,
                "avatar_url" => profile.avatar_url = value,
                _ => return error(StatusCode::BAD_REQUEST, "M_UNRECOGNIZED", "unknown field"),
            }
            ok(json!({}))
        }
        ("POST", ["_matrix", "client", "v3", "account", "deactivate"]) => {
            let erase = body["erase"].as_bool().unwrap_or(false);
            let profile = w.users.entry(me.clone()).or_default();
            profile.deactivated = true;
            if erase {
                profile.displayname = None;
                profile.avatar_url = None;
            }
            for room in w.rooms.values_mut() {
                if room.membership(&me) == Some("join") {
                    room.members.insert(me.clone(), "leave".into());
                }
            }
            ok(json!({ "id_server_unbind_result": "success" }))
        }
        ("GET", ["_matrix", "client", "v3", "joined_rooms"]) => {
            let rooms: Vec<&String> = w
                .rooms
                .iter()
                .filter(|(_, r)| r.membership(&me) == Some("join"))
                .map(|(id, _)| id)
                .collect();
            ok(json!({ "joined_rooms": rooms }))
        }
        ("POST", ["_matrix", "media", "v3", "upload"]) => {
            w.uploads.push(raw.to_vec());
            let n = w.uploads.len();
            ok(json!({ "content_uri": format!("mxc://{server}/upload{n}") }))
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "M_UNRECOGNIZED",
            "Unrecognized request",
        ),
    }
}
