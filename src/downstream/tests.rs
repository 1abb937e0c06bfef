use super::*;

/// Inverse of [`idempotency_key`], for the injectivity property.
fn decode_key(key: &str) -> Vec<u8> {
    let b = key.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).expect("hex");
            out.push(u8::from_str_radix(hex, 16).expect("hex"));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[test]
fn idempotency_keys_are_header_safe_and_injective() {
    let ids = [
        "o-1",
        "A-1",
        " A-1",
        "A-1 ",
        "  ",
        "A%201",
        "A 1",
        "Ä-1",
        "A\u{e4}-1",
        "café",
        "注文-1",
        "%",
        "%25",
        "a\tb",
        "😀",
        "2026/11/A:17",
    ];
    let mut seen = std::collections::HashMap::new();
    for id in ids {
        let key = idempotency_key(id);
        // A header value HTTP carries byte for byte: visible ASCII only,
        // so nothing to trim and nothing to re-encode.
        assert!(key.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{key:?}");
        assert!(HeaderValue::from_str(&key).is_ok());
        assert_eq!(decode_key(&key), id.as_bytes(), "{id:?}");
        if let Some(other) = seen.insert(key.to_string(), id) {
            panic!("{id:?} and {other:?} share the key {key}");
        }
    }
    assert_eq!(idempotency_key("o-1"), "o-1");
    assert_eq!(idempotency_key(" A-1"), "%20A-1");
    assert_eq!(idempotency_key("A%201"), "A%25201");
}

proptest::proptest! {
    #[test]
    fn every_id_round_trips_through_its_key(id in "(?s).{0,40}") {
        let key = idempotency_key(&id);
        proptest::prop_assert!(key.bytes().all(|b| (0x21..=0x7e).contains(&b)));
        proptest::prop_assert_eq!(decode_key(&key), id.as_bytes());
    }
}

#[test]
fn well_formed_traceparents_are_forwarded_as_they_are() {
    for tp in [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        // A later version may carry more fields.
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    ] {
        let got = traceparent_header(tp).unwrap_or_else(|| panic!("{tp} refused"));
        assert_eq!(got.to_str().ok(), Some(tp));
    }
}

#[test]
fn malformed_traceparents_are_dropped() {
    for tp in [
        "",
        "garbage",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n",
    ] {
        assert!(traceparent_header(tp).is_none(), "{tp:?} accepted");
    }
}
