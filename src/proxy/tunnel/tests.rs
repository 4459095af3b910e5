//! Tests of `tunnel`: received frames let go of, vectored writes as one frame.

use super::*;

/// A vectored write (a TLS connection's records, inside the stream) goes out as one DATA
/// frame, its slices in order.
#[tokio::test]
async fn a_vectored_write_is_one_frame() {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        let mut conn = TunnelSettings::default()
            .server_builder()
            .handshake::<_, Bytes>(server_io)
            .await
            .unwrap();
        let (request, mut respond) = conn.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
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
    let (h2, conn) = TunnelSettings::default()
        .client_builder()
        .handshake::<_, Bytes>(client_io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let request = http::Request::post("http://tunnel/").body(()).unwrap();
    let (response, send) = h2.send_request(request, false).unwrap();
    let recv = response.await.unwrap().into_body();
    let mut stream = H2Stream::new(send, recv);
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
    let sizes: Vec<usize> = frames.iter().map(Bytes::len).filter(|&n| n > 0).collect();
    assert_eq!(sizes, [32_912], "one frame");
    assert_eq!(&frames[0][..], &[a, b, c].concat()[..]);
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
