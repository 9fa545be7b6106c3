//! A BERT-family encoder (BERT, XLM-RoBERTa) on plain f32 buffers, for sentence embeddings.
//!
//! candle-transformers' `bert` spends most of an all-MiniLM-L6-v2 forward pass outside the
//! matrix products: each layer is some thirty tensor ops (a broadcast mask add and a five-op
//! softmax per layer, a scalar f64 `erf` per GELU element, per-(sequence, head) gemm calls for
//! the attention, bias adds and residuals as separate passes), each allocating its output.
//! Here one layer is five gemm calls (Q, K and V fused into one) with the bias and the
//! residual folded into the gemm's destination, a fused attention kernel, a fused layer norm
//! and a polynomial GELU that the compiler vectorises.
//!
//! **Ragged batches (no padding).** The sequences of a batch are stacked row after row in one
//! `(total tokens, hidden)` matrix: every dense layer works on rows independently, so the
//! products run over exactly the tokens there are, and attention runs per sequence over its
//! own rows (no mask, no padded keys). A batch of short and long inputs costs the sum of their
//! lengths, not `batch × longest`, and each sequence's result does not depend on what else was
//! in its batch (up to the summation order inside gemm's blocking, ~1e-7). This makes the
//! sort-by-length-and-sub-batch step of sentence-transformers and TEI unnecessary here; it is
//! also why a batch of 32 pays off at all on 2 cores: the per-call overheads are shared while
//! no work is wasted on padding.

use std::ops::Range;

use candle_core::Tensor;
use candle_nn::VarBuilder;
use gemm::Parallelism;
use rayon::prelude::*;

use super::SharedOut;

/// The feed-forward activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Activation {
    /// `0.5 x (1 + erf(x / √2))`, transformers' `gelu`.
    GeluErf,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
}

pub(super) struct EncoderConfig {
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub type_vocab: usize,
    pub eps: f32,
    pub act: Activation,
    pub positions: Positions,
    /// `--dtype bf16`: the dense layers' products with both factors rounded to bf16 and f32
    /// sums, on [`packed::Kernel::Avx512Bf16`] where the CPU has it (twice the products a
    /// cycle of f32 FMAs, half the weight memory); f32 where it does not (logged at load).
    /// Embeddings, layer norms, attention, GELU and the residual stream stay f32.
    pub bf16: bool,
}

/// How position ids are numbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Positions {
    /// 0, 1, 2, … (BERT).
    Absolute,
    /// RoBERTa's: `padding_idx + cumsum(id != padding_idx)` for a token, `padding_idx` for a
    /// padding token.
    Roberta { padding_idx: u32 },
}

mod packed;

/// `y = x · wᵀ + b`.
struct Linear {
    /// As the checkpoint stores it, `(out, in)` row-major, for the `gemm` crate; empty when
    /// `packed` holds the weight.
    w: Vec<f32>,
    packed: Option<packed::Packed>,
    b: Vec<f32>,
    n_in: usize,
    n_out: usize,
}

struct Norm {
    g: Vec<f32>,
    b: Vec<f32>,
}

struct Layer {
    /// Query, key and value stacked: `(3 hidden, hidden)`.
    qkv: Linear,
    attn_out: Linear,
    ln_attn: Norm,
    up: Linear,
    down: Linear,
    ln_out: Norm,
}

pub(super) struct Encoder {
    cfg: EncoderConfig,
    word: Vec<f32>,
    pos: Vec<f32>,
    /// Row 0 of the token-type table: every input is one segment.
    token_type: Vec<f32>,
    ln_emb: Norm,
    layers: Vec<Layer>,
}

/// The packed kernel the encoders' products take here (`None`: the `gemm` crate).
pub(super) fn packed_kernel() -> Option<packed::Kernel> {
    packed::Kernel::detect()
}

/// The kernel of `--dtype bf16`'s products here, if the CPU has one.
pub(super) fn packed_bf16_kernel() -> Option<packed::Kernel> {
    packed::Kernel::bf16()
}

fn flat(t: Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

impl Linear {
    /// `bf16`: [`EncoderConfig::bf16`].
    fn new(w: Vec<f32>, b: Vec<f32>, n_in: usize, n_out: usize, bf16: bool) -> Self {
        let bf16 = packed::Kernel::bf16().filter(|_| bf16);
        if let Some(kernel) = bf16.or_else(packed::Kernel::detect) {
            let p = packed::Packed::new(&w, n_out, n_in, kernel);
            Linear {
                w: Vec::new(),
                packed: Some(p),
                b,
                n_in,
                n_out,
            }
        } else {
            Linear {
                w,
                packed: None,
                b,
                n_in,
                n_out,
            }
        }
    }
}

fn linear(vb: &VarBuilder, n_in: usize, n_out: usize, bf16: bool) -> candle_core::Result<Linear> {
    Ok(Linear::new(
        flat(vb.get((n_out, n_in), "weight")?)?,
        flat(vb.get(n_out, "bias")?)?,
        n_in,
        n_out,
        bf16,
    ))
}

fn norm(vb: &VarBuilder, d: usize) -> candle_core::Result<Norm> {
    Ok(Norm {
        g: flat(vb.get(d, "weight")?)?,
        b: flat(vb.get(d, "bias")?)?,
    })
}

impl Encoder {
    /// Loads `embeddings.*` and `encoder.layer.N.*` (transformers' names) from `vb`.
    pub(super) fn load(vb: VarBuilder, cfg: EncoderConfig) -> candle_core::Result<Self> {
        let d = cfg.hidden;
        if cfg.heads == 0 || !d.is_multiple_of(cfg.heads) {
            candle_core::bail!(
                "hidden_size {d} is not a multiple of num_attention_heads {}",
                cfg.heads
            );
        }
        let e = vb.pp("embeddings");
        let word = flat(e.pp("word_embeddings").get((cfg.vocab, d), "weight")?)?;
        let pos = flat(
            e.pp("position_embeddings")
                .get((cfg.max_positions, d), "weight")?,
        )?;
        let token_type = flat(
            e.pp("token_type_embeddings")
                .get((cfg.type_vocab, d), "weight")?
                .narrow(0, 0, 1)?,
        )?;
        let ln_emb = norm(&e.pp("LayerNorm"), d)?;
        let bf16 = cfg.bf16;
        if bf16 && packed::Kernel::bf16().is_none() {
            tracing::warn!(
                "--dtype bf16: this CPU has no AVX512-BF16 dot product (or KANDLE_ISA rules \
                 out AVX-512); the encoder's products run in f32"
            );
        }
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            let raw = |name: &str| -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
                let vb = a.pp(name);
                Ok((flat(vb.get((d, d), "weight")?)?, flat(vb.get(d, "bias")?)?))
            };
            let (q, k, v) = (raw("self.query")?, raw("self.key")?, raw("self.value")?);
            let (w, b) = ([q.0, k.0, v.0].concat(), [q.1, k.1, v.1].concat());
            let qkv = Linear::new(w, b, d, 3 * d, bf16);
            layers.push(Layer {
                qkv,
                attn_out: linear(&a.pp("output.dense"), d, d, bf16)?,
                ln_attn: norm(&a.pp("output.LayerNorm"), d)?,
                up: linear(&l.pp("intermediate.dense"), d, cfg.intermediate, bf16)?,
                down: linear(&l.pp("output.dense"), cfg.intermediate, d, bf16)?,
                ln_out: norm(&l.pp("output.LayerNorm"), d)?,
            });
        }
        Ok(Encoder {
            cfg,
            word,
            pos,
            token_type,
            ln_emb,
            layers,
        })
    }

    /// The longest input the position table allows.
    pub(super) fn max_tokens(&self) -> usize {
        match self.cfg.positions {
            Positions::Absolute => self.cfg.max_positions,
            Positions::Roberta { padding_idx } => self
                .cfg
                .max_positions
                .saturating_sub(padding_idx as usize + 1),
        }
    }

    /// The last hidden state of every sequence, stacked: `(Σ len, hidden)` row-major, and each
    /// sequence's rows.
    pub(super) fn forward(
        &self,
        batch: &[Vec<u32>],
    ) -> candle_core::Result<(Vec<f32>, Vec<Range<usize>>)> {
        let d = self.cfg.hidden;
        let mut ranges = Vec::with_capacity(batch.len());
        let mut rows = 0;
        for s in batch {
            if s.is_empty() {
                candle_core::bail!("cannot embed an empty token sequence");
            }
            if s.len() > self.max_tokens() {
                candle_core::bail!(
                    "{} tokens exceed the model's {} positions",
                    s.len(),
                    self.max_tokens()
                );
            }
            ranges.push(rows..rows + s.len());
            rows += s.len();
        }
        // Embeddings: word + position + token type 0, then LayerNorm.
        let mut x = vec![0f32; rows * d];
        for (s, r) in batch.iter().zip(&ranges) {
            let mut seen = 0;
            for (p, &id) in s.iter().enumerate() {
                let pos = match self.cfg.positions {
                    Positions::Absolute => p,
                    Positions::Roberta { padding_idx } if id == padding_idx => padding_idx as usize,
                    Positions::Roberta { padding_idx } => {
                        seen += 1;
                        padding_idx as usize + seen
                    }
                };
                let id = id as usize;
                if id >= self.cfg.vocab {
                    candle_core::bail!("token id {id} is outside the vocabulary");
                }
                let w = &self.word[id * d..][..d];
                let pe = &self.pos[pos * d..][..d];
                let row = &mut x[(r.start + p) * d..][..d];
                for i in 0..d {
                    row[i] = w[i] + pe[i] + self.token_type[i];
                }
            }
        }
        layer_norm(&mut x, d, &self.ln_emb, self.cfg.eps);

        let mut qkv = vec![0f32; rows * 3 * d];
        let mut ctx = vec![0f32; rows * d];
        let mut inter = vec![0f32; rows * self.cfg.intermediate];
        for l in &self.layers {
            // Q, K, V in one product.
            matmul_bias(&x, rows, &l.qkv, &mut qkv);
            attention(
                &qkv,
                &mut ctx,
                &ranges,
                d,
                self.cfg.heads,
                packed::Kernel::detect(),
            );
            // x ← LayerNorm(x + ctx · Woᵀ + bo): the residual and bias are the gemm's dst.
            add_bias(&mut x, &l.attn_out.b);
            matmul(&ctx, rows, &l.attn_out, &mut x);
            layer_norm(&mut x, d, &l.ln_attn, self.cfg.eps);
            // x ← LayerNorm(x + act(x · Wuᵀ + bu) · Wdᵀ + bd).
            matmul_bias(&x, rows, &l.up, &mut inter);
            activate(&mut inter, self.cfg.act);
            add_bias(&mut x, &l.down.b);
            matmul(&inter, rows, &l.down, &mut x);
            layer_norm(&mut x, d, &l.ln_out, self.cfg.eps);
        }
        Ok((x, ranges))
    }
}

/// Below this many elements an element-wise pass stays on the calling thread.
const PAR_MIN: usize = 32 * 1024;

/// Runs `f` over each `row_len` row of `buf`, on the rayon pool when the buffer is large.
fn for_rows(buf: &mut [f32], row_len: usize, f: impl Fn(&mut [f32]) + Sync + Send) {
    if buf.len() < PAR_MIN {
        buf.chunks_mut(row_len).for_each(f);
    } else {
        let threads = rayon::current_num_threads().max(1);
        let rows = buf.len() / row_len;
        let per = rows.div_ceil(threads * 4).max(1);
        buf.par_chunks_mut(per * row_len)
            .for_each(|c| c.chunks_mut(row_len).for_each(&f));
    }
}

fn fill_bias(buf: &mut [f32], b: &[f32]) {
    for_rows(buf, b.len(), |row| row.copy_from_slice(b));
}

fn add_bias(buf: &mut [f32], b: &[f32]) {
    for_rows(buf, b.len(), |row| {
        for (r, b) in row.iter_mut().zip(b) {
            *r += b;
        }
    });
}

/// `out (rows × n_out) = b + x (rows × n_in) · wᵀ`, whatever `out` held.
fn matmul_bias(x: &[f32], rows: usize, l: &Linear, out: &mut [f32]) {
    match &l.packed {
        Some(p) => p.matmul_bias(x, rows, &l.b, out),
        None => {
            fill_bias(out, &l.b);
            matmul(x, rows, l, out);
        }
    }
}

/// `out (rows × n_out) += x (rows × n_in) · wᵀ`.
fn matmul(x: &[f32], rows: usize, l: &Linear, out: &mut [f32]) {
    if let Some(p) = &l.packed {
        return p.matmul_acc(x, rows, out);
    }
    let (k, n) = (l.n_in, l.n_out);
    assert!(x.len() >= rows * k && out.len() >= rows * n && l.w.len() == k * n);
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the sizes are checked above; out does not alias x or w.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            // rhs = wᵀ, (k × n): element (i, j) is w[j * k + i].
            l.w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Sum with 16 independent lanes, which the compiler keeps in vector registers.
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for c in chunks {
        for i in 0..16 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    acc.iter().fold(rest, |a, &b| a.max(b))
}

/// LayerNorm of every `d` row in place (two-pass mean and variance, as torch computes them).
fn layer_norm(x: &mut [f32], d: usize, n: &Norm, eps: f32) {
    for_rows(x, d, |row| {
        let mean = sum(row) / d as f32;
        let mut acc = [0f32; 16];
        let chunks = row.chunks_exact(16);
        let rest: f32 = chunks
            .remainder()
            .iter()
            .map(|v| (v - mean) * (v - mean))
            .sum();
        for c in chunks {
            for i in 0..16 {
                let t = c[i] - mean;
                acc[i] += t * t;
            }
        }
        let var = (acc.iter().sum::<f32>() + rest) / d as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        for ((v, g), b) in row.iter_mut().zip(&n.g).zip(&n.b) {
            *v = (*v - mean) * rstd * g + b;
        }
    });
}

fn activate(x: &mut [f32], act: Activation) {
    // Whole rows are not needed: chunks of any size work for an element-wise op.
    let chunk = 4096.min(x.len().max(1));
    match act {
        Activation::GeluErf => for_rows(x, chunk, |c| c.iter_mut().for_each(|v| *v = gelu_erf(*v))),
        Activation::GeluTanh => {
            for_rows(x, chunk, |c| c.iter_mut().for_each(|v| *v = gelu_tanh(*v)))
        }
        Activation::Relu => for_rows(x, chunk, |c| c.iter_mut().for_each(|v| *v = v.max(0.0))),
    }
}

/// erf for f32 as Eigen and XLA compute it: a rational odd/even polynomial on x clamped to
/// [-4, 4] (erf is ±1 in f32 beyond), a few ulp from the true value and branch-free, so a loop
/// over it vectorises.
#[inline(always)]
pub(super) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2.mul_add(-2.726_142_3e-10, 2.770_681_4e-8);
    p = x2.mul_add(p, -2.101_024e-6);
    p = x2.mul_add(p, -5.692_506_4e-5);
    p = x2.mul_add(p, -7.349_906e-4);
    p = x2.mul_add(p, -2.954_6e-3);
    p = x2.mul_add(p, -1.609_603_3e-2);
    p *= x;
    let mut q = x2.mul_add(-1.456_607_2e-5, -2.133_740_6e-4);
    q = x2.mul_add(q, -1.682_827e-3);
    q = x2.mul_add(q, -7.373_329e-3);
    q = x2.mul_add(q, -1.426_473_9e-2);
    p / q
}

#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    // tanh(y) = 1 - 2 / (exp(2y) + 1); exp overflows to inf for large y, giving 1.
    const C: f32 = 0.797_884_6; // √(2/π)
    let y = C * (x + 0.044_715 * x * x * x);
    let t = 1.0 - 2.0 / (exp(2.0 * y) + 1.0);
    0.5 * x * (1.0 + t)
}

/// eˣ as Cephes' `expf` computes it (range reduction by ln 2, degree-6 polynomial), within
/// ~2 ulp, branch-free so that loops over it vectorise. Inputs are clamped to [-87.3, 88.7].
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.336_54, 88.722_83);
    // Round x / ln 2 to nearest by the 1.5 · 2²³ trick (no libm call, vectorises).
    const ROUND: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = n.mul_add(2.121_944_4e-4, n.mul_add(-0.693_359_4, x));
    let r2 = r * r;
    let mut p = r.mul_add(1.987_569_1e-4, 1.398_199_9e-3);
    p = r.mul_add(p, 8.333_452e-3);
    p = r.mul_add(p, 4.166_579_6e-2);
    p = r.mul_add(p, 1.666_666_5e-1);
    p = r.mul_add(p, 0.5);
    let p = p.mul_add(r2, r) + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// Multi-head self-attention of each sequence over its own rows: `qkv` is `(rows, 3 d)`
/// (queries, keys, values), `ctx` receives `(rows, d)`, heads side by side.
/// With a `kernel` (one the CPU runs), the two products run on it; else portable loops.
fn attention(
    qkv: &[f32],
    ctx: &mut [f32],
    ranges: &[Range<usize>],
    d: usize,
    heads: usize,
    kernel: Option<packed::Kernel>,
) {
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    if kernel.is_some() {
        // The kernel path accumulates into ctx.
        ctx.fill(0.0);
    }
    let out = SharedOut(ctx.as_mut_ptr());
    let out_len = ctx.len();
    let task = |t: usize| {
        let (r, h) = (&ranges[t / heads], t % heads);
        let len = r.len();
        assert!(r.end * d <= out_len && r.end * 3 * d <= qkv.len());
        if let Some(kernel) = kernel {
            // S = Q Kᵀ and ctx = softmax(S · scale) V as two products on the packed kernel.
            let mut kt = vec![0f32; dh * len];
            for j in 0..len {
                let k = &qkv[(r.start + j) * 3 * d + d + h * dh..][..dh];
                for c in 0..dh {
                    kt[c * len + j] = k[c];
                }
            }
            let mut s = vec![0f32; len * len];
            let q = qkv[r.start * 3 * d + h * dh..].as_ptr();
            // SAFETY: the CPU runs `kernel`; q: len rows of dh, 3d apart, within qkv
            // (checked above); kt: dh rows of len; s: len rows of len.
            unsafe {
                packed::gemm_acc(
                    kernel,
                    len,
                    len,
                    dh,
                    q,
                    3 * d,
                    kt.as_ptr(),
                    len,
                    s.as_mut_ptr(),
                    len,
                )
            };
            for row in s.chunks_exact_mut(len) {
                let m = max(row);
                row.iter_mut().for_each(|v| *v = exp((*v - m) * scale));
                let inv = 1.0 / sum(row);
                row.iter_mut().for_each(|v| *v *= inv);
            }
            let v = qkv[r.start * 3 * d + 2 * d + h * dh..].as_ptr();
            // SAFETY: as above; v: len rows of dh, 3d apart; the destination, len rows of dh
            // at column h·dh, d apart, is in bounds (checked) and written by this task alone
            // (one task per sequence and head); nothing reads ctx until all tasks end.
            unsafe {
                packed::gemm_acc(
                    kernel,
                    len,
                    dh,
                    len,
                    s.as_ptr(),
                    len,
                    v,
                    3 * d,
                    out.at(r.start * d + h * dh),
                    d,
                )
            };
            return;
        }
        let row = |i: usize| &qkv[(r.start + i) * 3 * d..][..3 * d];
        // Keys of this head transposed, (dh, len), so that one query's scores are axpys.
        let mut kt = vec![0f32; dh * len];
        for j in 0..len {
            let k = &row(j)[d + h * dh..][..dh];
            for c in 0..dh {
                kt[c * len + j] = k[c];
            }
        }
        let mut s = vec![0f32; len];
        let mut acc = vec![0f32; dh];
        for i in 0..len {
            let q = &row(i)[h * dh..][..dh];
            s.fill(0.0);
            for c in 0..dh {
                let qc = q[c] * scale;
                for (s, k) in s.iter_mut().zip(&kt[c * len..][..len]) {
                    *s += qc * k;
                }
            }
            let m = max(&s);
            s.iter_mut().for_each(|v| *v = exp(*v - m));
            let inv = 1.0 / sum(&s);
            acc.fill(0.0);
            for (j, &p) in s.iter().enumerate() {
                let v = &row(j)[2 * d + h * dh..][..dh];
                for (a, v) in acc.iter_mut().zip(v) {
                    *a += p * v;
                }
            }
            let at = (r.start + i) * d + h * dh;
            assert!(at + dh <= out_len);
            // SAFETY: in bounds (checked); task (sequence, head) alone writes these dh
            // elements of row r.start + i, and nothing reads ctx until all tasks end.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.at(at), dh) };
            for (o, a) in dst.iter_mut().zip(&acc) {
                *o = a * inv;
            }
        }
    };
    let tasks = ranges.len() * heads;
    let work: usize = ranges.iter().map(|r| r.len() * r.len()).sum::<usize>() * d;
    if work < 64 * 1024 || rayon::current_num_threads() <= 1 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_the_f64_reference_within_a_few_ulp() {
        let mut worst = 0f64;
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            let want = candle_core::cpu::erf::erf_f64(x as f64);
            worst = worst.max((erf(x) as f64 - want).abs());
        }
        assert!(worst < 5e-7, "worst abs error {worst}");
    }

    #[test]
    fn the_portable_product_matches_a_plain_one() {
        // The gemm-crate path that CPUs without AVX2 and FMA take.
        let (rows, k, n) = (37, 48, 80);
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 31 % 89) as f32 - 44.0) / 44.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 17 % 83) as f32 - 41.0) / 41.0)
            .collect();
        let l = Linear {
            w: w.clone(),
            packed: None,
            b: vec![0.5; n],
            n_in: k,
            n_out: n,
        };
        let mut got = vec![0f32; rows * n];
        fill_bias(&mut got, &l.b);
        matmul(&x, rows, &l, &mut got);
        for r in 0..rows {
            for j in 0..n {
                let want = 0.5 + (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum::<f32>();
                assert!((got[r * n + j] - want).abs() < 1e-4, "[{r},{j}]");
            }
        }
    }

    #[test]
    fn the_kernel_attention_matches_the_portable_one() {
        for kernel in packed::kernels_here() {
            for (d, heads) in [(64, 2), (48, 3), (384, 12)] {
                let ranges = [0..3, 3..20, 20..61, 61..62];
                let rows = 62;
                let qkv: Vec<f32> = (0..rows * 3 * d)
                    .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 200.0)
                    .collect();
                let mut want = vec![f32::NAN; rows * d];
                let mut got = vec![f32::NAN; rows * d];
                attention(&qkv, &mut want, &ranges, d, heads, None);
                attention(&qkv, &mut got, &ranges, d, heads, Some(kernel));
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() < 1e-5,
                        "{kernel:?} d {d}, element {i}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn exp_matches_std_within_a_few_ulp() {
        for i in -87_000..=88_000 {
            let x = i as f32 * 1e-3;
            let (got, want) = (exp(x), (x as f64).exp());
            assert!(
                ((got as f64 - want) / want).abs() < 4e-7,
                "exp({x}) = {got}, want {want}"
            );
        }
    }
}
