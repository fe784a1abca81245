"""Ray backend placement, without Ray: one bundle per worker, sized so that the workers of a
config fit the Ray cluster's CPUs, one GPU per worker when the model runs on CUDA."""
from cluster.config import config_from_dict
from cluster.launch.ray_backend import bundle


def test_bundles_share_the_cpus_and_never_overcommit_them():
    cfg = config_from_dict({"prefill": [{"count": 1}], "decode": [{"count": 1}],
                            "dllm": [{"count": 1, "model": "m-dllm"}]})
    bundles = [bundle(cfg, wid, total_cpus=2.0) for wid, _ in cfg.worker_ids()]
    assert len(bundles) == 3 and all("GPU" not in b for b in bundles)
    assert sum(b["CPU"] for b in bundles) <= 2.0 and min(b["CPU"] for b in bundles) > 0.6


def test_threads_set_a_workers_cpus_and_cuda_asks_one_gpu_each():
    cfg = config_from_dict({"model": {"device": "cuda", "dtype": "bfloat16"},
                            "prefill": [{"count": 1, "threads": 4, "gpus": [0]}],
                            "decode": [{"count": 2, "gpus": [1, 2]}]})
    bundles = {wid: bundle(cfg, wid, total_cpus=12.0) for wid, _ in cfg.worker_ids()}
    assert bundles["prefill-0"] == {"CPU": 4.0, "GPU": 1}
    assert bundles["decode-0"] == bundles["decode-1"] == {"CPU": 4.0, "GPU": 1}


def test_a_tensor_parallel_worker_is_one_bundle_with_a_gpu_per_rank():
    cfg = config_from_dict({"model": {"device": "cuda", "dtype": "bfloat16"},
                            "unified": [{"count": 2, "tp": 2, "gpus": [0, 1, 2, 3]}]})
    assert [bundle(cfg, wid, total_cpus=8.0)["GPU"] for wid, _ in cfg.worker_ids()] == [2, 2]


def test_default_threads_share_the_cores_among_every_rank(monkeypatch):
    from cluster.roles import threads_per_worker
    monkeypatch.setattr("os.cpu_count", lambda: 12)
    cfg = config_from_dict({"unified": [{"count": 1, "tp": 3}], "dllm": [{"count": 1, "model": "m-dllm"}]})
    assert [threads_per_worker(cfg, wid, env={}) for wid, _ in cfg.worker_ids()] == [3, 3]
