//! The Kafka dead-letter topic. A log cannot drop one message, so what has
//! *left* the dead-letter topic is what lies below the committed offsets of
//! a replay consumer group (`<kafka.group_id>.dlq-replay` unless `--group`
//! says otherwise); `stats`, `list` and `show` read from those offsets to
//! the end. The end is where a fetch finds it (partition EOF), not what
//! ListOffsets says: some brokers answer that short (tansu 0.6 gives one
//! past the *first* offset of the last record batch), which would hide the
//! newest dead letters.
//!
//! `replay` and `purge` first scan up to the current end and pick the
//! matching messages (up to `--limit`). Then, per partition, up to its last
//! picked message: a picked one is produced to the source topic (`replay`)
//! or dropped (`purge`); one that is not picked but lies in the way is
//! copied to the end of the dead-letter topic, so that it stays there. The
//! group's offset is committed only once every produce below it is
//! acknowledged (`acks=all`, idempotent), so a replay killed at any point
//! loses nothing: what was not yet committed is found again by the next
//! run (at worst replayed twice — a no-op downstream — or kept twice).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::{Action, DeadLetterMsg, MoveOpts, MoveReport, Pace, REPLAYED_AT, REPLAYS};
use crate::config::KafkaConfig;
use crate::source::kafka::producer_config;

const TIMEOUT: Duration = Duration::from_secs(10);
/// Offsets are committed at least this often during a replay.
const COMMIT_EVERY: u64 = 100;

/// Where `dlq` works on Kafka.
#[derive(Debug, Clone)]
pub struct Target {
    pub cfg: KafkaConfig,
    pub source_topic: String,
    pub dead_letter_topic: String,
    pub group: String,
}

impl Target {
    pub fn new(
        cfg: &KafkaConfig,
        topic: Option<String>,
        group: Option<String>,
    ) -> anyhow::Result<Self> {
        let source_topic = topic
            .or_else(|| cfg.topics.first().cloned())
            .ok_or_else(|| anyhow::anyhow!("no Kafka topic: give --topic or kafka.topics"))?;
        Ok(Self {
            dead_letter_topic: cfg.dead_letter_topic(&source_topic),
            group: group.unwrap_or_else(|| format!("{}.dlq-replay", cfg.group_id)),
            source_topic,
            cfg: cfg.clone(),
        })
    }

    fn consumer(&self) -> anyhow::Result<Arc<StreamConsumer>> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.cfg.brokers)
            .set("group.id", &self.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        for (k, v) in &self.cfg.properties {
            // The daemon's group settings are not the replay group's.
            if !k.starts_with("group.") && !k.starts_with("enable.auto") {
                c.set(k, v);
            }
        }
        // The end of each partition is found by fetching (see the module's
        // doc); an offset gone by retention restarts at the oldest kept.
        c.set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest");
        Ok(Arc::new(
            c.create().context("creating the dead-letter consumer")?,
        ))
    }
}

/// Per partition of the dead-letter topic: where the replay group stands
/// (its committed offset, or the oldest message kept).
async fn starts(t: &Target, consumer: &Arc<StreamConsumer>) -> anyhow::Result<BTreeMap<i32, i64>> {
    let c = consumer.clone();
    let topic = t.dead_letter_topic.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<BTreeMap<i32, i64>> {
        let md = c
            .fetch_metadata(Some(&topic), TIMEOUT)
            .with_context(|| format!("reading the metadata of {topic}"))?;
        let partitions: Vec<i32> = md
            .topics()
            .iter()
            .filter(|m| m.name() == topic && m.error().is_none())
            .flat_map(|m| m.partitions().iter().map(|p| p.id()))
            .collect();
        anyhow::ensure!(
            !partitions.is_empty(),
            "the dead-letter topic {topic} does not exist (or has no partitions)"
        );
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition(&topic, *p);
        }
        let committed = c
            .committed_offsets(tpl, TIMEOUT)
            .context("reading the replay group's committed offsets")?;
        let mut out = BTreeMap::new();
        for e in committed.elements() {
            let (low, _) = c
                .fetch_watermarks(&topic, e.partition(), TIMEOUT)
                .with_context(|| format!("reading the watermarks of {topic}/{}", e.partition()))?;
            let start = match e.offset() {
                Offset::Offset(o) => o.max(low),
                _ => low,
            };
            out.insert(e.partition(), start);
        }
        Ok(out)
    })
    .await
    .context("the metadata task failed")?
}

fn to_letter(m: &rdkafka::message::BorrowedMessage<'_>) -> DeadLetterMsg {
    let mut headers = BTreeMap::new();
    if let Some(h) = m.headers() {
        for h in h.iter() {
            headers.insert(
                h.key.to_string(),
                h.value
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default(),
            );
        }
    }
    let raw = m.payload().unwrap_or_default().to_vec();
    DeadLetterMsg {
        position: format!("{}/{}@{}", m.topic(), m.partition(), m.offset()),
        headers,
        body: String::from_utf8_lossy(&raw).into_owned(),
        raw,
        key: m.key().map(<[u8]>::to_vec),
    }
}

/// Reads every partition from `from[p]`, calling `each(partition, offset,
/// letter)` in order per partition: up to (not including) `to[p]` when
/// `to` is given, else to the end of the log as the fetch finds it.
/// Returns, per partition, one past the last offset read (its start when
/// nothing was).
async fn read_range(
    t: &Target,
    consumer: &Arc<StreamConsumer>,
    from: &BTreeMap<i32, i64>,
    to: Option<&BTreeMap<i32, i64>>,
    mut each: impl AsyncFnMut(i32, i64, DeadLetterMsg) -> anyhow::Result<()>,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let bound = |p: i32| to.map(|to| to.get(&p).copied().unwrap_or(0));
    let mut reached = from.clone();
    let mut tpl = TopicPartitionList::new();
    let mut open: HashSet<i32> = HashSet::new();
    for (&p, &start) in from {
        if bound(p).is_none_or(|end| start < end) {
            tpl.add_partition_offset(&t.dead_letter_topic, p, Offset::Offset(start))
                .context("building the assignment")?;
            open.insert(p);
        }
    }
    if open.is_empty() {
        return Ok(reached);
    }
    consumer
        .assign(&tpl)
        .context("assigning the dead-letter partitions")?;
    while !open.is_empty() {
        let next = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .map_err(|_| anyhow::anyhow!("no message from {} for 30 s", t.dead_letter_topic))?;
        let m = match next {
            Ok(m) => m,
            // The end of the log, for a read that has no bound of its own
            // (a bounded read ends on its last offset, which exists).
            Err(KafkaError::PartitionEOF(p)) => {
                if to.is_none() {
                    open.remove(&p);
                }
                continue;
            }
            Err(e) => return Err(e).context("reading the dead-letter topic"),
        };
        let (p, o) = (m.partition(), m.offset());
        if !open.contains(&p) {
            continue;
        }
        if bound(p).is_some_and(|end| o >= end) {
            open.remove(&p);
            continue;
        }
        let letter = to_letter(&m);
        drop(m);
        each(p, o, letter).await?;
        reached.insert(p, o + 1);
        if bound(p).is_some_and(|end| o + 1 >= end) {
            open.remove(&p);
        }
    }
    consumer.unassign().ok();
    Ok(reached)
}

/// Calls `each` on every dead letter not yet replayed, changing nothing.
pub async fn browse(t: &Target, mut each: impl FnMut(DeadLetterMsg)) -> anyhow::Result<()> {
    let consumer = t.consumer()?;
    let from = starts(t, &consumer).await?;
    read_range(t, &consumer, &from, None, async |_, _, m| {
        each(m);
        Ok(())
    })
    .await
    .map(|_| ())
}

fn headers_of(m: &DeadLetterMsg, replayed: bool) -> OwnedHeaders {
    let mut h = OwnedHeaders::new();
    for (k, v) in &m.headers {
        if replayed && (k == REPLAYED_AT || k == REPLAYS) {
            continue;
        }
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    if replayed {
        let at = chrono::Utc::now().to_rfc3339();
        let n = (m.replays() + 1).to_string();
        h = h
            .insert(Header {
                key: REPLAYED_AT,
                value: Some(at.as_bytes()),
            })
            .insert(Header {
                key: REPLAYS,
                value: Some(n.as_bytes()),
            });
    }
    h
}

async fn produce(
    producer: &FutureProducer,
    topic: &str,
    m: &DeadLetterMsg,
    replayed: bool,
) -> anyhow::Result<()> {
    let mut record = FutureRecord::to(topic)
        .payload(m.raw.as_slice())
        .headers(headers_of(m, replayed));
    if let Some(k) = &m.key {
        record = record.key(k.as_slice());
    }
    producer
        .send(record, TIMEOUT)
        .await
        .map(|_| ())
        .map_err(|(e, _)| anyhow::anyhow!("producing {} to {topic}: {e}", m.position))
}

fn commit(t: &Target, consumer: &StreamConsumer, done: &HashMap<i32, i64>) -> anyhow::Result<()> {
    if done.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for (&p, &next) in done {
        tpl.add_partition_offset(&t.dead_letter_topic, p, Offset::Offset(next))
            .context("building the commit")?;
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .context("committing the replay group's offsets")
}

/// Replays or purges the matching dead letters (see the module's doc).
pub async fn move_matching(
    t: &Target,
    action: Action,
    opts: &MoveOpts,
    mut on_moved: impl FnMut(&DeadLetterMsg),
) -> anyhow::Result<MoveReport> {
    let consumer = t.consumer()?;
    let from = starts(t, &consumer).await?;

    // The scan: which offsets are picked.
    let mut picked: HashSet<(i32, i64)> = HashSet::new();
    let mut report = MoveReport::default();
    read_range(t, &consumer, &from, None, async |p, o, m| {
        report.examined += 1;
        let under_limit = opts.limit.is_none_or(|l| report.moved < l);
        if under_limit && opts.filter.matches(&m) {
            picked.insert((p, o));
            report.moved += 1;
            if opts.dry_run {
                on_moved(&m);
            }
        } else {
            report.kept += 1;
        }
        Ok(())
    })
    .await?;
    if opts.dry_run || picked.is_empty() {
        return Ok(report);
    }

    // The move, per partition up to its last picked offset.
    let mut last: BTreeMap<i32, i64> = BTreeMap::new();
    for &(p, o) in &picked {
        let e = last.entry(p).or_insert(o);
        *e = (*e).max(o);
    }
    let to: BTreeMap<i32, i64> = last.iter().map(|(p, o)| (*p, o + 1)).collect();
    let from: BTreeMap<i32, i64> = from
        .into_iter()
        .filter(|(p, _)| to.contains_key(p))
        .collect();
    let producer: FutureProducer = producer_config(&t.cfg)
        .create()
        .context("creating the replay producer")?;
    let pace = Pace::new(opts.rate);
    let mut done: HashMap<i32, i64> = HashMap::new();
    let mut since_commit = 0u64;
    let mut moved = 0u64;
    read_range(t, &consumer, &from, Some(&to), async |p, o, m| {
        if picked.contains(&(p, o)) {
            pace.wait(moved).await;
            if action == Action::Replay {
                produce(&producer, &t.source_topic, &m, true).await?;
            }
            moved += 1;
            on_moved(&m);
        } else {
            // In the way of a later picked message: keep it by copying it
            // to the end before the offset moves past it.
            produce(&producer, &t.dead_letter_topic, &m, false).await?;
        }
        done.insert(p, o + 1);
        since_commit += 1;
        if since_commit >= COMMIT_EVERY {
            commit(t, &consumer, &done)?;
            since_commit = 0;
        }
        Ok(())
    })
    .await?;
    commit(t, &consumer, &done)?;
    report.moved = moved;
    Ok(report)
}
