//! Names every user, alias and namespace roster deals in: one place for each naming rule.
//!
//! Invariants: depends on no other roster module; every id built here is valid by
//! construction (the `expect`s below hold because localparts are checked where they enter).

use std::fmt;

use ruma::{OwnedRoomAliasId, OwnedServerName, OwnedUserId, RoomAliasId, ServerName, UserId};

/// Localpart prefix of agent users and agent room aliases: `@agent_<x>`, `#agent_<x>`.
pub const AGENT_PREFIX: &str = "agent_";
/// Localpart prefix of identity users: `@nova-<uuid>`.
pub const IDENTITY_PREFIX: &str = "nova-";

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
    (!x.is_empty()).then(|| format!("{AGENT_PREFIX}{x}"))
}

/// Whether `localpart` fits the spec's grammar for new user ids (ruma also accepts the
/// historical, wider one).
pub fn is_user_localpart(localpart: &str) -> bool {
    !localpart.is_empty()
        && localpart
            .chars()
            .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '=' | '-' | '/' | '+'))
}

/// Whether `localpart` is usable as the alias of the agents space: lower-case, outside the
/// agent alias namespace.
pub fn is_space_alias_localpart(localpart: &str) -> bool {
    !localpart.is_empty()
        && !localpart.starts_with(AGENT_PREFIX)
        && localpart
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._=-".contains(c))
}

/// Escapes regex metacharacters (POSIX ERE and the Rust/Python dialects homeservers use).
pub fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    for c in text.chars() {
        if "\\.^$|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// An identity's id: a UUID, lower-cased, dashes kept.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityId(String);

impl IdentityId {
    /// Accepts the canonical 8-4-4-4-12 hex form in either case; `None` otherwise.
    pub fn parse(text: &str) -> Option<IdentityId> {
        let groups: Vec<&str> = text.split('-').collect();
        let lengths_ok = groups.len() == 5
            && groups
                .iter()
                .zip([8, 4, 4, 4, 12])
                .all(|(g, len)| g.len() == len && g.chars().all(|c| c.is_ascii_hexdigit()));
        lengths_ok.then(|| IdentityId(text.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `@nova-<uuid>:<server>`.
    pub fn user_id(&self, server: &ServerName) -> OwnedUserId {
        UserId::parse_with_server_name(format!("{IDENTITY_PREFIX}{}", self.0), server)
            .expect("nova- and a lower-case UUID form a valid localpart")
    }
}

impl fmt::Display for IdentityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which part of the identities is wrong; the config names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdsError {
    #[error("{0:?} is not a server name; expected e.g. example.org")]
    ServerName(String),
    #[error("{0:?} is not a valid user localpart; expected lower-case letters, digits and ._=-/+")]
    BotLocalpart(String),
    #[error("{given:?} is not a full user id; expected e.g. @admin:{server}")]
    RequiredMember { given: String, server: String },
    #[error(
        "{0:?} is not usable; expected an alias localpart like letta-agents, outside the agent_ namespace"
    )]
    SpaceAlias(String),
}

/// The server name, the bot, the required members and the space alias as typed ids, derived
/// once from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identities {
    pub server_name: OwnedServerName,
    pub bot: OwnedUserId,
    /// The bot first, then the configured required members, without repeats.
    pub required_members: Vec<OwnedUserId>,
    pub space_alias: OwnedRoomAliasId,
}

impl Identities {
    /// Checks and types the configured names; `required` defaults to `@admin:<server>`.
    pub fn new(
        server_name: &str,
        bot_localpart: &str,
        required: Option<&[String]>,
        space_alias_localpart: &str,
    ) -> Result<Identities, IdsError> {
        let server_name = OwnedServerName::try_from(server_name)
            .map_err(|_| IdsError::ServerName(server_name.to_owned()))?;
        let bot = UserId::parse_with_server_name(bot_localpart, &server_name)
            .ok()
            .filter(|_| is_user_localpart(bot_localpart))
            .ok_or_else(|| IdsError::BotLocalpart(bot_localpart.to_owned()))?;
        let mut required_members = vec![bot.clone()];
        let default = [format!("@admin:{server_name}")];
        for raw in required.unwrap_or(&default) {
            let user = UserId::parse(raw.as_str()).map_err(|_| IdsError::RequiredMember {
                given: raw.clone(),
                server: server_name.to_string(),
            })?;
            if !required_members.contains(&user) {
                required_members.push(user);
            }
        }
        if !is_space_alias_localpart(space_alias_localpart) {
            return Err(IdsError::SpaceAlias(space_alias_localpart.to_owned()));
        }
        let space_alias = alias(space_alias_localpart, &server_name);
        Ok(Identities {
            server_name,
            bot,
            required_members,
            space_alias,
        })
    }

    /// `@agent_<x>:<server>` for an agent localpart from [`agent_localpart`].
    pub fn agent_user(&self, localpart: &str) -> OwnedUserId {
        UserId::parse_with_server_name(localpart, &self.server_name)
            .expect("agent localparts are valid user localparts")
    }

    /// `#agent_<x>:<server>` for an agent localpart from [`agent_localpart`].
    pub fn agent_alias(&self, localpart: &str) -> OwnedRoomAliasId {
        alias(localpart, &self.server_name)
    }

    /// Whether `user` is one of roster's own: the bot or an agent user on this server.
    pub fn owns(&self, user: &UserId) -> bool {
        user.server_name() == self.server_name
            && (user == self.bot || user.localpart().starts_with(AGENT_PREFIX))
    }

    /// Whether roster may act as `user` by masquerading: its own users, identity users and
    /// the required members on this server (the registrations' namespaces).
    pub fn can_act_as(&self, user: &UserId) -> bool {
        user.server_name() == self.server_name
            && (self.owns(user)
                || user.localpart().starts_with(IDENTITY_PREFIX)
                || self.required_members.iter().any(|m| m == user))
    }

    /// Required members on this server other than the bot: people's accounts roster acts
    /// as but does not own.
    pub fn acting_members(&self) -> impl Iterator<Item = &OwnedUserId> {
        self.required_members
            .iter()
            .skip(1)
            .filter(|m| m.server_name() == self.server_name)
    }
}

fn alias(localpart: &str, server: &ServerName) -> OwnedRoomAliasId {
    RoomAliasId::parse(format!("#{localpart}:{server}"))
        .expect("checked localparts form valid aliases")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::owned_user_id;

    fn ids() -> Identities {
        Identities::new(
            "ex.org",
            "letta",
            Some(&["@admin:ex.org".into(), "@ops:other.org".into()]),
            "letta-agents",
        )
        .unwrap()
    }

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

    #[test]
    fn should_accept_only_uuids_and_lower_case_them() {
        let upper = IdentityId::parse("6F1B2C3D-AAAA-4BBB-8CCC-0123456789AB").unwrap();
        assert_eq!(upper.as_str(), "6f1b2c3d-aaaa-4bbb-8ccc-0123456789ab");
        assert_eq!(
            upper.user_id(ruma::server_name!("example.org")),
            "@nova-6f1b2c3d-aaaa-4bbb-8ccc-0123456789ab:example.org"
        );
        for bad in [
            "",
            "42",
            "6f1b2c3d-aaaa-4bbb-8ccc",
            "6f1b2c3d-aaaa-4bbb-8ccc-0123456789ag",
            "6f1b2c3daaaa4bbb8ccc0123456789ab",
            "6f1b2c3d-aaaa-4bbb-8ccc-0123456789ab-",
            "../../admin",
        ] {
            assert_eq!(IdentityId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn should_derive_identities_with_the_bot_first_and_admin_by_default() {
        let ids = Identities::new("example.org", "letta", None, "letta-agents").unwrap();
        assert_eq!(ids.bot, "@letta:example.org");
        assert_eq!(
            ids.required_members,
            vec!["@letta:example.org", "@admin:example.org"]
        );
        assert_eq!(ids.space_alias, "#letta-agents:example.org");
        assert_eq!(ids.agent_user("agent_1"), "@agent_1:example.org");
        assert_eq!(ids.agent_alias("agent_1"), "#agent_1:example.org");
    }

    #[test]
    fn should_name_what_is_wrong_with_identities() {
        assert!(matches!(
            Identities::new("not a name!", "letta", None, "s"),
            Err(IdsError::ServerName(_))
        ));
        assert!(matches!(
            Identities::new("ex.org", "Letta Bot", None, "s"),
            Err(IdsError::BotLocalpart(_))
        ));
        assert!(matches!(
            Identities::new("ex.org", "letta", Some(&["admin".into()]), "s"),
            Err(IdsError::RequiredMember { .. })
        ));
        for bad in ["", "agent_space", "Spaces", "a b"] {
            assert!(
                matches!(
                    Identities::new("ex.org", "letta", None, bad),
                    Err(IdsError::SpaceAlias(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn should_act_only_as_users_in_its_namespaces() {
        let ids = ids();
        for user in [
            owned_user_id!("@letta:ex.org"),
            owned_user_id!("@agent_x:ex.org"),
            owned_user_id!("@nova-1:ex.org"),
            owned_user_id!("@admin:ex.org"),
        ] {
            assert!(ids.can_act_as(&user), "{user}");
        }
        for user in [
            owned_user_id!("@ops:other.org"),
            owned_user_id!("@agent_x:other.org"),
            owned_user_id!("@eve:ex.org"),
        ] {
            assert!(!ids.can_act_as(&user), "{user}");
        }
        assert!(ids.owns(&owned_user_id!("@agent_x:ex.org")));
        assert!(!ids.owns(&owned_user_id!("@admin:ex.org")));
        let acting: Vec<_> = ids.acting_members().collect();
        assert_eq!(acting, vec!["@admin:ex.org"]);
    }

    #[test]
    fn should_escape_regex_metacharacters() {
        assert_eq!(regex_escape("my.example.org"), r"my\.example\.org");
        assert_eq!(regex_escape("a+b(c)"), r"a\+b\(c\)");
    }
}
