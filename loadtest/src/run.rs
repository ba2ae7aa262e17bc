//! The coordinator: sets the run up (server, sockets, joins, threads), walks through its phases
//! (warm-up, measurement, A/B ceiling rounds or knee steps), and turns what the threads report into the
//! [`Report`].
//!
//! Phase boundaries are clean: the controllers stop and release, in-flight packets drain, and only then
//! are the counters read and the receivers told to close the phase, so each phase's loss is exact.

use crate::ceiling::RawForwarder;
use crate::cli::Config;
use crate::controller::{run_channel, CtrlCtx, FloorRecord, FloorStats, PhaseCtl, ANY_NODE};
use crate::metrics::{self, Samples};
use crate::model::{ChannelShared, Member, Target, TargetCell};
use crate::procfs::{self, ThreadCpu};
use crate::receiver::{self, RecvCounters, RecvReport, RecvShared};
use crate::report::*;
use crate::sender::{self, SendCmd, SenderConfig, SenderCounters};
use crate::seq::SeqTotals;
use crate::server::Server;
use crate::signaling::{self, ConnCmd, ConnCtx, ConnNote, JoinSpec, Timers};
use crate::sockets::Endpoints;
use crate::stats::{median, LatencyHist};
use crate::sys::mono_ns;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc as smpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Semaphore};

/// How a run ended, for the exit status.
pub const EXIT_LOSS: i32 = 2;
pub const EXIT_CRASH: i32 = 3;

/// One planned phase.
#[derive(Debug, Clone)]
struct Plan {
    name: String,
    kind: &'static str,
    server: bool,
    active: u32,
    duration: Duration,
    measured: bool,
    /// Speakers only on this node ([`ANY_NODE`]: anyone).
    speakers_node: u32,
}

fn plan(cfg: &Config) -> Vec<Plan> {
    let mut v = Vec::new();
    let all = cfg.channels;
    let step_channels =
        |k: u32| ((all as u64 * k as u64).div_ceil(cfg.knee_steps as u64)).max(1) as u32;
    if cfg.warmup_s > 0.0 {
        v.push(Plan {
            name: "warmup".into(),
            kind: "warmup",
            server: true,
            // A knee search warms up at its first step, not at the load it is looking for.
            active: if cfg.find_knee { step_channels(1) } else { all },
            duration: cfg.warmup(),
            measured: false,
            speakers_node: ANY_NODE,
        });
    }
    if cfg.ceiling {
        for r in 1..=cfg.ceiling_rounds {
            for (tag, server) in [("A", true), ("B", false)] {
                v.push(Plan {
                    name: format!("{tag}{r}-{}", if server { "tg" } else { "raw" }),
                    kind: "ceiling",
                    server,
                    active: all,
                    duration: cfg.duration(),
                    measured: true,
                    speakers_node: ANY_NODE,
                });
            }
        }
    } else if cfg.find_knee {
        for k in 1..=cfg.knee_steps {
            let active = step_channels(k);
            v.push(Plan {
                name: format!("step{k}"),
                kind: "knee-step",
                server: true,
                active,
                duration: cfg.duration(),
                measured: true,
                speakers_node: ANY_NODE,
            });
        }
    } else {
        v.push(Plan {
            name: "measure".into(),
            kind: "measure",
            server: true,
            active: all,
            duration: cfg.duration(),
            measured: true,
            speakers_node: ANY_NODE,
        });
        if cfg.split_phase {
            // The same load with speakers on node 0 only: node 0 sends relay datagrams, the others only
            // receive them, which tells the two sides' costs apart.
            v.push(Plan {
                name: SPLIT_PHASE.into(),
                kind: "relay-split",
                server: true,
                active: all,
                duration: cfg.duration(),
                measured: true,
                speakers_node: 0,
            });
        }
    }
    v
}

/// The phase of a multi-node run with speakers on node 0 only.
pub const SPLIT_PHASE: &str = "from-node0";

/// Counters read at a phase boundary.
struct Snapshot {
    t_ns: u64,
    media: u64,
    expected: u64,
    send_errors: u64,
    spin_ns: u64,
    metrics: Option<Samples>,
    threads: BTreeMap<i32, ThreadCpu>,
    proc_cpu: Option<u64>,
    own_cpu: Option<u64>,
    raw: Option<(u64, u64, u64, Option<u64>)>,
    /// Per node: its `/metrics`, schedstat CPU (Σ threads) and that of its shard threads alone.
    nodes: Vec<(Option<Samples>, u64, u64)>,
    cpus: BTreeMap<usize, (u64, u64)>,
    udp: BTreeMap<String, u64>,
}

/// Σ run time of a process's threads (`shards`: only the shard threads, named `shard-…`).
fn cpu_sum(t: &BTreeMap<i32, ThreadCpu>, shards: bool) -> u64 {
    t.values()
        .filter(|x| !shards || x.name.starts_with("shard"))
        .map(|x| x.run_ns)
        .sum()
}

async fn snapshot(servers: &[Server], raw: Option<&RawForwarder>, sc: &SenderCounters) -> Snapshot {
    let mut nodes = Vec::with_capacity(servers.len());
    let mut threads = BTreeMap::new();
    for s in servers {
        let m = match metrics::http_get(s.http, "/metrics", Duration::from_secs(3)).await {
            Ok((200, body)) => Some(Samples::parse(&body)),
            _ => None,
        };
        let t = s.pid.map(procfs::threads_cpu).unwrap_or_default();
        nodes.push((m, cpu_sum(&t, false), cpu_sum(&t, true)));
        // Thread ids are unique across processes: the union is every node's threads.
        threads.extend(t);
    }
    // One node: its samples as they are; several: every series labelled with its node, so sums by
    // metric name cover the cluster.
    let metrics = if nodes.len() == 1 {
        nodes[0].0.clone()
    } else {
        nodes
            .iter()
            .enumerate()
            .map(|(i, (m, _, _))| m.as_ref().map(|m| m.with_label("node", &i.to_string())))
            .try_fold(Samples::default(), |mut acc, m| {
                acc.0.extend(m?.0);
                Some(acc)
            })
    };
    let proc_cpu = servers
        .iter()
        .map(|s| s.pid.and_then(procfs::process_cpu_ns))
        .sum::<Option<u64>>();
    let me = std::process::id() as i32;
    Snapshot {
        nodes,
        t_ns: mono_ns(),
        media: sc.media.load(Ordering::Acquire),
        expected: sc.expected.load(Ordering::Acquire),
        send_errors: sc.errors.load(Ordering::Acquire),
        spin_ns: sc.spin_ns.load(Ordering::Acquire),
        metrics,
        threads,
        proc_cpu,
        own_cpu: procfs::process_cpu_ns(me),
        raw: raw.map(|r| {
            (
                r.counters.received.load(Ordering::Acquire),
                r.counters.forwarded.load(Ordering::Acquire),
                r.counters.dropped.load(Ordering::Acquire),
                r.cpu_ns(),
            )
        }),
        cpus: procfs::cpu_times(),
        udp: procfs::udp_counters(),
    }
}

/// What the receivers reported for one phase, merged.
#[derive(Default)]
struct Acc {
    latency: LatencyHist,
    switch: LatencyHist,
    counters: RecvCounters,
    seq: SeqTotals,
    finals: usize,
}

impl Acc {
    fn add(&mut self, r: &RecvReport) {
        self.latency.merge(&r.latency);
        self.switch.merge(&r.switch);
        self.counters.add(&r.counters);
        self.seq.add(&r.seq);
        if r.last {
            self.finals += 1;
        }
    }
}

/// Phase results kept with their histograms, for the summary.
struct Done {
    result: PhaseResult,
    latency: LatencyHist,
    switch: LatencyHist,
    grant: LatencyHist,
}

/// Receiver phase number of plan entry `i` (odd: inside the phase; even: between phases).
fn recv_phase(i: usize) -> u32 {
    2 * i as u32 + 1
}

/// Run the whole thing. `Err` is a setup failure (exit 1); a finished run's pass/fail is in the verdict.
pub async fn run(cfg: &Config) -> Result<Report, String> {
    std::fs::create_dir_all(&cfg.out).map_err(|e| format!("{}: {e}", cfg.out.display()))?;
    let n_members = cfg.total_members();
    let per_ws = cfg.members_per_ws as usize;
    let n_conns = cfg.members as usize * (cfg.channels as usize).div_ceil(per_ws);
    let mut report = Report {
        tool: "talkgroup-loadtest".into(),
        format: 1,
        scenario: cfg.name.clone(),
        description: cfg.description.clone(),
        started_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        config: serde_json::to_value(cfg).unwrap_or_default(),
        ..Default::default()
    };
    let want_fds = (n_members + n_conns + 1024) as u64;
    let nofile =
        crate::sys::raise_nofile(want_fds).map_err(|e| format!("setrlimit(RLIMIT_NOFILE): {e}"))?;
    // Descriptors left for member sockets after the WebSocket connections and some slack.
    let fd_budget = (nofile as usize).saturating_sub(n_conns + 1024);
    if fd_budget < 64 {
        return Err(format!(
            "RLIMIT_NOFILE is {nofile}: too low for {n_conns} WebSocket connections; raise `ulimit -n` \
             or --members-per-ws"
        ));
    }
    report.harness.nofile_limit = nofile;

    // The server.
    // Redis (when there is one) outlives the nodes: declared first, dropped last.
    let mut _redis = None;
    let mut servers = if cfg.spawn_server && cfg.cluster {
        let bin = crate::server::find_binary(cfg.server_bin.as_deref())?;
        eprintln!(
            "starting redis-server and {} node(s) of {} (shards {} each, --store redis)",
            cfg.nodes,
            bin.display(),
            cfg.shards
        );
        let (r, nodes) =
            crate::cluster::spawn(bin, cfg.nodes, cfg.shards, &cfg.server_args, &cfg.out).await?;
        _redis = Some(r);
        nodes
    } else if cfg.spawn_server {
        let bin = crate::server::find_binary(cfg.server_bin.as_deref())?;
        eprintln!("starting {} (shards {})", bin.display(), cfg.shards);
        vec![
            Server::spawn(
                bin,
                cfg.shards,
                cfg.media_port,
                &cfg.server_args,
                &cfg.out,
                "server.log",
            )
            .await?,
        ]
    } else {
        vec![Server::attach(cfg.server, cfg.server_pid).await?]
    };
    let server_http = servers[0].http;
    let pids: Vec<Option<i32>> = servers.iter().map(|s| s.pid).collect();
    let rss = |pids: &[Option<i32>]| -> Option<u64> {
        pids.iter()
            .map(|p| p.and_then(procfs::rss_bytes))
            .sum::<Option<u64>>()
    };
    let server = &servers[0];
    report.server = ServerInfo {
        http: server.http.to_string(),
        pid: server.pid,
        spawned: cfg.spawn_server,
        bin: server.bin.as_ref().map(|p| p.display().to_string()),
        log: server.log.as_ref().map(|p| p.display().to_string()),
        media_port: server.media_port,
        nodes: if servers.len() > 1 {
            servers
                .iter()
                .map(|s| (s.http.to_string(), s.pid))
                .collect()
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    if server.pid.is_none() {
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
    let floor = receiver::loopback_floor(500, Duration::from_millis(1))
        .map_err(|e| format!("loopback: {e}"))?;
    report.harness.loopback_floor = floor.summary();

    // Sockets.
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
    // WebRTC members: client peers and their offers, and the engine that drives them from the first
    // answer on (the server admits a limited number of handshakes at once, so they must progress while
    // the others are still joining).
    let webrtc_of: Vec<bool> = (0..n_members)
        .map(|m| crate::webrtc::is_webrtc(&cfg.transport, (m % cfg.members as usize) as u16))
        .collect();
    let n_webrtc = webrtc_of.iter().filter(|w| **w).count();
    if n_webrtc > 0 && socks.shared {
        return Err(format!(
            "{n_webrtc} WebRTC members need a socket each, but RLIMIT_NOFILE ({nofile}) only leaves \
             shared sockets: raise `ulimit -n` or use fewer members"
        ));
    }
    let mut offers: Vec<Option<String>> = vec![None; n_members];
    let engine_counters = Arc::new(crate::webrtc::EngineCounters::default());
    let mut engine_tx = None;
    let mut engine_handle = None;
    if n_webrtc > 0 {
        let t = Instant::now();
        let ids: Vec<(u32, std::net::SocketAddr)> = (0..n_members)
            .filter(|&m| webrtc_of[m])
            .map(|m| (m as u32, socks.addrs[m]))
            .collect();
        let (peers, sdps) = crate::webrtc::prepare(&ids)?;
        for ((m, _), sdp) in ids.iter().zip(sdps) {
            offers[*m as usize] = Some(sdp);
        }
        eprintln!(
            "{n_webrtc} WebRTC members ({}): offers built in {:.1} s",
            cfg.transport,
            t.elapsed().as_secs_f64()
        );
        let (tx, rx) = smpsc::channel();
        let ec = engine_counters.clone();
        let eps = socks.clone();
        engine_handle = Some(
            std::thread::Builder::new()
                .name("lt-webrtc".into())
                .spawn(move || crate::webrtc::run(peers, eps, rx, ec))
                .map_err(|e| e.to_string())?,
        );
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
    let mut ctrl_rx = Vec::with_capacity(cfg.channels as usize);
    let mut ctrl_tx = Vec::with_capacity(cfg.channels as usize);
    for _ in 0..cfg.channels {
        let (tx, rx) = mpsc::unbounded_channel();
        ctrl_tx.push(tx);
        ctrl_rx.push(rx);
    }
    let (notes_tx, mut notes_rx) = mpsc::unbounded_channel();
    let prefix = format!("lt{:x}", (mono_ns() ^ std::process::id() as u64) & 0xffff);
    let conn_ctx = Arc::new(ConnCtx {
        urls: ws_urls,
        prefix,
        presence: cfg.presence,
        channels: channels.clone(),
        to_ctrl: Arc::new(ctrl_tx),
        notes: notes_tx,
        join_limit: Arc::new(Semaphore::new(32)),
        frames: Default::default(),
        webrtc: engine_tx.clone(),
    });

    // Join: connection k carries slot `slot` of channels chunk*per_ws .. (one member per channel).
    eprintln!(
        "joining {n_members} members ({} channels x {}) over {n_conns} WebSocket connections to {ws_url}",
        cfg.channels, cfg.members
    );
    let t_join = Instant::now();
    let mut conns: Vec<Vec<mpsc::UnboundedSender<ConnCmd>>> = (0..cfg.channels)
        .map(|_| Vec::with_capacity(cfg.members as usize))
        .collect();
    let mut conn_handles = Vec::new();
    let mut all_conn_tx = Vec::new();
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
            all_conn_tx.push(tx);
            conn_handles.push(tokio::spawn(signaling::run_conn(
                conn_ctx.clone(),
                specs,
                rx,
            )));
        }
    }
    let mut joined: Vec<Option<signaling::JoinedRtp>> = vec![None; n_members];
    let mut timers = Timers {
        t1_ms: 4000,
        t2_ms: 30_000,
    };
    let mut pending = n_conns;
    let join_deadline =
        tokio::time::Instant::now() + Duration::from_secs(60 + n_members as u64 / 500);
    let mut failures = Vec::new();
    while pending > 0 {
        let note = tokio::time::timeout_at(join_deadline, notes_rx.recv())
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
        if let Some(st) = any_exited(&mut servers) {
            return Err(format!("the server died while members joined: {st}"));
        }
        if n_conns > 20 && (n_conns - pending).is_multiple_of(n_conns / 10) && pending > 0 {
            eprintln!("  {} / {n_conns} connections joined", n_conns - pending);
        }
    }
    if !failures.is_empty() {
        for c in &all_conn_tx {
            let _ = c.send(ConnCmd::Close);
        }
        return Err(format!(
            "{} connection(s) failed to join; first: {}",
            failures.len(),
            failures[0]
        ));
    }
    let join_s = t_join.elapsed().as_secs_f64();
    report.setup.join_s = join_s;
    report.setup.joins_per_s = n_members as f64 / join_s.max(1e-9);
    let members: Vec<Member> = (0..n_members)
        .map(|m| {
            let j = joined[m].clone();
            Member {
                channel: (m / cfg.members as usize) as u32,
                slot: (m % cfg.members as usize) as u16,
                addr: socks.addrs[m],
                server_addr: j.as_ref().map(|j| j.server_addr).unwrap_or(server_http),
                ssrc: j.as_ref().map(|j| j.ssrc).unwrap_or(0),
                payload_type: j.as_ref().map(|j| j.payload_type).unwrap_or(111),
                webrtc: webrtc_of[m],
            }
        })
        .collect();
    if joined.iter().any(Option::is_none) {
        return Err("some members got no `joined` answer".into());
    }
    eprintln!("joined in {join_s:.1} s; T2 = {} ms", timers.t2_ms);
    if n_webrtc > 0 {
        let t = Instant::now();
        let limit = crate::webrtc::connect_timeout(n_webrtc);
        loop {
            let up = engine_counters.connected.load(Ordering::Acquire) as usize;
            let failed = engine_counters.failed.load(Ordering::Acquire) as usize;
            if up == n_webrtc {
                break;
            }
            if failed > 0 || t.elapsed() > limit {
                return Err(format!(
                    "{up} of {n_webrtc} WebRTC members connected (ICE + DTLS) after {:.0} s, {failed} failed",
                    t.elapsed().as_secs_f64()
                ));
            }
            if let Some(st) = any_exited(&mut servers) {
                return Err(format!(
                    "the server died while WebRTC members connected: {st}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        report.setup.webrtc_connect_s = Some(join_s + t.elapsed().as_secs_f64());
        eprintln!(
            "{n_webrtc} WebRTC members connected {:.1} s after the last join",
            t.elapsed().as_secs_f64()
        );
    }
    let members = Arc::new(members);

    // Threads: sender, receivers.
    let sender_counters = Arc::new(SenderCounters::default());
    let (send_tx, send_rx) = smpsc::channel();
    let sender_handle = {
        let (m, s, c) = (members.clone(), socks.clone(), sender_counters.clone());
        let engine = engine_tx.clone();
        let scfg = SenderConfig {
            rate: cfg.rate,
            payload: cfg.payload.clone(),
            keepalive: Duration::from_secs_f64(cfg.keepalive_s),
            seed: cfg.seed,
            spin_ns: cfg.spin_us * 1000,
        };
        std::thread::Builder::new()
            .name("lt-sender".into())
            .spawn(move || sender::run(scfg, m, s, send_rx, c, engine))
            .map_err(|e| e.to_string())?
    };
    // Raw forwarder address must be known to the receivers: it is created before them when needed.
    let mut raw: Option<RawForwarder> = None;
    let mut raw_addr = None;
    if cfg.ceiling {
        // Started now (its address goes into the receivers' table) but idle until a B phase; it is
        // pinned to the server's shard core once the warm-up has shown which core that is.
        let groups: Vec<Vec<std::net::SocketAddr>> = (0..cfg.channels as usize)
            .map(|c| {
                (0..cfg.members as usize)
                    .map(|s| members[c * cfg.members as usize + s].addr)
                    .collect()
            })
            .collect();
        let r = RawForwarder::start(groups, cfg.ceiling_cpu)
            .map_err(|e| format!("raw forwarder: {e}"))?;
        raw_addr = Some(r.addr);
        raw = Some(r);
    }
    let target_cell = Arc::new(TargetCell::new(raw_addr));
    let recv_shared = Arc::new(RecvShared {
        members: members.clone(),
        channels: channels.clone(),
        target: target_cell.clone(),
        phase: AtomicU32::new(0),
        stop: AtomicBool::new(false),
        delivered: Default::default(),
    });
    let (rep_tx, rep_rx) = smpsc::channel::<RecvReport>();
    let mut recv_handles = Vec::new();
    let n_socks = socks.socks.len();
    let per_thread = n_socks.div_ceil(cfg.recv_threads);
    for t in 0..cfg.recv_threads {
        let first = t * per_thread;
        let last = ((t + 1) * per_thread).min(n_socks);
        if first >= last {
            break;
        }
        let (sh, tx, eps) = (recv_shared.clone(), rep_tx.clone(), socks.clone());
        recv_handles.push(
            std::thread::Builder::new()
                .name(format!("lt-recv{t}"))
                .spawn(move || receiver::run(t, first..last, eps, sh, tx))
                .map_err(|e| e.to_string())?,
        );
    }
    let mut n_recv = recv_handles.len();
    if let Some(tx) = &engine_tx {
        let _ = tx.send(crate::webrtc::EngineCmd::Begin(Box::new(
            crate::webrtc::Begin {
                cfg: SenderConfig {
                    rate: cfg.rate,
                    payload: cfg.payload.clone(),
                    keepalive: Duration::from_secs_f64(cfg.keepalive_s),
                    seed: cfg.seed,
                    spin_ns: cfg.spin_us * 1000,
                },
                members: members.clone(),
                shared: recv_shared.clone(),
                reports: rep_tx.clone(),
                counters: sender_counters.clone(),
            },
        )));
        n_recv += 1;
    }
    drop(rep_tx);

    // Latch every member, then see what the joins cost the server.
    let relatch_wait = Duration::from_millis(300) + Duration::from_micros(8 * n_members as u64);
    let _ = send_tx.send(SendCmd::Relatch);
    tokio::time::sleep(relatch_wait + Duration::from_millis(200)).await;
    report.setup.rss_after_join_bytes = rss(&pids);
    // Idle CPU per node (ns per s), everyone joined and silent.
    // (whole process, shard threads)
    let node_idle: Vec<Option<(f64, f64)>> = {
        let cpu = |pid: Option<i32>| {
            pid.map(|p| {
                let t = procfs::threads_cpu(p);
                (cpu_sum(&t, false), cpu_sum(&t, true))
            })
        };
        let a: Vec<Option<(u64, u64)>> = pids.iter().map(|p| cpu(*p)).collect();
        let t0 = mono_ns();
        tokio::time::sleep(Duration::from_secs(if cfg.cluster { 2 } else { 1 })).await;
        let b: Vec<Option<(u64, u64)>> = pids.iter().map(|p| cpu(*p)).collect();
        let secs = (mono_ns() - t0) as f64 / 1e9;
        a.iter()
            .zip(&b)
            .map(|(a, b)| {
                let (a, b) = ((*a)?, (*b)?);
                Some((
                    b.0.saturating_sub(a.0) as f64 / secs,
                    b.1.saturating_sub(a.1) as f64 / secs,
                ))
            })
            .collect()
    };
    let idle_cpu_per_s = node_idle
        .iter()
        .map(|x| x.map(|x| x.0))
        .sum::<Option<f64>>();
    report.setup.server_idle_cpu_pct = idle_cpu_per_s.map(|x| x / 1e7);
    if let (Some(a), Some(b)) = (
        report.setup.rss_before_bytes,
        report.setup.rss_after_join_bytes,
    ) {
        report.setup.rss_per_member_bytes = Some((b as f64 - a as f64) / n_members as f64);
    }

    // Controllers.
    let (phase_tx, phase_rx) = watch::channel(PhaseCtl {
        id: u32::MAX,
        running: false,
        active: 0,
        server: true,
        speakers_node: ANY_NODE,
        shutdown: false,
    });
    let max_burst = (timers.t2_ms as f64 / 1000.0 - 1.5).max(0.5);
    let (rec_tx, mut rec_rx) = mpsc::unbounded_channel::<(u32, FloorRecord)>();
    let mut floor_by_phase: BTreeMap<u32, FloorStats> = BTreeMap::new();
    let ctx = Arc::new(CtrlCtx {
        model: cfg.talk,
        members: cfg.members,
        nodes: servers.len() as u32,
        max_burst,
        packet_interval: Duration::from_nanos(1_000_000_000 / cfg.rate as u64),
        seed: cfg.seed,
        channels: channels.clone(),
        conns,
        sender: send_tx.clone(),
        phase: phase_rx,
        busy: Default::default(),
        records: rec_tx,
    });
    let mut ctrl_handles = Vec::new();
    for (ch, rx) in ctrl_rx.into_iter().enumerate() {
        ctrl_handles.push(tokio::spawn(run_channel(ch as u32, ctx.clone(), rx)));
    }

    // Phases.
    let plans = plan(cfg);
    let total: f64 = plans.iter().map(|p| p.duration.as_secs_f64() + 1.0).sum();
    eprintln!(
        "running {} phase(s), about {total:.0} s: talk {} ({:.0} % duty), {} pkt/s per speaker, payload {}",
        plans.len(),
        cfg.talk_text,
        cfg.talk.duty() * 100.0,
        cfg.rate,
        cfg.payload.describe()
    );
    let mut done: Vec<Done> = Vec::new();
    let mut crashed: Option<String> = None;
    let mut server_errors: Vec<String> = Vec::new();
    let mut lost_conns = 0usize;
    let mut shard_cpus: Vec<usize> = Vec::new();
    let mut harness_cpus: Vec<usize> = Vec::new();
    let mut knee_failed = false;
    let mut cur_target = Target::Server;
    let run_start = mono_ns();

    for (i, p) in plans.iter().enumerate() {
        if knee_failed {
            break;
        }
        let target = if p.server {
            Target::Server
        } else {
            match raw_addr {
                Some(a) => Target::Raw(a),
                None => Target::Server,
            }
        };
        target_cell.set(target);
        let _ = send_tx.send(SendCmd::Target(target));
        if target != cur_target && target == Target::Server {
            // Latching lapses after 30 s of raw phases: latch again before talking.
            let _ = send_tx.send(SendCmd::Relatch);
            tokio::time::sleep(relatch_wait).await;
        }
        cur_target = target;
        let s0 = snapshot(&servers, raw.as_ref(), &sender_counters).await;
        recv_shared.phase.store(recv_phase(i), Ordering::Release);
        let ctl = PhaseCtl {
            id: i as u32,
            running: true,
            active: p.active,
            server: p.server,
            speakers_node: p.speakers_node,
            shutdown: false,
        };
        let _ = phase_tx.send(ctl);
        let mut acc = Acc::default();
        let mut sec = Acc::default();
        let mut last_tick = Instant::now();
        let mut last_media = s0.media;
        let delivered0 = recv_shared.delivered.load(Ordering::Relaxed);
        let mut last_delivered = delivered0;
        // Expected deliveries as of the previous 100 ms tick: packets sent since are still in flight.
        let mut prev_expected = s0.expected;
        let started = Instant::now();
        while started.elapsed() < p.duration {
            tokio::time::sleep(Duration::from_millis(100)).await;
            while let Ok(r) = rep_rx.try_recv() {
                if r.phase == recv_phase(i) {
                    acc.add(&r);
                    sec.add(&r);
                }
            }
            while let Ok((ph, r)) = rec_rx.try_recv() {
                floor_by_phase.entry(ph).or_default().apply(r);
            }
            while let Ok(n) = notes_rx.try_recv() {
                match n {
                    ConnNote::Lost(e) => {
                        lost_conns += 1;
                        if lost_conns <= 3 {
                            server_errors.push(format!("connection lost: {e}"));
                        }
                    }
                    ConnNote::ServerError(e) if server_errors.len() < 10 => {
                        server_errors.push(format!("server error frame: {e}"));
                    }
                    _ => {}
                }
            }
            if let Some(st) = any_exited(&mut servers) {
                crashed = Some(st);
                break;
            }
            let delivered = recv_shared.delivered.load(Ordering::Relaxed);
            let loss = loss_pct(prev_expected - s0.expected, delivered - delivered0);
            prev_expected = sender_counters.expected.load(Ordering::Relaxed);
            if last_tick.elapsed() >= Duration::from_secs(1) {
                let dt = last_tick.elapsed().as_secs_f64();
                last_tick = Instant::now();
                let media = sender_counters.media.load(Ordering::Relaxed);
                let pps_in = (media - last_media) as f64 / dt;
                last_media = media;
                let pps_out = (delivered - last_delivered) as f64 / dt;
                last_delivered = delivered;
                eprintln!(
                    "[{:>5.1}s {:<9} {:>4.0}/{:.0}s] talking {:>5}  in {:>7.0}/s  out {:>8.0}/s  p50 {:>7.1} µs  p99 {:>8.1} µs  loss~ {:.3} %  viol {}",
                    (mono_ns() - run_start) as f64 / 1e9,
                    p.name,
                    started.elapsed().as_secs_f64(),
                    p.duration.as_secs_f64(),
                    ctx.busy.load(Ordering::Relaxed),
                    pps_in,
                    pps_out,
                    sec.latency.quantile(0.5) as f64 / 1e3,
                    sec.latency.quantile(0.99) as f64 / 1e3,
                    loss,
                    acc.counters.violations(),
                );
                if p.measured {
                    report.series.push(SeriesPoint {
                        t_s: (mono_ns() - run_start) as f64 / 1e9,
                        phase: p.name.clone(),
                        target: if p.server { "talkgroup" } else { "raw" }.into(),
                        pps_in,
                        pps_out,
                        p50_us: sec.latency.quantile(0.5) as f64 / 1e3,
                        p99_us: sec.latency.quantile(0.99) as f64 / 1e3,
                        max_us: sec.latency.quantile(1.0) as f64 / 1e3,
                    });
                }
                sec = Acc::default();
            }
        }
        // Stop talking, let everything drain.
        let _ = phase_tx.send(PhaseCtl {
            running: false,
            ..ctl
        });
        let wait_until = Instant::now() + Duration::from_secs(5);
        while ctx.busy.load(Ordering::Acquire) > 0 && Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let s1 = snapshot(&servers, raw.as_ref(), &sender_counters).await;
        recv_shared
            .phase
            .store(recv_phase(i) + 1, Ordering::Release);
        let fin_until = Instant::now() + Duration::from_secs(3);
        while acc.finals < n_recv && Instant::now() < fin_until {
            match rep_rx.recv_timeout(Duration::from_millis(50)) {
                Ok(r) if r.phase == recv_phase(i) => acc.add(&r),
                _ => {}
            }
        }
        while let Ok((ph, r)) = rec_rx.try_recv() {
            floor_by_phase.entry(ph).or_default().apply(r);
        }
        let floor_stats = floor_by_phase.remove(&(i as u32)).unwrap_or_default();
        let (lag_tx, lag_rx) = smpsc::channel();
        let _ = send_tx.send(SendCmd::TakeLag(lag_tx));
        let lag = lag_rx
            .recv_timeout(Duration::from_secs(1))
            .unwrap_or_default();

        // After the warm-up we know which server threads do the work: pin the harness away from them.
        if i == 0 && shard_cpus.is_empty() {
            shard_cpus = busy_pinned_cpus(&s0.threads, &s1.threads, pids[0]);
            report.server.pinned_cpus = shard_cpus.clone();
            if cfg.pin && !shard_cpus.is_empty() {
                let free: Vec<usize> = crate::sys::affinity_of(0)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|c| !shard_cpus.contains(c))
                    .collect();
                if !free.is_empty() {
                    pin_own_threads(
                        &free,
                        raw.as_ref().map(|r| r.counters.tid.load(Ordering::Acquire)),
                    );
                    harness_cpus = free;
                    report.harness.pinned_cpus = harness_cpus.clone();
                }
            }
            if let Some(r) = raw.as_ref() {
                let cpu = cfg.ceiling_cpu.or(shard_cpus.first().copied());
                if let Some(cpu) = cpu {
                    let tid = r.counters.tid.load(Ordering::Acquire);
                    pin_thread(tid, &[cpu]);
                }
            }
        }

        let result = phase_result(
            p,
            &s0,
            &s1,
            &acc,
            &floor_stats,
            &lag,
            &harness_cpus,
            &shard_cpus,
            idle_cpu_per_s,
            &node_idle,
            &pids,
            &mut report.warnings,
        );
        if p.kind == "knee-step" {
            let pass =
                result.loss_pct <= cfg.knee_loss_pct && result.latency.p99_us <= cfg.knee_p99_us;
            if !pass {
                knee_failed = true;
            }
        }
        done.push(Done {
            result,
            latency: acc.latency,
            switch: acc.switch,
            grant: floor_stats.grant.clone(),
        });
        if crashed.is_some() {
            break;
        }
    }

    // Shut down.
    let _ = phase_tx.send(PhaseCtl {
        id: u32::MAX,
        running: false,
        active: 0,
        server: true,
        speakers_node: ANY_NODE,
        shutdown: true,
    });
    let _ = send_tx.send(SendCmd::Shutdown);
    recv_shared.stop.store(true, Ordering::Release);
    let _ = sender_handle.join();
    for h in recv_handles {
        let _ = h.join();
    }
    drop(engine_tx);
    if let Some(h) = engine_handle {
        let _ = h.join();
    }
    report.harness.webrtc_rejected = engine_counters.rejected.load(Ordering::Relaxed);
    for c in &all_conn_tx {
        let _ = c.send(ConnCmd::Close);
    }
    for h in ctrl_handles {
        let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
    }
    for h in conn_handles {
        let _ = tokio::time::timeout(Duration::from_millis(500), h).await;
    }
    if crashed.is_none() {
        if let Some(st) = any_exited(&mut servers) {
            crashed = Some(st);
        }
    }
    report.setup.rss_end_bytes = rss(&pids);
    report.setup.ws_frames_in = conn_ctx.frames.snapshot();
    drop(raw);

    finish(cfg, &mut report, done, crashed.clone());
    if lost_conns > 0 {
        report.warnings.push(format!(
            "{lost_conns} WebSocket connection(s) were lost during the run"
        ));
    }
    report.warnings.extend(server_errors);
    if let Some(c) = &crashed {
        for s in &mut servers {
            if let (Some(log), Some(_)) = (s.log.clone(), s.exited()) {
                report.warnings.push(format!(
                    "server log tail ({}):\n{}",
                    log.display(),
                    crate::server::tail(&log, 15)
                ));
            }
        }
        report.server.crashed = Some(c.clone());
    }
    for s in &mut servers {
        s.stop();
    }
    Ok(report)
}

/// `Some(description)` once any node is gone.
fn any_exited(servers: &mut [Server]) -> Option<String> {
    let n = servers.len();
    servers.iter_mut().enumerate().find_map(|(i, s)| {
        s.exited()
            .map(|st| if n > 1 { format!("node {i}: {st}") } else { st })
    })
}

/// CPUs of the server threads that did at least a quarter of the busiest thread's work over the
/// warm-up and are pinned to a single CPU: the shards' cores.
fn busy_pinned_cpus(
    a: &BTreeMap<i32, ThreadCpu>,
    b: &BTreeMap<i32, ThreadCpu>,
    pid: Option<i32>,
) -> Vec<usize> {
    if pid.is_none() {
        return Vec::new();
    }
    let deltas: Vec<(i32, u64)> = b
        .iter()
        .map(|(tid, t)| {
            (
                *tid,
                t.run_ns
                    .saturating_sub(a.get(tid).map(|x| x.run_ns).unwrap_or(0)),
            )
        })
        .collect();
    let max = deltas.iter().map(|d| d.1).max().unwrap_or(0);
    if max == 0 {
        return pid.map(procfs::pinned_cpus).unwrap_or_default();
    }
    let mut cpus: Vec<usize> = deltas
        .iter()
        .filter(|(_, d)| *d * 4 >= max)
        .filter_map(|(tid, _)| crate::sys::affinity_of(*tid).ok())
        .filter(|m| m.len() == 1)
        .map(|m| m[0])
        .collect();
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

fn pin_thread(tid: i32, cpus: &[usize]) {
    // SAFETY: an all-zero cpu_set_t is valid; tid is a thread of this process.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Pin every thread of this process but `except` (the raw forwarder, which sits on the server's core).
pub fn pin_own_threads(cpus: &[usize], except: Option<i32>) {
    let me = std::process::id() as i32;
    for tid in procfs::threads_cpu(me).keys() {
        if Some(*tid) != except {
            pin_thread(*tid, cpus);
        }
    }
}

fn loss_pct(expected: u64, delivered: u64) -> f64 {
    if expected == 0 {
        0.0
    } else {
        expected.saturating_sub(delivered) as f64 * 100.0 / expected as f64
    }
}

#[allow(clippy::too_many_arguments)]
fn phase_result(
    p: &Plan,
    s0: &Snapshot,
    s1: &Snapshot,
    acc: &Acc,
    floor: &FloorStats,
    lag: &LatencyHist,
    harness_cpus: &[usize],
    shard_cpus: &[usize],
    idle_cpu_per_s: Option<f64>,
    node_idle: &[Option<(f64, f64)>],
    pids: &[Option<i32>],
    warnings: &mut Vec<String>,
) -> PhaseResult {
    let secs = (s1.t_ns - s0.t_ns) as f64 / 1e9;
    let expected = s1.expected - s0.expected;
    let sent = s1.media - s0.media;
    let delivered = acc.counters.unique;
    let mut r = PhaseResult {
        name: p.name.clone(),
        kind: p.kind.into(),
        target: if p.server { "talkgroup" } else { "raw" }.into(),
        measured: p.measured,
        active_channels: p.active,
        seconds: secs,
        latency: acc.latency.summary(),
        switch: acc.switch.summary(),
        grant: floor.grant.summary(),
        release_to_idle: floor.release_to_idle.summary(),
        send_lag: lag.summary(),
        sent_packets: sent,
        send_errors: s1.send_errors - s0.send_errors,
        expected_deliveries: expected,
        delivered,
        loss_pct: loss_pct(expected, delivered),
        recv: acc.counters,
        seq: acc.seq,
        floor: floor.counts(),
        pps_in: sent as f64 / secs.max(1e-9),
        pps_out: delivered as f64 / secs.max(1e-9),
        ..Default::default()
    };
    if p.server {
        let mut sp = ServerPhase::default();
        if let (Some(m0), Some(m1)) = (&s0.metrics, &s1.metrics) {
            let d =
                |name: &str| -> Option<f64> { Some(m1.sum(name)? - m0.sum(name).unwrap_or(0.0)) };
            sp.packets_in = d(metrics::PACKETS_IN);
            sp.forwarded = d(metrics::PACKETS_FORWARDED);
            let before: BTreeMap<String, f64> =
                m0.series(metrics::PACKETS_DROPPED).into_iter().collect();
            for (labels, v) in m1.series(metrics::PACKETS_DROPPED) {
                let dv = v - before.get(&labels).copied().unwrap_or(0.0);
                if dv != 0.0 {
                    sp.dropped.insert(labels, dv);
                }
            }
            sp.metrics_pps_in = sp.packets_in.map(|x| x / secs.max(1e-9));
            sp.metrics_pps_out = sp.forwarded.map(|x| x / secs.max(1e-9));
        }
        if !s1.threads.is_empty() {
            let mut threads: Vec<ThreadDelta> = s1
                .threads
                .iter()
                .map(|(tid, t)| ThreadDelta {
                    tid: *tid,
                    name: t.name.clone(),
                    cpu_ns: t
                        .run_ns
                        .saturating_sub(s0.threads.get(tid).map(|x| x.run_ns).unwrap_or(0)),
                })
                .collect();
            threads.sort_by_key(|t| std::cmp::Reverse(t.cpu_ns));
            let total: u64 = threads.iter().map(|t| t.cpu_ns).sum();
            sp.cpu_ns = Some(total);
            if let Some(t) = threads.first() {
                sp.busiest_thread = Some(format!("{} ({})", t.name, t.tid));
                sp.busiest_thread_cpu_ns = Some(t.cpu_ns);
            }
            threads.truncate(16);
            sp.threads = threads;
        }
        if let (Some(a), Some(b)) = (s0.proc_cpu, s1.proc_cpu) {
            sp.cpu_ns_stat = Some(b.saturating_sub(a));
        }
        let fwd = sp
            .forwarded
            .filter(|f| *f > 0.0)
            .or((delivered > 0).then_some(delivered as f64));
        if let (Some(cpu), Some(f)) = (sp.cpu_ns, fwd) {
            sp.cpu_per_fwd_ns = Some(cpu as f64 / f);
            sp.shard_cpu_per_fwd_ns = sp.busiest_thread_cpu_ns.map(|b| b as f64 / f);
            if let Some(idle) = idle_cpu_per_s {
                sp.cpu_per_fwd_marginal_ns = Some(((cpu as f64 - idle * secs) / f).max(0.0));
            }
        }
        if sp.forwarded.is_none() && s1.metrics.is_some() && p.measured {
            push_once(
                warnings,
                "the server's /metrics has no talkgroup_packets_forwarded_total: CPU per packet uses what listeners received",
            );
        }
        sp.rss_bytes = None;
        r.server = Some(sp);
        r.nodes = node_phases(s0, s1, secs, node_idle, pids);
    } else if let (Some(a), Some(b)) = (s0.raw, s1.raw) {
        let fwd = b.1 - a.1;
        let cpu = match (a.3, b.3) {
            (Some(x), Some(y)) => Some(y.saturating_sub(x)),
            _ => None,
        };
        r.raw = Some(RawPhase {
            received: b.0 - a.0,
            forwarded: fwd,
            dropped: b.2 - a.2,
            cpu_ns: cpu,
            cpu_per_fwd_ns: cpu.filter(|_| fwd > 0).map(|c| c as f64 / fwd as f64),
        });
    }
    // The sender's pre-deadline spin yields to anything runnable: it is idle time, not load.
    let spin_pct = (s1.spin_ns - s0.spin_ns) as f64 / 1e9 / secs.max(1e-9) * 100.0;
    r.sender_spin_pct = spin_pct;
    if let (Some(a), Some(b)) = (s0.own_cpu, s1.own_cpu) {
        let total = b.saturating_sub(a) as f64 / 1e9 / secs.max(1e-9) * 100.0;
        r.harness_cpu_pct = Some((total - spin_pct).max(0.0));
    }
    r.cpu_busy_pct = procfs::cpu_busy(&s0.cpus, &s1.cpus)
        .into_iter()
        .map(|(c, f)| (c, (f * 1000.0).round() / 10.0))
        .collect();
    for (k, v) in &s1.udp {
        let d = *v as i64 - s0.udp.get(k).copied().unwrap_or(0) as i64;
        if d != 0 {
            r.udp.insert(k.clone(), d);
        }
    }
    let overloaded = if harness_cpus.is_empty() {
        let allowed = crate::sys::affinity_of(0)
            .map(|v| v.len())
            .unwrap_or(1)
            .max(1) as f64;
        r.harness_cpu_pct.is_some_and(|c| c / allowed > 80.0)
    } else {
        let spin_per_cpu = spin_pct / harness_cpus.len() as f64;
        harness_cpus.iter().any(|c| {
            r.cpu_busy_pct
                .get(c)
                .is_some_and(|b| *b - spin_per_cpu > 80.0)
        })
    };
    r.harness_overloaded = overloaded;
    if overloaded && p.measured {
        warnings.push(format!(
            "{}: the harness's core was > 80 % busy: latency and loss may be the harness's, not the server's",
            p.name
        ));
    }
    if p.measured && p.server {
        for c in shard_cpus {
            if let Some(b) = r.cpu_busy_pct.get(c).filter(|b| **b > 95.0) {
                let shard_pct = r
                    .server
                    .as_ref()
                    .and_then(|s| s.busiest_thread_cpu_ns)
                    .map(|ns| ns as f64 / 1e7 / secs.max(1e-9))
                    .unwrap_or(0.0);
                warnings.push(format!(
                    "{}: CPU {c}, the server's shard core, was {b:.0} % busy (its busiest thread {shard_pct:.0} %): \
                     at capacity{}",
                    p.name,
                    if *b - shard_pct > 30.0 {
                        ", much of it other work (softirq, other processes)"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    if p.measured && r.send_lag.p99_us > 1000.0 {
        warnings.push(format!(
            "{}: the sender ran late (p99 {:.0} µs behind schedule); that delay is in the latency figures",
            p.name, r.send_lag.p99_us
        ));
    }
    if let Some(&e) = r.udp.get("RcvbufErrors") {
        if e > 0 && p.measured {
            warnings.push(format!(
                "{}: the kernel dropped {e} datagrams for full receive buffers (RcvbufErrors)",
                p.name
            ));
        }
    }
    r
}

/// Per-node CPU and counters over a phase.
fn node_phases(
    s0: &Snapshot,
    s1: &Snapshot,
    secs: f64,
    idle: &[Option<(f64, f64)>],
    pids: &[Option<i32>],
) -> Vec<NodePhase> {
    s0.nodes
        .iter()
        .zip(&s1.nodes)
        .enumerate()
        .map(|(i, ((m0, c0, h0), (m1, c1, h1)))| {
            let d = |name: &str| match (m0, m1) {
                (Some(a), Some(b)) => b.sum(name).unwrap_or(0.0) - a.sum(name).unwrap_or(0.0),
                _ => 0.0,
            };
            NodePhase {
                node: i as u32,
                pid: pids.get(i).copied().flatten(),
                cpu_ns: c1.saturating_sub(*c0) as f64,
                idle_ns: idle.get(i).copied().flatten().map_or(0.0, |x| x.0) * secs,
                shard_cpu_ns: h1.saturating_sub(*h0) as f64,
                shard_idle_ns: idle.get(i).copied().flatten().map_or(0.0, |x| x.1) * secs,
                packets_in: d(metrics::PACKETS_IN),
                forwarded: d(metrics::PACKETS_FORWARDED),
                relay_sent: d(metrics::RELAY_SENT),
                relay_in: d(metrics::RELAY_IN),
                relay_dropped: d(metrics::RELAY_DROPPED),
                relay_dropped_by_reason: match (m0, m1) {
                    (Some(a), Some(b)) => {
                        metrics::delta_by_label(a, b, metrics::RELAY_DROPPED, "reason")
                    }
                    _ => BTreeMap::new(),
                },
            }
        })
        .collect()
}

/// The ceiling ratio the issue sets: ≥ 0.9 for plain RTP; ≥ 0.7 as soon as WebRTC listeners are in the
/// mix (their SRTP work has no counterpart in the raw forwarder).
fn ceiling_goal(transport: &str) -> f64 {
    if transport == "rtp" {
        0.9
    } else {
        0.7
    }
}

fn push_once(w: &mut Vec<String>, s: &str) {
    if !w.iter().any(|x| x == s) {
        w.push(s.to_string());
    }
}

/// Summary, ceiling, knee, curves and verdict.
fn finish(cfg: &Config, report: &mut Report, done: Vec<Done>, crashed: Option<String>) {
    // Knee first: it decides which steps the summary covers.
    if cfg.find_knee {
        let steps: Vec<KneeStep> = done
            .iter()
            .filter(|d| d.result.kind == "knee-step")
            .map(|d| KneeStep {
                active_channels: d.result.active_channels,
                pps_in: d.result.pps_in,
                pps_out: d.result.pps_out,
                p50_us: d.result.latency.p50_us,
                p99_us: d.result.latency.p99_us,
                loss_pct: d.result.loss_pct,
                server_cpu_per_fwd_ns: d.result.server.as_ref().and_then(|s| s.cpu_per_fwd_ns),
                pass: d.result.loss_pct <= cfg.knee_loss_pct
                    && d.result.latency.p99_us <= cfg.knee_p99_us,
            })
            .collect();
        let knee = steps.iter().take_while(|s| s.pass).last().cloned();
        let failing = steps.iter().find(|s| !s.pass);
        let note = match failing {
            Some(f) if knee.is_none() => format!(
                "the first step ({} channels, {:.0} pkt/s out) is already over the limits (p99 {:.0} µs, loss {:.3} %): \
                 lower --channels",
                f.active_channels, f.pps_out, f.p99_us, f.loss_pct
            ),
            Some(f) => format!(
                "first step over the limits: {} channels, {:.0} pkt/s out, p99 {:.0} µs, loss {:.3} %",
                f.active_channels, f.pps_out, f.p99_us, f.loss_pct
            ),
            None => format!(
                "not reached: every step passed up to {} channels; raise --channels to push further",
                steps.last().map(|s| s.active_channels).unwrap_or(0)
            ),
        };
        report.knee = Some(Knee {
            loss_limit_pct: cfg.knee_loss_pct,
            p99_limit_us: cfg.knee_p99_us,
            found: failing.is_some(),
            steps,
            knee,
            note,
        });
    }
    // A knee search summarises the steps up to the knee (all of them when even the first failed).
    let none_passed = report.knee.as_ref().is_some_and(|k| k.knee.is_none());
    let in_summary = |d: &Done| -> bool {
        d.result.measured
            && d.result.target == "talkgroup"
            && (d.result.kind != "knee-step"
                || none_passed
                || (d.result.loss_pct <= cfg.knee_loss_pct
                    && d.result.latency.p99_us <= cfg.knee_p99_us))
    };
    let mut lat = LatencyHist::new();
    let mut sw = LatencyHist::new();
    let mut gr = LatencyHist::new();
    let mut raw_lat = LatencyHist::new();
    let mut s = Summary::default();
    let (mut secs, mut sent, mut cpu, mut fwd) = (0.0, 0u64, 0u64, 0.0);
    let mut have_cpu = false;
    for d in &done {
        if d.result.measured && d.result.target == "raw" {
            raw_lat.merge(&d.latency);
        }
        if !in_summary(d) {
            continue;
        }
        lat.merge(&d.latency);
        sw.merge(&d.switch);
        gr.merge(&d.grant);
        s.expected_deliveries += d.result.expected_deliveries;
        s.delivered += d.result.delivered;
        s.duplicates += d.result.seq.duplicates;
        s.reordered += d.result.seq.reordered;
        s.seq_gap_events += d.result.seq.gap_events;
        s.seq_lost += d.result.seq.lost;
        s.protocol_violations += d.result.recv.violations();
        secs += d.result.seconds;
        sent += d.result.sent_packets;
        if let Some(sp) = &d.result.server {
            if let Some(c) = sp.cpu_ns {
                cpu += c;
                have_cpu = true;
                fwd += sp.forwarded.unwrap_or(d.result.delivered as f64);
            }
        }
    }
    s.latency = lat.summary();
    s.switch = sw.summary();
    s.grant = gr.summary();
    s.loss_pct = loss_pct(s.expected_deliveries, s.delivered);
    s.pps_in = sent as f64 / secs.max(1e-9);
    s.pps_out = s.delivered as f64 / secs.max(1e-9);
    s.server_cpu_per_fwd_ns = (have_cpu && fwd > 0.0).then(|| cpu as f64 / fwd);
    report.summary = s;
    report.curves = Curves {
        forward: lat.percentile_curve(),
        raw: raw_lat.percentile_curve(),
        grant: gr.percentile_curve(),
        switch: sw.percentile_curve(),
    };

    if cfg.ceiling {
        let tg: Vec<Option<f64>> = done
            .iter()
            .filter(|d| d.result.kind == "ceiling" && d.result.target == "talkgroup")
            .map(|d| d.result.server.as_ref().and_then(|s| s.cpu_per_fwd_ns))
            .collect();
        let rw: Vec<Option<f64>> = done
            .iter()
            .filter(|d| d.result.kind == "ceiling" && d.result.target == "raw")
            .map(|d| d.result.raw.as_ref().and_then(|s| s.cpu_per_fwd_ns))
            .collect();
        let rounds: Vec<CeilingRound> = tg
            .iter()
            .zip(rw.iter().chain(std::iter::repeat(&None)))
            .map(|(a, b)| CeilingRound {
                talkgroup_cpu_per_fwd_ns: *a,
                raw_cpu_per_fwd_ns: *b,
                ratio: match (a, b) {
                    (Some(a), Some(b)) if *a > 0.0 => Some(b / a),
                    _ => None,
                },
            })
            .collect();
        let shard: Vec<f64> = done
            .iter()
            .filter(|d| d.result.kind == "ceiling" && d.result.target == "talkgroup")
            .filter_map(|d| {
                d.result
                    .server
                    .as_ref()
                    .and_then(|s| s.shard_cpu_per_fwd_ns)
            })
            .collect();
        let mts = median(&shard);
        let mt = median(&tg.iter().flatten().copied().collect::<Vec<_>>());
        let mr = median(&rw.iter().flatten().copied().collect::<Vec<_>>());
        let ratio = match (mt, mr) {
            (Some(t), Some(r)) if t > 0.0 => Some(r / t),
            _ => None,
        };
        report.ceiling = Some(Ceiling {
            cpu: cfg
                .ceiling_cpu
                .or(report.server.pinned_cpus.first().copied()),
            rounds,
            median_talkgroup_ns: mt,
            median_raw_ns: mr,
            ratio,
            median_talkgroup_shard_ns: mts,
            ratio_shard_thread: match (mts, mr) {
                (Some(t), Some(r)) if t > 0.0 => Some(r / t),
                _ => None,
            },
            goal: ceiling_goal(&cfg.transport),
            meets_goal: ratio.map(|r| r >= ceiling_goal(&cfg.transport)),
            raw_latency: raw_lat.summary(),
        });
        if ratio.is_none() {
            report.warnings.push(
                "ceiling ratio unavailable (no server CPU figures or nothing forwarded)".into(),
            );
        }
    }

    report.phases = done.into_iter().map(|d| d.result).collect();
    if report.summary.protocol_violations > 0 {
        let mut c = RecvCounters::default();
        for p in report.phases.iter().filter(|p| p.target == "talkgroup") {
            c.add(&p.recv);
        }
        report.warnings.push(format!(
            "protocol v1 violations at listeners: echo {} misrouted {} ssrc {} payload-type {} marker-missing {} ts-backwards {}",
            c.echo, c.misrouted, c.ssrc_mismatch, c.pt_mismatch, c.marker_missing, c.ts_backwards
        ));
    }
    let mut v = Verdict {
        pass: true,
        exit_code: 0,
        reasons: Vec::new(),
    };
    if let Some(c) = crashed {
        v.pass = false;
        v.exit_code = EXIT_CRASH;
        v.reasons.push(format!("the server crashed: {c}"));
    }
    if let Some(limit) = cfg.fail_on_loss {
        if report.summary.loss_pct > limit {
            v.pass = false;
            if v.exit_code == 0 {
                v.exit_code = EXIT_LOSS;
            }
            v.reasons.push(format!(
                "loss {:.3} % > --fail-on-loss {limit} %",
                report.summary.loss_pct
            ));
        }
    }
    if report.summary.expected_deliveries == 0 && v.exit_code == 0 {
        v.reasons
            .push("nothing was sent in the measured phases".into());
    }
    report.verdict = v;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{resolve, Args};
    use clap::Parser;

    fn cfg(extra: &[&str]) -> Config {
        let mut v = vec!["loadtest"];
        v.extend_from_slice(extra);
        resolve(&Args::try_parse_from(v).unwrap()).unwrap()
    }

    #[test]
    fn plans() {
        let p = plan(&cfg(&["--warmup", "1s", "--duration", "5s"]));
        assert_eq!(
            p.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["warmup", "measure"]
        );
        let p = plan(&cfg(&[
            "--warmup",
            "0",
            "--ceiling",
            "--ceiling-rounds",
            "2",
        ]));
        let names: Vec<_> = p.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["A1-tg", "B1-raw", "A2-tg", "B2-raw"]);
        assert!(p[0].server && !p[1].server);
        let p = plan(&cfg(&[
            "--warmup",
            "0",
            "--find-knee",
            "--knee-steps",
            "4",
            "--channels",
            "10",
        ]));
        assert_eq!(
            p.iter().map(|p| p.active).collect::<Vec<_>>(),
            [3, 5, 8, 10]
        );
        let knee = [
            "--warmup",
            "1s",
            "--find-knee",
            "--knee-steps",
            "4",
            "--channels",
            "10",
        ];
        let p = plan(&cfg(&knee));
        assert_eq!((p[0].kind, p[0].active), ("warmup", 3));
    }

    #[test]
    fn ceiling_goals_by_transport() {
        assert_eq!(ceiling_goal("rtp"), 0.9);
        assert_eq!(ceiling_goal("webrtc"), 0.7);
        assert_eq!(ceiling_goal("mixed"), 0.7);
    }

    #[test]
    fn loss_percentage() {
        assert_eq!(loss_pct(0, 0), 0.0);
        assert_eq!(loss_pct(1000, 999), 0.1);
        assert_eq!(loss_pct(10, 12), 0.0);
    }
}
