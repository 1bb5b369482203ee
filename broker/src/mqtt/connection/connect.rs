//! The CONNECT phase: the first packet read and checked, the client admitted by the
//! gate and `[[auth.acl]]`, the session stored, CONNACK queued.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnAckProperties, Connect, ConnectReturnCode, LastWill, LastWillProperties, Packet,
};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use super::outbound::Outbound;
use super::{Conn, Peer};
use crate::acl::{Operation, Resource, Subject};
use crate::auth::{Gate, Refusal};
use crate::mqtt::MqttConfig;
use crate::mqtt::broker::{Message, MessageProperties, MqttBroker, NEVER_EXPIRES, Will};
use crate::storage::{WriteError, now_ms};
use crate::tls::Stream;
use weir_wire::mqtt_codec::{self as codec, CodecError, Version};
use weir_wire::topics;

/// CONNACK "unacceptable protocol version" in MQTT 3.1.1's form (type 2, length 2,
/// no session, return code 1): what a client of an unknown level can read.
const CONNACK_UNACCEPTABLE_PROTOCOL: [u8; 4] = [0x20, 0x02, 0x00, 0x01];
/// The keep-alive a client states is waited one and a half times (MQTT 3.1.2.10).
const KEEP_ALIVE_MS_PER_SEC: u64 = 1500;

/// Why a connection ended before its session started.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    #[error("no CONNECT in time")]
    Timeout,
    #[error("closed before CONNECT")]
    Closed,
    #[error("read: {0}")]
    Io(std::io::Error),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("the first packet is not CONNECT")]
    NotConnect,
    /// Told to the client with `code`.
    #[error("refused ({code:?}): {reason}")]
    Refused {
        code: ConnectReturnCode,
        reason: &'static str,
    },
    #[error("cannot store the session: {0}")]
    Store(WriteError),
}

/// Reads and checks CONNECT, stores the session, and queues CONNACK. `Err`: a protocol
/// error; the client was told when the protocol says so.
pub(super) async fn accept(
    broker: MqttBroker,
    settings: Arc<MqttConfig>,
    gate: &Arc<Gate>,
    mut stream: Stream,
    peer: Peer,
    stop: watch::Receiver<bool>,
) -> Result<Box<Conn>, ConnectError> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = Instant::now() + Duration::from_millis(settings.connect_timeout_ms);
    let version = loop {
        match codec::connect_version(&buf) {
            Ok(Some(v)) => break v,
            Ok(None) => read_before(&mut stream, &mut buf, deadline).await?,
            Err(CodecError::UnsupportedLevel(level)) => {
                // The 3.1.1 form: a client of another level reads its return code.
                let _ = stream.send(&CONNACK_UNACCEPTABLE_PROTOCOL).await;
                broker.metrics().refused_connects.inc();
                return Err(CodecError::UnsupportedLevel(level).into());
            }
            Err(e) => return Err(e.into()),
        }
    };
    let packet = loop {
        match codec::decode(version, &mut buf, settings.max_packet_size) {
            Ok(Some(p)) => break p,
            Ok(None) => read_before(&mut stream, &mut buf, deadline).await?,
            Err(e) => {
                let code = match e {
                    CodecError::TooLarge { .. } => ConnectReturnCode::PacketTooLarge,
                    _ => ConnectReturnCode::MalformedPacket,
                };
                write_packet(&mut stream, version, &codec::refuse(code)).await;
                return Err(e.into());
            }
        }
    };
    let Packet::Connect(connect, will, login) = packet else {
        return Err(ConnectError::NotConnect);
    };
    let checked = check_connect(version, &connect, will, &settings);
    let admitted = match checked {
        Ok(accepted) => {
            let credentials = login
                .as_ref()
                .map(|l| (l.username.as_str(), l.password.as_bytes()));
            let admitted = match &peer.identity {
                Some(identity) => Ok(gate.certified(identity)),
                None => gate.admit(peer.addr.ip(), credentials).await,
            };
            match admitted {
                Ok(principal) => {
                    // A will is a publish: refused at CONNECT, as Mosquitto does.
                    let will_allowed = accepted.will.as_ref().is_none_or(|w| {
                        let who = Subject {
                            principal: &principal,
                            client_id: &accepted.client_id,
                        };
                        gate.authorize(who, Operation::Publish, Resource::Topic(&w.message.topic))
                    });
                    if will_allowed {
                        Ok((accepted, principal))
                    } else {
                        Err((
                            ConnectReturnCode::NotAuthorized,
                            "the will's topic is denied by [[auth.acl]]",
                        ))
                    }
                }
                Err(Refusal::BadCredentials) => Err((
                    ConnectReturnCode::BadUserNamePassword,
                    "bad user name or password",
                )),
                Err(Refusal::NotAuthorized) => Err((
                    ConnectReturnCode::NotAuthorized,
                    "no credentials, and anonymous clients are not allowed from here",
                )),
            }
        }
        Err(refused) => Err(refused),
    };
    let (accepted, principal) = match admitted {
        Ok(a) => a,
        Err((code, reason)) => {
            broker.metrics().refused_connects.inc();
            write_packet(&mut stream, version, &codec::refuse(code)).await;
            return Err(ConnectError::Refused { code, reason });
        }
    };
    let (connected, ops) = broker.connect(
        &accepted.client_id,
        connect.clean_start,
        accepted.expiry_secs,
    );
    if !ops.is_empty()
        && let Err(e) = broker.log().write(ops).await
    {
        write_packet(
            &mut stream,
            version,
            &codec::refuse(ConnectReturnCode::ServerUnavailable),
        )
        .await;
        broker.disconnected(
            &accepted.client_id,
            connected.link_id,
            connected.queued,
            connected.awaiting_rel,
            None,
            0,
        );
        return Err(ConnectError::Store(e));
    }
    broker.metrics().connects.inc();
    debug!(peer = %peer.addr, client = %accepted.client_id, ?version, session_present = connected.session_present, "MQTT client connected");

    let connack = Packet::ConnAck(ConnAck {
        session_present: connected.session_present,
        code: ConnectReturnCode::Success,
        properties: (version == Version::V5).then(|| ConnAckProperties {
            session_expiry_interval: None,
            receive_max: Some(settings.receive_maximum),
            max_qos: None,
            retain_available: Some(1),
            max_packet_size: Some(settings.max_packet_size),
            assigned_client_identifier: accepted.assigned.then(|| accepted.client_id.clone()),
            topic_alias_max: Some(settings.topic_alias_maximum),
            reason_string: None,
            user_properties: Vec::new(),
            wildcard_subscription_available: Some(1),
            subscription_identifiers_available: Some(1),
            shared_subscription_available: Some(1),
            server_keep_alive: accepted.server_keep_alive,
            response_information: None,
            server_reference: None,
            authentication_method: None,
            authentication_data: None,
        }),
    });
    let props = connect.properties.unwrap_or_default();
    let window = usize::from(
        props
            .receive_maximum
            .unwrap_or(u16::MAX)
            .min(settings.max_inflight)
            .max(1),
    );
    let mut conn = Box::new(Conn {
        broker: broker.clone(),
        settings: settings.clone(),
        version,
        client_id: accepted.client_id.clone(),
        link_id: connected.link_id,
        principal,
        gate: gate.clone(),
        stream,
        // What the client sent after CONNECT stays; an idle connection holds no buffer.
        buf: if buf.is_empty() { BytesMut::new() } else { buf },
        out: BytesMut::new(),
        rx: connected.rx,
        stop,
        acks: VecDeque::new(),
        inbound_pending: 0,
        batch: Vec::new(),
        awaiting_rel: connected.awaiting_rel,
        aliases_in: HashMap::new(),
        keep_alive: (accepted.keep_alive > 0)
            .then(|| Duration::from_millis(u64::from(accepted.keep_alive) * KEEP_ALIVE_MS_PER_SEC)),
        last_heard: Instant::now(),
        will: accepted.will.map(Box::new),
        expiry_secs: accepted.expiry_secs,
        out_state: Outbound {
            inflight: VecDeque::new(),
            pending: connected.queued.into(),
            next_pkid: 0,
            window,
            aliases: HashMap::new(),
            alias_max: props.topic_alias_max.unwrap_or(0),
            max_packet: props.max_packet_size,
        },
    });
    conn.queue(&connack);
    Ok(conn)
}

async fn read_before(
    stream: &mut Stream,
    buf: &mut BytesMut,
    deadline: Instant,
) -> Result<(), ConnectError> {
    match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
        Err(_) => Err(ConnectError::Timeout),
        Ok(Ok(0)) => Err(ConnectError::Closed),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(ConnectError::Io(e)),
    }
}

async fn write_packet(stream: &mut Stream, version: Version, packet: &Packet) {
    let mut out = BytesMut::new();
    if codec::encode(version, packet, &mut out).is_ok() {
        let _ = stream.send(&out).await;
    }
}

struct Accepted {
    client_id: String,
    assigned: bool,
    expiry_secs: u32,
    keep_alive: u16,
    server_keep_alive: Option<u16>,
    will: Option<Will>,
}

fn check_connect(
    version: Version,
    connect: &Connect,
    will: Option<LastWill>,
    settings: &MqttConfig,
) -> Result<Accepted, (ConnectReturnCode, &'static str)> {
    let props = connect.properties.clone().unwrap_or_default();
    if props.authentication_method.is_some() {
        return Err((
            ConnectReturnCode::BadAuthenticationMethod,
            "enhanced authentication is not supported",
        ));
    }
    if props.receive_maximum == Some(0) || props.max_packet_size == Some(0) {
        return Err((
            ConnectReturnCode::ProtocolError,
            "receive maximum or maximum packet size of 0",
        ));
    }
    let (client_id, assigned) = if connect.client_id.is_empty() {
        if version == Version::V311 && !connect.clean_start {
            return Err((
                ConnectReturnCode::BadClientId,
                "empty client id with a persistent session",
            ));
        }
        (format!("weir-{:016x}", rand::random::<u64>()), true)
    } else {
        (connect.client_id.clone(), false)
    };
    let expiry_secs = match version {
        Version::V311 if connect.clean_start => 0,
        Version::V311 => NEVER_EXPIRES,
        Version::V5 => props.session_expiry_interval.unwrap_or(0),
    };
    let max = settings.max_keep_alive_secs;
    let (keep_alive, server_keep_alive) = if max > 0
        && (connect.keep_alive == 0 || connect.keep_alive > max)
        && version == Version::V5
    {
        (max, Some(max))
    } else {
        (connect.keep_alive, None)
    };
    let will = match will {
        None => None,
        Some(w) => {
            let topic = String::from_utf8(w.topic.to_vec())
                .ok()
                .filter(|t| topics::valid_topic_name(t))
                .ok_or((ConnectReturnCode::TopicNameInvalid, "invalid will topic"))?;
            let wp = w.properties;
            let wp = LastWillProperties {
                delay_interval: wp.as_ref().and_then(|p| p.delay_interval),
                payload_format_indicator: wp.as_ref().and_then(|p| p.payload_format_indicator),
                message_expiry_interval: wp.as_ref().and_then(|p| p.message_expiry_interval),
                content_type: wp.as_ref().and_then(|p| p.content_type.clone()),
                response_topic: wp.as_ref().and_then(|p| p.response_topic.clone()),
                correlation_data: wp.as_ref().and_then(|p| p.correlation_data.clone()),
                user_properties: wp.map(|p| p.user_properties).unwrap_or_default(),
            };
            Some(Will {
                delay_secs: wp.delay_interval.unwrap_or(0),
                message: Message {
                    topic,
                    payload: w.message,
                    qos: w.qos as u8,
                    retain: w.retain,
                    properties: MessageProperties {
                        payload_format: wp.payload_format_indicator,
                        content_type: wp.content_type,
                        response_topic: wp.response_topic,
                        correlation_data: wp.correlation_data,
                        user_properties: wp.user_properties,
                    },
                    from: client_id.clone(),
                    expires_at_ms: wp
                        .message_expiry_interval
                        .map(|s| now_ms() + i64::from(s) * 1000),
                },
            })
        }
    };
    Ok(Accepted {
        client_id,
        assigned,
        expiry_secs,
        keep_alive,
        server_keep_alive,
        will,
    })
}
