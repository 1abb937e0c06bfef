//! systemd integration (`Type=notify`): `READY=1` once the broker and the
//! database are connected, `STOPPING=1` when the drain starts, `WATCHDOG=1`
//! at half the watchdog interval while the runtime turns. Every call is a
//! no-op outside systemd (no `NOTIFY_SOCKET`).

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn send(state: NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(false, &[state]) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

pub fn ready() {
    send(NotifyState::Ready);
}

pub fn stopping() {
    send(NotifyState::Stopping);
}

/// The watchdog interval the service manager asked for, if any.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0u64;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog until `stop`. The pings come from a task on the same
/// runtime as the pipeline, so a wedged runtime stops them and systemd
/// restarts the service.
pub fn spawn_watchdog(stop: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
    let interval = watchdog_interval()?;
    let period = (interval / 2).max(Duration::from_millis(10));
    tracing::info!(?interval, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => send(NotifyState::Watchdog),
            }
        }
    }))
}
