//! kandle-runtime: the candle inference server.
use clap::{Parser, Subcommand};
use kandle_runtime::ServeConfig;

/// kandle's OpenAI-compatible inference server.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load a model and serve the OpenAI API.
    Serve(ServeConfig),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Serve(config) => {
            kandle_runtime::threads::configure(config.threads);
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(kandle_runtime::run(config))?;
        }
    }
    Ok(())
}
