# The reference for runtime_tiny's rerank test: numpy BERT and XLM-RoBERTa sequence
# classifiers on the tiny bert-cls and xlm-roberta-cls fixtures, each checked against its
# fixture's transformers logits on the single texts (the script stops where they differ by
# more than 1e-4), then run on (query, document) pairs as transformers reads a pair (the
# tokenizer's pair template, token types 0 then 1 where the model has them, truncated to the
# model's length). Run: pip install numpy safetensors tokenizers; then
# python3 tests/references/rerank_pairs.py > tests/references/rerank_pairs.json
import json, math, os, sys
import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..', 'shared', 'fixtures', 'tiny')
QUERY = 'what is the capital of france?'
DOCS = ['paris is the capital of france.', 'the weather is nice today.', 'i loved this movie, the acting was great.',
        # Past the model's length as a pair: the document is cut (the longer text first).
        ' '.join(['the river runs to the sea and the city grows by it.'] * 12)]
gelu = np.vectorize(lambda x: 0.5 * x * (1 + math.erf(x / math.sqrt(2))))


def model(name):
    d = os.path.join(TINY, name)
    w = {k: v.astype(np.float64) for k, v in load_file(d + '/model.safetensors').items()}
    cfg = json.load(open(d + '/config.json'))
    tok = Tokenizer.from_file(d + '/tokenizer.json')
    roberta = cfg['model_type'] == 'xlm-roberta'
    pre = 'roberta.' if roberta else 'bert.'
    H, hid, eps = cfg['num_attention_heads'], cfg['hidden_size'], cfg['layer_norm_eps']

    def ln(x, p):
        m = x.mean(-1, keepdims=True); v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / np.sqrt(v + eps) * w[p + '.weight'] + w[p + '.bias']

    def lin(x, p):
        return x @ w[p + '.weight'].T + w[p + '.bias']

    def logits(ids, types):
        n = len(ids)
        # RoBERTa counts positions from padding_idx + 1.
        pos = np.arange(n) + (cfg['pad_token_id'] + 1 if roberta else 0)
        x = w[pre + 'embeddings.word_embeddings.weight'][ids] + w[pre + 'embeddings.position_embeddings.weight'][pos] \
            + w[pre + 'embeddings.token_type_embeddings.weight'][types]
        x = ln(x, pre + 'embeddings.LayerNorm')
        for l in range(cfg['num_hidden_layers']):
            p = f'{pre}encoder.layer.{l}.'
            q, k, v = (lin(x, p + 'attention.self.' + t).reshape(n, H, -1).transpose(1, 0, 2) for t in ('query', 'key', 'value'))
            s = q @ k.transpose(0, 2, 1) / math.sqrt(hid // H)
            s = np.exp(s - s.max(-1, keepdims=True)); s /= s.sum(-1, keepdims=True)
            c = (s @ v).transpose(1, 0, 2).reshape(n, hid)
            x = ln(x + lin(c, p + 'attention.output.dense'), p + 'attention.output.LayerNorm')
            x = ln(x + lin(gelu(lin(x, p + 'intermediate.dense')), p + 'output.dense'), p + 'output.LayerNorm')
        if roberta:
            return lin(np.tanh(lin(x[0], 'classifier.dense')), 'classifier.out_proj')
        return lin(np.tanh(lin(x[0], 'bert.pooler.dense')), 'classifier')

    worst = 0
    for c in json.load(open(d + '/reference.json'))['cases']:
        e = tok.encode(c['text'])
        assert e.ids == c['input_ids'], (e.ids, c['input_ids'])
        worst = max(worst, np.abs(logits(e.ids, e.type_ids) - np.array(c['logits'])).max())
    print(f'{name}: largest difference to transformers on single texts: {worst:.2g}', file=sys.stderr)
    assert worst < 1e-4
    longest = cfg['max_position_embeddings'] - (cfg['pad_token_id'] + 1 if roberta else 0)
    tok.enable_truncation(longest)
    pairs = []
    for doc in DOCS:
        e = tok.encode(QUERY, doc)
        pairs.append({'document': doc, 'input_ids': e.ids, 'token_type_ids': e.type_ids,
                      'logits': [round(float(x), 6) for x in logits(e.ids, e.type_ids)]})
    return {'query': QUERY, 'pairs': pairs}


print(json.dumps({name: model(name) for name in ['bert-cls', 'xlm-roberta-cls']}, indent=1))
