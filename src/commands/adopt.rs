//! Takes over the rooms the old agent-sync bot created: gives each its alias (as the agent,
//! who holds the highest power there) and records the mapping, creating nothing new.
//!
//! Run before the first `roster serve`: once the alias exists, provisioning finds the room
//! by it. Passwords in the mapping file are never read into roster's types, never logged.

use std::path::Path;

use ruma::OwnedRoomId;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::matrix::MatrixError;
use crate::model::agents::RoomRecord;
use crate::reconcile::agents::read_joined;
use crate::state::{State, StateError};
use crate::store::Store;

/// One entry of the old bot's `agent_user_mappings.json`; other fields are ignored.
#[derive(Debug, Deserialize)]
struct LegacyMapping {
    agent_id: String,
    #[serde(default)]
    matrix_user_id: Option<String>,
    room_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("cannot read legacy mappings {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "legacy mappings {path} is not a JSON list of mappings with agent_id and room_id: {source}"
    )]
    Parse {
        path: String,
        source: serde_json::Error,
    },
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

#[derive(Debug, Default, Serialize)]
pub struct AdoptionReport {
    /// Agent ids whose rooms now carry their alias and are recorded.
    pub adopted: Vec<String>,
    /// Rooms that no longer exist (or the agent is not in): `agent_id room_id`.
    pub missing_rooms: Vec<String>,
    /// Mappings roster would not take over, with why.
    pub conflicts: Vec<String>,
}

/// Adopts every mapping in `path` using the registration and store of `config`.
pub async fn adopt(config: &Config, path: &Path) -> Result<AdoptionReport, AdoptError> {
    let text = std::fs::read_to_string(path).map_err(|source| AdoptError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mappings: Vec<LegacyMapping> =
        serde_json::from_str(&text).map_err(|source| AdoptError::Parse {
            path: path.display().to_string(),
            source,
        })?;
    let (hs, _) = super::homeserver(config)?;
    let state = State::open(Store::open(&config.store.path)?, config.ids().clone())?;
    let ids = config.ids();
    let mut report = AdoptionReport::default();
    for mapping in mappings {
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
        let Ok(room) = OwnedRoomId::try_from(mapping.room_id.as_str()) else {
            report.conflicts.push(format!(
                "{}: {:?} is not a room id",
                mapping.agent_id, mapping.room_id
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
