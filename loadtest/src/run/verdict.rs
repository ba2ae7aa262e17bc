//! Pass or fail, and the exit status that says why. A run passes only when it measured something and the
//! books balance: a crash, protocol violations, a run that delivered nothing, a failed send or more
//! deliveries than sends fail it, whatever `--fail-on-loss` says; loss above that limit fails it too.

use crate::cli::Config;
use crate::report::{Report, Verdict};

/// Loss above `--fail-on-loss`.
pub const EXIT_LOSS: i32 = 2;
/// A server died.
pub const EXIT_CRASH: i32 = 3;
/// Listeners saw protocol v1 violations (echo, misrouted, wrong SSRC or payload type, missing marker,
/// timestamps going back).
pub const EXIT_VIOLATION: i32 = 4;
/// The measurement is void: nothing delivered, the harness failed to send, or the books do not balance.
pub const EXIT_VOID: i32 = 5;

/// The verdict on a finished run (`crashed`: a server died). Reads the summary and every phase.
pub fn verdict(cfg: &Config, report: &Report, crashed: Option<&str>) -> Verdict {
    let mut v = Verdict {
        pass: true,
        exit_code: 0,
        reasons: Vec::new(),
    };
    let mut fail = |code: i32, reason: String| {
        v.pass = false;
        if v.exit_code == 0 {
            v.exit_code = code;
        }
        v.reasons.push(reason);
    };
    if let Some(c) = crashed {
        fail(EXIT_CRASH, format!("the server crashed: {c}"));
    }
    let measured = || report.phases.iter().filter(|p| p.measured);
    let violations: u64 = measured().map(|p| p.recv.violations()).sum();
    if violations > 0 {
        fail(
            EXIT_VIOLATION,
            format!("{violations} protocol violation(s) at listeners (see the warnings)"),
        );
    }
    let s = &report.summary;
    if s.delivered == 0 {
        fail(
            EXIT_VOID,
            "nothing was delivered in the measured phases: the run measured nothing".into(),
        );
    }
    if let Some(p) = measured().find(|p| p.target == "raw" && p.delivered == 0) {
        fail(
            EXIT_VOID,
            format!("nothing was delivered in the raw phase {}", p.name),
        );
    }
    let (send, keepalive): (u64, u64) = report.phases.iter().fold((0, 0), |(a, b), p| {
        (a + p.send_errors, b + p.keepalive_errors)
    });
    if send + keepalive > 0 {
        fail(
            EXIT_VOID,
            format!(
                "the harness failed to send {send} media packet(s) and {keepalive} keep-alive(s)"
            ),
        );
    }
    if let Some(p) = measured().find(|p| p.delivered > p.expected_deliveries) {
        fail(
            EXIT_VOID,
            format!(
                "{}: {} deliveries for {} expected: the books do not balance",
                p.name, p.delivered, p.expected_deliveries
            ),
        );
    }
    if let Some(limit) = cfg.fail_on_loss {
        if s.loss_pct > limit {
            fail(
                EXIT_LOSS,
                format!("loss {:.3} % > --fail-on-loss {limit} %", s.loss_pct),
            );
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{PhaseResult, Summary};
    use crate::tally::RecvCounters;

    fn cfg(fail_on_loss: Option<f64>) -> Config {
        let mut c = crate::cli::resolve(&clap::Parser::parse_from(["loadtest"])).unwrap();
        c.fail_on_loss = fail_on_loss;
        c
    }

    fn report(expected: u64, delivered: u64) -> Report {
        let phase = PhaseResult {
            name: "measure".into(),
            target: "talkgroup".into(),
            measured: true,
            expected_deliveries: expected,
            delivered,
            ..Default::default()
        };
        Report {
            summary: Summary {
                expected_deliveries: expected,
                delivered,
                loss_pct: crate::stats::loss_pct(expected, delivered),
                ..Default::default()
            },
            phases: vec![phase],
            ..Default::default()
        }
    }

    #[test]
    fn a_clean_run_passes_and_any_loss_fails_at_zero() {
        let v = verdict(&cfg(Some(0.0)), &report(1000, 1000), None);
        assert!(v.pass && v.exit_code == 0, "{v:?}");
        let v = verdict(&cfg(Some(0.0)), &report(1000, 999), None);
        assert_eq!((v.pass, v.exit_code), (false, EXIT_LOSS));
        assert!(verdict(&cfg(Some(1.0)), &report(1000, 999), None).pass);
    }

    #[test]
    fn nothing_delivered_violations_and_send_errors_fail() {
        let v = verdict(&cfg(None), &report(0, 0), None);
        assert_eq!((v.pass, v.exit_code), (false, EXIT_VOID));
        assert!(v.reasons[0].contains("nothing was delivered"), "{v:?}");

        let mut r = report(100, 100);
        r.phases[0].recv = RecvCounters {
            echo: 1,
            ..Default::default()
        };
        let v = verdict(&cfg(None), &r, None);
        assert_eq!((v.pass, v.exit_code), (false, EXIT_VIOLATION));

        let mut r = report(100, 100);
        r.phases[0].send_errors = 2;
        let v = verdict(&cfg(None), &r, None);
        assert_eq!((v.pass, v.exit_code), (false, EXIT_VOID));
        assert!(v.reasons[0].contains("failed to send 2"), "{v:?}");

        let v = verdict(&cfg(None), &report(100, 101), None);
        assert_eq!((v.pass, v.exit_code), (false, EXIT_VOID));
        assert!(v.reasons[0].contains("do not balance"), "{v:?}");
    }

    #[test]
    fn a_crash_comes_first() {
        let v = verdict(&cfg(Some(0.0)), &report(100, 0), Some("signal 11"));
        assert_eq!(v.exit_code, EXIT_CRASH);
        assert_eq!(v.reasons.len(), 3, "{v:?}"); // crash, nothing delivered, loss
    }
}
