//! The MQTT metrics (`weir_mqtt_*`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
crate::metrics::group! {
    /// The MQTT metrics (`weir_mqtt_*`).
    #[derive(Clone, Debug, Default)]
    pub struct MqttMetrics in "mqtt" {
        /// Open MQTT connections.
        connections: Gauge,
        /// Subscriptions held by sessions.
        subscriptions: Gauge,
        /// Sessions, connected or kept for offline clients.
        sessions: Gauge,
        /// Retained messages.
        retained: Gauge,
        /// CONNECTs accepted.
        connects: Counter,
        /// CONNECTs refused with a CONNACK error.
        refused_connects: Counter,
        /// Connections closed for a malformed, oversized or out-of-order packet.
        protocol_errors: Counter,
        /// PUBLISH packets received.
        received: Counter,
        /// PUBLISH packets sent to subscribers.
        sent: Counter,
        // Mosquitto's `bytes/…` count every packet; the PUBLISH packets are nearly all
        // of them.
        /// Bytes of the PUBLISH packets received.
        received_bytes: Counter,
        /// Bytes of the PUBLISH packets sent to subscribers.
        sent_bytes: Counter,
        /// Records appended to the log by ingest rules.
        ingested: Counter,
        /// Messages not delivered: queue full, expired, or larger than the client takes.
        dropped: Counter,
        /// Publishes whose log write failed.
        ingest_errors: Counter,
        /// Messages an ingest plugin failed, stored in the rule's {topic}-dlq.
        ingest_plugin_failures: Counter,
    }
}
