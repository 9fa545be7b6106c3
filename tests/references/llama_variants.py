# The reference for runtime_models' Qwen and Phi-3 tests: llama.cpp's own forward pass on the
# tiny llama fixture's weights written as a Qwen2 GGUF (with Q, K and V biases), as a Qwen3
# GGUF (with the per-head norms of queries and keys) and as a Phi-3 GGUF (Q, K, V fused into
# attn_qkv, gate and up into ffn_up, gate first, as the converter copies Phi-3's
# gate_up_proj), as a Granite GGUF (its four scalars: GRANITE below) and as a SmolLM3 GGUF
# (four layers, the fixture's two twice, the fourth without a rotary embedding), as a Gemma 2
# GGUF (norms of each layer's attention and MLP outputs, GELU, soft-capped scores and logits,
# a sliding window on every other layer: GEMMA below), as a Gemma 3 GGUF (Gemma 2's norms
# without the caps, with norms of the query and key heads, the windowed layer turning by a
# base of its own and the other by a linearly scaled one: GEMMA3 below), as a Phi-3 GGUF with
# LongRoPE (short and long factors by the formula below and an attention factor: LONGROPE
# below; "phi3_longrope" with an original context of 256, which llama.cpp, running at 256
# positions, turns by the short factors; "phi3_longrope_long" with one of 1, which it turns by
# the long ones, and which kandle, choosing by each position, turns long too from position 1,
# position 0's angles being 0 whatever the factors), as a Phi-3 GGUF whose rotary turns only
# the first three quarters of each head (Phi-4-mini's partial rotary: PARTIAL below;
# "phi3_partial", and "phi3_partial_longrope" with "phi3_longrope"'s LongRoPE, one factor per
# turned pair), as a llama GGUF with YaRN's rotary scaling ("llama_yarn": YARN below), as a
# Mistral 3 GGUF (YaRN and Llama 4's attention temperature: MISTRAL3 below), as a Qwen3
# mixture-of-experts GGUF (Qwen3's layers with four variants of the fixture's MLP as experts,
# two used per token: MOE below), the way
# llama.cpp's converter writes those architectures (q and k rows as trained for llama.cpp's
# NEOX rotary, permuted for llama's, Granite's, SmolLM3's and Mistral 3's, which turn pairs;
# f32). The biases and
# norm weights are made by the formulas below, which the Rust test repeats exactly (small
# binary fractions, the same f32 in both languages). For each of the fixture's cases, the
# logits after its prompt and llama.cpp's greedy continuation are written out.
#
# Run: pip install numpy safetensors gguf==0.19.0 llama-cpp-python==0.3.36; then
# python3 tests/references/llama_variants.py > tests/references/llama_variants.json
import json, os, sys, tempfile

import gguf
import numpy as np
from llama_cpp import Llama
from safetensors.numpy import load_file

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..', 'shared', 'fixtures', 'tiny', 'llama')
GREEDY = 8
ARCHS = ['qwen2', 'qwen3', 'phi3', 'granite', 'smollm3', 'gemma2', 'gemma3', 'phi3_longrope',
         'phi3_longrope_long', 'phi3_partial', 'phi3_partial_longrope', 'llama_yarn', 'mistral3',
         'qwen3moe', 'granitemoe', 'qwen2moe', 'gemma']
# Granite's embedding, residual, attention and logit scales (the Rust test's too).
GRANITE = (2.0, 0.5, 0.125, 4.0)
# Gemma 2's attention and logit caps and its sliding window, small enough to bite on the tiny
# llama's prompts (the Rust test's too).
GEMMA = (1.5, 3.0, 5)
# Gemma 3's window, layers per window pattern (the first of every two slides), the other
# layers' rotary base and linear factor (the windowed one's base is llama.cpp's default,
# 10,000).
GEMMA3 = (5, 2, 1e6, 8.0)
# LongRoPE's original contexts (short, long) and attention factor (the Rust test's too).
LONGROPE = (256, 1, 1.25)
# Phi-4-mini's partial rotary: the share of each head's dimensions turned (the Rust test's
# too), written as the converter writes it, `int(factor · hidden) // heads` dimensions.
PARTIAL = 0.75
# YaRN's factor and original context (the Rust test's too): the ramp between interpolated and
# extrapolated frequencies falls inside the tiny llama's eight (dimensions 2 to 6).
YARN = (4.0, 2048)
# Mistral 3's YaRN factor and original context, which is also its attention temperature's
# floor, and the temperature's scale (the Rust test's too): the queries' factor changes every
# 8 positions.
MISTRAL3 = (4.0, 8, 0.5)
# Qwen3's mixture of experts: experts, experts used per token (the Rust test's too). Expert e
# is the fixture's MLP with its gate times 1 + e/2 and its down product times 4 - e/2; the
# router's weights are `router` below.
MOE = (4, 2)
# Qwen2-MoE's shared expert: the MLP's gate, up and down times these (the Rust test's
# `SHARED_SCALES` too), its gate's weights `bias(hidden, 40 + layer)`.
SHARED = {'ffn_gate': 0.5, 'ffn_up': 1.0, 'ffn_down': 0.75}


def permute(w, heads):
    """llama.cpp's converter: each head's rows from halves (transformers) to pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def bias(n, salt):
    """The Rust test's `qwen_bias`: (7j + 13 salt) mod 31 − 15, over 32."""
    return np.array([((7 * j + 13 * salt) % 31 - 15) / 32 for j in range(n)], dtype=np.float32)


def norm_weight(n, salt):
    """The Rust test's `qwen_norm`: 1 + ((5j + 3 salt) mod 17 − 8) / 64."""
    return np.array([1 + ((5 * j + 3 * salt) % 17 - 8) / 64 for j in range(n)], dtype=np.float32)


def router(experts, hidden, layer):
    """The Rust test's `moe_router`: ((5j + 11e + 7 layer) mod 17 − 8) / 16."""
    return np.array([[((5 * j + 11 * e + 7 * layer) % 17 - 8) / 16 for j in range(hidden)]
                     for e in range(experts)], dtype=np.float32)


def rope_factors(n, long):
    """The Rust test's `rope_factors`: 1 + ((3j + 1) mod 5) / 4, doubled for the long ones."""
    return np.array([(1 + ((3 * j + 1) % 5) / 4) * (2 if long else 1) for j in range(n)], dtype=np.float32)


def add_vocabulary(w, cfg, tok):
    """The tiny llama's tokenizer.json as a GGUF vocabulary (byte-level BPE, no BOS added)."""
    vocab = [''] * cfg['vocab_size']
    for t, i in tok['model']['vocab'].items():
        vocab[i] = t
    types = [gguf.TokenType.NORMAL] * len(vocab)
    for a in tok['added_tokens']:
        vocab[a['id']] = a['content']
        types[a['id']] = gguf.TokenType.CONTROL
    merges = [m if isinstance(m, str) else ' '.join(m) for m in tok['model']['merges']]
    w.add_tokenizer_model('gpt2')
    w.add_tokenizer_pre('default')
    w.add_token_list(vocab)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg['bos_token_id'])
    w.add_eos_token_id(cfg['eos_token_id'])
    w.add_add_bos_token(False)


def write(key, path):
    arch = 'phi3' if key.startswith('phi3') else 'llama' if key == 'llama_yarn' else key
    cfg = json.load(open(os.path.join(FIXTURE, 'config.json')))
    st = load_file(os.path.join(FIXTURE, 'model.safetensors'))
    tok = json.load(open(os.path.join(FIXTURE, 'tokenizer.json')))
    heads, kv, hidden, hd = cfg['num_attention_heads'], cfg['num_key_value_heads'], cfg['hidden_size'], cfg['head_dim']
    if arch == 'smollm3':
        # The fixture's two layers twice (the Rust test's `tiny_llama_doubled`).
        n = cfg['num_hidden_layers']
        for k in list(st):
            if k.startswith('model.layers.'):
                i, rest = k[len('model.layers.'):].split('.', 1)
                st[f'model.layers.{int(i) + n}.{rest}'] = st[k]
        cfg['num_hidden_layers'] = 2 * n
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg['num_hidden_layers'])
    w.add_context_length(cfg['max_position_embeddings'])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(cfg['intermediate_size'])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(GEMMA3[2] if arch == 'gemma3' else 10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if arch in ('granite', 'granitemoe'):
        w.add_embedding_scale(GRANITE[0])
        w.add_residual_scale(GRANITE[1])
        w.add_attention_scale(GRANITE[2])
        w.add_logit_scale(GRANITE[3])
    rot = int(PARTIAL * hidden) // heads if key.startswith('phi3_partial') else hd
    if rot != hd:
        w.add_rope_dimension_count(rot)
    if key.endswith(('longrope', 'longrope_long')):
        w.add_rope_scaling_orig_ctx_len(LONGROPE[1] if key.endswith('_long') else LONGROPE[0])
        w.add_rope_scaling_attn_factors(LONGROPE[2])
        w.add_tensor('rope_factors_short.weight', rope_factors(rot // 2, False))
        w.add_tensor('rope_factors_long.weight', rope_factors(rot // 2, True))
    if key in ('llama_yarn', 'mistral3'):
        factor, original = (YARN if key == 'llama_yarn' else MISTRAL3)[:2]
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(original)
    if arch in ('qwen3moe', 'granitemoe', 'qwen2moe'):
        w.add_expert_count(MOE[0])
        w.add_expert_used_count(MOE[1])
        w.add_expert_feed_forward_length(cfg['intermediate_size'])
    if arch == 'qwen2moe':
        w.add_expert_shared_feed_forward_length(cfg['intermediate_size'])
    if key == 'mistral3':
        w.add_key_value(gguf.Keys.Attention.TEMPERATURE_SCALE.format(arch=arch), MISTRAL3[2], gguf.GGUFValueType.FLOAT32)
    if arch == 'gemma3':
        w.add_sliding_window(GEMMA3[0])
        w.add_sliding_window_pattern(GEMMA3[1])
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(GEMMA3[3])
    if arch == 'gemma2':
        w.add_attn_logit_softcapping(GEMMA[0])
        w.add_final_logit_softcapping(GEMMA[1])
        w.add_sliding_window(GEMMA[2])
    add_vocabulary(w, cfg, tok)
    w.add_tensor('token_embd.weight', st['model.embed_tokens.weight'])
    if arch == 'qwen2moe':
        # llama.cpp's qwen2moe needs a head of its own: the embeddings again.
        w.add_tensor('output.weight', st['model.embed_tokens.weight'])
    w.add_tensor('output_norm.weight', st['model.norm.weight'])
    for i in range(cfg['num_hidden_layers']):
        p = f'model.layers.{i}.'
        if arch == 'phi3':
            cat = lambda *names: np.concatenate([st[p + n + '.weight'] for n in names])
            w.add_tensor(f'blk.{i}.attn_qkv.weight', cat('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'))
            w.add_tensor(f'blk.{i}.ffn_up.weight', cat('mlp.gate_proj', 'mlp.up_proj'))
            for name, hf in [('attn_output', 'self_attn.o_proj'), ('ffn_down', 'mlp.down_proj'),
                             ('attn_norm', 'input_layernorm'), ('ffn_norm', 'post_attention_layernorm')]:
                w.add_tensor(f'blk.{i}.{name}.weight', st[p + hf + '.weight'])
            continue
        for name, hf in [('attn_q', 'self_attn.q_proj'), ('attn_k', 'self_attn.k_proj'), ('attn_v', 'self_attn.v_proj'),
                         ('attn_output', 'self_attn.o_proj'), ('ffn_gate', 'mlp.gate_proj'), ('ffn_up', 'mlp.up_proj'),
                         ('ffn_down', 'mlp.down_proj'), ('attn_norm', 'input_layernorm'),
                         ('ffn_norm', 'post_attention_layernorm')]:
            t = st[p + hf + '.weight']
            if arch == 'qwen2moe' and name in SHARED:
                w.add_tensor(f'blk.{i}.{name}_shexp.weight', t * np.float32(SHARED[name]))
            if arch in ('qwen3moe', 'granitemoe', 'qwen2moe') and name.startswith('ffn_') and name != 'ffn_norm':
                scale = {'ffn_gate': lambda e: 1 + e / 2, 'ffn_up': lambda e: 1, 'ffn_down': lambda e: 4 - e / 2}[name]
                w.add_tensor(f'blk.{i}.{name}_exps.weight', np.stack([t * np.float32(scale(e)) for e in range(MOE[0])]))
                continue
            if arch in ('llama', 'granite', 'smollm3', 'mistral3', 'granitemoe') and name in ('attn_q', 'attn_k'):
                t = permute(t, heads if name == 'attn_q' else kv)
            w.add_tensor(f'blk.{i}.{name}.weight', t)
        if arch in ('qwen2', 'qwen2moe'):
            for j, (name, n) in enumerate([('attn_q', heads * hd), ('attn_k', kv * hd), ('attn_v', kv * hd)]):
                w.add_tensor(f'blk.{i}.{name}.bias', bias(n, 3 * i + j))
        elif arch in ('qwen3', 'qwen3moe'):
            w.add_tensor(f'blk.{i}.attn_q_norm.weight', norm_weight(hd, 2 * i))
            w.add_tensor(f'blk.{i}.attn_k_norm.weight', norm_weight(hd, 2 * i + 1))
        if arch in ('qwen3moe', 'granitemoe', 'qwen2moe'):
            w.add_tensor(f'blk.{i}.ffn_gate_inp.weight', router(MOE[0], hidden, i))
        if arch == 'qwen2moe':
            w.add_tensor(f'blk.{i}.ffn_gate_inp_shexp.weight', bias(hidden, 40 + i))
        if arch in ('gemma2', 'gemma3'):
            w.add_tensor(f'blk.{i}.post_attention_norm.weight', norm_weight(hidden, 2 * i + 10))
            w.add_tensor(f'blk.{i}.post_ffw_norm.weight', norm_weight(hidden, 2 * i + 11))
        if arch == 'gemma3':
            w.add_tensor(f'blk.{i}.attn_q_norm.weight', norm_weight(hd, 2 * i + 20))
            w.add_tensor(f'blk.{i}.attn_k_norm.weight', norm_weight(hd, 2 * i + 21))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run(path, cases):
    llm = Llama(model_path=path, n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    out = []
    for ids in cases:
        llm.reset()
        llm.eval(ids)
        last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        greedy, logits = [], last
        for _ in range(GREEDY):
            t = int(np.argmax(logits))
            greedy.append(t)
            llm.eval([t])
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        out.append({'input_ids': ids, 'last_logits': [round(float(x), 6) for x in last], 'greedy': greedy})
    return out


def fixture_cases():
    """The tiny llama fixture's prompts, as token ids."""
    ref = json.load(open(os.path.join(FIXTURE, 'reference.json')))
    return [c['input_ids'] for c in ref['cases']]


def dump(results):
    """`results` (a list of `run`'s cases by key) as JSON, one line a case: the logits are
    512 numbers."""
    print('{')
    print(f' "llama_cpp_python": {json.dumps(__import__("llama_cpp").__version__)}, "greedy_tokens": {GREEDY},')
    print(',\n'.join(f' "{key}": [\n' + ',\n'.join('  ' + json.dumps(c, separators=(',', ':')) for c in cases) + '\n ]'
                     for key, cases in results.items()))
    print('}')


def main():
    cases = fixture_cases()
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for arch in ARCHS:
            path = os.path.join(d, f'tiny-{arch}.gguf')
            write(arch, path)
            results[arch] = run(path, cases)
    dump(results)


if __name__ == '__main__':
    main()
