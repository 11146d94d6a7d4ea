//! Tracks, per assigned partition, which offsets are received but not done, so only the
//! offsets below the oldest unfinished one are ever committed.
//!
//! Invariants: the commit position of a partition is the oldest offset still in flight, or
//! one past the newest received when none is; it never passes an unfinished message. A
//! partition's generation changes on (re)assignment and on replay, so a job that finishes
//! for an older generation changes nothing. Pure: the consumer drives it under a mutex
//! shared with its rebalance callbacks.

use std::collections::{BTreeMap, BTreeSet};

use crate::state::StalledPartition;

#[derive(Debug, Default)]
struct Partition {
    generation: u64,
    in_flight: BTreeSet<i64>,
    /// One past the newest offset received.
    next: Option<i64>,
    /// The last position committed (or handed to the client to commit).
    committed: Option<i64>,
    /// Offsets whose jobs wait (for the homeserver, the dead-letter topic): since when, why.
    stalled: BTreeMap<i64, Stalled>,
    /// Whether the consumer has paused fetching it.
    paused: bool,
    /// After a replay: one past the newest offset received before it. Offsets below it are
    /// replayed (the operator asks for them again), the rest are news.
    replay_until: Option<i64>,
}

/// Why and since when one offset's job cannot finish.
#[derive(Debug)]
struct Stalled {
    since_ms: u64,
    reason: String,
    /// Whether fetching more of the partition waits for it: a job waiting for the
    /// homeserver does; one that panicked does not (the others go on, uncommitted).
    pauses: bool,
}

impl Partition {
    fn position(&self) -> Option<i64> {
        self.in_flight.first().copied().or(self.next)
    }
}

#[derive(Debug, Default)]
pub struct Offsets {
    partitions: BTreeMap<i32, Partition>,
    generations: u64,
    /// Generations revoked since the last `take_revoked`: unique across partitions, so a
    /// partition revoked and assigned again before the pipeline looks keeps its new work.
    revoked: Vec<u64>,
}

/// What the consumer should change about fetching.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PauseChanges {
    pub pause: Vec<i32>,
    pub resume: Vec<i32>,
}

impl Offsets {
    pub fn assign(&mut self, partition: i32) {
        self.generations += 1;
        self.partitions.insert(
            partition,
            Partition {
                generation: self.generations,
                ..Partition::default()
            },
        );
    }

    /// Forgets `partition`; returns the position to commit before it goes, if any is new.
    pub fn revoke(&mut self, partition: i32) -> Option<i64> {
        let p = self.partitions.remove(&partition)?;
        self.revoked.push(p.generation);
        p.position().filter(|&pos| Some(pos) != p.committed)
    }

    /// Generations revoked since the last call (their queued and running work is dropped).
    pub fn take_revoked(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.revoked)
    }

    pub fn assigned(&self) -> Vec<i32> {
        self.partitions.keys().copied().collect()
    }

    /// Notes a received message; returns its generation, or `None` when the partition is
    /// not (any longer) assigned here and the message must be left alone.
    pub fn received(&mut self, partition: i32, offset: i64) -> Option<u64> {
        let p = self.partitions.get_mut(&partition)?;
        // The consumer fetches from the committed position (or the reset one): committing
        // the first offset it hands out would change nothing.
        if p.next.is_none() && p.committed.is_none() {
            p.committed = Some(offset);
        }
        p.in_flight.insert(offset);
        p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
        Some(p.generation)
    }

    /// Notes a finished job; `false` when it belonged to an older generation.
    pub fn done(&mut self, partition: i32, generation: u64, offset: i64) -> bool {
        match self.partitions.get_mut(&partition) {
            Some(p) if p.generation == generation => {
                p.in_flight.remove(&offset);
                p.stalled.remove(&offset);
                true
            }
            _ => false,
        }
    }

    /// Notes that the job at `offset` waits, since `now_ms` (kept from its first notice) and
    /// why (the latest reason).
    pub fn stalled(
        &mut self,
        partition: i32,
        generation: u64,
        offset: i64,
        now_ms: u64,
        reason: String,
    ) {
        self.note_stall(partition, generation, offset, now_ms, reason, true);
    }

    /// Notes that the job at `offset` panicked: shown as a stall (nothing commits past it
    /// until a restart delivers it again), but the partition is not paused for it.
    pub fn panicked(
        &mut self,
        partition: i32,
        generation: u64,
        offset: i64,
        now_ms: u64,
        reason: String,
    ) {
        self.note_stall(partition, generation, offset, now_ms, reason, false);
    }

    fn note_stall(
        &mut self,
        partition: i32,
        generation: u64,
        offset: i64,
        now_ms: u64,
        reason: String,
        pauses: bool,
    ) {
        if let Some(p) = self.partitions.get_mut(&partition)
            && p.generation == generation
            && p.in_flight.contains(&offset)
        {
            let entry = p.stalled.entry(offset).or_insert(Stalled {
                since_ms: now_ms,
                reason: String::new(),
                pauses,
            });
            entry.reason = reason;
            // A panic is for good (its job is gone): a stall notice it sent before, read
            // after, does not make it pause.
            entry.pauses &= pauses;
        }
    }

    /// Partitions that cannot move: the oldest waiting offset of each, how long, and why.
    pub fn stalls(&self, now_ms: u64) -> Vec<StalledPartition> {
        self.partitions
            .iter()
            .filter_map(|(&partition, p)| {
                let (&offset, stalled) = p.stalled.first_key_value()?;
                Some(StalledPartition {
                    partition,
                    offset,
                    stalled_for_ms: now_ms.saturating_sub(stalled.since_ms),
                    reason: stalled.reason.clone(),
                })
            })
            .collect()
    }

    /// Where `partition` stands: its oldest offset not done, else the next to come (`None`
    /// before anything came since it was assigned).
    pub fn position(&self, partition: i32) -> Option<i64> {
        self.partitions.get(&partition)?.position()
    }

    /// Starts `partition` over at `offset` (replay); returns the generation it ends (whose
    /// work is to be dropped) and the new one.
    pub fn rewind(&mut self, partition: i32, offset: i64) -> Option<(u64, u64)> {
        let p = self.partitions.get_mut(&partition)?;
        let ended = p.generation;
        self.generations += 1;
        let generation = self.generations;
        let replay_until = p.next.max(p.replay_until);
        *p = Partition {
            generation,
            next: Some(offset),
            committed: None,
            paused: p.paused,
            replay_until,
            ..Partition::default()
        };
        Some((ended, generation))
    }

    /// Whether `offset` was received before and is consumed again because of a replay.
    pub fn is_replayed(&self, partition: i32, offset: i64) -> bool {
        self.partitions
            .get(&partition)
            .and_then(|p| p.replay_until)
            .is_some_and(|until| offset < until)
    }

    /// Positions that moved since they were last committed; marks them committed.
    pub fn take_commits(&mut self) -> Vec<(i32, i64)> {
        let mut out = Vec::new();
        for (&partition, p) in &mut self.partitions {
            if let Some(pos) = p.position()
                && p.committed != Some(pos)
            {
                p.committed = Some(pos);
                out.push((partition, pos));
            }
        }
        out
    }

    /// A commit failed: commit these positions again next time.
    pub fn commit_failed(&mut self, failed: &[(i32, i64)]) {
        for (partition, pos) in failed {
            if let Some(p) = self.partitions.get_mut(partition)
                && p.committed == Some(*pos)
            {
                p.committed = None;
            }
        }
    }

    /// Which partitions to pause (stalled on the homeserver, or everything while the
    /// buffer is full) and which to resume; records the new state.
    pub fn pause_changes(&mut self, buffer_full: bool) -> PauseChanges {
        let mut changes = PauseChanges::default();
        for (&partition, p) in &mut self.partitions {
            let want = buffer_full || p.stalled.values().any(|s| s.pauses);
            if want != p.paused {
                p.paused = want;
                if want {
                    changes.pause.push(partition);
                } else {
                    changes.resume.push(partition);
                }
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    /// One step of a consumer's life on partition 0.
    #[derive(Debug, Clone)]
    enum Step {
        /// Receive the next `n` offsets.
        Receive(u8),
        /// Finish the in-flight offset at this index (modulo how many there are).
        Finish(usize),
        Commit,
        /// The commit of everything handed out so far failed.
        CommitFailed,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (1u8..4).prop_map(Step::Receive),
            any::<usize>().prop_map(Step::Finish),
            Just(Step::Commit),
            Just(Step::CommitFailed),
        ]
    }

    proptest! {
        /// Whatever the order of receipts, completions, commits and failed commits, no
        /// position handed out to commit passes an offset that is not done.
        #[test]
        fn should_never_commit_past_an_unfinished_offset(
            start in 0i64..1_000_000,
            steps in proptest::collection::vec(step(), 1..80),
        ) {
            let mut o = Offsets::default();
            o.assign(0);
            let mut next = start;
            let mut in_flight: Vec<i64> = Vec::new();
            let mut generation = None;
            let mut last_handed: Vec<(i32, i64)> = Vec::new();
            for step in steps {
                match step {
                    Step::Receive(n) => {
                        for _ in 0..n {
                            generation = o.received(0, next);
                            in_flight.push(next);
                            next += 1;
                        }
                    }
                    Step::Finish(i) if !in_flight.is_empty() => {
                        let offset = in_flight.remove(i % in_flight.len());
                        prop_assert!(o.done(0, generation.unwrap(), offset));
                    }
                    Step::Finish(_) => {}
                    Step::Commit => {
                        last_handed = o.take_commits();
                        for &(partition, position) in &last_handed {
                            prop_assert_eq!(partition, 0);
                            prop_assert!(position <= next);
                            prop_assert!(
                                in_flight.iter().all(|&unfinished| unfinished >= position),
                                "committed {} while {:?} are unfinished", position, in_flight
                            );
                        }
                    }
                    Step::CommitFailed => o.commit_failed(&last_handed),
                }
            }
        }

        /// However the offsets complete, once all are done the partition is committed one
        /// past the newest, exactly once more.
        #[test]
        fn should_end_committed_past_the_newest_in_any_completion_order(
            start in 0i64..1_000_000,
            order in (1usize..60).prop_flat_map(|n| Just((0..n).collect::<Vec<_>>()).prop_shuffle()),
            commit_every in 1usize..10,
        ) {
            let mut o = Offsets::default();
            o.assign(0);
            let n = order.len() as i64;
            let generation = (start..start + n).map(|offset| o.received(0, offset).unwrap()).last().unwrap();
            let mut committed = None;
            for (i, index) in order.iter().enumerate() {
                prop_assert!(o.done(0, generation, start + *index as i64));
                if i % commit_every == 0 {
                    for (_, position) in o.take_commits() {
                        prop_assert!(committed < Some(position), "positions only move forward");
                        committed = Some(position);
                    }
                }
            }
            for (_, position) in o.take_commits() {
                committed = Some(position);
            }
            prop_assert_eq!(committed, Some(start + n));
            prop_assert_eq!(o.take_commits(), vec![]);
        }
    }

    #[test]
    fn should_commit_only_below_the_oldest_unfinished_offset() {
        let mut o = Offsets::default();
        o.assign(0);
        let g = o.received(0, 10).unwrap();
        o.received(0, 11);
        o.received(0, 12);
        assert!(o.done(0, g, 11));
        assert!(o.done(0, g, 12));
        assert_eq!(o.take_commits(), vec![], "10 is not done");
        assert!(o.done(0, g, 10));
        assert_eq!(o.take_commits(), vec![(0, 13)]);
    }

    #[test]
    fn should_ignore_work_of_an_older_generation() {
        let mut o = Offsets::default();
        o.assign(0);
        let old = o.received(0, 5).unwrap();
        o.revoke(0);
        assert_eq!(o.received(0, 6), None, "not assigned");
        o.assign(0);
        let new = o.received(0, 5).unwrap();
        assert_ne!(old, new);
        // Revoked and assigned again before the pipeline looked (one `recv`): only the
        // old generation's work goes.
        assert_eq!(o.take_revoked(), vec![old]);
        assert!(!o.done(0, old, 5));
        assert_eq!(o.take_commits(), vec![], "where it starts is no news");
        assert!(o.done(0, new, 5));
        assert_eq!(o.take_commits(), vec![(0, 6)]);
    }

    #[test]
    fn should_hand_over_the_done_position_on_revoke() {
        let mut o = Offsets::default();
        o.assign(1);
        let g = o.received(1, 0).unwrap();
        o.received(1, 1);
        o.done(1, g, 0);
        assert_eq!(o.revoke(1), Some(1), "offset 1 is still in flight");
        o.assign(2);
        assert_eq!(o.revoke(2), None, "nothing received");
        assert_eq!(o.revoke(3), None, "never assigned");
    }

    /// A replay may go back to a partition's position, never past it: the position is the
    /// oldest offset not done, else the next to come.
    #[test]
    fn should_stand_at_the_oldest_offset_not_done() {
        let mut o = Offsets::default();
        o.assign(0);
        assert_eq!(o.position(0), None, "nothing came yet");
        let g = o.received(0, 5).unwrap();
        o.received(0, 6);
        assert_eq!(o.position(0), Some(5));
        o.done(0, g, 6);
        assert_eq!(o.position(0), Some(5), "5 still waits");
        o.done(0, g, 5);
        assert_eq!(o.position(0), Some(7));
        assert_eq!(o.position(1), None, "not assigned");
    }

    /// A job that panicked is shown as a stall, but the partition goes on fetching: the
    /// other events are applied (uncommitted past it until a restart).
    #[test]
    fn should_show_a_panicked_job_without_pausing_its_partition() {
        let mut o = Offsets::default();
        o.assign(0);
        let g = o.received(0, 3).unwrap();
        o.received(0, 4);
        o.panicked(0, g, 3, 1_000, "roster panicked".into());
        assert_eq!(o.stalls(2_000).len(), 1);
        assert_eq!(o.stalls(2_000)[0].offset, 3);
        assert_eq!(o.pause_changes(false), PauseChanges::default());
        o.done(0, g, 4);
        assert_eq!(o.position(0), Some(3), "nothing commits past it");
        // A stall notice the job sent before it panicked, read after: still no pause.
        o.stalled(0, g, 3, 3_000, "homeserver away".into());
        assert_eq!(o.pause_changes(false), PauseChanges::default());
    }

    #[test]
    fn should_pause_stalled_partitions_and_resume_when_done() {
        let mut o = Offsets::default();
        o.assign(0);
        o.assign(1);
        let g = o.received(0, 3).unwrap();
        o.stalled(0, g, 3, 1_000, "homeserver away".into());
        o.stalled(0, g, 3, 4_000, "homeserver still away".into());
        assert_eq!(
            o.stalls(9_000),
            vec![StalledPartition {
                partition: 0,
                offset: 3,
                stalled_for_ms: 8_000,
                reason: "homeserver still away".into()
            }]
        );
        assert_eq!(
            o.pause_changes(false),
            PauseChanges {
                pause: vec![0],
                resume: vec![]
            }
        );
        assert_eq!(o.pause_changes(false), PauseChanges::default());
        assert_eq!(
            o.pause_changes(true),
            PauseChanges {
                pause: vec![1],
                resume: vec![]
            }
        );
        o.done(0, g, 3);
        assert!(o.stalls(10_000).is_empty());
        assert_eq!(
            o.pause_changes(false),
            PauseChanges {
                pause: vec![],
                resume: vec![0, 1]
            }
        );
    }

    #[test]
    fn should_start_over_at_a_replayed_offset_and_retry_failed_commits() {
        let mut o = Offsets::default();
        o.assign(0);
        let g = o.received(0, 40).unwrap();
        o.done(0, g, 40);
        assert_eq!(o.take_commits(), vec![(0, 41)]);
        let (ended, replay) = o.rewind(0, 7).unwrap();
        assert_eq!(ended, g);
        assert!(!o.done(0, g, 40));
        assert_eq!(o.take_commits(), vec![(0, 7)]);
        o.commit_failed(&[(0, 7)]);
        assert_eq!(o.take_commits(), vec![(0, 7)], "retried");
        assert_eq!(o.received(0, 7), Some(replay));
        assert_eq!(o.rewind(5, 0), None);
        assert!(
            o.is_replayed(0, 7) && o.is_replayed(0, 40),
            "received before the replay"
        );
        assert!(!o.is_replayed(0, 41), "never received: news");
        assert!(!o.is_replayed(1, 0), "another partition");
    }
}
