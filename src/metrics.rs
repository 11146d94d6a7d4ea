//! Declares every metric roster exports; the doc comment of each is its help text.
//!
//! Every name carries the `roster_` prefix (the README's metrics table lists them all);
//! the `_total` suffix of counters is added by the encoder.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};

/// Declares the label sets of the metric families: one struct each, its fields the labels.
macro_rules! label_sets {
    ($($name:ident { $($(#[$doc:meta])* $field:ident: $ty:ty,)+ })+) => {
        $(
            #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
            pub struct $name {
                $($(#[$doc])* pub $field: $ty,)+
            }
        )+
    };
}

label_sets! {
    RequestLabels {
        endpoint: &'static str,
        /// HTTP status, or `error` when no response arrived (timeout, connection refused).
        status: String,
    }
    EndpointLabels {
        endpoint: &'static str,
    }
    PartitionLabels {
        partition: i32,
    }
    BuildLabels {
        version: &'static str,
        commit: &'static str,
    }
    OutcomeLabels {
        outcome: &'static str,
    }
    ResultLabels {
        result: &'static str,
    }
    TriggerLabels {
        trigger: &'static str,
    }
    ActionLabels {
        kind: &'static str,
        outcome: &'static str,
    }
    LifecycleLabels {
        r#type: &'static str,
        outcome: &'static str,
    }
    TypeLabels {
        r#type: &'static str,
    }
    SourceLabels {
        /// `letta` or `file`.
        source: &'static str,
        /// `ok`, or the kind of failure (`SourceError::kind`).
        outcome: &'static str,
    }
    TransitionLabels {
        transition: &'static str,
    }
    TopicLabels {
        topic: String,
    }
}

pub struct Metrics {
    registry: Registry,
    /// Always 1; the labels name the running build.
    pub build_info: Family<BuildLabels, Gauge>,
    /// Requests roster sent to the homeserver, by endpoint and HTTP status.
    pub homeserver_requests: Family<RequestLabels, Counter>,
    /// Time from sending a homeserver request to its whole answer, by endpoint.
    pub homeserver_request_duration_seconds: Family<EndpointLabels, Histogram>,
    /// roster's requests that the homeserver ping it back, by outcome.
    pub homeserver_pings: Family<OutcomeLabels, Counter>,
    /// 1 once the homeserver pinged roster back, 0 while it cannot.
    pub homeserver_ping_ok: Gauge,
    /// When the homeserver last pinged roster back, in Unix seconds.
    pub homeserver_ping_last_success: Gauge,
    /// Homeserver requests sent, all endpoints together (for status and `plan`).
    homeserver_requests_sent: AtomicU64,
    /// Transactions pushed by the homeserver, by outcome.
    pub transactions: Family<OutcomeLabels, Counter>,
    /// Membership changes recorded from pushed events, by transition.
    pub member_transitions: Family<TransitionLabels, Counter>,
    /// Pushed events roster could not decode and skipped.
    pub undecodable_events: Counter,
    /// Pushed member events about rooms roster does not look after: acknowledged, dropped.
    pub unmanaged_events: Counter,
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
    /// Lifecycle events without any type, recognised by their shape (identity-service
    /// versions before `event_type`), by the type recognised.
    pub lifecycle_legacy_shaped: Family<TypeLabels, Counter>,
    /// Lifecycle messages behind the end of the topic, summed over partitions (a count of
    /// messages, not a time).
    pub lifecycle_lag: Gauge,
    /// How long each lifecycle partition has been unable to move past one message, in
    /// seconds (0 when it moves).
    pub lifecycle_stalled_seconds: Family<PartitionLabels, Gauge>,
    /// Lifecycle messages sent to the dead-letter topic.
    pub dead_letters: Counter,
    /// Partitions of the lifecycle topic this consumer holds, by topic; only exported while
    /// the consumer runs (see [`Metrics::lifecycle_partitions`]).
    lifecycle_partitions: Family<TopicLabels, Gauge>,
    /// Agent listings asked of the agent source, by source and outcome.
    pub source_polls: Family<SourceLabels, Counter>,
    /// Agent avatars, by outcome: uploaded, reused (an image uploaded before), set,
    /// left_alone (a person set one by hand), fetch_failed (an https agents.avatar).
    pub avatars: Family<OutcomeLabels, Counter>,
    /// History imports into new agent rooms, by outcome (done, failed).
    pub history_imports: Family<OutcomeLabels, Counter>,
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
            build_info: Family::default(),
            homeserver_requests: Family::default(),
            homeserver_request_duration_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 14))
            }),
            homeserver_requests_sent: AtomicU64::new(0),
            homeserver_pings: Family::default(),
            homeserver_ping_ok: Gauge::default(),
            homeserver_ping_last_success: Gauge::default(),
            transactions: Family::default(),
            member_transitions: Family::default(),
            undecodable_events: Counter::default(),
            unmanaged_events: Counter::default(),
            ephemeral_items: Counter::default(),
            membership_cache: Family::default(),
            sync_runs: Family::default(),
            // 50 ms to 1.8 h: the periodic sweep spreads its reads over half the interval
            // (300 s by default) and may wait 600 s more for the work it scheduled.
            sync_duration_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 18)),
            actions: Family::default(),
            lifecycle_events: Family::default(),
            lifecycle_legacy_shaped: Family::default(),
            lifecycle_lag: Gauge::default(),
            lifecycle_stalled_seconds: Family::default(),
            dead_letters: Counter::default(),
            lifecycle_partitions: Family::default(),
            source_polls: Family::default(),
            avatars: Family::default(),
            history_imports: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "build_info",
            "Always 1; the labels name the running build",
            m.build_info.clone(),
        );
        registry.register(
            "homeserver_request_duration_seconds",
            "Time from sending a homeserver request to its whole answer, by endpoint",
            m.homeserver_request_duration_seconds.clone(),
        );
        registry.register(
            "homeserver_pings",
            "roster's requests that the homeserver ping it back, by outcome",
            m.homeserver_pings.clone(),
        );
        registry.register(
            "homeserver_ping_ok",
            "1 once the homeserver pinged roster back, 0 while it cannot",
            m.homeserver_ping_ok.clone(),
        );
        registry.register(
            "homeserver_ping_last_success_timestamp_seconds",
            "When the homeserver last pinged roster back, in Unix seconds",
            m.homeserver_ping_last_success.clone(),
        );
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
            "unmanaged_events",
            "Pushed member events about rooms roster does not look after: acknowledged, dropped",
            m.unmanaged_events.clone(),
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
            "lifecycle_legacy_shaped",
            "Lifecycle events without any type, recognised by their shape, by the type recognised",
            m.lifecycle_legacy_shaped.clone(),
        );
        registry.register(
            "lifecycle_lag",
            "Lifecycle messages behind the end of the topic, summed over partitions (a count of messages)",
            m.lifecycle_lag.clone(),
        );
        registry.register(
            "lifecycle_stalled_seconds",
            "How long each lifecycle partition has been unable to move past one message (0 when it moves)",
            m.lifecycle_stalled_seconds.clone(),
        );
        registry.register(
            "dead_letters",
            "Lifecycle messages sent to the dead-letter topic",
            m.dead_letters.clone(),
        );
        registry.register(
            "lifecycle_partitions",
            "Partitions of the lifecycle topic this consumer holds, by topic (only while it runs)",
            m.lifecycle_partitions.clone(),
        );
        registry.register(
            "source_polls",
            "Agent listings asked of the agent source, by source and outcome",
            m.source_polls.clone(),
        );
        registry.register(
            "avatars",
            "Agent avatars, by outcome: uploaded, reused, set, left_alone (set by hand), fetch_failed",
            m.avatars.clone(),
        );
        registry.register(
            "history_imports",
            "History imports into new agent rooms, by outcome (done, failed)",
            m.history_imports.clone(),
        );
        // Known label values start at 0, so dashboards and alerts see the series at once.
        for outcome in [
            "applied",
            "duplicate",
            "rejected",
            "unauthorized",
            "forbidden",
            "error",
        ] {
            let _ = m.transactions.get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in ["ok", "error"] {
            let _ = m.homeserver_pings.get_or_create(&OutcomeLabels { outcome });
        }
        for trigger in ["startup", "interval", "manual", "sighup"] {
            let _ = m.sync_runs.get_or_create(&TriggerLabels { trigger });
        }
        // The failures RosterActionsFailing counts with increase(): a series born at 1
        // would hide the first one (a blocked member is counted once, when first seen).
        for (kind, outcome) in [("reconcile", "gave_up"), ("join", "blocked")] {
            let _ = m.actions.get_or_create(&ActionLabels { kind, outcome });
        }
        for result in ["hit", "miss"] {
            let _ = m.membership_cache.get_or_create(&ResultLabels { result });
        }
        m.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                commit: option_env!("ROSTER_COMMIT").unwrap_or("unknown"),
            })
            .set(1);
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Counts one homeserver request (all endpoints); `homeserver_requests` has the detail.
    pub fn count_homeserver_request(&self) {
        self.homeserver_requests_sent
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The gauge of lifecycle partitions held: the series appears with the first call,
    /// when the consumer starts, so a roster without one exports none (and no alert
    /// about a consumer holding nothing can fire for it).
    pub fn lifecycle_partitions(&self, topic: &str) -> Gauge {
        self.lifecycle_partitions
            .get_or_create(&TopicLabels {
                topic: topic.to_owned(),
            })
            .clone()
    }

    /// Homeserver requests sent so far.
    pub fn homeserver_requests_sent(&self) -> u64 {
        self.homeserver_requests_sent.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAMILIES: &[&str] = &[
        "roster_build_info",
        "roster_homeserver_pings",
        "roster_homeserver_ping_ok",
        "roster_homeserver_ping_last_success_timestamp_seconds",
        "roster_homeserver_requests",
        "roster_homeserver_request_duration_seconds",
        "roster_transactions",
        "roster_member_transitions",
        "roster_undecodable_events",
        "roster_unmanaged_events",
        "roster_ephemeral_items",
        "roster_membership_cache",
        "roster_sync_runs",
        "roster_sync_duration_seconds",
        "roster_actions",
        "roster_lifecycle_events",
        "roster_lifecycle_legacy_shaped",
        "roster_lifecycle_lag",
        "roster_lifecycle_stalled_seconds",
        "roster_dead_letters",
        "roster_lifecycle_partitions",
        "roster_source_polls",
        "roster_avatars",
        "roster_history_imports",
    ];

    fn types(text: &str) -> Vec<&str> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect()
    }

    /// Families with a fixed set of labels are exported at 0 from the start; every family
    /// is exported once touched, and nothing else is.
    #[test]
    fn should_export_every_declared_family() {
        let m = Metrics::new();
        let fresh = m.encode();
        for name in [
            "roster_build_info",
            "roster_transactions",
            "roster_homeserver_pings",
            "roster_sync_runs",
            "roster_membership_cache",
            "roster_lifecycle_lag",
            "roster_dead_letters",
        ] {
            assert!(types(&fresh).contains(&name), "{name} missing in\n{fresh}");
        }
        assert!(
            fresh.contains("roster_transactions_total{outcome=\"error\"} 0"),
            "{fresh}"
        );
        assert!(fresh.contains("roster_build_info{version=\""), "{fresh}");

        let endpoint = EndpointLabels { endpoint: "join" };
        m.homeserver_requests
            .get_or_create(&RequestLabels {
                endpoint: "join",
                status: "200".into(),
            })
            .inc();
        m.homeserver_request_duration_seconds
            .get_or_create(&endpoint)
            .observe(0.1);
        m.member_transitions
            .get_or_create(&TransitionLabels {
                transition: "joined",
            })
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
        m.lifecycle_stalled_seconds
            .get_or_create(&PartitionLabels { partition: 0 })
            .set(3);
        m.lifecycle_legacy_shaped
            .get_or_create(&TypeLabels { r#type: "deleted" })
            .inc();
        assert!(!fresh.contains("roster_lifecycle_partitions"), "{fresh}");
        m.lifecycle_partitions("nova.identity.events").set(3);
        m.source_polls
            .get_or_create(&SourceLabels {
                source: "letta",
                outcome: "ok",
            })
            .inc();
        m.avatars
            .get_or_create(&OutcomeLabels { outcome: "set" })
            .inc();
        m.history_imports
            .get_or_create(&OutcomeLabels { outcome: "done" })
            .inc();
        let text = m.encode();
        let mut exported = types(&text);
        exported.sort();
        let mut declared = FAMILIES.to_vec();
        declared.sort();
        assert_eq!(exported, declared);
        for sample in [
            "roster_homeserver_requests_total{endpoint=\"join\",status=\"200\"} 1",
            "roster_homeserver_request_duration_seconds_count{endpoint=\"join\"} 1",
            "roster_lifecycle_stalled_seconds{partition=\"0\"} 3",
            "roster_lifecycle_partitions{topic=\"nova.identity.events\"} 3",
        ] {
            assert!(text.contains(sample), "missing {sample} in\n{text}");
        }
    }

    #[test]
    fn should_count_homeserver_requests_beside_their_family() {
        let m = Metrics::new();
        m.count_homeserver_request();
        m.count_homeserver_request();
        assert_eq!(m.homeserver_requests_sent(), 2);
    }

    /// RosterActionsFailing takes `increase()` of these series: one born at its first
    /// give-up or block (already 1) shows no increase, so that first failure since start
    /// would never alert (a ban is counted once, when it is first seen). They start at 0.
    #[test]
    fn should_export_the_series_the_failing_actions_alert_counts_from_zero() {
        let fresh = Metrics::new().encode();
        for sample in [
            "roster_actions_total{kind=\"reconcile\",outcome=\"gave_up\"} 0",
            "roster_actions_total{kind=\"join\",outcome=\"blocked\"} 0",
        ] {
            assert!(fresh.contains(sample), "missing {sample} in\n{fresh}");
        }
    }

    /// The periodic sweep spreads its reads over half of `sync.interval` (300 s by default)
    /// and then waits up to 600 s for the work it scheduled: such a run must land in a
    /// finite bucket, or the dashboard's p50/p95 show the top bucket's bound instead.
    #[test]
    fn should_bucket_a_periodic_sync_below_infinity() {
        let config = crate::config::Config::from_yaml("homeserver: {server_name: ex.org}").unwrap();
        let longest = config.sync.interval / 2 + std::time::Duration::from_secs(600);
        for run in [config.sync.interval / 2, longest] {
            let m = Metrics::new();
            m.sync_duration_seconds.observe(run.as_secs_f64());
            let text = m.encode();
            let finite = text
                .lines()
                .filter(|l| l.starts_with("roster_sync_duration_seconds_bucket{"))
                .filter(|l| !l.contains("+Inf"))
                .any(|l| l.ends_with(" 1"));
            assert!(finite, "a {run:?} sync is only in le=+Inf:\n{text}");
        }
    }

    /// Every metric the Grafana dashboard and the alert rules use is one roster exports
    /// (the families above are exactly what `/metrics` exports once touched).
    #[test]
    fn should_export_every_metric_the_dashboard_and_alerts_use() {
        let used = [
            include_str!("../deploy/grafana/roster.json"),
            include_str!("../deploy/prometheus/alerts.yaml"),
        ];
        let mut names = std::collections::BTreeSet::new();
        for text in used {
            let mut rest = text;
            while let Some(at) = rest.find("roster_") {
                let tail = &rest[at..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()))
                    .unwrap_or(tail.len());
                names.insert(tail[..end].to_owned());
                rest = &tail[end..];
            }
        }
        assert!(names.len() > 10, "found the names: {names:?}");
        for name in &names {
            let family = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            assert!(
                FAMILIES.contains(&family),
                "{name} is used by the dashboard or the alerts but roster exports no {family}"
            );
        }
    }
}
