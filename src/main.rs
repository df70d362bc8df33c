//! The `tally` command: `tally serve` runs the server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tally::config::{Config, Overrides};

#[derive(Parser)]
#[command(name = "tally", version, about = "A ledger server for points, coins and tokens")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the server.
    ///
    /// With no arguments: 127.0.0.1:7707, data in ./tally-data.
    /// Example: TALLY_AUTH_ADMIN_PASSWORD=secret tally serve --preset campus
    Serve {
        /// TOML configuration file (every key can also be set as TALLY_<SECTION>_<KEY>).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on, e.g. 127.0.0.1:0 for any free port.
        #[arg(long)]
        listen: Option<String>,
        /// Data folder (created if missing).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Rule preset: "campus".
        #[arg(long)]
        preset: Option<String>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, listen, data, preset } => {
            let overrides = Overrides { listen, data, preset };
            let config = match Config::load(config.as_deref(), std::env::vars(), &overrides) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("tally: {e}");
                    return ExitCode::from(2);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("tally: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(tally::server::serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tally: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
