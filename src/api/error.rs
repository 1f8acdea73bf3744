//! The agent API's error bodies: `{"error": {"code", "message", "field"?}}` with a stable
//! snake_case code. Bad input is a 4xx; nothing here leaks internals or card data.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::service::{AuthError, ServiceError};

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code, e.g. `invalid_amount`, `invalid_agent_key`.
    pub code: String,
    pub message: String,
    /// The request field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub detail: ErrorDetail,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            detail: ErrorDetail {
                code: code.to_string(),
                message: message.into(),
                field: None,
            },
        }
    }

    pub fn with_field(mut self, field: &str) -> ApiError {
        self.detail.field = Some(field.to_string());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let unauthorized = self.status == StatusCode::UNAUTHORIZED;
        let mut resp = (self.status, axum::Json(ErrorBody { error: self.detail })).into_response();
        if unauthorized {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"roony\""),
            );
        }
        resp
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let code = match e {
            AuthError::Missing => "missing_agent_key",
            AuthError::Invalid => "invalid_agent_key",
        };
        ApiError::new(StatusCode::UNAUTHORIZED, code, e.to_string())
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Invalid(v) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, v.code, v.message).with_field(v.field)
            }
            ServiceError::NotFound => {
                ApiError::new(StatusCode::NOT_FOUND, "intent_not_found", "no such purchase intent")
            }
            ServiceError::IdempotencyMismatch => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this idempotency key was already used with a different request; use a new key for a new purchase",
            )
            .with_field("idempotency_key"),
            ServiceError::NotCancelable(s) => ApiError::new(
                StatusCode::CONFLICT,
                "intent_not_cancelable",
                format!("the purchase intent is {s} and cannot be canceled"),
            ),
            ServiceError::InProgress => ApiError::new(
                StatusCode::CONFLICT,
                "intent_in_progress",
                "the purchase intent is still being processed; retry in a moment",
            ),
            ServiceError::Stripe(err) => {
                tracing::warn!(error = %err, "stripe error surfaced to agent");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "stripe_unavailable",
                    "the card issuer is unavailable; retry shortly (requests with an idempotency key are safe to retry)",
                )
            }
            ServiceError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "internal error")
            }
        }
    }
}
