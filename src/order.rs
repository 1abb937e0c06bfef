//! The order: what a message must hold, and the strict decoding that turns
//! raw bytes into a [`Decoded`] order or a [`Poison`] reason. Pure, no I/O.
//!
//! Decoding decides storability before any side effect: the stored payload
//! is the message's *canonical* JSON (see [`canonical`]), which is the text
//! PostgreSQL's `jsonb` prints for it and which SQLite stores unchanged —
//! unknown fields included, key order, whitespace, duplicate keys and number
//! notation normalised. A message that either database could not hold is
//! poison here, not a database error after the charge. The original bytes
//! are kept only in dead letters.

mod canonical;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// Valid JSON that the store cannot hold: a lone surrogate escape, an
    /// escaped NUL, a number outside PostgreSQL `numeric`'s range.
    Unstorable,
}

impl PoisonKind {
    pub const ALL: [PoisonKind; 10] = [
        PoisonKind::Empty,
        PoisonKind::TooLarge,
        PoisonKind::InvalidUtf8,
        PoisonKind::MalformedJson,
        PoisonKind::Schema,
        PoisonKind::InvalidAmount,
        PoisonKind::AmountMismatch,
        PoisonKind::UnknownCurrency,
        PoisonKind::InvalidField,
        PoisonKind::Unstorable,
    ];

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
            PoisonKind::Unstorable => "unstorable",
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

/// An accepted order with the payload the store holds for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub order: Order,
    /// canonical JSON text (UTF-8) the store holds
    pub payload: bytes::Bytes,
    pub digest: Digest,
}

/// SHA-256 of a canonical payload: identifies an order's contents when its
/// `order_id` comes again.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(payload: &[u8]) -> Digest {
        Digest(Sha256::digest(payload).into())
    }

    /// 64 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Decodes and checks one message body; the order only.
pub fn decode(body: &[u8], max_bytes: usize) -> Result<Order, Poison> {
    decode_canonical(body, max_bytes).map(|d| d.order)
}

/// Decodes and checks one message body: the order, its canonical payload
/// (at most twice `max_bytes`) and the payload's digest, or why it is
/// poison. Everything the store will hold has been checked when this
/// returns `Ok`.
pub fn decode_canonical(body: &[u8], max_bytes: usize) -> Result<Decoded, Poison> {
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
    // Syntax, depth and storability of every value, in one pass that also
    // writes the canonical text; only then the typed read of the known
    // fields (the depth is bounded by now, and duplicate known fields are
    // serde's `schema` error).
    let payload = canonical::canonicalize(text, max_bytes.saturating_mul(2))?;
    let order: Order = serde_json::from_str(text).map_err(|e| {
        let kind = match e.classify() {
            serde_json::error::Category::Data => PoisonKind::Schema,
            _ => PoisonKind::MalformedJson,
        };
        poison(kind, e.to_string())
    })?;
    check(&order)?;
    let digest = Digest::of(&payload);
    Ok(Decoded {
        order,
        payload: bytes::Bytes::from(payload),
        digest,
    })
}

/// Deepest nesting of arrays and objects accepted. Orders are shallow; a
/// deep document is an attack or a bug, and the database's JSON parser has
/// its own, lower, stack limit.
pub const MAX_DEPTH: usize = 32;

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
    // Spaces around an id are kept (the idempotency key encodes them), but
    // an id of nothing but white space names nothing.
    if value.chars().all(char::is_whitespace) {
        return Err(poison(
            PoisonKind::InvalidField,
            format!("{field} is blank (white space only)"),
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
            (&GOOD.replace("web", "\\u0000"), PoisonKind::Unstorable),
            (&GOOD.replace("web", "\\ud800"), PoisonKind::Unstorable),
            (&GOOD.replace("\"web\"", "1e131072"), PoisonKind::Unstorable),
            (&GOOD.replace("o-1", "o-1\\u0000"), PoisonKind::Unstorable),
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
    fn the_payload_is_canonical_and_digested() {
        let d = decode_canonical(GOOD.as_bytes(), 64 * 1024).expect("valid");
        assert_eq!(
            std::str::from_utf8(&d.payload).expect("UTF-8"),
            r#"{"items": [{"qty": 1, "sku": "A-1", "unit_price_cents": 4599}], "channel": "web", "currency": "EUR", "order_id": "o-1", "created_at": "2026-11-22T10:00:00Z", "customer_id": "c-1", "amount_cents": 4599}"#
        );
        assert_eq!(d.digest, Digest::of(&d.payload));
        let again = decode_canonical(&d.payload, 64 * 1024).expect("canonical text decodes");
        assert_eq!(again, d, "canonicalising is idempotent");
        let hex = d.digest.to_hex();
        assert_eq!(hex.len(), 64);
        assert!(hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(d.digest.to_string(), hex);
        assert_eq!(
            Digest::of(b"abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_backslash_before_u0000_is_text() {
        let body = GOOD.replace("web", "\\\\u0000");
        let d = decode_canonical(body.as_bytes(), 64 * 1024).expect("legal text");
        assert!(std::str::from_utf8(&d.payload)
            .expect("UTF-8")
            .contains(r#""channel": "\\u0000""#));
        let id = GOOD.replace("o-1", "o-1\\\\u0000");
        let o = decode(id.as_bytes(), 64 * 1024).expect("legal id");
        assert_eq!(o.order_id, "o-1\\u0000");
    }

    #[test]
    fn unknown_duplicates_keep_the_last_known_duplicates_are_poison() {
        let body = GOOD.replace("\"web\"", "\"web\",\"channel\":\"app\"");
        let d = decode_canonical(body.as_bytes(), 64 * 1024).expect("valid");
        let text = std::str::from_utf8(&d.payload).expect("UTF-8");
        assert!(
            text.contains(r#""channel": "app""#) && !text.contains("web"),
            "{text}"
        );
        let body = GOOD.replace("\"qty\":1", "\"qty\":1,\"qty\":1");
        assert_eq!(kind(body.as_bytes()), PoisonKind::Schema);
    }

    #[test]
    fn a_canonical_form_past_twice_the_limit_is_too_large() {
        let body = GOOD.replace("\"web\"", "1e4000");
        let p = decode_canonical(body.as_bytes(), 2048).expect_err("too large");
        assert_eq!(p.kind, PoisonKind::TooLarge);
        assert!(p.detail.contains("$.channel"), "{}", p.detail);
        decode_canonical(body.as_bytes(), 4096).expect("fits in twice 4096");
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
        let body = GOOD.replace("\"web\"", &deep);
        assert_eq!(kind(body.as_bytes()), PoisonKind::MalformedJson);
    }
}
