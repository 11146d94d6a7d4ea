//! Takes over the rooms the old agent-sync bot created: gives each its alias (as the agent,
//! who holds the highest power there) and records the mapping, creating nothing new.
//!
//! Run before the first `roster serve`: once the alias exists, provisioning finds the room
//! by it. The mappings come as the bot left them ([`parse_mappings`]): its
//! `agent_user_mappings.json` (an object keyed by agent id, or a list in early versions),
//! or an export of the later bots' PostgreSQL table `agent_mappings` (JSON or CSV with a
//! header). Passwords in them are never read into roster's types, never logged.

use std::path::Path;

use ruma::OwnedRoomId;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::matrix::MatrixError;
use crate::model::agents::RoomRecord;
use crate::reconcile::agents::read_joined;
use crate::state::{State, StateError};
use crate::store::Store;

/// One agent of the old bot's mappings: what adoption needs, nothing more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub agent_id: String,
    /// The user the bot made for the agent; must match roster's naming scheme.
    pub matrix_user_id: Option<String>,
    /// The agent's room; `None` when the bot never made one.
    pub room_id: Option<String>,
    /// When a later bot marked the agent removed (soft delete); such agents are skipped.
    pub removed_at: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("cannot read legacy mappings {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// From [`parse_mappings`], which knows no file name.
    #[error("{0}")]
    Format(String),
    #[error(
        "legacy mappings {path}: {reason}; expected the old bot's agent_user_mappings.json or an export of its agent_mappings table (see the README, \"Adopting from the old bot\")"
    )]
    Parse { path: String, reason: String },
    #[error(transparent)]
    Registration(#[from] crate::registration::RegistrationError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(
        "cannot record the adoption: {0}; nothing after this room was recorded, run adopt again"
    )]
    Record(#[from] StateError),
    #[error(
        "homeserver unavailable during adoption: {0}; nothing after this room was touched, run adopt again"
    )]
    Homeserver(MatrixError),
}

/// Reads the old bot's mappings in any of the shapes it leaves:
/// - `agent_user_mappings.json`: a JSON object keyed by agent id, each value with
///   `agent_id`, `matrix_user_id`, `room_id` and more (early versions: a JSON list of the
///   same objects);
/// - the `agent_mappings` table exported as JSON (a list of rows, `json_agg`) or as CSV with
///   a header row (`\copy ... CSV HEADER`, `psql --csv`).
///
/// Only `agent_id`, `matrix_user_id`, `room_id` and `removed_at` are read; other fields and
/// columns (the password among them) are skipped, not kept. Pure: no I/O.
pub fn parse_mappings(text: &str) -> Result<Vec<Mapping>, AdoptError> {
    let body = text.trim_start_matches('\u{feff}').trim_start();
    match body.chars().next() {
        None => Err(AdoptError::Format(
            "it is empty: nothing to adopt (an export of an empty table is `[]`)".into(),
        )),
        Some('{' | '[') => serde_json::from_str::<Mappings>(body)
            .map(|m| m.0)
            .map_err(|e| AdoptError::Format(format!("not the old bot's JSON: {e}"))),
        Some(_) => {
            parse_csv(body).map_err(|e| AdoptError::Format(format!("not a CSV export: {e}")))
        }
    }
}

/// The fields of one JSON entry that adoption reads; serde skips every other one.
#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    agent_id: Option<String>,
    #[serde(default)]
    matrix_user_id: Option<String>,
    #[serde(default)]
    room_id: Option<String>,
    #[serde(default)]
    removed_at: Option<String>,
}

impl Entry {
    fn into_mapping(self, agent_id: String) -> Mapping {
        Mapping {
            agent_id,
            matrix_user_id: non_empty(self.matrix_user_id),
            room_id: non_empty(self.room_id),
            removed_at: non_empty(self.removed_at),
        }
    }
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

/// An object keyed by agent id, or a list: read entry by entry, never buffered whole.
struct Mappings(Vec<Mapping>);

impl<'de> Deserialize<'de> for Mappings {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(MappingsVisitor)
    }
}

struct MappingsVisitor;

impl<'de> Visitor<'de> for MappingsVisitor {
    type Value = Mappings;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object keyed by agent id, or a list of mappings with agent_id")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Mappings, A::Error> {
        let mut mappings = Vec::new();
        while let Some(entry) = seq.next_element::<Entry>()? {
            let Some(agent_id) = non_empty(entry.agent_id.clone()) else {
                return Err(de::Error::custom(format!(
                    "entry {} of the list has no agent_id",
                    mappings.len() + 1
                )));
            };
            mappings.push(entry.into_mapping(agent_id));
        }
        Ok(Mappings(mappings))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Mappings, A::Error> {
        let mut mappings = Vec::new();
        while let Some((key, entry)) = map.next_entry::<String, Entry>()? {
            if let Some(id) = non_empty(entry.agent_id.clone())
                && id != key
            {
                return Err(de::Error::custom(format!(
                    "the entry under {key:?} has agent_id {id:?}; the key is the agent id"
                )));
            }
            mappings.push(entry.into_mapping(key));
        }
        Ok(Mappings(mappings))
    }
}

/// A CSV export with a header row (RFC 4180 as PostgreSQL writes it: `"` quotes, `""`
/// inside quotes, an unquoted empty field for NULL). Columns other than the four adoption
/// reads are scanned past without being kept.
fn parse_csv(text: &str) -> Result<Vec<Mapping>, String> {
    let mut reader = CsvReader {
        chars: text.chars().peekable(),
        line: 1,
    };
    let (_, header) = reader.record(&|_| true)?.ok_or("it has no header row")?;
    let names: Vec<String> = header.into_iter().map(|h| h.unwrap_or_default()).collect();
    let column = |name: &str| names.iter().position(|n| n.trim() == name);
    let missing = |name: &str| {
        format!(
            "the header has no {name} column (it has: {}); export agent_id, matrix_user_id, room_id and removed_at",
            names.join(",")
        )
    };
    let agent = column("agent_id").ok_or_else(|| missing("agent_id"))?;
    let room = column("room_id").ok_or_else(|| missing("room_id"))?;
    let user = column("matrix_user_id");
    let removed = column("removed_at");
    let wanted = [Some(agent), Some(room), user, removed];
    let keep = |i: usize| wanted.contains(&Some(i));
    let mut mappings = Vec::new();
    while let Some((line, mut fields)) = reader.record(&keep)? {
        if fields.len() != names.len() {
            return Err(format!(
                "line {line} has {} fields, the header {}",
                fields.len(),
                names.len()
            ));
        }
        let mut take = |i: Option<usize>| non_empty(i.and_then(|i| fields[i].take()));
        let Some(agent_id) = take(Some(agent)) else {
            return Err(format!("line {line} has no agent_id"));
        };
        mappings.push(Mapping {
            agent_id,
            matrix_user_id: take(user),
            room_id: take(Some(room)),
            removed_at: take(removed),
        });
    }
    Ok(mappings)
}

struct CsvReader<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    /// The line the reader is on, for error messages.
    line: usize,
}

impl CsvReader<'_> {
    /// The next record's line and fields (`None` for the columns `keep` refuses), or `None`
    /// at the end.
    fn record(&mut self, keep: &dyn Fn(usize) -> bool) -> Result<Option<Record>, String> {
        // Blank lines hold no record.
        loop {
            match self.chars.peek() {
                None => return Ok(None),
                Some('\n') => {
                    self.chars.next();
                    self.line += 1;
                }
                Some('\r') => {
                    self.chars.next();
                    if self.chars.next_if_eq(&'\n').is_none() {
                        return Err(format!(
                            "line {}: a carriage return without a line feed",
                            self.line
                        ));
                    }
                    self.line += 1;
                }
                Some(_) => break,
            }
        }
        let line = self.line;
        let mut fields = Vec::new();
        loop {
            let kept = keep(fields.len());
            let mut value = String::new();
            let mut push = |c: char| {
                if kept {
                    value.push(c)
                }
            };
            if self.chars.peek() == Some(&'"') {
                self.chars.next();
                let opened = self.line;
                loop {
                    match self.chars.next() {
                        None => {
                            return Err(format!(
                                "the quoted field opened on line {opened} never closes"
                            ));
                        }
                        Some('"') if self.chars.peek() == Some(&'"') => {
                            self.chars.next();
                            push('"');
                        }
                        Some('"') => break,
                        Some(c) => {
                            if c == '\n' {
                                self.line += 1;
                            }
                            push(c);
                        }
                    }
                }
                if !matches!(self.chars.peek(), None | Some(',' | '\n' | '\r')) {
                    return Err(format!("line {}: text after a closing quote", self.line));
                }
            } else {
                while let Some(&c) = self.chars.peek() {
                    if matches!(c, ',' | '\n' | '\r') {
                        break;
                    }
                    self.chars.next();
                    push(c);
                }
            }
            fields.push(kept.then_some(value));
            match self.chars.next() {
                Some(',') => continue,
                Some('\r') => {
                    if self.chars.next_if_eq(&'\n').is_none() {
                        return Err(format!(
                            "line {}: a carriage return without a line feed",
                            self.line
                        ));
                    }
                    self.line += 1;
                    break;
                }
                Some('\n') => {
                    self.line += 1;
                    break;
                }
                None => break,
                Some(_) => unreachable!("a field ends at a comma, a line end or the end"),
            }
        }
        Ok(Some((line, fields)))
    }
}

/// A CSV record: the line it starts on, and its fields.
type Record = (usize, Vec<Option<String>>);

#[derive(Debug, Default, Serialize)]
pub struct AdoptionReport {
    /// Agent ids whose rooms now carry their alias and are recorded.
    pub adopted: Vec<String>,
    /// Rooms that no longer exist (or the agent is not in): `agent_id room_id`.
    pub missing_rooms: Vec<String>,
    /// Mappings roster would not take over, with why.
    pub conflicts: Vec<String>,
    /// Mappings left alone on purpose: removed by the bot, or without a room.
    pub skipped: Vec<String>,
}

/// Adopts every mapping in `path` using the registration and store of `config`.
pub async fn adopt(config: &Config, path: &Path) -> Result<AdoptionReport, AdoptError> {
    let text = std::fs::read_to_string(path).map_err(|source| AdoptError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mappings = parse_mappings(&text).map_err(|e| match e {
        AdoptError::Format(reason) => AdoptError::Parse {
            path: path.display().to_string(),
            reason,
        },
        other => other,
    })?;
    let (hs, _) = super::homeserver(config)?;
    let state = State::open(Store::open(&config.store.path)?, config.ids().clone())?;
    let ids = config.ids();
    let mut report = AdoptionReport::default();
    for mapping in mappings {
        if let Some(removed_at) = &mapping.removed_at {
            report.skipped.push(format!(
                "{}: removed by the old bot at {removed_at}",
                mapping.agent_id
            ));
            continue;
        }
        let Some(room_id) = mapping.room_id.as_deref() else {
            report.skipped.push(format!(
                "{}: the old bot recorded no room",
                mapping.agent_id
            ));
            continue;
        };
        let localpart = match ids.agent_localpart(&mapping.agent_id) {
            Ok(localpart) => localpart,
            Err(error) => {
                report
                    .conflicts
                    .push(format!("{}: {error}", mapping.agent_id));
                continue;
            }
        };
        let agent_user = ids.agent_user(&localpart);
        if let Some(old) = &mapping.matrix_user_id
            && old != agent_user.as_str()
        {
            report.conflicts.push(format!(
                "{}: mapped to {old}, but roster's scheme gives {agent_user}",
                mapping.agent_id
            ));
            continue;
        }
        let Ok(room) = OwnedRoomId::try_from(room_id) else {
            report.conflicts.push(format!(
                "{}: {room_id:?} is not a room id",
                mapping.agent_id
            ));
            continue;
        };
        // The old bot registered the user with a password; M_USER_IN_USE is expected.
        hs.register(&localpart)
            .await
            .map_err(AdoptError::Homeserver)?;
        let asked_at = state.read(|m| m.last_seq());
        let joined = match read_joined(&hs, &room, &agent_user, &ids.bot).await {
            Ok(joined) => joined,
            Err(e) if e.is_forbidden() || e.is_not_found() => {
                report
                    .missing_rooms
                    .push(format!("{} {room}", mapping.agent_id));
                continue;
            }
            Err(e) => return Err(AdoptError::Homeserver(e)),
        };
        let alias = ids.agent_alias(&localpart);
        match hs
            .resolve_alias(&alias)
            .await
            .map_err(AdoptError::Homeserver)?
        {
            Some(existing) if existing == room => {}
            Some(existing) => {
                report.conflicts.push(format!(
                    "{}: {alias} already points to {existing}, not {room}",
                    mapping.agent_id
                ));
                continue;
            }
            None => hs
                .create_alias(&agent_user, &alias, &room)
                .await
                .map_err(AdoptError::Homeserver)?,
        }
        state.record_read(room.clone(), joined, asked_at).await?;
        state
            .save_agent(RoomRecord {
                agent_id: mapping.agent_id.clone(),
                localpart,
                room_id: Some(room.clone()),
                ..RoomRecord::default()
            })
            .await?;
        tracing::info!(agent = %mapping.agent_id, %room, %alias, "adopted legacy room");
        report.adopted.push(mapping.agent_id);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OBJECT: &str = include_str!("../../tests/fixtures/legacy/agent_user_mappings.json");
    const LIST: &str = include_str!("../../tests/fixtures/legacy/agent_user_mappings.list.json");
    const CSV: &str = include_str!("../../tests/fixtures/legacy/agent_mappings.csv");
    const CSV_ALL: &str =
        include_str!("../../tests/fixtures/legacy/agent_mappings.all-columns.csv");
    const PG_JSON: &str = include_str!("../../tests/fixtures/legacy/agent_mappings.json");

    fn parse(text: &str) -> Vec<Mapping> {
        parse_mappings(text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn error(text: &str) -> String {
        match parse_mappings(text) {
            Ok(m) => panic!("{text:?} parsed as {m:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn ids(mappings: &[Mapping]) -> Vec<&str> {
        mappings.iter().map(|m| m.agent_id.as_str()).collect()
    }

    #[test]
    fn should_read_the_bots_object_keyed_by_agent_id() {
        let mappings = parse(OBJECT);
        assert_eq!(mappings.len(), 4);
        assert_eq!(
            mappings[0],
            Mapping {
                agent_id: "agent-1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c01".into(),
                matrix_user_id: Some(
                    "@agent_1a2b3c4d_5e6f_4a7b_8c9d_0e1f2a3b4c01:roster.test".into()
                ),
                room_id: Some("!objLiveRoom00001:roster.test".into()),
                removed_at: None,
            }
        );
        assert_eq!(mappings[1].room_id, None, "room_id: null");
        assert_eq!(
            mappings[2].matrix_user_id.as_deref(),
            Some("@bmo:roster.test")
        );
    }

    #[test]
    fn should_take_the_key_when_an_entry_has_no_agent_id_and_refuse_a_disagreeing_one() {
        let mappings = parse(r#"{"agent-a": {"room_id": "!r:x"}}"#);
        assert_eq!(ids(&mappings), ["agent-a"]);
        let e = error(r#"{"agent-a": {"agent_id": "agent-b", "room_id": "!r:x"}}"#);
        assert!(
            e.contains(r#"the entry under "agent-a" has agent_id "agent-b""#),
            "{e}"
        );
    }

    #[test]
    fn should_read_the_early_list() {
        let mappings = parse(LIST);
        assert_eq!(
            ids(&mappings),
            [
                "agent-5e6f7a8b-9c0d-4e1f-8a3b-4c5d6e7f8a05",
                "agent-6f7a8b9c-0d1e-4f2a-9b4c-5d6e7f8a9b06"
            ]
        );
        let e = error(r#"[{"room_id": "!r:x"}]"#);
        assert!(e.contains("entry 1 of the list has no agent_id"), "{e}");
    }

    #[test]
    fn should_read_postgres_exports_as_csv_and_json() {
        for csv in [CSV, CSV_ALL] {
            let mappings = parse(csv);
            assert_eq!(mappings.len(), 3);
            assert_eq!(
                mappings[0].room_id.as_deref(),
                Some("!pgCsvLiveRoom0001:roster.test")
            );
            assert_eq!(mappings[0].removed_at, None, "NULL is an empty field");
            assert_eq!(
                mappings[1].removed_at.as_deref(),
                Some("2026-11-20 08:15:00.123456")
            );
            assert_eq!(mappings[2].room_id, None);
            assert_eq!(
                mappings[2].matrix_user_id.as_deref(),
                Some("@agent_9c8b7a6d_5e4f_4a3b_9c2d_1e0f9a8b7c03:roster.test")
            );
        }
        let mappings = parse(PG_JSON);
        assert_eq!(mappings.len(), 2);
        assert_eq!(mappings[0].removed_at, None);
        assert_eq!(
            mappings[1].removed_at.as_deref(),
            Some("2026-11-20T07:00:00")
        );
    }

    #[test]
    fn should_never_keep_a_password() {
        for text in [OBJECT, LIST, CSV_ALL] {
            let kept = format!("{:?}", parse(text));
            assert!(!kept.contains("secret"), "{kept}");
        }
        assert!(OBJECT.contains("file-secret") && CSV_ALL.contains("pg-secret"));
    }

    #[test]
    fn should_read_quoted_csv_fields_line_ends_and_a_byte_order_mark() {
        let text = "\u{feff}name,agent_id,room_id\r\n\"a, \"\"b\"\"\nc\",agent-x,\"!r:x\"\r\n\r\n";
        let mappings = parse(text);
        assert_eq!(ids(&mappings), ["agent-x"]);
        assert_eq!(mappings[0].room_id.as_deref(), Some("!r:x"));
    }

    #[test]
    fn should_refuse_what_is_not_a_mapping_export_and_say_why() {
        for (text, says) in [
            ("", "it is empty"),
            ("  \n", "it is empty"),
            ("{", "not the old bot's JSON"),
            ("42", "no agent_id column"),
            (r#"{"agent-a": 5}"#, "not the old bot's JSON"),
            (r#"[{"agent_id": 5}]"#, "invalid type"),
            ("agent_id | room_id\n----\n", "no agent_id column"),
            ("agent_id,matrix_user_id\na,b\n", "no room_id column"),
            ("agent_id,room_id\na\n", "line 2 has 1 fields, the header 2"),
            (
                "agent_id,room_id\n\na,b\nc\n",
                "line 4 has 1 fields, the header 2",
            ),
            ("agent_id,room_id\n,!r:x\n", "line 2 has no agent_id"),
            ("agent_id,room_id\n\"a,!r:x\n", "never closes"),
            (
                "agent_id,room_id\n\"a\"b,!r:x\n",
                "text after a closing quote",
            ),
            ("agent_id,room_id\ra,b", "carriage return"),
        ] {
            let e = error(text);
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    proptest::proptest! {
        /// Whatever the file holds, an answer and never a panic (the fuzz target's property).
        #[test]
        fn should_answer_anything_without_panicking(
            text in "(agent_id|room_id|matrix_user_id|removed_at|[a-z!:@\\-]{0,6}|,|\"|\"\"|\r|\n|\\{|\\[|\\]|\\}|:| ){0,40}",
            noise in ".{0,40}",
        ) {
            let _ = parse_mappings(&text);
            let _ = parse_mappings(&noise);
            let _ = parse_mappings(&format!("{text}{noise}"));
        }
    }

    #[test]
    fn should_accept_an_empty_export() {
        assert!(parse("[]").is_empty());
        assert!(parse("{}").is_empty());
        assert!(parse("agent_id,room_id\n").is_empty());
    }
}
