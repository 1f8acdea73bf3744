//! `issuing.cardholder`: create, retrieve, update, list.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::controls::{Owner, SpendingControls};
use super::list::{ListQuery, envelope, paginate};
use crate::emulator::catalog;
use crate::emulator::error::ApiError;
use crate::emulator::ids;
use crate::emulator::params::{
    self, ADDRESS, ArrayParam, CARDHOLDER_SPENDING_CONTROLS, EXPAND, LIST_COMMON, METADATA, Shape,
    apply_metadata, array_of, expand_of, int_of, obj_of, str_of, strings,
};
use crate::emulator::state::{AccountState, StoredObject};

pub const NOUN: &str = "cardholder";
pub const URL: &str = "/v1/issuing/cardholders";
/// Longest name Stripe prints on a card.
pub const MAX_NAME_CHARS: usize = 24;

const LOCALES: &[&str] = &["de", "en", "es", "fr", "it"];

const INDIVIDUAL: Shape = Shape::Obj(&[
    (
        "card_issuing",
        Shape::Obj(&[(
            "user_terms_acceptance",
            Shape::Obj(&[
                ("date", Shape::Int(0, i64::MAX)),
                ("ip", Shape::Str(5000)),
                ("user_agent", Shape::Str(5000)),
            ]),
        )]),
    ),
    (
        "dob",
        Shape::Obj(&[
            ("day", Shape::Int(1, 31)),
            ("month", Shape::Int(1, 12)),
            ("year", Shape::Int(1900, 9999)),
        ]),
    ),
    ("first_name", Shape::Str(5000)),
    ("last_name", Shape::Str(5000)),
    (
        "verification",
        Shape::Obj(&[(
            "document",
            Shape::Obj(&[("back", Shape::Str(5000)), ("front", Shape::Str(5000))]),
        )]),
    ),
]);

const CREATE: &[(&str, Shape)] = &[
    ("billing", Shape::Obj(&[("address", ADDRESS)])),
    ("company", Shape::Obj(&[("tax_id", Shape::Str(5000))])),
    ("email", Shape::Str(5000)),
    EXPAND,
    ("individual", INDIVIDUAL),
    METADATA,
    ("name", Shape::Str(5000)),
    ("phone_number", Shape::Str(5000)),
    ("preferred_locales", Shape::Arr(&Shape::Enum(LOCALES))),
    ("spending_controls", CARDHOLDER_SPENDING_CONTROLS),
    ("status", Shape::Enum(&["active", "inactive"])),
    ("type", Shape::Enum(&["company", "individual"])),
];

const UPDATE: &[(&str, Shape)] = &[
    ("billing", Shape::Obj(&[("address", ADDRESS)])),
    ("company", Shape::Obj(&[("tax_id", Shape::Str(5000))])),
    ("email", Shape::Str(5000)),
    EXPAND,
    ("individual", INDIVIDUAL),
    METADATA,
    ("phone_number", Shape::Str(5000)),
    ("preferred_locales", Shape::Arr(&Shape::Enum(LOCALES))),
    ("spending_controls", CARDHOLDER_SPENDING_CONTROLS),
    ("status", Shape::Enum(&["active", "inactive"])),
];

const RETRIEVE: &[(&str, Shape)] = &[EXPAND];

const LIST: &[(&str, Shape)] = &[
    LIST_COMMON[0],
    LIST_COMMON[1],
    LIST_COMMON[2],
    LIST_COMMON[3],
    LIST_COMMON[4],
    ("email", Shape::Str(5000)),
    ("phone_number", Shape::Str(5000)),
    ("status", Shape::Enum(&["active", "blocked", "inactive"])),
    ("type", Shape::Enum(&["company", "individual"])),
];

/// Cardholders have nothing we expand; Stripe's file ids under `individual` are
/// accepted and left as ids.
const EXPANDABLE: &[&str] = &[
    "individual.verification.document.back",
    "individual.verification.document.front",
];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Address {
    pub line1: Option<String>,
    pub line2: Option<String>,
    pub city: Option<String>,
    pub state: Option<String>,
    pub postal_code: Option<String>,
    pub country: Option<String>,
}

impl Address {
    fn render(&self) -> Value {
        json!({
            "city": self.city,
            "country": self.country,
            "line1": self.line1,
            "line2": self.line2,
            "postal_code": self.postal_code,
            "state": self.state,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Individual {
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub dob: Option<(i64, i64, i64)>,
    pub terms_date: Option<i64>,
    pub terms_ip: Option<String>,
    pub terms_user_agent: Option<String>,
    pub document_front: Option<String>,
    pub document_back: Option<String>,
}

impl Individual {
    fn render(&self) -> Value {
        let terms =
            self.terms_date.is_some() || self.terms_ip.is_some() || self.terms_user_agent.is_some();
        json!({
            "card_issuing": if terms {
                json!({"user_terms_acceptance": {
                    "date": self.terms_date,
                    "ip": self.terms_ip,
                    "user_agent": self.terms_user_agent,
                }})
            } else {
                Value::Null
            },
            "dob": match self.dob {
                Some((day, month, year)) => json!({"day": day, "month": month, "year": year}),
                None => json!({"day": null, "month": null, "year": null}),
            },
            "first_name": self.first_name,
            "last_name": self.last_name,
            "verification": {"document": {
                "back": self.document_back,
                "front": self.document_front,
            }},
        })
    }
}

#[derive(Debug, Clone)]
pub struct Cardholder {
    pub id: String,
    pub created: i64,
    pub name: String,
    /// `individual` or `company`.
    pub kind: String,
    /// `active`, `inactive` or `blocked`.
    pub status: String,
    pub email: Option<String>,
    pub phone_number: Option<String>,
    pub billing: Address,
    pub individual: Option<Individual>,
    pub company_tax_id_provided: Option<bool>,
    pub preferred_locales: Option<Vec<String>>,
    pub spending_controls: SpendingControls,
    pub metadata: BTreeMap<String, String>,
}

impl StoredObject for Cardholder {
    fn id(&self) -> &str {
        &self.id
    }
    fn created(&self) -> i64 {
        self.created
    }
}

impl Cardholder {
    /// The `issuing.cardholder` JSON (also embedded in cards).
    pub fn render(&self) -> Value {
        json!({
            "id": self.id,
            "object": "issuing.cardholder",
            "billing": {"address": self.billing.render()},
            "company": self.company_tax_id_provided.map(|p| json!({"tax_id_provided": p})),
            "created": self.created,
            "email": self.email,
            "individual": self.individual.as_ref().map(Individual::render),
            "livemode": false,
            "metadata": self.metadata,
            "name": self.name,
            "phone_number": self.phone_number,
            "preferred_locales": self.preferred_locales,
            "requirements": {"disabled_reason": null, "past_due": []},
            "spending_controls": self.spending_controls.render(Owner::Cardholder, None),
            "status": self.status,
            "type": self.kind,
        })
    }
}

fn validate_name(name: &str) -> Result<(), ApiError> {
    let chars = name.chars().count();
    let allowed = |c: char| c.is_alphabetic() || matches!(c, ' ' | '.' | '\'' | '-');
    if chars > MAX_NAME_CHARS || !name.chars().all(allowed) || name.trim().is_empty() {
        return Err(ApiError::invalid(format!(
            "Invalid name: '{name}'. The name is printed on cards, must be at most {MAX_NAME_CHARS} characters and cannot contain numbers or special characters."
        ))
        .with_param("name"));
    }
    Ok(())
}

fn validate_email(email: &str) -> Result<(), ApiError> {
    let ok = email.split_once('@').is_some_and(|(local, domain)| {
        !local.is_empty() && domain.contains('.') && !domain.contains('@')
    }) && !email.contains(char::is_whitespace);
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!("Invalid email address: {email}"))
            .with_code("email_invalid")
            .with_param("email"))
    }
}

/// `billing[address]`: on create the four required fields must be present.
fn read_billing(billing: &Map<String, Value>) -> Result<Address, ApiError> {
    let address =
        obj_of(billing, "address").ok_or_else(|| ApiError::missing("billing[address]"))?;
    let req = |k: &str| {
        str_of(address, k)
            .map(str::to_owned)
            .ok_or_else(|| ApiError::missing(&format!("billing[address][{k}]")))
    };
    let line1 = req("line1")?;
    let city = req("city")?;
    let postal_code = req("postal_code")?;
    let country = req("country")?;
    if !catalog::is_country(&country) {
        return Err(ApiError::invalid(format!(
            "Country '{country}' is unknown. Try using a 2-character alphanumeric country code instead, such as 'US', 'EG', or 'GB'. A full list of country codes is available at https://stripe.com/docs/api#country_codes"
        ))
        .with_param("billing[address][country]"));
    }
    Ok(Address {
        line1: Some(line1),
        line2: str_of(address, "line2").map(str::to_owned),
        city: Some(city),
        state: str_of(address, "state").map(str::to_owned),
        postal_code: Some(postal_code),
        country: Some(country),
    })
}

fn apply_individual(
    target: &mut Option<Individual>,
    param: Option<&Value>,
) -> Result<(), ApiError> {
    let map = match param {
        None => return Ok(()),
        Some(Value::Object(map)) => map,
        Some(_) => {
            *target = None;
            return Ok(());
        }
    };
    let ind = target.get_or_insert_with(Individual::default);
    let set = |slot: &mut Option<String>, m: &Map<String, Value>, k: &str| {
        if let Some(v) = m.get(k) {
            *slot = v.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
        }
    };
    set(&mut ind.first_name, map, "first_name");
    set(&mut ind.last_name, map, "last_name");
    if let Some(v) = map.get("dob") {
        ind.dob = match v.as_object() {
            Some(dob) => {
                let part = |k: &str| {
                    int_of(dob, k)
                        .ok_or_else(|| ApiError::missing(&format!("individual[dob][{k}]")))
                };
                Some((part("day")?, part("month")?, part("year")?))
            }
            None => None,
        };
    }
    if let Some(terms) =
        obj_of(map, "card_issuing").and_then(|c| obj_of(c, "user_terms_acceptance"))
    {
        if let Some(v) = terms.get("date") {
            ind.terms_date = v.as_i64();
        }
        set(&mut ind.terms_ip, terms, "ip");
        set(&mut ind.terms_user_agent, terms, "user_agent");
    }
    if let Some(doc) = obj_of(map, "verification").and_then(|v| obj_of(v, "document")) {
        set(&mut ind.document_front, doc, "front");
        set(&mut ind.document_back, doc, "back");
    }
    Ok(())
}

/// Fields settable on both create and update.
fn apply_common(ch: &mut Cardholder, p: &Map<String, Value>) -> Result<(), ApiError> {
    if let Some(v) = p.get("email") {
        ch.email = v.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
        if let Some(email) = &ch.email {
            validate_email(email)?;
        }
    }
    if let Some(v) = p.get("phone_number") {
        ch.phone_number = v.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    }
    if let Some(v) = p.get("company") {
        ch.company_tax_id_provided = v.as_object().map(|c| str_of(c, "tax_id").is_some());
    }
    apply_individual(&mut ch.individual, p.get("individual"))?;
    match array_of(p, "preferred_locales") {
        ArrayParam::Absent => {}
        ArrayParam::Unset => ch.preferred_locales = None,
        ArrayParam::Set(items) => ch.preferred_locales = Some(strings(items)),
    }
    if let Some(status) = str_of(p, "status") {
        ch.status = status.to_owned();
    }
    ch.spending_controls.apply(p.get("spending_controls"))?;
    apply_metadata(&mut ch.metadata, p.get("metadata"))?;
    Ok(())
}

pub fn create(
    account: &mut AccountState,
    mut p: Map<String, Value>,
    now: i64,
) -> Result<Value, ApiError> {
    params::validate(&mut p, CREATE)?;
    params::check_expand(&expand_of(&p), EXPANDABLE)?;
    let name = params::required_str(&p, "name", "name")?.to_owned();
    let billing = obj_of(&p, "billing").ok_or_else(|| ApiError::missing("billing"))?;
    let billing = read_billing(billing)?;
    validate_name(&name)?;
    let mut ch = Cardholder {
        id: ids::object_id("ich_"),
        created: now,
        name,
        kind: str_of(&p, "type").unwrap_or("individual").to_owned(),
        status: "active".to_owned(),
        email: None,
        phone_number: None,
        billing,
        individual: None,
        company_tax_id_provided: None,
        preferred_locales: None,
        spending_controls: SpendingControls::default(),
        metadata: BTreeMap::new(),
    };
    apply_common(&mut ch, &p)?;
    let body = ch.render();
    account.cardholders.insert(ch);
    Ok(body)
}

pub fn retrieve(
    account: &AccountState,
    id: &str,
    mut p: Map<String, Value>,
) -> Result<Value, ApiError> {
    params::validate(&mut p, RETRIEVE)?;
    params::check_expand(&expand_of(&p), EXPANDABLE)?;
    account
        .cardholders
        .get(id)
        .map(Cardholder::render)
        .ok_or_else(|| ApiError::no_such(NOUN, id))
}

pub fn update(
    account: &mut AccountState,
    id: &str,
    mut p: Map<String, Value>,
) -> Result<Value, ApiError> {
    params::validate(&mut p, UPDATE)?;
    params::check_expand(&expand_of(&p), EXPANDABLE)?;
    let current = account
        .cardholders
        .get(id)
        .ok_or_else(|| ApiError::no_such(NOUN, id))?;
    let mut next = current.clone();
    if let Some(billing) = obj_of(&p, "billing") {
        next.billing = read_billing(billing)?;
    }
    apply_common(&mut next, &p)?;
    let body = next.render();
    account.cardholders.insert(next);
    Ok(body)
}

pub fn list(account: &AccountState, mut p: Map<String, Value>) -> Result<Value, ApiError> {
    params::validate(&mut p, LIST)?;
    params::check_list_expand(&expand_of(&p), EXPANDABLE)?;
    let query = ListQuery::from_params(&p)?;
    let email = str_of(&p, "email");
    let phone = str_of(&p, "phone_number");
    let status = str_of(&p, "status");
    let kind = str_of(&p, "type");
    let page = paginate(&account.cardholders, &query, NOUN, |c| {
        email.is_none_or(|e| c.email.as_deref() == Some(e))
            && phone.is_none_or(|ph| c.phone_number.as_deref() == Some(ph))
            && status.is_none_or(|s| c.status == s)
            && kind.is_none_or(|k| c.kind == k)
    })?;
    let data = page.items.iter().map(|c| c.render()).collect();
    Ok(envelope(data, page.has_more, URL))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::form;

    fn create_q(account: &mut AccountState, q: &str) -> Result<Value, ApiError> {
        create(account, form::parse(q).expect("parses"), 1_700_000_000)
    }

    const BASE: &str = "name=Jenny+Rosen&billing[address][line1]=1+Main&billing[address][city]=SF&billing[address][postal_code]=94111&billing[address][country]=US";

    #[test]
    fn create_defaults_and_shape() {
        let mut a = AccountState::default();
        let ch = create_q(&mut a, &format!("{BASE}&email=j@example.com&metadata[k]=v"))
            .expect("created");
        assert!(ch["id"].as_str().is_some_and(|id| id.starts_with("ich_")));
        assert_eq!(ch["object"], "issuing.cardholder");
        assert_eq!(ch["status"], "active");
        assert_eq!(ch["type"], "individual");
        assert_eq!(ch["livemode"], false);
        assert_eq!(ch["billing"]["address"]["line2"], Value::Null);
        assert_eq!(ch["metadata"]["k"], "v");
        assert_eq!(ch["individual"], Value::Null);
    }

    #[test]
    fn create_validation() {
        let mut a = AccountState::default();
        let e = create_q(&mut a, "billing[address][line1]=x").expect_err("name");
        assert_eq!(e.message, "Missing required param: name.");
        let e = create_q(&mut a, "name=Jenny").expect_err("billing");
        assert_eq!(e.param.as_deref(), Some("billing"));
        let e = create_q(
            &mut a,
            "name=Jenny&billing[address][line1]=1&billing[address][city]=SF&billing[address][country]=US",
        )
        .expect_err("postal");
        assert_eq!(e.param.as_deref(), Some("billing[address][postal_code]"));
        let e = create_q(&mut a, &BASE.replace("Jenny+Rosen", "Agent+007")).expect_err("digits");
        assert_eq!(e.param.as_deref(), Some("name"));
        let e = create_q(&mut a, &format!("{BASE}&email=nope")).expect_err("email");
        assert_eq!(e.param.as_deref(), Some("email"));
        let e = create_q(&mut a, &format!("{BASE}&status=blocked")).expect_err("status");
        assert_eq!(e.param.as_deref(), Some("status"));
        assert!(a.cardholders.is_empty());
    }

    #[test]
    fn update_and_list() {
        let mut a = AccountState::default();
        let id = create_q(&mut a, BASE).expect("created")["id"]
            .as_str()
            .map(str::to_owned)
            .expect("id");
        let p = form::parse("status=inactive&individual[first_name]=Jenny&individual[dob][day]=1&individual[dob][month]=2&individual[dob][year]=1990")
            .expect("parses");
        let ch = update(&mut a, &id, p).expect("updated");
        assert_eq!(ch["status"], "inactive");
        assert_eq!(ch["individual"]["first_name"], "Jenny");
        assert_eq!(ch["individual"]["dob"]["year"], 1990);
        let e = update(&mut a, "ich_missing", Map::new()).expect_err("missing");
        assert_eq!(e.status, http::StatusCode::NOT_FOUND);
        let l = list(&a, form::parse("status=inactive").expect("parses")).expect("list");
        assert_eq!(l["data"].as_array().map(Vec::len), Some(1));
        assert_eq!(l["url"], URL);
        let l = list(&a, form::parse("status=active").expect("parses")).expect("list");
        assert_eq!(l["data"].as_array().map(Vec::len), Some(0));
        assert!(list(&a, form::parse("expand[]=data.foo").expect("parses")).is_err());
    }
}
