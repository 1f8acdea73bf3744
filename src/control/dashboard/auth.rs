//! Sign-in for the dashboard: argon2id passwords, sessions in an HttpOnly SameSite=Lax
//! cookie (Secure unless the dashboard is reached over plain HTTP on a loopback address),
//! a CSRF token on every state-changing form, roles, and rate-limited sign-in.
//!
//! Why `Lax` and not `Strict`: Stripe's OAuth redirect back to `/stripe/callback` is a
//! cross-site navigation, and so is a link to the dashboard from e-mail or chat; a Strict
//! cookie is not sent on those, so the callback would land on the sign-in page and its
//! `state` (bound to the session) could never match. Lax cookies travel only on top-level
//! `GET` navigations from other sites, and no `GET` changes anything: every change is a
//! `POST` carrying the CSRF token (and an `Origin` check), and the OAuth callback is
//! protected by its single-use `state`. Framing is refused (`frame-ancestors 'none'`).
//!
//! - The session cookie holds a 256-bit secret `roony_ss_<64 hex>`. The database stores
//!   its SHA-256 and a public id derived from it (`crate::auth::key_id`), which audit
//!   events name. Sessions expire after [`IDLE_SECONDS`] without use and after
//!   [`ABSOLUTE_SECONDS`] in any case; sign-out, a password change and disabling the user
//!   end them.
//! - The CSRF token is SHA-256 of the session secret under a label: a page can embed it,
//!   another site cannot compute it. [`Mutation`] checks it (constant time) together with
//!   the `admin` role and, when the browser sends one, that `Origin` is this host. The
//!   sign-in form itself uses a double-submit cookie.
//! - Sign-in attempts are limited per source address and per email address (GCRA, see
//!   `crate::ratelimit`); a wrong email and a wrong password look the same and cost the
//!   same (an argon2 verification against a dummy hash).

use std::net::SocketAddr;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{DashState, PageError};
use crate::control::db::admin_users::{AdminUser, Role, user_actor};
use crate::control::db::{Actor, ControlDb};

/// Session cookie name.
pub const SESSION_COOKIE: &str = "roony_session";
/// Double-submit cookie of the sign-in form.
pub const LOGIN_CSRF_COOKIE: &str = "roony_login_csrf";
/// Name of the hidden CSRF field of every form.
pub const CSRF_FIELD: &str = "_csrf";
/// A session ends after this long without a request.
pub const IDLE_SECONDS: i64 = 8 * 3600;
/// A session ends this long after sign-in whatever happens.
pub const ABSOLUTE_SECONDS: i64 = 7 * 24 * 3600;
/// Shortest password accepted.
pub const MIN_PASSWORD_LEN: usize = 12;
const SESSION_PREFIX: &str = "roony_ss_";

/// argon2id with the crate's defaults (19 MiB, 2 passes, 1 lane: OWASP's baseline).
pub fn hash_password(password: &str) -> Result<String, PasswordError> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|_| PasswordError::Hash)?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|_| PasswordError::Hash)
}

/// Whether `password` matches the PHC string `stored`. A malformed stored hash never matches.
pub fn verify_password(password: &str, stored: &str) -> bool {
    match PasswordHash::new(stored) {
        Ok(parsed) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Checks a new password; the message says what is wrong.
pub fn check_new_password(password: &str) -> Result<(), PasswordError> {
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(PasswordError::TooShort);
    }
    if password.len() > 1024 {
        return Err(PasswordError::TooLong);
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    #[error("the password must be at least {MIN_PASSWORD_LEN} characters")]
    TooShort,
    #[error("the password must be at most 1024 bytes")]
    TooLong,
    #[error("the password could not be hashed")]
    Hash,
}

impl PasswordError {
    pub fn code(self) -> &'static str {
        match self {
            PasswordError::TooShort => "password_too_short",
            PasswordError::TooLong => "password_too_long",
            PasswordError::Hash => "internal_error",
        }
    }
}

/// A dummy hash verified when the email is unknown, so both failures cost the same.
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("roony-dummy-password").unwrap_or_default())
}

/// A fresh session secret.
pub fn new_session_token() -> String {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    format!("{SESSION_PREFIX}{}", hex::encode(secret))
}

/// The CSRF token of a session secret.
pub fn csrf_token(session_token: &str) -> String {
    let digest = Sha256::digest([b"roony-csrf:".as_slice(), session_token.as_bytes()].concat());
    hex::encode(digest)
}

/// A random value for the sign-in form's double-submit cookie.
pub fn new_login_nonce() -> String {
    let mut n = [0u8; 16];
    rand::rng().fill_bytes(&mut n);
    hex::encode(n)
}

pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The value of cookie `name` in the request.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Whether cookies set for this request should be `Secure`: always, except for plain HTTP
/// to a loopback address (`roony dev`, tests), where browsers would not send them back.
pub fn secure_cookies(headers: &HeaderMap) -> bool {
    let forwarded_https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    if forwarded_https {
        return true;
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    !is_loopback_host(host)
}

/// Whether the request probably came over plain HTTP to a non-loopback address: cookies
/// are `Secure` there, and a browser on plain HTTP drops them, so sign-in cannot work.
/// (Behind a TLS-terminating proxy, `X-Forwarded-Proto` says so.)
pub fn plain_http_remote(headers: &HeaderMap) -> bool {
    let proto = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok());
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    proto.is_none() && !host.is_empty() && !is_loopback_host(host)
}

fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A `Set-Cookie` value (`HttpOnly; SameSite=Lax`, see the module's documentation).
pub fn set_cookie(name: &str, value: &str, max_age: Option<i64>, secure: bool) -> HeaderValue {
    let mut s = format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax");
    if let Some(age) = max_age {
        s.push_str(&format!("; Max-Age={age}"));
    }
    if secure {
        s.push_str("; Secure");
    }
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("invalid=; Max-Age=0"))
}

/// A signed-in user (any role): the extractor of every dashboard page. Without a valid
/// session a page redirects to the sign-in form.
#[derive(Clone, Debug)]
pub struct Session {
    pub id: String,
    pub user: AdminUser,
    /// The CSRF token forms of this session carry.
    pub csrf: String,
    /// The request's id (`x-request-id`), for audit events.
    pub request_id: Option<String>,
}

impl Session {
    pub fn is_admin(&self) -> bool {
        self.user.role == Role::Admin
    }

    /// The audit actor of this user.
    pub fn actor(&self) -> Actor {
        user_actor(&self.user, self.request_id.clone())
    }

    /// `403 forbidden` unless the user is an admin.
    pub fn require_admin(&self) -> Result<(), PageError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(PageError::forbidden())
        }
    }
}

pub(crate) fn unix_now() -> i64 {
    crate::control::unix_now()
}

/// Looks up the session of the request's cookie.
pub async fn session_of(
    db: &ControlDb,
    headers: &HeaderMap,
    now: i64,
) -> Result<Option<Session>, PageError> {
    let Some(token) = cookie(headers, SESSION_COOKIE).filter(|t| t.starts_with(SESSION_PREFIX))
    else {
        return Ok(None);
    };
    let id = crate::auth::key_id(&token);
    let Some(record) = db.find_admin_session(&id, now).await? else {
        return Ok(None);
    };
    if !crate::auth::verify(&token, &record.token_hash)
        || now >= record.created_at.saturating_add(ABSOLUTE_SECONDS)
    {
        return Ok(None);
    }
    if now.saturating_sub(record.last_seen_at) >= 60 {
        // Informational: a failed write does not refuse the request.
        if let Err(e) = db
            .touch_admin_session(&id, now.saturating_add(IDLE_SECONDS), now)
            .await
        {
            tracing::warn!(error = %e, "could not extend a dashboard session");
        }
    }
    let request_id = headers
        .get(crate::audit::http::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok(Some(Session {
        id,
        user: record.user,
        csrf: csrf_token(&token),
        request_id,
    }))
}

impl FromRequestParts<DashState> for Session {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, state: &DashState) -> Result<Self, PageError> {
        match session_of(&state.db, &parts.headers, unix_now()).await? {
            Some(mut s) => {
                // The request id the audit middleware assigned (the client's when acceptable).
                if let Some(id) = parts.extensions.get::<crate::audit::http::RequestId>() {
                    s.request_id = Some(id.0.clone());
                }
                Ok(s)
            }
            None => {
                let next = parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_else(|| "/".into());
                Err(PageError::SignIn { next })
            }
        }
    }
}

/// A state-changing form submission: a signed-in **admin**, a valid CSRF token, an
/// acceptable `Origin`, and the form `T` (urlencoded).
#[derive(Debug)]
pub struct Mutation<T> {
    pub session: Session,
    pub form: T,
}

#[derive(serde::Deserialize)]
struct CsrfOnly {
    #[serde(rename = "_csrf")]
    csrf: Option<String>,
}

/// Largest form body accepted.
pub const MAX_FORM_BYTES: usize = 256 * 1024;

/// Like [`Mutation`] but for any signed-in role: what a user may do to their own account
/// (change their password, sign out).
#[derive(Debug)]
pub struct OwnMutation<T> {
    pub session: Session,
    pub form: T,
}

async fn checked_form<T: serde::de::DeserializeOwned>(
    req: Request,
    state: &DashState,
    admin_only: bool,
) -> Result<(Session, T), PageError> {
    let (mut parts, body) = req.into_parts();
    let session = Session::from_request_parts(&mut parts, state).await?;
    if !origin_matches(&parts.headers) {
        return Err(PageError::csrf());
    }
    let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|_| PageError::bad_request("form_too_large", "the form is too large"))?;
    let csrf = serde_urlencoded::from_bytes::<CsrfOnly>(&bytes)
        .ok()
        .and_then(|c| c.csrf)
        .unwrap_or_default();
    if !constant_time_eq(&csrf, &session.csrf) {
        return Err(PageError::csrf());
    }
    if admin_only {
        session.require_admin()?;
    }
    // No field may carry a control character other than a line break or a tab (a NUL
    // would be refused by PostgreSQL and stored by SQLite).
    let pairs = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes).map_err(|e| {
        PageError::bad_request("invalid_form", &format!("the form is not valid: {e}"))
    })?;
    if pairs.iter().any(|(k, v)| {
        crate::control::guard::has_control(k) || crate::control::guard::text_has_control(v)
    }) {
        return Err(PageError::bad_request(
            crate::control::guard::CODE,
            "the form contains control characters (such as NUL); remove them",
        ));
    }
    let form = serde_urlencoded::from_bytes::<T>(&bytes).map_err(|e| {
        PageError::bad_request("invalid_form", &format!("the form is not valid: {e}"))
    })?;
    Ok((session, form))
}

impl<T> FromRequest<DashState> for Mutation<T>
where
    T: serde::de::DeserializeOwned + Send,
{
    type Rejection = PageError;

    async fn from_request(req: Request, state: &DashState) -> Result<Self, PageError> {
        let (session, form) = checked_form(req, state, true).await?;
        Ok(Mutation { session, form })
    }
}

impl<T> FromRequest<DashState> for OwnMutation<T>
where
    T: serde::de::DeserializeOwned + Send,
{
    type Rejection = PageError;

    async fn from_request(req: Request, state: &DashState) -> Result<Self, PageError> {
        let (session, form) = checked_form(req, state, false).await?;
        Ok(OwnMutation { session, form })
    }
}

/// Same-origin check: an `Origin` header, when present, must name the request's host.
pub fn origin_matches(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    if origin == "null" {
        return false;
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .unwrap_or("");
    !host.is_empty() && origin_host.eq_ignore_ascii_case(host)
}

/// Why a sign-in failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginError {
    /// Unknown email, wrong password or a disabled user (indistinguishable on purpose).
    InvalidCredentials,
    /// Too many attempts; retry after this many seconds.
    RateLimited(u64),
    Internal,
}

/// The limits on sign-in attempts.
pub struct LoginLimiter {
    by_address: crate::ratelimit::RateLimiter<std::net::IpAddr>,
    by_email: crate::ratelimit::RateLimiter<String>,
}

impl std::fmt::Debug for LoginLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginLimiter").finish_non_exhaustive()
    }
}

impl Default for LoginLimiter {
    fn default() -> Self {
        use crate::ratelimit::{Limit, RateLimiter};
        LoginLimiter {
            // 10 at once, then one every 6 s per address; one every 30 s per email.
            by_address: RateLimiter::new(Limit::new(1.0 / 6.0, 10)),
            by_email: RateLimiter::new(Limit::new(1.0 / 30.0, 10)),
        }
    }
}

impl LoginLimiter {
    /// Before a sign-in attempt: every attempt costs its address a token; an email must
    /// still have one (its tokens are taken by failures only, see [`Self::failed`]).
    fn check(&self, address: Option<std::net::IpAddr>, email: &str) -> Result<(), u64> {
        if let Some(ip) = address {
            self.by_address
                .check(crate::ratelimit::address_key(ip))
                .map_err(|r| r.seconds())?;
        }
        self.by_email
            .peek(&crate::control::db::admin_users::normalize_email(email))
            .map_err(|r| r.seconds())
    }

    /// A failed attempt costs the email a token: guessing one account's password is slow
    /// from any number of addresses.
    fn failed(&self, email: &str) {
        let _ = self
            .by_email
            .check(crate::control::db::admin_users::normalize_email(email));
    }

    /// A successful sign-in refills the email's bucket (its owner is not locked out by
    /// earlier failures, theirs or an attacker's).
    fn succeeded(&self, email: &str) {
        self.by_email
            .reset(&crate::control::db::admin_users::normalize_email(email));
    }

    /// A password check outside sign-in (changing one's password): limited like a sign-in.
    pub fn check_password_change(&self, email: &str) -> Result<(), u64> {
        self.by_email
            .peek(&crate::control::db::admin_users::normalize_email(email))
            .map_err(|r| r.seconds())
    }

    /// A failed password check outside sign-in.
    pub fn password_change_failed(&self, email: &str) {
        self.failed(email);
    }
}

/// Checks credentials and opens a session: the cookie's secret and the user. `address`
/// is the client's (`TrustedProxies::client_ip`).
pub async fn login(
    state: &DashState,
    address: Option<std::net::IpAddr>,
    user_agent: Option<&str>,
    email: &str,
    password: &str,
) -> Result<(String, AdminUser), LoginError> {
    if let Err(secs) = state.login_limiter.check(address, email) {
        audit_failure(state, email, address, "rate_limited").await;
        return Err(LoginError::RateLimited(secs));
    }
    let outcome = login_checked(state, address, user_agent, email, password).await;
    match &outcome {
        Ok(_) => state.login_limiter.succeeded(email),
        Err(LoginError::InvalidCredentials) => {
            state.login_limiter.failed(email);
            audit_failure(state, email, address, "invalid_credentials").await;
        }
        Err(_) => {}
    }
    outcome
}

/// A refused sign-in becomes an audit event (a failed write is logged, not fatal: the
/// answer is a refusal either way).
async fn audit_failure(
    state: &DashState,
    email: &str,
    address: Option<std::net::IpAddr>,
    reason: &str,
) {
    if crate::control::guard::has_control(email) {
        return;
    }
    let address = address.map(|a| a.to_string());
    if let Err(e) = state
        .db
        .audit_failed_sign_in(email, address.as_deref(), reason, unix_now())
        .await
    {
        tracing::warn!(error = %e, "could not audit a failed sign-in");
    }
}

async fn login_checked(
    state: &DashState,
    address: Option<std::net::IpAddr>,
    user_agent: Option<&str>,
    email: &str,
    password: &str,
) -> Result<(String, AdminUser), LoginError> {
    if crate::control::guard::has_control(email) || email.len() > 320 {
        return Err(LoginError::InvalidCredentials);
    }
    let found = state
        .db
        .admin_user_for_login(email)
        .await
        .map_err(|_| LoginError::Internal)?;
    let (user, stored) = match found {
        Some((user, Some(hash))) if user.disabled_at.is_none() => (Some(user), hash),
        _ => (None, dummy_hash().to_string()),
    };
    let password = password.to_string();
    let ok = tokio::task::spawn_blocking(move || verify_password(&password, &stored))
        .await
        .unwrap_or(false);
    let Some(user) = user.filter(|_| ok) else {
        return Err(LoginError::InvalidCredentials);
    };
    let token = new_session_token();
    let now = unix_now();
    state
        .db
        .create_admin_session(
            &crate::auth::key_id(&token),
            &crate::auth::hash(&token),
            &user,
            now.saturating_add(IDLE_SECONDS),
            user_agent,
            address.map(|a| a.to_string()).as_deref(),
            now,
        )
        .await
        .map_err(|_| LoginError::Internal)?;
    Ok((token, user))
}

/// The peer address, when the server recorded it.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddress(pub Option<SocketAddr>);

impl PeerAddress {
    /// The client's address: the peer, or what a trusted proxy forwarded.
    pub fn client_ip(
        self,
        proxies: &crate::ratelimit::TrustedProxies,
        headers: &HeaderMap,
    ) -> Option<std::net::IpAddr> {
        self.0.map(|p| proxies.client_ip(p.ip(), headers))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for PeerAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(PeerAddress(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterY", &h));
        assert!(!verify_password("x", "not a phc string"));
        assert_eq!(check_new_password("short"), Err(PasswordError::TooShort));
        assert!(check_new_password("long enough password").is_ok());
    }

    #[test]
    fn csrf_and_cookies() {
        let t = new_session_token();
        assert_eq!(csrf_token(&t), csrf_token(&t));
        assert_ne!(csrf_token(&t), csrf_token(&new_session_token()));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; roony_session=roony_ss_ab; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("roony_ss_ab"));
        assert_eq!(cookie(&h, "c"), None);
    }

    #[test]
    fn secure_unless_plain_loopback() {
        let mut h = HeaderMap::new();
        for (host, secure) in [
            ("127.0.0.1:8788", false),
            ("localhost:8788", false),
            ("[::1]:8788", false),
            ("roony.example.com", true),
            ("10.0.0.5:8788", true),
        ] {
            h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
            assert_eq!(secure_cookies(&h), secure, "{host}");
        }
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8788"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(secure_cookies(&h));
        let c = set_cookie(SESSION_COOKIE, "v", None, true);
        let c = c.to_str().unwrap();
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Lax") && c.contains("Secure"));
    }

    #[test]
    fn origins() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8788"));
        assert!(origin_matches(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8788"),
        );
        assert!(origin_matches(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!origin_matches(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(!origin_matches(&h));
    }
}
