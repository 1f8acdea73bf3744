//! Injected faults: random 429/500 answers, added latency and deterministic
//! "fail the next N matching requests" rules.

use std::time::Duration;

use http::StatusCode;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::FaultConfig;
use super::error::{ApiError, ErrorType};

/// Longest latency the control API accepts.
pub const MAX_LATENCY_MS: u64 = 600_000;

/// Fail the next `count` requests whose method and path match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailRule {
    /// HTTP status to answer with (400..=599).
    pub status: u16,
    /// Only paths starting with this (default: every `/v1` path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Only this method (default: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// How many requests to fail (default 1); counts down as it fires.
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

impl FailRule {
    fn matches(&self, method: &str, path: &str) -> bool {
        self.method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| path.starts_with(p))
    }
}

/// The JSON body of `GET`/`POST /_emulator/faults`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsDoc {
    #[serde(default)]
    pub rate_429: f64,
    #[serde(default)]
    pub rate_500: f64,
    #[serde(default)]
    pub latency_ms: u64,
    #[serde(default)]
    pub fail_next: Vec<FailRule>,
}

/// A fault document the control API refuses.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FaultsError {
    #[error("{0} must be a number between 0 and 1")]
    Rate(&'static str),
    #[error("latency_ms must be at most {MAX_LATENCY_MS}")]
    Latency,
    #[error("fail_next[{0}].status must be between 400 and 599")]
    Status(usize),
    #[error("fail_next[{0}].count must be at least 1")]
    Count(usize),
}

/// Current fault settings.
#[derive(Debug, Clone)]
pub struct FaultState {
    pub rate_429: f64,
    pub rate_500: f64,
    pub latency: Duration,
    pub fail_next: Vec<FailRule>,
}

impl FaultState {
    pub fn from_config(config: &FaultConfig) -> Self {
        Self {
            rate_429: sanitize_rate(config.rate_429),
            rate_500: sanitize_rate(config.rate_500),
            latency: config.latency,
            fail_next: Vec::new(),
        }
    }

    pub fn from_doc(doc: FaultsDoc) -> Result<Self, FaultsError> {
        let valid = |r: f64| r.is_finite() && (0.0..=1.0).contains(&r);
        if !valid(doc.rate_429) {
            return Err(FaultsError::Rate("rate_429"));
        }
        if !valid(doc.rate_500) {
            return Err(FaultsError::Rate("rate_500"));
        }
        if doc.latency_ms > MAX_LATENCY_MS {
            return Err(FaultsError::Latency);
        }
        for (i, rule) in doc.fail_next.iter().enumerate() {
            if !(400..=599).contains(&rule.status) {
                return Err(FaultsError::Status(i));
            }
            if rule.count == 0 {
                return Err(FaultsError::Count(i));
            }
        }
        Ok(Self {
            rate_429: doc.rate_429,
            rate_500: doc.rate_500,
            latency: Duration::from_millis(doc.latency_ms),
            fail_next: doc.fail_next,
        })
    }

    pub fn to_doc(&self) -> FaultsDoc {
        FaultsDoc {
            rate_429: self.rate_429,
            rate_500: self.rate_500,
            latency_ms: u64::try_from(self.latency.as_millis()).unwrap_or(u64::MAX),
            fail_next: self.fail_next.clone(),
        }
    }

    /// Decide whether this request fails: the first matching `fail_next` rule fires
    /// (and counts down), otherwise the random rates apply.
    pub fn draw(&mut self, method: &str, path: &str) -> Option<StatusCode> {
        if let Some(i) = self.fail_next.iter().position(|r| r.matches(method, path)) {
            let status = self.fail_next[i].status;
            self.fail_next[i].count -= 1;
            if self.fail_next[i].count == 0 {
                self.fail_next.remove(i);
            }
            return StatusCode::from_u16(status).ok();
        }
        let mut rng = rand::rng();
        if self.rate_429 > 0.0 && rng.random::<f64>() < self.rate_429 {
            return Some(StatusCode::TOO_MANY_REQUESTS);
        }
        if self.rate_500 > 0.0 && rng.random::<f64>() < self.rate_500 {
            return Some(StatusCode::INTERNAL_SERVER_ERROR);
        }
        None
    }
}

fn sanitize_rate(r: f64) -> f64 {
    if r.is_finite() {
        r.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// The error Stripe sends for `status`.
pub fn fault_error(status: StatusCode) -> ApiError {
    match status.as_u16() {
        429 => ApiError::new(
            status,
            ErrorType::InvalidRequestError,
            "Request rate limit exceeded. You can learn more about rate limits here https://stripe.com/docs/rate-limits.",
        )
        .with_code("rate_limit"),
        409 => ApiError::new(
            status,
            ErrorType::InvalidRequestError,
            "This object cannot be accessed right now because another API request or Stripe process is currently accessing it. If you see this error intermittently, retry the request.",
        )
        .with_code("lock_timeout"),
        s if s >= 500 => ApiError::new(
            status,
            ErrorType::ApiError,
            "An unknown error occurred (injected by the Stripe emulator).",
        ),
        _ => ApiError::new(
            status,
            ErrorType::InvalidRequestError,
            format!(
                "Injected fault: the Stripe emulator was told to answer this request with HTTP {}.",
                status.as_u16()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_next_counts_down_and_matches() {
        let doc: FaultsDoc = serde_json::from_str(
            r#"{"fail_next":[{"status":429,"path_prefix":"/v1/issuing/cards","method":"post","count":2}]}"#,
        )
        .expect("parses");
        let mut f = FaultState::from_doc(doc).expect("valid");
        assert_eq!(f.draw("GET", "/v1/issuing/cards"), None);
        assert_eq!(f.draw("POST", "/v1/issuing/cardholders"), None);
        assert_eq!(
            f.draw("POST", "/v1/issuing/cards"),
            Some(StatusCode::TOO_MANY_REQUESTS)
        );
        assert_eq!(f.to_doc().fail_next[0].count, 1);
        assert_eq!(
            f.draw("POST", "/v1/issuing/cards/ic_1"),
            Some(StatusCode::TOO_MANY_REQUESTS)
        );
        assert_eq!(f.draw("POST", "/v1/issuing/cards"), None);
        assert!(f.fail_next.is_empty());
    }

    #[test]
    fn rates_and_validation() {
        let always = FaultsDoc {
            rate_429: 0.0,
            rate_500: 1.0,
            latency_ms: 0,
            fail_next: vec![],
        };
        let mut f = FaultState::from_doc(always).expect("valid");
        assert_eq!(
            f.draw("GET", "/v1/x"),
            Some(StatusCode::INTERNAL_SERVER_ERROR)
        );
        let bad: FaultsDoc = serde_json::from_str(r#"{"rate_429": 1.5}"#).expect("parses");
        assert_eq!(
            FaultState::from_doc(bad).err(),
            Some(FaultsError::Rate("rate_429"))
        );
        let bad: FaultsDoc =
            serde_json::from_str(r#"{"fail_next":[{"status":200}]}"#).expect("parses");
        assert_eq!(
            FaultState::from_doc(bad).err(),
            Some(FaultsError::Status(0))
        );
        assert!(serde_json::from_str::<FaultsDoc>(r#"{"rate_4299": 1}"#).is_err());
        let cfg = FaultConfig {
            rate_429: f64::NAN,
            rate_500: 7.0,
            latency: Duration::ZERO,
        };
        let f = FaultState::from_config(&cfg);
        assert_eq!((f.rate_429, f.rate_500), (0.0, 1.0));
    }

    #[test]
    fn fault_bodies() {
        let e = fault_error(StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.code, Some("rate_limit"));
        assert_eq!(e.kind, ErrorType::InvalidRequestError);
        assert_eq!(
            fault_error(StatusCode::SERVICE_UNAVAILABLE).kind,
            ErrorType::ApiError
        );
    }
}
