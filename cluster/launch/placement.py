"""GPU placement: which GPU each worker runs on (`gpus = [..]` per worker group).

A group's workers are dealt its GPUs round-robin (worker k gets `gpus[k % len(gpus)]`); a
worker of `tp` tensor-parallel ranks takes `tp` consecutive ones (worker k gets
`gpus[k * tp:(k + 1) * tp]`, its rank r on the r-th; the list must hold `count x tp`). A
GPU may run several workers, of one group or several, only when every group involved says
`share_gpus = true`: two workers on one GPU compete for its memory and its compute, which
is what disaggregation is meant to avoid. Indices are the host's (as `nvidia-smi` numbers
them, or as the launcher's own CUDA_VISIBLE_DEVICES lists them).

`worker_env` gives a worker CUDA_VISIBLE_DEVICES with its own GPUs first, so `cuda` means
its (rank 0's) GPU, followed by the cluster's other GPUs: CUDA IPC and NCCL peer copies need the peer
GPU visible to the process. A worker started by hand takes `--gpus` for the same effect.
"""
from __future__ import annotations

from typing import Optional

from cluster.config_fields import ConfigError


def place_gpus(cfg, num_gpus: Optional[int] = None) -> dict[str, tuple[int, ...]]:
    """worker id -> its GPU indices (one per rank), for workers of groups with `gpus`; ConfigError on a GPU that does
    not exist (when `num_gpus` is known) or is shared without `share_gpus`. `cfg` is a
    ClusterConfig, which calls this to check itself (so this module does not import it back)."""
    placed: dict[str, int] = {}
    sharing: dict[int, list[tuple[str, bool]]] = {}
    by_group: dict[int, list[str]] = {}
    for wid, g in cfg.worker_ids():
        by_group.setdefault(id(g), []).append(wid)
    for table, g in cfg.group_keys():
        key = f"{table}.gpus"
        if not g.gpus:
            continue
        if cfg.model.device == "cpu":
            raise ConfigError(cfg.source, key, "GPUs need model.device = \"cuda\"")
        for gpu in g.gpus:
            if gpu < 0:
                raise ConfigError(cfg.source, key, f"GPU {gpu} is not an index")
            if num_gpus is not None and gpu >= num_gpus:
                raise ConfigError(cfg.source, key, f"GPU {gpu} does not exist: this host has "
                                  f"{num_gpus} GPU(s) (0..{num_gpus - 1})" if num_gpus else
                                  f"GPU {gpu} does not exist: this host has no GPU")
        if len(set(g.gpus)) != len(g.gpus):
            raise ConfigError(cfg.source, key, f"{list(g.gpus)} names a GPU twice")
        for k, wid in enumerate(by_group.get(id(g), [])):
            own = g.gpus[k * g.tp:(k + 1) * g.tp] if g.tp > 1 else (g.gpus[k % len(g.gpus)],)
            placed[wid] = own
            for gpu in own:
                sharing.setdefault(gpu, []).append((wid, g.share_gpus))
    for gpu, users in sorted(sharing.items()):
        if len(users) > 1 and not all(share for _, share in users):
            names = ", ".join(w for w, _ in users)
            raise ConfigError(cfg.source, "gpus", f"GPU {gpu} would run {names}: set share_gpus = true "
                              "in their groups to allow it, or give each worker its own GPU")
    return placed


def cuda_visible_devices(own: tuple[int, ...], cluster_gpus) -> str:
    """The worker's GPUs first, in rank order (rank r's becomes `cuda:r`), then the cluster's other GPUs."""
    return ",".join(str(g) for g in [*own] + sorted(set(cluster_gpus) - set(own)))


def host_gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:        # no CUDA build, no driver
        return 0
