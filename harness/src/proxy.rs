//! A TCP proxy for fault injection between a client and any broker (embedded or RabbitMQ):
//! sever every connection at once, stall (stop forwarding), delay, or cut one direction.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A direction of traffic through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// From the client to the broker.
    ToBroker,
    /// From the broker to the client.
    ToClient,
}

/// The faults in force.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Faults {
    stalled: bool,
    delay: Duration,
    drop_to_broker: bool,
    drop_to_client: bool,
}

/// A running proxy. Dropping it stops accepting and severs every proxied connection.
///
/// ```no_run
/// # async fn demo() {
/// use warren_harness::{Proxy, TestBroker};
/// let broker = TestBroker::start().await;
/// let proxy = Proxy::start(broker.url()).await;
/// let conn = lapin::Connection::connect(proxy.url(), Default::default()).await.unwrap();
/// proxy.sever_all(); // the broker sees the client vanish, as if its machine died
/// # let _ = conn;
/// # }
/// ```
#[derive(Debug)]
pub struct Proxy {
    url: String,
    faults: watch::Sender<Faults>,
    accept: JoinHandle<()>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

/// `amqp://user:pass@HOST:PORT/vhost` with the authority's host and port replaced.
fn with_authority(url: &str, host_port: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", url));
    let (userinfo, after) = match rest.split_once('@') {
        Some((user, after)) => (format!("{user}@"), after),
        None => (String::new(), rest),
    };
    let path = after.find(['/', '?']).map(|i| &after[i..]).unwrap_or("");
    format!("{scheme}://{userinfo}{host_port}{path}")
}

/// The `host:port` of an AMQP URL (port 5672 when absent).
fn authority(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let after = rest.split_once('@').map(|(_, a)| a).unwrap_or(rest);
    let end = after.find(['/', '?']).unwrap_or(after.len());
    let host_port = &after[..end];
    if host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host_port.to_owned()
    } else {
        format!("{host_port}:5672")
    }
}

impl Proxy {
    /// Starts a proxy on 127.0.0.1 (a free port) forwarding to the broker of `broker_url`.
    ///
    /// # Panics
    /// When no local port can be bound.
    pub async fn start(broker_url: &str) -> Self {
        let target = authority(broker_url);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let local = listener.local_addr().expect("proxy address");
        let (faults, faults_rx) = watch::channel(Faults::default());
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn(accept_loop(listener, target, faults_rx, links.clone()));
        Self {
            url: with_authority(broker_url, &local.to_string()),
            faults,
            accept,
            links,
        }
    }

    /// The URL to connect through the proxy (same credentials and vhost).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Severs every proxied connection at once: both sockets close without a word, so each
    /// side sees its peer vanish (no connection.close). New connections are still accepted.
    pub fn sever_all(&self) {
        for link in self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            link.abort();
        }
    }

    /// Stops forwarding in both directions (bytes wait in the proxy) until [`Proxy::resume`].
    pub fn stall(&self) {
        self.faults.send_modify(|f| f.stalled = true);
    }

    /// Forwards again after [`Proxy::stall`].
    pub fn resume(&self) {
        self.faults.send_modify(|f| f.stalled = false);
    }

    /// Holds every chunk of data this long before forwarding it (zero: no delay).
    pub fn set_delay(&self, delay: Duration) {
        self.faults.send_modify(|f| f.delay = delay);
    }

    /// Silently drops all traffic in one direction (a one-way partition) until
    /// [`Proxy::restore`].
    pub fn cut(&self, flow: Flow) {
        self.faults.send_modify(|f| match flow {
            Flow::ToBroker => f.drop_to_broker = true,
            Flow::ToClient => f.drop_to_client = true,
        });
    }

    /// Lifts every fault: no stall, no delay, no cut direction.
    pub fn restore(&self) {
        self.faults.send_replace(Faults::default());
    }

    /// Proxied connections still open.
    pub fn open_connections(&self) -> usize {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        links.retain(|l| !l.is_finished());
        links.len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.sever_all();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: String,
    faults: watch::Receiver<Faults>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    while let Ok((inbound, _)) = listener.accept().await {
        let target = target.clone();
        let faults = faults.clone();
        let link = tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(&target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (client_rd, client_wr) = inbound.into_split();
            let (broker_rd, broker_wr) = outbound.into_split();
            // Either direction ending ends the link, closing both sockets.
            tokio::select! {
                _ = pump(client_rd, broker_wr, Flow::ToBroker, faults.clone()) => {}
                _ = pump(broker_rd, client_wr, Flow::ToClient, faults) => {}
            }
        });
        let mut list = links.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|l| !l.is_finished());
        list.push(link);
    }
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    flow: Flow,
    mut faults: watch::Receiver<Faults>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let current = *faults.borrow_and_update();
        if !current.delay.is_zero() {
            tokio::time::sleep(current.delay).await;
        }
        while faults.borrow().stalled {
            if faults.changed().await.is_err() {
                return;
            }
        }
        let dropped = match flow {
            Flow::ToBroker => faults.borrow().drop_to_broker,
            Flow::ToClient => faults.borrow().drop_to_client,
        };
        if !dropped && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_rewritten_to_the_proxy() {
        assert_eq!(
            with_authority("amqp://guest:guest@127.0.0.1:5672/%2F", "127.0.0.1:4000"),
            "amqp://guest:guest@127.0.0.1:4000/%2F"
        );
        assert_eq!(
            with_authority("amqp://localhost", "127.0.0.1:4000"),
            "amqp://127.0.0.1:4000"
        );
        assert_eq!(
            authority("amqp://guest:guest@127.0.0.1:5673/%2F"),
            "127.0.0.1:5673"
        );
        assert_eq!(authority("amqp://rabbit/%2F"), "rabbit:5672");
    }
}
