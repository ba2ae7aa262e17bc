//! Command line, environment and configuration file. Every option has a default that runs a single node
//! on the embedded store, so `talkgroup serve` needs nothing else. A file given with `--config` sets the
//! same options by their long names ([`file`]); the environment and the command line win over it.

pub mod file;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::auth::Limits;
use crate::state::redis::Topology;

/// Loopback and private ranges: the default of `--rtp-allow`.
pub const DEFAULT_RTP_ALLOW: &str =
    "127.0.0.0/8,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,::1/128,fc00::/7";

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "talkgroup",
    version,
    about = "Thread-per-core push-to-talk SFU"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: CommandLine,
}

/// The subcommands.
// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum CommandLine {
    /// Run the server.
    Serve(ServeArgs),
    /// Mint a member token from the configured key (as LiveKit's `lk token create`).
    Token(TokenArgs),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// `talkgroup config …`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a configuration file and print the effective configuration (the file, with the
    /// environment over it, and the defaults of everything it leaves out).
    Check {
        /// The file (TOML; keys are the long options of `serve`, with `_` for `-`).
        file: PathBuf,
    },
}

/// `talkgroup token`: what the token allows, and the key to sign it with.
#[derive(Debug, Clone, Parser)]
pub struct TokenArgs {
    /// The member name (`sub`).
    #[arg(long)]
    pub sub: String,
    /// A channel the token grants, or a prefix ending in `*` (repeat for several).
    #[arg(long = "channel")]
    pub channels: Vec<String>,
    /// Grant the right to talk (without it the member only listens).
    #[arg(long)]
    pub talk: bool,
    /// Do not grant listening.
    #[arg(long)]
    pub no_listen: bool,
    /// Grant emergency presses.
    #[arg(long)]
    pub emergency: bool,
    /// Grant the admin routes (`/api/*`, `/metrics`).
    #[arg(long)]
    pub admin: bool,
    /// Highest floor priority the member may take.
    #[arg(long, default_value_t = 0)]
    pub max_priority: u8,
    /// How long the token is valid (e.g. `30m`, `1h`, `7d`).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Sign with this key of the keys file (default: the only key that can sign).
    #[arg(long)]
    pub kid: Option<String>,
    /// The HS256 shared secret (as for `serve`).
    #[arg(long, env = "TALKGROUP_AUTH_KEY", hide_env_values = true)]
    pub auth_key: Option<String>,
    /// The keys file (as for `serve`).
    #[arg(long, env = "TALKGROUP_AUTH_KEYS_FILE")]
    pub auth_keys_file: Option<PathBuf>,
}

/// A duration such as `250ms`, `30s`, `15m`, `1h` or `7d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("'{text}' is not a duration: {e}"))
}

/// What one client may ask of the server (protocol v1.1 limits); defaults an operator would keep.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// WebSocket connections from one client IP address at once.
    #[arg(long, default_value_t = 256, env = "TALKGROUP_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: usize,
    /// Memberships one connection may hold.
    #[arg(
        long,
        default_value_t = 256,
        env = "TALKGROUP_MAX_MEMBERSHIPS_PER_CONNECTION"
    )]
    pub max_memberships_per_connection: usize,
    /// Frames per second one connection may send (plus --max-frames-per-membership for each membership).
    #[arg(long, default_value_t = 50, env = "TALKGROUP_MAX_FRAMES_PER_SECOND")]
    pub max_frames_per_second: u32,
    /// Extra frames per second per membership of a connection.
    #[arg(
        long,
        default_value_t = 10,
        env = "TALKGROUP_MAX_FRAMES_PER_MEMBERSHIP"
    )]
    pub max_frames_per_membership: u32,
    /// Presses per second one member may make.
    #[arg(long, default_value_t = 5, env = "TALKGROUP_MAX_PRESSES_PER_SECOND")]
    pub max_presses_per_second: u32,
    /// Bytes queued to a client that does not read before it is disconnected.
    #[arg(long, default_value_t = 1 << 20, env = "TALKGROUP_MAX_QUEUED_BYTES")]
    pub max_queued_bytes: usize,
    /// How long one frame may take to write to a client before its connection is closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "TALKGROUP_SEND_TIMEOUT")]
    pub send_timeout: Duration,
    /// WebRTC joins waiting for ICE/DTLS at once, per connection.
    #[arg(
        long,
        default_value_t = 8,
        env = "TALKGROUP_MAX_WEBRTC_PENDING_PER_CONNECTION"
    )]
    pub max_webrtc_pending_per_connection: usize,
    /// WebRTC joins waiting for ICE/DTLS at once, per client IP address.
    #[arg(
        long,
        default_value_t = 32,
        env = "TALKGROUP_MAX_WEBRTC_PENDING_PER_IP"
    )]
    pub max_webrtc_pending_per_ip: usize,
}

impl LimitArgs {
    /// The limits as the control plane takes them.
    pub fn limits(&self) -> Limits {
        Limits {
            connections_per_ip: self.max_connections_per_ip,
            memberships_per_connection: self.max_memberships_per_connection,
            frames_per_second: self.max_frames_per_second,
            frames_per_membership: self.max_frames_per_membership,
            presses_per_second: self.max_presses_per_second,
            queued_bytes: self.max_queued_bytes,
            send_timeout: self.send_timeout,
            webrtc_pending_per_connection: self.max_webrtc_pending_per_connection,
            webrtc_pending_per_ip: self.max_webrtc_pending_per_ip,
        }
    }
}

/// Which floor/session store to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// Embedded, in memory: one node, nothing to set up.
    Memory,
    /// Redis: many nodes share floors and presence.
    Redis,
}

/// `talkgroup serve`: every option of a node. Each is also an environment variable and a key of the
/// `--config` file; precedence: flags > environment > file > defaults.
#[derive(Debug, Clone, Parser)]
pub struct ServeArgs {
    /// Read options from this TOML file (keys: the long options, with `_` for `-`, e.g.
    /// `media_port = 40000`); the environment and flags override it.
    #[arg(long, env = "TALKGROUP_CONFIG")]
    pub config: Option<PathBuf>,
    /// HTTP and WebSocket listen address.
    #[arg(long, default_value = "0.0.0.0:8080", env = "TALKGROUP_HTTP")]
    pub http: SocketAddr,
    /// Number of shards (one pinned executor per shard); default: the CPUs this process may use.
    #[arg(long, env = "TALKGROUP_SHARDS")]
    pub shards: Option<usize>,
    /// First UDP media port; shard i listens on BASE+i. 0 picks free ports (tests).
    #[arg(long, default_value_t = 40000, env = "TALKGROUP_MEDIA_PORT")]
    pub media_port: u16,
    /// Address the media sockets bind to.
    #[arg(long, default_value = "0.0.0.0", env = "TALKGROUP_MEDIA_IP")]
    pub media_ip: IpAddr,
    /// Address announced to clients (`joined.rtp.server_addr`, SDP candidates). Default: the media bind
    /// address, or the host's primary address when bound to 0.0.0.0.
    #[arg(long, alias = "public-ip", env = "TALKGROUP_ANNOUNCE_IP")]
    pub announce_ip: Option<IpAddr>,
    /// T1: release the floor after this many ms without media from the holder.
    #[arg(long, default_value_t = 4000, env = "TALKGROUP_T1_MS")]
    pub t1_ms: u64,
    /// Gather window of a busy shard, in µs: when datagrams arrive closer together than this, the shard
    /// stops waking for each one and reads what came in every window instead (one wake-up, one
    /// `recvmmsg`, one round of `sendmmsg` for several packets), adding at most this much latency. A shard
    /// with a floor held and datagrams far apart still wakes per datagram. 0: wake for every datagram.
    #[arg(long, default_value_t = 1000, env = "TALKGROUP_BATCH_WINDOW_US")]
    pub batch_window_us: u64,
    /// Quiet window of a shard with no floor held, in ms: nothing that arrives then is media to forward
    /// (keep-alives, reports, consent checks, handshakes), so the shard reads it once per window instead
    /// of waking per datagram. A grant ends the window at once. 0: wake for every datagram.
    #[arg(long, default_value_t = 50, env = "TALKGROUP_QUIET_WINDOW_MS")]
    pub quiet_window_ms: u64,
    /// T2: maximum talk time in ms.
    #[arg(long, default_value_t = 30000, env = "TALKGROUP_T2_MS")]
    pub t2_ms: u64,
    /// T3: grace in ms for a pre-empted holder.
    #[arg(long, default_value_t = 0, env = "TALKGROUP_T3_MS")]
    pub t3_ms: u64,
    /// Floor and session store.
    #[arg(long, value_enum, default_value = "memory", env = "TALKGROUP_STORE")]
    pub store: StoreKind,
    /// Redis URL (wins over host/port/password).
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Redis host (without `--redis-url`).
    #[arg(long, default_value = "127.0.0.1", env = "REDIS_HOST")]
    pub redis_host: String,
    /// Redis port (without `--redis-url`).
    #[arg(long, default_value_t = 6379, env = "REDIS_PORT")]
    pub redis_port: u16,
    /// Redis password (without `--redis-url`).
    #[arg(long, env = "REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,
    /// Redis Cluster seed nodes (comma-separated `host:port`); the cluster is found through them. The
    /// password comes from `--redis-url` or `--redis-password`. Not with `--redis-sentinels`.
    #[arg(long, env = "REDIS_CLUSTER_NODES", value_delimiter = ',')]
    pub redis_cluster_nodes: Vec<String>,
    /// Redis Sentinels (comma-separated `host:port`) that name the master (with
    /// `--redis-sentinel-master`). The master's password and database come from `--redis-url` or
    /// `--redis-password`; the sentinels themselves are asked without a password.
    #[arg(long, env = "REDIS_SENTINELS", value_delimiter = ',')]
    pub redis_sentinels: Vec<String>,
    /// The master's name in the sentinels' configuration (with `--redis-sentinels`).
    #[arg(long, env = "REDIS_SENTINEL_MASTER")]
    pub redis_sentinel_master: Option<String>,
    /// Prefix of every Redis key, so several deployments can share one Redis.
    #[arg(long, default_value = "talkgroup", env = "TALKGROUP_KEY_PREFIX")]
    pub key_prefix: String,
    /// This node's id (default: hostname-pid).
    #[arg(long, env = "TALKGROUP_NODE_ID")]
    pub node_id: Option<String>,
    /// Networks allowed to join as plain RTP (comma-separated CIDRs; a bare address is one host).
    #[arg(long, default_value = DEFAULT_RTP_ALLOW, env = "TALKGROUP_RTP_ALLOW",
          value_delimiter = ',', value_parser = parse_network)]
    pub rtp_allow: Vec<IpNet>,
    /// First UDP relay port (node-to-node audio); shard i listens on BASE+i. Default: media port + 1000
    /// (0 with a media port of 0). Only with `--store redis` and a cluster secret.
    #[arg(long, env = "TALKGROUP_RELAY_PORT")]
    pub relay_port: Option<u16>,
    /// Shared secret that authenticates relay packets between the nodes of a cluster (HMAC-SHA256).
    /// Default: a key the nodes agree on through Redis (made once by the first node, kept in the store).
    #[arg(long, env = "TALKGROUP_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// Where a channel's members are served: `relay` (wherever they join; nodes relay each speaker once
    /// per node) or `redirect` (on the channel's home node, chosen by load on its first join; other nodes
    /// answer `join` with `redirect`). Takes effect with `--store redis`.
    #[arg(long, default_value = "relay", env = "TALKGROUP_PLACEMENT")]
    pub placement: crate::control::Placement,
    /// The WebSocket URL clients are redirected to when a channel lives on this node (default:
    /// `ws://ANNOUNCE_IP:HTTP_PORT/ws`; set it when clients reach the node through a proxy or TLS).
    #[arg(long, env = "TALKGROUP_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Do not pin shards to CPUs.
    #[arg(long, env = "TALKGROUP_NO_PIN")]
    pub no_pin: bool,
    /// On SIGTERM (or `POST /admin/drain`): how long talk bursts in progress may go on before the node
    /// stops anyway (e.g. `30s`).
    #[arg(long, default_value = "30s", value_parser = parse_duration, env = "TALKGROUP_DRAIN_TIMEOUT")]
    pub drain_timeout: Duration,
    /// Testing only, off by default: serve `POST /admin/fault/panic-shard?shard=N`, which makes a shard
    /// panic (how a test sees what a crashed shard does to the node). Never set in production.
    #[arg(long, hide = true, env = "TALKGROUP_FAULT_INJECTION")]
    pub fault_injection: bool,
    /// Check signed member tokens with this HS256 shared secret (any `kid`). Without a key the server
    /// runs open: anyone may join any channel under any name (development only).
    #[arg(long, env = "TALKGROUP_AUTH_KEY", hide_env_values = true)]
    pub auth_key: Option<String>,
    /// Check signed member tokens with the keys of this TOML file, by `kid` (HS256 secrets, EdDSA /
    /// ES256 / RS256 public keys), for rotation.
    #[arg(long, env = "TALKGROUP_AUTH_KEYS_FILE")]
    pub auth_keys_file: Option<PathBuf>,
    /// Serve `/api/*` and `/metrics` on this address only, without a token (restrict it by network);
    /// the public address then serves neither.
    #[arg(long, env = "TALKGROUP_ADMIN_HTTP")]
    pub admin_http: Option<SocketAddr>,
    /// Origins allowed to open the WebSocket when tokens are on (comma-separated, e.g.
    /// `https://ptt.example.com`); default: the page's own host.
    #[arg(long, env = "TALKGROUP_ALLOWED_ORIGIN", value_delimiter = ',')]
    pub allowed_origin: Vec<String>,
    /// Accept a plain-RTP `rtp_addr` whose IP is not the client's own (a gateway whose media leaves
    /// another host).
    #[arg(long, env = "TALKGROUP_RTP_ANY_IP")]
    pub rtp_any_ip: bool,
    /// How long a dropped connection's memberships (and a floor its member holds) wait for the client to
    /// `resume` on a new connection; 0 turns session resume off.
    #[arg(long, default_value = "30s", value_parser = parse_duration, env = "TALKGROUP_RESUME_WINDOW")]
    pub resume_window: Duration,
    /// Record every channel's talk bursts as Ogg/Opus files under DIR (`DIR/{channel}/{epoch}.ogg`,
    /// served at `/api/recordings/{channel}/{epoch}.ogg`).
    #[arg(
        long,
        value_name = "DIR",
        env = "TALKGROUP_RECORD",
        conflicts_with = "record_dir"
    )]
    pub record: Option<PathBuf>,
    /// Where recordings go when channels are recorded one by one (`POST /api/channels/{channel}/recording`).
    #[arg(long, value_name = "DIR", env = "TALKGROUP_RECORD_DIR")]
    pub record_dir: Option<PathBuf>,
    /// Per-client limits.
    #[command(flatten)]
    pub limits: LimitArgs,
}

impl ServeArgs {
    /// The Redis URL: `--redis-url`, or one made of host, port and password.
    pub fn redis_url(&self) -> String {
        if let Some(url) = &self.redis_url {
            return url.clone();
        }
        match &self.redis_password {
            Some(p) => format!("redis://:{p}@{}:{}/", self.redis_host, self.redis_port),
            None => format!("redis://{}:{}/", self.redis_host, self.redis_port),
        }
    }

    /// Where Redis is: a Cluster (`--redis-cluster-nodes`), a master behind Sentinel
    /// (`--redis-sentinels` and `--redis-sentinel-master`), or the one server of [`Self::redis_url`].
    /// (Checked here rather than by clap relations: a configuration file's values are checked one
    /// option at a time.)
    pub fn redis_topology(&self) -> Result<Topology, String> {
        let nodes = &self.redis_cluster_nodes;
        let sentinels = &self.redis_sentinels;
        match (&nodes[..], &sentinels[..], &self.redis_sentinel_master) {
            ([], [], None) => Ok(Topology::Single),
            ([], [], Some(_)) => Err("--redis-sentinel-master needs --redis-sentinels".into()),
            ([], _, None) => Err("--redis-sentinels needs --redis-sentinel-master".into()),
            ([], _, Some(master)) => Ok(Topology::Sentinel {
                sentinels: sentinels.clone(),
                master: master.clone(),
            }),
            (_, [], None) => Ok(Topology::Cluster {
                nodes: nodes.clone(),
            }),
            _ => Err("--redis-cluster-nodes or --redis-sentinels, not both".into()),
        }
    }

    /// This node's id: `--node-id`, or `hostname-pid`.
    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_else(|_| "node".into());
            format!("{}-{}", host.trim(), std::process::id())
        })
    }

    /// T1, T2, T3.
    pub fn timers(&self) -> (Duration, Duration, Duration) {
        (
            Duration::from_millis(self.t1_ms),
            Duration::from_millis(self.t2_ms),
            Duration::from_millis(self.t3_ms),
        )
    }

    /// Defaults for an in-process server on 127.0.0.1 with free ports (tests, benchmarks).
    pub fn local_test() -> Self {
        let mut a = ServeArgs::parse_from(["serve"]);
        a.http = "127.0.0.1:0".parse().expect("valid literal");
        a.media_ip = "127.0.0.1".parse().expect("valid literal");
        a.media_port = 0;
        a.shards = Some(2);
        a.no_pin = true;
        // Tests and benchmarks press and release as fast as the server answers; the press and frame
        // limits (a human's pace) are tested on their own.
        a.limits.max_presses_per_second = 100_000;
        a.limits.max_frames_per_second = 100_000;
        a
    }
}

/// Why the command line could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// clap's own (usage, `--help`, `--version`): print it with [`clap::Error::exit`].
    #[error(transparent)]
    Clap(#[from] clap::Error),
    /// The `--config` file.
    #[error(transparent)]
    File(#[from] file::ConfigError),
}

/// Parses the command line; for `serve --config FILE` (or `TALKGROUP_CONFIG`), the file's values become
/// the defaults of the options they name, then the command line is parsed again over them, so flags
/// and the environment win.
pub fn parse_cli<I, T>(argv: I) -> Result<Cli, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
    let cli = Cli::try_parse_from(&argv)?;
    let CommandLine::Serve(ServeArgs {
        config: Some(path), ..
    }) = &cli.command
    else {
        return Ok(cli);
    };
    let file = file::FileConfig::load(path, &ServeArgs::command())?;
    let cmd = Cli::command().mut_subcommand("serve", |serve| file.apply(serve));
    let matches = cmd.try_get_matches_from(&argv)?;
    Ok(Cli::from_arg_matches(&matches)?)
}

/// `talkgroup config check FILE`: the effective configuration of `serve` with this file (and the
/// environment), as TOML that names where each value came from; an error names the key and the line.
pub fn check_file(path: &std::path::Path) -> Result<String, CliError> {
    let file = file::FileConfig::load(path, &ServeArgs::command())?;
    let matches = file
        .apply(ServeArgs::command())
        .try_get_matches_from(["serve"])?;
    // Everything must also convert (what `serve` would do next), and the options must go together.
    let args = ServeArgs::from_arg_matches(&matches)?;
    args.redis_topology().map_err(|e| {
        clap::Error::raw(clap::error::ErrorKind::ArgumentConflict, format!("{e}\n"))
    })?;
    Ok(file::render_effective(
        &ServeArgs::command(),
        &matches,
        Some(&file),
    ))
}

/// The address to announce when bound to the unspecified address: the one the kernel would use to reach
/// the outside (no packet is sent: `connect` on UDP only picks a route).
pub fn primary_ip() -> IpAddr {
    let probe = || -> std::io::Result<IpAddr> {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.connect("192.0.2.1:9")?;
        Ok(s.local_addr()?.ip())
    };
    probe().unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

/// One network of `--rtp-allow`: `ip/bits`, or a bare address for that one host.
pub fn parse_network(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    text.parse::<IpNet>()
        .map_err(|_| format!("'{text}' is not an IP network (expected ip/bits, e.g. 10.0.0.0/8)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redis_topology_comes_from_the_cluster_or_the_sentinel_options() {
        let topology = |argv: &[&str]| {
            ServeArgs::try_parse_from(std::iter::once("serve").chain(argv.iter().copied()))
                .expect("parses")
                .redis_topology()
        };
        assert_eq!(topology(&[]), Ok(Topology::Single));
        assert_eq!(
            topology(&["--redis-cluster-nodes", "a:1,b:2"]),
            Ok(Topology::Cluster {
                nodes: vec!["a:1".into(), "b:2".into()]
            })
        );
        assert_eq!(
            topology(&["--redis-sentinels", "s:1", "--redis-sentinel-master", "m"]),
            Ok(Topology::Sentinel {
                sentinels: vec!["s:1".into()],
                master: "m".into()
            })
        );
        assert!(topology(&["--redis-sentinels", "s:1"]).is_err());
        assert!(topology(&["--redis-sentinel-master", "m"]).is_err());
        assert!(topology(&["--redis-cluster-nodes", "a:1", "--redis-sentinels", "s:1"]).is_err());
    }

    #[test]
    fn rtp_allow_takes_networks_and_bare_addresses() {
        let args = ServeArgs::parse_from(["serve"]);
        let allowed = |ip: &str| {
            let ip: IpAddr = ip.parse().unwrap();
            args.rtp_allow.iter().any(|n| n.contains(&ip))
        };
        assert!(allowed("127.0.0.1"));
        assert!(allowed("192.168.3.4"));
        assert!(allowed("::1"));
        assert!(!allowed("8.8.8.8"));
        assert_eq!(
            parse_network("10.1.2.3").unwrap(),
            "10.1.2.3/32".parse::<IpNet>().unwrap()
        );
        assert!(parse_network("10.0.0.0/x").is_err());
        let args =
            ServeArgs::try_parse_from(["serve", "--rtp-allow", "10.0.0.0/8,1.2.3.4"]).unwrap();
        assert_eq!(args.rtp_allow.len(), 2);
        assert!(ServeArgs::try_parse_from(["serve", "--rtp-allow", "bogus"]).is_err());
    }
}
