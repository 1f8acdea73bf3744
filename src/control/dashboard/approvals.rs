//! The Approvals queue: purchases waiting for an administrator (`pending_approval`), each
//! approved or denied with an optional note through `ControlDb::decide_pending` (the same
//! write as the admin API's approve/deny: ledger decision, audit event, and the bundle's
//! `approvals` carry it to the sidecar), and the latest decisions.

use std::collections::HashMap;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use maud::{Markup, html};

use super::agents::budgets;
use super::auth::{Mutation, Session, unix_now};
use super::ui::{self, Nav};
use super::{DashState, PageError, redirect_with_flash};
use crate::control::db::{DbError, DecideError};
use crate::control::model::{Agent, Budget, BudgetScope, Cursor, Intent};
use crate::policy::Policy;

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

/// Rows per page of the queue.
pub const PAGE_SIZE: i64 = 50;

#[derive(serde::Deserialize, Default)]
pub struct QueueQuery {
    #[serde(default)]
    cursor: Option<String>,
}

/// A refusal shown above the queue (status 409).
struct Refusal {
    code: &'static str,
    message: String,
}

/// `GET /approvals`.
async fn page(
    State(state): State<DashState>,
    session: Session,
    headers: HeaderMap,
    Query(q): Query<QueueQuery>,
) -> Result<Response, PageError> {
    let cursor = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(Cursor::decode(c).ok_or_else(|| {
            PageError::bad_request(
                "invalid_cursor",
                "the page link is not valid; start from the first page",
            )
        })?),
    };
    render(&state, &session, &headers, cursor, None).await
}

async fn render(
    state: &DashState,
    session: &Session,
    headers: &HeaderMap,
    cursor: Option<Cursor>,
    refusal: Option<Refusal>,
) -> Result<Response, PageError> {
    let db = &state.db;
    let first_page = cursor.is_none();
    let total = db.dash_a_pending_count().await?;
    let page = db.dash_pending_page(PAGE_SIZE, cursor).await?;
    let recent = db.dash_recent_admin_decisions(20).await?;
    let names: HashMap<String, String> = db.dash_agent_names().await?.into_iter().collect();
    let name = |id: &str| names.get(id).cloned().unwrap_or_else(|| id.to_string());
    let now = unix_now();
    // What is left in each budget of the agents in this page.
    let all_budgets = db.list_budgets(None, None).await?;
    let shared: Vec<Budget> = all_budgets
        .iter()
        .filter(|b| b.scope != BudgetScope::Agent)
        .cloned()
        .collect();
    let mut agents: Vec<(Agent, Option<Policy>, Vec<Budget>)> = Vec::new();
    for p in &page.items {
        let id = &p.intent.agent_id;
        if agents.iter().any(|(a, _, _)| &a.id == id) {
            continue;
        }
        let agent = match db.get_agent(id).await {
            Ok(a) => a,
            Err(DbError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let policy = match db.get_policy(id).await {
            Ok(r) => budgets::policy_of(Some(&r.document)),
            Err(DbError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let own: Vec<Budget> = all_budgets
            .iter()
            .filter(|b| b.scope == BudgetScope::Agent && &b.scope_id == id)
            .cloned()
            .collect();
        agents.push((agent, policy, own));
    }
    let usage = budgets::Usage::load(
        db,
        now,
        budgets::UsageScope {
            all_time: budgets::any_all_time(
                agents.iter().map(|(_, p, _)| p.as_ref()),
                &all_budgets,
            ),
            ..budgets::UsageScope::default()
        },
    )
    .await?;
    let views: HashMap<String, budgets::AgentView> = agents
        .iter()
        .map(|(a, p, own)| {
            (
                a.id.clone(),
                budgets::agent_view(a, p.as_ref(), own, &shared, &usage),
            )
        })
        .collect();
    let content = html! {
        @if let Some(r) = &refusal {
            p.error role="alert" #decision-refused data-code=(r.code) { (r.message) }
        }
        section #pending-approvals data-count=(total) {
            h2 { "Waiting (" (total) ")" }
            @if total > 0 && (!first_page || page.next_cursor.is_some()) {
                p.small.muted { "Oldest first, " (PAGE_SIZE) " per page." }
            }
            @if page.items.is_empty() {
                p.muted #no-pending { @if first_page { "Nothing is waiting for approval." } @else { "No more requests." } }
            } @else {
                table #approvals-table {
                    thead { tr { th { "Agent" } th { "Purchase" } th.num { "Amount" } th { "Why it waits" } th { "Budgets if approved" } th { "Age · deadline" } th { "Decision" } } }
                    tbody {
                        @for p in &page.items {
                            @let i = &p.intent;
                            @let frozen = p.agent_status.as_deref() != Some("active");
                            @let expired = i.expires_at.is_some_and(|e| e <= now);
                            tr id={"approval-" (i.id)} data-test="approval-row" data-intent-id=(i.id)
                                data-agent-status=(p.agent_status.as_deref().unwrap_or("unknown")) data-expired=(expired) {
                                td {
                                    (p.agent_name.clone().unwrap_or_else(|| name(&i.agent_id))) br; span.small.muted { (i.agent_id) } br;
                                    span data-test="agent-status" { (ui::badge(p.agent_status.as_deref().unwrap_or("unknown"))) }
                                    @if let Some(r) = &p.frozen_reason { br; span.small.error-text { (r) } }
                                }
                                td {
                                    a href={"/transactions/" (super::policies::seg(&i.id))} { (i.merchant_name) }
                                    @if let Some(d) = &i.merchant_domain { br; span.small.muted { (d) } }
                                    @if let Some(d) = &i.description { br; span.small { (d) } }
                                    br; span.small.muted { (i.id) }
                                }
                                td.num { (ui::money(i.amount, &i.currency)) }
                                td.small data-test="reasons" {
                                    (reasons_markup(&i.reasons, &p.messages))
                                    @if let Some(score) = i.risk_score {
                                        "risk " strong { (score) }
                                        @if !i.risk_signals.is_empty() { ": " (i.risk_signals.join(", ")) }
                                    }
                                }
                                td.small data-test="budget-impact" {
                                    (impact_markup(views.get(&i.agent_id), i))
                                }
                                td.small {
                                    span title=(ui::time(i.created_at)) { (age(now - i.created_at)) " old" }
                                    br;
                                    @match i.expires_at {
                                        Some(e) if e <= now => span.expired data-test="deadline" data-expires-at=(e) title=(ui::time(e)) { "expired " (age(now - e)) " ago" },
                                        Some(e) => span data-test="deadline" data-expires-at=(e) title=(ui::time(e)) { "expires in " (age(e - now)) br; span.muted { (ui::time(e)) } },
                                        None => span.muted data-test="deadline" { "no deadline reported" },
                                    }
                                }
                                td {
                                    @if !session.is_admin() {
                                        span.muted.small { "admins decide" }
                                    } @else if expired {
                                        span.muted.small { "expired: its sidecar releases the reservation; nothing to decide" }
                                    } @else {
                                        form.approval-form hx-boost="false" method="post" action={"/approvals/" (super::policies::seg(&i.id)) "/approve"} {
                                            (ui::csrf_field(session))
                                            textarea name="note" rows="2" maxlength=(MAX_NOTE) placeholder="note (optional)" data-test="approval-note" {}
                                            div.actions {
                                                @if frozen {
                                                    span.small.error-text { "agent frozen: unfreeze it to approve" }
                                                } @else {
                                                    button type="submit" data-test="approve" { "Approve" }
                                                }
                                                button.danger type="submit" formaction={"/approvals/" (super::policies::seg(&i.id)) "/deny"} data-test="deny" { "Deny" }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            p.actions {
                @if !first_page { a #approvals-first href="/approvals" { "← oldest" } }
                @if let Some(next) = &page.next_cursor {
                    a #approvals-next rel="next" data-test="approvals-next" href={"/approvals?cursor=" (ui::url_encode(next))} { "Newer requests →" }
                }
            }
            p.muted.small { "A waiting purchase already holds its reservation in the agent's budgets (it counts in \"used\"), so approving it leaves what is shown; denying releases it. Approving is refused while the agent is frozen or once the request has expired." }
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
    let status = if refusal.is_some() {
        StatusCode::CONFLICT
    } else {
        StatusCode::OK
    };
    Ok(ui::page_with_status(
        session,
        headers,
        Nav::Approvals,
        "Approvals",
        content,
        status,
    ))
}

/// The sidecar's sentences (the agent was told these), each with its code; codes alone
/// when the sidecar sent no sentences.
fn reasons_markup(codes: &[String], messages: &[String]) -> Markup {
    html! {
        @if messages.len() == codes.len() && !messages.is_empty() {
            ul.budget-impact {
                @for (c, m) in codes.iter().zip(messages) {
                    li data-test="reason" data-code=(c) { (m) " " code.small { (c) } }
                }
            }
        } @else {
            @for c in codes { code data-test="reason" data-code=(c) { (c) } " " }
            br;
        }
    }
}

/// What is left in each of the agent's enforced budgets (the request's hold included).
fn impact_markup(view: Option<&budgets::AgentView>, i: &Intent) -> Markup {
    html! {
        @match view {
            None => span.muted { "agent unknown" },
            Some(v) if v.currency.is_none() => span.error-text { "no valid policy: the sidecar declines it (no_policy)" },
            Some(v) if v.limits.is_empty() => span.muted { "no budgets" },
            Some(v) => ul.budget-impact {
                @for l in &v.limits {
                    @let left = l.left();
                    li data-test="impact" data-source=(l.source.code()) data-period=(l.period.as_str()) data-left=(left) {
                        (l.period.as_str()) " (" (l.source.label()) "): "
                        @if left >= 0 {
                            strong { (ui::money(left, &l.currency)) } " of " (ui::money(l.limit, &l.currency)) " left"
                        } @else {
                            strong.error-text { "over by " (ui::money(-left, &l.currency)) } " (limit " (ui::money(l.limit, &l.currency)) ")"
                        }
                    }
                }
                @if v.currency.is_some_and(|c| !c.code().eq_ignore_ascii_case(&i.currency)) {
                    li.error-text { "the purchase is in " (i.currency) ", not the policy's currency" }
                }
            },
        }
    }
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
    let refusal = match result {
        Ok((intent, _)) => {
            return Ok(redirect_with_flash(
                "/approvals",
                &format!(
                    "{} {} at {} ({})",
                    if approve { "approved" } else { "denied" },
                    ui::money(intent.amount, &intent.currency),
                    intent.merchant_name,
                    intent.id
                ),
                &headers,
            ));
        }
        Err(DecideError::NotPending(status)) => Refusal {
            code: "intent_not_pending",
            message: format!("this purchase was already decided: it is {status}; nothing changed"),
        },
        Err(DecideError::Expired { expires_at }) => Refusal {
            code: "intent_expired",
            message: format!(
                "the request for {id} expired at {}: its sidecar expires it and releases the reservation; nothing changed",
                ui::time(expires_at)
            ),
        },
        Err(DecideError::AgentFrozen { agent_id, reason }) => Refusal {
            code: "agent_frozen",
            message: format!(
                "agent {agent_id} is frozen{}: unfreeze it before approving its purchases (denying is possible); nothing changed",
                reason.map(|r| format!(" ({r})")).unwrap_or_default()
            ),
        },
        Err(DecideError::Db(e)) => return Err(e.into()),
    };
    render(&state, &m.session, &headers, None, Some(refusal)).await
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
