//! Speed figures for the README, beside ../shared/fixtures/baselines.md: SmolLM2 prompt and
//! decode tok/s, decode steadiness over many steps, MiniLM embeddings/s at batch 1 and 32, and
//! load time. Also prints the greedy agreement with llama.cpp as a sanity check, and the
//! aggregate decode tok/s of 1, 4 and 8 concurrent sequences in one running batch.
//!
//! cargo run --release -p kandle-runtime --example bench -- --gguf <file> --minilm <dir> --fixtures <dir>

use std::path::PathBuf;
use std::time::Instant;

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
    /// Decode steps per sequence for the concurrency figure.
    #[arg(long, default_value_t = 64)]
    concurrent_steps: usize,
    /// Only the concurrency figure (skips the others).
    #[arg(long)]
    concurrency_only: bool,
}

/// Aggregate decode throughput of `n` sequences advanced together, one batched decode step
/// per round (`CausalLm::decode_batch`, as the engine's running batch calls it). Sequence `i`
/// starts from the first `32 + 8 i` tokens of `prompt`, so that the batch holds sequences of
/// different lengths; only the decode rounds are timed.
fn concurrent_decode(
    g: &kandle_runtime::model::GenerationModel,
    prompt: &[u32],
    steps: usize,
    runs: usize,
) -> anyhow::Result<()> {
    let mut single = None;
    for n in [1usize, 4, 8] {
        let mut rates = Vec::new();
        for _ in 0..runs {
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
        let rate = median(rates);
        let base = *single.get_or_insert(rate);
        println!(
            "smollm2 decode, {n} concurrent sequences: {rate:.1} tok/s aggregate, {:.2}x one \
             sequence (median of {runs}, {steps} steps each)",
            rate / base
        );
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let smol: serde_json::Value = serde_json::from_slice(&std::fs::read(
        args.fixtures.join("smollm2_reference.json"),
    )?)?;
    let mini: serde_json::Value =
        serde_json::from_slice(&std::fs::read(args.fixtures.join("minilm_reference.json"))?)?;
    if let Some(path) = &args.gguf {
        let t0 = Instant::now();
        let LoadedModel::Generation(g) = backend::load(&LoadOptions {
            path: path.clone(),
            task: None,
            dtype: Default::default(),
        })?
        else {
            anyhow::bail!("not a generation model")
        };
        println!("smollm2 load: {:.3} s", t0.elapsed().as_secs_f64());
        if args.concurrency_only {
            let bench = g
                .tokenizer
                .encode(smol["bench_prompt"].as_str().unwrap(), true)?;
            return concurrent_decode(&g, &bench, args.concurrent_steps, args.runs);
        }
        for p in smol["prompts"].as_array().unwrap() {
            let ids: Vec<u32> = p["prompt_token_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            let want: Vec<u32> = p["greedy_token_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
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
            if step_times.len() >= 50 {
                let med = median(step_times.clone());
                let worst = step_times
                    .windows(50)
                    .map(|w| w.iter().sum::<f64>() / 50.0)
                    .fold(0.0, f64::max);
                println!(
                    "  steadiness: median step {:.2} ms, slowest 50-step stretch {:.2}x the median rate",
                    med * 1e3,
                    med / worst
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
        concurrent_decode(&g, &bench, args.concurrent_steps, args.runs)?;
    }
    if let Some(dir) = &args.minilm {
        let t0 = Instant::now();
        let LoadedModel::Embedding(e) = backend::load(&LoadOptions {
            path: dir.clone(),
            task: None,
            dtype: Default::default(),
        })?
        else {
            anyhow::bail!("not an embedding model")
        };
        println!("minilm load: {:.3} s", t0.elapsed().as_secs_f64());
        let sentences: Vec<&str> = mini["bench_sentences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        for batch in [1usize, 32] {
            let mut rates = Vec::new();
            for _ in 0..args.runs {
                let t = Instant::now();
                for chunk in sentences.chunks(batch) {
                    e.embed_texts(chunk)?;
                }
                rates.push(sentences.len() as f64 / t.elapsed().as_secs_f64());
            }
            println!(
                "minilm batch {batch}: {:.1} sentences/s (median of {})",
                median(rates),
                args.runs
            );
        }
    }
    Ok(())
}
