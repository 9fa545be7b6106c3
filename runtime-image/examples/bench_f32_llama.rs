//! Decode figures of a safetensors llama on the tensor-ops forward pass
//! (`backend/tensor_llama.rs`, which a GPU runs): aggregate tok/s of 1 and 8 sequences advanced
//! one at a time (`decode_each`) and batched (`decode_batch`), beside candle-transformers'
//! `llama` for one sequence. No f32 llama of a useful size is available here, so the model is
//! SmolLM2-135M's shape (576 wide, 30 layers, 9 heads, 3 kv heads, 1536 MLP, 49,152 tokens,
//! tied head) with random weights, written once into `--dir`: speed does not depend on the
//! values.
//!
//! cargo run --release -p kandle-runtime --example bench_f32_llama -- --fixtures ../shared/fixtures

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use kandle_runtime::backend::{self, LoadOptions};
use kandle_runtime::model::LoadedModel;

#[derive(Parser)]
struct Args {
    /// The shared fixtures directory (the tiny llama's tokenizer is copied from it).
    #[arg(long, env = "KANDLE_FIXTURES")]
    fixtures: PathBuf,
    /// Where the random-weight model is written (reused when present).
    #[arg(long, default_value = "/tmp/kandle-bench-f32-llama")]
    dir: PathBuf,
    /// Decode steps per figure.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Rounds (each prints every figure).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// CPU threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

const CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
  "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
  "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 2048,
  "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2}"#;

fn write_model(args: &Args) -> candle_core::Result<()> {
    if args.dir.join("model.safetensors").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(&args.dir)?;
    let cfg: serde_json::Value = serde_json::from_str(CONFIG).expect("config");
    let n = |k: &str| cfg[k].as_u64().expect(k) as usize;
    let (h, i, v) = (n("hidden_size"), n("intermediate_size"), n("vocab_size"));
    let (heads, kv) = (n("num_attention_heads"), n("num_key_value_heads"));
    let hd = h / heads;
    let dev = Device::Cpu;
    let r = |s: &[usize]| Tensor::randn(0f32, 0.05, s, &dev);
    let ones = || Tensor::ones(h, DType::F32, &dev);
    let mut ts = std::collections::HashMap::new();
    ts.insert("model.embed_tokens.weight".to_string(), r(&[v, h])?);
    ts.insert("model.norm.weight".to_string(), ones()?);
    for l in 0..n("num_hidden_layers") {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj", [heads * hd, h]),
            ("self_attn.k_proj", [kv * hd, h]),
            ("self_attn.v_proj", [kv * hd, h]),
            ("self_attn.o_proj", [h, heads * hd]),
            ("mlp.gate_proj", [i, h]),
            ("mlp.up_proj", [i, h]),
            ("mlp.down_proj", [h, i]),
        ] {
            ts.insert(format!("{p}.{name}.weight"), r(&shape)?);
        }
        ts.insert(format!("{p}.input_layernorm.weight"), ones()?);
        ts.insert(format!("{p}.post_attention_layernorm.weight"), ones()?);
    }
    candle_core::safetensors::save(&ts, args.dir.join("model.safetensors"))?;
    let tiny = args.fixtures.join("tiny/llama");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tiny.join(f), args.dir.join(f))?;
    }
    std::fs::write(args.dir.join("config.json"), CONFIG)?;
    Ok(())
}

fn main() {
    let args = Args::parse();
    // Before any thread starts, exactly as the binary does for `serve --threads`.
    kandle_runtime::threads::configure(Some(args.threads));
    write_model(&args).expect("writing the random-weight model");
    let prompt: Vec<u32> = (1..100).collect();
    let LoadedModel::Generation(g) = backend::load(&LoadOptions {
        path: args.dir.clone(),
        ..Default::default()
    })
    .expect("loading the model") else {
        panic!("not a generation model")
    };
    let candle = candle_llama(&args);
    println!(
        "f32 llama, SmolLM2's shape, random weights; {} threads; {} steps after a {}-token prompt",
        args.threads,
        args.steps,
        prompt.len()
    );
    for round in 0..args.runs {
        let mut line = format!("round {round}:");
        line += &format!(
            " candle-transformers 1 seq {:.1} tok/s;",
            candle(&prompt, args.steps)
        );
        for n in [1usize, 8] {
            for batched in [false, true] {
                let mut seqs: Vec<_> = (0..n).map(|_| g.lm.new_sequence().unwrap()).collect();
                for s in seqs.iter_mut() {
                    s.feed(&prompt).unwrap();
                }
                let t0 = Instant::now();
                for _ in 0..args.steps {
                    let mut b: Vec<&mut dyn backend::Sequence> =
                        seqs.iter_mut().map(|s| &mut **s as _).collect();
                    let tokens = vec![5u32; n];
                    if batched {
                        g.lm.decode_batch(&mut b, &tokens).unwrap();
                    } else {
                        backend::decode_each(&mut b, &tokens).unwrap();
                    }
                }
                let rate = (args.steps * n) as f64 / t0.elapsed().as_secs_f64();
                let how = if batched { "batched" } else { "one at a time" };
                line += &format!(" {n} seq {how} {rate:.1} tok/s;");
            }
        }
        println!("{line}");
    }
}

/// candle-transformers' `llama` on the same files: decode tok/s of one sequence.
fn candle_llama(args: &Args) -> impl Fn(&[u32], usize) -> f64 {
    use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
    let cfg: LlamaConfig = serde_json::from_str(CONFIG).expect("config");
    let cfg = cfg.into_config(false);
    // SAFETY: the file was written above and is not modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[args.dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .expect("mapping the weights");
    let model = Llama::load(vb, &cfg).expect("candle's llama");
    move |prompt, steps| {
        let dev = Device::Cpu;
        let mut cache = Cache::new(true, DType::F32, &cfg, &dev).unwrap();
        let x = Tensor::new(prompt, &dev).unwrap().unsqueeze(0).unwrap();
        model.forward(&x, 0, &mut cache).unwrap();
        let t0 = Instant::now();
        for s in 0..steps {
            let x = Tensor::new(&[5u32], &dev).unwrap().unsqueeze(0).unwrap();
            model.forward(&x, prompt.len() + s, &mut cache).unwrap();
        }
        steps as f64 / t0.elapsed().as_secs_f64()
    }
}
