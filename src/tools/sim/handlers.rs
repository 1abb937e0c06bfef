//! The simulator's two endpoints: the rule engine's `POST /validate` and
//! the payment provider's `POST /charges`.

use std::hash::{Hash, Hasher};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::load::{EndpointLoad, Refusal};
use super::timer::precise_sleep;
use super::{EndpointKnobs, LedgerEntry, Sim};

/// A number in [0, 1) fixed by the order id and a salt.
pub(super) fn fraction(order_id: &str, salt: &str) -> f64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    salt.hash(&mut h);
    order_id.hash(&mut h);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

enum Fault {
    None,
    Error,
    Throttle,
    Hang,
}

/// Passes the endpoint's limits, waits the configured latency in service,
/// then draws the fault for this request.
async fn behave(k: &EndpointKnobs, load: &EndpointLoad) -> Result<Fault, Response> {
    let _in_service = load.admit().await.map_err(refused)?;
    let (jitter, roll): (u64, f64) = {
        let jitter = if k.jitter_ms > 0 {
            rand::random::<u64>() % (k.jitter_ms + 1)
        } else {
            0
        };
        (jitter, rand::random::<f64>())
    };
    let delay = k.latency_ms + jitter;
    if delay > 0 {
        precise_sleep(Duration::from_millis(delay)).await;
    }
    Ok(if roll < k.error_rate {
        Fault::Error
    } else if roll < k.error_rate + k.throttle_rate {
        Fault::Throttle
    } else if roll < k.error_rate + k.throttle_rate + k.timeout_rate {
        Fault::Hang
    } else {
        Fault::None
    })
}

fn refused(r: Refusal) -> Response {
    match r {
        Refusal::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "over capacity\n").into_response(),
        Refusal::RateLimited(wait) => {
            // Whole seconds, as `Retry-After` counts them, and never 0: a
            // client told "now" would come straight back.
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", secs.to_string())],
                "rate limit exceeded\n",
            )
                .into_response()
        }
    }
}

fn unavailable() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "simulated outage\n").into_response()
}

fn throttled() -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [("retry-after", "1")],
        "slow down\n",
    )
        .into_response()
}

async fn hang() -> Response {
    // Never answers; the client's timeout ends the exchange.
    std::future::pending::<()>().await;
    unavailable()
}

#[derive(Deserialize)]
struct ValidateBody {
    order_id: String,
    #[serde(default)]
    customer_id: String,
}

fn traceparent(headers: &HeaderMap) -> Option<String> {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

pub(super) async fn validate(
    State(sim): State<Sim>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let knobs = sim.knobs();
    if let Ok(mut b) = sim.books.lock() {
        b.validate_requests_total += 1;
    }
    let fault = match behave(&knobs.validate, &sim.validate_load).await {
        Ok(f) => f,
        Err(refusal) => return refusal,
    };
    let order: ValidateBody = match serde_json::from_slice(&body) {
        Ok(o) => o,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad order: {e}\n")).into_response(),
    };
    if let Some(tp) = traceparent(&headers) {
        if let Ok(mut b) = sim.books.lock() {
            b.validate_traceparents.insert(order.order_id.clone(), tp);
        }
    }
    match fault {
        Fault::Error => return unavailable(),
        Fault::Throttle => return throttled(),
        Fault::Hang => return hang().await,
        Fault::None => {}
    }
    let (valid, reasons) = if order.customer_id.starts_with("reject") {
        (false, vec!["customer is blocked".to_string()])
    } else if fraction(&order.order_id, "reject") < knobs.reject_rate {
        (false, vec!["risk score too high".to_string()])
    } else {
        (true, vec![])
    };
    Json(serde_json::json!({ "valid": valid, "reasons": reasons })).into_response()
}

#[derive(Deserialize)]
pub(super) struct ChargeBody {
    pub(super) order_id: String,
    pub(super) customer_id: String,
    pub(super) amount_cents: i64,
    pub(super) currency: String,
}

pub(super) async fn charge(
    State(sim): State<Sim>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let knobs = sim.knobs();
    let fault = match behave(&knobs.charge, &sim.charge_load).await {
        Ok(f) => f,
        Err(refusal) => return refusal,
    };
    let req: ChargeBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad charge: {e}\n")).into_response(),
    };
    if req.amount_cents <= 0 {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            "amount must be positive\n",
        )
            .into_response();
    }
    match fault {
        Fault::Error => return unavailable(),
        Fault::Throttle => return throttled(),
        Fault::Hang | Fault::None => {}
    }
    // Byte for byte: a provider that decoded, trimmed or folded keys would
    // merge two orders' charges.
    let key = headers
        .get("idempotency-key")
        .map(|v| v.as_bytes().to_vec());
    let tp = traceparent(&headers);
    let entry = {
        let Ok(mut books) = sim.books.lock() else {
            return unavailable();
        };
        books.requests_total += 1;
        let existing = key.as_ref().and_then(|k| books.by_key.get(k).copied());
        match existing {
            Some(i) if !books.entries[i].same_request(&req) => {
                books.key_conflicts += 1;
                let first = &books.entries[i];
                let message = format!(
                    "idempotency key already used for order {:?} ({} {}); this request is for \
                     order {:?} ({} {})",
                    first.order_id,
                    first.amount_cents,
                    first.currency,
                    req.order_id,
                    req.amount_cents,
                    req.currency
                );
                return (
                    StatusCode::CONFLICT,
                    Json(serde_json::json!({
                        "error": { "type": "idempotency_error", "message": message }
                    })),
                )
                    .into_response();
            }
            Some(i) => {
                books.entries[i].requests += 1;
                if tp.is_some() {
                    books.entries[i].traceparent = tp;
                }
                books.entries[i].clone()
            }
            None => {
                let declined = req.customer_id.starts_with("decline")
                    || fraction(&req.order_id, "decline") < knobs.decline_rate;
                let entry = LedgerEntry {
                    idempotency_key: key
                        .as_ref()
                        .map(|k| String::from_utf8_lossy(k).into_owned()),
                    order_id: req.order_id,
                    customer_id: req.customer_id,
                    charge_id: format!("ch_{}", uuid::Uuid::new_v4().simple()),
                    status: if declined { "declined" } else { "succeeded" }.into(),
                    amount_cents: req.amount_cents,
                    currency: req.currency,
                    requests: 1,
                    traceparent: tp,
                };
                let i = books.entries.len();
                books.entries.push(entry.clone());
                if let Some(k) = key {
                    books.by_key.insert(k, i);
                }
                entry
            }
        }
    };
    // A customer id starting with `hang` is charged and never answered: a
    // payment call the daemon can only give up on, or be killed during.
    if matches!(fault, Fault::Hang) || entry.customer_id.starts_with("hang") {
        return hang().await;
    }
    let reason = (entry.status == "declined").then_some("insufficient funds");
    Json(serde_json::json!({
        "charge_id": entry.charge_id,
        "status": entry.status,
        "reason": reason,
    }))
    .into_response()
}
