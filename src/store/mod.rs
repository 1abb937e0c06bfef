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
pub mod read;
pub mod sqlite;

use std::borrow::Borrow;
use std::collections::HashMap;

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

impl From<Status> for crate::outcome::Outcome {
    fn from(s: Status) -> Self {
        match s {
            Status::Accepted => Self::Accepted,
            Status::Rejected => Self::Rejected,
            Status::Declined => Self::Declined,
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
    /// The order's canonical JSON, as decode produced it (so the database
    /// can hold whatever decode accepted).
    pub payload: Bytes,
    /// SHA-256 of `payload`, lowercase hex: what tells a redelivery (same
    /// digest) from another order reusing the id (another digest).
    pub payload_digest: String,
    pub source_position: String,
    pub received_at: DateTime<Utc>,
}

/// What a commit did with one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Its row is new.
    Inserted,
    /// A row with its `order_id` was already there (stored before, or
    /// earlier in the same batch) and was left as it is. `digest` is that
    /// row's payload digest; `None` for rows stored before digests existed.
    Existing { digest: Option<String> },
}

/// `order_id` → payload digest of the stored row (`None`: stored before
/// digests existed).
pub type StoredDigests = HashMap<String, Option<String>>;

/// Per record of a batch whose ids are unique: inserted, or the stored
/// row's digest.
fn written<R: Borrow<Record>>(
    batch: &[R],
    inserted: &std::collections::HashSet<String>,
    existing: &StoredDigests,
) -> Vec<Written> {
    batch
        .iter()
        .map(|r| {
            let id = &r.borrow().order_id;
            if inserted.contains(id) {
                Written::Inserted
            } else {
                Written::Existing {
                    digest: existing.get(id).cloned().flatten(),
                }
            }
        })
        .collect()
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
    /// `db.system.name` of the OpenTelemetry database conventions.
    pub fn system_name(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgresql",
            Store::Sqlite(_) => "sqlite",
        }
    }

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
    /// stored are left as they are. Says, per record, which happened.
    ///
    /// An `order_id` that occurs twice in `batch` is written once, from its
    /// first occurrence; the later ones are `Existing` with that row's
    /// digest, so the caller compares them like any other duplicate.
    pub async fn commit(&self, batch: &[Record]) -> Result<Vec<Written>, StoreError> {
        let mut first: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
        let mut unique: Vec<&Record> = Vec::with_capacity(batch.len());
        // For each record: its index in `unique`, and whether it is a repeat.
        let mut slot: Vec<(usize, bool)> = Vec::with_capacity(batch.len());
        for r in batch {
            match first.get(r.order_id.as_str()) {
                Some(&at) => slot.push((at, true)),
                None => {
                    first.insert(&r.order_id, unique.len());
                    slot.push((unique.len(), false));
                    unique.push(r);
                }
            }
        }
        let done = match self {
            Store::Postgres(s) => s.commit(&unique).await?,
            Store::Sqlite(s) => s.commit(&unique).await?,
        };
        Ok(slot
            .into_iter()
            .map(|(at, repeat)| match (&done[at], repeat) {
                (w, false) => w.clone(),
                (Written::Inserted, true) => Written::Existing {
                    digest: Some(unique[at].payload_digest.clone()),
                },
                (existing, true) => existing.clone(),
            })
            .collect())
    }

    /// Which of these orders already have a stored outcome, with the
    /// digest of each stored payload.
    pub async fn stored(&self, order_ids: &[String]) -> Result<StoredDigests, StoreError> {
        match self {
            Store::Postgres(s) => s.stored(order_ids).await,
            Store::Sqlite(s) => s.stored(order_ids).await,
        }
    }

    /// Counts one more delivery of each message (keys unique), returning
    /// how many this store has seen of each, this one included.
    pub async fn count_deliveries(
        &self,
        keys: &[String],
    ) -> Result<HashMap<String, u32>, StoreError> {
        match self {
            Store::Postgres(s) => s.count_deliveries(keys).await,
            Store::Sqlite(s) => s.count_deliveries(keys).await,
        }
    }

    /// How many deliveries of each message this store has on record,
    /// without counting one more: keys with no record are absent.
    pub async fn recorded_deliveries(
        &self,
        keys: &[String],
    ) -> Result<HashMap<String, u32>, StoreError> {
        match self {
            Store::Postgres(s) => s.recorded_deliveries(keys).await,
            Store::Sqlite(s) => s.recorded_deliveries(keys).await,
        }
    }

    /// Drops the counts of these messages (settled, or dead-lettered: a
    /// replay starts afresh).
    pub async fn forget_deliveries(&self, keys: &[String]) -> Result<(), StoreError> {
        match self {
            Store::Postgres(s) => s.forget_deliveries(keys).await,
            Store::Sqlite(s) => s.forget_deliveries(keys).await,
        }
    }

    /// Drops counts not touched for `older_than`: messages long settled.
    pub async fn prune_deliveries(
        &self,
        older_than: std::time::Duration,
    ) -> Result<u64, StoreError> {
        match self {
            Store::Postgres(s) => s.prune_deliveries(older_than).await,
            Store::Sqlite(s) => s.prune_deliveries(older_than).await,
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

/// Delivery counts as read from a store, whatever integer type its driver
/// returns (a count that does not fit is read as none).
fn delivery_counts<N: TryInto<u32>>(rows: Vec<(String, N)>) -> HashMap<String, u32> {
    rows.into_iter()
        .map(|(k, n)| (k, n.try_into().unwrap_or(0)))
        .collect()
}
