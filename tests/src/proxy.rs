//! A TCP proxy in front of the broker whose connections can be cut at once, so that a test can
//! make a lapin client "die" (its socket dropped, no connection.close) while the broker lives.

use amq_protocol::uri::AMQPUri;
use std::sync::{Arc, Mutex};
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// A running proxy. Dropping it stops accepting and cuts every proxied connection.
#[derive(Debug)]
pub struct Proxy {
    url: String,
    accept: JoinHandle<()>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    /// Starts a proxy on 127.0.0.1 (a free port) forwarding to the broker of `broker_url`.
    ///
    /// # Panics
    /// When the URL cannot be parsed or the port cannot be bound.
    pub async fn start(broker_url: &str) -> Self {
        let mut uri: AMQPUri = broker_url.parse().expect("broker URL");
        let target = format!("{}:{}", uri.authority.host, uri.authority.port);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let links2 = links.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                links2.lock().expect("links").push(link);
            }
        });
        uri.authority.host = "127.0.0.1".to_owned();
        uri.authority.port = port;
        let url = format!(
            "amqp://{}:{}@127.0.0.1:{port}/{}",
            uri.authority.userinfo.username,
            uri.authority.userinfo.password,
            if uri.vhost == "/" {
                "%2F".to_owned()
            } else {
                uri.vhost.clone()
            }
        );
        Self { url, accept, links }
    }

    /// The URL to give lapin so that it goes through the proxy.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Cuts every proxied connection: both sockets are dropped, so the broker sees the client
    /// vanish without a connection.close.
    pub fn cut_all(&self) {
        for link in self.links.lock().expect("links").drain(..) {
            link.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}
