//! The agent-facing OpenAPI (axum + utoipa). The only module that knows HTTP; every handler
//! calls the service layer.

pub mod error;

use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::domain::intent::PurchaseRequest;
use crate::service::{
    AgentIdentity, BudgetView, IntentPage, IntentView, Service, ServiceError, StatusView,
};
pub use error::{ApiError, ErrorBody, ErrorDetail};

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug)]
pub struct AppState {
    pub service: Service,
}

/// The authenticated agent, from `Authorization: Bearer <agent key>`.
pub struct Agent(pub AgentIdentity);

impl FromRequestParts<AppState> for Agent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // Already authenticated by the rate limiter (`crate::ratelimit`) for this request.
        if let Some(crate::ratelimit::Authenticated(agent)) = parts.extensions.get() {
            return Ok(Agent(agent.clone()));
        }
        let presented = bearer(&parts.headers);
        Ok(Agent(state.service.authenticate(presented)?))
    }
}

/// Extracts the token of an `Authorization: Bearer …` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        })
}

/// JSON body whose rejections are mapped to the API's error bodies.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    match r {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with Content-Type: application/json",
        ),
        JsonRejection::JsonSyntaxError(e) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not valid JSON: {}", e.body_text()),
        ),
        JsonRejection::JsonDataError(e) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            format!("the body does not match the schema: {}", e.body_text()),
        ),
        JsonRejection::BytesRejection(_) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body is larger than {MAX_BODY_BYTES} bytes"),
            )
        }
        other => ApiError::new(other.status(), "invalid_body", other.body_text()),
    }
}

/// The `{id}` path segment. One axum cannot decode (e.g. `%FF`, not UTF-8) names no intent:
/// a JSON 404 like any unknown id, instead of axum's `text/plain` 400.
fn intent_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    match path {
        Ok(Path(id)) => Ok(id),
        Err(rejection) => {
            tracing::debug!(error = %rejection, "undecodable intent id");
            Err(ServiceError::NotFound.into())
        }
    }
}

/// A purchase intent, plus an error object when the purchase did not go through.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct PurchaseResponse {
    #[serde(flatten)]
    pub intent: IntentView,
    /// Present on non-2xx responses: `purchase_declined` or `card_issuance_failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// Request a purchase.
///
/// Roony decides the purchase against the agent's policy in microseconds. When approved, it
/// issues a single-use virtual card limited to this purchase and returns its number and CVC
/// **once**. A decline is a `402` with every reason; a purchase above the approval threshold
/// is a `202` with status `pending_approval`. Retrying with the same idempotency key (body
/// field or `Idempotency-Key` header) never creates a second card.
#[utoipa::path(
    post,
    path = "/api/v1/purchase_intent",
    tag = "purchases",
    request_body = PurchaseRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe; same as the body's idempotency_key (1 to 255 printable ASCII characters, no spaces)", min_length = 1, max_length = 255, pattern = "^[!-~]+$")),
    responses(
        (status = 201, description = "Approved: the card is in `card`", body = PurchaseResponse),
        (status = 200, description = "Idempotent replay of an earlier request", body = PurchaseResponse),
        (status = 202, description = "Pending an administrator's approval", body = PurchaseResponse),
        (status = 402, description = "Declined by policy; `reasons` says why", body = PurchaseResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid agent key", body = ErrorBody),
        (status = 409, description = "The same idempotency key is still being processed", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Invalid field; `field` names it", body = ErrorBody),
        (status = 429, description = "Rate limited (per agent key, or per address without a valid key); retry after `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying (at least 1)"))),
        (status = 502, description = "Approved, but the card could not be created; nothing reserved", body = PurchaseResponse),
        (status = 503, description = "Card issuer unavailable", body = ErrorBody),
    ),
    security(("agent_key" = []))
)]
async fn create_purchase_intent(
    State(state): State<AppState>,
    Agent(agent): Agent,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PurchaseRequest>,
) -> Result<Response, ApiError> {
    let header_key = match headers.get("idempotency-key") {
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_idempotency_key",
                "Idempotency-Key must be printable ASCII",
            )
            .with_field("Idempotency-Key")
        })?),
        None => None,
    };
    let outcome = state
        .service
        .request_purchase(&agent, body, header_key)
        .await?;
    let intent = outcome.intent;
    let (status, error) = match intent.status {
        StatusView::Approved if outcome.replayed => (StatusCode::OK, None),
        StatusView::Approved => (StatusCode::CREATED, None),
        StatusView::PendingApproval => (StatusCode::ACCEPTED, None),
        StatusView::Declined => (
            StatusCode::PAYMENT_REQUIRED,
            Some(ErrorDetail {
                code: "purchase_declined".into(),
                message: intent
                    .reasons
                    .iter()
                    .map(|r| r.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
                field: None,
            }),
        ),
        StatusView::Failed => (
            StatusCode::BAD_GATEWAY,
            Some(ErrorDetail {
                code: "card_issuance_failed".into(),
                message: "approved, but the card could not be created; nothing is reserved — retry with the same idempotency key".into(),
                field: None,
            }),
        ),
        // Replays of intents that have since moved on report their current state.
        _ => (StatusCode::OK, None),
    };
    let mut resp = (status, Json(PurchaseResponse { intent, error })).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if outcome.replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// Get a purchase intent (never includes the card number or CVC).
#[utoipa::path(
    get,
    path = "/api/v1/purchase_intents/{id}",
    tag = "purchases",
    params(("id" = String, Path, description = "Intent id (`pur_…`)")),
    responses(
        (status = 200, body = IntentView),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 429, description = "Rate limited (per agent key, or per address without a valid key); retry after `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying (at least 1)"))),
    ),
    security(("agent_key" = []))
)]
async fn get_purchase_intent(
    State(state): State<AppState>,
    Agent(agent): Agent,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<IntentView>, ApiError> {
    let id = intent_id(id)?;
    Ok(Json(state.service.get_purchase(&agent, &id).await?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// An intent id: return intents older than it (from `next_cursor`).
    pub starting_after: Option<String>,
}

/// List the agent's purchase intents, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/purchase_intents",
    tag = "purchases",
    params(ListParams),
    responses(
        (status = 200, body = IntentPage),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "Unknown `starting_after`", body = ErrorBody),
        (status = 429, description = "Rate limited (per agent key, or per address without a valid key); retry after `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying (at least 1)"))),
    ),
    security(("agent_key" = []))
)]
async fn list_purchase_intents(
    State(state): State<AppState>,
    Agent(agent): Agent,
    query: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<IntentPage>, ApiError> {
    let Query(q) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "limit must be between 1 and 100",
        )
        .with_field("limit"));
    }
    Ok(Json(state.service.list_purchases(
        &agent,
        limit as usize,
        q.starting_after.as_deref(),
    )?))
}

/// Cancel a purchase intent: its card is canceled and the reserved amount released.
#[utoipa::path(
    post,
    path = "/api/v1/purchase_intents/{id}/cancel",
    tag = "purchases",
    params(("id" = String, Path, description = "Intent id (`pur_…`)")),
    responses(
        (status = 200, body = IntentView),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "Not cancelable in its state", body = ErrorBody),
        (status = 429, description = "Rate limited (per agent key, or per address without a valid key); retry after `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying (at least 1)"))),
        (status = 503, body = ErrorBody),
    ),
    security(("agent_key" = []))
)]
async fn cancel_purchase_intent(
    State(state): State<AppState>,
    Agent(agent): Agent,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<IntentView>, ApiError> {
    let id = intent_id(id)?;
    Ok(Json(state.service.cancel_purchase(&agent, &id).await?))
}

/// The agent's budgets: limit, committed and remaining per period.
#[utoipa::path(
    get,
    path = "/api/v1/budget",
    tag = "budgets",
    responses(
        (status = 200, body = BudgetView),
        (status = 401, body = ErrorBody),
        (status = 429, description = "Rate limited (per agent key, or per address without a valid key); retry after `Retry-After` seconds", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait before retrying (at least 1)"))),
    ),
    security(("agent_key" = []))
)]
async fn get_budget(
    State(state): State<AppState>,
    Agent(agent): Agent,
) -> Result<Json<BudgetView>, ApiError> {
    Ok(Json(state.service.budget(&agent)?))
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

struct SecurityAddon;

impl Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "agent_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The agent key, shown once when the agent was created"))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Roony agent API",
        description = "Purchase decisions and single-use cards for AI agents. Amounts are integer minor units with an ISO 4217 currency.",
        license(name = "Apache-2.0"),
    ),
    modifiers(&SecurityAddon),
    tags(
        (name = "purchases", description = "Request, inspect and cancel purchases"),
        (name = "budgets", description = "What the agent may still spend"),
        (name = "ops", description = "Health"),
    )
)]
struct ApiDoc;

fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(create_purchase_intent))
        .routes(routes!(list_purchase_intents))
        .routes(routes!(get_purchase_intent))
        .routes(routes!(cancel_purchase_intent))
        .routes(routes!(get_budget))
        .routes(routes!(healthz))
}

/// The agent API's OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_router().into_openapi()
}

/// The committed form of the spec (`openapi/roony-agent.json`).
pub fn openapi_json() -> String {
    openapi().to_pretty_json().unwrap_or_default() + "\n"
}

/// The sidecar's HTTP app: the agent API plus `/openapi.json`.
pub fn router(service: Service) -> Router {
    let (router, spec) = api_router().split_for_parts();
    let spec_json = spec.to_pretty_json().unwrap_or_default();
    router
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let body = spec_json.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], body) }
            }),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(AppState { service })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "internal error",
            )
            .into_response()
        }))
        .layer(tower_http::trace::TraceLayer::new_for_http())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}

/// Serves `app` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        // Small request/response exchanges: do not wait to coalesce segments.
        let _ = tcp.set_nodelay(true);
    });
    // The peer address is what unauthenticated requests are rate limited by.
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// How long a graceful shutdown may take before in-flight requests are dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
