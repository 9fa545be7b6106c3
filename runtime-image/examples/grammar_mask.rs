//! How long a grammar's token mask takes on a real vocabulary (`guided_grammar`,
//! `src/grammar.rs`): the vocabulary's byte trie, built once per model, then the median mask
//! after each piece of an answer, for a few grammars from narrow to nearly free text, and
//! Lark's JSON grammar (read through `src/lark.rs`).
//!
//! cargo run --release -p kandle-runtime --example grammar_mask -- <SmolLM2 GGUF>

use std::time::Instant;

use kandle_runtime::grammar::{Grammar, GrammarState, mask_grammar};
use kandle_runtime::json_mode::{JsonVocab, token_texts};

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: grammar_mask <GGUF file>"))?;
    let tok = kandle_runtime::backend::gguf_vocab_tokenizer(path.as_ref())?;
    let anchor = tok.encode("a", false)?[0];
    let texts = token_texts(tok.vocab_size(), anchor, |ids| tok.decode(ids, true).ok());
    let vocab = JsonVocab::new(texts).with_bytes(|id| tok.token_bytes(id));
    let t = Instant::now();
    vocab.trie();
    println!(
        "vocabulary of {}: byte trie built in {:.1} ms",
        vocab.len(),
        ms(t)
    );
    let cases: [(&str, &str, &[&str]); 4] = [
        (
            "nested word lists",
            "root ::= list\nlist ::= \"[\" item (\", \" item)* \"]\"\nitem ::= word | list\nword ::= [a-z]{1,12}",
            &["[", "apple", ", ", "[", "pear"],
        ),
        (
            "sentences of words",
            "root ::= (sentence \" \")* sentence\nsentence ::= word (\" \" word)* \".\"\nword ::= [a-zA-Z]+",
            &["Hello", " there", ".", " It"],
        ),
        (
            "a line of any text",
            "root ::= [^\\n]* \"\\n\"",
            &["Hello", " wor", "ld", " \u{6771}"],
        ),
        (
            "Lark's JSON grammar, %ignore WS",
            "?start: value\n?value: object | array | string | SIGNED_NUMBER | \"true\" | \"false\" | \"null\"\n\
             array: \"[\" [value (\",\" value)*] \"]\"\nobject: \"{\" [pair (\",\" pair)*] \"}\"\n\
             pair: string \":\" value\nstring: ESCAPED_STRING\n\
             %import common.ESCAPED_STRING\n%import common.SIGNED_NUMBER\n%import common.WS\n%ignore WS",
            &[
                "{", "\"name", "\":", " \"Ada", "\",\n ", " \"born", "\": 18",
            ],
        ),
    ];
    for (name, text, pieces) in cases {
        let g = Grammar::parse(text).map_err(anyhow::Error::msg)?;
        let mut state = GrammarState::new(&g);
        let mut times = Vec::new();
        let mut allowed = 0;
        for piece in std::iter::once(&"").chain(pieces.iter()) {
            assert!(state.push_bytes(&g, piece.as_bytes()), "{name}: {piece:?}");
            let mut logits = vec![0.0f32; vocab.len()];
            let t = Instant::now();
            mask_grammar(&g, &state, &vocab, &mut logits);
            times.push(ms(t));
            allowed += logits.iter().filter(|l| l.is_finite()).count();
        }
        let first = times[0];
        times.sort_by(f64::total_cmp);
        println!(
            "{name}: first mask {first:.2} ms, median of {} {:.2} ms, {} tokens allowed on average",
            times.len(),
            times[times.len() / 2],
            allowed / times.len()
        );
    }
    Ok(())
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
