//! The Settings page of the dashboard: your password, admin users (admins only), admin API
//! tokens and sidecar tokens (each shown once, on the response page of the form that made
//! it), and what the control plane runs on.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use maud::html;
use rand::RngCore;

use super::auth::{self, Mutation, Session};
use super::ui::{self, Nav};
use super::{DashState, PageError, redirect_with_flash};
use crate::control::db::admin_users::Role;
use crate::control::db::{AdminTokenRevoke, Backend, DbError};

pub fn routes() -> Router<DashState> {
    Router::new()
        .route("/settings", get(page))
        .route("/settings/password", post(change_password))
        .route("/settings/users", post(create_user))
        .route("/settings/users/{id}", post(update_user))
        .route("/settings/users/{id}/password", post(reset_password))
        .route("/settings/tokens", post(create_token))
        .route("/settings/tokens/{id}/revoke", post(revoke_token))
        .route("/settings/sidecars", post(create_sidecar))
        .route("/settings/sidecars/{id}/revoke", post(revoke_sidecar))
}

/// What a settings page shows besides the lists: errors of one form, a secret shown once.
#[derive(Default)]
struct Notices {
    password_errors: Vec<String>,
    users_error: Option<String>,
    new_user: NewUserForm,
    tokens_error: Option<String>,
    sidecars_error: Option<String>,
    /// (element id, what it is, the secret).
    secret: Option<(&'static str, String, String)>,
}

#[derive(serde::Deserialize, Default, Clone)]
pub struct NewUserForm {
    #[serde(default)]
    email: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    password: String,
}

async fn page(
    State(state): State<DashState>,
    session: Session,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    render(
        &state,
        &session,
        &headers,
        &Notices::default(),
        StatusCode::OK,
    )
    .await
}

async fn render(
    state: &DashState,
    session: &Session,
    headers: &HeaderMap,
    n: &Notices,
    status: StatusCode,
) -> Result<Response, PageError> {
    let db = &state.db;
    let admin = session.is_admin();
    let users = if admin {
        db.list_admin_users().await?
    } else {
        Vec::new()
    };
    let tokens = db.list_admin_tokens().await?;
    let sidecars = db.list_sidecars().await?;
    let projects = db.list_projects(None).await?;
    let backend = match db.backend() {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    let content = html! {
        @if let Some((id, what, secret)) = &n.secret {
            section.key-once {
                p { strong { "Copy this " (what) " now: it is shown only once." } " Roony stores only its hash." }
                div.secret id=(id) data-test=(id) { (secret) }
            }
        }
        section id="account" {
            h2 { "Your account" }
            p { (session.user.name) " · " (session.user.email) " · " (ui::badge(session.user.role.as_str())) }
            {
                form method="post" action="/settings/password" id="password-form" data-test="change-password" {
                    (ui::csrf_field(session))
                    label { "Current password" input type="password" name="current" required autocomplete="current-password"; }
                    label { "New password (at least " (auth::MIN_PASSWORD_LEN) " characters)" input type="password" name="new" required autocomplete="new-password"; }
                    label { "New password again" input type="password" name="confirm" required autocomplete="new-password"; }
                    @for e in &n.password_errors { p.field-error data-field="password" { (e) } }
                    button type="submit" id="password-submit" { "Change password" }
                    p.muted.small { "Your other sessions end; this one stays signed in." }
                }
            }
        }
        @if admin {
            section id="users" {
                h2 { "Admin users" }
                @if let Some(e) = &n.users_error { p.error role="alert" id="users-error" { (e) } }
                table id="users-table" {
                    thead { tr { th { "Email" } th { "Name" } th { "Role" } th { "State" } th { "Change" } } }
                    tbody {
                        @for u in &users {
                            tr data-user=(u.id) data-email=(u.email) {
                                td { (u.email) }
                                td { (u.name) }
                                td { (ui::badge(u.role.as_str())) }
                                td { @if u.disabled_at.is_some() { (ui::badge("disabled")) } @else { (ui::badge("active")) } }
                                td {
                                    form.inline method="post" action={"/settings/users/" (super::agents::seg(&u.id))} data-test="update-user" {
                                        (ui::csrf_field(session))
                                        select name="role" {
                                            option value="admin" selected[u.role == Role::Admin] { "admin" }
                                            option value="viewer" selected[u.role == Role::Viewer] { "viewer" }
                                        }
                                        " "
                                        label.inline.small { input type="checkbox" name="disabled" value="true" checked[u.disabled_at.is_some()]; " disabled" }
                                        " "
                                        button.secondary type="submit" { "Save" }
                                    }
                                    @if u.id != session.user.id {
                                        details.inline {
                                            summary.small { "set password" }
                                            form method="post" action={"/settings/users/" (super::agents::seg(&u.id)) "/password"} data-test="reset-password" data-confirm="Set a new password? The user's sessions end." {
                                                (ui::csrf_field(session))
                                                label.small { "New password (at least " (auth::MIN_PASSWORD_LEN) " characters; tell the user, who should change it)"
                                                    input type="password" name="password" required autocomplete="new-password"; }
                                                button.secondary type="submit" { "Set password" }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                h3 { "Add a user" }
                form method="post" action="/settings/users" id="create-user-form" data-test="create-user" {
                    (ui::csrf_field(session))
                    label { "Email" input type="email" name="email" value=(n.new_user.email) required; }
                    label { "Name" input type="text" name="name" value=(n.new_user.name) required maxlength="200"; }
                    label { "Role"
                        select name="role" {
                            option value="viewer" selected[n.new_user.role != "admin"] { "viewer (reads everything, changes nothing)" }
                            option value="admin" selected[n.new_user.role == "admin"] { "admin" }
                        }
                    }
                    label { "Initial password (at least " (auth::MIN_PASSWORD_LEN) " characters)" input type="password" name="password" required autocomplete="new-password"; }
                    button type="submit" id="create-user-submit" { "Add user" }
                }
            }
        }
        section id="tokens" {
            h2 { "Admin API tokens" }
            @if let Some(e) = &n.tokens_error { p.error role="alert" id="tokens-error" { (e) } }
            @if tokens.is_empty() {
                p.muted { "no admin tokens" }
            } @else {
                table id="tokens-table" {
                    thead { tr { th { "Name" } th { "Id" } th { "Created" } th { "Last used" } th { "State" } th {} } }
                    tbody {
                        @for t in &tokens {
                            tr data-token=(t.id) {
                                td { (t.name) }
                                td { code { (t.id) } }
                                td.small { (ui::time(t.created_at)) }
                                td.small { @match t.last_used_at { Some(u) => { (ui::time(u)) }, None => { span.muted { "never" } }, } }
                                td { @match t.revoked_at { Some(r) => { (ui::badge("revoked")) " " span.small.muted { (ui::time(r)) } }, None => { (ui::badge("active")) }, } }
                                td {
                                    @if admin && t.revoked_at.is_none() {
                                        form.inline method="post" action={"/settings/tokens/" (super::agents::seg(&t.id)) "/revoke"} data-confirm="Revoke this admin token?" {
                                            (ui::csrf_field(session))
                                            button.danger type="submit" data-test="revoke-token" { "Revoke" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if admin {
                form.filters method="post" action="/settings/tokens" id="create-token-form" data-test="create-token" {
                    (ui::csrf_field(session))
                    label { "Name" input type="text" name="name" required maxlength="100" placeholder="ci"; }
                    button type="submit" id="create-token-submit" { "Create token" }
                }
            }
        }
        section id="sidecars" {
            h2 { "Sidecars" }
            @if let Some(e) = &n.sidecars_error { p.error role="alert" id="sidecars-error" { (e) } }
            @if sidecars.is_empty() {
                p.muted { "no sidecars" }
            } @else {
                table id="sidecars-table" {
                    thead { tr { th { "Name" } th { "Id" } th { "Project" } th { "Created" } th { "State" } th {} } }
                    tbody {
                        @for s in &sidecars {
                            tr data-sidecar=(s.id) {
                                td { (s.name) }
                                td { code { (s.id) } }
                                td { (projects.iter().find(|p| p.id == s.project_id).map_or(s.project_id.as_str(), |p| p.name.as_str())) }
                                td.small { (ui::time(s.created_at)) }
                                td { @match s.revoked_at { Some(_) => { (ui::badge("revoked")) }, None => { (ui::badge("active")) }, } }
                                td {
                                    @if admin && s.revoked_at.is_none() {
                                        form.inline method="post" action={"/settings/sidecars/" (super::agents::seg(&s.id)) "/revoke"} data-confirm="Revoke this sidecar? It stops syncing at once." {
                                            (ui::csrf_field(session))
                                            button.danger type="submit" data-test="revoke-sidecar" { "Revoke" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if admin {
                form.filters method="post" action="/settings/sidecars" id="create-sidecar-form" data-test="create-sidecar" {
                    (ui::csrf_field(session))
                    label { "Name" input type="text" name="name" required maxlength="200" placeholder="edge-1"; }
                    label { "Project"
                        select name="project_id" required {
                            @for p in &projects { option value=(p.id) { (p.name) } }
                        }
                    }
                    button type="submit" id="create-sidecar-submit" { "Create sidecar token" }
                }
            }
        }
        section.card id="control-plane" {
            h2 { "Control plane" }
            p { "Database: " strong id="db-backend" data-backend=(backend) { (backend) } }
            p { "Version: " strong id="version" { (env!("CARGO_PKG_VERSION")) } }
        }
    };
    let mut resp =
        ui::page_with_status(session, headers, Nav::Settings, "Settings", content, status);
    if n.secret.is_some() {
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    Ok(resp)
}

async fn hash(password: String) -> Result<String, PageError> {
    tokio::task::spawn_blocking(move || auth::hash_password(&password))
        .await
        .map_err(|_| {
            PageError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "try again",
            )
        })?
        .map_err(|e| PageError::new(StatusCode::INTERNAL_SERVER_ERROR, e.code(), &e.to_string()))
}

// ----- password ---------------------------------------------------------------------------

#[derive(serde::Deserialize, Default)]
pub struct PasswordForm {
    #[serde(default)]
    current: String,
    #[serde(default)]
    new: String,
    #[serde(default)]
    confirm: String,
}

/// `POST /settings/password`: checks the current password; ends the user's other sessions.
async fn change_password(
    State(state): State<DashState>,
    headers: HeaderMap,
    m: auth::OwnMutation<PasswordForm>,
) -> Result<Response, PageError> {
    let auth::OwnMutation { session, form } = m;
    // Checking the current password costs an argon2 verification: limited like sign-in
    // (a stolen session cannot guess the password quickly, nor burn the server's memory).
    if let Err(secs) = state
        .login_limiter
        .check_password_change(&session.user.email)
    {
        let n = Notices {
            password_errors: vec![format!(
                "too many wrong passwords; try again in {secs} seconds"
            )],
            ..Default::default()
        };
        let mut resp = render(
            &state,
            &session,
            &headers,
            &n,
            StatusCode::TOO_MANY_REQUESTS,
        )
        .await?;
        if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return Ok(resp);
    }
    let stored = state
        .db
        .admin_user_for_login(&session.user.email)
        .await?
        .and_then(|(_, h)| h)
        .unwrap_or_default();
    let current = form.current.clone();
    let ok = tokio::task::spawn_blocking(move || auth::verify_password(&current, &stored))
        .await
        .unwrap_or(false);
    let mut errors = Vec::new();
    if !ok {
        state
            .login_limiter
            .password_change_failed(&session.user.email);
        errors.push("the current password is not correct".to_string());
    }
    if let Err(e) = auth::check_new_password(&form.new) {
        errors.push(e.to_string());
    }
    if form.new != form.confirm {
        errors.push("the new passwords do not match".to_string());
    }
    if !errors.is_empty() {
        let n = Notices {
            password_errors: errors,
            ..Default::default()
        };
        return render(
            &state,
            &session,
            &headers,
            &n,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    }
    let hashed = hash(form.new).await?;
    state
        .db
        .set_admin_password(
            &session.user.id,
            &hashed,
            Some(&session.id),
            &session.actor(),
            auth::unix_now(),
        )
        .await?;
    Ok(redirect_with_flash(
        "/settings",
        "password changed; your other sessions were signed out",
        &headers,
    ))
}

// ----- users ------------------------------------------------------------------------------

/// `POST /settings/users`: a new user with a role and an initial password.
async fn create_user(
    State(state): State<DashState>,
    headers: HeaderMap,
    m: Mutation<NewUserForm>,
) -> Result<Response, PageError> {
    let Mutation { session, form } = m;
    let email = form.email.trim().to_string();
    let name = form.name.trim().to_string();
    let role = Role::parse(form.role.trim());
    let problem = if !email.contains('@')
        || email.len() > 254
        || email.chars().any(char::is_control)
    {
        Some("enter a valid email address".to_string())
    } else if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        Some("the name must be 1 to 200 printable characters".to_string())
    } else if role.is_none() {
        Some("choose the role admin or viewer".to_string())
    } else {
        auth::check_new_password(&form.password)
            .err()
            .map(|e| e.to_string())
    };
    let fail = |msg: String, status: StatusCode| {
        let mut shown = form.clone();
        shown.password.clear();
        let n = Notices {
            users_error: Some(msg),
            new_user: shown,
            ..Default::default()
        };
        (n, status)
    };
    if let Some(msg) = problem {
        let (n, status) = fail(msg, StatusCode::UNPROCESSABLE_ENTITY);
        return render(&state, &session, &headers, &n, status).await;
    }
    let role = role.unwrap_or(Role::Viewer);
    let hashed = hash(form.password.clone()).await?;
    match state
        .db
        .create_admin_user(
            &email,
            &name,
            role,
            &hashed,
            &session.actor(),
            auth::unix_now(),
        )
        .await
    {
        Ok(u) => Ok(redirect_with_flash(
            "/settings",
            &format!("user {} added as {}", u.email, u.role.as_str()),
            &headers,
        )),
        Err(DbError::Conflict(_)) => {
            let (n, status) = fail("a user with that email exists".into(), StatusCode::CONFLICT);
            render(&state, &session, &headers, &n, status).await
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(serde::Deserialize, Default)]
pub struct UpdateUserForm {
    #[serde(default)]
    role: String,
    #[serde(default)]
    disabled: Option<String>,
}

/// `POST /settings/users/{id}`: role and disabled; the last admin stays.
#[derive(serde::Deserialize, Default)]
pub struct ResetPasswordForm {
    #[serde(default)]
    password: String,
}

/// `POST /settings/users/{id}/password`: an admin sets another user's password (a user who
/// forgot theirs); every session of that user ends. One's own password is changed with the
/// current one (`/settings/password`).
async fn reset_password(
    State(state): State<DashState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    m: Mutation<ResetPasswordForm>,
) -> Result<Response, PageError> {
    let Mutation { session, form } = m;
    if id == session.user.id {
        let n = Notices {
            users_error: Some("change your own password with your current one, above".into()),
            ..Default::default()
        };
        return render(
            &state,
            &session,
            &headers,
            &n,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    }
    let user = state.db.get_admin_user(&id).await?;
    if let Err(e) = auth::check_new_password(&form.password) {
        let n = Notices {
            users_error: Some(format!("{}: {e}", user.email)),
            ..Default::default()
        };
        return render(
            &state,
            &session,
            &headers,
            &n,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    }
    let hashed = hash(form.password).await?;
    state
        .db
        .set_admin_password(&id, &hashed, None, &session.actor(), auth::unix_now())
        .await?;
    Ok(redirect_with_flash(
        "/settings",
        &format!(
            "new password set for {}; their sessions were signed out",
            user.email
        ),
        &headers,
    ))
}

async fn update_user(
    State(state): State<DashState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    m: Mutation<UpdateUserForm>,
) -> Result<Response, PageError> {
    let Mutation { session, form } = m;
    let Some(role) = Role::parse(form.role.trim()) else {
        let n = Notices {
            users_error: Some("choose the role admin or viewer".into()),
            ..Default::default()
        };
        return render(
            &state,
            &session,
            &headers,
            &n,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    };
    let disabled = form
        .disabled
        .as_deref()
        .is_some_and(|v| matches!(v, "true" | "on" | "1"));
    match state
        .db
        .update_admin_user(&id, role, disabled, &session.actor(), auth::unix_now())
        .await
    {
        Ok(u) => {
            // Demoting or disabling yourself: this session can no longer change settings.
            let to = if u.id == session.user.id && (disabled || role != Role::Admin) {
                "/"
            } else {
                "/settings"
            };
            Ok(redirect_with_flash(
                to,
                &format!(
                    "{} is now {}{}",
                    u.email,
                    u.role.as_str(),
                    if u.disabled_at.is_some() {
                        " (disabled)"
                    } else {
                        ""
                    }
                ),
                &headers,
            ))
        }
        Err(DbError::Conflict(msg)) => {
            let n = Notices {
                users_error: Some(msg),
                ..Default::default()
            };
            render(&state, &session, &headers, &n, StatusCode::CONFLICT).await
        }
        Err(e) => Err(e.into()),
    }
}

// ----- admin API tokens -------------------------------------------------------------------

#[derive(serde::Deserialize, Default)]
pub struct NameForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    project_id: String,
}

/// `POST /settings/tokens`: a new admin API token, shown once.
async fn create_token(
    State(state): State<DashState>,
    headers: HeaderMap,
    m: Mutation<NameForm>,
) -> Result<Response, PageError> {
    let Mutation { session, form } = m;
    let name = form.name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        let n = Notices {
            tokens_error: Some("the name must be 1 to 100 printable characters".into()),
            ..Default::default()
        };
        return render(
            &state,
            &session,
            &headers,
            &n,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    }
    let token = crate::control::generate_admin_token();
    let key = crate::auth::from_plaintext(&token).map_err(|_| {
        PageError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the token could not be made; try again",
        )
    })?;
    state
        .db
        .create_admin_token(name, &key, &session.actor(), auth::unix_now())
        .await?;
    let n = Notices {
        secret: Some(("new-admin-token", "admin API token".into(), token)),
        ..Default::default()
    };
    render(&state, &session, &headers, &n, StatusCode::OK).await
}

/// `POST /settings/tokens/{id}/revoke`.
async fn revoke_token(
    State(state): State<DashState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    m: Mutation<NameForm>,
) -> Result<Response, PageError> {
    let session = m.session;
    let message = match state
        .db
        .revoke_admin_token(&id, &session.actor(), auth::unix_now())
        .await?
    {
        AdminTokenRevoke::Revoked(t) => {
            return Ok(redirect_with_flash(
                "/settings",
                &format!("admin token {} revoked", t.name),
                &headers,
            ));
        }
        AdminTokenRevoke::AlreadyRevoked(_) => "the admin token is already revoked",
        AdminTokenRevoke::LastActive => {
            "the only active admin token cannot be revoked; create another one first"
        }
    };
    let n = Notices {
        tokens_error: Some(message.into()),
        ..Default::default()
    };
    render(&state, &session, &headers, &n, StatusCode::CONFLICT).await
}

// ----- sidecars ---------------------------------------------------------------------------

/// `POST /settings/sidecars`: a new sidecar of a project; its token is shown once.
async fn create_sidecar(
    State(state): State<DashState>,
    headers: HeaderMap,
    m: Mutation<NameForm>,
) -> Result<Response, PageError> {
    let Mutation { session, form } = m;
    let name = form.name.trim();
    let problem =
        if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
            Some("the name must be 1 to 200 printable characters")
        } else if state.db.get_project(&form.project_id).await.is_err() {
            Some("choose a project")
        } else {
            None
        };
    if let Some(msg) = problem {
        let n = Notices {
            sidecars_error: Some(msg.into()),
            ..Default::default()
        };
        return render(
            &state,
            &session,
            &headers,
            &n,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    }
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let token = format!(
        "{}{}",
        crate::sync::wire::SIDECAR_TOKEN_PREFIX,
        hex::encode(secret)
    );
    let key = crate::auth::from_plaintext(&token).map_err(|_| {
        PageError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the token could not be made; try again",
        )
    })?;
    let sidecar = state
        .db
        .create_sidecar(
            &form.project_id,
            name,
            &key,
            &session.actor(),
            auth::unix_now(),
        )
        .await?;
    let n = Notices {
        secret: Some((
            "new-sidecar-token",
            format!("token of sidecar {}", sidecar.name),
            token,
        )),
        ..Default::default()
    };
    render(&state, &session, &headers, &n, StatusCode::OK).await
}

/// `POST /settings/sidecars/{id}/revoke`.
async fn revoke_sidecar(
    State(state): State<DashState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    m: Mutation<NameForm>,
) -> Result<Response, PageError> {
    let sidecar = state
        .db
        .revoke_sidecar(&id, &m.session.actor(), auth::unix_now())
        .await?;
    Ok(redirect_with_flash(
        "/settings",
        &format!("sidecar {} revoked", sidecar.name),
        &headers,
    ))
}
