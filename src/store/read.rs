//! Streaming reads of stored orders, for `GET /orders` and `conveyor export`.
//!
//! The query runs on a connection of its own, owned by a task that feeds a
//! small bounded channel: rows travel as the database produces them (the
//! first one arrives before the query ends), memory stays flat whatever the
//! row count, and the socket's own backpressure paces the server. When the
//! reader goes away (an HTTP client disconnects, `export`'s stdout closes),
//! the task cancels the query on the server (PostgreSQL: `pg_cancel_backend`
//! on the backend running it) and closes that connection, so the query does
//! not live on until it has produced every row.

use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::stream::{BoxStream, StreamExt as _};
use serde::Serialize;
use serde_json::value::RawValue;
use sqlx::Connection as _;
use tokio::sync::mpsc;

use super::{Status, Store};

/// Which stored orders to read. Times bound `committed_at`: `since` is
/// inclusive, `until` exclusive.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub status: Option<Status>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "accepted" => Ok(Status::Accepted),
            "rejected" => Ok(Status::Rejected),
            "declined" => Ok(Status::Declined),
            other => Err(format!(
                "unknown status {other:?} (accepted, rejected or declined)"
            )),
        }
    }
}

/// One stored order as read back. `reasons` and `payload` are JSON text;
/// times are RFC 3339 in UTC.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredOrder {
    pub order_id: String,
    pub status: String,
    pub customer_id: String,
    pub amount_cents: i64,
    pub currency: String,
    pub charge_id: Option<String>,
    pub reasons: String,
    pub payload: String,
    pub source_position: String,
    pub received_at: String,
    pub committed_at: String,
}

/// [`StoredOrder`] as a JSON object, its JSON columns embedded as JSON.
#[derive(Serialize)]
struct JsonRow<'a> {
    order_id: &'a str,
    status: &'a str,
    customer_id: &'a str,
    amount_cents: i64,
    currency: &'a str,
    charge_id: Option<&'a str>,
    reasons: Option<&'a RawValue>,
    payload: Option<&'a RawValue>,
    source_position: &'a str,
    received_at: &'a str,
    committed_at: &'a str,
}

impl StoredOrder {
    /// The row as one JSON object (what `format=ndjson` writes per line).
    pub fn to_json(&self) -> Vec<u8> {
        // The database holds valid JSON in both columns; should one ever
        // not parse, it goes out as a JSON string rather than break the line.
        let raw = |s: &str| {
            RawValue::from_string(s.to_string())
                .or_else(|_| serde_json::value::to_raw_value(s))
                .ok()
        };
        let reasons = raw(&self.reasons);
        let payload = raw(&self.payload);
        serde_json::to_vec(&JsonRow {
            order_id: &self.order_id,
            status: &self.status,
            customer_id: &self.customer_id,
            amount_cents: self.amount_cents,
            currency: &self.currency,
            charge_id: self.charge_id.as_deref(),
            reasons: reasons.as_deref(),
            payload: payload.as_deref(),
            source_position: &self.source_position,
            received_at: &self.received_at,
            committed_at: &self.committed_at,
        })
        .unwrap_or_default()
    }
}

/// Rows buffered between the query and its reader.
const ROW_BUFFER: usize = 256;

const PG_COLUMNS: &str =
    "order_id, status, customer_id, amount_cents, currency::text AS currency, \
    charge_id, reasons::text AS reasons, payload::text AS payload, source_position, \
    to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS received_at, \
    to_char(committed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS committed_at";

const SQLITE_COLUMNS: &str = "order_id, status, customer_id, amount_cents, currency, charge_id, \
    reasons, payload, source_position, received_at, committed_at";

/// SQLite keeps times as fixed-width RFC 3339 text (milliseconds, `Z`), so
/// a bound in the same shape compares as time.
fn sqlite_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn where_clause(filter: &Filter, placeholder: impl Fn(usize) -> String) -> String {
    let mut parts = Vec::new();
    let mut n = 0;
    let mut next = || {
        n += 1;
        placeholder(n)
    };
    if filter.status.is_some() {
        parts.push(format!("status = {}", next()));
    }
    if filter.since.is_some() {
        parts.push(format!("committed_at >= {}", next()));
    }
    if filter.until.is_some() {
        parts.push(format!("committed_at < {}", next()));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", parts.join(" AND "))
    }
}

impl Store {
    /// Streams the orders matching `filter`, in storage order, with flat
    /// memory. Dropping the stream cancels the query.
    pub fn stream_orders(
        &self,
        filter: Filter,
    ) -> BoxStream<'static, Result<StoredOrder, sqlx::Error>> {
        let (tx, rx) = mpsc::channel(ROW_BUFFER);
        match self.clone() {
            Store::Postgres(s) => {
                tokio::spawn(pg_stream(s.pool().clone(), filter, tx));
            }
            Store::Sqlite(s) => {
                tokio::spawn(sqlite_stream(s.pool().clone(), filter, tx));
            }
        }
        tokio_stream_of(rx)
    }

    /// The stored outcome of one order, if any.
    pub async fn get_order(&self, order_id: &str) -> Result<Option<StoredOrder>, sqlx::Error> {
        match self {
            Store::Postgres(s) => {
                sqlx::query_as(&format!(
                    "SELECT {PG_COLUMNS} FROM orders WHERE order_id = $1"
                ))
                .bind(order_id)
                .fetch_optional(s.pool())
                .await
            }
            Store::Sqlite(s) => {
                sqlx::query_as(&format!(
                    "SELECT {SQLITE_COLUMNS} FROM orders WHERE order_id = ?1"
                ))
                .bind(order_id)
                .fetch_optional(s.pool())
                .await
            }
        }
    }
}

fn tokio_stream_of<T: Send + 'static>(rx: mpsc::Receiver<T>) -> BoxStream<'static, T> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) }).boxed()
}

type RowSender = mpsc::Sender<Result<StoredOrder, sqlx::Error>>;

/// Forwards rows until the stream ends or the reader leaves. Returns true
/// when the reader left with rows still coming.
async fn forward<S>(mut rows: S, tx: &RowSender) -> bool
where
    S: futures::Stream<Item = Result<StoredOrder, sqlx::Error>> + Unpin,
{
    loop {
        let next = tokio::select! {
            biased;
            () = tx.closed() => return true,
            next = rows.next() => next,
        };
        match next {
            None => return false,
            Some(item) => {
                let failed = item.is_err();
                if tx.send(item).await.is_err() {
                    return true;
                }
                if failed {
                    return false;
                }
            }
        }
    }
}

async fn pg_stream(pool: sqlx::PgPool, filter: Filter, tx: RowSender) {
    let mut conn = match pool.acquire().await {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(e)).await;
            return;
        }
    };
    let pid: i32 = match sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
    {
        Ok(p) => p,
        Err(e) => {
            let _ = tx.send(Err(e)).await;
            return;
        }
    };
    let sql = format!(
        "SELECT {PG_COLUMNS} FROM orders{}",
        where_clause(&filter, |n| format!("${n}"))
    );
    let mut query = sqlx::query_as::<_, StoredOrder>(&sql);
    if let Some(s) = filter.status {
        query = query.bind(s.as_str());
    }
    if let Some(t) = filter.since {
        query = query.bind(t);
    }
    if let Some(t) = filter.until {
        query = query.bind(t);
    }
    let abandoned = {
        let rows = query.fetch(&mut *conn);
        forward(rows, &tx).await
    };
    if abandoned {
        // The backend would otherwise go on producing every remaining row
        // into a socket nobody reads. Cancel it from another connection,
        // then drop this one rather than return it mid-result to the pool.
        if let Err(e) = sqlx::query("SELECT pg_cancel_backend($1)")
            .bind(pid)
            .execute(&pool)
            .await
        {
            tracing::warn!(error = %e, pid, "cannot cancel an abandoned export query");
        }
        let _ = conn.detach().close().await;
    }
}

async fn sqlite_stream(pool: sqlx::SqlitePool, filter: Filter, tx: RowSender) {
    let sql = format!(
        "SELECT {SQLITE_COLUMNS} FROM orders{}",
        where_clause(&filter, |n| format!("?{n}"))
    );
    let mut query = sqlx::query_as::<_, StoredOrder>(&sql);
    if let Some(s) = filter.status {
        query = query.bind(s.as_str());
    }
    if let Some(t) = filter.since {
        query = query.bind(sqlite_time(&t));
    }
    if let Some(t) = filter.until {
        query = query.bind(sqlite_time(&t));
    }
    // Dropping SQLite's row stream stops the statement at its next step.
    let rows = query.fetch(&pool);
    forward(rows, &tx).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_where_clause_numbers_only_the_filters_given() {
        let f = Filter {
            status: Some(Status::Declined),
            since: None,
            until: Some(Utc::now()),
        };
        assert_eq!(
            where_clause(&f, |n| format!("${n}")),
            " WHERE status = $1 AND committed_at < $2"
        );
        assert_eq!(where_clause(&Filter::default(), |n| format!("?{n}")), "");
    }

    #[test]
    fn a_row_is_one_json_object_with_its_json_columns_embedded() {
        let row = StoredOrder {
            order_id: "o-1".into(),
            status: "rejected".into(),
            customer_id: "c".into(),
            amount_cents: 5,
            currency: "EUR".into(),
            charge_id: None,
            reasons: "[\"blocked\"]".into(),
            payload: "{\"a\": 1}".into(),
            source_position: "q#1".into(),
            received_at: "2026-11-22T10:00:00.000Z".into(),
            committed_at: "2026-11-22T10:00:01.000Z".into(),
        };
        let v: serde_json::Value = serde_json::from_slice(&row.to_json()).expect("json");
        assert_eq!(v["reasons"][0], "blocked");
        assert_eq!(v["payload"]["a"], 1);
        assert_eq!(v["charge_id"], serde_json::Value::Null);
        assert_eq!("declined".parse::<Status>(), Ok(Status::Declined));
        assert!("nope".parse::<Status>().is_err());
    }
}
