"""Produces one record and reads it back over SASL, with confluent-kafka (librdkafka
bundled) or kafka-python, to check a login works or is refused.

    kafka_sasl.py BOOTSTRAP CLIENT MECHANISM USER PASSWORD TOPIC [CA [CERT KEY]]
CLIENT is confluent or kafka-python. With CA (a PEM file) the connection is TLS
(SASL_SSL), and MECHANISM "none" logs in with the client certificate CERT/KEY instead
of SASL (SSL). Prints "ok" after reading the record back, or "refused: ..." if the
broker refused the login; anything else raises.
"""

import sys
import uuid

BOOTSTRAP, CLIENT, MECHANISM, USER, PASSWORD, TOPIC = sys.argv[1:7]
CA, CERT, KEY = (sys.argv[7:10] + [None, None, None])[:3]
VALUE = uuid.uuid4().hex.encode()
PROTOCOL = ("SSL" if MECHANISM == "none" else "SASL_SSL") if CA else "SASL_PLAINTEXT"


def confluent():
    from confluent_kafka import Consumer, KafkaException, Producer

    sasl = {"bootstrap.servers": BOOTSTRAP, "security.protocol": PROTOCOL.lower()}
    if MECHANISM != "none":
        sasl.update({"sasl.mechanisms": MECHANISM, "sasl.username": USER,
                     "sasl.password": PASSWORD})
    if CA:
        sasl["ssl.ca.location"] = CA
    if CERT:
        sasl.update({"ssl.certificate.location": CERT, "ssl.key.location": KEY})
    errors = []
    producer = Producer({**sasl, "error_cb": errors.append, "message.timeout.ms": 20000})
    delivered = []
    producer.produce(TOPIC, VALUE, on_delivery=lambda err, msg: delivered.append(err))
    producer.flush(30)
    auth = [e for e in errors if e.code() == -169]  # _AUTHENTICATION
    if auth:
        print("refused:", auth[0].str())
        return
    assert delivered == [None], (delivered, [e.str() for e in errors])
    consumer = Consumer({**sasl, "group.id": "sasl-" + uuid.uuid4().hex[:6],
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([TOPIC])
    for _ in range(60):
        m = consumer.poll(1)
        if m is not None and not m.error() and m.value() == VALUE:
            print("ok")
            consumer.close()
            return
    raise KafkaException("the record did not come back")


def kafka_python():
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.errors import KafkaError

    sasl = dict(bootstrap_servers=BOOTSTRAP, security_protocol=PROTOCOL)
    if MECHANISM != "none":
        sasl.update(sasl_mechanism=MECHANISM, sasl_plain_username=USER,
                    sasl_plain_password=PASSWORD)
    if CA:
        sasl.update(ssl_cafile=CA)
    if CERT:
        sasl.update(ssl_certfile=CERT, ssl_keyfile=KEY)
    try:
        producer = KafkaProducer(**sasl, request_timeout_ms=20000, max_block_ms=20000)
    except KafkaError as e:
        if "uthentication" in repr(e) or "SASL" in repr(e):
            print("refused:", repr(e))
            return
        raise
    producer.send(TOPIC, VALUE).get(timeout=30)
    producer.close()
    consumer = KafkaConsumer(TOPIC, **sasl, auto_offset_reset="earliest",
                             consumer_timeout_ms=30000, group_id="sasl-" + uuid.uuid4().hex[:6])
    for m in consumer:
        if m.value == VALUE:
            print("ok")
            consumer.close()
            return
    raise KafkaError("the record did not come back")


{"confluent": confluent, "kafka-python": kafka_python}[CLIENT]()
