//! Bridge mode: Weir as a client (`rumqttc`, MQTT 3.1.1) of a remote broker such as
//! Mosquitto. It subscribes with a persistent session (clean session off), so what
//! the remote queued while Weir was away arrives after it reconnects, and it
//! acknowledges each message only after publishing it here (ingest rules, local
//! subscribers) durably: a message is never acknowledged upstream and then lost.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::watch;
use tracing::{info, warn};

use super::broker::{Message, MessageProperties, MqttBroker};
use super::rules::BridgeConfig;

pub async fn run_bridge(broker: MqttBroker, config: BridgeConfig, mut stop: watch::Receiver<bool>) {
    let Some((host, port)) = config
        .address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
    else {
        warn!(address = %config.address, "bridge address is not host:port; bridge not started");
        return;
    };
    let mut options = MqttOptions::new(config.client_id.clone(), host, port);
    options.set_keep_alive(Duration::from_secs(u64::from(
        config.keep_alive_secs.max(5),
    )));
    options.set_clean_session(false);
    options.set_manual_acks(true);
    options.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
    if let Some(user) = &config.username {
        options.set_credentials(user.clone(), config.password.clone().unwrap_or_default());
    }
    let (client, mut events) = AsyncClient::new(options, 64);
    let qos = match config.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let from = format!("bridge:{}", config.client_id);
    let mut connected = false;
    loop {
        let event = tokio::select! {
            e = events.poll() => Some(e),
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(event) = event else {
            let _ = client.disconnect().await;
            return;
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                connected = true;
                info!(remote = %config.address, session_present = ack.session_present, "bridge connected");
                for filter in &config.filters {
                    if let Err(e) = client.subscribe(filter.clone(), qos).await {
                        warn!(filter = %filter, error = %e, "bridge cannot subscribe");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let message = Message {
                    topic: p.topic.clone(),
                    payload: p.payload.clone(),
                    qos: p.qos as u8,
                    retain: p.retain,
                    properties: MessageProperties::default(),
                    from: from.clone(),
                    expires_at_ms: None,
                };
                match broker.publish(message).await {
                    Ok(()) => {
                        if let Err(e) = client.ack(&p).await {
                            warn!(error = %e, "bridge cannot acknowledge");
                        }
                    }
                    // Not acknowledged: the remote sends it again after the reconnect.
                    Err(e) => warn!(topic = %p.topic, error = %e, "bridged message not stored"),
                }
            }
            Ok(_) => {}
            Err(e) => {
                if connected {
                    warn!(remote = %config.address, error = %e, "bridge disconnected; reconnecting");
                    connected = false;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }
}
