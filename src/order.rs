//! The order: what a message must hold, and the strict decoding that turns
//! raw bytes into an [`Order`] or a [`Poison`] reason. Pure, no I/O.
//!
//! Unknown fields are allowed and kept: the stored payload is the message's
//! own bytes, not a re-serialisation.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Longest accepted `order_id`, `customer_id` or `sku`, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Most line items in one order.
pub const MAX_ITEMS: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub customer_id: String,
    pub currency: String,
    pub amount_cents: i64,
    pub items: Vec<Item>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub sku: String,
    pub qty: i64,
    pub unit_price_cents: i64,
}

/// Why a message is not a valid order. `kind` is a short stable label
/// (metrics, headers); `detail` says what exactly is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {detail}")]
pub struct Poison {
    pub kind: PoisonKind,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonKind {
    Empty,
    TooLarge,
    InvalidUtf8,
    MalformedJson,
    Schema,
    InvalidAmount,
    AmountMismatch,
    UnknownCurrency,
    InvalidField,
}

impl PoisonKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PoisonKind::Empty => "empty",
            PoisonKind::TooLarge => "too_large",
            PoisonKind::InvalidUtf8 => "invalid_utf8",
            PoisonKind::MalformedJson => "malformed_json",
            PoisonKind::Schema => "schema",
            PoisonKind::InvalidAmount => "invalid_amount",
            PoisonKind::AmountMismatch => "amount_mismatch",
            PoisonKind::UnknownCurrency => "unknown_currency",
            PoisonKind::InvalidField => "invalid_field",
        }
    }
}

impl std::fmt::Display for PoisonKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn poison(kind: PoisonKind, detail: impl Into<String>) -> Poison {
    Poison {
        kind,
        detail: detail.into(),
    }
}

/// ISO 4217 active currency codes.
const CURRENCIES: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD",
    "CDF", "CHF", "CLP", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD",
    "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ",
    "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD",
    "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR",
    "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR",
    "MWK", "MXN", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN",
    "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR",
    "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB",
    "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS",
    "VES", "VND", "VUV", "WST", "XAF", "XCD", "XOF", "XPF", "YER", "ZAR", "ZMW", "ZWG",
];

pub fn is_known_currency(code: &str) -> bool {
    CURRENCIES.binary_search(&code).is_ok()
}

/// Decodes and checks one message body.
pub fn decode(body: &[u8], max_bytes: usize) -> Result<Order, Poison> {
    if body.is_empty() {
        return Err(poison(PoisonKind::Empty, "message body is empty"));
    }
    if body.len() > max_bytes {
        return Err(poison(
            PoisonKind::TooLarge,
            format!("{} bytes, limit is {max_bytes}", body.len()),
        ));
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        poison(
            PoisonKind::InvalidUtf8,
            format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        )
    })?;
    check_depth(body)?;
    // PostgreSQL's jsonb cannot hold U+0000; refuse it here with a clear
    // reason rather than failing the batch that would carry it.
    if text.contains("\\u0000") {
        return Err(poison(
            PoisonKind::InvalidField,
            "payload contains an escaped NUL character (\\u0000)",
        ));
    }
    let order: Order = serde_json::from_str(text).map_err(|e| {
        let kind = match e.classify() {
            serde_json::error::Category::Data => PoisonKind::Schema,
            _ => PoisonKind::MalformedJson,
        };
        poison(kind, e.to_string())
    })?;
    check(&order)?;
    Ok(order)
}

/// Deepest nesting of arrays and objects accepted. Orders are shallow; a
/// deep document is an attack or a bug, and the database's JSON parser has
/// its own, lower, stack limit.
pub const MAX_DEPTH: usize = 32;

/// Refuses documents nested deeper than [`MAX_DEPTH`] with one linear scan,
/// before any parser recurses.
fn check_depth(body: &[u8]) -> Result<(), Poison> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(poison(
                        PoisonKind::MalformedJson,
                        format!("nested deeper than {MAX_DEPTH} levels"),
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn check_id(field: &str, value: &str) -> Result<(), Poison> {
    if value.is_empty() {
        return Err(poison(
            PoisonKind::InvalidField,
            format!("{field} is empty"),
        ));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(poison(
            PoisonKind::InvalidField,
            format!("{field} is {} bytes, limit is {MAX_ID_BYTES}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(poison(
            PoisonKind::InvalidField,
            format!("{field} contains control characters"),
        ));
    }
    Ok(())
}

fn check(order: &Order) -> Result<(), Poison> {
    check_id("order_id", &order.order_id)?;
    check_id("customer_id", &order.customer_id)?;
    if !is_known_currency(&order.currency) {
        return Err(poison(
            PoisonKind::UnknownCurrency,
            format!("{:?} is not an ISO 4217 currency code", order.currency),
        ));
    }
    if order.amount_cents <= 0 {
        return Err(poison(
            PoisonKind::InvalidAmount,
            format!("amount_cents must be > 0, got {}", order.amount_cents),
        ));
    }
    if order.items.is_empty() {
        return Err(poison(PoisonKind::InvalidField, "items is empty"));
    }
    if order.items.len() > MAX_ITEMS {
        return Err(poison(
            PoisonKind::InvalidField,
            format!("{} items, limit is {MAX_ITEMS}", order.items.len()),
        ));
    }
    let mut sum: i64 = 0;
    for (i, item) in order.items.iter().enumerate() {
        check_id(&format!("items[{i}].sku"), &item.sku)?;
        if item.qty <= 0 {
            return Err(poison(
                PoisonKind::InvalidAmount,
                format!("items[{i}].qty must be > 0, got {}", item.qty),
            ));
        }
        if item.unit_price_cents < 0 {
            return Err(poison(
                PoisonKind::InvalidAmount,
                format!(
                    "items[{i}].unit_price_cents must be >= 0, got {}",
                    item.unit_price_cents
                ),
            ));
        }
        sum = item
            .qty
            .checked_mul(item.unit_price_cents)
            .and_then(|line| sum.checked_add(line))
            .ok_or_else(|| {
                poison(
                    PoisonKind::InvalidAmount,
                    format!("items overflow a 64-bit amount at items[{i}]"),
                )
            })?;
    }
    if sum != order.amount_cents {
        return Err(poison(
            PoisonKind::AmountMismatch,
            format!(
                "amount_cents is {} but the items sum to {sum}",
                order.amount_cents
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"order_id":"o-1","customer_id":"c-1","currency":"EUR","amount_cents":4599,
        "items":[{"sku":"A-1","qty":1,"unit_price_cents":4599}],"created_at":"2026-11-22T10:00:00Z",
        "channel":"web"}"#;

    fn kind(body: &[u8]) -> PoisonKind {
        decode(body, 64 * 1024).expect_err("poison").kind
    }

    #[test]
    fn currency_table_is_sorted_for_binary_search() {
        assert!(CURRENCIES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_good_order_decodes_and_keeps_its_fields() {
        let o = decode(GOOD.as_bytes(), 64 * 1024).expect("valid");
        assert_eq!(o.order_id, "o-1");
        assert_eq!(o.amount_cents, 4599);
        assert_eq!(o.items.len(), 1);
    }

    #[test]
    fn each_defect_has_its_reason() {
        let cases: &[(&str, PoisonKind)] = &[
            ("", PoisonKind::Empty),
            ("{not json", PoisonKind::MalformedJson),
            ("[1,2]", PoisonKind::Schema),
            ("\"order\"", PoisonKind::Schema),
            (r#"{"order_id":"o"}"#, PoisonKind::Schema),
            (
                &GOOD.replace("\"amount_cents\":4599", "\"amount_cents\":\"4599\""),
                PoisonKind::Schema,
            ),
            (
                &GOOD.replace("\"amount_cents\":4599", "\"amount_cents\":-4599"),
                PoisonKind::InvalidAmount,
            ),
            (
                &GOOD.replace("\"amount_cents\":4599", "\"amount_cents\":4600"),
                PoisonKind::AmountMismatch,
            ),
            (
                &GOOD.replace(
                    "\"amount_cents\":4599",
                    "\"amount_cents\":99999999999999999999",
                ),
                PoisonKind::Schema,
            ),
            (&GOOD.replace("EUR", "XYZ"), PoisonKind::UnknownCurrency),
            (&GOOD.replace("\"o-1\"", "\"\""), PoisonKind::InvalidField),
            (
                &GOOD.replace("\"c-1\"", "\"c-1\",\"customer_id\":\"c-2\""),
                PoisonKind::Schema,
            ),
            (&GOOD.replace("web", "\\u0000"), PoisonKind::InvalidField),
            (
                &GOOD.replace(
                    "\"qty\":1,\"unit_price_cents\":4599",
                    "\"qty\":9223372036854775807,\"unit_price_cents\":2",
                ),
                PoisonKind::InvalidAmount,
            ),
        ];
        for (body, want) in cases {
            assert_eq!(kind(body.as_bytes()), *want, "body: {body}");
        }
    }

    #[test]
    fn size_and_encoding_are_checked_before_parsing() {
        assert_eq!(
            decode(GOOD.as_bytes(), 16).expect_err("too large").kind,
            PoisonKind::TooLarge
        );
        let mut bad = GOOD.as_bytes().to_vec();
        bad[20] = 0xff;
        assert_eq!(kind(&bad), PoisonKind::InvalidUtf8);
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
        let body = GOOD.replace("\"web\"", &deep);
        assert_eq!(kind(body.as_bytes()), PoisonKind::MalformedJson);
    }
}
