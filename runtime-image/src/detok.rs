//! Turning a growing list of generated tokens into text deltas, with stop sequences.
//!
//! [`IncrementalText`] keeps the text of the generated ids, decoding only the last few ids
//! each step (byte-level BPE pieces may end in the middle of a UTF-8 character, and a
//! SentencePiece decoder drops the space of the first piece it sees, so pieces cannot be
//! decoded one by one); [`TextAssembler`] releases only the text that can no longer change: a
//! trailing U+FFFD (an incomplete character) and any suffix that could be the start of a stop
//! sequence are held back. Streaming and non-streaming responses are both the concatenation
//! of these deltas, so they are identical.

/// The text of a growing list of token ids, as decoding the whole list would give it, at the
/// cost of decoding a few ids per token: the offsets of text-generation-inference's
/// `decode_token`. `prefix..read` are ids already turned into text, decoded again only as the
/// context of the ids after them; a step's new text is `decode(prefix..) − decode(prefix..read)`,
/// taken once it does not end in an incomplete character. (Decoding the whole list every
/// step cost 118 µs a token at 1,000 generated tokens with SmolLM2's tokenizer, 236 µs at
/// 2,000: quadratic in the output's length, and on the thread that runs the model.)
#[derive(Debug, Clone, Default)]
pub struct IncrementalText {
    prefix: usize,
    read: usize,
    text: String,
}

impl IncrementalText {
    /// The text of `ids` (the previous call's ids and more), with `decode` the tokenizer's.
    /// Without `last`, text that does not yet end in a complete character waits; with it,
    /// everything is taken, as a whole decode would give it.
    pub fn update<E>(
        &mut self,
        ids: &[u32],
        last: bool,
        decode: impl Fn(&[u32]) -> Result<String, E>,
    ) -> Result<&str, E> {
        if ids.len() > self.read {
            // Nothing is decoded from no ids: some decoders (tokenizers' BPE decoder, which
            // Blenderbot-small uses) panic on an empty list.
            let before = if self.read > self.prefix {
                decode(&ids[self.prefix..self.read])?
            } else {
                String::new()
            };
            let window = decode(&ids[self.prefix..])?;
            let grows = window.len() > before.len() && window.is_char_boundary(before.len());
            if grows && (last || !window.ends_with('\u{FFFD}')) {
                self.text.push_str(&window[before.len()..]);
                self.prefix = self.read;
                self.read = ids.len();
            } else if last {
                // A window whose text is not its start's text and more (a decoder that
                // rewrites across pieces): the end is the whole decode, as before.
                self.text = decode(ids)?;
                self.prefix = ids.len();
                self.read = ids.len();
            }
        }
        Ok(&self.text)
    }
}

/// Releases text as it becomes final.
#[derive(Debug, Clone)]
pub struct TextAssembler {
    stops: Vec<String>,
    emitted: usize,
    /// Whether stop sequences are looked for (not before vLLM's `min_tokens`).
    armed: bool,
    /// vLLM's `include_stop_str_in_output`: a stop sequence found is released too.
    include: bool,
}

/// What one step released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub delta: String,
    /// A stop sequence was found: generation must end, and its text is not part of the output.
    pub stopped: bool,
}

impl TextAssembler {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            emitted: 0,
            armed: true,
            include: false,
        }
    }

    /// With `on`, a stop sequence found ends the released text instead of being cut.
    pub fn including_stops(mut self, on: bool) -> Self {
        self.include = on;
        self
    }

    /// Whether stop sequences are looked for from now on; text released while they were not
    /// is not searched again.
    pub fn arm(&mut self, on: bool) {
        self.armed = on;
    }

    /// Takes the full decoded text so far; `last` releases everything that is not a stop.
    pub fn push(&mut self, full: &str, last: bool) -> Released {
        if !full.is_char_boundary(self.emitted.min(full.len())) || full.len() < self.emitted {
            // The decoder rewrote text already released; wait for it to settle.
            return Released {
                delta: String::new(),
                stopped: false,
            };
        }
        let stops: &[String] = if self.armed { &self.stops } else { &[] };
        // A stop may straddle released text and new text: search from the earliest place one
        // could start.
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.emitted.saturating_sub(longest.saturating_sub(1));
        while !full.is_char_boundary(from) {
            from -= 1;
        }
        // The earliest stop, the longest of those found there.
        let hit = stops
            .iter()
            .filter_map(|s| full[from..].find(s.as_str()).map(|i| (i + from, s.len())))
            .min_by_key(|&(at, len)| (at, std::cmp::Reverse(len)));
        if let Some((at, len)) = hit {
            let at = if self.include { at + len } else { at }.max(self.emitted);
            let delta = full[self.emitted..at].to_owned();
            self.emitted = at;
            return Released {
                delta,
                stopped: true,
            };
        }
        let mut end = full.len();
        if !last {
            let trimmed = full.trim_end_matches('\u{FFFD}');
            end = trimmed.len();
            // Hold back the longest suffix that is a proper prefix of a stop sequence.
            let mut hold = 0;
            for s in stops {
                for (k, _) in s.char_indices().skip(1) {
                    if k > hold && trimmed.ends_with(&s[..k]) {
                        hold = k;
                    }
                }
            }
            end -= hold;
        }
        let end = end.max(self.emitted);
        let delta = full[self.emitted..end].to_owned();
        self.emitted = end;
        Released {
            delta,
            stopped: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], steps: &[&str]) -> (String, bool) {
        let mut a = TextAssembler::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for (i, s) in steps.iter().enumerate() {
            let r = a.push(s, i + 1 == steps.len());
            out.push_str(&r.delta);
            if r.stopped {
                return (out, true);
            }
        }
        (out, false)
    }

    #[test]
    fn stops_are_looked_for_only_once_armed() {
        let mut a = TextAssembler::new(vec!["END".into()]);
        a.arm(false);
        let r = a.push("one END two E", false);
        assert_eq!((r.delta.as_str(), r.stopped), ("one END two E", false));
        a.arm(true);
        // Released text is not searched again; a stop that straddles it and new text is.
        let r = a.push("one END two END", false);
        assert_eq!((r.delta.as_str(), r.stopped), ("", true));
        let mut b = TextAssembler::new(vec!["END".into()]);
        b.arm(false);
        b.push("one END", false);
        b.arm(true);
        let r = b.push("one END two", false);
        assert_eq!((r.delta.as_str(), r.stopped), (" two", false));
    }

    #[test]
    fn text_without_stops_is_released_as_it_grows() {
        let mut a = TextAssembler::new(vec![]);
        assert_eq!(a.push("Hel", false).delta, "Hel");
        assert_eq!(a.push("Hello", false).delta, "lo");
    }

    #[test]
    fn an_incomplete_character_is_held_back_until_complete() {
        let mut a = TextAssembler::new(vec![]);
        assert_eq!(a.push("caf\u{FFFD}", false).delta, "caf");
        assert_eq!(a.push("café", false).delta, "é");
    }

    #[test]
    fn a_stop_sequence_split_across_steps_is_cut_and_never_released() {
        assert_eq!(
            run(&["\n\n"], &["one", "one\n", "one\n\ntwo"]),
            ("one".into(), true)
        );
    }

    #[test]
    fn a_possible_stop_prefix_that_turns_out_not_to_be_one_is_released() {
        assert_eq!(
            run(&["STOP"], &["a S", "a ST", "a STa", "a STab"]),
            ("a STab".into(), false)
        );
    }

    #[test]
    fn an_included_stop_ends_the_text() {
        let mut a = TextAssembler::new(vec!["END".into(), "EN".into()]).including_stops(true);
        assert_eq!(a.push("one E", false).delta, "one ");
        let r = a.push("one END two", false);
        assert_eq!((r.delta.as_str(), r.stopped), ("END", true));
        // A stop straddling released text: released up to its end.
        let mut a = TextAssembler::new(vec!["xyz".into()]).including_stops(true);
        a.arm(false);
        assert_eq!(a.push("ax", false).delta, "ax");
        a.arm(true);
        let r = a.push("axyz!", false);
        assert_eq!((r.delta.as_str(), r.stopped), ("yz", true));
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        assert_eq!(run(&["c", "b"], &["abcd"]), ("a".into(), true));
    }

    #[test]
    fn the_last_step_releases_held_text() {
        assert_eq!(run(&["xyz"], &["ab", "abx"]), ("abx".into(), false));
    }

    /// A byte-level decoder over a toy vocabulary: id → bytes, invalid UTF-8 lossily, as
    /// byte-level BPE decodes; ids 0..4 are multi-byte pieces that split characters.
    fn toy_decode(ids: &[u32]) -> Result<String, ()> {
        let pieces: [&[u8]; 8] = [
            &[0xC3],
            &[0xA9, b' '],
            &[0xE2, 0x82],
            &[0xAC],
            "é".as_bytes(),
            b"ab",
            b" c",
            b"\n",
        ];
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| pieces[i as usize % 8])
            .copied()
            .collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    #[test]
    fn incremental_text_is_the_whole_decode_once_settled_and_at_the_end() {
        let mut seed = 3u64;
        for case in 0..300 {
            let len = 1 + case % 40;
            let ids: Vec<u32> = (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (seed >> 33) as u32 % 8
                })
                .collect();
            let mut inc = IncrementalText::default();
            for n in 1..=ids.len() {
                let last = n == ids.len();
                let text = inc.update(&ids[..n], last, toy_decode).unwrap().to_string();
                let whole = toy_decode(&ids[..n]).unwrap();
                if last {
                    assert_eq!(text, whole, "{ids:?}");
                } else {
                    // What is taken is a prefix of the whole decode, short of it by at most
                    // the pieces still waiting for their character's end.
                    assert!(
                        whole.starts_with(&text),
                        "{:?}: {text:?} / {whole:?}",
                        &ids[..n]
                    );
                    if !whole.ends_with('\u{FFFD}') {
                        assert_eq!(text, whole, "{:?}", &ids[..n]);
                    }
                }
            }
        }
    }
}
