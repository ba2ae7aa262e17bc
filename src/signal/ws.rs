//! One WebSocket connection: parse frames, hand them to the hub, write what the hub queues.
//!
//! The writer half keeps a bounded queue; the hub disconnects a client whose queue is full. The server
//! pings every 15 s and drops a connection silent for 45 s (protocol v1).

use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};

use super::protocol::{self, Message, SignalError, MAX_FRAME};
use crate::control::runner::{HubMsg, OUTBOUND_QUEUE};
use crate::ids::ConnId;

const PING_EVERY: Duration = Duration::from_secs(15);
const SILENCE_LIMIT: Duration = Duration::from_secs(45);

/// Serves one connection until either side closes it.
pub async fn serve(socket: WebSocket, conn: ConnId, hub: mpsc::Sender<HubMsg>, hello: Message) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<String>(OUTBOUND_QUEUE);
    let (close_tx, mut close_rx) = oneshot::channel::<()>();
    if sink
        .send(WsMessage::Text(hello.to_json().into()))
        .await
        .is_err()
    {
        return;
    }
    if hub
        .send(HubMsg::Connect {
            conn,
            tx,
            close: close_tx,
        })
        .await
        .is_err()
    {
        return;
    }
    let writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                text = rx.recv() => match text {
                    Some(text) => {
                        if sink.send(WsMessage::Text(text.into())).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
                _ = ping.tick() => {
                    if sink.send(WsMessage::Ping(Vec::new().into())).await.is_err() {
                        break;
                    }
                }
                _ = &mut close_rx => {
                    // The hub closed us: flush what it queued (e.g. `left`, `too_large`), then close.
                    while let Ok(text) = rx.try_recv() {
                        if sink.send(WsMessage::Text(text.into())).await.is_err() {
                            break;
                        }
                    }
                    let _ = sink.send(WsMessage::Close(None)).await;
                    break;
                }
            }
        }
    });
    loop {
        let next = tokio::time::timeout(SILENCE_LIMIT, stream.next()).await;
        let msg = match next {
            Ok(Some(Ok(msg))) => msg,
            // Silent for too long, closed, or broken.
            _ => break,
        };
        let hub_msg = match msg {
            WsMessage::Text(text) if text.len() > MAX_FRAME => HubMsg::TooLarge { conn },
            WsMessage::Text(text) => HubMsg::Frame {
                conn,
                frame: protocol::parse(&text),
            },
            WsMessage::Binary(b) if b.len() > MAX_FRAME => HubMsg::TooLarge { conn },
            WsMessage::Binary(_) => HubMsg::Frame {
                conn,
                frame: Err((
                    None,
                    SignalError::bad_request("binary frames are not supported; send JSON text"),
                )),
            },
            WsMessage::Close(_) => break,
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
        };
        let too_large = matches!(hub_msg, HubMsg::TooLarge { .. });
        if hub.send(hub_msg).await.is_err() || too_large {
            break;
        }
    }
    let _ = hub.send(HubMsg::Disconnect { conn }).await;
    // The writer ends when the hub drops the connection (close signal) or the socket fails.
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}
