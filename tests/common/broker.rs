//! What RabbitMQ itself reports, through its CLI (`rabbitmqctl`), run as a
//! `tokio::process` child so that the async workers keep serving the
//! daemon under test meanwhile.

use tokio::process::Command;

/// Runs `rabbitmqctl` with `args`; its stdout, or what went wrong.
pub async fn rabbitmqctl(args: &[&str]) -> Result<String, String> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("rabbitmqctl {args:?}: {e} (RabbitMQ's CLI must be installed)"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "rabbitmqctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Unacknowledged messages of a queue, as RabbitMQ itself reports them.
pub async fn unacked(queue: &str) -> u64 {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_unacknowledged",
        ])
        .kill_on_drop(true)
        .output()
        .await
        .expect("run rabbitmqctl (RabbitMQ's CLI must be installed)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next()? == queue).then(|| parts.next()?.parse().ok())?
        })
        .next()
        .unwrap_or(0)
}
