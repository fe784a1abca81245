"""The DLLM worker: `python -m dllm --config C --worker-id dllm-0 --router EP`.

Registers with `model` = the group's served name (e.g. `smollm2-135m-instruct-dllm`); the
weights are the group's `path`, else `[model]`'s. The engine's loader reads LLaDA / SDAR
checkpoints itself (`cluster/engine/llada_layout.py`, `sdar_layout.py`).
"""
from __future__ import annotations

import sys

from cluster.roles import served_model
from dllm.model_spec import detect_spec


def build(args, config, group, runner, control):
    """A group that prefills remotely gets a data plane (`KvHandoff`) to take the prompts' KV on."""
    from dllm.scheduler import DllmScheduler
    spec = detect_spec(group.path or config.model.path, runner.tokenizer, runner.tokenizer.eos_token_ids,
                       group.mask_token_id)
    register = {"model": served_model(config, group)}
    handoff = None
    if group.prefill != "local":
        from cluster.runtime.kv_handoff import KvHandoff
        from cluster.runtime.worker_main import kv_ranks
        handoff = KvHandoff.open(args.worker_id, runner.kv_pool, config.kv_transfer, bind_host=args.data_host,
                                 curve=args.curve, arrivals=control.arrivals, fence=runner.import_fence,
                                 ranks=kv_ranks(runner, config, args.curve))
        register["data_addr"] = handoff.address
    scheduler = DllmScheduler(group.scheduler, args.worker_id, runner, control, spec, group.dllm,
                              handoff=handoff, timeouts=config.timeouts)
    return scheduler, register


def main(argv=None) -> int:
    from cluster.runtime.worker_main import run_worker
    return run_worker("dllm", argv, build)


if __name__ == "__main__":
    sys.exit(main())
