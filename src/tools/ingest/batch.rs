//! One `POST /orders/batch` body: split into orders (a JSON array, or NDJSON
//! one order per line), each checked by the daemon's own decoder
//! (`decode_canonical`: well-formed and storable), so that what ingest
//! accepts `run` will not dead-letter as poison.

use std::collections::HashSet;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::order::decode_canonical;

/// How the orders are laid out in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    JsonArray,
    Ndjson,
}

impl Layout {
    /// From the content type; without one, a body starting with `[` is an
    /// array and anything else NDJSON.
    pub fn of(content_type: Option<&str>, body: &[u8]) -> Self {
        let ct = content_type.unwrap_or("").to_ascii_lowercase();
        if ct.contains("ndjson") || ct.contains("jsonl") || ct.contains("json-seq") {
            return Layout::Ndjson;
        }
        if ct.contains("json") {
            return Layout::JsonArray;
        }
        match body.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'[') => Layout::JsonArray,
            _ => Layout::Ndjson,
        }
    }
}

/// The body cannot be split into orders at all: answered 400 or 413.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadBatch {
    #[error("the body is not a JSON array of orders: {0}")]
    NotAnArray(String),
    #[error("{count} orders in one batch, the limit (ingest.max_batch) is {limit}")]
    TooMany { count: usize, limit: usize },
}

/// An order refused, by its position in the batch (from 0; NDJSON: blank
/// lines are not counted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Rejection {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub order_id: Option<String>,
    pub reason: String,
    pub detail: String,
}

/// An order that passed the decoder, its bytes as they came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Valid<'a> {
    pub index: usize,
    pub order_id: String,
    pub bytes: &'a [u8],
}

/// The orders of a body, checked.
#[derive(Debug, Default)]
pub struct Checked<'a> {
    pub valid: Vec<Valid<'a>>,
    pub rejected: Vec<Rejection>,
}

/// Splits and checks a body. `max_message_bytes` is the daemon's own limit
/// per order (`source.max_message_bytes`).
pub fn check(
    body: &[u8],
    layout: Layout,
    max_batch: usize,
    max_message_bytes: usize,
) -> Result<Checked<'_>, BadBatch> {
    let items: Vec<&[u8]> = match layout {
        Layout::JsonArray => serde_json::from_slice::<Vec<&RawValue>>(body)
            .map_err(|e| BadBatch::NotAnArray(e.to_string()))?
            .into_iter()
            .map(|r| r.get().as_bytes())
            .collect(),
        Layout::Ndjson => body
            .split(|&b| b == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .collect(),
    };
    if items.len() > max_batch {
        return Err(BadBatch::TooMany {
            count: items.len(),
            limit: max_batch,
        });
    }
    let mut checked = Checked {
        valid: Vec::with_capacity(items.len()),
        rejected: Vec::new(),
    };
    let mut seen: HashSet<String> = HashSet::with_capacity(items.len());
    for (index, bytes) in items.into_iter().enumerate() {
        match decode_canonical(bytes, max_message_bytes) {
            Ok(decoded) => {
                let order = decoded.order;
                if !seen.insert(order.order_id.clone()) {
                    checked.rejected.push(Rejection {
                        index,
                        order_id: Some(order.order_id),
                        reason: "duplicate_in_batch".into(),
                        detail: "this order_id already appears earlier in the batch".into(),
                    });
                    continue;
                }
                checked.valid.push(Valid {
                    index,
                    order_id: order.order_id,
                    bytes,
                });
            }
            Err(p) => checked.rejected.push(Rejection {
                index,
                order_id: order_id_of(bytes),
                reason: p.kind.as_str().to_string(),
                detail: p.detail,
            }),
        }
    }
    Ok(checked)
}

/// The `order_id` of an invalid order, when it has a readable one.
fn order_id_of(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Id {
        order_id: String,
    }
    serde_json::from_slice::<Id>(bytes)
        .ok()
        .map(|i| i.order_id)
        .filter(|id| id.len() <= crate::order::MAX_ID_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::produce::{Mix, OrderGen};

    fn orders(n: u64) -> Vec<Vec<u8>> {
        let g = OrderGen::new("b", Mix::default());
        (0..n).map(|i| g.message(i).1).collect()
    }

    #[test]
    fn an_array_and_ndjson_give_the_same_orders() {
        let o = orders(3);
        let array = format!(
            "[{}]",
            o.iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect::<Vec<_>>()
                .join(",")
        );
        let ndjson = o
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect::<Vec<_>>()
            .join("\r\n\n");
        for (body, layout) in [
            (array.as_bytes(), Layout::JsonArray),
            (ndjson.as_bytes(), Layout::Ndjson),
        ] {
            assert_eq!(Layout::of(None, body), layout);
            let c = check(body, layout, 10, 65536).expect("checked");
            assert!(c.rejected.is_empty(), "{:?}", c.rejected);
            assert_eq!(c.valid.len(), 3);
            assert_eq!(c.valid[2].bytes, o[2].as_slice());
        }
    }

    #[test]
    fn invalid_and_repeated_orders_are_rejected_by_index() {
        let o = orders(2);
        let body = [
            o[0].clone(),
            b"{\"order_id\": \"x-1\", \"currency\": \"EUR\"}".to_vec(),
            b"not json".to_vec(),
            o[0].clone(),
            o[1].clone(),
        ]
        .join(&b'\n');
        let c = check(&body, Layout::Ndjson, 10, 65536).expect("checked");
        assert_eq!(
            c.valid.iter().map(|v| v.index).collect::<Vec<_>>(),
            vec![0, 4]
        );
        let r: Vec<_> = c
            .rejected
            .iter()
            .map(|r| (r.index, r.order_id.as_deref(), r.reason.as_str()))
            .collect();
        assert_eq!(
            r,
            vec![
                (1, Some("x-1"), "schema"),
                (2, None, "malformed_json"),
                (3, Some("b-00000000"), "duplicate_in_batch"),
            ]
        );
    }

    #[test]
    fn a_broken_array_or_too_many_orders_refuse_the_batch() {
        assert!(matches!(
            check(b"[{\"a\": 1}", Layout::JsonArray, 10, 65536),
            Err(BadBatch::NotAnArray(_))
        ));
        let body = orders(3).join(&b'\n');
        assert_eq!(
            check(&body, Layout::Ndjson, 2, 65536).err(),
            Some(BadBatch::TooMany { count: 3, limit: 2 })
        );
    }
}
