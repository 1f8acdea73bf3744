//! Purchase intents: the wire request an agent sends, and its validated form.

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use super::category;
use super::merchant::{normalize_country, normalize_domain, normalize_name};
use super::money::{Currency, CurrencyError, MAX_AMOUNT_MINOR, Money};

pub const MAX_NAME_LEN: usize = 200;
pub const MAX_DESCRIPTION_LEN: usize = 1000;
pub const MAX_URL_LEN: usize = 2048;
pub const MAX_LINE_ITEMS: usize = 100;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The merchant an agent wants to pay.
#[derive(
    Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct MerchantInput {
    /// The merchant's name as shown at checkout, e.g. "Namecheap". Must contain a letter or
    /// digit; no control characters (surrounding whitespace is trimmed).
    #[schema(
        max_length = 200,
        min_length = 1,
        example = "Namecheap",
        pattern = r"^[\t\n\x0B\x0C\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*(?:[^\t\n\x0B\x0C\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000\x00-\x1F\x7F-\x9F][^\x00-\x08\x0B-\x1F\x7F-\x9F]*)?[^\W_](?:[^\x00-\x08\x0B-\x1F\x7F-\x9F]*[^\t\n\x0B\x0C\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000\x00-\x1F\x7F-\x9F])?[\t\n\x0B\x0C\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*$"
    )]
    pub name: String,
    /// The checkout URL or the merchant's site; its host is matched against domain rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        max_length = 2048,
        example = "https://www.namecheap.com/checkout",
        pattern = r"^https?://[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?){1,3}\.?(?::[0-9]{1,5})?(?:[/?#]\S*)?$"
    )]
    pub url: Option<String>,
    /// The merchant's domain, if no URL is given, e.g. "namecheap.com".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        max_length = 253,
        example = "namecheap.com",
        pattern = r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?){1,3}\.?$"
    )]
    pub domain: Option<String>,
    /// ISO 3166-1 alpha-2 country of the merchant, e.g. "US".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        example = "US",
        min_length = 2,
        max_length = 2,
        pattern = "^[A-Za-z]{2}$"
    )]
    pub country: Option<String>,
    /// Four-digit merchant category code (MCC), e.g. "5734".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "5734", pattern = "^[0-9]{4}$")]
    pub mcc: Option<String>,
    /// Stripe merchant category name, e.g. "computer_software_stores".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "computer_software_stores", max_length = 100)]
    pub category: Option<String>,
}

/// One line of what is being bought.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LineItemInput {
    /// What this line is; no control characters other than tab and newline.
    #[schema(
        max_length = 200,
        min_length = 1,
        pattern = r"^[\t\n\x0B\x0C\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*[^\t\n\x0B\x0C\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000\x00-\x1F\x7F-\x9F](?:[^\x00-\x08\x0B-\x1F\x7F-\x9F]*[^\t\n\x0B\x0C\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000\x00-\x1F\x7F-\x9F])?[\t\n\x0B\x0C\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*$"
    )]
    pub description: String,
    #[serde(default = "one", deserialize_with = "u32_or_whole_float")]
    #[schema(minimum = 1, maximum = 10000, default = 1)]
    pub quantity: u32,
    /// Price of one unit in minor units of the intent's currency.
    #[serde(deserialize_with = "int_or_whole_float")]
    #[schema(minimum = 0, maximum = 99999999)]
    pub unit_amount: i64,
}

fn one() -> u32 {
    1
}

/// A purchase an agent asks Roony to approve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PurchaseRequest {
    /// Amount in minor units (cents for USD): 1200 is USD 12.00.
    #[serde(deserialize_with = "int_or_whole_float")]
    #[schema(minimum = 1, maximum = 99999999, example = 1200)]
    pub amount: i64,
    /// ISO 4217 currency code, any case ("usd" or "USD").
    #[schema(
        example = "usd",
        min_length = 3,
        max_length = 3,
        pattern = "^[A-Za-z]{3}$"
    )]
    pub currency: String,
    pub merchant: MerchantInput,
    /// What is being bought and why, in a sentence; no control characters other than tab and
    /// newline.
    #[schema(
        max_length = 1000,
        min_length = 1,
        example = "Register roony-demo.dev for one year",
        pattern = r"^[\t\n\x0B\x0C\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*[^\t\n\x0B\x0C\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000\x00-\x1F\x7F-\x9F](?:[^\x00-\x08\x0B-\x1F\x7F-\x9F]*[^\t\n\x0B\x0C\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000\x00-\x1F\x7F-\x9F])?[\t\n\x0B\x0C\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*$"
    )]
    pub description: String,
    /// Optional breakdown; when given, it must add up to `amount`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 100)]
    pub line_items: Vec<LineItemInput>,
    /// Makes retries safe: the same key with the same body returns the same intent and never
    /// a second card. Also accepted as the `Idempotency-Key` header. Printable ASCII, no spaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 255, min_length = 1, pattern = "^[!-~]+$")]
    pub idempotency_key: Option<String>,
    /// How the card is handed over: `raw` returns its number and CVC once; `vault` returns
    /// placeholders (`{{roony:card:<intent>:number}}`, `:cvc`, `:exp_month`, `:exp_year`)
    /// that the sidecar's egress proxy replaces with the real values only in requests to the
    /// merchant. Default: the policy's `card_delivery` (`raw` unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_delivery: Option<CardDelivery>,
}

/// How a card's number and CVC reach the agent.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum CardDelivery {
    /// The number and CVC are returned once, in the response that created the card.
    Raw,
    /// Placeholders are returned; the egress proxy substitutes the real values.
    Vault,
}

/// Accepts integers, and whole numbers written as floats (`1200.0`, as some JSON encoders and
/// OpenAPI 3.1 tooling send them); rejects fractions, since amounts are minor units.
fn int_or_whole_float<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    whole_number(d)?.ok_or_else(|| {
        serde::de::Error::custom("amounts are integers in minor units (1200 means USD 12.00)")
    })
}

/// Like `int_or_whole_float`, for counts such as `quantity`.
fn u32_or_whole_float<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    whole_number(d)?
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| serde::de::Error::custom("quantity must be a whole number"))
}

/// A JSON number that is an integer or a float with no fractional part; `None` otherwise.
fn whole_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    if let Some(i) = n.as_i64() {
        return Ok(Some(i));
    }
    Ok(match n.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(f as i64),
        _ => None,
    })
}

/// A validated merchant: normalized for matching.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Merchant {
    pub name: String,
    pub normalized_name: String,
    pub domain: Option<String>,
    pub country: Option<String>,
    pub mcc: Option<u16>,
    pub category: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineItem {
    pub description: String,
    pub quantity: u32,
    pub unit_amount: i64,
}

/// A purchase request that passed validation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseIntent {
    pub amount: Money,
    pub merchant: Merchant,
    pub description: String,
    pub line_items: Vec<LineItem>,
    pub idempotency_key: Option<String>,
    /// The requested (then, once decided, the effective) card delivery. Absent means raw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_delivery: Option<CardDelivery>,
}

/// Why a purchase request is invalid: a stable code, the field, and a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub code: &'static str,
    pub field: &'static str,
    pub message: String,
}

fn invalid(code: &'static str, field: &'static str, message: impl Into<String>) -> ValidationError {
    ValidationError {
        code,
        field,
        message: message.into(),
    }
}

fn check_text(field: &'static str, value: &str, max: usize) -> Result<String, ValidationError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(invalid(
            "missing_field",
            field,
            format!("{field} must not be empty"),
        ));
    }
    if trimmed.chars().count() > max {
        return Err(invalid(
            "field_too_long",
            field,
            format!("{field} is longer than {max} characters"),
        ));
    }
    if trimmed
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(invalid(
            "invalid_characters",
            field,
            format!("{field} contains control characters"),
        ));
    }
    Ok(trimmed.to_string())
}

impl PurchaseRequest {
    /// Validates and normalizes the request. The header idempotency key, if any, is used when
    /// the body has none; if both are given they must agree.
    pub fn validate(&self, header_key: Option<&str>) -> Result<PurchaseIntent, ValidationError> {
        let currency = Currency::parse(&self.currency).map_err(|e| match e {
            CurrencyError::Malformed => invalid(
                "invalid_currency",
                "currency",
                "currency must be a three-letter ISO 4217 code such as \"usd\"",
            ),
            CurrencyError::Unknown(c) => invalid(
                "unknown_currency",
                "currency",
                format!("unknown currency {c:?}; use an ISO 4217 code such as \"usd\""),
            ),
        })?;
        if self.amount <= 0 {
            return Err(invalid(
                "invalid_amount",
                "amount",
                "amount must be a positive integer in minor units (1200 means USD 12.00)",
            ));
        }
        if self.amount > MAX_AMOUNT_MINOR {
            return Err(invalid(
                "amount_too_large",
                "amount",
                format!("amount must be at most {MAX_AMOUNT_MINOR} minor units"),
            ));
        }
        let merchant = self.merchant.validate()?;
        let description = check_text("description", &self.description, MAX_DESCRIPTION_LEN)?;
        if self.line_items.len() > MAX_LINE_ITEMS {
            return Err(invalid(
                "too_many_line_items",
                "line_items",
                format!("at most {MAX_LINE_ITEMS} line items"),
            ));
        }
        let mut line_items = Vec::with_capacity(self.line_items.len());
        let mut total: i64 = 0;
        for item in &self.line_items {
            let description =
                check_text("line_items.description", &item.description, MAX_NAME_LEN)?;
            if item.quantity == 0 || item.quantity > 10_000 {
                return Err(invalid(
                    "invalid_quantity",
                    "line_items.quantity",
                    "quantity must be between 1 and 10000",
                ));
            }
            if item.unit_amount < 0 || item.unit_amount > MAX_AMOUNT_MINOR {
                return Err(invalid(
                    "invalid_amount",
                    "line_items.unit_amount",
                    "unit_amount must be between 0 and 99999999 minor units",
                ));
            }
            total = total.saturating_add(item.unit_amount.saturating_mul(i64::from(item.quantity)));
            line_items.push(LineItem {
                description,
                quantity: item.quantity,
                unit_amount: item.unit_amount,
            });
        }
        if !line_items.is_empty() && total != self.amount {
            return Err(invalid(
                "line_items_mismatch",
                "line_items",
                format!(
                    "line items add up to {} but amount is {}",
                    Money::new(total, currency),
                    Money::new(self.amount, currency)
                ),
            ));
        }
        let idempotency_key = match (self.idempotency_key.as_deref(), header_key) {
            (Some(a), Some(b)) if a != b => {
                return Err(invalid(
                    "idempotency_key_conflict",
                    "idempotency_key",
                    "the Idempotency-Key header and the body's idempotency_key differ",
                ));
            }
            (Some(k), _) | (None, Some(k)) => Some(validate_idempotency_key(k)?),
            (None, None) => None,
        };
        Ok(PurchaseIntent {
            amount: Money::new(self.amount, currency),
            merchant,
            description,
            line_items,
            idempotency_key,
            card_delivery: self.card_delivery,
        })
    }
}

fn validate_idempotency_key(key: &str) -> Result<String, ValidationError> {
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY_LEN
        || !key.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(invalid(
            "invalid_idempotency_key",
            "idempotency_key",
            "idempotency key must be 1 to 255 printable ASCII characters",
        ));
    }
    Ok(key.to_string())
}

impl MerchantInput {
    fn validate(&self) -> Result<Merchant, ValidationError> {
        let name = check_text("merchant.name", &self.name, MAX_NAME_LEN)?;
        let normalized_name = normalize_name(&name);
        if normalized_name.is_empty() {
            return Err(invalid(
                "invalid_merchant_name",
                "merchant.name",
                "merchant name must contain letters or digits",
            ));
        }
        let mut domain = None;
        for (field, value) in [
            ("merchant.url", &self.url),
            ("merchant.domain", &self.domain),
        ] {
            if let Some(v) = value {
                if v.len() > MAX_URL_LEN {
                    return Err(invalid(
                        "field_too_long",
                        field,
                        format!("{field} is longer than {MAX_URL_LEN} characters"),
                    ));
                }
                let d = normalize_domain(v).ok_or_else(|| {
                    invalid(
                        "invalid_merchant_domain",
                        field,
                        format!("{field} must be a URL or domain such as \"example.com\""),
                    )
                })?;
                match &domain {
                    Some(existing) if existing != &d => {
                        return Err(invalid(
                            "merchant_domain_conflict",
                            field,
                            "merchant.url and merchant.domain name different hosts",
                        ));
                    }
                    _ => domain = Some(d),
                }
            }
        }
        let country = match &self.country {
            Some(c) => Some(normalize_country(c).ok_or_else(|| {
                invalid(
                    "invalid_country",
                    "merchant.country",
                    "merchant.country must be an ISO 3166-1 alpha-2 code such as \"US\"",
                )
            })?),
            None => None,
        };
        let mcc = match &self.mcc {
            Some(m) => {
                let parsed = (m.len() == 4 && m.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| m.parse::<u16>().ok())
                    .flatten()
                    .ok_or_else(|| {
                        invalid(
                            "invalid_mcc",
                            "merchant.mcc",
                            "merchant.mcc must be four digits",
                        )
                    })?;
                Some(parsed)
            }
            None => None,
        };
        let category = match &self.category {
            Some(c) => {
                let c = c.trim().to_ascii_lowercase();
                if !category::is_known_category(&c) {
                    return Err(invalid(
                        "unknown_category",
                        "merchant.category",
                        format!("{c:?} is not a Stripe merchant category"),
                    ));
                }
                if let Some(m) = mcc
                    && category::category_for_mcc(m).is_some_and(|from_mcc| from_mcc != c)
                {
                    return Err(invalid(
                        "category_mcc_mismatch",
                        "merchant.category",
                        format!("merchant.category {c:?} does not match MCC {m:04}"),
                    ));
                }
                Some(c)
            }
            None => mcc.and_then(category::category_for_mcc).map(str::to_string),
        };
        let mcc = mcc.or_else(|| category.as_deref().and_then(category::mcc_for_category));
        Ok(Merchant {
            name,
            normalized_name,
            domain,
            country,
            mcc,
            category,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_item(quantity: serde_json::Value) -> Result<LineItemInput, serde_json::Error> {
        serde_json::from_value(serde_json::json!({
            "description": "x", "quantity": quantity, "unit_amount": 100.0
        }))
    }

    #[test]
    fn whole_float_counts_and_amounts_are_integers() {
        let item = line_item(serde_json::json!(2.0)).unwrap();
        assert_eq!((item.quantity, item.unit_amount), (2, 100));
        assert_eq!(line_item(serde_json::json!(3)).unwrap().quantity, 3);
        for bad in [
            serde_json::json!(1.5),
            serde_json::json!(-1),
            serde_json::json!(5e9),
            serde_json::json!("2"),
        ] {
            assert!(line_item(bad.clone()).is_err(), "{bad}");
        }
    }
}
