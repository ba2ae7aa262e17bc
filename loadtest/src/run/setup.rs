//! Setting a run up, and taking it down: the server (or nodes), the members' sockets, the WebRTC peers
//! and their engine, the joins, the sender and receiver threads, the server's idle CPU with everyone
//! joined and silent, and one controller task per channel. What the phases need is kept in a [`Rig`].
//!
//! Order matters: the receivers need the raw forwarder's address (to tell its packets from stray ones),
//! so it is started before them, idle until a raw phase; the WebRTC engine runs from the first SDP answer
//! on, because the server admits only so many DTLS handshakes at once and they must progress while the
//! other members are still joining.

use super::join::{join_all, wait_webrtc};
use super::servers::{idle_cpu, idle_total, rss, server_info, IdleCpu};
use crate::cli::Config;
use crate::cluster::Redis;
use crate::connection::ConnCtx;
use crate::controller::{run_channel, CtrlCtx, FloorRecord, PhaseCtl, ANY_NODE};
use crate::model::{ChannelShared, Member, TargetCell};
use crate::protocol::{ConnCmd, ConnNote};
use crate::raw_forwarder::RawForwarder;
use crate::report::Report;
use crate::schedule::SenderConfig;
use crate::sender::{self, SendCmd, SenderCounters};
use crate::server::{any_exited, Server};
use crate::sockets::Endpoints;
use crate::sys::mono_ns;
use crate::tally::{RecvReport, RecvShared};
use crate::webrtc::engine::{Begin, EngineCmd, EngineCounters};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::{mpsc as smpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Semaphore};

/// Everything a run's phases drive and read.
pub struct Rig {
    pub servers: Vec<Server>,
    /// Redis (several nodes) outlives the nodes: fields drop in order, so it comes after `servers`.
    /// The run's Redis (`--nodes > 1`), kept alive for the run.
    pub redis: Option<Redis>,
    /// (when, Redis's command count) at the end of set-up.
    pub redis_mark: Option<(u64, u64)>,
    pub pids: Vec<Option<i32>>,
    pub raw: Option<RawForwarder>,
    pub target: Arc<TargetCell>,
    pub recv: Arc<RecvShared>,
    pub reports: smpsc::Receiver<RecvReport>,
    /// Threads that send receiver reports (plain receivers and the WebRTC engine).
    pub n_recv: usize,
    pub sender: smpsc::Sender<SendCmd>,
    pub sender_counters: Arc<SenderCounters>,
    pub ctrl: Arc<CtrlCtx>,
    pub phase: watch::Sender<PhaseCtl>,
    pub records: mpsc::UnboundedReceiver<(u32, FloorRecord)>,
    pub notes: mpsc::UnboundedReceiver<ConnNote>,
    /// How long a relatch (a keep-alive from every member) takes to land.
    pub relatch_wait: Duration,
    pub idle: IdleCpu,
    threads: Option<Threads>,
}

/// What is only needed to take the run down.
struct Threads {
    sender: JoinHandle<()>,
    receivers: Vec<JoinHandle<()>>,
    engine_tx: Option<smpsc::Sender<EngineCmd>>,
    engine: Option<JoinHandle<()>>,
    engine_counters: Arc<EngineCounters>,
    conns: Vec<mpsc::UnboundedSender<ConnCmd>>,
    conn_tasks: Vec<tokio::task::JoinHandle<()>>,
    controllers: Vec<tokio::task::JoinHandle<()>>,
    conn_ctx: Arc<ConnCtx>,
}

fn sender_config(cfg: &Config) -> SenderConfig {
    SenderConfig {
        rate: cfg.rate,
        payload: cfg.payload.clone(),
        keepalive: Duration::from_secs_f64(cfg.keepalive_s),
        seed: cfg.seed,
        spin_ns: cfg.spin_us * 1000,
    }
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| e.to_string())
}

impl Rig {
    /// Set the run up; `Err` is a set-up failure (exit 1). Fills the report's server, harness and setup
    /// sections.
    pub async fn start(cfg: &Config, report: &mut Report) -> Result<Rig, String> {
        let n_members = cfg.total_members();
        let n_conns =
            cfg.members as usize * (cfg.channels as usize).div_ceil(cfg.members_per_ws as usize);
        let want_fds = (n_members + n_conns + 1024) as u64;
        let nofile = crate::sys::raise_nofile(want_fds)
            .map_err(|e| format!("setrlimit(RLIMIT_NOFILE): {e}"))?;
        // Descriptors left for member sockets after the WebSocket connections and some slack.
        let fd_budget = (nofile as usize).saturating_sub(n_conns + 1024);
        if fd_budget < 64 {
            return Err(format!(
                "RLIMIT_NOFILE is {nofile}: too low for {n_conns} WebSocket connections; raise \
                 `ulimit -n` or --members-per-ws"
            ));
        }
        report.harness.nofile_limit = nofile;

        let (redis, mut servers) = super::servers::start(cfg).await?;
        let pids: Vec<Option<i32>> = servers.iter().map(|s| s.pid).collect();
        report.server = server_info(cfg, &servers);
        if servers[0].pid.is_none() {
            report
                .warnings
                .push("server PID unknown (pass --server-pid): no CPU or RSS figures".into());
        }
        let ws_urls: Vec<String> = servers
            .iter()
            .map(|s| format!("ws://{}/ws", s.http))
            .collect();
        let ws_url = ws_urls.join(", ");

        // The harness's own floor, before any load.
        let floor = crate::loopback::loopback_floor(500, Duration::from_millis(1))
            .map_err(|e| format!("loopback: {e}"))?;
        report.harness.loopback_floor = floor.summary();

        let socks = Arc::new(
            Endpoints::bind(n_members, cfg.per_ip, fd_budget, cfg.sockets)
                .map_err(|e| format!("binding UDP sockets for {n_members} members: {e}"))?,
        );
        if socks.shared {
            eprintln!(
                "{n_members} members over {} shared sockets (RLIMIT_NOFILE {nofile}): addresses 127.0.x.y:port via IP_PKTINFO",
                socks.socks.len()
            );
        }
        // WebRTC members: client peers and their offers, and the engine that drives them.
        let webrtc_of: Vec<bool> = (0..n_members)
            .map(|m| {
                crate::webrtc::peer::is_webrtc(&cfg.transport, (m % cfg.members as usize) as u16)
            })
            .collect();
        let n_webrtc = webrtc_of.iter().filter(|w| **w).count();
        if n_webrtc > 0 && socks.shared {
            return Err(format!(
                "{n_webrtc} WebRTC members need a socket each, but RLIMIT_NOFILE ({nofile}) only \
                 leaves shared sockets: raise `ulimit -n` or use fewer members"
            ));
        }
        let mut offers: Vec<Option<String>> = vec![None; n_members];
        let engine_counters = Arc::new(EngineCounters::default());
        let (to_engine, engine_sends) = smpsc::channel();
        let mut engine_tx = None;
        let mut engine = None;
        if n_webrtc > 0 {
            let t = Instant::now();
            let ids: Vec<(u32, SocketAddr)> = (0..n_members)
                .filter(|&m| webrtc_of[m])
                .map(|m| (m as u32, socks.addrs[m]))
                .collect();
            let (peers, sdps) = crate::webrtc::peer::prepare(&ids)?;
            for ((m, _), sdp) in ids.iter().zip(sdps) {
                offers[*m as usize] = Some(sdp);
            }
            eprintln!(
                "{n_webrtc} WebRTC members ({}): offers built in {:.1} s",
                cfg.transport,
                t.elapsed().as_secs_f64()
            );
            let (tx, rx) = smpsc::channel();
            let (ec, eps) = (engine_counters.clone(), socks.clone());
            engine = Some(spawn_thread("lt-webrtc", move || {
                crate::webrtc::engine::run(peers, eps, rx, engine_sends, ec)
            })?);
            engine_tx = Some(tx);
        }
        report.harness.webrtc_members = n_webrtc;
        report.harness.sockets = socks.socks.len();
        report.harness.shared_sockets = socks.shared;
        report.harness.loopback_addresses = socks.loopback_addresses();
        report.harness.ws_connections = n_conns;
        report.harness.recv_threads = cfg.recv_threads;
        report.setup.rss_before_bytes = rss(&pids);

        // Controllers' inboxes first: connections route floor events into them.
        let channels: Arc<Vec<ChannelShared>> =
            Arc::new((0..cfg.channels).map(|_| ChannelShared::new()).collect());
        let (ctrl_tx, ctrl_rx): (Vec<_>, Vec<_>) =
            (0..cfg.channels).map(|_| mpsc::unbounded_channel()).unzip();
        let (notes_tx, mut notes) = mpsc::unbounded_channel();
        let conn_ctx = Arc::new(ConnCtx {
            urls: ws_urls,
            prefix: format!("lt{:x}", (mono_ns() ^ std::process::id() as u64) & 0xffff),
            presence: cfg.presence,
            channels: channels.clone(),
            to_ctrl: Arc::new(ctrl_tx),
            notes: notes_tx,
            join_limit: Arc::new(Semaphore::new(32)),
            frames: Default::default(),
            webrtc: engine_tx.clone(),
        });
        eprintln!(
            "joining {n_members} members ({} channels x {}) over {n_conns} WebSocket connections to {ws_url}",
            cfg.channels, cfg.members
        );
        let joined = join_all(
            cfg,
            &conn_ctx,
            &socks,
            &mut offers,
            &webrtc_of,
            &mut notes,
            &mut servers,
        )
        .await?;
        report.setup.join_s = joined.seconds;
        report.setup.joins_per_s = n_members as f64 / joined.seconds.max(1e-9);
        eprintln!(
            "joined in {:.1} s; T2 = {} ms",
            joined.seconds, joined.timers.t2_ms
        );
        if n_webrtc > 0 {
            let s = wait_webrtc(n_webrtc, &engine_counters, &mut servers).await?;
            let total = joined.seconds + s;
            report.setup.webrtc_connect_s = Some(total);
            eprintln!(
                "{n_webrtc} WebRTC members connected {s:.1} s after the last join: {:.0} WebRTC joins/s \
                 to completed DTLS (join sent -> ICE + DTLS up, {total:.1} s for all)",
                n_webrtc as f64 / total.max(1e-9)
            );
        }
        let members: Arc<Vec<Member>> = Arc::new(joined.members);

        // Threads: sender, raw forwarder (its address goes into the receivers' table), receivers.
        let sender_counters = Arc::new(SenderCounters::default());
        let (send_tx, send_rx) = smpsc::channel();
        let sender_thread = {
            let (m, s, c) = (members.clone(), socks.clone(), sender_counters.clone());
            let (scfg, engine) = (sender_config(cfg), engine_tx.as_ref().map(|_| to_engine));
            spawn_thread("lt-sender", move || {
                sender::run(scfg, m, s, send_rx, c, engine)
            })?
        };
        let raw = if cfg.ceiling {
            // Idle until a B phase; pinned to the server's shard core once the warm-up has shown it.
            let groups: Vec<Vec<SocketAddr>> = (0..cfg.channels as usize)
                .map(|c| {
                    (0..cfg.members as usize)
                        .map(|s| members[c * cfg.members as usize + s].addr)
                        .collect()
                })
                .collect();
            Some(
                RawForwarder::start(groups, cfg.ceiling_cpu)
                    .map_err(|e| format!("raw forwarder: {e}"))?,
            )
        } else {
            None
        };
        let target = Arc::new(TargetCell::new(raw.as_ref().map(|r| r.addr)));
        let recv = Arc::new(RecvShared {
            members: members.clone(),
            channels: channels.clone(),
            target: target.clone(),
            phase: AtomicU32::new(0),
            stop: AtomicBool::new(false),
            delivered: Default::default(),
        });
        let (rep_tx, reports) = smpsc::channel::<RecvReport>();
        let mut receivers = Vec::new();
        let n_socks = socks.socks.len();
        let per_thread = n_socks.div_ceil(cfg.recv_threads);
        for t in 0..cfg.recv_threads {
            let (first, last) = (t * per_thread, ((t + 1) * per_thread).min(n_socks));
            if first >= last {
                break;
            }
            let (sh, tx, eps) = (recv.clone(), rep_tx.clone(), socks.clone());
            receivers.push(spawn_thread(&format!("lt-recv{t}"), move || {
                crate::receiver::run(t, first..last, eps, sh, tx)
            })?);
        }
        let mut n_recv = receivers.len();
        if let Some(tx) = &engine_tx {
            let _ = tx.send(EngineCmd::Begin(Box::new(Begin {
                cfg: sender_config(cfg),
                members: members.clone(),
                shared: recv.clone(),
                reports: rep_tx.clone(),
                counters: sender_counters.clone(),
            })));
            n_recv += 1;
        }
        drop(rep_tx);

        // Latch every member, then see what the joins cost the server.
        let relatch_wait = Duration::from_millis(300) + Duration::from_micros(8 * n_members as u64);
        let _ = send_tx.send(SendCmd::Relatch);
        tokio::time::sleep(relatch_wait + Duration::from_millis(200)).await;
        report.setup.rss_after_join_bytes = rss(&pids);
        let before = redis
            .as_ref()
            .and_then(|r| r.total_commands().map(|n| (mono_ns(), n)));
        // A cluster idles longer: its registry works in periods of a second or more.
        let idle = idle_cpu(&pids, if cfg.cluster { 10 } else { 1 }).await;
        report.setup.server_idle_cpu_pct = idle_total(&idle).map(|x| x / 1e7);
        let redis_mark = redis
            .as_ref()
            .and_then(|r| r.total_commands().map(|n| (mono_ns(), n)));
        if let (Some((t0, n0)), Some((t1, n1))) = (before, redis_mark) {
            let secs = (t1 - t0) as f64 / 1e9;
            // Less the two INFO commands of the measure itself.
            let n = n1.saturating_sub(n0).saturating_sub(2);
            report.setup.redis_idle_commands_per_s = Some(n as f64 / secs);
        }
        if let (Some(a), Some(b)) = (
            report.setup.rss_before_bytes,
            report.setup.rss_after_join_bytes,
        ) {
            report.setup.rss_per_member_bytes = Some((b as f64 - a as f64) / n_members as f64);
        }

        // Controllers.
        let (phase, phase_rx) = watch::channel(PhaseCtl {
            id: u32::MAX,
            running: false,
            active: 0,
            server: true,
            speakers_node: ANY_NODE,
            shutdown: false,
        });
        let (rec_tx, records) = mpsc::unbounded_channel();
        let ctrl = Arc::new(CtrlCtx {
            model: cfg.talk,
            members: cfg.members,
            nodes: servers.len() as u32,
            max_burst: (joined.timers.t2_ms as f64 / 1000.0 - 1.5).max(0.5),
            packet_interval: Duration::from_nanos(1_000_000_000 / cfg.rate as u64),
            seed: cfg.seed,
            channels,
            conns: joined.conns,
            sender: send_tx.clone(),
            phase: phase_rx,
            busy: Default::default(),
            records: rec_tx,
        });
        let controllers = ctrl_rx
            .into_iter()
            .enumerate()
            .map(|(ch, rx)| tokio::spawn(run_channel(ch as u32, ctrl.clone(), rx)))
            .collect();
        Ok(Rig {
            servers,
            redis,
            redis_mark,
            pids,
            raw,
            target,
            recv,
            reports,
            n_recv,
            sender: send_tx,
            sender_counters,
            ctrl,
            phase,
            records,
            notes,
            relatch_wait,
            idle,
            threads: Some(Threads {
                sender: sender_thread,
                receivers,
                engine_tx,
                engine,
                engine_counters,
                conns: joined.all,
                conn_tasks: joined.handles,
                controllers,
                conn_ctx,
            }),
        })
    }

    /// Stop everything the run started (the servers last); `Some` when a server had died.
    pub async fn shut_down(&mut self, report: &mut Report) -> Option<String> {
        let _ = self.phase.send(PhaseCtl {
            id: u32::MAX,
            running: false,
            active: 0,
            server: true,
            speakers_node: ANY_NODE,
            shutdown: true,
        });
        let _ = self.sender.send(SendCmd::Shutdown);
        self.recv
            .stop
            .store(true, std::sync::atomic::Ordering::Release);
        let Some(t) = self.threads.take() else {
            return None; // already shut down
        };
        let _ = t.sender.join();
        for h in t.receivers {
            let _ = h.join();
        }
        drop(t.engine_tx);
        if let Some(h) = t.engine {
            let _ = h.join();
        }
        report.harness.webrtc_rejected = t
            .engine_counters
            .rejected
            .load(std::sync::atomic::Ordering::Relaxed);
        for c in &t.conns {
            let _ = c.send(ConnCmd::Close);
        }
        for h in t.controllers {
            let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
        }
        for h in t.conn_tasks {
            let _ = tokio::time::timeout(Duration::from_millis(500), h).await;
        }
        let crashed = any_exited(&mut self.servers);
        report.setup.rss_end_bytes = rss(&self.pids);
        report.setup.ws_frames_in = t.conn_ctx.frames.snapshot();
        drop(self.raw.take());
        crashed
    }

    /// Stop the servers (and Redis), adding the log tail of any that died to the report.
    pub fn stop_servers(mut self, report: &mut Report) {
        for s in &mut self.servers {
            if let (Some(log), Some(_)) = (s.log.clone(), s.exited()) {
                if report.server.crashed.is_some() {
                    report.warnings.push(format!(
                        "server log tail ({}):\n{}",
                        log.display(),
                        crate::server::tail(&log, 15)
                    ));
                }
            }
        }
        for s in &mut self.servers {
            s.stop();
        }
    }
}
