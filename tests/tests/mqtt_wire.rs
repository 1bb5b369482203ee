//! Bad input on the MQTT port, byte by byte: each case closes only its own
//! connection, as the spec says, with a reason code in MQTT 5; a healthy client
//! connected throughout keeps working.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Connect, DisconnectReasonCode, Packet, Publish};
use weir_tests::Broker;

const CONFIG: &str = "[mqtt]\nmax_packet_size = 1024\nconnect_timeout_ms = 500\n";

fn connect_bytes_v5(client: &str, keep_alive: u16) -> Vec<u8> {
    let mut out = BytesMut::new();
    Packet::Connect(
        Connect {
            keep_alive,
            client_id: client.into(),
            clean_start: true,
            properties: None,
        },
        None,
        None,
    )
    .write(&mut out, None)
    .unwrap();
    out.to_vec()
}

fn connect_bytes_v4(client: &str) -> Vec<u8> {
    let mut out = BytesMut::new();
    let mut c = v4::Connect::new(client);
    c.keep_alive = 30;
    v4::Packet::Connect(c).write(&mut out, 1 << 20).unwrap();
    out.to_vec()
}

fn open(broker: &Broker) -> TcpStream {
    let s = TcpStream::connect(broker.mqtt).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads v5 packets until the connection closes; returns them.
fn read_until_closed(s: &mut TcpStream) -> Vec<Packet> {
    let mut buf = BytesMut::new();
    let mut packets = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("connection not closed: {e}"),
        }
        while let Ok(p) = Packet::read(&mut buf, None) {
            packets.push(p);
        }
    }
    packets
}

fn connected_v5(broker: &Broker, client: &str, keep_alive: u16) -> TcpStream {
    let mut s = open(broker);
    s.write_all(&connect_bytes_v5(client, keep_alive)).unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    assert_eq!(buf[0], 0x20, "CONNACK expected, got {:?}", &buf[..n]);
    assert_eq!(buf[3], 0x00, "refused: {:?}", &buf[..n]);
    s
}

fn connected_v4(broker: &Broker, client: &str) -> TcpStream {
    let mut s = open(broker);
    s.write_all(&connect_bytes_v4(client)).unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(buf, [0x20, 0x02, 0x00, 0x00]);
    s
}

fn assert_disconnected_with(s: &mut TcpStream, code: DisconnectReasonCode) {
    let packets = read_until_closed(s);
    match packets.last() {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason_code, code),
        other => panic!("expected DISCONNECT {code:?}, got {other:?}"),
    }
}

fn publish_v5(topic: &[u8], payload_len: usize) -> Vec<u8> {
    let mut out = BytesMut::new();
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: bytes::Bytes::copy_from_slice(topic),
        pkid: 0,
        payload: vec![b'x'; payload_len].into(),
        properties: None,
    })
    .write(&mut out, None)
    .unwrap();
    out.to_vec()
}

#[test]
fn bad_input_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_with_config(&dir.path().join("d"), CONFIG);
    // A healthy subscriber, connected through everything below.
    let mut healthy = connected_v4(&broker, "healthy");
    let mut sub = BytesMut::new();
    v4::Packet::Subscribe(v4::Subscribe::new("ok/#", rumqttc::QoS::AtMostOnce))
        .write(&mut sub, 1 << 20)
        .unwrap();
    healthy.write_all(&sub).unwrap();
    let mut suback = [0u8; 5];
    healthy.read_exact(&mut suback).unwrap();
    assert_eq!(suback[0], 0x90);

    // Garbage instead of CONNECT.
    let mut s = open(&broker);
    s.write_all(b"\xde\xad\xbe\xef GET / HTTP/1.1\r\n\r\n")
        .unwrap();
    assert!(read_until_closed(&mut s).is_empty());

    // An invalid protocol name: closed without CONNACK.
    let mut bytes = connect_bytes_v4("p");
    bytes[4..8].copy_from_slice(b"MQTX");
    let mut s = open(&broker);
    s.write_all(&bytes).unwrap();
    assert!(read_until_closed(&mut s).is_empty());

    // A second CONNECT: MQTT 5 gets DISCONNECT 0x82, 3.1.1 is closed.
    let mut s = connected_v5(&broker, "twice5", 30);
    s.write_all(&connect_bytes_v5("twice5", 30)).unwrap();
    assert_disconnected_with(&mut s, DisconnectReasonCode::ProtocolError);
    let mut s = connected_v4(&broker, "twice4");
    s.write_all(&connect_bytes_v4("twice4")).unwrap();
    assert!(read_until_closed(&mut s).is_empty());

    // Larger than max_packet_size (1024): DISCONNECT 0x95.
    let mut s = connected_v5(&broker, "big", 30);
    s.write_all(&publish_v5(b"ok/big", 4096)).unwrap();
    assert_disconnected_with(&mut s, DisconnectReasonCode::PacketTooLarge);

    // Wildcards in a PUBLISH topic: DISCONNECT 0x90; 3.1.1 closed.
    let mut s = connected_v5(&broker, "wild5", 30);
    s.write_all(&publish_v5(b"ok/+", 1)).unwrap();
    assert_disconnected_with(&mut s, DisconnectReasonCode::TopicNameInvalid);
    let mut s = connected_v4(&broker, "wild4");
    let mut p = BytesMut::new();
    v4::Packet::Publish(v4::Publish::new("ok/#", rumqttc::QoS::AtMostOnce, "x"))
        .write(&mut p, 1 << 20)
        .unwrap();
    s.write_all(&p).unwrap();
    assert!(read_until_closed(&mut s).is_empty());

    // Invalid UTF-8 in a topic: DISCONNECT 0x81; 3.1.1 closed.
    let mut s = connected_v5(&broker, "utf5", 30);
    s.write_all(&publish_v5(b"ok/\xff\xfe", 1)).unwrap();
    assert_disconnected_with(&mut s, DisconnectReasonCode::MalformedPacket);
    let mut s = connected_v4(&broker, "utf4");
    s.write_all(&[0x30, 0x07, 0x00, 0x04, b'o', b'k', 0xff, 0xfe, b'x'])
        .unwrap();
    assert!(read_until_closed(&mut s).is_empty());

    // Connects and never sends CONNECT: closed after connect_timeout_ms.
    let mut s = open(&broker);
    let started = Instant::now();
    assert!(read_until_closed(&mut s).is_empty());
    assert!(started.elapsed() < Duration::from_secs(5));

    // Keep-alive of 1 s and silence: DISCONNECT 0x8D after 1.5 s.
    let mut s = connected_v5(&broker, "sleepy", 1);
    let started = Instant::now();
    assert_disconnected_with(&mut s, DisconnectReasonCode::KeepAliveTimeout);
    assert!(started.elapsed() >= Duration::from_millis(1200));

    // Nothing else was disturbed: the healthy subscriber still gets messages.
    let mut s = connected_v4(&broker, "publisher");
    let mut p = BytesMut::new();
    v4::Packet::Publish(v4::Publish::new(
        "ok/fine",
        rumqttc::QoS::AtMostOnce,
        "still here",
    ))
    .write(&mut p, 1 << 20)
    .unwrap();
    s.write_all(&p).unwrap();
    let mut got = BytesMut::new();
    let mut chunk = [0u8; 256];
    let packet = loop {
        let n = healthy.read(&mut chunk).unwrap();
        assert!(n > 0, "healthy connection closed");
        got.extend_from_slice(&chunk[..n]);
        if let Ok(p) = v4::Packet::read(&mut got, 1 << 20) {
            break p;
        }
    };
    match packet {
        v4::Packet::Publish(p) => assert_eq!(&p.payload[..], b"still here"),
        other => panic!("{other:?}"),
    }
    assert!(broker.metric("weir_mqtt_protocol_errors_total") >= 9.0);
}
