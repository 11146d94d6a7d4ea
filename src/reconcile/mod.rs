//! Acts on the homeserver for agent rooms: the controller (work queue, sweep, triggers) and
//! the agent reconciler ([`agents`]).
//!
//! Start-up first: ping the homeserver in the background (it makes Synapse flush the
//! transactions it queued while roster was away) and register the appservice's own user
//! (Synapse does not create it). Then: find or create the agents space, read every managed
//! room once (so roster converges after any downtime), and run the work queue. Agents come
//! from the source every `poll_interval`; rooms are read again only by the validation sweep
//! (`sync.interval`), a manual sync, or when their state is unknown. Pushed events schedule
//! their room.

pub mod agents;
pub mod queue;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::clock::now_ms;
use crate::lifecycle::effects::IdentityEffects;
use crate::matrix::{Homeserver, Registered};
use crate::metrics::{ActionLabels, OutcomeLabels, TriggerLabels};
use crate::model::agents::{Agent, HistoryMessage};
use crate::retry::{Backoff, Outcome, until_ok};
use crate::state::{SourceStatus, SyncRunning, SyncSummary};
use queue::Key;

/// An agent whose runs failed this many times in a row is reported and left alone until
/// the next sweep, manual sync or pushed change.
pub const MAX_ATTEMPTS: u32 = 5;

/// A source of desired agents (Letta, a file).
pub trait ListAgents: Send + Sync {
    /// For logs and status, e.g. `Letta at http://letta:8283/v1/agents/`.
    fn describe(&self) -> String;
    /// A complete listing, or an error: never a partial or guessed one.
    fn list(&self) -> BoxFuture<'_, Result<Vec<Agent>, String>>;
    /// Whether the source keeps agents' history (Letta does, an agents file does not).
    fn keeps_history(&self) -> bool;
    /// The agent's last `limit` user and assistant messages, oldest first; `None` when the
    /// source keeps no history (an agents file).
    fn history(
        &self,
        agent_id: &str,
        limit: u32,
    ) -> BoxFuture<'_, Result<Option<Vec<HistoryMessage>>, String>>;
}

/// Why a sync was asked for (the `trigger` label of `roster_sync_runs_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `roster sync` or `POST /admin/v1/sync`.
    Manual,
    /// SIGHUP.
    Hangup,
}

impl Trigger {
    fn label(self) -> &'static str {
        match self {
            Trigger::Manual => "manual",
            Trigger::Hangup => "sighup",
        }
    }
}

/// A request for a sync now; requests that arrive while one runs are coalesced.
pub struct SyncRequest {
    pub trigger: Trigger,
    /// Only these agents; `None` for all.
    pub agents: Option<BTreeSet<String>>,
    pub reply: Option<oneshot::Sender<SyncSummary>>,
}

/// What the controller does with a key after a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Converged: wait for the next trigger.
    Idle,
    RetryIn(Duration),
    /// Failed `MAX_ATTEMPTS` times: reported, left until the next sweep, sync or push.
    GiveUp(String),
}

/// The error policy: from a run's outcome and the failures before it, what comes next.
/// A rate-limited run waits as asked and does not count as a failure.
pub fn error_policy(failures: &mut u32, outcome: &Outcome, backoff: Backoff) -> Next {
    let reason = match outcome {
        Outcome::Done(()) => {
            *failures = 0;
            return Next::Idle;
        }
        Outcome::Retry {
            retry_after: Some(wait),
            ..
        } => return Next::RetryIn(backoff.asked(*wait)),
        Outcome::Retry { reason, .. } | Outcome::Refused(reason) => reason,
    };
    *failures += 1;
    if *failures >= MAX_ATTEMPTS {
        let reason = format!("failed {failures} times, last: {reason}");
        *failures = 0;
        return Next::GiveUp(reason);
    }
    Next::RetryIn(backoff.wait(*failures, None))
}

/// Prepares the homeserver side, then keeps agent rooms converged until `shutdown`.
pub async fn start(
    shared: Arc<Shared>,
    homeserver: Homeserver,
    source: Option<Arc<dyn ListAgents>>,
    sync_requests: mpsc::Receiver<SyncRequest>,
    shutdown: CancellationToken,
) {
    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(keep_pinging(
        shared.clone(),
        homeserver.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(reconcile_when_the_homeserver_is_back(
        shared.clone(),
        homeserver.clone(),
        shutdown.clone(),
    ));
    if let Some(source) = source {
        tasks.spawn(provision(
            shared,
            homeserver,
            source,
            sync_requests,
            shutdown,
        ));
    } else {
        tracing::info!(
            "no agent source configured (agents.letta_url or agents.file); provisioning is off"
        );
    }
    tasks.close();
    tasks.wait().await;
}

/// Asks the homeserver to ping roster back, until it does and then again every
/// `sync.interval`, so `roster_homeserver_ping_ok` and the last success keep telling whether
/// the homeserver can still push (an alert watches their age). Readiness never waits for
/// it: a Kubernetes Service routes the homeserver's first request only to a ready pod.
async fn keep_pinging(shared: Arc<Shared>, homeserver: Homeserver, shutdown: CancellationToken) {
    let appservice_id = shared.registration.id.clone();
    let every = shared.config.sync.interval;
    let mut failures = 0;
    let mut reached = false;
    loop {
        let pinged = tokio::select! {
            _ = shutdown.cancelled() => return,
            pinged = homeserver.ping(&appservice_id) => pinged,
        };
        let outcome = match &pinged {
            Ok(_) => "ok",
            Err(_) => "error",
        };
        shared
            .metrics
            .homeserver_pings
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        let wait = match pinged {
            Ok(round_trip) => {
                shared.metrics.homeserver_ping_ok.set(1);
                shared
                    .metrics
                    .homeserver_ping_last_success
                    .set(now_ms() as i64 / 1000);
                shared.state.status(|s| {
                    s.ping.last_ok_at_ms = Some(now_ms());
                    s.ping.round_trip_ms = Some(round_trip.as_millis() as u64);
                    s.ping.last_error = None;
                });
                let round_trip_ms = round_trip.as_millis() as u64;
                // Said once when it starts working; the periodic confirmations are noise.
                if !reached || failures > 0 {
                    tracing::info!(round_trip_ms, "the homeserver reaches roster");
                } else {
                    tracing::debug!(round_trip_ms, "the homeserver still reaches roster");
                }
                reached = true;
                failures = 0;
                every
            }
            Err(error) => {
                failures += 1;
                shared.metrics.homeserver_ping_ok.set(0);
                let wait = Backoff::DEFAULT.wait(failures, error.retry_after());
                tracing::warn!(
                    attempt = failures,
                    retry_in_ms = wait.as_millis() as u64,
                    %error,
                    "the homeserver cannot ping roster yet; check appservice.url in the registration"
                );
                shared
                    .state
                    .status(|s| s.ping.last_error = Some(error.to_string()));
                wait
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn provision(
    shared: Arc<Shared>,
    homeserver: Homeserver,
    source: Arc<dyn ListAgents>,
    sync_requests: mpsc::Receiver<SyncRequest>,
    shutdown: CancellationToken,
) {
    let bot = shared.config.ids().bot.clone();
    let backoff = Backoff::DEFAULT;
    let registered = until_ok(&shutdown, "register the appservice user", || {
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
    let Some(room_version) = until_ok(&shutdown, "read the homeserver's capabilities", || {
        homeserver.default_room_version()
    })
    .await
    else {
        return;
    };
    let effects = if shared.config.agents.deactivate_removed {
        match IdentityEffects::start(shared.clone(), homeserver.clone(), &shutdown).await {
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
        Some(source.clone()),
    ));
    let Some(space) = until_ok(&shutdown, "find or create the agents space", || {
        agents.ensure_space()
    })
    .await
    else {
        return;
    };
    while let Err(error) = shared.state.set_space(space.clone()).await {
        tracing::error!(%error, "cannot record the agents space; retrying");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.max) => {}
        }
    }
    shared.state.status(|s| s.space = Some(space.clone()));

    let tasks = tokio_util::task::TaskTracker::new();
    // As many runs at once as the homeserver takes requests: each run is sequential, and
    // the client's permits bound what reaches the homeserver.
    for _ in 0..shared.config.homeserver.max_concurrent_requests.max(1) {
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

/// Takes due keys off the queue and reconciles them, rescheduling as the policy says.
async fn work(shared: Arc<Shared>, agents: Arc<agents::Agents>, shutdown: CancellationToken) {
    loop {
        let key = tokio::select! {
            _ = shutdown.cancelled() => return,
            key = shared.queue.next() => key,
        };
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => { shared.queue.done(&key); return }
            outcome = agents.reconcile(&key) => outcome,
        };
        shared.queue.done(&key);
        settle(&shared, &key, &outcome);
    }
}

/// Applies the error policy to a run's outcome: reschedules the key, or reports it in
/// status (`failed`) and `roster_actions_total{outcome="gave_up"}`.
pub fn settle(shared: &Shared, key: &Key, outcome: &Outcome) -> Next {
    let name = key.to_string();
    let next = shared.state.status(|status| {
        let failures = status.attempts.entry(name.clone()).or_default();
        let next = error_policy(failures, outcome, Backoff::DEFAULT);
        if *failures == 0 {
            status.attempts.remove(&name);
        }
        match &next {
            Next::Idle => {
                status.failed.remove(&name);
            }
            Next::GiveUp(reason) => {
                status.failed.insert(name.clone(), reason.clone());
            }
            Next::RetryIn(_) => {}
        }
        next
    });
    match &next {
        Next::Idle => {}
        Next::RetryIn(wait) => shared.queue.schedule_in(key, *wait),
        Next::GiveUp(reason) => {
            tracing::warn!(agent = %key, %reason, "giving up until the next sweep or sync");
            shared
                .metrics
                .actions
                .get_or_create(&ActionLabels {
                    kind: "reconcile",
                    outcome: "gave_up",
                })
                .inc();
        }
    }
    next
}

/// How often roster asks a homeserver that failed its last request whether it answers.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Reconciles every agent (and the space) as soon as the homeserver answers again after an
/// outage: runs that gave up during it would otherwise wait for the next sweep, and runs
/// backing off (lifecycle events too) for up to 30 s for their backoff. After a failed
/// request, probes it every [`PROBE_INTERVAL`]; only an unanswered probe makes an outage,
/// so one request refused on its own keeps its backoff and its attempt limit. Sends
/// nothing while the homeserver answers.
async fn reconcile_when_the_homeserver_is_back(
    shared: Arc<Shared>,
    homeserver: Homeserver,
    shutdown: CancellationToken,
) {
    let mut seen = homeserver.recoveries();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
        if homeserver.is_failing() {
            // The client itself counts the recovery when a probe found it away.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = homeserver.probe() => {}
            }
        }
        let recoveries = homeserver.recoveries();
        if recoveries == seen {
            continue;
        }
        seen = recoveries;
        let keys = schedule_live(&shared, None);
        tracing::info!(
            agents = keys.len() - 1,
            "the homeserver answers again; reconciling every agent now"
        );
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
        // A source that does not answer (Letta frozen) must not hold up shutdown either.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = list_and_observe(&shared, source.as_ref()) => {}
        }
    }
}

/// Lists the source and applies a good listing to the desired state.
///
/// Returns the error, if any: a failed listing (or one roster could not record) changes
/// nothing and is shown in status.
async fn list_and_observe(shared: &Shared, source: &dyn ListAgents) -> Option<String> {
    let listed = source.list().await;
    let now = now_ms();
    let observed = match listed {
        Err(error) => {
            tracing::warn!(source = %source.describe(), %error, "agent listing failed; nothing changes");
            Err(error)
        }
        Ok(agents) => {
            let listed = agents.len();
            let grace = shared.config.agents.removal_grace.as_millis() as u64;
            match shared.state.observe_listing(agents, now, grace).await {
                Ok(outcome) => {
                    for id in outcome.changed.iter().chain(&outcome.expired) {
                        shared.queue.schedule(&Key::agent(id));
                    }
                    if !outcome.expired.is_empty() {
                        tracing::info!(agents = ?outcome.expired, "agents absent past the grace period; removing");
                    }
                    Ok(listed)
                }
                Err(error) => {
                    tracing::error!(%error, "cannot record the agent listing; nothing changes");
                    Err(format!("cannot record the listing: {error}"))
                }
            }
        }
    };
    shared.state.status(|status| {
        let source_status = status.source.get_or_insert_with(|| SourceStatus {
            source: source.describe(),
            ..SourceStatus::default()
        });
        if let Ok(listed) = &observed {
            source_status.agents_listed = *listed;
        }
        let outcome = observed.as_ref().map(|_| ()).map_err(Clone::clone);
        source_status.health.observe(outcome, now);
    });
    observed.err()
}

/// Queues the live agents (those in `only`, or all and the space) for reconciliation;
/// returns the keys queued.
fn schedule_live(shared: &Shared, only: Option<&BTreeSet<String>>) -> Vec<Key> {
    let mut keys: Vec<Key> = shared.state.read(|model| {
        model
            .agents
            .live_records(only)
            .map(|r| Key::agent(&r.agent_id))
            .collect()
    });
    if only.is_none() {
        keys.push(Key::Space);
    }
    for key in &keys {
        shared.queue.schedule(key);
    }
    keys
}

/// Runs the start-up sync, the validation sweep every `sync.interval`, and requested syncs.
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
        // A sync waits for its keys to settle (up to 10 min) and the periodic sweep spreads
        // its reads over half the interval: shutdown must not wait for either. Whatever the
        // sync left undone is in the store and is done again by the start-up sync.
        let summary = tokio::select! {
            _ = shutdown.cancelled() => return,
            summary = run_sync(&shared, &agents, source.as_ref(), trigger, only.as_ref()) => summary,
        };
        for reply in replies {
            let _ = reply.send(summary.clone());
        }
        trigger = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => "interval",
            Some(request) = requests.recv() => {
                let label = request.trigger.label();
                waiting.push(request);
                label
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
    let started_at_ms = now_ms();
    let actions_before = shared.state.status(|s| s.actions_ok);
    let seq_at_start = shared.state.read(|m| m.last_seq());
    tracing::info!(trigger, agents = ?only, "sync started");
    shared.state.status(|s| {
        s.sync_running = Some(SyncRunning {
            trigger: trigger.to_owned(),
            started_at_ms,
        })
    });
    shared
        .metrics
        .sync_runs
        .get_or_create(&TriggerLabels { trigger })
        .inc();
    let source_error = list_and_observe(shared, source).await;
    // A fresh look clears earlier give-ups: they get another chance.
    shared.state.status(|s| {
        s.failed
            .retain(|id, _| only.is_some_and(|o| !o.contains(id)));
    });
    // The periodic sweep spreads its reads over half the interval; the others read now.
    let spread = (trigger == "interval").then(|| shared.config.sync.interval / 2);
    let swept = agents.sweep(only, spread).await;
    let keys = schedule_live(shared, only);
    let _ = tokio::time::timeout(Duration::from_secs(600), shared.queue.wait_settled(&keys)).await;
    if trigger == "interval" && only.is_none() {
        // Every room roster creates is recorded by now; what is left of rooms it does not
        // look after, from before this sweep, goes (invites of its user by anyone). Only
        // the periodic sweep collects: a restart or an operator's sync keeps what was
        // acknowledged as it was.
        match shared.state.forget_unmanaged_rooms(seq_at_start + 1).await {
            Ok(0) => {}
            Ok(rooms) => tracing::info!(
                rooms,
                "forgot the members of rooms roster does not look after"
            ),
            Err(error) => {
                tracing::warn!(%error, "cannot forget rooms roster does not look after; the next sync tries again")
            }
        }
    }
    let summary = shared.state.status(|status| SyncSummary {
        trigger: trigger.to_owned(),
        started_at_ms,
        duration_ms: started.elapsed().as_millis() as u64,
        agents: keys.iter().filter(|k| matches!(k, Key::Agent(_))).count(),
        rooms_read: swept.rooms_read,
        drift: swept.rooms_drifted,
        actions: status.actions_ok - actions_before,
        failed: status.failed.len(),
        source_error,
    });
    shared
        .metrics
        .sync_duration_seconds
        .observe(started.elapsed().as_secs_f64());
    tracing::info!(
        trigger,
        agents = summary.agents,
        rooms_read = summary.rooms_read,
        rooms_drifted = swept.rooms_drifted,
        drift_changes = swept.changes,
        actions = summary.actions,
        failed = summary.failed,
        duration_ms = summary.duration_ms,
        "sync finished"
    );
    shared.state.status(|status| {
        status.last_sync = Some(summary.clone());
        status.sync_running = None;
    });
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(after: Option<Duration>) -> Outcome {
        Outcome::Retry {
            reason: "busy".into(),
            retry_after: after,
        }
    }

    #[test]
    fn should_back_off_then_give_up_after_max_attempts() {
        let mut failures = 0;
        let backoff = Backoff::DEFAULT;
        for n in 1..MAX_ATTEMPTS {
            match error_policy(&mut failures, &retry(None), backoff) {
                Next::RetryIn(wait) => {
                    let base = backoff.base(n);
                    assert!(wait >= base && wait <= base + base / 4, "{wait:?}");
                }
                other => panic!("attempt {n}: {other:?}"),
            }
        }
        match error_policy(&mut failures, &Outcome::Refused("403".into()), backoff) {
            Next::GiveUp(reason) => {
                assert!(reason.contains("failed 5 times") && reason.contains("403"))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(failures, 0, "a fresh start after giving up");
    }

    /// Five failed runs in a row show in status as failed; a good run clears it.
    #[tokio::test]
    async fn should_report_an_agent_failed_after_five_failures_and_clear_it() {
        let shared = crate::testing::shared(
            crate::config::Config::from_yaml("homeserver: {server_name: ex.org}").unwrap(),
        );
        let refused = Outcome::Refused("homeserver refused create_room: HTTP 403".into());
        for _ in 1..MAX_ATTEMPTS {
            assert!(matches!(
                settle(&shared, &Key::agent("agent-1"), &refused),
                Next::RetryIn(_)
            ));
            assert!(shared.state.status(|s| s.failed.is_empty()));
        }
        assert!(matches!(
            settle(&shared, &Key::agent("agent-1"), &refused),
            Next::GiveUp(_)
        ));
        let failed = shared.state.status(|s| s.failed.clone());
        assert!(failed["agent-1"].contains("HTTP 403"), "{failed:?}");
        let gave_up = shared
            .metrics
            .actions
            .get_or_create(&ActionLabels {
                kind: "reconcile",
                outcome: "gave_up",
            })
            .get();
        assert_eq!(gave_up, 1);
        assert_eq!(
            settle(&shared, &Key::agent("agent-1"), &Outcome::Done(())),
            Next::Idle
        );
        assert!(shared.state.status(|s| s.failed.is_empty()));
    }

    /// Only the periodic sweep forgets the rooms roster does not look after (kept because
    /// someone invited its user): a start-up, an operator's or a SIGHUP sync keeps them,
    /// as they may have just been acknowledged.
    #[tokio::test]
    async fn should_forget_unmanaged_rooms_at_the_periodic_sweep_only() {
        struct NoAgents;
        impl ListAgents for NoAgents {
            fn describe(&self) -> String {
                "no agents".into()
            }
            fn list(&self) -> BoxFuture<'_, Result<Vec<Agent>, String>> {
                Box::pin(async { Ok(Vec::new()) })
            }
            fn keeps_history(&self) -> bool {
                false
            }
            fn history(
                &self,
                _agent_id: &str,
                _limit: u32,
            ) -> BoxFuture<'_, Result<Option<Vec<HistoryMessage>>, String>> {
                Box::pin(async { Ok(None) })
            }
        }
        let (_hs, shared) = crate::testing::stack("").await;
        let agents = Arc::new(agents::Agents::new(
            shared.clone(),
            crate::testing::client(&shared),
            "12",
            None,
            None,
        ));
        // As `provision` does: the space, and a worker that runs what a sync schedules.
        let space = agents.ensure_space().await.unwrap();
        shared.state.set_space(space).await.unwrap();
        let shutdown = CancellationToken::new();
        let worker = tokio::spawn(work(shared.clone(), agents.clone(), shutdown.clone()));
        let bot = shared.config.ids().bot.clone();
        let invited = crate::model::MemberEvent {
            room_id: ruma::owned_room_id!("!elsewhere:ex.org"),
            user_id: bot.clone(),
            sender: ruma::owned_user_id!("@stranger:ex.org"),
            membership: crate::model::Membership::Invite,
            displayname: None,
            avatar_url: None,
            event_id: ruma::owned_event_id!("$invite"),
            origin_server_ts: 1,
        };
        shared
            .state
            .record_transaction("t1".into(), 1, vec![invited])
            .await
            .unwrap();
        let kept = |shared: &Shared| {
            shared.state.read(|m| {
                m.member(ruma::room_id!("!elsewhere:ex.org"), &bot)
                    .is_some()
            })
        };
        for trigger in ["startup", "manual", "sighup"] {
            run_sync(&shared, &agents, &NoAgents, trigger, None).await;
            assert!(kept(&shared), "{trigger}: kept");
        }
        run_sync(&shared, &agents, &NoAgents, "interval", None).await;
        assert!(!kept(&shared), "interval: forgotten");
        shutdown.cancel();
        worker.await.unwrap();
    }

    /// A rate limit that asks for no wait at all (`Retry-After: 0`, a date already past by
    /// roster's clock) is not counted as a failure either, so it must not reschedule the
    /// key at once: that would be a busy loop against the homeserver that never gives up.
    #[test]
    fn should_not_retry_at_once_when_rate_limited_with_no_wait() {
        let mut failures = 0;
        for _ in 0..10 {
            match error_policy(
                &mut failures,
                &retry(Some(Duration::ZERO)),
                Backoff::DEFAULT,
            ) {
                Next::RetryIn(wait) => assert!(wait >= Backoff::DEFAULT.start, "{wait:?}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn should_wait_as_asked_when_rate_limited_without_counting_a_failure() {
        let mut failures = 2;
        let asked = Duration::from_secs(7);
        assert_eq!(
            error_policy(&mut failures, &retry(Some(asked)), Backoff::DEFAULT),
            Next::RetryIn(asked)
        );
        assert_eq!(failures, 2);
        assert_eq!(
            error_policy(&mut failures, &Outcome::Done(()), Backoff::DEFAULT),
            Next::Idle
        );
        assert_eq!(failures, 0);
    }
}
