//! DistilBERT (`DistilBertForSequenceClassification`). Written here rather than taken from
//! candle-transformers, whose `distilbert` applies the tanh GELU where transformers uses the
//! erf one (`activation: "gelu"`), which moves logits by ~1e-3. Post-LayerNorm blocks with
//! eps 1e-12, learned positions from 0, no token types; the head is `pre_classifier` + ReLU +
//! `classifier` on `[CLS]`.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Activation, Embedding, LayerNorm, Linear, VarBuilder};

use super::classifier::{num_labels, right_padded};
use super::{Classifier, layers};
use crate::error::{Error, Result};
use crate::model::LoadedModel;

/// transformers' DistilBERT LayerNorm eps (fixed, not in config.json).
const EPS: f64 = 1e-12;

/// The fields of config.json that change the computation.
#[derive(Debug, Clone, serde::Deserialize)]
pub(super) struct Config {
    pub vocab_size: usize,
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub hidden_dim: usize,
    #[serde(default)]
    pub activation: Activation,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default)]
    pub sinusoidal_pos_embds: bool,
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    sa_norm: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    out_norm: LayerNorm,
}

struct DistilBert {
    word: Embedding,
    pos: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    pre_classifier: Linear,
    classifier: Linear,
    cfg: Config,
}

impl DistilBert {
    fn load(vb: VarBuilder, cfg: &Config, labels: usize) -> candle_core::Result<Self> {
        let d = cfg.dim;
        let base = vb.pp("distilbert");
        let e = base.pp("embeddings");
        let lin = |i, o, vb| candle_nn::linear(i, o, vb);
        let layers = (0..cfg.n_layers)
            .map(|i| {
                let l = base.pp(format!("transformer.layer.{i}"));
                Ok(Layer {
                    q: lin(d, d, l.pp("attention.q_lin"))?,
                    k: lin(d, d, l.pp("attention.k_lin"))?,
                    v: lin(d, d, l.pp("attention.v_lin"))?,
                    out: lin(d, d, l.pp("attention.out_lin"))?,
                    sa_norm: candle_nn::layer_norm(d, EPS, l.pp("sa_layer_norm"))?,
                    lin1: lin(d, cfg.hidden_dim, l.pp("ffn.lin1"))?,
                    lin2: lin(cfg.hidden_dim, d, l.pp("ffn.lin2"))?,
                    out_norm: candle_nn::layer_norm(d, EPS, l.pp("output_layer_norm"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(DistilBert {
            word: candle_nn::embedding(cfg.vocab_size, d, e.pp("word_embeddings"))?,
            pos: candle_nn::embedding(cfg.max_position_embeddings, d, e.pp("position_embeddings"))?,
            emb_norm: candle_nn::layer_norm(d, EPS, e.pp("LayerNorm"))?,
            layers,
            pre_classifier: lin(d, d, vb.pp("pre_classifier"))?,
            classifier: lin(d, labels, vb.pp("classifier"))?,
            cfg: cfg.clone(),
        })
    }

    fn forward(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let pos = Tensor::arange(0u32, t as u32, ids.device())?.unsqueeze(0)?;
        let x = self
            .word
            .forward(ids)?
            .broadcast_add(&self.pos.forward(&pos)?)?;
        let mut x = self.emb_norm.forward(&x)?;
        // (b, 1, 1, t): 0 where a key is real, the lowest f32 where it is padding.
        let bias = mask
            .to_dtype(DType::F32)?
            .affine(1.0, -1.0)?
            .affine(f32::MAX as f64, 0.0)?
            .unsqueeze(1)?
            .unsqueeze(1)?;
        let heads = self.cfg.n_heads;
        let scale = 1.0 / ((self.cfg.dim / heads) as f64).sqrt();
        for l in &self.layers {
            let q = layers::split_heads(&l.q.forward(&x)?, heads)?;
            let k = layers::split_heads(&l.k.forward(&x)?, heads)?;
            let v = layers::split_heads(&l.v.forward(&x)?, heads)?;
            let a = layers::attention(&q, &k, &v, scale, &bias)?;
            let sa = l
                .sa_norm
                .forward(&(l.out.forward(&layers::merge_heads(&a)?)? + &x)?)?;
            let ff = l
                .lin2
                .forward(&self.cfg.activation.forward(&l.lin1.forward(&sa)?)?)?;
            x = l.out_norm.forward(&(ff + &sa)?)?;
        }
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
        let h = self.pre_classifier.forward(&cls)?.relu()?;
        self.classifier.forward(&h)
    }
}

struct Model {
    inner: DistilBert,
    device: Device,
}

impl Classifier for Model {
    fn classify(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, mask) = right_padded(batch, self.inner.cfg.pad_token_id, &self.device)?;
        let logits = self.inner.forward(&ids, &mask)?;
        Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }
    fn max_input_tokens(&self) -> usize {
        self.inner.cfg.max_position_embeddings
    }
}

pub(super) fn load(dir: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let (cfg, raw): (Config, serde_json::Value) = super::read_config(dir)?;
    if cfg.sinusoidal_pos_embds {
        return Err(Error::Model(
            "distilbert with sinusoidal_pos_embds is not supported".into(),
        ));
    }
    if !cfg.dim.is_multiple_of(cfg.n_heads) {
        return Err(Error::Model(format!(
            "distilbert dim {} is not a multiple of n_heads {}",
            cfg.dim, cfg.n_heads
        )));
    }
    let tokenizer = super::tokenizer_json(dir)?.with_truncation(cfg.max_position_embeddings)?;
    layers::check_vocab(&tokenizer, cfg.vocab_size)?;
    let labels = num_labels(&raw);
    let vb = layers::var_builder(dir, dtype, device)?;
    let inner = DistilBert::load(vb, &cfg, labels).map_err(|e| layers::weights_error(dir, e))?;
    let model = Model {
        inner,
        device: device.clone(),
    };
    super::classification_model(Box::new(model), tokenizer, &raw, labels)
}
