//! `$SYS/broker/…`: the broker's state as Mosquitto publishes it, so that the MQTT tools
//! operators already have (MQTT Explorer, `mosquitto_sub -t '$SYS/#'`) show it.
//!
//! Every [`SYS_INTERVAL`] (Mosquitto's default `sys_interval`), QoS 0, retained in memory
//! only. The counters are PUBLISH packets and their bytes; the `load/…` figures are
//! per-minute averages over the last 1, 5 and 15 minutes of the status history
//! (Mosquitto's are exponentially decaying averages of the same rates).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{SAMPLE_INTERVAL, Sample, StatusSources, every};
use crate::mqtt::MqttBroker;

/// How a `load/…` figure reads its rate from a sample.
type Rate = fn(&Sample) -> f64;

pub const SYS_INTERVAL: Duration = Duration::from_secs(10);

/// The `$SYS` topics and their values now.
pub fn sys_messages(sources: &StatusSources) -> Vec<(String, String)> {
    let m = sources.mqtt();
    let history = sources.history();
    let mut out = vec![
        (
            "version",
            format!("weir version {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "uptime",
            format!("{} seconds", sources.started.elapsed().as_secs()),
        ),
        ("clients/connected", m.connections.to_string()),
        ("clients/active", m.connections.to_string()),
        (
            "clients/disconnected",
            (m.sessions - m.connections).max(0).to_string(),
        ),
        ("clients/total", m.sessions.max(m.connections).to_string()),
        ("messages/received", m.received.to_string()),
        ("messages/sent", m.sent.to_string()),
        ("publish/messages/received", m.received.to_string()),
        ("publish/messages/sent", m.sent.to_string()),
        ("publish/messages/dropped", m.dropped.to_string()),
        ("bytes/received", m.received_bytes.to_string()),
        ("bytes/sent", m.sent_bytes.to_string()),
        ("subscriptions/count", m.subscriptions.to_string()),
        ("retained messages/count", m.retained.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect::<Vec<_>>();
    let rates: [(&str, Rate); 4] = [
        ("messages/received", |s| s.messages_in),
        ("messages/sent", |s| s.messages_out),
        ("bytes/received", |s| s.bytes_in),
        ("bytes/sent", |s| s.bytes_out),
    ];
    for (name, rate) in rates {
        for minutes in [1u64, 5, 15] {
            let per_minute = average(&history, minutes, rate) * 60.0;
            out.push((
                format!("load/{name}/{minutes}min"),
                format!("{per_minute:.2}"),
            ));
        }
    }
    out.into_iter()
        .map(|(k, v)| (format!("$SYS/broker/{k}"), v))
        .collect()
}

/// Mean per-second rate over the last `minutes` of `history` (fewer when it is younger).
fn average(history: &[Sample], minutes: u64, rate: impl Fn(&Sample) -> f64) -> f64 {
    let n = ((minutes * 60) / SAMPLE_INTERVAL.as_secs()) as usize;
    let recent = &history[history.len().saturating_sub(n)..];
    if recent.is_empty() {
        return 0.0;
    }
    recent.iter().map(rate).sum::<f64>() / recent.len() as f64
}

/// Publishes the `$SYS` topics every [`SYS_INTERVAL`] until `stop`.
pub async fn run_sys(broker: MqttBroker, sources: Arc<StatusSources>, stop: watch::Receiver<bool>) {
    every(SYS_INTERVAL, stop, || {
        for (topic, value) in sys_messages(&sources) {
            broker.publish_sys(&topic, value);
        }
        std::future::ready(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_is_a_per_minute_mean_of_the_recent_samples() {
        let sample = |messages_in| Sample {
            messages_in,
            ..Sample::default()
        };
        // 15 minutes of 1 msg/s, then one minute of 3 msg/s.
        let mut history: Vec<Sample> = (0..168).map(|_| sample(1.0)).collect();
        history.extend((0..12).map(|_| sample(3.0)));
        let rate = |s: &Sample| s.messages_in;
        assert_eq!(average(&history, 1, rate) * 60.0, 180.0);
        assert_eq!(average(&history, 15, rate) * 60.0, 68.0);
        assert_eq!(average(&[], 5, rate), 0.0);
        // Younger than the window: the mean of what there is.
        assert_eq!(average(&history[..2], 5, rate), 1.0);
    }
}
