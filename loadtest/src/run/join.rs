//! Joining: every member over protocol v1, `members_per_ws` of them per WebSocket connection (one member
//! per channel on a connection: connection *k* carries one slot of a run of channels), then, with WebRTC
//! members, waiting until every one of them has connected (ICE + DTLS).
//!
//! Any connection that fails to join fails the run's set-up: a run with members missing would measure a
//! different load than the one asked for.

use crate::cli::Config;
use crate::connection::{run_conn, ConnCtx};
use crate::model::Member;
use crate::protocol::{ConnCmd, ConnNote, JoinSpec, JoinedRtp, Timers};
use crate::server::{any_exited, Server};
use crate::sockets::Endpoints;
use crate::webrtc::engine::EngineCounters;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The members as joined, and the connections that carry them.
pub struct Joined {
    pub members: Vec<Member>,
    /// The server's floor timers (T2 bounds the bursts).
    pub timers: Timers,
    /// `conns[channel][slot]`: the connection carrying that member.
    pub conns: Vec<Vec<mpsc::UnboundedSender<ConnCmd>>>,
    /// Every connection once, to close them at the end.
    pub all: Vec<mpsc::UnboundedSender<ConnCmd>>,
    pub handles: Vec<JoinHandle<()>>,
    pub seconds: f64,
}

/// Start one task per connection and wait for every `joined`. `offers[m]`: member `m`'s SDP offer when
/// it is a WebRTC member (taken); `notes`: the connections' reports.
pub async fn join_all(
    cfg: &Config,
    ctx: &Arc<ConnCtx>,
    socks: &Endpoints,
    offers: &mut [Option<String>],
    webrtc_of: &[bool],
    notes: &mut mpsc::UnboundedReceiver<ConnNote>,
    servers: &mut [Server],
) -> Result<Joined, String> {
    let n_members = cfg.total_members();
    let per_ws = cfg.members_per_ws as usize;
    let n_conns = cfg.members as usize * (cfg.channels as usize).div_ceil(per_ws);
    let t_join = Instant::now();
    let mut conns: Vec<Vec<mpsc::UnboundedSender<ConnCmd>>> = (0..cfg.channels)
        .map(|_| Vec::with_capacity(cfg.members as usize))
        .collect();
    let mut handles = Vec::new();
    let mut all = Vec::new();
    for slot in 0..cfg.members {
        for chunk_start in (0..cfg.channels).step_by(per_ws) {
            let chunk_end = (chunk_start + per_ws as u32).min(cfg.channels);
            let (tx, rx) = mpsc::unbounded_channel();
            let specs: Vec<JoinSpec> = (chunk_start..chunk_end)
                .map(|ch| {
                    let member = ch * cfg.members + slot;
                    conns[ch as usize].push(tx.clone());
                    JoinSpec {
                        channel: ch,
                        slot: slot as u16,
                        member,
                        rtp_addr: socks.addrs[member as usize],
                        offer: offers[member as usize].take(),
                    }
                })
                .collect();
            all.push(tx);
            handles.push(tokio::spawn(run_conn(ctx.clone(), specs, rx)));
        }
    }
    let mut joined: Vec<Option<JoinedRtp>> = vec![None; n_members];
    let mut timers = Timers {
        t1_ms: 4000,
        t2_ms: 30_000,
    };
    let mut pending = n_conns;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60 + n_members as u64 / 500);
    let mut failures = Vec::new();
    while pending > 0 {
        let note = tokio::time::timeout_at(deadline, notes.recv())
            .await
            .map_err(|_| format!("joining timed out with {pending} connections unanswered"))?;
        let Some(note) = note else { break };
        match note {
            ConnNote::Joined(list, t) => {
                timers = t;
                for j in list {
                    let idx = j.member as usize;
                    joined[idx] = Some(j);
                }
                pending -= 1;
            }
            ConnNote::Failed(e) => {
                failures.push(e);
                pending -= 1;
            }
            ConnNote::Lost(e) | ConnNote::ServerError(e) => failures.push(e),
        }
        if let Some(st) = any_exited(servers) {
            return Err(format!("the server died while members joined: {st}"));
        }
        if n_conns > 20 && (n_conns - pending).is_multiple_of(n_conns / 10) && pending > 0 {
            eprintln!("  {} / {n_conns} connections joined", n_conns - pending);
        }
    }
    if !failures.is_empty() {
        for c in &all {
            let _ = c.send(ConnCmd::Close);
        }
        return Err(format!(
            "{} connection(s) failed to join; first: {}",
            failures.len(),
            failures[0]
        ));
    }
    if joined.iter().any(Option::is_none) {
        return Err("some members got no `joined` answer".into());
    }
    let fallback: SocketAddr = servers[0].http;
    let members = (0..n_members)
        .map(|m| {
            let j = joined[m].as_ref();
            Member {
                channel: (m / cfg.members as usize) as u32,
                slot: (m % cfg.members as usize) as u16,
                addr: socks.addrs[m],
                server_addr: j.map(|j| j.server_addr).unwrap_or(fallback),
                ssrc: j.map(|j| j.ssrc).unwrap_or(0),
                payload_type: j.map(|j| j.payload_type).unwrap_or(111),
                webrtc: webrtc_of[m],
            }
        })
        .collect();
    Ok(Joined {
        members,
        timers,
        conns,
        all,
        handles,
        seconds: t_join.elapsed().as_secs_f64(),
    })
}

/// Wait until all `n` WebRTC members are connected; the time it took, s. Any failure, the server dying
/// or the time limit fails the set-up.
pub async fn wait_webrtc(
    n: usize,
    counters: &EngineCounters,
    servers: &mut [Server],
) -> Result<f64, String> {
    let t = Instant::now();
    let limit = crate::webrtc::peer::connect_timeout(n);
    loop {
        let up = counters.connected.load(Ordering::Acquire) as usize;
        let failed = counters.failed.load(Ordering::Acquire) as usize;
        if up == n {
            return Ok(t.elapsed().as_secs_f64());
        }
        if failed > 0 || t.elapsed() > limit {
            return Err(format!(
                "{up} of {n} WebRTC members connected (ICE + DTLS) after {:.0} s, {failed} failed",
                t.elapsed().as_secs_f64()
            ));
        }
        if let Some(st) = any_exited(servers) {
            return Err(format!(
                "the server died while WebRTC members connected: {st}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
