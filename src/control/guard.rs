//! Request hygiene for everything the control plane serves (admin API, sync, webhooks,
//! dashboard): a path or query string whose percent-decoded form holds a control character
//! (NUL above all: PostgreSQL refuses it in text, SQLite would store it) is refused with
//! `400 invalid_characters` before any handler runs. Bodies are checked where they are
//! parsed (dashboard forms in `dashboard::auth`, JSON by the database's own refusal mapped
//! to `DbError::InvalidInput`).

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The stable error code of a refused request.
pub const CODE: &str = "invalid_characters";
const MESSAGE: &str = "the request contains control characters (such as NUL); remove them";

/// Whether `s` (already decoded) holds a character no id, filter or name may hold.
pub fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// Whether a text field (a note, a policy document, a description) holds a control
/// character other than a line break or a tab.
pub fn text_has_control(s: &str) -> bool {
    s.chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
}

fn decoded_has_control(raw: &str) -> bool {
    // `+` is a space in query strings; it is not a control character either way.
    // Bytes that are not UTF-8 are the handlers' to judge (ids are ASCII; such a lookup
    // finds nothing); only control characters are refused here.
    let bytes = percent_encoding::percent_decode_str(raw).collect::<Vec<u8>>();
    has_control(&String::from_utf8_lossy(&bytes))
}

/// Whether the request's path or query string is acceptable.
pub fn uri_acceptable(uri: &axum::http::Uri) -> bool {
    !decoded_has_control(uri.path()) && !uri.query().is_some_and(decoded_has_control)
}

/// Middleware: `400 invalid_characters` for a path or query with control characters (an
/// HTML page for the dashboard, the admin API's JSON error shape elsewhere under `/api`).
pub async fn reject_control_characters(req: Request, next: Next) -> Response {
    if uri_acceptable(req.uri()) {
        return next.run(req).await;
    }
    if req.uri().path().starts_with("/api/") {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({"error": {"code": CODE, "message": MESSAGE}})),
        )
            .into_response()
    } else {
        super::dashboard::PageError::bad_request(CODE, MESSAGE).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters() {
        let ok: axum::http::Uri = "/transactions?agent=agt_1&merchant=caf%C3%A9+bar"
            .parse()
            .unwrap();
        assert!(uri_acceptable(&ok));
        let not_utf8: axum::http::Uri = "/api/admin/v1/admin_tokens/%FF/revoke".parse().unwrap();
        assert!(uri_acceptable(&not_utf8));
        for bad in [
            "/agents/%00",
            "/transactions?agent=%00",
            "/audit?target_id=a%0Ab",
            "/api/admin/v1/agents/agt%7F",
            "/transactions?merchant=%C2%85",
        ] {
            let uri: axum::http::Uri = bad.parse().unwrap();
            assert!(!uri_acceptable(&uri), "{bad}");
        }
        assert!(text_has_control("a\u{0}b"));
        assert!(!text_has_control("line one\r\nline two\tend"));
        assert!(has_control("a\nb"));
    }
}
