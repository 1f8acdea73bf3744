//! The control plane's side of sync: `GET /api/sync/v1/bundle`, the long-poll that serves
//! each sidecar the signed policy bundle of its project (see `crate::sync::wire` and
//! docs/design.md, "Sync protocol").
//!
//! A change is noticed in two ways: this process's own writes wake waiting requests at once
//! (`ControlDb::subscribe_changes`), and the configuration revision is re-read every
//! [`POLL_INTERVAL`], so a write through another replica on the same database is seen within
//! that interval.

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::api::{AdminError, AdminState};
use crate::sync::wire::{self, Bundle};

/// How often a waiting request re-reads the configuration revision.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Deserialize)]
pub struct BundleParams {
    /// Seconds to wait for a change when `If-None-Match` names the current bundle (0 to
    /// [`wire::MAX_WAIT_SECONDS`]; larger values are capped).
    pub wait: Option<u64>,
}

fn unauthorized(code: &str, message: &str) -> AdminError {
    AdminError::new(StatusCode::UNAUTHORIZED, code, message)
}

/// `GET /api/sync/v1/bundle`.
pub async fn bundle(
    State(state): State<AdminState>,
    headers: HeaderMap,
    q: Result<Query<BundleParams>, QueryRejection>,
) -> Result<Response, AdminError> {
    let Some(token) = crate::api::bearer(&headers).filter(|t| !t.is_empty()) else {
        return Err(unauthorized(
            "missing_sidecar_token",
            "send the sidecar token as Authorization: Bearer <token>",
        ));
    };
    let sidecar = match state.db.find_sidecar(&crate::auth::key_id(token)).await? {
        Some(s) if !s.revoked && crate::auth::verify(token, &s.token_hash) => s,
        _ => {
            return Err(unauthorized(
                "invalid_sidecar_token",
                "the sidecar token is not valid",
            ));
        }
    };
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
        let mut bundle = Bundle {
            format: wire::FORMAT,
            revision,
            etag: String::new(),
            generated_at: super::unix_now(),
            project_id: sidecar.project_id.clone(),
            agents,
            budgets: Vec::new(),
            approvals: Vec::new(),
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
