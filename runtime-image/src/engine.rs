//! The engine: admission, the model thread, and the scheduling of sequences.
//!
//! Requests are admitted by a semaphore sized `max_batch_size + max_queue` (no permit ⇒ the
//! caller answers 429), then sent to one dedicated model thread, off the async executor. For
//! generation that thread keeps up to `max_batch_size` sequences running and advances each by
//! one token per round; new sequences join (their prompt is processed as their first step, or
//! first steps for a long one) and finished or abandoned ones leave between rounds, a request
//! joining only when its prompt plus `max_tokens` fits the batch token budget beside the
//! running sequences ([`BatchTokens`]; else it waits, first in line). A request
//! whose event receiver is gone (the client disconnected) is dropped at the next step. Events
//! flow back on an unbounded channel whose size is bounded by `max_tokens`.
//!
//! Each sequence has its own KV cache. A round is one step ([`CausalLm::step_batch`]) for
//! every sequence past its prompt and every prompt that joined since the last round: a backend
//! that supports it (the GGUF llama) stacks their new tokens into one matrix for every weight
//! product, so the weights are read once per round for all of them; the others decode the
//! sequences past their prompt together ([`CausalLm::decode_batch`]) and feed each prompt on
//! its own.

use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::backend::{CacheCost, CausalLm, Sequence};
use crate::chat::{ChatMessage, ChatOptions, ChatTemplate};
use crate::detok::{IncrementalText, TextAssembler};
use crate::json_mode::{self, Constraint, JsonMode, JsonVocab};
use crate::metrics::Metrics;
use crate::model::{LoadedModel, Scoring, Task};
use crate::sampling::{SampledToken, Sampler, SamplingParams, log_softmax, top_n};
use crate::tokenizer::TextTokenizer;

/// Scheduling limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences generated concurrently (and embedding inputs per forward pass).
    pub max_batch_size: usize,
    /// Admitted requests waiting for a slot beyond the running batch.
    pub max_queue: usize,
    /// Caps the model's context length (generation: prompt + output; embeddings: input).
    pub max_sequence_length: Option<usize>,
    /// Prompt tokens kept for later requests that start with them (`PrefixCache`); 0: off;
    /// `None`: 2048 tokens or 256 MiB of them, whichever is fewer (`default_prefix_budget`).
    pub prefix_cache_tokens: Option<usize>,
    /// The most positions of keys and values the running batch holds together.
    pub batch_tokens: BatchTokens,
}

/// The most positions of keys and values the running batch of a generation model may hold
/// together, so that long prompts arriving together cannot grow the caches past the memory
/// the server has (a context of 131,072 positions is 17 GB of Llama 3.1 8B's keys and values
/// in f16). As TGI's `--max-batch-total-tokens`, each sequence is counted at the most it may
/// hold, its prompt plus its `max_tokens`: a request joins the running batch only when that
/// fits beside the sequences running, else it waits, first in line, for them to finish; a
/// request larger than the whole budget gets less room for its output, or a 400 when its
/// prompt alone does not fit (the server's check, [`Frontend::batch_tokens`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchTokens {
    /// `--max-batch-tokens`.
    Limit(usize),
    /// Nine tenths of `free` bytes, the memory left on the model's device after it loaded
    /// ([`crate::backend::ComputeDevice::free_memory`]: on the CPU a pod's limit less its
    /// working set, else the machine's available memory; on a GPU its free memory), less the
    /// prefix cache's share, divided by the model's bytes of keys and values a token. No
    /// limit where the memory could not be read, or for a model that does not say its bytes
    /// a token (the small-context families: GPT-2, BLOOM, GPT-J, the encoder-decoders).
    Memory { free: Option<u64> },
    /// No limit.
    Unlimited,
}

impl BatchTokens {
    /// The budget in positions, `None` for no limit; `prefix_tokens` is the prefix cache's
    /// budget.
    fn resolve(self, bytes_per_token: Option<usize>, prefix_tokens: usize) -> Option<usize> {
        match self {
            BatchTokens::Limit(n) => Some(n),
            BatchTokens::Unlimited => None,
            BatchTokens::Memory { free } => {
                let per_token = bytes_per_token? as u64;
                let usable = free? / 10 * 9;
                let prefix = prefix_tokens as u64 * per_token;
                let tokens = usable.saturating_sub(prefix) / per_token.max(1);
                Some(usize::try_from(tokens).unwrap_or(usize::MAX))
            }
        }
    }
}

/// One generation request, validated and tokenised.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    /// Generated tokens at most (already clamped to the context).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// When the request gives up (the per-request timeout).
    pub deadline: Instant,
    /// The server's own warm-up request: it is not counted in the metrics and its prompt
    /// is not kept in the prefix cache.
    pub warmup: bool,
    /// JSON mode or a JSON schema ([`crate::json_mode`]): the answer is one JSON value of
    /// that kind, and ends with it.
    pub json: Option<Constraint>,
    /// What else ends the answer, or may not yet.
    pub ending: Ending,
}

/// How an answer ends and what its text keeps: vLLM's `ignore_eos`, `min_tokens`,
/// `stop_token_ids`, `include_stop_str_in_output` and `skip_special_tokens`
/// ([`crate::api::VllmFields`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ending {
    /// The end-of-text tokens are masked: the answer runs to `max_tokens`.
    pub ignore_eos: bool,
    /// Tokens before which nothing but `max_tokens` ends the answer: end-of-text and
    /// `stop_ids` are masked, stop sequences not looked for.
    pub min_tokens: usize,
    /// Tokens that end the answer (their text left out, as vLLM's, unless
    /// `include_stop_str`).
    pub stop_ids: Vec<u32>,
    /// vLLM's `include_stop_str_in_output`: the stop sequence, or the text of the token that
    /// ended the answer, stays at its end.
    pub include_stop_str: bool,
    /// vLLM's `skip_special_tokens: false`: special tokens' text is kept in the answer.
    pub keep_special: bool,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop sequence.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// A generated token's log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// A prompt's tokens with their log-probabilities (a completion's `echo` with `logprobs`):
/// `rest[i]` is token `i + 1`'s given the tokens before it, with the most likely tokens at
/// that position; the first token, with nothing before it, has none.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprobs {
    pub first: String,
    pub rest: Vec<TokenLogprob>,
}

/// What the model thread reports for one generation request.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateEvent {
    /// Newly final text (possibly empty) and, when asked, the logprobs of the tokens behind it;
    /// the tokens generated so far.
    Delta {
        text: String,
        logprobs: Vec<TokenLogprob>,
        completion_tokens: usize,
    },
    /// The end; always the last event of a successful request.
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request failed; the last event.
    Failed(EngineError),
}

/// Engine-level failures, mapped to HTTP statuses by the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("the server is at capacity; retry later")]
    Overloaded,
    #[error("the request timed out")]
    Timeout,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("this model does not serve {0}")]
    WrongTask(&'static str),
    #[error("model failure: {0}")]
    Internal(String),
}

enum Job {
    /// One request of `choices.len()` choices: choice `i` samples with the seed plus `i`.
    Generate {
        req: Box<GenerateRequest>,
        choices: Vec<(mpsc::UnboundedSender<GenerateEvent>, OwnedSemaphorePermit)>,
        admitted: Instant,
    },
    Embed {
        inputs: Vec<Vec<u32>>,
        /// Where each input's second text starts (a pair's; its length for one text).
        second: Vec<usize>,
        reply: oneshot::Sender<Result<Vec<Vec<f32>>, EngineError>>,
        _permit: OwnedSemaphorePermit,
    },
    /// The log-probabilities of prompts' tokens, `top` alternatives at each position.
    Score {
        prompts: Vec<Vec<u32>>,
        top: usize,
        reply: oneshot::Sender<Result<Vec<PromptLogprobs>, EngineError>>,
        _permit: OwnedSemaphorePermit,
    },
}

/// What request handlers need to know about the model, without touching it.
pub struct Frontend {
    pub task: Task,
    pub tokenizer: TextTokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub bos_to_prepend: Option<u32>,
    /// Generation: prompt + output tokens at most. Embedding: input tokens (longer inputs are
    /// truncated, as sentence-transformers does).
    pub context_length: usize,
    /// Embedding width (0 for generation).
    pub embedding_dim: usize,
    /// Classification: the label names by index (empty for the other tasks).
    pub labels: Vec<String>,
    /// Classification: how logits become scores.
    pub scoring: Scoring,
    /// Token ids given by a client (a completions prompt of ids, embeddings input of ids)
    /// must be below this: the tokenizer's vocabulary, and for generation the model's as well
    /// (the smaller of the two).
    pub vocab_limit: usize,
    /// Generation: the most positions the running batch holds together ([`BatchTokens`]);
    /// `None`: no limit. A request's choices need their prompt plus their output each.
    pub batch_tokens: Option<usize>,
    /// Generation: what a sequence of so many positions holds, in positions at every layer's
    /// cost, as the budget counts it (less than its length where windowed layers let go).
    pub cache_cost: CacheCost,
}

impl Frontend {
    /// Tokenises a prompt (completions: with the tokenizer's special tokens, and a GGUF's
    /// beginning-of-text token when its vocabulary asks for one and the text does not start
    /// with it; chat: the template already wrote them, as transformers and vLLM read a
    /// rendered conversation).
    pub fn encode_prompt(&self, text: &str, add_special_tokens: bool) -> crate::Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode(text, add_special_tokens)?;
        if add_special_tokens
            && let Some(bos) = self.bos_to_prepend
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Vocabulary size of the tokenizer.
    pub fn tokenizer_vocab_size(&self) -> usize {
        self.tokenizer.vocab_size()
    }

    /// Renders a conversation with the chat template and tokenises it.
    ///
    /// A model without a template (base gpt2, gptj, bloom checkpoints) gets a plain transcript:
    /// one `"{role}: {content}\n"` line per message, then `"assistant:"`, tokenised with the
    /// tokenizer's special tokens as a completion prompt is. Base models know no chat format,
    /// so the least surprising prompt is the one a user would type (README: "Chat without a
    /// template"); `opts` apply to it as to a template (`"assistant:"` is the generation
    /// prompt), and its `kwargs` have nothing to reach.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        opts: &ChatOptions,
    ) -> crate::Result<(String, Vec<u32>)> {
        let text = match &self.chat_template {
            Some(t) => t.render(messages, tools, opts)?,
            None => {
                let mut s = String::new();
                for m in messages {
                    s.push_str(&format!("{}: {}\n", m.role, m.content));
                }
                if opts.add_generation_prompt {
                    s.push_str("assistant:");
                }
                match opts.continue_final_message {
                    true => crate::chat::cut_after_final(s, messages)?,
                    false => s,
                }
            }
        };
        let ids = self.encode_prompt(&text, self.chat_template.is_none())?;
        Ok((text, ids))
    }
}

/// A running engine. Dropping the last handle lets the model thread finish its work and exit.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    tx: Mutex<Option<Sender<Job>>>,
    permits: Arc<Semaphore>,
    frontend: Frontend,
    metrics: Metrics,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Engine {
    /// Moves the model onto its own thread and starts accepting work.
    pub fn start(model: LoadedModel, cfg: EngineConfig, metrics: Metrics) -> Engine {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let batch = cfg.max_batch_size.max(1);
        let cap = |model_limit: usize| {
            cfg.max_sequence_length
                .map_or(model_limit, |c| c.min(model_limit))
        };
        let m = metrics.clone();
        let (frontend, thread) = match model {
            LoadedModel::Generation(g) => {
                let prefix_tokens = match g.lm.continuation_is_exact() {
                    true => cfg
                        .prefix_cache_tokens
                        .unwrap_or_else(|| default_prefix_budget(g.lm.cache_bytes_per_token())),
                    false => 0,
                };
                tracing::info!(tokens = prefix_tokens, "prefix cache budget");
                let batch_tokens = cfg
                    .batch_tokens
                    .resolve(g.lm.cache_bytes_per_token(), prefix_tokens);
                match batch_tokens {
                    Some(tokens) => tracing::info!(
                        tokens,
                        bytes_per_token = g.lm.cache_bytes_per_token(),
                        "batch token budget (--max-batch-tokens)"
                    ),
                    None => tracing::info!("no batch token budget (--max-batch-tokens)"),
                }
                m.batch_tokens_limit
                    .set(batch_tokens.map_or(0, |t| i64::try_from(t).unwrap_or(i64::MAX)));
                let frontend = Frontend {
                    task: g.task,
                    tokenizer: g.tokenizer.clone(),
                    chat_template: g.chat_template,
                    bos_to_prepend: g.bos_to_prepend,
                    context_length: cap(g.lm.context_length()),
                    embedding_dim: 0,
                    labels: Vec::new(),
                    scoring: Scoring::Softmax,
                    vocab_limit: g.tokenizer.vocab_size().min(g.lm.vocab_size()),
                    batch_tokens,
                    cache_cost: g.lm.cache_cost(),
                };
                let worker = GenerationWorker {
                    prefix: std::cell::RefCell::new(PrefixCache::new(prefix_tokens)),
                    context_length: cap(g.lm.context_length()),
                    lm: g.lm,
                    tokenizer: g.tokenizer,
                    eos_ids: g.eos_ids,
                    batch,
                    batch_tokens,
                    cache_cost: frontend.cache_cost,
                    metrics: m,
                    json_texts: std::cell::OnceCell::new(),
                };
                let thread = std::thread::Builder::new()
                    .name("kandle-model".into())
                    .spawn(move || worker.run(rx));
                (frontend, thread)
            }
            LoadedModel::Embedding(e) => {
                let vocab_limit = e.tokenizer.vocab_size();
                let frontend = Frontend {
                    task: Task::Embedding,
                    tokenizer: e.tokenizer,
                    chat_template: None,
                    bos_to_prepend: None,
                    context_length: cap(e.model.max_input_tokens()),
                    embedding_dim: e.model.dimension(),
                    labels: Vec::new(),
                    scoring: Scoring::Softmax,
                    vocab_limit,
                    batch_tokens: None,
                    cache_cost: CacheCost::DENSE,
                };
                let model = e.model;
                let thread = std::thread::Builder::new()
                    .name("kandle-model".into())
                    .spawn(move || encoder_loop(|b, _| model.embed(b), batch, rx, m));
                (frontend, thread)
            }
            LoadedModel::Classification(c) => {
                let vocab_limit = c.tokenizer.vocab_size();
                let frontend = Frontend {
                    task: Task::Classification,
                    tokenizer: c.tokenizer,
                    chat_template: None,
                    bos_to_prepend: None,
                    context_length: c.model.max_input_tokens(),
                    embedding_dim: 0,
                    labels: c.labels,
                    scoring: c.scoring,
                    vocab_limit,
                    batch_tokens: None,
                    cache_cost: CacheCost::DENSE,
                };
                let model = c.model;
                let thread = std::thread::Builder::new()
                    .name("kandle-model".into())
                    .spawn(move || encoder_loop(|b, s| model.classify_pairs(b, s), batch, rx, m));
                (frontend, thread)
            }
        };
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the model thread");
                None
            }
        };
        Engine {
            inner: Arc::new(Inner {
                tx: Mutex::new(Some(tx)),
                permits: Arc::new(Semaphore::new(batch + cfg.max_queue)),
                frontend,
                metrics,
                thread: Mutex::new(thread),
            }),
        }
    }

    /// The model's tokenizer, template and limits.
    pub fn frontend(&self) -> &Frontend {
        &self.inner.frontend
    }

    fn send(&self, job: Job) -> Result<(), EngineError> {
        let guard = self
            .inner
            .tx
            .lock()
            .map_err(|_| EngineError::Internal("engine lock poisoned".into()))?;
        match guard.as_ref() {
            Some(tx) => tx
                .send(job)
                .map_err(|_| EngineError::Internal("the model thread has stopped".into())),
            None => Err(EngineError::ShuttingDown),
        }
    }

    /// A place in the running batch or the queue, or `Overloaded` at once when none is left.
    fn permit(&self) -> Result<OwnedSemaphorePermit, EngineError> {
        self.inner
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| EngineError::Overloaded)
    }

    /// Admits a generation request, or refuses it at once when the queue is full.
    pub fn generate(
        &self,
        req: GenerateRequest,
    ) -> Result<mpsc::UnboundedReceiver<GenerateEvent>, EngineError> {
        let mut rxs = self.generate_n(req, 1)?;
        Ok(rxs.remove(0))
    }

    /// Admits a request of `n` choices as one job, or refuses it whole at once when the
    /// queue cannot take them all. The choices enter the running batch together; choice `i`
    /// samples with the request's seed plus `i` (any seed when it has none), and the prompt
    /// is computed once for them all where the model can copy a sequence
    /// ([`crate::backend::Sequence::fork`]).
    pub fn generate_n(
        &self,
        req: GenerateRequest,
        n: usize,
    ) -> Result<Vec<mpsc::UnboundedReceiver<GenerateEvent>>, EngineError> {
        self.generate_each(vec![req], n)
    }

    /// Admits several requests of `n` choices each (the prompts of one completions request),
    /// all or none: every choice's place is taken before any is sent, so a request the queue
    /// cannot hold whole is refused whole. Each request is then the job [`Self::generate_n`]
    /// sends, exactly what it would be alone. The receivers come request by request, each
    /// request's choices in order.
    pub fn generate_each(
        &self,
        reqs: Vec<GenerateRequest>,
        n: usize,
    ) -> Result<Vec<mpsc::UnboundedReceiver<GenerateEvent>>, EngineError> {
        if !matches!(
            self.inner.frontend.task,
            Task::TextGeneration | Task::Text2Text
        ) {
            return Err(EngineError::WrongTask("text generation"));
        }
        let n = n.max(1);
        let mut jobs = Vec::with_capacity(reqs.len());
        let mut rxs = Vec::with_capacity(reqs.len() * n);
        for req in reqs {
            let mut choices = Vec::with_capacity(n);
            for _ in 0..n {
                let permit = self.permit()?;
                let (events, rx) = mpsc::unbounded_channel();
                choices.push((events, permit));
                rxs.push(rx);
            }
            jobs.push((req, choices));
        }
        for (req, choices) in jobs {
            self.inner.metrics.queue_depth.inc();
            let sent = self.send(Job::Generate {
                req: Box::new(req),
                choices,
                admitted: Instant::now(),
            });
            if let Err(e) = sent {
                // The jobs already sent see their receivers dropped with this error's answer
                // and are abandoned at the model thread's next step.
                self.inner.metrics.queue_depth.dec();
                return Err(e);
            }
        }
        Ok(rxs)
    }

    /// The log-probabilities of each prompt's tokens, with `top` alternatives at each
    /// position (a completion's `echo` with `logprobs`); refused at once when the queue is
    /// full. The model thread computes them between rounds, each prompt whole in a pass of
    /// its own ([`Sequence::feed_each`]: every position's logits are needed, so neither the
    /// prefix cache nor chunked prefill applies), and the log-probabilities are the model's
    /// own (no sampling fields touch them). Where continuing a sequence is exact, each prompt
    /// is then kept in the prefix cache, so that the request's generation continues it
    /// rather than computing it again.
    pub async fn prompt_logprobs(
        &self,
        prompts: Vec<Vec<u32>>,
        top: usize,
    ) -> Result<Vec<PromptLogprobs>, EngineError> {
        if !matches!(self.inner.frontend.task, Task::TextGeneration) {
            return Err(EngineError::WrongTask("prompt log-probabilities"));
        }
        let permit = self.permit()?;
        let (reply, rx) = oneshot::channel();
        self.inner.metrics.queue_depth.inc();
        if let Err(e) = self.send(Job::Score {
            prompts,
            top,
            reply,
            _permit: permit,
        }) {
            self.inner.metrics.queue_depth.dec();
            return Err(e);
        }
        rx.await
            .map_err(|_| EngineError::Internal("the model thread dropped the request".into()))?
    }

    /// Embeds tokenised inputs; refused at once when the queue is full.
    pub async fn embed(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>, EngineError> {
        if self.inner.frontend.task != Task::Embedding {
            return Err(EngineError::WrongTask("embeddings"));
        }
        let one_text = inputs.iter().map(Vec::len).collect();
        self.encode(inputs, one_text).await
    }

    /// Classifies tokenised inputs: the raw logits per input (scores are the caller's, see
    /// [`Frontend::scoring`]); refused at once when the queue is full.
    pub async fn classify(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>, EngineError> {
        let one_text = inputs.iter().map(Vec::len).collect();
        self.classify_pairs(inputs, one_text).await
    }

    /// Classifies tokenised text pairs ([`crate::tokenizer::TextTokenizer::encode_pair`]):
    /// input `i`'s second text starts at `second[i]`. The raw logits per pair.
    pub async fn classify_pairs(
        &self,
        inputs: Vec<Vec<u32>>,
        second: Vec<usize>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        if self.inner.frontend.task != Task::Classification {
            return Err(EngineError::WrongTask("classification"));
        }
        self.encode(inputs, second).await
    }

    /// Runs inputs through an encoder model (embedding or classification), in batches of at
    /// most `max_batch_size`.
    async fn encode(
        &self,
        inputs: Vec<Vec<u32>>,
        second: Vec<usize>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let permit = self.permit()?;
        let (reply, rx) = oneshot::channel();
        self.inner.metrics.queue_depth.inc();
        if let Err(e) = self.send(Job::Embed {
            inputs,
            second,
            reply,
            _permit: permit,
        }) {
            self.inner.metrics.queue_depth.dec();
            return Err(e);
        }
        rx.await
            .map_err(|_| EngineError::Internal("the model thread dropped the request".into()))?
    }

    /// Stops admission; the model thread finishes what it holds and exits. Blocks until then.
    pub fn shutdown(&self) {
        if let Ok(mut tx) = self.inner.tx.lock() {
            tx.take();
        }
        let handle = self.inner.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

struct GenerationWorker {
    /// Prompts computed lately, for requests that start with one (the model thread's own).
    prefix: std::cell::RefCell<PrefixCache>,
    lm: Box<dyn CausalLm>,
    /// The model's context length, capped by `max_sequence_length`.
    context_length: usize,
    tokenizer: TextTokenizer,
    eos_ids: Vec<u32>,
    batch: usize,
    /// [`Frontend::batch_tokens`].
    batch_tokens: Option<usize>,
    /// [`Frontend::cache_cost`].
    cache_cost: CacheCost,
    metrics: Metrics,
    /// The vocabulary as JSON mode reads it, computed at the first JSON request.
    json_texts: std::cell::OnceCell<JsonVocab>,
}

/// A sequence in the running batch.
struct Active {
    req: GenerateRequest,
    events: mpsc::UnboundedSender<GenerateEvent>,
    admitted: Instant,
    seq: Box<dyn Sequence>,
    sampler: Sampler,
    assembler: TextAssembler,
    /// The text of `generated`, decoded a few ids at a time.
    text: IncrementalText,
    next_input: Vec<u32>,
    generated: Vec<u32>,
    completion_tokens: usize,
    last_token_at: Option<Instant>,
    /// JSON mode's automaton, when the request asks for it.
    json: Option<JsonMode>,
    done: bool,
    /// Its place among the requests the server holds, given back as it finishes.
    permit: Option<OwnedSemaphorePermit>,
}

/// The most tokens of one prompt a round feeds, where continuing a sequence gives the same
/// bits as feeding it at once (the GGUF llama): a long prompt is computed over several rounds,
/// so that the sequences already running go on producing tokens between its parts (vLLM's
/// chunked prefill) rather than all waiting for it (a 4,000-token prompt is ~2.5 s of SmolLM2
/// here; 512 tokens ~0.3 s). The bench's 407-token prompt fits in one.
const PREFILL_CHUNK: usize = 512;

/// What a running sequence does in a round ([`GenerationWorker::step_all`]).
enum Plan {
    /// Nothing: it has finished.
    Skip,
    /// It feeds the first `n` tokens of its next input: a decode step's one token, or
    /// (`prompt`) its prompt past what the prefix cache held of it, up to [`PREFILL_CHUNK`]
    /// tokens a round; `ends` when that is all of it (its logits are then sampled).
    Feed { n: usize, prompt: bool, ends: bool },
    /// A new prompt the prefix cache held whole: its logits.
    Ready(Vec<f32>),
    /// A new prompt that the sequence at this index of the round also has: copied from it.
    Twin(usize),
}

impl GenerationWorker {
    fn run(self, rx: Receiver<Job>) {
        let mut active: Vec<Active> = Vec::new();
        // The request first in line, when its sequences do not fit beside the running ones
        // under the batch token budget: it waits for them to finish, and those after it wait
        // behind it.
        let mut held: Option<Job> = None;
        loop {
            if active.is_empty() && held.is_none() {
                match rx.recv() {
                    Ok(job) => held = Some(job),
                    Err(_) => return,
                }
            }
            while active.len() < self.batch {
                let job = match held.take() {
                    Some(job) => job,
                    None => match rx.try_recv() {
                        Ok(job) => job,
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    },
                };
                if !active.is_empty() && !self.fits(&job, &active) {
                    held = Some(job);
                    break;
                }
                self.admit(job, &mut active);
            }
            self.metrics.batch_size.set(active.len() as i64);
            self.metrics.batch_tokens.set(self.reserved(&active) as i64);
            // A panic in a step (a model's or a tokenizer's bug on some input) fails that
            // step's requests and leaves the thread serving the next ones: the weights are
            // not changed by a step, and the failed sequences' caches are dropped with them.
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.step_all(&mut active)
            }));
            if let Err(panic) = step {
                let what = panic_text(&panic);
                tracing::error!(panic = %what, requests = active.len(), "a step panicked; its requests failed");
                for a in active.iter_mut().filter(|a| !a.done) {
                    self.finish(
                        a,
                        GenerateEvent::Failed(EngineError::Internal(
                            "the model failed on this step (the server's log says how); it goes \
                             on serving"
                                .into(),
                        )),
                    );
                }
            }
            let before = active.len();
            active.retain(|a| !a.done);
            self.metrics.inflight.dec_by((before - active.len()) as i64);
            self.metrics.batch_size.set(active.len() as i64);
            self.metrics.batch_tokens.set(self.reserved(&active) as i64);
        }
    }

    /// The positions of keys and values the running sequences may reach, each counted at
    /// what its prompt plus its `max_tokens` holds (what the batch token budget bounds).
    fn reserved(&self, active: &[Active]) -> usize {
        (active.iter())
            .filter(|a| !a.done)
            .map(|a| {
                self.cache_cost
                    .positions(a.req.prompt.len() + a.req.max_tokens)
            })
            .sum()
    }

    /// Whether a job's sequences fit beside the running ones under the batch token budget,
    /// each counted at its prompt plus its `max_tokens` (the most its cache may hold). The
    /// server refuses a request that does not fit alone, so a job always fits an empty batch.
    /// A job that admission drops at once (past its deadline, or all its clients gone) fits.
    fn fits(&self, job: &Job, active: &[Active]) -> bool {
        let (Some(budget), Job::Generate { req, choices, .. }) = (self.batch_tokens, job) else {
            return true;
        };
        if Instant::now() > req.deadline || choices.iter().all(|(events, _)| events.is_closed()) {
            return true;
        }
        let each = self.cache_cost.positions(req.prompt.len() + req.max_tokens);
        self.reserved(active) + choices.len() * each <= budget
    }

    fn admit(&self, job: Job, active: &mut Vec<Active>) {
        self.metrics.queue_depth.dec();
        let (req, choices, admitted) = match job {
            Job::Generate {
                req,
                choices,
                admitted,
            } => (*req, choices, admitted),
            Job::Embed { reply, .. } => {
                let _ = reply.send(Err(EngineError::WrongTask("embeddings")));
                return;
            }
            Job::Score {
                prompts,
                top,
                reply,
                _permit,
            } => {
                if !reply.is_closed() {
                    let _ = reply.send(self.score(&prompts, top));
                }
                return;
            }
        };
        if Instant::now() > req.deadline {
            for (events, _) in &choices {
                let _ = events.send(GenerateEvent::Failed(EngineError::Timeout));
            }
            return;
        }
        if !req.warmup {
            self.metrics.prompt_tokens.inc_by(req.prompt.len() as u64);
        }
        for (i, (events, permit)) in choices.into_iter().enumerate() {
            if events.is_closed() {
                continue;
            }
            let seq = match self.lm.new_sequence() {
                Ok(s) => s,
                Err(e) => {
                    let _ =
                        events.send(GenerateEvent::Failed(EngineError::Internal(e.to_string())));
                    continue;
                }
            };
            let mut sampling = req.sampling.clone();
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
            self.metrics.inflight.inc();
            active.push(Active {
                sampler: Sampler::new(sampling).with_prompt(&req.prompt),
                assembler: TextAssembler::new(req.stop.clone())
                    .including_stops(req.ending.include_stop_str),
                text: IncrementalText::default(),
                next_input: req.prompt.clone(),
                req: req.clone(),
                events,
                admitted,
                seq,
                generated: Vec::new(),
                completion_tokens: 0,
                last_token_at: None,
                json: req.json.as_ref().map(JsonMode::new),
                done: false,
                permit: Some(permit),
            });
        }
    }

    /// [`Engine::prompt_logprobs`] on the model thread. A panic fails this request alone,
    /// as a step's does.
    fn score(&self, prompts: &[Vec<u32>], top: usize) -> Result<Vec<PromptLogprobs>, EngineError> {
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            prompts
                .iter()
                .map(|p| self.score_one(p, top))
                .collect::<crate::Result<Vec<_>>>()
        }));
        match run {
            Ok(r) => r.map_err(|e| EngineError::Internal(e.to_string())),
            Err(panic) => {
                let what = panic_text(&panic);
                tracing::error!(panic = %what, "computing a prompt's log-probabilities panicked");
                Err(EngineError::Internal(
                    "the model failed on this prompt (the server's log says how); it goes on \
                     serving"
                        .into(),
                ))
            }
        }
    }

    fn score_one(&self, prompt: &[u32], top: usize) -> crate::Result<PromptLogprobs> {
        let first = *prompt
            .first()
            .ok_or_else(|| crate::Error::InvalidRequest("the prompt is empty".into()))?;
        let mut seq = self.lm.new_sequence()?;
        let mut rest = Vec::with_capacity(prompt.len() - 1);
        let mut last = Vec::new();
        let tokenizer = &self.tokenizer;
        seq.feed_each(prompt, &mut |logits| match prompt.get(rest.len() + 1) {
            Some(&id) => {
                let ls = log_softmax(logits);
                rest.push(TokenLogprob {
                    token: tokenizer.token_text(id),
                    logprob: ls[id as usize],
                    top: top_n(&ls, top)
                        .into_iter()
                        .map(|(t, l)| (tokenizer.token_text(t), l))
                        .collect(),
                });
            }
            None => last = logits.to_vec(),
        })?;
        if rest.len() + 1 != prompt.len() || last.is_empty() {
            return Err(crate::Error::Model(format!(
                "the model gave {} rows of logits for a prompt of {} tokens",
                rest.len() + !last.is_empty() as usize,
                prompt.len()
            )));
        }
        if self.lm.continuation_is_exact() {
            let mut prefix = self.prefix.borrow_mut();
            prefix.insert(prompt, seq.as_ref(), &last);
            self.metrics
                .prefix_cache_positions
                .set(held(&prefix.entries) as i64);
        }
        Ok(PromptLogprobs {
            first: tokenizer.token_text(first),
            rest,
        })
    }

    fn finish(&self, a: &mut Active, event: GenerateEvent) {
        // The place goes back before the client hears of the end: a client that sends its
        // next request as soon as this one ends must not find the server still full.
        a.permit = None;
        let _ = a.events.send(event);
        a.done = true;
    }

    /// One round: every running sequence advances by one token. The sequences past their
    /// prompt, the new prompts (or the part of each that the prefix cache does not hold, up
    /// to [`PREFILL_CHUNK`] tokens a round) go through one step together
    /// ([`CausalLm::step_batch`]: for the GGUF llama one pass over the weights, so that a
    /// request arriving does not cost the running ones a pass of its own). A prompt that
    /// another sequence of the round also has (the choices of one request) is computed once;
    /// the others copy that sequence once it is done, with its logits (taken before its
    /// sampler's penalties touched them).
    fn step_all(&self, active: &mut [Active]) {
        for a in active.iter_mut() {
            if a.events.is_closed() {
                tracing::debug!("client went away; generation cancelled");
                a.permit = None;
                a.done = true;
            } else if Instant::now() > a.req.deadline {
                self.finish(a, GenerateEvent::Failed(EngineError::Timeout));
            }
        }
        // Prompts are fed at most `chunk` tokens a round where continuing gives the same
        // bits ([`PREFILL_CHUNK`]).
        let chunk = match self.lm.continuation_is_exact() {
            true => PREFILL_CHUNK,
            false => usize::MAX,
        };
        let mut plan: Vec<Plan> = Vec::with_capacity(active.len());
        for i in 0..active.len() {
            if active[i].done {
                plan.push(Plan::Skip);
                continue;
            }
            if !active[i].seq.is_empty() {
                // Past its prompt (one token), or on with the rest of it.
                let a = &active[i];
                let prompt = a.completion_tokens == 0;
                let n = a.next_input.len().min(if prompt { chunk } else { 1 });
                plan.push(Plan::Feed {
                    n,
                    prompt,
                    ends: n == a.next_input.len(),
                });
                continue;
            }
            // The same prompt, earlier in the round (the choices of one request): copied from
            // it once it is computed, waiting meanwhile.
            let same = (0..i).find(|&j| {
                active[j].req.prompt == active[i].next_input
                    && matches!(plan[j], Plan::Feed { prompt: true, .. } | Plan::Ready(_))
                    && active[j].seq.fork().is_some()
            });
            if let Some(j) = same {
                plan.push(match plan[j] {
                    Plan::Feed { ends: false, .. } => Plan::Skip,
                    _ => Plan::Twin(j),
                });
                continue;
            }
            // A prompt that shares a longer start with one being computed than with any kept
            // prompt waits, and then continues from that one's kept copy, rather than
            // computing the start again beside it (requests after one long system prompt,
            // arriving together).
            let prefix = self.prefix.borrow();
            let beside = (0..i)
                .filter(|&j| matches!(plan[j], Plan::Feed { prompt: true, .. }))
                .filter(|&j| prefix.keeps(&active[j].req.prompt))
                .map(|j| shared_start(&active[j].req.prompt, &active[i].next_input))
                .max()
                .unwrap_or(0);
            let wait = beside >= MIN_SHARED_TOKENS
                && beside > prefix.longest_shared(&active[i].next_input);
            drop(prefix);
            if wait {
                plan.push(Plan::Skip);
                continue;
            }
            let a = &mut active[i];
            // A new prompt continues the kept prompt sharing its longest start.
            let hit = self.prefix.borrow_mut().lookup(&a.next_input);
            if let Some(c) = hit {
                self.metrics.prompt_tokens_cached.inc_by(c.tokens as u64);
                a.seq = c.seq;
                if let Some(logits) = c.logits {
                    plan.push(Plan::Ready(logits));
                    continue;
                }
                a.next_input.drain(..c.tokens);
            }
            let n = a.next_input.len().min(chunk);
            plan.push(Plan::Feed {
                n,
                prompt: true,
                ends: n == a.next_input.len(),
            });
        }
        // One step for every sequence that computes; then each sequence's logits to sample
        // (or its failure), `None` for one that samples nothing this round.
        let mut logits_of: Vec<Option<crate::Result<Vec<f32>>>> =
            (0..active.len()).map(|_| None).collect();
        {
            let mut at = Vec::new();
            let mut seqs: Vec<&mut dyn Sequence> = Vec::new();
            let mut inputs: Vec<&[u32]> = Vec::new();
            let mut counted = 0;
            for (i, a) in active.iter_mut().enumerate() {
                if let Plan::Feed { n, .. } = plan[i] {
                    if !a.req.warmup {
                        counted += n;
                    }
                    let Active {
                        seq, next_input, ..
                    } = a;
                    at.push(i);
                    seqs.push(seq.as_mut());
                    inputs.push(&next_input[..n]);
                }
            }
            if !seqs.is_empty() {
                if counted > 0 {
                    self.metrics.step_tokens.observe(counted as f64);
                }
                let results = self.lm.step_batch(&mut seqs, &inputs);
                debug_assert_eq!(results.len(), at.len());
                for (i, r) in at.into_iter().zip(results) {
                    logits_of[i] = Some(r);
                }
            }
        }
        for i in 0..active.len() {
            logits_of[i] = match std::mem::replace(&mut plan[i], Plan::Skip) {
                Plan::Skip => None,
                Plan::Ready(logits) => Some(Ok(logits)),
                Plan::Feed { n, prompt, ends } => {
                    let r = logits_of[i]
                        .take()
                        .expect("every fed sequence has a result");
                    match (&r, ends) {
                        // A prompt's part: its logits are not needed; the rest next round.
                        (Ok(_), false) => {
                            active[i].next_input.drain(..n);
                            None
                        }
                        (Ok(logits), true) if prompt && !active[i].req.warmup => {
                            let a = &active[i];
                            let mut prefix = self.prefix.borrow_mut();
                            prefix.insert(&a.req.prompt, a.seq.as_ref(), logits);
                            self.metrics
                                .prefix_cache_positions
                                .set(held(&prefix.entries) as i64);
                            Some(r)
                        }
                        _ => Some(r),
                    }
                }
                Plan::Twin(j) => {
                    // The leader comes first, so its outcome is known; a failed prompt
                    // fails its twins the same way.
                    let copied = match &logits_of[j] {
                        Some(Ok(logits)) => active[j].seq.fork().map(|s| (s, logits.clone())),
                        _ => None,
                    };
                    Some(match copied {
                        Some((seq, logits)) => {
                            self.metrics
                                .prompt_tokens_cached
                                .inc_by(active[i].next_input.len() as u64);
                            active[i].seq = seq;
                            Ok(logits)
                        }
                        None => Err(crate::Error::Model(match &logits_of[j] {
                            Some(Err(e)) => e.to_string(),
                            _ => "the prompt's first choice could not be copied".into(),
                        })),
                    })
                }
            };
        }
        // Each sequence's sampling (a pass or two over the vocabulary) on the threads side
        // by side, while the model waits for the next round anyway.
        let mut stepped: Vec<(&mut Active, Vec<f32>)> = Vec::new();
        for (a, r) in active.iter_mut().zip(logits_of) {
            match r {
                None => {}
                Some(Ok(logits)) => stepped.push((a, logits)),
                Some(Err(e)) => self.finish(
                    a,
                    GenerateEvent::Failed(EngineError::Internal(e.to_string())),
                ),
            }
        }
        let texts = match stepped.iter().any(|(a, _)| a.json.is_some()) {
            true => Some(self.json_texts()),
            false => None,
        };
        let eos_ids = &self.eos_ids;
        let tokens: Vec<Option<SampledToken>> = stepped
            .par_iter_mut()
            .map(|(a, logits)| {
                if let (Some(json), Some(texts)) = (&a.json, texts)
                    && !json.mask(texts, logits)
                {
                    return None;
                }
                let ending = &a.req.ending;
                let early = a.completion_tokens < ending.min_tokens;
                let mut ban = |ids: &[u32]| {
                    for &id in ids {
                        if let Some(l) = logits.get_mut(id as usize) {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                };
                if early || ending.ignore_eos {
                    ban(eos_ids);
                }
                if early {
                    ban(&ending.stop_ids);
                }
                Some(a.sampler.sample(logits))
            })
            .collect();
        for ((a, _), tok) in stepped.into_iter().zip(tokens) {
            match tok {
                Some(tok) => self.emit(a, tok),
                None => self.finish(
                    a,
                    GenerateEvent::Failed(EngineError::Internal(
                        "no token of the vocabulary continues the answer as its constraint (JSON \
                         mode, schema, regex, choices or grammar) allows"
                            .into(),
                    )),
                ),
            }
        }
    }

    /// The texts JSON mode masks tokens by, computed once (a decode or two per token of the
    /// vocabulary: ~0.1 s for SmolLM2's 49,152).
    fn json_texts(&self) -> &JsonVocab {
        self.json_texts.get_or_init(|| {
            let tokenizer = &self.tokenizer;
            // An ordinary token to put each one after: the first of "a".
            let anchor = tokenizer
                .encode("a", false)
                .ok()
                .and_then(|ids| ids.first().copied())
                .unwrap_or(0);
            JsonVocab::new(json_mode::token_texts(
                tokenizer.vocab_size(),
                anchor,
                |ids| tokenizer.decode(ids, true).ok(),
            ))
            .with_eos(&self.eos_ids)
            .with_bytes(|id| tokenizer.token_bytes(id))
        })
    }

    /// Reports `tok`, the next token of `a` (its sampler's choice).
    fn emit(&self, a: &mut Active, tok: SampledToken) {
        let now = Instant::now();
        if !a.req.warmup {
            match a.last_token_at {
                None => self
                    .metrics
                    .time_to_first_token
                    .observe((now - a.admitted).as_secs_f64()),
                Some(t) => self
                    .metrics
                    .inter_token_latency
                    .observe((now - t).as_secs_f64()),
            }
            self.metrics.generated_tokens.inc();
        }
        a.last_token_at = Some(now);
        a.completion_tokens += 1;

        let logprobs = match tok.logprob {
            Some(lp) => vec![TokenLogprob {
                token: self.tokenizer.token_text(tok.id),
                logprob: lp,
                top: tok
                    .top
                    .iter()
                    .map(|&(id, l)| (self.tokenizer.token_text(id), l))
                    .collect(),
            }],
            None => Vec::new(),
        };
        let is_eos = self.eos_ids.contains(&tok.id);
        let stop_id = a.req.ending.stop_ids.contains(&tok.id);
        // The token that ends the answer has no text in it, but with
        // `include_stop_str_in_output` (vLLM's reading; an end-of-text token's text is empty
        // unless special tokens are kept).
        if !(is_eos || stop_id) || a.req.ending.include_stop_str {
            a.generated.push(tok.id);
        }
        // JSON mode: the answer ends with its object.
        let json_done = match (&mut a.json, self.json_texts.get()) {
            (Some(json), Some(texts)) => {
                json.advance_id(texts, tok.id);
                json.complete()
            }
            _ => false,
        };
        let context_full = a.seq.len() + 1 >= self.context_length;
        let at_limit = a.completion_tokens >= a.req.max_tokens || context_full;
        let last = is_eos || stop_id || json_done || at_limit;
        let tokenizer = &self.tokenizer;
        // Stop sequences count from `min_tokens` on.
        a.assembler
            .arm(a.completion_tokens >= a.req.ending.min_tokens);
        let released = match a.text.update(&a.generated, last, |ids| {
            tokenizer.decode(ids, !a.req.ending.keep_special)
        }) {
            Ok(text) => a.assembler.push(text, last),
            Err(e) => {
                self.finish(
                    a,
                    GenerateEvent::Failed(EngineError::Internal(e.to_string())),
                );
                return;
            }
        };
        if !released.delta.is_empty() || !logprobs.is_empty() {
            let _ = a.events.send(GenerateEvent::Delta {
                text: released.delta.clone(),
                logprobs,
                completion_tokens: a.completion_tokens,
            });
        }
        let finish = if is_eos || stop_id || json_done || released.stopped {
            Some(FinishReason::Stop)
        } else if at_limit {
            Some(FinishReason::Length)
        } else {
            None
        };
        match finish {
            Some(reason) => {
                let done = GenerateEvent::Done {
                    finish_reason: reason,
                    prompt_tokens: a.req.prompt.len(),
                    completion_tokens: a.completion_tokens,
                };
                self.finish(a, done);
            }
            None => a.next_input = vec![tok.id],
        }
    }
}

/// A caught panic's message, for the log.
fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// The prefix cache's budget when `--prefix-cache-tokens` is not given: 2048 tokens, fewer
/// when their keys and values (`bytes_per_token` each, where known) would pass 256 MiB, so
/// that a large model's cache does not grow the server by gigabytes unasked.
fn default_prefix_budget(bytes_per_token: Option<usize>) -> usize {
    const TOKENS: usize = 2048;
    const BYTES: usize = 256 << 20;
    match bytes_per_token {
        Some(b) => TOKENS.min(BYTES / b.max(1)),
        None => TOKENS,
    }
}

/// The shortest start that a prompt must share with a kept one, when it is not all of it, to
/// be continued from it: shorter shared starts are not worth a copy (vLLM shares blocks of 16).
const MIN_SHARED_TOKENS: usize = 16;

/// Prompts whose keys and values are kept after their request, so that a later request
/// whose prompt starts the same way continues from a copy instead of computing those tokens
/// again, as vLLM's prefix caching and llama.cpp's cached prompts do: a conversation's next
/// turn (which re-sends the whole conversation) continues the kept turn before it, and
/// requests that differ only after a shared start (one system prompt, one few-shot preamble)
/// share that start, [`MIN_SHARED_TOKENS`] or more. The kept prompt sharing the longest start
/// is used, whole or cut to that start. The kept prompts hold at most `budget` positions of
/// keys and values, the least recently used given up first: counted in the blocks their
/// caches hold ([`Sequence::cache_blocks`]; the GGUF llama's chunks), each block once however
/// many kept prompts share it, so that prompts continued from one another, or sharing a
/// system prompt, cost their shared start once (a sequence without blocks counts its
/// prompt's length). Only for models whose continuation gives the same bits as computing afresh
/// ([`crate::backend::CausalLm::continuation_is_exact`]): an answer never depends on what
/// was asked before it.
struct PrefixCache {
    budget: usize,
    entries: Vec<CachedPrompt>,
    clock: u64,
}

/// What [`PrefixCache::lookup`] finds: a copy of a sequence holding the first `tokens` of
/// the prompt, and the logits at its end when that is the whole prompt.
struct Continuation {
    seq: Box<dyn Sequence>,
    tokens: usize,
    logits: Option<Vec<f32>>,
}

struct CachedPrompt {
    prompt: Vec<u32>,
    seq: Box<dyn Sequence>,
    /// The logits at the prompt's last token.
    logits: Vec<f32>,
    used: u64,
}

impl PrefixCache {
    fn new(budget: usize) -> Self {
        PrefixCache {
            budget,
            entries: Vec::new(),
            clock: 0,
        }
    }

    /// A copy of the kept prompt that shares the longest start with `prompt` (a whole kept
    /// prompt preferred at equal length), cut to that start; how many tokens it holds; and,
    /// when it is all of `prompt`, its logits. Cut, it keeps at least one token of `prompt` to
    /// compute, whose logits the request needs.
    fn lookup(&mut self, prompt: &[u32]) -> Option<Continuation> {
        self.clock += 1;
        let (e, shared) = self
            .entries
            .iter_mut()
            .map(|e| {
                let shared = shared_start(&e.prompt, prompt);
                (e, shared)
            })
            .max_by_key(|(e, shared)| (*shared, *shared == e.prompt.len()))?;
        let (seq, tokens, logits) = if shared == e.prompt.len() {
            let logits = (shared == prompt.len()).then(|| e.logits.clone());
            (e.seq.fork()?, shared, logits)
        } else {
            let tokens = shared.min(prompt.len().saturating_sub(1));
            if tokens < MIN_SHARED_TOKENS {
                return None;
            }
            (e.seq.fork_prefix(tokens)?, tokens, None)
        };
        e.used = self.clock;
        Some(Continuation {
            seq,
            tokens,
            logits,
        })
    }

    /// The longest start `prompt` shares with a kept prompt.
    fn longest_shared(&self, prompt: &[u32]) -> usize {
        self.entries
            .iter()
            .map(|e| shared_start(&e.prompt, prompt))
            .max()
            .unwrap_or(0)
    }

    /// True when a prompt of this length may be kept (the cache is on and it is not longer
    /// than the whole budget).
    fn keeps(&self, prompt: &[u32]) -> bool {
        !prompt.is_empty() && prompt.len() <= self.budget
    }

    /// Keeps a copy of `seq`, which holds exactly `prompt`, unless it is kept already or
    /// larger than the whole budget; then gives up the least recently used prompts until the
    /// budget holds.
    fn insert(&mut self, prompt: &[u32], seq: &dyn Sequence, logits: &[f32]) {
        if !self.keeps(prompt) {
            return;
        }
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.prompt == prompt) {
            e.used = self.clock;
            return;
        }
        let Some(copy) = seq.fork() else {
            return;
        };
        let entry = CachedPrompt {
            prompt: prompt.to_vec(),
            seq: copy,
            logits: logits.to_vec(),
            used: self.clock,
        };
        if held(std::slice::from_ref(&entry)) > self.budget {
            return;
        }
        self.entries.push(entry);
        while held(&self.entries) > self.budget {
            let oldest = (0..self.entries.len())
                .min_by_key(|&i| self.entries[i].used)
                .expect("an entry over the budget");
            self.entries.swap_remove(oldest);
        }
    }
}

/// How many tokens `a` and `b` start with in common.
fn shared_start(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The positions of keys and values that `entries` hold: each block of their caches once,
/// however many of them share it, and the prompt's length for a sequence without blocks.
fn held(entries: &[CachedPrompt]) -> usize {
    let mut seen = std::collections::HashSet::new();
    entries
        .iter()
        .map(|e| match e.seq.cache_blocks() {
            Some(blocks) => blocks
                .into_iter()
                .filter(|(id, _)| seen.insert(*id))
                .map(|(_, positions)| positions)
                .sum(),
            None => e.prompt.len(),
        })
        .sum()
}

/// The model thread of an encoder model: `run` maps a right-padded batch of token lists to
/// one row per input (an embedding, or a classifier's logits).
fn encoder_loop(
    run: impl Fn(&[Vec<u32>], &[usize]) -> crate::Result<Vec<Vec<f32>>>,
    batch: usize,
    rx: Receiver<Job>,
    metrics: Metrics,
) {
    while let Ok(job) = rx.recv() {
        metrics.queue_depth.dec();
        match job {
            Job::Generate { choices, .. } => {
                for (events, _) in choices {
                    let _ = events.send(GenerateEvent::Failed(EngineError::WrongTask(
                        "text generation",
                    )));
                }
            }
            Job::Score { reply, .. } => {
                let _ = reply.send(Err(EngineError::WrongTask("prompt log-probabilities")));
            }
            Job::Embed {
                inputs,
                second,
                reply,
                _permit,
            } => {
                if reply.is_closed() {
                    continue;
                }
                metrics.inflight.inc();
                let mut out = Vec::with_capacity(inputs.len());
                let mut failed = None;
                for (chunk, second) in inputs.chunks(batch).zip(second.chunks(batch)) {
                    metrics.batch_size.set(chunk.len() as i64);
                    metrics
                        .prompt_tokens
                        .inc_by(chunk.iter().map(|c| c.len() as u64).sum());
                    // As for generation: a panic fails this request, not the thread.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run(chunk, second)
                    }));
                    match result {
                        Ok(Ok(v)) => out.extend(v),
                        Ok(Err(e)) => {
                            failed = Some(EngineError::Internal(e.to_string()));
                            break;
                        }
                        Err(_) => {
                            tracing::error!("an encoder batch panicked; its request failed");
                            failed = Some(EngineError::Internal(
                                "the model failed on this input; the server goes on serving".into(),
                            ));
                            break;
                        }
                    }
                }
                metrics.batch_size.set(0);
                metrics.inflight.dec();
                let _ = reply.send(match failed {
                    Some(e) => Err(e),
                    None => Ok(out),
                });
            }
        }
    }
}

/// How long a request may take, counted from admission.
pub fn deadline_after(timeout: Duration) -> Instant {
    Instant::now() + timeout
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sequence that remembers its tokens; its "logits" are its length.
    struct Tape(Vec<u32>);

    impl Sequence for Tape {
        fn feed(&mut self, tokens: &[u32]) -> crate::Result<Vec<f32>> {
            self.0.extend_from_slice(tokens);
            Ok(vec![self.0.len() as f32])
        }
        fn len(&self) -> usize {
            self.0.len()
        }
        fn fork(&self) -> Option<Box<dyn Sequence>> {
            Some(Box::new(Tape(self.0.clone())))
        }
        fn fork_prefix(&self, len: usize) -> Option<Box<dyn Sequence>> {
            Some(Box::new(Tape(self.0.get(..len)?.to_vec())))
        }
    }

    /// A [`Tape`] whose cache is made of blocks (identity, positions), shared by its copies.
    struct Blocks(Tape, Vec<(usize, usize)>);

    impl Sequence for Blocks {
        fn feed(&mut self, tokens: &[u32]) -> crate::Result<Vec<f32>> {
            self.0.feed(tokens)
        }
        fn len(&self) -> usize {
            self.0.len()
        }
        fn fork(&self) -> Option<Box<dyn Sequence>> {
            Some(Box::new(Blocks(Tape(self.0.0.clone()), self.1.clone())))
        }
        fn fork_prefix(&self, len: usize) -> Option<Box<dyn Sequence>> {
            let tape = Tape(self.0.0.get(..len)?.to_vec());
            Some(Box::new(Blocks(tape, self.1.clone())))
        }
        fn cache_blocks(&self) -> Option<Vec<(usize, usize)>> {
            Some(self.1.clone())
        }
    }

    fn keep(c: &mut PrefixCache, prompt: &[u32]) {
        let seq = Tape(prompt.to_vec());
        c.insert(prompt, &seq, &[prompt.len() as f32]);
    }

    #[test]
    fn the_prefix_cache_continues_the_longest_kept_prompt_and_keeps_to_its_budget() {
        let mut c = PrefixCache::new(10);
        assert!(c.lookup(&[1, 2, 3]).is_none());
        keep(&mut c, &[1, 2]);
        keep(&mut c, &[1, 2, 3, 4]);
        keep(&mut c, &[9, 9]);
        // The longest kept prompt that the new one starts with; its logits only when whole.
        let mut hit = c.lookup(&[1, 2, 3, 4, 5]).unwrap();
        assert_eq!((hit.tokens, hit.logits), (4, None));
        assert_eq!(hit.seq.feed(&[5]).unwrap(), vec![5.0]);
        let hit = c.lookup(&[1, 2, 3, 4]).unwrap();
        assert_eq!((hit.tokens, hit.logits), (4, Some(vec![4.0])));
        assert_eq!(c.lookup(&[1, 2, 7]).unwrap().tokens, 2);
        assert!(c.lookup(&[2, 1]).is_none());
        // A copy: continuing it leaves the kept prompt as it was.
        assert_eq!(c.lookup(&[1, 2, 3, 4, 5]).unwrap().tokens, 4);
        // 8 tokens kept; 4 more go over the budget of 10: the least recently used one
        // ([9, 9]) goes, the prompts just used stay.
        keep(&mut c, &[5, 6, 7, 8]);
        assert!(c.lookup(&[9, 9]).is_none());
        assert_eq!(c.lookup(&[1, 2, 3, 4]).unwrap().tokens, 4);
        assert_eq!(c.lookup(&[5, 6, 7, 8, 1]).unwrap().tokens, 4);
        assert!(held(&c.entries) <= 10);
        // Too long for the whole budget, or a budget of 0: nothing is kept.
        keep(&mut c, &[0; 11]);
        assert!(c.lookup(&[0; 11]).is_none());
        let mut off = PrefixCache::new(0);
        keep(&mut off, &[1]);
        assert!(off.lookup(&[1]).is_none());
    }

    /// Prompts whose caches share blocks (one system prompt, a conversation's turns) count the
    /// shared blocks once against the budget, not each prompt's whole length.
    #[test]
    fn the_prefix_cache_counts_a_block_its_prompts_share_once() {
        let mut c = PrefixCache::new(32);
        let system: Vec<u32> = (100..117).collect();
        let ask = |q: u32| [&system[..], &[q, q, q]].concat();
        let keep = |c: &mut PrefixCache, prompt: &[u32], blocks: &[(usize, usize)]| {
            let seq = Blocks(Tape(prompt.to_vec()), blocks.to_vec());
            c.insert(prompt, &seq, &[prompt.len() as f32]);
        };
        // Two 20-token prompts on one shared block of 16 positions and one of 8 each: 32
        // positions, within the budget, though their lengths make 40.
        let (a, b, d) = (ask(1), ask(2), ask(3));
        keep(&mut c, &a, &[(7, 16), (1, 8)]);
        keep(&mut c, &b, &[(7, 16), (2, 8)]);
        assert_eq!(held(&c.entries), 32);
        assert_eq!(c.lookup(&a).unwrap().logits, Some(vec![20.0]), "a is kept");
        assert_eq!(c.lookup(&b).unwrap().logits, Some(vec![20.0]), "b is kept");
        // A third makes 40: the least recently used (a) goes, and the shared block stays,
        // counted once for the two left.
        keep(&mut c, &d, &[(7, 16), (3, 8)]);
        assert_eq!(held(&c.entries), 32);
        let hit = c.lookup(&a).unwrap();
        assert_eq!(
            (hit.tokens, hit.logits),
            (17, None),
            "a's start, from b or d"
        );
        assert_eq!(c.lookup(&d).unwrap().tokens, 20);
        assert_eq!(c.lookup(&b).unwrap().tokens, 20);
        // A prompt whose blocks alone pass the budget is not kept, and evicts nothing.
        keep(&mut c, &[50; 20], &[(9, 40)]);
        assert!(c.lookup(&[50; 20]).is_none());
        assert_eq!(c.entries.len(), 2);
    }

    #[test]
    fn the_default_prefix_budget_is_2048_tokens_or_256_mib() {
        // SmolLM2: 30 layers × 2 × 192 × 2 bytes = 23 040 bytes a token.
        assert_eq!(default_prefix_budget(Some(23_040)), 2048);
        // Llama-2-7B: 32 layers × 2 × 4096 × 2 bytes = 512 KiB a token.
        assert_eq!(default_prefix_budget(Some(512 << 10)), 512);
        assert_eq!(default_prefix_budget(Some(1 << 40)), 0);
        assert_eq!(default_prefix_budget(None), 2048);
    }

    #[test]
    fn the_batch_token_budget_is_the_flag_or_nine_tenths_of_the_memory_left() {
        assert_eq!(
            BatchTokens::Limit(300).resolve(Some(23_040), 2048),
            Some(300)
        );
        assert_eq!(BatchTokens::Unlimited.resolve(Some(23_040), 2048), None);
        // Llama 3.1 8B (32 layers × 2 × 8 heads × 128 × 2 bytes = 128 KiB a token) with
        // 20 GiB left: 18 GiB, less the prefix cache's 512 tokens (64 MiB).
        let per_token = 128 << 10;
        let room = BatchTokens::Memory {
            free: Some(20u64 << 30),
        };
        assert_eq!(
            room.resolve(Some(per_token), 512),
            Some(((20u64 << 30) / 10 * 9 / per_token as u64) as usize - 512)
        );
        // Less room than the prefix cache takes: no room for a batch, not a wrap-around.
        let tight = BatchTokens::Memory {
            free: Some(1 << 20),
        };
        assert_eq!(tight.resolve(Some(per_token), 512), Some(0));
        // A model that does not say its bytes a token, or memory that cannot be read.
        assert_eq!(room.resolve(None, 0), None);
        let unknown = BatchTokens::Memory { free: None };
        assert_eq!(unknown.resolve(Some(per_token), 0), None);
    }

    #[test]
    fn a_prompt_sharing_a_long_enough_start_with_a_kept_one_continues_that_start() {
        let mut c = PrefixCache::new(100);
        let system: Vec<u32> = (100..120).collect();
        let first = [&system[..], &[1, 2, 3]].concat();
        keep(&mut c, &first);
        // Another question after the same 20-token start: the kept prompt cut to that start.
        let second = [&system[..], &[7, 8]].concat();
        let mut hit = c.lookup(&second).unwrap();
        assert_eq!(
            (hit.tokens, hit.seq.len(), hit.logits.is_none()),
            (20, 20, true)
        );
        assert_eq!(hit.seq.feed(&second[20..]).unwrap(), vec![22.0]);
        // A prompt that is the start of a kept one still computes its last token.
        let hit = c.lookup(&first[..21]).unwrap();
        assert_eq!((hit.tokens, hit.logits.is_none()), (20, true));
        // Shorter shared starts than MIN_SHARED_TOKENS are not used.
        let short = [&system[..MIN_SHARED_TOKENS - 1], &[9]].concat();
        assert!(c.lookup(&short).is_none());
        let just = [&system[..MIN_SHARED_TOKENS], &[9]].concat();
        assert_eq!(c.lookup(&just).unwrap().tokens, MIN_SHARED_TOKENS);
        // At equal shared length a whole kept prompt wins (its logits when it is the prompt).
        keep(&mut c, &system);
        let hit = c.lookup(&system).unwrap();
        assert_eq!((hit.tokens, hit.logits), (20, Some(vec![20.0])));
        // The longest shared start wins over a whole but shorter kept prompt.
        assert_eq!(c.lookup(&[&first[..], &[4]].concat()).unwrap().tokens, 23);
        assert_eq!(c.lookup(&[&first[..22], &[0]].concat()).unwrap().tokens, 22);
        assert!(c.lookup(&[]).is_none());
    }
}
