//! Holds what roster knows about identity users (`@nova-*`) from lifecycle events, and
//! decides what each event asks of the homeserver given that knowledge.
//!
//! Pure like the rest of `model`: the lifecycle consumer decodes events into
//! [`IdentityEvent`]s, [`Identities::plan`] turns one into a [`Plan`], and the lifecycle's
//! identity effects execute it and report back through `state` (`record_deactivated`,
//! `record_applied_profile`). A deactivated user is never invited, rejoined, re-created or
//! given a new profile.
//!
//! Three rules keep the homeserver from hearing the same thing twice: [`Plan::without_applied`]
//! drops the profile parts roster already applied (nothing changed, nothing is sent),
//! [`Plan::without_already_applied`] drops the profile parts of an event roster applied, or
//! of one older than that (e.g. after a SIGKILL, events applied but not committed come
//! again), and [`IdentityEvent::supersedes`] says when a queued profile
//! update need not be applied at all because a newer one of the same user sets everything
//! it sets.

use std::collections::HashSet;

use ruma::{OwnedUserId, ServerName, UserId};

use crate::ids::display_name;

pub use crate::ids::IdentityId;

/// One lifecycle event, reduced to the fields roster uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityEvent {
    Created {
        id: IdentityId,
        username: String,
    },
    ProfileUpdated {
        id: IdentityId,
        /// Required by the decoder only when `display_name` is absent (it is the fallback).
        username: Option<String>,
        display_name: Option<String>,
        avatar_url: Option<String>,
    },
    Deleted {
        id: IdentityId,
        soft_delete: bool,
    },
}

impl IdentityEvent {
    pub fn id(&self) -> &IdentityId {
        match self {
            IdentityEvent::Created { id, .. }
            | IdentityEvent::ProfileUpdated { id, .. }
            | IdentityEvent::Deleted { id, .. } => id,
        }
    }

    /// The metric label of the event's type.
    pub fn kind(&self) -> &'static str {
        match self {
            IdentityEvent::Created { .. } => "created",
            IdentityEvent::ProfileUpdated { .. } => "profile_updated",
            IdentityEvent::Deleted { .. } => "deleted",
        }
    }

    /// Whether applying `self` makes applying `older` (an earlier event of the same user)
    /// pointless: both are profile updates and `self` sets every part `older` sets, so the
    /// homeserver ends the same either way. An avatar to fetch is sure to be set only if
    /// it is `older`'s too: a fetch that fails keeps the avatar there was, which `older`
    /// would have changed. Creations and deletions are never superseded, and supersede
    /// nothing (a soft delete keeps the profile the updates before it set).
    pub fn supersedes(&self, older: &IdentityEvent) -> bool {
        let (Some(newer_parts), Some(older_parts)) = (self.profile_parts(), older.profile_parts())
        else {
            return false;
        };
        let covers_avatar = match (&older_parts.avatar, &newer_parts.avatar) {
            (None, _) => true,
            (Some(_), Some(AvatarSource::Mxc(_))) => true,
            (Some(was), Some(now)) => was == now,
            (Some(_), None) => false,
        };
        self.id() == older.id()
            && (older_parts.name.is_none() || newer_parts.name.is_some())
            && covers_avatar
    }

    /// The profile a profile update asks for (`None` for other events).
    fn profile_parts(&self) -> Option<ProfileParts> {
        let IdentityEvent::ProfileUpdated {
            username,
            display_name,
            avatar_url,
            ..
        } = self
        else {
            return None;
        };
        let name = person_name(display_name.as_ref()).or_else(|| person_name(username.as_ref()));
        let (avatar, ignored) = match avatar_url.as_deref().map(str::trim) {
            None | Some("") => (None, None),
            Some(url) if url.starts_with("mxc://") => {
                if is_valid_mxc(url) {
                    (Some(AvatarSource::Mxc(url.to_owned())), None)
                } else {
                    (None, Some("avatar_url is not a valid mxc:// URI"))
                }
            }
            Some(url) if has_scheme(url, "http://") || has_scheme(url, "https://") => {
                (Some(AvatarSource::Fetch(url.to_owned())), None)
            }
            Some(_) => (None, Some("avatar_url with an unsupported scheme")),
        };
        Some(ProfileParts {
            name,
            avatar,
            ignored,
        })
    }
}

/// The display name and avatar a profile update asks for.
struct ProfileParts {
    name: Option<String>,
    avatar: Option<AvatarSource>,
    /// Why the avatar was ignored, if it was.
    ignored: Option<&'static str>,
}

/// What roster last applied to an identity user's profile (kept in the store, so an unchanged
/// update sends nothing, also after a restart).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppliedProfile {
    pub displayname: Option<String>,
    /// The avatar the event named (an `mxc://` or `http(s)://` URL).
    pub avatar_source: Option<String>,
    /// The `mxc://` URI set for it.
    pub avatar_mxc: Option<String>,
    /// Where the event whose profile parts roster last applied sits in the lifecycle topic
    /// (unknown for profiles recorded before roster remembered it).
    pub applied_at: Option<EventPosition>,
}

/// Where a lifecycle event sits in its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventPosition {
    pub partition: i32,
    pub offset: i64,
}

/// Where a new avatar comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AvatarSource {
    /// Already in a media repository: set as is.
    Mxc(String),
    /// Fetched (bounded), checked to be an image, uploaded as the user, then set.
    Fetch(String),
}

impl AvatarSource {
    /// The URL the event named.
    pub fn url(&self) -> &str {
        match self {
            AvatarSource::Mxc(url) | AvatarSource::Fetch(url) => url,
        }
    }
}

/// One step on the homeserver, in the order a plan lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Register the user by the appservice (no login); "already exists" is success.
    Register,
    SetDisplayName(String),
    SetAvatar(AvatarSource),
    /// Deactivate; with `erase`, the profile is erased too.
    Deactivate {
        erase: bool,
    },
}

impl Effect {
    pub fn label(&self) -> &'static str {
        match self {
            Effect::Register => "register",
            Effect::SetDisplayName(_) => "display_name",
            Effect::SetAvatar(AvatarSource::Mxc(_)) => "avatar_mxc",
            Effect::SetAvatar(AvatarSource::Fetch(_)) => "avatar_fetched",
            Effect::Deactivate { erase: false } => "deactivate",
            Effect::Deactivate { erase: true } => "deactivate_erase",
        }
    }
}

/// Why a plan does nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The user was deactivated before: it is never re-created or given a new profile.
    Deactivated,
    /// Nothing in the event changes anything (e.g. an empty name and no avatar).
    NothingToDo,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Deactivated => "user already deactivated",
            Skip::NothingToDo => "nothing to change",
        }
    }
}

/// Policy knobs the plan depends on (from `lifecycle.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    /// A profile update for a user who does not exist creates the user first.
    pub create_missing_users: bool,
}

/// What one identity event asks of the homeserver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub user: OwnedUserId,
    pub effects: Vec<Effect>,
    /// When the user turns out not to exist: register it and carry on (else: report it).
    pub create_if_missing: bool,
    /// A creation: the name it sets is the user's first, older than any name roster applied
    /// (an update of the same user consumed first, from another partition, registered the
    /// user and named it), so it is set only where roster applied none.
    pub creation: bool,
    pub skip: Option<Skip>,
    /// Parts of the event that were ignored, for the log (e.g. an `ftp://` avatar).
    pub ignored: Vec<&'static str>,
}

impl Plan {
    pub fn deactivates(&self) -> bool {
        self.effects
            .iter()
            .any(|e| matches!(e, Effect::Deactivate { .. }))
    }

    /// The effects, for the one log line per applied event.
    pub fn summary(&self) -> String {
        let labels: Vec<&str> = self.effects.iter().map(Effect::label).collect();
        labels.join("+")
    }

    /// The plan without the profile parts `applied` already shows: a display name equal to
    /// the one applied (for a creation: any name applied, which is newer), an avatar from the
    /// same source as the one applied (its `mxc://` known) or the `mxc://` set. Registration and deactivation
    /// are kept: they are not profile parts. A plan left with no effects sends nothing.
    pub fn without_applied(&self, applied: &AppliedProfile) -> Plan {
        self.without_applied_but(applied, None)
    }

    /// As [`Plan::without_applied`], but an avatar fetched from `stale_source` (a URL whose
    /// upload is older than `lifecycle.avatar_cache_ttl`) stays, even the one applied: the
    /// picture behind a URL may change, and it is looked at again once the TTL has passed.
    pub fn without_applied_but(
        &self,
        applied: &AppliedProfile,
        stale_source: Option<&str>,
    ) -> Plan {
        let mut plan = self.clone();
        plan.effects.retain(|effect| match effect {
            Effect::SetDisplayName(_) if self.creation => applied.displayname.is_none(),
            Effect::SetDisplayName(name) => applied.displayname.as_deref() != Some(name),
            Effect::SetAvatar(AvatarSource::Fetch(url)) if stale_source == Some(url) => true,
            // The `mxc://` set, named directly (e.g. the one an applied URL was uploaded as).
            Effect::SetAvatar(AvatarSource::Mxc(uri))
                if applied.avatar_mxc.as_deref() == Some(uri) =>
            {
                false
            }
            Effect::SetAvatar(source) => {
                applied.avatar_mxc.is_none()
                    || applied.avatar_source.as_deref() != Some(source.url())
            }
            Effect::Register | Effect::Deactivate { .. } => true,
        });
        plan
    }

    /// The plan of an older update applied in place of `newer`, a newer update of the same
    /// user that was dead-lettered, without the parts `newer` asked for that `applied`
    /// shows: its name or avatar source, accepted before the step that was refused (or
    /// unchanged, so on the homeserver already). Those are newer than this plan's; only
    /// what `newer` could not set is taken from the older update.
    pub fn without_parts_applied_by(&self, newer: &Plan, applied: &AppliedProfile) -> Plan {
        let newer_name = newer.effects.iter().find_map(|effect| match effect {
            Effect::SetDisplayName(name) => Some(name.as_str()),
            _ => None,
        });
        let newer_avatar = newer.effects.iter().find_map(|effect| match effect {
            Effect::SetAvatar(source) => Some(source.url()),
            _ => None,
        });
        let name_set = newer_name.is_some() && applied.displayname.as_deref() == newer_name;
        let avatar_set = newer_avatar.is_some()
            && applied.avatar_mxc.is_some()
            && applied.avatar_source.as_deref() == newer_avatar;
        let mut plan = self.clone();
        plan.effects.retain(|effect| match effect {
            Effect::SetDisplayName(_) => !name_set,
            Effect::SetAvatar(_) => !avatar_set,
            Effect::Register | Effect::Deactivate { .. } => true,
        });
        plan
    }

    /// The URL of the avatar this plan fetches, if it fetches one.
    pub fn fetched_avatar(&self) -> Option<&str> {
        self.effects.iter().find_map(|effect| match effect {
            Effect::SetAvatar(AvatarSource::Fetch(url)) => Some(url.as_str()),
            _ => None,
        })
    }

    /// The plan for the event at `at` without its profile parts when roster applied them
    /// already, or applied a newer event's since: the event at `applied.applied_at` came at
    /// or after it in the same partition and was applied after it (a user's events are
    /// applied in offset order; an older one superseded by a newer one was rightly never
    /// applied). Sending them again would set an older profile over a newer one for a
    /// moment, and send a change twice; a redelivery after a crash (applied, not yet
    /// committed) is such an event. Registration and deactivation are kept (idempotent).
    /// Another partition's offsets (the topic was repartitioned) say nothing: all is kept.
    pub fn without_already_applied(&self, applied: &AppliedProfile, at: EventPosition) -> Plan {
        let mut plan = self.clone();
        if applied.covers(at) {
            plan.effects
                .retain(|effect| matches!(effect, Effect::Register | Effect::Deactivate { .. }));
        }
        plan
    }
}

impl AppliedProfile {
    /// What roster has applied once `name` (if set) and the avatar `(source, mxc)` (if set)
    /// were accepted: the parts not set stay as they were.
    pub fn with(&self, name: Option<&str>, avatar: Option<(&str, &str)>) -> AppliedProfile {
        let mut next = self.clone();
        if let Some(name) = name {
            next.displayname = Some(name.to_owned());
        }
        if let Some((source, mxc)) = avatar {
            next.avatar_source = Some(source.to_owned());
            next.avatar_mxc = Some(mxc.to_owned());
        }
        next
    }

    /// Whether the event at `at` is the one that applied this profile, or older than it in
    /// the same partition.
    pub fn covers(&self, at: EventPosition) -> bool {
        self.applied_at
            .is_some_and(|last| last.partition == at.partition && at.offset <= last.offset)
    }

    /// This profile, applied by the event at `at`.
    pub fn at(self, at: EventPosition) -> AppliedProfile {
        AppliedProfile {
            applied_at: Some(at),
            ..self
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct Identities {
    deactivated: HashSet<OwnedUserId>,
}

impl Identities {
    /// Records that `user` was deactivated; returns whether this is news.
    pub fn mark_deactivated(&mut self, user: OwnedUserId) -> bool {
        self.deactivated.insert(user)
    }

    pub fn is_deactivated(&self, user: &UserId) -> bool {
        self.deactivated.contains(user)
    }

    pub fn deactivated_count(&self) -> usize {
        self.deactivated.len()
    }

    /// The effects `event` implies, given what is known about its user.
    ///
    /// A deletion is planned even for a user already known deactivated: a hard delete may
    /// follow a soft one, and deactivating twice is harmless on every homeserver.
    pub fn plan(&self, event: &IdentityEvent, server: &ServerName, options: PlanOptions) -> Plan {
        let user = event.id().user_id(server);
        let mut plan = Plan {
            user,
            effects: Vec::new(),
            create_if_missing: false,
            creation: matches!(event, IdentityEvent::Created { .. }),
            skip: None,
            ignored: Vec::new(),
        };
        let deactivated = self.is_deactivated(&plan.user);
        match event {
            IdentityEvent::Created { .. } | IdentityEvent::ProfileUpdated { .. } if deactivated => {
                plan.skip = Some(Skip::Deactivated);
            }
            IdentityEvent::Created { username, .. } => {
                plan.effects.push(Effect::Register);
                if let Some(name) = person_name(Some(username)) {
                    plan.effects.push(Effect::SetDisplayName(name));
                }
            }
            IdentityEvent::ProfileUpdated { .. } => {
                plan.create_if_missing = options.create_missing_users;
                let parts = event
                    .profile_parts()
                    .expect("a profile update has profile parts");
                if let Some(name) = parts.name {
                    plan.effects.push(Effect::SetDisplayName(name));
                }
                if let Some(avatar) = parts.avatar {
                    plan.effects.push(Effect::SetAvatar(avatar));
                }
                plan.ignored.extend(parts.ignored);
                if plan.effects.is_empty() {
                    plan.skip = Some(Skip::NothingToDo);
                }
            }
            IdentityEvent::Deleted { soft_delete, .. } => {
                plan.effects.push(Effect::Deactivate {
                    erase: !soft_delete,
                });
            }
        }
        plan
    }
}

/// An `mxc://` URI with a valid server name and a non-empty media id of `[A-Za-z0-9_-]`.
pub fn is_valid_mxc(uri: &str) -> bool {
    <&ruma::MxcUri>::from(uri)
        .parts()
        .is_ok_and(|(_, media)| !media.is_empty())
}

/// The display name a person's `text` gives ([`display_name`]: no control characters, not
/// too long), trimmed. `None` when nothing is left, so the username can stand in.
fn person_name(text: Option<&String>) -> Option<String> {
    let name = display_name(text?.trim());
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

fn has_scheme(url: &str, scheme: &str) -> bool {
    url.get(..scheme.len())
        .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::{owned_user_id, server_name};

    const UUID: &str = "6f1b2c3d-aaaa-4bbb-8ccc-0123456789ab";
    const CREATE: PlanOptions = PlanOptions {
        create_missing_users: true,
    };

    fn id() -> IdentityId {
        IdentityId::parse(UUID).unwrap()
    }

    fn profile(
        display: Option<&str>,
        username: Option<&str>,
        avatar: Option<&str>,
    ) -> IdentityEvent {
        IdentityEvent::ProfileUpdated {
            id: id(),
            username: username.map(Into::into),
            display_name: display.map(Into::into),
            avatar_url: avatar.map(Into::into),
        }
    }

    fn plan(ids: &Identities, event: &IdentityEvent) -> Plan {
        ids.plan(event, server_name!("example.org"), CREATE)
    }

    #[test]
    fn should_remember_a_deactivation_once() {
        let mut ids = Identities::default();
        let user = owned_user_id!("@nova-1:example.org");
        assert!(!ids.is_deactivated(&user));
        assert!(ids.mark_deactivated(user.clone()));
        assert!(!ids.mark_deactivated(user.clone()));
        assert!(ids.is_deactivated(&user));
        assert_eq!(ids.deactivated_count(), 1);
    }

    #[test]
    fn should_register_a_created_user_named_after_its_username() {
        let event = IdentityEvent::Created {
            id: id(),
            username: "alice".into(),
        };
        let plan = plan(&Identities::default(), &event);
        assert_eq!(plan.user, format!("@nova-{UUID}:example.org"));
        assert_eq!(
            plan.effects,
            vec![Effect::Register, Effect::SetDisplayName("alice".into())]
        );
        assert_eq!(plan.skip, None);
        assert_eq!(plan.summary(), "register+display_name");
    }

    #[test]
    fn should_prefer_display_name_and_fall_back_to_username() {
        let ids = Identities::default();
        let named = plan(&ids, &profile(Some("Alice A."), Some("alice"), None));
        assert_eq!(
            named.effects,
            vec![Effect::SetDisplayName("Alice A.".into())]
        );
        assert!(named.create_if_missing);
        for display in [None, Some(""), Some("   ")] {
            let fallback = plan(&ids, &profile(display, Some("alice"), None));
            assert_eq!(
                fallback.effects,
                vec![Effect::SetDisplayName("alice".into())],
                "{display:?}"
            );
        }
    }

    /// A homeserver refuses a display name over 256 characters (Synapse: 400), which would
    /// dead-letter the update: the name is cut, as agents' names are, and the cut name is
    /// what a later update is compared with.
    #[test]
    fn should_cut_a_display_name_too_long_for_the_homeserver() {
        let ids = Identities::default();
        let long = "é".repeat(300);
        let cut = crate::ids::display_name(&long).into_owned();
        assert_eq!(cut.chars().count(), crate::ids::MAX_NAME_CHARS);
        let updated = plan(&ids, &profile(Some(&long), Some("alice"), None));
        assert_eq!(updated.effects, vec![Effect::SetDisplayName(cut.clone())]);
        let created = plan(
            &ids,
            &IdentityEvent::Created {
                id: id(),
                username: long.clone(),
            },
        );
        assert_eq!(created.effects[1], Effect::SetDisplayName(cut));
    }

    /// A Synapse on PostgreSQL cannot store U+0000 (a 500 on every attempt: the event would
    /// be retried for ever, its partition stalled). Control characters are not part of a
    /// name: NUL goes, the others (line breaks, tabs) become spaces; a name of nothing else
    /// is blank, and the username stands in.
    #[test]
    fn should_set_names_without_control_characters() {
        let ids = Identities::default();
        let updated = plan(
            &ids,
            &profile(Some("Al\u{0}ice\nB.\t"), Some("alice"), None),
        );
        assert_eq!(
            updated.effects,
            vec![Effect::SetDisplayName("Alice B.".into())]
        );
        let blank = plan(&ids, &profile(Some("\u{0}\u{0}"), Some("al\u{0}ice"), None));
        assert_eq!(blank.effects, vec![Effect::SetDisplayName("alice".into())]);
        let nothing = plan(&ids, &profile(Some("\u{0}"), Some("\u{7}"), None));
        assert_eq!(nothing.skip, Some(Skip::NothingToDo));
        let created = plan(
            &ids,
            &IdentityEvent::Created {
                id: id(),
                username: "ali\u{0}ce".into(),
            },
        );
        assert_eq!(
            created.effects,
            vec![Effect::Register, Effect::SetDisplayName("alice".into())]
        );
    }

    #[test]
    fn should_set_mxc_avatars_as_is_and_fetch_http_ones() {
        let ids = Identities::default();
        let mxc = plan(
            &ids,
            &profile(None, Some("a"), Some("mxc://example.org/abc")),
        );
        assert_eq!(
            mxc.effects[1],
            Effect::SetAvatar(AvatarSource::Mxc("mxc://example.org/abc".into()))
        );
        for url in ["http://127.0.0.1:9/a.png", "HTTPS://cdn.example/a.png"] {
            let fetched = plan(&ids, &profile(None, Some("a"), Some(url)));
            assert_eq!(
                fetched.effects[1],
                Effect::SetAvatar(AvatarSource::Fetch(url.into()))
            );
        }
        let ignored = plan(&ids, &profile(None, Some("a"), Some("ftp://x/a.png")));
        assert_eq!(ignored.effects.len(), 1);
        assert_eq!(ignored.ignored.len(), 1);
        for bad in [
            "mxc://evil.org/../../x",
            "mxc://evil.org/",
            "mxc://not a server/abc",
            "mxc://x",
        ] {
            let refused = plan(&ids, &profile(None, Some("a"), Some(bad)));
            assert_eq!(refused.effects.len(), 1, "{bad}: only the name");
            assert_eq!(
                refused.ignored,
                vec!["avatar_url is not a valid mxc:// URI"],
                "{bad}"
            );
        }
        let empty = plan(&ids, &profile(None, Some("a"), Some("")));
        assert_eq!(empty.effects.len(), 1);
        assert!(empty.ignored.is_empty());
    }

    #[test]
    fn should_skip_an_update_that_changes_nothing() {
        let plan = plan(&Identities::default(), &profile(Some(" "), None, None));
        assert_eq!(plan.skip, Some(Skip::NothingToDo));
        assert!(plan.effects.is_empty());
    }

    #[test]
    fn should_create_missing_users_only_when_configured() {
        let event = profile(Some("A"), None, None);
        let ids = Identities::default();
        let off = ids.plan(
            &event,
            server_name!("example.org"),
            PlanOptions {
                create_missing_users: false,
            },
        );
        assert!(!off.create_if_missing);
        assert!(plan(&ids, &event).create_if_missing);
    }

    #[test]
    fn should_erase_only_on_hard_delete() {
        let ids = Identities::default();
        for (soft_delete, erase) in [(true, false), (false, true)] {
            let plan = plan(
                &ids,
                &IdentityEvent::Deleted {
                    id: id(),
                    soft_delete,
                },
            );
            assert_eq!(plan.effects, vec![Effect::Deactivate { erase }]);
            assert!(plan.deactivates());
            assert!(!plan.create_if_missing, "a deletion never creates a user");
        }
    }

    #[test]
    fn should_never_recreate_or_rename_a_deactivated_user() {
        let mut ids = Identities::default();
        ids.mark_deactivated(id().user_id(server_name!("example.org")));
        let created = IdentityEvent::Created {
            id: id(),
            username: "alice".into(),
        };
        for event in [created, profile(Some("A"), None, Some("mxc://x/y"))] {
            let plan = plan(&ids, &event);
            assert_eq!(plan.skip, Some(Skip::Deactivated));
            assert!(plan.effects.is_empty());
        }
        // A later hard delete still erases.
        let delete = plan(
            &ids,
            &IdentityEvent::Deleted {
                id: id(),
                soft_delete: false,
            },
        );
        assert_eq!(delete.effects, vec![Effect::Deactivate { erase: true }]);
    }

    fn applied(name: Option<&str>, source: Option<&str>, mxc: Option<&str>) -> AppliedProfile {
        AppliedProfile {
            displayname: name.map(Into::into),
            avatar_source: source.map(Into::into),
            avatar_mxc: mxc.map(Into::into),
            applied_at: None,
        }
    }

    #[test]
    fn should_send_nothing_when_name_and_avatar_equal_what_was_applied() {
        let ids = Identities::default();
        let url = "https://cdn.example/a.png";
        let was = applied(Some("Alice"), Some(url), Some("mxc://ex.org/a"));
        // Only follower_count or bio changed: the event names the same name and avatar.
        let same = plan(&ids, &profile(Some("Alice"), Some("alice"), Some(url)));
        assert!(same.without_applied(&was).effects.is_empty());
        // The name falls back to the username, which is what was applied.
        let by_username = plan(&ids, &profile(None, Some("Alice"), Some(url)));
        assert!(by_username.without_applied(&was).effects.is_empty());
        // No avatar in the event leaves the avatar alone: nothing to send either.
        let no_avatar = plan(&ids, &profile(Some("Alice"), None, None));
        assert!(no_avatar.without_applied(&was).effects.is_empty());
    }

    #[test]
    fn should_send_exactly_the_parts_that_changed() {
        let ids = Identities::default();
        let url = "https://cdn.example/a.png";
        let was = applied(Some("Alice"), Some(url), Some("mxc://ex.org/a"));
        let renamed = plan(&ids, &profile(Some("Alice B."), None, Some(url)));
        assert_eq!(
            renamed.without_applied(&was).effects,
            vec![Effect::SetDisplayName("Alice B.".into())]
        );
        let new_avatar = plan(&ids, &profile(Some("Alice"), None, Some("mxc://ex.org/b")));
        assert_eq!(
            new_avatar.without_applied(&was).effects,
            vec![Effect::SetAvatar(AvatarSource::Mxc(
                "mxc://ex.org/b".into()
            ))]
        );
        let both = plan(
            &ids,
            &profile(Some("B"), None, Some("https://cdn.example/b.png")),
        );
        assert_eq!(both.without_applied(&was).effects.len(), 2);
        // The mxc:// the applied URL was uploaded as, named directly: already set.
        let as_mxc = plan(&ids, &profile(Some("Alice"), None, Some("mxc://ex.org/a")));
        assert!(as_mxc.without_applied(&was).effects.is_empty());
        // Nothing known (a new user, or a store that lost it): everything is sent.
        assert_eq!(
            both.without_applied(&AppliedProfile::default()).effects,
            both.effects
        );
        // An avatar source whose mxc:// is unknown (never set) is set again.
        let half = applied(Some("Alice"), Some(url), None);
        let same = plan(&ids, &profile(Some("Alice"), None, Some(url)));
        assert_eq!(
            same.without_applied(&half).effects,
            vec![Effect::SetAvatar(AvatarSource::Fetch(url.into()))]
        );
        // The applied URL's upload is older than the TTL: its picture is looked at again.
        assert_eq!(same.fetched_avatar(), Some(url));
        assert!(
            same.without_applied_but(&was, Some("https://other/"))
                .effects
                .is_empty()
        );
        assert_eq!(
            same.without_applied_but(&was, Some(url)).effects,
            vec![Effect::SetAvatar(AvatarSource::Fetch(url.into()))]
        );
    }

    /// The newest update was dead-lettered after its name was accepted (its avatar was
    /// refused): an older one applied in its place sets the avatar only.
    #[test]
    fn should_not_take_from_an_older_update_what_a_dead_lettered_newer_one_set() {
        let ids = Identities::default();
        let older = plan(&ids, &profile(Some("A"), None, Some("mxc://ex.org/a")));
        let newer = plan(&ids, &profile(Some("C"), None, Some("mxc://ex.org/c")));
        let name_accepted = applied(Some("C"), Some("mxc://ex.org/0"), Some("mxc://ex.org/0"));
        assert_eq!(
            older
                .without_parts_applied_by(&newer, &name_accepted)
                .effects,
            vec![Effect::SetAvatar(AvatarSource::Mxc(
                "mxc://ex.org/a".into()
            ))]
        );
        // Its name refused (nothing accepted): the older one is applied whole.
        let nothing_accepted = applied(Some("Z"), None, None);
        assert_eq!(
            older
                .without_parts_applied_by(&newer, &nothing_accepted)
                .effects,
            older.effects
        );
        // Both of its parts on the homeserver: nothing left of the older one.
        let both = applied(Some("C"), Some("mxc://ex.org/c"), Some("mxc://ex.org/c"));
        assert!(
            older
                .without_parts_applied_by(&newer, &both)
                .effects
                .is_empty()
        );
    }

    fn at(partition: i32, offset: i64) -> EventPosition {
        EventPosition { partition, offset }
    }

    /// The SIGKILL finding: renames A (offset 10) and B (offset 11) were applied, only 10
    /// was committed; both come again and neither may be sent.
    #[test]
    fn should_drop_a_redelivered_profile_update() {
        let ids = Identities::default();
        let was = applied(Some("B"), None, None).at(at(0, 11));
        let a = plan(&ids, &profile(Some("A"), None, Some("mxc://ex.org/a")));
        let b = plan(&ids, &profile(Some("B"), None, None));
        let dropped = |plan: &Plan, at| plan.without_already_applied(&was, at).effects;
        assert!(
            dropped(&a, at(0, 10)).is_empty(),
            "older than the last applied"
        );
        assert!(dropped(&b, at(0, 11)).is_empty(), "the last applied itself");
        assert_eq!(dropped(&a, at(0, 12)), a.effects, "newer: news");
        // Another partition says nothing about order (the topic was repartitioned).
        assert_eq!(dropped(&a, at(1, 3)), a.effects);
        // Nothing remembered (a new user, or a profile recorded before positions were).
        for nothing in [applied(Some("B"), None, None), AppliedProfile::default()] {
            assert_eq!(
                a.without_already_applied(&nothing, at(0, 0)).effects,
                a.effects
            );
        }
    }

    /// A creation redelivered after renames registers again (harmless) but must not set
    /// its username over the newer name; a deletion always deactivates.
    #[test]
    fn should_keep_registration_and_deactivation_of_a_redelivered_event() {
        let ids = Identities::default();
        let was = applied(Some("B"), None, None).at(at(0, 11));
        let created = IdentityEvent::Created {
            id: id(),
            username: "alice".into(),
        };
        assert_eq!(
            plan(&ids, &created)
                .without_already_applied(&was, at(0, 5))
                .effects,
            vec![Effect::Register]
        );
        let deleted = IdentityEvent::Deleted {
            id: id(),
            soft_delete: true,
        };
        assert_eq!(
            plan(&ids, &deleted)
                .without_already_applied(&was, at(0, 5))
                .effects,
            vec![Effect::Deactivate { erase: false }]
        );
    }

    #[test]
    fn should_remember_where_a_profile_was_applied_from() {
        let was = applied(Some("A"), None, None).at(at(2, 7));
        let next = was.with(Some("B"), None).at(at(2, 9));
        assert_eq!(next.displayname.as_deref(), Some("B"));
        assert_eq!(next.applied_at, Some(at(2, 9)));
        // Parts not set stay, and so does the position until a new one is given.
        assert_eq!(was.with(None, None), was);
    }

    /// An update consumed before its user's creation (another partition) named the user:
    /// the creation's username is older and is not set over it.
    #[test]
    fn should_name_a_created_user_only_when_no_name_was_applied() {
        let ids = Identities::default();
        let created = plan(
            &ids,
            &IdentityEvent::Created {
                id: id(),
                username: "alice".into(),
            },
        );
        assert_eq!(
            created
                .without_applied(&applied(Some("Alice A."), None, None))
                .effects,
            vec![Effect::Register]
        );
        assert_eq!(
            created.without_applied(&AppliedProfile::default()).effects,
            created.effects
        );
        // An update is compared with the name applied, as before.
        let renamed = plan(&ids, &profile(Some("B"), None, None));
        assert!(!renamed.creation);
        assert_eq!(
            renamed
                .without_applied(&applied(Some("Alice A."), None, None))
                .effects,
            renamed.effects
        );
    }

    #[test]
    fn should_keep_registration_and_deactivation_whatever_was_applied() {
        let ids = Identities::default();
        let was = applied(Some("alice"), None, None);
        let created = IdentityEvent::Created {
            id: id(),
            username: "alice".into(),
        };
        assert_eq!(
            plan(&ids, &created).without_applied(&was).effects,
            vec![Effect::Register]
        );
        let deleted = IdentityEvent::Deleted {
            id: id(),
            soft_delete: false,
        };
        assert_eq!(
            plan(&ids, &deleted).without_applied(&was).effects,
            vec![Effect::Deactivate { erase: true }]
        );
    }

    #[test]
    fn should_remember_only_the_parts_that_were_set() {
        let was = applied(Some("A"), Some("mxc://ex.org/a"), Some("mxc://ex.org/a"));
        assert_eq!(
            was.with(Some("B"), None),
            applied(Some("B"), Some("mxc://ex.org/a"), Some("mxc://ex.org/a"))
        );
        assert_eq!(
            was.with(None, Some(("https://x/b.png", "mxc://ex.org/b"))),
            applied(Some("A"), Some("https://x/b.png"), Some("mxc://ex.org/b"))
        );
        assert_eq!(was.with(None, None), was);
    }

    #[test]
    fn should_supersede_an_update_only_by_a_newer_one_that_sets_every_part_it_sets() {
        let full = profile(Some("B"), None, Some("mxc://ex.org/b"));
        let name_only = profile(Some("A"), None, None);
        let avatar_too = profile(Some("A"), None, Some("mxc://ex.org/a"));
        assert!(full.supersedes(&name_only));
        assert!(full.supersedes(&avatar_too));
        assert!(name_only.supersedes(&profile(Some("Z"), None, None)));
        // The older one's avatar would be lost: both must be applied.
        assert!(!name_only.supersedes(&avatar_too));
        // An avatar roster ignores (bad scheme) sets nothing, so it covers nothing.
        let bad_avatar = profile(Some("C"), None, Some("ftp://x/a.png"));
        assert!(!bad_avatar.supersedes(&avatar_too));
        assert!(bad_avatar.supersedes(&name_only));
        // An avatar to fetch may fail to come: it covers only the same URL.
        let fetched = profile(Some("D"), None, Some("https://x/d.png"));
        assert!(!fetched.supersedes(&avatar_too));
        assert!(fetched.supersedes(&profile(Some("E"), None, Some("https://x/d.png"))));
        assert!(!fetched.supersedes(&profile(Some("E"), None, Some("https://x/e.png"))));
        assert!(fetched.supersedes(&name_only));
        assert!(full.supersedes(&fetched));
        // Another user's update supersedes nothing.
        let other = IdentityEvent::ProfileUpdated {
            id: IdentityId::parse("00000000-0000-4000-8000-000000000001").unwrap(),
            username: None,
            display_name: Some("B".into()),
            avatar_url: Some("mxc://ex.org/b".into()),
        };
        assert!(!other.supersedes(&name_only));
    }

    #[test]
    fn should_never_supersede_or_be_superseded_by_a_creation_or_a_deletion() {
        let update = profile(Some("B"), Some("b"), Some("mxc://ex.org/b"));
        let created = IdentityEvent::Created {
            id: id(),
            username: "a".into(),
        };
        for soft_delete in [true, false] {
            let deleted = IdentityEvent::Deleted {
                id: id(),
                soft_delete,
            };
            assert!(!update.supersedes(&deleted), "a deletion is never dropped");
            assert!(
                !deleted.supersedes(&update),
                "a soft delete keeps the profile"
            );
            assert!(!deleted.supersedes(&deleted.clone()));
        }
        assert!(
            !update.supersedes(&created),
            "a created user is registered first"
        );
        assert!(!created.supersedes(&update));
    }
}
