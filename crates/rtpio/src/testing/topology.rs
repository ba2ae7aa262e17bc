//! Throwaway Redis topologies for the tests: a Redis Cluster of three masters with a replica each, and a
//! master with one replica watched by three sentinels — all on 127.0.0.1, free ports, temp dirs, killed on
//! drop. They need `redis-server` and `redis-cli` (a sentinel is `redis-server CONF --sentinel`) and fail
//! with the install command when either is missing.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, RedisOptions, RedisServer};

/// How long a topology may take to form (cluster slots agreed, sentinels aware of each other).
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a failover may take in these topologies (node timeout 1 s, down-after 1 s).
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// Cluster node timeout and sentinel down-after: short, so a failover takes a few seconds.
const NODE_TIMEOUT_MS: &str = "1000";
const CLI_HINT: &str =
    "redis-cli not found on PATH: install it with `apt-get install redis-tools` (Debian)";

/// Runs `redis-cli -p PORT ARGS…` and returns its output.
pub fn redis_cli(port: u16, args: &[&str]) -> Result<String, String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => CLI_HINT.to_string(),
            _ => format!("cannot run redis-cli: {e}"),
        })?;
    if !out.status.success() {
        return Err(format!(
            "redis-cli -p {port} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `check` every 100 ms until it holds or `timeout` passes; `what` names it in the error.
fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("{what}: not within {timeout:?}"))
}

/// A Redis Cluster: three masters, one replica each.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts six `redis-server --cluster-enabled yes`, joins them with `redis-cli --cluster create
    /// --cluster-replicas 1` and waits until every node says `cluster_state:ok`; panics with the reason
    /// (and the install command when a binary is missing).
    pub fn start() -> RedisCluster {
        Self::try_start().unwrap_or_else(|e| panic!("redis cluster: {e}"))
    }

    /// Like [`RedisCluster::start`], but says why it could not start.
    pub fn try_start() -> Result<RedisCluster, String> {
        let options = RedisOptions {
            log_file: None,
            args: [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                NODE_TIMEOUT_MS,
                // A replica must have synced once to be promoted: no 5 s wait before the first sync.
                "--repl-diskless-sync-delay",
                "0",
            ]
            .map(String::from)
            .to_vec(),
        };
        let nodes = (0..6)
            .map(|_| RedisServer::try_start_with(options.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let cluster = RedisCluster { nodes };
        let addrs = cluster.seeds();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        redis_cli(cluster.nodes[0].port(), &args)?;
        cluster.wait_ok()?;
        wait_until("every replica in sync", FORM_TIMEOUT, || {
            cluster.nodes.iter().all(|n| {
                redis_cli(n.port(), &["INFO", "replication"])
                    .is_ok_and(|i| i.contains("role:master") || i.contains("master_link_status:up"))
            })
        })?;
        Ok(cluster)
    }

    /// `127.0.0.1:PORT` of every node started (seeds for a client).
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect()
    }

    /// Waits until every live node says `cluster_state:ok` and agrees on which master serves each slot.
    pub fn wait_ok(&self) -> Result<(), String> {
        wait_until("cluster_state:ok on every node", FORM_TIMEOUT, || {
            let live: Vec<u16> = self.live_ports();
            let ok = live.iter().all(|p| {
                redis_cli(*p, &["CLUSTER", "INFO"])
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            });
            let views: Vec<Option<Vec<(u16, u16, u16)>>> =
                live.iter().map(|p| self.slot_masters(*p).ok()).collect();
            ok && views.iter().all(|v| v.is_some() && *v == views[0])
        })
    }

    /// The port of the master serving `key` now.
    pub fn master_of(&self, key: &str) -> Result<u16, String> {
        let port = *self
            .live_ports()
            .first()
            .ok_or("no live node in the cluster")?;
        let slot: u16 = redis_cli(port, &["CLUSTER", "KEYSLOT", key])?
            .trim()
            .parse()
            .map_err(|e| format!("CLUSTER KEYSLOT: {e}"))?;
        self.slot_masters(port)?
            .into_iter()
            .find(|(first, last, _)| (*first..=*last).contains(&slot))
            .map(|(_, _, master)| master)
            .ok_or_else(|| format!("no master serves slot {slot}"))
    }

    /// Kills (SIGKILL) the master serving `key` and waits until its replica took over and the cluster
    /// is ok again; returns the dead master's port and the time the failover took.
    pub fn kill_master_of(&mut self, key: &str) -> Result<(u16, Duration), String> {
        let old = self.master_of(key)?;
        let started = Instant::now();
        // Dropping a server kills it.
        self.nodes.retain(|n| n.port() != old);
        wait_until("a replica promoted", FAILOVER_TIMEOUT, || {
            self.master_of(key).is_ok_and(|p| p != old)
        })?;
        self.wait_ok()?;
        Ok((old, started.elapsed()))
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    /// `(first slot, last slot, master port)` of every slot range served by a master not marked failed,
    /// as node `port` sees them (sorted, so two views compare equal when they agree).
    fn slot_masters(&self, port: u16) -> Result<Vec<(u16, u16, u16)>, String> {
        let mut ranges = Vec::new();
        for line in redis_cli(port, &["CLUSTER", "NODES"])?.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let master_port = fields[1]
                .split(['@', ':'])
                .nth(1)
                .and_then(|p| p.parse::<u16>().ok())
                .ok_or_else(|| format!("unreadable CLUSTER NODES line {line:?}"))?;
            for range in &fields[8..] {
                let mut ends = range.split('-').map(|s| s.parse::<u16>().ok());
                if let Some(Some(first)) = ends.next() {
                    let last = ends.next().flatten().unwrap_or(first);
                    ranges.push((first, last, master_port));
                }
            }
        }
        ranges.sort_unstable();
        Ok(ranges)
    }
}

/// A master with one replica, watched by three sentinels under the name [`RedisSentinels::MASTER`].
pub struct RedisSentinels {
    data: Vec<RedisServer>,
    sentinels: Vec<Sentinel>,
}

struct Sentinel {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RedisSentinels {
    /// The master's name in the sentinels' configuration.
    pub const MASTER: &'static str = "talkgroup";

    /// Starts the master, its replica (waiting until it is in sync) and three sentinels (quorum 2,
    /// down-after 1 s), and waits until every sentinel knows the replica and the two other sentinels.
    pub fn start() -> RedisSentinels {
        Self::try_start().unwrap_or_else(|e| panic!("redis sentinel: {e}"))
    }

    /// Like [`RedisSentinels::start`], but says why it could not start.
    pub fn try_start() -> Result<RedisSentinels, String> {
        let master = RedisServer::try_start_with(RedisOptions {
            log_file: None,
            args: vec!["--repl-diskless-sync-delay".into(), "0".into()],
        })?;
        let replica = RedisServer::try_start_with(RedisOptions {
            log_file: None,
            args: vec![
                "--replicaof".into(),
                "127.0.0.1".into(),
                master.port().to_string(),
            ],
        })?;
        wait_until("the replica in sync", FORM_TIMEOUT, || {
            redis_cli(replica.port(), &["INFO", "replication"])
                .is_ok_and(|i| i.contains("master_link_status:up"))
        })?;
        let sentinels = (0..3)
            .map(|_| Sentinel::start(master.port()))
            .collect::<Result<Vec<_>, _>>()?;
        let topology = RedisSentinels {
            data: vec![master, replica],
            sentinels,
        };
        wait_until(
            "sentinels aware of each other and the replica",
            FORM_TIMEOUT,
            || {
                topology.sentinels.iter().all(|s| {
                    let others = redis_cli(s.port, &["SENTINEL", "SENTINELS", Self::MASTER]);
                    let replicas = redis_cli(s.port, &["SENTINEL", "REPLICAS", Self::MASTER]);
                    others.is_ok_and(|o| o.lines().filter(|l| *l == "name").count() >= 2)
                        && replicas.is_ok_and(|r| r.lines().any(|l| l.contains("slave")))
                })
            },
        )
        .map_err(|e| {
            let tail = topology
                .sentinels
                .first()
                .map(|s| std::fs::read_to_string(&s.log).unwrap_or_default());
            format!("{e}; first sentinel's log:\n{}", tail.unwrap_or_default())
        })?;
        Ok(topology)
    }

    /// `127.0.0.1:PORT` of each sentinel.
    pub fn sentinels(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect()
    }

    /// The master's port as the first sentinel reports it.
    pub fn master_port(&self) -> Result<u16, String> {
        let port = self.sentinels.first().ok_or("no sentinel")?.port;
        let reply = redis_cli(port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::MASTER])?;
        reply
            .lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| format!("unreadable master address {reply:?}"))
    }

    /// The port of a data server that is not the master now (the replica), if one is running.
    pub fn replica_port(&self) -> Result<u16, String> {
        let master = self.master_port()?;
        self.data
            .iter()
            .map(RedisServer::port)
            .find(|p| *p != master)
            .ok_or_else(|| "no replica running".to_string())
    }

    /// Kills (SIGKILL) the master and waits until every sentinel names its replica instead; returns the
    /// time that took.
    pub fn kill_master(&mut self) -> Result<Duration, String> {
        let old = self.master_port()?;
        let started = Instant::now();
        self.data.retain(|s| s.port() != old);
        wait_until(
            "the sentinels promoted the replica",
            FAILOVER_TIMEOUT,
            || {
                self.sentinels.iter().all(|s| {
                    redis_cli(
                        s.port,
                        &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::MASTER],
                    )
                    .is_ok_and(|r| {
                        r.lines()
                            .nth(1)
                            .is_some_and(|p| p.trim() != old.to_string())
                    })
                })
            },
        )?;
        let new = self.master_port()?;
        wait_until("the new master says it is one", FAILOVER_TIMEOUT, || {
            redis_cli(new, &["ROLE"]).is_ok_and(|r| r.starts_with("master"))
        })?;
        Ok(started.elapsed())
    }
}

impl Sentinel {
    fn start(master_port: u16) -> Result<Sentinel, String> {
        let dir = tempfile::Builder::new()
            .prefix("talkgroup-sentinel-")
            .tempdir()
            .map_err(|e| format!("cannot create a temp dir for a sentinel: {e}"))?;
        let port = free_port()?;
        let log = dir.path().join("sentinel.log");
        let conf = dir.path().join("sentinel.conf");
        let name = RedisSentinels::MASTER;
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {log}\n\
             sentinel monitor {name} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {name} {NODE_TIMEOUT_MS}\n\
             sentinel failover-timeout {name} 5000\n\
             sentinel parallel-syncs {name} 1\n",
            dir = dir.path().display(),
            log = log.display(),
        );
        std::fs::write(&conf, text).map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => super::INSTALL_HINT.to_string(),
                _ => format!("cannot run redis-server --sentinel: {e}"),
            })?;
        let sentinel = Sentinel {
            child,
            port,
            _dir: dir,
            log,
        };
        wait_until("a sentinel answering", FORM_TIMEOUT, || {
            redis_cli(port, &["PING"]).is_ok_and(|r| r.trim() == "PONG")
        })
        .map_err(|e| {
            format!(
                "{e}; its log:\n{}",
                std::fs::read_to_string(&sentinel.log).unwrap_or_default()
            )
        })?;
        Ok(sentinel)
    }
}
