//! A fault-injecting TCP proxy for tests (toxiproxy's idea, in-process): it sits between the nodes and a
//! test-owned `redis-server` and, on the test's word, adds latency, blackholes every connection, or cuts
//! only the pub/sub connections.
//!
//! - **Latency** delays every chunk by the same amount in each direction (a round trip costs twice it);
//!   chunks keep their order and pipelining is preserved, as on a long link.
//! - **Blackhole**: bytes stop flowing in both directions on every connection, old and new, without a
//!   reset or a close — what a partition does to TCP. They are held, not discarded, and flow again when
//!   it ends, as TCP's retransmissions would deliver them: discarding bytes inside a stream would make the
//!   client read replies to commands it did not send, which no network does to a TCP stream.
//! - **Pub/sub cut**: only connections that subscribed (a `SUBSCRIBE`, `SSUBSCRIBE` or `PSUBSCRIBE`
//!   command seen from the client, by RESP framing, whatever the channel) are closed — and any that
//!   subscribes while the cut lasts — or held as in a blackhole. Commands on other connections flow.
//!
//! The proxy runs on its own thread and tokio runtime, so a test's runtime (or its absence) does not
//! matter; dropping the [`FaultProxy`] stops it and closes every connection.

// Test support, not the data plane: the test's thread sets the faults the proxy's tasks read, behind one
// lock held for an assignment or a copy.
#![allow(clippy::disallowed_types)]

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

/// What happens to pub/sub connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PubSubCut {
    /// They pass like any other.
    #[default]
    None,
    /// They are closed (FIN both ways), and so is any connection that subscribes while this lasts.
    Close,
    /// Their bytes are held in both directions, as in a blackhole.
    Blackhole,
}

/// The faults in force.
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    latency: Duration,
    blackhole: bool,
    pubsub: PubSubCut,
}

/// Counters of what the proxy saw, for a test's report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: u64,
    /// Connections seen subscribing.
    pub pubsub_connections: u64,
    /// Connections the proxy closed because of a [`PubSubCut::Close`].
    pub cut: u64,
}

/// State shared by the handle and the proxy's tasks.
#[derive(Default)]
struct Shared {
    faults: Mutex<Faults>,
    /// Woken whenever the faults change (held writers re-check, cut connections close).
    changed: Notify,
    connections: AtomicU64,
    pubsub_connections: AtomicU64,
    cut: AtomicU64,
}

impl Shared {
    fn faults(&self) -> MutexGuard<'_, Faults> {
        // A panicking test thread cannot leave the faults half-written: every write is one assignment.
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One proxied connection's state.
#[derive(Default)]
struct Conn {
    pubsub: AtomicBool,
    closed: AtomicBool,
}

impl Conn {
    /// Whether its bytes must wait now.
    fn held(&self, f: &Faults) -> bool {
        f.blackhole || (f.pubsub == PubSubCut::Blackhole && self.pubsub.load(Ordering::Relaxed))
    }

    /// Whether it must be closed now.
    fn cut(&self, f: &Faults) -> bool {
        f.pubsub == PubSubCut::Close && self.pubsub.load(Ordering::Relaxed)
    }
}

/// A running proxy. Dropping it stops the proxy and closes every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let task_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => panic!("fault proxy: cannot listen: {e}"),
                    };
                    tokio::select! {
                        _ = accept_loop(listener, upstream, task_shared) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime here cancels every connection's tasks: their sockets close.
            })?;
        Ok(FaultProxy {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://127.0.0.1:PORT/` of the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Delays every chunk by `each_way` in each direction (zero: none).
    pub fn set_latency(&self, each_way: Duration) {
        self.update(|f| f.latency = each_way);
    }

    /// Starts or ends a blackhole of every connection.
    pub fn set_blackhole(&self, on: bool) {
        self.update(|f| f.blackhole = on);
    }

    /// Starts or ends a fault on the pub/sub connections only.
    pub fn set_pubsub_cut(&self, cut: PubSubCut) {
        self.update(|f| f.pubsub = cut);
    }

    /// Ends every fault.
    pub fn heal(&self) {
        self.update(|f| *f = Faults::default());
    }

    /// What the proxy saw so far.
    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            connections: self.shared.connections.load(Ordering::Relaxed),
            pubsub_connections: self.shared.pubsub_connections.load(Ordering::Relaxed),
            cut: self.shared.cut.load(Ordering::Relaxed),
        }
    }

    fn update(&self, change: impl FnOnce(&mut Faults)) {
        change(&mut self.shared.faults());
        self.shared.changed.notify_waiters();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors or the like: the next accept may work; do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        shared.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(proxy_connection(client, upstream, shared.clone()));
    }
}

/// Forwards one connection both ways until either side closes or the connection is cut.
async fn proxy_connection(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let conn = Arc::new(Conn::default());
    // The upstream connection waits out a blackhole too: a partition does not let a handshake through.
    wait_unheld(&shared, &conn).await;
    let Ok(server) = TcpStream::connect(upstream).await else {
        return; // the client sees its connection closed, as when the server is down
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pipe(
        client_read,
        server_write,
        shared.clone(),
        conn.clone(),
        true,
    );
    let down = pipe(
        server_read,
        client_write,
        shared.clone(),
        conn.clone(),
        false,
    );
    let cut = watch_cut(&shared, &conn);
    // Whichever ends first ends the connection: dropping the other halves closes both sockets.
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = cut => {
            shared.cut.fetch_add(1, Ordering::Relaxed);
        }
    }
    conn.closed.store(true, Ordering::Relaxed);
}

/// Resolves when the connection must be cut.
async fn watch_cut(shared: &Shared, conn: &Conn) {
    loop {
        let changed = shared.changed.notified();
        if conn.cut(&shared.faults()) {
            return;
        }
        // A connection is marked pub/sub by its reader, which also notifies.
        changed.await;
    }
}

/// Waits while the connection's bytes must be held.
async fn wait_unheld(shared: &Shared, conn: &Conn) {
    loop {
        let changed = shared.changed.notified();
        if !conn.held(&shared.faults()) {
            return;
        }
        changed.await;
    }
}

/// One direction: read chunks, stamp them with their delivery time, and write them in order when due and
/// not held.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    client_to_server: bool,
) {
    // Bounded: a held connection stops reading once this fills, so TCP's own flow control applies.
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let reader = {
        let shared = shared.clone();
        let conn = conn.clone();
        async move {
            let mut scan = SubscribeScan::default();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if client_to_server && !conn.pubsub.load(Ordering::Relaxed) && scan.feed(&buf[..n])
                {
                    conn.pubsub.store(true, Ordering::Relaxed);
                    shared.pubsub_connections.fetch_add(1, Ordering::Relaxed);
                    shared.changed.notify_waiters();
                }
                let latency = shared.faults().latency;
                if tx
                    .send((Instant::now() + latency, buf[..n].to_vec()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            wait_unheld(&shared, &conn).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // The reading side closed: pass the close on (half-close, as TCP does).
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// Finds a subscribe command in a client's byte stream by RESP framing (`*N\r\n$LEN\r\nNAME\r\n`), across
/// chunk boundaries. Only the start of each chunk's commands matters for a test: a pub/sub client sends
/// little else, and a false match needs a value holding exactly that framing.
#[derive(Default)]
struct SubscribeScan {
    /// The end of the previous chunk, so that a command split between two chunks is still seen.
    tail: Vec<u8>,
}

impl SubscribeScan {
    const NAMES: [&'static [u8]; 3] = [b"subscribe", b"ssubscribe", b"psubscribe"];

    fn feed(&mut self, chunk: &[u8]) -> bool {
        let mut text = std::mem::take(&mut self.tail);
        text.extend_from_slice(chunk);
        let lower = text.to_ascii_lowercase();
        let found = Self::NAMES
            .iter()
            .any(|name| starts_a_command(&lower, name));
        let keep = text.len().saturating_sub(32);
        self.tail = text[keep..].to_vec();
        found
    }
}

/// True when some `$LEN\r\nNAME\r\n` in `text` directly follows an array header `*N\r\n` (the command's
/// name, not one of its arguments).
fn starts_a_command(text: &[u8], name: &[u8]) -> bool {
    let mut bulk = format!("${}\r\n", name.len()).into_bytes();
    bulk.extend_from_slice(name);
    bulk.extend_from_slice(b"\r\n");
    let mut at = 0;
    while let Some(i) = find(&text[at..], &bulk) {
        let start = at + i;
        let before = &text[..start];
        let header = before.strip_suffix(b"\r\n").is_some_and(|line| {
            line.iter().rposition(|&b| b == b'*').is_some_and(|star| {
                let digits = &line[star + 1..];
                !digits.is_empty() && digits.iter().all(u8::is_ascii_digit)
            })
        });
        if header {
            return true;
        }
        at = start + 1;
    }
    false
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_commands_are_recognised_only_as_commands() {
        let cmd = |parts: &[&str]| {
            let mut s = format!("*{}\r\n", parts.len());
            for p in parts {
                s.push_str(&format!("${}\r\n{p}\r\n", p.len()));
            }
            s.into_bytes()
        };
        for name in ["SUBSCRIBE", "ssubscribe", "PSubscribe"] {
            assert!(SubscribeScan::default().feed(&cmd(&[name, "ch"])), "{name}");
        }
        // A subscribe after other commands on the same connection (e.g. HELLO first), split over chunks.
        let mut scan = SubscribeScan::default();
        let mut bytes = cmd(&["HELLO", "3"]);
        bytes.extend(cmd(&["SUBSCRIBE", "events"]));
        let (a, b) = bytes.split_at(bytes.len() - 20); // within "SUBSCRIBE"
        assert!(!scan.feed(a));
        assert!(scan.feed(b));
        // The word as an argument is not a command.
        assert!(!SubscribeScan::default().feed(&cmd(&["SET", "subscribe", "x"])));
        assert!(!SubscribeScan::default().feed(&cmd(&["PUBLISH", "ch", "hello"])));
    }
}
