//! `loadtest`: the talkgroup load harness. See `cli.rs` for the flags, `run/` for how a run goes, and
//! the workspace README for how to read the report.
//!
//! Exit status: 0 pass, 1 setup error, 2 loss above `--fail-on-loss`, 3 the server crashed.

mod cli;
mod cluster;
mod connection;
mod controller;
mod loopback;
mod metrics;
mod mmsg;
mod model;
mod output;
mod procfs;
mod protocol;
mod raw_forwarder;
mod receiver;
mod relaycost;
mod report;
mod run;
mod scenario;
mod schedule;
mod seen;
mod sender;
mod seq;
mod server;
mod sockets;
mod stamp;
mod stats;
mod svg;
mod sys;
mod table;
mod tally;
mod webrtc;

use clap::Parser;

fn main() {
    let args = cli::Args::parse();
    if args.list_scenarios {
        let dir = cli::scenarios_dir(&args);
        for name in scenario::list(&dir) {
            let desc = scenario::Scenario::load(&name, &dir)
                .ok()
                .and_then(|(s, _)| s.description)
                .unwrap_or_default();
            println!("{name:<24} {desc}");
        }
        return;
    }
    let cfg = match cli::resolve(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("loadtest: {e}");
            std::process::exit(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    // Several nodes: first the same load on a 1-node cluster (same Redis store), the local reference.
    let cpus = sys::affinity_of(0).unwrap_or_default();
    let reference = if cfg.nodes > 1 {
        let mut c = cfg.clone();
        c.name = format!("{}-1node", cfg.name);
        c.nodes = 1;
        c.split_phase = false;
        eprintln!("== reference: the same load on 1 node ==");
        let r = match rt.block_on(run::run(&c)) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("loadtest: reference run: {e}");
                std::process::exit(1);
            }
        };
        print!("{}", table::table(&r));
        if let Err(e) = output::write(&r, &c.out) {
            eprintln!("loadtest: writing the report: {e}");
        }
        // A run pins the harness away from its server's shard core: undo that before the next one.
        if !cpus.is_empty() {
            run::placement::pin_own_threads(&cpus, None);
        }
        eprintln!("== {} nodes ==", cfg.nodes);
        Some(r)
    } else {
        None
    };
    let mut report = match rt.block_on(run::run(&cfg)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadtest: {e}");
            std::process::exit(1);
        }
    };
    if let Some(r) = &reference {
        report.relay_cost = relaycost::from_reports(r, &report, false);
        report.relay_cost_shards = relaycost::from_reports(r, &report, true);
        if report.relay_cost.is_none() {
            report.warnings.push(
                "relay cost unavailable (no CPU figures or nothing forwarded in the reference)"
                    .into(),
            );
        }
    }
    print!("{}", table::table(&report));
    match output::write(&report, &cfg.out) {
        Ok((json, svg)) => println!("reports: {} {}", json.display(), svg.display()),
        Err(e) => eprintln!("loadtest: writing the report: {e}"),
    }
    std::process::exit(report.verdict.exit_code);
}
