//! Talks to the homeserver: the one client, acting as any namespaced user by masquerading.
//!
//! Invariants: the only credential is the `as_token` (no login code exists; an admin token
//! is used only where a homeserver offers appservices no other way); every request has a
//! timeout, waits for one of a bounded number of permits, and is counted by endpoint and
//! status in `roster_homeserver_requests_total` and timed in
//! `roster_homeserver_request_duration_seconds`. Errors are classified by `errcode`, never
//! by message text.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ruma::api::auth_scheme::{AuthScheme, SendAccessToken};
use ruma::api::client::account::register::{self, LoginType, RegistrationKind};
use ruma::api::client::account::{deactivate, whoami};
use ruma::api::client::alias::{create_alias, get_alias};
use ruma::api::client::appservice::request_ping;
use ruma::api::client::discovery::get_capabilities;
use ruma::api::client::media::create_content;
use ruma::api::client::membership::{
    invite_user, join_room_by_id, joined_members, joined_rooms, kick_user, leave_room,
};
use ruma::api::client::message::send_message_event;
use ruma::api::client::profile::{
    get_profile, get_profile_field, set_avatar_url, set_display_name, set_profile_field,
};
use ruma::api::client::room::create_room;
use ruma::api::client::state::send_state_event;
use ruma::api::error::{ErrorKind, RetryAfter};
use ruma::api::path_builder::{PathBuilder, SinglePath, VersionHistory};
use ruma::api::{
    AppserviceUserIdentity, IncomingResponse, MatrixVersion, OutgoingRequest,
    OutgoingRequestAppserviceExt, SupportedVersions,
};
use ruma::profile::{ProfileFieldName, ProfileFieldValue};
use ruma::{OwnedMxcUri, OwnedRoomId, OwnedUserId, RoomAliasId, RoomId, UserId};
use tokio::sync::{Notify, Semaphore};

use crate::config::{Config, Flavor, Secret};
use crate::metrics::{EndpointLabels, Metrics, RequestLabels};
use crate::registration::{Registrations, acts_with_acting_token};
use crate::retry::Retryable;

/// The longest wait a homeserver's `retry_after` is followed for.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The largest answer roster reads: far above any it expects (`joined_members` of a room
/// of tens of thousands), and with every permit taken at once still a bounded amount of
/// memory; a proxy or a homeserver sending without end cannot exhaust it.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// The most of an error answer's message roster keeps.
const MAX_ERROR_MESSAGE_BYTES: usize = 512;

/// A failed homeserver call, classified so callers can decide to retry, skip or report.
#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    #[error("homeserver refused {endpoint}: HTTP {status} {errcode}: {message}")]
    Api {
        endpoint: &'static str,
        status: u16,
        errcode: String,
        kind: Option<ErrorKind>,
        message: String,
    },
    #[error("homeserver did not answer {endpoint} within {timeout:?}; is it overloaded or down?")]
    Timeout {
        endpoint: &'static str,
        timeout: Duration,
    },
    #[error("cannot reach the homeserver for {endpoint}: {source}; check homeserver.url")]
    Unreachable {
        endpoint: &'static str,
        source: reqwest::Error,
    },
    #[error("homeserver sent an undecodable answer to {endpoint}: {message}")]
    Decode {
        endpoint: &'static str,
        message: String,
    },
    #[error("cannot build the {endpoint} request: {message}")]
    Request {
        endpoint: &'static str,
        message: String,
    },
    #[error("homeserver answered {endpoint} with more than {limit} bytes; not read")]
    TooLarge {
        endpoint: &'static str,
        limit: usize,
    },
}

impl MatrixError {
    /// An error answer, from the parts of its body and its headers.
    ///
    /// A 429 is rate limiting whatever its body says: one without `M_LIMIT_EXCEEDED` (a
    /// proxy's limiter answering with a text body) is classified as one, with the wait its
    /// `Retry-After` header asks for, so that wait is honoured too.
    fn api(
        endpoint: &'static str,
        (status, mut kind, mut message): (u16, Option<ErrorKind>, String),
        headers: &http::HeaderMap,
    ) -> MatrixError {
        // The message goes into log lines and status: a proxy's error page (or any long
        // body) is cut, not quoted whole.
        if message.len() > MAX_ERROR_MESSAGE_BYTES {
            let mut end = MAX_ERROR_MESSAGE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str("... (cut)");
        }
        let errcode = kind
            .as_ref()
            .map(|k| k.errcode().to_string())
            .unwrap_or_else(|| "(no errcode)".into());
        if status == 429 && !matches!(kind, Some(ErrorKind::LimitExceeded(_))) {
            let mut data = ruma::api::error::LimitExceededErrorData::new();
            data.retry_after = headers
                .get(http::header::RETRY_AFTER)
                .and_then(|value| RetryAfter::try_from(value).ok());
            kind = Some(ErrorKind::LimitExceeded(data));
        }
        MatrixError::Api {
            endpoint,
            status,
            errcode,
            kind,
            message,
        }
    }

    pub fn kind(&self) -> Option<&ErrorKind> {
        match self {
            MatrixError::Api { kind, .. } => kind.as_ref(),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            MatrixError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn is_forbidden(&self) -> bool {
        matches!(self.kind(), Some(ErrorKind::Forbidden))
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self.kind(), Some(ErrorKind::NotFound))
    }

    /// How long the homeserver asked roster to wait (`M_LIMIT_EXCEEDED`), at most
    /// [`MAX_RETRY_AFTER`]: a wait of hours (a misconfigured limiter, a proxy's date far
    /// ahead) would stall start-up and the ping loop, so roster asks again sooner.
    pub fn retry_after(&self) -> Option<Duration> {
        let asked = match self.kind()? {
            ErrorKind::LimitExceeded(data) => match data.retry_after.as_ref()? {
                RetryAfter::Delay(d) => *d,
                RetryAfter::DateTime(at) => at
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default(),
            },
            _ => return None,
        };
        Some(asked.min(MAX_RETRY_AFTER))
    }

    /// No answer or a 5xx: the homeserver (or the proxy before it) is not serving; a 429
    /// is an answer.
    pub fn is_unanswered(&self) -> bool {
        match self {
            MatrixError::Timeout { .. } | MatrixError::Unreachable { .. } => true,
            MatrixError::Api { status, .. } => *status >= 500,
            MatrixError::Decode { .. }
            | MatrixError::Request { .. }
            | MatrixError::TooLarge { .. } => false,
        }
    }

    /// Worth retrying later: the homeserver was away, overloaded or rate limiting, or does
    /// not know roster's token (yet): registrations replaced but not loaded, every request
    /// failing alike until the operator fixes it, which is no reason to give up on (or
    /// dead-letter) any one action.
    pub fn is_transient(&self) -> bool {
        match self {
            MatrixError::Timeout { .. } | MatrixError::Unreachable { .. } => true,
            MatrixError::Api { status, kind, .. } => {
                *status >= 500
                    || *status == 429
                    || matches!(
                        kind,
                        Some(
                            ErrorKind::LimitExceeded(_)
                                | ErrorKind::UnknownToken(_)
                                | ErrorKind::MissingToken
                        )
                    )
            }
            MatrixError::Decode { .. }
            | MatrixError::Request { .. }
            | MatrixError::TooLarge { .. } => false,
        }
    }
}

impl Retryable for MatrixError {
    fn is_transient(&self) -> bool {
        MatrixError::is_transient(self)
    }

    fn retry_after(&self) -> Option<Duration> {
        MatrixError::retry_after(self)
    }
}

/// Borrows a response's body as bytes, the form ruma decodes from.
trait AsRefBody {
    fn as_ref_body(&self) -> http::Response<&[u8]>;
}

impl AsRefBody for http::Response<Bytes> {
    fn as_ref_body(&self) -> http::Response<&[u8]> {
        let mut builder = http::Response::builder().status(self.status());
        if let Some(headers) = builder.headers_mut() {
            *headers = self.headers().clone();
        }
        builder
            .body(self.body().as_ref())
            .expect("status and headers came from a valid response")
    }
}

/// Endpoint errors roster can read an errcode from.
pub trait ErrorBody {
    fn parts(self) -> (u16, Option<ErrorKind>, String);
}

impl ErrorBody for ruma::api::error::Error {
    fn parts(self) -> (u16, Option<ErrorKind>, String) {
        let status = self.status_code.as_u16();
        match self.body {
            ruma::api::error::ErrorBody::Standard(body) => (status, Some(body.kind), body.message),
            other => (status, None, format!("{other:?}")),
        }
    }
}

impl ErrorBody for ruma::api::client::uiaa::UiaaResponse {
    fn parts(self) -> (u16, Option<ErrorKind>, String) {
        match self {
            ruma::api::client::uiaa::UiaaResponse::MatrixError(e) => e.parts(),
            // roster never does interactive auth: asking for it means the homeserver does
            // not treat the request as coming from the appservice.
            ruma::api::client::uiaa::UiaaResponse::AuthResponse(_) => (
                401,
                None,
                "homeserver asked for interactive auth; is the as_token registered?".into(),
            ),
        }
    }
}

/// Produces what a request's path builder needs from the versions roster speaks.
pub trait PathInput: PathBuilder {
    fn input(versions: &SupportedVersions) -> Self::Input<'_>;
}

impl PathInput for VersionHistory {
    fn input(versions: &SupportedVersions) -> Cow<'_, SupportedVersions> {
        Cow::Borrowed(versions)
    }
}

impl PathInput for SinglePath {
    fn input(_: &SupportedVersions) {}
}

/// A ruma request roster can send: appservice-authenticated, with a path roster can build
/// and an error body it can classify.
pub trait Endpoint:
    OutgoingRequest<
        Authentication: for<'a> AuthScheme<Input<'a> = SendAccessToken<'a>>,
        PathBuilder: PathInput,
        EndpointError: ErrorBody,
    >
{
}

impl<R> Endpoint for R where
    R: OutgoingRequest<
            Authentication: for<'a> AuthScheme<Input<'a> = SendAccessToken<'a>>,
            PathBuilder: PathInput,
            EndpointError: ErrorBody,
        >
{
}

/// A member as `joined_members` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinedMember {
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
}

/// Whether registering a user created it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    Created,
    /// `M_USER_IN_USE`: it existed already, which is what roster wanted.
    AlreadyExists,
}

/// Which appservice token a request carries: the pushed registration's, or the acting-only
/// registration's for the users it covers (people's accounts, identity users).
#[derive(Clone)]
pub struct Tokens {
    pushed: Secret,
    acting: Option<Acting>,
}

#[derive(Clone)]
struct Acting {
    token: Secret,
    server_name: ruma::OwnedServerName,
    /// Whether a localpart on `server_name` belongs to the acting registration.
    covers: Arc<dyn Fn(&str) -> bool + Send + Sync>,
}

impl Tokens {
    /// One registration for everything (a legacy single registration, tests).
    pub fn single(token: Secret) -> Tokens {
        Tokens {
            pushed: token,
            acting: None,
        }
    }

    /// A pushed and an acting registration: localparts on `server_name` that `covers`
    /// accepts use `acting`.
    pub fn pair(
        pushed: Secret,
        acting: Secret,
        server_name: ruma::OwnedServerName,
        covers: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Tokens {
        Tokens {
            pushed,
            acting: Some(Acting {
                token: acting,
                server_name,
                covers: Arc::new(covers),
            }),
        }
    }

    fn for_user(&self, user: Option<&UserId>) -> &Secret {
        match (&self.acting, user) {
            (Some(acting), Some(user))
                if user.server_name() == acting.server_name
                    && (acting.covers)(user.localpart()) =>
            {
                &acting.token
            }
            _ => &self.pushed,
        }
    }

    fn for_localpart(&self, localpart: &str) -> &Secret {
        match &self.acting {
            Some(acting) if (acting.covers)(localpart) => &acting.token,
            _ => &self.pushed,
        }
    }
}

#[derive(Clone)]
pub struct Homeserver {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base_url: String,
    tokens: Tokens,
    /// The Matrix versions whose paths roster uses: all endpoints it calls are stable
    /// since 1.7 (the appservice ping), so no `/versions` round trip is needed.
    versions: SupportedVersions,
    permits: Semaphore,
    timeout: Duration,
    metrics: Arc<Metrics>,
    /// Only for what a homeserver offers appservices no other way to do (tuwunel
    /// deactivation); never sent anywhere else.
    admin_token: Option<Secret>,
    /// Told every request's outcome, for status (see [`Homeserver::with_health_report`]).
    health: Option<HealthReport>,
    /// The last request got no answer or a 5xx.
    failing: AtomicBool,
    /// A probe got no answer or a 5xx: the homeserver itself is away, not one request
    /// refused (a 5xx for one room while probes answer is that request's own retry).
    away: AtomicBool,
    /// Times the homeserver answered again after being away; waiters are woken each time.
    recoveries: AtomicU64,
    answered_again: Notify,
}

/// Receives each request's outcome: `Err` with the reason when the homeserver gave no
/// answer or a 5xx.
pub type HealthReport = Arc<dyn Fn(Result<(), String>) + Send + Sync>;

impl Homeserver {
    pub fn new(
        base_url: &str,
        tokens: Tokens,
        timeout: Duration,
        max_concurrent: usize,
        metrics: Arc<Metrics>,
    ) -> Homeserver {
        let http = crate::http_client(timeout);
        let versions = SupportedVersions {
            versions: [
                MatrixVersion::V1_1,
                MatrixVersion::V1_2,
                MatrixVersion::V1_3,
                MatrixVersion::V1_4,
                MatrixVersion::V1_5,
                MatrixVersion::V1_6,
                MatrixVersion::V1_7,
            ]
            .into(),
            features: Default::default(),
        };
        Homeserver {
            inner: Arc::new(Inner {
                http,
                base_url: base_url.trim_end_matches('/').to_owned(),
                tokens,
                versions,
                permits: Semaphore::new(max_concurrent.max(1)),
                timeout,
                metrics,
                admin_token: None,
                health: None,
                failing: AtomicBool::new(false),
                away: AtomicBool::new(false),
                recoveries: AtomicU64::new(0),
                answered_again: Notify::new(),
            }),
        }
    }

    /// The client `config` describes, acting with the tokens of `registrations`.
    pub fn from_config(
        config: &Config,
        registrations: &Registrations,
        metrics: Arc<Metrics>,
    ) -> Homeserver {
        let pushed = Secret::new(registrations.pushed.as_token.clone());
        let tokens = match &registrations.acting {
            Some(acting) => {
                let server = config.ids().server_name.clone();
                let covering = config.clone();
                Tokens::pair(
                    pushed,
                    Secret::new(acting.as_token.clone()),
                    server.clone(),
                    move |localpart| {
                        ruma::UserId::parse_with_server_name(localpart, &server)
                            .is_ok_and(|user| acts_with_acting_token(&covering, &user))
                    },
                )
            }
            None => Tokens::single(pushed),
        };
        Homeserver::new(
            &config.homeserver.url,
            tokens,
            config.homeserver.request_timeout,
            config.homeserver.max_concurrent_requests,
            metrics,
        )
        .with_admin_token(config.homeserver.admin_token.clone())
    }

    /// Gives the client the homeserver admin token (`homeserver.admin_token`).
    ///
    /// Call before the client is cloned: clones share one token.
    pub fn with_admin_token(mut self, token: Option<Secret>) -> Homeserver {
        Arc::get_mut(&mut self.inner)
            .expect("with_admin_token is called before the client is shared")
            .admin_token = token;
        self
    }

    /// Reports every request's outcome to `report` (status shows whether the homeserver
    /// answers).
    ///
    /// Call before the client is cloned, like [`Homeserver::with_admin_token`].
    pub fn with_health_report(mut self, report: HealthReport) -> Homeserver {
        Arc::get_mut(&mut self.inner)
            .expect("with_health_report is called before the client is shared")
            .health = Some(report);
        self
    }

    /// Whether the last request got no answer (timeout, refused connection) or a 5xx.
    pub fn is_failing(&self) -> bool {
        self.inner.failing.load(Ordering::SeqCst)
    }

    /// How many times the homeserver answered again after being away.
    pub fn recoveries(&self) -> u64 {
        self.inner.recoveries.load(Ordering::SeqCst)
    }

    /// Waits until the homeserver answers a request again after a probe found it away.
    pub async fn answers_again(&self) {
        self.inner.answered_again.notified().await
    }

    /// Asks the homeserver whether it answers at all (`whoami`, the cheapest request).
    /// Unanswered (or a 5xx), the homeserver counts as away and its next answer as a
    /// recovery; a failed request while probes answer is no outage.
    pub async fn probe(&self) -> bool {
        let answered = match self.whoami(None).await {
            Ok(_) => true,
            Err(e) => !e.is_unanswered(),
        };
        if !answered {
            self.inner.away.store(true, Ordering::SeqCst);
        }
        answered
    }

    /// Records a request's outcome: for [`Homeserver::is_failing`], its waiters, and status.
    fn observe(&self, outcome: Result<(), String>) {
        let inner = &self.inner;
        match &outcome {
            Err(_) => inner.failing.store(true, Ordering::SeqCst),
            Ok(()) => {
                inner.failing.store(false, Ordering::SeqCst);
                if inner.away.swap(false, Ordering::SeqCst) {
                    inner.recoveries.fetch_add(1, Ordering::SeqCst);
                    inner.answered_again.notify_waiters();
                }
            }
        }
        if let Some(health) = &inner.health {
            health(outcome);
        }
    }

    /// Sends `request` as `as_user` (masquerading), or as the appservice sender.
    pub async fn send<R: Endpoint>(
        &self,
        endpoint: &'static str,
        request: R,
        as_user: Option<&UserId>,
    ) -> Result<R::IncomingResponse, MatrixError> {
        let token = self.inner.tokens.for_user(as_user);
        self.send_with(endpoint, request, as_user, token).await
    }

    /// `send` with an explicit token.
    async fn send_with<R: Endpoint>(
        &self,
        endpoint: &'static str,
        request: R,
        as_user: Option<&UserId>,
        token: &Secret,
    ) -> Result<R::IncomingResponse, MatrixError> {
        let inner = &self.inner;
        let identity = match as_user {
            Some(user) => AppserviceUserIdentity::new(user),
            None => AppserviceUserIdentity::default(),
        };
        let http_request = request
            .try_into_http_request_with_identity::<Vec<u8>>(
                &inner.base_url,
                // Sent even where the spec needs none (profile lookups): homeservers that
                // require it (Synapse's require_auth_for_profile_requests) answer too.
                SendAccessToken::Always(token.expose()),
                identity,
                R::PathBuilder::input(&inner.versions),
            )
            .map_err(|e| MatrixError::Request {
                endpoint,
                message: e.to_string(),
            })?;
        let http_request =
            reqwest::Request::try_from(http_request).map_err(|e| MatrixError::Request {
                endpoint,
                message: e.to_string(),
            })?;

        let response = self.exchange(endpoint, http_request).await?;
        let http_response = response.as_ref_body();
        if http_response.status().as_u16() >= 400 {
            use ruma::api::EndpointError;
            let headers = http_response.headers().clone();
            return Err(MatrixError::api(
                endpoint,
                R::EndpointError::from_http_response(http_response).parts(),
                &headers,
            ));
        }
        R::IncomingResponse::try_from_http_response_inner(http_response).map_err(|e| {
            MatrixError::Decode {
                endpoint,
                message: e.to_string(),
            }
        })
    }

    /// Sends one request within the concurrency bound, counts it by endpoint and status,
    /// and reads the whole answer, at most [`MAX_RESPONSE_BYTES`] of it (the client's
    /// timeout covers the body too).
    async fn exchange(
        &self,
        endpoint: &'static str,
        request: reqwest::Request,
    ) -> Result<http::Response<Bytes>, MatrixError> {
        let inner = &self.inner;
        let count = |status: String| {
            inner
                .metrics
                .homeserver_requests
                .get_or_create(&RequestLabels { endpoint, status })
                .inc();
        };
        let transport = |source: reqwest::Error| {
            if source.is_timeout() {
                MatrixError::Timeout {
                    endpoint,
                    timeout: inner.timeout,
                }
            } else {
                MatrixError::Unreachable { endpoint, source }
            }
        };
        let _permit = inner
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        inner.metrics.count_homeserver_request();
        let started = std::time::Instant::now();
        let timed = || {
            inner
                .metrics
                .homeserver_request_duration_seconds
                .get_or_create(&EndpointLabels { endpoint })
                .observe(started.elapsed().as_secs_f64());
        };
        let report = |outcome| self.observe(outcome);
        let response = inner.http.execute(request).await.map_err(|source| {
            count("error".into());
            timed();
            let error = transport(source);
            report(Err(error.to_string()));
            error
        })?;
        let status = response.status();
        count(status.as_u16().to_string());
        report(match status.is_server_error() {
            true => Err(format!(
                "homeserver answered {endpoint} with HTTP {}",
                status.as_u16()
            )),
            false => Ok(()),
        });
        let mut builder = http::Response::builder().status(status);
        if let Some(headers) = builder.headers_mut() {
            *headers = response.headers().clone();
        }
        let body = read_limited(response, MAX_RESPONSE_BYTES).await;
        timed();
        let body = match body {
            Ok(body) => body,
            Err(None) => {
                return Err(MatrixError::TooLarge {
                    endpoint,
                    limit: MAX_RESPONSE_BYTES,
                });
            }
            Err(Some(source)) => {
                let error = transport(source);
                report(Err(error.to_string()));
                return Err(error);
            }
        };
        Ok(builder
            .body(body)
            .expect("status and headers came from a valid response"))
    }

    /// Registers `localpart` as an appservice user (with the token of the registration
    /// whose namespace holds it); no device, no access token.
    pub async fn register(&self, localpart: &str) -> Result<Registered, MatrixError> {
        let mut request = register::v3::Request::new();
        request.username = Some(localpart.to_owned());
        request.login_type = Some(LoginType::ApplicationService);
        request.inhibit_login = true;
        request.kind = RegistrationKind::User;
        let token = self.inner.tokens.for_localpart(localpart).clone();
        match self.send_with("register", request, None, &token).await {
            Ok(_) => Ok(Registered::Created),
            Err(e) if matches!(e.kind(), Some(ErrorKind::UserInUse)) => {
                Ok(Registered::AlreadyExists)
            }
            Err(e) => Err(e),
        }
    }

    pub async fn create_room(
        &self,
        as_user: &UserId,
        request: create_room::v3::Request,
    ) -> Result<OwnedRoomId, MatrixError> {
        Ok(self
            .send("create_room", request, Some(as_user))
            .await?
            .room_id)
    }

    pub async fn invite(
        &self,
        as_user: &UserId,
        room: &RoomId,
        user: &UserId,
    ) -> Result<(), MatrixError> {
        let recipient = invite_user::v3::InvitationRecipient::UserId(
            invite_user::v3::InviteUserId::new(user.to_owned()),
        );
        let request = invite_user::v3::Request::new(room.to_owned(), recipient);
        self.send("invite", request, Some(as_user)).await?;
        Ok(())
    }

    pub async fn join(&self, as_user: &UserId, room: &RoomId) -> Result<(), MatrixError> {
        let request = join_room_by_id::v3::Request::new(room.to_owned());
        self.send("join", request, Some(as_user)).await?;
        Ok(())
    }

    pub async fn leave(&self, as_user: &UserId, room: &RoomId) -> Result<(), MatrixError> {
        let request = leave_room::v3::Request::new(room.to_owned());
        self.send("leave", request, Some(as_user)).await?;
        Ok(())
    }

    pub async fn kick(
        &self,
        as_user: &UserId,
        room: &RoomId,
        user: &UserId,
        reason: Option<String>,
    ) -> Result<(), MatrixError> {
        let mut request = kick_user::v3::Request::new(room.to_owned(), user.to_owned());
        request.reason = reason;
        self.send("kick", request, Some(as_user)).await?;
        Ok(())
    }

    pub async fn joined_members(
        &self,
        as_user: &UserId,
        room: &RoomId,
    ) -> Result<BTreeMap<OwnedUserId, JoinedMember>, MatrixError> {
        let request = joined_members::v3::Request::new(room.to_owned());
        let response = self.send("joined_members", request, Some(as_user)).await?;
        Ok(response
            .joined
            .into_iter()
            .map(|(user, member)| {
                (
                    user,
                    JoinedMember {
                        displayname: member.display_name,
                        avatar_url: member.avatar_url.map(|u| u.to_string()),
                    },
                )
            })
            .collect())
    }

    /// The room an alias points to, or `None` when the alias does not exist.
    pub async fn resolve_alias(
        &self,
        alias: &RoomAliasId,
    ) -> Result<Option<OwnedRoomId>, MatrixError> {
        let request = get_alias::v3::Request::new(alias.to_owned());
        match self.send("resolve_alias", request, None).await {
            Ok(response) => Ok(Some(response.room_id)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn set_display_name(&self, user: &UserId, name: &str) -> Result<(), MatrixError> {
        let request = set_profile_field::v3::Request::new(
            user.to_owned(),
            ProfileFieldValue::DisplayName(name.to_owned()),
        );
        self.send("set_display_name", request, Some(user)).await?;
        Ok(())
    }

    pub async fn set_avatar_url(&self, user: &UserId, url: OwnedMxcUri) -> Result<(), MatrixError> {
        let request =
            set_profile_field::v3::Request::new(user.to_owned(), ProfileFieldValue::AvatarUrl(url));
        self.send("set_avatar_url", request, Some(user)).await?;
        Ok(())
    }

    /// The avatar `user` has now (`None`: none set, or the user has no profile).
    /// Whether `user` exists, asked as the appservice itself (no masquerading): a profile
    /// is not found only for a user who does not exist. Tells "not registered" from "not
    /// roster's to act as", which both refuse masquerading with M_FORBIDDEN.
    pub async fn user_exists(&self, user: &UserId) -> Result<bool, MatrixError> {
        let request = get_profile::v3::Request::new(user.to_owned());
        match self.send("get_profile", request, None).await {
            Ok(_) => Ok(true),
            // By status: Synapse 1.163 answers 404 M_UNKNOWN "No row found (profiles)",
            // tuwunel 404 M_NOT_FOUND.
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn avatar_url(&self, user: &UserId) -> Result<Option<String>, MatrixError> {
        let request =
            get_profile_field::v3::Request::new(user.to_owned(), ProfileFieldName::AvatarUrl);
        match self.send("get_avatar_url", request, Some(user)).await {
            Ok(response) => Ok(match response.value {
                Some(ProfileFieldValue::AvatarUrl(uri)) => Some(uri.to_string()),
                _ => None,
            }),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends a message as `as_user`; the same `txn_id` twice is one message (the homeserver
    /// dedupes it). `at` sets the event's timestamp (appservices may, on Synapse).
    pub async fn send_message(
        &self,
        as_user: &UserId,
        room: &RoomId,
        txn_id: &str,
        content: serde_json::Value,
        at: Option<u64>,
    ) -> Result<(), MatrixError> {
        let raw = serde_json::value::to_raw_value(&content).map_err(|e| MatrixError::Request {
            endpoint: "send_message",
            message: e.to_string(),
        })?;
        let mut request = send_message_event::v3::Request::new_raw(
            room.to_owned(),
            txn_id.into(),
            "m.room.message".into(),
            ruma::serde::Raw::from_json(raw),
        );
        request.timestamp = at
            .and_then(ruma::UInt::new)
            .map(ruma::MilliSecondsSinceUnixEpoch);
        self.send("send_message", request, Some(as_user)).await?;
        Ok(())
    }

    /// Sets a state event in `room` as `as_user`.
    pub async fn send_state<C, K>(
        &self,
        as_user: &UserId,
        room: &RoomId,
        state_key: &K,
        content: &C,
    ) -> Result<(), MatrixError>
    where
        C: ruma::events::StateEventContent,
        C::StateKey: std::borrow::Borrow<K>,
        K: AsRef<str> + ?Sized,
    {
        let request = send_state_event::v3::Request::new(room.to_owned(), state_key, content)
            .map_err(|e| MatrixError::Request {
                endpoint: "send_state",
                message: e.to_string(),
            })?;
        self.send("send_state", request, Some(as_user)).await?;
        Ok(())
    }

    /// Sets a room-wide state event (empty state key: name, topic, settings) as `as_user`.
    pub async fn set_room_state<C>(
        &self,
        as_user: &UserId,
        room: &RoomId,
        content: &C,
    ) -> Result<(), MatrixError>
    where
        C: ruma::events::StateEventContent<StateKey = ruma::events::EmptyStateKey>,
    {
        self.send_state(as_user, room, &ruma::events::EmptyStateKey, content)
            .await
    }

    /// Sets a state event from raw JSON content, for contents without a typed form (an
    /// empty `m.space.child` removes a child).
    pub async fn send_raw_state(
        &self,
        as_user: &UserId,
        room: &RoomId,
        event_type: &str,
        state_key: &str,
        content: serde_json::Value,
    ) -> Result<(), MatrixError> {
        let raw = serde_json::value::to_raw_value(&content).map_err(|e| MatrixError::Request {
            endpoint: "send_state",
            message: e.to_string(),
        })?;
        let request = send_state_event::v3::Request::new_raw(
            room.to_owned(),
            event_type.into(),
            state_key.to_owned(),
            ruma::serde::Raw::from_json(raw),
        );
        self.send("send_state", request, Some(as_user)).await?;
        Ok(())
    }

    /// Points `alias` at `room`, as `as_user`.
    pub async fn create_alias(
        &self,
        as_user: &UserId,
        alias: &RoomAliasId,
        room: &RoomId,
    ) -> Result<(), MatrixError> {
        let request = create_alias::v3::Request::new(alias.to_owned(), room.to_owned());
        self.send("create_alias", request, Some(as_user)).await?;
        Ok(())
    }

    /// The room version the homeserver creates rooms with.
    pub async fn default_room_version(&self) -> Result<String, MatrixError> {
        let response = self
            .send("capabilities", get_capabilities::v3::Request::new(), None)
            .await?;
        Ok(response.capabilities.room_versions.default.to_string())
    }

    /// Who the homeserver takes roster for when acting as `as_user`.
    pub async fn whoami(&self, as_user: Option<&UserId>) -> Result<OwnedUserId, MatrixError> {
        Ok(self
            .send("whoami", whoami::v3::Request::new(), as_user)
            .await?
            .user_id)
    }

    /// Asks the homeserver to ping roster back (the pushed registration; the acting one has
    /// no URL, and tuwunel answers `UrlNotSet` for it); Synapse then also flushes the
    /// transactions it queued while roster was away.
    pub async fn ping(&self, appservice_id: &str) -> Result<Duration, MatrixError> {
        let request = request_ping::v1::Request::new(appservice_id.to_owned());
        Ok(self.send("appservice_ping", request, None).await?.duration)
    }

    /// Uploads `bytes` to the media repository as `as_user`; returns its `mxc://` URI.
    pub async fn upload(
        &self,
        as_user: &UserId,
        content_type: &str,
        filename: Option<String>,
        bytes: Vec<u8>,
    ) -> Result<OwnedMxcUri, MatrixError> {
        let mut request = create_content::v3::Request::new(bytes);
        request.content_type = Some(content_type.to_owned());
        request.filename = filename;
        Ok(self
            .send("upload", request, Some(as_user))
            .await?
            .content_uri)
    }

    /// Deactivates `user` by masquerading as it; `erase` also erases its profile.
    ///
    /// Synapse lets an appservice do this without interactive auth and leaves the user's
    /// rooms itself. tuwunel asks for interactive auth instead (see `admin_deactivate`).
    pub async fn deactivate(&self, user: &UserId, erase: bool) -> Result<(), MatrixError> {
        let mut request = deactivate::v3::Request::new();
        request.erase = erase;
        self.send("deactivate", request, Some(user)).await?;
        Ok(())
    }

    /// The rooms `user` is joined to, asked as the user.
    pub async fn joined_rooms(&self, user: &UserId) -> Result<Vec<OwnedRoomId>, MatrixError> {
        let request = joined_rooms::v3::Request::new();
        Ok(self
            .send("joined_rooms", request, Some(user))
            .await?
            .joined_rooms)
    }

    /// Removes `user`'s display name and avatar, as the user.
    ///
    /// Uses the profile endpoints with an absent value (which tuwunel reads as "remove");
    /// Synapse erases profiles itself on deactivation and is never asked this.
    #[allow(deprecated)] // the per-field endpoints are the ones that can remove a value
    pub async fn clear_profile(&self, user: &UserId) -> Result<(), MatrixError> {
        let request = set_display_name::v3::Request::new(user.to_owned(), None);
        self.send("clear_display_name", request, Some(user)).await?;
        let request = set_avatar_url::v3::Request::new(user.to_owned(), None);
        self.send("clear_avatar_url", request, Some(user)).await?;
        Ok(())
    }

    /// Deactivates `user` through the Synapse-compatible admin API with the admin token:
    /// `POST /_synapse/admin/v1/deactivate/{user}`. For homeservers (tuwunel) that give
    /// appservices no other way.
    pub async fn admin_deactivate(&self, user: &UserId, erase: bool) -> Result<(), MatrixError> {
        const ENDPOINT: &str = "admin_deactivate";
        let Some(token) = self.inner.admin_token.clone() else {
            return Err(MatrixError::Request {
                endpoint: ENDPOINT,
                message: "no admin token; set homeserver.admin_token (MATRIX_ADMIN_TOKEN)".into(),
            });
        };
        let path = format!(
            "/_synapse/admin/v1/deactivate/{}",
            percent_encode_path(user.as_str())
        );
        let body = serde_json::json!({ "erase": erase });
        self.send_raw(
            ENDPOINT,
            reqwest::Method::POST,
            &path,
            Some(&token),
            Some(body),
        )
        .await?;
        Ok(())
    }

    /// Which homeserver answers: from `GET /_matrix/federation/v1/version`, else Synapse's
    /// own unauthenticated `GET /_synapse/admin/v1/server_version`.
    ///
    /// `Ok(None)`: it answered neither way, or named a server roster does not know.
    pub async fn detect_flavor(&self) -> Result<Option<(Flavor, String)>, MatrixError> {
        match self
            .send_raw(
                "federation_version",
                reqwest::Method::GET,
                "/_matrix/federation/v1/version",
                None,
                None,
            )
            .await
        {
            Ok(body) => {
                let name = body["server"]["name"].as_str().unwrap_or_default();
                let version = body["server"]["version"].as_str().unwrap_or_default();
                let described = format!("{name} {version}").trim().to_owned();
                return Ok(flavor_of(name).map(|flavor| (flavor, described)));
            }
            Err(e) if e.is_transient() => return Err(e),
            Err(_) => {}
        }
        match self
            .send_raw(
                "synapse_server_version",
                reqwest::Method::GET,
                "/_synapse/admin/v1/server_version",
                None,
                None,
            )
            .await
        {
            Ok(body) => Ok(body["server_version"]
                .as_str()
                .map(|v| (Flavor::Synapse, format!("Synapse {v}")))),
            Err(e) if e.is_transient() => Err(e),
            Err(_) => Ok(None),
        }
    }

    /// A request that has no ruma type (admin and discovery endpoints), with the same
    /// permits, timeout, metrics and error classification as `send`.
    async fn send_raw(
        &self,
        endpoint: &'static str,
        method: reqwest::Method,
        path: &str,
        bearer: Option<&Secret>,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, MatrixError> {
        let inner = &self.inner;
        let mut request = inner
            .http
            .request(method, format!("{}{path}", inner.base_url));
        if let Some(token) = bearer {
            request = request.bearer_auth(token.expose());
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let request = request.build().map_err(|e| MatrixError::Request {
            endpoint,
            message: e.to_string(),
        })?;
        let response = self.exchange(endpoint, request).await?;
        if response.status().as_u16() >= 400 {
            use ruma::api::EndpointError;
            return Err(MatrixError::api(
                endpoint,
                ruma::api::error::Error::from_http_response(response.as_ref_body()).parts(),
                response.headers(),
            ));
        }
        let bytes = response.into_body();
        serde_json::from_slice(&bytes).map_err(|e| MatrixError::Decode {
            endpoint,
            message: e.to_string(),
        })
    }
}

/// The body of `response` when it is at most `limit` bytes; `Err(None)` as soon as it is
/// known to be longer (its `Content-Length`, or what arrived), without reading the rest.
async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Bytes, Option<reqwest::Error>> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(None);
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(Some)? {
        if body.len() + chunk.len() > limit {
            return Err(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The flavor a server name (`/_matrix/federation/v1/version`) stands for.
fn flavor_of(server_name: &str) -> Option<Flavor> {
    let name = server_name.to_ascii_lowercase();
    if name.contains("synapse") {
        Some(Flavor::Synapse)
    } else if ["tuwunel", "conduwuit", "continuwuity", "conduit"]
        .iter()
        .any(|n| name.contains(n))
    {
        // The conduit family shares tuwunel's appservice and admin API behaviour.
        Some(Flavor::Tuwunel)
    } else {
        None
    }
}

/// Escapes a user id for a path segment (`@` and `:` are fine; keep it conservative).
fn percent_encode_path(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'@' | b':' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A homeserver asking for a wait of hours is asked again after five minutes.
    #[test]
    fn should_follow_retry_after_up_to_five_minutes() {
        let limited = |asked: Duration| {
            let mut data = ruma::api::error::LimitExceededErrorData::new();
            data.retry_after = Some(RetryAfter::Delay(asked));
            MatrixError::Api {
                endpoint: "join",
                status: 429,
                errcode: "M_LIMIT_EXCEEDED".into(),
                kind: Some(ErrorKind::LimitExceeded(data)),
                message: "slow down".into(),
            }
        };
        let short = Duration::from_millis(1_500);
        assert_eq!(limited(short).retry_after(), Some(short));
        let day = Duration::from_secs(86_400);
        assert_eq!(limited(day).retry_after(), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn should_tell_flavors_from_server_names() {
        assert_eq!(flavor_of("Synapse"), Some(Flavor::Synapse));
        assert_eq!(flavor_of("Tuwunel"), Some(Flavor::Tuwunel));
        assert_eq!(flavor_of("conduwuit"), Some(Flavor::Tuwunel));
        assert_eq!(flavor_of("Dendrite"), None);
        assert_eq!(flavor_of(""), None);
    }

    #[tokio::test]
    async fn should_tell_when_the_homeserver_answers_again_after_failing() {
        let (fake, shared) = crate::testing::stack("").await;
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorded = seen.clone();
        let hs = crate::testing::client(&shared).with_health_report(Arc::new(move |outcome| {
            recorded.lock().unwrap().push(outcome.is_ok())
        }));
        hs.whoami(None).await.unwrap();
        assert!(!hs.is_failing());
        fake.fail("/whoami", 503, "M_UNKNOWN", "down for maintenance", 2);
        hs.whoami(None).await.unwrap_err();
        assert!(!hs.probe().await, "a 503 is no answer");
        assert!(hs.is_failing());
        assert_eq!(hs.recoveries(), 0);
        // A 4xx is an answer: the homeserver is there.
        let waiter = tokio::spawn({
            let hs = hs.clone();
            async move { hs.answers_again().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        fake.fail("/whoami", 403, "M_FORBIDDEN", "no", 1);
        hs.whoami(None).await.unwrap_err();
        assert!(!hs.is_failing());
        assert_eq!(hs.recoveries(), 1);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter is woken")
            .unwrap();
        hs.whoami(None).await.unwrap();
        assert_eq!(hs.recoveries(), 1, "only a failure then an answer counts");
        assert_eq!(*seen.lock().unwrap(), vec![true, false, false, true, true]);
    }

    #[tokio::test]
    async fn should_not_count_one_refused_request_as_an_outage_while_probes_answer() {
        let (fake, shared) = crate::testing::stack("").await;
        let hs = crate::testing::client(&shared);
        let bot = ruma::user_id!("@letta:ex.org");
        // One endpoint keeps failing (a homeserver bug for one room), the rest answers.
        fake.fail("/displayname", 500, "M_UNKNOWN", "internal error", 3);
        for _ in 0..3 {
            hs.set_display_name(bot, "Letta").await.unwrap_err();
            assert!(hs.is_failing());
            assert!(hs.probe().await);
        }
        assert!(!hs.is_failing());
        assert_eq!(
            hs.recoveries(),
            0,
            "no recovery, so no reconcile-everything and no early end of backoffs"
        );
    }

    /// A homeserver client against `router` served on a loopback port, with `timeout`.
    async fn client_of(router: axum::Router, timeout: Duration) -> Homeserver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        Homeserver::new(
            &url,
            Tokens::single(Secret::new("token")),
            timeout,
            4,
            Arc::new(Metrics::new()),
        )
    }

    /// An answer that does not end (a proxy gone wrong) is cut off at the limit instead of
    /// filling memory until the request times out; one declared too long is not read.
    #[tokio::test]
    async fn should_stop_reading_an_answer_longer_than_the_limit() {
        use futures::StreamExt;
        let router = axum::Router::new()
            .route(
                "/_matrix/client/v3/account/whoami",
                axum::routing::get(|| async {
                    let chunk = Bytes::from(vec![b' '; 64 * 1024]);
                    let endless = futures::stream::repeat(chunk).map(Ok::<_, std::io::Error>);
                    axum::body::Body::from_stream(endless)
                }),
            )
            .route(
                "/_matrix/client/v3/joined_rooms",
                axum::routing::get(|| async { vec![b' '; MAX_RESPONSE_BYTES + 1] }),
            );
        // Long enough that a client reading on would fill far more than the limit first.
        let hs = client_of(router, Duration::from_secs(120)).await;
        let error = hs.whoami(None).await.unwrap_err();
        assert!(
            matches!(
                error,
                MatrixError::TooLarge {
                    endpoint: "whoami",
                    ..
                }
            ),
            "{error}"
        );
        assert!(
            !error.is_transient(),
            "the same answer again would not fit either"
        );
        let user = ruma::user_id!("@nova-1:ex.org");
        let error = hs.joined_rooms(user).await.unwrap_err();
        assert!(matches!(error, MatrixError::TooLarge { .. }), "{error}");
    }

    /// A 429 from a proxy's rate limiter (no Matrix error body, a `Retry-After` header) is
    /// waited out as asked, like Synapse's own `M_LIMIT_EXCEEDED`; one asking nothing is
    /// still rate limiting.
    #[tokio::test]
    async fn should_honour_retry_after_of_a_429_without_a_matrix_body() {
        use axum::http::{StatusCode, header};
        use axum::response::IntoResponse;
        let router = axum::Router::new()
            .route(
                "/_matrix/client/v3/account/whoami",
                axum::routing::get(|| async {
                    (
                        StatusCode::TOO_MANY_REQUESTS,
                        [(header::RETRY_AFTER, "7")],
                        "429 Too Many Requests",
                    )
                        .into_response()
                }),
            )
            .route(
                "/_matrix/client/v3/joined_rooms",
                axum::routing::get(|| async {
                    (StatusCode::TOO_MANY_REQUESTS, "slow down").into_response()
                }),
            );
        let hs = client_of(router, Duration::from_secs(30)).await;
        let error = hs.whoami(None).await.unwrap_err();
        assert!(error.is_transient(), "{error}");
        assert_eq!(error.retry_after(), Some(Duration::from_secs(7)), "{error}");
        let user = ruma::user_id!("@nova-1:ex.org");
        let error = hs.joined_rooms(user).await.unwrap_err();
        assert!(
            matches!(error.kind(), Some(ErrorKind::LimitExceeded(_))),
            "{error:?}"
        );
        assert_eq!(error.retry_after(), None);
    }

    /// An error page (a proxy's HTML, a stack trace) is not carried whole into the error's
    /// message, which log lines and status quote.
    #[tokio::test]
    async fn should_cut_a_long_error_body_in_the_message() {
        use axum::http::StatusCode;
        use axum::response::IntoResponse;
        let router = axum::Router::new().route(
            "/_matrix/client/v3/account/whoami",
            axum::routing::get(|| async {
                (StatusCode::BAD_GATEWAY, "<html>é".repeat(20_000)).into_response()
            }),
        );
        let hs = client_of(router, Duration::from_secs(30)).await;
        let error = hs.whoami(None).await.unwrap_err();
        assert!(error.is_transient(), "{error}");
        let shown = error.to_string();
        assert!(shown.len() < 1024, "{} bytes", shown.len());
        assert!(shown.contains("HTTP 502"), "{shown}");
    }

    #[test]
    fn should_escape_user_ids_for_paths() {
        assert_eq!(
            percent_encode_path("@nova-1:example.org"),
            "@nova-1:example.org"
        );
        assert_eq!(percent_encode_path("@a/b:x y"), "@a%2Fb:x%20y");
    }
}
