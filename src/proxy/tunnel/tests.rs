//! Tests of `tunnel`: received frames let go of, vectored writes as one frame, frames cut to
//! fill whole TLS records, the PING keepalive, small frames left unread, empty ones limited.

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A vectored write (a TLS connection's records, inside the stream) goes out as one DATA
/// frame, its slices in order.
#[tokio::test]
async fn a_vectored_write_is_one_frame() {
    assert_eq!(frames_of_a_vectored_write(0).await, [32_912], "one frame");
}

/// To a peer of 16 KiB frames the same write goes out as frames of 16,375 bytes, a TLS record
/// each with their headers, where h2 would have cut it into frames of 16,384 (a record and 9
/// bytes each).
#[tokio::test]
async fn to_a_peer_of_small_frames_a_write_is_cut_to_whole_records() {
    assert_eq!(
        frames_of_a_vectored_write(16_384).await,
        [16_375, 16_375, 162]
    );
}

/// The DATA frames (their sizes) of a vectored write of two inner TLS records and 100 bytes
/// into a stream that takes its peer's largest frame as `peer_max_frame`.
async fn frames_of_a_vectored_write(peer_max_frame: u32) -> Vec<usize> {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        let mut conn = server_end(server_io).await;
        let (request, mut respond) = conn.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while let Some(Ok(_)) = conn.accept().await {} });
        let _send = respond
            .send_response(http::Response::new(()), false)
            .unwrap();
        let mut body = request.into_body();
        let mut frames = Vec::new();
        while let Some(data) = body.data().await {
            let data = data.unwrap();
            let _ = body.flow_control().release_capacity(data.len());
            frames.push(data);
        }
        frames
    });
    let (h2, conn) = client_end(client_io).await;
    tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let request = http::Request::post("http://tunnel/").body(()).unwrap();
    let (response, send) = h2.send_request(request, false).unwrap();
    let recv = response.await.unwrap().into_body();
    let mut stream = H2Stream::new(send, recv).with_peer_max_frame(peer_max_frame);
    let (a, b, c) = (vec![1u8; 16_406], vec![2u8; 16_406], vec![3u8; 100]);
    let slices = [
        io::IoSlice::new(&a),
        io::IoSlice::new(&b),
        io::IoSlice::new(&c),
    ];
    assert!(stream.is_write_vectored());
    let n = std::future::poll_fn(|cx| Pin::new(&mut stream).poll_write_vectored(cx, &slices))
        .await
        .unwrap();
    assert_eq!(n, 32_912);
    std::future::poll_fn(|cx| Pin::new(&mut stream).poll_shutdown(cx))
        .await
        .unwrap();
    let frames = server.await.unwrap();
    // The stream's end is an empty frame of its own.
    assert_eq!(frames.concat(), [a, b, c].concat());
    frames.iter().map(Bytes::len).filter(|&n| n > 0).collect()
}

/// For every peer limit and every buffer size the relay reads into, the frames carrying a full
/// read fill whole records and stay within the peer's limit.
#[test]
fn frames_of_a_full_read_fill_whole_records() {
    for max_frame in [0, 16_384, 16_385, 20_000, 32_768, 1 << 20, (1 << 24) - 1] {
        let framing = Framing::for_peer(max_frame);
        for size in [16 << 10, 64 << 10, 128 << 10, 256 << 10] {
            let mut left = framing.read_limit(size);
            assert!(
                left <= size && left + 9 * (size / RECORD) >= size,
                "{max_frame} {size}"
            );
            while left > 0 {
                let frame = left.min(framing.cut());
                assert_eq!((frame + 9) % RECORD, 0, "{max_frame}: {frame} of {size}");
                assert!(max_frame == 0 || frame <= max_frame as usize);
                left -= frame;
            }
        }
    }
    // Below a record, reads take what the buffer holds.
    assert_eq!(Framing::for_peer(16_384).read_limit(4_096), 4_096);
    // No limit known (or one below HTTP/2's minimum): frames as large as the read.
    assert_eq!(Framing::for_peer(0), Framing::default());
    assert_eq!(Framing::for_peer(1_000), Framing::default());
    assert_eq!(Framing::default().read_limit(65_536), 65_527);
    assert_eq!(Framing::for_peer(16_384).read_limit(65_536), 65_500);
    assert_eq!(Framing::for_peer(1 << 20).read_limit(131_072), 131_063);
}

/// Reading a frame to its end lets go of the buffer it is a view of.
#[test]
fn an_emptied_frame_releases_its_buffer() {
    let read_buffer = Bytes::from(vec![9u8; 64 * 1024]);
    let mut pending = read_buffer.slice(100..1100);
    let mut out = [0u8; 600];
    let mut buf = ReadBuf::new(&mut out);
    drain_into(&mut pending, &mut buf);
    assert_eq!((buf.filled().len(), pending.len()), (600, 400));
    assert!(
        !read_buffer.is_unique(),
        "a partly read frame keeps its buffer"
    );
    let mut out = [0u8; 600];
    let mut buf = ReadBuf::new(&mut out);
    drain_into(&mut pending, &mut buf);
    assert_eq!(buf.filled().len(), 400);
    assert!(
        read_buffer.is_unique(),
        "the emptied frame still holds the buffer"
    );
}

/// Keepalive on an idle connection whose peer answers: PINGs every interval, each answered, so
/// the connection is still up minutes later and ends when the peer goes.
#[tokio::test(start_paused = true)]
async fn an_answered_keepalive_keeps_an_idle_connection() {
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        let mut conn = server_end(server_io).await;
        // Serving the connection answers its PINGs.
        while let Some(Ok(_)) = conn.accept().await {}
    });
    let (_send, mut conn) = client_end(client_io).await;
    let ping = conn.ping_pong();
    let mut driven = tokio::spawn(drive_with_keepalive(conn, ping, &TunnelSettings::default()));
    // Thirty intervals, each ping answered well within its timeout.
    let idle = tokio::time::timeout(Duration::from_secs(300), &mut driven).await;
    assert!(idle.is_err(), "ended while idle: {idle:?}");
    server.abort();
    let ended = tokio::time::timeout(Duration::from_secs(60), driven).await;
    assert!(
        matches!(ended, Ok(Ok(Err(ConnectionEnd::Http2(_)) | Ok(())))),
        "{ended:?}"
    );
}

/// A peer that reads but never answers: the first PING goes out an interval after the driver
/// starts, and the connection ends once it has gone unanswered for the timeout, not before and
/// not never.
#[tokio::test(start_paused = true)]
async fn an_unanswered_ping_ends_the_connection_after_interval_and_timeout() {
    let (client_io, mut server_io) = tokio::io::duplex(1 << 16);
    // Reads everything, writes nothing: no SETTINGS, no PONG.
    tokio::spawn(async move {
        let mut sink = tokio::io::sink();
        let _ = tokio::io::copy(&mut server_io, &mut sink).await;
    });
    let (_send, mut conn) = client_end(client_io).await;
    let ping = conn.ping_pong();
    let settings = TunnelSettings {
        ping_interval: Duration::from_secs(10),
        ping_timeout: Duration::from_secs(20),
        ..TunnelSettings::default()
    };
    let start = tokio::time::Instant::now();
    let ended = drive_with_keepalive(conn, ping, &settings).await;
    let after = start.elapsed();
    assert!(
        matches!(ended, Err(ConnectionEnd::NoPong(t)) if t == Duration::from_secs(20)),
        "{ended:?}"
    );
    assert!(
        after >= Duration::from_secs(30) && after < Duration::from_secs(31),
        "ended after {after:?}"
    );
}

/// One-byte DATA frames that wait unread on a stream (its app has stopped reading) leave the
/// server's connection up: 50,000 of them, where h2's default budget ends the connection with
/// ENHANCE_YOUR_CALM at ~33,000 under HBONE's 16 MiB window; the PING behind them is answered
/// once the server has taken every frame before it.
#[tokio::test]
async fn unread_small_frames_leave_a_server_connection_up() {
    assert_eq!(server_answer(b"x", UNREAD_FRAMES).await, Ok(()));
}

/// What stays limited with the budget off: empty DATA frames, which flow control does not
/// count, end the connection with ENHANCE_YOUR_CALM past h2's own limit (one a stream, then
/// 100 a connection), as they would with the budget on.
#[tokio::test]
async fn empty_frames_past_h2s_limit_end_a_server_connection() {
    let enhance_your_calm = u32::from(h2::Reason::ENHANCE_YOUR_CALM);
    assert_eq!(server_answer(b"", 200).await, Err(enhance_your_calm));
}

/// A server's answer to a CONNECT followed by `frames` DATA frames of `data` that its app never
/// reads, then a PING: the PING's answer once the server has taken every frame before it, or
/// the GOAWAY that ended the connection first.
async fn server_answer(data: &[u8], frames: usize) -> Result<(), u32> {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        let mut conn = server_end(server_io).await;
        // The request's DATA is never read.
        let _held = conn.accept().await;
        while let Some(Ok(_)) = conn.accept().await {}
    });
    let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut wire, SETTINGS, 0, 0, &[]);
    frame(&mut wire, HEADERS, END_HEADERS, 1, &connect_block());
    for _ in 0..frames {
        frame(&mut wire, DATA, 0, 1, data);
    }
    frame(&mut wire, PING, 0, 0, &[7; 8]);
    let (mut from_server, mut to_server) = tokio::io::split(client_io);
    tokio::spawn(async move {
        let _ = to_server.write_all(&wire).await;
        // Open until the test ends: a closed end would end the connection.
        std::future::pending::<()>().await;
    });
    until_pong(&mut from_server).await
}

/// Toward a client likewise: a CONNECT's response followed by 50,000 one-byte DATA frames that
/// the client's app does not read, then a PING, answered.
#[tokio::test]
async fn unread_small_frames_leave_a_client_connection_up() {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        let (h2, conn) = client_end(client_io).await;
        tokio::spawn(conn);
        let mut h2 = h2.ready().await.unwrap();
        let request = http::Request::connect("127.0.0.1:8080").body(()).unwrap();
        let (response, _send) = h2.send_request(request, false).unwrap();
        // The response's DATA is never read.
        let _held = response.await;
        std::future::pending::<()>().await;
    });
    let (mut from_client, mut to_client) = tokio::io::split(server_io);
    let mut preface = [0u8; 24];
    from_client.read_exact(&mut preface).await.unwrap();
    let mut wire = Vec::new();
    frame(&mut wire, SETTINGS, 0, 0, &[]);
    to_client.write_all(&wire).await.unwrap();
    // The client's SETTINGS and window updates come first; then its request.
    while read_frame(&mut from_client).await.0 != HEADERS {}
    let mut wire = Vec::new();
    // `:status: 200`, indexed (RFC 7541 Appendix A, entry 8).
    frame(&mut wire, HEADERS, END_HEADERS, 1, &[0x88]);
    for _ in 0..UNREAD_FRAMES {
        frame(&mut wire, DATA, 0, 1, b"x");
    }
    frame(&mut wire, PING, 0, 0, &[7; 8]);
    tokio::spawn(async move {
        let _ = to_client.write_all(&wire).await;
        std::future::pending::<()>().await;
    });
    assert_eq!(until_pong(&mut from_client).await, Ok(()));
}

/// Unread one-byte DATA frames sent by the tests above: past h2's default budget under HBONE's
/// connection window (8 MiB / 255 bytes charged a frame = 32,896), within the 65,535-byte
/// stream window that holds until the peer acknowledges the SETTINGS (these peers never do).
const UNREAD_FRAMES: usize = 50_000;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

/// Appends an HTTP/2 frame (RFC 9113 §4.1) to `wire`.
fn frame(wire: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    wire.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    wire.extend_from_slice(&[kind, flags]);
    wire.extend_from_slice(&stream.to_be_bytes());
    wire.extend_from_slice(payload);
}

/// A CONNECT's header block: `:method` and `:authority` as literals with indexed names, not
/// indexed themselves (RFC 7541 §6.2.2; static table entries 2 and 1).
fn connect_block() -> Vec<u8> {
    let mut block = vec![0x02, 7];
    block.extend_from_slice(b"CONNECT");
    block.extend_from_slice(&[0x01, 14]);
    block.extend_from_slice(b"127.0.0.1:8080");
    block
}

/// The next frame's type, flags and payload.
async fn read_frame(from: &mut (impl AsyncRead + Unpin)) -> (u8, u8, Vec<u8>) {
    let mut head = [0u8; 9];
    from.read_exact(&mut head).await.expect("the peer closed");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    from.read_exact(&mut payload)
        .await
        .expect("the peer closed");
    (head[3], head[4], payload)
}

/// Reads frames until a PING's answer (`Ok`) or a GOAWAY (its error code).
async fn until_pong(from: &mut (impl AsyncRead + Unpin)) -> Result<(), u32> {
    let wait = async {
        loop {
            match read_frame(from).await {
                (PING, flags, _) if flags & ACK != 0 => return Ok(()),
                (GOAWAY, _, payload) => {
                    return Err(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .expect("no PING answer and no GOAWAY")
}

/// The server end of an HTTP/2 connection over `io`, with HBONE's settings. Serve it with
/// `while let Some(Ok(_)) = conn.accept().await`: after a connection error h2 returns the error
/// on every call, and a loop on `is_some()` would spin.
async fn server_end(
    io: tokio::io::DuplexStream,
) -> h2::server::Connection<tokio::io::DuplexStream, Bytes> {
    TunnelSettings::default()
        .server_builder()
        .handshake::<_, Bytes>(io)
        .await
        .unwrap()
}

/// The client end of an HTTP/2 connection over `io`, with HBONE's settings.
async fn client_end(
    io: tokio::io::DuplexStream,
) -> (
    h2::client::SendRequest<Bytes>,
    h2::client::Connection<tokio::io::DuplexStream, Bytes>,
) {
    TunnelSettings::default()
        .client_builder()
        .handshake::<_, Bytes>(io)
        .await
        .unwrap()
}
