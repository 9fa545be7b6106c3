//! The server's configuration, as `main` parses it from flags and environment variables.
//!
//! The operator's pods pass exactly these flags (see `serve_args` in the operator's
//! `builders/deployment.rs`): `--model`, `--file`, `--cache-dir`, `--port`,
//! `--served-model-name`, `--device`, `--dtype`, `--task`, `--architecture`, `--max-batch-size`,
//! `--max-sequence-length`, `--max-concurrent-requests`, `--max-new-tokens`; a test in
//! `tests/tests/runtime_download.rs` runs them verbatim.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::ArgAction;
use clap::builder::BoolishValueParser;

use crate::backend::ComputeDevice;
use crate::hub::{self, HubConfig};
use crate::model::Task;
use crate::source::ModelSource;

/// How to reach the model hub, for `--model hf://...`; shared by `serve` and `download`.
///
/// The token is read from `HF_TOKEN` only, never from a flag: command lines are visible to
/// every process on the node (`ps`), environment variables from a Secret are not.
#[derive(Debug, Clone, clap::Args)]
pub struct HubArgs {
    /// The hub cache directory (default: $HF_HUB_CACHE, else $HF_HOME/hub, else
    /// ~/.cache/huggingface/hub). Layout as huggingface_hub's: models--org--name/{blobs,snapshots,refs}.
    #[arg(long, env = "KANDLE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The hub's base URL.
    #[arg(long = "hub-endpoint", env = "HF_ENDPOINT", default_value = hub::DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// Use only what is in the cache; never touch the network (the operator sets
    /// HF_HUB_OFFLINE=1 for serve).
    #[arg(long, env = "HF_HUB_OFFLINE", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    pub offline: bool,
}

impl Default for HubArgs {
    fn default() -> Self {
        HubArgs {
            cache_dir: None,
            endpoint: hub::DEFAULT_ENDPOINT.into(),
            offline: false,
        }
    }
}

impl HubArgs {
    /// The hub client's configuration, with the token from `HF_TOKEN`.
    pub fn hub_config(&self) -> HubConfig {
        HubConfig {
            endpoint: self.endpoint.clone(),
            token: std::env::var("HF_TOKEN")
                .ok()
                .filter(|t| !t.trim().is_empty()),
            cache_dir: self
                .cache_dir
                .clone()
                .unwrap_or_else(hub::default_cache_dir),
            offline: self.offline,
        }
    }
}

/// A secret that prints as `<redacted>` (Debug included), so that a logged configuration
/// never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(pub String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for ApiKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let key = s.trim();
        if key.is_empty() {
            return Err("the API key is empty".into());
        }
        Ok(ApiKey(key.to_owned()))
    }
}

/// Everything `download` needs.
#[derive(Debug, Clone, clap::Args)]
pub struct DownloadConfig {
    /// The model: `hf://org/repo@revision[/file]`, or a local directory or GGUF file (then
    /// there is nothing to download, and `--to` copies it).
    #[arg(long, env = "KANDLE_MODEL")]
    pub model: String,
    /// One file of the repo to fetch (a GGUF), with the tokenizer files beside it.
    #[arg(long, env = "KANDLE_FILE")]
    pub file: Option<String>,
    /// Write the files into this plain directory instead of the hub cache (takes precedence
    /// over --cache-dir).
    #[arg(long, env = "KANDLE_DOWNLOAD_TO")]
    pub to: Option<PathBuf>,
    #[command(flatten)]
    pub hub: HubArgs,
}

/// Everything `serve` needs.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// The model: a GGUF file, a directory with config.json, *.safetensors and tokenizer.json,
    /// or `hf://org/repo@revision[/file]` (fetched into --cache-dir unless HF_HUB_OFFLINE=1,
    /// in which case it must be there already).
    #[arg(long, env = "KANDLE_MODEL")]
    pub model: PathBuf,
    /// One file of the model (a GGUF in a hub repo or a local directory).
    #[arg(long, env = "KANDLE_FILE")]
    pub file: Option<String>,
    #[command(flatten)]
    pub hub: HubArgs,
    /// The model name clients send in "model" (default: the file or directory name).
    #[arg(long, env = "KANDLE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// The task; inferred from the model when absent. A task the model cannot do is refused
    /// at load.
    #[arg(long, env = "KANDLE_TASK", value_enum)]
    pub task: Option<Task>,
    /// The architecture the model is expected to have (config.json's model_type or an entry of
    /// its architectures, or the GGUF's general.architecture); a mismatch fails the load.
    #[arg(long, env = "KANDLE_ARCHITECTURE")]
    pub architecture: Option<String>,
    /// Compute device: cpu, or cuda / cuda:N in a CUDA build (the `cuda` feature; a CPU
    /// build refuses it here, before anything loads).
    #[arg(long, env = "KANDLE_DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: ComputeDevice,
    /// Weight dtype for safetensors models: auto (f32 on CPU), f32, or f16/bf16 for causal
    /// LMs (GGUF files keep their quantisation).
    #[arg(long, env = "KANDLE_DTYPE", default_value = "auto", value_parser = ["auto", "f32", "f16", "bf16"])]
    pub dtype: String,
    /// Address to listen on.
    #[arg(long, env = "KANDLE_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// Port to listen on (0 picks a free one); 8080 is the operator's default serving port.
    #[arg(long, env = "KANDLE_PORT", default_value_t = 8080)]
    pub port: u16,
    /// File holding API keys, one per line; when set, /v1 requests need `Authorization: Bearer <key>`.
    #[arg(long, env = "KANDLE_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// An API key, as an alternative to --api-key-file (the operator sets KANDLE_API_KEY from
    /// `serving.apiKeySecretRef`). Prefer the environment variable: command lines are visible
    /// to every process on the node.
    #[arg(long, env = "KANDLE_API_KEY", hide_env_values = true)]
    pub api_key: Option<ApiKey>,
    /// Sequences generated concurrently (embedding inputs per forward pass).
    #[arg(long, env = "KANDLE_MAX_BATCH_SIZE", default_value_t = 8)]
    pub max_batch_size: usize,
    /// Admitted requests that may wait beyond the running batch; more get 429.
    #[arg(long, env = "KANDLE_MAX_QUEUE", default_value_t = 32)]
    pub max_queue: usize,
    /// The most requests admitted at once, running and waiting together; more get 429. When
    /// set it replaces --max-queue with N - max-batch-size (and lowers max-batch-size to N
    /// when N is smaller).
    #[arg(long, env = "KANDLE_MAX_CONCURRENT_REQUESTS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_concurrent_requests: Option<u64>,
    /// The longest sequence (prompt + generated tokens; embedding inputs are truncated to it),
    /// capped at the model's own context length.
    #[arg(long, env = "KANDLE_MAX_SEQUENCE_LENGTH", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_sequence_length: Option<u64>,
    /// The most positions of keys and values the running batch holds together (TGI's
    /// `--max-batch-total-tokens`), each sequence counted at its prompt plus its max_tokens:
    /// a request that does not fit beside the running ones waits for them, and one larger
    /// than it all gets less room for its output (a 400 when its prompt alone does not fit).
    /// Default: what nine tenths of the memory left on the device after loading holds (on the
    /// CPU the pod's memory limit, else the machine's available memory; on a GPU its free
    /// memory), less the prefix cache's share.
    #[arg(long, env = "KANDLE_MAX_BATCH_TOKENS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_batch_tokens: Option<u64>,
    /// The most tokens one request may generate (also the default max_tokens for chat).
    #[arg(long, env = "KANDLE_MAX_NEW_TOKENS", default_value_t = 512)]
    pub max_new_tokens: usize,
    /// The largest request body accepted, in bytes.
    #[arg(long, env = "KANDLE_MAX_REQUEST_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// The most inputs one embeddings request may hold.
    #[arg(long, env = "KANDLE_MAX_EMBEDDING_INPUTS", default_value_t = 2048)]
    pub max_embedding_inputs: usize,
    /// Positions of keys and values kept after their requests, for later requests that start
    /// with the same tokens (a conversation's next turn, a shared system prompt) to continue
    /// instead of computing them again; 0 turns it off. Counted in the cache's chunks, a
    /// start the kept prompts share once. Default: 2048, or fewer where they would pass
    /// 256 MiB (a 7B model's ~512 KB a token).
    /// Only where continuing gives the same bits as computing afresh (the GGUF llama models).
    #[arg(long, env = "KANDLE_PREFIX_CACHE_TOKENS")]
    pub prefix_cache_tokens: Option<usize>,
    /// A Jinja chat template file that replaces the model's own (vLLM's `--chat-template`):
    /// for a model whose template is missing or wrong. Rendered like the model's, with its
    /// beginning- and end-of-text tokens; a template that does not compile stops the start.
    #[arg(long, env = "KANDLE_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// The format the model writes tool calls in, read for `tool_choice: "auto"` (vLLM's
    /// `--tool-call-parser`): `hermes` (`<tool_call>{…}</tool_call>`: Hermes, Qwen 2.5 and
    /// 3, SmolLM2 and 3), `llama3_json` (`{"name": …, "parameters": …}`: Llama 3.1–3.3),
    /// `mistral` (`[TOOL_CALLS] [{…}]`: Mistral 7B Instruct v0.3), `granite`
    /// (`<|tool_call|>[{…}]`: Granite 3), `phi4_mini_json` (`functools[{…}]`: Phi-4-mini),
    /// `pythonic` (`[name(key=value)]`: Llama 3.2 and 4 with Meta's pythonic templates),
    /// `deepseek_v3` (`<｜tool▁calls▁begin｜>` blocks of fenced calls: DeepSeek-V3 and R1),
    /// `deepseek_v31` (the same blocks, unfenced: DeepSeek-V3.1) or `none` ("auto" refused).
    /// Default: as the chat template shows (`<｜tool▁sep｜>`, `<|tool_call|>`, `functools[`,
    /// Meta's pythonic request, `<tool_call>`, `[TOOL_CALLS]`, or Llama 3's request for its
    /// JSON), else `none`.
    #[arg(long, env = "KANDLE_TOOL_CALL_PARSER", value_enum)]
    pub tool_call_parser: Option<crate::tool_calls::ToolCallParser>,
    /// How a reasoning model's thoughts are told from its answer (vLLM's
    /// `--reasoning-parser`): `deepseek_r1` (`…</think>answer`: DeepSeek-R1 and its
    /// distillations, QwQ; `qwen3` for Qwen3 is the same) or `mistral` (`[THINK]…[/THINK]`, control tokens: Magistral) puts them
    /// in chat answers' `reasoning_content` and `reasoning`. Default: none (the thoughts stay
    /// in `content`).
    #[arg(long, env = "KANDLE_REASONING_PARSER", value_enum)]
    pub reasoning_parser: Option<crate::reasoning::ReasoningParser>,
    /// Responses kept in memory for `/v1/responses`' `previous_response_id` and `GET` /
    /// `DELETE /v1/responses/{id}` (vLLM's `VLLM_ENABLE_RESPONSES_API_STORE`): the last N,
    /// the oldest forgotten first; also the last N conversations created or used
    /// (`/v1/conversations`, `conversation`). 0 (the default) keeps none. Each replica keeps
    /// its own, so behind a Service of several a conversation must stay on one (session
    /// affinity).
    #[arg(long, env = "KANDLE_RESPONSES_STORE", default_value_t = 0)]
    pub responses_store: usize,
    /// Per-request time limit, from admission.
    #[arg(long, env = "KANDLE_REQUEST_TIMEOUT", default_value = "300s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// After SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, env = "KANDLE_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// CPU threads for the model's kernels (default: `RAYON_NUM_THREADS` when set, else the
    /// CPUs the process may use: its affinity and its cgroup's CPU quota, a pod's CPU limit).
    /// The binary applies it as RAYON_NUM_THREADS before any thread starts; embedders of the
    /// library set that themselves.
    #[arg(long, env = "KANDLE_THREADS")]
    pub threads: Option<usize>,
}

impl ServeConfig {
    /// A configuration with the defaults above, for embedding the server in tests and tools.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        ServeConfig {
            model: model.into(),
            file: None,
            hub: HubArgs::default(),
            served_model_name: None,
            task: None,
            architecture: None,
            device: ComputeDevice::Cpu,
            dtype: "auto".into(),
            host: IpAddr::from([127, 0, 0, 1]),
            port: 0,
            api_key_file: None,
            api_key: None,
            max_batch_size: 8,
            max_queue: 32,
            max_concurrent_requests: None,
            max_sequence_length: None,
            max_batch_tokens: None,
            max_new_tokens: 512,
            max_request_bytes: 2 * 1024 * 1024,
            max_embedding_inputs: 2048,
            prefix_cache_tokens: None,
            chat_template: None,
            tool_call_parser: None,
            reasoning_parser: None,
            responses_store: 0,
            request_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(30),
            threads: None,
        }
    }

    /// The model source `--model` and `--file` name.
    pub fn source(&self) -> Result<ModelSource, String> {
        let model = self
            .model
            .to_str()
            .ok_or_else(|| format!("--model {:?} is not valid UTF-8", self.model))?;
        ModelSource::parse(model, self.file.as_deref())
    }

    /// The name clients use in "model": `--served-model-name`, else the GGUF file's stem or
    /// the directory's (or hub repo's) name, with a quantisation tag after a `:`.
    pub fn served_model_name(&self) -> String {
        if let Some(n) = &self.served_model_name {
            return n.clone();
        }
        let path = match self.source() {
            Ok(ModelSource::Local(p)) => p,
            Ok(ModelSource::Hub(h)) => match (h.file, h.quant) {
                (Some(f), _) => PathBuf::from(f),
                // The repo's name and the tag, as Ollama names a hub GGUF (`name:Q4_K_M`).
                (None, Some(q)) => {
                    let name = h.repo.rsplit('/').next().unwrap_or(&h.repo).to_owned();
                    return format!("{name}:{q}");
                }
                (None, None) => PathBuf::from(h.repo),
            },
            Err(_) => self.model.clone(),
        };
        let name = if path.extension().and_then(|e| e.to_str()) == Some("gguf") {
            path.file_stem()
        } else {
            path.file_name()
        };
        name.and_then(|n| n.to_str()).unwrap_or("model").to_owned()
    }

    /// `(max_batch_size, max_queue)` for the engine, after `--max-concurrent-requests`.
    pub fn admission_limits(&self) -> (usize, usize) {
        let batch = self.max_batch_size.max(1);
        match self.max_concurrent_requests {
            Some(n) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                (batch.min(n), n.saturating_sub(batch))
            }
            None => (batch, self.max_queue),
        }
    }
}

fn parse_device(s: &str) -> Result<ComputeDevice, String> {
    match s.parse::<ComputeDevice>() {
        Ok(d) if d.built_in() => Ok(d),
        Ok(d) => Err(format!(
            "device {d} needs a CUDA build of kandle-runtime (the `cuda` feature); this build is \
             CPU-only"
        )),
        Err(e) => Err(e.to_string()),
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
        let c = Cli::try_parse_from(["serve", "--model", "/m", "--tool-call-parser", "hermes"])
            .unwrap();
        assert_eq!(
            c.serve.tool_call_parser,
            Some(crate::tool_calls::ToolCallParser::Hermes)
        );
        let c = Cli::try_parse_from([
            "serve",
            "--model",
            "/m",
            "--tool-call-parser",
            "llama3_json",
        ])
        .unwrap();
        assert_eq!(
            c.serve.tool_call_parser,
            Some(crate::tool_calls::ToolCallParser::Llama3Json)
        );
        let c = Cli::try_parse_from([
            "serve",
            "--model",
            "/m",
            "--reasoning-parser",
            "deepseek_r1",
        ])
        .unwrap();
        assert_eq!(
            c.serve.reasoning_parser,
            Some(crate::reasoning::ReasoningParser::DeepSeekR1)
        );
        let c = Cli::try_parse_from(["serve", "--model", "/m", "--reasoning-parser", "mistral"])
            .unwrap();
        assert_eq!(
            c.serve.reasoning_parser,
            Some(crate::reasoning::ReasoningParser::Mistral)
        );
        let c =
            Cli::try_parse_from(["serve", "--model", "/m", "--reasoning-parser", "qwen3"]).unwrap();
        assert_eq!(
            c.serve.reasoning_parser,
            Some(crate::reasoning::ReasoningParser::DeepSeekR1)
        );
        assert!(
            Cli::try_parse_from(["serve", "--model", "/m", "--reasoning-parser", "r1"]).is_err()
        );
        assert!(
            Cli::try_parse_from(["serve", "--model", "/m", "--tool-call-parser", "x"]).is_err()
        );
    }

    #[test]
    fn the_batch_token_budget_is_a_positive_count() {
        use clap::Parser;
        let parse =
            |n: &str| Cli::try_parse_from(["serve", "--model", "/m", "--max-batch-tokens", n]);
        assert_eq!(parse("65536").unwrap().serve.max_batch_tokens, Some(65536));
        assert!(parse("0").is_err());
        assert!(parse("lots").is_err());
        let c = Cli::try_parse_from(["serve", "--model", "/m"]).unwrap();
        assert_eq!(c.serve.max_batch_tokens, None);
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
        let mut hub = ServeConfig::new("hf://org/Smol-GGUF@main");
        assert_eq!(hub.served_model_name(), "Smol-GGUF");
        hub.file = Some("sub/smol.Q4_1.gguf".into());
        assert_eq!(hub.served_model_name(), "smol.Q4_1");
        let tagged = ServeConfig::new("hf://org/Smol-GGUF:Q4_K_M");
        assert_eq!(tagged.served_model_name(), "Smol-GGUF:Q4_K_M");
    }

    #[test]
    fn max_concurrent_requests_bounds_running_plus_waiting_requests() {
        let mut c = ServeConfig::new("/m");
        c.max_batch_size = 8;
        c.max_queue = 32;
        assert_eq!(c.admission_limits(), (8, 32));
        c.max_concurrent_requests = Some(64);
        assert_eq!(c.admission_limits(), (8, 56));
        c.max_concurrent_requests = Some(3);
        assert_eq!(c.admission_limits(), (3, 0));
    }

    #[test]
    fn every_flag_the_operator_emits_parses() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeConfig,
        }
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let model = format!("hf://org/repo@{sha}");
        let mut args = vec![
            "x",
            "--model",
            &model,
            "--file",
            "m.gguf",
            "--cache-dir",
            "/var/cache/kandle",
            "--port",
            "8080",
            "--served-model-name",
            "smollm",
            "--device",
            "cpu",
            "--dtype",
            "bf16",
            "--task",
            "Text2Text",
            "--architecture",
            "llama",
            "--max-batch-size",
            "4",
            "--max-sequence-length",
            "2048",
            "--max-concurrent-requests",
            "16",
            "--max-new-tokens",
            "64",
        ];
        let c = Cli::try_parse_from(&args).unwrap().serve;
        assert_eq!(c.task, Some(Task::Text2Text));
        assert_eq!(c.dtype, "bf16");
        assert_eq!(c.max_sequence_length, Some(2048));
        assert_eq!(
            c.hub.cache_dir.as_deref(),
            Some(std::path::Path::new("/var/cache/kandle"))
        );
        for task in ["TextGeneration", "Embedding", "Classification"] {
            args[16] = task;
            assert!(Cli::try_parse_from(&args).is_ok(), "{task}");
        }
        for dtype in ["auto", "f32", "f16"] {
            args[14] = dtype;
            assert!(Cli::try_parse_from(&args).is_ok(), "{dtype}");
        }
        assert_eq!(c.device, ComputeDevice::Cpu);
        // The operator passes `--device cuda` for a model with GPUs: a CUDA build takes it, a
        // CPU build refuses it before loading anything, saying why.
        for device in ["cuda", "cuda:1"] {
            args[12] = device;
            let parsed = Cli::try_parse_from(&args);
            if cfg!(feature = "cuda") {
                assert_eq!(parsed.unwrap().serve.device, device.parse().unwrap());
            } else {
                let e = parsed.err().expect("a CPU build refuses --device cuda");
                assert!(e.to_string().contains("needs a CUDA build"), "{e}");
            }
        }
        args[12] = "tpu";
        let e = Cli::try_parse_from(&args)
            .err()
            .expect("tpu refused")
            .to_string();
        assert!(e.contains("unknown device \"tpu\""), "{e}");
    }
}
