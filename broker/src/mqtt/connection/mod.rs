//! One MQTT connection: CONNECT, then a loop that reads packets, answers them in
//! order, and sends the deliveries the broker routes to this session.
//!
//! A QoS 1/2 PUBLISH whose writes (ingest records, retained message, messages owed
//! to persistent sessions) go to the log is acknowledged only once they committed;
//! acknowledgements leave in the order the PUBLISHes arrived, and the message reaches
//! subscribers at that same moment, so they never see what a crash could undo.
//!
//! `connect.rs` is the CONNECT phase, `inbound.rs` the client's PUBLISHes,
//! `outbound.rs` the messages to it; this file the loop, SUBSCRIBE and UNSUBSCRIBE.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    Disconnect, DisconnectProperties, DisconnectReasonCode, Packet, PingResp, PubComp,
    PubCompReason, PubRel, RetainForwardRule, SubAck, Subscribe, SubscribeReasonCode, UnsubAck,
    UnsubAckReason, Unsubscribe,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use super::MqttConfig;
use super::broker::{
    Delivery, Inbox, Message, MqttBroker, SubOptions, SubscribeRefusal, ToConnection, Will,
};
use crate::acl::{Operation, Resource, Subject};
use crate::auth::{Gate, Principal};
use crate::storage::WriteError;
use crate::tls::Stream;
use weir_wire::mqtt_codec::{self as codec, CodecError, Version};
use weir_wire::topics;

use connect::{ConnectError, accept};
use inbound::{AckFuture, Inbound, oldest_ack};
use outbound::Outbound;

mod connect;
mod inbound;
mod outbound;

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The client sent DISCONNECT; `will`: it asked for its will anyway (0x04).
    Clean { will: bool },
    /// The client vanished or broke the protocol; the will is published.
    Abnormal(Broken),
    /// The broker is shutting down, or another connection took the session.
    Server,
}

/// Why a connection ended without DISCONNECT: logged, and counted as a protocol
/// error.
#[derive(Debug, thiserror::Error)]
enum Broken {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("write: {0}")]
    Write(std::io::Error),
    #[error("read: {0}")]
    Read(std::io::Error),
    #[error("connection closed without DISCONNECT")]
    Vanished,
    /// A protocol violation, as the client was told.
    #[error("{0}")]
    Violation(String),
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
    // Boxed: the CONNECT phase's futures would otherwise size every connection's task
    // for as long as it lives (idle devices are most of a gateway's connections).
    let accepted = Box::pin(accept(broker.clone(), settings, &gate, stream, peer, stop)).await;
    let result = match accepted {
        Ok(conn) => session(&broker, conn).await,
        Err(e) => Err(e.into()),
    };
    if let Err(reason) = result {
        metrics.protocol_errors.inc();
        debug!(peer = %addr, %reason, "MQTT connection closed");
    }
    metrics.connections.dec();
}

/// Runs the session loop of an accepted connection, then hands its session back to
/// the broker. `Err`: the connection ended abnormally.
async fn session(broker: &MqttBroker, mut conn: Box<Conn>) -> Result<(), Broken> {
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
                if let Err(e) = self.stream.send(&self.out).await {
                    return End::Abnormal(Broken::Write(e));
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
                        return End::Abnormal(Broken::Vanished);
                    }
                    Err(e) => return End::Abnormal(Broken::Read(e)),
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
                        let _ = self.stream.send(&self.out).await;
                    })
                    .await;
                    return end;
                }
                Err(Violation(code, reason)) => {
                    // The packets read before the violation were valid: answer them first.
                    Box::pin(self.finish(code, &reason)).await;
                    return End::Abnormal(Broken::Violation(reason));
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
        let _ = self.stream.send(&self.out).await;
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
