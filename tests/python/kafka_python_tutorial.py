"""The kafka-python tutorial snippet, as a user writes it. Usage: PORT"""
import sys

from kafka import KafkaConsumer, KafkaProducer

port = sys.argv[1]
producer = KafkaProducer(bootstrap_servers=f'localhost:{port}',
                         key_serializer=str.encode, value_serializer=str.encode)
for i in range(10):
    producer.send('test_topic', key=str(i), value=str(i * i))
producer.flush()

consumer = KafkaConsumer('test_topic', bootstrap_servers=f'localhost:{port}',
                         auto_offset_reset='earliest', consumer_timeout_ms=15000)
got = []
for message in consumer:
    got.append((message.key.decode(), message.value.decode()))
    if len(got) == 10:
        break
consumer.close()
expected = [(str(i), str(i * i)) for i in range(10)]
if got != expected:
    print(f"FAIL: got {got}, expected {expected}")
    sys.exit(1)
print("OK: 10 records, keys and values as sent")
