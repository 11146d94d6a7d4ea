//! Offline commands: each reads the config, the registration and the homeserver, and runs
//! once. They reuse the reconciler's planner and reads; they never start `serve`.
//!
//! - [`plan`]: what a sync would do, doing none of it.
//! - [`adopt`]: takes over the rooms the old agent-sync bot made.

pub mod adopt;
pub mod plan;

use std::sync::Arc;

use crate::config::{Config, Secret};
use crate::matrix::Homeserver;
use crate::metrics::Metrics;
use crate::registration::{self, RegistrationError};

/// The homeserver client a command acts with: the registration's `as_token`, the
/// config's homeserver settings, and its own metrics (to count what it asked).
fn homeserver(config: &Config) -> Result<(Homeserver, Arc<Metrics>), RegistrationError> {
    let registration = registration::read(&config.appservice.registration, config)?;
    let metrics = Arc::new(Metrics::new());
    let hs = Homeserver::from_config(config, Secret::new(registration.as_token), metrics.clone());
    Ok((hs, metrics))
}
