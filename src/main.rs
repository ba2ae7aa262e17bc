use clap::Parser;
use tracing_subscriber::EnvFilter;

use talkgroup::config::{Cli, CommandLine};
use talkgroup::server::Server;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        CommandLine::Serve(args) => {
            // Signal handlers go in before the server says it serves: a SIGTERM right after "talkgroup
            // serving" must stop it cleanly, not kill it.
            let signals = Signals::install();
            let server = match Server::start(args) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("talkgroup: {e}");
                    std::process::exit(1);
                }
            };
            signals.wait();
            tracing::info!("signal received: stopping");
            server.shutdown();
        }
    }
}

/// SIGINT and SIGTERM handlers, installed up front.
struct Signals {
    rt: tokio::runtime::Runtime,
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("talkgroup: cannot wait for signals: {e}");
                std::process::exit(1);
            }
        };
        let term = rt.block_on(async {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok()
        });
        Signals { rt, term }
    }

    /// Blocks until SIGINT or SIGTERM.
    fn wait(mut self) {
        self.rt.block_on(async {
            match self.term.as_mut() {
                Some(term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                None => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        });
    }
}
