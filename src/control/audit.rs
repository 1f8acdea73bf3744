//! Request auditing for the control plane: every request (admin API, sync, Stripe
//! webhooks, health checks, unknown paths) becomes one `http.request` event of the audit
//! chain (`crate::audit`), besides the domain events its handler writes.
//!
//! The event names the actor by the key id of its bearer credential (`admin_token` on the
//! admin API, `sidecar` on the sync endpoints; `crate::auth::key_id`, never the secret),
//! `stripe` for the webhook endpoint, `anonymous` otherwise; the matched route, the path
//! (never the query string), the status and the request id (`x-request-id`: the client's
//! when acceptable, else generated; returned on the response and used by the admin API's
//! domain events). Bodies are never recorded.
//!
//! The middleware only queues the event once the response head is ready (long-polls are
//! audited when they answer); one writer task per router appends the queued events in
//! batches, one transaction per batch, off the response path.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::db::ControlDb;
use crate::audit::Entry;
use crate::audit::http::{RequestId, bearer_key_id, clean_path, outcome, request_id};

/// Events waiting for the writer at most (a full queue delays responses: back-pressure
/// rather than lost events).
const QUEUE: usize = 8192;
/// Events appended per transaction at most.
const BATCH: usize = 256;

enum Msg {
    Event(Box<Entry>),
    Flush(oneshot::Sender<()>),
}

/// The control plane's request auditor (cheap to clone; one writer task, started with the
/// first request).
#[derive(Clone)]
pub struct RequestAudit {
    inner: Arc<Inner>,
}

struct Inner {
    db: ControlDb,
    tx: mpsc::Sender<Msg>,
    rx: Mutex<Option<mpsc::Receiver<Msg>>>,
}

impl std::fmt::Debug for RequestAudit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestAudit").finish_non_exhaustive()
    }
}

impl RequestAudit {
    pub fn new(db: ControlDb) -> RequestAudit {
        let (tx, rx) = mpsc::channel(QUEUE);
        RequestAudit {
            inner: Arc::new(Inner {
                db,
                tx,
                rx: Mutex::new(Some(rx)),
            }),
        }
    }

    fn start(&self) {
        let rx = match self.inner.rx.lock() {
            Ok(mut r) => r.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(rx) = rx {
            tokio::spawn(writer(self.inner.db.clone(), rx));
        }
    }

    async fn send(&self, msg: Msg) -> bool {
        self.start();
        self.inner.tx.send(msg).await.is_ok()
    }

    /// Queues one event.
    pub async fn record(&self, entry: Entry) {
        if !self.send(Msg::Event(Box::new(entry))).await {
            tracing::error!("the audit writer has stopped; request event lost");
        }
    }

    /// Waits until every event queued before was written (or failed).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(Msg::Flush(tx)).await {
            let _ = rx.await;
        }
    }
}

async fn writer(db: ControlDb, mut rx: mpsc::Receiver<Msg>) {
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::new();
        let mut waiting = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Event(e) => batch.push(*e),
                Msg::Flush(reply) => waiting.push(reply),
            }
            if batch.len() >= BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        write(&db, batch).await;
        for reply in waiting {
            let _ = reply.send(());
        }
    }
}

/// Appends a batch, retrying transient failures (lock timeouts, deadlocks) a few times.
async fn write(db: &ControlDb, batch: Vec<Entry>) {
    if batch.is_empty() {
        return;
    }
    let mut delay = std::time::Duration::from_millis(50);
    for attempt in 1..=5 {
        match db.append_audit_events(batch.clone()).await {
            Ok(()) => return,
            Err(e) if attempt < 5 => {
                tracing::warn!(error = %e, attempt, "cannot append request audit events; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => {
                tracing::error!(error = %e, events = batch.len(), "cannot append request audit events; lost");
            }
        }
    }
}

/// Who sent a request, by path: `(actor_type, actor_id)`.
fn actor(path: &str, headers: &axum::http::HeaderMap) -> (&'static str, String) {
    let anonymous = ("anonymous", "anonymous".to_string());
    if path == super::webhooks::PATH {
        return ("stripe", "stripe".to_string());
    }
    let kind = if path.starts_with(super::api::PREFIX) {
        "admin_token"
    } else if path.starts_with("/api/sync/") {
        "sidecar"
    } else {
        // The dashboard: the session's public id, never its secret.
        return match super::dashboard::auth::cookie(headers, super::dashboard::auth::SESSION_COOKIE)
        {
            Some(token) if !token.is_empty() => ("admin_session", crate::auth::key_id(&token)),
            _ => anonymous,
        };
    };
    match bearer_key_id(headers) {
        Some(id) => (kind, id),
        None => anonymous,
    }
}

/// The middleware (see the module documentation).
pub async fn audit_request(
    State(audit): State<RequestAudit>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let request_id = request_id(req.headers());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "(unmatched)".into());
    let path = clean_path(&req);
    let (actor_type, actor_id) = actor(req.uri().path(), req.headers());
    let method = req.method().as_str().to_string();
    req.extensions_mut().insert(RequestId(request_id.clone()));
    let mut resp = next.run(req).await;
    crate::audit::http::set_request_id(&mut resp, &request_id);
    let status = resp.status().as_u16();
    let entry = Entry {
        id: crate::service::ids::new_id("aud"),
        at: crate::audit::http::unix_now(),
        actor_type: actor_type.into(),
        actor_id,
        action: "http.request".into(),
        target_type: "route".into(),
        target_id: route.clone(),
        outcome: outcome(status).into(),
        request_id: Some(request_id),
        details: json!({
            "method": method,
            "route": route,
            "path": path,
            "status": status,
            "duration_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }),
    };
    audit.record(entry).await;
    resp
}
