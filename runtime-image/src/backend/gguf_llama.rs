//! Llama-family GGUF models (quantised weights).
//!
//! Dense models run on our own forward pass ([`super::qllama`]), which batches the decode
//! steps of concurrent sequences into one pass over the weights. On a GPU, where our kernels
//! (CPU kernels) do not run, dense models run on [`super::tensor_llama`] with candle's
//! quantised products, which batches the decode steps too. Mixture-of-experts GGUFs and, on
//! request, any GGUF ([`load_candle_reference`]) run on candle-transformers'
//! `quantized_llama`, whose weights (`ModelWeights`) hold their KV cache inside; their tensors
//! are reference-counted, so a clone with a cleared cache is a cheap, independent sequence.
//! When no tokenizer.json lies beside the file, the tokenizer is built from the GGUF metadata.

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{QStorage, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::quantized_llama::{MAX_SEQ_LEN, ModelWeights};

use super::iquant::{Gguf, IQuant};
use super::qllama::{self, Arch, KvCache, Weights};
use super::tensor_llama::{
    Biased, Experts as TensorExperts, Heads, Layer, Mlp, PREFILL_CHUNK, Proj, Rope, TensorLlama,
    TensorLlamaLm, inverse_frequencies, long_rope_tables, rope_tables, scaled_rope_tables,
};
use super::{CausalLm, Sequence};
use crate::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::tokenizer::{GgufVocab, TextTokenizer};

struct GgufLlama {
    weights: ModelWeights,
    device: Device,
    vocab_size: usize,
    context_length: usize,
}

struct GgufSequence {
    weights: ModelWeights,
    device: Device,
    len: usize,
}

impl CausalLm for GgufLlama {
    fn new_sequence(&self) -> Result<Box<dyn Sequence>> {
        let mut weights = self.weights.clone();
        weights.clear_kv_cache();
        Ok(Box::new(GgufSequence {
            weights,
            device: self.device.clone(),
            len: 0,
        }))
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn context_length(&self) -> usize {
        self.context_length
    }
}

impl Sequence for GgufSequence {
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::InvalidRequest("no tokens to feed".into()));
        }
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let logits = self.weights.forward(&input, self.len)?;
        self.len += tokens.len();
        Ok(logits
            .squeeze(0)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?)
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// A dense llama GGUF on [`qllama::Weights`].
struct QLlama {
    weights: Arc<Weights>,
    vocab_size: usize,
    context_length: usize,
}

struct QLlamaSequence {
    weights: Arc<Weights>,
    cache: KvCache,
}

impl CausalLm for QLlama {
    /// Our kernels compute each row on its own (the tests assert a prompt split in two gives
    /// the logits of one fed whole, bit for bit).
    fn continuation_is_exact(&self) -> bool {
        true
    }
    fn cache_bytes_per_token(&self) -> Option<usize> {
        Some(self.weights.cache_bytes_per_token())
    }
    fn cache_cost(&self) -> super::CacheCost {
        self.weights.cache_cost()
    }
    fn new_sequence(&self) -> Result<Box<dyn Sequence>> {
        Ok(Box::new(QLlamaSequence {
            weights: self.weights.clone(),
            cache: self.weights.new_cache(),
        }))
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn context_length(&self) -> usize {
        self.context_length
    }
    /// One forward pass for all the sequences: their new tokens are the rows of every weight
    /// product; attention runs per sequence on its own cache.
    fn decode_batch(
        &self,
        seqs: &mut [&mut dyn Sequence],
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        let Some(own) = super::own_sequences::<QLlamaSequence>(seqs, tokens.len(), |q| {
            Arc::ptr_eq(&q.weights, &self.weights)
        }) else {
            return super::decode_each(seqs, tokens);
        };
        let mut items: Vec<(&mut KvCache, &[u32])> = own
            .into_iter()
            .zip(tokens)
            .map(|(q, t)| (&mut q.cache, std::slice::from_ref(t)))
            .collect();
        self.weights.forward(&mut items)
    }
    fn forward_passes(&self) -> Option<u64> {
        Some(self.weights.passes())
    }
    fn step_batch(
        &self,
        seqs: &mut [&mut dyn Sequence],
        inputs: &[&[u32]],
    ) -> Vec<Result<Vec<f32>>> {
        let together = super::own_sequences::<QLlamaSequence>(seqs, inputs.len(), |q| {
            Arc::ptr_eq(&q.weights, &self.weights)
        })
        .map(|own| {
            let mut items: Vec<(&mut KvCache, &[u32])> = own
                .into_iter()
                .zip(inputs)
                .map(|(q, t)| (&mut q.cache, *t))
                .collect();
            self.weights.forward(&mut items)
        });
        match together {
            Some(Ok(rows)) if rows.len() == inputs.len() => rows.into_iter().map(Ok).collect(),
            // One by one, so that only a sequence that fails fails (a failed pass left
            // every cache as it was).
            _ => super::step_each(self, seqs, inputs),
        }
    }
}

impl Sequence for QLlamaSequence {
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut logits = self.weights.forward(&mut [(&mut self.cache, tokens)])?;
        logits
            .pop()
            .ok_or_else(|| Error::Model("the forward pass returned no logits".into()))
    }
    /// One pass, every row through the head.
    fn feed_each(&mut self, tokens: &[u32], each: &mut super::EachRow<'_>) -> Result<()> {
        self.weights.forward_each(&mut self.cache, tokens, each)
    }
    fn len(&self) -> usize {
        self.cache.len()
    }
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
    fn fork(&self) -> Option<Box<dyn Sequence>> {
        self.fork_prefix(self.cache.len())
    }
    fn fork_prefix(&self, len: usize) -> Option<Box<dyn Sequence>> {
        Some(Box::new(QLlamaSequence {
            weights: self.weights.clone(),
            cache: self.weights.cache_prefix(&self.cache, len)?,
        }))
    }
    fn cache_blocks(&self) -> Option<Vec<(usize, usize)>> {
        Some(self.cache.blocks())
    }
}

fn md<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| Error::Model(format!("GGUF metadata has no {key}")))
}

fn md_u32(ct: &gguf_file::Content, key: &str) -> Option<u32> {
    ct.metadata.get(key).and_then(|v| {
        v.to_u32()
            .ok()
            .or_else(|| v.to_i32().ok().map(|x| x as u32))
    })
}

/// A `u32` the file must have.
fn need_u32(ct: &gguf_file::Content, key: &str) -> Result<u32> {
    md_u32(ct, key).ok_or_else(|| Error::Model(format!("GGUF metadata has no {key}")))
}

fn md_str<'a>(ct: &'a gguf_file::Content, key: &str) -> Option<&'a str> {
    ct.metadata
        .get(key)
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
}

fn md_string_list(ct: &gguf_file::Content, key: &str) -> Result<Vec<String>> {
    md(ct, key)?
        .to_vec()?
        .iter()
        .map(|v| Ok(v.to_string()?.clone()))
        .collect()
}

/// The metadata list `key` with each item read by `item`; `None` when the file has none.
fn md_list<T>(
    ct: &gguf_file::Content,
    key: &str,
    item: impl Fn(&gguf_file::Value) -> candle_core::Result<T>,
) -> Result<Option<Vec<T>>> {
    match ct.metadata.get(key) {
        Some(v) => Ok(Some(
            v.to_vec()?
                .iter()
                .map(item)
                .collect::<candle_core::Result<_>>()?,
        )),
        None => Ok(None),
    }
}

/// Which forward pass a GGUF llama runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Forward {
    /// The device's best: ours on the CPU, [`super::tensor_llama`] on a GPU, candle's
    /// `quantized_llama` for mixture-of-experts files.
    Best,
    /// candle-transformers' `quantized_llama` (the tests' reference).
    Candle,
    /// [`super::tensor_llama`] with candle's quantised products, also on the CPU (what a GPU
    /// runs, for the tests).
    TensorOps,
}

/// Loads a GGUF llama file plus its tokenizer and chat template, on `device`.
pub(super) fn load(path: &Path, device: &Device) -> Result<LoadedModel> {
    load_with(path, Forward::Best, device)
}

/// Loads a GGUF llama file on candle-transformers' `quantized_llama`, which serves
/// mixture-of-experts files; the tests compare our forward pass with it.
pub fn load_candle_reference(path: &Path) -> Result<LoadedModel> {
    load_with(path, Forward::Candle, &Device::Cpu)
}

/// A dense llama GGUF's weights on [`TensorLlama`]: the products stay quantised (candle's
/// `QMatMul`), the token embeddings and norms are dequantised to f32, the activations' dtype,
/// as in candle-transformers' `quantized_llama`; the rotary embedding pairs interleaved
/// dimensions, llama.cpp's order.
fn tensor_weights<R: std::io::Read + std::io::Seek>(
    ct: &Gguf,
    arch: Arch,
    reader: &mut R,
    device: &Device,
    vocab_size: usize,
    context_length: usize,
) -> Result<TensorLlama> {
    let key = |name: &str| arch.key(name);
    let heads = need_u32(ct, &key("attention.head_count"))? as usize;
    let kv_heads = md_u32(ct, &key("attention.head_count_kv")).map_or(heads, |v| v as usize);
    let hidden = need_u32(ct, &key("embedding_length"))? as usize;
    let head_dim = qllama::head_dim(ct, arch, hidden, heads)?;
    // The dimensions of each head the rotary turns (fewer than all in Phi-4-mini).
    let rope_dim = md_u32(ct, &key("rope.dimension_count")).map_or(head_dim, |v| v as usize);
    if rope_dim == 0 || rope_dim > head_dim || !rope_dim.is_multiple_of(2) {
        return Err(Error::Model(format!(
            "GGUF llama with a rotary width of {rope_dim} for heads of {head_dim} is not supported"
        )));
    }
    let rms_eps = md(ct, &key("attention.layer_norm_rms_epsilon"))?.to_f32()?;
    let theta = ct
        .metadata
        .get(&key("rope.freq_base"))
        .and_then(|v| v.to_f32().ok())
        .unwrap_or(10_000.0);
    let quant = |t| -> candle_core::Result<Proj> {
        Ok(Box::new(candle_core::quantized::QMatMul::from_qtensor(t)?))
    };
    let has = |name: &str| ct.tensor_infos.contains_key(name);
    let embed_q = ct.tensor(reader, "token_embd.weight", device)?;
    let embed = embed_q.dequantize(device)?;
    let head = match ct.tensor(reader, "output.weight", device) {
        Ok(t) => quant(t)?,
        Err(_) => quant(embed_q)?,
    };
    let norm = ct
        .tensor(reader, "output_norm.weight", device)?
        .dequantize(device)?;
    let blocks = need_u32(ct, &key("block_count"))? as usize;
    let gemma = qllama::Gemma::of(ct, arch, blocks)?;
    let mut layers = Vec::with_capacity(blocks);
    let (q_dim, kv_dim) = (heads * head_dim, kv_heads * head_dim);
    for i in 0..blocks {
        let name = |part: &str| format!("blk.{i}.{part}");
        // Phi-3's fused products, split by rows into the parts the others keep apart.
        let fused = |reader: &mut R, part: &str, rows: &[usize]| -> Result<Vec<QTensor>> {
            split_rows(ct.tensor(reader, &name(part), &Device::Cpu)?, rows, device)
        };
        let (wq, wk, wv) = match has(&name("attn_qkv.weight")) {
            true => {
                let mut p = fused(reader, "attn_qkv.weight", &[q_dim, kv_dim, kv_dim])?;
                let (v, k) = (p.pop().unwrap(), p.pop().unwrap());
                (p.pop().unwrap(), k, v)
            }
            false => (
                ct.tensor(reader, &name("attn_q.weight"), device)?,
                ct.tensor(reader, &name("attn_k.weight"), device)?,
                ct.tensor(reader, &name("attn_v.weight"), device)?,
            ),
        };
        let experts = qllama::routing(ct, arch, &format!("blk.{i}"))?;
        let (gate, up) = match (experts.is_some(), has(&name("ffn_gate.weight"))) {
            (true, _) => (None, None),
            (false, true) => (
                Some(ct.tensor(reader, &name("ffn_gate.weight"), device)?),
                Some(ct.tensor(reader, &name("ffn_up.weight"), device)?),
            ),
            (false, false) => {
                let rows = ct.tensor_infos[&name("ffn_up.weight")].shape.dims()[0];
                let mut p = fused(reader, "ffn_up.weight", &[rows / 2, rows / 2])?;
                let up = p.pop().unwrap();
                (p.pop(), Some(up))
            }
        };
        let mut q = |part: &str| ct.tensor(reader, &name(part), device);
        // A product with its bias where the file has one (Qwen2's Q, K and V).
        let mut biased = |t, part: &str| -> Result<Proj> {
            let product = quant(t)?;
            Ok(match has(&name(&format!("{part}.bias"))) {
                true => Box::new(Biased {
                    product,
                    bias: q(&format!("{part}.bias"))?.dequantize(device)?,
                }),
                false => product,
            })
        };
        let (wq, wk, wv) = (
            biased(wq, "attn_q")?,
            biased(wk, "attn_k")?,
            biased(wv, "attn_v")?,
        );
        let qk_norm = match has(&name("attn_q_norm.weight")) {
            true => Some((
                q("attn_q_norm.weight")?.dequantize(device)?,
                q("attn_k_norm.weight")?.dequantize(device)?,
            )),
            false => None,
        };
        let post_norms = match has(&name("post_attention_norm.weight")) {
            true => Some((
                q("post_attention_norm.weight")?.dequantize(device)?,
                q("post_ffw_norm.weight")?.dequantize(device)?,
            )),
            false => None,
        };
        layers.push(Layer {
            attn_norm: q("attn_norm.weight")?.dequantize(device)?,
            q: wq,
            k: wk,
            v: wv,
            qk_norm,
            rotates: arch.rotates_layer(i),
            window: gemma.windows[i],
            o: quant(q("attn_output.weight")?)?,
            mlp_norm: q("ffn_norm.weight")?.dequantize(device)?,
            mlp: match (experts, gate, up) {
                (Some(routing), _, _) => {
                    let qllama::Routing {
                        count,
                        used,
                        scale,
                        normalise,
                    } = routing;
                    let p = format!("blk.{i}");
                    let router = q("ffn_gate_inp.weight")?.dequantize(device)?;
                    let mut part = |name: &str| -> Result<Vec<Proj>> {
                        (qllama::expert_matrices(ct, reader, &p, name, count, device)?)
                            .into_iter()
                            .map(|t| Ok(quant(t)?))
                            .collect()
                    };
                    let (gates, ups, downs) = (part("gate")?, part("up")?, part("down")?);
                    let experts = (gates.into_iter().zip(ups).zip(downs))
                        .map(|((g, u), d)| [g, u, d])
                        .collect();
                    let shared = match qllama::shared_expert(ct, reader, &p, device)? {
                        Some(([g, u, d], gate)) => Some((
                            [quant(g)?, quant(u)?, quant(d)?],
                            match gate {
                                Some(t) => Some(t.dequantize(device)?.to_dtype(DType::F32)?),
                                None => None,
                            },
                        )),
                        None => None,
                    };
                    Mlp::Experts(TensorExperts {
                        router: router.to_dtype(DType::F32)?,
                        experts,
                        used,
                        scale,
                        normalise,
                        shared,
                    })
                }
                (None, Some(gate), Some(up)) => Mlp::Dense {
                    gate: quant(gate)?,
                    up: quant(up)?,
                    down: quant(q("ffn_down.weight")?)?,
                },
                _ => unreachable!("a dense layer's gate and up are read"),
            },
            post_norms,
        });
    }
    let mut inv_freq = inverse_frequencies(theta, rope_dim);
    let scaling = qllama::rotary_scaling(ct, arch, reader, rope_dim, theta)?;
    if let Some(factors) = scaling.divisors {
        for (f, d) in inv_freq.iter_mut().zip(factors) {
            *f /= d;
        }
    }
    let (cos, sin) = match qllama::LongRope::of(ct, arch, reader, inv_freq.len())? {
        Some(l) => long_rope_tables(&inv_freq, &l, context_length, DType::F32, device)?,
        None => scaled_rope_tables(
            &inv_freq,
            scaling.attention,
            context_length,
            DType::F32,
            device,
        )?,
    };
    let local_rope = match gemma.local_base {
        Some(base) => Some(rope_tables(
            &inverse_frequencies(base, rope_dim),
            context_length,
            DType::F32,
            device,
        )?),
        None => None,
    };
    Ok(TensorLlama {
        embed,
        layers,
        norm,
        head,
        shape: Heads {
            heads,
            kv_heads,
            head_dim,
        },
        rms_eps,
        cos,
        sin,
        local_rope,
        scales: qllama::Scales::of(ct, arch)?,
        temperature: qllama::Temperature::of(ct, arch)?,
        attention_cap: gemma.attention_cap,
        logit_cap: gemma.logit_cap,
        gelu: gemma.gelu,
        rope: match arch.rotates_halves() {
            true => Rope::Halves,
            false => Rope::Interleaved,
        },
        dtype: DType::F32,
        device: device.clone(),
        vocab_size,
        context_length,
        prefill_chunk: PREFILL_CHUNK,
        passes: Default::default(),
    })
}

/// The message for a GGUF tensor type `id` (ggml's numbering) kandle cannot load.
pub(super) fn unsupported_type(path: &Path, id: u32) -> String {
    let name = match id {
        9 => "Q8_1",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        21 => "IQ3_S",
        22 => "IQ2_S",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        40 => "NVFP4",
        _ => "",
    };
    let what = match name {
        "" => format!("a tensor type this runtime does not know (ggml type {id})"),
        n => format!("{n} tensors (ggml type {id})"),
    };
    format!(
        "{} holds {what}, which kandle cannot load; it reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, \
         Q5_1, Q8_0, the K-quants (Q2_K to Q6_K) and the i-quants (IQ1_S to IQ4_XS): pick \
         another quantisation of the model, e.g. hf://<repo>:Q4_K_M",
        path.display()
    )
}

/// The tokenizer a GGUF file's vocabulary describes (`tokenizer.ggml.*`), as llama.cpp reads
/// it ([`TextTokenizer::from_gguf_vocab`]).
fn vocab_tokenizer(ct: &gguf_file::Content, tokens: &[String]) -> Result<TextTokenizer> {
    let token_types = md_list(ct, "tokenizer.ggml.token_type", |t| t.to_i32())?
        .unwrap_or_else(|| vec![1; tokens.len()]);
    let merges =
        md_list(ct, "tokenizer.ggml.merges", |m| Ok(m.to_string()?.clone()))?.unwrap_or_default();
    let model = md(ct, "tokenizer.ggml.model")?.to_string()?.clone();
    let pre = md_str(ct, "tokenizer.ggml.pre")
        .unwrap_or("default")
        .to_owned();
    let scores = md_list(ct, "tokenizer.ggml.scores", |s| s.to_f32())?.unwrap_or_default();
    let add_space_prefix = ct
        .metadata
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    TextTokenizer::from_gguf_vocab(GgufVocab {
        model,
        pre,
        tokens: tokens.to_vec(),
        token_types,
        merges,
        scores,
        add_space_prefix,
    })
}

/// The tokenizer of the GGUF file at `path` built from its vocabulary alone (a vocab-only
/// file will do), whatever its architecture: for tests against llama.cpp's vocabulary files.
pub fn gguf_vocab_tokenizer(path: &Path) -> Result<TextTokenizer> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let ct = Gguf::read(&mut file, path)?;
    let tokens = md_string_list(&ct, "tokenizer.ggml.tokens")?;
    vocab_tokenizer(&ct, &tokens)
}

pub(super) fn load_with(path: &Path, forward: Forward, device: &Device) -> Result<LoadedModel> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let ct = Gguf::read(&mut file, path)?;
    let arch = Arch::of(&ct)?;
    // Biases other than Q's, K's and V's (which both forward passes add) would be left out,
    // answering wrongly: refused.
    let applied = |n: &str| {
        ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
            .iter()
            .any(|b| n.ends_with(b))
    };
    if let Some(name) = (ct.tensor_infos.keys())
        .filter(|n| n.ends_with(".bias") && !applied(n))
        .min()
    {
        return Err(Error::Model(format!(
            "GGUF {arch:?} with biases ({name}) is not supported (only Q's, K's and V's are)"
        )));
    }
    let ctx_meta = md_u32(&ct, &arch.key("context_length")).unwrap_or(MAX_SEQ_LEN as u32) as usize;
    let tokens = md_string_list(&ct, "tokenizer.ggml.tokens")?;
    let vocab_size = md_u32(&ct, &arch.key("vocab_size"))
        .map(|v| v as usize)
        .unwrap_or(tokens.len());

    let dir = path.parent().unwrap_or(Path::new("."));
    let tokenizer = if dir.join("tokenizer.json").exists() {
        super::tokenizer_json(dir)?
    } else {
        vocab_tokenizer(&ct, &tokens)?
    };

    let bos_id = md_u32(&ct, "tokenizer.ggml.bos_token_id");
    let eos_id = md_u32(&ct, "tokenizer.ggml.eos_token_id");
    // Without the key, llama.cpp's default for the vocabulary's kind.
    let add_bos = ct
        .metadata
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or_else(|| {
            let text = |key| md_str(&ct, key).unwrap_or_default();
            crate::tokenizer::adds_bos_by_default(
                text("tokenizer.ggml.model"),
                text("tokenizer.ggml.pre"),
            )
        });
    let token_str = |id: Option<u32>| {
        id.and_then(|i| tokens.get(i as usize))
            .cloned()
            .unwrap_or_default()
    };
    let declared =
        ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"].map(|key| md_u32(&ct, key));
    let eos_ids = end_ids(eos_id, &declared, &tokens);

    let chat_template = match super::read_tokenizer_config(dir)?
        .as_ref()
        .map(super::chat_template_from_config)
        .transpose()?
        .flatten()
    {
        Some(t) => Some(t),
        None => match ct.metadata.get("tokenizer.chat_template") {
            Some(v) => Some(ChatTemplate::new(
                v.to_string()?.clone(),
                token_str(bos_id),
                token_str(eos_id),
            )?),
            None => None,
        },
    };

    // Q4_1 weights become Q8_0 with KANDLE_GGUF_REQUANT=q8_0 (off by default, see requant.rs).
    let requant = super::requant::Requant::from_env()?;
    if requant != super::requant::Requant::Off && !ct.iquants.is_empty() {
        return Err(Error::Model(format!(
            "{}: KANDLE_GGUF_REQUANT does not apply to a file with i-quants",
            path.display()
        )));
    }
    let Gguf { content, iquants } = ct;
    let (content, mut reader) = super::requant::prepare(content, &mut file, requant)?;
    let ct = Gguf { content, iquants };
    // Experts in one 3-D tensor each (`ffn_gate_exps`: every GGUF since 2024) run on kandle's
    // kernels; older files with a tensor per expert on candle's `quantized_llama`.
    let packed_experts = (ct.tensor_infos.keys()).any(|n| n.ends_with(".ffn_down_exps.weight"));
    let forward = match forward {
        _ if qllama::expert_count(&ct, arch) > 1 && !packed_experts => Forward::Candle,
        Forward::Best if !device.is_cpu() => Forward::TensorOps,
        f => f,
    };
    let lm: Box<dyn CausalLm> = if forward == Forward::Candle {
        // candle's `quantized_llama` is llama's alone.
        let own = [".bias", ".attn_q_norm.weight", ".attn_k_norm.weight"];
        let applied = (ct.tensor_infos.keys()).find(|n| own.iter().any(|o| n.ends_with(o)));
        if let Some(name) = ct.iquants.keys().min() {
            return Err(Error::Model(format!(
                "GGUF with a tensor per expert and i-quants ({name}) is not supported: candle's \
                 quantized_llama, which runs such files, cannot read them"
            )));
        }
        if arch != Arch::Llama || applied.is_some() {
            return Err(Error::Model(format!(
                "GGUF {arch:?} with {} on candle's quantized_llama is not supported",
                applied.map_or("its own architecture".to_owned(), |n| format!("tensor {n}"))
            )));
        }
        // candle's `quantized_llama` takes the heads' width to be the hidden size over them.
        let (hidden, heads) = (
            need_u32(&ct, "llama.embedding_length")? as usize,
            need_u32(&ct, "llama.attention.head_count")? as usize,
        );
        if qllama::head_dim(&ct, arch, hidden, heads)? * heads != hidden {
            return Err(Error::Model(format!(
                "GGUF llama on candle's quantized_llama (mixture-of-experts files) with heads \
                 not {hidden} / {heads} wide is not supported"
            )));
        }
        Box::new(GgufLlama {
            weights: ModelWeights::from_gguf(ct.content, &mut reader, device)?,
            device: device.clone(),
            vocab_size,
            context_length: ctx_meta.min(MAX_SEQ_LEN),
        })
    } else if forward == Forward::TensorOps {
        let weights = tensor_weights(&ct, arch, &mut reader, device, vocab_size, ctx_meta)?;
        Box::new(TensorLlamaLm(Arc::new(weights)))
    } else {
        Box::new(QLlama {
            weights: Arc::new(Weights::from_gguf(&ct, arch, &mut reader, ctx_meta)?),
            vocab_size,
            context_length: ctx_meta,
        })
    };
    Ok(super::generation_model(
        lm,
        tokenizer,
        chat_template,
        eos_ids,
        bos_id,
        add_bos,
    ))
}

/// `t`, a `(n, k)` quantised matrix on the CPU, as the matrices of its first `rows[0]` rows,
/// its next `rows[1]`, ..., on `device` (its blocks are whole rows, so a part is a run of its
/// bytes).
fn split_rows(t: QTensor, rows: &[usize], device: &Device) -> Result<Vec<QTensor>> {
    let (n, k) = t.shape().dims2()?;
    if rows.iter().sum::<usize>() != n {
        return Err(Error::Model(format!(
            "a fused GGUF matrix of {n} rows cannot be split into {rows:?}"
        )));
    }
    let (dtype, iquant) = (t.dtype(), IQuant::of(&t));
    let data = t.data()?;
    let row_bytes = data.len() / n;
    let mut at = 0;
    rows.iter()
        .map(|&r| {
            let part = &data[at * row_bytes..(at + r) * row_bytes];
            at += r;
            if let Some(kind) = iquant {
                return Ok(super::iquant::qtensor(
                    kind,
                    part.to_vec(),
                    &[r, k],
                    device,
                )?);
            }
            let storage = QStorage::from_data(std::borrow::Cow::Borrowed(part), device, dtype)?;
            Ok(QTensor::new(storage, (r, k))?)
        })
        .collect()
}

/// The tokens that end generation: the declared end of text, then the declared end-of-turn
/// and end-of-message tokens, then the conventional end tokens that the vocabulary has
/// (Llama 3.1's `<|eom_id|>` after a tool call among them, where a file does not declare it),
/// as llama.cpp gathers its end-of-generation set; each once, declared ids past the
/// vocabulary left out.
fn end_ids(eos: Option<u32>, declared: &[Option<u32>], tokens: &[String]) -> Vec<u32> {
    const CONVENTIONAL: [&str; 7] = [
        "<|endoftext|>",
        "<|im_end|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end|>",
        "<end_of_turn>",
        "<|end_of_text|>",
    ];
    let by_name = CONVENTIONAL
        .iter()
        .filter_map(|name| tokens.iter().position(|t| t == name))
        .map(|i| i as u32);
    let declared = (declared.iter().flatten().copied()).filter(|&i| (i as usize) < tokens.len());
    let mut ids: Vec<u32> = Vec::new();
    for id in eos.into_iter().chain(declared).chain(by_name) {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;

    /// A GGUF file whose one tensor has the ggml type `id` (written as F32, the type field
    /// then overwritten: candle cannot write the types it cannot read).
    fn file_with_type(dir: &Path, id: u32) -> std::path::PathBuf {
        let t = candle_core::Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, candle_core::quantized::GgmlDType::F32).unwrap();
        let mut bytes = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut bytes, &[], &[("w", &q)]).unwrap();
        let mut bytes = bytes.into_inner();
        // Header (magic, version, counts: 24 bytes), then the name (u64 length, "w"), the
        // dimension count (u32), two u64 dimensions, and the type (u32).
        let at = 24 + 8 + 1 + 4 + 2 * 8;
        assert_eq!(
            bytes[at..at + 4],
            0u32.to_le_bytes(),
            "F32's type where expected"
        );
        bytes[at..at + 4].copy_from_slice(&id.to_le_bytes());
        let path = dir.join("m.gguf");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn a_tensor_type_candle_cannot_read_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with_type(dir.path(), 34);
        let mut f = std::fs::File::open(&path).unwrap();
        let err = Gguf::read(&mut f, &path).unwrap_err().to_string();
        assert!(
            err.contains("TQ1_0") && err.contains("Q4_K_M") && err.contains("m.gguf"),
            "{err}"
        );
        // The activations' type, whose name stands for IQ4_NL inside kandle.
        let path = file_with_type(dir.path(), 9);
        let mut f = std::fs::File::open(&path).unwrap();
        let err = Gguf::read(&mut f, &path).unwrap_err().to_string();
        assert!(err.contains("w is Q8_1") && err.contains("m.gguf"), "{err}");
        for (id, kind) in [
            (16, IQuant::Iq2Xxs),
            (17, IQuant::Iq2Xs),
            (18, IQuant::Iq3Xxs),
            (19, IQuant::Iq1S),
            (20, IQuant::Iq4Nl),
            (21, IQuant::Iq3S),
            (22, IQuant::Iq2S),
            (23, IQuant::Iq4Xs),
            (29, IQuant::Iq1M),
        ] {
            let path = file_with_type(dir.path(), id);
            let mut f = std::fs::File::open(&path).unwrap();
            let ct = Gguf::read(&mut f, &path).unwrap();
            assert_eq!(ct.iquants["w"], kind);
            assert_eq!(ct.tensor_infos["w"].ggml_dtype, kind.tag());
        }
        let path = file_with_type(dir.path(), 99);
        let mut f = std::fs::File::open(&path).unwrap();
        let err = Gguf::read(&mut f, &path).unwrap_err().to_string();
        assert!(err.contains("ggml type 99"), "{err}");
        let path = file_with_type(dir.path(), 0);
        let mut f = std::fs::File::open(&path).unwrap();
        assert!(Gguf::read(&mut f, &path).is_ok());
    }

    #[test]
    fn generation_ends_at_the_declared_and_the_conventional_end_tokens() {
        let tokens: Vec<String> = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "hi",
        ]
        .iter()
        .map(|t| t.to_string())
        .collect();
        // Llama 3.1 as a file may write it: only the end of text and of turn declared;
        // <|eom_id|> (a turn that ends in a tool call) by its name.
        assert_eq!(end_ids(Some(1), &[Some(2), None], &tokens), [1, 2, 3]);
        // Each once, whichever way it is known; a declared id past the vocabulary left out.
        assert_eq!(end_ids(Some(2), &[Some(3), Some(99)], &tokens), [2, 3, 1]);
        let plain: Vec<String> = ["</s>", "a"].iter().map(|t| t.to_string()).collect();
        assert_eq!(end_ids(Some(0), &[None, None], &plain), [0]);
        assert_eq!(end_ids(None, &[None, None], &plain), Vec::<u32>::new());
    }
}
