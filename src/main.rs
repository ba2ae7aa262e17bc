use tracing_subscriber::EnvFilter;

use talkgroup::auth::Rights;
use talkgroup::config::{self, CliError, CommandLine, ConfigCommand, TokenArgs};
use talkgroup::server::{Lifecycle, Server};

/// The exit status after a shard panicked (EX_SOFTWARE): not 0, so a supervisor restarts the node.
const EXIT_SHARD_DIED: i32 = 70;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = match config::parse_cli(std::env::args_os()) {
        Ok(cli) => cli,
        Err(CliError::Clap(e)) => e.exit(),
        Err(e) => {
            eprintln!("talkgroup: {e}");
            std::process::exit(2);
        }
    };
    match cli.command {
        CommandLine::Serve(args) => {
            // Signal handlers go in before the server says it serves: a SIGTERM right after "talkgroup
            // serving" must stop it cleanly, not kill it.
            let signals = Signals::install();
            let mut server = match Server::start(args) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("talkgroup: {e}");
                    std::process::exit(1);
                }
            };
            let code = signals.run(&mut server);
            server.shutdown();
            std::process::exit(code);
        }
        CommandLine::Config(ConfigCommand::Check { file }) => match config::check_file(&file) {
            Ok(text) => print!("{text}"),
            Err(CliError::Clap(e)) => e.exit(),
            Err(e) => {
                eprintln!("talkgroup config check: {e}");
                std::process::exit(1);
            }
        },
        CommandLine::Token(args) => match mint(&args) {
            Ok(token) => println!("{token}"),
            Err(e) => {
                eprintln!("talkgroup token: {e}");
                std::process::exit(1);
            }
        },
    }
}

/// `talkgroup token`: signs the claims the flags describe with the configured key.
fn mint(args: &TokenArgs) -> Result<String, String> {
    if args.channels.is_empty() && !args.admin {
        return Err("give at least one --channel (or --admin for an operator's token)".into());
    }
    let keys =
        talkgroup::auth::keys::load(args.auth_key.as_deref(), args.auth_keys_file.as_deref())
            .map_err(|e| e.to_string())?
            .ok_or("no key: give --auth-key (or TALKGROUP_AUTH_KEY) or --auth-keys-file")?;
    let signer = keys
        .signer(args.kid.as_deref())
        .map_err(|e| e.to_string())?;
    let rights = Rights {
        channels: args.channels.clone(),
        listen: !args.no_listen,
        talk: args.talk,
        max_priority: args.max_priority,
        emergency: args.emergency,
        admin: args.admin,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = talkgroup::auth::keys::claims(&args.sub, rights, now, args.ttl);
    let token = talkgroup::auth::keys::mint(&claims, signer).map_err(|e| e.to_string())?;
    // Verified with the same keys the server loads: a token this prints is one the server accepts.
    keys.verifier
        .verify(&token, now)
        .map_err(|e| format!("the minted token does not verify: {e}"))?;
    Ok(token)
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

    /// Runs the node's life: the first SIGTERM or SIGINT drains it (talk bursts in progress end, every
    /// client is sent `goaway`), a second one stops it at once; a drain that completes (also one asked
    /// for with `POST /admin/drain`) ends it. Returns the exit status: 0, or [`EXIT_SHARD_DIED`] when a
    /// shard panicked (the node drains, then exits so that its supervisor restarts it).
    fn run(mut self, server: &mut Server) -> i32 {
        let Some(mut life) = server.take_lifecycle() else {
            return 0;
        };
        self.rt.block_on(async {
            let mut code = 0;
            let mut draining = false;
            loop {
                let signal = async {
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
                };
                tokio::select! {
                    _ = signal => {
                        if draining {
                            tracing::info!("second signal: stopping now");
                            return code;
                        }
                        tracing::info!("signal received: draining (a second signal stops at once)");
                        draining = true;
                        server.drain();
                    }
                    event = life.recv() => match event {
                        Some(Lifecycle::ShardDied { shard, reason }) => {
                            tracing::error!(shard, reason, "a shard died: draining, then exiting non-zero");
                            code = EXIT_SHARD_DIED;
                            draining = true;
                        }
                        Some(Lifecycle::Stopped) | None => {
                            tracing::info!("stopped");
                            return code;
                        }
                    },
                }
            }
        })
    }
}
