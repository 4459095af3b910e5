//! Tests of `copy`.

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

/// In-memory streams split the generic (locked) way.
impl Split for DuplexStream {
    type Read<'a> = tokio::io::ReadHalf<&'a mut DuplexStream>;
    type Write<'a> = tokio::io::WriteHalf<&'a mut DuplexStream>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        tokio::io::split(self)
    }
}

#[tokio::test]
async fn copies_both_ways_and_counts() {
    let (mut client, mut a) = duplex(1 << 16);
    let (mut b, mut server) = duplex(1 << 16);
    let relay = tokio::spawn(async move { bidirectional(&mut a, &mut b).await });
    let up: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let down = vec![7u8; 123_456];
    let (up2, down2) = (up.clone(), down.clone());
    let client_side = tokio::spawn(async move {
        client.write_all(&up2).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        got
    });
    let server_side = tokio::spawn(async move {
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        // Half-closed: the other direction still works after EOF.
        server.write_all(&down2).await.unwrap();
        server.shutdown().await.unwrap();
        got
    });
    assert_eq!(server_side.await.unwrap(), up);
    assert_eq!(client_side.await.unwrap(), down);
    let t = relay.await.unwrap().unwrap();
    assert_eq!(
        t,
        Transferred {
            a_to_b: 300_000,
            b_to_a: 123_456
        }
    );
}

/// Reads fill whatever buffer they are given (until `left` runs out); writes are recorded. As a
/// writer it frames each write with `HEADER` bytes (an HTTP/2 stream's 9).
struct Firehose<const HEADER: usize = 0> {
    left: usize,
    writes: Vec<usize>,
}
impl<const HEADER: usize> Source for Firehose<HEADER> {}

impl<const HEADER: usize> AsyncRead for Firehose<HEADER> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let n = buf.remaining().min(self.left);
        buf.put_slice(&vec![1u8; n]);
        self.left -= n;
        std::task::Poll::Ready(Ok(()))
    }
}
impl<const HEADER: usize> AsyncWrite for Firehose<HEADER> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        b: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        self.writes.push(b.len());
        std::task::Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl<const HEADER: usize> Sink for Firehose<HEADER> {
    fn read_limit(&self, size: usize) -> usize {
        if size >= RECORD { size - HEADER } else { size }
    }
}
impl Source for DuplexStream {}

/// The writes of a relay of 4 MiB from a source that fills every read into a writer whose
/// frames take `HEADER` bytes.
async fn firehose_writes<const HEADER: usize>() -> Vec<usize> {
    let mut src = Firehose::<0> {
        left: 4 << 20,
        writes: vec![],
    };
    let mut dst = Firehose::<HEADER> {
        left: 0,
        writes: vec![],
    };
    let mut relay = one_way(&mut src, &mut dst, None, End::A);
    (&mut relay).await.unwrap();
    assert_eq!(relay.count, 4 << 20);
    drop(relay);
    dst.writes
}

#[tokio::test]
async fn buffer_grows_under_load_and_is_bounded() {
    let w = &firehose_writes::<0>().await;
    assert_eq!(&w[..6], &[1024, 1024, 4096, 4096, 16384, 16384]);
    assert_eq!(w.iter().max(), Some(&MAX_BUFFER));
}

/// Into a framing writer, a read of a TLS record or more leaves room for the frame's header, so
/// a full read's frame fills whole records; growth still follows full reads.
#[tokio::test]
async fn reads_into_a_framing_writer_leave_room_for_its_header() {
    let w = &firehose_writes::<9>().await;
    assert_eq!(
        &w[..8],
        &[1024, 1024, 4096, 4096, 16375, 16375, 65527, 65527]
    );
    assert_eq!(w.iter().max(), Some(&(MAX_BUFFER - 9)));
    assert!(
        w[..w.len() - 1]
            .iter()
            .all(|n| n + 9 < RECORD || (n + 9) % RECORD == 0)
    );
}

#[tokio::test]
async fn error_names_the_failing_end() {
    struct Broken;
    impl AsyncRead for Broken {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }
    impl AsyncWrite for Broken {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            b: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::task::Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }
    impl Split for Broken {
        type Read<'a> = tokio::io::ReadHalf<&'a mut Broken>;
        type Write<'a> = tokio::io::WriteHalf<&'a mut Broken>;
        fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
            tokio::io::split(self)
        }
    }
    let (_keep, mut a) = duplex(64);
    let err = bidirectional(&mut a, &mut Broken).await.unwrap_err();
    assert_eq!(err.end, End::B);
    assert_eq!(err.source.kind(), io::ErrorKind::ConnectionReset);
}

/// After a burst the grown buffer is given back once a read has waited `IDLE_SHRINK`: the next
/// read after the pause goes into a first-size buffer, and the buffer grows again under load.
#[tokio::test(start_paused = true)]
async fn a_grown_buffer_shrinks_when_the_connection_goes_idle() {
    let (mut writer, mut src) = duplex(1 << 20);
    let mut dst = Firehose::<0> {
        left: 0,
        writes: vec![],
    };
    let relay = tokio::spawn(async move {
        one_way(&mut src, &mut dst, None, End::A).await.unwrap();
        dst.writes
    });
    // A burst in full-buffer chunks: the buffer grows to its largest.
    let burst = vec![3u8; MAX_BUFFER];
    for _ in 0..8 {
        writer.write_all(&burst).await.unwrap();
        tokio::task::yield_now().await;
    }
    // Idle past the shrink delay, then one more large write.
    tokio::time::sleep(IDLE_SHRINK * 2).await;
    writer.write_all(&burst).await.unwrap();
    drop(writer);
    let writes = relay.await.unwrap();
    let grown = writes.iter().position(|&w| w == MAX_BUFFER).unwrap();
    let after_pause = writes[grown..]
        .iter()
        .rposition(|&w| w == MAX_BUFFER)
        .map(|i| grown + i)
        .unwrap();
    let tail = &writes[after_pause + 1..];
    assert!(
        tail.first().is_some_and(|&w| w <= INITIAL_BUFFER),
        "after the pause the buffer was still large: {writes:?}"
    );
}

/// Hands out its chunks one per read, then EOF; counts the waits a relay made before reading
/// (`poll_wait_readable`: what it does when it holds no buffer).
struct Scripted {
    chunks: std::collections::VecDeque<&'static [u8]>,
    waits: usize,
}

impl Source for Scripted {
    fn poll_wait_readable(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        self.waits += 1;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Scripted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(chunk) = self.chunks.pop_front() {
            buf.put_slice(chunk);
        }
        Poll::Ready(Ok(()))
    }
}

impl Sink for Vec<u8> {}

#[tokio::test]
async fn an_idle_direction_holds_no_buffer_between_small_reads() {
    let mut reader = Scripted {
        chunks: [&b"ping"[..], &b"pong"[..]].into(),
        waits: 0,
    };
    let mut written = Vec::new();
    let mut relay = one_way(&mut reader, &mut written, None, End::A);
    (&mut relay).await.unwrap();
    assert_eq!(relay.count, 8);
    drop(relay);
    assert_eq!(written, b"pingpong");
    // Every read, EOF's too, began with no buffer held: the first-size buffer went back after
    // each write (kept, only the first read would have waited without one).
    assert_eq!(reader.waits, 3);
}
