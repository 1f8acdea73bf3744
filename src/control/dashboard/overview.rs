//! The overview page of the dashboard: spend today and this month (UTC, net captures from
//! the Stripe ledger, per currency), what is reserved for approved purchases, frozen
//! agents, spend by agent and by merchant and daily spend (per currency), budget
//! utilization as sidecars enforce it, recent declines, open discrepancies, pending
//! approvals.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use maud::{Markup, html};

use super::agents::budgets;
use super::auth::{self, Session};
use super::ui::{self, Bar, Nav};
use super::{DashState, PageError};
use crate::control::db::{CurrencyAmount, DailySpend, DiscrepancyFilter, LedgerFilter, SpendRow};
use crate::control::model::Agent;
use crate::domain::time::Period;

/// Budget rows shown on the overview (the most used).
const MAX_BUDGET_ROWS: usize = 25;

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
            div.big.muted data-empty="true" { "none yet" }
        } @else {
            @for a in list {
                div.big data-currency=(a.currency) { (ui::money(a.amount, &a.currency)) }
            }
        }
    }
}

/// Bars of one currency, largest first (at most 10), with an "unattributed" bar for
/// settlements no purchase of the ledger explains.
fn bars(rows: &[SpendRow], currency: &str, unattributed: Option<i64>) -> Vec<Bar> {
    let mut bars: Vec<Bar> = rows
        .iter()
        .filter(|r| r.currency == currency)
        .take(10)
        .map(|r| Bar {
            label: r.label.clone(),
            value: r.amount,
            text: ui::money(r.amount, &r.currency),
        })
        .collect();
    if let Some(u) = unattributed.filter(|u| *u != 0) {
        bars.push(Bar {
            label: "unattributed".into(),
            value: u,
            text: ui::money(u, currency),
        });
    }
    bars
}

/// Daily spend of one currency over the days starting at `first` (30 of them).
fn daily_columns(days: &[DailySpend], currency: &str, first: i64) -> Vec<ui::Column> {
    (0..DAYS)
        .map(|k| {
            let day = first + k * 86_400;
            let amount = days
                .iter()
                .find(|d| d.day == day && d.currency == currency)
                .map_or(0, |d| d.amount);
            ui::Column {
                label: ui::date(day).get(5..).unwrap_or_default().to_string(),
                value: amount,
                text: format!("{}: {}", ui::date(day), ui::money(amount, currency)),
            }
        })
        .collect()
}

/// Days of the spend-over-time chart.
const DAYS: i64 = 30;

/// A frozen agent's reason with purchase ids linked to their chain.
fn reason_markup(reason: &str) -> Markup {
    html! {
        @for (k, word) in reason.split(' ').enumerate() {
            @if k > 0 { " " }
            @let id = word.trim_end_matches([',', '.', ';', ':', ')']);
            @if id.starts_with("pur_") && id.len() > 4 {
                a href={"/transactions/" (super::agents::seg(id))} { (id) } (&word[id.len()..])
            } @else if id.starts_with("dis_") && id.len() > 4 {
                a href="/discrepancies?status=open" title="open discrepancies" { (id) } (&word[id.len()..])
            } @else {
                (word)
            }
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
    let unattributed = db.dash_unattributed_spend(month_from, month_to).await?;
    let first_day = day_from - (DAYS - 1) * 86_400;
    let daily = db.dash_daily_spend(first_day, day_to).await?;
    let pending = db.dash_a_pending_count().await?;
    let frozen = db.dash_frozen_agents().await?;
    // Budgets as sidecars enforce them, most used first.
    let agents = db.dash_agent_policies().await?;
    let budgets = db.list_budgets(None, None).await?;
    let policies: Vec<_> = agents
        .iter()
        .map(|a| budgets::policy_of(a.policy.as_ref()))
        .collect();
    let usage = budgets::Usage::load(
        db,
        now,
        budgets::UsageScope {
            all_time: budgets::any_all_time(policies.iter().map(Option::as_ref), &budgets),
            ..budgets::UsageScope::default()
        },
    )
    .await?;
    let views = budgets::all_views(&agents, &budgets, &usage);
    let shared: Vec<budgets::Limit> = budgets
        .iter()
        .filter_map(|b| budgets::shared_limit(b, &usage))
        .collect();
    let mut limit_rows: Vec<(Option<&Agent>, &budgets::Limit)> = views
        .iter()
        .flat_map(|(a, v)| {
            v.limits
                .iter()
                .filter(|l| {
                    matches!(
                        l.source,
                        budgets::Source::Policy | budgets::Source::AgentBudget
                    )
                })
                .map(move |l| (Some(a), l))
        })
        .chain(shared.iter().map(|l| (None, l)))
        .collect();
    let total_limits = limit_rows.len();
    // Most used first (integer ratio: used/limit compared as used·limit' vs used'·limit).
    limit_rows.sort_by(|(_, a), (_, b)| {
        let lhs = i128::from(b.used.max(0)) * i128::from(a.limit.max(1));
        let rhs = i128::from(a.used.max(0)) * i128::from(b.limit.max(1));
        lhs.cmp(&rhs)
    });
    limit_rows.truncate(MAX_BUDGET_ROWS);
    let inactive = views.iter().map(|(_, v)| v.inactive.len()).sum::<usize>();
    let mut currencies: Vec<&str> = by_agent
        .iter()
        .map(|r| r.currency.as_str())
        .chain(by_merchant.iter().map(|r| r.currency.as_str()))
        .chain(unattributed.iter().map(|r| r.currency.as_str()))
        .collect();
    currencies.sort_unstable();
    currencies.dedup();
    let mut daily_currencies: Vec<&str> = daily.iter().map(|d| d.currency.as_str()).collect();
    daily_currencies.sort_unstable();
    daily_currencies.dedup();
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
            div.card id="frozen-count" data-test="frozen-count" {
                div.label { "Frozen agents" }
                div.big class=[(!frozen.is_empty()).then_some("error-text")] { a href="#frozen-agents-panel" data-count=(frozen.len()) { (frozen.len()) } }
            }
        }
        p.muted.small { "Spend is what Stripe captured less refunds, by settlement date (UTC), per currency (amounts in different currencies are never added up)." }
        @if !frozen.is_empty() {
            section #frozen-agents-panel data-count=(frozen.len()) {
                h2 { "Frozen agents" }
                p.muted.small { "Their sidecars decline every purchase (agent_frozen) and the control plane declines their cards' authorizations until they are unfrozen." }
                table #frozen-agents {
                    thead { tr { th { "Agent" } th { "Frozen since" } th { "By" } th { "Why" } th {} } }
                    tbody {
                        @for f in &frozen {
                            tr data-test="frozen-agent" data-agent=(f.agent.id) {
                                td { a href={"/agents/" (super::agents::seg(&f.agent.id))} { (f.agent.name) } br; span.small.muted { (f.agent.id) } }
                                td.small { @match f.since { Some(t) => { (ui::time(t)) }, None => span.muted { "unknown" } } }
                                td.small { (f.by.as_deref().unwrap_or("")) }
                                td.small data-test="frozen-reason" { @match &f.agent.frozen_reason { Some(r) => { (reason_markup(r)) }, None => span.muted { "no reason recorded" } } }
                                td {
                                    @if session.is_admin() {
                                        form.inline method="post" action={"/agents/" (super::agents::seg(&f.agent.id)) "/unfreeze"} data-test="unfreeze" data-confirm="Unfreeze this agent? Its purchases are decided by its policy again." {
                                            (ui::csrf_field(&session))
                                            button type="submit" { "Unfreeze" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if currencies.is_empty() {
            section.grid2 id="spend-charts" {
                div data-test="chart-agents" { (ui::bar_chart("Spend by agent this month", &[])) }
                div data-test="chart-merchants" { (ui::bar_chart("Spend by merchant this month", &[])) }
            }
        }
        @for c in &currencies {
            @let u = unattributed.iter().find(|u| u.currency == *c).map(|u| u.amount);
            section.grid2.spend-charts data-currency=(c) {
                div data-test="chart-agents" data-currency=(c) { (ui::bar_chart(&format!("Spend by agent this month, {c}"), &bars(&by_agent, c, u))) }
                div data-test="chart-merchants" data-currency=(c) { (ui::bar_chart(&format!("Spend by merchant this month, {c}"), &bars(&by_merchant, c, None))) }
            }
        }
        @if !unattributed.is_empty() {
            p.muted.small { "\"unattributed\": settlements no purchase of the ledger explains (force captures, unknown cards) — see " a href="/discrepancies?status=open" { "discrepancies" } "." }
        }
        section #spend-over-time {
            @if daily_currencies.is_empty() {
                div data-test="chart-daily" { (ui::column_chart(&format!("Daily spend, last {DAYS} days"), &[], "")) }
            }
            @for c in &daily_currencies {
                @let cols = daily_columns(&daily, c, first_day);
                @let max = cols.iter().map(|k| k.value).max().unwrap_or(0);
                div data-test="chart-daily" data-currency=(c) {
                    (ui::column_chart(&format!("Daily spend, last {DAYS} days, {c}"), &cols, &format!("highest day: {}", ui::money(max, c))))
                }
            }
        }
        h2 { a href="/budgets" { "Budgets" } }
        @if limit_rows.is_empty() {
            p.muted id="no-budgets" { "no budgets are enforced: no agent has a budget in its policy, and there are no agent, project or organization budgets" }
        } @else {
            (budgets::limits_table(&session, "budget-usage", &limit_rows, false))
            p.muted.small {
                (budgets::USED_NOTE)
                @if total_limits > MAX_BUDGET_ROWS { " The " (MAX_BUDGET_ROWS) " most used of " (total_limits) " are shown;" }
                " " a href="/budgets" { "all budgets →" }
            }
        }
        @if inactive > 0 {
            p.error #inactive-budgets-note { (inactive) " agent budget(s) have no effect (another currency than the policy's, or looser than it) — " a href="/budgets" { "review them" } "." }
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
