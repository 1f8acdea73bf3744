//! `issuing.transaction`: retrieve, list, and the test helpers (force capture, unlinked
//! refund, refund). Captures have negative amounts, refunds positive (as Stripe).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::authorization::{self, MERCHANT_DATA, merchant_data};
use super::list::{ListQuery, envelope, paginate};
use crate::emulator::error::ApiError;
use crate::emulator::ids;
use crate::emulator::params::{
    self, EXPAND, LIST_COMMON, METADATA, Shape, expand_of, int_of, obj_of, str_of,
};
use crate::emulator::state::{AccountKey, AccountState, State, StoredObject};
use crate::emulator::webhooks;

pub const NOUN: &str = "issuing transaction";
pub const URL: &str = "/v1/issuing/transactions";

const AMOUNT: Shape = Shape::Int(1, 99_999_999);

const CREATE: &[(&str, Shape)] = &[
    ("amount", AMOUNT),
    ("card", Shape::Str(5000)),
    ("currency", Shape::Str(3)),
    EXPAND,
    ("merchant_data", MERCHANT_DATA),
    ("purchase_details", Shape::Any),
];
const REFUND: &[(&str, Shape)] = &[EXPAND, ("refund_amount", AMOUNT)];
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
    ("type", Shape::Enum(&["capture", "refund"])),
];
const EXPANDABLE: &[&str] = &["authorization", "card", "cardholder"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxKind {
    Capture,
    Refund,
}

impl TxKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TxKind::Capture => "capture",
            TxKind::Refund => "refund",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Transaction {
    pub id: String,
    pub created: i64,
    pub kind: TxKind,
    /// Negative for captures, positive for refunds.
    pub amount: i64,
    pub authorization: Option<String>,
    pub card: String,
    pub cardholder: Option<String>,
    pub currency: String,
    pub merchant_currency: String,
    pub merchant_data: Value,
    pub metadata: BTreeMap<String, String>,
}

impl StoredObject for Transaction {
    fn id(&self) -> &str {
        &self.id
    }
    fn created(&self) -> i64 {
        self.created
    }
}

impl Transaction {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: TxKind,
        amount: i64,
        authorization: Option<String>,
        card: String,
        cardholder: Option<String>,
        currency: String,
        merchant_currency: String,
        merchant_data: Value,
        now: i64,
    ) -> Self {
        Self {
            id: ids::object_id("ipi_"),
            created: now,
            kind,
            amount,
            authorization,
            card,
            cardholder,
            currency,
            merchant_currency,
            merchant_data,
            metadata: BTreeMap::new(),
        }
    }

    pub fn category(&self) -> &str {
        self.merchant_data["category"].as_str().unwrap_or("")
    }

    pub fn render(&self) -> Value {
        let (y, m, d) = ids::ymd(self.created);
        json!({
            "id": self.id,
            "object": "issuing.transaction",
            "amount": self.amount,
            "amount_details": {"atm_fee": null, "cashback_amount": null},
            "authorization": self.authorization,
            "balance_transaction": null,
            "card": self.card,
            "cardholder": self.cardholder,
            "created": self.created,
            "currency": self.currency,
            "dispute": null,
            "livemode": false,
            "merchant_amount": self.amount,
            "merchant_currency": self.merchant_currency,
            "merchant_data": self.merchant_data,
            "metadata": self.metadata,
            "network_data": {
                "authorization_code": null,
                "processing_date": format!("{y:04}-{m:02}-{d:02}"),
                "transaction_id": null,
            },
            "purchase_details": null,
            "token": null,
            "treasury": null,
            "type": self.kind.as_str(),
            "wallet": null,
        })
    }
}

pub fn load<'a>(account: &'a AccountState, id: &str) -> Result<&'a Transaction, ApiError> {
    account
        .transactions
        .get(id)
        .ok_or_else(|| ApiError::no_such(NOUN, id))
}

fn insert_and_emit(
    state: &mut State,
    key: &AccountKey,
    tx: Transaction,
) -> Result<Value, ApiError> {
    let id = tx.id.clone();
    let card = tx.card.clone();
    let kind = tx.kind;
    let account = state.account(key);
    account.transactions.insert(tx);
    let body = load(account, &id)?.render();
    state.emit(key, "issuing_transaction.created", body.clone(), None);
    if kind == TxKind::Capture {
        authorization::apply_lifecycle(state, key, &card);
    }
    Ok(body)
}

fn unlinked(
    state: &mut State,
    key: &AccountKey,
    mut p: Map<String, Value>,
    kind: TxKind,
    now: i64,
) -> Result<Value, ApiError> {
    params::validate(&mut p, CREATE)?;
    params::check_expand(&expand_of(&p), EXPANDABLE)?;
    let amount = int_of(&p, "amount").ok_or_else(|| ApiError::missing("amount"))?;
    let card_id = params::required_str(&p, "card", "card")?;
    let account = state.account(key);
    let card = account
        .cards
        .get(card_id)
        .ok_or_else(|| ApiError::no_such_param("issuing card", card_id, "card"))?;
    let currency = str_of(&p, "currency")
        .map(str::to_ascii_lowercase)
        .unwrap_or_else(|| card.currency.clone());
    let signed = match kind {
        TxKind::Capture => -amount,
        TxKind::Refund => amount,
    };
    let tx = Transaction::new(
        kind,
        signed,
        None,
        card.id.clone(),
        Some(card.cardholder.clone()),
        currency.clone(),
        currency,
        merchant_data(obj_of(&p, "merchant_data")),
        now,
    );
    insert_and_emit(state, key, tx)
}

pub fn force_capture(
    state: &mut State,
    key: &AccountKey,
    p: Map<String, Value>,
    now: i64,
) -> Result<Value, ApiError> {
    unlinked(state, key, p, TxKind::Capture, now)
}

pub fn unlinked_refund(
    state: &mut State,
    key: &AccountKey,
    p: Map<String, Value>,
    now: i64,
) -> Result<Value, ApiError> {
    unlinked(state, key, p, TxKind::Refund, now)
}

pub fn refund(
    state: &mut State,
    key: &AccountKey,
    id: &str,
    mut p: Map<String, Value>,
    now: i64,
) -> Result<Value, ApiError> {
    params::validate(&mut p, REFUND)?;
    let account = state.account(key);
    let original = load(account, id)?;
    if original.kind != TxKind::Capture {
        return Err(ApiError::invalid(
            "Only capture transactions can be refunded.",
        ));
    }
    let refunded: i64 = account
        .transactions
        .iter()
        .filter(|t| {
            t.kind == TxKind::Refund
                && t.authorization.is_some()
                && t.authorization == original.authorization
        })
        .map(|t| t.amount)
        .sum();
    let captured = -original.amount;
    let amount = int_of(&p, "refund_amount").unwrap_or(captured);
    if original.authorization.is_some() && amount + refunded > captured {
        return Err(ApiError::invalid(format!(
            "The refund_amount ({amount}) exceeds what is left to refund ({}).",
            captured - refunded
        ))
        .with_param("refund_amount"));
    }
    let tx = Transaction::new(
        TxKind::Refund,
        amount,
        original.authorization.clone(),
        original.card.clone(),
        original.cardholder.clone(),
        original.currency.clone(),
        original.merchant_currency.clone(),
        original.merchant_data.clone(),
        now,
    );
    let auth_id = original.authorization.clone();
    let tx_id = tx.id.clone();
    let body = insert_and_emit(state, key, tx)?;
    if let Some(auth_id) = auth_id {
        let account = state.account(key);
        if let Some(auth) = account.authorizations.get(&auth_id) {
            let before = auth.render(account, None);
            let mut next = auth.clone();
            next.transactions.push(tx_id);
            account.authorizations.insert(next);
            if let Some(after) = account
                .authorizations
                .get(&auth_id)
                .map(|a| a.render(account, None))
            {
                let prev = webhooks::previous_attributes(&before, &after);
                state.emit(key, "issuing_authorization.updated", after, Some(prev));
            }
        }
    }
    Ok(body)
}

pub fn retrieve(
    account: &AccountState,
    id: &str,
    mut p: Map<String, Value>,
) -> Result<Value, ApiError> {
    params::validate(&mut p, RETRIEVE)?;
    params::check_expand(&expand_of(&p), EXPANDABLE)?;
    Ok(load(account, id)?.render())
}

/// `POST /v1/issuing/transactions/:id` (metadata).
pub fn update(
    state: &mut State,
    key: &AccountKey,
    id: &str,
    mut p: Map<String, Value>,
) -> Result<Value, ApiError> {
    params::validate(&mut p, UPDATE)?;
    let account = state.account(key);
    let tx = load(account, id)?;
    let before = tx.render();
    let mut next = tx.clone();
    params::apply_metadata(&mut next.metadata, p.get("metadata"))?;
    account.transactions.insert(next);
    let body = load(account, id)?.render();
    let prev = webhooks::previous_attributes(&before, &body);
    if prev.as_object().is_some_and(|m| !m.is_empty()) {
        state.emit(key, "issuing_transaction.updated", body.clone(), Some(prev));
    }
    Ok(body)
}

pub fn list(account: &AccountState, mut p: Map<String, Value>) -> Result<Value, ApiError> {
    params::validate(&mut p, LIST)?;
    params::check_list_expand(&expand_of(&p), EXPANDABLE)?;
    let query = ListQuery::from_params(&p)?;
    let card = str_of(&p, "card");
    let cardholder = str_of(&p, "cardholder");
    let kind = str_of(&p, "type");
    let page = paginate(&account.transactions, &query, NOUN, |t| {
        card.is_none_or(|c| t.card == c)
            && cardholder.is_none_or(|h| t.cardholder.as_deref() == Some(h))
            && kind.is_none_or(|k| t.kind.as_str() == k)
    })?;
    let data = page.items.iter().map(|t| t.render()).collect();
    Ok(envelope(data, page.has_more, URL))
}
