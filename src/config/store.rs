//! The database orders are stored in: PostgreSQL or SQLite, its
//! credentials and its connection pool.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::secret::{redact_url, serialize_redacted_url, Secret};

#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://user@host:port/db`, or `sqlite://FILE` (`sqlite:FILE`)
    /// for SQLite, whose file is created if missing. A PostgreSQL password in
    /// the URL (userinfo or `?password=`) works but is better given through
    /// `password` / `password_file`; it is redacted wherever the URL is shown.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub url: String,
    /// Secret: prefer `CONVEYOR__DATABASE__PASSWORD` or `password_file`.
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// Connections in the pool; writers each hold one while committing.
    pub max_connections: u32,
    /// Apply the embedded migrations when `run` starts.
    pub migrate_on_start: bool,
    /// How long to wait for a connection from the pool.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field cannot be left out unseen.
        let Self {
            url,
            password,
            password_file,
            max_connections,
            migrate_on_start,
            acquire_timeout,
        } = self;
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url(url))
            .field("password", password)
            .field("password_file", password_file)
            .field("max_connections", max_connections)
            .field("migrate_on_start", migrate_on_start)
            .field("acquire_timeout", acquire_timeout)
            .finish()
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/conveyor".into(),
            password: None,
            password_file: None,
            max_connections: 8,
            migrate_on_start: true,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}
