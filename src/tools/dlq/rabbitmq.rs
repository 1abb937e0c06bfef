//! The RabbitMQ dead-letter queue. Reading is `basic.get` without
//! auto-ack: every message taken stays unacknowledged on the tool's channel
//! (so it is not handed out twice in one pass) and is requeued, in place,
//! at the end or when the connection drops. A pass looks at no more than
//! the queue held when it started, so letters the daemon adds meanwhile
//! (a replayed order that is still poison) are left for the next pass.

use std::collections::BTreeMap;

use anyhow::Context as _;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection};

use super::{Action, DeadLetterMsg, MoveOpts, MoveReport, Pace, REPLAYED_AT, REPLAYS};
use crate::config::RabbitConfig;
use crate::tools::produce::{connect_rabbit, ConfirmChannel};

fn text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

/// How long closing the channel and connection may take at the end of a
/// pass.
const CLOSE_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A pass over the queue on one channel.
struct Pass {
    connection: Connection,
    channel: Channel,
    queue: ShortString,
    /// Messages in the queue when the pass began: the most it looks at.
    budget: u32,
    taken: u32,
    /// Delivery tags taken and not acknowledged, for the final requeue.
    held: std::collections::BTreeSet<u64>,
}

impl Pass {
    async fn open(cfg: &RabbitConfig) -> anyhow::Result<Self> {
        // No declare: the tools must not create queues that are not there.
        let mut quiet = cfg.clone();
        quiet.declare = false;
        let connection = connect_rabbit(&quiet).await?;
        let channel = connection.create_channel().await?;
        let name = cfg.dead_letter_queue();
        let queue = ShortString::try_new(name.as_str())
            .map_err(|_| anyhow::anyhow!("the dead-letter queue name is longer than 255 bytes"))?;
        let q = channel
            .queue_declare(
                queue.clone(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("the dead-letter queue {name:?} (does it exist?)"))?;
        Ok(Self {
            connection,
            channel,
            queue,
            budget: q.message_count(),
            taken: 0,
            held: std::collections::BTreeSet::new(),
        })
    }

    /// The next message, unacknowledged; `None` at the end of the pass.
    async fn next(
        &mut self,
    ) -> anyhow::Result<Option<(u64, DeadLetterMsg, lapin::BasicProperties)>> {
        if self.taken >= self.budget {
            return Ok(None);
        }
        let Some(got) = self
            .channel
            .basic_get(self.queue.clone(), BasicGetOptions { no_ack: false })
            .await
            .context("basic.get on the dead-letter queue")?
        else {
            return Ok(None);
        };
        let d = got.delivery;
        let position = format!("#{}", self.taken);
        self.taken += 1;
        self.held.insert(d.delivery_tag);
        let headers: BTreeMap<String, String> = d
            .properties
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .map(|(k, v)| (k.to_string(), text(v)))
                    .collect()
            })
            .unwrap_or_default();
        let msg = DeadLetterMsg {
            position,
            headers,
            body: String::from_utf8_lossy(&d.data).into_owned(),
            raw: d.data,
            key: None,
        };
        Ok(Some((d.delivery_tag, msg, d.properties)))
    }

    async fn ack(&mut self, tag: u64) -> anyhow::Result<()> {
        self.channel
            .basic_ack(tag, BasicAckOptions { multiple: false })
            .await
            .context("acknowledging on the dead-letter queue")?;
        self.held.remove(&tag);
        Ok(())
    }

    /// Puts back every message still held, in place, and closes. The
    /// requeue names the highest tag still held: naming one already
    /// acknowledged (the last message of a purge or a replay) is a channel
    /// error, `unknown delivery tag`.
    async fn finish(self) -> anyhow::Result<()> {
        if let Some(&tag) = self.held.last() {
            self.channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await
                .context("requeueing the dead letters looked at")?;
        }
        // Bounded: a close the broker does not answer must not hold the
        // command, whose work is done (the broker requeues what is held
        // when the connection drops).
        let close = async {
            self.channel.close(200, "done".into()).await.ok();
            self.connection.close(200, "done".into()).await.ok();
        };
        let _ = tokio::time::timeout(CLOSE_LIMIT, close).await;
        Ok(())
    }
}

/// Calls `each` on every dead letter, changing nothing.
pub async fn browse(cfg: &RabbitConfig, mut each: impl FnMut(DeadLetterMsg)) -> anyhow::Result<()> {
    let mut pass = Pass::open(cfg).await?;
    while let Some((_, msg, _)) = pass.next().await? {
        each(msg);
    }
    pass.finish().await
}

/// Replays or purges the matching dead letters.
pub async fn move_matching(
    cfg: &RabbitConfig,
    action: Action,
    opts: &MoveOpts,
    mut on_moved: impl FnMut(&DeadLetterMsg),
) -> anyhow::Result<MoveReport> {
    let mut pass = Pass::open(cfg).await?;
    let publish = match action {
        Action::Replay if !opts.dry_run => Some(ConfirmChannel::open(&pass.connection).await?),
        _ => None,
    };
    let pace = Pace::new(opts.rate);
    let mut report = MoveReport::default();
    let result: anyhow::Result<()> = async {
        while let Some((tag, msg, props)) = pass.next().await? {
            report.examined += 1;
            let under_limit = opts.limit.is_none_or(|l| report.moved < l);
            if !under_limit || !opts.filter.matches(&msg) {
                report.kept += 1;
                continue;
            }
            pace.wait(report.moved).await;
            if !opts.dry_run {
                if let Some(ch) = &publish {
                    let props = replay_properties(props, &msg);
                    let confirm = ch.publish("", &cfg.queue, &msg.raw, props).await?;
                    confirm
                        .await
                        .with_context(|| format!("republishing dead letter {}", msg.position))?;
                }
                // Only now, with the republish confirmed, does it leave.
                pass.ack(tag).await?;
            }
            report.moved += 1;
            on_moved(&msg);
        }
        Ok(())
    }
    .await;
    if let Some(ch) = publish {
        ch.close().await;
    }
    let finished = pass.finish().await;
    result?;
    finished?;
    Ok(report)
}

/// The original properties, headers kept, marked as replayed.
fn replay_properties(props: lapin::BasicProperties, msg: &DeadLetterMsg) -> lapin::BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    let mut put = |k: &str, v: String| {
        headers.insert(
            ShortString::from(k),
            AMQPValue::LongString(LongString::from(v.into_bytes())),
        );
    };
    put(REPLAYED_AT, chrono::Utc::now().to_rfc3339());
    put(REPLAYS, (msg.replays() + 1).to_string());
    ConfirmChannel::properties(headers)
}
