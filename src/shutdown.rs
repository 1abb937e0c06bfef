//! Signals → cancellation. The first SIGTERM or SIGINT cancels the root
//! token (the drain starts); a second one exits at once, leaving whatever is
//! unfinished unacknowledged for the broker to redeliver.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Exit code after a second signal cut the drain short (128 + SIGINT).
pub const EXIT_FORCED: i32 = 130;

/// Installs the handlers now (so no signal is missed) and returns the token
/// the first signal cancels.
pub fn install() -> std::io::Result<CancellationToken> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let token = CancellationToken::new();
    let first = token.clone();
    tokio::spawn(async move {
        for count in 1.. {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if count == 1 {
                tracing::info!(signal = name, "draining; a second signal exits at once");
                first.cancel();
            } else {
                tracing::warn!(signal = name, "second signal; exiting without draining");
                std::process::exit(EXIT_FORCED);
            }
        }
    });
    Ok(token)
}
