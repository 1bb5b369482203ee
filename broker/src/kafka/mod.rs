//! The Kafka protocol listener: any Kafka client produces and consumes here.
//!
//! `codec` turns frames into requests and responses into frames (no I/O);
//! `handlers` answers each API on top of `storage::Log`; `groups` is the group
//! coordinator; `producers` the idempotent-producer state; `errors` the one mapping
//! from Weir's errors to Kafka error codes. This module owns the sockets.

pub mod client;
pub mod codec;
mod errors;
mod groups;
mod handlers;
mod producers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse, ResponseKind};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::storage::{Log, TopicConfig};
use codec::DecodeError;

/// A connection with no request for this long is closed (Kafka's
/// connections.max.idle.ms); clients reconnect when they need to.
const IDLE_LIMIT: Duration = Duration::from_secs(600);

/// What the Kafka listener needs from the configuration.
#[derive(Clone, Debug)]
pub struct KafkaSettings {
    /// Host and port clients are told to connect to.
    pub advertised_host: String,
    pub advertised_port: i32,
    pub auto_create_topics: bool,
    pub default_partitions: u32,
    pub topic_defaults: TopicConfig,
}

/// The Kafka listener's metrics (`weir_kafka_*`).
#[derive(Clone, Debug, Default)]
pub struct KafkaMetrics {
    pub connections: Counter,
    pub requests: Counter,
    pub bad_frames: Counter,
    pub produced_batches: Counter,
    pub fetched_bytes: Counter,
}

impl KafkaMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("kafka");
        r.register(
            "connections",
            "Kafka connections accepted",
            self.connections.clone(),
        );
        r.register("requests", "Kafka requests answered", self.requests.clone());
        r.register(
            "bad_frames",
            "Connections closed for a malformed, oversized or unknown request",
            self.bad_frames.clone(),
        );
        r.register(
            "produced_batches",
            "Record batches appended through Produce",
            self.produced_batches.clone(),
        );
        r.register(
            "fetched_bytes",
            "Record bytes returned by Fetch",
            self.fetched_bytes.clone(),
        );
    }
}

/// State shared by every Kafka connection.
pub struct KafkaBroker {
    log: Log,
    settings: KafkaSettings,
    groups: groups::Coordinator,
    producers: producers::Producers,
    metrics: KafkaMetrics,
    cluster_id: String,
}

impl KafkaBroker {
    pub fn new(
        log: Log,
        settings: KafkaSettings,
        metrics: KafkaMetrics,
    ) -> anyhow::Result<Arc<Self>> {
        let cluster_id = match log.get_state::<String>("kafka", "cluster_id")? {
            Some(id) => id,
            None => {
                use rand::Rng;
                let id = format!("weir-{:016x}", rand::rng().random::<u64>());
                // Written at the first start; the write is awaited by `start` below.
                id
            }
        };
        Ok(Arc::new(Self {
            producers: producers::Producers::new(log.clone()),
            log,
            settings,
            groups: groups::Coordinator::default(),
            metrics,
            cluster_id,
        }))
    }

    /// Accepts connections on `listener` until `stop` turns true.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        self.log
            .put_state("kafka", "cluster_id", &self.cluster_id)
            .await?;
        let ticker = tokio::spawn({
            let broker = self.clone();
            let mut stop = stop.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tokio::select! {
                        _ = tick.tick() => broker.groups.tick(),
                        _ = stopped(&mut stop) => return,
                    }
                }
            }
        });
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "kafka accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stopped(&mut stop) => break,
            };
            self.metrics.connections.inc();
            let _ = stream.set_nodelay(true);
            let broker = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                if let Err(e) = broker.connection(stream, peer, stop).await {
                    debug!(%peer, error = %e, "kafka connection ended");
                }
            });
        }
        ticker.abort();
        Ok(())
    }

    /// One client connection: requests are answered one at a time, in order, as a
    /// Kafka broker does.
    async fn connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        loop {
            let len = tokio::select! {
                len = tokio::time::timeout(IDLE_LIMIT, stream.read_i32()) => match len {
                    Ok(Ok(len)) => len,
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_idle) => {
                        debug!(%peer, "closing idle kafka connection");
                        return Ok(());
                    }
                },
                _ = stopped(&mut stop) => return Ok(()),
            };
            if len < 0 || len as usize > codec::MAX_FRAME_BYTES {
                self.metrics.bad_frames.inc();
                warn!(%peer, len, "closing kafka connection: frame size out of range");
                return Ok(());
            }
            // Grow the buffer as bytes arrive: a length prefix alone reserves nothing.
            let mut frame = Vec::with_capacity((len as usize).min(64 << 10));
            (&mut stream)
                .take(len as u64)
                .read_to_end(&mut frame)
                .await?;
            if frame.len() != len as usize {
                return Ok(()); // the client went away mid-frame
            }
            let request = match codec::decode_request(Bytes::from(frame)) {
                Ok(request) => request,
                Err(DecodeError::UnsupportedVersion {
                    api: ApiKey::ApiVersions,
                    correlation_id,
                    ..
                }) => {
                    // KIP-511: answer with v0 and our ranges, so the client can retry lower.
                    let mut body = self.api_versions();
                    body.error_code =
                        kafka_protocol::error::ResponseError::UnsupportedVersion.code();
                    let bytes = codec::encode_response(
                        ApiKey::ApiVersions,
                        0,
                        correlation_id,
                        &ResponseKind::ApiVersions(body),
                    )?;
                    stream.write_all(&bytes).await?;
                    continue;
                }
                Err(e) => {
                    self.metrics.bad_frames.inc();
                    warn!(%peer, error = %e, "closing kafka connection: bad request");
                    return Ok(());
                }
            };
            let (api, version, correlation_id) = (
                request.api,
                request.version(),
                request.header.correlation_id,
            );
            let client_host = peer.ip().to_string();
            let Some(response) = self.handle(request, &client_host).await else {
                continue; // acks=0 produce: no response
            };
            self.metrics.requests.inc();
            let bytes = codec::encode_response(api, version, correlation_id, &response)?;
            stream.write_all(&bytes).await?;
        }
    }

    fn api_versions(&self) -> ApiVersionsResponse {
        let mut body = ApiVersionsResponse::default();
        body.api_keys = codec::SUPPORTED_APIS
            .iter()
            .map(|(api, min, max)| {
                let mut v = kafka_protocol::messages::api_versions_response::ApiVersion::default();
                v.api_key = *api as i16;
                v.min_version = *min;
                v.max_version = *max;
                v
            })
            .collect();
        body
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Logs the listener address; kept apart so `server.rs` stays the one place that starts things.
pub fn log_listening(addr: SocketAddr, settings: &KafkaSettings) {
    info!(kafka = %addr, advertised = %format!("{}:{}", settings.advertised_host, settings.advertised_port), "kafka listener ready");
}
#[cfg(test)]
mod tests;
