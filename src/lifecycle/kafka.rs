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

use super::offsets::Offsets;
use crate::config::{LifecycleConfig, StartFrom};
use crate::metrics::Metrics;

/// Properties shared by the consumer and the producer; `lifecycle.kafka` is applied last
/// (security settings, timeouts), except the keys roster must set itself (checked by config).
fn base(lifecycle: &LifecycleConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &lifecycle.brokers)
        .set("client.id", "roster");
    config
}

fn with_extra(mut config: ClientConfig, lifecycle: &LifecycleConfig) -> ClientConfig {
    for (key, value) in &lifecycle.kafka {
        config.set(key, value);
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
    with_extra(config, lifecycle)
}

/// The dead-letter producer: a write that takes longer than 10 s counts as failed.
pub fn producer_config(lifecycle: &LifecycleConfig) -> ClientConfig {
    let mut config = base(lifecycle);
    config.set("message.timeout.ms", "10000");
    with_extra(config, lifecycle)
}

/// Rebalance, commit and statistics callbacks.
pub struct Context {
    pub topic: String,
    pub offsets: Arc<Mutex<Offsets>>,
    pub metrics: Arc<Metrics>,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
