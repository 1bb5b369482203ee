//! What the broker moves: messages with their MQTT 5 properties (and how they travel
//! as Kafka headers), subscription options, deliveries, and wills.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::storage::now_ms;

/// Session expiry meaning "never" (MQTT 5's 0xFFFFFFFF; a 3.1.1 clean_session=0 session).
pub const NEVER_EXPIRES: u32 = u32::MAX;

/// MQTT 5 properties a message carries from publisher to subscriber.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageProperties {
    pub payload_format: Option<u8>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

/// Kafka headers that carry MQTT 5 properties on a record: ingest rules write them,
/// downlinks read them back. Every other header is a user property.
const HEADER_CONTENT_TYPE: &str = "mqtt.content_type";
const HEADER_PAYLOAD_FORMAT: &str = "mqtt.payload_format";
const HEADER_MESSAGE_EXPIRY: &str = "mqtt.message_expiry";
const HEADER_RESPONSE_TOPIC: &str = "mqtt.response_topic";
const HEADER_CORRELATION_DATA: &str = "mqtt.correlation_data";
/// Headers of Weir's own (`mqtt.topic`, `mqtt.client_id`, `mqtt.qos`: where an ingested
/// record came from) that are not properties.
const HEADER_PREFIX: &str = "mqtt.";

impl MessageProperties {
    /// Appends the headers that carry these properties, and the message expiry interval
    /// left (seconds), to a record's.
    pub fn to_headers(&self, expiry_secs: Option<u32>, headers: &mut Vec<(String, Bytes)>) {
        let mut add = |name: &str, value: Bytes| headers.push((name.to_string(), value));
        if let Some(ct) = &self.content_type {
            add(HEADER_CONTENT_TYPE, Bytes::from(ct.clone()));
        }
        if let Some(pf) = self.payload_format {
            add(HEADER_PAYLOAD_FORMAT, Bytes::from(pf.to_string()));
        }
        if let Some(secs) = expiry_secs {
            add(HEADER_MESSAGE_EXPIRY, Bytes::from(secs.to_string()));
        }
        if let Some(topic) = &self.response_topic {
            add(HEADER_RESPONSE_TOPIC, Bytes::from(topic.clone()));
        }
        if let Some(data) = &self.correlation_data {
            add(HEADER_CORRELATION_DATA, data.clone());
        }
        for (k, v) in &self.user_properties {
            add(k, Bytes::from(v.clone()));
        }
    }

    /// The properties, and the message expiry interval (seconds), a record's headers
    /// give a message. A header that cannot be the property it names (a payload format
    /// other than 0 or 1, an expiry that is not a number, text that is not UTF-8) is
    /// left out, as is a user property that is not UTF-8.
    pub fn from_headers<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> (Self, Option<u32>) {
        let mut props = MessageProperties::default();
        let mut expiry = None;
        let text = |v: &[u8]| std::str::from_utf8(v).ok().map(str::to_string);
        for (name, value) in headers {
            match name {
                HEADER_CONTENT_TYPE => props.content_type = text(value),
                HEADER_PAYLOAD_FORMAT => {
                    props.payload_format =
                        text(value).and_then(|v| v.parse().ok()).filter(|f| *f <= 1);
                }
                HEADER_MESSAGE_EXPIRY => expiry = text(value).and_then(|v| v.parse().ok()),
                HEADER_RESPONSE_TOPIC => props.response_topic = text(value),
                HEADER_CORRELATION_DATA => {
                    props.correlation_data = Some(Bytes::copy_from_slice(value));
                }
                _ if name.starts_with(HEADER_PREFIX) => {}
                _ => {
                    if let Some(v) = text(value) {
                        props.user_properties.push((name.to_string(), v));
                    }
                }
            }
        }
        (props, expiry)
    }
}

/// An application message, as received from a publisher.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub properties: MessageProperties,
    /// Client id of the publisher (for no-local), empty for the broker's own.
    pub from: String,
    /// Wall-clock ms after which the message is not delivered (MQTT 5 expiry).
    pub expires_at_ms: Option<i64>,
}

impl Message {
    /// The message an MQTT 5 PUBLISH carries, from a client or from a bridged broker.
    pub fn from_v5(
        topic: String,
        p: &rumqttc::v5::mqttbytes::v5::Publish,
        props: rumqttc::v5::mqttbytes::v5::PublishProperties,
        from: String,
    ) -> Message {
        Message {
            topic,
            payload: p.payload.clone(),
            qos: p.qos as u8,
            retain: p.retain,
            properties: MessageProperties {
                payload_format: props.payload_format_indicator,
                content_type: props.content_type,
                response_topic: props.response_topic,
                correlation_data: props.correlation_data,
                user_properties: props.user_properties,
            },
            from,
            expires_at_ms: props
                .message_expiry_interval
                .map(|s| now_ms() + i64::from(s) * 1000),
        }
    }

    pub fn expired(&self, now: i64) -> bool {
        self.expires_at_ms.is_some_and(|at| at <= now)
    }
}

/// One subscription's options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubOptions {
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained messages at subscribe, 1: only if the subscription is new, 2: never.
    pub retain_handling: u8,
    pub id: Option<u32>,
}

/// A message on its way to one session.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Delivery {
    pub message: Arc<Message>,
    pub qos: u8,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    /// The `mqtt.msg` key holding it, for a persistent session at QoS ≥ 1.
    pub store_key: Option<String>,
    /// Sent before (resend with DUP).
    pub sent: bool,
    /// QoS 2: PUBREC received, PUBREL sent; only PUBCOMP is owed.
    pub released: bool,
}

/// What the broker tells a connection.
#[derive(Debug)]
pub enum ToConnection {
    Deliver(Delivery),
    /// Another connection took this client id over.
    TakenOver,
}

/// A will, held by a connection and published if it ends without a clean DISCONNECT.
#[derive(Clone, Debug)]
pub struct Will {
    pub message: Message,
    pub delay_secs: u32,
}
