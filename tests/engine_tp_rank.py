"""One tensor-parallel rank of tests/test_engine_tp.py: `python -m tests.engine_tp_rank RANK ARGS_JSON`
joins the ranks, runs greedy generation and prompt logits in each numerics mode asked for (`modes`:
tp_invariant off and/or on, the model switched in place), and writes its results under `out_dir`."""
from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import save_file

from cluster.engine.llm import LLM
from cluster.sampling_params import SamplingParams
from tests.engine_fixtures import prefill_input


def run_greedy(llm: LLM, prompts: list, num_tokens: int, tp_invariant: bool = False) -> dict:
    """Greedy token ids and text, every prompt row's logits, and the KV pool's heads and bytes;
    `tp_invariant`: with the row-parallel sums in float64 (`LlamaModel.set_tp_invariant`)."""
    llm.loaded.model.set_tp_invariant(tp_invariant)
    sp = SamplingParams(max_tokens=num_tokens, min_tokens=num_tokens)
    outs = llm.generate(prompts, sp)
    runner, logits = llm.runner, {}
    for i, ids in enumerate(o.prompt_token_ids for o in outs):
        pages = runner.page_allocator.allocate(runner.kv_pool.pages_for(len(ids)))
        logits[f"p{i}"] = runner.forward(prefill_input(ids, pages, return_logits=True)).logits.contiguous()
        runner.page_allocator.free(pages)
    return {"tokens": [o.token_ids for o in outs], "text": [o.text for o in outs], "logits": logits,
            "kv_heads": runner.kv_pool.num_kv_heads, "kv_bytes": runner.kv_pool.num_bytes}


def main(rank: int, args: dict) -> None:
    from cluster.engine.parallel import close_tp, init_tp
    torch.set_num_threads(1)
    out_dir = args["out_dir"]
    tp = init_tp(rank, args["size"], f"file://{out_dir}/rendezvous")
    try:
        llm = LLM(model=args["model"], num_pages=args["num_pages"], tp=tp, cpu_weights="float32")
        for mode, num_tokens in args["modes"]:
            result = run_greedy(llm, args["prompts"], num_tokens, mode)
            save_file(result.pop("logits"), f"{out_dir}/logits{rank}_{mode}.safetensors")
            with open(f"{out_dir}/rank{rank}_{mode}.json", "w") as f:
                json.dump(result, f)
    finally:
        close_tp(tp)


if __name__ == "__main__":
    main(int(sys.argv[1]), json.loads(sys.argv[2]))
