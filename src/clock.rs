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

/// Milliseconds since the Unix epoch of an RFC 3339 timestamp (`2026-12-02T03:58:50Z`,
/// `...+00:00`, fractions of a second allowed); `None` when it is not one.
pub fn parse_rfc3339_ms(text: &str) -> Option<u64> {
    let (date, rest) = text.trim().split_once(['T', 't', ' '])?;
    let mut d = date.split('-');
    let (y, m, day): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    // RFC 3339 years have four digits: larger ones would overflow the arithmetic below.
    if d.next().is_some()
        || !(0..=9999).contains(&y)
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
    {
        return None;
    }
    let (clock, offset_s) = if let Some(clock) = rest.strip_suffix(['Z', 'z']) {
        (clock, 0)
    } else {
        let at = rest.rfind(['+', '-'])?;
        let (clock, offset) = rest.split_at(at);
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let (h, min) = offset[1..].split_once(':')?;
        let (h, min): (i64, i64) = (h.parse().ok()?, min.parse().ok()?);
        if !(0..=23).contains(&h) || !(0..=59).contains(&min) {
            return None;
        }
        (clock, sign * (h * 3600 + min * 60))
    };
    let mut t = clock.split(':');
    let (h, min): (i64, i64) = (t.next()?.parse().ok()?, t.next()?.parse().ok()?);
    let seconds: f64 = t.next()?.parse().ok()?;
    if t.next().is_some()
        || !(0..=23).contains(&h)
        || !(0..=59).contains(&min)
        || !(0.0..61.0).contains(&seconds)
    {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let ms = (days * 86_400 + h * 3600 + min * 60 - offset_s) * 1000 + (seconds * 1000.0) as i64;
    u64::try_from(ms).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_parse_rfc3339_timestamps() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2026-12-02T03:58:50+00:00"),
            Some(1_796_183_930_000)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-12-02T04:58:50.250+01:00"),
            Some(1_796_183_930_250)
        );
        assert_eq!(
            parse_rfc3339_ms("2000-02-29T12:00:00Z"),
            Some(951_825_600_000)
        );
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-12-02",
            "2026-12-02T25:00:00Z",
            // Out of range: no overflow, no wrapped timestamp.
            "99999999999999-01-01T00:00:00Z",
            "2026-01-01T00:00:00+99999999999999999:00",
            "2026-01-01T00:00:00+24:00",
            "2026-01-01T-1:00:00Z",
            "2026-01-01T00:-5:00Z",
            "2026-01-01T00:00:00+01:-30",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad:?}");
        }
    }
}
