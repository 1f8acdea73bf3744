//! The Agents pages of the dashboard: the list with a create form, an agent's details with
//! its keys (rotate, revoke), freeze/unfreeze, its budgets and recent purchases. A new key
//! is shown once, on the response page of the form that made it (never through a redirect,
//! never stored), with `Cache-Control: no-store`.

use std::collections::HashMap;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use maud::{Markup, html};

use super::auth::{self, Mutation, Session};
use super::ui::{self, Nav};
use super::{DashState, PageError, redirect_with_flash};
use crate::control::db::{AgentFilter, DbError, LedgerFilter};
use crate::control::model::{Agent, BudgetScope, Cursor};
use crate::domain::money::{Currency, MAX_AMOUNT_MINOR};
use crate::domain::time::Period;

pub mod budgets;

pub fn routes() -> Router<DashState> {
    Router::new()
        .route("/budgets", get(budgets::page).post(budgets::set_shared))
        .route("/budgets/{id}/delete", post(budgets::delete))
        .route("/agents/{id}/budgets/dry-run", post(budget_dry_run))
        .route("/agents", get(list).post(create))
        .route("/agents/{id}", get(detail_page))
        .route("/agents/{id}/rotate-key", post(rotate_key))
        .route("/agents/{id}/keys/{key_id}/revoke", post(revoke_key))
        .route("/agents/{id}/freeze", post(freeze))
        .route("/agents/{id}/unfreeze", post(unfreeze))
        .route("/agents/{id}/budgets", post(set_budget))
}

/// Largest budget limit accepted (as the admin API), minor units.
const MAX_BUDGET_MINOR: i64 = MAX_AMOUNT_MINOR * 1000;

/// Parses a decimal amount ("12.50", "12", "0.5") into minor units of `currency` with
/// integer math. The message says what is wrong.
pub fn parse_amount(text: &str, currency: Currency) -> Result<i64, String> {
    let s = text.trim();
    let exp = u32::from(currency.exponent());
    let invalid = || {
        if exp == 0 {
            format!("enter a whole amount of {currency}, e.g. 1200")
        } else {
            format!("enter an amount like 12.50 (at most {exp} decimal places) of {currency}")
        }
    };
    if s.is_empty() {
        return Err("enter an amount".into());
    }
    let (whole, frac) = match s.split_once('.') {
        Some((w, f)) => (w, f),
        None => (s, ""),
    };
    if (whole.is_empty() && frac.is_empty())
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || (s.contains('.') && frac.is_empty())
        || frac.len() > exp as usize
        || whole.len() > 15
    {
        return Err(invalid());
    }
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| invalid())?
    };
    let mut minor_frac: i64 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| invalid())?
    };
    for _ in frac.len()..exp as usize {
        minor_frac *= 10;
    }
    let scale = 10i64.pow(exp);
    let amount = whole
        .checked_mul(scale)
        .and_then(|w| w.checked_add(minor_frac))
        .ok_or_else(invalid)?;
    if amount <= 0 {
        return Err("the amount must be more than zero".into());
    }
    if amount > MAX_BUDGET_MINOR {
        return Err(format!(
            "the amount must be at most {}",
            ui::money(MAX_BUDGET_MINOR, currency.code())
        ));
    }
    Ok(amount)
}

/// A 1–200 printable character name, trimmed.
fn check_name(value: &str) -> Result<String, String> {
    let v = value.trim();
    if v.is_empty() || v.chars().count() > 200 || v.chars().any(char::is_control) {
        return Err("the name must be 1 to 200 printable characters".into());
    }
    Ok(v.to_string())
}

/// An optional note (reason) of at most 1000 printable characters; empty means none.
pub(super) fn check_note(value: &str) -> Result<Option<String>, PageError> {
    let v = value.trim();
    if v.chars().count() > 1000 || v.chars().any(|c| c.is_control() && c != '\n' && c != '\r') {
        return Err(PageError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_note",
            "the note must be at most 1000 printable characters",
        ));
    }
    Ok((!v.is_empty()).then(|| v.to_string()))
}

fn no_store(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Percent-encodes one path segment, keeping RFC 3986 unreserved characters (ids stay
/// readable: `/agents/agt_01…`).
pub(super) fn seg(s: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'_')
        .remove(b'-')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

fn agent_href(id: &str) -> String {
    format!("/agents/{}", seg(id))
}

// ----- the list ---------------------------------------------------------------------------

#[derive(serde::Deserialize, Default)]
pub struct ListQuery {
    #[serde(default)]
    cursor: Option<String>,
}

#[derive(serde::Deserialize, Default, Clone)]
pub struct CreateForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    project_id: String,
    #[serde(default)]
    policy: String,
    /// The one-use nonce of the rendered form (`ui::once_field`).
    #[serde(rename = "_once", default)]
    once: Option<String>,
}

/// The one-use nonce of a form that only carries it (rotating a key).
#[derive(serde::Deserialize, Default)]
pub struct OnceForm {
    #[serde(rename = "_once", default)]
    once: Option<String>,
}

/// Refuses a second submission of the same one-use form (a refresh that resubmits, a
/// double click): `409`, nothing done again. Forms without a nonce are not checked.
async fn first_submission(
    state: &DashState,
    session: &Session,
    once: Option<&str>,
    what: &str,
) -> Result<(), PageError> {
    let Some(nonce) = once.filter(|n| !n.is_empty()) else {
        return Ok(());
    };
    if state
        .db
        .use_form_nonce(nonce, &session.user.id, auth::unix_now())
        .await?
    {
        Ok(())
    } else {
        Err(PageError::new(
            StatusCode::CONFLICT,
            "form_already_submitted",
            &format!(
                "this form was already submitted, so nothing was done again ({what}); its key was shown once on the first submission — rotate the key if it was not copied"
            ),
        ))
    }
}

#[derive(Default)]
struct CreateErrors {
    name: Option<String>,
    project: Option<String>,
    policy: Option<String>,
}

impl CreateErrors {
    fn any(&self) -> bool {
        self.name.is_some() || self.project.is_some() || self.policy.is_some()
    }
}

async fn list(
    State(state): State<DashState>,
    session: Session,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Response, PageError> {
    let cursor = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(Cursor::decode(c).ok_or_else(|| {
            PageError::bad_request("invalid_cursor", "the page link is not valid; start again")
        })?),
    };
    let content = list_content(
        &state,
        &session,
        cursor,
        &CreateForm::default(),
        &CreateErrors::default(),
    )
    .await?;
    Ok(ui::page(&session, &headers, Nav::Agents, "Agents", content))
}

async fn list_content(
    state: &DashState,
    session: &Session,
    cursor: Option<Cursor>,
    form: &CreateForm,
    errors: &CreateErrors,
) -> Result<Markup, PageError> {
    let db = &state.db;
    let page = db.list_agents(&AgentFilter::default(), 100, cursor).await?;
    let projects = db.list_projects(None).await?;
    let project_names: HashMap<&str, &str> = projects
        .iter()
        .map(|p| (p.id.as_str(), p.name.as_str()))
        .collect();
    let facts = db.dash_a_agent_facts().await?;
    let (_, (month_from, month_to)) = super::overview::today_and_month(auth::unix_now());
    let mut spend: HashMap<String, Vec<(String, i64)>> = HashMap::new();
    for r in db.dash_a_spend_by_agent(month_from, month_to).await? {
        spend.entry(r.key).or_default().push((r.currency, r.amount));
    }
    Ok(html! {
        @if page.items.is_empty() {
            p.muted id="no-agents" { "no agents yet" }
        } @else {
            table id="agents-table" {
                thead { tr {
                    th { "Name" } th { "Project" } th { "Status" } th.num { "Active keys" }
                    th { "Policy" } th.num { "Spend this month" }
                } }
                tbody {
                    @for a in &page.items {
                        @let f = facts.get(&a.id).cloned().unwrap_or_default();
                        tr data-agent=(a.id) {
                            td { a href=(agent_href(&a.id)) { (a.name) } br; span.muted.small { (a.id) } }
                            td { (project_names.get(a.project_id.as_str()).copied().unwrap_or(a.project_id.as_str())) }
                            td { (ui::badge(&a.status)) }
                            td.num { (f.active_keys) }
                            td {
                                a href={(agent_href(&a.id)) "/policy"} {
                                    @match f.policy_revision { Some(r) => { "revision " (r) }, None => { "no policy" } }
                                }
                            }
                            td.num {
                                @match spend.get(&a.id) {
                                    Some(list) => { @for (c, amt) in list { (ui::money(*amt, c)) br; } },
                                    None => { span.muted { "—" } },
                                }
                            }
                        }
                    }
                }
            }
            @if let Some(next) = &page.next_cursor {
                p { a id="agents-next" href={"/agents?cursor=" (seg(next))} { "Next page →" } }
            }
        }
        @if session.is_admin() {
            h2 { "Create an agent" }
            (create_form(session, &projects, form, errors))
        }
    })
}

fn create_form(
    session: &Session,
    projects: &[crate::control::model::Project],
    form: &CreateForm,
    errors: &CreateErrors,
) -> Markup {
    html! {
        form method="post" action="/agents" id="create-agent-form" data-test="create-agent" {
            (ui::csrf_field(session))
            (ui::once_field())
            label { "Name"
                input type="text" name="name" value=(form.name) required maxlength="200";
            }
            @if let Some(e) = &errors.name { p.field-error data-field="name" { (e) } }
            label { "Project"
                select name="project_id" required {
                    @for p in projects {
                        option value=(p.id) selected[p.id == form.project_id] { (p.name) " (" (p.id) ")" }
                    }
                }
            }
            @if let Some(e) = &errors.project { p.field-error data-field="project_id" { (e) } }
            label { "Initial policy (JSON, optional)"
                textarea name="policy" rows="6" placeholder="{\"currency\": \"USD\", …} — without a policy every purchase is declined (no_policy)" { (form.policy) }
            }
            @if let Some(e) = &errors.policy { p.field-error data-field="policy" { (e) } }
            button type="submit" id="create-agent-submit" { "Create agent" }
        }
    }
}

/// Validates a policy document; the canonical JSON to store.
fn validate_policy(text: &str) -> Result<String, String> {
    let policy: crate::policy::Policy = serde_json::from_str(text)
        .map_err(|e| format!("the policy does not match the schema: {e}"))?;
    if let Err(errors) = policy.compile() {
        return Err(errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.reason))
            .collect::<Vec<_>>()
            .join("; "));
    }
    serde_json::to_string(&policy).map_err(|_| "the policy could not be stored".to_string())
}

/// `POST /agents`: creates the agent and shows its key once.
async fn create(
    State(state): State<DashState>,
    headers: HeaderMap,
    m: Mutation<CreateForm>,
) -> Result<Response, PageError> {
    let Mutation { session, form } = m;
    let db = &state.db;
    let mut errors = CreateErrors::default();
    let name = check_name(&form.name)
        .map_err(|e| errors.name = Some(e))
        .ok();
    let projects = db.list_projects(None).await?;
    if !projects.iter().any(|p| p.id == form.project_id) {
        errors.project = Some("choose a project".into());
    }
    let policy = if form.policy.trim().is_empty() {
        None
    } else {
        validate_policy(&form.policy)
            .map_err(|e| errors.policy = Some(e))
            .ok()
    };
    let Some(name) = name.filter(|_| !errors.any()) else {
        let content = list_content(&state, &session, None, &form, &errors).await?;
        return Ok(ui::page_with_status(
            &session,
            &headers,
            Nav::Agents,
            "Agents",
            content,
            StatusCode::UNPROCESSABLE_ENTITY,
        ));
    };
    first_submission(
        &state,
        &session,
        form.once.as_deref(),
        "no second agent was created",
    )
    .await?;
    let key = crate::auth::generate();
    let now = auth::unix_now();
    let actor = session.actor();
    // The agent and its first policy revision are one transaction.
    let (agent, revision) = db
        .create_agent_with_policy(
            &form.project_id,
            None,
            &name,
            &key,
            policy.as_deref(),
            &actor,
            now,
        )
        .await?;
    let policy_note = revision.map(|rev| format!("policy revision {} stored", rev.revision));
    let content = html! {
        p.flash role="status" id="agent-created" data-agent=(agent.id) {
            "Agent " strong { (agent.name) } " created"
            @if let Some(n) = &policy_note { "; " (n) }
            "."
        }
        (key_once(&agent, &key.key_id, &key.plaintext))
    };
    Ok(no_store(ui::page(
        &session,
        &headers,
        Nav::Agents,
        "Agent created",
        content,
    )))
}

fn key_once(agent: &Agent, key_id: &str, key: &str) -> Markup {
    html! {
        section.key-once {
            p { strong { "Copy this key now: it is shown only once." } " Roony stores only its hash." }
            div.secret id="new-agent-key" data-test="new-agent-key" data-key-id=(key_id) { (key) }
            p.small.muted { "Key id " code { (key_id) } }
            p { a href=(agent_href(&agent.id)) id="agent-link" { "Go to " (agent.name) " →" } }
        }
    }
}

// ----- one agent --------------------------------------------------------------------------

#[derive(serde::Deserialize, Default, Clone)]
pub struct BudgetForm {
    #[serde(default)]
    period: String,
    #[serde(default)]
    currency: String,
    #[serde(default)]
    amount: String,
}

/// A problem with one field of the budget form: a stable code and what to do.
struct FieldError {
    code: &'static str,
    message: String,
}

impl FieldError {
    fn new(code: &'static str, message: impl Into<String>) -> FieldError {
        FieldError {
            code,
            message: message.into(),
        }
    }
}

#[derive(Default)]
struct BudgetErrors {
    period: Option<FieldError>,
    currency: Option<FieldError>,
    amount: Option<FieldError>,
}

fn field_error(field: &str, e: &Option<FieldError>) -> Markup {
    html! {
        @if let Some(e) = e { p.field-error data-field=(field) data-code=(e.code) { (e.message) } }
    }
}

/// What a budget dry run found, for the agent page.
struct BudgetDryRun {
    period: Period,
    limit: String,
    summary: super::dryrun::DryRunSummary,
    truncated: bool,
}

async fn detail_page(
    State(state): State<DashState>,
    session: Session,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let currency = match state.db.get_policy(&id).await {
        Ok(p) => budgets::policy_of(Some(&p.document))
            .map(|p| p.currency.code().to_string())
            .unwrap_or_default(),
        Err(DbError::NotFound(_)) => String::new(),
        Err(e) => return Err(e.into()),
    };
    let form = BudgetForm {
        period: "monthly".into(),
        currency,
        amount: String::new(),
    };
    detail(
        &state,
        &session,
        &headers,
        &id,
        &form,
        &BudgetErrors::default(),
        None,
        StatusCode::OK,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn detail(
    state: &DashState,
    session: &Session,
    headers: &HeaderMap,
    id: &str,
    budget_form: &BudgetForm,
    budget_errors: &BudgetErrors,
    dry_run: Option<&BudgetDryRun>,
    status: StatusCode,
) -> Result<Response, PageError> {
    let db = &state.db;
    let agent = db.get_agent(id).await?;
    let keys = db.list_agent_keys(id).await?;
    let policy = match db.get_policy(id).await {
        Ok(p) => Some(p),
        Err(DbError::NotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let own = db.list_budgets(Some(BudgetScope::Agent), Some(id)).await?;
    let mut shared = db
        .list_budgets(Some(BudgetScope::Project), Some(&agent.project_id))
        .await?;
    shared.extend(
        db.list_budgets(Some(BudgetScope::Org), Some(&agent.org_id))
            .await?,
    );
    let now = auth::unix_now();
    let parsed = policy
        .as_ref()
        .and_then(|p| budgets::policy_of(Some(&p.document)));
    let all_time =
        budgets::any_all_time([parsed.as_ref()], &own) || budgets::any_all_time([], &shared);
    let usage = budgets::Usage::load(
        db,
        now,
        budgets::UsageScope {
            agent: Some(id),
            project: Some(&agent.project_id),
            org: Some(&agent.org_id),
            all_time,
        },
    )
    .await?;
    let view = budgets::agent_view(&agent, parsed.as_ref(), &own, &shared, &usage);
    let limit_rows: Vec<(Option<&Agent>, &budgets::Limit)> =
        view.limits.iter().map(|l| (None, l)).collect();
    let intents = db
        .list_intents(
            &LedgerFilter {
                agent_id: Some(id.to_string()),
                ..Default::default()
            },
            20,
            None,
        )
        .await?
        .items;
    let project = db.get_project(&agent.project_id).await.ok();
    let href = agent_href(&agent.id);
    let admin = session.is_admin();
    let content = html! {
        section.cards id="agent-summary" data-agent=(agent.id) {
            div.card { div.label { "Status" } div.big id="agent-status" data-status=(agent.status) { (ui::badge(&agent.status)) } }
            div.card { div.label { "Project" } div { (project.as_ref().map_or(agent.project_id.as_str(), |p| p.name.as_str())) } div.small.muted { (agent.project_id) } }
            div.card { div.label { "Policy" } div {
                a href={(href) "/policy"} id="policy-link" {
                    @match &policy { Some(p) => { "revision " (p.revision) }, None => { "no policy (declines everything)" } }
                }
            } }
            div.card { div.label { "Created" } div.small { (ui::time(agent.created_at)) } }
        }
        @if let Some(reason) = &agent.frozen_reason {
            p.error id="frozen-reason" { "Frozen: " (reason) }
        }
        @if admin {
            div.actions id="agent-actions" {
                @if agent.status == "frozen" {
                    form.inline method="post" action={(href) "/unfreeze"} id="unfreeze-form" {
                        (ui::csrf_field(session))
                        button type="submit" id="unfreeze-submit" { "Unfreeze" }
                    }
                } @else {
                    form.inline method="post" action={(href) "/freeze"} id="freeze-form" data-confirm="Freeze this agent? Its purchases are declined until unfrozen." {
                        (ui::csrf_field(session))
                        input type="text" name="reason" placeholder="reason (optional)" maxlength="1000";
                        " "
                        button.danger type="submit" id="freeze-submit" { "Freeze" }
                    }
                }
                form.inline method="post" action={(href) "/rotate-key"} id="rotate-key-form" data-confirm="Rotate the key? Every active key of this agent stops working." {
                    (ui::csrf_field(session))
                    (ui::once_field())
                    button.secondary type="submit" id="rotate-key-submit" { "Rotate key" }
                }
            }
        }
        h2 { "Keys" }
        table id="agent-keys" {
            thead { tr { th { "Key id" } th { "Created" } th { "State" } th {} } }
            tbody {
                @for k in &keys {
                    tr data-key-id=(k.key_id) {
                        td { code { (k.key_id) } }
                        td.small { (ui::time(k.created_at)) }
                        td.small { @match k.revoked_at { Some(t) => { (ui::badge("revoked")) " " (ui::time(t)) }, None => { (ui::badge("active")) } } }
                        td {
                            @if admin && k.revoked_at.is_none() {
                                form.inline method="post" action={(href) "/keys/" (seg(&k.key_id)) "/revoke"} data-confirm="Revoke this key?" {
                                    (ui::csrf_field(session))
                                    button.danger type="submit" data-test="revoke-key" { "Revoke" }
                                }
                            }
                        }
                    }
                }
            }
        }
        p.muted.small { "Last use of a key is not recorded by the control plane (sidecars verify keys locally)." }
        h2 { "Budgets" }
        @if view.currency.is_none() {
            p.error id="no-policy-budgets" { "This agent has no valid policy: its sidecar declines every purchase (no_policy), whatever its budgets." }
        }
        @if view.limits.is_empty() {
            p.muted id="no-agent-budgets" { "no budgets enforced for this agent (none in its policy, no agent, project or organization budget in its currency)" }
        } @else {
            (budgets::limits_table(session, "agent-budgets", &limit_rows, true))
            p.muted.small { (budgets::USED_NOTE) }
        }
        (budgets::inactive_list(session, &view.inactive))
        @if admin {
            form method="post" action={(href) "/budgets"} id="budget-form" data-test="set-budget" {
                (ui::csrf_field(session))
                div.filters {
                    label { "Period"
                        select name="period" {
                            @for p in Period::ALL {
                                option value=(p.as_str()) selected[p.as_str() == budget_form.period] { (p.as_str()) }
                            }
                        }
                    }
                    label { "Currency"
                        input type="text" name="currency" value=(budget_form.currency) size="4" maxlength="3" required;
                    }
                    label { "Limit"
                        input type="text" name="amount" value=(budget_form.amount) placeholder="12.50" inputmode="decimal" required;
                    }
                    button type="submit" id="budget-submit" { "Set budget" }
                    button.secondary type="submit" id="budget-dry-run" formaction={(href) "/budgets/dry-run"} data-test="budget-dry-run" { "Dry run (last 30 days)" }
                }
                (field_error("period", &budget_errors.period))
                (field_error("currency", &budget_errors.currency))
                (field_error("amount", &budget_errors.amount))
                p.small.muted {
                    "An agent budget can only tighten: it lowers the policy's budget of its period (or adds one) and must be in the policy's currency"
                    @if let Some(c) = view.currency { " (" (c.code()) ")" }
                    ". A looser limit is refused — raise the policy's budget on the " a href={(href) "/policy"} { "policy page" } " instead. "
                    "Project and organization budgets are set on the " a href="/budgets" { "budgets page" } "."
                }
            }
        }
        @if let Some(d) = dry_run { (budget_dry_run_markup(d)) }
        h2 { "Recent purchases" }
        @if intents.is_empty() {
            p.muted id="no-intents" { "no purchases yet" }
        } @else {
            table id="agent-intents" {
                thead { tr { th { "Created" } th { "Purchase" } th { "Merchant" } th.num { "Amount" } th { "Status" } th { "Reasons" } } }
                tbody {
                    @for i in &intents {
                        tr {
                            td.small { (ui::time(i.created_at)) }
                            td { a href={"/transactions/" (seg(&i.id))} { (i.id) } }
                            td { (i.merchant_name) }
                            td.num { (ui::money(i.amount, &i.currency)) }
                            td { (ui::badge(&i.status)) }
                            td.small { @for r in &i.reasons { code { (r) } " " } }
                        }
                    }
                }
            }
        }
    };
    Ok(ui::page_with_status(
        session,
        headers,
        Nav::Agents,
        &format!("Agent {}", agent.name),
        content,
        status,
    ))
}

fn budget_dry_run_markup(d: &BudgetDryRun) -> Markup {
    let s = &d.summary;
    html! {
        section #dry-run-results data-test="dry-run-results" data-replayed=(s.replayed) data-changed=(s.changes.len()) {
            h2 { "Dry run: a " (d.period.as_str()) " agent budget of " (d.limit) " over the last 30 days" }
            p.muted.small #dry-run-caveat {
                "Replayed from the ledger in time order through the current policy with this agent's budgets folded in as its sidecar folds them — once as they are, once with this budget set. Not reconstructed: intents before the window, reservations released later, project and organization budgets (shared with other agents), the frozen state and MCP confirmations. Nothing was saved."
            }
            @if d.truncated { p.error { "Only the first " (super::dryrun::MAX_REPLAY) " intents of the window were replayed." } }
            (super::dryrun::results_markup(s, &super::dryrun::Labels {
                current: html! { "As enforced now" },
                draft: "With this budget",
                change: "Now → with this budget",
                reasons: "Reasons",
                replayed_note: None,
            }))
        }
    }
}

fn period_of(s: &str) -> Option<Period> {
    budgets::period_of(s)
}

#[derive(serde::Deserialize, Default)]
pub struct Empty {}

/// `POST /agents/{id}/rotate-key`: a new key, shown once; the others are revoked.
async fn rotate_key(
    State(state): State<DashState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    m: Mutation<OnceForm>,
) -> Result<Response, PageError> {
    let session = m.session;
    let agent = state.db.get_agent(&id).await?;
    first_submission(
        &state,
        &session,
        m.form.once.as_deref(),
        "the key was not rotated again",
    )
    .await?;
    let key = crate::auth::generate();
    let revoked = state
        .db
        .rotate_agent_key(&id, &key, &session.actor(), auth::unix_now())
        .await?;
    let content = html! {
        p.flash role="status" id="key-rotated" {
            "New key for " strong { (agent.name) } "; revoked: "
            @if revoked.is_empty() { "none" } @else { @for r in &revoked { code { (r) } " " } }
        }
        (key_once(&agent, &key.key_id, &key.plaintext))
    };
    Ok(no_store(ui::page(
        &session,
        &headers,
        Nav::Agents,
        "Key rotated",
        content,
    )))
}

/// `POST /agents/{id}/keys/{key_id}/revoke`.
async fn revoke_key(
    State(state): State<DashState>,
    headers: HeaderMap,
    Path((id, key_id)): Path<(String, String)>,
    m: Mutation<Empty>,
) -> Result<Response, PageError> {
    state
        .db
        .revoke_agent_key(&id, &key_id, &m.session.actor(), auth::unix_now())
        .await?;
    Ok(redirect_with_flash(
        &agent_href(&id),
        &format!("key {key_id} revoked"),
        &headers,
    ))
}

#[derive(serde::Deserialize, Default)]
pub struct FreezeForm {
    #[serde(default)]
    reason: String,
}

/// `POST /agents/{id}/freeze`.
async fn freeze(
    State(state): State<DashState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    m: Mutation<FreezeForm>,
) -> Result<Response, PageError> {
    let reason = check_note(&m.form.reason)?.unwrap_or_else(|| "frozen by an administrator".into());
    state
        .db
        .set_agent_frozen(&id, Some(&reason), &m.session.actor(), auth::unix_now())
        .await?;
    Ok(redirect_with_flash(
        &agent_href(&id),
        "agent frozen",
        &headers,
    ))
}

/// `POST /agents/{id}/unfreeze`.
async fn unfreeze(
    State(state): State<DashState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    m: Mutation<Empty>,
) -> Result<Response, PageError> {
    state
        .db
        .set_agent_frozen(&id, None, &m.session.actor(), auth::unix_now())
        .await?;
    Ok(redirect_with_flash(
        &agent_href(&id),
        "agent unfrozen",
        &headers,
    ))
}

/// A budget form checked against the agent's policy: what to set, or the errors.
struct CheckedBudget {
    period: Period,
    currency: Currency,
    amount: i64,
    /// The agent's policy, if it has a readable one.
    policy: Option<crate::policy::Policy>,
}

/// Validates the budget form of agent `id`. An agent budget can only tighten the policy
/// (`sync::client::fold_budgets`): one in another currency than the policy's is refused
/// (`budget_currency_mismatch`), and so is one not below the policy's budget of the same
/// period (`budget_looser_than_policy`), which would have no effect — the policy's limit would
/// still bind. Without a policy any currency is accepted (the agent declines everything
/// until one is published).
async fn check_budget(
    state: &DashState,
    id: &str,
    form: &BudgetForm,
) -> Result<Result<CheckedBudget, BudgetErrors>, PageError> {
    let db = &state.db;
    db.get_agent(id).await?;
    let policy = match db.get_policy(id).await {
        Ok(p) => budgets::policy_of(Some(&p.document)),
        Err(DbError::NotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let mut errors = BudgetErrors::default();
    let period = period_of(form.period.trim());
    if period.is_none() {
        errors.period = Some(FieldError::new(
            "invalid_period",
            "choose daily, weekly, monthly or all_time",
        ));
    }
    let currency = match Currency::parse(form.currency.trim()) {
        Err(_) => {
            errors.currency = Some(FieldError::new(
                "invalid_currency",
                "enter an ISO 4217 currency code, e.g. USD",
            ));
            None
        }
        Ok(c) => match &policy {
            Some(p) if p.currency != c => {
                errors.currency = Some(FieldError::new(
                    "budget_currency_mismatch",
                    format!(
                        "this agent's policy spends {p} only: its sidecar would ignore a {c} budget. Set the budget in {p}.",
                        p = p.currency.code(),
                        c = c.code()
                    ),
                ));
                None
            }
            _ => Some(c),
        },
    };
    let amount = match currency {
        Some(c) => parse_amount(&form.amount, c)
            .map_err(|e| errors.amount = Some(FieldError::new("invalid_amount", e)))
            .ok(),
        None => None,
    };
    if let (Some(p), Some(period), Some(c), Some(amount)) = (&policy, period, currency, amount)
        && let Some(rule) = p.budgets.iter().find(|r| r.period == period)
        && amount >= rule.limit
    {
        errors.amount = Some(FieldError::new(
            "budget_looser_than_policy",
            format!(
                "the policy's {} budget of {} already binds: an agent budget of {} would have no effect. Enter less than {}, or raise the budget in the policy.",
                period.as_str(),
                ui::money(rule.limit, c.code()),
                ui::money(amount, c.code()),
                ui::money(rule.limit, c.code()),
            ),
        ));
    }
    match (period, currency, amount) {
        (Some(period), Some(currency), Some(amount))
            if errors.period.is_none() && errors.currency.is_none() && errors.amount.is_none() =>
        {
            Ok(Ok(CheckedBudget {
                period,
                currency,
                amount,
                policy,
            }))
        }
        _ => Ok(Err(errors)),
    }
}

/// `POST /agents/{id}/budgets`: sets the agent's budget for a period and currency.
async fn set_budget(
    State(state): State<DashState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    m: Mutation<BudgetForm>,
) -> Result<Response, PageError> {
    let Mutation { session, form } = m;
    let checked = match check_budget(&state, &id, &form).await? {
        Ok(c) => c,
        Err(errors) => {
            return detail(
                &state,
                &session,
                &headers,
                &id,
                &form,
                &errors,
                None,
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await;
        }
    };
    let budget = state
        .db
        .set_budget(
            BudgetScope::Agent,
            &id,
            checked.period.as_str(),
            checked.currency.code(),
            checked.amount,
            &session.actor(),
            auth::unix_now(),
        )
        .await?;
    let note = if checked.policy.is_none() {
        "; the agent has no policy, so its purchases are declined until one is published"
    } else {
        ""
    };
    Ok(redirect_with_flash(
        &agent_href(&id),
        &format!(
            "{} budget set to {}{note}",
            budget.period,
            ui::money(budget.limit, &budget.currency)
        ),
        &headers,
    ))
}

/// `POST /agents/{id}/budgets/dry-run`: replays the agent's last 30 days with the budget
/// of the form set (as its sidecar would fold it into the policy) against the budgets as
/// they are; changes nothing.
async fn budget_dry_run(
    State(state): State<DashState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    m: Mutation<BudgetForm>,
) -> Result<Response, PageError> {
    use super::dryrun;
    let Mutation { session, form } = m;
    let checked = match check_budget(&state, &id, &form).await? {
        Ok(c) => c,
        Err(errors) => {
            return detail(
                &state,
                &session,
                &headers,
                &id,
                &form,
                &errors,
                None,
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await;
        }
    };
    let Some(policy) = checked.policy else {
        let errors = BudgetErrors {
            amount: Some(FieldError::new(
                "no_policy",
                "the agent has no policy: every purchase is declined whatever its budgets; publish a policy first",
            )),
            ..BudgetErrors::default()
        };
        return detail(
            &state,
            &session,
            &headers,
            &id,
            &form,
            &errors,
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    };
    let own = state
        .db
        .list_budgets(Some(BudgetScope::Agent), Some(&id))
        .await?;
    let mut proposed: Vec<crate::control::model::Budget> = own
        .iter()
        .filter(|b| {
            !(b.period == checked.period.as_str()
                && b.currency.eq_ignore_ascii_case(checked.currency.code()))
        })
        .cloned()
        .collect();
    proposed.push(crate::control::model::Budget {
        id: "proposed".into(),
        scope: BudgetScope::Agent,
        scope_id: id.clone(),
        period: checked.period.as_str().to_string(),
        currency: checked.currency.code().to_string(),
        limit: checked.amount,
        created_at: 0,
        updated_at: 0,
    });
    let (Ok(current), Ok(draft)) = (
        budgets::folded(policy.clone(), &own).compile(),
        budgets::folded(policy, &proposed).compile(),
    ) else {
        return Err(PageError::new(
            StatusCode::CONFLICT,
            "invalid_policy",
            "the agent's current policy is not valid; fix it on the policy page first",
        ));
    };
    let now = auth::unix_now();
    let limit = i64::try_from(dryrun::MAX_REPLAY).unwrap_or(10_000) + 1;
    let intents = state
        .db
        .dash_agent_intents_between(&id, now - 30 * 86_400, now + 1, limit)
        .await?;
    let truncated = intents.len() > dryrun::MAX_REPLAY;
    let items: Vec<dryrun::ReplayItem> = intents
        .iter()
        .take(dryrun::MAX_REPLAY)
        .filter_map(dryrun::item_of)
        .collect();
    let summary = dryrun::compare(Some(&current), &draft, &items, now);
    let view = BudgetDryRun {
        period: checked.period,
        limit: ui::money(checked.amount, checked.currency.code()),
        summary,
        truncated,
    };
    detail(
        &state,
        &session,
        &headers,
        &id,
        &form,
        &BudgetErrors::default(),
        Some(&view),
        StatusCode::OK,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_with_integer_math() {
        let usd = Currency::USD;
        assert_eq!(parse_amount("12.50", usd), Ok(1250));
        assert_eq!(parse_amount(" 12 ", usd), Ok(1200));
        assert_eq!(parse_amount("0.5", usd), Ok(50));
        assert_eq!(parse_amount(".05", usd), Ok(5));
        let jpy = Currency::parse("jpy").unwrap();
        assert_eq!(parse_amount("1200", jpy), Ok(1200));
        assert!(parse_amount("12.5", jpy).is_err());
        let kwd = Currency::parse("kwd").unwrap();
        assert_eq!(parse_amount("1.25", kwd), Ok(1250));
        for bad in [
            "",
            "abc",
            "12.505",
            "-1",
            "1e3",
            "12.",
            "0",
            "0.00",
            "1,000",
            "99999999999999999",
        ] {
            assert!(parse_amount(bad, usd).is_err(), "{bad}");
        }
    }
}
