//! Budgets as the sidecars enforce them: an agent's policy budgets with its agent budgets
//! folded in exactly as the sidecar folds them (`sync::client::fold_budgets`: an agent
//! budget only tightens or adds the budget of its period, one in another currency is
//! ignored), plus the project's and organization's shared budgets in the policy's currency
//! — each with where its limit comes from and what is used of it now, counted as the
//! sidecar counts a period (`control::db::COUNTED`).
//!
//! Pages: `GET /budgets` (every enforced limit, the project and organization budgets with a
//! form to set and delete them), `POST /budgets/{id}/delete` (any budget). The agent page
//! (`super`) shows one agent's view and sets its agent budgets.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use maud::{Markup, html};

use super::super::auth::{self, Mutation, Session};
use super::super::ui::{self, Nav};
use super::super::{DashState, PageError, redirect_with_flash};
use super::{parse_amount, seg};
use crate::control::db::{AgentPolicy, ControlDb, DbError, PeriodUsage};
use crate::control::model::{Agent, Budget, BudgetScope, Organization, Project};
use crate::domain::money::Currency;
use crate::domain::time::Period;
use crate::policy::{Policy, period_index};
use crate::sync::client::{BudgetFold, fold_budgets};
use crate::sync::wire::BundleBudget;

/// Where an enforced limit comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The agent's policy document.
    Policy,
    /// An agent budget that tightens (or adds) the policy's budget of its period.
    AgentBudget,
    /// The project's shared budget.
    Project,
    /// The organization's shared budget.
    Org,
}

impl Source {
    pub fn code(self) -> &'static str {
        match self {
            Source::Policy => "policy",
            Source::AgentBudget => "agent",
            Source::Project => "project",
            Source::Org => "org",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Source::Policy => "policy",
            Source::AgentBudget => "agent budget",
            Source::Project => "project",
            Source::Org => "organization",
        }
    }
}

/// One limit a sidecar enforces now, with what is used of it in the current period.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    pub source: Source,
    /// The agent (policy, agent budget), project or organization id.
    pub scope_id: String,
    pub period: Period,
    /// ISO 4217, upper case.
    pub currency: String,
    pub limit: i64,
    /// The budget row behind it (agent, project, org budgets).
    pub budget_id: Option<String>,
    /// The policy's limit an agent budget lowered, if any.
    pub policy_limit: Option<i64>,
    pub used: i64,
}

impl Limit {
    /// What can still be approved (negative when the period is over its limit).
    pub fn left(&self) -> i64 {
        self.limit.saturating_sub(self.used)
    }
}

/// An agent budget the sidecar does not enforce, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inactive {
    pub budget: Budget,
    pub why: String,
}

/// An agent's budgets as its sidecar enforces them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentView {
    /// Policy and agent-budget limits by period, then project, then organization ones.
    pub limits: Vec<Limit>,
    pub inactive: Vec<Inactive>,
    /// The policy's currency (`None`: no readable policy; the agent declines everything).
    pub currency: Option<Currency>,
}

pub fn period_of(s: &str) -> Option<Period> {
    Period::ALL.into_iter().find(|p| p.as_str() == s)
}

/// Budgets as the bundle carries them to sidecars.
pub fn bundle_budgets(budgets: &[Budget]) -> Vec<BundleBudget> {
    budgets
        .iter()
        .map(|b| BundleBudget {
            id: b.id.clone(),
            scope: b.scope.as_str().to_string(),
            scope_id: b.scope_id.clone(),
            period: b.period.clone(),
            currency: b.currency.clone(),
            limit: b.limit,
        })
        .collect()
}

/// The policy with the agent's budgets folded in, as the sidecar enforces it.
pub fn folded(policy: Policy, agent_budgets: &[Budget]) -> Policy {
    fold_budgets(policy, &bundle_budgets(agent_budgets)).0
}

/// The stored policy document, if it is readable (an unreadable one freezes the agent at
/// the sidecar, like no policy).
pub fn policy_of(doc: Option<&serde_json::Value>) -> Option<Policy> {
    doc.and_then(|d| serde_json::from_value::<Policy>(d.clone()).ok())
}

/// What is used of budgets now, per scope, from the ledger.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    agent: HashMap<(String, String), PeriodUsage>,
    project: HashMap<(String, String), PeriodUsage>,
    org: HashMap<(String, String), PeriodUsage>,
}

/// The scopes one page needs the usage of (`None`: every one), and whether any of its
/// limits is `all_time` (then the whole ledger is read; else about a month of it).
#[derive(Clone, Copy, Debug, Default)]
pub struct UsageScope<'a> {
    pub agent: Option<&'a str>,
    pub project: Option<&'a str>,
    pub org: Option<&'a str>,
    pub all_time: bool,
}

/// Whether any of these policies or budgets has an `all_time` limit.
pub fn any_all_time<'a>(
    policies: impl IntoIterator<Item = Option<&'a Policy>>,
    budgets: &[Budget],
) -> bool {
    budgets.iter().any(|b| b.period == Period::AllTime.as_str())
        || policies
            .into_iter()
            .flatten()
            .any(|p| p.budgets.iter().any(|r| r.period == Period::AllTime))
}

impl Usage {
    pub async fn load(db: &ControlDb, now: i64, only: UsageScope<'_>) -> Result<Usage, DbError> {
        let starts = [
            Period::Daily.bucket_start(now),
            Period::Weekly.bucket_start(now),
            Period::Monthly.bucket_start(now),
        ];
        let all = only.all_time;
        Ok(Usage {
            agent: db
                .dash_budget_usage(BudgetScope::Agent, starts, only.agent, all)
                .await?,
            project: db
                .dash_budget_usage(BudgetScope::Project, starts, only.project, all)
                .await?,
            org: db
                .dash_budget_usage(BudgetScope::Org, starts, only.org, all)
                .await?,
        })
    }

    pub fn used(&self, scope: BudgetScope, id: &str, currency: &str, period: Period) -> i64 {
        let map = match scope {
            BudgetScope::Agent => &self.agent,
            BudgetScope::Project => &self.project,
            BudgetScope::Org => &self.org,
        };
        map.get(&(id.to_string(), currency.to_ascii_uppercase()))
            .map_or(0, |u| u[period_index(period)])
    }
}

/// A shared (project or organization) budget as a limit.
pub fn shared_limit(b: &Budget, usage: &Usage) -> Option<Limit> {
    let period = period_of(&b.period)?;
    let source = match b.scope {
        BudgetScope::Project => Source::Project,
        BudgetScope::Org => Source::Org,
        BudgetScope::Agent => return None,
    };
    Some(Limit {
        source,
        scope_id: b.scope_id.clone(),
        period,
        currency: b.currency.to_ascii_uppercase(),
        limit: b.limit,
        budget_id: Some(b.id.clone()),
        policy_limit: None,
        used: usage.used(b.scope, &b.scope_id, &b.currency, period),
    })
}

/// The budgets `agent`'s sidecar enforces: its policy with `agent_budgets` folded in, and
/// the shared budgets of its project and organization (among `shared`) in the policy's
/// currency.
pub fn agent_view(
    agent: &Agent,
    policy: Option<&Policy>,
    agent_budgets: &[Budget],
    shared: &[Budget],
    usage: &Usage,
) -> AgentView {
    let Some(policy) = policy else {
        return AgentView {
            limits: Vec::new(),
            inactive: agent_budgets
                .iter()
                .map(|b| Inactive {
                    budget: b.clone(),
                    why: "the agent has no policy: every purchase is declined (no_policy)".into(),
                })
                .collect(),
            currency: None,
        };
    };
    let currency = policy.currency.code().to_string();
    let (effective, folds) = fold_budgets(policy.clone(), &bundle_budgets(agent_budgets));
    let mut limits = Vec::new();
    let mut inactive = Vec::new();
    for (b, fold) in agent_budgets.iter().zip(&folds) {
        let why = match fold {
            BudgetFold::NoEffect { policy_limit } => Some(format!(
                "no effect: the policy's {} budget of {} is lower or equal and still binds",
                b.period,
                ui::money(*policy_limit, &currency)
            )),
            BudgetFold::OtherCurrency => Some(format!(
                "ignored: the policy spends {currency} only, so a {} budget cannot apply",
                b.currency
            )),
            BudgetFold::UnknownPeriod => Some("ignored: unknown period".into()),
            BudgetFold::Tightened { .. } | BudgetFold::Added => None,
        };
        if let Some(why) = why {
            inactive.push(Inactive {
                budget: b.clone(),
                why,
            });
        }
    }
    let mut rules = effective.budgets.clone();
    rules.sort_by_key(|r| period_index(r.period));
    for rule in rules {
        // The agent budget of this period that tightened or added it, if any.
        let from_budget = agent_budgets.iter().zip(&folds).find(|(b, f)| {
            period_of(&b.period) == Some(rule.period)
                && matches!(f, BudgetFold::Tightened { .. } | BudgetFold::Added)
        });
        let (source, budget_id, policy_limit) = match from_budget {
            Some((b, BudgetFold::Tightened { policy_limit })) => {
                (Source::AgentBudget, Some(b.id.clone()), Some(*policy_limit))
            }
            Some((b, _)) => (Source::AgentBudget, Some(b.id.clone()), None),
            None => (Source::Policy, None, None),
        };
        limits.push(Limit {
            source,
            scope_id: agent.id.clone(),
            period: rule.period,
            currency: currency.clone(),
            limit: rule.limit,
            budget_id,
            policy_limit,
            used: usage.used(BudgetScope::Agent, &agent.id, &currency, rule.period),
        });
    }
    let mut shared_limits: Vec<Limit> = shared
        .iter()
        .filter(|b| {
            (b.scope == BudgetScope::Project && b.scope_id == agent.project_id)
                || (b.scope == BudgetScope::Org && b.scope_id == agent.org_id)
        })
        .filter(|b| b.currency.eq_ignore_ascii_case(&currency))
        .filter_map(|b| shared_limit(b, usage))
        .collect();
    shared_limits.sort_by_key(|l| (l.source == Source::Org, period_index(l.period)));
    limits.extend(shared_limits);
    AgentView {
        limits,
        inactive,
        currency: Some(policy.currency),
    }
}

/// Every agent's view (agents without any limit or budget are left out), with the agent.
pub fn all_views(
    agents: &[AgentPolicy],
    budgets: &[Budget],
    usage: &Usage,
) -> Vec<(Agent, AgentView)> {
    let mut by_agent: HashMap<&str, Vec<Budget>> = HashMap::new();
    for b in budgets.iter().filter(|b| b.scope == BudgetScope::Agent) {
        by_agent
            .entry(b.scope_id.as_str())
            .or_default()
            .push(b.clone());
    }
    let shared: Vec<Budget> = budgets
        .iter()
        .filter(|b| b.scope != BudgetScope::Agent)
        .cloned()
        .collect();
    agents
        .iter()
        .map(|a| {
            let own = by_agent
                .get(a.agent.id.as_str())
                .cloned()
                .unwrap_or_default();
            let policy = policy_of(a.policy.as_ref());
            let view = agent_view(&a.agent, policy.as_ref(), &own, &shared, usage);
            (a.agent.clone(), view)
        })
        .filter(|(_, v)| !v.limits.is_empty() || !v.inactive.is_empty())
        .collect()
}

// ----- markup -----------------------------------------------------------------------------

/// "left" text: what can still be approved, or by how much the period is over.
fn left_text(l: &Limit) -> Markup {
    let left = l.left();
    html! {
        @if left >= 0 { (ui::money(left, &l.currency)) } @else { span.error-text { "over by " (ui::money(-left, &l.currency)) } }
    }
}

/// Where a limit comes from, for a table cell.
pub fn source_markup(l: &Limit) -> Markup {
    html! {
        span.badge data-source=(l.source.code()) { (l.source.label()) }
        @match l.source {
            Source::AgentBudget => {
                @if let Some(p) = l.policy_limit { br; span.small.muted { "tightens the policy's " (ui::money(p, &l.currency)) } }
                @else { br; span.small.muted { "the policy has no " (l.period.as_str()) " budget" } }
            },
            Source::Project => { br; code.small { (l.scope_id) } },
            Source::Org => { br; code.small { (l.scope_id) } },
            Source::Policy => {},
        }
    }
}

/// A delete button for a budget row.
pub fn delete_form(session: &Session, budget_id: &str) -> Markup {
    html! {
        form.inline method="post" action={"/budgets/" (seg(budget_id)) "/delete"} data-confirm="Delete this budget?" data-test="delete-budget" {
            (ui::csrf_field(session))
            button.link.danger type="submit" { "Delete" }
        }
    }
}

/// The table of an agent's enforced limits (`agent`: show the agent column).
pub fn limits_table(
    session: &Session,
    id: &str,
    rows: &[(Option<&Agent>, &Limit)],
    actions: bool,
) -> Markup {
    let agent_column = rows.iter().any(|(a, _)| a.is_some());
    html! {
        table id=(id) {
            thead { tr {
                @if agent_column { th { "Agent" } }
                th { "Period" } th { "Limit from" } th.num { "Used" } th.num { "Limit" } th.num { "Left" } th { "Utilization" }
                @if actions { th {} }
            } }
            tbody {
                @for (agent, l) in rows {
                    tr data-test="budget-limit" data-source=(l.source.code()) data-scope-id=(l.scope_id)
                        data-period=(l.period.as_str()) data-currency=(l.currency) data-limit=(l.limit) data-used=(l.used)
                        data-budget=[l.budget_id.as_deref()] {
                        @if agent_column {
                            td { @if let Some(a) = agent { a href={"/agents/" (seg(&a.id))} { (a.name) } } }
                        }
                        td { (l.period.as_str()) }
                        td { (source_markup(l)) }
                        td.num { (ui::money(l.used, &l.currency)) }
                        td.num { (ui::money(l.limit, &l.currency)) }
                        td.num { (left_text(l)) }
                        td { (ui::meter(l.used, l.limit)) }
                        @if actions {
                            td { @if let Some(b) = &l.budget_id { @if session.is_admin() && l.source != Source::Policy { (delete_form(session, b)) } } }
                        }
                    }
                }
            }
        }
    }
}

/// Agent budgets without effect, with why and (admins) a delete button.
pub fn inactive_list(session: &Session, inactive: &[Inactive]) -> Markup {
    html! {
        @if !inactive.is_empty() {
            ul #inactive-budgets {
                @for i in inactive {
                    li data-test="inactive-budget" data-budget=(i.budget.id) data-period=(i.budget.period) data-currency=(i.budget.currency) {
                        "Agent budget " strong { (i.budget.period) " " (ui::money(i.budget.limit, &i.budget.currency)) } ": "
                        span.error-text { (i.why) }
                        @if session.is_admin() { " " (delete_form(session, &i.budget.id)) }
                    }
                }
            }
        }
    }
}

pub const USED_NOTE: &str = "Used: what the sidecar counts in the current UTC period — per purchase decided in it, while open the larger of its reservation and what moved on its card, once ended exactly what moved (captures and pending authorizations less refunds).";

// ----- /budgets -----------------------------------------------------------------------------

#[derive(serde::Deserialize, Default, Clone)]
pub struct SharedForm {
    /// `project:<id>` or `org:<id>`.
    #[serde(default)]
    target: String,
    #[serde(default)]
    period: String,
    #[serde(default)]
    currency: String,
    #[serde(default)]
    amount: String,
}

#[derive(Default)]
pub struct SharedErrors {
    target: Option<String>,
    period: Option<String>,
    currency: Option<String>,
    amount: Option<String>,
}

impl SharedErrors {
    fn any(&self) -> bool {
        self.target.is_some()
            || self.period.is_some()
            || self.currency.is_some()
            || self.amount.is_some()
    }
}

/// `GET /budgets`.
pub async fn page(
    State(state): State<DashState>,
    session: Session,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let form = SharedForm {
        period: "monthly".into(),
        ..SharedForm::default()
    };
    render(
        &state,
        &session,
        &headers,
        &form,
        &SharedErrors::default(),
        StatusCode::OK,
    )
    .await
}

async fn render(
    state: &DashState,
    session: &Session,
    headers: &HeaderMap,
    form: &SharedForm,
    errors: &SharedErrors,
    status: StatusCode,
) -> Result<Response, PageError> {
    let db = &state.db;
    let now = auth::unix_now();
    let agents = db.dash_agent_policies().await?;
    let budgets = db.list_budgets(None, None).await?;
    let policies: Vec<Option<Policy>> = agents
        .iter()
        .map(|a| policy_of(a.policy.as_ref()))
        .collect();
    let usage = Usage::load(
        db,
        now,
        UsageScope {
            all_time: any_all_time(policies.iter().map(Option::as_ref), &budgets),
            ..UsageScope::default()
        },
    )
    .await?;
    let views = all_views(&agents, &budgets, &usage);
    let projects = db.list_projects(None).await?;
    let orgs = db.list_orgs().await?;
    let shared: Vec<Limit> = budgets
        .iter()
        .filter_map(|b| shared_limit(b, &usage))
        .collect();
    let agent_rows: Vec<(Option<&Agent>, &Limit)> = views
        .iter()
        .flat_map(|(a, v)| {
            v.limits
                .iter()
                .filter(|l| matches!(l.source, Source::Policy | Source::AgentBudget))
                .map(move |l| (Some(a), l))
        })
        .collect();
    let inactive: Vec<Inactive> = views.iter().flat_map(|(_, v)| v.inactive.clone()).collect();
    let shared_rows: Vec<(Option<&Agent>, &Limit)> = shared.iter().map(|l| (None, l)).collect();
    let content = html! {
        p.muted { "The limits sidecars enforce now. An agent's policy budgets are tightened (never loosened) by its agent budgets in the policy's currency; project and organization budgets are shared by every agent of the project on every sidecar." }
        h2 { "Agents" }
        @if agent_rows.is_empty() {
            p.muted #no-agent-limits { "no agent has a budget in its policy or an agent budget" }
        } @else {
            (limits_table(session, "agent-limits", &agent_rows, true))
        }
        @if !inactive.is_empty() {
            h3 { "Agent budgets without effect" }
            (inactive_list(session, &inactive))
        }
        h2 { "Projects and organizations" }
        @if shared_rows.is_empty() {
            p.muted #no-shared-budgets { "no project or organization budgets" }
        } @else {
            (limits_table(session, "shared-limits", &shared_rows, true))
        }
        p.muted.small { (USED_NOTE) " A shared budget counts the purchases of every agent of its project or organization in its currency." }
        @if session.is_admin() {
            h2 { "Set a project or organization budget" }
            (shared_form(session, &projects, &orgs, form, errors))
        }
    };
    Ok(ui::page_with_status(
        session,
        headers,
        Nav::Budgets,
        "Budgets",
        content,
        status,
    ))
}

fn shared_form(
    session: &Session,
    projects: &[Project],
    orgs: &[Organization],
    form: &SharedForm,
    errors: &SharedErrors,
) -> Markup {
    html! {
        form method="post" action="/budgets" #shared-budget-form data-test="set-shared-budget" {
            (ui::csrf_field(session))
            div.filters {
                label { "For"
                    select name="target" {
                        @for p in projects {
                            @let v = format!("project:{}", p.id);
                            option value=(v) selected[form.target == v] { "project " (p.name) }
                        }
                        @for o in orgs {
                            @let v = format!("org:{}", o.id);
                            option value=(v) selected[form.target == v] { "organization " (o.name) }
                        }
                    }
                }
                label { "Period"
                    select name="period" {
                        @for p in Period::ALL {
                            option value=(p.as_str()) selected[p.as_str() == form.period] { (p.as_str()) }
                        }
                    }
                }
                label { "Currency"
                    input type="text" name="currency" value=(form.currency) size="4" maxlength="3" placeholder="USD" required;
                }
                label { "Limit"
                    input type="text" name="amount" value=(form.amount) placeholder="500.00" inputmode="decimal" required;
                }
                button type="submit" #shared-budget-submit { "Set budget" }
            }
            @if let Some(e) = &errors.target { p.field-error data-field="target" { (e) } }
            @if let Some(e) = &errors.period { p.field-error data-field="period" { (e) } }
            @if let Some(e) = &errors.currency { p.field-error data-field="currency" { (e) } }
            @if let Some(e) = &errors.amount { p.field-error data-field="amount" { (e) } }
            p.small.muted { "Setting a budget that exists for the same period and currency replaces its limit." }
        }
    }
}

/// `POST /budgets`: sets a project or organization budget.
pub async fn set_shared(
    State(state): State<DashState>,
    headers: HeaderMap,
    m: Mutation<SharedForm>,
) -> Result<Response, PageError> {
    let Mutation { session, form } = m;
    let db = &state.db;
    let mut errors = SharedErrors::default();
    let target = match form.target.split_once(':') {
        Some(("project", id)) if db.list_projects(None).await?.iter().any(|p| p.id == id) => {
            Some((BudgetScope::Project, id.to_string()))
        }
        Some(("org", id)) if db.list_orgs().await?.iter().any(|o| o.id == id) => {
            Some((BudgetScope::Org, id.to_string()))
        }
        _ => {
            errors.target = Some("choose a project or an organization".into());
            None
        }
    };
    let period = period_of(form.period.trim());
    if period.is_none() {
        errors.period = Some("choose daily, weekly, monthly or all_time".into());
    }
    let currency = Currency::parse(form.currency.trim())
        .map_err(|_| errors.currency = Some("enter an ISO 4217 currency code, e.g. USD".into()))
        .ok();
    let amount = currency.and_then(|c| {
        parse_amount(&form.amount, c)
            .map_err(|e| errors.amount = Some(e))
            .ok()
    });
    let (Some((scope, scope_id)), Some(period), Some(currency), Some(amount)) =
        (target, period, currency, amount)
    else {
        debug_assert!(errors.any());
        return render(
            &state,
            &session,
            &headers,
            &form,
            &errors,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    };
    let budget = db
        .set_budget(
            scope,
            &scope_id,
            period.as_str(),
            currency.code(),
            amount,
            &session.actor(),
            auth::unix_now(),
        )
        .await?;
    Ok(redirect_with_flash(
        "/budgets",
        &format!(
            "{} {} budget of {} set to {}",
            if scope == BudgetScope::Org {
                "organization"
            } else {
                "project"
            },
            budget.period,
            budget.scope_id,
            ui::money(budget.limit, &budget.currency)
        ),
        &headers,
    ))
}

#[derive(serde::Deserialize, Default)]
pub struct Empty {}

/// `POST /budgets/{id}/delete`: back to the agent's page for an agent budget, else to
/// `/budgets`.
pub async fn delete(
    State(state): State<DashState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    m: Mutation<Empty>,
) -> Result<Response, PageError> {
    let b = state
        .db
        .delete_budget(&id, &m.session.actor(), auth::unix_now())
        .await?;
    let to = match b.scope {
        BudgetScope::Agent => format!("/agents/{}", seg(&b.scope_id)),
        _ => "/budgets".to_string(),
    };
    Ok(redirect_with_flash(
        &to,
        &format!(
            "{} {} budget of {} deleted",
            b.scope.as_str(),
            b.period,
            ui::money(b.limit, &b.currency)
        ),
        &headers,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::BudgetRule;

    fn budget(
        id: &str,
        scope: BudgetScope,
        scope_id: &str,
        period: &str,
        cur: &str,
        limit: i64,
    ) -> Budget {
        Budget {
            id: id.into(),
            scope,
            scope_id: scope_id.into(),
            period: period.into(),
            currency: cur.into(),
            limit,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn agent() -> Agent {
        Agent {
            id: "agt".into(),
            org_id: "org".into(),
            project_id: "prj".into(),
            name: "a".into(),
            status: "active".into(),
            frozen_reason: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn agent_budgets_fold_like_the_sidecar() {
        let mut p = Policy::new(Currency::USD);
        p.budgets = vec![
            BudgetRule {
                period: Period::Daily,
                limit: 25_000,
            },
            BudgetRule {
                period: Period::Monthly,
                limit: 100_000,
            },
        ];
        let own = [
            budget("b1", BudgetScope::Agent, "agt", "daily", "USD", 10_000),
            budget("b2", BudgetScope::Agent, "agt", "monthly", "USD", 500_000),
            budget("b3", BudgetScope::Agent, "agt", "weekly", "EUR", 1_000),
            budget("b4", BudgetScope::Agent, "agt", "all_time", "USD", 900_000),
        ];
        let shared = [
            budget("s1", BudgetScope::Project, "prj", "monthly", "USD", 300_000),
            budget("s2", BudgetScope::Org, "org", "daily", "USD", 1_000_000),
            budget("s3", BudgetScope::Project, "prj", "daily", "EUR", 5),
            budget("s4", BudgetScope::Project, "other", "daily", "USD", 5),
        ];
        let v = agent_view(&agent(), Some(&p), &own, &shared, &Usage::default());
        let got: Vec<(Source, Period, i64, Option<&str>)> = v
            .limits
            .iter()
            .map(|l| (l.source, l.period, l.limit, l.budget_id.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                (Source::AgentBudget, Period::Daily, 10_000, Some("b1")),
                (Source::Policy, Period::Monthly, 100_000, None),
                (Source::AgentBudget, Period::AllTime, 900_000, Some("b4")),
                (Source::Project, Period::Monthly, 300_000, Some("s1")),
                (Source::Org, Period::Daily, 1_000_000, Some("s2")),
            ]
        );
        assert_eq!(v.limits[0].policy_limit, Some(25_000));
        let inactive: Vec<&str> = v.inactive.iter().map(|i| i.budget.id.as_str()).collect();
        assert_eq!(inactive, ["b2", "b3"]);
        assert!(
            v.inactive[0].why.contains("USD 1000.00"),
            "{}",
            v.inactive[0].why
        );
        assert!(v.inactive[1].why.contains("spends USD only"));
        // No policy: nothing is enforced, every agent budget is inactive.
        let v = agent_view(&agent(), None, &own, &shared, &Usage::default());
        assert!(v.limits.is_empty());
        assert_eq!(v.inactive.len(), 4);
    }
}
