"""confluent-kafka (librdkafka) against Weir: idempotent acks=all produce, a group of
three consumers that loses one member mid-way, committed offsets.

  produce-consume BOOTSTRAP TOPIC COUNT   produce COUNT records, consume them with a group
  check-committed BOOTSTRAP TOPIC         the group's committed offsets equal the log ends

Exits non-zero with a message on any mismatch. Every wait is bounded."""
import sys
import threading
import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

GROUP = "weir-group-test"
PARTITIONS = 6


def fail(msg):
    print("FAIL: " + msg, flush=True)
    sys.exit(1)


def produce(bootstrap, topic, count):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])
    futures[topic].result(timeout=30)
    producer = Producer({
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
    })
    delivered = []
    errors = []

    def report(err, msg):
        if err is not None:
            errors.append(str(err))
        else:
            delivered.append((msg.partition(), msg.offset(), msg.value()))

    for i in range(count):
        while True:
            try:
                producer.produce(topic, key=f"k{i % 97}".encode(), value=f"v{i}".encode(), on_delivery=report)
                break
            except BufferError:
                producer.poll(0.05)
    remaining = producer.flush(60)
    if remaining:
        fail(f"{remaining} records still queued after 60 s")
    if errors:
        fail(f"{len(errors)} delivery errors, first: {errors[0]}")
    if len(delivered) != count:
        fail(f"delivered {len(delivered)} of {count}")
    print(f"produced {count} records", flush=True)
    return delivered


def consume(bootstrap, topic, count, delivered):
    seen = []
    lock = threading.Lock()
    stop = threading.Event()
    closed_one = threading.Event()

    def member(n):
        consumer = Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": GROUP,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
        })
        consumer.subscribe([topic])
        mine = 0
        deadline = time.time() + 120
        try:
            while not stop.is_set() and time.time() < deadline:
                msgs = consumer.consume(num_messages=500, timeout=0.5)
                batch = []
                for m in msgs:
                    if m.error():
                        raise KafkaException(m.error())
                    batch.append((m.partition(), m.offset(), m.value()))
                if batch:
                    # A record counts as seen once its offset is committed. A commit
                    # refused because a rebalance is under way leaves the records to
                    # be delivered again, to whichever member gets the partition.
                    try:
                        consumer.commit(asynchronous=False)
                    except KafkaException as e:
                        retriable = ("REBALANCE_IN_PROGRESS", "ILLEGAL_GENERATION", "UNKNOWN_MEMBER_ID")
                        if any(r in str(e) for r in retriable):
                            continue
                        raise
                    with lock:
                        seen.extend(batch)
                        total = len(seen)
                    mine += len(batch)
                    if total >= count:
                        stop.set()
                # Member 0 leaves once a third of the records are in.
                if n == 0 and not closed_one.is_set() and mine > 0 and len(seen) > count // 3:
                    closed_one.set()
                    print(f"member 0 leaves after {mine} records", flush=True)
                    break
        finally:
            consumer.close()

    threads = [threading.Thread(target=member, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    if not closed_one.is_set():
        fail("member 0 never left: the test did not exercise a rebalance")
    keys = [(p, o) for p, o, _ in seen]
    if len(set(keys)) != len(keys):
        dupes = len(keys) - len(set(keys))
        fail(f"{dupes} records were consumed more than once across the group")
    if sorted(seen) != sorted(delivered):
        missing = set(delivered) - set(seen)
        fail(f"consumed {len(seen)} records, delivered {len(delivered)}; {len(missing)} missing")
    print(f"consumed {len(seen)} records exactly once across the group", flush=True)


def check_committed(bootstrap, topic):
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": GROUP, "enable.auto.commit": False})
    parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    committed = consumer.committed(parts, timeout=30)
    for tp in committed:
        low, high = consumer.get_watermark_offsets(tp, timeout=30)
        if tp.offset != high:
            fail(f"partition {tp.partition}: committed {tp.offset}, log end {high}")
    consumer.close()
    print("committed offsets equal the log ends", flush=True)


if __name__ == "__main__":
    mode, bootstrap, topic = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "produce-consume":
        count = int(sys.argv[4])
        consume(bootstrap, topic, count, produce(bootstrap, topic, count))
    elif mode == "check-committed":
        check_committed(bootstrap, topic)
    else:
        fail(f"unknown mode {mode}")
