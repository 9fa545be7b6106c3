//! The server's configuration, as `main` parses it from flags and environment variables.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::model::Task;

/// Everything `serve` needs.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// The model: a GGUF file, or a directory with config.json, *.safetensors and tokenizer.json.
    #[arg(long, env = "KANDLE_MODEL")]
    pub model: PathBuf,
    /// The model name clients send in "model" (default: the file or directory name).
    #[arg(long, env = "KANDLE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// The task; inferred from the model when absent.
    #[arg(long, env = "KANDLE_TASK", value_enum)]
    pub task: Option<Task>,
    /// Compute device. Only "cpu" is supported by this build.
    #[arg(long, env = "KANDLE_DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: String,
    /// Weight dtype for safetensors models: auto (f32 on CPU), f32, or f16/bf16 for causal
    /// LMs (GGUF files keep their quantisation).
    #[arg(long, env = "KANDLE_DTYPE", default_value = "auto", value_parser = ["auto", "f32", "f16", "bf16"])]
    pub dtype: String,
    /// Address to listen on.
    #[arg(long, env = "KANDLE_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "KANDLE_PORT", default_value_t = 8000)]
    pub port: u16,
    /// File holding API keys, one per line; when set, /v1 requests need `Authorization: Bearer <key>`.
    #[arg(long, env = "KANDLE_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Sequences generated concurrently (embedding inputs per forward pass).
    #[arg(long, env = "KANDLE_MAX_BATCH_SIZE", default_value_t = 8)]
    pub max_batch_size: usize,
    /// Admitted requests that may wait beyond the running batch; more get 429.
    #[arg(long, env = "KANDLE_MAX_QUEUE", default_value_t = 32)]
    pub max_queue: usize,
    /// The most tokens one request may generate (also the default max_tokens for chat).
    #[arg(long, env = "KANDLE_MAX_NEW_TOKENS", default_value_t = 512)]
    pub max_new_tokens: usize,
    /// The largest request body accepted, in bytes.
    #[arg(long, env = "KANDLE_MAX_REQUEST_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// The most inputs one embeddings request may hold.
    #[arg(long, env = "KANDLE_MAX_EMBEDDING_INPUTS", default_value_t = 2048)]
    pub max_embedding_inputs: usize,
    /// Per-request time limit, from admission.
    #[arg(long, env = "KANDLE_REQUEST_TIMEOUT", default_value = "300s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// After SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, env = "KANDLE_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// CPU threads for the model's kernels (default: all cores). The binary applies it as
    /// RAYON_NUM_THREADS before any thread starts; embedders of the library set that themselves.
    #[arg(long, env = "KANDLE_THREADS")]
    pub threads: Option<usize>,
}

impl ServeConfig {
    /// A configuration with the defaults above, for embedding the server in tests and tools.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        ServeConfig {
            model: model.into(),
            served_model_name: None,
            task: None,
            device: "cpu".into(),
            dtype: "auto".into(),
            host: IpAddr::from([127, 0, 0, 1]),
            port: 0,
            api_key_file: None,
            max_batch_size: 8,
            max_queue: 32,
            max_new_tokens: 512,
            max_request_bytes: 2 * 1024 * 1024,
            max_embedding_inputs: 2048,
            request_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(30),
            threads: None,
        }
    }

    /// The name clients use in "model".
    pub fn served_model_name(&self) -> String {
        if let Some(n) = &self.served_model_name {
            return n.clone();
        }
        let name = if self.model.extension().and_then(|e| e.to_str()) == Some("gguf") {
            self.model.file_stem()
        } else {
            self.model.file_name()
        };
        name.and_then(|n| n.to_str()).unwrap_or("model").to_owned()
    }
}

fn parse_device(s: &str) -> Result<String, String> {
    match s {
        "cpu" => Ok(s.to_owned()),
        d if d.starts_with("cuda") => Err(format!(
            "device {d:?} needs a CUDA build of kandle-runtime; this build is CPU-only"
        )),
        d => Err(format!("unknown device {d:?} (expected cpu or cuda[:N])")),
    }
}

/// Parses "30s", "500ms", "2m" or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeConfig,
    }

    #[test]
    fn the_operator_s_task_and_dtype_flags_parse() {
        use clap::Parser;
        let c = Cli::try_parse_from([
            "serve",
            "--model",
            "/m",
            "--task",
            "Classification",
            "--dtype",
            "bf16",
        ])
        .unwrap();
        assert_eq!(c.serve.task, Some(Task::Classification));
        assert_eq!(c.serve.dtype, "bf16");
        assert!(Cli::try_parse_from(["serve", "--model", "/m", "--dtype", "f8"]).is_err());
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("3 weeks").is_err());
    }

    #[test]
    fn the_served_name_defaults_to_the_file_stem_or_directory_name() {
        assert_eq!(
            ServeConfig::new("/m/SmolLM2.Q4_1.gguf").served_model_name(),
            "SmolLM2.Q4_1"
        );
        assert_eq!(
            ServeConfig::new("/m/all-MiniLM-L6-v2").served_model_name(),
            "all-MiniLM-L6-v2"
        );
    }
}
