//! Our own llama forward pass over GGUF quantised weights, with batched decoding.
//!
//! The weights and the arithmetic mirror candle-transformers 0.11's `quantized_llama` (same
//! GGUF tensors, `QMatMul`, RMS norm, interleaved rotary embedding, SiLU MLP), but one forward
//! pass takes the new tokens of several sequences at once: their rows are stacked into one
//! `(rows, hidden)` matrix for every weight product (QKV, attention output, MLP, output head),
//! so each quantised weight is read once per step for the whole batch. Attention runs per
//! sequence against that sequence's own KV cache; sequences of different lengths need no
//! padding and no mask.
//!
//! The KV cache is a plain `Vec<f32>` per layer, laid out `[position][kv_head][head_dim]`:
//! appending a token is an `extend_from_slice`, not a copy of the whole cache. Single-token
//! steps attend with a small loop over that cache; a multi-token step (a prompt) uses candle's
//! batched matmuls with a causal mask, as `quantized_llama` does.

use candle_core::quantized::{QMatMul, gguf_file};
use candle_core::{Device, Module, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

use crate::error::{Error, Result};

/// Longest sequence (as in `quantized_llama`: the rotary tables cover this many positions).
pub(super) const MAX_SEQ_LEN: usize = 4096;

struct Layer {
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    w_gate: QMatMul,
    w_down: QMatMul,
    w_up: QMatMul,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
}

/// The weights of a llama GGUF model, shared by all sequences.
pub(super) struct Weights {
    embeddings: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    /// `cos`/`sin` of position × frequency, `MAX_SEQ_LEN` rows of `head_dim / 2`.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// One sequence's keys and values: per layer, `[position][kv_head][head_dim]`.
pub(super) struct KvCache {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    len: usize,
}

impl KvCache {
    /// Tokens held.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    fn truncate(&mut self, len: usize, kv_dim: usize) {
        for (k, v) in self.layers.iter_mut() {
            k.truncate(len * kv_dim);
            v.truncate(len * kv_dim);
        }
        self.len = len;
    }
}

fn md_u32(ct: &gguf_file::Content, key: &str) -> Result<usize> {
    let v = ct
        .metadata
        .get(key)
        .ok_or_else(|| Error::Model(format!("GGUF metadata has no {key}")))?;
    Ok(v.to_u32()? as usize)
}

/// Expert count of a mixture-of-experts llama GGUF (0 for a dense model).
pub(super) fn expert_count(ct: &gguf_file::Content) -> usize {
    md_u32(ct, "llama.expert_count").unwrap_or(0)
}

/// Dot product with eight independent accumulators, so that the compiler can vectorise it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl Weights {
    /// Reads a dense llama GGUF (the tensor names `quantized_llama` reads).
    pub(super) fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
    ) -> Result<Self> {
        let device = &Device::Cpu;
        let n_head = md_u32(ct, "llama.attention.head_count")?;
        let n_kv_head = md_u32(ct, "llama.attention.head_count_kv")?;
        let block_count = md_u32(ct, "llama.block_count")?;
        let hidden = md_u32(ct, "llama.embedding_length")?;
        let rope_dim = md_u32(ct, "llama.rope.dimension_count")?;
        let eps = ct
            .metadata
            .get("llama.attention.layer_norm_rms_epsilon")
            .ok_or_else(|| Error::Model("GGUF metadata has no rms epsilon".into()))?
            .to_f32()? as f64;
        let freq_base = ct
            .metadata
            .get("llama.rope.freq_base")
            .and_then(|m| m.to_f32().ok())
            .unwrap_or(10000f32);
        let head_dim = hidden / n_head;
        if rope_dim != head_dim || n_kv_head == 0 || n_head % n_kv_head != 0 {
            return Err(Error::Model(format!(
                "unsupported llama shape: {n_head} heads, {n_kv_head} kv heads, head dim \
                 {head_dim}, rope dim {rope_dim}"
            )));
        }
        // The rotary tables exactly as `quantized_llama::precomput_freqs_cis` builds them.
        let theta: Vec<f32> = (0..rope_dim)
            .step_by(2)
            .map(|i| 1f32 / freq_base.powf(i as f32 / rope_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(MAX_SEQ_LEN * theta.len());
        let mut sin = Vec::with_capacity(MAX_SEQ_LEN * theta.len());
        for p in 0..MAX_SEQ_LEN {
            for t in &theta {
                let a = p as f32 * t;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }

        let tensor =
            |name: &str, reader: &mut R| -> Result<_> { Ok(ct.tensor(reader, name, device)?) };
        let qmm = |name: &str, reader: &mut R| -> Result<QMatMul> {
            Ok(QMatMul::from_qtensor(tensor(name, reader)?)?)
        };
        let emb_q = tensor("token_embd.weight", reader)?;
        let embeddings = emb_q.dequantize(device)?;
        let norm = RmsNorm::from_qtensor(tensor("output_norm.weight", reader)?, eps)?;
        let output = match ct.tensor(reader, "output.weight", device) {
            Ok(t) => QMatMul::from_qtensor(t)?,
            Err(_) => QMatMul::from_qtensor(emb_q)?,
        };
        let mut layers = Vec::with_capacity(block_count);
        for i in 0..block_count {
            let p = format!("blk.{i}");
            layers.push(Layer {
                wq: qmm(&format!("{p}.attn_q.weight"), reader)?,
                wk: qmm(&format!("{p}.attn_k.weight"), reader)?,
                wv: qmm(&format!("{p}.attn_v.weight"), reader)?,
                wo: qmm(&format!("{p}.attn_output.weight"), reader)?,
                w_gate: qmm(&format!("{p}.ffn_gate.weight"), reader)?,
                w_down: qmm(&format!("{p}.ffn_down.weight"), reader)?,
                w_up: qmm(&format!("{p}.ffn_up.weight"), reader)?,
                attn_norm: RmsNorm::from_qtensor(
                    tensor(&format!("{p}.attn_norm.weight"), reader)?,
                    eps,
                )?,
                ffn_norm: RmsNorm::from_qtensor(
                    tensor(&format!("{p}.ffn_norm.weight"), reader)?,
                    eps,
                )?,
            });
        }
        Ok(Weights {
            embeddings,
            layers,
            norm,
            output,
            n_head,
            n_kv_head,
            head_dim,
            cos,
            sin,
        })
    }

    /// An empty cache for a new sequence.
    pub(super) fn new_cache(&self) -> KvCache {
        KvCache {
            layers: (0..self.layers.len())
                .map(|_| (Vec::new(), Vec::new()))
                .collect(),
            len: 0,
        }
    }

    fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    /// Appends each item's tokens to its cache and returns the logits at each item's last
    /// token. All items go through the weight matmuls together; on failure every cache is
    /// left as it was.
    pub(super) fn forward(&self, items: &mut [(&mut KvCache, &[u32])]) -> Result<Vec<Vec<f32>>> {
        for (cache, tokens) in items.iter() {
            if tokens.is_empty() {
                return Err(Error::InvalidRequest("no tokens to feed".into()));
            }
            if cache.len + tokens.len() > MAX_SEQ_LEN {
                return Err(Error::InvalidRequest(format!(
                    "the sequence would exceed {MAX_SEQ_LEN} tokens"
                )));
            }
        }
        let before: Vec<usize> = items.iter().map(|(c, _)| c.len).collect();
        let out = self.forward_inner(items);
        match out {
            Ok(logits) => {
                for (cache, tokens) in items.iter_mut() {
                    cache.len += tokens.len();
                }
                Ok(logits)
            }
            Err(e) => {
                let kv_dim = self.kv_dim();
                for ((cache, _), len) in items.iter_mut().zip(before) {
                    cache.truncate(len, kv_dim);
                }
                Err(e)
            }
        }
    }

    fn forward_inner(&self, items: &mut [(&mut KvCache, &[u32])]) -> Result<Vec<Vec<f32>>> {
        let dev = &Device::Cpu;
        let ids: Vec<u32> = items.iter().flat_map(|(_, t)| t.iter().copied()).collect();
        let rows = ids.len();
        let q_dim = self.n_head * self.head_dim;
        let kv_dim = self.kv_dim();
        let mut x = self
            .embeddings
            .index_select(&Tensor::new(ids.as_slice(), dev)?, 0)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let mut q = layer.wq.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let mut k = layer.wk.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let v = layer.wv.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let mut y = vec![0f32; rows * q_dim];
            let mut row = 0;
            for (cache, tokens) in items.iter_mut() {
                let n = tokens.len();
                let pos0 = cache.len;
                for t in 0..n {
                    self.rope(&mut q[(row + t) * q_dim..(row + t + 1) * q_dim], pos0 + t);
                    self.rope(&mut k[(row + t) * kv_dim..(row + t + 1) * kv_dim], pos0 + t);
                }
                let (kc, vc) = &mut cache.layers[li];
                kc.extend_from_slice(&k[row * kv_dim..(row + n) * kv_dim]);
                vc.extend_from_slice(&v[row * kv_dim..(row + n) * kv_dim]);
                let qs = &q[row * q_dim..(row + n) * q_dim];
                let out = &mut y[row * q_dim..(row + n) * q_dim];
                if n == 1 {
                    self.attend_one(qs, kc, vc, pos0 + 1, out);
                } else {
                    self.attend_prompt(qs, kc, vc, pos0, n, out)?;
                }
                row += n;
            }
            let y = Tensor::from_vec(y, (rows, q_dim), dev)?;
            let x1 = (layer.wo.forward(&y)? + &x)?;
            let h = layer.ffn_norm.forward(&x1)?;
            let gate = candle_nn::ops::silu(&layer.w_gate.forward(&h)?)?;
            let mlp = layer.w_down.forward(&(gate * layer.w_up.forward(&h)?)?)?;
            x = (mlp + x1)?;
        }
        let mut last = Vec::with_capacity(items.len());
        let mut row = 0;
        for (_, tokens) in items.iter() {
            row += tokens.len();
            last.push((row - 1) as u32);
        }
        let x = x.index_select(&Tensor::new(last.as_slice(), dev)?, 0)?;
        let x = self.norm.forward(&x)?;
        Ok(self.output.forward(&x)?.to_vec2::<f32>()?)
    }

    /// Interleaved rotary embedding (`rope_i`) of every head in `x` at position `pos`.
    fn rope(&self, x: &mut [f32], pos: usize) {
        let half = self.head_dim / 2;
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        for head in x.chunks_exact_mut(self.head_dim) {
            for i in 0..half {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * cos[i] - b * sin[i];
                head[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        }
    }

    /// Attention of one new token (already in the cache, which holds `len` positions).
    fn attend_one(&self, q: &[f32], kc: &[f32], vc: &[f32], len: usize, out: &mut [f32]) {
        let hd = self.head_dim;
        let kv_dim = self.kv_dim();
        let n_rep = self.n_head / self.n_kv_head;
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let mut scores = vec![0f32; len];
        for h in 0..self.n_head {
            let g = h / n_rep;
            let qh = &q[h * hd..(h + 1) * hd];
            let mut max = f32::NEG_INFINITY;
            for (p, s) in scores.iter_mut().enumerate() {
                let kp = &kc[p * kv_dim + g * hd..p * kv_dim + (g + 1) * hd];
                *s = dot(qh, kp) * scale;
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut out[h * hd..(h + 1) * hd];
            o.fill(0.0);
            for (p, s) in scores.iter().enumerate() {
                let w = s / sum;
                let vp = &vc[p * kv_dim + g * hd..p * kv_dim + (g + 1) * hd];
                for (o, v) in o.iter_mut().zip(vp) {
                    *o += w * v;
                }
            }
        }
    }

    /// Causal attention of `n` new tokens at positions `pos0..pos0 + n` (already in the
    /// cache), with candle's matmuls.
    fn attend_prompt(
        &self,
        q: &[f32],
        kc: &[f32],
        vc: &[f32],
        pos0: usize,
        n: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let dev = &Device::Cpu;
        let (hd, n_kv, n_head) = (self.head_dim, self.n_kv_head, self.n_head);
        let n_rep = n_head / n_kv;
        let len = pos0 + n;
        let kv_dim = self.kv_dim();
        // Query heads h = g * n_rep + r share kv head g (candle's `repeat_kv`).
        let q = Tensor::from_slice(q, (n, n_head, hd), dev)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((n_kv, n_rep * n, hd))?;
        let k = Tensor::from_slice(&kc[..len * kv_dim], (len, n_kv, hd), dev)?
            .transpose(0, 1)?
            .contiguous()?;
        let v = Tensor::from_slice(&vc[..len * kv_dim], (len, n_kv, hd), dev)?
            .transpose(0, 1)?
            .contiguous()?;
        let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.reshape((n_kv, n_rep, n, len))?;
        let mask: Vec<u8> = (0..n)
            .flat_map(|i| (0..len).map(move |j| u8::from(j > pos0 + i)))
            .collect();
        let mask = Tensor::from_vec(mask, (n, len), dev)?.broadcast_as(att.shape())?;
        let neg_inf = Tensor::new(f32::NEG_INFINITY, dev)?.broadcast_as(att.shape())?;
        let att = mask.where_cond(&neg_inf, &att)?;
        let att = candle_nn::ops::softmax_last_dim(&att)?.reshape((n_kv, n_rep * n, len))?;
        let y = att
            .matmul(&v)?
            .reshape((n_head, n, hd))?
            .transpose(0, 1)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        out.copy_from_slice(&y);
        Ok(())
    }
}
