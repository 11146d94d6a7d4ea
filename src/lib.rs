//! roster: a Matrix application service that keeps agent rooms converged and applies
//! identity lifecycle events, acting only by masquerading with its appservice token. It
//! never logs in.
//!
//! The map (ingress feeds `state`; `reconcile` and the identity effects read it and drive
//! `matrix`):
//!
//! - [`config`]: one typed configuration from YAML and the environment, validated.
//! - [`ids`]: every naming rule (agent users and aliases, `@nova-*`, namespaces).
//! - [`clock`]: the wall clock, read in one place.
//! - [`registration`]: generates and reads the appservice registration.
//! - [`state`]: the one owner of the model, the store and the status; verbs that persist
//!   first, then commit.
//! - [`appservice`]: the routes the homeserver calls; hs_token auth, dedup, durable record.
//! - [`sources`]: lists the agents that should exist, from Letta or an agents file.
//! - [`avatar`]: draws the generated avatar of an agent without one; pure, no I/O.
//! - [`fetch`]: fetches `http(s)` avatar images, bounded in time and size, checked by bytes.
//! - [`lifecycle`]: the Kafka consumer of identity events, its worker and the identity
//!   effects it takes on the homeserver.
//! - [`admin`]: `/health`, `/ready`, `/metrics` and the operator API; the typed status.
//! - [`http`]: what both listeners share: Matrix JSON errors, bearer tokens.
//! - [`operator`]: the CLI's client of a running roster's admin API.
//! - [`commands`]: offline commands (`plan`, `adopt`).
//! - [`model`]: pure membership state and its transitions; no I/O.
//! - [`reconcile`]: the controller (queue, sweep, triggers) and the agent reconciler.
//! - [`retry`]: one backoff policy and the outcome every retrying loop reports.
//! - [`matrix`]: the one homeserver client (ruma types, masquerading, typed errors).
//! - [`store`]: embedded SQLite persistence of roster's own promises, schema versioned.
//! - [`metrics`]: every exported metric, declared once.

pub mod admin;
pub mod appservice;
pub mod avatar;
pub mod clock;
pub mod commands;
pub mod config;
pub mod fetch;
pub mod http;
pub mod ids;
pub mod lifecycle;
pub mod matrix;
pub mod metrics;
pub mod model;
pub mod operator;
pub mod reconcile;
pub mod registration;
pub mod retry;
pub mod sources;
pub mod state;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ruma::api::appservice::Registration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::matrix::Homeserver;
use crate::metrics::Metrics;
use crate::reconcile::{SyncRequest, Trigger};
use crate::state::State;
use crate::store::Store;

/// Set (to anything) to make `serve` abort right after durably recording a transaction and
/// before answering it: lets tests crash roster at the worst moment. Never set in production.
pub const FAULT_ABORT_AFTER_RECORD: &str = "ROSTER_FAULT_ABORT_AFTER_RECORD";

/// Sync requests waiting at once; more get "busy" (they would coalesce anyway).
pub const SYNC_QUEUE: usize = 64;

/// Why `serve` could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{problem}{}", if *more > 0 { format!(" (and {more} more: run `roster check-config`)") } else { String::new() })]
    Check { problem: String, more: usize },
    #[error(transparent)]
    Registration(#[from] registration::RegistrationError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Source(#[from] sources::SourceError),
    #[error("cannot listen on {addr} ({key}): {source}; is another process using it?")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{listener} listener failed: {source}")]
    Serve {
        listener: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Lifecycle(#[from] lifecycle::LifecycleError),
    #[error(transparent)]
    IdentityEffects(#[from] lifecycle::effects::StartError),
}

/// What every part of a running roster shares. The homeserver client is deliberately not
/// here: only the reconciler and the identity effects hold it.
pub struct Shared {
    pub config: Config,
    pub registration: Registration,
    /// The model, the store and the status, changed only through its verbs.
    pub state: State,
    pub metrics: Arc<Metrics>,
    /// Agent rooms waiting for the reconciler; pushed changes schedule theirs.
    pub queue: reconcile::queue::WorkQueue,
    pub sync_requests: mpsc::Sender<SyncRequest>,
    /// Reaches the lifecycle consumer (replay), when it runs.
    pub lifecycle: lifecycle::Control,
    ready: AtomicBool,
    fault_abort_after_record: bool,
}

impl Shared {
    pub fn new(
        config: Config,
        registration: Registration,
        state: State,
        metrics: Arc<Metrics>,
        sync_requests: mpsc::Sender<SyncRequest>,
    ) -> Shared {
        Shared {
            config,
            registration,
            state,
            metrics,
            queue: reconcile::queue::WorkQueue::new(),
            sync_requests,
            lifecycle: lifecycle::Control::default(),
            ready: AtomicBool::new(false),
            fault_abort_after_record: std::env::var_os(FAULT_ABORT_AFTER_RECORD).is_some(),
        }
    }

    /// Listeners bound, store open, config valid: the homeserver's first request can be
    /// routed here. Never waits for the homeserver.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Whether roster provides `user_id` (the homeserver asks before it creates one): the
    /// bot and the users of the agents it provisions.
    pub fn provides_user(&self, user_id: &str) -> bool {
        let ids = self.config.ids();
        let Ok(user) = ruma::UserId::parse(user_id) else {
            return false;
        };
        user == ids.bot
            || (ids.owns(&user)
                && self.state.read(|m| {
                    m.agents
                        .records
                        .values()
                        .any(|r| !r.retired && r.localpart == user.localpart())
                }))
    }
}

/// Runs `serve` until `shutdown` is cancelled or a listener fails.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let checked = commands::check_config::check(&config);
    if let Some(problem) = checked.problems.first() {
        return Err(RunError::Check {
            problem: problem.clone(),
            more: checked.problems.len() - 1,
        });
    }
    let registrations = registration::read(&config)?;
    let state = State::open(Store::open(&config.store.path)?, config.ids().clone())?;
    let metrics = Arc::new(Metrics::new());
    let health_state = state.clone();
    let homeserver = Homeserver::from_config(&config, &registrations, metrics.clone())
        .with_health_report(Arc::new(move |outcome| {
            health_state.status(|s| s.homeserver.observe(outcome, clock::now_ms()))
        }));
    if registrations.acting.is_none() {
        tracing::warn!("roster runs with {}", registrations.describe());
    }
    let bind = |key: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Bind { key, addr, source })
    };
    let appservice_listener = bind("appservice.listen", config.appservice.listen).await?;
    let admin_listener = bind("admin.listen", config.admin.listen).await?;
    let (sync_requests, sync_receiver) = mpsc::channel(SYNC_QUEUE);
    let source = sources::AgentSource::from_config(&config.agents, metrics.clone())?
        .map(|s| Arc::new(s) as Arc<dyn reconcile::ListAgents>);
    let shared = Arc::new(Shared::new(
        config,
        registrations.pushed,
        state,
        metrics,
        sync_requests,
    ));
    shared.set_ready();
    tracing::info!(
        appservice = %shared.config.appservice.listen,
        admin = %shared.config.admin.listen,
        homeserver = %shared.config.homeserver.url,
        rooms = shared.state.read(|m| m.room_count()),
        "roster listening; ready"
    );

    let tracker = TaskTracker::new();
    let failure: Arc<std::sync::Mutex<Option<RunError>>> = Default::default();
    for (listener_name, listener, router) in [
        (
            "appservice",
            appservice_listener,
            appservice::router(shared.clone()),
        ),
        ("admin", admin_listener, admin::router(shared.clone())),
    ] {
        let shutdown = shutdown.clone();
        let failure = failure.clone();
        tracker.spawn(async move {
            let served =
                http::serve(listener, router, http::Limits::DEFAULT, shutdown.clone()).await;
            if let Err(source) = served {
                *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(RunError::Serve {
                    listener: listener_name,
                    source,
                });
                shutdown.cancel();
            }
        });
    }
    if shared.config.lifecycle.enabled {
        let (shared, homeserver) = (shared.clone(), homeserver.clone());
        let (shutdown, failure) = (shutdown.clone(), failure.clone());
        tracker.spawn(async move {
            if let Err(error) = run_lifecycle(shared, homeserver, shutdown.clone()).await {
                *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
                shutdown.cancel();
            }
        });
    }
    tracker.spawn(reconcile::start(
        shared.clone(),
        homeserver,
        source,
        sync_receiver,
        shutdown.clone(),
    ));
    tracker.spawn(prune_transactions(shared.clone(), shutdown.clone()));
    tracker.spawn(sync_on_sighup(shared.clone(), shutdown.clone()));
    tracker.close();

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    tracker.wait().await;
    match failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Runs the lifecycle consumer; with `matrix_enabled`, first settles how identity effects
/// are taken (a homeserver flavor that needs a missing token fails start-up here).
async fn run_lifecycle(
    shared: Arc<Shared>,
    homeserver: Homeserver,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let effects = if shared.config.lifecycle.matrix_enabled {
        let started =
            lifecycle::effects::IdentityEffects::start(shared.clone(), homeserver, &shutdown)
                .await?;
        match started {
            Some(effects) => Some(Arc::new(effects)),
            None => return Ok(()),
        }
    } else {
        None
    };
    lifecycle::run(shared, effects, shutdown).await?;
    Ok(())
}

/// SIGHUP asks for a sync, as `roster sync` does: the agents file is read again at once.
async fn sync_on_sighup(shared: Arc<Shared>, shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; use `roster sync` instead");
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hangups.recv() => {}
        }
        let request = SyncRequest {
            trigger: Trigger::Hangup,
            agents: None,
            reply: None,
        };
        match shared.sync_requests.try_send(request) {
            Ok(()) => tracing::info!("SIGHUP: sync requested"),
            Err(_) => tracing::info!("SIGHUP: a sync is already waiting"),
        }
    }
}

/// Keeps the transaction-id table bounded by age and count.
async fn prune_transactions(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let appservice = &shared.config.appservice;
        let before = clock::now_ms().saturating_sub(appservice.txn_retention.as_millis() as u64);
        match shared
            .state
            .prune_transactions(before, appservice.txn_max_ids)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "forgot old transaction ids"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot prune transaction ids; trying again later")
            }
        }
    }
}

/// An HTTP client for one peer: every request bounded by `timeout`, a connection by at
/// most 10 s, roster's user agent.
pub(crate) fn http_client(timeout: std::time::Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(std::time::Duration::from_secs(10)))
        .user_agent(concat!("roster/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a TLS backend is compiled in")
}

/// `error` and its causes on one line (reqwest's own message omits the cause, e.g.
/// "connection refused").
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}
