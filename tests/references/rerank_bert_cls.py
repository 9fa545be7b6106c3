# The reference for runtime_tiny's rerank test: a numpy BERT sequence classifier on the tiny
# bert-cls fixture, checked against the fixture's transformers logits on its single texts (largest
# difference 5.7e-6), then run on (query, document) pairs with token types 0 and 1, as
# transformers reads a pair. Run: pip install numpy safetensors tokenizers; then
# python3 tests/references/rerank_bert_cls.py > tests/references/rerank_bert_cls.json
import json, math, sys
import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

import os
D = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..', 'shared', 'fixtures', 'tiny', 'bert-cls')
w = {k: v.astype(np.float64) for k, v in load_file(D + '/model.safetensors').items()}
cfg = json.load(open(D + '/config.json'))
tok = Tokenizer.from_file(D + '/tokenizer.json')
H = cfg['num_attention_heads']; d = cfg['hidden_size']; eps = cfg['layer_norm_eps']

def ln(x, p):
    m = x.mean(-1, keepdims=True); v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w[p + '.weight'] + w[p + '.bias']

def lin(x, p):
    return x @ w[p + '.weight'].T + w[p + '.bias']

gelu = np.vectorize(lambda x: 0.5 * x * (1 + math.erf(x / math.sqrt(2))))

def logits(ids, types):
    n = len(ids)
    x = w['bert.embeddings.word_embeddings.weight'][ids] + w['bert.embeddings.position_embeddings.weight'][:n] \
        + w['bert.embeddings.token_type_embeddings.weight'][types]
    x = ln(x, 'bert.embeddings.LayerNorm')
    for l in range(cfg['num_hidden_layers']):
        p = f'bert.encoder.layer.{l}.'
        q = lin(x, p + 'attention.self.query').reshape(n, H, -1).transpose(1, 0, 2)
        k = lin(x, p + 'attention.self.key').reshape(n, H, -1).transpose(1, 0, 2)
        v = lin(x, p + 'attention.self.value').reshape(n, H, -1).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(d // H)
        s = np.exp(s - s.max(-1, keepdims=True)); s /= s.sum(-1, keepdims=True)
        c = (s @ v).transpose(1, 0, 2).reshape(n, d)
        x = ln(x + lin(c, p + 'attention.output.dense'), p + 'attention.output.LayerNorm')
        i = gelu(lin(x, p + 'intermediate.dense'))
        x = ln(x + lin(i, p + 'output.dense'), p + 'output.LayerNorm')
    pooled = np.tanh(lin(x[0:1], 'bert.pooler.dense'))
    return lin(pooled, 'classifier')[0]

ref = json.load(open(D + '/reference.json'))
worst = 0
for c in ref['cases']:
    e = tok.encode(c['text'])
    assert e.ids == c['input_ids'], (e.ids, c['input_ids'])
    got = logits(e.ids, e.type_ids)
    worst = max(worst, np.abs(got - np.array(c['logits'])).max())
print('largest difference to transformers on single texts:', worst, file=sys.stderr)
assert worst < 1e-4

query = 'what is the capital of france?'
docs = ['paris is the capital of france.', 'the weather is nice today.', 'i loved this movie, the acting was great.',
        # Past the model's 128 positions as a pair: the document is cut (the longer text first).
        ' '.join(['the river runs to the sea and the city grows by it.'] * 12)]
tok.enable_truncation(cfg['max_position_embeddings'])
out = []
for doc in docs:
    e = tok.encode(query, doc)
    out.append({'document': doc, 'input_ids': e.ids, 'token_type_ids': e.type_ids,
                'logits': [round(float(x), 6) for x in logits(e.ids, e.type_ids)]})
print(json.dumps({'query': query, 'pairs': out}, indent=1))
