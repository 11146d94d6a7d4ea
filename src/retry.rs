//! Decides when to try again: one backoff policy (exponential, capped, with jitter) that
//! honours the server's `retry_after`, the outcome every retrying loop reports, and the
//! start-up loop that retries until the homeserver is there.
//!
//! Used by the reconciler (start-up and per agent), the identity effects and the lifecycle
//! worker; none of them sleeps on its own schedule.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// What one attempt at a piece of work came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T = ()> {
    Done(T),
    /// Not now (the peer was away, overloaded or rate limiting): try again, after
    /// `retry_after` when the peer asked for it.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Refused for good: report it (the reconciler) or dead-letter it (lifecycle).
    Refused(String),
}

impl<T> Outcome<T> {
    /// Classifies an error as retryable or refused for good.
    pub fn from_error<E: Retryable + Display>(error: &E) -> Outcome<T> {
        if error.is_transient() {
            Outcome::Retry {
                reason: error.to_string(),
                retry_after: error.retry_after(),
            }
        } else {
            Outcome::Refused(error.to_string())
        }
    }
}

/// An error that knows whether trying again can help.
pub trait Retryable {
    /// The peer was away, overloaded or rate limiting.
    fn is_transient(&self) -> bool;
    /// How long the peer asked to wait.
    fn retry_after(&self) -> Option<Duration>;
}

/// Exponential backoff with jitter: `start`, doubling per failure, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub start: Duration,
    pub max: Duration,
}

impl Backoff {
    /// 250 ms doubling to 30 s: every loop that talks to the homeserver or the broker.
    pub const DEFAULT: Backoff = Backoff {
        start: Duration::from_millis(250),
        max: Duration::from_secs(30),
    };

    /// The wait after `failures` failures in a row (1 for the first), before jitter.
    pub fn base(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(20);
        self.start.saturating_mul(1 << doublings).min(self.max)
    }

    /// The wait after `failures` failures: the server's `retry_after` if it gave one (it
    /// knows its own limits), else the backoff; both spread by jitter.
    pub fn wait(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        jitter(match retry_after {
            Some(asked) => self.asked(asked),
            None => self.base(failures),
        })
    }

    /// The server's `retry_after`, but never less than `start`: a wait of nothing
    /// (`Retry-After: 0`, a date already past by roster's clock) would make a busy loop.
    pub fn asked(&self, retry_after: Duration) -> Duration {
        retry_after.max(self.start)
    }
}

/// Spreads a wait by up to a quarter so many waiters do not wake together.
pub fn jitter(wait: Duration) -> Duration {
    let spread = wait.as_millis() as u64 / 4;
    if spread == 0 {
        return wait;
    }
    wait + Duration::from_millis(rand::random_range(0..=spread))
}

/// Runs `attempt` until it succeeds, backing off as [`Backoff::DEFAULT`] (or as the server
/// asks); `None` when `shutdown` comes first.
///
/// For start-up steps that cannot be skipped. An error refused for good is retried too, at
/// the slowest pace: at start-up it usually means the homeserver has not loaded the
/// registration yet.
pub async fn until_ok<T, E, F, Fut>(
    shutdown: &CancellationToken,
    what: &str,
    mut attempt: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Retryable + Display,
{
    let mut failures = 0u32;
    loop {
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return None,
            outcome = attempt() => outcome,
        };
        let error = match outcome {
            Ok(value) => return Some(value),
            Err(error) => error,
        };
        failures = failures.saturating_add(1);
        let wait = match error.retry_after() {
            Some(asked) => Backoff::DEFAULT.wait(failures, Some(asked)),
            None if error.is_transient() => Backoff::DEFAULT.wait(failures, None),
            None => jitter(Backoff::DEFAULT.max),
        };
        tracing::warn!(
            attempt = failures,
            retry_in_ms = wait.as_millis() as u64,
            error = %error,
            "cannot {what} yet"
        );
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::time::Instant;

    #[derive(Debug)]
    struct Failure {
        transient: bool,
        retry_after: Option<Duration>,
    }

    impl Display for Failure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "failure (transient: {})", self.transient)
        }
    }

    impl Retryable for Failure {
        fn is_transient(&self) -> bool {
            self.transient
        }
        fn retry_after(&self) -> Option<Duration> {
            self.retry_after
        }
    }

    #[test]
    fn should_double_from_the_start_up_to_the_cap() {
        let b = Backoff::DEFAULT;
        let bases: Vec<u64> = (1..=9).map(|n| b.base(n).as_millis() as u64).collect();
        assert_eq!(
            bases,
            vec![250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]
        );
        assert_eq!(b.base(u32::MAX), b.max, "no overflow");
    }

    #[test]
    fn should_jitter_by_at_most_a_quarter() {
        let b = Backoff::DEFAULT;
        for failures in 1..10 {
            let base = b.base(failures);
            for _ in 0..50 {
                let wait = b.wait(failures, None);
                assert!(
                    wait >= base && wait <= base + base / 4,
                    "{wait:?} for {base:?}"
                );
            }
        }
    }

    #[test]
    fn should_honour_the_servers_retry_after_even_above_the_cap() {
        let b = Backoff::DEFAULT;
        let asked = Duration::from_secs(90);
        let wait = b.wait(1, Some(asked));
        assert!(wait >= asked && wait <= asked + asked / 4, "{wait:?}");
    }

    /// A `retry_after` of nothing (`Retry-After: 0`, or a date already past by roster's
    /// clock) must not turn a retry loop into a busy loop against the homeserver.
    #[test]
    fn should_never_wait_less_than_the_start_when_asked_to_wait_nothing() {
        let b = Backoff::DEFAULT;
        for _ in 0..50 {
            let wait = b.wait(1, Some(Duration::ZERO));
            assert!(wait >= b.start && wait <= b.start + b.start / 4, "{wait:?}");
        }
    }

    /// `until_ok` over an operation that fails transiently `failures` times, asking for
    /// `retry_after`, then answers 7: what it returned, the calls made and the time taken.
    async fn until_ok_after(
        failures: u32,
        retry_after: Option<Duration>,
    ) -> (Option<u32>, u32, Duration) {
        let calls = Arc::new(AtomicU32::new(0));
        let started = Instant::now();
        let shutdown = CancellationToken::new();
        let got = until_ok(&shutdown, "test", || {
            let calls = calls.clone();
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) < failures {
                    Err(Failure {
                        transient: true,
                        retry_after,
                    })
                } else {
                    Ok(7)
                }
            }
        })
        .await;
        (got, calls.load(Ordering::SeqCst), started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn should_not_retry_at_once_until_ok_when_asked_to_wait_nothing() {
        let (got, _, waited) = until_ok_after(4, Some(Duration::ZERO)).await;
        assert_eq!(got, Some(7));
        assert!(waited >= Backoff::DEFAULT.start * 4, "{waited:?}");
    }

    #[test]
    fn should_classify_errors_into_outcomes() {
        let transient = Failure {
            transient: true,
            retry_after: Some(Duration::from_secs(2)),
        };
        assert_eq!(
            Outcome::<()>::from_error(&transient),
            Outcome::Retry {
                reason: "failure (transient: true)".into(),
                retry_after: Some(Duration::from_secs(2))
            }
        );
        let refused = Failure {
            transient: false,
            retry_after: None,
        };
        assert_eq!(
            Outcome::<()>::from_error(&refused),
            Outcome::Refused("failure (transient: false)".into())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn should_retry_until_ok_with_growing_waits() {
        let (got, calls, waited) = until_ok_after(3, None).await;
        assert_eq!(got, Some(7));
        assert_eq!(calls, 4);
        // 250 + 500 + 1000 ms, each plus at most a quarter.
        assert!(
            waited >= Duration::from_millis(1750) && waited <= Duration::from_millis(2188),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn should_wait_the_slowest_pace_after_a_refusal_and_stop_on_shutdown() {
        let shutdown = CancellationToken::new();
        let started = Instant::now();
        let task = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                until_ok(&shutdown, "test", || async {
                    Err::<(), _>(Failure {
                        transient: false,
                        retry_after: None,
                    })
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert!(!task.is_finished());
        shutdown.cancel();
        assert_eq!(task.await.unwrap(), None);
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}
