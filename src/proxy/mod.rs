//! The card-vault egress proxy (pingora): the agent sends its outbound requests through the
//! sidecar; placeholders of its vault cards (`{{roony:card:<intent>:number}}`, …) in headers
//! and bodies are replaced with the real card data only when the destination is the
//! intent's merchant and the intent is still approved. Everything else is refused before
//! anything is forwarded. Only this module knows pingora; decisions come from `service`.
//!
//! Two request forms:
//! - forward proxy, plain HTTP: `POST http://shop.example/checkout` (absolute URI);
//! - explicit upstream: an origin-form request with `X-Roony-Upstream: https://shop.example`
//!   (TLS to the merchant via rustls: system roots plus an optional extra CA).
//!
//! Both authenticate with `Proxy-Authorization: Bearer <agent key>` (removed before
//! forwarding).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::services::Service as _;

use crate::ratelimit::{RateLimitConfig, RateLimiter};
use crate::service::vault::{self, VaultCard};
use crate::service::{AgentIdentity, EgressRefusal, Service};

/// Default listen address of the proxy.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8789";
/// Largest request body the proxy buffers (pingora's retry buffer): larger bodies get 413.
pub const MAX_REQUEST_BODY: usize = 64 * 1024;
/// Largest response body streamed back to the agent; the response is cut beyond it.
pub const MAX_RESPONSE_BODY: usize = 10 * 1024 * 1024;
/// The explicit-upstream header.
pub const UPSTREAM_HEADER: &str = "x-roony-upstream";

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// A PEM file of extra CA certificates to trust for upstream TLS (besides the system's).
    pub extra_ca: Option<PathBuf>,
    /// Host → address overrides (tests, pinned merchants): `shop.test` → `127.0.0.1:4443`.
    pub resolve: HashMap<String, SocketAddr>,
    pub rate_limits: RateLimitConfig,
}

impl ProxyConfig {
    pub fn new(listen: SocketAddr) -> ProxyConfig {
        ProxyConfig {
            listen,
            extra_ca: None,
            resolve: HashMap::new(),
            rate_limits: RateLimitConfig::disabled(),
        }
    }
}

/// Parses a `host=ip:port` override.
pub fn parse_resolve(s: &str) -> Result<(String, SocketAddr), String> {
    let (host, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("expected host=ip:port, got {s:?}"))?;
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| format!("invalid address in {s:?}: {e}"))?;
    Ok((vault::normalize_host(host), addr))
}

/// A running proxy; dropping `shutdown` (or sending `true`) stops it.
pub struct RunningProxy {
    pub addr: SocketAddr,
    pub shutdown: tokio::sync::watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds and serves the proxy on the current tokio runtime.
pub async fn start(service: Service, config: ProxyConfig) -> Result<RunningProxy, String> {
    // Check the address first: pingora panics in its task when it cannot bind. With port
    // 0, pick the free port here.
    let probe = std::net::TcpListener::bind(config.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = probe
        .local_addr()
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    drop(probe);
    // pingora logs request headers (hence substituted card data) at debug and trace level
    // through the `log` crate: cap it at info, whatever the tracing filter says.
    log::set_max_level(log::max_level().min(log::LevelFilter::Info));
    let mut conf = ServerConf::default();
    if let Some(ca) = &config.extra_ca {
        if !ca.is_file() {
            return Err(format!("proxy extra CA {} is not a file", ca.display()));
        }
        conf.ca_file = Some(ca.display().to_string());
    }
    let conf = Arc::new(conf);
    let app = VaultProxy {
        service,
        resolve: config.resolve,
        agent_limiter: RateLimiter::new(config.rate_limits.agent),
        addr_limiter: RateLimiter::new(config.rate_limits.unauthenticated),
    };
    let mut svc = pingora::proxy::http_proxy_service_with_name(&conf, app, "roony-vault-proxy");
    svc.add_tcp(&addr.to_string());
    let (tx, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        svc.start_service(None, rx, 1).await;
    });
    // Wait until it accepts connections.
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(RunningProxy {
        addr,
        shutdown: tx,
        task,
    })
}

struct VaultProxy {
    service: Service,
    resolve: HashMap<String, SocketAddr>,
    agent_limiter: RateLimiter<String>,
    addr_limiter: RateLimiter<IpAddr>,
}

/// Where a request goes.
#[derive(Clone, Debug)]
struct Target {
    host: String,
    port: u16,
    tls: bool,
    addr: SocketAddr,
    /// Origin-form path and query.
    path: String,
}

#[derive(Default)]
pub struct Ctx {
    target: Option<Target>,
    /// Rewritten header values by name.
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    body: Option<Bytes>,
    body_sent: bool,
    response_bytes: usize,
}

/// A refusal: status, stable code, message.
#[derive(Debug)]
struct Refusal {
    status: u16,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<EgressRefusal> for Refusal {
    fn from(r: EgressRefusal) -> Refusal {
        Refusal::new(403, r.code(), r.message())
    }
}

/// The error body: `{"error":{"code","message"}}`.
pub fn error_body(code: &str, message: &str) -> Vec<u8> {
    serde_json::json!({"error": {"code": code, "message": message}})
        .to_string()
        .into_bytes()
}

fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Parses the destination from an absolute URI or the explicit-upstream header: (tls, host,
/// port, origin-form path).
fn destination(
    uri: &http::Uri,
    upstream: Option<&str>,
) -> Result<(bool, String, u16, String), Refusal> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let path = if path.starts_with('/') {
        path
    } else {
        "/".to_string()
    };
    let (scheme, authority) = match upstream {
        Some(u) => {
            let u: http::Uri = u.trim().parse().map_err(|_| {
                Refusal::new(
                    400,
                    "invalid_upstream",
                    "X-Roony-Upstream must be an origin such as https://shop.example",
                )
            })?;
            (
                u.scheme_str().map(str::to_ascii_lowercase),
                u.authority().cloned(),
            )
        }
        None => (
            uri.scheme_str().map(str::to_ascii_lowercase),
            uri.authority().cloned(),
        ),
    };
    let tls = match scheme.as_deref() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(Refusal::new(
                400,
                "invalid_destination",
                "send an absolute http:// URI (forward proxy) or name the origin in X-Roony-Upstream",
            ));
        }
    };
    let authority = authority
        .ok_or_else(|| Refusal::new(400, "invalid_destination", "the destination has no host"))?;
    let host = vault::normalize_host(authority.host());
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok((tls, host, port, path))
}

/// Hop-by-hop and proxy headers never forwarded.
const STRIPPED: &[&str] = &[
    "proxy-authorization",
    "proxy-connection",
    UPSTREAM_HEADER,
    "content-length",
    "transfer-encoding",
];

impl VaultProxy {
    async fn prepare(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> Result<AgentIdentity, Refusal> {
        let peer_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let req = session.req_header();
        let presented = req
            .headers
            .get("proxy-authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .map(str::to_string);
        let agent = match self.service.authenticate(presented.as_deref()) {
            Ok(a) => a,
            Err(e) => {
                if let Some(ip) = peer_ip
                    && self
                        .addr_limiter
                        .check(crate::ratelimit::address_key(ip))
                        .is_err()
                {
                    return Err(Refusal::new(429, "rate_limited", "too many requests"));
                }
                return Err(Refusal::new(
                    407,
                    "proxy_authentication_required",
                    format!("{e}: send Proxy-Authorization: Bearer <agent key>"),
                ));
            }
        };
        if self.agent_limiter.check(agent.agent_id.clone()).is_err() {
            return Err(Refusal::new(429, "rate_limited", "too many requests"));
        }
        if req.method == http::Method::CONNECT {
            return Err(Refusal::new(
                405,
                "connect_not_supported",
                "CONNECT tunnels cannot be inspected; send the request in plain HTTP with X-Roony-Upstream: https://<merchant> instead",
            ));
        }
        let upstream = req
            .headers
            .get(UPSTREAM_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // pingora keeps an absolute-form target in the raw path.
        let uri = match req.uri.scheme() {
            Some(_) => req.uri.clone(),
            None => http::Uri::try_from(req.raw_path()).unwrap_or_else(|_| req.uri.clone()),
        };
        let (tls, host, port, path) = destination(&uri, upstream.as_deref())?;

        // The whole body, bounded, before anything is decided or forwarded.
        session.enable_retry_buffering();
        let mut body = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_REQUEST_BODY {
                        return Err(Refusal::new(
                            413,
                            "body_too_large",
                            format!("request bodies are limited to {MAX_REQUEST_BODY} bytes"),
                        ));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(_) => {
                    return Err(Refusal::new(
                        400,
                        "bad_request",
                        "cannot read the request body",
                    ));
                }
            }
        }

        let req = session.req_header();
        let headers: Vec<(http::HeaderName, Vec<u8>)> = req
            .headers
            .iter()
            .filter(|(n, _)| !STRIPPED.contains(&n.as_str()))
            .map(|(n, v)| (n.clone(), v.as_bytes().to_vec()))
            .collect();

        // A raw number of a vault card anywhere: blocked, whatever the destination.
        let vault = self.service.vault();
        let uri_bytes = req.uri.to_string().into_bytes();
        let raw = std::iter::once(body.as_slice())
            .chain(std::iter::once(uri_bytes.as_slice()))
            .chain(headers.iter().map(|(_, v)| v.as_slice()))
            .flat_map(vault::card_numbers)
            .any(|n| vault.holds_number(&n));
        if raw {
            return Err(EgressRefusal::RawCardNumber.into());
        }

        // Every placeholder must be the agent's, active, and for this host.
        let mut ids: Vec<String> = std::iter::once(body.as_slice())
            .chain(headers.iter().map(|(_, v)| v.as_slice()))
            .chain(std::iter::once(uri_bytes.as_slice()))
            .flat_map(vault::find_placeholders)
            .map(|f| f.intent_id)
            .collect();
        ids.sort();
        ids.dedup();
        let mut cards: HashMap<String, Arc<VaultCard>> = HashMap::new();
        for id in ids {
            let card = self.service.egress_card(&agent, &id, &host).await?;
            cards.insert(id, card);
        }
        if cards.is_empty()
            && !vault.agent_may_reach(&agent.agent_id, &host, self.service.clock_now())
        {
            return Err(EgressRefusal::DestinationNotAllowed.into());
        }

        let value = |f: &vault::Found| cards.get(&f.intent_id).map(|c| c.value(f.field));
        let body = vault::substitute(&body, value);
        let mut rewritten = Vec::new();
        for (name, v) in headers {
            let v = vault::substitute(&v, value);
            let mut v = http::HeaderValue::from_bytes(&v)
                .map_err(|_| Refusal::new(400, "bad_request", "invalid header value"))?;
            // Redacted in any `Debug` output.
            v.set_sensitive(true);
            rewritten.push((name, v));
        }

        let addr = match self.resolve.get(&host) {
            Some(a) => *a,
            None => tokio::net::lookup_host((host.as_str(), port))
                .await
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| {
                    Refusal::new(
                        502,
                        "upstream_unresolvable",
                        "cannot resolve the destination",
                    )
                })?,
        };
        ctx.target = Some(Target {
            host,
            port,
            tls,
            addr,
            path,
        });
        ctx.headers = rewritten;
        ctx.body = Some(Bytes::from(body));
        Ok(agent)
    }
}

/// Appends a proxy outcome to the sidecar's hash-chained audit log (no headers, no body, no
/// card data: the host, the outcome and the refusal code only).
async fn audit(
    key_id: Option<String>,
    action: &str,
    host: &str,
    outcome: &str,
    details: serde_json::Value,
) {
    let Some(log) = crate::audit::http::process_log() else {
        return;
    };
    let entry = crate::audit::Entry {
        id: crate::service::ids::new_id("aud"),
        at: crate::audit::http::unix_now(),
        actor_type: if key_id.is_some() {
            "agent".into()
        } else {
            "anonymous".into()
        },
        actor_id: key_id.unwrap_or_default(),
        action: action.to_string(),
        target_type: "host".into(),
        target_id: host.to_string(),
        outcome: outcome.to_string(),
        request_id: None,
        details,
    };
    if let Err(e) = log.append(entry).await {
        tracing::error!(error = %e, "cannot record the egress audit event");
    }
}

async fn respond(session: &mut Session, r: &Refusal) -> pingora::Result<()> {
    let body = error_body(r.code, &r.message);
    let mut h = ResponseHeader::build(r.status, Some(3))?;
    h.insert_header("content-type", "application/json")?;
    h.insert_header("content-length", body.len().to_string())?;
    if r.status == 407 {
        h.insert_header("proxy-authenticate", "Bearer realm=\"roony\"")?;
    }
    session.write_response_header(Box::new(h), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await
}

#[async_trait]
impl ProxyHttp for VaultProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        // Who asked, by key id (never the key), for the audit event.
        let key_id = session
            .req_header()
            .headers
            .get("proxy-authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .map(crate::auth::key_id);
        match self.prepare(session, ctx).await {
            Ok(agent) => {
                if let Some(t) = &ctx.target {
                    tracing::debug!(agent = %agent.agent_id, host = %t.host, "egress forwarded");
                    audit(
                        key_id,
                        "egress.forwarded",
                        &t.host,
                        "success",
                        serde_json::json!({"agent_id": agent.agent_id}),
                    )
                    .await;
                }
                Ok(false)
            }
            Err(r) => {
                audit(
                    key_id,
                    "egress.refused",
                    ctx.target.as_ref().map_or("", |t| t.host.as_str()),
                    "failure",
                    serde_json::json!({"code": r.code, "status": r.status}),
                )
                .await;
                // Audit event (redacted: no headers, no body, no card data).
                let host = ctx.target.as_ref().map(|t| t.host.clone());
                tracing::warn!(
                    target: "roony::audit",
                    action = "egress.refused",
                    code = r.code,
                    status = r.status,
                    host = ?host,
                    "egress proxy refused a request"
                );
                respond(session, &r).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Ctx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let t = ctx.target.as_ref().ok_or_else(|| {
            pingora::Error::explain(pingora::ErrorType::InternalError, "no destination")
        })?;
        let mut peer = HttpPeer::new(t.addr, t.tls, t.host.clone());
        peer.options.connection_timeout = Some(Duration::from_secs(10));
        peer.options.read_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        let Some(t) = ctx.target.as_ref() else {
            return Err(pingora::Error::explain(
                pingora::ErrorType::InternalError,
                "no destination",
            ));
        };
        let uri: http::Uri = t.path.parse().map_err(|_| {
            pingora::Error::explain(pingora::ErrorType::InternalError, "invalid path")
        })?;
        upstream.set_uri(uri);
        let names: Vec<http::HeaderName> = upstream.headers.keys().cloned().collect();
        for n in names {
            upstream.remove_header(&n);
        }
        for (n, v) in ctx.headers.drain(..) {
            upstream.append_header(n, v)?;
        }
        let default_port = if t.tls { 443 } else { 80 };
        let host = if t.port == default_port {
            t.host.clone()
        } else {
            format!("{}:{}", t.host, t.port)
        };
        upstream.insert_header("host", host)?;
        let len = ctx.body.as_ref().map_or(0, |b| b.len());
        if len > 0 || upstream.method != http::Method::GET {
            upstream.insert_header("content-length", len.to_string())?;
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        // The (rewritten) body was read whole in `request_filter`: send it once, at the end.
        if end_of_stream && !ctx.body_sent {
            ctx.body_sent = true;
            *body = ctx.body.take().filter(|b| !b.is_empty());
        } else {
            *body = None;
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> pingora::Result<Option<Duration>> {
        if let Some(b) = body {
            ctx.response_bytes += b.len();
            if ctx.response_bytes > MAX_RESPONSE_BODY {
                return Err(pingora::Error::explain(
                    pingora::ErrorType::InternalError,
                    "response body too large",
                ));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_destinations() {
        let uri: http::Uri = "http://Shop.Test:8080/pay?x=1".parse().unwrap_or_default();
        let d = destination(&uri, None).map_err(|r| r.code);
        assert_eq!(d, Ok((false, "shop.test".into(), 8080, "/pay?x=1".into())));
        let uri: http::Uri = "/checkout".parse().unwrap_or_default();
        let d = destination(&uri, Some("https://shop.test")).map_err(|r| r.code);
        assert_eq!(d, Ok((true, "shop.test".into(), 443, "/checkout".into())));
        assert_eq!(
            destination(&uri, None).map_err(|r| r.code),
            Err("invalid_destination")
        );
        assert_eq!(
            destination(&uri, Some("ftp://x")).map_err(|r| r.code),
            Err("invalid_destination")
        );
        assert_eq!(bearer("Bearer abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(
            parse_resolve("Shop.test=127.0.0.1:4443"),
            Ok((
                "shop.test".to_string(),
                "127.0.0.1:4443".parse().unwrap_or_else(|_| unreachable!())
            ))
        );
    }
}
