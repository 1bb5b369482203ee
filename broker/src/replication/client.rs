//! The Kafka client replication talks to the centre with, behind three traits
//! (`UpstreamProducer`, `UpstreamConsumer`, `UpstreamReader`) and a `Connector` that
//! makes them. librdkafka (the `rdkafka` crate) is the one implementation: a mature
//! idempotent producer, TLS, SASL and every codec; tests connect to fakes. This is
//! the only module that knows rdkafka.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{Client, ClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::UpstreamConfig;
use super::error::ReplicationError;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A record on its way to the centre.
pub struct OutRecord<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: &'a [(&'a str, &'a [u8])],
    pub timestamp_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryError {
    /// This record can never be delivered (e.g. larger than the centre accepts).
    Permanent(String),
    /// The producer cannot go on (fenced, out of sequence): make a new one and send
    /// again from the last acknowledged record.
    Fatal(String),
}

/// Where the centre put a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub partition: u32,
    pub offset: u64,
}

/// Where the centre says it put a delivered record: the partition, and the offset
/// unless the client does not know it (a retry the centre already had).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Landed {
    pub partition: u32,
    pub offset: Option<u64>,
}

/// The acknowledgement (or refusal) of the record sent with `token`.
#[derive(Debug)]
pub struct Delivered {
    pub token: u64,
    pub result: Result<Landed, DeliveryError>,
}

#[derive(Debug)]
pub enum SendError {
    /// The client's queue is full: wait for deliveries, then send again.
    QueueFull,
    Permanent(String),
    Fatal(String),
}

/// Connection problems the client reported: how many, and the last one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkErrors {
    pub count: u64,
    pub last: String,
    /// The client says no broker of the centre is reachable.
    pub all_down: bool,
}

/// What replication needs of a producer. Deliveries come back, in no particular
/// order across partitions, on the channel `producer` returned with it.
pub trait UpstreamProducer: Send + Sync {
    /// Queues `record`; its `Delivered` (with `token`) comes once the centre
    /// acknowledged it (acks=all, idempotent: retries never duplicate within this
    /// producer).
    fn send(&self, record: &OutRecord<'_>, token: u64) -> Result<(), SendError>;
    /// Creates `topic` upstream with `partitions` partitions unless it exists.
    fn ensure_topic<'a>(
        &'a self,
        topic: &'a str,
        partitions: u32,
    ) -> BoxFuture<'a, Result<(), ReplicationError>>;
    /// Connection errors, as they happen.
    fn link(&self) -> watch::Receiver<LinkErrors>;
}

/// A record read from the centre.
pub struct UpstreamRecord {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Bytes)>,
    pub timestamp_ms: i64,
}

/// Where to start reading an upstream partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum From {
    Offset(u64),
    Earliest,
    Latest,
}

/// What replication needs of a consumer: partitions assigned by the caller, which
/// keeps the positions (no group offsets upstream).
pub trait UpstreamConsumer: Send + Sync {
    /// The number of partitions of an upstream topic.
    fn partitions(&self, topic: &str) -> BoxFuture<'_, Result<u32, ReplicationError>>;
    fn assign(&self, positions: &[(String, u32, From)]) -> Result<(), ReplicationError>;
    /// The next record of the assigned partitions.
    fn recv(&self) -> BoxFuture<'_, Result<UpstreamRecord, ReplicationError>>;
    /// Connection errors, as they happen (the consumer retries by itself meanwhile).
    fn link(&self) -> watch::Receiver<LinkErrors>;
}

/// Called with each record a scan reads: its position and headers.
pub type Visit<'h> = dyn FnMut(Position, &[(&str, &[u8])]) + Send + 'h;

/// Reads the centre back: what is already in a topic before a producer resends.
pub trait UpstreamReader: Send + Sync {
    /// Low and high watermark of each partition of `topic`, by partition, as the
    /// centre's ListOffsets gives them (Tansu's high watermark can be short: a
    /// scan's ends are the ones to trust).
    fn ends<'a>(
        &'a self,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(u64, u64)>, ReplicationError>>;
    /// Reads each `(partition, from)` of `topic` from `from` to the partition's end
    /// (where a fetch reports it reached the high watermark), calling `visit` with
    /// every record's position and headers; returns the end of each partition.
    /// Fails when neither a record nor an end comes for `STALL`.
    fn scan<'a>(
        &'a self,
        topic: &'a str,
        from: &'a [(u32, u64)],
        visit: &'a mut Visit<'_>,
    ) -> BoxFuture<'a, Result<BTreeMap<u32, u64>, ReplicationError>>;
}

/// How long a read-back may wait for the next record before it gives up (and is
/// tried again).
const STALL: Duration = Duration::from_secs(30);

/// Settings of one producer (a replication rule's).
pub struct ProducerSettings {
    pub compression: String,
    pub batch_bytes: usize,
    pub linger_ms: u64,
    /// Bytes the client may hold queued: bounds memory whatever the backlog.
    pub queue_kbytes: usize,
}

/// Context shared by our clients: turns librdkafka's error and log callbacks into
/// `LinkErrors`.
#[derive(Clone)]
struct LinkContext {
    errors: Arc<watch::Sender<LinkErrors>>,
    name: Arc<str>,
}

impl LinkContext {
    fn new(name: &str) -> Self {
        Self {
            errors: Arc::new(watch::channel(LinkErrors::default()).0),
            name: name.into(),
        }
    }
}

impl ClientContext for LinkContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => warn!(upstream = %self.name, fac, "librdkafka: {message}"),
            _ => debug!(upstream = %self.name, fac, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let all_down = error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown);
        debug!(upstream = %self.name, %error, reason, "upstream client error");
        self.errors.send_modify(|e| {
            e.count += 1;
            e.last = format!("{error}: {reason}");
            e.all_down = all_down;
        });
    }
}

impl ConsumerContext for LinkContext {}

/// The producer's context: link errors, and each delivery onto a channel (called on
/// the producer's polling thread: one channel send per record, no future, no wake
/// per record while the receiver is busy).
struct DeliveryContext {
    link: LinkContext,
    deliveries: mpsc::UnboundedSender<Delivered>,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.link.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.link.error(error, reason);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Token;

    fn delivery(&self, result: &DeliveryResult<'_>, token: Token) {
        let token = from_opaque(token);
        let result = match result {
            Ok(m) => Ok(Landed {
                partition: m.partition().max(0) as u32,
                offset: u64::try_from(m.offset()).ok(),
            }),
            Err((e, _)) => Err(delivery_error(e.clone())),
        };
        let _ = self.deliveries.send(Delivered { token, result });
    }
}

fn base_config(upstream: &UpstreamConfig, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &upstream.bootstrap_servers)
        .set("client.id", client_id)
        .set("reconnect.backoff.ms", "100")
        // A gateway's link comes back often: be connected within a second of its return.
        .set("reconnect.backoff.max.ms", "1000")
        .set("log.connection.close", "false");
    let optional = [
        ("security.protocol", &upstream.security_protocol),
        ("sasl.mechanism", &upstream.sasl_mechanism),
        ("sasl.username", &upstream.sasl_username),
        ("sasl.password", &upstream.sasl_password),
        ("ssl.ca.location", &upstream.ssl_ca_location),
        (
            "ssl.certificate.location",
            &upstream.ssl_certificate_location,
        ),
        ("ssl.key.location", &upstream.ssl_key_location),
    ];
    for (key, value) in optional {
        if let Some(v) = value {
            c.set(key, v);
        }
    }
    for (key, value) in &upstream.properties {
        c.set(key, value);
    }
    c
}

struct RdProducer {
    producer: ThreadedProducer<DeliveryContext>,
    admin: AdminClient<LinkContext>,
    errors: watch::Receiver<LinkErrors>,
}

/// The deliveries of a producer's records.
pub type Deliveries = mpsc::UnboundedReceiver<Delivered>;

/// A record's token as librdkafka carries it (its opaque is pointer-sized): the
/// `u64` itself where a pointer holds it, boxed on a 32-bit board.
#[cfg(target_pointer_width = "64")]
type Token = usize;
#[cfg(not(target_pointer_width = "64"))]
type Token = Box<u64>;

fn to_opaque(token: u64) -> Token {
    #[cfg(target_pointer_width = "64")]
    return token as usize;
    #[cfg(not(target_pointer_width = "64"))]
    return Box::new(token);
}

fn from_opaque(token: Token) -> u64 {
    #[cfg(target_pointer_width = "64")]
    return token as u64;
    #[cfg(not(target_pointer_width = "64"))]
    return *token;
}

/// Makes the clients a rule talks to its upstream with.
pub trait Connector: Send + Sync {
    fn producer(
        &self,
        settings: &ProducerSettings,
    ) -> Result<(Arc<dyn UpstreamProducer>, Deliveries), ReplicationError>;
    fn reader(&self) -> Result<Arc<dyn UpstreamReader>, ReplicationError>;
}

/// librdkafka clients of one upstream, with the rule's client id.
pub struct Librdkafka {
    pub upstream: UpstreamConfig,
    pub client_id: String,
}

impl Connector for Librdkafka {
    fn producer(
        &self,
        settings: &ProducerSettings,
    ) -> Result<(Arc<dyn UpstreamProducer>, Deliveries), ReplicationError> {
        producer(&self.upstream, &self.client_id, settings)
    }

    fn reader(&self) -> Result<Arc<dyn UpstreamReader>, ReplicationError> {
        reader(&self.upstream, &self.client_id)
    }
}

/// An idempotent librdkafka producer to `upstream`, and its deliveries.
pub fn producer(
    upstream: &UpstreamConfig,
    client_id: &str,
    settings: &ProducerSettings,
) -> Result<(Arc<dyn UpstreamProducer>, Deliveries), ReplicationError> {
    let context = LinkContext::new(&upstream.name);
    let errors = context.errors.subscribe();
    let (deliveries, received) = mpsc::unbounded_channel();
    let mut config = base_config(upstream, client_id);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // Never give up on a record: an outage only delays it; the local log is the
        // buffer, and `queue_kbytes` bounds what is held here.
        .set("message.timeout.ms", "0")
        .set("max.in.flight.requests.per.connection", "5")
        // Java clients' partitioner, so keys land where the centre's own producers put them.
        .set("partitioner", "murmur2_random")
        .set("compression.type", &settings.compression)
        .set("batch.size", settings.batch_bytes.to_string())
        .set("linger.ms", settings.linger_ms.to_string())
        .set(
            "queue.buffering.max.kbytes",
            settings.queue_kbytes.to_string(),
        )
        .set("queue.buffering.max.messages", "1000000");
    let producer: ThreadedProducer<DeliveryContext> = config
        .create_with_context(DeliveryContext {
            link: context.clone(),
            deliveries,
        })
        .map_err(|source| ReplicationError::Client {
            what: "producer",
            source,
        })?;
    let admin: AdminClient<LinkContext> = base_config(upstream, client_id)
        .create_with_context(context)
        .map_err(|source| ReplicationError::Client {
            what: "admin client",
            source,
        })?;
    let producer: Arc<dyn UpstreamProducer> = Arc::new(RdProducer {
        producer,
        admin,
        errors,
    });
    Ok((producer, received))
}

fn delivery_error(e: KafkaError) -> DeliveryError {
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidMessageSize,
        ) => DeliveryError::Permanent(e.to_string()),
        _ => DeliveryError::Fatal(e.to_string()),
    }
}

impl UpstreamProducer for RdProducer {
    fn send(&self, record: &OutRecord<'_>, token: u64) -> Result<(), SendError> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(*value),
            });
        }
        let mut out: BaseRecord<'_, [u8], [u8], Token> =
            BaseRecord::with_opaque_to(record.topic, to_opaque(token))
                .headers(headers)
                .timestamp(record.timestamp_ms);
        if let Some(key) = record.key {
            out = out.key(key);
        }
        if let Some(value) = record.value {
            out = out.payload(value);
        }
        self.producer
            .send(out)
            .map_err(|(e, _)| match e.rdkafka_error_code() {
                Some(RDKafkaErrorCode::QueueFull) => SendError::QueueFull,
                _ => match delivery_error(e) {
                    DeliveryError::Permanent(m) => SendError::Permanent(m),
                    DeliveryError::Fatal(m) => SendError::Fatal(m),
                },
            })
    }

    fn ensure_topic<'a>(
        &'a self,
        topic: &'a str,
        partitions: u32,
    ) -> BoxFuture<'a, Result<(), ReplicationError>> {
        Box::pin(async move {
            let new = NewTopic::new(topic, partitions as i32, TopicReplication::Fixed(-1));
            let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(5)));
            match self.admin.create_topics([&new], &options).await {
                Ok(results) => match results.into_iter().next() {
                    Some(Ok(_)) | None => Ok(()),
                    Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(()),
                    Some(Err((_, code))) => Err(ReplicationError::CreateTopic {
                        topic: topic.to_string(),
                        code,
                    }),
                },
                Err(e) => Err(ReplicationError::upstream(format!("cannot create {topic}"))(e)),
            }
        })
    }

    fn link(&self) -> watch::Receiver<LinkErrors> {
        self.errors.clone()
    }
}

impl Drop for RdProducer {
    fn drop(&mut self) {
        // Whatever is still queued is sent again by the next producer, from the cursor.
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
    }
}

struct RdConsumer {
    /// Shared with the blocking pool for librdkafka's blocking calls.
    consumer: Arc<StreamConsumer<LinkContext>>,
}

/// A librdkafka consumer of `upstream`; `group` only names it (positions are kept
/// locally and nothing is committed upstream).
pub fn consumer(
    upstream: &UpstreamConfig,
    client_id: &str,
    group: &str,
) -> Result<Arc<dyn UpstreamConsumer>, ReplicationError> {
    let context = LinkContext::new(&upstream.name);
    let consumer: StreamConsumer<LinkContext> = base_config(upstream, client_id)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("queued.max.messages.kbytes", "16384")
        .create_with_context(context)
        .map_err(|source| ReplicationError::Client {
            what: "consumer",
            source,
        })?;
    Ok(Arc::new(RdConsumer {
        consumer: Arc::new(consumer),
    }))
}

impl UpstreamConsumer for RdConsumer {
    fn partitions(&self, topic: &str) -> BoxFuture<'_, Result<u32, ReplicationError>> {
        let topic = topic.to_string();
        Box::pin(async move {
            let consumer = self.consumer.clone();
            blocking(move || partition_count(consumer.client(), &topic).map(|n| n as u32)).await
        })
    }

    fn assign(&self, positions: &[(String, u32, From)]) -> Result<(), ReplicationError> {
        let mut list = TopicPartitionList::new();
        for (topic, partition, from) in positions {
            let offset = match from {
                From::Offset(n) => Offset::Offset(*n as i64),
                From::Earliest => Offset::Beginning,
                From::Latest => Offset::End,
            };
            list.add_partition_offset(topic, *partition as i32, offset)
                .map_err(ReplicationError::upstream(format!("position in {topic}")))?;
        }
        self.consumer
            .assign(&list)
            .map_err(ReplicationError::upstream("assigning partitions"))
    }

    fn recv(&self) -> BoxFuture<'_, Result<UpstreamRecord, ReplicationError>> {
        Box::pin(async move {
            let m = self
                .consumer
                .recv()
                .await
                .map_err(ReplicationError::upstream("receiving"))?;
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                Bytes::copy_from_slice(h.value.unwrap_or_default()),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok(UpstreamRecord {
                topic: m.topic().to_string(),
                partition: m.partition() as u32,
                offset: m.offset() as u64,
                key: m.key().map(Bytes::copy_from_slice),
                value: m.payload().map(Bytes::copy_from_slice),
                headers,
                timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
            })
        })
    }

    fn link(&self) -> watch::Receiver<LinkErrors> {
        self.consumer.context().errors.subscribe()
    }
}

struct RdReader {
    /// Shared with the blocking pool for librdkafka's blocking calls.
    consumer: Arc<StreamConsumer<LinkContext>>,
}

/// A blocking librdkafka call, on tokio's blocking pool (ARCHITECTURE.md, "Where
/// blocking work runs").
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, ReplicationError> + Send + 'static,
) -> Result<T, ReplicationError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| ReplicationError::Thread(e.to_string()))?
}

/// How many partitions `topic` has upstream (its metadata, asked with a 5 s bound).
/// Blocking.
fn partition_count<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
) -> Result<usize, ReplicationError> {
    let metadata = client
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .map_err(ReplicationError::upstream(format!("metadata of {topic}")))?;
    match metadata.topics().iter().find(|t| t.name() == topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(t.partitions().len()),
        _ => Err(ReplicationError::NoUpstreamTopic(topic.to_string())),
    }
}

/// A librdkafka consumer of `upstream` that reads partitions to their end once.
pub fn reader(
    upstream: &UpstreamConfig,
    client_id: &str,
) -> Result<Arc<dyn UpstreamReader>, ReplicationError> {
    let consumer: StreamConsumer<LinkContext> = base_config(upstream, client_id)
        .set("group.id", format!("{client_id}-read-back"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        // The end is where a fetch comes back empty: do not let it wait for more.
        .set("fetch.wait.max.ms", "10")
        .set("queued.max.messages.kbytes", "16384")
        .create_with_context(LinkContext::new(&upstream.name))
        .map_err(|source| ReplicationError::Client {
            what: "read-back consumer",
            source,
        })?;
    Ok(Arc::new(RdReader {
        consumer: Arc::new(consumer),
    }))
}

impl UpstreamReader for RdReader {
    fn ends<'a>(
        &'a self,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(u64, u64)>, ReplicationError>> {
        Box::pin(async move {
            let (consumer, topic) = (self.consumer.clone(), topic.to_string());
            blocking(move || {
                let partitions = partition_count(consumer.client(), &topic)?;
                (0..partitions as i32)
                    .map(|p| {
                        let (low, high) = consumer
                            .fetch_watermarks(&topic, p, Duration::from_secs(5))
                            .map_err(ReplicationError::upstream(format!(
                                "watermarks of {topic}/{p}"
                            )))?;
                        Ok((low.max(0) as u64, high.max(0) as u64))
                    })
                    .collect()
            })
            .await
        })
    }

    fn scan<'a>(
        &'a self,
        topic: &'a str,
        from: &'a [(u32, u64)],
        visit: &'a mut Visit<'_>,
    ) -> BoxFuture<'a, Result<BTreeMap<u32, u64>, ReplicationError>> {
        Box::pin(async move {
            let mut list = TopicPartitionList::new();
            for (p, offset) in from {
                list.add_partition_offset(topic, *p as i32, Offset::Offset(*offset as i64))
                    .map_err(ReplicationError::upstream(format!("position in {topic}")))?;
            }
            self.consumer
                .assign(&list)
                .map_err(ReplicationError::upstream("assigning partitions"))?;
            // Partition → the offset after the last record read (or the start).
            let mut open: BTreeMap<u32, u64> = from.iter().copied().collect();
            let mut ends = BTreeMap::new();
            while !open.is_empty() {
                let m = match tokio::time::timeout(STALL, self.consumer.recv()).await {
                    Err(_) => {
                        return Err(ReplicationError::ReadBackStalled {
                            topic: topic.to_string(),
                            stall: STALL,
                        });
                    }
                    Ok(Err(KafkaError::PartitionEOF(p))) => {
                        if let Some(next) = open.remove(&(p as u32)) {
                            let position = self
                                .consumer
                                .position()
                                .ok()
                                .and_then(|l| {
                                    l.find_partition(topic, p).and_then(|e| e.offset().to_raw())
                                })
                                .filter(|o| *o >= 0)
                                .map_or(0, |o| o as u64);
                            ends.insert(p as u32, next.max(position));
                        }
                        continue;
                    }
                    // Connection trouble: the client reconnects by itself, and a
                    // scan that gets nothing for STALL fails.
                    Ok(Err(e)) => {
                        debug!(%topic, error = %e, "reading back");
                        continue;
                    }
                    Ok(Ok(m)) => m,
                };
                let (Ok(partition), Ok(offset)) =
                    (u32::try_from(m.partition()), u64::try_from(m.offset()))
                else {
                    continue;
                };
                let position = Position { partition, offset };
                let Some(next) = open.get_mut(&partition) else {
                    continue;
                };
                *next = offset.saturating_add(1);
                let headers: Vec<(&str, &[u8])> = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key, h.value.unwrap_or_default()))
                            .collect()
                    })
                    .unwrap_or_default();
                visit(position, &headers);
            }
            Ok(ends)
        })
    }
}

/// The librdkafka properties a config sets through named keys; `properties` may not
/// set them again.
pub fn reserved_properties() -> BTreeMap<&'static str, &'static str> {
    [
        ("bootstrap.servers", "bootstrap_servers"),
        ("client.id", "client_id"),
        ("enable.idempotence", "(always true)"),
        ("acks", "(always all)"),
        ("security.protocol", "security_protocol"),
        ("sasl.mechanism", "sasl_mechanism"),
        ("sasl.username", "sasl_username"),
        ("sasl.password", "sasl_password"),
        ("ssl.ca.location", "ssl_ca_location"),
        ("ssl.certificate.location", "ssl_certificate_location"),
        ("ssl.key.location", "ssl_key_location"),
    ]
    .into_iter()
    .collect()
}
