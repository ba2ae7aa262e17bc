//! One WebSocket connection: parse frames, hand them to the control runner, write what it queues.
//!
//! The outbound queue is bounded in bytes ([`Outbound`]): the runner disconnects a client whose queue is
//! over the limit instead of buffering without bound. Each write has a deadline (`send_timeout`): a
//! client that stops reading loses its socket and its writer task, and their memory returns, within
//! that time — also after the control plane has closed it. The server pings every 15 s and drops a
//! connection silent for 45 s (protocol v1). A message over 64 KiB is refused by the transport before it
//! is buffered, answered `too_large`, and the connection closed.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};

use super::protocol::{self, SignalError};
use crate::auth::Limits;
use crate::control::runner::{HubMsg, Outbound};
use crate::ids::ConnId;

const PING_EVERY: Duration = Duration::from_secs(15);
const SILENCE_LIMIT: Duration = Duration::from_secs(45);

/// Serves one connection until either side closes it.
pub async fn serve(
    socket: WebSocket,
    conn: ConnId,
    ip: IpAddr,
    hub: mpsc::Sender<HubMsg>,
    limits: Limits,
) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    #[allow(clippy::disallowed_types)] // see `Outbound`
    let queued = Arc::new(AtomicUsize::new(0));
    let (close_tx, mut close_rx) = oneshot::channel::<()>();
    let send_timeout = limits.send_timeout;
    let out = Outbound::new(tx, queued.clone());
    let connect = HubMsg::Connect {
        conn,
        ip,
        out,
        close: close_tx,
    };
    if hub.send(connect).await.is_err() {
        return;
    }
    let mut writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                text = rx.recv() => match text {
                    Some(text) => {
                        let len = text.len();
                        let ok = write(&mut sink, send_timeout, WsMessage::Text(text.into())).await;
                        queued.fetch_sub(len, Ordering::Relaxed);
                        if !ok {
                            break;
                        }
                    }
                    None => break,
                },
                _ = ping.tick() => {
                    if !write(&mut sink, send_timeout, WsMessage::Ping(Vec::new().into())).await {
                        break;
                    }
                }
                _ = &mut close_rx => {
                    // The control plane closed us: flush what it queued (e.g. `left`, `too_large`), then
                    // close — each write still bounded.
                    while let Ok(text) = rx.try_recv() {
                        if !write(&mut sink, send_timeout, WsMessage::Text(text.into())).await {
                            return;
                        }
                    }
                    let _ = write(&mut sink, send_timeout, WsMessage::Close(None)).await;
                    break;
                }
            }
        }
    });
    let mut writer_done = false;
    // A WebSocket close is a goodbye; anything else (an error, silence, the writer giving up on a client
    // that does not read) is a drop, which the session survives for the resume window.
    let mut clean = false;
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(SILENCE_LIMIT, stream.next()) => next,
            // The writer gave up (closed by us, or a client that does not read): stop reading too.
            _ = &mut writer => {
                writer_done = true;
                break;
            }
        };
        let msg = match next {
            Ok(Some(Ok(msg))) => msg,
            Ok(Some(Err(e))) if is_too_large(&e) => {
                let _ = hub.send(HubMsg::TooLarge { conn }).await;
                break;
            }
            // Silent for too long, closed, or broken.
            _ => break,
        };
        let hub_msg = match msg {
            WsMessage::Text(text) => HubMsg::Frame {
                conn,
                frame: protocol::parse(&text),
            },
            WsMessage::Binary(_) => HubMsg::Frame {
                conn,
                frame: Err((
                    None,
                    SignalError::bad_request("binary frames are not supported; send JSON text"),
                )),
            },
            WsMessage::Close(_) => {
                clean = true;
                break;
            }
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
        };
        if hub.send(hub_msg).await.is_err() {
            break;
        }
    }
    let _ = hub.send(HubMsg::Disconnect { conn, clean }).await;
    // The writer ends when the control plane drops the connection (close signal) or a write times out.
    if !writer_done {
        let _ = tokio::time::timeout(send_timeout + Duration::from_secs(1), writer).await;
    }
}

type Sink = futures_util::stream::SplitSink<WebSocket, WsMessage>;

/// Writes one message within `limit`: a client that does not read loses its socket.
async fn write(sink: &mut Sink, limit: Duration, msg: WsMessage) -> bool {
    matches!(
        tokio::time::timeout(limit, sink.send(msg)).await,
        Ok(Ok(()))
    )
}

/// Whether a read failed because the message was over the transport's size limit (tungstenite's
/// `Error::Capacity`, which axum passes on only as a boxed error: its text is what can be matched).
fn is_too_large(e: &axum::Error) -> bool {
    e.to_string().contains("Space limit exceeded")
}
