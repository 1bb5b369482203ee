"""Produces with acks=all and idempotence until told to stop (a line on stdin, or 120 s),
printing `delivered PARTITION OFFSET VALUE` for every successful delivery report.
Usage: BOOTSTRAP TOPIC"""
import select
import sys
import time

from confluent_kafka import Producer

bootstrap, topic = sys.argv[1], sys.argv[2]
producer = Producer({
    "bootstrap.servers": bootstrap,
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 2,
    "message.timeout.ms": 120000,
    "reconnect.backoff.ms": 50,
    "reconnect.backoff.max.ms": 500,
})


def report(err, msg):
    if err is None:
        print(f"delivered {msg.partition()} {msg.offset()} {msg.value().decode()}", flush=True)


i = 0
deadline = time.time() + 120
while time.time() < deadline:
    if select.select([sys.stdin], [], [], 0)[0]:
        break
    try:
        producer.produce(topic, key=f"k{i % 13}".encode(), value=f"v{i}".encode(), on_delivery=report)
        i += 1
    except BufferError:
        pass
    producer.poll(0.001)
producer.flush(60)
print(f"done {i}", flush=True)
