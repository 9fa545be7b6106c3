//! Our own llama forward pass over GGUF quantised weights, with batched decoding.
//!
//! The model is candle-transformers 0.11's `quantized_llama` (same GGUF tensors, RMS norm,
//! interleaved rotary embedding, SiLU MLP), but one forward pass takes the new tokens of
//! several sequences at once: their rows are stacked into one `(rows, hidden)` matrix for every
//! weight product, so each quantised weight is read once per step for the whole batch. The
//! products run on our kernels ([`super::qmatmul`]: Q4_1 and Q8_0 with AVX-512 VNNI or AVX2,
//! llama.cpp's arithmetic), with Q, K and V fused into one product and the MLP's gate and up
//! into another. Everything between the products is plain loops over `Vec<f32>` (no candle
//! tensors), and the whole pass runs inside one rayon pool.
//!
//! The KV cache ([`KvCache`]) holds, per layer and kv head, the values laid out
//! `[position][head_dim]` and the keys transposed in blocks of 16 positions
//! ([`kernels::KEY_BLOCK`]), so that the scores of 16 positions come out of one register, in
//! chunks of 128 positions that copies of a sequence's start share. Appending a token writes
//! its row (into the last block), not a copy of the whole cache.
//! Every new row, of a prompt or a decode step, attends to its sequence's cache up to its own
//! position, in tasks of (row, kv head, part of the positions) across the threads
//! ([`kernels`]), so a prompt needs no mask and sequences of different lengths no padding.
//!
//! Every instruction set gives the same bits (the kernels sum in one fixed order), so a model's
//! outputs do not depend on the CPU it runs on.

use std::sync::{Arc, OnceLock};

use candle_core::Device;
use candle_core::quantized::{QStorage, QTensor, gguf_file};
use half::f16;
use rayon::prelude::*;

use super::iquant::{Gguf, IQuant};
use super::qmatmul::QMat;
use crate::error::{Error, Result};
use kernels::{
    ATTEND_CHUNK, KEY_BLOCK, attend_dyn, attend_part, cap_scores, chunk_spans, gelu_mul,
    merge_parts, push_key, silu_mul,
};

mod kernels;
pub(crate) use kernels::exp_shifted;

/// The llama-shaped GGUF architectures kandle's forward passes run, and where each differs
/// from llama, as llama.cpp builds them:
/// - the metadata keys' prefix (`general.architecture`);
/// - the rotary embedding: llama rotates interleaved pairs (its converter permutes the q and k
///   rows to that end), Qwen2 and Qwen3 rotate the two halves of each head (llama.cpp's NEOX,
///   transformers' `rotate_half`; their rows are written as trained);
/// - Qwen2's biases on Q, K and V (`attn_{q,k,v}.bias`; a llama file may carry them too);
/// - Qwen3's RMS norm of each head of Q and K before the rotary (`attn_{q,k}_norm`);
/// - Phi-3's fused products: Q, K and V in one `attn_qkv`, the MLP's gate and up in one
///   `ffn_up` (gate first);
/// - Granite's four scalars ([`Scales`]);
/// - SmolLM3's layers without a rotary embedding (every fourth: [`Arch::rotates_layer`]);
/// - Gemma 2's ([`Gemma`]): embeddings times `√hidden`, a norm of each layer's attention and
///   MLP outputs before they join the residual stream (`post_attention_norm`,
///   `post_ffw_norm`), a gated GELU in the MLP, soft-capped attention scores and logits, and
///   a sliding window on every other layer; its rotary turns halves;
/// - Gemma 1's (`gemma`: Gemma 2B and 7B, CodeGemma): Gemma 2's embeddings and gated GELU,
///   without its output norms, caps or window;
/// - Gemma 3's: Gemma 2's without the caps, with Qwen3's norms of the query and key heads, a
///   window on five layers of six, and a rotary of its own on the windowed layers
///   ([`Gemma::local_base`]);
/// - Mistral 3's (`mistral3`: Ministral 3's language model): a llama whose queries are
///   multiplied by a factor that grows with the position ([`Temperature`]), usually with YaRN;
/// - Qwen3's mixture of experts (`qwen3moe`: Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's
///   attention, and [`Experts`] in place of each MLP (a llama file's `ffn_*_exps`, Mixtral's,
///   take the same path);
/// - Granite's mixture of experts (`granitemoe`: Granite 3.0 and 3.1 1B-A400M and 3B-A800M):
///   Granite's four scalars, and [`Experts`] in place of each MLP;
/// - Qwen2's mixture of experts (`qwen2moe`: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's
///   attention, and [`Experts`] whose chosen weights are not normalised, beside a shared
///   expert every token takes, weighed by a gate of its own ([`Shared`]).
///
/// Qwen2 covers Qwen2, Qwen2.5 (and -Coder, -Math), DeepSeek-R1's Qwen distillations and
/// QwQ; Qwen3 its dense models; Phi-3 Phi-3 mini and medium, Phi-3.5 mini and Phi-4 (the
/// 128k ones and Phi-3.5 turn by [`LongRope`]); Granite IBM's Granite 3 dense models; SmolLM3
/// Hugging Face's SmolLM3; Gemma 2 Google's Gemma 2 (2B, 9B, 27B); Gemma 3 its text models
/// (the 1B, and the language model of the 4B, 12B and 27B, whose images kandle does not read).
/// The other mixture-of-experts kinds (`phimoe`, DeepSeek's) are refused by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Phi3,
    Granite,
    SmolLm3,
    Gemma2,
    Gemma3,
    Mistral3,
    Qwen3Moe,
    GraniteMoe,
    Qwen2Moe,
    Gemma,
}

/// Llama 4's attention temperature, which Mistral 3 takes: each query at position `p` is
/// multiplied by `1 + scale · ln(⌊p / floor⌋ + 1)`, 1 within the first `floor` positions
/// (a GGUF's `mistral3.attention.temperature_scale`, and as `floor` the YaRN original context,
/// `rope.scaling.original_context_length`, else the model's context, as llama.cpp reads them;
/// transformers' `llama_4_scaling_beta` over `original_max_position_embeddings`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Temperature {
    pub scale: f32,
    pub floor: usize,
}

impl Temperature {
    /// The temperature a GGUF of `arch` declares: Mistral 3's where its scale is given and
    /// not 0 (llama.cpp reads it for no other architecture kandle runs).
    pub(super) fn of(ct: &gguf_file::Content, arch: Arch) -> Result<Option<Temperature>> {
        let key = arch.key("attention.temperature_scale");
        let scale = match (arch, ct.metadata.get(&key)) {
            (Arch::Mistral3, Some(v)) => v.to_f32()?,
            _ => return Ok(None),
        };
        if scale == 0.0 {
            return Ok(None);
        }
        let floor = match md_u32(ct, &arch.key("rope.scaling.original_context_length")) {
            Ok(o) => o,
            Err(_) => md_u32(ct, &arch.key("context_length"))?,
        };
        if !scale.is_finite() || floor == 0 {
            return Err(Error::Model(format!(
                "GGUF {key} needs a finite scale and a positive original context, it has \
                 {scale} and {floor}"
            )));
        }
        Ok(Some(Temperature { scale, floor }))
    }

    /// What the query at position `p` is multiplied by.
    pub(super) fn at(&self, p: usize) -> f32 {
        1.0 + self.scale * ((p / self.floor) as f32 + 1.0).ln()
    }
}

/// What Gemma 2 and 3 compute beyond a llama's layers, as llama.cpp reads it from a GGUF
/// (`gemma2.*`, `gemma3.*`) and transformers from config.json; a llama's is [`Gemma::llama`].
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Gemma {
    /// Each attention score `s` becomes `cap · tanh(s / cap)` (`attn_logit_softcapping`:
    /// Gemma 2's 50 by default, none in Gemma 3).
    pub attention_cap: Option<f32>,
    /// Each logit likewise (`final_logit_softcapping`: Gemma 2's 30 by default).
    pub logit_cap: Option<f32>,
    /// The MLP's gate goes through GELU (its tanh form), not SiLU.
    pub gelu: bool,
    /// Per layer, the sliding window it attends within: a position sees itself and the
    /// `window − 1` before it (`attention.sliding_window`: Gemma 2's 4,096 by default on
    /// every other layer from the first, `attention.sliding_window_pattern` 2; Gemma 3's on
    /// five layers of six, none where the file declares no window).
    pub windows: Vec<Option<usize>>,
    /// The rotary base of the windowed layers where it is their own (Gemma 3's
    /// `rope.freq_base_swa`, 10,000 by default, unscaled; the other layers take the model's
    /// `rope.freq_base` and scaling).
    pub local_base: Option<f32>,
}

impl Gemma {
    /// A llama's: nothing capped, SiLU, no window.
    pub(super) const NONE: Gemma = Gemma {
        attention_cap: None,
        logit_cap: None,
        gelu: false,
        windows: Vec::new(),
        local_base: None,
    };

    /// A llama's of `layers` layers: [`Gemma::NONE`] with no layer windowed.
    pub(super) fn llama(layers: usize) -> Gemma {
        Gemma {
            windows: vec![None; layers],
            ..Gemma::NONE
        }
    }

    /// What a GGUF of `arch` with `layers` layers declares (nothing beyond a llama's for
    /// the others).
    pub(super) fn of(ct: &gguf_file::Content, arch: Arch, layers: usize) -> Result<Gemma> {
        let gemma3 = match arch {
            Arch::Gemma2 => false,
            Arch::Gemma3 => true,
            // Gemma 1: GELU, nothing capped, no window.
            Arch::Gemma => {
                return Ok(Gemma {
                    gelu: true,
                    ..Gemma::llama(layers)
                });
            }
            _ => return Ok(Gemma::llama(layers)),
        };
        // A cap the file leaves out is llama.cpp's default.
        let f32_at = |name: &str| -> Result<Option<Option<f64>>> {
            let value = ct.metadata.get(&arch.key(name));
            Ok(value
                .map(|v| v.to_f32())
                .transpose()?
                .map(|x| Some(x.into())))
        };
        let window = md_u32(ct, &arch.key("attention.sliding_window")).ok();
        let pattern = match ct
            .metadata
            .get(&arch.key("attention.sliding_window_pattern"))
        {
            None if gemma3 => Pattern::Every(6),
            None => Pattern::Every(2),
            Some(gguf_file::Value::Array(flags)) => Pattern::Listed(
                (flags.iter().map(|f| f.to_bool())).collect::<candle_core::Result<Vec<bool>>>()?,
            ),
            Some(v) => Pattern::Every(v.to_u32()? as usize),
        };
        let declared = Gemma::declared(
            arch,
            [
                f32_at("attn_logit_softcapping")?,
                f32_at("final_logit_softcapping")?,
            ],
            // Gemma 2 always slides (4,096 by default); Gemma 3 where the file says so.
            window.or((!gemma3).then_some(4096)),
            pattern,
            layers,
            |name| format!("GGUF {}", arch.key(name)),
        )?;
        let local_base = ct
            .metadata
            .get(&arch.key("rope.freq_base_swa"))
            .map(|v| v.to_f32())
            .transpose()?;
        Ok(Gemma {
            local_base: match gemma3 && window.is_some() {
                true => Some(local_base.unwrap_or(10_000.0)),
                false => None,
            },
            ..declared
        })
    }

    /// Gemma 2's or 3's (`arch`) from the values a model declares: the attention's and the
    /// logits' caps (`None`: not given, Gemma 2's 50 and 30, none for Gemma 3; `Some(None)`:
    /// none), the window (`None`: none) and which layers slide; a cap or window that is not
    /// positive, or a list of layers of another length, is refused, `what` naming the key (by
    /// its GGUF name). No rotary of the windowed layers' own ([`Gemma::local_base`]).
    pub(super) fn declared(
        arch: Arch,
        [attention, logits]: [Option<Option<f64>>; 2],
        window: Option<usize>,
        pattern: Pattern,
        layers: usize,
        what: impl Fn(&str) -> String,
    ) -> Result<Gemma> {
        let cap = |value: Option<Option<f64>>, default: f32, name: &str| match value {
            None => Ok(Some(default).filter(|_| arch == Arch::Gemma2)),
            Some(None) => Ok(None),
            Some(Some(x)) if x.is_finite() && x > 0.0 => Ok(Some(x as f32)),
            Some(Some(x)) => Err(Error::Model(format!(
                "{} must be a positive number, it is {x}",
                what(name)
            ))),
        };
        if window == Some(0) {
            return Err(Error::Model(format!(
                "{} must be a positive number of positions, it is 0",
                what("attention.sliding_window")
            )));
        }
        let slides: Vec<bool> = match pattern {
            Pattern::Every(0) => vec![true; layers],
            // llama.cpp's `set_swa_pattern`: of each `n` layers, all but the last slide.
            Pattern::Every(n) => (0..layers).map(|i| i % n < n - 1).collect(),
            Pattern::Listed(flags) if flags.len() == layers => flags,
            Pattern::Listed(flags) => {
                return Err(Error::Model(format!(
                    "{} lists {} layers, the model has {layers}",
                    what("attention.sliding_window_pattern"),
                    flags.len()
                )));
            }
        };
        Ok(Gemma {
            attention_cap: cap(attention, 50.0, "attn_logit_softcapping")?,
            logit_cap: cap(logits, 30.0, "final_logit_softcapping")?,
            gelu: true,
            windows: slides.into_iter().map(|s| window.filter(|_| s)).collect(),
            local_base: None,
        })
    }
}

/// Which of a model's layers have a sliding window: all but the last of every `n` (the
/// first `n − 1` of each `n`; 0: all), or one flag per layer.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Pattern {
    Every(usize),
    Listed(Vec<bool>),
}

/// Granite's scalars, as llama.cpp reads them (`granite.embedding_scale`, `residual_scale`,
/// `attention.scale`, `logit_scale`; transformers' `embedding_multiplier`,
/// `residual_multiplier`, `attention_multiplier`, `logits_scaling`): the embeddings are
/// multiplied by the first, each layer's attention and MLP outputs by the second before they
/// join the residual stream, the attention scores by the third instead of `1/√head_dim`, and
/// the logits divided by the fourth. A llama's are 1, 1, `1/√head_dim` and 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Scales {
    pub embedding: f32,
    pub residual: f32,
    /// `None`: `1/√head_dim`.
    pub attention: Option<f32>,
    pub logit: f32,
}

impl Scales {
    /// A llama's (no scaling).
    pub(super) const NONE: Scales = Scales {
        embedding: 1.0,
        residual: 1.0,
        attention: None,
        logit: 1.0,
    };

    /// The scalars a GGUF of `arch` declares (Granite's), or implies (Gemma 2's); none for
    /// the others.
    pub(super) fn of(ct: &gguf_file::Content, arch: Arch) -> Result<Scales> {
        if matches!(arch, Arch::Gemma | Arch::Gemma2 | Arch::Gemma3) {
            let n = |name: &str| md_u32(ct, &arch.key(name));
            return Ok(Scales::gemma(
                arch,
                n("embedding_length")?,
                n("attention.head_count")?,
                n("block_count")?,
            ));
        }
        if !matches!(arch, Arch::Granite | Arch::GraniteMoe) {
            return Ok(Scales::NONE);
        }
        let names = [
            "embedding_scale",
            "residual_scale",
            "attention.scale",
            "logit_scale",
        ];
        let read = |name: &str| -> Result<Option<f64>> {
            let value = ct.metadata.get(&arch.key(name));
            Ok(value.map(|v| v.to_f32()).transpose()?.map(f64::from))
        };
        Scales::declared(names, read, |name| format!("GGUF {}", arch.key(name)))
    }

    /// Gemma's, 2's and 3's (`arch`), as llama.cpp sets them: the embeddings times `√hidden`; the
    /// scores scaled by `1/√(hidden / heads)` in the 27B models (Gemma 2's 46 layers, Gemma
    /// 3's 62: transformers' `query_pre_attn_scalar` of 144 and 168, not the head's 128), by
    /// `1/√head_dim` (a llama's) in the others.
    pub(super) fn gemma(arch: Arch, hidden: usize, heads: usize, layers: usize) -> Scales {
        let big = matches!((arch, layers), (Arch::Gemma2, 46) | (Arch::Gemma3, 62));
        Scales {
            embedding: (hidden as f32).sqrt(),
            attention: big.then(|| 1.0 / ((hidden / heads.max(1)) as f32).sqrt()),
            ..Scales::NONE
        }
    }

    /// The scalars from the values a model declares under `names` (the embedding, residual,
    /// attention and logit scales, in that order), as `read` finds them; a missing one is a
    /// llama's, and one that is not a positive number is refused, `what` naming it.
    pub(super) fn declared(
        names: [&str; 4],
        read: impl Fn(&str) -> Result<Option<f64>>,
        what: impl Fn(&str) -> String,
    ) -> Result<Scales> {
        let f = |name: &str| -> Result<Option<f32>> {
            match read(name)? {
                None => Ok(None),
                Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x as f32)),
                Some(x) => Err(Error::Model(format!(
                    "{} must be a positive number, it is {x}",
                    what(name)
                ))),
            }
        };
        let [embedding, residual, attention, logit] = names;
        Ok(Scales {
            embedding: f(embedding)?.unwrap_or(1.0),
            residual: f(residual)?.unwrap_or(1.0),
            attention: f(attention)?,
            logit: f(logit)?.unwrap_or(1.0),
        })
    }
}

impl Arch {
    /// The architecture `general.architecture` names, or an error naming it.
    pub(super) fn of(ct: &gguf_file::Content) -> Result<Arch> {
        let name = ct
            .metadata
            .get("general.architecture")
            .ok_or_else(|| Error::Model("GGUF metadata has no general.architecture".into()))?
            .to_string()?;
        Arch::named(name).ok_or_else(|| {
            Error::Model(format!(
                "GGUF architecture {name:?} is not supported (llama, qwen2, qwen3, phi3, \
                 granite, smollm3, gemma, gemma2, gemma3, mistral3, qwen3moe, granitemoe and \
                 qwen2moe are)"
            ))
        })
    }

    /// The architecture of this name: a GGUF's `general.architecture`, which is also the
    /// `model_type` of transformers' config.json for each of these (Gemma 3's text model's
    /// is `gemma3_text`).
    pub(super) fn named(name: &str) -> Option<Arch> {
        Some(match name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "phi3" => Arch::Phi3,
            "granite" => Arch::Granite,
            "smollm3" => Arch::SmolLm3,
            // Gemma 1: a GGUF's only here (the safetensors path reads Gemma 2 and 3).
            "gemma" => Arch::Gemma,
            "gemma2" => Arch::Gemma2,
            // transformers' text-only Gemma 3 (its multimodal one is "gemma3").
            "gemma3" | "gemma3_text" => Arch::Gemma3,
            // A GGUF's only: transformers' `mistral3` is the multimodal model.
            "mistral3" => Arch::Mistral3,
            // transformers' `qwen3_moe`, llama.cpp's `qwen3moe`.
            "qwen3moe" | "qwen3_moe" => Arch::Qwen3Moe,
            // A GGUF's only here: transformers' `granitemoe` fuses each layer's experts'
            // gate and up (`input_linear`), which the safetensors path does not read.
            "granitemoe" => Arch::GraniteMoe,
            // A GGUF's only here: the safetensors path reads no shared expert.
            "qwen2moe" => Arch::Qwen2Moe,
            _ => return None,
        })
    }

    /// The metadata key `name` of this architecture (`qwen2.block_count`, ...).
    pub(super) fn key(self, name: &str) -> String {
        let prefix = match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
            Arch::Granite => "granite",
            Arch::SmolLm3 => "smollm3",
            Arch::Gemma => "gemma",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
            Arch::Mistral3 => "mistral3",
            Arch::Qwen3Moe => "qwen3moe",
            Arch::GraniteMoe => "granitemoe",
            Arch::Qwen2Moe => "qwen2moe",
        };
        format!("{prefix}.{name}")
    }

    /// Whether the rotary embedding turns dimension `i` with `i + head_dim / 2` (else `2i`
    /// with `2i + 1`).
    pub(super) fn rotates_halves(self) -> bool {
        !matches!(
            self,
            Arch::Llama | Arch::Granite | Arch::SmolLm3 | Arch::Mistral3 | Arch::GraniteMoe
        )
    }

    /// Whether layer `i` (from 0) turns its queries and keys: SmolLM3's every fourth does
    /// not (llama.cpp's `n_no_rope_layer_step`, transformers' `no_rope_layer_interval`).
    pub(super) fn rotates_layer(self, i: usize) -> bool {
        self != Arch::SmolLm3 || !(i + 1).is_multiple_of(4)
    }
}

struct Layer {
    /// `attn_q`, `attn_k`, `attn_v` side by side: one pass over the threads.
    qkv: QMat,
    /// Their biases side by side (Qwen2), added to each row of the product.
    qkv_bias: Option<Vec<f32>>,
    /// The weights of the RMS norm of each query and key head (Qwen3), `head_dim` each.
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// The rotary embedding turns this layer's queries and keys (not SmolLM3's every fourth).
    rotates: bool,
    /// The sliding window this layer attends within (Gemma 2's every other layer).
    window: Option<usize>,
    wo: QMat,
    mlp: Mlp,
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    /// The weights of the RMS norms of the attention's and the MLP's outputs (Gemma 2's
    /// `post_attention_norm` and `post_ffw_norm`).
    post_norms: Option<(Vec<f32>, Vec<f32>)>,
}

/// A layer's feed-forward part: one MLP, or a mixture of experts.
enum Mlp {
    /// `ffn_gate` and `ffn_up` side by side, and `ffn_down`.
    Dense {
        gate_up: QMat,
        down: QMat,
    },
    Experts(Experts),
}

/// A mixture of experts (Mixtral's, Qwen3's: llama.cpp's `build_moe_ffn` with softmax gating
/// and the chosen weights normalised): each row goes through the `used` experts the router
/// (`ffn_gate_inp`) scores highest, and their outputs are summed, each weighted by its softmax
/// probability over the chosen ones' sum (times `scale`, `expert_weights_scale`, where a file
/// declares one). The experts are a GGUF's 3-D `ffn_{gate,up,down}_exps`, each packed as a
/// matrix of its own.
struct Experts {
    /// The router's weights, `(experts, hidden)`, in f32: its scores are computed here, in
    /// a fixed order, so that a row's experts never depend on the rows beside it (candle's
    /// f32 product may round a row differently in a larger batch).
    router: Vec<f32>,
    /// Each expert's gate and up side by side, and its down product.
    experts: Vec<(QMat, QMat)>,
    used: usize,
    scale: f32,
    /// The chosen weights divided by their sum ([`route`]).
    normalise: bool,
    shared: Option<Shared>,
}

/// A shared expert (Qwen2-MoE's): every row goes through it, its output weighed by the
/// sigmoid of the row's score under `gate` (`ffn_gate_inp_shexp`) where the file has one,
/// and added to the chosen experts' (llama.cpp's `ffn_*_shexp`).
struct Shared {
    gate_up: QMat,
    down: QMat,
    gate: Option<Vec<f32>>,
}

/// How a layer routes its tokens ([`routing`]).
pub(super) struct Routing {
    pub count: usize,
    pub used: usize,
    pub scale: f32,
    /// The chosen weights divided by their sum: llama.cpp's `norm_w`, false for `qwen2moe`.
    pub normalise: bool,
}

/// How layer `p` (`blk.N`) of a GGUF routes its tokens, `None` where it has no router
/// (`ffn_gate_inp`).
pub(super) fn routing(ct: &gguf_file::Content, arch: Arch, p: &str) -> Result<Option<Routing>> {
    if !ct
        .tensor_infos
        .contains_key(&format!("{p}.ffn_gate_inp.weight"))
    {
        return Ok(None);
    }
    // Shared experts other than Qwen2-MoE's (`granitemoeshared`'s, Llama 4's) and DeepSeek's
    // routing biases are not computed here: refused rather than left out.
    let prefix = format!("{p}.");
    let shared = arch == Arch::Qwen2Moe;
    if let Some(n) = (ct.tensor_infos.keys()).find(|n| {
        n.starts_with(&prefix) && ((!shared && n.contains("shexp")) || n.contains("exp_probs_b"))
    }) {
        return Err(Error::Model(format!(
            "GGUF mixture of experts with {n} (shared experts or routing biases) is not \
                 supported"
        )));
    }
    let count = expert_count(ct, arch);
    let used = md_u32(ct, &arch.key("expert_used_count")).unwrap_or(0);
    if count < 2 || used == 0 || used > count {
        return Err(Error::Model(format!(
            "GGUF {p} is a mixture of {count} experts using {used} at a time \
                 ({} and {}): it needs at least 2, and from 1 to all of them used",
            arch.key("expert_count"),
            arch.key("expert_used_count")
        )));
    }
    let scale = match ct.metadata.get(&arch.key("expert_weights_scale")) {
        Some(v) => match v.to_f32()? {
            0.0 => 1.0,
            s => s,
        },
        None => 1.0,
    };
    Ok(Some(Routing {
        count,
        used,
        scale,
        normalise: arch != Arch::Qwen2Moe,
    }))
}

/// Layer `p`'s shared expert's gate, up and down (`ffn_{gate,up,down}_shexp`) and its gate's
/// weights (`ffn_gate_inp_shexp`, a row of `hidden`), where the layer has one.
pub(super) fn shared_expert<R: std::io::Seek + std::io::Read>(
    ct: &Gguf,
    reader: &mut R,
    p: &str,
    device: &Device,
) -> Result<Option<([QTensor; 3], Option<QTensor>)>> {
    let name = |part: &str| format!("{p}.ffn_{part}.weight");
    if !ct.tensor_infos.contains_key(&name("up_shexp")) {
        return Ok(None);
    }
    let mut read = |part: &str| ct.tensor(reader, &name(part), device);
    let parts = [read("gate_shexp")?, read("up_shexp")?, read("down_shexp")?];
    let gate = match ct.tensor_infos.contains_key(&name("gate_inp_shexp")) {
        true => Some(read("gate_inp_shexp")?),
        false => None,
    };
    Ok(Some((parts, gate)))
}

/// Layer `p`'s experts' matrices of `part` (`gate`, `up`, `down`: `ffn_{part}_exps`), one per
/// expert (of `count`), on `device`.
pub(super) fn expert_matrices<R: std::io::Seek + std::io::Read>(
    ct: &Gguf,
    reader: &mut R,
    p: &str,
    part: &str,
    count: usize,
    device: &Device,
) -> Result<Vec<QTensor>> {
    let name = format!("{p}.ffn_{part}_exps.weight");
    let t = ct.tensor(reader, &name, &Device::Cpu)?;
    let (e, n, k) = t.shape().dims3()?;
    if e != count {
        return Err(Error::Model(format!(
            "GGUF {name} holds {e} experts, not {count}"
        )));
    }
    let (dtype, iquant) = (t.dtype(), IQuant::of(&t));
    let bytes = t.data()?.len() / e;
    let data = t.data()?;
    (0..e)
        .map(|i| {
            if let Some(kind) = iquant {
                let part = data[i * bytes..(i + 1) * bytes].to_vec();
                return Ok(super::iquant::qtensor(kind, part, &[n, k], device)?);
            }
            let part = std::borrow::Cow::Borrowed(&data[i * bytes..(i + 1) * bytes]);
            let storage = QStorage::from_data(part, device, dtype)?;
            Ok(QTensor::new(storage, (n, k))?)
        })
        .collect()
}

/// The chosen experts of a row of router `scores` and their weights, highest first (ties:
/// the lower expert): llama.cpp's softmax gating, the `used` best, their probabilities over
/// their sum (at least 2⁻¹⁴) where `normalise` (always in a GGUF; transformers'
/// `norm_topk_prob`), times `scale`.
pub(super) fn route(scores: &[f32], used: usize, scale: f32, normalise: bool) -> Vec<(usize, f32)> {
    let top = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let probs: Vec<f32> = scores.iter().map(|s| (s - top).exp()).collect();
    let total: f32 = probs.iter().sum();
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    order.truncate(used);
    let chosen: Vec<f32> = order.iter().map(|&e| probs[e] / total).collect();
    let sum = match normalise {
        true => chosen.iter().sum::<f32>().max(6.103_515_6e-5),
        false => 1.0,
    };
    (order.into_iter().zip(chosen))
        .map(|(e, w)| (e, w / sum * scale))
        .collect()
}

impl Experts {
    /// The experts of layer `p` (`blk.N`) of a GGUF, `None` where it has none.
    fn of<R: std::io::Seek + std::io::Read>(
        ct: &Gguf,
        arch: Arch,
        reader: &mut R,
        p: &str,
    ) -> Result<Option<Experts>> {
        let Some(Routing {
            count,
            used,
            scale,
            normalise,
        }) = routing(ct, arch, p)?
        else {
            return Ok(None);
        };
        let device = &Device::Cpu;
        let router = ct.tensor(reader, &format!("{p}.ffn_gate_inp.weight"), device)?;
        let shape = router.shape().dims2()?;
        let router: Vec<f32> = router.dequantize(device)?.flatten_all()?.to_vec1()?;
        let mut split = |part: &str| expert_matrices(ct, reader, p, part, count, device);
        let (gate, up, down) = (split("gate")?, split("up")?, split("down")?);
        let experts = (gate.into_iter().zip(up).zip(down))
            .map(|((g, u), d)| Ok((QMat::from_qtensors(vec![g, u])?, QMat::from_qtensor(d)?)))
            .collect::<Result<Vec<_>>>()?;
        if shape.0 != count {
            return Err(Error::Model(format!(
                "GGUF {p}.ffn_gate_inp scores {} experts, not {count}",
                shape.0
            )));
        }
        let shared = match shared_expert(ct, reader, p, device)? {
            Some(([g, u, d], gate)) => Some(Shared {
                gate_up: QMat::from_qtensors(vec![g, u])?,
                down: QMat::from_qtensor(d)?,
                gate: match gate {
                    Some(t) => Some(t.dequantize(device)?.flatten_all()?.to_vec1()?),
                    None => None,
                },
            }),
            None => None,
        };
        if let Some(g) = shared.as_ref().and_then(|s| s.gate.as_ref())
            && g.len() != shape.1
        {
            return Err(Error::Model(format!(
                "GGUF {p}.ffn_gate_inp_shexp holds {} weights, not the {} of a row",
                g.len(),
                shape.1
            )));
        }
        Ok(Some(Experts {
            router,
            experts,
            used,
            scale,
            normalise,
            shared,
        }))
    }

    /// The experts' weighted sum for `rows` rows `h`: each expert runs once, on the rows that
    /// chose it, and each row adds its experts' outputs in the order of the experts, so that a
    /// row's result does not depend on the other rows.
    fn forward(
        &self,
        h: &[f32],
        rows: usize,
        gate: fn(&[f32], &[f32], &mut [f32]),
    ) -> Result<Vec<f32>> {
        let hidden = h.len() / rows;
        let scores: Vec<f32> = h
            .chunks_exact(hidden)
            .flat_map(|x| self.router.chunks_exact(hidden).map(|w| dot(x, w)))
            .collect();
        let mut chosen: Vec<Vec<(usize, f32)>> = vec![Vec::new(); self.experts.len()];
        for (r, s) in scores.chunks_exact(self.experts.len()).enumerate() {
            for (e, w) in route(s, self.used, self.scale, self.normalise) {
                chosen[e].push((r, w));
            }
        }
        let mut out = vec![0f32; rows * hidden];
        // One expert on `n` rows `x`: its down product of the gated gate and up.
        let expert = |gate_up: &QMat, down: &QMat, x: &[f32], n: usize| -> Result<Vec<f32>> {
            let gu = gate_up.forward(x, n)?;
            let ff = gu.len() / n / 2;
            let mut act = vec![0f32; n * ff];
            for (a, g) in act.chunks_exact_mut(ff).zip(gu.chunks_exact(2 * ff)) {
                gate(&g[..ff], &g[ff..], a);
            }
            down.forward(&act, n)
        };
        for ((gate_up, down), takers) in self.experts.iter().zip(&chosen) {
            if takers.is_empty() {
                continue;
            }
            let n = takers.len();
            let mut x = Vec::with_capacity(n * hidden);
            for &(r, _) in takers {
                x.extend_from_slice(&h[r * hidden..(r + 1) * hidden]);
            }
            let y = expert(gate_up, down, &x, n)?;
            for (&(r, w), y) in takers.iter().zip(y.chunks_exact(hidden)) {
                let o = &mut out[r * hidden..(r + 1) * hidden];
                o.iter_mut().zip(y).for_each(|(o, y)| *o += w * y);
            }
        }
        if let Some(sh) = &self.shared {
            let y = expert(&sh.gate_up, &sh.down, h, rows)?;
            for ((o, y), x) in (out.chunks_exact_mut(hidden))
                .zip(y.chunks_exact(hidden))
                .zip(h.chunks_exact(hidden))
            {
                let w = sh.gate.as_ref().map_or(1.0, |g| sigmoid(dot(x, g)));
                o.iter_mut().zip(y).for_each(|(o, y)| *o += w * y);
            }
        }
        Ok(out)
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `Σ x·w` in eight lanes added in a fixed order: the same bits for a row wherever it is.
fn dot(x: &[f32], w: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (xc, wc) = (x.chunks_exact(8), w.chunks_exact(8));
    let tail: f32 = (xc.remainder().iter().zip(wc.remainder()))
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in xc.zip(wc) {
        for i in 0..8 {
            lanes[i] += a[i] * b[i];
        }
    }
    let pairs = [
        lanes[0] + lanes[4],
        lanes[1] + lanes[5],
        lanes[2] + lanes[6],
        lanes[3] + lanes[7],
    ];
    (pairs[0] + pairs[2]) + (pairs[1] + pairs[3]) + tail
}

/// The token embeddings: quantised rows dequantised on lookup, or (for a type without our
/// kernel) dequantised once.
enum Embeddings {
    Quantised(QMat),
    Dense(Vec<f32>),
}

/// The weights of a llama GGUF model, shared by all sequences.
pub(super) struct Weights {
    embeddings: Embeddings,
    hidden: usize,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    eps: f32,
    /// The output head; `None`: tied to the quantised embeddings.
    output: Option<QMat>,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    /// Rotary on the halves of each head ([`Arch::rotates_halves`]).
    rotates_halves: bool,
    /// Granite's and Gemma 2's scalars.
    scales: Scales,
    /// Gemma 2's caps of the scores and logits, and its GELU (its windows are the layers').
    attention_cap: Option<f32>,
    logit_cap: Option<f32>,
    gelu: bool,
    /// The rotary frequencies, `rope.dimension_count / 2` of them (the dimensions a head turns:
    /// all of them but in Phi-4-mini), and the divisor of each one's angles
    /// where the file declares a scaling ([`rotary_scaling`]).
    theta: Vec<f32>,
    divisors: Option<Vec<f32>>,
    /// What every scaled `cos` and `sin` is multiplied by ([`RotaryScaling::attention`]).
    rope_attention: f32,
    /// Mistral 3's query factor by position.
    temperature: Option<Temperature>,
    /// The windowed layers' own frequencies, unscaled (Gemma 3's [`Gemma::local_base`]).
    local_theta: Option<Vec<f32>>,
    /// Phi-3's long-context rotary, in place of `divisors`.
    long_rope: Option<LongRope>,
    /// The longest sequence: the model's context length.
    max_positions: usize,
    /// Forward passes run so far ([`crate::backend::CausalLm::forward_passes`]).
    passes: std::sync::atomic::AtomicU64,
}

/// Rows whose logits [`Weights::forward_each`] computes at a time (12.6 MB of SmolLM2's).
const EVERY_ROW_BLOCK: usize = 64;

/// One sequence's keys and values, in f16 as llama.cpp keeps them by default (half the memory
/// and half the reads of f32; the mean log-probability error against llama.cpp stayed at
/// 0.098–0.101 either way).
///
/// The positions are held in chunks of [`ATTEND_CHUNK`], the span of one attention task. A
/// chunk holds, per layer, the keys of each kv head (transposed in blocks as the module doc
/// says), then the values of each kv head (`[position][head_dim]`): each run is the
/// contiguous memory one task reads, so a task reads two plain streams, not a stride through
/// every head's lines. A sequence grows by a chunk at a time, so nothing already held is ever
/// moved, apart from a short first chunk ([`Chunk`]) (a cache kept in one buffer that doubled
/// when full stalled a step for the copy and the fresh pages behind it: the slowest 50-token
/// stretch of the bench's steadiness run fell from 0.81–0.90 to 0.78–0.82 of the median).
///
/// Chunks are shared: a copy of a prefix ([`KvCache::prefix`]: the prefix cache's entries,
/// the continuations made from them, the `n` choices of one prompt) holds the same chunks,
/// and a sequence that writes into a chunk another one also holds first takes a copy of that
/// chunk alone (`Arc::make_mut`). A long system prompt kept in the prefix cache and continued
/// by several requests is therefore held once, apart from each one's last, partial chunk.
///
/// The layers with a sliding window (Gemma 2's every other layer, Gemma 3's five of six) keep
/// their keys and values in a store of each chunk's own, which the cache lets go once no
/// position to come can see any of its positions ([`KvCache::forget_outside_window`]): a
/// Gemma 3 sequence of 8,192 tokens holds its windowed layers' last 512–768 positions, not all
/// 8,192 (vLLM and llama.cpp keep a window's worth too). The batch token budget counts a
/// sequence at what it holds ([`Weights::cache_cost`]), and the prefix cache counts the
/// stores its kept prompts hold ([`KvCache::blocks`]).
pub(super) struct KvCache {
    chunks: Vec<Chunk>,
    shape: KvShape,
    len: usize,
    /// Leading chunks whose windowed layers' store has been let go.
    forgotten: usize,
}

/// [`ATTEND_CHUNK`] positions of a [`KvCache`], or, for the first chunk of a short sequence,
/// room for fewer: `cap` positions (a power of two from [`kernels::KEY_BLOCK`]), so that a
/// short sequence does not hold a whole chunk (2.9 MB for SmolLM2, 67 MB for a Llama-2-7B)
/// for a few tokens. The first chunk doubles as the sequence grows, moving at most its own
/// few positions; later chunks are whole from the start.
#[derive(Clone)]
struct Chunk {
    cap: usize,
    /// The layers without a window: `cap · shape.per_position_of(false)` values, zero where
    /// never written.
    data: Arc<Vec<f16>>,
    /// The windowed layers' (`cap · shape.per_position_of(true)`), `None` where the model
    /// has none or once the cache has let them go.
    local: Option<Arc<Vec<f16>>>,
}

impl Chunk {
    fn zeroed(cap: usize, shape: KvShape) -> Chunk {
        // `vec!` of zeros asks for zeroed memory (no pass over it where the allocator has
        // fresh pages); an `Arc<[f16]>` would be written whole.
        let zeros = |local| Arc::new(vec![f16::ZERO; cap * shape.per_position_of(local)]);
        Chunk {
            cap,
            data: zeros(false),
            local: (shape.windowed != 0).then(|| zeros(true)),
        }
    }

    /// The store of the layers with (`local`) or without a window.
    fn store(&self, local: bool) -> &Arc<Vec<f16>> {
        match local {
            false => &self.data,
            true => self
                .local
                .as_ref()
                .expect("a windowed layer's chunk is read or written only while in its window"),
        }
    }
}

/// Layers, kv heads and head size of a [`KvCache`], and which layers have a sliding window.
#[derive(Clone, Copy)]
struct KvShape {
    layers: usize,
    heads: usize,
    hd: usize,
    /// One bit per layer with a sliding window (layer `i`: bit `i`). None is set for a model
    /// of more than 128 layers: its windowed layers are then kept whole, as the others.
    windowed: u128,
    /// The widest window of those layers (0: none).
    window: usize,
}

impl KvShape {
    /// A shape without windowed layers.
    fn dense(layers: usize, heads: usize, hd: usize) -> KvShape {
        KvShape {
            layers,
            heads,
            hd,
            windowed: 0,
            window: 0,
        }
    }

    /// f16 values per position, all layers.
    fn per_position(self) -> usize {
        self.layers * 2 * self.heads * self.hd
    }

    /// f16 values per position of the layers with (`local`) or without a window.
    fn per_position_of(self, local: bool) -> usize {
        let windowed = self.windowed.count_ones() as usize;
        let layers = if local {
            windowed
        } else {
            self.layers - windowed
        };
        layers * 2 * self.heads * self.hd
    }

    /// Where layer `li` is kept: in the windowed layers' store or the others', and its place
    /// among that store's layers.
    fn slot(self, li: usize) -> (bool, usize) {
        if self.windowed == 0 {
            return (false, li);
        }
        let before = (self.windowed & ((1u128 << li) - 1)).count_ones() as usize;
        match self.windowed >> li & 1 == 1 {
            true => (true, before),
            false => (false, li - before),
        }
    }

    /// Leading chunks of a cache of `len` positions that no position from `len` on sees in
    /// a windowed layer (position `p` sees `p + 1 − window` on).
    fn unseen(self, len: usize) -> usize {
        match self.windowed {
            0 => 0,
            _ => (len + 1).saturating_sub(self.window) / ATTEND_CHUNK,
        }
    }

    /// The most positions whose windowed layers' store a cache holds after a decode step,
    /// however long: the chunks from the first a position to come sees, one more, and the
    /// one being written. (A step that feeds a prompt's part holds that part's chunks too
    /// until it ends, as it holds the part's activations.)
    fn most_kept(self) -> usize {
        (self.window.div_ceil(ATTEND_CHUNK) + 2) * ATTEND_CHUNK
    }

    /// Leading chunks whose windowed layers' store a cache of `len` positions lets go: the
    /// [`KvShape::unseen`] ones but the last, so that a prefix copy up to a chunk shorter
    /// still has its window ([`KvCache::prefix`]: a conversation's next turn may match a
    /// little less than the whole of the last).
    fn forgettable(self, len: usize) -> usize {
        self.unseen(len).saturating_sub(1)
    }
}

impl KvCache {
    fn new(shape: KvShape) -> KvCache {
        KvCache {
            chunks: Vec::new(),
            shape,
            len: 0,
            forgotten: 0,
        }
    }

    /// Tokens held.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The keys (`values` false) or values of kv head `g` in layer `li` for the positions of
    /// chunk `c`: the chunk's `cap` positions' worth, those not yet written unread.
    fn run(&self, c: usize, li: usize, values: bool, g: usize) -> &[f16] {
        let KvShape { heads, hd, .. } = self.shape;
        let (local, li) = self.shape.slot(li);
        let size = self.chunks[c].cap * hd;
        &self.chunks[c].store(local)[((2 * li + values as usize) * heads + g) * size..][..size]
    }

    /// Positions there is room for.
    fn room(&self) -> usize {
        self.chunks
            .last()
            .map_or(0, |last| (self.chunks.len() - 1) * ATTEND_CHUNK + last.cap)
    }

    /// Stores position `p`'s key and value (all kv heads: `heads · hd` values each) in layer
    /// `li`, which has room for it.
    fn write(&mut self, li: usize, p: usize, key: &[f32], value: &[f32]) {
        let KvShape { heads, hd, .. } = self.shape;
        let (local, li) = self.shape.slot(li);
        let (c, at) = (p / ATTEND_CHUNK, p % ATTEND_CHUNK);
        let size = self.chunks[c].cap * hd;
        let chunk = &mut self.chunks[c];
        let store = match local {
            false => &mut chunk.data,
            true => chunk
                .local
                .as_mut()
                .expect("a position is written in its window"),
        };
        let layer = &mut Arc::make_mut(store)[2 * li * heads * size..][..2 * heads * size];
        let (kc, vc) = layer.split_at_mut(heads * size);
        for ((kh, vh), (k, v)) in kc
            .chunks_exact_mut(size)
            .zip(vc.chunks_exact_mut(size))
            .zip(key.chunks_exact(hd).zip(value.chunks_exact(hd)))
        {
            push_key(kh, at, k);
            for (d, v) in vh[at * hd..][..hd].iter_mut().zip(v) {
                *d = f16::from_f32(*v);
            }
        }
    }

    /// Makes room for `need` positions: a short first chunk grown (doubled, at least to
    /// `need`), then whole chunks added at the end.
    fn reserve(&mut self, need: usize) {
        if need <= self.room() {
            return;
        }
        let first_cap = |n: usize| n.next_power_of_two().clamp(KEY_BLOCK, ATTEND_CHUNK);
        if self.chunks.len() == 1 && self.chunks[0].cap < ATTEND_CHUNK {
            let old = &self.chunks[0];
            let grown = Chunk::zeroed(first_cap(need.max(2 * old.cap)), self.shape);
            // Every run (per layer, keys or values, kv head) of the old chunk is the start of
            // the grown one's: the keys' blocks of 16 positions and the values' rows follow
            // one another. (A first chunk shorter than a whole one is in every window.)
            let (from, to) = (old.cap * self.shape.hd, grown.cap * self.shape.hd);
            let copy = |mut new: Arc<Vec<f16>>, old: &[f16]| {
                let dst = Arc::get_mut(&mut new).expect("a new chunk is not shared");
                for (d, s) in dst.chunks_exact_mut(to).zip(old.chunks_exact(from)) {
                    d[..from].copy_from_slice(s);
                }
                new
            };
            self.chunks[0] = Chunk {
                cap: grown.cap,
                data: copy(grown.data, &old.data),
                local: grown.local.zip(old.local.as_ref()).map(|(n, o)| copy(n, o)),
            };
        }
        while self.room() < need {
            let cap = match self.chunks.is_empty() {
                true => first_cap(need),
                false => ATTEND_CHUNK,
            };
            self.chunks.push(Chunk::zeroed(cap, self.shape));
        }
    }

    /// A copy of the first `len` positions: the chunks that hold them, shared (the positions
    /// past `len` in the last one are overwritten, in a chunk of its own, before they are
    /// read). `None` past the end, or where the windowed layers' positions the copy's next
    /// one sees have been let go.
    fn prefix(&self, len: usize) -> Option<KvCache> {
        let chunks = len.div_ceil(ATTEND_CHUNK);
        (len <= self.len && self.forgotten.min(chunks) <= self.shape.unseen(len)).then(|| KvCache {
            chunks: self.chunks[..chunks].to_vec(),
            shape: self.shape,
            len,
            forgotten: self.forgotten.min(chunks),
        })
    }

    /// Cuts back to `len` positions (a failed pass's), which still have their windows.
    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        debug_assert!(self.forgotten <= self.shape.unseen(self.len));
    }

    /// Lets go of the windowed layers' store of the chunks no position to come sees
    /// ([`KvShape::forgettable`]).
    fn forget_outside_window(&mut self) {
        let upto = self.shape.forgettable(self.len).min(self.chunks.len());
        for chunk in self.chunks.iter_mut().take(upto).skip(self.forgotten) {
            chunk.local = None;
        }
        self.forgotten = self.forgotten.max(upto);
    }

    /// Each chunk's stores as (the store's address, the positions it has room for, at every
    /// layer's cost): copies that share a store give the same address for it
    /// ([`crate::backend::Sequence::cache_blocks`]). A model without windows has one store a
    /// chunk, counted whole; with windowed layers, the windowed store counts their share of
    /// the chunk's positions and the other store the rest, so a chunk whose windowed store has
    /// been let go counts less.
    pub(super) fn blocks(&self) -> Vec<(usize, usize)> {
        let (local, all) = (self.shape.per_position_of(true), self.shape.per_position());
        let mut blocks = Vec::with_capacity(self.chunks.len() * 2);
        for c in &self.chunks {
            let windowed = c.cap * local / all;
            blocks.push((Arc::as_ptr(&c.data) as usize, c.cap - windowed));
            if let Some(store) = &c.local {
                blocks.push((Arc::as_ptr(store) as usize, windowed));
            }
        }
        blocks
    }
}

fn md_u32(ct: &gguf_file::Content, key: &str) -> Result<usize> {
    let v = ct
        .metadata
        .get(key)
        .ok_or_else(|| Error::Model(format!("GGUF metadata has no {key}")))?;
    Ok(v.to_u32()? as usize)
}

/// `x += y · scale` (`scale` 1: `x += y`, as a llama adds its layers' outputs).
fn add_scaled(x: &mut [f32], y: &[f32], scale: f32) {
    match scale == 1.0 {
        true => x.iter_mut().zip(y).for_each(|(x, y)| *x += y),
        false => x.iter_mut().zip(y).for_each(|(x, y)| *x += y * scale),
    }
}

/// Logits divided by Granite's `logit_scale`, as llama.cpp does it (times its inverse).
fn divide(logits: &mut [f32], scale: f32) {
    if scale != 1.0 {
        let inverse = 1.0 / scale;
        logits.iter_mut().for_each(|v| *v *= inverse);
    }
}

/// Expert count of a mixture-of-experts llama GGUF (0 for a dense model).
pub(super) fn expert_count(ct: &gguf_file::Content, arch: Arch) -> usize {
    md_u32(ct, &arch.key("expert_count")).unwrap_or(0)
}

/// RMS norm of each row of `x` into `out`, as llama.cpp computes it: the squares (in f32)
/// summed in f64, `scale = 1/√(mean + ε)` in f32, then `(x · scale) · w`. llama.cpp sums in
/// one f64 chain; here 16 f64 lanes are added in a fixed tree, which rounds the same f32 mean
/// in practice (f64 carries 29 bits more) and lets the loop vectorise, with the same bits on
/// every CPU. Summing in f32 lanes instead moved SmolLM2's logits far enough from llama.cpp's
/// to flip a greedy token with a 0.42 margin: the activations are quantised to 8 bits after
/// the norm, so its last bits matter. (The f32 chain of candle's formula, used before, took
/// 0.3 ms of a 7 ms eight-sequence decode step, four cycles per element.)
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let mut acc = [0f64; 16];
        let chunks = xr.chunks_exact(16);
        for (a, v) in acc.iter_mut().zip(chunks.remainder()) {
            *a = (v * v) as f64;
        }
        for c in chunks {
            for (a, v) in acc.iter_mut().zip(c) {
                *a += (v * v) as f64;
            }
        }
        let mut width = 16;
        while width > 1 {
            width /= 2;
            for i in 0..width {
                acc[i] += acc[i + width];
            }
        }
        let mean = (acc[0] / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, v), a) in or.iter_mut().zip(xr).zip(w) {
            *o = v * scale * a;
        }
    }
}

/// The width of a llama GGUF's attention heads: `llama.attention.key_length` where the file
/// declares it (Mistral NeMo and Mistral Small 3 have heads of 128 in a hidden size of 5,120
/// over 32 heads), else the hidden size over the heads, as llama.cpp reads it. Values as wide
/// as the keys are what a llama has; other widths are refused.
pub(super) fn head_dim(
    ct: &gguf_file::Content,
    arch: Arch,
    hidden: usize,
    heads: usize,
) -> Result<usize> {
    let keys = md_u32(ct, &arch.key("attention.key_length")).unwrap_or(hidden / heads.max(1));
    match md_u32(ct, &arch.key("attention.value_length")).unwrap_or(keys) {
        values if values == keys => Ok(keys),
        values => Err(Error::Model(format!(
            "GGUF llama with keys of {keys} and values of {values} per head is not supported"
        ))),
    }
}

/// A rotary scaling: one divisor per rotary frequency that each angle is divided by (`None`:
/// none), and a factor every `cos` and `sin` is multiplied by (YaRN's; 1 for the others).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RotaryScaling {
    pub divisors: Option<Vec<f32>>,
    pub attention: f32,
}

/// YaRN's rotary scaling (transformers' `rope_type` "yarn", a GGUF's `rope.scaling.type`
/// "yarn": Qwen2.5's and Qwen3's long-context configurations, SmolLM3's): the frequencies
/// turning fewer than `beta_slow` times over the `original` context are divided by `factor`
/// (interpolated), those turning more than `beta_fast` times are kept (extrapolated), and
/// those between are mixed along a linear ramp over their dimensions, as transformers'
/// `_compute_yarn_parameters` and llama.cpp's `rope_yarn` compute them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Yarn {
    pub factor: f32,
    pub original: usize,
    pub beta_fast: f32,
    pub beta_slow: f32,
    /// llama.cpp's `yarn_ext_factor`, the share of the ramp applied (1, as the paper has it).
    pub ext: f32,
    /// transformers' `truncate`: the ramp's ends rounded out to whole dimensions (llama.cpp
    /// always rounds them).
    pub truncate: bool,
}

impl Yarn {
    /// The divisor of each of the `rope_dim / 2` frequencies of base `base`: `1 / ((1 − e) /
    /// factor + e)` for `e` the frequency's extrapolated share.
    pub(super) fn divisors(&self, rope_dim: usize, base: f32) -> Vec<f32> {
        use std::f32::consts::PI;
        let dim = |turns: f32| {
            rope_dim as f32 * (self.original as f32 / (turns * 2.0 * PI)).ln() / (2.0 * base.ln())
        };
        let (mut low, mut high) = (dim(self.beta_fast), dim(self.beta_slow));
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, high) = (low.max(0.0), high.min(rope_dim as f32 - 1.0));
        (0..rope_dim / 2)
            .map(|i| {
                let ramp = ((i as f32 - low) / (high - low).max(0.001)).clamp(0.0, 1.0);
                let e = (1.0 - ramp) * self.ext;
                1.0 / ((1.0 - e) / self.factor + e)
            })
            .collect()
    }
}

/// The YaRN paper's magnitude scale `0.1 · m · ln s + 1` (1 for `s ≤ 1`): transformers'
/// `yarn_get_mscale`, llama.cpp's `get_mscale`.
pub(super) fn yarn_mscale(s: f32, m: f32) -> f32 {
    match s <= 1.0 {
        true => 1.0,
        false => 0.1 * m * s.ln() + 1.0,
    }
}

/// The rotary scaling a llama GGUF declares ([`RotaryScaling`]), as llama.cpp reads it, for
/// heads that turn `rope_dim` dimensions at rotary base `base`:
/// - Llama 3.1 and later: `rope_freqs.weight`, the divisors llama.cpp's converter computes
///   from the model's llama3 `rope_scaling`;
/// - linear scaling (`llama.rope.scaling.type` "linear", or none given, with
///   `llama.rope.scaling.factor` or the older `llama.rope.scale_linear`): every angle divided
///   by the factor, on top of those;
/// - YaRN ("yarn", [`Yarn`]): `rope.scaling.factor`, `rope.scaling.original_context_length`
///   (the model's context where absent), `rope.scaling.yarn_beta_fast` / `yarn_beta_slow` /
///   `yarn_ext_factor` (32, 1 and 1 where absent), and every `cos` and `sin` times
///   `yarn_mscale(factor, 1)` (divided by `yarn_mscale(factor, yarn_log_multiplier)` where the
///   file has one, llama.cpp's reading of DeepSeek's `mscale_all_dim`) and
///   `rope.scaling.attn_factor`, as llama.cpp multiplies them;
/// - LongRoPE is [`LongRope`], not this; any other kind is refused by name.
pub(super) fn rotary_scaling<R: std::io::Seek + std::io::Read>(
    ct: &Gguf,
    arch: Arch,
    reader: &mut R,
    rope_dim: usize,
    base: f32,
) -> Result<RotaryScaling> {
    let frequencies = rope_dim / 2;
    let kind_key = arch.key("rope.scaling.type");
    let kind = ct
        .metadata
        .get(&kind_key)
        .and_then(|v| v.to_string().ok())
        .map_or("", String::as_str);
    let factor = ["rope.scaling.factor", "rope.scale_linear"]
        .iter()
        .find_map(|k| ct.metadata.get(&arch.key(k)).and_then(|v| v.to_f32().ok()));
    let long_rope = ct.tensor_infos.contains_key("rope_factors_long.weight");
    let number = |name: &str| -> Result<Option<f32>> {
        match ct.metadata.get(&arch.key(name)) {
            None => Ok(None),
            Some(v) => match v.to_f32() {
                Ok(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(Error::Model(format!(
                    "GGUF {} must be a number, it is {v:?}",
                    arch.key(name)
                ))),
            },
        }
    };
    let (mut linear, mut yarn) = (None, None);
    match (kind, factor) {
        ("" | "linear", Some(f)) if f > 0.0 && f.is_finite() => linear = Some(f),
        ("" | "linear" | "none", _) => {}
        ("longrope", _) if long_rope => {}
        ("yarn", Some(f)) if f >= 1.0 && f.is_finite() => {
            let original = match md_u32(ct, &arch.key("rope.scaling.original_context_length")) {
                Ok(o) => o,
                Err(_) => md_u32(ct, &arch.key("context_length"))?,
            };
            let y = Yarn {
                factor: f,
                original,
                beta_fast: number("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0),
                beta_slow: number("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0),
                ext: number("rope.scaling.yarn_ext_factor")?.unwrap_or(1.0),
                truncate: true,
            };
            if original == 0 || !(y.beta_fast > y.beta_slow && y.beta_slow > 0.0) {
                return Err(Error::Model(format!(
                    "GGUF YaRN needs a positive original context and yarn_beta_fast above \
                     yarn_beta_slow above 0, it has {original}, {} and {}",
                    y.beta_fast, y.beta_slow
                )));
            }
            yarn = Some(y);
        }
        ("yarn", _) => {
            return Err(Error::Model(format!(
                "GGUF YaRN needs {} of at least 1",
                arch.key("rope.scaling.factor")
            )));
        }
        (other, _) => {
            return Err(Error::Model(format!(
                "GGUF rotary scaling {other:?} ({kind_key}) is not supported; linear \
                 scaling, YaRN, Llama 3's rope_freqs and LongRoPE's rope_factors are"
            )));
        }
    }
    if long_rope && (linear.is_some() || ct.tensor_infos.contains_key("rope_freqs.weight")) {
        return Err(Error::Model(
            "GGUF with LongRoPE's rope_factors and another rotary scaling is not supported".into(),
        ));
    }
    let mut divisors = match ct.tensor_infos.contains_key("rope_freqs.weight") {
        false => None,
        true => {
            let t = ct.tensor(reader, "rope_freqs.weight", &Device::Cpu)?;
            let f = t
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if f.len() != frequencies || f.iter().any(|&x| !(x.is_finite() && x > 0.0)) {
                return Err(Error::Model(format!(
                    "GGUF rope_freqs.weight must hold {frequencies} positive factors (one per \
                     rotary frequency), it holds {} values",
                    f.len()
                )));
            }
            Some(f)
        }
    };
    if let Some(l) = linear.filter(|&l| l != 1.0) {
        let d = divisors.get_or_insert_with(|| vec![1.0; frequencies]);
        d.iter_mut().for_each(|x| *x *= l);
    }
    let mut attention = 1.0;
    if let Some(y) = yarn {
        let d = divisors.get_or_insert_with(|| vec![1.0; frequencies]);
        d.iter_mut()
            .zip(y.divisors(rope_dim, base))
            .for_each(|(x, y)| *x *= y);
        attention = match number("rope.scaling.yarn_log_multiplier")?.unwrap_or(0.0) {
            0.0 => yarn_mscale(y.factor, 1.0),
            m => yarn_mscale(y.factor, 1.0) / yarn_mscale(y.factor, m),
        } * number("rope.scaling.attn_factor")?.unwrap_or(1.0);
    }
    Ok(RotaryScaling {
        divisors,
        attention,
    })
}

/// The rotary `cos` and `sin` of position `pos`, one per frequency of `theta`, as
/// `quantized_llama::precomput_freqs_cis` tabulates them, each angle divided by its
/// frequency's divisor where the file declares a scaling (llama.cpp's order of operations).
/// Computed per pass rather than tabulated, so that the context is the model's (a table of
/// Llama 3.1's 131,072 positions would be 64 MB).
fn rotary(theta: &[f32], divisors: Option<&[f32]>, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
    for (i, t) in theta.iter().enumerate() {
        let a = match divisors {
            Some(f) => pos as f32 * t / f[i],
            None => pos as f32 * t,
        };
        cos[i] = a.cos();
        sin[i] = a.sin();
    }
}

/// Phi-3's long-context rotary (LongRoPE: Phi-3 mini and medium 128k, Phi-3.5 mini): the
/// angles of each frequency divided by its `short` factor at positions below the model's
/// `original` context and by its `long` factor from there on, and every `cos` and `sin` times
/// `attention`.
///
/// Which factors: transformers and vLLM choose per forward pass, long when its last position
/// passes the original context; kandle chooses by each row's own position, which is their
/// choice for every sequence within the original context and for every decode step past it (a
/// prompt longer than the original context has its first rows turned short here, long
/// there), and keeps a row's result independent of what else is in its pass (the prefix
/// cache's exactness). llama.cpp chooses once, by the context it runs at: long whenever that
/// passes the original, so its default full context turns even a short prompt long.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct LongRope {
    pub short: Vec<f32>,
    pub long: Vec<f32>,
    pub original: usize,
    pub attention: f32,
}

impl LongRope {
    /// The divisors of position `p`'s angles.
    pub(super) fn divisors(&self, p: usize) -> &[f32] {
        match p < self.original {
            true => &self.short,
            false => &self.long,
        }
    }

    /// The LongRoPE a GGUF declares (`rope_factors_short` and `rope_factors_long`, one factor
    /// per frequency; `rope.scaling.original_context_length`; `rope.scaling.attn_factor`, 1
    /// where absent, as llama.cpp reads them), `None` without the factors.
    pub(super) fn of<R: std::io::Seek + std::io::Read>(
        ct: &Gguf,
        arch: Arch,
        reader: &mut R,
        frequencies: usize,
    ) -> Result<Option<LongRope>> {
        if !ct.tensor_infos.contains_key("rope_factors_long.weight") {
            return Ok(None);
        }
        let mut factors = |name: &str| -> Result<Vec<f32>> {
            let t = ct.tensor(reader, name, &Device::Cpu)?;
            Ok(t.dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let (short, long) = (
            factors("rope_factors_short.weight")?,
            factors("rope_factors_long.weight")?,
        );
        let original = md_u32(ct, &arch.key("rope.scaling.original_context_length"))?;
        let attention = match ct.metadata.get(&arch.key("rope.scaling.attn_factor")) {
            Some(v) => v.to_f32()?,
            None => 1.0,
        };
        LongRope::checked(
            short,
            long,
            original,
            attention,
            frequencies,
            |name| match name {
                "short" => "GGUF rope_factors_short".into(),
                "long" => "GGUF rope_factors_long".into(),
                "original" => format!("GGUF {}", arch.key("rope.scaling.original_context_length")),
                _ => format!("GGUF {}", arch.key("rope.scaling.attn_factor")),
            },
        )
        .map(Some)
    }

    /// A LongRoPE of these values, each checked: `frequencies` positive factors each, a
    /// positive original context and attention factor; `what` names the value refused
    /// (`short`, `long`, `original`, `attention`) as the model declares it.
    pub(super) fn checked(
        short: Vec<f32>,
        long: Vec<f32>,
        original: usize,
        attention: f32,
        frequencies: usize,
        what: impl Fn(&str) -> String,
    ) -> Result<LongRope> {
        for (name, f) in [("short", &short), ("long", &long)] {
            if f.len() != frequencies || f.iter().any(|&x| !(x.is_finite() && x > 0.0)) {
                return Err(Error::Model(format!(
                    "{} must hold {frequencies} positive factors (one per rotary frequency), \
                     it holds {} values",
                    what(name),
                    f.len()
                )));
            }
        }
        if original == 0 {
            return Err(Error::Model(format!(
                "{} must be positive",
                what("original")
            )));
        }
        if !(attention.is_finite() && attention > 0.0) {
            return Err(Error::Model(format!(
                "{} must be a positive number, it is {attention}",
                what("attention")
            )));
        }
        Ok(LongRope {
            short,
            long,
            original,
            attention,
        })
    }
}

/// The pool the forward pass runs in: its matmuls split their rows across these threads, and
/// the pass itself runs on one of them, so that a step hands work over without waking the
/// calling thread for every product. As many threads as rayon's global pool
/// (`RAYON_NUM_THREADS`, set from `--threads`).
fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("kandle-llama-{i}"))
            .build()
            .expect("starting the model's threads")
    })
}

impl Weights {
    /// Reads a dense llama GGUF (the tensor names `quantized_llama` reads), for sequences of
    /// up to `max_positions` tokens.
    pub(super) fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &Gguf,
        arch: Arch,
        reader: &mut R,
        max_positions: usize,
    ) -> Result<Self> {
        let device = &Device::Cpu;
        let key = |name: &str| arch.key(name);
        let n_head = md_u32(ct, &key("attention.head_count"))?;
        let n_kv_head = md_u32(ct, &key("attention.head_count_kv")).unwrap_or(n_head);
        let block_count = md_u32(ct, &key("block_count"))?;
        let hidden = md_u32(ct, &key("embedding_length"))?;
        let eps = ct
            .metadata
            .get(&key("attention.layer_norm_rms_epsilon"))
            .ok_or_else(|| Error::Model("GGUF metadata has no rms epsilon".into()))?
            .to_f32()? as f64;
        let freq_base = ct
            .metadata
            .get(&key("rope.freq_base"))
            .and_then(|m| m.to_f32().ok())
            .unwrap_or(10000f32);
        let head_dim = head_dim(ct, arch, hidden, n_head)?;
        // llama.cpp's default where a file leaves it out: the whole head.
        // The rotary may turn only the first `rope_dim` of each head's dimensions (Phi-4-mini's
        // three quarters), the rest passing through, as llama.cpp turns `n_rot` of them.
        let rope_dim = md_u32(ct, &key("rope.dimension_count")).unwrap_or(head_dim);
        let partial_ok = rope_dim > 0 && rope_dim <= head_dim && rope_dim.is_multiple_of(2);
        if !partial_ok || n_kv_head == 0 || n_head % n_kv_head != 0 {
            return Err(Error::Model(format!(
                "unsupported llama shape: {n_head} heads, {n_kv_head} kv heads, head dim \
                 {head_dim}, rope dim {rope_dim}"
            )));
        }
        // The frequencies as `quantized_llama::precomput_freqs_cis` computes them.
        let frequencies = |base: f32| -> Vec<f32> {
            (0..rope_dim)
                .step_by(2)
                .map(|i| 1f32 / base.powf(i as f32 / rope_dim as f32))
                .collect()
        };
        let theta = frequencies(freq_base);
        let RotaryScaling {
            divisors,
            attention: rope_attention,
        } = rotary_scaling(ct, arch, reader, rope_dim, freq_base)?;
        let long_rope = LongRope::of(ct, arch, reader, theta.len())?;

        let tensor =
            |name: &str, reader: &mut R| -> Result<_> { Ok(ct.tensor(reader, name, device)?) };
        let qmat = |name: &str, reader: &mut R| QMat::from_qtensor(tensor(name, reader)?);
        let vector = |name: &str, reader: &mut R| -> Result<Vec<f32>> {
            Ok(tensor(name, reader)?
                .dequantize(device)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let embeddings = match qmat("token_embd.weight", reader)? {
            m @ QMat::Own { .. } => Embeddings::Quantised(m),
            _ => Embeddings::Dense(vector("token_embd.weight", reader)?),
        };
        let norm = vector("output_norm.weight", reader)?;
        let output = match ct.tensor(reader, "output.weight", device) {
            Ok(t) => Some(QMat::from_qtensor(t)?),
            // Tied: the quantised embeddings serve as the head, or candle's kernel for a type
            // without ours.
            Err(_) => match &embeddings {
                Embeddings::Quantised(_) => None,
                Embeddings::Dense(_) => Some(qmat("token_embd.weight", reader)?),
            },
        };
        let gemma = Gemma::of(ct, arch, block_count)?;
        let local_theta = gemma.local_base.map(frequencies);
        let mut layers = Vec::with_capacity(block_count);
        let q_dim = n_head * head_dim;
        let kv_dim = n_kv_head * head_dim;
        for i in 0..block_count {
            let p = format!("blk.{i}");
            let w = |name: &str, reader: &mut R| qmat(&format!("{p}.{name}.weight"), reader);
            let t = |name: &str, reader: &mut R| tensor(&format!("{p}.{name}.weight"), reader);
            let has = |name: &str| ct.tensor_infos.contains_key(&format!("{p}.{name}"));
            // Phi-3's fused products are the stacks the others are joined into.
            let qkv = match has("attn_qkv.weight") {
                true => vec![t("attn_qkv", reader)?],
                false => vec![
                    t("attn_q", reader)?,
                    t("attn_k", reader)?,
                    t("attn_v", reader)?,
                ],
            };
            let mlp = match Experts::of(ct, arch, reader, &p)? {
                Some(x) => Mlp::Experts(x),
                None => Mlp::Dense {
                    gate_up: QMat::from_qtensors(match has("ffn_gate.weight") {
                        true => vec![t("ffn_gate", reader)?, t("ffn_up", reader)?],
                        false => vec![t("ffn_up", reader)?],
                    })?,
                    down: w("ffn_down", reader)?,
                },
            };
            // Q, K and V biases side by side (Qwen2's), zeros for any the file leaves out.
            let mut qkv_bias: Option<Vec<f32>> = None;
            let parts = [("attn_q", 0, q_dim), ("attn_k", q_dim, kv_dim)];
            for (name, at, width) in parts
                .into_iter()
                .chain([("attn_v", q_dim + kv_dim, kv_dim)])
            {
                if !has(&format!("{name}.bias")) {
                    continue;
                }
                let b = vector(&format!("{p}.{name}.bias"), reader)?;
                if b.len() != width {
                    return Err(Error::Model(format!(
                        "GGUF {p}.{name}.bias holds {} values, not {width}",
                        b.len()
                    )));
                }
                let all = qkv_bias.get_or_insert_with(|| vec![0.0; q_dim + 2 * kv_dim]);
                all[at..at + width].copy_from_slice(&b);
            }
            let qk_norm = match (has("attn_q_norm.weight"), has("attn_k_norm.weight")) {
                (false, false) => None,
                (true, true) => {
                    let q = vector(&format!("{p}.attn_q_norm.weight"), reader)?;
                    let k = vector(&format!("{p}.attn_k_norm.weight"), reader)?;
                    if q.len() != head_dim || k.len() != head_dim {
                        return Err(Error::Model(format!(
                            "GGUF {p}.attn_q_norm and attn_k_norm must hold {head_dim} values \
                             (one head), they hold {} and {}",
                            q.len(),
                            k.len()
                        )));
                    }
                    Some((q, k))
                }
                _ => {
                    return Err(Error::Model(format!(
                        "GGUF {p} has a norm of the queries or of the keys but not both"
                    )));
                }
            };
            let post_norms = match (
                has("post_attention_norm.weight"),
                has("post_ffw_norm.weight"),
            ) {
                (false, false) => None,
                (true, true) => Some((
                    vector(&format!("{p}.post_attention_norm.weight"), reader)?,
                    vector(&format!("{p}.post_ffw_norm.weight"), reader)?,
                )),
                _ => {
                    return Err(Error::Model(format!(
                        "GGUF {p} has a norm of the attention's output or of the MLP's but not \
                         both"
                    )));
                }
            };
            let qkv = QMat::from_qtensors(qkv)?;
            let gate_ups: Vec<&QMat> = match &mlp {
                Mlp::Dense { gate_up, .. } => vec![gate_up],
                Mlp::Experts(x) => x.experts.iter().map(|(gu, _)| gu).collect(),
            };
            let odd = (gate_ups.iter().map(|m| m.n())).find(|n| !n.is_multiple_of(2));
            if qkv.n() != q_dim + 2 * kv_dim || odd.is_some() {
                return Err(Error::Model(format!(
                    "GGUF {p}: Q, K and V have {} rows (not {}), or gate and up an odd {}",
                    qkv.n(),
                    q_dim + 2 * kv_dim,
                    odd.unwrap_or(0)
                )));
            }
            layers.push(Layer {
                qkv,
                qkv_bias,
                qk_norm,
                rotates: arch.rotates_layer(i),
                window: gemma.windows[i],
                wo: w("attn_output", reader)?,
                mlp,
                attn_norm: vector(&format!("{p}.attn_norm.weight"), reader)?,
                ffn_norm: vector(&format!("{p}.ffn_norm.weight"), reader)?,
                post_norms,
            });
        }
        Ok(Weights {
            embeddings,
            hidden,
            layers,
            norm,
            eps: eps as f32,
            output,
            n_head,
            n_kv_head,
            head_dim,
            rotates_halves: arch.rotates_halves(),
            scales: Scales::of(ct, arch)?,
            attention_cap: gemma.attention_cap,
            logit_cap: gemma.logit_cap,
            gelu: gemma.gelu,
            theta,
            divisors,
            rope_attention,
            temperature: Temperature::of(ct, arch)?,
            local_theta,
            long_rope,
            max_positions,
            passes: Default::default(),
        })
    }

    /// Forward passes run so far.
    pub(super) fn passes(&self) -> u64 {
        self.passes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The shape of this model's [`KvCache`]s.
    fn kv_shape(&self) -> KvShape {
        let mut shape = KvShape::dense(self.layers.len(), self.n_kv_head, self.head_dim);
        if self.layers.len() <= 128 {
            for (i, layer) in self.layers.iter().enumerate() {
                if let Some(w) = layer.window {
                    shape.windowed |= 1 << i;
                    shape.window = shape.window.max(w);
                }
            }
        }
        shape
    }

    /// An empty cache for a new sequence.
    pub(super) fn new_cache(&self) -> KvCache {
        KvCache::new(self.kv_shape())
    }

    fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    /// The bytes of keys and values one position takes in a [`KvCache`] (f16, every layer).
    pub(super) fn cache_bytes_per_token(&self) -> usize {
        self.kv_shape().per_position() * std::mem::size_of::<f16>()
    }

    /// What a sequence's cache holds as it grows: its windowed layers' store at most
    /// [`KvShape::most_kept`] positions.
    pub(super) fn cache_cost(&self) -> super::CacheCost {
        let shape = self.kv_shape();
        let bytes = |local| shape.per_position_of(local) * std::mem::size_of::<f16>();
        super::CacheCost::windowed(bytes(false), bytes(true), shape.most_kept())
    }

    /// A copy of the first `len` positions of `cache`; `None` when it holds fewer.
    pub(super) fn cache_prefix(&self, cache: &KvCache, len: usize) -> Option<KvCache> {
        cache.prefix(len)
    }

    /// Appends each item's tokens to its cache and returns the logits at each item's last
    /// token. All items go through the weight matmuls together; on failure every cache is
    /// left as it was.
    pub(super) fn forward(&self, items: &mut [(&mut KvCache, &[u32])]) -> Result<Vec<Vec<f32>>> {
        self.forward_with(items, None)
    }

    /// Appends `tokens` to `cache` as [`Weights::forward`] does, in one pass, and hands
    /// `each` the logits after every one of them, in order (a prompt's log-probabilities).
    /// The head runs over [`EVERY_ROW_BLOCK`] rows at a time, so that a long prompt's logits
    /// are never all held at once (2,048 rows of SmolLM2's would be 400 MB).
    pub(super) fn forward_each(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        each: &mut super::EachRow<'_>,
    ) -> Result<()> {
        self.forward_with(&mut [(cache, tokens)], Some(each))
            .map(|_| ())
    }

    /// [`Weights::forward`], or with `every` (one item) [`Weights::forward_each`].
    fn forward_with(
        &self,
        items: &mut [(&mut KvCache, &[u32])],
        every: Option<&mut super::EachRow<'_>>,
    ) -> Result<Vec<Vec<f32>>> {
        assert!(
            every.is_none() || items.len() == 1,
            "every row's logits of one item"
        );
        for (cache, tokens) in items.iter() {
            if tokens.is_empty() {
                return Err(Error::InvalidRequest("no tokens to feed".into()));
            }
            if cache.len + tokens.len() > self.max_positions {
                return Err(Error::InvalidRequest(format!(
                    "the sequence would exceed {} tokens",
                    self.max_positions
                )));
            }
        }
        let before: Vec<usize> = items.iter().map(|(c, _)| c.len).collect();
        for (cache, tokens) in items.iter_mut() {
            cache.reserve(cache.len + tokens.len());
        }
        self.passes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out = pool().install(|| self.forward_inner(items, every));
        match out {
            Ok(logits) => {
                for (cache, tokens) in items.iter_mut() {
                    cache.len += tokens.len();
                    cache.forget_outside_window();
                }
                Ok(logits)
            }
            Err(e) => {
                for ((cache, _), len) in items.iter_mut().zip(before) {
                    cache.truncate(len);
                }
                Err(e)
            }
        }
    }

    fn forward_inner(
        &self,
        items: &mut [(&mut KvCache, &[u32])],
        every: Option<&mut super::EachRow<'_>>,
    ) -> Result<Vec<Vec<f32>>> {
        let hidden = self.hidden;
        let ids: Vec<u32> = items.iter().flat_map(|(_, t)| t.iter().copied()).collect();
        let rows = ids.len();
        let q_dim = self.n_head * self.head_dim;
        let kv_dim = self.kv_dim();
        let qkv_dim = q_dim + 2 * kv_dim;
        let mut x = vec![0f32; rows * hidden];
        for (id, row) in ids.iter().zip(x.chunks_exact_mut(hidden)) {
            self.embed(*id as usize, row)?;
        }
        let Scales {
            embedding,
            residual,
            attention,
            logit,
        } = self.scales;
        if embedding != 1.0 {
            x.iter_mut().for_each(|v| *v *= embedding);
        }
        // The kernels scale the scores by 1/√head_dim: another scale is the queries'.
        let q_scale = attention.map(|a| a * (self.head_dim as f32).sqrt());
        let mut h = vec![0f32; rows * hidden];
        let mut q = vec![0f32; rows * q_dim];
        let mut y = vec![0f32; rows * q_dim];
        // Each row's rotary `cos` and `sin`, for its position, once for every layer (and for
        // the windowed layers where they turn by their own frequencies).
        let half = self.theta.len();
        let positions: Vec<usize> = items
            .iter()
            .flat_map(|(cache, tokens)| cache.len..cache.len + tokens.len())
            .collect();
        // `scaled`: with the model's scaling (the windowed layers' own frequencies have none).
        let table = |theta: &[f32], scaled: bool| {
            let (mut cos, mut sin) = (vec![0f32; rows * half], vec![0f32; rows * half]);
            let rows = cos.chunks_exact_mut(half).zip(sin.chunks_exact_mut(half));
            for (&p, (c, s)) in positions.iter().zip(rows) {
                // The divisors and the factor every cos and sin is multiplied by (LongRoPE's
                // attention factor, YaRN's magnitude scale).
                let (divisors, attention) = match (&self.long_rope, scaled) {
                    (Some(l), true) => (Some(l.divisors(p)), l.attention),
                    (None, true) => (self.divisors.as_deref(), self.rope_attention),
                    (_, false) => (None, 1.0),
                };
                rotary(theta, divisors, p, c, s);
                if attention != 1.0 {
                    (c.iter_mut().chain(s.iter_mut())).for_each(|v| *v *= attention);
                }
            }
            (cos, sin)
        };
        let global = table(&self.theta, true);
        let local = self.local_theta.as_deref().map(|t| table(t, false));
        for (li, layer) in self.layers.iter().enumerate() {
            let (cos, sin) = match (&local, layer.window) {
                (Some(local), Some(_)) => local,
                _ => &global,
            };
            rms_norm(&x, &layer.attn_norm, self.eps, &mut h);
            let qkv = {
                let mut qkv = layer.qkv.forward(&h, rows)?;
                if let Some(bias) = &layer.qkv_bias {
                    for row in qkv.chunks_exact_mut(qkv_dim) {
                        row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
                    }
                }
                qkv
            };
            // Rotary embedding of the new rows; their keys and values join the caches, the
            // sequences in parallel (a decode step's writes land on cache lines that the weight
            // stream has evicted since the last step: at 8 sequences this took ~0.4 ms of a
            // ~7 ms step on one thread).
            {
                let mut jobs = Vec::with_capacity(items.len());
                let (mut rest, mut row) = (&mut q[..], 0);
                for (cache, tokens) in items.iter_mut() {
                    let (qi, more) = rest.split_at_mut(tokens.len() * q_dim);
                    rest = more;
                    jobs.push((&mut **cache, tokens.len(), qi, row));
                    row += tokens.len();
                }
                jobs.par_iter_mut().for_each(|(cache, n, qi, row0)| {
                    let pos0 = cache.len;
                    let mut key = vec![0f32; kv_dim];
                    for t in 0..*n {
                        let row = *row0 + t;
                        let r = &qkv[row * qkv_dim..][..qkv_dim];
                        let rot = (&cos[row * half..][..half], &sin[row * half..][..half]);
                        let qr = &mut qi[t * q_dim..][..q_dim];
                        let (q_in, k_in) = (&r[..q_dim], &r[q_dim..q_dim + kv_dim]);
                        match &layer.qk_norm {
                            // Each head RMS-normed (as the model's norms are), then turned.
                            Some((qn, kn)) => {
                                rms_norm(q_in, qn, self.eps, qr);
                                rms_norm(k_in, kn, self.eps, &mut key);
                            }
                            None => {
                                qr.copy_from_slice(q_in);
                                key.copy_from_slice(k_in);
                            }
                        }
                        if layer.rotates {
                            self.rope(qr, rot);
                            self.rope(&mut key, rot);
                        }
                        if let Some(f) = q_scale {
                            qr.iter_mut().for_each(|v| *v *= f);
                        }
                        if let Some(temp) = &self.temperature {
                            let f = temp.at(pos0 + t);
                            qr.iter_mut().for_each(|v| *v *= f);
                        }
                        cache.write(li, pos0 + t, &key, &r[q_dim + kv_dim..]);
                    }
                });
            }
            // Attention: each new row attends to its sequence's cache up to its own position
            // (a prompt's rows are causal by construction), all rows in the tasks below.
            let mut views: Vec<(&KvCache, usize)> = Vec::with_capacity(rows);
            for (cache, tokens) in items.iter() {
                views.extend((0..tokens.len()).map(|t| (&**cache, cache.len + t + 1)));
            }
            // Tasks of (row, kv head, chunk of positions): the query heads sharing a kv head
            // read its cached keys and values once, and a long cache is split across threads.
            let (n_kv, group) = (self.n_kv_head, q_dim / self.n_kv_head);
            let n_rep = self.n_head / self.n_kv_head;
            let hd = self.head_dim;
            // Tasks in (row, kv head) order; `groups[r * n_kv + g]`: that pair's tasks.
            // A sliding window's row reads the chunks that hold its window's positions.
            let mut tasks = Vec::new();
            let mut groups = Vec::with_capacity(rows * n_kv);
            for (r, &(_, len)) in views.iter().enumerate() {
                let from = layer.window.map_or(0, |w| len.saturating_sub(w));
                for g in 0..n_kv {
                    let first = tasks.len();
                    for (c, span) in chunk_spans(len, from, self.attention_cap) {
                        tasks.push((r, g, c, span));
                    }
                    groups.push(first..tasks.len());
                }
            }
            let stride = n_rep * (2 + hd);
            let mut parts = vec![0f32; tasks.len() * stride];
            parts
                .par_chunks_mut(stride)
                .zip(&tasks)
                .for_each(|(part, &(r, g, c, span))| {
                    let cache = views[r].0;
                    let (kc, vc) = (cache.run(c, li, false, g), cache.run(c, li, true, g));
                    let qg = &q[r * q_dim + g * group..][..group];
                    match hd {
                        64 => attend_part::<64>(qg, 0, kc, vc, hd, span, part),
                        // Phi-3 mini's heads.
                        96 => attend_part::<96>(qg, 0, kc, vc, hd, span, part),
                        128 => attend_part::<128>(qg, 0, kc, vc, hd, span, part),
                        // Gemma 2 2B's and 9B's.
                        256 => attend_part::<256>(qg, 0, kc, vc, hd, span, part),
                        _ => attend_dyn(qg, kc, vc, hd, span, part),
                    }
                });
            y.par_chunks_mut(group).zip(&groups).for_each(|(out, ts)| {
                merge_parts(&parts[ts.start * stride..ts.end * stride], n_rep, hd, out);
            });
            let (post_attention, post_mlp) = layer.post_norms.as_ref().map(|(a, m)| (a, m)).unzip();
            let o = self.post_norm(layer.wo.forward(&y, rows)?, post_attention);
            add_scaled(&mut x, &o, residual);
            rms_norm(&x, &layer.ffn_norm, self.eps, &mut h);
            let gate = if self.gelu { gelu_mul } else { silu_mul };
            let down = match &layer.mlp {
                Mlp::Dense { gate_up, down } => {
                    let gu = gate_up.forward(&h, rows)?;
                    let ff = gu.len() / rows / 2;
                    let mut act = vec![0f32; rows * ff];
                    for (a, r) in act.chunks_exact_mut(ff).zip(gu.chunks_exact(2 * ff)) {
                        gate(&r[..ff], &r[ff..], a);
                    }
                    down.forward(&act, rows)?
                }
                Mlp::Experts(x) => x.forward(&h, rows, gate)?,
            };
            let down = self.post_norm(down, post_mlp);
            add_scaled(&mut x, &down, residual);
        }
        let head = match (&self.output, &self.embeddings) {
            (Some(head), _) => head,
            (None, Embeddings::Quantised(e)) => e,
            (None, Embeddings::Dense(_)) => unreachable!("a dense embedding has its own head"),
        };
        if let Some(each) = every {
            // Every row through the head, a block at a time.
            let mut normed = vec![0f32; EVERY_ROW_BLOCK.min(rows) * hidden];
            for block in x.chunks(EVERY_ROW_BLOCK * hidden) {
                let n = block.len() / hidden;
                rms_norm(block, &self.norm, self.eps, &mut normed[..block.len()]);
                let mut logits = head.forward(&normed[..block.len()], n)?;
                divide(&mut logits, logit);
                cap_scores(&mut logits, self.logit_cap);
                for row in logits.chunks_exact(head.n()) {
                    each(row);
                }
            }
            return Ok(Vec::new());
        }
        // The head runs on each item's last row only.
        let mut last = Vec::with_capacity(items.len() * hidden);
        let mut row = 0;
        for (_, tokens) in items.iter() {
            row += tokens.len();
            last.extend_from_slice(&x[(row - 1) * hidden..row * hidden]);
        }
        let mut normed = vec![0f32; last.len()];
        rms_norm(&last, &self.norm, self.eps, &mut normed);
        let mut logits = head.forward(&normed, items.len())?;
        divide(&mut logits, logit);
        cap_scores(&mut logits, self.logit_cap);
        // One sequence takes the buffer as it is; several split it in parallel.
        Ok(if items.len() == 1 {
            vec![logits]
        } else {
            logits.par_chunks(head.n()).map(<[f32]>::to_vec).collect()
        })
    }

    /// Rows `y` RMS-normed with `norm` where given (Gemma 2's norms of the attention's and
    /// the MLP's outputs), else as they are.
    fn post_norm(&self, y: Vec<f32>, norm: Option<&Vec<f32>>) -> Vec<f32> {
        match norm {
            None => y,
            Some(w) => {
                let mut out = vec![0f32; y.len()];
                rms_norm(&y, w, self.eps, &mut out);
                out
            }
        }
    }

    /// Token `id`'s embedding into `out`.
    fn embed(&self, id: usize, out: &mut [f32]) -> Result<()> {
        let vocab = match &self.embeddings {
            Embeddings::Quantised(m) => m.n(),
            Embeddings::Dense(d) => d.len() / self.hidden,
        };
        if id >= vocab {
            return Err(Error::InvalidRequest(format!(
                "token id {id} is outside the vocabulary ({vocab})"
            )));
        }
        match &self.embeddings {
            Embeddings::Quantised(m) => {
                m.dequantize_row(id, out);
            }
            Embeddings::Dense(d) => {
                out.copy_from_slice(&d[id * self.hidden..(id + 1) * self.hidden]);
            }
        }
        Ok(())
    }

    /// The rotary embedding of every head in `x` by the `cos` and `sin` of its position
    /// ([`rotary`]): frequency `i` turns dimensions `2i` and `2i + 1` (llama.cpp's
    /// `rope`), or `i` and `i + rope_dim / 2` ([`Arch::rotates_halves`], its `rope_neox`),
    /// for the first `rope_dim` (twice the frequencies) of each head's dimensions; the others
    /// pass through.
    fn rope(&self, x: &mut [f32], (cos, sin): (&[f32], &[f32])) {
        let half = cos.len();
        let (step, apart) = match self.rotates_halves {
            true => (1, half),
            false => (2, 1),
        };
        for head in x.chunks_exact_mut(self.head_dim) {
            for i in 0..half {
                let (j, k) = (step * i, step * i + apart);
                let (a, b) = (head[j], head[k]);
                head[j] = a * cos[i] - b * sin[i];
                head[k] = a * sin[i] + b * cos[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::kernels::key_at;
    use super::*;

    /// A value for (position, layer, index) that f16 holds exactly.
    fn mark(p: usize, li: usize, j: usize) -> f32 {
        ((p * 7 + li * 131 + j * 3) % 2048) as f32 - 1024.0
    }

    /// Writes position `p` of every layer as the forward pass does, with [`mark`]s.
    fn write(c: &mut KvCache, p: usize, bias: usize) {
        let kv_dim = c.shape.heads * c.shape.hd;
        c.reserve(p + 1);
        for li in 0..c.shape.layers {
            let key: Vec<f32> = (0..kv_dim).map(|j| mark(p + bias, li, j)).collect();
            let value: Vec<f32> = key.iter().map(|k| -k).collect();
            c.write(li, p, &key, &value);
        }
        c.len = p + 1;
    }

    /// Position `p` of every layer holds the marks written with `bias`: value `j` (of head
    /// `j / hd`) in that head's runs of `p`'s chunk.
    fn holds(c: &KvCache, p: usize, bias: usize) -> bool {
        holds_in(c, 0..c.shape.layers, p, bias)
    }

    /// [`holds`] in the layers `layers`.
    fn holds_in(
        c: &KvCache,
        mut layers: impl Iterator<Item = usize>,
        p: usize,
        bias: usize,
    ) -> bool {
        let KvShape { heads, hd, .. } = c.shape;
        let (chunk, at) = (p / ATTEND_CHUNK, p % ATTEND_CHUNK);
        layers.all(|li| {
            (0..heads * hd).all(|j| {
                let (g, d) = (j / hd, j % hd);
                let (kc, vc) = (c.run(chunk, li, false, g), c.run(chunk, li, true, g));
                kc[key_at(at, d, hd)].to_f32() == mark(p + bias, li, j)
                    && vc[at * hd + d].to_f32() == -mark(p + bias, li, j)
            })
        })
    }

    /// A cache that grows keeps every position it held: its first chunk doubles from 16
    /// positions to a whole chunk, and later chunks come whole and never move; a prefix copy
    /// holds the first positions and shares their chunks until written; a cut-back cache
    /// takes new positions in place.
    #[test]
    fn the_kv_cache_keeps_its_positions_as_it_grows_is_copied_and_cut() {
        let mut c = KvCache::new(KvShape::dense(4, 4, 64));
        let (mut first_caps, mut later) = (Vec::new(), Vec::new());
        for p in 0..300 {
            write(&mut c, p, 0);
            assert!((0..=p).all(|q| holds(&c, q, 0)), "position {p}: all kept");
            if first_caps.last() != Some(&c.chunks[0].cap) {
                first_caps.push(c.chunks[0].cap);
            }
            let now: Vec<*const f16> = c.chunks[1..].iter().map(|b| b.data.as_ptr()).collect();
            assert!(now.starts_with(&later), "position {p}: a whole chunk moved");
            later = now;
        }
        assert_eq!(first_caps, [16, 32, 64, ATTEND_CHUNK]);
        assert_eq!(c.chunks.len(), 300usize.div_ceil(ATTEND_CHUNK));
        assert!(c.chunks.iter().all(|k| k.cap == ATTEND_CHUNK));
        let mut short = KvCache::new(c.shape);
        short.reserve(1);
        assert_eq!(
            short.room(),
            16,
            "a short sequence holds 16 positions, not a chunk"
        );
        short.reserve(200);
        assert_eq!(short.room(), 2 * ATTEND_CHUNK);
        let held: Vec<usize> = short.blocks().iter().map(|b| b.1).collect();
        assert_eq!(held, [ATTEND_CHUNK; 2], "the blocks are the chunks");

        let copy = c.prefix(37).expect("a shorter prefix");
        assert!(c.prefix(301).is_none(), "no prefix past the end");
        assert_eq!((copy.len(), copy.chunks.len()), (37, 1));
        // Shared chunks, as the prefix cache counts them.
        let shared = |a: &KvCache, b: &KvCache, i: usize| a.blocks()[i] == b.blocks()[i];
        assert!(shared(&copy, &c, 0), "the copy shares the chunk");
        let long = c.prefix(ATTEND_CHUNK + 1).expect("a longer prefix");
        assert_eq!(long.chunks.len(), 2);
        assert!((0..=ATTEND_CHUNK).all(|p| holds(&long, p, 0)));
        c.truncate(20);
        for p in 20..40 {
            write(&mut c, p, 1);
        }
        assert!((0..20).all(|p| holds(&c, p, 0)), "kept before the cut");
        assert!((20..40).all(|p| holds(&c, p, 1)), "new after the cut");
        assert!((0..37).all(|p| holds(&copy, p, 0)), "the copy is its own");
        assert!(!shared(&copy, &c, 0), "written: no longer shared");
        assert!(shared(&long, &c, 1), "a chunk neither wrote stays shared");

        // A short prefix copy grows its own first chunk and leaves the original's alone.
        let mut small = KvCache::new(c.shape);
        for p in 0..10 {
            write(&mut small, p, 2);
        }
        let mut grown = small.prefix(10).expect("a prefix");
        for p in 10..50 {
            write(&mut grown, p, 2);
        }
        assert_eq!((small.chunks[0].cap, grown.chunks[0].cap), (16, 64));
        assert!((0..50).all(|p| holds(&grown, p, 2)));
        assert!((0..10).all(|p| holds(&small, p, 2)));
    }

    /// The windowed layers (here the second and fourth of four, a window of 40) keep their
    /// stores while a position to come can see them, and one chunk more; the other layers
    /// keep everything. A prefix copy a chunk shorter still has its window; one further back,
    /// whose window has been let go, is refused. A model without windows keeps one store.
    #[test]
    fn the_windowed_layers_let_go_of_what_no_position_to_come_sees() {
        let mut shape = KvShape::dense(4, 2, 16);
        (shape.windowed, shape.window) = (0b1010, 40);
        assert_eq!(
            (0..4).map(|li| shape.slot(li)).collect::<Vec<_>>(),
            [(false, 0), (true, 0), (false, 1), (true, 1)]
        );
        assert_eq!(shape.per_position_of(true), 2 * 2 * 2 * 16);
        let (full, windowed) = ([0, 2].into_iter(), [1, 3].into_iter());
        let mut c = KvCache::new(shape);
        let local = |c: &KvCache| {
            (c.chunks.iter())
                .filter(|k| k.local.is_some())
                .map(|k| k.cap)
                .sum::<usize>()
        };
        let mut most = 0;
        for p in 0..700 {
            write(&mut c, p, 0);
            most = most.max(local(&c));
            c.forget_outside_window();
            assert!(
                (0..=p).all(|q| holds_in(&c, full.clone(), q, 0)),
                "position {p}: the other layers keep all"
            );
            // Position p + 1 sees p + 2 − 40 on.
            let seen = (p + 2).saturating_sub(40);
            assert!((seen..=p).all(|q| holds_in(&c, windowed.clone(), q, 0)));
            let kept = c.chunks.iter().filter(|k| k.local.is_some()).count();
            let unseen = seen / ATTEND_CHUNK;
            assert_eq!(c.forgotten, unseen.saturating_sub(1), "position {p}");
            assert_eq!(kept, c.chunks.len() - c.forgotten, "position {p}");
        }
        assert_eq!((c.chunks.len(), c.forgotten), (6, 4));
        // What the batch token budget counts: the most the windowed layers held, at most.
        assert!(most <= shape.most_kept(), "{most} {}", shape.most_kept());
        assert_eq!(shape.most_kept(), 3 * ATTEND_CHUNK);
        // What the prefix cache counts: half of each chunk's positions (two layers of four
        // windowed) for the chunks let go, all of them for the others.
        let counted: usize = c.blocks().iter().map(|b| b.1).sum();
        assert_eq!(counted, 6 * ATTEND_CHUNK - 4 * ATTEND_CHUNK / 2);

        let copy = c.prefix(600).expect("a chunk shorter: its window is kept");
        assert!((561..600).all(|q| holds_in(&copy, windowed.clone(), q, 0)));
        assert!(c.prefix(500).is_none(), "its window has been let go");
        let mut copy = copy;
        for p in 600..640 {
            write(&mut copy, p, 1);
            copy.forget_outside_window();
        }
        assert!((601..640).all(|q| holds_in(&copy, windowed.clone(), q, 1)));
        assert!(
            (600..700).all(|q| holds(&c, q, 0)),
            "the original is its own"
        );

        let mut dense = KvCache::new(KvShape::dense(4, 2, 16));
        for p in 0..700 {
            write(&mut dense, p, 0);
            dense.forget_outside_window();
        }
        assert!(dense.chunks.iter().all(|k| k.local.is_none()) && dense.forgotten == 0);
        assert!((0..700).all(|q| holds(&dense, q, 0)));
    }

    /// Rows of several lengths (a remainder past the 16 lanes, none, fewer than 16) against
    /// the formula in f64, and each row independent of the others.
    #[test]
    fn rms_norm_matches_the_formula_row_by_row() {
        for n in [7, 16, 576, 579] {
            let x: Vec<f32> = (0..3 * n)
                .map(|i| ((i * 7919 % 211) as f32 - 105.0) / 37.0)
                .collect();
            let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 13) as f32 / 10.0).collect();
            let eps = 1e-5;
            let mut out = vec![0f32; 3 * n];
            rms_norm(&x, &w, eps, &mut out);
            for (r, (xr, or)) in x.chunks(n).zip(out.chunks(n)).enumerate() {
                let ms = xr.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n as f64;
                let scale = 1.0 / (ms + eps as f64).sqrt();
                for ((v, a), o) in xr.iter().zip(&w).zip(or) {
                    let want = *v as f64 * scale * *a as f64;
                    assert!(
                        (*o as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "n {n} row {r}: {o} vs {want}"
                    );
                }
                let mut alone = vec![0f32; n];
                rms_norm(xr, &w, eps, &mut alone);
                assert_eq!(alone, or, "n {n} row {r} alone");
            }
        }
    }
}
