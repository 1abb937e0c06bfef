use super::handlers::fraction;
use std::time::Duration;

use super::*;

#[test]
fn fraction_is_stable_and_spread() {
    assert_eq!(fraction("o-1", "x"), fraction("o-1", "x"));
    let below = (0..10_000)
        .filter(|i| fraction(&format!("o-{i}"), "reject") < 0.1)
        .count();
    assert!((800..1200).contains(&below), "{below}");
}

#[tokio::test]
async fn same_key_same_charge_and_no_key_new_charge() {
    let sim = start("127.0.0.1:0".parse().unwrap(), Knobs::default())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let body =
        serde_json::json!({"order_id":"o-1","customer_id":"c","amount_cents":5,"currency":"EUR"});
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r: serde_json::Value = http
            .post(format!("{}/charges", sim.url))
            .header("Idempotency-Key", "o-1")
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(r["charge_id"].as_str().unwrap().to_string());
    }
    assert!(ids.iter().all(|i| *i == ids[0]));
    let l = sim.ledger();
    assert_eq!(l.charges.len(), 1);
    assert_eq!(l.charges[0].requests, 3);
    assert_eq!(l.double_charged_orders, 0);
    http.post(format!("{}/charges", sim.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(sim.ledger().double_charged_orders, 1);
    sim.stop().await;
}

#[tokio::test]
async fn keys_are_byte_exact_and_a_reused_key_with_other_parameters_is_refused() {
    let sim = start("127.0.0.1:0".parse().unwrap(), Knobs::default())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let post = |key: &'static [u8], body: serde_json::Value| {
        http.post(format!("{}/charges", sim.url))
            .header(
                "Idempotency-Key",
                reqwest::header::HeaderValue::from_bytes(key).unwrap(),
            )
            .json(&body)
            .send()
    };
    let first =
        serde_json::json!({"order_id":"Ä-1","customer_id":"c","amount_cents":5,"currency":"EUR"});
    // Raw UTF-8 in a header is obs-text: kept as bytes, not dropped.
    for _ in 0..2 {
        let r = post("Ä-1".as_bytes(), first.clone()).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    // Other case, other bytes: another key.
    let r = post(
        "ä-1".as_bytes(),
        serde_json::json!({"order_id":"ä-1","customer_id":"c","amount_cents":5,"currency":"EUR"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let conflict =
        serde_json::json!({"order_id":"Ä-1","customer_id":"c","amount_cents":6,"currency":"EUR"});
    let r = post("Ä-1".as_bytes(), conflict).await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let err: serde_json::Value = r.json().await.unwrap();
    assert_eq!(err["error"]["type"], "idempotency_error");
    let l = sim.ledger();
    assert_eq!(l.charges.len(), 2);
    assert_eq!(l.charges[0].requests, 2);
    assert_eq!(l.idempotency_conflicts, 1);
    assert_eq!(l.double_charged_orders, 0);
    sim.stop().await;
}

#[tokio::test]
async fn the_ledger_keeps_the_last_traceparent_per_order() {
    let sim = start("127.0.0.1:0".parse().unwrap(), Knobs::default())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let body =
        serde_json::json!({"order_id":"o-1","customer_id":"c","amount_cents":5,"currency":"EUR"});
    for (url, tp) in [
        ("validate", None),
        ("validate", Some("00-aa-01")),
        ("charges", Some("00-bb-01")),
        ("charges", None),
    ] {
        let mut req = http
            .post(format!("{}/{url}", sim.url))
            .header("Idempotency-Key", "o-1")
            .json(&body);
        if let Some(tp) = tp {
            req = req.header("traceparent", tp);
        }
        assert!(req.send().await.unwrap().status().is_success());
    }
    let l = sim.ledger();
    assert_eq!(l.charges[0].traceparent.as_deref(), Some("00-bb-01"));
    assert_eq!(l.validate_traceparents["o-1"], "00-aa-01");
    sim.stop().await;
}

fn charge_body(i: usize) -> serde_json::Value {
    serde_json::json!({"order_id": format!("o-{i}"), "customer_id": "c", "amount_cents": 5, "currency": "EUR"})
}

/// Sends `n` charges at once; their statuses and how long each took.
async fn charges_at_once(url: &str, n: usize, from: usize) -> Vec<(StatusCode, Duration)> {
    let http = reqwest::Client::new();
    let calls = (from..from + n).map(|i| {
        let http = http.clone();
        let url = format!("{url}/charges");
        async move {
            let started = std::time::Instant::now();
            let r = http
                .post(url)
                .header("Idempotency-Key", format!("o-{i}"))
                .json(&charge_body(i))
                .send()
                .await
                .unwrap();
            (r.status(), started.elapsed())
        }
    });
    futures::future::join_all(calls).await
}

fn slow_charges(latency_ms: u64) -> Knobs {
    Knobs {
        charge: EndpointKnobs {
            latency_ms,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[tokio::test]
async fn capacity_serves_that_many_at_once_and_queues_the_rest() {
    let limits = Limits {
        charge: EndpointLimits {
            capacity: 4,
            ..Default::default()
        },
        ..Default::default()
    };
    let sim = start_with("127.0.0.1:0".parse().unwrap(), slow_charges(100), limits)
        .await
        .unwrap();
    let answers = charges_at_once(&sim.url, 12, 0).await;
    assert!(
        answers.iter().all(|(s, _)| *s == StatusCode::OK),
        "{answers:?}"
    );
    let mut took: Vec<Duration> = answers.iter().map(|(_, d)| *d).collect();
    took.sort();
    // Three waves of four: the last ones waited for two others' service.
    assert!(took[0] < Duration::from_millis(200), "{took:?}");
    assert!(took[11] >= Duration::from_millis(300), "{took:?}");
    let load = sim.ledger().charge_load;
    assert_eq!(load.peak_in_service, 4);
    assert_eq!(load.served, 12);
    assert!(load.peak_queued >= 4, "{load:?}");
    assert_eq!(sim.ledger().charges.len(), 12);
    sim.stop().await;
}

#[tokio::test]
async fn past_the_queue_limit_arrivals_are_answered_503_at_once() {
    let limits = Limits {
        charge: EndpointLimits {
            capacity: 2,
            queue_limit: 2,
            ..Default::default()
        },
        ..Default::default()
    };
    let sim = start_with("127.0.0.1:0".parse().unwrap(), slow_charges(400), limits)
        .await
        .unwrap();
    let answers = charges_at_once(&sim.url, 8, 0).await;
    let refused: Vec<_> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    assert_eq!(refused.len(), 4, "{answers:?}");
    assert!(
        refused.iter().all(|(_, d)| *d < Duration::from_millis(300)),
        "{refused:?}"
    );
    let l = sim.ledger();
    assert_eq!(l.charge_load.overloaded, 4);
    assert_eq!(l.charge_load.served, 4);
    // A refused charge is not made.
    assert_eq!(l.charges.len(), 4);
    sim.stop().await;
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after_per_endpoint() {
    let limits = Limits {
        charge: EndpointLimits {
            rate_limit: 10,
            ..Default::default()
        },
        ..Default::default()
    };
    let sim = start_with("127.0.0.1:0".parse().unwrap(), Knobs::default(), limits)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let (mut ok, mut throttled) = (0, 0);
    for i in 0..30 {
        let r = http
            .post(format!("{}/charges", sim.url))
            .header("Idempotency-Key", format!("o-{i}"))
            .json(&charge_body(i))
            .send()
            .await
            .unwrap();
        match r.status() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                throttled += 1;
                let after: u64 = r.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(after >= 1, "{after}");
            }
            other => panic!("{other}"),
        }
    }
    // A second's worth of burst, then a token per 100 ms: 10, perhaps 11.
    assert!((10..=11).contains(&ok), "{ok} ok, {throttled} throttled");
    assert_eq!(sim.ledger().charge_load.rate_limited, throttled);
    assert_eq!(sim.ledger().charges.len(), ok as usize);
    // The other endpoint has its own (no) limit.
    for i in 0..30 {
        let r = http
            .post(format!("{}/validate", sim.url))
            .json(&charge_body(i))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    sim.stop().await;
}

#[tokio::test]
async fn put_knobs_merges_what_it_is_given_and_refuses_unknown_knobs() {
    let sim = start("127.0.0.1:0".parse().unwrap(), slow_charges(7))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/knobs", sim.url);
    let put = |patch: serde_json::Value| http.put(&url).json(&patch).send();
    let r = put(serde_json::json!({"charge": {"capacity": 3, "queue_limit": 9}}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    put(serde_json::json!({"reject_rate": 0.25, "validate": {"rate_limit": 50}}))
        .await
        .unwrap();
    let doc: serde_json::Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(doc["charge"]["latency_ms"], 7, "{doc}");
    assert_eq!(doc["charge"]["capacity"], 3, "{doc}");
    assert_eq!(doc["charge"]["queue_limit"], 9, "{doc}");
    assert_eq!(doc["validate"]["rate_limit"], 50, "{doc}");
    assert_eq!(doc["reject_rate"], 0.25, "{doc}");
    let limits = sim.limits();
    assert_eq!(limits.charge.capacity, 3);
    assert_eq!(limits.validate.rate_limit, 50);
    // null resets one knob to its default, and only it.
    put(serde_json::json!({"charge": {"queue_limit": null}}))
        .await
        .unwrap();
    assert_eq!(sim.limits().charge.queue_limit, 0);
    assert_eq!(sim.limits().charge.capacity, 3);
    // An unknown knob or a wrong type changes nothing.
    for bad in [
        serde_json::json!({"charge": {"capacity": 5, "capacityy": 1}}),
        serde_json::json!({"charge": {"capacity": "many"}}),
    ] {
        let r = put(bad).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
    assert_eq!(sim.limits().charge.capacity, 3);
    let doc: serde_json::Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(doc["charge"]["latency_ms"], 7, "{doc}");
    sim.stop().await;
}

#[tokio::test]
async fn capacity_follows_the_knob_at_run_time() {
    let limits = Limits {
        charge: EndpointLimits {
            capacity: 4,
            ..Default::default()
        },
        ..Default::default()
    };
    let sim = start_with("127.0.0.1:0".parse().unwrap(), slow_charges(100), limits)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    // Shrink while four are in service: they finish, then one at a time.
    let busy = tokio::spawn(charges_at_once_owned(sim.url.clone(), 4, 0));
    tokio::time::sleep(Duration::from_millis(30)).await;
    let r = http
        .put(format!("{}/knobs", sim.url))
        .json(&serde_json::json!({"charge": {"capacity": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(busy
        .await
        .unwrap()
        .iter()
        .all(|(s, _)| *s == StatusCode::OK));
    let started = std::time::Instant::now();
    let answers = charges_at_once(&sim.url, 3, 10).await;
    assert!(answers.iter().all(|(s, _)| *s == StatusCode::OK));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{answers:?}"
    );
    // Grow again: three at once.
    sim.set_limits(Limits {
        charge: EndpointLimits {
            capacity: 3,
            ..Default::default()
        },
        ..Default::default()
    });
    let started = std::time::Instant::now();
    let answers = charges_at_once(&sim.url, 3, 20).await;
    assert!(answers.iter().all(|(s, _)| *s == StatusCode::OK));
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "{answers:?}"
    );
    // Unbounded.
    sim.set_limits(Limits::default());
    let started = std::time::Instant::now();
    charges_at_once(&sim.url, 10, 30).await;
    assert!(started.elapsed() < Duration::from_millis(200));
    sim.stop().await;
}

async fn charges_at_once_owned(url: String, n: usize, from: usize) -> Vec<(StatusCode, Duration)> {
    charges_at_once(&url, n, from).await
}
