//! Building blocks shared by the hand-written architectures (gpt2, gptj, bloom, distilbert):
//! weight loading with errors that name the model directory, GPT-2's transposed `Conv1D`
//! linears, a per-sequence KV cache, and masked scaled-dot-product attention.
//!
//! Tensors are `(batch, heads, time, head_dim)` throughout; a causal sequence has batch 1.

use std::path::Path;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// Turns a candle error met while reading weights into a load-time refusal. candle's messages
/// already name the tensor ("cannot find tensor transformer.h.0.ln_1.weight", "shape mismatch
/// for ..."), so they are kept whole.
pub(super) fn weights_error(dir: &Path, e: candle_core::Error) -> Error {
    Error::Model(format!("weights in {}: {e}", dir.display()))
}

/// Memory-maps the directory's safetensors files.
pub(super) fn var_builder(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let files = super::llama::safetensors_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; kandle owns the model directory and does
    // not modify it while serving.
    unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
        .map_err(|e| weights_error(dir, e))
}

/// The base model's weights: under `transformer.` when saved from a `*LMHeadModel` /
/// `*ForCausalLM` class (transformers today), at the root in older hub checkpoints saved from
/// the base class (openai-community/gpt2, bigscience/bloom-560m). `probe` is a tensor of the
/// base model, named without the prefix.
pub(super) fn transformer_root<'a>(vb: &VarBuilder<'a>, probe: &str) -> VarBuilder<'a> {
    if vb.contains_tensor(&format!("transformer.{probe}")) || !vb.contains_tensor(probe) {
        vb.pp("transformer")
    } else {
        vb.clone()
    }
}

/// GPT-2's `Conv1D`: a linear layer whose weight is stored `(in, out)`.
pub(super) fn conv1d(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
) -> candle_core::Result<super::few_rows::FewRows> {
    let w = vb.get((in_dim, out_dim), "weight")?.t()?.contiguous()?;
    let b = vb.get(out_dim, "bias")?;
    Ok(super::few_rows::FewRows::new(w, Some(b)))
}

/// Keys and values of every layer of one sequence, `(1, heads, len, head_dim)` each. A step
/// replaces a layer's tensors ([`KvCache::append`]) and never writes into them, so a clone
/// (a forked sequence) shares them safely.
#[derive(Default, Clone)]
pub(super) struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub(super) fn new(layers: usize) -> Self {
        KvCache {
            layers: vec![None; layers],
        }
    }

    /// Appends this step's keys and values for `layer` and returns all of them so far.
    pub(super) fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (k, v) = match self.layers[layer].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

/// The additive causal mask for `t` new positions after `past` cached ones: `(t, past + t)`,
/// 0 where a query may look and -inf where it may not.
pub(super) fn causal_mask(t: usize, past: usize, device: &Device) -> candle_core::Result<Tensor> {
    let total = past + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, total), device)
}

/// [`causal_mask`] within a sliding window of `window` positions: the query at position `p`
/// sees `p − window + 1 ..= p` (transformers' and llama.cpp's sliding window), over the keys
/// of positions `start..past + t`: `(t, past + t − start)`.
pub(super) fn sliding_mask(
    t: usize,
    past: usize,
    start: usize,
    window: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let total = past + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            let p = past + i;
            (start..total).map(move |j| match j > p || j + window <= p {
                true => f32::NEG_INFINITY,
                false => 0.0,
            })
        })
        .collect();
    Tensor::from_vec(mask, (t, total - start), device)
}

/// softmax(q·kᵀ · scale + bias) · v, in f32. `bias` broadcasts to `(b, h, t_q, t_k)`: the
/// causal or padding mask, plus ALiBi for bloom.
pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: &Tensor,
) -> candle_core::Result<Tensor> {
    let dtype = q.dtype();
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    let k = k.to_dtype(DType::F32)?.contiguous()?;
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(bias)?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dtype)?;
    probs.matmul(&v.contiguous()?)
}

/// Attention of `b` sequences, `t` new rows each, against their own caches: `q`, `k`, `v` are
/// `(b, heads, t, d)`; sequence `i`'s keys and values are appended to `caches[i]` for `layer`,
/// and `bias(i, total)` is its additive bias for `total` cached positions (its causal mask,
/// ALiBi), broadcast to `(1, heads, t, total)`. Returns `(b, heads, t, d)`.
pub(super) fn attend_each(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    layer: usize,
    caches: &mut [&mut KvCache],
    scale: f64,
    bias: &dyn Fn(usize, usize) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let mut out = Vec::with_capacity(caches.len());
    for (i, cache) in caches.iter_mut().enumerate() {
        let row = |x: &Tensor| -> candle_core::Result<Tensor> {
            if x.dim(0)? == 1 {
                x.contiguous()
            } else {
                x.narrow(0, i, 1)?.contiguous()
            }
        };
        let (ki, vi) = cache.append(layer, row(k)?, row(v)?)?;
        out.push(attention(&row(q)?, &ki, &vi, scale, &bias(i, ki.dim(2)?)?)?);
    }
    if out.len() == 1 {
        return Ok(out.remove(0));
    }
    Tensor::cat(&out, 0)
}

/// The positions of `t` new tokens after `pasts[i]` cached ones, sequence after sequence:
/// `(b · t,)`.
pub(super) fn positions(pasts: &[usize], t: usize, device: &Device) -> candle_core::Result<Tensor> {
    let p: Vec<u32> = pasts
        .iter()
        .flat_map(|&past| (past..past + t).map(|p| p as u32))
        .collect();
    Tensor::new(p.as_slice(), device)
}

/// `(b, t, heads * d)` → `(b, heads, t, d)`.
pub(super) fn split_heads(x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (b, t, hd) = x.dims3()?;
    x.reshape((b, t, heads, hd / heads))?.transpose(1, 2)
}

/// `(b, heads, t, d)` → `(b, t, heads * d)`.
pub(super) fn merge_heads(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))
}

/// Reads `eos_token_id` (a number or a list) from generation_config.json, else config.json.
pub(super) fn eos_ids(dir: &Path, config: &serde_json::Value) -> Result<Vec<u32>> {
    let gen_path = dir.join("generation_config.json");
    let from_gen: Option<serde_json::Value> = if gen_path.exists() {
        let g: serde_json::Value = crate::error::read_json(&gen_path)?;
        g.get("eos_token_id").cloned()
    } else {
        None
    };
    let v = from_gen
        .filter(|v| !v.is_null())
        .or_else(|| config.get("eos_token_id").cloned())
        .unwrap_or(serde_json::Value::Null);
    Ok(match v {
        serde_json::Value::Number(n) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|n| n as u32))
            .collect(),
        _ => Vec::new(),
    })
}

/// Refuses a tokenizer that can produce ids the embedding matrix does not have. A tokenizer
/// smaller than `vocab_size` is accepted: checkpoints often pad the matrix to a round size.
pub(super) fn check_vocab(
    tokenizer: &crate::tokenizer::TextTokenizer,
    vocab_size: usize,
) -> Result<()> {
    let n = tokenizer.vocab_size();
    if n > vocab_size {
        return Err(Error::Model(format!(
            "the tokenizer has {n} tokens but config.json vocab_size is {vocab_size}: \
             this tokenizer does not belong to these weights"
        )));
    }
    Ok(())
}

/// One forward pass of a hand-written causal LM: the new tokens of `b = pasts.len()`
/// sequences, `t` each (`tokens` holds them sequence after sequence, `b · t`), after
/// `pasts[i]` positions held in `caches[i]`; returns the logits at each sequence's last new
/// position, `(b, vocab)`. A prompt is one sequence; a decode step of the running batch is
/// `t = 1`: every weight product takes the rows of all sequences at once, attention runs per
/// sequence ([`attend_each`]).
pub(super) trait CausalForward: Send + Sync + 'static {
    fn forward(
        &self,
        tokens: &[u32],
        pasts: &[usize],
        caches: &mut [&mut KvCache],
    ) -> candle_core::Result<Tensor>;
    fn num_layers(&self) -> usize;
}

/// Wraps a [`CausalForward`] as the engine's [`CausalLm`](super::CausalLm).
pub(super) struct Lm<M> {
    pub(super) model: std::sync::Arc<M>,
    pub(super) vocab_size: usize,
    pub(super) context_length: usize,
}

struct LmSequence<M> {
    model: std::sync::Arc<M>,
    cache: KvCache,
    len: usize,
}

impl<M: CausalForward> super::CausalLm for Lm<M> {
    fn new_sequence(&self) -> Result<Box<dyn super::Sequence>> {
        Ok(Box::new(LmSequence {
            model: self.model.clone(),
            cache: KvCache::new(self.model.num_layers()),
            len: 0,
        }))
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn context_length(&self) -> usize {
        self.context_length
    }
    /// One forward pass for all the sequences: their new tokens are the rows of every weight
    /// product; attention per sequence on its own cache.
    fn decode_batch(
        &self,
        seqs: &mut [&mut dyn super::Sequence],
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        let Some(mut own) = super::own_sequences::<LmSequence<M>>(seqs, tokens.len(), |q| {
            std::sync::Arc::ptr_eq(&q.model, &self.model)
        }) else {
            return super::decode_each(seqs, tokens);
        };
        let pasts: Vec<usize> = own.iter().map(|s| s.len).collect();
        let mut caches: Vec<&mut KvCache> = own.iter_mut().map(|s| &mut s.cache).collect();
        let logits = self.model.forward(tokens, &pasts, &mut caches)?;
        for s in own.iter_mut() {
            s.len += 1;
        }
        Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }
}

impl<M: CausalForward> super::Sequence for LmSequence<M> {
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::InvalidRequest("no tokens to feed".into()));
        }
        let logits = self
            .model
            .forward(tokens, &[self.len], &mut [&mut self.cache])?;
        self.len += tokens.len();
        Ok(logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }
    fn len(&self) -> usize {
        self.len
    }
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
    fn fork(&self) -> Option<Box<dyn super::Sequence>> {
        Some(Box::new(LmSequence {
            model: self.model.clone(),
            cache: self.cache.clone(),
            len: self.len,
        }))
    }
}

/// What a hand-written causal LM needs besides its weights to become a served model: the
/// tokenizer (checked against `vocab_size`), the chat template and the end tokens.
pub(super) fn generation_model<M: CausalForward>(
    dir: &Path,
    raw_config: &serde_json::Value,
    model: M,
    vocab_size: usize,
    context_length: usize,
) -> Result<crate::model::LoadedModel> {
    let tokenizer = super::tokenizer_json(dir)?;
    check_vocab(&tokenizer, vocab_size)?;
    let tcfg = super::read_tokenizer_config(dir)?;
    let chat_template = tcfg
        .as_ref()
        .map(super::chat_template_from_config)
        .transpose()?
        .flatten();
    let eos = eos_ids(dir, raw_config)?;
    let lm = Lm {
        model: std::sync::Arc::new(model),
        vocab_size,
        context_length,
    };
    Ok(super::generation_model(
        Box::new(lm),
        tokenizer,
        chat_template,
        eos,
        None,
        false,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_causal_mask_lets_each_new_position_see_the_cache_and_itself() {
        let m = causal_mask(2, 3, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(m[0][..4], [0.0; 4]);
        assert_eq!(m[0][4], f32::NEG_INFINITY);
        assert_eq!(m[1], vec![0.0; 5]);
    }

    /// Rows at positions 4, 5 and 6 with a window of 3, over the keys from position 2: each
    /// sees itself and the two before it, nothing later.
    #[test]
    fn the_sliding_mask_lets_each_position_see_its_window_from_the_first_key_read() {
        let m = sliding_mask(3, 4, 2, 3, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let seen: Vec<Vec<usize>> = m
            .iter()
            .map(|row| (2..7).filter(|j| row[j - 2] == 0.0).collect())
            .collect();
        assert_eq!(seen, [vec![2, 3, 4], vec![3, 4, 5], vec![4, 5, 6]]);
        assert!(
            m.iter()
                .flatten()
                .all(|v| *v == 0.0 || *v == f32::NEG_INFINITY)
        );
    }

    #[test]
    fn the_kv_cache_grows_along_time() {
        let mut c = KvCache::new(1);
        let x = Tensor::zeros((1, 2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        c.append(0, x.clone(), x.clone()).unwrap();
        let (k, _) = c
            .append(0, x.narrow(2, 0, 1).unwrap(), x.narrow(2, 0, 1).unwrap())
            .unwrap();
        assert_eq!(k.dims(), &[1, 2, 4, 4]);
    }
}
