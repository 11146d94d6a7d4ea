//! Builds the one typed configuration from a YAML file and the environment, and rejects a
//! wrong value before anything starts.
//!
//! Precedence, lowest first: built-in defaults, the YAML file, the legacy variable names of
//! the systems roster replaces (`MATRIX_*`, `KAFKA_*`, `LETTA_*`), then
//! `ROSTER_<SECTION>__<KEY>`. Every error names the key (and the variable it came from),
//! the value, and what is expected, on one line. Environment values are taken verbatim
//! unless the key's type needs them read as YAML (numbers, booleans, lists, mappings).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

pub use crate::ids::Identities;
use crate::ids::{IdPart, IdsError};

/// The validation sweep reads every room; it may never run more often than this.
pub const MIN_SYNC_INTERVAL: Duration = Duration::from_secs(60);
/// Below this, a transaction the homeserver retries late could be applied twice.
pub const MIN_TXN_RETENTION: Duration = Duration::from_secs(3600);

/// Legacy environment variables and the key each one sets.
///
/// They keep the ConfigMaps of the replaced agent-sync bot and lifecycle consumer working.
const LEGACY_ENV: &[(&str, &str, &str)] = &[
    ("MATRIX_HOMESERVER_URL", "homeserver", "url"),
    ("MATRIX_SERVER_NAME", "homeserver", "server_name"),
    ("MATRIX_ADMIN_TOKEN", "homeserver", "admin_token"),
    ("MATRIX_ENABLED", "lifecycle", "matrix_enabled"),
    ("MATRIX_AGENT_SYNC_INTERVAL", "sync", "interval"),
    ("KAFKA_ENABLED", "lifecycle", "enabled"),
    ("KAFKA_BROKERS", "lifecycle", "brokers"),
    ("KAFKA_IDENTITY_EVENTS_TOPIC", "lifecycle", "topic"),
    ("KAFKA_CONSUMER_GROUP_ID", "lifecycle", "group_id"),
    ("LETTA_API_URL", "agents", "letta_url"),
    ("LETTA_TOKEN", "agents", "letta_token"),
];

const ENV_PREFIX: &str = "ROSTER_";

/// A configuration that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; check the path given with -c")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {} is not valid YAML: {}", one_line(&.path.display().to_string()), one_line(&.source.to_string()))]
    Yaml {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("config key {}{origin}: {}", one_line(.key), one_line(.message))]
    Invalid {
        key: String,
        origin: Origin,
        message: String,
    },
}

/// Where a key's value came from, so an error can point at the variable to fix.
#[derive(Debug, Clone, Default)]
pub struct Origin(Option<String>);

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(var) => write!(f, " (from {})", one_line(var)),
            None => Ok(()),
        }
    }
}

/// `text` on one line: an error is one line per problem, even when a key, a value or a
/// variable name from the file holds a line break.
fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains(|c: char| c.is_control()) {
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        text.into()
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub homeserver: HomeserverConfig,
    pub appservice: AppserviceConfig,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub agents: AgentsConfig,
    pub sync: SyncConfig,
    pub lifecycle: LifecycleConfig,
    /// Derived by `validate`; every constructor of a `Config` validates.
    #[serde(skip)]
    ids: Option<Identities>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    #[default]
    Auto,
    Synapse,
    Tuwunel,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HomeserverConfig {
    #[serde(deserialize_with = "string_like")]
    pub url: String,
    /// Required: there is no sensible default for the server name.
    #[serde(deserialize_with = "optional_string_like")]
    pub server_name: Option<String>,
    pub flavor: Flavor,
    #[serde(deserialize_with = "optional_secret")]
    pub admin_token: Option<Secret>,
    /// Upper bound on any single homeserver request.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub request_timeout: Duration,
    /// Requests in flight to the homeserver at once, across all work.
    pub max_concurrent_requests: usize,
}

impl Default for HomeserverConfig {
    fn default() -> Self {
        HomeserverConfig {
            url: "http://127.0.0.1:8008".into(),
            server_name: None,
            flavor: Flavor::Auto,
            admin_token: None,
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 16,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppserviceConfig {
    /// The appservice id written into a generated registration.
    #[serde(deserialize_with = "string_like")]
    pub id: String,
    pub registration: PathBuf,
    /// The acting-only registration (`url: null`): users roster acts as but never needs to
    /// hear about. Default: beside `registration`, with `-acting` before the extension.
    pub acting_registration: Option<PathBuf>,
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
    #[serde(deserialize_with = "optional_string_like")]
    pub url: Option<String>,
    #[serde(deserialize_with = "string_like")]
    pub bot_localpart: String,
    /// Largest transaction body accepted, in bytes; larger ones get 413.
    pub max_body_bytes: usize,
    /// Transaction ids older than this are forgotten.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub txn_retention: Duration,
    /// At most this many transaction ids are remembered.
    pub txn_max_ids: usize,
}

impl Default for AppserviceConfig {
    fn default() -> Self {
        AppserviceConfig {
            id: "roster".into(),
            registration: "registration.yaml".into(),
            acting_registration: None,
            listen: "127.0.0.1:9009".parse().expect("valid default address"),
            url: None,
            bot_localpart: "letta".into(),
            max_body_bytes: 16 * 1024 * 1024,
            txn_retention: Duration::from_secs(7 * 24 * 3600),
            txn_max_ids: 100_000,
        }
    }
}

impl AppserviceConfig {
    /// Where the acting-only registration is (`acting_registration`, else
    /// `registration.yaml` -> `registration-acting.yaml`).
    pub fn acting_registration_path(&self) -> PathBuf {
        self.acting_registration.clone().unwrap_or_else(|| {
            let stem = self
                .registration
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "registration".into());
            let ext = self
                .registration
                .extension()
                .map(|e| format!(".{}", e.to_string_lossy()))
                .unwrap_or_default();
            self.registration
                .with_file_name(format!("{stem}-acting{ext}"))
        })
    }

    /// How the homeserver reaches roster: `url`, else derived from `listen`.
    pub fn public_url(&self) -> String {
        self.url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
    #[serde(deserialize_with = "optional_secret")]
    pub token: Option<Secret>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9010".parse().expect("valid default address"),
            token: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub path: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: "roster.db".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsConfig {
    #[serde(deserialize_with = "optional_string_like")]
    pub letta_url: Option<String>,
    #[serde(deserialize_with = "optional_secret")]
    pub letta_token: Option<Secret>,
    pub file: Option<PathBuf>,
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub poll_interval: Duration,
    /// Full user ids; `@admin:<server_name>` when not configured.
    pub required_members: Option<Vec<String>>,
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub removal_grace: Duration,
    /// Deactivate the user of an agent removed past the grace period.
    pub deactivate_removed: bool,
    /// Alias localpart of the space holding every agent room.
    #[serde(deserialize_with = "string_like")]
    pub space_alias: String,
    #[serde(deserialize_with = "string_like")]
    pub space_name: String,
    /// The picture of every agent: generated (default), none, or one image for all.
    pub avatar: AvatarSetting,
    /// The last N Letta messages posted into a room roster creates; 0 turns it off.
    pub history_import: u32,
}

/// `agents.avatar`: what picture agents get.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AvatarSetting {
    /// The name's first letter on a colour derived from the agent id.
    #[default]
    Generated,
    /// roster sets no avatar.
    None,
    /// One image for every agent: an `mxc://` URI, or an `https://` URL fetched once.
    Image(String),
}

impl Serialize for AvatarSetting {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AvatarSetting::Generated => s.serialize_str("generated"),
            AvatarSetting::None => s.serialize_str("none"),
            AvatarSetting::Image(url) => s.serialize_str(url),
        }
    }
}

impl<'de> Deserialize<'de> for AvatarSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = string_like(d)?;
        match text.as_str() {
            "generated" => Ok(AvatarSetting::Generated),
            "none" => Ok(AvatarSetting::None),
            url if url.starts_with("mxc://") && <&ruma::MxcUri>::from(url).is_valid()
                || url.starts_with("https://")
                || url.starts_with("http://") =>
            {
                Ok(AvatarSetting::Image(url.to_owned()))
            }
            other => Err(de::Error::custom(format!(
                "{other:?} is not an avatar setting; expected generated, none, an mxc:// URI or an https:// URL"
            ))),
        }
    }
}

impl Default for AgentsConfig {
    fn default() -> Self {
        AgentsConfig {
            letta_url: None,
            letta_token: None,
            file: None,
            poll_interval: Duration::from_secs(60),
            required_members: None,
            removal_grace: Duration::from_secs(2 * 3600),
            deactivate_removed: false,
            space_alias: "letta-agents".into(),
            space_name: "Letta Agents".into(),
            avatar: AvatarSetting::Generated,
            history_import: 15,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub interval: Duration,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            interval: Duration::from_secs(600),
        }
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    pub enabled: bool,
    #[serde(deserialize_with = "string_like")]
    pub brokers: String,
    #[serde(deserialize_with = "string_like")]
    pub topic: String,
    #[serde(deserialize_with = "string_like")]
    pub group_id: String,
    /// `<topic>.dlq` when not set.
    #[serde(deserialize_with = "optional_string_like")]
    pub dead_letter_topic: Option<String>,
    pub matrix_enabled: bool,
    /// A profile update for a user who does not exist yet creates the user first.
    pub create_missing_users: bool,
    /// Largest avatar fetched from an `http(s)://` URL, in bytes.
    pub avatar_max_bytes: usize,
    /// Upper bound on fetching one avatar.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub avatar_fetch_timeout: Duration,
    /// Identity avatars may be fetched from private, loopback and link-local addresses.
    /// Off: a profile's avatar URL is the user's choice and must not reach inside.
    pub avatar_allow_private: bool,
    /// Users whose events are applied at once; one user's events are applied in order.
    pub max_in_flight_users: usize,
    /// Messages received but not yet done, across partitions; beyond it none is taken.
    pub max_buffered_events: usize,
    /// Where a consumer group with no committed offsets starts.
    pub start_from: StartFrom,
    /// An `http(s)` avatar URL already uploaded is reused (not fetched again) this long.
    #[serde(deserialize_with = "duration", serialize_with = "show_duration")]
    pub avatar_cache_ttl: Duration,
    /// Extra librdkafka properties (e.g. `security.protocol`, `session.timeout.ms`).
    #[serde(deserialize_with = "string_map")]
    pub kafka: BTreeMap<String, String>,
}

/// Shows the `kafka` property names but none of their values: librdkafka properties carry
/// credentials under many names (`sasl.password`, `ssl.key.password`,
/// `sasl.oauthbearer.client.secret`, `ssl.key.pem`, ...), so none is printed.
impl fmt::Debug for LifecycleConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so a new field cannot be left out of (or leak through) this impl.
        let LifecycleConfig {
            enabled,
            brokers,
            topic,
            group_id,
            dead_letter_topic,
            matrix_enabled,
            create_missing_users,
            avatar_max_bytes,
            avatar_fetch_timeout,
            avatar_allow_private,
            max_in_flight_users,
            max_buffered_events,
            start_from,
            avatar_cache_ttl,
            kafka,
        } = self;
        struct Redacted<'a>(&'a BTreeMap<String, String>);
        impl fmt::Debug for Redacted<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map()
                    .entries(self.0.keys().map(|k| (k, format_args!("<redacted>"))))
                    .finish()
            }
        }
        f.debug_struct("LifecycleConfig")
            .field("enabled", enabled)
            .field("brokers", brokers)
            .field("topic", topic)
            .field("group_id", group_id)
            .field("dead_letter_topic", dead_letter_topic)
            .field("matrix_enabled", matrix_enabled)
            .field("create_missing_users", create_missing_users)
            .field("avatar_max_bytes", avatar_max_bytes)
            .field("avatar_fetch_timeout", avatar_fetch_timeout)
            .field("avatar_allow_private", avatar_allow_private)
            .field("max_in_flight_users", max_in_flight_users)
            .field("max_buffered_events", max_buffered_events)
            .field("start_from", start_from)
            .field("avatar_cache_ttl", avatar_cache_ttl)
            .field("kafka", &Redacted(kafka))
            .finish()
    }
}

/// Where a new consumer group starts reading `lifecycle.topic`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// Everything the topic still retains: nothing is lost (the default).
    #[default]
    Earliest,
    /// Only what arrives from now on: for a cutover from another consumer.
    Latest,
}

/// librdkafka properties roster sets itself; `lifecycle.kafka` may not override them.
pub const RESERVED_KAFKA_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
];

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            enabled: false,
            brokers: "127.0.0.1:9092".into(),
            topic: "nova.identity.events".into(),
            group_id: "roster".into(),
            dead_letter_topic: None,
            matrix_enabled: true,
            create_missing_users: true,
            avatar_max_bytes: 5 * 1024 * 1024,
            avatar_fetch_timeout: Duration::from_secs(10),
            avatar_allow_private: false,
            max_in_flight_users: 16,
            max_buffered_events: 1024,
            start_from: StartFrom::Earliest,
            avatar_cache_ttl: Duration::from_secs(24 * 3600),
            kafka: BTreeMap::new(),
        }
    }
}

impl LifecycleConfig {
    /// The bounds of the lifecycle keys; the error names the key.
    fn check(&self) -> Result<(), (&'static str, String)> {
        if self.max_in_flight_users == 0 {
            return Err((
                "lifecycle.max_in_flight_users",
                "0 would apply no event; expected at least 1, e.g. 16".into(),
            ));
        }
        if self.max_buffered_events < self.max_in_flight_users {
            return Err((
                "lifecycle.max_buffered_events",
                format!(
                    "{} is below lifecycle.max_in_flight_users ({}); expected at least that, e.g. 1024",
                    self.max_buffered_events, self.max_in_flight_users
                ),
            ));
        }
        if !(1024..=100 * 1024 * 1024).contains(&self.avatar_max_bytes) {
            return Err((
                "lifecycle.avatar_max_bytes",
                format!(
                    "{} is out of range; expected between 1024 and 104857600 bytes, e.g. 5242880",
                    self.avatar_max_bytes
                ),
            ));
        }
        if self.avatar_fetch_timeout.is_zero() {
            return Err((
                "lifecycle.avatar_fetch_timeout",
                "0 would fail every avatar fetch; expected e.g. 10s".into(),
            ));
        }
        if let Some(key) = self
            .kafka
            .keys()
            .find(|k| RESERVED_KAFKA_PROPERTIES.contains(&k.as_str()))
        {
            return Err((
                "lifecycle.kafka",
                format!(
                    "{key:?} is set by roster itself; use lifecycle.brokers, lifecycle.group_id or lifecycle.start_from instead"
                ),
            ));
        }
        Ok(())
    }
}

/// A credential: never printed by `Debug`, never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Shown (in an example or a dump of the config) as a placeholder, never as the value.
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<secret>")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Config {
    /// Reads `path` (a missing default file is an empty one), applies `env`, validates.
    pub fn load(
        path: &Path,
        path_was_given: bool,
        env: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let mut tree = match std::fs::read_to_string(path) {
            Ok(text) => {
                let value: Value =
                    serde_yaml::from_str(&text).map_err(|source| ConfigError::Yaml {
                        path: path.to_owned(),
                        source,
                    })?;
                match value {
                    Value::Null => Mapping::new(),
                    Value::Mapping(map) => map,
                    _ => {
                        return Err(invalid(
                            "(top level)",
                            &Origin::default(),
                            "expected a mapping of sections (homeserver, appservice, ...)",
                        ));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !path_was_given => Mapping::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let file_read = !tree.is_empty() || path.exists();
        let env = apply_env(&mut tree, env)?;
        Self::from_tree(Value::Mapping(tree), &env).map_err(|error| match error {
            ConfigError::Invalid {
                key,
                origin,
                message,
            } if !file_read => ConfigError::Invalid {
                key,
                origin,
                message: format!(
                    "{message} (no config file was read: there is no {} here; pass -c FILE)",
                    path.display()
                ),
            },
            other => other,
        })
    }

    /// Parses a YAML text with no environment: for tests and tools.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        Self::from_yaml_with_env(text, &BTreeMap::new())
    }

    pub fn from_yaml_with_env(
        text: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let mut tree = match serde_yaml::from_str::<Value>(text) {
            Ok(Value::Mapping(map)) => map,
            Ok(Value::Null) => Mapping::new(),
            Ok(_) => {
                return Err(invalid(
                    "(top level)",
                    &Origin::default(),
                    "expected a mapping of sections",
                ));
            }
            Err(source) => {
                return Err(ConfigError::Yaml {
                    path: "(inline)".into(),
                    source,
                });
            }
        };
        let env = apply_env(&mut tree, env)?;
        Self::from_tree(Value::Mapping(tree), &env)
    }

    /// Deserializes `tree`. Environment values enter as strings; one whose key needs
    /// another type (a number, boolean, list or mapping) is read as YAML instead, so a
    /// secret like `abc #def`, `0x1F` or `~` stays exactly what was set.
    fn from_tree(mut tree: Value, env: &[EnvValue]) -> Result<Config, ConfigError> {
        let origins: BTreeMap<String, String> =
            env.iter().map(|e| (e.key(), e.var.clone())).collect();
        let mut as_yaml: Vec<String> = Vec::new();
        let config = loop {
            let attempt: Result<Config, _> = serde_path_to_error::deserialize(tree.clone());
            let err = match attempt {
                Ok(config) => break config,
                Err(err) => err,
            };
            let key = err.path().to_string();
            let retry = env
                .iter()
                .find(|e| e.key() == key && !as_yaml.contains(&key))
                .and_then(|e| Some((e, serde_yaml::from_str::<Value>(&e.raw).ok()?)));
            match retry {
                Some((e, value)) if value != Value::String(e.raw.clone()) => {
                    set(&mut tree, &e.section, &e.name, value);
                    as_yaml.push(key);
                }
                _ => {
                    // An unknown section is reported by its name alone: find its variable.
                    let origin = origins
                        .get(&key)
                        .cloned()
                        .or_else(|| env.iter().find(|e| e.section == key).map(|e| e.var.clone()));
                    return Err(ConfigError::Invalid {
                        origin: Origin(origin),
                        key,
                        message: err.into_inner().to_string(),
                    });
                }
            }
        };
        let ids = config.check(&origins)?;
        Ok(Config {
            ids: Some(ids),
            ..config
        })
    }

    /// The identities every other part of roster uses, typed once.
    pub fn ids(&self) -> &Identities {
        self.ids
            .as_ref()
            .expect("every Config is built by load or from_yaml, which validate it")
    }

    /// Checks every key; returns the identities derived from them.
    fn check(&self, origins: &BTreeMap<String, String>) -> Result<Identities, ConfigError> {
        fn is_http_url(url: &str) -> bool {
            reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
        }
        let fail = |key: &str, message: String| {
            Err(ConfigError::Invalid {
                key: key.to_owned(),
                origin: Origin(origins.get(key).cloned()),
                message,
            })
        };
        let url = &self.homeserver.url;
        if !is_http_url(url) {
            return fail(
                "homeserver.url",
                format!("{url:?} is not an http(s) URL; expected e.g. http://127.0.0.1:8008"),
            );
        }
        if self.homeserver.server_name.is_none() {
            return fail(
                "homeserver.server_name",
                "is missing; set it to the homeserver's server name, e.g. example.org".into(),
            );
        }
        if self.homeserver.max_concurrent_requests == 0 {
            return fail(
                "homeserver.max_concurrent_requests",
                "0 would stop all work; expected at least 1".into(),
            );
        }
        if self.homeserver.request_timeout.is_zero() {
            return fail(
                "homeserver.request_timeout",
                "0 would fail every request; expected e.g. 30s".into(),
            );
        }
        let ids = Identities::new(
            self.homeserver.server_name.as_deref().unwrap_or_default(),
            &self.appservice.bot_localpart,
            self.agents.required_members.as_deref(),
            &self.agents.space_alias,
        )
        .or_else(|error| {
            let key = match error {
                IdsError::ServerName(_) => "homeserver.server_name",
                IdsError::BotLocalpart(_) => "appservice.bot_localpart",
                IdsError::RequiredMember { .. } => "agents.required_members",
                IdsError::SpaceAlias(_) => "agents.space_alias",
                IdsError::TooLong { what, .. } => match what {
                    IdPart::BotLocalpart => "appservice.bot_localpart",
                    IdPart::SpaceAlias => "agents.space_alias",
                },
            };
            fail(key, error.to_string())
        })?;
        if self.homeserver.flavor == Flavor::Tuwunel && self.homeserver.admin_token.is_none() {
            return fail(
                "homeserver.admin_token",
                "is missing; flavor tuwunel needs an admin token to deactivate users (MATRIX_ADMIN_TOKEN)"
                    .into(),
            );
        }
        if let Some(url) = &self.appservice.url
            && !is_http_url(url)
        {
            return fail(
                "appservice.url",
                format!(
                    "{url:?} is not an http(s) URL; expected how the homeserver reaches roster, e.g. http://roster:9009"
                ),
            );
        }
        if self.appservice.txn_max_ids == 0 {
            return fail(
                "appservice.txn_max_ids",
                "0 would forget every transaction id, and a retried transaction would be applied twice; expected at least 1 (default 100000)".into(),
            );
        }
        if self.appservice.txn_retention < MIN_TXN_RETENTION {
            return fail(
                "appservice.txn_retention",
                format!(
                    "{:?} is below the minimum of 1h: the homeserver may retry a transaction after roster forgot it; default 7d",
                    self.appservice.txn_retention
                ),
            );
        }
        if self.appservice.id.is_empty() {
            return fail("appservice.id", "is empty; expected e.g. roster".into());
        }
        if self.appservice.max_body_bytes < 1024 {
            return fail(
                "appservice.max_body_bytes",
                format!(
                    "{} is too small for any transaction; expected at least 1024",
                    self.appservice.max_body_bytes
                ),
            );
        }
        if self.appservice.listen == self.admin.listen {
            return fail(
                "admin.listen",
                format!(
                    "{} is also appservice.listen; the admin listener needs its own address",
                    self.admin.listen
                ),
            );
        }
        // SQLite takes "" for a temporary database and ":memory:" for one in memory: roster
        // would run and acknowledge transactions with nothing kept across a restart.
        let store = self.store.path.as_os_str();
        if store.is_empty() || store == ":memory:" {
            return fail(
                "store.path",
                format!(
                    "{:?} {}; expected a file that survives restarts, e.g. /var/lib/roster/roster.db (default roster.db)",
                    self.store.path.display().to_string(),
                    if store.is_empty() {
                        "is empty, which SQLite takes for a temporary database"
                    } else {
                        "is an in-memory database"
                    }
                ),
            );
        }
        if self.sync.interval < MIN_SYNC_INTERVAL {
            return fail(
                "sync.interval",
                format!(
                    "{:?} is below the minimum of 60s; the sweep reads every room, keep it slow",
                    self.sync.interval
                ),
            );
        }
        if let Some(url) = &self.agents.letta_url
            && !is_http_url(url)
        {
            return fail(
                "agents.letta_url",
                format!("{url:?} is not an http(s) URL; expected e.g. http://letta:8283"),
            );
        }
        if self.agents.letta_url.is_some() && self.agents.file.is_some() {
            let letta_url = match origins.get("agents.letta_url") {
                Some(var) => format!("agents.letta_url (from {var})"),
                None => "agents.letta_url".to_owned(),
            };
            return fail(
                "agents.file",
                format!("is set as well as {letta_url}; agents come from one source: unset one"),
            );
        }
        if self.agents.poll_interval < Duration::from_secs(1) {
            return fail(
                "agents.poll_interval",
                "is below 1s; expected e.g. 60s".into(),
            );
        }
        if self.lifecycle.enabled {
            for (key, value) in [
                ("lifecycle.brokers", &self.lifecycle.brokers),
                ("lifecycle.topic", &self.lifecycle.topic),
                ("lifecycle.group_id", &self.lifecycle.group_id),
            ] {
                if value.trim().is_empty() {
                    return fail(key, "is empty while lifecycle.enabled is true".into());
                }
            }
        }
        if let Err((key, message)) = self.lifecycle.check() {
            return fail(key, message);
        }
        if self.dead_letter_topic() == self.lifecycle.topic {
            return fail(
                "lifecycle.dead_letter_topic",
                format!(
                    "{:?} is also lifecycle.topic; dead letters need their own topic, e.g. {}.dlq",
                    self.lifecycle.topic, self.lifecycle.topic
                ),
            );
        }
        Ok(ids)
    }

    /// The dead-letter topic, `<topic>.dlq` unless configured.
    pub fn dead_letter_topic(&self) -> String {
        self.lifecycle
            .dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.lifecycle.topic))
    }
}

fn invalid(key: &str, origin: &Origin, message: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        origin: origin.clone(),
        message: message.into(),
    }
}

/// One environment variable that sets a config key.
struct EnvValue {
    var: String,
    section: String,
    name: String,
    /// Exactly as set: `from_tree` decides whether the key's type needs it read as YAML.
    raw: String,
}

impl EnvValue {
    fn key(&self) -> String {
        format!("{}.{}", self.section, self.name)
    }
}

/// Writes environment overrides into the YAML tree as strings; returns them in order of
/// precedence (legacy names first, `ROSTER_*` last so it wins).
fn apply_env(
    tree: &mut Mapping,
    env: &BTreeMap<String, String>,
) -> Result<Vec<EnvValue>, ConfigError> {
    let mut overrides: Vec<EnvValue> = Vec::new();
    for (var, section, name) in LEGACY_ENV {
        if let Some(value) = env.get(*var) {
            overrides.push(EnvValue {
                var: var.to_string(),
                section: section.to_string(),
                name: name.to_string(),
                raw: value.clone(),
            });
        }
    }
    for (var, value) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let Some((section, name)) = rest.split_once("__") else {
            // ROSTER_LOG and similar are not config keys.
            continue;
        };
        overrides.push(EnvValue {
            var: var.clone(),
            section: section.to_ascii_lowercase(),
            name: name.to_ascii_lowercase(),
            raw: value.clone(),
        });
    }
    for e in &overrides {
        let entry = tree
            .entry(Value::String(e.section.clone()))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        // A tag on a section (`homeserver: !tag {...}`) means nothing to roster, and the
        // struct is read through it anyway; drop it, or the override below would not land.
        if let Value::Tagged(tagged) = entry {
            *entry = std::mem::replace(&mut tagged.value, Value::Null);
        }
        if entry.is_null() {
            *entry = Value::Mapping(Mapping::new());
        }
        if !entry.is_mapping() {
            return Err(invalid(
                &e.section,
                &Origin(Some(e.var.clone())),
                "the file sets this section to a scalar; expected a mapping",
            ));
        }
        set_in(entry, &e.name, Value::String(e.raw.clone()));
    }
    // A later variable for the same key wins: keep only the last one.
    let mut seen = std::collections::HashSet::new();
    let mut kept: Vec<EnvValue> = overrides
        .into_iter()
        .rev()
        .filter(|e| seen.insert(e.key()))
        .collect();
    kept.reverse();
    Ok(kept)
}

/// The config's sections, as `ROSTER_<SECTION>__<KEY>` names them.
const SECTIONS: &[&str] = &[
    "homeserver",
    "appservice",
    "admin",
    "store",
    "agents",
    "sync",
    "lifecycle",
];

/// `ROSTER_*` variables that are set but not read, each with why: a config override needs
/// two underscores between section and key (`ROSTER_SYNC__INTERVAL`), and one is easily
/// typed as one. Warnings, not errors: the environment is shared with other software.
pub fn unread_env_vars(env: &BTreeMap<String, String>) -> Vec<String> {
    // Read by the CLI, the log set-up, the scripts and fault tests, not by the config.
    const OTHER_USES: &[&str] = &["LOG", "LOG_FORMAT", "ADMIN_URL", "CACHE", "COMMIT"];
    // Kubernetes service links (a Service named roster or roster-*): ROSTER_SERVICE_HOST,
    // ROSTER_PORT, ROSTER_PORT_9009_TCP_ADDR, ...
    fn is_service_link(rest: &str) -> bool {
        rest == "PORT"
            || rest.ends_with("_PORT")
            || rest.starts_with("SERVICE_")
            || rest.contains("_SERVICE_")
            || rest
                .split("PORT_")
                .skip(1)
                .any(|after| after.starts_with(|c: char| c.is_ascii_digit()))
    }
    env.keys()
        .filter_map(|var| {
            let rest = var.strip_prefix(ENV_PREFIX)?;
            if rest.contains("__")
                || OTHER_USES.contains(&rest)
                || rest.starts_with("FAULT_")
                || is_service_link(rest)
            {
                return None;
            }
            let lower = rest.to_ascii_lowercase();
            let section = SECTIONS.iter().find(|s| {
                lower
                    .strip_prefix(**s)
                    .is_some_and(|after| after.starts_with('_') && after.len() > 1)
            });
            Some(match section {
                Some(section) => format!(
                    "{var} is not read: an override names section and key with two underscores, \
                     e.g. {ENV_PREFIX}{}__{}",
                    section.to_ascii_uppercase(),
                    &rest[section.len() + 1..]
                ),
                None => format!(
                    "{var} is not a roster setting and is not read; overrides look like \
                     {ENV_PREFIX}<SECTION>__<KEY>"
                ),
            })
        })
        .collect()
}

/// Sets `section.name` in the tree (the section exists: `apply_env` made it).
fn set(tree: &mut Value, section: &str, name: &str, value: Value) {
    if let Some(entry) = tree.get_mut(section) {
        set_in(entry, name, value);
    }
}

fn set_in(section: &mut Value, name: &str, value: Value) {
    if let Value::Mapping(map) = section {
        map.insert(Value::String(name.to_owned()), value);
    }
}

/// Accepts `90s`, `10m`, `2h`, `1d`, `250ms` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let expected =
        || format!("{text:?} is not a duration; expected e.g. 90s, 10m, 2h or a number of seconds");
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    // A fraction of a second, as the old bot's MATRIX_AGENT_SYNC_INTERVAL=0.5 was written.
    if unit.starts_with('.') {
        return text
            .trim_end_matches('s')
            .parse::<f64>()
            .ok()
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .ok_or_else(expected);
    }
    let amount: u64 = digits.parse().map_err(|_| expected())?;
    let seconds_per_unit = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "ms" => return Ok(Duration::from_millis(amount)),
        _ => return Err(expected()),
    };
    amount
        .checked_mul(seconds_per_unit)
        .map(Duration::from_secs)
        .ok_or_else(expected)
}

/// A duration the way an operator writes it: `2h`, `10m`, `90s`, `250ms`.
fn show_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    let text = match (d.as_secs(), d.subsec_millis()) {
        (0, ms) => format!("{ms}ms"),
        (secs, 0) if secs % 3600 == 0 => format!("{}h", secs / 3600),
        (secs, 0) if secs % 60 == 0 => format!("{}m", secs / 60),
        (secs, 0) => format!("{secs}s"),
        _ => format!("{}ms", d.as_millis()),
    };
    s.serialize_str(&text)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let value = Value::deserialize(d)?;
    let text = match &value {
        Value::Number(n) if n.as_u64().is_some() || n.as_f64().is_some_and(|f| f >= 0.0) => {
            n.to_string()
        }
        Value::String(s) => s.clone(),
        other => {
            return Err(de::Error::custom(format!(
                "{} is not a duration; expected e.g. 90s, 10m, 2h or a number of seconds",
                scalar_text(other)
            )));
        }
    };
    parse_duration(&text).map_err(de::Error::custom)
}

/// A value as an error shows it: a scalar as written, anything larger by its kind (the
/// YAML of a mapping would span lines).
fn scalar_text(value: &Value) -> String {
    match value {
        Value::Mapping(_) => "a mapping".into(),
        Value::Sequence(_) => "a list".into(),
        Value::Tagged(tagged) => format!("a value tagged {}", tagged.tag),
        scalar => serde_yaml::to_string(scalar)
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "value".into()),
    }
}

/// Strings may arrive from the environment as YAML numbers or booleans (`LETTA_TOKEN=123`).
fn string_like<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(de::Error::custom(format!(
            "{} is not a string; expected a single value",
            scalar_text(&other)
        ))),
    }
}

/// An IP address and port to listen on; the error shows the value and the form.
fn listen_address<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = string_like(d)?;
    text.trim().parse().map_err(|_| {
        de::Error::custom(format!(
            "{text:?} is not an IP address and port; expected e.g. 127.0.0.1:9009 or \
             [::]:9009 (a host name such as localhost is not accepted)"
        ))
    })
}

fn optional_string_like<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        other => string_like(other).map(Some).map_err(de::Error::custom),
    }
}

/// A mapping of names to scalars, read as strings (`session.timeout.ms: 6000` works).
fn string_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(BTreeMap::new()),
        Value::Mapping(map) => map
            .into_iter()
            .map(|(k, v)| {
                let key = string_like(k).map_err(de::Error::custom)?;
                let value = string_like(v)
                    .map_err(|e: serde_yaml::Error| de::Error::custom(format!("{key}: {e}")))?;
                Ok((key, value))
            })
            .collect(),
        // Described by its kind only: the text may be properties with their credentials
        // (`sasl.password=...`) or a mapping cut short, and errors reach logs.
        other => Err(de::Error::custom(format!(
            "{} is not a mapping (its value is not shown: it may hold credentials); expected e.g. {{session.timeout.ms: 6000}}",
            kind_of(&other)
        ))),
    }
}

/// A value named by its kind alone, for values that may be secret.
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn optional_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    Ok(optional_string_like(d)?
        .filter(|s| !s.is_empty())
        .map(Secret))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const MINIMAL: &str = "homeserver:\n  server_name: example.org\n";

    /// An environment of `pairs`, for tests.
    pub(crate) fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn should_fill_defaults_from_a_minimal_file() {
        let config = Config::from_yaml(MINIMAL).unwrap();
        assert_eq!(config.homeserver.url, "http://127.0.0.1:8008");
        assert_eq!(config.appservice.public_url(), "http://127.0.0.1:9009");
        assert_eq!(config.sync.interval, Duration::from_secs(600));
        assert_eq!(config.dead_letter_topic(), "nova.identity.events.dlq");
        let ids = config.ids();
        assert_eq!(ids.bot, "@letta:example.org");
        assert_eq!(
            ids.required_members,
            vec!["@letta:example.org", "@admin:example.org"]
        );
    }

    #[test]
    fn should_read_the_contract_example() {
        let text = r#"
homeserver:
  url: http://127.0.0.1:8008
  server_name: example.org
  flavor: auto
  admin_token: null
appservice:
  registration: registration.yaml
  listen: 127.0.0.1:9009
  url: null
  bot_localpart: letta
admin:
  listen: 127.0.0.1:9010
  token: null
store:
  path: roster.db
agents:
  letta_url: null
  letta_token: null
  file: null
  poll_interval: 60s
  required_members: ["@admin:example.org"]
  removal_grace: 2h
sync:
  interval: 600s
lifecycle:
  enabled: false
  brokers: 127.0.0.1:9092
  topic: nova.identity.events
  group_id: roster
  dead_letter_topic: nova.identity.events.dlq
  matrix_enabled: true
"#;
        let config = Config::from_yaml(text).unwrap();
        assert_eq!(config.agents.removal_grace, Duration::from_secs(7200));
        assert!(config.lifecycle.matrix_enabled);
    }

    #[test]
    fn should_let_roster_variables_win_over_legacy_and_file() {
        let vars = env(&[
            ("MATRIX_HOMESERVER_URL", "http://legacy:8008"),
            ("ROSTER_HOMESERVER__URL", "http://new:8008"),
            ("MATRIX_AGENT_SYNC_INTERVAL", "900"),
            ("KAFKA_ENABLED", "true"),
            ("KAFKA_BROKERS", "k1:9092,k2:9092"),
            ("MATRIX_ENABLED", "false"),
            ("LETTA_TOKEN", "12345"),
            ("ROSTER_AGENTS__REQUIRED_MEMBERS", "[\"@ops:example.org\"]"),
            ("ROSTER_LOG", "debug"),
        ]);
        let config = Config::from_yaml_with_env(MINIMAL, &vars).unwrap();
        assert_eq!(config.homeserver.url, "http://new:8008");
        assert_eq!(config.sync.interval, Duration::from_secs(900));
        assert!(config.lifecycle.enabled);
        assert_eq!(config.lifecycle.brokers, "k1:9092,k2:9092");
        assert!(!config.lifecycle.matrix_enabled);
        assert_eq!(
            config.agents.letta_token.as_ref().unwrap().expose(),
            "12345"
        );
        assert_eq!(
            config.ids().required_members,
            vec!["@letta:example.org", "@ops:example.org"]
        );
    }

    #[test]
    fn should_parse_durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("1.5m").is_err());
        assert!(parse_duration("1.2.3").is_err());
        assert_eq!(parse_duration(".5"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("ten minutes").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("").is_err());
    }

    /// Each bad config fails with one line naming the key, the value and what is expected.
    #[test]
    fn should_reject_bad_configs_naming_key_value_and_expectation() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case] = &[
            (
                "homeserver: {}",
                &[],
                &["homeserver.server_name", "missing", "example.org"],
            ),
            (
                "homeserver: {server_name: example.org, url: 'ftp://x'}",
                &[],
                &["homeserver.url", "ftp://x", "http"],
            ),
            (
                "homeserver: {server_name: 'not a name!'}",
                &[],
                &["homeserver.server_name", "not a name!", "example.org"],
            ),
            (
                MINIMAL,
                &[("MATRIX_AGENT_SYNC_INTERVAL", "30")],
                &["sync.interval", "MATRIX_AGENT_SYNC_INTERVAL", "30s", "60s"],
            ),
            (
                // The old bot's cadence: a fraction of a second, below the minimum.
                MINIMAL,
                &[("MATRIX_AGENT_SYNC_INTERVAL", "0.5")],
                &[
                    "sync.interval",
                    "MATRIX_AGENT_SYNC_INTERVAL",
                    "500ms",
                    "below the minimum",
                    "60s",
                ],
            ),
            (
                "homeserver: {server_name: example.org}\nsync: {interval: soon}",
                &[],
                &["sync.interval", "soon", "90s"],
            ),
            (
                MINIMAL,
                &[("KAFKA_ENABLED", "maybe")],
                &["lifecycle.enabled", "KAFKA_ENABLED", "maybe", "boolean"],
            ),
            (
                "homeserver: {server_name: example.org, flavor: dendrite}",
                &[],
                &["homeserver.flavor", "dendrite", "auto"],
            ),
            (
                "homeserver: {server_name: example.org, flavor: tuwunel}",
                &[],
                &["homeserver.admin_token", "tuwunel", "MATRIX_ADMIN_TOKEN"],
            ),
            (
                "homeserver: {server_name: example.org}\nappservice: {url: 'roster:9009'}",
                &[],
                &["appservice.url", "roster:9009", "http://roster:9009"],
            ),
            (
                MINIMAL,
                &[("LETTA_API_URL", "letta:8283")],
                &[
                    "agents.letta_url",
                    "LETTA_API_URL",
                    "letta:8283",
                    "http://letta:8283",
                ],
            ),
            (
                "homeserver: {server_name: example.org}\nagents: {letta_url: 'http://letta:8283', file: /etc/roster/agents.yaml}",
                &[],
                &["agents.file", "agents.letta_url", "one source"],
            ),
            (
                "homeserver: {server_name: example.org}\nappservice: {txn_max_ids: 0}",
                &[],
                &["appservice.txn_max_ids", "applied twice", "at least 1"],
            ),
            (
                "homeserver: {server_name: example.org}\nappservice: {txn_retention: 10m}",
                &[],
                &["appservice.txn_retention", "600s", "1h"],
            ),
            (
                "homeserver: {server_name: example.org}\nappservice: {listen: 'nowhere'}",
                &[],
                &["appservice.listen", "127.0.0.1:9009"],
            ),
            (
                "homeserver: {server_name: example.org}\nagents: {required_members: [admin]}",
                &[],
                &["agents.required_members", "\"admin\"", "@admin:example.org"],
            ),
            (
                "homeserver: {server_name: example.org, colour: blue}",
                &[],
                &["homeserver", "colour", "expected one of"],
            ),
            (
                "homeserver: {server_name: example.org}\nappservice: {bot_localpart: 'Letta Bot'}",
                &[],
                &["appservice.bot_localpart", "Letta Bot", "localpart"],
            ),
            (
                "homeserver: {server_name: example.org}\nadmin: {listen: '127.0.0.1:9009'}",
                &[],
                &["admin.listen", "127.0.0.1:9009", "own address"],
            ),
            (
                "homeserver: {server_name: example.org}\nagents: {letta_url: 'not a url'}",
                &[],
                &["agents.letta_url", "not a url", "http://letta:8283"],
            ),
            (
                "homeserver: {server_name: example.org}\nlifecycle: {enabled: true, topic: ''}",
                &[],
                &["lifecycle.topic", "empty"],
            ),
            (
                "homeserver: {server_name: example.org}\nlifecycle: {max_in_flight_users: 0}",
                &[],
                &["lifecycle.max_in_flight_users", "0", "at least 1"],
            ),
            (
                "homeserver: {server_name: example.org}\nlifecycle: {max_buffered_events: 4, max_in_flight_users: 8}",
                &[],
                &["lifecycle.max_buffered_events", "4", "max_in_flight_users"],
            ),
            (
                "homeserver: {server_name: example.org}\nlifecycle: {avatar_max_bytes: 10}",
                &[],
                &["lifecycle.avatar_max_bytes", "10", "1024"],
            ),
            (
                "homeserver: {server_name: example.org}\nlifecycle: {avatar_fetch_timeout: 0s}",
                &[],
                &["lifecycle.avatar_fetch_timeout", "0", "10s"],
            ),
            (
                "homeserver: {server_name: example.org}\nlifecycle: {avatar_fetch_timeout: never}",
                &[],
                &["lifecycle.avatar_fetch_timeout", "never", "90s"],
            ),
            (
                "homeserver: {server_name: example.org}\nlifecycle: {create_missing_users: perhaps}",
                &[],
                &["lifecycle.create_missing_users", "perhaps", "boolean"],
            ),
            (
                "homeserver: {server_name: example.org}\nlifecycle: {kafka: {group.id: other}}",
                &[],
                &["lifecycle.kafka", "group.id", "lifecycle.group_id"],
            ),
            (
                "homeserver: {server_name: example.org}\nlifecycle: {kafka: [a]}",
                &[],
                &["lifecycle.kafka", "mapping"],
            ),
            (
                "homeserver: {server_name: example.org}\nlifecycle: {topic: t, dead_letter_topic: t}",
                &[],
                &["lifecycle.dead_letter_topic", "\"t\"", "own topic"],
            ),
            (
                "homeserver: {server_name: example.org}\nagents: {avatar: 'ftp://x/a.png'}",
                &[],
                &["agents.avatar", "ftp://x/a.png", "generated"],
            ),
            (
                "homeserver: {server_name: example.org}\nagents: {avatar: 'mxc://evil.org/../../x'}",
                &[],
                &["agents.avatar", "mxc://evil.org/../../x"],
            ),
            (
                "homeserver: {server_name: example.org}\nlifecycle: {start_from: middle}",
                &[],
                &["lifecycle.start_from", "middle", "earliest"],
            ),
            ("[1, 2]", &[], &["top level", "mapping"]),
            (
                "homeserver: {server_name: example.org}\nsync: {interval: {a: 1, b: 2}}",
                &[],
                &["sync.interval", "a mapping is not a duration"],
            ),
            (
                "homeserver: {server_name: example.org, \"col\\nour\": blue}",
                &[],
                &["homeserver", "col\\nour"],
            ),
            (
                "homeserver: {server_name: example.org}\nlifecycle: {kafka: {\"a\\nb\": [1]}}",
                &[],
                &["lifecycle.kafka", "a\\nb: a list is not a string"],
            ),
            (
                MINIMAL,
                &[("ROSTER_SYNCC__INTERVAL", "10m")],
                &["syncc", "(from ROSTER_SYNCC__INTERVAL)", "unknown field"],
            ),
            (
                "homeserver: {server_name: example.org}\nagents: {file: agents.yaml}",
                &[("LETTA_API_URL", "http://letta:8283")],
                &["agents.file", "agents.letta_url (from LETTA_API_URL)"],
            ),
            (
                "homeserver: {server_name: example.org}\nstore: {path: ''}",
                &[],
                &["store.path", "empty", "roster.db"],
            ),
            (
                MINIMAL,
                &[("ROSTER_STORE__PATH", "")],
                &["store.path", "(from ROSTER_STORE__PATH)", "empty"],
            ),
            (
                "homeserver: {server_name: example.org}\nstore: {path: ':memory:'}",
                &[],
                &["store.path", ":memory:", "roster.db"],
            ),
            (
                MINIMAL,
                &[("ROSTER_APPSERVICE__LISTEN", "localhost:9009")],
                &[
                    "appservice.listen",
                    "(from ROSTER_APPSERVICE__LISTEN)",
                    "\"localhost:9009\"",
                    "127.0.0.1:9009",
                ],
            ),
        ];
        for (yaml, vars, needles) in cases {
            let err = Config::from_yaml_with_env(yaml, &env(vars))
                .expect_err(&format!("config should be rejected: {yaml} {vars:?}"))
                .to_string();
            assert!(!err.contains('\n'), "one line: {err}");
            for needle in *needles {
                assert!(err.contains(needle), "{err:?} should mention {needle:?}");
            }
        }
    }

    #[test]
    fn should_warn_of_roster_variables_that_are_not_read() {
        let vars = env(&[
            ("ROSTER_SYNC_INTERVAL", "5m"),
            ("ROSTER_ADMIN_TOKEN", "t"),
            ("ROSTER_FOO", "1"),
            // Read elsewhere, or Kubernetes service links: not warned about.
            ("ROSTER_SYNC__INTERVAL", "5m"),
            ("ROSTER_LOG", "debug"),
            ("ROSTER_ADMIN_URL", "http://127.0.0.1:9010"),
            ("ROSTER_SERVICE_HOST", "10.0.0.1"),
            ("ROSTER_PORT", "tcp://10.0.0.1:9009"),
            ("ROSTER_PORT_9009_TCP_ADDR", "10.0.0.1"),
            ("ROSTER_ADMIN_SERVICE_PORT_HTTP", "9010"),
            ("OTHER_SYNC_INTERVAL", "5m"),
        ]);
        // The sections named here are the config's own.
        let config = Config::from_yaml(MINIMAL).unwrap();
        let tree = serde_yaml::to_value(&config).unwrap();
        let mut sections: Vec<&str> = tree
            .as_mapping()
            .unwrap()
            .keys()
            .filter_map(Value::as_str)
            .collect();
        sections.sort_unstable();
        let mut known = SECTIONS.to_vec();
        known.sort_unstable();
        assert_eq!(sections, known);
        let warnings = unread_env_vars(&vars);
        assert_eq!(warnings.len(), 3, "{warnings:#?}");
        assert!(warnings[0].starts_with("ROSTER_ADMIN_TOKEN is not read"));
        assert!(
            warnings[0].contains("ROSTER_ADMIN__TOKEN"),
            "{}",
            warnings[0]
        );
        assert!(warnings[1].starts_with("ROSTER_FOO is not a roster setting"));
        assert!(
            warnings[2].contains("ROSTER_SYNC__INTERVAL"),
            "{}",
            warnings[2]
        );
    }

    #[test]
    fn should_say_when_no_config_file_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("config.yaml");
        let err = Config::load(&absent, false, &BTreeMap::new())
            .expect_err("no server name anywhere")
            .to_string();
        assert!(err.contains("homeserver.server_name"), "{err}");
        assert!(err.contains("no config file was read"), "{err}");
        assert!(err.contains("pass -c FILE"), "{err}");
        // With a file, the hint is not given.
        std::fs::write(&absent, "homeserver: {url: 'http://127.0.0.1:8008'}\n").unwrap();
        let err = Config::load(&absent, false, &BTreeMap::new())
            .expect_err("no server name in the file")
            .to_string();
        assert!(!err.contains("no config file was read"), "{err}");
        // A file named with -c that is not there is an error of its own.
        let err = Config::load(&dir.path().join("nope.yaml"), true, &BTreeMap::new())
            .expect_err("a named file is missing")
            .to_string();
        assert!(
            err.contains("nope.yaml") && err.contains("check the path"),
            "{err}"
        );
    }

    #[test]
    fn should_read_lifecycle_tuning_and_kafka_properties() {
        let vars = env(&[(
            "ROSTER_LIFECYCLE__KAFKA",
            "{session.timeout.ms: 6000, security.protocol: ssl}",
        )]);
        let text = "homeserver: {server_name: example.org}\nlifecycle: {create_missing_users: false, avatar_fetch_timeout: 3s, max_in_flight_users: 4}";
        let config = Config::from_yaml_with_env(text, &vars).unwrap();
        let lifecycle = &config.lifecycle;
        assert!(!lifecycle.create_missing_users);
        assert_eq!(lifecycle.avatar_fetch_timeout, Duration::from_secs(3));
        assert_eq!(lifecycle.max_in_flight_users, 4);
        assert_eq!(lifecycle.max_buffered_events, 1024);
        assert_eq!(lifecycle.avatar_max_bytes, 5 * 1024 * 1024);
        assert_eq!(lifecycle.kafka["session.timeout.ms"], "6000");
        assert_eq!(lifecycle.kafka["security.protocol"], "ssl");
        assert_eq!(lifecycle.start_from, StartFrom::Earliest);
        let defaults = Config::from_yaml(MINIMAL).unwrap().lifecycle;
        assert!(defaults.create_missing_users);
        assert!(defaults.kafka.is_empty());
    }

    /// Secrets and other strings from the environment are kept exactly as set; only keys
    /// whose type needs it read the value as YAML.
    #[test]
    fn should_keep_environment_strings_verbatim() {
        for secret in [
            "abc #def",
            "0x1F",
            "~",
            "null",
            "a: b",
            "'quoted'",
            "\"double\"",
            "  leading and trailing  ",
            "true",
            "600",
            "[1, 2]",
            "{x: 1}",
            "@at-start",
        ] {
            let vars = env(&[
                ("ROSTER_ADMIN__TOKEN", secret),
                ("LETTA_TOKEN", secret),
                ("MATRIX_ADMIN_TOKEN", secret),
                ("ROSTER_LIFECYCLE__GROUP_ID", secret),
            ]);
            let config = Config::from_yaml_with_env(MINIMAL, &vars)
                .unwrap_or_else(|e| panic!("{secret:?}: {e}"));
            assert_eq!(config.admin.token.as_ref().unwrap().expose(), secret);
            assert_eq!(config.agents.letta_token.as_ref().unwrap().expose(), secret);
            assert_eq!(
                config.homeserver.admin_token.as_ref().unwrap().expose(),
                secret
            );
            assert_eq!(config.lifecycle.group_id, secret);
        }
        // Typed keys still read YAML.
        let vars = env(&[
            ("ROSTER_HOMESERVER__MAX_CONCURRENT_REQUESTS", "0x10"),
            ("ROSTER_LIFECYCLE__ENABLED", "true"),
            ("ROSTER_AGENTS__POLL_INTERVAL", "90"),
            ("ROSTER_LIFECYCLE__KAFKA", "{security.protocol: ssl}"),
        ]);
        let config = Config::from_yaml_with_env(MINIMAL, &vars).unwrap();
        assert_eq!(config.homeserver.max_concurrent_requests, 16);
        assert!(config.lifecycle.enabled);
        assert_eq!(config.agents.poll_interval, Duration::from_secs(90));
        assert_eq!(config.lifecycle.kafka["security.protocol"], "ssl");
        // The environment wins over the file, ROSTER_* over the legacy name.
        let vars = env(&[
            ("LETTA_API_URL", "http://legacy:8283"),
            ("ROSTER_AGENTS__LETTA_URL", "http://new:8283"),
        ]);
        let config = Config::from_yaml_with_env(
            "homeserver: {server_name: example.org}\nagents: {letta_url: 'http://file:8283'}",
            &vars,
        )
        .unwrap();
        assert_eq!(config.agents.letta_url.as_deref(), Some("http://new:8283"));
        let vars = env(&[("LETTA_API_URL", "http://legacy:8283")]);
        let config = Config::from_yaml_with_env(
            "homeserver: {server_name: example.org}\nagents: {letta_url: 'http://file:8283'}",
            &vars,
        )
        .unwrap();
        assert_eq!(
            config.agents.letta_url.as_deref(),
            Some("http://legacy:8283")
        );
    }

    /// The sections and keys of a config, as `section.key`.
    fn keys(value: &Value) -> std::collections::BTreeSet<String> {
        let mut keys = std::collections::BTreeSet::new();
        for (section, fields) in value.as_mapping().unwrap() {
            for (key, _) in fields.as_mapping().unwrap() {
                keys.insert(format!(
                    "{}.{}",
                    section.as_str().unwrap(),
                    key.as_str().unwrap()
                ));
            }
        }
        keys
    }

    /// config.example.yaml holds every key at its default: a key added to the config
    /// without its line in the example, or a default that changed, fails here.
    #[test]
    fn should_document_every_key_and_its_default_in_the_example() {
        let text = include_str!("../config.example.yaml");
        let example = Config::from_yaml(text).expect("the example loads");
        let written: Value = serde_yaml::from_str(text).unwrap();
        let example_tree = serde_yaml::to_value(&example).unwrap();
        let defaults = Config::from_yaml("homeserver: {server_name: example.org}").unwrap();
        let default_tree = serde_yaml::to_value(&defaults).unwrap();
        assert_eq!(
            keys(&written),
            keys(&default_tree),
            "config.example.yaml and the config's keys differ"
        );
        assert_eq!(example_tree, default_tree, "the example shows the defaults");
        assert_eq!(
            example.ids().required_members,
            vec!["@letta:example.org", "@admin:example.org"]
        );
    }

    #[test]
    fn should_not_print_secrets_in_debug() {
        let vars = env(&[
            ("ROSTER_ADMIN__TOKEN", "admin-token-value"),
            ("LETTA_TOKEN", "letta-token-value"),
            (
                "ROSTER_LIFECYCLE__KAFKA",
                "{sasl.password: kafka-password-value, ssl.key.pem: kafka-key-value, security.protocol: sasl_ssl}",
            ),
        ]);
        let config = Config::from_yaml_with_env(
            "homeserver: {server_name: example.org, admin_token: hunter2}",
            &vars,
        )
        .unwrap();
        assert_eq!(
            config.lifecycle.kafka["sasl.password"],
            "kafka-password-value"
        );
        let debug = format!("{config:?}");
        for secret in [
            "hunter2",
            "admin-token-value",
            "letta-token-value",
            "kafka-password-value",
            "kafka-key-value",
        ] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(
            debug.contains("sasl.password"),
            "names stay visible: {debug}"
        );
    }

    /// `lifecycle.kafka` carries credentials (`sasl.password`, ...): a value that is not a
    /// mapping is refused without being echoed, from the environment or the file.
    #[test]
    fn should_not_print_a_malformed_kafka_mapping() {
        for (yaml, vars) in [
            (
                MINIMAL.to_owned(),
                env(&[(
                    "ROSTER_LIFECYCLE__KAFKA",
                    "{sasl.password: kafka-password-value, security.protocol: sasl_ssl",
                )]),
            ),
            (
                MINIMAL.to_owned(),
                env(&[(
                    "ROSTER_LIFECYCLE__KAFKA",
                    "sasl.password=kafka-password-value",
                )]),
            ),
            (
                format!("{MINIMAL}lifecycle: {{kafka: 'sasl.password=kafka-password-value'}}\n"),
                env(&[]),
            ),
        ] {
            let err = Config::from_yaml_with_env(&yaml, &vars)
                .expect_err("not a mapping")
                .to_string();
            assert!(!err.contains("kafka-password-value"), "{err}");
            assert!(
                err.contains("lifecycle.kafka") && err.contains("not a mapping"),
                "{err}"
            );
        }
    }

    /// A YAML tag on a section is read through by the struct; the environment must still
    /// override the keys inside it.
    #[test]
    fn should_apply_environment_overrides_inside_a_tagged_section() {
        let vars = env(&[
            ("ROSTER_HOMESERVER__URL", "http://from-env:8008"),
            ("LETTA_TOKEN", "from-env"),
        ]);
        let text = "homeserver: !section {server_name: example.org, url: 'http://file:8008'}\nagents: !tagged\n  letta_token: from-file\n";
        let config = Config::from_yaml_with_env(text, &vars).unwrap();
        assert_eq!(config.homeserver.url, "http://from-env:8008");
        assert_eq!(
            config.agents.letta_token.as_ref().map(Secret::expose),
            Some("from-env")
        );
        let config = Config::from_yaml_with_env(
            "homeserver: !empty\n",
            &env(&[("MATRIX_SERVER_NAME", "example.org")]),
        )
        .unwrap();
        assert_eq!(config.ids().server_name, "example.org");
    }
}
