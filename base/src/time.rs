//! Wall-clock time as Unix timestamps.
//!
//! Timestamps here are for records and display (a cycle's close time, a recovery
//! point's age); intervals are measured with `Instant`. A clock set before 1970
//! reads as 0 rather than failing.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch of `at`.
pub fn unix_secs_of(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// Milliseconds since the Unix epoch of `at`.
pub fn unix_millis_of(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    })
}

/// Seconds since the Unix epoch, now.
pub fn unix_secs() -> u64 {
    unix_secs_of(SystemTime::now())
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_millis() -> u64 {
    unix_millis_of(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_count_from_the_epoch_and_never_go_negative() {
        let at = UNIX_EPOCH + Duration::from_millis(1_796_580_605_995);
        assert_eq!(unix_secs_of(at), 1_796_580_605);
        assert_eq!(unix_millis_of(at), 1_796_580_605_995);
        assert_eq!(unix_secs_of(UNIX_EPOCH - Duration::from_secs(5)), 0);
        let (secs, millis) = (unix_secs(), unix_millis());
        assert!(millis / 1000 >= secs && secs > 1_700_000_000);
    }
}
