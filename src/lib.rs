//! conveyor: a message-queue consumer daemon. Orders come off a broker under
//! a prefetch limit, go through bounded stages (decode, validate, charge),
//! are stored in batched transactions, and are acknowledged only after the
//! commit. See `DESIGN` in the README for the semantics.
//!
//! [`run`] is the whole daemon; it takes its shutdown as a future so tests
//! drive it without signals.

pub mod config;
pub mod downstream;
pub mod notify;
pub mod order;
pub mod outcome;
pub mod pipeline;
pub mod resizable;
pub mod shutdown;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod tools;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::config::{Config, SourceKind};
use crate::downstream::{PaymentClient, RuleEngineClient};
use crate::source::kafka::KafkaSource;
use crate::source::prefetch::{FollowInputs, Prefetch};
use crate::source::rabbitmq::RabbitSource;
use crate::store::Store;
use crate::telemetry::{Health, Metrics};

/// What a run did, from its own counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub received: u64,
    pub acked: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub declined: u64,
    pub dead_lettered: u64,
    /// Redeliveries of orders already stored, acknowledged without work.
    pub duplicates: u64,
    /// False when the drain deadline passed with work unfinished (it is left
    /// unacknowledged and will be redelivered).
    pub drained: bool,
    pub elapsed: Duration,
}

/// Exit code of a drain that hit `shutdown.drain_timeout` with work
/// unfinished (`EX_TEMPFAIL` of sysexits.h): nothing is lost — the unfinished
/// work was left unacknowledged and the broker redelivers it — but a
/// supervisor can tell it from a clean drain (0), a second signal (130,
/// [`shutdown::EXIT_FORCED`]) and a fatal error (1).
pub const EXIT_DRAIN_TIMEOUT: u8 = 75;

/// Exit code of a configuration the daemon refuses (`EX_CONFIG`): starting
/// it again cannot help, so the systemd unit lists it in
/// `RestartPreventExitStatus=` rather than restarting it every few seconds.
pub const EXIT_BAD_CONFIG: u8 = 78;

/// How long a source may take to close after the drain deadline, once the
/// pipeline is gone, before it is cancelled.
const SOURCE_CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// Delivery counts untouched for this long are dropped at start: their
/// messages were settled long ago.
const DELIVERY_COUNT_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);

impl Report {
    /// The exit code of the process this run ends: 0 after a clean drain,
    /// [`EXIT_DRAIN_TIMEOUT`] when the drain deadline cut it short.
    pub fn exit_code(&self) -> u8 {
        if self.drained {
            0
        } else {
            EXIT_DRAIN_TIMEOUT
        }
    }
}

/// Hooks into a run's life, for supervisors and tests.
#[derive(Default)]
pub struct Hooks {
    /// Called once the broker and database are connected and intake starts.
    pub on_ready: Option<Box<dyn FnOnce(SocketAddr) + Send>>,
    /// Use this registry instead of a fresh one (to read it from outside).
    pub metrics: Option<Arc<Metrics>>,
}

/// Runs the daemon until `shutdown` resolves (then drains) or a fatal error.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<Report> {
    run_with(config, shutdown, Hooks::default()).await
}

pub async fn run_with(
    config: Config,
    shutdown: impl Future<Output = ()>,
    hooks: Hooks,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let metrics = match hooks.metrics {
        Some(m) => m,
        None => Arc::new(Metrics::new().context("registering metrics")?),
    };
    let health = Arc::new(Health::default());

    let store = Store::connect(&config.database).await?;
    if config.database.migrate_on_start {
        store.migrate().await?;
    }
    store.ping().await.map_err(|e| {
        let url = &config.database.url;
        let text = e.to_string();
        anyhow::anyhow!(
            "database at {}: {text}{}",
            config::redact_url(url),
            store::postgres::tls_hint(url, &text)
        )
    })?;
    Health::set(&health.database_ok, true);
    // Delivery counts of messages long settled; a failure here only leaves
    // a few rows behind.
    match store.prune_deliveries(DELIVERY_COUNT_KEPT).await {
        Ok(n) if n > 0 => tracing::info!(rows = n, "pruned old delivery counts"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot prune old delivery counts"),
    }

    // One supervision tree: the root token stops everything the run
    // started, and every task is owned here (aborted when dropped), so that
    // when this returns — drained, cut by the deadline, or failed — none of
    // them is left running.
    let root = CancellationToken::new();
    let _stop_all = root.clone().drop_guard();
    let http_stop = root.child_token();
    let (http_addr, http_task) = telemetry::serve(
        config.http.listen,
        metrics.clone(),
        health.clone(),
        http_stop.clone(),
    )
    .await
    .with_context(|| format!("http.listen: cannot bind {}", config.http.listen))?;
    let http_task = AbortOnDropHandle::new(http_task);
    tracing::info!(addr = %http_addr, "serving /metrics /healthz /readyz");

    let (deliveries_tx, deliveries_rx) = mpsc::channel(config.pipeline.channel_capacity);
    // Unbounded on purpose: every settlement carries a prefetch permit, so
    // at most `prefetch` can be queued, and the pipeline must never block
    // on reporting a fate.
    let (settle_tx, settle_rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(pipeline::Context {
        rules: RuleEngineClient::new(
            &config.rule_engine,
            config.pipeline.validate_concurrency,
            metrics.clone(),
        )
        .context("rule_engine: building the HTTP client")?,
        payments: PaymentClient::new(
            &config.payment,
            config.pipeline.charge_concurrency,
            metrics.clone(),
        )
        .context("payment: building the HTTP client")?,
        store: store.clone(),
        settle: settle_tx,
        metrics: metrics.clone(),
        health: health.clone(),
        config: config.clone(),
    });
    // The prefetch limit: `source.prefetch`, or following what the stages
    // can work on (see `source::prefetch`), recomputed by a task of its own.
    let follow = &config.source.prefetch_follow;
    let ceiling = config.source.prefetch as usize;
    let follow_inputs = follow.enabled.then(|| FollowInputs {
        stages: vec![ctx.rules.concurrency(), ctx.payments.concurrency()],
        floor: follow.floor as usize,
        ceiling,
        batch_max_size: config.batch.max_size,
        batch_writers: config.batch.writers,
        batch_max_wait: config.batch.max_wait,
    });
    let permits = Arc::new(Prefetch::new(
        follow_inputs
            .as_ref()
            .map_or(ceiling, FollowInputs::initial),
        metrics.prefetch_limit.clone(),
    ));
    let _follow_task = follow_inputs.map(|inputs| {
        tracing::info!(
            floor = inputs.floor,
            ceiling = inputs.ceiling,
            initial = permits.limit(),
            "the prefetch follows the stages"
        );
        AbortOnDropHandle::new(tokio::spawn(source::prefetch::follow(
            permits.clone(),
            inputs,
            metrics.clone(),
            root.child_token(),
        )))
    });
    let stop_intake = root.child_token();
    let stop = stop_intake.clone();
    let source_task: tokio::task::JoinHandle<anyhow::Result<()>> = match config.source.kind {
        SourceKind::Rabbitmq => {
            let source = RabbitSource::connect(
                &config.rabbitmq,
                config.source.prefetch,
                follow.enabled.then(|| permits.subscribe()),
                metrics.clone(),
                health.clone(),
            )
            .await?;
            tokio::spawn(
                async move { Ok(source.run(permits, deliveries_tx, settle_rx, stop).await?) },
            )
        }
        SourceKind::Kafka => {
            let source = KafkaSource::connect(
                &config.kafka,
                config.source.prefetch,
                metrics.clone(),
                health.clone(),
            )?;
            tokio::spawn(
                async move { Ok(source.run(permits, deliveries_tx, settle_rx, stop).await?) },
            )
        }
    };
    let mut source_task = AbortOnDropHandle::new(source_task);
    let mut pipeline_task = AbortOnDropHandle::new(tokio::spawn(pipeline::run(ctx, deliveries_rx)));
    if let Some(on_ready) = hooks.on_ready {
        on_ready(http_addr);
    }
    notify::ready();
    let watchdog = notify::spawn_watchdog(http_stop.clone()).map(AbortOnDropHandle::new);

    let early = tokio::select! {
        _ = shutdown => None,
        res = &mut source_task => Some(res),
    };
    Health::set(&health.draining, true);
    notify::stopping();
    stop_intake.cancel();
    let outcome = match early {
        Some(res) => Some(res),
        None => {
            tracing::info!(deadline = ?config.shutdown.drain_timeout, "draining");
            tokio::time::timeout(config.shutdown.drain_timeout, &mut source_task)
                .await
                .ok()
        }
    };
    let ended = match outcome {
        Some(Ok(Ok(()))) => {
            let _ = (&mut pipeline_task).await;
            Ok(true)
        }
        Some(Ok(Err(e))) => Err(e.context("the broker source failed")),
        Some(Err(join)) => Err(anyhow::anyhow!("the broker source panicked: {join}")),
        None => {
            // Logged as a shutdown cancellation, not as a timeout: nothing
            // failed, the work is handed back to the broker.
            tracing::warn!(
                cause = "shutdown",
                unacked = metrics.unacked.get(),
                "drain deadline passed; cancelling unfinished orders, which stay unacknowledged and will be redelivered"
            );
            Ok(false)
        }
    };
    if !matches!(ended, Ok(true)) {
        // The pipeline is cancelled and awaited, so that it is gone (the
        // orders it held dropped, unacknowledged) before the run returns.
        pipeline_task.abort();
        let _ = (&mut pipeline_task).await;
        // Its settlements channel is closed now: a source still running
        // ends as on a clean stop (Kafka commits what was done, the AMQP
        // connection is closed), within a bound, else it is cancelled too.
        if !source_task.is_finished()
            && tokio::time::timeout(SOURCE_CLOSE_LIMIT, &mut source_task)
                .await
                .is_err()
        {
            source_task.abort();
            let _ = (&mut source_task).await;
        }
    }
    root.cancel();
    let _ = http_task.await;
    if let Some(w) = watchdog {
        let _ = w.await;
    }
    let drained = ended?;
    store.close().await;

    let outcome = |o: outcome::Outcome| metrics.orders.with_label_values(&[o.as_str()]).get();
    let report = Report {
        received: metrics.received.get(),
        acked: metrics.acked.get(),
        accepted: outcome(outcome::Outcome::Accepted),
        rejected: outcome(outcome::Outcome::Rejected),
        declined: outcome(outcome::Outcome::Declined),
        dead_lettered: outcome(outcome::Outcome::DeadLettered),
        duplicates: outcome(outcome::Outcome::Duplicate),
        drained,
        elapsed: started.elapsed(),
    };
    tracing::info!(?report, "stopped");
    Ok(report)
}
