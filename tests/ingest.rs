//! `conveyor ingest` against the real RabbitMQ and PostgreSQL: a batch is
//! answered 202 only once every accepted order is on the broker; the broker
//! gone, hanging or blocked is a 503 with nothing accepted; limits are 413
//! and 429; a kill -9 mid-request gives no 202 and a resubmission stores
//! each order once; SIGTERM lets the request in flight finish.

mod common;
mod tools_support;

use std::time::{Duration, Instant};

use common::{metric, wait_for, Env, InProcess};
use conveyor::tools::ingest::BatchAnswer;
use conveyor::tools::produce::{Intent, Mix, OrderGen};
use conveyor::tools::sim::Knobs;
use tools_support::{free_port, ingest_config, json_array, ndjson, post, ChildProc, Ingest, Proxy};

const NDJSON: &str = "application/x-ndjson";

fn rabbit_upstream() -> std::net::SocketAddr {
    "127.0.0.1:5672".parse().expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_answered_once_confirmed_and_run_stores_exactly_the_accepted_orders() {
    let env = Env::new("ing_ok", Knobs::default()).await;
    let ingest = Ingest::start(ingest_config(env.config()), true).await;
    let gen = OrderGen::new(
        env.name.clone(),
        Mix {
            poison_pct: 10.0,
            ..Mix::default()
        },
    );
    let n = 1000u64;
    let resp = post(&ingest.url("/orders/batch"), ndjson(&gen, 0..n), NDJSON).await;
    assert_eq!(resp.status(), 202);
    let answer: BatchAnswer = resp.json().await.expect("answer");
    let poison: Vec<usize> = (0..n)
        .filter(|&i| gen.intent(i) == Intent::Poison)
        .map(|i| i as usize)
        .collect();
    assert!(!poison.is_empty());
    assert_eq!(answer.accepted, n as usize - poison.len());
    assert_eq!(
        answer.rejected.iter().map(|r| r.index).collect::<Vec<_>>(),
        poison,
        "every poison order rejected, by its index"
    );
    // Confirmed means on the broker: all of them are in the queue already.
    assert_eq!(env.ready(&env.queue).await as usize, answer.accepted);

    // A JSON array, with an invalid (but well-formed) order in it.
    let good = OrderGen::new(format!("{}-arr", env.name), Mix::default());
    let mut body = json_array(&good, 0..20);
    body.pop();
    body.extend_from_slice(b",{\"order_id\":\"bad-1\",\"amount_cents\":-5}]");
    let resp = post(&ingest.url("/orders/batch"), body, "application/json").await;
    assert_eq!(resp.status(), 202);
    let answer2: BatchAnswer = resp.json().await.expect("answer");
    assert_eq!(answer2.accepted, 20);
    assert_eq!(answer2.rejected.len(), 1);
    assert_eq!(answer2.rejected[0].index, 20);
    assert_eq!(answer2.rejected[0].order_id.as_deref(), Some("bad-1"));

    let total = (answer.accepted + answer2.accepted) as u64;
    let daemon = InProcess::start(env.config()).await;
    let addr = daemon.addr;
    wait_for(
        "every accepted order acked",
        Duration::from_secs(60),
        || async {
            metric(addr, "conveyor_messages_acked_total")
                .await
                .unwrap_or(0.0)
                >= total as f64
        },
    )
    .await;
    let report = daemon.stop().await;
    assert_eq!(
        report.dead_lettered, 0,
        "nothing ingest accepted is poison to run"
    );
    assert_eq!(env.rows().await as u64, total);

    // The stored outcome, by id; an unknown id is 404.
    let id = gen.order_id(1);
    let r = reqwest::get(ingest.url(&format!("/orders/{id}")))
        .await
        .expect("GET");
    assert_eq!(r.status(), 200);
    let row: serde_json::Value = r.json().await.expect("json");
    assert_eq!(row["order_id"], id.as_str());
    assert_eq!(row["status"], "accepted");
    assert!(row["charge_id"].is_string());
    assert!(row["committed_at"].is_string());
    let r = reqwest::get(ingest.url("/orders/no-such-order"))
        .await
        .expect("GET");
    assert_eq!(r.status(), 404);

    let m = reqwest::get(ingest.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        m.contains("conveyor_ingest_orders_total{result=\"accepted\"}"),
        "{m}"
    );
    ingest.stop().await.expect("ingest stopped cleanly");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_down_or_hanging_is_a_503_with_nothing_accepted_and_too_many_requests_a_429() {
    let env = Env::new("ing_down", Knobs::default()).await;
    let mut proxy = Proxy::start(rabbit_upstream()).await;
    let mut config = ingest_config(env.config());
    config.rabbitmq.url = proxy.amqp_url();
    config.ingest.publish_timeout = Duration::from_secs(2);
    config.ingest.max_concurrent_requests = 1;
    let ingest = Ingest::start(config, true).await;
    let gen = OrderGen::new(env.name.clone(), Mix::default());
    let url = ingest.url("/orders/batch");

    let r = post(&url, ndjson(&gen, 0..10), NDJSON).await;
    assert_eq!(r.status(), 202);

    // Hanging: connections open, nothing comes back. The confirms are not
    // back within publish_timeout → 503; meanwhile one more request is 429.
    proxy.freeze(true);
    let slow = tokio::spawn({
        let (url, body) = (url.clone(), ndjson(&gen, 10..20));
        async move {
            let started = Instant::now();
            let r = post(&url, body, NDJSON).await;
            (
                r.status(),
                r.headers().get("retry-after").cloned(),
                r.text().await,
                started.elapsed(),
            )
        }
    });
    wait_for(
        "the first request in flight",
        Duration::from_secs(5),
        || async { metric(ingest.addr, "conveyor_ingest_requests_in_flight").await == Some(1.0) },
    )
    .await;
    let r = post(&url, ndjson(&gen, 20..30), NDJSON).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let (status, retry_after, text, took) = slow.await.expect("join");
    assert_eq!(status, 503, "{text:?}");
    assert!(retry_after.is_some(), "503 carries Retry-After");
    let body: serde_json::Value = serde_json::from_str(&text.expect("text")).expect("json");
    assert_eq!(body["accepted"], 0);
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "{took:?}"
    );
    proxy.freeze(false);

    // Down: every connection cut. Readiness goes, batches are 503 at once.
    proxy.down();
    ingest.wait_ready(false).await;
    let r = post(&url, ndjson(&gen, 30..40), NDJSON).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["accepted"], 0);

    // Back: ingest reconnects by itself.
    proxy.up().await;
    ingest.wait_ready(true).await;
    let r = post(&url, ndjson(&gen, 40..50), NDJSON).await;
    assert_eq!(r.status(), 202);
    let answer: BatchAnswer = r.json().await.expect("answer");
    assert_eq!(answer.accepted, 10);
    ingest.stop().await.expect("stopped");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_and_batches_are_413_and_a_broken_array_400() {
    let env = Env::new("ing_limits", Knobs::default()).await;
    let mut config = ingest_config(env.config());
    config.ingest.max_batch = 100;
    config.ingest.max_body_bytes = 64 * 1024;
    let ingest = Ingest::start(config, true).await;
    let gen = OrderGen::new(env.name.clone(), Mix::default());
    let url = ingest.url("/orders/batch");
    assert_eq!(post(&url, ndjson(&gen, 0..101), NDJSON).await.status(), 413);
    assert_eq!(
        post(&url, ndjson(&gen, 0..1000), NDJSON).await.status(),
        413
    );
    assert_eq!(
        post(&url, b"[{\"order_id\": 1".to_vec(), "application/json")
            .await
            .status(),
        400
    );
    let all_bad = post(&url, b"{\"order_id\": \"x\"}\n".to_vec(), NDJSON).await;
    assert_eq!(all_bad.status(), 422, "a batch with no valid order");
    assert_eq!(env.ready(&env.queue).await, 0, "nothing published");
    ingest.stop().await.expect("stopped");
    env.cleanup().await;
}

fn child_env(env: &Env, port: u16, window: usize) -> Vec<(String, String)> {
    vec![
        ("CONVEYOR__RABBITMQ__QUEUE".into(), env.queue.clone()),
        ("CONVEYOR__DATABASE__URL".into(), env.db_url.clone()),
        (
            "CONVEYOR__INGEST__LISTEN".into(),
            format!("127.0.0.1:{port}"),
        ),
        (
            "CONVEYOR__INGEST__PUBLISH_WINDOW".into(),
            window.to_string(),
        ),
        ("CONVEYOR__INGEST__PUBLISH_TIMEOUT".into(), "60s".into()),
        // 5,000 confirms one at a time take ~25 s here when the machine is
        // idle, twice that beside other builds: the drain must outlast them.
        ("CONVEYOR__SHUTDOWN__DRAIN_TIMEOUT".into(), "90s".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_request_gives_no_202_and_a_resubmission_stores_each_order_once() {
    let env = Env::new("ing_kill", Knobs::default()).await;
    let gen = OrderGen::new(env.name.clone(), Mix::default());
    let n = 5000u64;
    let body = ndjson(&gen, 0..n);

    // One confirm at a time: the 5,000 publishes take long enough to be
    // caught in the middle.
    let port = free_port();
    let child = ChildProc::spawn(&["ingest"], &child_env(&env, port, 1), "ingest-kill");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    tools_support::wait_ready(addr, true).await;
    let url = format!("http://{addr}/orders/batch");
    let request = tokio::spawn(post_result(url.clone(), body.clone()));
    wait_for(
        "part of the batch on the broker",
        Duration::from_secs(20),
        || async { env.ready(&env.queue).await > 0 },
    )
    .await;
    child.signal(nix::sys::signal::Signal::SIGKILL);
    let outcome = request.await.expect("join");
    assert!(
        outcome.is_err() || outcome.as_ref().is_ok_and(|s| *s != 202),
        "{outcome:?}"
    );
    drop(child);
    let published_before = env.ready(&env.queue).await;
    assert!(
        published_before > 0 && (published_before as u64) < n,
        "{published_before}"
    );

    // The client retries the whole batch on a fresh ingest.
    let port = free_port();
    let child = ChildProc::spawn(&["ingest"], &child_env(&env, port, 1000), "ingest-retry");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    tools_support::wait_ready(addr, true).await;
    let r = post(&format!("http://{addr}/orders/batch"), body, NDJSON).await;
    assert_eq!(r.status(), 202);
    let answer: BatchAnswer = r.json().await.expect("answer");
    assert_eq!(answer.accepted as u64, n);
    drop(child);

    let total_messages = env.ready(&env.queue).await as u64;
    assert_eq!(total_messages, published_before as u64 + n);
    let daemon = InProcess::start(env.config()).await;
    let daddr = daemon.addr;
    wait_for("every message acked", Duration::from_secs(120), || async {
        metric(daddr, "conveyor_messages_acked_total")
            .await
            .unwrap_or(0.0)
            >= total_messages as f64
    })
    .await;
    let report = daemon.stop().await;
    assert_eq!(env.rows().await as u64, n, "each order stored exactly once");
    assert_eq!(report.acked, total_messages, "{report:?}");
    env.check_ledger().await;
    env.cleanup().await;
}

async fn post_result(url: String, body: Vec<u8>) -> Result<u16, String> {
    reqwest::Client::new()
        .post(url)
        .header("content-type", NDJSON)
        .body(body)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_with_its_202_then_exits_0() {
    let env = Env::new("ing_term", Knobs::default()).await;
    let gen = OrderGen::new(env.name.clone(), Mix::default());
    let n = 5000u64;
    let port = free_port();
    let mut child = ChildProc::spawn(&["ingest"], &child_env(&env, port, 1), "ingest-term");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    tools_support::wait_ready(addr, true).await;
    let request = tokio::spawn(post_result(
        format!("http://{addr}/orders/batch"),
        ndjson(&gen, 0..n),
    ));
    wait_for(
        "part of the batch on the broker",
        Duration::from_secs(20),
        || async { env.ready(&env.queue).await > 0 },
    )
    .await;
    child.signal(nix::sys::signal::Signal::SIGTERM);
    // Draining: no new connection is taken.
    wait_for("the listener closed", Duration::from_secs(5), || async {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    assert_eq!(request.await.expect("join"), Ok(202));
    assert_eq!(
        child.wait(Duration::from_secs(100)).await,
        Some(0),
        "{}",
        child.log_text()
    );
    assert_eq!(env.ready(&env.queue).await as u64, n);
    env.cleanup().await;
}
