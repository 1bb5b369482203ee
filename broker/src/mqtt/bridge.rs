//! Bridge mode: Weir as a client (`rumqttc`) of a remote broker such as Mosquitto, in
//! MQTT 5 (the default: every message property crosses the bridge) or 3.1.1. It
//! subscribes with a persistent session (clean session off; in MQTT 5 a session that
//! never expires), so what the remote queued while Weir was away arrives after it
//! reconnects, and it acknowledges each message only after publishing it here (ingest
//! rules, local subscribers) durably: a message is never acknowledged upstream and then
//! lost.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5 as v5_packets;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::watch;
use tracing::{info, warn};

use super::broker::{Message, MessageProperties, MqttBroker};
use super::rules::BridgeConfig;
use crate::backoff::Backoff;

/// Largest packet the bridge takes from the remote.
const MAX_PACKET_BYTES: u32 = 16 * 1024 * 1024;

pub async fn run_bridge(broker: MqttBroker, config: BridgeConfig, stop: watch::Receiver<bool>) {
    let Some((host, port)) = config
        .address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
    else {
        warn!(address = %config.address, "bridge address is not host:port; bridge not started");
        return;
    };
    let keep_alive = Duration::from_secs(u64::from(config.keep_alive_secs.max(5)));
    let credentials = config
        .username
        .clone()
        .map(|user| (user, config.password.clone().unwrap_or_default()));
    if config.version == "3.1.1" {
        let mut options = MqttOptions::new(config.client_id.clone(), host, port);
        options.set_keep_alive(keep_alive);
        options.set_clean_session(false);
        options.set_manual_acks(true);
        options.set_max_packet_size(MAX_PACKET_BYTES as usize, MAX_PACKET_BYTES as usize);
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        let (client, events) = AsyncClient::new(options, 64);
        bridge(V311 { client, events }, broker, config, stop).await;
    } else {
        let mut options = rumqttc::v5::MqttOptions::new(config.client_id.clone(), host, port);
        options.set_keep_alive(keep_alive);
        options.set_clean_start(false);
        options.set_session_expiry_interval(Some(u32::MAX));
        options.set_manual_acks(true);
        options.set_max_packet_size(Some(MAX_PACKET_BYTES));
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        let (client, events) = rumqttc::v5::AsyncClient::new(options, 64);
        bridge(V5 { client, events }, broker, config, stop).await;
    }
}

/// What the remote did, in either version.
enum Remote<Ack> {
    Connected {
        session_present: bool,
    },
    /// A message, and what acknowledges it there.
    Message(Message, Ack),
    /// A message Weir cannot take (its topic is not UTF-8): acknowledged and dropped.
    Unusable(String, Ack),
    Other,
    Lost(String),
}

/// One MQTT version's client of the remote.
trait RemoteClient {
    type Ack;
    /// Why a request could not be queued to the client (it has stopped).
    type Error: std::fmt::Display;
    async fn next(&mut self, from: &str) -> Remote<Self::Ack>;
    async fn subscribe(&mut self, filter: &str, qos: u8) -> Result<(), Self::Error>;
    async fn ack(&mut self, ack: &Self::Ack) -> Result<(), Self::Error>;
    async fn disconnect(&mut self);
}

async fn bridge(
    mut remote: impl RemoteClient,
    broker: MqttBroker,
    config: BridgeConfig,
    mut stop: watch::Receiver<bool>,
) {
    let from = format!("bridge:{}", config.client_id);
    let mut connected = false;
    let mut backoff = Backoff::new();
    loop {
        let event = tokio::select! {
            e = remote.next(&from) => Some(e),
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(event) = event else {
            remote.disconnect().await;
            return;
        };
        match event {
            Remote::Connected { session_present } => {
                connected = true;
                backoff.reset();
                info!(remote = %config.address, version = %config.version, session_present, "bridge connected");
                for filter in &config.filters {
                    if let Err(e) = remote.subscribe(filter, config.qos).await {
                        warn!(filter = %filter, error = %e, "bridge cannot subscribe");
                    }
                }
            }
            Remote::Message(message, ack) => {
                let topic = message.topic.clone();
                match broker.publish(message).await {
                    Ok(()) => {
                        if let Err(e) = remote.ack(&ack).await {
                            warn!(error = %e, "bridge cannot acknowledge");
                        }
                    }
                    // Not acknowledged: the remote sends it again after the reconnect.
                    Err(e) => warn!(topic = %topic, error = %e, "bridged message not stored"),
                }
            }
            Remote::Unusable(reason, ack) => {
                warn!(remote = %config.address, %reason, "bridged message dropped");
                if let Err(e) = remote.ack(&ack).await {
                    warn!(error = %e, "bridge cannot acknowledge");
                }
            }
            Remote::Other => {}
            Remote::Lost(e) => {
                if connected {
                    warn!(remote = %config.address, error = %e, "bridge disconnected; reconnecting");
                    connected = false;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff.after(false)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

struct V311 {
    client: AsyncClient,
    events: rumqttc::EventLoop,
}

impl RemoteClient for V311 {
    type Ack = rumqttc::Publish;
    type Error = rumqttc::ClientError;

    async fn next(&mut self, from: &str) -> Remote<Self::Ack> {
        match self.events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => Remote::Connected {
                session_present: ack.session_present,
            },
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let message = Message {
                    topic: p.topic.clone(),
                    payload: p.payload.clone(),
                    qos: p.qos as u8,
                    retain: p.retain,
                    properties: MessageProperties::default(),
                    from: from.to_string(),
                    expires_at_ms: None,
                };
                Remote::Message(message, p)
            }
            Ok(_) => Remote::Other,
            Err(e) => Remote::Lost(e.to_string()),
        }
    }

    async fn subscribe(&mut self, filter: &str, level: u8) -> Result<(), Self::Error> {
        self.client.subscribe(filter, qos(level)).await
    }

    async fn ack(&mut self, ack: &Self::Ack) -> Result<(), Self::Error> {
        self.client.ack(ack).await
    }

    async fn disconnect(&mut self) {
        let _ = self.client.disconnect().await;
    }
}

struct V5 {
    client: rumqttc::v5::AsyncClient,
    events: rumqttc::v5::EventLoop,
}

impl RemoteClient for V5 {
    type Ack = v5_packets::Publish;
    type Error = rumqttc::v5::ClientError;

    async fn next(&mut self, from: &str) -> Remote<Self::Ack> {
        use rumqttc::v5::Event as V5Event;
        match self.events.poll().await {
            Ok(V5Event::Incoming(v5_packets::Packet::ConnAck(ack))) => Remote::Connected {
                session_present: ack.session_present,
            },
            Ok(V5Event::Incoming(v5_packets::Packet::Publish(p))) => {
                let Ok(topic) = std::str::from_utf8(&p.topic).map(str::to_string) else {
                    return Remote::Unusable("its topic is not UTF-8".into(), p);
                };
                let props = p.properties.clone().unwrap_or_default();
                let message = Message::from_v5(topic, &p, props, from.to_string());
                Remote::Message(message, p)
            }
            Ok(_) => Remote::Other,
            Err(e) => Remote::Lost(e.to_string()),
        }
    }

    async fn subscribe(&mut self, filter: &str, level: u8) -> Result<(), Self::Error> {
        let level = match level {
            0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
            1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
        };
        self.client.subscribe(filter, level).await
    }

    async fn ack(&mut self, ack: &Self::Ack) -> Result<(), Self::Error> {
        self.client.ack(ack).await
    }

    async fn disconnect(&mut self) {
        let _ = self.client.disconnect().await;
    }
}
