//! Rate limiting of the agent-facing endpoints: a token bucket per authenticated agent key,
//! and one per source address for requests that do not authenticate.
//!
//! [`RateLimiter`] is a plain keyed token bucket (GCRA: one `u64` "theoretical arrival time"
//! per key, integer nanoseconds, updated with a compare-and-swap) in a bounded moka cache. A
//! bucket idle for longer than a full refill is evicted, which loses nothing: it would be full
//! again anyway. [`HttpLimiter`] puts two of them in front of an axum router: requests whose
//! bearer key authenticates are charged to that key's bucket (keyed by the key id, never the
//! key); every other request (no key, a wrong or revoked key) is charged to its source
//! address, so random keys cannot mint fresh buckets nor drain a real agent's. A refused
//! request is a `429` with `Retry-After` (whole seconds, at least 1) and the error body
//! `{"error": {"code": "rate_limited", "message": …}}`. `/healthz` is exempt.

use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::service::{AgentIdentity, Service};

/// Stable error code of a refused request.
pub const RATE_LIMITED: &str = "rate_limited";

/// Default sustained rate per agent key, requests per second.
pub const DEFAULT_AGENT_RATE: f64 = 20.0;
/// Default burst per agent key.
pub const DEFAULT_AGENT_BURST: u32 = 40;
/// Default sustained rate per source address for unauthenticated requests.
pub const DEFAULT_UNAUTHENTICATED_RATE: f64 = 5.0;
/// Default burst per source address for unauthenticated requests.
pub const DEFAULT_UNAUTHENTICATED_BURST: u32 = 10;
/// Most buckets kept per limiter; beyond it the least useful are evicted (they restart full).
pub const DEFAULT_MAX_BUCKETS: u64 = 100_000;

/// A monotonic clock, in nanoseconds since an arbitrary origin.
pub trait Clock: Send + Sync + 'static {
    fn now_nanos(&self) -> u64;
}

/// The process's monotonic clock.
#[derive(Debug)]
pub struct MonotonicClock {
    origin: std::time::Instant,
}

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock {
            origin: std::time::Instant::now(),
        }
    }
}

impl Clock for MonotonicClock {
    fn now_nanos(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.0.fetch_add(by, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_nanos(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A sustained rate and a burst. A rate or burst of 0 disables the limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limit {
    /// Tokens added per second (fractions allowed, e.g. 0.5 is one request every 2 s).
    pub rate_per_second: f64,
    /// Bucket size: requests that may be made at once after a quiet period.
    pub burst: u32,
}

impl Limit {
    pub const DISABLED: Limit = Limit {
        rate_per_second: 0.0,
        burst: 0,
    };

    pub fn new(rate_per_second: f64, burst: u32) -> Limit {
        Limit {
            rate_per_second,
            burst,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.rate_per_second.is_finite() && self.rate_per_second > 0.0 && self.burst > 0
    }

    /// Nanoseconds per token (at least 1).
    fn interval_nanos(&self) -> u64 {
        let ns = (1e9 / self.rate_per_second).round();
        if ns.is_finite() && ns >= 1.0 {
            // Saturating float-to-int conversion.
            ns as u64
        } else {
            1
        }
    }
}

/// How long to wait before the refused request would be allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds, rounded up, at least 1 (the `Retry-After` header value).
    pub fn seconds(&self) -> u64 {
        self.0.as_nanos().div_ceil(1_000_000_000).max(1) as u64
    }
}

/// A token bucket per key, with bounded memory.
pub struct RateLimiter<K> {
    /// Nanoseconds per token; `None` when disabled.
    interval: Option<u64>,
    /// Burst × interval: how far ahead of now a bucket's arrival time may run.
    tolerance: u64,
    buckets: moka::sync::Cache<K, Arc<AtomicU64>>,
    clock: Arc<dyn Clock>,
}

impl<K> std::fmt::Debug for RateLimiter<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("interval_nanos", &self.interval)
            .field("tolerance_nanos", &self.tolerance)
            .field("buckets", &self.buckets.entry_count())
            .finish()
    }
}

impl<K: Hash + Eq + Send + Sync + 'static> RateLimiter<K> {
    pub fn new(limit: Limit) -> Self {
        Self::with_clock(
            limit,
            DEFAULT_MAX_BUCKETS,
            Arc::new(MonotonicClock::default()),
        )
    }

    pub fn with_clock(limit: Limit, max_buckets: u64, clock: Arc<dyn Clock>) -> Self {
        let interval = limit.is_enabled().then(|| limit.interval_nanos());
        let tolerance = interval.unwrap_or(0).saturating_mul(u64::from(limit.burst));
        // A bucket untouched for a full refill is full again: evicting it loses nothing.
        let idle = Duration::from_nanos(tolerance).saturating_add(Duration::from_secs(1));
        RateLimiter {
            interval,
            tolerance,
            buckets: moka::sync::Cache::builder()
                .max_capacity(max_buckets)
                .time_to_idle(idle)
                .build(),
            clock,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.interval.is_some()
    }

    /// Whether `key`'s bucket has a token, without taking it.
    pub fn peek(&self, key: &K) -> Result<(), RetryAfter> {
        let Some(interval) = self.interval else {
            return Ok(());
        };
        let now = self.clock.now_nanos();
        let Some(cell) = self.buckets.get(key) else {
            return Ok(());
        };
        let next = cell
            .load(Ordering::Acquire)
            .max(now)
            .saturating_add(interval);
        let ahead = next - now;
        if ahead > self.tolerance {
            return Err(RetryAfter(Duration::from_nanos(ahead - self.tolerance)));
        }
        Ok(())
    }

    /// Refills `key`'s bucket (forgets it).
    pub fn reset(&self, key: &K) {
        self.buckets.invalidate(key);
    }

    /// Takes a token from `key`'s bucket, or says how long until one is available.
    pub fn check(&self, key: K) -> Result<(), RetryAfter> {
        let Some(interval) = self.interval else {
            return Ok(());
        };
        let now = self.clock.now_nanos();
        // A new bucket starts full: its arrival time is "now" (0 is never later than now).
        let cell = self.buckets.get_with(key, || Arc::new(AtomicU64::new(0)));
        let mut current = cell.load(Ordering::Acquire);
        loop {
            let next = current.max(now).saturating_add(interval);
            let ahead = next - now;
            if ahead > self.tolerance {
                return Err(RetryAfter(Duration::from_nanos(ahead - self.tolerance)));
            }
            match cell.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }
}

/// The limits of an HTTP app.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimitConfig {
    /// Per authenticated agent key.
    pub agent: Limit,
    /// Per source address, for requests without a valid agent key.
    pub unauthenticated: Limit,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            agent: Limit::new(DEFAULT_AGENT_RATE, DEFAULT_AGENT_BURST),
            unauthenticated: Limit::new(
                DEFAULT_UNAUTHENTICATED_RATE,
                DEFAULT_UNAUTHENTICATED_BURST,
            ),
        }
    }
}

impl RateLimitConfig {
    pub fn disabled() -> Self {
        RateLimitConfig {
            agent: Limit::DISABLED,
            unauthenticated: Limit::DISABLED,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.agent.is_enabled() || self.unauthenticated.is_enabled()
    }
}

/// Command-line flags of the limits (`roony sidecar`, `roony dev`).
#[derive(clap::Args, Debug, Clone)]
pub struct RateLimitArgs {
    /// Requests per second each agent key may make, sustained (0 disables the limit).
    #[arg(
        long,
        env = "ROONY_RATE_LIMIT_PER_SECOND",
        default_value_t = DEFAULT_AGENT_RATE,
        value_parser = parse_rate
    )]
    pub rate_limit_per_second: f64,
    /// Requests an agent key may make at once after a quiet period (0 disables the limit).
    #[arg(long, env = "ROONY_RATE_LIMIT_BURST", default_value_t = DEFAULT_AGENT_BURST)]
    pub rate_limit_burst: u32,
    /// Requests per second per source address without a valid agent key (0 disables).
    #[arg(
        long,
        env = "ROONY_UNAUTHENTICATED_RATE_LIMIT_PER_SECOND",
        default_value_t = DEFAULT_UNAUTHENTICATED_RATE,
        value_parser = parse_rate
    )]
    pub unauthenticated_rate_limit_per_second: f64,
    /// Burst per source address without a valid agent key (0 disables).
    #[arg(
        long,
        env = "ROONY_UNAUTHENTICATED_RATE_LIMIT_BURST",
        default_value_t = DEFAULT_UNAUTHENTICATED_BURST
    )]
    pub unauthenticated_rate_limit_burst: u32,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err("expected a number of requests per second, 0 or more".into()),
    }
}

impl RateLimitArgs {
    pub fn config(&self) -> RateLimitConfig {
        RateLimitConfig {
            agent: Limit::new(self.rate_limit_per_second, self.rate_limit_burst),
            unauthenticated: Limit::new(
                self.unauthenticated_rate_limit_per_second,
                self.unauthenticated_rate_limit_burst,
            ),
        }
    }
}

/// The proxies whose `X-Forwarded-For` is believed (`--trusted-proxies`): addresses or
/// CIDR blocks. Empty (the default): the TCP peer is the client, whatever headers say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// Parses `10.0.0.0/8, 127.0.0.1, fd00::/8` (commas or whitespace between entries).
    pub fn parse(list: &str) -> Result<TrustedProxies, String> {
        let mut out = Vec::new();
        for entry in list.split([',', ' ', '\n', '\t']).filter(|e| !e.is_empty()) {
            let (addr, len) = match entry.split_once('/') {
                Some((a, l)) => (a, Some(l)),
                None => (entry, None),
            };
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| format!("trusted proxy {entry:?} is not an address or CIDR block"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len =
                match len {
                    Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| {
                        format!("trusted proxy {entry:?} has a bad prefix length")
                    })?,
                    None => max,
                };
            out.push((ip.to_canonical(), len));
        }
        Ok(TrustedProxies(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|(net, len)| match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
                u32::from(*n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
                u128::from(*n) & mask == u128::from(a) & mask
            }
            _ => false,
        })
    }

    /// The client's address: the peer, or — when the peer is a trusted proxy — the
    /// right-most address of `X-Forwarded-For` that is not a trusted proxy (the left part
    /// of that header is whatever the client wrote).
    pub fn client_ip(&self, peer: IpAddr, headers: &axum::http::HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let forwarded: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok())
            .collect();
        forwarded
            .iter()
            .rev()
            .find(|a| !self.trusts(**a))
            .or(forwarded.first())
            .copied()
            .unwrap_or(peer)
    }
}

/// The bucket a source address is charged to: IPv4 addresses one by one, IPv6 by /64 (one
/// host usually holds a whole /64), IPv4-mapped IPv6 as IPv4.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// An agent the rate limiter already authenticated for this request (a request extension;
/// the API's and MCP's authentication use it instead of checking the key again).
#[derive(Clone, Debug)]
pub struct Authenticated(pub AgentIdentity);

/// The agent-facing limiter: per agent key and, for everything else, per source address.
#[derive(Clone, Debug)]
pub struct HttpLimiter {
    service: Service,
    agents: Arc<RateLimiter<String>>,
    addresses: Arc<RateLimiter<IpAddr>>,
}

impl HttpLimiter {
    pub fn new(service: Service, config: RateLimitConfig) -> Self {
        Self::with_clock(service, config, Arc::new(MonotonicClock::default()))
    }

    pub fn with_clock(service: Service, config: RateLimitConfig, clock: Arc<dyn Clock>) -> Self {
        HttpLimiter {
            service,
            agents: Arc::new(RateLimiter::with_clock(
                config.agent,
                DEFAULT_MAX_BUCKETS,
                clock.clone(),
            )),
            addresses: Arc::new(RateLimiter::with_clock(
                config.unauthenticated,
                DEFAULT_MAX_BUCKETS,
                clock,
            )),
        }
    }

    /// Wraps `router` (every route, including ones merged into it before) in the limiter. The
    /// server must provide `ConnectInfo<SocketAddr>` (as `crate::api::serve` does); without it
    /// all unauthenticated requests share one bucket.
    pub fn apply(self, router: axum::Router) -> axum::Router {
        if !(self.agents.is_enabled() || self.addresses.is_enabled()) {
            return router;
        }
        router.layer(axum::middleware::from_fn_with_state(self, limit))
    }

    /// Charges `req` to its bucket; on success, the authenticated agent is returned.
    fn charge(&self, req: &Request) -> Result<Option<AgentIdentity>, Refused> {
        let presented = crate::api::bearer(req.headers());
        match self.service.authenticate(presented) {
            Ok(agent) => {
                let key_id = crate::auth::key_id(presented.map(str::trim).unwrap_or_default());
                self.agents.check(key_id).map_err(Refused::Agent)?;
                Ok(Some(agent))
            }
            Err(_) => {
                let ip = req
                    .extensions()
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|c| c.0.ip())
                    .unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
                self.addresses
                    .check(address_key(ip))
                    .map_err(Refused::Address)?;
                Ok(None)
            }
        }
    }
}

enum Refused {
    Agent(RetryAfter),
    Address(RetryAfter),
}

/// Paths that are never limited: liveness probes must not fail under load.
const EXEMPT: &[&str] = &["/healthz"];

async fn limit(State(limiter): State<HttpLimiter>, mut req: Request, next: Next) -> Response {
    if EXEMPT.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    match limiter.charge(&req) {
        Ok(Some(agent)) => {
            req.extensions_mut().insert(Authenticated(agent));
            next.run(req).await
        }
        Ok(None) => next.run(req).await,
        Err(refused) => too_many_requests(refused),
    }
}

fn too_many_requests(refused: Refused) -> Response {
    let (retry, who) = match refused {
        Refused::Agent(r) => (r, "this agent key"),
        Refused::Address(r) => (r, "unauthenticated requests from this address"),
    };
    let seconds = retry.seconds();
    let mut resp = crate::api::ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        RATE_LIMITED,
        format!("too many requests for {who}; retry after {seconds} s"),
    )
    .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    resp
}

#[cfg(test)]
mod tests {
    #[test]
    fn trusted_proxies() {
        use super::TrustedProxies;
        use axum::http::{HeaderMap, HeaderValue};
        use std::net::IpAddr;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.7, 10.1.2.3"),
        );
        // Nobody trusted: the peer, whatever the header says.
        let none = TrustedProxies::default();
        assert_eq!(none.client_ip(ip("10.0.0.9"), &h), ip("10.0.0.9"));
        // The ingress (10.0.0.0/8) is trusted: the right-most untrusted address.
        let t = TrustedProxies::parse("10.0.0.0/8, ::1").unwrap();
        assert_eq!(t.client_ip(ip("10.0.0.9"), &h), ip("203.0.113.7"));
        // A peer outside the list is the client even with the header.
        assert_eq!(t.client_ip(ip("198.51.100.1"), &h), ip("198.51.100.1"));
        // IPv4-mapped peers match IPv4 blocks.
        assert_eq!(t.client_ip(ip("::ffff:10.0.0.9"), &h), ip("203.0.113.7"));
        // No header: the peer.
        assert_eq!(
            t.client_ip(ip("10.0.0.9"), &HeaderMap::new()),
            ip("10.0.0.9")
        );
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
        assert!(TrustedProxies::parse("proxy.example").is_err());
        assert_eq!(
            TrustedProxies::parse("").unwrap(),
            TrustedProxies::default()
        );
        let all4 = TrustedProxies::parse("0.0.0.0/0").unwrap();
        assert_eq!(all4.client_ip(ip("1.2.3.4"), &h), ip("6.6.6.6"));
    }

    use super::*;

    fn limiter(rate: f64, burst: u32) -> (RateLimiter<&'static str>, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::default());
        // Start away from the origin, as a real clock would be.
        clock.advance(Duration::from_secs(100));
        (
            RateLimiter::with_clock(Limit::new(rate, burst), 1_000, clock.clone()),
            clock,
        )
    }

    #[test]
    fn burst_then_refill_at_the_rate() {
        let (l, clock) = limiter(2.0, 3);
        for _ in 0..3 {
            assert_eq!(l.check("a"), Ok(()));
        }
        // One token every 500 ms.
        assert_eq!(l.check("a"), Err(RetryAfter(Duration::from_millis(500))));
        clock.advance(Duration::from_millis(499));
        assert_eq!(l.check("a"), Err(RetryAfter(Duration::from_millis(1))));
        clock.advance(Duration::from_millis(1));
        assert_eq!(l.check("a"), Ok(()));
        assert!(l.check("a").is_err());
        // A long pause refills to the burst, never beyond.
        clock.advance(Duration::from_secs(3600));
        for _ in 0..3 {
            assert_eq!(l.check("a"), Ok(()));
        }
        assert!(l.check("a").is_err());
    }

    #[test]
    fn refused_requests_cost_nothing() {
        let (l, clock) = limiter(1.0, 1);
        assert!(l.check("a").is_ok());
        for _ in 0..100 {
            assert_eq!(l.check("a"), Err(RetryAfter(Duration::from_secs(1))));
        }
        clock.advance(Duration::from_secs(1));
        assert!(l.check("a").is_ok());
    }

    #[test]
    fn keys_are_independent() {
        let (l, _clock) = limiter(1.0, 2);
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_err());
        assert!(l.check("b").is_ok());
        assert!(l.check("b").is_ok());
        assert!(l.check("b").is_err());
    }

    #[test]
    fn fractional_rates_and_retry_after_seconds() {
        let (l, _clock) = limiter(0.25, 1);
        assert!(l.check("a").is_ok());
        let retry = l.check("a").unwrap_err();
        assert_eq!(retry, RetryAfter(Duration::from_secs(4)));
        assert_eq!(retry.seconds(), 4);
        assert_eq!(RetryAfter(Duration::from_millis(1)).seconds(), 1);
        assert_eq!(RetryAfter(Duration::ZERO).seconds(), 1);
        assert_eq!(RetryAfter(Duration::from_millis(1001)).seconds(), 2);
    }

    #[test]
    fn disabled_limits_allow_everything() {
        for limit in [Limit::DISABLED, Limit::new(0.0, 10), Limit::new(10.0, 0)] {
            let l: RateLimiter<&str> =
                RateLimiter::with_clock(limit, 10, Arc::new(ManualClock::default()));
            assert!(!l.is_enabled());
            for _ in 0..1_000 {
                assert!(l.check("a").is_ok());
            }
        }
    }

    #[test]
    fn concurrent_checks_never_exceed_the_burst() {
        let (l, _clock) = limiter(1.0, 50);
        let l = Arc::new(l);
        let allowed = Arc::new(AtomicU64::new(0));
        std::thread::scope(|s| {
            for _ in 0..4 {
                let (l, allowed) = (l.clone(), allowed.clone());
                s.spawn(move || {
                    for _ in 0..100 {
                        if l.check("a").is_ok() {
                            allowed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        assert_eq!(allowed.load(Ordering::SeqCst), 50);
    }

    #[test]
    fn rates_on_the_command_line() {
        assert_eq!(parse_rate("0"), Ok(0.0));
        assert_eq!(parse_rate(" 0.5 "), Ok(0.5));
        for bad in ["-1", "NaN", "inf", "fast"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn addresses_group_ipv6_by_64() {
        let a: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(address_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }
}
