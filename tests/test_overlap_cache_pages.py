"""Under overlap a batch is scheduled while the one before it still runs: the prefix cache
must never take a page that a forward still in flight writes. A forward here runs only when
its result is asked for (the slowest forward overlap allows), and every forward is checked
not to change a page the radix tree held when it started."""
import random

import pytest
import torch

from cluster.config import SchedulerConfig
from cluster.engine.loader import load_model
from cluster.engine.model_runner import ModelRunner
from cluster.unified import UnifiedScheduler
from tests.inprocess_workers import drain, serve
from tests.queue_control import QueueControl

MAX_TOKENS = 8


class Deferred:
    """A forward that runs when its result is first asked for; forwards still run in launch
    order, since the overlap loop processes batches in launch order."""

    def __init__(self, run):
        self._run, self._done, self._out = run, False, None

    def result(self, timeout=None):
        if not self._done:
            self._out, self._done = self._run(), True
        return self._out


def unified(loaded, num_pages: int, overlap: bool = True) -> UnifiedScheduler:
    runner = ModelRunner(loaded, num_pages, 16, device="cpu", dtype=torch.float32)
    s = UnifiedScheduler(SchedulerConfig(overlap=overlap), "unified-0", runner, QueueControl())
    s.tree_page_writes = []
    if overlap:
        ex, kv = s.executor, runner.kv_pool.kv
        ex.submit = lambda it, fi: Deferred(lambda: ex._run(it, fi, 0.0))
        forward = ex.forward_fn

        def checked(fi):
            pages = s.cache.tree.pages()
            before = kv[:, :, :, pages].clone()
            out = forward(fi)
            s.tree_page_writes += [p for j, p in enumerate(pages) if not torch.equal(before[:, :, :, j], kv[:, :, :, p])]
            return out
        ex.forward_fn = checked
    s.enable_prefix_cache()
    return s


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model("tiny", tiny_llama_dir, load_format="dummy")


def test_a_request_retracted_while_its_prefill_runs_gives_the_prefix_cache_no_page_being_written(tiny):
    """X (15 tokens) decodes; R (32 tokens, two whole pages) is prefilled in the step where X's
    next decode crosses into a new page; that decode is one page short, and R, the newest row,
    is retracted while its prefill is still in flight."""
    rng = random.Random(0)
    x, r = [rng.randrange(3, 200) for _ in range(15)], [rng.randrange(3, 200) for _ in range(32)]
    ref = serve(unified(tiny, 256, overlap=False), [x, r], "q")
    s = unified(tiny, 4)
    ctl, last = s.control, None
    ctl.generate("q0", x, max_tokens=MAX_TOKENS, ignore_eos=True)
    for _ in range(2):                      # X prefilled, then its first decode launched
        last = s.overlap_step(last)
    ctl.generate("q1", r, max_tokens=MAX_TOKENS, ignore_eos=True)
    drain([s], [last], lambda: len(ctl.finished()) == 2)
    assert s.decode.num_retracted_total == 1 and ctl.errors() == []
    assert s.tree_page_writes == []
    assert ctl.outputs() == ref
