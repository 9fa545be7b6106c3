//! A loaded model as the engine sees it: a backend behind a trait, its tokenizer, and for
//! generation the chat template and end-of-generation tokens. No candle types here.

use crate::backend::{CausalLm, Embedder};
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
    /// Sequence classification: /v1/classify. Accepted on the command line (the operator's
    /// task names); no model of this runtime serves it yet, so asking for it fails the load.
    #[value(name = "Classification", alias = "classification")]
    Classification,
    /// Sequence-to-sequence generation (T5-like). Accepted like `Classification`, refused at
    /// load until a backend serves it.
    #[value(name = "Text2Text", alias = "text2text")]
    Text2Text,
}

/// A text-generation model.
pub struct GenerationModel {
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
    /// Tokenises (with [CLS]/[SEP] and truncation) and embeds a batch of texts.
    pub fn embed_texts(&self, texts: &[&str]) -> crate::Result<Vec<Vec<f32>>> {
        let ids = texts
            .iter()
            .map(|t| self.tokenizer.encode(t, true))
            .collect::<crate::Result<Vec<_>>>()?;
        self.model.embed(&ids)
    }
}

/// Either kind of model.
pub enum LoadedModel {
    Generation(GenerationModel),
    Embedding(EmbeddingModel),
}

impl LoadedModel {
    /// The task this model serves.
    pub fn task(&self) -> Task {
        match self {
            LoadedModel::Generation(_) => Task::TextGeneration,
            LoadedModel::Embedding(_) => Task::Embedding,
        }
    }
}
