//! `conveyor dlq`.

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use chrono::{DateTime, Utc};

use super::{parse_rate, parse_time, Broker};
use crate::config::{Config, SourceKind};
use crate::tools::dlq::{self, Action, DeadLetterMsg, Filter as DlqFilter, MoveOpts, Stats};

/// `conveyor dlq`.
#[derive(Debug, clap::Args)]
pub struct DlqCli {
    /// Broker whose dead letters to work on [default: the configured source.kind].
    #[arg(long, value_enum, global = true)]
    broker: Option<Broker>,
    /// Kafka: the source topic, whose dead-letter topic is read and to
    /// which replays go [default: the first of kafka.topics].
    #[arg(long, global = true)]
    topic: Option<String>,
    /// Kafka: the consumer group whose committed offsets mark what has left
    /// the dead-letter topic [default: <kafka.group_id>.dlq-replay].
    #[arg(long, global = true)]
    group: Option<String>,
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Debug, clap::Args, Clone)]
struct FilterArgs {
    /// Only dead letters with this reason (x-conveyor-reason).
    #[arg(long)]
    reason: Option<String>,
    /// Only dead letters from this stage: decode, validate, charge, persist.
    #[arg(long)]
    stage: Option<String>,
    /// Only the dead letters of this order.
    #[arg(long)]
    order_id: Option<String>,
    /// Only dead letters that failed at or after this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    since: Option<DateTime<Utc>>,
    /// Only dead letters that failed before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    until: Option<DateTime<Utc>>,
}

impl FilterArgs {
    fn filter(&self) -> DlqFilter {
        DlqFilter {
            reason: self.reason.clone(),
            stage: self.stage.clone(),
            order_id: self.order_id.clone(),
            since: self.since,
            until: self.until,
        }
    }
}

#[derive(Debug, clap::Subcommand)]
enum DlqCommand {
    /// Counts by reason and stage, oldest and newest.
    Stats {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        json: bool,
    },
    /// One line per dead letter.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many.
        #[arg(long)]
        limit: Option<u64>,
        /// One JSON object per line, headers and body included.
        #[arg(long)]
        json: bool,
    },
    /// Every header and the body of each matching dead letter.
    Show {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        limit: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Move matching dead letters back to the source queue/topic.
    Replay {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many.
        #[arg(long)]
        limit: Option<u64>,
        /// Messages per second at most.
        #[arg(long, value_parser = parse_rate)]
        rate: Option<f64>,
        /// Say what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Drop matching dead letters for good.
    Purge {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        limit: Option<u64>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Say what would be purged; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// The broker-specific side of a `dlq` command.
enum Target {
    Rabbit(Box<crate::config::RabbitConfig>),
    Kafka(Box<dlq::kafka::Target>),
}

impl Target {
    fn name(&self) -> String {
        match self {
            Target::Rabbit(c) => format!("RabbitMQ queue {}", c.dead_letter_queue()),
            Target::Kafka(t) => format!("Kafka topic {}", t.dead_letter_topic),
        }
    }

    async fn browse(&self, each: impl FnMut(DeadLetterMsg)) -> anyhow::Result<()> {
        match self {
            Target::Rabbit(c) => dlq::rabbitmq::browse(c, each).await,
            Target::Kafka(t) => dlq::kafka::browse(t, each).await,
        }
    }

    async fn move_matching(
        &self,
        action: Action,
        opts: &MoveOpts,
        on_moved: impl FnMut(&DeadLetterMsg),
    ) -> anyhow::Result<dlq::MoveReport> {
        match self {
            Target::Rabbit(c) => dlq::rabbitmq::move_matching(c, action, opts, on_moved).await,
            Target::Kafka(t) => dlq::kafka::move_matching(t, action, opts, on_moved).await,
        }
    }
}

impl DlqCli {
    fn target(&self, config: &Config) -> anyhow::Result<Target> {
        let broker = self.broker.unwrap_or(match config.source.kind {
            SourceKind::Rabbitmq => Broker::Rabbitmq,
            SourceKind::Kafka => Broker::Kafka,
        });
        Ok(match broker {
            Broker::Rabbitmq => {
                anyhow::ensure!(
                    self.topic.is_none() && self.group.is_none(),
                    "--topic and --group are for Kafka"
                );
                Target::Rabbit(Box::new(config.rabbitmq.clone()))
            }
            Broker::Kafka => Target::Kafka(Box::new(dlq::kafka::Target::new(
                &config.kafka,
                self.topic.clone(),
                self.group.clone(),
            )?)),
        })
    }

    pub async fn run(self, config: &Config) -> anyhow::Result<()> {
        let target = self.target(config)?;
        let stdout = std::io::stdout();
        let show = matches!(self.command, DlqCommand::Show { .. });
        match self.command {
            DlqCommand::Stats { filter, json } => {
                let f = filter.filter();
                let mut stats = Stats {
                    destination: target.name(),
                    ..Stats::default()
                };
                target
                    .browse(|m| {
                        if f.matches(&m) {
                            stats.add(&m);
                        }
                    })
                    .await?;
                if json {
                    println!("{}", serde_json::to_string(&stats)?);
                } else {
                    print!("{}", stats.render());
                }
            }
            DlqCommand::List {
                filter,
                limit,
                json,
            }
            | DlqCommand::Show {
                filter,
                limit,
                json,
            } => {
                let f = filter.filter();
                let mut n = 0u64;
                let mut out = stdout.lock();
                let mut failed = None;
                target
                    .browse(|m| {
                        if !f.matches(&m) || limit.is_some_and(|l| n >= l) || failed.is_some() {
                            return;
                        }
                        n += 1;
                        let line = if json {
                            serde_json::to_string(&m).unwrap_or_default()
                        } else if show {
                            dlq::show_block(&m)
                        } else {
                            dlq::list_line(&m)
                        };
                        if let Err(e) = writeln!(out, "{line}") {
                            failed = Some(e);
                        }
                    })
                    .await?;
                if let Some(e) = failed {
                    return Err(e.into());
                }
                if !json {
                    eprintln!("{n} dead letters listed from {}", target.name());
                }
            }
            DlqCommand::Replay {
                filter,
                limit,
                rate,
                dry_run,
            } => {
                let opts = MoveOpts {
                    filter: filter.filter(),
                    limit,
                    rate,
                    dry_run,
                };
                let verb = if dry_run { "would replay" } else { "replayed" };
                let report = target
                    .move_matching(Action::Replay, &opts, |m| {
                        if dry_run {
                            println!("{}", dlq::list_line(m));
                        }
                    })
                    .await?;
                println!(
                    "{verb} {} of {} dead letters examined in {} ({} left in place)",
                    report.moved,
                    report.examined,
                    target.name(),
                    report.kept
                );
            }
            DlqCommand::Purge {
                filter,
                limit,
                yes,
                dry_run,
            } => {
                let opts = MoveOpts {
                    filter: filter.filter(),
                    limit,
                    rate: None,
                    dry_run: true,
                };
                if !yes || dry_run {
                    let would = target.move_matching(Action::Purge, &opts, |_| {}).await?;
                    if dry_run {
                        println!(
                            "would purge {} of {} dead letters in {}",
                            would.moved,
                            would.examined,
                            target.name()
                        );
                        return Ok(());
                    }
                    if would.moved == 0 {
                        println!("nothing to purge in {}", target.name());
                        return Ok(());
                    }
                    confirm(&format!(
                        "purge {} dead letters from {} for good?",
                        would.moved,
                        target.name()
                    ))?;
                }
                let report = target
                    .move_matching(
                        Action::Purge,
                        &MoveOpts {
                            dry_run: false,
                            ..opts
                        },
                        |_| {},
                    )
                    .await?;
                println!(
                    "purged {} of {} dead letters examined in {}",
                    report.moved,
                    report.examined,
                    target.name()
                );
            }
        }
        Ok(())
    }
}

/// Asks on the terminal; refuses without one (scripts pass `--yes`).
fn confirm(question: &str) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    anyhow::ensure!(
        stdin.is_terminal(),
        "{question} Refusing without a terminal to confirm on: pass --yes"
    );
    eprint!("{question} Type yes to go on: ");
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    anyhow::ensure!(answer.trim() == "yes", "not confirmed; nothing purged");
    Ok(())
}
