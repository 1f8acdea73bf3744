//! `issuing.card`: create, retrieve (with `number`/`cvc` expansion), update, list.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::cardholder::{self, Cardholder};
use super::controls::{Owner, SpendingControls};
use super::list::{ListQuery, envelope, paginate};
use crate::emulator::error::ApiError;
use crate::emulator::ids;
use crate::emulator::pan::{self, Secret};
use crate::emulator::params::{
    self, ADDRESS, CARD_SPENDING_CONTROLS, EXPAND, LIST_COMMON, METADATA, Shape, apply_metadata,
    bool_of, expand_of, int_of, obj_of, str_of,
};
use crate::emulator::state::{AccountKey, AccountState, State, StoredObject};

pub const NOUN: &str = "issuing card";
pub const URL: &str = "/v1/issuing/cards";
/// Currencies Stripe Issuing supports (US, EU, UK programs).
pub const CURRENCIES: &[&str] = &["eur", "gbp", "usd"];
/// How many years ahead generated expiry dates are.
const EXPIRY_YEARS: i64 = 3;

const SHIPPING: Shape = Shape::Obj(&[
    ("address", ADDRESS),
    (
        "address_validation",
        Shape::Obj(&[(
            "mode",
            Shape::Enum(&[
                "disabled",
                "normalization_only",
                "validation_and_normalization",
            ]),
        )]),
    ),
    ("customs", Shape::Obj(&[("eori_number", Shape::Str(5000))])),
    ("name", Shape::Str(5000)),
    ("phone_number", Shape::Str(5000)),
    ("require_signature", Shape::Bool),
    ("service", Shape::Enum(&["express", "priority", "standard"])),
    ("type", Shape::Enum(&["bulk", "individual"])),
]);

const PIN: Shape = Shape::Obj(&[("encrypted_number", Shape::Str(5000))]);

const CREATE: &[(&str, Shape)] = &[
    ("cardholder", Shape::Str(5000)),
    ("currency", Shape::Str(3)),
    ("exp_month", Shape::Int(1, 12)),
    ("exp_year", Shape::Int(2000, 2200)),
    EXPAND,
    ("financial_account", Shape::Str(5000)),
    (
        "lifecycle_controls",
        Shape::Obj(&[(
            "cancel_after",
            Shape::Obj(&[("payment_count", Shape::Int(1, 1_000_000_000))]),
        )]),
    ),
    METADATA,
    ("personalization_design", Shape::Str(5000)),
    ("pin", PIN),
    ("replacement_for", Shape::Str(5000)),
    (
        "replacement_reason",
        Shape::Enum(&["damaged", "expired", "lost", "stolen"]),
    ),
    ("second_line", Shape::Str(5000)),
    ("shipping", SHIPPING),
    ("spending_controls", CARD_SPENDING_CONTROLS),
    ("status", Shape::Enum(&["active", "inactive"])),
    ("type", Shape::Enum(&["physical", "virtual"])),
];

const UPDATE: &[(&str, Shape)] = &[
    ("cancellation_reason", Shape::Enum(&["lost", "stolen"])),
    EXPAND,
    METADATA,
    ("personalization_design", Shape::Str(5000)),
    ("pin", PIN),
    ("shipping", SHIPPING),
    ("spending_controls", CARD_SPENDING_CONTROLS),
    ("status", Shape::Enum(&["active", "canceled", "inactive"])),
];

const RETRIEVE: &[(&str, Shape)] = &[EXPAND];

const LIST: &[(&str, Shape)] = &[
    LIST_COMMON[0],
    LIST_COMMON[1],
    LIST_COMMON[2],
    LIST_COMMON[3],
    LIST_COMMON[4],
    ("cardholder", Shape::Str(5000)),
    ("exp_month", Shape::Int(1, 12)),
    ("exp_year", Shape::Int(0, 9999)),
    ("last4", Shape::Str(4)),
    ("personalization_design", Shape::Str(5000)),
    ("status", Shape::Enum(&["active", "canceled", "inactive"])),
    ("type", Shape::Enum(&["physical", "virtual"])),
];

/// Expansions accepted on card endpoints. `number`/`cvc` only take effect on
/// retrieve; `cardholder` is always embedded anyway.
const EXPANDABLE: &[&str] = &[
    "cardholder",
    "cvc",
    "number",
    "personalization_design",
    "replaced_by",
    "replacement_for",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardType {
    Virtual,
    Physical,
}

impl CardType {
    pub fn as_str(self) -> &'static str {
        match self {
            CardType::Virtual => "virtual",
            CardType::Physical => "physical",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardStatus {
    Active,
    Inactive,
    Canceled,
}

impl CardStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CardStatus::Active => "active",
            CardStatus::Inactive => "inactive",
            CardStatus::Canceled => "canceled",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(CardStatus::Active),
            "inactive" => Some(CardStatus::Inactive),
            "canceled" => Some(CardStatus::Canceled),
            _ => None,
        }
    }
}

/// A stored card. `pan` and `cvc` are [`Secret`]s: redacted in `Debug`, only ever
/// rendered by retrieve with `expand`.
#[derive(Debug, Clone)]
pub struct Card {
    pub id: String,
    pub created: i64,
    pub cardholder: String,
    pub currency: String,
    pub kind: CardType,
    pub status: CardStatus,
    pub cancellation_reason: Option<String>,
    pub pan: Secret,
    pub cvc: Secret,
    pub last4: String,
    pub exp_month: i64,
    pub exp_year: i64,
    pub spending_controls: SpendingControls,
    pub metadata: BTreeMap<String, String>,
    pub lifecycle_payment_count: Option<i64>,
    pub financial_account: Option<String>,
    pub personalization_design: Option<String>,
    pub second_line: Option<String>,
    pub replacement_for: Option<String>,
    pub replacement_reason: Option<String>,
    pub replaced_by: Option<String>,
    /// Rendered `issuing_card_shipping` (physical cards).
    pub shipping: Option<Value>,
}

impl StoredObject for Card {
    fn id(&self) -> &str {
        &self.id
    }
    fn created(&self) -> i64 {
        self.created
    }
}

/// What a rendering may include.
#[derive(Debug, Default, Clone, Copy)]
pub struct Reveal {
    pub number: bool,
    pub cvc: bool,
}

impl Card {
    /// The `issuing.card` JSON with the cardholder embedded. `number`/`cvc` appear only
    /// when `reveal` asks for them (retrieve with `expand`, virtual cards).
    pub fn render(&self, account: &AccountState, reveal: Reveal, expand: &[String]) -> Value {
        let cardholder = account
            .cardholders
            .get(&self.cardholder)
            .map(Cardholder::render)
            .unwrap_or(Value::Null);
        let contact = account
            .cardholders
            .get(&self.cardholder)
            .is_some_and(|c| c.email.is_some() && c.phone_number.is_some());
        let wallet = json!({
            "eligible": contact,
            "ineligible_reason": if contact { Value::Null } else { json!("missing_cardholder_contact") },
        });
        let linked = |id: &Option<String>, field: &str| match id {
            Some(id) if expand.iter().any(|e| e == field) => account
                .cards
                .get(id)
                .map(|c| c.render(account, Reveal::default(), &[]))
                .unwrap_or_else(|| json!(id)),
            Some(id) => json!(id),
            None => Value::Null,
        };
        let mut card = json!({
            "id": self.id,
            "object": "issuing.card",
            "brand": "Visa",
            "cancellation_reason": self.cancellation_reason,
            "cardholder": cardholder,
            "created": self.created,
            "currency": self.currency,
            "exp_month": self.exp_month,
            "exp_year": self.exp_year,
            "financial_account": self.financial_account,
            "last4": self.last4,
            "latest_fraud_warning": null,
            "lifecycle_controls": self.lifecycle_payment_count.map(|n| json!({"cancel_after": {"payment_count": n}})),
            "livemode": false,
            "metadata": self.metadata,
            "personalization_design": self.personalization_design,
            "replaced_by": linked(&self.replaced_by, "replaced_by"),
            "replacement_for": linked(&self.replacement_for, "replacement_for"),
            "replacement_reason": self.replacement_reason,
            "second_line": self.second_line,
            "shipping": self.shipping,
            "spending_controls": self.spending_controls.render(Owner::Card, Some(&self.currency)),
            "status": self.status.as_str(),
            "type": self.kind.as_str(),
            "wallets": {
                "apple_pay": wallet.clone(),
                "google_pay": wallet,
                "primary_account_identifier": null,
            },
        });
        if self.kind == CardType::Virtual
            && let Value::Object(map) = &mut card
        {
            if reveal.number {
                map.insert("number".into(), json!(self.pan.expose()));
            }
            if reveal.cvc {
                map.insert("cvc".into(), json!(self.cvc.expose()));
            }
        }
        card
    }
}

fn render_shipping(s: &Map<String, Value>) -> Result<Value, ApiError> {
    let name = params::required_str(s, "name", "shipping[name]")?;
    let address = obj_of(s, "address").ok_or_else(|| ApiError::missing("shipping[address]"))?;
    for k in ["line1", "city", "postal_code", "country"] {
        if str_of(address, k).is_none() {
            return Err(ApiError::missing(&format!("shipping[address][{k}]")));
        }
    }
    let field = |k: &str| str_of(address, k);
    Ok(json!({
        "address": {
            "city": field("city"), "country": field("country"), "line1": field("line1"),
            "line2": field("line2"), "postal_code": field("postal_code"), "state": field("state"),
        },
        "address_validation": {
            "mode": obj_of(s, "address_validation").and_then(|v| str_of(v, "mode")).unwrap_or("normalization_only"),
            "normalized_address": null,
            "result": null,
        },
        "carrier": null,
        "customs": obj_of(s, "customs").map(|c| json!({"eori_number": str_of(c, "eori_number")})),
        "eta": null,
        "name": name,
        "phone_number": str_of(s, "phone_number"),
        "require_signature": bool_of(s, "require_signature"),
        "service": str_of(s, "service").unwrap_or("standard"),
        "status": "pending",
        "tracking_number": null,
        "tracking_url": null,
        "type": str_of(s, "type").unwrap_or("individual"),
    }))
}

/// A number not used by any card in any account.
fn fresh_pan(state: &State) -> Secret {
    loop {
        let candidate = pan::generate_pan();
        if !state.pan_in_use(candidate.expose()) {
            return candidate;
        }
    }
}

pub fn create(
    state: &mut State,
    key: &AccountKey,
    mut p: Map<String, Value>,
    now: i64,
) -> Result<Value, ApiError> {
    params::validate(&mut p, CREATE)?;
    let expand = expand_of(&p);
    params::check_expand(&expand, EXPANDABLE)?;
    let currency = params::required_str(&p, "currency", "currency")?.to_ascii_lowercase();
    if !CURRENCIES.contains(&currency.as_str()) {
        return Err(ApiError::invalid(format!(
            "Invalid currency: {currency}. Stripe Issuing supports usd, eur and gbp."
        ))
        .with_param("currency"));
    }
    let kind = match params::required_str(&p, "type", "type")? {
        "physical" => CardType::Physical,
        _ => CardType::Virtual,
    };
    let cardholder_id = params::required_str(&p, "cardholder", "cardholder")?.to_owned();
    let shipping = match (obj_of(&p, "shipping"), kind) {
        (Some(s), _) => Some(render_shipping(s)?),
        (None, CardType::Physical) => return Err(ApiError::missing("shipping")),
        (None, CardType::Virtual) => None,
    };
    let (year, month) = ids::year_month(now);
    let exp_month = int_of(&p, "exp_month").unwrap_or(month);
    let exp_year = int_of(&p, "exp_year").unwrap_or(year + EXPIRY_YEARS);
    if (exp_year, exp_month) < (year, month) {
        return Err(
            ApiError::invalid("The expiration date must be in the future.").with_param("exp_year"),
        );
    }
    let pan = fresh_pan(state);
    let account = state.account(key);
    if !account.cardholders.contains(&cardholder_id) {
        return Err(ApiError::no_such_param(
            cardholder::NOUN,
            &cardholder_id,
            "cardholder",
        ));
    }
    let replacement_for = str_of(&p, "replacement_for").map(str::to_owned);
    if let Some(old) = &replacement_for
        && !account.cards.contains(old)
    {
        return Err(ApiError::no_such_param(NOUN, old, "replacement_for"));
    }
    let mut spending_controls = SpendingControls::default();
    spending_controls.apply(p.get("spending_controls"))?;
    let mut metadata = BTreeMap::new();
    apply_metadata(&mut metadata, p.get("metadata"))?;
    let last4 = pan.expose()[pan.expose().len() - 4..].to_owned();
    let card = Card {
        id: ids::object_id("ic_"),
        created: now,
        cardholder: cardholder_id,
        currency,
        kind,
        status: match str_of(&p, "status") {
            Some("active") => CardStatus::Active,
            _ => CardStatus::Inactive,
        },
        cancellation_reason: None,
        pan,
        cvc: pan::generate_cvc(),
        last4,
        exp_month,
        exp_year,
        spending_controls,
        metadata,
        lifecycle_payment_count: obj_of(&p, "lifecycle_controls")
            .and_then(|l| obj_of(l, "cancel_after"))
            .and_then(|c| int_of(c, "payment_count")),
        financial_account: str_of(&p, "financial_account").map(str::to_owned),
        personalization_design: str_of(&p, "personalization_design").map(str::to_owned),
        second_line: str_of(&p, "second_line").map(str::to_owned),
        replacement_for: replacement_for.clone(),
        replacement_reason: str_of(&p, "replacement_reason").map(str::to_owned),
        replaced_by: None,
        shipping,
    };
    if let Some(old) = replacement_for
        .as_deref()
        .and_then(|id| account.cards.get_mut(id))
    {
        old.replaced_by = Some(card.id.clone());
    }
    let body = card.render(account, Reveal::default(), &expand);
    account.cards.insert(card);
    Ok(body)
}

pub fn retrieve(
    account: &AccountState,
    id: &str,
    mut p: Map<String, Value>,
) -> Result<Value, ApiError> {
    params::validate(&mut p, RETRIEVE)?;
    let expand = expand_of(&p);
    params::check_expand(&expand, EXPANDABLE)?;
    let card = account
        .cards
        .get(id)
        .ok_or_else(|| ApiError::no_such(NOUN, id))?;
    let reveal = Reveal {
        number: expand.iter().any(|e| e == "number"),
        cvc: expand.iter().any(|e| e == "cvc"),
    };
    Ok(card.render(account, reveal, &expand))
}

pub fn update(
    account: &mut AccountState,
    id: &str,
    mut p: Map<String, Value>,
) -> Result<Value, ApiError> {
    params::validate(&mut p, UPDATE)?;
    let expand = expand_of(&p);
    params::check_expand(&expand, EXPANDABLE)?;
    let current = account
        .cards
        .get(id)
        .ok_or_else(|| ApiError::no_such(NOUN, id))?;
    let mut next = current.clone();
    let status = str_of(&p, "status").and_then(CardStatus::parse);
    if current.status == CardStatus::Canceled && status.is_some() {
        return Err(ApiError::invalid(
            "This card has been canceled. Canceled cards cannot be reactivated or have their status changed.",
        )
        .with_param("status"));
    }
    let reason = str_of(&p, "cancellation_reason");
    if reason.is_some() && status != Some(CardStatus::Canceled) {
        return Err(ApiError::invalid(
            "cancellation_reason can only be provided when canceling a card (status=canceled).",
        )
        .with_param("cancellation_reason"));
    }
    if let Some(status) = status {
        next.status = status;
        if status == CardStatus::Canceled {
            next.cancellation_reason = reason.map(str::to_owned);
        }
    }
    if let Some(s) = obj_of(&p, "shipping") {
        if next.kind == CardType::Virtual {
            return Err(
                ApiError::invalid("Shipping can only be set on physical cards.")
                    .with_param("shipping"),
            );
        }
        next.shipping = Some(render_shipping(s)?);
    }
    if let Some(v) = p.get("personalization_design") {
        next.personalization_design = v.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    }
    next.spending_controls.apply(p.get("spending_controls"))?;
    apply_metadata(&mut next.metadata, p.get("metadata"))?;
    let body = next.render(account, Reveal::default(), &expand);
    account.cards.insert(next);
    Ok(body)
}

pub fn list(account: &AccountState, mut p: Map<String, Value>) -> Result<Value, ApiError> {
    params::validate(&mut p, LIST)?;
    let expand = expand_of(&p);
    params::check_list_expand(&expand, EXPANDABLE)?;
    let query = ListQuery::from_params(&p)?;
    let cardholder = str_of(&p, "cardholder");
    let status = str_of(&p, "status");
    let kind = str_of(&p, "type");
    let last4 = str_of(&p, "last4");
    let exp_month = int_of(&p, "exp_month");
    let exp_year = int_of(&p, "exp_year");
    let design = str_of(&p, "personalization_design");
    let page = paginate(&account.cards, &query, NOUN, |c| {
        cardholder.is_none_or(|h| c.cardholder == h)
            && status.is_none_or(|s| c.status.as_str() == s)
            && kind.is_none_or(|k| c.kind.as_str() == k)
            && last4.is_none_or(|l| c.last4 == l)
            && exp_month.is_none_or(|m| c.exp_month == m)
            && exp_year.is_none_or(|y| c.exp_year == y)
            && design.is_none_or(|d| c.personalization_design.as_deref() == Some(d))
    })?;
    let inner: Vec<String> = expand
        .iter()
        .filter_map(|e| e.strip_prefix("data.").map(str::to_owned))
        .collect();
    let data = page
        .items
        .iter()
        .map(|c| c.render(account, Reveal::default(), &inner))
        .collect();
    Ok(envelope(data, page.has_more, URL))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::faults::FaultState;
    use crate::emulator::form;
    use crate::emulator::{FaultConfig, pan::luhn_valid};

    const P: AccountKey = AccountKey::Platform;

    fn setup() -> (State, String) {
        let mut state = State::new(FaultState::from_config(&FaultConfig::default()));
        let ch = cardholder::create(
            state.account(&P),
            form::parse("name=Jenny+Rosen&billing[address][line1]=1&billing[address][city]=SF&billing[address][postal_code]=1&billing[address][country]=US")
                .expect("parses"),
            1_700_000_000,
        )
        .expect("cardholder");
        let id = ch["id"].as_str().map(str::to_owned).expect("id");
        (state, id)
    }

    fn create_q(state: &mut State, q: &str) -> Result<Value, ApiError> {
        create(state, &P, form::parse(q).expect("parses"), 1_700_000_000)
    }

    #[test]
    fn create_never_reveals_and_retrieve_does() {
        let (mut state, ch) = setup();
        let card = create_q(
            &mut state,
            &format!("currency=usd&type=virtual&cardholder={ch}&expand[0]=number&expand[1]=cvc"),
        )
        .expect("card");
        assert!(card.get("number").is_none() && card.get("cvc").is_none());
        assert_eq!(card["status"], "inactive");
        assert_eq!(card["cardholder"]["id"], ch.as_str());
        assert_eq!(card["exp_year"], 2026);
        let id = card["id"].as_str().expect("id");
        let plain = retrieve(state.account(&P), id, Map::new()).expect("retrieve");
        assert!(plain.get("number").is_none());
        let full = retrieve(
            state.account(&P),
            id,
            form::parse("expand[]=number&expand[]=cvc").expect("parses"),
        )
        .expect("retrieve");
        let number = full["number"].as_str().expect("number");
        assert!(luhn_valid(number));
        assert_eq!(&number[12..], full["last4"].as_str().expect("last4"));
        assert_eq!(full["cvc"].as_str().map(str::len), Some(3));
        let listed = list(state.account(&P), Map::new()).expect("list");
        assert!(listed["data"][0].get("number").is_none());
        // Debug never shows the number
        let debug = format!("{:?}", state.account(&P).cards.get(id));
        assert!(!debug.contains(number));
    }

    #[test]
    fn create_errors() {
        let (mut state, ch) = setup();
        let e = create_q(&mut state, "currency=usd&type=virtual").expect_err("no cardholder");
        assert_eq!(e.code, Some("parameter_missing"));
        assert_eq!(e.param.as_deref(), Some("cardholder"));
        let e = create_q(&mut state, "currency=usd&type=virtual&cardholder=ich_nope")
            .expect_err("unknown");
        assert_eq!(e.code, Some("resource_missing"));
        assert_eq!(e.status, http::StatusCode::BAD_REQUEST);
        let e = create_q(
            &mut state,
            &format!("currency=jpy&type=virtual&cardholder={ch}"),
        )
        .expect_err("currency");
        assert_eq!(e.param.as_deref(), Some("currency"));
        let e = create_q(
            &mut state,
            &format!("currency=usd&type=physical&cardholder={ch}"),
        )
        .expect_err("shipping");
        assert_eq!(e.param.as_deref(), Some("shipping"));
        let e = create_q(
            &mut state,
            &format!("currency=usd&type=virtual&cardholder={ch}&expand[]=bogus"),
        )
        .expect_err("expand");
        assert!(e.message.contains("cannot be expanded"));
        assert!(state.account(&P).cards.is_empty());
    }

    #[test]
    fn cancel_is_terminal() {
        let (mut state, ch) = setup();
        let card = create_q(
            &mut state,
            &format!("currency=usd&type=virtual&status=active&cardholder={ch}"),
        )
        .expect("card");
        let id = card["id"].as_str().expect("id");
        let a = state.account(&P);
        let e = update(
            a,
            id,
            form::parse("cancellation_reason=lost").expect("parses"),
        )
        .expect_err("reason alone");
        assert_eq!(e.param.as_deref(), Some("cancellation_reason"));
        let c = update(
            a,
            id,
            form::parse("status=canceled&cancellation_reason=lost").expect("parses"),
        )
        .expect("cancel");
        assert_eq!(c["status"], "canceled");
        assert_eq!(c["cancellation_reason"], "lost");
        let e = update(a, id, form::parse("status=active").expect("parses")).expect_err("terminal");
        assert_eq!(e.param.as_deref(), Some("status"));
        let c = update(a, id, form::parse("metadata[note]=x").expect("parses"))
            .expect("metadata still ok");
        assert_eq!(c["metadata"]["note"], "x");
    }

    #[test]
    fn list_filters_and_replacement() {
        let (mut state, ch) = setup();
        let first = create_q(
            &mut state,
            &format!("currency=usd&type=virtual&cardholder={ch}"),
        )
        .expect("card");
        let first_id = first["id"].as_str().expect("id").to_owned();
        let second = create_q(
            &mut state,
            &format!("currency=usd&type=virtual&cardholder={ch}&status=active&replacement_for={first_id}&replacement_reason=lost&expand[]=replacement_for"),
        )
        .expect("card");
        assert_eq!(second["replacement_for"]["id"], first_id.as_str());
        let a = state.account(&P);
        let all = list(a, Map::new()).expect("list");
        assert_eq!(all["data"][0]["id"], second["id"]);
        assert_eq!(all["data"][1]["replaced_by"], second["id"]);
        let active = list(a, form::parse("status=active").expect("parses")).expect("list");
        assert_eq!(active["data"].as_array().map(Vec::len), Some(1));
        let l4 = first["last4"].as_str().expect("last4");
        let by_last4 = list(
            a,
            form::parse(&format!("last4={l4}&limit=1")).expect("parses"),
        )
        .expect("list");
        assert_eq!(by_last4["data"][0]["last4"], l4);
        let page = list(a, form::parse("limit=1").expect("parses")).expect("list");
        assert_eq!(page["has_more"], true);
        let e = list(a, form::parse("limit=101").expect("parses")).expect_err("limit");
        assert_eq!(e.param.as_deref(), Some("limit"));
    }
}
