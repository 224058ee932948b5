//! A TCP forwarder in front of a node, which a test can pause (while closed it accepts
//! nothing: dials reach the backlog and time out, so no link through it can form) and
//! cut (every connection through it drops at once, as when a network path breaks, while
//! new connections are still accepted), or half-cut (the dialer's side drops, the target's
//! side stays open and silent, as a partition leaves the far end of a connection).

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub url: String,
    open: watch::Sender<bool>,
    /// Bumped by [`Proxy::cut`]; each forwarded connection ends when it changes.
    cuts: watch::Sender<u64>,
    /// Bumped by [`Proxy::half_cut`].
    half_cuts: watch::Sender<u64>,
}

impl Proxy {
    /// The proxy's listener and URL, bound before the node behind it exists.
    pub async fn bind() -> (TcpListener, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let url = format!("ws://{}", listener.local_addr().expect("proxy address"));
        (listener, url)
    }

    /// A proxy to the node at `url` (`ws://ip:port`).
    pub async fn to(url: &str) -> Proxy {
        let (listener, proxy_url) = Proxy::bind().await;
        Proxy::start(listener, proxy_url, socket_of(url))
    }

    /// Forwards what `listener` accepts to `target`.
    pub fn start(listener: TcpListener, url: String, target: SocketAddr) -> Proxy {
        let (open, mut state) = watch::channel(true);
        let (cuts, cut) = watch::channel(0u64);
        let (half_cuts, half_cut) = watch::channel(0u64);
        actix_rt::spawn(async move {
            loop {
                if state.wait_for(|open| *open).await.is_err() {
                    return;
                }
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = state.changed() => continue,
                };
                let Ok((mut inbound, _)) = accepted else { return };
                let mut cut = cut.clone();
                cut.mark_unchanged();
                let mut half_cut = half_cut.clone();
                half_cut.mark_unchanged();
                actix_rt::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = cut.changed() => {}
                            _ = half_cut.changed() => {
                                drop(inbound);
                                // The target's side is held, read by nobody, until a cut.
                                let _ = cut.changed().await;
                            }
                        }
                    }
                });
            }
        });
        Proxy { url, open, cuts, half_cuts }
    }

    pub fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }

    /// Drops every connection through the proxy now; new ones are accepted.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Drops the dialer's side of every connection through the proxy now, and holds the
    /// target's side open without a byte either way: the target sees nothing happen.
    pub fn half_cut(&self) {
        self.half_cuts.send_modify(|n| *n += 1);
    }
}

pub fn socket_of(url: &str) -> SocketAddr {
    url.trim_start_matches("ws://").parse().expect("ws://ip:port")
}
