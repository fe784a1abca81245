"""A GGUF file's metadata: its model config and its tokenizer, each cached beside the
dequantized weights (`cache_dir()`), read without torch: the router and `pdcluster launch`'s
config check need them, and neither imports torch (the weights are `gguf_weights.py`'s)."""
from __future__ import annotations

import hashlib
import json
import os

ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def cache_dir() -> str:
    return os.environ.get("PDCLUSTER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pdcluster")


def cache_base(path: str) -> str:
    """`<cache>/<stem>-<key>`: the key hashes the file's absolute path, size and mtime."""
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    os.makedirs(cache_dir(), exist_ok=True)
    return os.path.join(cache_dir(), f"{os.path.basename(path).removesuffix('.gguf')}-{key}")


def gguf_tokenizer(path: str):
    """Only the tokenizer of a GGUF file (metadata only, no dequantizing), cached as
    `<cache>/<stem>-<key>.tokenizer.json`: parsing the vocabulary takes seconds, and the router
    of every launched cluster needs it before it serves."""
    import gguf

    from cluster.engine.tokenizer import Tokenizer
    cached = cache_base(path) + ".tokenizer.json"
    if os.path.exists(cached):
        with open(cached) as f:
            return Tokenizer.from_state(json.load(f))
    reader = gguf.GGUFReader(path)
    tok = Tokenizer.from_gguf_fields({n: field_value(f) for n, f in reader.fields.items()
                                      if n.startswith("tokenizer.")})
    tmp = f"{cached}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(tok.to_state(), f)
    os.replace(tmp, cached)              # atomic: present means complete
    return tok


def gguf_config(path: str) -> dict:
    """A GGUF file's model config from its metadata alone (no tensor read, no vocabulary decoded);
    parsing the header takes seconds, so the answer is cached beside the dequantized weights."""
    base = cache_base(path)
    for cached in (base + ".json", base + ".config.json"):
        if os.path.exists(cached):
            with open(cached) as f:
                return json.load(f)["config"]
    config = read_gguf_config(path)
    tmp = f"{base}.{os.getpid()}.tmp.config.json"
    with open(tmp, "w") as f:
        json.dump({"config": config}, f)
    os.replace(tmp, base + ".config.json")
    return config


def read_gguf_config(path: str) -> dict:
    import gguf
    reader = gguf.GGUFReader(path)
    fields = {n: field_value(f) for n, f in reader.fields.items() if not n.startswith("tokenizer.ggml.") or n.endswith("_id")}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    fields["tokenizer.ggml.tokens"] = range(len(tokens.data) if tokens is not None else 0)
    arch = fields["general.architecture"]
    if arch not in ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} not supported (supported: {sorted(ARCHS)})")
    return hf_config(fields, arch)


def hf_config(f: dict, arch: str) -> dict:
    heads = f[f"{arch}.attention.head_count"]
    hidden = f[f"{arch}.embedding_length"]
    eos = f.get("tokenizer.ggml.eos_token_id")
    return {
        "architectures": [ARCHS[arch]], "vocab_size": f.get(f"{arch}.vocab_size", len(f["tokenizer.ggml.tokens"])),
        "hidden_size": hidden, "intermediate_size": f[f"{arch}.feed_forward_length"],
        "num_hidden_layers": f[f"{arch}.block_count"], "num_attention_heads": heads,
        "num_key_value_heads": f.get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": f.get(f"{arch}.attention.key_length", hidden // heads),
        "rms_norm_eps": f[f"{arch}.attention.layer_norm_rms_epsilon"],
        "rope_theta": f.get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": f.get(f"{arch}.context_length", 4096),
        "bos_token_id": f.get("tokenizer.ggml.bos_token_id"), "eos_token_id": [] if eos is None else [eos],
    }


def field_value(field):
    """A GGUF metadata field as a plain Python value (str, number, or list of them)."""
    import gguf
    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        if types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]
