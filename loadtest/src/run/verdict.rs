//! Pass or fail, and the exit status that says why.

use crate::cli::Config;
use crate::report::{Report, Verdict};

/// Loss above `--fail-on-loss`.
pub const EXIT_LOSS: i32 = 2;
/// A server died.
pub const EXIT_CRASH: i32 = 3;

/// The verdict on a finished run (`crashed`: a server died).
pub fn verdict(cfg: &Config, report: &Report, crashed: Option<&str>) -> Verdict {
    let mut v = Verdict {
        pass: true,
        exit_code: 0,
        reasons: Vec::new(),
    };
    if let Some(c) = crashed {
        v.pass = false;
        v.exit_code = EXIT_CRASH;
        v.reasons.push(format!("the server crashed: {c}"));
    }
    if let Some(limit) = cfg.fail_on_loss {
        if report.summary.loss_pct > limit {
            v.pass = false;
            if v.exit_code == 0 {
                v.exit_code = EXIT_LOSS;
            }
            v.reasons.push(format!(
                "loss {:.3} % > --fail-on-loss {limit} %",
                report.summary.loss_pct
            ));
        }
    }
    if report.summary.expected_deliveries == 0 && v.exit_code == 0 {
        v.reasons
            .push("nothing was sent in the measured phases".into());
    }
    v
}
