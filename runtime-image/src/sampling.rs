//! Choosing the next token from logits: penalties, temperature, top-k, top-p, a seeded RNG, and
//! log-probabilities. Pure functions over slices; unit-tested here.
//!
//! Order of operations (as in OpenAI's and vLLM's samplers): presence/frequency penalties on the
//! raw logits → log-probabilities reported from these (before temperature) → temperature →
//! top-k → top-p → draw. Temperature 0 is greedy: the highest logit, lowest id on ties.

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
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// `Some(n)`: report the chosen token's logprob and the n most likely alternatives.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: None,
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
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            counts: HashMap::new(),
        }
    }

    /// Picks the next token from `logits` (modified in place) and records it.
    pub fn sample(&mut self, logits: &mut [f32]) -> SampledToken {
        let p = &self.params;
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
            (Some(ls), Some(n)) => (Some(ls[id as usize]), top_n(&ls, n)),
            _ => (None, Vec::new()),
        };
        SampledToken { id, logprob, top }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        // Descending by logit, ascending id on ties: deterministic for a given seed.
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand
            .iter()
            .map(|&(_, l)| ((l - max) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, &pr) in probs.iter().enumerate() {
                cum += pr;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= total);
        }
        let r: f64 = self.rng.random();
        let mut cum = 0.0;
        for (i, pr) in probs.iter().enumerate() {
            cum += pr;
            if r < cum {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// Index of the largest value; the lowest index wins ties.
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

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
}
