"""GPU placement: groups deal their GPUs round-robin, sharing a GPU needs `share_gpus`, a GPU
that does not exist is a ConfigError naming it, and each worker sees its own GPU first."""
import pytest

from cluster.config import ConfigError, config_from_dict
from cluster.launch.placement import cuda_visible_devices, place_gpus


def cfg(prefill: dict, decode: dict, device: str = "cuda"):
    return config_from_dict({"model": {"device": device, "dtype": "bfloat16"},
                             "prefill": [prefill], "decode": [decode]}, "c.toml")


def test_groups_deal_their_gpus_round_robin():
    c = cfg({"count": 4, "gpus": [0, 1], "share_gpus": True}, {"gpus": [2]})
    assert place_gpus(c, num_gpus=3) == {"prefill-0": (0,), "prefill-1": (1,), "prefill-2": (0,),
                                         "prefill-3": (1,), "decode-0": (2,)}


def test_tensor_parallel_workers_take_tp_consecutive_gpus():
    c = config_from_dict({"model": {"device": "cuda"}, "unified": [{"count": 2, "tp": 2, "gpus": [0, 1, 2, 3]},
                                                                  {"gpus": [4]}]}, "c.toml")
    assert place_gpus(c, num_gpus=5) == {"unified-0": (0, 1), "unified-1": (2, 3), "unified-2": (4,)}
    assert cuda_visible_devices((2, 3), [0, 1, 2, 3, 4]) == "2,3,0,1,4"
    with pytest.raises(ConfigError, match=r"unified\[0\]\.gpus: 3 GPU\(s\) for 2 worker\(s\) x tp=2: needs 4"):
        config_from_dict({"model": {"device": "cuda"}, "unified": [{"count": 2, "tp": 2, "gpus": [0, 1, 2]}]})


def test_a_gpu_that_does_not_exist_names_it():
    c = cfg({"gpus": [0]}, {"gpus": [3]})
    with pytest.raises(ConfigError, match=r"decode\[0\]\.gpus: GPU 3 does not exist: this host has 2 GPU"):
        place_gpus(c, num_gpus=2)
    with pytest.raises(ConfigError, match="GPU 0 does not exist: this host has no GPU"):
        place_gpus(c, num_gpus=0)


def test_sharing_a_gpu_needs_share_gpus_in_every_group_involved():
    with pytest.raises(ConfigError, match="GPU 0 would run prefill-0, decode-0: set share_gpus"):
        cfg({"gpus": [0]}, {"gpus": [0]})
    with pytest.raises(ConfigError, match="GPU 0 would run prefill-0, prefill-2"):
        cfg({"count": 4, "gpus": [0, 1]}, {"gpus": [2]})
    with pytest.raises(ConfigError, match="GPU 0 would run"):
        cfg({"gpus": [0], "share_gpus": True}, {"gpus": [0]})
    shared = cfg({"gpus": [0], "share_gpus": True}, {"gpus": [0], "share_gpus": True})
    assert place_gpus(shared, 1) == {"prefill-0": (0,), "decode-0": (0,)}


def test_bad_gpu_lists_fail_at_load():
    with pytest.raises(ConfigError, match=r"prefill\[0\]\.gpus: expected list of int"):
        cfg({"gpus": "0"}, {})
    with pytest.raises(ConfigError, match="names a GPU twice"):
        cfg({"gpus": [1, 1], "share_gpus": True}, {})
    with pytest.raises(ConfigError, match="GPU -1 is not an index"):
        cfg({"gpus": [-1]}, {})
    with pytest.raises(ConfigError, match='GPUs need model.device = "cuda"'):
        cfg({"gpus": [0]}, {"gpus": [1]}, device="cpu")


def test_kv_transfer_keys_are_checked():
    base = {"prefill": [{}], "decode": [{}]}
    assert config_from_dict(base).kv_transfer.backend == "auto"
    with pytest.raises(ConfigError, match="kv_transfer.backend: 'rdma' is not one of"):
        config_from_dict({**base, "kv_transfer": {"backend": "rdma"}})
    assert config_from_dict({**base, "kv_transfer": {"layerwise": True}}).kv_transfer.layerwise is True
    assert config_from_dict(base).kv_transfer.layerwise == "auto"
    with pytest.raises(ConfigError, match="kv_transfer.layerwise: 'yes' is not one of true, false"):
        config_from_dict({**base, "kv_transfer": {"layerwise": "yes"}})
    with pytest.raises(ConfigError, match="kv_transfer.layerwise: expected true, false or a string"):
        config_from_dict({**base, "kv_transfer": {"layerwise": 1}})


def test_each_worker_sees_its_own_gpu_first_then_its_peers():
    assert cuda_visible_devices((1,), [0, 1]) == "1,0"
    assert cuda_visible_devices((2,), [0, 1, 2, 2]) == "2,0,1"
