"""The MLA decode kernel's configuration: the table's row by head count, the split count sized
to the SMs from the batch shape only, and bounds checked where a config is built."""
import pytest
import torch

from cluster.engine.triton_mla_config import TABLE, DecodeConfig, decode_config


def test_head_count_takes_the_smallest_table_row_that_holds_it():
    assert decode_config(16, torch.bfloat16) is TABLE[16]
    assert decode_config(20, torch.bfloat16) is TABLE[32]
    assert decode_config(4, torch.float16) is TABLE[16]
    assert decode_config(512, torch.bfloat16) is TABLE[max(TABLE)]
    assert decode_config(16, torch.float32) == DecodeConfig()


def test_split_count_fills_about_two_programs_per_sm_unless_set():
    assert DecodeConfig().splits(64, 1, 132) == 4          # 256 programs on 132 SMs
    assert DecodeConfig(programs_per_sm=3).splits(64, 1, 132) == 6
    assert DecodeConfig(programs_per_sm=2.5).splits(64, 1, 132) == 5
    assert DecodeConfig().splits(256, 2, 132) == 1
    assert DecodeConfig().splits(1, 1, 132) == 32          # at most MAX_SPLITS
    assert DecodeConfig(num_splits=5).splits(64, 1, 132) == 5


def test_brief_names_only_what_differs_from_the_defaults():
    assert DecodeConfig().brief() == "default"
    assert DecodeConfig(num_splits=6, fused_merge=True).brief() == "num_splits=6,fused_merge=True"


@pytest.mark.parametrize("bad", [{"block_n": 48}, {"block_h": 8}, {"num_splits": 33}, {"num_stages": 0},
                                 {"tokens_major": True, "block_n": 64}])
def test_out_of_range_configs_are_refused(bad):
    with pytest.raises((AssertionError, ValueError)):
        DecodeConfig(**bad)


def test_code_is_the_python_of_a_table_row():
    cfg = DecodeConfig(programs_per_sm=2.5, block_n=16, prefetch_pages=True)
    assert eval(cfg.code(), {"DecodeConfig": DecodeConfig}) == cfg
    assert DecodeConfig().code() == "DecodeConfig()"
