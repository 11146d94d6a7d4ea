//! Declares every metric roster exports; the doc comment of each is its help text.
//!
//! Names follow CONTRACT (`roster_` prefix); the `_total` suffix of counters is added by
//! the encoder.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: &'static str,
    /// HTTP status, or `error` when no response arrived (timeout, connection refused).
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    pub trigger: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub kind: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LifecycleLabels {
    pub r#type: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `letta` or `file`.
    pub source: &'static str,
    /// `ok`, or the kind of failure (`SourceError::kind`).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub transition: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// Requests roster sent to the homeserver, by endpoint and HTTP status.
    pub homeserver_requests: Family<RequestLabels, Counter>,
    /// Transactions pushed by the homeserver, by outcome.
    pub transactions: Family<OutcomeLabels, Counter>,
    /// Membership changes recorded from pushed events, by transition.
    pub member_transitions: Family<TransitionLabels, Counter>,
    /// Pushed events roster could not decode and skipped.
    pub undecodable_events: Counter,
    /// Ephemeral items (typing, receipts, presence) received; lossy by nature, only counted.
    pub ephemeral_items: Counter,
    /// Whether an action was skipped because the model already showed it done.
    pub membership_cache: Family<ResultLabels, Counter>,
    /// Reconciliation runs, by trigger.
    pub sync_runs: Family<TriggerLabels, Counter>,
    /// Time a reconciliation run took.
    pub sync_duration_seconds: Histogram,
    /// Homeserver actions taken, by kind and outcome.
    pub actions: Family<ActionLabels, Counter>,
    /// Lifecycle events handled, by type and outcome.
    pub lifecycle_events: Family<LifecycleLabels, Counter>,
    /// Lifecycle messages behind the end of the topic, summed over partitions.
    pub lifecycle_lag: Gauge,
    /// Lifecycle messages sent to the dead-letter topic.
    pub dead_letters: Counter,
    /// Agent listings asked of the agent source, by source and outcome.
    pub source_polls: Family<SourceLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("roster");
        let m = Metrics {
            homeserver_requests: Family::default(),
            transactions: Family::default(),
            member_transitions: Family::default(),
            undecodable_events: Counter::default(),
            ephemeral_items: Counter::default(),
            membership_cache: Family::default(),
            sync_runs: Family::default(),
            sync_duration_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            actions: Family::default(),
            lifecycle_events: Family::default(),
            lifecycle_lag: Gauge::default(),
            dead_letters: Counter::default(),
            source_polls: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "homeserver_requests",
            "Requests roster sent to the homeserver, by endpoint and HTTP status",
            m.homeserver_requests.clone(),
        );
        registry.register(
            "transactions",
            "Transactions pushed by the homeserver, by outcome",
            m.transactions.clone(),
        );
        registry.register(
            "member_transitions",
            "Membership changes recorded from pushed events, by transition",
            m.member_transitions.clone(),
        );
        registry.register(
            "undecodable_events",
            "Pushed events roster could not decode and skipped",
            m.undecodable_events.clone(),
        );
        registry.register(
            "ephemeral_items",
            "Ephemeral items received; lossy by nature, only counted",
            m.ephemeral_items.clone(),
        );
        registry.register(
            "membership_cache",
            "Whether an action was skipped because the model already showed it done",
            m.membership_cache.clone(),
        );
        registry.register(
            "sync_runs",
            "Reconciliation runs, by trigger",
            m.sync_runs.clone(),
        );
        registry.register(
            "sync_duration_seconds",
            "Time a reconciliation run took",
            m.sync_duration_seconds.clone(),
        );
        registry.register(
            "actions",
            "Homeserver actions taken, by kind and outcome",
            m.actions.clone(),
        );
        registry.register(
            "lifecycle_events",
            "Lifecycle events handled, by type and outcome",
            m.lifecycle_events.clone(),
        );
        registry.register(
            "lifecycle_lag",
            "Lifecycle messages behind the end of the topic, summed over partitions",
            m.lifecycle_lag.clone(),
        );
        registry.register(
            "dead_letters",
            "Lifecycle messages sent to the dead-letter topic",
            m.dead_letters.clone(),
        );
        registry.register(
            "source_polls",
            "Agent listings asked of the agent source, by source and outcome",
            m.source_polls.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Sum of all homeserver requests sent so far, for tests and status.
    pub fn homeserver_request_total(&self) -> u64 {
        // Family has no iterator; the encoded text is the one public view of every series.
        parse_sum(&self.encode(), "roster_homeserver_requests_total")
    }
}

/// Sums every sample of `name` in a Prometheus text exposition.
pub fn parse_sum(text: &str, name: &str) -> u64 {
    parse_sum_labeled(text, name, "")
}

/// Sums the samples of `name` whose labels contain `label` (e.g. `result="hit"`).
pub fn parse_sum_labeled(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_export_every_contract_metric() {
        let m = Metrics::new();
        m.homeserver_requests
            .get_or_create(&RequestLabels {
                endpoint: "join",
                status: "200".into(),
            })
            .inc();
        m.transactions
            .get_or_create(&OutcomeLabels { outcome: "applied" })
            .inc();
        m.membership_cache
            .get_or_create(&ResultLabels { result: "hit" })
            .inc();
        m.sync_runs
            .get_or_create(&TriggerLabels { trigger: "startup" })
            .inc();
        m.actions
            .get_or_create(&ActionLabels {
                kind: "join",
                outcome: "ok",
            })
            .inc();
        m.lifecycle_events
            .get_or_create(&LifecycleLabels {
                r#type: "deleted",
                outcome: "applied",
            })
            .inc();
        m.source_polls
            .get_or_create(&SourceLabels {
                source: "letta",
                outcome: "ok",
            })
            .inc();
        let text = m.encode();
        for name in [
            "roster_homeserver_requests_total{endpoint=\"join\",status=\"200\"} 1",
            "roster_transactions_total{outcome=\"applied\"} 1",
            "roster_membership_cache_total{result=\"hit\"} 1",
            "roster_sync_runs_total{trigger=\"startup\"} 1",
            "roster_sync_duration_seconds_count",
            "roster_actions_total{kind=\"join\",outcome=\"ok\"} 1",
            "roster_lifecycle_events_total{type=\"deleted\",outcome=\"applied\"} 1",
            "roster_lifecycle_lag",
            "roster_dead_letters_total",
            "roster_source_polls_total{source=\"letta\",outcome=\"ok\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert_eq!(m.homeserver_request_total(), 1);
    }
}
