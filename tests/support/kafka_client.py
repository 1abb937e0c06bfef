"""An independent Kafka client for conveyor's tests: confluent-kafka (its own
librdkafka build, with TLS and every codec), from the virtualenv that
scripts/setup makes.

    python kafka_client.py write BROKERS TOPIC CODEC < records.ndjson
        produces each line {"key": str, "value": str} with acks=all and
        compression.type=CODEC; prints {"written": N, "ends": {partition: end}}
        (end: one past the highest offset acknowledged)
    python kafka_client.py read BROKERS TOPIC COUNT TIMEOUT_S
        reads COUNT records from the beginning of every partition (assigned,
        no group); prints
        one {"key", "value", "partition", "offset", "headers"} line each

Extra librdkafka properties come from KAFKA_PROPS as a JSON object (TLS).
Exits non-zero with the reason on stderr if anything fails.
"""

import json
import os
import sys
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition


def props(brokers):
    p = {"bootstrap.servers": brokers}
    p.update(json.loads(os.environ.get("KAFKA_PROPS", "{}")))
    return p


def write(brokers, topic, codec):
    failures = []
    ends = {}

    def report(err, msg):
        if err is not None:
            failures.append(str(err))
        else:
            ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)

    p = props(brokers)
    p.update({"acks": "all", "compression.type": codec, "linger.ms": 20})
    producer = Producer(p)
    n = 0
    for line in sys.stdin:
        if not line.strip():
            continue
        rec = json.loads(line)
        while True:
            try:
                producer.produce(topic, key=rec["key"], value=rec["value"], on_delivery=report)
                break
            except BufferError:
                producer.poll(0.1)
        n += 1
    left = producer.flush(60)
    if failures or left:
        sys.exit(f"write to {topic}: {left} undelivered, failures {failures[:3]}")
    print(json.dumps({"written": n, "ends": ends}))


def read(brokers, topic, count, timeout):
    p = props(brokers)
    p.update({
        "group.id": f"conveyor-test-reader-{os.getpid()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    consumer = Consumer(p)
    # Assigned, not subscribed: no group join to wait for.
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    if meta.error is not None:
        sys.exit(f"read {topic}: {meta.error}")
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    deadline = time.monotonic() + timeout
    got = 0
    try:
        while got < count:
            if time.monotonic() > deadline:
                sys.exit(f"read {topic}: {got} of {count} records within {timeout} s")
            m = consumer.poll(0.5)
            if m is None:
                continue
            if m.error():
                raise KafkaException(m.error())
            print(json.dumps({
                "key": (m.key() or b"").decode(),
                "value": (m.value() or b"").decode(errors="replace"),
                "partition": m.partition(),
                "offset": m.offset(),
                "headers": {k: (v or b"").decode(errors="replace") for k, v in (m.headers() or [])},
            }), flush=True)
            got += 1
    finally:
        consumer.close()


def main():
    cmd = sys.argv[1]
    if cmd == "write":
        write(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "read":
        read(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
