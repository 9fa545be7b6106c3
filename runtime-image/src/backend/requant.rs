//! Requantising GGUF weights at load, opt-in with `KANDLE_GGUF_REQUANT=q8_0`: every Q4_1 weight
//! is dequantised and requantised to Q8_0 when the file is read. Q8_0 holds each Q4_1 value to
//! within half a Q8_0 step, at 34 instead of 20 bytes per 32 weights (~1.7× the memory).
//!
//! It was written when candle 0.11's scalar Q4_1 dot product was 70% of SmolLM2's prompt time
//! (../shared/fixtures/baselines.md) and Q8_0 had candle's AVX2 kernel. It is off by default:
//! it doubled start → /ready (2.5 s for SmolLM2, over the 1 s target) and, with the batched
//! forward (`qllama.rs`), moved one greedy step of the llama.cpp reference where llama.cpp's
//! margin was 0.29 — more than the rounding the fixtures allow (0.25). Since kandle has its own
//! SIMD kernels for both types (`qmatmul.rs`), converting buys no speed it was measured for; it
//! stays as an option. (Types without a kernel of ours are converted at load anyway, by
//! `convert.rs`.)
//!
//! [`prepare_weight`] is the whole conversion, for any loader that reads tensors one by one;
//! [`prepare`] wraps a GGUF file so that a loader taking `(Content, reader)` — candle's
//! `quantized_llama::ModelWeights::from_gguf` — reads the converted tensors instead, one at a
//! time (at most one converted tensor is held beside the loaded weights).

use std::io::{Read, Seek, SeekFrom};

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};

use crate::error::{Error, Result};

/// Which weight types are converted at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requant {
    /// Keep the file's types.
    Off,
    /// Q4_1 weights become Q8_0 (`KANDLE_GGUF_REQUANT=q8_0`).
    Q41ToQ80,
}

impl Requant {
    /// From `KANDLE_GGUF_REQUANT`: `off` (default) or `q8_0`.
    pub fn from_env() -> Result<Self> {
        match std::env::var("KANDLE_GGUF_REQUANT").as_deref() {
            Ok("q8_0") => Ok(Requant::Q41ToQ80),
            Err(_) | Ok("") | Ok("off") => Ok(Requant::Off),
            Ok(other) => Err(Error::Model(format!(
                "KANDLE_GGUF_REQUANT={other:?}: expected q8_0 or off"
            ))),
        }
    }

    fn target(self, dtype: GgmlDType) -> Option<GgmlDType> {
        match (self, dtype) {
            (Requant::Q41ToQ80, GgmlDType::Q4_1) => Some(GgmlDType::Q8_0),
            _ => None,
        }
    }
}

/// The weight as the kernels should hold it under `mode`.
pub fn prepare_weight(w: QTensor, mode: Requant) -> Result<QTensor> {
    match mode.target(w.dtype()) {
        Some(to) => {
            let f = w.dequantize(&Device::Cpu)?;
            Ok(QTensor::quantize(&f, to)?)
        }
        None => Ok(w),
    }
}

/// A GGUF file's tensor data: the file itself, or its tensors converted on the fly.
pub enum GgufReader<'a, R> {
    /// Nothing to convert.
    Plain(&'a mut R),
    /// Converted tensors, laid out back to back from offset 0.
    Prepared(Prepared<'a, R>),
}

/// Serves the converted tensors: a read at a tensor's new offset converts that tensor.
pub struct Prepared<'a, R> {
    inner: &'a mut R,
    mode: Requant,
    orig_data_offset: u64,
    /// (new start, new length, the tensor's original info), sorted by start.
    segments: Vec<(u64, u64, gguf_file::TensorInfo)>,
    total: u64,
    pos: u64,
    current: Option<(usize, Vec<u8>)>,
}

/// Returns the content and reader that a loader should use under `mode`: unchanged when no
/// tensor needs converting.
pub fn prepare<R: Read + Seek>(
    ct: gguf_file::Content,
    reader: &mut R,
    mode: Requant,
) -> Result<(gguf_file::Content, GgufReader<'_, R>)> {
    if !ct
        .tensor_infos
        .values()
        .any(|t| mode.target(t.ggml_dtype).is_some())
    {
        return Ok((ct, GgufReader::Plain(reader)));
    }
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort_by_key(|n| ct.tensor_infos[*n].offset);
    let mut tensor_infos = std::collections::HashMap::new();
    let mut segments = Vec::new();
    let mut offset = 0u64;
    for name in names {
        let orig = &ct.tensor_infos[name];
        let dtype = mode.target(orig.ggml_dtype).unwrap_or(orig.ggml_dtype);
        let elems = orig.shape.elem_count();
        if !elems.is_multiple_of(dtype.block_size()) {
            return Err(Error::Model(format!(
                "{name}: {elems} weights do not fill whole {dtype:?} blocks"
            )));
        }
        let len = (elems / dtype.block_size() * dtype.type_size()) as u64;
        tensor_infos.insert(
            name.clone(),
            gguf_file::TensorInfo {
                ggml_dtype: dtype,
                shape: orig.shape.clone(),
                offset,
            },
        );
        segments.push((
            offset,
            len,
            gguf_file::TensorInfo {
                ggml_dtype: orig.ggml_dtype,
                shape: orig.shape.clone(),
                offset: orig.offset,
            },
        ));
        offset += len.next_multiple_of(32);
    }
    let content = gguf_file::Content {
        magic: ct.magic,
        metadata: ct.metadata,
        tensor_infos,
        tensor_data_offset: 0,
    };
    Ok((
        content,
        GgufReader::Prepared(Prepared {
            inner: reader,
            mode,
            orig_data_offset: ct.tensor_data_offset,
            segments,
            total: offset,
            pos: 0,
            current: None,
        }),
    ))
}

impl<R: Read + Seek> Read for GgufReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let p = match self {
            GgufReader::Plain(r) => return r.read(buf),
            GgufReader::Prepared(p) => p,
        };
        // The segment holding pos (gaps between segments are alignment padding: zeros).
        let i = p.segments.partition_point(|s| s.0 <= p.pos);
        let Some(i) = i.checked_sub(1) else {
            return Ok(0);
        };
        let (start, len, _) = p.segments[i];
        if p.pos >= start + len {
            let next = p.segments.get(i + 1).map_or(p.total, |s| s.0);
            let n = buf.len().min((next - p.pos) as usize);
            buf[..n].fill(0);
            p.pos += n as u64;
            return Ok(n);
        }
        if p.current.as_ref().map(|c| c.0) != Some(i) {
            // Drop the previous tensor first: at most one converted tensor is held.
            p.current = None;
            let mut convert = || -> Result<Vec<u8>> {
                let q = p.segments[i]
                    .2
                    .read(p.inner, p.orig_data_offset, &Device::Cpu)?;
                Ok(prepare_weight(q, p.mode)?.data()?.into_owned())
            };
            let q = convert().map_err(std::io::Error::other)?;
            if q.len() as u64 != len {
                return Err(std::io::Error::other(format!(
                    "converted tensor has {} bytes, expected {len}",
                    q.len()
                )));
            }
            p.current = Some((i, q));
        }
        let data = &p.current.as_ref().unwrap().1;
        let from = (p.pos - start) as usize;
        let n = buf.len().min(data.len() - from);
        buf[..n].copy_from_slice(&data[from..from + n]);
        p.pos += n as u64;
        if p.pos == start + len {
            p.current = None;
        }
        Ok(n)
    }
}

impl<R: Read + Seek> Seek for GgufReader<'_, R> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let p = match self {
            GgufReader::Plain(r) => return r.seek(to),
            GgufReader::Prepared(p) => p,
        };
        let pos = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => p.total.checked_add_signed(d),
            SeekFrom::Current(d) => p.pos.checked_add_signed(d),
        };
        p.pos = pos.ok_or_else(|| std::io::Error::other("seek before the start"))?;
        Ok(p.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    #[test]
    fn q4_1_becomes_q8_0_within_half_a_step_and_others_are_kept() {
        let x: Vec<f32> = (0..64 * 4)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let t = Tensor::from_vec(x, (4, 64), &Device::Cpu).unwrap();
        let q41 = QTensor::quantize(&t, GgmlDType::Q4_1).unwrap();
        let before = q41.dequantize(&Device::Cpu).unwrap();
        let q80 = prepare_weight(q41, Requant::Q41ToQ80).unwrap();
        assert_eq!(q80.dtype(), GgmlDType::Q8_0);
        let after = q80.dequantize(&Device::Cpu).unwrap();
        let err: f32 = (before - after)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        // Q8_0's step is max|x|/127 per block of 32; here max|x| ≤ 51/7.
        assert!(err <= 51.0 / 7.0 / 127.0 / 2.0 + 1e-5, "{err}");

        let q40 = QTensor::quantize(&t, GgmlDType::Q4_0).unwrap();
        let kept = prepare_weight(q40, Requant::Q41ToQ80).unwrap();
        assert_eq!(kept.dtype(), GgmlDType::Q4_0);
        let off = QTensor::quantize(&t, GgmlDType::Q4_1).unwrap();
        assert_eq!(
            prepare_weight(off, Requant::Off).unwrap().dtype(),
            GgmlDType::Q4_1
        );
    }

    #[test]
    fn a_prepared_file_serves_converted_and_untouched_tensors() {
        let a = Tensor::arange(0f32, 256.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 32))
            .unwrap();
        let b = Tensor::arange(0f32, 32.0, &Device::Cpu).unwrap();
        let qa = QTensor::quantize(&a, GgmlDType::Q4_1).unwrap();
        let qb = QTensor::quantize(&b, GgmlDType::F32).unwrap();
        let want_a = prepare_weight(
            QTensor::quantize(&a, GgmlDType::Q4_1).unwrap(),
            Requant::Q41ToQ80,
        )
        .unwrap()
        .data()
        .unwrap()
        .into_owned();
        let mut file = std::io::Cursor::new(Vec::new());
        let v = gguf_file::Value::U32(7);
        gguf_file::write(&mut file, &[("x", &v)], &[("a", &qa), ("b", &qb)]).unwrap();
        file.set_position(0);
        let ct = gguf_file::Content::read(&mut file).unwrap();
        let (ct, mut r) = prepare(ct, &mut file, Requant::Q41ToQ80).unwrap();
        assert!(matches!(r, GgufReader::Prepared(_)));
        assert_eq!(ct.metadata["x"].to_u32().unwrap(), 7);
        // Read in the opposite order to the file's, as a loader may.
        let tb = ct.tensor(&mut r, "b", &Device::Cpu).unwrap();
        assert_eq!(tb.dtype(), GgmlDType::F32);
        assert_eq!(tb.data().unwrap(), qb.data().unwrap());
        let ta = ct.tensor(&mut r, "a", &Device::Cpu).unwrap();
        assert_eq!(ta.dtype(), GgmlDType::Q8_0);
        assert_eq!(ta.shape().dims(), &[8, 32]);
        assert_eq!(ta.data().unwrap().as_ref(), want_a.as_slice());

        file.set_position(0);
        let ct = gguf_file::Content::read(&mut file).unwrap();
        let (ct, mut r) = prepare(ct, &mut file, Requant::Off).unwrap();
        assert!(matches!(r, GgufReader::Plain(_)));
        let ta = ct.tensor(&mut r, "a", &Device::Cpu).unwrap();
        assert_eq!(ta.dtype(), GgmlDType::Q4_1);
    }
}
