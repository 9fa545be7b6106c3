//! The f32 loops of the forward pass between the weight products: attention and the MLP's
//! gated SiLU (or Gemma's gated GELU).
//!
//! Attention takes each new row, of a prompt or of a decode step, against its sequence's cached
//! keys and values up to the row's own position. The work of a (row, kv head) is split into parts of [`ATTEND_CHUNK`] positions that run
//! as separate tasks (flash-decoding) and are merged after, so that the threads share even one
//! long sequence.
//!
//! Both loops are defined on 16-float lanes ([`lanes`]): dot products summed lane by lane with
//! FMAs and reduced in a fixed order, and a polynomial `exp`. The AVX-512 code does exactly
//! those operations in registers; elsewhere the lane code itself runs (compiled for AVX2 + FMA
//! where the CPU has them). Every CPU therefore gives the same bits, as the weight kernels in
//! [`super::super::qmatmul`] do, and a model's outputs do not depend on the machine.

use half::f16;

use crate::backend::qmatmul::Isa;

/// `g · sigmoid(g) · u` for each element (the gated SiLU of llama's MLP) into `out`.
pub(super) fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    assert!(
        g.len() == out.len() && u.len() == out.len(),
        "silu_mul lengths"
    );
    match Isa::detect() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F (Isa::detect); the lengths were checked above.
        Isa::Amx | Isa::Avx512Vnni => unsafe { avx512::silu_mul(g, u, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA (Isa::detect).
        Isa::Avx2 => unsafe { avx2::silu_mul(g, u, out) },
        _ => lanes::silu_mul(g, u, out),
    }
}

/// `gelu(g) · u` for each element (the gated GELU of Gemma's MLP, GELU's tanh form, as
/// transformers' `gelu_pytorch_tanh`) into `out`. `0.5 · (1 + tanh(y))` is `sigmoid(2y)`, so
/// this is [`silu_mul`]'s loop with the sigmoid of `2y = g · (C1 + C2 · g²)`: the lane `exp`,
/// the same bits on every CPU, and no cancellation near zero. (llama.cpp looks GELU up in a
/// table of f16 inputs; this stays within 2e-3 of it, and within float rounding of the formula.)
pub(super) fn gelu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    assert!(
        g.len() == out.len() && u.len() == out.len(),
        "gelu_mul lengths"
    );
    match Isa::detect() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F (Isa::detect); the lengths were checked above.
        Isa::Amx | Isa::Avx512Vnni => unsafe { avx512::gelu_mul(g, u, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA (Isa::detect).
        Isa::Avx2 => unsafe { avx2::gelu_mul(g, u, out) },
        _ => lanes::gelu_mul(g, u, out),
    }
}

/// GELU's `2 · √(2/π)` and `2 · √(2/π) · 0.044715`: `2y = g · (GELU_C1 + GELU_C2 · g²)`.
const GELU_C1: f32 = (2.0 * 0.797_884_560_802_865_4_f64) as f32;
const GELU_C2: f32 = (2.0 * 0.797_884_560_802_865_4_f64 * 0.044715) as f32;

/// `e^(x − shift)` for each `x` of `xs` into `out`, with the lane code's `exp`: the same bits
/// on every CPU (the sampler's weights, [`crate::sampling`]).
pub(crate) fn exp_shifted(xs: &[f32], shift: f32, out: &mut [f32]) {
    assert_eq!(xs.len(), out.len(), "exp_shifted lengths");
    match Isa::detect() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F (Isa::detect); the lengths were checked above.
        Isa::Amx | Isa::Avx512Vnni => unsafe { avx512::exp_shifted(xs, shift, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA (Isa::detect).
        Isa::Avx2 => unsafe { avx2::exp_shifted(xs, shift, out) },
        _ => lanes::exp_shifted(xs, shift, out),
    }
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

/// Positions per decode-attention task: a long cache is split so that the threads share the
/// work of one sequence's few kv heads evenly (flash-decoding); the parts are merged after.
/// A multiple of [`KEY_BLOCK`], so that every task starts on a block of keys.
pub(super) const ATTEND_CHUNK: usize = 128;

/// Positions per block of the key cache. The keys are kept transposed in blocks: per block of
/// `KEY_BLOCK` positions and per key value (kv head × head dimension), the block's positions
/// side by side. One 16-float register then holds one dimension of sixteen keys, and a block's
/// scores come out of FMAs lane by lane, with no sum across the lanes of a register. (The
/// values stay `[position][kv_head][head_dim]`: the weighted sum reads them a position at a
/// time.)
pub(super) const KEY_BLOCK: usize = 16;

/// The positions one attention task reads, and how their scores are shaped before the
/// softmax.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Span {
    /// Positions `start..end` of the cache (`start` a multiple of [`KEY_BLOCK`], at most
    /// [`ATTEND_CHUNK`] of them).
    pub start: usize,
    pub end: usize,
    /// The first of them that counts: those before it, outside a sliding window, weigh
    /// nothing.
    pub from: usize,
    /// Each score `s` (after the `1/√head_dim` scale) becomes `cap · tanh(s / cap)`: Gemma 2's
    /// soft-capping.
    pub softcap: Option<f32>,
}

#[cfg(test)]
impl Span {
    /// Every position of `start..end`, their scores as they are.
    pub(super) fn new(start: usize, end: usize) -> Span {
        Span {
            start,
            end,
            from: start,
            softcap: None,
        }
    }

    /// The span counting its positions from `from` on.
    pub(super) fn from(self, from: usize) -> Span {
        Span { from, ..self }
    }

    /// The span with its scores soft-capped at `cap`.
    pub(super) fn capped(self, cap: f32) -> Span {
        Span {
            softcap: Some(cap),
            ..self
        }
    }
}

/// The tasks of one row's attention to `len` cached positions of which those from `from` on
/// count (0, or a sliding window's first): each chunk of [`ATTEND_CHUNK`] positions that holds
/// any that count, and the span of it (positions relative to the chunk) to read, from the
/// block of its first counted position.
pub(super) fn chunk_spans(
    len: usize,
    from: usize,
    softcap: Option<f32>,
) -> impl Iterator<Item = (usize, Span)> {
    (from / ATTEND_CHUNK..len.div_ceil(ATTEND_CHUNK)).map(move |c| {
        let first = from.saturating_sub(c * ATTEND_CHUNK);
        let span = Span {
            start: first / KEY_BLOCK * KEY_BLOCK,
            end: (len - c * ATTEND_CHUNK).min(ATTEND_CHUNK),
            from: first,
            softcap,
        };
        (c, span)
    })
}

/// `cap · tanh(s / cap)` of each score (or logit), as llama.cpp computes it (times `1/cap`,
/// libm's `tanh`, times `cap`): scalar, so every path gives the same bits.
pub(super) fn cap_scores(scores: &mut [f32], cap: Option<f32>) {
    if let Some(cap) = cap {
        let inverse = 1.0 / cap;
        scores
            .iter_mut()
            .for_each(|s| *s = cap * (*s * inverse).tanh());
    }
}

/// The lanes of the 16 positions from `i` (relative to a task's start) that lie in
/// `skip..len`, as a mask.
#[inline(always)]
fn kept(i: usize, skip: usize, len: usize) -> u16 {
    let below = |n: usize| match n {
        n if n >= i + 16 => 0xffff,
        n if n <= i => 0,
        n => (1u32 << (n - i)) - 1,
    };
    (below(len) & !below(skip)) as u16
}

/// The length of a key cache holding `len` positions: whole blocks.
pub(super) fn key_cache_len(len: usize, kv_dim: usize) -> usize {
    len.div_ceil(KEY_BLOCK) * KEY_BLOCK * kv_dim
}

/// Where value `j` (`kv_head · head_dim + dimension`) of position `p`'s key lies in the key cache.
pub(super) fn key_at(p: usize, j: usize, kv_dim: usize) -> usize {
    p / KEY_BLOCK * KEY_BLOCK * kv_dim + j * KEY_BLOCK + p % KEY_BLOCK
}

/// Stores the key of position `p` (all kv heads, `kv_dim` values) in the key cache `kc`,
/// which has room for it. Positions after `p` in its block keep what they held (zeros, or
/// keys of a sequence since cut back); attention never reads them.
pub(super) fn push_key(kc: &mut [f16], p: usize, key: &[f32]) {
    let kv_dim = key.len();
    assert!(
        key_cache_len(p + 1, kv_dim) <= kc.len(),
        "no room for position {p}"
    );
    for (j, v) in key.iter().enumerate() {
        kc[key_at(p, j, kv_dim)] = f16::from_f32(*v);
    }
}

/// Part of the decode attention of the query heads `qg` (`n_rep` heads of `HD` values, all
/// reading kv head `g`): the positions of `span` in the cache. Writes into `part`, per head,
/// the largest score, then per head the sum of `exp(score − largest)`, then per head the
/// values weighted by those exponentials (not yet divided by the sum): `n_rep · (2 + HD)`
/// floats. Positions before `span.from` weigh exactly nothing.
pub(super) fn attend_part<const HD: usize>(
    qg: &[f32],
    g: usize,
    kc: &[f16],
    vc: &[f16],
    kv_dim: usize,
    span: Span,
    part: &mut [f32],
) {
    let n_rep = qg.len() / HD;
    assert!(
        HD.is_multiple_of(16)
            && span.start <= span.from
            && span.from < span.end
            && span.start.is_multiple_of(KEY_BLOCK)
            && span.end - span.start <= ATTEND_CHUNK
            && key_cache_len(span.end, kv_dim) <= kc.len()
            && span.end * kv_dim <= vc.len()
            && (g + 1) * HD <= kv_dim
            && part.len() == n_rep * (2 + HD),
        "attention part out of bounds"
    );
    match Isa::detect() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F (Isa::detect); the bounds were checked above.
        Isa::Amx | Isa::Avx512Vnni => unsafe {
            avx512::attend_part::<HD>(qg, g, kc, vc, kv_dim, span, part)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA (Isa::detect).
        Isa::Avx2 => unsafe { avx2::attend_part::<HD>(qg, g, kc, vc, kv_dim, span, part) },
        _ => lanes::attend_part::<HD>(qg, g, kc, vc, kv_dim, span, part),
    }
}

/// Merges the [`attend_part`]s of one (row, kv head), in position order, into `out`.
pub(super) fn merge_parts(parts: &[f32], n_rep: usize, hd: usize, out: &mut [f32]) {
    let stride = n_rep * (2 + hd);
    for (r, o) in out.chunks_exact_mut(hd).enumerate() {
        let max = parts
            .chunks_exact(stride)
            .fold(f32::NEG_INFINITY, |m, p| m.max(p[r]));
        let mut sum = 0f32;
        o.fill(0.0);
        for p in parts.chunks_exact(stride) {
            let w = (p[r] - max).exp();
            sum += w * p[n_rep + r];
            for (o, a) in o.iter_mut().zip(&p[2 * n_rep + r * hd..][..hd]) {
                *o += w * a;
            }
        }
        for o in o.iter_mut() {
            *o /= sum;
        }
    }
}

/// [`attend_part`] for a head size without a specialisation, in plain loops: the positions
/// `span.from..span.end` of one kv head's keys `kc` (blocked, `head_dim` values per position)
/// and values `vc` (`[position][head_dim]`), into the same layout of `part`.
pub(super) fn attend_dyn(
    qg: &[f32],
    kc: &[f16],
    vc: &[f16],
    hd: usize,
    span: Span,
    part: &mut [f32],
) {
    let n_rep = qg.len() / hd;
    let (from, n) = (span.from, span.end);
    assert!(
        from < n
            && key_cache_len(n, hd) <= kc.len()
            && n * hd <= vc.len()
            && part.len() == n_rep * (2 + hd),
        "attention part out of bounds"
    );
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    let (stats, out) = part.split_at_mut(2 * n_rep);
    for (r, (qh, o)) in qg
        .chunks_exact(hd)
        .zip(out.chunks_exact_mut(hd))
        .enumerate()
    {
        let mut sc: Vec<f32> = (from..n)
            .map(|p| {
                let k: Vec<f32> = (0..hd).map(|d| kc[key_at(p, d, hd)].to_f32()).collect();
                dot(qh, &k) * scale
            })
            .collect();
        cap_scores(&mut sc, span.softcap);
        let max = sc.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
        let mut sum = 0f32;
        o.fill(0.0);
        for (p, s) in (from..n).zip(&sc) {
            let w = (s - max).exp();
            sum += w;
            for (o, v) in o.iter_mut().zip(&vc[p * hd..][..hd]) {
                *o += w * v.to_f32();
            }
        }
        stats[r] = max;
        stats[n_rep + r] = sum;
    }
}

/// The definition of both loops on 16-float lanes, in plain Rust.
mod lanes {
    use half::f16;
    use half::slice::HalfFloatSliceExt;

    use super::{GELU_C1, GELU_C2, Span, cap_scores, kept, key_at};

    /// Sixteen lanes.
    pub(super) type L = [f32; 16];

    /// `exp` clamps its argument to this range, so that `2^n` below is a normal float.
    pub(super) const EXP_MIN: f32 = -87.0;
    pub(super) const EXP_MAX: f32 = 88.0;
    /// ln 2 in two parts, so that `n · LN2_HI` is exact.
    pub(super) const LN2_HI: f32 = 0.693_145_75;
    pub(super) const LN2_LO: f32 = 1.428_606_8e-6;
    /// The Taylor coefficients of `e^r` from degree 6 down, for Horner's rule.
    pub(super) const EXP_POLY: [f32; 7] = [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];

    /// The sum of the lanes: the two halves lane by lane, then the quarters, then pairs.
    #[inline(always)]
    pub(super) fn reduce(x: &L) -> f32 {
        let h: [f32; 8] = std::array::from_fn(|i| x[i] + x[i + 8]);
        let q: [f32; 4] = std::array::from_fn(|i| h[i + 4] + h[i]);
        (q[0] + q[2]) + (q[1] + q[3])
    }

    /// `e^x` as `2^n · p(r)`, `n = round(x / ln 2)`, `r = x − n ln 2` in [−ln 2 / 2, ln 2 / 2],
    /// `p` the degree-6 Taylor polynomial (relative error about 1e-7, as libm's `expf`).
    #[inline(always)]
    pub(super) fn exp(x: f32) -> f32 {
        // Not `clamp`: a NaN becomes EXP_MIN here, as in `_mm512_max_ps`.
        #[allow(clippy::manual_clamp)]
        let x = x.max(EXP_MIN).min(EXP_MAX);
        let n = (x * std::f32::consts::LOG2_E).round_ties_even();
        let r = (-n).mul_add(LN2_HI, x);
        let r = (-n).mul_add(LN2_LO, r);
        let mut p = EXP_POLY[0];
        for c in &EXP_POLY[1..] {
            p = p.mul_add(r, *c);
        }
        p * f32::from_bits(((n as i32 + 127) as u32) << 23)
    }

    #[inline(always)]
    pub(super) fn exp_shifted(xs: &[f32], shift: f32, out: &mut [f32]) {
        for (o, x) in out.iter_mut().zip(xs) {
            *o = exp(x - shift);
        }
    }

    #[inline(always)]
    pub(super) fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        for ((o, g), u) in out.iter_mut().zip(g).zip(u) {
            *o = (g * (1.0 / (1.0 + exp(0.0 - g)))) * u;
        }
    }

    #[inline(always)]
    pub(super) fn gelu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        for ((o, g), u) in out.iter_mut().zip(g).zip(u) {
            let z = g * GELU_C2.mul_add(g * g, GELU_C1);
            *o = (g * (1.0 / (1.0 + exp(0.0 - z)))) * u;
        }
    }

    #[inline(always)]
    pub(super) fn attend_part<const HD: usize>(
        qg: &[f32],
        g: usize,
        kc: &[f16],
        vc: &[f16],
        kv_dim: usize,
        span: Span,
        part: &mut [f32],
    ) {
        let n_rep = qg.len() / HD;
        let (p0, len, skip) = (span.start, span.end - span.start, span.from - span.start);
        let scale = (1.0 / (HD as f64).sqrt()) as f32;
        let padded = len.next_multiple_of(16);
        // scores[r * padded + i]: head r, position p0 + i; then its exponential.
        let mut scores = vec![0f32; n_rep * padded];
        // One block of keys in f32, `[dimension][position in the block]`.
        let mut kb = [[0f32; 16]; HD];
        let kb = kb.as_flattened_mut();
        for blk in 0..padded / 16 {
            let at = key_at(p0 + 16 * blk, g * HD, kv_dim);
            kc[at..][..HD * 16].convert_to_f32_slice(kb);
            for r in 0..n_rep {
                let q = &qg[r * HD..][..HD];
                // The score of position s is the dot product of q with its key summed as
                // `reduce` sums the 16 lanes of `acc[l] = fma(q[16c + l], k[16c + l], acc[l])`
                // over c; here `lane(l)` is that lane for 16 positions side by side, and
                // `quarter[i]` is `reduce`'s `q[i] = h[i + 4] + h[i]`, `h[i] = x[i] + x[i + 8]`.
                let lane = |l: usize| -> L {
                    let mut acc: L = [0.0; 16];
                    for c in 0..HD / 16 {
                        let qv = q[16 * c + l];
                        let k = &kb[(16 * c + l) * 16..][..16];
                        for s in 0..16 {
                            acc[s] = qv.mul_add(k[s], acc[s]);
                        }
                    }
                    acc
                };
                let mut quarter = [[0f32; 16]; 4];
                for (i, quarter) in quarter.iter_mut().enumerate() {
                    let (x0, x8, x4, x12) = (lane(i), lane(i + 8), lane(i + 4), lane(i + 12));
                    for s in 0..16 {
                        quarter[s] = (x4[s] + x12[s]) + (x0[s] + x8[s]);
                    }
                }
                for s in 0..16 {
                    let q = [0, 1, 2, 3].map(|i| quarter[i][s]);
                    scores[r * padded + 16 * blk + s] = ((q[0] + q[2]) + (q[1] + q[3])) * scale;
                }
            }
        }
        let (stats, out) = part.split_at_mut(2 * n_rep);
        for r in 0..n_rep {
            let row = &mut scores[r * padded..][..padded];
            cap_scores(&mut row[..len], span.softcap);
            let max = row[skip..len]
                .iter()
                .fold(f32::NEG_INFINITY, |m, s| m.max(*s));
            let mut sum: L = [0.0; 16];
            for (c, chunk) in row.chunks_exact_mut(16).enumerate() {
                let keep = kept(c * 16, skip, len);
                for (l, s) in chunk.iter_mut().enumerate() {
                    *s = if keep >> l & 1 == 1 {
                        exp(*s - max)
                    } else {
                        0.0
                    };
                    sum[l] += *s;
                }
            }
            stats[r] = max;
            stats[n_rep + r] = reduce(&sum);
        }
        // The values weighted by the exponentials, `o = fma(w_i, v_i, o)` over the positions
        // in order for each head; a position's values are converted once for all the heads.
        out.fill(0.0);
        let mut v = [0f32; HD];
        for i in 0..len {
            vc[(p0 + i) * kv_dim + g * HD..][..HD].convert_to_f32_slice(&mut v);
            for (r, o) in out.chunks_exact_mut(HD).enumerate() {
                let w = scores[r * padded + i];
                for (o, v) in o.iter_mut().zip(&v) {
                    *o = w.mul_add(*v, *o);
                }
            }
        }
    }
}

/// The lane code compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use half::f16;

    /// [`super::lanes::silu_mul`].
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        super::lanes::silu_mul(g, u, out)
    }

    /// [`super::lanes::gelu_mul`].
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gelu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        super::lanes::gelu_mul(g, u, out)
    }

    /// [`super::lanes::exp_shifted`].
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shifted(xs: &[f32], shift: f32, out: &mut [f32]) {
        super::lanes::exp_shifted(xs, shift, out)
    }

    /// [`super::lanes::attend_part`].
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_part<const HD: usize>(
        qg: &[f32],
        g: usize,
        kc: &[f16],
        vc: &[f16],
        kv_dim: usize,
        span: super::Span,
        part: &mut [f32],
    ) {
        super::lanes::attend_part::<HD>(qg, g, kc, vc, kv_dim, span, part)
    }
}

/// The lane code's operations in AVX-512 registers.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::lanes::{EXP_MAX, EXP_MIN, EXP_POLY, LN2_HI, LN2_LO};
    use super::{GELU_C1, GELU_C2, Span, cap_scores, kept, key_at};

    /// [`super::lanes::reduce`].
    #[target_feature(enable = "avx512f,avx2")]
    fn reduce(x: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(x);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)));
        let h = _mm256_add_ps(lo, hi);
        let q = _mm_add_ps(_mm256_extractf128_ps::<1>(h), _mm256_castps256_ps128(h));
        let p = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(p, _mm_movehdup_ps(p)))
    }

    /// [`super::lanes::exp`] of 16 floats.
    #[target_feature(enable = "avx512f")]
    fn exp(x: __m512) -> __m512 {
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(EXP_MIN)),
            _mm512_set1_ps(EXP_MAX),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let two_n = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        _mm512_mul_ps(p, _mm512_castsi512_ps(two_n))
    }

    /// [`super::lanes::silu_mul`] in AVX-512.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `g`, `u` and `out` have the same length.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        let n = out.len();
        let one = _mm512_set1_ps(1.0);
        for i in (0..n).step_by(16) {
            let keep = if n - i >= 16 {
                !0
            } else {
                ((1u32 << (n - i)) - 1) as u16
            };
            unsafe {
                let gv = _mm512_maskz_loadu_ps(keep, g.as_ptr().add(i));
                let uv = _mm512_maskz_loadu_ps(keep, u.as_ptr().add(i));
                let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), gv));
                let sig = _mm512_div_ps(one, _mm512_add_ps(one, e));
                let o = _mm512_mul_ps(_mm512_mul_ps(gv, sig), uv);
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), keep, o);
            }
        }
    }

    /// [`super::lanes::gelu_mul`] in AVX-512.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `g`, `u` and `out` have the same length.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gelu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        let n = out.len();
        let one = _mm512_set1_ps(1.0);
        let (c1, c2) = (_mm512_set1_ps(GELU_C1), _mm512_set1_ps(GELU_C2));
        for i in (0..n).step_by(16) {
            let keep = kept(i, 0, n);
            unsafe {
                let gv = _mm512_maskz_loadu_ps(keep, g.as_ptr().add(i));
                let uv = _mm512_maskz_loadu_ps(keep, u.as_ptr().add(i));
                let z = _mm512_mul_ps(gv, _mm512_fmadd_ps(c2, _mm512_mul_ps(gv, gv), c1));
                let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), z));
                let sig = _mm512_div_ps(one, _mm512_add_ps(one, e));
                let o = _mm512_mul_ps(_mm512_mul_ps(gv, sig), uv);
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), keep, o);
            }
        }
    }

    /// [`super::lanes::exp_shifted`] in AVX-512.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `xs` and `out` have the same length.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_shifted(xs: &[f32], shift: f32, out: &mut [f32]) {
        let n = out.len();
        let s = _mm512_set1_ps(shift);
        for i in (0..n).step_by(16) {
            let keep = if n - i >= 16 {
                !0
            } else {
                ((1u32 << (n - i)) - 1) as u16
            };
            unsafe {
                let x = _mm512_maskz_loadu_ps(keep, xs.as_ptr().add(i));
                let e = exp(_mm512_sub_ps(x, s));
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), keep, e);
            }
        }
    }

    /// [`super::lanes::attend_part`] in AVX-512.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `HD` is a multiple of 16; the positions of `span` (`start ≤ from
    /// < end`) of kv head `g` lie inside `kc` and `vc`; `part` holds `n_rep · (2 + HD)` floats.
    #[target_feature(enable = "avx512f,avx2")]
    pub(super) unsafe fn attend_part<const HD: usize>(
        qg: &[f32],
        g: usize,
        kc: &[f16],
        vc: &[f16],
        kv_dim: usize,
        span: Span,
        part: &mut [f32],
    ) {
        let n_rep = qg.len() / HD;
        let (p0, len, skip) = (span.start, span.end - span.start, span.from - span.start);
        let scale = (1.0 / (HD as f64).sqrt()) as f32;
        let padded = len.next_multiple_of(16);
        let mut scores = vec![0f32; n_rep * padded];
        let (kp, vp, qp, sp) = (kc.as_ptr(), vc.as_ptr(), qg.as_ptr(), scores.as_mut_ptr());
        // A block of keys is converted from f16 once for all the query heads that read it:
        // `kb[d]` holds dimension d of the block's sixteen positions.
        let mut kb = [_mm512_setzero_ps(); HD];
        for blk in 0..padded / 16 {
            let k = unsafe { kp.add(key_at(p0 + 16 * blk, g * HD, kv_dim)) };
            // The cache is read once per step from far memory (tens of MB over the batch):
            // the next block's keys are fetched while this one's scores are computed.
            let next = k.wrapping_add(16 * kv_dim);
            for line in (0..16 * HD).step_by(32) {
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line) as *const i8);
            }
            for (d, kd) in kb.iter_mut().enumerate().take(HD) {
                *kd =
                    _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(k.add(16 * d) as *const __m256i) });
            }
            for r in 0..n_rep {
                let q = unsafe { qp.add(r * HD) };
                let mut h = [_mm512_setzero_ps(); 8];
                for (i, h) in h.iter_mut().enumerate() {
                    let (mut a, mut b) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                    for c in 0..HD / 16 {
                        let (qa, qb) = unsafe { (*q.add(16 * c + i), *q.add(16 * c + i + 8)) };
                        a = _mm512_fmadd_ps(_mm512_set1_ps(qa), kb[16 * c + i], a);
                        b = _mm512_fmadd_ps(_mm512_set1_ps(qb), kb[16 * c + i + 8], b);
                    }
                    *h = _mm512_add_ps(a, b);
                }
                let q: [__m512; 4] = std::array::from_fn(|i| _mm512_add_ps(h[i + 4], h[i]));
                let sum = _mm512_add_ps(_mm512_add_ps(q[0], q[2]), _mm512_add_ps(q[1], q[3]));
                let s = _mm512_mul_ps(sum, _mm512_set1_ps(scale));
                unsafe { _mm512_storeu_ps(sp.add(r * padded + 16 * blk), s) };
            }
        }
        let (stats, out) = part.split_at_mut(2 * n_rep);
        for r in 0..n_rep {
            let row = unsafe { sp.add(r * padded) };
            if span.softcap.is_some() {
                // SAFETY: head r's `len` scores, which nothing else borrows.
                cap_scores(
                    unsafe { std::slice::from_raw_parts_mut(row, len) },
                    span.softcap,
                );
            }
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            for i in (0..padded).step_by(16) {
                let keep = kept(i, skip, len);
                m = _mm512_mask_max_ps(m, keep, m, unsafe { _mm512_loadu_ps(row.add(i)) });
            }
            let max = _mm512_reduce_max_ps(m);
            let mut sum = _mm512_setzero_ps();
            for i in (0..padded).step_by(16) {
                let keep = kept(i, skip, len);
                let x = _mm512_sub_ps(unsafe { _mm512_loadu_ps(row.add(i)) }, _mm512_set1_ps(max));
                let e = _mm512_maskz_mov_ps(keep, exp(x));
                sum = _mm512_add_ps(sum, e);
                unsafe { _mm512_storeu_ps(row.add(i), e) };
            }
            stats[r] = max;
            stats[n_rep + r] = reduce(sum);
        }
        // The values weighted by the exponentials: 64 dimensions of up to four heads at a
        // time, so that a position's values are read and converted once for them all.
        let o_ptr = out.as_mut_ptr();
        for c in (0..HD).step_by(64) {
            for r0 in (0..n_rep).step_by(4) {
                match n_rep - r0 {
                    1 => unsafe {
                        weigh_values::<HD, 1>(vp, sp, o_ptr, (g, c, r0), kv_dim, p0, len, padded)
                    },
                    2 => unsafe {
                        weigh_values::<HD, 2>(vp, sp, o_ptr, (g, c, r0), kv_dim, p0, len, padded)
                    },
                    3 => unsafe {
                        weigh_values::<HD, 3>(vp, sp, o_ptr, (g, c, r0), kv_dim, p0, len, padded)
                    },
                    _ => unsafe {
                        weigh_values::<HD, 4>(vp, sp, o_ptr, (g, c, r0), kv_dim, p0, len, padded)
                    },
                }
            }
        }
    }

    /// Heads `r0..r0 + NR` of [`attend_part`]'s weighted values, dimensions `c..c + 64` (or
    /// to `HD`): `o = fma(w_i, v_i, o)` over the positions in order, as the lane code does
    /// per head.
    ///
    /// # Safety
    /// As [`attend_part`]'s; `sp` holds the heads' weights (`padded` per head), `o_ptr` their
    /// outputs (`HD` per head).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2")]
    unsafe fn weigh_values<const HD: usize, const NR: usize>(
        vp: *const f16,
        sp: *const f32,
        o_ptr: *mut f32,
        (g, c, r0): (usize, usize, usize),
        kv_dim: usize,
        p0: usize,
        len: usize,
        padded: usize,
    ) {
        let width = ((HD - c) / 16).min(4);
        let mut o = [[_mm512_setzero_ps(); 4]; NR];
        for i in 0..len {
            let v = unsafe { vp.add((p0 + i) * kv_dim + g * HD + c) };
            _mm_prefetch::<_MM_HINT_T0>(v.wrapping_add(8 * kv_dim) as *const i8);
            let mut vv = [_mm512_setzero_ps(); 4];
            for (j, vv) in vv.iter_mut().enumerate().take(width) {
                *vv =
                    _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(v.add(16 * j) as *const __m256i) });
            }
            for (r, o) in o.iter_mut().enumerate() {
                let w = _mm512_set1_ps(unsafe { *sp.add((r0 + r) * padded + i) });
                for (o, vv) in o.iter_mut().zip(&vv).take(width) {
                    *o = _mm512_fmadd_ps(w, *vv, *o);
                }
            }
        }
        for (r, o) in o.iter().enumerate() {
            for (j, o) in o.iter().enumerate().take(width) {
                unsafe { _mm512_storeu_ps(o_ptr.add((r0 + r) * HD + c + 16 * j), *o) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn halves(n: usize, seed: u32) -> Vec<f16> {
        values(n, seed).into_iter().map(f16::from_f32).collect()
    }

    /// The key cache of `keys` (`[position][kv_dim]`), as the forward pass builds it.
    fn blocked(keys: &[f16], kv_dim: usize) -> Vec<f16> {
        let mut kc = vec![f16::ZERO; key_cache_len(keys.len() / kv_dim, kv_dim)];
        for (p, key) in keys.chunks_exact(kv_dim).enumerate() {
            let key: Vec<f32> = key.iter().map(|v| v.to_f32()).collect();
            push_key(&mut kc, p, &key);
        }
        assert_eq!(kc.len(), key_cache_len(keys.len() / kv_dim, kv_dim));
        kc
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0
                    - 1.0
            })
            .collect()
    }

    /// A key cache cut back (a failed step) and written again holds the new keys where the
    /// old ones were, and the old keys before the cut.
    #[test]
    fn a_cut_back_key_cache_takes_new_keys_in_place() {
        let kv_dim = 8;
        let (old, new) = (halves(40 * kv_dim, 1), halves(40 * kv_dim, 2));
        for cut in [0, 5, 16, 17] {
            let mut kc = blocked(&old, kv_dim);
            for p in cut..40 {
                let key: Vec<f32> = new[p * kv_dim..][..kv_dim]
                    .iter()
                    .map(|v| v.to_f32())
                    .collect();
                push_key(&mut kc, p, &key);
            }
            assert_eq!(kc.len(), key_cache_len(40, kv_dim));
            for p in 0..40 {
                for j in 0..kv_dim {
                    let want = if p < cut {
                        old[p * kv_dim + j]
                    } else {
                        new[p * kv_dim + j]
                    };
                    assert_eq!(
                        kc[key_at(p, j, kv_dim)],
                        want,
                        "cut {cut} position {p} [{j}]"
                    );
                }
            }
        }
    }

    /// A query head's softmax weights over `keys` in f64, each score soft-capped at `cap`,
    /// shifted by the largest score (not divided by their sum), and their sum.
    fn capped_weights_f64<'a>(
        q: &[f32],
        keys: impl Iterator<Item = &'a [f16]>,
        cap: Option<f32>,
    ) -> (Vec<f64>, f64) {
        let scale = (q.len() as f64).sqrt();
        let sc: Vec<f64> = keys
            .map(|k| {
                let s = q
                    .iter()
                    .zip(k)
                    .map(|(a, b)| *a as f64 * b.to_f64())
                    .sum::<f64>()
                    / scale;
                cap.map_or(s, |c| c as f64 * (s / c as f64).tanh())
            })
            .collect();
        let max = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = sc.iter().map(|s| (s - max).exp()).collect();
        let sum = e.iter().sum();
        (e, sum)
    }

    /// The split decode attention (parts of `ATTEND_CHUNK` positions, each on its own runs of
    /// keys and values as the cache holds them, merged after) equals a one-pass softmax
    /// attention in f64 over every position that counts, for a cache shorter and longer than
    /// a part, with the specialised kernel and with the plain one; also when only the last
    /// positions count (a sliding window starting inside a block, on a block, in a later
    /// chunk) and with soft-capped scores.
    #[test]
    fn split_decode_attention_equals_one_pass() {
        let (hd, n_rep) = (64, 3);
        for len in [1, 7, ATTEND_CHUNK, 3 * ATTEND_CHUNK + 5] {
            let (keys, vals) = (halves(len * hd, 1), halves(len * hd, 2));
            let qg: Vec<f32> = values(n_rep * hd, 3).iter().map(|v| v * 4.0).collect();
            let stride = n_rep * (2 + hd);
            for (from, cap) in [
                (0, None),
                (len.saturating_sub(5), None),
                (len / 2, Some(2.0)),
                (len.saturating_sub(ATTEND_CHUNK + 16), Some(30.0)),
            ] {
                let tasks: Vec<(usize, Span)> = chunk_spans(len, from, cap).collect();
                let (mut fast, mut plain) = (
                    vec![0f32; tasks.len() * stride],
                    vec![0f32; tasks.len() * stride],
                );
                for (i, &(c, span)) in tasks.iter().enumerate() {
                    let chunk = c * ATTEND_CHUNK..(len.min((c + 1) * ATTEND_CHUNK));
                    let mut kc = blocked(&keys[chunk.start * hd..chunk.end * hd], hd);
                    kc.resize(ATTEND_CHUNK * hd, f16::ZERO);
                    let mut vc = vals[chunk.start * hd..chunk.end * hd].to_vec();
                    vc.resize(ATTEND_CHUNK * hd, f16::ZERO);
                    attend_part::<64>(
                        &qg,
                        0,
                        &kc,
                        &vc,
                        hd,
                        span,
                        &mut fast[i * stride..][..stride],
                    );
                    attend_dyn(&qg, &kc, &vc, hd, span, &mut plain[i * stride..][..stride]);
                }
                for (name, parts) in [("attend_part", &fast), ("attend_dyn", &plain)] {
                    let mut got = vec![0f32; n_rep * hd];
                    merge_parts(parts, n_rep, hd, &mut got);
                    let counted = || keys.chunks_exact(hd).skip(from);
                    for (r, o) in got.chunks_exact(hd).enumerate() {
                        let (e, sum) = capped_weights_f64(&qg[r * hd..][..hd], counted(), cap);
                        for (d, got) in o.iter().enumerate() {
                            let want: f64 = e
                                .iter()
                                .zip(vals.chunks_exact(hd).skip(from))
                                .map(|(w, v)| w * v[d].to_f64())
                                .sum::<f64>()
                                / sum;
                            assert!(
                                (*got as f64 - want).abs() <= 1e-5,
                                "{name} len {len} from {from} cap {cap:?} head {r} [{d}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Every path this CPU runs gives the lane code's bits (each head size, several query
    /// heads per kv head, parts shorter than, equal to and not a multiple of a register), and
    /// the lane code agrees with a plain f64 softmax attention.
    #[test]
    fn every_attention_path_gives_the_lane_codes_bits() {
        fn check<const HD: usize>() {
            for n_rep in [1, 3, 4] {
                let n_kv = 2;
                let kv_dim = n_kv * HD;
                let len = 300;
                let keys = halves(len * kv_dim, 5);
                let kc = blocked(&keys, kv_dim);
                let vc = halves(len * kv_dim, 6);
                let qg: Vec<f32> = values(n_rep * HD, 7).iter().map(|v| v * 3.0).collect();
                let spans = [(0, 1), (16, 23), (0, 16), (32, 160), (176, 300)]
                    .map(|(start, end)| Span::new(start, end))
                    .into_iter()
                    // A sliding window's first position inside a block and on one; caps that
                    // bite and one that hardly does.
                    .chain([
                        Span::new(16, 23).from(20),
                        Span::new(32, 160).from(48).capped(2.0),
                        Span::new(0, 16).capped(50.0),
                        Span::new(176, 300).from(299).capped(1.0),
                    ]);
                for span in spans {
                    for g in 0..n_kv {
                        let stride = n_rep * (2 + HD);
                        let mut want = vec![0f32; stride];
                        lanes::attend_part::<HD>(&qg, g, &kc, &vc, kv_dim, span, &mut want);
                        let counted = span.from..span.end;
                        // Against f64: the weighted values divided by the sum of weights.
                        for r in 0..n_rep {
                            let (e, sum) = capped_weights_f64(
                                &qg[r * HD..][..HD],
                                counted.clone().map(|p| &keys[p * kv_dim + g * HD..][..HD]),
                                span.softcap,
                            );
                            assert!((want[n_rep + r] as f64 - sum).abs() <= 1e-5 * sum);
                            for c in 0..HD {
                                let o: f64 = counted
                                    .clone()
                                    .zip(&e)
                                    .map(|(p, w)| w * vc[p * kv_dim + g * HD + c].to_f64())
                                    .sum::<f64>()
                                    / sum;
                                let got = want[2 * n_rep + r * HD + c] as f64 / sum;
                                assert!((got - o).abs() <= 1e-5, "HD {HD} [{r},{c}]: {got} vs {o}");
                            }
                        }
                        let mut paths: Vec<(&str, Vec<f32>)> = Vec::new();
                        let mut got = vec![0f32; stride];
                        attend_part::<HD>(&qg, g, &kc, &vc, kv_dim, span, &mut got);
                        paths.push(("dispatched", got));
                        #[cfg(target_arch = "x86_64")]
                        {
                            if is_x86_feature_detected!("avx512f") {
                                let mut got = vec![0f32; stride];
                                // SAFETY: AVX-512F is present; the bounds hold.
                                unsafe {
                                    avx512::attend_part::<HD>(
                                        &qg, g, &kc, &vc, kv_dim, span, &mut got,
                                    )
                                };
                                paths.push(("avx512", got));
                            }
                            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                                let mut got = vec![0f32; stride];
                                // SAFETY: AVX2 and FMA are present.
                                unsafe {
                                    avx2::attend_part::<HD>(
                                        &qg, g, &kc, &vc, kv_dim, span, &mut got,
                                    )
                                };
                                paths.push(("avx2", got));
                            }
                        }
                        for (name, got) in paths {
                            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                                assert_eq!(
                                    a.to_bits(),
                                    b.to_bits(),
                                    "{name} HD {HD} n_rep {n_rep} span {span:?} g {g} [{i}]: {a} vs {b}"
                                );
                            }
                        }
                    }
                }
            }
        }
        check::<64>();
        check::<96>();
        check::<128>();
        check::<256>();
    }

    /// An ISA's gated activation (`avx512::silu_mul`, ...).
    type Gate = unsafe fn(&[f32], &[f32], &mut [f32]);

    /// The outputs over `g` and `u` of every path of a gated activation this CPU runs: the
    /// dispatched one, then the AVX-512 and the AVX2 ones of `isa` (in that order) where the
    /// CPU has them.
    fn gate_paths<const N: usize>(
        g: &[f32],
        u: &[f32],
        dispatched: fn(&[f32], &[f32], &mut [f32]),
        isa: [Gate; N],
    ) -> Vec<(&'static str, Vec<f32>)> {
        let mut got = vec![0f32; g.len()];
        dispatched(g, u, &mut got);
        let mut paths = vec![("dispatched", got)];
        #[cfg(target_arch = "x86_64")]
        {
            let present = [
                ("avx512", is_x86_feature_detected!("avx512f")),
                (
                    "avx2",
                    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
                ),
            ];
            for ((name, here), gate) in present.into_iter().zip(isa) {
                if here {
                    let mut got = vec![0f32; g.len()];
                    // SAFETY: the CPU has the ISA's features; the lengths agree.
                    unsafe { gate(g, u, &mut got) };
                    paths.push((name, got));
                }
            }
        }
        paths
    }

    /// The gated GELU is GELU's tanh formula (transformers' `gelu_pytorch_tanh`, computed in
    /// f64) times the up value, where the sigmoid saturates on both sides too, and every path
    /// gives the lane code's bits over a length that is not a multiple of a register.
    #[test]
    fn gelu_paths_agree_with_the_tanh_formula() {
        let n = 16 * 7 + 5;
        let g: Vec<f32> = values(n, 10).iter().map(|v| v * 12.0).collect();
        let u = values(n, 11);
        let mut want = vec![0f32; n];
        lanes::gelu_mul(&g, &u, &mut want);
        for (i, w) in want.iter().enumerate() {
            let x = g[i] as f64;
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let exact = 0.5 * x * (1.0 + (c * (x + 0.044715 * x.powi(3))).tanh()) * u[i] as f64;
            assert!(
                (*w as f64 - exact).abs() <= 2e-6 * exact.abs().max(1e-3),
                "[{i}] g {x}: {w} vs {exact}"
            );
        }
        #[cfg(target_arch = "x86_64")]
        let isa: [Gate; 2] = [avx512::gelu_mul, avx2::gelu_mul];
        #[cfg(not(target_arch = "x86_64"))]
        let isa = [];
        for (name, got) in gate_paths(&g, &u, gelu_mul, isa) {
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "gelu {name} [{i}]: {a} vs {b}");
            }
        }
    }

    /// The lane `exp` is as close to libm's as a float allows, saturates at the ends, and every
    /// SiLU path gives the lane code's bits over gates where the sigmoid saturates on both
    /// sides and a length that is not a multiple of a register.
    #[test]
    fn exp_and_silu_paths_agree() {
        for i in -1000..=1000 {
            let x = i as f32 * 0.087;
            let (got, want) = (lanes::exp(x), (x as f64).exp());
            assert!(
                ((got as f64 - want) / want).abs() < 4e-7,
                "exp({x}): {got} vs {want}"
            );
        }
        assert!(lanes::exp(f32::NEG_INFINITY) < 1e-37);
        assert!(lanes::exp(1000.0).is_finite());
        let n = 16 * 7 + 5;
        let g: Vec<f32> = values(n, 8).iter().map(|v| v * 120.0).collect();
        let u = values(n, 9);
        let mut want = vec![0f32; n];
        lanes::silu_mul(&g, &u, &mut want);
        for (i, w) in want.iter().enumerate() {
            let exact = g[i] as f64 / (1.0 + (-g[i] as f64).exp()) * u[i] as f64;
            assert!(
                (*w as f64 - exact).abs() <= 1e-6 * exact.abs().max(1.0),
                "[{i}]"
            );
        }
        #[cfg(target_arch = "x86_64")]
        let isa: [Gate; 2] = [avx512::silu_mul, avx2::silu_mul];
        #[cfg(not(target_arch = "x86_64"))]
        let isa = [];
        for (name, got) in gate_paths(&g, &u, silu_mul, isa) {
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{name} [{i}] g {}: {a} vs {b}",
                    g[i]
                );
            }
        }
        // The shifted exp: the lane `exp` of each difference, on every path, NaN included.
        let mut xs = g.clone();
        xs[3] = f32::NAN;
        xs[4] = f32::NEG_INFINITY;
        let want: Vec<f32> = xs.iter().map(|x| lanes::exp(x - 7.5)).collect();
        let mut got = vec![0f32; n];
        exp_shifted(&xs, 7.5, &mut got);
        let mut paths = vec![("dispatched", got)];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                let mut got = vec![0f32; n];
                // SAFETY: AVX-512F is present; the lengths agree.
                unsafe { avx512::exp_shifted(&xs, 7.5, &mut got) };
                paths.push(("avx512", got));
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                let mut got = vec![0f32; n];
                // SAFETY: AVX2 and FMA are present.
                unsafe { avx2::exp_shifted(&xs, 7.5, &mut got) };
                paths.push(("avx2", got));
            }
        }
        for (name, got) in paths {
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "exp_shifted {name} [{i}]");
            }
        }
    }
}
