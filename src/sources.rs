//! Placeholder replaced by the sources branch.
use std::sync::Arc;

use crate::config::Config;
use crate::reconcile::ListAgents;

pub fn from_config(_config: &Config) -> Option<Arc<dyn ListAgents>> {
    None
}
