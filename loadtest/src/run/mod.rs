//! The coordinator: how a run goes, phase by phase.
//!
//! 1. **Set-up** ([`setup`], [`servers`], [`join`]): the server or nodes and their idle CPU, the members'
//!    sockets, the WebRTC peers, the joins, the sender and receiver threads, one controller per channel.
//! 2. **Phases** ([`plan`], [`phase`]): a warm-up, after which the harness places itself away from the
//!    server's shard cores ([`placement`]); then the measured phases. Each is opened and closed by a
//!    [`snapshot`] and turned into its figures ([`results`]).
//! 3. **Searches**: A/B ceiling rounds against the raw forwarder ([`ceiling`]) or the steps of a knee
//!    search ([`knee`]), which ends at the first step over the limits.
//! 4. **Results**: the summary and curves ([`summary`]), and the [`verdict`].
//!
//! Phase boundaries are clean: the controllers stop and release, in-flight packets drain, and only then
//! are the counters read and the receivers told to close the phase, so each phase's loss is exact.

mod ceiling;
mod cost;
mod join;
mod knee;
mod phase;
pub mod placement;
mod plan;
mod results;
mod servers;
mod setup;
mod snapshot;
mod summary;
mod verdict;

use crate::cli::Config;
use crate::report::Report;
use crate::tally::RecvCounters;
use results::Done;
use setup::Rig;

/// Run the whole thing. `Err` is a set-up failure (exit 1); a finished run's pass/fail is in the verdict.
pub async fn run(cfg: &Config) -> Result<Report, String> {
    std::fs::create_dir_all(&cfg.out).map_err(|e| format!("{}: {e}", cfg.out.display()))?;
    let mut report = Report {
        tool: "talkgroup-loadtest".into(),
        format: crate::report::FORMAT,
        scenario: cfg.name.clone(),
        description: cfg.description.clone(),
        started_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        config: serde_json::to_value(cfg).unwrap_or_default(),
        ..Default::default()
    };
    let mut rig = Rig::start(cfg, &mut report).await?;

    let plans = plan::plan(cfg);
    let total: f64 = plans.iter().map(|p| p.duration.as_secs_f64() + 1.0).sum();
    eprintln!(
        "running {} phase(s), about {total:.0} s: talk {} ({:.0} % duty), {} pkt/s per speaker, payload {}",
        plans.len(),
        cfg.talk_text,
        cfg.talk.duty() * 100.0,
        cfg.rate,
        cfg.payload.describe()
    );
    let mut done: Vec<Done> = Vec::new();
    let mut crashed: Option<String> = None;
    let mut placed: Option<placement::Placement> = None;
    let mut progress = phase::Progress::new();
    for (i, p) in plans.iter().enumerate() {
        let m = phase::run_phase(&mut rig, i, p, &mut progress, &mut report.series).await;
        // After the warm-up we know which server threads do the work: pin the harness away from them.
        let place = placed.get_or_insert_with(|| {
            let pl = placement::after_warmup(
                &m.s0.threads,
                &m.s1.threads,
                rig.pids[0],
                cfg.pin,
                rig.raw.as_ref().map(|r| r.tid()),
                cfg.ceiling_cpu,
            );
            report.server.pinned_cpus = pl.shard_cpus.clone();
            report.harness.pinned_cpus = pl.harness_cpus.clone();
            pl
        });
        let result =
            results::phase_result(p, &m, place, &rig.idle, &rig.pids, &mut report.warnings);
        let knee_failed = p.kind == "knee-step" && !knee::within_limits(cfg, &result);
        done.push(Done {
            result,
            latency: m.acc.latency,
            switch: m.acc.switch,
            grant: m.floor.grant.clone(),
        });
        if m.crashed.is_some() {
            crashed = m.crashed;
            break;
        }
        if knee_failed {
            break;
        }
    }

    if let (Some(r), Some((t0, n0))) = (&rig.redis, rig.redis_mark) {
        if let Some(n1) = r.total_commands() {
            let secs = (crate::sys::mono_ns() - t0) as f64 / 1e9;
            report.setup.redis_run_commands_per_s = Some(n1.saturating_sub(n0) as f64 / secs);
        }
        // The steady cost of the registry, once the talk has stopped and the joins' store work (claims,
        // registrations, the first reads of each channel) has long drained: everyone joined, nobody
        // talking.
        tokio::time::sleep(REDIS_SETTLE).await;
        let a = r.total_commands().map(|n| (crate::sys::mono_ns(), n));
        tokio::time::sleep(REDIS_IDLE_WINDOW).await;
        let b = r.total_commands().map(|n| (crate::sys::mono_ns(), n));
        if let (Some((t0, n0)), Some((t1, n1))) = (a, b) {
            // Less the two INFO commands of the measure itself.
            let n = n1.saturating_sub(n0).saturating_sub(2);
            report.setup.redis_idle_commands_per_s = Some(n as f64 / ((t1 - t0) as f64 / 1e9));
        }
    }
    let gone = rig.shut_down(&mut report).await;
    crashed = crashed.or(gone);
    finish(cfg, &mut report, done, crashed.as_deref());
    if progress.lost_conns > 0 {
        report.warnings.push(format!(
            "{} WebSocket connection(s) were lost during the run",
            progress.lost_conns
        ));
    }
    report.warnings.extend(progress.server_errors);
    report.server.crashed = crashed;
    rig.stop_servers(&mut report);
    Ok(report)
}

/// After the run, before the Redis idle window: talk bursts end, their store calls drain.
const REDIS_SETTLE: std::time::Duration = std::time::Duration::from_secs(3);
/// How long the nodes' idle cost to Redis is measured (the registry works in periods of 1–3 s).
const REDIS_IDLE_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// Summary, ceiling, knee, curves and verdict.
fn finish(cfg: &Config, report: &mut Report, done: Vec<Done>, crashed: Option<&str>) {
    // Knee first: it decides which steps the summary covers.
    if cfg.find_knee {
        report.knee = Some(knee::knee(cfg, &done));
    }
    (report.summary, report.curves) = summary::summarise(cfg, report.knee.as_ref(), &done);
    if cfg.ceiling {
        let cpu = cfg
            .ceiling_cpu
            .or(report.server.pinned_cpus.first().copied());
        let c = ceiling::ceiling(cfg, &done, cpu);
        if c.ratio.is_none() {
            report.warnings.push(
                "ceiling ratio unavailable (no server CPU figures or nothing delivered)".into(),
            );
        }
        report.ceiling = Some(c);
    }
    report.phases = done.into_iter().map(|d| d.result).collect();
    let mut c = RecvCounters::default();
    for p in report.phases.iter().filter(|p| p.measured) {
        c.add(&p.recv);
    }
    if c.violations() > 0 {
        report.warnings.push(format!(
            "protocol v1 violations at listeners: echo {} misrouted {} ssrc {} payload-type {} marker-missing {} ts-backwards {}",
            c.echo, c.misrouted, c.ssrc_mismatch, c.pt_mismatch, c.marker_missing, c.ts_backwards
        ));
    }
    report.verdict = verdict::verdict(cfg, report, crashed);
}
