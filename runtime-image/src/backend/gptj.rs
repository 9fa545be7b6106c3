//! GPT-J (`GPTJForCausalLM`): attention and MLP in parallel from one `ln_1`, rotary position
//! embedding on the first `rotary_dim` dimensions of each head in GPT-J's interleaved
//! "rotate every two" form (candle's `rope_i`), bias-free q/k/v/out projections, and an untied
//! `lm_head` with a bias.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Activation, Embedding, LayerNorm, VarBuilder};

use super::few_rows::{self, FewRows};
use super::layers::{self, CausalForward, KvCache};
use crate::error::{Error, Result};
use crate::model::LoadedModel;

/// The fields of config.json that change the computation.
#[derive(Debug, Clone, serde::Deserialize)]
pub(super) struct Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_inner: Option<usize>,
    pub rotary_dim: Option<usize>,
    #[serde(default = "default_activation")]
    pub activation_function: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_activation() -> Activation {
    Activation::NewGelu
}
fn default_eps() -> f64 {
    1e-5
}

struct Block {
    ln_1: LayerNorm,
    q: FewRows,
    k: FewRows,
    v: FewRows,
    out: FewRows,
    fc_in: FewRows,
    fc_out: FewRows,
}

struct GptJ {
    wte: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: FewRows,
    /// `(n_positions, rotary_dim / 2)` each.
    cos: Tensor,
    sin: Tensor,
    rotary_dim: usize,
    cfg: Config,
    /// Where the weights live; a step's inputs go there too.
    device: Device,
}

impl GptJ {
    fn load(vb: VarBuilder, cfg: &Config, rotary_dim: usize) -> candle_core::Result<Self> {
        let h = cfg.n_embd;
        let inner = cfg.n_inner.unwrap_or(4 * h);
        let t = layers::transformer_root(&vb, "wte.weight");
        let wte = candle_nn::embedding(cfg.vocab_size, h, t.pp("wte"))?;
        let ln = |vb: VarBuilder| candle_nn::layer_norm(h, cfg.layer_norm_epsilon, vb);
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let b = t.pp(format!("h.{i}"));
                Ok(Block {
                    ln_1: ln(b.pp("ln_1"))?,
                    q: few_rows::linear_no_bias(h, h, b.pp("attn.q_proj"))?,
                    k: few_rows::linear_no_bias(h, h, b.pp("attn.k_proj"))?,
                    v: few_rows::linear_no_bias(h, h, b.pp("attn.v_proj"))?,
                    out: few_rows::linear_no_bias(h, h, b.pp("attn.out_proj"))?,
                    fc_in: few_rows::linear(h, inner, b.pp("mlp.fc_in"))?,
                    fc_out: few_rows::linear(inner, h, b.pp("mlp.fc_out"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            FewRows::new(wte.embeddings().clone(), None)
        } else {
            few_rows::linear(h, cfg.vocab_size, vb.pp("lm_head"))?
        };
        // transformers' create_sinusoidal_positions: inv_freq = 1 / 10000^(2i / rotary_dim).
        let half = rotary_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / rotary_dim as f64) as f32)
            .collect();
        let dev = vb.device();
        let inv = Tensor::from_vec(inv, (1, half), dev)?;
        let pos = Tensor::arange(0u32, cfg.n_positions as u32, dev)?
            .to_dtype(DType::F32)?
            .unsqueeze(1)?;
        let freqs = pos.broadcast_mul(&inv)?;
        Ok(GptJ {
            wte,
            blocks,
            ln_f: ln(t.pp("ln_f"))?,
            lm_head,
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            rotary_dim,
            cfg: cfg.clone(),
            device: vb.device().clone(),
        })
    }

    /// Rotates the first `rotary_dim` dimensions of `x` `(b, heads, t, head_dim)`, row `i` of
    /// sequence `s` at position `pos[s · t + i]`.
    fn rotate(&self, x: &Tensor, pos: &Tensor) -> candle_core::Result<Tensor> {
        let (b, _, t, d) = x.dims4()?;
        let half = self.rotary_dim / 2;
        let table = |m: &Tensor| -> candle_core::Result<Tensor> {
            m.index_select(pos, 0)?
                .reshape((b, t, half))?
                .to_dtype(x.dtype())
        };
        let (cos, sin) = (table(&self.cos)?, table(&self.sin)?);
        let rot = x.narrow(3, 0, self.rotary_dim)?.contiguous()?;
        let rot = candle_nn::rotary_emb::rope_i(&rot, &cos, &sin)?;
        if self.rotary_dim == d {
            return Ok(rot);
        }
        let pass = x.narrow(3, self.rotary_dim, d - self.rotary_dim)?;
        Tensor::cat(&[&rot, &pass], 3)
    }
}

impl CausalForward for GptJ {
    fn forward(
        &self,
        tokens: &[u32],
        pasts: &[usize],
        caches: &mut [&mut KvCache],
    ) -> candle_core::Result<Tensor> {
        let dev = self.device.clone();
        let b = pasts.len();
        let t = tokens.len() / b;
        let end = pasts.iter().max().copied().unwrap_or(0) + t;
        if end > self.cfg.n_positions {
            candle_core::bail!(
                "position {end} is beyond n_positions {}",
                self.cfg.n_positions
            );
        }
        let ids = Tensor::new(tokens, &dev)?.reshape((b, t))?;
        let pos = layers::positions(pasts, t, &dev)?;
        let mut x = self.wte.forward(&ids)?;
        let mask = |_, total: usize| layers::causal_mask(t, total - t, &dev);
        let heads = self.cfg.n_head;
        let scale = 1.0 / ((self.cfg.n_embd / heads) as f64).sqrt();
        for (i, blk) in self.blocks.iter().enumerate() {
            let h = blk.ln_1.forward(&x)?;
            let q = self.rotate(&layers::split_heads(&blk.q.forward(&h)?, heads)?, &pos)?;
            let k = self.rotate(&layers::split_heads(&blk.k.forward(&h)?, heads)?, &pos)?;
            let v = layers::split_heads(&blk.v.forward(&h)?, heads)?;
            let a = layers::attend_each((&q, &k, &v), i, caches, scale, &mask)?;
            let a = blk.out.forward(&layers::merge_heads(&a)?)?;
            let m = blk.fc_out.forward(
                &self
                    .cfg
                    .activation_function
                    .forward(&blk.fc_in.forward(&h)?)?,
            )?;
            x = ((a + m)? + &x)?;
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
    if !cfg.n_embd.is_multiple_of(cfg.n_head) {
        return Err(Error::Model(format!(
            "gptj n_embd {} is not a multiple of n_head {}",
            cfg.n_embd, cfg.n_head
        )));
    }
    let head_dim = cfg.n_embd / cfg.n_head;
    let rotary_dim = cfg.rotary_dim.unwrap_or(head_dim);
    if rotary_dim > head_dim || !rotary_dim.is_multiple_of(2) {
        return Err(Error::Model(format!(
            "gptj rotary_dim {rotary_dim} must be even and at most the head size {head_dim}"
        )));
    }
    let vb = layers::var_builder(dir, dtype, device)?;
    let model = GptJ::load(vb, &cfg, rotary_dim).map_err(|e| layers::weights_error(dir, e))?;
    layers::generation_model(dir, &raw, model, cfg.vocab_size, cfg.n_positions)
}
