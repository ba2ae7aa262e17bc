//! Test clients: a WebSocket signaling client and a plain-RTP member, both on 127.0.0.1 with timeouts.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpStream, UdpSocket};
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const STEP: Duration = Duration::from_secs(5);

/// A signaling connection that keeps frames it was not asked for yet.
pub struct Signal {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    backlog: Vec<Value>,
    pub hello: Value,
}

impl Signal {
    pub async fn connect(http: SocketAddr) -> Signal {
        let (ws, _) = tokio::time::timeout(
            STEP,
            tokio_tungstenite::connect_async(format!("ws://{http}/ws")),
        )
        .await
        .expect("connect timed out")
        .expect("connect failed");
        let mut s = Signal {
            ws,
            backlog: vec![],
            hello: Value::Null,
        };
        s.hello = s.next_raw().await.expect("no hello");
        assert_eq!(s.hello["type"], "hello");
        s
    }

    /// Says goodbye: a WebSocket close frame (the server then ends the session at once).
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Ws::Text(v.to_string().into()))
            .await
            .expect("send failed");
    }

    pub async fn send_text(&mut self, t: &str) {
        self.ws
            .send(Ws::Text(t.to_string().into()))
            .await
            .expect("send failed");
    }

    async fn next_raw(&mut self) -> Option<Value> {
        loop {
            match tokio::time::timeout(STEP, self.ws.next()).await {
                Ok(Some(Ok(Ws::Text(t)))) => {
                    return Some(serde_json::from_str(&t).expect("server sent bad JSON"))
                }
                Ok(Some(Ok(Ws::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(_))) => continue,
                Err(_) => panic!("no frame within {STEP:?}"),
            }
        }
    }

    /// The next frame for which `pred` holds (others are kept for later calls).
    pub async fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i);
        }
        loop {
            let v = match self.next_raw().await {
                Some(v) => v,
                None => panic!(
                    "connection closed while waiting for {what}; backlog {:?}",
                    self.backlog
                ),
            };
            if pred(&v) {
                return v;
            }
            self.backlog.push(v);
        }
    }

    /// Like [`Signal::expect`], waiting up to `within` in all (quiet spells longer than one step allowed).
    pub async fn expect_within(
        &mut self,
        what: &str,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(i) = self.backlog.iter().position(&pred) {
                return self.backlog.remove(i);
            }
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Ws::Text(t)))) => self
                    .backlog
                    .push(serde_json::from_str(&t).expect("server sent bad JSON")),
                Ok(Some(Ok(Ws::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => {
                    panic!("closed while waiting for {what}")
                }
                Ok(Some(Ok(_))) => continue,
                Err(_) => panic!("no {what} within {within:?}; backlog {:?}", self.backlog),
            }
        }
    }

    pub async fn expect_floor(&mut self, channel: &str, state: &str) -> Value {
        let (c, s) = (channel.to_string(), state.to_string());
        self.expect(&format!("floor {state} on {channel}"), move |v| {
            v["type"] == "floor" && v["channel"] == c && v["state"] == s.as_str()
        })
        .await
    }

    pub async fn expect_type(&mut self, ty: &str) -> Value {
        let t = ty.to_string();
        self.expect(ty, move |v| v["type"] == t.as_str()).await
    }

    /// True when the server closes the connection within the step (frames before it are kept).
    pub async fn closed(&mut self) -> bool {
        loop {
            match tokio::time::timeout(STEP, self.ws.next()).await {
                Ok(Some(Ok(Ws::Text(t)))) => self
                    .backlog
                    .push(serde_json::from_str(&t).unwrap_or(Value::Null)),
                Ok(Some(Ok(Ws::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => return true,
                Ok(Some(Ok(_))) => continue,
                Err(_) => return false,
            }
        }
    }

    /// Reads what arrives within `settle` and forgets it and everything kept so far.
    pub async fn settle(&mut self, settle: Duration) {
        let deadline = tokio::time::Instant::now() + settle;
        while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, self.ws.next()).await {}
        self.backlog.clear();
    }

    pub fn backlog(&self) -> &[Value] {
        &self.backlog
    }

    /// Everything kept so far and what arrives within `within`, taken out of the backlog.
    pub async fn drain(&mut self, within: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + within;
        while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, self.ws.next()).await {
            if let Ws::Text(t) = frame {
                self.backlog
                    .push(serde_json::from_str(&t).expect("server sent bad JSON"));
            }
        }
        std::mem::take(&mut self.backlog)
    }

    pub async fn press(&mut self, channel: &str) {
        self.send(json!({"type":"ptt","channel":channel,"action":"press"}))
            .await;
    }

    pub async fn release(&mut self, channel: &str) {
        self.send(json!({"type":"ptt","channel":channel,"action":"release"}))
            .await;
    }
}

/// One received RTP packet: (ssrc, seq, timestamp, marker, payload).
pub type Received = (u32, u16, u32, bool, Vec<u8>);

/// A plain-RTP member: its UDP socket and what `joined` told it.
pub struct RtpMember {
    pub name: String,
    pub sock: UdpSocket,
    pub server: SocketAddr,
    /// Our outbound stream as a listener: the SSRC the server uses towards us.
    pub ssrc: u32,
    seq: u16,
    ts: u32,
    own_ssrc: u32,
}

impl RtpMember {
    /// Joins `channel` as `name` over `sig` and latches (sends one receiver report).
    pub async fn join(sig: &mut Signal, channel: &str, name: &str) -> RtpMember {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = sock.local_addr().expect("local addr");
        sig.send(json!({"type":"join","channel":channel,"member":name,"transport":"rtp","rtp_addr":addr.to_string()}))
            .await;
        let (c, n) = (channel.to_string(), name.to_string());
        let joined = sig
            .expect("joined", move |v| {
                v["type"] == "joined" && v["channel"] == c.as_str() && v["member"] == n.as_str()
            })
            .await;
        let server: SocketAddr = joined["rtp"]["server_addr"]
            .as_str()
            .expect("server_addr")
            .parse()
            .expect("addr");
        let ssrc = joined["rtp"]["ssrc"].as_u64().expect("ssrc") as u32;
        let m = RtpMember {
            name: name.into(),
            sock,
            server,
            ssrc,
            seq: 1000,
            ts: 50_000,
            own_ssrc: rand_ssrc(name),
        };
        m.latch().await;
        m
    }

    pub async fn latch(&self) {
        let rr = talkgroup::rtp::receiver_report(1);
        self.sock.send_to(&rr, self.server).await.expect("send rr");
    }

    /// Sends one Opus-like packet with `payload`.
    pub async fn send_rtp(&mut self, payload: &[u8]) {
        let p = talkgroup::rtp::build_packet(false, 111, self.seq, self.ts, self.own_ssrc, payload);
        self.seq = self.seq.wrapping_add(1);
        self.ts = self.ts.wrapping_add(960);
        self.sock.send_to(&p, self.server).await.expect("send rtp");
    }

    /// Sends one packet with RTP timestamp `ts` (and the sequence number it implies at 20 ms a packet),
    /// so a test can leave gaps as uplink loss would.
    pub async fn send_rtp_at(&mut self, payload: &[u8], ts: u32) {
        let seq = (ts / 960) as u16;
        let p = talkgroup::rtp::build_packet(false, 111, seq, ts, self.own_ssrc, payload);
        self.sock.send_to(&p, self.server).await.expect("send rtp");
    }

    pub async fn send_raw(&self, data: &[u8]) {
        self.sock
            .send_to(data, self.server)
            .await
            .expect("send raw");
    }

    /// Receives RTP packets until `n` arrived or `wait` passed: (ssrc, seq, ts, marker, payload).
    pub async fn recv_rtp(&self, n: usize, wait: Duration) -> Vec<Received> {
        let mut out = vec![];
        let mut buf = [0u8; 2048];
        let deadline = tokio::time::Instant::now() + wait;
        while out.len() < n {
            let Ok(r) = tokio::time::timeout_at(deadline, self.sock.recv_from(&mut buf)).await
            else {
                break;
            };
            let (len, _) = r.expect("recv");
            let data = &buf[..len];
            if talkgroup::rtp::classify(data) != talkgroup::rtp::Kind::Rtp {
                continue; // sender reports
            }
            let v = talkgroup::rtp::RtpView::parse(data).expect("server sent bad RTP");
            out.push((v.ssrc, v.seq, v.timestamp, v.marker, v.payload.to_vec()));
        }
        out
    }
}

fn rand_ssrc(name: &str) -> u32 {
    name.bytes()
        .fold(0x1234_5678u32, |h, b| h.rotate_left(5) ^ u32::from(b))
}

/// A tiny HTTP/1.1 GET (no client crate needed for three routes).
pub async fn http_get(http: SocketAddr, path: &str) -> (u16, String) {
    http_get_with(http, path, &[]).await
}

/// `http_get` returning the body's bytes (e.g. a recording).
pub async fn http_get_bytes(http: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(STEP, TcpStream::connect(http))
        .await
        .expect("timeout")
        .expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut buf))
        .await
        .expect("timeout")
        .expect("read");
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(buf.len(), |i| i + 4);
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, buf[head_end..].to_vec())
}

/// `http_get` with extra request headers (e.g. `("Authorization", "Bearer …")`).
pub async fn http_get_with(
    http: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    http_request(http, "GET", path, headers).await
}

/// A tiny HTTP/1.1 POST without a body: (status, body).
pub async fn http_post(http: SocketAddr, path: &str) -> (u16, String) {
    http_request(http, "POST", path, &[]).await
}

/// `http_post` with extra request headers.
pub async fn http_post_with(
    http: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    http_request(http, "POST", path, headers).await
}

/// One HTTP/1.1 request without a body, the connection closed after it: (status, body).
async fn http_request(
    http: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(STEP, TcpStream::connect(http))
        .await
        .expect("timeout")
        .expect("connect");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut buf))
        .await
        .expect("timeout")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Reads one metric value (first sample whose line starts with `prefix`), summed over matching lines.
pub fn metric(body: &str, prefix: &str) -> u64 {
    body.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A child process killed when dropped, so a failing test leaves no server behind.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next floor frame on `channel` whose state is one of `states`.
pub async fn floor_any(s: &mut Signal, channel: &str, states: &[&str]) -> Value {
    let (c, st): (String, Vec<String>) = (
        channel.into(),
        states.iter().map(|s| s.to_string()).collect(),
    );
    s.expect(&format!("floor {states:?}"), move |v| {
        v["type"] == "floor"
            && v["channel"] == c.as_str()
            && st.iter().any(|x| v["state"] == x.as_str())
    })
    .await
}

/// Reads a child server's log until it says where it serves HTTP (bounded: 20 s).
pub fn read_http_addr(child: &mut std::process::Child) -> SocketAddr {
    use std::io::{BufRead, BufReader};
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("http_addr=").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("node did not start")
        .parse()
        .expect("http_addr")
}

/// Starts the `talkgroup` binary on 127.0.0.1 with free ports (`serve … --no-pin` plus `extra`) and waits
/// until it serves; the guard kills it when dropped.
pub fn spawn_server(extra: &[&str]) -> (ChildGuard, SocketAddr) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_talkgroup"))
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--media-ip",
            "127.0.0.1",
            "--media-port",
            "0",
            "--no-pin",
        ])
        .args(extra)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn talkgroup");
    let http = read_http_addr(&mut child);
    (ChildGuard(child), http)
}

/// The real Opus frames of `shared/data/speech.opus20` (`[u16 BE length][packet]`…: 431 frames of
/// 20 ms, 8.6 s of speech). Fails, naming the file, when it is missing.
pub fn speech_frames() -> Vec<Vec<u8>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/speech.opus20");
    let data = std::fs::read(path).unwrap_or_else(|e| {
        panic!("{path}: {e} (the project's shared test data, beside the repository)")
    });
    let mut frames = vec![];
    let mut at = 0;
    while at + 2 <= data.len() {
        let len = usize::from(u16::from_be_bytes([data[at], data[at + 1]]));
        let Some(p) = data.get(at + 2..at + 2 + len) else {
            break;
        };
        frames.push(p.to_vec());
        at += 2 + len;
    }
    assert!(!frames.is_empty(), "{path} holds no frames");
    frames
}

/// Sends `signal` to the child.
pub fn kill(child: &std::process::Child, signal: i32) {
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, signal) };
}

/// Waits up to `within` for the child to exit; its status, or `None` if it is still running.
pub async fn exited(
    child: &mut std::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
