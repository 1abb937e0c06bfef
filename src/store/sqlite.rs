//! SQLite store: the same table and the same idempotent batches as the
//! PostgreSQL one, in a single file. A batch is one `BEGIN IMMEDIATE`
//! transaction holding one or more multi-row `INSERT … ON CONFLICT
//! (order_id) DO NOTHING` statements, cut so that none nears SQLite's
//! bind-parameter limit.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use chrono::SecondsFormat;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, QueryBuilder, Sqlite};

use super::{written, Record, StoreError, StoredDigests, Written};
use crate::config::DatabaseConfig;

/// Columns bound per row by [`SqliteStore::commit`].
const COLUMNS: usize = 11;
/// SQLITE_MAX_VARIABLE_NUMBER of the bundled SQLite (3.32 and later).
const BIND_LIMIT: usize = 32_766;
/// A quarter of the limit: a build with a lower one still has room, and a
/// statement this size is prepared quickly.
const ROWS_PER_STATEMENT: usize = BIND_LIMIT / COLUMNS / 4;
/// Writers queue on SQLite's single write lock; this is how long one waits
/// before its commit fails as transient and is retried with backoff.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const INSERT_HEAD: &str = "\
INSERT INTO orders (order_id, status, customer_id, amount_cents, currency, charge_id,
                    reasons, payload, source_position, received_at, payload_digest) ";

const STORED: &str = "SELECT order_id, payload_digest FROM orders \
                      WHERE order_id IN (SELECT value FROM json_each(?1))";

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn connect(cfg: &DatabaseConfig) -> anyhow::Result<Self> {
        if cfg.password.is_some() || cfg.password_file.is_some() {
            tracing::warn!("database.password is ignored: SQLite has no authentication");
        }
        let opts = SqliteConnectOptions::from_str(&cfg.url)
            .map_err(|e| anyhow::anyhow!("database.url: {e}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL, not NORMAL: with NORMAL a commit can be lost to a power
            // cut after its messages were acked, which breaks "nothing is
            // acked before its outcome is durable". One fsync per batch.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .log_statements(tracing::log::LevelFilter::Trace);
        Ok(Self::with_options(opts, cfg))
    }

    fn with_options(opts: SqliteConnectOptions, cfg: &DatabaseConfig) -> Self {
        let pool = SqlitePoolOptions::new()
            .max_connections(cfg.max_connections)
            .acquire_timeout(cfg.acquire_timeout)
            .connect_lazy_with(opts);
        Self { pool }
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub async fn migrate(&self) -> anyhow::Result<()> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.pool)
            .await
            .map_err(|e| anyhow::anyhow!("applying migrations: {e}"))
    }

    /// Commits `batch` (whose ids are unique) as one transaction.
    pub async fn commit<R: Borrow<Record>>(&self, batch: &[R]) -> Result<Vec<Written>, StoreError> {
        if batch.is_empty() {
            // An INSERT without VALUES is not SQL.
            return Ok(Vec::new());
        }
        // IMMEDIATE takes the write lock up front, under the busy timeout;
        // a deferred transaction could instead fail midway on the upgrade.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::classify_sqlite)?;
        let mut inserted = HashSet::with_capacity(batch.len());
        for chunk in batch.chunks(ROWS_PER_STATEMENT) {
            let mut insert = QueryBuilder::<Sqlite>::new(INSERT_HEAD);
            insert.push_values(chunk, |mut row, r| {
                let r = r.borrow();
                row.push_bind(r.order_id.as_str())
                    .push_bind(r.status.as_str())
                    .push_bind(r.customer_id.as_str())
                    .push_bind(r.amount_cents)
                    .push_bind(r.currency.as_str())
                    .push_bind(r.charge_id.as_deref())
                    .push_bind(serde_json::to_string(&r.reasons).unwrap_or_else(|_| "[]".into()))
                    // decode() accepted only valid UTF-8.
                    .push_bind(std::str::from_utf8(&r.payload).unwrap_or("null"))
                    .push_bind(r.source_position.as_str())
                    .push_bind(r.received_at.to_rfc3339_opts(SecondsFormat::Micros, true))
                    .push_bind(r.payload_digest.as_str());
            });
            insert.push(" ON CONFLICT (order_id) DO NOTHING RETURNING order_id");
            let rows: Vec<(String,)> = insert
                .build_query_as()
                // Full chunks share one statement worth caching; a remainder
                // has a size of its own and would only crowd the cache.
                .persistent(chunk.len() == ROWS_PER_STATEMENT)
                .fetch_all(&mut *tx)
                .await
                .map_err(StoreError::classify_sqlite)?;
            inserted.extend(rows.into_iter().map(|(id,)| id));
        }
        let existing = if inserted.len() < batch.len() {
            let others: Vec<&str> = batch
                .iter()
                .map(|r| r.borrow().order_id.as_str())
                .filter(|id| !inserted.contains(*id))
                .collect();
            let others = serde_json::to_string(&others)
                .map_err(|e| StoreError::Row(sqlx::Error::Encode(Box::new(e))))?;
            sqlx::query_as::<_, (String, Option<String>)>(STORED)
                .bind(others)
                .fetch_all(&mut *tx)
                .await
                .map_err(StoreError::classify_sqlite)?
                .into_iter()
                .collect()
        } else {
            StoredDigests::new()
        };
        tx.commit().await.map_err(StoreError::classify_sqlite)?;
        Ok(written(batch, &inserted, &existing))
    }

    pub async fn stored(&self, order_ids: &[String]) -> Result<StoredDigests, StoreError> {
        // One JSON array parameter, like Postgres' `ANY($1)`: the statement
        // is the same whatever the count and never meets the bind limit.
        let ids = serde_json::to_string(order_ids)
            .map_err(|e| StoreError::Row(sqlx::Error::Encode(Box::new(e))))?;
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(STORED)
            .bind(ids)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::classify_sqlite)?;
        Ok(rows.into_iter().collect())
    }

    pub async fn count_deliveries(
        &self,
        keys: &[String],
    ) -> Result<HashMap<String, u32>, StoreError> {
        let keys = serde_json::to_string(keys)
            .map_err(|e| StoreError::Row(sqlx::Error::Encode(Box::new(e))))?;
        // `WHERE true`: SQLite's parser needs it between a SELECT and ON CONFLICT.
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "INSERT INTO delivery_attempts (message_key, deliveries) \
             SELECT value, 1 FROM json_each(?1) WHERE true \
             ON CONFLICT (message_key) DO UPDATE SET deliveries = deliveries + 1, \
             last_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
             RETURNING message_key, deliveries",
        )
        .bind(keys)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::classify_sqlite)?;
        Ok(super::delivery_counts(rows))
    }

    pub async fn recorded_deliveries(
        &self,
        keys: &[String],
    ) -> Result<HashMap<String, u32>, StoreError> {
        let keys = serde_json::to_string(keys)
            .map_err(|e| StoreError::Row(sqlx::Error::Encode(Box::new(e))))?;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT message_key, deliveries FROM delivery_attempts \
             WHERE message_key IN (SELECT value FROM json_each(?1))",
        )
        .bind(keys)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::classify_sqlite)?;
        Ok(super::delivery_counts(rows))
    }

    pub async fn forget_deliveries(&self, keys: &[String]) -> Result<(), StoreError> {
        let keys = serde_json::to_string(keys)
            .map_err(|e| StoreError::Row(sqlx::Error::Encode(Box::new(e))))?;
        sqlx::query(
            "DELETE FROM delivery_attempts WHERE message_key IN (SELECT value FROM json_each(?1))",
        )
        .bind(keys)
        .execute(&self.pool)
        .await
        .map(drop)
        .map_err(StoreError::classify_sqlite)
    }

    pub async fn prune_deliveries(
        &self,
        older_than: std::time::Duration,
    ) -> Result<u64, StoreError> {
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(older_than).unwrap_or(chrono::Duration::days(7));
        sqlx::query("DELETE FROM delivery_attempts WHERE last_at < ?1")
            .bind(cutoff.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
            .execute(&self.pool)
            .await
            .map(|r| r.rows_affected())
            .map_err(StoreError::classify_sqlite)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(StoreError::classify_sqlite)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    //! Against real SQLite files in a temporary directory.
    use super::*;
    use crate::config::Config;
    use crate::store::Status;

    async fn fresh_store(dir: &tempfile::TempDir) -> SqliteStore {
        let mut cfg = Config::default();
        cfg.database.url = format!("sqlite://{}", dir.path().join("conveyor.db").display());
        let store = SqliteStore::connect(&cfg.database).await.expect("connect");
        store.migrate().await.expect("migrate");
        store
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

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("o-{i}")).collect()
    }

    async fn count(store: &SqliteStore) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(store.pool())
            .await
            .expect("count")
    }

    #[tokio::test]
    async fn a_batch_commits_and_a_redelivered_batch_adds_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = fresh_store(&dir).await;
        let batch: Vec<Record> = (0..1000).map(|i| record(i, "EUR")).collect();
        store.commit(&batch).await.expect("commit");
        assert_eq!(store.stored(&ids(1000)).await.expect("stored").len(), 1000);
        assert_eq!(count(&store).await, 1000);

        store
            .commit(&batch)
            .await
            .expect("a duplicate is not an error");
        assert_eq!(count(&store).await, 1000);
        assert!(store
            .stored(&["o-unknown".into()])
            .await
            .expect("stored")
            .is_empty());
        store.ping().await.expect("ping");
        store.close().await;
    }

    #[tokio::test]
    async fn deliveries_are_counted_per_key_forgotten_and_pruned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = fresh_store(&dir).await;
        let keys = |ks: &[&str]| ks.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        let first = store
            .count_deliveries(&keys(&["a", "b"]))
            .await
            .expect("count");
        assert_eq!((first["a"], first["b"]), (1, 1));
        let second = store.count_deliveries(&keys(&["a"])).await.expect("count");
        assert_eq!(second["a"], 2);
        let recorded = store
            .recorded_deliveries(&keys(&["a", "b", "c"]))
            .await
            .expect("recorded");
        assert_eq!(
            recorded,
            HashMap::from([("a".to_string(), 2), ("b".to_string(), 1)]),
            "a look counts nothing and knows nothing of c"
        );
        store
            .forget_deliveries(&keys(&["a"]))
            .await
            .expect("forget");
        let again = store
            .count_deliveries(&keys(&["a", "b"]))
            .await
            .expect("count");
        assert_eq!(
            (again["a"], again["b"]),
            (1, 2),
            "a forgotten count starts over"
        );
        assert_eq!(
            store
                .prune_deliveries(Duration::from_secs(3600))
                .await
                .expect("prune"),
            0,
            "recent counts are kept"
        );
        sqlx::query("UPDATE delivery_attempts SET last_at = '2000-01-01T00:00:00.000Z'")
            .execute(store.pool())
            .await
            .expect("age the rows");
        assert_eq!(
            store
                .prune_deliveries(Duration::from_secs(3600))
                .await
                .expect("prune"),
            2
        );
        store.close().await;
    }

    #[tokio::test]
    async fn a_batch_larger_than_one_statement_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = fresh_store(&dir).await;
        let n = 20_000;
        assert!(n > ROWS_PER_STATEMENT * 2);
        let batch: Vec<Record> = (0..n).map(|i| record(i, "EUR")).collect();
        store.commit(&batch).await.expect("commit");
        assert_eq!(count(&store).await, n as i64);
        assert_eq!(store.stored(&ids(n)).await.expect("stored").len(), n);
        store.close().await;
    }

    #[tokio::test]
    async fn a_refused_row_fails_the_whole_batch_as_a_row_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = fresh_store(&dir).await;
        // The bad row sits in the last statement of the batch, so the
        // statements before it have run and must be rolled back.
        let n = ROWS_PER_STATEMENT * 2 + 10;
        let batch: Vec<Record> = (0..n)
            .map(|i| record(i, if i == n - 1 { "EURO" } else { "EUR" }))
            .collect();
        let err = store.commit(&batch).await.expect_err("4-char currency");
        assert!(matches!(err, StoreError::Row(_)), "{err:?}");
        assert!(err.to_string().contains("orders_currency_length"), "{err}");
        assert_eq!(count(&store).await, 0);

        let uncharged = Record {
            charge_id: None,
            ..record(0, "EUR")
        };
        let err = store.commit(&[uncharged]).await.expect_err("no charge id");
        assert!(matches!(err, StoreError::Row(_)), "{err:?}");

        let bad_payload = Record {
            payload: bytes::Bytes::from_static(b"{not json"),
            ..record(0, "EUR")
        };
        let err = store.commit(&[bad_payload]).await.expect_err("bad JSON");
        assert!(matches!(err, StoreError::Row(_)), "{err:?}");
        assert_eq!(count(&store).await, 0);
        store.close().await;
    }

    #[tokio::test]
    async fn a_locked_database_is_transient() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = fresh_store(&dir).await;
        let url = format!("sqlite://{}", dir.path().join("conveyor.db").display());
        let impatient = SqliteStore::with_options(
            SqliteConnectOptions::from_str(&url)
                .expect("url")
                .busy_timeout(Duration::from_millis(50)),
            &Config::default().database,
        );
        let holder = store
            .pool()
            .begin_with("BEGIN IMMEDIATE")
            .await
            .expect("take the write lock");
        let err = impatient
            .commit(&[record(0, "EUR")])
            .await
            .expect_err("locked");
        assert!(matches!(err, StoreError::Transient(_)), "{err:?}");
        holder.rollback().await.expect("release");
        impatient.commit(&[record(0, "EUR")]).await.expect("commit");
        impatient.close().await;
        store.close().await;
    }
}
