//! XLM-RoBERTa: candle-transformers' `XLMRobertaModel` (RoBERTa position ids
//! `padding_idx + cumsum(non-pad)`, erf GELU, the config's LayerNorm eps), as a classifier
//! (`XLMRobertaForSequenceClassification`: `dense` + tanh + `out_proj` on `<s>`, here) or as
//! a sentence embedder (`XLMRobertaModel`, or the base of any checkpoint with `--task
//! Embedding`).

use std::path::Path;

use candle_core::{DType, Device, Module};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::xlm_roberta::{Config, XLMRobertaModel};

use super::bert::Encode;
use super::classifier::{num_labels, right_padded};
use super::encoder::{Activation, Encoder, EncoderConfig, Positions};
use super::{Classifier, layers};
use crate::error::{Error, Result, read_json};
use crate::model::LoadedModel;

struct XlmRobertaClassifier {
    roberta: XLMRobertaModel,
    dense: Linear,
    out_proj: Linear,
    pad_id: u32,
    max_tokens: usize,
    device: Device,
}

impl Classifier for XlmRobertaClassifier {
    fn classify(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, mask) = right_padded(batch, self.pad_id, &self.device)?;
        let hidden = self
            .roberta
            .forward(&ids, &mask, &ids.zeros_like()?, None, None, None)?;
        let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        let logits = self
            .out_proj
            .forward(&self.dense.forward(&first)?.tanh()?)?;
        Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }
    fn max_input_tokens(&self) -> usize {
        self.max_tokens
    }
}

/// config.json as candle's `Config`, and the longest input the position table allows.
fn config(dir: &Path) -> Result<(serde_json::Value, Config, usize)> {
    let raw: serde_json::Value = read_json(&dir.join("config.json"))?;
    let mut cfg_json = raw.clone();
    // transformers 5 no longer writes the default "absolute"; candle's Config requires it.
    match raw.get("position_embedding_type").and_then(|v| v.as_str()) {
        None => cfg_json["position_embedding_type"] = "absolute".into(),
        Some("absolute") => {}
        Some(other) => {
            return Err(Error::Model(format!(
                "xlm-roberta position_embedding_type {other:?} is not supported (only absolute)"
            )));
        }
    }
    let cfg: Config = serde_json::from_value(cfg_json).map_err(|source| Error::Json {
        path: dir.join("config.json").display().to_string(),
        source,
    })?;
    // Position ids start after padding_idx, so the longest input is shorter than the table.
    let max_tokens = cfg
        .max_position_embeddings
        .saturating_sub(cfg.pad_token_id as usize + 1);
    Ok((raw, cfg, max_tokens))
}

/// Sentence embeddings from the base model (under `roberta.` when the checkpoint has a head),
/// on kandle's CPU encoder, or on candle-transformers' model on a GPU. `bf16`:
/// [`EncoderConfig::bf16`] (kandle's encoder only).
pub(super) fn load_embedding(dir: &Path, device: &Device, bf16: bool) -> Result<LoadedModel> {
    let (_, cfg, max_tokens) = config(dir)?;
    let vb = layers::var_builder(dir, DType::F32, device)?;
    let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
        vb
    } else {
        vb.pp("roberta")
    };
    let act = match cfg.hidden_act {
        candle_nn::Activation::Gelu => Some(Activation::GeluErf),
        candle_nn::Activation::NewGelu | candle_nn::Activation::GeluPytorchTanh => {
            Some(Activation::GeluTanh)
        }
        candle_nn::Activation::Relu => Some(Activation::Relu),
        _ => None,
    };
    // kandle's encoder where it has the activation; candle-transformers' model otherwise.
    let encode = match act.filter(|_| device.is_cpu()) {
        Some(act) => {
            let ecfg = EncoderConfig {
                hidden: cfg.hidden_size,
                heads: cfg.num_attention_heads,
                intermediate: cfg.intermediate_size,
                layers: cfg.num_hidden_layers,
                vocab: cfg.vocab_size,
                max_positions: cfg.max_position_embeddings,
                type_vocab: cfg.type_vocab_size,
                eps: cfg.layer_norm_eps as f32,
                act,
                positions: Positions::Roberta {
                    padding_idx: cfg.pad_token_id,
                },
                bf16,
            };
            Encode::Fast(Encoder::load(vb, ecfg).map_err(|e| layers::weights_error(dir, e))?)
        }
        None => {
            let model =
                XLMRobertaModel::new(&cfg, vb).map_err(|e| layers::weights_error(dir, e))?;
            Encode::Candle(
                Box::new(move |ids, mask| {
                    model.forward(ids, mask, &ids.zeros_like()?, None, None, None)
                }),
                device.clone(),
            )
        }
    };
    super::bert::sentence_embedder(
        dir,
        encode,
        cfg.hidden_size,
        max_tokens,
        cfg.pad_token_id,
        cfg.vocab_size,
    )
}

pub(super) fn load(dir: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let (raw, cfg, max_tokens) = config(dir)?;
    let tokenizer = super::tokenizer_json(dir)?.with_truncation(max_tokens)?;
    layers::check_vocab(&tokenizer, cfg.vocab_size)?;
    let labels = num_labels(&raw);
    let vb = layers::var_builder(dir, dtype, device)?;
    let load = |vb: VarBuilder| -> candle_core::Result<XlmRobertaClassifier> {
        let h = cfg.hidden_size;
        Ok(XlmRobertaClassifier {
            roberta: XLMRobertaModel::new(&cfg, vb.pp("roberta"))?,
            dense: candle_nn::linear(h, h, vb.pp("classifier.dense"))?,
            out_proj: candle_nn::linear(h, labels, vb.pp("classifier.out_proj"))?,
            pad_id: cfg.pad_token_id,
            max_tokens,
            device: device.clone(),
        })
    };
    let model = load(vb).map_err(|e| layers::weights_error(dir, e))?;
    super::classification_model(Box::new(model), tokenizer, &raw, labels)
}
