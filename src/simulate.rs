//! `roony simulate charge`: play the merchant against the Stripe emulator (or Stripe's
//! test mode). Creates a test-helper authorization on a card with the real async-stripe
//! client, optionally captures it, and summarises what happened: approved or declined,
//! the `request_history` reason and the real-time responder's `metadata`.
//!
//! Exit codes: 0 approved, 1 declined, 2 error.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use stripe_issuing::issuing_authorization::{
    CaptureIssuingAuthorization, CreateIssuingAuthorization,
    CreateIssuingAuthorizationMerchantData, CreateIssuingAuthorizationMerchantDataCategory,
};
use stripe_shared::{IssuingAuthorization, IssuingTransaction};

use crate::emulator::catalog;

/// The emulator's default address (`roony stripe-emulator`, `roony dev`).
pub const DEFAULT_BASE_URL: &str = "http://127.0.0.1:12111";

#[derive(Subcommand, Debug)]
pub enum SimulateCommand {
    /// Authorize (and with --capture, capture) a charge on a card, as a merchant would.
    Charge(ChargeArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ChargeArgs {
    /// The card to charge (`ic_…`).
    #[arg(long)]
    pub card: String,
    /// Amount in the currency's smallest unit (1240 = 12.40 USD).
    #[arg(long)]
    pub amount: i64,
    #[arg(long, default_value = "usd")]
    pub currency: String,
    /// Merchant name.
    #[arg(long)]
    pub merchant: Option<String>,
    /// Merchant country (ISO 3166-1 alpha-2).
    #[arg(long)]
    pub merchant_country: Option<String>,
    /// Merchant category (Stripe's name, e.g. `computer_software_stores`).
    #[arg(long)]
    pub category: Option<String>,
    /// The merchant's card-network id.
    #[arg(long)]
    pub network_id: Option<String>,
    /// Capture the authorization when it is approved.
    #[arg(long)]
    pub capture: bool,
    #[arg(long, env = "ROONY_STRIPE_BASE_URL", default_value = DEFAULT_BASE_URL)]
    pub stripe_base_url: String,
    /// A test-mode key (the emulator accepts any `sk_test_…`).
    #[arg(
        long,
        env = "ROONY_STRIPE_API_KEY",
        default_value = crate::dev::DEV_STRIPE_KEY,
        hide_env_values = true
    )]
    pub stripe_api_key: String,
    /// Connected account (Stripe-Account header).
    #[arg(long, env = "ROONY_STRIPE_ACCOUNT")]
    pub stripe_account: Option<String>,
}

impl ChargeArgs {
    /// A charge of `amount` on `card` against `base_url` with defaults elsewhere.
    pub fn new(card: impl Into<String>, amount: i64, base_url: impl Into<String>) -> Self {
        Self {
            card: card.into(),
            amount,
            currency: "usd".into(),
            merchant: None,
            merchant_country: None,
            category: None,
            network_id: None,
            capture: false,
            stripe_base_url: base_url.into(),
            stripe_api_key: crate::dev::DEV_STRIPE_KEY.into(),
            stripe_account: None,
        }
    }
}

/// What a simulated charge did.
#[derive(Debug)]
pub struct ChargeOutcome {
    pub authorization: IssuingAuthorization,
    /// The capture transaction (with `--capture`, when approved).
    pub transaction: Option<IssuingTransaction>,
}

impl ChargeOutcome {
    pub fn approved(&self) -> bool {
        self.authorization.approved
    }

    /// The last `request_history` reason (e.g. `webhook_declined`).
    pub fn reason(&self) -> Option<String> {
        self.authorization
            .request_history
            .last()
            .map(|r| r.reason.as_str().to_owned())
    }

    /// A human summary (several lines).
    pub fn summary(&self) -> String {
        let a = &self.authorization;
        let currency = a.currency.to_string().to_ascii_uppercase();
        let merchant = a
            .merchant_data
            .name
            .as_deref()
            .unwrap_or("(unnamed merchant)");
        let country = a.merchant_data.country.as_deref().unwrap_or("??");
        let requested = a
            .request_history
            .last()
            .map(|r| r.amount)
            .unwrap_or(a.amount);
        let mut out = format!(
            "{} {} {} at {merchant} ({country}, {})\n  authorization: {} (status {})\n",
            if a.approved { "APPROVED" } else { "DECLINED" },
            money(requested),
            currency,
            a.merchant_data.category,
            a.id,
            a.status.as_str(),
        );
        if let Some(r) = a.request_history.last() {
            out.push_str(&format!("  reason: {}", r.reason.as_str()));
            if let Some(m) = &r.reason_message {
                out.push_str(&format!(" ({m})"));
            }
            out.push('\n');
        }
        if !a.metadata.is_empty() {
            let mut keys: Vec<_> = a.metadata.iter().collect();
            keys.sort();
            out.push_str("  metadata:\n");
            for (k, v) in keys {
                out.push_str(&format!("    {k}: {v}\n"));
            }
        }
        if let Some(t) = &self.transaction {
            out.push_str(&format!(
                "  captured: {} {} {} ({})\n",
                t.id,
                money(t.amount),
                t.currency.to_string().to_ascii_uppercase(),
                t.type_.as_str()
            ));
        }
        out
    }
}

fn money(minor: i64) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

/// The message of an API error (async-stripe's `Display` hides it).
fn describe(e: stripe::StripeError) -> String {
    match e {
        stripe::StripeError::Stripe(err, status) => format!(
            "{} (HTTP {status}{})",
            err.message.as_deref().unwrap_or("no message"),
            err.param
                .as_deref()
                .map(|p| format!(", param {p}"))
                .unwrap_or_default()
        ),
        other => other.to_string(),
    }
}

fn client(args: &ChargeArgs) -> Result<stripe::Client, String> {
    if args.stripe_api_key.starts_with("sk_live_") || args.stripe_api_key.starts_with("rk_live_") {
        return Err("refusing a live key: simulated charges use test-mode helpers".into());
    }
    let mut builder = stripe::ClientBuilder::new(args.stripe_api_key.clone())
        .url(args.stripe_base_url.trim_end_matches('/').to_owned());
    if let Some(acct) = &args.stripe_account {
        let id: stripe::AccountId = acct
            .parse()
            .map_err(|_| format!("invalid account id {acct}"))?;
        builder = builder.account_id(id);
    }
    builder.build().map_err(|e| format!("stripe client: {e}"))
}

/// Run a simulated charge. `Err` only for errors (a decline is `Ok`).
pub async fn charge(args: &ChargeArgs) -> Result<ChargeOutcome, String> {
    if args.amount <= 0 {
        return Err("--amount must be a positive integer (minor units)".into());
    }
    let currency: stripe_types::Currency = args
        .currency
        .to_ascii_lowercase()
        .parse()
        .map_err(|_| format!("unknown currency {}", args.currency))?;
    let mut merchant = CreateIssuingAuthorizationMerchantData::new();
    merchant.name = args.merchant.clone();
    if let Some(c) = &args.merchant_country {
        let c = c.to_ascii_uppercase();
        if !catalog::is_country(&c) {
            return Err(format!(
                "--merchant-country {c} is not an ISO 3166-1 alpha-2 code"
            ));
        }
        merchant.country = Some(c);
    }
    if let Some(cat) = &args.category {
        if !catalog::is_merchant_category(cat) {
            return Err(format!(
                "--category {cat} is not a Stripe merchant category (e.g. computer_software_stores)"
            ));
        }
        merchant.category = cat
            .parse::<CreateIssuingAuthorizationMerchantDataCategory>()
            .ok();
    }
    merchant.network_id = args.network_id.clone();
    let client = client(args)?;
    let authorization = CreateIssuingAuthorization::new(args.card.clone())
        .amount(args.amount)
        .currency(currency)
        .merchant_data(merchant)
        .send(&client)
        .await
        .map_err(|e| format!("authorization failed: {}", describe(e)))?;
    let mut outcome = ChargeOutcome {
        authorization,
        transaction: None,
    };
    if args.capture && outcome.authorization.approved {
        let captured = CaptureIssuingAuthorization::new(outcome.authorization.id.to_string())
            .send(&client)
            .await
            .map_err(|e| format!("capture failed: {}", describe(e)))?;
        outcome.transaction = captured.transactions.last().cloned();
        outcome.authorization = captured;
    }
    Ok(outcome)
}

/// `roony simulate …` from the command line.
pub async fn run_cli(command: &SimulateCommand) -> ExitCode {
    match command {
        SimulateCommand::Charge(args) => match charge(args).await {
            Ok(outcome) => {
                print!("{}", outcome.summary());
                if outcome.approved() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(e) => {
                eprintln!("roony: {e}");
                ExitCode::from(2)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::money;

    #[test]
    fn money_format() {
        assert_eq!(money(1240), "12.40");
        assert_eq!(money(-5), "-0.05");
        assert_eq!(money(0), "0.00");
    }
}
