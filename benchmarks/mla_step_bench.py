"""One DeepSeek-V2-Lite MlaAttention layer's absorbed decode step timed from CUDA graphs, the MLA decode
sweep's last part (mla_decode_sweep.py): with the table's kernel configuration, with the sweep's best in
its place, and each of its two matmuls alone."""
from __future__ import annotations

import torch

from benchmarks.mla_decode_sweep import graph_ms, latent_case
from cluster.engine import triton_mla_config
from cluster.engine.attention_context import AttentionContext
from cluster.engine.model_config import PRESETS
from cluster.engine.triton_mla_config import DecodeConfig


def bench_step(args, best: DecodeConfig | None, floor_ms: float) -> dict:
    """One DeepSeek-V2-Lite MlaAttention layer's absorbed decode step from CUDA graphs, with the table's
    configuration and with `best` in its place, and its two matmuls (W_UK absorption, W_UV) alone."""
    from cluster.engine.mla import MlaAttention
    cfg = PRESETS[args.preset]
    dtype = getattr(torch, args.dtype)
    layer = MlaAttention(cfg).to(device=args.device, dtype=dtype).eval()
    m, b, length = cfg.mla, args.batch, args.context
    _, _, cache, _, _, _, tables = latent_case(b, length, cfg.num_heads, m.kv_lora_rank, m.qk_rope_head_dim,
                                               args.page_size, dtype, args.device)
    ctx = AttentionContext.build([1] * b, [length - 1] * b, tables.tolist(), [0] * b, args.page_size, True,
                                 args.device, None, dtype, "triton")
    q_nope = torch.randn(b, cfg.num_heads, m.qk_nope_head_dim, device=args.device, dtype=dtype)
    q_pe = torch.randn(b, cfg.num_heads, m.qk_rope_head_dim, device=args.device, dtype=dtype)
    w_uk, w_uv = layer._up_weights()
    q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk)
    out = torch.empty(b, cfg.num_heads, m.v_head_dim, device=args.device, dtype=dtype)
    lat = torch.randn(b, cfg.num_heads, m.kv_lora_rank, device=args.device, dtype=dtype)
    row = {"step_absorb_ms": graph_ms(lambda: torch.bmm(q_nope.transpose(0, 1), w_uk, out=q_latent), args.calls),
           "step_up_ms": graph_ms(lambda: torch.bmm(lat.transpose(0, 1), w_uv.transpose(1, 2), out=out.transpose(0, 1)),
                                  args.calls)}
    # the same matmuls on contiguous operands (weights copied once, as a loader could keep them): does
    # cuBLAS pick a slower kernel for the kv_b_proj views and the [H, B] transposes?
    q_heads, w_uk_c, w_uv_c = q_nope.transpose(0, 1).contiguous(), w_uk.contiguous(), w_uv.transpose(1, 2).contiguous()
    lat_heads, out_heads = lat.transpose(0, 1).contiguous(), out.transpose(0, 1).contiguous()
    row.update(step_absorb_contiguous_ms=graph_ms(lambda: torch.bmm(q_heads, w_uk_c, out=q_latent), args.calls),
               step_up_contiguous_ms=graph_ms(lambda: torch.bmm(lat_heads, w_uv_c, out=out_heads), args.calls))
    step = lambda: layer._decode_absorbed(q_nope, q_pe, cache[None], ctx)  # noqa: E731
    row["step_table_ms"] = graph_ms(step, args.calls)
    if best is not None:
        key = min(h for h in triton_mla_config.TABLE if h >= cfg.num_heads)
        kept = triton_mla_config.TABLE[key]
        triton_mla_config.TABLE[key] = best        # the table as it would be with the sweep's winner
        try:
            row["step_best_ms"] = graph_ms(step, args.calls)
        finally:
            triton_mla_config.TABLE[key] = kept
    row.update({k.replace("_ms", "_ratio"): v / floor_ms for k, v in list(row.items()) if k.startswith("step_")})
    return row
