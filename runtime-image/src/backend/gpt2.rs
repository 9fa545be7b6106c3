//! GPT-2 (`GPT2LMHeadModel`): learned positions, pre-LayerNorm blocks, `Conv1D` linears stored
//! `(in, out)`, `gelu_new` by default, and the head tied to `wte`.

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
    #[serde(default = "default_activation")]
    pub activation_function: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    pub add_cross_attention: bool,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
}

fn default_activation() -> Activation {
    Activation::NewGelu
}
fn default_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

struct Block {
    ln_1: LayerNorm,
    c_attn: FewRows,
    attn_proj: FewRows,
    ln_2: LayerNorm,
    c_fc: FewRows,
    mlp_proj: FewRows,
}

struct Gpt2 {
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: FewRows,
    cfg: Config,
    /// Where the weights live; a step's inputs go there too.
    device: Device,
}

impl Gpt2 {
    fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let h = cfg.n_embd;
        let inner = cfg.n_inner.unwrap_or(4 * h);
        let t = layers::transformer_root(&vb, "wte.weight");
        let wte = candle_nn::embedding(cfg.vocab_size, h, t.pp("wte"))?;
        let wpe = candle_nn::embedding(cfg.n_positions, h, t.pp("wpe"))?;
        let ln = |vb: VarBuilder| candle_nn::layer_norm(h, cfg.layer_norm_epsilon, vb);
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let b = t.pp(format!("h.{i}"));
                Ok(Block {
                    ln_1: ln(b.pp("ln_1"))?,
                    c_attn: layers::conv1d(h, 3 * h, b.pp("attn.c_attn"))?,
                    attn_proj: layers::conv1d(h, h, b.pp("attn.c_proj"))?,
                    ln_2: ln(b.pp("ln_2"))?,
                    c_fc: layers::conv1d(h, inner, b.pp("mlp.c_fc"))?,
                    mlp_proj: layers::conv1d(inner, h, b.pp("mlp.c_proj"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let ln_f = ln(t.pp("ln_f"))?;
        // transformers 5 stores a tied head once, as wte; an untied checkpoint has lm_head.
        let lm_head = if cfg.tie_word_embeddings {
            FewRows::new(wte.embeddings().clone(), None)
        } else {
            few_rows::linear_no_bias(h, cfg.vocab_size, vb.pp("lm_head"))?
        };
        Ok(Gpt2 {
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            cfg: cfg.clone(),
            device: vb.device().clone(),
        })
    }
}

impl CausalForward for Gpt2 {
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
        let pos = layers::positions(pasts, t, &dev)?.reshape((b, t))?;
        let mut x = (self.wte.forward(&ids)? + self.wpe.forward(&pos)?)?;
        let mask = |_, total: usize| layers::causal_mask(t, total - t, &dev);
        let heads = self.cfg.n_head;
        let scale = if self.cfg.scale_attn_weights {
            1.0 / ((self.cfg.n_embd / heads) as f64).sqrt()
        } else {
            1.0
        };
        for (i, blk) in self.blocks.iter().enumerate() {
            let qkv = blk.c_attn.forward(&blk.ln_1.forward(&x)?)?;
            let h = self.cfg.n_embd;
            let q = layers::split_heads(&qkv.narrow(2, 0, h)?, heads)?;
            let k = layers::split_heads(&qkv.narrow(2, h, h)?, heads)?;
            let v = layers::split_heads(&qkv.narrow(2, 2 * h, h)?, heads)?;
            let a = layers::attend_each((&q, &k, &v), i, caches, scale, &mask)?;
            x = (x + blk.attn_proj.forward(&layers::merge_heads(&a)?)?)?;
            let m = self
                .cfg
                .activation_function
                .forward(&blk.c_fc.forward(&blk.ln_2.forward(&x)?)?)?;
            x = (&x + blk.mlp_proj.forward(&m)?)?;
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
    if cfg.scale_attn_by_inverse_layer_idx || cfg.add_cross_attention {
        return Err(Error::Model(
            "gpt2 with scale_attn_by_inverse_layer_idx or cross-attention is not supported".into(),
        ));
    }
    if !cfg.n_embd.is_multiple_of(cfg.n_head) {
        return Err(Error::Model(format!(
            "gpt2 n_embd {} is not a multiple of n_head {}",
            cfg.n_embd, cfg.n_head
        )));
    }
    let vb = layers::var_builder(dir, dtype, device)?;
    let model = Gpt2::load(vb, &cfg).map_err(|e| layers::weights_error(dir, e))?;
    layers::generation_model(dir, &raw, model, cfg.vocab_size, cfg.n_positions)
}
