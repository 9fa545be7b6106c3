//! Shared by `runtime_tiny` and `runtime_models` (included with `#[path]`).

use kandle_runtime::backend::{CausalLm, Sequence};
use kandle_runtime::sampling::argmax;

/// Runs `prompts` through `lm` for `steps` greedy decode steps twice: each sequence alone (one
/// `feed` per token), and all of them through `decode_batch`, where sequence `i` takes part in
/// step `s` while `live(i, s)` (so that the batch shrinks as sequences leave). Calls
/// `check(i, s, batched, alone)` with each batched row's logits and those of the same step
/// run alone; asserts one row per live sequence and each sequence's final length.
pub fn batched_against_alone(
    lm: &dyn CausalLm,
    prompts: &[Vec<u32>],
    steps: usize,
    live: impl Fn(usize, usize) -> bool,
    mut check: impl FnMut(usize, usize, &[f32], &[f32]),
) {
    let alone: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .map(|p| {
            let mut seq = lm.new_sequence().unwrap();
            let mut out = vec![seq.feed(p).unwrap()];
            for _ in 0..steps {
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
        .zip(prompts)
        .map(|(s, p)| s.feed(p).unwrap())
        .collect();
    let mut taken = vec![0; prompts.len()];
    for step in 0..steps {
        let rows: Vec<usize> = (0..seqs.len()).filter(|&i| live(i, step)).collect();
        let tokens: Vec<u32> = rows.iter().map(|&i| argmax(&last[i])).collect();
        let mut batch: Vec<&mut dyn Sequence> = seqs
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| rows.contains(i))
            .map(|(_, s)| &mut **s as &mut dyn Sequence)
            .collect();
        let logits = lm.decode_batch(&mut batch, &tokens).unwrap();
        assert_eq!(logits.len(), rows.len(), "one row per sequence");
        for (&i, row) in rows.iter().zip(logits) {
            check(i, step, &row, &alone[i][step + 1]);
            taken[i] += 1;
            last[i] = row;
        }
    }
    for (i, s) in seqs.iter().enumerate() {
        assert_eq!(
            s.len(),
            prompts[i].len() + taken[i],
            "sequence {i}'s length"
        );
    }
}
