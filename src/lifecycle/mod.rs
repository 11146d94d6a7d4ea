//! Consumes identity lifecycle events from Kafka (`lifecycle.topic`), hands each to the
//! model and the identity reconciler, and commits or dead-letters it.
//!
//! Invariants (DESIGN principle 5):
//! - An offset is committed only when every message before it in its partition was applied,
//!   skipped on purpose, or written to the dead-letter topic ([`offsets`]).
//! - One user's events (the message key, else the user id) are applied one at a time in
//!   arrival order; different users go side by side, at most `max_in_flight_users` ([`queue`]).
//! - While the homeserver (or the dead-letter topic) is unreachable, the message is retried
//!   with backoff and its partition is paused: nothing after it is committed or skipped, and
//!   at most `max_buffered_events` messages are held; beyond that every partition pauses.
//! - A rebalance commits what is done for the partitions leaving and drops their pending
//!   work (the next owner gets it again; every effect is idempotent).
//!
//! Knows nothing of HTTP: it decodes ([`decode`]), asks `model::identity` for a plan and
//! awaits `reconcile::identity` for the outcome.

pub mod decode;
mod offsets;
mod queue;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rdkafka::Message as _;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::metrics::{LifecycleLabels, Metrics};
use crate::model::identity::PlanOptions;
use crate::reconcile::identity::{IdentityEffects, Outcome};

pub use decode::{DecodeError, Decoded, decode};
use offsets::Offsets;
use queue::KeyQueue;

/// Dead-letter header that says why the message is there.
pub const REASON_HEADER: &str = "reason";
/// How often finished offsets are committed (and on rebalance and shutdown).
const COMMIT_INTERVAL: Duration = Duration::from_millis(250);
/// How long shutdown waits for running events before abandoning them (uncommitted).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
const RETRY_START: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Bound on writing one dead letter; longer counts as the topic being unreachable.
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the consumer could not start.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(
        "cannot create the Kafka {what} for {brokers}: {source}; check lifecycle.brokers and lifecycle.kafka"
    )]
    Client {
        what: &'static str,
        brokers: String,
        source: rdkafka::error::KafkaError,
    },
    #[error("cannot subscribe to lifecycle.topic {topic:?}: {source}")]
    Subscribe {
        topic: String,
        source: rdkafka::error::KafkaError,
    },
}

/// One Kafka message, owned, as the rest of roster sees it.
#[derive(Debug, Clone)]
pub struct Message {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Message {
    fn from_kafka(m: &BorrowedMessage<'_>) -> Message {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        Message {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    pub fn decode(&self) -> Result<Decoded, DecodeError> {
        decode(self.header(decode::TYPE_HEADER), self.payload.as_deref())
    }

    /// The ordering key: the message key, else the user id, else the message itself (an
    /// undecodable message without a key orders against nothing).
    fn ordering_key(&self, decoded: &Result<Decoded, DecodeError>) -> String {
        if let Some(key) = self.key.as_deref().filter(|k| !k.is_empty()) {
            return format!("k:{}", String::from_utf8_lossy(key));
        }
        match decoded {
            Ok(Decoded::Event(event)) => format!("u:{}", event.id()),
            _ => format!("m:{}:{}", self.partition, self.offset),
        }
    }
}

/// A replay that took effect.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Replayed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("the lifecycle consumer is not running; set lifecycle.enabled (KAFKA_ENABLED)")]
    NotRunning,
    #[error(
        "partition {partition} is not assigned to this roster (assigned: {assigned:?}); ask the instance that owns it"
    )]
    NotAssigned { partition: i32, assigned: Vec<i32> },
    #[error("offset {0} is negative; expected a message offset, 0 for the beginning")]
    BadOffset(i64),
    #[error("cannot replay: {0}")]
    Failed(String),
}

enum Command {
    Replay {
        partition: i32,
        offset: i64,
        reply: oneshot::Sender<Result<Replayed, ReplayError>>,
    },
}

/// How the admin API reaches a running consumer.
#[derive(Default)]
pub struct Control {
    sender: OnceLock<mpsc::Sender<Command>>,
}

impl Control {
    /// Re-consumes `partition` from `offset`: pending work of that partition is dropped,
    /// the consumer seeks, and the position is committed there.
    pub async fn replay(&self, partition: i32, offset: i64) -> Result<Replayed, ReplayError> {
        if offset < 0 {
            return Err(ReplayError::BadOffset(offset));
        }
        let sender = self.sender.get().ok_or(ReplayError::NotRunning)?;
        let (reply, answer) = oneshot::channel();
        sender
            .send(Command::Replay {
                partition,
                offset,
                reply,
            })
            .await
            .map_err(|_| ReplayError::NotRunning)?;
        answer.await.map_err(|_| ReplayError::NotRunning)?
    }
}

/// Rebalance and statistics callbacks; they run inside `recv`, on the consumer's task.
struct Context {
    topic: String,
    offsets: Arc<Mutex<Offsets>>,
    metrics: Arc<Metrics>,
}

impl Context {
    fn offsets(&self) -> std::sync::MutexGuard<'_, Offsets> {
        self.offsets.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        // librdkafka's lag is behind the committed offset; -1 means unknown.
        let lag: i64 = statistics
            .topics
            .get(&self.topic)
            .map(|t| t.partitions.values().map(|p| p.consumer_lag.max(0)).sum())
            .unwrap_or(0);
        self.metrics.lifecycle_lag.set(lag);
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        let mut commit = TopicPartitionList::new();
        let mut revoked = Vec::new();
        {
            let mut offsets = self.offsets();
            for element in list.elements_for_topic(&self.topic) {
                revoked.push(element.partition());
                if let Some(position) = offsets.revoke(element.partition()) {
                    let _ = commit.add_partition_offset(
                        &self.topic,
                        element.partition(),
                        Offset::Offset(position),
                    );
                }
            }
        }
        // The lock is released: the commit callback takes it.
        if commit.count() > 0
            && let Err(e) = consumer.commit(&commit, CommitMode::Sync)
        {
            tracing::warn!(error = %e, "cannot commit finished offsets of revoked partitions; their next owner repeats them");
        }
        tracing::info!(partitions = ?revoked, "lifecycle partitions revoked");
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let mut assigned = Vec::new();
                {
                    let mut offsets = self.offsets();
                    for element in list.elements_for_topic(&self.topic) {
                        offsets.assign(element.partition());
                        assigned.push(element.partition());
                    }
                }
                // A pause may survive a revoke and re-assign; start every new one fetching.
                if let Err(e) = consumer.resume(list) {
                    tracing::warn!(error = %e, "cannot resume assigned lifecycle partitions");
                }
                tracing::info!(partitions = ?assigned, "lifecycle partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "lifecycle rebalance failed"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            let failed: Vec<(i32, i64)> = offsets
                .elements_for_topic(&self.topic)
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some((e.partition(), o)),
                    _ => None,
                })
                .collect();
            tracing::warn!(error = %e, offsets = ?failed, "lifecycle commit failed; retrying");
            self.offsets().commit_failed(&failed);
        }
    }
}

type Kafka = StreamConsumer<Context>;

/// A message on its way through the pipeline.
struct Job {
    message: Message,
    generation: u64,
    decoded: Result<Decoded, DecodeError>,
}

struct Running {
    key: String,
    partition: i32,
    offset: i64,
    generation: u64,
    abort: AbortHandle,
}

/// What one attempt at a job came to.
enum Step {
    Done,
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
}

/// Handles one job at a time; shared by all running jobs.
struct Worker {
    shared: Arc<Shared>,
    effects: Option<Arc<IdentityEffects>>,
    producer: FutureProducer,
    topic: String,
    dead_letter_topic: String,
    options: PlanOptions,
    stalls: mpsc::Sender<(i32, u64, i64)>,
}

impl Worker {
    fn count(&self, kind: &'static str, outcome: &'static str) {
        self.shared
            .metrics
            .lifecycle_events
            .get_or_create(&LifecycleLabels {
                r#type: kind,
                outcome,
            })
            .inc();
    }

    /// Runs `job` until it is done, retrying transient failures with backoff.
    async fn work(self: Arc<Self>, job: Job) {
        let mut delay = RETRY_START;
        let mut stalled = false;
        for attempt in 1u32.. {
            let (error, retry_after) = match self.attempt(&job).await {
                Step::Done => return,
                Step::Retry { error, retry_after } => (error, retry_after),
            };
            if !stalled {
                stalled = true;
                // Capacity covers every running job; a lost notice only delays a pause.
                let _ = self.stalls.try_send((
                    job.message.partition,
                    job.generation,
                    job.message.offset,
                ));
            }
            let wait = retry_after.unwrap_or(delay).min(RETRY_MAX);
            tracing::warn!(
                partition = job.message.partition,
                offset = job.message.offset,
                attempt,
                retry_in_ms = wait.as_millis() as u64,
                error = %error,
                "lifecycle event not applied yet; its partition waits"
            );
            tokio::time::sleep(crate::reconcile::jitter(wait)).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    async fn attempt(&self, job: &Job) -> Step {
        let message = &job.message;
        let event = match &job.decoded {
            Err(error) => {
                return self
                    .dead_letter(message, "undecodable", error.to_string())
                    .await;
            }
            Ok(Decoded::Unknown(event_type)) => {
                self.count("unknown", "skipped");
                tracing::debug!(
                    partition = message.partition,
                    offset = message.offset,
                    event_type = %event_type,
                    "lifecycle event of an unknown type skipped"
                );
                return Step::Done;
            }
            Ok(Decoded::Event(event)) => event,
        };
        let kind = event.kind();
        let plan =
            self.shared
                .model()
                .identities
                .plan(event, &self.shared.ids.server_name, self.options);
        if let Some(skip) = plan.skip {
            self.count(kind, "skipped");
            tracing::info!(user = %plan.user, event = kind, reason = skip.as_str(), "lifecycle event skipped");
            return Step::Done;
        }
        let Some(effects) = &self.effects else {
            self.count(kind, "matrix_disabled");
            tracing::info!(
                user = %plan.user,
                event = kind,
                effect = %plan.summary(),
                "lifecycle event consumed; lifecycle.matrix_enabled is false, so no Matrix action"
            );
            return Step::Done;
        };
        match effects.apply(&plan).await {
            Outcome::Applied => {
                self.count(kind, "applied");
                tracing::info!(
                    user = %plan.user,
                    event = kind,
                    effect = %plan.summary(),
                    ignored = ?plan.ignored,
                    partition = message.partition,
                    offset = message.offset,
                    "lifecycle event applied"
                );
                Step::Done
            }
            Outcome::MissingUser => {
                self.count(kind, "missing_user");
                tracing::info!(user = %plan.user, event = kind, "lifecycle event for a user who does not exist; nothing to do");
                Step::Done
            }
            Outcome::Transient { error, retry_after } => {
                self.count(kind, "retried");
                Step::Retry { error, retry_after }
            }
            Outcome::Permanent(reason) => self.dead_letter(message, kind, reason).await,
        }
    }

    /// Writes `message` to the dead-letter topic with its key, payload, original headers
    /// and a `reason` header.
    async fn dead_letter(&self, message: &Message, kind: &'static str, reason: String) -> Step {
        let partition = message.partition.to_string();
        let offset = message.offset.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(message.headers.len() + 4);
        for (key, value) in &message.headers {
            headers = headers.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        for (key, value) in [
            (REASON_HEADER, reason.as_str()),
            ("original_topic", self.topic.as_str()),
            ("original_partition", partition.as_str()),
            ("original_offset", offset.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.dead_letter_topic).headers(headers);
        if let Some(key) = message.key.as_deref() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload.as_deref() {
            record = record.payload(payload);
        }
        match self.producer.send(record, DEAD_LETTER_TIMEOUT).await {
            Ok(_) => {
                self.shared.metrics.dead_letters.inc();
                self.count(kind, "dead_lettered");
                tracing::warn!(
                    partition = message.partition,
                    offset = message.offset,
                    event = kind,
                    reason = %reason,
                    dead_letter_topic = %self.dead_letter_topic,
                    "lifecycle message dead-lettered"
                );
                Step::Done
            }
            Err((error, _)) => Step::Retry {
                error: format!(
                    "cannot write to the dead-letter topic {}: {error}",
                    self.dead_letter_topic
                ),
                retry_after: None,
            },
        }
    }
}

fn client_config(shared: &Shared) -> ClientConfig {
    let lifecycle = &shared.config.lifecycle;
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &lifecycle.brokers)
        .set("client.id", "roster");
    config
}

fn apply_extra(config: &mut ClientConfig, shared: &Shared) {
    for (key, value) in &shared.config.lifecycle.kafka {
        config.set(key, value);
    }
}

/// Runs the consumer until `shutdown`; commits what is done before returning.
///
/// `effects` is `None` when `lifecycle.matrix_enabled` is false: events are then consumed,
/// logged and committed without any Matrix action.
pub async fn run(
    shared: Arc<Shared>,
    effects: Option<Arc<IdentityEffects>>,
    shutdown: CancellationToken,
) -> Result<(), LifecycleError> {
    let lifecycle = shared.config.lifecycle.clone();
    let topic = lifecycle.topic.clone();
    let client_error = |what, source| LifecycleError::Client {
        what,
        brokers: lifecycle.brokers.clone(),
        source,
    };

    let mut consumer_config = client_config(&shared);
    consumer_config
        .set("group.id", &lifecycle.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A new group starts from the beginning: nothing is lost.
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000")
        // Bounds what librdkafka prefetches per partition.
        .set("queued.max.messages.kbytes", "8192")
        // Brokers that hold a fetch for its full wait (tansu does) add it to every event's
        // latency; 100 ms costs an idle consumer ten small fetches a second.
        .set("fetch.wait.max.ms", "100");
    apply_extra(&mut consumer_config, &shared);
    let offsets = Arc::new(Mutex::new(Offsets::default()));
    let context = Context {
        topic: topic.clone(),
        offsets: offsets.clone(),
        metrics: shared.metrics.clone(),
    };
    let consumer: Kafka = consumer_config
        .create_with_context(context)
        .map_err(|e| client_error("consumer", e))?;
    consumer
        .subscribe(&[&topic])
        .map_err(|source| LifecycleError::Subscribe {
            topic: topic.clone(),
            source,
        })?;

    let mut producer_config = client_config(&shared);
    producer_config.set("message.timeout.ms", "10000");
    apply_extra(&mut producer_config, &shared);
    let producer: FutureProducer = producer_config
        .create()
        .map_err(|e| client_error("dead-letter producer", e))?;

    let (commands_tx, commands) = mpsc::channel(8);
    let _ = shared.lifecycle.sender.set(commands_tx);
    let (stalls_tx, stalls) = mpsc::channel(lifecycle.max_in_flight_users * 2);
    let worker = Arc::new(Worker {
        shared: shared.clone(),
        effects,
        producer,
        topic: topic.clone(),
        dead_letter_topic: shared.config.dead_letter_topic(),
        options: PlanOptions {
            create_missing_users: lifecycle.create_missing_users,
        },
        stalls: stalls_tx,
    });
    tracing::info!(
        topic = %topic,
        group = %lifecycle.group_id,
        dead_letter_topic = %worker.dead_letter_topic,
        matrix_enabled = worker.effects.is_some(),
        "lifecycle consumer started"
    );
    let mut pipeline = Pipeline {
        consumer,
        topic,
        offsets,
        queue: KeyQueue::default(),
        tasks: JoinSet::new(),
        running: HashMap::new(),
        worker,
        max_in_flight: lifecycle.max_in_flight_users,
        max_buffered: lifecycle.max_buffered_events,
    };
    pipeline.run(commands, stalls, shutdown).await;
    Ok(())
}

struct Pipeline {
    consumer: Kafka,
    topic: String,
    offsets: Arc<Mutex<Offsets>>,
    queue: KeyQueue<Job>,
    tasks: JoinSet<()>,
    running: HashMap<tokio::task::Id, Running>,
    worker: Arc<Worker>,
    max_in_flight: usize,
    max_buffered: usize,
}

impl Pipeline {
    fn offsets(&self) -> std::sync::MutexGuard<'_, Offsets> {
        self.offsets.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn run(
        &mut self,
        mut commands: mpsc::Receiver<Command>,
        mut stalls: mpsc::Receiver<(i32, u64, i64)>,
        shutdown: CancellationToken,
    ) {
        let mut commit_every = tokio::time::interval(COMMIT_INTERVAL);
        commit_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let revoked = self.offsets().take_revoked();
            if !revoked.is_empty() {
                self.drop_partitions(&revoked);
            }
            self.start_jobs();
            self.apply_pauses();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(command) = commands.recv() => self.command(command),
                Some(finished) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.finished(finished);
                }
                Some((partition, generation, offset)) = stalls.recv() => {
                    self.offsets().stalled(partition, generation, offset);
                }
                _ = commit_every.tick() => self.commit(CommitMode::Async),
                received = self.consumer.recv() => match received.map(|m| Message::from_kafka(&m)) {
                    Ok(message) => self.receive(message),
                    Err(error) => {
                        tracing::warn!(error = %error, "lifecycle consumer error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        self.shut_down().await;
    }

    fn receive(&mut self, message: Message) {
        let Some(generation) = self.offsets().received(message.partition, message.offset) else {
            tracing::debug!(
                partition = message.partition,
                offset = message.offset,
                "message of a partition no longer assigned here; its owner handles it"
            );
            return;
        };
        let decoded = message.decode();
        let key = message.ordering_key(&decoded);
        self.queue.push(
            key,
            Job {
                message,
                generation,
                decoded,
            },
        );
    }

    fn start_jobs(&mut self) {
        while self.running.len() < self.max_in_flight {
            let Some((key, job)) = self.queue.pop() else {
                break;
            };
            let (partition, offset, generation) =
                (job.message.partition, job.message.offset, job.generation);
            let abort = self.tasks.spawn(self.worker.clone().work(job));
            self.running.insert(
                abort.id(),
                Running {
                    key,
                    partition,
                    offset,
                    generation,
                    abort,
                },
            );
        }
    }

    fn finished(&mut self, finished: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let (id, completed) = match finished {
            Ok((id, ())) => (id, true),
            Err(e) => {
                if e.is_panic() {
                    // A bug: the offset stays uncommitted until a restart redelivers it.
                    tracing::error!(error = %e, "a lifecycle job panicked; its partition stops committing until restart");
                }
                (e.id(), false)
            }
        };
        let Some(running) = self.running.remove(&id) else {
            return;
        };
        self.queue.finish(&running.key);
        if completed {
            self.offsets()
                .done(running.partition, running.generation, running.offset);
        }
    }

    fn apply_pauses(&mut self) {
        let buffered = self.queue.len() + self.running.len();
        let changes = self.offsets().pause_changes(buffered >= self.max_buffered);
        for (partitions, pause) in [(&changes.pause, true), (&changes.resume, false)] {
            if partitions.is_empty() {
                continue;
            }
            let mut list = TopicPartitionList::new();
            for &p in partitions {
                list.add_partition(&self.topic, p);
            }
            let result = if pause {
                self.consumer.pause(&list)
            } else {
                self.consumer.resume(&list)
            };
            match result {
                Ok(()) => tracing::debug!(?partitions, pause, "lifecycle fetching changed"),
                Err(e) => {
                    tracing::warn!(error = %e, ?partitions, pause, "cannot pause or resume lifecycle partitions")
                }
            }
        }
    }

    /// Drops queued and running work of partitions that left (revoke or replay).
    fn drop_partitions(&mut self, partitions: &[i32]) {
        self.queue
            .retain(|job| !partitions.contains(&job.message.partition));
        for running in self.running.values() {
            if partitions.contains(&running.partition) {
                running.abort.abort();
            }
        }
    }

    fn commit(&mut self, mode: CommitMode) {
        let positions = self.offsets().take_commits();
        if positions.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::new();
        for &(partition, position) in &positions {
            let _ = list.add_partition_offset(&self.topic, partition, Offset::Offset(position));
        }
        match self.consumer.commit(&list, mode) {
            Ok(()) => tracing::debug!(?positions, "lifecycle offsets committed"),
            Err(e) => {
                tracing::warn!(error = %e, ?positions, "cannot commit lifecycle offsets; retrying");
                self.offsets().commit_failed(&positions);
            }
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Replay {
                partition,
                offset,
                reply,
            } => {
                let _ = reply.send(self.replay(partition, offset));
            }
        }
    }

    fn replay(&mut self, partition: i32, offset: i64) -> Result<Replayed, ReplayError> {
        let assigned = self.offsets().assigned();
        if !assigned.contains(&partition) {
            return Err(ReplayError::NotAssigned {
                partition,
                assigned,
            });
        }
        self.drop_partitions(&[partition]);
        self.offsets().rewind(partition, offset);
        self.consumer
            .seek(
                &self.topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            )
            .map_err(|e| ReplayError::Failed(format!("seek failed: {e}")))?;
        self.commit(CommitMode::Sync);
        tracing::info!(
            partition,
            offset,
            "lifecycle replay: re-consuming from the offset"
        );
        Ok(Replayed {
            topic: self.topic.clone(),
            partition,
            offset,
        })
    }

    /// Lets running events finish (briefly), abandons the rest uncommitted, commits.
    async fn shut_down(&mut self) {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while !self.tasks.is_empty() {
            tokio::select! {
                Some(finished) = self.tasks.join_next_with_id() => self.finished(finished),
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let abandoned = self.running.len() + self.queue.len();
        self.tasks.abort_all();
        self.commit(CommitMode::Sync);
        tracing::info!(
            abandoned,
            "lifecycle consumer stopped; abandoned events are redelivered on restart"
        );
    }
}
