//! The overview page of the dashboard: spend today and this month (UTC, net captures from
//! the Stripe ledger), what is reserved for approved purchases, spend by agent and by
//! merchant, budget utilization, recent declines, open discrepancies, pending approvals.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use maud::{Markup, html};

use super::auth::{self, Session};
use super::ui::{self, Bar, Nav};
use super::{DashState, PageError};
use crate::control::db::{CurrencyAmount, DiscrepancyFilter, LedgerFilter, SpendRow};
use crate::domain::time::Period;

/// `[start, end)` of today and of this month (UTC).
pub(super) fn today_and_month(now: i64) -> ((i64, i64), (i64, i64)) {
    let day = (
        Period::Daily.bucket_start(now),
        Period::Daily.resets_at(now).unwrap_or(i64::MAX),
    );
    let month = (
        Period::Monthly.bucket_start(now),
        Period::Monthly.resets_at(now).unwrap_or(i64::MAX),
    );
    (day, month)
}

fn amounts(list: &[CurrencyAmount]) -> Markup {
    html! {
        @if list.is_empty() {
            div.big { (ui::money(0, "usd")) }
        } @else {
            @for a in list {
                div.big data-currency=(a.currency) { (ui::money(a.amount, &a.currency)) }
            }
        }
    }
}

fn bars(rows: &[SpendRow]) -> Vec<Bar> {
    rows.iter()
        .take(10)
        .map(|r| Bar {
            label: r.label.clone(),
            value: r.amount,
            text: ui::money(r.amount, &r.currency),
        })
        .collect()
}

fn scope_link(scope: &str, scope_id: &str) -> Markup {
    html! {
        @if scope == "agent" {
            a href={"/agents/" (super::agents::seg(scope_id))} { (scope_id) }
        } @else {
            code { (scope_id) }
        }
    }
}

/// `GET /`.
pub async fn page(
    State(state): State<DashState>,
    session: Session,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let db = &state.db;
    let now = auth::unix_now();
    let ((day_from, day_to), (month_from, month_to)) = today_and_month(now);
    let today = db.dash_a_spend_by_currency(day_from, day_to).await?;
    let month = db.dash_a_spend_by_currency(month_from, month_to).await?;
    let reserved = db.dash_a_reserved_by_currency().await?;
    let by_agent = db.dash_a_spend_by_agent(month_from, month_to).await?;
    let by_merchant = db.dash_a_spend_by_merchant(month_from, month_to).await?;
    let pending = db.dash_a_pending_count().await?;
    let budgets = db.list_budgets(None, None).await?;
    let mut usage = Vec::with_capacity(budgets.len());
    for b in budgets {
        let period = match b.period.as_str() {
            "daily" => Period::Daily,
            "weekly" => Period::Weekly,
            "monthly" => Period::Monthly,
            _ => Period::AllTime,
        };
        let used = db.dash_a_budget_used(&b, period.bucket_start(now)).await?;
        usage.push((b, used));
    }
    let declines = db
        .list_decisions(
            &LedgerFilter {
                status: Some("declined".into()),
                ..Default::default()
            },
            10,
            None,
        )
        .await?
        .items;
    let open = db
        .list_discrepancies(
            &DiscrepancyFilter {
                resolved: Some(false),
                ..Default::default()
            },
            10,
            None,
        )
        .await?
        .items;

    let content = html! {
        section.cards id="overview-cards" {
            div.card id="spend-today" data-test="spend-today" {
                div.label { "Spend today (UTC)" }
                (amounts(&today))
            }
            div.card id="spend-month" data-test="spend-month" {
                div.label { "Spend this month" }
                (amounts(&month))
            }
            div.card id="reserved" data-test="reserved" {
                div.label { "Reserved (approved, not captured)" }
                (amounts(&reserved))
            }
            div.card id="pending-approvals" data-test="pending-approvals" {
                div.label { "Pending approvals" }
                div.big { a href="/approvals" data-count=(pending) { (pending) } }
            }
        }
        p.muted.small { "Spend is what Stripe captured less refunds, by settlement date (UTC)." }
        section.grid2 id="spend-charts" {
            div data-test="chart-agents" { (ui::bar_chart("Spend by agent this month", &bars(&by_agent))) }
            div data-test="chart-merchants" { (ui::bar_chart("Spend by merchant this month", &bars(&by_merchant))) }
        }
        h2 { "Budgets" }
        @if usage.is_empty() {
            p.muted id="no-budgets" { "no budgets yet; set one on an agent's page" }
        } @else {
            table id="budget-usage" {
                thead { tr { th { "Scope" } th { "Period" } th.num { "Used" } th.num { "Limit" } th { "Utilization" } } }
                tbody {
                    @for (b, used) in &usage {
                        tr data-budget=(b.id) {
                            td { (b.scope.as_str()) " " (scope_link(b.scope.as_str(), &b.scope_id)) }
                            td { (b.period) }
                            td.num { (ui::money(*used, &b.currency)) }
                            td.num { (ui::money(b.limit, &b.currency)) }
                            td { (ui::meter(*used, b.limit)) }
                        }
                    }
                }
            }
            p.muted.small { "Used: per purchase in the current period, the larger of what is reserved and what was captured." }
        }
        section.grid2 {
            div {
                h2 { "Recent declines" }
                @if declines.is_empty() {
                    p.muted id="no-declines" { "no declined purchases" }
                } @else {
                    table id="recent-declines" {
                        thead { tr { th { "Time" } th { "Agent" } th { "Reasons" } th { "Purchase" } } }
                        tbody {
                            @for d in &declines {
                                tr {
                                    td.small { (ui::time(d.created_at)) }
                                    td { a href={"/agents/" (super::agents::seg(&d.agent_id))} { (d.agent_id) } }
                                    td { @for r in &d.reasons { code.reason { (r) } " " } }
                                    td { a href={"/transactions/" (super::agents::seg(&d.intent_id))} { (d.intent_id) } }
                                }
                            }
                        }
                    }
                }
            }
            div {
                h2 { a href="/discrepancies" { "Open discrepancies" } }
                @if open.is_empty() {
                    p.muted id="no-discrepancies" { "no open discrepancies" }
                } @else {
                    table id="open-discrepancies" {
                        thead { tr { th { "Detected" } th { "Kind" } th.num { "Amount" } th { "Purchase" } } }
                        tbody {
                            @for d in &open {
                                tr {
                                    td.small { (ui::time(d.created_at)) }
                                    td { (ui::badge(&d.kind)) }
                                    td.num { @if let (Some(a), Some(c)) = (d.amount, &d.currency) { (ui::money(a, c)) } }
                                    td { @if let Some(i) = &d.intent_id { a href={"/transactions/" (super::agents::seg(i))} { (i) } } @else { span.muted { "—" } } }
                                }
                            }
                        }
                    }
                    p { a href="/discrepancies?status=open" { "All open discrepancies →" } }
                }
            }
        }
    };
    Ok(ui::page(
        &session,
        &headers,
        Nav::Overview,
        "Overview",
        content,
    ))
}
