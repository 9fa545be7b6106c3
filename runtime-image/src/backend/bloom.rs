//! BLOOM (`BloomForCausalLM`): no position embeddings but ALiBi (a per-head linear bias on the
//! key position), `word_embeddings_layernorm` after the embedding, a fused `query_key_value`
//! laid out per head as (q, k, v), the tanh GELU, and the head tied to `word_embeddings`.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};

use super::few_rows::{self, FewRows};
use super::layers::{self, CausalForward, KvCache};
use crate::error::{Error, Result};
use crate::model::LoadedModel;

/// The context served when config.json names none: ALiBi has no position table, so this is
/// a serving limit, not a model one (BLOOM was trained on 2048).
const DEFAULT_CONTEXT: usize = 2048;

/// The fields of config.json that change the computation.
#[derive(Debug, Clone, serde::Deserialize)]
pub(super) struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub apply_residual_connection_post_layernorm: bool,
    #[serde(default = "one")]
    pub pretraining_tp: usize,
    #[serde(default)]
    pub slow_but_exact: bool,
    pub seq_length: Option<usize>,
}

fn default_eps() -> f64 {
    1e-5
}
fn one() -> usize {
    1
}

/// transformers' `build_alibi_tensor` slopes: a geometric series for the largest power of two
/// of heads, then every other slope of the next series for the rest.
pub(super) fn alibi_slopes(heads: usize) -> Vec<f32> {
    let closest = 1usize << (usize::BITS - 1 - heads.leading_zeros());
    let base = 2f64.powf(-(2f64.powf(-((closest as f64).log2() - 3.0))));
    let mut slopes: Vec<f32> = (1..=closest).map(|i| base.powi(i as i32) as f32).collect();
    if closest != heads {
        let extra = 2f64.powf(-(2f64.powf(-((2.0 * closest as f64).log2() - 3.0))));
        let remaining = heads - closest;
        slopes.extend((0..remaining).map(|i| extra.powi((1 + 2 * i) as i32) as f32));
    }
    slopes
}

struct Block {
    input_ln: LayerNorm,
    qkv: FewRows,
    dense: FewRows,
    post_ln: LayerNorm,
    h_to_4h: FewRows,
    four_h_to_h: FewRows,
}

struct Bloom {
    embed: Embedding,
    embed_ln: LayerNorm,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: FewRows,
    /// `(1, heads, 1, 1)`.
    slopes: Tensor,
    cfg: Config,
    /// Where the weights live; a step's inputs go there too.
    device: Device,
}

impl Bloom {
    fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let t = layers::transformer_root(&vb, "word_embeddings.weight");
        let ln = |vb: VarBuilder| candle_nn::layer_norm(h, cfg.layer_norm_epsilon, vb);
        let embed = candle_nn::embedding(cfg.vocab_size, h, t.pp("word_embeddings"))?;
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let b = t.pp(format!("h.{i}"));
                Ok(Block {
                    input_ln: ln(b.pp("input_layernorm"))?,
                    qkv: few_rows::linear(h, 3 * h, b.pp("self_attention.query_key_value"))?,
                    dense: few_rows::linear(h, h, b.pp("self_attention.dense"))?,
                    post_ln: ln(b.pp("post_attention_layernorm"))?,
                    h_to_4h: few_rows::linear(h, 4 * h, b.pp("mlp.dense_h_to_4h"))?,
                    four_h_to_h: few_rows::linear(4 * h, h, b.pp("mlp.dense_4h_to_h"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let slopes =
            Tensor::from_vec(alibi_slopes(cfg.n_head), (1, cfg.n_head, 1, 1), vb.device())?;
        Ok(Bloom {
            lm_head: FewRows::new(embed.embeddings().clone(), None),
            embed,
            embed_ln: ln(t.pp("word_embeddings_layernorm"))?,
            blocks,
            ln_f: ln(t.pp("ln_f"))?,
            slopes,
            cfg: cfg.clone(),
            device: vb.device().clone(),
        })
    }
}

impl CausalForward for Bloom {
    fn forward(
        &self,
        tokens: &[u32],
        pasts: &[usize],
        caches: &mut [&mut KvCache],
    ) -> candle_core::Result<Tensor> {
        let dev = self.device.clone();
        let b = pasts.len();
        let t = tokens.len() / b;
        let ids = Tensor::new(tokens, &dev)?.reshape((b, t))?;
        let mut x = self.embed_ln.forward(&self.embed.forward(&ids)?)?;
        // ALiBi on the key position (no padding inside one sequence), plus the causal mask:
        // (1, heads, t, total) for a sequence holding `total` positions.
        let bias = |_, total: usize| -> candle_core::Result<Tensor> {
            let key_pos = Tensor::arange(0u32, total as u32, &dev)?
                .to_dtype(DType::F32)?
                .reshape((1, 1, 1, total))?;
            self.slopes
                .broadcast_mul(&key_pos)?
                .broadcast_add(&layers::causal_mask(t, total - t, &dev)?.reshape((1, 1, t, total))?)
        };
        let heads = self.cfg.n_head;
        let hd = self.cfg.hidden_size / heads;
        let scale = 1.0 / (hd as f64).sqrt();
        for (i, blk) in self.blocks.iter().enumerate() {
            let ln = blk.input_ln.forward(&x)?;
            // (b, t, heads, 3, hd): each head's q, k and v are adjacent.
            let qkv = blk.qkv.forward(&ln)?.reshape((b, t, heads, 3, hd))?;
            let part = |j| -> candle_core::Result<Tensor> {
                qkv.narrow(3, j, 1)?
                    .squeeze(3)?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            let a = layers::attend_each((&q, &k, &v), i, caches, scale, &bias)?;
            let residual = if self.cfg.apply_residual_connection_post_layernorm {
                &ln
            } else {
                &x
            };
            let attn_out = (blk.dense.forward(&layers::merge_heads(&a)?)? + residual)?;
            let ln2 = blk.post_ln.forward(&attn_out)?;
            let residual = if self.cfg.apply_residual_connection_post_layernorm {
                &ln2
            } else {
                &attn_out
            };
            let m = blk
                .four_h_to_h
                .forward(&blk.h_to_4h.forward(&ln2)?.gelu()?)?;
            x = (m + residual)?;
        }
        let last = self.ln_f.forward(&x.narrow(1, t - 1, 1)?)?;
        self.lm_head.forward(&last)?.squeeze(1)
    }

    fn num_layers(&self) -> usize {
        self.cfg.n_layer
    }
}

pub(super) fn load(dir: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let (cfg, raw): (Config, serde_json::Value) = super::read_config(dir)?;
    if cfg.pretraining_tp != 1 && cfg.slow_but_exact {
        return Err(Error::Model(
            "bloom with slow_but_exact tensor-parallel emulation is not supported".into(),
        ));
    }
    if !cfg.hidden_size.is_multiple_of(cfg.n_head) {
        return Err(Error::Model(format!(
            "bloom hidden_size {} is not a multiple of n_head {}",
            cfg.hidden_size, cfg.n_head
        )));
    }
    let vb = layers::var_builder(dir, dtype, device)?;
    let model = Bloom::load(vb, &cfg).map_err(|e| layers::weights_error(dir, e))?;
    let context = cfg.seq_length.unwrap_or(DEFAULT_CONTEXT);
    layers::generation_model(dir, &raw, model, cfg.vocab_size, context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alibi_slopes_follow_transformers_for_powers_of_two_and_others() {
        assert_eq!(alibi_slopes(4), [0.25, 0.0625, 0.015625, 0.00390625]);
        // 6 heads: the 4-head series, then 2^-1 and 2^-3 (every other slope of the 8-head one).
        let s = alibi_slopes(6);
        assert_eq!(s.len(), 6);
        assert_eq!(s[4], 2f32.powi(-1));
        assert_eq!(s[5], 2f32.powi(-3));
    }
}
