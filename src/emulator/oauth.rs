//! Stripe Connect OAuth (Standard accounts), as `connect.stripe.com` serves it:
//!
//! - `GET /oauth/authorize?response_type=code&client_id=ca_…&scope=…&redirect_uri=…&state=…`
//!   renders a small consent page with Approve / Deny forms; `POST /oauth/authorize` (the
//!   forms, or a test posting `decision=approve|deny` with the same parameters) answers
//!   `302` to `redirect_uri?code=ac_…&scope=…&state=…` or
//!   `?error=access_denied&error_description=…&state=…`. `GET …&auto=approve|deny` skips
//!   the page.
//! - `POST /oauth/token` (Bearer platform key): `grant_type=authorization_code` (a code is
//!   single-use and creates a connected account `acct_…`) or `refresh_token`; answers
//!   `{access_token, refresh_token, token_type, stripe_publishable_key, stripe_user_id, scope,
//!   livemode}`. Errors are OAuth errors: `{"error": "invalid_grant", "error_description"}`.
//! - `POST /oauth/deauthorize` (Bearer platform key, `client_id`, `stripe_user_id`) →
//!   `{"stripe_user_id"}`, revokes the connection's tokens and sends the signed
//!   `account.application.deauthorized` event (top-level `account`).
//!
//! Access tokens (`sk_test_oauth…`, as Bearer or as the Basic user name) authenticate `/v1`
//! calls and act on their connected account. Deauthorizing revokes the connection's tokens
//! for good: they answer 401 `api_key_expired`, also after the same account connects again
//! (which gets new tokens). An unknown `sk_test_oauth…` token is 401 too. Refreshing issues
//! a new access token and leaves the old one valid (refresh is not rotation). The
//! publishable key is random per connection. Error descriptions never repeat codes,
//! tokens or keys.

// Helpers answer their error as the HTTP response itself.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http::header::{CONTENT_TYPE, LOCATION};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::{Value, json};

use super::error::{ApiError, ErrorType};
use super::state::AccountKey;
use super::{Inner, ids, json_response, to_body};

const MAX_BODY_BYTES: usize = 64 * 1024;
/// Authorization codes expire after 5 minutes (Stripe's are short-lived too).
const CODE_TTL_SECONDS: i64 = 300;

#[derive(Debug, Clone)]
struct Code {
    client_id: String,
    scope: String,
    account: Option<String>,
    created: i64,
    used: bool,
}

/// The prefix of the emulator's OAuth access tokens.
const TOKEN_PREFIX: &str = "sk_test_oauth";

#[derive(Debug, Clone)]
struct Connection {
    client_id: String,
    scope: String,
    active: bool,
    refresh_token: String,
    publishable_key: String,
}

/// OAuth state of the emulator (reset with the rest).
#[derive(Debug, Default)]
pub struct OAuthState {
    codes: HashMap<String, Code>,
    /// Connections, by connected account id.
    connections: HashMap<String, Connection>,
    /// Access token → account id (live tokens only).
    access_tokens: HashMap<String, String>,
    /// Refresh token → account id (live tokens only).
    refresh_tokens: HashMap<String, String>,
    /// Tokens of deauthorized connections: never valid again.
    revoked: std::collections::HashSet<String>,
}

impl OAuthState {
    /// For `/v1` authentication: `None` if `key` is not an OAuth access token; else the
    /// connected account it acts on, or Stripe's 401 (`api_key_expired` for a revoked
    /// token, `Invalid API Key provided` for an unknown one).
    pub fn account_of_token(&self, key: &str) -> Option<Result<String, ApiError>> {
        if let Some(account) = self.access_tokens.get(key) {
            return Some(Ok(account.clone()));
        }
        if self.revoked.contains(key) {
            return Some(Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorType::InvalidRequestError,
                format!("Expired API Key provided: {}", super::redact_key(key)),
            )
            .with_code("api_key_expired")));
        }
        key.starts_with(TOKEN_PREFIX).then(|| {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorType::InvalidRequestError,
                format!("Invalid API Key provided: {}", super::redact_key(key)),
            ))
        })
    }

    /// Whether `key` is (or was) an OAuth token rather than a platform key.
    fn is_oauth_token(&self, key: &str) -> bool {
        self.access_tokens.contains_key(key)
            || self.revoked.contains(key)
            || key.starts_with(TOKEN_PREFIX)
    }

    /// Ends the account's connection: every token it was given is revoked for good.
    fn revoke(&mut self, account: &str) {
        if let Some(c) = self.connections.get_mut(account) {
            c.active = false;
        }
        let access: Vec<String> = self
            .access_tokens
            .iter()
            .filter(|(_, a)| a.as_str() == account)
            .map(|(t, _)| t.clone())
            .collect();
        let refresh: Vec<String> = self
            .refresh_tokens
            .iter()
            .filter(|(_, a)| a.as_str() == account)
            .map(|(t, _)| t.clone())
            .collect();
        for t in access {
            self.access_tokens.remove(&t);
            self.revoked.insert(t);
        }
        for t in refresh {
            self.refresh_tokens.remove(&t);
            self.revoked.insert(t);
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    super::api_key(headers)
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_response(
        status,
        to_body(&json!({"error": error, "error_description": description})),
    )
}

fn platform_key_ok(inner: &Inner, headers: &HeaderMap) -> Result<(), Response> {
    let key = bearer(headers).unwrap_or_default();
    let valid = |prefix: &str| {
        key.strip_prefix(prefix).is_some_and(|rest| {
            !rest.is_empty() && rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    };
    let is_token = inner.oauth().is_oauth_token(&key);
    if (valid("sk_test_") || valid("rk_test_")) && !is_token {
        Ok(())
    } else {
        Err(json_response(
            StatusCode::UNAUTHORIZED,
            to_body(
                &ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    ErrorType::InvalidRequestError,
                    "Invalid API Key provided: authenticate with the platform's secret key.",
                )
                .body(),
            ),
        ))
    }
}

fn escape(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '"' => "&quot;".to_string(),
            '\'' => "&#39;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

fn encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn param<'a>(params: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    params
        .get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

fn parse_pairs(raw: &str) -> HashMap<String, String> {
    raw.split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8()
                    .ok()
                    .map(|c| c.into_owned())
            };
            Some((decode(k)?, decode(v)?))
        })
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

fn is_client_id(id: &str) -> bool {
    id.strip_prefix("ca_").is_some_and(|rest| {
        !rest.is_empty() && rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// `/oauth/…`.
pub(super) async fn handle(inner: &Arc<Inner>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or("").to_owned();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The body could not be read.",
        );
    };
    let form = parse_pairs(&String::from_utf8_lossy(&bytes));
    let mut params = parse_pairs(&query);
    params.extend(form);
    match (parts.method.clone(), path.as_str()) {
        (Method::GET, "/oauth/authorize") => match param(&params, "auto") {
            // Tests: decide without the page.
            Some(auto) => {
                let auto = auto.to_owned();
                decide(inner, &params, &auto)
            }
            None => authorize_page(&params),
        },
        (Method::POST, "/oauth/authorize") => {
            let decision = param(&params, "decision").unwrap_or("deny").to_owned();
            decide(inner, &params, &decision)
        }
        (Method::POST, "/oauth/token") => token(inner, &parts.headers, &params),
        (Method::POST, "/oauth/deauthorize") => deauthorize(inner, &parts.headers, &params),
        _ => oauth_error(
            StatusCode::NOT_FOUND,
            "invalid_request",
            "Unrecognized OAuth endpoint.",
        ),
    }
}

/// Validates the authorize parameters; the error page/answer otherwise.
fn check_authorize(params: &HashMap<String, String>) -> Result<(), Response> {
    let bad = |m: &str| oauth_error(StatusCode::BAD_REQUEST, "invalid_request", m);
    match param(params, "response_type") {
        Some("code") => {}
        _ => {
            return Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_response_type",
                "Only response_type=code is supported.",
            ));
        }
    }
    if !param(params, "client_id").is_some_and(is_client_id) {
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            "No such application: the client_id is not a valid ca_… id.",
        ));
    }
    match param(params, "redirect_uri") {
        Some(u) if u.starts_with("http://") || u.starts_with("https://") => {}
        _ => return Err(bad("redirect_uri must be an http(s) URL.")),
    }
    match param(params, "scope").unwrap_or("read_only") {
        "read_only" | "read_write" => Ok(()),
        _ => Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "scope must be read_only or read_write.",
        )),
    }
}

fn authorize_page(params: &HashMap<String, String>) -> Response {
    if let Err(r) = check_authorize(params) {
        return r;
    }
    let name = param(params, "stripe_user[business_name]").unwrap_or("Emulator test account");
    let hidden: String = [
        "response_type",
        "client_id",
        "scope",
        "redirect_uri",
        "state",
        "stripe_user[business_name]",
    ]
    .iter()
    .filter_map(|k| {
        param(params, k).map(|v| {
            format!(
                "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
                escape(k),
                escape(v)
            )
        })
    })
    .collect();
    let client = escape(param(params, "client_id").unwrap_or_default());
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Roony Stripe emulator</title></head>\
         <body><h1>Roony Stripe emulator: connect {name}?</h1>\
         <p>The application <code>{client}</code> asks for <code>{scope}</code> access.</p>\
         <form method=\"post\" action=\"/oauth/authorize\">{hidden}<input type=\"hidden\" name=\"decision\" value=\"approve\"><button type=\"submit\" id=\"approve\">Approve</button></form>\
         <form method=\"post\" action=\"/oauth/authorize\">{hidden}<input type=\"hidden\" name=\"decision\" value=\"deny\"><button type=\"submit\" id=\"deny\">Deny</button></form>\
         </body></html>",
        name = escape(name),
        scope = escape(param(params, "scope").unwrap_or("read_only")),
    );
    let mut resp = Response::new(Body::from(html));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

fn decide(inner: &Arc<Inner>, params: &HashMap<String, String>, decision: &str) -> Response {
    if let Err(r) = check_authorize(params) {
        return r;
    }
    let approve = decision == "approve";
    let code = approve.then(|| {
        let code = ids::random_id("ac_", 24);
        inner.oauth().codes.insert(
            code.clone(),
            Code {
                client_id: param(params, "client_id").unwrap_or_default().to_owned(),
                scope: param(params, "scope").unwrap_or("read_only").to_owned(),
                account: param(params, "stripe_user_id")
                    .filter(|a| a.starts_with("acct_"))
                    .map(str::to_owned),
                created: ids::now_unix(),
                used: false,
            },
        );
        code
    });
    redirect_for(params, approve, code)
}

fn redirect_for(params: &HashMap<String, String>, approve: bool, code: Option<String>) -> Response {
    let redirect = param(params, "redirect_uri").unwrap_or_default();
    let state = param(params, "state")
        .map(|s| format!("&state={}", encode(s)))
        .unwrap_or_default();
    let sep = if redirect.contains('?') { '&' } else { '?' };
    let location = match code.filter(|_| approve) {
        Some(code) => format!(
            "{redirect}{sep}code={code}&scope={}{state}",
            encode(param(params, "scope").unwrap_or("read_only"))
        ),
        None => format!(
            "{redirect}{sep}error=access_denied&error_description={}{state}",
            encode("The user denied your request")
        ),
    };
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::FOUND;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(LOCATION, v);
    }
    resp
}

fn token_json(account: &str, access: &str, conn: &Connection) -> Value {
    json!({
        "access_token": access,
        "refresh_token": conn.refresh_token,
        "token_type": "bearer",
        "stripe_publishable_key": conn.publishable_key,
        "stripe_user_id": account,
        "scope": conn.scope,
        "livemode": false,
    })
}

fn token(inner: &Arc<Inner>, headers: &HeaderMap, params: &HashMap<String, String>) -> Response {
    if let Err(r) = platform_key_ok(inner, headers) {
        return r;
    }
    let invalid_grant = |m: &str| oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", m);
    let mut st = inner.oauth();
    match param(params, "grant_type") {
        Some("authorization_code") => {
            let Some(code_id) = param(params, "code") else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "No code provided.",
                );
            };
            let now = ids::now_unix();
            let Some(code) = st.codes.get_mut(code_id) else {
                return invalid_grant("The authorization code does not exist.");
            };
            if code.used {
                return invalid_grant(
                    "This authorization code has already been used. All tokens issued with this code have been revoked.",
                );
            }
            if now - code.created > CODE_TTL_SECONDS {
                return invalid_grant("The authorization code has expired.");
            }
            code.used = true;
            let code = code.clone();
            let account = code
                .account
                .clone()
                .unwrap_or_else(|| ids::random_id("acct_", 16));
            // A new connection (also of an account that was connected before): new tokens;
            // whatever the account was given earlier stays revoked.
            st.revoke(&account);
            let access = ids::random_id(TOKEN_PREFIX, 32);
            let refresh = ids::random_id("rt_", 32);
            let conn = Connection {
                client_id: code.client_id.clone(),
                scope: code.scope.clone(),
                active: true,
                refresh_token: refresh.clone(),
                publishable_key: ids::random_id("pk_test_", 24),
            };
            st.connections.insert(account.clone(), conn.clone());
            st.access_tokens.insert(access.clone(), account.clone());
            st.refresh_tokens.insert(refresh, account.clone());
            json_response(
                StatusCode::OK,
                to_body(&token_json(&account, &access, &conn)),
            )
        }
        Some("refresh_token") => {
            let Some(refresh) = param(params, "refresh_token") else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "No refresh_token provided.",
                );
            };
            let Some(account) = st.refresh_tokens.get(refresh).cloned() else {
                return invalid_grant("The refresh token is invalid or was revoked.");
            };
            let Some(conn) = st
                .connections
                .get(&account)
                .filter(|c| c.active && c.refresh_token == refresh)
                .cloned()
            else {
                return invalid_grant("The refresh token is invalid or was revoked.");
            };
            // Refresh is not rotation: earlier access tokens stay valid.
            let access = ids::random_id(TOKEN_PREFIX, 32);
            st.access_tokens.insert(access.clone(), account.clone());
            json_response(
                StatusCode::OK,
                to_body(&token_json(&account, &access, &conn)),
            )
        }
        _ => oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type must be authorization_code or refresh_token.",
        ),
    }
}

fn deauthorize(
    inner: &Arc<Inner>,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
) -> Response {
    if let Err(r) = platform_key_ok(inner, headers) {
        return r;
    }
    let client_id = param(params, "client_id").unwrap_or_default().to_owned();
    let account = param(params, "stripe_user_id")
        .unwrap_or_default()
        .to_owned();
    {
        let mut st = inner.oauth();
        match st.connections.get(&account) {
            Some(c) if c.active && c.client_id == client_id => st.revoke(&account),
            _ => {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_client",
                    "No such user: this account is not connected to your application.",
                );
            }
        }
    }
    let queued = {
        let mut st = inner.lock();
        st.emit(
            &AccountKey::Connected(account.clone()),
            "account.application.deauthorized",
            json!({"id": client_id, "object": "application", "name": "Roony (emulator)"}),
            None,
        );
        std::mem::take(&mut st.outbox)
    };
    super::webhooks::dispatch(inner, queued);
    json_response(StatusCode::OK, to_body(&json!({"stripe_user_id": account})))
}
