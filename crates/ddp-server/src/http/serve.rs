//! The HTTP listener: accepts connections through its [`Door`] (the connection cap), serves
//! each with hyper's HTTP/1.1, and holds no connection longer than its client deserves.
//!
//! - **Header-read timeout** (`--http-header-timeout`): once the first byte of a request
//!   arrives, its head must be complete within this; a trickling client is closed.
//! - **Idle timeout** (`--http-idle-timeout`): a connection with no request in progress — a new
//!   one that sends nothing, a keep-alive one between requests, one whose client does not read
//!   its response — is closed after this.
//! - **Body timeout** (`--http-body-timeout`, in the [`Body`](super::Body) extractor): a request
//!   body must arrive within this, or the answer is `408 REQUEST_TIMEOUT`.
//!
//! The timeouts are kept by [`Timed`], a wrapper around the socket that the request handling
//! tells where the connection is ([`Phase`]); hyper's own header timer also runs while a
//! connection waits idle between requests, so it cannot tell the two apart. Once a connection
//! is upgraded to a WebSocket, none applies: the session keeps its own (pings, idle close).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::Router;
use axum::http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::app::App;
use crate::config::HttpSettings;
use crate::listener::{Conn, Door};
use crate::locks;
use crate::tls::TlsFiles;

/// How long shutdown lets in-flight requests finish.
const DRAIN: Duration = Duration::from_secs(30);

/// Where a connection is, for its timeouts.
#[derive(Debug, Clone, Copy)]
enum State {
    /// No request in progress, since then.
    Idle(Instant),
    /// The first bytes of a request head arrived then.
    Head(Instant),
    /// A request is being handled (and its body read, under the body timeout).
    Busy,
    /// Upgraded to a WebSocket: no HTTP timeout applies.
    Upgraded,
}

/// A connection's phase, shared by its socket wrapper and its request handling.
pub(crate) struct Phase {
    inner: Mutex<PhaseInner>,
    timeouts: HttpSettings,
}

struct PhaseInner {
    state: State,
    /// A read that found no deadline (a request was being handled): woken when the request
    /// ends, so that the idle deadline starts to count.
    reader: Option<Waker>,
}

impl Phase {
    fn new(timeouts: HttpSettings) -> Arc<Phase> {
        Arc::new(Phase { inner: Mutex::new(PhaseInner { state: State::Idle(Instant::now()), reader: None }), timeouts })
    }

    fn bytes_arrived(&self) {
        let mut inner = locks::recover(&self.inner);
        if let State::Idle(_) = inner.state {
            inner.state = State::Head(Instant::now());
        }
    }

    fn begin(&self) {
        locks::recover(&self.inner).state = State::Busy;
    }

    fn end(&self, upgraded: bool) {
        let mut inner = locks::recover(&self.inner);
        inner.state = if upgraded || matches!(inner.state, State::Upgraded) {
            State::Upgraded
        } else {
            State::Idle(Instant::now())
        };
        if let Some(reader) = inner.reader.take() {
            reader.wake();
        }
    }

    /// When the connection must be closed if nothing more arrives; with none, `waker` is woken
    /// when there is one.
    fn deadline(&self, waker: &Waker) -> Option<Instant> {
        let mut inner = locks::recover(&self.inner);
        match inner.state {
            State::Idle(since) => Some(since + self.timeouts.idle_timeout),
            State::Head(since) => Some(since + self.timeouts.header_timeout),
            State::Busy => {
                inner.reader = Some(waker.clone());
                None
            }
            State::Upgraded => None,
        }
    }
}

/// A socket whose reads fail with `TimedOut` once its [`Phase`]'s deadline passes.
pub(crate) struct Timed<S> {
    inner: S,
    phase: Arc<Phase>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Keeps the connection's place under the cap for as long as the socket lives (an upgraded
    /// WebSocket included).
    _conn: Arc<Conn>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Timed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.phase.bytes_arrived();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let Some(deadline) = this.phase.deadline(cx.waker()) else {
                    this.sleep = None; // an upgraded session holds no timer
                    return Poll::Pending;
                };
                let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent no complete request in time",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Timed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// How long a TLS handshake may take (it happens before any timeout of a request).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts HTTP connections (over TLS, with `tls`: the certificate in force when each arrives)
/// until shutdown, then lets in-flight requests finish.
pub(crate) async fn accept_loop(app: Arc<App>, listener: TcpListener, door: Door, tls: Option<Arc<TlsFiles>>) {
    let router = super::router(app.clone());
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = app.shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, most likely: back off instead of spinning.
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(conn) = door.admit() else { continue };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let (app, router) = (app.clone(), router.clone());
        match tls.as_ref().map(|files| files.https()) {
            None => {
                connections.spawn(serve_connection(app, router, stream, peer, conn));
            }
            Some(acceptor) => {
                connections.spawn(async move {
                    let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                    let tls = tokio::select! {
                        done = handshake => done,
                        () = conn.shed_now() => return,
                    };
                    match tls {
                        Ok(Ok(tls)) => serve_connection(app, router, tls, peer, conn).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
    connections.close();
    if tokio::time::timeout(DRAIN, connections.wait()).await.is_err() {
        tracing::warn!("HTTP requests still running {DRAIN:?} after shutdown began; stopping anyway");
    }
}

/// Serves one connection: HTTP/1.1 with keep-alive and upgrades, under its timeouts, until it
/// ends, is shed at the cap, or the server shuts down (in-flight requests finish first).
async fn serve_connection<S>(app: Arc<App>, router: Router, stream: S, peer: SocketAddr, conn: Arc<Conn>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let phase = Phase::new(app.config.http);
    let io = Timed { inner: stream, phase: phase.clone(), sleep: None, _conn: conn.clone() };
    let handle = ConnHandle { conn: conn.clone(), peer };
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(handle.clone());
        phase.begin();
        let answer = router.clone().oneshot(request.map(axum::body::Body::new));
        let phase = phase.clone();
        async move {
            let response = match answer.await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            phase.end(response.status() == StatusCode::SWITCHING_PROTOCOLS);
            Ok::<_, Infallible>(response)
        }
    });
    let serving = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(serving);
    let result = tokio::select! {
        r = serving.as_mut() => r,
        () = conn.shed_now() => return,
        () = app.shutdown.cancelled() => {
            serving.as_mut().graceful_shutdown();
            serving.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "http connection ended");
    }
}

/// A request's connection: marked authenticated once a credential checked out, and handed to
/// what an upgrade turns it into (MQTT over WebSocket authenticates later, at its CONNECT).
#[derive(Clone)]
pub(crate) struct ConnHandle {
    conn: Arc<Conn>,
    peer: SocketAddr,
}

impl ConnHandle {
    /// The connection carried a valid credential: it is not shed at the cap.
    pub(crate) fn authenticated(&self) {
        self.conn.authenticated();
    }

    /// The connection's place under the cap.
    pub(crate) fn conn(&self) -> Arc<Conn> {
        self.conn.clone()
    }

    /// The client's address.
    pub(crate) fn peer(&self) -> SocketAddr {
        self.peer
    }
}

/// Runs `future` under the body timeout: a body that does not arrive in time is `408`.
pub(crate) async fn within_body_timeout<T>(
    timeout: Duration,
    future: impl Future<Output = T>,
) -> Result<T, crate::error::Error> {
    tokio::time::timeout(timeout, future).await.map_err(|_| {
        crate::error::Error::new(
            ddp_protocol::Reason::RequestTimeout,
            format!("the request body did not arrive within {timeout:?}"),
        )
    })
}
