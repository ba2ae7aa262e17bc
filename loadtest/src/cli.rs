//! Command line, and its merge with a scenario file into the resolved [`Config`] a run uses.

use crate::scenario::{parse_duration, PayloadModel, Scenario, TalkModel};
use clap::Parser;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Load harness for talkgroup (protocol v1, plain RTP, 127.0.0.1 only).
///
/// Drives a running server (`--server`) or starts one (`--spawn-server`, using the release binary that
/// `cargo build --release` puts next to this one), for a bounded time, and writes a JSON and an SVG report.
#[derive(Debug, Parser, Clone)]
#[command(name = "loadtest", version)]
pub struct Args {
    /// Scenario to load from scenarios/NAME.toml; flags given here override its values.
    #[arg(long)]
    pub scenario: Option<String>,
    /// Directory holding scenario files [default: <workspace>/scenarios].
    #[arg(long)]
    pub scenarios_dir: Option<PathBuf>,
    /// HTTP address of a running server (loopback only).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub server: SocketAddr,
    /// Start the server: `talkgroup serve --http 127.0.0.1:PORT --media-port BASE --shards N`.
    #[arg(long)]
    pub spawn_server: bool,
    /// Server binary for --spawn-server [default: talkgroup next to this binary, else
    /// <workspace>/target/release/talkgroup].
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Extra arguments for the spawned server (after `serve …`), space separated.
    #[arg(long, allow_hyphen_values = true)]
    pub server_args: Option<String>,
    /// Shards of the spawned server.
    #[arg(long)]
    pub shards: Option<u32>,
    /// Nodes to spawn (with --spawn-server): N > 1 starts a redis-server and N talkgroup nodes sharing it,
    /// spreads each channel's members round robin over them, and measures CPU per relayed packet
    /// against a 1-node reference run of the same load.
    #[arg(long)]
    pub nodes: Option<u32>,
    /// Media base port of the spawned server [default: a free range].
    #[arg(long)]
    pub media_port: Option<u16>,
    /// PID of an already running server, for its CPU and RSS [default: the only process named talkgroup].
    #[arg(long)]
    pub server_pid: Option<i32>,
    /// Channels.
    #[arg(long)]
    pub channels: Option<u32>,
    /// Members per channel (one speaker at a time, the rest listen).
    #[arg(long)]
    pub members: Option<u32>,
    /// Media transport: `rtp` (plain RTP), `webrtc` (every member a str0m WebRTC client: ICE, DTLS,
    /// SRTP) or `mixed` (odd slots of every channel WebRTC, even slots plain RTP).
    #[arg(long)]
    pub transport: Option<String>,
    /// Measured time (each phase, in --ceiling and --find-knee runs), e.g. 15s, 2m.
    #[arg(long)]
    pub duration: Option<String>,
    /// Unmeasured warm-up before the first phase.
    #[arg(long)]
    pub warmup: Option<String>,
    /// Talk model: `constant` (floor always held), `exp:BURST,GAP` (exponential means, e.g. exp:5s,10s) or
    /// `const:BURST,GAP`. A zero gap makes the next speaker press on `idle` (switch latency is timed).
    #[arg(long)]
    pub talk: Option<String>,
    /// Packets per second per speaker (50 = 20 ms Opus frames).
    #[arg(long)]
    pub rate: Option<u32>,
    /// Payload size model: `60-160` (uniform), `N` (fixed) or `opus` (real frame sizes).
    #[arg(long)]
    pub payload: Option<String>,
    /// The Opus frames file for `--payload opus` [default: <workspace>/../shared/data/speech.opus20].
    #[arg(long)]
    pub opus_file: Option<PathBuf>,
    /// Members joined per WebSocket connection (one per channel on a connection).
    #[arg(long)]
    pub members_per_ws: Option<u32>,
    /// Ask for presence events (off by default: big channels would drown in them).
    #[arg(long)]
    pub presence: bool,
    /// Member sockets per loopback address before moving to the next 127.0.x.y.
    #[arg(long, default_value_t = 20_000)]
    pub per_ip: usize,
    /// Member sockets: 0 = one per member while descriptors last, else that many shared sockets
    /// (members told apart by their 127.0.x.y address, IP_PKTINFO).
    #[arg(long, default_value_t = 0)]
    pub sockets: usize,
    /// Keep-alive (latching) period per member.
    #[arg(long, default_value = "4s")]
    pub keepalive: String,
    /// The sender spins (yielding) this many µs before each deadline instead of sleeping through it: VM
    /// timer wake-ups overshoot by 50–150 µs, which would otherwise show up as latency.
    #[arg(long, default_value_t = 200)]
    pub spin_us: u64,
    /// Receiver threads.
    #[arg(long, default_value_t = 1)]
    pub recv_threads: usize,
    /// Also run the raw sendmmsg forwarder under the same load, alternating A B A B, and report
    /// talkgroup's CPU per forwarded packet against it.
    #[arg(long)]
    pub ceiling: bool,
    /// A B rounds in --ceiling mode.
    #[arg(long, default_value_t = 2)]
    pub ceiling_rounds: u32,
    /// CPU for the raw forwarder [default: the CPU the server's shard is pinned to].
    #[arg(long)]
    pub ceiling_cpu: Option<usize>,
    /// Raise the offered load (active channels) step by step until loss or p99 crosses the limits.
    #[arg(long)]
    pub find_knee: bool,
    /// Steps of the knee search (channels/steps more each time).
    #[arg(long, default_value_t = 8)]
    pub knee_steps: u32,
    /// Loss (%) that marks the knee.
    #[arg(long, default_value_t = 0.1)]
    pub knee_loss: f64,
    /// p99 latency that marks the knee.
    #[arg(long, default_value = "5ms")]
    pub knee_p99: String,
    /// Exit with status 2 when loss (%) exceeds this; 0 fails on any loss. (A run that delivered nothing,
    /// saw protocol violations or failed to send fails whatever this says.)
    #[arg(long)]
    pub fail_on_loss: Option<f64>,
    /// Report directory [default: <workspace>/target/loadtest].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Random seed (talk model, payload sizes).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Do not pin the harness to the CPUs the server's shards leave free.
    #[arg(long)]
    pub no_pin: bool,
    /// Print the scenarios and exit.
    #[arg(long)]
    pub list_scenarios: bool,
}

/// Everything a run needs, resolved.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub name: String,
    pub description: String,
    pub server: SocketAddr,
    pub spawn_server: bool,
    pub server_bin: Option<PathBuf>,
    pub server_args: Vec<String>,
    pub shards: u32,
    pub nodes: u32,
    /// Spawn Redis and the node(s) with `--store redis` (true with nodes > 1, and for the 1-node
    /// reference run of a multi-node benchmark).
    pub cluster: bool,
    /// Speakers only on node 0 in an extra phase (the relay's send and receive sides apart).
    pub split_phase: bool,
    pub media_port: Option<u16>,
    pub server_pid: Option<i32>,
    pub channels: u32,
    pub members: u32,
    pub transport: String,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub talk: TalkModel,
    pub talk_text: String,
    pub rate: u32,
    pub payload: PayloadModel,
    pub members_per_ws: u32,
    pub presence: bool,
    pub per_ip: usize,
    pub sockets: usize,
    pub spin_us: u64,
    pub keepalive_s: f64,
    pub recv_threads: usize,
    pub ceiling: bool,
    pub ceiling_rounds: u32,
    pub ceiling_cpu: Option<usize>,
    pub find_knee: bool,
    pub knee_steps: u32,
    pub knee_loss_pct: f64,
    pub knee_p99_us: f64,
    pub fail_on_loss: Option<f64>,
    pub out: PathBuf,
    pub seed: u64,
    pub pin: bool,
}

impl Config {
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_s)
    }

    pub fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup_s)
    }

    pub fn total_members(&self) -> usize {
        self.channels as usize * self.members as usize
    }
}

/// The workspace root: two levels above this binary (`target/release/loadtest`) when it has a
/// Cargo.toml, else the source tree this crate was built from.
pub fn workspace_root() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(root) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            if root.join("Cargo.toml").exists() && root.join("loadtest").exists() {
                return root.to_path_buf();
            }
        }
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

pub fn scenarios_dir(args: &Args) -> PathBuf {
    args.scenarios_dir
        .clone()
        .unwrap_or_else(|| workspace_root().join("scenarios"))
}

/// Merge `args` over the scenario (if any) over the defaults, and validate.
pub fn resolve(args: &Args) -> Result<Config, String> {
    let (sc, name) = match &args.scenario {
        Some(n) => {
            let (sc, path) = Scenario::load(n, &scenarios_dir(args))?;
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or(n.clone());
            (sc, stem)
        }
        None => (Scenario::default(), "adhoc".to_string()),
    };
    if !args.server.ip().is_loopback() {
        return Err(format!(
            "--server {}: the harness only targets loopback (127.0.0.0/8)",
            args.server
        ));
    }
    let transport = args
        .transport
        .clone()
        .or(sc.transport.clone())
        .unwrap_or_else(|| "rtp".into());
    if !matches!(transport.as_str(), "rtp" | "webrtc" | "mixed") {
        return Err(format!(
            "--transport {transport}: expected `rtp` (plain RTP), `webrtc` (every member a WebRTC peer) or \
             `mixed` (odd slots of every channel WebRTC, even slots plain RTP)"
        ));
    }
    let channels = args.channels.or(sc.channels).unwrap_or(20);
    let members = args.members.or(sc.members).unwrap_or(4);
    if channels == 0 {
        return Err("--channels must be at least 1".into());
    }
    if !(2..=65_535).contains(&members) {
        return Err("--members must be 2..=65535 (a speaker and at least one listener)".into());
    }
    let duration = parse_duration(
        args.duration
            .as_deref()
            .or(sc.duration.as_deref())
            .unwrap_or("15s"),
    )?;
    let warmup = parse_duration(
        args.warmup
            .as_deref()
            .or(sc.warmup.as_deref())
            .unwrap_or("1s"),
    )?;
    if duration.is_zero() {
        return Err("--duration must be > 0".into());
    }
    if duration > Duration::from_secs(3600) {
        return Err("--duration is capped at 1 h: runs must be bounded".into());
    }
    let talk_text = args
        .talk
        .clone()
        .or(sc.talk.clone())
        .unwrap_or_else(|| "exp:5s,10s".into());
    let talk = TalkModel::parse(&talk_text)?;
    let rate = args.rate.or(sc.rate).unwrap_or(50);
    if !(1..=1000).contains(&rate) {
        return Err("--rate must be 1..=1000 packets/s".into());
    }
    let opus_file = args
        .opus_file
        .clone()
        .unwrap_or_else(|| workspace_root().join("../shared/data/speech.opus20"));
    let payload_text = args
        .payload
        .clone()
        .or(sc.payload.clone())
        .unwrap_or_else(|| "60-160".into());
    let payload = PayloadModel::parse(&payload_text, || {
        std::fs::read(&opus_file)
            .map(|b| crate::scenario::opus_frame_sizes(&b))
            .map_err(|e| {
                format!(
                    "--payload opus needs {}: {e} (or give --opus-file)",
                    opus_file.display()
                )
            })
    })?;
    let members_per_ws = args
        .members_per_ws
        .or(sc.members_per_ws)
        .unwrap_or(100)
        .max(1);
    let keepalive = parse_duration(&args.keepalive)?;
    if keepalive > Duration::from_secs(5) || keepalive < Duration::from_millis(100) {
        return Err("--keepalive must be 100ms..=5s (protocol v1: at least every 5 s)".into());
    }
    let knee_p99 = parse_duration(&args.knee_p99)?;
    if args.ceiling && args.find_knee {
        return Err("--ceiling and --find-knee are separate runs; pick one".into());
    }
    let fail_on_loss = args.fail_on_loss.or(sc.fail_on_loss);
    if fail_on_loss.is_some_and(|l| !(0.0..=100.0).contains(&l)) {
        return Err("--fail-on-loss is a percentage, 0 (any loss fails) to 100".into());
    }
    let nodes = args.nodes.or(sc.nodes).unwrap_or(1).max(1);
    if nodes > 1 && !args.spawn_server {
        return Err(
            "--nodes > 1 needs --spawn-server (the harness starts Redis and the nodes)".into(),
        );
    }
    if nodes > 1 && (args.ceiling || args.find_knee) {
        return Err("--nodes > 1 is its own benchmark: not with --ceiling or --find-knee".into());
    }
    if nodes > 16 {
        return Err("--nodes is capped at 16".into());
    }
    // Relay targets are refreshed every second and a press may be denied `unavailable` until the store
    // subscription is up: give the cluster a few seconds before measuring.
    let warmup = if nodes > 1 {
        warmup.max(Duration::from_secs(5))
    } else {
        warmup
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/loadtest"));
    Ok(Config {
        description: sc.description.clone().unwrap_or_default(),
        name,
        server: args.server,
        spawn_server: args.spawn_server,
        server_bin: args.server_bin.clone(),
        server_args: args
            .server_args
            .as_deref()
            .map(|s| s.split_whitespace().map(String::from).collect())
            .unwrap_or_default(),
        shards: args.shards.or(sc.shards).unwrap_or(1).max(1),
        nodes,
        cluster: nodes > 1,
        split_phase: nodes > 1,
        media_port: args.media_port,
        server_pid: args.server_pid,
        channels,
        members,
        transport,
        duration_s: duration.as_secs_f64(),
        warmup_s: warmup.as_secs_f64(),
        talk,
        talk_text,
        rate,
        payload,
        members_per_ws,
        presence: args.presence || sc.presence.unwrap_or(false),
        per_ip: args.per_ip.max(1),
        sockets: args.sockets,
        spin_us: args.spin_us.min(10_000),
        keepalive_s: keepalive.as_secs_f64(),
        recv_threads: args.recv_threads.clamp(1, 16),
        ceiling: args.ceiling,
        ceiling_rounds: args.ceiling_rounds.clamp(1, 10),
        ceiling_cpu: args.ceiling_cpu,
        find_knee: args.find_knee,
        knee_steps: args.knee_steps.clamp(1, 50),
        knee_loss_pct: args.knee_loss,
        knee_p99_us: knee_p99.as_secs_f64() * 1e6,
        fail_on_loss,
        out,
        seed: args.seed,
        pin: !args.no_pin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["loadtest"];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).expect("args")
    }

    #[test]
    fn scenario_values_and_overrides() {
        let c = resolve(&args(&["--scenario", "small"])).unwrap();
        assert_eq!(c.name, "small");
        assert_eq!((c.channels, c.members), (20, 4));
        assert_eq!(c.duration_s, 15.0);
        let c = resolve(&args(&[
            "--scenario",
            "small",
            "--duration",
            "3s",
            "--channels",
            "2",
        ]))
        .unwrap();
        assert_eq!((c.channels, c.duration_s), (2, 3.0));
    }

    #[test]
    fn refuses_what_is_not_supported() {
        assert!(resolve(&args(&["--transport", "sip"]))
            .unwrap_err()
            .contains("expected `rtp`"));
        assert_eq!(
            resolve(&args(&["--transport", "mixed"])).unwrap().transport,
            "mixed"
        );
        assert!(resolve(&args(&["--server", "10.1.2.3:8080"]))
            .unwrap_err()
            .contains("loopback"));
        assert!(resolve(&args(&["--members", "1"])).is_err());
        assert!(resolve(&args(&["--ceiling", "--find-knee"])).is_err());
        assert!(resolve(&args(&["--keepalive", "10s"])).is_err());
        assert!(resolve(&args(&["--scenario", "no-such-scenario"])).is_err());
        assert!(resolve(&args(&["--nodes", "3"]))
            .unwrap_err()
            .contains("--spawn-server"));
        assert!(resolve(&args(&["--nodes", "3", "--spawn-server", "--ceiling"])).is_err());
        assert!(resolve(&args(&["--fail-on-loss", "101"])).is_err());
        assert_eq!(
            resolve(&args(&["--fail-on-loss", "0"]))
                .unwrap()
                .fail_on_loss,
            Some(0.0)
        );
    }

    #[test]
    fn defaults() {
        let c = resolve(&args(&[])).unwrap();
        assert_eq!(c.rate, 50);
        assert_eq!(c.transport, "rtp");
        assert_eq!(c.members_per_ws, 100);
        assert!(c.out.ends_with("target/loadtest"));
        assert_eq!(c.knee_p99_us, 5000.0);
        assert_eq!((c.nodes, c.cluster), (1, false));
    }

    #[test]
    fn three_nodes_scenario() {
        let c = resolve(&args(&["--scenario", "three-nodes", "--spawn-server"])).unwrap();
        assert_eq!((c.nodes, c.cluster, c.split_phase), (3, true, true));
        assert_eq!((c.channels, c.members), (300, 6));
        assert!(c.warmup_s >= 5.0);
        let c = resolve(&args(&[
            "--scenario",
            "three-nodes",
            "--spawn-server",
            "--nodes",
            "1",
        ]))
        .unwrap();
        assert!(!c.cluster);
    }
}
