//! `issuing.authorization`: retrieve, list, and the test helpers (create, capture,
//! expire, increment, reverse) with the authorization engine: card status, expiry and
//! spending controls first, then the real-time webhook (see `webhooks.rs`).

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::Exec;
use super::card::{Card, CardStatus, Reveal};
use super::controls::SpendingControls;
use super::list::{ListQuery, envelope, paginate};
use super::transaction::{self, Transaction, TxKind};
use crate::emulator::error::ApiError;
use crate::emulator::ids;
use crate::emulator::params::{
    self, EXPAND, LIST_COMMON, METADATA, Shape, bool_of, expand_of, int_of, obj_of, str_of,
};
use crate::emulator::state::{AccountKey, AccountState, State, StoredObject};
use crate::emulator::webhooks::{self, RealtimeDecision, WebhookConfig};

pub const NOUN: &str = "issuing authorization";
pub const URL: &str = "/v1/issuing/authorizations";

const AMOUNT: Shape = Shape::Int(0, 99_999_999);

/// `merchant_data` of the test helpers.
pub const MERCHANT_DATA: Shape = Shape::Obj(&[
    ("category", Shape::Category),
    ("city", Shape::Str(5000)),
    ("country", Shape::Country),
    ("name", Shape::Str(5000)),
    ("network_id", Shape::Str(5000)),
    ("postal_code", Shape::Str(5000)),
    ("state", Shape::Str(5000)),
    ("terminal_id", Shape::Str(5000)),
    ("url", Shape::Str(5000)),
]);

const CREATE: &[(&str, Shape)] = &[
    ("amount", AMOUNT),
    (
        "amount_details",
        Shape::Obj(&[("atm_fee", AMOUNT), ("cashback_amount", AMOUNT)]),
    ),
    (
        "authorization_method",
        Shape::Enum(&["chip", "contactless", "keyed_in", "online", "swipe"]),
    ),
    ("card", Shape::Str(5000)),
    ("currency", Shape::Str(3)),
    EXPAND,
    ("fleet", Shape::Any),
    ("fraud_disputability_likelihood", Shape::Any),
    ("fuel", Shape::Any),
    ("is_amount_controllable", Shape::Bool),
    ("merchant_amount", AMOUNT),
    ("merchant_currency", Shape::Str(3)),
    ("merchant_data", MERCHANT_DATA),
    ("network_data", Shape::Any),
    ("risk_assessment", Shape::Any),
    ("verification_data", Shape::Any),
    (
        "wallet",
        Shape::Enum(&["apple_pay", "google_pay", "samsung_pay"]),
    ),
];

const CAPTURE: &[(&str, Shape)] = &[
    ("capture_amount", AMOUNT),
    ("close_authorization", Shape::Bool),
    EXPAND,
    ("purchase_details", Shape::Any),
];
const EXPIRE: &[(&str, Shape)] = &[EXPAND];
const INCREMENT: &[(&str, Shape)] = &[
    EXPAND,
    ("increment_amount", AMOUNT),
    ("is_amount_controllable", Shape::Bool),
];
const REVERSE: &[(&str, Shape)] = &[EXPAND, ("reverse_amount", AMOUNT)];
const RETRIEVE: &[(&str, Shape)] = &[EXPAND];
const UPDATE: &[(&str, Shape)] = &[EXPAND, METADATA];
const LIST: &[(&str, Shape)] = &[
    LIST_COMMON[0],
    LIST_COMMON[1],
    LIST_COMMON[2],
    LIST_COMMON[3],
    LIST_COMMON[4],
    ("card", Shape::Str(5000)),
    ("cardholder", Shape::Str(5000)),
    (
        "status",
        Shape::Enum(&["closed", "expired", "pending", "reversed"]),
    ),
];

/// A few merchant category codes (MCC); others render as `5999`.
const CATEGORY_CODES: &[(&str, &str)] = &[
    ("advertising_services", "7311"),
    ("airlines_air_carriers", "4511"),
    ("book_stores", "5942"),
    ("business_secretarial_schools", "8244"),
    ("cable_satellite_and_other_pay_television_and_radio", "4899"),
    ("car_rental_agencies", "7512"),
    ("computer_network_services", "4816"),
    ("computer_programming", "7372"),
    ("computer_software_stores", "5734"),
    ("computers_peripherals_and_software", "5045"),
    ("consulting_public_relations", "7392"),
    ("department_stores", "5311"),
    ("digital_goods_applications", "5817"),
    ("digital_goods_games", "5816"),
    ("digital_goods_large_volume", "5818"),
    ("digital_goods_media", "5815"),
    ("direct_marketing_subscription", "5968"),
    ("eating_places_restaurants", "5812"),
    ("electronics_stores", "5732"),
    ("fast_food_restaurants", "5814"),
    ("grocery_stores_supermarkets", "5411"),
    ("hotels_motels_and_resorts", "7011"),
    ("information_retrieval_services", "7375"),
    ("miscellaneous_business_services", "7399"),
    ("miscellaneous_specialty_retail", "5999"),
    ("professional_services", "8999"),
    ("service_stations", "5541"),
    ("taxicabs_limousines", "4121"),
    ("telecommunication_services", "4814"),
    ("utilities", "4900"),
];

pub fn category_code(category: &str) -> &'static str {
    CATEGORY_CODES
        .iter()
        .find(|(c, _)| *c == category)
        .map(|(_, code)| *code)
        .unwrap_or("5999")
}

/// Render test-helper `merchant_data` with Stripe's test defaults filled in.
pub fn merchant_data(p: Option<&Map<String, Value>>) -> Value {
    let get = |k: &str| p.and_then(|m| str_of(m, k)).map(str::to_owned);
    let category = get("category").unwrap_or_else(|| "miscellaneous".into());
    json!({
        "category": category,
        "category_code": category_code(&category),
        "city": get("city").or_else(|| Some("San Francisco".into())),
        "country": get("country").or_else(|| Some("US".into())),
        "name": get("name").or_else(|| Some("Test Merchant".into())),
        "network_id": get("network_id").unwrap_or_else(|| "1234567890".into()),
        "postal_code": get("postal_code").or_else(|| Some("94103".into())),
        "state": get("state").or_else(|| Some("CA".into())),
        "tax_id": null,
        "terminal_id": get("terminal_id"),
        "url": get("url"),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStatus {
    Pending,
    Closed,
    Reversed,
    Expired,
}

impl AuthStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthStatus::Pending => "pending",
            AuthStatus::Closed => "closed",
            AuthStatus::Reversed => "reversed",
            AuthStatus::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Authorization {
    pub id: String,
    pub created: i64,
    pub card: String,
    pub cardholder: Option<String>,
    pub currency: String,
    pub amount: i64,
    pub merchant_amount: i64,
    pub merchant_currency: String,
    pub amount_details: Value,
    pub approved: bool,
    pub status: AuthStatus,
    pub authorization_method: String,
    pub merchant_data: Value,
    pub metadata: BTreeMap<String, String>,
    pub request_history: Vec<Value>,
    /// Transaction ids, oldest first.
    pub transactions: Vec<String>,
    pub verification_data: Value,
    pub wallet: Option<String>,
    /// Captured so far (the hold left is `amount - captured`).
    pub captured: i64,
}

impl StoredObject for Authorization {
    fn id(&self) -> &str {
        &self.id
    }
    fn created(&self) -> i64 {
        self.created
    }
}

impl Authorization {
    pub fn category(&self) -> &str {
        self.merchant_data["category"].as_str().unwrap_or("")
    }

    /// What is still held.
    pub fn hold(&self) -> i64 {
        if self.approved && self.status == AuthStatus::Pending {
            (self.amount - self.captured).max(0)
        } else {
            0
        }
    }

    fn card_presence(&self) -> &'static str {
        match self.authorization_method.as_str() {
            "online" | "keyed_in" => "not_present",
            _ => "present",
        }
    }

    /// The `issuing.authorization` JSON: full card (never number/cvc), transactions
    /// embedded, `pending_request` only inside a real-time request event.
    pub fn render(&self, account: &AccountState, pending_request: Option<Value>) -> Value {
        let card = account
            .cards
            .get(&self.card)
            .map(|c| c.render(account, Reveal::default(), &[]))
            .unwrap_or(Value::Null);
        let transactions: Vec<Value> = self
            .transactions
            .iter()
            .filter_map(|id| account.transactions.get(id))
            .map(Transaction::render)
            .collect();
        json!({
            "id": self.id,
            "object": "issuing.authorization",
            "amount": self.amount,
            "amount_details": self.amount_details,
            "approved": self.approved,
            "authorization_method": self.authorization_method,
            "balance_transactions": [],
            "card": card,
            "card_presence": self.card_presence(),
            "cardholder": self.cardholder,
            "created": self.created,
            "currency": self.currency,
            "fleet": null,
            "fraud_challenges": [],
            "fuel": null,
            "livemode": false,
            "merchant_amount": self.merchant_amount,
            "merchant_currency": self.merchant_currency,
            "merchant_data": self.merchant_data,
            "metadata": self.metadata,
            "network_data": {
                "acquiring_institution_id": null,
                "system_trace_audit_number": null,
                "transaction_id": null,
            },
            "pending_request": pending_request,
            "request_history": self.request_history,
            "status": self.status.as_str(),
            "token": null,
            "transactions": transactions,
            "treasury": null,
            "verification_data": self.verification_data,
            "verified_by_fraud_challenge": null,
            "wallet": self.wallet,
        })
    }
}

fn verification_data(p: Option<&Map<String, Value>>) -> Value {
    let check = |k: &str, default: &str| {
        p.and_then(|m| str_of(m, k))
            .filter(|v| ["match", "mismatch", "not_provided"].contains(v))
            .unwrap_or(default)
            .to_owned()
    };
    let exemption = p
        .and_then(|m| obj_of(m, "authentication_exemption"))
        .map(|e| json!({"claimed_by": str_of(e, "claimed_by"), "type": str_of(e, "type")}));
    let three_ds = p
        .and_then(|m| obj_of(m, "three_d_secure"))
        .map(|t| json!({"result": str_of(t, "result")}));
    json!({
        "address_line1_check": check("address_line1_check", "not_provided"),
        "address_postal_code_check": check("address_postal_code_check", "not_provided"),
        "authentication_exemption": exemption,
        "cvc_check": check("cvc_check", "match"),
        "expiry_check": check("expiry_check", "match"),
        "postal_code": null,
        "three_d_secure": three_ds,
    })
}

fn load<'a>(account: &'a AccountState, id: &str) -> Result<&'a Authorization, ApiError> {
    account
        .authorizations
        .get(id)
        .ok_or_else(|| ApiError::no_such(NOUN, id))
}

/// Start of the spending window `interval` (as of `now`), UTC; `None` for
/// `per_authorization`.
fn window_start(interval: &str, now: i64) -> Option<i64> {
    let day = now - now.rem_euclid(86_400);
    let (y, m, _) = ids::ymd(now);
    match interval {
        "per_authorization" => None,
        "daily" => Some(day),
        // Weeks start on Sunday; 1970-01-01 was a Thursday.
        "weekly" => Some(day - ((now.div_euclid(86_400) + 4).rem_euclid(7)) * 86_400),
        "monthly" => Some(ids::unix_of(y, m, 1)),
        "yearly" => Some(ids::unix_of(y, 1, 1)),
        _ => Some(i64::MIN),
    }
}

/// Spent on the cards `on` since `since` in `categories` (all if `None`): amounts held
/// by pending approved authorizations plus captures minus refunds.
fn spent(
    account: &AccountState,
    on: &dyn Fn(&str) -> bool,
    since: i64,
    categories: Option<&[String]>,
) -> i64 {
    let in_cat = |c: &str| categories.is_none_or(|cs| cs.iter().any(|x| x == c));
    let held: i64 = account
        .authorizations
        .iter()
        .filter(|a| on(&a.card) && a.created >= since && in_cat(a.category()))
        .map(Authorization::hold)
        .sum();
    let settled: i64 = account
        .transactions
        .iter()
        .filter(|t| on(&t.card) && t.created >= since && in_cat(t.category()))
        .map(|t| -t.amount)
        .sum();
    held + settled
}

/// What an authorization request looks like to the checks.
struct Ask<'a> {
    amount: i64,
    category: &'a str,
    country: Option<&'a str>,
    presence: &'a str,
    now: i64,
}

fn controls_decline(
    account: &AccountState,
    controls: &SpendingControls,
    on: &dyn Fn(&str) -> bool,
    ask: &Ask<'_>,
) -> bool {
    let has = |list: &Option<Vec<String>>, v: &str| {
        list.as_ref().is_some_and(|l| l.iter().any(|x| x == v))
    };
    let set = |list: &Option<Vec<String>>| list.as_ref().is_some_and(|l| !l.is_empty());
    if set(&controls.allowed_categories) && !has(&controls.allowed_categories, ask.category) {
        return true;
    }
    if has(&controls.blocked_categories, ask.category) {
        return true;
    }
    let country = ask.country.unwrap_or("");
    if set(&controls.allowed_merchant_countries)
        && !has(&controls.allowed_merchant_countries, country)
    {
        return true;
    }
    if has(&controls.blocked_merchant_countries, country) {
        return true;
    }
    if set(&controls.allowed_card_presences) && !has(&controls.allowed_card_presences, ask.presence)
    {
        return true;
    }
    if has(&controls.blocked_card_presences, ask.presence) {
        return true;
    }
    controls.spending_limits.iter().any(|limit| {
        if limit
            .categories
            .as_ref()
            .is_some_and(|cs| !cs.iter().any(|c| c == ask.category))
        {
            return false;
        }
        match window_start(&limit.interval, ask.now) {
            None => ask.amount > limit.amount,
            Some(since) => {
                spent(account, on, since, limit.categories.as_deref()) + ask.amount > limit.amount
            }
        }
    })
}

/// Stripe's own checks, before any webhook: the decline reason, if any.
fn decline_reason(account: &AccountState, card: &Card, ask: &Ask<'_>) -> Option<&'static str> {
    match card.status {
        CardStatus::Canceled => return Some("card_canceled"),
        CardStatus::Inactive => return Some("card_inactive"),
        CardStatus::Active => {}
    }
    let (y, m) = ids::year_month(ask.now);
    if (card.exp_year, card.exp_month) < (y, m) {
        return Some("card_expired");
    }
    let cardholder = account.cardholders.get(&card.cardholder);
    match cardholder.map(|c| c.status.as_str()) {
        Some("inactive") => return Some("cardholder_inactive"),
        Some("blocked") => return Some("cardholder_blocked"),
        _ => {}
    }
    let card_id = card.id.clone();
    let this_card = move |c: &str| c == card_id;
    if controls_decline(account, &card.spending_controls, &this_card, ask) {
        return Some("spending_controls");
    }
    if let Some(holder) = cardholder {
        let holder_id = holder.id.clone();
        let holder_cards = |c: &str| {
            account
                .cards
                .get(c)
                .is_some_and(|card| card.cardholder == holder_id)
        };
        if controls_decline(account, &holder.spending_controls, &holder_cards, ask) {
            return Some("spending_controls");
        }
    }
    None
}

/// An authorization request waiting for the real-time webhook's answer.
#[derive(Debug)]
pub struct Pending {
    pub account: AccountKey,
    auth: Authorization,
    /// `Some(before)` for an increment: the authorization as it was.
    before: Option<Value>,
    requested: i64,
    pub amount_controllable: bool,
    pub webhook: WebhookConfig,
    pub event_id: String,
    pub body: Bytes,
}

fn pending_request(auth: &Authorization, requested: i64, controllable: bool) -> Value {
    json!({
        "amount": requested,
        "amount_details": auth.amount_details,
        "currency": auth.currency,
        "is_amount_controllable": controllable,
        "merchant_amount": requested,
        "merchant_currency": auth.merchant_currency,
        "network_risk_score": null,
    })
}

/// Run the checks; decide now or hand over to the real-time webhook.
#[allow(clippy::too_many_arguments)]
fn decide(
    state: &mut State,
    key: &AccountKey,
    auth: Authorization,
    before: Option<Value>,
    requested: i64,
    controllable: bool,
    now: i64,
) -> Result<Exec, ApiError> {
    let account = state.account(key);
    let card = account
        .cards
        .get(&auth.card)
        .ok_or_else(|| ApiError::no_such_param("issuing card", &auth.card, "card"))?;
    let ask = Ask {
        amount: requested,
        category: auth.category(),
        country: auth.merchant_data["country"].as_str(),
        presence: auth.card_presence(),
        now,
    };
    if let Some(reason) = decline_reason(account, card, &ask) {
        let decision = RealtimeDecision {
            approved: false,
            reason,
            reason_message: None,
            amount: None,
            metadata: None,
        };
        return finish_parts(state, key, auth, before, requested, decision, now).map(Exec::Done);
    }
    match state.webhook.clone().filter(|w| w.realtime) {
        Some(webhook) => {
            let mut shown = auth.clone();
            if before.is_none() {
                shown.amount = 0;
                shown.merchant_amount = 0;
            }
            let object = shown.render(
                state.account(key),
                Some(pending_request(&auth, requested, controllable)),
            );
            let event_id = state.emit_realtime(key, object);
            let body = state
                .event(&event_id)
                .map(|e| e.body.clone())
                .unwrap_or_default();
            Ok(Exec::Realtime(Box::new(Pending {
                account: key.clone(),
                auth,
                before,
                requested,
                amount_controllable: controllable,
                webhook,
                event_id,
                body,
            })))
        }
        None => {
            let decision = RealtimeDecision {
                approved: true,
                reason: "card_active",
                reason_message: None,
                amount: None,
                metadata: None,
            };
            finish_parts(state, key, auth, before, requested, decision, now).map(Exec::Done)
        }
    }
}

/// Apply the real-time webhook's decision.
pub fn finish(
    state: &mut State,
    pending: Pending,
    decision: RealtimeDecision,
    now: i64,
) -> Result<Value, ApiError> {
    let Pending {
        account,
        auth,
        before,
        requested,
        ..
    } = pending;
    finish_parts(state, &account, auth, before, requested, decision, now)
}

fn finish_parts(
    state: &mut State,
    key: &AccountKey,
    mut auth: Authorization,
    before: Option<Value>,
    requested: i64,
    decision: RealtimeDecision,
    now: i64,
) -> Result<Value, ApiError> {
    let approved_amount = decision.amount.unwrap_or(requested);
    auth.request_history.push(json!({
        "amount": requested,
        "amount_details": auth.amount_details,
        "approved": decision.approved,
        "authorization_code": decision.approved.then(|| ids::random_digits(6)),
        "created": now,
        "currency": auth.currency,
        "merchant_amount": requested,
        "merchant_currency": auth.merchant_currency,
        "network_risk_score": null,
        "reason": decision.reason,
        "reason_message": decision.reason_message,
        "requested_at": now,
    }));
    if let Some(md) = decision.metadata {
        auth.metadata.extend(md);
    }
    let increment = before.is_some();
    if increment {
        if decision.approved {
            auth.amount += approved_amount;
            auth.merchant_amount += approved_amount;
        }
    } else {
        auth.approved = decision.approved;
        if decision.approved {
            auth.amount = approved_amount;
            auth.merchant_amount = approved_amount;
            auth.status = AuthStatus::Pending;
        } else {
            auth.status = AuthStatus::Closed;
        }
    }
    let id = auth.id.clone();
    let account = state.account(key);
    account.authorizations.insert(auth);
    let body = load(account, &id)?.render(account, None);
    match before {
        Some(before) => {
            let prev = webhooks::previous_attributes(&before, &body);
            state.emit(
                key,
                "issuing_authorization.updated",
                body.clone(),
                Some(prev),
            );
        }
        None => {
            state.emit(key, "issuing_authorization.created", body.clone(), None);
        }
    }
    Ok(body)
}

pub fn create(
    state: &mut State,
    key: &AccountKey,
    mut p: Map<String, Value>,
    now: i64,
) -> Result<Exec, ApiError> {
    params::validate(&mut p, CREATE)?;
    let expand = expand_of(&p);
    params::check_expand(&expand, &["card", "cardholder"])?;
    let card_id = params::required_str(&p, "card", "card")?;
    let account = state.account(key);
    let card = account
        .cards
        .get(card_id)
        .ok_or_else(|| ApiError::no_such_param("issuing card", card_id, "card"))?;
    let amount = int_of(&p, "amount")
        .or_else(|| int_of(&p, "merchant_amount"))
        .ok_or_else(|| ApiError::missing("amount"))?;
    let currency = str_of(&p, "currency")
        .map(str::to_ascii_lowercase)
        .unwrap_or_else(|| card.currency.clone());
    if currency != card.currency {
        return Err(ApiError::invalid(format!(
            "The currency {currency} does not match the card's currency ({}).",
            card.currency
        ))
        .with_param("currency"));
    }
    let details = obj_of(&p, "amount_details");
    let auth = Authorization {
        id: ids::object_id("iauth_"),
        created: now,
        card: card.id.clone(),
        cardholder: Some(card.cardholder.clone()),
        currency: currency.clone(),
        amount,
        merchant_amount: int_of(&p, "merchant_amount").unwrap_or(amount),
        merchant_currency: str_of(&p, "merchant_currency")
            .map(str::to_ascii_lowercase)
            .unwrap_or(currency),
        amount_details: json!({
            "atm_fee": details.and_then(|d| int_of(d, "atm_fee")),
            "cashback_amount": details.and_then(|d| int_of(d, "cashback_amount")),
        }),
        approved: false,
        status: AuthStatus::Pending,
        authorization_method: str_of(&p, "authorization_method")
            .unwrap_or("online")
            .to_owned(),
        merchant_data: merchant_data(obj_of(&p, "merchant_data")),
        metadata: BTreeMap::new(),
        request_history: Vec::new(),
        transactions: Vec::new(),
        verification_data: verification_data(obj_of(&p, "verification_data")),
        wallet: str_of(&p, "wallet").map(str::to_owned),
        captured: 0,
    };
    let controllable = bool_of(&p, "is_amount_controllable").unwrap_or(false);
    decide(state, key, auth, None, amount, controllable, now)
}

pub fn increment(
    state: &mut State,
    key: &AccountKey,
    id: &str,
    mut p: Map<String, Value>,
    now: i64,
) -> Result<Exec, ApiError> {
    params::validate(&mut p, INCREMENT)?;
    let amount =
        int_of(&p, "increment_amount").ok_or_else(|| ApiError::missing("increment_amount"))?;
    let account = state.account(key);
    let auth = load(account, id)?;
    if auth.status != AuthStatus::Pending || !auth.approved {
        return Err(not_pending(auth, "incremented"));
    }
    let before = auth.render(account, None);
    let auth = auth.clone();
    let controllable = bool_of(&p, "is_amount_controllable").unwrap_or(false);
    decide(state, key, auth, Some(before), amount, controllable, now)
}

fn not_pending(auth: &Authorization, verb: &str) -> ApiError {
    let why = if auth.approved {
        format!("its status is {}", auth.status.as_str())
    } else {
        "it was declined".to_owned()
    };
    ApiError::invalid(format!(
        "This authorization cannot be {verb} because {why}."
    ))
    .with_code("authorization_not_pending")
}

/// Cancel a card with `lifecycle_controls.cancel_after.payment_count` once it has made
/// that many captures.
pub fn apply_lifecycle(state: &mut State, key: &AccountKey, card_id: &str) {
    let account = state.account(key);
    let Some(card) = account.cards.get(card_id) else {
        return;
    };
    let Some(limit) = card.lifecycle_payment_count else {
        return;
    };
    if card.status == CardStatus::Canceled {
        return;
    }
    let payments = account
        .transactions
        .iter()
        .filter(|t| t.card == card_id && t.kind == TxKind::Capture)
        .count();
    if i64::try_from(payments).unwrap_or(i64::MAX) < limit {
        return;
    }
    let before = card.render(account, Reveal::default(), &[]);
    let mut next = card.clone();
    next.status = CardStatus::Canceled;
    account.cards.insert(next);
    let Some(after) = account
        .cards
        .get(card_id)
        .map(|c| c.render(account, Reveal::default(), &[]))
    else {
        return;
    };
    let prev = webhooks::previous_attributes(&before, &after);
    state.emit(key, "issuing_card.updated", after, Some(prev));
}

pub fn capture(
    state: &mut State,
    key: &AccountKey,
    id: &str,
    mut p: Map<String, Value>,
    now: i64,
) -> Result<Value, ApiError> {
    params::validate(&mut p, CAPTURE)?;
    let account = state.account(key);
    let auth = load(account, id)?;
    if auth.status != AuthStatus::Pending || !auth.approved {
        return Err(not_pending(auth, "captured"));
    }
    let before = auth.render(account, None);
    let amount = int_of(&p, "capture_amount").unwrap_or_else(|| auth.hold());
    let close = bool_of(&p, "close_authorization").unwrap_or(true);
    let tx = Transaction::new(
        TxKind::Capture,
        -amount,
        Some(auth.id.clone()),
        auth.card.clone(),
        auth.cardholder.clone(),
        auth.currency.clone(),
        auth.merchant_currency.clone(),
        auth.merchant_data.clone(),
        now,
    );
    let tx_id = tx.id.clone();
    let mut next = auth.clone();
    next.captured += amount;
    next.transactions.push(tx_id.clone());
    if close {
        next.status = AuthStatus::Closed;
    }
    let card_id = next.card.clone();
    account.transactions.insert(tx);
    account.authorizations.insert(next);
    let tx_body = transaction::load(account, &tx_id)?.render();
    let body = load(account, id)?.render(account, None);
    let prev = webhooks::previous_attributes(&before, &body);
    state.emit(key, "issuing_transaction.created", tx_body, None);
    state.emit(
        key,
        "issuing_authorization.updated",
        body.clone(),
        Some(prev),
    );
    apply_lifecycle(state, key, &card_id);
    Ok(body)
}

fn transition(
    state: &mut State,
    key: &AccountKey,
    id: &str,
    verb: &str,
    change: impl FnOnce(&mut Authorization),
) -> Result<Value, ApiError> {
    let account = state.account(key);
    let auth = load(account, id)?;
    if auth.status != AuthStatus::Pending || !auth.approved {
        return Err(not_pending(auth, verb));
    }
    let before = auth.render(account, None);
    let mut next = auth.clone();
    change(&mut next);
    account.authorizations.insert(next);
    let body = load(account, id)?.render(account, None);
    let prev = webhooks::previous_attributes(&before, &body);
    state.emit(
        key,
        "issuing_authorization.updated",
        body.clone(),
        Some(prev),
    );
    Ok(body)
}

pub fn expire(
    state: &mut State,
    key: &AccountKey,
    id: &str,
    mut p: Map<String, Value>,
) -> Result<Value, ApiError> {
    params::validate(&mut p, EXPIRE)?;
    transition(state, key, id, "expired", |a| {
        a.status = AuthStatus::Expired
    })
}

pub fn reverse(
    state: &mut State,
    key: &AccountKey,
    id: &str,
    mut p: Map<String, Value>,
) -> Result<Value, ApiError> {
    params::validate(&mut p, REVERSE)?;
    let requested = int_of(&p, "reverse_amount");
    if let Some(r) = requested {
        let hold = load(state.account(key), id)?.hold();
        if r > hold {
            return Err(ApiError::invalid(format!(
                "The reverse_amount ({r}) cannot exceed the amount still held ({hold})."
            ))
            .with_param("reverse_amount"));
        }
    }
    transition(state, key, id, "reversed", |a| {
        let amount = requested.unwrap_or_else(|| a.hold());
        a.amount -= amount;
        a.merchant_amount = (a.merchant_amount - amount).max(0);
        if a.hold() == 0 {
            a.status = AuthStatus::Reversed;
        }
    })
}

pub fn retrieve(
    account: &AccountState,
    id: &str,
    mut p: Map<String, Value>,
) -> Result<Value, ApiError> {
    params::validate(&mut p, RETRIEVE)?;
    params::check_expand(&expand_of(&p), &["card", "cardholder"])?;
    Ok(load(account, id)?.render(account, None))
}

/// `POST /v1/issuing/authorizations/:id` (metadata).
pub fn update(
    state: &mut State,
    key: &AccountKey,
    id: &str,
    mut p: Map<String, Value>,
) -> Result<Value, ApiError> {
    params::validate(&mut p, UPDATE)?;
    let account = state.account(key);
    let auth = load(account, id)?;
    let before = auth.render(account, None);
    let mut next = auth.clone();
    params::apply_metadata(&mut next.metadata, p.get("metadata"))?;
    account.authorizations.insert(next);
    let body = load(account, id)?.render(account, None);
    let prev = webhooks::previous_attributes(&before, &body);
    if prev.as_object().is_some_and(|m| !m.is_empty()) {
        state.emit(
            key,
            "issuing_authorization.updated",
            body.clone(),
            Some(prev),
        );
    }
    Ok(body)
}

pub fn list(account: &AccountState, mut p: Map<String, Value>) -> Result<Value, ApiError> {
    params::validate(&mut p, LIST)?;
    params::check_list_expand(&expand_of(&p), &["card", "cardholder"])?;
    let query = ListQuery::from_params(&p)?;
    let card = str_of(&p, "card");
    let cardholder = str_of(&p, "cardholder");
    let status = str_of(&p, "status");
    let page = paginate(&account.authorizations, &query, NOUN, |a| {
        card.is_none_or(|c| a.card == c)
            && cardholder.is_none_or(|h| a.cardholder.as_deref() == Some(h))
            && status.is_none_or(|s| a.status.as_str() == s)
    })?;
    let data = page.items.iter().map(|a| a.render(account, None)).collect();
    Ok(envelope(data, page.has_more, URL))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        // 2024-07-25 (a Thursday) 22:55:48 UTC
        let now = 1_721_948_148;
        assert_eq!(window_start("daily", now), Some(ids::unix_of(2024, 7, 25)));
        assert_eq!(window_start("weekly", now), Some(ids::unix_of(2024, 7, 21)));
        assert_eq!(window_start("monthly", now), Some(ids::unix_of(2024, 7, 1)));
        assert_eq!(window_start("yearly", now), Some(ids::unix_of(2024, 1, 1)));
        assert_eq!(window_start("per_authorization", now), None);
        assert_eq!(window_start("all_time", now), Some(i64::MIN));
    }

    #[test]
    fn merchant_defaults() {
        let m = merchant_data(None);
        assert_eq!(m["category"], "miscellaneous");
        assert_eq!(m["network_id"], "1234567890");
        let p: Map<String, Value> = serde_json::from_value(
            json!({"category": "taxicabs_limousines", "name": "Rocket Rides"}),
        )
        .expect("map");
        let m = merchant_data(Some(&p));
        assert_eq!(m["category_code"], "4121");
        assert_eq!(m["name"], "Rocket Rides");
    }
}
