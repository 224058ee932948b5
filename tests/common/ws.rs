//! A websocket without the SDK, for tests that control every frame: a tungstenite
//! connection ([`raw_connect`], [`raw_next`], [`raw_send`]), the STATUS a peer opens a
//! link with ([`peer_status`]) and, below tungstenite, the bytes of a client frame
//! ([`masked_frame`]).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Frame opcodes (RFC 6455 section 5.2), for [`masked_frame`].
pub const CONTINUATION: u8 = 0x0;
/// A text frame.
pub const TEXT: u8 = 0x1;
/// A binary frame.
pub const BINARY: u8 = 0x2;
/// A close frame.
pub const CLOSE: u8 = 0x8;
/// A ping.
pub const PING: u8 = 0x9;
/// A pong.
pub const PONG: u8 = 0xA;

/// A raw websocket connection.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a websocket to `url`.
pub async fn raw_connect(url: &str) -> Ws {
    tokio_tungstenite::connect_async(url).await.expect("raw websocket connects").0
}

/// Sends `frame` as a text frame.
pub async fn raw_send(ws: &mut Ws, frame: &Value) {
    ws.send(Message::Text(frame.to_string())).await.expect("frame sent");
}

/// The STATUS with which a peer `node` (instance `instance`, of `cluster`) opens a link in
/// open mode: no functions, catalog version 1, an address nobody listens on. A test adds
/// or changes fields (`functions`, `auth`) before sending it.
pub fn peer_status(node: &str, instance: &str, cluster: &str) -> Value {
    json!({
        "role": "server", "kind": "status",
        "info": {"node": node, "instance_id": instance, "cluster_id": cluster, "url": "ws://127.0.0.1:9"},
        "functions": [], "catalog_version": 1
    })
}

/// The next data frame as JSON (pings and pongs skipped); `None` if the socket closed.
/// Panics if neither comes `within`.
pub async fn raw_next(ws: &mut Ws, within: Duration) -> Option<Value> {
    loop {
        let message = tokio::time::timeout(within, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no frame and no close within {within:?}"));
        match message {
            Some(Ok(Message::Text(text))) => return Some(serde_json::from_str(&text).expect("JSON frame")),
            Some(Ok(Message::Binary(bytes))) => return Some(serde_json::from_slice(&bytes).expect("JSON frame")),
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// The bytes of a client frame: `opcode`, FIN if `fin`, masked with a zero key (which
/// leaves the payload as is).
pub fn masked_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
    out
}
