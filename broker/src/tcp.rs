//! Socket options Warren sets on its TCP connections: the broker's accepted sockets, and the
//! bench's lean load generator, which connects with the same options.

use tokio::net::TcpStream;

/// Tunes a connected TCP socket for AMQP on a test machine: small writes go out at once
/// (`TCP_NODELAY`; Warren batches its own writes), and a loopback connection uses the `reno`
/// congestion control instead of the system default.
///
/// Many Linux machines default to `bbr`, which paces what it sends with a timer per burst. On
/// loopback there is no bottleneck queue to spare, so the timer is pure cost (in a VM, arming
/// it traps to the hypervisor): on the bench's 4 KiB pubsub row it was a quarter of the
/// broker's CPU per message. `reno` is allowed to unprivileged processes on every Linux; where
/// setting it fails the default stays, and on other systems only `TCP_NODELAY` is set. Errors
/// are ignored: a socket that keeps its defaults still works.
///
/// # Example
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let stream = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
/// warren_broker::tcp::tune(&stream);
/// assert!(stream.nodelay()?);
/// # Ok(()) }
/// ```
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    #[cfg(any(target_os = "linux", target_os = "freebsd"))]
    if stream.peer_addr().is_ok_and(|peer| peer.ip().is_loopback()) {
        let _ = socket2::SockRef::from(stream).set_tcp_congestion(b"reno");
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// The congestion control a socket uses, without the kernel's NUL padding.
    fn congestion(stream: &TcpStream) -> Vec<u8> {
        let mut name = socket2::SockRef::from(stream).tcp_congestion().unwrap();
        name.retain(|b| *b != 0);
        name
    }

    #[tokio::test]
    async fn both_ends_of_a_loopback_connection_get_nodelay_and_reno() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let client = client.unwrap();
        let (server, _) = accepted.unwrap();
        for stream in [&client, &server] {
            // Start from another algorithm where one is allowed, so that the assertion
            // cannot pass on a machine whose default is already reno.
            let sock = socket2::SockRef::from(stream);
            let _ = sock
                .set_tcp_congestion(b"bbr")
                .or_else(|_| sock.set_tcp_congestion(b"cubic"));
            tune(stream);
            assert!(stream.nodelay().unwrap());
            assert_eq!(congestion(stream), b"reno");
        }
    }
}
