//! Bandwidth by time of day: windows of the week, each with its own limit.
//!
//! Contract: the first window that contains the time wins; outside every window the
//! plain limit applies (`None` is unlimited). Times are the host's local wall-clock
//! time (the TZ of the daemon, as `localtime(3)` sees it). A window is half-open,
//! `from` inclusive and `to` exclusive, and belongs to the day it starts on: a window
//! from 22:00 to 06:00 on `fri` runs from Friday 22:00 to Saturday 06:00. A window
//! whose `to` equals its `from` is rejected by configuration checks, not here.
//!
//! The [`Clock`] is injectable so tests can move time by hand.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::Deserialize;

const SECS_PER_DAY: u32 = 24 * 3600;

/// Why a day or a time of day does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// Not a day name.
    #[error("{0:?} is not a day (mon, tue, wed, thu, fri, sat or sun)")]
    Day(String),
    /// Not a time of day.
    #[error("{0:?} is not a time of day like 08:00 (HH:MM or HH:MM:SS, 00:00 to 24:00)")]
    Time(String),
}

/// A day of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub enum Weekday {
    /// Monday.
    Mon,
    /// Tuesday.
    Tue,
    /// Wednesday.
    Wed,
    /// Thursday.
    Thu,
    /// Friday.
    Fri,
    /// Saturday.
    Sat,
    /// Sunday.
    Sun,
}

impl Weekday {
    /// Every day, Monday first.
    pub const ALL: [Weekday; 7] = [
        Weekday::Mon,
        Weekday::Tue,
        Weekday::Wed,
        Weekday::Thu,
        Weekday::Fri,
        Weekday::Sat,
        Weekday::Sun,
    ];

    /// The day from `tm_wday` numbering (0 is Sunday).
    pub fn from_sunday_based(day: u32) -> Weekday {
        Weekday::ALL[usize::try_from((day + 6) % 7).unwrap_or_default()]
    }

    /// The day before.
    pub fn previous(self) -> Weekday {
        Weekday::ALL[(self.index() + 6) % 7]
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl FromStr for Weekday {
    type Err = ScheduleError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let lower = text.to_ascii_lowercase();
        let day = match lower.as_str() {
            "mon" | "monday" => Weekday::Mon,
            "tue" | "tuesday" => Weekday::Tue,
            "wed" | "wednesday" => Weekday::Wed,
            "thu" | "thursday" => Weekday::Thu,
            "fri" | "friday" => Weekday::Fri,
            "sat" | "saturday" => Weekday::Sat,
            "sun" | "sunday" => Weekday::Sun,
            _ => return Err(ScheduleError::Day(text.into())),
        };
        Ok(day)
    }
}

impl TryFrom<String> for Weekday {
    type Error = ScheduleError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

/// A time of day, in seconds since midnight (0 to 86400; 24:00 ends a day).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct TimeOfDay(u32);

impl TimeOfDay {
    /// `hours:minutes:seconds`, if it is a time of day.
    pub fn hms(hours: u32, minutes: u32, seconds: u32) -> Option<TimeOfDay> {
        let secs = hours * 3600 + minutes * 60 + seconds;
        (minutes < 60 && seconds < 60 && secs <= SECS_PER_DAY).then_some(TimeOfDay(secs))
    }

    /// Seconds since midnight.
    pub fn secs(self) -> u32 {
        self.0
    }
}

impl FromStr for TimeOfDay {
    type Err = ScheduleError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ScheduleError::Time(text.into());
        let field = |part: &str| {
            if part.len() == 2 && part.bytes().all(|b| b.is_ascii_digit()) {
                part.parse::<u32>().map_err(|_| bad())
            } else {
                Err(bad())
            }
        };
        let parts: Vec<&str> = text.split(':').collect();
        let (hours, minutes, seconds) = match parts.as_slice() {
            [h, m] => (field(h)?, field(m)?, 0),
            [h, m, s] => (field(h)?, field(m)?, field(s)?),
            _ => return Err(bad()),
        };
        TimeOfDay::hms(hours, minutes, seconds).ok_or_else(bad)
    }
}

impl TryFrom<String> for TimeOfDay {
    type Error = ScheduleError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (h, m, s) = (self.0 / 3600, self.0 / 60 % 60, self.0 % 60);
        if s == 0 {
            write!(f, "{h:02}:{m:02}")
        } else {
            write!(f, "{h:02}:{m:02}:{s:02}")
        }
    }
}

/// A moment of the week in local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    /// The day.
    pub day: Weekday,
    /// Seconds since local midnight (below 86400).
    pub secs: u32,
}

impl LocalTime {
    /// This moment moved `by` later (wrapping around the week).
    pub fn plus(self, by: Duration) -> LocalTime {
        let by = by.as_secs() % (7 * u64::from(SECS_PER_DAY));
        let total = u64::from(self.secs) + by;
        let days = usize::try_from(total / u64::from(SECS_PER_DAY)).unwrap_or_default();
        LocalTime {
            day: Weekday::ALL[(self.day.index() + days) % 7],
            secs: u32::try_from(total % u64::from(SECS_PER_DAY)).unwrap_or_default(),
        }
    }
}

/// One window of a schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// The days the window starts on.
    pub days: Vec<Weekday>,
    /// Start, inclusive.
    pub from: TimeOfDay,
    /// End, exclusive; at or before `from`, the window ends on the next day.
    pub to: TimeOfDay,
    /// Bytes per second inside the window.
    pub limit: u64,
}

impl Window {
    /// Whether the window contains `at`.
    pub fn contains(&self, at: LocalTime) -> bool {
        let (from, to) = (self.from.secs(), self.to.secs());
        if from < to {
            self.days.contains(&at.day) && from <= at.secs && at.secs < to
        } else {
            // Crosses midnight: the evening part on its own days, the morning part on
            // the days after.
            (self.days.contains(&at.day) && at.secs >= from)
                || (self.days.contains(&at.day.previous()) && at.secs < to)
        }
    }
}

/// Limits by time of day, over a plain limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BandwidthSchedule {
    /// The windows, first match wins.
    pub windows: Vec<Window>,
    /// The limit outside every window (`None`: unlimited).
    pub otherwise: Option<u64>,
}

impl BandwidthSchedule {
    /// The limit at `at` (`None`: unlimited).
    pub fn limit_at(&self, at: LocalTime) -> Option<u64> {
        self.windows
            .iter()
            .find(|window| window.contains(at))
            .map_or(self.otherwise, |window| Some(window.limit))
    }
}

/// Where a throttle reads the time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Monotonic time since an arbitrary origin (the token bucket's refill).
    fn elapsed(&self) -> Duration;
    /// The local wall-clock time (the schedule).
    fn local(&self) -> LocalTime;
}

/// The host's clocks.
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn elapsed(&self) -> Duration {
        self.origin.elapsed()
    }

    fn local(&self) -> LocalTime {
        local_now()
    }
}

/// The local time now, by `localtime_r(3)` (the TZ environment variable or
/// /etc/localtime). Midnight of Monday if the C library cannot say.
pub fn local_now() -> LocalTime {
    // SAFETY: time(NULL) only returns the time.
    let now = unsafe { libc::time(std::ptr::null_mut()) };
    // SAFETY: tm is plain data that all zeroes make valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals; localtime_r is the reentrant form and
    // writes only into `tm`.
    let converted = unsafe { libc::localtime_r(&now, &mut tm) };
    if converted.is_null() {
        return LocalTime {
            day: Weekday::Mon,
            secs: 0,
        };
    }
    let field = |value: libc::c_int| u32::try_from(value).unwrap_or_default();
    LocalTime {
        day: Weekday::from_sunday_based(field(tm.tm_wday)),
        // tm_sec may be 60 on a leap second.
        secs: (field(tm.tm_hour) * 3600 + field(tm.tm_min) * 60 + field(tm.tm_sec))
            .min(SECS_PER_DAY - 1),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A clock that moves only when told to.
    #[derive(Debug)]
    pub(crate) struct FakeClock {
        start: LocalTime,
        elapsed: Mutex<Duration>,
    }

    impl FakeClock {
        pub(crate) fn at(day: Weekday, time: &str) -> FakeClock {
            let secs = time.parse::<TimeOfDay>().expect("time").secs();
            FakeClock {
                start: LocalTime { day, secs },
                elapsed: Mutex::new(Duration::ZERO),
            }
        }

        pub(crate) fn advance(&self, by: Duration) {
            *self.elapsed.lock().expect("clock") += by;
        }
    }

    impl Clock for FakeClock {
        fn elapsed(&self) -> Duration {
            *self.elapsed.lock().expect("clock")
        }

        fn local(&self) -> LocalTime {
            self.start.plus(self.elapsed())
        }
    }

    fn at(day: Weekday, time: &str) -> LocalTime {
        LocalTime {
            day,
            secs: time.parse::<TimeOfDay>().expect("time").secs(),
        }
    }

    fn office_hours() -> BandwidthSchedule {
        BandwidthSchedule {
            windows: vec![Window {
                days: Weekday::ALL[..5].to_vec(),
                from: "08:00".parse().expect("from"),
                to: "18:00".parse().expect("to"),
                limit: 20 << 20,
            }],
            otherwise: None,
        }
    }

    #[test]
    fn times_and_days_parse_and_reject() {
        assert_eq!("08:00".parse::<TimeOfDay>(), Ok(TimeOfDay(8 * 3600)));
        assert_eq!("23:59:30".parse::<TimeOfDay>(), Ok(TimeOfDay(86_370)));
        assert_eq!("24:00".parse::<TimeOfDay>(), Ok(TimeOfDay(SECS_PER_DAY)));
        for bad in [
            "8:00",
            "24:01",
            "12:60",
            "12",
            "12:00:00:00",
            "ab:cd",
            "",
            "-1:00",
        ] {
            assert!(bad.parse::<TimeOfDay>().is_err(), "{bad:?} parsed");
        }
        assert_eq!("Fri".parse::<Weekday>(), Ok(Weekday::Fri));
        assert_eq!("sunday".parse::<Weekday>(), Ok(Weekday::Sun));
        assert!("fry".parse::<Weekday>().is_err());
        assert_eq!(TimeOfDay(8 * 3600 + 5).to_string(), "08:00:05");
        assert_eq!(Weekday::from_sunday_based(0), Weekday::Sun);
        assert_eq!(Weekday::from_sunday_based(1), Weekday::Mon);
        assert_eq!(Weekday::Mon.previous(), Weekday::Sun);
    }

    #[test]
    fn window_edges_are_half_open() {
        let schedule = office_hours();
        assert_eq!(schedule.limit_at(at(Weekday::Tue, "07:59:59")), None);
        assert_eq!(schedule.limit_at(at(Weekday::Tue, "08:00")), Some(20 << 20));
        assert_eq!(
            schedule.limit_at(at(Weekday::Tue, "17:59:59")),
            Some(20 << 20)
        );
        assert_eq!(schedule.limit_at(at(Weekday::Tue, "18:00")), None);
    }

    #[test]
    fn weekends_fall_outside_weekday_windows() {
        let schedule = BandwidthSchedule {
            otherwise: Some(100 << 20),
            ..office_hours()
        };
        assert_eq!(schedule.limit_at(at(Weekday::Fri, "12:00")), Some(20 << 20));
        assert_eq!(
            schedule.limit_at(at(Weekday::Sat, "12:00")),
            Some(100 << 20)
        );
        assert_eq!(
            schedule.limit_at(at(Weekday::Sun, "12:00")),
            Some(100 << 20)
        );
        assert_eq!(schedule.limit_at(at(Weekday::Mon, "12:00")), Some(20 << 20));
    }

    #[test]
    fn a_window_crossing_midnight_belongs_to_its_start_day() {
        let night = BandwidthSchedule {
            windows: vec![Window {
                days: vec![Weekday::Fri],
                from: "22:00".parse().expect("from"),
                to: "06:00".parse().expect("to"),
                limit: 1 << 20,
            }],
            otherwise: Some(2 << 20),
        };
        assert_eq!(night.limit_at(at(Weekday::Fri, "21:59:59")), Some(2 << 20));
        assert_eq!(night.limit_at(at(Weekday::Fri, "22:00")), Some(1 << 20));
        assert_eq!(night.limit_at(at(Weekday::Fri, "23:59:59")), Some(1 << 20));
        assert_eq!(night.limit_at(at(Weekday::Sat, "00:00")), Some(1 << 20));
        assert_eq!(night.limit_at(at(Weekday::Sat, "05:59:59")), Some(1 << 20));
        assert_eq!(night.limit_at(at(Weekday::Sat, "06:00")), Some(2 << 20));
        // Friday morning belongs to a Thursday night, which is not in the window.
        assert_eq!(night.limit_at(at(Weekday::Fri, "01:00")), Some(2 << 20));
        assert_eq!(night.limit_at(at(Weekday::Sat, "22:30")), Some(2 << 20));
    }

    #[test]
    fn a_window_to_24_00_ends_at_midnight() {
        let evening = BandwidthSchedule {
            windows: vec![Window {
                days: vec![Weekday::Sun],
                from: "20:00".parse().expect("from"),
                to: "24:00".parse().expect("to"),
                limit: 5,
            }],
            otherwise: None,
        };
        assert_eq!(evening.limit_at(at(Weekday::Sun, "23:59:59")), Some(5));
        assert_eq!(evening.limit_at(at(Weekday::Mon, "00:00")), None);
    }

    #[test]
    fn the_first_matching_window_wins() {
        let mut schedule = office_hours();
        schedule.windows.push(Window {
            days: Weekday::ALL.to_vec(),
            from: "00:00".parse().expect("from"),
            to: "24:00".parse().expect("to"),
            limit: 7,
        });
        assert_eq!(schedule.limit_at(at(Weekday::Wed, "09:00")), Some(20 << 20));
        assert_eq!(schedule.limit_at(at(Weekday::Wed, "19:00")), Some(7));
    }

    #[test]
    fn local_time_wraps_days_and_the_week() {
        let late = at(Weekday::Sun, "23:59:50");
        assert_eq!(
            late.plus(Duration::from_secs(20)),
            at(Weekday::Mon, "00:00:10")
        );
        assert_eq!(late.plus(Duration::from_secs(7 * 86_400)), late);
        let clock = FakeClock::at(Weekday::Sat, "23:00");
        clock.advance(Duration::from_secs(3600));
        assert_eq!(clock.local(), at(Weekday::Sun, "00:00"));
        assert_eq!(clock.elapsed(), Duration::from_secs(3600));
    }

    #[test]
    fn the_host_clock_gives_a_time_of_day() {
        let now = local_now();
        assert!(now.secs < SECS_PER_DAY);
    }
}
