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
//! ([`Split`]).
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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// First size of a direction's buffer.
pub(crate) const INITIAL_BUFFER: usize = 1024;
/// Largest size of a direction's buffer.
pub(crate) const MAX_BUFFER: usize = 128 * 1024;
const GROWTH: usize = 4;
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
#[derive(Debug)]
pub(crate) enum Chunk {
    /// This many bytes, now at the end of the relay's buffer (0: EOF).
    Buffered(usize),
    /// Bytes handed over as they are (never empty).
    Owned(Bytes),
}

/// The read side of a relay. The default reads into the relay's buffer; an HTTP/2 stream hands
/// over its DATA frames as they arrived (no copy into the buffer).
pub(crate) trait Source: AsyncRead + Unpin {
    /// The next bytes, read into `buf` (room for `limit` made first, at most `limit` read) or
    /// handed over; cancel-safe.
    async fn next_chunk(&mut self, buf: &mut BytesMut, limit: usize) -> io::Result<Chunk> {
        buf.reserve(limit);
        let n = self.read_buf(&mut buf.limit(limit)).await?;
        Ok(Chunk::Buffered(n))
    }

    /// Waits, holding no buffer, until a read would find something (a relay gives its small
    /// buffer back between reads, so an idle direction holds none). The default returns at
    /// once: the read waits instead.
    async fn wait_readable(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for tokio::net::tcp::ReadHalf<'_> {
    async fn wait_readable(&mut self) -> io::Result<()> {
        tokio::net::tcp::ReadHalf::readable(self).await
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
pub(crate) async fn bidirectional_until<A, B, S>(
    a: &mut A,
    b: &mut B,
    stop: S,
    meters: &Meters,
) -> Ended<S::Output>
where
    A: Split,
    B: Split,
    S: std::future::Future,
{
    let (mut ar, mut aw) = a.halves();
    let (mut br, mut bw) = b.halves();
    let mut a_to_b = 0u64;
    let mut b_to_a = 0u64;
    let copied = {
        let request = meters.request.as_ref();
        let response = meters.response.as_ref();
        let forward = one_way(&mut ar, &mut bw, &mut a_to_b, request, (End::A, End::B));
        let backward = one_way(&mut br, &mut aw, &mut b_to_a, response, (End::B, End::A));
        // A connection's task holds this future for the connection's whole life: each part is
        // stored once (an async block around `try_join!` held both directions twice, ~880
        // bytes more). Callers pass `stop` pinned where it lives (`Pin<&mut _>` is a future),
        // so it is not copied in here either.
        let both = futures_util::future::try_join(forward, backward);
        tokio::select! {
            res = both => Ok(res),
            reason = stop => Err(reason),
        }
    };
    let transferred = Transferred { a_to_b, b_to_a };
    match copied {
        Ok(Ok(_)) => Ended::Copied(Ok(transferred)),
        Ok(Err((end, source))) => Ended::Copied(Err(CopyError {
            end,
            source,
            transferred,
        })),
        Err(reason) => Ended::Stopped {
            reason,
            transferred,
        },
    }
}

/// Copies until EOF, then shuts the writer down; `meter` counts along.
async fn one_way<R, W>(
    reader: &mut R,
    writer: &mut W,
    count: &mut u64,
    meter: Option<&prometheus_client::metrics::counter::Counter>,
    (read_end, write_end): (End, End),
) -> Result<(), (End, io::Error)>
where
    R: Source + ?Sized,
    W: Sink + ?Sized,
{
    // `size` is how much one read may take; the buffer's capacity follows it (a writer that
    // keeps what it was handed leaves the buffer empty, and the next read's reserve allocates
    // anew). A reader that hands its bytes over never makes the buffer allocate.
    let mut size = INITIAL_BUFFER;
    let mut buf = BytesMut::new();
    let mut full_reads = 0;
    loop {
        let read = if size > INITIAL_BUFFER {
            // A grown buffer: if no data comes for a while, give it back before waiting on
            // (reads are cancel-safe: nothing was read when the timeout wins).
            match tokio::time::timeout(IDLE_SHRINK, reader.next_chunk(&mut buf, size)).await {
                Ok(read) => read,
                Err(_) => {
                    size = INITIAL_BUFFER;
                    buf = BytesMut::new();
                    full_reads = 0;
                    next_unbuffered(reader, &mut buf, size).await
                }
            }
        } else {
            // The first size is given back after every write (below): wait without it.
            next_unbuffered(reader, &mut buf, size).await
        };
        let n = match read.map_err(|e| (read_end, e))? {
            Chunk::Buffered(0) => return writer.shutdown().await.map_err(|e| (write_end, e)),
            Chunk::Buffered(n) => {
                write_buffer(writer, &mut buf)
                    .await
                    .map_err(|e| (write_end, e))?;
                if size == INITIAL_BUFFER {
                    buf = BytesMut::new();
                }
                n
            }
            Chunk::Owned(bytes) => {
                writer.write_all(&bytes).await.map_err(|e| (write_end, e))?;
                bytes.len()
            }
        };
        *count += n as u64;
        if let Some(m) = meter {
            m.inc_by(n as u64);
        }
        if n == size && size < MAX_BUFFER {
            full_reads += 1;
            if full_reads >= FULL_READS_TO_GROW {
                size = (size * GROWTH).min(MAX_BUFFER);
                full_reads = 0;
            }
        } else {
            full_reads = 0;
        }
    }
}

/// The next chunk, the wait for it made holding no buffer when `buf` has none.
async fn next_unbuffered<R: Source + ?Sized>(
    reader: &mut R,
    buf: &mut BytesMut,
    size: usize,
) -> io::Result<Chunk> {
    if buf.capacity() == 0 {
        reader.wait_readable().await?;
    }
    reader.next_chunk(buf, size).await
}

/// Hands all of `buf` to `writer`.
async fn write_buffer<W: Sink + ?Sized>(writer: &mut W, buf: &mut BytesMut) -> io::Result<()> {
    while !buf.is_empty() {
        let written = std::future::poll_fn(|cx| writer.poll_write_owned(cx, buf)).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
