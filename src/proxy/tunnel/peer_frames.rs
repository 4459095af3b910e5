//! The largest DATA frame an HBONE peer takes, read off the wire: h2 keeps the peer's SETTINGS
//! to itself, and a stream needs SETTINGS_MAX_FRAME_SIZE to cut what it sends into frames that
//! fill whole TLS records ([`super::Framing`]). [`PeerFrames`] sits between TLS and h2 and
//! reads the peer's first frame as it passes, which RFC 9113 §3.4 makes a SETTINGS frame
//! (after the client's 24-byte preface, on a server). It only looks: the bytes reach h2 as they
//! came, a malformed start is h2's to refuse, and a value it never learns leaves frames uncut.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client's connection preface, ahead of its SETTINGS: `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const CLIENT_PREFACE: u8 = 24;
const SETTINGS: u8 = 0x4;
const ACK: u8 = 0x1;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
/// SETTINGS_MAX_FRAME_SIZE when the peer does not send it (RFC 9113 §6.5.2).
const DEFAULT_MAX_FRAME: u32 = 16_384;

/// What [`PeerFrames`] learned, shared with whoever opens the connection's streams: the peer's
/// largest frame, 0 until its SETTINGS has passed (or if it never does).
#[derive(Debug, Clone, Default)]
pub(crate) struct MaxFrame(Arc<AtomicU32>);

impl MaxFrame {
    pub(crate) fn get(&self) -> u32 {
        self.0.load(Ordering::Acquire)
    }
}

/// A connection's transport, reading the peer's first SETTINGS as h2 reads it.
#[derive(Debug)]
pub(crate) struct PeerFrames<T> {
    io: T,
    learned: MaxFrame,
    parse: Parse,
}

impl<T> PeerFrames<T> {
    /// Under a client: the server's first bytes are its SETTINGS.
    pub(crate) fn client(io: T) -> (Self, MaxFrame) {
        Self::new(io, 0)
    }

    /// Under a server: the client's preface comes first.
    pub(crate) fn server(io: T) -> (Self, MaxFrame) {
        Self::new(io, CLIENT_PREFACE)
    }

    fn new(io: T, skip: u8) -> (Self, MaxFrame) {
        let learned = MaxFrame::default();
        let parse = Parse {
            skip,
            ..Parse::default()
        };
        let this = PeerFrames {
            io,
            learned: learned.clone(),
            parse,
        };
        (this, learned)
    }
}

/// Where the reading of the first frame is.
#[derive(Debug, Default)]
struct Parse {
    done: bool,
    /// Preface bytes still to pass.
    skip: u8,
    head: [u8; 9],
    head_len: u8,
    /// The SETTINGS payload's bytes still to come.
    left: u32,
    param: [u8; 6],
    param_len: u8,
    max_frame: Option<u32>,
}

impl Parse {
    /// Reads on through `bytes`; the peer's largest frame once its first SETTINGS has passed,
    /// `Some(0)` if the first frame was something else (h2 ends such a connection).
    fn feed(&mut self, mut bytes: &[u8]) -> Option<u32> {
        while !bytes.is_empty() && !self.done {
            if self.skip > 0 {
                let n = bytes.len().min(usize::from(self.skip));
                self.skip -= n as u8;
                bytes = &bytes[n..];
            } else if usize::from(self.head_len) < self.head.len() {
                let n = bytes
                    .len()
                    .min(self.head.len() - usize::from(self.head_len));
                let at = usize::from(self.head_len);
                self.head[at..at + n].copy_from_slice(&bytes[..n]);
                self.head_len += n as u8;
                bytes = &bytes[n..];
                if usize::from(self.head_len) == self.head.len() {
                    let [l0, l1, l2, kind, flags, ..] = self.head;
                    if kind != SETTINGS || flags & ACK != 0 {
                        return self.finish(Some(0));
                    }
                    self.left = u32::from_be_bytes([0, l0, l1, l2]);
                    if self.left == 0 {
                        return self.finish(None);
                    }
                }
            } else {
                let at = usize::from(self.param_len);
                let n = bytes
                    .len()
                    .min(self.param.len() - at)
                    .min(self.left as usize);
                self.param[at..at + n].copy_from_slice(&bytes[..n]);
                self.param_len += n as u8;
                self.left -= n as u32;
                bytes = &bytes[n..];
                if usize::from(self.param_len) == self.param.len() {
                    let [i0, i1, v0, v1, v2, v3] = self.param;
                    if u16::from_be_bytes([i0, i1]) == SETTINGS_MAX_FRAME_SIZE {
                        self.max_frame = Some(u32::from_be_bytes([v0, v1, v2, v3]));
                    }
                    self.param_len = 0;
                }
                if self.left == 0 {
                    return self.finish(self.max_frame);
                }
            }
        }
        None
    }

    fn finish(&mut self, max_frame: Option<u32>) -> Option<u32> {
        self.done = true;
        Some(max_frame.unwrap_or(DEFAULT_MAX_FRAME))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PeerFrames<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if !this.parse.done
            && let Some(max_frame) = this.parse.feed(&buf.filled()[before..])
        {
            this.learned.0.store(max_frame, Ordering::Release);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PeerFrames<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    /// A SETTINGS frame with `params`.
    fn settings(flags: u8, params: &[(u16, u32)]) -> Vec<u8> {
        let len = (params.len() * 6) as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend([SETTINGS, flags, 0, 0, 0, 0]);
        for (id, value) in params {
            f.extend(id.to_be_bytes());
            f.extend(value.to_be_bytes());
        }
        f
    }

    /// Feeds `wire` to a parse `skip`ping a preface, `step` bytes at a time.
    fn learn(skip: u8, wire: &[u8], step: usize) -> Option<u32> {
        let mut p = Parse {
            skip,
            ..Parse::default()
        };
        wire.chunks(step).find_map(|c| p.feed(c))
    }

    #[test]
    fn the_largest_frame_is_read_however_the_bytes_arrive() {
        // ztunnel's and hboned's SETTINGS: windows, frame size, header list.
        let frame = settings(0, &[(0x4, 4 << 20), (0x5, 1 << 20), (0x6, 16 << 10)]);
        for step in [1, 2, 5, 7, 9, 64] {
            assert_eq!(learn(0, &frame, step), Some(1 << 20), "step {step}");
        }
        let mut server_side = PREFACE.to_vec();
        server_side.extend(&frame);
        server_side.extend([0u8; 40]);
        for step in [1, 3, 24, 25, 100] {
            assert_eq!(learn(24, &server_side, step), Some(1 << 20), "step {step}");
        }
    }

    #[test]
    fn a_peer_that_does_not_say_takes_the_default() {
        assert_eq!(learn(0, &settings(0, &[]), 4), Some(DEFAULT_MAX_FRAME));
        assert_eq!(
            learn(0, &settings(0, &[(0x3, 100), (0x4, 65_535)]), 4),
            Some(DEFAULT_MAX_FRAME)
        );
    }

    #[test]
    fn a_start_that_is_not_settings_teaches_nothing() {
        assert_eq!(learn(0, &settings(ACK, &[]), 4), Some(0));
        // A PING first.
        let ping = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(learn(0, &ping, 3), Some(0));
        // Cut short: nothing yet.
        assert_eq!(learn(0, &settings(0, &[(0x5, 1 << 20)])[..12], 4), None);
    }

    #[test]
    fn any_bytes_however_they_arrive_give_one_answer() {
        // What a peer sends is arbitrary: a length that is no multiple of a parameter's, or
        // longer than what follows, a frame of another type, a preface cut anywhere. Most
        // starts are made a SETTINGS frame of a short length, with SETTINGS_MAX_FRAME_SIZE
        // among its parameters now and then, so that every path gets taken. xorshift: the same
        // run each time.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |below: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % below
        };
        let mut learned = 0;
        for _ in 0..5_000 {
            let mut wire: Vec<u8> = (0..next(64)).map(|_| next(256) as u8).collect();
            if wire.len() >= 9 && next(4) != 0 {
                wire[..5].copy_from_slice(&[0, 0, next(60) as u8, SETTINGS, 0]);
                for param in wire[9..].chunks_mut(6) {
                    if param.len() >= 2 && next(3) == 0 {
                        param[..2].copy_from_slice(&SETTINGS_MAX_FRAME_SIZE.to_be_bytes());
                    }
                }
            }
            // Under a server the same bytes follow the client's preface.
            let skip = if next(2) == 0 { 0 } else { CLIENT_PREFACE };
            wire.splice(0..0, PREFACE[..usize::from(skip)].iter().copied());
            let whole = learn(skip, &wire, wire.len().max(1));
            if whole.is_some_and(|v| v != 0 && v != DEFAULT_MAX_FRAME) {
                learned += 1;
            }
            for step in 1..=7 {
                assert_eq!(
                    learn(skip, &wire, step),
                    whole,
                    "{wire:?} in steps of {step}"
                );
            }
        }
        assert!(learned > 100, "the run read a value {learned} times");
    }

    #[tokio::test]
    async fn bytes_pass_unchanged_and_the_value_is_shared() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(64);
        let (mut sniffed, learned) = PeerFrames::client(a);
        let mut wire = settings(0, &[(0x5, 32_768)]);
        wire.extend(b"after the settings");
        b.write_all(&wire).await.unwrap();
        drop(b);
        let mut got = Vec::new();
        sniffed.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, wire);
        assert_eq!(learned.get(), 32_768);
    }
}
