//! Offline commands: each reads the config, the registration and the homeserver, and runs
//! once. They reuse the reconciler's planner and reads; they never start `serve`.
//!
//! - [`plan`]: what a sync would do, doing none of it.
//! - [`adopt`]: takes over the rooms the old agent-sync bot made.
//! - [`check_config`]: validates the config and the files it names, starting nothing.

pub mod adopt;
pub mod check_config;
pub mod plan;

use std::sync::Arc;

use crate::config::Config;
use crate::matrix::Homeserver;
use crate::metrics::Metrics;
use crate::registration::{self, RegistrationError};

/// The homeserver client a command acts with: the registration's `as_token`, the
/// config's homeserver settings, and its own metrics (to count what it asked).
fn homeserver(config: &Config) -> Result<(Homeserver, Arc<Metrics>), RegistrationError> {
    let registrations = registration::read(config)?;
    let metrics = Arc::new(Metrics::new());
    let hs = Homeserver::from_config(config, &registrations, metrics.clone());
    Ok((hs, metrics))
}
