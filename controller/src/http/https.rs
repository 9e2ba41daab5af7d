//! The HTTPS front of the controller: an [`axum::serve::Listener`] that terminates
//! TLS, and the [`Peer`] that tells handlers who the client is.
//!
//! TCP connections are accepted by a background task that runs every TLS handshake
//! in its own task, so one slow or hostile client never holds up the others: at most
//! [`DEFAULT_MAX_HANDSHAKES`] handshakes run at once, each is given
//! [`DEFAULT_HANDSHAKE_TIMEOUT`], and finished streams reach [`TlsListener::accept`]
//! through a bounded channel. A failed handshake is logged at `debug` and dropped.
//!
//! Every connection that presented a client certificate is tracked by its serial in
//! [`LiveConnections`]: revoking the certificate closes those connections (the
//! stream fails its next read or write, which ends hyper's connection task), so a
//! keep-alive connection opened before the revocation cannot make further calls.
//!
//! **Architecture Invariant:** a handler learns the client's identity only from
//! `ConnectInfo<Peer>`, which is read from the certificate that rustls verified
//! during the handshake, never from a header or a body.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use novacron_common::pki::{Identity, Serial};
use novacron_common::sync::lock;
use novacron_common::tls::{CertRevocation, RevokedSerials};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, error, info, warn};

/// Default limit on TLS handshakes in flight; the listener stops accepting TCP
/// connections while this many are running.
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;
/// Default time a client has to complete its TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many finished handshakes may wait for the server to pick them up.
const READY_QUEUE: usize = 64;
/// How long to pause accepting after an accept error that is not the peer's fault
/// (for example `EMFILE`), as hyper and axum do.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Limits of a [`TlsListener`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Handshakes in flight at most; further TCP connections wait in the kernel's
    /// backlog.
    pub max_in_flight: usize,
    /// Time a client has to complete its handshake before the connection is dropped.
    pub timeout: Duration,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            max_in_flight: DEFAULT_MAX_HANDSHAKES,
            timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

/// A TLS listener for [`axum::serve()`]: yields connections whose handshake has
/// completed. Dropping it stops the background accept task and every handshake in
/// flight.
#[derive(Debug)]
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
    task: JoinHandle<()>,
    live: Arc<LiveConnections>,
    revoked: Option<Arc<RevokedSerials>>,
}

impl TlsListener {
    /// Starts accepting on `tcp` with `config` and the default [`HandshakeLimits`].
    ///
    /// Must be called inside a tokio runtime. Fails only when the socket's local
    /// address cannot be read.
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> io::Result<TlsListener> {
        TlsListener::with_limits(tcp, config, HandshakeLimits::default())
    }

    /// Starts accepting on `tcp` with `config` and the given `limits`.
    ///
    /// Must be called inside a tokio runtime. A `max_in_flight` of zero is taken as
    /// one.
    pub fn with_limits(
        tcp: TcpListener,
        config: Arc<rustls::ServerConfig>,
        limits: HandshakeLimits,
    ) -> io::Result<TlsListener> {
        let local_addr = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        let task = tokio::spawn(accept_loop(tcp, TlsAcceptor::from(config), limits, tx));
        Ok(TlsListener {
            ready,
            local_addr,
            task,
            live: Arc::new(LiveConnections::default()),
            revoked: None,
        })
    }

    /// Drops connections whose client certificate is in `revoked`. The verifier
    /// already refuses them in a full handshake; this catches a resumed TLS
    /// session, where rustls restores the certificate without verifying it again.
    pub fn refusing(mut self, revoked: Arc<RevokedSerials>) -> TlsListener {
        self.revoked = Some(revoked);
        self
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The connections this listener handed out, by client certificate serial.
    pub fn live_connections(&self) -> Arc<LiveConnections> {
        self.live.clone()
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts the handshakes.
        self.task.abort();
    }
}

impl Listener for TlsListener {
    type Io = ServedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.ready.recv().await {
                Some((tls, addr)) => {
                    // Registered before the check: a revocation either finds it in
                    // `live` or has put its serial in the list this reads.
                    let stream = ServedStream::new(tls, &self.live);
                    let leaf = stream
                        .tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first());
                    if let (Some(revoked), Some(leaf)) = (&self.revoked, leaf)
                        && revoked.check(leaf).is_err()
                    {
                        info!(peer = %addr, "dropped a connection of a revoked certificate (a resumed TLS session, or revoked during its handshake)");
                        continue;
                    }
                    return (stream, addr);
                }
                None => {
                    // The accept task holds the sender until the receiver is dropped,
                    // so this means it panicked. `accept` cannot fail, so serve
                    // nothing more.
                    error!(addr = %self.local_addr, "TLS accept task ended; no more connections are accepted");
                    std::future::pending().await
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

/// The live HTTPS connections that presented a client certificate, by the
/// certificate's serial. An entry lives as long as its connection.
#[derive(Debug, Default)]
pub struct LiveConnections {
    inner: Mutex<LiveInner>,
}

#[derive(Debug, Default)]
struct LiveInner {
    next_id: u64,
    by_id: HashMap<u64, (Serial, CancellationToken)>,
}

impl crate::services::certs::ConnectionsBySerial for LiveConnections {
    fn close(&self, serial: &Serial) -> usize {
        LiveConnections::close(self, serial)
    }
}

impl LiveConnections {
    /// Closes every live connection whose client certificate has `serial`; returns
    /// how many there were.
    pub fn close(&self, serial: &Serial) -> usize {
        let inner = lock(&self.inner);
        let mut closed = 0;
        for (s, token) in inner.by_id.values() {
            if s == serial {
                token.cancel();
                closed += 1;
            }
        }
        closed
    }

    /// How many connections with a client certificate are open.
    pub fn len(&self) -> usize {
        lock(&self.inner).by_id.len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn register(self: &Arc<Self>, serial: Serial) -> (CancellationToken, LiveGuard) {
        let token = CancellationToken::new();
        let mut inner = lock(&self.inner);
        inner.next_id += 1;
        let id = inner.next_id;
        inner.by_id.insert(id, (serial, token.clone()));
        (
            token,
            LiveGuard {
                live: self.clone(),
                id,
            },
        )
    }
}

/// Removes its connection from [`LiveConnections`] when the connection is dropped.
#[derive(Debug)]
struct LiveGuard {
    live: Arc<LiveConnections>,
    id: u64,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        lock(&self.live.inner).by_id.remove(&self.id);
    }
}

/// A served TLS connection that fails with `ConnectionAborted` once its client
/// certificate is revoked ([`LiveConnections::close`]).
pub struct ServedStream {
    tls: TlsStream<TcpStream>,
    revoked: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    _guard: Option<LiveGuard>,
}

impl std::fmt::Debug for ServedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedStream")
            .field("tracked", &self._guard.is_some())
            .finish_non_exhaustive()
    }
}

impl ServedStream {
    fn new(tls: TlsStream<TcpStream>, live: &Arc<LiveConnections>) -> ServedStream {
        let serial = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| Serial::of_cert_der(leaf).ok());
        let (revoked, guard) = match serial {
            Some(serial) => {
                let (token, guard) = live.register(serial);
                (Some(Box::pin(token.cancelled_owned())), Some(guard))
            }
            None => (None, None),
        };
        ServedStream {
            tls,
            revoked,
            _guard: guard,
        }
    }

    /// The TLS stream.
    pub fn tls(&self) -> &TlsStream<TcpStream> {
        &self.tls
    }

    /// Fails once the certificate is revoked; polling registers the waker, so an
    /// idle connection waiting for its next request is woken and closed too.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some(revoked) = &mut self.revoked
            && revoked.as_mut().poll(cx).is_ready()
        {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the client certificate of this connection was revoked",
            ));
        }
        Ok(())
    }
}

impl AsyncRead for ServedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for ServedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// Who is on the other end of an HTTPS connection.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The remote socket address.
    pub addr: SocketAddr,
    /// The identity in the client certificate that rustls verified; `None` when the
    /// client sent no certificate (or, which the fleet CA never signs, one whose
    /// subject is not a NovaCron identity).
    pub identity: Option<Identity>,
    /// The serial of that certificate, checked against the revocation list on every
    /// call.
    pub serial: Option<Serial>,
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        let addr = *stream.remote_addr();
        let (_, conn) = stream.io().tls().get_ref();
        let leaf = conn.peer_certificates().and_then(|chain| chain.first());
        let identity = leaf.and_then(|leaf| match Identity::from_cert_der(leaf) {
            Ok(identity) => Some(identity),
            Err(e) => {
                warn!(peer = %addr, error = %e, "verified client certificate carries no identity; treating the client as anonymous");
                None
            }
        });
        let serial = identity
            .as_ref()
            .and(leaf)
            .and_then(|leaf| Serial::of_cert_der(leaf).ok());
        Peer {
            addr,
            identity,
            serial,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then waits for open
/// connections to finish. Handlers can extract `ConnectInfo<Peer>`.
pub async fn serve(
    listener: TlsListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<Peer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// Accepts TCP connections and runs their handshakes until the listener is dropped.
async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    limits: HandshakeLimits,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let max_in_flight = limits.max_in_flight.max(1);
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = ready.closed() => return,
            Some(done) = handshakes.join_next() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    error!(error = %e, "TLS handshake task panicked");
                }
            }
            accepted = tcp.accept(), if handshakes.len() < max_in_flight => match accepted {
                Ok((stream, addr)) => {
                    handshakes.spawn(handshake(stream, addr, acceptor.clone(), limits.timeout, ready.clone()));
                }
                Err(e) if is_connection_error(&e) => {
                    debug!(error = %e, "TCP accept failed");
                }
                Err(e) => {
                    error!(error = %e, pause = ?ACCEPT_ERROR_PAUSE, "TCP accept failed; pausing");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
}

/// Runs one handshake and hands the stream over; failures are the peer's problem.
async fn handshake(
    stream: TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    timeout: Duration,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(peer = %addr, error = %e, "cannot set TCP_NODELAY");
    }
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            // An error means the listener is gone; the connection just closes.
            let _ = ready.send((tls, addr)).await;
        }
        Ok(Err(e)) => debug!(peer = %addr, error = %e, "TLS handshake failed"),
        Err(_) => debug!(peer = %addr, timeout = ?timeout, "TLS handshake timed out"),
    }
}

/// Errors that concern one connection only (as in axum's own TCP listener).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use axum::extract::ConnectInfo;
    use axum::routing::get;
    use novacron_common::pki::{self, CertAndKey, Role, Validity};
    use novacron_common::tls;
    use tokio::io::AsyncReadExt;

    use super::*;

    struct Pki {
        ca: CertAndKey,
        server: CertAndKey,
    }

    fn valid_for(ttl: Duration) -> Validity {
        Validity::starting(SystemTime::now(), ttl)
    }

    fn pki() -> Pki {
        let ca = pki::generate_ca("test fleet CA", valid_for(Duration::from_secs(3600)))
            .expect("CA generation");
        let server = pki::issue_server_cert(
            &ca,
            &["localhost".to_string(), "127.0.0.1".to_string()],
            valid_for(Duration::from_secs(3600)),
        )
        .expect("server cert");
        Pki { ca, server }
    }

    fn client_cert(ca: &CertAndKey, name: &str, role: Role, validity: Validity) -> CertAndKey {
        let identity = Identity {
            name: name.to_string(),
            role,
        };
        pki::issue_client_cert(ca, &identity, validity).expect("client cert")
    }

    fn server_config(pki: &Pki) -> Arc<rustls::ServerConfig> {
        server_config_revoking(pki, Arc::new(tls::RevokedSerials::default()))
    }

    fn server_config_revoking(
        pki: &Pki,
        revoked: Arc<tls::RevokedSerials>,
    ) -> Arc<rustls::ServerConfig> {
        tls::install_crypto_provider();
        let chain = format!("{}{}", pki.server.cert_pem, pki.ca.cert_pem);
        let verifier = tls::revocation_checking_verifier(
            tls::fleet_client_verifier(&pki.ca.cert_pem, true).expect("verifier"),
            revoked,
        );
        Arc::new(
            tls::server_config(&chain, &pki.server.key_pem, verifier, &[b"h2", b"http/1.1"])
                .expect("server config"),
        )
    }

    async fn whoami(ConnectInfo(peer): ConnectInfo<Peer>) -> String {
        match peer.identity {
            Some(identity) => identity.to_string(),
            None => "anonymous".to_string(),
        }
    }

    /// A running echo server; shut down when dropped.
    struct Server {
        addr: SocketAddr,
        live: Arc<LiveConnections>,
        _stop: tokio::sync::oneshot::Sender<()>,
    }

    async fn start(config: Arc<rustls::ServerConfig>, limits: HandshakeLimits) -> Server {
        start_refusing(config, limits, Arc::new(tls::RevokedSerials::default())).await
    }

    async fn start_refusing(
        config: Arc<rustls::ServerConfig>,
        limits: HandshakeLimits,
        revoked: Arc<tls::RevokedSerials>,
    ) -> Server {
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let listener = TlsListener::with_limits(tcp, config, limits)
            .expect("listener")
            .refusing(revoked);
        let addr = listener.local_addr();
        let live = listener.live_connections();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = Router::new().route("/whoami", get(whoami));
        tokio::spawn(serve(listener, router, async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            live,
            _stop: stop,
        }
    }

    fn client(ca_pem: &str, cert: Option<&CertAndKey>) -> reqwest::Client {
        tls::install_crypto_provider();
        let config = tls::client_config(
            ca_pem,
            cert.map(|c| (c.cert_pem.as_str(), c.key_pem.as_str())),
            &[b"h2", b"http/1.1"],
        )
        .expect("client config");
        reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .timeout(Duration::from_secs(10))
            .build()
            .expect("reqwest client")
    }

    async fn get_whoami(
        client: &reqwest::Client,
        addr: SocketAddr,
    ) -> reqwest::Result<reqwest::Response> {
        client
            .get(format!("https://localhost:{}/whoami", addr.port()))
            .send()
            .await
    }

    #[tokio::test]
    async fn handler_sees_the_identity_of_an_admin_certificate() {
        let pki = pki();
        let server = start(server_config(&pki), HandshakeLimits::default()).await;
        let alice = client_cert(
            &pki.ca,
            "alice",
            Role::Admin,
            valid_for(Duration::from_secs(600)),
        );
        let response = get_whoami(&client(&pki.ca.cert_pem, Some(&alice)), server.addr)
            .await
            .expect("request with a valid certificate");
        assert_eq!(
            response.version(),
            reqwest::Version::HTTP_2,
            "ALPN picks h2"
        );
        assert_eq!(response.text().await.expect("body"), "admin:alice");
    }

    #[tokio::test]
    async fn revoking_a_certificate_closes_its_open_connections_and_refuses_new_handshakes() {
        let pki = pki();
        let revoked = Arc::new(tls::RevokedSerials::default());
        let server = start_refusing(
            server_config_revoking(&pki, revoked.clone()),
            HandshakeLimits::default(),
            revoked.clone(),
        )
        .await;
        let ttl = valid_for(Duration::from_secs(600));
        let alice = client_cert(&pki.ca, "alice", Role::Admin, ttl);
        let bob = client_cert(&pki.ca, "bob", Role::Admin, ttl);
        let alice_client = client(&pki.ca.cert_pem, Some(&alice));
        let bob_client = client(&pki.ca.cert_pem, Some(&bob));
        for (c, who) in [(&alice_client, "admin:alice"), (&bob_client, "admin:bob")] {
            let r = get_whoami(c, server.addr).await.expect("before revocation");
            assert_eq!(r.text().await.expect("body"), who);
        }
        // Both keep-alive connections are open and tracked.
        assert_eq!(server.live.len(), 2);
        let serial = Serial::of_cert_pem(&alice.cert_pem).expect("serial");
        revoked.insert(serial.clone());
        assert_eq!(server.live.close(&serial), 1, "alice's one connection");
        // The server drops alice's idle connection without any request from her.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while server.live.len() != 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "alice's connection is still open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Her client reconnects, resuming its TLS session (no certificate
        // verification); the listener drops it.
        assert!(
            get_whoami(&alice_client, server.addr).await.is_err(),
            "a revoked certificate made another call"
        );
        let fresh = client(&pki.ca.cert_pem, Some(&alice));
        assert!(
            get_whoami(&fresh, server.addr).await.is_err(),
            "a new handshake with a revoked certificate succeeded"
        );
        let r = get_whoami(&bob_client, server.addr)
            .await
            .expect("bob's certificate is still good");
        assert_eq!(r.text().await.expect("body"), "admin:bob");
    }

    #[tokio::test]
    async fn handler_sees_no_identity_without_a_client_certificate() {
        let pki = pki();
        let server = start(server_config(&pki), HandshakeLimits::default()).await;
        let response = get_whoami(&client(&pki.ca.cert_pem, None), server.addr)
            .await
            .expect("anonymous request");
        assert_eq!(response.text().await.expect("body"), "anonymous");
    }

    #[tokio::test]
    async fn certificate_from_another_ca_fails_the_handshake() {
        let pki = pki();
        let server = start(server_config(&pki), HandshakeLimits::default()).await;
        let other_ca =
            pki::generate_ca("another CA", valid_for(Duration::from_secs(3600))).expect("other CA");
        let mallory = client_cert(
            &other_ca,
            "mallory",
            Role::Admin,
            valid_for(Duration::from_secs(600)),
        );
        let result = get_whoami(&client(&pki.ca.cert_pem, Some(&mallory)), server.addr).await;
        assert!(result.is_err(), "a foreign certificate was accepted");
        // The listener survives the failed handshake.
        let again = get_whoami(&client(&pki.ca.cert_pem, None), server.addr)
            .await
            .expect("a later request still works");
        assert_eq!(again.text().await.expect("body"), "anonymous");
    }

    #[tokio::test]
    async fn expired_certificate_fails_the_handshake() {
        let pki = pki();
        let server = start(server_config(&pki), HandshakeLimits::default()).await;
        let now = SystemTime::now();
        let expired = Validity {
            not_before: now - Duration::from_secs(7200),
            not_after: now - Duration::from_secs(3600),
        };
        let old = client_cert(&pki.ca, "alice", Role::Admin, expired);
        let result = get_whoami(&client(&pki.ca.cert_pem, Some(&old)), server.addr).await;
        assert!(result.is_err(), "an expired certificate was accepted");
    }

    #[tokio::test]
    async fn a_stalled_handshake_does_not_block_other_clients_and_times_out() {
        let pki = pki();
        let limits = HandshakeLimits {
            max_in_flight: 4,
            timeout: Duration::from_millis(300),
        };
        let server = start(server_config(&pki), limits).await;
        // Connects but never sends a ClientHello.
        let mut stalled = TcpStream::connect(server.addr).await.expect("tcp connect");
        let response = get_whoami(&client(&pki.ca.cert_pem, None), server.addr)
            .await
            .expect("a second client is served while the first stalls");
        assert_eq!(response.text().await.expect("body"), "anonymous");
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf))
            .await
            .expect("the server closes a stalled handshake after its timeout");
        assert!(matches!(read, Ok(0) | Err(_)), "expected EOF, got {read:?}");
    }

    #[tokio::test]
    async fn handshakes_beyond_the_limit_wait_instead_of_failing() {
        let pki = pki();
        let limits = HandshakeLimits {
            max_in_flight: 1,
            timeout: Duration::from_millis(500),
        };
        let server = start(server_config(&pki), limits).await;
        // Takes the only handshake slot until its timeout.
        let _stalled = TcpStream::connect(server.addr).await.expect("tcp connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        let response = get_whoami(&client(&pki.ca.cert_pem, None), server.addr)
            .await
            .expect("the queued client is served once the slot frees up");
        assert_eq!(response.text().await.expect("body"), "anonymous");
        // It cannot have been served before the stalled handshake gave up its slot.
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "served after {:?}, before the slot was free",
            started.elapsed()
        );
    }
}
