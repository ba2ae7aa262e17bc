//! The knee search's answer: step k of N lets `channels·k/N` channels talk; the first step over the loss
//! or p99 limit ends the search, and the step before it is the knee.

use super::results::Done;
use crate::cli::Config;
use crate::report::{Knee, KneeStep, PhaseResult};

/// Whether a knee step's figures are within the limits.
pub fn within_limits(cfg: &Config, r: &PhaseResult) -> bool {
    r.loss_pct <= cfg.knee_loss_pct && r.latency.p99_us <= cfg.knee_p99_us
}

/// The knee from the steps that ran.
pub fn knee(cfg: &Config, done: &[Done]) -> Knee {
    let steps: Vec<KneeStep> = done
        .iter()
        .filter(|d| d.result.kind == "knee-step")
        .map(|d| KneeStep {
            active_channels: d.result.active_channels,
            pps_in: d.result.pps_in,
            pps_out: d.result.pps_out,
            p50_us: d.result.latency.p50_us,
            p99_us: d.result.latency.p99_us,
            loss_pct: d.result.loss_pct,
            server_cpu_per_delivered_ns: d
                .result
                .server
                .as_ref()
                .and_then(|s| s.cpu_per_delivered_ns),
            pass: within_limits(cfg, &d.result),
        })
        .collect();
    let knee = steps.iter().take_while(|s| s.pass).last().cloned();
    let failing = steps.iter().find(|s| !s.pass);
    let note = match failing {
        Some(f) if knee.is_none() => format!(
            "the first step ({} channels, {:.0} pkt/s out) is already over the limits (p99 {:.0} µs, loss {:.3} %): \
             lower --channels",
            f.active_channels, f.pps_out, f.p99_us, f.loss_pct
        ),
        Some(f) => format!(
            "first step over the limits: {} channels, {:.0} pkt/s out, p99 {:.0} µs, loss {:.3} %",
            f.active_channels, f.pps_out, f.p99_us, f.loss_pct
        ),
        None => format!(
            "not reached: every step passed up to {} channels; raise --channels to push further",
            steps.last().map(|s| s.active_channels).unwrap_or(0)
        ),
    };
    Knee {
        loss_limit_pct: cfg.knee_loss_pct,
        p99_limit_us: cfg.knee_p99_us,
        found: failing.is_some(),
        steps,
        knee,
        note,
    }
}
