//! Desired agents: who should have a Matrix user and room, and under which names.
//!
//! Pure: sources produce listings, this module turns them into desired state.

use serde::{Deserialize, Serialize};

/// One agent as a source lists it. `id` is the key: names are not unique.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Agent {
    pub id: String,
    pub name: String,
}

/// The localpart of an agent's user and alias: `agent_<x>`, where `<x>` is the id without a
/// leading `agent-`, lower-cased, `-` replaced by `_`, anything outside `[a-z0-9_]` dropped.
///
/// This is the old bot's scheme, so the users it created are taken over as they are.
/// `None` when nothing is left of the id.
pub fn agent_localpart(agent_id: &str) -> Option<String> {
    let trimmed = agent_id.strip_prefix("agent-").unwrap_or(agent_id);
    let x: String = trimmed
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c == '-' { '_' } else { c })
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
        .collect();
    (!x.is_empty()).then(|| format!("agent_{x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_map_agent_ids_like_the_old_bot() {
        assert_eq!(
            agent_localpart("agent-1b2c-3d").as_deref(),
            Some("agent_1b2c_3d")
        );
        assert_eq!(
            agent_localpart("agent-6F1B2C3D-aaaa-4bbb-8ccc-0123456789ab").as_deref(),
            Some("agent_6f1b2c3d_aaaa_4bbb_8ccc_0123456789ab")
        );
        assert_eq!(
            agent_localpart("Helper Bot!").as_deref(),
            Some("agent_helperbot")
        );
        assert_eq!(agent_localpart("agent-").as_deref(), None);
        assert_eq!(agent_localpart("!!!"), None);
    }
}
