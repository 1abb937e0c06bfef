//! The canonical form of a message: one strict RFC 8259 pass over the text
//! that decides whether the store can hold every value in it (unknown fields
//! included) and writes the exact text the store will hold.
//!
//! The canonical text is the one PostgreSQL prints for the value as `jsonb`
//! (`payload::text`): members ordered as `jsonb` orders them (shorter key
//! first, then bytewise), the last of duplicate keys kept, `", "` and `": "`
//! as separators, strings with only `"`, `\` and C0 controls escaped (the
//! named escapes where JSON has them, `\u00xx` otherwise) and everything else
//! literal UTF-8, numbers printed as `numeric` prints them. So PostgreSQL and
//! SQLite hold the same bytes, what is read back equals what was written, and
//! canonicalising canonical text changes nothing.
//!
//! Poison, before any side effect:
//! * `malformed_json`: not RFC 8259 JSON, or nested deeper than
//!   [`MAX_DEPTH`];
//! * `unstorable`: JSON that `jsonb` cannot hold — a lone surrogate escape,
//!   an escaped NUL (`\u0000`; `text` cannot hold U+0000), a number outside
//!   `numeric`'s range;
//! * `too_large`: a canonical text longer than its limit (twice the message
//!   limit). Stricter than PostgreSQL on purpose: `1e131071` is 8 bytes in a
//!   message and 131,072 bytes stored, and the limit keeps what a message
//!   can cost in memory proportional to the message limit.
//!
//! Linear in the input: no recursion (an explicit stack at most
//! [`MAX_DEPTH`] deep), no allocation per character or per value; an
//! object's members are written as they come and rewritten once in key
//! order when the object closes, so a byte is copied at most once per
//! enclosing object.

use super::{poison, Poison, PoisonKind, MAX_DEPTH};

/// `numeric`'s limits, found against PostgreSQL 15 (they follow from its
/// format: a base-10000 weight of at most 32767 and a display scale of at
/// most 0x3FFF): at most 131,072 digits before the decimal point
/// (`1e131071` is stored, `1e131072` "overflows numeric format"), at most
/// 16,383 after it, counting trailing zeros (`1e-16383` and `0e-16383` are
/// stored, `1e-16384`, `0e-16384` and `0.0e-16383` are not), and an
/// exponent below 1,073,741,823 (`INT_MAX / 2`) in magnitude even for zero
/// (`0e1073741822` is stored as `0`, `0e1073741823` is refused).
pub(crate) const NUMERIC_MAX_INTEGER_DIGITS: i64 = 131_072;
pub(crate) const NUMERIC_MAX_SCALE: i64 = 16_383;
pub(crate) const NUMERIC_MAX_EXPONENT: i64 = 1_073_741_822;

/// Canonicalises `text`, whose canonical form may be at most `limit` bytes.
pub(crate) fn canonicalize(text: &str, limit: usize) -> Result<Vec<u8>, Poison> {
    SCRATCH.with(|cell| {
        let mut scratch = cell.take();
        let mut c = Canonicalizer {
            src: text.as_bytes(),
            pos: 0,
            // Whitespace goes, separators come: orders end up about this size.
            out: Vec::with_capacity(text.len() + text.len() / 4 + 16),
            limit,
            stack: std::mem::take(&mut scratch.stack),
            members: std::mem::take(&mut scratch.members),
            keys: std::mem::take(&mut scratch.keys),
            scratch: std::mem::take(&mut scratch.bytes),
        };
        c.stack.clear();
        c.members.clear();
        c.keys.clear();
        let result = c.run();
        // Keep the buffers for the next message on this thread, unless a
        // large one made them large.
        let keep = |mut v: Vec<u8>| {
            if v.capacity() > SCRATCH_KEEP_BYTES {
                v = Vec::new();
            }
            v
        };
        scratch.stack = c.stack;
        scratch.members = if c.members.capacity() > SCRATCH_KEEP_BYTES / 32 {
            Vec::new()
        } else {
            c.members
        };
        scratch.keys = keep(c.keys);
        scratch.bytes = keep(c.scratch);
        cell.replace(scratch);
        result.map(|()| c.out)
    })
}

/// Working buffers reused across messages on one thread, so that decoding
/// a typical order allocates only its output.
#[derive(Default)]
struct Scratch {
    stack: Vec<Frame>,
    members: Vec<Member>,
    keys: Vec<u8>,
    bytes: Vec<u8>,
}

/// Largest scratch buffer kept between messages.
const SCRATCH_KEEP_BYTES: usize = 64 * 1024;

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

#[derive(Clone, Copy)]
enum Frame {
    Object {
        /// Where this object's text starts in `out`.
        out_start: usize,
        /// Its first member in `members`.
        members_start: usize,
        /// The member being read (for error paths).
        current: Option<usize>,
    },
    Array {
        /// Index of the element being read (for error paths).
        index: usize,
    },
}

/// One member of an open object: its decoded key in `keys` and its text
/// (`"key": value`) in `out`.
#[derive(Clone, Copy)]
struct Member {
    key_start: u32,
    key_end: u32,
    text_start: usize,
    text_end: usize,
}

struct Canonicalizer<'a> {
    src: &'a [u8],
    pos: usize,
    out: Vec<u8>,
    limit: usize,
    stack: Vec<Frame>,
    members: Vec<Member>,
    /// Decoded keys of the open objects' members (bytewise comparison needs
    /// the decoded bytes, not the escaped text).
    keys: Vec<u8>,
    /// Decoded string contents, and an object's text while it is reordered.
    scratch: Vec<u8>,
}

impl Canonicalizer<'_> {
    fn run(&mut self) -> Result<(), Poison> {
        'value: loop {
            self.skip_ws();
            match self.peek() {
                Some(b'{') => {
                    self.open()?;
                    self.pos += 1;
                    self.stack.push(Frame::Object {
                        out_start: self.out.len(),
                        members_start: self.members.len(),
                        current: None,
                    });
                    self.skip_ws();
                    if self.peek() == Some(b'}') {
                        self.pos += 1;
                        self.close_object();
                    } else {
                        self.member_key()?;
                        continue 'value;
                    }
                }
                Some(b'[') => {
                    self.open()?;
                    self.pos += 1;
                    self.stack.push(Frame::Array { index: 0 });
                    self.out.push(b'[');
                    self.skip_ws();
                    if self.peek() == Some(b']') {
                        self.pos += 1;
                        self.out.push(b']');
                        self.stack.pop();
                    } else {
                        continue 'value;
                    }
                }
                Some(b'"') => {
                    self.pos += 1;
                    self.string(false)?;
                }
                Some(b'-' | b'0'..=b'9') => self.number()?,
                Some(b't') => self.literal(b"true")?,
                Some(b'f') => self.literal(b"false")?,
                Some(b'n') => self.literal(b"null")?,
                Some(_) => return Err(self.syntax("expected a JSON value")),
                None => return Err(self.syntax("unexpected end of input, expected a value")),
            }
            self.check_size()?;
            // A value is complete: close every container it completes.
            loop {
                self.skip_ws();
                let next = self.peek();
                match self.stack.last_mut() {
                    None => {
                        if self.pos < self.src.len() {
                            return Err(self.syntax("trailing characters after the JSON value"));
                        }
                        return Ok(());
                    }
                    Some(Frame::Array { index, .. }) => match next {
                        Some(b',') => {
                            *index += 1;
                            self.pos += 1;
                            self.out.extend_from_slice(b", ");
                            continue 'value;
                        }
                        Some(b']') => {
                            self.pos += 1;
                            self.out.push(b']');
                            self.stack.pop();
                        }
                        _ => return Err(self.syntax("expected ',' or ']' in an array")),
                    },
                    Some(Frame::Object { .. }) => {
                        if let Some(m) = self.members.last_mut() {
                            m.text_end = self.out.len();
                        }
                        match self.peek() {
                            Some(b',') => {
                                self.pos += 1;
                                self.skip_ws();
                                self.member_key()?;
                                continue 'value;
                            }
                            Some(b'}') => {
                                self.pos += 1;
                                self.close_object();
                            }
                            _ => return Err(self.syntax("expected ',' or '}' in an object")),
                        }
                    }
                }
            }
        }
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn open(&self) -> Result<(), Poison> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(poison(
                PoisonKind::MalformedJson,
                format!(
                    "nested deeper than {MAX_DEPTH} levels at byte {} ({})",
                    self.pos,
                    self.path()
                ),
            ));
        }
        Ok(())
    }

    /// Reads `"key":` of a member and starts the member.
    fn member_key(&mut self) -> Result<(), Poison> {
        if let Some(Frame::Object { current, .. }) = self.stack.last_mut() {
            *current = None;
        }
        if self.peek() != Some(b'"') {
            return Err(self.syntax("expected a string key in an object"));
        }
        self.pos += 1;
        let text_start = self.out.len();
        let key_start = self.keys.len();
        self.string(true)?;
        let key_end = self.keys.len();
        // u32 offsets keep `Member` small; a key area past 4 GiB is far past
        // any size limit anyway.
        let (Ok(key_start), Ok(key_end)) = (u32::try_from(key_start), u32::try_from(key_end))
        else {
            return Err(self.too_large());
        };
        self.skip_ws();
        if self.peek() != Some(b':') {
            return Err(self.syntax("expected ':' after an object key"));
        }
        self.pos += 1;
        self.out.extend_from_slice(b": ");
        if let Some(Frame::Object { current, .. }) = self.stack.last_mut() {
            *current = Some(self.members.len());
        }
        self.members.push(Member {
            key_start,
            key_end,
            text_start,
            text_end: text_start,
        });
        Ok(())
    }

    /// Writes the object whose members are the top frame's, in `jsonb`'s key
    /// order, the last of equal keys kept, and pops the frame.
    fn close_object(&mut self) {
        let Some(Frame::Object {
            out_start,
            members_start,
            ..
        }) = self.stack.pop()
        else {
            return;
        };
        let members = &mut self.members[members_start..];
        let keys = &self.keys;
        let key = |m: &Member| &keys[m.key_start as usize..m.key_end as usize];
        // Shorter keys first, then bytewise; among equal keys the later one
        // sorts last (its text starts later) and is the one kept.
        let sorted = members.windows(2).all(|w| {
            let (a, b) = (key(&w[0]), key(&w[1]));
            (a.len(), a) < (b.len(), b)
        });
        if !sorted {
            members.sort_unstable_by(|a, b| {
                let (ka, kb) = (key(a), key(b));
                (ka.len(), ka, a.text_start).cmp(&(kb.len(), kb, b.text_start))
            });
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(&self.out[out_start..]);
        self.out.truncate(out_start);
        self.out.push(b'{');
        let mut first = true;
        for (i, m) in members.iter().enumerate() {
            if members.get(i + 1).is_some_and(|next| key(next) == key(m)) {
                continue; // a later duplicate wins
            }
            if !first {
                self.out.extend_from_slice(b", ");
            }
            first = false;
            self.out
                .extend_from_slice(&self.scratch[m.text_start - out_start..m.text_end - out_start]);
        }
        self.out.push(b'}');
        let key_start = self.members.get(members_start).map(|m| m.key_start);
        self.members.truncate(members_start);
        if let Some(k) = key_start {
            self.keys.truncate(k as usize);
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), Poison> {
        if self.src[self.pos..].starts_with(word) {
            self.pos += word.len();
            self.out.extend_from_slice(word);
            Ok(())
        } else {
            Err(self.syntax("expected a JSON value"))
        }
    }

    /// Reads a string whose opening quote is consumed and writes it escaped
    /// to `out`; a key's decoded bytes also go to `keys`.
    fn string(&mut self, is_key: bool) -> Result<(), Poison> {
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

    /// Reads a number and writes it as `numeric` prints it: exactly, in
    /// plain notation, with as many fraction digits as the input's scale
    /// (`1.50` stays `1.50`, `1e2` is `100`, `100e-2` is `1.00`), no sign on
    /// zero.
    fn number(&mut self) -> Result<(), Poison> {
        let at = self.pos;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.pos += 1;
        }
        let int_start = self.pos;
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.syntax("expected a digit in a number")),
        }
        let int = &self.src[int_start..self.pos];
        let mut frac: &[u8] = &[];
        if self.peek() == Some(b'.') {
            self.pos += 1;
            let s = self.pos;
            self.digits();
            if self.pos == s {
                return Err(self.syntax("expected a digit after the decimal point"));
            }
            frac = &self.src[s..self.pos];
        }
        let mut exp: i64 = 0;
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            let exp_negative = match self.peek() {
                Some(b'-') => {
                    self.pos += 1;
                    true
                }
                Some(b'+') => {
                    self.pos += 1;
                    false
                }
                _ => false,
            };
            let s = self.pos;
            self.digits();
            if self.pos == s {
                return Err(self.syntax("expected a digit in an exponent"));
            }
            // Saturate: anything past the limit is refused below.
            for &d in &self.src[s..self.pos] {
                exp = (exp * 10 + i64::from(d - b'0')).min(NUMERIC_MAX_EXPONENT + 1);
            }
            if exp_negative {
                exp = -exp;
            }
        }
        if exp.abs() > NUMERIC_MAX_EXPONENT {
            return Err(self.unstorable(at, "a number whose exponent is outside numeric's range"));
        }
        let n_int = int.len() as i64;
        let n_all = n_int + frac.len() as i64;
        let digit = |i: i64| -> u8 {
            if i < 0 || i >= n_all {
                b'0'
            } else if i < n_int {
                int[i as usize]
            } else {
                frac[(i - n_int) as usize]
            }
        };
        // The decimal point sits after `point` digits of int ++ frac.
        let point = n_int + exp;
        let scale = (frac.len() as i64 - exp).max(0);
        if scale > NUMERIC_MAX_SCALE {
            return Err(self.unstorable(
                at,
                format!(
                    "a number with {scale} digits after the decimal point; numeric holds at most {NUMERIC_MAX_SCALE}"
                ),
            ));
        }
        let first_nonzero = int
            .iter()
            .chain(frac)
            .position(|&d| d != b'0')
            .map(|p| p as i64);
        let (negative, int_digits) = match first_nonzero {
            None => (false, 0),
            Some(f) => (negative, (point - f).max(0)),
        };
        if int_digits > NUMERIC_MAX_INTEGER_DIGITS {
            return Err(self.unstorable(
                at,
                format!(
                    "a number with {int_digits} digits before the decimal point; numeric holds at most {NUMERIC_MAX_INTEGER_DIGITS}"
                ),
            ));
        }
        let len = usize::from(negative)
            + int_digits.max(1) as usize
            + if scale > 0 { 1 + scale as usize } else { 0 };
        if self.out.len().saturating_add(len) > self.limit {
            self.pos = at;
            return Err(self.too_large());
        }
        if negative {
            self.out.push(b'-');
        }
        if int_digits == 0 {
            self.out.push(b'0');
        } else {
            let from = point - int_digits;
            if exp == 0 {
                self.out
                    .extend_from_slice(&int[from as usize..n_int as usize]);
            } else {
                self.out.extend((from..point).map(digit));
            }
        }
        if scale > 0 {
            self.out.push(b'.');
            if exp == 0 {
                self.out.extend_from_slice(frac);
            } else {
                self.out.extend((point..point + scale).map(digit));
            }
        }
        Ok(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }

    fn check_size(&self) -> Result<(), Poison> {
        if self.out.len() > self.limit {
            return Err(self.too_large());
        }
        Ok(())
    }

    fn too_large(&self) -> Poison {
        poison(
            PoisonKind::TooLarge,
            format!(
                "the canonical form grows past {} bytes (twice the message limit) at byte {} ({}); \
                 numbers are stored in plain notation, so an exponent can make a short message \
                 a large row",
                self.limit,
                self.pos,
                self.path()
            ),
        )
    }

    fn syntax(&self, what: &str) -> Poison {
        poison(
            PoisonKind::MalformedJson,
            format!("{what} at byte {} ({})", self.pos, self.path()),
        )
    }

    fn unstorable(&self, at: usize, what: impl std::fmt::Display) -> Poison {
        poison(
            PoisonKind::Unstorable,
            format!(
                "{what} at byte {at} ({}); the database cannot store it",
                self.path()
            ),
        )
    }

    /// Where the reader is, as a JSON path (`$.extra.list[3]`); only built
    /// for error details.
    fn path(&self) -> String {
        use std::fmt::Write;
        let mut path = String::from("$");
        for frame in &self.stack {
            match *frame {
                Frame::Array { index, .. } => {
                    let _ = write!(path, "[{index}]");
                }
                Frame::Object { current, .. } => {
                    let Some(m) = current.and_then(|i| self.members.get(i)) else {
                        continue;
                    };
                    let key = String::from_utf8_lossy(
                        &self.keys[m.key_start as usize..m.key_end as usize],
                    );
                    if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        let _ = write!(path, ".{key}");
                    } else {
                        let _ = write!(path, "[{key:?}]");
                    }
                }
            }
        }
        path
    }
}

/// Where the run of string bytes that need no decoding (anything but `"`,
/// `\` and C0 controls) starting at `i` ends. Eight bytes at a time: the
/// lowest byte flagged by the zero-byte tests is always a true match.
fn plain_run_end(s: &[u8], mut i: usize) -> usize {
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

#[cfg(test)]
mod tests {
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
}
