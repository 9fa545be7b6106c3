//! `C += A · Wᵀ` with AVX-512 and weights packed once at load.
//!
//! Why not the `gemm` crate that candle uses: built as candle builds it (without its `x86-v4`
//! feature) it runs its AVX2 micro-kernel even on AVX-512 machines, and it packs the weight
//! matrix again on every call — on all-MiniLM-L6-v2 `perf` put 57 % of the time in its
//! micro-kernel and 22 % in `pack_lhs`. Here each linear layer's weight is rearranged at load
//! into panels of 32 output columns, `(k, 32)` row-major, so that the kernel streams one
//! panel with two 16-lane loads per step of k while 8 rows of A are broadcast against it
//! (16 accumulators). The panel (k × 128 bytes: 48 KiB at k = 384) stays in L1/L2 while row
//! blocks pass over it. CPUs with AVX2 + FMA but not AVX-512 run an AVX2 kernel on the same
//! panels, each half (16 columns) with 6 rows of A at a time (12 accumulators); CPUs with
//! neither ([`Kernel::detect`] gives `None`) keep the `gemm` crate.

use rayon::prelude::*;

use crate::backend::SharedOut;

/// Output columns per panel: two AVX-512 vectors.
const NR: usize = 32;
/// Rows of A per micro-kernel call.
const MR: usize = 12;
/// Rows per task: a block of A that stays in L2 while the task's panels pass.
const MB: usize = 96;

/// The packed kernels, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    Avx512,
    Avx2,
}

impl Kernel {
    /// The best kernel this CPU runs and `KANDLE_ISA` allows, if any.
    pub(crate) fn detect() -> Option<Kernel> {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::backend::qmatmul::Isa;
            use std::arch::is_x86_feature_detected as has;
            let cap = Isa::cap();
            if has!("avx512f") && cap == Isa::Avx512Vnni {
                return Some(Kernel::Avx512);
            }
            if has!("avx2") && has!("fma") && cap != Isa::Scalar {
                return Some(Kernel::Avx2);
            }
        }
        None
    }
}

/// The kernels this CPU runs (one with AVX-512 also runs the AVX2 one), for tests.
#[cfg(test)]
pub(crate) fn kernels_here() -> Vec<Kernel> {
    match Kernel::detect() {
        Some(Kernel::Avx512) => vec![Kernel::Avx512, Kernel::Avx2],
        Some(Kernel::Avx2) => vec![Kernel::Avx2],
        None => Vec::new(),
    }
}

/// A weight `(n, k)` (transformers' `(out, in)`) as panels of [`NR`] columns, each `(k, NR)`
/// row-major, the last one zero-padded.
pub(crate) struct Packed {
    kernel: Kernel,
    data: Vec<f32>,
    /// Offset of the first panel in `data`: panels start 64-byte aligned.
    start: usize,
    k: usize,
    n: usize,
}

impl Packed {
    /// Packs `w` for `kernel`, which the CPU runs ([`Kernel::detect`]).
    pub(crate) fn new(w: &[f32], n: usize, k: usize, kernel: Kernel) -> Self {
        assert_eq!(w.len(), n * k);
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR + 16];
        let start = data.as_ptr().align_offset(64).min(16);
        for p in 0..panels {
            for kk in 0..k {
                let dst = &mut data[start + (p * k + kk) * NR..][..NR];
                for (j, d) in dst.iter_mut().enumerate() {
                    let col = p * NR + j;
                    if col < n {
                        *d = w[col * k + kk];
                    }
                }
            }
        }
        Packed {
            kernel,
            data,
            start,
            k,
            n,
        }
    }

    /// `out (rows × n) += x (rows × k) · Wᵀ`, on the rayon pool when the product is large.
    pub(crate) fn matmul_acc(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let (k, n) = (self.k, self.n);
        assert!(x.len() >= rows * k && out.len() >= rows * n);
        let panels = n.div_ceil(NR);
        let threads = rayon::current_num_threads().max(1);
        // Blocks of at most MB rows, as many as a multiple of the threads so that none idles
        // at the end (13 blocks on 2 threads would leave one thread a block behind).
        let mut row_blocks = rows.div_ceil(MB);
        if row_blocks > 1 {
            row_blocks = row_blocks.next_multiple_of(threads);
        }
        let mb = rows.div_ceil(row_blocks).next_multiple_of(MR);
        let row_blocks = rows.div_ceil(mb);
        // Enough tasks to balance the threads; panels are split when rows are few (batch 1).
        let want = threads * 4;
        let panel_groups = want.div_ceil(row_blocks).clamp(1, panels);
        let per_group = panels.div_ceil(panel_groups);
        let panel_groups = panels.div_ceil(per_group);
        let tasks = row_blocks * panel_groups;
        let out_ptr = SharedOut(out.as_mut_ptr());
        let task = |t: usize| {
            let (rb, pg) = (t / panel_groups, t % panel_groups);
            let r0 = rb * mb;
            let r1 = (r0 + mb).min(rows);
            let p0 = pg * per_group;
            let p1 = (p0 + per_group).min(panels);
            for p in p0..p1 {
                let cols = (n - p * NR).min(NR);
                let b = &self.data[self.start + p * k * NR..][..k * NR];
                // SAFETY: rows r0..r1 and columns p·NR..p·NR + cols are in bounds of out
                // (checked above) and written by this task alone; x rows likewise; the panel
                // holds k rows of NR values; the CPU runs the kernel (Packed::new).
                unsafe {
                    gemm_acc(
                        self.kernel,
                        r1 - r0,
                        cols,
                        k,
                        x.as_ptr().add(r0 * k),
                        k,
                        b.as_ptr(),
                        NR,
                        out_ptr.at(r0 * n + p * NR),
                        n,
                    )
                };
            }
        };
        if tasks > 1 && threads > 1 && rows * k * n >= 256 * 1024 {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
    }
}

/// `C (m × n) += A (m × k) · B (k × n)`, all row-major with the given row strides, on the
/// calling thread. B's rows are read 32 columns at a time with masked loads at the right
/// edge, so B needs no padding.
///
/// # Safety
/// The CPU runs `kernel` ([`Kernel::detect`]); `a` points to `m` rows of `k` readable elements
/// `lda` apart, `b` to `k` rows of `n` readable elements `ldb` apart, `c` to `m` rows of `n`
/// writable elements `ldc` apart, and nothing else writes those elements meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_acc(
    kernel: Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
) {
    for p in 0..n.div_ceil(NR) {
        let cols = (n - p * NR).min(NR);
        let mut r = 0;
        while r < m {
            let mr = (m - r).min(MR);
            // SAFETY: within the extents the caller guarantees.
            unsafe {
                kernel_dispatch(
                    kernel,
                    mr,
                    a.add(r * lda),
                    lda,
                    b.add(p * NR),
                    ldb,
                    k,
                    c.add(r * ldc + p * NR),
                    ldc,
                    cols,
                )
            };
            r += mr;
        }
    }
}

/// # Safety
/// `a`: `mr` rows of `k` elements, `lda` apart; `b`: `k` rows of `cols` (≤ NR) elements,
/// `ldb` apart; `c`: `mr` rows of `cols` elements, `ldc` apart; the CPU runs `which`.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_dispatch(
    which: Kernel,
    mr: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from the caller.
    unsafe {
        if which == Kernel::Avx2 {
            return avx2::kernel(mr, a, lda, b, ldb, k, c, ldc, cols);
        }
        use avx512::kernel;
        let f = match mr {
            12 => kernel::<12>,
            11 => kernel::<11>,
            10 => kernel::<10>,
            9 => kernel::<9>,
            8 => kernel::<8>,
            7 => kernel::<7>,
            6 => kernel::<6>,
            5 => kernel::<5>,
            4 => kernel::<4>,
            3 => kernel::<3>,
            2 => kernel::<2>,
            1 => kernel::<1>,
            _ => unreachable!("mr is 1..=MR"),
        };
        f(a, lda, b, ldb, k, c, ldc, cols)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (which, mr, a, lda, b, ldb, k, c, ldc, cols);
        unreachable!("the packed kernel is only built for x86_64")
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::NR;

    /// Rows of A per block: 6 rows × 2 registers of accumulators, 2 for B, 1 for A.
    const MR2: usize = 6;

    /// A mask of the first `n` (at most 8) lanes.
    #[target_feature(enable = "avx2,fma")]
    fn first(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// `C[0..mr, 0..cols] += A[0..mr, 0..k] · B[0..k, 0..cols]`, `cols` ≤ [`NR`]: each half of
    /// the columns in blocks of up to [`MR2`] rows.
    ///
    /// # Safety
    /// As `kernel_dispatch`, with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel(
        mr: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        k: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        for c0 in (0..cols.min(NR)).step_by(16) {
            let w = (cols - c0).min(16);
            let mut r = 0;
            while r < mr {
                let m = (mr - r).min(MR2);
                // SAFETY: rows r..r + m and columns c0..c0 + w lie within the caller's extents.
                unsafe {
                    let (a, b, c) = (a.add(r * lda), b.add(c0), c.add(r * ldc + c0));
                    match m {
                        6 => block::<6>(a, lda, b, ldb, k, c, ldc, w),
                        5 => block::<5>(a, lda, b, ldb, k, c, ldc, w),
                        4 => block::<4>(a, lda, b, ldb, k, c, ldc, w),
                        3 => block::<3>(a, lda, b, ldb, k, c, ldc, w),
                        2 => block::<2>(a, lda, b, ldb, k, c, ldc, w),
                        _ => block::<1>(a, lda, b, ldb, k, c, ldc, w),
                    }
                }
                r += m;
            }
        }
    }

    /// `M` rows times `w` (at most 16) columns, the columns in two registers.
    ///
    /// # Safety
    /// As [`kernel`], for `M` rows and `w` columns.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const M: usize>(
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        k: usize,
        c: *mut f32,
        ldc: usize,
        w: usize,
    ) {
        let (m0, m1) = (first(w.min(8)), first(w.saturating_sub(8)));
        let mut acc0 = [_mm256_setzero_ps(); M];
        let mut acc1 = [_mm256_setzero_ps(); M];
        // SAFETY: loads and stores touch only the first `w` columns of each row (masked at the
        // right edge) of rows inside the caller's extents.
        unsafe {
            for kk in 0..k {
                let row = b.add(kk * ldb);
                let (b0, b1) = if w == 16 {
                    (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)))
                } else {
                    (
                        _mm256_maskload_ps(row, m0),
                        _mm256_maskload_ps(row.add(8), m1),
                    )
                };
                for i in 0..M {
                    let av = _mm256_broadcast_ss(&*a.add(i * lda + kk));
                    acc0[i] = _mm256_fmadd_ps(av, b0, acc0[i]);
                    acc1[i] = _mm256_fmadd_ps(av, b1, acc1[i]);
                }
            }
            for i in 0..M {
                let p = c.add(i * ldc);
                if w == 16 {
                    _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), acc0[i]));
                    let p = p.add(8);
                    _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), acc1[i]));
                } else {
                    let v = _mm256_add_ps(_mm256_maskload_ps(p, m0), acc0[i]);
                    _mm256_maskstore_ps(p, m0, v);
                    let p = p.add(8);
                    let v = _mm256_add_ps(_mm256_maskload_ps(p, m1), acc1[i]);
                    _mm256_maskstore_ps(p, m1, v);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::NR;

    /// `C[0..M, 0..cols] += A[0..M, 0..k] · B[0..k, 0..cols]`, `cols` ≤ [`NR`].
    ///
    /// # Safety
    /// As `kernel_dispatch`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel<const M: usize>(
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        k: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        let m0: __mmask16 = if cols >= 16 {
            0xffff
        } else {
            ((1u32 << cols) - 1) as u16
        };
        let m1: __mmask16 = if cols <= 16 {
            0
        } else if cols >= NR {
            0xffff
        } else {
            ((1u32 << (cols - 16)) - 1) as u16
        };
        // SAFETY: all pointer arithmetic stays within the extents the caller guarantees;
        // masked loads and stores touch only the first `cols` elements of a row.
        unsafe {
            let mut acc0 = [_mm512_setzero_ps(); M];
            let mut acc1 = [_mm512_setzero_ps(); M];
            if cols == NR {
                for kk in 0..k {
                    let b0 = _mm512_loadu_ps(b.add(kk * ldb));
                    let b1 = _mm512_loadu_ps(b.add(kk * ldb + 16));
                    for i in 0..M {
                        let av = _mm512_set1_ps(*a.add(i * lda + kk));
                        acc0[i] = _mm512_fmadd_ps(av, b0, acc0[i]);
                        acc1[i] = _mm512_fmadd_ps(av, b1, acc1[i]);
                    }
                }
                for i in 0..M {
                    let p = c.add(i * ldc);
                    _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), acc0[i]));
                    let p = p.add(16);
                    _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), acc1[i]));
                }
            } else {
                for kk in 0..k {
                    let b0 = _mm512_maskz_loadu_ps(m0, b.add(kk * ldb));
                    let b1 = _mm512_maskz_loadu_ps(m1, b.add(kk * ldb + 16));
                    for i in 0..M {
                        let av = _mm512_set1_ps(*a.add(i * lda + kk));
                        acc0[i] = _mm512_fmadd_ps(av, b0, acc0[i]);
                        acc1[i] = _mm512_fmadd_ps(av, b1, acc1[i]);
                    }
                }
                for i in 0..M {
                    let p = c.add(i * ldc);
                    let v = _mm512_maskz_loadu_ps(m0, p);
                    _mm512_mask_storeu_ps(p, m0, _mm512_add_ps(v, acc0[i]));
                    let p = p.add(16);
                    let v = _mm512_maskz_loadu_ps(m1, p);
                    _mm512_mask_storeu_ps(p, m1, _mm512_add_ps(v, acc1[i]));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each kernel this CPU runs against a plain product: partial row blocks (13 rows with 12
    /// and 6 per block), a partial last panel and a half panel of under 8 columns (n = 45, 37),
    /// masked loads and stores.
    #[test]
    fn every_kernel_matches_a_plain_product() {
        eprintln!("packed kernels tested: {:?}", kernels_here());
        for kernel in kernels_here() {
            for &(rows, k, n) in &[
                (1, 7, 45),
                (13, 33, 45),
                (13, 9, 37),
                (70, 64, 96),
                (9, 5, 16),
            ] {
                let x: Vec<f32> = (0..rows * k)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                    .collect();
                // B as (k × n) row-major: w's transpose.
                let w: Vec<f32> = (0..n * k)
                    .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
                    .collect();
                let bt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
                let init: Vec<f32> = (0..rows * n).map(|i| (i % 7) as f32).collect();
                let mut got = init.clone();
                // SAFETY: the CPU runs `kernel`; the extents are those of the vectors.
                unsafe {
                    gemm_acc(
                        kernel,
                        rows,
                        n,
                        k,
                        x.as_ptr(),
                        k,
                        bt.as_ptr(),
                        n,
                        got.as_mut_ptr(),
                        n,
                    )
                };
                for r in 0..rows {
                    for j in 0..n {
                        let want = init[r * n + j]
                            + (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum::<f32>();
                        let g = got[r * n + j];
                        assert!(
                            (g - want).abs() < 1e-4,
                            "{kernel:?} ({rows},{k},{n}) [{r},{j}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Packed weights (each kernel this CPU runs) against a plain product.
    #[test]
    fn the_packed_product_matches_a_plain_one() {
        for kernel in kernels_here() {
            // Odd sizes: partial row blocks, a partial last panel (n = 45), masked stores.
            for &(rows, k, n) in &[(1, 7, 45), (13, 33, 45), (70, 64, 96), (9, 5, 16)] {
                let x: Vec<f32> = (0..rows * k)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                    .collect();
                let w: Vec<f32> = (0..n * k)
                    .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
                    .collect();
                let init: Vec<f32> = (0..rows * n).map(|i| (i % 7) as f32).collect();
                let mut got = init.clone();
                Packed::new(&w, n, k, kernel).matmul_acc(&x, rows, &mut got);
                for r in 0..rows {
                    for j in 0..n {
                        let want = init[r * n + j]
                            + (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum::<f32>();
                        let g = got[r * n + j];
                        assert!(
                            (g - want).abs() < 1e-4,
                            "{kernel:?} ({rows},{k},{n}) [{r},{j}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
