//! The `conveyor` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use conveyor::config::Config;
use conveyor::telemetry;
use conveyor::tools::cli::{DemoCli, DlqCli, ExportCli, ProduceCli, SimulateCli};

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
    Simulate(SimulateCli),
    /// Publish generated orders to RabbitMQ or Kafka, as a load generator.
    Produce(ProduceCli),
    /// Run the whole daemon on embedded defaults (in-process Kafka mock
    /// cluster, SQLite, the simulator) over a load of orders, then check it.
    Demo(DemoCli),
    /// Serve the HTTP intake (POST /orders/batch, GET /orders) in front of
    /// the broker, until SIGTERM/SIGINT, then drain.
    Ingest,
    /// Stream stored orders out as NDJSON or CSV.
    Export(ExportCli),
    /// Inspect, replay or purge the dead letters of either broker.
    Dlq(DlqCli),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("conveyor: {e}");
            return ExitCode::from(conveyor::EXIT_BAD_CONFIG);
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
            Command::Simulate(a) => a.run().await.map(|()| 0),
            Command::Produce(a) => a.run(&config).await.map(|()| 0),
            Command::Ingest => {
                let stop = conveyor::shutdown::install()?;
                conveyor::tools::ingest::run(config, stop.cancelled_owned(), None)
                    .await
                    .map(|()| 0)
            }
            Command::Export(a) => a.run(&config).await,
            Command::Dlq(a) => a.run(&config).await.map(|()| 0),
            Command::Demo(a) => a.run().await.map(|()| 0),
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
