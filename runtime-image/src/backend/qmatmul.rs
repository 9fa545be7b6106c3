//! Our own CPU kernels for products with GGUF-quantised weights, batched over activation rows.
//!
//! Why not candle's `QMatMul`: candle 0.11 has no SIMD kernel for Q4_1 (a scalar dot product,
//! ../shared/fixtures/baselines.md), and its CPU matmul walks activation row by activation row,
//! reading the whole weight matrix once per row — stacking the rows of eight sequences made a
//! decode round cost eight single steps.
//!
//! **Layout.** At load the GGUF blocks are repacked into tiles of [`ROWS`] = 16 weight rows, so
//! that one 32-bit lane of a 512-bit register (AVX2: of two 256-bit ones) holds one output:
//! per tile and block, the rows' f16 scales `d` (and Q4_1's offsets `m`) side by side, then
//! for each group of four bytes of a block, those four bytes of every row side by side. One
//! `vpdpbusd` with four activation bytes broadcast then advances sixteen outputs by four
//! products each, and the unpacked weights of a tile serve up to eight activation rows. This
//! is the shape of llama.cpp's repacked ("Q4_0 8×8") CPU kernels; it puts ~4× more products
//! in each instruction than a kernel that multiplies one weight row at a time and sums its
//! lanes, which matters once eight sequences decode together.
//!
//! **Arithmetic.** Every activation row is quantised to 8 bits per block of 32 as llama.cpp's
//! `quantize_row_q8_1` does (scale `d_x = max|x| / 127`, rounded half to even, `d_x` and
//! `s_x = d_x·Σq` held as f16 values). One output is then, over the blocks in order,
//! `acc = fma(Σ q_w q_x, d_w·d_x, acc)` and for Q4_1 `acc_m = fma(m_w, s_x, acc_m)`, the output
//! `acc + acc_m` (the offsets apart, as llama.cpp sums its `summs` apart). The sum within a
//! block is exact in integers, and the f32 steps have one defined order, so the AVX-512, AVX2
//! and plain Rust kernels give the same bits on every CPU — the greedy tokens of a model do not
//! depend on the machine (the tests assert equal bits).
//!
//! **The file's own types.** Q4_1 and Q8_0 are packed block for block. Q4_0 and Q5_0 (`d·(q −
//! 8)`, `d·(q − 16)`) are too, each row's integer sum starting at `−8·Σx` or `−16·Σx`. The
//! K-quants Q4_K, Q5_K (per sub-block of 32: `d·sc·q − dmin·m`) and Q6_K (per 16:
//! `d·sc·(q − 32)`) keep their super-blocks of 256: each row's `d` (and `dmin`) once per
//! super-block, then per block of 32 the sub-blocks' scales (six-bit ones a byte each) and
//! the values' nibbles as Q4_1's. A fifth or sixth bit is laid at load in words beside the
//! nibbles ([`fifth_bits`], [`Kind::pack_q6k`]) so that a shift and a mask per group join
//! them. Every type thus takes the file's bytes (Q4_K and Q5_K an eighth of a bit more a
//! weight, for their unpacked scales), where converting them to Q4_1 or Q8_0 took up to 8.5
//! bits a weight — more to read in every memory-bound decode step. Q4_K's and Q5_K's outputs
//! follow Q4_1's arithmetic with `d_w = d·sc` and `m_w = −dmin·m`, exact in f32; Q6_K's
//! sub-block sums are weighed by their scales in integers ([`scalar_q4k`], [`scalar_q6k`]).
//! Q3_K (per 16: `d·(sc − 32)·(u − 4)`, `u` of three bits) is Q6_K's shape with narrower
//! values: packed as Q6_K without the high bits, each `u` a nibble (4.5625 bits a weight
//! against the file's 3.4375: two bits and a bit apart would cost more instructions per
//! group), and multiplied by Q6_K's kernels with `4·Σx` for `32·Σx`. The i-quants have
//! kernels of their own ([`scalar_iq4`]): IQ4_NL as Q4_0's layout, the others as codes into
//! sixteen values per type (IQ4_XS's own, or a grid's values with their signs and shifts,
//! [`IQuant::codes`]) under a scale per 32 or per 16 values. Q2_K (per 16: `d·sc·q − dmin·m`, `q`
//! of two bits) is packed as Q3_K with its mins beside the scales (5.125 bits a weight against
//! the file's 2.625) and multiplied by the same kernels, its mins weighing the halves' `Σx`
//! apart ([`scalar_q6k`]).
//!
//! Q5_1 is converted to Q8_0 at load ([`super::convert`]); f32, f16 and bf16 matrices go
//! through candle's `QMatMul` unchanged.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use half::f16;
use rayon::prelude::*;

use super::SharedOut;
use super::hugepages::WeightBytes;
use super::iquant::{self, Codes, IQ4_CODES, IQuant};
use crate::error::{Error, Result};

/// Values per quantisation block (Q4_1, Q8_0 and the activations' Q8_1).
const QK: usize = 32;
/// Weight rows per packed tile: one 32-bit lane each of a 512-bit register.
const ROWS: usize = 16;
/// Activation rows multiplied with one unpacked tile (AVX2: 16 registers).
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
    /// `{d: f16, qs: [u8; 16]}`: value = d·(q − 8), q in 0..16 (nibbles as Q4_1's). As in the
    /// file, 4.5 bits a weight, where converting it to Q4_1 (`m = −8d`) took 5.
    Q4_0,
    /// `{d: f16, qh: u32, qs: [u8; 16]}`: value = d·(q − 16), q in 0..32 from a nibble and
    /// a bit of `qh`. Packed with its high bits rearranged ([`q5_0_block`]), 5.5 bits a
    /// weight as in the file, where converting it to Q8_0 took 8.5.
    Q5_0,
    /// Super-blocks of 256 `{ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16}`:
    /// value = d·scales[i/16]·(q − 32), q in 0..64 from four low and two high bits. Packed
    /// in its own layout ([`Kind::pack_q6k`]), 6.5625 bits a weight as in the file, where
    /// converting it to Q8_0 took 8.5 (and the load's round trip through f32).
    Q6K,
    /// Super-blocks of 256 `{d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]}`: per
    /// sub-block `s` of 32, value = d·sc_s·q − dmin·m_s with six-bit `sc_s`, `m_s` packed in
    /// `scales`. Packed in its own layout ([`Kind::pack_q4k`]), 4.625 bits a weight (the
    /// file's 4.5, the scales a byte each), where converting it to Q4_1 took 5.
    Q4K,
    /// Q4_K with a fifth bit per value (`qh: [u8; 32]` after the scales): value =
    /// d·sc_s·q − dmin·m_s, q in 0..32. Packed as Q4_K with a word of high bits per block
    /// ([`Kind::pack_q4k`]), 5.625 bits a weight (the file's 5.5), where converting it to
    /// Q8_0 took 8.5 (and the load's round trip through f32).
    Q5K,
    /// Super-blocks of 256 `{hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16}`:
    /// value = d·(sc − 32)·(u − 4), u in 0..8 from two low bits and a high one, a six-bit
    /// `sc` per 16. Q6_K's shape with three-bit values: packed as Q6_K without its high
    /// bits ([`Kind::pack_q3k`]), each `u` a nibble, 4.5625 bits a weight (the file's
    /// 3.4375), where converting it to Q8_0 took 8.5.
    Q3K,
    /// Super-blocks of 256 `{scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16}`: per 16,
    /// value = d·sc·q − dmin·m, q of two bits, `sc` and `m` four each. Packed as Q3_K with
    /// the mins beside the scales and `dmin` beside `d` ([`Kind::pack_q2k`]), each `q` a
    /// nibble, 5.125 bits a weight (the file's 2.625), where converting it to Q8_0 took 8.5.
    Q2K,
    /// IQ4_NL ([`super::iquant`]), `{d: f16, qs: [u8; 16]}` as Q4_0: value =
    /// d·[`iquant::VALUES`]`[q]`. Packed as Q4_0, 4.5 bits a weight as in the file.
    Iq4Nl,
    /// IQ4_XS ([`super::iquant`]), super-blocks of 256: per sub-block `s` of 32, value =
    /// d·(l_s − 32)·[`iquant::VALUES`]`[q]`. Packed in its own layout ([`Kind::pack_coded`]),
    /// 4.3125 bits a weight (the file's 4.25, the sub-blocks' `l_s − 32` a byte each). The
    /// other i-quants with one scale per 32 values (IQ3_S, IQ3_XXS, IQ2_XXS, IQ1_S) are packed
    /// the same way, their values as codes into sixteen of their own ([`IQuant::codes`]):
    /// 4.3125 bits a weight against the file's 3.4375, 3.0625, 2.0625 and 1.5625, the same
    /// values; those with one per 16 (IQ2_S, IQ2_XS, IQ1_M) with both halves' `l`, 4.5625
    /// bits a weight against the file's 2.5625, 2.3125 and 1.75.
    Coded(IQuant),
}

/// Bytes of one Q3_K super-block of 256 weights in a GGUF file.
const Q3K_BLOCK: usize = 110;
/// Bytes of one packed Q3_K block of 32 weights of a tile's sixteen rows: Q6_K's without
/// the words of high bits.
const Q3K_TILE_BLOCK: usize = ROWS * 18;
/// Bytes of one packed Q3_K super-block of a tile: the rows' `d`, then eight blocks.
const Q3K_TILE_SUPER: usize = 2 * ROWS + 8 * Q3K_TILE_BLOCK;
/// Bytes of one Q2_K super-block of 256 weights in a GGUF file.
const Q2K_BLOCK: usize = 84;
/// Bytes of one packed Q2_K block of 32 weights of a tile's sixteen rows: per row the two
/// sub-blocks' scales, then per row their mins, then four groups of nibble bytes.
const Q2K_TILE_BLOCK: usize = ROWS * 20;
/// Bytes of one packed Q2_K super-block of a tile: the rows' `d`, their `dmin`, eight blocks.
const Q2K_TILE_SUPER: usize = 4 * ROWS + 8 * Q2K_TILE_BLOCK;
/// Bytes of one IQ4_XS super-block of 256 weights in a GGUF file.
/// Bytes of one packed IQ4_XS block of 32 weights of a tile's sixteen rows: per row the
/// sub-block's `l − 32` (`i8`), then four groups of nibble bytes as Q4_1's.
const IQ4XS_TILE_BLOCK: usize = ROWS * 17;
/// Bytes of one packed IQ4_XS super-block of a tile: the rows' `d` (f16), then eight blocks.
const IQ4XS_TILE_SUPER: usize = 2 * ROWS + 8 * IQ4XS_TILE_BLOCK;
/// Bytes of one packed block of an i-quant scaled per 16 (IQ2_S, IQ2_XS, IQ1_M): per row the
/// first 16 values' `l`, then per row the second's, then four groups of nibble bytes.
const IQ16_TILE_BLOCK: usize = ROWS * 18;
/// Bytes of one such packed super-block: the rows' `d` (f16), then eight blocks.
const IQ16_TILE_SUPER: usize = 2 * ROWS + 8 * IQ16_TILE_BLOCK;

/// A coded i-quant tile's block and super-block bytes, and where a block's codes start
/// (after one `l` per row, or two where it scales per 16).
const fn coded_layout(per_16: bool) -> (usize, usize, usize) {
    if per_16 {
        (IQ16_TILE_BLOCK, IQ16_TILE_SUPER, 2 * ROWS)
    } else {
        (IQ4XS_TILE_BLOCK, IQ4XS_TILE_SUPER, ROWS)
    }
}

/// Bytes of one Q6_K super-block of 256 weights in a GGUF file.
const Q6K_BLOCK: usize = 210;
/// Bytes of one packed Q6_K block of 32 weights of a tile's sixteen rows: per row the two
/// sub-block scales (`i8`), then four groups of nibble bytes (as Q4_1's: element `i` low,
/// `i + 16` high) and two words of high bits.
const Q6K_TILE_BLOCK: usize = ROWS * 26;
/// Bytes of one packed Q6_K super-block of a tile: the rows' `d` (f16), then eight blocks.
const Q6K_TILE_SUPER: usize = 2 * ROWS + 8 * Q6K_TILE_BLOCK;
/// Bytes of one Q4_K super-block of 256 weights in a GGUF file.
const Q4K_BLOCK: usize = 144;
/// Bytes of one packed Q4_K block of 32 weights of a tile's sixteen rows: per row the
/// sub-block's `sc` and `m` (a byte each), then four groups of nibble bytes as Q4_1's.
const Q4K_TILE_BLOCK: usize = ROWS * 18;
/// Bytes of one packed Q4_K super-block of a tile: the rows' `d`, then their `dmin` (f16),
/// then eight blocks.
const Q4K_TILE_SUPER: usize = 4 * ROWS + 8 * Q4K_TILE_BLOCK;
/// Bytes of one Q5_K super-block of 256 weights in a GGUF file.
const Q5K_BLOCK: usize = 176;
/// Bytes of one packed Q5_K block: Q4_K's and a word of high bits per row.
const Q5K_TILE_BLOCK: usize = ROWS * 22;
/// Bytes of one packed Q5_K super-block of a tile.
const Q5K_TILE_SUPER: usize = 4 * ROWS + 8 * Q5K_TILE_BLOCK;

impl Kind {
    /// The kind of a GGUF tensor our kernels take.
    fn of(t: &QTensor) -> Option<Kind> {
        match t.dtype() {
            GgmlDType::Q4_1 => Some(Kind::Q4_1),
            GgmlDType::Q8_0 => Some(Kind::Q8_0),
            GgmlDType::Q6K => Some(Kind::Q6K),
            GgmlDType::Q4K => Some(Kind::Q4K),
            GgmlDType::Q4_0 => Some(Kind::Q4_0),
            GgmlDType::Q5_0 => Some(Kind::Q5_0),
            GgmlDType::Q5K => Some(Kind::Q5K),
            GgmlDType::Q3K => Some(Kind::Q3K),
            GgmlDType::Q2K => Some(Kind::Q2K),
            // The i-quants' stand-ins (`iquant.rs`), whose storage holds their own bytes.
            _ => match IQuant::of(t)? {
                IQuant::Iq4Nl => Some(Kind::Iq4Nl),
                iq => iq.codes().map(|_| Kind::Coded(iq)),
            },
        }
    }

    /// Bytes of one block (32 weights of one row) of Q4_1, Q8_0, Q4_0 or Q5_0, in the file and
    /// in a lane of a packed tile.
    fn block_bytes(self) -> usize {
        match self {
            Kind::Q4_1 => 20,
            Kind::Q8_0 => 34,
            Kind::Q4_0 | Kind::Iq4Nl => 18,
            Kind::Q5_0 => 22,
            Kind::Q6K | Kind::Q4K | Kind::Q5K | Kind::Q3K | Kind::Q2K | Kind::Coded(_) => {
                unreachable!("K-quant blocks are of 256 weights")
            }
        }
    }

    /// For a K-quant, the bytes of one super-block of 256 weights in a GGUF row and of a
    /// packed tile's sixteen rows.
    fn super_bytes(self) -> Option<(usize, usize)> {
        match self {
            Kind::Q6K => Some((Q6K_BLOCK, Q6K_TILE_SUPER)),
            Kind::Q4K => Some((Q4K_BLOCK, Q4K_TILE_SUPER)),
            Kind::Q5K => Some((Q5K_BLOCK, Q5K_TILE_SUPER)),
            Kind::Q3K => Some((Q3K_BLOCK, Q3K_TILE_SUPER)),
            Kind::Q2K => Some((Q2K_BLOCK, Q2K_TILE_SUPER)),
            Kind::Coded(iq) => Some((iq.block_bytes(), coded_layout(iq.scale_per_16()).1)),
            Kind::Q4_1 | Kind::Q8_0 | Kind::Q4_0 | Kind::Q5_0 | Kind::Iq4Nl => None,
        }
    }

    /// Bytes of one GGUF row of `k` weights.
    fn row_bytes(self, k: usize) -> usize {
        match self.super_bytes() {
            Some((raw, _)) => k / 256 * raw,
            None => k / QK * self.block_bytes(),
        }
    }

    /// Bytes of one packed tile of [`ROWS`] rows of `k` weights.
    fn tile_bytes(self, k: usize) -> usize {
        match self.super_bytes() {
            Some((_, tile)) => k / 256 * tile,
            None => k / QK * ROWS * self.block_bytes(),
        }
    }

    /// The weights of `k` a kind takes in whole blocks.
    fn block_of(self) -> usize {
        match self.super_bytes() {
            Some(_) => 256,
            None => QK,
        }
    }

    /// Q4_0's and Q5_0's values are `q` less this; the i-quants' codes stand for values
    /// this less than the bytes their AVX-512 kernels multiply (each value plus 128).
    /// Q6_K's and Q3_K's values are `q` less this.
    fn offset(self) -> i32 {
        match self {
            Kind::Q5_0 => 16,
            Kind::Q6K => 32,
            Kind::Q3K => 4,
            Kind::Q2K => 0,
            Kind::Iq4Nl | Kind::Coded(_) => 128,
            _ => 8,
        }
    }

    /// f16 values leading a Q4_1, Q8_0, Q4_0 or Q5_0 block: `d` (and `m`).
    fn scales(self) -> usize {
        match self {
            Kind::Q4_1 => 2,
            _ => 1,
        }
    }

    /// Groups of four bytes in a block's `qs`.
    fn groups(self) -> usize {
        (self.block_bytes() - 2 * self.scales()) / 4
    }

    /// Where group `g` of lane `lane` sits in a packed tile block.
    fn group_at(self, g: usize, lane: usize) -> usize {
        2 * ROWS * self.scales() + 4 * (ROWS * g + lane)
    }

    /// Copies one GGUF block into lane `lane` of a packed tile block.
    fn pack_block(self, raw: &[u8], tile: &mut [u8], lane: usize) {
        for s in 0..self.scales() {
            tile[2 * (ROWS * s + lane)..][..2].copy_from_slice(&raw[2 * s..2 * s + 2]);
        }
        let qs = &raw[2 * self.scales()..];
        for g in 0..self.groups() {
            tile[self.group_at(g, lane)..][..4].copy_from_slice(&qs[4 * g..4 * g + 4]);
        }
    }

    /// The GGUF block in lane `lane` of a packed tile block ([`Kind::pack_block`] undone).
    fn unpack_block(self, tile: &[u8], lane: usize, raw: &mut [u8]) {
        for s in 0..self.scales() {
            raw[2 * s..2 * s + 2].copy_from_slice(&tile[2 * (ROWS * s + lane)..][..2]);
        }
        let qs = &mut raw[2 * self.scales()..];
        for g in 0..self.groups() {
            qs[4 * g..4 * g + 4].copy_from_slice(&tile[self.group_at(g, lane)..][..4]);
        }
    }

    /// GGUF rows (`n` rows of `k / 32` blocks) in tiles of [`ROWS`] rows; the rows that pad
    /// the last tile are zero (scale 0: their outputs are 0 and dropped).
    /// Tiles in parallel: each writes its own part of the output, whose fresh pages the
    /// kernel zeroes as they are first written (a quarter of a 1B model's load on one thread).
    fn pack(self, n: usize, k: usize, raw: &[u8]) -> WeightBytes {
        let mut out = WeightBytes::zeroed(n.div_ceil(ROWS) * self.tile_bytes(k));
        let row_bytes = self.row_bytes(k);
        out.par_chunks_mut(self.tile_bytes(k))
            .enumerate()
            .for_each(|(t, tile)| {
                for lane in 0..ROWS.min(n.saturating_sub(t * ROWS)) {
                    let j = t * ROWS + lane;
                    let row = &raw[j * row_bytes..(j + 1) * row_bytes];
                    if let Some((raw, packed)) = self.super_bytes() {
                        for (s, sb) in row.chunks_exact(raw).enumerate() {
                            let to = &mut tile[s * packed..];
                            match self {
                                Kind::Q6K => Kind::pack_q6k(sb, to, lane),
                                Kind::Q3K => Kind::pack_q3k(sb, to, lane),
                                Kind::Q2K => Kind::pack_q2k(sb, to, lane),
                                Kind::Coded(iq) => {
                                    let per_16 = iq.scale_per_16();
                                    Kind::pack_coded(&iq.code_block(sb), per_16, to, lane)
                                }
                                _ => self.pack_q4k(sb, to, lane),
                            }
                        }
                        continue;
                    }
                    let bb = self.block_bytes();
                    for (b, blk) in row.chunks_exact(bb).enumerate() {
                        let to = &mut tile[b * ROWS * bb..(b + 1) * ROWS * bb];
                        match self {
                            Kind::Q5_0 => self.pack_block(&q5_0_block(blk), to, lane),
                            _ => self.pack_block(blk, to, lane),
                        }
                    }
                }
            });
        out
    }

    /// One GGUF Q6_K super-block into lane `lane` of a packed tile super-block: `d` in
    /// bytes `2·lane`, then per block of 32 (`Q6K_TILE_BLOCK` bytes from `2·ROWS`) the
    /// lane's two scales at `2·lane`, nibble group `g` (bytes `4g..4g+4` of
    /// `q[i] & 15 | (q[i+16] & 15) << 4`) at `2·ROWS + 64g + 4·lane`, and the high bits
    /// of elements `0..16` and `16..32` as words 4 and 5: byte `e` of a word holds element
    /// `4g + e`'s two high bits at bits `2g`, so that one shift and mask puts group `g`'s
    /// beside its nibbles.
    fn pack_q6k(raw: &[u8], sup: &mut [u8], lane: usize) {
        let (q, scales, d) = q6k_values(raw);
        sup[2 * lane..2 * lane + 2].copy_from_slice(&d);
        for b in 0..8 {
            let blk = &mut sup[2 * ROWS + b * Q6K_TILE_BLOCK..][..Q6K_TILE_BLOCK];
            blk[2 * lane] = scales[2 * b] as u8;
            blk[2 * lane + 1] = scales[2 * b + 1] as u8;
            let q = &q[32 * b..32 * b + 32];
            for g in 0..4 {
                for e in 0..4 {
                    let i = 4 * g + e;
                    blk[2 * ROWS + 64 * g + 4 * lane + e] = (q[i] & 15) | (q[i + 16] & 15) << 4;
                    blk[2 * ROWS + 256 + 4 * lane + e] |= (q[i] >> 4) << (2 * g);
                    blk[2 * ROWS + 320 + 4 * lane + e] |= (q[i + 16] >> 4) << (2 * g);
                }
            }
        }
    }

    /// One GGUF Q3_K super-block into lane `lane` of a packed tile super-block, laid out as
    /// [`Kind::pack_q6k`] lays Q6_K's without the words of high bits: `d` in bytes `2·lane`,
    /// then per block of 32 (`Q3K_TILE_BLOCK` bytes from `2·ROWS`) the lane's two scales
    /// (`sc − 32`) at `2·lane` and nibble group `g` (bytes `4g..4g+4` of `u[i] | u[i+16] <<
    /// 4`) at `2·ROWS + 64g + 4·lane`.
    fn pack_q3k(raw: &[u8], sup: &mut [u8], lane: usize) {
        let (u, scales, d) = q3k_values(raw);
        sup[2 * lane..2 * lane + 2].copy_from_slice(&d);
        for b in 0..8 {
            let blk = &mut sup[2 * ROWS + b * Q3K_TILE_BLOCK..][..Q3K_TILE_BLOCK];
            blk[2 * lane] = scales[2 * b] as u8;
            blk[2 * lane + 1] = scales[2 * b + 1] as u8;
            let u = &u[32 * b..32 * b + 32];
            for i in 0..16 {
                blk[2 * ROWS + 64 * (i / 4) + 4 * lane + i % 4] = u[i] | u[i + 16] << 4;
            }
        }
    }

    /// One GGUF Q2_K super-block into lane `lane` of a packed tile super-block: `d` in
    /// bytes `2·lane`, `dmin` in `2·ROWS + 2·lane`, then per block of 32 (`Q2K_TILE_BLOCK`
    /// bytes from `4·ROWS`) the lane's two scales at `2·lane`, its two mins at `2·ROWS +
    /// 2·lane`, and nibble group `g` (bytes `4g..4g+4` of `q[i] | q[i+16] << 4`) at `4·ROWS +
    /// 64g + 4·lane`.
    fn pack_q2k(raw: &[u8], sup: &mut [u8], lane: usize) {
        let (q, scales) = q2k_values(raw);
        sup[2 * lane..2 * lane + 2].copy_from_slice(&raw[80..82]);
        sup[2 * (ROWS + lane)..2 * (ROWS + lane) + 2].copy_from_slice(&raw[82..84]);
        for b in 0..8 {
            let blk = &mut sup[4 * ROWS + b * Q2K_TILE_BLOCK..][..Q2K_TILE_BLOCK];
            for h in 0..2 {
                blk[2 * lane + h] = scales[2 * b + h] & 15;
                blk[2 * (ROWS + lane) + h] = scales[2 * b + h] >> 4;
            }
            let q = &q[32 * b..32 * b + 32];
            for i in 0..16 {
                blk[4 * ROWS + 64 * (i / 4) + 4 * lane + i % 4] = q[i] | q[i + 16] << 4;
            }
        }
    }

    /// Bytes of one packed block of 32 of a Q6_K, Q3_K or Q2_K tile's sixteen rows.
    fn six_tile_block(self) -> usize {
        match self {
            Kind::Q3K => Q3K_TILE_BLOCK,
            Kind::Q2K => Q2K_TILE_BLOCK,
            _ => Q6K_TILE_BLOCK,
        }
    }

    /// Bytes before the blocks of a packed Q6_K, Q3_K or Q2_K super-block (the rows' `d`, and
    /// Q2_K's `dmin`), which are also the bytes before each block's nibble groups (the rows'
    /// scales, and Q2_K's mins).
    fn six_head(self) -> usize {
        match self {
            Kind::Q2K => 4 * ROWS,
            _ => 2 * ROWS,
        }
    }

    /// Bytes of one packed block of 32 of a Q4_K or Q5_K tile's sixteen rows.
    fn k_tile_block(self) -> usize {
        match self {
            Kind::Q5K => Q5K_TILE_BLOCK,
            _ => Q4K_TILE_BLOCK,
        }
    }

    /// One GGUF Q4_K or Q5_K super-block into lane `lane` of a packed tile super-block: `d`
    /// in bytes `2·lane`, `dmin` in `2·ROWS + 2·lane`, then per block of 32
    /// ([`Kind::k_tile_block`] bytes from `4·ROWS`) the lane's `sc` and `m` at `2·lane`,
    /// nibble group `g` (bytes `4g..4g+4` of `q[i] & 15 | (q[i+16] & 15) << 4`, as Q4_1's)
    /// at `2·ROWS + 64g + 4·lane`, and for Q5_K the fifth bits as a word at `2·ROWS + 256 +
    /// 4·lane` laid out as [`fifth_bits`] lays them.
    fn pack_q4k(self, raw: &[u8], sup: &mut [u8], lane: usize) {
        sup[2 * lane..2 * lane + 2].copy_from_slice(&raw[..2]);
        sup[2 * (ROWS + lane)..2 * (ROWS + lane) + 2].copy_from_slice(&raw[2..4]);
        // Q5_K: `qh[l]` holds bit 4 of element `l` of sub-block `b` at bit `b`.
        let (qh, qs) = match self {
            Kind::Q5K => (Some(&raw[16..48]), &raw[48..176]),
            _ => (None, &raw[16..144]),
        };
        let tb = self.k_tile_block();
        for b in 0..8 {
            let blk = &mut sup[4 * ROWS + b * tb..][..tb];
            (blk[2 * lane], blk[2 * lane + 1]) = scale_min_k4(b, &raw[4..16]);
            // Sub-block `b`'s nibbles: bytes `32·(b/2)..`, low for even `b`, high for odd.
            let bytes = &qs[32 * (b / 2)..][..32];
            let q = |i: usize| {
                let nib = if b % 2 == 0 {
                    bytes[i] & 15
                } else {
                    bytes[i] >> 4
                };
                nib | qh.map_or(0, |qh| ((qh[i] >> b) & 1) << 4)
            };
            for i in 0..16 {
                blk[2 * ROWS + 64 * (i / 4) + 4 * lane + i % 4] = (q(i) & 15) | q(i + 16) << 4;
            }
            if qh.is_some() {
                let q: [u8; 32] = std::array::from_fn(q);
                blk[2 * ROWS + 256 + 4 * lane..][..4].copy_from_slice(&fifth_bits(&q));
            }
        }
    }

    /// Element `i` of block `b` of lane `lane` in a packed Q4_K or Q5_K tile super-block,
    /// with the sub-block's `sc` and `m` ([`Kind::pack_q4k`] undone).
    fn q4k_at(self, sup: &[u8], lane: usize, b: usize, i: usize) -> (u8, u8, u8) {
        let blk = &sup[4 * ROWS + b * self.k_tile_block()..];
        let nib = blk[2 * ROWS + 64 * ((i % 16) / 4) + 4 * lane + i % 4];
        let mut q = if i >= 16 { nib >> 4 } else { nib & 15 };
        if self == Kind::Q5K {
            q |= fifth_bit(&blk[2 * ROWS + 256 + 4 * lane..][..4], i) << 4;
        }
        (q, blk[2 * lane], blk[2 * lane + 1])
    }

    /// One super-block of codes (an IQ4_XS super-block's, [`IQuant::code_block`]) into lane
    /// `lane` of a packed tile super-block: `d` in bytes `2·lane`, then per block of 32
    /// (`IQ4XS_TILE_BLOCK` bytes from `2·ROWS`) the sub-block's `l` (IQ4_XS: `l − 32`) at
    /// `lane` and its nibble group `g` (bytes `4g..4g+4` of the codes, which hold element `i`
    /// low and `i + 16` high, as Q4_1's) at `ROWS + 64g + 4·lane`.
    /// `per_16` (a type scaled per 16): the block's two `l`, each for all rows, before its
    /// codes, which start at `2·ROWS`.
    fn pack_coded(raw: &iquant::CodedBlock, per_16: bool, sup: &mut [u8], lane: usize) {
        let (block, _, head) = coded_layout(per_16);
        sup[2 * lane..2 * lane + 2].copy_from_slice(&raw.d);
        for b in 0..8 {
            let blk = &mut sup[2 * ROWS + b * block..][..block];
            blk[lane] = raw.l[b][0] as u8;
            if per_16 {
                blk[ROWS + lane] = raw.l[b][1] as u8;
            }
            let qs = &raw.qs[b];
            for g in 0..4 {
                blk[head + 64 * g + 4 * lane..][..4].copy_from_slice(&qs[4 * g..4 * g + 4]);
            }
        }
    }

    /// Element `i`'s code of block `b` of lane `lane` in a packed coded tile super-block,
    /// and the `l` it takes ([`Kind::pack_coded`] undone).
    fn coded_at(sup: &[u8], per_16: bool, lane: usize, b: usize, i: usize) -> (u8, i8) {
        let (block, _, head) = coded_layout(per_16);
        let blk = &sup[2 * ROWS + b * block..];
        let byte = blk[head + 64 * ((i % 16) / 4) + 4 * lane + i % 4];
        let l = if per_16 && i >= 16 {
            blk[ROWS + lane]
        } else {
            blk[lane]
        };
        ((byte >> (4 * (i / 16))) & 15, l as i8)
    }

    /// Element `i` of block `b` of lane `lane` in a packed Q6_K (Q3_K, Q2_K) tile
    /// super-block, the sub-block scale it takes and Q2_K's min (0 for the others)
    /// ([`Kind::pack_q6k`], [`Kind::pack_q3k`], [`Kind::pack_q2k`] undone).
    fn q6k_at(self, sup: &[u8], lane: usize, b: usize, i: usize) -> (u8, i8, u8) {
        let blk = &sup[self.six_head() + b * self.six_tile_block()..];
        let (g, e, high) = ((i % 16) / 4, i % 4, i >= 16);
        let words = self.six_head();
        let nib = blk[words + 64 * g + 4 * lane + e];
        let nib = if high { nib >> 4 } else { nib & 15 };
        let (hi, min) = match self {
            Kind::Q3K => (0, 0),
            Kind::Q2K => (0, blk[2 * (ROWS + lane) + high as usize]),
            _ => (
                (blk[words + 256 + 64 * high as usize + 4 * lane + e] >> (2 * g)) & 3,
                0,
            ),
        };
        (nib | hi << 4, blk[2 * lane + high as usize] as i8, min)
    }
}

/// The fifth bits of a block's 32 values `q` (0..32) as the five-bit kernels read them: byte
/// `e` holds element `4g + e`'s at bit `g` and element `16 + 4g + e`'s at bit `4 + g`, so
/// that one shift and mask of the word puts nibble group `g`'s beside its nibbles.
fn fifth_bits(q: &[u8; 32]) -> [u8; 4] {
    let mut h = [0u8; 4];
    for g in 0..4 {
        for (e, h) in h.iter_mut().enumerate() {
            *h |= ((q[4 * g + e] >> 4) & 1) << g | ((q[16 + 4 * g + e] >> 4) & 1) << (4 + g);
        }
    }
    h
}

/// Element `i`'s fifth bit in a word of [`fifth_bits`].
fn fifth_bit(h: &[u8], i: usize) -> u8 {
    let (g, e) = ((i % 16) / 4, i % 4);
    (h[e] >> (g + 4 * (i / 16))) & 1
}

/// A GGUF Q5_0 block `{d, qh, qs}` as a packed lane holds it: `{d, qs, fifth_bits}` (the
/// nibbles as they are: element `j` low and `j + 16` high in byte `j`, as Q4_1's).
fn q5_0_block(raw: &[u8]) -> [u8; 22] {
    let qh = u32::from_le_bytes([raw[2], raw[3], raw[4], raw[5]]);
    let q: [u8; 32] = std::array::from_fn(|i| (((qh >> i) & 1) as u8) << 4);
    let mut out = [0u8; 22];
    out[..2].copy_from_slice(&raw[..2]);
    out[2..18].copy_from_slice(&raw[6..22]);
    out[18..].copy_from_slice(&fifth_bits(&q));
    out
}

/// Sub-block `j`'s six-bit scale and min of a K-quant's packed 12 bytes (ggml's
/// `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// A GGUF Q6_K super-block's 256 values `q` (0..64), its sixteen scales and its `d` (as
/// ggml's `dequantize_row_q6_K` reads them: value `i` = `d·scales[i/16]·(q[i] − 32)`).
fn q6k_values(raw: &[u8]) -> ([u8; 256], [i8; 16], [u8; 2]) {
    let (ql, qh) = (&raw[..128], &raw[128..192]);
    let mut q = [0u8; 256];
    for half in 0..2 {
        let (ql, qh, y) = (&ql[64 * half..], &qh[32 * half..], 128 * half);
        for l in 0..32 {
            q[y + l] = (ql[l] & 15) | (qh[l] & 3) << 4;
            q[y + l + 32] = (ql[l + 32] & 15) | ((qh[l] >> 2) & 3) << 4;
            q[y + l + 64] = (ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4;
            q[y + l + 96] = (ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4;
        }
    }
    let scales = std::array::from_fn(|i| raw[192 + i] as i8);
    (q, scales, [raw[208], raw[209]])
}

/// A GGUF Q3_K super-block's 256 values `u` (0..8), its sixteen scales `sc − 32` and its
/// `d`, as ggml's `dequantize_row_q3_K` reads them: value `i` = `d·(sc[i/16] − 32)·(u[i] −
/// 4)`, `u` of element `128h + 32j + l` (`l < 32`) from bits `2j` of `qs[32h + l]` and bit
/// `4h + j` of `hmask[l]`; scale `j`'s low four bits a nibble of `scales[j % 8]` (the high
/// one from `j = 8`), its high two bits those at `2·(j/4)` of `scales[8 + j % 4]`.
fn q3k_values(raw: &[u8]) -> ([u8; 256], [i8; 16], [u8; 2]) {
    let (hm, qs, sc) = (&raw[..32], &raw[32..96], &raw[96..108]);
    let u = std::array::from_fn(|i| {
        let (h, j, l) = (i / 128, (i % 128) / 32, i % 32);
        ((qs[32 * h + l] >> (2 * j)) & 3) | ((hm[l] >> (4 * h + j)) & 1) << 2
    });
    let scales = std::array::from_fn(|j| {
        let low = if j < 8 { sc[j] & 15 } else { sc[j - 8] >> 4 };
        let high = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
        (low | high << 4) as i8 - 32
    });
    (u, scales, [raw[108], raw[109]])
}

/// A GGUF Q2_K super-block's 256 values `q` (0..4) and its sixteen bytes of scales (low
/// nibble) and mins (high), as ggml's `dequantize_row_q2_K` reads them: value `i` =
/// `d·sc·q[i] − dmin·m` of byte `i/16`, `q` of element `128h + 32j + l` (`l < 32`) bits
/// `2j` of `qs[32h + l]`.
fn q2k_values(raw: &[u8]) -> ([u8; 256], [u8; 16]) {
    let qs = &raw[16..80];
    let q = std::array::from_fn(|i| {
        let (h, j, l) = (i / 128, (i % 128) / 32, i % 32);
        (qs[32 * h + l] >> (2 * j)) & 3
    });
    (q, std::array::from_fn(|i| raw[i]))
}

/// A weight matrix of `n` output rows by `k` inputs, multiplied as `x · Wᵀ`.
pub(super) enum QMat {
    /// GGUF blocks packed in tiles of [`ROWS`] rows ([`Kind::pack`]), for our kernels.
    Own {
        kind: Kind,
        n: usize,
        k: usize,
        /// On huge pages where the system gives them ([`WeightBytes`]).
        data: WeightBytes,
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
    /// Per block: `Σq`, exact (the VNNI Q8_0 kernel takes `128·Σq` off its unsigned products).
    sums: Vec<i32>,
    /// Per block: the sums of its first and its last sixteen `q` as two `i16` (low, high
    /// half of the word), which the Q6_K kernels weigh by the sub-blocks' scales to take
    /// `32·Σq` off their unsigned products. Made by [`Acts::halves`] for a Q6_K product
    /// only: made in every quantisation, it cost SmolLM2 (no Q6_K) a few percent of its
    /// prompt speed.
    halves: std::sync::OnceLock<Vec<i32>>,
}

impl Acts {
    /// Quantises `m` rows of `k` values (`k` a multiple of 32), as llama.cpp's AVX2
    /// `quantize_row_q8_1`.
    pub(super) fn quantize(x: &[f32], m: usize, k: usize) -> Acts {
        debug_assert_eq!(x.len(), m * k);
        debug_assert_eq!(k % QK, 0);
        let mut qs = vec![0i8; m * k];
        let mut ds = Vec::with_capacity(m * k / QK);
        let mut sums = Vec::with_capacity(m * k / QK);
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
            sums.push(sum);
        }
        Acts {
            m,
            k,
            qs,
            ds,
            sums,
            halves: std::sync::OnceLock::new(),
        }
    }

    /// [`Acts::halves`], made on first use.
    fn halves(&self) -> &[i32] {
        self.halves.get_or_init(|| {
            self.qs
                .chunks_exact(QK)
                .zip(&self.sums)
                .map(|(qb, sum)| {
                    // |Σ| ≤ 16·127: each fits an i16.
                    let first: i32 = qb[..16].iter().map(|&q| q as i32).sum();
                    (first as u16 as i32) | ((sum - first) << 16)
                })
                .collect()
        })
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

/// The rows and the GGUF blocks of `t`, a `(n, k)` tensor of `kind`, checked against its shape.
fn gguf_blocks(t: &QTensor, kind: Kind) -> Result<(usize, std::borrow::Cow<'_, [u8]>)> {
    let (n, k) = t.shape().dims2()?;
    let raw = t.data()?;
    if !k.is_multiple_of(kind.block_of()) || raw.len() != n * kind.row_bytes(k) {
        return Err(Error::Model(format!(
            "a {kind:?} tensor of shape ({n}, {k}) holds {} bytes",
            raw.len()
        )));
    }
    Ok((n, raw))
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

impl QMat {
    /// Takes a 2-D GGUF tensor of shape `(n, k)`.
    pub(super) fn from_qtensor(t: QTensor) -> Result<QMat> {
        QMat::from_qtensors(vec![t])
    }

    /// One matrix whose outputs are those of `tensors` side by side (all of shape `(_, k)`).
    /// Tensors of one type that our kernels take are packed as one matrix, so that a fused
    /// product is one pass over the threads; mixed types stay apart ([`QMat::Stack`]). The
    /// GGUF rows are joined before packing, so that only the fused matrix takes memory among
    /// the weights ([`WeightBytes`] are never given back one by one).
    /// Quantised types without a kernel of ours are converted first
    /// ([`super::convert::to_kernel_types`]).
    pub(super) fn from_qtensors(tensors: Vec<QTensor>) -> Result<QMat> {
        let tensors = super::convert::to_kernel_types(tensors)?;
        let Some(first) = tensors.first() else {
            return Ok(QMat::Stack(Vec::new()));
        };
        let (kind, (_, k)) = (Kind::of(first), first.shape().dims2()?);
        let mut same = true;
        for t in &tensors {
            same &= Kind::of(t) == kind && t.shape().dims2()?.1 == k;
        }
        match kind {
            Some(kind) if same => {
                let (n, blocks) = match tensors.as_slice() {
                    [t] => gguf_blocks(t, kind)?,
                    _ => {
                        let (mut n, mut joined) = (0, Vec::new());
                        for t in &tensors {
                            let (tn, blocks) = gguf_blocks(t, kind)?;
                            n += tn;
                            joined.extend_from_slice(&blocks);
                        }
                        (n, std::borrow::Cow::Owned(joined))
                    }
                };
                Ok(QMat::Own {
                    kind,
                    n,
                    k,
                    data: kind.pack(n, k, &blocks),
                })
            }
            _ if tensors.len() == 1 => {
                let (n, k) = first.shape().dims2()?;
                let t = tensors.into_iter().next().expect("one tensor");
                Ok(QMat::Candle {
                    mm: QMatMul::from_qtensor(t)?,
                    n,
                    k,
                })
            }
            _ => Ok(QMat::Stack(
                tensors
                    .into_iter()
                    .map(QMat::from_qtensor)
                    .collect::<Result<_>>()?,
            )),
        }
    }

    /// The GGUF bytes of block `b` of row `j` (an `Own` matrix only).
    fn raw_block(&self, j: usize, b: usize, out: &mut [u8]) {
        let QMat::Own { kind, k, data, .. } = self else {
            unreachable!("raw_block of a candle matrix")
        };
        let tb = ROWS * kind.block_bytes();
        let at = (j / ROWS) * kind.tile_bytes(*k) + b * tb;
        kind.unpack_block(&data[at..at + tb], j % ROWS, out);
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
        if matches!(kind, Kind::Q6K | Kind::Q3K | Kind::Q2K) {
            let tile = &data[(j / ROWS) * kind.tile_bytes(*k)..];
            let packed = kind.super_bytes().expect("a K-quant").1;
            for (s, o) in out[..*k].chunks_exact_mut(256).enumerate() {
                let sup = &tile[s * packed..];
                let d = f16_at(sup, 2 * (j % ROWS));
                for (i, o) in o.iter_mut().enumerate() {
                    let (q, sc, m) = kind.q6k_at(sup, j % ROWS, i / 32, i % 32);
                    *o = match kind {
                        // As ggml's `dequantize_row_q2_K`: `(d·sc)·q − dmin·m`.
                        Kind::Q2K => {
                            let dmin = f16_at(sup, 2 * (ROWS + j % ROWS));
                            d * sc as f32 * q as f32 - dmin * m as f32
                        }
                        _ => d * sc as f32 * (q as i32 - kind.offset()) as f32,
                    };
                }
            }
            return Some(());
        }
        if let Kind::Coded(iq) = kind {
            let codes = iq.codes().expect("a coded i-quant");
            let tile = &data[(j / ROWS) * kind.tile_bytes(*k)..];
            let per_16 = iq.scale_per_16();
            for (s, o) in out[..*k].chunks_exact_mut(256).enumerate() {
                let sup = &tile[s * coded_layout(per_16).1..];
                let d = f16_at(sup, 2 * (j % ROWS));
                for (i, o) in o.iter_mut().enumerate() {
                    // As ggml's `dequantize_row_iq4_xs`: `d·(l − 32)`, then the value (the
                    // factor, a power of two, changes no bit).
                    let (q, sc) = Kind::coded_at(sup, per_16, j % ROWS, i / 32, i % 32);
                    *o = d * sc as f32 * codes.values[q as usize] as f32 * codes.factor;
                }
            }
            return Some(());
        }
        if let Some((_, packed)) = kind.super_bytes() {
            // Q4_K or Q5_K.
            let tile = &data[(j / ROWS) * kind.tile_bytes(*k)..];
            let lane = j % ROWS;
            for (s, o) in out[..*k].chunks_exact_mut(256).enumerate() {
                let sup = &tile[s * packed..];
                let (d, dmin) = (f16_at(sup, 2 * lane), f16_at(sup, 2 * (ROWS + lane)));
                for (i, o) in o.iter_mut().enumerate() {
                    // As ggml's `dequantize_row_q4_K` and `_q5_K`.
                    let (q, sc, m) = kind.q4k_at(sup, lane, i / 32, i % 32);
                    *o = d * sc as f32 * q as f32 - dmin * m as f32;
                }
            }
            return Some(());
        }
        let mut blk = [0u8; 34];
        let blk = &mut blk[..kind.block_bytes()];
        for (b, o) in out[..*k].chunks_exact_mut(QK).enumerate() {
            self.raw_block(j, b, blk);
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
                Kind::Q4_0 | Kind::Q5_0 => {
                    let d = f16_at(blk, 0);
                    let (five, offset) = (*kind == Kind::Q5_0, kind.offset());
                    for (i, o) in o.iter_mut().enumerate() {
                        let nib = blk[2 + i % 16] >> (4 * (i / 16)) & 15;
                        let q = if five {
                            nib | fifth_bit(&blk[18..], i) << 4
                        } else {
                            nib
                        };
                        *o = (q as i32 - offset) as f32 * d;
                    }
                }
                Kind::Iq4Nl => {
                    let d = f16_at(blk, 0);
                    for (i, o) in o.iter_mut().enumerate() {
                        let q = blk[2 + i % 16] >> (4 * (i / 16)) & 15;
                        *o = d * iquant::VALUES[q as usize] as f32;
                    }
                }
                Kind::Q6K | Kind::Q4K | Kind::Q5K | Kind::Q3K | Kind::Q2K | Kind::Coded(_) => {
                    unreachable!("super-block rows are read above")
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
                Ok(self.forward_quantized(&acts, Isa::detect()))
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

    /// [`QMat::forward`] of rows already quantised (an `Own` matrix only), with the kernels
    /// of `isa` (which the CPU must run).
    fn forward_quantized(&self, acts: &Acts, isa: Isa) -> Vec<f32> {
        let QMat::Own { kind, n, k, data } = self else {
            unreachable!("forward_quantized on a candle matrix")
        };
        let (n, m) = (*n, acts.m);
        debug_assert_eq!(acts.k, *k);
        if m == 0 || n == 0 {
            return Vec::new();
        }
        let tile_bytes = kind.tile_bytes(*k);
        let tiles = n.div_ceil(ROWS);
        // Not zero-filled: every element is written below (each tile's columns of every row).
        // Zeroing it first was a serial pass on the forward thread while the other waited:
        // ~6.5 MB a step at 8 sequences, the head's 1.5 MB of logits among them.
        if matches!(kind, Kind::Q6K | Kind::Q3K | Kind::Q2K) {
            // Made here, before the threads read them.
            acts.halves();
        }
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        let threads = rayon::current_num_threads().max(1);
        // A few chunks per thread, so that a thread slowed by other work is made up for: four
        // for a row or two (bound by reading the weights, which longer runs read better), eight
        // from four rows up (bound by arithmetic, where the last chunk's wait is what counts).
        // Eight for every product: 8 sequences +0.4–3.8%, one sequence −1–6% (four
        // alternating pairs); eight from four rows: 8 sequences ahead in 4 of 5 pairs (medians
        // 1132 against 1116 tok/s), 4 sequences even.
        let per_thread = if m >= 4 { 8 } else { 4 };
        let chunk = tiles.div_ceil(threads * per_thread);
        let dst = SharedOut(out.as_mut_ptr());
        (0..tiles.div_ceil(chunk)).into_par_iter().for_each(|c| {
            for t in c * chunk..((c + 1) * chunk).min(tiles) {
                let w = &data[t * tile_bytes..(t + 1) * tile_bytes];
                let cols = (n - t * ROWS).min(ROWS);
                tile_times_acts(*kind, w, acts, isa, |i, y| {
                    // SAFETY: row `i < m`, columns `t·16 .. t·16 + cols ≤ n` lie inside `out`'s
                    // capacity (m × n), which outlives the parallel loop; tile `t` belongs to
                    // this task. A whole tile's row is one fixed-size copy (vector stores, not
                    // a call to memmove for 64 bytes; see `copy_part`).
                    unsafe {
                        let to = dst.at(i * n + t * ROWS);
                        if cols == ROWS {
                            to.cast::<[f32; ROWS]>().write(*y);
                        } else {
                            copy_part(y, to, cols);
                        }
                    };
                });
            }
        });
        // SAFETY: the loop above wrote all m × n elements (every row of every tile's columns).
        unsafe { out.set_len(m * n) };
        out
    }
}

/// The first `cols` values of a tile's row to `to`, for a last tile of fewer than [`ROWS`]
/// columns. Out of line: inlined, LLVM merged it with the whole-row copy beside it into one
/// call to memmove of `cols` floats for every row. With this and the kernels writing their
/// rows in place, memmove went from 2.6–2.8% of an 8-sequence decode's samples to 0.8%
/// (`perf`; the throughput's change is inside this machine's noise: ahead in 5 of 5
/// alternating pairs once, even in two later rounds).
///
/// # Safety
/// `to` is valid for `cols` ≤ [`ROWS`] writes of f32.
#[cold]
#[inline(never)]
unsafe fn copy_part(y: &[f32; ROWS], to: *mut f32, cols: usize) {
    // SAFETY: the caller's promise; `y` holds ROWS ≥ cols values.
    unsafe { std::ptr::copy_nonoverlapping(y.as_ptr(), to, cols) }
}

/// The instruction sets our kernels come in, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Isa {
    /// What [`Isa::Avx512Vnni`] allows, and AMX's tile unit for the encoders' f32 products
    /// ([`super::encoder::packed`]). Only a `KANDLE_ISA` limit: the quantised kernels here
    /// stay on AVX-512 ([`Isa::detect`] never gives this; given it, they run AVX-512),
    /// because AMX measured no faster for them (runtime-image/README.md).
    Amx,
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

    /// The best instruction set `KANDLE_ISA` allows (`amx`, `avx512`, `avx2` or `scalar`;
    /// unset: no limit), read once. It is there to measure and test the other kernels on a
    /// CPU that runs better ones; a value it does not know is ignored with a warning.
    pub(super) fn cap() -> Isa {
        static CAP: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *CAP.get_or_init(|| {
            let value = std::env::var("KANDLE_ISA").unwrap_or_default();
            Isa::parse_cap(&value).unwrap_or_else(|| {
                tracing::warn!(
                    "KANDLE_ISA={value:?} is not one of amx, avx512, avx2, scalar: not limiting \
                     the kernels"
                );
                Isa::Amx
            })
        })
    }

    fn parse_cap(value: &str) -> Option<Isa> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "amx" => Some(Isa::Amx),
            "avx512" => Some(Isa::Avx512Vnni),
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
            Isa::Amx => 3,
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

/// A kernel: `R` activation rows from the given one times one packed tile, into `R` rows.
type Kernel<const R: usize> = unsafe fn(&[u8], &Acts, usize, &mut [[f32; ROWS]; R]);
/// The layouts of the i-quants' kernels: IQ4_NL's (Q4_0's), a coded type's scaled per 32
/// (IQ4_XS's), a coded type's scaled per 16.
const NL: u8 = 0;
const XS: u8 = 1;
const XS16: u8 = 2;

/// The same for the i-quants' kernels, which take the codes' values.
type CodedKernel<const R: usize> = unsafe fn(&[u8], &Codes, &Acts, usize, &mut [[f32; ROWS]; R]);

/// One packed tile `w` ([`ROWS`] weight rows) times every activation row: `emit(i, y)` with
/// `y[l]` the product of activation row `i` and the tile's row `l`.
fn tile_times_acts(
    kind: Kind,
    w: &[u8],
    acts: &Acts,
    isa: Isa,
    mut emit: impl FnMut(usize, &[f32; ROWS]),
) {
    let mut i = 0;
    // The kernels write their rows here in place (returned by value, they were copied out).
    let mut out = [[0f32; ROWS]; TILE_512];
    while i < acts.m {
        macro_rules! tiles {
            ($module:ident, $max:expr, $($r:literal)+) => {{
                let r = (acts.m - i).min($max);
                let ys = &mut out[..r];
                // SAFETY: the CPU runs `isa` (the caller's promise: Isa::detect or a test of
                // the ISAs present); `w` is one packed tile of `acts.k / 32` blocks; rows
                // `i..i + r` exist in `acts`; `ys` holds `r` rows.
                //
                // Called through a pointer the optimiser cannot see through: one call does a
                // whole tile, and inlined here (as LLVM chose to after an unrelated change
                // elsewhere in the crate, `#[inline(never)]` notwithstanding) the AVX-512
                // kernels made the server's rounds of eight concurrent requests 3–8% slower
                // (best of eight rounds, six alternating pairs); out of line again, even.
                unsafe {
                    match (kind, r) {
                        $((Kind::Q4_1, $r) => {
                            let f: Kernel<$r> = $module::q4_1::<$r>;
                            std::hint::black_box(f)(w, acts, i, ys.try_into().unwrap())
                        })+
                        $((Kind::Q8_0, $r) => {
                            let f: Kernel<$r> = $module::q8_0::<$r>;
                            std::hint::black_box(f)(w, acts, i, ys.try_into().unwrap())
                        })+
                        $((Kind::Q6K, $r) => {
                            let f: Kernel<$r> = $module::q6_k::<$r, 6>;
                            std::hint::black_box(f)(w, acts, i, ys.try_into().unwrap())
                        })+
                        $((Kind::Q3K, $r) => {
                            let f: Kernel<$r> = $module::q6_k::<$r, 3>;
                            std::hint::black_box(f)(w, acts, i, ys.try_into().unwrap())
                        })+
                        $((Kind::Q2K, $r) => {
                            let f: Kernel<$r> = $module::q6_k::<$r, 2>;
                            std::hint::black_box(f)(w, acts, i, ys.try_into().unwrap())
                        })+
                        $((Kind::Q4K, $r) => {
                            let f: Kernel<$r> = $module::q4_k::<$r, false>;
                            std::hint::black_box(f)(w, acts, i, ys.try_into().unwrap())
                        })+
                        $((Kind::Q5K, $r) => {
                            let f: Kernel<$r> = $module::q4_k::<$r, true>;
                            std::hint::black_box(f)(w, acts, i, ys.try_into().unwrap())
                        })+
                        $((Kind::Q4_0, $r) => {
                            let f: Kernel<$r> = $module::q4_0::<$r, false>;
                            std::hint::black_box(f)(w, acts, i, ys.try_into().unwrap())
                        })+
                        $((Kind::Q5_0, $r) => {
                            let f: Kernel<$r> = $module::q4_0::<$r, true>;
                            std::hint::black_box(f)(w, acts, i, ys.try_into().unwrap())
                        })+
                        $((Kind::Iq4Nl, $r) => {
                            let f: CodedKernel<$r> = $module::iq4::<$r, NL>;
                            let ys = ys.try_into().unwrap();
                            std::hint::black_box(f)(w, &IQ4_CODES, acts, i, ys)
                        })+
                        $((Kind::Coded(iq), $r) => {
                            let f: CodedKernel<$r> = match iq.scale_per_16() {
                                false => $module::iq4::<$r, XS>,
                                true => $module::iq4::<$r, XS16>,
                            };
                            let codes = iq.codes().expect("a coded i-quant");
                            std::hint::black_box(f)(w, codes, acts, i, ys.try_into().unwrap())
                        })+
                        _ => unreachable!("{r} rows"),
                    }
                };
                for (ii, y) in ys.iter().enumerate() {
                    emit(i + ii, y);
                }
                i += r;
            }};
        }
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Amx | Isa::Avx512Vnni => tiles!(avx512, TILE_512, 1 2 3 4 5 6 7 8),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => tiles!(avx, TILE, 1 2 3 4),
            _ => {
                emit(i, &scalar_tile(kind, w, acts, i));
                i += 1;
            }
        }
    }
}

/// The portable kernel, and the definition the SIMD ones follow bit for bit: for each of the
/// tile's rows, over the blocks in order, the exact integer sum of the block's products, then
/// `acc = fma(sum, d_w·d_x, acc)` and for Q4_1 `acc_m = fma(m_w, s_x, acc_m)`; the output is
/// `acc + acc_m`. Q4_0's and Q5_0's sums are those of `q·x` less `8·Σx` and `16·Σx` (their
/// values being `q − 8` and `q − 16`).
fn scalar_tile(kind: Kind, w: &[u8], acts: &Acts, row: usize) -> [f32; ROWS] {
    match kind {
        Kind::Q6K | Kind::Q3K | Kind::Q2K => return scalar_q6k(kind, w, acts, row),
        Kind::Q4K | Kind::Q5K => return scalar_q4k(kind, w, acts, row),
        Kind::Iq4Nl => return scalar_iq4(kind, &IQ4_CODES, w, acts, row),
        Kind::Coded(iq) => {
            let codes = iq.codes().expect("a coded i-quant");
            return scalar_iq4(kind, codes, w, acts, row);
        }
        Kind::Q4_1 | Kind::Q8_0 | Kind::Q4_0 | Kind::Q5_0 => {}
    }
    let nb = acts.k / QK;
    let tb = ROWS * kind.block_bytes();
    let (mut acc, mut acc_m) = ([0f32; ROWS], [0f32; ROWS]);
    for (b, tile) in w.chunks_exact(tb).take(nb).enumerate() {
        let x = &acts.qs[row * acts.k + b * QK..][..QK];
        let [dx, sx] = acts.ds[row * nb + b];
        for (lane, (a, am)) in acc.iter_mut().zip(&mut acc_m).enumerate() {
            let group = |g: usize| &tile[kind.group_at(g, lane)..][..4];
            let dot: i32 = match kind {
                Kind::Q4_1 => (0..4)
                    .flat_map(|g| (0..4).map(move |e| (g, e)))
                    .map(|(g, e)| {
                        let q = group(g)[e];
                        (q & 0xF) as i32 * x[4 * g + e] as i32
                            + (q >> 4) as i32 * x[16 + 4 * g + e] as i32
                    })
                    .sum(),
                Kind::Q8_0 => (0..8)
                    .flat_map(|g| (0..4).map(move |e| (g, e)))
                    .map(|(g, e)| group(g)[e] as i8 as i32 * x[4 * g + e] as i32)
                    .sum(),
                Kind::Q4_0 | Kind::Q5_0 => {
                    let q = |i: usize| {
                        let nib = (group((i % 16) / 4)[i % 4] >> (4 * (i / 16))) & 15;
                        match kind {
                            Kind::Q5_0 => nib | fifth_bit(group(4), i) << 4,
                            _ => nib,
                        }
                    };
                    let dot: i32 = (0..QK).map(|i| q(i) as i32 * x[i] as i32).sum();
                    dot - kind.offset() * acts.sums[row * nb + b]
                }
                Kind::Q6K
                | Kind::Q4K
                | Kind::Q5K
                | Kind::Q3K
                | Kind::Q2K
                | Kind::Iq4Nl
                | Kind::Coded(_) => unreachable!("tiles with a scalar kernel of their own"),
            };
            *a = (dot as f32).mul_add(f16_at(tile, 2 * lane) * dx, *a);
            if kind == Kind::Q4_1 {
                *am = f16_at(tile, 2 * (ROWS + lane)).mul_add(sx, *am);
            }
        }
    }
    std::array::from_fn(|l| acc[l] + acc_m[l])
}

/// [`scalar_tile`] for Q4_K and Q5_K, and the definition their SIMD kernels follow bit for
/// bit: Q4_1's ([`scalar_tile`]) with the block's `d_w = d·sc` and `m_w = −dmin·m`, both
/// exact in f32 (an f16 times a six-bit integer), where converting the file to Q4_1 rounded
/// them to f16.
fn scalar_q4k(kind: Kind, w: &[u8], acts: &Acts, row: usize) -> [f32; ROWS] {
    let nb = acts.k / QK;
    let packed = kind.super_bytes().expect("a K-quant").1;
    let (mut acc, mut acc_m) = ([0f32; ROWS], [0f32; ROWS]);
    for b in 0..nb {
        let sup = &w[b / 8 * packed..];
        let x = &acts.qs[row * acts.k + b * QK..][..QK];
        let [dx, sx] = acts.ds[row * nb + b];
        for (lane, (a, am)) in acc.iter_mut().zip(&mut acc_m).enumerate() {
            let (mut dot, mut sc, mut m) = (0i32, 0, 0);
            for (i, &xi) in x.iter().enumerate() {
                let q;
                (q, sc, m) = kind.q4k_at(sup, lane, b % 8, i);
                dot += q as i32 * xi as i32;
            }
            let d = f16_at(sup, 2 * lane) * sc as f32;
            let mw = -f16_at(sup, 2 * (ROWS + lane)) * m as f32;
            *a = (dot as f32).mul_add(d * dx, *a);
            *am = mw.mul_add(sx, *am);
        }
    }
    std::array::from_fn(|l| acc[l] + acc_m[l])
}

/// [`scalar_tile`] for IQ4_NL and the coded i-quants (IQ4_XS and others), and the definition
/// their SIMD kernels follow bit for bit: per block of 32 and row, the exact integer
/// `Σ values[q]·x`, then `acc = fma(sum, d_w·d_x, acc)` with the block's `d_w = d` (IQ4_NL)
/// or `d·factor·l` (IQ4_XS: `d·(l − 32)`; exact in f32: an f16 times a power of two and a
/// six-bit integer); for the types scaled per 16, the sum `l₀·D₀ + l₁·D₁` over the two
/// halves and `d_w = d·factor`.
fn scalar_iq4(kind: Kind, codes: &Codes, w: &[u8], acts: &Acts, row: usize) -> [f32; ROWS] {
    let nb = acts.k / QK;
    let mut acc = [0f32; ROWS];
    for b in 0..nb {
        let x = &acts.qs[row * acts.k + b * QK..][..QK];
        let [dx, _] = acts.ds[row * nb + b];
        // Where the rows' `d` lie, the block's nibble groups, and its `l` (IQ4_XS: `l −
        // 32`; two where the type scales per 16).
        let per_16 = matches!(kind, Kind::Coded(iq) if iq.scale_per_16());
        let (ds, words, sc) = match kind {
            Kind::Coded(_) => {
                let (block, sup_bytes, head) = coded_layout(per_16);
                let sup = &w[b / 8 * sup_bytes..];
                let tb = &sup[2 * ROWS + b % 8 * block..];
                (sup, &tb[head..], Some(&tb[..head]))
            }
            _ => {
                let tb = &w[b * ROWS * kind.block_bytes()..];
                (tb, &tb[2 * ROWS..], None)
            }
        };
        for (lane, a) in acc.iter_mut().enumerate() {
            let half = |h: usize| -> i32 {
                (16 * h..16 * h + 16)
                    .map(|i| {
                        let byte = words[64 * ((i % 16) / 4) + 4 * lane + i % 4];
                        let q = (byte >> (4 * (i / 16))) & 15;
                        codes.values[q as usize] as i32 * x[i] as i32
                    })
                    .sum()
            };
            let d = f16_at(ds, 2 * lane);
            let (dot, dw) = match sc {
                // Per 16: `l₀·D₀ + l₁·D₁`, exact in integers (and in f32: below 2²⁴).
                Some(sc) if per_16 => {
                    let l = |h: usize| sc[h * ROWS + lane] as i8 as i32;
                    (l(0) * half(0) + l(1) * half(1), d * codes.factor)
                }
                Some(sc) => (half(0) + half(1), d * codes.factor * sc[lane] as i8 as f32),
                None => (half(0) + half(1), d),
            };
            *a = (dot as f32).mul_add(dw * dx, *a);
        }
    }
    acc
}

/// [`scalar_tile`] for Q6_K, and the definition its SIMD kernels follow bit for bit: per
/// block of 32 and row, with `D₀`, `D₁` the sums of `q·x` over the block's two sub-blocks
/// of 16, `S₀`, `S₁` those of `x` ([`Acts::halves`]) and `c₀`, `c₁` the sub-blocks' scales,
/// the exact integer `c₀·(D₀ − 32·S₀) + c₁·(D₁ − 32·S₁)` (below 2²⁴ in size: exact as an
/// f32 too), then
/// `acc = fma(sum, d_w·d_x, acc)`. Q3_K's the same with `4·S` for `32·S`; Q2_K's with no
/// offset, and beside it its mins' exact `m₀·S₀ + m₁·S₁` into `acc_m = fma(that, −dmin·d_x,
/// acc_m)`, the output `acc + acc_m`.
fn scalar_q6k(kind: Kind, w: &[u8], acts: &Acts, row: usize) -> [f32; ROWS] {
    let nb = acts.k / QK;
    let packed = kind.super_bytes().expect("a K-quant").1;
    let offset = kind.offset();
    let mut acc = [0f32; ROWS];
    let mut acc_m = [0f32; ROWS];
    for b in 0..nb {
        let sup = &w[b / 8 * packed..];
        let x = &acts.qs[row * acts.k + b * QK..][..QK];
        let [dx, _] = acts.ds[row * nb + b];
        let halves = acts.halves()[row * nb + b];
        let s = [halves as i16 as i32, halves >> 16];
        for (lane, (a, am)) in acc.iter_mut().zip(&mut acc_m).enumerate() {
            let mut dots = [0i32; 2];
            let mut scales = [0i32; 2];
            let mut mins = [0i32; 2];
            for (i, &xi) in x.iter().enumerate() {
                let (q, sc, m) = kind.q6k_at(sup, lane, b % 8, i);
                dots[i / 16] += q as i32 * xi as i32;
                scales[i / 16] = sc as i32;
                mins[i / 16] = m as i32;
            }
            let sum = scales[0] * (dots[0] - offset * s[0]) + scales[1] * (dots[1] - offset * s[1]);
            *a = (sum as f32).mul_add(f16_at(sup, 2 * lane) * dx, *a);
            if kind == Kind::Q2K {
                let dmin = f16_at(sup, 2 * (ROWS + lane));
                *am = ((mins[0] * s[0] + mins[1] * s[1]) as f32).mul_add(-dmin * dx, *am);
            }
        }
    }
    match kind {
        Kind::Q2K => std::array::from_fn(|l| acc[l] + acc_m[l]),
        _ => acc,
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx {
    use core::arch::x86_64::*;

    use super::{
        Acts, Codes, Kind, NL, Q2K_TILE_BLOCK, Q2K_TILE_SUPER, Q3K_TILE_BLOCK, Q3K_TILE_SUPER,
        Q6K_TILE_BLOCK, Q6K_TILE_SUPER, QK, ROWS, XS, XS16, coded_layout,
    };

    /// [`super::quantize_block`] with the same results (the same products, rounded half to
    /// even), as llama.cpp's AVX2 `quantize_row_q8_1`.
    ///
    /// # Safety
    /// `xb` and `qb` hold 32 values each.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_block(xb: &[f32], qb: &mut [i8]) -> (f32, i32) {
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

    /// `R` activation rows from `row0` times one packed Q4_1 tile, eight weight rows (one
    /// 256-bit register) at a time.
    ///
    /// # Safety
    /// `w` is a packed Q4_1 tile of `acts.k / 32` blocks; rows `row0..row0 + R` exist.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_1<const R: usize>(
        w: &[u8],
        acts: &Acts,
        row0: usize,
        out: &mut [[f32; ROWS]; R],
    ) {
        let nb = acts.k / QK;
        debug_assert!(w.len() >= nb * 320 && row0 + R <= acts.m);
        let low = _mm256_set1_epi8(0xF);
        let ones = _mm256_set1_epi16(1);
        let wp = w.as_ptr();
        let xq = acts.qs.as_ptr();
        let xds = acts.ds.as_ptr();
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            let mut acc_m = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                unsafe {
                    let tb = wp.add(b * 320);
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(tb.add(16 * half) as *const __m128i));
                    let m =
                        _mm256_cvtph_ps(_mm_loadu_si128(tb.add(32 + 16 * half) as *const __m128i));
                    // Sums of pairs in i16: eight of them stay within ±8·15·127·2 < 2^15.
                    let mut dot = [_mm256_setzero_si256(); R];
                    for g in 0..4 {
                        let q =
                            _mm256_loadu_si256(tb.add(64 + 64 * g + 32 * half) as *const __m256i);
                        let lo = _mm256_and_si256(q, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low);
                        for r in 0..R {
                            let x = xq.add((row0 + r) * acts.k + b * QK);
                            let xl =
                                _mm256_set1_epi32((x.add(4 * g) as *const i32).read_unaligned());
                            let xh = _mm256_set1_epi32(
                                (x.add(16 + 4 * g) as *const i32).read_unaligned(),
                            );
                            dot[r] = _mm256_add_epi16(dot[r], _mm256_maddubs_epi16(lo, xl));
                            dot[r] = _mm256_add_epi16(dot[r], _mm256_maddubs_epi16(hi, xh));
                        }
                    }
                    for r in 0..R {
                        let [dx, sx] = *xds.add((row0 + r) * nb + b);
                        let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(dot[r], ones));
                        acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(d, _mm256_set1_ps(dx)), acc[r]);
                        acc_m[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(sx), acc_m[r]);
                    }
                }
            }
            for r in 0..R {
                let y = _mm256_add_ps(acc[r], acc_m[r]);
                // SAFETY: eight floats within a row of sixteen.
                unsafe { _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * half), y) };
            }
        }
    }

    /// `R` activation rows from `row0` times one packed Q8_0 tile, eight weight rows at a time.
    ///
    /// # Safety
    /// `w` is a packed Q8_0 tile of `acts.k / 32` blocks; rows `row0..row0 + R` exist.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q8_0<const R: usize>(
        w: &[u8],
        acts: &Acts,
        row0: usize,
        out: &mut [[f32; ROWS]; R],
    ) {
        let nb = acts.k / QK;
        debug_assert!(w.len() >= nb * 544 && row0 + R <= acts.m);
        let ones = _mm256_set1_epi16(1);
        let wp = w.as_ptr();
        let xq = acts.qs.as_ptr();
        let xds = acts.ds.as_ptr();
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                unsafe {
                    let tb = wp.add(b * 544);
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(tb.add(16 * half) as *const __m128i));
                    let mut dot = [_mm256_setzero_si256(); R];
                    for g in 0..8 {
                        let q =
                            _mm256_loadu_si256(tb.add(32 + 64 * g + 32 * half) as *const __m256i);
                        // |w| as unsigned bytes; the activations take w's sign instead
                        // (|w|·|x|·2 ≤ 128·127·2 fits in i16).
                        let aq = _mm256_sign_epi8(q, q);
                        for r in 0..R {
                            let x = xq.add((row0 + r) * acts.k + b * QK);
                            let xg =
                                _mm256_set1_epi32((x.add(4 * g) as *const i32).read_unaligned());
                            let p = _mm256_maddubs_epi16(aq, _mm256_sign_epi8(xg, q));
                            dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(p, ones));
                        }
                    }
                    for r in 0..R {
                        let [dx, _] = *xds.add((row0 + r) * nb + b);
                        let dot = _mm256_cvtepi32_ps(dot[r]);
                        acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(d, _mm256_set1_ps(dx)), acc[r]);
                    }
                }
            }
            for r in 0..R {
                // SAFETY: eight floats within a row of sixteen.
                unsafe { _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * half), acc[r]) };
            }
        }
    }

    /// Nibble group `g`'s values with their fifth bits from the word `h` ([`super::fifth_bits`]):
    /// the low nibbles' (elements `4g..4g+4`) and the high nibbles' (`16+4g..`).
    macro_rules! five_bits_256 {
        ($q:expr, $h:expr, $g:expr) => {{
            let (q, h, low, bit) = ($q, $h, _mm256_set1_epi8(0xF), _mm256_set1_epi8(0x10));
            let (hl, hh) = match $g {
                0 => (_mm256_slli_epi32::<4>(h), h),
                1 => (_mm256_slli_epi32::<3>(h), _mm256_srli_epi32::<1>(h)),
                2 => (_mm256_slli_epi32::<2>(h), _mm256_srli_epi32::<2>(h)),
                _ => (_mm256_slli_epi32::<1>(h), _mm256_srli_epi32::<3>(h)),
            };
            (
                _mm256_or_si256(_mm256_and_si256(q, low), _mm256_and_si256(hl, bit)),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(q), low),
                    _mm256_and_si256(hh, bit),
                ),
            )
        }};
    }

    /// `R` activation rows from `row0` times one packed Q4_K tile (`FIVE`: Q5_K), eight
    /// weight rows at a time: [`q4_1`] with each block's `d·sc` and `−dmin·m` made from the
    /// rows' bytes. Sums of a group's pairs of products stay within ±2·2·31·127 < 2^15 for
    /// two groups of five-bit values, four of four-bit ones.
    ///
    /// # Safety
    /// `w` is a packed Q4_K (Q5_K) tile of `acts.k / 256` super-blocks; rows
    /// `row0..row0 + R` exist.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_k<const R: usize, const FIVE: bool>(
        w: &[u8],
        acts: &Acts,
        row0: usize,
        out: &mut [[f32; ROWS]; R],
    ) {
        let kind = if FIVE { Kind::Q5K } else { Kind::Q4K };
        let (block, sup_bytes) = (kind.k_tile_block(), kind.super_bytes().expect("K-quant").1);
        let nb = acts.k / QK;
        debug_assert!(w.len() >= nb / 8 * sup_bytes && row0 + R <= acts.m);
        let low = _mm256_set1_epi8(0xF);
        let ones = _mm256_set1_epi16(1);
        let byte = _mm256_set1_epi32(0xFF);
        let wp = w.as_ptr();
        let xq = acts.qs.as_ptr();
        let xds = acts.ds.as_ptr();
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            let mut acc_m = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                unsafe {
                    let sup = wp.add(b / 8 * sup_bytes);
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(sup.add(16 * half) as *const __m128i));
                    let dmin = _mm256_cvtph_ps(_mm_loadu_si128(
                        sup.add(2 * ROWS + 16 * half) as *const __m128i
                    ));
                    let tb = sup.add(4 * ROWS + b % 8 * block);
                    // Each row's `sc` and `m` bytes as the low and high i16 of its lane.
                    let scm =
                        _mm256_cvtepu8_epi16(_mm_loadu_si128(tb.add(16 * half) as *const __m128i));
                    let dw = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(scm, byte)));
                    let mw = _mm256_mul_ps(
                        _mm256_sub_ps(_mm256_setzero_ps(), dmin),
                        _mm256_cvtepi32_ps(_mm256_srli_epi32::<16>(scm)),
                    );
                    let words = tb.add(2 * ROWS + 32 * half);
                    // Q4_K's tile block ends before it.
                    let h = match FIVE {
                        true => _mm256_loadu_si256(words.add(256) as *const __m256i),
                        false => _mm256_setzero_si256(),
                    };
                    let mut dot = [_mm256_setzero_si256(); R];
                    let mut pairs = [_mm256_setzero_si256(); R];
                    for g in 0..4 {
                        let q = _mm256_loadu_si256(words.add(64 * g) as *const __m256i);
                        let (lo, hi) = if FIVE {
                            five_bits_256!(q, h, g)
                        } else {
                            (
                                _mm256_and_si256(q, low),
                                _mm256_and_si256(_mm256_srli_epi16::<4>(q), low),
                            )
                        };
                        for r in 0..R {
                            let x = xq.add((row0 + r) * acts.k + b * QK);
                            let xl =
                                _mm256_set1_epi32((x.add(4 * g) as *const i32).read_unaligned());
                            let xh = _mm256_set1_epi32(
                                (x.add(16 + 4 * g) as *const i32).read_unaligned(),
                            );
                            pairs[r] = _mm256_add_epi16(pairs[r], _mm256_maddubs_epi16(lo, xl));
                            pairs[r] = _mm256_add_epi16(pairs[r], _mm256_maddubs_epi16(hi, xh));
                        }
                        if !FIVE && g < 3 || FIVE && g % 2 == 0 {
                            continue;
                        }
                        for r in 0..R {
                            dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(pairs[r], ones));
                            pairs[r] = _mm256_setzero_si256();
                        }
                    }
                    for r in 0..R {
                        let [dx, sx] = *xds.add((row0 + r) * nb + b);
                        let dot = _mm256_cvtepi32_ps(dot[r]);
                        acc[r] =
                            _mm256_fmadd_ps(dot, _mm256_mul_ps(dw, _mm256_set1_ps(dx)), acc[r]);
                        acc_m[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(sx), acc_m[r]);
                    }
                }
            }
            for r in 0..R {
                let y = _mm256_add_ps(acc[r], acc_m[r]);
                // SAFETY: eight floats within a row of sixteen.
                unsafe { _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * half), y) };
            }
        }
    }

    /// `R` activation rows from `row0` times one packed Q4_0 tile (`FIVE`: Q5_0), eight
    /// weight rows at a time: the four- (five-) bit values times the activations, less
    /// `8·Σx` (`16·Σx`).
    ///
    /// # Safety
    /// `w` is a packed Q4_0 (Q5_0) tile of `acts.k / 32` blocks; rows `row0..row0 + R` exist.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_0<const R: usize, const FIVE: bool>(
        w: &[u8],
        acts: &Acts,
        row0: usize,
        out: &mut [[f32; ROWS]; R],
    ) {
        let kind = if FIVE { Kind::Q5_0 } else { Kind::Q4_0 };
        let (block, offset) = (ROWS * kind.block_bytes(), kind.offset());
        let nb = acts.k / QK;
        debug_assert!(w.len() >= nb * block && row0 + R <= acts.m);
        let low = _mm256_set1_epi8(0xF);
        let ones = _mm256_set1_epi16(1);
        let wp = w.as_ptr();
        let xq = acts.qs.as_ptr();
        let xds = acts.ds.as_ptr();
        let sums = acts.sums.as_ptr();
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                unsafe {
                    let tb = wp.add(b * block);
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(tb.add(16 * half) as *const __m128i));
                    let words = tb.add(32 + 32 * half);
                    // Q4_0's tile block ends before it.
                    let h = match FIVE {
                        true => _mm256_loadu_si256(words.add(256) as *const __m256i),
                        false => _mm256_setzero_si256(),
                    };
                    // Each row's sum starts at −offset·Σx (exact: the products are added).
                    let mut dot: [__m256i; R] = std::array::from_fn(|r| {
                        _mm256_set1_epi32(-*sums.add((row0 + r) * nb + b) * offset)
                    });
                    for pair in 0..2 {
                        // Two groups' pairs of products: within ±2·2·31·127 < 2^15.
                        let mut p = [_mm256_setzero_si256(); R];
                        for g in 2 * pair..2 * pair + 2 {
                            let q = _mm256_loadu_si256(words.add(64 * g) as *const __m256i);
                            let (lo, hi) = if FIVE {
                                five_bits_256!(q, h, g)
                            } else {
                                (
                                    _mm256_and_si256(q, low),
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(q), low),
                                )
                            };
                            for r in 0..R {
                                let x = xq.add((row0 + r) * acts.k + b * QK);
                                let xl = _mm256_set1_epi32(
                                    (x.add(4 * g) as *const i32).read_unaligned(),
                                );
                                let xh = _mm256_set1_epi32(
                                    (x.add(16 + 4 * g) as *const i32).read_unaligned(),
                                );
                                p[r] = _mm256_add_epi16(p[r], _mm256_maddubs_epi16(lo, xl));
                                p[r] = _mm256_add_epi16(p[r], _mm256_maddubs_epi16(hi, xh));
                            }
                        }
                        for r in 0..R {
                            dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(p[r], ones));
                        }
                    }
                    for r in 0..R {
                        let [dx, _] = *xds.add((row0 + r) * nb + b);
                        let dot = _mm256_cvtepi32_ps(dot[r]);
                        acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(d, _mm256_set1_ps(dx)), acc[r]);
                    }
                }
            }
            for r in 0..R {
                // SAFETY: eight floats within a row of sixteen.
                unsafe { _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * half), acc[r]) };
            }
        }
    }

    /// `R` activation rows from `row0` times one packed IQ4_NL tile (`MODE` [`XS`]: a coded
    /// one, IQ4_XS's layout; [`XS16`]: scaled per 16), eight weight rows at a time: each
    /// nibble looked up (`vpshufb`) as its signed value in `codes`, and multiplied as
    /// llama.cpp's AVX2 kernels do, `vpmaddubsw` of its size and the activation with its
    /// sign (pairs within 2·127·127 < 2^15, each widened before the next is added); per 16,
    /// each half's sum weighed by its `l` in integers (`vpmulld`).
    ///
    /// # Safety
    /// `w` is a packed IQ4_NL (coded) tile of `acts.k / 32` blocks; rows `row0..row0 + R`
    /// exist; `codes` hold no −128.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn iq4<const R: usize, const MODE: u8>(
        w: &[u8],
        codes: &Codes,
        acts: &Acts,
        row0: usize,
        out: &mut [[f32; ROWS]; R],
    ) {
        let (block, sup_bytes, head) = match MODE {
            NL => (ROWS * Kind::Iq4Nl.block_bytes(), 0, 2 * ROWS),
            _ => coded_layout(MODE == XS16),
        };
        let nb = acts.k / QK;
        debug_assert!(w.len() >= nb * block && row0 + R <= acts.m);
        let low = _mm256_set1_epi8(0xF);
        let ones = _mm256_set1_epi16(1);
        // SAFETY: sixteen bytes.
        let table = unsafe { _mm_loadu_si128(codes.values.as_ptr() as *const __m128i) };
        let table = _mm256_broadcastsi128_si256(table);
        let factor = _mm256_set1_ps(codes.factor);
        let wp = w.as_ptr();
        let xq = acts.qs.as_ptr();
        let xds = acts.ds.as_ptr();
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                unsafe {
                    let (sup, tb) = match MODE {
                        NL => (wp.add(b * block), wp.add(b * block)),
                        _ => {
                            let sup = wp.add(b / 8 * sup_bytes);
                            (sup, sup.add(2 * ROWS + b % 8 * block))
                        }
                    };
                    let d = _mm_loadu_si128(sup.add(16 * half) as *const __m128i);
                    let d = _mm256_cvtph_ps(d);
                    let l = |at: usize| {
                        _mm256_cvtepi8_epi32(_mm_loadl_epi64(tb.add(at + 8 * half) as *const _))
                    };
                    let dw = match MODE {
                        NL => d,
                        XS => _mm256_mul_ps(_mm256_mul_ps(d, factor), _mm256_cvtepi32_ps(l(0))),
                        _ => _mm256_mul_ps(d, factor),
                    };
                    let words = tb.add(head + 32 * half);
                    let mut dot = [_mm256_setzero_si256(); R];
                    let mut doth = [_mm256_setzero_si256(); R];
                    for g in 0..4 {
                        let q = _mm256_loadu_si256(words.add(64 * g) as *const __m256i);
                        let lo = _mm256_shuffle_epi8(table, _mm256_and_si256(q, low));
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low);
                        let hi = _mm256_shuffle_epi8(table, hi);
                        let (lo_size, hi_size) = (_mm256_abs_epi8(lo), _mm256_abs_epi8(hi));
                        for r in 0..R {
                            let x = xq.add((row0 + r) * acts.k + b * QK);
                            let xl =
                                _mm256_set1_epi32((x.add(4 * g) as *const i32).read_unaligned());
                            let xh = _mm256_set1_epi32(
                                (x.add(16 + 4 * g) as *const i32).read_unaligned(),
                            );
                            let pl = _mm256_maddubs_epi16(lo_size, _mm256_sign_epi8(xl, lo));
                            let ph = _mm256_maddubs_epi16(hi_size, _mm256_sign_epi8(xh, hi));
                            dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(pl, ones));
                            let ph = _mm256_madd_epi16(ph, ones);
                            match MODE {
                                XS16 => doth[r] = _mm256_add_epi32(doth[r], ph),
                                _ => dot[r] = _mm256_add_epi32(dot[r], ph),
                            }
                        }
                    }
                    let (l0, l1) = match MODE {
                        XS16 => (l(0), l(ROWS)),
                        _ => (ones, ones),
                    };
                    for r in 0..R {
                        let [dx, _] = *xds.add((row0 + r) * nb + b);
                        let sum = match MODE {
                            XS16 => _mm256_add_epi32(
                                _mm256_mullo_epi32(dot[r], l0),
                                _mm256_mullo_epi32(doth[r], l1),
                            ),
                            _ => dot[r],
                        };
                        let sum = _mm256_cvtepi32_ps(sum);
                        acc[r] =
                            _mm256_fmadd_ps(sum, _mm256_mul_ps(dw, _mm256_set1_ps(dx)), acc[r]);
                    }
                }
            }
            for r in 0..R {
                // SAFETY: eight floats within a row of sixteen.
                unsafe { _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * half), acc[r]) };
            }
        }
    }

    /// `R` activation rows from `row0` times one packed Q6_K tile, eight weight rows at a
    /// time. The six-bit values are the nibbles with their two high bits shifted beside them
    /// ([`super::Kind::pack_q6k`]); `vpmaddwd` with each row's scale (twice in a lane) sums
    /// the pairs of products and weighs them at once. Sums of two groups' pairs stay within
    /// ±2·2·63·127 < 2^15. `BITS` 3: Q3_K, its three-bit values the nibbles alone
    /// ([`super::Kind::pack_q3k`]), `4·Σx` taken off; 2: Q2_K, nothing taken off, its mins
    /// weighing `Σx` by halves apart (`vpmaddwd` again), as [`super::scalar_q6k`] defines.
    ///
    /// # Safety
    /// `w` is a packed Q6_K (Q3_K, Q2_K) tile of `acts.k / 256` super-blocks; rows
    /// `row0..row0 + R` exist.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q6_k<const R: usize, const BITS: u8>(
        w: &[u8],
        acts: &Acts,
        row0: usize,
        out: &mut [[f32; ROWS]; R],
    ) {
        let nb = acts.k / QK;
        let (block, sup_bytes, head) = match BITS {
            3 => (Q3K_TILE_BLOCK, Q3K_TILE_SUPER, 2 * ROWS),
            2 => (Q2K_TILE_BLOCK, Q2K_TILE_SUPER, 4 * ROWS),
            _ => (Q6K_TILE_BLOCK, Q6K_TILE_SUPER, 2 * ROWS),
        };
        debug_assert!(w.len() >= nb / 8 * sup_bytes && row0 + R <= acts.m);
        let low = _mm256_set1_epi8(0xF);
        let high = _mm256_set1_epi8(0x30);
        let wp = w.as_ptr();
        let xq = acts.qs.as_ptr();
        let xds = acts.ds.as_ptr();
        let halves = acts.halves().as_ptr();
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            let mut acc_m = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                unsafe {
                    let sup = wp.add(b / 8 * sup_bytes);
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(sup.add(16 * half) as *const __m128i));
                    let tb = sup.add(head + b % 8 * block);
                    // Each row's (c₀, c₁) as two i16, and each scale twice.
                    let sc =
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(tb.add(16 * half) as *const __m128i));
                    let c0 = _mm256_shufflehi_epi16::<0b10_10_00_00>(_mm256_shufflelo_epi16::<
                        0b10_10_00_00,
                    >(sc));
                    let c1 = _mm256_shufflehi_epi16::<0b11_11_01_01>(_mm256_shufflelo_epi16::<
                        0b11_11_01_01,
                    >(sc));
                    let words = tb.add(head + 32 * half);
                    // Q3_K's and Q2_K's tile blocks end before them.
                    let (h0, h1) = match BITS {
                        6 => (
                            _mm256_loadu_si256(words.add(256) as *const __m256i),
                            _mm256_loadu_si256(words.add(320) as *const __m256i),
                        ),
                        _ => (_mm256_setzero_si256(), _mm256_setzero_si256()),
                    };
                    let mut dot = [_mm256_setzero_si256(); R];
                    for pair in 0..2 {
                        let mut p0 = [_mm256_setzero_si256(); R];
                        let mut p1 = [_mm256_setzero_si256(); R];
                        for g in 2 * pair..2 * pair + 2 {
                            let q = _mm256_loadu_si256(words.add(64 * g) as *const __m256i);
                            let (hl, hh) = match g {
                                0 => (_mm256_slli_epi32::<4>(h0), _mm256_slli_epi32::<4>(h1)),
                                1 => (_mm256_slli_epi32::<2>(h0), _mm256_slli_epi32::<2>(h1)),
                                2 => (h0, h1),
                                _ => (_mm256_srli_epi32::<2>(h0), _mm256_srli_epi32::<2>(h1)),
                            };
                            let lo = _mm256_or_si256(
                                _mm256_and_si256(q, low),
                                _mm256_and_si256(hl, high),
                            );
                            let hi = _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16::<4>(q), low),
                                _mm256_and_si256(hh, high),
                            );
                            for r in 0..R {
                                let x = xq.add((row0 + r) * acts.k + b * QK);
                                let xl = _mm256_set1_epi32(
                                    (x.add(4 * g) as *const i32).read_unaligned(),
                                );
                                let xh = _mm256_set1_epi32(
                                    (x.add(16 + 4 * g) as *const i32).read_unaligned(),
                                );
                                p0[r] = _mm256_add_epi16(p0[r], _mm256_maddubs_epi16(lo, xl));
                                p1[r] = _mm256_add_epi16(p1[r], _mm256_maddubs_epi16(hi, xh));
                            }
                        }
                        for r in 0..R {
                            dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(p0[r], c0));
                            dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(p1[r], c1));
                        }
                    }
                    for r in 0..R {
                        let at = (row0 + r) * nb + b;
                        let [dx, _] = *xds.add(at);
                        let s = _mm256_set1_epi32(*halves.add(at));
                        let sum = match BITS {
                            2 => dot[r],
                            3 => _mm256_sub_epi32(
                                dot[r],
                                _mm256_slli_epi32::<2>(_mm256_madd_epi16(sc, s)),
                            ),
                            _ => _mm256_sub_epi32(
                                dot[r],
                                _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc, s)),
                            ),
                        };
                        let sum = _mm256_cvtepi32_ps(sum);
                        acc[r] = _mm256_fmadd_ps(sum, _mm256_mul_ps(d, _mm256_set1_ps(dx)), acc[r]);
                        if BITS == 2 {
                            let at_m = tb.add(2 * ROWS + 16 * half) as *const __m128i;
                            let m = _mm256_cvtepi8_epi16(_mm_loadu_si128(at_m));
                            let at_d = sup.add(2 * ROWS + 16 * half) as *const __m128i;
                            let dmin = _mm256_cvtph_ps(_mm_loadu_si128(at_d));
                            let neg = _mm256_sub_ps(_mm256_setzero_ps(), dmin);
                            let msum = _mm256_cvtepi32_ps(_mm256_madd_epi16(m, s));
                            let w = _mm256_mul_ps(neg, _mm256_set1_ps(dx));
                            acc_m[r] = _mm256_fmadd_ps(msum, w, acc_m[r]);
                        }
                    }
                }
            }
            for r in 0..R {
                let y = match BITS {
                    2 => _mm256_add_ps(acc[r], acc_m[r]),
                    _ => acc[r],
                };
                // SAFETY: eight floats within a row of sixteen.
                unsafe { _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * half), y) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx512 {
    use core::arch::x86_64::*;

    use super::{
        Acts, Codes, Kind, NL, Q2K_TILE_BLOCK, Q2K_TILE_SUPER, Q3K_TILE_BLOCK, Q3K_TILE_SUPER,
        Q6K_TILE_BLOCK, Q6K_TILE_SUPER, QK, ROWS, XS, XS16, coded_layout,
    };

    /// Blocks ahead of the one being multiplied whose weights are fetched into the cache.
    /// The hardware prefetcher alone left the 8-row kernels waiting on weight loads (`perf
    /// annotate`: a third of their samples on the instruction after each load). Four blocks
    /// ahead (1.3 KB of Q4_1) raised 8 rows times thirty 576×3072 matrices (33 MB) from 108
    /// to 123 GMAC/s on two threads (means of 9 alternating runs of an ad-hoc timing loop);
    /// 2 blocks ahead did no better than none, 8 about as well as 4. Once the weights were on
    /// huge pages ([`super::super::hugepages`]), where a prefetch no longer lands on a page
    /// the TLB has not seen, 8 blocks ahead (2.5 KB of Q4_1) beat 4 in SmolLM2 itself (the
    /// bench binary, eight alternating rounds): one stream median ~198 against ~165 tok/s, 8
    /// streams ~545 against ~520; 16 and 32 blocks did about as well as 8.
    const PREFETCH_BLOCKS: usize = 8;

    /// Prefetches the tile block `PREFETCH_BLOCKS` after `tb` (blocks of `bytes`). Past the
    /// end of a tile that is the next tile's block, which a chunk of tiles reads next; past
    /// the end of the matrix, a prefetch does not fault.
    #[inline(always)]
    fn prefetch_ahead(tb: *const u8, bytes: usize) {
        let ahead = tb.wrapping_add(PREFETCH_BLOCKS * bytes);
        for line in (0..bytes).step_by(64) {
            // SAFETY: a prefetch reads nothing architecturally and cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8) };
        }
    }

    /// `R` activation rows from `row0` times one packed Q4_1 tile: per block and group of
    /// four bytes, one `vpdpbusd` per activation row advances all sixteen outputs. The low
    /// and the high nibbles go into two sums per row that are added after, so that a row's
    /// chain of dependent `vpdpbusd`s (five cycles each) is four long, not eight; integer
    /// sums are exact, so the order does not change the bits.
    ///
    /// # Safety
    /// `w` is a packed Q4_1 tile of `acts.k / 32` blocks; rows `row0..row0 + R` exist.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn q4_1<const R: usize>(
        w: &[u8],
        acts: &Acts,
        row0: usize,
        out: &mut [[f32; ROWS]; R],
    ) {
        let nb = acts.k / QK;
        debug_assert!(w.len() >= nb * 320 && row0 + R <= acts.m);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut acc_m = [_mm512_setzero_ps(); R];
        let low = _mm512_set1_epi8(0xF);
        let wp = w.as_ptr();
        let xq = acts.qs.as_ptr();
        let xds = acts.ds.as_ptr();
        for b in 0..nb {
            unsafe {
                let tb = wp.add(b * 320);
                prefetch_ahead(tb, 320);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(tb as *const __m256i));
                let m = _mm512_cvtph_ps(_mm256_loadu_si256(tb.add(32) as *const __m256i));
                let mut dot = [_mm512_setzero_si512(); R];
                let mut doth = [_mm512_setzero_si512(); R];
                for g in 0..4 {
                    let q = _mm512_loadu_si512(tb.add(64 + 64 * g) as *const __m512i);
                    let lo = _mm512_and_si512(q, low);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), low);
                    for r in 0..R {
                        let x = xq.add((row0 + r) * acts.k + b * QK);
                        let xl = _mm512_set1_epi32((x.add(4 * g) as *const i32).read_unaligned());
                        let xh =
                            _mm512_set1_epi32((x.add(16 + 4 * g) as *const i32).read_unaligned());
                        dot[r] = _mm512_dpbusd_epi32(dot[r], lo, xl);
                        doth[r] = _mm512_dpbusd_epi32(doth[r], hi, xh);
                    }
                }
                for r in 0..R {
                    let [dx, sx] = *xds.add((row0 + r) * nb + b);
                    let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(dot[r], doth[r]));
                    acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc[r]);
                    acc_m[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sx), acc_m[r]);
                }
            }
        }
        for r in 0..R {
            let y = _mm512_add_ps(acc[r], acc_m[r]);
            // SAFETY: sixteen floats, one row.
            unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), y) };
        }
    }

    /// `R` activation rows from `row0` times one packed Q8_0 tile. `vpdpbusd` multiplies
    /// unsigned by signed bytes: the weights go in as `q + 128`, and `128·Σq_x` is taken off
    /// each block's sum, which stays exact.
    ///
    /// # Safety
    /// `w` is a packed Q8_0 tile of `acts.k / 32` blocks; rows `row0..row0 + R` exist.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn q8_0<const R: usize>(
        w: &[u8],
        acts: &Acts,
        row0: usize,
        out: &mut [[f32; ROWS]; R],
    ) {
        let nb = acts.k / QK;
        debug_assert!(w.len() >= nb * 544 && row0 + R <= acts.m);
        let mut acc = [_mm512_setzero_ps(); R];
        let flip = _mm512_set1_epi8(-128);
        let wp = w.as_ptr();
        let xq = acts.qs.as_ptr();
        let xds = acts.ds.as_ptr();
        let sums = acts.sums.as_ptr();
        for b in 0..nb {
            unsafe {
                let tb = wp.add(b * 544);
                prefetch_ahead(tb, 544);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(tb as *const __m256i));
                // Even and odd groups in two sums per row, added after (as in `q4_1`).
                let mut dot = [[_mm512_setzero_si512(); R]; 2];
                for g in 0..8 {
                    let q = _mm512_loadu_si512(tb.add(32 + 64 * g) as *const __m512i);
                    let uq = _mm512_xor_si512(q, flip);
                    for r in 0..R {
                        let x = xq.add((row0 + r) * acts.k + b * QK);
                        let xg = _mm512_set1_epi32((x.add(4 * g) as *const i32).read_unaligned());
                        dot[g % 2][r] = _mm512_dpbusd_epi32(dot[g % 2][r], uq, xg);
                    }
                }
                for r in 0..R {
                    let at = (row0 + r) * nb + b;
                    let [dx, _] = *xds.add(at);
                    let sum = _mm512_add_epi32(dot[0][r], dot[1][r]);
                    let exact = _mm512_sub_epi32(sum, _mm512_set1_epi32(*sums.add(at) << 7));
                    let dot = _mm512_cvtepi32_ps(exact);
                    acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc[r]);
                }
            }
        }
        for r in 0..R {
            // SAFETY: sixteen floats, one row.
            unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
        }
    }

    /// Nibble group `g`'s values with their fifth bits from the word `h` ([`super::fifth_bits`]):
    /// the low nibbles' (elements `4g..4g+4`) and the high nibbles' (`16+4g..`).
    macro_rules! five_bits_512 {
        ($q:expr, $h:expr, $g:expr) => {{
            let (q, h, low, bit) = ($q, $h, _mm512_set1_epi8(0xF), _mm512_set1_epi8(0x10));
            let (hl, hh) = match $g {
                0 => (_mm512_slli_epi32::<4>(h), h),
                1 => (_mm512_slli_epi32::<3>(h), _mm512_srli_epi32::<1>(h)),
                2 => (_mm512_slli_epi32::<2>(h), _mm512_srli_epi32::<2>(h)),
                _ => (_mm512_slli_epi32::<1>(h), _mm512_srli_epi32::<3>(h)),
            };
            (
                _mm512_or_si512(_mm512_and_si512(q, low), _mm512_and_si512(hl, bit)),
                _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(q), low),
                    _mm512_and_si512(hh, bit),
                ),
            )
        }};
    }

    /// `R` activation rows from `row0` times one packed Q4_K tile (`FIVE`: Q5_K): [`q4_1`]
    /// with each block's `d·sc` and `−dmin·m` made from the rows' bytes.
    ///
    /// # Safety
    /// `w` is a packed Q4_K (Q5_K) tile of `acts.k / 256` super-blocks; rows
    /// `row0..row0 + R` exist.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn q4_k<const R: usize, const FIVE: bool>(
        w: &[u8],
        acts: &Acts,
        row0: usize,
        out: &mut [[f32; ROWS]; R],
    ) {
        let kind = if FIVE { Kind::Q5K } else { Kind::Q4K };
        let (block, sup_bytes) = (kind.k_tile_block(), kind.super_bytes().expect("K-quant").1);
        let nb = acts.k / QK;
        debug_assert!(w.len() >= nb / 8 * sup_bytes && row0 + R <= acts.m);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut acc_m = [_mm512_setzero_ps(); R];
        let low = _mm512_set1_epi8(0xF);
        let byte = _mm512_set1_epi32(0xFF);
        let wp = w.as_ptr();
        let xq = acts.qs.as_ptr();
        let xds = acts.ds.as_ptr();
        for b in 0..nb {
            unsafe {
                let sup = wp.add(b / 8 * sup_bytes);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(sup as *const __m256i));
                let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(sup.add(2 * ROWS) as *const __m256i));
                let tb = sup.add(4 * ROWS + b % 8 * block);
                prefetch_ahead(tb, block);
                let scm = _mm512_cvtepu8_epi16(_mm256_loadu_si256(tb as *const __m256i));
                let dw = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(scm, byte)));
                let mw = _mm512_mul_ps(
                    _mm512_sub_ps(_mm512_setzero_ps(), dmin),
                    _mm512_cvtepi32_ps(_mm512_srli_epi32::<16>(scm)),
                );
                let words = tb.add(2 * ROWS);
                // Q4_K's tile block ends before it.
                let h = match FIVE {
                    true => _mm512_loadu_si512(words.add(256) as *const __m512i),
                    false => _mm512_setzero_si512(),
                };
                let mut dot = [_mm512_setzero_si512(); R];
                let mut doth = [_mm512_setzero_si512(); R];
                for g in 0..4 {
                    let q = _mm512_loadu_si512(words.add(64 * g) as *const __m512i);
                    let (lo, hi) = if FIVE {
                        five_bits_512!(q, h, g)
                    } else {
                        (
                            _mm512_and_si512(q, low),
                            _mm512_and_si512(_mm512_srli_epi16::<4>(q), low),
                        )
                    };
                    for r in 0..R {
                        let x = xq.add((row0 + r) * acts.k + b * QK);
                        let xl = _mm512_set1_epi32((x.add(4 * g) as *const i32).read_unaligned());
                        let xh =
                            _mm512_set1_epi32((x.add(16 + 4 * g) as *const i32).read_unaligned());
                        dot[r] = _mm512_dpbusd_epi32(dot[r], lo, xl);
                        doth[r] = _mm512_dpbusd_epi32(doth[r], hi, xh);
                    }
                }
                for r in 0..R {
                    let [dx, sx] = *xds.add((row0 + r) * nb + b);
                    let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(dot[r], doth[r]));
                    acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc[r]);
                    acc_m[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(sx), acc_m[r]);
                }
            }
        }
        for r in 0..R {
            let y = _mm512_add_ps(acc[r], acc_m[r]);
            // SAFETY: sixteen floats, one row.
            unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), y) };
        }
    }

    /// `R` activation rows from `row0` times one packed Q4_0 tile (`FIVE`: Q5_0): the four-
    /// (five-) bit values times the activations (`vpdpbusd`), less `8·Σx` (`16·Σx`).
    ///
    /// # Safety
    /// `w` is a packed Q4_0 (Q5_0) tile of `acts.k / 32` blocks; rows `row0..row0 + R` exist.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn q4_0<const R: usize, const FIVE: bool>(
        w: &[u8],
        acts: &Acts,
        row0: usize,
        out: &mut [[f32; ROWS]; R],
    ) {
        let kind = if FIVE { Kind::Q5_0 } else { Kind::Q4_0 };
        let (block, offset) = (ROWS * kind.block_bytes(), kind.offset());
        let nb = acts.k / QK;
        debug_assert!(w.len() >= nb * block && row0 + R <= acts.m);
        let low = _mm512_set1_epi8(0xF);
        let mut acc = [_mm512_setzero_ps(); R];
        let wp = w.as_ptr();
        let xq = acts.qs.as_ptr();
        let xds = acts.ds.as_ptr();
        let sums = acts.sums.as_ptr();
        for b in 0..nb {
            unsafe {
                let tb = wp.add(b * block);
                prefetch_ahead(tb, block);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(tb as *const __m256i));
                let words = tb.add(32);
                // Q4_0's tile block ends before it.
                let h = match FIVE {
                    true => _mm512_loadu_si512(words.add(256) as *const __m512i),
                    false => _mm512_setzero_si512(),
                };
                // Each row's sum starts at −offset·Σx (exact: the products are added to it).
                let mut dot: [__m512i; R] = std::array::from_fn(|r| {
                    _mm512_set1_epi32(-*sums.add((row0 + r) * nb + b) * offset)
                });
                let mut doth = [_mm512_setzero_si512(); R];
                for g in 0..4 {
                    let q = _mm512_loadu_si512(words.add(64 * g) as *const __m512i);
                    let (lo, hi) = if FIVE {
                        five_bits_512!(q, h, g)
                    } else {
                        (
                            _mm512_and_si512(q, low),
                            _mm512_and_si512(_mm512_srli_epi16::<4>(q), low),
                        )
                    };
                    for r in 0..R {
                        let x = xq.add((row0 + r) * acts.k + b * QK);
                        let xl = _mm512_set1_epi32((x.add(4 * g) as *const i32).read_unaligned());
                        let xh =
                            _mm512_set1_epi32((x.add(16 + 4 * g) as *const i32).read_unaligned());
                        dot[r] = _mm512_dpbusd_epi32(dot[r], lo, xl);
                        doth[r] = _mm512_dpbusd_epi32(doth[r], hi, xh);
                    }
                }
                for r in 0..R {
                    let at = (row0 + r) * nb + b;
                    let [dx, _] = *xds.add(at);
                    let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(dot[r], doth[r]));
                    acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc[r]);
                }
            }
        }
        for r in 0..R {
            // SAFETY: sixteen floats, one row.
            unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
        }
    }

    /// `R` activation rows from `row0` times one packed IQ4_NL tile (`MODE` [`XS`]: a coded
    /// one, IQ4_XS's layout; [`XS16`]: scaled per 16): as [`q4_0`], each nibble looked up
    /// (`vpshufb`) as its value in `codes` plus 128, `128·Σx` taken off; a coded tile's
    /// `d_w = d·factor·l` made from the rows' super-block `d` and block bytes; per 16, each
    /// half's sum (`128·Σx` of its own taken off) weighed by its `l` in integers (`vpmulld`).
    ///
    /// # Safety
    /// `w` is a packed IQ4_NL (coded) tile of `acts.k / 32` blocks; rows `row0..row0 + R`
    /// exist.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn iq4<const R: usize, const MODE: u8>(
        w: &[u8],
        codes: &Codes,
        acts: &Acts,
        row0: usize,
        out: &mut [[f32; ROWS]; R],
    ) {
        let (block, sup_bytes, head) = match MODE {
            NL => (ROWS * Kind::Iq4Nl.block_bytes(), 0, 2 * ROWS),
            _ => coded_layout(MODE == XS16),
        };
        let nb = acts.k / QK;
        debug_assert!(w.len() >= nb * block && row0 + R <= acts.m);
        let low = _mm512_set1_epi8(0xF);
        // SAFETY: sixteen bytes. Each value plus 128: its bits with the top one flipped.
        let table = unsafe { _mm_loadu_si128(codes.values.as_ptr() as *const __m128i) };
        let table = _mm512_broadcast_i32x4(_mm_xor_si128(table, _mm_set1_epi8(-128)));
        let factor = _mm512_set1_ps(codes.factor);
        let mut acc = [_mm512_setzero_ps(); R];
        let wp = w.as_ptr();
        let xq = acts.qs.as_ptr();
        let xds = acts.ds.as_ptr();
        let sums = acts.sums.as_ptr();
        let halves = match MODE {
            XS16 => acts.halves().as_ptr(),
            _ => sums,
        };
        for b in 0..nb {
            unsafe {
                let (sup, tb) = match MODE {
                    NL => (wp.add(b * block), wp.add(b * block)),
                    _ => {
                        let sup = wp.add(b / 8 * sup_bytes);
                        (sup, sup.add(2 * ROWS + b % 8 * block))
                    }
                };
                prefetch_ahead(tb, block);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(sup as *const __m256i));
                let l = |at: usize| _mm512_cvtepi8_epi32(_mm_loadu_si128(tb.add(at) as *const _));
                let dw = match MODE {
                    NL => d,
                    XS => _mm512_mul_ps(_mm512_mul_ps(d, factor), _mm512_cvtepi32_ps(l(0))),
                    _ => _mm512_mul_ps(d, factor),
                };
                let words = tb.add(head);
                let (mut dot, mut doth): ([__m512i; R], [__m512i; R]) = match MODE {
                    XS16 => {
                        // Each half's Σx, a 16-bit half of a word ([`super::Acts::halves`]).
                        let s = |r: usize| *halves.add((row0 + r) * nb + b);
                        (
                            std::array::from_fn(|r| _mm512_set1_epi32(-128 * (s(r) as i16 as i32))),
                            std::array::from_fn(|r| _mm512_set1_epi32(-128 * (s(r) >> 16))),
                        )
                    }
                    _ => (
                        std::array::from_fn(|r| {
                            _mm512_set1_epi32(-128 * *sums.add((row0 + r) * nb + b))
                        }),
                        [_mm512_setzero_si512(); R],
                    ),
                };
                for g in 0..4 {
                    let q = _mm512_loadu_si512(words.add(64 * g) as *const __m512i);
                    let lo = _mm512_shuffle_epi8(table, _mm512_and_si512(q, low));
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), low);
                    let hi = _mm512_shuffle_epi8(table, hi);
                    for r in 0..R {
                        let x = xq.add((row0 + r) * acts.k + b * QK);
                        let xl = _mm512_set1_epi32((x.add(4 * g) as *const i32).read_unaligned());
                        let xh =
                            _mm512_set1_epi32((x.add(16 + 4 * g) as *const i32).read_unaligned());
                        dot[r] = _mm512_dpbusd_epi32(dot[r], lo, xl);
                        doth[r] = _mm512_dpbusd_epi32(doth[r], hi, xh);
                    }
                }
                let (l0, l1) = match MODE {
                    XS16 => (l(0), l(ROWS)),
                    _ => (_mm512_setzero_si512(), _mm512_setzero_si512()),
                };
                for r in 0..R {
                    let [dx, _] = *xds.add((row0 + r) * nb + b);
                    let sum = match MODE {
                        XS16 => _mm512_add_epi32(
                            _mm512_mullo_epi32(dot[r], l0),
                            _mm512_mullo_epi32(doth[r], l1),
                        ),
                        _ => _mm512_add_epi32(dot[r], doth[r]),
                    };
                    let sum = _mm512_cvtepi32_ps(sum);
                    acc[r] = _mm512_fmadd_ps(sum, _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc[r]);
                }
            }
        }
        for r in 0..R {
            // SAFETY: sixteen floats, one row.
            unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
        }
    }

    /// `R` activation rows from `row0` times one packed Q6_K tile: as [`q4_1`], the six-bit
    /// values being the nibbles with their high bits shifted beside them
    /// ([`super::Kind::pack_q6k`]); each sub-block's sum in its own register, weighed by its
    /// scale in integers (`vpmulld`), `32·Σx` weighed by both taken off. `BITS` 3: Q3_K, its
    /// three-bit values the nibbles alone ([`super::Kind::pack_q3k`]), `4·Σx` taken off; 2:
    /// Q2_K, nothing taken off, its mins weighing `Σx` by halves apart (`vpmaddwd`), as
    /// [`super::scalar_q6k`] defines.
    ///
    /// # Safety
    /// `w` is a packed Q6_K (Q3_K, Q2_K) tile of `acts.k / 256` super-blocks; rows
    /// `row0..row0 + R` exist.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn q6_k<const R: usize, const BITS: u8>(
        w: &[u8],
        acts: &Acts,
        row0: usize,
        out: &mut [[f32; ROWS]; R],
    ) {
        let nb = acts.k / QK;
        let (block, sup_bytes, offset, head) = match BITS {
            3 => (Q3K_TILE_BLOCK, Q3K_TILE_SUPER, 4, 2 * ROWS),
            2 => (Q2K_TILE_BLOCK, Q2K_TILE_SUPER, 0, 4 * ROWS),
            _ => (Q6K_TILE_BLOCK, Q6K_TILE_SUPER, 32, 2 * ROWS),
        };
        debug_assert!(w.len() >= nb / 8 * sup_bytes && row0 + R <= acts.m);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut acc_m = [_mm512_setzero_ps(); R];
        let low = _mm512_set1_epi8(0xF);
        let high = _mm512_set1_epi8(0x30);
        let wp = w.as_ptr();
        let xq = acts.qs.as_ptr();
        let xds = acts.ds.as_ptr();
        let halves = acts.halves().as_ptr();
        for b in 0..nb {
            unsafe {
                let sup = wp.add(b / 8 * sup_bytes);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(sup as *const __m256i));
                let tb = sup.add(head + b % 8 * block);
                prefetch_ahead(tb, block);
                let sc = _mm512_cvtepi8_epi16(_mm256_loadu_si256(tb as *const __m256i));
                let c0 = _mm512_srai_epi32::<16>(_mm512_slli_epi32::<16>(sc));
                let c1 = _mm512_srai_epi32::<16>(sc);
                let words = tb.add(head);
                // Q3_K's and Q2_K's tile blocks end before them.
                let (h0, h1) = match BITS {
                    6 => (
                        _mm512_loadu_si512(words.add(256) as *const __m512i),
                        _mm512_loadu_si512(words.add(320) as *const __m512i),
                    ),
                    _ => (_mm512_setzero_si512(), _mm512_setzero_si512()),
                };
                // Each sub-block's sum starts at −32·Σx (Q3_K: −4·Σx; exact: the products are
                // added to it, then the whole is weighed by the sub-block's scale).
                let start = |r: usize, half: usize| {
                    let s = *halves.add((row0 + r) * nb + b);
                    let s = if half == 0 { s as i16 as i32 } else { s >> 16 };
                    _mm512_set1_epi32(-offset * s)
                };
                let mut dot: [__m512i; R] = std::array::from_fn(|r| start(r, 0));
                let mut doth: [__m512i; R] = std::array::from_fn(|r| start(r, 1));
                for g in 0..4 {
                    let q = _mm512_loadu_si512(words.add(64 * g) as *const __m512i);
                    let (hl, hh) = match g {
                        0 => (_mm512_slli_epi32::<4>(h0), _mm512_slli_epi32::<4>(h1)),
                        1 => (_mm512_slli_epi32::<2>(h0), _mm512_slli_epi32::<2>(h1)),
                        2 => (h0, h1),
                        _ => (_mm512_srli_epi32::<2>(h0), _mm512_srli_epi32::<2>(h1)),
                    };
                    let lo = _mm512_or_si512(_mm512_and_si512(q, low), _mm512_and_si512(hl, high));
                    let hi = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(q), low),
                        _mm512_and_si512(hh, high),
                    );
                    for r in 0..R {
                        let x = xq.add((row0 + r) * acts.k + b * QK);
                        let xl = _mm512_set1_epi32((x.add(4 * g) as *const i32).read_unaligned());
                        let xh =
                            _mm512_set1_epi32((x.add(16 + 4 * g) as *const i32).read_unaligned());
                        dot[r] = _mm512_dpbusd_epi32(dot[r], lo, xl);
                        doth[r] = _mm512_dpbusd_epi32(doth[r], hi, xh);
                    }
                }
                for r in 0..R {
                    let [dx, _] = *xds.add((row0 + r) * nb + b);
                    let sum = _mm512_add_epi32(
                        _mm512_mullo_epi32(dot[r], c0),
                        _mm512_mullo_epi32(doth[r], c1),
                    );
                    let sum = _mm512_cvtepi32_ps(sum);
                    acc[r] = _mm512_fmadd_ps(sum, _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc[r]);
                    if BITS == 2 {
                        let m = _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                            tb.add(2 * ROWS) as *const __m256i
                        ));
                        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(
                            sup.add(2 * ROWS) as *const __m256i
                        ));
                        let s = _mm512_set1_epi32(*halves.add((row0 + r) * nb + b));
                        let msum = _mm512_cvtepi32_ps(_mm512_madd_epi16(m, s));
                        let w = _mm512_mul_ps(
                            _mm512_sub_ps(_mm512_setzero_ps(), dmin),
                            _mm512_set1_ps(dx),
                        );
                        acc_m[r] = _mm512_fmadd_ps(msum, w, acc_m[r]);
                    }
                }
            }
        }
        for r in 0..R {
            let y = match BITS {
                2 => _mm512_add_ps(acc[r], acc_m[r]),
                _ => acc[r],
            };
            // SAFETY: sixteen floats, one row.
            unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), y) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::ggml_file;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `x · Wᵀ` by candle's `QMatMul` on `w` quantised to `dtype` (`m` rows of `x`).
    fn candle_product(w: &Tensor, dtype: GgmlDType, x: &[f32], m: usize) -> Vec<f32> {
        let k = w.dims()[1];
        let mm = QMatMul::from_qtensor(QTensor::quantize(w, dtype).unwrap()).unwrap();
        let xt = Tensor::from_slice(x, (m, k), &Device::Cpu).unwrap();
        mm.forward(&xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n).map(|_| lcg(&mut s)).collect()
    }

    /// A weight type of the tests: candle's, or an i-quant.
    #[derive(Debug, Clone, Copy)]
    enum Ty {
        C(GgmlDType),
        I(IQuant),
    }
    use Ty::{C, I};

    impl Ty {
        fn block(self) -> usize {
            match self {
                C(dtype) => dtype.block_size(),
                I(kind) => kind.block(),
            }
        }
    }

    /// An `(n, k)` matrix of `ty` (an i-quant: [`iquant_bytes`]) and its values.
    fn weights(ty: Ty, n: usize, k: usize) -> (QMat, Vec<f32>) {
        let w = Tensor::from_vec(random(n * k, 7), (n, k), &Device::Cpu).unwrap();
        let q = match ty {
            I(kind) => {
                iquant::qtensor(kind, iquant_bytes(kind, n * k), &[n, k], &Device::Cpu).unwrap()
            }
            C(dtype) => QTensor::quantize(&w, dtype).unwrap(),
        };
        let dense = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (QMat::from_qtensor(q).unwrap(), dense)
    }

    /// `count` values of i-quant `kind` (kandle does not quantise to them): random codes,
    /// signs and scales, and scales `d` of 1/64 to 1/32 (IQ1_M's in its scales' top nibbles).
    fn iquant_bytes(kind: IQuant, count: usize) -> Vec<u8> {
        let mut seed = 11u64;
        let mut byte = || ((lcg(&mut seed) + 1.0) * 128.0) as u8;
        (0..count / kind.block())
            .flat_map(|_| {
                let d = f16::from_f32((2.0 + byte() as f32 / 128.0) / 128.0).to_bits();
                let mut b: Vec<u8> = d.to_le_bytes().to_vec();
                b.extend((2..kind.block_bytes()).map(|_| byte()));
                if kind == IQuant::Iq1M {
                    for i in 0..4 {
                        b[49 + 2 * i] = b[49 + 2 * i] & 0x0F | ((d >> (4 * i)) as u8 & 15) << 4;
                    }
                }
                b
            })
            .collect()
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
        assert_eq!(Isa::parse_cap(""), Some(Isa::Amx));
        assert_eq!(Isa::parse_cap("avx512"), Some(Isa::Avx512Vnni));
        assert_eq!(Isa::Amx.min(Isa::Avx512Vnni), Isa::Avx512Vnni);
        assert_eq!(Isa::parse_cap(" AVX2 "), Some(Isa::Avx2));
        assert_eq!(Isa::parse_cap("scalar"), Some(Isa::Scalar));
        assert_eq!(Isa::parse_cap("sse"), None);
        assert_eq!(Isa::Avx512Vnni.min(Isa::Avx2), Isa::Avx2);
        assert_eq!(Isa::Avx2.min(Isa::Avx512Vnni), Isa::Avx2);
        assert_eq!(Isa::Scalar.min(Isa::Avx2), Isa::Scalar);
    }

    fn isas() -> Vec<Isa> {
        match Isa::detect() {
            Isa::Amx | Isa::Avx512Vnni => vec![Isa::Avx512Vnni, Isa::Avx2, Isa::Scalar],
            Isa::Avx2 => vec![Isa::Avx2, Isa::Scalar],
            Isa::Scalar => vec![Isa::Scalar],
        }
    }

    #[test]
    fn kernels_match_the_dequantised_product_for_every_tile_size() {
        eprintln!("kernels tested: {:?}", isas());
        for (dtype, ks) in [
            (C(GgmlDType::Q4_1), [96, 128]),
            (C(GgmlDType::Q8_0), [96, 128]),
            (C(GgmlDType::Q4_0), [96, 128]),
            (C(GgmlDType::Q5_0), [96, 128]),
            (C(GgmlDType::Q6K), [256, 768]),
            (C(GgmlDType::Q4K), [256, 768]),
            (C(GgmlDType::Q5K), [256, 768]),
            (C(GgmlDType::Q3K), [256, 768]),
            (C(GgmlDType::Q2K), [256, 768]),
            (I(IQuant::Iq4Nl), [96, 128]),
            (I(IQuant::Iq4Xs), [256, 768]),
            (I(IQuant::Iq3S), [256, 768]),
            (I(IQuant::Iq3Xxs), [256, 768]),
            (I(IQuant::Iq2Xxs), [256, 768]),
            (I(IQuant::Iq1S), [256, 768]),
            (I(IQuant::Iq2S), [256, 768]),
            (I(IQuant::Iq2Xs), [256, 768]),
            (I(IQuant::Iq1M), [256, 768]),
        ] {
            // Odd and even block (Q6_K: super-block) counts; 37 rows: two full tiles and a
            // padded one.
            for k in ks {
                let n = 37;
                let (mat, dense) = weights(dtype, n, k);
                let QMat::Own { kind, data, .. } = &mat else {
                    panic!("{dtype:?} has no kernel")
                };
                let tile_bytes = kind.tile_bytes(k);
                for m in [1, 2, 3, 4, 5, 7, 8, 9, 17] {
                    let x = random(m * k, 3 + m as u64);
                    let acts = Acts::quantize(&x, m, k);
                    let want = reference(&acts, &dense, n);
                    let scalar: Vec<f32> = (0..m * n)
                        .map(|idx| {
                            let (i, j) = (idx / n, idx % n);
                            let tile = &data[j / ROWS * tile_bytes..][..tile_bytes];
                            scalar_tile(*kind, tile, &acts, i)[j % ROWS]
                        })
                        .collect();
                    for (s, w) in scalar.iter().zip(&want) {
                        // The Q4_1 offset term uses s_x = d_x·Σq rounded to f16 (~5e-4
                        // relative per block); a wrongly unpacked block (or Q6_K value, high
                        // bits or scale) is off by O(1).
                        let tol = 1e-2 * (1.0 + w.abs());
                        assert!(
                            (*s as f64 - w).abs() < tol,
                            "{dtype:?} k={k} m={m}: {s} vs {w}"
                        );
                    }
                    for isa in isas() {
                        let got = mat.forward_quantized(&acts, isa);
                        for (idx, (g, s)) in got.iter().zip(&scalar).enumerate() {
                            // The same bits on every CPU.
                            assert_eq!(
                                g.to_bits(),
                                s.to_bits(),
                                "{isa:?} {dtype:?} k={k} m={m} [{}, {}]: {g} vs scalar {s}",
                                idx / n,
                                idx % n
                            );
                        }
                    }
                    // Through forward, with the detected kernel.
                    let y = mat.forward(&x, m).unwrap();
                    for (g, s) in y.iter().zip(&scalar) {
                        assert_eq!(g.to_bits(), s.to_bits(), "forward {g} vs {s}");
                    }
                }
            }
        }
    }

    /// The SIMD kernels sum some products in 16-bit lanes before widening them: every type's
    /// largest values times activations of ±127 (every value of a row quantised to the
    /// same magnitude) keep the plain-Rust kernel's bits, as random weights never test.
    #[test]
    fn the_largest_values_stay_exact_on_every_path() {
        let one = f16::ONE.to_bits().to_le_bytes();
        // One block (or super-block) of each type with every value at its largest.
        let blocks: [(Ty, Vec<u8>); 12] = [
            (C(GgmlDType::Q4_0), [&one[..], &[0xFF; 16]].concat()),
            (
                C(GgmlDType::Q4_1),
                [&one[..], &[0, 0], &[0xFF; 16]].concat(),
            ),
            (C(GgmlDType::Q8_0), [&one[..], &[0x80; 32]].concat()),
            (C(GgmlDType::Q5_0), [&one[..], &[0xFF; 20]].concat()),
            // d, dmin, six-bit scales and mins of 63, every value 15 (Q5_K: 31).
            (C(GgmlDType::Q4K), [&one[..], &one, &[0xFF; 140]].concat()),
            (C(GgmlDType::Q5K), [&one[..], &one, &[0xFF; 172]].concat()),
            // Every value 63, the scales −128.
            (
                C(GgmlDType::Q6K),
                [&[0xFF; 192][..], &[0x80; 16], &one].concat(),
            ),
            // Every value −4 (no high bits), the scales −32 (six bits of 0).
            (C(GgmlDType::Q3K), [&[0; 108][..], &one].concat()),
            // Every value 3, the scales and mins 15.
            (C(GgmlDType::Q2K), [&[0xFF; 80][..], &one, &one].concat()),
            // Every code 0 (−127); IQ4_XS's scales 0 (l − 32 = −32).
            (I(IQuant::Iq4Nl), [&one[..], &[0; 16]].concat()),
            (I(IQuant::Iq4Xs), [&one[..], &[0; 134]].concat()),
            // Grid entry 511 (values of 43), every sign set, both scales 15 (`l` = 31).
            (I(IQuant::Iq2Xs), [&one[..], &[0xFF; 72]].concat()),
        ];
        for (dtype, block) in blocks {
            let (n, k) = (16, 512);
            let per_row = k / dtype.block();
            let raw = block.repeat(n * per_row);
            let q = match dtype {
                I(kind) => iquant::qtensor(kind, raw, &[n, k], &Device::Cpu),
                C(dtype) => ggml_file::qtensor_from_ggml(dtype, &raw, vec![n, k], &Device::Cpu),
            };
            let q = q.unwrap();
            let mat = QMat::from_qtensor(q).unwrap();
            let QMat::Own { kind, data, .. } = &mat else {
                panic!("{dtype:?} has no kernel")
            };
            // Rows of +1, of −1, and of both by halves of a block.
            let x: Vec<f32> = (0..3 * k)
                .map(|i| match i / k {
                    0 => 1.0,
                    1 => -1.0,
                    _ if i % 32 < 16 => 1.0,
                    _ => -1.0,
                })
                .collect();
            let acts = Acts::quantize(&x, 3, k);
            let scalar: Vec<f32> = (0..3)
                .flat_map(|i| scalar_tile(*kind, &data[..], &acts, i))
                .collect();
            for isa in isas() {
                let got = mat.forward_quantized(&acts, isa);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&scalar), "{isa:?} {dtype:?}");
            }
        }
    }

    /// Q5_0's values `q − 16` are Q8_0's exactly (as the file converted to Q8_0 holds them),
    /// and the Q5_0 kernel's integer sums are those: the same bits as that Q8_0 matrix.
    #[test]
    fn q5_0_gives_the_bits_of_its_values_as_q8_0() {
        let (n, k, m) = (37, 256, 9);
        let w = Tensor::from_vec(random(n * k, 23), (n, k), &Device::Cpu).unwrap();
        let q5 = || QTensor::quantize(&w, GgmlDType::Q5_0).unwrap();
        let w8 = Tensor::from_vec(random(16 * k, 31), (16, k), &Device::Cpu).unwrap();
        let q8 = QTensor::quantize(&w8, GgmlDType::Q8_0).unwrap();
        let as_q8_0 = super::super::convert::to_kernel_types(vec![q5(), q8]).unwrap();
        let q5_0 = QMat::from_qtensor(q5()).unwrap();
        let q8_0 = QMat::from_qtensor(as_q8_0.into_iter().next().unwrap()).unwrap();
        assert!(matches!(
            q5_0,
            QMat::Own {
                kind: Kind::Q5_0,
                ..
            }
        ));
        assert!(matches!(
            q8_0,
            QMat::Own {
                kind: Kind::Q8_0,
                ..
            }
        ));
        same_bits_on_every_isa(&q5_0, &q8_0, &Acts::quantize(&random(m * k, 29), m, k));
    }

    /// `a` and `b` give the same bits for `acts` on every instruction set present.
    fn same_bits_on_every_isa(a: &QMat, b: &QMat, acts: &Acts) {
        for isa in isas() {
            let (a, b) = (
                a.forward_quantized(acts, isa),
                b.forward_quantized(acts, isa),
            );
            assert!(
                a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{isa:?}"
            );
        }
    }

    /// Q3_K's values `(sc − 32)·(u − 4)` are Q6_K's `scale·(q − 32)` with `q = u + 28`: the
    /// Q3_K kernels (Q6_K's with narrower values) give the bits of that Q6_K matrix.
    #[test]
    fn q3_k_gives_the_bits_of_its_values_as_q6_k() {
        let (n, k, m) = (37, 512, 9);
        let w = Tensor::from_vec(random(n * k, 47), (n, k), &Device::Cpu).unwrap();
        let q3 = QTensor::quantize(&w, GgmlDType::Q3K).unwrap();
        // Each super-block written as ggml's Q6_K lays it out (`q6k_values` undone).
        let q6: Vec<u8> = (q3.data().unwrap().chunks_exact(Q3K_BLOCK))
            .flat_map(|raw| {
                let (u, scales, d) = q3k_values(raw);
                let q: Vec<u8> = u.iter().map(|u| u + 28).collect();
                let mut out = vec![0u8; Q6K_BLOCK];
                for h in 0..2 {
                    let y = 128 * h;
                    for l in 0..32 {
                        let v = |o: usize| q[y + l + o];
                        out[64 * h + l] = (v(0) & 15) | (v(64) & 15) << 4;
                        out[64 * h + l + 32] = (v(32) & 15) | (v(96) & 15) << 4;
                        out[128 + 32 * h + l] =
                            v(0) >> 4 | (v(32) >> 4) << 2 | (v(64) >> 4) << 4 | (v(96) >> 4) << 6;
                    }
                }
                for (o, sc) in out[192..208].iter_mut().zip(scales) {
                    *o = sc as u8;
                }
                out[208..].copy_from_slice(&d);
                assert_eq!(q6k_values(&out).0[..], q[..], "Q6_K written as read");
                out
            })
            .collect();
        let q6 = ggml_file::qtensor_from_ggml(GgmlDType::Q6K, &q6, vec![n, k], &Device::Cpu);
        let (q3, q6) = (
            QMat::from_qtensor(q3).unwrap(),
            QMat::from_qtensor(q6.unwrap()).unwrap(),
        );
        assert!(matches!(
            q3,
            QMat::Own {
                kind: Kind::Q3K,
                ..
            }
        ));
        same_bits_on_every_isa(&q3, &q6, &Acts::quantize(&random(m * k, 53), m, k));
    }

    #[test]
    fn packing_round_trips_every_block() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (n, k) = (21, 64);
            let w = Tensor::from_vec(random(n * k, 19), (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let raw = q.data().unwrap().into_owned();
            let mat = QMat::from_qtensor(q).unwrap();
            let QMat::Own { kind, .. } = &mat else {
                panic!("{dtype:?} has no kernel")
            };
            let bb = kind.block_bytes();
            let mut blk = vec![0u8; bb];
            for j in 0..n {
                for b in 0..k / QK {
                    mat.raw_block(j, b, &mut blk);
                    assert_eq!(blk, raw[(j * k / QK + b) * bb..][..bb], "{dtype:?} {j} {b}");
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
            let mat = QMat::from_qtensor(q).unwrap();
            let x = random(m * k, 5);
            let want = candle_product(&w, dtype, &x, m);
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
        let tensor = |dtype, n, seed| {
            let w = Tensor::from_vec(random(n * 64, seed), (n, 64), &Device::Cpu).unwrap();
            QTensor::quantize(&w, dtype).unwrap()
        };
        let parts = [
            (GgmlDType::Q4_1, 16, 1),
            (GgmlDType::Q4_1, 8, 2),
            (GgmlDType::Q8_0, 8, 3),
        ];
        let x = random(3 * 64, 9);
        let alone: Vec<Vec<f32>> = parts
            .iter()
            .map(|&(dt, n, seed)| {
                let m = QMat::from_qtensor(tensor(dt, n, seed)).unwrap();
                m.forward(&x, 3).unwrap()
            })
            .collect();
        let merged = QMat::from_qtensors(
            parts[..2]
                .iter()
                .map(|&(dt, n, seed)| tensor(dt, n, seed))
                .collect(),
        )
        .unwrap();
        assert!(matches!(merged, QMat::Own { n: 24, .. }));
        let y = merged.forward(&x, 3).unwrap();
        let mixed = QMat::from_qtensors(
            parts
                .iter()
                .map(|&(dt, n, seed)| tensor(dt, n, seed))
                .collect(),
        )
        .unwrap();
        assert!(matches!(mixed, QMat::Stack(_)));
        let ym = mixed.forward(&x, 3).unwrap();
        for i in 0..3 {
            assert_eq!(&y[i * 24..i * 24 + 16], &alone[0][i * 16..(i + 1) * 16]);
            assert_eq!(&y[i * 24 + 16..(i + 1) * 24], &alone[1][i * 8..(i + 1) * 8]);
            let row = &ym[i * 32..(i + 1) * 32];
            assert_eq!(&row[..24], &y[i * 24..(i + 1) * 24]);
            assert_eq!(&row[24..], &alone[2][i * 8..(i + 1) * 8]);
        }
    }

    #[test]
    fn float_types_go_through_candle_and_stack_with_ours() {
        // f32: a type without our kernel (some GGUF files keep a matrix unquantised).
        let (n, k, m) = (16, 256, 3);
        let w = Tensor::from_vec(random(n * k, 13), (n, k), &Device::Cpu).unwrap();
        let dense = QMat::from_qtensor(QTensor::quantize(&w, GgmlDType::F32).unwrap()).unwrap();
        assert!(matches!(dense, QMat::Candle { n: 16, k: 256, .. }));
        assert!(dense.dequantize_row(0, &mut [0f32; 256]).is_none());
        let x = random(m * k, 17);
        let want = candle_product(&w, GgmlDType::F32, &x, m);
        assert_eq!(dense.forward(&x, m).unwrap(), want);
        let (ours, _) = weights(C(GgmlDType::Q4_1), 8, 256);
        let y_ours = ours.forward(&x, m).unwrap();
        let ours_w = Tensor::from_vec(random(8 * 256, 7), (8, 256), &Device::Cpu).unwrap();
        let both = QMat::from_qtensors(vec![
            QTensor::quantize(&w, GgmlDType::F32).unwrap(),
            QTensor::quantize(&ours_w, GgmlDType::Q4_1).unwrap(),
        ])
        .unwrap();
        assert_eq!((both.n(), both.k()), (24, 256));
        let y = both.forward(&x, m).unwrap();
        for i in 0..m {
            assert_eq!(&y[i * 24..i * 24 + 16], &want[i * 16..(i + 1) * 16]);
            assert_eq!(&y[i * 24 + 16..(i + 1) * 24], &y_ours[i * 8..(i + 1) * 8]);
        }
    }

    /// The hub's other quantised types are converted at load ([`super::super::convert`])
    /// or, Q6_K, packed as they are: products on our kernels, close to candle's on the
    /// file's own type (which quantises the activations per 256 for the K-quants), and a
    /// fused QKV of a Q4_K_M file's Q5_0 and Q8_0 parts is one matrix of ours.
    #[test]
    fn other_quantised_types_run_on_our_kernels_after_conversion() {
        let (k, m) = (512, 5);
        let x = random(m * k, 21);
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q3K,
            GgmlDType::Q2K,
        ] {
            let w = Tensor::from_vec(random(24 * k, 31), (24, k), &Device::Cpu).unwrap();
            let mat = QMat::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
            assert!(matches!(mat, QMat::Own { n: 24, .. }), "{dtype:?}");
            let want = candle_product(&w, dtype, &x, m);
            let got = mat.forward(&x, m).unwrap();
            // Both quantise the activations to 8 bits (per 32 here, per 256 or 32 there):
            // the outputs agree to a small part of their spread.
            let spread = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 0.02 * spread, "{dtype:?}: {g} against {w}");
            }
        }
        let (wq, wv) = (
            Tensor::from_vec(random(32 * k, 41), (32, k), &Device::Cpu).unwrap(),
            Tensor::from_vec(random(16 * k, 43), (16, k), &Device::Cpu).unwrap(),
        );
        let qkv = QMat::from_qtensors(vec![
            QTensor::quantize(&wq, GgmlDType::Q5_0).unwrap(),
            QTensor::quantize(&wv, GgmlDType::Q8_0).unwrap(),
        ])
        .unwrap();
        assert!(
            matches!(
                qkv,
                QMat::Own {
                    kind: Kind::Q8_0,
                    n: 48,
                    ..
                }
            ),
            "one packed Q8_0 matrix"
        );
    }

    #[test]
    fn dequantised_rows_are_candles() {
        for (dtype, k) in [
            (C(GgmlDType::Q4_1), 64),
            (C(GgmlDType::Q8_0), 64),
            (C(GgmlDType::Q4_0), 64),
            (C(GgmlDType::Q5_0), 64),
            (C(GgmlDType::Q6K), 512),
            (C(GgmlDType::Q4K), 512),
            (C(GgmlDType::Q5K), 512),
            (C(GgmlDType::Q3K), 512),
            (C(GgmlDType::Q2K), 512),
            (I(IQuant::Iq4Nl), 64),
            (I(IQuant::Iq4Xs), 512),
            (I(IQuant::Iq3S), 512),
            (I(IQuant::Iq3Xxs), 512),
            (I(IQuant::Iq2Xxs), 512),
            (I(IQuant::Iq1S), 512),
            (I(IQuant::Iq2S), 512),
            (I(IQuant::Iq2Xs), 512),
            (I(IQuant::Iq1M), 512),
        ] {
            let (mat, dense) = weights(dtype, 21, k);
            let mut row = vec![0f32; k];
            for j in 0..21 {
                mat.dequantize_row(j, &mut row).unwrap();
                assert_eq!(row, dense[j * k..(j + 1) * k], "{dtype:?} row {j}");
            }
        }
    }

    /// Q4_0, Q5_0, the K-quants and the i-quants are packed as they are, not converted: 16
    /// rows of 256 weights take 16 × 8 × 18 bytes of Q4_0 and IQ4_NL, 16 × 8 × 22 of Q5_0 and
    /// 16 × 210 of Q6_K, as in the file, and 16 × 148 of Q4_K, 16 × 180 of Q5_K and 16 × 138 of
    /// IQ4_XS (the file's 144, 176 and 136 with the six-bit scales and mins a byte each); the
    /// smaller i-quants as codes, 16 × 138 bytes (scaled per 32) or 16 × 146 (per 16).
    #[test]
    fn k_quants_are_packed_in_their_own_size_and_not_converted() {
        for (dtype, kind, row_bytes) in [
            (C(GgmlDType::Q4_0), Kind::Q4_0, 8 * 18),
            (C(GgmlDType::Q5_0), Kind::Q5_0, 8 * 22),
            (C(GgmlDType::Q6K), Kind::Q6K, Q6K_BLOCK),
            (C(GgmlDType::Q4K), Kind::Q4K, Q4K_BLOCK + 4),
            (C(GgmlDType::Q5K), Kind::Q5K, Q5K_BLOCK + 4),
            (C(GgmlDType::Q3K), Kind::Q3K, 8 * 18 + 2),
            (C(GgmlDType::Q2K), Kind::Q2K, 8 * 20 + 4),
            (I(IQuant::Iq4Nl), Kind::Iq4Nl, 8 * 18),
            (I(IQuant::Iq4Xs), Kind::Coded(IQuant::Iq4Xs), 8 * 17 + 2),
            (I(IQuant::Iq3S), Kind::Coded(IQuant::Iq3S), 8 * 17 + 2),
            (I(IQuant::Iq3Xxs), Kind::Coded(IQuant::Iq3Xxs), 8 * 17 + 2),
            (I(IQuant::Iq2Xxs), Kind::Coded(IQuant::Iq2Xxs), 8 * 17 + 2),
            (I(IQuant::Iq1S), Kind::Coded(IQuant::Iq1S), 8 * 17 + 2),
            (I(IQuant::Iq2S), Kind::Coded(IQuant::Iq2S), 8 * 18 + 2),
            (I(IQuant::Iq2Xs), Kind::Coded(IQuant::Iq2Xs), 8 * 18 + 2),
            (I(IQuant::Iq1M), Kind::Coded(IQuant::Iq1M), 8 * 18 + 2),
        ] {
            let (mat, _) = weights(dtype, 37, 512);
            let QMat::Own { kind: k, data, .. } = &mat else {
                panic!("{dtype:?} has no kernel")
            };
            assert_eq!(*k, kind);
            assert_eq!(data.len(), 3 * 2 * 16 * row_bytes, "{dtype:?}");
        }
    }
}
