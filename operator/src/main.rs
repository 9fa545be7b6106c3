//! The `kandle-operator` binary: parses flags into a config and calls the library.
use clap::{Parser, Subcommand};
use kandle_operator::{RunConfig, builders::BuilderConfig};

/// The kandle operator: deploys `LanguageModel`s as inference servers on Kubernetes.
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
    /// Run the controller.
    Run(RunArgs),
    /// Print the LanguageModel CustomResourceDefinition as YAML.
    Crd,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Runtime image used when a LanguageModel does not name one.
    #[arg(long, env = "KANDLE_RUNTIME_IMAGE", default_value = kandle_operator::builders::DEFAULT_RUNTIME_IMAGE)]
    runtime_image: String,

    /// Runtime image used when a LanguageModel with GPUs does not name one: the CUDA build.
    #[arg(long, env = "KANDLE_RUNTIME_IMAGE_GPU", default_value = kandle_operator::builders::DEFAULT_RUNTIME_IMAGE_GPU)]
    runtime_image_gpu: String,

    /// Hugging Face hub endpoint the pods download from (HF_ENDPOINT); the public hub when unset.
    #[arg(long, env = "KANDLE_HUB_ENDPOINT")]
    hub_endpoint: Option<String>,

    /// OTLP/HTTP endpoint the models' servers send traces to (their OTEL_EXPORTER_OTLP_ENDPOINT)
    /// unless a LanguageModel's spec.runtime.env sets its own; none when unset.
    #[arg(long, env = "KANDLE_RUNTIME_OTLP_ENDPOINT")]
    runtime_otlp_endpoint: Option<String>,

    /// Kubeconfig file; without it the usual discovery applies (KUBECONFIG, ~/.kube/config,
    /// then the in-cluster ServiceAccount).
    #[arg(long, env = "KANDLE_KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,

    /// Watch LanguageModels in these namespaces only (comma-separated; all namespaces when
    /// unset). `--namespace` is kept as an alias.
    #[arg(long = "watch-namespaces", alias = "namespace", env = "KANDLE_WATCH_NAMESPACES", value_delimiter = ',')]
    watch_namespaces: Vec<String>,

    /// Server-side apply the LanguageModel CRD built into this binary at start (needs get/patch
    /// on that one CRD). Helm never upgrades CRDs; this is how a chart upgrade carries a new
    /// schema.
    #[arg(long, env = "KANDLE_APPLY_CRD", default_value_t = false, action = clap::ArgAction::Set)]
    apply_crd: bool,

    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "KANDLE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,

    /// Elect a leader among replicas through a Lease; only the leader reconciles.
    #[arg(long, env = "KANDLE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,

    /// Namespace of the leader Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    leader_election_namespace: String,

    /// This replica's identity in the election (its pod name; hostname-pid when unset).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,

    /// Log format: `json` (one object per line, for log pipelines) or `text`.
    #[arg(long, env = "KANDLE_LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", kandle_operator::crd::crd_yaml()?);
            Ok(())
        }
        Command::Run(args) => {
            // Outside the async runtime, and dropped after it: the trace exporter's blocking
            // client must be. Reconciles' spans (and the log lines inside them) are exported.
            let _telemetry = kandle_telemetry::init(kandle_telemetry::Options {
                service: "kandle-operator",
                exported: "kandle_operator",
                exported_not_logged: false,
                json: args.log_format == "json",
            })?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let config = RunConfig {
                builder: BuilderConfig {
                    runtime_image: args.runtime_image,
                    runtime_image_gpu: args.runtime_image_gpu,
                    hub_endpoint: args.hub_endpoint,
                    runtime_otlp_endpoint: args.runtime_otlp_endpoint.filter(|e| !e.is_empty()),
                },
                kubeconfig: args.kubeconfig,
                namespaces: args.watch_namespaces.into_iter().filter(|n| !n.is_empty()).collect(),
                apply_crd: args.apply_crd,
                metrics_addr: args.metrics_addr,
                leader_election: args.leader_elect.then(|| kandle_operator::LeaderElection {
                    namespace: args.leader_election_namespace.clone(),
                    lease_name: "kandle-operator".into(),
                    identity: args.identity.clone().unwrap_or_else(default_identity),
                }),
            };
            Ok(rt.block_on(kandle_operator::run(config))?)
        }
    }
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_flag_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn crd_and_run_are_the_subcommands_and_run_takes_the_runtime_image() {
        assert!(matches!(Cli::try_parse_from(["kandle-operator", "crd"]).unwrap().command, Command::Crd));
        let cli =
            Cli::try_parse_from(["kandle-operator", "run", "--runtime-image", "r:1", "--runtime-image-gpu", "r:1-cuda"])
                .unwrap();
        let Command::Run(args) = cli.command else { panic!("run") };
        assert_eq!(args.runtime_image, "r:1");
        assert_eq!(args.runtime_image_gpu, "r:1-cuda");
        assert!(Cli::try_parse_from(["kandle-operator"]).is_err(), "a subcommand is required");
    }

    fn run_args(args: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from(["kandle-operator", "run"].iter().chain(args)).unwrap();
        let Command::Run(args) = cli.command else { panic!("run") };
        args
    }

    #[test]
    fn watch_namespaces_take_a_list_and_the_old_namespace_flag_still_works() {
        assert!(run_args(&[]).watch_namespaces.is_empty(), "all namespaces by default");
        assert_eq!(run_args(&["--watch-namespaces", "a,b"]).watch_namespaces, ["a", "b"]);
        assert_eq!(run_args(&["--namespace", "a"]).watch_namespaces, ["a"]);
    }

    #[test]
    fn apply_crd_is_off_unless_asked_for() {
        assert!(!run_args(&[]).apply_crd);
        assert!(run_args(&["--apply-crd=true"]).apply_crd);
        assert!(!run_args(&["--apply-crd", "false"]).apply_crd);
    }
}
