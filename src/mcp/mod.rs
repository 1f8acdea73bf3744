//! The MCP interface (rmcp): purchase tools for LLM agents. The only module that knows MCP.
//! Tools call the same service layer as the OpenAPI, so both give the same decisions,
//! budgets and idempotency.
//!
//! Human confirmation (policy `require_confirmation_above`): clients on 2025-11-25 that
//! declared elicitation are asked with `elicitation/create`; clients on 2026-07-28 get an
//! `InputRequiredResult` with a sealed `requestState` (HMAC, bound to the agent, the intent
//! id and the request, 5 minutes) and retry; clients that can do neither get
//! `pending_approval`. The confirmation is single-use: it carries the intent id, and a second
//! use replays that intent instead of buying again. Only a yes/no is ever asked; never card
//! data.

pub mod bridge;
pub mod http;

use std::sync::Arc;
use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::{InputResponses, RequestState, schema_for_output};
use rmcp::handler::server::wrapper::{Json, Parameters};
use rmcp::model::{
    CallToolResponse, CallToolResult, ContentBlock, ElicitRequest, ElicitRequestParams,
    ElicitResult, ElicitationAction, ElicitationSchema, Implementation, InputRequest,
    InputRequests, InputRequiredResult, ProtocolVersion, RequestStateCodec, SealOptions,
    ServerCapabilities, ServerConfig,
};
use rmcp::service::{ElicitationError, RequestContext};
use rmcp::{ErrorData, RoleServer, ServerHandler, tool, tool_handler, tool_router};
use serde::{Deserialize, Serialize};

use crate::domain::intent::PurchaseRequest;
use crate::domain::money::Money;
use crate::policy::{Outcome, ReasonCode};
use crate::service::{
    AgentIdentity, BudgetView, Confirmation, IntentPage, IntentView, PurchaseOptions, Service,
    ServiceError, StatusView, ids,
};

/// How long a human has to answer a confirmation.
pub const CONFIRMATION_TTL: Duration = Duration::from_secs(300);

/// The yes/no the human is asked. Never anything else (and never card data).
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Confirm {
    /// Approve this purchase?
    pub approve: bool,
}
rmcp::elicit_safe!(Confirm);

/// What a sealed `requestState` carries between the two rounds of a 2026-07-28 call.
#[derive(Debug, Serialize, Deserialize)]
struct PendingConfirmation {
    intent_id: String,
    request_hash: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct IntentIdParams {
    /// The purchase intent id (`pur_…`) returned by request_purchase.
    pub id: String,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
pub struct ListParams {
    /// How many to return, 1 to 100 (default 20).
    #[serde(default)]
    pub limit: Option<u32>,
    /// Return purchases older than this intent id (`next_cursor` of the previous page).
    #[serde(default)]
    pub starting_after: Option<String>,
}

#[derive(Clone)]
pub struct RoonyMcp {
    service: Service,
    codec: Arc<RequestStateCodec>,
    tool_router: ToolRouter<RoonyMcp>,
}

impl std::fmt::Debug for RoonyMcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoonyMcp").finish_non_exhaustive()
    }
}

fn agent_of(ctx: &RequestContext<RoleServer>) -> Result<AgentIdentity, ErrorData> {
    ctx.extensions
        .get::<::http::request::Parts>()
        .and_then(|p| p.extensions.get::<AgentIdentity>())
        .cloned()
        .ok_or_else(|| ErrorData::invalid_request("unauthenticated: no agent key", None))
}

/// A tool error the model sees: a stable code and a message.
fn tool_error(code: &str, message: impl Into<String>) -> CallToolResult {
    let message = message.into();
    let mut r = CallToolResult::structured_error(serde_json::json!({
        "error": {"code": code, "message": message}
    }));
    r.content = vec![ContentBlock::text(format!("{code}: {message}"))];
    r
}

fn service_error(e: ServiceError) -> CallToolResult {
    match e {
        ServiceError::Invalid(v) => tool_error(v.code, format!("{}: {}", v.field, v.message)),
        ServiceError::NotFound => tool_error("intent_not_found", "no such purchase intent"),
        ServiceError::IdempotencyMismatch => tool_error(
            "idempotency_key_reused",
            "this idempotency key was already used with a different purchase; use a new key",
        ),
        ServiceError::NotCancelable(s) => tool_error(
            "intent_not_cancelable",
            format!("the purchase is {s} and cannot be canceled"),
        ),
        ServiceError::InProgress => tool_error(
            "intent_in_progress",
            "the purchase is still being processed; call get_purchase in a moment",
        ),
        ServiceError::Stripe(err) => {
            tracing::warn!(error = %err, "stripe error surfaced to agent");
            tool_error(
                "stripe_unavailable",
                "the card issuer is unavailable; retry shortly with the same idempotency key",
            )
        }
        ServiceError::Internal(m) => {
            tracing::error!(error = %m, "internal error");
            tool_error("internal_error", "internal error; nothing was bought")
        }
    }
}

fn text_error(e: ServiceError) -> String {
    service_error(e)
        .content
        .first()
        .and_then(|c| c.as_text().map(|t| t.text.clone()))
        .unwrap_or_else(|| "internal_error".into())
}

/// One line an LLM can act on, summarizing an intent.
fn summary(v: &IntentView) -> String {
    let amount = crate::domain::money::Currency::parse(&v.currency)
        .map(|c| Money::new(v.amount, c).to_string())
        .unwrap_or_else(|_| format!("{} {}", v.amount, v.currency));
    let reasons = v
        .reasons
        .iter()
        .map(|r| format!("{} ({})", r.message, r.code.as_str()))
        .collect::<Vec<_>>()
        .join("; ");
    let left = v
        .budgets
        .iter()
        .map(|b| {
            let c = crate::domain::money::Currency::parse(&v.currency)
                .unwrap_or(crate::domain::money::Currency::USD);
            format!(
                "{} left: {}",
                b.period.as_str().replace('_', "-"),
                Money::new(b.remaining.max(0), c)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let mut budget = if left.is_empty() {
        String::new()
    } else {
        format!(" Budget {left}.")
    };
    if let Some(r) = v.risk.as_ref().filter(|r| r.score > 0) {
        // Approvals mention an elevated risk score (declines and reviews say it in reasons).
        budget.push_str(&format!(" Risk score {}: {}.", r.score, r.summary()));
    }
    match v.status {
        StatusView::Approved => match &v.card {
            Some(c) if c.number.is_some() => format!(
                "Approved: {amount} at {}. Use the single-use card in `card` (number, exp_month {}, exp_year {}, cvc, billing_zip {}); it can be charged at most once, for up to the approved amount, before it expires.{budget}",
                v.merchant.name, c.exp_month, c.exp_year, c.billing_zip
            ),
            Some(c) => format!(
                "Approved: {amount} at {}; card ending {}.{budget}",
                v.merchant.name, c.last4
            ),
            None => format!("Approved: {amount} at {}.{budget}", v.merchant.name),
        },
        StatusView::PendingApproval => format!(
            "Pending approval: {amount} at {} waits for an administrator; call get_purchase with id {} later. {reasons}",
            v.merchant.name, v.id
        ),
        StatusView::Declined => format!("Declined: {amount} at {}. {reasons}", v.merchant.name),
        StatusView::Failed => format!("Failed: {reasons}"),
        other => format!("{other:?}: {amount} at {}. {reasons}", v.merchant.name).to_lowercase(),
    }
}

fn intent_result(v: IntentView) -> CallToolResult {
    let is_error = matches!(v.status, StatusView::Declined | StatusView::Failed);
    let value = serde_json::to_value(&v).unwrap_or_default();
    let mut r = if is_error {
        CallToolResult::structured_error(value.clone())
    } else {
        CallToolResult::structured(value.clone())
    };
    r.content = vec![
        ContentBlock::text(summary(&v)),
        ContentBlock::text(value.to_string()),
    ];
    r
}

fn confirmation_message(req: &PurchaseRequest) -> String {
    let amount = crate::domain::money::Currency::parse(&req.currency)
        .map(|c| Money::new(req.amount, c).to_string())
        .unwrap_or_else(|_| format!("{} {}", req.amount, req.currency));
    let site = req
        .merchant
        .url
        .as_deref()
        .or(req.merchant.domain.as_deref())
        .map(|u| format!(" ({u})"))
        .unwrap_or_default();
    format!(
        "Your agent wants to spend {amount} at {}{site}: \"{}\". Approve this purchase?",
        req.merchant.name, req.description
    )
}

fn accepted(responses: &Option<rmcp::model::InputResponses>) -> bool {
    let Some(answer) = responses.as_ref().and_then(|r| r.get("confirm")) else {
        return false;
    };
    match ElicitResult::deserialize(answer) {
        Ok(ElicitResult {
            action: ElicitationAction::Accept,
            content: Some(content),
            ..
        }) => content.get("approve") == Some(&serde_json::Value::Bool(true)),
        _ => false,
    }
}

#[tool_router(vis = "pub(crate)")]
impl RoonyMcp {
    pub fn new(service: Service, codec: Arc<RequestStateCodec>) -> RoonyMcp {
        RoonyMcp {
            service,
            codec,
            tool_router: Self::tool_router(),
        }
    }

    /// Request a purchase. Roony checks it against your spending policy and, when approved,
    /// returns a single-use virtual card (number, exp_month, exp_year, cvc, billing_zip)
    /// limited to this amount, this merchant category and country. Amounts are integers in
    /// minor units: 1200 means USD 12.00. A decline is an error result whose reasons say
    /// exactly why and what is left (e.g. "daily budget has USD 12.40 left") — adjust or ask
    /// the user, do not retry the same request. Large purchases may need the user's
    /// confirmation or an administrator's approval (status pending_approval). Pass an
    /// idempotency_key to make retries safe.
    #[tool(
        name = "request_purchase",
        output_schema = schema_for_output::<IntentView>(),
        annotations(
            title = "Request a purchase",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = true
        )
    )]
    async fn request_purchase(
        &self,
        ctx: RequestContext<RoleServer>,
        RequestState(state): RequestState,
        InputResponses(responses): InputResponses,
        Parameters(req): Parameters<PurchaseRequest>,
    ) -> Result<CallToolResponse, ErrorData> {
        let agent = agent_of(&ctx)?;

        // Round two of a 2026-07-28 confirmation: the client retries with our sealed state.
        if let Some(sealed) = state {
            let pending: PendingConfirmation = match self
                .codec
                .open_json_with(&sealed, agent.agent_id.as_bytes())
            {
                Ok(p) => p,
                Err(_) => {
                    return Ok(tool_error(
                        "confirmation_invalid",
                        "the confirmation expired or is not valid; call request_purchase again",
                    )
                    .into());
                }
            };
            let hash = match req.validate(None) {
                Ok(intent) => crate::store::request_hash(&intent),
                Err(e) => return Ok(service_error(e.into()).into()),
            };
            if hash != pending.request_hash {
                return Ok(tool_error(
                    "confirmation_mismatch",
                    "the confirmation was given for a different purchase; call request_purchase again",
                )
                .into());
            }
            let confirmation = if accepted(&responses) {
                Confirmation::Confirmed
            } else {
                Confirmation::Refused
            };
            return Ok(self
                .decide(&agent, req, confirmation, Some(pending.intent_id))
                .await
                .into());
        }

        let preview = match self.service.preview_purchase(&agent, &req) {
            Ok(Some(d)) => d,
            // A retry of a recorded request: replay it without asking again.
            Ok(None) => {
                return Ok(self
                    .decide(&agent, req, Confirmation::NotAsked, None)
                    .await
                    .into());
            }
            Err(e) => return Ok(service_error(e).into()),
        };
        let needs_confirmation = preview.outcome == Outcome::PendingApproval
            && preview
                .reasons
                .iter()
                .any(|r| r.code == ReasonCode::ConfirmationRequired);
        if !needs_confirmation {
            return Ok(self
                .decide(&agent, req, Confirmation::NotAsked, None)
                .await
                .into());
        }
        let can_elicit = ctx
            .client_capabilities()
            .is_some_and(|c| c.elicitation.is_some());
        if !can_elicit {
            return Ok(self
                .decide(&agent, req, Confirmation::NotAsked, None)
                .await
                .into());
        }
        let message = confirmation_message(&req);
        let modern = ctx
            .protocol_version()
            .is_some_and(|v| v >= ProtocolVersion::V_2026_07_28);
        if modern {
            let hash = match req.validate(None) {
                Ok(intent) => crate::store::request_hash(&intent),
                Err(e) => return Ok(service_error(e.into()).into()),
            };
            let pending = PendingConfirmation {
                intent_id: ids::intent_id(),
                request_hash: hash,
            };
            let sealed = self
                .codec
                .seal_json_with(
                    &pending,
                    &SealOptions::new()
                        .associated_data(agent.agent_id.as_bytes())
                        .ttl(CONFIRMATION_TTL),
                )
                .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
            let schema = ElicitationSchema::from_type::<Confirm>()
                .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
            let mut requests = InputRequests::new();
            requests.insert(
                "confirm".into(),
                InputRequest::Elicitation(ElicitRequest::new(
                    ElicitRequestParams::FormElicitationParams {
                        meta: None,
                        message,
                        requested_schema: schema,
                    },
                )),
            );
            return Ok(InputRequiredResult::new(Some(requests), Some(sealed)).into());
        }
        let confirmation = match ctx
            .peer
            .elicit_with_timeout::<Confirm>(message, Some(CONFIRMATION_TTL))
            .await
        {
            Ok(Some(Confirm { approve: true })) => Confirmation::Confirmed,
            Ok(_) | Err(ElicitationError::UserDeclined) | Err(ElicitationError::UserCancelled) => {
                Confirmation::Refused
            }
            Err(e) => {
                // The client could not ask after all: an administrator decides instead.
                tracing::warn!(error = %e, "elicitation failed; falling back to pending approval");
                Confirmation::NotAsked
            }
        };
        Ok(self.decide(&agent, req, confirmation, None).await.into())
    }

    /// Get one of your purchases by id: status, reasons, card (last4 and expiry only), budgets.
    #[tool(
        name = "get_purchase",
        annotations(
            title = "Get a purchase",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn get_purchase(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(p): Parameters<IntentIdParams>,
    ) -> Result<Json<IntentView>, String> {
        let agent = agent_of(&ctx).map_err(|e| e.message.to_string())?;
        self.service
            .get_purchase(&agent, &p.id)
            .await
            .map(Json)
            .map_err(text_error)
    }

    /// List your purchases, newest first. Pass next_cursor as starting_after for the next page.
    #[tool(
        name = "list_purchases",
        annotations(
            title = "List purchases",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn list_purchases(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(p): Parameters<ListParams>,
    ) -> Result<Json<IntentPage>, String> {
        let agent = agent_of(&ctx).map_err(|e| e.message.to_string())?;
        let limit = p.limit.unwrap_or(20);
        if !(1..=100).contains(&limit) {
            return Err("invalid_limit: limit must be between 1 and 100".into());
        }
        self.service
            .list_purchases(&agent, limit as usize, p.starting_after.as_deref())
            .map(Json)
            .map_err(text_error)
    }

    /// How much you may still spend: limit, committed and remaining per budget period, the
    /// per-purchase maximum and the approval threshold, in minor units.
    #[tool(
        name = "get_budget",
        annotations(
            title = "Get remaining budget",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn get_budget(
        &self,
        ctx: RequestContext<RoleServer>,
    ) -> Result<Json<BudgetView>, String> {
        let agent = agent_of(&ctx).map_err(|e| e.message.to_string())?;
        self.service.budget(&agent).map(Json).map_err(text_error)
    }

    /// Cancel a purchase you no longer need: its card is canceled and the reserved amount is
    /// returned to your budget. Canceling twice is harmless.
    #[tool(
        name = "cancel_purchase",
        annotations(
            title = "Cancel a purchase",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = true
        )
    )]
    async fn cancel_purchase(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(p): Parameters<IntentIdParams>,
    ) -> Result<Json<IntentView>, String> {
        let agent = agent_of(&ctx).map_err(|e| e.message.to_string())?;
        self.service
            .cancel_purchase(&agent, &p.id)
            .await
            .map(Json)
            .map_err(text_error)
    }
}

impl RoonyMcp {
    async fn decide(
        &self,
        agent: &AgentIdentity,
        req: PurchaseRequest,
        confirmation: Confirmation,
        intent_id: Option<String>,
    ) -> CallToolResult {
        let options = PurchaseOptions {
            confirmation,
            intent_id,
            ..PurchaseOptions::default()
        };
        match self
            .service
            .request_purchase_with(agent, req, None, options)
            .await
        {
            Ok(outcome) => intent_result(outcome.intent),
            Err(e) => service_error(e),
        }
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for RoonyMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("roony", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Roony is the spending firewall for this agent. Call request_purchase before paying for anything; \
                 it returns a single-use card when the purchase fits policy, or reasons when it does not. \
                 Amounts are integer minor units (1200 = USD 12.00). Check get_budget to plan; cancel_purchase \
                 what you no longer need.",
            )
    }
}

/// The committed form of `tools/list` (`mcp/tools.json`).
pub fn tools_json() -> String {
    let tools = RoonyMcp::tool_router().list_all();
    serde_json::to_string_pretty(&serde_json::json!({ "tools": tools })).unwrap_or_default() + "\n"
}
