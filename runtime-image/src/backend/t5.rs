//! T5 (`T5ForConditionalGeneration`): an encoder-decoder with RMS-style layer norms, no
//! biases, unscaled attention and relative-position buckets (bidirectional in the encoder,
//! causal in the decoder), computed by the first block of each stack and shared by the others.
//!
//! candle-transformers has a t5, but its decoder buckets are bidirectional, it multiplies the
//! tied head's input by √d_model instead of d_model^-0.5, it has no encoder padding mask and
//! its KV cache lives inside the model; hence this file.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};

use super::few_rows::{self, FewRows};
use super::seq2seq::{
    self, Act, DecoderState, EncoderDecoder, GenerationDefaults, Seq2SeqParts, attend, merge_heads,
    split_heads,
};
use crate::error::{Error, Result};
use crate::model::LoadedModel;

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}
fn default_true() -> bool {
    true
}

/// config.json of a T5 model (the fields this implementation reads).
#[derive(Debug, Clone, serde::Deserialize)]
pub(super) struct Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_decoder_layers: Option<usize>,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `relu`, `gelu`, `gated-gelu` (tanh GELU, as transformers maps it), `gated-silu`, ...
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// transformers 5 names the d_model^-0.5 output scaling; older configs imply it by tying.
    pub scale_decoder_outputs: Option<bool>,
    /// The longest input the original model was trained for; T5's relative positions have no
    /// hard limit, so this only bounds requests.
    pub n_positions: Option<usize>,
}

struct FeedForward {
    wi: FewRows,
    /// The gate's second projection (`wi_1`) for gated variants; `wi` is then `wi_0`.
    wi_gate: Option<FewRows>,
    wo: FewRows,
    act: Act,
}

impl FeedForward {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (gated, act) = match cfg.feed_forward_proj.strip_prefix("gated-") {
            // transformers maps gated-gelu to the tanh approximation (T5 v1.1).
            Some("gelu") => (true, Act::GeluTanh),
            Some(a) => (true, Act::parse(a)?),
            None => (false, Act::parse(&cfg.feed_forward_proj)?),
        };
        let vb = vb.pp("DenseReluDense");
        let (wi, wi_gate) = if gated {
            (
                few_rows::linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi_0"))?,
                Some(few_rows::linear_no_bias(
                    cfg.d_model,
                    cfg.d_ff,
                    vb.pp("wi_1"),
                )?),
            )
        } else {
            (
                few_rows::linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi"))?,
                None,
            )
        };
        let wo = few_rows::linear_no_bias(cfg.d_ff, cfg.d_model, vb.pp("wo"))?;
        Ok(FeedForward {
            wi,
            wi_gate,
            wo,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.act.forward(&self.wi.forward(x)?)?;
        if let Some(g) = &self.wi_gate {
            h = (h * g.forward(x)?)?;
        }
        Ok(self.wo.forward(&h)?)
    }
}

struct Attention {
    q: FewRows,
    k: FewRows,
    v: FewRows,
    o: FewRows,
    heads: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        Ok(Attention {
            q: few_rows::linear_no_bias(cfg.d_model, inner, vb.pp("q"))?,
            k: few_rows::linear_no_bias(cfg.d_model, inner, vb.pp("k"))?,
            v: few_rows::linear_no_bias(cfg.d_model, inner, vb.pp("v"))?,
            o: few_rows::linear_no_bias(inner, cfg.d_model, vb.pp("o"))?,
            heads: cfg.num_heads,
        })
    }

    fn kv(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            split_heads(&self.k.forward(x)?, self.heads)?,
            split_heads(&self.v.forward(x)?, self.heads)?,
        ))
    }

    /// The queries of rows `x`, `(b, heads, t, d)`. T5 does not scale scores by 1/√d: the
    /// initialisation accounts for it.
    fn query(&self, x: &Tensor) -> Result<Tensor> {
        split_heads(&self.q.forward(x)?, self.heads)
    }

    /// The output projection of attention results `(b, heads, t, d)`.
    fn out(&self, a: &Tensor) -> Result<Tensor> {
        Ok(self.o.forward(&merge_heads(a)?)?)
    }

    fn forward(&self, x: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
        self.out(&attend(&self.query(x)?, k, v, Some(bias))?)
    }
}

/// Relative-position bias: (1, heads, q_len, k_len) for queries at `q_start..` and keys at `0..`.
struct RelativeBias {
    embedding: Embedding,
    bidirectional: bool,
    buckets: usize,
    max_distance: usize,
}

impl RelativeBias {
    /// transformers' `_relative_position_bucket`, in f32 as torch computes it.
    fn bucket(&self, relative: i64) -> u32 {
        let mut nb = self.buckets as i64;
        let mut bucket = 0;
        let rel = if self.bidirectional {
            nb /= 2;
            if relative > 0 {
                bucket += nb;
            }
            relative.abs()
        } else {
            (-relative).max(0)
        };
        let max_exact = nb / 2;
        bucket += if rel < max_exact {
            rel
        } else {
            let scale = ((self.max_distance as f64) / (max_exact as f64)).ln() as f32;
            let large = ((rel as f32 / max_exact as f32).ln() / scale * (nb - max_exact) as f32)
                as i64
                + max_exact;
            large.min(nb - 1)
        };
        bucket as u32
    }

    fn forward(&self, q_start: usize, q_len: usize, k_len: usize) -> Result<Tensor> {
        let buckets: Vec<u32> = (q_start..q_start + q_len)
            .flat_map(|i| (0..k_len).map(move |j| (i as i64, j as i64)))
            .map(|(i, j)| self.bucket(j - i))
            .collect();
        let ids = Tensor::from_vec(
            buckets,
            (q_len, k_len),
            self.embedding.embeddings().device(),
        )?;
        let bias = self.embedding.forward(&ids)?; // (q, k, heads)
        Ok(bias.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?)
    }
}

struct EncoderBlock {
    ln_attn: RmsNorm,
    attn: Attention,
    ln_ff: RmsNorm,
    ff: FeedForward,
}

struct DecoderBlock {
    ln_self: RmsNorm,
    self_attn: Attention,
    ln_cross: RmsNorm,
    cross_attn: Attention,
    ln_ff: RmsNorm,
    ff: FeedForward,
}

/// The loaded weights.
pub(super) struct T5 {
    cfg: Config,
    shared: Embedding,
    encoder: Vec<EncoderBlock>,
    encoder_bias: RelativeBias,
    encoder_norm: RmsNorm,
    decoder: Vec<DecoderBlock>,
    decoder_bias: RelativeBias,
    decoder_norm: RmsNorm,
    /// The untied head, or the shared embedding when tied.
    lm_head: FewRows,
    output_scale: f64,
    decoder_start: u32,
}

fn rms(vb: VarBuilder, cfg: &Config) -> Result<RmsNorm> {
    Ok(candle_nn::rms_norm(
        cfg.d_model,
        cfg.layer_norm_epsilon,
        vb.pp("layer_norm"),
    )?)
}

impl T5 {
    pub(super) fn load(vb: VarBuilder, cfg: Config, decoder_start: u32) -> Result<Self> {
        let shared = candle_nn::embedding(cfg.vocab_size, cfg.d_model, vb.pp("shared"))?;
        let relative = |vb: VarBuilder, bidirectional| -> Result<RelativeBias> {
            Ok(RelativeBias {
                embedding: candle_nn::embedding(
                    cfg.relative_attention_num_buckets,
                    cfg.num_heads,
                    vb.pp("layer.0.SelfAttention.relative_attention_bias"),
                )?,
                bidirectional,
                buckets: cfg.relative_attention_num_buckets,
                max_distance: cfg.relative_attention_max_distance,
            })
        };
        let evb = vb.pp("encoder");
        let encoder = (0..cfg.num_layers)
            .map(|i| {
                let b = evb.pp(format!("block.{i}.layer"));
                Ok(EncoderBlock {
                    ln_attn: rms(b.pp("0"), &cfg)?,
                    attn: Attention::load(b.pp("0.SelfAttention"), &cfg)?,
                    ln_ff: rms(b.pp("1"), &cfg)?,
                    ff: FeedForward::load(b.pp("1"), &cfg)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let encoder_bias = relative(evb.pp("block.0"), true)?;
        let encoder_norm = candle_nn::rms_norm(
            cfg.d_model,
            cfg.layer_norm_epsilon,
            evb.pp("final_layer_norm"),
        )?;
        let dvb = vb.pp("decoder");
        let decoder = (0..cfg.num_decoder_layers.unwrap_or(cfg.num_layers))
            .map(|i| {
                let b = dvb.pp(format!("block.{i}.layer"));
                Ok(DecoderBlock {
                    ln_self: rms(b.pp("0"), &cfg)?,
                    self_attn: Attention::load(b.pp("0.SelfAttention"), &cfg)?,
                    ln_cross: rms(b.pp("1"), &cfg)?,
                    cross_attn: Attention::load(b.pp("1.EncDecAttention"), &cfg)?,
                    ln_ff: rms(b.pp("2"), &cfg)?,
                    ff: FeedForward::load(b.pp("2"), &cfg)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let decoder_bias = relative(dvb.pp("block.0"), false)?;
        let decoder_norm = candle_nn::rms_norm(
            cfg.d_model,
            cfg.layer_norm_epsilon,
            dvb.pp("final_layer_norm"),
        )?;
        let lm_head = FewRows::new(
            if cfg.tie_word_embeddings {
                shared.embeddings().clone()
            } else {
                vb.pp("lm_head")
                    .get((cfg.vocab_size, cfg.d_model), "weight")?
            },
            None,
        );
        let output_scale = if cfg.scale_decoder_outputs.unwrap_or(cfg.tie_word_embeddings) {
            (cfg.d_model as f64).powf(-0.5)
        } else {
            1.0
        };
        Ok(T5 {
            shared,
            encoder,
            encoder_bias,
            encoder_norm,
            decoder,
            decoder_bias,
            decoder_norm,
            lm_head,
            output_scale,
            decoder_start,
            cfg,
        })
    }
}

impl EncoderDecoder for T5 {
    fn encode(&self, ids: &Tensor, mask: &Tensor) -> Result<DecoderState> {
        let (_, s) = ids.dims2()?;
        let mut x = self.shared.forward(ids)?;
        // One bias for every layer: positions plus padding, as transformers adds them.
        let bias = self
            .encoder_bias
            .forward(0, s, s)?
            .broadcast_add(&seq2seq::padding_bias(mask)?)?;
        for b in &self.encoder {
            let h = b.ln_attn.forward(&x)?;
            let (k, v) = b.attn.kv(&h)?;
            x = (&x + b.attn.forward(&h, &k, &v, &bias)?)?;
            x = (&x + b.ff.forward(&b.ln_ff.forward(&x)?)?)?;
        }
        let out = self.encoder_norm.forward(&x)?;
        let cross_kv = self
            .decoder
            .iter()
            .map(|b| b.cross_attn.kv(&out))
            .collect::<Result<Vec<_>>>()?;
        DecoderState::new(cross_kv, mask)
    }

    fn decode(&self, states: &mut [&mut DecoderState], ids: &Tensor) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let mut x = self.shared.forward(ids)?;
        // Each sequence's relative-position bias (and causal mask) for its own past.
        let biases = states
            .iter()
            .map(|st| {
                let past = st.len;
                let mut bias = self.decoder_bias.forward(past, t, past + t)?;
                if t > 1 {
                    bias = bias.broadcast_add(&seq2seq::causal_bias(past, t, ids.device())?)?;
                }
                Ok(Some(bias))
            })
            .collect::<Result<Vec<_>>>()?;
        for (i, b) in self.decoder.iter().enumerate() {
            let h = b.ln_self.forward(&x)?;
            let (k, v) = b.self_attn.kv(&h)?;
            let q = b.self_attn.query(&h)?;
            let a = seq2seq::self_attend_each((&q, &k, &v), i, states, &biases)?;
            x = (&x + b.self_attn.out(&a)?)?;
            let h = b.ln_cross.forward(&x)?;
            let a = seq2seq::cross_attend_each(&b.cross_attn.query(&h)?, i, states)?;
            x = (&x + b.cross_attn.out(&a)?)?;
            x = (&x + b.ff.forward(&b.ln_ff.forward(&x)?)?)?;
        }
        for st in states.iter_mut() {
            st.len += t;
        }
        let x = self.decoder_norm.forward(&x)?;
        let last = (x.narrow(1, t - 1, 1)?.squeeze(1)? * self.output_scale)?;
        Ok(self.lm_head.forward(&last)?)
    }

    fn decoder_start_token_id(&self) -> u32 {
        self.decoder_start
    }
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
    fn context_length(&self) -> usize {
        self.cfg.n_positions.unwrap_or(512)
    }
    fn device(&self) -> &Device {
        self.shared.embeddings().device()
    }
}

pub(super) fn load(dir: &Path, device: &Device) -> Result<LoadedModel> {
    Ok(open(dir, device)?.into_loaded())
}

/// Loads the weights, tokenizer and generation defaults.
pub(super) fn open(dir: &Path, device: &Device) -> Result<Seq2SeqParts> {
    let (cfg, raw): (Config, serde_json::Value) = super::read_config(dir)?;
    if cfg.num_heads * cfg.d_kv == 0 {
        return Err(Error::Model("t5 with zero heads or d_kv".into()));
    }
    let defaults = GenerationDefaults::read(dir, &raw)?;
    // transformers' T5 starts decoding from the pad token when nothing else is said.
    let start = defaults
        .decoder_start_token_id
        .or_else(|| {
            raw.get("pad_token_id")
                .and_then(|v| v.as_u64())
                .map(|i| i as u32)
        })
        .unwrap_or(0);
    let files = super::llama::safetensors_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; kandle owns the model directory and does
    // not modify it while serving.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, device)? };
    let model = T5::load(vb, cfg, start)?;
    Ok(Seq2SeqParts {
        model: Arc::new(model),
        tokenizer: super::tokenizer_json(dir)?,
        eos_ids: defaults.eos_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bias(bidirectional: bool) -> RelativeBias {
        RelativeBias {
            embedding: Embedding::new(Tensor::zeros((32, 1), DType::F32, &Device::Cpu).unwrap(), 1),
            bidirectional,
            buckets: 32,
            max_distance: 128,
        }
    }

    #[test]
    fn relative_buckets_follow_transformers() {
        // Values from transformers' T5Attention._relative_position_bucket (32 buckets, 128).
        let enc = bias(true);
        let got: Vec<u32> = [-200, -20, -8, -7, -1, 0, 1, 7, 8, 20, 200]
            .iter()
            .map(|&r| enc.bucket(r))
            .collect();
        assert_eq!(got, vec![15, 10, 8, 7, 1, 0, 17, 23, 24, 26, 31]);
        let dec = bias(false);
        let got: Vec<u32> = [-200, -40, -16, -15, -1, 0, 5]
            .iter()
            .map(|&r| dec.bucket(r))
            .collect();
        assert_eq!(got, vec![31, 23, 16, 15, 1, 0, 0]);
    }

    #[test]
    fn an_unsupported_feed_forward_is_refused_at_load() {
        let cfg: Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 8, "d_model": 4, "d_kv": 2, "d_ff": 8, "num_layers": 1,
            "num_heads": 2, "feed_forward_proj": "gated-gelu_fast"
        }))
        .unwrap();
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let err = T5::load(vb, cfg, 0).err().expect("refused");
        assert!(err.to_string().contains("gelu_fast"), "{err}");
    }
}
