//! A deliberately small stand-in for the talkgroup server, speaking just enough of protocol v1 (plain RTP)
//! to exercise the harness end to end while the real server is not at hand:
//! `cargo build --release -p loadtest --example mock_server`, then
//! `loadtest --spawn-server --server-bin target/release/examples/mock_server`.
//!
//! It is not a reference implementation: one mutex, one media thread, no timers (T1/T2), no queueing.
// A test stand-in, not a shard: one lock keeps it short (the workspace bans locks for the server).
#![allow(clippy::disallowed_types)]

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio_tungstenite::tungstenite::Message;

struct Leg {
    addr: SocketAddr,
    ssrc: u32,
    seq: u16,
    latched: bool,
    ws: UnboundedSender<String>,
}

#[derive(Default)]
struct Channel {
    members: HashMap<String, Leg>,
    speaker: Option<String>,
    epoch: u64,
    new_spurt: bool,
}

#[derive(Default)]
struct State {
    channels: HashMap<String, Channel>,
    by_addr: HashMap<SocketAddr, (String, String)>,
}

#[derive(Default)]
struct Counters {
    pin: AtomicU64,
    fwd: AtomicU64,
    drop_not_holder: AtomicU64,
    drop_unknown: AtomicU64,
}

fn arg(name: &str, default: &str) -> String {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn main() {
    let http: SocketAddr = arg("--http", "127.0.0.1:8080").parse().expect("--http");
    let media_port: u16 = arg("--media-port", "40000").parse().expect("--media-port");
    let media = UdpSocket::bind(("127.0.0.1", media_port)).expect("bind media");
    let media_addr = media.local_addr().expect("media addr");
    let state = Arc::new(Mutex::new(State::default()));
    let counters = Arc::new(Counters::default());
    {
        let (state, counters, sock) = (
            state.clone(),
            counters.clone(),
            media.try_clone().expect("clone"),
        );
        std::thread::spawn(move || media_loop(sock, state, counters));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let l = TcpListener::bind(http).await.expect("bind http");
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            let (state, counters, media) = (
                state.clone(),
                counters.clone(),
                media.try_clone().expect("clone"),
            );
            tokio::spawn(async move {
                let mut peek = [0u8; 64];
                let n = s.peek(&mut peek).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&peek[..n]).to_string();
                if head.starts_with("GET /ws") {
                    ws_conn(s, state, media, media_addr).await;
                } else {
                    http_conn(s, &head, &counters).await;
                }
            });
        }
    });
}

async fn http_conn(mut s: TcpStream, head: &str, c: &Counters) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0u8; 2048];
    let _ = s.read(&mut buf).await;
    let body = if head.starts_with("GET /metrics") {
        format!(
            "# TYPE talkgroup_packets_in_total counter\ntalkgroup_packets_in_total{{shard=\"0\"}} {}\n\
talkgroup_packets_forwarded_total{{shard=\"0\"}} {}\n\
talkgroup_packets_dropped_total{{shard=\"0\",reason=\"not_holder\"}} {}\n\
talkgroup_packets_dropped_total{{shard=\"0\",reason=\"unknown_source\"}} {}\n",
            c.pin.load(Ordering::Relaxed),
            c.fwd.load(Ordering::Relaxed),
            c.drop_not_holder.load(Ordering::Relaxed),
            c.drop_unknown.load(Ordering::Relaxed)
        )
    } else {
        "ok".to_string()
    };
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
}

async fn ws_conn(
    s: TcpStream,
    state: Arc<Mutex<State>>,
    _media: UdpSocket,
    media_addr: SocketAddr,
) {
    let Ok(ws) = tokio_tungstenite::accept_async(s).await else {
        return;
    };
    let (mut tx, mut rx) = ws.split();
    let (out, mut out_rx) = unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if tx.send(Message::text(m)).await.is_err() {
                break;
            }
        }
    });
    let _ = out.send(
        json!({"type":"hello","protocol":1,"session":"mock","limits":{"max_frame":65536},
               "timers":{"t1_ms":4000,"t2_ms":30000,"t3_ms":0},"ice_servers":[]})
        .to_string(),
    );
    let mut mine: HashMap<String, String> = HashMap::new(); // channel → member
    while let Some(Ok(msg)) = rx.next().await {
        let Message::Text(t) = msg else { continue };
        let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
            continue;
        };
        let ch = v["channel"].as_str().unwrap_or("").to_string();
        let mut st = state.lock().expect("lock");
        match v["type"].as_str() {
            Some("join") => {
                let member = v["member"].as_str().unwrap_or("").to_string();
                let Ok(addr) = v["rtp_addr"].as_str().unwrap_or("").parse::<SocketAddr>() else {
                    continue;
                };
                let ssrc = (addr.port() as u32) << 16
                    ^ u32::from_be_bytes(match addr.ip() {
                        std::net::IpAddr::V4(v) => v.octets(),
                        _ => [0; 4],
                    })
                    ^ 0x5151;
                let c = st.channels.entry(ch.clone()).or_default();
                c.members.insert(
                    member.clone(),
                    Leg {
                        addr,
                        ssrc,
                        seq: addr.port().wrapping_mul(7),
                        latched: false,
                        ws: out.clone(),
                    },
                );
                let speaker = c.speaker.clone();
                let epoch = c.epoch;
                st.by_addr.insert(addr, (ch.clone(), member.clone()));
                mine.insert(ch.clone(), member.clone());
                let _ = out.send(
                    json!({"type":"joined","id":v["id"],"channel":ch,"member":member,"members":[],"speaker":speaker,
                           "epoch":epoch,"rtp":{"server_addr":media_addr.to_string(),"ssrc":ssrc,"payload_type":111}})
                    .to_string(),
                );
            }
            Some("ptt") => {
                let Some(member) = mine.get(&ch).cloned() else {
                    continue;
                };
                let Some(c) = st.channels.get_mut(&ch) else {
                    continue;
                };
                let press = v["action"] == "press";
                if press {
                    if c.speaker.is_some() {
                        let _ = out.send(json!({"type":"floor","channel":ch,"state":"denied","speaker":c.speaker,"reason":"busy"}).to_string());
                        continue;
                    }
                    c.epoch += 1;
                    c.speaker = Some(member.clone());
                    c.new_spurt = true;
                    for (name, leg) in &c.members {
                        let ev = if *name == member {
                            json!({"type":"floor","channel":ch,"state":"granted","speaker":member,"epoch":c.epoch,"duration_ms":30000})
                        } else {
                            json!({"type":"floor","channel":ch,"state":"taken","speaker":member,"epoch":c.epoch})
                        };
                        let _ = leg.ws.send(ev.to_string());
                    }
                } else if c.speaker.as_deref() == Some(member.as_str()) {
                    c.speaker = None;
                    for leg in c.members.values() {
                        let _ = leg.ws.send(
                            json!({"type":"floor","channel":ch,"state":"idle","epoch":c.epoch})
                                .to_string(),
                        );
                    }
                }
            }
            _ => {}
        }
    }
    // Disconnected: leave every channel.
    let mut st = state.lock().expect("lock");
    for (ch, member) in mine {
        if let Some(c) = st.channels.get_mut(&ch) {
            if let Some(leg) = c.members.remove(&member) {
                st.by_addr.remove(&leg.addr);
            }
        }
    }
}

fn media_loop(sock: UdpSocket, state: Arc<Mutex<State>>, c: Arc<Counters>) {
    let mut buf = [0u8; 2048];
    let mut out = Vec::with_capacity(2048);
    loop {
        let Ok((n, src)) = sock.recv_from(&mut buf) else {
            continue;
        };
        c.pin.fetch_add(1, Ordering::Relaxed);
        let mut st = state.lock().expect("lock");
        let Some((ch, member)) = st.by_addr.get(&src).cloned() else {
            c.drop_unknown.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let Some(chan) = st.channels.get_mut(&ch) else {
            continue;
        };
        if let Some(l) = chan.members.get_mut(&member) {
            l.latched = true;
        }
        let rtcp = n >= 2 && (192..=223).contains(&buf[1]);
        if rtcp || n < 12 || chan.speaker.as_deref() != Some(member.as_str()) {
            c.drop_not_holder.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let marker = std::mem::take(&mut chan.new_spurt);
        for (name, leg) in chan.members.iter_mut() {
            if *name == member || !leg.latched {
                continue;
            }
            leg.seq = leg.seq.wrapping_add(1);
            out.clear();
            out.extend_from_slice(&buf[..n]);
            out[1] = (buf[1] & 0x7f) | if marker { 0x80 } else { 0 };
            out[2..4].copy_from_slice(&leg.seq.to_be_bytes());
            out[8..12].copy_from_slice(&leg.ssrc.to_be_bytes());
            if sock.send_to(&out, leg.addr).is_ok() {
                c.fwd.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
