"""The in-process handoff tests that move or reshape a request's KV pages, run again on latent
pages: a tiny DeepSeek-V2 (MoE + MLA) checkpoint made here with transformers. Retraction frees
latent pages and prefills again (the expanded form) what decode had (the absorbed form) built;
n > 1 siblings fork latent pages, shared by the prefix cache or copied, and the transfer moves
one prompt's latent once."""
import pytest

from tests.moe_checkpoints import DEFAULT_VOCAB, save_tiny
from tests.test_handoff_inprocess import (  # noqa: F401  (collected here, on this module's `loaded`)
    test_disaggregated_greedy_equals_unified, test_n_siblings_fork_from_one_prefill_and_match_their_own_runs,
    test_small_decode_pool_retracts_and_every_request_completes)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    import torch
    from cluster.engine.loader import load_model
    from tests.xdist_lanes import lane_threads
    torch.set_num_threads(lane_threads())
    path = tmp_path_factory.mktemp("deepseek_v2")
    save_tiny(path, "deepseek_v2", vocab_size=DEFAULT_VOCAB)
    model = load_model("tiny-deepseek-v2", path=str(path))
    assert model.config.mla is not None
    return model
