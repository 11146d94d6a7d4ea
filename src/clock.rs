//! Reads the wall clock, for what roster records about time (transaction ids, absence of
//! agents, deactivations). Orders nothing: the model never compares wall-clock readings
//! with homeserver timestamps.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}
