//! Property tests of the decoder (`conveyor::order::decode`): whatever the
//! bytes, it answers — an order that satisfies every schema rule, or a
//! poison reason — and never panics, overflows or recurses without bound.
//! `fuzz/corpus/decode/` keeps the inputs that matter (each kind of damage a
//! feed carries); proptest keeps its own regressions in `proptest-regressions/`.

use conveyor::order::{decode, decode_canonical, is_known_currency, Decoded, Order, PoisonKind};
use proptest::prelude::*;

const MAX: usize = 64 * 1024;

/// What every accepted order satisfies.
fn check_invariants(o: &Order) {
    assert!(!o.order_id.is_empty() && !o.customer_id.is_empty());
    assert!(is_known_currency(&o.currency));
    assert!(o.amount_cents > 0);
    assert!(!o.items.is_empty());
    let sum = o.items.iter().try_fold(0i64, |acc, i| {
        i.qty
            .checked_mul(i.unit_price_cents)
            .and_then(|l| acc.checked_add(l))
    });
    assert_eq!(sum, Some(o.amount_cents));
}

/// What every accepted payload satisfies: it is canonical (decoding it
/// gives itself) and means what the message meant.
fn check_payload(body: &[u8], d: &Decoded) {
    check_invariants(&d.order);
    let again = decode_canonical(&d.payload, MAX * 2).expect("a canonical payload decodes");
    assert_eq!(again.payload, d.payload, "canonicalising is idempotent");
    assert_eq!(again.digest, d.digest);
    assert_eq!(again.order, d.order);
    // serde_json's Value keeps the last of duplicate keys, as jsonb does.
    // Numbers are compared as text by tests/store_differential.rs (against
    // PostgreSQL); here only that they stay numbers: two spellings of one
    // value need not parse to the same f64.
    fn shape(v: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match v {
            Value::Number(_) => Value::String("<number>".into()),
            Value::Array(a) => Value::Array(a.into_iter().map(shape).collect()),
            Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, shape(v))).collect()),
            other => other,
        }
    }
    let meant: serde_json::Value = serde_json::from_slice(body).expect("accepted text is JSON");
    let kept: serde_json::Value = serde_json::from_slice(&d.payload).expect("payload is JSON");
    assert_eq!(shape(meant), shape(kept));
}

fn valid_order() -> impl Strategy<Value = String> {
    (
        "[a-z0-9-]{1,40}",
        "[a-z0-9-]{1,20}",
        prop::sample::select(vec!["EUR", "USD", "GBP", "JPY", "CHF"]),
        prop::collection::vec(("[A-Z0-9-]{1,10}", 1i64..50, 0i64..100_000), 1..20),
    )
        .prop_map(|(id, customer, currency, items)| {
            let amount: i64 = items.iter().map(|(_, q, p)| q * p).sum();
            let amount = amount.max(1);
            let mut items: Vec<serde_json::Value> = items
                .iter()
                .map(|(sku, q, p)| serde_json::json!({"sku": sku, "qty": q, "unit_price_cents": p}))
                .collect();
            // Keep the sum equal to the amount even when every price is 0.
            let listed: i64 = items
                .iter()
                .map(|i| i["qty"].as_i64().unwrap_or(0) * i["unit_price_cents"].as_i64().unwrap_or(0))
                .sum();
            if listed != amount {
                items.push(serde_json::json!({"sku": "ADJ", "qty": 1, "unit_price_cents": amount - listed}));
            }
            serde_json::json!({
                "order_id": id, "customer_id": customer, "currency": currency,
                "amount_cents": amount, "items": items,
                "created_at": "2026-11-22T10:00:00Z", "extra": {"kept": true},
            })
            .to_string()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        if let Ok(d) = decode_canonical(&bytes, MAX) {
            check_payload(&bytes, &d);
        }
    }

    #[test]
    fn valid_orders_decode(body in valid_order()) {
        let d = decode_canonical(body.as_bytes(), MAX).expect("a valid order decodes");
        check_payload(body.as_bytes(), &d);
        prop_assert_eq!(decode(body.as_bytes(), MAX).expect("decode agrees"), d.order);
    }

    #[test]
    fn damaged_orders_are_refused_or_still_valid(
        body in valid_order(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let mut bytes = body.into_bytes();
        for (at, byte, op) in edits {
            if bytes.is_empty() { break; }
            let i = at.index(bytes.len());
            match op {
                0 => { bytes.remove(i); }
                1 => bytes[i] = byte,
                _ => bytes.insert(i, byte),
            }
        }
        if let Ok(d) = decode_canonical(&bytes, MAX) {
            check_payload(&bytes, &d);
        }
    }

    #[test]
    fn nesting_is_bounded(depth in 1usize..50_000) {
        let body = format!("{{\"x\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
        let _ = decode(body.as_bytes(), usize::MAX);
    }
}

#[test]
fn the_corpus_gets_the_expected_answers() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    // `store-*` files come from tests/store_differential.rs, which decodes
    // with a larger limit so that numeric's own limits are what is tested.
    let limit = |name: &str| {
        if name.starts_with("store-") {
            1 << 20
        } else {
            MAX
        }
    };
    let expect = |name: &str| -> Option<PoisonKind> {
        match name {
            n if n.starts_with("store-ok-") => None,
            n if n.starts_with("store-unstorable-") => Some(PoisonKind::Unstorable),
            n if n.starts_with("store-malformed-") => Some(PoisonKind::MalformedJson),
            n if n.starts_with("store-too-large-") => Some(PoisonKind::TooLarge),
            "valid-minimal" => None,
            "empty" => Some(PoisonKind::Empty),
            "open-brace" | "deep-array" => Some(PoisonKind::MalformedJson),
            "array" | "string" | "null" | "duplicate-key" | "float-amount" | "bad-date" => {
                Some(PoisonKind::Schema)
            }
            "overflow" => Some(PoisonKind::InvalidAmount),
            "invalid-utf8" => Some(PoisonKind::InvalidUtf8),
            "nul-escape" => Some(PoisonKind::Unstorable),
            "huge-array" => Some(PoisonKind::InvalidField),
            "lowercase-currency" => Some(PoisonKind::UnknownCurrency),
            other => panic!("corpus file {other} has no expected answer here"),
        }
    };
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let bytes = std::fs::read(&path).expect("read");
        let got = decode(&bytes, limit(&name)).err().map(|p| p.kind);
        assert_eq!(got, expect(&name), "{name}");
        seen += 1;
    }
    assert!(seen >= 49, "corpus shrank to {seen}");
}

/// Decode cost per message, for the record (not asserted): 100,000 decodes
/// of a typical 300-byte order, median of three runs, next to serde's typed
/// read of the same text alone (what decoding cost before the canonical
/// pass and the digest). Meaningful in release mode only:
/// `cargo test --release --test decode_fuzz -- --ignored --nocapture decode_cost`
#[test]
#[ignore = "a measurement; run it in release mode"]
fn decode_cost() {
    const BODY: &str = r#"{"order_id":"5f0c2a9e-7b1d-4c3e-9a8f-1d2e3f4a5b6c","customer_id":"c-118","currency":"EUR","amount_cents":4599,"items":[{"sku":"A-1","qty":1,"unit_price_cents":2599},{"sku":"B-22","qty":2,"unit_price_cents":1000}],"created_at":"2026-11-22T10:00:00Z","channel":"web","note":"leave at the door"}"#;
    fn median_ns(mut f: impl FnMut() -> usize) -> f64 {
        const N: u32 = 100_000;
        let mut runs: Vec<f64> = (0..3)
            .map(|_| {
                let t = std::time::Instant::now();
                let mut sink = 0;
                for _ in 0..N {
                    sink += f();
                }
                std::hint::black_box(sink);
                t.elapsed().as_nanos() as f64 / f64::from(N)
            })
            .collect();
        runs.sort_by(f64::total_cmp);
        runs[1]
    }
    let body = std::hint::black_box(BODY.as_bytes());
    let typed = median_ns(|| {
        serde_json::from_slice::<Order>(body)
            .map(|o| o.items.len())
            .unwrap_or(0)
    });
    let full = median_ns(|| {
        decode_canonical(body, MAX)
            .map(|d| d.payload.len())
            .unwrap_or(0)
    });
    println!(
        "{} bytes: serde typed read {typed:.0} ns, decode_canonical {full:.0} ns per message",
        BODY.len()
    );
}
