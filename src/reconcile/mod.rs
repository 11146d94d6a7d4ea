//! Acts on the homeserver: the only module that drives `matrix`.
//!
//! Start-up first: register the appservice's own user (Synapse does not create it) and ping
//! the homeserver, which makes it flush the transactions it queued while roster was away.
//! Both retry with capped exponential backoff until they succeed or roster shuts down.
//!
//! [`identity`] executes what lifecycle events ask of identity users.

pub mod identity;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::matrix::{Homeserver, MatrixError, Registered};

const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Prepares the homeserver side, then marks roster ready.
pub async fn start(shared: Arc<Shared>, homeserver: Homeserver, shutdown: CancellationToken) {
    let bot = shared.ids.bot.clone();
    let registered = retry(&shutdown, "register the appservice user", || {
        homeserver.register(bot.localpart())
    })
    .await;
    match registered {
        Some(Registered::Created) => tracing::info!(user = %bot, "registered the appservice user"),
        Some(Registered::AlreadyExists) => {
            tracing::debug!(user = %bot, "appservice user already registered")
        }
        None => return,
    }
    let appservice_id = shared.registration.id.clone();
    let Some(round_trip) = retry(&shutdown, "ping the homeserver", || {
        homeserver.ping(&appservice_id)
    })
    .await
    else {
        return;
    };
    shared.set_ready();
    tracing::info!(
        round_trip_ms = round_trip.as_millis() as u64,
        "homeserver reaches roster; ready"
    );
}

/// Runs `attempt` until it succeeds, waiting longer after each failure; `None` on shutdown.
///
/// A permanent error (a 4xx other than rate limiting) is retried too, at the slowest pace:
/// at start-up it usually means the homeserver has not loaded the registration yet.
async fn retry<T, F, Fut>(shutdown: &CancellationToken, what: &str, mut attempt: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, MatrixError>>,
{
    let mut delay = BACKOFF_START;
    for attempt_number in 1u32.. {
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return None,
            outcome = attempt() => outcome,
        };
        let error = match outcome {
            Ok(value) => return Some(value),
            Err(error) => error,
        };
        let wait = match error.retry_after() {
            Some(asked) => asked,
            None if error.is_transient() => delay,
            None => BACKOFF_MAX,
        };
        tracing::warn!(
            attempt = attempt_number,
            retry_in_ms = wait.as_millis() as u64,
            error = %error,
            "cannot {what} yet"
        );
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(jitter(wait)) => {}
        }
        delay = (delay * 2).min(BACKOFF_MAX);
    }
    unreachable!("the attempt counter does not run out")
}

/// Spreads retries by up to a quarter of the wait so many waiters do not wake together.
pub(crate) fn jitter(wait: Duration) -> Duration {
    let spread = wait.as_millis() as u64 / 4;
    if spread == 0 {
        return wait;
    }
    wait + Duration::from_millis(rand::random_range(0..=spread))
}
