"""Every MQTT 5 message property on every path a message takes through Weir.

Usage: mqtt5_properties.py PORT PHASE, PHASE one of
  paths          live, retained, offline queue, shared subscription, will (now and delayed)
  before-restart leaves a retained message and one queued for an offline session
  after-restart  checks both after the broker restarted
  bridge REMOTE  publishes on the remote broker (PORT bridges `farm/#` from it) and
                 checks the message Weir's subscriber gets
  downlink BOOTSTRAP  produces a record with headers to the Kafka topic `commands` and
                 checks the message the downlink makes of it on `devices/dev1/commands`
Each check prints "ok <name>"; the first failure raises.
"""
import sys
import time

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt5_client import Client, check, connect_props

PHASE = sys.argv[2]
EXPIRY = 300
USER = [("site", "north"), ("unit", "C"), ("site", "south")]
# A Kafka record's headers reach Weir's downlink through kafka-protocol, which keeps one
# value per key: no repeated key on that path.
KAFKA_USER = [("site", "north"), ("unit", "C")]


def full_props(props=None):
    """Sets every message property on `props` (a PUBLISH's by default)."""
    p = props or Properties(PacketTypes.PUBLISH)
    p.UserProperty = USER
    p.ContentType = "application/json"
    p.PayloadFormatIndicator = 1
    p.MessageExpiryInterval = EXPIRY
    p.ResponseTopic = "replies/dev1"
    p.CorrelationData = b"\x00\x01corr"
    return p


def assert_full(m, waited=0.0, path="", user=USER):
    """Every property arrived unchanged; the expiry counts down by the time waited."""
    p = m.properties
    assert p.UserProperty == user, (path, p)
    assert p.ContentType == "application/json" and p.PayloadFormatIndicator == 1, (path, p)
    assert p.ResponseTopic == "replies/dev1" and p.CorrelationData == b"\x00\x01corr", (path, p)
    expiry = p.MessageExpiryInterval
    assert expiry <= EXPIRY - int(waited), (path, expiry, waited)
    assert expiry >= EXPIRY - int(waited) - 30, (path, expiry, waited)


def leave_session(client_id, topic, expiry):
    """Subscribes `topic` in a session that outlives the connection, and disconnects.
    Returns the CONNECT properties to come back with."""
    session = connect_props(SessionExpiryInterval=expiry)
    sub = Client(client_id=client_id, props=session)
    sub.sub(topic)
    sub.close()
    return session


if PHASE == "paths":
    @check("live and shared subscription")
    def _():
        live = Client()
        live.sub("sweep/live/#")
        shared = Client()
        shared.sub("$share/g/sweep/live/#")
        pub = Client()
        pub.pub("sweep/live/a", b'{"t":1}', props=full_props())
        assert_full(live.get(), path="live")
        assert_full(shared.get(), path="shared")
        for c in (live, shared, pub):
            c.close()

    @check("retained, the expiry counted down while it was stored")
    def _():
        pub = Client()
        pub.pub("sweep/retained/a", b'{"t":2}', retain=True, props=full_props())
        time.sleep(2.1)
        sub = Client()
        sub.sub("sweep/retained/#")
        m = sub.get()
        assert m.retain
        assert_full(m, waited=2, path="retained")
        pub.pub("sweep/retained/a", b"", retain=True)
        sub.close(); pub.close()

    @check("queued for an offline session, the expiry counted down while queued")
    def _():
        session = leave_session("sweep-offline", "sweep/queued/#", 60)
        pub = Client()
        pub.pub("sweep/queued/a", b'{"t":3}', props=full_props())
        time.sleep(2.1)
        back = Client(client_id="sweep-offline", clean_start=False, props=session)
        assert_full(back.get(), waited=2, path="queued")
        back.close(); pub.close()

    @check("will, published at once and after its delay")
    def _():
        watcher = Client()
        watcher.sub("sweep/will/#")
        for topic, delay in (("sweep/will/now", 0), ("sweep/will/later", 2)):
            wp = full_props(Properties(PacketTypes.WILLMESSAGE))
            if delay:
                wp.WillDelayInterval = delay
            c = Client(props=connect_props(SessionExpiryInterval=60),
                       will=dict(topic=topic, payload=b'{"gone":1}', qos=1, properties=wp))
            c.vanish()
            m = watcher.get()
            assert m.topic == topic, m.topic
            assert_full(m, path=topic)
        watcher.close()

elif PHASE == "before-restart":
    @check("a retained message and a queued one, stored")
    def _():
        leave_session("sweep-restart", "sweep/restart/queued", 600)
        pub = Client()
        pub.pub("sweep/restart/retained", b'{"t":4}', retain=True, props=full_props())
        pub.pub("sweep/restart/queued", b'{"t":5}', props=full_props())
        pub.close()

elif PHASE == "after-restart":
    @check("after a restart: the queued message and the retained one")
    def _():
        back = Client(client_id="sweep-restart", clean_start=False,
                      props=connect_props(SessionExpiryInterval=600))
        assert_full(back.get(), path="queued after restart")
        sub = Client()
        sub.sub("sweep/restart/retained")
        assert_full(sub.get(), path="retained after restart")
        back.close(); sub.close()

elif PHASE == "bridge":
    @check("bridge: a message from the remote broker keeps its properties")
    def _():
        sub = Client()
        sub.sub("farm/#")
        remote = Client(port=int(sys.argv[3]))
        remote.pub("farm/cow9/props", b'{"t":6}', props=full_props())
        m = sub.get(timeout=30)
        assert m.topic == "farm/cow9/props", m.topic
        assert_full(m, path="bridge")
        sub.close(); remote.close()

elif PHASE == "downlink":
    @check("downlink: Kafka headers become the message's properties")
    def _():
        from confluent_kafka import Producer
        sub = Client()
        sub.sub("devices/+/commands")
        producer = Producer({"bootstrap.servers": sys.argv[3]})
        headers = KAFKA_USER + [
            ("mqtt.content_type", b"application/json"),
            ("mqtt.payload_format", b"1"),
            ("mqtt.message_expiry", str(EXPIRY).encode()),
            ("mqtt.response_topic", b"replies/dev1"),
            ("mqtt.correlation_data", b"\x00\x01corr"),
        ]
        producer.produce("commands", key=b"dev1", value=b'{"cmd":"reboot"}', headers=headers)
        assert producer.flush(30) == 0
        m = sub.get(timeout=30)
        assert m.topic == "devices/dev1/commands" and m.payload == b'{"cmd":"reboot"}', m
        assert_full(m, path="downlink", user=KAFKA_USER)
        sub.close()

else:
    raise SystemExit(f"unknown phase {PHASE}")

print("all checks passed", flush=True)
