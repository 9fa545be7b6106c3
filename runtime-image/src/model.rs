//! A loaded model as the engine sees it: a backend behind a trait, its tokenizer, and for
//! generation the chat template and end-of-generation tokens. No candle types here.

use crate::backend::{CausalLm, Classifier, Embedder};
use crate::chat::ChatTemplate;
use crate::tokenizer::TextTokenizer;

/// What a served model does.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum Task {
    /// Causal language model: /v1/chat/completions and /v1/completions.
    #[value(name = "TextGeneration", alias = "text-generation")]
    TextGeneration,
    /// Sentence embeddings: /v1/embeddings.
    #[value(name = "Embedding", alias = "embedding")]
    Embedding,
    /// Sequence classification: /v1/classify.
    #[value(name = "Classification", alias = "classification")]
    Classification,
    /// Encoder-decoder (t5, blenderbot-small): /v1/completions, the prompt is the encoder input.
    #[value(name = "Text2Text", alias = "text2text-generation")]
    Text2Text,
}

/// A text-generation model.
pub struct GenerationModel {
    /// [`Task::TextGeneration`], or [`Task::Text2Text`] for an encoder-decoder behind the
    /// causal-LM traits (its first `feed` is the encoder input).
    pub task: Task,
    pub lm: Box<dyn CausalLm>,
    pub tokenizer: TextTokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Tokens that end generation (finish_reason "stop").
    pub eos_ids: Vec<u32>,
    /// A BOS id that the runtime prepends itself (GGUF `add_bos_token`); tokenizer.json
    /// post-processors add theirs during encoding instead.
    pub bos_to_prepend: Option<u32>,
}

/// A sentence-embedding model.
pub struct EmbeddingModel {
    pub model: Box<dyn Embedder>,
    /// Truncates to the model's maximum input length.
    pub tokenizer: TextTokenizer,
}

impl EmbeddingModel {
    /// Tokenises (with `[CLS]`/`[SEP]` and truncation) and embeds a batch of texts.
    pub fn embed_texts(&self, texts: &[&str]) -> crate::Result<Vec<Vec<f32>>> {
        let ids = texts
            .iter()
            .map(|t| self.tokenizer.encode(t, true))
            .collect::<crate::Result<Vec<_>>>()?;
        self.model.embed(&ids)
    }
}

/// How a classifier's logits become scores, as transformers' text-classification pipeline
/// decides (`function_to_apply` left at its default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// Softmax over the labels: single-label heads with two or more labels.
    Softmax,
    /// An independent sigmoid per label: one-label (regression-like) and multi-label heads.
    Sigmoid,
}

impl Scoring {
    /// The pipeline's rule: sigmoid for `num_labels == 1` or `multi_label_classification`.
    pub fn for_head(num_labels: usize, multi_label: bool) -> Self {
        if num_labels == 1 || multi_label {
            Scoring::Sigmoid
        } else {
            Scoring::Softmax
        }
    }

    /// Scores of one row of logits, computed in f64.
    pub fn apply(&self, logits: &[f32]) -> Vec<f32> {
        match self {
            Scoring::Sigmoid => logits
                .iter()
                .map(|&l| (1.0 / (1.0 + (-(l as f64)).exp())) as f32)
                .collect(),
            Scoring::Softmax => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let exps: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                exps.iter().map(|e| (e / sum) as f32).collect()
            }
        }
    }
}

/// One label of one input, as /v1/classify reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelScore {
    pub index: usize,
    pub label: String,
    pub score: f32,
    pub logit: f32,
}

/// Labels of one row of logits, best first (ties keep label order); `top_k` cuts the list.
pub fn rank_labels(
    labels: &[String],
    scoring: Scoring,
    logits: &[f32],
    top_k: Option<usize>,
) -> Vec<LabelScore> {
    let scores = scoring.apply(logits);
    let mut out: Vec<LabelScore> = logits
        .iter()
        .zip(&scores)
        .enumerate()
        .map(|(i, (&logit, &score))| LabelScore {
            index: i,
            label: labels
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("LABEL_{i}")),
            score,
            logit,
        })
        .collect();
    out.sort_by(|a, b| b.logit.total_cmp(&a.logit).then(a.index.cmp(&b.index)));
    if let Some(k) = top_k {
        out.truncate(k);
    }
    out
}

/// The cosine of the angle between two vectors (0 where either is all zeros), in f64 sums.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    match aa * bb {
        n if n > 0.0 => (ab / n.sqrt()) as f32,
        _ => 0.0,
    }
}

/// Label names from config.json's `id2label` (`{"0": "NEGATIVE", ...}`), `LABEL_i` where it
/// is absent, as transformers does. A map that disagrees with the head is refused.
pub fn labels_from_config(
    config: &serde_json::Value,
    num_labels: usize,
) -> Result<Vec<String>, String> {
    let mut labels: Vec<String> = (0..num_labels).map(|i| format!("LABEL_{i}")).collect();
    if let Some(map) = config.get("id2label").and_then(|m| m.as_object()) {
        if map.len() != num_labels {
            return Err(format!(
                "config.json id2label has {} labels but the classifier head has {num_labels}",
                map.len()
            ));
        }
        for (k, v) in map {
            let i: usize = k
                .parse()
                .ok()
                .filter(|i| *i < num_labels)
                .ok_or_else(|| format!("config.json id2label has an invalid id {k:?}"))?;
            labels[i] = v
                .as_str()
                .ok_or_else(|| format!("config.json id2label[{k:?}] is not a string"))?
                .to_owned();
        }
    }
    Ok(labels)
}

/// A sequence-classification model.
pub struct ClassificationModel {
    pub model: Box<dyn Classifier>,
    /// Adds the model's special tokens and truncates to its maximum input length.
    pub tokenizer: TextTokenizer,
    /// Label names by index (`id2label`).
    pub labels: Vec<String>,
    pub scoring: Scoring,
}

impl ClassificationModel {
    /// Tokenises and classifies a batch of texts; raw logits per text.
    pub fn classify_texts(&self, texts: &[&str]) -> crate::Result<Vec<Vec<f32>>> {
        let ids = texts
            .iter()
            .map(|t| self.tokenizer.encode(t, true))
            .collect::<crate::Result<Vec<_>>>()?;
        self.model.classify(&ids)
    }
}

/// Any kind of model.
// Built once per process and moved into the engine at once: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum LoadedModel {
    Generation(GenerationModel),
    Embedding(EmbeddingModel),
    Classification(ClassificationModel),
}

impl LoadedModel {
    /// The task this model serves.
    pub fn task(&self) -> Task {
        match self {
            LoadedModel::Generation(g) => g.task,
            LoadedModel::Embedding(_) => Task::Embedding,
            LoadedModel::Classification(_) => Task::Classification,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_is_the_angle_s_cosine() {
        assert!((cosine(&[1.0, 0.0], &[1.0, 1.0]) - 0.70710677).abs() < 1e-7);
        assert_eq!(cosine(&[2.0, 0.0], &[-3.0, 0.0]), -1.0);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }

    #[test]
    fn softmax_scores_sum_to_one_and_labels_come_best_first() {
        let labels = vec!["neg".to_owned(), "neu".to_owned(), "pos".to_owned()];
        let ranked = rank_labels(&labels, Scoring::Softmax, &[0.5, -1.0, 2.0], None);
        let names: Vec<&str> = ranked.iter().map(|l| l.label.as_str()).collect();
        assert_eq!(names, ["pos", "neg", "neu"]);
        let sum: f32 = ranked.iter().map(|l| l.score).sum();
        assert!((sum - 1.0).abs() < 1e-6);
        let e = [0.5f64.exp(), (-1.0f64).exp(), 2.0f64.exp()];
        assert!((ranked[0].score as f64 - e[2] / e.iter().sum::<f64>()).abs() < 1e-7);
        assert_eq!(
            rank_labels(&labels, Scoring::Softmax, &[0.5, -1.0, 2.0], Some(1)).len(),
            1
        );
    }

    #[test]
    fn one_label_heads_and_multi_label_heads_use_a_sigmoid() {
        assert_eq!(Scoring::for_head(1, false), Scoring::Sigmoid);
        assert_eq!(Scoring::for_head(3, true), Scoring::Sigmoid);
        assert_eq!(Scoring::for_head(2, false), Scoring::Softmax);
        assert!((Scoring::Sigmoid.apply(&[0.0])[0] - 0.5).abs() < 1e-7);
    }

    #[test]
    fn labels_come_from_id2label_and_a_mismatched_map_is_refused() {
        let cfg = serde_json::json!({"id2label": {"1": "POSITIVE", "0": "NEGATIVE"}});
        assert_eq!(
            labels_from_config(&cfg, 2).unwrap(),
            ["NEGATIVE", "POSITIVE"]
        );
        assert_eq!(
            labels_from_config(&serde_json::json!({}), 2).unwrap(),
            ["LABEL_0", "LABEL_1"]
        );
        assert!(labels_from_config(&cfg, 3).unwrap_err().contains("3"));
    }
}
