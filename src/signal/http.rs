//! HTTP routes: `/ws`, `/api/channels`, the web page at `/`, and the operator's routes of [`super::ops`]
//! (`/healthz`, `/readyz`, `/metrics`, `/admin/drain`).
//!
//! With tokens on, `/api/*` and `/metrics` need `Authorization: Bearer <token>` with the `admin` right —
//! or they move to a separate `--admin-http` listener (reachable only from the operator's network) and
//! leave the public one; and a WebSocket upgrade from a browser must come from an allowed origin.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Query, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::mpsc;

use super::ops::{self, ask};
use super::protocol::MAX_FRAME;
use crate::auth::{Limits, Verifier};
use crate::control::runner::HubMsg;
use crate::floor::FloorConfig;
use crate::shard::ShardHandle;

/// What the routes need. Cloned per request (all handles).
#[derive(Clone)]
pub struct AppState {
    /// The control runner's inbox.
    pub hub: mpsc::Sender<HubMsg>,
    /// The shards (for their counters).
    pub shards: Vec<ShardHandle>,
    /// Floor timers, announced in `hello`.
    pub floor: FloorConfig,
    /// Connection ids. (A counter on the control thread only; not data-plane state.)
    #[allow(clippy::disallowed_types)] // control plane only, see clippy.toml
    pub next_conn: Arc<AtomicU64>,
    /// Token keys; `None`: the server runs open.
    pub auth: Option<Verifier>,
    /// Origins allowed to open the WebSocket when tokens are on (empty: the page's own host only).
    pub allowed_origins: Arc<Vec<String>>,
    /// Per-client limits (the WebSocket's send timeout and queue).
    pub limits: Limits,
    /// Where recordings are (`--record`/`--record-dir`), if anywhere.
    pub record_dir: Option<std::path::PathBuf>,
    /// Testing only (`--fault-injection`): a message to shard i's sender makes it panic.
    pub faults: Option<Arc<Vec<flume::Sender<()>>>>,
}

/// The public router: the page, the WebSocket, health — and, unless `admin` is separate, the admin
/// routes behind the admin token.
pub fn router(state: AppState, admin_separate: bool) -> Router {
    let r = Router::new()
        .route("/", get(index))
        .route("/ws", get(ws))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz));
    let r = if admin_separate {
        r
    } else {
        admin_routes(r, &state)
    };
    r.with_state(state)
}

/// The routes that need the admin right (or the separate admin address).
fn admin_routes(r: Router<AppState>, state: &AppState) -> Router<AppState> {
    let r = r
        .route("/metrics", get(ops::metrics_route))
        .route("/api/channels", get(channels))
        .route("/api/channels/{channel}/history", get(history))
        .route("/api/channels/{channel}/recording", post(set_recording))
        .route("/api/recordings/{channel}/{file}", get(recording))
        .route("/admin/drain", post(ops::drain));
    if state.faults.is_some() {
        r.route("/admin/fault/panic-shard", post(ops::panic_shard))
    } else {
        r
    }
}

/// The `--admin-http` router: metrics and the API without a token (the address is the protection).
pub fn admin_router(state: AppState) -> Router {
    let state = AppState {
        auth: None,
        ..state
    };
    let r = Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz));
    admin_routes(r, &state).with_state(state)
}

async fn index() -> Html<&'static str> {
    Html(include_str!("../../web/index.html"))
}

/// Unix time now, in seconds (tokens carry Unix times).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A refused request: the status and a message naming why.
type Refusal = (StatusCode, String);

/// With tokens on, an admin route needs a bearer token with the `admin` right.
pub(super) fn check_admin(state: &AppState, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(verifier) = &state.auth else {
        return Ok(());
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    let Some(token) = bearer else {
        return Err((
            StatusCode::UNAUTHORIZED,
            "unauthorized: this route needs Authorization: Bearer <token with the admin right>"
                .into(),
        ));
    };
    match verifier.verify(token.trim(), unix_now()) {
        Ok(claims) if claims.tg.admin => Ok(()),
        Ok(_) => Err((
            StatusCode::FORBIDDEN,
            "unauthorized: the token does not have the admin right".into(),
        )),
        Err(e) => Err((StatusCode::UNAUTHORIZED, format!("unauthorized: {e}"))),
    }
}

/// With tokens on, a browser's upgrade must come from an allowed origin (a page elsewhere must not use a
/// visitor's session). Clients that send no `Origin` (not browsers) are let through: they cannot be
/// tricked into connecting.
fn check_origin(state: &AppState, headers: &HeaderMap) -> Result<(), Refusal> {
    if state.auth.is_none() {
        return Ok(());
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|h| h.to_str().ok()) else {
        return Ok(());
    };
    let allowed = if state.allowed_origins.is_empty() {
        // The page's own host: `Origin: http://host:port` against `Host: host:port`.
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
        host == Some(origin_host)
    } else {
        state.allowed_origins.iter().any(|o| o == origin)
    };
    if allowed {
        Ok(())
    } else {
        Err((
            StatusCode::FORBIDDEN,
            format!("origin {origin:?} is not allowed to open a WebSocket here (--allowed-origin)"),
        ))
    }
}

async fn ws(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if let Err(refused) = check_origin(&state, &headers) {
        return refused.into_response();
    }
    let conn = state.next_conn.fetch_add(1, Ordering::Relaxed);
    let limits = state.limits.clone();
    upgrade
        // The transport refuses a message over the protocol's limit before it is buffered whole; the
        // connection answers `too_large` and closes (see `ws.rs`).
        .max_message_size(MAX_FRAME)
        .max_frame_size(MAX_FRAME)
        // tungstenite's defaults (128 KiB read buffer, zero-filled per read) cost ≈ 145 KB and CPU per
        // connection; signaling frames are small.
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .on_upgrade(move |socket| super::ws::serve(socket, conn, peer.ip(), state.hub, limits))
}

async fn channels(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(refused) = check_admin(&state, &headers) {
        return refused.into_response();
    }
    match ask(&state.hub, Duration::from_secs(2), |reply| {
        HubMsg::Channels { reply }
    })
    .await
    {
        Some(rows) => Json(rows).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "control thread busy").into_response(),
    }
}

/// `?limit=50&before=EPOCH` of the history route.
#[derive(serde::Deserialize)]
struct HistoryQuery {
    limit: Option<usize>,
    before: Option<u64>,
}

/// Most bursts one history request returns.
const HISTORY_LIMIT: usize = 1000;

async fn history(
    State(state): State<AppState>,
    Path(channel): Path<String>,
    Query(q): Query<HistoryQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = check_admin(&state, &headers) {
        return refused.into_response();
    }
    if let Err(e) = super::protocol::validate_name("channel", &channel) {
        return (StatusCode::BAD_REQUEST, e.message).into_response();
    }
    let limit = q.limit.unwrap_or(50).clamp(1, HISTORY_LIMIT);
    let ask = |reply| HubMsg::History {
        channel,
        limit,
        before: q.before,
        reply,
    };
    match ops::ask(&state.hub, Duration::from_secs(2), ask).await {
        Some(Ok(bursts)) => Json(bursts).into_response(),
        Some(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "control thread busy").into_response(),
    }
}

/// Body of `POST /api/channels/{channel}/recording`.
#[derive(serde::Deserialize)]
struct RecordingSwitch {
    record: bool,
}

/// Turns a channel's recording on or off (`{"record": true}`).
async fn set_recording(
    State(state): State<AppState>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    Json(body): Json<RecordingSwitch>,
) -> Response {
    if let Err(refused) = check_admin(&state, &headers) {
        return refused.into_response();
    }
    if let Err(e) = super::protocol::validate_name("channel", &channel) {
        return (StatusCode::BAD_REQUEST, e.message).into_response();
    }
    if state.record_dir.is_none() {
        return (
            StatusCode::CONFLICT,
            "recording is off on this node: start it with --record DIR or --record-dir DIR",
        )
            .into_response();
    }
    let msg = HubMsg::SetRecording {
        channel,
        on: body.record,
    };
    match state.hub.send(msg).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "control thread gone").into_response(),
    }
}

/// `GET /api/recordings/{channel}/{epoch}.ogg`: a finished recording.
async fn recording(
    State(state): State<AppState>,
    Path((channel, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = check_admin(&state, &headers) {
        return refused.into_response();
    }
    let Some(dir) = &state.record_dir else {
        return (StatusCode::NOT_FOUND, "recording is off on this node").into_response();
    };
    // Only `{epoch}.ogg` of a valid channel name: nothing else of the disk is reachable.
    let epoch = file
        .strip_suffix(".ogg")
        .and_then(|e| e.parse::<u64>().ok());
    let (Ok(()), Some(epoch)) = (super::protocol::validate_name("channel", &channel), epoch) else {
        return (StatusCode::NOT_FOUND, "no such recording").into_response();
    };
    let path = crate::record::recording_path(dir, &channel, epoch);
    match tokio::fs::read(&path).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, "audio/ogg")], bytes).into_response(),
        Err(_) => (StatusCode::NOT_FOUND, "no such recording (on this node)").into_response(),
    }
}
