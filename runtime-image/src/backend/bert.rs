//! Sentence embeddings from an encoder (BERT here; XLM-RoBERTa through
//! [`sentence_embedder`]), pooled and normalised as the model's sentence-transformers
//! configuration says (modules.json, 1_Pooling/config.json, sentence_bert_config.json).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::{BertModel, Config};

use super::Embedder;
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

struct Bert {
    encode: EncodeFn,
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
        let width = batch.iter().map(Vec::len).max().unwrap_or(0);
        if width == 0 {
            return Err(Error::InvalidRequest(
                "cannot embed an empty token sequence".into(),
            ));
        }
        let mut ids = Vec::with_capacity(batch.len() * width);
        let mut mask = Vec::with_capacity(batch.len() * width);
        for item in batch {
            ids.extend(item.iter().copied());
            ids.extend(std::iter::repeat_n(self.pad_id, width - item.len()));
            mask.extend(std::iter::repeat_n(1u32, item.len()));
            mask.extend(std::iter::repeat_n(0u32, width - item.len()));
        }
        let dev = Device::Cpu;
        let ids = Tensor::from_vec(ids, (batch.len(), width), &dev)?;
        let mask = Tensor::from_vec(mask, (batch.len(), width), &dev)?;
        let hidden = (self.encode)(&ids, &mask)?; // (b, t, d)
        let maskf = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (b, t, 1)
        let pooled = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean | Pooling::MeanSqrtLen => {
                let sum = hidden.broadcast_mul(&maskf)?.sum(1)?;
                let count = maskf.sum(1)?; // (b, 1)
                let denom = if self.pooling == Pooling::Mean {
                    count
                } else {
                    count.sqrt()?
                };
                sum.broadcast_div(&denom)?
            }
            Pooling::Max => {
                // Padding positions must never win the max.
                let neg = ((maskf.ones_like()? - &maskf)? * -1e9)?;
                hidden.broadcast_add(&neg)?.max(1)?
            }
        };
        let pooled = if self.normalize {
            let norm = pooled
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .clamp(1e-12, f64::INFINITY)?;
            pooled.broadcast_div(&norm)?
        } else {
            pooled
        };
        Ok(pooled.to_vec2::<f32>()?)
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
    encode: EncodeFn,
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
pub(super) fn load(dir: &Path) -> Result<LoadedModel> {
    let config: Config = read_json(&dir.join("config.json"))?;
    let vb = super::layers::var_builder(dir, DType::F32, &Device::Cpu)?;
    // Checkpoints saved from BertModel have no "bert." prefix; those from task heads do.
    let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
        vb
    } else {
        vb.pp("bert")
    };
    let model = BertModel::load(vb, &config).map_err(|e| super::layers::weights_error(dir, e))?;
    let encode: EncodeFn =
        Box::new(move |ids, mask| model.forward(ids, &ids.zeros_like()?, Some(mask)));
    sentence_embedder(
        dir,
        encode,
        config.hidden_size,
        config.max_position_embeddings,
        config.pad_token_id as u32,
        config.vocab_size,
    )
}
