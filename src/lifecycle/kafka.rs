//! The Kafka clients: how the consumer and the dead-letter producer are configured, and the
//! consumer's callbacks (statistics, rebalances, commit results), which run inside `recv`
//! on the pipeline's task.

use std::sync::{Arc, Mutex};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use super::offsets::Offsets;
use crate::Shared;
use crate::config::{LifecycleConfig, StartFrom};
use crate::state::BrokerError;

#[derive(Clone, Copy)]
enum Client {
    Consumer,
    Producer,
}

/// Properties librdkafka 2.12 (CONFIGURATION.md) marks consumer-only (`C`), global and topic.
const CONSUMER_ONLY: &[&str] = &[
    "auto.commit.enable",
    "auto.commit.interval.ms",
    "auto.offset.reset",
    "check.crcs",
    "consume.callback.max.messages",
    "coordinator.query.interval.ms",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.partition.eof",
    "fetch.error.backoff.ms",
    "fetch.max.bytes",
    "fetch.message.max.bytes",
    "fetch.min.bytes",
    "fetch.queue.backoff.ms",
    "fetch.wait.max.ms",
    "group.id",
    "group.instance.id",
    "group.protocol",
    "group.protocol.type",
    "group.remote.assignor",
    "heartbeat.interval.ms",
    "isolation.level",
    "max.partition.fetch.bytes",
    "max.poll.interval.ms",
    "offset.store.method",
    "offset.store.path",
    "offset.store.sync.interval.ms",
    "partition.assignment.strategy",
    "queued.max.messages.kbytes",
    "queued.min.messages",
    "session.timeout.ms",
];

/// Properties librdkafka 2.12 marks producer-only (`P`), global and topic.
const PRODUCER_ONLY: &[&str] = &[
    "acks",
    "batch.num.messages",
    "batch.size",
    "compression.codec",
    "compression.level",
    "compression.type",
    "delivery.report.only.error",
    "delivery.timeout.ms",
    "enable.gapless.guarantee",
    "enable.idempotence",
    "linger.ms",
    "message.send.max.retries",
    "message.timeout.ms",
    "partitioner",
    "produce.offset.report",
    "queue.buffering.backpressure.threshold",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.messages",
    "queue.buffering.max.ms",
    "queuing.strategy",
    "request.required.acks",
    "request.timeout.ms",
    "retries",
    "sticky.partitioning.linger.ms",
    "transaction.timeout.ms",
    "transactional.id",
];

/// Properties shared by the consumer and the producer; `lifecycle.kafka` is applied last
/// (security settings, timeouts), except the keys roster must set itself (checked by config).
fn base(lifecycle: &LifecycleConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &lifecycle.brokers)
        .set("client.id", "roster");
    config
}

fn with_extra(
    mut config: ClientConfig,
    lifecycle: &LifecycleConfig,
    client: Client,
) -> ClientConfig {
    // One `lifecycle.kafka` map serves both clients; a property only the other client knows
    // would make librdkafka warn (CONFWARN) at every start, so each gets only its own.
    let not_ours = match client {
        Client::Consumer => PRODUCER_ONLY,
        Client::Producer => CONSUMER_ONLY,
    };
    for (key, value) in &lifecycle.kafka {
        if !not_ours.contains(&key.as_str()) {
            config.set(key, value);
        }
    }
    // librdkafka's OpenSSL is built into roster (rdkafka `ssl-vendored`): its compiled-in
    // certificate directory is not the system's, so without a CA of its own it would trust
    // nothing. `probe` makes it look in the usual system locations (Debian's
    // /etc/ssl/certs among them).
    let tls = lifecycle
        .kafka
        .get("security.protocol")
        .is_some_and(|p| p.eq_ignore_ascii_case("ssl") || p.eq_ignore_ascii_case("sasl_ssl"));
    let own_ca = ["ssl.ca.location", "ssl.ca.pem"]
        .iter()
        .any(|k| lifecycle.kafka.contains_key(*k));
    if tls && !own_ca {
        config.set("ssl.ca.location", "probe");
    }
    config
}

/// The consumer: manual commits only, bounded prefetch, statistics for the lag.
pub fn consumer_config(lifecycle: &LifecycleConfig) -> ClientConfig {
    let mut config = base(lifecycle);
    let reset = match lifecycle.start_from {
        StartFrom::Earliest => "earliest",
        StartFrom::Latest => "latest",
    };
    config
        .set("group.id", &lifecycle.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Where a group with no committed offset starts (`lifecycle.start_from`).
        .set("auto.offset.reset", reset)
        .set("statistics.interval.ms", "5000")
        // Bounds what librdkafka prefetches per partition.
        .set("queued.max.messages.kbytes", "8192")
        // Brokers that hold a fetch for its full wait (tansu does) add it to every event's
        // latency; 100 ms costs an idle consumer ten small fetches a second.
        .set("fetch.wait.max.ms", "100");
    with_extra(config, lifecycle, Client::Consumer)
}

/// The dead-letter producer: a write that takes longer than 10 s counts as failed.
pub fn producer_config(lifecycle: &LifecycleConfig) -> ClientConfig {
    let mut config = base(lifecycle);
    config.set("message.timeout.ms", "10000");
    with_extra(config, lifecycle, Client::Producer)
}

/// Rebalance, commit, log, error and statistics callbacks.
pub struct Context {
    pub topic: String,
    pub offsets: Arc<Mutex<Offsets>>,
    pub shared: Arc<Shared>,
    /// librdkafka's last broker connection failure (its `FAIL` log line): the cause behind
    /// an "all brokers are down" error.
    last_failure: Mutex<Option<String>>,
}

impl Context {
    pub fn new(topic: String, offsets: Arc<Mutex<Offsets>>, shared: Arc<Shared>) -> Context {
        Context {
            topic,
            offsets,
            shared,
            last_failure: Mutex::new(None),
        }
    }

    fn offsets(&self) -> std::sync::MutexGuard<'_, Offsets> {
        self.offsets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes how many partitions this consumer holds (`roster_lifecycle_partitions`).
    fn show_assigned(&self, offsets: &Offsets) {
        self.shared
            .metrics
            .lifecycle_partitions(&self.topic)
            .set(offsets.assigned().len() as i64);
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
        self.shared.metrics.lifecycle_lag.set(lag);
    }

    /// As rdkafka's default (target `librdkafka`), and remembers connection failures.
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(level, facility, message);
        if facility == "FAIL" {
            // "[thrd:HOST:PORT/bootstrap]: HOST:PORT/bootstrap: ...": the thread is said twice.
            let failure = message
                .strip_prefix("[thrd:")
                .and_then(|rest| rest.split_once("]: "))
                .map_or(message, |(_, failure)| failure);
            *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(failure.to_owned());
        }
    }

    /// librdkafka's client-wide errors (brokers unreachable, TLS or SASL failures): logged
    /// and shown in status until partitions are assigned again. librdkafka retries by itself.
    fn error(&self, error: KafkaError, reason: &str) {
        let last_failure = self
            .last_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let message = broker_error_message(&error, reason, last_failure.as_deref());
        tracing::error!(brokers = %self.shared.config.lifecycle.brokers, "{message}");
        self.shared.state.status(|s| {
            s.lifecycle_broker_error = Some(BrokerError {
                message,
                at_ms: crate::clock::now_ms(),
            })
        });
    }
}

/// librdkafka's log lines, at their level (target `librdkafka`). A connection failure
/// (`FAIL`) is at debug: the client's `error` callback reports it too, with its cause and
/// what to check, and one failure should be one line.
fn log_librdkafka(level: RDKafkaLogLevel, facility: &str, message: &str) {
    use RDKafkaLogLevel::*;
    if facility == "FAIL" {
        tracing::debug!(target: "librdkafka", "librdkafka: {facility} {message}");
        return;
    }
    match level {
        Emerg | Alert | Critical | Error => {
            tracing::error!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
        Warning => tracing::warn!(target: "librdkafka", "librdkafka: {facility} {message}"),
        Notice | Info => tracing::info!(target: "librdkafka", "librdkafka: {facility} {message}"),
        Debug => tracing::debug!(target: "librdkafka", "librdkafka: {facility} {message}"),
    }
}

/// A failure to reach or talk to the brokers, which librdkafka hands both to the client
/// context's `error` callback (logged there with its cause) and to the consumer's `recv`.
pub fn is_broker_failure(error: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(
            BrokerTransportFailure
                | AllBrokersDown
                | Resolve
                | Authentication
                | SaslAuthenticationFailed
                | SSL
        )
    )
}

/// The dead-letter producer's context. It reaches the same brokers as the consumer, whose
/// context reports their failures (and shows them in status): the producer's own copies of
/// those are logged at debug. A dead letter that cannot be written is reported where it
/// is sent.
pub struct DeadLetterContext;

impl ClientContext for DeadLetterContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "dead-letter producer: broker error");
    }
}

/// librdkafka's error and reason, the connection failure behind them, and which keys to
/// check. A broker that hangs up on the first request (ApiVersion) or a failed handshake
/// mostly means the client and the listener disagree about TLS.
fn broker_error_message(error: &KafkaError, reason: &str, last_failure: Option<&str>) -> String {
    let cause = last_failure
        .filter(|_| {
            matches!(
                error.rdkafka_error_code(),
                Some(RDKafkaErrorCode::AllBrokersDown)
            )
        })
        .map(|f| format!("; last failure: {f}"))
        .unwrap_or_default();
    let text = format!("{reason}{cause}").to_ascii_lowercase();
    let hint = if matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)
    ) {
        // The brokers answered: which ones and how to reach them is not the problem.
        "the brokers have no such topic: check lifecycle.topic (KAFKA_IDENTITY_EVENTS_TOPIC) or create the topic"
    } else if matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::TopicAuthorizationFailed)
    ) {
        "the brokers refuse roster's principal access to the topic: grant it read on lifecycle.topic (and write on the dead-letter topic)"
    } else if matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::GroupAuthorizationFailed)
    ) {
        "the brokers refuse roster's principal the consumer group: grant it read on lifecycle.group_id (KAFKA_CONSUMER_GROUP_ID)"
    } else if text.contains("sasl") || text.contains("authentication") {
        "check lifecycle.kafka sasl.mechanism, sasl.username and sasl.password"
    } else if ["ssl", "tls", "certificate", "handshake", "apiversion"]
        .iter()
        .any(|w| text.contains(w))
    {
        "the broker hung up during the handshake or its first request: check lifecycle.kafka security.protocol (ssl or sasl_ssl for a TLS listener, plaintext otherwise) and ssl.ca.location"
    } else {
        "check lifecycle.brokers and lifecycle.kafka security.protocol"
    };
    format!("Kafka: {error}: {reason}{cause}; {hint}")
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
            self.show_assigned(&offsets);
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
                    self.show_assigned(&offsets);
                }
                // Partitions arrive only from a reachable, authenticated broker.
                self.shared
                    .state
                    .status(|s| s.lifecycle_broker_error = None);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_tell_broker_failures_from_other_consumer_errors() {
        use rdkafka::types::RDKafkaErrorCode;
        for code in [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
        ] {
            assert!(is_broker_failure(&KafkaError::MessageConsumption(code)));
            assert!(is_broker_failure(&KafkaError::Global(code)));
        }
        // Not reported by the context: still a warning where it is received.
        let unknown_topic =
            KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownTopicOrPartition);
        assert!(!is_broker_failure(&unknown_topic));
    }

    fn lifecycle(yaml: &str) -> LifecycleConfig {
        crate::config::Config::from_yaml(&format!(
            "homeserver: {{server_name: ex.org}}\nlifecycle: {yaml}"
        ))
        .unwrap()
        .lifecycle
    }

    #[test]
    fn should_commit_by_hand_and_start_where_configured() {
        let earliest = consumer_config(&lifecycle("{group_id: g}"));
        assert_eq!(earliest.get("enable.auto.commit"), Some("false"));
        assert_eq!(earliest.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(earliest.get("group.id"), Some("g"));
        let latest = consumer_config(&lifecycle("{start_from: latest}"));
        assert_eq!(latest.get("auto.offset.reset"), Some("latest"));
    }

    #[test]
    fn should_pass_security_settings_to_both_clients() {
        let config = lifecycle(
            "{kafka: {security.protocol: sasl_ssl, sasl.mechanism: SCRAM-SHA-512, ssl.ca.location: /ca.pem}}",
        );
        for client in [consumer_config(&config), producer_config(&config)] {
            assert_eq!(client.get("security.protocol"), Some("sasl_ssl"));
            assert_eq!(client.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
            assert_eq!(client.get("ssl.ca.location"), Some("/ca.pem"));
        }
    }

    #[test]
    fn should_give_each_client_only_the_properties_it_knows() {
        let config = lifecycle(
            "{kafka: {session.timeout.ms: '45000', heartbeat.interval.ms: '3000', compression.type: zstd, socket.timeout.ms: '20000'}}",
        );
        let (consumer, producer) = (consumer_config(&config), producer_config(&config));
        assert_eq!(consumer.get("session.timeout.ms"), Some("45000"));
        assert_eq!(consumer.get("heartbeat.interval.ms"), Some("3000"));
        assert_eq!(consumer.get("compression.type"), None);
        assert_eq!(producer.get("compression.type"), Some("zstd"));
        assert_eq!(producer.get("session.timeout.ms"), None);
        assert_eq!(producer.get("heartbeat.interval.ms"), None);
        for client in [consumer, producer] {
            assert_eq!(client.get("socket.timeout.ms"), Some("20000"));
        }
    }

    #[test]
    fn should_probe_the_system_ca_store_for_tls_without_a_ca_of_its_own() {
        for protocol in ["ssl", "SASL_SSL"] {
            let config = lifecycle(&format!("{{kafka: {{security.protocol: {protocol}}}}}"));
            for client in [consumer_config(&config), producer_config(&config)] {
                assert_eq!(client.get("ssl.ca.location"), Some("probe"), "{protocol}");
            }
        }
        let inline = lifecycle("{kafka: {security.protocol: ssl, ssl.ca.pem: PEM}}");
        assert_eq!(consumer_config(&inline).get("ssl.ca.location"), None);
        let plain = lifecycle("{kafka: {security.protocol: plaintext}}");
        assert_eq!(consumer_config(&plain).get("ssl.ca.location"), None);
    }

    /// librdkafka refuses, at client creation, a protocol or mechanism it was built without
    /// ("OpenSSL not available at build time", "libzstd not available at build time").
    #[test]
    fn should_build_clients_for_tls_sasl_and_zstd() {
        use rdkafka::consumer::BaseConsumer;
        use rdkafka::producer::BaseProducer;
        for kafka in [
            "{security.protocol: ssl}",
            "{security.protocol: sasl_ssl, sasl.mechanism: PLAIN, sasl.username: u, sasl.password: p}",
            "{security.protocol: sasl_ssl, sasl.mechanism: SCRAM-SHA-256, sasl.username: u, sasl.password: p}",
            "{security.protocol: sasl_ssl, sasl.mechanism: SCRAM-SHA-512, sasl.username: u, sasl.password: p}",
            "{compression.type: zstd}",
        ] {
            let config = lifecycle(&format!("{{brokers: '127.0.0.1:1', kafka: {kafka}}}"));
            if let Err(e) = consumer_config(&config).create::<BaseConsumer>() {
                panic!("consumer with {kafka}: {e}");
            }
            if let Err(e) = producer_config(&config).create::<BaseProducer>() {
                panic!("producer with {kafka}: {e}");
            }
        }
    }

    #[test]
    fn should_name_the_cause_and_the_keys_to_check_for_each_kind_of_broker_error() {
        let down = KafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
        let plaintext_at_tls = broker_error_message(
            &down,
            "1/1 brokers are down",
            Some(
                "127.0.0.1:9093/bootstrap: Disconnected: connection reset by peer (after 8ms in state APIVERSION_QUERY)",
            ),
        );
        assert!(
            plaintext_at_tls.contains("last failure: 127.0.0.1:9093/bootstrap: Disconnected"),
            "{plaintext_at_tls}"
        );
        assert!(
            plaintext_at_tls.contains("security.protocol (ssl or sasl_ssl for a TLS listener"),
            "{plaintext_at_tls}"
        );
        let tls_at_plaintext = broker_error_message(
            &KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
            "127.0.0.1:9092/bootstrap: SSL handshake failed: ssl/record/ssl3_record.c:354: error:0A00010B:SSL routines::wrong version number",
            Some("unrelated"),
        );
        assert!(
            !tls_at_plaintext.contains("unrelated"),
            "{tls_at_plaintext}"
        );
        assert!(
            tls_at_plaintext.contains("plaintext otherwise"),
            "{tls_at_plaintext}"
        );
        let auth = KafkaError::Global(RDKafkaErrorCode::Authentication);
        let sasl = broker_error_message(
            &auth,
            "SASL authentication error: Authentication failed",
            None,
        );
        assert!(sasl.contains("sasl.username and sasl.password"), "{sasl}");
        let refused = broker_error_message(
            &down,
            "1/1 brokers are down",
            Some(
                "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused (after 0ms in state CONNECT)",
            ),
        );
        assert!(refused.contains("Connection refused"), "{refused}");
        assert!(refused.contains("check lifecycle.brokers"), "{refused}");
    }

    /// A topic the brokers do not have (a typo in KAFKA_IDENTITY_EVENTS_TOPIC, a topic not
    /// created yet) is said to be that, not a broker address or TLS problem.
    #[test]
    fn should_name_lifecycle_topic_when_the_brokers_have_no_such_topic() {
        let missing = broker_error_message(
            &KafkaError::Global(RDKafkaErrorCode::UnknownTopicOrPartition),
            "Subscribed topic not available: no.such.topic: Broker: Unknown topic or partition",
            Some("127.0.0.1:9092/bootstrap: Disconnected (after 3ms in state UP)"),
        );
        assert!(missing.contains("check lifecycle.topic"), "{missing}");
        assert!(!missing.contains("check lifecycle.brokers"), "{missing}");
        let denied = broker_error_message(
            &KafkaError::Global(RDKafkaErrorCode::TopicAuthorizationFailed),
            "Subscribed topic not available: nova.identity.events: Broker: Topic authorization failed",
            None,
        );
        assert!(
            denied.contains("grant it read on lifecycle.topic"),
            "{denied}"
        );
    }
}
