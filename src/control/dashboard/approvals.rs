//! The Approvals queue: purchases waiting for an administrator (`pending_approval`), each
//! approved or denied with an optional note through `ControlDb::decide_pending` (the same
//! write as the admin API's approve/deny: ledger decision, audit event, and the bundle's
//! `approvals` carry it to the sidecar), and the latest decisions.

use std::collections::HashMap;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use maud::html;

use super::auth::{Mutation, Session, unix_now};
use super::ui::{self, Nav};
use super::{DashState, PageError, redirect_with_flash};
use crate::control::db::DbError;

pub fn routes() -> Router<DashState> {
    Router::new()
        .route("/approvals", get(page))
        .route("/approvals/{id}/approve", post(approve))
        .route("/approvals/{id}/deny", post(deny))
}

/// Longest note, characters (as the admin API).
const MAX_NOTE: usize = 1000;

/// "3 min", "2 h 5 min", "4 d 1 h".
pub fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    if s < 60 {
        format!("{s} s")
    } else if s < 3600 {
        format!("{} min", s / 60)
    } else if s < 86_400 {
        format!("{} h {} min", s / 3600, (s % 3600) / 60)
    } else {
        format!("{} d {} h", s / 86_400, (s % 86_400) / 3600)
    }
}

/// `GET /approvals`.
async fn page(
    State(state): State<DashState>,
    session: Session,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let pending = state.db.dash_pending_approvals(200).await?;
    let recent = state.db.dash_recent_admin_decisions(20).await?;
    let names: HashMap<String, String> = state.db.dash_agent_names().await?.into_iter().collect();
    let name = |id: &str| names.get(id).cloned().unwrap_or_else(|| id.to_string());
    let now = unix_now();
    let content = html! {
        section #pending-approvals data-count=(pending.len()) {
            h2 { "Waiting (" (pending.len()) ")" }
            @if pending.is_empty() {
                p.muted #no-pending { "Nothing is waiting for approval." }
            } @else {
                table #approvals-table {
                    thead { tr { th { "Agent" } th { "Purchase" } th.num { "Amount" } th { "Why it waits" } th { "Age" } th { "Decision" } } }
                    tbody {
                        @for i in &pending {
                            tr id={"approval-" (i.id)} data-test="approval-row" data-intent-id=(i.id) {
                                td { (name(&i.agent_id)) br; span.small.muted { (i.agent_id) } }
                                td {
                                    a href={"/transactions/" (super::policies::seg(&i.id))} { (i.merchant_name) }
                                    @if let Some(d) = &i.merchant_domain { br; span.small.muted { (d) } }
                                    @if let Some(d) = &i.description { br; span.small { (d) } }
                                    br; span.small.muted { (i.id) }
                                }
                                td.num { (ui::money(i.amount, &i.currency)) }
                                td.small {
                                    (i.reasons.join(", "))
                                    @if let Some(score) = i.risk_score {
                                        br; "risk " strong { (score) }
                                        @if !i.risk_signals.is_empty() { ": " (i.risk_signals.join(", ")) }
                                    }
                                }
                                td.small title=(ui::time(i.created_at)) { (age(now - i.created_at)) }
                                td {
                                    @if session.is_admin() {
                                        form.approval-form hx-boost="false" method="post" action={"/approvals/" (super::policies::seg(&i.id)) "/approve"} {
                                            (ui::csrf_field(&session))
                                            textarea name="note" rows="2" maxlength=(MAX_NOTE) placeholder="note (optional)" data-test="approval-note" {}
                                            div.actions {
                                                button type="submit" data-test="approve" { "Approve" }
                                                button.danger type="submit" formaction={"/approvals/" (super::policies::seg(&i.id)) "/deny"} data-test="deny" { "Deny" }
                                            }
                                        }
                                    } @else {
                                        span.muted.small { "admins decide" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        section #recent-decisions {
            h2 { "Recently decided" }
            @if recent.is_empty() {
                p.muted { "No decisions by administrators yet." }
            } @else {
                table #recent-decisions-table {
                    thead { tr { th { "Decided" } th { "Agent" } th { "Purchase" } th.num { "Amount" } th { "Decision" } th { "By" } th { "Note" } } }
                    tbody {
                        @for r in &recent {
                            tr data-test="decided-row" data-intent-id=(r.decision.intent_id) data-outcome=(r.decision.outcome) {
                                td.small { (ui::time(r.decision.created_at)) }
                                td { (name(&r.decision.agent_id)) }
                                td { a href={"/transactions/" (super::policies::seg(&r.decision.intent_id))} { (r.merchant_name) } }
                                td.num { (ui::money(r.amount, &r.currency)) }
                                td { (ui::badge(&r.decision.outcome)) }
                                td { (r.decision.actor.as_deref().unwrap_or("")) }
                                td.small data-test="decided-note" { (r.decision.note.as_deref().unwrap_or("")) }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(ui::page(
        &session,
        &headers,
        Nav::Approvals,
        "Approvals",
        content,
    ))
}

#[derive(serde::Deserialize)]
pub struct NoteForm {
    #[serde(default)]
    note: Option<String>,
}

/// The note, trimmed (`None` when empty); CRLF becomes LF.
fn clean_note(note: Option<&str>) -> Result<Option<String>, PageError> {
    let Some(n) = note.map(|n| n.replace("\r\n", "\n")) else {
        return Ok(None);
    };
    let n = n.trim();
    if n.is_empty() {
        return Ok(None);
    }
    if n.chars().count() > MAX_NOTE || n.chars().any(|c| c.is_control() && c != '\n') {
        return Err(PageError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_note",
            &format!(
                "the note must be at most {MAX_NOTE} printable characters; go back and shorten it"
            ),
        ));
    }
    Ok(Some(n.to_string()))
}

async fn decide(
    state: DashState,
    id: String,
    headers: HeaderMap,
    m: Mutation<NoteForm>,
    approve: bool,
) -> Result<Response, PageError> {
    let note = clean_note(m.form.note.as_deref())?;
    let result = state
        .db
        .decide_pending(
            &id,
            approve,
            note.as_deref(),
            &m.session.actor(),
            unix_now(),
        )
        .await;
    match result {
        Ok((intent, _)) => Ok(redirect_with_flash(
            "/approvals",
            &format!(
                "{} {} at {} ({})",
                if approve { "approved" } else { "denied" },
                ui::money(intent.amount, &intent.currency),
                intent.merchant_name,
                intent.id
            ),
            &headers,
        )),
        Err(DbError::Conflict(m)) => Err(PageError::new(
            StatusCode::CONFLICT,
            "intent_not_pending",
            &format!("this purchase was already decided: {m}"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// `POST /approvals/{id}/approve`.
async fn approve(
    State(state): State<DashState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    m: Mutation<NoteForm>,
) -> Result<Response, PageError> {
    decide(state, id, headers, m, true).await
}

/// `POST /approvals/{id}/deny`.
async fn deny(
    State(state): State<DashState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    m: Mutation<NoteForm>,
) -> Result<Response, PageError> {
    decide(state, id, headers, m, false).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_notes() {
        assert_eq!(age(5), "5 s");
        assert_eq!(age(125), "2 min");
        assert_eq!(age(3 * 3600 + 120), "3 h 2 min");
        assert_eq!(age(2 * 86_400 + 3600), "2 d 1 h");
        assert_eq!(clean_note(Some("  ")).unwrap(), None);
        assert_eq!(
            clean_note(Some("ok\r\nthanks")).unwrap().as_deref(),
            Some("ok\nthanks")
        );
        assert!(clean_note(Some("bad\u{7}")).is_err());
        assert!(clean_note(Some(&"x".repeat(1001))).is_err());
    }
}
