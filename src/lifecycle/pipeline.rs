//! Moves lifecycle messages from the consumer through the worker to commits: receives,
//! orders per user, coalesces a user's waiting profile updates, runs at most `max_in_flight`
//! jobs, pauses partitions that wait or when the buffer is full, commits what is done, shows
//! stalls, and answers replays.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::kafka::{self, Context};
use super::offsets::Offsets;
use super::queue::KeyQueue;
use super::worker::{Stall, Worker};
use super::{Command, Job, Message, ReplayError, Replayed};
use crate::clock::now_ms;
use crate::metrics::PartitionLabels;
use crate::state::StalledPartition;

pub type Kafka = StreamConsumer<Context>;

/// How often finished offsets are committed and stalls reported (and on rebalance and
/// shutdown).
const COMMIT_INTERVAL: Duration = Duration::from_millis(250);
/// How long shutdown waits for running events before abandoning them (uncommitted).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Bound on asking the broker for a partition's range (replay).
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a full buffer only stops taking messages before every partition is paused.
/// Not taking leaves librdkafka's prefetched messages where they are, so the backlog flows
/// on the moment there is room; pausing drops them (they are fetched again on resume) but
/// lets the consumer go on polling, which the group requires (`max.poll.interval.ms`).
const FULL_BEFORE_PAUSE: Duration = Duration::from_secs(10);

struct Running {
    key: String,
    partition: i32,
    offset: i64,
    generation: u64,
    /// Offsets of the older updates this job stands for: done when it is (it may apply
    /// them itself, and until then a restart must deliver them again).
    superseded: Vec<i64>,
    abort: AbortHandle,
}

pub struct Pipeline {
    consumer: Kafka,
    topic: String,
    offsets: Arc<Mutex<Offsets>>,
    queue: KeyQueue<Job>,
    tasks: JoinSet<()>,
    running: HashMap<tokio::task::Id, Running>,
    worker: Arc<Worker>,
    max_in_flight: usize,
    max_buffered: usize,
    /// Partitions shown as stalled last time, so a recovered one drops back to 0.
    shown_stalled: Vec<i32>,
    /// Since when the buffer has been full, while it is.
    full_since: Option<tokio::time::Instant>,
    /// Whether the store knows which cluster and topic the offsets come from (see
    /// [`Pipeline::note_source`]); no job starts before.
    source_noted: bool,
}

impl Pipeline {
    pub fn new(
        consumer: Kafka,
        topic: String,
        offsets: Arc<Mutex<Offsets>>,
        worker: Arc<Worker>,
        max_in_flight: usize,
        max_buffered: usize,
    ) -> Pipeline {
        Pipeline {
            consumer,
            topic,
            offsets,
            queue: KeyQueue::default(),
            tasks: JoinSet::new(),
            running: HashMap::new(),
            worker,
            max_in_flight,
            max_buffered,
            shown_stalled: Vec::new(),
            full_since: None,
            source_noted: false,
        }
    }

    fn offsets(&self) -> std::sync::MutexGuard<'_, Offsets> {
        self.offsets.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn run(
        &mut self,
        mut commands: mpsc::Receiver<Command>,
        mut stalls: mpsc::Receiver<Stall>,
        shutdown: CancellationToken,
    ) {
        let mut commit_every = tokio::time::interval(COMMIT_INTERVAL);
        commit_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let revoked = self.offsets().take_revoked();
            if !revoked.is_empty() {
                self.drop_generations(&revoked);
            }
            if !self.source_noted && self.queue.len() > 0 {
                self.note_source().await;
            }
            if self.source_noted {
                self.start_jobs();
            }
            let take = self.apply_pauses();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(command) = commands.recv() => self.command(command),
                Some(finished) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.finished(finished);
                }
                Some(stall) = stalls.recv() => {
                    self.offsets().stalled(stall.partition, stall.generation, stall.offset, now_ms(), stall.reason);
                }
                _ = commit_every.tick() => {
                    self.commit(CommitMode::Async);
                    self.show_stalls();
                }
                received = self.consumer.recv(), if take => match received.map(|m| Message::from_kafka(&m)) {
                    Ok(message) => self.receive(message),
                    Err(error) => {
                        if kafka::is_broker_failure(&error) {
                            // The client context has logged it, with its cause.
                            tracing::debug!(error = %error, "lifecycle consumer error");
                        } else {
                            tracing::warn!(error = %error, "lifecycle consumer error");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        self.shut_down().await;
    }

    /// Tells the store which topic, on which cluster, the offsets of applied profiles come
    /// from, before the first job runs. A topic of the same name on another cluster (new
    /// brokers, or the same address in front of a rebuilt cluster) starts its offsets again
    /// at 0: read against the old cluster's positions, its updates would look applied
    /// already and be dropped. Asked once messages have come, so the brokers answer; a
    /// broker that names no cluster is known by `lifecycle.brokers`.
    async fn note_source(&mut self) {
        let cluster = tokio::task::block_in_place(|| {
            self.consumer.client().fetch_cluster_id(WATERMARK_TIMEOUT)
        })
        .unwrap_or_else(|| self.worker.shared.config.lifecycle.brokers.clone());
        let source = source(&self.topic, &cluster);
        match self.worker.shared.state.use_lifecycle_topic(source).await {
            Ok(0) => {}
            Ok(profiles) => tracing::info!(
                topic = %self.topic,
                %cluster,
                profiles,
                "lifecycle.topic or its Kafka cluster changed: offsets applied from the old one no longer hold back any update"
            ),
            Err(error) => {
                tracing::warn!(%error, "cannot note the lifecycle topic in the store; no event is applied until it is; check store.path");
                return;
            }
        }
        self.source_noted = true;
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
        let replayed = self
            .offsets()
            .is_replayed(message.partition, message.offset);
        let job = Job {
            message,
            generation,
            decoded,
            replayed,
        };
        self.worker.received(&job);
        self.queue.push(key, job);
    }

    fn start_jobs(&mut self) {
        while self.running.len() < self.max_in_flight {
            let Some((key, mut job, superseded)) = self.queue.pop_coalesced(Job::supersedes) else {
                break;
            };
            // A replayed update asks for the profile in full; the newer one carries that.
            job.replayed |= superseded.iter().any(|older| older.replayed);
            // Same partition and generation as `job` (`Job::supersedes`).
            let superseded_offsets = superseded.iter().map(|o| o.message.offset).collect();
            let (partition, offset, generation) =
                (job.message.partition, job.message.offset, job.generation);
            let abort = self.tasks.spawn(self.worker.clone().work(job, superseded));
            self.running.insert(
                abort.id(),
                Running {
                    key,
                    partition,
                    offset,
                    generation,
                    superseded: superseded_offsets,
                    abort,
                },
            );
        }
    }

    fn finished(&mut self, finished: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let (id, completed, panicked) = match finished {
            Ok((id, ())) => (id, true, false),
            Err(e) => {
                if e.is_panic() {
                    tracing::error!(error = %e, "a lifecycle job panicked; its partition stops committing until restart");
                }
                (e.id(), false, e.is_panic())
            }
        };
        let Some(running) = self.running.remove(&id) else {
            return;
        };
        if panicked {
            // A bug: the offset stays uncommitted until a restart redelivers it. Shown as a
            // stall (status, roster_lifecycle_stalled_seconds, its alert), not only logged;
            // the partition's other events go on.
            self.offsets().panicked(
                running.partition,
                running.generation,
                running.offset,
                now_ms(),
                "roster panicked applying this event (a bug: see the log); restart roster to try it again".into(),
            );
        }
        self.queue.finish(&running.key);
        if completed {
            let mut offsets = self.offsets();
            for older in running.superseded {
                offsets.done(running.partition, running.generation, older);
            }
            offsets.done(running.partition, running.generation, running.offset);
        }
    }

    /// Pauses the partitions that wait on the homeserver, and every partition once the
    /// buffer has been full for [`FULL_BEFORE_PAUSE`]; resumes the others. Returns whether
    /// to take messages now: not while the buffer is full, unless all is paused.
    fn apply_pauses(&mut self) -> bool {
        let full = self.queue.len() + self.running.len() >= self.max_buffered;
        let now = tokio::time::Instant::now();
        self.full_since = if full {
            Some(self.full_since.unwrap_or(now))
        } else {
            None
        };
        let pause_all = self
            .full_since
            .is_some_and(|since| now.duration_since(since) >= FULL_BEFORE_PAUSE);
        let changes = self.offsets().pause_changes(pause_all);
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
        !full || pause_all
    }

    /// Publishes which partitions wait, since when and why: status and the stall gauge.
    fn show_stalls(&mut self) {
        let now = now_ms();
        let stalled: Vec<StalledPartition> = self.offsets().stalls(now);
        let metrics = &self.worker.shared.metrics;
        for partition in self.shown_stalled.drain(..) {
            if !stalled.iter().any(|s| s.partition == partition) {
                metrics
                    .lifecycle_stalled_seconds
                    .get_or_create(&PartitionLabels { partition })
                    .set(0);
            }
        }
        for stall in &stalled {
            metrics
                .lifecycle_stalled_seconds
                .get_or_create(&PartitionLabels {
                    partition: stall.partition,
                })
                .set((stall.stalled_for_ms / 1000) as i64);
            self.shown_stalled.push(stall.partition);
        }
        self.worker
            .shared
            .state
            .status(|s| s.lifecycle_stalled = stalled);
    }

    /// Drops queued and running work of partition generations that ended (revoke or
    /// replay); work of a later generation of the same partition stays.
    fn drop_generations(&mut self, ended: &[u64]) {
        self.queue.retain(|job| !ended.contains(&job.generation));
        for running in self.running.values() {
            if ended.contains(&running.generation) {
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
            // No instance owns a partition the topic does not have: say so, not "ask another".
            let count = tokio::task::block_in_place(|| {
                self.consumer
                    .fetch_metadata(Some(&self.topic), WATERMARK_TIMEOUT)
            })
            .ok()
            .and_then(|m| Some(m.topics().first()?.partitions().len() as i32))
            .filter(|count| *count > 0);
            if let Some(count) = count
                && !(0..count).contains(&partition)
            {
                return Err(ReplayError::NoSuchPartition {
                    topic: self.topic.clone(),
                    partition,
                    last: count - 1,
                });
            }
            return Err(ReplayError::NotAssigned {
                partition,
                assigned,
            });
        }
        // An operator command: blocking this task for the broker's answer is acceptable.
        let (low, high) = tokio::task::block_in_place(|| {
            self.consumer
                .fetch_watermarks(&self.topic, partition, WATERMARK_TIMEOUT)
        })
        .map_err(|e| ReplayError::Failed(format!("cannot read the partition's range: {e}")))?;
        if offset < low || offset > high {
            return Err(ReplayError::OutOfRange {
                partition,
                offset,
                low,
                high,
            });
        }
        // Forward would commit past events never applied nor dead-lettered. Before anything
        // came since the assignment, the group's committed offset is where it stands; with
        // none, where it starts is not known yet (start_from may be either end). The
        // partition's start skips nothing whatever the position.
        let position = match self.offsets().position(partition) {
            Some(position) => position,
            None if offset <= low => low,
            None => self
                .committed_position(partition)
                .map_err(|e| {
                    ReplayError::Failed(format!("cannot read the group's committed offset: {e}"))
                })?
                .ok_or(ReplayError::NoPosition { partition })?,
        };
        if offset > position {
            return Err(ReplayError::Ahead {
                partition,
                offset,
                position,
            });
        }
        // Seek first: a seek that fails leaves the partition's work and offsets as they were
        // (dropping them first would lose what was in flight while librdkafka went on).
        self.consumer
            .seek(
                &self.topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            )
            .map_err(|e| ReplayError::Failed(format!("seek failed: {e}")))?;
        let rewound = self.offsets().rewind(partition, offset);
        if let Some((ended, _)) = rewound {
            self.drop_generations(&[ended]);
        }
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

    /// The group's committed offset of `partition` (`None`: it has none).
    fn committed_position(
        &self,
        partition: i32,
    ) -> Result<Option<i64>, rdkafka::error::KafkaError> {
        let mut list = TopicPartitionList::new();
        list.add_partition(&self.topic, partition);
        let committed = tokio::task::block_in_place(|| {
            self.consumer.committed_offsets(list, WATERMARK_TIMEOUT)
        })?;
        Ok(
            match committed
                .find_partition(&self.topic, partition)
                .map(|p| p.offset())
            {
                Some(Offset::Offset(offset)) => Some(offset),
                _ => None,
            },
        )
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

/// What the store is told the offsets of applied profiles come from: a topic on a cluster.
fn source(topic: &str, cluster: &str) -> String {
    format!("{topic} on cluster {cluster}")
}
