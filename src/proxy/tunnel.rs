//! The HTTP/2 layer of a tunnel, shared by both ends: the settings of docs/design.md §4, the PING keepalive, and
//! [`H2Stream`], one CONNECT stream as `AsyncRead + AsyncWrite`.
//!
//! Half-close: a write shutdown sends END_STREAM; a received END_STREAM reads as EOF.
//! Resets: RST_STREAM(NO_ERROR or CANCEL) reads as EOF, any other code as `ConnectionReset`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::copy::{Chunk, RECORD, Sink, Source, Split};

mod peer_frames;
pub(crate) use peer_frames::{MaxFrame, PeerFrames};

/// HTTP/2 and timing settings of HBONE (docs/design.md §4, ztunnel's values).
#[derive(Debug, Clone)]
pub struct TunnelSettings {
    /// Per-stream receive window.
    pub stream_window: u32,
    /// Per-connection receive window.
    pub connection_window: u32,
    /// Largest frame we accept and advertise.
    pub max_frame_size: u32,
    /// Streams one pooled client connection carries at most (also capped by the peer).
    pub client_max_streams: usize,
    /// Concurrent streams the server advertises.
    pub server_max_streams: u32,
    /// Largest header list the client accepts.
    pub client_header_list: u32,
    /// Largest header list the server accepts.
    pub server_header_list: u32,
    /// Send a PING this often on every HBONE connection...
    pub ping_interval: Duration,
    /// ...and close the connection if no PONG arrives within this.
    pub ping_timeout: Duration,
    /// TCP connect, TLS and HTTP/2 handshakes each, and the wait for a CONNECT response.
    pub connect_timeout: Duration,
    /// Pooled connections with no stream for this long are closed.
    pub pool_idle_timeout: Duration,
    /// What peers' certificates must pass besides chain and identity (trust domains,
    /// revocations).
    pub peers: crate::tls::PeerChecks,
}

impl Default for TunnelSettings {
    fn default() -> Self {
        TunnelSettings {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            client_max_streams: 100,
            server_max_streams: 200,
            client_header_list: 16 * 1024,
            server_header_list: 64 * 1024,
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(300),
            peers: crate::tls::PeerChecks::default(),
        }
    }
}

/// Bytes of send buffer h2 may hold per stream before a write waits: ztunnel's server's figure
/// (its client's is its stream window, 4 MiB). Against a peer that announces the largest
/// windows and never reads, this (plus the relay buffer) is what a stream can cost; bulk
/// throughput measured the same with 1 MiB.
const MAX_SEND_BUFFER: usize = 400 * 1024;
/// Largest single chunk handed to h2 per write call.
const MAX_WRITE_CHUNK: usize = 256 * 1024;
/// h2's budget for received DATA frames under 256 bytes that the stream's reader has not taken
/// yet: off, as ztunnel has it (`data_frame_budget(usize::MAX)` on both ends of its
/// src/proxy/h2/client.rs and server.rs). h2's default, half the connection window, ends the
/// whole HBONE connection with ENHANCE_YOUR_CALM, every stream on it, once ~33,000 one-byte or
/// ~40,000 fifty-byte frames wait unread under our 16 MiB window: an app writing small messages
/// to a reader that has stalled gets there (ztunnel issue 2100, seen with databases). Without
/// it, what a peer can park here is bounded by flow control alone: a stream's window (4 MiB)
/// and the connection's (16 MiB) of unread DATA, in frames of at least one byte, which h2
/// queues in a slot of its receive queue each (~350 bytes of RSS a frame, measured with 50,000
/// held): up to ~5 GiB for a connection of one-byte frames that nothing reads, which only a
/// peer holding a mesh identity can send, and only to an app that has stopped reading. Empty
/// DATA frames, which flow control does not count, h2 still limits (100 a connection).
const DATA_FRAME_BUDGET: usize = usize::MAX;

impl TunnelSettings {
    pub(crate) fn client_builder(&self) -> h2::client::Builder {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.client_header_list)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .data_frame_budget(DATA_FRAME_BUDGET)
            .enable_push(false);
        b
    }

    pub(crate) fn server_builder(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.server_header_list)
            .max_concurrent_streams(self.server_max_streams)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .data_frame_budget(DATA_FRAME_BUDGET);
        b
    }
}

/// Why an HBONE connection ended other than cleanly.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectionEnd {
    #[error("{0}")]
    Http2(h2::Error),
    #[error("keepalive ping failed: {0}")]
    Ping(h2::Error),
    #[error("no PING answer within {0:?} (is the peer or the path between the nodes stalled?)")]
    NoPong(Duration),
}

/// Drives `conn` to completion while pinging the peer; a missing PONG ends the connection
/// (dropping `conn` closes the socket and fails its streams).
///
/// A future written out rather than an async fn: a connection's driver is its task for the
/// connection's life, and an async fn holds its arguments twice (as passed and as bound), and
/// `select!` moves its futures in once more: a client connection (~2.4 KiB) was held three
/// times. `conn` is held once here; spawn the result as it is (or mapped), or pin `conn` where
/// it lives and pass the `Pin<&mut _>`.
pub(crate) fn drive_with_keepalive<F>(
    conn: F,
    ping: Option<h2::PingPong>,
    settings: &TunnelSettings,
) -> Driven<F>
where
    F: Future<Output = Result<(), h2::Error>> + Unpin,
{
    let (interval, timeout) = (settings.ping_interval, settings.ping_timeout);
    let keepalive: Pin<Box<dyn Future<Output = ConnectionEnd> + Send>> = match ping {
        // Boxed: it borrows its `PingPong` across the wait for a PONG.
        Some(mut ping) => Box::pin(async move {
            loop {
                tokio::time::sleep(interval).await;
                match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return ConnectionEnd::Ping(e),
                    Err(_) => return ConnectionEnd::NoPong(timeout),
                }
            }
        }),
        // Zero-sized: no allocation.
        None => Box::pin(std::future::pending()),
    };
    Driven { conn, keepalive }
}

/// An HBONE connection driven with its keepalive ([`drive_with_keepalive`]).
pub(crate) struct Driven<F> {
    conn: F,
    keepalive: Pin<Box<dyn Future<Output = ConnectionEnd> + Send>>,
}

impl<F> Future for Driven<F>
where
    F: Future<Output = Result<(), h2::Error>> + Unpin,
{
    type Output = Result<(), ConnectionEnd>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        // The connection first, on every wake-up; the keepalive only looks at its timer or
        // its PONG.
        if let Poll::Ready(res) = Pin::new(&mut this.conn).poll(cx) {
            return Poll::Ready(res.map_err(ConnectionEnd::Http2));
        }
        this.keepalive.as_mut().poll(cx).map(Err)
    }
}

/// One HBONE stream as a byte stream.
#[derive(Debug)]
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// The rest of the last DATA frame, not yet read.
    pending: Bytes,
    read_done: bool,
    write_done: bool,
    /// How what is written is cut into DATA frames (by the peer's largest frame).
    framing: Framing,
    /// The pooled connection's slot this stream takes, given back when it drops (none for a
    /// server's stream or an inner tunnel's). Held as it is, not boxed: every live outbound
    /// connection's task holds one.
    _permit: Option<crate::proxy::pool::StreamPermit>,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            read_done: false,
            write_done: false,
            framing: Framing::default(),
            _permit: None,
        }
    }

    /// Cuts what is written into DATA frames that fill whole TLS records, for a peer whose
    /// largest frame is `max_frame` (its SETTINGS_MAX_FRAME_SIZE; 0: not known, and frames are
    /// as large as each write).
    pub fn with_peer_max_frame(mut self, max_frame: u32) -> Self {
        self.framing = Framing::for_peer(max_frame);
        self
    }

    /// Holds `permit` (its pooled connection's stream slot) as long as the stream.
    pub(crate) fn with_permit(mut self, permit: crate::proxy::pool::StreamPermit) -> Self {
        self._permit = Some(permit);
        self
    }

    /// Aborts the stream with RST_STREAM(`reason`); CONNECT_ERROR passes a TCP reset on.
    pub(crate) fn reset(&mut self, reason: Reason) {
        self.send.send_reset(reason);
    }
}

/// Maps an h2 stream error to what a byte stream reader expects: graceful resets are EOF.
fn read_error(e: h2::Error) -> Option<io::Error> {
    match e.reason() {
        Some(Reason::NO_ERROR) | Some(Reason::CANCEL) => None,
        Some(reason) if e.is_reset() => Some(io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("stream reset by peer: {reason}"),
        )),
        _ => Some(io::Error::other(e)),
    }
}

fn write_error(e: h2::Error) -> io::Error {
    match e.reason() {
        Some(Reason::NO_ERROR) | Some(Reason::CANCEL) => {
            io::Error::new(io::ErrorKind::BrokenPipe, "stream closed by peer")
        }
        Some(reason) if e.is_reset() => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("stream reset by peer: {reason}"),
        ),
        _ => io::Error::other(e),
    }
}

/// A DATA frame's header: length, type, flags and stream id.
const FRAME_HEADER: usize = 9;

/// How a stream cuts what it sends into DATA frames. h2 writes a large DATA frame, its header
/// and payload, as one write into TLS, and rustls cuts each write into records of [`RECORD`]
/// bytes from its start: a frame whose size with its header is not a multiple of that ends in
/// a short record. h2 itself cuts a write into frames of the peer's largest frame, which for a
/// peer that keeps HTTP/2's default (16 KiB: Envoy, as a waypoint or an east-west gateway,
/// whose `Http2ProtocolOptions` in api/envoy/config/core/v3/protocol.proto has no frame size to
/// set) made every frame a full record and a record of 9 bytes. So the stream cuts first, into
/// frames of `payload` bytes (a multiple of [`RECORD`] with the header, within the peer's
/// limit), and the relay reads what fills such frames ([`Framing::read_limit`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Framing {
    /// Bytes a DATA frame carries at most; 0: no cut (the peer's limit is not known).
    payload: u32,
}

impl Framing {
    /// For a peer whose largest frame is `max_frame` (0: not known).
    pub(crate) fn for_peer(max_frame: u32) -> Self {
        let whole = (max_frame as usize + FRAME_HEADER) / RECORD * RECORD;
        if whole < RECORD {
            // Below HTTP/2's minimum (h2 refuses such a peer) or not known.
            return Framing::default();
        }
        Framing {
            payload: u32::try_from(whole - FRAME_HEADER).unwrap_or(0),
        }
    }

    /// The most one frame carries.
    fn cut(self) -> usize {
        match self.payload {
            0 => usize::MAX,
            n => n as usize,
        }
    }

    /// How much a read into a buffer of `size` bytes may take so that the frames carrying it
    /// fill whole records: all of it below a record; else the whole records it holds, less a
    /// header for each frame they make.
    pub(crate) fn read_limit(self, size: usize) -> usize {
        if size < RECORD {
            return size;
        }
        let records = size / RECORD * RECORD;
        if self.payload == 0 {
            return records - FRAME_HEADER;
        }
        let frame = self.payload as usize + FRAME_HEADER;
        let rest = records % frame;
        records / frame * self.payload as usize + rest.saturating_sub(FRAME_HEADER)
    }

    /// Sends `data` on `send` as frames of at most [`Framing::cut`] bytes.
    fn send(self, send: &mut SendStream<Bytes>, mut data: bytes::BytesMut) -> io::Result<()> {
        let cut = self.cut();
        while data.len() > cut {
            send.send_data(data.split_to(cut).freeze(), false)
                .map_err(write_error)?;
        }
        send.send_data(data.freeze(), false).map_err(write_error)
    }
}

/// Waits until `pending` holds the stream's next DATA; false at the end of the stream.
fn poll_fill(
    recv: &mut RecvStream,
    pending: &mut Bytes,
    read_done: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<io::Result<bool>> {
    while pending.is_empty() {
        if *read_done {
            return Poll::Ready(Ok(false));
        }
        match ready!(recv.poll_data(cx)) {
            Some(Ok(chunk)) => {
                // Release window as soon as the frame is ours: we hold at most one frame.
                let _ = recv.flow_control().release_capacity(chunk.len());
                *pending = chunk;
            }
            Some(Err(e)) => {
                *read_done = true;
                return Poll::Ready(match read_error(e) {
                    None => Ok(false),
                    Some(err) => Err(err),
                });
            }
            None => *read_done = true,
        }
    }
    Poll::Ready(Ok(true))
}

/// Waits until h2 lets `want` (at most [`MAX_WRITE_CHUNK`]) bytes be sent; how many it grants.
fn poll_grant(
    send: &mut SendStream<Bytes>,
    write_done: bool,
    cx: &mut Context<'_>,
    want: usize,
) -> Poll<io::Result<usize>> {
    if write_done {
        return Poll::Ready(Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "write after shutdown",
        )));
    }
    let want = want.min(MAX_WRITE_CHUNK);
    send.reserve_capacity(want);
    loop {
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(0)) => continue,
            Some(Ok(n)) => return Poll::Ready(Ok(n.min(want))),
            Some(Err(e)) => return Poll::Ready(Err(write_error(e))),
            None => {
                // The stream closed: report the reset reason if there is one.
                return Poll::Ready(Err(match send.poll_reset(cx) {
                    Poll::Ready(Ok(reason)) => write_error(h2::Error::from(reason)),
                    _ => io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"),
                }));
            }
        }
    }
}

fn shutdown(send: &mut SendStream<Bytes>, write_done: &mut bool) -> io::Result<()> {
    if !*write_done {
        *write_done = true;
        send.send_data(Bytes::new(), true).map_err(write_error)?;
    }
    Ok(())
}

/// As a whole, the stream reads and writes through its two halves.
impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let (mut reader, _) = self.halves();
        Pin::new(&mut reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let (_, mut writer) = self.halves();
        writer.write_copy(cx, &[io::IoSlice::new(buf)])
    }

    /// What a TLS connection inside the stream (double HBONE's inner one) writes: its records
    /// together, as one DATA frame.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let (_, mut writer) = self.halves();
        writer.write_copy(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2's connection task writes out buffered frames on its own.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (_, mut writer) = self.halves();
        Pin::new(&mut writer).poll_shutdown(cx)
    }
}

/// The read direction of an [`H2Stream`], apart from its write direction.
pub(crate) struct H2Reader<'a> {
    recv: &'a mut RecvStream,
    pending: &'a mut Bytes,
    read_done: &'a mut bool,
}

/// The write direction of an [`H2Stream`].
pub(crate) struct H2Writer<'a> {
    send: &'a mut SendStream<Bytes>,
    write_done: &'a mut bool,
    framing: Framing,
}

impl H2Writer<'_> {
    /// Sends a copy of what h2 grants of `bufs`, in order, as one DATA frame (as few as the
    /// stream's [`Framing`] allows). A TLS connection inside the stream writes its records
    /// (16,406 bytes each, full) as the slices of one write: a frame apiece took two of the
    /// outer connection's records each (16,384 bytes and the rest, the frame's header among
    /// it), one frame for them all one more in total.
    fn write_copy(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total = bufs.iter().map(|b| b.len()).sum::<usize>();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let granted = ready!(poll_grant(self.send, *self.write_done, cx, total))?;
        let mut frame = bytes::BytesMut::with_capacity(granted);
        for buf in bufs {
            let take = buf.len().min(granted - frame.len());
            frame.extend_from_slice(&buf[..take]);
            if frame.len() == granted {
                break;
            }
        }
        self.framing.send(self.send, frame)?;
        Poll::Ready(Ok(granted))
    }
}

impl Split for H2Stream {
    type Read<'a> = H2Reader<'a>;
    type Write<'a> = H2Writer<'a>;
    fn halves(&mut self) -> (H2Reader<'_>, H2Writer<'_>) {
        (
            H2Reader {
                recv: &mut self.recv,
                pending: &mut self.pending,
                read_done: &mut self.read_done,
            },
            H2Writer {
                send: &mut self.send,
                write_done: &mut self.write_done,
                framing: self.framing,
            },
        )
    }
}

impl AsyncRead for H2Reader<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if ready!(poll_fill(this.recv, this.pending, this.read_done, cx))? {
            drain_into(this.pending, buf);
        }
        Poll::Ready(Ok(()))
    }
}

impl Source for H2Reader<'_> {
    /// The received DATA as it is (a view of h2's read buffer, let go of once written), left in
    /// the stream's `pending` for the relay to write from: a relay direction holds no copy of
    /// its handle.
    fn poll_next_chunk(
        &mut self,
        cx: &mut Context<'_>,
        _buf: &mut bytes::BytesMut,
        _limit: usize,
    ) -> Poll<io::Result<Chunk>> {
        let more = ready!(poll_fill(self.recv, self.pending, self.read_done, cx))?;
        Poll::Ready(Ok(if more {
            Chunk::Held
        } else {
            Chunk::Buffered(0)
        }))
    }

    fn held(&mut self) -> Option<&mut Bytes> {
        Some(self.pending)
    }
}

impl AsyncWrite for H2Writer<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.write_copy(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.write_copy(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        Poll::Ready(shutdown(this.send, this.write_done))
    }
}

impl Sink for H2Writer<'_> {
    fn read_limit(&self, size: usize) -> usize {
        self.framing.read_limit(size)
    }

    /// The front of the relay's buffer becomes a DATA frame as it is: no copy.
    fn poll_write_owned(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut bytes::BytesMut,
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let granted = ready!(poll_grant(self.send, *self.write_done, cx, data.len()))?;
        self.framing.send(self.send, data.split_to(granted))?;
        Poll::Ready(Ok(granted))
    }
}

/// Copies what fits of `pending` into `buf`. An emptied slice would still hold the frame's
/// whole read buffer (h2 hands out views of its reads, up to 1 MiB): it is let go of, or every
/// idle stream pins one (≈ 70 KiB per connection after a burst, measured).
fn drain_into(pending: &mut Bytes, buf: &mut ReadBuf<'_>) {
    let n = pending.len().min(buf.remaining());
    buf.put_slice(&pending[..n]);
    pending.advance(n);
    if pending.is_empty() {
        *pending = Bytes::new();
    }
}

#[cfg(test)]
mod tests;
