"""How far tensor-parallel float32 logits are from tp=1's on the CPU, and where the difference comes
from (BENCHMARKS.md, "Tensor parallelism: tp=3 logits against tp=1").

    python -m benchmarks.tp_logits [--ranks]

Per operation, on one prompt of the default model (float32 weights, one thread): whether each
column-parallel matmul's slice (q/k/v, gate/up, vocabulary head) is bitwise the full matmul's, and
how far the row-parallel sums of three partials (o, down) are from the full matmul, in float32 eps
times the output's largest value. Then the logits of the reference prompts against tp=1's: tp=1
batched with the other prompts, a split of the row-parallel sums in process (every layer, or only
three of them), and with `--ranks` the real three gloo ranks.
The float64 variants in BENCHMARKS.md were measured with `--ranks` on a patched model (not kept).
"""
from __future__ import annotations

import argparse
import pathlib
import tempfile

import torch

import cluster.engine.model as model_mod
import cluster.engine.moe as moe_mod
from cluster.engine.forward_batch import ForwardInput
from cluster.engine.llm import LLM
from cluster.engine.parallel import TpLayout
from tests.engine_fixtures import GREEDY, prefill_input
from tests.test_engine_reference import CHATS, PLAIN

TP = 3
ROW_PARALLEL = ("o_proj.weight", "down_proj.weight")


class SplitSums:
    """`linear` with the row-parallel matmuls of the chosen layers as three partial sums, in rank order."""

    def __init__(self, model, layers=None):
        self.linear, self.layers = model_mod.linear, layers
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.layouts = [TpLayout(model.config, TP, r) for r in range(TP)]

    def __call__(self, x, w, b=None):
        name = self.names.get(id(w), "")
        if not name.endswith(ROW_PARALLEL) or (self.layers is not None and int(name.split(".")[1]) not in self.layers):
            return self.linear(x, w, b)
        k = x.shape[1] // TP
        parts = [self.linear(x[:, r * k:(r + 1) * k].contiguous(), self.layouts[r].shard(name, w).contiguous())
                 for r in range(TP)]
        return (parts[0] + parts[1]) + parts[2]


def prompt_logits(llm, prompts) -> list[torch.Tensor]:
    r, out = llm.runner, []
    for ids in prompts:
        pages = r.page_allocator.allocate(r.kv_pool.pages_for(len(ids)))
        out.append(r.forward(prefill_input(ids, pages, return_logits=True)).logits.clone())
        r.page_allocator.free(pages)
    return out


def max_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def per_op(llm, ids) -> None:
    model, calls = llm.loaded.model, []
    names = {id(p): n for n, p in model.named_parameters()}
    layouts = [TpLayout(model.config, TP, r) for r in range(TP)]

    def recording(x, w, b=None):
        calls.append((x.clone(), w))
        return linear_orig(x, w, b)
    model_mod.linear = moe_mod.linear = recording
    prompt_logits(llm, [ids])
    model_mod.linear = moe_mod.linear = linear_orig
    worst: dict[str, float] = {}
    for x, w in calls:
        name = names[id(w)]
        kind = name.split(".")[-2]
        full = linear_orig(x, w)
        if name.endswith(ROW_PARALLEL):
            key = kind + " (max |split sum - full| / (eps * max |out|))"
            ulp = torch.finfo(torch.float32).eps * float(full.abs().max())
            worst[key] = max(worst.get(key, 0.0), float((SplitSums(model)(x, w) - full).abs().max()) / ulp)
            continue
        head = "lm_head.weight" if kind == "embed_tokens" else name
        same = all(torch.equal(linear_orig(x, layouts[r].shard(head, w)),
                               layouts[r].shard(head, full.T.contiguous()).T[:, :full.shape[1]]) for r in range(TP))
        key = kind + " (each rank's slice bitwise equal to the full matmul's)"
        worst[key] = worst.get(key, True) and same
    for k, v in worst.items():
        print(f"  {k}: {v if isinstance(v, bool) else round(v, 2)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", action="store_true", help="also run the three gloo ranks (about a minute)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    llm = LLM(num_pages=256, cpu_weights="float32")
    prompts = [llm.tokenizer.encode(p) if isinstance(p, str) else p
               for p in PLAIN + [llm.tokenizer.apply_chat_template(c) for c in CHATS]]
    print("per operation, prompt 0:")
    per_op(llm, prompts[0])
    ref = prompt_logits(llm, prompts)
    r = llm.runner
    tables = [r.page_allocator.allocate(r.kv_pool.pages_for(len(ids))) for ids in prompts]
    batched = r.forward(ForwardInput(
        input_ids=torch.tensor([t for ids in prompts for t in ids]), extend_lens=[len(i) for i in prompts],
        prefix_lens=[0] * len(prompts), page_tables=tables, sample=[True] * len(prompts),
        sampling=[GREEDY] * len(prompts), return_logits=True)).logits.split([len(i) for i in prompts])
    for t in tables:
        r.page_allocator.free(t)
    print(f"max |logit| {max(float(x.abs().max()) for x in ref):.3g}; max |difference| against tp=1 alone:")
    print(f"  tp=1, batched with the other prompts: {max_diff(batched, ref):.3g}")
    for label, layers in (("every layer", None), ("layers 0-2 only", range(3)), ("layers 27-29 only", range(27, 30))):
        model_mod.linear = moe_mod.linear = SplitSums(llm.loaded.model, layers)
        print(f"  row-parallel sums split in three, {label}: {max_diff(prompt_logits(llm, prompts), ref):.3g}")
        model_mod.linear = moe_mod.linear = linear_orig
    if args.ranks:
        from tests.engine_tp_rank import run_greedy
        from tests.test_engine_tp import NUM_GREEDY, run_ranks
        want = run_greedy(llm, prompts, NUM_GREEDY)["logits"]
        got = run_ranks(pathlib.Path(tempfile.mkdtemp()), TP, "smollm2-135m-instruct", prompts, NUM_GREEDY)
        print(f"  tp=3, three gloo ranks: {max(float((got[0]['logits'][k] - v).abs().max()) for k, v in want.items()):.3g}")


linear_orig = model_mod.linear

if __name__ == "__main__":
    main()
