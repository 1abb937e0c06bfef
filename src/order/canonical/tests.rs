//! The canonical form against what PostgreSQL prints, and its limits.

use super::string::plain_run_end;
use super::*;

fn canon(text: &str) -> String {
    let out = canonicalize(text, 1 << 20).unwrap_or_else(|p| panic!("{text}: {p}"));
    String::from_utf8(out).expect("canonical text is UTF-8")
}

fn refused(text: &str) -> Poison {
    canonicalize(text, 1 << 20).expect_err(text)
}

/// Each pair: input, what PostgreSQL 15 printed for `input::jsonb::text`.
#[test]
fn matches_what_postgres_prints() {
    let cases = [
        (
            r#"{"b":1,"a":[1,2],"aa":{},"":null, "x":[], "y":"\u00e9\u2028\n\t\"\\\/\b\f\r\u0001\u001f\u007f"}"#,
            "{\"\": null, \"a\": [1, 2], \"b\": 1, \"x\": [], \"y\": \"é\u{2028}\\n\\t\\\"\\\\/\\b\\f\\r\\u0001\\u001f\u{7f}\", \"aa\": {}}",
        ),
        (r#"{"a":1,"a":2}"#, r#"{"a": 2}"#),
        (
            "[1e2, 1.50, -0, -0.0, 0e10, 1E-2, 1.0e1, 0.000001, 1e-7, 12345678901234567890123, -1.23e-5, 1e0, 0.0e-5, 100e-2]",
            "[100, 1.50, 0, 0.0, 0, 0.01, 10, 0.000001, 0.0000001, 12345678901234567890123, -0.0000123, 1, 0.000000, 1.00]",
        ),
        (r#""\ud83d\ude00""#, "\"😀\""),
        (r#""\uD83D\uDE00 \u00E9 \uFFFF \uFDD0""#, "\"😀 é \u{ffff} \u{fdd0}\""),
        (" [ ] ", "[]"),
        ("[[],{},[{}]]", "[[], {}, [{}]]"),
        (r#"{"a":{"b":[]}}"#, r#"{"a": {"b": []}}"#),
        (r#"{"é":1,"z":2,"ab":3,"\u00e9":4}"#, r#"{"z": 2, "ab": 3, "é": 4}"#),
        ("1e00000000000000000000000000001", "10"),
        ("0e1073741822", "0"),
        ("true", "true"),
        ("\t\r\n null \n", "null"),
    ];
    for (input, want) in cases {
        assert_eq!(canon(input), want, "input: {input}");
    }
}

#[test]
fn canonical_text_is_a_fixed_point() {
    for input in [
        r#"{"zz":{"b":[1,{"y":"\u0001","x":"\\u0000"}],"a":-0.0e3},"a":"\ud834\udd1e","a":"x"}"#,
        "[1.5e3, 0.001e-2, 5e-3, -12.340e1]",
    ] {
        let once = canon(input);
        assert_eq!(canon(&once), once, "input: {input}");
    }
}

#[test]
fn numeric_limits_are_postgres_limits() {
    let big = "1".to_string() + &"0".repeat(131_071);
    assert_eq!(canon("1e131071"), big);
    assert_eq!(canon("9.9e131071").len(), 131_072);
    assert_eq!(canon("1e-16383").len(), 16_385);
    assert_eq!(canon("0e-16383").len(), 16_385);
    assert_eq!(canon("1.5e-16382").len(), 16_385);
    assert_eq!(canon("0e131072"), "0");
    assert_eq!(canon("0.0000001e131078").len(), 131_072);
    for bad in [
        "1e131072",
        "1e-16384",
        "0e-16384",
        "0.0e-16383",
        "1.5e-16383",
        "-1e-16384",
        "0e1073741823",
        "1e99999999999999999999",
        "1e-999999",
    ] {
        assert_eq!(refused(bad).kind, PoisonKind::Unstorable, "{bad}");
    }
}

#[test]
fn storability_and_syntax_have_their_reasons() {
    for (input, kind) in [
        (r#"{"a":"\ud800"}"#, PoisonKind::Unstorable),
        (r#"{"a":"\ud800\u0041"}"#, PoisonKind::Unstorable),
        (r#"{"a":"\udc00"}"#, PoisonKind::Unstorable),
        (r#"{"a":"\ud800\ud800\udc00"}"#, PoisonKind::Unstorable),
        (r#"{"a":"x\u0000"}"#, PoisonKind::Unstorable),
        (r#"{"\u0000":1}"#, PoisonKind::Unstorable),
        ("{", PoisonKind::MalformedJson),
        ("01", PoisonKind::MalformedJson),
        ("1.", PoisonKind::MalformedJson),
        ("-", PoisonKind::MalformedJson),
        ("1e", PoisonKind::MalformedJson),
        ("[1,]", PoisonKind::MalformedJson),
        (r#"{"a":1,}"#, PoisonKind::MalformedJson),
        (r#"{"a" 1}"#, PoisonKind::MalformedJson),
        (r#""\x""#, PoisonKind::MalformedJson),
        (r#""\u12""#, PoisonKind::MalformedJson),
        ("\"a\tb\"", PoisonKind::MalformedJson),
        ("\u{feff}{}", PoisonKind::MalformedJson),
        ("{} x", PoisonKind::MalformedJson),
        ("nul", PoisonKind::MalformedJson),
        ("", PoisonKind::MalformedJson),
    ] {
        assert_eq!(refused(input).kind, kind, "input: {input}");
    }
    // A backslash followed by "u0000" is text, not an escape.
    assert_eq!(canon(r#""\\u0000""#), r#""\\u0000""#);
}

#[test]
fn details_name_the_path_and_offset() {
    let p = refused(r#"{"a":1,"extra":{"list":[0,{"k":"\ud800"}]}}"#);
    assert!(
        p.detail.contains("$.extra.list[1].k") && p.detail.contains("byte 32"),
        "{}",
        p.detail
    );
    let p = refused(r#"{"a b":[1e999999999]}"#);
    assert!(p.detail.contains(r#"$["a b"][0]"#), "{}", p.detail);
}

#[test]
fn depth_is_bounded_without_recursion() {
    let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
    canon(&ok);
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(refused(&deep).kind, PoisonKind::MalformedJson);
}

#[test]
fn the_plain_run_scan_finds_the_first_special_byte() {
    let slow = |s: &[u8], i: usize| {
        (i..s.len())
            .find(|&j| s[j] == b'"' || s[j] == b'\\' || s[j] < 0x20)
            .unwrap_or(s.len())
    };
    let bytes: Vec<u8> = (0u8..=255).chain(0u8..=255).collect();
    for special in [b'"', b'\\', 0, 0x1f, b'\n'] {
        for at in 0..40 {
            let mut s: Vec<u8> = "é中😀abcdefghijklmnopqrstuvwxyz0123456789AB"
                .bytes()
                .take(40)
                .collect();
            s[at] = special;
            for i in 0..s.len() {
                assert_eq!(
                    plain_run_end(&s, i),
                    slow(&s, i),
                    "{special} at {at} from {i}"
                );
            }
        }
    }
    for i in 0..bytes.len() {
        assert_eq!(plain_run_end(&bytes, i), slow(&bytes, i));
    }
}

#[test]
fn the_canonical_size_is_bounded() {
    let p = canonicalize("[1e100000]", 1000).expect_err("too large");
    assert_eq!(p.kind, PoisonKind::TooLarge);
    let p = canonicalize(&format!("[{}]", "0,".repeat(400) + "0"), 1000).expect_err("large");
    assert_eq!(p.kind, PoisonKind::TooLarge);
    canonicalize("[1e990]", 1000).expect("fits");
}
