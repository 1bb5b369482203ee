//! `[mqtt]`: the MQTT listener's section of the config file (documented key by key in
//! `weir.example.toml`). Here rather than in `config.rs` so that the MQTT code takes
//! its own settings and depends on nothing above it (ARCHITECTURE.md, "Layers").

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::rules::{BridgeConfig, DownlinkRule, IngestRule};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    pub listen: SocketAddr,
    /// MQTT over TLS, with `[tls]`'s certificate (conventionally port 8883).
    pub tls_listen: Option<SocketAddr>,
    /// MQTT over WebSockets for browsers, on path `/mqtt` (conventionally port 8080).
    pub ws_listen: Option<SocketAddr>,
    /// MQTT over secure WebSockets (`wss://`), with `[tls]`'s certificate.
    pub wss_listen: Option<SocketAddr>,
    /// Largest packet accepted, in bytes (told to MQTT 5 clients in CONNACK).
    pub max_packet_size: u32,
    /// QoS 1/2 publishes a client may have unacknowledged (MQTT 5 receive maximum);
    /// a 3.1.1 client is not read further until acknowledgements catch up.
    pub receive_maximum: u16,
    /// QoS 1/2 messages in flight to one client (an MQTT 5 client may ask for fewer).
    pub max_inflight: u16,
    /// Messages waiting per session (offline, or beyond the in-flight window); more
    /// are dropped and counted in `weir_mqtt_dropped`.
    pub max_queued_messages: usize,
    /// Longest keep-alive granted to MQTT 5 clients: one asking for more, or for
    /// none, is told this one (server keep alive). 0: no limit.
    pub max_keep_alive_secs: u16,
    /// Topic aliases an MQTT 5 client may set.
    pub topic_alias_maximum: u16,
    /// A connection that sends no CONNECT within this is closed.
    pub connect_timeout_ms: u64,
    /// MQTT topic filter → Weir topic and key; matching messages are appended
    /// before they are acknowledged.
    pub ingest: Vec<IngestRule>,
    /// Weir topic → MQTT topic: records produced there go out to subscribers.
    pub downlink: Vec<DownlinkRule>,
    /// Remote MQTT brokers to subscribe to; what arrives goes through `ingest`.
    pub bridge: Vec<BridgeConfig>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: ([0, 0, 0, 0], 1883).into(),
            tls_listen: None,
            ws_listen: None,
            wss_listen: None,
            max_packet_size: 1024 * 1024,
            receive_maximum: 1024,
            max_inflight: 256,
            max_queued_messages: 10_000,
            max_keep_alive_secs: 0,
            topic_alias_maximum: 64,
            connect_timeout_ms: 10_000,
            ingest: Vec::new(),
            downlink: Vec::new(),
            bridge: Vec::new(),
        }
    }
}
