//! Orders reconciliation work: one entry per key, the earliest deadline wins, and a key is
//! never handed out while it is still running (it runs again afterwards if rescheduled).
//! A key due for a change the homeserver pushed goes before every other due key: a repair
//! never waits behind a sync's or a provisioning burst's work.
//!
//! Bounded by the number of keys (agents); triggers carry only the key, so a burst of
//! pushed events for one room becomes one run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// What the reconciler works on: one agent's room, or the space.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Agent(String),
    Space,
}

impl Key {
    pub fn agent(id: &str) -> Key {
        Key::Agent(id.to_owned())
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Agent(id) => f.write_str(id),
            Key::Space => f.write_str("(space)"),
        }
    }
}

pub struct WorkQueue<K = Key> {
    state: Mutex<State<K>>,
    changed: Notify,
}

struct State<K> {
    /// Each waiting key's deadline, and its place in `order`.
    due: HashMap<K, Slot>,
    /// The waiting keys by deadline (ties in scheduling order): the next one is found
    /// without looking at every key, which a 10,000-agent sync schedules at once.
    order: BTreeMap<Slot, K>,
    next_seq: u64,
    /// Due keys scheduled for a pushed change: handed out first.
    pushed: HashSet<K>,
    running: HashSet<K>,
}

/// A deadline and the order it was asked in.
type Slot = (Instant, u64);

impl<K> Default for WorkQueue<K> {
    fn default() -> Self {
        WorkQueue {
            state: Mutex::new(State {
                due: HashMap::new(),
                order: BTreeMap::new(),
                next_seq: 0,
                pushed: HashSet::new(),
                running: HashSet::new(),
            }),
            changed: Notify::new(),
        }
    }
}

impl<K: Clone + Eq + Hash> State<K> {
    /// The key to hand out: the earliest due pushed key, else the earliest key; either
    /// not running. Running keys are skipped, and there are at most as many as workers.
    fn first_waiting(&self, now: Instant) -> Option<(K, Instant)> {
        let pushed = self
            .pushed
            .iter()
            .filter(|key| !self.running.contains(*key))
            .filter_map(|key| self.due.get(key).map(|slot| (key, *slot)))
            .filter(|(_, (at, _))| *at <= now)
            .min_by_key(|(_, slot)| *slot)
            .map(|(key, (at, _))| (key.clone(), at));
        pushed.or_else(|| {
            self.order
                .iter()
                .find(|(_, key)| !self.running.contains(*key))
                .map(|((at, _), key)| (key.clone(), *at))
        })
    }

    /// Takes `key` out of the waiting keys, pushed or not.
    fn remove(&mut self, key: &K) {
        self.remove_slot(key);
        self.pushed.remove(key);
    }

    fn remove_slot(&mut self, key: &K) {
        if let Some(slot) = self.due.remove(key) {
            self.order.remove(&slot);
        }
    }
}

impl<K: Clone + Eq + Hash> WorkQueue<K> {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State<K>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for `key` to run at `at`, or earlier if it is already due earlier.
    pub fn schedule_at(&self, key: &K, at: Instant) {
        self.add(key, at, false);
    }

    fn add(&self, key: &K, at: Instant, pushed: bool) {
        {
            let mut state = self.state();
            let earlier = state.due.get(key).is_none_or(|(due, _)| at < *due);
            if earlier {
                state.remove_slot(key);
                let slot = (at, state.next_seq);
                state.next_seq += 1;
                state.due.insert(key.clone(), slot);
                state.order.insert(slot, key.clone());
            }
            if pushed {
                state.pushed.insert(key.clone());
            }
        }
        self.changed.notify_waiters();
    }

    pub fn schedule(&self, key: &K) {
        self.schedule_at(key, Instant::now());
    }

    /// Asks for `key` to run now, for a change the homeserver pushed: before every key
    /// that was not pushed, even those due earlier.
    pub fn schedule_pushed(&self, key: &K) {
        self.add(key, Instant::now(), true);
    }

    pub fn schedule_in(&self, key: &K, delay: Duration) {
        self.schedule_at(key, Instant::now() + delay);
    }

    /// Waits for the next due key that is not running, and marks it running.
    pub async fn next(&self) -> K {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wake_at = {
                let mut state = self.state();
                let now = Instant::now();
                match state.first_waiting(now) {
                    Some((key, at)) if at <= now => {
                        state.remove(&key);
                        state.running.insert(key.clone());
                        return key;
                    }
                    Some((_, at)) => Some(at),
                    None => None,
                }
            };
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Marks `key` finished; a reschedule that arrived meanwhile can now run.
    pub fn done(&self, key: &K) {
        self.state().running.remove(key);
        self.changed.notify_waiters();
    }

    /// Keys waiting (due now or later) and keys running.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.state();
        (state.due.len(), state.running.len())
    }

    /// Whether none of `keys` is due by now or running.
    pub fn settled(&self, keys: &[K]) -> bool {
        let state = self.state();
        let now = Instant::now();
        keys.iter().all(|key| {
            !state.running.contains(key) && state.due.get(key).is_none_or(|(at, _)| *at > now)
        })
    }

    /// Waits until `settled(keys)`.
    pub async fn wait_settled(&self, keys: &[K]) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.settled(keys) {
                return;
            }
            // Due-later keys become due-now without a notification: look again soon.
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn should_hand_out_each_key_once_earliest_first() {
        let queue = WorkQueue::<&str>::new();
        queue.schedule_in(&"b", Duration::from_secs(2));
        queue.schedule_in(&"a", Duration::from_secs(1));
        queue.schedule_in(&"a", Duration::from_secs(5)); // later: the earlier deadline stays
        assert_eq!(queue.next().await, "a");
        assert_eq!(queue.next().await, "b");
        assert_eq!(queue.counts(), (0, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn should_never_run_a_key_twice_at_once() {
        let queue = std::sync::Arc::new(WorkQueue::<&str>::new());
        queue.schedule(&"a");
        assert_eq!(queue.next().await, "a");
        queue.schedule(&"a"); // rescheduled while running
        queue.schedule(&"b");
        assert_eq!(queue.next().await, "b");
        let waiter = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.next().await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            !waiter.is_finished(),
            "a must wait for its running instance"
        );
        queue.done(&"a");
        assert_eq!(waiter.await.unwrap(), "a");
    }

    /// A repair the homeserver pushed (a kicked `@admin`) does not wait behind a sync's or
    /// a provisioning burst's keys, however many were due before it.
    #[tokio::test(start_paused = true)]
    async fn should_hand_out_pushed_keys_before_other_work_due_earlier() {
        let queue = WorkQueue::<&str>::new();
        for key in ["a", "b", "c"] {
            queue.schedule(&key);
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        queue.schedule_in(&"later", Duration::from_secs(5));
        tokio::time::advance(Duration::from_millis(10)).await;
        queue.schedule_pushed(&"p");
        assert_eq!(queue.next().await, "p");
        assert_eq!(queue.next().await, "a");
        // Pushed while it runs: first once it is done.
        queue.schedule_pushed(&"a");
        queue.done(&"a");
        assert_eq!(queue.next().await, "a");
        assert_eq!(queue.next().await, "b");
        assert_eq!(queue.next().await, "c");
        // Handed out once, a key is ordinary again: its retry waits its turn.
        queue.done(&"p");
        queue.schedule(&"q");
        tokio::time::advance(Duration::from_millis(10)).await;
        queue.schedule(&"p");
        assert_eq!(queue.next().await, "q");
        assert_eq!(queue.next().await, "p");
        // A pushed key is not handed out before it is due, nor a later key before it.
        assert_eq!(queue.next().await, "later");
    }

    /// Many keys, rescheduled earlier and later in any order: handed out by deadline, ties
    /// in the order they were asked for, each once.
    #[tokio::test(start_paused = true)]
    async fn should_hand_out_many_keys_by_deadline_then_scheduling_order() {
        let queue = WorkQueue::<u32>::new();
        let start = Instant::now();
        let deadline = |n: u32| start + Duration::from_millis(u64::from(n * 7919 % 1000));
        for n in 0..3000 {
            queue.schedule_at(&n, deadline(n) + Duration::from_secs(1));
            queue.schedule_at(&n, deadline(n)); // earlier: moves
            queue.schedule_at(&n, deadline(n) + Duration::from_secs(2)); // later: stays
        }
        let mut expected: Vec<u32> = (0..3000).collect();
        expected.sort_by_key(|n| deadline(*n)); // stable: ties keep scheduling order
        let mut got = Vec::new();
        for _ in 0..3000 {
            let key = queue.next().await;
            queue.done(&key);
            got.push(key);
        }
        assert_eq!(got, expected);
        assert_eq!(queue.counts(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn should_report_settled_keys() {
        let queue = WorkQueue::<&str>::new();
        let keys = vec!["a"];
        queue.schedule(&"a");
        assert!(!queue.settled(&keys));
        assert_eq!(queue.next().await, "a");
        assert!(!queue.settled(&keys));
        queue.done(&"a");
        queue.schedule_in(&"a", Duration::from_secs(60)); // a retry later does not block
        assert!(queue.settled(&keys));
    }
}
