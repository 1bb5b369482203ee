"""Compacted topics against Weir, with confluent-kafka (librdkafka).

  create BOOTSTRAP TOPIC DELETE_RETENTION_MS
                          a compacted topic (cleanup.policy=compact, every batch but
                          the last cleanable at once); DescribeConfigs reports it
  produce BOOTSTRAP TOPIC N KEYS FIRST PAUSE_EVERY
                          N records, key k<i % KEYS>, value v<i> (i from FIRST),
                          idempotent, acks=all, pausing 10 ms after every PAUSE_EVERY
                          (0: never), riding through broker restarts; prints
                          "latest KEY OFFSET VALUE" per key from the delivery reports
  keyless BOOTSTRAP TOPIC a record without a key is refused (INVALID_RECORD)
  read BOOTSTRAP TOPIC    every record from the start to the end: "OFFSET KEY VALUE",
                          NULL for a tombstone's value

Exits non-zero with a message on any mismatch. Every wait is bounded."""
import sys
import time

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic


def fail(msg):
    print("FAIL: " + msg, flush=True)
    sys.exit(1)


def create(bootstrap, topic, delete_retention_ms):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    config = {
        "cleanup.policy": "compact",
        "segment.bytes": "14",
        "min.cleanable.dirty.ratio": "0.01",
        "delete.retention.ms": delete_retention_ms,
    }
    futures = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1,
                                            config=config)])
    futures[topic].result(timeout=30)
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    described = admin.describe_configs([resource])[resource].result(timeout=30)
    for key, want in config.items():
        got = described[key].value
        if got != want:
            fail(f"{key} is {got!r}, not {want!r}")
    print("OK create", flush=True)


def produce(bootstrap, topic, n, keys, first, pause_every):
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                  "acks": "all", "linger.ms": 5})
    latest, errors = {}, []

    def report(err, msg):
        if err is not None:
            errors.append(str(err))
            return
        key = msg.key().decode()
        if key not in latest or latest[key][0] < msg.offset():
            latest[key] = (msg.offset(), msg.value().decode())

    for i in range(first, first + n):
        p.produce(topic, key=f"k{i % keys}", value=f"v{i}", on_delivery=report)
        p.poll(0)
        if pause_every and (i - first + 1) % pause_every == 0:
            time.sleep(0.01)
    if p.flush(120) != 0:
        fail("records left unsent after 120 s")
    if errors:
        fail(f"delivery errors: {errors[:3]}")
    for key, (offset, value) in sorted(latest.items()):
        print(f"latest {key} {offset} {value}", flush=True)


def keyless(bootstrap, topic):
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "retries": 0})
    errors = []
    p.produce(topic, value=b"no key", on_delivery=lambda err, msg: errors.append(err))
    p.flush(30)
    if len(errors) != 1 or errors[0] is None:
        fail(f"a record without a key was not refused: {errors}")
    if errors[0].code() != KafkaError.INVALID_RECORD:
        fail(f"refused with {errors[0]}, not INVALID_RECORD")
    print("OK keyless", flush=True)


def read(bootstrap, topic):
    c = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"reader-{time.monotonic_ns()}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
    })
    c.assign([TopicPartition(topic, 0, 0)])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = c.poll(0.2)
        if m is None:
            continue
        if m.error():
            if m.error().code() == KafkaError._PARTITION_EOF:
                break
            fail(f"consumer error: {m.error()}")
        value = "NULL" if m.value() is None else m.value().decode()
        print(f"{m.offset()} {m.key().decode()} {value}", flush=True)
    else:
        fail("no end of partition within 30 s")
    c.close()


def main():
    mode, bootstrap, topic = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "create":
        create(bootstrap, topic, sys.argv[4])
    elif mode == "produce":
        produce(bootstrap, topic, *(int(a) for a in sys.argv[4:8]))
    elif mode == "keyless":
        keyless(bootstrap, topic)
    elif mode == "read":
        read(bootstrap, topic)
    else:
        fail(f"unknown mode {mode}")


main()
