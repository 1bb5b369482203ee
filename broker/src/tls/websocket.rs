//! MQTT over WebSockets (`[mqtt] ws_listen`, `wss_listen`), as browsers speak it: an
//! HTTP upgrade on path `/mqtt` with the subprotocol `mqtt`, then MQTT packets in binary
//! frames. `tokio-tungstenite` does the handshake and the framing; `WsStream` turns the
//! frames back into the byte stream the MQTT connection reads, so a packet split across
//! frames and several packets in one frame are the same to it, and a WebSocket client
//! has the sessions, rules and limits of a TCP one.
//!
//! Pings are answered by tungstenite; a close frame ends the stream; a text frame or a
//! malformed frame is an error that closes that connection only.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures::{Sink, Stream as _};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use super::Stream;

/// The path browsers' MQTT clients (MQTT.js, Paho JavaScript) connect to by default.
pub const PATH: &str = "/mqtt";
/// Subprotocols accepted, as MQTT 3.1.1 §6 names them: `mqtt`, and `mqttv3.1`, which
/// older clients still offer.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// One WebSocket connection as a byte stream.
pub struct WsStream {
    ws: WebSocketStream<Stream>,
    /// What is left of the last binary frame read.
    pending: Bytes,
}

/// Answers the upgrade on `stream`, within `timeout`. A request for another path, or
/// offering only subprotocols other than MQTT's, is refused with an HTTP error.
/// `max_message`: the largest frame or message accepted (the MQTT packet limit).
// The check's error type is tungstenite's (its `Callback` trait), an HTTP response.
#[allow(clippy::result_large_err)]
pub async fn accept(stream: Stream, max_message: usize, timeout: Duration) -> io::Result<WsStream> {
    let check = |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        let refuse = |status: StatusCode, why: &str| {
            let mut error = ErrorResponse::new(Some(why.to_string()));
            *error.status_mut() = status;
            error
        };
        if request.uri().path() != PATH {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                "MQTT over WebSockets is served on /mqtt",
            ));
        }
        let offered = request
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        if offered.is_empty() {
            return Ok(response);
        }
        match SUBPROTOCOLS.iter().find(|p| offered.contains(p)) {
            Some(chosen) => {
                response
                    .headers_mut()
                    .insert("sec-websocket-protocol", HeaderValue::from_static(chosen));
                Ok(response)
            }
            None => Err(refuse(
                StatusCode::BAD_REQUEST,
                "the WebSocket subprotocol must be mqtt",
            )),
        }
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config));
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(ws)) => Ok(WsStream {
            ws,
            pending: Bytes::new(),
        }),
        Ok(Err(e)) => Err(to_io(e)),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no WebSocket upgrade in time",
        )),
    }
}

fn to_io(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        e => io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

impl AsyncRead for WsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(bytes))) => this.pending = bytes,
                // Answered (pings) or nothing to do.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "MQTT over WebSockets is sent in binary frames, not text",
                    )));
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl AsyncWrite for WsStream {
    /// Each write is one binary frame.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let ws = &mut self.get_mut().ws;
        ready!(Pin::new(&mut *ws).poll_ready(cx)).map_err(to_io)?;
        Pin::new(ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(to_io)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(to_io)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.get_mut().ws).poll_close(cx)) {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}
