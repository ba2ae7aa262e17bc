//! HTTP routes: `/ws`, `/healthz`, `/metrics`, `/api/channels`, and the web page at `/`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{State, WebSocketUpgrade};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::{mpsc, oneshot};

use super::protocol::{Limits, Message, Timers, MAX_FRAME};
use crate::control::runner::HubMsg;
use crate::floor::FloorConfig;
use crate::metrics;
use crate::shard::{Command, ShardHandle};

/// What the routes need. Cloned per request (all handles).
#[derive(Clone)]
pub struct AppState {
    pub hub: mpsc::Sender<HubMsg>,
    pub shards: Vec<ShardHandle>,
    pub floor: FloorConfig,
    /// Connection ids. (A counter on the control thread only; not data-plane state.)
    pub next_conn: Arc<AtomicU64>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/ws", get(ws))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics_route))
        .route("/api/channels", get(channels))
        .with_state(state)
}

async fn index() -> Html<&'static str> {
    Html(include_str!("../../web/index.html"))
}

async fn ws(State(state): State<AppState>, upgrade: WebSocketUpgrade) -> Response {
    let conn = state.next_conn.fetch_add(1, Ordering::Relaxed);
    let hello = Message::Hello {
        protocol: 1,
        session: format!("s-{:08x}", rand::random::<u32>()),
        limits: Limits {
            max_frame: MAX_FRAME,
        },
        timers: Timers {
            t1_ms: state.floor.t1.as_millis() as u64,
            t2_ms: state.floor.t2.as_millis() as u64,
            t3_ms: state.floor.t3.as_millis() as u64,
        },
        ice_servers: vec![],
    };
    upgrade
        .max_message_size(1 << 20)
        // tungstenite's defaults (128 KiB read buffer, zero-filled per read) cost ≈ 145 KB and CPU per
        // connection; signaling frames are small.
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .on_upgrade(move |socket| super::ws::serve(socket, conn, state.hub, hello))
}

async fn ask<T>(
    hub: &mpsc::Sender<HubMsg>,
    make: impl FnOnce(oneshot::Sender<T>) -> HubMsg,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    hub.send(make(tx)).await.ok()?;
    tokio::time::timeout(Duration::from_secs(2), rx)
        .await
        .ok()?
        .ok()
}

async fn channels(State(state): State<AppState>) -> Response {
    match ask(&state.hub, |reply| HubMsg::Channels { reply }).await {
        Some(rows) => Json(rows).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "control thread busy").into_response(),
    }
}

async fn metrics_route(State(state): State<AppState>) -> Response {
    let Some(counters) = ask(&state.hub, |reply| HubMsg::Counters { reply }).await else {
        return (StatusCode::SERVICE_UNAVAILABLE, "control thread busy").into_response();
    };
    let mut shard_stats = Vec::new();
    for s in &state.shards {
        let (tx, rx) = flume::bounded(1);
        if s.commands.try_send(Command::Stats { reply: tx }).is_ok() {
            if let Ok(Ok(stats)) =
                tokio::time::timeout(Duration::from_secs(1), rx.recv_async()).await
            {
                shard_stats.push(stats);
            }
        }
    }
    let body = metrics::render(&counters, &shard_stats);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
