//! The encoder-decoder backends against transformers' reference outputs for the tiny
//! random-weight fixtures (`../shared/fixtures/tiny/{t5,blenderbot-small}`, see their README):
//! first-step logits within 1e-4, identical top-5 and greedy tokens, and a right-padded batch
//! that gives each row's single-case answer.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::Seq2SeqParts;
use crate::sampling::argmax;

const TOLERANCE: f32 = 1e-4;
const MAX_NEW: usize = 12;

/// `$KANDLE_FIXTURES`, else `shared/fixtures` beside the repository. Missing fixtures fail.
fn fixture(name: &str) -> PathBuf {
    let root = std::env::var_os("KANDLE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"));
    let dir = root.join("tiny").join(name);
    assert!(
        dir.join("reference.json").is_file(),
        "fixture {} is missing: check out shared/ beside the repository or set KANDLE_FIXTURES",
        dir.display()
    );
    dir
}

fn open(name: &str) -> (Seq2SeqParts, Value) {
    let dir = fixture(name);
    let parts = match name {
        "t5" => crate::backend::t5::open(&dir, &Device::Cpu),
        "blenderbot-small" => crate::backend::blenderbot_small::open(&dir, &Device::Cpu),
        other => panic!("no loader for {other}"),
    }
    .unwrap_or_else(|e| panic!("{name} loads: {e}"));
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    (parts, reference)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
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

/// Greedy decoding through the engine's adapter: the first feed is the encoder input.
fn greedy_single(parts: &Seq2SeqParts, prompt: &[u32]) -> (Vec<f32>, Vec<u32>) {
    let lm = super::Seq2SeqLm {
        model: parts.model.clone(),
    };
    let mut seq = crate::backend::CausalLm::new_sequence(&lm).unwrap();
    let first = seq.feed(prompt).unwrap();
    let mut logits = first.clone();
    let mut out = Vec::new();
    loop {
        let tok = argmax(&logits);
        out.push(tok);
        if parts.eos_ids.contains(&tok) || out.len() == MAX_NEW {
            break;
        }
        logits = seq.feed(&[tok]).unwrap();
    }
    (first, out)
}

fn check_single_cases(name: &str) {
    let (parts, reference) = open(name);
    let cases = reference["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for (i, case) in cases.iter().enumerate() {
        let text = case["text"].as_str().unwrap();
        let prompt = parts.tokenizer.encode(text, true).unwrap();
        assert_eq!(
            prompt,
            ids(&case["input_ids"]),
            "{name} case {i}: input ids"
        );
        assert_eq!(
            parts.model.decoder_start_token_id(),
            case["decoder_start_token_id"].as_u64().unwrap() as u32,
            "{name}: decoder start"
        );
        let (first, generated) = greedy_single(&parts, &prompt);
        let diff = max_abs_diff(&first, &floats(&case["first_step_logits"]));
        assert!(
            diff <= TOLERANCE,
            "{name} case {i}: first-step logits differ by {diff}"
        );
        assert_eq!(
            top5(&first),
            ids(&case["first_step_top5_ids"]),
            "{name} case {i}: top-5"
        );
        let greedy = &case["greedy"];
        assert_eq!(
            generated,
            ids(&greedy["new_token_ids"]),
            "{name} case {i}: greedy tokens"
        );
        assert_eq!(
            parts.tokenizer.decode(&generated, true).unwrap(),
            greedy["text"].as_str().unwrap(),
            "{name} case {i}: text"
        );
    }
}

/// Runs the reference's right-padded batch in one encoder pass and lock-step decoder steps
/// (finished rows are fed the pad token, as transformers does) and checks every row against
/// the reference row and against the same case run alone.
fn check_batch(name: &str) {
    let (parts, reference) = open(name);
    let batch = &reference["batch"];
    let rows: Vec<Vec<u32>> = batch["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let mask: Vec<Vec<u32>> = batch["attention_mask"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let (b, s) = (rows.len(), rows[0].len());
    assert!(b >= 2, "the batch has several rows");
    // The padded rows hold exactly the single cases' ids.
    for (k, case_index) in ids(&batch["case_indices"]).iter().enumerate() {
        let single = ids(&reference["cases"][*case_index as usize]["input_ids"]);
        let real: Vec<u32> = rows[k]
            .iter()
            .zip(&mask[k])
            .filter(|(_, m)| **m == 1)
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(real, single, "{name}: batch row {k} ids");
    }
    assert!(
        mask.iter().any(|m| m.contains(&0)),
        "{name}: the batch is padded"
    );
    let dev = Device::Cpu;
    let flat = |v: &[Vec<u32>]| v.concat();
    let ids_t = Tensor::from_vec(flat(&rows), (b, s), &dev).unwrap();
    let mask_t = Tensor::from_vec(flat(&mask), (b, s), &dev).unwrap();
    let model = &parts.model;
    let mut state = model.encode(&ids_t, &mask_t).unwrap();
    let start = Tensor::from_vec(vec![model.decoder_start_token_id(); b], (b, 1), &dev).unwrap();
    let mut logits: Vec<Vec<f32>> = model
        .decode(&mut [&mut state], &start)
        .unwrap()
        .to_vec2()
        .unwrap();
    let pad = batch["pad_token_id"].as_u64().unwrap() as u32;
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    for (k, row) in batch["rows"].as_array().unwrap().iter().enumerate() {
        let diff = max_abs_diff(&logits[k], &floats(&row["first_step_logits"]));
        assert!(
            diff <= TOLERANCE,
            "{name} batch row {k}: first-step logits differ by {diff}"
        );
        assert_eq!(top5(&logits[k]), ids(&row["first_step_top5_ids"]));
        let case_index = row["case_index"].as_u64().unwrap() as usize;
        let single_prompt = ids(&reference["cases"][case_index]["input_ids"]);
        let (single_first, _) = greedy_single(&parts, &single_prompt);
        let diff = max_abs_diff(&logits[k], &single_first);
        assert!(
            diff <= TOLERANCE,
            "{name} batch row {k} differs from its single case by {diff}"
        );
    }
    for _ in 0..MAX_NEW {
        let mut next = Vec::with_capacity(b);
        for k in 0..b {
            if done[k] {
                next.push(pad);
                continue;
            }
            let tok = argmax(&logits[k]);
            generated[k].push(tok);
            done[k] = parts.eos_ids.contains(&tok);
            next.push(tok);
        }
        if done.iter().all(|d| *d) {
            break;
        }
        let t = Tensor::from_vec(next, (b, 1), &dev).unwrap();
        logits = model
            .decode(&mut [&mut state], &t)
            .unwrap()
            .to_vec2()
            .unwrap();
    }
    for (k, row) in batch["rows"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            generated[k],
            ids(&row["greedy"]["new_token_ids"]),
            "{name} batch row {k}: greedy tokens"
        );
        let case_index = row["case_index"].as_u64().unwrap() as usize;
        let single_prompt = ids(&reference["cases"][case_index]["input_ids"]);
        assert_eq!(
            generated[k],
            greedy_single(&parts, &single_prompt).1,
            "{name} batch row {k}: greedy tokens equal the single run's"
        );
    }
}

#[test]
fn t5_matches_transformers_first_step_logits_and_greedy_tokens() {
    check_single_cases("t5");
}

#[test]
fn t5_padded_batch_rows_equal_their_single_cases() {
    check_batch("t5");
}

#[test]
fn blenderbot_small_matches_transformers_first_step_logits_and_greedy_tokens() {
    check_single_cases("blenderbot-small");
}

#[test]
fn blenderbot_small_padded_batch_rows_equal_their_single_cases() {
    check_batch("blenderbot-small");
}

/// Feeding the decoder several tokens at once (the causal-mask path, and T5's position bias
/// after a cache) gives the logits that feeding them one at a time gives.
fn check_prefix_at_once(name: &str) {
    let (parts, reference) = open(name);
    let case = &reference["cases"][0];
    let prompt = ids(&case["input_ids"]);
    let generated = ids(&case["greedy"]["new_token_ids"]);
    let model = &parts.model;
    let dev = Device::Cpu;
    let ids_t = Tensor::new(prompt.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mask = ids_t.ones_like().unwrap();
    let mut prefix = vec![model.decoder_start_token_id()];
    prefix.extend_from_slice(&generated[..generated.len() - 1]);
    // Step by step: the logits after each prefix token.
    let mut state = model.encode(&ids_t, &mask).unwrap();
    let stepwise: Vec<Vec<f32>> = prefix
        .iter()
        .map(|&t| {
            let x = Tensor::new(&[t], &dev).unwrap().unsqueeze(0).unwrap();
            let l = model.decode(&mut [&mut state], &x).unwrap();
            l.squeeze(0).unwrap().to_vec1().unwrap()
        })
        .collect();
    // The same prefix in two chunks: 5 tokens at once, then the rest at once.
    let mut state = model.encode(&ids_t, &mask).unwrap();
    for (start, end) in [(0, 5), (5, prefix.len())] {
        let x = Tensor::new(&prefix[start..end], &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let got: Vec<f32> = model
            .decode(&mut [&mut state], &x)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let diff = max_abs_diff(&got, &stepwise[end - 1]);
        assert!(
            diff <= 1e-5,
            "{name}: logits after {end} tokens fed at once differ by {diff}"
        );
    }
    assert_eq!(state.len, prefix.len());
}

#[test]
fn t5_decoding_a_prefix_at_once_equals_decoding_it_token_by_token() {
    check_prefix_at_once("t5");
}

#[test]
fn blenderbot_small_decoding_a_prefix_at_once_equals_decoding_it_token_by_token() {
    check_prefix_at_once("blenderbot-small");
}

/// The engine's decode step over several sequences ([`crate::backend::CausalLm::decode_batch`]:
/// one decoder pass, every weight product over all rows, attention per sequence against its
/// own cache, encoder output and positions) gives each sequence the bits it gets alone; the
/// sequences have prompts of different lengths, join the batch after different numbers of
/// decoder tokens (sequence `i` after `i` alone), and one leaves early.
fn check_batched_decode(name: &str) {
    use crate::backend::{CausalLm, Sequence};
    let (parts, reference) = open(name);
    let lm = super::Seq2SeqLm {
        model: parts.model.clone(),
    };
    let prompts: Vec<Vec<u32>> = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ids(&c["input_ids"]))
        .collect();
    assert!(prompts.len() >= 2, "{name}: several cases");
    let steps = 8;
    let alone: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .map(|p| {
            let mut seq = lm.new_sequence().unwrap();
            let mut out = vec![seq.feed(p).unwrap()];
            for _ in 0..steps + prompts.len() {
                let t = argmax(out.last().unwrap());
                out.push(seq.feed(&[t]).unwrap());
            }
            out
        })
        .collect();
    let mut seqs: Vec<Box<dyn Sequence>> =
        prompts.iter().map(|_| lm.new_sequence().unwrap()).collect();
    let mut last: Vec<Vec<f32>> = seqs
        .iter_mut()
        .zip(&prompts)
        .enumerate()
        .map(|(i, (s, p))| {
            let mut l = s.feed(p).unwrap();
            for _ in 0..i {
                l = s.feed(&[argmax(&l)]).unwrap();
            }
            l
        })
        .collect();
    for step in 0..steps {
        // The first sequence leaves after half the steps.
        let live: Vec<usize> = (0..seqs.len())
            .filter(|&i| i != 0 || step < steps / 2)
            .collect();
        let tokens: Vec<u32> = live.iter().map(|&i| argmax(&last[i])).collect();
        let mut batch: Vec<&mut dyn Sequence> = seqs
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| live.contains(i))
            .map(|(_, s)| &mut **s as &mut dyn Sequence)
            .collect();
        let rows = lm.decode_batch(&mut batch, &tokens).unwrap();
        assert_eq!(rows.len(), live.len());
        for (&i, row) in live.iter().zip(rows) {
            let want = &alone[i][i + step + 1];
            assert!(
                row.iter()
                    .map(|x| x.to_bits())
                    .eq(want.iter().map(|x| x.to_bits())),
                "{name} sequence {i} step {step}: logits differ by {}",
                max_abs_diff(&row, want)
            );
            last[i] = row;
        }
    }
}

#[test]
fn t5_batched_decode_steps_give_each_sequence_its_bits_alone() {
    check_batched_decode("t5");
}

#[test]
fn blenderbot_small_batched_decode_steps_give_each_sequence_its_bits_alone() {
    check_batched_decode("blenderbot-small");
}
