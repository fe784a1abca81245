"""ModelRunner: runs one ForwardInput through the model over the paged KV cache and samples.

Future tokens (overlap scheduling): the scheduler launches decode batch N+1 before it has
seen batch N's sampled tokens. Such an input id is written as `-(k + 1)`: "the token last
sampled into slot k". `forward` resolves those from `future_map` before the embedding
lookup and, after sampling, stores each request's new token into its `future_slots[i]`.
Forwards run in launch order on one thread, so N's store happens before N+1's resolve.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Optional

import numpy as np
import torch

from cluster.engine.attention import AttentionContext, attention_backend
from cluster.engine.cuda_graphs import DecodeGraphs, cuda_graphs_enabled
from cluster.engine.forward_batch import ForwardInput, ForwardOutput
from cluster.engine.kv_cache import KVPool
from cluster.engine.linear import small_ops_on_one_thread
from cluster.engine.loader import DTYPES, LoadedModel
from cluster.engine.mla import use_triton_mla
from cluster.engine.page_allocator import PageAllocator
from cluster.engine.sampler import is_plain_greedy, sample

NUM_FUTURE_SLOTS = 4096
SMALL_STEP_REQS = 4   # CPU decode steps up to this batch run their small ops on one thread (linear.py)


def kv_dtype_of(loaded: LoadedModel, kv_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """`[model] kv_dtype` for this model: "auto" is the model's dtype. bfloat16 under float32 activations
    (CPU) halves the bytes attention reads, but torch's bfloat16 attention kernels on a CPU without AMX
    ran slower than float32's (BENCHMARKS.md, "A bfloat16 KV cache"), so it is not the default."""
    if kv_dtype == "auto":
        return dtype
    chosen = DTYPES[kv_dtype]
    if chosen != dtype and loaded.config.mla is not None:
        raise ValueError(f"kv_dtype {kv_dtype!r}: latent attention keeps its KV in the model's dtype")
    return chosen


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_pages: int, page_size: int, device="cpu", dtype="float32",
                 num_threads: Optional[int] = None, max_decode_batch: int = 256,
                 kv_storage: Optional[torch.Tensor] = None, kv_segment=None, import_fence=None, followers=None,
                 kv_dtype: str = "auto"):
        """`max_decode_batch`: the largest decode batch CUDA graphs are captured for (at startup).
        `kv_segment`: the shared-memory segment `kv_storage` lives in (same-host readers map it);
        `import_fence`: a decode worker's kv_transfer.ImportFence, the KV imports its forwards wait for;
        `followers`: rank 0's runtime.tp_ranks.TpFollowers, the other ranks each forward is sent to;
        `kv_dtype`: `[model] kv_dtype` (`kv_dtype_of`)."""
        if num_threads:   # several workers on few cores: 1 thread each (see BENCHMARKS.md)
            torch.set_num_threads(num_threads)
        self.num_threads = torch.get_num_threads()   # what its forwards use (a forward thread sets its own)
        self.loaded = loaded
        self.config = loaded.config
        self.model = loaded.model
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.page_size = page_size
        self.page_allocator = PageAllocator(num_pages)
        cfg = self.config
        self.tp = self.model.tp
        planes, kv_heads, kv_dim = self.model.layout.kv_cache_shape   # this rank's heads only
        self.kv_dtype = kv_dtype_of(loaded, kv_dtype, self.dtype)
        self.kv_pool = KVPool(cfg.num_layers, kv_heads, kv_dim, num_pages, page_size, self.kv_dtype, self.device,
                              storage=kv_storage, num_planes=planes)
        self.kv_segment, self.import_fence = kv_segment, import_fence
        self.followers = followers
        self.kv_caches = self.kv_pool.layer_caches()
        # one slot past the last: the trash slot that graph padding rows store into
        self.future_map = torch.zeros(NUM_FUTURE_SLOTS + 1, dtype=torch.int64, device=self.device)
        # latent attention (mla.py): the Triton context where its own kernels run, else torch's
        self.attention_backend = attention_backend(self.device, cfg.head_dim) if cfg.mla is None else \
            ("triton" if use_triton_mla(self.device, cfg.mla) else "torch")
        self.decode_graphs = None
        graphable = self.attention_backend == "triton"
        if cuda_graphs_enabled(self.device) and graphable:
            self.decode_graphs = DecodeGraphs(self.model, self.kv_caches, self.future_map, NUM_FUTURE_SLOTS,
                                              self.page_allocator, page_size, max_decode_batch, self.device)
            self.decode_graphs.capture_all()

    def add_layer_listener(self, listener) -> None:
        """`listener(i)` after each decoder layer of this runner's eager forwards (LlamaModel's)."""
        self.model.add_layer_listener(listener)

    def add_layer_gate(self, gate) -> None:
        """`gate(i)` before each decoder layer of this runner's eager forwards (LlamaModel's)."""
        self.model.add_layer_gate(gate)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def kv_fingerprint(self) -> dict:
        """What a KV handoff between two workers must agree on; `layout` names the planes' meaning.
        `num_kv_heads` is the model's, whatever this worker's TP size: the handoff maps heads between sizes."""
        pool, mla = self.kv_pool, self.config.mla
        layout = "kv" if mla is None else f"latent:{mla.kv_lora_rank}+{mla.qk_rope_head_dim}"
        return {"num_layers": pool.num_layers, "num_kv_heads": self.config.kv_cache_shape[1], "head_dim": pool.head_dim,
                "dtype": str(self.kv_dtype).removeprefix("torch."), "page_size": self.page_size, "layout": layout}

    # future-token map
    def resolve_future(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Replace each `-(k + 1)` by future_map[k]. Ids on the CPU decide whether any is a future
        (no device sync, and no kernels when none is); ids already on the device always go through
        the `where` (`bool()` of a device tensor would wait for the device)."""
        if input_ids.is_cpu and not bool((input_ids < 0).any()):
            return input_ids.to(self.device, non_blocking=True)
        ids = input_ids.to(self.device, non_blocking=True)
        return torch.where(ids < 0, self.future_map[(-ids - 1).clamp(min=0)], ids)

    def resolve_prior(self, prior_ids: list[list[int]]) -> list[list[int]]:
        """Penalties' seen ids whose last one is still a future (`-(k + 1)`, overlap): read it from the map
        (one host read, only for penalized requests)."""
        if not any(ids and ids[-1] < 0 for ids in prior_ids):
            return prior_ids
        return [ids[:-1] + [int(self.future_map[-ids[-1] - 1])] if ids and ids[-1] < 0 else ids for ids in prior_ids]

    def store_future(self, slots: list[int], tokens: torch.Tensor) -> None:
        if slots and min(slots) >= 0:   # every row stores (a decode step)
            self.future_map[torch.tensor(slots).to(self.device, non_blocking=True)] = tokens.to(self.device)
            return
        keep = [i for i, s in enumerate(slots) if s >= 0]
        if keep:
            idx = torch.tensor([slots[i] for i in keep]).to(self.device, non_blocking=True)
            if len(keep) < len(slots):
                tokens = tokens[torch.tensor(keep).to(tokens.device, non_blocking=True)]
            self.future_map[idx] = tokens.to(self.device)

    # KV handoff
    def export_kv(self, page_table: list[int], length: int) -> torch.Tensor:
        return self.kv_pool.export_kv(page_table, length).cpu()

    def import_kv(self, page_table: list[int], tensor: torch.Tensor) -> None:
        self.kv_pool.import_kv(page_table, tensor)

    def run_model(self, fi: ForwardInput, input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The eager model over `fi` -> final hidden states `[num_tokens, hidden]` on the device;
        `input_ids`: ids already on the device in place of `fi.input_ids` (DLLM blocks)."""
        ids = self.resolve_future(fi.input_ids) if input_ids is None else input_ids
        ctx = AttentionContext.build_decode(
            np.asarray(fi.prefix_lens, dtype=np.int64), fi.block_table.numpy(), self.page_size, self.device,
            self.dtype, self.attention_backend) if fi.block_table is not None else AttentionContext.build(
            fi.extend_lens, fi.prefix_lens, fi.page_tables, fi.bidirectional_lens or [0] * fi.num_reqs,
            self.page_size, fi.is_decode, self.device, fi.attn_block_sizes or None, self.dtype,
            self.attention_backend)
        return self.model(ids, ctx.positions, self.kv_caches, ctx)

    @torch.inference_mode()
    def forward(self, fi: ForwardInput, wait: bool = True) -> ForwardOutput:
        """`wait=False` (CUDA): the forward returns as soon as it is launched, its outputs still being
        copied into pinned memory behind it on the stream; call `.wait()` on the output before reading
        them. Later steps may be launched meanwhile (they read these tokens as futures), which hides the
        host's work per step. What reads the host anyway (a grammar's matcher, penalties' last seen id,
        returned logits, prompt logprobs) still waits inside the forward; the CPU always waits."""
        small_step = self.device.type == "cpu" and fi.is_decode and fi.num_reqs <= SMALL_STEP_REQS
        with small_ops_on_one_thread() if small_step else nullcontext():
            return self._forward(fi, wait)

    def _forward(self, fi: ForwardInput, wait: bool) -> ForwardOutput:
        t0 = time.perf_counter()
        defer = not wait and self.device.type == "cuda"
        started = _record(timing=True) if defer else None
        plain_greedy = fi.all_greedy or is_plain_greedy(fi.sampling, fi.prior_ids, fi.min_tokens_left, fi.grammars)
        if self.followers is not None:
            self.followers.send_forward(fi, plain_greedy)
        if self.import_fence is not None:
            self.import_fence.wait()   # NOTE: KV imported into pages this forward reads has landed
        graphed = None
        if self.decode_graphs is not None and fi.is_decode and not fi.return_logits:
            graphed = self.decode_graphs.run(fi)   # None: no bucket fits, run eagerly
        hidden = graphed.hidden if graphed is not None else self.run_model(fi)
        t1 = time.perf_counter()
        if graphed is not None and all(fi.sample) and plain_greedy:
            # the graph took the argmax and stored it into the future map: only the host copy is left
            next_ids = torch.empty(fi.num_reqs, dtype=torch.int64, pin_memory=True)
            next_ids.copy_(graphed.greedy_ids[:fi.num_reqs], non_blocking=True)
            out = ForwardOutput(next_token_ids=next_ids, ready=_record(timing=defer), started=started,
                                timings={"model_s": t1 - t0, "total_s": time.perf_counter() - t0})
            if wait:           # on the forward thread, as before deferral (the scheduler's future times out)
                out.ready.synchronize()
                out.ready = None
            return out
        rows = [i for i, s in enumerate(fi.sample) if s]
        next_ids = torch.full((fi.num_reqs,), -1, dtype=torch.int64)
        logprobs = top_ids = top_lps = None
        logits_all = None
        if fi.return_logits:   # NOTE: select hidden rows first, so the lm_head runs only on the kept ones
            keep = fi.logits_rows()
            logits_all = self.model.compute_logits(hidden if keep is None else hidden[keep.to(self.device, non_blocking=True)])
        every_row = len(rows) == fi.num_reqs
        pick = lambda xs: (list(xs) if every_row else [xs[i] for i in rows]) if xs else []  # noqa: E731
        if rows:
            kept_lens = fi.logits_lens or fi.extend_lens
            if logits_all is not None and all(kept_lens[i] for i in rows):   # every sampled last row was kept
                logits = _last_rows(logits_all, kept_lens, rows, self.device)
            else:
                logits = self.model.compute_logits(_last_rows(hidden[:fi.num_tokens], fi.extend_lens, rows,
                                                              self.device))
            if plain_greedy and every_row:    # nothing to process: the argmax is the token
                ids, lps, top = greedy_ids(logits), None, None
            else:
                prior_ids = self.resolve_prior(pick(fi.prior_ids))
                ids, lps, top = sample(logits, pick(fi.sampling), pick(fi.generators), prior_ids,
                                       pick(fi.min_tokens_left), pick(fi.eos_token_ids), pick(fi.grammars))
                ids = self.tp.broadcast(ids)   # NOTE: rank 0's draw on every rank, so their future maps agree
            if fi.future_slots:
                self.store_future(fi.future_slots if every_row else [fi.future_slots[i] for i in rows], ids)
            if defer:        # pinned copies behind the forward; the event below says when they landed
                next_ids, logprobs, top_ids, top_lps = _pinned_rows(fi.num_reqs, rows, ids, lps, top)
            else:
                next_ids[rows] = ids.cpu()
                if lps is not None:
                    logprobs = torch.zeros(fi.num_reqs, dtype=torch.float32)
                    logprobs[rows] = lps.float().cpu()
                if top is not None:
                    top_ids = torch.zeros(fi.num_reqs, top[0].shape[1], dtype=torch.int64)
                    top_lps = torch.zeros(fi.num_reqs, top[0].shape[1], dtype=torch.float32)
                    top_ids[rows], top_lps[rows] = top[0].cpu(), top[1].float().cpu()
        return ForwardOutput(next_token_ids=next_ids, logprobs=logprobs,
                             logits=None if logits_all is None else logits_all.float().cpu(),
                             top_ids=top_ids, top_logprobs=top_lps,
                             prompt_logprobs=self._prompt_logprobs(hidden, fi) if any(fi.prompt_targets) else None,
                             timings={"model_s": t1 - t0, "total_s": time.perf_counter() - t0},
                             ready=_record(timing=True) if defer else None, started=started)

    def _prompt_logprobs(self, hidden: torch.Tensor, fi: ForwardInput) -> list:
        """Raw logprob of each target under the row before it (echo with logprobs): request i's first
        len(prompt_targets[i]) extend rows predict its prompt_targets[i]."""
        out, start = [], 0
        for i, targets in enumerate(fi.prompt_targets):
            if targets:
                logits = self.model.compute_logits(hidden[start:start + len(targets)]).float()
                ids = torch.tensor(targets, device=logits.device)[:, None]
                out.append(torch.log_softmax(logits, dim=-1).gather(1, ids)[:, 0].cpu().tolist())
            else:
                out.append(None)
            start += fi.extend_lens[i]
        return out


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)`: on the CPU as `max(-1)`'s indices, the same first maximum (NaN counted as the largest,
    as argmax does) from a reduction ~2x faster over a vocabulary row (50 against 100 µs for 49152 logits)."""
    return torch.max(logits, dim=-1).indices if logits.is_cpu else logits.argmax(dim=-1)


def _record(timing: bool = False) -> torch.cuda.Event:
    """An event at this point of the current stream; `timing` ones measure a deferred forward's span."""
    event = torch.cuda.Event(enable_timing=timing)
    event.record()
    return event


def _pinned_rows(n: int, rows: list[int], ids, lps, top) -> tuple:
    """(next ids, logprobs, top ids, top logprobs) of the sampled `rows` of `n`, laid out as the waited
    path does (-1 / 0 where a request sampled nothing), in pinned host memory being copied behind the
    stream's work."""
    at = None if len(rows) == n else torch.tensor(rows).to(ids.device, non_blocking=True)

    def pinned(x: Optional[torch.Tensor], fill):
        if x is None:
            return None
        if at is not None:
            x = torch.full((n, *x.shape[1:]), fill, dtype=x.dtype, device=x.device).index_copy_(0, at, x)
        return torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=True)
    top_ids, top_lps = top if top is not None else (None, None)
    return (pinned(ids, -1), pinned(None if lps is None else lps.float(), 0), pinned(top_ids, 0),
            pinned(None if top_lps is None else top_lps.float(), 0))


def _last_rows(x: torch.Tensor, lens: list[int], rows: list[int], device) -> torch.Tensor:
    """The last row of each request in `rows`, where `x` holds `lens[i]` rows per request in order."""
    if len(rows) == len(lens) and all(n == 1 for n in lens):   # every row is a last row
        return x
    ends = torch.tensor(lens).cumsum(0) - 1
    return x[ends[rows].to(device, non_blocking=True)]
