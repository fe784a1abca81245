"""Process entry shared by every role: `python -m <role package> --config C --worker-id ID --router EP`."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from typing import Callable

from cluster.config import ClusterConfig, WorkerGroup
from cluster.roles import ROLE_PACKAGES, SWITCHABLE_ROLES, served_model, threads_per_worker
from cluster.startup_heap import freeze_startup_heap

logger = logging.getLogger("pdcluster.worker")


def parse_args(role: str, argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"pdcluster worker --role {role}")
    ap.add_argument("--config", required=True, help="cluster TOML config")
    ap.add_argument("--worker-id", required=True, help=f"e.g. {role}-0")
    ap.add_argument("--router", required=True, help="router control endpoint, e.g. tcp://127.0.0.1:5557")
    ap.add_argument("--log-dir", default=None, help="log to DIR/<worker-id>.log instead of stderr")
    # NOTE: loopback unless asked: `serve --host 0.0.0.0` exposes HTTP, never the KV planes
    ap.add_argument("--data-host", "--host", dest="data_host", default="127.0.0.1",
                    help="address to bind the data plane on (default: 127.0.0.1)")
    ap.add_argument("--gpus", default=None, metavar="I[,J..]",
                    help="run on these host GPUs (sets CUDA_VISIBLE_DEVICES; the first is `cuda`)")
    ap.add_argument("--tp", type=int, default=None, metavar="N",
                    help="tensor-parallel ranks (default: the group's tp); --gpus then lists N GPUs")
    ap.add_argument("--health-file", default=None,
                    help="rewrite this file every heartbeat while serving (for exec probes)")
    return ap.parse_args(argv)


def setup_logging(worker_id: str, log_dir, rank: int = 0) -> None:
    """Lines name the worker; a tensor-parallel rank other than 0 as `worker-id/rank`, in its own file."""
    handlers: list[logging.Handler]
    name, file = ((worker_id, f"{worker_id}.log") if rank == 0
                  else (f"{worker_id}/{rank}", f"{worker_id}.rank{rank}.log"))
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        handlers = [logging.FileHandler(os.path.join(log_dir, file))]
    else:
        handlers = [logging.StreamHandler(sys.stderr)]
    level = os.environ.get("PDCLUSTER_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, handlers=handlers, force=True,
                        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")


def set_threads(config: ClusterConfig, worker_id: str) -> None:
    import torch
    n = threads_per_worker(config, worker_id)
    torch.set_num_threads(n)
    logger.info("torch threads: %d", n)


def uses_shared_pool(config: ClusterConfig, role: str) -> bool:
    """A CPU prefill worker's pool (each rank's) lives in a shared segment when shm may be picked."""
    return role == "prefill" and config.model.device == "cpu" and config.kv_transfer.backend in ("shm", "auto")


def load_runner(config: ClusterConfig, group: WorkerGroup, model_path: str = "", shared_pool: bool = False,
                import_fence: bool = False, tp=None, followers=None):
    """The model and its KV pool; `shared_pool` puts the pool in a shared-memory segment
    (`runner.kv_segment`) that same-host decode workers read (kv_transfer `shm`);
    `import_fence`: its forwards wait for KV imports (`runner.import_fence`, decode). `tp`: this
    process's engine.parallel.TpGroup (its shard of the model, its heads of the pool); `followers`:
    rank 0's tp_ranks.TpFollowers, sent each forward."""
    from cluster.engine.parallel import TpGroup
    from cluster.engine.loader import DTYPES, load_model
    from cluster.engine.model_runner import ModelRunner, kv_dtype_of
    m, s = config.model, group.scheduler
    loaded = load_model(name=m.name, path=model_path or m.path, load_format=m.load_format,
                        dtype=m.dtype, device=m.device, cpu_weights=m.cpu_weights, tp=tp or TpGroup(),
                        tp_invariant=m.tp_invariant)
    storage = segment = None
    if shared_pool:
        from cluster.kv_transfer.shm_backend import shared_pool_storage
        planes, kv_heads, kv_dim = loaded.model.layout.kv_cache_shape
        storage, segment = shared_pool_storage(
            (loaded.config.num_layers, planes, kv_heads, s.num_pages, s.page_size, kv_dim),
            kv_dtype_of(loaded, m.kv_dtype, DTYPES[m.dtype]))
    # decode batches never exceed the running set: CUDA graphs up to that size only
    fence = None
    if import_fence:
        import torch
        from cluster.kv_transfer import ImportFence
        fence = ImportFence(torch.device(m.device))
    return ModelRunner(loaded, num_pages=s.num_pages, page_size=s.page_size, device=m.device,
                       dtype=m.dtype, kv_storage=storage, kv_segment=segment, import_fence=fence,
                       max_decode_batch=s.max_running_requests, followers=followers, kv_dtype=m.kv_dtype)


def run_worker(role: str, argv, build: Callable) -> int:
    """Load config and model, connect, register, then run the scheduler loop until stopped.

    `build(args, config, group, runner, control) -> (scheduler, register_kwargs)`.
    """
    args = parse_args(role, argv)       # NOTE: before the imports below: `--help` needs no torch
    from cluster.config import load_config
    from cluster.wire.curve import endpoint_host, keys_for
    from cluster.wire.transport import ControlClient
    from cluster.runtime.router_link import RouterLink
    from cluster.runtime.worker_scheduler import start_heartbeat
    from cluster.runtime.omp_team import load_off_main_thread

    if args.gpus:                       # before anything initializes CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus
    setup_logging(args.worker_id, args.log_dir)
    config = load_config(args.config)
    group = config.group_of(args.worker_id)
    if group.role != role:
        raise SystemExit(f"{args.config}: {args.worker_id} is a {group.role} worker, not {role}")
    set_threads(config, args.worker_id)
    shared_pool = uses_shared_pool(config, role)
    followers, tp = start_ranks(args, config, group)
    # NOTE: every role that may switch to decode gets the import fence (a no-op with no imports),
    # and so does a DLLM worker that takes prompts prefilled remotely
    takes_kv = role in SWITCHABLE_ROLES or role == "dllm" and group.prefill != "local"
    load = lambda: load_runner(config, group, group.path, shared_pool=shared_pool,  # noqa: E731
                               import_fence=takes_kv, tp=tp, followers=followers)
    # NOTE: forwards on a CPU forward thread: the load's OpenMP team must not outlive it (omp_team.py)
    forward_thread_on_cpu = group.scheduler.overlap and "cuda" not in config.model.device
    runner = load_off_main_thread(load) if forward_thread_on_cpu else load()
    if followers is not None:
        tp.barrier()   # every rank loaded: the first forward's collectives meet at once
        followers.wait_ready(config.timeouts.register)
        followers.watch()
    args.curve = keys_for(config.security, [endpoint_host(args.router), args.data_host])
    # one wake-up for every plane the worker reads (the data plane takes it from the control plane)
    control = ControlClient(args.router, args.worker_id, curve=args.curve, arrivals=threading.Event())
    stopping = []                              # a signal ends the worker, a role switch does not

    def on_signal(*_):
        stopping.append(True)
        scheduler.stop()
    scheduler = link = None
    try:
        while True:
            scheduler, register_msg = serve_role(role, build, args, config, group, runner, control)
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            if link is None:                   # NOTE: both read `scheduler` late: the current one
                link = RouterLink(control, register_msg, config.timeouts.router_lost, lambda: scheduler.stop()).start()
                if args.health_file:
                    from cluster.runtime.health_file import start_writer
                    start_writer(args.health_file, lambda: scheduler.is_running,
                                 config.timeouts.heartbeat_interval)
            link.register = register_msg
            start_heartbeat(scheduler, control, config.timeouts.heartbeat_interval)
            logger.info("%s (%s) serving; overlap=%s", args.worker_id, role, group.scheduler.overlap)
            freeze_startup_heap()              # the model, the pool and this role's scheduler are built
            scheduler.event_loop()
            if stopping or link.is_lost or scheduler.switch_to is None:
                break
            role, build = scheduler.switch_to, role_build(scheduler.switch_to)
            scheduler.cache.drop_prefix_cache()    # every page free again for the next role
            scheduler.close()
            scheduler = None
            logger.info("%s: switching to %s", args.worker_id, role)
    finally:
        if link is not None:
            link.stop()
        if scheduler is not None:
            scheduler.close()
        control.close()
        if followers is not None:
            followers.close()
    logger.info("%s stopped", args.worker_id)
    return 3 if link is not None and link.is_lost else 0


def start_ranks(args, config: ClusterConfig, group: WorkerGroup):
    """(TpFollowers, TpGroup) of a worker of several tensor-parallel ranks, this process rank 0;
    (None, TpGroup()) for one rank."""
    from cluster.engine.parallel import TpGroup, init_tp
    size, device = args.tp or group.tp, config.model.device
    if size == 1:
        return None, TpGroup()
    from cluster.engine.model_files import model_config
    from cluster.engine.parallel import TpLayout
    from cluster.runtime.tp_ranks import TpFollowers
    m = config.model
    TpLayout(model_config(m.name, group.path or m.path, m.load_format), size)   # before any rank starts
    argv = ["--config", args.config, "--worker-id", args.worker_id, "--data-host", args.data_host]
    argv += ["--log-dir", args.log_dir] if args.log_dir else []
    followers = TpFollowers(args.worker_id, size, argv)
    if "cuda" in device:
        import torch
        torch.cuda.set_device(0)
    try:
        return followers, init_tp(0, size, followers.init_method, device)
    except Exception:
        followers.close()
        raise


def serve_role(role: str, build: Callable, args, config, group, runner, control):
    """A scheduler of `role` on the loaded model, and the `register` it sent."""
    from cluster.wire import protocol as P
    scheduler, register = build(args, config, group, runner, control)
    if config.cache.prefix_cache:
        scheduler.enable_prefix_cache(config.cache.host_tier_gb)
    register_msg = P.Register(worker_id=args.worker_id, role=role, pid=os.getpid(),
                              capacity={"num_pages": group.scheduler.num_pages,
                                        "page_size": group.scheduler.page_size,
                                        "max_running_requests": group.scheduler.max_running_requests,
                                        "tp": runner.tp.size},
                              kv_fingerprint=runner.kv_fingerprint(), **register)
    control.send(register_msg)
    return scheduler, register_msg


def role_build(role: str) -> Callable:
    """The `build` of another role's package, for an in-place role switch (by name: the role
    packages import this module)."""
    name = ROLE_PACKAGES[role]
    return importlib.import_module(name if "." in name else f"{name}.__main__").build


def kv_ranks(runner, config: ClusterConfig, curve):
    """The worker's TP ranks as its KV handoff sees them (reads between TP sizes)."""
    from cluster.kv_transfer.hub import TpRanks
    return TpRanks(runner.tp.size, runner.config.kv_cache_shape[1], runner.followers,
                   config.timeouts.kv_transfer, curve)


def data_plane_build(scheduler_cls, args, config, group, runner, control, **role_args):
    """Prefill and decode workers: a scheduler plus its KV handoff (data plane and transfer hub);
    `role_args` go to the scheduler as they are."""
    from cluster.runtime.kv_handoff import KvHandoff
    handoff = KvHandoff.open(args.worker_id, runner.kv_pool, config.kv_transfer, bind_host=args.data_host,
                             curve=args.curve, arrivals=control.arrivals, segment=runner.kv_segment,
                             fence=runner.import_fence, ranks=kv_ranks(runner, config, args.curve))
    scheduler = scheduler_cls(group.scheduler, args.worker_id, runner, control, handoff, config.timeouts,
                              **role_args)
    return scheduler, {"model": served_model(config, group), "data_addr": handoff.address}
