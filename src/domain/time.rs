//! Timestamps and calendar periods, computed from a time passed in (never read here).
//!
//! Budget periods are **calendar periods in UTC**: a day starts at 00:00 UTC, a week on
//! Monday 00:00 UTC (ISO 8601 weeks), a month on the 1st at 00:00 UTC. `all_time` never resets.

use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch (UTC).
pub type UnixSeconds = i64;

const DAY: i64 = 86_400;

/// A budget period.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Daily,
    Weekly,
    Monthly,
    AllTime,
}

impl Period {
    pub const ALL: [Period; 4] = [
        Period::Daily,
        Period::Weekly,
        Period::Monthly,
        Period::AllTime,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::AllTime => "all_time",
        }
    }

    /// Stable one-byte tag used in storage keys.
    pub fn tag(&self) -> u8 {
        match self {
            Period::Daily => 1,
            Period::Weekly => 2,
            Period::Monthly => 3,
            Period::AllTime => 4,
        }
    }

    /// Start of the period containing `t` (0 for `all_time`).
    pub fn bucket_start(&self, t: UnixSeconds) -> UnixSeconds {
        match self {
            Period::Daily => t.div_euclid(DAY) * DAY,
            Period::Weekly => {
                let days = t.div_euclid(DAY);
                // 1970-01-01 was a Thursday: Monday-based weekday = (days + 3) mod 7.
                (days - (days + 3).rem_euclid(7)) * DAY
            }
            Period::Monthly => {
                let (y, m, _) = civil_from_days(t.div_euclid(DAY));
                days_from_civil(y, m, 1) * DAY
            }
            Period::AllTime => 0,
        }
    }

    /// When the period containing `t` ends (`None` for `all_time`).
    pub fn resets_at(&self, t: UnixSeconds) -> Option<UnixSeconds> {
        match self {
            Period::Daily => Some(self.bucket_start(t) + DAY),
            Period::Weekly => Some(self.bucket_start(t) + 7 * DAY),
            Period::Monthly => {
                let (y, m, _) = civil_from_days(t.div_euclid(DAY));
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                Some(days_from_civil(ny, nm, 1) * DAY)
            }
            Period::AllTime => None,
        }
    }
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The (year, month, day) of a day number since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Formats a timestamp as RFC 3339 in UTC ("2026-11-22T08:18:11Z").
pub fn rfc3339(t: UnixSeconds) -> String {
    let (y, m, d) = civil_from_days(t.div_euclid(DAY));
    let s = t.rem_euclid(DAY);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        (s % 3600) / 60,
        s % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-22T08:18:11Z is a Sunday.
    const T: i64 = 1_795_335_491;

    #[test]
    fn civil_round_trip() {
        for z in [-800_000i64, -1, 0, 1, 59, 60, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(rfc3339(T), "2026-11-22T08:18:11Z");
    }

    #[test]
    fn calendar_buckets_in_utc() {
        assert_eq!(
            rfc3339(Period::Daily.bucket_start(T)),
            "2026-11-22T00:00:00Z"
        );
        assert_eq!(
            rfc3339(Period::Weekly.bucket_start(T)),
            "2026-11-16T00:00:00Z"
        );
        assert_eq!(
            rfc3339(Period::Monthly.bucket_start(T)),
            "2026-11-01T00:00:00Z"
        );
        assert_eq!(Period::AllTime.bucket_start(T), 0);
        assert_eq!(
            rfc3339(Period::Daily.resets_at(T).unwrap()),
            "2026-11-23T00:00:00Z"
        );
        assert_eq!(
            rfc3339(Period::Weekly.resets_at(T).unwrap()),
            "2026-11-23T00:00:00Z"
        );
        assert_eq!(
            rfc3339(Period::Monthly.resets_at(T).unwrap()),
            "2026-12-01T00:00:00Z"
        );
        let dec = days_from_civil(2026, 12, 31) * DAY + 5;
        assert_eq!(
            rfc3339(Period::Monthly.resets_at(dec).unwrap()),
            "2027-01-01T00:00:00Z"
        );
        // A Monday is the start of its own week.
        let monday = days_from_civil(2026, 11, 16) * DAY;
        assert_eq!(Period::Weekly.bucket_start(monday), monday);
        assert_eq!(Period::Weekly.bucket_start(monday - 1), monday - 7 * DAY);
    }
}
