//! One task per WebSocket connection, each joining up to `members_per_ws` members (one per channel: a
//! connection is one member of each channel it joins), then carrying `ptt` presses and releases and
//! routing floor events back to the channel controllers.
//!
//! Press and release are timestamped right before the frame is written, so press→granted is the server's
//! round trip plus the socket, not queueing inside the harness.

use crate::model::{channel_name, ChannelShared};
use crate::protocol::{
    join_frame, parse_floor, parse_joined_rtp, ptt_frame, ConnCmd, ConnNote, FloorEv, FloorMsg,
    FrameCounts, JoinSpec, JoinedRtp, Timers,
};
use crate::sys::mono_ns;
use crate::webrtc::engine::EngineCmd;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio_tungstenite::tungstenite::Message;

/// Everything a connection task needs.
pub struct ConnCtx {
    /// One WebSocket URL per node; slot `s` of every channel joins node `s % urls.len()`.
    pub urls: Vec<String>,
    pub prefix: String,
    pub presence: bool,
    pub channels: Arc<Vec<ChannelShared>>,
    pub to_ctrl: Arc<Vec<UnboundedSender<FloorMsg>>>,
    pub notes: UnboundedSender<ConnNote>,
    /// Connections joining at once: thousands of simultaneous handshakes would only measure the backlog.
    pub join_limit: Arc<tokio::sync::Semaphore>,
    /// Frames received after joining, by kind: what the signaling costs.
    pub frames: FrameCounts,
    /// The WebRTC engine, which takes the SDP answers.
    pub webrtc: Option<std::sync::mpsc::Sender<EngineCmd>>,
}

/// tungstenite zero-fills its whole read buffer (128 KiB by default) before every read, even one that
/// finds nothing: with hundreds of connections that memset was a third of the harness's signaling CPU.
/// Frames here are small, so 4 KiB reads lose nothing.
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_json(ws: &mut Ws) -> Result<Value, String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(t.as_str())
                    .map_err(|e| format!("bad JSON from server: {e}: {t}"))
            }
            Some(Ok(Message::Close(f))) => return Err(format!("closed by server: {f:?}")),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("websocket: {e}")),
            None => return Err("websocket closed".into()),
        }
    }
}

/// Connect, join `specs` (following `redirect` to a channel's home node), then serve commands until
/// `Close`. A connection whose channels live on several nodes holds one WebSocket per node; a command
/// goes to the one that joined its channel.
pub async fn run_conn(
    ctx: Arc<ConnCtx>,
    specs: Vec<JoinSpec>,
    mut cmds: UnboundedReceiver<ConnCmd>,
) {
    let permit = ctx.join_limit.clone().acquire_owned().await;
    let setup_result = setup(&ctx, &specs).await;
    drop(permit);
    let (sockets, home) = match setup_result {
        Ok((sockets, home, joined, timers)) => {
            let _ = ctx.notes.send(ConnNote::Joined(joined, timers));
            (sockets, home)
        }
        Err(e) => {
            let _ = ctx.notes.send(ConnNote::Failed(e));
            return;
        }
    };
    // One reader per socket, all into one queue: (socket, text or why it ended).
    let (in_tx, mut incoming) = tokio::sync::mpsc::unbounded_channel::<Result<String, String>>();
    let mut sinks = Vec::new();
    for ws in sockets {
        let (sink, mut stream) = ws.split();
        sinks.push(sink);
        let in_tx = in_tx.clone();
        tokio::spawn(async move {
            loop {
                let item = match stream.next().await {
                    Some(Ok(Message::Text(t))) => Ok(t.to_string()),
                    Some(Ok(Message::Close(f))) => Err(format!("closed by server: {f:?}")),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => Err(format!("websocket: {e}")),
                    None => Err("websocket closed".into()),
                };
                let end = item.is_err();
                if in_tx.send(item).is_err() || end {
                    return;
                }
            }
        });
    }
    drop(in_tx);
    // channel name → (channel index, slot)
    let by_name: HashMap<String, (u32, u16)> = specs
        .iter()
        .map(|s| (channel_name(&ctx.prefix, s.channel), (s.channel, s.slot)))
        .collect();
    // channel index → the socket that joined it
    let socket_of: HashMap<u32, usize> = specs
        .iter()
        .zip(&home)
        .map(|(s, h)| (s.channel, *h))
        .collect();
    let mut pressed_at: HashMap<u32, u64> = HashMap::new();
    let mut released_at: HashMap<u32, u64> = HashMap::new();
    loop {
        tokio::select! {
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { break };
                let (frame, ch) = match cmd {
                    ConnCmd::Press { channel } => {
                        (ptt_frame(&ctx.prefix, channel, true), Some((channel, true, false)))
                    }
                    ConnCmd::Release { channel, time_switch } => {
                        (ptt_frame(&ctx.prefix, channel, false), Some((channel, false, time_switch)))
                    }
                    ConnCmd::Close => {
                        for sink in &mut sinks {
                            let _ = sink.close().await;
                        }
                        return;
                    }
                };
                let mut to = 0;
                if let Some((channel, press, time_switch)) = ch {
                    to = socket_of.get(&channel).copied().unwrap_or(0);
                    let now = mono_ns();
                    if press {
                        pressed_at.insert(channel, now);
                    } else {
                        released_at.insert(channel, now);
                        if time_switch {
                            if let Some(c) = ctx.channels.get(channel as usize) {
                                c.switch_from_ns.store(now, Ordering::Release);
                            }
                        }
                    }
                }
                if let Err(e) = sinks[to].send(Message::text(frame)).await {
                    let _ = ctx.notes.send(ConnNote::Lost(format!("websocket send: {e}")));
                    return;
                }
            }
            msg = incoming.recv() => {
                let text = match msg {
                    Some(Ok(t)) => t,
                    Some(Err(e)) => {
                        let _ = ctx.notes.send(ConnNote::Lost(e));
                        return;
                    }
                    None => {
                        let _ = ctx.notes.send(ConnNote::Lost("websocket closed".into()));
                        return;
                    }
                };
                let now = mono_ns();
                let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                    let _ = ctx.notes.send(ConnNote::ServerError(format!("bad JSON: {text}")));
                    continue;
                };
                ctx.frames.count(&v);
                match v.get("type").and_then(Value::as_str) {
                    Some("floor") => {
                        let Some(&(channel, slot)) = v.get("channel").and_then(Value::as_str).and_then(|n| by_name.get(n)) else {
                            continue;
                        };
                        let Some(mut ev) = parse_floor(&v) else { continue };
                        // Only the member the controller is driving matters; listeners' copies are noise.
                        let driving = ctx.channels.get(channel as usize).map(|c| c.speaker_slot.load(Ordering::Acquire));
                        if driving != Some(slot as u32) {
                            continue;
                        }
                        match &mut ev {
                            FloorEv::Granted { press_ns } => *press_ns = pressed_at.remove(&channel).map(|t| now.saturating_sub(t)),
                            FloorEv::Idle { release_ns } => *release_ns = released_at.remove(&channel).map(|t| now.saturating_sub(t)),
                            _ => {}
                        }
                        if let Some(tx) = ctx.to_ctrl.get(channel as usize) {
                            let _ = tx.send(FloorMsg { slot, ev });
                        }
                    }
                    Some("error") => {
                        let _ = ctx.notes.send(ConnNote::ServerError(text.to_string()));
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Opens a WebSocket to `url` and reads its `hello`.
async fn open(url: &str) -> Result<(Ws, Timers), String> {
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true),
    )
    .await
    .map_err(|_| format!("connect {url}: timed out"))?
    .map_err(|e| format!("connect {url}: {e}"))?;
    let hello = tokio::time::timeout(Duration::from_secs(5), next_json(&mut ws))
        .await
        .map_err(|_| "no hello frame within 5 s".to_string())??;
    if hello.get("type").and_then(Value::as_str) != Some("hello") {
        return Err(format!("first frame is not hello: {hello}"));
    }
    if hello.get("protocol").and_then(Value::as_u64) != Some(1) {
        return Err(format!(
            "server speaks protocol {:?}, the harness speaks 1",
            hello.get("protocol")
        ));
    }
    let timers = Timers {
        t1_ms: hello
            .pointer("/timers/t1_ms")
            .and_then(Value::as_u64)
            .unwrap_or(4000),
        t2_ms: hello
            .pointer("/timers/t2_ms")
            .and_then(Value::as_u64)
            .unwrap_or(30_000),
    };
    Ok((ws, timers))
}

/// Joins `specs` over sockets opened as needed: the first to the slot's node, then one per node a
/// `redirect` names (one hop: a redirect from a node we were sent to is an error). Returns the sockets,
/// the socket each spec joined on, what was joined, and the timers.
async fn setup(
    ctx: &ConnCtx,
    specs: &[JoinSpec],
) -> Result<(Vec<Ws>, Vec<usize>, Vec<JoinedRtp>, Timers), String> {
    // A connection carries one slot of several channels: it starts on that slot's node.
    let slot = specs.first().map(|s| s.slot).unwrap_or(0);
    let url =
        ctx.urls[crate::cluster::node_of(slot as u32, ctx.urls.len() as u32) as usize].clone();
    let (ws, timers) = open(&url).await?;
    let mut sockets = vec![ws];
    let mut home = vec![0usize; specs.len()];
    let mut joined: Vec<Option<JoinedRtp>> = vec![None; specs.len()];
    let all: Vec<usize> = (0..specs.len()).collect();
    let mut redirected = join_on(ctx, &mut sockets[0], specs, &all, &mut joined, true).await?;
    let mut urls: Vec<String> = vec![url];
    while let Some((to, _)) = redirected.first().cloned() {
        let group: Vec<usize> = redirected
            .iter()
            .filter(|(u, _)| *u == to)
            .map(|(_, i)| *i)
            .collect();
        redirected.retain(|(u, _)| *u != to);
        let k = match urls.iter().position(|u| *u == to) {
            Some(k) => k,
            None => {
                let (ws, _) = open(&to).await?;
                sockets.push(ws);
                urls.push(to.clone());
                sockets.len() - 1
            }
        };
        for &i in &group {
            home[i] = k;
        }
        let again = join_on(ctx, &mut sockets[k], specs, &group, &mut joined, false).await?;
        if let Some((u, i)) = again.first() {
            return Err(format!(
                "channel {} redirected twice (to {u} after {to})",
                channel_name(&ctx.prefix, specs[*i].channel)
            ));
        }
    }
    Ok((
        sockets,
        home,
        joined.into_iter().flatten().collect(),
        timers,
    ))
}

/// Sends one `join` (its `id` is the spec's index, to match the answer).
async fn send_join(ctx: &ConnCtx, ws: &mut Ws, spec: &JoinSpec, i: usize) -> Result<(), String> {
    ws.send(Message::text(join_frame(
        &ctx.prefix,
        spec,
        ctx.presence,
        i,
    )))
    .await
    .map_err(|e| format!("send join: {e}"))
}

/// Sends the joins of `which` on `ws` and reads their answers: `joined` fills `joined`, a `redirect`
/// (when `follow`) is returned as (url, spec), anything else refused is an error.
async fn join_on(
    ctx: &ConnCtx,
    ws: &mut Ws,
    specs: &[JoinSpec],
    which: &[usize],
    joined: &mut [Option<JoinedRtp>],
    follow: bool,
) -> Result<Vec<(String, usize)>, String> {
    for &i in which {
        send_join(ctx, ws, &specs[i], i).await?;
    }
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for &i in which {
        by_name.insert(channel_name(&ctx.prefix, specs[i].channel), i);
    }
    let mut redirected = Vec::new();
    let mut left = which.len();
    // WebRTC joins wait for the shard's handshake slots: more time, and `unavailable` is retried.
    let webrtc = which.iter().filter(|&&i| specs[i].offer.is_some()).count() as u64;
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(20) + Duration::from_millis(200 * webrtc);
    let mut retries: Vec<(tokio::time::Instant, usize)> = Vec::new();
    while left > 0 {
        let now = tokio::time::Instant::now();
        let mut k = 0;
        while k < retries.len() {
            if retries[k].0 <= now {
                let (_, i) = retries.swap_remove(k);
                send_join(ctx, ws, &specs[i], i).await?;
            } else {
                k += 1;
            }
        }
        let wake = retries
            .iter()
            .map(|r| r.0)
            .min()
            .unwrap_or(deadline)
            .min(deadline);
        let v = match tokio::time::timeout_at(wake, next_json(ws)).await {
            Ok(v) => v?,
            Err(_) if wake < deadline => continue,
            Err(_) => {
                return Err(format!(
                    "{left} of {} joins unanswered after {:.0} s",
                    which.len(),
                    (deadline - now).as_secs_f64()
                ))
            }
        };
        match v.get("type").and_then(Value::as_str) {
            Some("redirect") if follow => {
                let i = v
                    .get("channel")
                    .and_then(Value::as_str)
                    .and_then(|n| by_name.get(n))
                    .copied()
                    .ok_or_else(|| format!("redirect for a channel not asked for: {v}"))?;
                let url = v
                    .get("url")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("redirect without a url: {v}"))?;
                redirected.push((url.to_string(), i));
                left -= 1;
            }
            Some("joined") => {
                let Some(&i) = v
                    .get("channel")
                    .and_then(Value::as_str)
                    .and_then(|n| by_name.get(n))
                else {
                    return Err(format!("joined for a channel not asked for: {v}"));
                };
                let j = match v.get("sdp").and_then(Value::as_str) {
                    Some(sdp) => {
                        let a = crate::webrtc::peer::parse_answer(sdp)?;
                        if let Some(engine) = &ctx.webrtc {
                            let _ = engine.send(EngineCmd::Answer {
                                member: specs[i].member,
                                sdp: sdp.to_string(),
                            });
                        }
                        (a.server_addr, a.ssrc, a.payload_type)
                    }
                    None => parse_joined_rtp(&v)?,
                };
                if joined[i].is_none() {
                    left -= 1;
                }
                joined[i] = Some(JoinedRtp {
                    member: specs[i].member,
                    server_addr: j.0,
                    ssrc: j.1,
                    payload_type: j.2,
                });
            }
            Some("error") => {
                // The shard has too many DTLS handshakes in progress (`unavailable`), or this client has
                // (`rate_limited`: the server's per-connection and per-address pending limits): ask again
                // shortly, as a well-behaved client does.
                let id = v.get("id").and_then(Value::as_u64).map(|i| i as usize);
                let code = v.get("code").and_then(Value::as_str);
                match id {
                    Some(i)
                        if i < specs.len()
                            && specs[i].offer.is_some()
                            && matches!(code, Some("unavailable" | "rate_limited")) =>
                    {
                        let backoff = Duration::from_millis(50 + (i as u64 * 37) % 200);
                        retries.push((tokio::time::Instant::now() + backoff, i));
                    }
                    _ => return Err(format!("join refused: {v}")),
                }
            }
            _ => {}
        }
    }
    Ok(redirected)
}
