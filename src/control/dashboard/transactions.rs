//! The Transactions pages: the ledger's intents with filters and cursor pagination (older
//! and newer), one intent's whole chain (request, decisions, approval, card,
//! authorizations, captures and refunds, discrepancies, budget effect), the CSV export of a
//! filtered list and the per-settlement CSV (one line per capture or refund, by settlement
//! date — the overview's basis). Both exports stream every row in batches; `bom=1` starts
//! them with a UTF-8 byte order mark so Excel reads non-ASCII text. Invalid filters show
//! the form again with an inline error (`400`).

use std::collections::HashMap;
use std::fmt::Write as _;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use maud::{Markup, html};

use super::auth::{Session, unix_now};
use super::ui::{self, Nav};
use super::{DashState, PageError};
use crate::control::db::{
    ControlDb, DiscrepancyFilter, SettlementExportRow, SettlementFilter, TxFilter, TxRow,
};
use crate::control::model::{Cursor, Project};
use crate::domain::money::Currency;

pub fn routes() -> Router<DashState> {
    Router::new()
        .route("/transactions", get(list))
        .route("/transactions.csv", get(csv))
        .route("/settlements.csv", get(settlements_csv))
        .route("/transactions/{id}", get(detail))
}

/// Rows per page of the list.
const PAGE_SIZE: i64 = 50;
/// Rows fetched per batch of a CSV export.
const CSV_BATCH: i64 = 1000;
/// The UTF-8 byte order mark (`bom=1`).
const BOM: &str = "\u{feff}";

/// The columns of `/transactions.csv`.
pub const TX_CSV_HEADER: &str = "created_at,intent_id,project_id,agent_id,agent_name,merchant,merchant_domain,status,amount,amount_minor,currency,captured,captured_minor,refunded,refunded_minor,decided_at,admin_decision,approver,approver_note,admin_decided_at,card_last4,stripe_card_id,reasons";
/// The columns of `/settlements.csv`.
pub const SETTLEMENT_CSV_HEADER: &str = "settled_at,settlement_date,kind,stripe_transaction_id,amount,net_amount,net_amount_minor,currency,intent_id,agent_id,agent_name,project_id,merchant,stripe_card_id";

const STATUSES: &[&str] = &[
    "pending_approval",
    "approved",
    "issuing",
    "declined",
    "canceled",
    "expired",
    "failed",
    "settled",
];

/// The filter form as sent (kept to fill the form again and to build links).
#[derive(serde::Deserialize, Default, Clone, Debug)]
pub struct TxQuery {
    #[serde(default)]
    agent: Option<String>,
    #[serde(default)]
    project: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    merchant: Option<String>,
    #[serde(default)]
    intent: Option<String>,
    #[serde(default)]
    last4: Option<String>,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    min: Option<String>,
    #[serde(default)]
    max: Option<String>,
    /// Older than this row (next page).
    #[serde(default)]
    cursor: Option<String>,
    /// Newer than this row (previous page).
    #[serde(default)]
    newer: Option<String>,
    /// CSV only: start with a UTF-8 byte order mark.
    #[serde(default)]
    bom: Option<String>,
}

/// The settlements export's filters as sent.
#[derive(serde::Deserialize, Default, Clone, Debug)]
pub struct SettlementQuery {
    #[serde(default)]
    settled_from: Option<String>,
    #[serde(default)]
    settled_to: Option<String>,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    agent: Option<String>,
    #[serde(default)]
    project: Option<String>,
    #[serde(default)]
    bom: Option<String>,
}

/// A bad filter: the field, a stable code and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterError {
    pub field: &'static str,
    pub code: &'static str,
    pub message: String,
}

fn bad(field: &'static str, code: &'static str, message: impl Into<String>) -> FilterError {
    FilterError {
        field,
        code,
        message: message.into(),
    }
}

fn field(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Days since 1970-01-01 of `YYYY-MM-DD` (a real calendar date), else `None`.
pub fn parse_date(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let num = |s: &str| -> Option<u32> {
        if s.bytes().all(|c| c.is_ascii_digit()) {
            s.parse().ok()
        } else {
            None
        }
    };
    let y = i64::from(num(text.get(0..4)?)?);
    let m = num(text.get(5..7)?)?;
    let d = num(text.get(8..10)?)?;
    if !(1..=12).contains(&m) || d == 0 {
        return None;
    }
    let days = crate::domain::time::days_from_civil(y, m, d);
    // Rejects 2026-02-30 and the like: the date must round-trip.
    (crate::domain::time::civil_from_days(days) == (y, m, d)).then_some(days)
}

/// Minor units of a decimal amount in major units ("12.4" → 1240 with 2 decimals).
pub fn parse_major(text: &str, exponent: u8) -> Option<i64> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() && frac.is_empty() {
        return None;
    }
    if !whole.bytes().all(|c| c.is_ascii_digit())
        || !frac.bytes().all(|c| c.is_ascii_digit())
        || frac.len() > usize::from(exponent)
        || whole.len() > 15
    {
        return None;
    }
    let scale = 10i64.checked_pow(u32::from(exponent))?;
    let w: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut f: i64 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    for _ in frac.len()..usize::from(exponent) {
        f = f.checked_mul(10)?;
    }
    w.checked_mul(scale)?.checked_add(f)
}

/// "12.40" from 1240 minor units with 2 decimals (integer math; "-0.05" for -5).
pub fn decimal(minor: i64, exponent: u8) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    if exponent == 0 {
        return format!("{sign}{abs}");
    }
    let scale = 10u64.pow(u32::from(exponent));
    format!(
        "{sign}{}.{:0width$}",
        abs / scale,
        abs % scale,
        width = usize::from(exponent)
    )
}

fn exponent_of(currency: &str) -> u8 {
    Currency::parse(currency).map(|c| c.exponent()).unwrap_or(2)
}

/// A CSV cell of text: a leading `=`, `+`, `-`, `@`, tab or CR is neutralized with `'`
/// (spreadsheet formula injection), then the cell is quoted when it holds a comma, quote
/// or line break (quotes doubled).
pub fn csv_text(s: &str) -> String {
    let guarded = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    csv_quote(&guarded)
}

fn csv_quote(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn wants_bom(v: &Option<String>) -> bool {
    matches!(field(v).as_deref(), Some("1" | "true" | "on" | "yes"))
}

fn parse_day(v: &Option<String>, name: &'static str) -> Result<Option<i64>, FilterError> {
    match field(v) {
        Some(t) => parse_date(&t).map(Some).ok_or_else(|| {
            bad(
                name,
                "invalid_date",
                format!("{name} must be a date written YYYY-MM-DD"),
            )
        }),
        None => Ok(None),
    }
}

fn parse_currency(v: &Option<String>) -> Result<Option<Currency>, FilterError> {
    match field(v) {
        Some(c) => Currency::parse(&c).map(Some).map_err(|_| {
            bad(
                "currency",
                "invalid_currency",
                "currency must be an ISO 4217 code such as USD",
            )
        }),
        None => Ok(None),
    }
}

fn short_text(
    v: &Option<String>,
    name: &'static str,
    max: usize,
) -> Result<Option<String>, FilterError> {
    let t = field(v);
    if t.as_ref()
        .is_some_and(|t| t.chars().count() > max || t.chars().any(char::is_control))
    {
        return Err(bad(
            name,
            "invalid_filter",
            format!("{name} must be at most {max} printable characters"),
        ));
    }
    Ok(t)
}

/// The filter of a query, or the field at fault.
fn filter_of(q: &TxQuery) -> Result<TxFilter, FilterError> {
    let currency = parse_currency(&q.currency)?;
    // Amounts mean minor units of one currency: a bound needs the currency (USD 1 is 100
    // minor units, JPY 1 is 1).
    if currency.is_none() && (field(&q.min).is_some() || field(&q.max).is_some()) {
        return Err(bad(
            "currency",
            "currency_required",
            "choose a currency to filter by amount",
        ));
    }
    let exponent = currency.map(|c| c.exponent()).unwrap_or(2);
    let amount = |v: &Option<String>, name: &'static str| -> Result<Option<i64>, FilterError> {
        match field(v) {
            Some(t) => parse_major(&t, exponent).map(Some).ok_or_else(|| {
                bad(
                    name,
                    "invalid_amount",
                    format!("{name} must be an amount in major units, e.g. 12.40 (at most {exponent} decimals)"),
                )
            }),
            None => Ok(None),
        }
    };
    let status = field(&q.status);
    if let Some(s) = &status
        && !STATUSES.contains(&s.as_str())
    {
        return Err(bad(
            "status",
            "invalid_status",
            "status is not a known intent status",
        ));
    }
    let merchant = short_text(&q.merchant, "merchant", 200)?;
    let last4 = field(&q.last4);
    if let Some(l) = &last4
        && (l.len() != 4 || !l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad(
            "last4",
            "invalid_last4",
            "card must be the last four digits of a card, e.g. 4242",
        ));
    }
    Ok(TxFilter {
        agent_id: short_text(&q.agent, "agent", 128)?,
        status,
        merchant,
        currency: currency.map(|c| c.code().to_string()),
        created_from: parse_day(&q.from, "from")?.map(|d| d * 86_400),
        created_to: parse_day(&q.to, "to")?.map(|d| (d + 1) * 86_400),
        min_amount: amount(&q.min, "min")?,
        max_amount: amount(&q.max, "max")?,
        project_id: short_text(&q.project, "project", 128)?,
        intent_id: short_text(&q.intent, "intent", 128)?,
        card_last4: last4,
    })
}

fn cursor_param(v: &Option<String>, name: &'static str) -> Result<Option<Cursor>, FilterError> {
    match field(v) {
        Some(c) => Cursor::decode(&c).map(Some).ok_or_else(|| {
            bad(
                name,
                "invalid_cursor",
                "the page link is not valid; start from the first page",
            )
        }),
        None => Ok(None),
    }
}

/// The settlements export's filter: settlement dates, both ends included.
fn settlement_filter_of(q: &SettlementQuery) -> Result<SettlementFilter, FilterError> {
    let from = parse_day(&q.settled_from, "settled_from")?;
    let to = parse_day(&q.settled_to, "settled_to")?;
    if let (Some(f), Some(t)) = (from, to)
        && t < f
    {
        return Err(bad(
            "settled_to",
            "invalid_date_range",
            "settled_to must not be before settled_from",
        ));
    }
    Ok(SettlementFilter {
        from: from.map(|d| d * 86_400),
        to: to.map(|d| (d + 1) * 86_400),
        currency: parse_currency(&q.currency)?.map(|c| c.code().to_string()),
        agent_id: short_text(&q.agent, "agent", 128)?,
        project_id: short_text(&q.project, "project", 128)?,
    })
}

/// The query string of the filters (without cursors).
fn filter_query(q: &TxQuery) -> String {
    let pairs = [
        ("agent", &q.agent),
        ("project", &q.project),
        ("status", &q.status),
        ("merchant", &q.merchant),
        ("intent", &q.intent),
        ("last4", &q.last4),
        ("currency", &q.currency),
        ("from", &q.from),
        ("to", &q.to),
        ("min", &q.min),
        ("max", &q.max),
    ];
    pairs
        .iter()
        .filter_map(|(k, v)| field(v).map(|v| format!("{k}={}", ui::url_encode(&v))))
        .collect::<Vec<_>>()
        .join("&")
}

fn with_query(path: &str, query: &str, extra: &str) -> String {
    let parts: Vec<&str> = [query, extra]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect();
    if parts.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", parts.join("&"))
    }
}

/// The rows of one list page and the links to its neighbours.
struct ListPage {
    items: Vec<TxRow>,
    older: Option<String>,
    newer: Option<String>,
}

async fn load_page(db: &ControlDb, filter: &TxFilter, q: &TxQuery) -> Result<ListPage, ListError> {
    let cursor = cursor_param(&q.cursor, "cursor").map_err(ListError::Filter)?;
    let newer = cursor_param(&q.newer, "newer").map_err(ListError::Filter)?;
    let key = |t: &TxRow| {
        Cursor {
            created_at: t.intent.created_at,
            id: t.intent.id.clone(),
        }
        .encode()
    };
    match (cursor, newer) {
        (Some(_), Some(_)) => Err(ListError::Filter(bad(
            "cursor",
            "invalid_cursor",
            "the page link is not valid; start from the first page",
        ))),
        (_, Some(n)) => {
            let (items, more) = db
                .dash_transactions_newer(filter, PAGE_SIZE, &n)
                .await
                .map_err(|e| ListError::Page(e.into()))?;
            Ok(ListPage {
                older: items.last().map(key),
                newer: if more { items.first().map(key) } else { None },
                items,
            })
        }
        (cursor, None) => {
            let first = cursor.is_none();
            let page = db
                .dash_transactions(filter, PAGE_SIZE, cursor)
                .await
                .map_err(|e| ListError::Page(e.into()))?;
            Ok(ListPage {
                newer: if first {
                    None
                } else {
                    page.items.first().map(key)
                },
                older: page.next_cursor,
                items: page.items,
            })
        }
    }
}

enum ListError {
    Filter(FilterError),
    Page(PageError),
}

/// What the page shows besides the list: the filter forms' values and errors.
#[derive(Default)]
struct Forms<'a> {
    tx_error: Option<&'a FilterError>,
    settlement: Option<&'a SettlementQuery>,
    settlement_error: Option<&'a FilterError>,
}

fn error_for(e: Option<&FilterError>, name: &str) -> Markup {
    html! {
        @if let Some(e) = e.filter(|e| e.field == name) {
            p.field-error data-field=(e.field) data-code=(e.code) { (e.message) }
        }
    }
}

/// `GET /transactions`.
async fn list(
    State(state): State<DashState>,
    session: Session,
    headers: HeaderMap,
    Query(q): Query<TxQuery>,
) -> Result<Response, PageError> {
    let result = match filter_of(&q) {
        Err(e) => Err(ListError::Filter(e)),
        Ok(filter) => load_page(&state.db, &filter, &q).await,
    };
    match result {
        Ok(page) => {
            render(
                &state,
                &session,
                &headers,
                &q,
                Some(&page),
                &Forms::default(),
            )
            .await
        }
        Err(ListError::Page(e)) => Err(e),
        Err(ListError::Filter(e)) => {
            render(
                &state,
                &session,
                &headers,
                &q,
                None,
                &Forms {
                    tx_error: Some(&e),
                    ..Forms::default()
                },
            )
            .await
        }
    }
}

async fn render(
    state: &DashState,
    session: &Session,
    headers: &HeaderMap,
    q: &TxQuery,
    page: Option<&ListPage>,
    forms: &Forms<'_>,
) -> Result<Response, PageError> {
    let agents = state.db.dash_agent_names().await?;
    let projects: Vec<Project> = state.db.list_projects(None).await?;
    let names: HashMap<&str, &str> = agents
        .iter()
        .map(|(i, n)| (i.as_str(), n.as_str()))
        .collect();
    let fq = filter_query(q);
    let val = |v: &Option<String>| v.clone().unwrap_or_default();
    let err = forms.tx_error;
    let sq = forms.settlement.cloned().unwrap_or_default();
    let content = html! {
        form.filters #tx-filters method="get" action="/transactions" hx-boost="false" {
            label { "Agent" select name="agent" data-test="filter-agent" {
                option value="" { "all" }
                @for (id, name) in &agents { option value=(id) selected[q.agent.as_deref() == Some(id.as_str())] { (name) } }
            } }
            label { "Project" select name="project" data-test="filter-project" {
                option value="" { "all" }
                @for p in &projects { option value=(p.id) selected[q.project.as_deref() == Some(p.id.as_str())] { (p.name) } }
            } }
            label { "Status" select name="status" data-test="filter-status" {
                option value="" { "all" }
                @for s in STATUSES { option value=(s) selected[q.status.as_deref() == Some(*s)] { (s) } }
            } }
            label { "Merchant" input type="search" name="merchant" value=(val(&q.merchant)) data-test="filter-merchant"; }
            label { "Intent id" input type="search" name="intent" value=(val(&q.intent)) placeholder="pur_…" data-test="filter-intent"; }
            label { "Card last4" input type="text" name="last4" value=(val(&q.last4)) size="4" maxlength="4" inputmode="numeric" data-test="filter-last4"; }
            label { "Currency" input type="text" name="currency" value=(val(&q.currency)) size="4" placeholder="USD"; }
            label { "From" input type="date" name="from" value=(val(&q.from)) data-test="filter-from"; }
            label { "To" input type="date" name="to" value=(val(&q.to)) data-test="filter-to"; }
            label { "Min" input type="text" name="min" value=(val(&q.min)) size="8" inputmode="decimal" placeholder="0.00"; }
            label { "Max" input type="text" name="max" value=(val(&q.max)) size="8" inputmode="decimal"; }
            button type="submit" data-test="filter-submit" { "Filter" }
            a href="/transactions" { "clear" }
            @if err.is_none() {
                a #csv-export href=(with_query("/transactions.csv", &fq, "")) data-test="csv-export" hx-boost="false" download { "Export CSV" }
                a #csv-export-excel href=(with_query("/transactions.csv", &fq, "bom=1")) data-test="csv-export-excel" hx-boost="false" download { "CSV for Excel" }
            }
        }
        @if let Some(e) = err {
            div.error #filter-error role="alert" data-field=(e.field) data-code=(e.code) {
                p { "The filter was not applied: " (e.message) }
            }
            @for f in ["agent", "project", "status", "merchant", "intent", "last4", "currency", "from", "to", "min", "max", "cursor", "newer"] {
                (error_for(err, f))
            }
        }
        p.muted.small { "Amounts in major units (of the chosen currency, else with 2 decimals); dates in UTC, both ends included; purchases by the time they were requested. The CSV export holds every matching purchase (\"CSV for Excel\" adds a byte order mark so Excel reads accented merchant names)." }
        form.filters #settlement-export method="get" action="/settlements.csv" hx-boost="false" data-test="settlement-export" {
            strong { "Settlements CSV" }
            label { "Settled from" input type="date" name="settled_from" value=(val(&sq.settled_from)) data-test="settled-from"; }
            label { "Settled to" input type="date" name="settled_to" value=(val(&sq.settled_to)) data-test="settled-to"; }
            label { "Currency" input type="text" name="currency" value=(val(&sq.currency)) size="4" placeholder="all"; }
            label.inline { input type="checkbox" name="bom" value="1" checked[wants_bom(&sq.bom)]; " for Excel" }
            button.secondary type="submit" data-test="settlement-export-submit" { "Export settlements" }
        }
        @if let Some(e) = forms.settlement_error {
            p.error #settlement-filter-error role="alert" data-field=(e.field) data-code=(e.code) { "The settlements export was not made: " (e.message) }
        }
        p.muted.small { "One line per capture or refund, by settlement date (UTC), with its Stripe transaction id; net amounts are negative for refunds, so a month's lines add up to the overview's spend of that month per currency." }
        @if let Some(page) = page {
            @if page.items.is_empty() {
                p.muted #no-transactions { "No transactions match." }
            } @else {
                table #transactions-table {
                    thead { tr { th { "Time" } th { "Agent" } th { "Merchant" } th.num { "Amount" } th { "Status" } th { "Card" } th.num { "Captured" } th.num { "Refunded" } } }
                    tbody {
                        @for t in &page.items { (row(t, &names)) }
                    }
                }
            }
            p.actions {
                @if let Some(newer) = &page.newer {
                    a #newer-page rel="prev" data-test="newer-page" href=(with_query("/transactions", &fq, &format!("newer={}", ui::url_encode(newer)))) { "← Newer" }
                }
                @if let Some(next) = &page.older {
                    a #next-page rel="next" data-test="next-page" href=(with_query("/transactions", &fq, &format!("cursor={}", ui::url_encode(next)))) { "Older →" }
                }
            }
        }
    };
    let status = if forms.tx_error.is_some() || forms.settlement_error.is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    Ok(ui::page_with_status(
        session,
        headers,
        Nav::Transactions,
        "Transactions",
        content,
        status,
    ))
}

fn row(t: &TxRow, names: &HashMap<&str, &str>) -> Markup {
    let i = &t.intent;
    html! {
        tr data-test="tx-row" data-intent-id=(i.id) {
            td.small { a href={"/transactions/" (super::policies::seg(&i.id))} { (ui::time(i.created_at)) } }
            td { (names.get(i.agent_id.as_str()).copied().unwrap_or(&i.agent_id)) }
            td { (i.merchant_name) @if let Some(d) = &i.merchant_domain { br; span.small.muted { (d) } } }
            td.num { (ui::money(i.amount, &i.currency)) }
            td { (ui::badge(&i.status)) }
            td { @if let Some(l) = &t.card_last4 { "•••• " (l) } }
            td.num { @if i.captured != 0 { (ui::money(i.captured, &i.currency)) } }
            td.num { @if i.refunded != 0 { (ui::money(i.refunded, &i.currency)) } }
        }
    }
}

fn csv_response(filename: &str, body: Body) -> Response {
    let disposition = format!(
        "attachment; filename=\"{filename}-{}.csv\"",
        ui::date(unix_now())
    );
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/csv; charset=utf-8"),
            ),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&disposition)
                    .unwrap_or_else(|_| HeaderValue::from_static("attachment")),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response()
}

/// Streams `header` then every batch `fetch` returns, in order, until it returns no
/// cursor. A database error mid-way ends the response abnormally (the client sees a
/// failed download, never a silently short file).
fn csv_stream<F, Fut>(head: String, fetch: F) -> Body
where
    F: Fn(Option<Cursor>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(String, Option<Cursor>), crate::control::db::DbError>>
        + Send
        + 'static,
{
    use futures_util::StreamExt as _;
    let first = futures_util::stream::once(async move { Ok::<_, std::io::Error>(head) });
    let rest = futures_util::stream::unfold(Some(None), move |state: Option<Option<Cursor>>| {
        let next = state.map(&fetch);
        async move {
            match next?.await {
                Ok((chunk, cursor)) => Some((Ok(chunk), cursor.map(Some))),
                Err(e) => {
                    tracing::error!(error = %e, "dashboard: csv export failed mid-way");
                    Some((
                        Err(std::io::Error::other("the export failed; try again")),
                        None,
                    ))
                }
            }
        }
    });
    Body::from_stream(first.chain(rest))
}

/// `GET /transactions.csv` with the list's filters: every matching purchase, newest first.
async fn csv(
    State(state): State<DashState>,
    session: Session,
    headers: HeaderMap,
    Query(q): Query<TxQuery>,
) -> Result<Response, PageError> {
    let filter = match filter_of(&q) {
        Ok(f) => f,
        Err(e) => {
            return render(
                &state,
                &session,
                &headers,
                &q,
                None,
                &Forms {
                    tx_error: Some(&e),
                    ..Forms::default()
                },
            )
            .await;
        }
    };
    let names: HashMap<String, String> = state.db.dash_agent_names().await?.into_iter().collect();
    let names = std::sync::Arc::new(names);
    let head = format!(
        "{}{TX_CSV_HEADER}\r\n",
        if wants_bom(&q.bom) { BOM } else { "" }
    );
    let db = state.db.clone();
    let body = csv_stream(head, move |cursor| {
        let (db, filter, names) = (db.clone(), filter.clone(), names.clone());
        async move {
            let page = db.dash_transactions(&filter, CSV_BATCH, cursor).await?;
            let mut out = String::new();
            for t in &page.items {
                write_csv_row(&mut out, t, &names);
            }
            Ok((out, page.next_cursor.as_deref().and_then(Cursor::decode)))
        }
    });
    Ok(csv_response("roony-transactions", body))
}

fn opt_time(t: Option<i64>) -> String {
    t.map(crate::domain::time::rfc3339).unwrap_or_default()
}

fn write_csv_row(out: &mut String, t: &TxRow, names: &HashMap<String, String>) {
    let i = &t.intent;
    let exp = exponent_of(&i.currency);
    let cells = [
        csv_text(&crate::domain::time::rfc3339(i.created_at)),
        csv_text(&i.id),
        csv_text(&i.project_id),
        csv_text(&i.agent_id),
        csv_text(names.get(&i.agent_id).map_or("", String::as_str)),
        csv_text(&i.merchant_name),
        csv_text(i.merchant_domain.as_deref().unwrap_or("")),
        csv_text(&i.status),
        decimal(i.amount, exp),
        i.amount.to_string(),
        csv_text(&i.currency),
        decimal(i.captured, exp),
        i.captured.to_string(),
        decimal(i.refunded, exp),
        i.refunded.to_string(),
        opt_time(t.decided_at),
        csv_text(t.admin_decision.as_deref().unwrap_or("")),
        csv_text(t.admin_actor.as_deref().unwrap_or("")),
        csv_text(t.admin_note.as_deref().unwrap_or("")),
        opt_time(t.admin_decided_at),
        csv_text(t.card_last4.as_deref().unwrap_or("")),
        csv_text(t.card_stripe_id.as_deref().unwrap_or("")),
        csv_text(&i.reasons.join(" ")),
    ];
    let _ = write!(out, "{}\r\n", cells.join(","));
}

/// `GET /settlements.csv`: one line per capture or refund with a settlement date in the
/// range, oldest first.
async fn settlements_csv(
    State(state): State<DashState>,
    session: Session,
    headers: HeaderMap,
    Query(q): Query<SettlementQuery>,
) -> Result<Response, PageError> {
    let filter = match settlement_filter_of(&q) {
        Ok(f) => f,
        Err(e) => {
            return render(
                &state,
                &session,
                &headers,
                &TxQuery::default(),
                None,
                &Forms {
                    settlement: Some(&q),
                    settlement_error: Some(&e),
                    ..Forms::default()
                },
            )
            .await;
        }
    };
    let head = format!(
        "{}{SETTLEMENT_CSV_HEADER}\r\n",
        if wants_bom(&q.bom) { BOM } else { "" }
    );
    let db = state.db.clone();
    let body = csv_stream(head, move |cursor| {
        let (db, filter) = (db.clone(), filter.clone());
        async move {
            let page = db.dash_settlements(&filter, CSV_BATCH, cursor).await?;
            let mut out = String::new();
            for s in &page.items {
                write_settlement_row(&mut out, s);
            }
            Ok((out, page.next_cursor.as_deref().and_then(Cursor::decode)))
        }
    });
    Ok(csv_response("roony-settlements", body))
}

fn write_settlement_row(out: &mut String, s: &SettlementExportRow) {
    let exp = exponent_of(&s.currency);
    let net = if s.kind == "refund" {
        s.amount.saturating_neg()
    } else {
        s.amount
    };
    let cells = [
        csv_text(&crate::domain::time::rfc3339(s.created_at)),
        ui::date(s.created_at),
        csv_text(&s.kind),
        csv_text(s.stripe_transaction_id.as_deref().unwrap_or("")),
        decimal(s.amount, exp),
        decimal(net, exp),
        net.to_string(),
        csv_text(&s.currency),
        csv_text(s.intent_id.as_deref().unwrap_or("")),
        csv_text(s.agent_id.as_deref().unwrap_or("")),
        csv_text(s.agent_name.as_deref().unwrap_or("")),
        csv_text(s.project_id.as_deref().unwrap_or("")),
        csv_text(s.merchant.as_deref().unwrap_or("")),
        csv_text(s.stripe_card_id.as_deref().unwrap_or("")),
    ];
    let _ = write!(out, "{}\r\n", cells.join(","));
}

/// `GET /transactions/{id}`: the whole chain of one purchase.
async fn detail(
    State(state): State<DashState>,
    session: Session,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let intent = state.db.get_intent(&id).await?;
    let agent_name = match state.db.get_agent(&intent.agent_id).await {
        Ok(a) => a.name,
        Err(_) => intent.agent_id.clone(),
    };
    let decisions = state.db.dash_intent_decisions(&id).await?;
    let cards = state.db.dash_intent_cards(&id).await?;
    let auths = state
        .db
        .list_authorizations(Some(id.clone()), None, 100, None)
        .await?
        .items;
    let settlements = state.db.dash_intent_settlements(&id).await?;
    let discrepancies = state
        .db
        .list_discrepancies(
            &DiscrepancyFilter {
                intent_id: Some(id.clone()),
                ..DiscrepancyFilter::default()
            },
            100,
            None,
        )
        .await?
        .items;
    let cur = intent.currency.as_str();
    let counted = crate::control::db::counted(&intent);
    let open = matches!(
        intent.status.as_str(),
        "pending_approval" | "approved" | "issuing"
    );
    let messages = state.db.dash_reason_messages(&id).await?;
    let admin_decisions: Vec<_> = decisions
        .iter()
        .filter(|d| d.decided_by == "admin")
        .collect();
    let content = html! {
        p { a href="/transactions" { "← all transactions" } }
        div.chain #chain {
            div #chain-intent data-test="chain-intent" {
                h2 { "Request" }
                p {
                    strong { (ui::money(intent.amount, cur)) } " at " strong #merchant { (intent.merchant_name) }
                    @if let Some(d) = &intent.merchant_domain { " (" (d) ")" }
                    " · " span #intent-status data-status=(intent.status) { (ui::badge(&intent.status)) }
                }
                table.small {
                    tr { th { "Intent" } td { code { (intent.id) } } }
                    tr { th { "Agent" } td { a href={"/agents/" (super::policies::seg(&intent.agent_id))} { (agent_name) } " " span.muted { (intent.agent_id) } } }
                    tr { th { "Created" } td { (ui::time(intent.created_at)) } }
                    @if let Some(c) = &intent.merchant_country { tr { th { "Country" } td { (c) } } }
                    @if let Some(c) = &intent.merchant_category { tr { th { "Category" } td { (c) } } }
                    @if let Some(d) = &intent.description { tr { th { "Description" } td { (d) } } }
                    tr { th { "Reasons" } td #intent-reasons {
                        (intent.reasons.join(", "))
                        @if messages.len() == intent.reasons.len() && !messages.is_empty() {
                            ul.budget-impact #intent-reason-messages { @for m in &messages { li { (m) } } }
                        }
                    } }
                    tr { th { "Risk" } td #intent-risk {
                        @match intent.risk_score { Some(s) => { strong { (s) } " / 100" @if !intent.risk_signals.is_empty() { ": " (intent.risk_signals.join(", ")) } }, None => span.muted { "not scored" } }
                    } }
                    @if let Some(e) = intent.expires_at { tr { th { "Expires" } td { (ui::time(e)) } } }
                    @if let Some(s) = &intent.sidecar_status { tr { th { "Sidecar status" } td { (s) @if let Some(r) = &intent.status_reason { " (" (r) ")" } } } }
                }
            }
            div #chain-decisions data-test="chain-decisions" {
                h2 { "Decisions" }
                @if decisions.is_empty() { p.muted { "none recorded" } }
                @for d in &decisions {
                    p data-test="decision" data-decided-by=(d.decided_by) data-outcome=(d.outcome) {
                        (ui::time(d.created_at)) " · " (ui::badge(&d.outcome)) " by " (d.decided_by)
                        @if let Some(a) = &d.actor { " (" (a) ")" }
                        @if let Some(r) = d.policy_revision { " · policy revision " (r) }
                        " · " span.small { (d.reasons.join(", ")) }
                    }
                }
            }
            div #chain-approval data-test="chain-approval" {
                h2 { "Approval" }
                @if admin_decisions.is_empty() {
                    p.muted { @if intent.status == "pending_approval" { "waiting for an administrator — " a href="/approvals" { "open the queue" } } @else { "no administrator's decision" } }
                }
                @for d in &admin_decisions {
                    p { (ui::badge(&d.outcome)) " by " strong #approval-actor { (d.actor.as_deref().unwrap_or("")) } " at " (ui::time(d.created_at)) }
                    @if let Some(n) = &d.note { blockquote #approval-note data-test="approval-note" { (n) } }
                }
            }
            div #chain-card data-test="chain-card" {
                h2 { "Card" }
                @if cards.is_empty() { p.muted { "no card issued" } }
                @for c in &cards {
                    p data-test="card" data-card-id=(c.stripe_card_id) {
                        code { (c.stripe_card_id) } " · •••• " span.last4 { (c.last4) } " · exp " (format!("{:02}/{}", c.exp_month, c.exp_year))
                        " · limit " (ui::money(c.spending_limit, &c.currency)) " · " (ui::badge(&c.status))
                        " · issued " (ui::time(c.created_at))
                    }
                }
            }
            div #chain-authorizations data-test="chain-authorizations" {
                h2 { "Authorizations" }
                @if auths.is_empty() { p.muted { "none" } } @else {
                    table {
                        thead { tr { th { "Time" } th { "Authorization" } th.num { "Amount" } th { "Decision" } th { "Status" } th { "Merchant" } th { "Reasons" } } }
                        tbody { @for a in &auths {
                            tr data-test="authorization" {
                                td.small { (ui::time(a.created_at)) }
                                td.small { code { (a.id) } }
                                td.num { (ui::money(a.amount, &a.currency)) }
                                td { (ui::badge(if a.approved { "approved" } else { "declined" })) " by " (a.decided_by) }
                                td { (ui::badge(&a.status)) }
                                td { (a.merchant_name) }
                                td.small { (a.reasons.join(", ")) }
                            }
                        } }
                    }
                }
            }
            div #chain-settlements data-test="chain-settlements" {
                h2 { "Captures and refunds" }
                @if settlements.is_empty() { p.muted { "none" } } @else {
                    table {
                        thead { tr { th { "Time" } th { "Kind" } th.num { "Amount" } th { "Transaction" } th { "Merchant" } } }
                        tbody { @for s in &settlements {
                            tr data-test="settlement" data-kind=(s.kind) {
                                td.small { (ui::time(s.created_at)) }
                                td { (s.kind) }
                                td.num { (ui::money(s.amount, &s.currency)) }
                                td.small { code { (s.stripe_transaction_id.as_deref().unwrap_or(&s.id)) } }
                                td { (s.merchant_name.as_deref().unwrap_or("")) }
                            }
                        } }
                    }
                }
            }
            div #chain-discrepancies data-test="chain-discrepancies" {
                h2 { "Discrepancies" }
                @if discrepancies.is_empty() { p.muted { "none" } }
                @for d in &discrepancies {
                    p data-test="discrepancy" {
                        (ui::badge(&d.kind)) " " (ui::time(d.created_at))
                        @if let (Some(a), Some(c)) = (d.amount, &d.currency) { " · " (ui::money(a, c)) }
                        @match d.resolved_at { Some(t) => { " · resolved " (ui::time(t)) @if let Some(b) = &d.resolved_by { " by " (b) } }, None => { " · " (ui::badge("open")) } }
                    }
                }
            }
            div #chain-budget data-test="chain-budget" {
                h2 { "Budget effect" }
                table.small {
                    tr { th { "Counts against budgets now" } td.num #budget-counted data-value=(counted) { strong { (ui::money(counted, cur)) } } }
                    tr { th { "Held by the sidecar (last reported)" } td.num #budget-reserved { (ui::money(intent.reserved, cur)) } }
                    tr { th { "Authorized, not captured" } td.num { (ui::money(intent.pending, cur)) } }
                    tr { th { "Captured" } td.num #budget-captured { (ui::money(intent.captured, cur)) } }
                    tr { th { "Refunded" } td.num #budget-refunded { (ui::money(intent.refunded, cur)) } }
                    tr { th { "Net spent" } td.num #budget-net { strong { (ui::money(intent.captured.saturating_sub(intent.refunded), cur)) } } }
                }
                p.muted.small #budget-note {
                    @if open {
                        "While the purchase is open it counts the larger of its reservation (amount plus card buffer) and what moved on its card."
                    } @else {
                        "Once the purchase has ended it counts exactly what moved on its card (captures and pending authorizations less refunds); the rest of its reservation was released."
                    }
                    " It counts in the budget periods of the moment it was decided (" (ui::time(intent.created_at)) ")."
                }
            }
        }
    };
    Ok(ui::page(
        &session,
        &headers,
        Nav::Transactions,
        &format!("Purchase {}", intent.id),
        content,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_and_guarded() {
        assert_eq!(csv_text("plain"), "plain");
        assert_eq!(csv_text("Acme, \"Inc\""), "\"Acme, \"\"Inc\"\"\"");
        assert_eq!(csv_text("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_text("=HYPERLINK(1)"), "'=HYPERLINK(1)");
        assert_eq!(csv_text("+1"), "'+1");
        assert_eq!(csv_text("-2"), "'-2");
        assert_eq!(csv_text("@x"), "'@x");
        assert_eq!(csv_text("=a,b"), "\"'=a,b\"");
        assert_eq!(csv_text(""), "");
    }

    #[test]
    fn amounts_in_major_units_with_integers() {
        assert_eq!(decimal(1240, 2), "12.40");
        assert_eq!(decimal(5, 2), "0.05");
        assert_eq!(decimal(-5, 2), "-0.05");
        assert_eq!(decimal(1200, 0), "1200");
        assert_eq!(decimal(1250, 3), "1.250");
        assert_eq!(decimal(i64::MIN, 2), "-92233720368547758.08");
        assert_eq!(parse_major("12.4", 2), Some(1240));
        assert_eq!(parse_major("12", 2), Some(1200));
        assert_eq!(parse_major(".5", 2), Some(50));
        assert_eq!(parse_major("12.345", 2), None);
        assert_eq!(parse_major("-1", 2), None);
        assert_eq!(parse_major("1e3", 2), None);
        assert_eq!(parse_major(".", 2), None);
        assert_eq!(parse_major("1200", 0), Some(1200));
    }

    #[test]
    fn dates() {
        assert_eq!(parse_date("1970-01-02"), Some(1));
        assert_eq!(parse_date("2026-11-22"), Some(20_779));
        assert_eq!(parse_date("2026-02-30"), None);
        assert_eq!(parse_date("2026-1-22"), None);
        assert_eq!(parse_date("yesterday"), None);
        assert_eq!(parse_date("+026-11-22"), None);
    }

    #[test]
    fn filters_validate() {
        let q = TxQuery {
            min: Some("1.50".into()),
            max: Some(" ".into()),
            to: Some("1970-01-01".into()),
            merchant: Some("acme".into()),
            currency: Some("usd".into()),
            ..TxQuery::default()
        };
        let f = filter_of(&q).unwrap();
        assert_eq!(f.min_amount, Some(150));
        assert_eq!(f.max_amount, None);
        assert_eq!(f.created_to, Some(86_400));
        assert_eq!(
            filter_query(&q),
            "merchant=acme&currency=usd&to=1970%2D01%2D01&min=1%2E50"
        );
        // In JPY (no minor units) an amount is whole yen.
        let jpy = TxQuery {
            min: Some("2".into()),
            currency: Some("jpy".into()),
            ..TxQuery::default()
        };
        assert_eq!(filter_of(&jpy).unwrap().min_amount, Some(2));
        // An amount bound without a currency is ambiguous.
        let no_currency = TxQuery {
            min: Some("1.50".into()),
            ..TxQuery::default()
        };
        assert!(filter_of(&no_currency).is_err());
        for bad in [
            TxQuery {
                status: Some("nope".into()),
                ..TxQuery::default()
            },
            TxQuery {
                from: Some("2026-13-01".into()),
                ..TxQuery::default()
            },
            TxQuery {
                min: Some("abc".into()),
                currency: Some("usd".into()),
                ..TxQuery::default()
            },
            TxQuery {
                currency: Some("XYZW".into()),
                ..TxQuery::default()
            },
        ] {
            assert!(filter_of(&bad).is_err(), "{bad:?}");
        }
    }
}
