//! Executes identity plans (from `model::identity`) on the homeserver and reports one
//! [`Outcome`]; the lifecycle worker decides from it whether to commit, retry or
//! dead-letter.
//!
//! Invariants: every effect is idempotent (registering an existing user, setting the same
//! name, deactivating twice), so a redelivered or replayed event is harmless. Acting as an
//! identity user is always masquerading with the `as_token`; the admin token is used only
//! for tuwunel deactivation. A deactivation is recorded through `state` before the outcome
//! is reported, so drift repair never re-invites a deactivated user. No token, payload or
//! e-mail is ever logged.

use std::sync::Arc;
use std::time::Duration;

use ruma::{OwnedMxcUri, UserId};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::clock::now_ms;
use crate::config::Flavor;
use crate::matrix::{Homeserver, MatrixError};
use crate::model::identity::{AvatarSource, Effect, Plan};
use crate::retry::{Backoff, Outcome, until_ok};

/// What a plan that is done came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The effects are in place; `taken` names them for the log (a failed avatar fetch
    /// shows as `avatar_fetch_failed`, not as a set avatar).
    Taken(Vec<&'static str>),
    /// The user does not exist and the plan may not create it: counted, not retried.
    MissingUser,
}

/// Why identity effects cannot be taken at all; stops start-up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "the homeserver at {url} is {server}, which offers appservices no way to deactivate users: set homeserver.admin_token (MATRIX_ADMIN_TOKEN), or lifecycle.matrix_enabled: false"
    )]
    MissingAdminToken { url: String, server: String },
    #[error(
        "cannot tell which homeserver answers at {url} (neither /_matrix/federation/v1/version nor Synapse's server_version named one roster knows); set homeserver.flavor to synapse or tuwunel"
    )]
    Undetected { url: String },
}

/// Failure of one attempt, before classification.
enum StepError {
    /// A failure while acting as the user: a 403 may mean the user does not exist.
    Matrix(MatrixError),
    /// A failure while acting as the appservice itself: classified as it is.
    AsAppservice(MatrixError),
    /// The admin API says the user does not exist.
    Missing,
    /// The store could not record what was done: retried (the effect is idempotent).
    Store(String),
}

impl From<MatrixError> for StepError {
    fn from(e: MatrixError) -> Self {
        StepError::Matrix(e)
    }
}

/// Takes identity effects on one homeserver.
pub struct IdentityEffects {
    shared: Arc<Shared>,
    homeserver: Homeserver,
    flavor: Flavor,
    avatars: AvatarFetcher,
}

impl IdentityEffects {
    /// Settles the homeserver flavor (`homeserver.flavor`, or asks the homeserver when
    /// `auto`, retrying while it is away). `Ok(None)` when shut down first.
    pub async fn start(
        shared: Arc<Shared>,
        homeserver: Homeserver,
        shutdown: &CancellationToken,
    ) -> Result<Option<IdentityEffects>, StartError> {
        let config = &shared.config;
        let url = config.homeserver.url.clone();
        let (flavor, server) = match config.homeserver.flavor {
            Flavor::Auto => {
                let detected = until_ok(
                    shutdown,
                    "ask the homeserver which it is",
                    Backoff::DEFAULT,
                    || homeserver.detect_flavor(),
                )
                .await;
                match detected {
                    None => return Ok(None),
                    Some(None) => return Err(StartError::Undetected { url }),
                    Some(Some(found)) => found,
                }
            }
            configured => (configured, format!("{configured:?} (configured)")),
        };
        if flavor == Flavor::Tuwunel && config.homeserver.admin_token.is_none() {
            return Err(StartError::MissingAdminToken { url, server });
        }
        tracing::info!(homeserver = %server, flavor = ?flavor, "identity effects ready");
        let avatars = AvatarFetcher::new(
            config.lifecycle.avatar_fetch_timeout,
            config.lifecycle.avatar_max_bytes,
        );
        Ok(Some(IdentityEffects {
            shared,
            homeserver,
            flavor,
            avatars,
        }))
    }

    pub fn homeserver(&self) -> &Homeserver {
        &self.homeserver
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// Applies `plan`: every effect in order; a user found missing is registered first when
    /// the plan allows it, then the effects are taken again from the start.
    pub async fn apply(&self, plan: &Plan) -> Outcome<Applied> {
        if plan.skip.is_some() || plan.effects.is_empty() {
            return Outcome::Done(Applied::Taken(Vec::new()));
        }
        let mut registered = false;
        loop {
            let error = match self.attempt(plan).await {
                Ok(taken) => return Outcome::Done(Applied::Taken(taken)),
                Err(StepError::Missing) => return Outcome::Done(Applied::MissingUser),
                Err(StepError::Store(reason)) => {
                    return Outcome::Retry {
                        reason,
                        retry_after: None,
                    };
                }
                Err(StepError::AsAppservice(error)) => return Outcome::from_error(&error),
                Err(StepError::Matrix(error)) => error,
            };
            // Masquerading as a user who does not exist is refused with M_FORBIDDEN; so are
            // other things. Ask who the user is to tell them apart, never the error text.
            if !error.is_forbidden() || registered {
                return Outcome::from_error(&error);
            }
            match self.homeserver.whoami(Some(&plan.user)).await {
                Ok(_) => return Outcome::from_error(&error),
                Err(e) if e.is_forbidden() => {}
                Err(e) => return Outcome::from_error(&e),
            }
            if !plan.create_if_missing {
                return Outcome::Done(Applied::MissingUser);
            }
            if let Err(e) = self.homeserver.register(plan.user.localpart()).await {
                return Outcome::from_error(&e);
            }
            tracing::info!(user = %plan.user, "registered a missing identity user");
            registered = true;
        }
    }

    async fn attempt(&self, plan: &Plan) -> Result<Vec<&'static str>, StepError> {
        let user: &UserId = &plan.user;
        let mut taken = Vec::with_capacity(plan.effects.len());
        for effect in &plan.effects {
            match effect {
                Effect::Register => {
                    self.homeserver
                        .register(user.localpart())
                        .await
                        .map_err(StepError::AsAppservice)?;
                }
                Effect::SetDisplayName(name) => {
                    self.homeserver.set_display_name(user, name).await?;
                }
                Effect::SetAvatar(AvatarSource::Mxc(uri)) => {
                    let uri = OwnedMxcUri::from(uri.as_str());
                    self.homeserver.set_avatar_url(user, uri).await?;
                }
                Effect::SetAvatar(AvatarSource::Fetch(url)) => {
                    let avatar = match self.avatars.fetch(url).await {
                        Ok(avatar) => avatar,
                        Err(error) => {
                            // The old avatar stays; the rest of the event still applies.
                            tracing::warn!(
                                user = %user,
                                avatar = %redact_url(url),
                                error = %error,
                                "cannot fetch the avatar; keeping the old one"
                            );
                            taken.push("avatar_fetch_failed");
                            continue;
                        }
                    };
                    let uri = self
                        .homeserver
                        .upload(user, avatar.content_type, avatar.filename, avatar.bytes)
                        .await?;
                    self.homeserver.set_avatar_url(user, uri).await?;
                }
                Effect::Deactivate { erase } => {
                    self.deactivate(user, *erase).await?;
                    self.learn_deactivated(user).await?;
                }
            }
            taken.push(effect.label());
        }
        Ok(taken)
    }

    async fn deactivate(&self, user: &UserId, erase: bool) -> Result<(), StepError> {
        match self.flavor {
            Flavor::Tuwunel => {
                // A deactivated user can no longer act, and tuwunel's admin deactivation
                // neither leaves rooms nor clears the profile: so leave and clear as the
                // user first, while it still can, then deactivate.
                for room in self.homeserver.joined_rooms(user).await? {
                    self.homeserver.leave(user, &room).await?;
                }
                if erase {
                    self.homeserver.clear_profile(user).await?;
                }
                match self.homeserver.admin_deactivate(user, erase).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.is_not_found() => Err(StepError::Missing),
                    Err(e) => Err(StepError::AsAppservice(e)),
                }
            }
            // Synapse (and `auto` never reaches here unresolved).
            _ => Ok(self.homeserver.deactivate(user, erase).await?),
        }
    }

    /// Deactivates a removed agent's user (`agents.deactivate_removed`), the same way a
    /// lifecycle deletion does, without erasing it. A user already gone counts as done; a
    /// deactivation the store could not record is an error (the next run records it).
    pub async fn deactivate_agent_user(&self, user: &UserId) -> Result<(), MatrixError> {
        let recorded = match self.deactivate(user, false).await {
            Ok(()) | Err(StepError::Missing) => self.learn_deactivated(user).await,
            Err(StepError::Matrix(e) | StepError::AsAppservice(e)) => return Err(e),
            Err(store) => Err(store),
        };
        match recorded {
            Err(StepError::Store(reason)) => Err(MatrixError::Request {
                endpoint: "deactivate",
                message: reason,
            }),
            _ => Ok(()),
        }
    }

    /// Tells the model and the store, so no drift repair ever re-invites the user.
    async fn learn_deactivated(&self, user: &UserId) -> Result<(), StepError> {
        self.shared
            .state
            .record_deactivated(user.to_owned(), now_ms())
            .await
            .map(|_| ())
            .map_err(|e| StepError::Store(format!("deactivated, but cannot record it: {e}")))
    }
}

/// The URL without query or fragment, which may carry signatures or tokens.
fn redact_url(url: &str) -> &str {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    &url[..end]
}

/// An avatar fetched and checked to be an image.
struct Avatar {
    bytes: Vec<u8>,
    content_type: &'static str,
    filename: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("the avatar server answered HTTP {0}")]
    Status(u16),
    #[error("the avatar is larger than lifecycle.avatar_max_bytes ({max} bytes)")]
    TooLarge { max: usize },
    #[error(
        "the avatar is not a PNG, JPEG, GIF, WebP or AVIF image (content type {content_type:?})"
    )]
    NotAnImage { content_type: String },
    #[error("the avatar server did not answer within {0:?} (lifecycle.avatar_fetch_timeout)")]
    Timeout(Duration),
    #[error("cannot fetch the avatar: {0}")]
    Http(String),
}

/// Fetches `http(s)://` avatars with a timeout and a size limit.
struct AvatarFetcher {
    http: reqwest::Client,
    max_bytes: usize,
    timeout: Duration,
}

impl AvatarFetcher {
    fn new(timeout: Duration, max_bytes: usize) -> AvatarFetcher {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::limited(3))
            .user_agent(concat!("roster/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a TLS backend is compiled in");
        AvatarFetcher {
            http,
            max_bytes,
            timeout,
        }
    }

    async fn fetch(&self, url: &str) -> Result<Avatar, FetchError> {
        let transport = |e: reqwest::Error| {
            if e.is_timeout() {
                FetchError::Timeout(self.timeout)
            } else {
                FetchError::Http(crate::error_chain(&e.without_url()))
            }
        };
        let mut response = self.http.get(url).send().await.map_err(transport)?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status(status.as_u16()));
        }
        let too_large = FetchError::TooLarge {
            max: self.max_bytes,
        };
        if response
            .content_length()
            .is_some_and(|n| n > self.max_bytes as u64)
        {
            return Err(too_large);
        }
        let declared = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if bytes.len() + chunk.len() > self.max_bytes {
                return Err(too_large);
            }
            bytes.extend_from_slice(&chunk);
        }
        // The bytes decide; a declared type that is not an image is refused as well.
        let declared_ok = declared.is_empty()
            || declared.starts_with("image/")
            || declared.starts_with("application/octet-stream");
        let content_type =
            sniff_image(&bytes)
                .filter(|_| declared_ok)
                .ok_or(FetchError::NotAnImage {
                    content_type: declared,
                })?;
        let filename = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.path_segments()?.next_back().map(str::to_owned))
            .filter(|name| !name.is_empty());
        Ok(Avatar {
            bytes,
            content_type,
            filename,
        })
    }
}

/// The image type `bytes` start with, for the formats Matrix clients render.
fn sniff_image(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(b"\xff\xd8\xff") {
        Some("image/jpeg")
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else if bytes.len() >= 12
        && &bytes[4..8] == b"ftyp"
        && (&bytes[8..12] == b"avif" || &bytes[8..12] == b"avis")
    {
        Some("image/avif")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_recognise_images_by_their_bytes() {
        assert_eq!(sniff_image(b"\x89PNG\r\n\x1a\n...."), Some("image/png"));
        assert_eq!(sniff_image(b"\xff\xd8\xff\xe0"), Some("image/jpeg"));
        assert_eq!(sniff_image(b"GIF89a..."), Some("image/gif"));
        assert_eq!(sniff_image(b"RIFF\0\0\0\0WEBPVP8 "), Some("image/webp"));
        assert_eq!(sniff_image(b"\0\0\0\x1cftypavif"), Some("image/avif"));
        assert_eq!(sniff_image(b"<svg xmlns=...>"), None);
        assert_eq!(sniff_image(b"<html>"), None);
        assert_eq!(sniff_image(b""), None);
    }

    #[test]
    fn should_drop_query_and_fragment_from_logged_urls() {
        assert_eq!(
            redact_url("https://cdn.example/a.png?sig=secret#x"),
            "https://cdn.example/a.png"
        );
        assert_eq!(redact_url("http://h/a.png"), "http://h/a.png");
    }

    #[test]
    fn should_retry_transient_errors_and_dead_letter_permanent_ones() {
        let forbidden = MatrixError::Api {
            endpoint: "x",
            status: 403,
            errcode: "M_FORBIDDEN".into(),
            kind: Some(ruma::api::error::ErrorKind::Forbidden),
            message: "no".into(),
        };
        assert!(matches!(
            Outcome::<()>::from_error(&forbidden),
            Outcome::Refused(_)
        ));
        let down = MatrixError::Timeout {
            endpoint: "x",
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            Outcome::<()>::from_error(&down),
            Outcome::Retry { .. }
        ));
        let busy = MatrixError::Api {
            endpoint: "x",
            status: 502,
            errcode: "(no errcode)".into(),
            kind: None,
            message: "bad gateway".into(),
        };
        assert!(matches!(
            Outcome::<()>::from_error(&busy),
            Outcome::Retry { .. }
        ));
    }
}
