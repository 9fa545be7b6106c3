//! Backends: the only part of the runtime that touches candle.
//!
//! The engine sees a model through two small traits over plain data — token ids in, logits or
//! embeddings out — so that the HTTP layer and the scheduler never import candle (TEI's
//! router → core → backends split). A causal LM hands out independent [`Sequence`]s, each with
//! its own KV cache, so that the engine can interleave many requests between decode steps.

mod bert;
mod blenderbot_small;
mod bloom;
mod classifier;
mod convert;
mod distilbert;
mod encoder;
mod few_rows;
mod gguf_llama;
mod gpt2;
mod gptj;
mod hugepages;
mod igrids;
mod iquant;
mod layers;
mod llama;
mod qllama;
mod qmatmul;
pub mod requant;
mod seq2seq;
mod t5;
mod tensor_llama;
mod xlm_roberta;

use std::path::{Path, PathBuf};

use crate::chat::ChatTemplate;
use crate::error::{Error, Result, read_json};
use crate::model::{ClassificationModel, EmbeddingModel, GenerationModel, LoadedModel, Task};
use crate::tokenizer::TextTokenizer;

/// `e^(x − shift)` of each `x` into `out`, the same bits on every CPU.
pub(crate) use qllama::exp_shifted;

/// An output buffer that the tasks of one parallel product write at disjoint elements (our
/// kernels split a product's rows or columns across rayon tasks).
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: the tasks sharing it write disjoint elements, and the buffer outlives them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Element `offset` (the caller keeps it in bounds). A method, so that closures capture
    /// the whole (Sync) wrapper rather than its pointer field.
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// The kernels this process runs, as the CPU and `KANDLE_ISA` allow: the quantised (GGUF)
/// products and attention, and the encoders' f32 products. Logged when the model is loaded
/// (a server slower than expected says here which path it took), and read by the tests that
/// rerun models under each `KANDLE_ISA`.
pub fn kernels() -> String {
    let quantised = match qmatmul::Isa::detect() {
        qmatmul::Isa::Amx | qmatmul::Isa::Avx512Vnni => "avx512-vnni",
        qmatmul::Isa::Avx2 => "avx2",
        qmatmul::Isa::Scalar => "scalar",
    };
    let encoder = match encoder::packed_kernel() {
        Some(k) => format!("{k:?}").to_ascii_lowercase(),
        None => "gemm-crate".to_string(),
    };
    format!("quantised={quantised} encoder={encoder}")
}

/// True when `--dtype bf16` runs the sentence embedders' products in bf16 here (the CPU has
/// AVX512-BF16 and `KANDLE_ISA` allows AVX-512); elsewhere they run in f32.
pub fn encoder_bf16_products() -> bool {
    encoder::packed_bf16_kernel().is_some()
}

/// The node's transparent-huge-page setting, which decides whether GGUF weights sit on huge
/// pages (`hugepages::thp_setting`).
pub fn thp_setting() -> String {
    hugepages::thp_setting()
}

/// Bytes of weights kept in huge-page chunks (the GGUF models' packed matrices).
pub fn huge_page_weight_bytes() -> usize {
    hugepages::weight_bytes()
}

/// The load log's warning, if any, for the node's transparent-huge-page setting `thp` when
/// `huge_page_bytes` of weights wait for huge pages: only `never` keeps them off (`madvise`,
/// the usual default, and `always` both give them; "unavailable" is a kernel without THP,
/// where there is nothing to change).
pub fn thp_warning(thp: &str, huge_page_bytes: usize) -> Option<&'static str> {
    (thp == "never" && huge_page_bytes > 0).then_some(
        "transparent huge pages are off on this node (never): the GGUF weights stay on 4 KiB \
         pages and decode runs about a quarter slower; madvise (the usual default) enables them",
    )
}

/// What [`Sequence::feed_each`] hands each row's logits to.
pub type EachRow<'a> = dyn FnMut(&[f32]) + Send + 'a;

/// A causal language model: the weights, shared by all sequences.
/// How much of a sequence's keys and values the cache holds as the sequence grows, in
/// positions at every layer's cost ([`CausalLm::cache_bytes_per_token`]): what the engine's
/// batch token budget counts a sequence at. Where every layer keeps every position, `n`
/// positions hold `n`; where windowed layers let go of what no position to come sees (the
/// GGUF llama's Gemma 2 and 3), those layers hold their last positions only, and a long
/// sequence counts at less than its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheCost {
    /// Bytes a position of the layers that keep every position.
    full: usize,
    /// Bytes a position of the windowed layers (0: none).
    windowed: usize,
    /// The most positions a windowed layer holds at once.
    kept: usize,
}

impl CacheCost {
    /// Every layer keeps every position.
    pub const DENSE: CacheCost = CacheCost {
        full: 1,
        windowed: 0,
        kept: 0,
    };

    /// Layers of `full` bytes a position that keep every position, and layers of `windowed`
    /// bytes a position that hold at most `kept` positions at once.
    pub fn windowed(full: usize, windowed: usize, kept: usize) -> CacheCost {
        match windowed {
            0 => CacheCost::DENSE,
            _ => CacheCost {
                full,
                windowed,
                kept,
            },
        }
    }

    /// The most a sequence of `n` positions holds, in positions at every layer's cost
    /// (rounded up).
    pub fn positions(self, n: usize) -> usize {
        if self.windowed == 0 {
            return n;
        }
        let held = self.full as u128 * n as u128 + self.windowed as u128 * n.min(self.kept) as u128;
        usize::try_from(held.div_ceil((self.full + self.windowed) as u128)).unwrap_or(usize::MAX)
    }

    /// The longest sequence whose [`CacheCost::positions`] are at most `budget`.
    pub fn most_positions(self, budget: usize) -> usize {
        if self.windowed == 0 {
            return budget;
        }
        if self.full == 0 && budget >= self.kept {
            return usize::MAX;
        }
        // Up to `kept` positions, each costs one; past it, `n` costs more than `kept`.
        if budget <= self.kept {
            return budget;
        }
        let room = budget as u128 * (self.full + self.windowed) as u128
            - self.windowed as u128 * self.kept as u128;
        usize::try_from(room / self.full as u128).unwrap_or(usize::MAX)
    }
}

pub trait CausalLm: Send + Sync {
    /// Starts a sequence with an empty KV cache.
    fn new_sequence(&self) -> Result<Box<dyn Sequence>>;
    /// Number of logits per step.
    fn vocab_size(&self) -> usize;
    /// The longest sequence (prompt + generated tokens) the model supports.
    fn context_length(&self) -> usize;
    /// True when a sequence continued from a copy (a prompt fed in two parts) gives the same
    /// bits as one fed at once, so that a prompt's cached keys and values may stand in for
    /// computing them (the engine's prefix cache). False (the default) where the products'
    /// order of summation may depend on how many rows go in at once.
    fn continuation_is_exact(&self) -> bool {
        false
    }
    /// The memory one token of a sequence's cache takes (keys and values of every layer),
    /// where the backend knows it: the prefix cache's default budget is sized by it.
    fn cache_bytes_per_token(&self) -> Option<usize> {
        None
    }
    /// How much of a sequence's cache is held as it grows ([`CacheCost`]); by default every
    /// position at every layer.
    fn cache_cost(&self) -> CacheCost {
        CacheCost::DENSE
    }
    /// One decode step of several sequences: appends `tokens[i]` to `seqs[i]` and returns the
    /// logits at that position, one row per sequence, as `seqs[i].feed(&[tokens[i]])` would.
    /// The sequences may hold different numbers of tokens. On error the whole step failed.
    ///
    /// The default feeds them one by one; a backend that can stack the rows of all sequences
    /// into one pass over its weights overrides it (the GGUF llama does).
    fn decode_batch(
        &self,
        seqs: &mut [&mut dyn Sequence],
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        decode_each(seqs, tokens)
    }
    /// Passes over the weights run so far, each for one or more sequences, where the backend
    /// counts them (the llamas): what shows that a batched step is one pass.
    fn forward_passes(&self) -> Option<u64> {
        None
    }
    /// One round of several sequences, each fed its own tokens: a decode step's one token, a
    /// new prompt, or the rest of one continued from a copy. `seqs[i]` gets what
    /// `seqs[i].feed(inputs[i])` gives it, one result per sequence, and a sequence that
    /// failed is left as it was.
    ///
    /// The default ([`step_each`]) puts the one-token inputs of sequences past their prompt
    /// through [`CausalLm::decode_batch`] together and feeds the others one by one; the GGUF
    /// llama runs them all in one pass over its weights.
    fn step_batch(
        &self,
        seqs: &mut [&mut dyn Sequence],
        inputs: &[&[u32]],
    ) -> Vec<Result<Vec<f32>>> {
        step_each(self, seqs, inputs)
    }
}

/// A sequence borrowed for as long as the reference to it (its trait object's lifetime
/// shortened to match), to gather some of a round's sequences into a batch of their own.
fn reborrow<'a>(s: &'a mut dyn Sequence) -> &'a mut (dyn Sequence + 'a) {
    s
}

/// [`CausalLm::step_batch`] by [`CausalLm::decode_batch`] for the decode steps (all of them
/// fail if it fails) and [`Sequence::feed`] for each of the others.
pub fn step_each<L: CausalLm + ?Sized>(
    lm: &L,
    seqs: &mut [&mut dyn Sequence],
    inputs: &[&[u32]],
) -> Vec<Result<Vec<f32>>> {
    let mut out: Vec<Option<Result<Vec<f32>>>> = (0..seqs.len()).map(|_| None).collect();
    let decoding: Vec<bool> = seqs
        .iter()
        .zip(inputs)
        .map(|(s, t)| !s.is_empty() && t.len() == 1)
        .collect();
    let (mut at, mut tokens) = (Vec::new(), Vec::new());
    let mut batch: Vec<&mut dyn Sequence> = Vec::new();
    for (i, s) in seqs.iter_mut().enumerate() {
        if decoding[i] {
            at.push(i);
            batch.push(reborrow(*s));
            tokens.push(inputs[i][0]);
        }
    }
    if !batch.is_empty() {
        let rows = batch.len();
        match lm.decode_batch(&mut batch, &tokens) {
            Ok(logits) if logits.len() == rows => {
                for (i, l) in at.into_iter().zip(logits) {
                    out[i] = Some(Ok(l));
                }
            }
            other => {
                let msg = match other {
                    Err(e) => e.to_string(),
                    Ok(l) => format!("the decode step returned {} rows for {rows}", l.len()),
                };
                for i in at {
                    out[i] = Some(Err(Error::Model(msg.clone())));
                }
            }
        }
    }
    for (i, (s, t)) in seqs.iter_mut().zip(inputs).enumerate() {
        if out[i].is_none() {
            out[i] = Some(s.feed(t));
        }
    }
    out.into_iter()
        .map(|r| r.expect("every sequence has a result"))
        .collect()
}

/// The sequences of a batched decode step as the backend's own type `S`, when there is one
/// token per sequence and every sequence is an `S` that `mine` accepts (built on the same
/// weights); `None` otherwise (an empty step included), and the backend falls back to
/// [`decode_each`].
pub(crate) fn own_sequences<'a, S: 'static>(
    seqs: &'a mut [&mut dyn Sequence],
    inputs: usize,
    mine: impl Fn(&S) -> bool,
) -> Option<Vec<&'a mut S>> {
    if seqs.is_empty() || seqs.len() != inputs {
        return None;
    }
    let mut own = Vec::with_capacity(seqs.len());
    for s in seqs.iter_mut() {
        let s = s.as_any_mut()?.downcast_mut::<S>()?;
        if !mine(s) {
            return None;
        }
        own.push(s);
    }
    Some(own)
}

/// [`CausalLm::decode_batch`] as a loop over [`Sequence::feed`].
pub fn decode_each(seqs: &mut [&mut dyn Sequence], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
    if seqs.len() != tokens.len() {
        return Err(Error::InvalidRequest(format!(
            "{} sequences but {} tokens",
            seqs.len(),
            tokens.len()
        )));
    }
    seqs.iter_mut()
        .zip(tokens)
        .map(|(s, t)| s.feed(&[*t]))
        .collect()
}

/// One sequence being generated: the KV cache of one request.
pub trait Sequence: Send {
    /// Appends `tokens` at the next positions and returns the logits at the last one.
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>>;
    /// Appends `tokens` as [`Sequence::feed`] does and hands `each` the logits after every
    /// one of them, in order: what a prompt's log-probabilities are computed from (a
    /// completion's `echo` with `logprobs`). The default feeds one token at a time; a backend
    /// whose pass can put every row through its head overrides it (the llamas: one pass,
    /// per 512-token part on the tensor path).
    fn feed_each(&mut self, tokens: &[u32], each: &mut EachRow<'_>) -> Result<()> {
        for &t in tokens {
            each(&self.feed(&[t])?);
        }
        Ok(())
    }
    /// How many tokens the cache holds.
    fn len(&self) -> usize;
    /// True when nothing has been fed yet.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The backend's own sequence type, for a [`CausalLm::decode_batch`] that batches: it
    /// downcasts the sequences it was given. `None` (the default) when not needed.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }
    /// A copy of this sequence (its cache), which then goes on as this one would: the
    /// engine computes a prompt shared by several choices once. `None` (the default) where
    /// the backend cannot copy its cache.
    fn fork(&self) -> Option<Box<dyn Sequence>> {
        None
    }
    /// A copy of the first `len` tokens of this sequence (`len` at most [`Sequence::len`]),
    /// which then goes on as a sequence fed only those tokens would: the prefix cache
    /// continues the start that a new prompt shares with a kept one. Keys and values at a
    /// position depend only on the tokens up to it, so only a model whose continuation is
    /// exact ([`CausalLm::continuation_is_exact`]) needs it. `None` (the default): unsupported.
    fn fork_prefix(&self, len: usize) -> Option<Box<dyn Sequence>> {
        let _ = len;
        None
    }
    /// The blocks of storage this sequence's cache holds, each as (an identity, the positions
    /// it has room for, at every layer's cost: a store of some layers counts their share of
    /// its positions), where copies ([`Sequence::fork`], [`Sequence::fork_prefix`]) share
    /// blocks until they write to them: a block two sequences share has the same identity in
    /// both, for as long as both hold it. The prefix cache counts its budget in these, each
    /// shared block once. `None` (the default): nothing shared; the prefix cache counts the
    /// sequence as its prompt's length.
    fn cache_blocks(&self) -> Option<Vec<(usize, usize)>> {
        None
    }
}

/// A sentence-embedding model.
pub trait Embedder: Send + Sync {
    /// Embeds a batch of tokenised inputs (each already truncated to `max_input_tokens`).
    fn embed(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>>;
    /// Width of one embedding.
    fn dimension(&self) -> usize;
    /// The longest input the model accepts.
    fn max_input_tokens(&self) -> usize;
}

/// A sequence classifier (`*ForSequenceClassification`).
pub trait Classifier: Send + Sync {
    /// The raw logits, one row of `num_labels` per input (each already truncated to
    /// `max_input_tokens`). Inputs of different lengths run as one right-padded batch.
    fn classify(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>>;
    /// The raw logits of text pairs, a cross-encoder's input: input `i`'s tokens from
    /// `second[i]` on are the second text's (token type 1, as transformers' tokenizers give
    /// a pair). A model without token types (DistilBERT; XLM-RoBERTa's one type) reads a pair
    /// by its tokens alone.
    fn classify_pairs(&self, batch: &[Vec<u32>], second: &[usize]) -> Result<Vec<Vec<f32>>> {
        let _ = second;
        self.classify(batch)
    }
    /// The longest input the model accepts.
    fn max_input_tokens(&self) -> usize;
}

/// The weight dtype asked for (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// f32 on the CPU, where half-precision matmuls are slower and less exact; on a GPU the
    /// checkpoint's half precision (`weight_dtype`); encoders f32 everywhere (the CPU
    /// sentence embedders take `Bf16` only when it is asked for).
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl std::str::FromStr for WeightDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(WeightDtype::Auto),
            "f32" => Ok(WeightDtype::F32),
            "f16" => Ok(WeightDtype::F16),
            "bf16" => Ok(WeightDtype::Bf16),
            other => Err(Error::Model(format!(
                "unknown dtype {other:?} (expected auto, f32, f16 or bf16)"
            ))),
        }
    }
}

impl WeightDtype {
    fn candle(self) -> candle_core::DType {
        match self {
            WeightDtype::Auto | WeightDtype::F32 => candle_core::DType::F32,
            WeightDtype::F16 => candle_core::DType::F16,
            WeightDtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// Where a model runs (`--device`): `cpu`, or `cuda` / `cuda:N` (GPU `N`, 0 by default) in a
/// build with the `cuda` feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDevice {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for ComputeDevice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::Model(format!(
                "unknown device {s:?} (expected cpu, cuda or cuda:N)"
            ))
        };
        match s {
            "cpu" => Ok(ComputeDevice::Cpu),
            "cuda" => Ok(ComputeDevice::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(ComputeDevice::Cuda(n)),
                _ => Err(bad()),
            },
        }
    }
}

impl std::fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ComputeDevice::Cpu => f.write_str("cpu"),
            ComputeDevice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl ComputeDevice {
    /// Whether this build can run on such a device at all (`cuda` needs the `cuda` feature).
    pub const fn built_in(self) -> bool {
        match self {
            ComputeDevice::Cpu => true,
            ComputeDevice::Cuda(_) => cfg!(feature = "cuda"),
        }
    }

    /// The memory free on this device for the running batch's keys and values: the host's
    /// ([`crate::memory::host_room`]: a pod's limit less its working set, or the machine's
    /// available memory) on the CPU, the GPU's free memory (the driver's `cuMemGetInfo`) on a
    /// GPU; `None` where it cannot be read.
    pub fn free_memory(self) -> Option<u64> {
        match self {
            ComputeDevice::Cpu => crate::memory::host_room(),
            #[cfg(feature = "cuda")]
            ComputeDevice::Cuda(_) => {
                let device = self.candle().ok()?;
                let cuda = device.as_cuda_device().ok()?;
                let (free, _total) = cuda.cuda_stream().context().mem_get_info().ok()?;
                Some(free as u64)
            }
            #[cfg(not(feature = "cuda"))]
            ComputeDevice::Cuda(_) => None,
        }
    }

    /// The candle device; opening a GPU fails with candle's reason (no driver, no such
    /// ordinal) in the message.
    fn candle(self) -> Result<candle_core::Device> {
        match self {
            ComputeDevice::Cpu => Ok(candle_core::Device::Cpu),
            #[cfg(feature = "cuda")]
            ComputeDevice::Cuda(n) => candle_core::Device::new_cuda(n)
                .map_err(|e| Error::Model(format!("cannot open GPU cuda:{n}: {e}"))),
            #[cfg(not(feature = "cuda"))]
            ComputeDevice::Cuda(_) => Err(Error::Model(format!(
                "device {self} needs a CUDA build of kandle-runtime (the `cuda` feature); this \
                 build is CPU-only"
            ))),
        }
    }
}

/// The weight dtype on `device` for `--dtype`: `auto` is f32 on CPU (its half-precision
/// matmuls are slower and less exact there), and on a GPU the checkpoint's own half precision
/// (config.json's `torch_dtype` bfloat16), else f16, as TGI and vLLM choose.
fn weight_dtype(
    asked: WeightDtype,
    device: ComputeDevice,
    torch_dtype: Option<&str>,
) -> candle_core::DType {
    match (asked, device) {
        (WeightDtype::Auto, ComputeDevice::Cuda(_)) if torch_dtype == Some("bfloat16") => {
            candle_core::DType::BF16
        }
        (WeightDtype::Auto, ComputeDevice::Cuda(_)) => candle_core::DType::F16,
        (asked, _) => asked.candle(),
    }
}

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// A GGUF file, or a directory with config.json, *.safetensors and tokenizer.json.
    pub path: PathBuf,
    /// The task, when the caller wants to force one; inferred from the model otherwise.
    pub task: Option<Task>,
    /// Weight dtype of safetensors models (GGUF files keep their quantisation). Half
    /// precision is served for the causal LMs, and bf16 products for the BERT and
    /// XLM-RoBERTa sentence embedders on the CPU; the other encoders (classification, T5,
    /// Blenderbot) are f32 only, and asking them for f16/bf16 is refused.
    pub dtype: WeightDtype,
    /// Where the model runs. On a GPU, every model runs on candle's CUDA kernels (GGUF files
    /// on candle's quantised llama, BERT/XLM-RoBERTa embeddings on candle-transformers'
    /// models: kandle's own kernels are CPU kernels).
    pub device: ComputeDevice,
}

/// Loads the model at `opts.path`, choosing the architecture from the files found there.
pub fn load(opts: &LoadOptions) -> Result<LoadedModel> {
    let path = &opts.path;
    let device = opts.device.candle()?;
    if path.is_file() {
        if path.extension().and_then(|e| e.to_str()) == Some("gguf") {
            return check_task(gguf_llama::load(path, &device)?, opts.task);
        }
        return Err(Error::Model(format!(
            "{} is a file but not a .gguf file",
            path.display()
        )));
    }
    if !path.is_dir() {
        return Err(Error::Model(format!("{} does not exist", path.display())));
    }
    let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("gguf"))
        .collect();
    let config_path = path.join("config.json");
    if !config_path.exists() {
        return match ggufs.as_slice() {
            [one] => check_task(gguf_llama::load(one, &device)?, opts.task),
            [] => Err(Error::Model(format!(
                "{} has neither config.json nor a .gguf file",
                path.display()
            ))),
            _ => Err(Error::Model(format!(
                "{} holds several .gguf files; name one",
                path.display()
            ))),
        };
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        model_type: Option<String>,
        #[serde(default)]
        architectures: Vec<String>,
        torch_dtype: Option<String>,
    }
    let probe: Probe = read_json(&config_path)?;
    let model_type = probe.model_type.unwrap_or_default();
    let classification = probe
        .architectures
        .iter()
        .any(|a| a.ends_with("ForSequenceClassification"));
    let encoder = matches!(
        model_type.as_str(),
        "bert" | "distilbert" | "xlm-roberta" | "t5" | "blenderbot-small" | "blenderbot_small"
    );
    // `--task Embedding` on an encoder with a head serves its base model's sentence
    // embeddings, as transformers' feature-extraction pipeline would.
    let classification = classification && opts.task != Some(Task::Embedding);
    // XLM-RoBERTa serves embeddings from a base model, or from one with a head when asked.
    let xlmr_embedding = !classification
        && (!probe.architectures.iter().any(|a| a.contains("For"))
            || opts.task == Some(Task::Embedding));
    // The sentence embedders on kandle's CPU encoder take `--dtype bf16` (bf16 products, f32
    // elsewhere: `encoder::EncoderConfig::bf16`); every other encoder, and every encoder on
    // a GPU, stays in f32 (`auto` included).
    let bf16_embedding = opts.dtype == WeightDtype::Bf16
        && opts.device == ComputeDevice::Cpu
        && match model_type.as_str() {
            "bert" => !classification,
            "xlm-roberta" => xlmr_embedding,
            _ => false,
        };
    let dtype = match encoder {
        true => opts.dtype.candle(),
        false => weight_dtype(opts.dtype, opts.device, probe.torch_dtype.as_deref()),
    };
    if encoder && dtype != candle_core::DType::F32 && !bf16_embedding {
        return Err(Error::Model(format!(
            "dtype {:?} is not supported for {model_type} models here; use f32 or auto \
             (bf16 is served for BERT and XLM-RoBERTa sentence embeddings on the CPU, half \
             precision for llama, gpt2, gptj and bloom)",
            opts.dtype
        )));
    }
    // A decoder checkpoint with another head (token classification, QA, ...) has no LM head
    // to generate with; the architectures list says which head was saved.
    let lm_head = probe.architectures.is_empty()
        || probe
            .architectures
            .iter()
            .any(|a| a.ends_with("ForCausalLM") || a.ends_with("LMHeadModel"));
    let loaded = match (model_type.as_str(), classification) {
        (
            "llama" | "qwen2" | "qwen3" | "qwen3_moe" | "phi3" | "granite" | "smollm3" | "gemma2"
            | "gemma3_text",
            false,
        ) if lm_head => llama::load(path, &model_type, dtype, &device)?,
        ("gpt2", false) if lm_head => gpt2::load(path, dtype, &device)?,
        ("gptj", false) if lm_head => gptj::load(path, dtype, &device)?,
        ("bloom", false) if lm_head => bloom::load(path, dtype, &device)?,
        ("bert", false) => bert::load(path, &device, false, bf16_embedding)?,
        ("bert", true) => classifier::load_bert(path, dtype, &device)?,
        ("distilbert", true) => distilbert::load(path, dtype, &device)?,
        ("xlm-roberta", true) => xlm_roberta::load(path, dtype, &device)?,
        ("xlm-roberta", false) if xlmr_embedding => {
            xlm_roberta::load_embedding(path, &device, bf16_embedding)?
        }
        ("t5", false) => t5::load(path, &device)?,
        ("blenderbot-small" | "blenderbot_small", false) => blenderbot_small::load(path, &device)?,
        (other, _) => {
            return Err(Error::Model(format!(
                "model_type {other:?} with architectures {:?} is not supported; this runtime \
                 serves: {SUPPORTED}",
                probe.architectures
            )));
        }
    };
    check_task(loaded, opts.task)
}

/// The tokenizer a GGUF file's vocabulary describes, without its weights (a vocab-only file
/// will do): what a GGUF model without a tokenizer.json beside it is served with.
pub fn gguf_vocab_tokenizer(path: &Path) -> Result<crate::tokenizer::TextTokenizer> {
    gguf_llama::gguf_vocab_tokenizer(path)
}

/// Loads a GGUF llama on candle-transformers' `quantized_llama` instead of kandle's own
/// batched forward pass: the reference the tests compare that pass with.
#[doc(hidden)]
pub fn load_gguf_candle_reference(path: &Path) -> Result<LoadedModel> {
    gguf_llama::load_candle_reference(path)
}

/// Loads a GGUF llama on the forward pass a GPU runs it on (candle tensor operations with
/// candle's quantised products, batched decode steps: `tensor_llama.rs`), here on the CPU,
/// which the tests compare with the reference.
#[doc(hidden)]
pub fn load_gguf_gpu_path_on_cpu(path: &Path) -> Result<LoadedModel> {
    gguf_llama::load_with(
        path,
        gguf_llama::Forward::TensorOps,
        &candle_core::Device::Cpu,
    )
}

/// Loads a BERT sentence-embedding model on candle-transformers' `BertModel` instead of
/// kandle's encoder: what a GPU runs, which the tests compare with kandle's encoder on the CPU.
#[doc(hidden)]
pub fn load_bert_embedding_candle_reference(path: &Path) -> Result<LoadedModel> {
    bert::load(path, &candle_core::Device::Cpu, true, false)
}

/// What [`load`] accepts, for the refusal message.
pub const SUPPORTED: &str = "llama, qwen2, qwen3, phi3, granite, smollm3, gemma2, \
    gemma3_text, gpt2, gptj, bloom (TextGeneration); bert, xlm-roberta (Embedding); bert, \
    distilbert, xlm-roberta *ForSequenceClassification (Classification); t5, blenderbot-small \
    (Text2Text); GGUF llama, qwen2, qwen3, phi3, granite, smollm3, gemma2, gemma3";

fn check_task(model: LoadedModel, wanted: Option<Task>) -> Result<LoadedModel> {
    match wanted {
        Some(t) if t != model.task() => Err(Error::Model(format!(
            "--task {t:?} was asked for, but this runtime serves the model as {:?} only",
            model.task(),
        ))),
        _ => Ok(model),
    }
}

/// Checks the caller's architecture hint (`--architecture`) before the weights are read: the
/// model's own description must agree with it (config.json's `model_type` or an `architectures` entry, or the
/// GGUF's `general.architecture`; compared case-insensitively).
pub fn check_architecture(path: &Path, architecture: Option<&str>) -> Result<()> {
    let Some(hint) = architecture else {
        return Ok(());
    };
    let (described_by, names) = declared_architectures(path)?;
    if names.iter().any(|n| n.eq_ignore_ascii_case(hint)) {
        return Ok(());
    }
    Err(Error::Model(format!(
        "--architecture {hint:?} does not match the model: {described_by} says {}",
        if names.is_empty() {
            "nothing about its architecture".to_owned()
        } else {
            names.join(", ")
        }
    )))
}

/// The architecture names a model declares, and the file that declares them.
fn declared_architectures(path: &Path) -> Result<(String, Vec<String>)> {
    let gguf = if path.is_file() {
        Some(path.to_path_buf())
    } else if path.join("config.json").is_file() {
        None
    } else {
        std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().and_then(|e| e.to_str()) == Some("gguf"))
    };
    if let Some(gguf) = gguf {
        let mut f = std::fs::File::open(&gguf).map_err(|e| Error::io(&gguf, e))?;
        let content = iquant::Gguf::read(&mut f, &gguf)?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned();
        return Ok((gguf.display().to_string(), arch.into_iter().collect()));
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        model_type: Option<String>,
        #[serde(default)]
        architectures: Vec<String>,
    }
    let config = path.join("config.json");
    let probe: Probe = read_json(&config)?;
    let names = probe
        .model_type
        .into_iter()
        .chain(probe.architectures)
        .collect();
    Ok((config.display().to_string(), names))
}

/// Reads a model directory's config.json as the architecture's config type, and as raw JSON
/// for the fields that architecture reads by name (labels, eos ids, ...).
pub(crate) fn read_config<T: serde::de::DeserializeOwned>(
    dir: &Path,
) -> Result<(T, serde_json::Value)> {
    let path = dir.join("config.json");
    let raw: serde_json::Value = read_json(&path)?;
    let config = serde_json::from_value(raw.clone()).map_err(|source| Error::Json {
        path: path.display().to_string(),
        source,
    })?;
    Ok((config, raw))
}

/// Reads tokenizer_config.json beside the weights, if present: the chat template and the
/// special tokens it names.
pub(crate) fn read_tokenizer_config(dir: &Path) -> Result<Option<serde_json::Value>> {
    let p = dir.join("tokenizer_config.json");
    if p.exists() {
        Ok(Some(read_json(&p)?))
    } else {
        Ok(None)
    }
}

/// The token string stored under `key` of tokenizer_config.json (`"<s>"` or `{"content": "<s>"}`).
pub(crate) fn special_token(cfg: &serde_json::Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// Chat template from tokenizer_config.json (a string, or a list of named templates).
pub(crate) fn chat_template_from_config(cfg: &serde_json::Value) -> Result<Option<ChatTemplate>> {
    let source = match cfg.get("chat_template") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Array(list)) => match list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
        {
            Some(s) => s.to_owned(),
            None => return Ok(None),
        },
        _ => return Ok(None),
    };
    let bos = special_token(cfg, "bos_token").unwrap_or_default();
    let eos = special_token(cfg, "eos_token").unwrap_or_default();
    Ok(Some(ChatTemplate::new(source, bos, eos)?))
}

/// Loads tokenizer.json from a model directory.
pub(crate) fn tokenizer_json(dir: &Path) -> Result<TextTokenizer> {
    let p = dir.join("tokenizer.json");
    if !p.exists() {
        return Err(Error::Model(format!(
            "{} has no tokenizer.json",
            dir.display()
        )));
    }
    TextTokenizer::from_file(&p)
}

/// Builds a [`GenerationModel`] around a causal LM.
pub(crate) fn generation_model(
    lm: Box<dyn CausalLm>,
    tokenizer: TextTokenizer,
    chat_template: Option<ChatTemplate>,
    eos_ids: Vec<u32>,
    bos_id: Option<u32>,
    add_bos: bool,
) -> LoadedModel {
    LoadedModel::Generation(GenerationModel {
        task: Task::TextGeneration,
        lm,
        tokenizer,
        chat_template,
        eos_ids,
        bos_to_prepend: if add_bos { bos_id } else { None },
    })
}

/// Builds an [`EmbeddingModel`].
pub(crate) fn embedding_model(model: Box<dyn Embedder>, tokenizer: TextTokenizer) -> LoadedModel {
    LoadedModel::Embedding(EmbeddingModel { model, tokenizer })
}

/// Builds a [`ClassificationModel`] around a classifier; labels come from config.json.
pub(crate) fn classification_model(
    model: Box<dyn Classifier>,
    tokenizer: TextTokenizer,
    config: &serde_json::Value,
    num_labels: usize,
) -> Result<LoadedModel> {
    let labels = crate::model::labels_from_config(config, num_labels).map_err(Error::Model)?;
    let multi_label =
        config.get("problem_type").and_then(|p| p.as_str()) == Some("multi_label_classification");
    Ok(LoadedModel::Classification(ClassificationModel {
        model,
        tokenizer,
        labels,
        scoring: crate::model::Scoring::for_head(num_labels, multi_label),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sequence counts at its length where every layer keeps every position; with
    /// windowed layers, at the full layers' share of its length plus the windowed layers'
    /// share of what they keep (Gemma 3 270M: 3 full layers and 15 windowed, 768 kept).
    /// The longest sequence a budget holds is the last whose cost fits it.
    #[test]
    fn a_sequence_counts_at_what_its_layers_hold() {
        let dense = CacheCost::DENSE;
        assert_eq!(
            (dense.positions(8192), dense.most_positions(1000)),
            (8192, 1000)
        );
        assert_eq!(CacheCost::windowed(6, 0, 768), dense);
        let gemma = CacheCost::windowed(3, 15, 768);
        assert_eq!(gemma.positions(100), 100);
        assert_eq!(gemma.positions(768), 768);
        assert_eq!(
            gemma.positions(8192),
            (3 * 8192 + 15 * 768_usize).div_ceil(18)
        );
        assert_eq!(gemma.most_positions(700), 700);
        for budget in (0..3000).chain([100_000, 1 << 30]) {
            let most = gemma.most_positions(budget);
            assert!(gemma.positions(most) <= budget, "{budget}");
            assert!(gemma.positions(most + 1) > budget, "{budget}");
        }
        // Every layer windowed: at most `kept`, whatever the length.
        let all = CacheCost::windowed(0, 8, 768);
        assert_eq!(all.positions(1 << 20), 768);
        assert_eq!(all.most_positions(768), usize::MAX);
    }

    /// A sequence of a stand-in backend: `id` names its "weights".
    struct Own {
        id: u8,
        len: usize,
    }
    impl Sequence for Own {
        fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
            self.len += tokens.len();
            Ok(vec![self.id as f32])
        }
        fn len(&self) -> usize {
            self.len
        }
        fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
            Some(self)
        }
    }
    /// A sequence that does not expose its type.
    struct Opaque;
    impl Sequence for Opaque {
        fn feed(&mut self, _: &[u32]) -> Result<Vec<f32>> {
            Ok(vec![-1.0])
        }
        fn len(&self) -> usize {
            0
        }
    }

    /// A model whose decode step fails when asked to, and records how many rows each got.
    struct Stepper {
        fail: bool,
        rows: std::sync::Mutex<Vec<usize>>,
    }
    impl CausalLm for Stepper {
        fn new_sequence(&self) -> Result<Box<dyn Sequence>> {
            Ok(Box::new(Opaque))
        }
        fn vocab_size(&self) -> usize {
            1
        }
        fn context_length(&self) -> usize {
            100
        }
        fn decode_batch(
            &self,
            seqs: &mut [&mut dyn Sequence],
            tokens: &[u32],
        ) -> Result<Vec<Vec<f32>>> {
            self.rows.lock().unwrap().push(seqs.len());
            match self.fail {
                true => Err(Error::Model("the decode step failed".into())),
                false => decode_each(seqs, tokens),
            }
        }
    }

    /// The default round: the sequences past their prompt decode together, each prompt (a
    /// one-token one included) is fed alone, every sequence gets its own result, and a failed
    /// decode step fails only the sequences in it.
    #[test]
    fn a_round_decodes_together_and_feeds_each_prompt_alone_by_default() {
        let (mut a, mut b) = (Own { id: 1, len: 3 }, Own { id: 2, len: 5 });
        let (mut p, mut q) = (Own { id: 3, len: 0 }, Own { id: 4, len: 0 });
        let lm = Stepper {
            fail: false,
            rows: Default::default(),
        };
        let mut seqs: Vec<&mut dyn Sequence> = vec![&mut a, &mut p, &mut b, &mut q];
        let out = step_each(&lm, &mut seqs, &[&[7], &[1, 2, 3], &[8], &[9]]);
        let out: Vec<Vec<f32>> = out.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(out, [[1.0], [3.0], [2.0], [4.0]]);
        assert_eq!(*lm.rows.lock().unwrap(), [2], "one decode step of two rows");
        assert_eq!((a.len, p.len, b.len, q.len), (4, 3, 6, 1));
        let lm = Stepper {
            fail: true,
            rows: Default::default(),
        };
        let mut r = Own { id: 5, len: 0 };
        let mut seqs: Vec<&mut dyn Sequence> = vec![&mut a, &mut r];
        let out = step_each(&lm, &mut seqs, &[&[7], &[1, 2]]);
        assert!(
            out[0]
                .as_ref()
                .unwrap_err()
                .to_string()
                .contains("decode step failed")
        );
        assert_eq!(out[1].as_ref().unwrap(), &[5.0]);
        assert_eq!((a.len, r.len), (4, 2));
    }

    #[test]
    fn a_step_is_batched_only_when_every_sequence_is_the_backends_own() {
        let (mut a, mut b) = (Own { id: 1, len: 3 }, Own { id: 1, len: 5 });
        let mut seqs: Vec<&mut dyn Sequence> = vec![&mut a, &mut b];
        let own = own_sequences::<Own>(&mut seqs, 2, |s| s.id == 1).expect("all own");
        assert_eq!(own.iter().map(|s| s.len).collect::<Vec<_>>(), [3, 5]);
        // One input per sequence, or no batch.
        assert!(own_sequences::<Own>(&mut seqs, 1, |s| s.id == 1).is_none());
        // Another model's sequence (other weights) in the step: no batch.
        let mut c = Own { id: 2, len: 1 };
        let mut seqs: Vec<&mut dyn Sequence> = vec![&mut a, &mut c];
        assert!(own_sequences::<Own>(&mut seqs, 2, |s| s.id == 1).is_none());
        // A sequence of another type: no batch, and the step runs one by one.
        let mut o = Opaque;
        let mut seqs: Vec<&mut dyn Sequence> = vec![&mut b, &mut o];
        assert!(own_sequences::<Own>(&mut seqs, 2, |_| true).is_none());
        assert_eq!(
            decode_each(&mut seqs, &[7, 8]).unwrap(),
            vec![vec![1.0], vec![-1.0]]
        );
        assert_eq!(b.len, 6);
        // An empty step has nothing to batch (and decode_each returns no rows).
        let mut none: Vec<&mut dyn Sequence> = Vec::new();
        assert!(own_sequences::<Own>(&mut none, 0, |_| true).is_none());
        assert!(decode_each(&mut none, &[]).unwrap().is_empty());
    }

    #[test]
    fn dtype_names_parse_and_auto_means_f32_on_cpu() {
        assert_eq!("bf16".parse::<WeightDtype>().unwrap(), WeightDtype::Bf16);
        assert_eq!(
            "f16".parse::<WeightDtype>().unwrap().candle(),
            candle_core::DType::F16
        );
        assert_eq!(WeightDtype::Auto.candle(), candle_core::DType::F32);
        assert!(
            "f8".parse::<WeightDtype>()
                .unwrap_err()
                .to_string()
                .contains("f8")
        );
    }

    #[test]
    fn only_thp_never_with_huge_page_weights_is_warned_of() {
        let w = thp_warning("never", 1 << 20).expect("warned");
        assert!(w.contains("never") && w.contains("madvise"), "{w}");
        assert_eq!(
            thp_warning("never", 0),
            None,
            "no weights on huge pages: nothing to say"
        );
        for fine in ["madvise", "always", "unavailable"] {
            assert_eq!(thp_warning(fine, 1 << 20), None, "{fine}");
        }
    }

    #[test]
    fn devices_parse_and_auto_dtype_follows_the_device() {
        assert_eq!("cpu".parse::<ComputeDevice>().unwrap(), ComputeDevice::Cpu);
        assert_eq!(
            "cuda".parse::<ComputeDevice>().unwrap(),
            ComputeDevice::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<ComputeDevice>().unwrap(),
            ComputeDevice::Cuda(3)
        );
        assert_eq!(ComputeDevice::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", "cuda0"] {
            let e = bad.parse::<ComputeDevice>().unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("cuda:N"), "{bad}: {e}");
        }
        let cuda = ComputeDevice::Cuda(0);
        use candle_core::DType;
        assert_eq!(
            weight_dtype(WeightDtype::Auto, ComputeDevice::Cpu, Some("bfloat16")),
            DType::F32
        );
        assert_eq!(
            weight_dtype(WeightDtype::Auto, cuda, Some("bfloat16")),
            DType::BF16
        );
        assert_eq!(
            weight_dtype(WeightDtype::Auto, cuda, Some("float32")),
            DType::F16
        );
        assert_eq!(weight_dtype(WeightDtype::Auto, cuda, None), DType::F16);
        assert_eq!(
            weight_dtype(WeightDtype::F32, cuda, Some("bfloat16")),
            DType::F32
        );
    }

    /// A CPU build refuses a GPU at load with a message that says why (the CLI refuses it
    /// earlier still, config.rs); a CUDA build on a machine without one says it cannot open it.
    #[test]
    fn a_gpu_is_refused_when_this_build_or_machine_has_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
        let err = load(&LoadOptions {
            path: dir.path().to_path_buf(),
            device: ComputeDevice::Cuda(7),
            ..Default::default()
        })
        .err()
        .expect("refused")
        .to_string();
        if cfg!(feature = "cuda") {
            assert!(err.contains("cannot open GPU cuda:7"), "{err}");
        } else {
            assert!(
                err.contains("cuda:7") && err.contains("CUDA build"),
                "{err}"
            );
        }
    }

    #[test]
    fn an_unknown_model_type_is_refused_with_the_supported_list() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"model_type": "rwkv"}"#).unwrap();
        let err = load(&LoadOptions {
            path: dir.path().to_path_buf(),
            ..Default::default()
        })
        .err()
        .expect("refused")
        .to_string();
        assert!(err.contains("rwkv") && err.contains(SUPPORTED), "{err}");
    }

    #[test]
    fn the_architecture_hint_must_match_the_model_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type": "bert", "architectures": ["BertModel"]}"#,
        )
        .unwrap();
        for ok in [None, Some("bert"), Some("BERT"), Some("BertModel")] {
            check_architecture(dir.path(), ok).unwrap();
        }
        let err = check_architecture(dir.path(), Some("llama"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"llama\"") && err.contains("bert, BertModel"),
            "{err}"
        );
    }
}
