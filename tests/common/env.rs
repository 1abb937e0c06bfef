//! One test's private world: a fresh PostgreSQL database and RabbitMQ
//! queue (names unique per test), the simulator on a loopback port, and
//! what a test reads back from them (rows, queue depths, dead letters, the
//! ledger check). [`Env::cleanup`] removes all of it.

use std::collections::HashMap;
use std::time::Duration;

use conveyor::config::{Config, RabbitConfig};
use conveyor::tools::sim::{self, Knobs, SimHandle};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const AMQP: &str = "amqp://127.0.0.1:5672/%2f";

/// The PostgreSQL admin URL (`CONVEYOR_TEST_PG` overrides it).
pub fn pg_admin_url() -> String {
    std::env::var("CONVEYOR_TEST_PG").unwrap_or_else(|_| PG_ADMIN.to_string())
}

/// One test's private world.
pub struct Env {
    pub name: String,
    pub db_url: String,
    pub queue: String,
    pub pool: PgPool,
    pub sim: SimHandle,
}

impl Env {
    pub async fn new(tag: &str, knobs: Knobs) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        let name = format!("conveyor_{tag}_{suffix}");
        let admin_url = pg_admin_url();
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&admin_url)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL is not reachable at {admin_url} ({e}). Start it: \
                     pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
                )
            });
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("create the test database");
        admin.close().await;
        let db_url = admin_url
            .rsplit_once('/')
            .map(|(base, _)| format!("{base}/{name}"))
            .expect("db url");
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&db_url)
            .await
            .expect("connect to the test database");
        // Fail early and clearly if RabbitMQ is down.
        Connection::connect(AMQP, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "RabbitMQ is not reachable at {AMQP} ({e}). Start it: \
                     rabbitmq-server -detached && rabbitmqctl await_startup"
                )
            })
            .close(200, "probe".into())
            .await
            .ok();
        let sim = sim::start("127.0.0.1:0".parse().expect("addr"), knobs)
            .await
            .expect("start the simulator");
        Self {
            queue: name.replace('_', "."),
            name,
            db_url,
            pool,
            sim,
        }
    }

    /// The daemon's configuration for this test.
    pub fn config(&self) -> Config {
        let mut c = Config::default();
        c.rabbitmq.queue = self.queue.clone();
        c.database.url = self.db_url.clone();
        c.rule_engine.url = self.sim.url.clone();
        c.payment.url = self.sim.url.clone();
        c.http.listen = "127.0.0.1:0".parse().expect("addr");
        c.shutdown.drain_timeout = Duration::from_secs(10);
        c
    }

    /// The same configuration as environment variables, for a child process.
    pub fn env_vars(&self, http_port: u16) -> HashMap<String, String> {
        [
            ("CONVEYOR__RABBITMQ__QUEUE", self.queue.clone()),
            ("CONVEYOR__DATABASE__URL", self.db_url.clone()),
            ("CONVEYOR__RULE_ENGINE__URL", self.sim.url.clone()),
            ("CONVEYOR__PAYMENT__URL", self.sim.url.clone()),
            ("CONVEYOR__HTTP__LISTEN", format!("127.0.0.1:{http_port}")),
            ("CONVEYOR__SHUTDOWN__DRAIN_TIMEOUT", "10s".to_string()),
            ("CONVEYOR__LOG__FORMAT", "json".to_string()),
            ("CONVEYOR__LOG__LEVEL", "warn,conveyor=info".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    pub fn rabbit(&self) -> RabbitConfig {
        RabbitConfig {
            queue: self.queue.clone(),
            ..RabbitConfig::default()
        }
    }

    pub async fn publish(&self, bodies: impl IntoIterator<Item = Vec<u8>>) -> u64 {
        conveyor::tools::produce::publish_rabbit(&self.rabbit(), bodies, 500, None, |_| {})
            .await
            .expect("publish")
    }

    /// Publishes through `cfg` (which declares its topology: a quorum
    /// queue, for one).
    pub async fn publish_to(
        &self,
        cfg: &RabbitConfig,
        bodies: impl IntoIterator<Item = Vec<u8>>,
    ) -> u64 {
        conveyor::tools::produce::publish_rabbit(cfg, bodies, 500, None, |_| {})
            .await
            .expect("publish")
    }

    pub async fn rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(&self.pool)
            .await
            .unwrap_or(0)
    }

    pub async fn rows_by_status(&self) -> HashMap<String, i64> {
        sqlx::query_as::<_, (String, i64)>("SELECT status, count(*) FROM orders GROUP BY status")
            .fetch_all(&self.pool)
            .await
            .expect("count rows")
            .into_iter()
            .collect()
    }

    /// Messages ready in a queue (passive declare).
    pub async fn ready(&self, queue: &str) -> u32 {
        let conn = Connection::connect(AMQP, ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        conn.close(200, "done".into()).await.ok();
        q.message_count()
    }

    /// Takes every message from the dead-letter queue: (headers, body).
    pub async fn drain_dlq(&self) -> Vec<(HashMap<String, String>, Vec<u8>)> {
        let conn = Connection::connect(AMQP, ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(msg) = ch
            .basic_get(
                format!("{}.dlq", self.queue).as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .expect("basic.get")
        {
            let mut headers = HashMap::new();
            if let Some(h) = msg.delivery.properties.headers() {
                for (k, v) in h.inner() {
                    if let AMQPValue::LongString(s) = v {
                        headers.insert(k.to_string(), s.to_string());
                    }
                }
            }
            out.push((headers, msg.delivery.data.clone()));
            msg.delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
        }
        conn.close(200, "done".into()).await.ok();
        out
    }

    /// Checks the ledger against the stored rows: every charged row has
    /// exactly one ledger charge with the same id, and no order was charged
    /// twice. Returns the number of ledger charges.
    pub async fn check_ledger(&self) -> usize {
        let ledger = self.sim.ledger();
        assert_eq!(
            ledger.double_charged_orders, 0,
            "an order was charged twice"
        );
        let by_order: HashMap<&str, &conveyor::tools::sim::LedgerEntry> = ledger
            .charges
            .iter()
            .map(|e| (e.order_id.as_str(), e))
            .collect();
        assert_eq!(
            by_order.len(),
            ledger.charges.len(),
            "duplicate ledger entries"
        );
        let rows: Vec<(String, String, Option<String>)> =
            sqlx::query_as("SELECT order_id, status, charge_id FROM orders")
                .fetch_all(&self.pool)
                .await
                .expect("rows");
        let mut charged = 0usize;
        for (order_id, status, charge_id) in &rows {
            match status.as_str() {
                "accepted" | "declined" => {
                    let entry = by_order.get(order_id.as_str()).unwrap_or_else(|| {
                        panic!("{order_id} stored as {status} but never charged")
                    });
                    assert_eq!(Some(&entry.charge_id), charge_id.as_ref(), "{order_id}");
                    let want = if status == "accepted" {
                        "succeeded"
                    } else {
                        "declined"
                    };
                    assert_eq!(entry.status, want, "{order_id}");
                    charged += 1;
                }
                _ => assert!(charge_id.is_none(), "{order_id} rejected but charged"),
            }
        }
        assert_eq!(
            charged,
            ledger.charges.len(),
            "ledger charges without a stored order"
        );
        ledger.charges.len()
    }

    pub async fn cleanup(self) {
        if let Ok(conn) = Connection::connect(AMQP, ConnectionProperties::default()).await {
            if let Ok(ch) = conn.create_channel().await {
                for q in [self.queue.clone(), format!("{}.dlq", self.queue)] {
                    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await
                        .ok();
                }
            }
            conn.close(200, "done".into()).await.ok();
        }
        self.pool.close().await;
        self.sim.stop().await;
        if let Ok(admin) = PgPoolOptions::new()
            .max_connections(1)
            .connect(&pg_admin_url())
            .await
        {
            sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&admin)
            .await
            .ok();
        }
    }
}
