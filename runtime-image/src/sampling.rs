//! Choosing the next token from logits: penalties, temperature, top-k, top-p, a seeded RNG, and
//! log-probabilities. Pure functions over slices; unit-tested here.
//!
//! Order of operations (as in OpenAI's and vLLM's samplers): `logit_bias` and the
//! presence/frequency penalties added to the raw logits → log-probabilities reported from these
//! (before temperature) → temperature → top-k → min-p → top-p → draw. Temperature 0 is greedy: the
//! highest logit, lowest id on ties; a bias applies to it too, so that -100 bans a token and
//! +100 forces it whatever the temperature, as OpenAI documents.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Per-request sampling settings, already validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// Tokens less likely than `min_p` times the most likely are dropped (0: off).
    pub min_p: f32,
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Transformers' (and vLLM's, TGI's) multiplicative penalty on every token of the prompt
    /// and the answer so far: a positive logit divided by it, a negative one multiplied
    /// (1: off).
    pub repetition_penalty: f32,
    /// `Some(n)`: report the chosen token's logprob and the n most likely alternatives.
    pub logprobs: Option<usize>,
    /// (token id, bias) pairs added to the logits before anything else; ids past the
    /// logits are ignored (the API validates them against the tokenizer).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logprobs: None,
            logit_bias: Vec::new(),
        }
    }
}

/// The chosen token and, when asked, its log-probability and the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

/// Samples tokens for one sequence; remembers what it generated for the penalties.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    counts: HashMap<u32, u32>,
    /// The prompt's tokens, for the repetition penalty (empty when it is off).
    prompt: std::collections::HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            counts: HashMap::new(),
            prompt: Default::default(),
        }
    }

    /// The sampler of a sequence after `prompt`, which the repetition penalty counts.
    pub fn with_prompt(mut self, prompt: &[u32]) -> Self {
        if self.params.repetition_penalty != 1.0 {
            self.prompt = prompt.iter().copied().collect();
        }
        self
    }

    /// Picks the next token from `logits` (modified in place) and records it.
    pub fn sample(&mut self, logits: &mut [f32]) -> SampledToken {
        let p = &self.params;
        for &(tok, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(tok as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            let penalty = p.repetition_penalty;
            // Each token once: the prompt's, then the answer's others.
            let answer = self.counts.keys().filter(|t| !self.prompt.contains(t));
            for &tok in self.prompt.iter().chain(answer) {
                if let Some(l) = logits.get_mut(tok as usize) {
                    *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&tok, &n) in &self.counts {
                if let Some(l) = logits.get_mut(tok as usize) {
                    *l -= p.frequency_penalty * n as f32 + p.presence_penalty;
                }
            }
        }
        let logsm = p.logprobs.map(|_| log_softmax(logits));
        let id = if p.temperature <= 0.0 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        *self.counts.entry(id).or_default() += 1;
        let (logprob, top) = match (logsm, self.params.logprobs) {
            // Tokens a mask removed (JSON mode, a schema) are no alternatives: their −∞
            // would be `null` in the answer, where clients expect a number.
            (Some(ls), Some(n)) => (
                Some(ls[id as usize]),
                top_n(&ls, n)
                    .into_iter()
                    .filter(|(_, l)| l.is_finite())
                    .collect(),
            ),
            _ => (None, Vec::new()),
        };
        SampledToken { id, logprob, top }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let r: f64 = self.rng.random();
        draw(logits, &self.params, r)
    }
}

/// The order that ranks candidates for top-k and top-p: descending logit, ascending id on
/// ties (deterministic).
fn rank_order(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The candidates' weights: `e = exp(logit − max)` (the largest is 1) in whole units of
/// 2^-30, rounded. Integer weights make every sum below exact, so that the nucleus and the
/// draw do not depend on the order in which they are summed (a token that `exp` puts below
/// 2^-31 of the largest weighs nothing: it could hardly ever be drawn anyway). `exp` is the
/// kernels' ([`crate::backend::exp_shifted`]): the same bits on every CPU, in vector
/// registers (libm's `expf` of 49,152 logits took ~0.4 ms a draw).
fn weights(logits: &[f32], max: f32) -> Vec<u32> {
    let mut e = vec![0f32; logits.len()];
    crate::backend::exp_shifted(logits, max, &mut e);
    e.iter()
        .map(|&e| (e * (1u32 << 30) as f32).round_ties_even() as i32 as u32)
        .collect()
}

/// `min_p` (as vLLM, before top-p): the weights below `min_p` times the largest become 0, so
/// that those tokens are never drawn and count for nothing in the nucleus.
fn drop_below_min_p(weights: &mut [u32], min_p: f32) {
    if min_p <= 0.0 {
        return;
    }
    let largest = weights.iter().copied().max().unwrap_or(0);
    let floor = min_p as f64 * largest as f64;
    for w in weights.iter_mut() {
        if (*w as f64) < floor {
            *w = 0;
        }
    }
}

/// The weight a top-p nucleus must reach out of `total`.
fn nucleus_need(top_p: f32, total: u64) -> u64 {
    ((top_p as f64 * total as f64).ceil() as u64).clamp(1, total)
}

/// Candidates of a draw: `ids[j]` (or `j` itself when `ids` is `None`, the whole
/// vocabulary) with its logit over the temperature, `scaled[j]`, and its weight.
struct Candidates {
    ids: Option<Vec<u32>>,
    scaled: Vec<f32>,
    weights: Vec<u32>,
}

impl Candidates {
    fn rank(&self, j: usize) -> (u32, f32) {
        (
            self.ids.as_ref().map_or(j as u32, |ids| ids[j]),
            self.scaled[j],
        )
    }

    /// The candidate `j` that ends the smallest prefix, in [`rank_order`], whose weights sum
    /// to at least `need` (at most their total, which is positive), and that sum.
    ///
    /// No sort of the whole: the candidates still in question go into 1,024 buckets spaced
    /// evenly between their smallest and largest logit, so that the buckets' order is the
    /// rank order's; the buckets' sums of weights, from the top, locate the one where the
    /// prefix ends, and that bucket's candidates are the next round's. A round splits the
    /// smallest logit from the largest; 64 candidates or fewer, all of one weight, or logits
    /// without a finite span (infinities, NaNs) are ranked directly.
    fn nucleus_last(&self, need: u64) -> (usize, u64) {
        const BUCKETS: usize = 1024;
        let (l, w) = (&self.scaled, &self.weights);
        let by_rank =
            |a: &u32, b: &u32| rank_order(&self.rank(*a as usize), &self.rank(*b as usize));
        fn span(it: impl Iterator<Item = f32>) -> (f32, f32) {
            it.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), x| {
                (lo.min(x), hi.max(x))
            })
        }
        // Empty while the pool is all the candidates (the first round).
        let mut pool: Vec<u32> = Vec::new();
        let mut all = true;
        let mut cum = 0u64;
        loop {
            let (lo, hi) = if all {
                span(l.iter().copied())
            } else {
                span(pool.iter().map(|&j| l[j as usize]))
            };
            let finite = (hi - lo).is_finite();
            if lo == hi || !finite || (!all && pool.len() <= 64) {
                if all {
                    pool = (0..w.len() as u32).collect();
                }
                let each = w[pool[0] as usize];
                if each > 0 && pool.iter().all(|&j| w[j as usize] == each) {
                    // Equal weights: the first `k` in rank order reach `need`.
                    let each = each as u64;
                    let k = (need - cum).div_ceil(each).min(pool.len() as u64);
                    let last = *pool.select_nth_unstable_by(k as usize - 1, by_rank).1;
                    return (last as usize, cum + k * each);
                }
                pool.sort_unstable_by(by_rank);
                for j in pool {
                    cum += w[j as usize] as u64;
                    if cum >= need {
                        return (j as usize, cum);
                    }
                }
                unreachable!("the pool's weights reach what the prefix needs");
            }
            // Monotone in the logit (each step rounds monotonically; a NaN goes to bucket
            // 0, and weighs 0); `lo` in bucket 0, `hi` in a higher one.
            let scale = (BUCKETS - 1) as f32 / (hi - lo);
            let bucket = |x: f32| (((x - lo) * scale) as usize).min(BUCKETS - 1);
            let mut sums = [0u64; BUCKETS];
            if all {
                // Over the whole vocabulary: the buckets computed in vector registers,
                // summed into four sets of sums so that runs of one bucket do not wait on
                // each other's additions.
                let bs: Vec<u16> = l.iter().map(|&x| bucket(x) as u16).collect();
                let mut four = [[0u64; BUCKETS]; 4];
                for (i, (&b, &x)) in bs.iter().zip(w).enumerate() {
                    four[i % 4][b as usize] += x as u64;
                }
                for (b, s) in sums.iter_mut().enumerate() {
                    *s = four[0][b] + four[1][b] + four[2][b] + four[3][b];
                }
                let end = Self::edge(&sums, &mut cum, need);
                pool = (0..w.len() as u32)
                    .filter(|&j| bs[j as usize] as usize == end)
                    .collect();
                all = false;
            } else {
                for &j in &pool {
                    sums[bucket(l[j as usize])] += w[j as usize] as u64;
                }
                let end = Self::edge(&sums, &mut cum, need);
                pool.retain(|&j| bucket(l[j as usize]) == end);
            }
        }
    }

    /// The bucket, from the top, where `cum` plus the sums reaches `need`; `cum` gains the
    /// sums of the buckets above it.
    fn edge(sums: &[u64], cum: &mut u64, need: u64) -> usize {
        for b in (0..sums.len()).rev() {
            if *cum + sums[b] >= need {
                return b;
            }
            *cum += sums[b];
        }
        unreachable!("the sums reach what the prefix needs")
    }
}

/// Draws a token from `logits` with `r` uniform in [0, 1): temperature; the `top_k` largest
/// (in [`rank_order`]); their [`weights`]; when `top_p < 1`, the smallest prefix in rank order
/// whose weight reaches [`nucleus_need`]. The token is the first of the kept candidates,
/// taken in id order, where their cumulative weight exceeds `r` times their total.
///
/// Why id order for the draw: any fixed order gives the same distribution and repeats for a
/// seed, and this one needs no sort. The first version walked the whole vocabulary in rank
/// order, which meant sorting 49,152 logits a token: 2.4 ms on a flat distribution, more
/// than SmolLM2's step, and at 8 sequences it cut a server's throughput at temperature 1 from
/// ~495 to ~170-220 tok/s. The nucleus is found without sorting either
/// ([`Candidates::nucleus_last`]); before, it was sorted out a stretch at a time, which on a
/// flat distribution sorted most of the vocabulary: 3-3.7 ms a draw.
fn draw(logits: &[f32], p: &SamplingParams, r: f64) -> u32 {
    let (ids, scaled) = if p.top_k > 0 && p.top_k < logits.len() {
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        cand.select_nth_unstable_by(p.top_k - 1, rank_order);
        cand.truncate(p.top_k);
        cand.sort_unstable_by_key(|c| c.0);
        let (ids, scaled) = cand.into_iter().unzip();
        (Some(ids), scaled)
    } else {
        (
            None,
            logits
                .iter()
                .map(|l| l / p.temperature)
                .collect::<Vec<f32>>(),
        )
    };
    let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut weights = weights(&scaled, max);
    drop_below_min_p(&mut weights, p.min_p);
    let c = Candidates {
        ids,
        scaled,
        weights,
    };
    let total: u64 = c.weights.iter().map(|&w| w as u64).sum();
    // The nucleus keeps the candidates that rank up to `last`.
    // (A zero total comes only from logits that are all NaN: then nothing is cut.)
    let (last, kept_total) = match p.top_p < 1.0 && total > 0 {
        true => {
            let (j, sum) = c.nucleus_last(nucleus_need(p.top_p, total));
            (Some(c.rank(j)), sum)
        }
        false => (None, total),
    };
    let kept = |id: u32, l: f32| {
        last.is_none_or(|last| rank_order(&(id, l), &last) != std::cmp::Ordering::Greater)
    };
    let threshold = ((r * kept_total as f64) as u64).min(kept_total.saturating_sub(1));
    let mut cum = 0;
    let mut chosen = None;
    let mut walk = |id: u32, l: f32, w: u32| {
        if kept(id, l) {
            cum += w as u64;
            chosen = Some(id);
            return cum > threshold;
        }
        false
    };
    match &c.ids {
        None => (0u32..)
            .zip(c.scaled.iter().zip(&c.weights))
            .any(|(id, (&l, &w))| walk(id, l, w)),
        Some(ids) => ids
            .iter()
            .zip(c.scaled.iter().zip(&c.weights))
            .any(|(&id, (&l, &w))| walk(id, l, w)),
    };
    chosen.expect("at least one candidate is kept")
}

/// Index of the largest value; the lowest index wins ties, and a NaN never wins (0 when
/// nothing is larger than −∞).
///
/// In two passes that the compiler vectorises: the largest value, kept lane by lane over
/// blocks of [`ARGMAX_LANES`], then the first block holding it, searched. The one-pass loop
/// (a compare against the best so far, a dependency from element to element) took ~30 µs
/// for SmolLM2's 49 152 logits, 3% of an 8-sequence greedy decode step on one thread while
/// the other waited.
pub fn argmax(xs: &[f32]) -> u32 {
    let mut lanes = [f32::NEG_INFINITY; ARGMAX_LANES];
    let blocks = xs.chunks_exact(ARGMAX_LANES);
    let tail = blocks.remainder();
    for b in blocks {
        for (l, &x) in lanes.iter_mut().zip(b) {
            *l = if x > *l { x } else { *l };
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if max == f32::NEG_INFINITY {
        return 0;
    }
    let mut start = 0;
    for b in xs.chunks(ARGMAX_LANES) {
        if b.iter().fold(false, |found, &x| found | (x == max)) {
            let at = b
                .iter()
                .position(|&x| x == max)
                .expect("the block holds it");
            return (start + at) as u32;
        }
        start += b.len();
    }
    unreachable!("the largest value is one of the values")
}

/// The block width of [`argmax`]'s passes: four AVX-512 registers.
const ARGMAX_LANES: usize = 64;

/// Numerically stable log-softmax (accumulated in f64).
pub fn log_softmax(xs: &[f32]) -> Vec<f32> {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = xs.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    xs.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// The `n` largest entries as (index, value), descending, lowest index first on ties.
pub fn top_n(xs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut v: Vec<(u32, f32)> = xs.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
    let n = n.min(v.len());
    if n == 0 {
        return Vec::new();
    }
    v.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repetition_penalty_shrinks_the_logits_of_tokens_seen() {
        let p = SamplingParams {
            temperature: 0.0,
            repetition_penalty: 2.0,
            ..Default::default()
        };
        // Token 1 is in the prompt: 4 → 2, below token 2's 3; token 0's −1 → −2.
        let mut s = Sampler::new(p.clone()).with_prompt(&[0, 1]);
        let mut logits = vec![-1.0, 4.0, 3.0, 2.9];
        assert_eq!(s.sample(&mut logits).id, 2);
        assert_eq!(logits[..2], [-2.0, 2.0]);
        // Token 2 is now in the answer: 3 → 1.5, and 3 (2.9) wins.
        let mut logits = vec![-1.0, 4.0, 3.0, 2.9];
        assert_eq!(s.sample(&mut logits).id, 3);
        // Off (1), the prompt is not even kept.
        let mut off = Sampler::new(SamplingParams {
            repetition_penalty: 1.0,
            ..p
        })
        .with_prompt(&[0, 1]);
        assert!(off.prompt.is_empty());
        assert_eq!(off.sample(&mut [-1.0, 4.0, 3.0, 2.9]).id, 1);
    }

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..Default::default()
        }
    }

    #[test]
    fn greedy_picks_the_highest_logit_and_the_lowest_id_on_ties() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0]).id, 1);
    }

    /// The two-pass argmax gives the one-pass loop's index: ties across and within blocks
    /// and in the tail, the largest in the tail, −∞ throughout, NaNs, every length to past
    /// three blocks.
    #[test]
    fn argmax_gives_the_first_largest_value() {
        let plain = |xs: &[f32]| {
            let mut best = 0;
            for (i, &x) in xs.iter().enumerate() {
                if x > xs[best] || xs[best].is_nan() && !x.is_nan() {
                    best = i;
                }
            }
            best as u32
        };
        for len in 0..3 * ARGMAX_LANES + 7 {
            // Few distinct values, so that the largest is tied in most arrays.
            let xs: Vec<f32> = (0..len).map(|i| ((i * 7919 + len) % 13) as f32).collect();
            assert_eq!(argmax(&xs), plain(&xs), "len {len}");
            let mut top = xs.clone();
            if len > 0 {
                top[len - 1] = 99.0;
                assert_eq!(
                    argmax(&top),
                    (len - 1) as u32,
                    "the largest last, len {len}"
                );
                top[len / 2] = 99.0;
                assert_eq!(argmax(&top), (len / 2) as u32, "tied, len {len}");
                top[0] = f32::NAN;
                assert_eq!(argmax(&top), plain(&top), "a NaN first, len {len}");
            }
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 70]), 0);
        assert_eq!(argmax(&[f32::NAN; 3]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NAN, -1e30]), 2);
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens_and_another_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                ..Default::default()
            });
            (0..40)
                .map(|_| s.sample(&mut logits.clone()).id)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: 1,
            seed: Some(3),
            ..Default::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 0.5, 0.2]).id, 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Token 2 has ~0.84 of the mass; with top_p 0.5 nothing else may be drawn.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(9),
            ..Default::default()
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 0.0, 2.5]).id, 2);
        }
    }

    #[test]
    fn frequency_penalty_moves_greedy_away_from_repeated_tokens() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            frequency_penalty: 1.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&mut [1.5, 1.0]).id, 0);
        // Token 0 now costs 1.0: 0.5 < 1.0.
        assert_eq!(s.sample(&mut [1.5, 1.0]).id, 1);
        // Both used once: 0.5 vs 0.0.
        assert_eq!(s.sample(&mut [1.5, 1.0]).id, 0);
    }

    #[test]
    fn presence_penalty_is_charged_once_per_token() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            presence_penalty: 0.4,
            ..Default::default()
        });
        assert_eq!(s.sample(&mut [1.0, 0.8]).id, 0);
        assert_eq!(s.sample(&mut [1.0, 0.8]).id, 1); // 0.6 < 0.8
        assert_eq!(s.sample(&mut [1.0, 0.8]).id, 0); // 0.6 vs 0.4
    }

    #[test]
    fn logit_bias_bans_and_forces_tokens_greedy_or_sampled_and_shows_in_logprobs() {
        let logits = [2.0f32, 1.0, 0.5, 0.0];
        for temperature in [0.0, 1.0, 2.0] {
            for seed in 0..20 {
                let mut ban = Sampler::new(SamplingParams {
                    temperature,
                    seed: Some(seed),
                    logit_bias: vec![(0, -100.0), (1, -100.0), (3, -100.0)],
                    ..Default::default()
                });
                assert_eq!(ban.sample(&mut logits.clone()).id, 2, "t {temperature}");
                let mut force = Sampler::new(SamplingParams {
                    temperature,
                    seed: Some(seed),
                    logit_bias: vec![(3, 100.0)],
                    ..Default::default()
                });
                assert_eq!(force.sample(&mut logits.clone()).id, 3, "t {temperature}");
            }
        }
        // A small bias moves greedy's choice, and the logprobs are of the biased logits;
        // an id past the logits is ignored.
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            logprobs: Some(1),
            logit_bias: vec![(1, 1.5), (99, 5.0)],
            ..Default::default()
        });
        let t = s.sample(&mut logits.clone());
        assert_eq!(t.id, 1);
        let want = log_softmax(&[2.0, 2.5, 0.5, 0.0])[1];
        assert!((t.logprob.unwrap() - want).abs() < 1e-6);
    }

    #[test]
    fn min_p_drops_tokens_less_likely_than_its_share_of_the_best() {
        // Probabilities ∝ e^l: tokens 0 and 2 are within ln 2 of the best (token 1), token
        // 3 is not: min_p 0.5 keeps 0, 1 and 2 in their softmax's proportions.
        let logits = [2.0f32, 2.5, 2.0, 1.5];
        let keep = [0usize, 1, 2];
        let e: Vec<f64> = logits.iter().map(|&l| (l as f64).exp()).collect();
        let share: f64 = keep.iter().map(|&i| e[i]).sum();
        let p = SamplingParams {
            min_p: 0.5,
            ..Default::default()
        };
        let mut n = [0f64; 4];
        for i in 0..100_000 {
            n[draw(&logits, &p, (i as f64 + 0.5) / 100_000.0) as usize] += 1e-5;
        }
        assert_eq!(n[3], 0.0, "{n:?}");
        for i in keep {
            assert!((n[i] - e[i] / share).abs() < 1e-4, "token {i}: {n:?}");
        }
        // min_p 1 keeps only the best, whatever the temperature.
        let p = SamplingParams {
            min_p: 1.0,
            temperature: 2.0,
            ..Default::default()
        };
        assert!((0..50).all(|i| draw(&logits, &p, i as f64 / 50.0) == 1));
    }

    #[test]
    fn masked_tokens_are_never_alternatives() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            logprobs: Some(4),
            ..Default::default()
        });
        let tok = s.sample(&mut [1.0, f32::NEG_INFINITY, 0.5, f32::NEG_INFINITY]);
        assert_eq!(tok.id, 0);
        assert_eq!(tok.top.iter().map(|t| t.0).collect::<Vec<_>>(), [0, 2]);
        assert!(tok.top.iter().all(|t| t.1.is_finite()));
    }

    #[test]
    fn logprobs_are_normalised_and_top_alternatives_sorted() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            logprobs: Some(2),
            ..Default::default()
        });
        let t = s.sample(&mut [1.0, 3.0, 2.0]);
        assert_eq!(t.id, 1);
        let lp = t.logprob.unwrap();
        let expected = 3.0 - (1f64.exp() + 3f64.exp() + 2f64.exp()).ln();
        assert!((lp as f64 - expected).abs() < 1e-6);
        assert_eq!(t.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        let total: f64 = log_softmax(&[1.0, 3.0, 2.0])
            .iter()
            .map(|&x| (x as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn sampling_at_high_temperature_reaches_more_than_one_token() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: Some(11),
            ..Default::default()
        });
        let seen: std::collections::HashSet<u32> = (0..200)
            .map(|_| s.sample(&mut [0.0, 0.0, 0.0, 0.0]).id)
            .collect();
        assert_eq!(seen.len(), 4);
    }

    /// [`draw`]'s definition with whole sorts: the vocabulary sorted in rank order for top-k
    /// and top-p, the kept candidates drawn from in id order.
    fn draw_by_full_sort(logits: &[f32], p: &SamplingParams, r: f64) -> u32 {
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        cand.sort_by(rank_order);
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let largest = weights(&[max], max)[0] as f64;
        let weight = |l: f32| {
            let w = weights(&[l], max)[0];
            if (w as f64) < p.min_p as f64 * largest {
                0
            } else {
                w as u64
            }
        };
        let total: u64 = cand.iter().map(|c| weight(c.1)).sum();
        let mut keep = cand.len();
        if p.top_p < 1.0 {
            let need = nucleus_need(p.top_p, total);
            let mut cum = 0;
            for (i, c) in cand.iter().enumerate() {
                cum += weight(c.1);
                if cum >= need {
                    keep = i + 1;
                    break;
                }
            }
        }
        let mut kept = cand[..keep].to_vec();
        kept.sort_by_key(|c| c.0);
        let kept_total: u64 = kept.iter().map(|c| weight(c.1)).sum();
        let threshold = ((r * kept_total as f64) as u64).min(kept_total - 1);
        let mut cum = 0;
        for c in &kept {
            cum += weight(c.1);
            if cum > threshold {
                return c.0;
            }
        }
        unreachable!("the kept weights sum past any threshold below their total")
    }

    #[test]
    fn draws_what_whole_sorts_draw() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut deep = 0;
        for case in 0..400 {
            let vocab = [5, 64, 1000, 49152][case % 4];
            // Peaked and flat distributions, ties, and a few very negative logits.
            let scale = [0.1f32, 1.0, 5.0, 20.0][(case / 4) % 4];
            let logits: Vec<f32> = (0..vocab)
                .map(|i| match i % 97 {
                    0 => -1e4,
                    1 => 3.0,
                    _ => scale * (rng.random::<f32>() - 0.5),
                })
                .collect();
            let p = SamplingParams {
                temperature: [0.3, 0.7, 1.0, 1.5][case % 3],
                top_k: [0, 1, 40, 3000][(case / 16) % 4],
                top_p: [1.0, 0.9, 0.5, 0.999][(case / 64) % 4],
                min_p: [0.0, 0.0, 0.05, 0.3, 0.9][(case / 7) % 5],
                ..Default::default()
            };
            let r: f64 = rng.random();
            let got = draw(&logits, &p, r);
            assert_eq!(
                got,
                draw_by_full_sort(&logits, &p, r),
                "case {case}: {p:?}, r {r}"
            );
            let rank = logits.iter().filter(|&&l| l > logits[got as usize]).count();
            deep += (rank >= 64 && p.top_p < 1.0) as usize;
        }
        // Some nuclei were wide (their bucket holding where they end crowded).
        assert!(deep > 10, "{deep} nucleus draws beyond rank 64");
    }

    /// The nucleus's corner cases against the definition: every logit equal (one weight, the
    /// whole vocabulary tied), logits of -inf, a span of 1e30 (buckets far coarser than the
    /// weights), and the rest of a narrow band below one dominant token.
    #[test]
    fn nucleus_corner_cases_draw_what_whole_sorts_draw() {
        let mut rng = StdRng::seed_from_u64(9);
        let n = 5000;
        let shapes: Vec<(&str, Vec<f32>)> = vec![
            ("all equal", vec![1.5; n]),
            (
                "-inf half",
                (0..n)
                    .map(|i| {
                        if i % 2 == 0 {
                            f32::NEG_INFINITY
                        } else {
                            (i % 7) as f32
                        }
                    })
                    .collect(),
            ),
            (
                "span 1e30",
                (0..n)
                    .map(|i| match i % 500 {
                        0 => -1e30,
                        _ => rng.random::<f32>() * 3.0,
                    })
                    .collect(),
            ),
            (
                "one dominant",
                (0..n)
                    .map(|i| {
                        if i == 77 {
                            12.0
                        } else {
                            rng.random::<f32>() * 1e-3
                        }
                    })
                    .collect(),
            ),
        ];
        for (name, logits) in &shapes {
            for top_p in [0.05f32, 0.3, 0.9, 0.999] {
                for k in 0..8 {
                    let p = SamplingParams {
                        top_p,
                        ..Default::default()
                    };
                    let r = (k as f64 + 0.37) / 8.0;
                    assert_eq!(
                        draw(logits, &p, r),
                        draw_by_full_sort(logits, &p, r),
                        "{name}, top_p {top_p}, r {r}"
                    );
                }
            }
        }
        // A NaN logit weighs nothing and is never drawn.
        let mut logits = vec![0.5f32; 100];
        logits[3] = f32::NAN;
        for k in 0..50 {
            let p = SamplingParams {
                top_p: 0.5,
                ..Default::default()
            };
            let got = draw(&logits, &p, k as f64 / 50.0);
            assert!(got != 3 && got < 100, "{got}");
        }
    }

    #[test]
    fn draws_follow_the_softmax_and_the_nucleus() {
        let logits = [2.0f32, 0.5, 1.0, -1.0, 1.0, 3.0];
        let softmax = |t: f32| -> Vec<f64> {
            let e: Vec<f64> = logits.iter().map(|&l| ((l / t) as f64).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|x| x / s).collect()
        };
        let freq = |p: &SamplingParams| -> Vec<f64> {
            let mut n = vec![0f64; logits.len()];
            for i in 0..100_000 {
                n[draw(&logits, p, (i as f64 + 0.5) / 100_000.0) as usize] += 1e-5;
            }
            n
        };
        for t in [0.5f32, 1.0, 2.0] {
            let p = SamplingParams {
                temperature: t,
                ..Default::default()
            };
            for (f, q) in freq(&p).iter().zip(softmax(t)) {
                assert!(
                    (f - q).abs() < 1e-4,
                    "T {t}: frequency {f} for probability {q}"
                );
            }
        }
        // top_p 0.8 at T 1: tokens 5 (0.575) and 0 (0.212) fall short, so the nucleus takes
        // token 2 too (0.078), and not token 4, whose logit is the same but whose id is higher.
        let p = SamplingParams {
            top_p: 0.8,
            ..Default::default()
        };
        let q = softmax(1.0);
        let f = freq(&p);
        let share = q[5] + q[0] + q[2];
        for i in [5, 0, 2] {
            assert!((f[i] - q[i] / share).abs() < 1e-4, "token {i}: {f:?}");
        }
        assert_eq!(f.iter().filter(|x| **x > 0.0).count(), 3, "{f:?}");
    }
}
