//! Decode attention: each sequence's one new query row against its cached keys and values.
//!
//! The work of a (sequence, kv head) is split into parts of [`ATTEND_CHUNK`] positions that run
//! as separate tasks (flash-decoding) and are merged after, so that the threads share even one
//! long sequence. A part runs in AVX-512 where the CPU has it (the dot products, a vectorised
//! `exp` and the weighted sum of values in 16-float registers), else in plain Rust.

/// Dot product with eight independent accumulators, so that the compiler can vectorise it.
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
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
pub(super) const ATTEND_CHUNK: usize = 128;

/// Part of the decode attention of the query heads `qg` (`n_rep` heads of `HD` values, all
/// reading kv head `g`): positions `p0..p1` of the cache. Writes into `part`, per head, the
/// largest score, then per head the sum of `exp(score − largest)`, then per head the values
/// weighted by those exponentials (not yet divided by the sum): `n_rep · (2 + HD)` floats.
pub(super) fn attend_part<const HD: usize>(
    qg: &[f32],
    g: usize,
    kc: &[f32],
    vc: &[f32],
    kv_dim: usize,
    span: (usize, usize),
    part: &mut [f32],
) {
    let n_rep = qg.len() / HD;
    assert!(
        HD.is_multiple_of(16)
            && span.0 < span.1
            && span.1 * kv_dim <= kc.len().min(vc.len())
            && (g + 1) * HD <= kv_dim
            && part.len() == n_rep * (2 + HD),
        "attention part out of bounds"
    );
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; the bounds were checked above.
        unsafe { avx512::attend_part::<HD>(qg, g, kc, vc, kv_dim, span, part) };
        return;
    }
    attend_part_scalar::<HD>(qg, g, kc, vc, kv_dim, span, part);
}

/// [`attend_part`] in plain Rust.
fn attend_part_scalar<const HD: usize>(
    qg: &[f32],
    g: usize,
    kc: &[f32],
    vc: &[f32],
    kv_dim: usize,
    (p0, p1): (usize, usize),
    part: &mut [f32],
) {
    let n_rep = qg.len() / HD;
    let len = p1 - p0;
    let scale = (1.0 / (HD as f64).sqrt()) as f32;
    // scores[r * len + i]: head r, position p0 + i.
    let mut scores = vec![0f32; n_rep * len];
    for i in 0..len {
        let p = p0 + i;
        let kp: &[f32; HD] = kc[p * kv_dim + g * HD..][..HD].try_into().expect("HD keys");
        for r in 0..n_rep {
            scores[r * len + i] = dot(&qg[r * HD..][..HD], kp) * scale;
        }
    }
    let (stats, acc) = part.split_at_mut(2 * n_rep);
    for (r, sc) in scores.chunks_exact_mut(len).enumerate() {
        let max = sc.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
        let mut sum = 0f32;
        for s in sc.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        stats[r] = max;
        stats[n_rep + r] = sum;
    }
    acc.fill(0.0);
    for i in 0..len {
        let p = p0 + i;
        let vp: &[f32; HD] = vc[p * kv_dim + g * HD..][..HD]
            .try_into()
            .expect("HD values");
        for (r, o) in acc.chunks_exact_mut(HD).enumerate() {
            let w = scores[r * len + i];
            for (o, v) in o.iter_mut().zip(vp) {
                *o += w * v;
            }
        }
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

/// Decode attention of one (row, kv head) in one task, for a head size without a
/// specialisation of [`attend_part`].
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_dyn(
    qg: &[f32],
    g: usize,
    kc: &[f32],
    vc: &[f32],
    kv_dim: usize,
    len: usize,
    hd: usize,
    out: &mut [f32],
) {
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    for (qh, o) in qg.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
        let mut sc: Vec<f32> = (0..len)
            .map(|p| dot(qh, &kc[p * kv_dim + g * hd..][..hd]) * scale)
            .collect();
        let max = sc.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
        let mut sum = 0f32;
        for s in sc.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        o.fill(0.0);
        for (p, w) in sc.iter().enumerate() {
            for (o, v) in o.iter_mut().zip(&vc[p * kv_dim + g * hd..][..hd]) {
                *o += w / sum * v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `exp` of 16 floats at most 0 (scores minus their maximum): `2^n · e^r` with
    /// `r = x − n ln 2` in [−ln 2 / 2, ln 2 / 2] and a degree-6 Taylor polynomial for `e^r`
    /// (relative error about 1e-7, as libm's `expf`); `scalef` handles underflow to 0.
    #[target_feature(enable = "avx512f")]
    fn exp(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        // ln 2 in two parts, so that n · ln2_hi is exact.
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// [`super::attend_part`] in AVX-512.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `HD` is a multiple of 16; positions `p0..p1` (`p0 < p1`) of kv head
    /// `g` lie inside `kc` and `vc`; `part` holds `n_rep · (2 + HD)` floats.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attend_part<const HD: usize>(
        qg: &[f32],
        g: usize,
        kc: &[f32],
        vc: &[f32],
        kv_dim: usize,
        (p0, p1): (usize, usize),
        part: &mut [f32],
    ) {
        let n_rep = qg.len() / HD;
        let len = p1 - p0;
        let scale = _mm512_set1_ps((1.0 / (HD as f64).sqrt()) as f32);
        // scores[r * padded + i]: head r, position p0 + i; the padding past `len` stays at −∞
        // so that whole registers can be reduced and exponentiated.
        let padded = len.next_multiple_of(16);
        let mut scores = vec![f32::NEG_INFINITY; n_rep * padded];
        let (kp, vp, qp, sp) = (kc.as_ptr(), vc.as_ptr(), qg.as_ptr(), scores.as_mut_ptr());
        // Sixteen positions at a time: per head, sixteen dot products are summed lane-wise
        // and then reduced, each to its own lane of one register.
        for i0 in (0..len).step_by(16) {
            let n = (len - i0).min(16);
            for r in 0..n_rep {
                let mut lanes = [0f32; 16];
                for (i, lane) in lanes.iter_mut().enumerate().take(n) {
                    let k = unsafe { kp.add((p0 + i0 + i) * kv_dim + g * HD) };
                    let mut acc = _mm512_setzero_ps();
                    for c in (0..HD).step_by(16) {
                        unsafe {
                            acc = _mm512_fmadd_ps(
                                _mm512_loadu_ps(qp.add(r * HD + c)),
                                _mm512_loadu_ps(k.add(c)),
                                acc,
                            );
                        }
                    }
                    *lane = _mm512_reduce_add_ps(acc);
                }
                let s = _mm512_mul_ps(unsafe { _mm512_loadu_ps(lanes.as_ptr()) }, scale);
                let keep = ((1u32 << n) - 1) as u16;
                unsafe { _mm512_mask_storeu_ps(sp.add(r * padded + i0), keep, s) };
            }
        }
        let (stats, acc) = part.split_at_mut(2 * n_rep);
        for r in 0..n_rep {
            let row = unsafe { sp.add(r * padded) };
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            for i in (0..padded).step_by(16) {
                m = _mm512_max_ps(m, unsafe { _mm512_loadu_ps(row.add(i)) });
            }
            let max = _mm512_reduce_max_ps(m);
            let mut sum = _mm512_setzero_ps();
            for i in (0..padded).step_by(16) {
                let e = exp(_mm512_sub_ps(
                    unsafe { _mm512_loadu_ps(row.add(i)) },
                    _mm512_set1_ps(max),
                ));
                sum = _mm512_add_ps(sum, e);
                unsafe { _mm512_storeu_ps(row.add(i), e) };
            }
            stats[r] = max;
            stats[n_rep + r] = _mm512_reduce_add_ps(sum);
            // The values weighted by the exponentials, HD / 16 registers per head.
            let out = unsafe { acc.as_mut_ptr().add(r * HD) };
            for c in (0..HD).step_by(64) {
                let mut o = [_mm512_setzero_ps(); 4];
                let width = ((HD - c) / 16).min(4);
                for i in 0..len {
                    let w = _mm512_set1_ps(unsafe { *row.add(i) });
                    let v = unsafe { vp.add((p0 + i) * kv_dim + g * HD + c) };
                    for (j, o) in o.iter_mut().enumerate().take(width) {
                        *o = _mm512_fmadd_ps(w, unsafe { _mm512_loadu_ps(v.add(16 * j)) }, *o);
                    }
                }
                for (j, o) in o.iter().enumerate().take(width) {
                    unsafe { _mm512_storeu_ps(out.add(c + 16 * j), *o) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0
                    - 1.0
            })
            .collect()
    }

    /// The split decode attention (parts of `ATTEND_CHUNK` positions merged after) equals the
    /// one-pass attention of every position, for a cache shorter and longer than a part.
    #[test]
    fn split_decode_attention_equals_one_pass() {
        let (hd, n_kv, n_rep) = (64, 3, 3);
        let kv_dim = n_kv * hd;
        for len in [1, 7, ATTEND_CHUNK, 3 * ATTEND_CHUNK + 5] {
            let kc = values(len * kv_dim, 1);
            let vc = values(len * kv_dim, 2);
            let qg: Vec<f32> = values(n_rep * hd, 3).iter().map(|v| v * 4.0).collect();
            for g in 0..n_kv {
                let mut want = vec![0f32; n_rep * hd];
                attend_dyn(&qg, g, &kc, &vc, kv_dim, len, hd, &mut want);
                let stride = n_rep * (2 + hd);
                let chunks: Vec<(usize, usize)> = (0..len)
                    .step_by(ATTEND_CHUNK)
                    .map(|p0| (p0, (p0 + ATTEND_CHUNK).min(len)))
                    .collect();
                let mut parts = vec![0f32; chunks.len() * stride];
                for (c, part) in chunks.iter().zip(parts.chunks_exact_mut(stride)) {
                    attend_part::<64>(&qg, g, &kc, &vc, kv_dim, *c, part);
                }
                let mut got = vec![0f32; n_rep * hd];
                merge_parts(&parts, n_rep, hd, &mut got);
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-5, "len {len} kv head {g}: {a} vs {b}");
                }
            }
        }
    }

    /// The dispatched part (AVX-512 on a CPU that has it) equals the plain one (up to float
    /// rounding), for both head sizes,
    /// several query heads per kv head, and parts shorter than, equal to and not a multiple of
    /// a register.
    #[test]
    fn simd_part_equals_the_scalar_one() {
        fn check<const HD: usize>() {
            for n_rep in [1, 3, 4] {
                let n_kv = 2;
                let kv_dim = n_kv * HD;
                let len = 300;
                let kc = values(len * kv_dim, 5);
                let vc = values(len * kv_dim, 6);
                let qg: Vec<f32> = values(n_rep * HD, 7).iter().map(|v| v * 3.0).collect();
                for span in [(0, 1), (5, 12), (0, 16), (17, 145), (200, 300)] {
                    for g in 0..n_kv {
                        let stride = n_rep * (2 + HD);
                        let mut want = vec![0f32; stride];
                        attend_part_scalar::<HD>(&qg, g, &kc, &vc, kv_dim, span, &mut want);
                        let mut got = vec![0f32; stride];
                        attend_part::<HD>(&qg, g, &kc, &vc, kv_dim, span, &mut got);
                        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                                "HD {HD} n_rep {n_rep} span {span:?} g {g} [{i}]: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
        check::<64>();
        check::<128>();
    }
}
