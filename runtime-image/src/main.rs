//! kandle-runtime: the candle inference server.
use clap::{Parser, Subcommand};
use kandle_runtime::{DownloadConfig, ServeConfig};

/// kandle's OpenAI-compatible inference server.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start; boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Load a model and serve the OpenAI API.
    Serve(ServeConfig),
    /// Fetch a model from the hub into the cache (the operator's init container); resumes
    /// partial downloads. The token comes from HF_TOKEN.
    Download(DownloadConfig),
}

fn main() -> anyhow::Result<()> {
    // Outside the async runtime, and dropped after it: the exporter's blocking client must be.
    let _telemetry = kandle_telemetry::init(kandle_telemetry::Options {
        service: "kandle-runtime",
        exported: kandle_runtime::telemetry::TARGET,
        exported_not_logged: true,
        json: false,
    })?;
    match Cli::parse().command {
        Command::Serve(config) => {
            kandle_runtime::threads::configure(config.threads);
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(kandle_runtime::run(config))?;
        }
        Command::Download(config) => {
            let rt = tokio::runtime::Runtime::new()?;
            let path = rt.block_on(kandle_runtime::hub::download(&config))?;
            // The one line on stdout: where the model is (logs go to stderr).
            println!("{}", path.display());
        }
    }
    Ok(())
}
