"""The MLA decode sweep's results as people read them (mla_decode_sweep.py prints and writes these): a line
per head count (best config, ms, ratio against one read of the latent at the copy bandwidth of the same
run), the fastest rows, a markdown page, and the `TABLE` to paste into cluster/engine/triton_mla_config.py.
Also from a saved result:

    python benchmarks/mla_sweep_report.py OUT/mla_sweep.json
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GOAL = 1.3     # issue 21: within 1.3x of reading the latent once


def _fmt(ms, floor_ms) -> str:
    return f"{ms:.4f} ms = {ms / floor_ms:.2f}x" if ms else "not timed"


def head_lines(out: dict) -> list[str]:
    """One line per head count: the best config, its ms and ratio, the table's row beside it."""
    lines = []
    for heads, best in sorted(out["mla_best"].items(), key=lambda kv: int(kv[0])):
        goal = "goal met" if best["ratio"] <= GOAL else f"goal {GOAL}x not met"
        lines.append(f"{heads} heads: best {_fmt(best['ms'], out['latent_read_ms'])} ({goal}): {best['code']}; "
                     f"table's now {_fmt(best['table_ms'], out['latent_read_ms'])}")
    return lines


def fastest(out: dict, heads, n: int = 6) -> list[dict]:
    rows = [r for r in out["mla_sweep"] if str(r["heads"]) == str(heads) and r.get("ms")]
    return sorted(rows, key=lambda r: r.get("confirm_ms") or r["ms"])[:n]


def table_block(out: dict) -> str:
    """The TABLE literal: the current rows, each swept head count's replaced by its winner."""
    from cluster.engine import triton_mla_config
    rows = {h: cfg.code() for h, cfg in triton_mla_config.TABLE.items()}
    rows.update({int(h): best["code"] for h, best in out["mla_best"].items() if int(h) in rows})
    body = "".join(f"    {h}: {code},\n" for h, code in sorted(rows.items()))
    return "TABLE: dict[int, DecodeConfig] = {\n" + body + "}"


def summary(out: dict) -> str:
    lines = [f"MLA decode, batch {out['mla_batch']} x {out['mla_context']} tokens, {out['latent_mb']:.0f} MB of "
             f"latent read once at {out['copy_gb_s']:.0f} GB/s (copy) in {out['latent_read_ms']:.4f} ms:"]
    for line, heads in zip(head_lines(out), sorted(out["mla_best"], key=int)):
        lines.append(line)
        for r in fastest(out, heads):
            ms = r.get("confirm_ms") or r["ms"]
            lines.append(f"    {ms:.4f} ms {ms / out['latent_read_ms']:.2f}x  {r['config']}")
    bad = [f"{r['heads']}: {r['config']}" for r in out["mla_sweep"] if not r.get("ok") and not r.get("skipped")]
    skipped = [r for r in out["mla_sweep"] if r.get("skipped")]
    if bad:
        lines.append(f"{len(bad)} failed or wrong: " + "; ".join(bad))
    if skipped:
        lines.append(f"{len(skipped)} skipped: " + "; ".join(f"{r['heads']}: {r['config']} ({r['skipped']})"
                                                          for r in skipped))
    lines += ["TABLE rows to paste into cluster/engine/triton_mla_config.py:", table_block(out)]
    return "\n".join(lines)


def markdown(out: dict) -> str:
    """A page for the output directory: the summary, then every row per head count."""
    parts = [f"# MLA decode sweep on {out.get('device', '?')}", "", "```", summary(out), "```", ""]
    for heads in sorted({r["heads"] for r in out["mla_sweep"]}, key=int):
        parts += [f"## {heads} heads", "", "| config | ms | confirmed ms | / latent read | max abs err |",
                  "|---|---|---|---|---|"]
        for r in sorted((r for r in out["mla_sweep"] if r["heads"] == heads), key=lambda r: r.get("ms") or 1e9):
            ms = r.get("confirm_ms") or r.get("ms")
            note = r.get("error") or r.get("skipped") or ("" if r.get("ok") else "wrong")
            cells = [r.get("ms"), r.get("confirm_ms"), ms and ms / out["latent_read_ms"]]
            parts.append(f"| {r['config']} | " + " | ".join(f"{v:.4f}" if v else "" for v in cells)
                         + f" | {r.get('max_abs_err', '')} {note} |")
        parts.append("")
    return "\n".join(parts)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(summary(json.load(f)))
