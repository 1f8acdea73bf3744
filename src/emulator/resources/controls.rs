//! Spending controls shared by cards and cardholders.

use serde_json::{Map, Value, json};

use crate::emulator::error::ApiError;
use crate::emulator::params::{ArrayParam, array_of, int_of, str_of, strings};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendingLimit {
    pub amount: i64,
    pub interval: String,
    pub categories: Option<Vec<String>>,
}

/// `spending_controls` as stored. `None` lists were never set (or were unset).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpendingControls {
    pub allowed_categories: Option<Vec<String>>,
    pub blocked_categories: Option<Vec<String>>,
    pub allowed_merchant_countries: Option<Vec<String>>,
    pub blocked_merchant_countries: Option<Vec<String>>,
    pub allowed_card_presences: Option<Vec<String>>,
    pub blocked_card_presences: Option<Vec<String>>,
    pub spending_limits: Vec<SpendingLimit>,
    pub spending_limits_currency: Option<String>,
}

/// How unset lists render: cards use `null`, cardholders `[]` (as Stripe's fixtures do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Card,
    Cardholder,
}

fn set_list(target: &mut Option<Vec<String>>, params: &Map<String, Value>, key: &str) {
    match array_of(params, key) {
        ArrayParam::Absent => {}
        ArrayParam::Unset => *target = None,
        ArrayParam::Set(items) => {
            let values = strings(items);
            *target = if values.is_empty() {
                None
            } else {
                Some(values)
            };
        }
    }
}

fn both_set(a: &Option<Vec<String>>, b: &Option<Vec<String>>) -> bool {
    a.as_ref().is_some_and(|v| !v.is_empty()) && b.as_ref().is_some_and(|v| !v.is_empty())
}

impl SpendingControls {
    /// Apply a validated `spending_controls` parameter. Each given field replaces the
    /// stored one, an empty value unsets it, absent fields stay; `spending_controls=`
    /// clears everything. Allowed/blocked pairs may not both be set afterwards.
    pub fn apply(&mut self, param: Option<&Value>) -> Result<(), ApiError> {
        let params = match param {
            None => return Ok(()),
            Some(Value::Object(map)) => map,
            Some(_) => {
                *self = SpendingControls::default();
                return Ok(());
            }
        };
        let mut next = self.clone();
        set_list(&mut next.allowed_categories, params, "allowed_categories");
        set_list(&mut next.blocked_categories, params, "blocked_categories");
        set_list(
            &mut next.allowed_merchant_countries,
            params,
            "allowed_merchant_countries",
        );
        set_list(
            &mut next.blocked_merchant_countries,
            params,
            "blocked_merchant_countries",
        );
        set_list(
            &mut next.allowed_card_presences,
            params,
            "allowed_card_presences",
        );
        set_list(
            &mut next.blocked_card_presences,
            params,
            "blocked_card_presences",
        );
        match array_of(params, "spending_limits") {
            ArrayParam::Absent => {}
            ArrayParam::Unset => next.spending_limits.clear(),
            ArrayParam::Set(items) => {
                let mut limits = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let Some(limit) = item.as_object() else {
                        continue; // an empty entry (`spending_limits[0]=`)
                    };
                    let path = format!("spending_controls[spending_limits][{i}]");
                    let amount = int_of(limit, "amount")
                        .ok_or_else(|| ApiError::missing(&format!("{path}[amount]")))?;
                    let interval = str_of(limit, "interval")
                        .ok_or_else(|| ApiError::missing(&format!("{path}[interval]")))?;
                    let categories = match array_of(limit, "categories") {
                        ArrayParam::Set(c) => Some(strings(c)).filter(|c| !c.is_empty()),
                        _ => None,
                    };
                    limits.push(SpendingLimit {
                        amount,
                        interval: interval.to_owned(),
                        categories,
                    });
                }
                next.spending_limits = limits;
            }
        }
        if let Some(v) = params.get("spending_limits_currency") {
            next.spending_limits_currency =
                v.as_str().filter(|s| !s.is_empty()).map(str::to_lowercase);
        }
        let pairs = [
            (
                both_set(&next.allowed_categories, &next.blocked_categories),
                "allowed_categories",
                "blocked_categories",
            ),
            (
                both_set(
                    &next.allowed_merchant_countries,
                    &next.blocked_merchant_countries,
                ),
                "allowed_merchant_countries",
                "blocked_merchant_countries",
            ),
            (
                both_set(&next.allowed_card_presences, &next.blocked_card_presences),
                "allowed_card_presences",
                "blocked_card_presences",
            ),
        ];
        for (conflict, a, b) in pairs {
            if conflict {
                return Err(ApiError::exclusive(&[
                    &format!("spending_controls[{a}]"),
                    &format!("spending_controls[{b}]"),
                ]));
            }
        }
        *self = next;
        Ok(())
    }

    /// The response object. `default_currency` fills `spending_limits_currency` when
    /// limits exist and none was given (a card's limits are in the card's currency).
    pub fn render(&self, owner: Owner, default_currency: Option<&str>) -> Value {
        let list = |v: &Option<Vec<String>>| match (v, owner) {
            (Some(items), _) => json!(items),
            (None, Owner::Card) => Value::Null,
            (None, Owner::Cardholder) => json!([]),
        };
        let limits: Vec<Value> = self
            .spending_limits
            .iter()
            .map(|l| {
                json!({
                    "amount": l.amount,
                    "categories": l.categories,
                    "interval": l.interval,
                })
            })
            .collect();
        let currency = self.spending_limits_currency.clone().or_else(|| {
            (!self.spending_limits.is_empty())
                .then(|| default_currency.map(str::to_owned))
                .flatten()
        });
        json!({
            "allowed_card_presences": self.allowed_card_presences,
            "allowed_categories": list(&self.allowed_categories),
            "allowed_merchant_countries": list(&self.allowed_merchant_countries),
            "blocked_card_presences": self.blocked_card_presences,
            "blocked_categories": list(&self.blocked_categories),
            "blocked_merchant_countries": list(&self.blocked_merchant_countries),
            "spending_limits": limits,
            "spending_limits_currency": currency,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::{form, params};

    fn controls(q: &str) -> Result<SpendingControls, ApiError> {
        let mut m = form::parse(q).expect("parses");
        params::validate(
            &mut m,
            &[("spending_controls", params::CARD_SPENDING_CONTROLS)],
        )?;
        let mut c = SpendingControls::default();
        c.apply(m.get("spending_controls"))?;
        Ok(c)
    }

    #[test]
    fn parse_and_render() {
        let c = controls(
            "spending_controls[spending_limits][0][amount]=5000&spending_controls[spending_limits][0][interval]=all_time&spending_controls[allowed_categories][]=computer_software_stores&spending_controls[blocked_merchant_countries][]=RU&spending_controls[blocked_merchant_countries][]=KP",
        )
        .expect("valid");
        let r = c.render(Owner::Card, Some("usd"));
        assert_eq!(r["spending_limits"][0]["amount"], 5000);
        assert_eq!(r["spending_limits"][0]["categories"], Value::Null);
        assert_eq!(r["spending_limits_currency"], "usd");
        assert_eq!(r["allowed_categories"], json!(["computer_software_stores"]));
        assert_eq!(r["blocked_categories"], Value::Null);
        assert_eq!(r["blocked_merchant_countries"], json!(["RU", "KP"]));
        let r = SpendingControls::default().render(Owner::Cardholder, None);
        assert_eq!(r["allowed_categories"], json!([]));
        assert_eq!(r["spending_limits_currency"], Value::Null);
    }

    #[test]
    fn mutually_exclusive_lists() {
        let e = controls(
            "spending_controls[allowed_categories][]=bakeries&spending_controls[blocked_categories][]=florists",
        )
        .expect_err("exclusive");
        assert!(
            e.message
                .starts_with("You may only specify one of these parameters")
        );
        let e = controls(
            "spending_controls[allowed_merchant_countries][]=US&spending_controls[blocked_merchant_countries][]=RU",
        )
        .expect_err("exclusive");
        assert_eq!(
            e.param.as_deref(),
            Some("spending_controls[allowed_merchant_countries]")
        );
    }

    #[test]
    fn update_merges_and_unsets() {
        let mut c = controls("spending_controls[blocked_merchant_countries][]=RU").expect("valid");
        let mut m = form::parse(
            "spending_controls[blocked_merchant_countries]=&spending_controls[allowed_merchant_countries][]=US",
        )
        .expect("parses");
        params::validate(
            &mut m,
            &[("spending_controls", params::CARD_SPENDING_CONTROLS)],
        )
        .expect("valid");
        c.apply(m.get("spending_controls")).expect("applies");
        assert_eq!(c.blocked_merchant_countries, None);
        assert_eq!(c.allowed_merchant_countries, Some(vec!["US".to_owned()]));
        // switching sides without unsetting the other is refused
        let mut m =
            form::parse("spending_controls[blocked_merchant_countries][]=RU").expect("parses");
        params::validate(
            &mut m,
            &[("spending_controls", params::CARD_SPENDING_CONTROLS)],
        )
        .expect("valid");
        assert!(c.apply(m.get("spending_controls")).is_err());
        assert_eq!(c.allowed_merchant_countries, Some(vec!["US".to_owned()]));
    }

    #[test]
    fn spending_limit_needs_amount_and_interval() {
        let e = controls("spending_controls[spending_limits][0][amount]=5").expect_err("missing");
        assert_eq!(e.code, Some("parameter_missing"));
        assert_eq!(
            e.param.as_deref(),
            Some("spending_controls[spending_limits][0][interval]")
        );
    }
}
