//! JSON strings: decoded (escapes, surrogate pairs) and written back with
//! only the escapes `jsonb` prints; keys keep their decoded bytes for
//! ordering.

use super::{Canonicalizer, Poison};

impl Canonicalizer<'_> {
    /// Reads a string whose opening quote is consumed and writes it escaped
    /// to `out`; a key's decoded bytes also go to `keys`.
    pub(super) fn string(&mut self, is_key: bool) -> Result<(), Poison> {
        let start = self.pos;
        // The common case: nothing escaped, so the text is its own decoded
        // and canonical form (the input is valid UTF-8 and a raw '"', '\'
        // or control character cannot be inside a string).
        let i = plain_run_end(self.src, start);
        if self.src.get(i) == Some(&b'"') {
            let content = &self.src[start..i];
            if is_key {
                self.keys.extend_from_slice(content);
            }
            self.out.push(b'"');
            self.out.extend_from_slice(content);
            self.out.push(b'"');
            self.pos = i + 1;
            return Ok(());
        }
        self.pos = i;
        let mut decoded = std::mem::take(&mut self.scratch);
        decoded.clear();
        decoded.extend_from_slice(&self.src[start..i]);
        let result = self.unescape_rest(&mut decoded);
        if result.is_ok() {
            if is_key {
                self.keys.extend_from_slice(&decoded);
            }
            escape_into(&mut self.out, &decoded);
        }
        self.scratch = decoded;
        result
    }

    /// Decodes the rest of a string from `pos` (just past the opening quote
    /// or a plain run) up to and including its closing quote.
    fn unescape_rest(&mut self, decoded: &mut Vec<u8>) -> Result<(), Poison> {
        loop {
            let Some(b) = self.peek() else {
                return Err(self.syntax("unterminated string"));
            };
            match b {
                b'"' => {
                    self.pos += 1;
                    return Ok(());
                }
                b'\\' => {
                    let escape_at = self.pos;
                    let Some(e) = self.src.get(self.pos + 1).copied() else {
                        return Err(self.syntax("unterminated string"));
                    };
                    self.pos += 2;
                    let byte = match e {
                        b'"' => b'"',
                        b'\\' => b'\\',
                        b'/' => b'/',
                        b'b' => 0x08,
                        b'f' => 0x0c,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'u' => {
                            let c = self.unicode_escape(escape_at)?;
                            let mut buf = [0u8; 4];
                            decoded.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                            continue;
                        }
                        _ => {
                            self.pos = escape_at;
                            return Err(self.syntax("invalid escape in a string"));
                        }
                    };
                    decoded.push(byte);
                }
                0x00..=0x1f => {
                    return Err(self.syntax("unescaped control character in a string"));
                }
                _ => {
                    let run_start = self.pos;
                    let i = plain_run_end(self.src, run_start);
                    decoded.extend_from_slice(&self.src[run_start..i]);
                    self.pos = i;
                }
            }
        }
    }

    /// Decodes `\uXXXX` (its `\u` consumed), pairing surrogates.
    fn unicode_escape(&mut self, escape_at: usize) -> Result<char, Poison> {
        let unit = self.hex4(escape_at)?;
        let code = match unit {
            0 => {
                return Err(self.unstorable(
                    escape_at,
                    "an escaped NUL (\\u0000): the database's text cannot hold U+0000",
                ))
            }
            0xd800..=0xdbff => {
                let low = if self.src[self.pos..].starts_with(b"\\u") {
                    self.pos += 2;
                    Some(self.hex4(self.pos - 2)?)
                } else {
                    None
                };
                match low {
                    Some(low @ 0xdc00..=0xdfff) => {
                        0x10000 + ((u32::from(unit) - 0xd800) << 10) + (u32::from(low) - 0xdc00)
                    }
                    _ => {
                        return Err(self.unstorable(
                            escape_at,
                            format!(
                                "a lone high surrogate escape (\\u{unit:04x}) not followed by a low one"
                            ),
                        ))
                    }
                }
            }
            0xdc00..=0xdfff => {
                return Err(self.unstorable(
                    escape_at,
                    format!("a lone low surrogate escape (\\u{unit:04x})"),
                ))
            }
            other => u32::from(other),
        };
        // Every value outside the surrogate range is a scalar value.
        char::from_u32(code).ok_or_else(|| self.syntax("invalid \\u escape"))
    }

    fn hex4(&mut self, escape_at: usize) -> Result<u16, Poison> {
        let mut v: u16 = 0;
        for k in 0..4 {
            let d = match self.src.get(self.pos + k) {
                Some(&b @ b'0'..=b'9') => b - b'0',
                Some(&b @ b'a'..=b'f') => b - b'a' + 10,
                Some(&b @ b'A'..=b'F') => b - b'A' + 10,
                _ => {
                    self.pos = escape_at;
                    return Err(self.syntax("a \\u escape needs four hex digits"));
                }
            };
            v = (v << 4) | u16::from(d);
        }
        self.pos += 4;
        Ok(v)
    }
}

/// Where the run of string bytes that need no decoding (anything but `"`,
/// `\` and C0 controls) starting at `i` ends. Eight bytes at a time: the
/// lowest byte flagged by the zero-byte tests is always a true match.
pub(super) fn plain_run_end(s: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    while let Some(chunk) = s.get(i..i + 8) {
        let Ok(chunk) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let w = u64::from_le_bytes(chunk);
        let hits = zero_byte(w ^ (ONES * u64::from(b'"')))
            | zero_byte(w ^ (ONES * u64::from(b'\\')))
            | (w.wrapping_sub(ONES * 0x20) & !w & HIGH);
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&b) = s.get(i) {
        if b == b'"' || b == b'\\' || b < 0x20 {
            break;
        }
        i += 1;
    }
    i
}

/// Writes a decoded string as `jsonb` prints one: `"`, `\` and C0 controls
/// escaped, the named escapes where JSON has them.
fn escape_into(out: &mut Vec<u8>, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let mut run = 0;
    for (i, &b) in s.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ],
            _ => continue,
        };
        out.extend_from_slice(&s[run..i]);
        out.extend_from_slice(esc);
        run = i + 1;
    }
    out.extend_from_slice(&s[run..]);
    out.push(b'"');
}
