//! A throwaway `redis-server` for integration tests, benchmarks and the load harness: its own temp dir,
//! a free port on 127.0.0.1, no persistence, killed on drop. Behind the `testing` feature so that the
//! server binary does not link `tempfile`.
//!
//! Tests need the real binary: when it is missing [`RedisServer::start`] fails with the command that
//! installs it, rather than skip and pass without testing anything. A benchmark or the harness that can
//! do without Redis uses [`RedisServer::try_start`] and reports the error.
//!
//! [`proxy::FaultProxy`] goes between the nodes and such a server to inject network faults.
//! [`RedisCluster`] and [`RedisSentinels`] build the replicated topologies out of such servers.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod proxy;
mod topology;

pub use topology::{redis_cli, RedisCluster, RedisSentinels};

/// How long a fresh server may take to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Another process may take the port between our probe and the server's bind; try a few ports.
const PORT_ATTEMPTS: usize = 5;
/// What to say when the binary is missing.
const INSTALL_HINT: &str =
    "redis-server not found on PATH: install it with `apt-get install redis-server` (Debian)";

/// How to start a [`RedisServer`] beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Where the server logs; by default a file in its temp dir (see [`RedisServer::log_path`]).
    pub log_file: Option<PathBuf>,
    /// More command-line arguments, e.g. `["--maxmemory-policy", "noeviction"]`.
    pub args: Vec<String>,
}

/// A running `redis-server`. Dropping it kills the process and removes its directory.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    options: RedisOptions,
}

impl RedisServer {
    /// Starts a server on a free port of 127.0.0.1 and waits until it answers; panics (with the install
    /// command when the binary is missing) if it cannot.
    pub fn start() -> RedisServer {
        Self::try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`RedisServer::start`], but says why it could not start instead of panicking.
    pub fn try_start() -> Result<RedisServer, String> {
        Self::try_start_with(RedisOptions::default())
    }

    /// Starts a server with `options`.
    pub fn try_start_with(options: RedisOptions) -> Result<RedisServer, String> {
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("talkgroup-redis-")
                .tempdir()
                .map_err(|e| format!("cannot create a temp dir for redis-server: {e}"))?;
            let mut server = RedisServer {
                child: None,
                port: free_port()?,
                dir,
                options: options.clone(),
            };
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(Spawn::Missing(e)) => return Err(e),
                Err(Spawn::Failed(e)) => last_error = e,
            }
        }
        Err(format!(
            "redis-server did not start after {PORT_ATTEMPTS} attempts: {last_error}"
        ))
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The TCP port it listens on (127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server with SIGKILL (no shutdown, no save) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts a new one on the same port with empty data, as after a crash of a
    /// Redis without persistence. Panics if it does not come back within the ready timeout.
    pub fn restart(&mut self) {
        self.kill();
        let started = Instant::now();
        // The old socket is gone once the process has been reaped, but give a slow kernel a moment.
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(Spawn::Missing(e)) => panic!("{e}"),
                Err(Spawn::Failed(e)) if started.elapsed() > READY_TIMEOUT => {
                    panic!("redis-server did not restart on port {}: {e}", self.port)
                }
                Err(Spawn::Failed(_)) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.options
            .log_file
            .clone()
            .unwrap_or_else(|| self.dir.path().join("redis.log"))
    }

    /// The last `lines` lines of the log, for an error message.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Starts the process on `self.port` and waits until it answers; on failure the process is gone and
    /// the error carries the end of its log.
    fn spawn(&mut self) -> Result<(), Spawn> {
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .args(&self.options.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Spawn::Missing(INSTALL_HINT.into()))
            }
            Err(e) => return Err(Spawn::Missing(format!("cannot run redis-server: {e}"))),
        };
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(Spawn::Failed(format!(
                        "exited with {status}; log: {}",
                        self.log_tail(5)
                    )));
                }
            }
            // Check the pid too: if another test's server took the port first, ours fails to bind and
            // exits, but the other one would still answer.
            let pid = self.child.as_ref().map(Child::id);
            if pid.is_some() && server_pid(self.port) == pid {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        Err(Spawn::Failed(format!(
            "no answer within {READY_TIMEOUT:?}; log: {}",
            self.log_tail(5)
        )))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Why one start failed: for good (no binary), or for this port only.
enum Spawn {
    Missing(String),
    Failed(String),
}

/// A port that was free a moment ago (the kernel's pick for an ephemeral bind).
fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port on 127.0.0.1: {e}"))
}

/// The `process_id` of the Redis answering on `port`, if one answers.
fn server_pid(port: u16) -> Option<u32> {
    let addr = ([127, 0, 0, 1], port).into();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    stream.write_all(b"INFO server\r\n").ok()?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while reply.len() < 64 * 1024 {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply);
        if let Some(rest) = text.split("process_id:").nth(1) {
            if let Some((pid, _)) = rest.split_once("\r\n") {
                return pid.trim().parse().ok();
            }
        }
    }
    None
}
