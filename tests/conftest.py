"""Fixtures shared by the test modules: launched clusters shared by several modules
(tests/cluster_pool.py), the router tests' real router with scripted workers
(tests/router_harness.py), the engine tests' single intra-op thread and tiny dummy Llama, and
the default model loaded once per module for the in-process worker tests."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

# Hypothesis times itself too: no per-example deadline and no too_slow health check anywhere, so a
# loaded 2-core CI machine never fails a property that holds (each module's @settings keeps its counts)
settings.register_profile("loaded-ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("loaded-ci")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist: the integration tests in one lane, other modules whole (xdist_lanes.py)."""
    from tests.xdist_lanes import lane_scheduler
    return lane_scheduler(config, log)


@pytest.fixture(scope="session", autouse=True)
def lane_torch_threads():
    """Under xdist, one torch thread per lane unless a test asks for more (torch's default is a
    thread per core, and each lane has one)."""
    from tests.xdist_lanes import lane_threads
    if lane_threads() == 1:
        import torch
        torch.set_num_threads(1)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    from tests.cluster_pool import group_by_shared_cluster
    from tests.xdist_lanes import check_lanes
    check_lanes(items)
    items[:] = group_by_shared_cluster(items)


@pytest.fixture(scope="session")
def cluster_pool():
    from tests.cluster_pool import ClusterPool
    pool = ClusterPool()
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def shared_cluster(request, cluster_pool):
    """The launched cluster named by the module's `shared_cluster` marker (tests/cluster_pool.py),
    stopped after the last module that uses it: SIGTERM must leave no process behind."""
    from tests.cluster_pool import is_last_user
    key = request.node.get_closest_marker("shared_cluster").args[0]
    yield cluster_pool.get(key)
    if is_last_user(request.session.items, request.module, key):
        left = cluster_pool.release(key)
        assert left == [], f"shared cluster {key!r}: processes still alive after SIGTERM: {left}"


@pytest.fixture(scope="session")
def tokenizers():
    """Tokenizer cache shared by every in-process router of the session, loaded once here: a
    load takes up to seconds, longer than a request's timeout on a busy machine."""
    from cluster.engine.model_files import load_tokenizer
    return {"": load_tokenizer()}


@pytest.fixture
def make_router(tokenizers, request):
    """make(**sections) -> a RunningRouter with those config sections replaced; its
    `worker(...)` adds a ScriptedWorker. All are closed after the test. A module that sets
    `ROUTER_FRONTEND = True` gets routers that serve HTTP through a front-end process's code."""
    from tests.router_harness import RunningRouter, ScriptedWorker
    routers, workers = [], []
    frontend = getattr(request.module, "ROUTER_FRONTEND", False)

    def make(**sections):
        r = RunningRouter(tokenizers, frontend=frontend, **sections)
        routers.append(r)
        r.worker = lambda *a, **k: workers.append(ScriptedWorker(r.control, *a, **k)) or workers[-1]
        return r
    yield make
    for w in workers:
        w.close()
    for r in routers:
        r.close()


@pytest.fixture
def router(make_router):
    return make_router()


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: on a shared 2-core box, a second OpenMP thread waits for a busy core at every
    parallel region and makes small ops 100x slower. Restored after the module."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A directory holding only the config.json of engine_fixtures.TINY_LLAMA: load it with
    `load_format="dummy"` for seeded random weights."""
    import json
    from tests.engine_fixtures import TINY_LLAMA
    d = tmp_path_factory.mktemp("tiny-llama")
    (d / "config.json").write_text(json.dumps(TINY_LLAMA))
    return str(d)


@pytest.fixture(scope="module")
def loaded():
    """The default model (SmolLM2-135M-Instruct), loaded once per module, two torch threads (one per
    xdist lane); float32 weights, because these tests compare runs that batch or split the same
    requests differently token for token (native weights' bfloat16 activations are not batch-invariant)."""
    import torch
    from cluster.engine.loader import load_model
    from tests.xdist_lanes import lane_threads
    torch.set_num_threads(lane_threads())
    return load_model(cpu_weights="float32")
