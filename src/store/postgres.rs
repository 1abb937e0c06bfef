//! PostgreSQL store. A batch is written with one `INSERT … SELECT FROM
//! UNNEST(arrays)`: ten array parameters whatever the batch size, so the
//! statement is prepared once and never hits the bind-parameter limit.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::ConnectOptions;

use super::{written, Record, StoreError, StoredDigests, Written};
use crate::config::{resolve_secret, DatabaseConfig};

const INSERT: &str = "\
INSERT INTO orders (order_id, status, customer_id, amount_cents, currency, charge_id,
                    reasons, payload, source_position, received_at, payload_digest)
SELECT o, s, c, a, cur, ch, r::jsonb, p::jsonb, pos, rcv, d
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[],
            $7::text[], $8::text[], $9::text[], $10::timestamptz[], $11::text[])
     AS t(o, s, c, a, cur, ch, r, p, pos, rcv, d)
ON CONFLICT (order_id) DO NOTHING
RETURNING order_id";

const STORED: &str = "SELECT order_id, payload_digest FROM orders WHERE order_id = ANY($1::text[])";

/// One more delivery of each key (unique), returning each count.
const COUNT_DELIVERIES: &str = "\
INSERT INTO delivery_attempts (message_key, deliveries)
SELECT k, 1 FROM UNNEST($1::text[]) AS t(k)
ON CONFLICT (message_key)
DO UPDATE SET deliveries = delivery_attempts.deliveries + 1, last_at = now()
RETURNING message_key, deliveries";

/// What to look at when a connection failed on TLS: the keys of
/// `database.url` that decide it. Empty for any other failure.
pub fn tls_hint(url: &str, error: &str) -> String {
    let e = error.to_ascii_lowercase();
    if super::is_sqlite_url(url)
        || !["certificate", "tls", "ssl", "handshake", "issuer"]
            .iter()
            .any(|w| e.contains(w))
    {
        return String::new();
    }
    let param = |name: &str| {
        url::Url::parse(url).ok().and_then(|u| {
            u.query_pairs()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        })
    };
    match (param("sslmode"), param("sslrootcert")) {
        (Some(mode), Some(ca)) => format!(
            " (TLS: database.url has sslmode={mode}; does the server's certificate chain \
             to its sslrootcert {ca} and name the host of the URL?)"
        ),
        (Some(mode), None) => format!(
            " (TLS: database.url has sslmode={mode} and no sslrootcert, so only the \
             system's CA store is trusted)"
        ),
        (None, _) => " (TLS: database.url sets no sslmode; the default is prefer)".into(),
    }
}

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// `database.url`, for what an error should point at.
    url: String,
}

impl PgStore {
    pub async fn connect(cfg: &DatabaseConfig) -> anyhow::Result<Self> {
        let mut opts = PgConnectOptions::from_str(&cfg.url)
            .map_err(|e| anyhow::anyhow!("database.url: {e}"))?
            .application_name("conveyor")
            .log_statements(tracing::log::LevelFilter::Trace);
        if let Some(pw) = resolve_secret("database.password", &cfg.password, &cfg.password_file)? {
            opts = opts.password(pw.expose());
        }
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_connections)
            .acquire_timeout(cfg.acquire_timeout)
            .connect_lazy_with(opts);
        Ok(Self {
            pool,
            url: cfg.url.clone(),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> anyhow::Result<()> {
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await
            .map_err(|e| {
                let e = e.to_string();
                anyhow::anyhow!("applying migrations: {e}{}", tls_hint(&self.url, &e))
            })
    }

    /// Commits `batch` (whose ids are unique) as one transaction.
    pub async fn commit<R: Borrow<Record>>(&self, batch: &[R]) -> Result<Vec<Written>, StoreError> {
        let n = batch.len();
        let mut ids = Vec::with_capacity(n);
        let mut statuses = Vec::with_capacity(n);
        let mut customers = Vec::with_capacity(n);
        let mut amounts = Vec::with_capacity(n);
        let mut currencies = Vec::with_capacity(n);
        let mut charges = Vec::with_capacity(n);
        let mut reasons = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        let mut received = Vec::with_capacity(n);
        let mut digests = Vec::with_capacity(n);
        for r in batch {
            let r = r.borrow();
            ids.push(r.order_id.as_str());
            statuses.push(r.status.as_str());
            customers.push(r.customer_id.as_str());
            amounts.push(r.amount_cents);
            currencies.push(r.currency.as_str());
            charges.push(r.charge_id.as_deref());
            reasons.push(serde_json::to_string(&r.reasons).unwrap_or_else(|_| "[]".into()));
            // decode() accepted only valid UTF-8.
            payloads.push(std::str::from_utf8(&r.payload).unwrap_or("null"));
            positions.push(r.source_position.as_str());
            received.push(r.received_at);
            digests.push(r.payload_digest.as_str());
        }
        let mut tx = self.pool.begin().await.map_err(StoreError::classify)?;
        let inserted: Vec<(String,)> = sqlx::query_as(INSERT)
            .bind(&ids)
            .bind(&statuses)
            .bind(&customers)
            .bind(&amounts)
            .bind(&currencies)
            .bind(&charges)
            .bind(&reasons)
            .bind(&payloads)
            .bind(&positions)
            .bind(&received)
            .bind(&digests)
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::classify)?;
        let inserted: HashSet<String> = inserted.into_iter().map(|(id,)| id).collect();
        // The rows that were there already, read in the same transaction:
        // a statement of its own sees what concurrent writers committed
        // meanwhile (the insert's snapshot may not).
        let existing = if inserted.len() < n {
            let others: Vec<&str> = ids
                .iter()
                .copied()
                .filter(|id| !inserted.contains(*id))
                .collect();
            sqlx::query_as::<_, (String, Option<String>)>(STORED)
                .bind(&others)
                .fetch_all(&mut *tx)
                .await
                .map_err(StoreError::classify)?
                .into_iter()
                .collect()
        } else {
            StoredDigests::new()
        };
        tx.commit().await.map_err(StoreError::classify)?;
        Ok(written(batch, &inserted, &existing))
    }

    pub async fn stored(&self, order_ids: &[String]) -> Result<StoredDigests, StoreError> {
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(STORED)
            .bind(order_ids)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::classify)?;
        Ok(rows.into_iter().collect())
    }

    pub async fn count_deliveries(
        &self,
        keys: &[String],
    ) -> Result<HashMap<String, u32>, StoreError> {
        let rows: Vec<(String, i32)> = sqlx::query_as(COUNT_DELIVERIES)
            .bind(keys)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::classify)?;
        Ok(super::delivery_counts(rows))
    }

    pub async fn recorded_deliveries(
        &self,
        keys: &[String],
    ) -> Result<HashMap<String, u32>, StoreError> {
        let rows: Vec<(String, i32)> = sqlx::query_as(
            "SELECT message_key, deliveries FROM delivery_attempts \
             WHERE message_key = ANY($1::text[])",
        )
        .bind(keys)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::classify)?;
        Ok(super::delivery_counts(rows))
    }

    pub async fn forget_deliveries(&self, keys: &[String]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM delivery_attempts WHERE message_key = ANY($1::text[])")
            .bind(keys)
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(StoreError::classify)
    }

    pub async fn prune_deliveries(
        &self,
        older_than: std::time::Duration,
    ) -> Result<u64, StoreError> {
        let secs = older_than.as_secs_f64();
        sqlx::query(
            "DELETE FROM delivery_attempts WHERE last_at < now() - make_interval(secs => $1)",
        )
        .bind(secs)
        .execute(&self.pool)
        .await
        .map(|r| r.rows_affected())
        .map_err(StoreError::classify)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(StoreError::classify)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
