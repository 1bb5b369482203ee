//! One MQTT connection: CONNECT, then a loop that reads packets, answers them in
//! order, and sends the deliveries the broker routes to this session.
//!
//! A QoS 1/2 PUBLISH whose writes (ingest records, retained message, messages owed
//! to persistent sessions) go to the log is acknowledged only once they committed;
//! acknowledgements leave in the order the PUBLISHes arrived, and the message reaches
//! subscribers at that same moment, so they never see what a crash could undo.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnAckProperties, Connect, ConnectReturnCode, Disconnect, DisconnectProperties,
    DisconnectReasonCode, LastWill, LastWillProperties, Packet, PingResp, PubComp, PubCompReason,
    PubRel, Publish, PublishProperties, RetainForwardRule, SubAck, Subscribe, SubscribeReasonCode,
    UnsubAck, UnsubAckReason, Unsubscribe,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info};

use super::MqttConfig;
use super::broker::{
    Delivery, Inbox, Message, MessageProperties, MqttBroker, NEVER_EXPIRES, Prepared, SubOptions,
    SubscribeRefusal, ToConnection, Will,
};
use crate::acl::{Operation, Resource, Subject};
use crate::auth::{Gate, Principal, Refusal};
use crate::storage::{WriteError, now_ms};
use crate::tls::Stream;
use weir_wire::mqtt_codec::{self as codec, CodecError, PublishOutcome, Version};
use weir_wire::topics;

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The client sent DISCONNECT; `will`: it asked for its will anyway (0x04).
    Clean { will: bool },
    /// The client vanished or broke the protocol; the will is published.
    Abnormal(String),
    /// The broker is shutting down, or another connection took the session.
    Server,
}

/// Who is at the other end of a connection, before CONNECT.
pub(super) struct Peer {
    pub(super) addr: SocketAddr,
    /// The TLS client certificate's identity: the user, with no password asked.
    pub(super) identity: Option<String>,
}

pub(super) async fn run(
    broker: MqttBroker,
    settings: Arc<MqttConfig>,
    gate: Arc<Gate>,
    stream: Stream,
    peer: Peer,
    stop: watch::Receiver<bool>,
) {
    let metrics = broker.metrics().clone();
    metrics.connections.inc();
    let addr = peer.addr;
    if let Err(reason) = handle(broker, settings, gate, stream, peer, stop).await {
        metrics.protocol_errors.inc();
        debug!(peer = %addr, %reason, "MQTT connection closed");
    }
    metrics.connections.dec();
}

/// Reads and checks CONNECT, then runs the session loop. `Err`: a protocol error
/// before the session started.
async fn handle(
    broker: MqttBroker,
    settings: Arc<MqttConfig>,
    gate: Arc<Gate>,
    stream: Stream,
    peer: Peer,
    stop: watch::Receiver<bool>,
) -> Result<(), String> {
    // Boxed: the CONNECT phase's futures would otherwise size every connection's task
    // for as long as it lives (idle devices are most of a gateway's connections).
    let mut conn = Box::pin(accept(broker.clone(), settings, &gate, stream, peer, stop)).await?;
    let end = conn.run().await;
    let Conn {
        client_id,
        link_id,
        out_state,
        awaiting_rel,
        will,
        expiry_secs,
        ..
    } = *conn;
    let will = match &end {
        End::Clean { will: true } | End::Abnormal(_) => will.map(|w| *w),
        End::Clean { will: false } | End::Server => None,
    };
    let leftover: Vec<Delivery> = out_state
        .inflight
        .into_iter()
        .map(|(_, d)| d)
        .chain(out_state.pending)
        .collect();
    broker.disconnected(
        &client_id,
        link_id,
        leftover,
        awaiting_rel,
        will,
        expiry_secs,
    );
    match end {
        End::Abnormal(reason) => Err(reason),
        _ => Ok(()),
    }
}

/// Reads and checks CONNECT, stores the session, and queues CONNACK. `Err`: a protocol
/// error; the client was told when the protocol says so.
async fn accept(
    broker: MqttBroker,
    settings: Arc<MqttConfig>,
    gate: &Arc<Gate>,
    mut stream: Stream,
    peer: Peer,
    stop: watch::Receiver<bool>,
) -> Result<Box<Conn>, String> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = Instant::now() + Duration::from_millis(settings.connect_timeout_ms);
    let version = loop {
        match codec::connect_version(&buf) {
            Ok(Some(v)) => break v,
            Ok(None) => read_before(&mut stream, &mut buf, deadline).await?,
            Err(CodecError::UnsupportedLevel(level)) => {
                // The 3.1.1 form: a client of another level reads its return code.
                let _ = stream.write_all(&[0x20, 0x02, 0x00, 0x01]).await;
                broker.metrics().refused_connects.inc();
                return Err(format!("unsupported protocol level {level}"));
            }
            Err(e) => return Err(e.to_string()),
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
                return Err(e.to_string());
            }
        }
    };
    let Packet::Connect(connect, will, login) = packet else {
        return Err("the first packet is not CONNECT".into());
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
                            "the will's topic is denied by [[auth.acl]]".to_string(),
                        ))
                    }
                }
                Err(Refusal::BadCredentials) => Err((
                    ConnectReturnCode::BadUserNamePassword,
                    "bad user name or password".to_string(),
                )),
                Err(Refusal::NotAuthorized) => Err((
                    ConnectReturnCode::NotAuthorized,
                    "no credentials, and anonymous clients are not allowed from here".to_string(),
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
            return Err(reason);
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
        return Err(format!("cannot store the session: {e}"));
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
            .then(|| Duration::from_millis(u64::from(accepted.keep_alive) * 1500)),
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

/// The oldest publish's write, once it completed: acknowledgements leave in the order
/// the publishes came. Only the oldest is polled: the others wait on the log's answers,
/// which arrive without being polled. Cancel-safe.
async fn oldest_ack(acks: &mut VecDeque<AckFuture>) -> Option<(Inbound, Result<(), WriteError>)> {
    let outcome = acks.front_mut()?.await;
    acks.pop_front();
    Some(outcome)
}

async fn read_before(
    stream: &mut Stream,
    buf: &mut BytesMut,
    deadline: Instant,
) -> Result<(), String> {
    match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
        Err(_) => Err("no CONNECT in time".into()),
        Ok(Ok(0)) => Err("closed before CONNECT".into()),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

async fn write_packet(stream: &mut Stream, version: Version, packet: &Packet) {
    let mut out = BytesMut::new();
    if codec::encode(version, packet, &mut out).is_ok() {
        let _ = stream.write_all(&out).await;
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
) -> Result<Accepted, (ConnectReturnCode, String)> {
    let props = connect.properties.clone().unwrap_or_default();
    if props.authentication_method.is_some() {
        return Err((
            ConnectReturnCode::BadAuthenticationMethod,
            "enhanced authentication is not supported".into(),
        ));
    }
    if props.receive_maximum == Some(0) || props.max_packet_size == Some(0) {
        return Err((
            ConnectReturnCode::ProtocolError,
            "receive maximum or maximum packet size of 0".into(),
        ));
    }
    let (client_id, assigned) = if connect.client_id.is_empty() {
        if version == Version::V311 && !connect.clean_start {
            return Err((
                ConnectReturnCode::BadClientId,
                "empty client id with a persistent session".into(),
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
                .ok_or((
                    ConnectReturnCode::TopicNameInvalid,
                    "invalid will topic".to_string(),
                ))?;
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

/// PUBLISHes read together, waiting for their writes, with what to do once they
/// committed: (QoS, packet id) per message, in arrival order.
struct Inbound {
    acks: Vec<(QoS, u16)>,
    prepared: Prepared,
    /// Denied by `[[auth.acl]]`: nothing was prepared, only the answer waits its turn.
    denied: bool,
}

/// Publishes read and not yet submitted: consecutive small ones are prepared and
/// written together.
const COALESCE_MAX: usize = 256;
const COALESCE_MAX_PAYLOAD: usize = 64 * 1024;

type AckFuture = Pin<Box<dyn Future<Output = (Inbound, Result<(), WriteError>)> + Send>>;

/// Messages to this client: those sent and not yet acknowledged (`inflight`, at
/// most `window`, the client's receive maximum), and those waiting (`pending`).
struct Outbound {
    inflight: VecDeque<(u16, Delivery)>,
    pending: VecDeque<Delivery>,
    next_pkid: u16,
    window: usize,
    aliases: HashMap<String, u16>,
    alias_max: u16,
    max_packet: Option<u32>,
}

impl Outbound {
    fn take(&mut self, pkid: u16) -> Option<Delivery> {
        let i = self.inflight.iter().position(|(p, _)| *p == pkid)?;
        self.inflight.remove(i).map(|(_, d)| d)
    }

    fn free_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.inflight.iter().any(|(p, _)| *p == self.next_pkid) {
                return self.next_pkid;
            }
        }
    }
}

struct Conn {
    broker: MqttBroker,
    settings: Arc<MqttConfig>,
    version: Version,
    client_id: String,
    link_id: u64,
    principal: Principal,
    gate: Arc<Gate>,
    stream: Stream,
    buf: BytesMut,
    out: BytesMut,
    rx: Inbox,
    stop: watch::Receiver<bool>,
    /// The publishes' writes, oldest first; not allocated while empty.
    acks: VecDeque<AckFuture>,
    /// Messages in `acks`.
    inbound_pending: usize,
    batch: Vec<(Message, QoS, u16)>,
    awaiting_rel: HashSet<u16>,
    aliases_in: HashMap<u16, String>,
    keep_alive: Option<Duration>,
    last_heard: Instant,
    /// Boxed: most connections have none, and a message inline is large.
    will: Option<Box<Will>>,
    expiry_secs: u32,
    out_state: Outbound,
}

/// Free space a read offers the socket. The buffer is dropped between reads when empty.
const READ_CHUNK: usize = 4096;

enum Event {
    /// What the socket had: bytes read into `buf`, 0 at its end, or its failure.
    Read(std::io::Result<usize>),
    Acked(Option<(Inbound, Result<(), WriteError>)>),
    Broker(Option<ToConnection>),
    KeepAliveTimeout,
    Stop,
}

/// A protocol violation: close, with this reason code in MQTT 5.
struct Violation(DisconnectReasonCode, String);

impl Conn {
    /// Serves the connection until it ends. However it ends, the publishes already
    /// read are completed first: their writes were submitted, and what committed is
    /// delivered (a client that sends a publish and vanishes still published it).
    async fn run(&mut self) -> End {
        let end = self.serve().await;
        self.drain_acks().await;
        end
    }

    async fn serve(&mut self) -> End {
        loop {
            self.send_pending();
            if !self.out.is_empty() {
                if let Err(e) = self.stream.write_all(&self.out).await {
                    return End::Abnormal(format!("write: {e}"));
                }
                // An idle connection holds no output buffer either.
                self.out = BytesMut::new();
            }
            let can_read = self.inbound_pending < usize::from(self.settings.receive_maximum);
            let keep_alive_at = self.keep_alive.map(|k| self.last_heard + k);
            let event = tokio::select! {
                r = self.stream.read_some(&mut self.buf, READ_CHUNK), if can_read => Event::Read(r),
                a = oldest_ack(&mut self.acks), if !self.acks.is_empty() => Event::Acked(a),
                m = self.rx.recv() => Event::Broker(m),
                _ = sleep_until_opt(keep_alive_at) => Event::KeepAliveTimeout,
                _ = self.stop.wait_for(|s| *s) => Event::Stop,
            };
            let result = match event {
                Event::Read(read) => match read {
                    Ok(0) => {
                        return End::Abnormal("connection closed without DISCONNECT".into());
                    }
                    Err(e) => return End::Abnormal(format!("read: {e}")),
                    Ok(_) => {
                        self.last_heard = Instant::now();
                        // Boxed, as every rare branch here: the loop's future stays small
                        // for the idle connections that are most of a gateway's.
                        let result = Box::pin(self.read_packets()).await;
                        if self.buf.is_empty() {
                            // An idle connection holds no read buffer.
                            self.buf = BytesMut::new();
                        }
                        result
                    }
                },
                Event::Acked(Some((inbound, result))) => self.acked(inbound, result),
                Event::Acked(None) => Ok(None),
                Event::Broker(Some(ToConnection::Deliver(d))) => {
                    self.enqueue(d);
                    Ok(None)
                }
                Event::Broker(Some(ToConnection::TakenOver)) | Event::Broker(None) => {
                    Box::pin(self.disconnect(
                        DisconnectReasonCode::SessionTakenOver,
                        "another connection took the session",
                    ))
                    .await;
                    return End::Server;
                }
                Event::KeepAliveTimeout => Err(Violation(
                    DisconnectReasonCode::KeepAliveTimeout,
                    "keep-alive timeout".into(),
                )),
                Event::Stop => {
                    Box::pin(self.finish(
                        DisconnectReasonCode::ServerShuttingDown,
                        "the broker is shutting down",
                    ))
                    .await;
                    return End::Server;
                }
            };
            match result {
                Ok(None) => {}
                Ok(Some(end)) => {
                    Box::pin(async {
                        self.drain_acks().await;
                        let _ = self.stream.write_all(&self.out).await;
                    })
                    .await;
                    return end;
                }
                Err(Violation(code, reason)) => {
                    // The packets read before the violation were valid: answer them first.
                    Box::pin(self.finish(code, &reason)).await;
                    return End::Abnormal(reason);
                }
            }
        }
    }

    /// Answers the publishes still waiting for their commit, so a client that
    /// disconnects cleanly after publishing gets every acknowledgement it is owed.
    async fn drain_acks(&mut self) {
        while let Some((inbound, result)) = oldest_ack(&mut self.acks).await {
            let _ = self.acked(inbound, result);
        }
    }

    /// Answers what is owed, then says why the connection ends.
    async fn finish(&mut self, code: DisconnectReasonCode, reason: &str) {
        self.drain_acks().await;
        self.disconnect(code, reason).await;
    }

    async fn disconnect(&mut self, code: DisconnectReasonCode, reason: &str) {
        if self.version == Version::V5 {
            // With properties present: rumqttc 0.25 mis-sizes a reason code without them.
            self.queue(&Packet::Disconnect(Disconnect {
                reason_code: code,
                properties: Some(DisconnectProperties {
                    session_expiry_interval: None,
                    reason_string: (!reason.is_empty()).then(|| reason.to_string()),
                    user_properties: Vec::new(),
                    server_reference: None,
                }),
            }));
        }
        let _ = self.stream.write_all(&self.out).await;
        self.out.clear();
        let _ = self.stream.shutdown().await;
    }

    fn queue(&mut self, packet: &Packet) {
        if let Err(e) = codec::encode(self.version, packet, &mut self.out) {
            debug!(client = %self.client_id, error = %e, "cannot encode a packet");
        }
    }

    /// Handles every whole packet in the buffer. A protocol error ends the reading, but
    /// the valid publishes read before it are submitted all the same.
    async fn read_packets(&mut self) -> Result<Option<End>, Violation> {
        let result = self.read_buffered().await;
        if result.is_err() {
            self.submit_publishes().await;
        }
        result
    }

    async fn read_buffered(&mut self) -> Result<Option<End>, Violation> {
        loop {
            let packet =
                match codec::decode(self.version, &mut self.buf, self.settings.max_packet_size) {
                    Ok(Some(p)) => p,
                    Ok(None) => {
                        self.submit_publishes().await;
                        return Ok(None);
                    }
                    Err(CodecError::TooLarge { size, max }) => {
                        return Err(Violation(
                            DisconnectReasonCode::PacketTooLarge,
                            format!("packet of {size} bytes over the maximum of {max}"),
                        ));
                    }
                    Err(e) => {
                        return Err(Violation(
                            DisconnectReasonCode::MalformedPacket,
                            e.to_string(),
                        ));
                    }
                };
            if !matches!(packet, Packet::Publish(_)) {
                // Keep the order: what was read before this packet goes first.
                self.submit_publishes().await;
            }
            match packet {
                Packet::Publish(p) => self.publish(p).await?,
                Packet::PubAck(a) => self.completed(a.pkid),
                Packet::PubRec(r) => match self.out_state.take(r.pkid) {
                    Some(mut d) if (r.reason as u8) < 0x80 => {
                        d.released = true;
                        self.queue(&Packet::PubRel(PubRel::new(r.pkid, None)));
                        self.out_state.inflight.push_back((r.pkid, d));
                    }
                    Some(d) => self.forget(d),
                    None => {}
                },
                Packet::PubComp(c) => self.completed(c.pkid),
                Packet::PubRel(r) => {
                    let mut comp = PubComp::new(r.pkid, None);
                    if !self.awaiting_rel.remove(&r.pkid) {
                        comp.reason = PubCompReason::PacketIdentifierNotFound;
                    }
                    self.queue(&Packet::PubComp(comp));
                }
                Packet::Subscribe(s) => self.subscribe(s).await?,
                Packet::Unsubscribe(u) => self.unsubscribe(u).await?,
                Packet::PingReq(_) => self.queue(&Packet::PingResp(PingResp)),
                Packet::Disconnect(d) => {
                    let expiry = d
                        .properties
                        .as_ref()
                        .and_then(|p| p.session_expiry_interval);
                    if let Some(expiry) = expiry {
                        if self.expiry_secs == 0 && expiry != 0 {
                            return Err(Violation(
                                DisconnectReasonCode::ProtocolError,
                                "session expiry set at DISCONNECT after 0 at CONNECT".into(),
                            ));
                        }
                        self.expiry_secs = expiry;
                    }
                    let will = d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage;
                    return Ok(Some(End::Clean { will }));
                }
                Packet::Connect(..) => {
                    return Err(Violation(
                        DisconnectReasonCode::ProtocolError,
                        "second CONNECT".into(),
                    ));
                }
                other => {
                    return Err(Violation(
                        DisconnectReasonCode::ProtocolError,
                        format!("a client does not send {}", kind(&other)),
                    ));
                }
            }
        }
    }

    async fn publish(&mut self, mut p: Publish) -> Result<(), Violation> {
        let metrics = self.broker.metrics();
        metrics.received.inc();
        metrics.received_bytes.inc_by(p.size() as u64);
        let props = p.properties.take().unwrap_or_default();
        let topic = if p.topic.is_empty() {
            let alias = props.topic_alias.ok_or_else(|| {
                Violation(
                    DisconnectReasonCode::TopicNameInvalid,
                    "empty topic without an alias".into(),
                )
            })?;
            self.aliases_in.get(&alias).cloned().ok_or_else(|| {
                Violation(
                    DisconnectReasonCode::ProtocolError,
                    format!("unknown topic alias {alias}"),
                )
            })?
        } else {
            let topic = String::from_utf8(p.topic.to_vec()).map_err(|_| {
                Violation(
                    DisconnectReasonCode::MalformedPacket,
                    "topic is not UTF-8".into(),
                )
            })?;
            if let Some(alias) = props.topic_alias {
                if alias == 0 || alias > self.settings.topic_alias_maximum {
                    return Err(Violation(
                        DisconnectReasonCode::TopicAliasInvalid,
                        format!("topic alias {alias} over the maximum"),
                    ));
                }
                self.aliases_in.insert(alias, topic.clone());
            }
            topic
        };
        if !topics::valid_topic_name(&topic) {
            return Err(Violation(
                DisconnectReasonCode::TopicNameInvalid,
                format!("invalid topic name {topic:?}"),
            ));
        }
        if p.qos == QoS::ExactlyOnce && self.awaiting_rel.contains(&p.pkid) {
            // A resent QoS 2 PUBLISH already taken: answer PUBREC again, take it once.
            self.queue(&codec::publish_ack(
                QoS::ExactlyOnce,
                p.pkid,
                PublishOutcome::Stored,
            ));
            return Ok(());
        }
        if p.qos != QoS::AtMostOnce
            && self.version == Version::V5
            && self.inbound_pending + self.batch.len() + self.awaiting_rel.len()
                >= usize::from(self.settings.receive_maximum)
        {
            return Err(Violation(
                DisconnectReasonCode::ReceiveMaximumExceeded,
                "receive maximum exceeded".into(),
            ));
        }
        if props.payload_format_indicator == Some(1) && std::str::from_utf8(&p.payload).is_err() {
            return Err(Violation(
                DisconnectReasonCode::PayloadFormatInvalid,
                "payload is not UTF-8".into(),
            ));
        }
        // `$SYS/` is the broker's own, as in Mosquitto: a client's publish there is refused.
        if topic.starts_with("$SYS/")
            || !self.authorized(Operation::Publish, Resource::Topic(&topic))
        {
            if p.qos != QoS::AtMostOnce {
                // Answered in its turn: acknowledgements leave in the order publishes came.
                self.submit_publishes().await;
                self.inbound_pending += 1;
                let inbound = Inbound {
                    acks: vec![(p.qos, p.pkid)],
                    prepared: Prepared::default(),
                    denied: true,
                };
                self.acks
                    .push_back(Box::pin(async move { (inbound, Ok(())) }));
            }
            return Ok(());
        }
        let message = Message::from_v5(topic, &p, props, self.client_id.clone());
        if message.payload.len() > COALESCE_MAX_PAYLOAD {
            // Alone, so that a message the topic refuses (too large) fails by itself.
            self.submit_publishes().await;
            self.batch.push((message, p.qos, p.pkid));
            self.submit_publishes().await;
        } else {
            self.batch.push((message, p.qos, p.pkid));
            if self.batch.len() >= COALESCE_MAX {
                self.submit_publishes().await;
            }
        }
        Ok(())
    }

    /// Prepares the publishes read so far as one write and queues their
    /// acknowledgements behind its commit.
    async fn submit_publishes(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        let mut messages = Vec::with_capacity(batch.len());
        let mut acks = Vec::with_capacity(batch.len());
        for (message, qos, pkid) in batch {
            messages.push(message);
            acks.push((qos, pkid));
        }
        self.inbound_pending += acks.len();
        let mut prepared = match self.broker.prepare_many(messages).await {
            Ok(prepared) => prepared,
            Err(e) => {
                let inbound = Inbound {
                    acks,
                    prepared: Prepared::default(),
                    denied: false,
                };
                self.acks
                    .push_back(Box::pin(async move { (inbound, Err(e)) }));
                return;
            }
        };
        let future: AckFuture = if prepared.needs_write() {
            match self.broker.log().submit(prepared.take_ops()).await {
                Ok(pending) => {
                    let inbound = Inbound {
                        acks,
                        prepared,
                        denied: false,
                    };
                    Box::pin(async move { (inbound, pending.await.map(drop)) })
                }
                Err(e) => {
                    let inbound = Inbound {
                        acks,
                        prepared,
                        denied: false,
                    };
                    Box::pin(async move { (inbound, Err(e)) })
                }
            }
        } else {
            let inbound = Inbound {
                acks,
                prepared,
                denied: false,
            };
            Box::pin(async move { (inbound, Ok(())) })
        };
        self.acks.push_back(future);
    }

    /// A publish's writes committed (or failed): deliver it and acknowledge.
    fn acked(
        &mut self,
        inbound: Inbound,
        result: Result<(), WriteError>,
    ) -> Result<Option<End>, Violation> {
        let Inbound {
            acks,
            prepared,
            denied,
        } = inbound;
        self.inbound_pending -= acks.len();
        if denied {
            for (qos, pkid) in acks {
                self.refused(qos, pkid);
            }
            return Ok(None);
        }
        let unrouted = prepared.unrouted.clone();
        let ok = match result {
            Ok(()) => {
                self.broker.complete(prepared);
                true
            }
            Err(e) => {
                self.broker.abandon(prepared);
                self.broker.metrics().ingest_errors.inc();
                info!(client = %self.client_id, error = %e, "MQTT publish not stored");
                if self.version == Version::V311 && acks.iter().any(|(q, _)| *q != QoS::AtMostOnce)
                {
                    // 3.1.1 has no negative acknowledgement: close, so the client resends.
                    return Err(Violation(
                        DisconnectReasonCode::UnspecifiedError,
                        format!("publish not stored: {e}"),
                    ));
                }
                false
            }
        };
        for (i, (qos, pkid)) in acks.into_iter().enumerate() {
            let outcome = match (ok, unrouted.get(i).copied().unwrap_or(false)) {
                (false, _) => PublishOutcome::Failed,
                (true, true) => PublishOutcome::NoSubscribers,
                (true, false) => PublishOutcome::Stored,
            };
            match qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => self.queue(&codec::publish_ack(qos, pkid, outcome)),
                QoS::ExactlyOnce => {
                    if ok {
                        self.awaiting_rel.insert(pkid);
                    }
                    self.queue(&codec::publish_ack(qos, pkid, outcome));
                }
            }
        }
        Ok(None)
    }

    /// Answers a publish `[[auth.acl]]` denied: PUBACK or PUBREC 0x87 in MQTT 5; in
    /// 3.1.1, which cannot say no, acknowledged as if taken, as Mosquitto does.
    fn refused(&mut self, qos: QoS, pkid: u16) {
        let outcome = match self.version {
            Version::V5 => PublishOutcome::NotAuthorized,
            Version::V311 => PublishOutcome::Stored,
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.queue(&codec::publish_ack(qos, pkid, outcome)),
            QoS::ExactlyOnce => {
                if self.version == Version::V311 {
                    // The client's PUBREL then completes the exchange.
                    self.awaiting_rel.insert(pkid);
                }
                self.queue(&codec::publish_ack(qos, pkid, outcome));
            }
        }
    }

    /// Whether `[[auth.acl]]` lets this client do `op` on `resource`.
    fn authorized(&self, op: Operation, resource: Resource<'_>) -> bool {
        let who = Subject {
            principal: &self.principal,
            client_id: &self.client_id,
        };
        self.gate.authorize(who, op, resource)
    }

    async fn subscribe(&mut self, s: Subscribe) -> Result<(), Violation> {
        let id = s.properties.as_ref().and_then(|p| p.id);
        if id == Some(0) {
            return Err(Violation(
                DisconnectReasonCode::ProtocolError,
                "subscription identifier 0".into(),
            ));
        }
        let filters: Vec<(String, SubOptions)> = s
            .filters
            .into_iter()
            .map(|f| {
                let opts = SubOptions {
                    qos: f.qos as u8,
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    retain_handling: match f.retain_forward_rule {
                        RetainForwardRule::OnEverySubscribe => 0,
                        RetainForwardRule::OnNewSubscribe => 1,
                        RetainForwardRule::Never => 2,
                    },
                    id: id.and_then(|i| u32::try_from(i).ok()),
                };
                (f.path, opts)
            })
            .collect();
        // A filter `[[auth.acl]]` denies is answered 0x87 (0x80 in 3.1.1) and not taken.
        let denied: Vec<bool> = filters
            .iter()
            .map(|(raw, _)| {
                topics::SubscriptionFilter::parse(raw).is_some_and(|f| {
                    !self.authorized(Operation::Subscribe, Resource::Filter(&f.filter))
                })
            })
            .collect();
        let filters = filters
            .into_iter()
            .zip(&denied)
            .filter_map(|(f, denied)| (!denied).then_some(f))
            .collect();
        let (results, retained, ops) = self.broker.subscribe(&self.client_id, filters);
        let stored = ops.is_empty() || self.broker.log().write(ops).await.is_ok();
        let mut results = results.into_iter();
        let return_codes = denied
            .into_iter()
            .map(|denied| {
                if denied {
                    return SubscribeReasonCode::NotAuthorized;
                }
                match (results.next(), stored) {
                    (_, false) => SubscribeReasonCode::Unspecified,
                    (Some(Ok(q)), true) => SubscribeReasonCode::Success(qos_of(q)),
                    (Some(Err(SubscribeRefusal::InvalidFilter)), true) => {
                        SubscribeReasonCode::TopicFilterInvalid
                    }
                    (Some(Err(SubscribeRefusal::SharedNoLocal)) | None, true) => {
                        SubscribeReasonCode::Unspecified
                    }
                }
            })
            .collect();
        self.queue(&Packet::SubAck(SubAck {
            pkid: s.pkid,
            return_codes,
            properties: None,
        }));
        for d in retained {
            self.enqueue(d);
        }
        Ok(())
    }

    async fn unsubscribe(&mut self, u: Unsubscribe) -> Result<(), Violation> {
        let (found, ops) = self.broker.unsubscribe(&self.client_id, &u.filters);
        let stored = ops.is_empty() || self.broker.log().write(ops).await.is_ok();
        let reasons = found
            .into_iter()
            .map(|f| match (f, stored) {
                (_, false) => UnsubAckReason::UnspecifiedError,
                (true, true) => UnsubAckReason::Success,
                (false, true) => UnsubAckReason::NoSubscriptionExisted,
            })
            .collect();
        self.queue(&Packet::UnsubAck(UnsubAck {
            pkid: u.pkid,
            reasons,
            properties: None,
        }));
        Ok(())
    }

    fn enqueue(&mut self, d: Delivery) {
        if self.out_state.pending.len() >= self.broker_max_queued() {
            self.broker.metrics().dropped.inc();
            self.forget(d);
            return;
        }
        self.out_state.pending.push_back(d);
    }

    fn broker_max_queued(&self) -> usize {
        self.settings.max_queued_messages
    }

    /// The client acknowledged (PUBACK or PUBCOMP) the message with `pkid`.
    fn completed(&mut self, pkid: u16) {
        if let Some(d) = self.out_state.take(pkid) {
            self.forget(d);
        }
    }

    /// A delivery is done with (acknowledged, expired or dropped): its stored copy goes.
    fn forget(&mut self, d: Delivery) {
        if let Some(key) = d.store_key {
            let log = self.broker.log().clone();
            tokio::spawn(async move {
                let _ = log.write(vec![MqttBroker::acknowledged_op(&key)]).await;
            });
        }
    }

    /// Sends waiting deliveries while the client's receive window has room.
    fn send_pending(&mut self) {
        let now = now_ms();
        while let Some(front) = self.out_state.pending.front() {
            if front.qos > 0 && self.out_state.inflight.len() >= self.out_state.window {
                break;
            }
            let Some(mut d) = self.out_state.pending.pop_front() else {
                break;
            };
            if d.released {
                let pkid = self.out_state.free_pkid();
                self.queue(&Packet::PubRel(PubRel::new(pkid, None)));
                self.out_state.inflight.push_back((pkid, d));
                continue;
            }
            if d.message.expired(now) {
                self.broker.metrics().dropped.inc();
                self.forget(d);
                continue;
            }
            let pkid = if d.qos > 0 {
                self.out_state.free_pkid()
            } else {
                0
            };
            let packet = Packet::Publish(self.publish_packet(&d, pkid, now));
            let too_large = self
                .out_state
                .max_packet
                .is_some_and(|max| packet.size() > max as usize);
            if too_large {
                // MQTT 5: a message over the client's maximum is dropped as if sent.
                self.broker.metrics().dropped.inc();
                self.forget(d);
                continue;
            }
            self.queue(&packet);
            self.broker.metrics().sent.inc();
            self.broker
                .metrics()
                .sent_bytes
                .inc_by(packet.size() as u64);
            if d.qos > 0 {
                d.sent = true;
                self.out_state.inflight.push_back((pkid, d));
            }
        }
    }

    fn publish_packet(&mut self, d: &Delivery, pkid: u16, now: i64) -> Publish {
        let m = &d.message;
        let mut topic = Bytes::from(m.topic.clone());
        let mut alias = None;
        if self.version == Version::V5 && self.out_state.alias_max > 0 {
            if let Some(&a) = self.out_state.aliases.get(&m.topic) {
                topic = Bytes::new();
                alias = Some(a);
            } else if self.out_state.aliases.len() < usize::from(self.out_state.alias_max) {
                let a = self.out_state.aliases.len() as u16 + 1;
                self.out_state.aliases.insert(m.topic.clone(), a);
                alias = Some(a);
            }
        }
        let properties = (self.version == Version::V5).then(|| PublishProperties {
            payload_format_indicator: m.properties.payload_format,
            message_expiry_interval: m
                .expires_at_ms
                .map(|at| u32::try_from(((at - now) + 999) / 1000).unwrap_or(0).max(1)),
            topic_alias: alias,
            response_topic: m.properties.response_topic.clone(),
            correlation_data: m.properties.correlation_data.clone(),
            user_properties: m.properties.user_properties.clone(),
            subscription_identifiers: d.subscription_ids.iter().map(|&i| i as usize).collect(),
            content_type: m.properties.content_type.clone(),
        });
        Publish {
            dup: d.sent,
            qos: qos_of(d.qos),
            retain: d.retain,
            topic,
            pkid,
            payload: m.payload.clone(),
            properties,
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn qos_of(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn kind(p: &Packet) -> &'static str {
    match p {
        Packet::ConnAck(_) => "CONNACK",
        Packet::SubAck(_) => "SUBACK",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingResp(_) => "PINGRESP",
        Packet::Auth(_) => "AUTH",
        _ => "this packet",
    }
}
