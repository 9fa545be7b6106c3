//! Sentence embeddings from an encoder (BERT here; XLM-RoBERTa through
//! [`sentence_embedder`]), pooled and normalised as the model's sentence-transformers
//! configuration says (modules.json, 1_Pooling/config.json, sentence_bert_config.json).

use std::ops::Range;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::{Config, HiddenAct};

use super::Embedder;
use super::classifier::right_padded;
use super::encoder::{Activation, Encoder, EncoderConfig, Positions};
use crate::error::{Error, Result, read_json};
use crate::model::LoadedModel;

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pooling {
    Mean,
    Cls,
    Max,
    MeanSqrtLen,
}

/// Runs an encoder: `(ids, mask)`, both `(b, t)` u32, to the last hidden state `(b, t, d)`.
pub(super) type EncodeFn =
    Box<dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// What turns token ids into hidden states.
pub(super) enum Encode {
    /// kandle's own encoder: ragged batches, fused kernels (`encoder.rs`).
    Fast(Encoder),
    /// A candle-transformers model run on a right-padded batch with its attention mask, on
    /// the device its weights are on (a GPU's, or the CPU where kandle's encoder lacks the
    /// model's activation).
    Candle(EncodeFn, Device),
}

impl Encode {
    /// The last hidden state of every sequence stacked without padding, `(Σ len, d)`
    /// row-major, and each sequence's rows.
    fn hidden(&self, batch: &[Vec<u32>], pad_id: u32) -> Result<(Vec<f32>, Vec<Range<usize>>)> {
        if batch.iter().any(Vec::is_empty) {
            return Err(Error::InvalidRequest(
                "cannot embed an empty token sequence".into(),
            ));
        }
        match self {
            Encode::Fast(e) => Ok(e.forward(batch)?),
            Encode::Candle(encode, device) => {
                let (ids, mask) = right_padded(batch, pad_id, device)?;
                let width = ids.dim(1)?;
                let hidden = encode(&ids, &mask)?.to_dtype(DType::F32)?; // (b, t, d)
                let d = hidden.dim(2)?;
                let all = hidden.flatten_all()?.to_vec1::<f32>()?;
                let mut out = Vec::new();
                let mut ranges = Vec::with_capacity(batch.len());
                for (i, item) in batch.iter().enumerate() {
                    let start = out.len() / d;
                    out.extend_from_slice(&all[i * width * d..][..item.len() * d]);
                    ranges.push(start..start + item.len());
                }
                Ok((out, ranges))
            }
        }
    }
}

struct Bert {
    encode: Encode,
    pooling: Pooling,
    normalize: bool,
    dim: usize,
    max_tokens: usize,
    pad_id: u32,
}

impl Embedder for Bert {
    fn embed(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (hidden, ranges) = self.encode.hidden(batch, self.pad_id)?;
        let d = self.dim;
        Ok(ranges
            .into_iter()
            .map(|r| {
                let len = r.len();
                let rows = hidden[r.start * d..r.end * d].chunks_exact(d);
                let mut v = match self.pooling {
                    Pooling::Cls => hidden[r.start * d..][..d].to_vec(),
                    Pooling::Mean | Pooling::MeanSqrtLen => {
                        let mut sum = vec![0f32; d];
                        for row in rows {
                            sum.iter_mut().zip(row).for_each(|(s, x)| *s += x);
                        }
                        let denom = if self.pooling == Pooling::Mean {
                            len as f32
                        } else {
                            (len as f32).sqrt()
                        };
                        sum.iter_mut().for_each(|s| *s /= denom);
                        sum
                    }
                    Pooling::Max => {
                        let mut m = vec![f32::NEG_INFINITY; d];
                        for row in rows {
                            m.iter_mut().zip(row).for_each(|(m, x)| *m = m.max(*x));
                        }
                        m
                    }
                };
                if self.normalize {
                    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                    v.iter_mut().for_each(|x| *x /= norm);
                }
                v
            })
            .collect())
    }
    fn dimension(&self) -> usize {
        self.dim
    }
    fn max_input_tokens(&self) -> usize {
        self.max_tokens
    }
}

#[derive(serde::Deserialize)]
struct Module {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

#[derive(serde::Deserialize, Default)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

/// Reads the sentence-transformers layout: which pooling, and whether a Normalize module
/// follows. A plain BERT directory without modules.json gets mean pooling and normalisation,
/// which is what sentence-embedding checkpoints almost always use.
fn pooling_setup(dir: &Path) -> Result<(Pooling, bool)> {
    let modules_path = dir.join("modules.json");
    if !modules_path.exists() {
        return Ok((Pooling::Mean, true));
    }
    let modules: Vec<Module> = read_json(&modules_path)?;
    let mut pooling = None;
    let mut normalize = false;
    for m in &modules {
        match m.kind.rsplit('.').next().unwrap_or_default() {
            "Transformer" => {}
            "Pooling" => {
                let pc: PoolingConfig = read_json(&dir.join(&m.path).join("config.json"))?;
                if pc.pooling_mode_weightedmean_tokens || pc.pooling_mode_lasttoken {
                    return Err(Error::Model(
                        "weighted-mean and last-token pooling are not supported".into(),
                    ));
                }
                let chosen = [
                    (pc.pooling_mode_mean_tokens, Pooling::Mean),
                    (pc.pooling_mode_cls_token, Pooling::Cls),
                    (pc.pooling_mode_max_tokens, Pooling::Max),
                    (pc.pooling_mode_mean_sqrt_len_tokens, Pooling::MeanSqrtLen),
                ];
                let on: Vec<Pooling> = chosen.iter().filter(|(b, _)| *b).map(|(_, p)| *p).collect();
                if on.len() != 1 {
                    return Err(Error::Model(format!(
                        "exactly one pooling mode must be set in {}/config.json, found {}",
                        m.path,
                        on.len()
                    )));
                }
                pooling = Some(on[0]);
            }
            "Normalize" => normalize = true,
            other => {
                return Err(Error::Model(format!(
                    "sentence-transformers module {other} is not supported"
                )));
            }
        }
    }
    Ok((pooling.unwrap_or(Pooling::Mean), normalize))
}

/// `max_seq_length` of sentence_bert_config.json, if the file is there.
fn st_max_seq_length(dir: &Path) -> Result<Option<usize>> {
    #[derive(serde::Deserialize)]
    struct StConfig {
        max_seq_length: Option<usize>,
    }
    let st_path = dir.join("sentence_bert_config.json");
    Ok(if st_path.exists() {
        read_json::<StConfig>(&st_path)?.max_seq_length
    } else {
        None
    })
}

/// Wraps an encoder as an embedding model: pooling and normalisation from the
/// sentence-transformers files (mean + normalise without them), inputs truncated to the
/// smaller of `max_tokens` and `max_seq_length`.
pub(super) fn sentence_embedder(
    dir: &Path,
    encode: Encode,
    dim: usize,
    max_tokens: usize,
    pad_id: u32,
    vocab_size: usize,
) -> Result<LoadedModel> {
    let (pooling, normalize) = pooling_setup(dir)?;
    let max_tokens = st_max_seq_length(dir)?
        .unwrap_or(max_tokens)
        .min(max_tokens);
    let tokenizer = super::tokenizer_json(dir)?.with_truncation(max_tokens)?;
    super::layers::check_vocab(&tokenizer, vocab_size)?;
    let model = Bert {
        encode,
        pooling,
        normalize,
        dim,
        max_tokens,
        pad_id,
    };
    Ok(super::embedding_model(Box::new(model), tokenizer))
}

/// BERT embeddings; a checkpoint with a task head (`bert.` prefix) serves its base model.
/// A BERT sentence embedder: kandle's encoder on the CPU; candle-transformers' `BertModel` on
/// a GPU, or on the CPU with `candle` (the reference the tests compare the GPU's path with).
/// `bf16`: [`EncoderConfig::bf16`] (kandle's encoder only).
pub(super) fn load(dir: &Path, device: &Device, candle: bool, bf16: bool) -> Result<LoadedModel> {
    let config: Config = read_json(&dir.join("config.json"))?;
    let vb = super::layers::var_builder(dir, DType::F32, device)?;
    // Checkpoints saved from BertModel have no "bert." prefix; those from task heads do.
    let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
        vb
    } else {
        vb.pp("bert")
    };
    let act = match config.hidden_act {
        HiddenAct::Gelu => Activation::GeluErf,
        HiddenAct::GeluApproximate => Activation::GeluTanh,
        HiddenAct::Relu => Activation::Relu,
    };
    let cfg = EncoderConfig {
        hidden: config.hidden_size,
        heads: config.num_attention_heads,
        intermediate: config.intermediate_size,
        layers: config.num_hidden_layers,
        vocab: config.vocab_size,
        max_positions: config.max_position_embeddings,
        type_vocab: config.type_vocab_size,
        eps: config.layer_norm_eps as f32,
        act,
        positions: Positions::Absolute,
        bf16,
    };
    let encode = if candle || !device.is_cpu() {
        let model = candle_transformers::models::bert::BertModel::load(vb, &config)
            .map_err(|e| super::layers::weights_error(dir, e))?;
        Encode::Candle(
            Box::new(move |ids, mask| model.forward(ids, &ids.zeros_like()?, Some(mask))),
            device.clone(),
        )
    } else {
        let model = Encoder::load(vb, cfg).map_err(|e| super::layers::weights_error(dir, e))?;
        Encode::Fast(model)
    };
    sentence_embedder(
        dir,
        encode,
        config.hidden_size,
        config.max_position_embeddings,
        config.pad_token_id as u32,
        config.vocab_size,
    )
}
