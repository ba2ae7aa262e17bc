//! The operator's routes: `/healthz` (is the process alive), `/readyz` (should it get traffic),
//! `/metrics`, `POST /admin/drain`, and — testing only, behind `--fault-injection` —
//! `POST /admin/fault/panic-shard?shard=N`.
//!
//! Liveness is checked, not assumed: the control thread must answer within [`HEALTH_WAIT`], and so must
//! every shard, over its own command queue (the same `Stats` command `/metrics` uses, so a check costs
//! a copy of a few counters). A shard that panicked is named with its panic's message.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::{mpsc, oneshot};

use super::http::{check_admin, AppState};
use crate::control::runner::HubMsg;
use crate::control::Health;
use crate::metrics;
use crate::shard::{Command, ShardStats};

/// How long the control thread and each shard may take to answer a health check or a scrape.
pub const HEALTH_WAIT: Duration = Duration::from_secs(1);

/// Asks the control runner something, bounded by `wait` (a full inbox counts as no answer).
pub(super) async fn ask<T>(
    hub: &mpsc::Sender<HubMsg>,
    wait: Duration,
    make: impl FnOnce(oneshot::Sender<T>) -> HubMsg,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    tokio::time::timeout(wait, async {
        hub.send(make(tx)).await.ok()?;
        rx.await.ok()
    })
    .await
    .ok()
    .flatten()
}

/// Every shard's counters, asked for at once, each bounded by [`HEALTH_WAIT`]; `Err` says why a shard
/// gave none.
pub(super) async fn shard_stats(state: &AppState) -> Vec<Result<ShardStats, String>> {
    let asks = state.shards.iter().map(|s| async move {
        let (tx, rx) = flume::bounded(1);
        match s.commands.try_send(Command::Stats { reply: tx }) {
            Ok(()) => {}
            Err(flume::TrySendError::Full(_)) => {
                return Err(format!("shard {}: its command queue is full", s.index))
            }
            Err(flume::TrySendError::Disconnected(_)) => {
                return Err(format!("shard {}: not running", s.index))
            }
        }
        match tokio::time::timeout(HEALTH_WAIT, rx.recv_async()).await {
            Ok(Ok(stats)) => Ok(stats),
            Ok(Err(_)) => Err(format!("shard {}: not running", s.index)),
            Err(_) => Err(format!(
                "shard {}: no answer within {HEALTH_WAIT:?}",
                s.index
            )),
        }
    });
    futures_util::future::join_all(asks).await
}

/// What is wrong with the process, if anything: the control thread and every shard must answer.
async fn liveness(state: &AppState) -> (Option<Health>, Vec<String>) {
    // The shards first: a shard found dead while they are asked is in the control core's report by
    // the time it is read, named with its panic rather than as "no answer".
    let stats = shard_stats(state).await;
    let health = ask(&state.hub, HEALTH_WAIT, |reply| HubMsg::Health { reply }).await;
    let mut problems = Vec::new();
    let dead: Vec<usize> = match &health {
        Some(h) => {
            for (shard, reason) in &h.dead_shards {
                problems.push(format!("shard {shard}: panicked: {reason}"));
            }
            h.dead_shards.iter().map(|(s, _)| *s).collect()
        }
        None => {
            problems.push(format!("control thread: no answer within {HEALTH_WAIT:?}"));
            Vec::new()
        }
    };
    for (i, s) in stats.into_iter().enumerate() {
        if let Err(why) = s {
            if !dead.contains(&i) {
                problems.push(why);
            }
        }
    }
    (health, problems)
}

fn answer(problems: Vec<String>, ok: &'static str) -> Response {
    if problems.is_empty() {
        (StatusCode::OK, ok).into_response()
    } else {
        let mut body = problems.join("\n");
        body.push('\n');
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

/// `GET /healthz`: 200 `ok` while the control thread and every shard answer within a second; 503 with
/// one line per problem otherwise (a supervisor restarts the process).
pub(super) async fn healthz(State(state): State<AppState>) -> Response {
    let (_, problems) = liveness(&state).await;
    answer(problems, "ok\n")
}

/// `GET /readyz`: 200 `ready` when the node should get new clients — alive (as `/healthz`), not
/// draining, and its floor store reachable (Redis: the subscription is up); 503 naming why not.
pub(super) async fn readyz(State(state): State<AppState>) -> Response {
    let (health, mut problems) = liveness(&state).await;
    if let Some(h) = health {
        if h.draining {
            problems.push("draining: this node takes no new clients".into());
        }
        if !h.store_up {
            problems.push("floor store unreachable (Redis subscription down)".into());
        }
    }
    answer(problems, "ready\n")
}

/// `GET /metrics`: Prometheus text (OpenMetrics).
pub(super) async fn metrics_route(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(refused) = check_admin(&state, &headers) {
        return refused.into_response();
    }
    let Some(control) = ask(&state.hub, HEALTH_WAIT, |reply| HubMsg::Counters { reply }).await
    else {
        return (StatusCode::SERVICE_UNAVAILABLE, "control thread busy").into_response();
    };
    let shards: Vec<ShardStats> = shard_stats(&state)
        .await
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    let snapshot = metrics::Snapshot {
        control,
        shards,
        shard_count: state.shards.len(),
        // A few dozen reads of /proc: in-memory files, microseconds; not worth a blocking task.
        process: metrics::ProcessStats::read(),
    };
    let body = metrics::render(snapshot);
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response()
}

/// `POST /admin/drain`: the node drains (as on SIGTERM) and its process exits when the last client is
/// gone.
pub(super) async fn drain(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(refused) = check_admin(&state, &headers) {
        return refused.into_response();
    }
    match tokio::time::timeout(HEALTH_WAIT, state.hub.send(HubMsg::Drain)).await {
        Ok(Ok(())) => (StatusCode::ACCEPTED, "draining\n").into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "control thread busy").into_response(),
    }
}

/// `POST /admin/fault/panic-shard?shard=N` (only with `--fault-injection`, testing only): shard N panics.
pub(super) async fn panic_shard(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Err(refused) = check_admin(&state, &headers) {
        return refused.into_response();
    }
    let Some(faults) = &state.faults else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let shard = query.get("shard").and_then(|s| s.parse::<usize>().ok());
    match shard.and_then(|i| faults.get(i)) {
        Some(tx) => {
            let _ = tx.try_send(());
            (StatusCode::ACCEPTED, "shard told to panic\n").into_response()
        }
        None => (
            StatusCode::BAD_REQUEST,
            format!("?shard=N with N < {}\n", faults.len()),
        )
            .into_response(),
    }
}
