#!/usr/bin/env python3
"""The speed baselines of ../shared/fixtures/baselines.md, by its method, for side-by-side runs.

    python3 runtime-image/examples/baselines.py --gguf SMOLLM2.gguf --minilm MINILM_DIR \
        [--fixtures ../shared/fixtures] [--runs 5] [--only llama|st]

llama.cpp (llama-cpp-python): one eval() of the 407-token bench prompt from an empty cache, then
128 single-token eval() calls with greedy argmax; sentence-transformers: encode(bench_sentences)
at batch 1 (one call per sentence) and at batch 32. Two threads, a warm-up, then the median of
--runs. Needs a virtualenv with `pip install sentence-transformers` and
`CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36`; only a ratio against
kandle measured on the same machine in the same session means anything.
"""
import argparse
import json
import os
import statistics
import time


def llama_cpp(gguf, fixtures, runs, steps):
    import llama_cpp
    import numpy as np

    ref = json.load(open(os.path.join(fixtures, "smollm2_reference.json")))
    llm = llama_cpp.Llama(model_path=gguf, n_threads=2, n_threads_batch=2, n_ctx=2048,
                          n_batch=512, verbose=False)
    n_vocab = llm.n_vocab()
    prompt = llm.tokenize(ref["bench_prompt"].encode(), add_bos=False, special=True)
    prompt_rates, decode_rates = [], []
    for run in range(runs + 1):
        llm.reset()
        llm._ctx.kv_cache_clear()
        t = time.perf_counter()
        llm.eval(prompt)
        p = len(prompt) / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(steps):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                           shape=(n_vocab,))
            llm.eval([int(logits.argmax())])
        d = steps / (time.perf_counter() - t)
        if run:  # the first is the warm-up
            prompt_rates.append(p)
            decode_rates.append(d)
    print(f"llama.cpp prompt ({len(prompt)} tokens): median {statistics.median(prompt_rates):.1f} "
          f"tok/s of {fmt(prompt_rates)}")
    print(f"llama.cpp decode ({steps} tokens): median {statistics.median(decode_rates):.1f} "
          f"tok/s of {fmt(decode_rates)}")


def sentence_transformers(minilm, fixtures, runs):
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    sentences = json.load(open(os.path.join(fixtures, "minilm_reference.json")))["bench_sentences"]
    model = SentenceTransformer(minilm, device="cpu")
    for batch in (1, 32):
        rates = []
        for run in range(runs + 1):
            t = time.perf_counter()
            if batch == 1:
                for s in sentences:
                    model.encode([s], batch_size=1, normalize_embeddings=True)
            else:
                model.encode(sentences, batch_size=32, normalize_embeddings=True)
            if run:
                rates.append(len(sentences) / (time.perf_counter() - t))
        print(f"sentence-transformers batch {batch}: median {statistics.median(rates):.1f} "
              f"sentences/s of {fmt(rates)}")


def fmt(xs):
    return " / ".join(f"{x:.1f}" for x in xs)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf")
    ap.add_argument("--minilm")
    ap.add_argument("--fixtures", default=os.path.join(here, "..", "..", "..", "shared",
                                                       "fixtures"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--only", choices=["llama", "st"])
    a = ap.parse_args()
    if a.only != "st":
        if not a.gguf:
            ap.error("--gguf is needed for the llama.cpp baseline")
        llama_cpp(a.gguf, a.fixtures, a.runs, a.decode_steps)
    if a.only != "llama":
        if not a.minilm:
            ap.error("--minilm is needed for the sentence-transformers baseline")
        sentence_transformers(a.minilm, a.fixtures, a.runs)


if __name__ == "__main__":
    main()
