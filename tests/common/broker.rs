//! What RabbitMQ itself reports, through its CLI (`rabbitmqctl`), run as a
//! `tokio::process` child so that the async workers keep serving the
//! daemon under test meanwhile.

use conveyor::config::QueueType;
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

/// One daemon's consume channel as RabbitMQ reports it. The channel is
/// found through its consumer (`tag`, or `tag.N` after a swap) and then
/// remembered, so that it is still read while a quorum queue's consumer is
/// being swapped and the channel has none.
pub struct ConsumerChannel {
    queue: String,
    tag: &'static str,
    queue_type: QueueType,
    pid: Option<String>,
    /// The consumer's own prefetch, last seen.
    consumer_prefetch: u64,
}

impl ConsumerChannel {
    pub fn new(queue: &str, tag: &'static str, queue_type: QueueType) -> Self {
        Self {
            queue: queue.to_string(),
            tag,
            queue_type,
            pid: None,
            consumer_prefetch: 0,
        }
    }

    /// `(unacknowledged, prefetch that follows)`: the prefetch is the
    /// channel's on a classic queue, the consumer's on a quorum queue.
    /// `None` until the consumer has shown up.
    pub async fn read(&mut self) -> Option<(u64, u64)> {
        let consumers = rabbitmqctl(&[
            "list_consumers",
            "-q",
            "--no-table-headers",
            "queue_name",
            "channel_pid",
            "consumer_tag",
            "prefetch_count",
        ])
        .await
        .expect("rabbitmqctl list_consumers");
        let swapped = format!("{}.", self.tag);
        if let Some((pid, prefetch)) = consumers.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4 && f[0] == self.queue && (f[2] == self.tag || f[2].starts_with(&swapped)))
                .then(|| Some((f[1].to_string(), f[3].parse::<u64>().ok()?)))?
        }) {
            self.pid = Some(pid);
            self.consumer_prefetch = prefetch;
        }
        let pid = self.pid.as_deref()?;
        let channels = rabbitmqctl(&[
            "list_channels",
            "-q",
            "--no-table-headers",
            "pid",
            "messages_unacknowledged",
            "global_prefetch_count",
        ])
        .await
        .expect("rabbitmqctl list_channels");
        channels.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[0] == pid).then(|| {
                let held = f[1].parse().ok()?;
                Some(match self.queue_type {
                    QueueType::Classic => (held, f[2].parse().ok()?),
                    QueueType::Quorum => (held, self.consumer_prefetch),
                })
            })?
        })
    }
}
