//! The Kafka protocol listener: any Kafka client produces and consumes here.
//!
//! `codec` turns frames into requests and responses into frames (no I/O);
//! `handlers` answers each API on top of `storage::Log`; `groups` is the group
//! coordinator; `producers` the idempotent-producer state; `errors` the one mapping
//! from Weir's errors to Kafka error codes; `sasl` the SASL exchanges. This module
//! owns the sockets, and decides per connection what may be asked before a login.

pub mod client;
mod errors;
mod groups;
mod handlers;
mod producers;
mod transactions;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse, RequestKind, ResponseKind};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::acl::Subject;
use crate::auth::{Gate, Principal};
use crate::storage::{Log, TopicConfig};
use crate::tls::{Listener, Stream, accept_any};
use weir_wire::kafka_codec::{self as codec, DecodeError};
use weir_wire::sasl::{self, Mechanism};

/// Requests read ahead of their answers, per connection, and the bytes they may hold.
/// A client that pipelines (librdkafka sends a request per ready batch, up to a
/// million in flight) must have all it sent during one durability window
/// (`storage.commit_interval_ms`) read, or each window commits only a few of its
/// requests and the backlog grows: read ahead by bytes, not by a handful of requests.
const MAX_IN_FLIGHT: usize = 1024;
const MAX_IN_FLIGHT_BYTES: usize = 16 << 20;

/// The answer to a request, once its work is done (`None`: no response, acks=0).
type Answer = std::pin::Pin<Box<dyn std::future::Future<Output = Option<ResponseKind>> + Send>>;

/// A request read and started, waiting to be answered in order.
struct Queued {
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    response: Answer,
}

/// A connection with no request for this long is closed (Kafka's
/// connections.max.idle.ms); clients reconnect when they need to.
const IDLE_LIMIT: Duration = Duration::from_secs(600);

/// What the Kafka listener needs from the configuration.
#[derive(Clone, Debug)]
pub struct KafkaSettings {
    /// Host and port clients are told to connect to.
    pub advertised_host: String,
    pub advertised_port: i32,
    /// The port told to clients of the TLS listener, when there is one.
    pub advertised_tls_port: Option<i32>,
    pub auto_create_topics: bool,
    pub default_partitions: u32,
    pub topic_defaults: TopicConfig,
}

impl KafkaSettings {
    /// The port a client is told: TLS clients are kept on the TLS listener.
    pub fn advertised_port(&self, tls: bool) -> i32 {
        match (tls, self.advertised_tls_port) {
            (true, Some(port)) => port,
            _ => self.advertised_port,
        }
    }
}
crate::metrics::group! {
    /// The Kafka listener's metrics (`weir_kafka_*`).
    #[derive(Clone, Debug, Default)]
    pub struct KafkaMetrics in "kafka" {
        /// Kafka connections accepted.
        connections: Counter,
        /// Kafka requests answered.
        requests: Counter,
        /// Connections closed for a malformed, oversized or unknown request.
        bad_frames: Counter,
        /// Record batches appended through Produce.
        produced_batches: Counter,
        /// Records appended through Produce.
        produced_records: Counter,
        /// Record batch bytes appended through Produce.
        produced_bytes: Counter,
        /// Record bytes returned by Fetch.
        fetched_bytes: Counter,
    }
}

/// State shared by every Kafka connection.
pub struct KafkaBroker {
    log: Log,
    settings: KafkaSettings,
    groups: groups::Coordinator,
    producers: producers::Producers,
    txns: transactions::Transactions,
    metrics: KafkaMetrics,
    cluster_id: String,
    gate: Arc<Gate>,
}

/// Who is at the other end of a connection.
pub(super) struct Client {
    /// The address, as group members' `client_host`.
    pub(super) host: String,
    /// Connected to the TLS listener.
    pub(super) tls: bool,
    /// Who it logged in as (or anonymous), once it did.
    pub(super) principal: std::sync::OnceLock<Principal>,
}

impl Client {
    /// The subject `[[auth.acl]]` judges: this principal with the request's client id.
    pub(super) fn subject<'a>(&'a self, client_id: &'a str) -> Subject<'a> {
        static NOBODY: Principal = Principal::Anonymous;
        Subject {
            principal: self.principal.get().unwrap_or(&NOBODY),
            client_id,
        }
    }
}

/// Where a connection stands with SASL.
#[derive(Default)]
enum Login {
    /// Nothing yet: ApiVersions and SaslHandshake are answered; anything else is
    /// served only if `[auth] anonymous` lets this client in without credentials.
    #[default]
    Open,
    Handshaken(Mechanism),
    Scram(Box<sasl::Scram>),
    /// Logged in, or admitted without credentials.
    Done,
}

/// What becomes of a request that may not simply be served.
enum Gatekept {
    Answer { queued: Queued, close: bool },
    Close(String),
}

impl KafkaBroker {
    pub fn new(
        log: Log,
        settings: KafkaSettings,
        metrics: KafkaMetrics,
        gate: Arc<Gate>,
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
            txns: transactions::Transactions::new(log.clone()),
            log,
            settings,
            groups: groups::Coordinator::default(),
            metrics,
            cluster_id,
            gate,
        }))
    }

    /// Accepts connections on `listeners` until `stop` turns true.
    pub async fn serve(
        self: Arc<Self>,
        listeners: Vec<Listener>,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        self.log
            .put_state("kafka", "cluster_id", &self.cluster_id)
            .await?;
        // Before the first client: a transaction the last stop left ongoing is aborted.
        self.txns.recover().await?;
        let ticker = tokio::spawn({
            let broker = self.clone();
            let mut stop = stop.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                let mut txn_tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = tick.tick() => broker.groups.tick(),
                        _ = txn_tick.tick() => broker.txns.expire(crate::storage::now_ms()).await,
                        _ = stopped(&mut stop) => return,
                    }
                }
            }
        });
        loop {
            let incoming = tokio::select! {
                accepted = accept_any(&listeners) => match accepted {
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
            let broker = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let peer = incoming.peer;
                let client = Client {
                    host: peer.ip().to_string(),
                    tls: incoming.is_tls(),
                    principal: std::sync::OnceLock::new(),
                };
                let ended = match incoming.open().await {
                    Ok((Stream::Plain(tcp), _)) => {
                        let (reader, writer) = tcp.into_split();
                        let login = Login::Open;
                        broker
                            .connection(reader, writer, client, peer, login, stop)
                            .await
                    }
                    Ok((stream, identity)) => {
                        // A client certificate is a login (`[tls] client_ca`).
                        let login = match identity {
                            Some(name) => {
                                let _ = client.principal.set(broker.gate.certified(&name));
                                Login::Done
                            }
                            None => Login::Open,
                        };
                        let (reader, writer) = tokio::io::split(stream);
                        broker
                            .connection(reader, writer, client, peer, login, stop)
                            .await
                    }
                    Err(e) => {
                        debug!(%peer, error = %e, "kafka TLS handshake failed");
                        Ok(())
                    }
                };
                if let Err(e) = ended {
                    debug!(%peer, error = %e, "kafka connection ended");
                }
            });
        }
        ticker.abort();
        Ok(())
    }

    /// One client connection. Responses go out in request order. Requests are handled
    /// one at a time, as a Kafka broker does, except that a produce's appends are
    /// queued as soon as it is read (after every earlier non-produce request finished),
    /// so that a pipelining client's next produce joins the group commit of this one.
    async fn connection<R, W>(
        self: Arc<Self>,
        mut reader: R,
        mut writer: W,
        client: Client,
        peer: SocketAddr,
        mut login: Login,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<()>
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let client = Arc::new(client);
        let (queue, mut answers) = mpsc::channel::<(Queued, OwnedSemaphorePermit)>(MAX_IN_FLIGHT);
        let budget = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES));
        let metrics = self.metrics.clone();
        let answering = tokio::spawn(async move {
            // A request's bytes count against the budget until it is answered.
            while let Some((q, _held)) = answers.recv().await {
                let Some(response) = q.response.await else {
                    continue;
                };
                metrics.requests.inc();
                let bytes = codec::encode_response(q.api, q.version, q.correlation_id, &response)
                    .inspect_err(|e| tracing::error!(api = ?q.api, version = q.version, error = %e, "cannot encode a response"))?;
                writer.write_all(&bytes).await?;
            }
            anyhow::Ok(())
        });
        // Done when the last queued non-produce request has been answered.
        let mut last_other: Option<oneshot::Receiver<()>> = None;
        loop {
            let len = tokio::select! {
                len = tokio::time::timeout(IDLE_LIMIT, reader.read_i32()) => match len {
                    Ok(Ok(len)) => len,
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_idle) => {
                        debug!(%peer, "closing idle kafka connection");
                        break;
                    }
                },
                _ = stopped(&mut stop) => break,
            };
            if len < 0 || len as usize > codec::MAX_FRAME_BYTES {
                self.metrics.bad_frames.inc();
                warn!(%peer, len, "closing kafka connection: frame size out of range");
                break;
            }
            // A frame larger than the whole budget waits for the others, then goes alone.
            let held = budget
                .clone()
                .acquire_many_owned(len.clamp(1, MAX_IN_FLIGHT_BYTES as i32) as u32)
                .await?;
            // Grow the buffer as bytes arrive: a length prefix alone reserves nothing.
            let mut frame = Vec::with_capacity((len as usize).min(64 << 10));
            (&mut reader)
                .take(len as u64)
                .read_to_end(&mut frame)
                .await?;
            if frame.len() != len as usize {
                break; // the client went away mid-frame
            }
            let queued = match codec::decode_request(Bytes::from(frame)) {
                Ok(request) => match self.gatekeep(&mut login, &client, &request, peer).await {
                    None => self.start(request, &client, &mut last_other).await,
                    Some(Gatekept::Answer { queued, close }) => {
                        if queue.send((queued, held)).await.is_err() || close {
                            break;
                        }
                        continue;
                    }
                    Some(Gatekept::Close(reason)) => {
                        warn!(%peer, %reason, "closing kafka connection");
                        break;
                    }
                },
                Err(DecodeError::UnsupportedVersion {
                    api: ApiKey::ApiVersions,
                    correlation_id,
                    ..
                }) => {
                    // KIP-511: answer with v0 and our ranges, so the client can retry lower.
                    let mut body = self.api_versions();
                    body.error_code =
                        kafka_protocol::error::ResponseError::UnsupportedVersion.code();
                    let response: Answer =
                        Box::pin(async move { Some(ResponseKind::ApiVersions(body)) });
                    Queued {
                        api: ApiKey::ApiVersions,
                        version: 0,
                        correlation_id,
                        response,
                    }
                }
                Err(e) => {
                    self.metrics.bad_frames.inc();
                    warn!(%peer, error = %e, "closing kafka connection: bad request");
                    break;
                }
            };
            if queue.send((queued, held)).await.is_err() {
                break; // the answering half stopped: the client is gone
            }
        }
        drop(queue);
        answering.await?
    }

    /// `None` lets a request through: the connection logged in, or may go on without.
    /// Answers the SASL requests themselves.
    async fn gatekeep(
        &self,
        login: &mut Login,
        client: &Client,
        request: &codec::Request,
        peer: SocketAddr,
    ) -> Option<Gatekept> {
        let done = |login: &mut Login, principal: Principal| {
            let _ = client.principal.set(principal);
            *login = Login::Done;
        };
        use kafka_protocol::error::ResponseError;
        use kafka_protocol::messages::{SaslAuthenticateResponse, SaslHandshakeResponse};
        let (api, version, correlation_id) = (
            request.api,
            request.version(),
            request.header.correlation_id,
        );
        let answer = |body: ResponseKind, close: bool| {
            Some(Gatekept::Answer {
                queued: Queued {
                    api,
                    version,
                    correlation_id,
                    response: Box::pin(async move { Some(body) }),
                },
                close,
            })
        };
        let authenticate = |error: Option<(ResponseError, String)>, bytes: Vec<u8>| {
            let mut body = SaslAuthenticateResponse::default();
            if let Some((code, message)) = &error {
                body.error_code = code.code();
                body.error_message = Some(message.clone().into());
            }
            body.auth_bytes = Bytes::from(bytes);
            answer(ResponseKind::SaslAuthenticate(body), error.is_some())
        };
        let refused = |mechanism: &str| {
            (
                ResponseError::SaslAuthenticationFailed,
                format!(
                    "Authentication failed: invalid credentials with SASL mechanism {mechanism}"
                ),
            )
        };
        match &request.body {
            RequestKind::ApiVersions(_) => None,
            RequestKind::SaslHandshake(req) => {
                let mut body = SaslHandshakeResponse::default();
                body.mechanisms = sasl::MECHANISMS.iter().map(|m| (*m).into()).collect();
                let close = match (&*login, Mechanism::parse(&req.mechanism)) {
                    _ if version == 0 => {
                        body.error_code = ResponseError::UnsupportedVersion.code();
                        true
                    }
                    (Login::Open, Some(mechanism)) => {
                        *login = Login::Handshaken(mechanism);
                        false
                    }
                    (Login::Open, None) => {
                        body.error_code = ResponseError::UnsupportedSaslMechanism.code();
                        true
                    }
                    _ => {
                        body.error_code = ResponseError::IllegalSaslState.code();
                        true
                    }
                };
                answer(ResponseKind::SaslHandshake(body), close)
            }
            RequestKind::SaslAuthenticate(req) => match std::mem::take(login) {
                Login::Handshaken(Mechanism::Plain) => {
                    let admitted = match sasl::parse_plain(&req.auth_bytes) {
                        Ok((user, password)) => {
                            self.gate.admit(peer.ip(), Some((&user, &password))).await
                        }
                        Err(e) => {
                            debug!(%peer, error = %e, "malformed SASL PLAIN message");
                            Err(self.gate.login_failed(peer.ip(), "?").await)
                        }
                    };
                    match admitted {
                        Ok(principal) => {
                            done(login, principal);
                            authenticate(None, Vec::new())
                        }
                        Err(_) => authenticate(Some(refused("PLAIN")), Vec::new()),
                    }
                }
                Login::Handshaken(Mechanism::Scram(m)) => {
                    match sasl::ClientFirst::parse(&req.auth_bytes) {
                        Ok(first) => {
                            let users = &self.gate.users;
                            let credential = users
                                .scram(&first.user, m)
                                .unwrap_or_else(|| users.stand_in_scram(&first.user, m));
                            let (scram, reply) = sasl::Scram::start(m, first, credential);
                            *login = Login::Scram(Box::new(scram));
                            authenticate(None, reply)
                        }
                        Err(e) => {
                            debug!(%peer, error = %e, "malformed SCRAM message");
                            self.gate.login_failed(peer.ip(), "?").await;
                            authenticate(Some(refused(m.name())), Vec::new())
                        }
                    }
                }
                Login::Scram(scram) => match scram.finish(&req.auth_bytes) {
                    // A user removed during the exchange is refused.
                    Ok(reply) if self.gate.users.exists(&scram.user) => {
                        done(login, self.gate.logged_in(peer.ip(), &scram.user));
                        authenticate(None, reply)
                    }
                    result => {
                        if let Err(e) = result {
                            debug!(%peer, user = %scram.user, error = %e, "SCRAM exchange refused");
                        }
                        self.gate.login_failed(peer.ip(), &scram.user).await;
                        authenticate(Some(refused("SCRAM")), Vec::new())
                    }
                },
                Login::Open | Login::Done => authenticate(
                    Some((
                        ResponseError::IllegalSaslState,
                        "SaslAuthenticate without a SaslHandshake before it".into(),
                    )),
                    Vec::new(),
                ),
            },
            _ => match login {
                Login::Done => None,
                Login::Open => match self.gate.anonymous(peer.ip()) {
                    Ok(principal) => {
                        done(login, principal);
                        None
                    }
                    Err(_) => Some(Gatekept::Close(format!(
                        "{api:?} from a client that has not logged in (SASL), and anonymous clients are not allowed from here"
                    ))),
                },
                Login::Handshaken(_) | Login::Scram(_) => Some(Gatekept::Close(format!(
                    "{api:?} in the middle of a SASL exchange"
                ))),
            },
        }
    }

    /// Starts handling a request and returns what the answering half awaits.
    async fn start(
        self: &Arc<Self>,
        request: codec::Request,
        client: &Arc<Client>,
        last_other: &mut Option<oneshot::Receiver<()>>,
    ) -> Queued {
        let (api, version, correlation_id) = (
            request.api,
            request.version(),
            request.header.correlation_id,
        );
        let response: Answer = match request.body {
            RequestKind::Produce(produce) => {
                // A produce must not overtake an earlier request (a metadata request
                // that creates its topic, say).
                if let Some(done) = last_other.take() {
                    let _ = done.await;
                }
                let client_id = request.header.client_id.as_deref().unwrap_or_default();
                let finish = self.start_produce(produce, client.subject(client_id)).await;
                Box::pin(async move { finish.await.map(ResponseKind::Produce) })
            }
            body => {
                let (done_tx, done_rx) = oneshot::channel();
                *last_other = Some(done_rx);
                let broker = self.clone();
                let client = client.clone();
                let request = codec::Request {
                    api,
                    header: request.header,
                    body,
                };
                Box::pin(async move {
                    let response = broker.handle(request, &client).await;
                    let _ = done_tx.send(());
                    response
                })
            }
        };
        Queued {
            api,
            version,
            correlation_id,
            response,
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
pub fn log_listening(addr: SocketAddr, tls: bool, settings: &KafkaSettings) {
    let port = settings.advertised_port(tls);
    info!(kafka = %addr, tls, advertised = %format!("{}:{port}", settings.advertised_host), "kafka listener ready");
}
#[cfg(test)]
mod tests;
