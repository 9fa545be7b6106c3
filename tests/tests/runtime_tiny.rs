//! kandle-runtime on the tiny random-weight fixtures (`shared/fixtures/tiny/`): gpt2, gptj,
//! bloom, llama, bert-embed, bert-cls, distilbert-cls and xlm-roberta-cls against the
//! transformers outputs in each `reference.json`, with the tolerances of the fixtures' README
//! (logits ≤ 1e-4, probabilities and embedding components ≤ 1e-5, identical token ids, greedy
//! tokens and labels).
//!
//! Two layers: the backend as a library (full logits, top-5, greedy, batch rows), and the user
//! path — `server::start` on the fixture directory, then HTTP. Load refusals are shown on
//! broken temporary copies of a fixture.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::future::join_all;
use kandle_runtime::ServeConfig;
use kandle_runtime::backend::{self, LoadOptions, WeightDtype};
use kandle_runtime::model::{ClassificationModel, GenerationModel, LoadedModel};
use kandle_runtime::sampling::{argmax, log_softmax};
use kandle_runtime::server::{self, Server};
use kandle_tests::fixtures_dir;
use serde_json::{Value, json};

#[path = "support/batched.rs"]
mod batched;
#[path = "support/incremental_text.rs"]
mod incremental_text;

const CAUSAL: [&str; 4] = ["gpt2", "gptj", "bloom", "llama"];
const CLASSIFIERS: [&str; 3] = ["bert-cls", "distilbert-cls", "xlm-roberta-cls"];

fn tiny(name: &str) -> PathBuf {
    fixtures_dir().join("tiny").join(name)
}

fn reference(name: &str) -> Value {
    let p = tiny(name).join("reference.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

fn try_load(path: &Path) -> kandle_runtime::Result<LoadedModel> {
    backend::load(&LoadOptions {
        path: path.to_path_buf(),
        task: None,
        dtype: WeightDtype::Auto,
        ..Default::default()
    })
}

fn load(path: &Path) -> LoadedModel {
    try_load(path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

fn generation(name: &str) -> GenerationModel {
    match load(&tiny(name)) {
        LoadedModel::Generation(g) => g,
        other => panic!("{name} loaded as a {:?} model", other.task()),
    }
}

fn classification(name: &str) -> ClassificationModel {
    match load(&tiny(name)) {
        LoadedModel::Classification(c) => c,
        other => panic!("{name} loaded as a {:?} model", other.task()),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn top5(logits: &[f32]) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    idx.truncate(5);
    idx
}

/// The unpadded ids of row `k` of a padded reference batch.
fn unpadded_row(batch: &Value, k: usize) -> Vec<u32> {
    let ids = ids(&batch["input_ids"][k]);
    let mask = ids_or_empty(&batch["attention_mask"][k]);
    ids.into_iter()
        .zip(mask)
        .filter(|(_, m)| *m == 1)
        .map(|(i, _)| i)
        .collect()
}

fn ids_or_empty(v: &Value) -> Vec<u32> {
    if v.is_null() { Vec::new() } else { ids(v) }
}

/// Feeds `prompt`, then greedy decoding as transformers' `generate`: at most 12 new tokens,
/// eos included when produced. Returns the first step's logits and the new tokens.
fn greedy(g: &GenerationModel, prompt: &[u32]) -> (Vec<f32>, Vec<u32>) {
    let mut seq = g.lm.new_sequence().unwrap();
    let first = seq.feed(prompt).unwrap();
    let mut logits = first.clone();
    let mut out = Vec::new();
    while out.len() < 12 {
        let t = argmax(&logits);
        out.push(t);
        if g.eos_ids.contains(&t) {
            break;
        }
        logits = seq.feed(&[t]).unwrap();
    }
    (first, out)
}

/// One single case or batch row of a causal LM against its reference.
fn check_causal_case(name: &str, g: &GenerationModel, prompt: &[u32], case: &Value, what: &str) {
    let (logits, new) = greedy(g, prompt);
    let d = max_abs_diff(&logits, &floats(&case["last_logits"]));
    assert!(d <= 1e-4, "{name} {what}: last logits differ by {d}");
    assert_eq!(
        top5(&logits),
        ids(&case["top5_ids"]),
        "{name} {what}: top-5 ids"
    );
    assert_eq!(
        new,
        ids(&case["greedy"]["new_token_ids"]),
        "{name} {what}: greedy tokens"
    );
    assert_eq!(
        g.tokenizer.decode(&new, true).unwrap(),
        case["greedy"]["text"].as_str().unwrap(),
        "{name} {what}: greedy text"
    );
    eprintln!(
        "{name} {what}: max logit diff {d:.2e}, {} greedy tokens identical",
        new.len()
    );
}

#[test]
fn causal_lms_match_transformers_logits_top5_and_greedy_tokens() {
    for name in CAUSAL {
        let g = generation(name);
        let r = reference(name);
        for (i, case) in r["cases"].as_array().unwrap().iter().enumerate() {
            let text = case["text"].as_str().unwrap();
            let prompt = g.tokenizer.encode(text, true).unwrap();
            assert_eq!(
                prompt,
                ids(&case["input_ids"]),
                "{name} case {i}: token ids"
            );
            check_causal_case(name, &g, &prompt, case, &format!("case {i}"));
        }
    }
}

/// `Sequence::feed_each` (a prompt's log-probabilities, `echo` with `logprobs`; one pass on
/// the llama, one token at a time on the other backends) hands over the logits after every
/// prompt token: row k is what a fresh sequence fed the first k + 1 tokens gives, and the
/// last row is transformers' last logits.
#[test]
fn feed_each_gives_the_logits_after_every_prompt_token() {
    for name in CAUSAL {
        let g = generation(name);
        let case = &reference(name)["cases"][0];
        let prompt = ids(&case["input_ids"]);
        let mut rows = Vec::new();
        let mut seq = g.lm.new_sequence().unwrap();
        let passes = g.lm.forward_passes();
        seq.feed_each(&prompt, &mut |logits| rows.push(logits.to_vec()))
            .unwrap();
        if name == "llama" {
            let passes = passes.expect("the llama counts its passes");
            assert_eq!(g.lm.forward_passes(), Some(passes + 1), "one pass");
        }
        assert_eq!(rows.len(), prompt.len(), "{name}: a row per token");
        assert_eq!(seq.len(), prompt.len(), "{name}: the prompt was fed");
        for (k, row) in rows.iter().enumerate() {
            let alone = g.lm.new_sequence().unwrap().feed(&prompt[..=k]).unwrap();
            let d = max_abs_diff(row, &alone);
            assert!(
                d <= 1e-4,
                "{name}: row {k} differs from a feed of {} tokens by {d}",
                k + 1
            );
        }
        let d = max_abs_diff(rows.last().unwrap(), &floats(&case["last_logits"]));
        assert!(
            d <= 1e-4,
            "{name}: the last row differs from transformers' by {d}"
        );
    }
}

/// The engine's incremental detokenisation gives each tiny model's whole decode.
#[test]
fn incremental_text_of_each_causal_lm_is_its_whole_decode() {
    for name in CAUSAL {
        let g = generation(name);
        incremental_text::assert_incremental_text_is_whole_decode(
            &g.tokenizer,
            "Hello, wörld! Ünïcode: café, 東京, emoji 🙂 and\nnew lines.",
            name,
        );
    }
}

/// A tiny llama whose sequences panic when fed token [`POISON`]: a stand-in for a model's or
/// a tokenizer's bug on some input.
struct Poisoned(Box<dyn backend::CausalLm>);
struct PoisonedSeq(Box<dyn backend::Sequence>);
const POISON: u32 = 13;

impl backend::CausalLm for Poisoned {
    fn new_sequence(&self) -> kandle_runtime::Result<Box<dyn backend::Sequence>> {
        Ok(Box::new(PoisonedSeq(self.0.new_sequence()?)))
    }
    fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }
    fn context_length(&self) -> usize {
        self.0.context_length()
    }
}

impl backend::Sequence for PoisonedSeq {
    fn feed(&mut self, tokens: &[u32]) -> kandle_runtime::Result<Vec<f32>> {
        assert!(!tokens.contains(&POISON), "poisoned token fed");
        self.0.feed(tokens)
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// A panic on the model's thread fails the requests of that step with a server error, and
/// the thread goes on serving: the next request completes.
#[test]
fn a_panicking_step_fails_its_request_and_the_engine_serves_the_next() {
    use kandle_runtime::engine::{
        BatchTokens, Engine, EngineConfig, EngineError, GenerateEvent, GenerateRequest,
    };
    let mut g = generation("llama");
    g.lm = Box::new(Poisoned(g.lm));
    let metrics = kandle_runtime::metrics::Metrics::register(&mut Default::default());
    let engine = Engine::start(
        LoadedModel::Generation(g),
        EngineConfig {
            max_batch_size: 4,
            max_queue: 4,
            max_sequence_length: None,
            prefix_cache_tokens: Some(0),
            batch_tokens: BatchTokens::Unlimited,
        },
        metrics,
    );
    let run = |prompt: Vec<u32>| {
        let mut rx = engine
            .generate(GenerateRequest {
                prompt,
                max_tokens: 4,
                // Never sampled: a drawn POISON (1 in 512 a step) failed a request the test
                // expects to complete.
                sampling: kandle_runtime::sampling::SamplingParams {
                    logit_bias: vec![(POISON, -100.0)],
                    ..Default::default()
                },
                stop: Vec::new(),
                deadline: Instant::now() + Duration::from_secs(60),
                warmup: false,
                json: None,
                ending: Default::default(),
            })
            .unwrap();
        let mut last = None;
        while let Some(ev) = rx.blocking_recv() {
            last = Some(ev);
        }
        last.expect("the request ended with an event")
    };
    match run(vec![1, 5, POISON, 7]) {
        GenerateEvent::Failed(EngineError::Internal(msg)) => {
            assert!(msg.contains("goes on serving"), "{msg}")
        }
        other => panic!("the poisoned request ended with {other:?}"),
    }
    for _ in 0..2 {
        match run(vec![1, 5, 6, 7]) {
            GenerateEvent::Done {
                completion_tokens, ..
            } => assert!(completion_tokens >= 1),
            other => panic!("the request after the panic ended with {other:?}"),
        }
    }
}

#[test]
fn causal_lms_match_the_rows_of_the_left_padded_reference_batch() {
    // The engine gives every sequence its own KV cache, so a batch row is its unpadded
    // prompt run alone; transformers ran the rows left-padded with position ids and ALiBi
    // from cumsum(attention_mask) - 1, and recorded that they equal the single cases.
    for name in CAUSAL {
        let g = generation(name);
        let r = reference(name);
        let batch = &r["batch"];
        assert_eq!(batch["padding_side"], "left", "{name}");
        for (k, row) in batch["rows"].as_array().unwrap().iter().enumerate() {
            let prompt = unpadded_row(batch, k);
            let case = &r["cases"][batch["case_indices"][k].as_u64().unwrap() as usize];
            assert_eq!(prompt, ids(&case["input_ids"]), "{name} row {k}: ids");
            check_causal_case(name, &g, &prompt, row, &format!("batch row {k}"));
        }
    }
}

#[test]
fn interleaved_sequences_of_each_causal_lm_match_sequences_run_alone() {
    for name in CAUSAL {
        let g = generation(name);
        let r = reference(name);
        let prompts: Vec<Vec<u32>> = r["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| ids(&c["input_ids"]))
            .collect();
        let alone: Vec<Vec<u32>> = prompts.iter().map(|p| greedy(&g, p).1).collect();
        // All cases advanced in turns, one token each per round, as the engine does.
        let mut seqs: Vec<_> = prompts
            .iter()
            .map(|_| g.lm.new_sequence().unwrap())
            .collect();
        let mut next: Vec<Vec<u32>> = prompts.clone();
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        for _ in 0..12 {
            for (i, s) in seqs.iter_mut().enumerate() {
                if out[i].last().is_some_and(|t| g.eos_ids.contains(t)) || out[i].len() == 12 {
                    continue;
                }
                let t = argmax(&s.feed(&next[i]).unwrap());
                out[i].push(t);
                next[i] = vec![t];
            }
        }
        assert_eq!(out, alone, "{name}");
    }
}

/// Each causal LM's batched decode step ([`backend::CausalLm::decode_batch`]: one pass over
/// the weights for all sequences, each attending to its own cache, with its own positions,
/// rotary or ALiBi) gives every sequence, at its own length, the logits it gets alone, to
/// the bit (on the CPU each row of an f32 product of up to 32 rows is computed on its own:
/// `few_rows.rs`); sequences join the batch at different lengths and leave it at different
/// steps.
#[test]
fn batched_decode_steps_give_each_sequence_its_logits_alone() {
    for name in CAUSAL {
        batched_decode_matches_alone(name);
    }
}

fn batched_decode_matches_alone(name: &str) {
    let g = generation(name);
    let r = reference(name);
    let prompts: Vec<Vec<u32>> = r["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ids(&c["input_ids"]))
        .collect();
    assert!(
        prompts.len() >= 3,
        "the fixture has {} cases",
        prompts.len()
    );
    // 16 steps; sequence i stops after 16 - 2i of them (the batch shrinks).
    batched::batched_against_alone(
        g.lm.as_ref(),
        &prompts,
        16,
        |i, step| step < 16 - 2 * i,
        |i, step, row, want| {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(
                bits(row) == bits(want),
                "{name} sequence {i} step {step}: logits differ by {}",
                max_abs_diff(row, want)
            );
        },
    );
}

#[test]
fn classifiers_match_transformers_logits_probabilities_and_labels() {
    for name in CLASSIFIERS {
        let c = classification(name);
        let r = reference(name);
        let cases = r["cases"].as_array().unwrap();
        let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
        let all = c.classify_texts(&texts).unwrap();
        for (i, case) in cases.iter().enumerate() {
            assert_eq!(
                c.tokenizer.encode(texts[i], true).unwrap(),
                ids(&case["input_ids"]),
                "{name} case {i}: token ids"
            );
            let single = c.classify_texts(&[texts[i]]).unwrap().remove(0);
            let d = max_abs_diff(&single, &floats(&case["logits"]));
            assert!(d <= 1e-4, "{name} case {i}: logits differ by {d}");
            let p = c.scoring.apply(&single);
            let dp = max_abs_diff(&p, &floats(&case["probabilities"]));
            assert!(dp <= 1e-5, "{name} case {i}: probabilities differ by {dp}");
            let best = argmax(&single) as usize;
            assert_eq!(
                best as u64,
                case["predicted_index"].as_u64().unwrap(),
                "{name} case {i}"
            );
            assert_eq!(c.labels[best], case["predicted_label"].as_str().unwrap());
            let db = max_abs_diff(&all[i], &single);
            assert!(
                db <= 1e-4,
                "{name} case {i}: batch row differs from single by {db}"
            );
            eprintln!("{name} case {i}: logits {d:.2e}, probabilities {dp:.2e}, batch {db:.2e}");
        }
    }
}

#[test]
fn classifiers_match_the_rows_of_the_right_padded_reference_batch() {
    for name in CLASSIFIERS {
        let c = classification(name);
        let r = reference(name);
        let batch = &r["batch"];
        assert_eq!(batch["padding_side"], "right", "{name}");
        let rows: Vec<Vec<u32>> = (0..batch["rows"].as_array().unwrap().len())
            .map(|k| unpadded_row(batch, k))
            .collect();
        let got = c.model.classify(&rows).unwrap();
        for (k, row) in batch["rows"].as_array().unwrap().iter().enumerate() {
            let d = max_abs_diff(&got[k], &floats(&row["logits"]));
            assert!(d <= 1e-4, "{name} batch row {k}: logits differ by {d}");
            assert_eq!(
                argmax(&got[k]) as u64,
                row["predicted_index"].as_u64().unwrap()
            );
        }
    }
}

// ---- the user path: the server on each fixture, over HTTP ----

async fn serve(name: &str) -> (Server, String) {
    let mut cfg = ServeConfig::new(tiny(name));
    cfg.max_new_tokens = 64;
    serve_config(cfg).await
}

/// The server for `cfg`, loaded, and its URL.
async fn serve_config(cfg: ServeConfig) -> (Server, String) {
    let what = format!("{} (--dtype {})", cfg.model.display(), cfg.dtype);
    let mut server = server::start(cfg).await.expect("server starts");
    tokio::time::timeout(Duration::from_secs(120), server.wait_loaded())
        .await
        .expect("model loads within 2 minutes")
        .unwrap_or_else(|e| panic!("{what} loads: {e}"));
    let url = format!("http://{}", server.local_addr());
    (server, url)
}

async fn post(url: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(body)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_over_http_reproduce_greedy_text_and_first_step_logprobs() {
    for name in CAUSAL {
        let (server, url) = serve(name).await;
        let r = reference(name);
        for (i, case) in r["cases"].as_array().unwrap().iter().enumerate() {
            let (status, body) = post(
                &url,
                "/v1/completions",
                &json!({"model": name, "prompt": case["text"], "temperature": 0,
                        "max_tokens": 12, "logprobs": 5}),
            )
            .await;
            assert_eq!(status, 200, "{name} case {i}: {body}");
            let choice = &body["choices"][0];
            assert_eq!(
                choice["text"], case["greedy"]["text"],
                "{name} case {i}: text"
            );
            let stopped = case["greedy"]["stopped_on_eos"].as_bool().unwrap();
            assert_eq!(
                choice["finish_reason"],
                if stopped { "stop" } else { "length" },
                "{name} case {i}"
            );
            assert_eq!(
                body["usage"]["completion_tokens"].as_u64().unwrap() as usize,
                ids(&case["greedy"]["new_token_ids"]).len(),
                "{name} case {i}: completion tokens"
            );
            assert_eq!(
                body["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
                ids(&case["input_ids"]).len()
            );
            // The first step's log-probabilities against log_softmax of the reference logits.
            let expected = log_softmax(&floats(&case["last_logits"]));
            let chosen = ids(&case["greedy"]["new_token_ids"])[0] as usize;
            let lp0 = choice["logprobs"]["token_logprobs"][0].as_f64().unwrap() as f32;
            assert!(
                (lp0 - expected[chosen]).abs() <= 1e-4,
                "{name} case {i}: first logprob {lp0} vs {}",
                expected[chosen]
            );
            let top = choice["logprobs"]["top_logprobs"][0].as_object().unwrap();
            assert!(!top.is_empty());
            // Keys are token texts (random byte-level tokens often share U+FFFD), so each value
            // must be one of the reference top-5 log-probabilities.
            let ref_top: Vec<f32> = ids(&case["top5_ids"])
                .iter()
                .map(|&t| expected[t as usize])
                .collect();
            for (tok, lp) in top {
                let lp = lp.as_f64().unwrap() as f32;
                assert!(
                    ref_top.iter().any(|r| (r - lp).abs() <= 1e-4),
                    "{name} case {i}: top logprob {tok:?}={lp} is not among {ref_top:?}"
                );
            }
        }
        server.shutdown(Duration::from_secs(5)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_completions_give_the_same_tokens_as_single_requests() {
    for name in CAUSAL {
        let (server, url) = serve(name).await;
        let r = reference(name);
        // The batch cases (shortest and longest prompt) plus the third, all at once, twice.
        let cases: Vec<&Value> = r["cases"].as_array().unwrap().iter().collect();
        let reqs = cases.iter().chain(cases.iter()).map(|c| {
            let url = url.clone();
            let body =
                json!({"model": name, "prompt": c["text"], "temperature": 0, "max_tokens": 12});
            async move { post(&url, "/v1/completions", &body).await }
        });
        let answers = join_all(reqs).await;
        for (k, (status, body)) in answers.iter().enumerate() {
            assert_eq!(*status, 200, "{name} request {k}: {body}");
            let case = cases[k % cases.len()];
            assert_eq!(
                body["choices"][0]["text"], case["greedy"]["text"],
                "{name} request {k} run concurrently"
            );
        }
        server.shutdown(Duration::from_secs(5)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_without_a_template_uses_the_documented_plain_prompt() {
    let (server, url) = serve("gpt2").await;
    let content = "The weather today is";
    let (status, chat) = post(
        &url,
        "/v1/chat/completions",
        &json!({"model": "gpt2", "temperature": 0, "max_tokens": 8,
                "messages": [{"role": "user", "content": content}]}),
    )
    .await;
    assert_eq!(status, 200, "{chat}");
    let (_, plain) = post(
        &url,
        "/v1/completions",
        &json!({"model": "gpt2", "temperature": 0, "max_tokens": 8,
                "prompt": format!("user: {content}\nassistant:")}),
    )
    .await;
    assert_eq!(
        chat["choices"][0]["message"]["content"], plain["choices"][0]["text"],
        "chat must equal the completion of the plain prompt"
    );
    assert_eq!(chat["usage"], plain["usage"]);
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A copy of classifier fixture `name` with only its first label: a cross-encoder's
/// one-logit head (the first row of the fixture's head, so its logit is the fixture's first).
fn one_label_copy(name: &str, dir: &Path) {
    let src = tiny(name);
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    config["id2label"] = json!({"0": "LABEL_0"});
    config["label2id"] = json!({"LABEL_0": 0});
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut weights =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let head = match name {
        "xlm-roberta-cls" => "classifier.out_proj",
        _ => "classifier",
    };
    for part in ["weight", "bias"] {
        let name = format!("{head}.{part}");
        let first = weights[&name].narrow(0, 0, 1).unwrap();
        weights.insert(name, first);
    }
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
}

/// `/v1/rerank` and `/rerank` (Jina's and Cohere's shape, as vLLM serves it) on one-label
/// copies of the BERT and XLM-RoBERTa classifiers (an ms-marco cross-encoder's and a BGE
/// reranker's architectures): each (query, document) pair is one input through the pair
/// template (BERT's token types 0 then 1), the document cut first where the pair passes 128
/// tokens; the scores are the sigmoid of the logits `tests/references/rerank_pairs.json`
/// holds (numpy models checked against each fixture's transformers logits), best first. A
/// classifier of more labels refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerank_scores_query_document_pairs_as_a_cross_encoder() {
    let references: Value = serde_json::from_slice(
        &std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("references/rerank_pairs.json"))
            .unwrap(),
    )
    .unwrap();
    for fixture in ["bert-cls", "xlm-roberta-cls"] {
        let reference = &references[fixture];
        let pairs = reference["pairs"].as_array().unwrap();
        let expected: Vec<f32> = pairs
            .iter()
            .map(|p| 1.0 / (1.0 + (-floats(&p["logits"])[0]).exp()))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        one_label_copy(fixture, dir.path());
        let (server, url) = serve_config(ServeConfig::new(dir.path())).await;
        let name = dir.path().file_name().unwrap().to_str().unwrap().to_owned();
        let documents: Vec<&Value> = pairs.iter().map(|p| &p["document"]).collect();
        let (status, body) = post(
            &url,
            "/v1/rerank",
            &json!({"model": name, "query": reference["query"], "documents": documents}),
        )
        .await;
        assert_eq!(status, 200, "{fixture}: {body}");
        let results = body["results"].as_array().unwrap();
        assert_eq!(results.len(), pairs.len());
        let mut last = f64::INFINITY;
        for r in results {
            let i = r["index"].as_u64().unwrap() as usize;
            let score = r["relevance_score"].as_f64().unwrap();
            assert!(
                (score as f32 - expected[i]).abs() <= 1e-5,
                "{fixture} document {i}: {score} against {}",
                expected[i]
            );
            assert!(score <= last, "best first: {body}");
            last = score;
            assert_eq!(r["document"]["text"], pairs[i]["document"]);
        }
        let tokens: usize = (pairs.iter())
            .map(|p| p["input_ids"].as_array().unwrap().len())
            .sum();
        assert_eq!(body["usage"]["total_tokens"], tokens, "{fixture}");

        // /rerank, documents as objects, the best one only and without its text.
        let objects: Vec<Value> = documents.iter().map(|d| json!({"text": d})).collect();
        let (status, top) = post(
            &url,
            "/rerank",
            &json!({"model": name, "query": reference["query"], "documents": objects,
                    "top_n": 1, "return_documents": false}),
        )
        .await;
        assert_eq!(status, 200, "{top}");
        assert_eq!(top["results"].as_array().unwrap().len(), 1);
        assert_eq!(top["results"][0]["index"], results[0]["index"]);
        assert!(top["results"][0].get("document").is_none(), "{top}");

        // vLLM's /v1/score: one text against each, or two lists side by side.
        let (status, scored) = post(
            &url,
            "/v1/score",
            &json!({"model": name, "text_1": reference["query"], "text_2": documents}),
        )
        .await;
        assert_eq!(status, 200, "{scored}");
        for (i, want) in expected.iter().enumerate() {
            assert_eq!(scored["data"][i]["index"], i);
            let got = scored["data"][i]["score"].as_f64().unwrap() as f32;
            assert!((got - want).abs() <= 1e-5, "{fixture} /v1/score {i}");
        }
        assert_eq!(scored["usage"]["total_tokens"], tokens);
        let (status, side) = post(
            &url,
            "/score",
            &json!({"model": name, "text_1": [reference["query"], reference["query"]],
                    "text_2": [documents[1], documents[0]]}),
        )
        .await;
        assert_eq!(status, 200, "{side}");
        // (Padded to another width in a batch of two: the same to rounding.)
        let close = |a: &Value, b: &Value| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-6;
        assert!(
            close(&side["data"][0]["score"], &scored["data"][1]["score"]),
            "{side}"
        );
        assert!(
            close(&side["data"][1]["score"], &scored["data"][0]["score"]),
            "{side}"
        );

        for (body, param) in [
            (
                json!({"model": name, "text_1": ["a", "b"], "text_2": ["c", "d", "e"]}),
                "text_2",
            ),
            (
                json!({"model": name, "query": "q", "documents": []}),
                "documents",
            ),
            (
                json!({"model": name, "query": "", "documents": ["d"]}),
                "query",
            ),
            (
                json!({"model": name, "query": "q", "documents": ["d"], "top_n": -1}),
                "top_n",
            ),
        ] {
            let route = match param {
                "text_2" => "/v1/score",
                _ => "/v1/rerank",
            };
            let (status, err) = post(&url, route, &body).await;
            assert_eq!(status, 400, "{err}");
            assert_eq!(err["error"]["param"], param, "{err}");
        }
        server.shutdown(Duration::from_secs(5)).await.unwrap();
    }

    // Three labels: not a cross-encoder; a generation model neither.
    for fixture in ["bert-cls", "gpt2"] {
        let (server, url) = serve(fixture).await;
        let (status, err) = post(
            &url,
            "/v1/rerank",
            &json!({"model": fixture, "query": "q", "documents": ["d"]}),
        )
        .await;
        assert_eq!(status, 400, "{err}");
        assert_eq!(err["error"]["param"], "model");
        server.shutdown(Duration::from_secs(5)).await.unwrap();
    }
}

/// An embedding model scores a pair with the cosine of its two texts' embeddings (vLLM's
/// score and rerank APIs on a bi-encoder): bert-embed's against the cosines of its
/// sentence-transformers reference embeddings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedding_model_scores_pairs_by_cosine() {
    let (server, url) = serve("bert-embed").await;
    let r = reference("bert-embed");
    let cases = r["cases"].as_array().unwrap();
    let cos = |a: &[f32], b: &[f32]| {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (norm(a) * norm(b))
    };
    let emb: Vec<Vec<f32>> = cases.iter().map(|c| floats(&c["embedding"])).collect();
    let expected = [cos(&emb[0], &emb[1]), cos(&emb[0], &emb[2])];
    let (status, scored) = post(
        &url,
        "/v1/score",
        &json!({"model": "bert-embed", "text_1": cases[0]["text"],
                "text_2": [cases[1]["text"], cases[2]["text"]]}),
    )
    .await;
    assert_eq!(status, 200, "{scored}");
    for (i, want) in expected.iter().enumerate() {
        let got = scored["data"][i]["score"].as_f64().unwrap() as f32;
        assert!((got - want).abs() <= 1e-5, "pair {i}: {got} against {want}");
    }
    // Each distinct text is embedded once: the first text's tokens count once.
    let tokens: usize = (cases.iter())
        .map(|c| c["input_ids"].as_array().unwrap().len())
        .sum();
    assert_eq!(scored["usage"]["total_tokens"], tokens);
    let (status, ranked) = post(
        &url,
        "/v1/rerank",
        &json!({"model": "bert-embed", "query": cases[0]["text"],
                "documents": [cases[1]["text"], cases[2]["text"]]}),
    )
    .await;
    assert_eq!(status, 200, "{ranked}");
    let best = usize::from(expected[1] > expected[0]);
    assert_eq!(ranked["results"][0]["index"], best, "{ranked}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_over_http_returns_reference_labels_scores_and_logits() {
    for name in CLASSIFIERS {
        let (server, url) = serve(name).await;
        let r = reference(name);
        let cases = r["cases"].as_array().unwrap();
        let texts: Vec<&Value> = cases.iter().map(|c| &c["text"]).collect();
        let (status, body) = post(
            &url,
            "/v1/classify",
            &json!({"model": name, "input": texts}),
        )
        .await;
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(body["object"], "list");
        let id2label = r["id2label"].as_object().unwrap();
        let mut tokens = 0;
        for (i, case) in cases.iter().enumerate() {
            tokens += ids(&case["input_ids"]).len();
            let item = &body["data"][i];
            assert_eq!(item["index"], i);
            let labels = item["labels"].as_array().unwrap();
            assert_eq!(
                labels.len(),
                id2label.len(),
                "{name} case {i}: all labels by default"
            );
            assert_eq!(
                labels[0]["label"], case["predicted_label"],
                "{name} case {i}"
            );
            let ref_p = floats(&case["probabilities"]);
            let ref_l = floats(&case["logits"]);
            let mut last = f64::INFINITY;
            for l in labels {
                let idx = l["index"].as_u64().unwrap() as usize;
                assert_eq!(l["label"], id2label[idx.to_string().as_str()]);
                let score = l["score"].as_f64().unwrap();
                assert!(score <= last, "{name} case {i}: labels are not best first");
                last = score;
                assert!(
                    (score as f32 - ref_p[idx]).abs() <= 1e-5,
                    "{name} case {i}: score"
                );
                assert!((l["logit"].as_f64().unwrap() as f32 - ref_l[idx]).abs() <= 1e-4);
            }
        }
        assert_eq!(
            body["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
            tokens
        );

        // One string with top_k 1: the predicted label alone, as the single case.
        let (status, one) = post(
            &url,
            "/v1/classify",
            &json!({"model": name, "input": cases[2]["text"], "top_k": 1}),
        )
        .await;
        assert_eq!(status, 200, "{one}");
        let labels = one["data"][0]["labels"].as_array().unwrap();
        assert_eq!(labels.len(), 1);
        assert_eq!(labels[0]["label"], cases[2]["predicted_label"]);

        // Errors keep the OpenAI body.
        let (status, err) = post(&url, "/v1/classify", &json!({"model": name, "input": []})).await;
        assert_eq!(status, 400);
        assert_eq!(err["error"]["param"], "input");
        let (status, err) = post(
            &url,
            "/v1/completions",
            &json!({"model": name, "prompt": "hello"}),
        )
        .await;
        assert_eq!(status, 400, "a classifier refuses completions: {err}");
        assert!(err["error"]["message"].is_string());
        // Classification requests are counted like the others, with their prompt tokens
        // (the warm-up's included, hence at least).
        let metrics = reqwest::get(format!("{url}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let line = |prefix: &str| -> f64 {
            let l = metrics
                .lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("{name}: no {prefix} in /metrics:\n{metrics}"));
            l.rsplit(' ').next().unwrap().parse().unwrap()
        };
        let classify_ok = "kandle_requests_total{endpoint=\"/v1/classify\",status=\"200\"}";
        assert_eq!(line(classify_ok), 2.0, "{name}");
        let classify_bad = "kandle_requests_total{endpoint=\"/v1/classify\",status=\"400\"}";
        assert_eq!(line(classify_bad), 1.0, "{name}");
        let expected_tokens = tokens + ids(&cases[2]["input_ids"]).len();
        assert!(
            line("kandle_prompt_tokens_total") >= expected_tokens as f64,
            "{name}"
        );
        server.shutdown(Duration::from_secs(5)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bert_embed_over_http_matches_sentence_transformers_and_refuses_classify() {
    let (server, url) = serve("bert-embed").await;
    let r = reference("bert-embed");
    let cases = r["cases"].as_array().unwrap();
    let texts: Vec<&Value> = cases.iter().map(|c| &c["text"]).collect();
    let (status, body) = post(
        &url,
        "/v1/embeddings",
        &json!({"model": "bert-embed", "input": texts}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for (i, case) in cases.iter().enumerate() {
        let got = floats(&body["data"][i]["embedding"]);
        let d = max_abs_diff(&got, &floats(&case["embedding"]));
        assert!(
            d <= 1e-5,
            "case {i}: embedding differs by {d} (batched request)"
        );
        let (_, one) = post(
            &url,
            "/v1/embeddings",
            &json!({"model": "bert-embed", "input": case["text"]}),
        )
        .await;
        let single = floats(&one["data"][0]["embedding"]);
        let d = max_abs_diff(&single, &floats(&case["embedding"]));
        assert!(
            d <= 1e-5,
            "case {i}: embedding differs by {d} (single request)"
        );
    }
    let (status, err) = post(
        &url,
        "/v1/classify",
        &json!({"model": "bert-embed", "input": "hi"}),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["param"], "model");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

// ---- load refusals, on broken copies of a fixture ----

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(tiny(name)).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
    }
    dir
}

/// Rewrites the JSON header of a safetensors file, leaving the tensor data as it is.
fn edit_safetensors_header(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

fn load_error(dir: &Path) -> String {
    match try_load(dir) {
        Ok(m) => panic!("the broken model loaded as {:?}", m.task()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn an_unsupported_architecture_is_refused_with_the_list_of_supported_ones() {
    let dir = copy_fixture("gpt2");
    let p = dir.path().join("config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    cfg["model_type"] = json!("mamba");
    cfg["architectures"] = json!(["MambaForCausalLM"]);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let msg = load_error(dir.path());
    for needle in [
        "mamba",
        "MambaForCausalLM",
        "gpt2",
        "gptj",
        "bloom",
        "distilbert",
        "xlm-roberta",
    ] {
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    }
    // A task head the runtime does not have is refused too, not served as something else.
    let dir = copy_fixture("distilbert-cls");
    let p = dir.path().join("config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    cfg["architectures"] = json!(["DistilBertForQuestionAnswering"]);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let msg = load_error(dir.path());
    assert!(msg.contains("DistilBertForQuestionAnswering"), "{msg}");
    // Nor is a decoder saved with a head that cannot generate.
    let dir = copy_fixture("gpt2");
    let p = dir.path().join("config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    cfg["architectures"] = json!(["GPT2ForTokenClassification"]);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let msg = load_error(dir.path());
    assert!(msg.contains("GPT2ForTokenClassification"), "{msg}");
}

#[test]
fn a_missing_weight_tensor_is_refused_by_name() {
    let dir = copy_fixture("gpt2");
    edit_safetensors_header(&dir.path().join("model.safetensors"), |h| {
        let t = h.remove("transformer.h.1.mlp.c_fc.bias").unwrap();
        h.insert("unused.renamed".into(), t);
    });
    let msg = load_error(dir.path());
    assert!(msg.contains("transformer.h.1.mlp.c_fc.bias"), "{msg}");
}

#[test]
fn a_weight_of_the_wrong_shape_is_refused_by_name() {
    let dir = copy_fixture("bloom");
    edit_safetensors_header(&dir.path().join("model.safetensors"), |h| {
        // Same number of elements, so the file stays valid; the layout is what is wrong.
        h["transformer.h.0.self_attention.query_key_value.weight"]["shape"] = json!([64, 192]);
    });
    let msg = load_error(dir.path());
    assert!(
        msg.contains("transformer.h.0.self_attention.query_key_value.weight"),
        "{msg}"
    );
    assert!(msg.contains("shape"), "{msg}");
}

#[test]
fn a_tokenizer_larger_than_the_vocabulary_is_refused() {
    for name in ["gptj", "xlm-roberta-cls"] {
        let dir = copy_fixture(name);
        let p = dir.path().join("tokenizer.json");
        let mut tok: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        let added = tok["added_tokens"].as_array_mut().unwrap();
        for (i, t) in ["<extra_a>", "<extra_b>"].iter().enumerate() {
            added.push(
                json!({"id": 512 + i, "content": t, "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}),
            );
        }
        std::fs::write(&p, tok.to_string()).unwrap();
        let msg = load_error(dir.path());
        assert!(
            msg.contains("514") && msg.contains("vocab_size is 512"),
            "{name}: {msg}"
        );
    }
}

// ---- dtype ----

#[test]
fn half_precision_causal_lms_stay_near_the_f32_reference() {
    // The fixtures' README: half-precision weights need looser bounds (logits 5e-2 given as an
    // example) and greedy tokens may diverge after a few steps; the top token must not.
    for name in CAUSAL {
        // Measured on the public set: f16 ≤ 1e-2, bf16 ≤ 6e-2.
        for (dtype, bound) in [(WeightDtype::F16, 5e-2f32), (WeightDtype::Bf16, 1.5e-1)] {
            let g = match backend::load(&LoadOptions {
                path: tiny(name),
                task: None,
                dtype,
                ..Default::default()
            }) {
                Ok(LoadedModel::Generation(g)) => g,
                Ok(other) => panic!("{name} {dtype:?} loaded as {:?}", other.task()),
                Err(e) => panic!("{name} {dtype:?}: {e}"),
            };
            for (i, case) in reference(name)["cases"]
                .as_array()
                .unwrap()
                .iter()
                .enumerate()
            {
                let (logits, new) = greedy(&g, &ids(&case["input_ids"]));
                let d = max_abs_diff(&logits, &floats(&case["last_logits"]));
                eprintln!("{name} {dtype:?} case {i}: max logit diff {d:.2e}");
                assert!(
                    d <= bound,
                    "{name} {dtype:?} case {i}: logits differ by {d}"
                );
                // f32 is within 1e-5: a diff this small would mean the weights stayed f32.
                assert!(d > 1e-4, "{name} {dtype:?} case {i}: ran in f32 ({d})");
                assert_eq!(
                    new[0],
                    ids(&case["greedy"]["new_token_ids"])[0],
                    "{name} {dtype:?} case {i}: first greedy token"
                );
            }
        }
    }
}

#[test]
fn encoders_refuse_half_precision_with_a_message() {
    // f16 everywhere; bf16 where there is a head (only the sentence embedders take bf16).
    for (name, dtype) in [
        ("bert-embed", WeightDtype::F16),
        ("bert-cls", WeightDtype::F16),
        ("bert-cls", WeightDtype::Bf16),
        ("distilbert-cls", WeightDtype::Bf16),
        ("xlm-roberta-cls", WeightDtype::Bf16),
    ] {
        let msg = match backend::load(&LoadOptions {
            path: tiny(name),
            task: None,
            dtype,
            ..Default::default()
        }) {
            Ok(m) => panic!("{name} loaded in {dtype:?} as {:?}", m.task()),
            Err(e) => e.to_string(),
        };
        assert!(
            msg.contains(&format!("{dtype:?}")) && msg.contains("f32"),
            "{name}: {msg}"
        );
    }
}

/// `--dtype bf16` on the sentence embedders (BERT, and XLM-RoBERTa's base model under `--task
/// Embedding`): bf16 products (on a CPU with AVX512-BF16) keep the embeddings near
/// transformers' f32 ones, and they are not f32's bits there (the path ran); on a CPU without
/// the dot product the products stay f32 and so do the bits.
#[test]
fn the_sentence_embedders_in_bf16_stay_near_the_f32_reference() {
    use kandle_runtime::model::Task;
    for (name, task) in [("bert-embed", None), ("xlm-roberta-cls", Some(Task::Embedding))] {
        let load = |dtype| match backend::load(&LoadOptions {
            path: tiny(name),
            task,
            dtype,
            ..Default::default()
        }) {
            Ok(LoadedModel::Embedding(e)) => e,
            Ok(other) => panic!("{name} {dtype:?} loaded as {:?}", other.task()),
            Err(e) => panic!("{name} {dtype:?}: {e}"),
        };
        let (e16, e32) = (load(WeightDtype::Bf16), load(WeightDtype::F32));
        let r = reference(name);
        for (i, case) in r["cases"].as_array().unwrap().iter().enumerate() {
            let text = case["text"].as_str().unwrap();
            let got = e16.embed_texts(&[text]).unwrap().remove(0);
            let want = floats(&case["embedding"]);
            let d = max_abs_diff(&got, &want);
            let d32 = max_abs_diff(&got, &e32.embed_texts(&[text]).unwrap()[0]);
            eprintln!("{name} bf16 case {i}: max diff {d:.2e} from the reference");
            // Measured: ≤ 2.3e-3.
            assert!(d <= 1e-2, "{name} case {i}: bf16 embedding differs by {d}");
            if backend::encoder_bf16_products() {
                assert!(d32 > 1e-6, "{name} case {i}: bf16 gave f32's embedding ({d32:e})");
            } else {
                assert_eq!(d32, 0.0, "{name} case {i}: without AVX512-BF16 the products stay f32");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dtype_flag_reaches_the_loader_and_a_refusal_fails_the_load() {
    let mut cfg = ServeConfig::new(tiny("xlm-roberta-cls"));
    cfg.dtype = "bf16".into();
    let mut server = server::start(cfg).await.expect("server starts");
    let err = tokio::time::timeout(Duration::from_secs(120), server.wait_loaded())
        .await
        .expect("the load ends within 2 minutes")
        .expect_err("xlm-roberta in bf16 must be refused");
    assert!(err.to_string().contains("xlm-roberta"), "{err}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();

    let mut cfg = ServeConfig::new(tiny("gpt2"));
    cfg.dtype = "f16".into();
    let (server, url) = serve_config(cfg).await;
    let case = &reference("gpt2")["cases"][0];
    let (status, body) = post(
        &url,
        "/v1/completions",
        &json!({"model": "gpt2", "prompt": case["text"], "temperature": 0, "max_tokens": 1,
                "logprobs": 1}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let expected = log_softmax(&floats(&case["last_logits"]));
    let first = ids(&case["greedy"]["new_token_ids"])[0] as usize;
    let lp = body["choices"][0]["logprobs"]["token_logprobs"][0]
        .as_f64()
        .unwrap() as f32;
    let d = (lp - expected[first]).abs();
    assert!(
        d <= 5e-2 && d > 1e-6,
        "f16 logprob {lp} vs f32 reference {}",
        expected[first]
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();

    // bf16 reaches a sentence embedder: its embeddings over HTTP stay near the reference and,
    // where the CPU has the bf16 dot product, are not the f32 ones.
    let mut cfg = ServeConfig::new(tiny("bert-embed"));
    cfg.dtype = "bf16".into();
    let (server, url) = serve_config(cfg).await;
    let case = &reference("bert-embed")["cases"][0];
    let (status, body) = post(
        &url,
        "/v1/embeddings",
        &json!({"model": "bert-embed", "input": case["text"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let d = max_abs_diff(
        &floats(&body["data"][0]["embedding"]),
        &floats(&case["embedding"]),
    );
    assert!(d <= 1e-2, "bf16 embedding differs by {d}");
    if backend::encoder_bf16_products() {
        // f32 is within 1e-5 of the reference (`bert_embed_over_http_matches_...`); bf16
        // measured ~2e-3.
        assert!(d > 1e-4, "bf16 over HTTP gave the f32 embedding ({d:e})");
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xlm_roberta_with_task_embedding_serves_its_base_model_mean_pooled() {
    // reference.json's `embedding`: the mask-weighted mean of `model.roberta`'s last hidden
    // state, L2-normalised.
    let r = reference("xlm-roberta-cls");
    let cases = r["cases"].as_array().unwrap();
    let e = match backend::load(&LoadOptions {
        path: tiny("xlm-roberta-cls"),
        task: Some(kandle_runtime::model::Task::Embedding),
        dtype: WeightDtype::Auto,
        ..Default::default()
    }) {
        Ok(LoadedModel::Embedding(e)) => e,
        Ok(other) => panic!("loaded as {:?}", other.task()),
        Err(e) => panic!("{e}"),
    };
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let batch = e.embed_texts(&texts).unwrap();
    for (i, case) in cases.iter().enumerate() {
        let single = e.embed_texts(&[texts[i]]).unwrap().remove(0);
        let d = max_abs_diff(&single, &floats(&case["embedding"]));
        assert!(d <= 1e-5, "case {i}: embedding differs by {d}");
        let db = max_abs_diff(&batch[i], &single);
        assert!(
            db <= 1e-5,
            "case {i}: batch row differs from single by {db}"
        );
    }

    let mut cfg = ServeConfig::new(tiny("xlm-roberta-cls"));
    cfg.task = Some(kandle_runtime::model::Task::Embedding);
    let mut server = server::start(cfg).await.expect("server starts");
    server.wait_loaded().await.expect("loads as an embedder");
    let url = format!("http://{}", server.local_addr());
    let (status, body) = post(
        &url,
        "/v1/embeddings",
        &json!({"model": "xlm-roberta-cls", "input": texts}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for (i, case) in cases.iter().enumerate() {
        let d = max_abs_diff(
            &floats(&body["data"][i]["embedding"]),
            &floats(&case["embedding"]),
        );
        assert!(d <= 1e-5, "case {i} over HTTP: embedding differs by {d}");
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[test]
fn checkpoints_saved_without_the_transformer_prefix_load_the_same() {
    // Older hub checkpoints (openai-community/gpt2, bigscience/bloom-560m) were saved from the
    // base class, so their tensors have no "transformer." prefix.
    for name in ["gpt2", "bloom"] {
        let dir = copy_fixture(name);
        edit_safetensors_header(&dir.path().join("model.safetensors"), |h| {
            let keys: Vec<String> = h.keys().cloned().collect();
            for k in keys {
                if let Some(rest) = k.strip_prefix("transformer.") {
                    let v = h.remove(&k).unwrap();
                    h.insert(rest.to_owned(), v);
                }
            }
        });
        let g = match load(dir.path()) {
            LoadedModel::Generation(g) => g,
            other => panic!("{name}: {:?}", other.task()),
        };
        let case = &reference(name)["cases"][0];
        check_causal_case(
            name,
            &g,
            &ids(&case["input_ids"]),
            case,
            "unprefixed case 0",
        );
    }
}

#[test]
fn the_logit_tolerance_catches_a_wrong_gelu_or_rotary_width() {
    // The same weights with one config value changed must leave the 1e-4 bound: the checks
    // above can fail on the slips the fixtures were built to expose.
    for (name, key, value) in [
        ("gpt2", "activation_function", json!("gelu")),
        ("gptj", "rotary_dim", json!(16)),
    ] {
        let dir = copy_fixture(name);
        let p = dir.path().join("config.json");
        let mut cfg: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        cfg[key] = value;
        std::fs::write(&p, cfg.to_string()).unwrap();
        let g = match load(dir.path()) {
            LoadedModel::Generation(g) => g,
            other => panic!("{name}: {:?}", other.task()),
        };
        let case = &reference(name)["cases"][0];
        let (logits, _) = greedy(&g, &ids(&case["input_ids"]));
        let d = max_abs_diff(&logits, &floats(&case["last_logits"]));
        eprintln!("{name} with {key} changed: max logit diff {d:.2e}");
        assert!(
            d > 1e-4,
            "{name}: changing {key} moved the logits by only {d}"
        );
    }
}
