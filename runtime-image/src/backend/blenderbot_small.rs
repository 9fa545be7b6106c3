//! BlenderbotSmall (`BlenderbotSmallForConditionalGeneration`): a post-LayerNorm (BART-style)
//! encoder-decoder with learned positions (no offset), biased projections, erf GELU by default
//! and a head tied to the shared embedding plus `final_logits_bias`.
//!
//! One quirk sets it apart from BART: the encoder adds the positions to the scaled token
//! embeddings and *then* applies `layernorm_embedding`, while the decoder applies
//! `layernorm_embedding` to the token embeddings and *then* adds the positions.
//! candle-transformers has no implementation.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};

use super::few_rows::{self, FewRows};
use super::seq2seq::{
    self, Act, DecoderState, EncoderDecoder, GenerationDefaults, Seq2SeqParts, attend, merge_heads,
    split_heads,
};
use crate::error::{Error, Result};
use crate::model::LoadedModel;

/// nn.LayerNorm's default, which BlenderbotSmall uses everywhere.
const LN_EPS: f64 = 1e-5;

fn default_act() -> String {
    "gelu".into()
}
fn default_true() -> bool {
    true
}

/// config.json of a BlenderbotSmall model (the fields this implementation reads).
#[derive(Debug, Clone, serde::Deserialize)]
pub(super) struct Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub decoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_ffn_dim: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub activation_function: String,
    #[serde(default)]
    pub scale_embedding: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// BART-family options that BlenderbotSmall never sets; refused when present and true.
    #[serde(default)]
    pub normalize_before: bool,
    #[serde(default)]
    pub add_final_layer_norm: bool,
}

struct Attention {
    q: FewRows,
    k: FewRows,
    v: FewRows,
    out: FewRows,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn load(vb: VarBuilder, d: usize, heads: usize) -> Result<Self> {
        if heads == 0 || !d.is_multiple_of(heads) {
            return Err(Error::Model(format!(
                "d_model {d} is not a multiple of {heads} attention heads"
            )));
        }
        Ok(Attention {
            q: few_rows::linear(d, d, vb.pp("q_proj"))?,
            k: few_rows::linear(d, d, vb.pp("k_proj"))?,
            v: few_rows::linear(d, d, vb.pp("v_proj"))?,
            out: few_rows::linear(d, d, vb.pp("out_proj"))?,
            heads,
            scale: ((d / heads) as f64).powf(-0.5),
        })
    }

    fn kv(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            split_heads(&self.k.forward(x)?, self.heads)?,
            split_heads(&self.v.forward(x)?, self.heads)?,
        ))
    }

    /// The scaled queries of rows `x`, `(b, heads, t, d)`.
    fn query(&self, x: &Tensor) -> Result<Tensor> {
        split_heads(&(self.q.forward(x)? * self.scale)?, self.heads)
    }

    /// The output projection of attention results `(b, heads, t, d)`.
    fn output(&self, a: &Tensor) -> Result<Tensor> {
        Ok(self.out.forward(&merge_heads(a)?)?)
    }

    fn forward(&self, x: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.output(&attend(&self.query(x)?, k, v, bias)?)
    }
}

struct FeedForward {
    fc1: FewRows,
    fc2: FewRows,
    act: Act,
}

impl FeedForward {
    fn load(vb: &VarBuilder, d: usize, ffn: usize, act: Act) -> Result<Self> {
        Ok(FeedForward {
            fc1: few_rows::linear(d, ffn, vb.pp("fc1"))?,
            fc2: few_rows::linear(ffn, d, vb.pp("fc2"))?,
            act,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self
            .fc2
            .forward(&self.act.forward(&self.fc1.forward(x)?)?)?)
    }
}

struct EncoderLayer {
    attn: Attention,
    attn_norm: LayerNorm,
    ff: FeedForward,
    ff_norm: LayerNorm,
}

struct DecoderLayer {
    self_attn: Attention,
    self_norm: LayerNorm,
    cross_attn: Attention,
    cross_norm: LayerNorm,
    ff: FeedForward,
    ff_norm: LayerNorm,
}

/// The loaded weights.
pub(super) struct BlenderbotSmall {
    cfg: Config,
    shared: Embedding,
    embed_scale: f64,
    enc_positions: Tensor,
    enc_norm: LayerNorm,
    encoder: Vec<EncoderLayer>,
    dec_positions: Tensor,
    dec_norm: LayerNorm,
    decoder: Vec<DecoderLayer>,
    /// The head, with `final_logits_bias` as its bias.
    lm_head: FewRows,
    decoder_start: u32,
}

fn ln(vb: VarBuilder, d: usize) -> Result<LayerNorm> {
    Ok(candle_nn::layer_norm(d, LN_EPS, vb)?)
}

impl BlenderbotSmall {
    pub(super) fn load(vb: VarBuilder, cfg: Config, decoder_start: u32) -> Result<Self> {
        if cfg.normalize_before || cfg.add_final_layer_norm {
            return Err(Error::Model(
                "blenderbot-small with normalize_before or add_final_layer_norm is not supported"
                    .into(),
            ));
        }
        let act = Act::parse(&cfg.activation_function)?;
        let d = cfg.d_model;
        let m = vb.pp("model");
        let shared = candle_nn::embedding(cfg.vocab_size, d, m.pp("shared"))?;
        let positions = |vb: VarBuilder| -> Result<Tensor> {
            Ok(vb
                .pp("embed_positions")
                .get((cfg.max_position_embeddings, d), "weight")?)
        };
        let evb = m.pp("encoder");
        let encoder = (0..cfg.encoder_layers)
            .map(|i| {
                let l = evb.pp(format!("layers.{i}"));
                Ok(EncoderLayer {
                    attn: Attention::load(l.pp("self_attn"), d, cfg.encoder_attention_heads)?,
                    attn_norm: ln(l.pp("self_attn_layer_norm"), d)?,
                    ff: FeedForward::load(&l, d, cfg.encoder_ffn_dim, act)?,
                    ff_norm: ln(l.pp("final_layer_norm"), d)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let dvb = m.pp("decoder");
        let decoder = (0..cfg.decoder_layers)
            .map(|i| {
                let l = dvb.pp(format!("layers.{i}"));
                let heads = cfg.decoder_attention_heads;
                Ok(DecoderLayer {
                    self_attn: Attention::load(l.pp("self_attn"), d, heads)?,
                    self_norm: ln(l.pp("self_attn_layer_norm"), d)?,
                    cross_attn: Attention::load(l.pp("encoder_attn"), d, heads)?,
                    cross_norm: ln(l.pp("encoder_attn_layer_norm"), d)?,
                    ff: FeedForward::load(&l, d, cfg.decoder_ffn_dim, act)?,
                    ff_norm: ln(l.pp("final_layer_norm"), d)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            shared.embeddings().clone()
        } else {
            vb.pp("lm_head").get((cfg.vocab_size, d), "weight")?
        };
        let final_logits_bias = vb.get((1, cfg.vocab_size), "final_logits_bias")?;
        let lm_head = FewRows::new(lm_head, Some(final_logits_bias.squeeze(0)?));
        Ok(BlenderbotSmall {
            embed_scale: if cfg.scale_embedding {
                (d as f64).sqrt()
            } else {
                1.0
            },
            enc_positions: positions(evb.clone())?,
            enc_norm: ln(evb.pp("layernorm_embedding"), d)?,
            dec_positions: positions(dvb.clone())?,
            dec_norm: ln(dvb.pp("layernorm_embedding"), d)?,
            shared,
            encoder,
            decoder,
            lm_head,
            decoder_start,
            cfg,
        })
    }

    fn positions(&self, table: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        let max = self.cfg.max_position_embeddings;
        if start + len > max {
            return Err(Error::InvalidRequest(format!(
                "{} positions exceed this model's {max}",
                start + len
            )));
        }
        Ok(table.narrow(0, start, len)?.unsqueeze(0)?)
    }
}

impl EncoderDecoder for BlenderbotSmall {
    fn encode(&self, ids: &Tensor, mask: &Tensor) -> Result<DecoderState> {
        let (_, s) = ids.dims2()?;
        let x = (self.shared.forward(ids)? * self.embed_scale)?;
        let x = x.broadcast_add(&self.positions(&self.enc_positions, 0, s)?)?;
        let mut x = self.enc_norm.forward(&x)?;
        let bias = seq2seq::padding_bias(mask)?;
        for l in &self.encoder {
            let (k, v) = l.attn.kv(&x)?;
            x = l
                .attn_norm
                .forward(&(&x + l.attn.forward(&x, &k, &v, Some(&bias))?)?)?;
            x = l.ff_norm.forward(&(&x + l.ff.forward(&x)?)?)?;
        }
        let cross_kv = self
            .decoder
            .iter()
            .map(|l| l.cross_attn.kv(&x))
            .collect::<Result<Vec<_>>>()?;
        DecoderState::new(cross_kv, mask)
    }

    fn decode(&self, states: &mut [&mut DecoderState], ids: &Tensor) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        // transformers 5 (which produced the reference outputs) normalises the decoder's token
        // embeddings without `embed_scale`. LayerNorm is scale-invariant, so this differs from
        // scaling first only through eps, but that is ~1e-4 on the logits.
        let x = self.dec_norm.forward(&self.shared.forward(ids)?)?;
        // Each sequence's positions start at its own past.
        let positions = states
            .iter()
            .map(|st| self.positions(&self.dec_positions, st.len, t))
            .collect::<Result<Vec<_>>>()?;
        let mut x = x.broadcast_add(&Tensor::cat(&positions, 0)?)?;
        let biases = states
            .iter()
            .map(|st| match t {
                1 => Ok(None),
                _ => Ok(Some(seq2seq::causal_bias(st.len, t, ids.device())?)),
            })
            .collect::<Result<Vec<_>>>()?;
        for (i, l) in self.decoder.iter().enumerate() {
            let (k, v) = l.self_attn.kv(&x)?;
            let q = l.self_attn.query(&x)?;
            let a = seq2seq::self_attend_each((&q, &k, &v), i, states, &biases)?;
            x = l.self_norm.forward(&(&x + l.self_attn.output(&a)?)?)?;
            let a = seq2seq::cross_attend_each(&l.cross_attn.query(&x)?, i, states)?;
            x = l.cross_norm.forward(&(&x + l.cross_attn.output(&a)?)?)?;
            x = l.ff_norm.forward(&(&x + l.ff.forward(&x)?)?)?;
        }
        for st in states.iter_mut() {
            st.len += t;
        }
        let last = x.narrow(1, t - 1, 1)?.squeeze(1)?;
        Ok(self.lm_head.forward(&last)?)
    }

    fn decoder_start_token_id(&self) -> u32 {
        self.decoder_start
    }
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
    fn context_length(&self) -> usize {
        self.cfg.max_position_embeddings
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
    let defaults = GenerationDefaults::read(dir, &raw)?;
    let start = defaults
        .decoder_start_token_id
        .or_else(|| {
            raw.get("bos_token_id")
                .and_then(|v| v.as_u64())
                .map(|i| i as u32)
        })
        .ok_or_else(|| {
            Error::Model("blenderbot-small config names no decoder_start_token_id".into())
        })?;
    let files = super::llama::safetensors_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; kandle owns the model directory and does
    // not modify it while serving.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, device)? };
    let model = BlenderbotSmall::load(vb, cfg, start)?;
    Ok(Seq2SeqParts {
        model: Arc::new(model),
        tokenizer: super::tokenizer_json(dir)?,
        eos_ids: defaults.eos_ids,
    })
}
