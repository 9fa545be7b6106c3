//! A llama forward pass on candle's tensor operations, which every candle device runs (the
//! CPU and CUDA), with the decode steps of concurrent sequences batched: their new tokens are
//! the rows of each weight product, so one pass over the weights advances them all, as vLLM
//! and TGI batch on a GPU. Attention runs per sequence, on its own cache. Safetensors llama
//! models run on it on every device; GGUF llama models run on it on a GPU, where kandle's own
//! quantised kernels ([`super::qllama`], CPU only) do not, with candle's quantised products.
//!
//! The arithmetic is candle-transformers' `llama` (and `quantized_llama` for GGUF): weights and
//! activations in the model's dtype, attention scores and softmax in f32, the rotary embedding
//! on halves (transformers checkpoints) or on interleaved pairs (GGUF, whose q and k rows
//! llama.cpp's converter permuted).
//!
//! **Cache.** Each layer's keys and values are one `(kv_heads, capacity, head_dim)` tensor per
//! sequence, written in place at the sequence's next positions; the capacity doubles when a
//! step needs more (candle's `llama` instead concatenates a new tensor each step, which copies
//! the whole cache every token). A sequence never writes below its own length, and a fork
//! copies the positions it keeps.
//!
//! **Batches and bits.** A row's logits may depend, in their last bits, on how many rows went
//! through a product with it (a matrix product picks its blocking by shape; cuBLAS picks its
//! kernel), as with vLLM and TGI: a greedy token can then go either way at a near-tie. So
//! [`CausalLm::continuation_is_exact`] is false here and the engine's prefix cache stays off.

use std::sync::Arc;

use candle_core::{D, DType, Device, Module, Tensor};

use super::{CausalLm, Sequence};
use crate::error::{Error, Result};

/// A weight product `x · Wᵀ` of rows `x`: a dense `candle_nn::Linear` or a quantised
/// `QMatMul`.
pub(super) type Proj = Box<dyn Module + Send + Sync>;

/// How the rotary embedding pairs a head's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rope {
    /// Dimension `i` with `i + head_dim / 2` (transformers' `rotate_half`).
    Halves,
    /// Dimension `2i` with `2i + 1` (GGUF, llama.cpp's order).
    Interleaved,
}

/// A product and its bias (a GGUF's `attn_q.bias`, say): `x · Wᵀ + b`.
pub(super) struct Biased {
    pub product: Proj,
    /// `(out,)`, in the product's output dtype.
    pub bias: Tensor,
}

impl Module for Biased {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.product.forward(x)?.broadcast_add(&self.bias)
    }
}

/// One decoder layer's weights.
pub(super) struct Layer {
    pub attn_norm: Tensor,
    pub q: Proj,
    pub k: Proj,
    pub v: Proj,
    /// The weights of the RMS norm of each query and key head before the rotary (Qwen3's
    /// `q_norm` and `k_norm`), `(head_dim,)` each.
    pub qk_norm: Option<(Tensor, Tensor)>,
    /// The rotary embedding turns this layer's queries and keys (not SmolLM3's every fourth).
    pub rotates: bool,
    /// The sliding window this layer attends within (Gemma 2's every other layer).
    pub window: Option<usize>,
    pub o: Proj,
    pub mlp_norm: Tensor,
    pub mlp: Mlp,
    /// The weights of the RMS norms of the attention's and the MLP's outputs before they join
    /// the residual stream (Gemma 2's), `(hidden,)` each.
    pub post_norms: Option<(Tensor, Tensor)>,
}

/// A layer's feed-forward part: gate, up and down products, or a mixture of experts.
pub(super) enum Mlp {
    Dense { gate: Proj, up: Proj, down: Proj },
    Experts(Experts),
}

/// A mixture of experts on the tensor path: the router's weights `(experts, hidden)` in f32
/// on the device, each expert's gate, up and down products, and the routing of
/// [`super::qllama::route`] (the same choice and weights as kandle's kernels make). The
/// scores come to the host for the choice; each expert then runs on the rows that chose it
/// and its weighted outputs are added into theirs.
pub(super) struct Experts {
    pub router: Tensor,
    pub experts: Vec<[Proj; 3]>,
    pub used: usize,
    pub scale: f32,
    /// The chosen weights divided by their sum ([`super::qllama::route`]).
    pub normalise: bool,
    /// A shared expert every row takes (Qwen2-MoE's), its output weighed by the sigmoid of
    /// the row's score under the gate (`hidden` values, f32) where there is one.
    pub shared: Option<([Proj; 3], Option<Tensor>)>,
}

/// The sizes of the attention.
#[derive(Debug, Clone, Copy)]
pub(super) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// A llama's weights on one device.
pub(super) struct TensorLlama {
    /// `(vocab, hidden)`, in the activations' dtype.
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    pub head: Proj,
    pub shape: Heads,
    pub rms_eps: f32,
    /// `(positions, rotary dimensions / 2)` each (the rotary dimensions: `head_dim`, or fewer
    /// where the rotary is partial, Phi-4-mini's), in the activations' dtype ([`rope_tables`]).
    pub cos: Tensor,
    pub sin: Tensor,
    /// The windowed layers' own tables, where they turn by frequencies of their own (Gemma
    /// 3's [`super::qllama::Gemma::local_base`]).
    pub local_rope: Option<(Tensor, Tensor)>,
    pub rope: Rope,
    /// Granite's and Gemma 2's scalars ([`super::qllama::Scales::NONE`] for the others).
    pub scales: super::qllama::Scales,
    /// Mistral 3's query factor by position.
    pub temperature: Option<super::qllama::Temperature>,
    /// Gemma 2's soft-caps of the attention scores and of the logits, and its GELU.
    pub attention_cap: Option<f32>,
    pub logit_cap: Option<f32>,
    pub gelu: bool,
    /// The activations' dtype (the dense weights' too).
    pub dtype: DType,
    pub device: Device,
    pub vocab_size: usize,
    pub context_length: usize,
    /// The most prompt tokens that go through the layers at once ([`PREFILL_CHUNK`]).
    pub prefill_chunk: usize,
    /// Passes through the layers run so far ([`super::CausalLm::forward_passes`]).
    pub passes: std::sync::atomic::AtomicU64,
}

/// Rows whose logits [`TensorLlama::prefill_each`] computes at a time (33 MB of a Llama 3's
/// 128,256-token vocabulary in f32).
const EVERY_ROW_BLOCK: usize = 64;

/// Prompt tokens per pass through the layers: a 512-token part of a 4096-token prompt has
/// 32 heads × 512 × 4096 f32 attention scores (268 MB) at its last part.
pub(super) const PREFILL_CHUNK: usize = 512;

/// The rotary embedding's inverse frequency of each pair of a head's dimensions:
/// `theta^(-2i / head_dim)`, before any scaling.
pub(super) fn inverse_frequencies(theta: f32, head_dim: usize) -> Vec<f32> {
    (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f32 / head_dim as f32))
        .collect()
}

/// The rotary embedding's `cos` and `sin` tables for positions `0..positions`, from the
/// inverse frequencies of each pair of dimensions.
pub(super) fn rope_tables(
    inv_freq: &[f32],
    positions: usize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let freqs = Tensor::new(inv_freq, device)?.reshape((1, inv_freq.len()))?;
    let theta = Tensor::arange(0, positions as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((positions, 1))?
        .matmul(&freqs)?;
    Ok((theta.cos()?.to_dtype(dtype)?, theta.sin()?.to_dtype(dtype)?))
}

/// [`rope_tables`] with every `cos` and `sin` multiplied by `attention` (YaRN's magnitude
/// scale; the plain tables where it is 1).
pub(super) fn scaled_rope_tables(
    inv_freq: &[f32],
    attention: f32,
    positions: usize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    if attention == 1.0 {
        return rope_tables(inv_freq, positions, dtype, device);
    }
    let (cos, sin) = rope_tables(inv_freq, positions, DType::F32, device)?;
    let scale = |t: Tensor| (t * attention as f64)?.to_dtype(dtype);
    Ok((scale(cos)?, scale(sin)?))
}

/// The rotary `cos` and `sin` tables of a LongRoPE ([`super::qllama::LongRope`]) for positions
/// `0..positions`: those below its original context turned by the frequencies `inv` divided by
/// its short factors, the others by its long ones, every value times its attention factor.
pub(super) fn long_rope_tables(
    inv: &[f32],
    rope: &super::qllama::LongRope,
    positions: usize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let table = |factors: &[f32]| {
        let scaled: Vec<f32> = inv.iter().zip(factors).map(|(i, f)| i / f).collect();
        rope_tables(&scaled, positions, DType::F32, device)
    };
    let (short, long) = (table(&rope.short)?, table(&rope.long)?);
    let split = rope.original.min(positions);
    let join = |a: &Tensor, b: &Tensor| -> candle_core::Result<Tensor> {
        let t = match split == positions {
            true => a.clone(),
            false => Tensor::cat(
                &[
                    a.narrow(0, 0, split)?,
                    b.narrow(0, split, positions - split)?,
                ],
                0,
            )?,
        };
        (t * rope.attention as f64)?.to_dtype(dtype)
    };
    Ok((join(&short.0, &long.0)?, join(&short.1, &long.1)?))
}

/// Keys and values of every layer of one sequence.
pub(super) struct Cache {
    /// Per layer `(keys, values)`, `(kv_heads, capacity, head_dim)` each; empty until the
    /// first token.
    layers: Vec<(Tensor, Tensor)>,
    capacity: usize,
    len: usize,
}

impl Cache {
    fn new() -> Cache {
        Cache {
            layers: Vec::new(),
            capacity: 0,
            len: 0,
        }
    }

    /// Room for `extra` more positions: where the present buffers are too small, larger ones
    /// (at least double, at least 64 positions, at most the context) holding what these hold.
    /// More than the model's context is refused.
    fn reserve(&mut self, m: &TensorLlama, extra: usize) -> Result<()> {
        let need = self.len + extra;
        if need > m.context_length {
            return Err(Error::InvalidRequest(format!(
                "{need} tokens exceed the model's context of {}",
                m.context_length
            )));
        }
        if need <= self.capacity {
            return Ok(());
        }
        let capacity = need.max(2 * self.capacity).max(64).min(m.context_length);
        *self = self.copy(m, self.len, capacity)?;
        Ok(())
    }

    /// A new cache of `capacity` positions holding this one's first `keep`.
    fn copy(&self, m: &TensorLlama, keep: usize, capacity: usize) -> Result<Cache> {
        let Heads {
            kv_heads, head_dim, ..
        } = m.shape;
        let shape = (kv_heads, capacity, head_dim);
        let mut layers = Vec::with_capacity(m.layers.len());
        for l in 0..m.layers.len() {
            let (k, v) = (
                Tensor::zeros(shape, m.dtype, &m.device)?,
                Tensor::zeros(shape, m.dtype, &m.device)?,
            );
            if keep > 0 {
                let (ok, ov) = &self.layers[l];
                k.slice_set(&ok.narrow(1, 0, keep)?.contiguous()?, 1, 0)?;
                v.slice_set(&ov.narrow(1, 0, keep)?.contiguous()?, 1, 0)?;
            }
            layers.push((k, v));
        }
        Ok(Cache {
            layers,
            capacity,
            len: keep,
        })
    }

    /// Writes layer `l`'s keys and values `(kv_heads, t, head_dim)` at positions `len..len+t`
    /// (room made by [`Cache::reserve`]).
    fn write(&self, l: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let (kc, vc) = &self.layers[l];
        kc.slice_set(k, 1, self.len)?;
        vc.slice_set(v, 1, self.len)?;
        Ok(())
    }
}

impl TensorLlama {
    /// Bytes of one position of a sequence's cache (keys and values of every layer).
    pub(super) fn cache_bytes_per_token(&self) -> usize {
        2 * self.layers.len()
            * self.shape.kv_heads
            * self.shape.head_dim
            * self.dtype.size_in_bytes()
    }

    /// Each head (the last dimension) of `x` RMS-normed with the weights `norm`, as the
    /// model's own norms are; `x` itself without them.
    fn norm_heads(&self, x: Tensor, norm: Option<&Tensor>) -> candle_core::Result<Tensor> {
        match norm {
            Some(w) => candle_nn::ops::rms_norm(&x, w, self.rms_eps),
            None => Ok(x),
        }
    }

    /// The rotary tables `layer` turns by: the windowed layers' own where the model has them
    /// (`local`), else the model's (`global`).
    fn tables<'a>(
        layer: &Layer,
        global: &'a (Tensor, Tensor),
        local: Option<&'a (Tensor, Tensor)>,
    ) -> &'a (Tensor, Tensor) {
        match (local, layer.window) {
            (Some(local), Some(_)) => local,
            _ => global,
        }
    }

    /// Queries `q` (`(heads, t, head_dim)` for one sequence's rows at `positions`, or `(b,
    /// heads, 1, head_dim)` for one row of each of `b` sequences) times [`Self::temperature`]
    /// at their positions.
    fn warm(
        &self,
        q: Tensor,
        positions: impl ExactSizeIterator<Item = usize>,
    ) -> candle_core::Result<Tensor> {
        let Some(temp) = &self.temperature else {
            return Ok(q);
        };
        let n = positions.len();
        let f: Vec<f32> = positions.map(|p| temp.at(p)).collect();
        let shape = match q.rank() {
            3 => vec![1, n, 1],
            _ => vec![n, 1, 1, 1],
        };
        let f = Tensor::from_vec(f, shape, q.device())?.to_dtype(q.dtype())?;
        q.broadcast_mul(&f)
    }

    /// `x` turned by the tables: the first `2 · cos.dim(1)` dimensions of each head, the rest
    /// (Phi-4-mini's last quarter) passing through.
    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let (width, turned) = (x.dim(D::Minus1)?, 2 * cos.dim(D::Minus1)?);
        if turned < width {
            let head = x.narrow(D::Minus1, 0, turned)?.contiguous()?;
            let head = self.rotate(&head, cos, sin)?;
            let rest = x.narrow(D::Minus1, turned, width - turned)?;
            // (candle's `cat` on the last dimension returns a transposed view)
            return Tensor::cat(&[&head, &rest], D::Minus1)?.contiguous();
        }
        match self.rope {
            Rope::Halves => candle_nn::rotary_emb::rope(x, cos, sin),
            Rope::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin),
        }
    }

    /// Attention of `t` new rows of one sequence whose cache (already written) holds
    /// `past + t` positions: `q` is `(heads, t, head_dim)`; `mask`
    /// ([`super::layers::causal_mask`]) is needed when `t > 1` (a layer with a sliding window
    /// makes its own). Returns `(t, heads · head_dim)`.
    fn attend(
        &self,
        q: &Tensor,
        cache: &Cache,
        l: usize,
        past: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let Heads {
            heads,
            kv_heads,
            head_dim,
        } = self.shape;
        let t = q.dim(1)?;
        let rep = heads / kv_heads;
        let (kc, vc) = &cache.layers[l];
        // A sliding window's rows read from the first position the first of them sees (a
        // decode step: the window alone); the others from the start.
        let window = self.layers[l].window;
        let start = window.map_or(0, |w| (past + 1).saturating_sub(w));
        let n = past + t - start;
        // The products in the cache's dtype (f32 sums inside cuBLAS and gemm), the softmax
        // in f32: a half-precision cache is read as it is, not converted every step.
        let (k, v) = (kc.narrow(1, start, n)?, vc.narrow(1, start, n)?);
        // Query head h reads kv head h / rep: the rep heads of a kv head are one batch.
        let q = q.reshape((kv_heads, rep * t, head_dim))?;
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
        let scores = match self.scales.attention {
            None => (scores / (head_dim as f64).sqrt())?,
            Some(a) => (scores * a as f64)?,
        };
        let scores = softcap(scores, self.attention_cap)?;
        let sliding;
        let mask = match window {
            Some(w) if t > 1 && start + n > w => {
                sliding = super::layers::sliding_mask(t, past, start, w, &self.device)?;
                Some(&sliding)
            }
            _ => mask.filter(|_| t > 1),
        };
        let scores = match mask {
            Some(mask) => scores
                .reshape((kv_heads, rep, t, n))?
                .broadcast_add(mask)?
                .reshape((kv_heads, rep * t, n))?,
            None => scores,
        };
        let p = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?;
        let y = p.matmul(&v)?;
        Ok(y.reshape((heads, t, head_dim))?
            .transpose(0, 1)?
            .reshape((t, heads * head_dim))?)
    }

    /// The layer's MLP and its residual: `x + down(silu(gate(h)) · up(h))`, `h` the normed `x`
    /// (GELU's tanh form for Gemma 2, whose output is normed too).
    fn mlp(&self, layer: &Layer, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = candle_nn::ops::rms_norm(x, &layer.mlp_norm, self.rms_eps)?;
        let glu = |gate: &Proj, up: &Proj, down: &Proj, h: &Tensor| {
            let g = gate.forward(h)?;
            let g = if self.gelu { g.gelu()? } else { g.silu()? };
            down.forward(&(g * up.forward(h)?)?)
        };
        let y = match &layer.mlp {
            Mlp::Dense { gate, up, down } => glu(gate, up, down, &h)?,
            Mlp::Experts(x) => {
                let scores = h.to_dtype(DType::F32)?.matmul(&x.router.t()?)?;
                let mut takers = vec![Vec::new(); x.experts.len()];
                for (r, s) in scores.to_vec2::<f32>()?.iter().enumerate() {
                    for (e, w) in super::qllama::route(s, x.used, x.scale, x.normalise) {
                        takers[e].push((r as u32, w));
                    }
                }
                let mut out = h.zeros_like()?;
                for ([gate, up, down], takers) in x.experts.iter().zip(&takers) {
                    if takers.is_empty() {
                        continue;
                    }
                    let (rows, weights): (Vec<u32>, Vec<f32>) = takers.iter().copied().unzip();
                    let n = rows.len();
                    let rows = Tensor::new(rows.as_slice(), h.device())?;
                    let y = glu(gate, up, down, &h.index_select(&rows, 0)?)?;
                    let weights = Tensor::from_vec(weights, (n, 1), h.device())?;
                    let y = y.broadcast_mul(&weights.to_dtype(y.dtype())?)?;
                    out = out.index_add(&rows, &y, 0)?;
                }
                if let Some(([gate, up, down], weight)) = &x.shared {
                    let mut y = glu(gate, up, down, &h)?;
                    if let Some(g) = weight {
                        let score = h.to_dtype(DType::F32)?.matmul(&g.reshape(((), 1))?)?;
                        let w = candle_nn::ops::sigmoid(&score)?.to_dtype(y.dtype())?;
                        y = y.broadcast_mul(&w)?;
                    }
                    out = (out + y)?;
                }
                out
            }
        };
        let post = layer.post_norms.as_ref().map(|(_, m)| m);
        self.residual(x, self.post_norm(y, post)?)
    }

    /// The attention's output `y` and the residual: `x + y`, `y` normed first where the layer
    /// norms it (Gemma 2).
    fn attention_residual(
        &self,
        layer: &Layer,
        x: &Tensor,
        y: Tensor,
    ) -> candle_core::Result<Tensor> {
        let post = layer.post_norms.as_ref().map(|(a, _)| a);
        self.residual(x, self.post_norm(y, post)?)
    }

    /// `y` RMS-normed with `norm` where given.
    fn post_norm(&self, y: Tensor, norm: Option<&Tensor>) -> candle_core::Result<Tensor> {
        match norm {
            Some(w) => candle_nn::ops::rms_norm(&y, w, self.rms_eps),
            None => Ok(y),
        }
    }

    /// `x + y`, `y` times Granite's residual scale.
    fn residual(&self, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        match self.scales.residual {
            1.0 => x + y,
            r => x + (y * r as f64)?,
        }
    }

    /// The token embeddings of `tokens`, times Granite's embedding scale.
    fn embed(&self, tokens: &[u32]) -> candle_core::Result<Tensor> {
        let x = (self.embed).index_select(&Tensor::new(tokens, &self.device)?, 0)?;
        match self.scales.embedding {
            1.0 => Ok(x),
            e => x * e as f64,
        }
    }

    /// Logits of rows `x`, one `Vec` per row (divided by Granite's logit scale).
    fn logits(&self, x: &Tensor) -> Result<Vec<Vec<f32>>> {
        let h = candle_nn::ops::rms_norm(x, &self.norm, self.rms_eps)?;
        let logits = self.head.forward(&h)?.to_dtype(DType::F32)?;
        let logits = match self.scales.logit {
            1.0 => logits,
            l => (logits * (1.0 / l) as f64)?,
        };
        Ok(softcap(logits, self.logit_cap)?.to_vec2::<f32>()?)
    }

    /// Feeds `tokens` to one sequence; the logits at the last. A long prompt goes through in
    /// parts of [`TensorLlama::prefill_chunk`] tokens, so that its attention scores
    /// (`heads × part × context` floats) stay small: a 4096-token prompt at once would need
    /// 2 GB of them for 32 heads.
    fn prefill(&self, cache: &mut Cache, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::InvalidRequest("no tokens to feed".into()));
        }
        cache.reserve(self, tokens.len())?;
        let mut x = None;
        for part in tokens.chunks(self.prefill_chunk.max(1)) {
            x = Some(self.forward_rows(cache, part)?);
        }
        let x = x.expect("at least one part");
        let mut logits = self.logits(&x.narrow(0, x.dim(0)? - 1, 1)?)?;
        logits
            .pop()
            .ok_or_else(|| Error::Model("the forward pass returned no logits".into()))
    }

    /// Feeds `tokens` as [`TensorLlama::prefill`] does and hands `each` the logits after every
    /// one of them, in order (a prompt's log-probabilities): one pass per part, the head run
    /// on [`EVERY_ROW_BLOCK`] rows at a time.
    fn prefill_each(
        &self,
        cache: &mut Cache,
        tokens: &[u32],
        each: &mut super::EachRow<'_>,
    ) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::InvalidRequest("no tokens to feed".into()));
        }
        cache.reserve(self, tokens.len())?;
        for part in tokens.chunks(self.prefill_chunk.max(1)) {
            let x = self.forward_rows(cache, part)?;
            for start in (0..part.len()).step_by(EVERY_ROW_BLOCK) {
                let n = EVERY_ROW_BLOCK.min(part.len() - start);
                for row in self.logits(&x.narrow(0, start, n)?)? {
                    each(&row);
                }
            }
        }
        Ok(())
    }

    /// `tokens` (room in the cache already made) through every layer: the last hidden states,
    /// `(t, hidden)`.
    fn forward_rows(&self, cache: &mut Cache, tokens: &[u32]) -> Result<Tensor> {
        self.passes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Heads {
            heads,
            kv_heads,
            head_dim,
        } = self.shape;
        let t = tokens.len();
        let past = cache.len;
        let rows = |(cos, sin): (&Tensor, &Tensor)| -> candle_core::Result<(Tensor, Tensor)> {
            Ok((cos.narrow(0, past, t)?, sin.narrow(0, past, t)?))
        };
        let global = rows((&self.cos, &self.sin))?;
        let local = (self.local_rope.as_ref())
            .map(|(c, s)| rows((c, s)))
            .transpose()?;
        let mask = super::layers::causal_mask(t, past, &self.device)?;
        let mut x = self.embed(tokens)?;
        // (t, heads · head_dim) rows to (heads, t, head_dim), each head normed with `norm`
        // where given, then turned by `rot` where given.
        let split = |y: Tensor, h: usize, norm: Option<&Tensor>, rot: Option<&(Tensor, Tensor)>| {
            let y = y
                .reshape((1, t, h, head_dim))?
                .transpose(1, 2)?
                .contiguous()?;
            let y = self.norm_heads(y, norm)?;
            let y = match rot {
                Some((cos, sin)) => self.rotate(&y, cos, sin)?,
                None => y,
            };
            y.squeeze(0)
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.rms_eps)?;
            let (qn, kn) = layer.qk_norm.as_ref().map(|(q, k)| (q, k)).unzip();
            let rot = layer
                .rotates
                .then(|| Self::tables(layer, &global, local.as_ref()));
            let q = self.warm(split(layer.q.forward(&h)?, heads, qn, rot)?, past..past + t)?;
            let k = split(layer.k.forward(&h)?, kv_heads, kn, rot)?;
            let v = split(layer.v.forward(&h)?, kv_heads, None, None)?;
            cache.write(l, &k, &v)?;
            let y = self.attend(&q, cache, l, past, Some(&mask))?;
            x = self.mlp(
                layer,
                &self.attention_residual(layer, &x, layer.o.forward(&y)?)?,
            )?;
        }
        cache.len += t;
        Ok(x)
    }

    /// One decode step of several sequences: `tokens[i]` appended to `caches[i]`; the logits
    /// of each, in order.
    fn decode(&self, caches: &mut [&mut Cache], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let Heads {
            heads,
            kv_heads,
            head_dim,
        } = self.shape;
        let b = tokens.len();
        for c in caches.iter_mut() {
            c.reserve(self, 1)?;
        }
        self.passes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let positions: Vec<u32> = caches.iter().map(|c| c.len as u32).collect();
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let rows = |(cos, sin): (&Tensor, &Tensor)| -> candle_core::Result<(Tensor, Tensor)> {
            Ok((
                cos.index_select(&positions, 0)?.unsqueeze(1)?,
                sin.index_select(&positions, 0)?.unsqueeze(1)?,
            ))
        };
        let global = rows((&self.cos, &self.sin))?;
        let local = (self.local_rope.as_ref())
            .map(|(c, s)| rows((c, s)))
            .transpose()?;
        let mut x = self.embed(tokens)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.rms_eps)?;
            // One row per sequence: (b, heads, 1, head_dim) needs no transpose.
            let (qn, kn) = layer.qk_norm.as_ref().map(|(q, k)| (q, k)).unzip();
            let (cos, sin) = Self::tables(layer, &global, local.as_ref());
            let turn = |x: Tensor| match layer.rotates {
                true => self.rotate(&x, cos, sin),
                false => Ok(x),
            };
            let q = layer.q.forward(&h)?.reshape((b, heads, 1, head_dim))?;
            let q = turn(self.norm_heads(q, qn)?)?;
            let q = self.warm(q, caches.iter().map(|c| c.len))?;
            let k = layer.k.forward(&h)?.reshape((b, kv_heads, 1, head_dim))?;
            let k = turn(self.norm_heads(k, kn)?)?;
            let v = layer.v.forward(&h)?.reshape((b, kv_heads, 1, head_dim))?;
            let mut ys = Vec::with_capacity(b);
            for (i, c) in caches.iter_mut().enumerate() {
                c.write(l, &k.get(i)?, &v.get(i)?)?;
                ys.push(self.attend(&q.get(i)?, c, l, c.len, None)?);
            }
            let y = Tensor::cat(&ys, 0)?;
            x = self.mlp(
                layer,
                &self.attention_residual(layer, &x, layer.o.forward(&y)?)?,
            )?;
        }
        for c in caches.iter_mut() {
            c.len += 1;
        }
        self.logits(&x)
    }
}

/// `cap · tanh(x / cap)` of each of `x` (Gemma 2's soft-capping), or `x` itself.
fn softcap(x: Tensor, cap: Option<f32>) -> candle_core::Result<Tensor> {
    match cap {
        Some(c) => (x * (1.0 / c) as f64)?.tanh()? * c as f64,
        None => Ok(x),
    }
}

/// A [`TensorLlama`] as a [`CausalLm`].
pub(super) struct TensorLlamaLm(pub Arc<TensorLlama>);

struct TensorSequence {
    model: Arc<TensorLlama>,
    cache: Cache,
}

impl CausalLm for TensorLlamaLm {
    fn new_sequence(&self) -> Result<Box<dyn Sequence>> {
        Ok(Box::new(TensorSequence {
            model: self.0.clone(),
            cache: Cache::new(),
        }))
    }
    fn vocab_size(&self) -> usize {
        self.0.vocab_size
    }
    fn context_length(&self) -> usize {
        self.0.context_length
    }
    fn cache_bytes_per_token(&self) -> Option<usize> {
        Some(self.0.cache_bytes_per_token())
    }
    fn forward_passes(&self) -> Option<u64> {
        Some(self.0.passes.load(std::sync::atomic::Ordering::Relaxed))
    }
    /// One forward pass for all the sequences ([`TensorLlama::decode`]).
    fn decode_batch(
        &self,
        seqs: &mut [&mut dyn Sequence],
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        let Some(own) = super::own_sequences::<TensorSequence>(seqs, tokens.len(), |q| {
            Arc::ptr_eq(&q.model, &self.0)
        }) else {
            return super::decode_each(seqs, tokens);
        };
        let mut caches: Vec<&mut Cache> = own.into_iter().map(|q| &mut q.cache).collect();
        self.0.decode(&mut caches, tokens)
    }
}

impl Sequence for TensorSequence {
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.model.prefill(&mut self.cache, tokens)
    }
    /// One pass per part of the prompt ([`TensorLlama::prefill_each`]).
    fn feed_each(&mut self, tokens: &[u32], each: &mut super::EachRow<'_>) -> Result<()> {
        self.model.prefill_each(&mut self.cache, tokens, each)
    }
    fn len(&self) -> usize {
        self.cache.len
    }
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
    fn fork(&self) -> Option<Box<dyn Sequence>> {
        self.fork_prefix(self.cache.len)
    }
    fn fork_prefix(&self, len: usize) -> Option<Box<dyn Sequence>> {
        let len = len.min(self.cache.len);
        let cache = self.cache.copy(&self.model, len, len.max(1)).ok()?;
        Some(Box::new(TensorSequence {
            model: self.model.clone(),
            cache,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in (−0.5, 0.5) · `scale`.
    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    /// A two-layer llama with random weights (GQA: 4 heads on 2 kv heads), whose prompts go
    /// through in parts of `chunk` tokens.
    fn model(chunk: usize, rope: Rope) -> Arc<TensorLlama> {
        let (hidden, inter, vocab, heads, kv_heads) = (32, 48, 40, 4, 2);
        let head_dim = hidden / heads;
        let dev = Device::Cpu;
        let mut seed = 0;
        let mut t = |shape: &[usize], scale: f32| {
            seed += 1;
            Tensor::from_vec(values(shape.iter().product(), seed, scale), shape, &dev).unwrap()
        };
        let mut proj = |out: usize, inp: usize| -> Proj {
            Box::new(candle_nn::Linear::new(t(&[out, inp], 0.6), None))
        };
        let layers = (0..2)
            .map(|_| Layer {
                attn_norm: (Tensor::ones(hidden, DType::F32, &dev).unwrap()
                    + Tensor::from_vec(values(hidden, 99, 0.2), hidden, &dev).unwrap())
                .unwrap(),
                q: proj(hidden, hidden),
                k: proj(kv_heads * head_dim, hidden),
                v: proj(kv_heads * head_dim, hidden),
                qk_norm: None,
                rotates: true,
                window: None,
                o: proj(hidden, hidden),
                mlp_norm: Tensor::ones(hidden, DType::F32, &dev).unwrap(),
                mlp: Mlp::Dense {
                    gate: proj(inter, hidden),
                    up: proj(inter, hidden),
                    down: proj(hidden, inter),
                },
                post_norms: None,
            })
            .collect();
        let embed =
            Tensor::from_vec(values(vocab * hidden, 7, 2.0), (vocab, hidden), &dev).unwrap();
        let inv = inverse_frequencies(100.0, head_dim);
        let (cos, sin) = rope_tables(&inv, 256, DType::F32, &dev).unwrap();
        Arc::new(TensorLlama {
            head: Box::new(candle_nn::Linear::new(embed.clone(), None)),
            embed,
            layers,
            norm: Tensor::ones(hidden, DType::F32, &dev).unwrap(),
            shape: Heads {
                heads,
                kv_heads,
                head_dim,
            },
            rms_eps: 1e-5,
            cos,
            sin,
            local_rope: None,
            rope,
            scales: crate::backend::qllama::Scales::NONE,
            temperature: None,
            attention_cap: None,
            logit_cap: None,
            gelu: false,
            dtype: DType::F32,
            device: dev,
            vocab_size: vocab,
            context_length: 256,
            prefill_chunk: chunk,
            passes: Default::default(),
        })
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn argmax(x: &[f32]) -> u32 {
        (0..x.len()).max_by(|&i, &j| x[i].total_cmp(&x[j])).unwrap() as u32
    }

    const PROMPT: [u32; 13] = [1, 5, 9, 2, 33, 17, 8, 8, 21, 39, 4, 11, 30];

    #[test]
    fn a_prompt_in_parts_gives_the_logits_of_one_pass_and_the_same_continuation() {
        for rope in [Rope::Halves, Rope::Interleaved] {
            let (whole, parts) = (
                TensorLlamaLm(model(64, rope)),
                TensorLlamaLm(model(4, rope)),
            );
            let (mut a, mut b) = (whole.new_sequence().unwrap(), parts.new_sequence().unwrap());
            let (la, lb) = (a.feed(&PROMPT).unwrap(), b.feed(&PROMPT).unwrap());
            let spread = la.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(spread > 1.0, "the logits are not trivial: {spread}");
            assert!(
                max_diff(&la, &lb) < 1e-5,
                "{rope:?}: {}",
                max_diff(&la, &lb)
            );
            assert_eq!((a.len(), b.len()), (13, 13));
            let next = argmax(&la);
            let (la, lb) = (a.feed(&[next]).unwrap(), b.feed(&[next]).unwrap());
            assert!(
                max_diff(&la, &lb) < 1e-5,
                "{rope:?} step: {}",
                max_diff(&la, &lb)
            );
        }
    }

    /// Every row's logits, a prompt of 150 tokens in parts of 100 (the head on 64 rows at a
    /// time), one pass a part: row k is a fresh sequence's last after the first k + 1 tokens.
    #[test]
    fn every_row_s_logits_come_one_pass_a_part() {
        let lm = TensorLlamaLm(model(100, Rope::Halves));
        let tokens: Vec<u32> = (0..150).map(|i| (i * 11 % 40) as u32).collect();
        let mut rows = Vec::new();
        lm.new_sequence()
            .unwrap()
            .feed_each(&tokens, &mut |r| rows.push(r.to_vec()))
            .unwrap();
        assert_eq!(lm.forward_passes(), Some(2));
        assert_eq!(rows.len(), 150);
        for k in [0, 1, 63, 64, 99, 100, 149] {
            let alone = lm.new_sequence().unwrap().feed(&tokens[..=k]).unwrap();
            assert!(max_diff(&rows[k], &alone) < 1e-5, "row {k}");
        }
    }

    #[test]
    fn a_cache_that_grows_step_by_step_holds_what_one_pass_computes() {
        // 60 tokens, then 12 one at a time: the cache doubles past its first 64 positions.
        let lm = TensorLlamaLm(model(512, Rope::Halves));
        let tokens: Vec<u32> = (0..72).map(|i| (i * 7 % 40) as u32).collect();
        let mut stepped = lm.new_sequence().unwrap();
        let mut last = stepped.feed(&tokens[..60]).unwrap();
        for t in &tokens[60..] {
            last = stepped.feed(&[*t]).unwrap();
        }
        let whole = lm.new_sequence().unwrap().feed(&tokens).unwrap();
        assert!(
            max_diff(&last, &whole) < 1e-5,
            "{}",
            max_diff(&last, &whole)
        );
    }

    #[test]
    fn a_batched_step_gives_each_sequence_its_logits_alone_and_a_fork_goes_on_alike() {
        let m = model(64, Rope::Interleaved);
        let lm = TensorLlamaLm(m.clone());
        let prompts: [&[u32]; 3] = [&PROMPT, &PROMPT[..5], &[3]];
        let mut alone: Vec<Box<dyn Sequence>> =
            prompts.iter().map(|_| lm.new_sequence().unwrap()).collect();
        let mut batch: Vec<Box<dyn Sequence>> =
            prompts.iter().map(|_| lm.new_sequence().unwrap()).collect();
        let mut tokens = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            tokens.push(argmax(&alone[i].feed(p).unwrap()));
            batch[i].feed(p).unwrap();
        }
        // A fork of the middle sequence, cut to its first 3 tokens, against a sequence fed only those.
        let mut cut = batch[1].fork_prefix(3).unwrap();
        let mut fresh = lm.new_sequence().unwrap();
        fresh.feed(&PROMPT[..3]).unwrap();
        assert!(max_diff(&cut.feed(&[7]).unwrap(), &fresh.feed(&[7]).unwrap()) < 1e-5);
        for step in 0..5 {
            let want: Vec<Vec<f32>> = alone
                .iter_mut()
                .zip(&tokens)
                .map(|(s, t)| s.feed(&[*t]).unwrap())
                .collect();
            let mut refs: Vec<&mut dyn Sequence> =
                batch.iter_mut().map(|s| &mut **s as _).collect();
            let got = lm.decode_batch(&mut refs, &tokens).unwrap();
            for i in 0..3 {
                assert!(
                    max_diff(&got[i], &want[i]) < 1e-5,
                    "step {step} sequence {i}"
                );
            }
            tokens = want.iter().map(|l| argmax(l)).collect();
        }
        assert_eq!(
            batch.iter().map(|s| s.len()).collect::<Vec<_>>(),
            [18, 10, 6]
        );
        // A prompt longer than the context is refused, naming both.
        let mut long = lm.new_sequence().unwrap();
        let e = long.feed(&[1; 257]).unwrap_err().to_string();
        assert!(
            e.contains("257 tokens exceed the model's context of 256"),
            "{e}"
        );
    }

    #[test]
    fn rope_tables_hold_cos_and_sin_of_position_times_frequency() {
        let (cos, sin) = rope_tables(&[1.0, 0.5], 3, DType::F32, &Device::Cpu).unwrap();
        let (cos, sin) = (cos.to_vec2::<f32>().unwrap(), sin.to_vec2::<f32>().unwrap());
        for p in 0..3 {
            for (i, f) in [1.0f32, 0.5].iter().enumerate() {
                assert!((cos[p][i] - (p as f32 * f).cos()).abs() < 1e-6);
                assert!((sin[p][i] - (p as f32 * f).sin()).abs() < 1e-6);
            }
        }
    }
}
