//! The i-quants IQ4_NL and IQ4_XS, which candle's GGUF reader does not know.
//!
//! Both map each 4-bit code through one table of 16 signed values ([`VALUES`], ggml's
//! `kvalues_iq4nl`, spaced closer near zero where weights crowd) instead of a straight line:
//! - **IQ4_NL**, blocks of 32 `{d: f16, qs: [u8; 16]}`: value `i` is `d·VALUES[q]`, the low
//!   nibble of `qs[i]` for `i < 16`, the high nibble of `qs[i − 16]` after (Q4_0's layout).
//! - **IQ4_XS**, super-blocks of 256 `{d: f16, scales_h: u16, scales_l: [u8; 4], qs: [u8;
//!   128]}`: sub-block `s` of 32 takes the six-bit `l_s` (four bits of `scales_l`, two of
//!   `scales_h`) and its values are `d·(l_s − 32)·VALUES[q]`, its 16 bytes of `qs` laid as
//!   IQ4_NL's. 4.25 bits a weight: the hub's smallest 4-bit files (bartowski's and
//!   unsloth's `IQ4_XS`), and llama.cpp writes IQ4_NL where a row is not whole super-blocks.
//!
//! **Reading them.** candle fails on the whole file at the first tensor type it does not
//! know. [`Gguf::read`] then walks the header itself, and where the unknown types are these
//! two, has candle read a copy of the header in which each such tensor's type names a
//! stand-in ([`IQuant::tag`]); [`Gguf::tensor`] reads those tensors itself. A stand-in type
//! is only a label: candle never reads such a tensor's bytes as its own type, because the
//! tensor's storage is ours ([`Storage`], which dequantises and multiplies as the i-quant it
//! is, wherever candle's own operations take it) or, off the CPU, f16 values.
//!
//! **Running them.** On the CPU the kernels take both as the file holds them
//! ([`super::qmatmul`]); candle's operations (the tensor path) dequantise a row at a time. On
//! a GPU the matrices are dequantised to f16 at load (four times the memory; candle's CUDA
//! kernels know no i-quant).

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
}

impl IQuant {
    /// The i-quant of ggml type `id`, where kandle reads it.
    fn of_id(id: u32) -> Option<IQuant> {
        match id {
            20 => Some(IQuant::Iq4Nl),
            23 => Some(IQuant::Iq4Xs),
            _ => None,
        }
    }

    /// The candle type that stands for it in a tensor's info and a `QTensor`'s dtype: ggml's
    /// Q8_1 and Q8_K, the activations' types, which no GGUF holds as weights (llama.cpp has no
    /// product with either as weights), and which [`Gguf::read`] refuses in a file. Each has
    /// the i-quant's block of values (32, 256), so that candle's checks of shapes hold.
    pub(super) fn tag(self) -> GgmlDType {
        match self {
            IQuant::Iq4Nl => GgmlDType::Q8_1,
            IQuant::Iq4Xs => GgmlDType::Q8K,
        }
    }

    /// [`IQuant::tag`]'s ggml type id.
    fn tag_id(self) -> u32 {
        match self {
            IQuant::Iq4Nl => 9,
            IQuant::Iq4Xs => 15,
        }
    }

    /// The i-quant a stand-in type ([`IQuant::tag`]) labels.
    pub(super) fn of_tag(dtype: GgmlDType) -> Option<IQuant> {
        match dtype {
            GgmlDType::Q8_1 => Some(IQuant::Iq4Nl),
            GgmlDType::Q8K => Some(IQuant::Iq4Xs),
            _ => None,
        }
    }

    /// Values per block.
    pub(super) fn block(self) -> usize {
        match self {
            IQuant::Iq4Nl => 32,
            IQuant::Iq4Xs => 256,
        }
    }

    /// Bytes per block.
    pub(super) fn block_bytes(self) -> usize {
        match self {
            IQuant::Iq4Nl => 18,
            IQuant::Iq4Xs => 136,
        }
    }

    /// One block's values, as ggml's `dequantize_row_iq4_nl` and `_iq4_xs`.
    pub(super) fn dequantize_block(self, raw: &[u8], out: &mut [f32]) {
        let d = f16::from_le_bytes([raw[0], raw[1]]).to_f32();
        let sub_block = |qs: &[u8], dl: f32, out: &mut [f32]| {
            for (i, q) in qs[..16].iter().enumerate() {
                out[i] = dl * VALUES[(q & 15) as usize] as f32;
                out[i + 16] = dl * VALUES[(q >> 4) as usize] as f32;
            }
        };
        match self {
            IQuant::Iq4Nl => sub_block(&raw[2..18], d, out),
            IQuant::Iq4Xs => {
                for (s, out) in out[..256].chunks_exact_mut(32).enumerate() {
                    sub_block(&raw[8 + 16 * s..], d * (xs_scale(raw, s) - 32) as f32, out);
                }
            }
        }
    }
}

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
            .filter(|(_, t)| IQuant::of_tag(t.ggml_dtype).is_some())
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
}
