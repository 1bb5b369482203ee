"""A paho-mqtt MQTT 5 client whose callbacks land in queues, for straight-line checks.

Imported by the MQTT 5 test scripts; PORT is the broker's MQTT port (their first
argument).
"""
import queue
import socket
import sys
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

PORT = int(sys.argv[1])
TIMEOUT = 10


class Client:
    """A paho client whose callbacks land in queues, for straight-line checks."""

    def __init__(self, client_id=None, clean_start=True, props=None, manual_ack=False, keepalive=30, will=None,
                 port=None):
        self.id = client_id if client_id is not None else "py-" + uuid.uuid4().hex[:8]
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.id,
                             protocol=mqtt.MQTTv5, manual_ack=manual_ack)
        self.messages = queue.Queue()
        self.connack = queue.Queue()
        self.acks = queue.Queue()
        self.subacks = queue.Queue()
        self.unsubacks = queue.Queue()
        self.disconnects = queue.Queue()
        self.c.on_connect = lambda c, u, flags, rc, p: self.connack.put((flags, rc, p))
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.put((mid, rc))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(rcs)
        self.c.on_unsubscribe = lambda c, u, mid, rcs, p: self.unsubacks.put(rcs)
        self.c.on_disconnect = lambda c, u, flags, rc, p: self.disconnects.put(rc)
        if will:
            self.c.will_set(**will)
        self.c.connect("127.0.0.1", port or PORT, keepalive=keepalive, clean_start=clean_start, properties=props)
        self.c.loop_start()
        self.flags, rc, self.props = self.connack.get(timeout=TIMEOUT)
        assert not rc.is_failure, rc

    def sub(self, topic, qos=1, props=None, **opts):
        self.c.subscribe(topic, options=SubscribeOptions(qos=qos, **opts), properties=props)
        return self.subacks.get(timeout=TIMEOUT)

    def pub(self, topic, payload, qos=1, retain=False, props=None):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if qos > 0:
            mid, rc = self.acks.get(timeout=TIMEOUT)
            assert mid == info.mid
            return rc
        return None

    def get(self, timeout=TIMEOUT):
        return self.messages.get(timeout=timeout)

    def nothing(self, wait=1.0):
        try:
            m = self.messages.get(timeout=wait)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message on {m.topic}: {m.payload!r}")

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()

    def vanish(self):
        """Drops the TCP connection without DISCONNECT."""
        self.c.loop_stop()
        self.c.socket().shutdown(socket.SHUT_RDWR)
        self.c.socket().close()


def publish_props(**kv):
    p = Properties(PacketTypes.PUBLISH)
    for k, v in kv.items():
        setattr(p, k, v)
    return p


def connect_props(**kv):
    p = Properties(PacketTypes.CONNECT)
    for k, v in kv.items():
        setattr(p, k, v)
    return p


def check(name):
    def wrap(f):
        f()
        print("ok", name, flush=True)
        return f
    return wrap
