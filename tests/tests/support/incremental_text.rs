//! Shared by `runtime_tiny` and `runtime_models` (included with `#[path]`).

/// Asserts that the engine's incremental detokenisation ([`kandle_runtime::detok::IncrementalText`])
/// ends at the text `tok` decodes from the whole list, and only ever holds a prefix of it, for
/// `text`'s own ids and for pseudo-random ids (pieces that split characters, special tokens).
pub fn assert_incremental_text_is_whole_decode(
    tok: &kandle_runtime::tokenizer::TextTokenizer,
    text: &str,
    what: &str,
) {
    let vocab = tok.vocab_size() as u64;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut lists = vec![tok.encode(text, false).unwrap()];
    for len in [7, 33, 120] {
        lists.push(
            (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 33) % vocab) as u32
                })
                .collect(),
        );
    }
    for ids in lists {
        let mut inc = kandle_runtime::detok::IncrementalText::default();
        for n in 1..=ids.len() {
            let last = n == ids.len();
            let got = inc
                .update(&ids[..n], last, |w| tok.decode(w, true))
                .unwrap()
                .to_string();
            let whole = tok.decode(&ids[..n], true).unwrap();
            if last {
                assert_eq!(got, whole, "{what}: the text of {ids:?}");
            } else {
                assert!(
                    whole.starts_with(&got),
                    "{what}: after {n} of {ids:?}, {got:?} is not a prefix of {whole:?}"
                );
            }
        }
    }
}
