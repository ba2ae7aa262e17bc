//! The server under test: started by the harness (`--spawn-server`) or already running. Either way the
//! harness needs its PID (CPU, RSS) and to notice when it dies (a crash fails the run).

use crate::metrics::http_get;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub http: SocketAddr,
    pub pid: Option<i32>,
    pub child: Option<Child>,
    pub bin: Option<PathBuf>,
    pub log: Option<PathBuf>,
    pub media_port: Option<u16>,
}

/// Where the release server binary should be: next to our own binary (same target dir), else in the
/// workspace's target/release.
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(format!("--server-bin {}: no such file", p.display()))
        };
    }
    let mut tried = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let p = dir.join("talkgroup");
            if p.is_file() {
                return Ok(p);
            }
            tried.push(p);
        }
    }
    let p = crate::cli::workspace_root().join("target/release/talkgroup");
    if p.is_file() {
        return Ok(p);
    }
    tried.push(p);
    Err(format!(
        "talkgroup server binary not found (looked at {}). Building it is up to you: run \
         `cargo build --release` in the workspace root first, or pass --server-bin PATH",
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// A free TCP port on 127.0.0.1.
fn free_tcp_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// `n` consecutive free UDP ports below the ephemeral range (so member sockets cannot take them).
fn free_udp_range(n: u16) -> Result<u16, String> {
    let start = 31_000 + (std::process::id() % 1000) as u16;
    'base: for base in (start..32_000).step_by(n.max(1) as usize) {
        let mut held = Vec::new();
        for p in base..base + n {
            match UdpSocket::bind(("127.0.0.1", p)) {
                Ok(s) => held.push(s),
                Err(_) => continue 'base,
            }
        }
        return Ok(base);
    }
    Err("no free UDP port range for the server's media".into())
}

impl Server {
    /// Start `bin serve …` and wait until `/healthz` answers (at most 20 s).
    pub async fn spawn(
        bin: PathBuf,
        shards: u32,
        media_port: Option<u16>,
        extra: &[String],
        out_dir: &Path,
        log_name: &str,
    ) -> Result<Server, String> {
        let port = free_tcp_port()?;
        let media = match media_port {
            Some(p) => p,
            None => free_udp_range(shards as u16)?,
        };
        let http: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = out_dir.join(log_name);
        let logf = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let logf2 = logf.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&bin);
        cmd.arg("serve")
            .arg("--http")
            .arg(http.to_string())
            .arg("--media-port")
            .arg(media.to_string())
            .arg("--shards")
            .arg(shards.to_string())
            // Keep `joined.rtp.server_addr` on loopback: by default a server bound to 0.0.0.0 announces
            // the host's primary address, and the harness sends only to 127.0.0.0/8.
            .arg("--announce-ip")
            .arg("127.0.0.1")
            // The harness is one client address carrying hundreds of connections (a load generator, not
            // an abuser): lift the per-address limits (connections, WebRTC handshakes pending); every
            // per-connection and per-member limit stays the default. The shard's own handshake cap stays.
            .arg("--max-connections-per-ip")
            .arg("100000")
            .arg("--max-webrtc-pending-per-ip")
            .arg("100000")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(logf2);
        // The server logs every join at `info`: 50,000 lines of file I/O during set-up would be measured
        // too. Quiet by default; an explicit RUST_LOG is passed through.
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let pid = child.id() as i32;
        let mut s = Server {
            http,
            pid: Some(pid),
            child: Some(child),
            bin: Some(bin),
            log: Some(log.clone()),
            media_port: Some(media),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = s.exited() {
                return Err(format!(
                    "the server exited during start-up ({status}); its log {}:\n{}",
                    log.display(),
                    tail(&log, 20)
                ));
            }
            if let Ok((200, _)) = http_get(http, "/healthz", Duration::from_millis(500)).await {
                return Ok(s);
            }
            if Instant::now() > deadline {
                s.stop();
                return Err(format!(
                    "the server did not answer /healthz on {http} within 20 s; its log {}:\n{}",
                    log.display(),
                    tail(&log, 20)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Attach to a server already running at `http`.
    pub async fn attach(http: SocketAddr, pid: Option<i32>) -> Result<Server, String> {
        match http_get(http, "/healthz", Duration::from_secs(3)).await {
            Ok((200, _)) => {}
            Ok((code, body)) => return Err(format!("GET http://{http}/healthz: {code} {body}")),
            Err(e) => {
                return Err(format!(
                    "no talkgroup server at {http} ({e}); start one, or pass --spawn-server"
                ))
            }
        }
        Ok(Server {
            http,
            pid: pid.or_else(|| crate::procfs::find_process("talkgroup")),
            child: None,
            bin: None,
            log: None,
            media_port: None,
        })
    }

    /// `Some(description)` once the server process is gone.
    pub fn exited(&mut self) -> Option<String> {
        if let Some(c) = self.child.as_mut() {
            return match c.try_wait() {
                Ok(Some(st)) => Some(st.to_string()),
                Ok(None) => None,
                Err(e) => Some(e.to_string()),
            };
        }
        match self.pid {
            Some(pid) if !crate::procfs::alive(pid) => Some(format!("process {pid} is gone")),
            _ => None,
        }
    }

    /// Stop a server we started: SIGTERM, then SIGKILL after 3 s.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let pid = c.id() as i32;
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `n` lines of a file, terminal colour codes removed.
pub fn tail(path: &Path, n: usize) -> String {
    let text = strip_ansi(&std::fs::read_to_string(path).unwrap_or_default());
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Remove `ESC [ … letter` sequences.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' && it.peek() == Some(&'[') {
            it.next();
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `Some(description)` once any of `servers` is gone (with several nodes, which one).
pub fn any_exited(servers: &mut [Server]) -> Option<String> {
    let n = servers.len();
    servers.iter_mut().enumerate().find_map(|(i, s)| {
        s.exited()
            .map(|st| if n > 1 { format!("node {i}: {st}") } else { st })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_error_says_to_build() {
        let e = find_binary(Some(Path::new("/nonexistent/talkgroup"))).unwrap_err();
        assert!(e.contains("no such file"));
    }

    #[test]
    fn ansi_codes_are_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x"),
            "2026  INFO x"
        );
    }

    #[test]
    fn free_ports() {
        assert!(free_tcp_port().unwrap() > 0);
        let base = free_udp_range(2).unwrap();
        assert!((31_000..32_000).contains(&base));
    }
}
