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
//!
//! Nothing changed, nothing is sent: a profile part (display name, avatar) equal to what
//! roster last applied (`state.applied_profile`: the store decides, a cache spares the reads)
//! is not sent again, and an `http(s)` avatar uploaded within `lifecycle.avatar_cache_ttl`
//! is set by its `mxc://` without fetching or uploading it again. What was applied is
//! recorded only after the homeserver accepted it, with where its event sits in the topic:
//! the profile parts of an event redelivered after a crash (applied, not yet committed), or
//! of one older than the last applied, are not sent ([`Applied::AlreadyApplied`] when that
//! leaves nothing), so no older name is set over a newer one and no change is sent twice.
//! Registration and deactivation are still taken (idempotent). A replay applies in full.

use std::sync::Arc;
use std::time::Duration;

use ruma::{OwnedMxcUri, UserId};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::clock::now_ms;
use crate::config::Flavor;
use crate::fetch::{AvatarFetcher, Reach, redact_url};
use crate::matrix::{Homeserver, MatrixError};
use crate::model::identity::{AppliedProfile, AvatarSource, Effect, EventPosition, Plan};
use crate::retry::{Outcome, until_ok};
use crate::store::Upload;

/// Avatar URLs whose upload is kept in memory in front of the store.
const UPLOAD_CACHE: u64 = 10_000;

/// What a plan that is done came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The effects are in place; `taken` names them for the log (a failed avatar fetch
    /// shows as `avatar_fetch_failed`, not as a set avatar).
    Taken(Vec<&'static str>),
    /// Every profile part equals what roster applied before: nothing was sent.
    Unchanged,
    /// An event whose profile parts roster applied already, or older than the one it applied
    /// last (same partition), with nothing else to take: nothing was sent.
    AlreadyApplied,
    /// The user does not exist and the plan may not create it: counted, not retried.
    MissingUser,
}

/// The label of an avatar looked at again after the TTL and found to be the one set.
const AVATAR_UNCHANGED: &str = "avatar_unchanged";

/// What one attempt set, to be recorded once the homeserver accepted all of it.
#[derive(Default)]
struct Taken {
    labels: Vec<&'static str>,
    name: Option<String>,
    /// The avatar's source URL and the `mxc://` set for it.
    avatar: Option<(String, String)>,
    /// The source URL of the avatar being uploaded or set: a failure now is the avatar's.
    avatar_pending: Option<String>,
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
    /// Uploads of avatar URLs, in front of the store's `uploads` (entries older than
    /// `avatar_ttl` are stale whichever holds them).
    uploads: moka::sync::Cache<String, Upload>,
    /// Applied avatar URLs looked at again after the TTL that could not be fetched: not
    /// tried again by every update before another TTL has passed (in memory only: after a
    /// restart one more try each).
    failed_refetches: moka::sync::Cache<String, ()>,
    /// Avatar sources (as events name them) the homeserver refused for good, uploaded or
    /// set: their event was dead-lettered, and the updates after it that name them again
    /// (the follower count changed) send nothing for the avatar before another
    /// `avatar_ttl` has passed (in memory only: after a restart one more try each).
    refused_avatars: moka::sync::Cache<String, ()>,
    avatar_ttl: Duration,
    /// Compare with what was applied and uploaded before sending (off only to measure what
    /// remembering saves).
    remember: bool,
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
                let detected = until_ok(shutdown, "ask the homeserver which it is", || {
                    homeserver.detect_flavor()
                })
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
            if config.lifecycle.avatar_allow_private {
                Reach::Any
            } else {
                Reach::PublicOnly
            },
        );
        let avatar_ttl = config.lifecycle.avatar_cache_ttl;
        let uploads = moka::sync::Cache::builder()
            .max_capacity(UPLOAD_CACHE)
            .time_to_live(avatar_ttl.max(Duration::from_secs(1)))
            .build();
        let failed_refetches = moka::sync::Cache::builder()
            .max_capacity(UPLOAD_CACHE)
            .time_to_live(avatar_ttl.max(Duration::from_secs(1)))
            .build();
        let refused_avatars = moka::sync::Cache::builder()
            .max_capacity(UPLOAD_CACHE)
            .time_to_live(avatar_ttl.max(Duration::from_secs(1)))
            .build();
        Ok(Some(IdentityEffects {
            shared,
            homeserver,
            flavor,
            avatars,
            uploads,
            failed_refetches,
            refused_avatars,
            avatar_ttl,
            remember: true,
        }))
    }

    pub fn homeserver(&self) -> &Homeserver {
        &self.homeserver
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// Sends every profile part, changed or not, and fetches and uploads every avatar URL
    /// again, as roster did before it remembered them: only for measuring what remembering
    /// saves.
    pub fn without_memory(mut self) -> IdentityEffects {
        self.remember = false;
        self
    }

    /// Applies what `plan` (for the event at `at`) changes: the profile parts of an event
    /// applied already are dropped (nothing left: [`Applied::AlreadyApplied`]), then the
    /// parts equal to what roster applied (nothing left: [`Applied::Unchanged`]).
    pub async fn apply(&self, plan: &Plan, at: EventPosition) -> Outcome<Applied> {
        self.apply_with(plan, at, self.remember, false).await
    }

    /// As [`IdentityEffects::apply`], for an older update applied in place of a newer one
    /// of its user that set less than it asked for (the worker left out what it set): its
    /// parts are not taken for applied already because the newer one's position is
    /// recorded, and that position stays recorded.
    pub async fn apply_in_place(&self, plan: &Plan, at: EventPosition) -> Outcome<Applied> {
        self.apply_with(plan, at, self.remember, true).await
    }

    /// Applies all of `plan`, whatever roster applied before (a replay: the operator asks
    /// for the event again, e.g. after someone changed the profile behind roster's back).
    pub async fn reapply(&self, plan: &Plan, at: EventPosition) -> Outcome<Applied> {
        self.apply_with(plan, at, false, false).await
    }

    /// Every effect in order; a user found missing is registered first when the plan allows
    /// it, then the effects are taken again from the start. Once all were accepted, the
    /// profile parts set are recorded, with `at`.
    async fn apply_with(
        &self,
        plan: &Plan,
        at: EventPosition,
        skip_unchanged: bool,
        in_place: bool,
    ) -> Outcome<Applied> {
        if plan.skip.is_some() || plan.effects.is_empty() {
            return Outcome::Done(Applied::Taken(Vec::new()));
        }
        let before = match self.shared.state.applied_profile(&plan.user).await {
            Ok(before) => before,
            Err(e) => {
                return Outcome::Retry {
                    reason: format!("cannot read what was applied to the profile: {e}"),
                    retry_after: None,
                };
            }
        };
        let narrowed;
        let plan = if skip_unchanged {
            let fresh = match in_place {
                true => plan.clone(),
                false => plan.without_already_applied(&before, at),
            };
            if fresh.effects.is_empty() {
                return Outcome::Done(Applied::AlreadyApplied);
            }
            // The applied avatar's URL is looked at again once its upload is older than
            // the TTL (the picture behind it may have changed).
            let stale_source = match fresh.fetched_avatar() {
                Some(url)
                    if before.avatar_source.as_deref() == Some(url)
                        && !self.failed_refetches.contains_key(url) =>
                {
                    match self.fresh_upload(url).await {
                        Ok(Some(_)) => None,
                        Ok(None) => Some(url),
                        Err(reason) => {
                            return Outcome::Retry {
                                reason,
                                retry_after: None,
                            };
                        }
                    }
                }
                _ => None,
            };
            narrowed = self.without_refused(fresh.without_applied_but(&before, stale_source));
            if narrowed.effects.is_empty() {
                return Outcome::Done(Applied::Unchanged);
            }
            &narrowed
        } else {
            plan
        };
        let mut before = before;
        let mut registered = false;
        loop {
            let mut taken = Taken {
                labels: Vec::with_capacity(plan.effects.len()),
                ..Taken::default()
            };
            // A replay sets every part again, even one equal to what was set.
            let known = skip_unchanged.then_some(&before);
            let failure = match self.attempt(plan, known, &mut taken).await {
                Ok(()) => {
                    // In place of a newer event, whose position stays the last applied.
                    let recorded_at = match before.applied_at {
                        Some(last) if in_place && before.covers(at) => last,
                        _ => at,
                    };
                    return self.remember(plan, recorded_at, &before, taken).await;
                }
                Err(failure) => failure,
            };
            // Parts the homeserver accepted before a later step failed are on it now,
            // whatever becomes of the event (retried or dead-lettered): recorded, or an
            // update back to the previous profile would be taken as unchanged.
            match self.remember_accepted(&plan.user, &before, &taken).await {
                Ok(after) => before = after,
                Err(outcome) => return outcome,
            }
            let error = match failure {
                StepError::Missing => return self.missing(plan).await,
                StepError::Store(reason) => {
                    return Outcome::Retry {
                        reason,
                        retry_after: None,
                    };
                }
                StepError::AsAppservice(error) => return Outcome::from_error(&error),
                StepError::Matrix(error) => error,
            };
            // Masquerading as a user who does not exist is refused with M_FORBIDDEN; so are
            // other things. Ask who the user is to tell them apart, never the error text.
            if !error.is_forbidden() || registered {
                return self.refused(&error, &taken);
            }
            match self.homeserver.whoami(Some(&plan.user)).await {
                Ok(_) => return self.refused(&error, &taken),
                Err(e) if e.is_forbidden() => {}
                Err(e) => return Outcome::from_error(&e),
            }
            // Refused for one who does exist: the homeserver does not let roster act as
            // them (the acting registration not loaded). Wait for that to be fixed; taking
            // the user for missing would drop a deletion.
            match self.homeserver.user_exists(&plan.user).await {
                Ok(false) => {}
                Ok(true) => {
                    return Outcome::Retry {
                        reason: format!(
                            "the homeserver refuses roster acting as {}, who exists: check that it loaded registration-acting.yaml (roster check-config names the registrations)",
                            plan.user
                        ),
                        retry_after: None,
                    };
                }
                Err(e) => return Outcome::from_error(&e),
            }
            if !plan.create_if_missing {
                return self.missing(plan).await;
            }
            if let Err(e) = self.homeserver.register(plan.user.localpart()).await {
                return Outcome::from_error(&e);
            }
            tracing::info!(user = %plan.user, "registered a missing identity user");
            registered = true;
        }
    }

    /// Whether the homeserver refused the avatar from `source` for good lately: updates
    /// naming it leave it out.
    pub fn refused_avatar(&self, source: &str) -> bool {
        self.remember && self.refused_avatars.contains_key(source)
    }

    /// The plan without the avatars the homeserver refused for good lately.
    fn without_refused(&self, mut plan: Plan) -> Plan {
        plan.effects.retain(|effect| match effect {
            Effect::SetAvatar(source) if self.refused_avatar(source.url()) => {
                tracing::debug!(
                    user = %plan.user,
                    avatar = %redact_url(source.url()),
                    "the homeserver refused this avatar for good lately; not asked again"
                );
                false
            }
            _ => true,
        });
        plan
    }

    /// The outcome of `error`, for a user who exists; an avatar refused for good (the step
    /// that failed uploaded or set it) is remembered, so updates naming it again do not ask
    /// again (and are not all dead-lettered).
    fn refused(&self, error: &MatrixError, taken: &Taken) -> Outcome<Applied> {
        let outcome = Outcome::from_error(error);
        if let (Outcome::Refused(_), Some(source)) = (&outcome, &taken.avatar_pending) {
            self.refused_avatars.insert(source.clone(), ());
        }
        outcome
    }

    /// Records the profile parts the homeserver accepted in an attempt that failed later;
    /// where the last fully applied event sits stays as it was. Returns the profile now
    /// recorded (`before` when nothing was accepted).
    async fn remember_accepted(
        &self,
        user: &UserId,
        before: &AppliedProfile,
        taken: &Taken,
    ) -> Result<AppliedProfile, Outcome<Applied>> {
        let avatar = taken.avatar.as_ref().map(|(s, m)| (s.as_str(), m.as_str()));
        let after = before.with(taken.name.as_deref(), avatar);
        if after == *before {
            return Ok(after);
        }
        match self
            .shared
            .state
            .record_applied_profile(user.to_owned(), after.clone(), now_ms())
            .await
        {
            Ok(()) => Ok(after),
            // Retried whatever the failure was: the parts are sent again (idempotent).
            Err(e) => Err(Outcome::Retry {
                reason: format!("partly applied, but cannot record the profile: {e}"),
                retry_after: None,
            }),
        }
    }

    /// Records the profile parts the homeserver accepted and where their event sits (store
    /// first, then the cache), so the next update that names them, and a redelivery of
    /// this one, send nothing; a failed write is retried. Nothing new set, nothing written.
    async fn remember(
        &self,
        plan: &Plan,
        at: EventPosition,
        before: &AppliedProfile,
        taken: Taken,
    ) -> Outcome<Applied> {
        let avatar = taken.avatar.as_ref().map(|(s, m)| (s.as_str(), m.as_str()));
        let after = before.with(taken.name.as_deref(), avatar);
        if after != *before
            && let Err(e) = self
                .shared
                .state
                .record_applied_profile(plan.user.clone(), after.at(at), now_ms())
                .await
        {
            return Outcome::Retry {
                reason: format!("applied, but cannot record the profile: {e}"),
                retry_after: None,
            };
        }
        if taken.labels.iter().all(|label| *label == AVATAR_UNCHANGED) {
            // Only an avatar looked at again, and found to be the one set: nothing was sent.
            return Outcome::Done(Applied::Unchanged);
        }
        Outcome::Done(Applied::Taken(taken.labels))
    }

    /// Takes every effect in order, noting in `taken` what the homeserver accepted (also
    /// when a later one fails). With `before` (what was applied), an avatar fetched again
    /// and found to be the one set is not set again.
    async fn attempt(
        &self,
        plan: &Plan,
        before: Option<&AppliedProfile>,
        taken: &mut Taken,
    ) -> Result<(), StepError> {
        let user: &UserId = &plan.user;
        for effect in &plan.effects {
            let mut label = effect.label();
            match effect {
                Effect::Register => {
                    self.homeserver
                        .register(user.localpart())
                        .await
                        .map_err(StepError::AsAppservice)?;
                }
                Effect::SetDisplayName(name) => {
                    self.homeserver.set_display_name(user, name).await?;
                    taken.name = Some(name.clone());
                }
                Effect::SetAvatar(AvatarSource::Mxc(uri)) => {
                    taken.avatar_pending = Some(uri.clone());
                    let mxc = OwnedMxcUri::from(uri.as_str());
                    self.homeserver.set_avatar_url(user, mxc).await?;
                    taken.avatar = Some((uri.clone(), uri.clone()));
                    taken.avatar_pending = None;
                }
                Effect::SetAvatar(AvatarSource::Fetch(url)) => {
                    taken.avatar_pending = Some(url.clone());
                    let (mxc, reused) = match self.uploaded(user, url).await? {
                        Some(mxc) => mxc,
                        None => {
                            // The old avatar stays; the rest of the event still applies.
                            taken.avatar_pending = None;
                            taken.labels.push("avatar_fetch_failed");
                            continue;
                        }
                    };
                    if before.is_some_and(|b| b.avatar_mxc.as_deref() == Some(mxc.as_str())) {
                        // Looked at again after the TTL: the same picture, already set.
                        label = AVATAR_UNCHANGED;
                    } else {
                        self.homeserver
                            .set_avatar_url(user, OwnedMxcUri::from(mxc.as_str()))
                            .await?;
                        if reused {
                            label = "avatar_reused";
                        }
                    }
                    taken.avatar = Some((url.clone(), mxc));
                    taken.avatar_pending = None;
                }
                Effect::Deactivate { erase } => {
                    self.deactivate(user, *erase).await?;
                    self.learn_deactivated(user).await?;
                }
            }
            taken.labels.push(label);
        }
        Ok(())
    }

    /// The upload of the image at `url` if it is younger than `lifecycle.avatar_cache_ttl`
    /// (cache, then store); `None` when there is none or it is older (or memory is off).
    async fn fresh_upload(&self, url: &str) -> Result<Option<Upload>, String> {
        if !self.remember {
            return Ok(None);
        }
        let source = crate::avatar::url_key(url);
        let known = self.known_upload(&source).await?;
        let fresh = |upload: &Upload| {
            Duration::from_millis(now_ms().saturating_sub(upload.uploaded_ms)) < self.avatar_ttl
        };
        Ok(known.filter(fresh).inspect(|upload| {
            self.uploads.insert(source, upload.clone());
        }))
    }

    /// The upload remembered under `source` (cache, then store), fresh or not.
    async fn known_upload(&self, source: &str) -> Result<Option<Upload>, String> {
        match self.uploads.get(source) {
            Some(cached) => Ok(Some(cached)),
            None => self
                .shared
                .state
                .upload(source)
                .await
                .map_err(|e| format!("cannot read the avatar uploads: {e}")),
        }
    }

    /// The `mxc://` of the image at `url` and whether it was reused: uploaded before within
    /// `lifecycle.avatar_cache_ttl`, or fetched now and found to be a picture uploaded
    /// before (the same bytes), else uploaded as `user` now; each recorded. `None` when it
    /// cannot be fetched or is no image (logged).
    async fn uploaded(
        &self,
        user: &UserId,
        url: &str,
    ) -> Result<Option<(String, bool)>, StepError> {
        if let Some(upload) = self.fresh_upload(url).await.map_err(StepError::Store)? {
            return Ok(Some((upload.mxc, true)));
        }
        let source = crate::avatar::url_key(url);
        let avatar = match self.avatars.fetch(url).await {
            Ok(avatar) => avatar,
            Err(error) => {
                tracing::warn!(
                    user = %user,
                    avatar = %redact_url(url),
                    error = %error,
                    "cannot fetch the avatar; keeping the old one"
                );
                // Every update naming the URL would otherwise try it again. Its upload is
                // left as it is: a user who names it next is not given its old picture.
                self.failed_refetches.insert(url.to_owned(), ());
                return Ok(None);
            }
        };
        // The same bytes uploaded before (the URL looked at again after the TTL, or another
        // URL serving the same picture) are not uploaded again.
        let content = format!("sha256:{}", crate::avatar::content_hash(&avatar.bytes));
        let same_picture = match self.remember {
            true => self
                .known_upload(&content)
                .await
                .map_err(StepError::Store)?,
            false => None,
        };
        let (mxc, reused) = match same_picture {
            Some(upload) => (upload.mxc, true),
            None => {
                let mxc = self
                    .homeserver
                    .upload(user, avatar.content_type, avatar.filename, avatar.bytes)
                    .await?
                    .to_string();
                (mxc, false)
            }
        };
        let upload = Upload {
            mxc: mxc.clone(),
            uploaded_ms: now_ms(),
        };
        for key in [source, content] {
            self.shared
                .state
                .record_upload(&key, upload.clone())
                .await
                .map_err(|e| StepError::Store(format!("cannot record the avatar upload: {e}")))?;
            self.uploads.insert(key, upload.clone());
        }
        Ok(Some((mxc, reused)))
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

    /// A plan for a user who does not exist and may not be created. A deletion is still
    /// remembered: an update that comes after it (or is delivered late) must not create
    /// the user it deleted.
    async fn missing(&self, plan: &Plan) -> Outcome<Applied> {
        if plan.deactivates()
            && let Err(StepError::Store(reason)) = self.learn_deactivated(&plan.user).await
        {
            return Outcome::Retry {
                reason,
                retry_after: None,
            };
        }
        Outcome::Done(Applied::MissingUser)
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

#[cfg(test)]
mod tests {
    use super::*;

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
        // Registrations regenerated but not yet loaded by the homeserver: every event would
        // fail alike; the partition waits instead of dead-lettering them all.
        let unknown_token = MatrixError::Api {
            endpoint: "x",
            status: 401,
            errcode: "M_UNKNOWN_TOKEN".into(),
            kind: Some(ruma::api::error::ErrorKind::UnknownToken(
                ruma::api::error::UnknownTokenErrorData::new(),
            )),
            message: "Unrecognised access token".into(),
        };
        assert!(matches!(
            Outcome::<()>::from_error(&unknown_token),
            Outcome::Retry { .. }
        ));
    }
}
