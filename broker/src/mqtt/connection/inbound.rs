//! PUBLISHes from the client: prepared in batches, submitted to the log, and
//! acknowledged in arrival order once their writes committed.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, Publish};

use super::{Conn, End, Violation};
use tracing::info;

use crate::acl::{Operation, Resource};
use crate::mqtt::broker::{Message, Prepared};
use crate::storage::WriteError;
use weir_wire::mqtt_codec::{self as codec, PublishOutcome, Version};
use weir_wire::topics;

/// PUBLISHes read together, waiting for their writes, with what to do once they
/// committed: (QoS, packet id) per message, in arrival order.
pub(super) struct Inbound {
    acks: Vec<(QoS, u16)>,
    prepared: Prepared,
    /// Denied by `[[auth.acl]]`: nothing was prepared, only the answer waits its turn.
    denied: bool,
}

/// Publishes read and not yet submitted: consecutive small ones are prepared and
/// written together.
const COALESCE_MAX: usize = 256;
const COALESCE_MAX_PAYLOAD: usize = 64 * 1024;

pub(super) type AckFuture = Pin<Box<dyn Future<Output = (Inbound, Result<(), WriteError>)> + Send>>;

/// The oldest publish's write, once it completed: acknowledgements leave in the order
/// the publishes came. Only the oldest is polled: the others wait on the log's answers,
/// which arrive without being polled. Cancel-safe.
pub(super) async fn oldest_ack(
    acks: &mut VecDeque<AckFuture>,
) -> Option<(Inbound, Result<(), WriteError>)> {
    let outcome = acks.front_mut()?.await;
    acks.pop_front();
    Some(outcome)
}

impl Conn {
    pub(super) async fn publish(&mut self, mut p: Publish) -> Result<(), Violation> {
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
    pub(super) async fn submit_publishes(&mut self) {
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
    pub(super) fn acked(
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
    pub(super) fn refused(&mut self, qos: QoS, pkid: u16) {
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
}
