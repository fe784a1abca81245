"""load_model: GGUF, HF safetensors directories, or seeded dummy weights -> LoadedModel.

Other checkpoint layouts (e.g. LLaDA's `model.transformer.blocks.N.*`) plug in with a
name map (`load_model(..., name_map=fn)`); the layouts this engine knows, and everything read
from a model's files without building it (format, config, tokenizer), are `model_files.py`'s.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional

import torch

from cluster.config_types import DEFAULT_MODEL, MODEL_DTYPES, check_tp_invariant
from cluster.engine.lazy_tensors import LazyTensors
from cluster.engine.model import LlamaModel
from cluster.engine.model_config import ModelConfig
from cluster.engine.model_files import (NameMap, default_gguf_path, detect_format, dir_config, dir_tokenizer,
                                       safetensors_files)
from cluster.engine.parallel import TpGroup, TpLayout
from cluster.engine.rotary import RotaryEmbedding
from cluster.progress import progress

logger = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES}
TP_INVARIANT_NOTE = ", tp_invariant: float64 row-parallel sums"   # in the "loaded" log line


class LoadedModel:
    """config + model + tokenizer. The tokenizer loads on first use (GPU benchmarks never need it)."""

    def __init__(self, config: ModelConfig, model: LlamaModel, tokenizer_fn: Callable[[], object]):
        self.config = config
        self.model = model
        self._tokenizer_fn = tokenizer_fn
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self._tokenizer_fn()
        return self._tokenizer


def load_model(name: str = DEFAULT_MODEL, path: str = "", load_format: str = "auto", dtype: str = "float32",
               device: str = "cpu", seed: int = 0, name_map: Optional[NameMap] = None,
               tp: TpGroup = TpGroup(), cpu_weights: str = "native", tp_invariant: bool = False) -> LoadedModel:
    """With `tp` of several ranks: this rank's shard, cut from the full model built on the host.
    `cpu_weights`: "native" keeps a quantized GGUF file's weights packed on the CPU (quant_linear.py;
    one rank only), "float32" dequantizes them (the reference path). `tp_invariant`: the row-parallel
    sums in float64 at every tp (parallel.py)."""
    check_tp_invariant(tp_invariant, device, cpu_weights)
    t0 = time.monotonic()
    if not path and name == DEFAULT_MODEL:
        path = default_gguf_path()
    fmt = detect_format(path or name) if load_format == "auto" else load_format
    logger.info("loading %s (%s, format %s, %s on %s)", name, path or "preset", fmt, dtype, device)
    if fmt == "gguf":
        from cluster.engine.gguf_weights import load_gguf_cached
        from cluster.engine.tokenizer import Tokenizer
        hf_config, tok_state, tensors = load_gguf_cached(path, lazy=tp.size > 1)
        config = ModelConfig.from_hf_config(hf_config)
        tokenizer_fn = lambda: Tokenizer.from_state(tok_state)  # noqa: E731
    elif fmt in ("safetensors", "dummy"):
        config, name_map = dir_config(path or name, name_map)
        tokenizer_fn = lambda: dir_tokenizer(path, config)  # noqa: E731
        tensors = None if fmt == "dummy" else _read_safetensors(path) if tp.size == 1 else LazyTensors(safetensors_files(path))
    else:
        raise ValueError(f"unknown load_format {load_format!r} (auto | gguf | safetensors | dummy)")
    TpLayout(config, tp.size, tp.rank)   # a model that cannot split fails before any weight is read
    if tp.size > 1 and tensors is not None:   # only its shard: one full parameter held at a time
        model = _load_shards(config, DTYPES[dtype], device, tp, tensors, name_map)
        model.set_tp_invariant(tp_invariant)
        model.eval()
        logger.info("loaded %s: %d layers, %.1fM parameters (rank %d of %d, its shard only%s) in %.1fs", name,
                    config.num_layers, sum(p.numel() for p in model.parameters()) / 1e6, tp.rank, tp.size,
                    TP_INVARIANT_NOTE if tp_invariant else "", time.monotonic() - t0)
        return LoadedModel(config, model, tokenizer_fn)
    model = _build(config, DTYPES[dtype], "cpu" if tp.size > 1 else device)
    if tensors is None:
        _init_dummy(model, seed)
    else:
        if name_map is not None:
            tensors = {n2: w for n, w in tensors.items() if (n2 := name_map(n)) is not None}
        model.load_hf_weights(tensors)
    if tp.size > 1:
        model = _shard(model, config, DTYPES[dtype], device, tp)
    elif fmt == "gguf" and cpu_weights == "native":
        _pack_gguf_weights(model, path, hf_config, dtype, device)
    model.set_tp_invariant(tp_invariant)
    model.eval()
    logger.info("loaded %s: %d layers, %.1fM parameters (rank %d of %d%s) in %.1fs", name, config.num_layers,
                sum(p.numel() for p in model.parameters()) / 1e6, tp.rank, tp.size,
                TP_INVARIANT_NOTE if tp_invariant else "", time.monotonic() - t0)
    return LoadedModel(config, model, tokenizer_fn)


def _pack_gguf_weights(model: LlamaModel, path: str, hf_config: dict, dtype: str, device: str) -> None:
    from cluster.engine import quant_linear
    if device != "cpu" or dtype != "float32" or not quant_linear.native_kernels_available():
        logger.info("cpu_weights native: not on %s/%s (%s); weights stay float32", device, dtype,
                    quant_linear.describe_cpu())
        return
    from cluster.engine.gguf_weights import load_gguf_blocks_cached
    quant_linear.attach_packed(model, load_gguf_blocks_cached(path, hf_config))
    logger.info("cpu_weights native: %s (%s)", quant_linear.weights_summary(model) or "no quantized weights",
                quant_linear.describe_cpu())


def _load_shards(config: ModelConfig, dtype: torch.dtype, device: str, tp: TpGroup, tensors,
                 name_map: Optional[NameMap]) -> LlamaModel:
    """A rank's model read straight into its shard (`LlamaModel.load_hf_shards`)."""
    if name_map is not None:
        tensors = tensors.renamed(name_map)
    model = _build(config, dtype, device, tp)
    with torch.device("meta"):
        full = LlamaModel(config)          # names and shapes of the unsplit parameters
    model.load_hf_shards(full, tensors)
    return model


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    tensors: dict[str, torch.Tensor] = {}
    files = safetensors_files(path)
    for i, f in enumerate(progress(files, len(files), "reading safetensors", unit="file")):
        tensors.update(load_file(f))
        logger.info("read %s (%d/%d)", os.path.basename(f), i + 1, len(files))
    return tensors


def _build(config: ModelConfig, dtype: torch.dtype, device: str, tp: TpGroup = TpGroup()) -> LlamaModel:
    with torch.device("meta"):   # no throwaway init: weights are overwritten anyway
        model = LlamaModel(config, tp)
    model = model.to(dtype).to_empty(device=device)   # in the model dtype at once: no float32 copy of 61 GB
    model.rope = _rope(config, model.rope.cos.shape[0], device)   # to_empty left its tables uninitialised
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def _shard(full: LlamaModel, config: ModelConfig, dtype: torch.dtype, device: str, tp: TpGroup) -> LlamaModel:
    """This rank's model on `device`, each parameter its slice of the full one's."""
    model = _build(config, dtype, device, tp)
    params = dict(full.named_parameters())
    for name, p in model.named_parameters():
        part = model.layout.shard(name, params.pop(name))
        if part.shape != p.shape:
            raise ValueError(f"shard of {name!r} has shape {tuple(part.shape)}, expected {tuple(p.shape)}")
        p.copy_(part)
    return model


def _rope(config: ModelConfig, max_positions: int, device: str) -> RotaryEmbedding:
    with torch.device(device):
        return RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)


@torch.no_grad()
def _init_dummy(model: LlamaModel, seed: int) -> None:
    """Seeded random weights: same seed, same device, same weights."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * 0.02)


