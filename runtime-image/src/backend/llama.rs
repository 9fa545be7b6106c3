//! Llama-family safetensors models (float weights), on [`super::tensor_llama`]: candle's
//! tensor operations on any device, with concurrent decode steps batched. The configuration
//! is read with candle-transformers' `LlamaConfig` (llama3 rope scaling included).
//!
//! Qwen2 (`model_type` "qwen2": Qwen2, Qwen2.5, QwQ, DeepSeek-R1's Qwen distillations) and
//! Qwen3 ("qwen3", its dense models) are llamas with, respectively, biases on Q, K and V, and
//! an RMS norm of each query and key head before the rotary (`q_norm`, `k_norm`), as
//! transformers' `Qwen2ForCausalLM` and `Qwen3ForCausalLM` compute them.
//!
//! Gemma 2 ("gemma2") is a llama with the additions [`super::qllama::Gemma`] lists, as
//! transformers' `Gemma2ForCausalLM` computes them: its RMS norms scale by `1 + weight` (the
//! one is added here, once, in the weights' dtype), its MLP's norm is
//! `pre_feedforward_layernorm` and its output norms `post_attention_layernorm` and
//! `post_feedforward_layernorm`; the scores are scaled by `query_pre_attn_scalar^-½`, and the
//! embeddings by `√hidden` rounded to the activations' dtype (transformers' `normalizer`).
//! Gemma 3's text model ("gemma3_text", `Gemma3ForCausalLM`) is Gemma 2's layers without the
//! caps, with `q_norm` and `k_norm` (one added too), windows on five layers of six
//! (`sliding_window_pattern` or `layer_types`) and their own unscaled rotary
//! (`rope_local_base_freq`, or transformers 5's `rope_parameters.sliding_attention`); the
//! other layers' rotary may be scaled linearly (`rope_scaling` or
//! `rope_parameters.full_attention`), as a llama's may.

use std::path::{Path, PathBuf};

use std::f32::consts::PI;
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Config, Llama3RopeType, LlamaConfig, LlamaEosToks};

use super::few_rows::FewRows;
use super::qllama::{Arch, Gemma, LongRope, Pattern, Scales, Yarn, yarn_mscale};
use super::tensor_llama::{
    Experts as TensorExperts, Heads, Layer, Mlp, PREFILL_CHUNK, Proj, Rope, TensorLlama,
    TensorLlamaLm, inverse_frequencies, long_rope_tables, rope_tables, scaled_rope_tables,
};
use crate::error::{Error, Result, read_json};
use crate::model::LoadedModel;

pub(super) fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Model(format!(
            "{} has no .safetensors file",
            dir.display()
        )));
    }
    Ok(files)
}

pub(super) fn load(
    dir: &Path,
    model_type: &str,
    dtype: DType,
    device: &Device,
) -> Result<LoadedModel> {
    // What the `model_type` adds to llama's layers ([`Arch`]: the same names as in GGUF).
    let family = Arch::named(model_type).unwrap_or(Arch::Llama);
    let raw: serde_json::Value = read_json(&dir.join("config.json"))?;
    let flag = |key: &str| raw.get(key).and_then(|v| v.as_bool()) == Some(true);
    // Refuse what the layers do not compute rather than computing something else: llama's and
    // Qwen3's `attention_bias` (on the output product too), Qwen2's sliding window.
    if flag("attention_bias") || flag("mlp_bias") {
        return Err(Error::Model(format!(
            "{model_type} with attention or MLP biases (attention_bias, mlp_bias) is not \
             supported"
        )));
    }
    if flag("use_sliding_window") {
        return Err(Error::Model(format!(
            "{model_type} with use_sliding_window is not supported"
        )));
    }
    // Phi-4-mini turns three quarters of each head (transformers' Phi3 is the one of these
    // models that reads `partial_rotary_factor`; another model_type is refused, not turned
    // whole).
    let partial = match raw.get("partial_rotary_factor").filter(|v| !v.is_null()) {
        None => None,
        Some(v) => match v.as_f64() {
            Some(1.0) => None,
            Some(f) if family == Arch::Phi3 && f > 0.0 && f < 1.0 => Some(f),
            _ => {
                return Err(Error::Model(format!(
                    "{model_type} with a partial_rotary_factor of {v} is not supported{}",
                    match family == Arch::Phi3 {
                        true => " (it must lie in (0, 1])",
                        false => " (Phi-3's models turn part of each head, others do not)",
                    }
                )));
            }
        },
    };
    let mut cfg_json = raw.clone();
    // Gemma 2 ties its head to the embeddings unless told otherwise.
    let gemma_family = matches!(family, Arch::Gemma2 | Arch::Gemma3);
    if gemma_family && raw.get("tie_word_embeddings").is_none() {
        cfg_json["tie_word_embeddings"] = true.into();
    }
    // transformers 5 writes the rotary inside rope_parameters (Gemma 3's per kind of layer:
    // the full-attention layers' is the model's); older files at the top level.
    let rope_parameters =
        (raw.pointer("/rope_parameters/full_attention")).or_else(|| raw.get("rope_parameters"));
    if cfg_json.get("rope_theta").is_none()
        && let Some(theta) = rope_parameters.and_then(|p| p.get("rope_theta"))
    {
        cfg_json["rope_theta"] = theta.clone();
    }
    // The rotary scaling, from rope_scaling (transformers 4) or rope_parameters (5): llama3's
    // is computed (`inv_freq`), linear divides every frequency by its factor; any other kind
    // is refused by name rather than left out.
    let scaling = raw
        .get("rope_scaling")
        .filter(|v| !v.is_null())
        .or(rope_parameters);
    let (mut linear, mut long_rope, mut yarn) = (None, None, None);
    if let Some(s) = scaling {
        let kind = s.get("rope_type").or_else(|| s.get("type"));
        match kind.and_then(|k| k.as_str()).unwrap_or("default") {
            "default" => cfg_json["rope_scaling"] = serde_json::Value::Null,
            "llama3" => cfg_json["rope_scaling"] = s.clone(),
            "linear" => {
                cfg_json["rope_scaling"] = serde_json::Value::Null;
                match s.get("factor").and_then(|f| f.as_f64()) {
                    Some(f) if f.is_finite() && f > 0.0 => linear = Some(f as f32),
                    _ => {
                        return Err(Error::Model(format!(
                            "{}: linear rotary scaling needs a positive factor, got {s}",
                            dir.join("config.json").display()
                        )));
                    }
                }
            }
            // Phi-3's LongRoPE ("su" in its first configs), read once the heads' width is.
            "longrope" | "su" => {
                cfg_json["rope_scaling"] = serde_json::Value::Null;
                long_rope = Some(s);
            }
            "yarn" => {
                cfg_json["rope_scaling"] = serde_json::Value::Null;
                yarn = Some(yarn_of(&raw, s, &dir.join("config.json"))?);
            }
            other => {
                return Err(Error::Model(format!(
                    "llama with {other:?} rotary scaling is not supported (llama3's, linear, \
                     yarn and longrope are)"
                )));
            }
        }
    }
    let lcfg: LlamaConfig = serde_json::from_value(cfg_json).map_err(|source| Error::Json {
        path: dir.join("config.json").display().to_string(),
        source,
    })?;
    // Heads may be narrower than hidden_size / heads (Mistral NeMo, Mistral Small 3: 128, not
    // 160), as transformers' `head_dim` says.
    let head_dim = match raw.get("head_dim").filter(|v| !v.is_null()) {
        None => lcfg.hidden_size / lcfg.num_attention_heads.max(1),
        Some(v) => match v.as_u64() {
            Some(hd) if hd > 0 && hd % 2 == 0 => hd as usize,
            _ => {
                return Err(Error::Model(format!(
                    "{}: head_dim must be a positive even number, got {v}",
                    dir.join("config.json").display()
                )));
            }
        },
    };
    // Granite's multipliers, as transformers' `GraniteForCausalLM` applies them.
    let scales = match family {
        Arch::Granite => {
            let config = dir.join("config.json").display().to_string();
            let names = [
                "embedding_multiplier",
                "residual_multiplier",
                "attention_multiplier",
                "logits_scaling",
            ];
            let read = |key: &str| match raw.get(key).filter(|v| !v.is_null()) {
                None => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                    Error::Model(format!(
                        "{config}: {key} must be a positive number, got {v}"
                    ))
                }),
            };
            Scales::declared(names, read, |key| format!("{config}: {key}"))?
        }
        Arch::Gemma2 | Arch::Gemma3 => {
            gemma_scales(&raw, lcfg.hidden_size, dtype, &dir.join("config.json"))?
        }
        _ => Scales::NONE,
    };
    let gemma = match family {
        Arch::Gemma2 | Arch::Gemma3 => gemma(
            &raw,
            family,
            lcfg.num_hidden_layers,
            &dir.join("config.json"),
        )?,
        _ => Gemma::llama(lcfg.num_hidden_layers),
    };
    // SmolLM3's layers that turn their queries and keys: `no_rope_layers` (1: turns), else
    // every layer but each `no_rope_layer_interval`-th (4).
    let layers = lcfg.num_hidden_layers;
    let rotates: Vec<bool> = match (family, raw.get("no_rope_layers")) {
        (Arch::SmolLm3, Some(list)) => {
            let flags: Option<Vec<bool>> = (list.as_array())
                .map(|a| a.iter().map(|v| v.as_u64().map(|x| x != 0)).collect())
                .unwrap_or(None);
            match flags {
                Some(f) if f.len() == layers => f,
                _ => {
                    return Err(Error::Model(format!(
                        "{}: no_rope_layers must list 0 or 1 for each of the {layers} layers",
                        dir.join("config.json").display()
                    )));
                }
            }
        }
        (Arch::SmolLm3, None) => {
            let step = raw
                .get("no_rope_layer_interval")
                .and_then(|v| v.as_u64())
                .unwrap_or(4);
            (0..layers)
                .map(|i| step == 0 || !(i as u64 + 1).is_multiple_of(step))
                .collect()
        }
        _ => vec![true; layers],
    };
    let moe = match family {
        Arch::Qwen3Moe => Some(Moe::of(&raw, &dir.join("config.json"))?),
        _ => None,
    };
    let config = lcfg.into_config(false);
    let vb = super::layers::var_builder(dir, dtype, device)?;
    // The dimensions of each head the rotary turns: transformers' `int(head_dim · factor)`.
    let rope_dim = match partial {
        None => head_dim,
        Some(f) => match (head_dim as f64 * f) as usize {
            d if d > 0 && d % 2 == 0 => d,
            d => {
                return Err(Error::Model(format!(
                    "{}: partial_rotary_factor {f} turns {d} of each head's {head_dim} \
                     dimensions; the rotary needs a positive even number",
                    dir.join("config.json").display()
                )));
            }
        },
    };
    let long_rope = long_rope
        .map(|s| long_rope_of(&raw, s, rope_dim, &dir.join("config.json")))
        .transpose()?;
    // The rotary frequencies of every layer (but Gemma 3's windowed ones), linearly scaled
    // where asked.
    let mut inv = inv_freq(&config, rope_dim);
    if let Some(f) = linear {
        inv.iter_mut().for_each(|x| *x /= f);
    }
    let rope_attention = match yarn {
        Some((y, attention)) => {
            let divisors = y.divisors(rope_dim, config.rope_theta);
            inv.iter_mut().zip(divisors).for_each(|(x, d)| *x /= d);
            attention
        }
        None => 1.0,
    };
    let model = weights(
        vb,
        &config,
        (family, scales, &rotates, gemma, moe.as_ref()),
        (head_dim, rope_dim, &inv, long_rope.as_ref(), rope_attention),
        dtype,
        device,
    )
    .map_err(|e| super::layers::weights_error(dir, e))?;

    let tokenizer = super::tokenizer_json(dir)?;
    super::layers::check_vocab(&tokenizer, config.vocab_size)?;
    let tcfg = super::read_tokenizer_config(dir)?;
    let chat_template = tcfg
        .as_ref()
        .map(super::chat_template_from_config)
        .transpose()?
        .flatten();
    let mut eos_ids: Vec<u32> = match &config.eos_token_id {
        Some(LlamaEosToks::Single(i)) => vec![*i],
        Some(LlamaEosToks::Multiple(v)) => v.clone(),
        None => Vec::new(),
    };
    if let Some(eos) = tcfg
        .as_ref()
        .and_then(|c| super::special_token(c, "eos_token"))
        && let Some(id) = tokenizer.token_to_id(&eos)
        && !eos_ids.contains(&id)
    {
        eos_ids.push(id);
    }
    // The tokenizer.json post-processor adds BOS itself when the model wants one.
    let bos = config.bos_token_id;
    Ok(super::generation_model(
        Box::new(TensorLlamaLm(Arc::new(model))),
        tokenizer,
        chat_template,
        eos_ids,
        bos,
        false,
    ))
}

/// Gemma 2's and 3's scalars from its config.json (`config` names it): the embeddings times
/// `√hidden` in the activations' dtype, as transformers' `normalizer` is; the scores times
/// `query_pre_attn_scalar^-½` where given (else a llama's `1/√head_dim`).
fn gemma_scales(
    raw: &serde_json::Value,
    hidden: usize,
    dtype: DType,
    config: &Path,
) -> Result<Scales> {
    let root = (hidden as f32).sqrt();
    let embedding = match dtype {
        DType::BF16 => half::bf16::from_f32(root).to_f32(),
        DType::F16 => half::f16::from_f32(root).to_f32(),
        _ => root,
    };
    let attention = match raw.get("query_pre_attn_scalar").filter(|v| !v.is_null()) {
        None => None,
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && x > 0.0 => Some((1.0 / x.sqrt()) as f32),
            _ => {
                return Err(Error::Model(format!(
                    "{}: query_pre_attn_scalar must be a positive number, got {v}",
                    config.display()
                )));
            }
        },
    };
    Ok(Scales {
        embedding,
        attention,
        ..Scales::NONE
    })
}

/// Gemma 2's or 3's (`family`) caps, GELU, sliding windows and windowed layers' rotary from its
/// config.json (`config` names it): `attn_logit_softcapping` and `final_logit_softcapping`
/// (transformers' defaults where absent: Gemma 2's 50 and 30, none for Gemma 3; none where
/// null), `sliding_window` (4,096 where absent) on the layers `layer_types` marks
/// "sliding_attention", or else the first `n − 1` of every `n` (`sliding_window_pattern`:
/// Gemma 2's 2, Gemma 3's 6); Gemma 3's `rope_local_base_freq` (10,000). A
/// `hidden_activation` other than GELU's tanh form is refused.
fn gemma(raw: &serde_json::Value, family: Arch, layers: usize, config: &Path) -> Result<Gemma> {
    let bad = |key: &str, v: &serde_json::Value, want: &str| {
        Error::Model(format!(
            "{}: {key} must be {want}, got {v}",
            config.display()
        ))
    };
    let act = raw
        .get("hidden_activation")
        .or_else(|| raw.get("hidden_act"));
    if let Some(a) = act.filter(|a| !a.is_null())
        && a.as_str() != Some("gelu_pytorch_tanh")
    {
        return Err(Error::Model(format!(
            "{}: {family:?} with the activation {a} is not supported (gelu_pytorch_tanh is)",
            config.display()
        )));
    }
    let cap = |key: &str| -> Result<Option<Option<f64>>> {
        match raw.get(key) {
            None => Ok(None),
            Some(v) if v.is_null() => Ok(Some(None)),
            Some(v) => v
                .as_f64()
                .map(|x| Some(Some(x)))
                .ok_or_else(|| bad(key, v, "a positive number or null")),
        }
    };
    let window = match raw.get("sliding_window") {
        None => Some(4096),
        Some(v) if v.is_null() => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| bad("sliding_window", v, "a number of positions"))?
                as usize,
        ),
    };
    let every = match raw.get("sliding_window_pattern").filter(|v| !v.is_null()) {
        None if family == Arch::Gemma3 => 6,
        None => 2,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| bad("sliding_window_pattern", v, "a number of layers"))?
            as usize,
    };
    let pattern = match raw.get("layer_types").filter(|v| !v.is_null()) {
        None => Pattern::Every(every),
        Some(v) => Pattern::Listed(
            (v.as_array().and_then(|a| {
                a.iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Some(true),
                        Some("full_attention") => Some(false),
                        _ => None,
                    })
                    .collect::<Option<Vec<bool>>>()
            }))
            .ok_or_else(|| {
                bad(
                    "layer_types",
                    v,
                    "a list of \"sliding_attention\" and \"full_attention\"",
                )
            })?,
        ),
    };
    let names = |name: &str| {
        let key = match name {
            "attention.sliding_window" => "sliding_window",
            "attention.sliding_window_pattern" => "layer_types",
            other => other,
        };
        format!("{}: {key}", config.display())
    };
    let declared = Gemma::declared(
        family,
        [
            cap("attn_logit_softcapping")?,
            cap("final_logit_softcapping")?,
        ],
        window,
        pattern,
        layers,
        names,
    )?;
    let local = (raw.get("rope_local_base_freq"))
        .or_else(|| raw.pointer("/rope_parameters/sliding_attention/rope_theta"))
        .filter(|v| !v.is_null());
    let local_base = match (family, local) {
        (Arch::Gemma3, None) => Some(10_000.0),
        (Arch::Gemma3, Some(v)) => Some(
            v.as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| bad("rope_local_base_freq", v, "a positive number"))?
                as f32,
        ),
        _ => None,
    };
    Ok(Gemma {
        local_base,
        ..declared
    })
}

/// The LongRoPE of a config.json (`config` names it) whose rotary scaling `s` is "longrope",
/// for heads that turn `rope_dim` dimensions (one factor per pair):
/// its `short_factor` and `long_factor`, the `original_max_position_embeddings` (at the top
/// level or in `s`), and its `attention_factor`, or where absent transformers' default:
/// `√(1 + ln f / ln original)` for `f = factor` (else `max_position_embeddings / original`)
/// above 1, else 1.
fn long_rope_of(
    raw: &serde_json::Value,
    s: &serde_json::Value,
    rope_dim: usize,
    config: &Path,
) -> Result<LongRope> {
    let what = |name: &str| {
        let key = match name {
            "short" => "rope_scaling.short_factor",
            "long" => "rope_scaling.long_factor",
            "original" => "original_max_position_embeddings",
            _ => "rope_scaling.attention_factor",
        };
        format!("{}: {key}", config.display())
    };
    let factors = |key: &str| -> Vec<f32> {
        (s.get(key).and_then(|v| v.as_array()).into_iter().flatten())
            .map(|x| x.as_f64().map_or(f32::NAN, |x| x as f32))
            .collect()
    };
    let number = |key: &str| {
        (raw.get(key).or_else(|| s.get(key)))
            .filter(|v| !v.is_null())
            .and_then(|v| v.as_f64())
    };
    let original = number("original_max_position_embeddings").unwrap_or(0.0);
    let attention = match s.get("attention_factor").and_then(|v| v.as_f64()) {
        Some(a) => a,
        None => {
            let longest = number("max_position_embeddings").unwrap_or(original);
            let f = s
                .get("factor")
                .and_then(|v| v.as_f64())
                .unwrap_or(longest / original);
            match f > 1.0 {
                true => (1.0 + f.ln() / original.ln()).sqrt(),
                false => 1.0,
            }
        }
    };
    LongRope::checked(
        factors("short_factor"),
        factors("long_factor"),
        original as usize,
        attention as f32,
        rope_dim / 2,
        what,
    )
}

/// Qwen3-MoE's experts, as transformers' `Qwen3MoeSparseMoeBlock` reads config.json:
/// `num_experts` of `moe_intermediate_size`, `num_experts_per_tok` used, `norm_topk_prob`
/// (false by default), on every `decoder_sparse_step`-th layer but those of `mlp_only_layers`.
#[derive(Debug, Clone)]
struct Moe {
    experts: usize,
    used: usize,
    width: usize,
    normalise: bool,
    step: usize,
    dense: Vec<usize>,
}

impl Moe {
    fn of(raw: &serde_json::Value, config: &Path) -> Result<Moe> {
        let count = |key: &str, default: Option<u64>| -> Result<usize> {
            match raw.get(key).and_then(|v| v.as_u64()).or(default) {
                Some(n) => Ok(n as usize),
                None => Err(Error::Model(format!(
                    "{}: {key} must be a whole number",
                    config.display()
                ))),
            }
        };
        let moe = Moe {
            experts: count("num_experts", None)?,
            used: count("num_experts_per_tok", None)?,
            width: count("moe_intermediate_size", None)?,
            normalise: raw.get("norm_topk_prob").and_then(|v| v.as_bool()) == Some(true),
            step: count("decoder_sparse_step", Some(1))?,
            dense: (raw
                .get("mlp_only_layers")
                .and_then(|v| v.as_array())
                .into_iter())
            .flatten()
            .filter_map(|v| v.as_u64().map(|n| n as usize))
            .collect(),
        };
        if moe.experts < 2 || moe.used == 0 || moe.used > moe.experts || moe.width == 0 {
            return Err(Error::Model(format!(
                "{}: a mixture of {} experts of {} using {} at a time: it needs at least 2 \
                 experts, and from 1 to all of them used",
                config.display(),
                moe.experts,
                moe.width,
                moe.used
            )));
        }
        Ok(moe)
    }

    /// Whether layer `i` has experts (transformers' rule).
    fn sparse(&self, i: usize) -> bool {
        !self.dense.contains(&i) && self.step > 0 && (i + 1).is_multiple_of(self.step)
    }
}

/// The YaRN of a config.json (`config` names it) whose rotary scaling `s` is "yarn", as
/// transformers' `_compute_yarn_parameters` reads it, and its `attention_factor`: `factor`
/// (else `max_position_embeddings / original`), the original context (the top level's
/// `original_max_position_embeddings`, else `s`'s, else `max_position_embeddings`),
/// `beta_fast` and `beta_slow` (32 and 1 where absent), `truncate` (true), and the
/// `attention_factor` given, else `yarn_mscale(factor, mscale) / yarn_mscale(factor,
/// mscale_all_dim)` where both are given, else `yarn_mscale(factor, 1)`.
fn yarn_of(raw: &serde_json::Value, s: &serde_json::Value, config: &Path) -> Result<(Yarn, f32)> {
    let number = |v: Option<&serde_json::Value>| -> Result<Option<f64>> {
        match v.filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(x) => x
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| {
                    Error::Model(format!("{}: YaRN's {x} must be a number", config.display()))
                }),
        }
    };
    let longest = number(raw.get("max_position_embeddings"))?;
    let original = match number(raw.get("original_max_position_embeddings"))? {
        Some(o) => Some(o),
        None => number(s.get("original_max_position_embeddings"))?.or(longest),
    };
    let original = original.unwrap_or(0.0);
    let factor = match number(s.get("factor"))? {
        Some(f) => f,
        None => longest.unwrap_or(0.0) / original,
    };
    if !(factor >= 1.0 && factor.is_finite() && original >= 1.0) {
        return Err(Error::Model(format!(
            "{}: YaRN needs a factor of at least 1 and a positive \
             original_max_position_embeddings, it has {factor} and {original}",
            config.display()
        )));
    }
    // transformers' `or`: 0 or null takes the default.
    let beta = |key: &str, default: f64| -> Result<f64> {
        Ok(number(s.get(key))?.filter(|&b| b != 0.0).unwrap_or(default))
    };
    let y = Yarn {
        factor: factor as f32,
        original: original as usize,
        beta_fast: beta("beta_fast", 32.0)? as f32,
        beta_slow: beta("beta_slow", 1.0)? as f32,
        ext: 1.0,
        truncate: s.get("truncate").and_then(|t| t.as_bool()).unwrap_or(true),
    };
    if !(y.beta_fast > y.beta_slow && y.beta_slow > 0.0) {
        return Err(Error::Model(format!(
            "{}: YaRN needs beta_fast above beta_slow above 0, it has {} and {}",
            config.display(),
            y.beta_fast,
            y.beta_slow
        )));
    }
    let f = y.factor;
    let attention = match number(s.get("attention_factor"))? {
        Some(a) if a > 0.0 => a as f32,
        Some(a) => {
            return Err(Error::Model(format!(
                "{}: rope_scaling.attention_factor must be positive, it is {a}",
                config.display()
            )));
        }
        None => match (number(s.get("mscale"))?, number(s.get("mscale_all_dim"))?) {
            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                yarn_mscale(f, m as f32) / yarn_mscale(f, all as f32)
            }
            _ => yarn_mscale(f, 1.0),
        },
    };
    Ok((y, attention))
}

/// The rotary embedding's inverse frequencies, with llama3's scaling where the config has it
/// (as candle-transformers' and transformers' llama compute them).
fn inv_freq(cfg: &Config, head_dim: usize) -> Vec<f32> {
    let plain = inverse_frequencies(cfg.rope_theta, head_dim).into_iter();
    match &cfg.rope_scaling {
        Some(s) if matches!(s.rope_type, Llama3RopeType::Llama3) => {
            let original = s.original_max_position_embeddings as f32;
            let (low_wavelen, high_wavelen) =
                (original / s.low_freq_factor, original / s.high_freq_factor);
            plain
                .map(|freq| {
                    let wavelen = 2. * PI / freq;
                    if wavelen < high_wavelen {
                        freq
                    } else if wavelen > low_wavelen {
                        freq / s.factor
                    } else {
                        let smooth = (original / wavelen - s.low_freq_factor)
                            / (s.high_freq_factor - s.low_freq_factor);
                        (1. - smooth) * freq / s.factor + smooth * freq
                    }
                })
                .collect()
        }
        _ => plain.collect(),
    }
}

/// The model's weights (transformers' `LlamaForCausalLM` names) in `dtype` on `device`, its
/// heads `head_dim` wide, their first `rope_dim` dimensions turned by the frequencies `inv`
/// (every `cos` and `sin` times `rope_attention`, YaRN's magnitude scale).
fn weights(
    vb: VarBuilder,
    cfg: &Config,
    (family, scales, rotates, gemma, moe): (Arch, Scales, &[bool], Gemma, Option<&Moe>),
    (head_dim, rope_dim, inv, long_rope, rope_attention): (
        usize,
        usize,
        &[f32],
        Option<&LongRope>,
        f32,
    ),
    dtype: DType,
    device: &Device,
) -> candle_core::Result<TensorLlama> {
    let hidden = cfg.hidden_size;
    let (q_dim, kv_dim) = (
        cfg.num_attention_heads * head_dim,
        cfg.num_key_value_heads * head_dim,
    );
    let dense =
        |vb: &VarBuilder, out: usize, inp: usize, name: &str| -> candle_core::Result<Proj> {
            Ok(Box::new(FewRows::new(
                vb.get((out, inp), &format!("{name}.weight"))?,
                None,
            )))
        };
    // Q, K and V: with their biases in Qwen2.
    let qkv = |vb: &VarBuilder, out: usize, name: &str| -> candle_core::Result<Proj> {
        match family {
            Arch::Qwen2 => Ok(Box::new(FewRows::new(
                vb.get((out, hidden), &format!("{name}.weight"))?,
                Some(vb.get(out, &format!("{name}.bias"))?),
            ))),
            _ => dense(vb, out, hidden, name),
        }
    };
    // Phi-3's fused products (`qkv_proj`, `gate_up_proj`), split by rows into the parts the
    // others keep apart.
    let split = |vb: &VarBuilder, name: &str, rows: &[usize]| -> candle_core::Result<Vec<Proj>> {
        let w = vb.get(
            (rows.iter().sum::<usize>(), hidden),
            &format!("{name}.weight"),
        )?;
        let mut at = 0;
        rows.iter()
            .map(|&r| {
                let part = w.narrow(0, at, r)?.contiguous()?;
                at += r;
                Ok(Box::new(FewRows::new(part, None)) as Proj)
            })
            .collect()
    };
    let embed = vb.get((cfg.vocab_size, hidden), "model.embed_tokens.weight")?;
    // Gemma's norms scale by `1 + weight`.
    let norm = |vb: &VarBuilder, name: &str| -> candle_core::Result<candle_core::Tensor> {
        let w = vb.get(hidden, &format!("{name}.weight"))?;
        match family {
            Arch::Gemma2 | Arch::Gemma3 => w + 1.0,
            _ => Ok(w),
        }
    };
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for (i, &turns) in rotates.iter().enumerate() {
        let p = vb.pp(format!("model.layers.{i}"));
        let qk_norm = match family {
            Arch::Qwen3 | Arch::Qwen3Moe => Some((
                p.get(head_dim, "self_attn.q_norm.weight")?,
                p.get(head_dim, "self_attn.k_norm.weight")?,
            )),
            Arch::Gemma3 => Some((
                (p.get(head_dim, "self_attn.q_norm.weight")? + 1.0)?,
                (p.get(head_dim, "self_attn.k_norm.weight")? + 1.0)?,
            )),
            _ => None,
        };
        let ff = cfg.intermediate_size;
        // Qwen3-MoE's sparse layers have experts in place of the MLP.
        let sparse = moe.filter(|m| m.sparse(i));
        let ([q, k, v], gate_up) = match family {
            Arch::Phi3 => {
                let mut a = split(&p, "self_attn.qkv_proj", &[q_dim, kv_dim, kv_dim])?;
                let mut m = split(&p, "mlp.gate_up_proj", &[ff, ff])?;
                let (v, k, q) = (a.pop().unwrap(), a.pop().unwrap(), a.pop().unwrap());
                let (up, gate) = (m.pop().unwrap(), m.pop().unwrap());
                ([q, k, v], Some([gate, up]))
            }
            _ => (
                [
                    qkv(&p, q_dim, "self_attn.q_proj")?,
                    qkv(&p, kv_dim, "self_attn.k_proj")?,
                    qkv(&p, kv_dim, "self_attn.v_proj")?,
                ],
                match sparse {
                    Some(_) => None,
                    None => Some([
                        dense(&p, ff, hidden, "mlp.gate_proj")?,
                        dense(&p, ff, hidden, "mlp.up_proj")?,
                    ]),
                },
            ),
        };
        // Gemma's post_attention_layernorm norms the attention's output; its MLP's input
        // norm is pre_feedforward_layernorm.
        let (mlp_norm, post_norms) = match family {
            Arch::Gemma2 | Arch::Gemma3 => (
                norm(&p, "pre_feedforward_layernorm")?,
                Some((
                    norm(&p, "post_attention_layernorm")?,
                    norm(&p, "post_feedforward_layernorm")?,
                )),
            ),
            _ => (norm(&p, "post_attention_layernorm")?, None),
        };
        layers.push(Layer {
            attn_norm: norm(&p, "input_layernorm")?,
            q,
            k,
            v,
            qk_norm,
            rotates: turns,
            window: gemma.windows[i],
            o: dense(&p, hidden, q_dim, "self_attn.o_proj")?,
            mlp_norm,
            mlp: match (sparse, gate_up) {
                (None, Some([gate, up])) => Mlp::Dense {
                    gate,
                    up,
                    down: dense(&p, hidden, cfg.intermediate_size, "mlp.down_proj")?,
                },
                (None, None) => unreachable!("a dense layer's gate and up are read"),
                (Some(m), _) => {
                    let x = p.pp("mlp");
                    let experts = (0..m.experts)
                        .map(|e| {
                            let x = x.pp(format!("experts.{e}"));
                            Ok([
                                dense(&x, m.width, hidden, "gate_proj")?,
                                dense(&x, m.width, hidden, "up_proj")?,
                                dense(&x, hidden, m.width, "down_proj")?,
                            ])
                        })
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    Mlp::Experts(TensorExperts {
                        router: x
                            .get((m.experts, hidden), "gate.weight")?
                            .to_dtype(candle_core::DType::F32)?,
                        experts,
                        used: m.used,
                        scale: 1.0,
                        normalise: m.normalise,
                        shared: None,
                    })
                }
            },
            post_norms,
        });
    }
    let head: Proj = if cfg.tie_word_embeddings {
        Box::new(FewRows::new(embed.clone(), None))
    } else {
        dense(&vb, cfg.vocab_size, hidden, "lm_head")?
    };
    let positions = cfg.max_position_embeddings;
    let (cos, sin) = match long_rope {
        Some(l) => long_rope_tables(inv, l, positions, dtype, device)?,
        None => scaled_rope_tables(inv, rope_attention, positions, dtype, device)?,
    };
    let local_rope = match gemma.local_base {
        Some(base) => Some(rope_tables(
            &inverse_frequencies(base, rope_dim),
            positions,
            dtype,
            device,
        )?),
        None => None,
    };
    Ok(TensorLlama {
        embed,
        layers,
        norm: norm(&vb, "model.norm")?,
        head,
        shape: Heads {
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim,
        },
        rms_eps: cfg.rms_norm_eps as f32,
        cos,
        sin,
        local_rope,
        rope: Rope::Halves,
        scales,
        temperature: None,
        attention_cap: gemma.attention_cap,
        logit_cap: gemma.logit_cap,
        gelu: gemma.gelu,
        dtype,
        device: device.clone(),
        vocab_size: cfg.vocab_size,
        context_length: cfg.max_position_embeddings,
        prefill_chunk: PREFILL_CHUNK,
        passes: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gemma's embedding scale is `√hidden` rounded to the activations' dtype, as
    /// transformers' `normalizer` is (Gemma 2 9B's √3584 = 59.866 is 59.75 in bf16, 59.875 in
    /// f16); `query_pre_attn_scalar` sets the score scale; one that is not positive is refused,
    /// naming it.
    #[test]
    fn gemma_s_scales_round_the_embedding_scale_to_the_dtype() {
        let config = Path::new("config.json");
        let none = serde_json::json!({});
        let s = gemma_scales(&none, 2304, DType::F32, config).unwrap();
        assert_eq!((s.embedding, s.attention), (48.0, None));
        for (dtype, want) in [
            (DType::F32, 3584f32.sqrt()),
            (DType::BF16, 59.75),
            (DType::F16, 59.875),
        ] {
            let s = gemma_scales(&none, 3584, dtype, config).unwrap();
            assert_eq!(s.embedding, want, "{dtype:?}");
        }
        let big = serde_json::json!({"query_pre_attn_scalar": 144});
        let s = gemma_scales(&big, 4608, DType::F32, config).unwrap();
        assert_eq!(s.attention, Some(1.0 / 12.0));
        let bad = serde_json::json!({"query_pre_attn_scalar": 0});
        let err = gemma_scales(&bad, 4608, DType::F32, config)
            .unwrap_err()
            .to_string();
        assert!(err.contains("query_pre_attn_scalar"), "{err}");
    }
}
