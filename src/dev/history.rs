//! Demo history for `roony dev`: on the first start with a data directory, a second demo
//! agent (`agt_research`) makes a few purchases through the running sidecar's API and the
//! emulator plays the merchants, so the dashboard opens on real chains — settled purchases,
//! a charge still authorized, a card not used yet, a decline, a charge at the wrong merchant
//! declined in real time, and a purchase waiting in the approvals queue. Everything goes
//! through the same paths as a real agent and merchant (HTTP API, relay, Stripe webhooks);
//! the printed demo agent's budget is left untouched.

use serde_json::{Value, json};

use crate::simulate::{self, ChargeArgs};

/// The history agent's id.
pub const RESEARCH_AGENT_ID: &str = "agt_research";

/// Its policy: USD 200.00 per purchase, USD 1,000.00 a month, no gambling, purchases above
/// USD 150.00 wait for an administrator.
pub fn research_policy() -> crate::policy::Policy {
    use crate::domain::money::Currency;
    use crate::domain::time::Period;
    use crate::policy::BudgetRule;
    let mut p = crate::policy::Policy::new(Currency::USD);
    p.max_per_transaction = Some(20_000);
    p.require_confirmation_above = Some(15_000);
    p.budgets = vec![BudgetRule {
        period: Period::Monthly,
        limit: 100_000,
    }];
    p.categories.deny = vec!["betting_casino_gambling".into()];
    p
}

/// What the merchant does with an approved purchase's card.
#[derive(Clone, Copy)]
enum Then {
    /// Authorize and capture the full amount.
    Capture,
    /// Authorize only (the capture is still to come).
    Authorize,
    /// Nothing yet: an open single-use card.
    Nothing,
    /// A charge at another merchant: declined in real time (`merchant_mismatch`).
    WrongMerchant,
}

struct Purchase {
    amount: i64,
    merchant: &'static str,
    url: &'static str,
    /// The name the merchant's acquirer sends with the authorization.
    statement_name: &'static str,
    category: Option<&'static str>,
    description: &'static str,
    then: Then,
}

const PURCHASES: &[Purchase] = &[
    Purchase {
        amount: 2_100,
        merchant: "GitHub",
        url: "https://github.com",
        statement_name: "GITHUB",
        category: Some("computer_software_stores"),
        description: "GitHub Team seat for the research repo, one month",
        then: Then::Capture,
    },
    Purchase {
        amount: 1_288,
        merchant: "Namecheap",
        url: "https://www.namecheap.com",
        statement_name: "NAMECHEAP.COM",
        category: None,
        description: "register research-notes.dev for one year",
        then: Then::Capture,
    },
    Purchase {
        amount: 8_450,
        merchant: "Amazon Web Services",
        url: "https://aws.amazon.com",
        statement_name: "AMAZON WEB SERVICES",
        category: None,
        description: "GPU hours for the benchmark run",
        then: Then::Authorize,
    },
    Purchase {
        amount: 1_500,
        merchant: "Figma",
        url: "https://www.figma.com",
        statement_name: "FIGMA",
        category: None,
        description: "one Figma editor seat",
        then: Then::Nothing,
    },
    Purchase {
        amount: 3_900,
        merchant: "arXiv Papers Direct",
        url: "https://papers.example",
        statement_name: "GIFTCARDS 4 U",
        category: None,
        description: "paper reprints",
        then: Then::WrongMerchant,
    },
    Purchase {
        amount: 5_000,
        merchant: "Lucky Casino",
        url: "https://luckycasino.example",
        statement_name: "LUCKY CASINO",
        category: Some("betting_casino_gambling"),
        description: "chips (a prompt injection asked for them)",
        then: Then::Nothing,
    },
    Purchase {
        amount: 18_000,
        merchant: "Datadog",
        url: "https://www.datadoghq.com",
        statement_name: "DATADOG",
        category: None,
        description: "a year of log retention for the crawler",
        then: Then::Nothing,
    },
];

/// What the seeding did (printed by `roony dev`).
#[derive(Debug, Default)]
pub struct Summary {
    pub approved: usize,
    pub declined: usize,
    pub pending: usize,
    pub charges: usize,
}

/// Buys [`PURCHASES`] as `agt_research` through the sidecar at `sidecar` and plays the
/// merchants on the emulator at `emulator`.
pub async fn seed(sidecar: &str, key: &str, emulator: &str) -> Result<Summary, String> {
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(20))
        .build()
        .map_err(|e| e.to_string())?;
    let mut summary = Summary::default();
    for p in PURCHASES {
        let mut merchant = json!({"name": p.merchant, "url": p.url, "country": "US"});
        if let Some(c) = p.category {
            merchant["category"] = json!(c);
        }
        let body = json!({
            "amount": p.amount,
            "currency": "usd",
            "merchant": merchant,
            "description": p.description,
        });
        let resp = http
            .post(format!("{sidecar}/api/v1/purchase_intent"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("demo purchase at {}: {e}", p.merchant))?;
        let intent: Value = resp
            .json()
            .await
            .map_err(|e| format!("demo purchase at {}: {e}", p.merchant))?;
        match intent["status"].as_str() {
            Some("approved") => summary.approved += 1,
            Some("declined") => {
                summary.declined += 1;
                continue;
            }
            Some("pending_approval") => {
                summary.pending += 1;
                continue;
            }
            other => {
                return Err(format!(
                    "demo purchase at {}: unexpected status {other:?}",
                    p.merchant
                ));
            }
        }
        let Some(card) = intent["card"]["id"].as_str() else {
            return Err(format!("demo purchase at {}: no card", p.merchant));
        };
        let (capture, name) = match p.then {
            Then::Nothing => continue,
            Then::Capture => (true, p.statement_name),
            Then::Authorize | Then::WrongMerchant => (false, p.statement_name),
        };
        let mut charge = ChargeArgs::new(card, p.amount, emulator);
        charge.merchant = Some(name.to_string());
        charge.merchant_country = Some("US".into());
        charge.category = p.category.map(str::to_string);
        charge.capture = capture;
        let outcome = simulate::charge(&charge)
            .await
            .map_err(|e| format!("demo charge at {}: {e}", p.merchant))?;
        let expected = !matches!(p.then, Then::WrongMerchant);
        if outcome.approved() != expected {
            return Err(format!(
                "demo charge at {}: approved = {}, expected {expected}",
                p.merchant,
                outcome.approved()
            ));
        }
        summary.charges += 1;
    }
    Ok(summary)
}
