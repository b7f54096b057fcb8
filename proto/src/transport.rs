//! QUIC endpoints, connection reuse and the one call path.
//!
//! Every exchange is a typed request naming its response ([`Rpc`]) on one
//! bidirectional stream: the caller writes the protocol version and the
//! request frame, optionally a body of raw pieces (chunk bytes,
//! parameters); the server answers with a reply frame, optionally followed
//! by a body. [`Endpoint::request`] opens one; every piece sent or received
//! on either side has an idle deadline ([`Tuning::piece_idle`]), and the
//! reply an overall one, so a peer that is alive but stuck (a hung disk, a
//! full queue) fails the exchange in bounded time instead of holding it
//! forever. Each endpoint consults its [`Faults`] for every request it
//! sends or serves. Every transport setting lives in [`Tuning`] so the
//! benchmark can compare quinn's defaults with ours.

use crate::error::{Error, Result, WireError};
use crate::fault::{before_request, BodyFault, Direction, Faults};
use crate::frame;
use crate::identity::{Expect, Principal};
use crate::msg::{Envelope, NodeAddr, Reply, Rpc};
use crate::tls::Identity;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Transport knobs, measured by `quern bench io`.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// UDP socket send/receive buffer; loopback drops packets with the
    /// kernel default (~200 KiB) at QUIC's burst sizes.
    pub socket_buffer: usize,
    /// `None` keeps quinn's default flow-control windows.
    pub stream_window: Option<u32>,
    pub connection_window: Option<u32>,
    pub send_window: Option<u64>,
    pub initial_mtu: Option<u16>,
    pub max_udp_payload: Option<u16>,
    pub idle_timeout: Duration,
    pub keep_alive: Duration,
    /// Longest wait for the next piece of a body, either way, before the
    /// peer counts as stuck (QUIC keep-alives still flow from a stuck
    /// process, so the connection's idle timeout never fires).
    pub piece_idle: Duration,
    /// Start another replica of a read that delivered nothing for this
    /// long; `None` adapts to the gaps between pieces seen recently.
    pub hedge_after: Option<Duration>,
}

impl Tuning {
    /// What quern runs with: quinn's defaults plus large socket buffers.
    /// Larger flow-control windows measured slower here (DESIGN.md).
    pub fn tuned() -> Tuning {
        Tuning {
            socket_buffer: 8 << 20,
            ..Tuning::quinn_defaults()
        }
    }

    /// quinn's own defaults with the kernel's socket buffers (the baseline).
    pub fn quinn_defaults() -> Tuning {
        Tuning {
            socket_buffer: 0,
            stream_window: None,
            connection_window: None,
            send_window: None,
            initial_mtu: None,
            max_udp_payload: None,
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(2),
            piece_idle: Duration::from_secs(10),
            hedge_after: None,
        }
    }

    fn transport_config(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        if let Some(w) = self.stream_window {
            t.stream_receive_window(w.into());
        }
        if let Some(w) = self.connection_window {
            t.receive_window(w.into());
        }
        if let Some(w) = self.send_window {
            t.send_window(w);
        }
        if let Some(m) = self.initial_mtu {
            t.initial_mtu(m);
        }
        t.max_concurrent_bidi_streams(1024u32.into());
        t.max_concurrent_uni_streams(0u32.into());
        if let Ok(idle) = quinn::IdleTimeout::try_from(self.idle_timeout) {
            t.max_idle_timeout(Some(idle));
        }
        t.keep_alive_interval(Some(self.keep_alive));
        t
    }

    fn endpoint_config(&self, identity: &Identity) -> quinn::EndpointConfig {
        let mut e = match &identity.cert {
            // Connection ids and stateless resets are keyed by secrets
            // derived from the node's private key, the same in every run:
            // a peer still holding a connection to this node's previous
            // process is told it is gone at its first packet (its ids are
            // recognised, and the reset proves who sends it), instead of
            // waiting out QUIC's idle timeout: a datanode's heartbeats
            // after a namenode restart, a client's reads after a datanode's.
            Some((_, key)) => {
                let reset = blake3::derive_key("quern QUIC stateless reset", key.secret_der());
                let ids = blake3::derive_key("quern QUIC connection ids", key.secret_der());
                let ids = u64::from_le_bytes([
                    ids[0], ids[1], ids[2], ids[3], ids[4], ids[5], ids[6], ids[7],
                ]);
                let mut e = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
                    ring::hmac::HMAC_SHA256,
                    &reset,
                )));
                e.cid_generator(move || {
                    Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(ids))
                });
                e
            }
            None => quinn::EndpointConfig::default(),
        };
        if let Some(p) = self.max_udp_payload {
            // Only fails below the QUIC minimum, which no setting here uses.
            let _ = e.max_udp_payload_size(p);
        }
        e
    }

    fn bind(&self, addr: SocketAddr) -> Result<std::net::UdpSocket> {
        let domain = socket2::Domain::for_address(addr);
        let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
            .map_err(|e| Error::io(format!("creating a UDP socket for {addr}"), e))?;
        if self.socket_buffer > 0 {
            set_buffer(&sock, self.socket_buffer);
        }
        sock.bind(&addr.into())
            .map_err(|e| Error::io(format!("binding {addr} (is another process using it?)"), e))?;
        Ok(sock.into())
    }
}

/// Sets both socket buffers, beyond `net.core.rmem_max` when privileged.
fn set_buffer(sock: &socket2::Socket, size: usize) {
    use std::os::fd::AsRawFd;
    let fd = sock.as_raw_fd();
    let val = size as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // SAFETY: fd is a live socket owned by `sock`; val outlives the call.
        let forced = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                force,
                &val as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        } == 0;
        if !forced {
            // SAFETY: as above.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    plain,
                    &val as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
}

/// A server to call and what it must prove to be: a caller never sends a
/// request to a certificate of the wrong role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    pub expect: Expect,
}

impl Peer {
    pub fn namenode(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            expect: Expect::Namenode,
        }
    }

    /// Any server of the cluster: for benchmarks and protocol tests.
    pub fn any(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            expect: Expect::Any,
        }
    }
}

impl From<NodeAddr> for Peer {
    fn from(n: NodeAddr) -> Peer {
        Peer {
            addr: n.addr,
            expect: Expect::Datanode(n.id),
        }
    }
}

/// The verified identity behind a connection's peer certificate.
/// Who the peer of `conn` is, by the certificate it presented (from the
/// session ticket when the session was resumed).
pub fn peer_principal(conn: &quinn::Connection) -> Result<Principal> {
    let any = conn
        .peer_identity()
        .ok_or_else(|| Error::Tls("the peer presented no certificate".into()))?;
    let certs = any
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| Error::Tls("unexpected peer identity type".into()))?;
    let first = certs
        .first()
        .ok_or_else(|| Error::Tls("the peer presented an empty certificate chain".into()))?;
    Principal::from_cert(first)
}

type Cached = (quinn::Connection, Arc<Principal>);

/// One QUIC endpoint: a server when given a listen address, always a client,
/// with one reused connection per peer.
pub struct Endpoint {
    inner: quinn::Endpoint,
    conns: Mutex<HashMap<SocketAddr, Cached>>,
    rpc_timeout: Duration,
    connect_timeout: Duration,
    piece_idle: Duration,
    faults: Arc<Faults>,
    hedge: crate::chunk::Hedge,
    metrics: crate::metrics::RequestMetrics,
}

impl Endpoint {
    pub fn server(identity: &Identity, listen: SocketAddr, tuning: Tuning) -> Result<Endpoint> {
        let transport = Arc::new(tuning.transport_config());
        let crypto = QuicServerConfig::try_from(identity.server_config()?)
            .map_err(|e| Error::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport);
        Self::build(identity, listen, Some(server), tuning)
    }

    pub fn client(identity: &Identity, tuning: Tuning) -> Result<Endpoint> {
        Self::build(
            identity,
            "0.0.0.0:0".parse().expect("literal address"),
            None,
            tuning,
        )
    }

    fn build(
        identity: &Identity,
        addr: SocketAddr,
        server: Option<quinn::ServerConfig>,
        tuning: Tuning,
    ) -> Result<Endpoint> {
        let socket = tuning.bind(addr)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| Error::Config("quinn needs a tokio runtime".into()))?;
        let mut inner =
            quinn::Endpoint::new(tuning.endpoint_config(identity), server, socket, runtime)
                .map_err(|e| Error::io(format!("starting QUIC on {addr}"), e))?;
        let crypto = QuicClientConfig::try_from(identity.client_config()?)
            .map_err(|e| Error::Tls(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(tuning.transport_config()));
        inner.set_default_client_config(client);
        Ok(Endpoint {
            inner,
            conns: Mutex::new(HashMap::new()),
            rpc_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            piece_idle: tuning.piece_idle,
            faults: Arc::new(Faults::default()),
            hedge: crate::chunk::Hedge::new(tuning.hedge_after),
            metrics: crate::metrics::RequestMetrics::new(),
        })
    }

    pub fn with_rpc_timeout(mut self, timeout: Duration) -> Endpoint {
        self.rpc_timeout = timeout;
        // Connecting must give up first so its clearer error wins.
        self.connect_timeout = self.connect_timeout.min(timeout * 2 / 3);
        self
    }

    pub fn rpc_timeout(&self) -> Duration {
        self.rpc_timeout
    }

    /// Counts this endpoint's requests in `other`'s figures: a second
    /// listener of one node (the namenode's lifeline) shows in the node's
    /// `/metrics` beside the first.
    pub fn counting_with(mut self, other: &Endpoint) -> Endpoint {
        self.metrics = other.metrics.clone();
        self
    }

    pub fn with_piece_idle(mut self, idle: Duration) -> Endpoint {
        self.piece_idle = idle;
        self
    }

    pub fn piece_idle(&self) -> Duration {
        self.piece_idle
    }

    /// When reads through this endpoint hedge on another replica.
    pub fn hedge(&self) -> &crate::chunk::Hedge {
        &self.hedge
    }

    /// The fault rules this endpoint applies (empty outside tests).
    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.inner
            .local_addr()
            .map_err(|e| Error::io("reading the local address", e))
    }

    pub fn quinn(&self) -> &quinn::Endpoint {
        &self.inner
    }

    /// Closes every connection and stops accepting.
    pub fn close(&self) {
        self.inner.close(0u32.into(), b"shutting down");
    }

    /// A live connection to `peer` and who it is, reusing the cached one.
    pub async fn connection(&self, peer: SocketAddr) -> Result<Cached> {
        if let Some(c) = self.cached(peer) {
            return Ok(c);
        }
        let connecting =
            self.inner
                .connect(peer, crate::SERVER_NAME)
                .map_err(|e| Error::Connect {
                    peer: peer.to_string(),
                    reason: e.to_string(),
                })?;
        let conn = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Err(_) => {
                return Err(Error::Connect {
                    peer: peer.to_string(),
                    reason: format!(
                        "no answer within {} s; is it running? (`quern cluster status`)",
                        self.connect_timeout.as_secs()
                    ),
                })
            }
            Ok(Err(e)) => {
                return Err(Error::Connect {
                    peer: peer.to_string(),
                    reason: explain_connection_error(&e),
                })
            }
            Ok(Ok(c)) => c,
        };
        let who = match peer_principal(&conn) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                conn.close(0u32.into(), b"certificate without a role");
                return Err(Error::Connect {
                    peer: peer.to_string(),
                    reason: e.to_string(),
                });
            }
        };
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.insert(peer, (conn.clone(), who.clone()));
        Ok((conn, who))
    }

    fn cached(&self, peer: SocketAddr) -> Option<Cached> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        match conns.get(&peer) {
            Some((c, who)) if c.close_reason().is_none() => Some((c.clone(), who.clone())),
            Some(_) => {
                conns.remove(&peer);
                None
            }
            None => None,
        }
    }

    /// Forgets a connection that failed so the next call reconnects.
    pub fn forget(&self, peer: SocketAddr) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((c, _)) = conns.remove(&peer) {
            c.close(0u32.into(), b"forgotten after an error");
        }
    }

    /// Opens a stream to a server that proves to be what `peer` expects
    /// and sends `req` on it, ready for a body and the reply. The reply
    /// must come within the endpoint's RPC timeout from now.
    pub async fn request<R: Rpc>(&self, peer: impl Into<Peer>, req: R) -> Result<RequestStream> {
        self.request_within(peer, req, self.rpc_timeout).await
    }

    /// [`Endpoint::request`] with its own overall deadline (a training
    /// step's compute, say, may take longer than an RPC).
    pub async fn request_within<R: Rpc>(
        &self,
        peer: impl Into<Peer>,
        req: R,
        deadline: Duration,
    ) -> Result<RequestStream> {
        let Peer { addr: peer, expect } = peer.into();
        let fault = self.faults.find(Direction::Outgoing, peer, R::KIND);
        before_request(fault).await;
        let (conn, who) = self.connection(peer).await?;
        if !expect.admits(&who.role) {
            return Err(Error::WrongPeer {
                peer: peer.to_string(),
                expected: expect.to_string(),
                found: who.role.to_string(),
            });
        }
        let (mut send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                self.forget(peer);
                return Err(Error::Stream {
                    peer: peer.to_string(),
                    reason: explain_connection_error(&e),
                });
            }
        };
        if let Err(e) = send.write_all(&crate::PROTOCOL_VERSION.to_be_bytes()).await {
            self.forget(peer);
            return Err(match e {
                quinn::WriteError::ConnectionLost(c) => Error::Stream {
                    peer: peer.to_string(),
                    reason: explain_connection_error(&c),
                },
                other => stream_error(peer, other),
            });
        }
        let mut s = RequestStream {
            peer,
            kind: R::KIND,
            send,
            recv,
            idle: self.piece_idle,
            patience: deadline,
            deadline: Instant::now() + deadline,
            body: BodyFault::new(fault),
        };
        let envelope = req.wrap();
        frame::write_frame(&mut s.send, &envelope)
            .await
            .map_err(|e| s.peer_error(e))?;
        Ok(s)
    }

    /// One request, one reply, within the RPC timeout.
    pub async fn call<R: Rpc>(&self, peer: impl Into<Peer>, req: R) -> Result<R::Response> {
        let peer = peer.into();
        let fut = async {
            let mut s = self.request(peer, req).await?;
            s.finish()?;
            s.reply::<R::Response>().await
        };
        match tokio::time::timeout(self.rpc_timeout, fut).await {
            Ok(r) => {
                if let Err(e) = &r {
                    if e.is_peer_failure() {
                        self.forget(peer.addr);
                    }
                }
                r
            }
            Err(_) => {
                self.forget(peer.addr);
                Err(Error::Timeout {
                    peer: peer.addr.to_string(),
                    what: R::KIND.to_string(),
                    secs: self.rpc_timeout.as_secs(),
                })
            }
        }
    }

    /// This node's Prometheus registry; the request figures are in it, and
    /// the node adds its own.
    pub fn registry(&self) -> &prometheus::Registry {
        &self.metrics.registry
    }

    /// The next incoming connection; `None` once the endpoint is closed.
    pub async fn accept(&self) -> Option<quinn::Incoming> {
        self.inner.accept().await
    }
}

fn stream_error(peer: SocketAddr, e: impl std::fmt::Display) -> Error {
    Error::Stream {
        peer: peer.to_string(),
        reason: e.to_string(),
    }
}

/// Turns quinn's connection errors into advice: a refused certificate is
/// the common misconfiguration and deserves to be named as such.
pub fn explain_connection_error(e: &quinn::ConnectionError) -> String {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    // A refused client certificate can surface after the client thinks
    // the handshake is over, as a connection closed with a TLS alert
    // (116 certificate required, 42 bad certificate, 48 unknown CA).
    if lower.contains("certificate")
        || lower.contains("unknownissuer")
        || lower.contains("bad cert")
        || lower.contains("cryptographic handshake failed")
    {
        format!(
            "TLS refused ({text}): both sides need certificates signed by the same cluster CA; \
             use the files `quern cluster init` wrote (the client.toml of `cluster up` names them)"
        )
    } else if lower.contains("no application protocol") {
        format!("{text}: the peer is not a quern node")
    } else {
        text
    }
}

/// The caller's half of an exchange, after the request frame.
pub struct RequestStream {
    pub peer: SocketAddr,
    kind: &'static str,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    idle: Duration,
    /// How long the answer may take once the request is complete.
    patience: Duration,
    deadline: Instant,
    body: BodyFault,
}

impl RequestStream {
    /// Sends one piece of the request's body.
    /// When the server stops reading the body it has already answered
    /// (a refused write, say): that answer is what went wrong, not the
    /// broken pipe.
    pub async fn send_piece(&mut self, piece: bytes::Bytes) -> Result<()> {
        // An empty body is complete before it is written: a fast server
        // may already have answered and stopped reading, and writing
        // nothing to that stream would fail a request that succeeded.
        if piece.is_empty() {
            return Ok(());
        }
        let piece = self.body.pass(piece).await;
        match tokio::time::timeout(self.idle, self.send.write_chunk(piece)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(quinn::WriteError::Stopped(_))) => Err(self.early_answer().await),
            Ok(Err(e)) => Err(stream_error(self.peer, e)),
            Err(_) => Err(stalled(self.peer, self.kind, self.idle)),
        }
    }

    /// [`RequestStream::send_piece`] for a peer that reads the body only
    /// once it has reached the same point (the next worker of a ring still
    /// computing): a piece may wait up to `wait` for room.
    pub async fn send_piece_waiting(&mut self, piece: bytes::Bytes, wait: Duration) -> Result<()> {
        let idle = std::mem::replace(&mut self.idle, wait);
        let sent = self.send_piece(piece).await;
        self.idle = idle;
        sent
    }

    /// The server's reply to a request whose body it stopped reading: its
    /// error when it sent one, else the stop itself.
    async fn early_answer(&mut self) -> Error {
        let reply = tokio::time::timeout(
            self.idle,
            frame::expect_frame::<_, Reply<()>>(&mut self.recv),
        )
        .await;
        match reply {
            Ok(Ok(Err(remote))) => Error::Remote(remote),
            _ => Error::Stream {
                peer: self.peer.to_string(),
                reason: format!("{} stopped reading the request's body", self.kind),
            },
        }
    }

    /// Ends the request's body (or a request without one). The answer's
    /// deadline counts from here: a body's own pace is bounded per piece.
    pub fn finish(&mut self) -> Result<()> {
        self.deadline = Instant::now() + self.patience;
        self.send.finish().map_err(|e| stream_error(self.peer, e))
    }

    /// Reads the reply frame, within the overall deadline; a remote error
    /// becomes [`Error::Remote`].
    pub async fn reply<T: DeserializeOwned>(&mut self) -> Result<T> {
        let reply = tokio::time::timeout_at(self.deadline, frame::expect_frame(&mut self.recv))
            .await
            .map_err(|_| Error::Timeout {
                peer: self.peer.to_string(),
                what: self.kind.to_string(),
                secs: self.patience.as_secs(),
            })?;
        let reply: Reply<T> = reply.map_err(|e| self.peer_error(e))?;
        reply.map_err(Error::Remote)
    }

    /// Reads exactly `len` body bytes that follow the reply.
    pub async fn recv_body(&mut self, len: u64) -> Result<bytes::Bytes> {
        recv_body(&mut self.recv, len, self.peer, self.kind, self.idle, None).await
    }

    /// [`RequestStream::recv_body`] for a body the server sends only after
    /// something else has happened (the next worker of a ring finishing
    /// its turns): pieces may be up to `wait` apart.
    pub async fn recv_body_waiting(&mut self, len: u64, wait: Duration) -> Result<bytes::Bytes> {
        recv_body(&mut self.recv, len, self.peer, self.kind, wait, None).await
    }

    /// [`RequestStream::recv_body`], telling `progress` each piece's
    /// arrival (for hedged reads).
    pub async fn recv_body_watched(
        &mut self,
        len: u64,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<bytes::Bytes> {
        recv_body(
            &mut self.recv,
            len,
            self.peer,
            self.kind,
            self.idle,
            Some(progress),
        )
        .await
    }

    fn peer_error(&self, e: Error) -> Error {
        peer_error(self.peer, e)
    }
}

fn peer_error(peer: SocketAddr, e: Error) -> Error {
    match e {
        Error::Io { cause: source, .. } => {
            let inner = source.get_ref();
            let lost = inner
                .and_then(|i| i.downcast_ref::<quinn::ReadError>())
                .and_then(|r| match r {
                    quinn::ReadError::ConnectionLost(c) => Some(c),
                    _ => None,
                })
                .or_else(|| {
                    inner
                        .and_then(|i| i.downcast_ref::<quinn::WriteError>())
                        .and_then(|w| match w {
                            quinn::WriteError::ConnectionLost(c) => Some(c),
                            _ => None,
                        })
                });
            let reason = match lost {
                Some(c) => explain_connection_error(c),
                None => source.to_string(),
            };
            stream_error(peer, reason)
        }
        other => other,
    }
}

fn stalled(peer: SocketAddr, kind: &str, idle: Duration) -> Error {
    Error::Stalled {
        peer: peer.to_string(),
        what: format!("{kind} body"),
        ms: idle.as_millis() as u64,
    }
}

async fn send_piece(
    send: &mut quinn::SendStream,
    piece: bytes::Bytes,
    peer: SocketAddr,
    kind: &str,
    idle: Duration,
) -> Result<()> {
    match tokio::time::timeout(idle, send.write_chunk(piece)).await {
        Ok(r) => r.map_err(|e| Error::Stream {
            peer: peer.to_string(),
            reason: e.to_string(),
        }),
        Err(_) => Err(stalled(peer, kind, idle)),
    }
}

/// Reads `len` raw bytes, each piece within `idle` of the last.
async fn recv_body(
    recv: &mut quinn::RecvStream,
    len: u64,
    peer: SocketAddr,
    kind: &str,
    idle: Duration,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> Result<bytes::Bytes> {
    if len > MAX_RAW {
        return Err(Error::Malformed(format!(
            "{peer} announced {len} raw bytes, more than the {MAX_RAW}-byte limit"
        )));
    }
    let mut buf = bytes::BytesMut::with_capacity(len as usize);
    // QUIC hands over packet-sized pieces: one timer re-armed only when it
    // fires, against the time of the last piece, instead of a timer per
    // piece (which cost a third of a read's throughput).
    let mut last = Instant::now();
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    while (buf.len() as u64) < len {
        let want = (len - buf.len() as u64).min(1 << 20) as usize;
        tokio::select! {
            biased;
            piece = recv.read_chunk(want, true) => match piece {
                Ok(Some(c)) => {
                    buf.extend_from_slice(&c.bytes);
                    last = Instant::now();
                    if let Some(p) = progress {
                        p(buf.len() as u64);
                    }
                }
                Ok(None) => {
                    return Err(Error::Malformed(format!(
                        "stream from {peer} ended after {} of {len} bytes",
                        buf.len()
                    )))
                }
                Err(e) => {
                    return Err(Error::Stream {
                        peer: peer.to_string(),
                        reason: e.to_string(),
                    })
                }
            },
            _ = &mut timer => {
                if last.elapsed() >= idle {
                    return Err(stalled(peer, kind, idle));
                }
                timer.as_mut().reset(last + idle);
            }
        }
    }
    Ok(buf.freeze())
}

/// The server's half of an exchange, after the request frame.
pub struct ServerStream {
    pub peer: SocketAddr,
    /// Who is calling, as its certificate says: the only identity a
    /// handler may trust.
    pub caller: Arc<Principal>,
    kind: &'static str,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    idle: Duration,
    body: BodyFault,
    /// The request body's idle deadline: armed once, moved only when it
    /// fires, against the arrival of the last piece.
    idle_timer: Option<(Instant, std::pin::Pin<Box<tokio::time::Sleep>>)>,
}

impl ServerStream {
    /// Sends the reply and ends the stream.
    pub async fn reply<T: Serialize>(&mut self, reply: &Reply<T>) -> Result<()> {
        self.reply_header(reply).await?;
        let _ = self.send.finish();
        Ok(())
    }

    /// Sends the reply and leaves the stream open for a body after it. A
    /// reply that cannot be encoded (too large for a frame) reaches the
    /// caller as an error that says so, never as a silent drop.
    pub async fn reply_header<T: Serialize>(&mut self, reply: &Reply<T>) -> Result<()> {
        match frame::encode(reply) {
            Ok(bytes) => self
                .send
                .write_all(&bytes)
                .await
                .map_err(|e| stream_error(self.peer, e)),
            Err(e) => {
                tracing::warn!(peer = %self.peer, kind = self.kind, "reply not sent: {e}");
                let err: Reply<()> = Err(WireError::new(
                    crate::error::ErrorCode::Internal,
                    format!(
                        "the answer to {} could not be sent ({e}); ask for less (a page, a \
                         subdirectory) and report this",
                        self.kind
                    ),
                ));
                frame::write_frame(&mut self.send, &err).await?;
                Err(e)
            }
        }
    }

    /// Sends one piece of the reply's body.
    pub async fn send_piece(&mut self, piece: bytes::Bytes) -> Result<()> {
        let piece = self.body.pass(piece).await;
        send_piece(&mut self.send, piece, self.peer, self.kind, self.idle).await
    }

    /// Ends the reply's body.
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }

    /// Resolves once the caller stops reading the reply or its connection
    /// is gone (a coordinator that gave up on a step), so the work done for
    /// it can stop too.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let stopped = self.send.stopped();
        async move {
            let _ = stopped.await;
        }
    }

    /// Abandons the reply's body (the caller sees the stream reset).
    pub fn reset(&mut self) {
        let _ = self.send.reset(1u32.into());
    }

    /// The next piece of the request's body, at most `max` bytes; `None`
    /// at its end.
    pub async fn recv_piece(&mut self, max: usize) -> Result<Option<bytes::Bytes>> {
        let idle = self.idle;
        let (last, timer) = self
            .idle_timer
            .get_or_insert_with(|| (Instant::now(), Box::pin(tokio::time::sleep(idle))));
        let piece = loop {
            tokio::select! {
                biased;
                piece = self.recv.read_chunk(max, true) => break piece.map_err(|e| Error::Stream {
                    peer: self.peer.to_string(),
                    reason: e.to_string(),
                })?,
                _ = timer.as_mut() => {
                    if last.elapsed() >= idle {
                        return Err(stalled(self.peer, self.kind, idle));
                    }
                    let at = *last + idle;
                    timer.as_mut().reset(at);
                }
            }
        };
        *last = Instant::now();
        let piece = piece.map(|c| c.bytes);
        if let Some(p) = &piece {
            self.body.take(p.len() as u64).await;
        }
        Ok(piece)
    }

    /// Reads exactly `len` bytes of the request's body.
    pub async fn recv_body(&mut self, len: u64) -> Result<bytes::Bytes> {
        recv_body(&mut self.recv, len, self.peer, self.kind, self.idle, None).await
    }

    /// [`ServerStream::recv_body`] for a body the caller sends only after
    /// something else has happened (other workers reaching the same point
    /// of a training step): pieces may be up to `wait` apart.
    pub async fn recv_body_waiting(&mut self, len: u64, wait: Duration) -> Result<bytes::Bytes> {
        recv_body(&mut self.recv, len, self.peer, self.kind, wait, None).await
    }
}

/// A server's request handler.
pub trait Service: Send + Sync + 'static {
    type Request: Envelope;
    /// What this server is called in errors ("namenode", "datanode").
    fn role(&self) -> &'static str;
    fn handle(
        self: Arc<Self>,
        req: Self::Request,
        stream: ServerStream,
    ) -> impl std::future::Future<Output = ()> + Send;
}

/// Accepts connections and streams until the endpoint closes. Handshake
/// and stream failures are logged and never stop the server.
pub async fn serve<S: Service>(endpoint: Arc<Endpoint>, service: Arc<S>) {
    while let Some(incoming) = endpoint.accept().await {
        let service = service.clone();
        let faults = endpoint.faults.clone();
        let idle = endpoint.piece_idle;
        let metrics = endpoint.metrics.clone();
        tokio::spawn(async move {
            let peer = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%peer, "refused connection: {}", explain_connection_error(&e));
                    return;
                }
            };
            let caller = match peer_principal(&conn) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    tracing::warn!(%peer, "refused connection: {e}");
                    conn.close(1u32.into(), b"certificate without a quern role");
                    return;
                }
            };
            loop {
                let (send, recv) = match conn.accept_bi().await {
                    Ok(s) => s,
                    Err(quinn::ConnectionError::ApplicationClosed(_))
                    | Err(quinn::ConnectionError::LocallyClosed) => return,
                    Err(e) => {
                        tracing::debug!(%peer, "connection ended: {e}");
                        return;
                    }
                };
                let service = service.clone();
                let caller = caller.clone();
                let faults = faults.clone();
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let mut stream = ServerStream {
                        peer,
                        caller,
                        kind: "request",
                        send,
                        recv,
                        idle,
                        body: BodyFault::default(),
                        idle_timer: None,
                    };
                    match read_request::<S::Request>(&mut stream, service.role()).await {
                        Ok(req) => {
                            stream.kind = req.kind();
                            let fault = faults.find(Direction::Incoming, peer, stream.kind);
                            before_request(fault).await;
                            stream.body = BodyFault::new(fault);
                            let kind = stream.kind;
                            service.handle(req, stream).await;
                            metrics.observe(kind, started.elapsed());
                        }
                        Err(err) => {
                            tracing::warn!(%peer, "bad request: {err}");
                            let _ = stream.reply::<()>(&Err(err)).await;
                        }
                    }
                });
            }
        });
    }
}

async fn read_request<T: Envelope>(s: &mut ServerStream, role: &str) -> Result<T, WireError> {
    use crate::error::ErrorCode;
    let mut version = [0u8; 4];
    s.recv.read_exact(&mut version).await.map_err(|e| {
        WireError::new(
            ErrorCode::Protocol,
            format!("no protocol version on the stream: {e}"),
        )
    })?;
    let version = u32::from_be_bytes(version);
    if version != crate::PROTOCOL_VERSION {
        return Err(WireError::new(
            ErrorCode::Protocol,
            format!(
                "protocol version mismatch: the client speaks version {version}, this {role} speaks \
                 version {}; use the same quern release on every node and client",
                crate::PROTOCOL_VERSION
            ),
        ));
    }
    frame::expect_frame(&mut s.recv).await.map_err(|e| {
        WireError::new(
            ErrorCode::Protocol,
            format!("{role} could not read the request: {e}"),
        )
    })
}

/// Largest raw payload read after a frame in one piece (a chunk, a model's
/// parameters); checked before anything is allocated.
pub const MAX_RAW: u64 = 1 << 30;
