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
            let server = match Server::start(args) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("talkgroup: {e}");
                    std::process::exit(1);
                }
            };
            wait_for_signal();
            tracing::info!("signal received: stopping");
            server.shutdown();
        }
    }
}

/// Blocks until SIGINT or SIGTERM.
fn wait_for_signal() {
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
    rt.block_on(async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    });
}
