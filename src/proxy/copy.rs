//! Bidirectional copy between the two halves of a proxied connection, counting bytes each way.
//!
//! Memory: each direction that reads into a buffer of its own takes one of [`INITIAL_BUFFER`]
//! (1 KiB) once a read is ready (it waits holding none) and gives it back after writing what it
//! read; after two consecutive reads that filled it the buffer grows ×4, up to [`MAX_BUFFER`]
//! (128 KiB), and is kept until a read has waited [`IDLE_SHRINK`] (the burst is over). A
//! direction fed by an HTTP/2 stream hands over h2's buffers and never allocates one. So an
//! idle connection holds no buffer here, also after a burst, and a busy one at most 128 KiB;
//! benches/README.md adds up the rest (TLS and HTTP/2 state) per tunneled connection. Large
//! buffers are what bulk throughput needs (8 KiB ≈ 3 Gbit/s, 128 KiB ≈ 11 on this class of
//! machine); small ones are what ten thousand idle connections need.
//!
//! Each direction reads into a `BytesMut`; a writer that can take bytes as they are (an HTTP/2
//! stream: they become a DATA frame) takes them without a copy ([`Sink`]), a reader that
//! already holds its bytes (an HTTP/2 stream's received DATA) hands them over without a copy
//! ([`Source`]), and streams come apart into their two directions without a lock between them
//! ([`Split`]). Into an HTTP/2 stream, a read of a TLS record (16 KiB) or more takes less than
//! the buffer holds, room for the DATA frames' 9-byte headers, so that each frame carrying it,
//! header included, fills whole TLS records ([`Sink::read_limit`]).
//!
//! EOF on one side becomes a write shutdown on the other (half-close), and the copy goes on in
//! the other direction until it ends too. An error in either direction ends both and says
//! which side failed, so the caller can pass a reset on.

use crate::metrics::Meters;
use crate::metrics::Outcome;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

/// First size of a direction's buffer.
pub(crate) const INITIAL_BUFFER: usize = 1024;
/// Largest size of a direction's buffer.
pub(crate) const MAX_BUFFER: usize = 128 * 1024;
const GROWTH: usize = 4;
/// The most plaintext a TLS record carries (TLS 1.3's limit, and rustls's default fragment).
pub(crate) const RECORD: usize = 16 * 1024;
/// Consecutive full reads before the buffer grows.
const FULL_READS_TO_GROW: u32 = 2;
/// How long a read waits with a grown buffer before the buffer is given back.
pub(crate) const IDLE_SHRINK: std::time::Duration = std::time::Duration::from_secs(1);

/// Bytes moved by a finished copy.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transferred {
    /// From the first argument to the second.
    pub a_to_b: u64,
    /// From the second argument to the first.
    pub b_to_a: u64,
}

/// Which end of a copy failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    A,
    B,
}

/// The write side of a relay: takes a filled buffer's front off it. The default copies through
/// `poll_write`; an HTTP/2 stream takes the bytes as they are (they become a DATA frame without
/// a copy).
pub(crate) trait Sink: AsyncWrite + Unpin {
    /// How much of a buffer of `size` bytes one read may fill: all of it, unless the writer
    /// puts headers on the wire in front of what it writes (an HTTP/2 stream's DATA frames)
    /// and wants each frame, header included, to fill whole TLS records.
    fn read_limit(&self, size: usize) -> usize {
        size
    }

    fn poll_write_owned(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut *self).poll_write(cx, data))?;
        data.advance(n);
        Poll::Ready(Ok(n))
    }
}

impl Sink for tokio::net::tcp::WriteHalf<'_> {}
/// The generic (locked) split's write half, for in-memory test streams.
#[cfg(test)]
impl<T: AsyncWrite> Sink for tokio::io::WriteHalf<T> {}

/// What one read of a relay produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// This many bytes, now at the end of the relay's buffer (0: EOF).
    Buffered(usize),
    /// Bytes the reader holds and hands over as they are, written from [`Source::held`]
    /// (never empty).
    Held,
}

/// The read side of a relay. The default reads into the relay's buffer; an HTTP/2 stream hands
/// over its DATA frames as they arrived (no copy into the buffer). Poll functions, not async
/// ones: a relay is held by its connection's task for the connection's whole life, and the
/// hand-written [`OneWay`] around them is a third of what async fns' state took.
pub(crate) trait Source: AsyncRead + Unpin {
    /// The next bytes, read into `buf` (room for `limit` made first, at most `limit` read) or
    /// handed over. Nothing is taken from the source while it returns `Pending`.
    fn poll_next_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        limit: usize,
    ) -> Poll<io::Result<Chunk>> {
        buf.reserve(limit);
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(self),
            cx,
            &mut buf.limit(limit)
        ))?;
        Poll::Ready(Ok(Chunk::Buffered(n)))
    }

    /// Ready, holding no buffer, once a read would find something (a relay gives its small
    /// buffer back between reads, so an idle direction holds none). The default is ready at
    /// once: the read waits instead.
    fn poll_wait_readable(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// The bytes a [`Chunk::Held`] left with the reader, what is left of them to write: the
    /// relay writes from here and empties it. A reader that never returns `Held` holds none.
    fn held(&mut self) -> Option<&mut Bytes> {
        None
    }
}

/// The tests relay through borrowed streams they read back afterwards.
#[cfg(test)]
impl<T: Source + ?Sized> Source for &mut T {
    fn poll_next_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        limit: usize,
    ) -> Poll<io::Result<Chunk>> {
        (**self).poll_next_chunk(cx, buf, limit)
    }

    fn poll_wait_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_wait_readable(cx)
    }

    fn held(&mut self) -> Option<&mut Bytes> {
        (**self).held()
    }
}
#[cfg(test)]
impl<T: Sink + ?Sized> Sink for &mut T {
    fn read_limit(&self, size: usize) -> usize {
        (**self).read_limit(size)
    }

    fn poll_write_owned(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        (**self).poll_write_owned(cx, data)
    }
}

impl Source for tokio::net::tcp::ReadHalf<'_> {
    fn poll_wait_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The read that follows registers the same waker slot: one reader per socket.
        let stream: &tokio::net::TcpStream = (*self).as_ref();
        stream.poll_read_ready(cx)
    }
}
/// The generic (locked) split's read half, for in-memory test streams.
#[cfg(test)]
impl<T: AsyncRead> Source for tokio::io::ReadHalf<T> {}

/// A stream a relay can take apart into its two directions without a lock between them.
pub(crate) trait Split {
    type Read<'a>: Source
    where
        Self: 'a;
    type Write<'a>: Sink
    where
        Self: 'a;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
}

impl Split for tokio::net::TcpStream {
    type Read<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Write<'a> = tokio::net::tcp::WriteHalf<'a>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        self.split()
    }
}

/// A copy that ended with an I/O error on one end, with what had moved until then.
#[derive(Debug, thiserror::Error)]
#[error("relay failed on side {end:?}: {source}")]
pub(crate) struct CopyError {
    pub end: End,
    pub source: io::Error,
    pub transferred: Transferred,
}

/// Copies `a` → `b` and `b` → `a` until both directions reach EOF (the relay without a stop
/// signal; every path of the proxy has one, so only the tests use this form).
#[cfg(test)]
pub(crate) async fn bidirectional<A, B>(a: &mut A, b: &mut B) -> Result<Transferred, CopyError>
where
    A: Split,
    B: Split,
{
    let never = std::future::pending::<std::convert::Infallible>();
    match bidirectional_until(a, b, never, &Meters::default()).await {
        Ended::Copied(res) => res,
        Ended::Stopped { reason, .. } => match reason {},
    }
}

/// How a copy with a stop signal ended.
#[derive(Debug)]
pub(crate) enum Ended<S> {
    /// Both directions finished, or one failed.
    Copied(Result<Transferred, CopyError>),
    /// `stop` resolved first (with `reason`); the streams are left as they are, for the caller
    /// to reset or close.
    Stopped { reason: S, transferred: Transferred },
}

impl<S> Ended<S> {
    /// How the relay ended (a stop says for itself through `stopped`), and what it moved.
    pub(crate) fn outcome(&self, stopped: impl FnOnce(&S) -> Outcome) -> (Outcome, Transferred) {
        match self {
            Ended::Copied(Ok(t)) => (Outcome::Completed, *t),
            Ended::Copied(Err(e)) => (Outcome::Broken(e.source.to_string()), e.transferred),
            Ended::Stopped {
                reason,
                transferred,
            } => (stopped(reason), *transferred),
        }
    }
}

impl Transferred {
    /// (request, response): client → destination, destination → client (every relay takes
    /// the client's side first).
    pub(crate) fn request_response(self) -> (u64, u64) {
        (self.a_to_b, self.b_to_a)
    }
}

/// [`bidirectional`], until `stop` resolves (a policy change, for one), counting what moved
/// either way.
///
/// A connection's task holds this future for the connection's whole life, so each part is
/// stored once: the directions own their halves and counts (read back once the relay ended,
/// however it ended), and `stop` is a pinned reference to where the caller keeps it. A future
/// written out ([`Until`]) rather than an async fn around `select!`, which kept the streams'
/// and meters' references and its branches' references besides the directions (320 bytes
/// where this is 192 for a TCP/HTTP/2 pair).
pub(crate) fn bidirectional_until<'a, A, B, S>(
    a: &'a mut A,
    b: &'a mut B,
    stop: S,
    meters: &'a Meters,
) -> Until<'a, A::Read<'a>, B::Write<'a>, B::Read<'a>, A::Write<'a>, S>
where
    A: Split,
    B: Split,
    S: std::future::Future + Unpin,
{
    let (ar, aw) = a.halves();
    let (br, bw) = b.halves();
    Until {
        both: Both {
            forward: one_way(ar, bw, meters.request.as_ref(), End::A),
            backward: one_way(br, aw, meters.response.as_ref(), End::B),
        },
        stop,
    }
}

/// The relay of [`bidirectional_until`]: both directions, or the stop signal first.
pub(crate) struct Until<'a, R1, W1, R2, W2, S> {
    both: Both<OneWay<'a, R1, W1>, OneWay<'a, R2, W2>>,
    stop: S,
}

impl<R1, W1, R2, W2, S> std::future::Future for Until<'_, R1, W1, R2, W2, S>
where
    R1: Source,
    W1: Sink,
    R2: Source,
    W2: Sink,
    S: std::future::Future + Unpin,
{
    type Output = Ended<S::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        // The relay first: what it can still move before a stop is moved.
        let copied = match Pin::new(&mut this.both).poll(cx) {
            Poll::Ready(res) => Ok(res),
            Poll::Pending => Err(ready!(Pin::new(&mut this.stop).poll(cx))),
        };
        let transferred = Transferred {
            a_to_b: this.both.forward.count,
            b_to_a: this.both.backward.count,
        };
        Poll::Ready(match copied {
            Ok(Ok(())) => Ended::Copied(Ok(transferred)),
            Ok(Err((end, source))) => Ended::Copied(Err(CopyError {
                end,
                source,
                transferred,
            })),
            Err(reason) => Ended::Stopped {
                reason,
                transferred,
            },
        })
    }
}

/// Both directions of a relay, polled in turn: done when both are, failed when either fails.
/// Unlike a join combinator it keeps the finished directions, so their counts can be read.
struct Both<F, B> {
    forward: F,
    backward: B,
}

impl<'a, R1, W1, R2, W2> std::future::Future for Both<OneWay<'a, R1, W1>, OneWay<'a, R2, W2>>
where
    R1: Source,
    W1: Sink,
    R2: Source,
    W2: Sink,
{
    type Output = Result<(), (End, io::Error)>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let forward = Pin::new(&mut this.forward).poll(cx)?;
        let backward = Pin::new(&mut this.backward).poll(cx)?;
        if forward.is_ready() && backward.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

/// Copies until EOF, then shuts the writer down; `meter` counts along, and so does the
/// returned future's `count`. `read_end` is the reader's end of the relay (the writer's is the
/// other), for the errors.
fn one_way<'a, R, W>(
    reader: R,
    writer: W,
    meter: Option<&'a prometheus_client::metrics::counter::Counter>,
    read_end: End,
) -> OneWay<'a, R, W>
where
    R: Source,
    W: Sink,
{
    OneWay {
        reader,
        writer,
        meter,
        count: 0,
        buf: BytesMut::new(),
        shrink: None,
        size: INITIAL_BUFFER as u32,
        full_reads: 0,
        read_end,
        shrink_armed: false,
        step: Step::Read,
    }
}

/// One direction of a relay, as a future: read a chunk, write it all, again, until EOF (then
/// the writer's shutdown) or an error (with the end it came from). Once done it stays done
/// (polled again it is ready at once), so [`Both`] can poll a finished direction.
///
/// `size` is how much one read may take; the buffer's capacity follows it (a writer that
/// keeps what it was handed leaves the buffer empty, and the next read's reserve allocates
/// anew). A reader that hands its bytes over never makes the buffer allocate. The first size
/// is given back after every write and a read waits without it; a grown buffer is kept while
/// reads come within [`IDLE_SHRINK`] of each other (the `shrink` timer, boxed and only there
/// once the buffer grew: an idle connection carries none).
///
/// Every live connection's task holds two of these, so they are packed: the halves owned (not
/// references to them), sizes in `u32`s, bytes counted as they are written (no pending length),
/// one end stored, and bytes a reader hands over left with it ([`Source::held`]) rather than
/// copied into a field here: 88 and 96 bytes for a TCP/HTTP/2 pair, 136 before.
pub(crate) struct OneWay<'a, R, W> {
    reader: R,
    writer: W,
    meter: Option<&'a prometheus_client::metrics::counter::Counter>,
    /// Bytes written so far.
    pub(crate) count: u64,
    buf: BytesMut,
    shrink: Option<Pin<Box<tokio::time::Sleep>>>,
    /// How much one read may take (at most [`MAX_BUFFER`]).
    size: u32,
    full_reads: u8,
    read_end: End,
    /// Whether `shrink` is set for the read now waiting (reset at the first `Pending`).
    shrink_armed: bool,
    step: Step,
}

/// Where a [`OneWay`] is.
#[derive(Clone, Copy)]
enum Step {
    Read,
    /// Writing the buffer's bytes just read.
    WriteBuffered,
    /// Writing what the reader holds ([`Source::held`]).
    WriteHeld,
    Shutdown,
    Done,
}

impl End {
    /// The relay's other end.
    fn other(self) -> End {
        match self {
            End::A => End::B,
            End::B => End::A,
        }
    }
}

impl<R, W> std::future::Future for OneWay<'_, R, W>
where
    R: Source,
    W: Sink,
{
    type Output = Result<(), (End, io::Error)>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let (read_end, write_end) = (this.read_end, this.read_end.other());
        loop {
            match this.step {
                Step::Read => {
                    let chunk = ready!(this.poll_read(cx)).map_err(|e| (read_end, e))?;
                    this.step = match chunk {
                        Chunk::Buffered(0) => Step::Shutdown,
                        Chunk::Buffered(n) => {
                            this.read_full(n);
                            Step::WriteBuffered
                        }
                        Chunk::Held => Step::WriteHeld,
                    };
                }
                Step::WriteBuffered => {
                    while !this.buf.is_empty() {
                        let written = ready!(this.writer.poll_write_owned(cx, &mut this.buf))
                            .map_err(|e| (write_end, e))?;
                        if written == 0 {
                            return Poll::Ready(Err((write_end, io::ErrorKind::WriteZero.into())));
                        }
                        moved(&mut this.count, this.meter, written);
                    }
                    if this.size as usize == INITIAL_BUFFER {
                        this.buf = BytesMut::new();
                    }
                    this.step = Step::Read;
                }
                Step::WriteHeld => {
                    if let Some(held) = this.reader.held() {
                        while !held.is_empty() {
                            let written = ready!(Pin::new(&mut this.writer).poll_write(cx, held))
                                .map_err(|e| (write_end, e))?;
                            if written == 0 {
                                let zero = io::ErrorKind::WriteZero.into();
                                return Poll::Ready(Err((write_end, zero)));
                            }
                            held.advance(written);
                            moved(&mut this.count, this.meter, written);
                        }
                        // Empty: gives its storage back (an HTTP/2 frame's) now, not at the next.
                        *held = Bytes::new();
                    }
                    this.step = Step::Read;
                }
                Step::Shutdown => {
                    let shut = ready!(Pin::new(&mut this.writer).poll_shutdown(cx));
                    this.step = Step::Done;
                    return Poll::Ready(shut.map_err(|e| (write_end, e)));
                }
                Step::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl<R, W> OneWay<'_, R, W>
where
    R: Source,
    W: Sink,
{
    /// The next chunk. A grown buffer that waits [`IDLE_SHRINK`] for it is given back first
    /// (nothing was read: the read is retried without it).
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Chunk>> {
        let size = self.size as usize;
        if size > INITIAL_BUFFER {
            let limit = self.read_limit();
            if let Poll::Ready(read) = self.reader.poll_next_chunk(cx, &mut self.buf, limit) {
                self.shrink_armed = false;
                return Poll::Ready(read);
            }
            let shrink = self
                .shrink
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(IDLE_SHRINK)));
            if !self.shrink_armed {
                shrink
                    .as_mut()
                    .reset(tokio::time::Instant::now() + IDLE_SHRINK);
                self.shrink_armed = true;
            }
            ready!(shrink.as_mut().poll(cx));
            self.size = INITIAL_BUFFER as u32;
            self.buf = BytesMut::new();
            self.full_reads = 0;
            self.shrink = None;
            self.shrink_armed = false;
        }
        // The first size is given back after every write: wait without it.
        if self.buf.capacity() == 0 {
            ready!(self.reader.poll_wait_readable(cx))?;
        }
        let limit = self.read_limit();
        self.reader.poll_next_chunk(cx, &mut self.buf, limit)
    }

    /// How much the next read may take: the buffer's size, less what the writer's frame
    /// headers need ([`Sink::read_limit`]). A full read's frame (a multiple of [`RECORD`], the
    /// buffer growing by powers of two, plus 9 bytes) took one record more than its data
    /// needed, carrying the header's 9 bytes alone: one record in eight at 128 KiB, each
    /// costing both proxies an AEAD operation, an allocation and a frame to parse.
    fn read_limit(&self) -> usize {
        self.writer.read_limit(self.size as usize)
    }

    /// A read into the buffer took `n` bytes: after consecutive reads that filled it, the next
    /// may take more.
    fn read_full(&mut self, n: usize) {
        if n == self.read_limit() && (self.size as usize) < MAX_BUFFER {
            self.full_reads += 1;
            if u32::from(self.full_reads) >= FULL_READS_TO_GROW {
                self.size = (self.size * GROWTH as u32).min(MAX_BUFFER as u32);
                self.full_reads = 0;
            }
        } else {
            self.full_reads = 0;
        }
    }
}

/// `n` bytes were written: counted (fields, not the direction: what is written may be the
/// reader's, borrowed meanwhile).
fn moved(count: &mut u64, meter: Option<&prometheus_client::metrics::counter::Counter>, n: usize) {
    *count += n as u64;
    if let Some(m) = meter {
        m.inc_by(n as u64);
    }
}

#[cfg(test)]
mod tests;
