//! Risk scoring: a deterministic, explainable score (0–100) for each purchase intent, from the
//! intent and a bounded history of the agent's recent intents (read by the caller in the
//! decision's transaction).
//!
//! Pure like the rest of `policy`: no I/O, no clock (time is an argument), integer arithmetic
//! only. The same policy, intent, history and time always give the same score and signals,
//! in the same order. Every signal carries a stable code, its contribution to the score and a
//! message an agent (or an administrator) can act on; the contributions add up to the score,
//! capped at 100.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::intent::PurchaseIntent;
use crate::domain::merchant::normalize_name;
use crate::domain::money::{Currency, Money};
use crate::domain::time::UnixSeconds;

use super::decision::Outcome;
use super::rules::CompiledPolicy;

/// How many of an agent's most recent intents the history keeps.
pub const HISTORY_LEN: usize = 256;
/// The window of the agent's "usual" amounts and hours.
pub const BASELINE_SECONDS: i64 = 30 * 86_400;
/// Purchases needed in the baseline window before an amount can be called unusual.
pub const MIN_AMOUNT_BASELINE: usize = 5;
/// Purchases needed in the baseline window before an hour can be called unusual.
pub const MIN_HOUR_BASELINE: usize = 20;
/// Declines older than this do not count towards a streak.
pub const STREAK_SECONDS: i64 = 3_600;

/// Weights (largest contribution) of each signal; see docs/policy.md, "Risk".
const W_AMOUNT: [u8; 2] = [20, 30];
const W_NEW_MERCHANT: u8 = 10;
const W_BURST: [u8; 2] = [15, 25];
const W_SPLIT: [u8; 3] = [35, 55, 75];
const W_STREAK: [u8; 3] = [15, 25, 35];
const W_CATEGORY: u8 = 30;
const W_HOUR: u8 = 10;

/// The policy's risk section. Every field has a default, so `{"risk": {}}` (or no section)
/// scores with the defaults below.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RiskRule {
    /// A score above this makes the decision `pending_approval` (`risk_review_required`).
    /// 0–100, default 70; 100 turns it off.
    #[serde(default = "default_approval")]
    pub require_approval_above: u8,
    /// A score above this declines (`risk_too_high`). 0–100, default 90; 100 turns it off.
    #[serde(default = "default_decline")]
    pub decline_above: u8,
    /// Purchases at one merchant within this many seconds count as parts of one purchase
    /// (`split_purchase`). Default 600, at most 86400.
    #[serde(default = "default_split_window")]
    pub split_window_seconds: u32,
    /// `burst` counts the agent's intents in this many seconds. Default 60, at most 3600.
    #[serde(default = "default_burst_window")]
    pub burst_window_seconds: u32,
    /// `burst` fires at this many earlier intents in the burst window (more at twice as
    /// many). Default 5, 2–256.
    #[serde(default = "default_burst_count")]
    pub burst_count: u32,
    /// `decline_streak` fires after this many consecutive declines within the last hour
    /// (more at two and three times as many). Default 3, 1–85.
    #[serde(default = "default_streak")]
    pub decline_streak: u32,
    /// `amount_unusual` fires above this many times the agent's median amount over the
    /// last 30 days (more above twice that). Default 5, 2–1000.
    #[serde(default = "default_ratio")]
    pub unusual_amount_ratio: u32,
}

fn default_approval() -> u8 {
    70
}
fn default_decline() -> u8 {
    90
}
fn default_split_window() -> u32 {
    600
}
fn default_burst_window() -> u32 {
    60
}
fn default_burst_count() -> u32 {
    5
}
fn default_streak() -> u32 {
    3
}
fn default_ratio() -> u32 {
    5
}

impl Default for RiskRule {
    fn default() -> Self {
        RiskRule {
            require_approval_above: default_approval(),
            decline_above: default_decline(),
            split_window_seconds: default_split_window(),
            burst_window_seconds: default_burst_window(),
            burst_count: default_burst_count(),
            decline_streak: default_streak(),
            unusual_amount_ratio: default_ratio(),
        }
    }
}

impl RiskRule {
    pub fn is_default(&self) -> bool {
        *self == RiskRule::default()
    }

    /// Every problem, with its field path under `risk`.
    pub fn check(&self, errors: &mut Vec<(String, &'static str)>) {
        if self.require_approval_above > 100 {
            errors.push((
                "risk.require_approval_above".into(),
                "must be between 0 and 100",
            ));
        }
        if self.decline_above > 100 {
            errors.push(("risk.decline_above".into(), "must be between 0 and 100"));
        }
        if self.require_approval_above > self.decline_above {
            errors.push((
                "risk.require_approval_above".into(),
                "must not be above risk.decline_above",
            ));
        }
        if !(1..=86_400).contains(&self.split_window_seconds) {
            errors.push((
                "risk.split_window_seconds".into(),
                "must be between 1 and 86400 (one day)",
            ));
        }
        if !(1..=3_600).contains(&self.burst_window_seconds) {
            errors.push((
                "risk.burst_window_seconds".into(),
                "must be between 1 and 3600 (one hour)",
            ));
        }
        if !(2..=HISTORY_LEN as u32).contains(&self.burst_count) {
            errors.push(("risk.burst_count".into(), "must be between 2 and 256"));
        }
        if !(1..=(HISTORY_LEN as u32) / 3).contains(&self.decline_streak) {
            errors.push(("risk.decline_streak".into(), "must be between 1 and 85"));
        }
        if !(2..=1_000).contains(&self.unusual_amount_ratio) {
            errors.push((
                "risk.unusual_amount_ratio".into(),
                "must be between 2 and 1000",
            ));
        }
    }
}

/// Stable signal codes. Never rename one: dashboards and the control plane match on them.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    ToSchema,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RiskSignalCode {
    /// Far above this agent's median amount over the last 30 days.
    AmountUnusual,
    /// The agent has not bought from this merchant before (within its history).
    NewMerchant,
    /// Many intents in a short window.
    Burst,
    /// Several intents at one merchant in a short window add up to more than the
    /// per-purchase limit (or the approval threshold).
    SplitPurchase,
    /// The agent's most recent intents were all declined (probing).
    DeclineStreak,
    /// The merchant's category does not fit what the merchant name, domain or description
    /// say is bought.
    CategoryMismatch,
    /// The agent does not usually buy at this hour (UTC).
    UnusualHour,
}

impl RiskSignalCode {
    pub fn as_str(&self) -> &'static str {
        match self {
            RiskSignalCode::AmountUnusual => "amount_unusual",
            RiskSignalCode::NewMerchant => "new_merchant",
            RiskSignalCode::Burst => "burst",
            RiskSignalCode::SplitPurchase => "split_purchase",
            RiskSignalCode::DeclineStreak => "decline_streak",
            RiskSignalCode::CategoryMismatch => "category_mismatch",
            RiskSignalCode::UnusualHour => "unusual_hour",
        }
    }
}

/// One reason the score is what it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema, schemars::JsonSchema)]
pub struct RiskSignal {
    pub code: RiskSignalCode,
    /// Points this signal adds to the score.
    pub contribution: u8,
    /// What was seen, in a sentence.
    pub message: String,
}

/// The risk score of an intent and the signals behind it.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, schemars::JsonSchema,
)]
pub struct RiskAssessment {
    /// 0 (nothing unusual) to 100: the sum of the signals' contributions, capped at 100.
    pub score: u8,
    /// The signals that fired, in a fixed order; empty when nothing was unusual.
    pub signals: Vec<RiskSignal>,
}

impl RiskAssessment {
    /// "split_purchase (+55), decline_streak (+25)", largest first.
    pub fn summary(&self) -> String {
        let mut s: Vec<&RiskSignal> = self.signals.iter().collect();
        s.sort_by(|a, b| {
            b.contribution
                .cmp(&a.contribution)
                .then(a.code.cmp(&b.code))
        });
        s.iter()
            .map(|x| format!("{} (+{})", x.code.as_str(), x.contribution))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The message of the largest signal.
    pub fn top_message(&self) -> Option<&str> {
        self.signals
            .iter()
            .max_by(|a, b| {
                a.contribution
                    .cmp(&b.contribution)
                    .then(b.code.cmp(&a.code))
            })
            .map(|s| s.message.as_str())
    }
}

/// One earlier intent of the agent, as the risk history keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub at: UnixSeconds,
    pub amount: i64,
    pub currency: Currency,
    /// `normalize_name` of the merchant's name.
    pub merchant: String,
    pub domain: Option<String>,
    pub category: Option<String>,
    pub outcome: Outcome,
}

impl HistoryEntry {
    /// The entry an intent leaves in the history.
    pub fn of(intent: &PurchaseIntent, outcome: Outcome, at: UnixSeconds) -> HistoryEntry {
        HistoryEntry {
            at,
            amount: intent.amount.amount,
            currency: intent.amount.currency,
            merchant: intent.merchant.normalized_name.clone(),
            domain: intent.merchant.domain.clone(),
            category: intent.merchant.category.clone(),
            outcome,
        }
    }

    fn same_merchant(&self, intent: &PurchaseIntent) -> bool {
        let m = &intent.merchant;
        self.merchant == m.normalized_name
            || matches!((&self.domain, &m.domain), (Some(a), Some(b)) if a == b)
    }

    fn went_through(&self) -> bool {
        self.outcome != Outcome::Declined
    }
}

/// The agent's most recent intents (at most [`HISTORY_LEN`]), oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RiskHistory {
    pub entries: Vec<HistoryEntry>,
}

/// Scores `intent` against the agent's history. See the module documentation.
pub fn score(
    policy: &CompiledPolicy,
    intent: &PurchaseIntent,
    history: &RiskHistory,
    now: UnixSeconds,
) -> RiskAssessment {
    let rule = &policy.risk;
    let mut signals = Vec::new();
    amount_unusual(rule, intent, history, now, &mut signals);
    new_merchant(intent, history, &mut signals);
    burst(rule, history, now, &mut signals);
    split_purchase(policy, intent, history, now, &mut signals);
    decline_streak(rule, history, now, &mut signals);
    category_mismatch(intent, &mut signals);
    unusual_hour(history, now, &mut signals);
    let total: u32 = signals.iter().map(|s| u32::from(s.contribution)).sum();
    RiskAssessment {
        score: u8::try_from(total.min(100)).unwrap_or(100),
        signals,
    }
}

fn push(out: &mut Vec<RiskSignal>, code: RiskSignalCode, contribution: u8, message: String) {
    out.push(RiskSignal {
        code,
        contribution,
        message,
    });
}

fn amount_unusual(
    rule: &RiskRule,
    intent: &PurchaseIntent,
    history: &RiskHistory,
    now: UnixSeconds,
    out: &mut Vec<RiskSignal>,
) {
    let amount = intent.amount;
    let mut amounts: Vec<i64> = history
        .entries
        .iter()
        .filter(|e| {
            e.at > now - BASELINE_SECONDS && e.currency == amount.currency && e.went_through()
        })
        .map(|e| e.amount)
        .collect();
    if amounts.len() < MIN_AMOUNT_BASELINE {
        return;
    }
    let n = amounts.len();
    // The lower median: deterministic, and robust to a few large purchases.
    let (_, median, _) = amounts.select_nth_unstable((n - 1) / 2);
    let median = *median;
    if median <= 0 {
        return;
    }
    let ratio = i64::from(rule.unusual_amount_ratio);
    let weight = if amount.amount > median.saturating_mul(2 * ratio) {
        W_AMOUNT[1]
    } else if amount.amount > median.saturating_mul(ratio) {
        W_AMOUNT[0]
    } else {
        return;
    };
    push(
        out,
        RiskSignalCode::AmountUnusual,
        weight,
        format!(
            "{amount} is more than {}× this agent's usual purchase ({} median over its {n} purchases of the last 30 days); an unusually large purchase may need a review",
            if weight == W_AMOUNT[1] {
                2 * ratio
            } else {
                ratio
            },
            Money::new(median, amount.currency),
        ),
    );
}

fn new_merchant(intent: &PurchaseIntent, history: &RiskHistory, out: &mut Vec<RiskSignal>) {
    let mut known = 0usize;
    for e in history.entries.iter().filter(|e| e.went_through()) {
        if e.same_merchant(intent) {
            return;
        }
        known += 1;
    }
    if known == 0 {
        // No baseline: a new agent's first purchases are not unusual.
        return;
    }
    push(
        out,
        RiskSignalCode::NewMerchant,
        W_NEW_MERCHANT,
        format!(
            "first purchase from {:?} by this agent (not among its last {known} purchases)",
            intent.merchant.name
        ),
    );
}

fn burst(rule: &RiskRule, history: &RiskHistory, now: UnixSeconds, out: &mut Vec<RiskSignal>) {
    let from = now - i64::from(rule.burst_window_seconds);
    let n = history
        .entries
        .iter()
        .rev()
        .take_while(|e| e.at > from)
        .count();
    let n32 = u32::try_from(n).unwrap_or(u32::MAX);
    let weight = if n32 >= rule.burst_count.saturating_mul(2) {
        W_BURST[1]
    } else if n32 >= rule.burst_count {
        W_BURST[0]
    } else {
        return;
    };
    push(
        out,
        RiskSignalCode::Burst,
        weight,
        format!(
            "{n} purchase requests in the last {} seconds before this one; slow down",
            rule.burst_window_seconds
        ),
    );
}

fn split_purchase(
    policy: &CompiledPolicy,
    intent: &PurchaseIntent,
    history: &RiskHistory,
    now: UnixSeconds,
    out: &mut Vec<RiskSignal>,
) {
    // The limit a split would dodge: the per-purchase limit or the approval threshold,
    // whichever is lower.
    let (limit, what) = match (
        policy.max_per_transaction.filter(|v| *v > 0),
        policy.require_approval_above.filter(|v| *v > 0),
    ) {
        (Some(m), Some(a)) if a < m => (a, "approval threshold"),
        (Some(m), _) => (m, "per-purchase limit"),
        (None, Some(a)) => (a, "approval threshold"),
        (None, None) => return,
    };
    let amount = intent.amount;
    if amount.amount > limit || amount.currency != policy.currency {
        // Over the limit on its own (the rules handle it), or in another currency.
        return;
    }
    let from = now - i64::from(policy.risk.split_window_seconds);
    let mut parts = 0usize;
    let mut sum = amount.amount;
    for e in history.entries.iter().rev().take_while(|e| e.at > from) {
        if e.went_through()
            && e.currency == amount.currency
            && e.amount <= limit
            && e.same_merchant(intent)
        {
            parts += 1;
            sum = sum.saturating_add(e.amount);
        }
    }
    if parts == 0 || sum <= limit {
        return;
    }
    let weight = match sum / limit {
        1 => W_SPLIT[0],
        2 => W_SPLIT[1],
        _ => W_SPLIT[2],
    };
    push(
        out,
        RiskSignalCode::SplitPurchase,
        weight,
        format!(
            "{} purchases at {:?} within {} seconds add up to {}, above the {what} of {}; splitting a purchase does not avoid its limit",
            parts + 1,
            intent.merchant.name,
            policy.risk.split_window_seconds,
            Money::new(sum, amount.currency),
            Money::new(limit, amount.currency),
        ),
    );
}

fn decline_streak(
    rule: &RiskRule,
    history: &RiskHistory,
    now: UnixSeconds,
    out: &mut Vec<RiskSignal>,
) {
    let from = now - STREAK_SECONDS;
    let n = history
        .entries
        .iter()
        .rev()
        .take_while(|e| e.at > from && e.outcome == Outcome::Declined)
        .count();
    let n32 = u32::try_from(n).unwrap_or(u32::MAX);
    let s = rule.decline_streak;
    let weight = if n32 >= s.saturating_mul(3) {
        W_STREAK[2]
    } else if n32 >= s.saturating_mul(2) {
        W_STREAK[1]
    } else if n32 >= s {
        W_STREAK[0]
    } else {
        return;
    };
    push(
        out,
        RiskSignalCode::DeclineStreak,
        weight,
        format!(
            "the last {n} purchase requests were declined; stop retrying variations — fix what their reasons say or ask a human"
        ),
    );
}

/// What a merchant or description may say, and the categories that fit it.
struct Keyword {
    /// Whole words, in order (after `normalize_name`).
    words: &'static [&'static str],
    /// Also matched inside a domain label (e.g. "casino" in "luckycasino.com").
    in_domain: bool,
    what: &'static str,
    fits: &'static [&'static str],
}

const GIFT: &[&str] = &[
    "department_stores",
    "digital_goods_games",
    "digital_goods_media",
    "discount_stores",
    "drug_stores_and_pharmacies",
    "gift_card_novelty_and_souvenir_shops",
    "grocery_stores_supermarkets",
    "miscellaneous",
    "miscellaneous_general_merchandise",
    "miscellaneous_specialty_retail",
    "non_fi_stored_value_card_purchase_load",
    "variety_stores",
];
const GAMBLING: &[&str] = &[
    "betting_casino_gambling",
    "gambling",
    "government_licensed_online_casions_online_gambling_us_region_only",
    "government_owned_lotteries_non_us_region",
    "government_owned_lotteries_us_region_only",
];
const MONEY: &[&str] = &[
    "financial_institutions",
    "non_fi_money_orders",
    "non_fi_stored_value_card_purchase_load",
    "security_brokers_dealers",
    "wires_money_orders",
];

const KEYWORDS: &[Keyword] = &[
    Keyword {
        words: &["gift", "card"],
        in_domain: false,
        what: "gift card",
        fits: GIFT,
    },
    Keyword {
        words: &["gift", "cards"],
        in_domain: false,
        what: "gift card",
        fits: GIFT,
    },
    Keyword {
        words: &["giftcard"],
        in_domain: true,
        what: "gift card",
        fits: GIFT,
    },
    Keyword {
        words: &["giftcards"],
        in_domain: false,
        what: "gift card",
        fits: GIFT,
    },
    Keyword {
        words: &["prepaid", "card"],
        in_domain: false,
        what: "prepaid card",
        fits: GIFT,
    },
    Keyword {
        words: &["casino"],
        in_domain: true,
        what: "casino",
        fits: GAMBLING,
    },
    Keyword {
        words: &["poker"],
        in_domain: true,
        what: "poker",
        fits: GAMBLING,
    },
    Keyword {
        words: &["sportsbook"],
        in_domain: true,
        what: "sportsbook",
        fits: GAMBLING,
    },
    Keyword {
        words: &["betting"],
        in_domain: true,
        what: "betting",
        fits: GAMBLING,
    },
    Keyword {
        words: &["lottery"],
        in_domain: true,
        what: "lottery",
        fits: GAMBLING,
    },
    Keyword {
        words: &["bitcoin"],
        in_domain: true,
        what: "bitcoin",
        fits: MONEY,
    },
    Keyword {
        words: &["cryptocurrency"],
        in_domain: false,
        what: "cryptocurrency",
        fits: MONEY,
    },
    Keyword {
        words: &["crypto"],
        in_domain: false,
        what: "crypto",
        fits: MONEY,
    },
    Keyword {
        words: &["wire", "transfer"],
        in_domain: false,
        what: "wire transfer",
        fits: MONEY,
    },
    Keyword {
        words: &["money", "order"],
        in_domain: false,
        what: "money order",
        fits: MONEY,
    },
    Keyword {
        words: &["western", "union"],
        in_domain: false,
        what: "Western Union",
        fits: MONEY,
    },
];

fn category_mismatch(intent: &PurchaseIntent, out: &mut Vec<RiskSignal>) {
    let m = &intent.merchant;
    let Some(category) = m.category.as_deref() else {
        return;
    };
    let description = normalize_name(&intent.description);
    let name_words: Vec<&str> = m.normalized_name.split_whitespace().collect();
    let desc_words: Vec<&str> = description.split_whitespace().collect();
    let labels: Vec<&str> = m
        .domain
        .as_deref()
        .map_or(Vec::new(), |d| d.split('.').collect());
    let has = |words: &[&str], k: &Keyword| words.windows(k.words.len()).any(|w| w == k.words);
    for k in KEYWORDS {
        let where_ = if has(&name_words, k) {
            "the merchant's name"
        } else if has(&labels, k)
            || (k.in_domain && labels.iter().any(|l| k.words.iter().all(|w| l.contains(w))))
        {
            "the merchant's domain"
        } else if has(&desc_words, k) {
            "the description"
        } else {
            continue;
        };
        if k.fits.contains(&category) {
            continue;
        }
        push(
            out,
            RiskSignalCode::CategoryMismatch,
            W_CATEGORY,
            format!(
                "{where_} mentions {:?} but the merchant category is {category}, which does not sell that; give the merchant's real category",
                k.what
            ),
        );
        return;
    }
}

fn unusual_hour(history: &RiskHistory, now: UnixSeconds, out: &mut Vec<RiskSignal>) {
    let hour = |t: UnixSeconds| usize::try_from(t.rem_euclid(86_400) / 3_600).unwrap_or(0);
    let mut counts = [0u32; 24];
    let mut n = 0usize;
    for e in history
        .entries
        .iter()
        .filter(|e| e.at > now - BASELINE_SECONDS && e.went_through())
    {
        if let Some(c) = counts.get_mut(hour(e.at)) {
            *c += 1;
        }
        n += 1;
    }
    if n < MIN_HOUR_BASELINE {
        return;
    }
    let h = hour(now);
    let near = [(h + 23) % 24, h, (h + 1) % 24];
    if near.iter().any(|i| counts.get(*i).is_some_and(|c| *c > 0)) {
        return;
    }
    push(
        out,
        RiskSignalCode::UnusualHour,
        W_HOUR,
        format!(
            "this agent made none of its {n} purchases of the last 30 days between {:02}:00 and {:02}:59 UTC",
            near[0], near[2]
        ),
    );
}
