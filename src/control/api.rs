//! The admin API (axum + utoipa) under `/api/admin/v1`, authenticated with admin tokens
//! (`Authorization: Bearer <admin token>`, stored as SHA-256 hashes, compared in constant
//! time). Every state-changing call writes an audit event in the same transaction.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::db::{
    ADMIN_TOKEN_USE_RESOLUTION, Actor, AdminTokenRevoke, AgentFilter, AuditFilter, ControlDb,
    DbError, DecideError, DiscrepancyFilter, LedgerFilter,
};
use super::model::{
    AdminToken, Agent, AgentKey, AuditEvent, Authorization, Budget, BudgetLease, BudgetScope,
    Cursor, Decision, Discrepancy, Intent, Organization, PolicyRevision, Project,
    ReconciliationRun, Sidecar,
};
use crate::api::{ApiError, ApiJson, MAX_BODY_BYTES};
use crate::domain::money::{Currency, MAX_AMOUNT_MINOR};
use crate::domain::time::Period;
use crate::policy::{Policy, PolicyError};
use crate::service::ids::new_id;

/// Prefix of every admin endpoint.
pub const PREFIX: &str = "/api/admin/v1";
/// Prefix of generated admin tokens.
pub const ADMIN_TOKEN_PREFIX: &str = "roony_at_";

const INTENT_STATUSES: &[&str] = &[
    "pending_approval",
    "approved",
    "declined",
    "canceled",
    "expired",
    "failed",
    "issuing",
    "settled",
];
const DECISION_OUTCOMES: &[&str] = &["approved", "declined", "pending_approval"];

#[derive(Clone, Debug)]
pub struct AdminState {
    pub db: ControlDb,
    /// Becomes `true` when the server begins to shut down (ends long-polls early).
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

// ----- errors --------------------------------------------------------------------------

/// `{"error": {"code", "message", "field"?, "errors"?}}`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AdminErrorDetail {
    /// Stable snake_case code, e.g. `invalid_policy`, `agent_not_found`.
    pub code: String,
    pub message: String,
    /// The request field at fault, when there is one (the first one for `invalid_policy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Every problem found (`invalid_policy`), each with its exact field path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<PolicyError>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AdminErrorBody {
    pub error: AdminErrorDetail,
}

#[derive(Debug)]
pub struct AdminError {
    pub status: StatusCode,
    pub detail: AdminErrorDetail,
}

impl AdminError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> AdminError {
        AdminError {
            status,
            detail: AdminErrorDetail {
                code: code.to_string(),
                message: message.into(),
                field: None,
                errors: Vec::new(),
            },
        }
    }

    fn with_field(mut self, field: &str) -> AdminError {
        self.detail.field = Some(field.to_string());
        self
    }

    fn invalid(field: &str, message: impl Into<String>) -> AdminError {
        AdminError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
            .with_field(field)
    }

    fn query(field: &str, message: impl Into<String>) -> AdminError {
        AdminError::new(StatusCode::BAD_REQUEST, "invalid_query", message).with_field(field)
    }

    fn internal(e: impl std::fmt::Display) -> AdminError {
        tracing::error!(error = %e, "admin api internal error");
        AdminError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error",
        )
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let unauthorized = self.status == StatusCode::UNAUTHORIZED;
        let mut resp = (self.status, Json(AdminErrorBody { error: self.detail })).into_response();
        if unauthorized {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"roony-admin\""),
            );
        }
        resp
    }
}

impl From<ApiError> for AdminError {
    fn from(e: ApiError) -> Self {
        AdminError {
            status: e.status,
            detail: AdminErrorDetail {
                code: e.detail.code,
                message: e.detail.message,
                field: e.detail.field,
                errors: Vec::new(),
            },
        }
    }
}

impl From<DbError> for AdminError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::NotFound(what) => AdminError::new(
                StatusCode::NOT_FOUND,
                &format!("{}_not_found", what.replace(' ', "_")),
                format!("no such {what}"),
            ),
            DbError::Conflict(message) => {
                AdminError::new(StatusCode::CONFLICT, "conflict", message)
            }
            DbError::StalePolicy { base, current } => AdminError::new(
                StatusCode::CONFLICT,
                "policy_changed",
                format!(
                    "revision {current} of the policy was published after revision {base}, which this change was based on; reload and apply the change again"
                ),
            ),
            DbError::InvalidInput(_) => AdminError::new(
                StatusCode::BAD_REQUEST,
                super::guard::CODE,
                "the request contains characters that cannot be stored (such as NUL); remove them"
                    .to_string(),
            ),
            other => AdminError::internal(other),
        }
    }
}

// ----- extractors ----------------------------------------------------------------------

/// The authenticated administrator, from `Authorization: Bearer <admin token>`.
pub struct Admin(pub Actor);

impl FromRequestParts<AdminState> for Admin {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, AdminError> {
        let token = crate::api::bearer(&parts.headers).filter(|t| !t.is_empty());
        let Some(token) = token else {
            return Err(AdminError::new(
                StatusCode::UNAUTHORIZED,
                "missing_admin_token",
                "send the admin token as Authorization: Bearer <token>",
            ));
        };
        let invalid = || {
            AdminError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_admin_token",
                "the admin token is not valid",
            )
        };
        let record = state
            .db
            .find_admin_token(&crate::auth::key_id(token))
            .await?;
        match record {
            Some(r) if !r.revoked && crate::auth::verify(token, &r.token_hash) => {
                // `last_used_at`, at most once a minute per token. Informational: a failed
                // write does not refuse the request.
                let now = now();
                let stale = r
                    .last_used_at
                    .is_none_or(|t| now.saturating_sub(t) >= ADMIN_TOKEN_USE_RESOLUTION);
                if stale && let Err(e) = state.db.touch_admin_token(&r.id, now).await {
                    tracing::warn!(error = %e, token_id = %r.id, "cannot record admin token use");
                }
                Ok(Admin(Actor {
                    kind: "admin_token",
                    id: r.id,
                    name: r.name,
                    // The request's id (see `super::audit`), shared with its request event.
                    request_id: Some(
                        parts
                            .extensions
                            .get::<crate::audit::http::RequestId>()
                            .map(|r| r.0.clone())
                            .unwrap_or_else(|| new_id("req")),
                    ),
                }))
            }
            _ => Err(invalid()),
        }
    }
}

/// A JSON body that may be absent or `null` (then `T::default()`).
pub struct OptionalJson<T>(pub T);

impl<T, S> FromRequest<S> for OptionalJson<T>
where
    T: serde::de::DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = AdminError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AdminError> {
        let headers = req.headers();
        let has_body = headers.contains_key(header::TRANSFER_ENCODING)
            || headers
                .get(header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0");
        if !has_body {
            return Ok(OptionalJson(T::default()));
        }
        let ApiJson(v) = ApiJson::<Option<T>>::from_request(req, state).await?;
        Ok(OptionalJson(v.unwrap_or_default()))
    }
}

fn body<T>(r: Result<ApiJson<T>, ApiError>) -> Result<T, AdminError> {
    r.map(|ApiJson(v)| v).map_err(AdminError::from)
}

fn path<T>(r: Result<Path<T>, PathRejection>, what: &str) -> Result<T, AdminError> {
    r.map(|Path(v)| v).map_err(|_| {
        AdminError::new(
            StatusCode::NOT_FOUND,
            &format!("{what}_not_found"),
            format!("no such {what}"),
        )
    })
}

fn query<T>(r: Result<Query<T>, QueryRejection>) -> Result<T, AdminError> {
    r.map(|Query(v)| v)
        .map_err(|e| AdminError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))
}

// ----- validation ----------------------------------------------------------------------

fn check_name(field: &str, value: &str) -> Result<String, AdminError> {
    let v = value.trim();
    if v.is_empty() || v.chars().count() > 200 || v.chars().any(char::is_control) {
        return Err(AdminError::invalid(
            field,
            format!("{field} must be 1 to 200 printable characters"),
        ));
    }
    Ok(v.to_string())
}

fn check_id(field: &str, value: &str) -> Result<(), AdminError> {
    if value.is_empty()
        || value.len() > 64
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(AdminError::invalid(
            field,
            format!("{field} must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -"),
        ));
    }
    Ok(())
}

fn check_note(field: &str, value: &Option<String>) -> Result<(), AdminError> {
    if let Some(v) = value
        && (v.chars().count() > 1000 || v.chars().any(|c| c.is_control() && c != '\n'))
    {
        return Err(AdminError::invalid(
            field,
            format!("{field} must be at most 1000 printable characters"),
        ));
    }
    Ok(())
}

fn page_limit(limit: Option<u32>) -> Result<i64, AdminError> {
    let limit = limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(AdminError::query(
            "limit",
            "limit must be between 1 and 100",
        ));
    }
    Ok(i64::from(limit))
}

fn page_cursor(cursor: &Option<String>) -> Result<Option<Cursor>, AdminError> {
    match cursor {
        None => Ok(None),
        Some(text) => Cursor::decode(text)
            .map(Some)
            .ok_or_else(|| AdminError::query("cursor", "cursor is not one this API returned")),
    }
}

fn one_of(field: &str, value: &Option<String>, allowed: &[&str]) -> Result<(), AdminError> {
    if let Some(v) = value
        && !allowed.contains(&v.as_str())
    {
        return Err(AdminError::query(
            field,
            format!("{field} must be one of {}", allowed.join(", ")),
        ));
    }
    Ok(())
}

// ----- organizations and projects ------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrganization {
    pub name: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct OrganizationList {
    pub items: Vec<Organization>,
}

/// Create an organization.
#[utoipa::path(
    post,
    path = "/api/admin/v1/organizations",
    tag = "organizations",
    request_body = CreateOrganization,
    responses(
        (status = 201, body = Organization),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
        (status = 415, body = AdminErrorBody),
        (status = 422, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn create_organization(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    req: Result<ApiJson<CreateOrganization>, ApiError>,
) -> Result<(StatusCode, Json<Organization>), AdminError> {
    let req = body(req)?;
    let name = check_name("name", &req.name)?;
    let org = state.db.create_org(&name, &actor, now()).await?;
    Ok((StatusCode::CREATED, Json(org)))
}

/// List organizations, oldest first.
#[utoipa::path(
    get,
    path = "/api/admin/v1/organizations",
    tag = "organizations",
    responses((status = 200, body = OrganizationList), (status = 401, body = AdminErrorBody)),
    security(("admin_token" = []))
)]
async fn list_organizations(
    State(state): State<AdminState>,
    Admin(_admin): Admin,
) -> Result<Json<OrganizationList>, AdminError> {
    Ok(Json(OrganizationList {
        items: state.db.list_orgs().await?,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    /// Defaults to the default organization.
    #[serde(default)]
    pub org_id: Option<String>,
    /// Unique within the organization.
    pub name: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ProjectList {
    pub items: Vec<Project>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProjectParams {
    pub org_id: Option<String>,
}

/// Create a project.
#[utoipa::path(
    post,
    path = "/api/admin/v1/projects",
    tag = "projects",
    request_body = CreateProject,
    responses(
        (status = 201, body = Project),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
        (status = 404, description = "Unknown organization", body = AdminErrorBody),
        (status = 409, description = "A project of that name exists in the organization", body = AdminErrorBody),
        (status = 415, body = AdminErrorBody),
        (status = 422, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn create_project(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    req: Result<ApiJson<CreateProject>, ApiError>,
) -> Result<(StatusCode, Json<Project>), AdminError> {
    let req = body(req)?;
    let name = check_name("name", &req.name)?;
    let org_id = match req.org_id {
        Some(id) => id,
        None => state.db.ensure_default_org(now()).await?.id,
    };
    let project = state
        .db
        .create_project(&org_id, &name, &actor, now())
        .await
        .map_err(|e| match e {
            DbError::Conflict(_) => AdminError::new(
                StatusCode::CONFLICT,
                "project_exists",
                "a project of that name exists in the organization",
            )
            .with_field("name"),
            other => other.into(),
        })?;
    Ok((StatusCode::CREATED, Json(project)))
}

/// List projects, oldest first.
#[utoipa::path(
    get,
    path = "/api/admin/v1/projects",
    tag = "projects",
    params(ProjectParams),
    responses(
        (status = 200, body = ProjectList),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn list_projects(
    State(state): State<AdminState>,
    Admin(_admin): Admin,
    q: Result<Query<ProjectParams>, QueryRejection>,
) -> Result<Json<ProjectList>, AdminError> {
    let q = query(q)?;
    Ok(Json(ProjectList {
        items: state.db.list_projects(q.org_id.as_deref()).await?,
    }))
}

// ----- agents and keys -----------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAgent {
    pub project_id: String,
    pub name: String,
    /// Chosen id (letters, digits, `_`, `-`); generated (`agt_…`) when absent.
    #[serde(default)]
    pub id: Option<String>,
}

/// A new agent and its key. The key is shown **once**; only its hash is stored.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct CreatedAgent {
    pub agent: Agent,
    pub key_id: String,
    pub key: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct AgentPage {
    pub items: Vec<Agent>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AgentParams {
    pub org_id: Option<String>,
    pub project_id: Option<String>,
    /// `active` or `frozen`.
    pub status: Option<String>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct AgentKeyList {
    pub items: Vec<AgentKey>,
}

/// A new key for an agent, shown **once**; the agent's previous keys are revoked.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct RotatedKey {
    pub key_id: String,
    pub key: String,
    pub revoked_key_ids: Vec<String>,
}

#[derive(Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FreezeRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

/// Create an agent in a project; returns its key once.
#[utoipa::path(
    post,
    path = "/api/admin/v1/agents",
    tag = "agents",
    request_body = CreateAgent,
    responses(
        (status = 201, body = CreatedAgent),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
        (status = 404, description = "Unknown project", body = AdminErrorBody),
        (status = 409, description = "An agent with that id exists", body = AdminErrorBody),
        (status = 415, body = AdminErrorBody),
        (status = 422, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn create_agent(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    req: Result<ApiJson<CreateAgent>, ApiError>,
) -> Result<Response, AdminError> {
    let req = body(req)?;
    let name = check_name("name", &req.name)?;
    if let Some(id) = &req.id {
        check_id("id", id)?;
    }
    let key = crate::auth::generate();
    let agent = state
        .db
        .create_agent(
            &req.project_id,
            req.id.as_deref(),
            &name,
            &key,
            &actor,
            now(),
        )
        .await
        .map_err(|e| match e {
            DbError::Conflict(_) => AdminError::new(
                StatusCode::CONFLICT,
                "agent_exists",
                "an agent with that id exists",
            )
            .with_field("id"),
            other => other.into(),
        })?;
    Ok(no_store(
        StatusCode::CREATED,
        CreatedAgent {
            agent,
            key_id: key.key_id.clone(),
            key: key.plaintext.clone(),
        },
    ))
}

fn no_store<T: Serialize>(status: StatusCode, body: T) -> Response {
    let mut resp = (status, Json(body)).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// List agents, newest first.
#[utoipa::path(
    get,
    path = "/api/admin/v1/agents",
    tag = "agents",
    params(AgentParams),
    responses(
        (status = 200, body = AgentPage),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn list_agents(
    State(state): State<AdminState>,
    Admin(_admin): Admin,
    q: Result<Query<AgentParams>, QueryRejection>,
) -> Result<Json<AgentPage>, AdminError> {
    let q = query(q)?;
    one_of("status", &q.status, &["active", "frozen"])?;
    let limit = page_limit(q.limit)?;
    let cursor = page_cursor(&q.cursor)?;
    let filter = AgentFilter {
        org_id: q.org_id,
        project_id: q.project_id,
        status: q.status,
    };
    let page = state.db.list_agents(&filter, limit, cursor).await?;
    Ok(Json(AgentPage {
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}

/// Get an agent.
#[utoipa::path(
    get,
    path = "/api/admin/v1/agents/{id}",
    tag = "agents",
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 200, body = Agent),
        (status = 401, body = AdminErrorBody),
        (status = 404, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn get_agent(
    State(state): State<AdminState>,
    Admin(_admin): Admin,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Agent>, AdminError> {
    let id = path(id, "agent")?;
    Ok(Json(state.db.get_agent(&id).await?))
}

/// List an agent's keys (ids and dates only).
#[utoipa::path(
    get,
    path = "/api/admin/v1/agents/{id}/keys",
    tag = "agents",
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 200, body = AgentKeyList),
        (status = 401, body = AdminErrorBody),
        (status = 404, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn list_agent_keys(
    State(state): State<AdminState>,
    Admin(_admin): Admin,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<AgentKeyList>, AdminError> {
    let id = path(id, "agent")?;
    Ok(Json(AgentKeyList {
        items: state.db.list_agent_keys(&id).await?,
    }))
}

/// Rotate an agent's key: a new key (shown once) replaces every active one.
#[utoipa::path(
    post,
    path = "/api/admin/v1/agents/{id}/keys/rotate",
    tag = "agents",
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 200, body = RotatedKey),
        (status = 401, body = AdminErrorBody),
        (status = 404, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn rotate_agent_key(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, AdminError> {
    let id = path(id, "agent")?;
    let key = crate::auth::generate();
    let revoked = state.db.rotate_agent_key(&id, &key, &actor, now()).await?;
    Ok(no_store(
        StatusCode::OK,
        RotatedKey {
            key_id: key.key_id.clone(),
            key: key.plaintext.clone(),
            revoked_key_ids: revoked,
        },
    ))
}

/// Revoke one of an agent's keys.
#[utoipa::path(
    post,
    path = "/api/admin/v1/agents/{id}/keys/{key_id}/revoke",
    tag = "agents",
    params(
        ("id" = String, Path, description = "Agent id"),
        ("key_id" = String, Path, description = "Key id"),
    ),
    responses(
        (status = 200, body = AgentKey),
        (status = 401, body = AdminErrorBody),
        (status = 404, body = AdminErrorBody),
        (status = 409, description = "Already revoked", body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn revoke_agent_key(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    ids: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<AgentKey>, AdminError> {
    let (id, key_id) = path(ids, "agent_key")?;
    let key = state
        .db
        .revoke_agent_key(&id, &key_id, &actor, now())
        .await
        .map_err(|e| match e {
            DbError::Conflict(m) => AdminError::new(StatusCode::CONFLICT, "key_already_revoked", m),
            other => other.into(),
        })?;
    Ok(Json(key))
}

/// Freeze an agent: its sidecar declines every purchase with `agent_frozen` (once synced).
#[utoipa::path(
    post,
    path = "/api/admin/v1/agents/{id}/freeze",
    tag = "agents",
    params(("id" = String, Path, description = "Agent id")),
    request_body(content = Option<FreezeRequest>, description = "Optional reason"),
    responses(
        (status = 200, body = Agent),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
        (status = 404, body = AdminErrorBody),
        (status = 415, body = AdminErrorBody),
        (status = 422, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn freeze_agent(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    id: Result<Path<String>, PathRejection>,
    req: Result<OptionalJson<FreezeRequest>, AdminError>,
) -> Result<Json<Agent>, AdminError> {
    let id = path(id, "agent")?;
    let OptionalJson(req) = req?;
    check_note("reason", &req.reason)?;
    let reason = req
        .reason
        .unwrap_or_else(|| "frozen by an administrator".into());
    Ok(Json(
        state
            .db
            .set_agent_frozen(&id, Some(&reason), &actor, now())
            .await?,
    ))
}

/// Unfreeze an agent.
#[utoipa::path(
    post,
    path = "/api/admin/v1/agents/{id}/unfreeze",
    tag = "agents",
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 200, body = Agent),
        (status = 401, body = AdminErrorBody),
        (status = 404, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn unfreeze_agent(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Agent>, AdminError> {
    let id = path(id, "agent")?;
    Ok(Json(
        state.db.set_agent_frozen(&id, None, &actor, now()).await?,
    ))
}

// ----- policies ------------------------------------------------------------------------

#[derive(Serialize, Deserialize, ToSchema)]
pub struct PolicyRevisionList {
    /// Newest first.
    pub items: Vec<PolicyRevision>,
}

/// Write the agent's policy: validated (`422 invalid_policy` lists every problem with its
/// exact field), then stored as a new revision authored by the admin token.
#[utoipa::path(
    put,
    path = "/api/admin/v1/agents/{id}/policy",
    tag = "policies",
    params(("id" = String, Path, description = "Agent id")),
    request_body = Policy,
    responses(
        (status = 200, body = PolicyRevision),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
        (status = 404, body = AdminErrorBody),
        (status = 413, body = AdminErrorBody),
        (status = 415, body = AdminErrorBody),
        (status = 422, description = "Invalid policy; `errors` lists every field and reason", body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn put_policy(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    id: Result<Path<String>, PathRejection>,
    req: Result<ApiJson<serde_json::Value>, ApiError>,
) -> Result<Json<PolicyRevision>, AdminError> {
    let id = path(id, "agent")?;
    let value = body(req)?;
    let policy: Policy = serde_json::from_value(value).map_err(|e| {
        AdminError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_policy",
            format!("the policy does not match the schema: {e}"),
        )
    })?;
    if let Err(errors) = policy.compile() {
        let message = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.reason))
            .collect::<Vec<_>>()
            .join("; ");
        let mut err = AdminError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_policy", message);
        err.detail.field = errors.first().map(|e| e.field.clone());
        err.detail.errors = errors;
        return Err(err);
    }
    let document = serde_json::to_string(&policy).map_err(AdminError::internal)?;
    Ok(Json(
        state.db.put_policy(&id, &document, &actor, now()).await?,
    ))
}

/// The agent's current policy revision.
#[utoipa::path(
    get,
    path = "/api/admin/v1/agents/{id}/policy",
    tag = "policies",
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 200, body = PolicyRevision),
        (status = 401, body = AdminErrorBody),
        (status = 404, description = "Unknown agent, or no policy yet", body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn get_policy(
    State(state): State<AdminState>,
    Admin(_admin): Admin,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<PolicyRevision>, AdminError> {
    let id = path(id, "agent")?;
    Ok(Json(state.db.get_policy(&id).await?))
}

/// Every revision of the agent's policy, newest first.
#[utoipa::path(
    get,
    path = "/api/admin/v1/agents/{id}/policy/revisions",
    tag = "policies",
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 200, body = PolicyRevisionList),
        (status = 401, body = AdminErrorBody),
        (status = 404, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn list_policy_revisions(
    State(state): State<AdminState>,
    Admin(_admin): Admin,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<PolicyRevisionList>, AdminError> {
    let id = path(id, "agent")?;
    Ok(Json(PolicyRevisionList {
        items: state.db.list_policy_revisions(&id).await?,
    }))
}

// ----- budgets -------------------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetBudget {
    pub scope: BudgetScope,
    /// The organization, project or agent id.
    pub scope_id: String,
    #[schema(value_type = String, example = "monthly")]
    pub period: Period,
    /// ISO 4217 currency code.
    #[schema(example = "USD")]
    pub currency: String,
    /// Minor units, positive.
    pub limit: i64,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct BudgetList {
    pub items: Vec<Budget>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BudgetParams {
    /// `org`, `project` or `agent`.
    pub scope: Option<String>,
    pub scope_id: Option<String>,
}

/// Set the budget of an organization, project or agent for a period and currency (creates
/// it or replaces its limit).
#[utoipa::path(
    put,
    path = "/api/admin/v1/budgets",
    tag = "budgets",
    request_body = SetBudget,
    responses(
        (status = 200, body = Budget),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
        (status = 404, description = "Unknown organization, project or agent", body = AdminErrorBody),
        (status = 415, body = AdminErrorBody),
        (status = 422, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn set_budget(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    req: Result<ApiJson<SetBudget>, ApiError>,
) -> Result<Json<Budget>, AdminError> {
    let req = body(req)?;
    let currency = Currency::parse(&req.currency).map_err(|_| {
        AdminError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_currency",
            "currency must be an ISO 4217 code",
        )
        .with_field("currency")
    })?;
    if !(1..=MAX_AMOUNT_MINOR * 1000).contains(&req.limit) {
        return Err(AdminError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_amount",
            "limit must be a positive amount in minor units",
        )
        .with_field("limit"));
    }
    Ok(Json(
        state
            .db
            .set_budget(
                req.scope,
                &req.scope_id,
                req.period.as_str(),
                currency.code(),
                req.limit,
                &actor,
                now(),
            )
            .await?,
    ))
}

/// Delete a budget. An agent budget stops tightening the agent's policy; a project or
/// organization budget stops being shared (allowances held of it are dropped). Sidecars
/// learn of it with the next bundle.
#[utoipa::path(
    delete,
    path = "/api/admin/v1/budgets/{id}",
    tag = "budgets",
    params(("id" = String, Path, description = "Budget id (`bud_…`)")),
    responses(
        (status = 200, description = "The deleted budget", body = Budget),
        (status = 401, body = AdminErrorBody),
        (status = 404, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn delete_budget(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Budget>, AdminError> {
    let id = path(id, "budget")?;
    Ok(Json(state.db.delete_budget(&id, &actor, now()).await?))
}

/// List budgets.
#[utoipa::path(
    get,
    path = "/api/admin/v1/budgets",
    tag = "budgets",
    params(BudgetParams),
    responses(
        (status = 200, body = BudgetList),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn list_budgets(
    State(state): State<AdminState>,
    Admin(_admin): Admin,
    q: Result<Query<BudgetParams>, QueryRejection>,
) -> Result<Json<BudgetList>, AdminError> {
    let q = query(q)?;
    let scope = match &q.scope {
        None => None,
        Some(s) => Some(BudgetScope::parse(s).ok_or_else(|| {
            AdminError::query("scope", "scope must be one of org, project, agent")
        })?),
    };
    Ok(Json(BudgetList {
        items: state.db.list_budgets(scope, q.scope_id.as_deref()).await?,
    }))
}

// ----- the ledger ----------------------------------------------------------------------

#[derive(Serialize, Deserialize, ToSchema)]
pub struct IntentPage {
    pub items: Vec<Intent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct DecisionPage {
    pub items: Vec<Decision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct IntentParams {
    pub org_id: Option<String>,
    pub project_id: Option<String>,
    pub agent_id: Option<String>,
    /// `pending_approval`, `approved`, `declined`, `canceled`, `expired`, `failed` or `issuing`.
    pub status: Option<String>,
    /// Created at or after (Unix seconds).
    pub created_from: Option<i64>,
    /// Created before (Unix seconds).
    pub created_to: Option<i64>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DecisionParams {
    pub org_id: Option<String>,
    pub project_id: Option<String>,
    pub agent_id: Option<String>,
    /// `approved`, `declined` or `pending_approval`.
    pub outcome: Option<String>,
    /// Created at or after (Unix seconds).
    pub created_from: Option<i64>,
    /// Created before (Unix seconds).
    pub created_to: Option<i64>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRequest {
    /// Kept with the decision and in the audit trail.
    #[serde(default)]
    pub note: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ApprovalResult {
    pub intent: Intent,
    pub decision: Decision,
}

/// List purchase intents, newest first.
#[utoipa::path(
    get,
    path = "/api/admin/v1/intents",
    tag = "ledger",
    params(IntentParams),
    responses(
        (status = 200, body = IntentPage),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn list_intents(
    State(state): State<AdminState>,
    Admin(_admin): Admin,
    q: Result<Query<IntentParams>, QueryRejection>,
) -> Result<Json<IntentPage>, AdminError> {
    let q = query(q)?;
    one_of("status", &q.status, INTENT_STATUSES)?;
    let limit = page_limit(q.limit)?;
    let cursor = page_cursor(&q.cursor)?;
    let filter = LedgerFilter {
        org_id: q.org_id,
        project_id: q.project_id,
        agent_id: q.agent_id,
        status: q.status,
        created_from: q.created_from,
        created_to: q.created_to,
    };
    let page = state.db.list_intents(&filter, limit, cursor).await?;
    Ok(Json(IntentPage {
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}

/// Get a purchase intent.
#[utoipa::path(
    get,
    path = "/api/admin/v1/intents/{id}",
    tag = "ledger",
    params(("id" = String, Path, description = "Intent id (`pur_…`)")),
    responses(
        (status = 200, body = Intent),
        (status = 401, body = AdminErrorBody),
        (status = 404, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn get_intent(
    State(state): State<AdminState>,
    Admin(_admin): Admin,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Intent>, AdminError> {
    let id = path(id, "intent")?;
    Ok(Json(state.db.get_intent(&id).await?))
}

async fn decide(
    state: AdminState,
    actor: Actor,
    id: Result<Path<String>, PathRejection>,
    req: Result<OptionalJson<ApprovalRequest>, AdminError>,
    approve: bool,
) -> Result<Json<ApprovalResult>, AdminError> {
    let id = path(id, "intent")?;
    let OptionalJson(req) = req?;
    check_note("note", &req.note)?;
    let (intent, decision) = state
        .db
        .decide_pending(&id, approve, req.note.as_deref(), &actor, now())
        .await
        .map_err(decide_error)?;
    Ok(Json(ApprovalResult { intent, decision }))
}

/// The admin API's answer to a refused or failed decision.
fn decide_error(e: DecideError) -> AdminError {
    match e {
        DecideError::NotPending(status) => AdminError::new(
            StatusCode::CONFLICT,
            "intent_not_pending",
            format!("the intent is {status}, not pending_approval"),
        ),
        DecideError::Expired { expires_at } => AdminError::new(
            StatusCode::CONFLICT,
            "intent_expired",
            format!(
                "the request expired at {} (its sidecar expires it and releases the reservation); nothing was decided",
                crate::domain::time::rfc3339(expires_at)
            ),
        ),
        DecideError::AgentFrozen { agent_id, reason } => AdminError::new(
            StatusCode::CONFLICT,
            "agent_frozen",
            format!(
                "agent {agent_id} is frozen{}: unfreeze it before approving its purchases (denying is possible)",
                reason.map(|r| format!(" ({r})")).unwrap_or_default()
            ),
        ),
        DecideError::Db(e) => e.into(),
    }
}

/// Approve a `pending_approval` intent. Recorded in the ledger; while the intent's sidecar
/// still reports it pending, the project's bundle carries the decision (`approvals`), and
/// waiting long-polls answer at once. Refused while the agent is frozen or once the
/// request's `expires_at` has passed.
#[utoipa::path(
    post,
    path = "/api/admin/v1/intents/{id}/approve",
    tag = "ledger",
    params(("id" = String, Path, description = "Intent id (`pur_…`)")),
    request_body(content = Option<ApprovalRequest>, description = "Optional note"),
    responses(
        (status = 200, body = ApprovalResult),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
        (status = 404, body = AdminErrorBody),
        (status = 409, description = "`intent_not_pending`: the intent is not pending approval; `intent_expired`: its `expires_at` has passed; `agent_frozen`: its agent is frozen. Nothing is written.", body = AdminErrorBody),
        (status = 415, body = AdminErrorBody),
        (status = 422, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn approve_intent(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    id: Result<Path<String>, PathRejection>,
    req: Result<OptionalJson<ApprovalRequest>, AdminError>,
) -> Result<Json<ApprovalResult>, AdminError> {
    decide(state, actor, id, req, true).await
}

/// Deny a `pending_approval` intent (refused once its `expires_at` has passed).
#[utoipa::path(
    post,
    path = "/api/admin/v1/intents/{id}/deny",
    tag = "ledger",
    params(("id" = String, Path, description = "Intent id (`pur_…`)")),
    request_body(content = Option<ApprovalRequest>, description = "Optional note"),
    responses(
        (status = 200, body = ApprovalResult),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
        (status = 404, body = AdminErrorBody),
        (status = 409, description = "`intent_not_pending`: the intent is not pending approval; `intent_expired`: its `expires_at` has passed. Nothing is written.", body = AdminErrorBody),
        (status = 415, body = AdminErrorBody),
        (status = 422, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn deny_intent(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    id: Result<Path<String>, PathRejection>,
    req: Result<OptionalJson<ApprovalRequest>, AdminError>,
) -> Result<Json<ApprovalResult>, AdminError> {
    decide(state, actor, id, req, false).await
}

/// List decisions (by sidecars and administrators), newest first.
#[utoipa::path(
    get,
    path = "/api/admin/v1/decisions",
    tag = "ledger",
    params(DecisionParams),
    responses(
        (status = 200, body = DecisionPage),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn list_decisions(
    State(state): State<AdminState>,
    Admin(_admin): Admin,
    q: Result<Query<DecisionParams>, QueryRejection>,
) -> Result<Json<DecisionPage>, AdminError> {
    let q = query(q)?;
    one_of("outcome", &q.outcome, DECISION_OUTCOMES)?;
    let limit = page_limit(q.limit)?;
    let cursor = page_cursor(&q.cursor)?;
    let filter = LedgerFilter {
        org_id: q.org_id,
        project_id: q.project_id,
        agent_id: q.agent_id,
        status: q.outcome,
        created_from: q.created_from,
        created_to: q.created_to,
    };
    let page = state.db.list_decisions(&filter, limit, cursor).await?;
    Ok(Json(DecisionPage {
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}

// ----- settlement (Stripe) -------------------------------------------------------------

const DISCREPANCY_KINDS: &[&str] = &[
    "over_capture",
    "force_capture",
    "capture_on_inactive_intent",
    "merchant_mismatch",
    "unmatched_refund",
    "unknown_card",
    "orphan_card",
];

#[derive(Serialize, Deserialize, ToSchema)]
pub struct AuthorizationPage {
    pub items: Vec<Authorization>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuthorizationParams {
    pub intent_id: Option<String>,
    /// Stripe card id (`ic_…`).
    pub card_id: Option<String>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// List Issuing authorizations (real-time decisions and what Stripe reported), newest first.
#[utoipa::path(
    get,
    path = "/api/admin/v1/authorizations",
    tag = "settlement",
    params(AuthorizationParams),
    responses(
        (status = 200, body = AuthorizationPage),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn list_authorizations(
    State(state): State<AdminState>,
    Admin(_admin): Admin,
    q: Result<Query<AuthorizationParams>, QueryRejection>,
) -> Result<Json<AuthorizationPage>, AdminError> {
    let q = query(q)?;
    let limit = page_limit(q.limit)?;
    let cursor = page_cursor(&q.cursor)?;
    let page = state
        .db
        .list_authorizations(q.intent_id, q.card_id, limit, cursor)
        .await?;
    Ok(Json(AuthorizationPage {
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct DiscrepancyPage {
    pub items: Vec<Discrepancy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DiscrepancyParams {
    /// `over_capture`, `force_capture`, `capture_on_inactive_intent`, `merchant_mismatch`,
    /// `unmatched_refund`, `unknown_card` or `orphan_card`.
    pub kind: Option<String>,
    pub agent_id: Option<String>,
    pub project_id: Option<String>,
    pub intent_id: Option<String>,
    /// `true`: resolved only; `false`: open only.
    pub resolved: Option<bool>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    /// Kept with the discrepancy and in the audit trail.
    #[serde(default)]
    pub note: Option<String>,
}

/// List discrepancies (money that moved differently from what was approved), newest first.
#[utoipa::path(
    get,
    path = "/api/admin/v1/discrepancies",
    tag = "settlement",
    params(DiscrepancyParams),
    responses(
        (status = 200, body = DiscrepancyPage),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn list_discrepancies(
    State(state): State<AdminState>,
    Admin(_admin): Admin,
    q: Result<Query<DiscrepancyParams>, QueryRejection>,
) -> Result<Json<DiscrepancyPage>, AdminError> {
    let q = query(q)?;
    one_of("kind", &q.kind, DISCREPANCY_KINDS)?;
    let limit = page_limit(q.limit)?;
    let cursor = page_cursor(&q.cursor)?;
    let filter = DiscrepancyFilter {
        kind: q.kind,
        agent_id: q.agent_id,
        project_id: q.project_id,
        intent_id: q.intent_id,
        resolved: q.resolved,
    };
    let page = state.db.list_discrepancies(&filter, limit, cursor).await?;
    Ok(Json(DiscrepancyPage {
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}

/// Mark a discrepancy resolved (the agent stays frozen until unfrozen).
#[utoipa::path(
    post,
    path = "/api/admin/v1/discrepancies/{id}/resolve",
    tag = "settlement",
    params(("id" = String, Path, description = "Discrepancy id (`dsc_…`)")),
    request_body(content = Option<ResolveRequest>, description = "Optional note"),
    responses(
        (status = 200, body = Discrepancy),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
        (status = 404, body = AdminErrorBody),
        (status = 409, description = "Already resolved", body = AdminErrorBody),
        (status = 415, body = AdminErrorBody),
        (status = 422, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn resolve_discrepancy(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    id: Result<Path<String>, PathRejection>,
    req: Result<OptionalJson<ResolveRequest>, AdminError>,
) -> Result<Json<Discrepancy>, AdminError> {
    let id = path(id, "discrepancy")?;
    let OptionalJson(req) = req?;
    check_note("note", &req.note)?;
    let d = state
        .db
        .resolve_discrepancy(&id, req.note.as_deref(), &actor, now())
        .await
        .map_err(|e| match e {
            DbError::Conflict(m) => {
                AdminError::new(StatusCode::CONFLICT, "discrepancy_already_resolved", m)
            }
            other => other.into(),
        })?;
    Ok(Json(d))
}

// ----- reconciliation --------------------------------------------------------------------

#[derive(Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReconcileRequest {
    /// Compare the authorizations and transactions created at or after this (Unix seconds).
    /// Default: the last successful run's start minus one day, or 30 days back on the first
    /// run. Cards are always all compared.
    #[serde(default)]
    pub since: Option<i64>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ReconciliationPage {
    pub items: Vec<ReconciliationRun>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReconciliationParams {
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Reconcile with Stripe now: compare Stripe's cards, authorizations and transactions with
/// the ledger, adopt or cancel orphan cards, record what the webhooks missed, and return the
/// report (also stored; `status: failed` with `report.error` if Stripe or the database
/// failed midway).
#[utoipa::path(
    post,
    path = "/api/admin/v1/reconcile",
    tag = "settlement",
    request_body(content = Option<ReconcileRequest>, description = "Optional `since`"),
    responses(
        (status = 200, body = ReconciliationRun),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
        (status = 409, description = "`stripe_not_configured` or `reconciliation_running`", body = AdminErrorBody),
        (status = 415, body = AdminErrorBody),
        (status = 422, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn reconcile(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    req: Result<OptionalJson<ReconcileRequest>, AdminError>,
) -> Result<Json<ReconciliationRun>, AdminError> {
    let OptionalJson(req) = req?;
    if let Some(since) = req.since
        && !(0..=now() + 86_400).contains(&since)
    {
        return Err(AdminError::invalid(
            "since",
            "since must be unix seconds, not in the future",
        ));
    }
    match super::reconcile::run_now(&state.db, req.since, &actor).await {
        Ok(run) => Ok(Json(run)),
        Err(super::reconcile::ReconcileError::NotConfigured) => Err(AdminError::new(
            StatusCode::CONFLICT,
            "stripe_not_configured",
            "reconciliation needs stripe credentials (--stripe-api-key)",
        )),
        Err(super::reconcile::ReconcileError::Running) => Err(AdminError::new(
            StatusCode::CONFLICT,
            "reconciliation_running",
            "a reconciliation is already running; try again when it has finished",
        )),
        Err(super::reconcile::ReconcileError::Db(e)) => Err(e.into()),
    }
}

/// List reconciliation runs, newest first.
#[utoipa::path(
    get,
    path = "/api/admin/v1/reconciliations",
    tag = "settlement",
    params(ReconciliationParams),
    responses(
        (status = 200, body = ReconciliationPage),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn list_reconciliations(
    State(state): State<AdminState>,
    Admin(_admin): Admin,
    q: Result<Query<ReconciliationParams>, QueryRejection>,
) -> Result<Json<ReconciliationPage>, AdminError> {
    let q = query(q)?;
    let limit = page_limit(q.limit)?;
    let cursor = page_cursor(&q.cursor)?;
    let page = state.db.list_reconciliation_runs(limit, cursor).await?;
    Ok(Json(ReconciliationPage {
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}

/// One reconciliation run with its report.
#[utoipa::path(
    get,
    path = "/api/admin/v1/reconciliations/{id}",
    tag = "settlement",
    params(("id" = String, Path, description = "Run id (`rcn_…`)")),
    responses(
        (status = 200, body = ReconciliationRun),
        (status = 401, body = AdminErrorBody),
        (status = 404, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn get_reconciliation(
    State(state): State<AdminState>,
    Admin(_admin): Admin,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ReconciliationRun>, AdminError> {
    let id = path(id, "reconciliation")?;
    Ok(Json(state.db.get_reconciliation_run(&id).await?))
}

// ----- audit ---------------------------------------------------------------------------

#[derive(Serialize, Deserialize, ToSchema)]
pub struct AuditEventPage {
    pub items: Vec<AuditEvent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// e.g. `agent`, `intent`, `project`, `organization`, `org`.
    pub target_type: Option<String>,
    pub target_id: Option<String>,
    /// `admin_token` or `system`.
    pub actor_type: Option<String>,
    pub actor_id: Option<String>,
    /// e.g. `agent.freeze`, `policy.write`, `intent.approve`.
    pub action: Option<String>,
    /// Created at or after (Unix seconds).
    pub created_from: Option<i64>,
    /// Created before (Unix seconds).
    pub created_to: Option<i64>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// The audit trail, newest first: one event per state-changing call.
#[utoipa::path(
    get,
    path = "/api/admin/v1/audit_events",
    tag = "audit",
    params(AuditParams),
    responses(
        (status = 200, body = AuditEventPage),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn list_audit_events(
    State(state): State<AdminState>,
    Admin(_admin): Admin,
    q: Result<Query<AuditParams>, QueryRejection>,
) -> Result<Json<AuditEventPage>, AdminError> {
    let q = query(q)?;
    let limit = page_limit(q.limit)?;
    let cursor = page_cursor(&q.cursor)?;
    let filter = AuditFilter {
        target_type: q.target_type,
        target_id: q.target_id,
        actor_type: q.actor_type,
        actor_id: q.actor_id,
        action: q.action,
        created_from: q.created_from,
        created_to: q.created_to,
    };
    let page = state.db.list_audit_page(&filter, limit, cursor).await?;
    Ok(Json(AuditEventPage {
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}

// ----- sidecars ------------------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSidecar {
    pub name: String,
    /// The project whose agents the sidecar serves.
    pub project_id: String,
}

/// A new sidecar and its token. The token is shown **once**; only its hash is stored.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct CreatedSidecar {
    pub id: String,
    pub token: String,
    pub sidecar: Sidecar,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct SidecarList {
    pub items: Vec<Sidecar>,
}

/// Register a sidecar of a project; returns its sync token once.
#[utoipa::path(
    post,
    path = "/api/admin/v1/sidecars",
    tag = "sidecars",
    request_body = CreateSidecar,
    responses(
        (status = 201, body = CreatedSidecar),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
        (status = 404, description = "Unknown project", body = AdminErrorBody),
        (status = 415, body = AdminErrorBody),
        (status = 422, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn create_sidecar(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    req: Result<ApiJson<CreateSidecar>, ApiError>,
) -> Result<Response, AdminError> {
    let req = body(req)?;
    let name = check_name("name", &req.name)?;
    let mut secret = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
    let token = format!(
        "{}{}",
        crate::sync::wire::SIDECAR_TOKEN_PREFIX,
        hex::encode(secret)
    );
    let key = crate::auth::from_plaintext(&token).map_err(AdminError::internal)?;
    let sidecar = state
        .db
        .create_sidecar(&req.project_id, &name, &key, &actor, now())
        .await?;
    Ok(no_store(
        StatusCode::CREATED,
        CreatedSidecar {
            id: sidecar.id.clone(),
            token,
            sidecar,
        },
    ))
}

/// List sidecars, newest first.
#[utoipa::path(
    get,
    path = "/api/admin/v1/sidecars",
    tag = "sidecars",
    responses(
        (status = 200, body = SidecarList),
        (status = 401, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn list_sidecars(
    State(state): State<AdminState>,
    Admin(_admin): Admin,
) -> Result<Json<SidecarList>, AdminError> {
    Ok(Json(SidecarList {
        items: state.db.list_sidecars().await?,
    }))
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct BudgetLeaseList {
    pub items: Vec<BudgetLease>,
}

/// Revoke a sidecar's token: its sync requests are refused (401) from now on. Allowances of
/// shared budgets it holds stay counted until their period ends.
#[utoipa::path(
    post,
    path = "/api/admin/v1/sidecars/{id}/revoke",
    tag = "sidecars",
    params(("id" = String, Path, description = "Sidecar id (`sc_…`)")),
    responses(
        (status = 200, body = Sidecar),
        (status = 401, body = AdminErrorBody),
        (status = 404, body = AdminErrorBody),
        (status = 409, description = "Already revoked", body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn revoke_sidecar(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Sidecar>, AdminError> {
    let id = path(id, "sidecar")?;
    let sidecar = state
        .db
        .revoke_sidecar(&id, &actor, now())
        .await
        .map_err(|e| match e {
            DbError::Conflict(m) => {
                AdminError::new(StatusCode::CONFLICT, "sidecar_already_revoked", m)
            }
            other => other.into(),
        })?;
    Ok(Json(sidecar))
}

/// The allowances of a shared (org or project) budget that sidecars hold now, newest bucket
/// first. Their sum per bucket never exceeds the limit at the time of each grant.
#[utoipa::path(
    get,
    path = "/api/admin/v1/budgets/{id}/leases",
    tag = "budgets",
    params(("id" = String, Path, description = "Budget id (`bud_…`)")),
    responses(
        (status = 200, body = BudgetLeaseList),
        (status = 401, body = AdminErrorBody),
        (status = 404, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn list_budget_leases(
    State(state): State<AdminState>,
    Admin(_admin): Admin,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<BudgetLeaseList>, AdminError> {
    let id = path(id, "budget")?;
    Ok(Json(BudgetLeaseList {
        items: state.db.list_budget_leases(&id).await?,
    }))
}

// ----- admin tokens --------------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAdminToken {
    /// 1 to 100 printable characters (trimmed).
    pub name: String,
}

/// A new admin token. The token is shown **once**; only its SHA-256 hash is stored.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct CreatedAdminToken {
    pub id: String,
    pub name: String,
    /// `roony_at_<64 hex>`: send as `Authorization: Bearer <token>`.
    pub token: String,
    pub created_at: i64,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct AdminTokenList {
    pub items: Vec<AdminToken>,
}

/// Create an admin token; returns it once.
#[utoipa::path(
    post,
    path = "/api/admin/v1/admin_tokens",
    tag = "admin_tokens",
    request_body = CreateAdminToken,
    responses(
        (status = 201, body = CreatedAdminToken),
        (status = 400, body = AdminErrorBody),
        (status = 401, body = AdminErrorBody),
        (status = 415, body = AdminErrorBody),
        (status = 422, description = "`invalid_name`, or a malformed body", body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn create_admin_token(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    req: Result<ApiJson<CreateAdminToken>, ApiError>,
) -> Result<Response, AdminError> {
    let req = body(req)?;
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(AdminError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_name",
            "name must be 1 to 100 printable characters",
        )
        .with_field("name"));
    }
    let token = super::generate_admin_token();
    let key = crate::auth::from_plaintext(&token).map_err(AdminError::internal)?;
    let created = state
        .db
        .create_admin_token(name, &key, &actor, now())
        .await?;
    Ok(no_store(
        StatusCode::CREATED,
        CreatedAdminToken {
            id: created.id,
            name: created.name,
            token,
            created_at: created.created_at,
        },
    ))
}

/// List admin tokens, newest first (never a token or its hash).
#[utoipa::path(
    get,
    path = "/api/admin/v1/admin_tokens",
    tag = "admin_tokens",
    responses(
        (status = 200, body = AdminTokenList),
        (status = 401, body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn list_admin_tokens(
    State(state): State<AdminState>,
    Admin(_admin): Admin,
) -> Result<Json<AdminTokenList>, AdminError> {
    Ok(Json(AdminTokenList {
        items: state.db.list_admin_tokens().await?,
    }))
}

/// Revoke an admin token: its requests are refused (401) from now on. The token making the
/// request may revoke itself; the only active token cannot be revoked.
#[utoipa::path(
    post,
    path = "/api/admin/v1/admin_tokens/{id}/revoke",
    tag = "admin_tokens",
    params(("id" = String, Path, description = "Admin token id")),
    responses(
        (status = 200, body = AdminToken),
        (status = 401, body = AdminErrorBody),
        (status = 404, body = AdminErrorBody),
        (status = 409, description = "`admin_token_already_revoked`, or `last_admin_token`: it is the only active token", body = AdminErrorBody),
    ),
    security(("admin_token" = []))
)]
async fn revoke_admin_token(
    State(state): State<AdminState>,
    Admin(actor): Admin,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<AdminToken>, AdminError> {
    let id = path(id, "admin_token")?;
    match state.db.revoke_admin_token(&id, &actor, now()).await? {
        AdminTokenRevoke::Revoked(token) => Ok(Json(token)),
        AdminTokenRevoke::AlreadyRevoked(_) => Err(AdminError::new(
            StatusCode::CONFLICT,
            "admin_token_already_revoked",
            "the admin token is already revoked",
        )),
        AdminTokenRevoke::LastActive => Err(AdminError::new(
            StatusCode::CONFLICT,
            "last_admin_token",
            "the only active admin token cannot be revoked; create another one first",
        )),
    }
}

// ----- the app -------------------------------------------------------------------------

struct SecurityAddon;

impl Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An admin API token"))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Roony admin API",
        description = "The control plane: organizations, projects, agents and their keys, policies, budgets, approvals and the ledger. Amounts are integer minor units with an ISO 4217 currency; times are Unix seconds.",
        license(name = "Apache-2.0"),
    ),
    modifiers(&SecurityAddon),
    tags(
        (name = "organizations"),
        (name = "projects"),
        (name = "agents", description = "Agents, keys, freezing"),
        (name = "policies", description = "Versioned policies"),
        (name = "budgets", description = "Budgets of organizations, projects and agents"),
        (name = "ledger", description = "Intents, decisions, approvals"),
        (name = "settlement", description = "Stripe authorizations, discrepancies and reconciliation"),
        (name = "audit", description = "The audit trail"),
        (name = "sidecars", description = "Sidecar identities for sync"),
        (name = "admin_tokens", description = "Admin API tokens"),
    )
)]
struct AdminDoc;

fn api_router() -> OpenApiRouter<AdminState> {
    OpenApiRouter::with_openapi(AdminDoc::openapi())
        .routes(routes!(create_organization, list_organizations))
        .routes(routes!(create_project, list_projects))
        .routes(routes!(create_agent, list_agents))
        .routes(routes!(get_agent))
        .routes(routes!(list_agent_keys))
        .routes(routes!(rotate_agent_key))
        .routes(routes!(revoke_agent_key))
        .routes(routes!(freeze_agent))
        .routes(routes!(unfreeze_agent))
        .routes(routes!(put_policy, get_policy))
        .routes(routes!(list_policy_revisions))
        .routes(routes!(set_budget, list_budgets))
        .routes(routes!(delete_budget))
        .routes(routes!(list_budget_leases))
        .routes(routes!(list_intents))
        .routes(routes!(get_intent))
        .routes(routes!(approve_intent))
        .routes(routes!(deny_intent))
        .routes(routes!(list_decisions))
        .routes(routes!(list_authorizations))
        .routes(routes!(list_discrepancies))
        .routes(routes!(resolve_discrepancy))
        .routes(routes!(reconcile))
        .routes(routes!(list_reconciliations))
        .routes(routes!(get_reconciliation))
        .routes(routes!(list_audit_events))
        .routes(routes!(create_sidecar, list_sidecars))
        .routes(routes!(revoke_sidecar))
        .routes(routes!(create_admin_token, list_admin_tokens))
        .routes(routes!(revoke_admin_token))
}

/// The admin API's OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_router().into_openapi()
}

/// The committed form of the spec (`openapi/roony-admin.json`).
pub fn openapi_json() -> String {
    openapi().to_pretty_json().unwrap_or_default() + "\n"
}

/// The control plane's HTTP app: the admin API, `/api/admin/v1/openapi.json`, the sync
/// endpoints (`/api/sync/v1/bundle`, `…/events`, `…/leases`) and `/healthz`.
pub fn router(db: ControlDb) -> Router {
    let (_, stopping) = tokio::sync::watch::channel(false);
    router_with_stop(db, stopping)
}

/// [`router`], with long-polls ending when `stopping` becomes `true`.
pub fn router_with_stop(db: ControlDb, stopping: tokio::sync::watch::Receiver<bool>) -> Router {
    let audit = super::audit::RequestAudit::new(db.clone());
    router_with_audit(db, stopping, audit)
}

/// [`router_with_stop`], every request audited through `audit` (flush it after serving).
pub fn router_with_audit(
    db: ControlDb,
    stopping: tokio::sync::watch::Receiver<bool>,
    audit: super::audit::RequestAudit,
) -> Router {
    let dashboard = super::dashboard::DashState::new(db.clone());
    router_with_dashboard(db, stopping, audit, dashboard)
}

/// [`router_with_audit`] with the dashboard's state given (e.g. an armed setup token).
pub fn router_with_dashboard(
    db: ControlDb,
    stopping: tokio::sync::watch::Receiver<bool>,
    audit: super::audit::RequestAudit,
    dashboard: super::dashboard::DashState,
) -> Router {
    let (router, spec) = api_router().split_for_parts();
    let spec_json = spec.to_pretty_json().unwrap_or_default();
    router
        .route(
            "/api/admin/v1/openapi.json",
            axum::routing::get(move || {
                let body = spec_json.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], body) }
            }),
        )
        .route(
            crate::sync::wire::BUNDLE_PATH,
            axum::routing::get(super::sync::bundle),
        )
        .route(
            crate::sync::wire::EVENTS_PATH,
            axum::routing::post(super::sync::events).layer(axum::extract::DefaultBodyLimit::max(
                super::sync::MAX_SYNC_BODY_BYTES,
            )),
        )
        .route(
            crate::sync::wire::LEASES_PATH,
            axum::routing::post(super::sync::leases).layer(axum::extract::DefaultBodyLimit::max(
                super::sync::MAX_SYNC_BODY_BYTES,
            )),
        )
        .route(
            crate::sync::wire::UPDATES_PATH,
            axum::routing::get(super::sync::updates),
        )
        .route(super::relay::ROUTE, axum::routing::any(super::relay::relay))
        .route(
            super::webhooks::PATH,
            axum::routing::post(super::webhooks::stripe).layer(
                axum::extract::DefaultBodyLimit::max(super::webhooks::MAX_BODY_BYTES),
            ),
        )
        .route("/healthz", axum::routing::get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(AdminState { db, stopping })
        .merge(super::dashboard::router(dashboard))
        .layer(axum::middleware::from_fn(
            super::guard::reject_control_characters,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(CatchPanicLayer::custom(|_| {
            AdminError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "internal error",
            )
            .into_response()
        }))
        // The span records the path only: a query can carry secrets (the OAuth callback's
        // `code` and `state`).
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(
                |req: &axum::http::Request<axum::body::Body>| {
                    tracing::debug_span!(
                        "request",
                        method = %req.method(),
                        path = %req.uri().path(),
                        version = ?req.version(),
                    )
                },
            ),
        )
        // Outermost: sees every response (panics and body-limit rejections included).
        .layer(axum::middleware::from_fn_with_state(
            audit,
            super::audit::audit_request,
        ))
}

async fn healthz(State(state): State<AdminState>) -> Response {
    match state.db.ping().await {
        Ok(_) => Json(serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}))
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "control plane database unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({"status": "database_unavailable"})),
            )
                .into_response()
        }
    }
}

/// Unknown paths: the admin API's JSON error under `/api/`, the dashboard's page elsewhere.
async fn not_found(uri: axum::http::Uri) -> Response {
    if uri.path().starts_with("/api/") || uri.path() == "/healthz" {
        AdminError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint").into_response()
    } else {
        super::dashboard::not_found_page()
    }
}

async fn method_not_allowed() -> AdminError {
    AdminError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}
