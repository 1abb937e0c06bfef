//! The baselines conveyor is measured against, written the short way with
//! the same crates and none of conveyor's machinery: no stages, breakers,
//! retries, dead letters or metrics.
//!
//! * [`pipeline`]: consume (prefetch P) → the two HTTP calls → batched
//!   insert → multi-ack after commit; a task per message.
//! * [`consume_ack`]: the broker alone, consume and multi-ack.
//! * [`insert`]: the database alone, batched inserts.
//! * [`naive`]: one order at a time: call, call, insert and commit, ack.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties};
use serde::Deserialize;
use sqlx::PgPool;
use tokio::sync::{mpsc, Semaphore};

const BATCH_MAX: usize = 256;
const BATCH_WAIT: Duration = Duration::from_millis(20);
const WRITERS: usize = 2;

const INSERT: &str = "\
INSERT INTO orders (order_id, status, customer_id, amount_cents, currency, charge_id,
                    reasons, payload, source_position, received_at)
SELECT o, s, c, a, cur, ch, '[]'::jsonb, p::jsonb, pos, rcv
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[],
            $7::text[], $8::text[], $9::timestamptz[])
     AS t(o, s, c, a, cur, ch, p, pos, rcv)
ON CONFLICT (order_id) DO NOTHING";

#[derive(Deserialize)]
struct Order {
    order_id: String,
    customer_id: String,
    amount_cents: i64,
    currency: String,
}

#[derive(Deserialize)]
struct Verdict {
    valid: bool,
}

#[derive(Deserialize)]
struct Charge {
    charge_id: String,
    status: String,
}

/// One row to insert.
pub struct Row {
    order_id: String,
    status: &'static str,
    customer_id: String,
    amount_cents: i64,
    currency: String,
    charge_id: Option<String>,
    payload: String,
    position: String,
    received_at: DateTime<Utc>,
}

async fn channel(amqp: &str, prefetch: u16) -> anyhow::Result<(Connection, Channel)> {
    let conn = Connection::connect(amqp, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to RabbitMQ at {amqp}"))?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    Ok((conn, ch))
}

async fn consumer(ch: &Channel, queue: &str, tag: &str) -> anyhow::Result<lapin::Consumer> {
    Ok(ch
        .basic_consume(
            ShortString::from(queue),
            ShortString::from(tag),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?)
}

/// Acks with `multiple` once every tag up to it is done: the bare minimum,
/// where conveyor's `source::rabbitmq::acks::AmqpAckRuns` also acks past gaps one by one.
struct Acker {
    done: BTreeSet<u64>,
    next: u64,
}

impl Acker {
    fn new() -> Self {
        Self {
            done: BTreeSet::new(),
            next: 1,
        }
    }

    /// Marks tags done; returns the tag to ack with `multiple`, if any.
    fn done(&mut self, tags: impl IntoIterator<Item = u64>) -> Option<u64> {
        self.done.extend(tags);
        let mut last = None;
        while self.done.remove(&self.next) {
            last = Some(self.next);
            self.next += 1;
        }
        last
    }
}

async fn call_validate(http: &reqwest::Client, url: &str, raw: &[u8]) -> anyhow::Result<bool> {
    let v: Verdict = http
        .post(format!("{url}/validate"))
        .header("content-type", "application/json")
        .body(raw.to_vec())
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(v.valid)
}

async fn call_charge(http: &reqwest::Client, url: &str, o: &Order) -> anyhow::Result<Charge> {
    Ok(http
        .post(format!("{url}/charges"))
        .header("Idempotency-Key", o.order_id.as_str())
        .json(&serde_json::json!({
            "order_id": o.order_id,
            "customer_id": o.customer_id,
            "amount_cents": o.amount_cents,
            "currency": o.currency,
        }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// Decodes, validates and charges one message; the row to store.
async fn process(
    http: &reqwest::Client,
    url: &str,
    raw: &[u8],
    position: String,
) -> anyhow::Result<Row> {
    let received_at = Utc::now();
    let o: Order = serde_json::from_slice(raw)?;
    let valid = call_validate(http, url, raw).await?;
    let (status, charge_id) = if valid {
        let c = call_charge(http, url, &o).await?;
        let status = if c.status == "succeeded" {
            "accepted"
        } else {
            "declined"
        };
        (status, Some(c.charge_id))
    } else {
        ("rejected", None)
    };
    Ok(Row {
        order_id: o.order_id,
        status,
        customer_id: o.customer_id,
        amount_cents: o.amount_cents,
        currency: o.currency,
        charge_id,
        payload: String::from_utf8_lossy(raw).into_owned(),
        position,
        received_at,
    })
}

/// One transaction, one `INSERT … SELECT FROM UNNEST`.
pub async fn insert_batch(pool: &PgPool, rows: &[Row]) -> anyhow::Result<()> {
    let ids: Vec<&str> = rows.iter().map(|r| r.order_id.as_str()).collect();
    let statuses: Vec<&str> = rows.iter().map(|r| r.status).collect();
    let customers: Vec<&str> = rows.iter().map(|r| r.customer_id.as_str()).collect();
    let amounts: Vec<i64> = rows.iter().map(|r| r.amount_cents).collect();
    let currencies: Vec<&str> = rows.iter().map(|r| r.currency.as_str()).collect();
    let charges: Vec<Option<&str>> = rows.iter().map(|r| r.charge_id.as_deref()).collect();
    let payloads: Vec<&str> = rows.iter().map(|r| r.payload.as_str()).collect();
    let positions: Vec<&str> = rows.iter().map(|r| r.position.as_str()).collect();
    let received: Vec<DateTime<Utc>> = rows.iter().map(|r| r.received_at).collect();
    let mut tx = pool.begin().await?;
    sqlx::query(INSERT)
        .bind(&ids)
        .bind(&statuses)
        .bind(&customers)
        .bind(&amounts)
        .bind(&currencies)
        .bind(&charges)
        .bind(&payloads)
        .bind(&positions)
        .bind(&received)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Waits for up to `BATCH_MAX` items, or `BATCH_WAIT` after the first.
async fn next_batch<T>(rx: &mut mpsc::Receiver<T>) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + BATCH_WAIT;
    while batch.len() < BATCH_MAX {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(item)) => batch.push(item),
            _ => break,
        }
    }
    Some(batch)
}

/// The floor pipeline over `n` messages already in `queue`.
pub async fn pipeline(
    amqp: &str,
    queue: &str,
    prefetch: u16,
    sim_url: &str,
    pool: PgPool,
    n: u64,
) -> anyhow::Result<()> {
    let (conn, ch) = channel(amqp, prefetch).await?;
    let mut deliveries = consumer(&ch, queue, "floor").await?;
    let http = reqwest::Client::new();
    let url: Arc<str> = Arc::from(sim_url);
    let (tx, mut rx) = mpsc::channel::<(u64, Row)>(usize::from(prefetch));
    let acker = Arc::new(Mutex::new(Acker::new()));
    let writers = Arc::new(Semaphore::new(WRITERS));
    let batcher = {
        let ch = ch.clone();
        tokio::spawn(async move {
            let mut commits = tokio::task::JoinSet::new();
            let mut stored = 0u64;
            while let Some(batch) = next_batch(&mut rx).await {
                stored += batch.len() as u64;
                let permit = writers.clone().acquire_owned().await?;
                let (pool, ch, acker) = (pool.clone(), ch.clone(), acker.clone());
                commits.spawn(async move {
                    let _permit = permit;
                    let (tags, rows): (Vec<u64>, Vec<Row>) = batch.into_iter().unzip();
                    insert_batch(&pool, &rows).await?;
                    let ack = acker
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .done(tags);
                    if let Some(tag) = ack {
                        ch.basic_ack(tag, BasicAckOptions { multiple: true })
                            .await?;
                    }
                    anyhow::Ok(())
                });
                while let Some(done) = commits.try_join_next() {
                    done??;
                }
                if stored >= n {
                    break;
                }
            }
            while let Some(done) = commits.join_next().await {
                done??;
            }
            anyhow::Ok(())
        })
    };
    let mut received = 0u64;
    while received < n {
        let d = deliveries
            .next()
            .await
            .context("the consumer ended early")??;
        received += 1;
        let (http, url, tx) = (http.clone(), url.clone(), tx.clone());
        tokio::spawn(async move {
            let position = d.delivery_tag.to_string();
            match process(&http, &url, &d.data, position).await {
                Ok(row) => {
                    let _ = tx.send((d.delivery_tag, row)).await;
                }
                Err(e) => eprintln!("floor: message {} failed: {e:#}", d.delivery_tag),
            }
        });
    }
    drop(tx);
    batcher.await??;
    conn.close(200, "done".into()).await.ok();
    Ok(())
}

/// The broker alone: consume `n` messages, ack every `BATCH_MAX` with
/// `multiple`. Returns seconds from the first delivery to the last ack.
pub async fn consume_ack(amqp: &str, queue: &str, prefetch: u16, n: u64) -> anyhow::Result<f64> {
    let (conn, ch) = channel(amqp, prefetch).await?;
    let mut deliveries = consumer(&ch, queue, "floor-consume").await?;
    let mut started = None;
    for i in 1..=n {
        let d = deliveries
            .next()
            .await
            .context("the consumer ended early")??;
        started.get_or_insert_with(Instant::now);
        if i % BATCH_MAX as u64 == 0 || i == n {
            ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
        }
    }
    let secs = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    conn.close(200, "done".into()).await.ok();
    Ok(secs)
}

/// Rows like the pipeline's, for [`insert`].
pub fn rows(run: &str, n: u64) -> Vec<Row> {
    (0..n)
        .map(|i| Row {
            order_id: format!("{run}-{i:08}"),
            status: "accepted",
            customer_id: format!("c-{}", i % 1000),
            amount_cents: 100 + (i % 997) as i64,
            currency: "EUR".into(),
            charge_id: Some(format!("ch_{i}")),
            payload: format!(
                r#"{{"order_id":"{run}-{i:08}","customer_id":"c-{}","currency":"EUR","amount_cents":{}}}"#,
                i % 1000,
                100 + (i % 997)
            ),
            position: i.to_string(),
            received_at: Utc::now(),
        })
        .collect()
}

/// The database alone: `rows` in batches of `BATCH_MAX`, `WRITERS` at a
/// time. Returns seconds.
pub async fn insert(pool: &PgPool, rows: Vec<Row>) -> anyhow::Result<f64> {
    let started = Instant::now();
    let rows = Arc::new(rows);
    let chunks = rows.len().div_ceil(BATCH_MAX);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let (pool, rows, next) = (pool.clone(), rows.clone(), next.clone());
        writers.spawn(async move {
            loop {
                let c = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if c >= chunks {
                    return anyhow::Ok(());
                }
                let end = ((c + 1) * BATCH_MAX).min(rows.len());
                insert_batch(&pool, &rows[c * BATCH_MAX..end]).await?;
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// One order at a time: call, call, insert and commit, ack.
pub async fn naive(
    amqp: &str,
    queue: &str,
    sim_url: &str,
    pool: &PgPool,
    n: u64,
) -> anyhow::Result<()> {
    let (conn, ch) = channel(amqp, 1).await?;
    let mut deliveries = consumer(&ch, queue, "naive").await?;
    let http = reqwest::Client::new();
    for _ in 0..n {
        let d = deliveries
            .next()
            .await
            .context("the consumer ended early")??;
        let row = process(&http, sim_url, &d.data, d.delivery_tag.to_string()).await?;
        insert_batch(pool, std::slice::from_ref(&row)).await?;
        ch.basic_ack(d.delivery_tag, BasicAckOptions::default())
            .await?;
    }
    conn.close(200, "done".into()).await.ok();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Acker;

    #[test]
    fn acker_acks_only_contiguous_runs() {
        let mut a = Acker::new();
        assert_eq!(a.done([2, 3]), None);
        assert_eq!(a.done([1]), Some(3));
        assert_eq!(a.done([5]), None);
        assert_eq!(a.done([4, 6]), Some(6));
    }
}
