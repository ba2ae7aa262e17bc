//! Several nodes on this machine (`--nodes N`): a private `redis-server`, N talkgroup processes sharing it
//! (`--store redis`, distinct node ids, one generated cluster secret, a key prefix unique to the run), and
//! the member-to-node assignment.

use crate::server::{tail, Server};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The node member `slot` of every channel joins: round robin, so with at least N members every channel
/// has members on every node, and a speaker's node varies with the slot the talk model picks.
pub fn node_of(slot: u32, nodes: u32) -> u32 {
    slot % nodes.max(1)
}

/// A `redis-server` of our own: temporary directory, free port on 127.0.0.1, no persistence.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

impl Redis {
    pub fn start(out_dir: &Path) -> Result<Redis, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| e.to_string())?;
        let dir =
            std::env::temp_dir().join(format!("loadtest-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let log = out_dir.join("redis.log");
        let logf = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().map_err(|e| e.to_string())?)
            .stderr(logf)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    "--nodes > 1 needs redis-server on PATH: install it with \
                                                 apt-get install redis-server"
                        .to_string()
                }
                _ => format!("cannot start redis-server: {e}"),
            })?;
        let mut r = Redis {
            port,
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if r.ping() {
                return Ok(r);
            }
            if let Some(Ok(Some(st))) = r.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!(
                    "redis-server exited ({st}); its log {}:\n{}",
                    log.display(),
                    tail(&log, 10)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "redis-server on port {port} did not answer PING within 10 s"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Commands Redis has processed since it started (`INFO stats`), or `None` when it does not say:
    /// what the nodes cost the store, read before and after a window.
    pub fn total_commands(&self) -> Option<u64> {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
        s.write_all(b"INFO stats\r\n").ok()?;
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        // A bulk reply of a few kilobytes: read until the field is in.
        for _ in 0..16 {
            let n = s.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            if let Some(v) = parse_total_commands(&text) {
                return Some(v);
            }
        }
        None
    }

    fn ping(&self) -> bool {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok()
            && s.read(&mut buf)
                .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Redis plus `n` nodes; node `i` logs to `server-node{i}.log`.
pub async fn spawn(
    bin: PathBuf,
    n: u32,
    shards: u32,
    extra: &[String],
    out_dir: &Path,
) -> Result<(Redis, Vec<Server>), String> {
    let redis = Redis::start(out_dir)?;
    let tag = format!(
        "{:x}",
        crate::sys::mono_ns() ^ ((std::process::id() as u64) << 20)
    );
    let secret = format!("loadtest-{tag}");
    let mut nodes = Vec::new();
    for i in 0..n {
        let mut args: Vec<String> = [
            "--store",
            "redis",
            "--redis-url",
            &redis.url(),
            "--node-id",
            &format!("lt-node{i}"),
            "--cluster-secret",
            &secret,
            "--key-prefix",
            &format!("lt{tag}"),
            "--relay-port",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend_from_slice(extra);
        let log = format!("server-node{i}.log");
        nodes.push(Server::spawn(bin.clone(), shards, None, &args, out_dir, &log).await?);
    }
    Ok((redis, nodes))
}

/// `total_commands_processed` of an `INFO stats` reply (the INFO command itself included).
fn parse_total_commands(info: &str) -> Option<u64> {
    let line = info
        .lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))?;
    line.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_commands_come_from_info_stats() {
        let info =
            "$120\r\n# Stats\r\ntotal_connections_received:3\r\ntotal_commands_processed:4211\r\n";
        assert_eq!(parse_total_commands(info), Some(4211));
        assert_eq!(parse_total_commands("# Stats\r\n"), None);
    }

    #[test]
    fn members_go_round_robin_over_nodes() {
        let nodes: Vec<u32> = (0..6).map(|s| node_of(s, 3)).collect();
        assert_eq!(nodes, [0, 1, 2, 0, 1, 2]);
        assert!((0..10).all(|s| node_of(s, 1) == 0));
        assert_eq!(node_of(5, 0), 0);
    }
}
