//! The order generator: a deterministic mix of good, to-be-rejected,
//! to-be-declined and poison messages.

/// What a generated message is meant to become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    Accept,
    Reject,
    Decline,
    Poison,
}

/// How many messages of a run carry each intent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IntentCounts {
    pub accept: u64,
    pub reject: u64,
    pub decline: u64,
    pub poison: u64,
}

/// Percentages of each kind; the rest are good orders.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub poison_pct: f64,
    pub reject_pct: f64,
    pub decline_pct: f64,
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            poison_pct: 0.0,
            reject_pct: 0.0,
            decline_pct: 0.0,
        }
    }
}

/// A deterministic order generator: message `i` of run `run_id` is always
/// the same bytes, so a second publish of a range is a true redelivery.
#[derive(Debug, Clone)]
pub struct OrderGen {
    pub run_id: String,
    pub mix: Mix,
    pub customers: u64,
}

impl OrderGen {
    pub fn new(run_id: impl Into<String>, mix: Mix) -> Self {
        Self {
            run_id: run_id.into(),
            mix,
            customers: 1000,
        }
    }

    pub fn order_id(&self, i: u64) -> String {
        format!("{}-{i:08}", self.run_id)
    }

    /// The intent of message `i`, spread evenly through the sequence.
    pub fn intent(&self, i: u64) -> Intent {
        // A low-discrepancy walk keeps each share exact-ish in any window.
        let x = ((i as f64) * 0.618_033_988_749_895).fract() * 100.0;
        let m = &self.mix;
        if x < m.poison_pct {
            Intent::Poison
        } else if x < m.poison_pct + m.reject_pct {
            Intent::Reject
        } else if x < m.poison_pct + m.reject_pct + m.decline_pct {
            Intent::Decline
        } else {
            Intent::Accept
        }
    }

    /// The intents of messages `0..n`, counted.
    pub fn intent_counts(&self, n: u64) -> IntentCounts {
        let mut c = IntentCounts::default();
        for i in 0..n {
            match self.intent(i) {
                Intent::Accept => c.accept += 1,
                Intent::Reject => c.reject += 1,
                Intent::Decline => c.decline += 1,
                Intent::Poison => c.poison += 1,
            }
        }
        c
    }

    pub fn message(&self, i: u64) -> (Intent, Vec<u8>) {
        let intent = self.intent(i);
        let id = self.order_id(i);
        let customer = match intent {
            Intent::Reject => format!("reject-{}", i % self.customers),
            Intent::Decline => format!("decline-{}", i % self.customers),
            _ => format!("c-{}", i % self.customers),
        };
        let qty = 1 + (i % 3) as i64;
        let price = 100 + (i % 997) as i64;
        let body = serde_json::json!({
            "order_id": id,
            "customer_id": customer,
            "currency": "EUR",
            "amount_cents": qty * price + 250,
            "items": [
                {"sku": format!("SKU-{}", i % 50), "qty": qty, "unit_price_cents": price},
                {"sku": "SHIP", "qty": 1, "unit_price_cents": 250}
            ],
            "created_at": "2026-11-22T10:00:00Z",
        });
        let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
        if intent == Intent::Poison {
            // Rotate through the kinds of damage a real feed carries.
            bytes = match i % 4 {
                0 => b"{\"order_id\": \"truncated".to_vec(),
                1 => String::from_utf8_lossy(&bytes)
                    .replace("\"EUR\"", "\"EURO\"")
                    .into_bytes(),
                2 => String::from_utf8_lossy(&bytes)
                    .replace("\"currency\"", "\"currency_code\"")
                    .into_bytes(),
                _ => String::from_utf8_lossy(&bytes)
                    .replacen("\"amount_cents\":", "\"amount_cents\":-", 1)
                    .into_bytes(),
            };
        }
        (intent, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::order::decode;

    #[test]
    fn generated_orders_match_their_intent() {
        let g = OrderGen::new(
            "t",
            Mix {
                poison_pct: 5.0,
                reject_pct: 5.0,
                decline_pct: 5.0,
            },
        );
        let mut counts = [0u32; 4];
        for i in 0..10_000 {
            let (intent, body) = g.message(i);
            let decoded = decode(&body, 64 * 1024);
            match intent {
                Intent::Poison => {
                    assert!(decoded.is_err(), "message {i} should be poison");
                    counts[3] += 1;
                }
                _ => {
                    let o = decoded.expect("valid order");
                    assert_eq!(o.order_id, g.order_id(i));
                    counts[intent as usize] += 1;
                }
            }
        }
        for c in &counts[1..] {
            assert!((450..550).contains(c), "{counts:?}");
        }
        assert_eq!(g.message(7), g.message(7));
    }
}
