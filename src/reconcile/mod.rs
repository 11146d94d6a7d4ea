//! Acts on the homeserver: the only module that drives `matrix`.
//!
//! Start-up first: register the appservice's own user (Synapse does not create it) and ping
//! the homeserver, which makes it flush the transactions it queued while roster was away.
//! Then: find or create the agents space, read every managed room once (so roster converges
//! after any downtime), and run the work queue. Agents come from the source every
//! `poll_interval`; rooms are read again only by the validation sweep (`sync.interval`), a
//! manual sync, or when their state is unknown. Pushed events schedule their room.
//! [`identity`] executes what lifecycle events ask of identity users.

pub mod adopt;
pub mod agents;
pub mod identity;
pub mod plan;
pub mod queue;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use ruma::OwnedRoomId;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::appservice::now_ms;
use crate::matrix::{Homeserver, MatrixError, Registered};
use crate::metrics::TriggerLabels;
use crate::model::agents::Agent;

const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Agent rooms reconciled at once; each run is sequential within its room.
const WORKERS: usize = 4;

/// What a reconcile run asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    RetryIn(Duration),
    /// Reported in status; the key waits for the next sweep, sync or pushed change.
    GaveUp,
}

/// Exponential backoff for the `attempts`-th failure, with jitter.
pub fn backoff(attempts: u32) -> Duration {
    let exp = BACKOFF_START.saturating_mul(1 << attempts.min(16));
    jitter(exp.min(BACKOFF_MAX))
}

/// A source of desired agents (Letta, a file).
pub trait ListAgents: Send + Sync {
    /// For logs and status, e.g. `letta http://letta:8283`.
    fn describe(&self) -> String;
    /// A complete listing, or an error: never a partial or guessed one.
    fn list(&self) -> BoxFuture<'_, Result<Vec<Agent>, String>>;
}

/// A manual sync request (admin API); requests that arrive while one runs are coalesced.
pub struct SyncRequest {
    /// Only these agents; `None` for all.
    pub agents: Option<BTreeSet<String>>,
    pub reply: Option<oneshot::Sender<SyncSummary>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SyncSummary {
    pub trigger: &'static str,
    pub started_ms: u64,
    pub duration_ms: u64,
    pub agents: usize,
    pub rooms_read: usize,
    pub drift: usize,
    pub actions: u64,
    pub failed: usize,
    pub source_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStatus {
    pub source: String,
    pub last_ok_ms: Option<u64>,
    pub agents_listed: usize,
    pub last_error: Option<String>,
    pub last_error_ms: Option<u64>,
}

/// What operators see in `roster status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub space: Option<OwnedRoomId>,
    pub source: Option<SourceStatus>,
    pub last_sync: Option<SyncSummary>,
    /// Agents whose work gave up, with the reason.
    pub failed: BTreeMap<String, String>,
    /// Agents with required members roster will not touch (banned).
    pub blocked: BTreeMap<String, Vec<String>>,
    #[serde(skip)]
    pub attempts: BTreeMap<String, u32>,
    pub actions_ok: u64,
}

/// Prepares the homeserver side, marks roster ready, then keeps agent rooms converged.
pub async fn start(
    shared: Arc<Shared>,
    homeserver: Homeserver,
    source: Option<Arc<dyn ListAgents>>,
    sync_requests: mpsc::Receiver<SyncRequest>,
    shutdown: CancellationToken,
) {
    let bot = shared.ids.bot.clone();
    let registered = retry(&shutdown, "register the appservice user", || {
        homeserver.register(bot.localpart())
    })
    .await;
    match registered {
        Some(Registered::Created) => tracing::info!(user = %bot, "registered the appservice user"),
        Some(Registered::AlreadyExists) => {
            tracing::debug!(user = %bot, "appservice user already registered")
        }
        None => return,
    }
    let appservice_id = shared.registration.id.clone();
    let Some(round_trip) = retry(&shutdown, "ping the homeserver", || {
        homeserver.ping(&appservice_id)
    })
    .await
    else {
        return;
    };
    shared.set_ready();
    tracing::info!(
        round_trip_ms = round_trip.as_millis() as u64,
        "homeserver reaches roster; ready"
    );
    let Some(source) = source else {
        tracing::info!(
            "no agent source configured (agents.letta_url or agents.file); provisioning is off"
        );
        return;
    };

    let Some(room_version) = retry(&shutdown, "read the homeserver's capabilities", || {
        homeserver.default_room_version()
    })
    .await
    else {
        return;
    };
    let effects = if shared.config.agents.deactivate_removed {
        match identity::IdentityEffects::start(shared.clone(), homeserver.clone(), &shutdown).await
        {
            Ok(Some(effects)) => Some(Arc::new(effects)),
            Ok(None) => return,
            Err(error) => {
                tracing::error!(%error, "agents.deactivate_removed is on, but removed agents' users cannot be deactivated");
                None
            }
        }
    } else {
        None
    };
    let agents = Arc::new(agents::Agents::new(
        shared.clone(),
        homeserver,
        &room_version,
        effects,
    ));
    let Some(space) = retry(&shutdown, "find or create the agents space", || {
        agents.ensure_space()
    })
    .await
    else {
        return;
    };
    shared.status_mut().space = Some(space);

    let tasks = tokio_util::task::TaskTracker::new();
    for _ in 0..WORKERS {
        tasks.spawn(work(shared.clone(), agents.clone(), shutdown.clone()));
    }
    tasks.spawn(poll_source(
        shared.clone(),
        source.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(sync_loop(
        shared.clone(),
        agents,
        source,
        sync_requests,
        shutdown.clone(),
    ));
    tasks.close();
    tasks.wait().await;
}

/// Takes due keys off the queue and reconciles them, rescheduling as the outcome says.
async fn work(shared: Arc<Shared>, agents: Arc<agents::Agents>, shutdown: CancellationToken) {
    loop {
        let key = tokio::select! {
            _ = shutdown.cancelled() => return,
            key = shared.queue.next() => key,
        };
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => { shared.queue.done(&key); return }
            outcome = agents.reconcile_agent(&key) => outcome,
        };
        shared.queue.done(&key);
        match outcome {
            Outcome::Done => {
                shared.status_mut().attempts.remove(&key);
            }
            Outcome::RetryIn(wait) => shared.queue.schedule_in(&key, wait),
            Outcome::GaveUp => {}
        }
    }
}

/// Lists agents every `poll_interval`: a poll of the source, never of the homeserver.
async fn poll_source(
    shared: Arc<Shared>,
    source: Arc<dyn ListAgents>,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(shared.config.agents.poll_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is taken by the start-up sync.
    every.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        list_and_observe(&shared, source.as_ref()).await;
    }
}

/// Lists the source and applies a good listing to the desired state.
///
/// Returns the source error, if any. A failed listing changes nothing.
async fn list_and_observe(shared: &Shared, source: &dyn ListAgents) -> Option<String> {
    let listed = source.list().await;
    let now = now_ms();
    let mut status = shared.status_mut();
    let source_status = status.source.get_or_insert_with(|| SourceStatus {
        source: source.describe(),
        ..SourceStatus::default()
    });
    match listed {
        Err(error) => {
            tracing::warn!(source = %source.describe(), %error, "agent listing failed; nothing changes");
            source_status.last_error = Some(error.clone());
            source_status.last_error_ms = Some(now);
            Some(error)
        }
        Ok(agents) => {
            source_status.last_ok_ms = Some(now);
            source_status.agents_listed = agents.len();
            source_status.last_error = None;
            drop(status);
            let grace = shared.config.agents.removal_grace.as_millis() as u64;
            let (outcome, touched) = {
                let mut model = shared.model_mut();
                let before = model.agents.records.clone();
                let outcome = model.agents.observe_listing(&agents, now, grace);
                // Persist new records and absence clocks, so the grace survives restarts.
                let touched: Vec<_> = model
                    .agents
                    .records
                    .values()
                    .filter(|r| before.get(&r.agent_id) != Some(*r))
                    .cloned()
                    .collect();
                (outcome, touched)
            };
            for record in &touched {
                if let Err(e) = shared.store.save_room_record(record) {
                    tracing::warn!(error = %e, "cannot save room record");
                }
            }
            for id in outcome.changed.iter().chain(&outcome.expired) {
                shared.queue.schedule(id);
            }
            if !outcome.expired.is_empty() {
                tracing::info!(agents = ?outcome.expired, "agents absent past the grace period; removing");
            }
            None
        }
    }
}

/// Runs the start-up sync, the validation sweep every `sync.interval`, and manual syncs.
async fn sync_loop(
    shared: Arc<Shared>,
    agents: Arc<agents::Agents>,
    source: Arc<dyn ListAgents>,
    mut requests: mpsc::Receiver<SyncRequest>,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(shared.config.sync.interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trigger = "startup";
    let mut waiting: Vec<SyncRequest> = Vec::new();
    every.tick().await;
    loop {
        // Coalesce every request waiting now into this one run.
        while let Ok(request) = requests.try_recv() {
            waiting.push(request);
        }
        let whole = waiting.iter().any(|r| r.agents.is_none());
        let only: Option<BTreeSet<String>> = (!waiting.is_empty() && !whole).then(|| {
            waiting
                .iter()
                .flat_map(|r| r.agents.iter().flatten().cloned())
                .collect()
        });
        let replies: Vec<_> = waiting.drain(..).filter_map(|r| r.reply).collect();
        let summary = run_sync(&shared, &agents, source.as_ref(), trigger, only.as_ref()).await;
        for reply in replies {
            let _ = reply.send(summary.clone());
        }
        trigger = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => "interval",
            Some(request) = requests.recv() => {
                waiting.push(request);
                "manual"
            }
        };
    }
}

/// One reconciliation pass: list the source, read the rooms, converge them, report.
async fn run_sync(
    shared: &Arc<Shared>,
    agents: &agents::Agents,
    source: &dyn ListAgents,
    trigger: &'static str,
    only: Option<&BTreeSet<String>>,
) -> SyncSummary {
    let started = Instant::now();
    let started_ms = now_ms();
    let actions_before = shared.status().actions_ok;
    tracing::info!(trigger, agents = ?only, "sync started");
    shared
        .metrics
        .sync_runs
        .get_or_create(&TriggerLabels { trigger })
        .inc();
    let source_error = list_and_observe(shared, source).await;
    // A fresh look clears earlier give-ups: they get another chance.
    shared
        .status_mut()
        .failed
        .retain(|id, _| only.is_some_and(|o| !o.contains(id)));
    let (rooms_read, drift) = agents.sweep(only).await;
    let keys: Vec<String> = {
        let model = shared.model();
        model
            .agents
            .live_records(only)
            .map(|r| r.agent_id.clone())
            .collect()
    };
    for key in &keys {
        shared.queue.schedule(key);
    }
    let _ = tokio::time::timeout(Duration::from_secs(600), shared.queue.wait_settled(&keys)).await;
    let status = shared.status();
    let summary = SyncSummary {
        trigger,
        started_ms,
        duration_ms: started.elapsed().as_millis() as u64,
        agents: keys.len(),
        rooms_read,
        drift,
        actions: status.actions_ok - actions_before,
        failed: status.failed.len(),
        source_error,
    };
    drop(status);
    shared
        .metrics
        .sync_duration_seconds
        .observe(started.elapsed().as_secs_f64());
    tracing::info!(
        trigger,
        agents = summary.agents,
        rooms_read = summary.rooms_read,
        drift = summary.drift,
        actions = summary.actions,
        failed = summary.failed,
        duration_ms = summary.duration_ms,
        "sync finished"
    );
    shared.status_mut().last_sync = Some(summary.clone());
    summary
}

/// Runs `attempt` until it succeeds, waiting longer after each failure; `None` on shutdown.
///
/// A permanent error (a 4xx other than rate limiting) is retried too, at the slowest pace:
/// at start-up it usually means the homeserver has not loaded the registration yet.
async fn retry<T, F, Fut>(shutdown: &CancellationToken, what: &str, mut attempt: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, MatrixError>>,
{
    let mut delay = BACKOFF_START;
    for attempt_number in 1u32.. {
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return None,
            outcome = attempt() => outcome,
        };
        let error = match outcome {
            Ok(value) => return Some(value),
            Err(error) => error,
        };
        let wait = match error.retry_after() {
            Some(asked) => asked,
            None if error.is_transient() => delay,
            None => BACKOFF_MAX,
        };
        tracing::warn!(
            attempt = attempt_number,
            retry_in_ms = wait.as_millis() as u64,
            error = %error,
            "cannot {what} yet"
        );
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(jitter(wait)) => {}
        }
        delay = (delay * 2).min(BACKOFF_MAX);
    }
    unreachable!("the attempt counter does not run out")
}

/// Spreads retries by up to a quarter of the wait so many waiters do not wake together.
pub(crate) fn jitter(wait: Duration) -> Duration {
    let spread = wait.as_millis() as u64 / 4;
    if spread == 0 {
        return wait;
    }
    wait + Duration::from_millis(rand::random_range(0..=spread))
}
