//! The MQTT 3.1.1 and 5.0 broker: listener, sessions, ingest into the log, downlink
//! out of it, and bridges from remote brokers.
//!
//! `weir_wire::mqtt_codec` frames packets with `rumqttc`'s codecs (3.1.1 converted to
//! 5.0 shapes) and `weir_wire::topics` matches filters; `broker/` holds sessions,
//! subscriptions and retained messages and turns a publish into log writes and
//! deliveries; `connection.rs` is one client's loop; `config.rs` the `[mqtt]` section;
//! `rules.rs` the config's ingest/downlink/bridge rules; `bridge.rs` the client side
//! for bridges.

pub mod bridge;
pub mod broker;
mod config;
mod connection;
pub mod rules;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, warn};
use weir_wire::topics;

pub use broker::{Message, MessageProperties, MqttBroker, MqttMetrics};
pub use config::MqttConfig;
use rules::{DownlinkRule, Template};

use crate::auth::Gate;
use crate::backoff::Backoff;
use crate::storage::{ReadError, decode_stored, now_ms, put_state_op};
use crate::tls::{Listener, accept_any};

/// Accepts connections until `stop`; then every connection says goodbye and ends.
pub async fn serve(
    broker: MqttBroker,
    settings: MqttConfig,
    gate: Arc<Gate>,
    listeners: Vec<Listener>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let settings = Arc::new(settings);
    let mut connections = JoinSet::new();
    let ticker = tokio::spawn({
        let broker = broker.clone();
        let mut stop = stop.clone();
        async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = every.tick() => broker.tick(),
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    });
    let conn_stop = stop.clone();
    loop {
        let accepted = tokio::select! {
            accepted = accept_any(&listeners) => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        match accepted {
            Ok(incoming) => {
                let (broker, settings, gate) = (broker.clone(), settings.clone(), gate.clone());
                let stop = conn_stop.clone();
                let addr = incoming.peer;
                match incoming.plain() {
                    // Spawned as it is: a wrapper's state would size every idle
                    // connection's task.
                    Ok(stream) => {
                        let peer = connection::Peer {
                            addr,
                            identity: None,
                        };
                        connections
                            .spawn(connection::run(broker, settings, gate, stream, peer, stop));
                    }
                    Err(tls) => {
                        connections.spawn(async move {
                            match tls.open().await {
                                Ok((stream, identity)) => {
                                    let peer = connection::Peer { addr, identity };
                                    connection::run(broker, settings, gate, stream, peer, stop)
                                        .await;
                                }
                                Err(e) => {
                                    debug!(peer = %addr, error = %e, "MQTT TLS or WebSocket handshake failed")
                                }
                            }
                        });
                    }
                }
            }
            Err(e) => {
                // Out of file descriptors, most likely: wait rather than spin.
                warn!(error = %e, "cannot accept an MQTT connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        while connections.try_join_next().is_some() {}
    }
    drop(listeners);
    while connections.join_next().await.is_some() {}
    let _ = ticker.await;
    Ok(())
}

const NS_DOWNLINK: &str = "mqtt.downlink";
/// Bytes a downlink reads from its topic at a time.
const DOWNLINK_READ_BYTES: usize = 256 * 1024;

/// Copies the records of one partition of a downlink rule's topic to MQTT, from a
/// cursor committed in the same write as the messages it queues; new rules start at
/// the end of the topic (commands already there are not replayed).
pub async fn run_downlink(
    broker: MqttBroker,
    rule: DownlinkRule,
    template: Template,
    partition: u32,
    mut stop: watch::Receiver<bool>,
) {
    let log = broker.log().clone();
    let cursor_key = format!("{}/{partition}", rule.topic);
    let mut changes = match log.watch(&rule.topic, partition) {
        Ok(w) => w,
        Err(e) => {
            warn!(topic = %rule.topic, error = %e, "downlink topic unavailable");
            return;
        }
    };
    let stored = {
        let key = cursor_key.clone();
        log.blocking(move |log| log.get_state::<u64>(NS_DOWNLINK, &key))
            .await
    };
    let mut next = match stored {
        Ok(Some(offset)) => offset,
        _ => changes.borrow().high_watermark,
    };
    let mut backoff = Backoff::new();
    loop {
        let topic = rule.topic.clone();
        // As a read_committed consumer: open and aborted transactions are not sent.
        let read = log
            .blocking(move |log| log.read_committed(&topic, partition, next, DOWNLINK_READ_BYTES));
        let mut read = match read.await {
            Ok(r) => r,
            Err(ReadError::OffsetOutOfRange { offsets, .. }) => {
                warn!(topic = %rule.topic, partition, lost_from = next, lost_to = offsets.log_start,
                    "downlink records deleted by retention before they were sent");
                next = offsets.log_start.max(next.min(offsets.high_watermark));
                continue;
            }
            Err(e) => {
                let wait = backoff.after(false);
                warn!(topic = %rule.topic, error = %e, backoff_ms = wait.as_millis() as u64,
                    "downlink read failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        };
        if read.read.batches.is_empty() {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
            continue;
        }
        let mut prepared = Vec::new();
        let mut ops = Vec::new();
        let mut last = next;
        for batch in std::mem::take(&mut read.read.batches) {
            last = last.max(batch.base_offset() as u64 + batch.last_offset_delta() as u64 + 1);
            if !read.is_data(&batch) {
                continue;
            }
            let records = match decode_stored(batch, &rule.topic, partition) {
                Ok(records) => records,
                Err(e) => {
                    warn!(topic = %rule.topic, error = %e, "cannot decode a downlink batch");
                    Vec::new()
                }
            };
            for r in records {
                let offset = r.offset as u64;
                if offset < next {
                    continue;
                }
                let key = r
                    .key
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                let p = partition.to_string();
                let topic = template.render(|name| match name {
                    "key" => key.as_ref(),
                    "partition" => p.as_str(),
                    _ => rule.topic.as_str(),
                });
                if !topics::valid_topic_name(&topic) {
                    warn!(topic = %rule.topic, offset, mqtt_topic = %topic, "downlink record maps to an invalid MQTT topic; skipped");
                    continue;
                }
                let (properties, expiry_secs) = MessageProperties::from_headers(
                    r.headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_deref().unwrap_or_default())),
                );
                let message = Message {
                    topic,
                    payload: r.value.unwrap_or_default(),
                    qos: rule.qos,
                    retain: rule.retain,
                    properties,
                    from: String::new(),
                    expires_at_ms: expiry_secs.map(|s| now_ms() + i64::from(s) * 1000),
                };
                match broker.prepare(message).await {
                    Ok(mut p) => {
                        ops.extend(p.take_ops());
                        prepared.push(p);
                    }
                    Err(e) => warn!(error = %e, "downlink message not routed"),
                }
            }
        }
        ops.push(put_state_op(NS_DOWNLINK, &cursor_key, &last));
        if let Err(e) = log.write(ops).await {
            for p in prepared {
                broker.abandon(p);
            }
            let wait = backoff.after(false);
            warn!(error = %e, backoff_ms = wait.as_millis() as u64, "downlink cursor not stored; retrying");
            tokio::select! {
                _ = tokio::time::sleep(wait) => continue,
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        backoff.reset();
        for p in prepared {
            broker.complete(p);
        }
        next = last;
    }
}
