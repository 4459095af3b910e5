//! The echo app of the benches that hold more connections than one process may have
//! descriptors (`soak`, `scale`): run as a child process inside the server pod's namespace.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

/// The echo app (child mode): echoes every connection on `[::]:port` until killed.
pub(crate) fn serve(port: u16) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(("::", port)).await.unwrap();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}
