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
    /// AMX's tile unit ([`amx`]) for packed weights whose sizes fit its tiles; AVX-512 for
    /// the rest and for [`gemm_acc`].
    Amx,
    Avx512,
    Avx2,
    /// AVX-512 with bf16 products (`vdpbf16ps`) and f32 sums, for `--dtype bf16` only: never
    /// what [`Kernel::detect`] gives, since it rounds both factors of every product to bf16
    /// (8 significant bits). Packed weights hold bf16 pairs and the activations are rounded
    /// per product (see [`Packed::matmul_acc`]); [`gemm_acc`] takes it with A and B already
    /// as pairs and `k` counting pairs.
    Avx512Bf16,
}

impl Kernel {
    /// The best kernel this CPU runs and `KANDLE_ISA` allows, if any.
    pub(crate) fn detect() -> Option<Kernel> {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::backend::qmatmul::Isa;
            use std::arch::is_x86_feature_detected as has;
            let cap = Isa::cap();
            #[cfg(target_os = "linux")]
            if has!("avx512f") && cap == Isa::Amx && amx::available() {
                return Some(Kernel::Amx);
            }
            if has!("avx512f") && matches!(cap, Isa::Amx | Isa::Avx512Vnni) {
                return Some(Kernel::Avx512);
            }
            if has!("avx2") && has!("fma") && cap != Isa::Scalar {
                return Some(Kernel::Avx2);
            }
        }
        None
    }

    /// [`Kernel::Avx512Bf16`] where the CPU has AVX512-BF16 and `KANDLE_ISA` allows AVX-512.
    pub(crate) fn bf16() -> Option<Kernel> {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::backend::qmatmul::Isa;
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f")
                && has!("avx512bf16")
                && matches!(Isa::cap(), Isa::Amx | Isa::Avx512Vnni)
            {
                return Some(Kernel::Avx512Bf16);
            }
        }
        None
    }
}

/// bf16 of `v`, rounded to nearest even (for a finite `v`; a NaN may come out as another NaN
/// or an infinity, but does not overflow).
pub(super) fn bf16(v: f32) -> u16 {
    let b = v.to_bits();
    (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

thread_local! {
    /// A thread's block of activations as bf16 pairs ([`Packed::matmul_acc`] on
    /// [`Kernel::Avx512Bf16`]).
    static PAIRS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `lo` and `hi` as one pair, `lo` in the low half: the element [`Kernel::Avx512Bf16`] reads,
/// which multiplies the low halves together and the high halves together.
fn pair(lo: f32, hi: f32) -> u32 {
    bf16(lo) as u32 | (bf16(hi) as u32) << 16
}

/// Rows of `x` (`k` values each) as bf16 pairs into `dst` (`k.div_ceil(2)` pairs a row, an odd
/// `k`'s last pair padded with zero).
fn to_pairs(x: &[f32], k: usize, dst: &mut [u32]) {
    let k2 = k.div_ceil(2);
    for (row, d) in x.chunks_exact(k).zip(dst.chunks_exact_mut(k2)) {
        let mut i = 0;
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512bf16") {
            // SAFETY: AVX512-BF16 is present; the function reads `row` and writes `d` within
            // their lengths.
            i = unsafe { avx512::to_pairs(row, d) };
        }
        for j in i / 2..k2 {
            d[j] = pair(row[2 * j], row.get(2 * j + 1).copied().unwrap_or(0.0));
        }
    }
}

/// The f32 kernels this CPU runs (one with AVX-512 also runs the AVX2 one), for tests.
#[cfg(test)]
pub(crate) fn kernels_here() -> Vec<Kernel> {
    match Kernel::detect() {
        Some(Kernel::Amx) => vec![Kernel::Amx, Kernel::Avx512, Kernel::Avx2],
        Some(Kernel::Avx512) => vec![Kernel::Avx512, Kernel::Avx2],
        Some(Kernel::Avx2) => vec![Kernel::Avx2],
        Some(Kernel::Avx512Bf16) => unreachable!("detect gives f32 kernels only"),
        None => Vec::new(),
    }
}

/// A weight `(n, k)` (transformers' `(out, in)`) as panels of [`NR`] columns, each `(k, NR)`
/// row-major, the last one zero-padded.
pub(crate) struct Packed {
    kernel: Kernel,
    data: Vec<f32>,
    /// Offset of the first panel in `data` (or of the tiles in `tiles`): 64-byte aligned.
    start: usize,
    k: usize,
    n: usize,
    /// For [`Kernel::Amx`]: the weights as [`amx::pack`] lays them out, from `start` on
    /// (`data` is then empty).
    tiles: Vec<u16>,
    /// For [`Kernel::Avx512Bf16`]: panels of [`NR`] columns, each `(k.div_ceil(2), NR)`
    /// row-major bf16 pairs (inputs `2i, 2i + 1` of a column in row `i`), from `start` on.
    pairs: Vec<u32>,
}

impl Packed {
    /// Packs `w` for `kernel`, which the CPU runs ([`Kernel::detect`]).
    pub(crate) fn new(w: &[f32], n: usize, k: usize, kernel: Kernel) -> Self {
        assert_eq!(w.len(), n * k);
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if kernel == Kernel::Amx && amx::available() && amx::fits(n, k) {
            let (tiles, start) = amx::pack(w, n, k);
            return Packed {
                kernel,
                data: Vec::new(),
                start,
                k,
                n,
                tiles,
                pairs: Vec::new(),
            };
        }
        let panels = n.div_ceil(NR);
        if kernel == Kernel::Avx512Bf16 {
            let k2 = k.div_ceil(2);
            let mut pairs = vec![0u32; panels * k2 * NR + 16];
            let start = pairs.as_ptr().align_offset(64).min(16);
            for p in 0..panels {
                for i in 0..k2 {
                    let dst = &mut pairs[start + (p * k2 + i) * NR..][..NR];
                    for (j, d) in dst.iter_mut().enumerate() {
                        let col = p * NR + j;
                        if col < n {
                            let w = &w[col * k..][..k];
                            *d = pair(w[2 * i], w.get(2 * i + 1).copied().unwrap_or(0.0));
                        }
                    }
                }
            }
            return Packed {
                kernel,
                data: Vec::new(),
                start,
                k,
                n,
                tiles: Vec::new(),
                pairs,
            };
        }
        // Sizes the tiles do not take run on AVX-512.
        let kernel = if kernel == Kernel::Amx {
            Kernel::Avx512
        } else {
            kernel
        };
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
            tiles: Vec::new(),
            pairs: Vec::new(),
        }
    }

    /// `out (rows × n) += x (rows × k) · Wᵀ`, on the rayon pool when the product is large.
    pub(crate) fn matmul_acc(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        self.matmul_from(x, rows, out, None)
    }

    /// `out (rows × n) = bias + x (rows × k) · Wᵀ` (`bias`: `n` values, repeated per row):
    /// [`Packed::matmul_acc`] into rows first set to the bias, with the same bits. Each task
    /// sets its own block of `out` just before its product reads it, so the block is in the
    /// cache; setting the whole buffer first wrote and read back ~12 MB per MiniLM layer at
    /// batch 32 (3% of the samples, `perf`).
    pub(crate) fn matmul_bias(&self, x: &[f32], rows: usize, bias: &[f32], out: &mut [f32]) {
        assert_eq!(bias.len(), self.n);
        self.matmul_from(x, rows, out, Some(bias))
    }

    /// [`Packed::matmul_acc`], or [`Packed::matmul_bias`] with `bias`.
    fn matmul_from(&self, x: &[f32], rows: usize, out: &mut [f32], bias: Option<&[f32]>) {
        let (k, n) = (self.k, self.n);
        assert!(x.len() >= rows * k && out.len() >= rows * n);
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if self.kernel == Kernel::Amx {
            if let Some(b) = bias {
                super::fill_bias(&mut out[..rows * n], b);
            }
            return amx::matmul_acc(&self.tiles[self.start..], n, k, x, rows, out);
        }
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
        let bf16 = self.kernel == Kernel::Avx512Bf16;
        // Elements a row of A and of a panel: pairs for bf16.
        let ka = if bf16 { k.div_ceil(2) } else { k };
        let task = |t: usize| {
            let (rb, pg) = (t / panel_groups, t % panel_groups);
            let r0 = rb * mb;
            let r1 = (r0 + mb).min(rows);
            let p0 = pg * per_group;
            let p1 = (p0 + per_group).min(panels);
            // For bf16, the task's rows rounded to pairs once for all of its panels (a block
            // of at most MB rows, ~74 KiB at k = 384, which stays in L2 while they pass), in a
            // buffer each thread keeps: zeroing and freeing a fresh one per task held a
            // 384 → 384 product at 331 GFLOP/s against 399 (1094 rows, 2 threads).
            let panels_from = |a: *const f32| {
                for p in p0..p1 {
                    let cols = (n - p * NR).min(NR);
                    if let Some(bias) = bias {
                        let src = &bias[p * NR..][..cols];
                        for r in r0..r1 {
                            // SAFETY: row r < rows, columns p·NR .. p·NR + cols ≤ n: inside out,
                            // written by this task alone (as below).
                            let dst = unsafe {
                                std::slice::from_raw_parts_mut(out_ptr.at(r * n + p * NR), cols)
                            };
                            // A whole panel's row as one fixed-size copy (two vector stores): a
                            // copy of a length known only at run time was a call to libc's
                            // memmove per row (2–6% of MiniLM's samples at batch 32; six
                            // alternating pairs after: batch 32 +1.3% on average, 5 of 6 ahead).
                            match (
                                <&mut [f32; NR]>::try_from(&mut *dst),
                                <&[f32; NR]>::try_from(src),
                            ) {
                                (Ok(d), Ok(s)) => *d = *s,
                                _ => dst.copy_from_slice(src),
                            }
                        }
                    }
                    // Elements of 4 bytes: f32 values, or bf16 pairs (`ka` of them a row).
                    let b = match bf16 {
                        true => self.pairs[self.start + p * ka * NR..][..ka * NR]
                            .as_ptr()
                            .cast(),
                        false => self.data[self.start + p * k * NR..][..k * NR].as_ptr(),
                    };
                    // SAFETY: rows r0..r1 and columns p·NR..p·NR + cols are in bounds of out
                    // (checked above) and written by this task alone; `a` holds rows r0..r1 of
                    // x (or their pairs), `ka` elements each; the panel holds `ka` rows of NR
                    // elements; the CPU runs the kernel (Packed::new).
                    unsafe {
                        gemm_acc(
                            self.kernel,
                            r1 - r0,
                            cols,
                            ka,
                            a,
                            ka,
                            b,
                            NR,
                            out_ptr.at(r0 * n + p * NR),
                            n,
                        )
                    };
                }
            };
            if bf16 {
                PAIRS.with_borrow_mut(|buf| {
                    let need = (r1 - r0) * ka;
                    if buf.len() < need {
                        buf.resize(need, 0);
                    }
                    to_pairs(&x[r0 * k..r1 * k], k, &mut buf[..need]);
                    panels_from(buf.as_ptr().cast())
                })
            } else {
                panels_from(x[r0 * k..].as_ptr())
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
        let bf16 = which == Kernel::Avx512Bf16;
        if mr == 12 && cols == NR && k > 0 {
            return match bf16 {
                true => avx512::full_12_bf16(a, lda, b, ldb, k, c, ldc),
                false => avx512::full_12(a, lda, b, ldb, k, c, ldc),
            };
        }
        // `$kernel` (`kernel` or `kernel_bf16`) for `mr` rows.
        macro_rules! for_rows {
            ($kernel:ident) => {
                match mr {
                    12 => avx512::$kernel::<12>,
                    11 => avx512::$kernel::<11>,
                    10 => avx512::$kernel::<10>,
                    9 => avx512::$kernel::<9>,
                    8 => avx512::$kernel::<8>,
                    7 => avx512::$kernel::<7>,
                    6 => avx512::$kernel::<6>,
                    5 => avx512::$kernel::<5>,
                    4 => avx512::$kernel::<4>,
                    3 => avx512::$kernel::<3>,
                    2 => avx512::$kernel::<2>,
                    1 => avx512::$kernel::<1>,
                    _ => unreachable!("mr is 1..=MR"),
                }
            };
        }
        let f = match bf16 {
            true => for_rows!(kernel_bf16),
            false => for_rows!(kernel),
        };
        f(a, lda, b, ldb, k, c, ldc, cols)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (which, mr, a, lda, b, ldb, k, c, ldc, cols);
        unreachable!("the packed kernel is only built for x86_64")
    }
}

/// The products on AMX, the tile unit of Intel Xeons since Sapphire Rapids, in bf16 with f32
/// sums, split three ways for f32 accuracy. Each f32 `v` is held as two bf16 values, `hi =
/// bf16(v)` and `lo = bf16(v − hi)`, which together carry 16 bits of its 24; a product `x·w`
/// is `x_hi·w_hi + x_hi·w_lo + x_lo·w_hi`, leaving out `x_lo·w_lo` and the rounding of the
/// `lo` parts, both below 2⁻¹⁶ of the product (the "bf16x3" of oneDNN and cuBLAS). One
/// `tdpbf16ps` does 16 × 16 × 32 bf16 products in 16 cycles; at three per f32 product that is
/// still ~5× what two 16-lane FMAs a cycle do (measured: ~2× on MiniLM's products, see the
/// README). The sums stay in the tile registers over the whole of `k`, so the sums go to
/// memory once per 16 × 64 outputs.
///
/// Layout: weights in blocks of 16 output columns and 32 inputs, each block's `hi` then `lo`
/// tile of 16 rows × 64 bytes in AMX's pair layout (row `i` holds inputs `2i, 2i + 1` of every
/// column); activations converted per call into `hi` and `lo` rows padded to a multiple of 16.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx {
    use core::arch::asm;
    use core::arch::x86_64::*;
    use std::cell::Cell;
    use std::sync::OnceLock;

    use rayon::prelude::*;

    use crate::backend::SharedOut;

    /// Inputs per tile step: 16 pairs of bf16 values.
    const KS: usize = 32;
    /// Output columns per tile.
    const NT: usize = 16;
    /// Tiles of sums per task: 64 output columns.
    const CT: usize = 4;
    /// Rows per tile.
    const MT: usize = 16;

    /// True when the CPU has AMX-TILE and AMX-BF16 and Linux grants the tile registers
    /// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked once per process; it
    /// holds for all of the process's threads, and is refused before Linux 5.16).
    pub(super) fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
            let edx = __cpuid_count(7, 0).edx;
            if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
                return false;
            }
            const SYS_ARCH_PRCTL: isize = 158;
            const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
            const XFEATURE_XTILEDATA: usize = 18;
            let ret: isize;
            // SAFETY: a system call that changes only the process's permission; `syscall`
            // clobbers rcx and r11.
            unsafe {
                asm!(
                    "syscall",
                    inlateout("rax") SYS_ARCH_PRCTL => ret,
                    in("rdi") ARCH_REQ_XCOMP_PERM,
                    in("rsi") XFEATURE_XTILEDATA,
                    lateout("rcx") _,
                    lateout("r11") _,
                    options(nostack),
                );
            }
            ret == 0
        })
    }

    /// Whether a `(n, k)` weight fits the tiles (else it stays on AVX-512).
    pub(super) fn fits(n: usize, k: usize) -> bool {
        n > 0 && k > 0 && n.is_multiple_of(CT * NT) && k.is_multiple_of(KS)
    }

    pub(super) use super::bf16;

    /// The f32 value of a bf16.
    pub(super) fn f32_of(h: u16) -> f32 {
        f32::from_bits((h as u32) << 16)
    }

    /// `v` as `(hi, lo)` bf16 values.
    pub(super) fn split(v: f32) -> (u16, u16) {
        let hi = bf16(v);
        (hi, bf16(v - f32_of(hi)))
    }

    /// `w` (`n × k`, row-major) in the layout of the module doc, from the returned offset on,
    /// which is 64-byte aligned: a tile row that straddles two cache lines is read as two, and
    /// unaligned tiles ran the products at a third of the speed.
    pub(super) fn pack(w: &[f32], n: usize, k: usize) -> (Vec<u16>, usize) {
        let steps = k / KS;
        let mut buf = vec![0u16; n * k * 2 + 32];
        let start = buf.as_ptr().align_offset(64).min(32);
        let out = &mut buf[start..];
        for col in 0..n {
            let (j, c) = (col / NT, col % NT);
            for kk in 0..k {
                let (s, i) = (kk / KS, kk % KS);
                let (hi, lo) = split(w[col * k + kk]);
                let at = (j * steps + s) * 2 * MT * 32 + (i / 2) * 32 + 2 * c + i % 2;
                out[at] = hi;
                out[at + MT * 32] = lo;
            }
        }
        (buf, start)
    }

    /// Rows of `x` (`k` each) as `hi` and `lo` rows into `dst` (two rows of `k` per row).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn convert(x: &[f32], k: usize, dst: &mut [u16]) {
        for (row, d) in x.chunks_exact(k).zip(dst.chunks_exact_mut(2 * k)) {
            let (hi, lo) = d.split_at_mut(k);
            let mut i = 0;
            while i + 16 <= k {
                // SAFETY: 16 values at `i` of the row and of each half.
                unsafe {
                    let v = _mm512_loadu_si512(row.as_ptr().add(i) as *const __m512i);
                    let h = round(v);
                    let hf = _mm512_slli_epi32::<16>(h);
                    let r = _mm512_castps_si512(_mm512_sub_ps(
                        _mm512_castsi512_ps(v),
                        _mm512_castsi512_ps(hf),
                    ));
                    _mm256_storeu_si256(
                        hi.as_mut_ptr().add(i) as *mut __m256i,
                        _mm512_cvtepi32_epi16(h),
                    );
                    _mm256_storeu_si256(
                        lo.as_mut_ptr().add(i) as *mut __m256i,
                        _mm512_cvtepi32_epi16(round(r)),
                    );
                }
                i += 16;
            }
            for i in i..k {
                (hi[i], lo[i]) = split(row[i]);
            }
        }
    }

    /// [`bf16`] of 16 f32 bit patterns, in the low halves of the lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn round(v: __m512i) -> __m512i {
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(v), _mm512_set1_epi32(1));
        let up = _mm512_add_epi32(_mm512_add_epi32(v, _mm512_set1_epi32(0x7FFF)), odd);
        _mm512_srli_epi32::<16>(up)
    }

    thread_local! {
        static CONFIGURED: Cell<bool> = const { Cell::new(false) };
    }

    /// Configures this thread's tile registers once: all eight of 16 rows × 64 bytes; 0–3
    /// sums, 4–5 the activations' `hi` and `lo`, 6–7 a weight block's `hi` and `lo`.
    ///
    /// # Safety
    /// [`available`] gave true.
    unsafe fn configure() {
        if CONFIGURED.get() {
            return;
        }
        #[repr(C, align(64))]
        struct Config([u8; 64]);
        let mut c = Config([0; 64]);
        c.0[0] = 1; // palette 1
        for t in 0..8 {
            c.0[16 + 2 * t] = 64; // bytes per row, u16 little-endian
            c.0[48 + t] = MT as u8;
        }
        // SAFETY: the caller's promise; a valid palette-1 configuration.
        unsafe { asm!("ldtilecfg [{}]", in(reg) c.0.as_ptr(), options(nostack, readonly)) };
        CONFIGURED.set(true);
    }

    /// Loads (`STORE` false) or stores sum tile `T` at `c`, 16 rows `ldc` bytes apart.
    ///
    /// # Safety
    /// Tiles configured; 16 rows of 64 bytes at `c`, `ldc` apart, valid.
    #[inline(always)]
    unsafe fn move_sums<const T: usize, const STORE: bool>(c: *mut f32, ldc: usize) {
        // SAFETY: the caller's.
        unsafe {
            if STORE {
                asm!("tilestored [{c} + {ldc}*1], tmm{t}", t = const T, c = in(reg) c,
                    ldc = in(reg) ldc, options(nostack));
            } else {
                asm!("tileloadd tmm{t}, [{c} + {ldc}*1]", t = const T, c = in(reg) c,
                    ldc = in(reg) ldc, options(nostack));
            }
        }
    }

    /// Sum tile `T` += the activations in tiles 4 (`hi`) and 5 (`lo`) times the weight block
    /// at `w` (its `hi` tile, then its `lo` tile 1 KB on): `hi·hi + hi·lo + lo·hi`.
    ///
    /// # Safety
    /// Tiles configured, 4 and 5 loaded; 2 KB at `w` valid.
    #[inline(always)]
    unsafe fn products<const T: usize>(w: *const u16) {
        // SAFETY: the caller's.
        unsafe {
            asm!(
                "tileloadd tmm6, [{w} + {s64}*1]",
                "tileloadd tmm7, [{w} + {s64}*1 + 1024]",
                "tdpbf16ps tmm{t}, tmm4, tmm6",
                "tdpbf16ps tmm{t}, tmm4, tmm7",
                "tdpbf16ps tmm{t}, tmm5, tmm6",
                t = const T,
                w = in(reg) w,
                s64 = in(reg) 64usize,
                options(nostack),
            );
        }
    }

    /// `c` (16 rows × 64 f32, `ldc` floats apart) += 16 rows of activations `a` (`hi` row of
    /// `k` then `lo`, `2k` apart) times the weight columns of `w` (four column blocks of the
    /// packed layout, `k / 32` steps each, consecutive).
    ///
    /// # Safety
    /// Tiles configured; the extents as described are valid.
    unsafe fn block(a: *const u16, k: usize, w: *const u16, c: *mut f32, ldc: usize) {
        let steps = k / KS;
        let (lda, ldc_b) = (4 * k, 4 * ldc);
        let wstride = steps * 2 * MT * 32; // u16s per column block
        // SAFETY: the caller's.
        unsafe {
            macro_rules! all_sums {
                ($store:literal) => {
                    move_sums::<0, $store>(c, ldc_b);
                    move_sums::<1, $store>(c.add(NT), ldc_b);
                    move_sums::<2, $store>(c.add(2 * NT), ldc_b);
                    move_sums::<3, $store>(c.add(3 * NT), ldc_b);
                };
            }
            all_sums!(false);
            for s in 0..steps {
                let ah = a.add(s * KS);
                asm!(
                    "tileloadd tmm4, [{ah} + {lda}*1]",
                    "tileloadd tmm5, [{al} + {lda}*1]",
                    ah = in(reg) ah,
                    al = in(reg) ah.add(k),
                    lda = in(reg) lda,
                    options(nostack),
                );
                let w0 = w.add(s * 2 * MT * 32);
                products::<0>(w0);
                products::<1>(w0.add(wstride));
                products::<2>(w0.add(2 * wstride));
                products::<3>(w0.add(3 * wstride));
            }
            all_sums!(true);
        }
    }

    /// `out (rows × n) += x (rows × k) · Wᵀ` with `tiles` from [`pack`].
    pub(super) fn matmul_acc(
        tiles: &[u16],
        n: usize,
        k: usize,
        x: &[f32],
        rows: usize,
        out: &mut [f32],
    ) {
        if rows == 0 {
            return;
        }
        let row_blocks = rows.div_ceil(MT);
        // The activations' `hi` and `lo` rows, in a buffer kept per calling thread: a fresh
        // one of a MiniLM batch's size (~7 MB) cost a page fault per 4 KB on every call. One
        // larger than `KEPT` values is allocated for the call alone, so that a rare long batch
        // does not hold its memory.
        const KEPT: usize = 8 << 20;
        thread_local! {
            static ACTS: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let len = row_blocks * MT * 2 * k;
        let mut run = |buf: &mut Vec<u16>| {
            buf.resize(buf.len().max(len + 32), 0);
            // From a 64-byte boundary, as the weights.
            let start = buf.as_ptr().align_offset(64).min(32);
            let a = &mut buf[start..start + len];
            // The rows that pad the last block: zero (their sums are dropped either way).
            a[rows * 2 * k..].fill(0);
            product(tiles, n, k, x, rows, a, out);
        };
        if len + 32 > KEPT {
            run(&mut Vec::new());
        } else {
            ACTS.with_borrow_mut(run);
        }
    }

    /// [`matmul_acc`] with `a` a buffer of at least `rows.div_ceil(16) · 16 · 2k` values, the
    /// rows past `rows` zero.
    fn product(
        tiles: &[u16],
        n: usize,
        k: usize,
        x: &[f32],
        rows: usize,
        a: &mut [u16],
        out: &mut [f32],
    ) {
        let row_blocks = rows.div_ceil(MT);
        let big = rows * k * n >= 256 * 1024;
        let conv = |(xr, d): (&[f32], &mut [u16])| {
            // SAFETY: `available` (the caller's Kernel::Amx) implies AVX-512 F and BW.
            unsafe { convert(xr, k, d) }
        };
        if big {
            x[..rows * k]
                .par_chunks(MT * k)
                .zip(a.par_chunks_mut(MT * 2 * k))
                .for_each(conv);
        } else {
            x[..rows * k]
                .chunks(MT * k)
                .zip(a.chunks_mut(MT * 2 * k))
                .for_each(conv);
        }
        let quads = n / (CT * NT);
        let steps = k / KS;
        let quad_len = CT * steps * 2 * MT * 32;
        let dst = SharedOut(out.as_mut_ptr());
        // Tasks in (column quad, row block) order: a thread's run of tasks reuses one quad.
        let task = |t: usize| {
            let (q, rb) = (t / row_blocks, t % row_blocks);
            let r0 = rb * MT;
            let n_rows = (rows - r0).min(MT);
            let w = tiles[q * quad_len..][..quad_len].as_ptr();
            let ap = a[rb * MT * 2 * k..].as_ptr();
            let col = q * CT * NT;
            // SAFETY: `available` was true (Kernel::Amx); rows `r0..r0 + n_rows` and columns
            // `col..col + 64` of `out` are this task's alone; a full block is summed in place,
            // a partial one through a 16-row buffer.
            unsafe {
                configure();
                if n_rows == MT {
                    block(ap, k, w, dst.at(r0 * n + col), n);
                } else {
                    #[repr(C, align(64))]
                    struct Rows([f32; MT * CT * NT]);
                    let mut buf = Rows([0f32; MT * CT * NT]);
                    let buf = &mut buf.0;
                    for r in 0..n_rows {
                        let row = dst.at((r0 + r) * n + col);
                        std::ptr::copy_nonoverlapping(
                            row,
                            buf[r * CT * NT..].as_mut_ptr(),
                            CT * NT,
                        );
                    }
                    block(ap, k, w, buf.as_mut_ptr(), CT * NT);
                    for r in 0..n_rows {
                        let row = dst.at((r0 + r) * n + col);
                        std::ptr::copy_nonoverlapping(buf[r * CT * NT..].as_ptr(), row, CT * NT);
                    }
                }
            }
        };
        let tasks = quads * row_blocks;
        if big && tasks > 1 {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
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

    /// `*p` in all sixteen lanes, as an opaque instruction: LLVM hoists the broadcasts of
    /// `_mm512_set1_ps` ahead of their FMAs (and unrolls), which for ten or more rows runs
    /// out of registers and spills every step of k; an `asm!` block with side effects stays
    /// where it is written, next to its two FMAs.
    ///
    /// # Safety
    /// `p` points to a readable f32; the CPU has AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn broadcast(p: *const f32) -> __m512 {
        let v: __m512;
        // SAFETY: reads one f32 at `p` (the caller's promise).
        unsafe {
            core::arch::asm!(
                "vbroadcastss {v}, dword ptr [{p}]",
                v = out(zmm_reg) v,
                p = in(reg) p,
                options(nostack, readonly, preserves_flags),
            )
        };
        v
    }

    /// The two AVX-512 kernels of one multiply-add instruction: `f32` ([`fma`], `vfmadd231ps`)
    /// or bf16 pairs ([`dot_bf16`], `vdpbf16ps`). Both read A and B 4 bytes an element (a
    /// float, or a pair of bf16 inputs of one row or column) and keep f32 sums, so the loops,
    /// strides and registers are the same; only the instruction differs.
    macro_rules! kernels {
        ($feature:literal, $mac:ident, $op:literal, $kernel:ident, $full:ident) => {
            /// `C[0..M, 0..cols] += A[0..M, 0..k] · B[0..k, 0..cols]`, `cols` ≤ [`NR`].
            ///
            /// # Safety
            /// As `kernel_dispatch`.
            #[target_feature(enable = $feature)]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $kernel<const M: usize>(
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
                                let av = broadcast(a.add(i * lda + kk));
                                acc0[i] = $mac(acc0[i], av, b0);
                                acc1[i] = $mac(acc1[i], av, b1);
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
                                let av = broadcast(a.add(i * lda + kk));
                                acc0[i] = $mac(acc0[i], av, b0);
                                acc1[i] = $mac(acc1[i], av, b1);
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

            /// [`kernel`] for 12 rows and a whole panel, in assembly: the 24 sums stay in registers
            /// from the first step of `k` to the store. Written with intrinsics, LLVM unrolled the
            /// loop by two and loaded the 24 broadcasts ahead into registers, which left it 24
            /// accumulators and 28 other live values for 32 registers: it spilled ~10 vectors per step
            /// of `k`. Intel's cores hid that; on AMD's Zen 4 the intrinsics kernel ran MiniLM's batch
            /// of 32 at 113 sentences/s, below the AVX2 kernel's 245 (runtime-image/README.md).
            ///
            /// Each step of `k`: the panel's two vectors of B, then per row one broadcast of A and
            /// two FMAs. Rows `4j..4j + 4` are read through base `a + 4j·lda` with offsets 0, L, 2L
            /// and 3L (L = `lda` in bytes), so three bases advance by 4 bytes a step. The sums are
            /// those of the intrinsics kernel in the same order (one FMA per step of `k`), so the
            /// results are the same bits.
            ///
            /// # Safety
            /// As `kernel_dispatch`, with `k` ≥ 1, 12 rows and `cols` = [`NR`].
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $full(
                a: *const f32,
                lda: usize,
                b: *const f32,
                ldb: usize,
                k: usize,
                c: *mut f32,
                ldc: usize,
            ) {
                let l = lda * 4;
                // SAFETY: the caller's extents: rows 0..12 of A (k floats each, `lda` apart), k rows
                // of 32 floats of B (`ldb` apart), 12 rows of 32 floats of C (`ldc` apart). Every
                // vector register is declared clobbered; no stack is used.
                unsafe {
                    core::arch::asm!(
                        "vxorps zmm0, zmm0, zmm0",
                        "vxorps zmm1, zmm1, zmm1",
                        "vxorps zmm2, zmm2, zmm2",
                        "vxorps zmm3, zmm3, zmm3",
                        "vxorps zmm4, zmm4, zmm4",
                        "vxorps zmm5, zmm5, zmm5",
                        "vxorps zmm6, zmm6, zmm6",
                        "vxorps zmm7, zmm7, zmm7",
                        "vxorps zmm8, zmm8, zmm8",
                        "vxorps zmm9, zmm9, zmm9",
                        "vxorps zmm10, zmm10, zmm10",
                        "vxorps zmm11, zmm11, zmm11",
                        "vxorps zmm12, zmm12, zmm12",
                        "vxorps zmm13, zmm13, zmm13",
                        "vxorps zmm14, zmm14, zmm14",
                        "vxorps zmm15, zmm15, zmm15",
                        "vxorps zmm16, zmm16, zmm16",
                        "vxorps zmm17, zmm17, zmm17",
                        "vxorps zmm18, zmm18, zmm18",
                        "vxorps zmm19, zmm19, zmm19",
                        "vxorps zmm20, zmm20, zmm20",
                        "vxorps zmm21, zmm21, zmm21",
                        "vxorps zmm22, zmm22, zmm22",
                        "vxorps zmm23, zmm23, zmm23",
                        "2:",
                        "vmovups zmm24, [{b}]",
                        "vmovups zmm25, [{b} + 64]",
                        "add {b}, {ldb}",
                        "vbroadcastss zmm26, dword ptr [{p0}]",
                        "vbroadcastss zmm27, dword ptr [{p0} + {l}]",
                        concat!($op, " zmm0, zmm24, zmm26"),
                        concat!($op, " zmm1, zmm25, zmm26"),
                        "vbroadcastss zmm28, dword ptr [{p0} + 2*{l}]",
                        concat!($op, " zmm2, zmm24, zmm27"),
                        concat!($op, " zmm3, zmm25, zmm27"),
                        "vbroadcastss zmm29, dword ptr [{p0} + {l3}]",
                        concat!($op, " zmm4, zmm24, zmm28"),
                        concat!($op, " zmm5, zmm25, zmm28"),
                        "vbroadcastss zmm30, dword ptr [{p4}]",
                        concat!($op, " zmm6, zmm24, zmm29"),
                        concat!($op, " zmm7, zmm25, zmm29"),
                        "vbroadcastss zmm31, dword ptr [{p4} + {l}]",
                        concat!($op, " zmm8, zmm24, zmm30"),
                        concat!($op, " zmm9, zmm25, zmm30"),
                        "vbroadcastss zmm26, dword ptr [{p4} + 2*{l}]",
                        concat!($op, " zmm10, zmm24, zmm31"),
                        concat!($op, " zmm11, zmm25, zmm31"),
                        "vbroadcastss zmm27, dword ptr [{p4} + {l3}]",
                        concat!($op, " zmm12, zmm24, zmm26"),
                        concat!($op, " zmm13, zmm25, zmm26"),
                        "vbroadcastss zmm28, dword ptr [{p8}]",
                        concat!($op, " zmm14, zmm24, zmm27"),
                        concat!($op, " zmm15, zmm25, zmm27"),
                        "vbroadcastss zmm29, dword ptr [{p8} + {l}]",
                        concat!($op, " zmm16, zmm24, zmm28"),
                        concat!($op, " zmm17, zmm25, zmm28"),
                        "vbroadcastss zmm30, dword ptr [{p8} + 2*{l}]",
                        concat!($op, " zmm18, zmm24, zmm29"),
                        concat!($op, " zmm19, zmm25, zmm29"),
                        "vbroadcastss zmm31, dword ptr [{p8} + {l3}]",
                        concat!($op, " zmm20, zmm24, zmm30"),
                        concat!($op, " zmm21, zmm25, zmm30"),
                        concat!($op, " zmm22, zmm24, zmm31"),
                        concat!($op, " zmm23, zmm25, zmm31"),
                        "add {p0}, 4",
                        "add {p4}, 4",
                        "add {p8}, 4",
                        "dec {k}",
                        "jnz 2b",
                        // C += sums, row by row.
                        "vaddps zmm0, zmm0, [{c}]",
                        "vaddps zmm1, zmm1, [{c} + 64]",
                        "vmovups [{c}], zmm0",
                        "vmovups [{c} + 64], zmm1",
                        "add {c}, {ldc}",
                        "vaddps zmm2, zmm2, [{c}]",
                        "vaddps zmm3, zmm3, [{c} + 64]",
                        "vmovups [{c}], zmm2",
                        "vmovups [{c} + 64], zmm3",
                        "add {c}, {ldc}",
                        "vaddps zmm4, zmm4, [{c}]",
                        "vaddps zmm5, zmm5, [{c} + 64]",
                        "vmovups [{c}], zmm4",
                        "vmovups [{c} + 64], zmm5",
                        "add {c}, {ldc}",
                        "vaddps zmm6, zmm6, [{c}]",
                        "vaddps zmm7, zmm7, [{c} + 64]",
                        "vmovups [{c}], zmm6",
                        "vmovups [{c} + 64], zmm7",
                        "add {c}, {ldc}",
                        "vaddps zmm8, zmm8, [{c}]",
                        "vaddps zmm9, zmm9, [{c} + 64]",
                        "vmovups [{c}], zmm8",
                        "vmovups [{c} + 64], zmm9",
                        "add {c}, {ldc}",
                        "vaddps zmm10, zmm10, [{c}]",
                        "vaddps zmm11, zmm11, [{c} + 64]",
                        "vmovups [{c}], zmm10",
                        "vmovups [{c} + 64], zmm11",
                        "add {c}, {ldc}",
                        "vaddps zmm12, zmm12, [{c}]",
                        "vaddps zmm13, zmm13, [{c} + 64]",
                        "vmovups [{c}], zmm12",
                        "vmovups [{c} + 64], zmm13",
                        "add {c}, {ldc}",
                        "vaddps zmm14, zmm14, [{c}]",
                        "vaddps zmm15, zmm15, [{c} + 64]",
                        "vmovups [{c}], zmm14",
                        "vmovups [{c} + 64], zmm15",
                        "add {c}, {ldc}",
                        "vaddps zmm16, zmm16, [{c}]",
                        "vaddps zmm17, zmm17, [{c} + 64]",
                        "vmovups [{c}], zmm16",
                        "vmovups [{c} + 64], zmm17",
                        "add {c}, {ldc}",
                        "vaddps zmm18, zmm18, [{c}]",
                        "vaddps zmm19, zmm19, [{c} + 64]",
                        "vmovups [{c}], zmm18",
                        "vmovups [{c} + 64], zmm19",
                        "add {c}, {ldc}",
                        "vaddps zmm20, zmm20, [{c}]",
                        "vaddps zmm21, zmm21, [{c} + 64]",
                        "vmovups [{c}], zmm20",
                        "vmovups [{c} + 64], zmm21",
                        "add {c}, {ldc}",
                        "vaddps zmm22, zmm22, [{c}]",
                        "vaddps zmm23, zmm23, [{c} + 64]",
                        "vmovups [{c}], zmm22",
                        "vmovups [{c} + 64], zmm23",
                        p0 = inout(reg) a => _,
                        p4 = inout(reg) a.add(4 * lda) => _,
                        p8 = inout(reg) a.add(8 * lda) => _,
                        l = in(reg) l,
                        l3 = in(reg) 3 * l,
                        b = inout(reg) b => _,
                        ldb = in(reg) ldb * 4,
                        k = inout(reg) k => _,
                        c = inout(reg) c => _,
                        ldc = in(reg) ldc * 4,
                        out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                        out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                        out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                        out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
                        out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
                        out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
                        out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
                        out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
                        options(nostack),
                    );
                }
            }
        };
    }

    kernels!("avx512f", fma, "vfmadd231ps", kernel, full_12);
    // The bf16 twin reads pairs through f32 pointers: 4 bytes an element, bits untouched.
    kernels!(
        "avx512f,avx512bf16",
        dot_bf16,
        "vdpbf16ps",
        kernel_bf16,
        full_12_bf16
    );

    /// `acc + a·b`, lane by lane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn fma(acc: __m512, a: __m512, b: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, acc)
    }

    /// `acc + a₀·b₀ + a₁·b₁`, lane by lane, where each lane of `a` and `b` holds a pair of
    /// bf16 values (`vdpbf16ps`: products exact, sums in f32 rounded to nearest even).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn dot_bf16(acc: __m512, a: __m512, b: __m512) -> __m512 {
        // SAFETY: same-size vector types; every bit pattern is a valid value of each.
        let bh = |v| unsafe { std::mem::transmute::<__m512, __m512bh>(v) };
        _mm512_dpbf16_ps(acc, bh(a), bh(b))
    }

    /// The first `2 · (d.len().min(row.len() / 2) / 16)` values of `row` as pairs into `d`, 32
    /// at a time (`vcvtne2ps2bf16`: [`super::bf16`]'s rounding, except that subnormal inputs
    /// count as zero, as `vdpbf16ps` counts subnormal factors: the products are the same
    /// whichever conversion a value took); returns how many values it converted.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) fn to_pairs(row: &[f32], d: &mut [u32]) -> usize {
        let blocks = d.len().min(row.len() / 2) / 16;
        for i in 0..blocks {
            // SAFETY: values 32i..32i + 32 of `row` and pairs 16i..16i + 16 of `d` exist.
            unsafe {
                let lo = _mm512_loadu_ps(row.as_ptr().add(32 * i));
                let hi = _mm512_loadu_ps(row.as_ptr().add(32 * i + 16));
                // Words 0..16 from the second operand, 16..32 from the first: in row order.
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(d.as_mut_ptr().add(16 * i).cast(), v);
            }
        }
        32 * blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Activations `x` (rows × k), weights `w` (n × k) and the output's starting values
    /// (rows × n) of a product test.
    fn inputs(rows: usize, k: usize, n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let x = (0..rows * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let w = (0..n * k)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
            .collect();
        let init = (0..rows * n).map(|i| (i % 7) as f32).collect();
        (x, w, init)
    }

    /// `got` is `init + x · wᵀ` within 1e-4 everywhere.
    fn assert_plain(
        what: &str,
        (rows, k, n): (usize, usize, usize),
        x: &[f32],
        w: &[f32],
        init: &[f32],
        got: &[f32],
    ) {
        for r in 0..rows {
            for j in 0..n {
                let want =
                    init[r * n + j] + (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum::<f32>();
                let g = got[r * n + j];
                assert!(
                    (g - want).abs() < 1e-4,
                    "{what} ({rows},{k},{n}) [{r},{j}]: {g} vs {want}"
                );
            }
        }
    }

    /// Every element of `a` has the bits of the same element of `b`.
    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits())
    }

    /// `matmul_bias` gives the bits of `matmul_acc` into rows set to the bias, whatever the
    /// output held before (here: `got`, the product of a test).
    fn assert_bias_is_acc_into_bias(
        what: &str,
        packed: &Packed,
        x: &[f32],
        rows: usize,
        mut got: Vec<f32>,
    ) {
        let n = packed.n;
        let bias: Vec<f32> = (0..n).map(|j| (j % 5) as f32 - 2.5).collect();
        let mut want: Vec<f32> = bias.iter().copied().cycle().take(rows * n).collect();
        packed.matmul_acc(x, rows, &mut want);
        packed.matmul_bias(x, rows, &bias, &mut got);
        assert!(
            same_bits(&got, &want),
            "{what}: matmul_bias differs from bias + matmul_acc"
        );
    }

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
                let (x, w, init) = inputs(rows, k, n);
                // B as (k × n) row-major: w's transpose.
                let bt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
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
                assert_plain(&format!("{kernel:?}"), (rows, k, n), &x, &w, &init, &got);
            }
        }
    }

    /// The assembly kernel for 12 rows and a whole panel gives the intrinsics kernel's bits,
    /// with A, B and C at row strides wider than the block (as inside a larger product).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_assembly_12_row_kernel_gives_the_intrinsics_bits() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512 here: the assembly kernel is not built into any product");
            return;
        }
        for k in [1, 2, 37, 384] {
            let (lda, ldb, ldc) = (k + 3, NR + 8, NR + 5);
            let (x, w, init) = inputs(12, lda, ldb.max(ldc));
            let (mut asm, mut intr) = (init.clone(), init.clone());
            // SAFETY: AVX-512 is present; A holds 12 rows of `lda` ≥ k, B k rows of
            // `ldb` ≥ 32, C 12 rows of `ldc` ≥ 32 (all within the vectors).
            unsafe {
                avx512::full_12(x.as_ptr(), lda, w.as_ptr(), ldb, k, asm.as_mut_ptr(), ldc);
                avx512::kernel::<12>(
                    x.as_ptr(),
                    lda,
                    w.as_ptr(),
                    ldb,
                    k,
                    intr.as_mut_ptr(),
                    ldc,
                    NR,
                );
            }
            assert!(
                same_bits(&asm, &intr),
                "k = {k}: the assembly and intrinsics kernels differ"
            );
            assert_ne!(asm, init, "k = {k}: nothing was written");
        }
    }

    /// The AMX path's bf16 split: `hi + lo` holds 16 bits of every value, rounding is to nearest
    /// even (ties both ways), and the AVX-512 conversion of a row gives the scalar split's bits.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn bf16_halves_hold_sixteen_bits_and_both_conversions_agree() {
        // Ties: the low 16 bits exactly half, with an even and an odd bf16 below them.
        assert_eq!(amx::bf16(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(amx::bf16(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert_eq!(amx::bf16(-1.0), 0xBF80);
        let mut row: Vec<f32> = (0..37)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1.7e-3 * (1 + i % 5) as f32)
            .collect();
        row[3] = f32::from_bits(0x3F80_8000);
        row[4] = 1e-30;
        row[5] = -3.0e30;
        for &v in &row {
            let (hi, lo) = amx::split(v);
            let back = amx::f32_of(hi) as f64 + amx::f32_of(lo) as f64;
            assert!(
                (back - v as f64).abs() <= v.abs() as f64 * 2f64.powi(-16),
                "{v}: {back}"
            );
        }
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            let mut got = vec![0u16; 2 * row.len()];
            // SAFETY: AVX-512 F and BW are present; one row of 37 values, two halves of 37.
            unsafe { amx::convert(&row, row.len(), &mut got) };
            for (i, &v) in row.iter().enumerate() {
                assert_eq!((got[i], got[row.len() + i]), amx::split(v), "{v}");
            }
        }
    }

    /// The bf16 kernel against a plain product ([`assert_plain`]) of the bf16-rounded values
    /// (their products exact in f32): full 12-row blocks and remainders, an odd `k` (its last
    /// pair padded), a partial last panel and masked stores; the 12-row assembly gives the
    /// intrinsics kernel's bits; `matmul_bias` gives bias + `matmul_acc`'s bits.
    #[test]
    fn the_bf16_kernel_matches_a_product_of_rounded_values() {
        let Some(kernel) = Kernel::bf16() else {
            eprintln!("no AVX512-BF16 here: --dtype bf16 runs the f32 kernels");
            return;
        };
        let round = |v: f32| f32::from_bits((bf16(v) as u32) << 16);
        for &(rows, k, n) in &[
            (1, 7, 45),
            (13, 33, 45),
            (24, 384, 64),
            (37, 64, 96),
            (9, 5, 16),
            (100, 96, 32),
        ] {
            let (x, w, init) = inputs(rows, k, n);
            let packed = Packed::new(&w, n, k, kernel);
            let mut got = init.clone();
            packed.matmul_acc(&x, rows, &mut got);
            let (xr, wr): (Vec<f32>, Vec<f32>) = (
                x.iter().map(|&v| round(v)).collect(),
                w.iter().map(|&v| round(v)).collect(),
            );
            assert_plain("bf16", (rows, k, n), &xr, &wr, &init, &got);
            assert_bias_is_acc_into_bias(&format!("bf16 ({rows},{k},{n})"), &packed, &x, rows, got);
        }
        // The assembly and the intrinsics kernels on the same pairs, at wide strides.
        for k2 in [1, 2, 37, 192] {
            let (lda, ldb, ldc) = (k2 + 3, NR + 8, NR + 5);
            let (x, w, init) = inputs(12, 2 * lda, 2 * ldb.max(ldc));
            let mut a = vec![0u32; 12 * lda];
            to_pairs(&x, 2 * lda, &mut a);
            let mut b = vec![0u32; k2 * ldb];
            to_pairs(&w[..2 * k2 * ldb], 2 * ldb, &mut b);
            let (mut asm, mut intr) = (init.clone(), init.clone());
            // SAFETY: AVX512-BF16 is present; A holds 12 rows of `lda` ≥ k2 pairs, B k2 rows
            // of `ldb` ≥ 32, C 12 rows of `ldc` ≥ 32 (all within the vectors).
            unsafe {
                let (a, b) = (a.as_ptr().cast(), b.as_ptr().cast());
                avx512::full_12_bf16(a, lda, b, ldb, k2, asm.as_mut_ptr(), ldc);
                avx512::kernel_bf16::<12>(a, lda, b, ldb, k2, intr.as_mut_ptr(), ldc, NR);
            }
            assert!(
                same_bits(&asm, &intr),
                "k2 = {k2}: the assembly and intrinsics bf16 kernels differ"
            );
            assert_ne!(asm, init, "k2 = {k2}: nothing was written");
        }
    }

    /// Rows to bf16 pairs: ties round to even both ways, the low half holds the earlier input,
    /// an odd row's last pair is padded with zero, and the AVX-512 conversion (rows of 70: two
    /// blocks of 32, then the scalar tail) gives the scalar bits.
    #[test]
    fn rows_become_bf16_pairs_in_order() {
        assert_eq!(bf16(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(bf16(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert_eq!(pair(1.0, -2.0), 0xC000_3F80);
        let mut got = [0u32; 2];
        to_pairs(&[1.0, 2.0, 3.0], 3, &mut got);
        assert_eq!(got, [pair(1.0, 2.0), pair(3.0, 0.0)]);
        let k = 70;
        let mut x: Vec<f32> = (0..2 * k)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1.7e-3 * (1 + i % 5) as f32)
            .collect();
        x[3] = f32::from_bits(0x3F80_8000);
        x[40] = f32::from_bits(0x3F81_8000);
        x[41] = -3.0e30;
        let mut got = vec![0u32; 2 * (k / 2)];
        to_pairs(&x, k, &mut got);
        for (j, &p) in got.iter().enumerate() {
            assert_eq!(p, pair(x[2 * j], x[2 * j + 1]), "pair {j}");
        }
    }

    /// Packed weights (each kernel this CPU runs) against a plain product.
    #[test]
    fn the_packed_product_matches_a_plain_one() {
        for kernel in kernels_here() {
            // Odd sizes: partial row blocks, a partial last panel (n = 45), masked stores;
            // for AMX sizes its tiles take (n a multiple of 64, k of 32), with a partial last
            // block of 16 rows, one row, and exactly 16 and 32 rows.
            for &(rows, k, n) in &[
                (1, 7, 45),
                (13, 33, 45),
                (70, 64, 96),
                (9, 5, 16),
                (70, 64, 128),
                (1, 96, 64),
                (16, 32, 64),
                (32, 384, 192),
            ] {
                let (x, w, init) = inputs(rows, k, n);
                let mut got = init.clone();
                let packed = Packed::new(&w, n, k, kernel);
                #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
                if kernel == Kernel::Amx {
                    // The sizes the tiles take do run on them.
                    assert_eq!(
                        !packed.tiles.is_empty(),
                        amx::fits(n, k),
                        "({rows},{k},{n})"
                    );
                    // From a cache line on (unaligned tiles ran at a third of the speed).
                    if amx::fits(n, k) {
                        assert_eq!(packed.tiles[packed.start..].as_ptr() as usize % 64, 0);
                    }
                }
                packed.matmul_acc(&x, rows, &mut got);
                assert_plain(&format!("{kernel:?}"), (rows, k, n), &x, &w, &init, &got);
                let what = format!("{kernel:?} ({rows},{k},{n})");
                assert_bias_is_acc_into_bias(&what, &packed, &x, rows, got);
            }
        }
    }
}
