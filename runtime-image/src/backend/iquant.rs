//! The i-quants, which candle's GGUF reader does not know.
//!
//! - **IQ4_NL and IQ4_XS** map each 4-bit code through one table of 16 signed values
//!   ([`VALUES`], ggml's `kvalues_iq4nl`, spaced closer near zero where weights crowd)
//!   instead of a straight line. IQ4_NL, blocks of 32 `{d: f16, qs: [u8; 16]}`: value `i` is
//!   `d·VALUES[q]`, the low nibble of `qs[i]` for `i < 16`, the high nibble of `qs[i − 16]`
//!   after (Q4_0's layout). IQ4_XS, super-blocks of 256 `{d: f16, scales_h: u16, scales_l:
//!   [u8; 4], qs: [u8; 128]}`: sub-block `s` of 32 takes the six-bit `l_s` (four bits of
//!   `scales_l`, two of `scales_h`) and its values are `d·(l_s − 32)·VALUES[q]`, its 16 bytes
//!   of `qs` laid as IQ4_NL's. 4.25 bits a weight: the hub's smallest 4-bit files
//!   (bartowski's and unsloth's `IQ4_XS`), and llama.cpp writes IQ4_NL where a row is not
//!   whole super-blocks.
//! - **IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_M and IQ1_S** (3.44 to 1.56 bits a
//!   weight: the hub's `IQ3_M`, `IQ3_XS`, `IQ2_M`, `IQ1_S` files and the like) take each 8
//!   (IQ3: 4) values at once from a grid of a few hundred to 2048 entries ([`Grid`]), each
//!   entry's values one of three (IQ2: 8, 25, 43; IQ1: −1, 0, 1) or eight (IQ3), with signs
//!   beside them (IQ1: a shift of ±1/8 per 32 or 8 values instead), scaled per 32 (IQ3_S,
//!   IQ3_XXS, IQ2_XXS, IQ1_S) or per 16 (IQ2_S, IQ2_XS, IQ1_M) values: ggml's
//!   `dequantize_row_iq*` ([`IQuant::dequantize_block`]). Each value is one of at most
//!   sixteen per type times `d·l`, `l` the scale of its 32 or 16, exactly ([`IQuant::codes`]).
//!
//! **Reading them.** candle fails on the whole file at the first tensor type it does not
//! know. [`Gguf::read`] then walks the header itself, and where the unknown types are
//! i-quants, has candle read a copy of the header in which each such tensor's type names a
//! stand-in ([`IQuant::tag`]); [`Gguf::tensor`] reads those tensors itself. A stand-in type
//! is only a label: candle never reads such a tensor's bytes as its own type, because the
//! tensor's storage is ours ([`Storage`], which dequantises and multiplies as the i-quant it
//! is, wherever candle's own operations take it) or, off the CPU, f16 values.
//!
//! **Running them.** On the CPU the kernels ([`super::qmatmul`]) take IQ4_NL as the file
//! holds it, and the others as codes in IQ4_XS's layout: 4.3125 bits a weight for those
//! scaled per 32, 4.5625 for those scaled per 16 (the same values; more than the files of
//! the types below 4 bits take, two bits and a grid apart costing a kernel of its own per
//! type). candle's operations (the tensor path) dequantise a row at a time. On a GPU the
//! matrices are dequantised to f16 at load (candle's CUDA kernels know no i-quant).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::{GgmlDType, QStorage, QTensor, QuantizedType, gguf_file};
use candle_core::{CpuStorage, Device};
use half::f16;

use crate::error::{Error, Result};

/// The ggml type ids candle reads (F32, F16, Q4_0 to Q8_K, BF16).
const CANDLE_TYPES: [u32; 15] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];

/// ggml's `kvalues_iq4nl`: what each 4-bit code of IQ4_NL and IQ4_XS stands for.
pub(super) const VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// The i-quants kandle reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IQuant {
    Iq4Nl,
    Iq4Xs,
    Iq3S,
    Iq3Xxs,
    Iq2S,
    Iq2Xs,
    Iq2Xxs,
    Iq1M,
    Iq1S,
}

/// The 256-value i-quants, which share one stand-in ([`IQuant::tag`]).
const SUPER_BLOCKED: [IQuant; 8] = [
    IQuant::Iq4Xs,
    IQuant::Iq3S,
    IQuant::Iq3Xxs,
    IQuant::Iq2S,
    IQuant::Iq2Xs,
    IQuant::Iq2Xxs,
    IQuant::Iq1M,
    IQuant::Iq1S,
];

/// How the kernels take a 256-value i-quant: as IQ4_XS's layout (per 32 or 16 values a
/// multiplier `l`, per value a 4-bit code), value `d·l·factor·values[code]`, exact for each
/// type's every value ([`IQuant::code_block`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Codes {
    pub(super) values: [i8; 16],
    /// A power of two: exact in any order of the products.
    pub(super) factor: f32,
}

/// IQ4_XS's codes: [`VALUES`] as they are.
pub(super) static IQ4_CODES: Codes = Codes {
    values: VALUES,
    factor: 1.0,
};

/// IQ3_S: `d·(1 + 2·ls)·g`, g odd in 1..16, and a sign.
static IQ3S_CODES: Codes = Codes {
    values: [1, 3, 5, 7, 9, 11, 13, 15, -1, -3, -5, -7, -9, -11, -13, -15],
    factor: 1.0,
};

/// IQ3_XXS: `d·(0.5 + ls)·0.5·g` = `d·(2·ls + 1)·(g/2)/2`, g in {4, 12, .., 52, 62}.
static IQ3XXS_CODES: Codes = Codes {
    values: [
        2, 6, 10, 14, 18, 22, 26, 31, -2, -6, -10, -14, -18, -22, -26, -31,
    ],
    factor: 0.5,
};

/// IQ2_XXS: `d·(0.5 + ls)·0.25·g` = `d·(2·ls + 1)·g/8`, g in {8, 25, 43}.
static IQ2XXS_CODES: Codes = Codes {
    values: [8, 25, 43, -8, -25, -43, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    factor: 0.125,
};

/// IQ1_S: `d·(2·ls + 1)·(g ± 1/8)` = `d·(2·ls + 1)·(8g ± 1)/8`, g in {−1, 0, 1}: codes 0..3
/// for the shift up, 3..6 down.
static IQ1S_CODES: Codes = Codes {
    values: [-7, 1, 9, -9, -1, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    factor: 0.125,
};

/// One super-block of a [`Codes`] type: `d` (f16 bits), each sub-block's `l` for its first
/// and its second 16 values (the same twice where the type scales per 32), and each
/// sub-block's codes laid as IQ4_NL's 16 bytes (element `i` the low nibble of byte `i` for
/// `i < 16`, the high nibble of byte `i − 16` after).
pub(super) struct CodedBlock {
    pub(super) d: [u8; 2],
    pub(super) l: [[i8; 2]; 8],
    pub(super) qs: [[u8; 16]; 8],
}

impl IQuant {
    /// The i-quant of ggml type `id`, where kandle reads it.
    fn of_id(id: u32) -> Option<IQuant> {
        match id {
            16 => Some(IQuant::Iq2Xxs),
            17 => Some(IQuant::Iq2Xs),
            18 => Some(IQuant::Iq3Xxs),
            19 => Some(IQuant::Iq1S),
            20 => Some(IQuant::Iq4Nl),
            21 => Some(IQuant::Iq3S),
            22 => Some(IQuant::Iq2S),
            23 => Some(IQuant::Iq4Xs),
            29 => Some(IQuant::Iq1M),
            _ => None,
        }
    }

    /// The candle type that stands for it in a tensor's info and a `QTensor`'s dtype: ggml's
    /// Q8_1 for IQ4_NL and Q8_K for the others, the activations' types, which no GGUF holds
    /// as weights (llama.cpp has no product with either as weights), and which [`Gguf::read`]
    /// refuses in a file. Each has the i-quant's block of values (32, 256), so that candle's
    /// checks of shapes hold. The 256-value i-quants differ in their bytes per block, which
    /// tell them apart ([`IQuant::of`]).
    pub(super) fn tag(self) -> GgmlDType {
        match self {
            IQuant::Iq4Nl => GgmlDType::Q8_1,
            _ => GgmlDType::Q8K,
        }
    }

    /// [`IQuant::tag`]'s ggml type id.
    fn tag_id(self) -> u32 {
        match self {
            IQuant::Iq4Nl => 9,
            _ => 15,
        }
    }

    /// Whether `dtype` is a stand-in ([`IQuant::tag`]).
    pub(super) fn is_tag(dtype: GgmlDType) -> bool {
        matches!(dtype, GgmlDType::Q8_1 | GgmlDType::Q8K)
    }

    /// The i-quant a tensor of ours holds ([`qtensor`]): its stand-in type, and for the
    /// 256-value ones its bytes per super-block.
    pub(super) fn of(t: &QTensor) -> Option<IQuant> {
        match t.dtype() {
            GgmlDType::Q8_1 => Some(IQuant::Iq4Nl),
            GgmlDType::Q8K => {
                let blocks = (t.shape().elem_count() / 256).max(1);
                let bytes = t.storage_size_in_bytes() / blocks;
                SUPER_BLOCKED.into_iter().find(|k| k.block_bytes() == bytes)
            }
            _ => None,
        }
    }

    /// Values per block.
    pub(super) fn block(self) -> usize {
        match self {
            IQuant::Iq4Nl => 32,
            _ => 256,
        }
    }

    /// Bytes per block.
    pub(super) fn block_bytes(self) -> usize {
        match self {
            IQuant::Iq4Nl => 18,
            IQuant::Iq4Xs => 136,
            IQuant::Iq3S => 110,
            IQuant::Iq3Xxs => 98,
            IQuant::Iq2S => 82,
            IQuant::Iq2Xs => 74,
            IQuant::Iq2Xxs => 66,
            IQuant::Iq1M => 56,
            IQuant::Iq1S => 50,
        }
    }

    /// One block's values, as ggml's `dequantize_row_iq*` (each step exact in f32: an f16
    /// times small integers and powers of two).
    pub(super) fn dequantize_block(self, raw: &[u8], out: &mut [f32]) {
        let d = f16::from_le_bytes([raw[0], raw[1]]).to_f32();
        let u32_at = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().unwrap());
        let u16_at = |at: usize| u16::from_le_bytes([raw[at], raw[at + 1]]);
        let sign = |bits: u8, j: usize| if bits >> j & 1 == 1 { -1.0 } else { 1.0 };
        let sub_block = |qs: &[u8], dl: f32, out: &mut [f32]| {
            for (i, q) in qs[..16].iter().enumerate() {
                out[i] = dl * VALUES[(q & 15) as usize] as f32;
                out[i + 16] = dl * VALUES[(q >> 4) as usize] as f32;
            }
        };
        let out = &mut out[..self.block()];
        match self {
            IQuant::Iq4Nl => sub_block(&raw[2..18], d, out),
            IQuant::Iq4Xs => {
                for (s, out) in out.chunks_exact_mut(32).enumerate() {
                    sub_block(&raw[8 + 16 * s..], d * (xs_scale(raw, s) - 32) as f32, out);
                }
            }
            IQuant::Iq2Xxs => {
                for (s, out) in out.chunks_exact_mut(32).enumerate() {
                    let (grid, aux) = (u32_at(2 + 8 * s), u32_at(6 + 8 * s));
                    let db = d * (0.5 + (aux >> 28) as f32) * 0.25;
                    for (g, out) in out.chunks_exact_mut(8).enumerate() {
                        let e = (grid >> (8 * g)) as usize & 255;
                        let signs = ksigns((aux >> (7 * g)) as u8 & 127);
                        for (j, o) in out.iter_mut().enumerate() {
                            *o = db * GRIDS.iq2xxs.value(e, j) * sign(signs, j);
                        }
                    }
                }
            }
            IQuant::Iq2Xs => {
                for (s, out) in out.chunks_exact_mut(32).enumerate() {
                    let sc = raw[66 + s];
                    let db = [sc & 15, sc >> 4].map(|l| d * (0.5 + l as f32) * 0.25);
                    for (g, out) in out.chunks_exact_mut(8).enumerate() {
                        let q = u16_at(2 + 8 * s + 2 * g);
                        let signs = ksigns((q >> 9) as u8);
                        for (j, o) in out.iter_mut().enumerate() {
                            *o =
                                db[g / 2] * GRIDS.iq2xs.value(q as usize & 511, j) * sign(signs, j);
                        }
                    }
                }
            }
            IQuant::Iq2S => {
                for (s, out) in out.chunks_exact_mut(32).enumerate() {
                    let sc = raw[74 + s];
                    let db = [sc & 15, sc >> 4].map(|l| d * (0.5 + l as f32) * 0.25);
                    for (g, out) in out.chunks_exact_mut(8).enumerate() {
                        let high = (raw[66 + s] as usize >> (2 * g) & 3) << 8;
                        let e = raw[2 + 4 * s + g] as usize | high;
                        let signs = raw[34 + 4 * s + g];
                        for (j, o) in out.iter_mut().enumerate() {
                            *o = db[g / 2] * GRIDS.iq2s.value(e, j) * sign(signs, j);
                        }
                    }
                }
            }
            IQuant::Iq3Xxs => {
                for (s, out) in out.chunks_exact_mut(32).enumerate() {
                    let aux = u32_at(66 + 4 * s);
                    let db = d * (0.5 + (aux >> 28) as f32) * 0.5;
                    for (g, out) in out.chunks_exact_mut(8).enumerate() {
                        let signs = ksigns((aux >> (7 * g)) as u8 & 127);
                        for (j, o) in out.iter_mut().enumerate() {
                            let e = raw[2 + 8 * s + 2 * g + j / 4] as usize;
                            *o = db * GRIDS.iq3xxs.value(e, j % 4) * sign(signs, j);
                        }
                    }
                }
            }
            IQuant::Iq3S => {
                for (s, out) in out.chunks_exact_mut(32).enumerate() {
                    let db = d * (1 + 2 * (raw[106 + s / 2] >> (4 * (s % 2)) & 15) as i32) as f32;
                    for (i, o) in out.iter_mut().enumerate() {
                        let e = i / 4;
                        let high = (raw[66 + s] as usize >> e & 1) << 8;
                        let v = GRIDS.iq3s.value(raw[2 + 8 * s + e] as usize | high, i % 4);
                        *o = db * v * sign(raw[74 + 4 * s + i / 8], i % 8);
                    }
                }
            }
            IQuant::Iq1S => {
                for (s, out) in out.chunks_exact_mut(32).enumerate() {
                    let qh = u16_at(34 + 2 * s);
                    let dl = d * (2 * (qh >> 12 & 7) + 1) as f32;
                    let delta = if qh & 0x8000 != 0 {
                        -IQ1_DELTA
                    } else {
                        IQ1_DELTA
                    };
                    for (g, out) in out.chunks_exact_mut(8).enumerate() {
                        let idx = raw[2 + 4 * s + g] as usize | ((qh as usize >> (3 * g)) & 7) << 8;
                        for (j, o) in out.iter_mut().enumerate() {
                            *o = dl * (GRIDS.iq1s.value(idx, j) + delta);
                        }
                    }
                }
            }
            IQuant::Iq1M => {
                let sc: [u16; 4] = std::array::from_fn(|i| u16_at(48 + 2 * i));
                let d = f16::from_bits(
                    (sc[0] >> 12) | (sc[1] >> 8 & 0xf0) | (sc[2] >> 4 & 0xf00) | (sc[3] & 0xf000),
                )
                .to_f32();
                for (s, out) in out.chunks_exact_mut(32).enumerate() {
                    let dl =
                        [0, 3].map(|h| d * (2 * (sc[s / 2] >> (6 * (s % 2) + h) & 7) + 1) as f32);
                    for (g, out) in out.chunks_exact_mut(8).enumerate() {
                        let qh = raw[32 + 2 * s + g / 2] >> (4 * (g % 2));
                        let idx = raw[4 * s + g] as usize | ((qh & 7) as usize) << 8;
                        let delta = if qh & 8 != 0 { -IQ1_DELTA } else { IQ1_DELTA };
                        for (j, o) in out.iter_mut().enumerate() {
                            *o = dl[g / 2] * (GRIDS.iq1s.value(idx, j) + delta);
                        }
                    }
                }
            }
        }
    }

    /// How the kernels take the 256-value types: each value `d·l·factor·values[code]`, with
    /// `l` per 32 values, or per 16 where [`IQuant::scale_per_16`].
    pub(super) fn codes(self) -> Option<&'static Codes> {
        match self {
            IQuant::Iq4Xs => Some(&IQ4_CODES),
            IQuant::Iq3S => Some(&IQ3S_CODES),
            IQuant::Iq3Xxs => Some(&IQ3XXS_CODES),
            // IQ2_S and IQ2_XS: `d·(0.5 + ls)·0.25·g` too, per 16.
            IQuant::Iq2Xxs | IQuant::Iq2S | IQuant::Iq2Xs => Some(&IQ2XXS_CODES),
            // IQ1_M: `d·(2·ls + 1)·(g ± 1/8)` too, `ls` per 16, the shift per 8.
            IQuant::Iq1S | IQuant::Iq1M => Some(&IQ1S_CODES),
            IQuant::Iq4Nl => None,
        }
    }

    /// Whether the type scales per 16 values (IQ2_S, IQ2_XS, IQ1_M), not per 32.
    pub(super) fn scale_per_16(self) -> bool {
        matches!(self, IQuant::Iq2S | IQuant::Iq2Xs | IQuant::Iq1M)
    }

    /// A super-block of a type with [`IQuant::codes`] as codes into them: the same values,
    /// `d·l·factor·values[code]`, exactly.
    pub(super) fn code_block(self, raw: &[u8]) -> CodedBlock {
        let mut b = CodedBlock {
            d: [raw[0], raw[1]],
            l: [[0; 2]; 8],
            qs: [[0; 16]; 8],
        };
        let u16_at = |at: usize| u16::from_le_bytes([raw[at], raw[at + 1]]);
        // IQ1_M's scale words, whose top nibbles hold `d`.
        let sc: [u16; 4] = std::array::from_fn(|i| match self {
            IQuant::Iq1M => u16_at(48 + 2 * i),
            _ => 0,
        });
        if self == IQuant::Iq1M {
            let d = (sc[0] >> 12) | (sc[1] >> 8 & 0xf0) | (sc[2] >> 4 & 0xf00) | (sc[3] & 0xf000);
            b.d = d.to_le_bytes();
        }
        let odd = |ls: u8| (2 * ls + 1) as i8;
        let u32_at = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().unwrap());
        let grids = &*GRIDS;
        for s in 0..8 {
            // The sub-block's 32 codes, from its grid entries (of 4 or 8 values) one by one.
            let mut c = [0u8; 32];
            match self {
                IQuant::Iq4Xs => {
                    b.l[s] = [(xs_scale(raw, s) - 32) as i8; 2];
                    b.qs[s].copy_from_slice(&raw[8 + 16 * s..][..16]);
                    continue;
                }
                IQuant::Iq3S => {
                    b.l[s] = [odd(raw[106 + s / 2] >> (4 * (s % 2)) & 15); 2];
                    for e in 0..8 {
                        let high = (raw[66 + s] as usize >> e & 1) << 8;
                        let entry = grids.iq3s.entry(raw[2 + 8 * s + e] as usize | high);
                        let signs = raw[74 + 4 * s + e / 2] >> (4 * (e % 2));
                        for j in 0..4 {
                            c[4 * e + j] = entry[j] | (signs >> j & 1) << 3;
                        }
                    }
                }
                IQuant::Iq3Xxs => {
                    let aux = u32_at(66 + 4 * s);
                    b.l[s] = [odd((aux >> 28) as u8); 2];
                    for e in 0..8 {
                        let entry = grids.iq3xxs.entry(raw[2 + 8 * s + e] as usize);
                        let signs = ksigns((aux >> (7 * (e / 2))) as u8 & 127) >> (4 * (e % 2));
                        for j in 0..4 {
                            c[4 * e + j] = entry[j] | (signs >> j & 1) << 3;
                        }
                    }
                }
                IQuant::Iq2Xxs => {
                    let (grid, aux) = (u32_at(2 + 8 * s), u32_at(6 + 8 * s));
                    b.l[s] = [odd((aux >> 28) as u8); 2];
                    for g in 0..4 {
                        let entry = grids.iq2xxs.entry((grid >> (8 * g)) as usize & 255);
                        let signs = ksigns((aux >> (7 * g)) as u8 & 127);
                        for j in 0..8 {
                            c[8 * g + j] = entry[j] + 3 * (signs >> j & 1);
                        }
                    }
                }
                IQuant::Iq1S => {
                    let qh = u16::from_le_bytes([raw[34 + 2 * s], raw[35 + 2 * s]]);
                    b.l[s] = [odd((qh >> 12 & 7) as u8); 2];
                    let down = 3 * (qh >> 15) as u8;
                    for g in 0..4 {
                        let idx = raw[2 + 4 * s + g] as usize | ((qh as usize >> (3 * g)) & 7) << 8;
                        for (c, v) in c[8 * g..8 * g + 8].iter_mut().zip(grids.iq1s.entry(idx)) {
                            *c = v + down;
                        }
                    }
                }
                IQuant::Iq2Xs => {
                    let ls = raw[66 + s];
                    b.l[s] = [odd(ls & 15), odd(ls >> 4)];
                    for g in 0..4 {
                        let q = u16_at(2 + 8 * s + 2 * g);
                        let entry = grids.iq2xs.entry(q as usize & 511);
                        let signs = ksigns((q >> 9) as u8);
                        for j in 0..8 {
                            c[8 * g + j] = entry[j] + 3 * (signs >> j & 1);
                        }
                    }
                }
                IQuant::Iq2S => {
                    let ls = raw[74 + s];
                    b.l[s] = [odd(ls & 15), odd(ls >> 4)];
                    for g in 0..4 {
                        let high = (raw[66 + s] as usize >> (2 * g) & 3) << 8;
                        let entry = grids.iq2s.entry(raw[2 + 4 * s + g] as usize | high);
                        let signs = raw[34 + 4 * s + g];
                        for j in 0..8 {
                            c[8 * g + j] = entry[j] + 3 * (signs >> j & 1);
                        }
                    }
                }
                IQuant::Iq1M => {
                    let w = sc[s / 2] >> (6 * (s % 2));
                    b.l[s] = [odd((w & 7) as u8), odd((w >> 3 & 7) as u8)];
                    for g in 0..4 {
                        let qh = raw[32 + 2 * s + g / 2] >> (4 * (g % 2));
                        let idx = raw[4 * s + g] as usize | ((qh & 7) as usize) << 8;
                        let down = 3 * (qh >> 3 & 1);
                        for (c, v) in c[8 * g..8 * g + 8].iter_mut().zip(grids.iq1s.entry(idx)) {
                            *c = v + down;
                        }
                    }
                }
                IQuant::Iq4Nl => unreachable!("IQ4_NL has no codes"),
            }
            for i in 0..16 {
                b.qs[s][i] = c[i] | c[i + 16] << 4;
            }
        }
        b
    }
}

/// IQ1_S's and IQ1_M's shift of a sub-block's (IQ1_M: an eighth's) grid values.
const IQ1_DELTA: f32 = 0.125;

/// ggml's `ksigns_iq2xs`: seven sign bits and an eighth that makes their count even.
fn ksigns(i: u8) -> u8 {
    i | ((i.count_ones() as u8 & 1) << 7)
}

/// An i-quant grid: entries of `width` values, each an index into the grid's few `values`.
pub(super) struct Grid {
    idx: Vec<u8>,
    width: usize,
    values: &'static [i8],
}

impl Grid {
    /// The grid from gguf-py's hexadecimal ([`super::igrids`]): two-bit indices for three
    /// values, three-bit ones (a nibble each) for eight.
    fn decode(hex: &[u8], width: usize, values: &'static [i8]) -> Grid {
        let nibble = |c: u8| if c > b'9' { c - b'a' + 10 } else { c - b'0' };
        let (bits, mask) = if values.len() == 3 { (2, 3) } else { (4, 7) };
        let idx = hex
            .chunks_exact(2)
            .map(|p| nibble(p[0]) << 4 | nibble(p[1]))
            .flat_map(|b| (0..8).step_by(bits).map(move |s| b >> s & mask))
            .collect();
        Grid { idx, width, values }
    }

    /// Entry `e`'s indices.
    pub(super) fn entry(&self, e: usize) -> &[u8] {
        &self.idx[e * self.width..(e + 1) * self.width]
    }

    /// Value `j` of entry `e`.
    fn value(&self, e: usize, j: usize) -> f32 {
        self.values[self.idx[e * self.width + j] as usize] as f32
    }
}

/// The grids.
struct Grids {
    iq2xxs: Grid,
    iq2xs: Grid,
    iq2s: Grid,
    iq3xxs: Grid,
    iq3s: Grid,
    iq1s: Grid,
}

/// The IQ2 grids' three values.
const IQ2_VALUES: [i8; 3] = [8, 25, 43];
/// IQ1's: −1, 0, 1.
const IQ1_VALUES: [i8; 3] = [-1, 0, 1];

/// The grids, decoded at their first use (27 KB).
static GRIDS: std::sync::LazyLock<Grids> = std::sync::LazyLock::new(|| {
    use super::igrids as h;
    Grids {
        iq2xxs: Grid::decode(h::IQ2XXS, 8, &IQ2_VALUES),
        iq2xs: Grid::decode(h::IQ2XS, 8, &IQ2_VALUES),
        iq2s: Grid::decode(h::IQ2S, 8, &IQ2_VALUES),
        iq3xxs: Grid::decode(h::IQ3XXS, 4, &[4, 12, 20, 28, 36, 44, 52, 62]),
        iq3s: Grid::decode(h::IQ3S, 4, &[1, 3, 5, 7, 9, 11, 13, 15]),
        iq1s: Grid::decode(h::IQ1S, 8, &IQ1_VALUES),
    }
});

/// The six-bit scale `l_s` of sub-block `s` of an IQ4_XS super-block.
pub(super) fn xs_scale(raw: &[u8], s: usize) -> i32 {
    let high = u16::from_le_bytes([raw[2], raw[3]]);
    let low = (raw[4 + s / 2] >> (4 * (s % 2))) & 15;
    (low | (((high >> (2 * s)) & 3) as u8) << 4) as i32
}

/// An i-quant tensor's bytes as candle's CPU storage: candle's operations on it (dequantising,
/// an embedding lookup, a product on the tensor path) see the i-quant's values.
struct Storage {
    kind: IQuant,
    data: Vec<u8>,
}

impl Storage {
    /// Rows of `k` values, dequantised into `out` (`k` per row).
    fn rows(&self, first: usize, k: usize, out: &mut [f32]) {
        let row_bytes = k / self.kind.block() * self.kind.block_bytes();
        let raw = &self.data[first * row_bytes..];
        let blocks = out.chunks_exact_mut(self.kind.block());
        for (o, b) in blocks.zip(raw.chunks_exact(self.kind.block_bytes())) {
            self.kind.dequantize_block(b, o);
        }
    }
}

impl QuantizedType for Storage {
    fn dtype(&self) -> GgmlDType {
        self.kind.tag()
    }

    /// `dst (m × n) = lhs (m × k) · selfᵀ`, a row of weights dequantised at a time.
    fn matmul_t(
        &self,
        (m, k, n): (usize, usize, usize),
        lhs: &[f32],
        dst: &mut [f32],
    ) -> candle_core::Result<()> {
        let mut row = vec![0f32; k];
        for j in 0..n {
            self.rows(j, k, &mut row);
            for i in 0..m {
                let x = &lhs[i * k..(i + 1) * k];
                dst[i * n + j] = x.iter().zip(&row).map(|(a, b)| a * b).sum();
            }
        }
        Ok(())
    }

    fn matmul_t_f16(
        &self,
        _mkn: (usize, usize, usize),
        _lhs: &[f16],
        _dst: &mut [f16],
    ) -> candle_core::Result<()> {
        candle_core::bail!("{:?} products take f32 activations", self.kind)
    }

    fn embedding(
        &self,
        ids: &[u32],
        rows: usize,
        hidden: usize,
    ) -> candle_core::Result<CpuStorage> {
        let mut out = vec![0f32; ids.len() * hidden];
        for (o, &id) in out.chunks_exact_mut(hidden).zip(ids) {
            if id as usize >= rows {
                candle_core::bail!("embedding id {id} is out of range for {rows} rows")
            }
            self.rows(id as usize, hidden, o);
        }
        Ok(CpuStorage::F32(out))
    }

    fn dequantize(&self, elem_count: usize) -> candle_core::Result<CpuStorage> {
        let mut out = vec![0f32; elem_count];
        self.rows(0, elem_count, &mut out);
        Ok(CpuStorage::F32(out))
    }

    fn storage_size_in_bytes(&self) -> usize {
        self.data.len()
    }

    fn as_ptr(&self) -> *const u8 {
        self.data.as_ptr()
    }

    fn block_size(&self) -> usize {
        self.kind.block()
    }

    fn from_float(&mut self, _xs: &[f32]) {
        unreachable!("kandle does not quantise to {:?}", self.kind)
    }

    fn from_float_imatrix(&mut self, _xs: &[f32], _imatrix: &[f32], _n_per_row: usize) {
        unreachable!("kandle does not quantise to {:?}", self.kind)
    }

    fn size(&self) -> usize {
        self.data.len()
    }
}

/// A tensor of `dims` (candle's order, the row last) of i-quant `kind` from its bytes: ours on
/// the CPU ([`Storage`]), dequantised to f16 elsewhere.
pub(super) fn qtensor(
    kind: IQuant,
    data: Vec<u8>,
    dims: &[usize],
    device: &Device,
) -> candle_core::Result<QTensor> {
    let elems: usize = dims.iter().product();
    if !elems.is_multiple_of(kind.block())
        || data.len() != elems / kind.block() * kind.block_bytes()
    {
        candle_core::bail!(
            "{kind:?} tensor of shape {dims:?} with {} bytes",
            data.len()
        )
    }
    let storage = Storage { kind, data };
    match device {
        Device::Cpu => QTensor::new(QStorage::Cpu(Box::new(storage)), dims),
        _ => {
            let mut values = vec![0f32; elems];
            storage.rows(0, elems, &mut values);
            let bytes: Vec<u8> = values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect();
            let storage = QStorage::from_data(bytes.into(), device, GgmlDType::F16)?;
            QTensor::new(storage, dims)
        }
    }
}

/// A GGUF file's header as candle reads it, with the i-quant tensors candle cannot hold.
#[derive(Debug)]
pub(super) struct Gguf {
    pub(super) content: gguf_file::Content,
    /// The i-quant tensors by name; their infos in `content` carry the stand-in types.
    pub(super) iquants: HashMap<String, IQuant>,
}

impl std::ops::Deref for Gguf {
    type Target = gguf_file::Content;

    fn deref(&self) -> &gguf_file::Content {
        &self.content
    }
}

impl Gguf {
    /// Reads the header of the GGUF `file` (at `path`, for messages): candle's types and the
    /// i-quants IQ4_NL and IQ4_XS. A tensor type kandle cannot load (the other i-quants,
    /// ternary and FP4 types) is refused by name, instead of candle's "unknown dtype for
    /// tensor 23".
    pub(super) fn read(file: &mut std::fs::File, path: &Path) -> Result<Gguf> {
        let first_line = |e: candle_core::Error| {
            // With RUST_BACKTRACE set, candle's message carries a backtrace.
            let msg = e.to_string();
            msg.lines().next().unwrap_or_default().to_owned()
        };
        let content = match gguf_file::Content::read(file) {
            Ok(content) => content,
            Err(e) => {
                let msg = first_line(e);
                if !msg.starts_with("unknown dtype for tensor ") {
                    return Err(Error::Model(format!("{}: {msg}", path.display())));
                }
                return Gguf::read_with_iquants(file, path);
            }
        };
        let stand_in = (content.tensor_infos.iter())
            .filter(|(_, t)| IQuant::is_tag(t.ggml_dtype))
            .map(|(n, t)| (n, t.ggml_dtype))
            .min_by_key(|(n, _)| *n);
        if let Some((name, dtype)) = stand_in {
            return Err(Error::Model(format!(
                "{}: tensor {name} is {dtype:?}, a type llama.cpp quantises activations to, \
                 not weights; kandle cannot load it",
                path.display()
            )));
        }
        Ok(Gguf {
            content,
            iquants: HashMap::new(),
        })
    }

    /// The header of a file with tensor types candle does not know: where they are all
    /// i-quants kandle reads, candle reads a copy of the header with their stand-ins.
    fn read_with_iquants(file: &mut std::fs::File, path: &Path) -> Result<Gguf> {
        let bad = |e: std::io::Error| Error::Model(format!("{}: {e}", path.display()));
        file.seek(SeekFrom::Start(0)).map_err(bad)?;
        let mut header = Vec::new();
        let types = Walk {
            r: Recording {
                inner: std::io::BufReader::new(&mut *file),
                bytes: &mut header,
            },
            at: 0,
            wide: true,
        }
        .tensor_types()
        .map_err(bad)?;
        let mut iquants = HashMap::new();
        for (name, at, id) in types {
            match IQuant::of_id(id) {
                Some(kind) => {
                    header[at..at + 4].copy_from_slice(&kind.tag_id().to_le_bytes());
                    iquants.insert(name, kind);
                }
                // The stand-ins themselves, and what candle cannot read either.
                None if matches!(id, 9 | 15) || !CANDLE_TYPES.contains(&id) => {
                    return Err(Error::Model(super::gguf_llama::unsupported_type(path, id)));
                }
                None => {}
            }
        }
        let content = gguf_file::Content::read(&mut std::io::Cursor::new(header))
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        Ok(Gguf { content, iquants })
    }

    /// Tensor `name`: candle's read, or ours for an i-quant ([`qtensor`]).
    pub(super) fn tensor<R: Read + Seek>(
        &self,
        reader: &mut R,
        name: &str,
        device: &Device,
    ) -> candle_core::Result<QTensor> {
        let Some(&kind) = self.iquants.get(name) else {
            return self.content.tensor(reader, name, device);
        };
        let info = &self.content.tensor_infos[name];
        let elems = info.shape.elem_count();
        let mut data = vec![0u8; elems / kind.block() * kind.block_bytes()];
        reader.seek(SeekFrom::Start(
            self.content.tensor_data_offset + info.offset,
        ))?;
        reader.read_exact(&mut data)?;
        qtensor(kind, data, info.shape.dims(), device)
    }
}

/// A reader that keeps a copy of what it reads.
struct Recording<'a, R> {
    inner: R,
    bytes: &'a mut Vec<u8>,
}

impl<R: Read> Read for Recording<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// A GGUF header read from its start, as the spec lays it out: magic, version, counts, the
/// metadata, then per tensor its name, dimensions, type and offset.
struct Walk<R> {
    r: R,
    /// Bytes read so far.
    at: usize,
    /// Lengths and counts are u64 (u32 in version 1).
    wide: bool,
}

impl<R: Read> Walk<R> {
    fn bytes(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.r.read_exact(&mut b)?;
        self.at += n;
        Ok(b)
    }

    fn u32(&mut self) -> std::io::Result<u32> {
        Ok(u32::from_le_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn len(&mut self) -> std::io::Result<u64> {
        match self.wide {
            true => Ok(u64::from_le_bytes(
                self.bytes(8)?.try_into().expect("8 bytes"),
            )),
            false => self.u32().map(u64::from),
        }
    }

    /// A string's length, bounded so that a broken file cannot ask for gigabytes.
    fn string_len(&mut self) -> std::io::Result<usize> {
        let n = self.len()?;
        if n > 1 << 30 {
            return Err(invalid(format!("a string of {n} bytes")));
        }
        Ok(n as usize)
    }

    /// Skips one metadata value of type `ty` (gguf's `gguf_type` numbering).
    fn skip_value(&mut self, ty: u32, depth: usize) -> std::io::Result<()> {
        let size = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => self.string_len()?,
            9 if depth < 8 => {
                let (ty, n) = (self.u32()?, self.len()?);
                for _ in 0..n {
                    self.skip_value(ty, depth + 1)?;
                }
                return Ok(());
            }
            _ => return Err(invalid(format!("metadata of type {ty}"))),
        };
        self.bytes(size).map(drop)
    }

    /// The tensors' types: `(name, where the type's four bytes lie, ggml type id)`, read no
    /// further than the last tensor's info.
    fn tensor_types(&mut self) -> std::io::Result<Vec<(String, usize, u32)>> {
        if self.bytes(4)? != b"GGUF" {
            return Err(invalid("not a GGUF file".into()));
        }
        self.wide = self.u32()? >= 2;
        let (tensors, kvs) = (self.len()?, self.len()?);
        for _ in 0..kvs {
            let n = self.string_len()?;
            self.bytes(n)?;
            let ty = self.u32()?;
            self.skip_value(ty, 0)?;
        }
        let mut out = Vec::new();
        for _ in 0..tensors {
            let n = self.string_len()?;
            let name = String::from_utf8_lossy(&self.bytes(n)?).into_owned();
            let dims = self.u32()?;
            if dims > 4 {
                return Err(invalid(format!("tensor {name} has {dims} dimensions")));
            }
            for _ in 0..dims {
                self.len()?;
            }
            let at = self.at;
            let id = self.u32()?;
            out.push((name, at, id));
            // The offset.
            self.bytes(8)?;
        }
        Ok(out)
    }
}

fn invalid(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use gguf_file::Value as V;

    /// The header walk steps over metadata of every kind to each tensor's type.
    #[test]
    fn the_header_walk_finds_each_tensor_s_type_past_every_kind_of_metadata() {
        let cpu = &Device::Cpu;
        let t = |n: usize, dtype| {
            QTensor::quantize(
                &Tensor::zeros((2, n), candle_core::DType::F32, cpu).unwrap(),
                dtype,
            )
            .unwrap()
        };
        let (a, b) = (t(32, GgmlDType::F32), t(256, GgmlDType::Q4K));
        let strings = V::Array(vec![V::String("x".into()), V::String("yz".into())]);
        let meta = [
            ("u8", V::U8(1)),
            ("i8", V::I8(-1)),
            ("u16", V::U16(2)),
            ("i16", V::I16(-2)),
            ("u32", V::U32(3)),
            ("i32", V::I32(-3)),
            ("f32", V::F32(0.5)),
            ("bool", V::Bool(true)),
            ("string", V::String("kandle".into())),
            ("u64", V::U64(4)),
            ("i64", V::I64(-4)),
            ("f64", V::F64(0.25)),
            ("strings", strings.clone()),
            ("nested", V::Array(vec![strings.clone(), strings])),
        ];
        let meta: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let mut bytes = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut bytes, &meta, &[("a", &a), ("bb", &b)]).unwrap();
        let bytes = bytes.into_inner();
        let mut walk = Walk {
            r: &bytes[..],
            at: 0,
            wide: true,
        };
        let types = walk.tensor_types().unwrap();
        let names: Vec<&str> = types.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "bb"]);
        for ((_, at, id), want) in types.iter().zip([0u32, 12]) {
            assert_eq!(*id, want);
            assert_eq!(bytes[*at..at + 4], want.to_le_bytes());
        }
        // A cut header is an error, not a panic.
        let mut cut = Walk {
            r: &bytes[..walk.at - 3],
            at: 0,
            wide: true,
        };
        assert!(cut.tensor_types().is_err());
    }

    /// Entries of each grid as ggml's tables (`ggml-common.h`) hold them, as little-endian
    /// words of the values' bytes.
    #[test]
    fn the_grids_hold_ggml_s_entries() {
        let word = |g: &Grid, e: usize| -> u64 {
            (0..g.width)
                .rev()
                .fold(0, |w, j| w << 8 | g.value(e, j) as i8 as u8 as u64)
        };
        let g = &*GRIDS;
        for (grid, entries, first) in [
            (
                &g.iq2xxs,
                256,
                [0x0808080808080808, 0x080808080808082b, 0x0808080808081919],
            ),
            (
                &g.iq2xs,
                512,
                [0x0808080808080808, 0x080808080808082b, 0x0808080808081919],
            ),
            (
                &g.iq2s,
                1024,
                [0x0808080808080808, 0x080808080808082b, 0x0808080808081919],
            ),
            (&g.iq3xxs, 256, [0x04040404, 0x04040414, 0x04040424]),
            (&g.iq3s, 512, [0x01010101, 0x01010103, 0x01010105]),
            (
                &g.iq1s,
                2048,
                [0xffffffffffffffff, 0xffffffffffffff01, 0xffffffffffff0000],
            ),
        ] {
            assert_eq!(grid.idx.len(), entries * grid.width);
            for (e, want) in first.into_iter().enumerate() {
                assert_eq!(word(grid, e), want, "entry {e}");
            }
        }
        assert_eq!(word(&g.iq3xxs, 3), 0x04040c0c);
        assert_eq!(word(&g.iq3s, 3), 0x0101010b);
        // ggml's `ksigns_iq2xs`, its first and last bytes.
        let ks: Vec<u8> = (0..128u8).map(ksigns).collect();
        assert_eq!(ks[..8], [0x00, 0x81, 0x82, 0x03, 0x84, 0x05, 0x06, 0x87]);
        assert_eq!(ks[120..], [0x78, 0xf9, 0xfa, 0x7b, 0xfc, 0x7d, 0x7e, 0xff]);
    }

    /// Super-blocks of pseudo-random bytes (every code, sign and scale) as codes give the
    /// values ggml's dequantisation gives, bit for bit: `d·l·values[code]·factor`.
    #[test]
    fn codes_hold_each_value_exactly() {
        let mut seed = 5u64;
        for kind in SUPER_BLOCKED {
            let codes = kind.codes().unwrap();
            for _ in 0..64 {
                let mut raw: Vec<u8> = (0..kind.block_bytes())
                    .map(|_| {
                        seed = seed
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        (seed >> 33) as u8
                    })
                    .collect();
                let d = f16::from_f32(0.0123);
                match kind {
                    IQuant::Iq1M => {
                        for i in 0..4 {
                            let nibble = (d.to_bits() >> (4 * i)) as u8 & 15;
                            raw[49 + 2 * i] = raw[49 + 2 * i] & 0x0F | nibble << 4;
                        }
                    }
                    _ => raw[..2].copy_from_slice(&d.to_le_bytes()),
                }
                let mut want = [0f32; 256];
                kind.dequantize_block(&raw, &mut want);
                let b = kind.code_block(&raw);
                let d = f16::from_le_bytes(b.d).to_f32();
                for (i, w) in want.iter().enumerate() {
                    let (s, j) = (i / 32, i % 32);
                    let code = b.qs[s][j % 16] >> (4 * (j / 16)) & 15;
                    let l = b.l[s][j / 16] as f32;
                    let v = d * l * codes.values[code as usize] as f32 * codes.factor;
                    assert_eq!(v.to_bits(), w.to_bits(), "{kind:?} value {i}: {v} vs {w}");
                }
            }
        }
    }

    /// A tensor of each i-quant is told apart by its stand-in and its bytes per block.
    #[test]
    fn each_i_quant_is_known_by_its_tensor() {
        for kind in [IQuant::Iq4Nl].into_iter().chain(SUPER_BLOCKED) {
            let bytes = vec![0u8; 4 * kind.block_bytes()];
            let t = qtensor(kind, bytes, &[2, 2 * kind.block()], &Device::Cpu).unwrap();
            assert_eq!(IQuant::of(&t), Some(kind));
        }
        let q8 = QTensor::quantize(
            &Tensor::zeros((2, 256), candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap();
        assert_eq!(IQuant::of(&q8), None);
    }
}
