//! The Audit log page of the dashboard: the control plane's hash-chained audit events,
//! filtered and paged (newest first), and verifying the chain.

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use maud::{Markup, html};

use super::auth::{OwnMutation, Session};
use super::ui::{self, Nav};
use super::{DashState, PageError};
use crate::control::db::AuditPageFilter;
use crate::control::model::Cursor;

pub fn routes() -> Router<DashState> {
    Router::new()
        .route("/audit", get(page))
        .route("/audit/verify", post(verify))
}

/// Actor types offered in the filter (any `[a-z_]` name is accepted).
const ACTOR_TYPES: &[&str] = &[
    "admin_user",
    "admin_session",
    "admin_token",
    "anonymous",
    "sidecar",
    "stripe",
    "system",
    "setup_token",
];

const PAGE_SIZE: i64 = 50;

#[derive(serde::Deserialize, Default, Clone)]
pub struct Filters {
    #[serde(default)]
    actor_type: Option<String>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    target_id: Option<String>,
    #[serde(default)]
    actor_id: Option<String>,
    /// `YYYY-MM-DD` (UTC), inclusive.
    #[serde(default)]
    from: Option<String>,
    /// `YYYY-MM-DD` (UTC), inclusive.
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
}

/// The unix second a `YYYY-MM-DD` filter day starts at; an error names the field.
fn day_start(field: &str, v: &Option<String>) -> Result<Option<i64>, PageError> {
    match clean(v) {
        None => Ok(None),
        Some(t) => super::transactions::parse_date(&t)
            .map(|d| Some(d.saturating_mul(86_400)))
            .ok_or_else(|| {
                PageError::bad_request(
                    "invalid_filter",
                    &format!("{field} must be a date like 2026-12-31"),
                )
            }),
    }
}

fn clean(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

async fn page(
    State(state): State<DashState>,
    session: Session,
    headers: HeaderMap,
    Query(q): Query<Filters>,
) -> Result<Response, PageError> {
    let content = render(&state, &session, &q, None).await?;
    Ok(ui::page(
        &session,
        &headers,
        Nav::Audit,
        "Audit log",
        content,
    ))
}

async fn render(
    state: &DashState,
    session: &Session,
    q: &Filters,
    verified: Option<Markup>,
) -> Result<Markup, PageError> {
    let filter = AuditPageFilter {
        actor_type: clean(&q.actor_type),
        action_prefix: clean(&q.action),
        target_id: clean(&q.target_id),
        actor_id: clean(&q.actor_id),
        from: day_start("from", &q.from)?,
        // Inclusive: events before the next day's start.
        to: day_start("to", &q.to)?.map(|t| t.saturating_add(86_400)),
    };
    for v in [&filter.action_prefix, &filter.target_id, &filter.actor_id] {
        if v.as_ref().is_some_and(|s| s.chars().count() > 200) {
            return Err(PageError::bad_request(
                "invalid_filter",
                "filters must be at most 200 characters",
            ));
        }
    }
    if let Some(a) = &filter.actor_type
        && (a.len() > 40 || !a.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
    {
        return Err(PageError::bad_request(
            "invalid_filter",
            "unknown actor type",
        ));
    }
    let cursor = match clean(&q.cursor) {
        None => None,
        Some(c) => Some(Cursor::decode(&c).ok_or_else(|| {
            PageError::bad_request("invalid_cursor", "the page link is not valid; start again")
        })?),
    };
    let page = state
        .db
        .dash_a_audit_page(&filter, PAGE_SIZE, cursor)
        .await?;
    let next_href = page.next_cursor.as_ref().map(|c| {
        format!(
            "/audit?actor_type={}&action={}&target_id={}&actor_id={}&from={}&to={}&cursor={}",
            ui::url_encode(filter.actor_type.as_deref().unwrap_or("")),
            ui::url_encode(filter.action_prefix.as_deref().unwrap_or("")),
            ui::url_encode(filter.target_id.as_deref().unwrap_or("")),
            ui::url_encode(filter.actor_id.as_deref().unwrap_or("")),
            ui::url_encode(clean(&q.from).as_deref().unwrap_or("")),
            ui::url_encode(clean(&q.to).as_deref().unwrap_or("")),
            ui::url_encode(c)
        )
    });
    Ok(html! {
        // Reading the chain changes nothing: viewers (security reviewers) may verify too.
        {
            div.actions {
                form.inline method="post" action="/audit/verify" id="verify-chain-form" {
                    (ui::csrf_field(session))
                    button.secondary type="submit" id="verify-chain" data-test="verify-chain" { "Verify chain" }
                }
                span.muted.small { "Recomputes every event's hash and compares the chain's end with its recorded head." }
            }
        }
        @if let Some(v) = verified { (v) }
        form.filters method="get" action="/audit" id="audit-filters" {
            label { "Actor type"
                select name="actor_type" {
                    option value="" { "any" }
                    @for a in ACTOR_TYPES {
                        option value=(a) selected[filter.actor_type.as_deref() == Some(*a)] { (a) }
                    }
                }
            }
            label { "Action starts with"
                input type="text" name="action" value=(filter.action_prefix.as_deref().unwrap_or("")) placeholder="agent.";
            }
            label { "Target id"
                input type="text" name="target_id" value=(filter.target_id.as_deref().unwrap_or(""));
            }
            label { "Actor id"
                input type="text" name="actor_id" value=(filter.actor_id.as_deref().unwrap_or(""));
            }
            label { "From (UTC)"
                input type="date" name="from" value=(clean(&q.from).unwrap_or_default());
            }
            label { "To (UTC)"
                input type="date" name="to" value=(clean(&q.to).unwrap_or_default());
            }
            button.secondary type="submit" { "Filter" }
        }
        @if page.items.is_empty() {
            p.muted id="no-audit-events" { "no audit events match" }
        } @else {
            table id="audit-table" {
                thead { tr {
                    th { "Time" } th { "Actor" } th { "Action" } th { "Target" } th { "Outcome" } th { "Request id" }
                } }
                tbody {
                    @for e in &page.items {
                        tr data-event=(e.id) data-action=(e.action) data-actor-type=(e.actor_type) {
                            td.small { (ui::time(e.created_at)) }
                            td { span.muted.small { (e.actor_type) } br; (e.actor_id) }
                            td {
                                code { (e.action) }
                                details {
                                    summary.small { "details" }
                                    pre { (serde_json::to_string_pretty(&e.details).unwrap_or_default()) }
                                }
                            }
                            td { span.muted.small { (e.target_type) } br; (e.target_id) }
                            td { (ui::badge(&e.outcome)) }
                            td.small { @if let Some(r) = &e.request_id { code { (r) } } }
                        }
                    }
                }
            }
            @if let Some(href) = &next_href {
                p { a id="audit-next" href=(href) { "Older events →" } }
            }
        }
    })
}

/// `POST /audit/verify`: read-only, but a form with CSRF like every POST (any role).
async fn verify(
    State(state): State<DashState>,
    headers: HeaderMap,
    m: OwnMutation<Filters>,
) -> Result<Response, PageError> {
    let session = m.session;
    let result = state.db.verify_audit_chain().await?;
    let (status, markup) = match result {
        Ok(report) => (
            StatusCode::OK,
            html! {
                p.flash role="status" id="verify-result" data-result="ok" data-count=(report.count) {
                    "The audit chain verifies: " strong { (report.count) } " events, head "
                    code { (report.head) }
                }
            },
        ),
        Err(broken) => (
            StatusCode::OK,
            html! {
                p.error role="alert" id="verify-result" data-result="broken" data-seq=(broken.seq) {
                    "The audit chain is broken at event #" (broken.seq) " (" code { (broken.id) } "): "
                    strong { (broken.reason) }
                }
            },
        ),
    };
    let content = render(&state, &session, &Filters::default(), Some(markup)).await?;
    Ok(ui::page_with_status(
        &session,
        &headers,
        Nav::Audit,
        "Audit log",
        content,
        status,
    ))
}
