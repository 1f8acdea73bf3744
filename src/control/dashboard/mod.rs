//! The admin dashboard, served by the control plane at its root: server-rendered HTML
//! (maud) whose core forms work without JavaScript; the vendored htmx (`assets/`, built
//! into the binary) only enhances. Only this module knows the dashboard's HTML and
//! routes; it calls `control::db` (and `control::connect`) like the admin API does.
//!
//! - `auth`: users, sessions, CSRF, roles, sign-in limits.
//! - `ui`: layout, navigation, flash messages, formatting helpers, SVG charts.
//! - one module per page group (`overview`, `agents`, `policies`, `approvals`,
//!   `transactions`, `discrepancies`, `audit_log`, `stripe`, `settings`).
//!
//! Every state-changing form is a `POST` taking [`auth::Mutation`] (admin role + CSRF),
//! answered with `303 See Other` (post/redirect/get) and a flash message, or with the form
//! again and its errors (`422`).

pub mod agents;
pub mod approvals;
pub mod audit_log;
pub mod auth;
pub mod discrepancies;
pub mod dryrun;
pub mod overview;
pub mod policies;
pub mod settings;
pub mod stripe;
pub mod transactions;
pub mod ui;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{Markup, html};

use crate::control::db::admin_users::Role;
use crate::control::db::{ControlDb, DbError};
use auth::PeerAddress;

/// What every dashboard handler can reach.
#[derive(Clone)]
pub struct DashState {
    pub db: ControlDb,
    pub login_limiter: Arc<auth::LoginLimiter>,
    /// SHA-256 of the one-time setup token, while no admin user exists.
    pub setup_token_hash: Arc<Mutex<Option<String>>>,
}

impl DashState {
    pub fn new(db: ControlDb) -> DashState {
        DashState {
            db,
            login_limiter: Arc::new(auth::LoginLimiter::default()),
            setup_token_hash: Arc::new(Mutex::new(None)),
        }
    }

    /// Arms the one-time setup token (`/setup?token=…`), used when no admin user exists.
    pub fn arm_setup_token(&self, token: &str) {
        if let Ok(mut slot) = self.setup_token_hash.lock() {
            *slot = Some(crate::auth::hash(token));
        }
    }

    fn setup_token_valid(&self, token: &str) -> bool {
        self.setup_token_hash
            .lock()
            .ok()
            .and_then(|slot| slot.clone())
            .is_some_and(|h| crate::auth::verify(token, &h))
    }

    /// Takes the armed token's hash out if `token` matches it (one use).
    fn take_setup_token(&self, token: &str) -> Option<String> {
        let mut slot = self.setup_token_hash.lock().ok()?;
        if slot
            .as_deref()
            .is_some_and(|h| crate::auth::verify(token, h))
        {
            slot.take()
        } else {
            None
        }
    }

    fn restore_setup_token(&self, hash: String) {
        if let Ok(mut slot) = self.setup_token_hash.lock() {
            *slot = Some(hash);
        }
    }
}

/// An error page (or a redirect to sign in). Messages are lowercase and say what to do.
#[derive(Debug)]
pub enum PageError {
    /// No valid session: redirect to the sign-in form, then back to `next`.
    SignIn { next: String },
    Page {
        status: StatusCode,
        code: &'static str,
        message: String,
    },
}

impl PageError {
    pub fn new(status: StatusCode, code: &'static str, message: &str) -> PageError {
        PageError::Page {
            status,
            code,
            message: message.to_string(),
        }
    }
    pub fn forbidden() -> PageError {
        PageError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "viewers cannot change anything; ask an admin",
        )
    }
    pub fn csrf() -> PageError {
        PageError::new(
            StatusCode::FORBIDDEN,
            "csrf_failed",
            "the form expired or did not come from this dashboard; reload the page and try again",
        )
    }
    pub fn not_found(what: &str) -> PageError {
        PageError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("{what} not found"),
        )
    }
    pub fn bad_request(code: &'static str, message: &str) -> PageError {
        PageError::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl From<DbError> for PageError {
    fn from(e: DbError) -> PageError {
        match e {
            DbError::NotFound(what) => PageError::not_found(what),
            DbError::Conflict(m) => PageError::new(StatusCode::CONFLICT, "conflict", &m),
            DbError::StalePolicy { base, current } => PageError::new(
                StatusCode::CONFLICT,
                "policy_changed",
                &format!(
                    "revision {current} of the policy was published after revision {base}; reload the policy and apply your change again"
                ),
            ),
            DbError::InvalidInput(_) => PageError::bad_request(
                crate::control::guard::CODE,
                "the form contains characters that cannot be stored (such as NUL); remove them",
            ),
            other => {
                tracing::error!(error = %other, "dashboard database error");
                PageError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "the database could not be read; try again",
                )
            }
        }
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        match self {
            PageError::SignIn { next } => {
                let to = format!("/login?next={}", ui::url_encode(&next));
                Redirect::to(&to).into_response()
            }
            PageError::Page {
                status,
                code,
                message,
            } => {
                let body = ui::bare_page(
                    "Error",
                    html! {
                        main.narrow {
                            h1 { "Something went wrong" }
                            p.error data-code=(code) { (message) }
                            p { a href="/" { "Back to the overview" } }
                        }
                    },
                );
                (status, body).into_response()
            }
        }
    }
}

/// A 303 to `to` with a flash message shown on the next page.
pub fn redirect_with_flash(to: &str, message: &str, headers: &HeaderMap) -> Response {
    let mut resp = Redirect::to(to).into_response();
    let secure = auth::secure_cookies(headers);
    resp.headers_mut().append(
        header::SET_COOKIE,
        auth::set_cookie(ui::FLASH_COOKIE, &ui::url_encode(message), Some(60), secure),
    );
    resp
}

/// The dashboard's routes (state applied).
pub fn router(state: DashState) -> Router {
    Router::new()
        .route("/", get(overview::page))
        .route("/login", get(login_form).post(login_submit))
        .route("/logout", post(logout))
        .route("/setup", get(setup_form).post(setup_submit))
        .route("/assets/{name}", get(asset))
        .route("/favicon.ico", get(favicon))
        .merge(agents::routes())
        .merge(policies::routes())
        .merge(approvals::routes())
        .merge(transactions::routes())
        .merge(discrepancies::routes())
        .merge(audit_log::routes())
        .merge(stripe::routes())
        .merge(settings::routes())
        .with_state(state)
        .layer(axum::middleware::from_fn(security_headers))
}

/// The dashboard's Content-Security-Policy: only its own scripts, styles and images (inline
/// SVG and `data:` images aside), no plugins, no `<base>`, and no framing by any site.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

/// Headers on every dashboard response: the CSP, no framing (also for browsers without
/// `frame-ancestors`), no MIME sniffing, no `Referer` to other sites (the OAuth callback's
/// URL holds a code), and pages are not stored by caches (a new agent key is shown once).
async fn security_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// The page for a path nothing serves (outside `/api/`, which answers JSON).
pub fn not_found_page() -> Response {
    let mut resp =
        PageError::new(StatusCode::NOT_FOUND, "not_found", "there is no such page").into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// The tab icon (browsers ask for `/favicon.ico` whatever the page says).
async fn favicon() -> Response {
    const ICON: &str = "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 32 32\"><rect width=\"32\" height=\"32\" rx=\"6\" fill=\"#111827\"/><text x=\"16\" y=\"23\" font-size=\"20\" font-family=\"sans-serif\" font-weight=\"bold\" text-anchor=\"middle\" fill=\"#818cf8\">R</text></svg>";
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("image/svg+xml"),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=86400"),
            ),
        ],
        ICON,
    )
        .into_response()
}

/// Vendored static files, built into the binary.
async fn asset(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    let (body, content_type): (&'static [u8], &str) = match name.as_str() {
        "htmx.min.js" => (
            include_bytes!("assets/htmx.min.js"),
            "text/javascript; charset=utf-8",
        ),
        "app.css" => (include_bytes!("assets/app.css"), "text/css; charset=utf-8"),
        "app.js" => (
            include_bytes!("assets/app.js"),
            "text/javascript; charset=utf-8",
        ),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_str(content_type)
                    .unwrap_or(HeaderValue::from_static("application/octet-stream")),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=3600"),
            ),
        ],
        body,
    )
        .into_response()
}

#[derive(serde::Deserialize, Default)]
pub struct NextQuery {
    next: Option<String>,
    token: Option<String>,
}

/// Only same-site paths are followed after sign-in.
fn safe_next(next: Option<&str>) -> String {
    match next {
        // A path on this site: printable ASCII without spaces (browsers drop tabs and
        // newlines from URLs, so "/\t/host" would become "//host"), not "//" or "/\".
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                && n.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            n.to_string()
        }
        _ => "/".to_string(),
    }
}

/// Shown on the sign-in page when the browser is probably on plain HTTP at a remote
/// address (its Secure cookies would be dropped).
const PLAIN_HTTP_WARNING: &str = "this dashboard is reached over plain HTTP at a non-local address: browsers do not keep its Secure cookies, so signing in cannot work. Serve it over HTTPS (a TLS-terminating proxy that sends X-Forwarded-Proto: https) or open it at 127.0.0.1 through an SSH tunnel.";

fn login_page(
    next: &str,
    nonce: &str,
    error: Option<&str>,
    email: &str,
    plain_http: bool,
) -> Markup {
    ui::bare_page(
        "Sign in",
        html! {
            main.narrow.login {
                h1 { "Roony" }
                p.muted { "Sign in to the control plane." }
                @if plain_http { p.error #plain-http-warning role="alert" { (PLAIN_HTTP_WARNING) } }
                @if let Some(e) = error { p.error role="alert" { (e) } }
                form method="post" action="/login" {
                    input type="hidden" name="_login_csrf" value=(nonce);
                    input type="hidden" name="next" value=(next);
                    label { "Email" input type="email" name="email" value=(email) required autocomplete="username" autofocus; }
                    label { "Password" input type="password" name="password" required autocomplete="current-password"; }
                    button type="submit" { "Sign in" }
                }
                p.muted.small { "No account yet? An operator creates the first admin with "
                    code { "roony admin create" } " or the one-time setup link the control plane prints at its first start." }
            }
        },
    )
}

/// `GET /login`.
async fn login_form(
    State(state): State<DashState>,
    headers: HeaderMap,
    Query(q): Query<NextQuery>,
) -> Result<Response, PageError> {
    let next = safe_next(q.next.as_deref());
    if auth::session_of(&state.db, &headers, auth::unix_now())
        .await?
        .is_some()
    {
        return Ok(Redirect::to(&next).into_response());
    }
    let nonce = auth::new_login_nonce();
    let mut resp =
        login_page(&next, &nonce, None, "", auth::plain_http_remote(&headers)).into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        auth::set_cookie(
            auth::LOGIN_CSRF_COOKIE,
            &nonce,
            Some(3600),
            auth::secure_cookies(&headers),
        ),
    );
    Ok(resp)
}

#[derive(serde::Deserialize)]
pub struct LoginForm {
    email: String,
    password: String,
    #[serde(default)]
    next: Option<String>,
    #[serde(rename = "_login_csrf", default)]
    login_csrf: String,
}

/// `POST /login`.
async fn login_submit(
    State(state): State<DashState>,
    peer: PeerAddress,
    headers: HeaderMap,
    axum::Form(form): axum::Form<LoginForm>,
) -> Response {
    let client = peer.client_ip(state.db.trusted_proxies(), &headers);
    let next = safe_next(form.next.as_deref());
    let secure = auth::secure_cookies(&headers);
    let fail = |status: StatusCode, msg: &str| {
        let nonce = auth::new_login_nonce();
        let plain_http = auth::plain_http_remote(&headers);
        let mut resp = (
            status,
            login_page(&next, &nonce, Some(msg), &form.email, plain_http),
        )
            .into_response();
        resp.headers_mut().append(
            header::SET_COOKIE,
            auth::set_cookie(auth::LOGIN_CSRF_COOKIE, &nonce, Some(3600), secure),
        );
        resp
    };
    let cookie_nonce = auth::cookie(&headers, auth::LOGIN_CSRF_COOKIE).unwrap_or_default();
    if cookie_nonce.is_empty()
        || !auth::constant_time_eq(&cookie_nonce, &form.login_csrf)
        || !auth::origin_matches(&headers)
    {
        return fail(
            StatusCode::FORBIDDEN,
            "the sign-in form expired; please try again",
        );
    }
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok());
    match auth::login(&state, client, user_agent, &form.email, &form.password).await {
        Ok((token, user)) => {
            tracing::info!(user = %user.id, "dashboard sign-in");
            let mut resp = Redirect::to(&next).into_response();
            resp.headers_mut().append(
                header::SET_COOKIE,
                auth::set_cookie(auth::SESSION_COOKIE, &token, None, secure),
            );
            resp.headers_mut().append(
                header::SET_COOKIE,
                auth::set_cookie(auth::LOGIN_CSRF_COOKIE, "", Some(0), secure),
            );
            resp
        }
        Err(auth::LoginError::InvalidCredentials) => fail(
            StatusCode::UNAUTHORIZED,
            "the email or password is not correct",
        ),
        Err(auth::LoginError::RateLimited(secs)) => {
            let mut resp = fail(
                StatusCode::TOO_MANY_REQUESTS,
                &format!("too many sign-in attempts; try again in {secs} seconds"),
            );
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            resp
        }
        Err(auth::LoginError::Internal) => fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "sign-in is unavailable right now; try again",
        ),
    }
}

/// `POST /logout` (CSRF-checked; viewers may sign out too).
async fn logout(
    State(state): State<DashState>,
    headers: HeaderMap,
    m: auth::OwnMutation<std::collections::HashMap<String, String>>,
) -> Result<Response, PageError> {
    let session = m.session;
    state
        .db
        .revoke_admin_session(&session.id, &session.actor(), auth::unix_now())
        .await?;
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        auth::set_cookie(
            auth::SESSION_COOKIE,
            "",
            Some(0),
            auth::secure_cookies(&headers),
        ),
    );
    Ok(resp)
}

fn setup_page(token: &str, error: Option<&str>) -> Markup {
    ui::bare_page(
        "Create the first admin",
        html! {
            main.narrow.login {
                h1 { "Create the first admin" }
                @if let Some(e) = error { p.error role="alert" { (e) } }
                form method="post" action="/setup" {
                    input type="hidden" name="token" value=(token);
                    label { "Email" input type="email" name="email" required; }
                    label { "Name" input type="text" name="name" required; }
                    label { "Password (at least " (auth::MIN_PASSWORD_LEN) " characters)"
                        input type="password" name="password" required autocomplete="new-password"; }
                    button type="submit" { "Create admin" }
                }
            }
        },
    )
}

/// `GET /setup?token=…`: only while no admin exists and with the printed token.
async fn setup_form(
    State(state): State<DashState>,
    Query(q): Query<NextQuery>,
) -> Result<Response, PageError> {
    let token = q.token.unwrap_or_default();
    if state.db.count_admin_users().await? > 0 || !state.setup_token_valid(&token) {
        return Err(PageError::new(
            StatusCode::NOT_FOUND,
            "setup_unavailable",
            "setup is over or the link is not valid; sign in instead",
        ));
    }
    Ok(setup_page(&token, None).into_response())
}

#[derive(serde::Deserialize)]
pub struct SetupForm {
    token: String,
    email: String,
    name: String,
    password: String,
}

/// `POST /setup`: creates the first admin and disarms the token.
async fn setup_submit(
    State(state): State<DashState>,
    axum::Form(form): axum::Form<SetupForm>,
) -> Result<Response, PageError> {
    if state.db.count_admin_users().await? > 0 || !state.setup_token_valid(&form.token) {
        return Err(PageError::new(
            StatusCode::NOT_FOUND,
            "setup_unavailable",
            "setup is over or the link is not valid; sign in instead",
        ));
    }
    let invalid = |m: &str| {
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            setup_page(&form.token, Some(m)),
        )
            .into_response()
    };
    if !form.email.contains('@') || form.name.trim().is_empty() {
        return Ok(invalid("enter an email address and a name"));
    }
    if let Err(e) = auth::check_new_password(&form.password) {
        return Ok(invalid(&e.to_string()));
    }
    let password = form.password.clone();
    let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password))
        .await
        .map_err(|_| {
            PageError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "try again",
            )
        })?
        .map_err(|e| PageError::new(StatusCode::INTERNAL_SERVER_ERROR, e.code(), &e.to_string()))?;
    let actor = crate::control::db::Actor {
        kind: "setup_token",
        id: "setup".into(),
        name: "setup".into(),
        request_id: None,
    };
    // One use: the token leaves its slot before the admin is created (two concurrent
    // submissions cannot both create one), and comes back only if creating failed.
    let Some(armed) = state.take_setup_token(&form.token) else {
        return Err(PageError::new(
            StatusCode::NOT_FOUND,
            "setup_unavailable",
            "setup is over or the link is not valid; sign in instead",
        ));
    };
    if let Err(e) = state
        .db
        .create_admin_user(
            &form.email,
            &form.name,
            Role::Admin,
            &hash,
            &actor,
            auth::unix_now(),
        )
        .await
    {
        state.restore_setup_token(armed);
        return Err(e.into());
    }
    Ok(redirect_with_flash(
        "/login",
        "admin created; sign in",
        &HeaderMap::new(),
    ))
}
