//! Speed figures for the README, beside ../shared/fixtures/baselines.md: SmolLM2 prompt and
//! decode tok/s, decode steadiness over many steps, MiniLM embeddings/s at batch 1 and 32, and
//! load time. Also prints the greedy agreement with llama.cpp as a sanity check, and the
//! aggregate decode tok/s of 1, 4 and 8 concurrent sequences in one running batch. With
//! `--server <kandle-runtime binary>` it also times the real server: process start to `/ready`,
//! the process's peak RSS (VmHWM) after one request, and the aggregate tok/s of 1, 4 and 8
//! concurrent completion requests.
//!
//! `runtime-image/bench.sh` builds this with the baselines' CPU flags and runs it; by hand:
//! cargo run --release -p kandle-runtime --example bench -- --gguf <file> --minilm <dir> --fixtures <dir>

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use kandle_runtime::backend::{self, LoadOptions};
use kandle_runtime::model::LoadedModel;
use kandle_runtime::sampling::argmax;

/// kandle-runtime speed figures.
#[derive(Parser)]
struct Args {
    /// SmolLM2 GGUF file.
    #[arg(long, env = "KANDLE_BENCH_GGUF")]
    gguf: Option<PathBuf>,
    /// all-MiniLM-L6-v2 directory.
    #[arg(long, env = "KANDLE_BENCH_MINILM")]
    minilm: Option<PathBuf>,
    /// The shared fixtures directory.
    #[arg(long, env = "KANDLE_FIXTURES")]
    fixtures: PathBuf,
    /// Decode steps for the steadiness run.
    #[arg(long, default_value_t = 128)]
    decode_steps: usize,
    /// Runs per figure (the median is printed).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Decode steps of the long steadiness run (after the bench prompt); 0 skips it.
    #[arg(long, default_value_t = 500)]
    steady_steps: usize,
    /// Window (in tokens) of the steadiness figure.
    #[arg(long, default_value_t = 50)]
    steady_window: usize,
    /// CPU threads for the kernels, applied as `kandle-runtime serve --threads` does (and
    /// passed to the server).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// The `kandle-runtime` binary: when given, time process start to /ready and peak RSS.
    #[arg(long, env = "KANDLE_BENCH_SERVER")]
    server: Option<PathBuf>,
    /// Server runs per model for the start-to-ready figure (the median is printed).
    #[arg(long, default_value_t = 3)]
    server_runs: usize,
    /// Decode steps per sequence for the concurrency figure.
    #[arg(long, default_value_t = 64)]
    concurrent_steps: usize,
    /// Only the concurrency figure (skips the others).
    #[arg(long)]
    concurrency_only: bool,
    /// Only the server's figures (`--server`; skips the in-process ones).
    #[arg(long)]
    server_only: bool,
    /// The numbers of concurrent sequences of the concurrency figure; its ratios are to the
    /// first.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    streams: Vec<usize>,
    /// The `--dtype`s MiniLM's figures are taken with, one load each (`bf16`: bf16 products
    /// where the CPU has AVX512-BF16). Each prints its embeddings' least cosine to the
    /// fixture's reference too.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    minilm_dtypes: Vec<String>,
    /// MiniLM's batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    minilm_batches: Vec<usize>,
}

/// Aggregate decode throughput of `n` sequences advanced together, one batched decode step
/// per round (`CausalLm::decode_batch`, as the engine's running batch calls it). Sequence `i`
/// starts from the first `32 + 8 i` tokens of `prompt`, so that the batch holds sequences of
/// different lengths; only the decode rounds are timed. The sequence counts take turns within
/// each run (1, 4, 8, 1, 4, 8, …), so that a change in the machine's speed during the
/// measurement (this shared machine's moves by a quarter from minute to minute) falls on all
/// of them rather than on the ratios.
fn concurrent_decode(
    g: &kandle_runtime::model::GenerationModel,
    prompt: &[u32],
    steps: usize,
    runs: usize,
    streams: &[usize],
) -> anyhow::Result<()> {
    let mut rates = vec![Vec::new(); streams.len()];
    for _ in 0..runs {
        for (&n, rates) in streams.iter().zip(rates.iter_mut()) {
            let mut seqs = Vec::new();
            let mut tokens = Vec::new();
            for i in 0..n {
                let mut s = g.lm.new_sequence()?;
                let logits = s.feed(&prompt[..(32 + 8 * i).min(prompt.len())])?;
                tokens.push(argmax(&logits));
                seqs.push(s);
            }
            let t = Instant::now();
            for _ in 0..steps {
                let mut batch: Vec<&mut dyn backend::Sequence> = Vec::new();
                for s in seqs.iter_mut() {
                    batch.push(s.as_mut());
                }
                let logits = g.lm.decode_batch(&mut batch, &tokens)?;
                tokens = logits.iter().map(|l| argmax(l)).collect();
            }
            rates.push((n * steps) as f64 / t.elapsed().as_secs_f64());
        }
    }
    let mut single = None;
    for (&n, rates) in streams.iter().zip(rates) {
        let rate = median(rates);
        let base = *single.get_or_insert(rate);
        println!(
            "smollm2 decode, {n} concurrent sequences: {rate:.1} tok/s aggregate, {:.2}x {} \
             (median of {runs}, {steps} steps each, the counts in turn)",
            rate / base,
            match streams[0] {
                1 => "one sequence".to_string(),
                first => format!("{first} sequences"),
            }
        );
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The slowest `window`-token stretch of `steps` (seconds per step), as a fraction of the
/// median step's rate: 1.0 is perfectly steady; the target is at least 0.8.
fn steadiness(steps: &[f64], window: usize) -> Option<(f64, f64)> {
    if steps.len() < window || window == 0 {
        return None;
    }
    let med = median(steps.to_vec());
    let worst = steps
        .windows(window)
        .map(|w| w.iter().sum::<f64>() / window as f64)
        .fold(0.0, f64::max);
    Some((med, med / worst))
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Before any thread starts, exactly as the binary does for `serve --threads`.
    kandle_runtime::threads::configure(Some(args.threads));
    println!(
        "threads {}; load average {}",
        args.threads,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let smol: serde_json::Value = serde_json::from_slice(&std::fs::read(
        args.fixtures.join("smollm2_reference.json"),
    )?)?;
    let mini: serde_json::Value =
        serde_json::from_slice(&std::fs::read(args.fixtures.join("minilm_reference.json"))?)?;
    if let Some(path) = args.gguf.as_ref().filter(|_| !args.server_only) {
        let t0 = Instant::now();
        let LoadedModel::Generation(g) = backend::load(&LoadOptions {
            path: path.clone(),
            task: None,
            dtype: Default::default(),
            device: Default::default(),
        })?
        else {
            anyhow::bail!("not a generation model")
        };
        println!("smollm2 load: {:.3} s", t0.elapsed().as_secs_f64());
        if args.concurrency_only {
            let bench = g
                .tokenizer
                .encode(smol["bench_prompt"].as_str().unwrap(), true)?;
            return concurrent_decode(&g, &bench, args.concurrent_steps, args.runs, &args.streams);
        }
        for p in smol["prompts"].as_array().unwrap() {
            let ids = ids_of(&p["prompt_token_ids"]);
            let want = ids_of(&p["greedy_token_ids"]);
            let mine = g.tokenizer.encode(p["prompt"].as_str().unwrap(), true)?;
            let mut seq = g.lm.new_sequence()?;
            let mut logits = seq.feed(&ids)?;
            let mut same = 0;
            for (i, w) in want.iter().enumerate() {
                let t = argmax(&logits);
                if t != *w {
                    let gap = p["per_step_top5"][i]["top1_minus_top2_logit"]
                        .as_f64()
                        .unwrap();
                    println!(
                        "  {}: diverges at step {i}: {t} vs llama.cpp {w} (llama.cpp gap {gap})",
                        p["name"]
                    );
                    break;
                }
                same += 1;
                logits = seq.feed(&[t])?;
            }
            println!(
                "  {}: tokenizer {}; greedy {same}/{} identical",
                p["name"],
                if mine == ids {
                    "identical"
                } else {
                    "DIFFERENT"
                },
                want.len()
            );
        }
        let bench = g
            .tokenizer
            .encode(smol["bench_prompt"].as_str().unwrap(), true)?;
        let (mut prompt_rates, mut decode_rates) = (Vec::new(), Vec::new());
        for _ in 0..args.runs {
            let mut seq = g.lm.new_sequence()?;
            let t = Instant::now();
            let mut logits = seq.feed(&bench)?;
            prompt_rates.push(bench.len() as f64 / t.elapsed().as_secs_f64());
            let t = Instant::now();
            let mut step_times = Vec::new();
            for _ in 0..args.decode_steps {
                let s = Instant::now();
                let tok = argmax(&logits);
                logits = seq.feed(&[tok])?;
                step_times.push(s.elapsed().as_secs_f64());
            }
            decode_rates.push(args.decode_steps as f64 / t.elapsed().as_secs_f64());
            if let Some((med, ratio)) = steadiness(&step_times, args.steady_window) {
                println!(
                    "  steadiness ({} steps): median step {:.2} ms, slowest {}-step stretch {ratio:.2}x the median rate",
                    step_times.len(),
                    med * 1e3,
                    args.steady_window,
                );
            }
        }
        println!(
            "smollm2 prompt ({} tokens): {:.1} tok/s (median of {})",
            bench.len(),
            median(prompt_rates),
            args.runs
        );
        println!(
            "smollm2 decode ({} tokens): {:.1} tok/s (median of {})",
            args.decode_steps,
            median(decode_rates),
            args.runs
        );
        if args.steady_steps > 0 {
            let mut seq = g.lm.new_sequence()?;
            let mut logits = seq.feed(&bench)?;
            let mut step_times = Vec::with_capacity(args.steady_steps);
            let t = Instant::now();
            for _ in 0..args.steady_steps {
                let s = Instant::now();
                let tok = argmax(&logits);
                logits = seq.feed(&[tok])?;
                step_times.push(s.elapsed().as_secs_f64());
            }
            let total = t.elapsed().as_secs_f64();
            if let Some((med, ratio)) = steadiness(&step_times, args.steady_window) {
                println!(
                    "smollm2 steadiness ({} decode steps after the prompt): {:.1} tok/s overall, median {:.1} tok/s, slowest {}-token window {ratio:.2}x the median rate",
                    args.steady_steps,
                    args.steady_steps as f64 / total,
                    1.0 / med,
                    args.steady_window,
                );
                let w = args.steady_window;
                let rate = |s: &[f64]| s.len() as f64 / s.iter().sum::<f64>();
                println!(
                    "  first {w} steps {:.1} tok/s, last {w} {:.1} tok/s (the context grows from {} to {} tokens)",
                    rate(&step_times[..w]),
                    rate(&step_times[step_times.len() - w..]),
                    bench.len(),
                    bench.len() + args.steady_steps,
                );
            }
        }
        concurrent_decode(&g, &bench, args.concurrent_steps, args.runs, &args.streams)?;
    }
    for dtype in args.minilm_dtypes.iter().filter(|_| !args.server_only) {
        let Some(dir) = &args.minilm else { break };
        let t0 = Instant::now();
        let LoadedModel::Embedding(e) = backend::load(&LoadOptions {
            path: dir.clone(),
            task: None,
            dtype: dtype.parse()?,
            device: Default::default(),
        })?
        else {
            anyhow::bail!("not an embedding model")
        };
        println!("minilm {dtype} load: {:.3} s", t0.elapsed().as_secs_f64());
        let got = e.embed_texts(&strings(&mini["sentences"]))?;
        let least = got
            .iter()
            .zip(mini["embeddings"].as_array().unwrap())
            .map(|(g, want)| {
                let want: Vec<f32> = serde_json::from_value(want.clone()).unwrap();
                let dot: f32 = g.iter().zip(&want).map(|(a, b)| a * b).sum();
                let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
                dot / (norm(g) * norm(&want))
            })
            .fold(f32::INFINITY, f32::min);
        println!("minilm {dtype} least cosine to the reference: {least:.7}");
        let sentences = strings(&mini["bench_sentences"]);
        for &batch in &args.minilm_batches {
            let mut rates = Vec::new();
            for _ in 0..args.runs {
                let t = Instant::now();
                for chunk in sentences.chunks(batch) {
                    e.embed_texts(chunk)?;
                }
                rates.push(sentences.len() as f64 / t.elapsed().as_secs_f64());
            }
            println!(
                "minilm {dtype} batch {batch}: {:.1} sentences/s (median of {})",
                median(rates),
                args.runs
            );
        }
    }
    if let Some(bin) = &args.server {
        if let Some(gguf) = &args.gguf {
            let body = serde_json::json!({
                "model": "bench",
                "prompt": smol["bench_prompt"],
                "max_tokens": 128,
                "temperature": 0,
            });
            server_figures(
                &args,
                bin,
                gguf,
                "smollm2",
                "/v1/completions",
                &body,
                |port| server_concurrency(port, &args.streams, args.runs),
            )?;
        }
        if let Some(dir) = &args.minilm {
            let batch: Vec<_> = mini["bench_sentences"].as_array().unwrap()[..32].to_vec();
            let body = serde_json::json!({ "model": "bench", "input": batch });
            server_figures(&args, bin, dir, "minilm", "/v1/embeddings", &body, |_| {
                Ok(())
            })?;
        }
    }
    Ok(())
}

/// A fixture's array of strings.
fn strings(v: &serde_json::Value) -> Vec<&str> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|s| s.as_str().expect("a string"))
        .collect()
}

/// Kills the server when dropped, so that an error leaves no process behind.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One HTTP/1.1 request with `Connection: close`; returns the status and the body.
fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Ok((status, body.to_owned()))
}

fn vm_hwm_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/{pid}/status"))
}

/// The prompts of the server's concurrency figure: greedy completions of these run past the
/// figure's 64 tokens without an end-of-text (checked: every request must give all 64). A
/// change in the model's arithmetic can move that: "In 1492," ended after 27 greedy tokens once
/// the RMS norm followed llama.cpp's, and gave its place to "The history of Rome".
const SERVER_PROMPTS: [&str; 8] = [
    "Once upon a time",
    "The three primary colours are",
    "def fibonacci(n):",
    "Paris is",
    "The weather today",
    "The history of Rome",
    "My favourite food is",
    "The capital of Japan",
];

/// Aggregate tok/s of `n` concurrent `/v1/completions` requests (64 greedy tokens each, one
/// client thread per request) for each `n` of `streams`, in turn `runs` times: the figure the
/// issue asks for, through HTTP, the engine's queue and its continuous batching, prompts
/// included. The ratios are to the first count.
fn server_concurrency(port: u16, streams: &[usize], runs: usize) -> anyhow::Result<()> {
    const TOKENS: u64 = 64;
    // The counts in turn, then the last count again with sampling at temperature 1 (OpenAI's
    // default; a fixed seed per request), alone and with top_p 0.9 (a common setting, which
    // finds a nucleus every token): neither must cost much more than greedy.
    const SAMPLED: [(f32, f32); 2] = [(1.0, 1.0), (1.0, 0.9)];
    let counts: Vec<(usize, f32, f32)> = streams
        .iter()
        .map(|&n| (n, 0.0, 1.0))
        .chain(
            streams
                .last()
                .into_iter()
                .flat_map(|&n| SAMPLED.map(|(t, p)| (n, t, p))),
        )
        .collect();
    let mut rates = vec![Vec::new(); counts.len()];
    let request = move |prompt: &str, (temperature, top_p): (f32, f32), seed: u64| {
        let body = serde_json::json!({
            "model": "bench",
            "prompt": prompt,
            "max_tokens": TOKENS,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
        })
        .to_string();
        move || -> anyhow::Result<u64> {
            let (status, resp) = http(port, "POST", "/v1/completions", Some(&body))?;
            anyhow::ensure!(status == 200, "/v1/completions answered {status}: {resp}");
            let resp: serde_json::Value = serde_json::from_str(&resp)?;
            Ok(resp["usage"]["completion_tokens"].as_u64().unwrap_or(0))
        }
    };
    // Per sampling and prompt, a seed whose sampled completion runs all TOKENS without an
    // end-of-text (sampling repeats for a seed, and the kernels give the same bits on every
    // CPU). Greedy takes any.
    let mut seeds = vec![vec![0u64; SERVER_PROMPTS.len()]];
    for sampling in SAMPLED {
        let mut these = Vec::new();
        for prompt in SERVER_PROMPTS {
            let seed = (0..64u64)
                .find(|&seed| matches!(request(prompt, sampling, seed)(), Ok(TOKENS)))
                .ok_or_else(|| {
                    anyhow::anyhow!("no seed in 0..64 samples {TOKENS} tokens of {prompt:?}")
                })?;
            these.push(seed);
        }
        seeds.push(these);
    }
    let seeds_of = |t: f32, p: f32| match SAMPLED.iter().position(|&s| s == (t, p)) {
        Some(i) => &seeds[i + 1],
        None => &seeds[0],
    };
    for _ in 0..runs {
        for (&(n, temperature, top_p), rates) in counts.iter().zip(rates.iter_mut()) {
            let t = Instant::now();
            let seeds = seeds_of(temperature, top_p);
            let clients: Vec<_> = (0..n)
                .map(|i| {
                    let k = i % SERVER_PROMPTS.len();
                    std::thread::spawn(request(SERVER_PROMPTS[k], (temperature, top_p), seeds[k]))
                })
                .collect();
            let mut tokens = 0;
            for (i, c) in clients.into_iter().enumerate() {
                let got = c
                    .join()
                    .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
                let prompt = SERVER_PROMPTS[i % SERVER_PROMPTS.len()];
                anyhow::ensure!(
                    got == TOKENS,
                    "the request for {prompt:?} (temperature {temperature}, top_p {top_p}) \
                     stopped after {got} of {TOKENS} tokens"
                );
                tokens += got;
            }
            rates.push(tokens as f64 / t.elapsed().as_secs_f64());
        }
    }
    let mut first = None;
    for (&(n, temperature, top_p), rates) in counts.iter().zip(rates) {
        let rate = median(rates);
        let base = *first.get_or_insert(rate);
        let how = match (temperature > 0.0, top_p < 1.0) {
            (false, _) => String::new(),
            (true, false) => format!(" at temperature {temperature}"),
            (true, true) => format!(" at temperature {temperature}, top_p {top_p}"),
        };
        println!(
            "smollm2 server: {n} concurrent requests{how}: {rate:.1} tok/s aggregate, {:.2}x {} \
             (median of {runs}, {TOKENS} tokens each, the counts in turn)",
            rate / base,
            match streams[0] {
                1 => "one request".to_string(),
                first => format!("{first} requests"),
            }
        );
    }
    Ok(())
}

/// Starts `kandle-runtime serve` on `model` `args.server_runs` times: the median time from
/// spawning the process to the first 200 from /ready (load, warm-up and all), then, on the
/// last run, one request, the process's peak RSS, and `more(port)`.
fn server_figures(
    args: &Args,
    bin: &Path,
    model: &Path,
    name: &str,
    path: &str,
    body: &serde_json::Value,
    more: impl Fn(u16) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut ready_times = Vec::new();
    for run in 0..args.server_runs.max(1) {
        let port = free_port()?;
        let t = Instant::now();
        let child = ServerProcess(
            Command::new(bin)
                .args([
                    "serve",
                    "--served-model-name",
                    "bench",
                    "--port",
                    &port.to_string(),
                ])
                .arg("--threads")
                .arg(args.threads.to_string())
                .arg("--model")
                .arg(model)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()?,
        );
        loop {
            if let Ok((200, _)) = http(port, "GET", "/ready", None) {
                break;
            }
            if t.elapsed() > Duration::from_secs(120) {
                anyhow::bail!("{name}: the server was not ready within 120 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        ready_times.push(t.elapsed().as_secs_f64());
        if run + 1 == args.server_runs.max(1) {
            let t = Instant::now();
            let (status, resp) = http(port, "POST", path, Some(&body.to_string()))?;
            anyhow::ensure!(status == 200, "{name}: {path} answered {status}: {resp}");
            let resp: serde_json::Value = serde_json::from_str(&resp)?;
            println!(
                "{name} server: {path} took {:.3} s (usage {})",
                t.elapsed().as_secs_f64(),
                resp["usage"]
            );
            println!(
                "{name} server: peak RSS (VmHWM) {:.1} MiB",
                vm_hwm_kib(child.0.id())? as f64 / 1024.0
            );
            more(port)?;
        }
    }
    println!(
        "{name} server: process start to /ready {:.3} s (median of {})",
        median(ready_times),
        args.server_runs.max(1)
    );
    Ok(())
}
