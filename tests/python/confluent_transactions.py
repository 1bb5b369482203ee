"""Kafka transactions against Weir, with confluent-kafka (librdkafka) and kafka-python.

  basics BOOTSTRAP        commit, abort, an open transaction hidden from read_committed,
                          a timed-out transaction aborted by the broker, fencing
  kafka-python BOOTSTRAP  kafka-python's transactional producer, commit and abort
  seed BOOTSTRAP N        topic eos-in with N records v0..v(N-1), 3 partitions
  eos BOOTSTRAP N         consume-transform-produce eos-in -> eos-out, offsets in the
                          transaction, riding through broker restarts, until N are done
  check-eos BOOTSTRAP N   eos-out (read_committed) holds each input exactly once
  acl BOOTSTRAP USER PASSWORD
                          over SASL PLAIN: transactions as app-1 commit into out, as
                          other-1 are refused (TRANSACTIONAL_ID_AUTHORIZATION_FAILED)
  pipeline-input BOOTSTRAP TOPIC
                          c1 committed, a1 aborted, c2 committed, as JSON readings

Exits non-zero with a message on any mismatch. Every wait is bounded."""
import sys
import threading
import time

from confluent_kafka import (Consumer, KafkaError, KafkaException, Producer,
                             TopicPartition)
from confluent_kafka.admin import AdminClient, NewTopic


def fail(msg):
    print("FAIL: " + msg, flush=True)
    sys.exit(1)


def create(bootstrap, topic, partitions):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    futures[topic].result(timeout=30)


def txn_producer(bootstrap, txn_id, **extra):
    conf = {"bootstrap.servers": bootstrap, "transactional.id": txn_id, "linger.ms": 5}
    conf.update(extra)
    p = Producer(conf)
    p.init_transactions(30)
    return p


def read_all(bootstrap, topic, isolation, expect_at_least=0, limit_s=30, group=None):
    """Values of every data record in `topic` (all partitions), read from the start
    until the ends the consumer sees for its isolation level are reached."""
    c = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group or f"reader-{isolation}-{time.monotonic_ns()}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": isolation,
        "enable.partition.eof": True,
    })
    meta = c.list_topics(topic, timeout=10)
    parts = [TopicPartition(topic, p, 0) for p in meta.topics[topic].partitions]
    c.assign(parts)
    values, eof = [], set()
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        m = c.poll(0.2)
        if m is None:
            continue
        if m.error():
            if m.error().code() == KafkaError._PARTITION_EOF:
                eof.add(m.partition())
                if len(eof) == len(parts) and len(values) >= expect_at_least:
                    break
                continue
            fail(f"consumer error: {m.error()}")
        eof.discard(m.partition())
        values.append(m.value().decode())
    c.close()
    return values


def last_stable(bootstrap, topic, partition):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "lso-probe",
                  "isolation.level": "read_committed"})
    _, high = c.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
    c.close()
    return high


def basics(bootstrap):
    create(bootstrap, "txn", 3)
    p = txn_producer(bootstrap, "basics")
    p.begin_transaction()
    for i in range(10):
        p.produce("txn", key=f"k{i}", value=f"c{i}")
    p.commit_transaction(30)
    p.begin_transaction()
    for i in range(10):
        p.produce("txn", key=f"k{i}", value=f"a{i}")
    # Stored first: an abort purges what the client has not sent yet.
    p.flush(30)
    p.abort_transaction(30)
    p.begin_transaction()
    for i in range(10, 15):
        p.produce("txn", key=f"k{i}", value=f"c{i}")
    p.commit_transaction(30)

    committed = read_all(bootstrap, "txn", "read_committed", 15)
    if sorted(committed) != sorted(f"c{i}" for i in range(15)):
        fail(f"read_committed saw {sorted(committed)}")
    uncommitted = read_all(bootstrap, "txn", "read_uncommitted", 25)
    want = sorted([f"c{i}" for i in range(15)] + [f"a{i}" for i in range(10)])
    if sorted(uncommitted) != want:
        fail(f"read_uncommitted saw {sorted(uncommitted)}")
    print("commit and abort: read_committed 15, read_uncommitted 25", flush=True)

    # An open transaction: its records are stored, but read_committed stops before them.
    create(bootstrap, "open", 1)
    p.begin_transaction()
    for i in range(5):
        p.produce("open", value=f"o{i}")
    p.flush(30)
    if read_all(bootstrap, "open", "read_uncommitted", 5) != [f"o{i}" for i in range(5)]:
        fail("read_uncommitted does not see the open transaction")
    if last_stable(bootstrap, "open", 0) != 0:
        fail("the last stable offset passed an open transaction")
    if read_all(bootstrap, "open", "read_committed", 0, limit_s=5):
        fail("read_committed saw an open transaction")
    p.commit_transaction(30)
    if read_all(bootstrap, "open", "read_committed", 5) != [f"o{i}" for i in range(5)]:
        fail("read_committed does not see the committed transaction")
    print("open transaction hidden until its commit", flush=True)

    # A second producer with the same transactional id fences the first, whose open
    # transaction is aborted.
    p.begin_transaction()
    p.produce("open", value="zombie")
    p.flush(30)
    p2 = txn_producer(bootstrap, "basics")
    try:
        p.produce("open", value="zombie2")
        p.flush(10)
        p.commit_transaction(10)
        fail("the fenced producer committed")
    except KafkaException as e:
        err = e.args[0]
        if not (err.fatal() or err.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED,
                                              KafkaError.INVALID_PRODUCER_EPOCH)):
            fail(f"the fenced producer failed otherwise: {err}")
    p2.begin_transaction()
    p2.produce("open", value="o5")
    p2.commit_transaction(30)
    got = read_all(bootstrap, "open", "read_committed", 6)
    if got != [f"o{i}" for i in range(6)]:
        fail(f"after fencing, read_committed saw {got}")
    print("fenced: the zombie's transaction aborted, the new producer's committed", flush=True)

    # A transaction that outlives its timeout is aborted by the broker.
    create(bootstrap, "slow", 1)
    slow = txn_producer(bootstrap, "slow", **{"transaction.timeout.ms": 2000,
                                                "message.timeout.ms": 2000})
    slow.begin_transaction()
    slow.produce("slow", value="late")
    slow.flush(30)
    deadline = time.monotonic() + 30
    while last_stable(bootstrap, "slow", 0) == 0:
        if time.monotonic() > deadline:
            fail("a timed-out transaction was never aborted")
        time.sleep(0.2)
    if read_all(bootstrap, "slow", "read_committed", 0, limit_s=5):
        fail("read_committed saw a timed-out transaction's record")
    try:
        slow.commit_transaction(10)
        fail("a timed-out transaction committed")
    except KafkaException:
        pass
    print("timed out: aborted by the broker", flush=True)
    print("OK basics", flush=True)


def kafka_python(bootstrap):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition as KTP
    create(bootstrap, "kp-txn", 1)
    p = KafkaProducer(bootstrap_servers=bootstrap, transactional_id="kafka-python")
    p.init_transactions()
    p.begin_transaction()
    for i in range(3):
        p.send("kp-txn", f"c{i}".encode())
    p.commit_transaction()
    p.begin_transaction()
    for i in range(3):
        p.send("kp-txn", f"a{i}".encode())
    p.flush()
    p.abort_transaction()
    p.close()
    c = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed",
                      auto_offset_reset="earliest", consumer_timeout_ms=3000)
    c.assign([KTP("kp-txn", 0)])
    got = [m.value.decode() for m in c]
    c.close()
    if got != ["c0", "c1", "c2"]:
        fail(f"kafka-python read_committed saw {got}")
    print("OK kafka-python", flush=True)


def seed(bootstrap, n):
    create(bootstrap, "eos-in", 3)
    create(bootstrap, "eos-out", 3)
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for i in range(n):
        p.produce("eos-in", key=f"k{i % 31}", value=f"v{i}")
        if i % 1000 == 0:
            p.poll(0)
    if p.flush(60):
        fail("seed records still queued")
    print(f"seeded {n}", flush=True)


def bounded(call, limit_s):
    """call(), or TimeoutError after limit_s. librdkafka's send_offsets_to_transaction
    can hang past its own timeout when the group coordinator restarts under it
    (confluentinc/librdkafka#5456 and #5511, open in 2.16): the loop then gives up on
    that producer, as an application would, and a new one fences it."""
    result = {}

    def run():
        try:
            result["ok"] = call()
        except BaseException as e:  # handed to the caller
            result["err"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit_s)
    if t.is_alive():
        raise TimeoutError(f"no answer in {limit_s} s")
    if "err" in result:
        raise result["err"]
    return result.get("ok")


def eos(bootstrap, n):
    """The read-process-write loop of Kafka's exactly-once guide: each batch of input
    becomes output and the input's offsets in one transaction. A broker that goes away
    mid-way makes a transaction fail: it is aborted (or the producer recreated when the
    error is fatal) and the consumer rewound to the committed offsets."""
    group = "eos-group"
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
    })
    consumer.subscribe(["eos-in"])
    producer = txn_producer(bootstrap, "eos-loop")
    done = 0
    deadline = time.monotonic() + 240

    def rewind():
        parts = consumer.assignment()
        if not parts:
            return
        for tp in consumer.committed(parts, timeout=30):
            consumer.seek(TopicPartition(tp.topic, tp.partition, max(tp.offset, 0)))

    def recover(producer, err):
        """Aborts the failed transaction (a new producer when the error is fatal or
        the abort fails: its InitProducerId aborts what is open) and rewinds the
        consumer to the committed offsets. The broker may still be restarting."""
        while time.monotonic() < deadline:
            try:
                if err is not None and err.txn_requires_abort():
                    producer.abort_transaction(30)
                else:
                    producer = txn_producer(bootstrap, "eos-loop")
                rewind()
                return producer
            except KafkaException as e:
                print(f"recovery failed: {e.args[0]}", flush=True)
                err = None
                time.sleep(0.5)
        fail("could not recover from a failed transaction")

    def committed_total():
        parts = [TopicPartition("eos-in", p) for p in range(3)]
        return sum(max(tp.offset, 0) for tp in consumer.committed(parts, timeout=30))

    while time.monotonic() < deadline:
        msgs = consumer.consume(100, 1.0)
        msgs = [m for m in msgs if not m.error()]
        if not msgs:
            try:
                if committed_total() >= n:
                    break
            except KafkaException:
                pass
            continue
        try:
            producer.begin_transaction()
            for m in msgs:
                producer.produce("eos-out", key=m.key(), value=b"out-" + m.value())
            positions = consumer.position(consumer.assignment())
            metadata = consumer.consumer_group_metadata()
            bounded(lambda: producer.send_offsets_to_transaction(positions, metadata, 15), 20)
            producer.commit_transaction(30)
            done += len(msgs)
            print(f"progress {done}", flush=True)
        except KafkaException as e:
            print(f"transaction failed: {e.args[0]}", flush=True)
            producer = recover(producer, e.args[0])
        except TimeoutError as e:
            print(f"send_offsets_to_transaction hung: {e}", flush=True)
            producer = recover(producer, None)
    else:
        fail(f"eos loop did not finish: {done} processed")
    consumer.close()
    print(f"OK eos {done}", flush=True)


def check_eos(bootstrap, n):
    out = read_all(bootstrap, "eos-out", "read_committed", n, limit_s=60)
    want = sorted(f"out-v{i}" for i in range(n))
    if sorted(out) != want:
        seen = set(out)
        missing = [v for v in want if v not in seen]
        dup = len(out) - len(seen)
        fail(f"eos-out has {len(out)} records, {dup} duplicates, {len(missing)} missing "
             f"(first missing {missing[:5]})")
    print(f"OK exactly once: {n}", flush=True)


def acl(bootstrap, user, password):
    login = {"security.protocol": "sasl_plaintext", "sasl.mechanisms": "PLAIN",
             "sasl.username": user, "sasl.password": password}
    p = txn_producer(bootstrap, "app-1", **login)
    p.begin_transaction()
    p.produce("out", value="allowed")
    p.commit_transaction(30)
    try:
        txn_producer(bootstrap, "other-1", **login)
        fail("a transactional id without write was initialized")
    except KafkaException as e:
        if e.args[0].code() != KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED:
            fail(f"refused otherwise: {e.args[0]}")
    print("OK acl", flush=True)


def pipeline_input(bootstrap, topic):
    p = txn_producer(bootstrap, "pipeline-input")
    for key, temperature, commit in [("c1", 20, True), ("a1", 30, False), ("c2", 25, True)]:
        p.begin_transaction()
        p.produce(topic, key=key, value=f'{{"temperature":{temperature}}}')
        p.flush(30)
        if commit:
            p.commit_transaction(30)
        else:
            p.abort_transaction(30)
    print("OK pipeline-input", flush=True)


if __name__ == "__main__":
    cmd, bootstrap = sys.argv[1], sys.argv[2]
    if cmd == "basics":
        basics(bootstrap)
    elif cmd == "kafka-python":
        kafka_python(bootstrap)
    elif cmd == "seed":
        seed(bootstrap, int(sys.argv[3]))
    elif cmd == "eos":
        eos(bootstrap, int(sys.argv[3]))
    elif cmd == "acl":
        acl(bootstrap, sys.argv[3], sys.argv[4])
    elif cmd == "pipeline-input":
        pipeline_input(bootstrap, sys.argv[3])
    elif cmd == "check-eos":
        check_eos(bootstrap, int(sys.argv[3]))
    else:
        fail(f"unknown command {cmd}")
