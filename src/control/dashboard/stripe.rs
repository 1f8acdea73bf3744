//! The Stripe connection page: status of the organization's connection, "Connect Stripe"
//! (OAuth with a `state` bound to this admin session), the OAuth callback, token refresh
//! and "Disconnect". The OAuth and token logic is `control::connect`; this module only
//! renders and routes.

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{Markup, html};

use super::auth::{Mutation, Session};
use super::ui::{self, Nav};
use super::{DashState, PageError, redirect_with_flash};
use crate::control::connect::{self, CallbackParams, ConnectError, ConnectionStatus};

pub fn routes() -> Router<DashState> {
    Router::new()
        .route("/stripe", get(page))
        .route("/stripe/connect", post(start))
        .route(connect::CALLBACK_PATH, get(callback))
        .route("/stripe/refresh", post(refresh))
        .route("/stripe/disconnect", post(disconnect))
}

#[derive(serde::Deserialize)]
pub struct NoFields {}

/// What binds an OAuth `state` to this browser session: the session's public id and its
/// CSRF token (derived from the cookie's secret; stored only hashed by `connect`).
fn binding(session: &Session) -> String {
    format!("{}:{}", session.id, session.csrf)
}

async fn org_id(state: &DashState) -> Result<String, PageError> {
    state
        .db
        .default_org()
        .await?
        .map(|o| o.id)
        .ok_or_else(|| PageError::not_found("organization"))
}

fn connect_error(e: ConnectError) -> PageError {
    if let ConnectError::Storage(db) = e {
        return db.into();
    }
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    PageError::new(status, e.code(), &e.to_string())
}

fn opt_time(t: Option<i64>) -> String {
    t.map(ui::time).unwrap_or_else(|| "—".into())
}

fn status_table(s: &ConnectionStatus) -> Markup {
    html! {
        table id="stripe-connection" data-status=(s.status) data-mode=(s.mode) {
            tr { th { "Mode" } td { (match s.mode.as_str() {
                "connect" => "Stripe Connect (OAuth)",
                "direct" => "Direct: a restricted key from the control plane's environment",
                _ => "Not configured",
            }) } }
            tr { th { "Status" } td { (ui::badge(&s.status)) } }
            tr { th { "Connected account" } td { code { (s.account_id.as_deref().unwrap_or("—")) } } }
            tr { th { "Scope" } td { (s.scope.as_deref().unwrap_or("—")) } }
            tr { th { "Mode of the keys" } td { @if s.livemode { "live" } @else { "test" } } }
            tr { th { "Connected" } td { (opt_time(s.connected_at)) } }
            tr { th { "Tokens refreshed" } td { (opt_time(s.refreshed_at)) } }
            tr { th { "Encryption key id" } td { code { (s.key_id.as_deref().unwrap_or("—")) } } }
            @if s.disconnected_at.is_some() {
                tr { th { "Disconnected" } td { (opt_time(s.disconnected_at)) " "
                    span.muted { "(" (s.disconnect_reason.as_deref().unwrap_or("unknown")) ")" } } }
            }
        }
    }
}

/// `GET /stripe`.
async fn page(
    State(state): State<DashState>,
    session: Session,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let org = org_id(&state).await?;
    let status = connect::status(&state.db, &org)
        .await
        .map_err(connect_error)?;
    let content = html! {
        div.grid2 {
            section {
                h2 { "Connection" }
                (status_table(&status))
                @if session.is_admin() {
                    div.actions.spaced {
                        @if status.mode == "connect" && !status.is_connected() {
                            form.inline method="post" action="/stripe/connect" hx-boost="false" {
                                (ui::csrf_field(&session))
                                button id="connect-stripe" type="submit" { "Connect Stripe" }
                            }
                        }
                        @if status.mode == "connect" && status.is_connected() {
                            p.muted.small id="connect-another" {
                                "To connect a different Stripe account, disconnect this one first: "
                                "its cards are canceled and Roony stops issuing until the new account is connected."
                            }
                            form.inline method="post" action="/stripe/refresh" {
                                (ui::csrf_field(&session))
                                button.secondary id="refresh-stripe" type="submit" { "Refresh tokens" }
                            }
                            form.inline method="post" action="/stripe/disconnect"
                                data-confirm="Disconnect Stripe? Every active card of the organization is canceled and Roony stops issuing cards until it is connected again." {
                                (ui::csrf_field(&session))
                                button.danger id="disconnect-stripe" type="submit" { "Disconnect" }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Where the credentials live" }
                p { "Stripe credentials live only at the control plane: the Connect tokens are "
                    "stored encrypted (AES-256-GCM; the key comes from " code { "ROONY_SECRETS_KEY" }
                    " or a key file, and its id is stored for rotation), or the direct mode's "
                    "restricted key comes from the control plane's environment." }
                p { "Sidecars issue cards through the control plane's issuing relay with their "
                    "sidecar token, which can only create cards the control plane checks against "
                    "the agent's policy; an agent on a sidecar's host cannot reach a key that "
                    "issues cards outside policy. While the account is disconnected, purchases "
                    "decline with " code { "stripe_account_disconnected" } "." }
                p.muted.small { "Details: docs/stripe-credentials.md." }
            }
        }
    };
    Ok(ui::page(&session, &headers, Nav::Stripe, "Stripe", content))
}

/// `POST /stripe/connect`: to Stripe's authorize page.
async fn start(
    State(state): State<DashState>,
    headers: HeaderMap,
    m: Mutation<NoFields>,
) -> Result<Response, PageError> {
    let org = org_id(&state).await?;
    let url = match connect::begin(
        &state.db,
        &org,
        &binding(&m.session),
        crate::control::unix_now(),
    )
    .await
    {
        Ok(url) => url,
        Err(e @ ConnectError::AlreadyConnected) => {
            return Ok(redirect_with_flash(
                "/stripe",
                &format!("not started: {e}"),
                &headers,
            ));
        }
        Err(e) => return Err(connect_error(e)),
    };
    Ok(Redirect::to(&url).into_response())
}

#[derive(serde::Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// `GET /stripe/callback`: Stripe's redirect back. The `state` (bound to the session that
/// started the flow) is what protects this state-changing GET; only admins may finish it.
async fn callback(
    State(state): State<DashState>,
    session: Session,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Result<Response, PageError> {
    session.require_admin()?;
    let org = org_id(&state).await?;
    let result = connect::complete(
        &state.db,
        &org,
        &binding(&session),
        CallbackParams {
            code: q.code,
            state: q.state,
            error: q.error,
            error_description: q.error_description,
        },
        &session.actor(),
        crate::control::unix_now(),
    )
    .await;
    match result {
        Ok(s) => Ok(redirect_with_flash(
            "/stripe",
            &format!(
                "connected stripe account {}",
                s.account_id.as_deref().unwrap_or("")
            ),
            &headers,
        )),
        Err(
            e @ (ConnectError::Denied(_)
            | ConnectError::AlreadyConnected
            | ConnectError::GrantRefused(_)),
        ) => Ok(redirect_with_flash(
            "/stripe",
            &format!("not connected: {e}"),
            &headers,
        )),
        Err(e) => Err(connect_error(e)),
    }
}

/// `POST /stripe/refresh`.
async fn refresh(
    State(state): State<DashState>,
    headers: HeaderMap,
    m: Mutation<NoFields>,
) -> Result<Response, PageError> {
    let org = org_id(&state).await?;
    connect::refresh(
        &state.db,
        &org,
        &m.session.actor(),
        crate::control::unix_now(),
    )
    .await
    .map_err(connect_error)?;
    Ok(redirect_with_flash(
        "/stripe",
        "stripe tokens refreshed",
        &headers,
    ))
}

/// `POST /stripe/disconnect`.
async fn disconnect(
    State(state): State<DashState>,
    headers: HeaderMap,
    m: Mutation<NoFields>,
) -> Result<Response, PageError> {
    let org = org_id(&state).await?;
    let outcome = connect::disconnect(
        &state.db,
        &org,
        &m.session.actor(),
        crate::control::unix_now(),
    )
    .await
    .map_err(connect_error)?;
    let mut message = format!(
        "stripe disconnected; {} card(s) canceled; purchases decline with stripe_account_disconnected until it is connected again",
        outcome.canceled_cards.len()
    );
    if !outcome.cancel_failures.is_empty() {
        message.push_str(&format!(
            ". {} card(s) could not be canceled — cancel them in stripe's dashboard: {}",
            outcome.cancel_failures.len(),
            outcome
                .cancel_failures
                .iter()
                .map(|(card, _)| card.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if let Some(said) = &outcome.stripe_error {
        message.push_str(&format!(
            ". stripe did not confirm the deauthorization ({said}); check the connection in stripe's dashboard"
        ));
    }
    Ok(redirect_with_flash("/stripe", &message, &headers))
}
