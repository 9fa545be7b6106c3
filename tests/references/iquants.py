# The reference for runtime_models' i-quant tests: llama.cpp's own forward pass on two small
# llamas, one whose matrices are IQ4_NL and IQ4_XS ("iq4"), one of the seven other i-quants
# ("low": IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_M, IQ1_S), each also with its weights
# dequantised by gguf-py and stored as f32 (the tiny llama fixture's tokenizer and prompts; 256
# wide, heads of 64, an MLP of 512, two layers, so that rows hold whole super-blocks of 256).
# kandle does not quantise to the i-quants, so the weights are not a trained model's: each
# block's bytes come from the integer formula `byte` below, which the Rust test repeats exactly
# (`iq4_byte`), and the scales from it are small binary fractions, the same f16 in both
# languages. For each of the fixture's cases, the logits after its prompt and llama.cpp's greedy
# continuation are written out.
#
# Run (beside llama_variants.py, whose vocabulary, norms and llama.cpp run it shares): pip install
# numpy safetensors gguf==0.19.0 llama-cpp-python==0.3.36; then
# python3 tests/references/iquants.py > tests/references/iquants.json
import json, os, tempfile

import gguf
import numpy as np

from llama_variants import FIXTURE, add_vocabulary, dump, fixture_cases, norm_weight, run

# Width, heads, kv heads, MLP width, layers (the Rust test's `IQ4_SHAPE` too).
SHAPE = (256, 4, 2, 512, 2)
Q = gguf.GGMLQuantizationType
NL, XS = Q.IQ4_NL, Q.IQ4_XS
# Each matrix's type by layer (the Rust test's `iq4_llama`'s table): both kinds in one layer, a fused
# Q, K, V of mixed kinds in the second, the tied embeddings (the head too) in IQ4_XS.
TYPES = {
    'attn_q': (NL, XS), 'attn_k': (NL, XS), 'attn_v': (NL, NL), 'attn_output': (NL, XS),
    'ffn_gate': (XS, XS), 'ffn_up': (XS, XS), 'ffn_down': (NL, XS),
}
# The other i-quants (the Rust test's `low_iq_llama`): each at least once, a fused Q and K of
# one kind beside a V of another, a gate and up of one kind, the tied embeddings in IQ3_S.
LOW_TYPES = {
    'attn_q': (Q.IQ3_S, Q.IQ2_XXS), 'attn_k': (Q.IQ3_S, Q.IQ1_S), 'attn_v': (Q.IQ3_XXS, Q.IQ2_XS),
    'attn_output': (Q.IQ2_S, Q.IQ1_M), 'ffn_gate': (Q.IQ3_XXS, Q.IQ2_XXS),
    'ffn_up': (Q.IQ3_XXS, Q.IQ2_S), 'ffn_down': (Q.IQ1_S, Q.IQ3_S),
}
# Their `d` is (1 + byte mod 8) times this: the largest values come to ~0.1 for each.
LOW_D = {Q.IQ3_S: 2**-15, Q.IQ3_XXS: 2**-15, Q.IQ2_S: 2**-13, Q.IQ2_XS: 2**-13,
         Q.IQ2_XXS: 2**-13, Q.IQ1_M: 2**-10, Q.IQ1_S: 2**-10}


def byte(salt, block, j):
    """The Rust test's `iq4_byte`: byte j of block `block` of the matrix `salt`."""
    return ((salt * 1_000_003 + block * 7919 + j * 104_729) * 2_654_435_761 >> 7) & 0xFF


def block_bytes(kind, salt, b):
    """One block: IQ4_NL {d, qs[16]}, d = (1 + byte mod 8) / 4096; IQ4_XS {d, scales_h,
    scales_l[4], qs[128]}, d = (1 + byte mod 8) / 16384, each sub-block's l = 28 + byte mod 8;
    the others d (`LOW_D`) and the rest of the block bytes of the formula, IQ1_M's d in the top
    nibbles of its four scale words (its block's last eight bytes)."""
    if kind in LOW_D:
        size = gguf.GGML_QUANT_SIZES[kind][1]
        d = int(np.float16((1 + byte(salt, b, 0) % 8) * LOW_D[kind]).view(np.uint16))
        if kind != Q.IQ1_M:
            return d.to_bytes(2, 'little') + bytes(byte(salt, b, j) for j in range(2, size))
        raw = bytearray(byte(salt, b, j) for j in range(2, size + 2))
        for i in range(4):
            raw[49 + 2 * i] = raw[49 + 2 * i] & 0x0F | ((d >> (4 * i)) & 15) << 4
        return bytes(raw)
    if kind == NL:
        d = np.float16((1 + byte(salt, b, 0) % 8) / 4096).tobytes()
        return d + bytes(byte(salt, b, 2 + j) for j in range(16))
    d = np.float16((1 + byte(salt, b, 0) % 8) / 16384).tobytes()
    ls = [28 + byte(salt, b, 100 + s) % 8 for s in range(8)]
    high = sum((l >> 4) << (2 * s) for s, l in enumerate(ls))
    low = bytes((ls[2 * i] & 15) | (ls[2 * i + 1] & 15) << 4 for i in range(4))
    return d + high.to_bytes(2, 'little') + low + bytes(byte(salt, b, 8 + j) for j in range(128))


def matrix(kind, salt, rows, cols):
    per = gguf.GGML_QUANT_SIZES[kind][0]
    raw = b''.join(block_bytes(kind, salt, b) for b in range(rows * cols // per))
    return np.frombuffer(raw, dtype=np.uint8).reshape(rows, -1)


def write(path, types, embd, f32=False):
    hidden, heads, kv, ffn, layers = SHAPE
    hd = hidden // heads
    cfg = json.load(open(os.path.join(FIXTURE, 'config.json')))
    tok = json.load(open(os.path.join(FIXTURE, 'tokenizer.json')))
    w = gguf.GGUFWriter(path, 'llama')
    w.add_block_count(layers)
    w.add_context_length(cfg['max_position_embeddings'])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_IQ4_XS)
    add_vocabulary(w, cfg, tok)
    def add(name, kind, m):
        if f32:
            w.add_tensor(name, gguf.quants.dequantize(m, kind).astype(np.float32))
        else:
            w.add_tensor(name, m, raw_dtype=kind)
    add('token_embd.weight', embd, matrix(embd, 1, cfg['vocab_size'], hidden))
    w.add_tensor('output_norm.weight', norm_weight(hidden, 1))
    rows = {'attn_q': (hidden, hidden), 'attn_k': (kv * hd, hidden), 'attn_v': (kv * hd, hidden),
            'attn_output': (hidden, hidden), 'ffn_gate': (ffn, hidden), 'ffn_up': (ffn, hidden),
            'ffn_down': (hidden, ffn)}
    for i in range(layers):
        for j, (name, (r, c)) in enumerate(rows.items()):
            kind = types[name][i]
            add(f'blk.{i}.{name}.weight', kind, matrix(kind, 10 * i + j + 2, r, c))
        w.add_tensor(f'blk.{i}.attn_norm.weight', norm_weight(hidden, 2 * i + 2))
        w.add_tensor(f'blk.{i}.ffn_norm.weight', norm_weight(hidden, 2 * i + 3))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    cases = fixture_cases()
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for name, types, embd in [('iq4', TYPES, XS), ('low', LOW_TYPES, Q.IQ3_S)]:
            for key, f32 in [(name, False), (f'{name}_as_f32', True)]:
                path = os.path.join(d, f'tiny-{key}.gguf')
                write(path, types, embd, f32=f32)
                results[key] = run(path, cases)
    dump(results)


if __name__ == '__main__':
    main()
