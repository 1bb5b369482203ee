//! MQTT framing on `rumqttc`'s packet codecs, sans-I/O.
//!
//! The broker works in MQTT 5 packet types throughout; a 3.1.1 connection's packets
//! are converted on the way in and out here, so the rest of the broker has one shape
//! to handle. Which version a connection speaks is read from its CONNECT.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectReturnCode, Filter, LastWill, Login, Packet, PubAck, PubAckReason,
    PubComp, PubRec, PubRecReason, PubRel, Publish, RetainForwardRule, Subscribe,
    SubscribeReasonCode, Unsubscribe,
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

/// Reads the protocol version from the start of a CONNECT packet. `Ok(None)`: more
/// bytes needed.
pub fn connect_version(buf: &[u8]) -> Result<Option<Version>, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != 0x10 {
        return Err(CodecError::NotConnect);
    }
    // Remaining length: 1 to 4 bytes.
    let mut pos = 1;
    loop {
        let Some(&b) = buf.get(pos) else {
            return Ok(None);
        };
        pos += 1;
        if b & 0x80 == 0 {
            break;
        }
        if pos > 4 {
            return Err(CodecError::Malformed(
                "remaining length over 4 bytes".into(),
            ));
        }
    }
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
pub fn decode(
    version: Version,
    buf: &mut BytesMut,
    max: u32,
) -> Result<Option<Packet>, CodecError> {
    match version {
        Version::V5 => match Packet::read(buf, Some(max)) {
            Ok(p) => Ok(Some(p)),
            Err(v5bytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(v5bytes::Error::PayloadSizeLimitExceeded { pkt_size, max }) => {
                Err(CodecError::TooLarge {
                    size: pkt_size,
                    max,
                })
            }
            Err(e) => Err(CodecError::Malformed(e.to_string())),
        },
        Version::V311 => match v4::Packet::read(buf, max as usize) {
            Ok(p) => from_v4(p).map(Some),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size)) => {
                Err(CodecError::TooLarge { size, max })
            }
            Err(e) => Err(CodecError::Malformed(e.to_string())),
        },
    }
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
        v4::Packet::Disconnect => Packet::Disconnect(v5bytes::v5::Disconnect::new(
            v5bytes::v5::DisconnectReasonCode::NormalDisconnection,
        )),
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
pub fn publish_ack(qos: QoS, pkid: u16, ok: bool, no_subscribers: bool) -> Packet {
    match qos {
        QoS::ExactlyOnce => {
            let mut rec = PubRec::new(pkid, None);
            rec.reason = match (ok, no_subscribers) {
                (false, _) => PubRecReason::UnspecifiedError,
                (true, true) => PubRecReason::NoMatchingSubscribers,
                (true, false) => PubRecReason::Success,
            };
            Packet::PubRec(rec)
        }
        _ => {
            let mut ack = PubAck::new(pkid, None);
            ack.reason = match (ok, no_subscribers) {
                (false, _) => PubAckReason::UnspecifiedError,
                (true, true) => PubAckReason::NoMatchingSubscribers,
                (true, false) => PubAckReason::Success,
            };
            Packet::PubAck(ack)
        }
    }
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
}
