//! The Policies pages: every agent's current policy revision, the policy editor
//! (validate, dry run, publish), revision history and the line diff of two revisions.
//!
//! Publishing validates like the admin API's `PUT …/policy` (`Policy` parsing, then
//! `compile()` with exact field paths) and writes with `ControlDb::put_policy` (audit event
//! and configuration-revision bump, so the bundle reaches the sidecars).

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use maud::{Markup, html};

use super::auth::{Mutation, Session, unix_now};
use super::dryrun::{self, DryRunSummary, MAX_REPLAY};
use super::ui::{self, Nav};
use super::{DashState, PageError, redirect_with_flash};
use crate::control::model::{Agent, PolicyRevision};
use crate::policy::{CompiledPolicy, Policy, PolicyError};

pub fn routes() -> Router<DashState> {
    Router::new()
        .route("/policies", get(list))
        .route("/agents/{id}/policy", get(editor).post(publish))
        .route("/agents/{id}/policy/diff", get(diff_page))
        .route("/agents/{id}/policy/dry-run", post(dry_run))
}

/// Percent-encodes one path segment (ids keep their `_`, `-`, `.`, `~`).
pub(super) fn seg(s: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SET).to_string()
}

/// Default and largest dry-run window, days.
const DEFAULT_DAYS: i64 = 30;
const MAX_DAYS: i64 = 365;

/// `GET /policies`.
async fn list(
    State(state): State<DashState>,
    session: Session,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let rows = state.db.dash_policy_summaries().await?;
    let content = html! {
        p.muted { "Each agent's current policy revision. Open one to edit, dry-run and publish a new revision." }
        @if rows.is_empty() {
            p.muted #no-agents { "no agents yet" }
        } @else {
            table #policies-table {
                thead { tr { th { "Agent" } th { "Project" } th { "Status" } th.num { "Revision" } th { "Author" } th { "Published" } } }
                tbody {
                    @for r in &rows {
                        tr data-test="policy-row" data-agent-id=(r.agent_id) {
                            td { a href={"/agents/" (seg(&r.agent_id)) "/policy"} { (r.agent_name) } br; span.small.muted { (r.agent_id) } }
                            td.small { (r.project_id) }
                            td { (ui::badge(&r.agent_status)) }
                            td.num { @if let Some(n) = r.revision { (n) } @else { span.muted { "none" } } }
                            td { (r.author.as_deref().unwrap_or("")) }
                            td.small { @if let Some(t) = r.created_at { (ui::time(t)) } }
                        }
                    }
                }
            }
        }
    };
    Ok(ui::page(
        &session,
        &headers,
        Nav::Policies,
        "Policies",
        content,
    ))
}

/// The draft parsed and compiled, or every problem with its field path.
pub fn parse_draft(text: &str) -> Result<(Policy, CompiledPolicy), Vec<PolicyError>> {
    if text.trim().is_empty() {
        return Err(vec![PolicyError {
            field: "(document)".into(),
            reason: "the policy is empty; write a JSON object".into(),
        }]);
    }
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        vec![PolicyError {
            field: "(json)".into(),
            reason: format!("not valid JSON: {e}"),
        }]
    })?;
    let policy: Policy = serde_json::from_value(value).map_err(|e| {
        vec![PolicyError {
            field: "(schema)".into(),
            reason: format!("the policy does not match the schema: {e}"),
        }]
    })?;
    let compiled = policy.compile()?;
    Ok((policy, compiled))
}

/// Pretty-printed JSON of a stored document.
fn pretty(doc: &serde_json::Value) -> String {
    serde_json::to_string_pretty(doc).unwrap_or_else(|_| doc.to_string())
}

const TEMPLATE: &str = "{\n  \"currency\": \"USD\",\n  \"max_per_transaction\": 10000,\n  \"budgets\": [\n    {\"period\": \"daily\", \"limit\": 25000}\n  ]\n}";

/// What a dry run found, for the page.
struct DryRunView {
    days: i64,
    summary: DryRunSummary,
    /// Ledger intents that could not be rebuilt (unknown currency).
    skipped: usize,
    truncated: bool,
    current_revision: Option<i64>,
    current_invalid: bool,
    /// The current revision and the draft, pretty-printed, for the preview diff.
    current_text: String,
    draft_text: String,
    /// How many agent budgets were folded into both sides.
    agent_budgets: usize,
}

struct Editor<'a> {
    agent: &'a Agent,
    revisions: &'a [PolicyRevision],
    draft: &'a str,
    errors: &'a [PolicyError],
    days: &'a str,
    dry_run: Option<&'a DryRunView>,
    /// The revision the draft is based on (0: none); publishing refuses if it is no longer
    /// current.
    base: i64,
    /// Someone published `current` after the draft's `base`: shown above the editor.
    conflict: Option<(i64, i64)>,
    /// The draft was loaded from this older revision ("load into editor").
    loaded_from: Option<i64>,
}

fn editor_markup(session: &Session, e: &Editor<'_>) -> Markup {
    let id = seg(&e.agent.id);
    let current = e.revisions.first();
    html! {
        p { "Agent " strong { (e.agent.name) } " " span.muted.small { (e.agent.id) } " · " (ui::badge(&e.agent.status)) }
        @match current {
            Some(c) => p #current-revision data-revision=(c.revision) {
                "Current revision " strong { (c.revision) } " by " (c.author) ", " (ui::time(c.created_at)) "."
            },
            None => p.muted #current-revision data-revision="0" { "No policy yet: the agent's purchases are declined (no_policy) until one is published." },
        }
        @if let Some((base, now_current)) = e.conflict {
            div.error #policy-conflict role="alert" data-base=(base) data-current=(now_current) {
                p { strong { "Not published: revision " (now_current) " was published after revision " (base) ", which your draft started from." } }
                p { "Your draft is kept below. "
                    a href={"/agents/" (id) "/policy/diff?from=" (base) "&to=" (now_current)} { "See what changed in revision " (now_current) }
                    ", then publish again to replace it with your draft." }
            }
        }
        @if let Some(n) = e.loaded_from {
            p.notice #loaded-from data-revision=(n) { "The editor holds revision " (n) "; publishing it makes it a new revision." }
        }
        @if !e.errors.is_empty() {
            div.error #policy-errors-box role="alert" {
                p { strong { "The policy is not valid; nothing was published." } }
                ul #policy-errors {
                    @for err in e.errors {
                        li data-field=(err.field) { code.field-error { (err.field) } ": " (err.reason) }
                    }
                }
            }
        }
        @if session.is_admin() {
            form #policy-form hx-boost="false" method="post" action={"/agents/" (id) "/policy"} {
                (ui::csrf_field(session))
                input type="hidden" name="base_revision" value=(e.base);
                label for="policy-json" { "Policy (JSON; see docs/policy.md)" }
                textarea #policy-json name="policy" rows="24" spellcheck="false" data-test="policy-json" { (e.draft) }
                div.actions {
                    button #publish type="submit" data-test="publish" { "Publish" }
                    button #dry-run.secondary type="submit" formaction={"/agents/" (id) "/policy/dry-run"} data-test="dry-run" { "Validate / dry run" }
                    label.small { "Replay the last "
                        input #dry-run-days type="number" name="days" min="1" max=(MAX_DAYS) value=(e.days) class="days-input";
                        " days" }
                }
            }
        } @else {
            pre #policy-json data-test="policy-json" { (e.draft) }
            p.muted.small { "Viewers cannot publish or dry-run policies." }
        }
        @if let Some(d) = e.dry_run { (dry_run_markup(d)) }
        h2 { "Revision history" }
        @if e.revisions.is_empty() {
            p.muted { "no revisions yet" }
        } @else {
            form.filters #diff-form method="get" action={"/agents/" (id) "/policy/diff"} {
                label { "From" select name="from" { @for r in e.revisions { option value=(r.revision) selected[Some(r.revision) == current.map(|c| c.revision - 1)] { (r.revision) } } } }
                label { "To" select name="to" { @for r in e.revisions { option value=(r.revision) selected[Some(r.revision) == current.map(|c| c.revision)] { (r.revision) } } } }
                button.secondary type="submit" data-test="diff-submit" { "Show diff" }
            }
            table #policy-revisions {
                thead { tr { th.num { "Revision" } th { "Author" } th { "Created" } th { "" } th { "" } } }
                tbody {
                    @for r in e.revisions {
                        tr data-test="revision-row" data-revision=(r.revision) {
                            td.num { (r.revision) }
                            td { (r.author) }
                            td.small { (ui::time(r.created_at)) }
                            td { @if r.revision > 1 { a href={"/agents/" (id) "/policy/diff?from=" (r.revision - 1) "&to=" (r.revision)} { "diff with " (r.revision - 1) } } }
                            td { @if session.is_admin() && Some(r.revision) != current.map(|c| c.revision) {
                                a data-test="load-revision" href={"/agents/" (id) "/policy?revision=" (r.revision)} { "load into editor" }
                            } }
                        }
                    }
                }
            }
        }
    }
}

fn dry_run_markup(d: &DryRunView) -> Markup {
    let s = &d.summary;
    html! {
        section #dry-run-results data-test="dry-run-results" data-replayed=(s.replayed) data-changed=(s.changes.len()) {
            h2 { "Dry run: the last " (d.days) " days" }
            p #draft-valid { "The draft is valid (not published yet)." }
            p.muted.small #dry-run-caveat {
                "Replayed from the ledger in time order with budgets, velocity and risk history rebuilt as the replay goes. "
                "Both the current policy and the draft include this agent's budgets, folded in as its sidecar folds them (an agent budget tightens the policy's budget of its period)"
                @if d.agent_budgets > 0 { " — " span #dry-run-agent-budgets data-count=(d.agent_budgets) { (d.agent_budgets) " agent budget(s)" } " here; change them on the agent's page, where a budget can be dry-run too" }
                ". Not reconstructed: intents before the window (earlier budget use and risk history), reservations released later, project and organization budgets (shared with other agents), the frozen state and MCP confirmations."
            }
            @if d.current_invalid { p.error { "The current policy could not be read: it counts as no policy (everything declined)." } }
            (preview_markup(d))
            @if d.truncated { p.error { "Only the first " (MAX_REPLAY) " intents of the window were replayed." } }
            (dryrun::results_markup(s, &dryrun::Labels {
                current: html! { "Current policy" @if let Some(r) = d.current_revision { " (revision " (r) ")" } },
                draft: "Draft",
                change: "Current → draft",
                reasons: "Draft reasons",
                replayed_note: (d.skipped > 0).then(|| format!("{} skipped (unknown currency)", d.skipped)),
            }))
        }
    }
}

/// What publishing the draft would change in the document (current → draft).
fn preview_markup(d: &DryRunView) -> Markup {
    let ops = line_diff(&d.current_text, &d.draft_text);
    let added = ops.iter().filter(|o| matches!(o, DiffOp::Add(_))).count();
    let removed = ops.iter().filter(|o| matches!(o, DiffOp::Del(_))).count();
    html! {
        details #draft-diff data-added=(added) data-removed=(removed) open[added + removed > 0 && added + removed <= 40] {
            summary { "Changes to the document: " span.add { "+" (added) } " " span.del { "−" (removed) } " lines" }
            @if added + removed == 0 {
                p.muted { "The draft is the current revision." }
            } @else {
                table.diff {
                    tbody {
                        @for op in &ops {
                            @match op {
                                DiffOp::Same(l) => tr.same { td.small.muted { " " } td { code { (l) } } },
                                DiffOp::Add(l) => tr.add data-test="draft-diff-add" { td.small { "+" } td { code { (l) } } },
                                DiffOp::Del(l) => tr.del data-test="draft-diff-del" { td.small { "−" } td { code { (l) } } },
                            }
                        }
                    }
                }
            }
        }
    }
}

async fn load(state: &DashState, id: &str) -> Result<(Agent, Vec<PolicyRevision>), PageError> {
    let agent = state.db.get_agent(id).await?;
    let revisions = state.db.list_policy_revisions(id).await?;
    Ok((agent, revisions))
}

fn title(agent: &Agent) -> String {
    format!("Policy of {}", agent.name)
}

/// `GET /agents/{id}/policy`.
async fn editor(
    State(state): State<DashState>,
    session: Session,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<EditorQuery>,
) -> Result<Response, PageError> {
    let (agent, revisions) = load(&state, &id).await?;
    let base = revisions.first().map_or(0, |r| r.revision);
    // "Load into editor": an older revision as the draft (published only when asked).
    let loaded = match parse_revision(q.revision.as_deref(), "revision")? {
        Some(n) => Some(
            revisions
                .iter()
                .find(|r| r.revision == n)
                .ok_or_else(|| PageError::not_found(&format!("revision {n}")))?,
        ),
        None => None,
    };
    let draft = loaded
        .or(revisions.first())
        .map(|r| pretty(&r.document))
        .unwrap_or_else(|| TEMPLATE.to_string());
    let days = DEFAULT_DAYS.to_string();
    let content = editor_markup(
        &session,
        &Editor {
            agent: &agent,
            revisions: &revisions,
            draft: &draft,
            errors: &[],
            days: &days,
            dry_run: None,
            base,
            conflict: None,
            loaded_from: loaded.map(|r| r.revision).filter(|n| *n != base),
        },
    );
    Ok(ui::page(
        &session,
        &headers,
        Nav::Policies,
        &title(&agent),
        content,
    ))
}

#[derive(serde::Deserialize)]
pub struct EditorQuery {
    revision: Option<String>,
}

#[derive(serde::Deserialize)]
pub struct PolicyForm {
    #[serde(default)]
    policy: String,
    #[serde(default)]
    days: Option<String>,
    /// The revision the draft started from (absent from older forms: not checked).
    #[serde(default)]
    base_revision: Option<String>,
}

impl PolicyForm {
    /// The draft's base revision; `current` when the form has none.
    fn base(&self, current: i64) -> Result<i64, PageError> {
        Ok(parse_revision(self.base_revision.as_deref(), "base_revision")?.unwrap_or(current))
    }
}

/// Browsers send textarea newlines as CRLF.
fn normalize_newlines(s: &str) -> String {
    s.replace("\r\n", "\n")
}

/// The editor again with the draft's errors (`422`): nothing was published.
#[allow(clippy::too_many_arguments)]
fn invalid_draft(
    session: &Session,
    headers: &HeaderMap,
    agent: &Agent,
    revisions: &[PolicyRevision],
    draft: &str,
    days: &str,
    base: i64,
    errors: &[PolicyError],
) -> Response {
    let content = editor_markup(
        session,
        &Editor {
            agent,
            revisions,
            draft,
            errors,
            days,
            dry_run: None,
            base,
            conflict: None,
            loaded_from: None,
        },
    );
    ui::page_with_status(
        session,
        headers,
        Nav::Policies,
        &title(agent),
        content,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
}

/// `POST /agents/{id}/policy`: publish the draft as a new revision.
async fn publish(
    State(state): State<DashState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    m: Mutation<PolicyForm>,
) -> Result<Response, PageError> {
    let (agent, revisions) = load(&state, &id).await?;
    let current = revisions.first().map_or(0, |r| r.revision);
    let base = m.form.base(current)?;
    let draft = normalize_newlines(&m.form.policy);
    let days = m
        .form
        .days
        .clone()
        .unwrap_or_else(|| DEFAULT_DAYS.to_string());
    let policy = match parse_draft(&draft) {
        Ok((policy, _)) => policy,
        Err(errors) => {
            return Ok(invalid_draft(
                &m.session, &headers, &agent, &revisions, &draft, &days, base, &errors,
            ));
        }
    };
    let document = serde_json::to_string(&policy).map_err(|_| {
        PageError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the policy could not be serialized; try again",
        )
    })?;
    let rev = match state
        .db
        .put_policy_based_on(&id, &document, base, &m.session.actor(), unix_now())
        .await
    {
        Ok(rev) => rev,
        Err(crate::control::db::DbError::StalePolicy { base, current }) => {
            // Someone published meanwhile: the draft comes back, now based on the current
            // revision (publishing again replaces it knowingly).
            let (agent, revisions) = load(&state, &id).await?;
            let content = editor_markup(
                &m.session,
                &Editor {
                    agent: &agent,
                    revisions: &revisions,
                    draft: &draft,
                    errors: &[],
                    days: &days,
                    dry_run: None,
                    base: current,
                    conflict: Some((base, current)),
                    loaded_from: None,
                },
            );
            return Ok(ui::page_with_status(
                &m.session,
                &headers,
                Nav::Policies,
                &title(&agent),
                content,
                StatusCode::CONFLICT,
            ));
        }
        Err(e) => return Err(e.into()),
    };
    Ok(redirect_with_flash(
        &format!("/agents/{}/policy", seg(&id)),
        &format!("published revision {}", rev.revision),
        &headers,
    ))
}

fn parse_days(text: Option<&str>) -> Result<i64, PolicyError> {
    let t = text.map(str::trim).unwrap_or("");
    if t.is_empty() {
        return Ok(DEFAULT_DAYS);
    }
    match t.parse::<i64>() {
        Ok(d) if (1..=MAX_DAYS).contains(&d) => Ok(d),
        _ => Err(PolicyError {
            field: "days".into(),
            reason: format!("must be a whole number of days between 1 and {MAX_DAYS}"),
        }),
    }
}

/// `POST /agents/{id}/policy/dry-run`: validate the draft and replay the ledger; changes
/// nothing.
async fn dry_run(
    State(state): State<DashState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    m: Mutation<PolicyForm>,
) -> Result<Response, PageError> {
    let (agent, revisions) = load(&state, &id).await?;
    let base = m.form.base(revisions.first().map_or(0, |r| r.revision))?;
    let draft = normalize_newlines(&m.form.policy);
    let days_text = m
        .form
        .days
        .clone()
        .unwrap_or_else(|| DEFAULT_DAYS.to_string());
    let parsed = parse_draft(&draft);
    let days = parse_days(Some(&days_text));
    let (draft_policy, days) = match (parsed, days) {
        (Ok((p, _)), Ok(d)) => (p, d),
        (p, d) => {
            let mut errors = p.err().unwrap_or_default();
            errors.extend(d.err());
            return Ok(invalid_draft(
                &m.session, &headers, &agent, &revisions, &draft, &days_text, base, &errors,
            ));
        }
    };
    let now = unix_now();
    let current = revisions.first();
    // Both sides with the agent's budgets folded in as its sidecar folds them: an agent
    // budget tightens (or adds) the policy's budget of its period.
    let own = state
        .db
        .list_budgets(Some(crate::control::model::BudgetScope::Agent), Some(&id))
        .await?;
    let current_compiled = current.and_then(|r| {
        serde_json::from_value::<Policy>(r.document.clone())
            .ok()
            .and_then(|p| super::agents::budgets::folded(p, &own).compile().ok())
    });
    // The document as it would be published (before the agent's budgets are folded in).
    let draft_text = serde_json::to_value(&draft_policy)
        .map(|v| pretty(&v))
        .unwrap_or_default();
    let compiled = match super::agents::budgets::folded(draft_policy, &own).compile() {
        Ok(c) => c,
        Err(errors) => {
            return Ok(invalid_draft(
                &m.session, &headers, &agent, &revisions, &draft, &days_text, base, &errors,
            ));
        }
    };
    let agent_budgets = own.len();
    let limit = i64::try_from(MAX_REPLAY).unwrap_or(10_000) + 1;
    let intents = state
        .db
        .dash_agent_intents_between(&id, now - days * 86_400, now + 1, limit)
        .await?;
    let truncated = intents.len() > MAX_REPLAY;
    let items: Vec<dryrun::ReplayItem> = intents
        .iter()
        .take(MAX_REPLAY)
        .filter_map(dryrun::item_of)
        .collect();
    let skipped = intents.len().min(MAX_REPLAY) - items.len();
    let summary = dryrun::compare(current_compiled.as_ref(), &compiled, &items, now);
    let view = DryRunView {
        days,
        summary,
        skipped,
        truncated,
        current_revision: current.map(|r| r.revision),
        current_invalid: current.is_some() && current_compiled.is_none(),
        current_text: current.map(|r| pretty(&r.document)).unwrap_or_default(),
        draft_text,
        agent_budgets,
    };
    let content = editor_markup(
        &m.session,
        &Editor {
            agent: &agent,
            revisions: &revisions,
            draft: &draft,
            errors: &[],
            days: &days_text,
            dry_run: Some(&view),
            base,
            conflict: None,
            loaded_from: None,
        },
    );
    Ok(ui::page(
        &m.session,
        &headers,
        Nav::Policies,
        &title(&agent),
        content,
    ))
}

#[derive(serde::Deserialize)]
pub struct DiffQuery {
    from: Option<String>,
    to: Option<String>,
}

fn parse_revision(text: Option<&str>, what: &str) -> Result<Option<i64>, PageError> {
    match text.map(str::trim).filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => t.parse::<i64>().map(Some).map_err(|_| {
            PageError::bad_request(
                "invalid_revision",
                &format!("{what} must be a revision number"),
            )
        }),
    }
}

/// `GET /agents/{id}/policy/diff?from=N&to=M` (default: previous vs current).
async fn diff_page(
    State(state): State<DashState>,
    session: Session,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<DiffQuery>,
) -> Result<Response, PageError> {
    let (agent, revisions) = load(&state, &id).await?;
    let Some(current) = revisions.first() else {
        return Err(PageError::not_found("policy"));
    };
    let to = parse_revision(q.to.as_deref(), "to")?.unwrap_or(current.revision);
    let from = parse_revision(q.from.as_deref(), "from")?.unwrap_or(to.saturating_sub(1).max(1));
    let find = |n: i64| {
        revisions
            .iter()
            .find(|r| r.revision == n)
            .ok_or_else(|| PageError::not_found(&format!("revision {n}")))
    };
    let (old, new) = (find(from)?, find(to)?);
    let (old_text, new_text) = (pretty(&old.document), pretty(&new.document));
    let ops = line_diff(&old_text, &new_text);
    let added = ops.iter().filter(|o| matches!(o, DiffOp::Add(_))).count();
    let removed = ops.iter().filter(|o| matches!(o, DiffOp::Del(_))).count();
    let aid = seg(&agent.id);
    let content = html! {
        p { a href={"/agents/" (aid) "/policy"} { "← back to the policy of " (agent.name) } }
        p #diff-summary data-from=(from) data-to=(to) data-added=(added) data-removed=(removed) {
            "Revision " strong { (from) } " (" (old.author) ", " (ui::time(old.created_at)) ") → revision " strong { (to) }
            " (" (new.author) ", " (ui::time(new.created_at)) "): "
            span.add { "+" (added) } " " span.del { "−" (removed) } " lines"
        }
        form.filters method="get" action={"/agents/" (aid) "/policy/diff"} {
            label { "From" select name="from" { @for r in &revisions { option value=(r.revision) selected[r.revision == from] { (r.revision) } } } }
            label { "To" select name="to" { @for r in &revisions { option value=(r.revision) selected[r.revision == to] { (r.revision) } } } }
            button.secondary type="submit" { "Show diff" }
        }
        @if from == to { p.muted { "Both sides are the same revision." } }
        table.diff #policy-diff {
            tbody {
                @for op in &ops {
                    @match op {
                        DiffOp::Same(l) => tr.same { td.small.muted { " " } td { code { (l) } } },
                        DiffOp::Add(l) => tr.add data-test="diff-add" { td.small { "+" } td { code { (l) } } },
                        DiffOp::Del(l) => tr.del data-test="diff-del" { td.small { "−" } td { code { (l) } } },
                    }
                }
            }
        }
    };
    Ok(ui::page(
        &session,
        &headers,
        Nav::Policies,
        &format!("Policy diff of {}", agent.name),
        content,
    ))
}

/// One line of a diff.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffOp<'a> {
    Same(&'a str),
    Add(&'a str),
    Del(&'a str),
}

/// Largest LCS table (cells) computed; beyond it the changed middle is shown as removed
/// then added.
const MAX_DIFF_CELLS: usize = 4_000_000;

/// A line diff (longest common subsequence) of `old` → `new`, common prefix and suffix
/// trimmed first.
pub fn line_diff<'a>(old: &'a str, new: &'a str) -> Vec<DiffOp<'a>> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let mut pre = 0;
    while pre < a.len() && pre < b.len() && a[pre] == b[pre] {
        pre += 1;
    }
    let mut suf = 0;
    while suf < a.len() - pre && suf < b.len() - pre && a[a.len() - 1 - suf] == b[b.len() - 1 - suf]
    {
        suf += 1;
    }
    let am = &a[pre..a.len() - suf];
    let bm = &b[pre..b.len() - suf];
    let mut out: Vec<DiffOp<'a>> = a[..pre].iter().map(|l| DiffOp::Same(l)).collect();
    let (n, m) = (am.len(), bm.len());
    if n.saturating_mul(m) > MAX_DIFF_CELLS {
        out.extend(am.iter().map(|l| DiffOp::Del(l)));
        out.extend(bm.iter().map(|l| DiffOp::Add(l)));
    } else {
        let w = m + 1;
        let mut dp = vec![0u32; (n + 1) * w];
        for i in (0..n).rev() {
            for j in (0..m).rev() {
                dp[i * w + j] = if am[i] == bm[j] {
                    dp[(i + 1) * w + j + 1] + 1
                } else {
                    dp[(i + 1) * w + j].max(dp[i * w + j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < n && j < m {
            if am[i] == bm[j] {
                out.push(DiffOp::Same(am[i]));
                i += 1;
                j += 1;
            } else if dp[(i + 1) * w + j] >= dp[i * w + j + 1] {
                out.push(DiffOp::Del(am[i]));
                i += 1;
            } else {
                out.push(DiffOp::Add(bm[j]));
                j += 1;
            }
        }
        out.extend(am[i..].iter().map(|l| DiffOp::Del(l)));
        out.extend(bm[j..].iter().map(|l| DiffOp::Add(l)));
    }
    out.extend(a[a.len() - suf..].iter().map(|l| DiffOp::Same(l)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use DiffOp::{Add, Del, Same};

    #[test]
    fn line_diff_marks_added_and_removed_lines() {
        let old = "a\nb\nc\nd\n";
        let new = "a\nc\nx\nd\ny";
        assert_eq!(
            line_diff(old, new),
            [
                Same("a"),
                Del("b"),
                Same("c"),
                Add("x"),
                Same("d"),
                Add("y")
            ]
        );
        assert_eq!(line_diff("same\n", "same\n"), [Same("same")]);
        assert_eq!(line_diff("", "a"), [Add("a")]);
        assert_eq!(line_diff("a\nb", ""), [Del("a"), Del("b")]);
        // A replaced line in the middle.
        assert_eq!(
            line_diff("{\n  \"x\": 1\n}", "{\n  \"x\": 2\n}"),
            [Same("{"), Del("  \"x\": 1"), Add("  \"x\": 2"), Same("}")]
        );
    }

    #[test]
    fn large_diffs_fall_back_to_replace() {
        let old: String = (0..3000).map(|i| format!("o{i}\n")).collect();
        let new: String = (0..3000).map(|i| format!("n{i}\n")).collect();
        let d = line_diff(&old, &new);
        assert_eq!(d.len(), 6000);
        assert!(matches!(d[0], Del("o0")));
        assert!(matches!(d[3000], Add("n0")));
    }

    #[test]
    fn drafts_report_field_paths() {
        let errs = parse_draft(r#"{"currency":"USD","budgets":[{"period":"daily","limit":0}]}"#)
            .unwrap_err();
        assert_eq!(errs[0].field, "budgets[0].limit");
        assert_eq!(parse_draft("{nope").unwrap_err()[0].field, "(json)");
        assert_eq!(
            parse_draft(r#"{"currency":"USD","surprise":1}"#).unwrap_err()[0].field,
            "(schema)"
        );
        assert_eq!(parse_draft("  ").unwrap_err()[0].field, "(document)");
        assert!(parse_draft(r#"{"currency":"USD"}"#).is_ok());
        assert_eq!(parse_days(None).unwrap(), 30);
        assert_eq!(parse_days(Some("365")).unwrap(), 365);
        assert!(parse_days(Some("366")).is_err());
        assert!(parse_days(Some("x")).is_err());
    }
}
