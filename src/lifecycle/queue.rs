//! Orders lifecycle work per key (one user's events one at a time, in arrival order) while
//! letting different keys run side by side.
//!
//! Invariants: a key is handed out at most once until `finish`; a key's jobs come out in
//! the order they went in; a key is `ready` exactly when it has waiting jobs and is not
//! busy. Bounding is the caller's job (it stops feeding at its limit).

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
    pub fn pop(&mut self) -> Option<(String, J)> {
        let key = self.ready.pop_front()?;
        let jobs = self
            .waiting
            .get_mut(&key)
            .expect("a ready key has waiting jobs");
        let job = jobs.pop_front().expect("a ready key has waiting jobs");
        if jobs.is_empty() {
            self.waiting.remove(&key);
        }
        self.queued -= 1;
        self.busy.insert(key.clone());
        Some((key, job))
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
}
