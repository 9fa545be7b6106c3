//! f32 weight products of a few activation rows on the CPU: the decode steps of the
//! safetensors llama ([`super::tensor_llama`]).
//!
//! Why not candle's matmul: for one row (`x · Wᵀ`, `W` of `n × k`) the `gemm` crate packs the
//! whole weight matrix before multiplying (`perf`: 13% of an f32 llama's decode in packing, 57%
//! in its generic loop), and a 135M-parameter model read 540 MB of weights at ~8.5 GB/s: about
//! half of what a plain pass over them gets here. This kernel reads each weight row once per
//! group of [`GROUP`] activation rows and multiplies it with all of them while it is in
//! registers, so a decode step of eight sequences costs about one pass over the weights.
//!
//! **Arithmetic.** Each output is one dot product defined on 16-float lanes: element `i` goes
//! to lane `i mod 16` with an FMA, in order of `i`, and the lanes are summed in a fixed tree
//! (8 pairs, then 4, 2, 1). The rows of a product never mix, so an output does not depend on
//! which other rows went through with it (a decode step gives each sequence the bits it gets
//! alone) nor on the instruction set (AVX-512, AVX2 + FMA and plain Rust compile the same lane
//! code). More than [`MAX_ROWS`] rows (a prompt) go through candle's matmul, which blocks for
//! cache reuse.

use candle_core::{D, DType, Module, Storage, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::SharedOut;
use super::qmatmul::Isa;

/// Where a kernel hands each weight row's dot products: `(row within the task, dots)`.
type Emit<'a> = dyn FnMut(usize, &[f32]) + 'a;

/// Lanes of the dot products' definition.
const LANES: usize = 16;
/// Activation rows multiplied with each weight row while it is in registers.
const GROUP: usize = 8;
/// The most rows this kernel takes; more go through candle's matmul.
pub(super) const MAX_ROWS: usize = 32;
/// Weight rows per parallel task.
const TASK_ROWS: usize = 64;

/// A dense linear layer, weight `(n, k)` and an optional bias `(n,)`, whose products of up to
/// [`MAX_ROWS`] f32 rows on the CPU run on [`product`], and others on candle's matmul (any
/// device, any dtype). Inputs of any rank: the leading dimensions are the rows.
pub(super) struct FewRows {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl FewRows {
    pub(super) fn new(weight: Tensor, bias: Option<Tensor>) -> FewRows {
        FewRows { weight, bias }
    }
}

/// `weight` `(out, in)` and `bias` `(out,)` under `vb`, as `candle_nn::linear` reads them.
pub(super) fn linear(inp: usize, out: usize, vb: VarBuilder) -> candle_core::Result<FewRows> {
    Ok(FewRows::new(
        vb.get((out, inp), "weight")?,
        Some(vb.get(out, "bias")?),
    ))
}

/// `weight` `(out, in)` under `vb`, as `candle_nn::linear_no_bias` reads it.
pub(super) fn linear_no_bias(
    inp: usize,
    out: usize,
    vb: VarBuilder,
) -> candle_core::Result<FewRows> {
    Ok(FewRows::new(vb.get((out, inp), "weight")?, None))
}

impl Module for FewRows {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = &self.weight;
        let (n, k) = w.dims2()?;
        if x.dim(D::Minus1)? != k {
            candle_core::bail!(
                "linear layer of {k} inputs given rows of {}",
                x.dim(D::Minus1)?
            );
        }
        let lead = x.dims()[..x.rank() - 1].to_vec();
        let m: usize = lead.iter().product();
        let rows = x.reshape((m, k))?;
        let ours = x.device().is_cpu()
            && w.device().is_cpu()
            && x.dtype() == DType::F32
            && w.dtype() == DType::F32
            && m <= MAX_ROWS
            && w.is_contiguous();
        let y = if ours {
            let xs = rows.flatten_all()?.to_vec1::<f32>()?;
            let (storage, layout) = w.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("few-rows product: weights not on the CPU")
            };
            let all = cpu.as_slice::<f32>()?;
            let ws = &all[layout.start_offset()..layout.start_offset() + n * k];
            Tensor::from_vec(product(&xs, m, ws, n, k), (m, n), x.device())?
        } else {
            rows.matmul(&w.t()?)?
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut shape = lead;
        shape.push(n);
        y.reshape(shape)
    }
}

/// `x · Wᵀ` for `m` rows `x` (`m × k`) and `W` (`n × k`), both row-major: `m × n`.
pub(super) fn product(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert!(
        x.len() == m * k && w.len() == n * k,
        "few-rows product: sizes"
    );
    let mut out = vec![0f32; m * n];
    let dst = SharedOut(out.as_mut_ptr());
    let isa = Isa::detect();
    w.par_chunks(TASK_ROWS * k).enumerate().for_each(|(t, ws)| {
        let j0 = t * TASK_ROWS;
        let mut r0 = 0;
        while r0 < m {
            let g = (m - r0).min(GROUP);
            let xs = &x[r0 * k..(r0 + g) * k];
            let mut emit = |j: usize, dots: &[f32]| {
                for (i, d) in dots.iter().enumerate() {
                    // SAFETY: row r0 + i < m and column j0 + j < n lie inside `out`
                    // (m × n), which outlives the loop; column j0 + j belongs to this task.
                    unsafe { *dst.at((r0 + i) * n + j0 + j) = *d };
                }
            };
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has AVX-512F (Isa::detect).
                Isa::Amx | Isa::Avx512Vnni => unsafe { avx512(ws, xs, g, k, &mut emit) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has AVX2 and FMA (Isa::detect).
                Isa::Avx2 => unsafe { avx2(ws, xs, g, k, &mut emit) },
                _ => rows(ws, xs, g, k, &mut emit),
            }
            r0 += g;
        }
    });
    out
}

/// The lane definition in AVX-512 registers: one 16-float register per activation row, so
/// that the rows' FMA chains run side by side, and the weights fetched [`PREFETCH`] bytes
/// ahead (this kernel streams them from memory).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn avx512(ws: &[f32], xs: &[f32], g: usize, k: usize, emit: &mut Emit) {
    macro_rules! group {
        ($($r:literal)+) => {
            match g {
                $($r => {
                    for (j, w) in ws.chunks_exact(k).enumerate() {
                        // SAFETY: the caller's CPU has AVX-512F; `w` is one row of k floats
                        // and `xs` holds $r rows of k.
                        emit(j, &unsafe { dots_avx512::<$r>(w, xs, k) });
                    }
                })+
                _ => unreachable!("{g} rows"),
            }
        };
    }
    group!(1 2 3 4 5 6 7 8);
}

/// Bytes ahead of the weights being multiplied that [`avx512`] prefetches.
#[cfg(target_arch = "x86_64")]
const PREFETCH: usize = 1024;

/// [`dots`] with AVX-512 intrinsics: the same operations in the same order.
///
/// # Safety
/// The CPU has AVX-512F; `w.len() == k` and `xs.len() >= R * k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dots_avx512<const R: usize>(w: &[f32], xs: &[f32], k: usize) -> [f32; R] {
    use core::arch::x86_64::*;
    debug_assert!(w.len() == k && xs.len() >= R * k);
    let mut acc = [_mm512_setzero_ps(); R];
    let full = k / LANES * LANES;
    let (wp, xp) = (w.as_ptr(), xs.as_ptr());
    let mut c = 0;
    while c < full {
        // SAFETY: c + 16 <= full <= k: inside `w` and each row of `xs`; a prefetch of any
        // address neither faults nor reads architecturally.
        unsafe {
            if c % 16 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(c).cast::<i8>().wrapping_add(PREFETCH));
            }
            let wv = _mm512_loadu_ps(wp.add(c));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xp.add(r * k + c)), *a);
            }
        }
        c += LANES;
    }
    let mut lanes = [[0f32; LANES]; R];
    for (r, l) in lanes.iter_mut().enumerate() {
        // SAFETY: sixteen floats.
        unsafe { _mm512_storeu_ps(l.as_mut_ptr(), acc[r]) };
        for i in full..k {
            l[i - full] = w[i].mul_add(xs[r * k + i], l[i - full]);
        }
    }
    lanes.map(|l| reduce(&l))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2(ws: &[f32], xs: &[f32], g: usize, k: usize, emit: &mut Emit) {
    rows(ws, xs, g, k, emit)
}

/// Every weight row of `ws` times the `g` rows of `xs`: `emit(j, dots)` per weight row `j`.
#[inline(always)]
fn rows(ws: &[f32], xs: &[f32], g: usize, k: usize, emit: &mut Emit) {
    macro_rules! group {
        ($($r:literal)+) => {
            match g {
                $($r => {
                    for (j, w) in ws.chunks_exact(k).enumerate() {
                        emit(j, &dots::<$r>(w, xs, k));
                    }
                })+
                _ => unreachable!("{g} rows"),
            }
        };
    }
    group!(1 2 3 4 5 6 7 8);
}

/// One weight row `w` times `R` rows of `xs`, each by the lane definition (module docs).
#[inline(always)]
fn dots<const R: usize>(w: &[f32], xs: &[f32], k: usize) -> [f32; R] {
    let mut acc = [[0f32; LANES]; R];
    let full = k / LANES * LANES;
    for c in (0..full).step_by(LANES) {
        let wv: &[f32; LANES] = w[c..c + LANES].try_into().expect("lanes");
        for (r, a) in acc.iter_mut().enumerate() {
            let xv: &[f32; LANES] = xs[r * k + c..r * k + c + LANES].try_into().expect("lanes");
            for l in 0..LANES {
                a[l] = wv[l].mul_add(xv[l], a[l]);
            }
        }
    }
    for (r, a) in acc.iter_mut().enumerate() {
        for i in full..k {
            a[i - full] = w[i].mul_add(xs[r * k + i], a[i - full]);
        }
    }
    acc.map(|a| reduce(&a))
}

/// The lanes' sum in the fixed tree of the definition.
#[inline(always)]
fn reduce(a: &[f32; LANES]) -> f32 {
    let mut v = *a;
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            v[l] += v[l + width];
        }
        width /= 2;
    }
    v[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The definition, written out plainly.
    fn definition(x: &[f32], w: &[f32], k: usize) -> f32 {
        let mut lanes = [0f32; LANES];
        for i in 0..k {
            lanes[i % LANES] = w[i].mul_add(x[i], lanes[i % LANES]);
        }
        reduce(&lanes)
    }

    #[test]
    fn every_row_count_and_path_gives_the_definitions_bits() {
        // k with a tail (not a multiple of 16), n across several tasks with a partial last one.
        let (n, k) = (150, 37);
        let w = values(n * k, 1);
        for m in [1, 2, 7, 8, 9, 17, MAX_ROWS] {
            let x = values(m * k, m as u32 + 10);
            let got = product(&x, m, &w, n, k);
            for r in 0..m {
                for j in 0..n {
                    let want = definition(&x[r * k..(r + 1) * k], &w[j * k..(j + 1) * k], k);
                    assert_eq!(
                        got[r * n + j].to_bits(),
                        want.to_bits(),
                        "m {m} row {r} col {j}"
                    );
                    let plain: f32 = (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum();
                    assert!((got[r * n + j] - plain).abs() < 1e-4, "m {m}: {plain}");
                }
            }
            // Each row alone gives its bits in the batch.
            let one = product(&x[..k], 1, &w, n, k);
            assert_eq!(one, got[..n].to_vec(), "m {m}: row 0 alone");
        }
        #[cfg(target_arch = "x86_64")]
        {
            let x = values(8 * k, 3);
            let mut paths: Vec<(&str, Vec<f32>)> = Vec::new();
            let mut run = |name: &'static str, f: &dyn Fn(&mut Emit)| {
                let mut out = vec![0f32; 8 * n];
                f(&mut |j, d: &[f32]| {
                    for (i, v) in d.iter().enumerate() {
                        out[i * n + j] = *v;
                    }
                });
                paths.push((name, out));
            };
            run("plain", &|e| rows(&w, &x, 8, k, e));
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA (checked).
                run("avx2", &|e| unsafe { avx2(&w, &x, 8, k, e) });
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX-512F and FMA (checked).
                run("avx512", &|e| unsafe { avx512(&w, &x, 8, k, e) });
            }
            for (name, out) in &paths[1..] {
                assert_eq!(out, &paths[0].1, "{name} against plain Rust");
            }
        }
    }

    #[test]
    fn the_module_takes_few_f32_rows_and_leaves_the_rest_to_candle() {
        let dev = candle_core::Device::Cpu;
        let (n, k) = (20, 24);
        let w = Tensor::from_vec(values(n * k, 5), (n, k), &dev).unwrap();
        let m = FewRows::new(w.clone(), None);
        for rows in [1, 8, MAX_ROWS + 1] {
            let x = Tensor::from_vec(values(rows * k, 6), (rows, k), &dev).unwrap();
            let got = m.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!((g - w).abs() < 1e-4, "{rows} rows: {g} against {w}");
            }
        }
        let bad = Tensor::zeros((2, k + 1), DType::F32, &dev).unwrap();
        assert!(m.forward(&bad).is_err());
    }
}
