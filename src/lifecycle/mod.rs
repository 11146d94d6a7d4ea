//! Consumes identity lifecycle events from Kafka (`lifecycle.topic`), applies each to the
//! homeserver through the identity effects, and commits or dead-letters it.
//!
//! The house: [`kafka`] configures the clients and holds their callbacks; the [`pipeline`]
//! receives, orders, runs and commits; the [`worker`] handles one message (decode, plan,
//! apply, retry or dead-letter); [`effects`] takes identity effects on the homeserver;
//! [`decode`], [`offsets`] and [`queue`] are pure.
//!
//! Invariants:
//! - An offset is committed only when every message before it in its partition was applied,
//!   skipped on purpose, or written to the dead-letter topic ([`offsets`]).
//! - One user's events (the message key, else the user id) are applied one at a time in
//!   arrival order; different users go side by side, at most `max_in_flight_users` ([`queue`]).
//!   Of a user's profile updates waiting together, only the newest is applied when it sets
//!   every part the older ones set ([`Job::supersedes`]); the older ones are done unapplied
//!   when it is done, or applied in its place when it is dead-lettered (for what it could
//!   not set: never over a part it set before it was refused).
//!   A creation or a deletion is never skipped that way, and nothing moves past one.
//! - A profile part equal to what roster last applied is not sent again ([`effects`]),
//!   except for an event consumed again by `replay`, which is applied in full.
//!   Which offsets count as applied is known per topic and Kafka cluster: no job runs
//!   before the store has noted both, so a topic on new brokers is not held back by the
//!   old cluster's offsets.
//! - While the homeserver (or the dead-letter topic) is unreachable, the message is retried
//!   with backoff and its partition is paused: nothing after it is committed or skipped, and
//!   at most `max_buffered_events` messages are held; beyond that no message is taken, and
//!   after 10 s of that every partition pauses (the consumer polls on, fetching nothing).
//!   A partition that waits is listed in status and in `roster_lifecycle_stalled_seconds`.
//! - A rebalance commits what is done for the partitions leaving and drops their pending
//!   work (the next owner gets it again; every effect is idempotent).

pub mod decode;
pub mod effects;
mod kafka;
mod offsets;
mod pipeline;
mod queue;
pub mod worker;

use std::sync::{Arc, Mutex, OnceLock};

use futures::future::BoxFuture;
use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::model::identity::PlanOptions;
use crate::retry::Backoff;

pub use decode::{DecodeError, Decoded, decode};
use effects::IdentityEffects;
use worker::{DeadLetter, DeadLetterSink, SinkError, Worker};

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
        use rdkafka::Message as _;
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

    /// The ordering key: the user id, else (undecodable) the message key, else the message
    /// itself. By user first: one user's events keyed differently (unkeyed legacy events
    /// beside keyed ones, keys that are event ids) must still apply in order.
    fn ordering_key(&self, decoded: &Result<Decoded, DecodeError>) -> String {
        if let Some(event) = decoded.as_ref().ok().and_then(Decoded::event) {
            return format!("u:{}", event.id());
        }
        match self.key.as_deref().filter(|k| !k.is_empty()) {
            Some(key) => format!("k:{}", String::from_utf8_lossy(key)),
            None => format!("m:{}:{}", self.partition, self.offset),
        }
    }
}

/// A message on its way through the pipeline.
pub struct Job {
    pub message: Message,
    /// The partition's generation when it arrived (see `offsets`).
    pub generation: u64,
    pub decoded: Result<Decoded, DecodeError>,
    /// Consumed again by a replay: applied in full, even what roster applied before.
    pub replayed: bool,
}

#[cfg(test)]
impl Job {
    /// A job as the pipeline builds it for a message just received (generation 1, not a
    /// replay).
    pub(crate) fn fresh(message: Message) -> Job {
        Job {
            decoded: message.decode(),
            message,
            generation: 1,
            replayed: false,
        }
    }
}

impl Job {
    /// Whether applying `self` makes applying `older` (a job of the same key, waiting before
    /// it) pointless: the same partition and generation, a later offset, and an event that
    /// supersedes the older one's (`IdentityEvent::supersedes`: profile updates only).
    pub fn supersedes(&self, older: &Job) -> bool {
        let (Ok(newer_decoded), Ok(older_decoded)) = (&self.decoded, &older.decoded) else {
            return false;
        };
        let (Some(newer_event), Some(older_event)) = (newer_decoded.event(), older_decoded.event())
        else {
            return false;
        };
        self.message.partition == older.message.partition
            && self.generation == older.generation
            && self.message.offset > older.message.offset
            && newer_event.supersedes(older_event)
    }
}

/// A replay that took effect.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    #[error("topic {topic} has no partition {partition}; its partitions are 0..={last}")]
    NoSuchPartition {
        topic: String,
        partition: i32,
        last: i32,
    },
    #[error(
        "offset {offset} is outside partition {partition}'s range {low}..={high}; pick an offset in it ({high} is the next message to arrive)"
    )]
    OutOfRange {
        partition: i32,
        offset: i64,
        low: i64,
        high: i64,
    },
    #[error(
        "offset {offset} is past partition {partition}'s position {position} (the oldest event not yet done): a replay goes back and never skips events; an event that cannot be applied goes to the dead-letter topic by itself"
    )]
    Ahead {
        partition: i32,
        offset: i64,
        position: i64,
    },
    #[error(
        "partition {partition} has no position yet (nothing came since it was assigned and the group has no committed offset): try again once an event has come"
    )]
    NoPosition { partition: i32 },
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
    /// Re-consumes `partition` from `offset`, which must lie between the partition's low and
    /// high watermarks: pending work of that partition is dropped, the consumer seeks, and
    /// the position is committed there.
    pub async fn replay(&self, partition: i32, offset: i64) -> Result<Replayed, ReplayError> {
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

/// Writes dead letters to the dead-letter topic.
struct KafkaSink {
    producer: FutureProducer<kafka::DeadLetterContext>,
    topic: String,
}

impl DeadLetterSink for KafkaSink {
    fn send(&self, letter: DeadLetter) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let mut headers = OwnedHeaders::new_with_capacity(letter.headers.len());
            for (key, value) in &letter.headers {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_slice()),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).headers(headers);
            if let Some(key) = letter.key.as_deref() {
                record = record.key(key);
            }
            if let Some(payload) = letter.payload.as_deref() {
                record = record.payload(payload);
            }
            match self
                .producer
                .send(record, std::time::Duration::from_secs(10))
                .await
            {
                Ok(_) => Ok(()),
                Err((error, _)) => {
                    let too_large = matches!(
                        error.rdkafka_error_code(),
                        Some(
                            RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidRecord
                        )
                    );
                    if too_large {
                        Err(SinkError::TooLarge(error.to_string()))
                    } else {
                        Err(SinkError::Unavailable(error.to_string()))
                    }
                }
            }
        })
    }

    fn name(&self) -> &str {
        &self.topic
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
    // Held partitions, 0 until the group assigns some: a consumer that cannot reach its
    // brokers shows no lag and no stall, only this.
    shared.metrics.lifecycle_partitions(&topic).set(0);
    let offsets = Arc::new(Mutex::new(offsets::Offsets::default()));
    let context = kafka::Context::new(topic.clone(), offsets.clone(), shared.clone());
    let consumer: pipeline::Kafka = kafka::consumer_config(&lifecycle)
        .create_with_context(context)
        .map_err(|e| client_error("consumer", e))?;
    consumer
        .subscribe(&[&topic])
        .map_err(|source| LifecycleError::Subscribe {
            topic: topic.clone(),
            source,
        })?;
    let producer: FutureProducer<kafka::DeadLetterContext> = kafka::producer_config(&lifecycle)
        .create_with_context(kafka::DeadLetterContext)
        .map_err(|e| client_error("dead-letter producer", e))?;

    let (commands_tx, commands) = mpsc::channel(8);
    let _ = shared.lifecycle.sender.set(commands_tx);
    let (stalls_tx, stalls) = mpsc::channel(lifecycle.max_in_flight_users * 4);
    let dead_letter_topic = shared.config.dead_letter_topic();
    let worker = Arc::new(Worker {
        shared: shared.clone(),
        effects,
        dead_letters: Arc::new(KafkaSink {
            producer,
            topic: dead_letter_topic.clone(),
        }),
        topic: topic.clone(),
        options: PlanOptions {
            create_missing_users: lifecycle.create_missing_users,
        },
        backoff: Backoff::DEFAULT,
        stalls: stalls_tx,
    });
    tracing::info!(
        topic = %topic,
        group = %lifecycle.group_id,
        dead_letter_topic = %dead_letter_topic,
        matrix_enabled = worker.effects.is_some(),
        "lifecycle consumer started"
    );
    let mut pipeline = pipeline::Pipeline::new(
        consumer,
        topic,
        offsets,
        worker,
        lifecycle.max_in_flight_users,
        lifecycle.max_buffered_events,
    );
    pipeline.run(commands, stalls, shutdown).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const UUID: &str = "6f1b2c3d-aaaa-4bbb-8ccc-0123456789ab";

    fn job(partition: i32, offset: i64, event_type: &str, data: serde_json::Value) -> Job {
        let message = Message {
            partition,
            offset,
            key: Some(UUID.as_bytes().to_vec()),
            payload: Some(serde_json::to_vec(&data).unwrap()),
            headers: vec![(
                decode::TYPE_HEADER.into(),
                Some(event_type.as_bytes().to_vec()),
            )],
        };
        Job::fresh(message)
    }

    fn update(offset: i64, name: &str) -> Job {
        job(
            0,
            offset,
            "UserProfileUpdatedEvent",
            json!({ "user_id": UUID, "username": "u", "display_name": name, "follower_count": offset }),
        )
    }

    #[test]
    fn should_supersede_only_an_older_update_of_the_same_partition_and_generation() {
        assert!(update(5, "B").supersedes(&update(4, "A")));
        assert!(
            !update(4, "A").supersedes(&update(5, "B")),
            "older never wins"
        );
        let mut elsewhere = update(9, "B");
        elsewhere.message.partition = 1;
        assert!(
            !elsewhere.supersedes(&update(4, "A")),
            "offsets of two partitions"
        );
        let mut reassigned = update(9, "B");
        reassigned.generation = 2;
        assert!(!reassigned.supersedes(&update(4, "A")));
    }

    #[test]
    fn should_order_one_users_events_together_however_they_are_keyed() {
        let ordering = |job: &Job| job.message.ordering_key(&job.decoded);
        let keyed = update(1, "A");
        let mut unkeyed = update(2, "B");
        unkeyed.message.key = None;
        let mut event_id_key = update(3, "C");
        event_id_key.message.key = Some(b"evt-3".to_vec());
        for job in [&unkeyed, &event_id_key] {
            assert_eq!(ordering(job), ordering(&keyed));
        }
        let broken = job(0, 4, "UserProfileUpdatedEvent", json!({ "user_id": UUID }));
        assert_eq!(
            ordering(&broken),
            format!("k:{UUID}"),
            "undecodable: by its key"
        );
        let mut broken_unkeyed = broken;
        broken_unkeyed.message.key = None;
        assert_eq!(ordering(&broken_unkeyed), "m:0:4", "orders against nothing");
    }

    #[test]
    fn should_never_supersede_a_creation_a_deletion_or_an_undecodable_message() {
        let created = job(
            0,
            1,
            "UserCreatedEvent",
            json!({ "user_id": UUID, "username": "u" }),
        );
        let deleted = job(
            0,
            2,
            "UserDeletedEvent",
            json!({ "user_id": UUID, "soft_delete": true }),
        );
        let broken = job(0, 3, "UserProfileUpdatedEvent", json!({ "user_id": UUID }));
        assert!(broken.decoded.is_err());
        for older in [&created, &deleted, &broken] {
            assert!(!update(10, "B").supersedes(older));
        }
        assert!(!deleted.supersedes(&update(0, "A")));
        assert!(!broken.supersedes(&update(0, "A")));
    }
}
