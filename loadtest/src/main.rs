//! `loadtest`: the talkgroup load harness. See `cli.rs` for the flags, `run.rs` for how a run goes, and
//! the workspace README for how to read the report.
//!
//! Exit status: 0 pass, 1 setup error, 2 loss above `--fail-on-loss`, 3 the server crashed.

mod ceiling;
mod cli;
mod controller;
mod metrics;
mod model;
mod procfs;
mod receiver;
mod report;
mod run;
mod scenario;
mod sender;
mod seq;
mod server;
mod signaling;
mod sockets;
mod stamp;
mod stats;
mod svg;
mod sys;

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
    let report = match rt.block_on(run::run(&cfg)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadtest: {e}");
            std::process::exit(1);
        }
    };
    print!("{}", report.table());
    match report.write(&cfg.out) {
        Ok((json, svg)) => println!("reports: {} {}", json.display(), svg.display()),
        Err(e) => eprintln!("loadtest: writing the report: {e}"),
    }
    std::process::exit(report.verdict.exit_code);
}
