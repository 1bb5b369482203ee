"""paho-mqtt (PyPI) over TLS, as a device would connect to port 8883.

    paho_tls.py PORT CA USER PASSWORD
Connects with MQTT 5, trusting CA, logs in with USER and PASSWORD, subscribes to a
topic of its own, publishes to it at QoS 1 and prints "ok" once the message is back.
Prints "refused: REASON" if the broker refused the connection.
"""

import queue
import sys
import uuid

import paho.mqtt.client as mqtt

PORT, CA, USER, PASSWORD = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
TOPIC = "tls/" + uuid.uuid4().hex[:8]
events = queue.Queue()

c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
c.tls_set(ca_certs=CA)
c.username_pw_set(USER, PASSWORD)
c.on_connect = lambda c, u, flags, reason, props: events.put(("connack", reason))
c.on_subscribe = lambda c, u, mid, reasons, props: events.put(("suback", reasons[0]))
c.on_message = lambda c, u, m: events.put(("message", m.payload))
c.connect("127.0.0.1", PORT, keepalive=30)
c.loop_start()
try:
    kind, reason = events.get(timeout=30)
    assert kind == "connack", kind
    if reason.is_failure:
        print("refused:", reason)
        sys.exit(0)
    c.subscribe(TOPIC, qos=1)
    kind, reason = events.get(timeout=30)
    assert kind == "suback" and not reason.is_failure, (kind, reason)
    c.publish(TOPIC, b"over tls", qos=1).wait_for_publish(30)
    kind, payload = events.get(timeout=30)
    assert (kind, payload) == ("message", b"over tls"), (kind, payload)
    print("ok")
finally:
    c.loop_stop()
    c.disconnect()
