//! Turns one lifecycle message into an identity event, as the README's "Event shapes"
//! table describes them.
//!
//! The type comes from the `event_type` header, else from an `event_type` field (of the
//! envelope, else of its `data`); the body is an envelope
//! `{event_id, timestamp, schema_version, source, correlation_id, data}` or the bare data.
//! Both spellings of every type are accepted. Only the fields roster uses are required;
//! everything else is ignored, so producers may add fields. Pure: no I/O. Error messages
//! never quote payload values (they travel to logs and dead-letter headers).
//!
//! Events from identity-service versions that predate `event_type` carry no type at all;
//! they are recognised by the fields their data holds, as the consumer roster replaces did
//! ([`legacy_kind`]), and decoded as [`Decoded::LegacyShaped`] so they can be counted.

use serde_json::{Map, Value};

use crate::model::identity::{IdentityEvent, IdentityId};

/// Name of the Kafka header (and JSON field) carrying the event type.
pub const TYPE_HEADER: &str = "event_type";

/// A message roster understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Event(IdentityEvent),
    /// An event without any type, recognised by its shape ([`legacy_kind`]).
    LegacyShaped(IdentityEvent),
    /// A type roster does not handle: skipped and counted, never dead-lettered.
    Unknown(String),
}

impl Decoded {
    /// The identity event, whichever way its type was found.
    pub fn event(&self) -> Option<&IdentityEvent> {
        match self {
            Decoded::Event(event) | Decoded::LegacyShaped(event) => Some(event),
            Decoded::Unknown(_) => None,
        }
    }
}

/// Why a message cannot be decoded; the text is the dead-letter `reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the message has no payload")]
    NoPayload,
    #[error("the payload is not JSON ({0})")]
    NotJson(String),
    #[error("the payload is not a JSON object")]
    NotObject,
    #[error("the event_type header is not UTF-8 text")]
    HeaderNotText,
    #[error("the event_type field is not a string")]
    TypeNotText,
    #[error(
        "no event type: neither an event_type header nor an event_type field, and the data has none of the legacy shapes"
    )]
    NoType,
    #[error("{kind} event lacks {field}")]
    Missing {
        kind: &'static str,
        field: &'static str,
    },
    #[error("{kind} event has a {field} that is not {expected}")]
    Invalid {
        kind: &'static str,
        field: &'static str,
        expected: &'static str,
    },
}

#[derive(Clone, Copy)]
enum Kind {
    Created,
    ProfileUpdated,
    Deleted,
}

impl Kind {
    fn parse(text: &str) -> Option<Kind> {
        Some(match text {
            "identity.user.created" | "UserCreatedEvent" => Kind::Created,
            "identity.user.profile_updated" | "UserProfileUpdatedEvent" => Kind::ProfileUpdated,
            "identity.user.deleted" | "UserDeletedEvent" => Kind::Deleted,
            _ => return None,
        })
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Created => "created",
            Kind::ProfileUpdated => "profile_updated",
            Kind::Deleted => "deleted",
        }
    }
}

/// Decodes a message from its `event_type` header (if any) and payload.
pub fn decode(type_header: Option<&[u8]>, payload: Option<&[u8]>) -> Result<Decoded, DecodeError> {
    let header_type = type_header
        .map(|bytes| {
            std::str::from_utf8(bytes)
                .map(|t| t.trim().to_owned())
                .map_err(|_| DecodeError::HeaderNotText)
        })
        .transpose()?
        .filter(|t| !t.is_empty());
    // An unknown type named by the header is skipped whatever the payload holds.
    if let Some(t) = &header_type
        && Kind::parse(t).is_none()
    {
        return Ok(Decoded::Unknown(t.clone()));
    }
    let payload = payload
        .filter(|p| !p.is_empty())
        .ok_or(DecodeError::NoPayload)?;
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| DecodeError::NotJson(e.classify_text()))?;
    let Value::Object(top) = value else {
        return Err(DecodeError::NotObject);
    };
    let data = match top.get("data") {
        Some(Value::Object(data)) => data,
        _ => &top,
    };
    let type_name = match header_type {
        Some(t) => Some(t),
        // The data's field is read only when the envelope names no type.
        None => match type_field(&top)? {
            Some(t) => Some(t),
            None => type_field(data)?,
        },
    };
    let (kind, legacy) = match type_name {
        Some(name) => match Kind::parse(&name) {
            Some(kind) => (kind, false),
            None => return Ok(Decoded::Unknown(name)),
        },
        None => (legacy_kind(data).ok_or(DecodeError::NoType)?, true),
    };
    let fields = Fields {
        kind: kind.label(),
        data,
    };
    let id = fields.identity_id()?;
    let event = match kind {
        Kind::Created => IdentityEvent::Created {
            id,
            username: fields
                .string("username")?
                .ok_or(fields.missing("username"))?,
        },
        Kind::ProfileUpdated => {
            let display_name = fields.string("display_name")?;
            let username = fields.string("username")?;
            let has_display_name = display_name
                .as_deref()
                .is_some_and(|d| !d.trim().is_empty());
            if !has_display_name && username.is_none() {
                // username is the fallback for a missing display name.
                return Err(fields.missing("username"));
            }
            IdentityEvent::ProfileUpdated {
                id,
                username,
                display_name,
                avatar_url: fields.string("avatar_url")?,
            }
        }
        Kind::Deleted => IdentityEvent::Deleted {
            id,
            soft_delete: match fields.data.get("soft_delete") {
                Some(Value::Bool(b)) => *b,
                None | Some(Value::Null) => return Err(fields.missing("soft_delete")),
                Some(_) => return Err(fields.invalid("soft_delete", "a boolean")),
            },
        },
    };
    Ok(if legacy {
        Decoded::LegacyShaped(event)
    } else {
        Decoded::Event(event)
    })
}

/// The type of an event that names none, by the fields its data holds (checked in this
/// order): `deleted_at` + `soft_delete`: deleted; `username` + `updated_at` + `display_name`:
/// profile updated; `user_id` + `email` + `username` + `created_at`: created. A `deleted_at`
/// of `null` says the user is not deleted: that data is no deletion (with `soft_delete:
/// false` it would erase the profile), whatever else it may be.
fn legacy_kind(data: &Map<String, Value>) -> Option<Kind> {
    let has = |fields: &[&str]| fields.iter().all(|f| data.contains_key(*f));
    let deleted = data.get("deleted_at").is_some_and(|at| !at.is_null());
    if deleted && has(&["soft_delete"]) {
        Some(Kind::Deleted)
    } else if has(&["username", "updated_at", "display_name"]) {
        Some(Kind::ProfileUpdated)
    } else if has(&["user_id", "email", "username", "created_at"]) {
        Some(Kind::Created)
    } else {
        None
    }
}

fn type_field(object: &Map<String, Value>) -> Result<Option<String>, DecodeError> {
    match object.get(TYPE_HEADER) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
        Some(_) => Err(DecodeError::TypeNotText),
    }
}

struct Fields<'a> {
    kind: &'static str,
    data: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn missing(&self, field: &'static str) -> DecodeError {
        DecodeError::Missing {
            kind: self.kind,
            field,
        }
    }

    fn invalid(&self, field: &'static str, expected: &'static str) -> DecodeError {
        DecodeError::Invalid {
            kind: self.kind,
            field,
            expected,
        }
    }

    /// A string field; absent and `null` are `None`.
    fn string(&self, field: &'static str) -> Result<Option<String>, DecodeError> {
        match self.data.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.invalid(field, "a string")),
        }
    }

    fn identity_id(&self) -> Result<IdentityId, DecodeError> {
        let raw = self.string("user_id")?.ok_or(self.missing("user_id"))?;
        IdentityId::parse(raw.trim()).ok_or(self.invalid("user_id", "a UUID"))
    }
}

/// serde_json's error without the input echoed back (it never quotes it, but keep only
/// the category and position to be sure).
trait ClassifyText {
    fn classify_text(&self) -> String;
}

impl ClassifyText for serde_json::Error {
    fn classify_text(&self) -> String {
        let category = match self.classify() {
            serde_json::error::Category::Io => "I/O error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "data error",
            serde_json::error::Category::Eof => "unexpected end",
        };
        format!(
            "{category} at line {} column {}",
            self.line(),
            self.column()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const UUID: &str = "6f1b2c3d-aaaa-4bbb-8ccc-0123456789ab";

    fn id() -> IdentityId {
        IdentityId::parse(UUID).unwrap()
    }

    fn bytes(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    fn envelope(event_type: Option<&str>, data: Value) -> Value {
        let mut v = json!({
            "event_id": "e1", "timestamp": "2026-11-21T00:00:00Z", "schema_version": "1",
            "source": "identity", "correlation_id": "c1", "data": data,
        });
        if let Some(t) = event_type {
            v["event_type"] = json!(t);
        }
        v
    }

    #[test]
    fn should_decode_every_accepted_shape_alike() {
        let data = json!({ "user_id": UUID, "username": "alice", "email": "a@example.org", "created_at": "x" });
        let want = Decoded::Event(IdentityEvent::Created {
            id: id(),
            username: "alice".into(),
        });
        for spelling in ["identity.user.created", "UserCreatedEvent"] {
            let mut bare_with_field = data.clone();
            bare_with_field["event_type"] = json!(spelling);
            let mut data_with_field = data.clone();
            data_with_field["event_type"] = json!(spelling);
            let shapes: Vec<(Option<&str>, Value)> = vec![
                (Some(spelling), data.clone()),
                (Some(spelling), envelope(None, data.clone())),
                (None, bare_with_field),
                (None, envelope(Some(spelling), data.clone())),
                (None, envelope(None, data_with_field)),
            ];
            for (header, body) in shapes {
                assert_eq!(
                    decode(header.map(str::as_bytes), Some(&bytes(&body))),
                    Ok(want.clone()),
                    "{header:?} {body}"
                );
            }
        }
    }

    #[test]
    fn should_decode_both_spellings_of_updates_and_deletions() {
        let update = json!({ "user_id": UUID, "username": "alice", "display_name": "Alice", "bio": null,
            "avatar_url": "mxc://x/y", "is_verified": true, "follower_count": 3, "updated_at": "x" });
        for spelling in ["identity.user.profile_updated", "UserProfileUpdatedEvent"] {
            assert_eq!(
                decode(Some(spelling.as_bytes()), Some(&bytes(&update))),
                Ok(Decoded::Event(IdentityEvent::ProfileUpdated {
                    id: id(),
                    username: Some("alice".into()),
                    display_name: Some("Alice".into()),
                    avatar_url: Some("mxc://x/y".into()),
                }))
            );
        }
        let delete = json!({ "user_id": UUID, "deleted_at": "x", "soft_delete": false });
        for spelling in ["identity.user.deleted", "UserDeletedEvent"] {
            assert_eq!(
                decode(
                    None,
                    Some(&bytes(&envelope(Some(spelling), delete.clone())))
                ),
                Ok(Decoded::Event(IdentityEvent::Deleted {
                    id: id(),
                    soft_delete: false
                }))
            );
        }
    }

    #[test]
    fn should_prefer_the_header_over_the_field() {
        let body =
            json!({ "event_type": "UserCreatedEvent", "user_id": UUID, "soft_delete": true });
        assert!(matches!(
            decode(Some(b"UserDeletedEvent"), Some(&bytes(&body))),
            Ok(Decoded::Event(IdentityEvent::Deleted { .. }))
        ));
        // The envelope's type decides; a field of that name in the data is not read.
        let data = json!({ "user_id": UUID, "soft_delete": true, "event_type": 7 });
        assert!(matches!(
            decode(
                None,
                Some(&bytes(&envelope(Some("UserDeletedEvent"), data)))
            ),
            Ok(Decoded::Event(IdentityEvent::Deleted { .. }))
        ));
    }

    #[test]
    fn should_require_only_the_fields_it_uses() {
        let minimal_update = json!({ "user_id": UUID, "display_name": "Alice" });
        assert!(
            decode(
                Some(b"UserProfileUpdatedEvent"),
                Some(&bytes(&minimal_update))
            )
            .is_ok()
        );
        let minimal_delete = json!({ "user_id": UUID, "soft_delete": true });
        assert!(decode(Some(b"UserDeletedEvent"), Some(&bytes(&minimal_delete))).is_ok());
        let upper = json!({ "user_id": UUID.to_uppercase(), "username": "a" });
        assert_eq!(
            decode(Some(b"UserCreatedEvent"), Some(&bytes(&upper))),
            Ok(Decoded::Event(IdentityEvent::Created {
                id: id(),
                username: "a".into()
            }))
        );
    }

    #[test]
    fn should_skip_unknown_types_without_reading_the_payload() {
        assert_eq!(
            decode(Some(b"identity.user.logged_in"), Some(b"not json")),
            Ok(Decoded::Unknown("identity.user.logged_in".into()))
        );
        let body = json!({ "event_type": "SomethingElse", "user_id": UUID });
        assert_eq!(
            decode(None, Some(&bytes(&body))),
            Ok(Decoded::Unknown("SomethingElse".into()))
        );
    }

    #[test]
    fn should_name_what_is_wrong_with_undecodable_messages() {
        let created = Some(b"UserCreatedEvent".as_slice());
        type Case<'a> = (Option<&'a [u8]>, Option<Vec<u8>>, DecodeError);
        let cases: Vec<Case> = vec![
            (created, None, DecodeError::NoPayload),
            (created, Some(vec![]), DecodeError::NoPayload),
            (
                created,
                Some(b"{oops".to_vec()),
                DecodeError::NotJson("syntax error at line 1 column 2".into()),
            ),
            (created, Some(b"[1]".to_vec()), DecodeError::NotObject),
            (
                Some(b"\xff\xfe"),
                Some(b"{}".to_vec()),
                DecodeError::HeaderNotText,
            ),
            (
                None,
                Some(bytes(&json!({ "user_id": UUID }))),
                DecodeError::NoType,
            ),
            (
                None,
                Some(bytes(&json!({ "event_type": 7 }))),
                DecodeError::TypeNotText,
            ),
            (
                created,
                Some(bytes(&json!({ "username": "a" }))),
                DecodeError::Missing {
                    kind: "created",
                    field: "user_id",
                },
            ),
            (
                created,
                Some(bytes(
                    &json!({ "user_id": "alice@example.org", "username": "a" }),
                )),
                DecodeError::Invalid {
                    kind: "created",
                    field: "user_id",
                    expected: "a UUID",
                },
            ),
            (
                created,
                Some(bytes(&json!({ "user_id": UUID }))),
                DecodeError::Missing {
                    kind: "created",
                    field: "username",
                },
            ),
            (
                Some(b"UserProfileUpdatedEvent"),
                Some(bytes(&json!({ "user_id": UUID, "display_name": " " }))),
                DecodeError::Missing {
                    kind: "profile_updated",
                    field: "username",
                },
            ),
            (
                Some(b"UserProfileUpdatedEvent"),
                Some(bytes(
                    &json!({ "user_id": UUID, "username": "a", "avatar_url": 5 }),
                )),
                DecodeError::Invalid {
                    kind: "profile_updated",
                    field: "avatar_url",
                    expected: "a string",
                },
            ),
            (
                Some(b"UserDeletedEvent"),
                Some(bytes(&json!({ "user_id": UUID }))),
                DecodeError::Missing {
                    kind: "deleted",
                    field: "soft_delete",
                },
            ),
            (
                Some(b"UserDeletedEvent"),
                Some(bytes(&json!({ "user_id": UUID, "soft_delete": "no" }))),
                DecodeError::Invalid {
                    kind: "deleted",
                    field: "soft_delete",
                    expected: "a boolean",
                },
            ),
        ];
        for (header, payload, want) in cases {
            let got = decode(header, payload.as_deref());
            assert_eq!(got, Err(want.clone()));
            assert!(
                !want.to_string().contains("alice@"),
                "no payload values in reasons"
            );
        }
    }

    #[test]
    fn should_recognise_legacy_events_without_a_type_by_their_shape() {
        let deleted =
            json!({ "user_id": UUID, "deleted_at": "2024-01-01T00:00:00Z", "soft_delete": false });
        let updated = json!({ "user_id": UUID, "username": "alice", "display_name": "Alice",
            "avatar_url": null, "follower_count": 7, "updated_at": "2024-01-01T00:00:00Z" });
        let created = json!({ "user_id": UUID, "email": "a@example.org", "username": "alice",
            "created_at": "2024-01-01T00:00:00Z" });
        let cases = [
            (
                deleted,
                IdentityEvent::Deleted {
                    id: id(),
                    soft_delete: false,
                },
            ),
            (
                updated,
                IdentityEvent::ProfileUpdated {
                    id: id(),
                    username: Some("alice".into()),
                    display_name: Some("Alice".into()),
                    avatar_url: None,
                },
            ),
            (
                created,
                IdentityEvent::Created {
                    id: id(),
                    username: "alice".into(),
                },
            ),
        ];
        for (data, want) in cases {
            // In the envelope (data only, no type anywhere) and bare.
            for body in [envelope(None, data.clone()), data.clone()] {
                assert_eq!(
                    decode(None, Some(&bytes(&body))),
                    Ok(Decoded::LegacyShaped(want.clone())),
                    "{body}"
                );
            }
            // A type, when there is one, decides, and the event is not legacy-shaped.
            let spelling = match want {
                IdentityEvent::Created { .. } => "UserCreatedEvent",
                IdentityEvent::ProfileUpdated { .. } => "UserProfileUpdatedEvent",
                IdentityEvent::Deleted { .. } => "UserDeletedEvent",
            };
            let typed = decode(Some(spelling.as_bytes()), Some(&bytes(&data)));
            assert_eq!(typed, Ok(Decoded::Event(want.clone())));
            assert_eq!(typed.unwrap().event(), Some(&want));
        }
    }

    #[test]
    fn should_check_legacy_shapes_in_the_old_consumers_order_and_require_every_field() {
        // Deletion first: a deleted user's data may still carry its profile fields.
        let both = json!({ "user_id": UUID, "deleted_at": "x", "soft_delete": true,
            "username": "a", "updated_at": "x", "display_name": "A" });
        assert!(matches!(
            decode(None, Some(&bytes(&envelope(None, both)))),
            Ok(Decoded::LegacyShaped(IdentityEvent::Deleted { .. }))
        ));
        // A profile update also carrying created_at and email is still an update.
        let update = json!({ "user_id": UUID, "email": "a@x", "created_at": "x",
            "username": "a", "updated_at": "x", "display_name": null });
        assert!(matches!(
            decode(None, Some(&bytes(&update))),
            Ok(Decoded::LegacyShaped(IdentityEvent::ProfileUpdated { .. }))
        ));
        // One field short of every shape: no type, dead-lettered as before.
        for partial in [
            json!({ "user_id": UUID, "deleted_at": "x" }),
            json!({ "user_id": UUID, "soft_delete": true }),
            json!({ "user_id": UUID, "username": "a", "display_name": "A" }),
            json!({ "user_id": UUID, "username": "a", "updated_at": "x" }),
            json!({ "user_id": UUID, "email": "a@x", "username": "a" }),
            json!({ "email": "a@x", "username": "a", "created_at": "x" }),
        ] {
            assert_eq!(
                decode(None, Some(&bytes(&envelope(None, partial.clone())))),
                Err(DecodeError::NoType),
                "{partial}"
            );
        }
        // A deleted_at of null says the user is not deleted: a user's data carrying its
        // deletion columns is no deletion (soft_delete false would erase the profile).
        let not_deleted = json!({ "user_id": UUID, "deleted_at": null, "soft_delete": false,
            "username": "a", "updated_at": "x", "display_name": "A" });
        assert!(matches!(
            decode(None, Some(&bytes(&envelope(None, not_deleted)))),
            Ok(Decoded::LegacyShaped(IdentityEvent::ProfileUpdated { .. }))
        ));
        let columns_only = json!({ "user_id": UUID, "deleted_at": null, "soft_delete": false });
        assert_eq!(
            decode(None, Some(&bytes(&columns_only))),
            Err(DecodeError::NoType)
        );
        // A recognised shape still needs the fields roster uses.
        let bad_id = json!({ "user_id": "nope", "deleted_at": "x", "soft_delete": true });
        assert_eq!(
            decode(None, Some(&bytes(&bad_id))),
            Err(DecodeError::Invalid {
                kind: "deleted",
                field: "user_id",
                expected: "a UUID"
            })
        );
    }
}
