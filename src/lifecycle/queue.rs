//! Orders lifecycle work per key (one user's events one at a time, in arrival order) while
//! letting different keys run side by side.
//!
//! Invariants: a key is handed out at most once until `finish`; a key's jobs come out in
//! the order they went in; a key is `ready` exactly when it has waiting jobs and is not
//! busy. Bounding is the caller's job (it stops feeding at its limit).
//!
//! Coalescing (`pop_coalesced`): of a key's waiting jobs, an oldest one that the next one
//! supersedes is handed back as superseded instead of run, and so on while that holds; the
//! caller decides what supersedes what (for lifecycle: a newer profile update of the same
//! user that sets every part the older one sets; never a creation or a deletion), and marks
//! the superseded jobs done. Only a run at the front is coalesced, so nothing moves past a
//! job that is not superseded and the order of the rest is kept.

use std::collections::{HashMap, HashSet, VecDeque};

#[derive(Debug)]
pub struct KeyQueue<J> {
    waiting: HashMap<String, VecDeque<J>>,
    ready: VecDeque<String>,
    busy: HashSet<String>,
    queued: usize,
}

impl<J> Default for KeyQueue<J> {
    fn default() -> Self {
        KeyQueue {
            waiting: HashMap::new(),
            ready: VecDeque::new(),
            busy: HashSet::new(),
            queued: 0,
        }
    }
}

impl<J> KeyQueue<J> {
    pub fn push(&mut self, key: String, job: J) {
        let jobs = self.waiting.entry(key.clone()).or_default();
        jobs.push_back(job);
        self.queued += 1;
        if jobs.len() == 1 && !self.busy.contains(&key) {
            self.ready.push_back(key);
        }
    }

    /// The oldest job of the key that became ready first; the key is busy until `finish`.
    #[cfg(test)]
    pub fn pop(&mut self) -> Option<(String, J)> {
        self.pop_coalesced(|_, _| false)
            .map(|(key, job, superseded)| {
                debug_assert!(superseded.is_empty());
                (key, job)
            })
    }

    /// Like `pop`, but while the key's next waiting job `supersedes(next, current)`, the
    /// current one is set aside and the next one taken instead: returns the job to run and
    /// the superseded ones, oldest first (no longer queued; the caller marks them done).
    pub fn pop_coalesced(
        &mut self,
        supersedes: impl Fn(&J, &J) -> bool,
    ) -> Option<(String, J, Vec<J>)> {
        let key = self.ready.pop_front()?;
        let jobs = self
            .waiting
            .get_mut(&key)
            .expect("a ready key has waiting jobs");
        let mut job = jobs.pop_front().expect("a ready key has waiting jobs");
        let mut superseded = Vec::new();
        while let Some(next) = jobs.front() {
            if !supersedes(next, &job) {
                break;
            }
            let next = jobs.pop_front().expect("just seen");
            superseded.push(std::mem::replace(&mut job, next));
        }
        if jobs.is_empty() {
            self.waiting.remove(&key);
        }
        self.queued -= 1 + superseded.len();
        self.busy.insert(key.clone());
        Some((key, job, superseded))
    }

    /// The key's job is done (or abandoned): its next job may go.
    pub fn finish(&mut self, key: &str) {
        if self.busy.remove(key) && self.waiting.contains_key(key) {
            self.ready.push_back(key.to_owned());
        }
    }

    /// Drops waiting jobs for which `keep` is false (their partition was revoked).
    pub fn retain(&mut self, mut keep: impl FnMut(&J) -> bool) {
        let mut dropped = 0;
        self.waiting.retain(|_, jobs| {
            let before = jobs.len();
            jobs.retain(&mut keep);
            dropped += before - jobs.len();
            !jobs.is_empty()
        });
        self.queued -= dropped;
        let waiting = &self.waiting;
        self.ready.retain(|k| waiting.contains_key(k));
    }

    /// Jobs waiting (not counting the ones handed out).
    pub fn len(&self) -> usize {
        self.queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain_ready<J: Copy>(q: &mut KeyQueue<J>) -> Vec<(String, J)> {
        std::iter::from_fn(|| q.pop()).collect()
    }

    #[test]
    fn should_run_one_job_per_key_in_order() {
        let mut q = KeyQueue::default();
        q.push("a".into(), 1);
        q.push("a".into(), 2);
        q.push("b".into(), 3);
        q.push("a".into(), 4);
        assert_eq!(q.len(), 4);
        // One per key at a time.
        assert_eq!(drain_ready(&mut q), vec![("a".into(), 1), ("b".into(), 3)]);
        assert!(q.pop().is_none(), "a is busy");
        q.finish("a");
        assert_eq!(q.pop(), Some(("a".into(), 2)));
        q.finish("b");
        assert!(q.pop().is_none(), "b has nothing left; a is busy");
        q.finish("a");
        assert_eq!(q.pop(), Some(("a".into(), 4)));
        q.finish("a");
        assert!(q.pop().is_none());
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn should_not_release_a_busy_key_when_more_work_arrives() {
        let mut q = KeyQueue::default();
        q.push("a".into(), 1);
        assert_eq!(q.pop(), Some(("a".into(), 1)));
        q.push("a".into(), 2);
        assert!(q.pop().is_none());
        q.finish("a");
        assert_eq!(q.pop(), Some(("a".into(), 2)));
    }

    #[test]
    fn should_drop_revoked_work_and_keep_the_rest_ordered() {
        let mut q = KeyQueue::default();
        // (partition, offset)
        q.push("a".into(), (0, 1));
        q.push("b".into(), (1, 1));
        q.push("a".into(), (1, 2));
        q.push("a".into(), (0, 3));
        q.retain(|&(partition, _)| partition != 1);
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop(), Some(("a".into(), (0, 1))));
        assert!(q.pop().is_none(), "b had only revoked work");
        q.finish("a");
        assert_eq!(q.pop(), Some(("a".into(), (0, 3))));
        q.finish("a");
        q.finish("never-seen");
        assert_eq!(q.len(), 0);
    }

    /// A stand-in for lifecycle jobs: (offset, what the event is).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Ev {
        Created,
        Update,
        Deleted,
    }

    /// The lifecycle rule in small: a newer update supersedes an older update only.
    fn supersedes(newer: &(i64, Ev), older: &(i64, Ev)) -> bool {
        newer.0 > older.0 && newer.1 == Ev::Update && older.1 == Ev::Update
    }

    fn pop_run(q: &mut KeyQueue<(i64, Ev)>) -> Option<((i64, Ev), Vec<i64>)> {
        let (key, job, superseded) = q.pop_coalesced(supersedes)?;
        q.finish(&key);
        Some((job, superseded.iter().map(|j| j.0).collect()))
    }

    #[test]
    fn should_run_only_the_newest_of_a_users_waiting_updates() {
        let mut q = KeyQueue::default();
        for offset in 1..=4 {
            q.push("a".into(), (offset, Ev::Update));
        }
        q.push("b".into(), (5, Ev::Update));
        assert_eq!(q.len(), 5);
        assert_eq!(pop_run(&mut q), Some(((4, Ev::Update), vec![1, 2, 3])));
        assert_eq!(q.len(), 1, "the superseded jobs left the queue");
        assert_eq!(pop_run(&mut q), Some(((5, Ev::Update), vec![])));
        assert_eq!(pop_run(&mut q), None);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn should_never_coalesce_a_deletion_away_nor_move_anything_past_it() {
        let mut q = KeyQueue::default();
        for (offset, ev) in [
            (1, Ev::Update),
            (2, Ev::Update),
            (3, Ev::Deleted),
            (4, Ev::Update),
            (5, Ev::Update),
            (6, Ev::Deleted),
        ] {
            q.push("a".into(), (offset, ev));
        }
        let runs: Vec<_> = std::iter::from_fn(|| pop_run(&mut q)).collect();
        assert_eq!(
            runs,
            vec![
                ((2, Ev::Update), vec![1]),
                ((3, Ev::Deleted), vec![]),
                ((5, Ev::Update), vec![4]),
                ((6, Ev::Deleted), vec![]),
            ]
        );
    }

    #[test]
    fn should_register_a_created_user_before_its_coalesced_updates() {
        let mut q = KeyQueue::default();
        for (offset, ev) in [(1, Ev::Created), (2, Ev::Update), (3, Ev::Update)] {
            q.push("a".into(), (offset, ev));
        }
        assert_eq!(pop_run(&mut q), Some(((1, Ev::Created), vec![])));
        assert_eq!(pop_run(&mut q), Some(((3, Ev::Update), vec![2])));
        assert_eq!(pop_run(&mut q), None);
    }

    #[test]
    fn should_coalesce_updates_that_arrive_while_the_user_is_busy() {
        let mut q = KeyQueue::default();
        q.push("a".into(), (1, Ev::Update));
        let (key, job, superseded) = q.pop_coalesced(supersedes).unwrap();
        assert_eq!((job, superseded.len()), ((1, Ev::Update), 0));
        // While offset 1 runs, three more arrive: it is not superseded (it already runs),
        // the three waiting ones coalesce once the key is free.
        for offset in 2..=4 {
            q.push("a".into(), (offset, Ev::Update));
        }
        assert!(q.pop_coalesced(supersedes).is_none(), "a is busy");
        q.finish(&key);
        assert_eq!(pop_run(&mut q), Some(((4, Ev::Update), vec![2, 3])));
    }
}
