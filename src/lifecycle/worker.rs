//! Handles one lifecycle message: decode, plan, apply, and decide: done, retry later, or
//! dead-letter. The pipeline runs many jobs (one per user at a time) through one worker.
//!
//! The decision, for each outcome:
//! - applied, unchanged (nothing to send), already applied (a profile update redelivered,
//!   e.g. after a crash, or older than the last applied: nothing sent), skipped on purpose,
//!   unknown type, missing user, superseded by a newer update of the same user (never run):
//!   done;
//! - undecodable, or refused for good by the homeserver (a 4xx other than rate limiting,
//!   413 included): dead-lettered, then done;
//! - the homeserver (or the dead-letter topic) away, overloaded or rate limiting: retried
//!   with backoff while the partition waits; never dead-lettered.
//!
//! A dead letter that is too large for the topic is written truncated (reason, origin and
//! headers kept, the payload cut, a `truncated` header), so no message can wedge its
//! partition.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::effects::{Applied, IdentityEffects};
use super::{Job, Message};
use crate::Shared;
use crate::lifecycle::decode::Decoded;
use crate::metrics::{LifecycleLabels, TypeLabels};
use crate::model::identity::{Effect, EventPosition, PlanOptions};
use crate::retry::{Backoff, Outcome};

/// Dead-letter header that says why the message is there.
pub const REASON_HEADER: &str = "reason";
/// Dead-letter header present (`true`) when the payload was cut to fit the topic.
pub const TRUNCATED_HEADER: &str = "truncated";
/// How much of a payload a truncated dead letter keeps.
pub const TRUNCATED_PAYLOAD_BYTES: usize = 16 * 1024;

/// One message for the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Why a dead letter was not written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkError {
    /// Larger than the topic (or broker) accepts: write it truncated.
    TooLarge(String),
    /// The topic is unreachable: retry later.
    Unavailable(String),
}

/// Where dead letters go: the dead-letter topic (a Kafka producer), or a test's list.
pub trait DeadLetterSink: Send + Sync {
    fn send(&self, letter: DeadLetter) -> BoxFuture<'_, Result<(), SinkError>>;
    /// The topic's name, for logs.
    fn name(&self) -> &str;
}

/// What one attempt at a job came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Done,
    /// Not applicable: written to the dead-letter topic (done as far as offsets go).
    DeadLettered,
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
}

/// A partition that cannot move past `offset` yet, and why (the pipeline pauses it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    pub partition: i32,
    pub generation: u64,
    pub offset: i64,
    pub reason: String,
}

/// Handles jobs; shared by all running jobs.
pub struct Worker {
    pub(super) shared: Arc<Shared>,
    pub(super) effects: Option<Arc<IdentityEffects>>,
    pub(super) dead_letters: Arc<dyn DeadLetterSink>,
    pub(super) topic: String,
    pub(super) options: PlanOptions,
    pub(super) backoff: Backoff,
    /// Tells the pipeline which partitions wait, and why (first failure and every change).
    pub(super) stalls: mpsc::Sender<Stall>,
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

    /// Counts what arrives: legacy-shaped events (no type, recognised by their fields).
    pub fn received(&self, job: &Job) {
        if let Ok(Decoded::LegacyShaped(event)) = &job.decoded {
            self.shared
                .metrics
                .lifecycle_legacy_shaped
                .get_or_create(&TypeLabels {
                    r#type: event.kind(),
                })
                .inc();
        }
    }

    /// Counts and logs a job that is done without running: `newer` sets all it would set.
    fn superseded(&self, job: &Job, newer: &Job) {
        let kind = job
            .decoded
            .as_ref()
            .ok()
            .and_then(Decoded::event)
            .map_or("unknown", |e| e.kind());
        self.count(kind, "superseded");
        tracing::debug!(
            partition = job.message.partition,
            offset = job.message.offset,
            by_offset = newer.message.offset,
            "lifecycle event superseded by a newer one of the same user; not applied"
        );
    }

    /// Runs `job` until it is done, retrying with backoff. `superseded` are the older
    /// updates of the same user it stands for (`Job::supersedes`): when `job` itself is
    /// dead-lettered, they are applied instead, oldest first, so what they set is not lost
    /// with it; but not the parts it set before it was refused, which are newer.
    pub async fn work(self: Arc<Self>, job: Job, superseded: Vec<Job>) {
        let step = self.run(&job, None).await;
        // An avatar refused for good before is left out, not asked for: the older updates
        // may still set theirs, as when it is refused now and the update dead-lettered.
        if step != Step::DeadLettered && !self.avatar_refused_before(&job) {
            for older in &superseded {
                self.superseded(older, &job);
            }
            return;
        }
        if superseded.is_empty() {
            return;
        }
        tracing::info!(
            partition = job.message.partition,
            offset = job.message.offset,
            superseded = superseded.len(),
            "the newest update did not set all it named (dead-lettered, or its avatar refused before); applying the older ones it stood for in its place"
        );
        for older in &superseded {
            self.run(older, Some(&job)).await;
        }
    }

    /// Whether `job` names an avatar the homeserver refused for good lately (so it was not
    /// set: see `IdentityEffects::refused_avatar`).
    fn avatar_refused_before(&self, job: &Job) -> bool {
        let (Some(effects), Some(event)) = (
            &self.effects,
            job.decoded.as_ref().ok().and_then(Decoded::event),
        ) else {
            return false;
        };
        let server = &self.shared.config.ids().server_name;
        let plan = self
            .shared
            .state
            .read(|m| m.identities.plan(event, server, self.options));
        plan.effects.iter().any(|effect| {
            matches!(effect, Effect::SetAvatar(source) if effects.refused_avatar(source.url()))
        })
    }

    /// Attempts `job` (in place of `newer`, when given) until it is done or dead-lettered,
    /// with backoff between attempts.
    async fn run(&self, job: &Job, newer: Option<&Job>) -> Step {
        let mut last_reason = None;
        for failures in 1u32.. {
            let (reason, retry_after) = match self.attempt_in_place_of(job, newer).await {
                step @ (Step::Done | Step::DeadLettered) => return step,
                Step::Retry {
                    reason,
                    retry_after,
                } => (reason, retry_after),
            };
            self.tell_stall(job, &reason, &mut last_reason);
            let wait = self.backoff.wait(failures, retry_after);
            tracing::warn!(
                partition = job.message.partition,
                offset = job.message.offset,
                attempt = failures,
                retry_in_ms = wait.as_millis() as u64,
                error = %reason,
                "lifecycle event not applied yet; its partition waits"
            );
            // A homeserver back from an outage ends the wait at once.
            let back = async {
                match &self.effects {
                    Some(effects) => effects.homeserver().answers_again().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = back => {}
            }
        }
        unreachable!("the attempts above only end by returning")
    }

    /// Tells the pipeline `job`'s partition waits for `reason`, unless `told` already says
    /// so. The channel's capacity covers every running job; should it be full all the same,
    /// the notice is not taken for told, so the next failure tells it (else the partition
    /// would wait unpaused and unseen in status until the reason changed).
    fn tell_stall(&self, job: &Job, reason: &str, told: &mut Option<String>) {
        if told.as_deref() == Some(reason) {
            return;
        }
        let stall = Stall {
            partition: job.message.partition,
            generation: job.generation,
            offset: job.message.offset,
            reason: reason.to_owned(),
        };
        if self.stalls.try_send(stall).is_ok() {
            *told = Some(reason.to_owned());
        }
    }

    /// One attempt: decode, plan, apply, decide.
    pub async fn attempt(&self, job: &Job) -> Step {
        self.attempt_in_place_of(job, None).await
    }

    /// One attempt at `job`, an older update applied in place of `newer` (dead-lettered)
    /// when that is given: without the parts `newer` set.
    async fn attempt_in_place_of(&self, job: &Job, newer: Option<&Job>) -> Step {
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
            Ok(Decoded::Event(event) | Decoded::LegacyShaped(event)) => event,
        };
        let kind = event.kind();
        let server = &self.shared.config.ids().server_name;
        let mut plan = self
            .shared
            .state
            .read(|m| m.identities.plan(event, server, self.options));
        if let Some(newer) = newer.and_then(|n| n.decoded.as_ref().ok()?.event())
            && plan.skip.is_none()
        {
            let newer = self
                .shared
                .state
                .read(|m| m.identities.plan(newer, server, self.options));
            let applied = match self.shared.state.applied_profile(&plan.user).await {
                Ok(applied) => applied,
                Err(e) => {
                    return Step::Retry {
                        reason: format!("cannot read what was applied to the profile: {e}"),
                        retry_after: None,
                    };
                }
            };
            plan = plan.without_parts_applied_by(&newer, &applied);
            if plan.effects.is_empty() {
                self.count(kind, "superseded");
                return Step::Done;
            }
        }
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
        let at = EventPosition {
            partition: message.partition,
            offset: message.offset,
        };
        let outcome = if job.replayed {
            effects.reapply(&plan, at).await
        } else if newer.is_some() {
            effects.apply_in_place(&plan, at).await
        } else {
            effects.apply(&plan, at).await
        };
        match outcome {
            Outcome::Done(nothing @ (Applied::AlreadyApplied | Applied::Unchanged)) => {
                // Unchanged updates are Nova's everyday traffic (follower counts), and
                // redeliveries after a crash are counted: neither is worth an info line.
                let outcome = match nothing {
                    Applied::AlreadyApplied => "already_applied",
                    _ => "unchanged",
                };
                self.count(kind, outcome);
                tracing::debug!(
                    user = %plan.user,
                    event = kind,
                    partition = message.partition,
                    offset = message.offset,
                    outcome,
                    "lifecycle event sends nothing: applied before, or nothing changed"
                );
                Step::Done
            }
            Outcome::Done(Applied::Taken(taken)) => {
                self.count(kind, "applied");
                tracing::info!(
                    user = %plan.user,
                    event = kind,
                    effect = %taken.join("+"),
                    ignored = ?plan.ignored,
                    partition = message.partition,
                    offset = message.offset,
                    "lifecycle event applied"
                );
                Step::Done
            }
            Outcome::Done(Applied::MissingUser) => {
                self.count(kind, "missing_user");
                tracing::info!(user = %plan.user, event = kind, "lifecycle event for a user who does not exist; nothing to do");
                Step::Done
            }
            Outcome::Retry {
                reason,
                retry_after,
            } => {
                self.count(kind, "retried");
                Step::Retry {
                    reason,
                    retry_after,
                }
            }
            Outcome::Refused(reason) => self.dead_letter(message, kind, reason).await,
        }
    }

    /// Writes `message` to the dead-letter topic with its key, payload, original headers
    /// and the reason and origin headers; truncated when it does not fit.
    async fn dead_letter(&self, message: &Message, kind: &'static str, reason: String) -> Step {
        let letter = dead_letter(message, &self.topic, &reason);
        let sent = match self.dead_letters.send(letter.clone()).await {
            Err(SinkError::TooLarge(error)) => {
                tracing::warn!(
                    partition = message.partition,
                    offset = message.offset,
                    %error,
                    "dead letter too large for its topic; writing it truncated"
                );
                let cut = truncated(letter.clone(), TRUNCATED_PAYLOAD_BYTES);
                match self.dead_letters.send(cut).await {
                    // Many original headers can outgrow the limit even cut: roster's own
                    // headers alone say why and where the message was.
                    Err(SinkError::TooLarge(_)) => {
                        self.dead_letters
                            .send(bare(message, &self.topic, &reason))
                            .await
                    }
                    other => other,
                }
            }
            other => other,
        };
        match sent {
            Ok(()) => {
                self.shared.metrics.dead_letters.inc();
                self.count(kind, "dead_lettered");
                tracing::warn!(
                    partition = message.partition,
                    offset = message.offset,
                    event = kind,
                    reason = %reason,
                    dead_letter_topic = %self.dead_letters.name(),
                    "lifecycle message dead-lettered"
                );
                Step::DeadLettered
            }
            Err(SinkError::TooLarge(error) | SinkError::Unavailable(error)) => Step::Retry {
                reason: format!(
                    "cannot write to the dead-letter topic {}: {error}",
                    self.dead_letters.name()
                ),
                retry_after: None,
            },
        }
    }
}

/// The dead letter for `message`: its key, payload and headers, plus why and where from.
pub fn dead_letter(message: &Message, topic: &str, reason: &str) -> DeadLetter {
    let mut headers: Vec<(String, Vec<u8>)> = message
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
        .collect();
    for (key, value) in [
        (REASON_HEADER, reason.to_owned()),
        ("original_topic", topic.to_owned()),
        ("original_partition", message.partition.to_string()),
        ("original_offset", message.offset.to_string()),
    ] {
        headers.push((key.to_owned(), value.into_bytes()));
    }
    DeadLetter {
        key: message.key.clone(),
        payload: message.payload.clone(),
        headers,
    }
}

/// The least a dead letter says: roster's own headers (why, where from, how large the
/// message was), without the message's key, payload or headers.
pub fn bare(message: &Message, topic: &str, reason: &str) -> DeadLetter {
    let mut reason = reason.to_owned();
    if reason.len() > TRUNCATED_PAYLOAD_BYTES {
        let mut end = TRUNCATED_PAYLOAD_BYTES;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    let stripped = Message {
        partition: message.partition,
        offset: message.offset,
        key: None,
        payload: None,
        headers: Vec::new(),
    };
    let mut letter = dead_letter(&stripped, topic, &reason);
    mark_truncated(&mut letter, message.payload.as_ref().map_or(0, Vec::len));
    letter
}

/// `letter` cut to fit: the payload's first `keep` bytes, original headers cut alike, and
/// headers saying so.
pub fn truncated(mut letter: DeadLetter, keep: usize) -> DeadLetter {
    let original = letter.payload.as_ref().map_or(0, Vec::len);
    if let Some(payload) = &mut letter.payload {
        payload.truncate(keep);
    }
    if let Some(key) = &mut letter.key {
        key.truncate(keep);
    }
    for (_, value) in &mut letter.headers {
        value.truncate(keep);
    }
    mark_truncated(&mut letter, original);
    letter
}

/// Says that `letter` is not the whole message, whose payload had `original` bytes.
fn mark_truncated(letter: &mut DeadLetter, original: usize) {
    letter
        .headers
        .push((TRUNCATED_HEADER.to_owned(), b"true".to_vec()));
    letter.headers.push((
        "original_size".to_owned(),
        original.to_string().into_bytes(),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::decode;
    use crate::testing::FakeHomeserver;
    use std::sync::Mutex;

    fn message(payload: Vec<u8>) -> Message {
        Message {
            partition: 2,
            offset: 41,
            key: Some(b"k".to_vec()),
            payload: Some(payload),
            headers: vec![("trace_id".into(), Some(b"t-1".to_vec()))],
        }
    }

    /// Dead letters kept in memory; the first `refuse` sends fail with `error`.
    #[derive(Default)]
    struct Sink {
        letters: Mutex<Vec<DeadLetter>>,
        refuse: Mutex<Vec<SinkError>>,
    }

    impl DeadLetterSink for Sink {
        fn send(&self, letter: DeadLetter) -> BoxFuture<'_, Result<(), SinkError>> {
            Box::pin(async move {
                if let Some(error) = self.refuse.lock().unwrap().pop() {
                    return Err(error);
                }
                self.letters.lock().unwrap().push(letter);
                Ok(())
            })
        }

        fn name(&self) -> &str {
            "events.dlq"
        }
    }

    const UUID: &str = "6f1b2c3d-aaaa-4bbb-8ccc-0123456789ab";
    const USER: &str = "@nova-6f1b2c3d-aaaa-4bbb-8ccc-0123456789ab:ex.org";

    struct Fixture {
        hs: FakeHomeserver,
        sink: Arc<Sink>,
        worker: Worker,
    }

    /// The display name and avatar the homeserver shows for the test's user.
    fn shown_name(hs: &FakeHomeserver) -> Option<String> {
        hs.world().users[USER].displayname.clone()
    }

    fn shown_avatar(hs: &FakeHomeserver) -> Option<String> {
        hs.world().users[USER].avatar_url.clone()
    }

    #[track_caller]
    fn assert_shows(hs: &FakeHomeserver, name: &str, avatar: &str) {
        let world = hs.world();
        let user = &world.users[USER];
        assert_eq!(
            (user.displayname.as_deref(), user.avatar_url.as_deref()),
            (Some(name), Some(avatar))
        );
    }

    async fn fixture(matrix: bool) -> Fixture {
        // The tests serve their avatars on loopback.
        fixture_with(matrix, "lifecycle: {avatar_allow_private: true}").await
    }

    async fn fixture_with(matrix: bool, lifecycle: &str) -> Fixture {
        let (hs, shared) = crate::testing::stack_with("flavor: synapse", lifecycle).await;
        let client = crate::testing::client(&shared);
        let effects = if matrix {
            let shutdown = tokio_util::sync::CancellationToken::new();
            Some(Arc::new(
                IdentityEffects::start(shared.clone(), client, &shutdown)
                    .await
                    .unwrap()
                    .unwrap(),
            ))
        } else {
            None
        };
        let sink = Arc::new(Sink::default());
        let worker = Worker {
            shared,
            effects,
            dead_letters: sink.clone(),
            topic: "events".into(),
            options: PlanOptions {
                create_missing_users: true,
            },
            backoff: Backoff::DEFAULT,
            stalls: mpsc::channel(8).0,
        };
        Fixture { hs, sink, worker }
    }

    /// Offsets as the topic hands them out: every job is newer than the ones before.
    static NEXT_OFFSET: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(100);

    fn job(event_type: &str, payload: serde_json::Value) -> Job {
        let mut message = message(serde_json::to_vec(&payload).unwrap());
        message.offset = NEXT_OFFSET.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        message.headers.push((
            decode::TYPE_HEADER.into(),
            Some(event_type.as_bytes().to_vec()),
        ));
        Job::fresh(message)
    }

    fn created() -> Job {
        job(
            "UserCreatedEvent",
            serde_json::json!({ "user_id": UUID, "username": "alice" }),
        )
    }

    fn renamed(name: &str) -> Job {
        job(
            "UserProfileUpdatedEvent",
            serde_json::json!({ "user_id": UUID, "username": "alice", "display_name": name }),
        )
    }

    /// A deletion of a user who never existed is remembered: an update delivered after it
    /// does not create the user (create_missing_users would otherwise).
    #[tokio::test]
    async fn should_not_create_a_user_whose_deletion_came_before_it_existed() {
        let f = fixture(true).await;
        let deleted = job(
            "UserDeletedEvent",
            serde_json::json!({ "user_id": UUID, "soft_delete": true }),
        );
        assert_eq!(f.worker.attempt(&deleted).await, Step::Done);
        assert_eq!(events(&f, "deleted", "missing_user"), 1);
        assert_eq!(f.worker.attempt(&renamed("late")).await, Step::Done);
        assert!(!f.hs.world().users.contains_key(USER), "not created");
        assert_eq!(f.hs.world().count("/register"), 0);
    }

    /// One user's events in two partitions (unkeyed, or keyed by event id) come in any
    /// order: an update applied before its user's creation came (the user registered for
    /// it) is newer than the creation, whose username must not replace the name it set.
    #[tokio::test]
    async fn should_not_set_a_late_creations_username_over_a_newer_name() {
        let f = fixture(true).await;
        let mut update = renamed("Alice A.");
        update.message.partition = 1;
        assert_eq!(f.worker.attempt(&update).await, Step::Done);
        assert_eq!(shown_name(&f.hs).as_deref(), Some("Alice A."));
        let mut creation = created();
        creation.message.partition = 0;
        let names = f.hs.world().count("/displayname");
        assert_eq!(f.worker.attempt(&creation).await, Step::Done);
        assert_eq!(f.hs.world().count("/displayname"), names, "no name sent");
        assert_eq!(shown_name(&f.hs).as_deref(), Some("Alice A."));
        // A creation replayed on purpose still sets everything it names.
        let mut replayed = created();
        replayed.replayed = true;
        assert_eq!(f.worker.attempt(&replayed).await, Step::Done);
        assert_eq!(shown_name(&f.hs).as_deref(), Some("alice"));
    }

    /// An avatar the homeserver refuses for good (Synapse's `allowed_avatar_mimetypes`,
    /// `max_avatar_size`, `max_upload_size`) dead-letters its event once; the updates that
    /// follow name the same avatar (only the follower count changed) and send nothing,
    /// instead of asking again and dead-lettering every one of them. Another avatar is news.
    #[tokio::test]
    async fn should_not_ask_again_for_an_avatar_the_homeserver_refused() {
        let f = fixture(true).await;
        assert_eq!(f.worker.attempt(&created()).await, Step::Done);
        let (server, fetched) = avatar_server().await;
        let cases = [
            (
                "mxc://ex.org/huge".to_owned(),
                "/avatar_url",
                403,
                "M_FORBIDDEN",
            ),
            (format!("{server}/huge.png"), "/upload", 413, "M_TOO_LARGE"),
        ];
        for (avatar, refusing, status, errcode) in cases {
            f.hs.fail(refusing, status, errcode, "This avatar is not allowed", 1);
            let refused = profile_job("alice", Some(&avatar), 0);
            assert_eq!(f.worker.attempt(&refused).await, Step::DeadLettered);
            let (sent, letters) = (
                f.hs.world().requests.len(),
                f.sink.letters.lock().unwrap().len(),
            );
            let fetches = fetched.load(std::sync::atomic::Ordering::SeqCst);
            for followers in 1..4 {
                let same = profile_job("alice", Some(&avatar), followers);
                assert_eq!(f.worker.attempt(&same).await, Step::Done, "{avatar}");
            }
            assert_eq!(f.hs.world().requests.len(), sent, "{avatar}: nothing sent");
            assert_eq!(f.sink.letters.lock().unwrap().len(), letters);
            assert_eq!(fetched.load(std::sync::atomic::Ordering::SeqCst), fetches);
        }
        apply(&f, &profile_job("alice", Some("mxc://ex.org/fine"), 5)).await;
        assert_eq!(shown_avatar(&f.hs).as_deref(), Some("mxc://ex.org/fine"));
    }

    /// The newest update names an avatar refused before, so it is left out: the older
    /// update it stood for still sets its own avatar (as when the refusal comes now and
    /// the newest is dead-lettered), not its older name.
    #[tokio::test]
    async fn should_let_older_updates_set_the_avatar_a_newer_one_names_but_was_refused() {
        let f = fixture(true).await;
        assert_eq!(f.worker.attempt(&created()).await, Step::Done);
        f.hs.fail(
            "/avatar_url",
            403,
            "M_FORBIDDEN",
            "This avatar is not allowed",
            1,
        );
        let refused = profile_job("alice", Some("mxc://ex.org/c"), 0);
        assert_eq!(f.worker.attempt(&refused).await, Step::DeadLettered);
        let worker = Arc::new(f.worker);
        let older = profile_job("A", Some("mxc://ex.org/a"), 1);
        let newer = profile_job("C", Some("mxc://ex.org/c"), 2);
        assert!(newer.supersedes(&older));
        worker.clone().work(newer, vec![older]).await;
        assert_eq!(
            f.sink.letters.lock().unwrap().len(),
            1,
            "no new dead letter"
        );
        assert_shows(&f.hs, "C", "mxc://ex.org/a");
    }

    /// A stall notice the full channel did not take is told again at the next failure with
    /// the same reason; one it took is not repeated.
    #[tokio::test]
    async fn should_tell_a_stall_again_when_the_channel_was_full() {
        let mut f = fixture(false).await;
        let (sender, mut stalls) = mpsc::channel(1);
        f.worker.stalls = sender;
        let job = renamed("A");
        let mut told = None;
        f.worker.tell_stall(&job, "filler", &mut told);
        assert_eq!(told.as_deref(), Some("filler"));
        f.worker.tell_stall(&job, "HTTP 502", &mut told);
        assert_eq!(
            told.as_deref(),
            Some("filler"),
            "the full channel took nothing"
        );
        assert_eq!(stalls.recv().await.unwrap().reason, "filler");
        f.worker.tell_stall(&job, "HTTP 502", &mut told);
        let stall = stalls.try_recv().expect("told at the next failure");
        assert_eq!(
            (stall.offset, stall.reason.as_str()),
            (job.message.offset, "HTTP 502")
        );
        f.worker.tell_stall(&job, "HTTP 502", &mut told);
        assert!(stalls.try_recv().is_err(), "told once per reason");
    }

    /// A name the homeserver accepted before a later step of the same event failed is on
    /// the homeserver: it is recorded whatever becomes of the event. Retried, the event
    /// sends only what is left; dead-lettered, an update back to the previous name is
    /// still sent.
    #[tokio::test]
    async fn should_record_the_parts_accepted_before_a_later_step_failed() {
        let f = fixture(true).await;
        assert_eq!(f.worker.attempt(&created()).await, Step::Done);
        let names = || f.hs.world().count("/displayname");

        // Retried: the second attempt sets the avatar only.
        f.hs.fail("/avatar_url", 500, "M_UNKNOWN", "try again", 1);
        let flaky = profile_job("A", Some("mxc://ex.org/a"), 0);
        assert!(matches!(f.worker.attempt(&flaky).await, Step::Retry { .. }));
        let before = names();
        assert_eq!(f.worker.attempt(&flaky).await, Step::Done);
        assert_eq!(names(), before, "the accepted name is not sent again");
        assert_eq!(shown_avatar(&f.hs).as_deref(), Some("mxc://ex.org/a"));

        // Dead-lettered after its name was accepted: the name stays on the homeserver, so
        // going back to "A" is a change.
        f.hs.fail("/avatar_url", 400, "M_INVALID_PARAM", "bad avatar", 1);
        let refused = profile_job("B", Some("mxc://ex.org/b"), 0);
        assert_eq!(f.worker.attempt(&refused).await, Step::DeadLettered);
        assert_eq!(shown_name(&f.hs).as_deref(), Some("B"));
        assert_eq!(f.worker.attempt(&renamed("A")).await, Step::Done);
        assert_eq!(shown_name(&f.hs).as_deref(), Some("A"));
    }

    /// A user's newest update stands for the older ones it supersedes. When it is applied,
    /// they are not; when it is dead-lettered, they are applied in its place, oldest first,
    /// so the name they set is not lost with it.
    #[tokio::test]
    async fn should_apply_the_superseded_updates_when_the_newest_is_dead_lettered() {
        let f = fixture(true).await;
        assert_eq!(f.worker.attempt(&created()).await, Step::Done);
        let worker = Arc::new(f.worker);
        let names = || f.hs.world().count("/displayname");

        let before = names();
        worker.clone().work(renamed("B"), vec![renamed("A")]).await;
        assert_eq!(names() - before, 1, "only the newest was applied");
        assert_eq!(shown_name(&f.hs).as_deref(), Some("B"));
        let superseded = || {
            worker
                .shared
                .metrics
                .lifecycle_events
                .get_or_create(&LifecycleLabels {
                    r#type: "profile_updated",
                    outcome: "superseded",
                })
                .get()
        };
        assert_eq!(superseded(), 1);

        f.hs.fail("/displayname", 413, "M_TOO_LARGE", "too large", 1);
        let before = names();
        worker
            .clone()
            .work(renamed("huge"), vec![renamed("C"), renamed("D")])
            .await;
        assert_eq!(f.sink.letters.lock().unwrap().len(), 1, "the newest only");
        assert_eq!(names() - before, 3, "the refused one, then C and D");
        assert_eq!(shown_name(&f.hs).as_deref(), Some("D"));
        assert_eq!(superseded(), 1, "C and D were applied, not superseded");
    }

    /// The newest update was dead-lettered after the homeserver accepted its name (its
    /// avatar was refused for good): the older updates it stood for are applied in its place
    /// for what it could not set, the avatar, but not over the newer name it did set.
    #[tokio::test]
    async fn should_not_set_an_older_name_over_the_one_a_dead_lettered_update_set() {
        let f = fixture(true).await;
        assert_eq!(f.worker.attempt(&created()).await, Step::Done);
        let worker = Arc::new(f.worker);
        let older = profile_job("A", Some("mxc://ex.org/a"), 0);
        let newer = profile_job("C", Some("mxc://ex.org/c"), 1);
        f.hs.fail(
            "/avatar_url",
            403,
            "M_FORBIDDEN",
            "This avatar is not allowed",
            1,
        );
        worker.clone().work(newer, vec![older]).await;
        assert_eq!(f.sink.letters.lock().unwrap().len(), 1);
        assert_shows(&f.hs, "C", "mxc://ex.org/a");
    }

    #[tokio::test]
    async fn should_apply_an_event_and_be_done() {
        let f = fixture(true).await;
        assert_eq!(f.worker.attempt(&created()).await, Step::Done);
        assert_eq!(shown_name(&f.hs).as_deref(), Some("alice"));
        assert!(f.sink.letters.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn should_dead_letter_what_cannot_be_decoded_or_is_refused_for_good() {
        let f = fixture(true).await;
        let garbage = Job::fresh(message(b"{not json".to_vec()));
        assert_eq!(f.worker.attempt(&garbage).await, Step::DeadLettered);
        assert_eq!(f.worker.attempt(&created()).await, Step::Done);
        f.hs.fail("/displayname", 413, "M_TOO_LARGE", "too large", 1);
        assert_eq!(f.worker.attempt(&renamed("huge")).await, Step::DeadLettered);
        let letters = f.sink.letters.lock().unwrap();
        assert_eq!(letters.len(), 2);
        let reason = |letter: &DeadLetter| {
            letter
                .headers
                .iter()
                .find(|(k, _)| k == REASON_HEADER)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .unwrap()
        };
        assert!(
            reason(&letters[0]).contains("not JSON"),
            "{}",
            reason(&letters[0])
        );
        assert!(
            reason(&letters[1]).contains("413"),
            "{}",
            reason(&letters[1])
        );
    }

    #[tokio::test]
    async fn should_retry_while_the_homeserver_is_away_and_never_dead_letter_it() {
        let f = fixture(true).await;
        assert_eq!(f.worker.attempt(&created()).await, Step::Done);
        f.hs.fail("/displayname", 502, "M_UNKNOWN", "bad gateway", 1);
        assert!(matches!(
            f.worker.attempt(&renamed("B")).await,
            Step::Retry {
                retry_after: None,
                ..
            }
        ));
        f.hs.rate_limit("/displayname", 1_500, 1);
        assert!(matches!(
            f.worker.attempt(&renamed("B")).await,
            Step::Retry { retry_after: Some(wait), .. } if wait.as_millis() == 1_500
        ));
        assert_eq!(f.worker.attempt(&renamed("B")).await, Step::Done);
        assert!(f.sink.letters.lock().unwrap().is_empty());
    }

    /// Masquerading refused with M_FORBIDDEN for a user who exists (the homeserver has not
    /// loaded the acting registration): the deletion waits, it is not taken for done on a
    /// user who "does not exist". One who really does not exist is done.
    #[tokio::test]
    async fn should_hold_a_deletion_when_the_homeserver_will_not_let_roster_act() {
        let f = fixture(true).await;
        let deleted = || {
            job(
                "UserDeletedEvent",
                serde_json::json!({ "user_id": UUID, "soft_delete": true }),
            )
        };
        let never_existed = job(
            "UserDeletedEvent",
            serde_json::json!({ "user_id": "00000000-0000-4000-8000-0000000000d1", "soft_delete": true }),
        );
        assert_eq!(f.worker.attempt(&never_existed).await, Step::Done);
        assert_eq!(events(&f, "deleted", "missing_user"), 1);
        assert_eq!(f.worker.attempt(&created()).await, Step::Done);
        let refused = "Application service cannot masquerade as this user";
        f.hs.fail("/account/deactivate", 403, "M_FORBIDDEN", refused, 1);
        f.hs.fail("/whoami", 403, "M_FORBIDDEN", refused, 1);
        match f.worker.attempt(&deleted()).await {
            Step::Retry { reason, .. } => {
                assert!(reason.contains("registration-acting.yaml"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(!f.hs.world().users[USER].deactivated);
        assert_eq!(f.worker.attempt(&deleted()).await, Step::Done);
        assert!(f.hs.world().users[USER].deactivated);
        assert!(f.sink.letters.lock().unwrap().is_empty());
    }

    /// The finding: a dead letter too large for its topic wedged the partition.
    #[tokio::test]
    async fn should_truncate_a_dead_letter_that_does_not_fit() {
        let f = fixture(true).await;
        f.sink
            .refuse
            .lock()
            .unwrap()
            .push(SinkError::TooLarge("Message size too large".into()));
        let mut big = created();
        big.message.payload = Some(vec![b'{'; 2 << 20]);
        big.decoded = big.message.decode();
        assert_eq!(f.worker.attempt(&big).await, Step::DeadLettered);
        let letters = f.sink.letters.lock().unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(
            letters[0].payload.as_ref().unwrap().len(),
            TRUNCATED_PAYLOAD_BYTES
        );
        assert!(
            letters[0]
                .headers
                .iter()
                .any(|(k, _)| k == TRUNCATED_HEADER)
        );
    }

    #[tokio::test]
    async fn should_retry_when_the_dead_letter_topic_is_unreachable() {
        let f = fixture(true).await;
        f.sink
            .refuse
            .lock()
            .unwrap()
            .push(SinkError::Unavailable("broker down".into()));
        let garbage = Job::fresh(message(b"[]".to_vec()));
        assert!(matches!(
            f.worker.attempt(&garbage).await,
            Step::Retry { reason, .. } if reason.contains("events.dlq")
        ));
        assert_eq!(f.worker.attempt(&garbage).await, Step::DeadLettered);
    }

    #[tokio::test]
    async fn should_take_no_matrix_action_when_matrix_is_disabled() {
        let f = fixture(false).await;
        assert_eq!(f.worker.attempt(&created()).await, Step::Done);
        assert!(f.hs.world().requests.is_empty());
    }

    fn events(f: &Fixture, kind: &'static str, outcome: &'static str) -> u64 {
        f.worker
            .shared
            .metrics
            .lifecycle_events
            .get_or_create(&LifecycleLabels {
                r#type: kind,
                outcome,
            })
            .get()
    }

    fn profile_job(name: &str, avatar: Option<&str>, followers: u32) -> Job {
        job(
            "UserProfileUpdatedEvent",
            serde_json::json!({ "user_id": UUID, "username": "alice", "display_name": name,
                "avatar_url": avatar, "follower_count": followers }),
        )
    }

    /// Serves a PNG at `/a.png`, `/b.png`... on 127.0.0.1, a picture of its own at each
    /// name; counts the requests.
    async fn avatar_server() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let fetched = Arc::new(AtomicUsize::new(0));
        let counter = fetched.clone();
        let app = axum::Router::new().route(
            "/{name}",
            axum::routing::get(
                move |axum::extract::Path(name): axum::extract::Path<String>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
                    png.extend_from_slice(name.as_bytes());
                    async move { ([("content-type", "image/png")], png) }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}"), fetched)
    }

    /// A replay sets a fetched avatar again even when it is the one roster set: the
    /// operator replays to repair a profile changed behind roster's back.
    #[tokio::test]
    async fn should_set_a_fetched_avatar_again_on_a_replay() {
        let f = fixture(true).await;
        let (server, _fetched) = avatar_server().await;
        let url = format!("{server}/a.png");
        apply(&f, &profile_job("A", Some(&url), 0)).await;
        let set = f.hs.world().count("/avatar_url");
        let mxc = f.hs.world().users[USER].avatar_url.clone();
        f.hs.world().users.get_mut(USER).unwrap().avatar_url = Some("mxc://ex.org/other".into());
        let mut replayed = profile_job("A", Some(&url), 0);
        replayed.replayed = true;
        assert_eq!(f.worker.attempt(&replayed).await, Step::Done);
        assert_eq!(f.hs.world().count("/avatar_url"), set + 1);
        assert_eq!(f.hs.world().users[USER].avatar_url, mxc);
    }

    /// The picture behind an avatar URL may change: once its upload is older than
    /// `lifecycle.avatar_cache_ttl`, an update naming the URL again fetches it again. The
    /// same bytes send nothing (no upload, no avatar set); new bytes are uploaded and set.
    #[tokio::test]
    async fn should_look_at_the_applied_avatar_url_again_after_the_ttl() {
        use axum::response::IntoResponse;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let f = fixture_with(
            true,
            "lifecycle: {avatar_allow_private: true, avatar_cache_ttl: 2s}",
        )
        .await;
        // The picture served, or none (404).
        let picture = Arc::new(std::sync::Mutex::new(Some(
            b"\x89PNG\r\n\x1a\nfirst".to_vec(),
        )));
        let fetched = Arc::new(AtomicUsize::new(0));
        let app = {
            let (picture, fetched) = (picture.clone(), fetched.clone());
            axum::Router::new().route(
                "/me.png",
                axum::routing::get(move || {
                    fetched.fetch_add(1, Ordering::SeqCst);
                    let bytes = picture.lock().unwrap().clone();
                    async move {
                        match bytes {
                            Some(bytes) => ([("content-type", "image/png")], bytes).into_response(),
                            None => axum::http::StatusCode::NOT_FOUND.into_response(),
                        }
                    }
                }),
            )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/me.png", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        // An update naming the URL (only the follower count changes), and then what was
        // done in all: (fetches, uploads, avatars set).
        let update = |followers: u32| {
            let (worker, job) = (&f.worker, profile_job("A", Some(&url), followers));
            async move { assert_eq!(worker.attempt(&job).await, Step::Done) }
        };
        let done = || {
            let w = f.hs.world();
            (
                fetched.load(Ordering::SeqCst),
                w.count("/upload"),
                w.count("/avatar_url"),
            )
        };
        let ttl_passes = || tokio::time::sleep(Duration::from_millis(2_200));

        update(0).await;
        assert_eq!(done(), (1, 1, 1));
        // Within the TTL: nothing fetched, nothing sent.
        update(1).await;
        assert_eq!(done(), (1, 1, 1));

        // After the TTL, the same picture: fetched, nothing sent, counted unchanged.
        ttl_passes().await;
        let unchanged = events(&f, "profile_updated", "unchanged");
        update(2).await;
        assert_eq!(done(), (2, 1, 1));
        assert_eq!(events(&f, "profile_updated", "unchanged"), unchanged + 1);

        // After the TTL, a new picture at the same URL: uploaded and set.
        *picture.lock().unwrap() = Some(b"\x89PNG\r\n\x1a\nsecond".to_vec());
        ttl_passes().await;
        update(3).await;
        assert_eq!(done(), (3, 2, 2));

        // After the TTL, the URL is gone: the avatar stays, and the URL is not tried again
        // by every update before another TTL has passed.
        *picture.lock().unwrap() = None;
        ttl_passes().await;
        update(4).await;
        update(5).await;
        assert_eq!(done(), (4, 2, 2));
        // Another user naming it then is not given the picture it no longer serves.
        let other = job(
            "UserProfileUpdatedEvent",
            serde_json::json!({ "user_id": "00000000-0000-4000-8000-0000000000b3",
                "username": "bob", "avatar_url": url }),
        );
        assert_eq!(f.worker.attempt(&other).await, Step::Done);
        assert_eq!(done(), (5, 2, 2));
    }

    #[tokio::test]
    async fn should_send_nothing_for_an_update_that_changes_nothing() {
        let f = fixture(true).await;
        assert_eq!(f.worker.attempt(&created()).await, Step::Done);
        let after_create = f.hs.world().requests.len();
        // The created user's name is its username: an update naming it again is a no-op.
        let same = job(
            "UserProfileUpdatedEvent",
            serde_json::json!({ "user_id": UUID, "username": "alice", "follower_count": 1 }),
        );
        assert_eq!(f.worker.attempt(&same).await, Step::Done);
        assert_eq!(f.hs.world().requests.len(), after_create, "nothing sent");
        assert_eq!(events(&f, "profile_updated", "unchanged"), 1);

        let mxc = "mxc://ex.org/pic";
        apply(&f, &profile_job("A", Some(mxc), 2)).await;
        let applied = f.hs.world().requests.len();
        assert_eq!(applied - after_create, 2, "name and avatar");
        for followers in 3..10 {
            apply(&f, &profile_job("A", Some(mxc), followers)).await;
        }
        assert_eq!(
            f.hs.world().requests.len(),
            applied,
            "follower counts send nothing"
        );
        assert_eq!(events(&f, "profile_updated", "unchanged"), 8);
        assert_eq!(events(&f, "profile_updated", "applied"), 1);
    }

    /// Applies `job`, expecting it done, and returns the paths of the requests it sent.
    async fn apply(f: &Fixture, job: &Job) -> Vec<String> {
        let before = f.hs.world().requests.len();
        assert_eq!(f.worker.attempt(job).await, Step::Done);
        f.hs.world().requests[before..]
            .iter()
            .map(|r| r.path.clone())
            .collect()
    }

    #[tokio::test]
    async fn should_send_exactly_the_parts_that_changed() {
        let f = fixture(true).await;
        apply(&f, &profile_job("A", Some("mxc://ex.org/a"), 0)).await;
        let sent = apply(&f, &profile_job("B", Some("mxc://ex.org/a"), 0)).await;
        assert!(
            sent.len() == 1 && sent[0].ends_with("/displayname"),
            "{sent:?}"
        );
        let sent = apply(&f, &profile_job("B", Some("mxc://ex.org/b"), 0)).await;
        assert!(
            sent.len() == 1 && sent[0].ends_with("/avatar_url"),
            "{sent:?}"
        );
        assert_shows(&f.hs, "B", "mxc://ex.org/b");
    }

    #[tokio::test]
    async fn should_record_nothing_the_homeserver_did_not_accept() {
        let f = fixture(true).await;
        assert_eq!(f.worker.attempt(&created()).await, Step::Done);
        f.hs.fail("/displayname", 502, "M_UNKNOWN", "bad gateway", 1);
        assert!(matches!(
            f.worker.attempt(&profile_job("B", None, 0)).await,
            Step::Retry { .. }
        ));
        let user = ruma::UserId::parse(USER).unwrap();
        let applied = f.worker.shared.state.applied_profile(&user).await.unwrap();
        assert_eq!(
            applied.displayname.as_deref(),
            Some("alice"),
            "B was refused"
        );
        // So the retry sends it.
        let before = f.hs.world().count("/displayname");
        apply(&f, &profile_job("B", None, 0)).await;
        assert_eq!(f.hs.world().count("/displayname"), before + 1);
        let applied = f.worker.shared.state.applied_profile(&user).await.unwrap();
        assert_eq!(applied.displayname.as_deref(), Some("B"));
    }

    /// The SIGKILL finding: renames A then B were applied, only A's offset was committed;
    /// after the restart both come again. Neither is sent: A would set an older name over
    /// B for a moment, and both would send a change twice.
    #[tokio::test]
    async fn should_send_nothing_for_profile_updates_redelivered_after_a_crash() {
        let f = fixture(true).await;
        let (a, b) = (profile_job("A", None, 0), profile_job("B", None, 0));
        assert!(a.message.offset < b.message.offset);
        for job in [&a, &b] {
            assert_eq!(f.worker.attempt(job).await, Step::Done);
        }
        let user = ruma::UserId::parse(USER).unwrap();
        let applied = f.worker.shared.state.applied_profile(&user).await.unwrap();
        assert_eq!(
            applied.applied_at,
            Some(EventPosition {
                partition: b.message.partition,
                offset: b.message.offset
            })
        );
        let sent = f.hs.world().requests.len();
        // Redelivered from the committed offset: A, then B, as they came the first time.
        for job in [&a, &b] {
            assert_eq!(f.worker.attempt(job).await, Step::Done);
        }
        assert_eq!(f.hs.world().requests.len(), sent, "nothing sent again");
        assert_eq!(shown_name(&f.hs).as_deref(), Some("B"));
        assert_eq!(events(&f, "profile_updated", "already_applied"), 2);
        assert_eq!(events(&f, "profile_updated", "applied"), 2);

        // The same offset on another partition (the topic was repartitioned) is news.
        let mut moved = profile_job("A", None, 0);
        moved.message.partition = b.message.partition + 1;
        moved.message.offset = a.message.offset;
        let names = f.hs.world().count("/displayname");
        assert_eq!(f.worker.attempt(&moved).await, Step::Done);
        assert_eq!(f.hs.world().count("/displayname"), names + 1);
        assert_eq!(shown_name(&f.hs).as_deref(), Some("A"));

        // A creation redelivered registers again (idempotent) but does not set its username
        // over the newer name.
        let mut created = created();
        created.message.partition = moved.message.partition;
        created.message.offset = moved.message.offset - 1;
        let registered = f.hs.world().count("/register");
        assert_eq!(f.worker.attempt(&created).await, Step::Done);
        assert_eq!(f.hs.world().count("/register"), registered + 1);
        assert_eq!(f.hs.world().count("/displayname"), names + 1);
        assert_eq!(shown_name(&f.hs).as_deref(), Some("A"));
    }

    #[tokio::test]
    async fn should_apply_a_replayed_event_in_full() {
        let f = fixture(true).await;
        apply(&f, &profile_job("A", None, 0)).await;
        let before = f.hs.world().count("/displayname");
        let mut replayed = profile_job("A", None, 0);
        replayed.replayed = true;
        assert_eq!(f.worker.attempt(&replayed).await, Step::Done);
        assert_eq!(f.hs.world().count("/displayname"), before + 1);
        assert_eq!(events(&f, "profile_updated", "unchanged"), 0);
        // Also from an offset already applied (a replay of an event applied before).
        let mut again = profile_job("A", None, 0);
        again.message.offset = replayed.message.offset - 1;
        again.replayed = true;
        assert_eq!(f.worker.attempt(&again).await, Step::Done);
        assert_eq!(f.hs.world().count("/displayname"), before + 2);
        assert_eq!(events(&f, "profile_updated", "already_applied"), 0);
    }

    #[tokio::test]
    async fn should_upload_an_avatar_url_once_within_its_ttl_and_again_after() {
        use std::sync::atomic::Ordering;
        let f = fixture(true).await;
        let (server, fetched) = avatar_server().await;
        let url = format!("{server}/a.png");
        apply(&f, &profile_job("A", Some(&url), 0)).await;
        assert_eq!(
            (fetched.load(Ordering::SeqCst), f.hs.world().uploads.len()),
            (1, 1)
        );
        let mxc = f.hs.world().users[USER].avatar_url.clone().unwrap();

        // Another user names the same URL: its upload is reused, nothing fetched.
        let other = "00000000-0000-4000-8000-0000000000b2";
        let other_job = job(
            "UserProfileUpdatedEvent",
            serde_json::json!({ "user_id": other, "username": "bob", "avatar_url": url }),
        );
        assert_eq!(f.worker.attempt(&other_job).await, Step::Done);
        assert_eq!(
            (fetched.load(Ordering::SeqCst), f.hs.world().uploads.len()),
            (1, 1)
        );
        let other_user = format!("@nova-{other}:ex.org");
        assert_eq!(
            f.hs.world().users[&other_user].avatar_url.as_deref(),
            Some(mxc.as_str())
        );

        // An upload older than lifecycle.avatar_cache_ttl (24 h) is fetched and uploaded again.
        let stale = crate::store::Upload {
            mxc: mxc.clone(),
            uploaded_ms: crate::clock::now_ms() - 25 * 3600 * 1000,
        };
        let url_b = format!("{server}/b.png");
        f.worker
            .shared
            .state
            .record_upload(&format!("url:{url_b}"), stale)
            .await
            .unwrap();
        apply(&f, &profile_job("A", Some(&url_b), 0)).await;
        assert_eq!(
            (fetched.load(Ordering::SeqCst), f.hs.world().uploads.len()),
            (2, 2)
        );
        assert_ne!(shown_avatar(&f.hs).as_deref(), Some(mxc.as_str()));
    }

    #[tokio::test]
    async fn should_count_legacy_shaped_events_by_type() {
        let f = fixture(true).await;
        let legacy = |data: serde_json::Value| {
            let message =
                message(serde_json::to_vec(&serde_json::json!({ "data": data })).unwrap());
            Job::fresh(message)
        };
        let legacy_created = legacy(
            serde_json::json!({ "user_id": UUID, "email": "a@x", "username": "alice", "created_at": "t" }),
        );
        let legacy_deleted =
            legacy(serde_json::json!({ "user_id": UUID, "deleted_at": "t", "soft_delete": true }));
        let typed = created();
        for job in [&legacy_created, &legacy_deleted, &typed] {
            f.worker.received(job);
        }
        let count = |kind| {
            f.worker
                .shared
                .metrics
                .lifecycle_legacy_shaped
                .get_or_create(&TypeLabels { r#type: kind })
                .get()
        };
        assert_eq!(
            (count("created"), count("deleted"), count("profile_updated")),
            (1, 1, 0)
        );
        // And they apply like typed ones.
        assert_eq!(f.worker.attempt(&legacy_created).await, Step::Done);
        assert_eq!(shown_name(&f.hs).as_deref(), Some("alice"));
        assert_eq!(f.worker.attempt(&legacy_deleted).await, Step::Done);
        assert!(f.hs.world().users[USER].deactivated);
    }

    #[test]
    fn should_carry_the_reason_origin_and_original_headers() {
        let letter = dead_letter(&message(b"{}".to_vec()), "events", "not JSON");
        let header = |name: &str| {
            letter
                .headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
        };
        assert_eq!(header("trace_id").as_deref(), Some("t-1"));
        assert_eq!(header(REASON_HEADER).as_deref(), Some("not JSON"));
        assert_eq!(header("original_topic").as_deref(), Some("events"));
        assert_eq!(header("original_partition").as_deref(), Some("2"));
        assert_eq!(header("original_offset").as_deref(), Some("41"));
        assert_eq!(letter.payload.as_deref(), Some(b"{}".as_slice()));
        assert_eq!(letter.key.as_deref(), Some(b"k".as_slice()));
    }

    /// A dead letter still too large once cut (many original headers) goes without the
    /// message's key, payload and headers: roster's own headers still say why and where.
    #[tokio::test]
    async fn should_send_a_bare_dead_letter_when_even_the_cut_one_is_too_large() {
        let f = fixture(true).await;
        for _ in 0..2 {
            f.sink
                .refuse
                .lock()
                .unwrap()
                .push(SinkError::TooLarge("too large".into()));
        }
        let garbage = Job::fresh(message(b"{not json".to_vec()));
        assert_eq!(f.worker.attempt(&garbage).await, Step::DeadLettered);
        let letters = f.sink.letters.lock().unwrap();
        let letter = letters.last().unwrap();
        assert_eq!((letter.key.as_ref(), letter.payload.as_ref()), (None, None));
        let names: Vec<&str> = letter.headers.iter().map(|(k, _)| k.as_str()).collect();
        for name in [
            REASON_HEADER,
            "original_offset",
            TRUNCATED_HEADER,
            "original_size",
        ] {
            assert!(names.contains(&name), "{name}: {names:?}");
        }
        assert!(!names.contains(&"trace_id"), "{names:?}");
    }

    #[test]
    fn should_truncate_a_letter_and_say_so() {
        let big = vec![b'x'; 2 * 1024 * 1024];
        let letter = truncated(dead_letter(&message(big), "events", "too big"), 1024);
        assert_eq!(letter.payload.as_ref().unwrap().len(), 1024);
        let names: Vec<&str> = letter.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert!(names.contains(&TRUNCATED_HEADER) && names.contains(&REASON_HEADER));
        let size = letter
            .headers
            .iter()
            .find(|(k, _)| k == "original_size")
            .unwrap();
        assert_eq!(size.1, b"2097152");
    }
}
