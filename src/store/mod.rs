//! Durable outcomes: batched, idempotent commits, in PostgreSQL
//! (`postgres://`, `postgresql://`) or SQLite (`sqlite:`), chosen by the
//! scheme of `database.url`. A batch is one transaction of multi-row
//! `INSERT … ON CONFLICT (order_id) DO NOTHING`, so a redelivered order never
//! produces a second row.
//!
//! Errors are classified for the writer: a *row* error (the data of some row
//! is unacceptable) is bisected out of the batch; anything else is
//! *transient* and the whole batch is retried.

pub mod postgres;
pub mod sqlite;

use std::collections::HashSet;

use bytes::Bytes;
use chrono::{DateTime, Utc};

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Accepted,
    Rejected,
    Declined,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::Rejected => "rejected",
            Status::Declined => "declined",
        }
    }
}

/// One row to store.
#[derive(Debug, Clone)]
pub struct Record {
    pub order_id: String,
    pub status: Status,
    pub customer_id: String,
    pub amount_cents: i64,
    pub currency: String,
    pub charge_id: Option<String>,
    pub reasons: Vec<String>,
    /// The message body as received (valid UTF-8 JSON, checked by decode).
    pub payload: Bytes,
    pub source_position: String,
    pub received_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data of at least one row is unacceptable to the database.
    #[error("row rejected by the database: {0}")]
    Row(#[source] sqlx::Error),
    /// Connection lost, timeout, server shutting down…: retry the batch.
    #[error("database unavailable: {0}")]
    Transient(#[source] sqlx::Error),
}

impl StoreError {
    fn classify(e: sqlx::Error) -> Self {
        let row_level = match &e {
            // SQLSTATE class 22 (data exception) and 23 (integrity
            // constraint violation) are caused by the data; the rest are not.
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
            sqlx::Error::Encode(_) | sqlx::Error::ColumnDecode { .. } => true,
            _ => false,
        };
        if row_level {
            StoreError::Row(e)
        } else {
            StoreError::Transient(e)
        }
    }

    /// SQLite's counterpart of [`StoreError::classify`]. Its `code()` is the
    /// extended result code, a number, so the SQLSTATE prefixes above do not
    /// apply. BUSY, LOCKED, IOERR, FULL and the rest are transient.
    fn classify_sqlite(e: sqlx::Error) -> Self {
        use sqlx::error::ErrorKind;
        // Primary result codes (the low byte of an extended code) caused by
        // the data: TOOBIG, CONSTRAINT, MISMATCH.
        const SQLITE_TOOBIG: i32 = 18;
        const SQLITE_CONSTRAINT: i32 = 19;
        const SQLITE_MISMATCH: i32 = 20;
        let row_level = match &e {
            sqlx::Error::Database(db) => match db.kind() {
                ErrorKind::UniqueViolation
                | ErrorKind::ForeignKeyViolation
                | ErrorKind::NotNullViolation
                | ErrorKind::CheckViolation => true,
                // kind() names four constraint codes only; DATATYPE (a STRICT
                // column given the wrong type), TRIGGER and the others come
                // through as Other and are recognised by their primary code.
                _ => db
                    .code()
                    .and_then(|c| c.parse::<i32>().ok())
                    .is_some_and(|c| {
                        matches!(
                            c & 0xff,
                            SQLITE_TOOBIG | SQLITE_CONSTRAINT | SQLITE_MISMATCH
                        )
                    }),
            },
            sqlx::Error::Encode(_) | sqlx::Error::ColumnDecode { .. } => true,
            _ => false,
        };
        if row_level {
            StoreError::Row(e)
        } else {
            StoreError::Transient(e)
        }
    }
}

/// The database behind the writers, chosen by the URL scheme.
#[derive(Clone)]
pub enum Store {
    Postgres(PgStore),
    Sqlite(SqliteStore),
}

impl Store {
    pub async fn connect(cfg: &crate::config::DatabaseConfig) -> anyhow::Result<Self> {
        if is_sqlite_url(&cfg.url) {
            Ok(Store::Sqlite(SqliteStore::connect(cfg).await?))
        } else {
            Ok(Store::Postgres(PgStore::connect(cfg).await?))
        }
    }

    pub async fn migrate(&self) -> anyhow::Result<()> {
        match self {
            Store::Postgres(s) => s.migrate().await,
            Store::Sqlite(s) => s.migrate().await,
        }
    }

    /// Commits the batch as one transaction; rows whose `order_id` is already
    /// stored are left as they are.
    pub async fn commit(&self, batch: &[Record]) -> Result<(), StoreError> {
        match self {
            Store::Postgres(s) => s.commit(batch).await,
            Store::Sqlite(s) => s.commit(batch).await,
        }
    }

    /// Which of these orders already have a stored outcome.
    pub async fn stored(&self, order_ids: &[String]) -> Result<HashSet<String>, StoreError> {
        match self {
            Store::Postgres(s) => s.stored(order_ids).await,
            Store::Sqlite(s) => s.stored(order_ids).await,
        }
    }

    /// Cheap round trip for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Postgres(s) => s.ping().await,
            Store::Sqlite(s) => s.ping().await,
        }
    }

    pub async fn close(&self) {
        match self {
            Store::Postgres(s) => s.close().await,
            Store::Sqlite(s) => s.close().await,
        }
    }
}

/// `sqlite:` covers both `sqlite:path` and `sqlite://path`, as sqlx does.
pub fn is_sqlite_url(url: &str) -> bool {
    url.starts_with("sqlite:")
}
