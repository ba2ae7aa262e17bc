//! The run's phases, planned up front from the configuration: an unmeasured warm-up, then either one
//! measured phase (and, with several nodes, the same load with speakers on node 0 only), A/B ceiling
//! rounds against the raw forwarder, or the steps of a knee search.

use crate::cli::Config;
use crate::controller::ANY_NODE;
use crate::report::SPLIT_PHASE;
use std::time::Duration;

/// One planned phase.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    /// `warmup`, `measure`, `relay-split`, `ceiling` or `knee-step`.
    pub kind: &'static str,
    /// Media to the talkgroup server (`false`: to the raw forwarder).
    pub server: bool,
    /// Channels `0..active` talk.
    pub active: u32,
    pub duration: Duration,
    pub measured: bool,
    /// Speakers only on this node ([`ANY_NODE`]: anyone).
    pub speakers_node: u32,
}

/// The phases of a run, in order.
pub fn plan(cfg: &Config) -> Vec<Plan> {
    let mut v = Vec::new();
    let all = cfg.channels;
    let step_channels =
        |k: u32| ((all as u64 * k as u64).div_ceil(cfg.knee_steps as u64)).max(1) as u32;
    if cfg.warmup_s > 0.0 {
        v.push(Plan {
            name: "warmup".into(),
            kind: "warmup",
            server: true,
            // A knee search warms up at its first step, not at the load it is looking for.
            active: if cfg.find_knee { step_channels(1) } else { all },
            duration: cfg.warmup(),
            measured: false,
            speakers_node: ANY_NODE,
        });
    }
    if cfg.ceiling {
        for r in 1..=cfg.ceiling_rounds {
            for (tag, server) in [("A", true), ("B", false)] {
                v.push(Plan {
                    name: format!("{tag}{r}-{}", if server { "tg" } else { "raw" }),
                    kind: "ceiling",
                    server,
                    active: all,
                    duration: cfg.duration(),
                    measured: true,
                    speakers_node: ANY_NODE,
                });
            }
        }
    } else if cfg.find_knee {
        for k in 1..=cfg.knee_steps {
            let active = step_channels(k);
            v.push(Plan {
                name: format!("step{k}"),
                kind: "knee-step",
                server: true,
                active,
                duration: cfg.duration(),
                measured: true,
                speakers_node: ANY_NODE,
            });
        }
    } else {
        v.push(Plan {
            name: "measure".into(),
            kind: "measure",
            server: true,
            active: all,
            duration: cfg.duration(),
            measured: true,
            speakers_node: ANY_NODE,
        });
        if cfg.split_phase {
            // The same load with speakers on node 0 only: node 0 sends relay datagrams, the others only
            // receive them, which tells the two sides' costs apart.
            v.push(Plan {
                name: SPLIT_PHASE.into(),
                kind: "relay-split",
                server: true,
                active: all,
                duration: cfg.duration(),
                measured: true,
                speakers_node: 0,
            });
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{resolve, Args};
    use clap::Parser;

    fn cfg(extra: &[&str]) -> Config {
        let mut v = vec!["loadtest"];
        v.extend_from_slice(extra);
        resolve(&Args::try_parse_from(v).unwrap()).unwrap()
    }

    #[test]
    fn plans() {
        let p = plan(&cfg(&["--warmup", "1s", "--duration", "5s"]));
        assert_eq!(
            p.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["warmup", "measure"]
        );
        let p = plan(&cfg(&[
            "--warmup",
            "0",
            "--ceiling",
            "--ceiling-rounds",
            "2",
        ]));
        let names: Vec<_> = p.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["A1-tg", "B1-raw", "A2-tg", "B2-raw"]);
        assert!(p[0].server && !p[1].server);
        let p = plan(&cfg(&[
            "--warmup",
            "0",
            "--find-knee",
            "--knee-steps",
            "4",
            "--channels",
            "10",
        ]));
        assert_eq!(
            p.iter().map(|p| p.active).collect::<Vec<_>>(),
            [3, 5, 8, 10]
        );
        let knee = [
            "--warmup",
            "1s",
            "--find-knee",
            "--knee-steps",
            "4",
            "--channels",
            "10",
        ];
        let p = plan(&cfg(&knee));
        assert_eq!((p[0].kind, p[0].active), ("warmup", 3));
    }
}
