//! Object ids, request ids and the clock.

use rand::Rng;
use rand::distr::Alphanumeric;

/// `{prefix}` followed by `len` random alphanumerics, e.g. `ic_1PgAg5…`.
pub fn random_id(prefix: &str, len: usize) -> String {
    let mut id = String::with_capacity(prefix.len() + len);
    id.push_str(prefix);
    id.extend(
        rand::rng()
            .sample_iter(&Alphanumeric)
            .take(len)
            .map(char::from),
    );
    id
}

/// A Stripe-looking object id (`ich_`, `ic_`, …).
pub fn object_id(prefix: &str) -> String {
    random_id(prefix, 24)
}

/// `n` random decimal digits (authorization codes).
pub fn random_digits(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
        .collect()
}

/// A `Request-Id` header value.
pub fn request_id() -> String {
    random_id("req_", 14)
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// (year, month 1..=12) of a Unix timestamp, UTC.
pub fn year_month(unix: i64) -> (i64, i64) {
    // Howard Hinnant's days-to-civil algorithm.
    let z = unix.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month)
}

/// (year, month, day) of a Unix timestamp, UTC.
pub fn ymd(unix: i64) -> (i64, i64, i64) {
    let z = unix.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Unix timestamp of 00:00 UTC on the given civil date.
pub fn unix_of(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468) * 86_400
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_round_trip() {
        for t in [0_i64, 951_782_400, 1_721_948_548, 1_735_689_599] {
            let (y, m, d) = ymd(t);
            let start = unix_of(y, m, d);
            assert!(start <= t && t - start < 86_400, "{t}");
            assert_eq!(year_month(t), (y, m));
        }
        assert_eq!(ymd(951_782_400), (2000, 2, 29));
    }

    use super::*;

    #[test]
    fn ids_have_prefix_and_length() {
        let id = object_id("ic_");
        assert!(id.starts_with("ic_"));
        assert_eq!(id.len(), 27);
        assert!(id[3..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(object_id("ic_"), object_id("ic_"));
        assert_eq!(request_id().len(), 18);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(year_month(0), (1970, 1));
        assert_eq!(year_month(951_782_400), (2000, 2)); // 2000-02-29
        assert_eq!(year_month(1_721_948_548), (2024, 7));
        assert_eq!(year_month(1_735_689_599), (2024, 12)); // 2024-12-31T23:59:59
        assert_eq!(year_month(1_735_689_600), (2025, 1));
    }
}
