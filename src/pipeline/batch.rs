//! Batcher and writers. The batcher cuts a batch at `max_size` orders or
//! `max_wait` after its first order, whichever comes first; writers commit
//! batches as single transactions and only then settle their deliveries.
//!
//! A transient database error retries the whole batch with backoff (nothing
//! in it is acked meanwhile, readiness turns false). A row-level error
//! bisects the batch until the offending rows are isolated; the rest
//! commits and those rows are dead-lettered with the database's error.

use std::sync::Arc;

use tokio::sync::{mpsc, Mutex};
use tokio::time::Instant;

use super::{attempts, conflicting_duplicate, Context, Finished};
use crate::downstream::retry::FullJitter;
use crate::outcome::{DeadLetterReason, Outcome, Stage};
use crate::source::DeadLetter;
use crate::store::{Record, StoreError, Written};
use crate::telemetry::{events, Health};

pub(super) async fn batcher(
    ctx: Arc<Context>,
    mut input: mpsc::Receiver<Finished>,
    output: mpsc::Sender<Vec<Finished>>,
) {
    let max_size = ctx.config.batch.max_size;
    let max_wait = ctx.config.batch.max_wait;
    let mut batch: Vec<Finished> = Vec::with_capacity(max_size);
    let mut deadline: Option<Instant> = None;
    loop {
        let next = match deadline {
            Some(at) => tokio::select! {
                biased;
                item = input.recv() => item,
                _ = tokio::time::sleep_until(at) => {
                    deadline = None;
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(max_size));
                    if output.send(full).await.is_err() {
                        return;
                    }
                    continue;
                }
            },
            None => input.recv().await,
        };
        match next {
            Some(item) => {
                if batch.is_empty() {
                    deadline = Some(Instant::now() + max_wait);
                }
                batch.push(item);
                if batch.len() >= max_size {
                    deadline = None;
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(max_size));
                    if output.send(full).await.is_err() {
                        return;
                    }
                }
            }
            None => {
                if !batch.is_empty() {
                    let _ = output.send(batch).await;
                }
                return;
            }
        }
    }
}

pub(super) async fn writers(ctx: Arc<Context>, input: mpsc::Receiver<Vec<Finished>>) {
    let input = Arc::new(Mutex::new(input));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..ctx.config.batch.writers {
        let ctx = ctx.clone();
        let input = input.clone();
        set.spawn(async move {
            loop {
                let next = input.lock().await.recv().await;
                let Some(batch) = next else { break };
                write(&ctx, batch).await;
            }
        });
    }
    while let Some(res) = set.join_next().await {
        if let Err(e) = res {
            tracing::error!(error = %e, "writer task failed");
        }
    }
}

async fn write(ctx: &Context, batch: Vec<Finished>) {
    // The rows move out of the batch (no copy per order); what settles each
    // delivery stays beside them, in the same order.
    let mut records = Vec::with_capacity(batch.len());
    let mut settles = Vec::with_capacity(batch.len());
    // One `commit` span per order, all over the same transaction; they end
    // when it has committed (or the order's rows were refused).
    let size = batch.len();
    let system = ctx.store.system_name();
    let mut commits = Vec::with_capacity(size);
    for f in batch {
        drop(f.waiting);
        commits.push(
            crate::telemetry::traces::order_step!(parent: &f.token.span, "commit",
            db.system.name = system, db.operation.name = "upsert",
            db.operation.batch.size = size),
        );
        records.push(f.record);
        settles.push((f.token, f.raw, f.key, f.position, f.origin));
    }
    let verdicts = commit_bisecting(ctx, &records).await;
    drop(commits);
    let mut tokens = Vec::with_capacity(records.len());
    for ((record, (token, raw, key, position, origin)), verdict) in
        records.into_iter().zip(settles).zip(verdicts)
    {
        match verdict {
            Ok(Written::Inserted) => {
                ctx.metrics.end_to_end.observe(origin.elapsed_secs());
                ctx.metrics.outcome(record.status.into());
                tokens.push(token);
            }
            // Another delivery of the same order got there first (both were
            // in flight at once). Its charge used the same key and the same
            // parameters, so it is the same charge: nothing to undo.
            Ok(Written::Existing { digest })
                if digest.as_deref().is_none_or(|d| d == record.payload_digest) =>
            {
                events::limited(&ctx.metrics, "duplicate", |suppressed| {
                    tracing::info!(order_id = %record.order_id, %position, suppressed,
                        "order stored meanwhile by another delivery; acknowledging");
                });
                ctx.metrics.outcome(Outcome::Duplicate);
                tokens.push(token);
            }
            Ok(Written::Existing { digest }) => {
                events::limited(&ctx.metrics, "conflicting_duplicate", |suppressed| {
                    tracing::warn!(order_id = %record.order_id, %position, suppressed,
                        "order_id stored meanwhile with other contents; dead-lettering");
                });
                ctx.dead_letter(conflicting_duplicate(
                    (token, raw, key, position),
                    record.order_id,
                    (
                        &record.payload_digest,
                        digest.as_deref().unwrap_or_default(),
                    ),
                    Stage::Persist,
                ));
            }
            Err(error) => ctx.dead_letter(DeadLetter {
                token,
                body: raw,
                key,
                position,
                reason: DeadLetterReason::Database,
                detail: error,
                stage: Stage::Persist,
                order_id: Some(record.order_id),
                extra_headers: Vec::new(),
            }),
        }
    }
    if !tokens.is_empty() {
        // Stored: what counted their deliveries goes before the broker is
        // told, so a count on record is always of a delivery unsettled.
        let keys = tokens.iter_mut().filter_map(attempts::settled).collect();
        attempts::forget(ctx, keys).await;
        ctx.done(tokens);
    }
}

/// Commits `records`, isolating rows the database refuses. Returns, per
/// record, what the commit did with it, or the error that refused it.
async fn commit_bisecting(ctx: &Context, records: &[Record]) -> Vec<Result<Written, String>> {
    let mut verdicts = vec![Ok(Written::Inserted); records.len()];
    let mut pending = vec![(0, records.len())];
    while let Some((lo, hi)) = pending.pop() {
        match commit_retrying(ctx, &records[lo..hi]).await {
            Ok(written) => {
                for (slot, w) in verdicts[lo..hi].iter_mut().zip(written) {
                    *slot = Ok(w);
                }
            }
            Err(e) if hi - lo == 1 => verdicts[lo] = Err(e.to_string()),
            Err(_) => {
                let mid = lo + (hi - lo) / 2;
                pending.push((mid, hi));
                pending.push((lo, mid));
            }
        }
    }
    verdicts
}

/// Commits one slice, retrying transient errors with exponential backoff
/// and full jitter for as long as it takes; returns only on success or on a
/// row-level error.
async fn commit_retrying(ctx: &Context, records: &[Record]) -> Result<Vec<Written>, StoreError> {
    let cfg = &ctx.config.batch;
    let mut backoff = FullJitter::doubling(cfg.retry_initial_interval, cfg.retry_max_interval);
    loop {
        let started = std::time::Instant::now();
        match ctx.store.commit(records).await {
            Ok(written) => {
                ctx.metrics
                    .batch_commit_duration
                    .observe(started.elapsed().as_secs_f64());
                ctx.metrics.batch_orders.observe(records.len() as f64);
                Health::set(&ctx.health.database_ok, true);
                return Ok(written);
            }
            Err(e @ StoreError::Row(_)) => {
                Health::set(&ctx.health.database_ok, true);
                return Err(e);
            }
            Err(e @ StoreError::Transient(_)) => {
                Health::set(&ctx.health.database_ok, false);
                ctx.metrics.batch_commit_retries.inc();
                let wait = backoff.next_wait();
                tracing::warn!(error = %e, orders = records.len(), retry_in = ?wait,
                    "batch commit failed; retrying");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against a real PostgreSQL (127.0.0.1:5432, user postgres): a fresh
    //! database per test; the SQLite twin uses a file in a temporary directory.
    use super::*;
    use crate::config::Config;
    use crate::downstream::{PaymentClient, RuleEngineClient};
    use crate::store::{Status, Store};
    use crate::telemetry::Metrics;
    use std::time::Duration;

    async fn fresh_store() -> (Store, String) {
        let name = format!(
            "conveyor_unit_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let admin = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres")
            .await
            .expect("PostgreSQL must run on 127.0.0.1:5432 (scripts/services starts it)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("create database");
        admin.close().await;
        let mut cfg = Config::default();
        cfg.database.url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        let store = Store::connect(&cfg.database).await.expect("connect");
        store.migrate().await.expect("migrate");
        (store, name)
    }

    async fn drop_db(name: &str) {
        if let Ok(admin) =
            sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres").await
        {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&admin)
                .await;
        }
    }

    fn record(i: usize, currency: &str) -> Record {
        Record {
            order_id: format!("o-{i}"),
            status: Status::Accepted,
            customer_id: "c".into(),
            amount_cents: 100,
            currency: currency.into(),
            charge_id: Some(format!("ch-{i}")),
            reasons: vec![],
            payload: bytes::Bytes::from_static(b"{\"k\":1}"),
            payload_digest: format!("{i:064x}"),
            source_position: format!("q#{i}"),
            received_at: chrono::Utc::now(),
        }
    }

    fn context(store: Store) -> Context {
        let config = Config::default();
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let (settle, _) = mpsc::unbounded_channel();
        Context {
            rules: RuleEngineClient::new(
                &config.rule_engine,
                config.pipeline.validate_concurrency,
                metrics.clone(),
            )
            .expect("client"),
            payments: PaymentClient::new(
                &config.payment,
                config.pipeline.charge_concurrency,
                metrics.clone(),
            )
            .expect("client"),
            health: Default::default(),
            store,
            settle,
            metrics,
            config,
        }
    }

    #[tokio::test]
    async fn bisect_isolates_the_rows_the_database_refuses() {
        let (store, name) = fresh_store().await;
        let ctx = context(store.clone());
        // A currency of four characters does not fit char(3): SQLSTATE 22001.
        let records: Vec<Record> = (0..10)
            .map(|i| record(i, if i == 3 || i == 7 { "EURO" } else { "EUR" }))
            .collect();
        let verdicts = commit_bisecting(&ctx, &records).await;
        for (i, v) in verdicts.iter().enumerate() {
            assert_eq!(v.is_err(), i == 3 || i == 7, "record {i}: {v:?}");
        }
        assert!(verdicts[3]
            .as_ref()
            .err()
            .is_some_and(|e| e.contains("22001") || e.contains("too long")));
        let ids: Vec<String> = (0..10).map(|i| format!("o-{i}")).collect();
        assert_eq!(store.stored(&ids).await.expect("query").len(), 8);
        // Committing the same rows again is a no-op, not an error.
        let again: Vec<Record> = (0..10)
            .filter(|i| *i != 3 && *i != 7)
            .map(|i| record(i, "EUR"))
            .collect();
        assert!(commit_bisecting(&ctx, &again)
            .await
            .iter()
            .zip(&again)
            .all(|(v, r)| *v
                == Ok(Written::Existing {
                    digest: Some(r.payload_digest.clone())
                })));
        assert_eq!(store.stored(&ids).await.expect("query").len(), 8);
        store.close().await;
        drop_db(&name).await;
    }

    #[tokio::test]
    async fn bisect_isolates_the_rows_sqlite_refuses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config::default();
        cfg.database.url = format!("sqlite://{}", dir.path().join("conveyor.db").display());
        let store = Store::connect(&cfg.database).await.expect("connect");
        store.migrate().await.expect("migrate");
        let ctx = context(store.clone());
        // A currency of four characters fails CHECK (length(currency) = 3).
        let records: Vec<Record> = (0..10)
            .map(|i| record(i, if i == 3 || i == 7 { "EURO" } else { "EUR" }))
            .collect();
        let verdicts = commit_bisecting(&ctx, &records).await;
        for (i, v) in verdicts.iter().enumerate() {
            assert_eq!(v.is_err(), i == 3 || i == 7, "record {i}: {v:?}");
        }
        assert!(verdicts[3]
            .as_ref()
            .err()
            .is_some_and(|e| e.contains("CHECK constraint failed")));
        let ids: Vec<String> = (0..10).map(|i| format!("o-{i}")).collect();
        assert_eq!(store.stored(&ids).await.expect("query").len(), 8);
        // Committing the same rows again is a no-op, not an error.
        let again: Vec<Record> = (0..10)
            .filter(|i| *i != 3 && *i != 7)
            .map(|i| record(i, "EUR"))
            .collect();
        assert!(commit_bisecting(&ctx, &again)
            .await
            .iter()
            .zip(&again)
            .all(|(v, r)| *v
                == Ok(Written::Existing {
                    digest: Some(r.payload_digest.clone())
                })));
        assert_eq!(store.stored(&ids).await.expect("query").len(), 8);
        store.close().await;
    }

    #[tokio::test]
    async fn batcher_cuts_by_size_and_by_time() {
        tokio::time::pause();
        // A lazy pool that is never used: the batcher does not touch the store.
        let store = Store::connect(&Config::default().database)
            .await
            .expect("lazy pool");
        let mut ctx = context(store);
        ctx.config.batch.max_size = 3;
        ctx.config.batch.max_wait = Duration::from_millis(50);
        let ctx = Arc::new(ctx);
        let (in_tx, in_rx) = mpsc::channel(16);
        let (out_tx, mut out_rx) = mpsc::channel(16);
        let task = tokio::spawn(batcher(ctx.clone(), in_rx, out_tx));
        let permits = Arc::new(tokio::sync::Semaphore::new(100));
        let finished = |i: usize| Finished {
            record: record(i, "EUR"),
            token: crate::source::AckToken {
                kind: crate::source::TokenKind::Rabbit {
                    generation: 1,
                    delivery_tag: i as u64,
                },
                _permit: permits.clone().try_acquire_owned().expect("permit"),
                _held: crate::source::Held::new(&ctx.metrics),
                span: tracing::Span::none(),
                screened: Default::default(),
            },
            raw: bytes::Bytes::new(),
            key: None,
            position: crate::source::Position::Rabbit {
                queue: "q".into(),
                delivery_tag: i as u64,
            },
            origin: super::super::Origin::Received(std::time::Instant::now()),
            waiting: tracing::Span::none(),
        };
        for i in 0..4 {
            in_tx.send(finished(i)).await.expect("send");
        }
        // Three make a full batch at once; the fourth waits for max_wait.
        assert_eq!(out_rx.recv().await.expect("batch").len(), 3);
        let started = Instant::now();
        assert_eq!(out_rx.recv().await.expect("batch").len(), 1);
        assert!(started.elapsed() >= Duration::from_millis(50));
        in_tx.send(finished(5)).await.expect("send");
        drop(in_tx);
        // Closing the input flushes what is left without waiting.
        assert_eq!(out_rx.recv().await.expect("final batch").len(), 1);
        assert!(out_rx.recv().await.is_none());
        task.await.expect("batcher");
    }

    /// What `Store::commit` says per record, on both databases: new rows,
    /// rows stored before (with their digest), and an id repeated within one
    /// batch (written once, from its first occurrence).
    async fn commit_reports_each_record(store: Store) {
        let first = record(1, "EUR");
        let mut other_contents = record(1, "EUR");
        other_contents.payload_digest = "f".repeat(64);
        let written = store
            .commit(&[first.clone(), record(2, "EUR"), other_contents.clone()])
            .await
            .expect("commit");
        assert_eq!(
            written,
            vec![
                Written::Inserted,
                Written::Inserted,
                Written::Existing {
                    digest: Some(first.payload_digest.clone())
                },
            ]
        );
        let written = store
            .commit(&[other_contents, record(3, "EUR")])
            .await
            .expect("commit");
        assert_eq!(
            written,
            vec![
                Written::Existing {
                    digest: Some(first.payload_digest.clone())
                },
                Written::Inserted,
            ]
        );
        let stored = store
            .stored(&["o-1".into(), "o-3".into(), "o-9".into()])
            .await
            .expect("stored");
        assert_eq!(stored.len(), 2);
        assert_eq!(
            stored["o-1"].as_deref(),
            Some(first.payload_digest.as_str())
        );
    }

    #[tokio::test]
    async fn postgres_commit_reports_each_record() {
        let (store, name) = fresh_store().await;
        commit_reports_each_record(store.clone()).await;
        store.close().await;
        drop_db(&name).await;
    }

    #[tokio::test]
    async fn sqlite_commit_reports_each_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config::default();
        cfg.database.url = format!("sqlite://{}", dir.path().join("conveyor.db").display());
        let store = Store::connect(&cfg.database).await.expect("connect");
        store.migrate().await.expect("migrate");
        commit_reports_each_record(store.clone()).await;
        store.close().await;
    }
}
