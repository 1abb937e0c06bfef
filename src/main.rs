//! The `conveyor` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use conveyor::config::Config;
use conveyor::config::SourceKind;
use conveyor::telemetry;
use conveyor::tools::produce::{publish_kafka, publish_rabbit, Mix, OrderGen};
use conveyor::tools::sim::{self, EndpointKnobs, Knobs};

#[derive(Parser)]
#[command(name = "conveyor", version, about = "Order-pipeline consumer daemon")]
struct Cli {
    /// Configuration file (TOML). Every key can be overridden by
    /// `CONVEYOR__SECTION__KEY`; without a file the defaults apply.
    #[arg(long, short, global = true, env = "CONVEYOR_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume, process and store orders until SIGTERM/SIGINT, then drain.
    Run,
    /// Apply the database migrations and exit.
    Migrate,
    /// Print the effective configuration (secrets redacted), or its errors.
    CheckConfig,
    /// Serve the rule-engine and payment simulator.
    Simulate(SimulateArgs),
    /// Publish generated orders to RabbitMQ or Kafka, as a load generator.
    Produce(ProduceArgs),
    /// Run the whole daemon on embedded defaults (in-process Kafka mock
    /// cluster, SQLite, the simulator) over a load of orders, then check it.
    Demo(DemoArgs),
    /// Serve the HTTP intake (POST /orders/batch, GET /orders) in front of
    /// the broker, until SIGTERM/SIGINT, then drain.
    Ingest,
    /// Stream stored orders out as NDJSON or CSV.
    Export(conveyor::tools::cli::ExportCli),
    /// Inspect, replay or purge the dead letters of either broker.
    Dlq(conveyor::tools::cli::DlqCli),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Orders to produce and process.
    #[arg(long, default_value_t = 50_000)]
    orders: u64,
    /// Partitions of the orders topic.
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    /// Simulator latency per request, both endpoints.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    #[arg(long, default_value_t = 2.0)]
    poison_pct: f64,
    #[arg(long, default_value_t = 3.0)]
    reject_pct: f64,
    #[arg(long, default_value_t = 3.0)]
    decline_pct: f64,
    /// The prefetch limit.
    #[arg(long, default_value_t = 512)]
    prefetch: u32,
    /// Keep the SQLite database at this path for inspection.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "conveyor-demo.db")]
    keep: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Fail, naming the likely cause, when no order is acknowledged for this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    stall_timeout: std::time::Duration,
}

#[derive(clap::Args)]
struct SimulateArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Added latency per request, both endpoints.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Random extra latency, uniform in [0, jitter].
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Fraction of requests answered 503.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Fraction of requests never answered.
    #[arg(long, default_value_t = 0.0)]
    timeout_rate: f64,
    /// Fraction of requests answered 429.
    #[arg(long, default_value_t = 0.0)]
    throttle_rate: f64,
    /// Fraction of orders rejected by the rule engine.
    #[arg(long, default_value_t = 0.0)]
    reject_rate: f64,
    /// Fraction of charges declined.
    #[arg(long, default_value_t = 0.0)]
    decline_rate: f64,
}

#[derive(clap::Args)]
struct ProduceArgs {
    /// Broker to publish to [default: the configured source.kind].
    #[arg(long, value_enum, value_name = "BROKER")]
    to: Option<Broker>,
    /// Kafka topic [default: the first of kafka.topics]. The RabbitMQ queue
    /// is rabbitmq.queue.
    #[arg(long)]
    topic: Option<String>,
    /// Stop after this many orders.
    #[arg(long, default_value_t = 10_000, conflicts_with = "duration")]
    orders: u64,
    /// Publish for this long instead of a count, e.g. 30s or 5m.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<std::time::Duration>,
    /// Orders per second [default: as fast as the broker acknowledges].
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
    /// Distinct customer ids the orders are spread over.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    customers: u64,
    /// Prefix of the order ids; the same prefix republishes the same orders.
    #[arg(long)]
    run_id: Option<String>,
    /// Percent of poison messages (malformed or invalid).
    #[arg(long, default_value_t = 2.0, value_parser = parse_pct)]
    poison_pct: f64,
    /// Percent of orders for the rule engine to reject.
    #[arg(long, default_value_t = 3.0, value_parser = parse_pct)]
    reject_pct: f64,
    /// Percent of orders whose charge is to be declined.
    #[arg(long, default_value_t = 3.0, value_parser = parse_pct)]
    decline_pct: f64,
    /// Kafka compression codec of the produced batches (librdkafka's
    /// `compression.type`) [default: kafka.properties' compression.type, else none].
    #[arg(long, value_enum, value_name = "CODEC")]
    compression: Option<Codec>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Codec {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Codec {
    fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Gzip => "gzip",
            Codec::Snappy => "snappy",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Broker {
    Rabbitmq,
    Kafka,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        Ok(_) => Err("must be a positive number".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_pct(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        Ok(_) => Err("must be between 0 and 100".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("conveyor: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::CheckConfig = cli.command {
        print!("{}", config.to_redacted_toml());
        return ExitCode::SUCCESS;
    }
    let mut log = config.log.clone();
    if matches!(cli.command, Command::Demo(_)) {
        // The demo prints its own summary; per-order lines would drown it.
        log.level = "error".into();
    }
    // Libraries' words reach the log and a fatal error, and some quote the
    // value they refused: whatever is printed is scrubbed of every secret.
    let scrubber = config.scrubber();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("conveyor: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Traces are the daemon's; the other commands log only.
    let otlp = matches!(cli.command, Command::Run).then(|| config.telemetry.otlp.clone());
    let export = {
        let _in_runtime = runtime.enter();
        telemetry::init_tracing(&log, otlp.as_ref(), scrubber.clone())
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run => run(config).await,
            Command::Migrate => {
                let store = conveyor::store::Store::connect(&config.database).await?;
                store.migrate().await?;
                tracing::info!("migrations applied");
                Ok(0)
            }
            Command::CheckConfig => Ok(0),
            Command::Simulate(a) => simulate(a).await.map(|()| 0),
            Command::Produce(a) => produce(&config, a).await.map(|()| 0),
            Command::Ingest => {
                let stop = conveyor::shutdown::install()?;
                conveyor::tools::ingest::run(config, stop.cancelled_owned(), None)
                    .await
                    .map(|()| 0)
            }
            Command::Export(a) => a.run(&config).await,
            Command::Dlq(a) => a.run(&config).await.map(|()| 0),
            Command::Demo(a) => {
                let ok = conveyor::tools::demo::run(conveyor::tools::demo::DemoArgs {
                    orders: a.orders,
                    partitions: a.partitions,
                    latency_ms: a.latency_ms,
                    mix: Mix {
                        poison_pct: a.poison_pct,
                        reject_pct: a.reject_pct,
                        decline_pct: a.decline_pct,
                    },
                    prefetch: a.prefetch,
                    keep: a.keep,
                    quiet: a.quiet,
                    stall_timeout: a.stall_timeout,
                })
                .await?;
                if ok {
                    Ok(0)
                } else {
                    Err(anyhow::anyhow!("an invariant failed"))
                }
            }
        }
    });
    if let Some(export) = export {
        runtime.block_on(export.shutdown(std::time::Duration::from_secs(5)));
    }
    // Do not wait for stray tasks (a hung HTTP call past the drain deadline).
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let error = scrubber.scrub(&format!("{e:#}"));
            tracing::error!(error, "fatal");
            eprintln!("conveyor: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The daemon; its exit code says how the drain went.
async fn run(config: Config) -> anyhow::Result<u8> {
    abort_on_panic();
    let stop = conveyor::shutdown::install()?;
    let report = conveyor::run(config, stop.cancelled_owned()).await?;
    if !report.drained {
        tracing::warn!(
            exit_code = conveyor::EXIT_DRAIN_TIMEOUT,
            "exited at the drain deadline; unfinished work will be redelivered"
        );
    }
    Ok(report.exit_code())
}

/// A panic in a validate or charge worker is contained by the stage (the
/// order is dead-lettered as `internal_error`); any other panic ends the
/// process. Left to itself, a panicking task would die alone and keep what
/// it held unacknowledged for as long as the process lives — a queue or
/// partition blocked without a word. Aborting hands the messages back to
/// the broker and the restart to the supervisor, and the delivery count
/// (`source.max_deliveries`) dead-letters a message that does it every time.
fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if conveyor::pipeline::panic_is_contained() {
            // The stage logs it with the order's id and dead-letters it.
            return;
        }
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(panic = %message, location = %location,
            "panic: aborting; unacknowledged messages go back to the broker");
        default(info);
        std::process::abort();
    }));
}

async fn simulate(a: SimulateArgs) -> anyhow::Result<()> {
    let endpoint = EndpointKnobs {
        latency_ms: a.latency_ms,
        jitter_ms: a.jitter_ms,
        error_rate: a.error_rate,
        timeout_rate: a.timeout_rate,
        throttle_rate: a.throttle_rate,
    };
    let knobs = Knobs {
        validate: endpoint.clone(),
        charge: endpoint,
        reject_rate: a.reject_rate,
        decline_rate: a.decline_rate,
    };
    let stop = conveyor::shutdown::install()?;
    let handle = sim::start(a.listen, knobs).await?;
    tracing::info!(url = %handle.url, "simulator listening (POST /validate, POST /charges, GET /ledger, GET|PUT /knobs)");
    stop.cancelled().await;
    handle.stop().await;
    Ok(())
}

async fn produce(config: &Config, a: ProduceArgs) -> anyhow::Result<()> {
    use std::time::Instant;

    /// Unacknowledged messages at most, either broker.
    const WINDOW: usize = 1000;

    let broker = a.to.unwrap_or(match config.source.kind {
        SourceKind::Rabbitmq => Broker::Rabbitmq,
        SourceKind::Kafka => Broker::Kafka,
    });
    let mix = Mix {
        poison_pct: a.poison_pct,
        reject_pct: a.reject_pct,
        decline_pct: a.decline_pct,
    };
    anyhow::ensure!(
        mix.poison_pct + mix.reject_pct + mix.decline_pct <= 100.0,
        "--poison-pct, --reject-pct and --decline-pct add up to more than 100"
    );
    // The Kafka topic; none for RabbitMQ, whose queue is rabbitmq.queue.
    let topic = match broker {
        Broker::Rabbitmq => {
            anyhow::ensure!(
                a.topic.is_none(),
                "--topic is for Kafka; the RabbitMQ queue is rabbitmq.queue"
            );
            anyhow::ensure!(
                a.compression.is_none(),
                "--compression is for Kafka; RabbitMQ messages are sent as they are"
            );
            None
        }
        Broker::Kafka => Some(
            a.topic
                .clone()
                .or_else(|| config.kafka.topics.first().cloned())
                .ok_or_else(|| anyhow::anyhow!("no Kafka topic: give --topic or kafka.topics"))?,
        ),
    };
    let destination = match &topic {
        None => format!("RabbitMQ queue {:?}", config.rabbitmq.queue),
        Some(t) => format!("Kafka topic {t:?}"),
    };
    let run_id = a
        .run_id
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..8].to_string());
    let mut generator = OrderGen::new(run_id.clone(), mix);
    generator.customers = a.customers;

    // Which messages to publish: a count, or as many as fit in the duration
    // (with a rate, exactly the ones due before it ends).
    let indices: Box<dyn Iterator<Item = u64>> = match a.duration {
        None => Box::new(0..a.orders),
        Some(d) => {
            let due_in_time = a
                .rate
                .map_or(u64::MAX, |r| (r * d.as_secs_f64()).ceil() as u64);
            // The clock starts with the first order, once connected, as the
            // publisher's pacing does.
            let mut deadline = None;
            Box::new((0..due_in_time).take_while(move |_| {
                let now = Instant::now();
                // None: past what the clock can represent, so never.
                let end = *deadline.get_or_insert_with(|| now.checked_add(d));
                end.is_none_or(|end| now < end)
            }))
        }
    };

    // The first SIGINT/SIGTERM stops publishing; what is out waits for its
    // acknowledgement and the summary still prints. A second one exits.
    let stop = conveyor::shutdown::install()?;
    let stopped = stop.clone();
    let indices = indices.take_while(move |_| !stopped.is_cancelled());

    let started = Instant::now();
    let progress = Progress::start(a.quiet, a.duration, a.orders, started);
    let on_progress = |n| progress.acknowledged(n);
    let result = match &topic {
        None => {
            let bodies = indices.map(|i| generator.message(i).1);
            publish_rabbit(&config.rabbitmq, bodies, WINDOW, a.rate, on_progress).await
        }
        Some(topic) => {
            let records = indices.map(|i| (generator.order_id(i), generator.message(i).1));
            let mut kafka = config.kafka.clone();
            if let Some(codec) = a.compression {
                kafka
                    .properties
                    .insert("compression.type".into(), codec.name().into());
            }
            publish_kafka(&kafka, topic, records, WINDOW, a.rate, on_progress).await
        }
    };
    let acked = progress.finish(result.is_ok());
    let sent = result.map_err(|e| match acked {
        0 => e,
        n => e.context(format!(
            "failed after {n} orders of run {run_id} were acknowledged"
        )),
    })?;
    let secs = started.elapsed().as_secs_f64();
    let c = generator.intent_counts(sent);
    if stop.is_cancelled() {
        println!("stopped by a signal; every order sent was acknowledged");
    }
    println!("published {sent} orders to {destination}");
    println!("  run id   {run_id}");
    println!(
        "  intents  accept {}  reject {}  decline {}  poison {}",
        c.accept, c.reject, c.decline, c.poison
    );
    println!(
        "  elapsed  {secs:.2} s ({:.0} orders/s)",
        sent as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// The progress bar of `produce`, on stderr unless `--quiet` or stderr is
/// not a terminal. With a count it shows count, rate and ETA; with a
/// duration it is time, moved by a ticker, with the count in its message.
struct Progress {
    bar: indicatif::ProgressBar,
    acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    fn start(
        quiet: bool,
        duration: Option<std::time::Duration>,
        orders: u64,
        started: std::time::Instant,
    ) -> Self {
        use std::sync::atomic::Ordering;
        use std::time::Duration;

        let bar = if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr())
        };
        let template = match duration {
            None => "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec:0} ETA {eta}",
            Some(_) => "{spinner} [{elapsed_precise}] {wide_bar} {msg}",
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message("connecting");
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ticker = match duration {
            None => {
                bar.set_length(orders);
                bar.enable_steady_tick(Duration::from_millis(100));
                None
            }
            Some(d) if !bar.is_hidden() => {
                bar.set_length(d.as_millis() as u64);
                let (bar, acked) = (bar.clone(), acked.clone());
                Some(tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_millis(100));
                    loop {
                        tick.tick().await;
                        let elapsed = started.elapsed();
                        let n = acked.load(Ordering::Relaxed);
                        let left = d.saturating_sub(elapsed).as_secs_f64().ceil();
                        bar.set_position(elapsed.as_millis() as u64);
                        bar.set_message(format!(
                            "{n} orders  {:.0}/s  {} left",
                            n as f64 / elapsed.as_secs_f64().max(1e-9),
                            humantime::format_duration(Duration::from_secs_f64(left))
                        ));
                    }
                }))
            }
            Some(_) => None,
        };
        Self { bar, acked, ticker }
    }

    /// `n` orders acknowledged so far.
    fn acknowledged(&self, n: u64) {
        self.acked.store(n, std::sync::atomic::Ordering::Relaxed);
        if self.ticker.is_none() {
            self.bar.set_position(n);
        }
    }

    /// Stops the bar: cleared on success, since the summary on stdout says
    /// it all; left in place on failure. Returns the count acknowledged.
    fn finish(self, ok: bool) -> u64 {
        if let Some(t) = self.ticker {
            t.abort();
        }
        if ok {
            self.bar.finish_and_clear();
        } else {
            self.bar.abandon();
        }
        self.acked.load(std::sync::atomic::Ordering::Relaxed)
    }
}
