"""GGUF -> HF-named float32 tensors + config + tokenizer state, cached once on disk.

llama.cpp's converter permutes the rows of Q and K (for arch "llama") so that its rotary
kernel can rotate adjacent pairs; HF rotates halves. `_unpermute` undoes it.

Dequantizing is the slow part of loading, and a cluster starts several workers on the
same file: the first one writes `<cache>/<stem>-<key>.safetensors` (+ `.json`)
atomically under a file lock; the others wait on the lock and read the result.
The key hashes the file's absolute path, size and mtime, so a changed file re-converts.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Mapping

import numpy as np
import torch

from cluster.engine.gguf_metadata import ARCHS, cache_base, field_value, hf_config
from cluster.progress import progress

logger = logging.getLogger(__name__)

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCKS_FORMAT = 2   # bump when gguf_blocks changes what it stores: old caches are then ignored


def load_gguf_cached(path: str, lazy: bool = False) -> tuple[dict, dict, Mapping[str, torch.Tensor]]:
    """-> (HF config dict, tokenizer state, HF-named tensors); converts at most once per file.
    `lazy`: the tensors are read from the cache only when asked (a tensor-parallel rank's load)."""
    from safetensors.torch import load_file, save_file

    from cluster.engine.lazy_tensors import LazyTensors
    base = cache_base(path)
    with open(base + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # one process converts, the others wait and then read
        if os.path.exists(base + ".json") and os.path.exists(base + ".safetensors"):
            logger.info("loading dequantized weights from cache %s.safetensors", base)
            with open(base + ".json") as f:
                meta = json.load(f)
            tensors = LazyTensors([base + ".safetensors"]) if lazy else load_file(base + ".safetensors")
            return meta["config"], meta["tokenizer"], tensors
        config, tok_state, tensors = read_gguf(path)
        tmp = f"{base}.{os.getpid()}.tmp"
        save_file(tensors, tmp + ".safetensors")
        with open(tmp + ".json", "w") as f:
            json.dump({"config": config, "tokenizer": tok_state, "source": os.path.abspath(path)}, f)
        os.replace(tmp + ".safetensors", base + ".safetensors")
        os.replace(tmp + ".json", base + ".json")   # written last: its presence means the pair is complete
        logger.info("cached dequantized weights at %s.safetensors", base)
        return config, tok_state, LazyTensors([base + ".safetensors"]) if lazy else tensors


def load_gguf_blocks_cached(path: str, config: dict) -> dict[str, "QuantBlocks"]:
    """read_gguf_blocks, cached like the float32 tensors (`<cache>/<stem>-<key>.blocks<N>.safetensors`):
    reading the GGUF metadata alone takes seconds, a cache hit a fraction of one."""
    from safetensors.torch import load_file, save_file

    from cluster.engine.gguf_blocks import QuantBlocks
    base = cache_base(path)
    blocks_file = f"{base}.blocks{BLOCKS_FORMAT}.safetensors"
    with open(base + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(blocks_file):
            flat = load_file(blocks_file)
            return {name.removesuffix(".q"): QuantBlocks(q, flat[name[:-2] + ".scale"], flat.get(name[:-2] + ".low"))
                    for name, q in flat.items() if name.endswith(".q")}
        blocks = read_gguf_blocks(path, config)
        flat = {f"{name}.{part}": t for name, b in blocks.items()
                for part, t in (("q", b.q), ("scale", b.scale), ("low", b.low)) if t is not None}
        tmp = f"{base}.{os.getpid()}.tmp.safetensors"
        save_file(flat, tmp)
        os.replace(tmp, blocks_file)   # atomic: present means complete
        return blocks


def read_gguf(path: str) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    import gguf

    from cluster.engine.tokenizer import Tokenizer
    reader = gguf.GGUFReader(path)
    fields = {name: field_value(f) for name, f in reader.fields.items()}
    arch = fields["general.architecture"]
    if arch not in ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} not supported (supported: {sorted(ARCHS)})")
    config = hf_config(fields, arch)
    tok = Tokenizer.from_gguf_fields(fields)
    names = {t.name for t in reader.tensors}
    config["tie_word_embeddings"] = "output.weight" not in names
    if not config.get("eos_token_id"):
        config["eos_token_id"] = sorted(tok.eos_token_ids)
    tensors: dict[str, torch.Tensor] = {}
    t0, total = time.monotonic(), len(reader.tensors)
    for i, t in enumerate(progress(reader.tensors, total, f"dequantizing {os.path.basename(path)}",
                                   unit="tensor")):
        if t.name == "rope_freqs.weight":
            logger.warning("%s: rope_freqs (Llama-3 rope scaling) is not applied from GGUF", path)
            continue
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = config["num_attention_heads"] if ".attn_q." in t.name else config["num_key_value_heads"]
            w = _unpermute(w, heads)
        # copy: the mmap is read-only
        tensors[_hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))
        if (i + 1) % 32 == 0 or i + 1 == total:
            logger.info("dequantizing %s: %d/%d tensors (%.1fs)", os.path.basename(path), i + 1, total,
                        time.monotonic() - t0)
    return config, tok.to_state(), tensors


def read_gguf_blocks(path: str, config: dict) -> dict[str, "QuantBlocks"]:
    """HF-named QuantBlocks of every quantized 2-D weight (no float32 pass: packed for the CPU
    kernels by quant_linear); float tensors are left out. `config`: read_gguf's HF config."""
    import gguf

    from cluster.engine.gguf_blocks import from_gguf
    reader = gguf.GGUFReader(path)
    arch = field_value(reader.fields["general.architecture"])
    float_types = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)
    out = {}
    for t in reader.tensors:
        if t.tensor_type in float_types or len(t.shape) != 2 or t.name == "rope_freqs.weight":
            continue
        cols, rows = (int(d) for d in t.shape)
        blocks = from_gguf(t.data, t.tensor_type, rows, cols)
        if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = config["num_attention_heads"] if ".attn_q." in t.name else config["num_key_value_heads"]
            blocks = blocks.permute_rows(lambda a, heads=heads: _unpermute(a, heads))
        out[_hf_name(t.name)] = blocks
    return out


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: rows (head, pair, 2) -> (head, 2, pair)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"


