"""MQTT 5 features of Weir's broker, checked with paho-mqtt (PyPI) as a device would use them.

Usage: paho_mqtt5.py PORT. Each check prints "ok <name>"; the first failure raises.
The broker runs with `max_keep_alive_secs = 30`.
"""
import queue
import time

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt5_client import TIMEOUT, Client, check, connect_props, publish_props


@check("connack properties: assigned client id, server keep alive, limits")
def _():
    c = Client(client_id="", keepalive=120)
    p = c.props
    assert p.AssignedClientIdentifier.startswith("weir-"), p
    assert p.ServerKeepAlive == 30, p
    assert p.ReceiveMaximum == 1024, p
    assert p.MaximumPacketSize == 1024 * 1024, p
    assert p.TopicAliasMaximum == 64, p
    assert p.SharedSubscriptionAvailable == 1 and p.SubscriptionIdentifierAvailable == 1, p
    c.close()


@check("user properties, content type, payload format, response topic, correlation data")
def _():
    sub = Client()
    sub.sub("props/#")
    pub = Client()
    pub.pub("props/a", "héllo".encode(), props=publish_props(
        UserProperty=[("site", "north"), ("unit", "C")], ContentType="text/plain",
        PayloadFormatIndicator=1, ResponseTopic="replies/1", CorrelationData=b"\x01\x02"))
    m = sub.get()
    p = m.properties
    assert m.payload == "héllo".encode()
    assert ("site", "north") in p.UserProperty and ("unit", "C") in p.UserProperty, p
    assert p.ContentType == "text/plain" and p.PayloadFormatIndicator == 1, p
    assert p.ResponseTopic == "replies/1" and p.CorrelationData == b"\x01\x02", p
    sub.close(); pub.close()


@check("message expiry: retained message expires; remaining interval is sent")
def _():
    pub = Client()
    pub.pub("exp/short", b"x", retain=True, props=publish_props(MessageExpiryInterval=1))
    pub.pub("exp/long", b"y", retain=True, props=publish_props(MessageExpiryInterval=100))
    time.sleep(2.2)
    sub = Client()
    sub.sub("exp/#")
    m = sub.get()
    assert m.topic == "exp/long", m.topic
    assert 1 <= m.properties.MessageExpiryInterval <= 98, m.properties
    sub.nothing(0.5)
    sub.close(); pub.close()


@check("topic aliases from client to broker")
def _():
    sub = Client()
    sub.sub("alias/#")
    pub = Client()
    pub.pub("alias/t", b"1", props=publish_props(TopicAlias=3))
    pub.pub("", b"2", props=publish_props(TopicAlias=3))
    assert [sub.get().topic, sub.get().topic] == ["alias/t", "alias/t"]
    sub.close(); pub.close()


@check("topic aliases from broker to client")
def _():
    sub = Client(props=connect_props(TopicAliasMaximum=4))
    sub.sub("oalias/#")
    pub = Client()
    pub.pub("oalias/t", b"1")
    pub.pub("oalias/t", b"2")
    a, b = sub.get(), sub.get()
    assert a.topic == "oalias/t" and a.properties.TopicAlias == 1, a.properties
    # paho does not resolve aliases: the second arrives with an empty topic and the alias.
    assert b.topic == "" and b.properties.TopicAlias == 1 and b.payload == b"2", (b.topic, b.properties)
    sub.close(); pub.close()


@check("receive maximum: the broker sends no more than the client allows in flight")
def _():
    sub = Client(manual_ack=True, props=connect_props(ReceiveMaximum=2))
    sub.sub("flow/#")
    pub = Client()
    for i in range(5):
        pub.pub(f"flow/{i}", str(i).encode())
    first = [sub.get(), sub.get()]
    sub.nothing(1.0)
    for m in first:
        sub.c.ack(m.mid, 1)
    rest = []
    for _ in range(3):
        rest.append(sub.get())
        sub.c.ack(rest[-1].mid, 1)
    assert [m.payload for m in first + rest] == [b"0", b"1", b"2", b"3", b"4"]
    sub.close(); pub.close()


@check("maximum packet size: messages over the client's limit are not sent")
def _():
    sub = Client(props=connect_props(MaximumPacketSize=200))
    sub.sub("size/#")
    pub = Client()
    pub.pub("size/big", b"x" * 1000)
    pub.pub("size/small", b"y")
    m = sub.get()
    assert m.topic == "size/small", m.topic
    sub.close(); pub.close()


@check("subscription identifiers")
def _():
    sub = Client()
    sp = Properties(PacketTypes.SUBSCRIBE); sp.SubscriptionIdentifier = 7
    sub.sub("sid/#", props=sp)
    sp = Properties(PacketTypes.SUBSCRIBE); sp.SubscriptionIdentifier = 9
    sub.sub("sid/+", props=sp)
    pub = Client()
    pub.pub("sid/x", b"1")
    m = sub.get()
    assert sorted(m.properties.SubscriptionIdentifier) == [7, 9], m.properties
    sub.nothing(0.5)  # one message for both overlapping subscriptions
    sub.close(); pub.close()


@check("no local")
def _():
    me = Client()
    me.sub("nl/#", noLocal=True)
    other = Client()
    other.sub("nl/#")
    me.pub("nl/x", b"mine")
    assert other.get().payload == b"mine"
    me.nothing(0.7)
    me.close(); other.close()


@check("retain as published")
def _():
    rap = Client()
    rap.sub("rap/#", retainAsPublished=True)
    plain = Client()
    plain.sub("rap/#")
    pub = Client()
    pub.pub("rap/x", b"r", retain=True)
    assert rap.get().retain is True
    assert plain.get().retain is False
    pub.pub("rap/x", b"", retain=True)  # clear
    rap.close(); plain.close(); pub.close()


@check("retain handling 0, 1 and 2")
def _():
    pub = Client()
    pub.pub("rh/x", b"kept", retain=True)
    c = Client()
    c.sub("rh/#", retainHandling=2)
    c.nothing(0.5)
    c.sub("rh/+", retainHandling=1)
    assert c.get().payload == b"kept"
    c.sub("rh/+", retainHandling=1)  # not new: nothing
    c.nothing(0.5)
    c.sub("rh/+", retainHandling=0)
    assert c.get().retain is True
    pub.pub("rh/x", b"", retain=True)
    c.close(); pub.close()


@check("shared subscriptions: each message to one member of the group")
def _():
    members = [Client(), Client()]
    for m in members:
        m.sub("$share/workers/jobs/#")
    watcher = Client()
    watcher.sub("jobs/#")
    pub = Client()
    for i in range(10):
        pub.pub(f"jobs/{i}", str(i).encode())
    seen = [watcher.get().payload for _ in range(10)]
    assert seen == [str(i).encode() for i in range(10)]
    got = []
    counts = []
    for m in members:
        n = 0
        while True:
            try:
                got.append(m.get(timeout=1.0).payload)
                n += 1
            except queue.Empty:
                break
        counts.append(n)
    assert sorted(got) == sorted(seen), got
    assert all(n > 0 for n in counts), counts
    for m in members + [watcher, pub]:
        m.close()


@check("reason codes: no matching subscribers, invalid filter, no subscription existed")
def _():
    c = Client()
    rc = c.pub("nobody/listens", b"x")
    assert rc.value == 0x10, rc
    rcs = c.sub("$share/lonely")  # a share group without a filter
    assert rcs[0].value == 0x8F, rcs
    c.c.unsubscribe("never/subscribed")
    rcs = c.unsubacks.get(timeout=TIMEOUT)
    assert rcs[0].value == 0x11, rcs
    c.sub("unsub/#")
    c.c.unsubscribe("unsub/#")
    rcs = c.unsubacks.get(timeout=TIMEOUT)
    assert rcs[0].value == 0x00, rcs
    other = Client()
    assert other.pub("unsub/x", b"gone").value == 0x10  # nobody subscribed any more
    c.nothing(0.5)
    other.close(); c.close()


@check("session takeover: the older connection gets DISCONNECT 0x8E")
def _():
    first = Client(client_id="twin")
    second = Client(client_id="twin")
    rc = first.disconnects.get(timeout=TIMEOUT)
    assert rc.value == 0x8E, rc
    first.c.loop_stop()
    second.close()


@check("will delay: sent after the delay, and not at all if the client returns")
def _():
    watcher = Client()
    watcher.sub("wd/#")
    wp = Properties(PacketTypes.WILLMESSAGE); wp.WillDelayInterval = 2
    c = Client(client_id="wd-1", props=connect_props(SessionExpiryInterval=60),
               will=dict(topic="wd/1", payload=b"late", qos=1, properties=wp))
    c.vanish()
    started = time.time()
    watcher.nothing(1.0)
    m = watcher.get(timeout=5)
    assert m.payload == b"late" and time.time() - started >= 1.8
    wp = Properties(PacketTypes.WILLMESSAGE); wp.WillDelayInterval = 3
    c = Client(client_id="wd-2", props=connect_props(SessionExpiryInterval=60),
               will=dict(topic="wd/2", payload=b"never", qos=1, properties=wp))
    c.vanish()
    time.sleep(0.5)
    back = Client(client_id="wd-2", clean_start=False, props=connect_props(SessionExpiryInterval=60))
    watcher.nothing(4.0)
    back.close(); watcher.close()


@check("session expiry: a session outliving its interval is gone")
def _():
    c = Client(client_id="se-1", props=connect_props(SessionExpiryInterval=1))
    c.sub("se/#")
    c.close()
    pub = Client()
    pub.pub("se/x", b"queued")
    time.sleep(2.5)
    c = Client(client_id="se-1", clean_start=False, props=connect_props(SessionExpiryInterval=1))
    assert c.flags.session_present is False
    c.nothing(0.5)
    c.close()
    # Within its interval it is kept, with what was queued.
    c = Client(client_id="se-2", props=connect_props(SessionExpiryInterval=30))
    c.sub("se2/#")
    c.close()
    pub.pub("se2/x", b"queued")
    c = Client(client_id="se-2", clean_start=False, props=connect_props(SessionExpiryInterval=30))
    assert c.flags.session_present is True
    assert c.get().payload == b"queued"
    c.close(); pub.close()


@check("payload format indicator 1 with invalid UTF-8 closes with 0x99")
def _():
    c = Client()
    c.c.publish("pf/x", b"\xff\xfe", qos=1, properties=publish_props(PayloadFormatIndicator=1))
    rc = c.disconnects.get(timeout=TIMEOUT)
    assert rc.value == 0x99, rc
    c.c.loop_stop()

print("all MQTT 5 checks passed")
