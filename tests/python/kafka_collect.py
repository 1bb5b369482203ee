"""Reads COUNT records of TOPIC from the beginning with confluent-kafka (librdkafka),
as a local app would, and prints "key<TAB>value" per record in the order consumed.

Usage: kafka_collect.py BOOTSTRAP TOPIC COUNT
"""
import sys
import time
import uuid

from confluent_kafka import Consumer

bootstrap, topic, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
consumer = Consumer({
    "bootstrap.servers": bootstrap,
    "group.id": "collect-" + uuid.uuid4().hex[:8],
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
})
consumer.subscribe([topic])
seen = 0
deadline = time.time() + 120
while seen < count and time.time() < deadline:
    for msg in consumer.consume(num_messages=1000, timeout=1.0):
        if msg.error():
            raise SystemExit(f"consume error: {msg.error()}")
        key = (msg.key() or b"").decode()
        print(f"{key}\t{msg.value().decode()}")
        seen += 1
# Anything beyond COUNT would be a duplicate: read a little longer to catch it.
for msg in consumer.consume(num_messages=1000, timeout=2.0):
    if not msg.error():
        print(f"{(msg.key() or b'').decode()}\t{msg.value().decode()}")
consumer.close()
