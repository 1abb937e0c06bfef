//! `conveyor export`: stored orders streamed from the store to stdout or a
//! file as NDJSON or CSV, with flat memory (the same streaming query as
//! `GET /orders` of `conveyor ingest`), and a progress bar on a terminal.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use futures::StreamExt as _;

use crate::config::Config;
use crate::store::read::{Filter, StoredOrder};
use crate::store::Store;

/// Output encoding of stored orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per line; `reasons` and `payload` embedded as JSON.
    #[default]
    Ndjson,
    /// RFC 4180, with a header line; `reasons` and `payload` as JSON text.
    Csv,
}

const CSV_HEADER: &str = "order_id,status,customer_id,amount_cents,currency,charge_id,reasons,\
source_position,received_at,committed_at,payload\r\n";

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Ndjson => "application/x-ndjson",
            Format::Csv => "text/csv; charset=utf-8",
        }
    }

    /// What goes out before the first row.
    pub fn header(self) -> &'static [u8] {
        match self {
            Format::Ndjson => b"",
            Format::Csv => CSV_HEADER.as_bytes(),
        }
    }

    /// Appends one row, with its line ending.
    pub fn encode(self, row: &StoredOrder, out: &mut Vec<u8>) {
        match self {
            Format::Ndjson => {
                out.extend_from_slice(&row.to_json());
                out.push(b'\n');
            }
            Format::Csv => {
                let amount = row.amount_cents.to_string();
                let fields = [
                    row.order_id.as_str(),
                    &row.status,
                    &row.customer_id,
                    &amount,
                    &row.currency,
                    row.charge_id.as_deref().unwrap_or(""),
                    &row.reasons,
                    &row.source_position,
                    &row.received_at,
                    &row.committed_at,
                    &row.payload,
                ];
                for (i, f) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    csv_field(f, out);
                }
                out.extend_from_slice(b"\r\n");
            }
        }
    }
}

/// RFC 4180: a field holding a comma, quote or line break is quoted, its
/// quotes doubled.
fn csv_field(f: &str, out: &mut Vec<u8>) {
    if f.bytes().any(|b| matches!(b, b',' | b'"' | b'\n' | b'\r')) {
        out.push(b'"');
        for b in f.bytes() {
            if b == b'"' {
                out.push(b'"');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        out.extend_from_slice(f.as_bytes());
    }
}

/// What `conveyor export` was asked for.
#[derive(Debug, Clone, Default)]
pub struct ExportArgs {
    pub filter: Filter,
    pub format: Format,
    /// `None`: stdout.
    pub output: Option<PathBuf>,
    pub quiet: bool,
}

/// How an export ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    /// Rows encoded (with `reader_gone`, not all of them reached the reader).
    pub rows: u64,
    /// The reader closed the pipe first (`| head`): the export stopped
    /// there, and its query with it.
    pub reader_gone: bool,
}

/// Exit code of an export whose reader closed the pipe: what a process
/// killed by SIGPIPE reports (128 + 13), quietly, as `seq | head` does.
pub const EXIT_READER_GONE: u8 = 141;

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Streams the matching orders out. A closed stdout (`| head`) ends the
/// export, and with it the query.
pub async fn run(config: &Config, args: ExportArgs) -> anyhow::Result<Exported> {
    let store = Store::connect(&config.database).await?;
    let to_terminal = args.output.is_none() && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let bar = if args.quiet || to_terminal || !std::io::IsTerminal::is_terminal(&std::io::stderr())
    {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr())
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {human_pos} orders {per_sec:0} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    let sink: Box<dyn std::io::Write + Send> = match &args.output {
        None => Box::new(std::io::stdout()),
        Some(path) => Box::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        ),
    };
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, sink);
    let started = Instant::now();
    let mut rows = store.stream_orders(args.filter.clone()).ready_chunks(512);
    out.write_all(args.format.header())?;
    let mut n = 0u64;
    let mut buf = Vec::with_capacity(128 * 1024);
    let result: anyhow::Result<()> = async {
        while let Some(chunk) = rows.next().await {
            buf.clear();
            for row in chunk {
                let row = row.context("reading stored orders")?;
                args.format.encode(&row, &mut buf);
                n += 1;
            }
            // Blocking writes on the runtime thread: export is a one-task
            // program, and a slow reader must slow the query down anyway.
            out.write_all(&buf).context("writing the export")?;
            bar.set_position(n);
        }
        out.flush().context("writing the export")?;
        Ok(())
    }
    .await;
    drop(rows);
    bar.finish_and_clear();
    store.close().await;
    if let Err(e) = result {
        if is_broken_pipe(&e) {
            tracing::debug!(rows = n, "the reader closed the pipe; export stopped");
            return Ok(Exported {
                rows: n,
                reader_gone: true,
            });
        }
        return Err(e);
    }
    tracing::info!(
        rows = n,
        secs = started.elapsed().as_secs_f64(),
        "export finished"
    );
    Ok(Exported {
        rows: n,
        reader_gone: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_only_what_needs_it() {
        let mut out = Vec::new();
        csv_field("plain", &mut out);
        out.push(b'|');
        csv_field("{\"a\":1,\"b\":2}", &mut out);
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "plain|\"{\"\"a\"\":1,\"\"b\"\":2}\""
        );
    }
}
