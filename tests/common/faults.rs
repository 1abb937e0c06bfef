//! Fault injection for `tests/chaos.rs`: RabbitMQ's application stopped,
//! one test database refusing connections, the broker closing a daemon's
//! connections.
//!
//! Every fault is a guard that undoes it on `end().await` (the CLI runs as
//! a `tokio::process` child, off the async workers) or, if the test panics
//! first, on drop: that path blocks, as drop cannot await, which is fine
//! while unwinding — and every other test on this machine needs the service
//! back.

use tokio::process::Command;

use super::broker::rabbitmqctl;
use super::env::pg_admin_url;

const RABBIT_START: &[&str] = &["-q", "start_app"];
const RABBIT_AWAIT: &[&str] = &["-q", "await_startup", "--timeout", "120"];

/// `rabbitmqctl` from a synchronous context (a guard's drop).
fn rabbitmqctl_blocking(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map_err(|e| format!("rabbitmqctl {args:?}: {e} (RabbitMQ's CLI must be installed)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn rabbit_not_back(e: &str) {
    // Not a panic: this also runs from drop, maybe while unwinding.
    eprintln!(
        "could not bring RabbitMQ back ({e}); start it: \
         rabbitmqctl start_app || rabbitmq-server -detached"
    );
}

/// RabbitMQ's application stopped (`rabbitmqctl stop_app`; the Erlang node
/// stays up, so it comes back in seconds) until [`RabbitOutage::end`] or
/// drop, whatever happens in between: every other test on this machine
/// needs the broker back.
pub struct RabbitOutage {
    up: bool,
}

impl RabbitOutage {
    pub async fn begin() -> Self {
        let mut outage = Self { up: false };
        if let Err(e) = rabbitmqctl(&["-q", "stop_app"]).await {
            outage.end().await;
            panic!("{e}");
        }
        outage
    }

    /// Starts the application again and waits until it accepts connections.
    pub async fn end(&mut self) {
        if self.up {
            return;
        }
        self.up = true;
        let started = match rabbitmqctl(RABBIT_START).await {
            Ok(_) => rabbitmqctl(RABBIT_AWAIT).await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            rabbit_not_back(&e);
        }
    }
}

impl Drop for RabbitOutage {
    fn drop(&mut self) {
        if self.up {
            return;
        }
        self.up = true;
        if let Err(e) =
            rabbitmqctl_blocking(RABBIT_START).and_then(|()| rabbitmqctl_blocking(RABBIT_AWAIT))
        {
            rabbit_not_back(&e);
        }
    }
}

fn psql_args(sql: &str) -> [String; 5] {
    [
        pg_admin_url(),
        "-v".into(),
        "ON_ERROR_STOP=1".into(),
        "-tAc".into(),
        sql.into(),
    ]
}

fn psql_result(sql: &str, out: std::process::Output) -> Result<String, String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "psql -c {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

const PSQL_MISSING: &str = "(PostgreSQL's client must be installed)";

async fn psql_admin(sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args(psql_args(sql))
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("psql: {e} {PSQL_MISSING}"))?;
    psql_result(sql, out)
}

/// `psql` from a synchronous context (a guard's drop).
fn psql_admin_blocking(sql: &str) -> Result<String, String> {
    let out = std::process::Command::new("psql")
        .args(psql_args(sql))
        .output()
        .map_err(|e| format!("psql: {e} {PSQL_MISSING}"))?;
    psql_result(sql, out)
}

/// One test database made unavailable: new connections refused
/// (`ALLOW_CONNECTIONS false`) and the open ones terminated. Scoped to that
/// database, so tests running beside it are not disturbed. Connections are
/// allowed again on [`PgOutage::end`] or drop.
pub struct PgOutage {
    db: String,
    active: bool,
}

impl PgOutage {
    fn allow_sql(&self) -> String {
        format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", self.db)
    }

    /// Returns the outage and how many backends it terminated.
    pub async fn begin(db: &str) -> (Self, u64) {
        let mut outage = Self {
            db: db.to_string(),
            active: true,
        };
        let killed = match psql_admin(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false")).await
        {
            Ok(_) => {
                psql_admin(&format!(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE datname = '{db}' AND pid <> pg_backend_pid()"
                ))
                .await
            }
            Err(e) => Err(e),
        };
        match killed {
            Ok(n) => (outage, n.parse().unwrap_or(0)),
            Err(e) => {
                outage.end().await;
                panic!("{e}");
            }
        }
    }

    pub async fn end(&mut self) {
        if !self.active {
            return;
        }
        self.active = false;
        if let Err(e) = psql_admin(&self.allow_sql()).await {
            eprintln!("could not end the outage of {}: {e}", self.db);
        }
    }
}

impl Drop for PgOutage {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        self.active = false;
        if let Err(e) = psql_admin_blocking(&self.allow_sql()) {
            eprintln!("could not end the outage of {}: {e}", self.db);
        }
    }
}

/// Makes RabbitMQ close the connection(s) consuming `queue`, as an operator
/// or a broker policy would: only that daemon is affected, so this is safe
/// beside other tests. Returns how many connections were closed.
pub async fn close_consumer_connections(queue: &str) -> usize {
    async fn list(args: &[&str]) -> Vec<Vec<String>> {
        let out = Command::new("rabbitmqctl")
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .expect("run rabbitmqctl (RabbitMQ's CLI must be installed)");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect()
    }
    let channels: Vec<String> = list(&[
        "list_consumers",
        "-q",
        "--no-table-headers",
        "queue_name",
        "channel_pid",
    ])
    .await
    .into_iter()
    .filter(|row| row.first().map(String::as_str) == Some(queue))
    .filter_map(|row| row.get(1).cloned())
    .collect();
    let mut connections: Vec<String> = list(&[
        "list_channels",
        "-q",
        "--no-table-headers",
        "pid",
        "connection",
    ])
    .await
    .into_iter()
    .filter(|row| row.first().is_some_and(|pid| channels.contains(pid)))
    .filter_map(|row| row.get(1).cloned())
    .collect();
    connections.sort();
    connections.dedup();
    for c in &connections {
        if let Err(e) =
            rabbitmqctl(&["-q", "close_connection", c, "chaos: closed by the test"]).await
        {
            panic!("{e}");
        }
    }
    connections.len()
}
