"""How far tensor-parallel float32 logits are from tp=1's on the CPU, and where the difference comes
from (BENCHMARKS.md, "Tensor parallelism: tp=3 logits against tp=1").

    python -m benchmarks.tp_logits [--ranks] [--cost]

Per operation, on one prompt of the default model (float32 weights, one thread): whether each
column-parallel matmul's slice (q/k/v, gate/up, vocabulary head) is bitwise the full matmul's, and
how far the row-parallel sums of three partials (o, down) are from the full matmul, in float32 eps
times the output's largest value. Then the logits of the reference prompts against tp=1's: tp=1
batched with the other prompts, a split of the row-parallel sums in process (every layer, or only
three of them), the same with tp_invariant on both sides (float64 sums), and with `--ranks` the
real three gloo ranks, tp_invariant off and on (each against tp=1 in the same mode). `--cost`:
tp=1 decode steps and a prefill with tp_invariant off and on, alternating, in ms.
The float64-on-tp=3-only rows in BENCHMARKS.md were measured with `--ranks` on a patched model.
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time
from contextlib import contextmanager

import torch

import cluster.engine.model as model_mod
import cluster.engine.moe as moe_mod
import cluster.engine.parallel as parallel_mod
from cluster.engine.forward_batch import ForwardInput
from cluster.engine.llm import LLM
from cluster.engine.parallel import TpLayout
from tests.engine_fixtures import GREEDY, batch_input, prefill_input
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
        k = x.shape[1] // TP   # float64 under tp_invariant, rounded by row_parallel_linear
        parts = [self.linear(x[:, r * k:(r + 1) * k].contiguous(), self.layouts[r].shard(name, w).contiguous())
                 for r in range(TP)]
        return (parts[0] + parts[1]) + parts[2]


@contextmanager
def linear_replaced(fn):
    """Every weight matmul of the model (model.py, moe.py, the row-parallel ones in parallel.py) through `fn`."""
    model_mod.linear = moe_mod.linear = parallel_mod.linear = fn
    try:
        yield
    finally:
        model_mod.linear = moe_mod.linear = parallel_mod.linear = linear_orig


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
    with linear_replaced(recording):
        prompt_logits(llm, [ids])
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
    ap.add_argument("--ranks", action="store_true", help="also run the three gloo ranks (about two minutes)")
    ap.add_argument("--cost", action="store_true", help="also time tp=1 forwards, tp_invariant off and on")
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
        with linear_replaced(SplitSums(llm.loaded.model, layers)):
            print(f"  row-parallel sums split in three, {label}: {max_diff(prompt_logits(llm, prompts), ref):.3g}")
    llm.loaded.model.set_tp_invariant(True)
    ref_invariant = prompt_logits(llm, prompts)
    with linear_replaced(SplitSums(llm.loaded.model)):
        split = prompt_logits(llm, prompts)
    llm.loaded.model.set_tp_invariant(False)
    print(f"  tp_invariant on both sides, row-parallel sums split in three, every layer: "
          f"{max_diff(split, ref_invariant):.3g} (tp_invariant against off, tp=1: {max_diff(ref_invariant, ref):.3g})")
    if args.ranks:
        ranks(llm, prompts)
    if args.cost:
        step_cost(llm, prompts[0])


def ranks(llm, prompts) -> None:
    from tests.engine_tp_rank import run_greedy
    from tests.test_engine_tp import NUM_GREEDY, run_ranks
    modes = {False: NUM_GREEDY, True: NUM_GREEDY}
    want = {mode: run_greedy(llm, prompts, n, mode) for mode, n in modes.items()}
    llm.loaded.model.set_tp_invariant(False)
    got = run_ranks(pathlib.Path(tempfile.mkdtemp()), TP, "smollm2-135m-instruct", prompts, modes)
    for mode, results in got.items():
        diff = max(float((r["logits"][k] - v).abs().max()) for r in results for k, v in want[mode]["logits"].items())
        same = all(r["tokens"] == want[mode]["tokens"] for r in results)
        print(f"  tp=3, three gloo ranks, tp_invariant {'on' if mode else 'off'}: {diff:.3g} "
              f"({NUM_GREEDY} greedy tokens {'equal' if same else 'DIFFER'})")


def step_cost(llm, ids, context: int = 64, rounds: int = 5) -> None:
    """ms per tp=1 forward (one thread), tp_invariant off and on alternating: decode steps of 1 and
    8 requests at `context` tokens (each decodes the same position again, so every step is alike)
    and a prefill of 2 x `context` tokens."""
    r, model = llm.runner, llm.loaded.model
    ids = (ids * 2 * context)[:2 * context]
    print(f"tp=1 forward, one thread: ms, median of {rounds} rounds (off / on alternating)")
    for label, batch, steps in ((f"decode, batch 1, {context} tokens of context", 1, 20),
                                (f"decode, batch 8, {context} tokens of context", 8, 10),
                                (f"prefill of {2 * context} tokens", 1, 2)):
        tables = [r.page_allocator.allocate(r.kv_pool.pages_for(2 * context)) for _ in range(batch)]
        if label.startswith("prefill"):
            fi = prefill_input(ids, tables[0])
        else:
            for t in tables:
                r.forward(prefill_input(ids[:context], t))
            fi = batch_input([[ids[context]]] * batch, [context] * batch, tables, is_decode=True)
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(rounds):
            for mode in ((False, True) if i % 2 == 0 else (True, False)):
                model.set_tp_invariant(mode)
                r.forward(fi)   # warm
                t0 = time.perf_counter()
                for _ in range(steps):
                    r.forward(fi)
                times[mode].append((time.perf_counter() - t0) / steps * 1e3)
        model.set_tp_invariant(False)
        for t in tables:
            r.page_allocator.free(t)
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"  {label}: off {off:.1f}, on {on:.1f} ms ({on / off:.2f}x); "
              f"rounds off {[round(x, 1) for x in times[False]]}, on {[round(x, 1) for x in times[True]]}")


linear_orig = model_mod.linear

if __name__ == "__main__":
    main()
