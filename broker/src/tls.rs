//! TLS for every listener (`[tls]`): one rustls server configuration, built from PEM
//! files, shared by the MQTT, Kafka and admin listeners and swapped whole on SIGHUP.
//! With `client_ca`, clients must present a certificate it signed, and the certificate's
//! identity (its CN, else its first DNS name) is the connection's user.
//!
//! A reload builds the new configuration before it replaces the old one: a missing or
//! bad file keeps the certificates in use, and the log says why. Connections keep the
//! configuration they were accepted with; only new ones see the new files.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::RwLock;
use prometheus_client::metrics::counter::Counter;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

pub mod websocket;

/// A handshake that takes longer than this is abandoned: a client that opens the TLS
/// port and says nothing holds a connection no longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `[tls]`: the server's certificate chain and key, and the CA that signs clients'.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM: the server certificate first, then its intermediates.
    pub cert: Option<PathBuf>,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// PEM: CA certificates. When set, every TLS client must present a certificate
    /// signed by one of them, and its identity is the client's user.
    pub client_ca: Option<PathBuf>,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("[tls] needs both cert and key")]
    Incomplete,
    #[error("cannot read {path}: {source}")]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
    #[error("[tls] client_ca {path}: {source}")]
    ClientCa {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("[tls] cert and key: {0}")]
    Rustls(#[from] rustls::Error),
}
crate::metrics::group! {
    /// The `weir_tls_*` metrics.
    #[derive(Clone, Debug, Default)]
    pub struct TlsMetrics in "tls" {
        /// TLS handshakes completed.
        handshakes: Counter,
        /// TLS handshakes that failed: plaintext on a TLS port, an untrusted or expired client
        /// certificate, a timeout.
        handshake_failures: Counter,
        /// Certificate reloads (SIGHUP) that took effect.
        reloads: Counter,
        /// Certificate reloads refused for a bad file (the old certificates stay).
        reload_failures: Counter,
    }
}

/// The server side of TLS, shared by every listener.
pub struct Tls {
    files: TlsConfig,
    acceptor: RwLock<TlsAcceptor>,
    metrics: TlsMetrics,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

/// A TLS connection, and who its certificate says the client is.
pub struct Accepted {
    pub stream: TlsStream<TcpStream>,
    /// The client certificate's identity (with `client_ca` only).
    pub identity: Option<String>,
}

impl Tls {
    /// Reads the files; `None` when `[tls]` is not configured.
    pub fn load(files: &TlsConfig, metrics: TlsMetrics) -> Result<Option<Arc<Tls>>, TlsError> {
        if !files.enabled() {
            return Ok(None);
        }
        let acceptor = build(files)?;
        Ok(Some(Arc::new(Tls {
            files: files.clone(),
            acceptor: RwLock::new(acceptor),
            metrics,
        })))
    }

    /// Reads the files again; on any error the certificates in use stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        match build(&self.files) {
            Ok(acceptor) => {
                *self.acceptor.write() = acceptor;
                self.metrics.reloads.inc();
                Ok(())
            }
            Err(e) => {
                self.metrics.reload_failures.inc();
                Err(e)
            }
        }
    }

    /// The handshake, bounded by `HANDSHAKE_TIMEOUT`. A failure is counted; the caller
    /// just drops the connection (the client got a TLS alert where there was one to send).
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<Accepted> {
        let acceptor = self.acceptor.read().clone();
        let result = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no TLS handshake in time",
            )),
        };
        match result {
            Ok(stream) => {
                self.metrics.handshakes.inc();
                let identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|cert| identity(cert));
                Ok(Accepted { stream, identity })
            }
            Err(e) => {
                self.metrics.handshake_failures.inc();
                Err(e)
            }
        }
    }
}

fn build(files: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let (Some(cert), Some(key)) = (&files.cert, &files.key) else {
        return Err(TlsError::Incomplete);
    };
    let chain = read_certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Pem {
        path: key.clone(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in read_certificates(path)? {
                roots.add(ca)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|source| TlsError::ClientCa {
                    path: path.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

/// A certificate's identity: its subject's CN, else its first DNS name. `None` for a
/// certificate that does not parse (the verifier accepted it, so that is unexpected) or
/// names no one.
pub fn identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Some(cn) = parsed
        .subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty())
    {
        return Some(cn.to_string());
    }
    let names = parsed.subject_alternative_name().ok()??;
    names
        .value
        .general_names
        .iter()
        .find_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) if !dns.is_empty() => {
                Some((*dns).to_string())
            }
            _ => None,
        })
}

/// A listening socket and, for a TLS listener, what its connections handshake with.
pub struct Listener {
    pub tcp: tokio::net::TcpListener,
    pub tls: Option<Arc<Tls>>,
    /// MQTT over WebSockets: connections upgrade first (`tls/websocket.rs`), with messages
    /// up to this many bytes.
    pub websocket: Option<usize>,
}

impl Listener {
    /// `what` names the listener in the error (`mqtt`, `kafka TLS`).
    pub async fn bind(
        addr: std::net::SocketAddr,
        tls: Option<Arc<Tls>>,
        what: &str,
    ) -> anyhow::Result<Listener> {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({what}): {e}"))?;
        Ok(Listener {
            tcp,
            tls,
            websocket: None,
        })
    }

    /// This listener's connections speak WebSocket (`tls/websocket.rs`), in messages of at
    /// most `max_message` bytes.
    pub fn websocket(mut self, max_message: usize) -> Self {
        self.websocket = Some(max_message);
        self
    }

    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.tcp.local_addr()
    }
}

/// A TCP connection accepted on one of several listeners, not yet ready to speak.
pub struct Incoming {
    pub tcp: TcpStream,
    pub peer: std::net::SocketAddr,
    tls: Option<Arc<Tls>>,
    websocket: Option<usize>,
}

impl Incoming {
    /// The connection ready for the protocol: at once when plain, after the handshakes
    /// (in the caller's task, so a slow client holds up no one else) when TLS or
    /// WebSocket. With the client certificate's identity.
    pub async fn open(self) -> io::Result<(Stream, Option<String>)> {
        let _ = self.tcp.set_nodelay(true);
        let (stream, identity) = match self.tls {
            None => (Stream::Plain(self.tcp), None),
            Some(tls) => {
                let accepted = tls.accept(self.tcp).await?;
                (Stream::Tls(Box::new(accepted.stream)), accepted.identity)
            }
        };
        match self.websocket {
            None => Ok((stream, identity)),
            Some(max) => {
                let ws = websocket::accept(stream, max, HANDSHAKE_TIMEOUT).await?;
                Ok((Stream::Ws(Box::new(ws)), identity))
            }
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The connection, ready at once when its listener is plain.
    pub fn plain(self) -> Result<Stream, Incoming> {
        if self.tls.is_some() || self.websocket.is_some() {
            return Err(self);
        }
        let _ = self.tcp.set_nodelay(true);
        Ok(Stream::Plain(self.tcp))
    }
}

/// The next connection on any of `listeners`.
pub async fn accept_any(listeners: &[Listener]) -> io::Result<Incoming> {
    let accepts = listeners.iter().map(|l| {
        Box::pin(async move {
            let (tcp, peer) = l.tcp.accept().await?;
            Ok(Incoming {
                tcp,
                peer,
                tls: l.tls.clone(),
                websocket: l.websocket,
            })
        })
    });
    futures::future::select_all(accepts).await.0
}

/// A client connection, plain or TLS, and either of them carrying WebSocket frames.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Ws(Box<websocket::WsStream>),
}

impl Stream {
    /// Writes all of `bytes` and flushes them: a WebSocket frame (or TLS record) goes
    /// out only on a flush.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.write_all(bytes).await?;
        self.flush().await
    }

    /// Waits for bytes and appends what arrived to `buf`, which grows by `chunk` only
    /// once there is something to read on a plain socket (an idle connection holds no
    /// buffer). `0`: the end of the stream. Cancel-safe: nothing is read unless returned.
    pub async fn read_some(&mut self, buf: &mut BytesMut, chunk: usize) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => loop {
                tcp.readable().await?;
                buf.reserve(chunk);
                match tcp.try_read_buf(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if buf.is_empty() {
                            *buf = BytesMut::new();
                        }
                    }
                    result => return result,
                }
            },
            Stream::Tls(tls) => {
                buf.reserve(chunk);
                tls.read_buf(buf).await
            }
            Stream::Ws(ws) => {
                buf.reserve(chunk);
                ws.read_buf(buf).await
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Ws(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Ws(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Ws(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Ws(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The admin listener over TLS, for axum: handshakes run concurrently, so a client that
/// stalls one holds up no other.
pub struct AdminListener {
    tcp: tokio::net::TcpListener,
    tls: Arc<Tls>,
    handshakes: tokio::task::JoinSet<Option<(TlsStream<TcpStream>, std::net::SocketAddr)>>,
}

impl AdminListener {
    pub fn new(tcp: tokio::net::TcpListener, tls: Arc<Tls>) -> Self {
        Self {
            tcp,
            tls,
            handshakes: tokio::task::JoinSet::new(),
        }
    }
}

impl axum::serve::Listener for AdminListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let tls = self.tls.clone();
                        self.handshakes.spawn(async move {
                            let accepted = tls.accept(tcp).await.inspect_err(|e| {
                                tracing::debug!(%peer, error = %e, "admin TLS handshake failed");
                            });
                            Some((accepted.ok()?.stream, peer))
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot accept an admin connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
