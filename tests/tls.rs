//! Kafka security and compression against the real broker: tansu behind a TLS terminator
//! (stunnel with a CA made for the test) that it advertises as its only address, roster
//! consuming through it with `lifecycle.kafka: {security.protocol: ssl, ssl.ca.location}`;
//! a plaintext roster at that port, and a TLS one that does not trust the test CA, each
//! failing with a clear error; zstd-compressed batches.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use serde_json::Value;
use support::identity::*;
use support::*;

const TOPIC: &str = "nova.identity.events";
const DLQ: &str = "nova.identity.events.dlq";
const GROUP: &str = "roster";

/// Waits until Synapse has `user` with display name `name`.
async fn wait_display_name(synapse: &Synapse, admin: &str, user: &str, name: &str) {
    eventually(
        Duration::from_secs(90),
        &format!("{user} to exist with display name {name}"),
        || async {
            let found = synapse.admin_user(admin, user).await?;
            (found["displayname"] == name).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn an_event_consumed_over_tls_from_the_real_broker_is_applied() {
    let scratch = Scratch::new("tls");
    let tansu = Tansu::start_behind_tls(scratch.path(), 1, &[TOPIC, DLQ]).await;
    let tls = tansu.tls.as_ref().unwrap();
    let hs_port = free_port();
    let lifecycle = tansu.lifecycle_yaml(TOPIC, GROUP, "");
    assert!(
        lifecycle.contains("security.protocol: ssl")
            && lifecycle.contains(&format!("brokers: 127.0.0.1:{}", tls.port)),
        "roster reaches the broker only through TLS: {lifecycle}"
    );
    let mut roster = Roster::configure(
        scratch.path(),
        &format!("http://127.0.0.1:{hs_port}"),
        &lifecycle,
    );
    let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
    let admin = synapse.admin_token("admin");
    let id = uuid(0x7150, 1);
    let at = tansu
        .produce_event(
            TOPIC,
            Some(&id),
            "UserCreatedEvent",
            &created(&id, "tls-user"),
        )
        .await;
    roster.start().await;
    wait_display_name(&synapse, &admin, &nova(&id), "tls-user").await;
    tansu.wait_committed(GROUP, TOPIC, &[at]).await;
    assert_eq!(roster.lifecycle_events("created", "applied").await, 1);
    let status = roster.status().await;
    assert!(
        status["lifecycle_broker_error"].is_null(),
        "no broker error once partitions are assigned: {status}"
    );
    synapse.assert_no_logins().await;
    roster.assert_no_secrets_in_logs(&[]);
}

/// Starts roster consuming from `tansu` with `kafka_extra` librdkafka properties and no
/// homeserver (`MATRIX_ENABLED=false`: the consumer starts at once); returns it and the broker
/// error its status shows.
async fn start_failing_consumer(
    scratch: &Scratch,
    tansu: &Tansu,
    kafka_extra: &str,
) -> (Roster, String) {
    let lifecycle = format!(
        "lifecycle:\n  enabled: true\n  brokers: {}\n  topic: {TOPIC}\n  group_id: {GROUP}\n  \
         kafka: {{session.timeout.ms: 6000, heartbeat.interval.ms: 500{kafka_extra}}}\n",
        tansu.brokers()
    );
    let mut roster = Roster::configure(scratch.path(), &nowhere(), &lifecycle);
    roster.env("MATRIX_ENABLED", "false");
    roster.start().await;
    let error = eventually(
        Duration::from_secs(60),
        "the broker error in status",
        || async {
            let status = roster.status().await;
            status["lifecycle_broker_error"]["message"]
                .as_str()
                .map(str::to_owned)
        },
    )
    .await;
    (roster, error)
}

/// TLS without the broker's CA: the system store (probed, as roster does by default) does
/// not trust the test CA, so the handshake fails and says so: certificates are verified.
#[tokio::test]
async fn a_tls_client_that_does_not_trust_the_brokers_ca_fails_with_a_clear_error() {
    let scratch = Scratch::new("tls-untrusted");
    let tansu = Tansu::start_behind_tls(scratch.path(), 1, &[TOPIC, DLQ]).await;
    let (roster, error) =
        start_failing_consumer(&scratch, &tansu, ", security.protocol: ssl").await;
    assert!(
        error.contains(&tansu.brokers()) && error.contains("certificate verify failed"),
        "the failure names the broker and the refused certificate: {error}"
    );
    assert!(
        error.contains("ssl.ca.location"),
        "roster names the key to fix: {error}"
    );
    assert_eq!(roster.metric("roster_lifecycle_events_total", &[]).await, 0);
    roster.assert_no_secrets_in_logs(&[]);
}

#[tokio::test]
async fn a_plaintext_client_at_the_tls_port_fails_with_a_clear_error_in_log_and_status() {
    let scratch = Scratch::new("tls-plaintext");
    let tansu = Tansu::start_behind_tls(scratch.path(), 1, &[TOPIC, DLQ]).await;
    let id = uuid(0x7150, 2);
    let at = tansu
        .produce_event(TOPIC, Some(&id), "UserCreatedEvent", &created(&id, "never"))
        .await;
    // The operator's mistake: the TLS listener's address, no security.protocol.
    let (roster, error) = start_failing_consumer(&scratch, &tansu, "").await;
    // stunnel hangs up on the plaintext ApiVersion request: librdkafka says which broker and
    // when, roster says what that usually means and which key to fix.
    assert!(
        error.contains(&format!("last failure: {}/bootstrap", tansu.brokers()))
            && error.contains("APIVERSION_QUERY"),
        "the failure names the broker and where it failed: {error}"
    );
    assert!(
        error.contains("security.protocol (ssl or sasl_ssl for a TLS listener"),
        "roster names the key to fix: {error}"
    );
    let (ok, text, stderr) = roster.cli(&["status"]);
    assert!(ok, "{stderr}");
    assert!(text.contains("lifecycle broker error"), "{text}");
    let log = std::fs::read_to_string(roster.dir.join("roster-1.log")).unwrap();
    assert!(
        log.contains(&error[..error.find(" (after").unwrap_or(error.len())]),
        "the same error is logged: {log}"
    );
    // Nothing was consumed or committed.
    assert_eq!(roster.metric("roster_lifecycle_events_total", &[]).await, 0);
    assert_eq!(
        tansu.committed(GROUP, TOPIC),
        vec![-1],
        "nothing after {at:?}"
    );
    roster.assert_no_secrets_in_logs(&[]);
}

/// Keeps the producer's latest statistics.
#[derive(Clone, Default)]
struct LastStatistics(Arc<Mutex<Option<Statistics>>>);

impl ClientContext for LastStatistics {
    fn stats(&self, statistics: Statistics) {
        *self.0.lock().unwrap() = Some(statistics);
    }
}

#[tokio::test]
async fn zstd_compressed_events_are_read_and_applied() {
    let scratch = Scratch::new("zstd");
    let tansu = Tansu::start(scratch.path(), 1, &[TOPIC, DLQ]).await;
    let hs_port = free_port();
    let mut roster = Roster::configure(
        scratch.path(),
        &format!("http://127.0.0.1:{hs_port}"),
        &tansu.lifecycle_yaml(TOPIC, GROUP, ""),
    );
    let synapse = Synapse::start(scratch.path(), hs_port, &roster.registration).await;
    let admin = synapse.admin_token("admin");

    // A field decoders ignore, large and repetitive: compressed, the batch is a fraction of
    // it, so the bytes the producer sent show that it went out zstd-compressed.
    let id = uuid(0x7150, 3);
    let mut event = created(&id, "zstd-user");
    event["bio"] = Value::String("all work and no play. ".repeat(3000));
    let payload = bytes(&event);
    let statistics = LastStatistics::default();
    let producer: FutureProducer<LastStatistics> = tansu
        .client()
        .set("compression.type", "zstd")
        .set("statistics.interval.ms", "100")
        .create_with_context(statistics.clone())
        .expect("librdkafka is built with zstd");
    let delivered = producer
        .send(
            FutureRecord::to(TOPIC).key(&id).payload(&payload).headers(
                rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                    key: "event_type",
                    value: Some("UserCreatedEvent"),
                }),
            ),
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    producer.flush(Duration::from_secs(10)).unwrap();
    // librdkafka counts the messages' own bytes (txmsg_bytes) apart from the bytes it wrote
    // to the broker (tx_bytes, requests and all).
    let (message_bytes, sent) = eventually(
        Duration::from_secs(10),
        "the producer's statistics after delivery",
        || async {
            let stats = statistics.0.lock().unwrap().clone()?;
            (stats.txmsgs >= 1).then_some((stats.txmsg_bytes, stats.tx_bytes))
        },
    )
    .await;
    assert!(message_bytes >= payload.len() as i64, "{message_bytes}");
    assert!(
        sent < message_bytes / 4,
        "the {message_bytes} byte event went out compressed, but the producer sent {sent} bytes"
    );

    roster.start().await;
    wait_display_name(&synapse, &admin, &nova(&id), "zstd-user").await;
    tansu
        .wait_committed(GROUP, TOPIC, &[(delivered.partition, delivered.offset)])
        .await;
    assert_eq!(roster.lifecycle_events("created", "applied").await, 1);
    synapse.assert_no_logins().await;
}
