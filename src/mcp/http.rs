//! MCP over streamable HTTP at `/mcp`, behind the agent's bearer key.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use rmcp::model::RequestStateCodec;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

use super::RoonyMcp;
use crate::service::{AuthError, Service};

/// Hosts accepted in the `Host` header by default (DNS-rebinding protection).
pub const DEFAULT_ALLOWED_HOSTS: &[&str] = &["localhost", "127.0.0.1", "::1"];

#[derive(Clone, Debug)]
pub struct McpHttpConfig {
    /// `Host` values accepted; add the service name when the sidecar is reached by name
    /// (e.g. `roony-sidecar` in a pod).
    pub allowed_hosts: Vec<String>,
}

impl Default for McpHttpConfig {
    fn default() -> Self {
        McpHttpConfig {
            allowed_hosts: DEFAULT_ALLOWED_HOSTS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

/// A codec with a fresh random key: confirmations do not outlive the process.
pub fn new_codec() -> Result<Arc<RequestStateCodec>, String> {
    let mut key = vec![0u8; 32];
    rand::rng().fill_bytes(&mut key);
    RequestStateCodec::try_new(key)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// The `/mcp` router. Every request must carry `Authorization: Bearer <agent key>`; the
/// agent it resolves to is what the tools act for (tokens are Roony's own and never passed on).
pub fn router(service: Service, config: McpHttpConfig) -> Result<axum::Router, String> {
    let codec = new_codec()?;
    let factory_service = service.clone();
    let mcp = StreamableHttpService::new(
        move || Ok(RoonyMcp::new(factory_service.clone(), codec.clone())),
        LocalSessionManager::default().into(),
        StreamableHttpServerConfig::default().with_allowed_hosts(config.allowed_hosts),
    );
    Ok(axum::Router::new()
        .nest_service("/mcp", mcp)
        .route_layer(axum::middleware::from_fn_with_state(service, authenticate)))
}

async fn authenticate(State(service): State<Service>, mut req: Request, next: Next) -> Response {
    // Already authenticated by the rate limiter (`crate::ratelimit`) for this request.
    if let Some(crate::ratelimit::Authenticated(agent)) = req.extensions().get() {
        let agent = agent.clone();
        req.extensions_mut().insert(agent);
        return next.run(req).await;
    }
    let presented = crate::api::bearer(req.headers());
    match service.authenticate(presented) {
        Ok(agent) => {
            req.extensions_mut().insert(agent);
            next.run(req).await
        }
        Err(e) => {
            let code = match e {
                AuthError::Missing => "missing_agent_key",
                AuthError::Invalid => "invalid_agent_key",
            };
            let mut resp = (
                StatusCode::UNAUTHORIZED,
                axum::Json(serde_json::json!({"error": {"code": code, "message": e.to_string()}})),
            )
                .into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"roony\""),
            );
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use rmcp::model::SealOptions;

    #[test]
    #[allow(clippy::disallowed_methods)] // a plain thread in a plain test
    fn confirmation_state_is_bound_to_the_agent_and_expires() {
        let codec = super::new_codec().unwrap();
        let sealed = codec
            .seal_json_with(
                &serde_json::json!({"intent_id": "pur_1", "request_hash": "h"}),
                &SealOptions::new()
                    .associated_data(b"agt_a")
                    .ttl(std::time::Duration::from_secs(300)),
            )
            .unwrap();
        assert!(
            codec
                .open_json_with::<serde_json::Value>(&sealed, b"agt_a")
                .is_ok()
        );
        assert!(
            codec
                .open_json_with::<serde_json::Value>(&sealed, b"agt_b")
                .is_err()
        );
        // A different process (key) cannot open it either.
        let other = super::new_codec().unwrap();
        assert!(
            other
                .open_json_with::<serde_json::Value>(&sealed, b"agt_a")
                .is_err()
        );
        let expired = codec
            .seal_json_with(
                &serde_json::json!({}),
                &SealOptions::new()
                    .associated_data(b"agt_a")
                    .ttl(std::time::Duration::from_millis(1)),
            )
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(
            codec
                .open_json_with::<serde_json::Value>(&expired, b"agt_a")
                .is_err()
        );
    }
}
