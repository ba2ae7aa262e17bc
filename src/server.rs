//! Wiring: start the shards, the control thread (the control core's runner + HTTP), watch the shards'
//! threads, and stop them — at once, or by draining.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::serve::ListenerExt;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::config::{self, ServeArgs, StoreKind};
use crate::control::runner::{HubMsg, Runner, Stores as RunnerStores};
use crate::control::{HubConfig, HubCore};
use crate::floor::{FloorConfig, Lease};
use crate::peer::webrtc::WebRtcConfig;
use crate::relay::RelayKey;
use crate::shard::RelayState;
use crate::shard::{self, ShardConfig, ShardHandle};
use crate::signal::http::{self, AppState};
use crate::state::history::{History, MemoryHistory};
use crate::state::memory::{MemoryFloorStore, MemoryRegistry, MemorySessionStore};
use crate::state::redis::{RedisConfig, RedisStore};
use crate::state::{FloorStore, Registry, SessionStore, StoreEvent, Watcher};

/// Why a node did not start.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The options do not make a node (e.g. a port range that overflows, an unreadable key file).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A socket could not be bound.
    #[error("cannot bind {what} {addr}: {source}")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// Its address.
        addr: SocketAddr,
        /// The system's error.
        source: std::io::Error,
    },
    /// Something else failed at start-up (a thread, the store).
    #[error("cannot start: {0}")]
    Start(String),
}

/// What happens to a running node that its owner (`main`) must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifecycle {
    /// A shard's thread panicked: the node drains and should then exit non-zero, so its supervisor
    /// restarts it.
    ShardDied {
        /// The shard.
        shard: usize,
        /// The panic's message.
        reason: String,
    },
    /// The control plane has stopped (a drain completed, or a shutdown): the process may exit.
    Stopped,
}

/// How long the control core waits for a store call before treating it as failed (the Redis backend
/// answers `unavailable` after its own 250 ms response timeout first; this bounds a call that hangs).
pub const STORE_TIMEOUT: Duration = Duration::from_secs(1);

/// The floor lease on a shared store (design: TTL 3 s, renewed every 1 s, holder revoked 250 ms before
/// the lease would run out).
pub const LEASE: Lease = Lease {
    ttl: Duration::from_secs(3),
    renew_every: Duration::from_secs(1),
    margin: Duration::from_millis(250),
};

/// Floor store, session store, cluster registry, and the store's published events (shared stores only).
pub struct Stores {
    /// Floor locks.
    pub floors: Arc<dyn FloorStore>,
    /// Membership and presence.
    pub sessions: Arc<dyn SessionStore>,
    /// Node liveness, channel registrations, placement.
    pub registry: Arc<dyn Registry>,
    /// The transmission log.
    pub history: Arc<dyn History>,
    /// What the store publishes (shared stores only).
    pub events: Option<mpsc::Receiver<StoreEvent>>,
    /// Which channels' events the subscriber follows (shared stores only).
    pub watcher: Option<Watcher>,
}

/// Opens the stores on the control thread's runtime (the Redis client spawns its tasks there).
async fn open_stores(kind: StoreKind, redis: RedisConfig) -> Result<Stores, String> {
    match kind {
        StoreKind::Memory => Ok(Stores {
            floors: Arc::new(MemoryFloorStore::new(redis.node.clone())),
            sessions: Arc::new(MemorySessionStore::default()),
            registry: Arc::new(MemoryRegistry),
            history: Arc::new(MemoryHistory::default()),
            events: None,
            watcher: None,
        }),
        StoreKind::Redis => {
            let url = redis.topology.describe(&redis.url);
            let store = RedisStore::connect(redis)
                .await
                .map_err(|e| format!("redis at {url}: {e}"))?;
            if let Ok(Some(warning)) = store.check_maxmemory_policy().await {
                warn!("{warning}");
            }
            let (watcher, events) = store.subscribe();
            let store = Arc::new(store);
            Ok(Stores {
                floors: store.clone(),
                sessions: store.clone(),
                registry: store.clone(),
                history: store,
                events: Some(events),
                watcher: Some(watcher),
            })
        }
    }
}

/// Serves HTTP on `listener` until the process stops (client addresses go to the routes).
async fn serve_http(listener: tokio::net::TcpListener, app: axum::Router) {
    let listener = listener.tap_io(|tcp| {
        // Signaling frames are small and latency-bound: no Nagle.
        let _ = tcp.set_nodelay(true);
    });
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, service).await {
        warn!(error = %e, "HTTP server stopped");
    }
}

/// A running node.
pub struct Server {
    /// Where it serves HTTP and WebSocket.
    pub http_addr: SocketAddr,
    /// Each shard's media address.
    pub media_addrs: Vec<SocketAddr>,
    hub: mpsc::Sender<HubMsg>,
    control: Option<JoinHandle<()>>,
    /// One watcher per shard: waits for the shard's thread and reports a panic.
    shards: Vec<JoinHandle<()>>,
    lifecycle: Option<mpsc::UnboundedReceiver<Lifecycle>>,
}

/// CPUs this process may run on (sched_getaffinity), to pin shards.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

impl Server {
    /// Starts a node; returns once it listens.
    pub fn start(args: ServeArgs) -> Result<Server, ServerError> {
        let keys =
            crate::auth::keys::load(args.auth_key.as_deref(), args.auth_keys_file.as_deref())
                .map_err(|e| ServerError::Config(e.to_string()))?;
        let auth = keys.map(|k| k.verifier);
        match &auth {
            Some(v) => info!(keys = ?v, "member tokens are checked"),
            None => warn!(
                "no --auth-key or --auth-keys-file: the server runs OPEN (anyone may join any \
                 channel under any name); development only"
            ),
        }
        let cpus = allowed_cpus();
        let n = args.shards.unwrap_or(cpus.len().max(1)).max(1);
        let (t1, t2, t3) = args.timers();
        let rtp_allow = args.rtp_allow.clone();
        let node = args.node_id();
        let (lock_ttl, lease) = match args.store {
            // No lease to renew: the lock lives past T2 and is always released by the floor.
            StoreKind::Memory => (t2 + Duration::from_secs(10), None),
            StoreKind::Redis => (LEASE.ttl, Some(LEASE)),
        };
        let floor = FloorConfig { t1, t2, t3, lease };
        let announce_ip = args.announce_ip.unwrap_or_else(|| {
            if args.media_ip.is_unspecified() {
                config::primary_ip()
            } else {
                args.media_ip
            }
        });
        let mut redis = RedisConfig::new(args.redis_url(), args.key_prefix.clone(), node.clone());
        redis.topology = args.redis_topology().map_err(ServerError::Config)?;
        // The relay needs a shared key: the configured secret, or one the nodes agree on through the
        // store they already trust with every floor (see `Registry::cluster_key`).
        let (relay_key, agreed_key) = match (args.store, &args.cluster_secret) {
            (StoreKind::Redis, Some(secret)) => {
                info!("relay on: packets between nodes are authenticated with --cluster-secret");
                (Some(RelayKey::new(secret.as_bytes())), None)
            }
            (StoreKind::Redis, None) => {
                let key = agree_cluster_key(redis.clone())?;
                info!(
                    "relay on: packets between nodes are authenticated with the key the nodes keep in \
                     Redis ({}:tg:cluster_key)",
                    args.key_prefix
                );
                (Some(RelayKey::new(key.as_bytes())), Some(key))
            }
            (StoreKind::Memory, _) => (None, None),
        };
        let relay_base = args.relay_port.unwrap_or(if args.media_port == 0 {
            0
        } else {
            args.media_port.saturating_add(1000)
        });

        // Recordings: one writer thread for the node, fed by every shard through a bounded queue.
        let record_dir = args.record.clone().or_else(|| args.record_dir.clone());
        let recorder = match &record_dir {
            Some(dir) => Some(crate::record::spawn(dir.clone()).map_err(|e| {
                ServerError::Config(format!("cannot record to {}: {e}", dir.display()))
            })?),
            None => None,
        };

        // One DTLS certificate for the whole process; each shard puts its own port in the candidate.
        let webrtc = WebRtcConfig::generate(SocketAddr::new(announce_ip, 0))
            .map_err(|e| ServerError::Start(e.to_string()))?;

        let (event_tx, event_rx) = flume::bounded(65_536);
        let mut handles: Vec<ShardHandle> = Vec::new();
        let mut shard_threads = Vec::new();
        // Testing only (`--fault-injection`): a way to make each shard panic.
        let mut faults = Vec::new();
        for i in 0..n {
            let port = if args.media_port == 0 {
                0
            } else {
                args.media_port
                    .checked_add(i as u16)
                    .ok_or_else(|| ServerError::Config("media port range overflows".into()))?
            };
            let bind = SocketAddr::new(args.media_ip, port);
            let cpu = (!args.no_pin && !cpus.is_empty()).then(|| cpus[i % cpus.len()]);
            let relay = match &relay_key {
                Some(key) => {
                    let port = if relay_base == 0 {
                        0
                    } else {
                        relay_base.checked_add(i as u16).ok_or_else(|| {
                            ServerError::Config("relay port range overflows".into())
                        })?
                    };
                    let state = RelayState {
                        key: key.clone(),
                        node: node.clone(),
                        peers: Default::default(),
                    };
                    Some((SocketAddr::new(args.media_ip, port), state))
                }
                None => None,
            };
            let fault = args.fault_injection.then(|| {
                let (tx, rx) = flume::bounded(1);
                faults.push(tx);
                rx
            });
            let (handle, join) = shard::spawn(
                i,
                bind,
                cpu,
                ShardConfig {
                    t1,
                    batch_window: Duration::from_micros(args.batch_window_us),
                    quiet_window: Duration::from_millis(args.quiet_window_ms),
                    webrtc: Some(webrtc.clone()),
                    recorder: recorder.clone(),
                    ..Default::default()
                },
                relay,
                event_tx.clone(),
                fault,
            )
            .map_err(|source| ServerError::Bind {
                what: "media port",
                addr: bind,
                source,
            })?;
            handles.push(handle);
            shard_threads.push(join);
        }
        let media_addrs: Vec<SocketAddr> = handles.iter().map(|h| h.media_addr).collect();
        let relay_addrs: Option<Vec<SocketAddr>> = relay_key.as_ref().map(|_| {
            handles
                .iter()
                .filter_map(|h| h.relay_addr)
                .map(|a| SocketAddr::new(announce_ip, a.port()))
                .collect()
        });
        let hub_config = HubConfig {
            node,
            floor,
            lock_ttl,
            announce_ip,
            media_ports: media_addrs.iter().map(SocketAddr::port).collect(),
            rtp_allow,
            relay_addrs,
            shared: args.store == StoreKind::Redis,
            store_timeout: STORE_TIMEOUT,
            seed: rand::random(),
            auth: auth.clone(),
            limits: args.limits.limits(),
            rtp_any_ip: args.rtp_any_ip,
            resume_window: args.resume_window,
            record_all: match (&args.record, &args.record_dir) {
                (Some(_), _) => Some(true),
                (None, Some(_)) => Some(false),
                (None, None) => None,
            },
            drain_timeout: args.drain_timeout,
            cluster_key: agreed_key,
            placement: args.placement,
            public_url: args.public_url.clone(),
        };

        let listener =
            std::net::TcpListener::bind(args.http).map_err(|source| ServerError::Bind {
                what: "HTTP",
                addr: args.http,
                source,
            })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ServerError::Start(e.to_string()))?;
        let http_addr = listener
            .local_addr()
            .map_err(|e| ServerError::Start(e.to_string()))?;
        let mut hub_config = hub_config;
        if hub_config.public_url.is_none() {
            // Where other nodes send this node's channels' members (placement by redirect).
            let public = SocketAddr::new(announce_ip, http_addr.port());
            hub_config.public_url = Some(format!("ws://{public}/ws"));
        }
        let (hub_tx, hub_rx) = mpsc::channel(65_536);
        let admin_listener = match args.admin_http {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr).map_err(|source| ServerError::Bind {
                    what: "admin HTTP",
                    addr,
                    source,
                })?;
                l.set_nonblocking(true)
                    .map_err(|e| ServerError::Start(e.to_string()))?;
                Some(l)
            }
            None => None,
        };
        let state = AppState {
            hub: hub_tx.clone(),
            shards: handles.clone(),
            floor,
            next_conn: Arc::new(AtomicU64::new(1)),
            auth,
            allowed_origins: Arc::new(args.allowed_origin.clone()),
            limits: args.limits.limits(),
            record_dir,
            faults: args.fault_injection.then(|| Arc::new(faults)),
        };
        if args.fault_injection {
            warn!("--fault-injection is on: POST /admin/fault/panic-shard makes a shard panic (testing only)");
        }
        let store_kind = args.store;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (life_tx, life_rx) = mpsc::unbounded_channel();
        let stopped_tx = life_tx.clone();
        let load_shards: Vec<_> = handles.iter().map(|h| h.commands.clone()).collect();
        let load_hub = hub_tx.clone();
        let control = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let stores = match open_stores(store_kind, redis).await {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let core = HubCore::new(hub_config, std::time::Instant::now());
                    let runner = Runner::new(
                        core,
                        RunnerStores {
                            floors: stores.floors,
                            sessions: stores.sessions,
                            registry: stores.registry,
                            history: stores.history,
                            watcher: stores.watcher,
                        },
                        handles,
                    );
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    tokio::spawn(crate::control::load::sample_load(load_shards, load_hub));
                    let hub_task = tokio::spawn(runner.run(hub_rx, event_rx, stores.events));
                    if let Some(admin) = admin_listener {
                        match tokio::net::TcpListener::from_std(admin) {
                            Ok(l) => {
                                tokio::spawn(serve_http(l, http::admin_router(state.clone())));
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(e.to_string()));
                                return;
                            }
                        }
                    }
                    let app = http::router(state, args.admin_http.is_some());
                    tokio::spawn(serve_http(listener, app));
                    let _ = ready_tx.send(Ok(()));
                    let _ = hub_task.await;
                });
                let _ = stopped_tx.send(Lifecycle::Stopped);
            })
            .map_err(|e| ServerError::Start(e.to_string()))?;
        ready_rx
            .recv()
            .map_err(|_| ServerError::Start("control thread died".into()))?
            .map_err(ServerError::Start)?;
        let shards = shard_threads
            .into_iter()
            .enumerate()
            .map(|(i, join)| watch_shard(i, join, hub_tx.clone(), life_tx.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        info!(%http_addr, ?media_addrs, shards = n, "talkgroup serving");
        Ok(Server {
            http_addr,
            media_addrs,
            hub: hub_tx,
            control: Some(control),
            shards,
            lifecycle: Some(life_rx),
        })
    }

    /// What happens to the node (a shard died; it stopped), for its owner to act on; `None` after the
    /// first call.
    pub fn take_lifecycle(&mut self) -> Option<mpsc::UnboundedReceiver<Lifecycle>> {
        self.lifecycle.take()
    }

    /// Starts draining (see [`crate::control`]'s `drain.rs`): joins refused, talk bursts in progress
    /// end, every client sent `goaway`; the node stops when the last one is gone (a [`Lifecycle::Stopped`]
    /// follows). Never blocks the caller.
    pub fn drain(&self) {
        if let Err(mpsc::error::TrySendError::Full(msg)) = self.hub.try_send(HubMsg::Drain) {
            // The control thread is busy: wait for room on a thread of its own (`blocking_send` must
            // not run inside the caller's runtime).
            let hub = self.hub.clone();
            std::thread::spawn(move || {
                let _ = hub.blocking_send(msg);
            });
        }
    }

    /// Stops cleanly: floors released and announced idle, members told `left`, shards stopped.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(control) = self.control.take() else {
            return;
        };
        let hub = self.hub.clone();
        let shards: Vec<JoinHandle<()>> = self.shards.drain(..).collect();
        // On a thread of its own: `blocking_send` panics when called from inside a runtime (tests, or an
        // embedding application), and waiting on a plain thread does not.
        let stopper = std::thread::spawn(move || {
            let (done_tx, done_rx) = oneshot::channel();
            if hub
                .blocking_send(HubMsg::Shutdown { done: done_tx })
                .is_ok()
            {
                let _ = done_rx.blocking_recv();
            }
            let _ = control.join();
            for t in shards {
                let _ = t.join();
            }
        });
        let _ = stopper.join();
    }
}

/// The relay key of a cluster without a configured secret: a fresh random one is proposed, and the key
/// already in Redis (the first node's) wins. Asked on a runtime of its own before the shards start (they
/// need the key; the control thread's store connection comes later), on a thread of its own (a runtime
/// cannot be started from within one: tests and embedders start nodes from async code).
fn agree_cluster_key(redis: RedisConfig) -> Result<String, ServerError> {
    let proposed: String = rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let url = redis.topology.describe(&redis.url);
    let ask = move || -> Result<String, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let store = RedisStore::connect(redis).await?;
            store.cluster_key(&proposed).await
        })
        .map_err(|e| e.to_string())
    };
    std::thread::scope(|s| s.spawn(ask).join())
        .map_err(|_| ServerError::Start("the relay key agreement panicked".into()))?
        .map_err(|e| ServerError::Start(format!("redis at {url}: agreeing on the relay key: {e}")))
}

/// Waits for shard `index`'s thread on a thread of its own; a panic is told to the control plane (which
/// drains the node and reports it in `/healthz`) and to the node's owner (which exits non-zero).
fn watch_shard(
    index: usize,
    join: JoinHandle<Result<(), String>>,
    hub: mpsc::Sender<HubMsg>,
    life: mpsc::UnboundedSender<Lifecycle>,
) -> Result<JoinHandle<()>, ServerError> {
    std::thread::Builder::new()
        .name(format!("shard-{index}-watch"))
        .spawn(move || {
            let reason = match join.join() {
                Ok(Ok(())) => return,
                Ok(Err(reason)) => reason,
                Err(_) => "its watcher thread panicked".to_string(),
            };
            tracing::error!(shard = index, reason, "shard thread died");
            let _ = hub.blocking_send(HubMsg::ShardDied {
                shard: index,
                reason: reason.clone(),
            });
            let _ = life.send(Lifecycle::ShardDied {
                shard: index,
                reason,
            });
        })
        .map_err(|e| ServerError::Start(e.to_string()))
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
