"""Reads a topic from the start in a consumer group over SASL PLAIN with confluent-kafka,
to see what [[auth.acl]] lets a group member do.

    kafka_acl.py BOOTSTRAP USER PASSWORD TOPIC GROUP
Prints the number of records read once the end is reached, or the name of the Kafka
error that stopped the consumer (GROUP_AUTHORIZATION_FAILED, say).
"""

import sys

from confluent_kafka import Consumer, KafkaError

BOOTSTRAP, USER, PASSWORD, TOPIC, GROUP = sys.argv[1:6]

consumer = Consumer({
    "bootstrap.servers": BOOTSTRAP,
    "security.protocol": "sasl_plaintext",
    "sasl.mechanisms": "PLAIN",
    "sasl.username": USER,
    "sasl.password": PASSWORD,
    "group.id": GROUP,
    "auto.offset.reset": "earliest",
    "enable.partition.eof": True,
})
consumer.subscribe([TOPIC])
read = 0
try:
    for _ in range(60):
        m = consumer.poll(1)
        if m is None:
            continue
        error = m.error()
        if error is None:
            read += 1
        elif error.code() == KafkaError._PARTITION_EOF:
            print(read)
            break
        else:
            print(error.name())
            break
    else:
        raise SystemExit(f"neither the end nor an error after 60 s ({read} records read)")
finally:
    consumer.close()
