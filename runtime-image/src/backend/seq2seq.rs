//! Encoder-decoder (text-to-text) models behind the engine's causal-LM traits.
//!
//! An architecture ([`EncoderDecoder`]: t5, blenderbot-small) runs batched, right-padded
//! encoder inputs and decoder steps over a [`DecoderState`]: the encoder's padding mask, each
//! decoder layer's cross-attention K/V (computed once, right after the encoder) and each decoder
//! layer's self-attention KV cache.
//!
//! The engine only knows causal LMs, so [`Seq2SeqLm`] adapts: a sequence's first `feed` is the
//! prompt, which runs the encoder and then the decoder on `[decoder_start_token_id]` and returns
//! those logits; every later `feed` is the token the engine sampled, fed to the decoder. The
//! engine's scheduling, sampling, streaming and stop handling are thus reused unchanged. A
//! sequence's `len` counts encoder plus decoder tokens, so the engine's single context budget
//! (prompt + output) is a conservative bound for both stacks.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::{CausalLm, Sequence};
use crate::error::{Error, Result, read_json};
use crate::model::{GenerationModel, LoadedModel, Task};
use crate::tokenizer::TextTokenizer;

/// Mask value for positions a query must not see; finite so that sums of biases stay finite.
const MASKED: f32 = -1e9;

/// One encoder-decoder architecture, batched.
pub(crate) trait EncoderDecoder: Send + Sync {
    /// Runs the encoder on right-padded `ids` (batch, len) with `mask` (batch, len; 1 = token,
    /// 0 = padding) and prepares the decoder's cross-attention.
    fn encode(&self, ids: &Tensor, mask: &Tensor) -> Result<DecoderState>;
    /// Feeds decoder tokens `ids` (b, t) to `b = states.len()` sequences, each with its own
    /// state, at their next positions; returns the logits (b, vocab) at the last one. The
    /// engine's decode step is `t = 1` for all the running sequences: every weight product
    /// takes their rows at once, attention runs per sequence ([`self_attend_each`],
    /// [`cross_attend_each`]).
    fn decode(&self, states: &mut [&mut DecoderState], ids: &Tensor) -> Result<Tensor>;
    /// The first decoder input.
    fn decoder_start_token_id(&self) -> u32;
    fn vocab_size(&self) -> usize;
    /// The longest encoder input, and the longest decoder output.
    fn context_length(&self) -> usize;
    /// Where the weights are, and the inputs must be.
    fn device(&self) -> &Device;
}

/// Per-request decoder state.
pub(crate) struct DecoderState {
    /// Per decoder layer: the encoder output projected to keys and values, (b, heads, s, d).
    pub cross_kv: Vec<(Tensor, Tensor)>,
    /// Additive mask over encoder positions, (b, 1, 1, s).
    pub cross_bias: Tensor,
    /// Per decoder layer: the self-attention keys and values so far, (b, heads, t, d).
    pub self_kv: Vec<Option<(Tensor, Tensor)>>,
    /// Decoder tokens fed so far.
    pub len: usize,
}

impl DecoderState {
    pub fn new(cross_kv: Vec<(Tensor, Tensor)>, mask: &Tensor) -> Result<Self> {
        let n = cross_kv.len();
        Ok(DecoderState {
            cross_kv,
            cross_bias: padding_bias(mask)?,
            self_kv: vec![None; n],
            len: 0,
        })
    }
}

/// (b, t, heads*d) -> (b, heads, t, d), contiguous.
pub(crate) fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, hd) = x.dims3()?;
    Ok(x.reshape((b, t, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// (b, heads, t, d) -> (b, t, heads*d).
pub(crate) fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))?)
}

/// softmax(q kᵀ + bias) v over (b, heads, ·, d); any scaling is the caller's.
pub(crate) fn attend(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let scores = q.matmul(&k.t()?.contiguous()?)?;
    let scores = match bias {
        Some(b) => scores.broadcast_add(b)?,
        None => scores,
    };
    let p = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(p.matmul(v)?)
}

/// Sequence `i`'s rows of a `(b, …)` tensor: all of them when one state holds the whole
/// batch (`n == 1`: a padded batch run through one state), else row `i` as `(1, …)`.
fn rows_of(x: &Tensor, i: usize, n: usize) -> Result<Tensor> {
    Ok(match n {
        1 => x.contiguous()?,
        _ => x.narrow(0, i, 1)?.contiguous()?,
    })
}

/// Decoder self-attention of `b` sequences' new rows: `k`, `v` `(b, heads, t, d)` go onto each
/// sequence's cache for `layer`, and `q` `(b, heads, t, d)` attends to that cache with the
/// sequence's `biases[i]` (its relative positions, causal mask). `(b, heads, t, d)`.
pub(crate) fn self_attend_each(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    layer: usize,
    states: &mut [&mut DecoderState],
    biases: &[Option<Tensor>],
) -> Result<Tensor> {
    let n = states.len();
    let mut out = Vec::with_capacity(n);
    for (i, st) in states.iter_mut().enumerate() {
        let (ki, vi) = append_kv(&mut st.self_kv[layer], rows_of(k, i, n)?, rows_of(v, i, n)?)?;
        out.push(attend(&rows_of(q, i, n)?, &ki, &vi, biases[i].as_ref())?);
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// Cross-attention of `b` sequences' new rows `q` `(b, heads, t, d)`, each against its own
/// encoder output and padding mask. `(b, heads, t, d)`.
pub(crate) fn cross_attend_each(
    q: &Tensor,
    layer: usize,
    states: &[&mut DecoderState],
) -> Result<Tensor> {
    let n = states.len();
    let mut out = Vec::with_capacity(n);
    for (i, st) in states.iter().enumerate() {
        let (ck, cv) = &st.cross_kv[layer];
        out.push(attend(&rows_of(q, i, n)?, ck, cv, Some(&st.cross_bias))?);
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// Appends this step's keys and values to a layer's cache and returns the whole cache.
fn append_kv(
    cache: &mut Option<(Tensor, Tensor)>,
    k: Tensor,
    v: Tensor,
) -> Result<(Tensor, Tensor)> {
    let kv = match cache.take() {
        Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        None => (k, v),
    };
    *cache = Some(kv.clone());
    Ok(kv)
}

/// (b, s) 1/0 mask -> (b, 1, 1, s) additive bias.
pub(crate) fn padding_bias(mask: &Tensor) -> Result<Tensor> {
    let (b, s) = mask.dims2()?;
    let keep = mask.to_dtype(candle_core::DType::F32)?;
    let bias = ((keep.ones_like()? - keep)? * MASKED as f64)?;
    Ok(bias.reshape((b, 1, 1, s))?)
}

/// Causal bias for `t` new queries after `past` cached positions: (1, 1, t, past + t).
pub(crate) fn causal_bias(past: usize, t: usize, dev: &Device) -> Result<Tensor> {
    let k = past + t;
    let v: Vec<f32> = (0..t)
        .flat_map(|i| (0..k).map(move |j| if j > past + i { MASKED } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(v, (1, 1, t, k), dev)?)
}

/// An activation named as in transformers' `ACT2FN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Act {
    Relu,
    /// erf GELU (`gelu`).
    Gelu,
    /// tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Silu,
}

impl Act {
    pub fn parse(name: &str) -> Result<Act> {
        Ok(match name {
            "relu" => Act::Relu,
            "gelu" => Act::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Act::GeluTanh,
            "silu" | "swish" => Act::Silu,
            other => {
                return Err(Error::Model(format!(
                    "activation {other:?} is not supported (relu, gelu, gelu_new, silu)"
                )));
            }
        })
    }
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Act::Relu => x.relu()?,
            Act::Gelu => x.gelu_erf()?,
            Act::GeluTanh => x.gelu()?,
            Act::Silu => x.silu()?,
        })
    }
}

/// The generation defaults of a model directory: config.json, overridden by
/// generation_config.json where it says more (as transformers' `generate` does).
pub(crate) struct GenerationDefaults {
    pub eos_ids: Vec<u32>,
    pub decoder_start_token_id: Option<u32>,
}

fn ids_of(v: Option<&serde_json::Value>) -> Option<Vec<u32>> {
    match v? {
        serde_json::Value::Number(n) => n.as_u64().map(|i| vec![i as u32]),
        serde_json::Value::Array(a) => Some(
            a.iter()
                .filter_map(|x| x.as_u64().map(|i| i as u32))
                .collect(),
        ),
        _ => None,
    }
}

impl GenerationDefaults {
    pub fn read(dir: &Path, config: &serde_json::Value) -> Result<Self> {
        let mut eos_ids = ids_of(config.get("eos_token_id")).unwrap_or_default();
        let mut start = config
            .get("decoder_start_token_id")
            .and_then(|v| v.as_u64())
            .map(|i| i as u32);
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let g: serde_json::Value = read_json(&gen_path)?;
            if let Some(e) = ids_of(g.get("eos_token_id")) {
                eos_ids = e;
            }
            if let Some(s) = g.get("decoder_start_token_id").and_then(|v| v.as_u64()) {
                start = Some(s as u32);
            }
        }
        Ok(GenerationDefaults {
            eos_ids,
            decoder_start_token_id: start,
        })
    }
}

/// Adapts an [`EncoderDecoder`] to the engine's [`CausalLm`].
struct Seq2SeqLm {
    model: Arc<dyn EncoderDecoder>,
}

struct Seq2SeqSequence {
    model: Arc<dyn EncoderDecoder>,
    state: Option<DecoderState>,
    encoder_len: usize,
}

impl CausalLm for Seq2SeqLm {
    fn new_sequence(&self) -> Result<Box<dyn Sequence>> {
        Ok(Box::new(Seq2SeqSequence {
            model: self.model.clone(),
            state: None,
            encoder_len: 0,
        }))
    }
    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }
    fn context_length(&self) -> usize {
        self.model.context_length()
    }
    /// One decoder pass for all the sequences past their prompt ([`EncoderDecoder::decode`]).
    fn decode_batch(
        &self,
        seqs: &mut [&mut dyn Sequence],
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        let Some(own) = super::own_sequences::<Seq2SeqSequence>(seqs, tokens.len(), |q| {
            Arc::ptr_eq(&q.model, &self.model) && q.state.is_some()
        }) else {
            return super::decode_each(seqs, tokens);
        };
        let mut states: Vec<&mut DecoderState> =
            own.into_iter().filter_map(|q| q.state.as_mut()).collect();
        let ids = Tensor::new(tokens, self.model.device())?.unsqueeze(1)?;
        let logits = self.model.decode(&mut states, &ids)?;
        Ok(logits.to_vec2::<f32>()?)
    }
}

impl Sequence for Seq2SeqSequence {
    /// The first call takes the encoder input; later calls take decoder tokens.
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::InvalidRequest("no tokens to feed".into()));
        }
        let (mut state, input) = match self.state.take() {
            Some(state) => (state, tokens.to_vec()),
            None => {
                let ids = Tensor::new(tokens, self.model.device())?.unsqueeze(0)?;
                let state = self.model.encode(&ids, &ids.ones_like()?)?;
                self.encoder_len = tokens.len();
                (state, vec![self.model.decoder_start_token_id()])
            }
        };
        let input = Tensor::new(input.as_slice(), self.model.device())?.unsqueeze(0)?;
        let logits = self.model.decode(&mut [&mut state], &input);
        self.state = Some(state);
        let logits = logits?;
        Ok(logits.squeeze(0)?.to_vec1::<f32>()?)
    }
    fn len(&self) -> usize {
        self.encoder_len + self.state.as_ref().map_or(0, |s| s.len)
    }
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
}

/// A loaded encoder-decoder before it is wrapped for the engine.
pub(crate) struct Seq2SeqParts {
    pub model: Arc<dyn EncoderDecoder>,
    pub tokenizer: TextTokenizer,
    /// Tokens that end generation.
    pub eos_ids: Vec<u32>,
}

impl Seq2SeqParts {
    /// Wraps the model as a text-to-text [`LoadedModel`]. Prompts are tokenised with the
    /// tokenizer's own post-processor (T5 appends `</s>`); there is no chat template.
    pub fn into_loaded(self) -> LoadedModel {
        LoadedModel::Generation(GenerationModel {
            task: Task::Text2Text,
            lm: Box::new(Seq2SeqLm { model: self.model }),
            tokenizer: self.tokenizer,
            chat_template: None,
            eos_ids: self.eos_ids,
            bos_to_prepend: None,
        })
    }
}

#[cfg(test)]
mod tests;
