//! `conveyor export`.

use std::path::PathBuf;

use chrono::{DateTime, Utc};

use super::parse_time;
use crate::config::Config;
use crate::store::read::Filter;
use crate::store::Status;
use crate::tools::export::{self, ExportArgs, Format};

/// `conveyor export`.
#[derive(Debug, clap::Args)]
pub struct ExportCli {
    #[arg(long, value_enum, default_value = "ndjson")]
    format: Format,
    /// Only orders with this status: accepted, rejected or declined.
    #[arg(long)]
    status: Option<Status>,
    /// Only orders committed at or after this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    since: Option<DateTime<Utc>>,
    /// Only orders committed before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    until: Option<DateTime<Utc>>,
    /// Write here instead of stdout.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

impl ExportCli {
    /// Returns the exit code: 0, or [`export::EXIT_READER_GONE`] when the
    /// reader closed the pipe first.
    pub async fn run(self, config: &Config) -> anyhow::Result<u8> {
        let done = export::run(
            config,
            ExportArgs {
                filter: Filter {
                    status: self.status,
                    since: self.since,
                    until: self.until,
                },
                format: self.format,
                output: self.output.clone(),
                quiet: self.quiet,
            },
        )
        .await?;
        if done.reader_gone {
            return Ok(export::EXIT_READER_GONE);
        }
        if let Some(path) = &self.output {
            eprintln!("exported {} orders to {}", done.rows, path.display());
        }
        Ok(0)
    }
}
