//! roster: a Matrix application service that keeps agent rooms converged and applies
//! identity lifecycle events, acting only by masquerading with its appservice token. It
//! never logs in.
//!
//! The map (ingress feeds the model; `reconcile` reads it and drives `matrix`):
//!
//! - [`config`]: one typed configuration from YAML and the environment, validated.
//! - [`registration`]: generates and reads the appservice registration.
//! - [`appservice`]: the routes the homeserver calls; hs_token auth, dedup, durable record.
//! - [`sources`]: lists the agents that should exist, from Letta or an agents file.
//! - [`lifecycle`]: the Kafka consumer of identity events; decoding, ordering, commits, DLQ.
//! - [`admin`]: `/health`, `/ready`, `/metrics` and the operator API.
//! - [`operator`]: the CLI's client of a running roster's admin API (e.g. `replay`).
//! - [`model`]: pure membership state and its transitions; no I/O.
//! - [`reconcile`]: everything roster does to the homeserver, starting with start-up.
//! - [`matrix`]: the one homeserver client (ruma types, masquerading, typed errors).
//! - [`store`]: embedded SQLite persistence of roster's own promises.
//! - [`metrics`]: every exported metric, declared once.

pub mod admin;
pub mod appservice;
pub mod avatar;
pub mod config;
pub mod lifecycle;
pub mod matrix;
pub mod metrics;
pub mod model;
pub mod operator;
pub mod reconcile;
pub mod registration;
pub mod sources;
pub mod store;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use ruma::api::appservice::Registration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Identities};
use crate::matrix::Homeserver;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::store::Store;

/// Set (to anything) to make `serve` abort right after durably recording a transaction and
/// before answering it: lets tests crash roster at the worst moment. Never set in production.
pub const FAULT_ABORT_AFTER_RECORD: &str = "ROSTER_FAULT_ABORT_AFTER_RECORD";

/// Manual sync requests waiting at once; more get "busy" (they would coalesce anyway).
pub const SYNC_QUEUE: usize = 64;

/// Why `serve` could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
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
    IdentityEffects(#[from] reconcile::identity::StartError),
}

/// State every part of a running roster shares. The homeserver client is deliberately not
/// here: only `reconcile` holds it.
pub struct Shared {
    pub config: Config,
    pub ids: Identities,
    pub registration: Registration,
    pub store: Store,
    /// One writer at a time (transactions are recorded under the write lock), many readers.
    pub model: RwLock<Model>,
    pub metrics: Arc<Metrics>,
    /// Agent rooms waiting for the reconciler; pushed changes schedule theirs.
    pub queue: reconcile::queue::WorkQueue,
    status: Mutex<reconcile::Status>,
    pub sync_requests: mpsc::Sender<reconcile::SyncRequest>,
    /// Reaches the lifecycle consumer (replay), when it runs.
    pub lifecycle: lifecycle::Control,
    ready: AtomicBool,
    last_ping_ms: AtomicU64,
    fault_abort_after_record: bool,
}

impl Shared {
    pub fn new(
        config: Config,
        registration: Registration,
        store: Store,
        metrics: Arc<Metrics>,
        sync_requests: mpsc::Sender<reconcile::SyncRequest>,
    ) -> Result<Shared, RunError> {
        let ids = config
            .identities()
            .expect("a loaded config has valid identities");
        let mut model = Model::new();
        for member in store.members()? {
            model.restore(member.room_id, member.user_id, member.state);
        }
        for record in store.room_records()? {
            model.agents.restore(record);
        }
        for user in store.deactivated_users()? {
            model.identities.mark_deactivated(user);
        }
        Ok(Shared {
            config,
            ids,
            registration,
            store,
            model: RwLock::new(model),
            metrics,
            queue: reconcile::queue::WorkQueue::new(),
            status: Mutex::new(reconcile::Status::default()),
            sync_requests,
            lifecycle: lifecycle::Control::default(),
            ready: AtomicBool::new(false),
            last_ping_ms: AtomicU64::new(0),
            fault_abort_after_record: std::env::var_os(FAULT_ABORT_AFTER_RECORD).is_some(),
        })
    }

    pub fn model(&self) -> std::sync::RwLockReadGuard<'_, Model> {
        // The model is only written by whole `commit`s; a panic elsewhere cannot leave it
        // half-applied, so a poisoned lock still holds a consistent model.
        self.model.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn model_mut(&self) -> std::sync::RwLockWriteGuard<'_, Model> {
        self.model.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> MutexGuard<'_, reconcile::Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status_mut(&self) -> MutexGuard<'_, reconcile::Status> {
        self.status()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// The homeserver called `/_matrix/app/v1/ping`: it can reach roster.
    pub fn note_homeserver_ping(&self) {
        self.last_ping_ms
            .store(appservice::now_ms(), Ordering::Relaxed);
    }

    pub fn last_homeserver_ping_ms(&self) -> Option<u64> {
        Some(self.last_ping_ms.load(Ordering::Relaxed)).filter(|&ms| ms > 0)
    }

    /// Whether roster provides `user_id` (the homeserver asks before it creates one): the
    /// bot and the users of the agents it provisions.
    pub fn manages_user(&self, user_id: &str) -> bool {
        if user_id == self.ids.bot.as_str() {
            return true;
        }
        let Ok(user) = ruma::UserId::parse(user_id) else {
            return false;
        };
        user.server_name() == self.ids.server_name
            && self
                .model()
                .agents
                .records
                .values()
                .any(|r| !r.retired && r.localpart == user.localpart())
    }
}

/// Runs `serve` until `shutdown` is cancelled or a listener fails.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let registration = registration::read(&config.appservice.registration, &config)?;
    let store = Store::open(&config.store.path)?;
    let metrics = Arc::new(Metrics::new());
    let homeserver = Homeserver::new(
        &config.homeserver.url,
        config::Secret::new(registration.as_token.clone()),
        config.homeserver.request_timeout,
        config.homeserver.max_concurrent_requests,
        metrics.clone(),
    )
    .with_admin_token(config.homeserver.admin_token.clone());
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
        registration,
        store,
        metrics,
        sync_requests,
    )?);
    tracing::info!(
        appservice = %shared.config.appservice.listen,
        admin = %shared.config.admin.listen,
        homeserver = %shared.config.homeserver.url,
        rooms = shared.model().room_count(),
        "roster listening"
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
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                .await;
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
            reconcile::identity::IdentityEffects::start(shared.clone(), homeserver, &shutdown)
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
        let request = reconcile::SyncRequest {
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
        let worker = shared.clone();
        let pruned = tokio::task::spawn_blocking(move || {
            let retention = worker.config.appservice.txn_retention.as_millis() as u64;
            let before = appservice::now_ms().saturating_sub(retention);
            worker
                .store
                .prune_transactions(before, worker.config.appservice.txn_max_ids)
        })
        .await;
        match pruned {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(pruned = n, "forgot old transaction ids"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot prune transaction ids"),
            Err(e) => tracing::warn!(error = %e, "pruning transaction ids panicked"),
        }
    }
}
