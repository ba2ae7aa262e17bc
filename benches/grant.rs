//! Press → granted latency over the real signaling path (WebSocket on 127.0.0.1, in-process node), with
//! the embedded store and with Redis on loopback (a `redis-server` this bench starts itself), plus
//! sequential grants per second. Percentiles from the raw samples.
//!
//! Run: `cargo bench --bench grant` (needs `redis-server` on PATH for the Redis row).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use talkgroup::config::{ServeArgs, StoreKind};
use talkgroup::server::Server;
use tokio_tungstenite::tungstenite::Message;

const ROUNDS: usize = 2000;

async fn next_floor(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
    state: &str,
) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("timeout")
            .expect("closed")
            .expect("ws");
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).expect("json");
            if v["type"] == "floor" && (v["state"] == state || v["state"] == "denied") {
                return v;
            }
        }
    }
}

async fn measure(args: ServeArgs, label: &str) {
    let server = Server::start(args).expect("server");
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.http_addr))
        .await
        .expect("ws");
    ws.next().await; // hello
    let send = |v: Value| Message::Text(v.to_string().into());
    ws.send(send(json!({"type":"join","channel":"bench","member":"m","transport":"rtp","rtp_addr":"127.0.0.1:9"}))).await.unwrap();
    loop {
        if let Some(Ok(Message::Text(t))) = ws.next().await {
            if t.contains("\"joined\"") {
                break;
            }
        }
    }
    let mut samples = Vec::with_capacity(ROUNDS);
    let start = Instant::now();
    let mut warm = 0;
    while samples.len() < ROUNDS {
        let t0 = Instant::now();
        ws.send(send(
            json!({"type":"ptt","channel":"bench","action":"press"}),
        ))
        .await
        .unwrap();
        let v = next_floor(&mut ws, "granted").await;
        let dt = t0.elapsed();
        if v["state"] != "granted" {
            // Redis subscription still coming up at start: presses are denied `unavailable` until then.
            warm += 1;
            assert!(warm < 1000, "never granted: {v}");
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        samples.push(dt);
        ws.send(send(
            json!({"type":"ptt","channel":"bench","action":"release"}),
        ))
        .await
        .unwrap();
        next_floor(&mut ws, "idle").await;
    }
    let total = start.elapsed();
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "{label:>7}: press->granted p50 {:>7.1?}  p99 {:>7.1?}  max {:>7.1?}  | {:.0} press+release cycles/s ({} rounds)",
        pct(0.50),
        pct(0.99),
        samples[samples.len() - 1],
        ROUNDS as f64 / total.as_secs_f64(),
        ROUNDS
    );
    server.shutdown();
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing special: run a short smoke then.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut args = ServeArgs::local_test();
        args.shards = Some(1);
        measure(args.clone(), "memory").await;
        // Redis is half of what this bench measures: without redis-server it fails, saying what to
        // install, rather than report only the memory store and exit 0.
        let redis = rtpio::testing::RedisServer::start();
        args.store = StoreKind::Redis;
        args.redis_url = Some(redis.url());
        measure(args, "redis").await;
    });
}
