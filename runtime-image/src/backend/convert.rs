//! GGUF weight types without a kernel of ours, converted at load into one with one.
//!
//! kandle's CPU kernels ([`super::qmatmul`]) take Q4_0, Q4_1, Q5_0, Q8_0, Q2_K, Q3_K, Q4_K,
//! Q5_K, Q6_K and the i-quants. The other quantised type (Q5_1) used to go through candle's
//! `QMatMul`, one activation row at a time and without SIMD; it is converted to Q8_0 when it
//! is read, within about half a Q8_0 step (a 127th of the block's largest value), its scale
//! rounded to f16. Q8_0 takes more memory than Q5_1 (34 bytes per 32 weights against 24),
//! which one stream's decode, bound by reading the weights, pays for. f32/f16/bf16 tensors
//! are left to candle.
//!
//! The parts of one fused product (Q, K and V; gate and up) stay one matrix of the kernels
//! only when they share a type: a set of Q5_0 and Q8_0 parts (a Q4_K_M file's small
//! matrices: Q5_0 where Q4_K does not fit, Q8_0 where Q6_K does not) has its Q5_0 parts
//! converted to Q8_0, with the same values exactly ([`to_kernel_types`]).
//!
//! The activations are quantised as our kernels do (Q8_1-style blocks of 32), where llama.cpp
//! quantises them per 256 for the K-quants: outputs differ from llama.cpp's in the last
//! bits, as any two implementations' do.

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor, ggml_file};
use rayon::prelude::*;

use super::iquant::IQuant;
use crate::error::Result;

/// `t` in a type our kernels take: unchanged when it is one (or is not quantised), else
/// Q8_0 through f32 ([`through_f32`]).
pub(super) fn to_kernel_type(t: QTensor) -> Result<QTensor> {
    match t.dtype() {
        GgmlDType::Q4_0
        | GgmlDType::Q4_1
        | GgmlDType::Q8_0
        | GgmlDType::Q5_0
        | GgmlDType::Q4K
        | GgmlDType::Q5K
        | GgmlDType::Q6K
        | GgmlDType::Q3K
        | GgmlDType::Q2K
        | GgmlDType::F32
        | GgmlDType::F16
        | GgmlDType::BF16 => Ok(t),
        // The i-quants' stand-ins (`iquant.rs`), which have kernels of their own.
        d if IQuant::is_tag(d) => Ok(t),
        _ => through_f32(&t),
    }
}

/// `tensors`, the parts of one fused product, each as [`to_kernel_type`] makes it; if they
/// are Q5_0 and Q8_0 together, the Q5_0 ones as Q8_0 (`q − 16`, the same values), so that
/// the product stays one pass of the kernels over the threads (apart, each part is one:
/// thirty layers of a small model's QKV made ~30 more hand-offs a step).
pub(super) fn to_kernel_types(tensors: Vec<QTensor>) -> Result<Vec<QTensor>> {
    let tensors = tensors
        .into_iter()
        .map(to_kernel_type)
        .collect::<Result<Vec<_>>>()?;
    let has = |d: GgmlDType| tensors.iter().any(|t| t.dtype() == d);
    let only = tensors
        .iter()
        .all(|t| matches!(t.dtype(), GgmlDType::Q5_0 | GgmlDType::Q8_0));
    if !(only && has(GgmlDType::Q5_0) && has(GgmlDType::Q8_0)) {
        return Ok(tensors);
    }
    tensors
        .into_iter()
        .map(|t| {
            if t.dtype() != GgmlDType::Q5_0 {
                return Ok(t);
            }
            let bytes = q5_0_to_q8_0(&t.data()?);
            let dims = t.shape().dims().to_vec();
            Ok(ggml_file::qtensor_from_ggml(
                GgmlDType::Q8_0,
                &bytes,
                dims,
                &Device::Cpu,
            )?)
        })
        .collect()
}

/// Values the f32 round trip holds at once: a 128256 × 4096 Q6_K head (Llama 3's) would
/// otherwise take 2.1 GB of f32 during the load.
const CHUNK_VALUES: usize = 1 << 22;

/// `t` dequantised and quantised to Q8_0 a block of rows at a time.
fn through_f32(t: &QTensor) -> Result<QTensor> {
    let dims = t.shape().dims().to_vec();
    let k = *dims.last().unwrap_or(&1);
    let rows = t.shape().elem_count() / k.max(1);
    let (block, size) = (t.dtype().block_size(), t.dtype().type_size());
    if !k.is_multiple_of(block) || !k.is_multiple_of(32) {
        // Not whole blocks per row (never for a weight matrix): convert it whole.
        return Ok(QTensor::quantize(
            &t.dequantize(&Device::Cpu)?,
            GgmlDType::Q8_0,
        )?);
    }
    let row_bytes = k / block * size;
    let raw = t.data()?;
    // Parts of rows on the threads in parallel, each at most CHUNK_VALUES / threads values.
    let threads = rayon::current_num_threads().max(1);
    let per_chunk = (CHUNK_VALUES / threads / k).max(1);
    let mut out = vec![0u8; rows * k / 32 * 34];
    out.par_chunks_mut(per_chunk * k / 32 * 34)
        .zip(raw.par_chunks(per_chunk * row_bytes))
        .try_for_each(|(o, part)| -> Result<()> {
            let n = part.len() / row_bytes;
            let q = ggml_file::qtensor_from_ggml(t.dtype(), part, vec![n, k], &Device::Cpu)?;
            let f = q.dequantize(&Device::Cpu)?;
            o.copy_from_slice(&QTensor::quantize(&f, GgmlDType::Q8_0)?.data()?);
            Ok(())
        })?;
    Ok(ggml_file::qtensor_from_ggml(
        GgmlDType::Q8_0,
        &out,
        dims,
        &Device::Cpu,
    )?)
}

/// Q5_0 blocks `{d, qh: u32, qs[16]}` as Q8_0 blocks `{d, q − 16}`, on the threads in
/// parallel (the fresh output pages' zeroing by the kernel included).
fn q5_0_to_q8_0(raw: &[u8]) -> Vec<u8> {
    const BLOCKS: usize = 4096;
    let mut out = vec![0u8; raw.len() / 22 * 34];
    out.par_chunks_mut(34 * BLOCKS)
        .zip(raw.par_chunks(22 * BLOCKS))
        .for_each(|(o, r)| {
            for (o, b) in o.chunks_exact_mut(34).zip(r.chunks_exact(22)) {
                o[..2].copy_from_slice(&b[..2]);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let qs = &b[6..22];
                let q = &mut o[2..];
                for j in 0..16 {
                    let hi0 = ((qh >> j) << 4) & 0x10;
                    let hi1 = (qh >> (j + 12)) & 0x10;
                    q[j] = (((qs[j] & 0x0F) as u32 | hi0) as i32 - 16) as i8 as u8;
                    q[j + 16] = (((qs[j] >> 4) as u32 | hi1) as i32 - 16) as i8 as u8;
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    /// Weights with the spread of a real layer's: mostly small, a few large, per row.
    fn weights(n: usize, k: usize, seed: u64) -> Tensor {
        let mut s = seed;
        let x: Vec<f32> = (0..n * k)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                let row = (i / k) as f32;
                u * 0.05 * (1.0 + row % 3.0) + if i % 97 == 0 { 0.3 } else { 0.0 }
            })
            .collect();
        Tensor::from_vec(x, (n, k), &Device::Cpu).unwrap()
    }

    fn values(t: &QTensor) -> Vec<f32> {
        t.dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn q5_0_beside_q8_0_keeps_its_values_exactly() {
        let q4 = || QTensor::quantize(&weights(16, 512, 1), GgmlDType::Q4_0).unwrap();
        // A fused product of Q5_0 and Q8_0 parts: all Q8_0, the Q5_0 values unchanged.
        let q5 = || QTensor::quantize(&weights(16, 512, 2), GgmlDType::Q5_0).unwrap();
        let q8 = || QTensor::quantize(&weights(8, 512, 3), GgmlDType::Q8_0).unwrap();
        let parts = to_kernel_types(vec![q5(), q5(), q8()]).unwrap();
        assert!(parts.iter().all(|t| t.dtype() == GgmlDType::Q8_0));
        assert_eq!(values(&parts[0]), values(&q5()));
        assert_eq!(values(&parts[2]), values(&q8()));
        // Q5_0 alone, or beside a type of another kernel, stays Q5_0.
        for set in [vec![q5(), q5()], vec![q5(), q4()]] {
            let types: Vec<_> = to_kernel_types(set)
                .unwrap()
                .iter()
                .map(|t| t.dtype())
                .collect();
            assert_eq!(types[0], GgmlDType::Q5_0, "{types:?}");
        }
    }

    #[test]
    fn other_types_become_q8_0_within_half_its_step() {
        for from in [GgmlDType::Q5_1] {
            let w = weights(8, 512, 3);
            let q = QTensor::quantize(&w, from).unwrap();
            let c = to_kernel_type(QTensor::quantize(&w, from).unwrap()).unwrap();
            assert_eq!(c.dtype(), GgmlDType::Q8_0, "{from:?}");
            let (a, b) = (values(&q), values(&c));
            for (blk_a, blk_b) in a.chunks(32).zip(b.chunks(32)) {
                let amax = blk_a.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (x, y) in blk_a.iter().zip(blk_b) {
                    // Half a step, plus the step's own rounding to f16 (2⁻¹¹ of it, up
                    // to 127 times).
                    let step = amax / 127.0;
                    assert!((x - y).abs() <= step * 0.57 + 1e-7, "{from:?} {x} {y}");
                }
            }
        }
    }

    #[test]
    fn the_f32_round_trip_in_parts_is_the_whole_one() {
        // More rows than one part holds, and a last part of fewer.
        let k = 1024;
        let n = CHUNK_VALUES / k * 2 + 3;
        let w = weights(n, k, 5);
        let q = QTensor::quantize(&w, GgmlDType::Q5_1).unwrap();
        let whole =
            QTensor::quantize(&q.dequantize(&Device::Cpu).unwrap(), GgmlDType::Q8_0).unwrap();
        let parts = through_f32(&q).unwrap();
        assert_eq!(parts.shape().dims(), &[n, k]);
        assert_eq!(parts.data().unwrap(), whole.data().unwrap());
    }

    #[test]
    fn kernel_types_and_floats_are_kept() {
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q5_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q3K,
            GgmlDType::Q2K,
            GgmlDType::F32,
            GgmlDType::F16,
        ] {
            let q = QTensor::quantize(&weights(4, 256, 4), dtype).unwrap();
            let want = q.data().unwrap().into_owned();
            let c = to_kernel_type(q).unwrap();
            assert_eq!(c.dtype(), dtype);
            assert_eq!(c.data().unwrap().as_ref(), want.as_slice());
        }
    }
}
