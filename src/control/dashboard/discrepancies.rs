//! The Discrepancies page of the dashboard: money that moved differently from what was
//! approved, filtered by state and kind, and resolving one with a note.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{get, post};
use maud::html;

use super::auth::{self, Mutation, Session};
use super::ui::{self, Nav};
use super::{DashState, PageError, redirect_with_flash};
use crate::control::db::DiscrepancyFilter;
use crate::control::model::Cursor;

pub fn routes() -> Router<DashState> {
    Router::new()
        .route("/discrepancies", get(page))
        .route("/discrepancies/{id}/resolve", post(resolve))
}

const KINDS: &[&str] = &[
    "over_capture",
    "force_capture",
    "capture_on_inactive_intent",
    "merchant_mismatch",
    "unmatched_refund",
    "unknown_card",
    "orphan_card",
];

#[derive(serde::Deserialize, Default)]
pub struct Filters {
    /// `open` (default), `resolved` or `all`.
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
}

async fn page(
    State(state): State<DashState>,
    session: Session,
    headers: HeaderMap,
    Query(q): Query<Filters>,
) -> Result<Response, PageError> {
    let status = q
        .status
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or("open");
    let resolved = match status {
        "open" => Some(false),
        "resolved" => Some(true),
        "all" => None,
        _ => {
            return Err(PageError::bad_request(
                "invalid_filter",
                "status must be open, resolved or all",
            ));
        }
    };
    let kind = q.kind.clone().filter(|k| !k.is_empty());
    if let Some(k) = &kind
        && !KINDS.contains(&k.as_str())
    {
        return Err(PageError::bad_request(
            "invalid_filter",
            "unknown discrepancy kind",
        ));
    }
    let cursor = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(Cursor::decode(c).ok_or_else(|| {
            PageError::bad_request("invalid_cursor", "the page link is not valid; start again")
        })?),
    };
    let filter = DiscrepancyFilter {
        kind: kind.clone(),
        resolved,
        ..Default::default()
    };
    let page = state.db.list_discrepancies(&filter, 50, cursor).await?;
    let next_href = page.next_cursor.as_ref().map(|c| {
        format!(
            "/discrepancies?status={}&kind={}&cursor={}",
            ui::url_encode(status),
            ui::url_encode(kind.as_deref().unwrap_or("")),
            ui::url_encode(c)
        )
    });
    let admin = session.is_admin();
    let content = html! {
        form.filters method="get" action="/discrepancies" id="discrepancy-filters" {
            label { "State"
                select name="status" {
                    @for s in ["open", "resolved", "all"] {
                        option value=(s) selected[s == status] { (s) }
                    }
                }
            }
            label { "Kind"
                select name="kind" {
                    option value="" { "any" }
                    @for k in KINDS {
                        option value=(k) selected[kind.as_deref() == Some(*k)] { (k) }
                    }
                }
            }
            button.secondary type="submit" { "Filter" }
        }
        @if page.items.is_empty() {
            p.muted id="no-discrepancies" { "no discrepancies match" }
        } @else {
            table id="discrepancies-table" {
                thead { tr {
                    th { "Detected" } th { "Kind" } th { "Agent" } th { "Purchase" } th.num { "Amount" }
                    th { "Stripe object" } th { "State" }
                } }
                tbody {
                    @for d in &page.items {
                        tr id={"discrepancy-" (d.id)} data-discrepancy=(d.id) data-kind=(d.kind) {
                            td.small { (ui::time(d.created_at)) }
                            td {
                                (ui::badge(&d.kind))
                                details { summary.small { "details" } pre { (serde_json::to_string_pretty(&d.details).unwrap_or_default()) } }
                            }
                            td { @match &d.agent_id {
                                Some(a) => { a href={"/agents/" (super::agents::seg(a))} { (a) } },
                                None => { span.muted { "—" } },
                            } }
                            td { @match &d.intent_id {
                                Some(i) => { a href={"/transactions/" (super::agents::seg(i))} { (i) } },
                                None => { span.muted { "—" } },
                            } }
                            td.num { @if let (Some(a), Some(c)) = (d.amount, &d.currency) { (ui::money(a, c)) } }
                            td.small { @if let Some(o) = &d.stripe_object_id { code { (o) } } }
                            td {
                                @match d.resolved_at {
                                    Some(t) => {
                                        (ui::badge("resolved"))
                                        div.small.muted { (ui::time(t)) " by " (d.resolved_by.as_deref().unwrap_or("?")) }
                                        @if let Some(n) = &d.resolution_note { div.small { (n) } }
                                    },
                                    None => {
                                        (ui::badge("open"))
                                        @if admin {
                                            form method="post" action={"/discrepancies/" (super::agents::seg(&d.id)) "/resolve"} data-test="resolve-discrepancy" {
                                                (ui::csrf_field(&session))
                                                input type="text" name="note" placeholder="note (optional)" maxlength="1000";
                                                " "
                                                button.secondary type="submit" { "Resolve" }
                                            }
                                        }
                                    },
                                }
                            }
                        }
                    }
                }
            }
            @if let Some(href) = &next_href {
                p { a id="discrepancies-next" href=(href) { "Next page →" } }
            }
        }
    };
    Ok(ui::page(
        &session,
        &headers,
        Nav::Discrepancies,
        "Discrepancies",
        content,
    ))
}

#[derive(serde::Deserialize, Default)]
pub struct ResolveForm {
    #[serde(default)]
    note: String,
}

/// `POST /discrepancies/{id}/resolve`.
async fn resolve(
    State(state): State<DashState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    m: Mutation<ResolveForm>,
) -> Result<Response, PageError> {
    let note = super::agents::check_note(&m.form.note)?;
    state
        .db
        .resolve_discrepancy(&id, note.as_deref(), &m.session.actor(), auth::unix_now())
        .await?;
    Ok(redirect_with_flash(
        "/discrepancies",
        "discrepancy resolved",
        &headers,
    ))
}
