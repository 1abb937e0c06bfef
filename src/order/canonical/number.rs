//! JSON numbers, written exactly as PostgreSQL's `numeric` prints them and
//! refused when `numeric` cannot hold them.

use super::{Canonicalizer, Poison};

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

impl Canonicalizer<'_> {
    /// Reads a number and writes it as `numeric` prints it: exactly, in
    /// plain notation, with as many fraction digits as the input's scale
    /// (`1.50` stays `1.50`, `1e2` is `100`, `100e-2` is `1.00`), no sign on
    /// zero.
    pub(super) fn number(&mut self) -> Result<(), Poison> {
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
}
