"""MQTT over WebSockets against Weir: paho-mqtt's websockets transport, and raw frames.

    mqtt_websockets.py paho WS_PORT TCP_PORT [CA]
        paho-mqtt (MQTT 5 and 3.1.1) over ws://127.0.0.1:WS_PORT/mqtt (wss:// trusting
        CA, when given) subscribes to ws/in/<scheme>-<version>; mosquitto_pub (TCP)
        publishes there; the WebSocket client gets it and publishes
        "from-<scheme>-<version>" to ws/out at QoS 1, for the caller's mosquitto_sub.
        Prints "OK paho".
    mqtt_websockets.py frames WS_PORT
        hand-made frames: a CONNECT split across two frames, then SUBSCRIBE and PUBLISH
        in one frame (the message comes back), a ping answered by a pong; a text frame,
        and a path other than /mqtt, each end only that connection while a second one
        goes on. Prints "OK frames".

Exits non-zero with a message on any mismatch. Every wait is bounded."""
import base64
import os
import queue
import socket
import struct
import subprocess
import sys

import paho.mqtt.client as mqtt


def fail(msg):
    print("FAIL: " + msg, flush=True)
    sys.exit(1)


def paho(ws_port, tcp_port, ca):
    scheme = "wss" if ca else "ws"
    for version_name, version in [("5", mqtt.MQTTv5), ("311", mqtt.MQTTv311)]:
        name = f"{scheme}-{version_name}"
        events = queue.Queue()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=version,
                        transport="websockets", client_id=name)
        c.ws_set_options(path="/mqtt")
        if ca:
            c.tls_set(ca_certs=ca)
        c.on_connect = lambda c, u, flags, reason, props: events.put(("connack", reason))
        c.on_subscribe = lambda c, u, mid, reasons, props: events.put(("suback", reasons[0]))
        c.on_message = lambda c, u, m: events.put(("message", m.topic, m.payload))
        c.connect("127.0.0.1", ws_port, keepalive=30)
        c.loop_start()
        try:
            kind, reason = events.get(timeout=30)
            if kind != "connack" or reason.is_failure:
                fail(f"MQTT {name} over WebSocket: {kind} {reason}")
            c.subscribe(f"ws/in/{name}", qos=1)
            kind, reason = events.get(timeout=30)
            if kind != "suback" or reason.is_failure:
                fail(f"subscribe: {kind} {reason}")
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(tcp_port), "-q", "1",
                            "-t", f"ws/in/{name}", "-m", f"from-tcp-{name}"],
                           check=True, timeout=30)
            got = events.get(timeout=30)
            if got != ("message", f"ws/in/{name}", f"from-tcp-{name}".encode()):
                fail(f"expected the TCP client's message, got {got}")
            c.publish("ws/out", f"from-{name}".encode(), qos=1).wait_for_publish(30)
        finally:
            c.loop_stop()
            c.disconnect()
    print("OK paho", flush=True)


def upgrade(port, path="/mqtt"):
    """A socket after the WebSocket handshake, or the HTTP status line if refused."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            break
        head += chunk
    status = head.split(b"\r\n", 1)[0].decode()
    if " 101 " not in status:
        return None, status
    if b"sec-websocket-protocol: mqtt" not in head.lower():
        fail(f"no mqtt subprotocol in the answer: {head!r}")
    return s, status


def frame(opcode, payload):
    """A masked client frame (RFC 6455 5.2), FIN set."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_frame(s):
    """(opcode, payload) of the next server frame, or None at the end of the stream."""
    def exactly(n):
        out = b""
        while len(out) < n:
            chunk = s.recv(n - len(out))
            if not chunk:
                return None
            out += chunk
        return out
    head = exactly(2)
    if head is None:
        return None
    n = head[1] & 0x7F
    if n == 126:
        n = struct.unpack(">H", exactly(2))[0]
    elif n == 127:
        n = struct.unpack(">Q", exactly(8))[0]
    return head[0] & 0x0F, exactly(n)


def mqtt_string(text):
    return struct.pack(">H", len(text)) + text.encode()


def packet(kind, body):
    n, length = len(body), b""
    while True:
        byte, n = n % 128, n // 128
        length += bytes([byte | (0x80 if n else 0)])
        if not n:
            return bytes([kind]) + length + body


def frames(ws_port):
    s, status = upgrade(ws_port)
    if s is None:
        fail(f"upgrade refused: {status}")
    connect = packet(0x10, mqtt_string("MQTT") + bytes([4, 2]) + struct.pack(">H", 30)
                     + mqtt_string("frames"))
    s.sendall(frame(2, connect[:7]) + frame(2, connect[7:]))
    op, data = read_frame(s)
    if (op, data) != (2, bytes([0x20, 2, 0, 0])):
        fail(f"expected CONNACK, got {op} {data!r}")
    subscribe = packet(0x82, struct.pack(">H", 1) + mqtt_string("frames/t") + bytes([0]))
    publish = packet(0x30, mqtt_string("frames/t") + b"two packets, one frame")
    s.sendall(frame(2, subscribe + publish))
    got = b""
    while b"two packets, one frame" not in got:
        f = read_frame(s)
        if f is None:
            fail(f"closed before the message came back: {got!r}")
        got += f[1]
    if got[0] != 0x90:
        fail(f"expected SUBACK first, got {got!r}")
    s.sendall(frame(9, b"are you there"))
    f = read_frame(s)
    if f != (10, b"are you there"):
        fail(f"expected a pong, got {f}")

    # A text frame ends that connection only.
    bad, _ = upgrade(ws_port)
    bad.sendall(frame(1, b"not binary"))
    while True:
        f = read_frame(bad)
        if f is None or f[0] == 8:
            break
    refused, status = upgrade(ws_port, "/elsewhere")
    if refused is not None or " 404 " not in status:
        fail(f"another path was not refused: {status}")
    s.sendall(frame(2, packet(0x30, mqtt_string("frames/t") + b"still here")))
    got = b""
    while b"still here" not in got:
        f = read_frame(s)
        if f is None:
            fail("the good connection went with the bad one")
        got += f[1]
    s.sendall(frame(2, bytes([0xE0, 0])) + frame(8, b""))
    print("OK frames", flush=True)


def main():
    mode = sys.argv[1]
    if mode == "paho":
        paho(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
    elif mode == "frames":
        frames(int(sys.argv[2]))
    else:
        fail(f"unknown mode {mode}")


main()
