//! Sequence classification heads on encoders, and the right-padded batching they share.
//! BERT (`BertForSequenceClassification`) reuses candle-transformers' `BertModel` and adds
//! the tanh pooler over `[CLS]` and the `classifier` linear; DistilBERT and XLM-RoBERTa have
//! their own files.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::bert::{BertModel, Config};

use super::Classifier;
use super::layers;
use crate::error::{Error, Result};
use crate::model::LoadedModel;

/// A batch of token lists as `(ids, mask)`, both `(b, width)` u32 on `dev`, padded on the
/// right with `pad_id` (mask 0 there). Refuses an empty batch or an empty input.
pub(super) fn right_padded(
    batch: &[Vec<u32>],
    pad_id: u32,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let width = batch.iter().map(Vec::len).max().unwrap_or(0);
    if batch.iter().any(Vec::is_empty) || width == 0 {
        return Err(Error::InvalidRequest(
            "cannot classify an empty token sequence".into(),
        ));
    }
    let mut ids = Vec::with_capacity(batch.len() * width);
    let mut mask = Vec::with_capacity(batch.len() * width);
    for item in batch {
        ids.extend(item.iter().copied());
        ids.extend(std::iter::repeat_n(pad_id, width - item.len()));
        mask.extend(std::iter::repeat_n(1u32, item.len()));
        mask.extend(std::iter::repeat_n(0u32, width - item.len()));
    }
    Ok((
        Tensor::from_vec(ids, (batch.len(), width), dev)?,
        Tensor::from_vec(mask, (batch.len(), width), dev)?,
    ))
}

/// The number of labels of a head: `id2label`'s size, else `num_labels`, else 2 (the
/// transformers default).
pub(super) fn num_labels(config: &serde_json::Value) -> usize {
    config
        .get("id2label")
        .and_then(|m| m.as_object())
        .map(|m| m.len())
        .or_else(|| {
            config
                .get("num_labels")
                .and_then(|n| n.as_u64())
                .map(|n| n as usize)
        })
        .unwrap_or(2)
}

struct BertClassifier {
    bert: BertModel,
    pooler: Linear,
    classifier: Linear,
    pad_id: u32,
    max_tokens: usize,
    device: Device,
}

impl Classifier for BertClassifier {
    fn classify(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let one_text: Vec<usize> = batch.iter().map(Vec::len).collect();
        self.classify_pairs(batch, &one_text)
    }
    fn classify_pairs(&self, batch: &[Vec<u32>], second: &[usize]) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, mask) = right_padded(batch, self.pad_id, &self.device)?;
        // Token type 1 from the second text on (padding stays 0, as transformers pads it).
        let width = ids.dim(1)?;
        let types: Vec<u32> = (batch.iter().zip(second))
            .flat_map(|(item, &from)| {
                (0..width).map(move |c| u32::from(c >= from && c < item.len()))
            })
            .collect();
        let types = Tensor::from_vec(types, (batch.len(), width), &self.device)?;
        let hidden = self.bert.forward(&ids, &types, Some(&mask))?;
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        let pooled = self.pooler.forward(&cls)?.tanh()?;
        let logits = self.classifier.forward(&pooled)?;
        Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }
    fn max_input_tokens(&self) -> usize {
        self.max_tokens
    }
}

pub(super) fn load_bert(dir: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let (config, raw): (Config, serde_json::Value) = super::read_config(dir)?;
    let tokenizer = super::tokenizer_json(dir)?.with_truncation(config.max_position_embeddings)?;
    layers::check_vocab(&tokenizer, config.vocab_size)?;
    let labels = num_labels(&raw);
    let vb = layers::var_builder(dir, dtype, device)?;
    let load = |vb: VarBuilder| -> candle_core::Result<BertClassifier> {
        let h = config.hidden_size;
        Ok(BertClassifier {
            bert: BertModel::load(vb.pp("bert"), &config)?,
            pooler: candle_nn::linear(h, h, vb.pp("bert.pooler.dense"))?,
            classifier: candle_nn::linear(h, labels, vb.pp("classifier"))?,
            pad_id: config.pad_token_id as u32,
            max_tokens: config.max_position_embeddings,
            device: device.clone(),
        })
    };
    let model = load(vb).map_err(|e| layers::weights_error(dir, e))?;
    super::classification_model(Box::new(model), tokenizer, &raw, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_padded_on_the_right_with_a_mask() {
        let (ids, mask) = right_padded(&[vec![5, 6, 7], vec![8]], 0, &Device::Cpu).unwrap();
        assert_eq!(ids.to_vec2::<u32>().unwrap(), [[5, 6, 7], [8, 0, 0]]);
        assert_eq!(mask.to_vec2::<u32>().unwrap(), [[1, 1, 1], [1, 0, 0]]);
        assert!(right_padded(&[vec![]], 0, &Device::Cpu).is_err());
    }

    #[test]
    fn the_label_count_comes_from_id2label_then_num_labels() {
        assert_eq!(
            num_labels(&serde_json::json!({"id2label": {"0": "a", "1": "b", "2": "c"}})),
            3
        );
        assert_eq!(num_labels(&serde_json::json!({"num_labels": 5})), 5);
        assert_eq!(num_labels(&serde_json::json!({})), 2);
    }
}
