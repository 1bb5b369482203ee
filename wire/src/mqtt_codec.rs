//! MQTT framing on `rumqttc`'s packet codecs, sans-I/O.
//!
//! The broker works in MQTT 5 packet types throughout; a 3.1.1 connection's packets
//! are converted on the way in and out here, so the rest of the broker has one shape
//! to handle. Which version a connection speaks is read from its CONNECT.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectReturnCode, Disconnect, DisconnectReasonCode, Filter, LastWill, Login,
    Packet, PubAck, PubAckReason, PubComp, PubRec, PubRecReason, PubRel, Publish,
    RetainForwardRule, Subscribe, SubscribeReasonCode, Unsubscribe,
};
use rumqttc::v5::mqttbytes::{self as v5bytes, QoS};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4)
    V311,
    /// MQTT 5.0
    V5,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("the first packet is not CONNECT")]
    NotConnect,
    #[error("protocol name is not MQTT")]
    InvalidProtocolName,
    #[error("unsupported protocol level {0}")]
    UnsupportedLevel(u8),
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge { size: usize, max: u32 },
    #[error("malformed packet: {0}")]
    Malformed(String),
}

/// A packet's fixed header: its length and the remaining length it announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FixedHeader {
    len: usize,
    remaining: usize,
}

impl FixedHeader {
    /// Reads the fixed header at the front of `buf`; `Ok(None)`: more bytes needed.
    fn read(buf: &[u8]) -> Result<Option<Self>, CodecError> {
        let mut remaining = 0usize;
        // Remaining length: a variable byte integer of 1 to 4 bytes after byte 1.
        for i in 0..4 {
            let Some(&b) = buf.get(1 + i) else {
                return Ok(None);
            };
            remaining |= usize::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(Some(Self {
                    len: 2 + i,
                    remaining,
                }));
            }
        }
        Err(CodecError::Malformed(
            "remaining length over 4 bytes".into(),
        ))
    }

    fn frame_len(self) -> usize {
        self.len + self.remaining
    }
}

/// Reads the protocol version from the start of a CONNECT packet. `Ok(None)`: more
/// bytes needed.
pub fn connect_version(buf: &[u8]) -> Result<Option<Version>, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != 0x10 {
        return Err(CodecError::NotConnect);
    }
    let Some(header) = FixedHeader::read(buf)? else {
        return Ok(None);
    };
    let pos = header.len;
    let Some(len) = buf.get(pos..pos + 2) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    let Some(name) = buf.get(pos + 2..pos + 2 + len) else {
        return Ok(None);
    };
    let Some(&level) = buf.get(pos + 2 + len) else {
        return Ok(None);
    };
    match (name, level) {
        (b"MQTT", 4) => Ok(Some(Version::V311)),
        (b"MQTT", 5) => Ok(Some(Version::V5)),
        (b"MQTT", level) => Err(CodecError::UnsupportedLevel(level)),
        (b"MQIsdp", level) => Err(CodecError::UnsupportedLevel(level)),
        _ => Err(CodecError::InvalidProtocolName),
    }
}

/// Decodes one packet from the front of `buf`; `Ok(None)` if it is not complete yet.
/// `max` bounds the remaining length, checked before the body has arrived.
///
/// The whole frame is in `buf` before rumqttc sees it, so any error it reports,
/// "insufficient bytes" included, is a malformed packet, never a wait for more.
pub fn decode(
    version: Version,
    buf: &mut BytesMut,
    max: u32,
) -> Result<Option<Packet>, CodecError> {
    let Some(header) = FixedHeader::read(buf)? else {
        return Ok(None);
    };
    if header.remaining > max as usize {
        return Err(CodecError::TooLarge {
            size: header.remaining,
            max,
        });
    }
    if buf.len() < header.frame_len() {
        return Ok(None);
    }
    match version {
        Version::V5 => {
            if let Some(disconnect) = short_disconnect(buf, header)? {
                return Ok(Some(disconnect));
            }
            Packet::read(buf, Some(max))
                .map(Some)
                .map_err(|e| CodecError::Malformed(e.to_string()))
        }
        Version::V311 => match v4::Packet::read(buf, max as usize) {
            Ok(p) => from_v4(p).map(Some),
            Err(e) => Err(CodecError::Malformed(e.to_string())),
        },
    }
}

/// The two short forms of an MQTT 5 DISCONNECT, which rumqttc 0.25 refuses: remaining
/// length 0 (reason 0x00, §3.14.2.1) and a reason code alone (§3.14.2.2.1). Takes the
/// frame from `buf` if it is one of them.
fn short_disconnect(buf: &mut BytesMut, header: FixedHeader) -> Result<Option<Packet>, CodecError> {
    const DISCONNECT: u8 = 0xE0;
    if buf.first() != Some(&DISCONNECT) || header.remaining > 1 {
        return Ok(None);
    }
    let frame = buf.split_to(header.frame_len());
    let reason = match frame.get(header.len) {
        None => DisconnectReasonCode::NormalDisconnection,
        Some(&code) => DisconnectReasonCode::try_from(code).map_err(|_| {
            CodecError::Malformed(format!("unknown DISCONNECT reason code {code:#04x}"))
        })?,
    };
    Ok(Some(Packet::Disconnect(Disconnect::new(reason))))
}

/// Appends `packet` to `out` in the connection's version. Packets that 3.1.1 has no
/// form for (DISCONNECT from the server, AUTH) write nothing.
pub fn encode(version: Version, packet: &Packet, out: &mut BytesMut) -> Result<(), CodecError> {
    let result = match version {
        Version::V5 => packet.write(out, None).map(drop).map_err(|e| e.to_string()),
        Version::V311 => match to_v4(packet) {
            Some(p) => p
                .write(out, usize::MAX)
                .map(drop)
                .map_err(|e| e.to_string()),
            None => Ok(()),
        },
    };
    result.map_err(CodecError::Malformed)
}

fn from_v4(packet: v4::Packet) -> Result<Packet, CodecError> {
    Ok(match packet {
        v4::Packet::Connect(c) => {
            let will = c.last_will.map(|w| LastWill {
                topic: Bytes::from(w.topic),
                message: w.message,
                qos: to5(w.qos),
                retain: w.retain,
                properties: None,
            });
            let login = c.login.map(|l| Login {
                username: l.username,
                password: l.password,
            });
            let connect = Connect {
                keep_alive: c.keep_alive,
                client_id: c.client_id,
                clean_start: c.clean_session,
                properties: None,
            };
            Packet::Connect(connect, will, login)
        }
        v4::Packet::Publish(p) => Packet::Publish(Publish {
            dup: p.dup,
            qos: to5(p.qos),
            retain: p.retain,
            topic: Bytes::from(p.topic),
            pkid: p.pkid,
            payload: p.payload,
            properties: None,
        }),
        v4::Packet::PubAck(p) => Packet::PubAck(PubAck::new(p.pkid, None)),
        v4::Packet::PubRec(p) => Packet::PubRec(PubRec::new(p.pkid, None)),
        v4::Packet::PubRel(p) => Packet::PubRel(PubRel::new(p.pkid, None)),
        v4::Packet::PubComp(p) => Packet::PubComp(PubComp::new(p.pkid, None)),
        v4::Packet::Subscribe(s) => Packet::Subscribe(Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| Filter {
                    path: f.path,
                    qos: to5(f.qos),
                    nolocal: false,
                    preserve_retain: false,
                    retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                })
                .collect(),
            properties: None,
        }),
        v4::Packet::Unsubscribe(u) => Packet::Unsubscribe(Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
            properties: None,
        }),
        v4::Packet::PingReq => Packet::PingReq(v5bytes::v5::PingReq),
        v4::Packet::Disconnect => {
            Packet::Disconnect(Disconnect::new(DisconnectReasonCode::NormalDisconnection))
        }
        other => {
            return Err(CodecError::Malformed(format!(
                "a client does not send {:?}",
                packet_kind_v4(&other)
            )));
        }
    })
}

fn packet_kind_v4(p: &v4::Packet) -> &'static str {
    match p {
        v4::Packet::ConnAck(_) => "CONNACK",
        v4::Packet::SubAck(_) => "SUBACK",
        v4::Packet::UnsubAck(_) => "UNSUBACK",
        v4::Packet::PingResp => "PINGRESP",
        _ => "this packet",
    }
}

fn to_v4(packet: &Packet) -> Option<v4::Packet> {
    Some(match packet {
        Packet::ConnAck(c) => v4::Packet::ConnAck(v4::ConnAck::new(
            match c.code {
                ConnectReturnCode::Success => v4::ConnectReturnCode::Success,
                ConnectReturnCode::RefusedProtocolVersion
                | ConnectReturnCode::UnsupportedProtocolVersion => {
                    v4::ConnectReturnCode::RefusedProtocolVersion
                }
                ConnectReturnCode::BadClientId | ConnectReturnCode::ClientIdentifierNotValid => {
                    v4::ConnectReturnCode::BadClientId
                }
                ConnectReturnCode::BadUserNamePassword => {
                    v4::ConnectReturnCode::BadUserNamePassword
                }
                ConnectReturnCode::NotAuthorized => v4::ConnectReturnCode::NotAuthorized,
                _ => v4::ConnectReturnCode::ServiceUnavailable,
            },
            c.session_present,
        )),
        Packet::Publish(p) => v4::Packet::Publish(v4::Publish {
            dup: p.dup,
            qos: to4(p.qos),
            retain: p.retain,
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            pkid: p.pkid,
            payload: p.payload.clone(),
        }),
        Packet::PubAck(p) => v4::Packet::PubAck(v4::PubAck::new(p.pkid)),
        Packet::PubRec(p) => v4::Packet::PubRec(v4::PubRec::new(p.pkid)),
        Packet::PubRel(p) => v4::Packet::PubRel(v4::PubRel::new(p.pkid)),
        Packet::PubComp(p) => v4::Packet::PubComp(v4::PubComp::new(p.pkid)),
        Packet::SubAck(s) => v4::Packet::SubAck(v4::SubAck::new(
            s.pkid,
            s.return_codes
                .iter()
                .map(|c| match c {
                    SubscribeReasonCode::Success(q) => v4::SubscribeReasonCode::Success(to4(*q)),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Packet::UnsubAck(u) => v4::Packet::UnsubAck(v4::UnsubAck::new(u.pkid)),
        Packet::PingResp(_) => v4::Packet::PingResp,
        _ => return None,
    })
}

fn to5(q: rumqttc::QoS) -> QoS {
    match q {
        rumqttc::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn to4(q: QoS) -> rumqttc::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

/// A PUBACK or PUBREC for a publish at `qos` (1 or 2).
pub fn publish_ack(qos: QoS, pkid: u16, outcome: PublishOutcome) -> Packet {
    match qos {
        QoS::ExactlyOnce => {
            let mut rec = PubRec::new(pkid, None);
            rec.reason = match outcome {
                PublishOutcome::Stored => PubRecReason::Success,
                PublishOutcome::NoSubscribers => PubRecReason::NoMatchingSubscribers,
                PublishOutcome::Failed => PubRecReason::UnspecifiedError,
                PublishOutcome::NotAuthorized => PubRecReason::NotAuthorized,
            };
            Packet::PubRec(rec)
        }
        _ => {
            let mut ack = PubAck::new(pkid, None);
            ack.reason = match outcome {
                PublishOutcome::Stored => PubAckReason::Success,
                PublishOutcome::NoSubscribers => PubAckReason::NoMatchingSubscribers,
                PublishOutcome::Failed => PubAckReason::UnspecifiedError,
                PublishOutcome::NotAuthorized => PubAckReason::NotAuthorized,
            };
            Packet::PubAck(ack)
        }
    }
}

/// What became of a client's publish, as its PUBACK or PUBREC says (MQTT 5; 3.1.1
/// acknowledgements carry no reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishOutcome {
    Stored,
    NoSubscribers,
    Failed,
    NotAuthorized,
}

/// The CONNACK refusing a connection, in the shape its version takes.
pub fn refuse(code: ConnectReturnCode) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present: false,
        code,
        properties: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_bytes(version: Version) -> BytesMut {
        let mut out = BytesMut::new();
        match version {
            Version::V5 => Packet::Connect(
                Connect {
                    keep_alive: 10,
                    client_id: "c".into(),
                    clean_start: true,
                    properties: None,
                },
                None,
                None,
            )
            .write(&mut out, None)
            .map(drop)
            .unwrap(),
            Version::V311 => {
                v4::Packet::Connect(v4::Connect::new("c"))
                    .write(&mut out, 1000)
                    .unwrap();
            }
        }
        out
    }

    #[test]
    fn version_from_connect() {
        for v in [Version::V311, Version::V5] {
            let bytes = connect_bytes(v);
            for cut in 0..9 {
                assert_eq!(connect_version(&bytes[..cut]), Ok(None), "cut {cut}");
            }
            assert_eq!(connect_version(&bytes), Ok(Some(v)));
            let mut buf = bytes.clone();
            assert!(matches!(
                decode(v, &mut buf, 1000),
                Ok(Some(Packet::Connect(..)))
            ));
        }
        assert_eq!(connect_version(b"\x20\x02"), Err(CodecError::NotConnect));
        let mut bad = connect_bytes(Version::V311);
        bad[8] = 3;
        assert_eq!(connect_version(&bad), Err(CodecError::UnsupportedLevel(3)));
        let mut bad = connect_bytes(Version::V311);
        bad[4] = b'X';
        assert_eq!(connect_version(&bad), Err(CodecError::InvalidProtocolName));
    }

    #[test]
    fn too_large_before_body_arrives() {
        // PUBLISH with a remaining length of 2 MiB, only the fixed header sent.
        let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x80, 0x01][..]);
        assert!(matches!(
            decode(Version::V311, &mut buf, 1024),
            Err(CodecError::TooLarge { .. })
        ));
        let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x80, 0x01][..]);
        assert!(matches!(
            decode(Version::V5, &mut buf, 1024),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn v311_publish_round_trip() {
        let p = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: Bytes::from_static(b"a/b"),
            pkid: 7,
            payload: Bytes::from_static(b"hi"),
            properties: None,
        });
        let mut out = BytesMut::new();
        encode(Version::V311, &p, &mut out).unwrap();
        assert_eq!(decode(Version::V311, &mut out, 1000).unwrap(), Some(p));
    }

    /// A QoS 0 publish and a retained-message delete, each as its version writes them.
    fn publish_then_delete(version: Version) -> BytesMut {
        let mut out = BytesMut::new();
        for (retain, payload) in [(false, &b"reading"[..]), (true, &b""[..])] {
            let p = Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain,
                topic: Bytes::from_static(b"s/1"),
                pkid: 0,
                payload: Bytes::copy_from_slice(payload),
                properties: None,
            });
            encode(version, &p, &mut out).unwrap();
        }
        out
    }

    fn decode_all(version: Version, buf: &mut BytesMut) -> Result<Vec<Packet>, CodecError> {
        let mut packets = Vec::new();
        while let Some(p) = decode(version, buf, 1000)? {
            packets.push(p);
        }
        Ok(packets)
    }

    #[test]
    fn short_disconnect_forms_after_publishes_in_one_write() {
        let normal = DisconnectReasonCode::NormalDisconnection;
        let cases: [(&[u8], DisconnectReasonCode); 4] = [
            (b"\xE0\x00", normal),
            (b"\xE0\x01\x00", normal),
            (
                b"\xE0\x01\x04",
                DisconnectReasonCode::DisconnectWithWillMessage,
            ),
            (b"\xE0\x02\x00\x00", normal),
        ];
        for (disconnect, reason) in cases {
            let mut bytes = publish_then_delete(Version::V5);
            bytes.extend_from_slice(disconnect);
            // Every cut: the packets complete before it decode, the rest waits whole.
            for cut in 0..bytes.len() {
                let mut buf = BytesMut::from(&bytes[..cut]);
                let packets = decode_all(Version::V5, &mut buf).unwrap();
                let used: usize = packets.iter().map(Packet::size).sum();
                assert_eq!(used + buf.len(), cut, "{disconnect:x?} cut {cut}");
                assert!(packets.len() < 3, "{disconnect:x?} cut {cut}");
            }
            let mut buf = bytes.clone();
            let packets = decode_all(Version::V5, &mut buf).unwrap();
            assert!(buf.is_empty());
            assert!(
                matches!(&packets[..], [Packet::Publish(a), Packet::Publish(b), Packet::Disconnect(d)]
                if !a.retain && b.retain && b.payload.is_empty() && d.reason_code == reason)
            );
        }
        // 3.1.1 has one form.
        let mut buf = publish_then_delete(Version::V311);
        buf.extend_from_slice(b"\xE0\x00");
        let packets = decode_all(Version::V311, &mut buf).unwrap();
        assert!(
            matches!(&packets[..], [Packet::Publish(_), Packet::Publish(_), Packet::Disconnect(d)]
            if d.reason_code == normal)
        );
    }

    #[test]
    fn a_whole_frame_that_does_not_parse_is_malformed_not_incomplete() {
        let bad: [&[u8]; 4] = [
            b"\xE0\x01\xFF",             // unknown reason code
            b"\x30\x01\x00",             // PUBLISH too short for its topic length
            b"\xE0\x03\x00\x05\x11",     // property length beyond the packet
            b"\x30\xFF\xFF\xFF\xFF\x01", // remaining length of 5 bytes
        ];
        for bytes in bad {
            let mut buf = BytesMut::from(bytes);
            assert!(
                matches!(
                    decode(Version::V5, &mut buf, 1000),
                    Err(CodecError::Malformed(_))
                ),
                "{bytes:x?}"
            );
        }
        let mut buf = BytesMut::from(&b"\x30\x01\x00"[..]);
        assert!(matches!(
            decode(Version::V311, &mut buf, 1000),
            Err(CodecError::Malformed(_))
        ));
    }
}
