//! MQTT 5 behaviours an outside conformance suite found missing, at the byte level:
//! the short forms of a normal DISCONNECT (no will, nothing sent before it lost), and
//! a SUBSCRIBE racing a retained publish (the subscriber gets it, live or retained).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    Connect, Filter, LastWill, Packet, PingReq, Publish, RetainForwardRule, Subscribe,
};
use weir_tests::Broker;

/// A raw MQTT 5 client: packets written as given, packets read as they come.
struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    fn connect(broker: &Broker, client: &str, will: Option<LastWill>) -> Raw {
        let stream = TcpStream::connect(broker.mqtt).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        let mut raw = Raw {
            stream,
            buf: BytesMut::new(),
        };
        let connect = Connect {
            keep_alive: 60,
            client_id: client.into(),
            clean_start: true,
            properties: None,
        };
        raw.send(&[Packet::Connect(connect, will, None)]);
        match raw.next() {
            Some(Packet::ConnAck(ack)) => assert_eq!(ack.code as u8, 0, "{client} refused"),
            other => panic!("{client}: CONNACK expected, got {other:?}"),
        }
        raw
    }

    /// Writes the packets, then `tail`, in one write.
    fn send_then(&mut self, packets: &[Packet], tail: &[u8]) {
        let mut out = BytesMut::new();
        for p in packets {
            p.write(&mut out, None).unwrap();
        }
        out.extend_from_slice(tail);
        self.stream.write_all(&out).unwrap();
    }

    fn send(&mut self, packets: &[Packet]) {
        self.send_then(packets, &[]);
    }

    /// The next packet; `None` once the broker closed the connection.
    fn next(&mut self) -> Option<Packet> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Ok(p) = Packet::read(&mut self.buf, None) {
                return Some(p);
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("no packet within the read timeout: {e}"),
            }
        }
    }

    /// Packets up to and including the first one `done` accepts.
    fn until(&mut self, done: impl Fn(&Packet) -> bool) -> Vec<Packet> {
        let mut got = Vec::new();
        loop {
            let p = self.next().expect("connection closed");
            let last = done(&p);
            got.push(p);
            if last {
                return got;
            }
        }
    }

    fn subscribe(&mut self, filters: &[&str]) {
        self.send(&[subscribe(1, filters)]);
        let got = self.until(|p| matches!(p, Packet::SubAck(_)));
        assert_eq!(got.len(), 1, "only SUBACK expected: {got:?}");
    }

    /// Every PUBLISH that arrives before the answer to a PINGREQ sent now.
    fn publishes_before_ping(&mut self) -> Vec<Publish> {
        self.send(&[Packet::PingReq(PingReq)]);
        self.until(|p| matches!(p, Packet::PingResp(_)))
            .into_iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some(p),
                _ => None,
            })
            .collect()
    }
}

fn publish(topic: &str, payload: &[u8], qos: QoS, retain: bool, pkid: u16) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain,
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        pkid,
        payload: Bytes::copy_from_slice(payload),
        properties: None,
    })
}

fn subscribe(pkid: u16, filters: &[&str]) -> Packet {
    Packet::Subscribe(Subscribe {
        pkid,
        filters: filters
            .iter()
            .map(|f| Filter {
                path: f.to_string(),
                qos: QoS::AtLeastOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::OnEverySubscribe,
            })
            .collect(),
        properties: None,
    })
}

fn will(topic: &str) -> LastWill {
    LastWill {
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        message: Bytes::from_static(b"died"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: None,
    }
}

fn wait_connections(broker: &Broker, count: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker.metric("weir_mqtt_connections") != count {
        assert!(
            Instant::now() < deadline,
            "connections never reached {count}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `E0 00` and `E0 01 00`, each written together with a QoS 0 publish and a
/// retained-message delete before it: the publish is delivered, the retained
/// message is gone, the will is not published, and the broker sends no DISCONNECT.
/// Then a connection that just closes: its will is published, which shows the
/// will check above would have seen one.
#[test]
fn short_disconnect_forms_complete_what_came_before_and_keep_the_will() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("d"), &[]);
    let mut watcher = Raw::connect(&broker, "watcher", None);
    watcher.subscribe(&["d/#", "will/#"]);
    let mut keeper = Raw::connect(&broker, "keeper", None);

    for (form, disconnect) in [("zero", &b"\xE0\x00"[..]), ("reason", &b"\xE0\x01\x00"[..])] {
        keeper.send(&[publish(
            &format!("r/{form}"),
            b"old",
            QoS::AtLeastOnce,
            true,
            1,
        )]);
        keeper.until(|p| matches!(p, Packet::PubAck(_)));

        let mut device = Raw::connect(&broker, &format!("dev-{form}"), Some(will("will/x")));
        device.send_then(
            &[
                publish(&format!("d/{form}"), b"live", QoS::AtMostOnce, false, 0),
                publish(&format!("r/{form}"), b"", QoS::AtMostOnce, true, 0),
            ],
            disconnect,
        );
        let answered: Vec<Packet> = std::iter::from_fn(|| device.next()).collect();
        assert!(
            answered.is_empty(),
            "{form}: the broker answered {answered:?}"
        );

        let got = watcher.until(|p| matches!(p, Packet::Publish(_)));
        match got.last() {
            Some(Packet::Publish(p)) => {
                assert_eq!(&p.topic[..], format!("d/{form}").as_bytes());
                assert_eq!(&p.payload[..], b"live");
            }
            other => panic!("{form}: {other:?}"),
        }
        // The device's connection has ended (so its will, if any, went out): the
        // retained message is gone and no will reached the watcher.
        wait_connections(&broker, 2.0);
        let mut late = Raw::connect(&broker, &format!("late-{form}"), None);
        late.subscribe(&[&format!("r/{form}")]);
        let retained = late.publishes_before_ping();
        assert!(
            retained.is_empty(),
            "{form}: retained still there: {retained:?}"
        );
        drop(late);
        let stray = watcher.publishes_before_ping();
        assert!(stray.is_empty(), "{form}: will published: {stray:?}");
        wait_connections(&broker, 2.0);
    }

    // A connection that ends without DISCONNECT: the will goes out.
    let device = Raw::connect(&broker, "dev-vanish", Some(will("will/x")));
    drop(device);
    let got = watcher.until(|p| matches!(p, Packet::Publish(_)));
    match got.last() {
        Some(Packet::Publish(p)) => assert_eq!(&p.topic[..], b"will/x"),
        other => panic!("{other:?}"),
    }
}

/// A retained QoS 1 publish on one connection and, straight after, a SUBSCRIBE to
/// its topic on another, for many pairs at once: every subscriber gets the message
/// once, live or as a retained message.
#[test]
fn a_subscription_racing_a_retained_publish_gets_it() {
    const THREADS: usize = 8;
    const PAIRS_PER_THREAD: usize = 25;
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("d"), &[]);
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let broker = &broker;
            scope.spawn(move || {
                for i in 0..PAIRS_PER_THREAD {
                    let topic = format!("race/{t}/{i}");
                    let mut publisher = Raw::connect(broker, &format!("p{t}-{i}"), None);
                    let mut subscriber = Raw::connect(broker, &format!("s{t}-{i}"), None);
                    publisher.send(&[publish(&topic, b"m", QoS::AtLeastOnce, true, 1)]);
                    subscriber.send(&[subscribe(1, &[&topic])]);
                    publisher.until(|p| matches!(p, Packet::PubAck(_)));
                    let mut got = Vec::new();
                    for p in subscriber.until(|p| matches!(p, Packet::Publish(_))) {
                        if let Packet::Publish(p) = p {
                            got.push(p);
                        }
                    }
                    got.extend(subscriber.publishes_before_ping());
                    assert_eq!(got.len(), 1, "{topic}: {got:?}");
                    assert_eq!(&got[0].payload[..], b"m");
                }
            });
        }
    });
}
