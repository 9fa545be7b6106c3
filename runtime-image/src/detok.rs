//! Turning a growing list of generated tokens into text deltas, with stop sequences.
//!
//! Each step the whole generated id list is decoded again (byte-level BPE pieces may end in
//! the middle of a UTF-8 character, so pieces cannot be decoded one by one), and only the text
//! that can no longer change is released: a trailing U+FFFD (an incomplete character) and any
//! suffix that could be the start of a stop sequence are held back. Streaming and
//! non-streaming responses are both the concatenation of these deltas, so they are identical.

/// Releases text as it becomes final.
#[derive(Debug, Clone)]
pub struct TextAssembler {
    stops: Vec<String>,
    emitted: usize,
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
        }
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
        // A stop may straddle released text and new text: search from the earliest place one
        // could start.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.emitted.saturating_sub(longest.saturating_sub(1));
        while !full.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stops
            .iter()
            .filter_map(|s| full[from..].find(s.as_str()).map(|i| i + from))
            .min();
        if let Some(at) = hit {
            let at = at.max(self.emitted);
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
            for s in &self.stops {
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
    fn the_earliest_of_several_stops_wins() {
        assert_eq!(run(&["c", "b"], &["abcd"]), ("a".into(), true));
    }

    #[test]
    fn the_last_step_releases_held_text() {
        assert_eq!(run(&["xyz"], &["ab", "abx"]), ("abx".into(), false));
    }
}
