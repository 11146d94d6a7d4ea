//! Names every user, alias and namespace roster deals in: one place for each naming rule.
//!
//! Invariants: depends on no other roster module; every id built here is valid by
//! construction (the `expect`s below hold because localparts are checked where they enter).

use std::borrow::Cow;
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

/// The longest display name a homeserver takes, in characters (Synapse's
/// `MAX_DISPLAYNAME_LEN`); an agent's name is its user's display name and its room's name.
pub const MAX_NAME_CHARS: usize = 256;

/// The display name roster sets for `name` (an agent's name from its source, a person's
/// from an identity event): without control characters, and cut to [`MAX_NAME_CHARS`]
/// (ending in `…`) when longer, so the homeserver never refuses it. U+0000 is dropped (a
/// Synapse on PostgreSQL cannot store it and answers 500, again at every retry); the other
/// control characters (line breaks, tabs) become spaces.
pub fn display_name(name: &str) -> Cow<'_, str> {
    let name: Cow<'_, str> = if name.chars().any(char::is_control) {
        Cow::Owned(
            name.chars()
                .filter(|&c| c != '\0')
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect(),
        )
    } else {
        Cow::Borrowed(name)
    };
    match name.char_indices().nth(MAX_NAME_CHARS) {
        None => name,
        Some(_) => {
            let (cut, _) = name
                .char_indices()
                .nth(MAX_NAME_CHARS - 1)
                .expect("the name is longer than that");
            Cow::Owned(format!("{}…", &name[..cut]))
        }
    }
}

/// The longest user id, room alias or room id Matrix allows, in bytes (sigil and server
/// included).
pub const MAX_ID_BYTES: usize = 255;

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
    #[error(
        "{id} would be {} bytes, over the {MAX_ID_BYTES} Matrix allows; shorten {what} or the server name",
        id.len()
    )]
    TooLong { what: IdPart, id: String },
}

/// Which configured name makes an id too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdPart {
    BotLocalpart,
    SpaceAlias,
}

impl fmt::Display for IdPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdPart::BotLocalpart => "the bot localpart",
            IdPart::SpaceAlias => "the space alias",
        })
    }
}

/// Why an agent has no user or room here; the agent is left out, never provisioned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentIdError {
    #[error("agent id {0:?} has no letter, digit or '_' to make a Matrix user from")]
    NoLocalpart(String),
    #[error(
        "agent id {agent_id:?} makes the user id {user_id}, {} bytes, over the {MAX_ID_BYTES} Matrix allows",
        user_id.len()
    )]
    TooLong { agent_id: String, user_id: String },
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
        let too_long =
            |what, id: String| (id.len() > MAX_ID_BYTES).then_some(IdsError::TooLong { what, id });
        if let Some(error) = too_long(
            IdPart::BotLocalpart,
            format!("@{bot_localpart}:{server_name}"),
        ) {
            return Err(error);
        }
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
        if let Some(error) = too_long(
            IdPart::SpaceAlias,
            format!("#{space_alias_localpart}:{server_name}"),
        ) {
            return Err(error);
        }
        let space_alias = alias(space_alias_localpart, &server_name);
        Ok(Identities {
            server_name,
            bot,
            required_members,
            space_alias,
        })
    }

    /// The localpart of the agent's user and room alias here ([`agent_localpart`]), or why
    /// the agent cannot have them: every agent enters roster through this check.
    pub fn agent_localpart(&self, agent_id: &str) -> Result<String, AgentIdError> {
        let localpart = agent_localpart(agent_id)
            .ok_or_else(|| AgentIdError::NoLocalpart(agent_id.to_owned()))?;
        if !self.fits_agent_localpart(&localpart) {
            return Err(AgentIdError::TooLong {
                agent_id: agent_id.to_owned(),
                user_id: format!("@{localpart}:{}", self.server_name),
            });
        }
        Ok(localpart)
    }

    /// Whether `localpart` (e.g. from a stored record) makes a valid agent user and alias
    /// here: the grammar, and at most [`MAX_ID_BYTES`] with the sigil and server name.
    pub fn fits_agent_localpart(&self, localpart: &str) -> bool {
        // `@` and `#` are one byte each: the user id and the alias are the same length.
        let id_len = 2 + localpart.len() + self.server_name.as_str().len();
        is_user_localpart(localpart) && id_len <= MAX_ID_BYTES
    }

    /// `@agent_<x>:<server>` for a localpart from [`Identities::agent_localpart`].
    pub fn agent_user(&self, localpart: &str) -> OwnedUserId {
        UserId::parse_with_server_name(localpart, &self.server_name)
            .expect("Identities::agent_localpart checked the localpart and the length")
    }

    /// `#agent_<x>:<server>` for a localpart from [`Identities::agent_localpart`].
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
    fn should_cut_display_names_to_what_a_homeserver_takes() {
        assert_eq!(display_name("Helper"), "Helper");
        let longest = "é".repeat(MAX_NAME_CHARS);
        assert_eq!(display_name(&longest), longest.as_str());
        let cut = display_name(&"é".repeat(MAX_NAME_CHARS + 1)).into_owned();
        assert_eq!(cut.chars().count(), MAX_NAME_CHARS);
        assert_eq!(cut, format!("{}…", "é".repeat(MAX_NAME_CHARS - 1)));
        assert_eq!(
            display_name(&cut),
            cut.as_str(),
            "a cut name stays as it is"
        );
    }

    /// Agent names come from Letta as typed: a NUL would make a Synapse on PostgreSQL answer
    /// 500 at every attempt, the room never provisioned. Line breaks are not part of a name.
    #[test]
    fn should_set_names_without_control_characters() {
        assert_eq!(display_name("Al\u{0}ice\nB.\tC"), "Alice B. C");
        assert_eq!(display_name("\u{0}"), "");
        // The cut counts what is left.
        let long = format!("{}{}", "\u{0}".repeat(10), "a".repeat(MAX_NAME_CHARS));
        assert_eq!(display_name(&long), "a".repeat(MAX_NAME_CHARS));
        assert!(matches!(display_name("Helper"), Cow::Borrowed(_)));
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

    /// Matrix ids are at most 255 bytes: a configuration that would build a longer one is
    /// refused, naming the part to shorten, instead of panicking.
    #[test]
    fn should_refuse_a_space_alias_or_bot_that_makes_an_id_over_255_bytes() {
        let server = format!("{}.org", "s".repeat(200));
        let long = "l".repeat(60);
        let error = Identities::new(&server, "letta", None, &long).unwrap_err();
        assert!(
            matches!(&error, IdsError::TooLong { what: IdPart::SpaceAlias, id } if id.len() == 266),
            "{error:?}"
        );
        assert!(error.to_string().contains("the space alias"), "{error}");
        let error = Identities::new(&server, &long, None, "s").unwrap_err();
        assert!(
            matches!(
                error,
                IdsError::TooLong {
                    what: IdPart::BotLocalpart,
                    ..
                }
            ),
            "{error:?}"
        );
        let fits = "l".repeat(255 - 2 - server.len());
        let ids = Identities::new(&server, &fits, Some(&[]), &fits).unwrap();
        assert_eq!(ids.space_alias.as_str().len(), 255);
        assert_eq!(ids.bot.as_str().len(), 255);
    }

    /// An agent whose id would make a user id over 255 bytes is refused with the reason;
    /// one that fits gets its user and alias.
    #[test]
    fn should_refuse_an_agent_whose_user_id_would_pass_255_bytes() {
        let ids = Identities::new("ex.org", "letta", None, "letta-agents").unwrap();
        // "@agent_" + x + ":ex.org" is 14 bytes around x.
        let fits = format!("agent-{}", "a".repeat(255 - 14));
        let localpart = ids.agent_localpart(&fits).unwrap();
        assert_eq!(ids.agent_user(&localpart).as_str().len(), 255);
        assert_eq!(ids.agent_alias(&localpart).as_str().len(), 255);
        let too_long = format!("{fits}a");
        let error = ids.agent_localpart(&too_long).unwrap_err();
        assert!(matches!(&error, AgentIdError::TooLong { user_id, .. } if user_id.len() == 256));
        assert!(error.to_string().contains("256 bytes"), "{error}");
        assert_eq!(
            ids.agent_localpart("!!!"),
            Err(AgentIdError::NoLocalpart("!!!".into()))
        );
    }

    proptest::proptest! {
        /// Whatever the agent id and server, an agent either gets a localpart whose user and
        /// alias build without panicking, or a reason.
        #[test]
        fn should_build_ids_for_every_agent_it_accepts(
            agent_id in "\\PC{0,300}",
            server_len in 1usize..240,
        ) {
            let server = format!("{}.org", "s".repeat(server_len));
            let ids = Identities::new(&server, "l", Some(&[]), "s").unwrap();
            match ids.agent_localpart(&agent_id) {
                Ok(localpart) => {
                    proptest::prop_assert!(ids.agent_user(&localpart).as_str().len() <= MAX_ID_BYTES);
                    proptest::prop_assert!(ids.agent_alias(&localpart).as_str().len() <= MAX_ID_BYTES);
                }
                Err(AgentIdError::TooLong { user_id, .. }) => {
                    proptest::prop_assert!(user_id.len() > MAX_ID_BYTES);
                }
                Err(AgentIdError::NoLocalpart(_)) => {
                    proptest::prop_assert_eq!(agent_localpart(&agent_id), None);
                }
            }
        }
    }

    #[test]
    fn should_escape_regex_metacharacters() {
        assert_eq!(regex_escape("my.example.org"), r"my\.example\.org");
        assert_eq!(regex_escape("a+b(c)"), r"a\+b\(c\)");
    }
}
