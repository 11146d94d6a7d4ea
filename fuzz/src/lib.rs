//! The checks each fuzz target runs on one input; `tests/fuzz_corpus.rs` replays the
//! committed corpora through the same functions, so a regression fails `cargo test`.
//!
//! Each check panics when roster panics or when one of the properties below breaks; a
//! refused input is not a failure. Properties, per target:
//! - `appservice_transaction`: invalid UTF-8 only ever removes whole events: what a body
//!   with invalid bytes yields is a subsequence of what the same body with the bytes
//!   replaced by U+FFFD yields, and it is refused only where that body is.
//! - `lifecycle_decode`: decoding is deterministic; a decoded identity is a canonical
//!   (lower-case) UUID; an error message is one short ASCII line that quotes no payload.
//! - `config_load`: an environment override of a string key is what the loaded config
//!   holds, verbatim, whatever the file's shape; `Debug` shows no secret; errors are one line.

use std::collections::BTreeMap;

use roster::config::Config;
use roster::lifecycle::{DecodeError, Decoded, decode};
use roster::model::MemberEvent;
use roster::model::identity::{IdentityEvent, IdentityId};

/// The transaction body as the homeserver would `PUT` it.
pub fn appservice_transaction(data: &[u8]) {
    let parsed = roster::appservice::parse_transaction(data);
    if std::str::from_utf8(data).is_ok() {
        return;
    }
    let lossy = String::from_utf8_lossy(data);
    let whole = roster::appservice::parse_transaction(lossy.as_bytes());
    match (&parsed, &whole) {
        (Ok((kept, _)), Ok((all, _))) => assert!(
            is_subsequence(kept, all),
            "skipping events with invalid UTF-8 changed or added events:\nkept {kept:#?}\nall {all:#?}"
        ),
        (Ok(_), Err(e)) => panic!("accepted with invalid UTF-8 but refused without it: {e}"),
        (Err(_), _) => {}
    }
}

fn is_subsequence(part: &[MemberEvent], whole: &[MemberEvent]) -> bool {
    let mut rest = whole.iter();
    part.iter().all(|event| rest.any(|e| e == event))
}

/// Input: byte 0 chooses whether there is an `event_type` header (bit 0) and a payload
/// (bit 1); with a header, byte 1 is its length; the rest is the payload.
pub fn lifecycle_decode(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (header, payload) = if mode & 1 == 1 {
        let Some((&len, rest)) = rest.split_first() else {
            return;
        };
        let len = usize::from(len).min(rest.len());
        let (header, payload) = rest.split_at(len);
        (Some(header), payload)
    } else {
        (None, rest)
    };
    let payload = (mode & 2 == 0).then_some(payload);
    let decoded = decode(header, payload);
    assert_eq!(
        decoded,
        decode(header, payload),
        "decoding is deterministic"
    );
    match decoded {
        Ok(Decoded::Event(event) | Decoded::LegacyShaped(event)) => {
            let id = match &event {
                IdentityEvent::Created { id, .. }
                | IdentityEvent::ProfileUpdated { id, .. }
                | IdentityEvent::Deleted { id, .. } => id,
            };
            assert_eq!(IdentityId::parse(id.as_str()).as_ref(), Some(id));
            assert!(
                !id.as_str().bytes().any(|b| b.is_ascii_uppercase()),
                "identity ids are lower case: {id}"
            );
            let _ = id.user_id(ruma::server_name!("example.org"));
            if let IdentityEvent::ProfileUpdated {
                username,
                display_name,
                ..
            } = &event
            {
                assert!(
                    username.is_some()
                        || display_name
                            .as_deref()
                            .is_some_and(|d| !d.trim().is_empty()),
                    "a profile update names the user somehow"
                );
            }
        }
        Ok(Decoded::Unknown(_)) => {}
        Err(error) => {
            let text = error.to_string();
            assert!(
                text.len() < 120 && text.is_ascii() && !text.contains('\n'),
                "error messages are one short line of fixed text: {text:?}"
            );
            if let DecodeError::NotJson(detail) = &error {
                assert!(
                    detail
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '/'),
                    "a JSON error says where, never what: {detail:?}"
                );
            }
        }
    }
}

/// Config keys whose environment value is kept verbatim, with the legacy variable (if any)
/// that sets them.
const STRING_KEYS: &[(&str, &str, Option<&str>)] = &[
    ("homeserver", "url", Some("MATRIX_HOMESERVER_URL")),
    ("homeserver", "server_name", Some("MATRIX_SERVER_NAME")),
    ("homeserver", "admin_token", Some("MATRIX_ADMIN_TOKEN")),
    ("appservice", "id", None),
    ("appservice", "bot_localpart", None),
    ("admin", "token", None),
    ("agents", "letta_url", Some("LETTA_API_URL")),
    ("agents", "letta_token", Some("LETTA_TOKEN")),
    ("agents", "space_name", None),
    ("lifecycle", "brokers", Some("KAFKA_BROKERS")),
    ("lifecycle", "topic", Some("KAFKA_IDENTITY_EVENTS_TOPIC")),
    ("lifecycle", "group_id", Some("KAFKA_CONSUMER_GROUP_ID")),
];

/// Input: YAML text, then optionally a NUL byte and environment lines `NAME=value`.
pub fn config_load(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (yaml, env_text) = text.split_once('\0').unwrap_or((text, ""));
    let env: BTreeMap<String, String> = env_text
        .split('\n')
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let config = match Config::from_yaml_with_env(yaml, &env) {
        Ok(config) => config,
        Err(error) => {
            let text = error.to_string();
            assert!(
                !text.contains(['\n', '\r']),
                "config errors are one line: {text:?}"
            );
            return;
        }
    };
    let _ = config.ids();
    for (section, name, legacy) in STRING_KEYS {
        let Some(expected) = winning_override(&env, section, name, *legacy) else {
            continue;
        };
        let actual = string_value(&config, section, name);
        let expected = match (*section, *name) {
            // An empty secret is no secret.
            (_, "admin_token" | "token" | "letta_token") if expected.is_empty() => None,
            _ => Some(expected.as_str()),
        };
        assert_eq!(
            actual, expected,
            "{section}.{name} is not the value its environment variable set"
        );
    }
    let debug = format!("{config:?}");
    let mut blank = config.clone();
    blank.homeserver.admin_token = None;
    blank.admin.token = None;
    blank.agents.letta_token = None;
    blank.lifecycle.kafka.clear();
    let blank = format!("{blank:?}");
    let secrets = [
        config.homeserver.admin_token.as_ref(),
        config.admin.token.as_ref(),
        config.agents.letta_token.as_ref(),
    ];
    let secrets = secrets
        .into_iter()
        .flatten()
        .map(|s| s.expose())
        .chain(config.lifecycle.kafka.values().map(String::as_str));
    for secret in secrets {
        // A short value or one the config holds elsewhere in the open proves nothing.
        if secret.len() >= 8 && !blank.contains(secret) {
            assert!(
                !debug.contains(secret),
                "Debug of the config shows a secret"
            );
        }
    }
}

/// The value the environment sets for `section.name`: the last `ROSTER_` variable naming
/// it (any case), else its legacy variable.
fn winning_override(
    env: &BTreeMap<String, String>,
    section: &str,
    name: &str,
    legacy: Option<&str>,
) -> Option<String> {
    let roster = env
        .iter()
        .filter(|(var, _)| {
            var.strip_prefix("ROSTER_")
                .and_then(|rest| rest.split_once("__"))
                .is_some_and(|(s, n)| {
                    s.eq_ignore_ascii_case(section) && n.eq_ignore_ascii_case(name)
                })
        })
        .map(|(_, value)| value.clone())
        .next_back();
    roster.or_else(|| env.get(legacy?).cloned())
}

fn string_value<'a>(config: &'a Config, section: &str, name: &str) -> Option<&'a str> {
    let secret = |s: &'a Option<roster::config::Secret>| s.as_ref().map(|s| s.expose());
    match (section, name) {
        ("homeserver", "url") => Some(&config.homeserver.url),
        ("homeserver", "server_name") => config.homeserver.server_name.as_deref(),
        ("homeserver", "admin_token") => secret(&config.homeserver.admin_token),
        ("appservice", "id") => Some(&config.appservice.id),
        ("appservice", "bot_localpart") => Some(&config.appservice.bot_localpart),
        ("admin", "token") => secret(&config.admin.token),
        ("agents", "letta_url") => config.agents.letta_url.as_deref(),
        ("agents", "letta_token") => secret(&config.agents.letta_token),
        ("agents", "space_name") => Some(&config.agents.space_name),
        ("lifecycle", "brokers") => Some(&config.lifecycle.brokers),
        ("lifecycle", "topic") => Some(&config.lifecycle.topic),
        ("lifecycle", "group_id") => Some(&config.lifecycle.group_id),
        _ => unreachable!("every key of STRING_KEYS is listed"),
    }
}

/// The old bot's mappings (`roster adopt`): any text is read or refused with a one-line
/// error, never a panic, and the same text always reads the same way. A password in the
/// input never reaches the result (`Mapping` has no place for one) or the error (the seeds
/// carry the fixtures' passwords, `file-secret-...`).
pub fn legacy_mappings(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let first = roster::commands::adopt::parse_mappings(text);
    match (&first, &roster::commands::adopt::parse_mappings(text)) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "reading is deterministic"),
        (Err(a), Err(b)) => {
            let message = a.to_string();
            assert_eq!(message, b.to_string(), "reading is deterministic");
            assert!(!message.contains('\n'), "one line: {message:?}");
            assert!(
                !message.contains("file-secret-"),
                "the error quotes a password: {message:?}"
            );
        }
        _ => panic!("reading is deterministic"),
    }
}
