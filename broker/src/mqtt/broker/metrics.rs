//! The MQTT metrics (`weir_mqtt_*`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The MQTT metrics (`weir_mqtt_*`).
#[derive(Clone, Debug, Default)]
pub struct MqttMetrics {
    pub connections: Gauge,
    pub subscriptions: Gauge,
    pub sessions: Gauge,
    pub retained: Gauge,
    pub connects: Counter,
    pub refused_connects: Counter,
    pub protocol_errors: Counter,
    pub received: Counter,
    pub sent: Counter,
    /// Bytes of the PUBLISH packets received and sent (Mosquitto's `bytes/…` count every
    /// packet; the PUBLISH packets are nearly all of them).
    pub received_bytes: Counter,
    pub sent_bytes: Counter,
    pub ingested: Counter,
    pub dropped: Counter,
    pub ingest_errors: Counter,
    pub ingest_plugin_failures: Counter,
}

impl MqttMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("mqtt");
        r.register(
            "connections",
            "Open MQTT connections",
            self.connections.clone(),
        );
        r.register(
            "subscriptions",
            "Subscriptions held by sessions",
            self.subscriptions.clone(),
        );
        r.register(
            "sessions",
            "Sessions, connected or kept for offline clients",
            self.sessions.clone(),
        );
        r.register("retained", "Retained messages", self.retained.clone());
        r.register("connects", "CONNECTs accepted", self.connects.clone());
        r.register(
            "refused_connects",
            "CONNECTs refused with a CONNACK error",
            self.refused_connects.clone(),
        );
        r.register(
            "protocol_errors",
            "Connections closed for a malformed, oversized or out-of-order packet",
            self.protocol_errors.clone(),
        );
        r.register(
            "received",
            "PUBLISH packets received",
            self.received.clone(),
        );
        r.register(
            "sent",
            "PUBLISH packets sent to subscribers",
            self.sent.clone(),
        );
        r.register(
            "received_bytes",
            "Bytes of the PUBLISH packets received",
            self.received_bytes.clone(),
        );
        r.register(
            "sent_bytes",
            "Bytes of the PUBLISH packets sent to subscribers",
            self.sent_bytes.clone(),
        );
        r.register(
            "ingested",
            "Records appended to the log by ingest rules",
            self.ingested.clone(),
        );
        r.register(
            "dropped",
            "Messages not delivered: queue full, expired, or larger than the client takes",
            self.dropped.clone(),
        );
        r.register(
            "ingest_errors",
            "Publishes whose log write failed",
            self.ingest_errors.clone(),
        );
        r.register(
            "ingest_plugin_failures",
            "Messages an ingest plugin failed, stored in the rule's {topic}-dlq",
            self.ingest_plugin_failures.clone(),
        );
    }
}
