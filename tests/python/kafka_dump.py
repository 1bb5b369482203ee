"""Prints every record of a topic, partition by partition in offset order, as
`partition<TAB>key<TAB>value<TAB>k=v,k=v` lines (what kcat -f '%p\t%k\t%s\t%h\n' prints).

It reads until nothing more arrives for 3 s rather than up to the high watermark:
Tansu 0.6.0 reports high watermarks behind what it serves. confluent-kafka bundles a
recent librdkafka, which Tansu serves (kcat's 2.0.2 it does not).

    kafka_dump.py BOOTSTRAP TOPIC [CA.pem|-] [MECHANISM USER PASSWORD]
With a CA: over TLS, trusting it; with a mechanism: logged in with SASL.
"""

import sys
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition


def main():
    bootstrap, topic = sys.argv[1], sys.argv[2]
    config = {
        "bootstrap.servers": bootstrap,
        "group.id": "kafka-dump",
        "enable.auto.commit": False,
    }
    tls = len(sys.argv) > 3 and sys.argv[3] != "-"
    if tls:
        config.update({"security.protocol": "ssl", "ssl.ca.location": sys.argv[3]})
    if len(sys.argv) > 6:
        config.update({
            "security.protocol": "sasl_ssl" if tls else "sasl_plaintext",
            "sasl.mechanisms": sys.argv[4],
            "sasl.username": sys.argv[5],
            "sasl.password": sys.argv[6],
        })
    consumer = Consumer(config)
    metadata = consumer.list_topics(topic, timeout=30)
    if topic not in metadata.topics or metadata.topics[topic].error is not None:
        return
    partitions = sorted(metadata.topics[topic].partitions)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    records = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        m = consumer.poll(3)
        if m is None:
            break
        if m.error():
            continue
        headers = ",".join(f"{k}={(v or b'').decode()}" for k, v in (m.headers() or []))
        key = (m.key() or b"").decode()
        value = (m.value() or b"").decode()
        records.append((m.partition(), m.offset(), f"{m.partition()}\t{key}\t{value}\t{headers}"))
    consumer.close()
    records.sort()
    print("\n".join(line for _, _, line in records))


if __name__ == "__main__":
    main()
