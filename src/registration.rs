//! Generates and reads the appservice registration, the file the homeserver and roster share.
//!
//! Invariants: tokens come from the OS CSPRNG (32 bytes, URL-safe base64); every namespace
//! regex is anchored (`^...$`, tuwunel requires it) with the server name escaped; the file is
//! written 0600 and an existing one is never replaced without `force`.

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
    #[error("cannot write registration {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read registration {path}: {source}; generate one with `roster registration`")]
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
}

/// A fresh token: 32 bytes from the OS CSPRNG, URL-safe base64 without padding.
pub fn random_token() -> Result<String, RegistrationError> {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| RegistrationError::Random(e.to_string()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// The registration for `config`, with fresh tokens.
pub fn generate(config: &Config) -> Result<Registration, RegistrationError> {
    let ids = config.ids();
    let server = escape(ids.server_name.as_str());
    let user = |localpart_regex: &str, exclusive: bool| {
        Namespace::new(exclusive, format!("^@{localpart_regex}:{server}$"))
    };
    let mut namespaces = Namespaces::new();
    namespaces
        .users
        .push(user(&format!("{}.*", escape(AGENT_PREFIX)), true));
    namespaces
        .users
        .push(user(&escape(ids.bot.localpart()), true));
    // Required members (e.g. @admin) are people's accounts: roster may act as them but
    // must not claim them, so their namespace is shared.
    for member in ids.acting_members() {
        namespaces
            .users
            .push(user(&escape(member.localpart()), false));
    }
    namespaces
        .users
        .push(user(&format!("{}.*", escape(IDENTITY_PREFIX)), false));
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

/// Reads the registration `serve` runs with and checks it fits the config.
pub fn read(path: &Path, config: &Config) -> Result<Registration, RegistrationError> {
    let text = std::fs::read_to_string(path).map_err(|source| RegistrationError::Read {
        path: path.to_owned(),
        source,
    })?;
    let registration: Registration =
        serde_yaml::from_str(&text).map_err(|source| RegistrationError::Parse {
            path: path.to_owned(),
            source,
        })?;
    let invalid = |message: String| RegistrationError::Invalid {
        path: path.to_owned(),
        message,
    };
    if registration.as_token.len() < 32 || registration.hs_token.len() < 32 {
        return Err(invalid(
            "as_token and hs_token must be at least 32 characters; regenerate with `roster registration --force`".into(),
        ));
    }
    if registration.sender_localpart != config.appservice.bot_localpart {
        return Err(invalid(format!(
            "sender_localpart is {:?} but appservice.bot_localpart is {:?}; make them agree",
            registration.sender_localpart, config.appservice.bot_localpart
        )));
    }
    Ok(registration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_yaml(
            "homeserver: {server_name: my.example.org}\nagents: {required_members: ['@admin:my.example.org', '@ops:elsewhere.org']}",
        )
        .unwrap()
    }

    #[test]
    fn should_generate_anchored_escaped_namespaces() {
        let reg = generate(&config()).unwrap();
        let users: Vec<_> = reg
            .namespaces
            .users
            .iter()
            .map(|n| (n.regex.as_str(), n.exclusive))
            .collect();
        assert_eq!(
            users,
            vec![
                (r"^@agent_.*:my\.example\.org$", true),
                (r"^@letta:my\.example\.org$", true),
                (r"^@admin:my\.example\.org$", false),
                (r"^@nova-.*:my\.example\.org$", false),
            ]
        );
        assert_eq!(
            reg.namespaces.aliases[0].regex,
            r"^#agent_.*:my\.example\.org$"
        );
        assert!(reg.namespaces.aliases[0].exclusive);
        assert_eq!(
            reg.namespaces.aliases[1].regex,
            r"^#letta-agents:my\.example\.org$"
        );
        assert_eq!(reg.sender_localpart, "letta");
        assert_eq!(reg.rate_limited, Some(false));
        assert_eq!(reg.url.as_deref(), Some("http://127.0.0.1:9009"));
    }

    #[test]
    fn should_make_distinct_url_safe_tokens() {
        let reg = generate(&config()).unwrap();
        for token in [&reg.as_token, &reg.hs_token] {
            assert!(token.len() >= 43, "32 bytes encode to 43 characters");
            assert!(
                token
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            );
        }
        assert_ne!(reg.as_token, reg.hs_token);
        assert_ne!(reg.as_token, generate(&config()).unwrap().as_token);
    }

    #[test]
    fn should_write_0600_and_refuse_to_overwrite_without_force() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registration.yaml");
        let first = generate(&config()).unwrap();
        write(&path, &first, false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let second = generate(&config()).unwrap();
        let err = write(&path, &second, false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(read(&path, &config()).unwrap().as_token, first.as_token);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write(&path, &second, true).unwrap();
        assert_eq!(read(&path, &config()).unwrap().as_token, second.as_token);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
