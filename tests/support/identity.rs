//! Identity lifecycle events as the identity service produces them (`nova.identity.events`),
//! bare or in an envelope, and the users roster makes of them.

use serde_json::{Value, json};

use super::{SERVER_NAME, uuid_like};

/// A UUID unique to this test process, `salt` (one per test) and `n`.
pub fn uuid(salt: u32, n: u32) -> String {
    let run = std::process::id() & 0xffff;
    format!("{salt:08x}-{run:04x}-4000-8000-{n:012x}")
}

/// The Matrix user roster keeps for identity `uuid`.
pub fn nova(uuid: &str) -> String {
    format!("@nova-{uuid}:{SERVER_NAME}")
}

pub fn created(uuid: &str, username: &str) -> Value {
    json!({ "user_id": uuid, "username": username, "email": format!("{username}@mail.example"), "created_at": "2026-11-21T00:00:00Z" })
}

pub fn profile(
    uuid: &str,
    username: &str,
    display_name: Option<&str>,
    avatar: Option<&str>,
) -> Value {
    json!({ "user_id": uuid, "username": username, "display_name": display_name, "bio": "hi",
            "avatar_url": avatar, "is_verified": false, "follower_count": 0, "updated_at": "2026-11-21T00:00:00Z" })
}

pub fn deleted(uuid: &str, soft_delete: bool) -> Value {
    json!({ "user_id": uuid, "deleted_at": "2026-11-21T00:00:00Z", "soft_delete": soft_delete })
}

/// The identity service's envelope around `data`, with the type as a field if given.
pub fn envelope(event_type: Option<&str>, data: Value) -> Value {
    let mut v = json!({ "event_id": uuid_like(), "timestamp": "2026-11-21T00:00:00Z", "schema_version": "1.0",
                        "source": "identity-service", "correlation_id": uuid_like(), "data": data });
    if let Some(t) = event_type {
        v["event_type"] = json!(t);
    }
    v
}

/// A bare event with its type as a field.
pub fn with_type(mut bare: Value, event_type: &str) -> Value {
    bare["event_type"] = json!(event_type);
    bare
}

pub fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

/// The user id an event is about (bare or enveloped): the identity service's message key.
pub fn user_key(body: &Value) -> Option<String> {
    body["data"]["user_id"]
        .as_str()
        .or(body["user_id"].as_str())
        .map(str::to_owned)
}
