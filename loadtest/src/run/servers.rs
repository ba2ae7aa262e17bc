//! The servers under test, as the set-up sees them: started (one node, or N nodes and their Redis) or
//! attached to, described for the report, and measured before any load — their memory, and their CPU
//! with everyone joined and silent (timers, keep-alives, sender reports), the fixed cost that CPU per
//! packet is read against.

use super::snapshot::cpu_sum;
use crate::cli::Config;
use crate::cluster::Redis;
use crate::procfs;
use crate::report::ServerInfo;
use crate::server::Server;
use crate::sys::mono_ns;
use std::time::Duration;

/// Server CPU with everyone joined and silent, per node: (whole process, shard threads), ns per s.
pub type IdleCpu = Vec<Option<(f64, f64)>>;

/// The servers under test: spawned (one, or N nodes and their Redis) or attached to.
pub async fn start(cfg: &Config) -> Result<(Option<Redis>, Vec<Server>), String> {
    if cfg.spawn_server && cfg.cluster {
        let bin = crate::server::find_binary(cfg.server_bin.as_deref())?;
        eprintln!(
            "starting redis-server and {} node(s) of {} (shards {} each, --store redis)",
            cfg.nodes,
            bin.display(),
            cfg.shards
        );
        let (r, nodes) =
            crate::cluster::spawn(bin, cfg.nodes, cfg.shards, &cfg.server_args, &cfg.out).await?;
        Ok((Some(r), nodes))
    } else if cfg.spawn_server {
        let bin = crate::server::find_binary(cfg.server_bin.as_deref())?;
        eprintln!("starting {} (shards {})", bin.display(), cfg.shards);
        let s = Server::spawn(
            bin,
            cfg.shards,
            cfg.media_port,
            &cfg.server_args,
            &cfg.out,
            "server.log",
        )
        .await?;
        Ok((None, vec![s]))
    } else {
        Ok((
            None,
            vec![Server::attach(cfg.server, cfg.server_pid).await?],
        ))
    }
}

pub fn server_info(cfg: &Config, servers: &[Server]) -> ServerInfo {
    let s = &servers[0];
    ServerInfo {
        http: s.http.to_string(),
        pid: s.pid,
        spawned: cfg.spawn_server,
        bin: s.bin.as_ref().map(|p| p.display().to_string()),
        log: s.log.as_ref().map(|p| p.display().to_string()),
        media_port: s.media_port,
        nodes: if servers.len() > 1 {
            servers
                .iter()
                .map(|s| (s.http.to_string(), s.pid))
                .collect()
        } else {
            Vec::new()
        },
        ..Default::default()
    }
}

/// RSS summed over `pids` (`None` when any is unknown).
pub fn rss(pids: &[Option<i32>]) -> Option<u64> {
    pids.iter()
        .map(|p| p.and_then(procfs::rss_bytes))
        .sum::<Option<u64>>()
}

/// The servers' CPU over `secs` seconds of silence, per node (whole process, shard threads), ns per s.
pub async fn idle_cpu(pids: &[Option<i32>], secs: u64) -> IdleCpu {
    let cpu = |pid: Option<i32>| {
        pid.map(|p| {
            let t = procfs::threads_cpu(p);
            (cpu_sum(&t, false), cpu_sum(&t, true))
        })
    };
    let a: Vec<Option<(u64, u64)>> = pids.iter().map(|p| cpu(*p)).collect();
    let t0 = mono_ns();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let b: Vec<Option<(u64, u64)>> = pids.iter().map(|p| cpu(*p)).collect();
    let secs = (mono_ns() - t0) as f64 / 1e9;
    a.iter()
        .zip(&b)
        .map(|(a, b)| {
            let (a, b) = ((*a)?, (*b)?);
            Some((
                b.0.saturating_sub(a.0) as f64 / secs,
                b.1.saturating_sub(a.1) as f64 / secs,
            ))
        })
        .collect()
}

/// The whole cluster's idle CPU, ns per s (`None` when a node's is unknown).
pub fn idle_total(idle: &IdleCpu) -> Option<f64> {
    idle.iter().map(|x| x.map(|x| x.0)).sum::<Option<f64>>()
}
