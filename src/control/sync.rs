//! The control plane's side of sync (see `crate::sync::wire` and docs/design.md, "Sync
//! protocol"), authenticated with sidecar tokens:
//!
//! - `GET /api/sync/v1/bundle`: the long-poll that serves each sidecar the signed bundle of
//!   its project (agents, keys, policies, budgets, administrators' approvals);
//! - `POST /api/sync/v1/events`: a sidecar's outbox, applied to the ledger
//!   (`ControlDb::apply_events`);
//! - `POST /api/sync/v1/leases`: allowances of shared budgets (`ControlDb::grant_lease`).
//!
//! A change is noticed in two ways: this process's own writes wake waiting requests at once
//! (`ControlDb::subscribe_changes`), and the configuration revision is re-read every
//! [`POLL_INTERVAL`], so a write through another replica on the same database is seen within
//! that interval.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::api::{AdminError, AdminState};
use super::db::SidecarAuth;
use crate::sync::wire::{self, Bundle, EventAck, EventBatch, LeaseRequest, LeaseResponse};

/// How often a waiting request re-reads the configuration revision.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Deserialize)]
pub struct BundleParams {
    /// Seconds to wait for a change when `If-None-Match` names the current bundle (0 to
    /// [`wire::MAX_WAIT_SECONDS`]; larger values are capped).
    pub wait: Option<u64>,
}

/// Largest body of an events or leases request: room for [`wire::MAX_EVENTS_PER_BATCH`]
/// events of up to 4 KiB each.
pub const MAX_SYNC_BODY_BYTES: usize = wire::MAX_EVENTS_PER_BATCH * 4 * 1024;

fn unauthorized(code: &str, message: &str) -> AdminError {
    AdminError::new(StatusCode::UNAUTHORIZED, code, message)
}

fn bad_request(code: &str, message: impl Into<String>) -> AdminError {
    AdminError::new(StatusCode::BAD_REQUEST, code, message)
}

/// The sidecar a request's `Authorization: Bearer <sidecar token>` names, and the token:
/// missing → `401 missing_sidecar_token`; unknown, wrong or revoked → `401
/// invalid_sidecar_token`.
pub(crate) async fn authenticate<'h>(
    state: &AdminState,
    headers: &'h HeaderMap,
) -> Result<(SidecarAuth, &'h str), AdminError> {
    let Some(token) = crate::api::bearer(headers).filter(|t| !t.is_empty()) else {
        return Err(unauthorized(
            "missing_sidecar_token",
            "send the sidecar token as Authorization: Bearer <token>",
        ));
    };
    match state.db.find_sidecar(&crate::auth::key_id(token)).await? {
        Some(s) if !s.revoked && crate::auth::verify(token, &s.token_hash) => Ok((s, token)),
        _ => Err(unauthorized(
            "invalid_sidecar_token",
            "the sidecar token is not valid",
        )),
    }
}

/// Parses a sync request body: `400 invalid_json` (not JSON), `400 unsupported_format`
/// (`format` is not [`wire::FORMAT`]), `422 invalid_body` (not the expected shape), `413
/// body_too_large`.
fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, AdminError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AdminError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body is larger than {MAX_SYNC_BODY_BYTES} bytes"),
            )
        } else {
            bad_request("invalid_body", "the body could not be read")
        }
    })?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| bad_request("invalid_json", format!("the body is not valid json: {e}")))?;
    let format = value.get("format").cloned().unwrap_or_default();
    if format.as_u64() != Some(u64::from(wire::FORMAT)) {
        return Err(bad_request(
            "unsupported_format",
            format!(
                "format {format} is not supported (expected {})",
                wire::FORMAT
            ),
        ));
    }
    serde_json::from_value(value).map_err(|e| {
        AdminError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            format!("the body does not match the schema: {e}"),
        )
    })
}

/// `POST /api/sync/v1/events`: a batch of a sidecar's outbox, applied in one transaction;
/// the answer settles every event of the batch (see `ControlDb::apply_events`).
pub async fn events(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<EventAck>, AdminError> {
    let (sidecar, _) = authenticate(&state, &headers).await?;
    let batch: EventBatch = parse_body(body)?;
    if batch.events.len() > wire::MAX_EVENTS_PER_BATCH {
        return Err(AdminError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("at most {} events per batch", wire::MAX_EVENTS_PER_BATCH),
        ));
    }
    let ack = state
        .db
        .apply_events(&sidecar, &batch.events, super::unix_now())
        .await?;
    tracing::debug!(
        sidecar = %sidecar.id,
        accepted = ack.accepted,
        duplicates = ack.duplicates,
        rejected = ack.rejected.len(),
        "applied events"
    );
    Ok(Json(ack))
}

/// `POST /api/sync/v1/leases`: the allowances of shared budgets a sidecar wants to hold;
/// each is granted in its own transaction (see `ControlDb::grant_lease`).
pub async fn leases(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<LeaseResponse>, AdminError> {
    let (sidecar, _) = authenticate(&state, &headers).await?;
    let req: LeaseRequest = parse_body(body)?;
    if req.leases.len() > wire::MAX_LEASES_PER_REQUEST {
        return Err(bad_request(
            "too_many_leases",
            format!(
                "at most {} leases per request",
                wire::MAX_LEASES_PER_REQUEST
            ),
        ));
    }
    for want in &req.leases {
        if want.want < 0 {
            return Err(bad_request("invalid_want", "want must not be negative"));
        }
        if want.budget_id.is_empty() || want.budget_id.len() > 128 {
            return Err(bad_request(
                "invalid_budget_id",
                "budget_id must be 1 to 128 characters",
            ));
        }
    }
    let now = super::unix_now();
    let mut grants = Vec::with_capacity(req.leases.len());
    for want in &req.leases {
        grants.push(state.db.grant_lease(&sidecar, req.seq, want, now).await?);
    }
    Ok(Json(LeaseResponse { leases: grants }))
}

/// `GET /api/sync/v1/bundle`.
pub async fn bundle(
    State(state): State<AdminState>,
    headers: HeaderMap,
    q: Result<Query<BundleParams>, QueryRejection>,
) -> Result<Response, AdminError> {
    let (sidecar, token) = authenticate(&state, &headers).await?;
    let Query(params) =
        q.map_err(|e| AdminError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let wait = Duration::from_secs(params.wait.unwrap_or(0).min(wire::MAX_WAIT_SECONDS));
    let known = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.trim()
                .trim_start_matches("W/")
                .trim_matches('"')
                .to_string()
        });
    let deadline = tokio::time::Instant::now() + wait;
    let mut changes = state.db.subscribe_changes();
    let mut stopping = state.stopping.clone();
    let mut stop_alive = true;
    loop {
        changes.borrow_and_update();
        // Revision first, content second: the content is at least as new as the revision.
        let revision = state.db.config_revision().await?;
        let agents = state.db.bundle_agents(&sidecar.project_id).await?;
        let budgets = state.db.bundle_budgets(&sidecar.project_id).await?;
        let approvals = state.db.bundle_approvals(&sidecar.project_id).await?;
        let mut bundle = Bundle {
            format: wire::FORMAT,
            revision,
            etag: String::new(),
            generated_at: super::unix_now(),
            project_id: sidecar.project_id.clone(),
            agents,
            budgets,
            approvals,
            stripe: super::connect::bundle_status(&state.db, &sidecar.org_id)
                .await?
                .map(|status| wire::BundleStripe { status }),
            signature: String::new(),
        };
        let etag = wire::content_etag(&bundle);
        if known.as_deref() != Some(etag.as_str()) {
            bundle.etag = etag;
            wire::sign(&mut bundle, token);
            tracing::debug!(sidecar = %sidecar.id, revision, "serving bundle");
            return Ok(with_etag(
                (StatusCode::OK, axum::Json(&bundle)).into_response(),
                &bundle.etag,
            ));
        }
        // Unchanged: wait until the revision moves, the wait ends, or the server stops.
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline || *stopping.borrow() {
                return Ok(with_etag(StatusCode::NOT_MODIFIED.into_response(), &etag));
            }
            let step = POLL_INTERVAL.min(deadline - now);
            let woke = tokio::select! {
                r = changes.changed() => r.is_ok(),
                r = stopping.changed(), if stop_alive => {
                    stop_alive = r.is_ok();
                    false
                }
                _ = tokio::time::sleep(step) => false,
            };
            if woke || state.db.config_revision().await? != revision {
                break;
            }
        }
        // Something changed: a token revoked meanwhile ends the wait with 401.
        authenticate(&state, &headers).await?;
    }
}

fn with_etag(mut resp: Response, etag: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(&format!("\"{etag}\"")) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[derive(Deserialize)]
pub struct UpdatesParams {
    /// Updates with a larger seq (default 0: from the beginning).
    pub after: Option<i64>,
    /// Seconds to wait when there is none yet (0 to [`wire::MAX_WAIT_SECONDS`]; capped).
    pub wait: Option<u64>,
    /// Most updates to return (1 to [`wire::MAX_UPDATES_PER_FEED`]; default and cap 500).
    pub limit: Option<u64>,
}

/// `GET /api/sync/v1/updates?after=<seq>&wait=<s>&limit=<n>`: the money state of the
/// project's intents at Stripe, oldest first. Without any newer than `after`, waits up to
/// `wait` seconds (woken by this process's commits, re-checked every [`POLL_INTERVAL`] for
/// other replicas'), then answers an empty list with `next_after = after`.
pub async fn updates(
    State(state): State<AdminState>,
    headers: HeaderMap,
    q: Result<Query<UpdatesParams>, QueryRejection>,
) -> Result<Json<wire::UpdateFeed>, AdminError> {
    let (sidecar, _) = authenticate(&state, &headers).await?;
    let Query(params) =
        q.map_err(|e| AdminError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let after = params.after.unwrap_or(0).max(0);
    let limit = params
        .limit
        .unwrap_or(wire::MAX_UPDATES_PER_FEED as u64)
        .clamp(1, wire::MAX_UPDATES_PER_FEED as u64);
    let limit = i64::try_from(limit).unwrap_or(500);
    let wait = Duration::from_secs(params.wait.unwrap_or(0).min(wire::MAX_WAIT_SECONDS));
    let deadline = tokio::time::Instant::now() + wait;
    let mut woken = state.db.subscribe_updates();
    let mut stopping = state.stopping.clone();
    let mut stop_alive = true;
    loop {
        woken.borrow_and_update();
        let updates = state
            .db
            .list_intent_updates(&sidecar.project_id, after, limit)
            .await?;
        if let Some(last) = updates.last() {
            return Ok(Json(wire::UpdateFeed {
                format: wire::FORMAT,
                next_after: last.seq,
                updates,
            }));
        }
        let now = tokio::time::Instant::now();
        if now >= deadline || *stopping.borrow() {
            return Ok(Json(wire::UpdateFeed {
                format: wire::FORMAT,
                updates: Vec::new(),
                next_after: after,
            }));
        }
        let step = POLL_INTERVAL.min(deadline - now);
        tokio::select! {
            _ = woken.changed() => {}
            r = stopping.changed(), if stop_alive => stop_alive = r.is_ok(),
            _ = tokio::time::sleep(step) => {}
        }
    }
}
