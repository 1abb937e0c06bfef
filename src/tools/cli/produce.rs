//! `conveyor produce`: the load generator, with a progress bar and a
//! summary.

use super::{parse_duration, parse_pct, parse_rate, Broker};
use crate::config::{Config, SourceKind};
use crate::tools::produce::{publish_kafka, publish_rabbit, Mix, OrderGen};

/// `conveyor produce`.
#[derive(clap::Args)]
pub struct ProduceCli {
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

impl ProduceCli {
    /// Publishes, then prints a summary on stdout.
    pub async fn run(self, config: &Config) -> anyhow::Result<()> {
        produce(config, self).await
    }
}

async fn produce(config: &Config, a: ProduceCli) -> anyhow::Result<()> {
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
    let stop = crate::shutdown::install()?;
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
