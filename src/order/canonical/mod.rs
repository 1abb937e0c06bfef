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
//!
//! Strings (decoding, escaping) are read in `string`, numbers in `number`.

mod number;
mod string;
#[cfg(test)]
mod tests;

use super::{poison, Poison, PoisonKind, MAX_DEPTH};

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
