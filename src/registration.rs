//! Generates and reads the appservice registrations, the files the homeserver and roster
//! share.
//!
//! Two registrations, each with its own id and tokens: the **pushed** one (the bot, the
//! agents and their aliases, exclusive; the URL the homeserver pushes transactions to) and
//! the **acting** one (`url: null`: the homeserver pushes nothing for it) for the users roster
//! acts as but never needs to hear about: the required members on this server (`@admin`)
//! and identity users (`@nova-*`), non-exclusive (they are people's accounts). Agent rooms and
//! the space are still pushed, because the bot and the agents are in them. A single legacy
//! registration holding every namespace keeps working until the pair is installed.
//!
//! Invariants: tokens come from the OS CSPRNG (32 bytes, URL-safe base64); every namespace
//! regex is anchored (`^...$`, tuwunel requires it) with the server name escaped; files are
//! written 0600 and an existing one is never replaced without `force`; a URL the homeserver
//! cannot reach (`0.0.0.0`, `[::]`) is never written.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use rand::TryRngCore;
use ruma::api::appservice::{Namespace, Namespaces, Registration, RegistrationInit};

use crate::config::Config;
use crate::ids::{AGENT_PREFIX, IDENTITY_PREFIX, regex_escape as escape};

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error(
        "{path} already exists; pass --force to replace it (the homeserver must then load the new tokens)"
    )]
    Exists { path: PathBuf },
    #[error(
        "cannot write registration {path}: {source}; check that its directory exists and is writable"
    )]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read registration {path}: {source}; {}", read_fix(.source))]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("registration {path} is not a valid appservice registration: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("registration {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("the operating system's random source failed: {0}")]
    Random(String),
    #[error(
        "appservice.listen is {listen}, which the homeserver cannot reach; set appservice.url to how the homeserver reaches roster, e.g. http://roster:9009"
    )]
    UnreachableUrl { listen: std::net::SocketAddr },
}

/// What to do about a registration that cannot be read: only a missing one is generated;
/// one that exists holds the tokens the homeserver has, and new ones would not match.
fn read_fix(error: &std::io::Error) -> &'static str {
    if error.kind() == std::io::ErrorKind::NotFound {
        "generate one with `roster registration`"
    } else {
        "check its owner and mode (roster's user must read it) rather than generating new tokens"
    }
}

/// The registrations roster runs with.
#[derive(Clone)]
pub struct Registrations {
    /// The homeserver pushes transactions for these users and aliases.
    pub pushed: Registration,
    /// The silent one (`url: null`); `None` with a legacy single registration.
    pub acting: Option<Registration>,
}

/// Ids and URLs only: ruma's `Registration` prints its tokens, which are never printed.
impl std::fmt::Debug for Registrations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |r: &Registration| format!("{} (url {:?}, tokens not shown)", r.id, r.url);
        f.debug_struct("Registrations")
            .field("pushed", &shown(&self.pushed))
            .field("acting", &self.acting.as_ref().map(shown))
            .finish()
    }
}

impl Registrations {
    /// How roster is registered, for logs and `check-config`.
    pub fn describe(&self) -> &'static str {
        match self.acting {
            Some(_) => "a pushed and an acting-only registration",
            None => {
                "one legacy registration (the homeserver pushes every room of @admin and @nova-*; run `roster registration --force` and install the pair)"
            }
        }
    }
}

/// A fresh token: 32 bytes from the OS CSPRNG, URL-safe base64 without padding.
pub fn random_token() -> Result<String, RegistrationError> {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| RegistrationError::Random(e.to_string()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// The pair of registrations for `config`, with fresh tokens.
pub fn generate(config: &Config) -> Result<Registrations, RegistrationError> {
    let listen = config.appservice.listen;
    if config.appservice.url.is_none() && listen.ip().is_unspecified() {
        return Err(RegistrationError::UnreachableUrl { listen });
    }
    Ok(Registrations {
        pushed: pushed(config)?,
        acting: Some(acting(config)?),
    })
}

fn user_namespace(config: &Config, localpart_regex: &str, exclusive: bool) -> Namespace {
    let server = escape(config.ids().server_name.as_str());
    Namespace::new(exclusive, format!("^@{localpart_regex}:{server}$"))
}

/// The pushed registration: the bot, the agents and their aliases.
fn pushed(config: &Config) -> Result<Registration, RegistrationError> {
    let ids = config.ids();
    let server = escape(ids.server_name.as_str());
    let mut namespaces = Namespaces::new();
    namespaces.users.push(user_namespace(
        config,
        &format!("{}.*", escape(AGENT_PREFIX)),
        true,
    ));
    namespaces
        .users
        .push(user_namespace(config, &escape(ids.bot.localpart()), true));
    namespaces.aliases.push(Namespace::new(
        true,
        format!("^#{}.*:{server}$", escape(AGENT_PREFIX)),
    ));
    // The agents space: an appservice user may only create aliases in its namespaces.
    namespaces.aliases.push(Namespace::new(
        true,
        format!("^{}$", escape(ids.space_alias.as_str())),
    ));
    Ok(RegistrationInit {
        id: config.appservice.id.clone(),
        url: Some(config.appservice.public_url()),
        as_token: random_token()?,
        hs_token: random_token()?,
        sender_localpart: ids.bot.localpart().to_owned(),
        namespaces,
        rate_limited: Some(false),
        protocols: None,
    }
    .into())
}

/// The acting-only registration (`url: null`): people's accounts roster acts as, shared.
fn acting(config: &Config) -> Result<Registration, RegistrationError> {
    let ids = config.ids();
    let mut namespaces = Namespaces::new();
    for member in ids.acting_members() {
        namespaces
            .users
            .push(user_namespace(config, &escape(member.localpart()), false));
    }
    namespaces.users.push(user_namespace(
        config,
        &format!("{}.*", escape(IDENTITY_PREFIX)),
        false,
    ));
    Ok(RegistrationInit {
        id: acting_id(config),
        url: None,
        as_token: random_token()?,
        hs_token: random_token()?,
        sender_localpart: format!("{}-acting", ids.bot.localpart()),
        namespaces,
        rate_limited: Some(false),
        protocols: None,
    }
    .into())
}

/// The acting registration's id: its own, as homeservers require.
fn acting_id(config: &Config) -> String {
    format!("{}-acting", config.appservice.id)
}

/// The namespaces a legacy single registration held beside the pushed ones.
fn legacy_namespaces(config: &Config) -> Vec<String> {
    acting(config)
        .map(|r| r.namespaces.users.into_iter().map(|n| n.regex).collect())
        .unwrap_or_default()
}

/// Writes both registrations of `registrations` (0600) to `pushed` and `acting`; refuses to
/// replace either unless `force`.
pub fn write_pair(
    pushed: &Path,
    acting: &Path,
    registrations: &Registrations,
    force: bool,
) -> Result<(), RegistrationError> {
    if !force {
        for path in [pushed, acting] {
            if path.exists() {
                return Err(RegistrationError::Exists {
                    path: path.to_owned(),
                });
            }
        }
    }
    write(pushed, &registrations.pushed, force)?;
    if let Some(silent) = &registrations.acting {
        write(acting, silent, force)?;
    }
    Ok(())
}

/// Writes `registration` to `path` with mode 0600; refuses to replace a file unless `force`.
pub fn write(
    path: &Path,
    registration: &Registration,
    force: bool,
) -> Result<(), RegistrationError> {
    let yaml = serde_yaml::to_string(registration).expect("a registration serializes");
    let write_err = |source| RegistrationError::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    if force {
        // Write beside and rename, so a reader never sees half a file and the mode is 0600
        // even when the old file had a wider one.
        let tmp = path.with_extension("yaml.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut file = options.create_new(true).open(&tmp).map_err(write_err)?;
        file.write_all(yaml.as_bytes()).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
        std::fs::rename(&tmp, path).map_err(write_err)?;
    } else {
        let mut file = match options.create_new(true).open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(RegistrationError::Exists {
                    path: path.to_owned(),
                });
            }
            Err(e) => return Err(write_err(e)),
        };
        file.write_all(yaml.as_bytes()).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
    }
    Ok(())
}

fn read_one(path: &Path) -> Result<Registration, RegistrationError> {
    let text = std::fs::read_to_string(path).map_err(|source| RegistrationError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_yaml::from_str(&text).map_err(|source| RegistrationError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Reads the registrations `serve` runs with (the acting one when its file exists) and
/// checks they fit the config.
pub fn read(config: &Config) -> Result<Registrations, RegistrationError> {
    let registrations = read_unchecked(config)?;
    let problems = check(config, &registrations);
    match problems.into_iter().next() {
        Some((path, message)) => Err(RegistrationError::Invalid { path, message }),
        None => Ok(registrations),
    }
}

/// Reads the registrations without checking them against the config (see `check`).
pub fn read_unchecked(config: &Config) -> Result<Registrations, RegistrationError> {
    let pushed_path = &config.appservice.registration;
    let pushed = read_one(pushed_path)?;
    let acting_path = config.appservice.acting_registration_path();
    let acting = match read_one(&acting_path) {
        Ok(acting) => Some(acting),
        Err(RegistrationError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            None
        }
        Err(e) => return Err(e),
    };
    Ok(Registrations { pushed, acting })
}

/// Everything wrong with `registrations` for `config`: the file at fault and one line
/// naming the key or field and the fix.
pub fn check(config: &Config, registrations: &Registrations) -> Vec<(PathBuf, String)> {
    let pushed_path = config.appservice.registration.clone();
    let acting_path = config.appservice.acting_registration_path();
    let mut problems = Vec::new();
    let mut problem = |path: &PathBuf, message: String| problems.push((path.clone(), message));
    let regen = "regenerate with `roster registration --force` and reload the homeserver";
    let pushed = &registrations.pushed;
    for (path, registration) in std::iter::once((&pushed_path, pushed))
        .chain(registrations.acting.iter().map(|a| (&acting_path, a)))
    {
        if registration.as_token.len() < 32 || registration.hs_token.len() < 32 {
            problem(
                path,
                format!("as_token and hs_token must be at least 32 characters; {regen}"),
            );
        }
        for namespace in registration
            .namespaces
            .users
            .iter()
            .chain(&registration.namespaces.aliases)
        {
            if !(namespace.regex.starts_with('^') && namespace.regex.ends_with('$')) {
                problem(
                    path,
                    format!(
                        "namespace {:?} is not anchored (^...$), which tuwunel requires; {regen}",
                        namespace.regex
                    ),
                );
            }
        }
    }
    for (field, value, key, wanted) in [
        (
            "sender_localpart",
            &pushed.sender_localpart,
            "appservice.bot_localpart",
            &config.appservice.bot_localpart,
        ),
        ("id", &pushed.id, "appservice.id", &config.appservice.id),
    ] {
        if value != wanted {
            problem(
                &pushed_path,
                format!("{field} is {value:?} but {key} is {wanted:?}; make them agree"),
            );
        }
    }
    match pushed.url.as_deref() {
        None => problem(
            &pushed_path,
            format!("url is null, so the homeserver pushes nothing to roster; {regen}"),
        ),
        Some(url) => {
            if reqwest::Url::parse(url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .is_some_and(|h| h == "0.0.0.0" || h == "[::]" || h == "::")
            {
                problem(
                    &pushed_path,
                    format!(
                        "url {url} cannot be reached by the homeserver; set appservice.url (e.g. http://roster:9009), then {regen}"
                    ),
                );
            }
            if url != config.appservice.public_url() {
                problem(
                    &pushed_path,
                    format!(
                        "url is {url} but the config says the homeserver reaches roster at {} (appservice.url / appservice.listen); make them agree",
                        config.appservice.public_url()
                    ),
                );
            }
        }
    }
    let has = |registration: &Registration, regex: &str| {
        registration
            .namespaces
            .users
            .iter()
            .chain(&registration.namespaces.aliases)
            .any(|n| n.regex == regex)
    };
    let missing = |registration: &Registration, wanted: Vec<String>| -> Vec<String> {
        wanted
            .into_iter()
            .filter(|r| !has(registration, r))
            .collect()
    };
    for regex in missing(pushed, pushed_shape(config)) {
        problem(
            &pushed_path,
            format!("the namespaces lack {regex} that the config needs; {regen}"),
        );
    }
    let (acting_holder, acting_file, where_) = match &registrations.acting {
        Some(acting) => {
            if acting.url.is_some() {
                problem(
                    &acting_path,
                    "url must be null: the homeserver must push nothing for these users".into(),
                );
            }
            if acting.id == pushed.id || acting.as_token == pushed.as_token {
                problem(
                    &acting_path,
                    format!("id and as_token must differ from the pushed registration's; {regen}"),
                );
            }
            (acting, &acting_path, String::new())
        }
        // A legacy single registration holds the acting namespaces too.
        None => (
            pushed,
            &pushed_path,
            format!(
                ", and there is no acting registration at {}",
                acting_path.display()
            ),
        ),
    };
    for regex in missing(acting_holder, legacy_namespaces(config)) {
        problem(
            acting_file,
            format!("the namespaces lack {regex} that the config needs{where_}; {regen}"),
        );
    }
    problems
}

/// The regexes the pushed registration must hold.
fn pushed_shape(config: &Config) -> Vec<String> {
    pushed(config)
        .map(|r| {
            r.namespaces
                .users
                .into_iter()
                .chain(r.namespaces.aliases)
                .map(|n| n.regex)
                .collect()
        })
        .unwrap_or_default()
}

/// A user roster acts as with the acting registration's token (when it has one).
pub fn acts_with_acting_token(config: &Config, user: &ruma::UserId) -> bool {
    let ids = config.ids();
    user.server_name() == ids.server_name
        && (user.localpart().starts_with(IDENTITY_PREFIX)
            || ids.acting_members().any(|m| m == user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_not_show_tokens_when_debug_printed() {
        let pair =
            generate(&Config::from_yaml("homeserver: {server_name: ex.org}").unwrap()).unwrap();
        let shown = format!("{pair:?}");
        for token in [
            &pair.pushed.as_token,
            &pair.pushed.hs_token,
            &pair.acting.as_ref().unwrap().as_token,
            &pair.acting.as_ref().unwrap().hs_token,
        ] {
            assert!(!shown.contains(token.as_str()), "{shown}");
        }
        assert!(shown.contains(pair.pushed.id.as_str()), "{shown}");
    }

    fn config_in(dir: &Path) -> Config {
        Config::from_yaml(&format!(
            "homeserver: {{server_name: my.example.org}}\nappservice: {{registration: {}}}\nagents: {{required_members: ['@admin:my.example.org', '@ops:elsewhere.org']}}",
            dir.join("registration.yaml").display()
        ))
        .unwrap()
    }

    fn config() -> Config {
        config_in(Path::new("/etc/roster"))
    }

    fn regexes(registration: &Registration) -> Vec<(&str, bool)> {
        registration
            .namespaces
            .users
            .iter()
            .map(|n| (n.regex.as_str(), n.exclusive))
            .collect()
    }

    #[test]
    fn should_split_pushed_and_acting_namespaces() {
        let pair = generate(&config()).unwrap();
        let pushed = &pair.pushed;
        assert_eq!(
            regexes(pushed),
            vec![
                (r"^@agent_.*:my\.example\.org$", true),
                (r"^@letta:my\.example\.org$", true),
            ]
        );
        assert_eq!(
            pushed.namespaces.aliases[0].regex,
            r"^#agent_.*:my\.example\.org$"
        );
        assert!(pushed.namespaces.aliases[0].exclusive);
        assert_eq!(
            pushed.namespaces.aliases[1].regex,
            r"^#letta-agents:my\.example\.org$"
        );
        assert_eq!(pushed.sender_localpart, "letta");
        assert_eq!(pushed.rate_limited, Some(false));
        assert_eq!(pushed.url.as_deref(), Some("http://127.0.0.1:9009"));

        let acting = pair.acting.as_ref().unwrap();
        assert_eq!(acting.url, None, "the homeserver pushes nothing for it");
        assert_eq!(acting.id, "roster-acting");
        assert_eq!(acting.sender_localpart, "letta-acting");
        assert_eq!(
            regexes(acting),
            vec![
                (r"^@admin:my\.example\.org$", false),
                (r"^@nova-.*:my\.example\.org$", false),
            ]
        );
        assert!(acting.namespaces.aliases.is_empty());
        // url: null is written, as Synapse requires the key.
        let yaml = serde_yaml::to_string(acting).unwrap();
        assert!(yaml.contains("url: null"), "{yaml}");
        assert!(check(&config(), &pair).is_empty());
    }

    #[test]
    fn should_make_distinct_url_safe_tokens() {
        let pair = generate(&config()).unwrap();
        let acting = pair.acting.unwrap();
        let tokens = [
            &pair.pushed.as_token,
            &pair.pushed.hs_token,
            &acting.as_token,
            &acting.hs_token,
        ];
        for token in tokens {
            assert!(token.len() >= 43, "32 bytes encode to 43 characters");
            assert!(
                token
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            );
        }
        let distinct: std::collections::BTreeSet<_> = tokens.iter().collect();
        assert_eq!(distinct.len(), 4);
    }

    #[test]
    fn should_refuse_a_url_the_homeserver_cannot_reach() {
        let listening_everywhere = Config::from_yaml(
            "homeserver: {server_name: ex.org}\nappservice: {listen: '0.0.0.0:9009'}",
        )
        .unwrap();
        let error = generate(&listening_everywhere).err().unwrap().to_string();
        assert!(
            error.contains("appservice.url") && error.contains("0.0.0.0"),
            "{error}"
        );
        let with_url = Config::from_yaml(
            "homeserver: {server_name: ex.org}\nappservice: {listen: '[::]:9009', url: 'http://roster:9009'}",
        )
        .unwrap();
        assert_eq!(
            generate(&with_url).unwrap().pushed.url.as_deref(),
            Some("http://roster:9009")
        );
    }

    #[test]
    fn should_write_the_pair_0600_and_read_it_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let (pushed_path, acting_path) = (
            config.appservice.registration.clone(),
            config.appservice.acting_registration_path(),
        );
        assert_eq!(acting_path, dir.path().join("registration-acting.yaml"));
        let first = generate(&config).unwrap();
        write_pair(&pushed_path, &acting_path, &first, false).unwrap();
        for path in [&pushed_path, &acting_path] {
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let second = generate(&config).unwrap();
        let err = write_pair(&pushed_path, &acting_path, &second, false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        let read_back = read(&config).unwrap();
        assert_eq!(read_back.pushed.as_token, first.pushed.as_token);
        assert_eq!(
            read_back.acting.unwrap().as_token,
            first.acting.unwrap().as_token
        );
        std::fs::set_permissions(&pushed_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_pair(&pushed_path, &acting_path, &second, true).unwrap();
        assert_eq!(
            read(&config).unwrap().pushed.as_token,
            second.pushed.as_token
        );
        let mode = std::fs::metadata(&pushed_path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    /// A registration that is there but cannot be read is not fixed by generating a new
    /// one (that would change the tokens the homeserver holds): the error says so.
    #[test]
    fn should_not_ask_for_new_tokens_when_a_registration_exists_but_cannot_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let missing = read(&config).unwrap_err().to_string();
        assert!(missing.contains("roster registration"), "{missing}");
        // A directory where the file should be: unreadable for every user, root included.
        std::fs::create_dir(&config.appservice.registration).unwrap();
        let unreadable = read(&config).unwrap_err().to_string();
        assert!(
            !unreadable.contains("roster registration") && unreadable.contains("owner and mode"),
            "{unreadable}"
        );
    }

    /// A registration written before the pair existed (one file with every namespace) keeps
    /// working; one missing a namespace the config needs is refused, naming it.
    #[test]
    fn should_accept_a_legacy_single_registration_and_name_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let pair = generate(&config).unwrap();
        let mut legacy = pair.pushed.clone();
        legacy
            .namespaces
            .users
            .extend(pair.acting.unwrap().namespaces.users);
        write(&config.appservice.registration, &legacy, false).unwrap();
        let read_back = read(&config).unwrap();
        assert!(read_back.acting.is_none());
        assert!(read_back.describe().contains("legacy"));

        let mut short = legacy.clone();
        short.namespaces.users.retain(|n| !n.regex.contains("nova"));
        write(&config.appservice.registration, &short, true).unwrap();
        let error = read(&config).unwrap_err().to_string();
        assert!(
            error.contains("nova") && error.contains("--force"),
            "{error}"
        );

        let mut wrong_url = legacy;
        wrong_url.url = Some("http://0.0.0.0:9009".into());
        let problems = check(
            &config,
            &Registrations {
                pushed: wrong_url,
                acting: None,
            },
        );
        assert!(
            problems
                .iter()
                .any(|(_, m)| m.contains("cannot be reached") && m.contains("appservice.url")),
            "{problems:?}"
        );
    }

    /// The top-level example registrations have exactly the shape `roster registration`
    /// writes for config.example.yaml (only the tokens are placeholders).
    #[test]
    fn should_match_the_example_registrations() {
        let config =
            Config::from_yaml(include_str!("../config.example.yaml")).expect("the example loads");
        let mut generated = generate(&config).unwrap();
        let parse = |text: &str| serde_yaml::from_str::<Registration>(text).unwrap();
        let pushed = parse(include_str!("../registration.yaml"));
        let acting = parse(include_str!("../registration-acting.yaml"));
        generated.pushed.as_token = pushed.as_token.clone();
        generated.pushed.hs_token = pushed.hs_token.clone();
        let silent = generated.acting.as_mut().unwrap();
        silent.as_token = acting.as_token.clone();
        silent.hs_token = acting.hs_token.clone();
        let yaml = |r: &Registration| serde_yaml::to_string(r).unwrap();
        assert_eq!(yaml(&pushed), yaml(&generated.pushed));
        assert_eq!(yaml(&acting), yaml(generated.acting.as_ref().unwrap()));
        assert!(
            check(
                &config,
                &Registrations {
                    pushed,
                    acting: Some(acting)
                }
            )
            .is_empty()
        );
    }
}
