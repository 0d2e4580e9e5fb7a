//! The replication transport: QUIC (quinn) with TLS 1.3 (rustls, ring), carrying the framed
//! messages of `docs/PROTOCOL.md` over one bidirectional stream per database.
//!
//! * Certificates are always verified: a replica trusts only the CA it is given for the
//!   primary's certificate, and a primary with a client CA requires every replica to present a
//!   certificate signed by it (mutual TLS). [`crate::cert`] makes a development CA and
//!   certificates.
//! * The ALPN protocol is [`ALPN`]; a peer that does not offer it is refused during the
//!   handshake.
//! * Transport parameters suit replication: keep-alives every [`KEEP_ALIVE_INTERVAL`], a
//!   connection silent for [`IDLE_TIMEOUT`] is dropped, and receive windows of
//!   [`STREAM_RECEIVE_WINDOW`] per stream and [`CONNECTION_RECEIVE_WINDOW`] per connection
//!   absorb bursts of large transactions.
//!
//! Every constructor that makes an endpoint must be called within a Tokio runtime.

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::task::{self, Poll, Waker};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, EndpointConfig, RecvStream, SendStream, VarInt};
use replited_core::proto::{encode_frame, FrameDecoder, Message, ProtoError};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// TLS material for a server: certificate chain and key (PEM files). `client_ca`: when set,
/// client certificates are mandatory and must chain to a certificate in this PEM file.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The server's certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// The server's private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// The CA(s) client certificates must chain to; None accepts clients without certificates.
    pub client_ca: Option<PathBuf>,
}

/// TLS material for a client: the CA that must have signed the server's certificate, an
/// optional client certificate and key (both or neither), and the name to verify the server's
/// certificate against (a DNS name or an IP address).
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// The CA(s) the server's certificate must chain to (PEM).
    pub ca: PathBuf,
    /// The client's certificate chain (PEM), for servers requiring client certificates.
    pub cert: Option<PathBuf>,
    /// The client's private key (PEM).
    pub key: Option<PathBuf>,
    /// The name the server's certificate must hold (DNS name or IP address).
    pub server_name: String,
}

/// The ALPN protocol identifier of replited's replication protocol, version 1.
pub const ALPN: &[u8] = b"replited/1";

/// How long a connection that received nothing waits before it sends a keep-alive. The
/// protocol's heartbeats (every 2 s from each side, [`replited_core::replica::HEARTBEAT_MS`])
/// keep a live conversation from needing any; longer than they are, so that a heartbeat a few
/// milliseconds late does not add a packet.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(3);
/// A connection that hears nothing for this long is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Flow-control window of one stream: bytes the peer may send ahead of our reads.
pub const STREAM_RECEIVE_WINDOW: u32 = 8 * 1024 * 1024;
/// Flow-control window of a connection, all streams together.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;
/// Bytes we may have in flight, unacknowledged, on a connection.
pub const SEND_WINDOW: u64 = 16 * 1024 * 1024;

/// Largest piece read from a stream at once: what [`FramedStream::recv`] buffers beyond the
/// frame it is assembling.
const READ_CHUNK: usize = 64 * 1024;
/// Send buffers grown beyond this (by a large message) are released after use.
const KEEP_SEND_BUFFER: usize = 1024 * 1024;

/// QUIC application error code sent when a stream or connection is dropped because of a
/// framing or protocol error.
pub const PROTOCOL_ERROR_CODE: u32 = 1;

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A stream address that is not `quic://HOST:PORT` or `http://HOST:PORT`.
    #[error("Invalid stream address: {0} (expected quic://HOST:PORT or http://HOST:PORT)")]
    InvalidStreamAddress(String),
    /// A host name that did not resolve to a usable address.
    #[error("cannot resolve {host}: {reason}")]
    Resolve {
        /// The host.
        host: String,
        /// Why.
        reason: String,
    },
    /// The peer sent bytes that are not a valid frame (or a message too large to frame was
    /// given to `send`). The stream is unusable afterwards.
    #[error("framing: {0}")]
    Frame(ProtoError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended in the middle of a frame ({buffered} bytes of it received)")]
    Truncated {
        /// Bytes of the incomplete frame received.
        buffered: usize,
    },
    /// The connection could not be started.
    #[error("connecting: {}", chain(.0))]
    Connect(quinn::ConnectError),
    /// The connection failed or was closed (a TLS refusal included).
    #[error("connection: {}", chain(.0))]
    Connection(quinn::ConnectionError),
    /// Writing to the stream failed (the connection's fate included).
    #[error("writing to the stream: {}", chain(.0))]
    Write(quinn::WriteError),
    /// Reading from the stream failed (the connection's fate included).
    #[error("reading from the stream: {}", chain(.0))]
    Read(quinn::ReadError),
    /// The stream was already finished or reset locally.
    #[error("stream: {0}")]
    ClosedStream(quinn::ClosedStream),
}

/// An error and its sources on one line (quinn's stream errors keep the connection's reason,
/// a TLS alert for instance, in their source). The variants above do not report a source of
/// their own, so the detail is not repeated by `{:#}`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let t = src.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = src.source();
    }
    s
}

macro_rules! from_quinn {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for TransportError {
            fn from(e: $t) -> TransportError {
                TransportError::$v(e)
            }
        }
    )*};
}

from_quinn!(
    quinn::ConnectError => Connect,
    quinn::ConnectionError => Connection,
    quinn::WriteError => Write,
    quinn::ReadError => Read,
    quinn::ClosedStream => ClosedStream
);

impl From<ProtoError> for TransportError {
    fn from(e: ProtoError) -> TransportError {
        TransportError::Frame(e)
    }
}

/// The transport parameters every replited endpoint uses.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("10 s is a valid idle timeout"),
        ))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        // Only bidirectional streams are used.
        .max_concurrent_uni_streams(VarInt::from_u32(0));
    t
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process's TLS provider, for what builds its configuration from the process
/// default: the S3 client's HTTPS (attohttpc's rustls, whose features also compile aws-lc-rs,
/// so rustls cannot pick one alone). The QUIC transport passes its provider explicitly.
pub fn install_default_provider() {
    // Err: one is installed already (the same, by an earlier call).
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn load_certs(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow!("reading the {what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!(
            "reading the {what} {}: no certificate in the file",
            path.display()
        );
    }
    Ok(certs)
}

fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| anyhow!("reading the private key {}: {e}", path.display()))
}

fn load_roots(path: &Path, what: &str) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, what)? {
        roots
            .add(cert)
            .with_context(|| format!("the {what} {}", path.display()))?;
    }
    Ok(roots)
}

/// The quinn server configuration for `tls`.
pub fn server_config(tls: &ServerTls) -> anyhow::Result<quinn::ServerConfig> {
    let chain = load_certs(&tls.cert, "server certificate")?;
    let key = load_key(&tls.key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let roots = load_roots(ca, "client CA")?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .with_context(|| format!("the client CA {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut crypto = builder.with_single_cert(chain, key).with_context(|| {
        format!(
            "the server certificate {} and key {}",
            tls.cert.display(),
            tls.key.display()
        )
    })?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(crypto).context("TLS configuration for QUIC")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// The quinn client configuration for `tls` (the server name is given at connect time).
pub fn client_config(tls: &ClientTls) -> anyhow::Result<quinn::ClientConfig> {
    let roots = load_roots(&tls.ca, "CA")?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .with_root_certificates(roots);
    let mut crypto = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let chain = load_certs(cert, "client certificate")?;
            let key_der = load_key(key)?;
            builder
                .with_client_auth_cert(chain, key_der)
                .with_context(|| {
                    format!(
                        "the client certificate {} and key {}",
                        cert.display(),
                        key.display()
                    )
                })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => bail!("a client certificate and its key go together: give both or neither"),
    };
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(crypto).context("TLS configuration for QUIC")?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// A server endpoint bound to `addr`.
pub fn server_endpoint(addr: SocketAddr, tls: &ServerTls) -> anyhow::Result<Endpoint> {
    let socket = UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
    server_endpoint_on(socket, tls)
}

/// A server endpoint on an already-bound UDP socket (e.g. one passed by systemd socket
/// activation).
pub fn server_endpoint_on(socket: UdpSocket, tls: &ServerTls) -> anyhow::Result<Endpoint> {
    let config = server_config(tls)?;
    socket
        .set_nonblocking(true)
        .context("making the UDP socket non-blocking")?;
    let local = socket.local_addr().ok();
    let endpoint = Endpoint::new(
        EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .context("starting the QUIC endpoint")?;
    tracing::info!(
        "listening for replicas on quic://{} (client certificates {})",
        local.map_or_else(|| "?".to_string(), |a| a.to_string()),
        if tls.client_ca.is_some() {
            "required"
        } else {
            "not required"
        }
    );
    Ok(endpoint)
}

/// A client endpoint on an OS-assigned port: dual-stack `[::]:0` where IPv6 is available (it
/// reaches IPv4 servers too), else `0.0.0.0:0`.
pub fn client_endpoint(tls: &ClientTls) -> anyhow::Result<Endpoint> {
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
    match client_endpoint_bound(tls, v6) {
        Ok(e) => Ok(e),
        Err(e) => {
            tracing::debug!("no IPv6 client socket ({e:#}): using IPv4");
            client_endpoint_bound(tls, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
        }
    }
}

/// A client endpoint bound to `local` (use `0.0.0.0:0` or `[::]:0` to match the server's
/// family explicitly, or a specific source address).
pub fn client_endpoint_bound(tls: &ClientTls, local: SocketAddr) -> anyhow::Result<Endpoint> {
    let config = client_config(tls)?;
    let mut endpoint =
        Endpoint::client(local).with_context(|| format!("binding UDP {local} for QUIC"))?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Connects `endpoint` to `host:port` (resolving the host; an IP address is used as is) and
/// completes the TLS handshake, verifying the server's certificate for `server_name`. Each
/// resolved address the endpoint can reach is tried in turn.
pub async fn connect(
    endpoint: &Endpoint,
    host: &str,
    port: u16,
    server_name: &str,
) -> Result<Connection, TransportError> {
    let resolve_err = |reason: String| TransportError::Resolve {
        host: host.to_string(),
        reason,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| resolve_err(e.to_string()))?
        .collect();
    let local_v4 = endpoint.local_addr().map(|a| a.is_ipv4()).unwrap_or(false);
    let mut last = None;
    for addr in addrs.into_iter().filter(|a| !(local_v4 && a.is_ipv6())) {
        tracing::debug!("connecting to {addr} ({host}:{port}) as {server_name}");
        let result = match endpoint.connect(addr, server_name) {
            Ok(connecting) => connecting.await.map_err(TransportError::from),
            Err(e) => Err(TransportError::from(e)),
        };
        match result {
            Ok(conn) => {
                tracing::info!(
                    "connected to {addr} ({})",
                    peer_identity(&conn).unwrap_or_else(|| server_name.to_string())
                );
                return Ok(conn);
            }
            Err(e) => {
                tracing::warn!("connecting to {addr} ({host}:{port}): {e}");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| resolve_err("no address this endpoint can reach".to_string())))
}

/// Waits for the handshake of an incoming connection and logs the peer (with its client
/// certificate's subject and names under mutual TLS). Refused handshakes are logged and
/// returned as errors.
pub async fn accept(incoming: quinn::Incoming) -> Result<Connection, TransportError> {
    let peer = incoming.remote_address();
    match incoming.await {
        Ok(conn) => {
            match peer_identity(&conn) {
                Some(id) => tracing::info!("replica connected from {peer}: {id}"),
                None => tracing::info!("replica connected from {peer}"),
            }
            Ok(conn)
        }
        Err(e) => {
            tracing::warn!("refused connection from {peer}: {e}");
            Err(e.into())
        }
    }
}

/// The subject and subject alternative names of the peer's certificate, when it presented one.
pub fn peer_identity(conn: &Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    crate::cert::describe(certs.first()?)
}

/// Parses a stream address: `quic://HOST:PORT`, or `http://HOST:PORT` as replited's guides
/// write it (the scheme is required, a trailing `/` is allowed). HOST is a DNS name, an IPv4
/// address or a bracketed IPv6 address (returned without brackets); PORT is 1..=65535.
pub fn parse_stream_addr(s: &str) -> Result<(String, u16), TransportError> {
    let invalid = || TransportError::InvalidStreamAddress(s.to_string());
    let (scheme, rest) = s.split_once("://").ok_or_else(invalid)?;
    if !scheme.eq_ignore_ascii_case("quic") && !scheme.eq_ignore_ascii_case("http") {
        return Err(invalid());
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, p) = r.split_once("]:").ok_or_else(invalid)?;
        h.parse::<Ipv6Addr>().map_err(|_| invalid())?;
        (h, p)
    } else {
        let (h, p) = rest.rsplit_once(':').ok_or_else(invalid)?;
        let host_ok = !h.is_empty()
            && h.len() <= 253
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !host_ok {
            return Err(invalid());
        }
        (h, p)
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let port: u16 = port.parse().map_err(|_| invalid())?;
    if port == 0 {
        return Err(invalid());
    }
    Ok((host.to_string(), port))
}

/// Framed [`Message`]s over one QUIC bidirectional stream (`docs/PROTOCOL.md`, section 1).
///
/// Receiving buffers at most one frame plus one read chunk: a frame length above
/// `MAX_FRAME_LEN` is refused as soon as its 4 bytes are in, and the buffer only ever grows with
/// bytes actually received. Any framing error is final for the stream (the receiving half is
/// stopped with [`PROTOCOL_ERROR_CODE`]).
#[derive(Debug)]
pub struct FramedStream {
    send: SendStream,
    recv: RecvStream,
    decoder: FrameDecoder,
    out: Vec<u8>,
    eof: bool,
}

impl FramedStream {
    /// Wraps the two halves of a bidirectional stream.
    pub fn new(send: SendStream, recv: RecvStream) -> FramedStream {
        FramedStream {
            send,
            recv,
            decoder: FrameDecoder::new(),
            out: Vec::new(),
            eof: false,
        }
    }

    /// Refuses frames longer than `limit` bytes (at most `MAX_FRAME_LEN`) as soon as their
    /// length is in, before buffering them: for a peer whose messages are known to be small (a
    /// primary reading a replica, `MAX_REPLICA_FRAME_LEN`). Call before receiving anything.
    pub fn with_frame_limit(mut self, limit: u32) -> FramedStream {
        self.decoder = FrameDecoder::with_limit(limit);
        self
    }

    /// Opens a new stream on `conn` (the replica's side: it speaks first, and the peer sees
    /// the stream when the first message arrives).
    pub async fn open(conn: &Connection) -> Result<FramedStream, TransportError> {
        let (send, recv) = conn.open_bi().await?;
        Ok(FramedStream::new(send, recv))
    }

    /// Accepts the next stream the peer opens on `conn` (the primary's side).
    pub async fn accept(conn: &Connection) -> Result<FramedStream, TransportError> {
        let (send, recv) = conn.accept_bi().await?;
        Ok(FramedStream::new(send, recv))
    }

    /// Sends one message. Not cancel-safe: a send abandoned midway leaves a partial frame.
    pub async fn send(&mut self, m: &Message) -> Result<(), TransportError> {
        self.out.clear();
        encode_frame(m, &mut self.out)?;
        let r = self.send.write_all(&self.out).await;
        if self.out.capacity() > KEEP_SEND_BUFFER {
            self.out = Vec::new();
        }
        r?;
        Ok(())
    }

    /// Sends bytes that are already whole frames (from a state machine's `poll_transmit`).
    /// Not cancel-safe, like [`FramedStream::send`].
    pub async fn send_frames(&mut self, frames: &[u8]) -> Result<(), TransportError> {
        self.send.write_all(frames).await?;
        Ok(())
    }

    /// Receives the next message; `Ok(None)` when the peer finished the stream cleanly between
    /// frames. Cancel-safe: bytes read are kept in the decoder if the future is dropped.
    pub async fn recv(&mut self) -> Result<Option<Message>, TransportError> {
        loop {
            if let Some(m) = self.decoded()? {
                return Ok(Some(m));
            }
            if self.eof {
                return match self.decoder.buffered() {
                    0 => Ok(None),
                    buffered => Err(TransportError::Truncated { buffered }),
                };
            }
            match self.recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.decoder.push(&chunk.bytes),
                None => self.eof = true,
            }
        }
    }

    /// The next message when it has arrived already (in what is buffered here or in quinn),
    /// without waiting: Ok(None) when none has. The end of the stream is left for
    /// [`FramedStream::recv`] to report.
    pub fn try_recv(&mut self) -> Result<Option<Message>, TransportError> {
        loop {
            if let Some(m) = self.decoded()? {
                return Ok(Some(m));
            }
            if self.eof {
                return Ok(None);
            }
            // One poll with a waker that does nothing: quinn hands out what it holds or says
            // Pending (read_chunk is cancel-safe; the next `recv` registers the real waker).
            let mut cx = task::Context::from_waker(Waker::noop());
            match pin!(self.recv.read_chunk(READ_CHUNK, true)).poll(&mut cx) {
                Poll::Ready(Ok(Some(chunk))) => self.decoder.push(&chunk.bytes),
                Poll::Ready(Ok(None)) => self.eof = true,
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => return Ok(None),
            }
        }
    }

    /// A whole message from what is buffered, if there is one.
    fn decoded(&mut self) -> Result<Option<Message>, TransportError> {
        match self.decoder.poll() {
            Ok(m) => Ok(m),
            Err(e) => {
                // Tell the peer to stop sending; the stream is done either way.
                let _ = self.recv.stop(VarInt::from_u32(PROTOCOL_ERROR_CODE));
                Err(e.into())
            }
        }
    }

    /// Finishes the sending half: the peer's `recv` returns `Ok(None)` after the last message.
    pub fn finish(&mut self) -> Result<(), TransportError> {
        self.send.finish()?;
        Ok(())
    }

    /// Bytes received and not yet decoded (part of a frame).
    pub fn buffered(&self) -> usize {
        self.decoder.buffered()
    }

    /// The underlying stream halves.
    pub fn into_inner(self) -> (SendStream, RecvStream) {
        (self.send, self.recv)
    }
}
