//! Layout, navigation, flash messages, formatting and server-rendered SVG charts of the
//! dashboard. Charts are inline SVG, so they render without JavaScript.

use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::auth::{self, Session};

/// Cookie carrying a one-shot message to the next page.
pub const FLASH_COOKIE: &str = "roony_flash";

/// The navigation entries (the active one is highlighted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nav {
    Overview,
    Agents,
    Budgets,
    Policies,
    Approvals,
    Transactions,
    Discrepancies,
    Audit,
    Stripe,
    Settings,
}

const NAV: &[(Nav, &str, &str)] = &[
    (Nav::Overview, "/", "Overview"),
    (Nav::Agents, "/agents", "Agents"),
    (Nav::Budgets, "/budgets", "Budgets"),
    (Nav::Policies, "/policies", "Policies"),
    (Nav::Approvals, "/approvals", "Approvals"),
    (Nav::Transactions, "/transactions", "Transactions"),
    (Nav::Discrepancies, "/discrepancies", "Discrepancies"),
    (Nav::Audit, "/audit", "Audit log"),
    (Nav::Stripe, "/stripe", "Stripe"),
    (Nav::Settings, "/settings", "Settings"),
];

/// htmx settings: boosted forms show 4xx pages like a plain submission would; no history
/// snapshots (htmx would otherwise keep pages — including a key shown once — in
/// localStorage; back/forward fetch the page again instead); no injected indicator styles,
/// `eval` or inline scripts (the Content-Security-Policy allows neither).
const HTMX_CONFIG: &str = r#"{"historyCacheSize":0,"refreshOnHistoryMiss":true,"includeIndicatorStyles":false,"allowEval":false,"allowScriptTags":false,"responseHandling":[{"code":"204","swap":false},{"code":"[23]..","swap":true},{"code":"[45]..","swap":true,"error":true}]}"#;

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            meta name="htmx-config" content=(HTMX_CONFIG);
            title { (title) " · Roony" }
            link rel="stylesheet" href="/assets/app.css";
            link rel="icon" href="/favicon.ico" type="image/svg+xml";
            script src="/assets/htmx.min.js" defer {}
            script src="/assets/app.js" defer {}
        }
    }
}

/// A page without navigation (sign-in, setup, errors).
pub fn bare_page(title: &str, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body.bare { (content) }
        }
    }
}

/// A full page for a signed-in user: navigation, the flash message of the previous
/// request (cleared by this response), `content`. `status` is usually 200 (422 for a form
/// shown again with errors).
pub fn page(
    session: &Session,
    headers: &HeaderMap,
    active: Nav,
    title: &str,
    content: Markup,
) -> Response {
    page_with_status(
        session,
        headers,
        active,
        title,
        content,
        axum::http::StatusCode::OK,
    )
}

pub fn page_with_status(
    session: &Session,
    headers: &HeaderMap,
    active: Nav,
    title: &str,
    content: Markup,
    status: axum::http::StatusCode,
) -> Response {
    let flash = auth::cookie(headers, FLASH_COOKIE)
        .map(|v| url_decode(&v))
        .filter(|v| !v.is_empty());
    let body = html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body hx-boost="true" {
                header.top {
                    a.brand href="/" { "Roony" }
                    nav {
                        @for (nav, href, label) in NAV {
                            a href=(href) class=[(*nav == active).then_some("active")] { (label) }
                        }
                    }
                    div.user {
                        span title=(session.user.email) { (session.user.name) }
                        span.role data-role=(session.user.role.as_str()) { (session.user.role.as_str()) }
                        form.inline method="post" action="/logout" hx-boost="false" {
                            (csrf_field(session))
                            button.link type="submit" { "Sign out" }
                        }
                    }
                }
                main {
                    @if let Some(f) = &flash { p.flash role="status" { (f) } }
                    h1 { (title) }
                    (content)
                }
            }
        }
    };
    let mut resp = (status, body).into_response();
    if flash.is_some() {
        resp.headers_mut().append(
            header::SET_COOKIE,
            auth::set_cookie(FLASH_COOKIE, "", Some(0), auth::secure_cookies(headers)),
        );
    }
    resp
}

/// The hidden CSRF input every `POST` form carries.
/// Name of the hidden field of a one-use form (see [`once_field`]).
pub const ONCE_FIELD: &str = "_once";

/// A fresh nonce for a form that must not be submitted twice (creating an agent, rotating
/// a key): a refresh that resubmits it is refused (`ControlDb::use_form_nonce`).
pub fn once_field() -> Markup {
    html! { input type="hidden" name=(ONCE_FIELD) value=(auth::new_login_nonce()); }
}

pub fn csrf_field(session: &Session) -> Markup {
    html! { input type="hidden" name=(auth::CSRF_FIELD) value=(session.csrf); }
}

/// Percent-encodes for a query value or cookie.
pub fn url_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

pub fn url_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// "USD 12.40" for minor units of an ISO currency code (the code as given when unknown).
pub fn money(amount: i64, currency: &str) -> String {
    match crate::domain::money::Currency::parse(currency) {
        Ok(c) => crate::domain::money::Money::new(amount, c).to_string(),
        Err(_) => format!("{} {amount}", currency.to_uppercase()),
    }
}

/// "2026-11-22 13:05:09 UTC" from unix seconds.
pub fn time(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

/// "2026-11-22" from unix seconds.
pub fn date(unix: i64) -> String {
    let (y, m, d) = civil_from_days(unix.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

/// Howard Hinnant's days → civil date.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A status badge (`class` is derived from the status text).
pub fn badge(status: &str) -> Markup {
    html! { span class={"badge badge-" (status.replace(|c: char| !c.is_ascii_alphanumeric(), "_"))} { (status) } }
}

/// One bar of a chart.
pub struct Bar {
    pub label: String,
    pub value: i64,
    /// Shown on hover and next to the bar (e.g. "USD 12.40").
    pub text: String,
}

/// A horizontal bar chart as inline SVG (no JavaScript). Negative values count as zero.
pub fn bar_chart(title: &str, bars: &[Bar]) -> Markup {
    let max = bars
        .iter()
        .map(|b| b.value.max(0))
        .max()
        .unwrap_or(0)
        .max(1);
    let row = 26;
    let height = (bars.len().max(1) * row + 8) as i64;
    html! {
        figure.chart {
            figcaption { (title) }
            @if bars.is_empty() {
                p.muted { "nothing yet" }
            } @else {
                svg xmlns="http://www.w3.org/2000/svg" viewBox={"0 0 600 " (height)} role="img" aria-label=(title) {
                    @for (i, b) in bars.iter().enumerate() {
                        @let y = (i * row + 4) as i64;
                        @let w = (b.value.max(0) as i128 * 330 / max as i128) as i64;
                        text x="0" y=(y + 16) class="chart-label" { (truncate(&b.label, 28)) }
                        rect x="190" y=(y + 3) width=(w.max(1)) height="16" rx="3" class="chart-bar" {
                            title { (b.label) ": " (b.text) }
                        }
                        text x=(195 + w) y=(y + 16) class="chart-value" { (b.text) }
                    }
                }
            }
        }
    }
}

/// One column of a [`column_chart`].
pub struct Column {
    /// Shown under the column (e.g. "11-22"); every few columns only, when many.
    pub label: String,
    pub value: i64,
    /// Shown on hover (e.g. "2026-11-22: USD 12.40").
    pub text: String,
}

/// A vertical column chart as inline SVG (no JavaScript), scaled to its largest value;
/// negative values count as zero. `caption` says what the largest column is worth.
pub fn column_chart(title: &str, columns: &[Column], caption: &str) -> Markup {
    let max = columns
        .iter()
        .map(|c| c.value.max(0))
        .max()
        .unwrap_or(0)
        .max(1);
    let n = columns.len().max(1) as i64;
    // About one user unit per pixel on a full-width page, so labels keep their size.
    let (width, height, base) = (1000i64, 130i64, 112i64);
    let step = width / n;
    let bar = (step - 2).max(1);
    let every = (n / 10).max(1);
    html! {
        figure.chart {
            figcaption { (title) }
            @if columns.iter().all(|c| c.value <= 0) {
                p.muted { "nothing yet" }
            } @else {
                svg xmlns="http://www.w3.org/2000/svg" viewBox={"0 0 " (width) " " (height)} role="img" aria-label=(title) {
                    line x1="0" y1=(base) x2=(width) y2=(base) class="chart-axis" {}
                    @for (i, c) in columns.iter().enumerate() {
                        @let x = i as i64 * step;
                        @let h = (i128::from(c.value.max(0)) * 100 / i128::from(max)) as i64;
                        @if h > 0 {
                            rect x=(x + 1) y=(base - h) width=(bar) height=(h) class="chart-bar" data-value=(c.value) {
                                title { (c.text) }
                            }
                        }
                        @if i as i64 % every == 0 {
                            text x=(x + 1) y=(base + 14) class="chart-label" { (c.label) }
                        }
                    }
                }
                p.small.muted { (caption) }
            }
        }
    }
}

/// A utilization meter (0–100 %, capped), as inline SVG.
pub fn meter(used: i64, limit: i64) -> Markup {
    let pct = if limit <= 0 {
        100
    } else {
        (used.max(0) as i128 * 100 / limit as i128).min(100) as i64
    };
    let class = if pct >= 90 {
        "meter-bar hot"
    } else if pct >= 70 {
        "meter-bar warm"
    } else {
        "meter-bar"
    };
    html! {
        svg.meter xmlns="http://www.w3.org/2000/svg" viewBox="0 0 100 8" role="img" aria-label={(pct) "% used"} {
            rect x="0" y="0" width="100" height="8" rx="2" class="meter-track" {}
            rect x="0" y="0" width=(pct) height="8" rx="2" class=(class) {}
        }
        span.small { " " (pct) "%" }
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Raw, trusted markup (only for constants).
pub fn raw(s: &'static str) -> PreEscaped<&'static str> {
    PreEscaped(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(time(1_795_000_000), "2026-11-18 11:06:40 UTC");
        assert_eq!(date(951_782_400), "2000-02-29");
    }

    #[test]
    fn money_and_encoding() {
        assert_eq!(money(1240, "usd"), "USD 12.40");
        assert_eq!(url_decode(&url_encode("a b&c/é")), "a b&c/é");
    }

    #[test]
    fn column_charts_scale_to_the_largest_column() {
        let cols = [
            Column {
                label: "11-21".into(),
                value: 0,
                text: "2026-11-21: USD 0.00".into(),
            },
            Column {
                label: "11-22".into(),
                value: 500,
                text: "2026-11-22: USD 5.00".into(),
            },
            Column {
                label: "<b>".into(),
                value: 1000,
                text: "x".into(),
            },
        ];
        let m = column_chart("daily", &cols, "highest day: USD 10.00").into_string();
        assert_eq!(
            m.matches("class=\"chart-bar\"").count(),
            2,
            "no bar for zero"
        );
        assert!(
            m.contains("height=\"50\"") && m.contains("height=\"100\""),
            "{m}"
        );
        assert!(m.contains("&lt;b&gt;"));
        let empty = column_chart("daily", &cols[..1], "").into_string();
        assert!(empty.contains("nothing yet") && !empty.contains("<svg"));
    }

    #[test]
    fn charts_escape_labels() {
        let m = bar_chart(
            "spend",
            &[Bar {
                label: "<script>".into(),
                value: 5,
                text: "USD 0.05".into(),
            }],
        )
        .into_string();
        assert!(!m.contains("<script>"));
        assert!(m.contains("&lt;script&gt;"));
    }
}
