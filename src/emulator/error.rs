//! Stripe's error object (`{"error": {...}}`) and the statuses it travels with.

use http::StatusCode;
use serde_json::{Map, Value, json};

/// `error.type` values Stripe uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    ApiError,
    CardError,
    IdempotencyError,
    InvalidRequestError,
}

impl ErrorType {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::ApiError => "api_error",
            ErrorType::CardError => "card_error",
            ErrorType::IdempotencyError => "idempotency_error",
            ErrorType::InvalidRequestError => "invalid_request_error",
        }
    }
}

/// An error answer in Stripe's format. Messages follow Stripe's wording where known.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: ErrorType,
    pub code: Option<&'static str>,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: ErrorType, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code: None,
            message: message.into(),
            param: None,
        }
    }

    /// 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorType::InvalidRequestError,
            message,
        )
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// `Missing required param: {param}.`
    pub fn missing(param: &str) -> Self {
        Self::invalid(format!("Missing required param: {param}."))
            .with_code("parameter_missing")
            .with_param(param)
    }

    /// `Received unknown parameter: {param}`
    pub fn unknown_param(param: &str) -> Self {
        Self::invalid(format!("Received unknown parameter: {param}"))
            .with_code("parameter_unknown")
            .with_param(param)
    }

    /// 404 for a missing object addressed by the URL.
    pub fn no_such(noun: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorType::InvalidRequestError,
            format!("No such {noun}: '{id}'"),
        )
        .with_code("resource_missing")
        .with_param("id")
    }

    /// 400 for a missing object named by a parameter.
    pub fn no_such_param(noun: &str, id: &str, param: &str) -> Self {
        Self::invalid(format!("No such {noun}: '{id}'"))
            .with_code("resource_missing")
            .with_param(param)
    }

    /// `You may only specify one of these parameters: a, b.`
    pub fn exclusive(params: &[&str]) -> Self {
        let first = params.first().copied().unwrap_or_default();
        Self::invalid(format!(
            "You may only specify one of these parameters: {}.",
            params.join(", ")
        ))
        .with_param(first)
    }

    /// 404 for a URL the emulator does not serve.
    pub fn unrecognized_url(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorType::InvalidRequestError,
            format!(
                "Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs or we can help at https://support.stripe.com/."
            ),
        )
    }

    /// The JSON body Stripe sends.
    pub fn body(&self) -> Value {
        let mut err = Map::new();
        err.insert("type".into(), json!(self.kind.as_str()));
        if let Some(code) = self.code {
            err.insert("code".into(), json!(code));
            err.insert(
                "doc_url".into(),
                json!(format!(
                    "https://stripe.com/docs/error-codes/{}",
                    code.replace('_', "-")
                )),
            );
        }
        err.insert("message".into(), json!(self.message));
        if let Some(param) = &self.param {
            err.insert("param".into(), json!(param));
        }
        json!({ "error": Value::Object(err) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shape() {
        let e = ApiError::no_such("issuing card", "ic_x");
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(
            e.body(),
            json!({"error": {
                "type": "invalid_request_error",
                "code": "resource_missing",
                "doc_url": "https://stripe.com/docs/error-codes/resource-missing",
                "message": "No such issuing card: 'ic_x'",
                "param": "id"
            }})
        );
        let plain = ApiError::invalid("x").body();
        assert!(plain["error"].get("code").is_none());
        assert!(plain["error"].get("param").is_none());
    }
}
