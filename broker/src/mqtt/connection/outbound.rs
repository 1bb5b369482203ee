//! Messages to the client: the in-flight window (the client's receive maximum), the
//! queue behind it, packet ids and topic aliases.

use std::collections::{HashMap, VecDeque};

use rumqttc::v5::mqttbytes::v5::{Packet, PubRel, Publish, PublishProperties};

use bytes::Bytes;

use super::{Conn, qos_of};
use crate::mqtt::broker::{Delivery, MqttBroker};
use crate::storage::now_ms;
use weir_wire::mqtt_codec::Version;

/// Messages to this client: those sent and not yet acknowledged (`inflight`, at
/// most `window`, the client's receive maximum), and those waiting (`pending`).
pub(super) struct Outbound {
    pub(super) inflight: VecDeque<(u16, Delivery)>,
    pub(super) pending: VecDeque<Delivery>,
    pub(super) next_pkid: u16,
    pub(super) window: usize,
    pub(super) aliases: HashMap<String, u16>,
    pub(super) alias_max: u16,
    pub(super) max_packet: Option<u32>,
}

impl Outbound {
    pub(super) fn take(&mut self, pkid: u16) -> Option<Delivery> {
        let i = self.inflight.iter().position(|(p, _)| *p == pkid)?;
        self.inflight.remove(i).map(|(_, d)| d)
    }

    pub(super) fn free_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.inflight.iter().any(|(p, _)| *p == self.next_pkid) {
                return self.next_pkid;
            }
        }
    }
}

impl Conn {
    pub(super) fn enqueue(&mut self, d: Delivery) {
        if self.out_state.pending.len() >= self.broker_max_queued() {
            self.broker.metrics().dropped.inc();
            self.forget(d);
            return;
        }
        self.out_state.pending.push_back(d);
    }

    pub(super) fn broker_max_queued(&self) -> usize {
        self.settings.max_queued_messages
    }

    /// The client acknowledged (PUBACK or PUBCOMP) the message with `pkid`.
    pub(super) fn completed(&mut self, pkid: u16) {
        if let Some(d) = self.out_state.take(pkid) {
            self.forget(d);
        }
    }

    /// A delivery is done with (acknowledged, expired or dropped): its stored copy goes.
    pub(super) fn forget(&mut self, d: Delivery) {
        if let Some(key) = d.store_key {
            let log = self.broker.log().clone();
            tokio::spawn(async move {
                let _ = log.write(vec![MqttBroker::acknowledged_op(&key)]).await;
            });
        }
    }

    /// Sends waiting deliveries while the client's receive window has room.
    pub(super) fn send_pending(&mut self) {
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

    pub(super) fn publish_packet(&mut self, d: &Delivery, pkid: u16, now: i64) -> Publish {
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
