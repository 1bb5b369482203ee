"""Every compression codec librdkafka has, produced and consumed back. Usage: BOOTSTRAP"""
import sys

from confluent_kafka import Consumer, Producer

bootstrap = sys.argv[1]
for codec in ["none", "gzip", "snappy", "lz4", "zstd"]:
    topic = f"codec-{codec}"
    producer = Producer({"bootstrap.servers": bootstrap, "compression.type": codec, "linger.ms": 20})
    values = [f"{codec}-{i}-".encode() * 20 for i in range(500)]
    for v in values:
        producer.produce(topic, key=b"k", value=v)
    if producer.flush(30):
        print(f"FAIL: {codec}: records still queued")
        sys.exit(1)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"g-{codec}", "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    got = []
    for _ in range(200):
        for m in consumer.consume(num_messages=1000, timeout=0.2):
            if m.error():
                print(f"FAIL: {codec}: {m.error()}")
                sys.exit(1)
            got.append(m.value())
        if len(got) >= len(values):
            break
    consumer.close()
    if got != values:
        print(f"FAIL: {codec}: got {len(got)} records back, expected {len(values)} identical")
        sys.exit(1)
    print(f"OK {codec}: {len(values)} records round-tripped")
