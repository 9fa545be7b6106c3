//! Our own CPU kernels for products with GGUF-quantised weights, batched over activation rows.
//!
//! Why not candle's `QMatMul`: candle 0.11 has no SIMD kernel for Q4_1 (a scalar dot product,
//! ../shared/fixtures/baselines.md), and its CPU matmul walks activation row by activation row,
//! reading the whole weight matrix once per row — stacking the rows of eight sequences made a
//! decode round cost eight single steps. Here each weight row is unpacked once per block and
//! multiplied with up to [`TILE`] activation rows while it sits in registers, and the rows of
//! the output are split across the threads of one rayon pool.
//!
//! The arithmetic is llama.cpp's (`ggml_vec_dot_q4_1_q8_1`, `ggml_vec_dot_q8_0_q8_0` and
//! `quantize_row_q8_1` on AVX2): every activation row is quantised to 8 bits per block of 32
//! (scale `d = max|x| / 127`, rounded half to even, `d` and `s = d·Σq` held as f16 values);
//! a block's product is `d_w·d_x·Σ q_w q_x` (+ `m_w·s_x` for Q4_1's offset), in integers
//! within the block and f32 across blocks. The scalar path does the same sums in the same
//! order per block and serves CPUs without AVX2/FMA/F16C and the tests.
//!
//! Other weight types (the K-quants, f16, f32) go through candle's `QMatMul` unchanged.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use half::f16;
use rayon::prelude::*;

use super::SharedOut;
use crate::error::{Error, Result};

/// Values per quantisation block (Q4_1, Q8_0 and the activations' Q8_1).
const QK: usize = 32;
/// Activation rows multiplied with one unpacked weight block (AVX2: 16 registers).
const TILE: usize = 4;
/// The same with AVX-512's 32 registers.
const TILE_512: usize = 8;

/// The weight types with our own kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `{d: f16, m: f16, qs: [u8; 16]}`: value = d·q + m, q in 0..16, low nibbles hold
    /// elements 0..16 and high nibbles 16..32.
    Q4_1,
    /// `{d: f16, qs: [i8; 32]}`: value = d·q.
    Q8_0,
}

impl Kind {
    fn block_bytes(self) -> usize {
        match self {
            Kind::Q4_1 => 20,
            Kind::Q8_0 => 34,
        }
    }
}

/// A weight matrix of `n` output rows by `k` inputs, multiplied as `x · Wᵀ`.
pub(super) enum QMat {
    /// Raw GGUF blocks, row after row, for our kernels.
    Own {
        kind: Kind,
        n: usize,
        k: usize,
        data: Vec<u8>,
    },
    /// Any other type, through candle.
    Candle { mm: QMatMul, n: usize, k: usize },
    /// Matrices with the same inputs whose outputs are laid side by side (a fused QKV whose
    /// parts differ in type).
    Stack(Vec<QMat>),
}

/// Activation rows quantised for the kernels: `m` rows of `k` values.
pub(super) struct Acts {
    m: usize,
    k: usize,
    qs: Vec<i8>,
    /// Per block: `[d, s]` with `s = d·Σq`, both rounded through f16 as llama.cpp stores them.
    ds: Vec<[f32; 2]>,
}

impl Acts {
    /// Quantises `m` rows of `k` values (`k` a multiple of 32), as llama.cpp's AVX2
    /// `quantize_row_q8_1`.
    pub(super) fn quantize(x: &[f32], m: usize, k: usize) -> Acts {
        debug_assert_eq!(x.len(), m * k);
        debug_assert_eq!(k % QK, 0);
        let mut qs = vec![0i8; m * k];
        let mut ds = Vec::with_capacity(m * k / QK);
        let simd = Isa::detect() != Isa::Scalar;
        for (xb, qb) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)) {
            #[cfg(target_arch = "x86_64")]
            let (d, sum) = if simd {
                // SAFETY: AVX2/FMA/F16C are present (Isa::detect); both blocks hold 32 values.
                unsafe { avx::quantize_block(xb, qb) }
            } else {
                quantize_block(xb, qb)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (d, sum) = {
                let _ = simd;
                quantize_block(xb, qb)
            };
            ds.push([
                f16::from_f32(d).to_f32(),
                f16::from_f32(d * sum as f32).to_f32(),
            ]);
        }
        Acts { m, k, qs, ds }
    }
}

/// One block of 32 activations to 8 bits: returns `d` and the sum of the quantised values.
fn quantize_block(xb: &[f32], qb: &mut [i8]) -> (f32, i32) {
    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, v) in qb.iter_mut().zip(xb) {
        *q = (v * id).round_ties_even() as i8;
        sum += *q as i32;
    }
    (amax / 127.0, sum)
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

impl QMat {
    /// Takes a 2-D GGUF tensor of shape `(n, k)`.
    pub(super) fn from_qtensor(t: QTensor) -> Result<QMat> {
        let (n, k) = t.shape().dims2()?;
        let kind = match t.dtype() {
            GgmlDType::Q4_1 => Some(Kind::Q4_1),
            GgmlDType::Q8_0 => Some(Kind::Q8_0),
            _ => None,
        };
        Ok(match kind {
            Some(kind) => {
                let data = t.data()?.into_owned();
                if k % QK != 0 || data.len() != n * k / QK * kind.block_bytes() {
                    return Err(Error::Model(format!(
                        "a {kind:?} tensor of shape ({n}, {k}) holds {} bytes",
                        data.len()
                    )));
                }
                QMat::Own { kind, n, k, data }
            }
            None => QMat::Candle {
                mm: QMatMul::from_qtensor(t)?,
                n,
                k,
            },
        })
    }

    /// One matrix whose outputs are those of `parts` side by side; parts of one kind are
    /// merged into one block of rows, so that a fused product is one pass over the threads.
    pub(super) fn stack(parts: Vec<QMat>) -> QMat {
        let same = parts.windows(2).all(|w| match (&w[0], &w[1]) {
            (QMat::Own { kind: a, k: ka, .. }, QMat::Own { kind: b, k: kb, .. }) => {
                a == b && ka == kb
            }
            _ => false,
        });
        if !same || parts.len() < 2 {
            return if parts.len() == 1 {
                parts.into_iter().next().expect("one part")
            } else {
                QMat::Stack(parts)
            };
        }
        let mut rows = 0;
        let mut merged = Vec::new();
        let (mut kind0, mut k0) = (Kind::Q8_0, 0);
        for p in parts {
            if let QMat::Own { kind, n, k, data } = p {
                rows += n;
                merged.extend_from_slice(&data);
                (kind0, k0) = (kind, k);
            }
        }
        QMat::Own {
            kind: kind0,
            n: rows,
            k: k0,
            data: merged,
        }
    }

    /// Output columns.
    pub(super) fn n(&self) -> usize {
        match self {
            QMat::Own { n, .. } | QMat::Candle { n, .. } => *n,
            QMat::Stack(parts) => parts.iter().map(QMat::n).sum(),
        }
    }

    /// Inputs per row.
    pub(super) fn k(&self) -> usize {
        match self {
            QMat::Own { k, .. } | QMat::Candle { k, .. } => *k,
            QMat::Stack(parts) => parts.first().map_or(0, QMat::k),
        }
    }

    /// Row `j` as f32 values (an embedding lookup); `None` for a type without our kernel.
    pub(super) fn dequantize_row(&self, j: usize, out: &mut [f32]) -> Option<()> {
        let QMat::Own { kind, k, data, .. } = self else {
            return None;
        };
        let bb = kind.block_bytes();
        let row = &data[j * (k / QK) * bb..(j + 1) * (k / QK) * bb];
        for (blk, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
            match kind {
                Kind::Q4_1 => {
                    let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                    for (i, q) in blk[4..20].iter().enumerate() {
                        o[i] = (q & 0xF) as f32 * d + m;
                        o[i + 16] = (q >> 4) as f32 * d + m;
                    }
                }
                Kind::Q8_0 => {
                    let d = f16_at(blk, 0);
                    for (o, q) in o.iter_mut().zip(&blk[2..34]) {
                        *o = *q as i8 as f32 * d;
                    }
                }
            }
        }
        Some(())
    }

    /// `x · Wᵀ` for `m` rows of `x` (`m × k`, row-major): `m × n`, row-major.
    pub(super) fn forward(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        match self {
            QMat::Own { .. } => {
                let acts = Acts::quantize(x, m, self.k());
                Ok(self.forward_quantized(&acts))
            }
            QMat::Candle { mm, k, .. } => {
                let t = Tensor::from_slice(x, (m, *k), &Device::Cpu)?;
                Ok(mm.forward(&t)?.flatten_all()?.to_vec1::<f32>()?)
            }
            QMat::Stack(parts) => {
                let n = self.n();
                let mut out = vec![0f32; m * n];
                let mut col = 0;
                for p in parts {
                    let pn = p.n();
                    let y = p.forward(x, m)?;
                    for (o, yr) in out.chunks_exact_mut(n).zip(y.chunks_exact(pn)) {
                        o[col..col + pn].copy_from_slice(yr);
                    }
                    col += pn;
                }
                Ok(out)
            }
        }
    }

    /// [`QMat::forward`] of rows already quantised (an `Own` matrix only).
    fn forward_quantized(&self, acts: &Acts) -> Vec<f32> {
        let QMat::Own { kind, n, k, data } = self else {
            unreachable!("forward_quantized on a candle matrix")
        };
        let (n, m) = (*n, acts.m);
        debug_assert_eq!(acts.k, *k);
        if m == 0 || n == 0 {
            return Vec::new();
        }
        let row_bytes = k / QK * kind.block_bytes();
        let mut out = vec![0f32; m * n];
        let threads = rayon::current_num_threads().max(1);
        // A few chunks per thread, so that a thread slowed by other work is made up for.
        let chunk_rows = n.div_ceil(threads * 4).max(8);
        let isa = Isa::detect();
        let dst = SharedOut(out.as_mut_ptr());
        (0..n.div_ceil(chunk_rows)).into_par_iter().for_each(|c| {
            let mut col = vec![0f32; m];
            for j in c * chunk_rows..((c + 1) * chunk_rows).min(n) {
                row_times_acts(
                    *kind,
                    &data[j * row_bytes..][..row_bytes],
                    acts,
                    &mut col,
                    isa,
                );
                for (i, v) in col.iter().enumerate() {
                    // SAFETY: `i < m` and `j < n` index inside `out` (m × n), which outlives
                    // the parallel loop; column `j` belongs to this task alone.
                    unsafe { dst.at(i * n + j).write(*v) };
                }
            }
        });
        out
    }
}

/// The instruction sets our kernels come in, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Isa {
    /// AVX-512 (F, BW, VL) with VNNI: two blocks per 512-bit register, `vpdpbusd`.
    Avx512Vnni,
    /// AVX2 + FMA + F16C (x86-64-v3): one block per 256-bit register.
    Avx2,
    /// Plain Rust.
    Scalar,
}

impl Isa {
    /// The best this CPU runs and `KANDLE_ISA` allows, detected once.
    pub(super) fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| Isa::best().min(Isa::cap()))
    }

    /// The best instruction set `KANDLE_ISA` allows (`avx512`, `avx2` or `scalar`; unset: no
    /// limit), read once. It is there to measure and test the other kernels on a CPU that
    /// runs better ones; a value it does not know is ignored with a warning.
    pub(super) fn cap() -> Isa {
        static CAP: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *CAP.get_or_init(|| {
            let value = std::env::var("KANDLE_ISA").unwrap_or_default();
            Isa::parse_cap(&value).unwrap_or_else(|| {
                tracing::warn!(
                    "KANDLE_ISA={value:?} is not one of avx512, avx2, scalar: not limiting the \
                     kernels"
                );
                Isa::Avx512Vnni
            })
        })
    }

    fn parse_cap(value: &str) -> Option<Isa> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "avx512" => Some(Isa::Avx512Vnni),
            "avx2" => Some(Isa::Avx2),
            "scalar" => Some(Isa::Scalar),
            _ => None,
        }
    }

    /// Of two instruction sets, the one that needs less of the CPU.
    fn min(self, other: Isa) -> Isa {
        let rank = |i: Isa| match i {
            Isa::Scalar => 0,
            Isa::Avx2 => 1,
            Isa::Avx512Vnni => 2,
        };
        if rank(self) <= rank(other) {
            self
        } else {
            other
        }
    }

    /// The best this CPU runs.
    fn best() -> Isa {
        {
            #[cfg(target_arch = "x86_64")]
            {
                let has = |f: &[bool]| f.iter().all(|x| *x);
                if has(&[
                    is_x86_feature_detected!("avx512f"),
                    is_x86_feature_detected!("avx512bw"),
                    is_x86_feature_detected!("avx512vl"),
                    is_x86_feature_detected!("avx512vnni"),
                    is_x86_feature_detected!("avx2"),
                    is_x86_feature_detected!("fma"),
                    is_x86_feature_detected!("f16c"),
                ]) {
                    return Isa::Avx512Vnni;
                }
                if has(&[
                    is_x86_feature_detected!("avx2"),
                    is_x86_feature_detected!("fma"),
                    is_x86_feature_detected!("f16c"),
                ]) {
                    return Isa::Avx2;
                }
            }
            Isa::Scalar
        }
    }
}

/// One weight row `w` (raw blocks) times every activation row: `out[i] = w · x_i`.
fn row_times_acts(kind: Kind, w: &[u8], acts: &Acts, out: &mut [f32], isa: Isa) {
    let nb = acts.k / QK;
    let mut i = 0;
    while i < acts.m {
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512Vnni && nb.is_multiple_of(2) {
            let r = (acts.m - i).min(TILE_512);
            let o = &mut out[i..i + r];
            // SAFETY: the CPU has these features (Isa::detect); `w` holds a row of `nb` blocks.
            unsafe {
                match (kind, r) {
                    (Kind::Q4_1, 8) => avx512::q4_1::<8>(w, acts, i, o),
                    (Kind::Q4_1, 7) => avx512::q4_1::<7>(w, acts, i, o),
                    (Kind::Q4_1, 6) => avx512::q4_1::<6>(w, acts, i, o),
                    (Kind::Q4_1, 5) => avx512::q4_1::<5>(w, acts, i, o),
                    (Kind::Q4_1, 4) => avx512::q4_1::<4>(w, acts, i, o),
                    (Kind::Q4_1, 3) => avx512::q4_1::<3>(w, acts, i, o),
                    (Kind::Q4_1, 2) => avx512::q4_1::<2>(w, acts, i, o),
                    (Kind::Q4_1, _) => avx512::q4_1::<1>(w, acts, i, o),
                    (Kind::Q8_0, 8) => avx512::q8_0::<8>(w, acts, i, o),
                    (Kind::Q8_0, 7) => avx512::q8_0::<7>(w, acts, i, o),
                    (Kind::Q8_0, 6) => avx512::q8_0::<6>(w, acts, i, o),
                    (Kind::Q8_0, 5) => avx512::q8_0::<5>(w, acts, i, o),
                    (Kind::Q8_0, 4) => avx512::q8_0::<4>(w, acts, i, o),
                    (Kind::Q8_0, 3) => avx512::q8_0::<3>(w, acts, i, o),
                    (Kind::Q8_0, 2) => avx512::q8_0::<2>(w, acts, i, o),
                    (Kind::Q8_0, _) => avx512::q8_0::<1>(w, acts, i, o),
                }
            }
            i += r;
            continue;
        }
        let r = (acts.m - i).min(TILE);
        #[cfg(target_arch = "x86_64")]
        if isa != Isa::Scalar {
            // SAFETY: the CPU has AVX2, FMA and F16C (Isa::detect).
            unsafe {
                match (kind, r) {
                    (Kind::Q4_1, 4) => avx::q4_1::<4>(w, acts, i, &mut out[i..i + 4]),
                    (Kind::Q4_1, 3) => avx::q4_1::<3>(w, acts, i, &mut out[i..i + 3]),
                    (Kind::Q4_1, 2) => avx::q4_1::<2>(w, acts, i, &mut out[i..i + 2]),
                    (Kind::Q4_1, _) => avx::q4_1::<1>(w, acts, i, &mut out[i..i + 1]),
                    (Kind::Q8_0, 4) => avx::q8_0::<4>(w, acts, i, &mut out[i..i + 4]),
                    (Kind::Q8_0, 3) => avx::q8_0::<3>(w, acts, i, &mut out[i..i + 3]),
                    (Kind::Q8_0, 2) => avx::q8_0::<2>(w, acts, i, &mut out[i..i + 2]),
                    (Kind::Q8_0, _) => avx::q8_0::<1>(w, acts, i, &mut out[i..i + 1]),
                }
            }
            i += r;
            continue;
        }
        for (ii, o) in out[i..i + r].iter_mut().enumerate() {
            *o = scalar_dot(kind, w, acts, i + ii);
        }
        i += r;
    }
}

/// The portable kernel, with the same arithmetic as the SIMD ones, so that every CPU gives the
/// same bits: each block's products are summed in eight lanes of four (as `maddubs` +
/// `madd` or `vpdpbusd` sum them), each lane is scaled by `d·d_x` and added with one rounding
/// (FMA) to an accumulator of even or of odd blocks, and the lanes are summed in the SIMD
/// kernels' order. The Q4_1 offsets `m·s_x` are summed apart, even and odd blocks again apart.
fn scalar_dot(kind: Kind, w: &[u8], acts: &Acts, row: usize) -> f32 {
    let nb = acts.k / QK;
    let xq = &acts.qs[row * acts.k..(row + 1) * acts.k];
    let xds = &acts.ds[row * nb..(row + 1) * nb];
    let bb = kind.block_bytes();
    let mut acc = [[0f32; 8]; 2];
    let mut acc_m = [0f32; 2];
    for (b, (blk, [dx, sx])) in w.chunks_exact(bb).zip(xds).enumerate() {
        let y = &xq[b * QK..(b + 1) * QK];
        // Weight values in the order they meet `y`.
        let mut wq = [0i32; QK];
        let d = match kind {
            Kind::Q4_1 => {
                for (j, q) in blk[4..20].iter().enumerate() {
                    wq[j] = (q & 0xF) as i32;
                    wq[j + 16] = (q >> 4) as i32;
                }
                acc_m[b % 2] += f16_at(blk, 2) * sx;
                f16_at(blk, 0)
            }
            Kind::Q8_0 => {
                for (j, q) in blk[2..34].iter().enumerate() {
                    wq[j] = *q as i8 as i32;
                }
                f16_at(blk, 0)
            }
        };
        let scale = d * dx;
        for (l, a) in acc[b % 2].iter_mut().enumerate() {
            let lane: i32 = (4 * l..4 * l + 4).map(|j| wq[j] * y[j] as i32).sum();
            *a = scale.mul_add(lane as f32, *a);
        }
    }
    let x: Vec<f32> = (0..8).map(|l| acc[0][l] + acc[1][l]).collect();
    let r: Vec<f32> = (0..4).map(|i| x[i + 4] + x[i]).collect();
    let sum = (r[0] + r[2]) + (r[1] + r[3]);
    match kind {
        Kind::Q4_1 => sum + (acc_m[0] + acc_m[1]),
        Kind::Q8_0 => sum,
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx {
    use core::arch::x86_64::*;

    use super::{Acts, QK};

    /// The sum of eight lanes: halves, then quarters, then the last two.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn hsum(x: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    /// [`super::quantize_block`] with the same results (the same products, rounded half to
    /// even), as llama.cpp's AVX2 `quantize_row_q8_1`.
    ///
    /// # Safety
    /// `xb` and `qb` hold 32 values each.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_block(xb: &[f32], qb: &mut [i8]) -> (f32, i32) {
        debug_assert!(xb.len() == QK && qb.len() == QK);
        unsafe {
            let p = xb.as_ptr();
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
                _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)),
            );
            let m = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            let q = v.map(|x| _mm256_cvtps_epi32(_mm256_round_ps::<NEAREST>(_mm256_mul_ps(x, id))));
            let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let sum = _mm_add_epi32(
                _mm256_extracti128_si256(sum, 1),
                _mm256_castsi256_si128(sum),
            );
            let sum = _mm_hadd_epi32(sum, sum);
            let sum = _mm_cvtsi128_si32(_mm_hadd_epi32(sum, sum));
            let a = _mm256_packs_epi32(q[0], q[1]);
            let b = _mm256_packs_epi32(q[2], q[3]);
            let bytes = _mm256_permutevar8x32_epi32(
                _mm256_packs_epi16(a, b),
                _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
            );
            _mm256_storeu_si256(qb.as_mut_ptr() as *mut __m256i, bytes);
            (amax / 127.0, sum)
        }
    }

    /// Sum of adjacent pairs of `u8 × i8` products, as f32 (`maddubs` cannot saturate here:
    /// |15·127·2| and |127·127·2| fit in i16).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn mul_sum_us8(ax: __m256i, sy: __m256i) -> __m256 {
        let dot = _mm256_maddubs_epi16(ax, sy);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), dot))
    }

    /// `R` rows of `acts` from `row0` times one Q4_1 weight row.
    ///
    /// # Safety
    /// `w` holds `acts.k / 32` Q4_1 blocks; rows `row0..row0 + R` exist in `acts`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_1<const R: usize>(w: &[u8], acts: &Acts, row0: usize, out: &mut [f32]) {
        let nb = acts.k / QK;
        debug_assert!(w.len() >= nb * 20 && row0 + R <= acts.m);
        // Even and odd blocks in separate accumulators, summed as the AVX-512 kernel sums its
        // two halves, so that both give the same bits.
        let mut acc = [[_mm256_setzero_ps(); R]; 2];
        let mut acc_m = [_mm_setzero_ps(); R];
        let low = _mm256_set1_epi8(0xF);
        let wp = w.as_ptr();
        let xq = acts.qs.as_ptr();
        let xds = acts.ds.as_ptr();
        for b in 0..nb {
            let half = b % 2;
            unsafe {
                let blk = wp.add(b * 20);
                // [d, m, 0, 0]
                let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
                let packed = _mm_loadu_si128(blk.add(4) as *const __m128i);
                let qw = _mm256_and_si256(
                    low,
                    _mm256_insertf128_si256::<1>(
                        _mm256_castsi128_si256(packed),
                        _mm_srli_epi16(packed, 4),
                    ),
                );
                for r in 0..R {
                    let row = row0 + r;
                    // [d_x, s_x]
                    let ds =
                        _mm_castsi128_ps(_mm_loadl_epi64(xds.add(row * nb + b) as *const __m128i));
                    let p = _mm_mul_ps(dm, ds); // [d·d_x, m·s_x, 0, 0]
                    // Odd blocks' products go to lanes 2 and 3, as in the AVX-512 kernel.
                    let pm = if half == 0 {
                        p
                    } else {
                        _mm_movelh_ps(_mm_setzero_ps(), p)
                    };
                    acc_m[r] = _mm_add_ps(acc_m[r], pm);
                    let y = _mm256_loadu_si256(xq.add(row * acts.k + b * QK) as *const __m256i);
                    acc[half][r] =
                        _mm256_fmadd_ps(_mm256_broadcastss_ps(p), mul_sum_us8(qw, y), acc[half][r]);
                }
            }
        }
        for r in 0..R {
            let m = _mm_add_ps(acc_m[r], _mm_movehl_ps(acc_m[r], acc_m[r]));
            out[r] = hsum(_mm256_add_ps(acc[0][r], acc[1][r])) + _mm_cvtss_f32(_mm_movehdup_ps(m));
        }
    }

    /// `R` rows of `acts` from `row0` times one Q8_0 weight row.
    ///
    /// # Safety
    /// `w` holds `acts.k / 32` Q8_0 blocks; rows `row0..row0 + R` exist in `acts`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q8_0<const R: usize>(w: &[u8], acts: &Acts, row0: usize, out: &mut [f32]) {
        let nb = acts.k / QK;
        debug_assert!(w.len() >= nb * 34 && row0 + R <= acts.m);
        // Even and odd blocks apart, as in the Q4_1 kernel.
        let mut acc = [[_mm256_setzero_ps(); R]; 2];
        let wp = w.as_ptr();
        let xq = acts.qs.as_ptr();
        let xds = acts.ds.as_ptr();
        for b in 0..nb {
            let half = b % 2;
            unsafe {
                let blk = wp.add(b * 34);
                let d = _mm_cvtph_ps(_mm_cvtsi32_si128(
                    (blk as *const u16).read_unaligned() as i32
                ));
                let qw = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                let aw = _mm256_sign_epi8(qw, qw);
                for r in 0..R {
                    let row = row0 + r;
                    let dx = _mm_load_ss(xds.add(row * nb + b) as *const f32);
                    let y = _mm256_loadu_si256(xq.add(row * acts.k + b * QK) as *const __m256i);
                    acc[half][r] = _mm256_fmadd_ps(
                        _mm256_broadcastss_ps(_mm_mul_ss(d, dx)),
                        mul_sum_us8(aw, _mm256_sign_epi8(y, qw)),
                        acc[half][r],
                    );
                }
            }
        }
        for r in 0..R {
            out[r] = hsum(_mm256_add_ps(acc[0][r], acc[1][r]));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx512 {
    use core::arch::x86_64::*;

    use super::{Acts, QK};

    /// The sum of 16 lanes in the AVX2 kernels' order: the two halves (even and odd blocks)
    /// lane by lane, then [`super::avx::hsum`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn reduce(x: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(x);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)));
        super::avx::hsum(_mm256_add_ps(lo, hi))
    }

    /// `R` rows of `acts` from `row0` times one Q4_1 weight row, two blocks per step.
    ///
    /// # Safety
    /// `w` holds `acts.k / 32` Q4_1 blocks, an even number; rows `row0..row0 + R` exist.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn q4_1<const R: usize>(w: &[u8], acts: &Acts, row0: usize, out: &mut [f32]) {
        let nb = acts.k / QK;
        debug_assert!(nb.is_multiple_of(2) && w.len() >= nb * 20 && row0 + R <= acts.m);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut acc_m = [_mm_setzero_ps(); R];
        let low = _mm512_set1_epi8(0xF);
        // Lane 0 of a 128-bit vector to the first eight floats, lane 2 to the last eight.
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
        let wp = w.as_ptr();
        let xq = acts.qs.as_ptr();
        let xds = acts.ds.as_ptr();
        for b in (0..nb).step_by(2) {
            unsafe {
                let b0 = wp.add(b * 20);
                let b1 = b0.add(20);
                // [d0, m0, d1, m1]
                let dm = _mm_cvtph_ps(_mm_set_epi32(
                    0,
                    0,
                    (b1 as *const i32).read_unaligned(),
                    (b0 as *const i32).read_unaligned(),
                ));
                let x0 = _mm_loadu_si128(b0.add(4) as *const __m128i);
                let x1 = _mm_loadu_si128(b1.add(4) as *const __m128i);
                let qw = _mm512_and_si512(
                    low,
                    _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm256_set_m128i(_mm_srli_epi16(x0, 4), x0)),
                        _mm256_set_m128i(_mm_srli_epi16(x1, 4), x1),
                    ),
                );
                for r in 0..R {
                    let row = row0 + r;
                    // [d_x0, s_x0, d_x1, s_x1]
                    let ds = _mm_loadu_ps(xds.add(row * nb + b) as *const f32);
                    let p = _mm_mul_ps(dm, ds);
                    acc_m[r] = _mm_add_ps(acc_m[r], p);
                    let y = _mm512_loadu_si512(xq.add(row * acts.k + b * QK) as *const __m512i);
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qw, y);
                    acc[r] = _mm512_fmadd_ps(
                        _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(p)),
                        _mm512_cvtepi32_ps(dot),
                        acc[r],
                    );
                }
            }
        }
        for r in 0..R {
            let m = _mm_add_ps(acc_m[r], _mm_movehl_ps(acc_m[r], acc_m[r]));
            out[r] = reduce(acc[r]) + _mm_cvtss_f32(_mm_movehdup_ps(m));
        }
    }

    /// `R` rows of `acts` from `row0` times one Q8_0 weight row, two blocks per step.
    ///
    /// # Safety
    /// `w` holds `acts.k / 32` Q8_0 blocks, an even number; rows `row0..row0 + R` exist.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn q8_0<const R: usize>(w: &[u8], acts: &Acts, row0: usize, out: &mut [f32]) {
        let nb = acts.k / QK;
        debug_assert!(nb.is_multiple_of(2) && w.len() >= nb * 34 && row0 + R <= acts.m);
        let mut acc = [_mm512_setzero_ps(); R];
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
        let wp = w.as_ptr();
        let xq = acts.qs.as_ptr();
        let xds = acts.ds.as_ptr();
        for b in (0..nb).step_by(2) {
            unsafe {
                let b0 = wp.add(b * 34);
                let b1 = b0.add(34);
                // [d0, 0, d1, 0]
                let d = _mm_cvtph_ps(_mm_set_epi32(
                    0,
                    0,
                    (b1 as *const u16).read_unaligned() as i32,
                    (b0 as *const u16).read_unaligned() as i32,
                ));
                let qw = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_loadu_si256(b0.add(2) as *const __m256i)),
                    _mm256_loadu_si256(b1.add(2) as *const __m256i),
                );
                // |w| as unsigned bytes; the activations take w's sign instead.
                let aw = _mm512_abs_epi8(qw);
                let neg = _mm512_movepi8_mask(qw);
                for r in 0..R {
                    let row = row0 + r;
                    let ds = _mm_loadu_ps(xds.add(row * nb + b) as *const f32);
                    let p = _mm_mul_ps(d, ds); // [d0·d_x0, 0, d1·d_x1, 0]
                    let y = _mm512_loadu_si512(xq.add(row * acts.k + b * QK) as *const __m512i);
                    let sy = _mm512_mask_sub_epi8(y, neg, _mm512_setzero_si512(), y);
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, sy);
                    acc[r] = _mm512_fmadd_ps(
                        _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(p)),
                        _mm512_cvtepi32_ps(dot),
                        acc[r],
                    );
                }
            }
        }
        for r in 0..R {
            out[r] = reduce(acc[r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n).map(|_| lcg(&mut s)).collect()
    }

    fn weights(dtype: GgmlDType, n: usize, k: usize) -> (QMat, Vec<f32>) {
        let w = Tensor::from_vec(random(n * k, 7), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let dense = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (QMat::from_qtensor(q).unwrap(), dense)
    }

    /// x · Wᵀ in f64 with the activations as the kernels see them (dequantised Q8).
    fn reference(acts: &Acts, w: &[f32], n: usize) -> Vec<f64> {
        let k = acts.k;
        let mut out = vec![0f64; acts.m * n];
        for i in 0..acts.m {
            for j in 0..n {
                let mut s = 0f64;
                for c in 0..k {
                    let x = acts.qs[i * k + c] as f64 * acts.ds[i * k / QK + c / QK][0] as f64;
                    s += x * w[j * k + c] as f64;
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    /// The instruction sets this CPU runs (the tests cover each one present).
    #[test]
    fn isa_cap_parses_and_limits() {
        assert_eq!(Isa::parse_cap(""), Some(Isa::Avx512Vnni));
        assert_eq!(Isa::parse_cap(" AVX2 "), Some(Isa::Avx2));
        assert_eq!(Isa::parse_cap("scalar"), Some(Isa::Scalar));
        assert_eq!(Isa::parse_cap("sse"), None);
        assert_eq!(Isa::Avx512Vnni.min(Isa::Avx2), Isa::Avx2);
        assert_eq!(Isa::Avx2.min(Isa::Avx512Vnni), Isa::Avx2);
        assert_eq!(Isa::Scalar.min(Isa::Avx2), Isa::Scalar);
    }

    fn isas() -> Vec<Isa> {
        match Isa::detect() {
            Isa::Avx512Vnni => vec![Isa::Avx512Vnni, Isa::Avx2, Isa::Scalar],
            Isa::Avx2 => vec![Isa::Avx2, Isa::Scalar],
            Isa::Scalar => vec![Isa::Scalar],
        }
    }

    #[test]
    fn kernels_match_the_dequantised_product_for_every_tile_size() {
        eprintln!("kernels tested: {:?}", isas());
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            // 3 blocks per row (odd: AVX-512 falls back to AVX2) and 4 (even).
            for k in [96, 128] {
                let n = 37;
                let (mat, dense) = weights(dtype, n, k);
                let QMat::Own { kind, data, .. } = &mat else {
                    panic!("{dtype:?} has no kernel")
                };
                let row = k / QK * kind.block_bytes();
                for m in [1, 2, 3, 4, 5, 7, 8, 9, 17] {
                    let x = random(m * k, 3 + m as u64);
                    let acts = Acts::quantize(&x, m, k);
                    let want = reference(&acts, &dense, n);
                    let scalar: Vec<f32> = (0..m * n)
                        .map(|idx| {
                            let (i, j) = (idx / n, idx % n);
                            scalar_dot(*kind, &data[j * row..(j + 1) * row], &acts, i)
                        })
                        .collect();
                    for (s, w) in scalar.iter().zip(&want) {
                        // The Q4_1 offset term uses s_x = d_x·Σq rounded to f16 (~5e-4
                        // relative per block); a wrongly unpacked block is off by O(1).
                        let tol = 1e-2 * (1.0 + w.abs());
                        assert!(
                            (*s as f64 - w).abs() < tol,
                            "{dtype:?} k={k} m={m}: {s} vs {w}"
                        );
                    }
                    for isa in isas() {
                        let mut got = vec![0f32; m];
                        for j in 0..n {
                            row_times_acts(
                                *kind,
                                &data[j * row..(j + 1) * row],
                                &acts,
                                &mut got,
                                isa,
                            );
                            for i in 0..m {
                                let s = scalar[i * n + j];
                                // The same bits on every CPU.
                                assert_eq!(
                                    got[i].to_bits(),
                                    s.to_bits(),
                                    "{isa:?} {dtype:?} k={k} m={m} [{i},{j}]: {} vs scalar {s}",
                                    got[i]
                                );
                            }
                        }
                    }
                    // Through forward (threads, transposition), with the detected kernel.
                    let y = mat.forward(&x, m).unwrap();
                    for (g, s) in y.iter().zip(&scalar) {
                        assert_eq!(g.to_bits(), s.to_bits(), "forward {g} vs {s}");
                    }
                }
            }
        }
    }

    #[test]
    fn simd_quantisation_equals_the_scalar_one() {
        let mut x = random(32 * 40, 21);
        // Exact halves after scaling, zeros, and a block of zeros.
        x[5] = 0.5 * x[0].abs().max(1.0) / 127.0;
        x[32..64].fill(0.0);
        for (i, (xb, _)) in x.chunks_exact(QK).zip(0..).enumerate() {
            let mut a = [0i8; QK];
            let mut b = [0i8; QK];
            let want = quantize_block(xb, &mut a);
            #[cfg(target_arch = "x86_64")]
            if Isa::detect() != Isa::Scalar {
                let got = unsafe { avx::quantize_block(xb, &mut b) };
                assert_eq!(
                    (got.0.to_bits(), got.1, b),
                    (want.0.to_bits(), want.1, a),
                    "block {i}"
                );
            }
        }
    }

    #[test]
    fn matches_candles_qmatmul() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (n, k, m) = (64, 128, 6);
            let w = Tensor::from_vec(random(n * k, 11), (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let candle = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
            let mat = QMat::from_qtensor(q).unwrap();
            let x = random(m * k, 5);
            let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu).unwrap();
            let want = candle
                .forward(&xt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = mat.forward(&x, m).unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() < 1e-2 * (1.0 + w.abs()),
                    "{dtype:?}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn stacked_matrices_equal_their_parts_side_by_side() {
        let (a, _) = weights(GgmlDType::Q4_1, 16, 64);
        let (b, _) = weights(GgmlDType::Q4_1, 8, 64);
        let (c, _) = weights(GgmlDType::Q8_0, 8, 64);
        let x = random(3 * 64, 9);
        let (ya, yb, yc) = (
            a.forward(&x, 3).unwrap(),
            b.forward(&x, 3).unwrap(),
            c.forward(&x, 3).unwrap(),
        );
        let merged = QMat::stack(vec![a, b]);
        assert!(matches!(merged, QMat::Own { n: 24, .. }));
        let mixed = QMat::stack(vec![merged, c]);
        assert!(matches!(mixed, QMat::Stack(_)));
        let y = mixed.forward(&x, 3).unwrap();
        for i in 0..3 {
            let row = &y[i * 32..(i + 1) * 32];
            assert_eq!(&row[..16], &ya[i * 16..(i + 1) * 16]);
            assert_eq!(&row[16..24], &yb[i * 8..(i + 1) * 8]);
            assert_eq!(&row[24..], &yc[i * 8..(i + 1) * 8]);
        }
    }

    #[test]
    fn other_types_go_through_candle_and_stack_with_ours() {
        // Q4K: a type without our kernel (a K-quant GGUF mixes it with others).
        let (n, k, m) = (16, 256, 3);
        let w = Tensor::from_vec(random(n * k, 13), (n, k), &Device::Cpu).unwrap();
        let q4k = QMat::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4K).unwrap()).unwrap();
        assert!(matches!(q4k, QMat::Candle { n: 16, k: 256, .. }));
        assert!(q4k.dequantize_row(0, &mut [0f32; 256]).is_none());
        let reference =
            QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4K).unwrap()).unwrap();
        let x = random(m * k, 17);
        let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu).unwrap();
        let want = reference
            .forward(&xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(q4k.forward(&x, m).unwrap(), want);
        let (ours, _) = weights(GgmlDType::Q4_1, 8, 256);
        let y_ours = ours.forward(&x, m).unwrap();
        let both = QMat::stack(vec![q4k, ours]);
        assert_eq!((both.n(), both.k()), (24, 256));
        let y = both.forward(&x, m).unwrap();
        for i in 0..m {
            assert_eq!(&y[i * 24..i * 24 + 16], &want[i * 16..(i + 1) * 16]);
            assert_eq!(&y[i * 24 + 16..(i + 1) * 24], &y_ours[i * 8..(i + 1) * 8]);
        }
    }

    #[test]
    fn dequantised_rows_are_candles() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (mat, dense) = weights(dtype, 5, 64);
            let mut row = vec![0f32; 64];
            for j in 0..5 {
                mat.dequantize_row(j, &mut row).unwrap();
                assert_eq!(row, dense[j * 64..(j + 1) * 64]);
            }
        }
    }
}
