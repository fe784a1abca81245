"""Two lanes for pytest-xdist (`make test`: `-n 2`), one per core: every module that declares the
`integration` mark runs on one worker, one module after another, so launched clusters never
overlap and the shared ones stay shared (cluster_pool.py); any other module runs whole on
whichever worker is free, its module fixtures set up once.

xdist's `--dist loadgroup` reads groups from suffixes it writes into node ids, which pytest 9
ignores (every test then runs alone, anywhere), so conftest hands xdist this scheduler instead.
The controller sees node ids only: a module's lane comes from its source declaring the mark, and
each worker checks that against the marks it collected (`check_lanes`)."""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

INTEGRATION = "integration"
DECLARES_INTEGRATION = re.compile(r"pytest\.mark\.integration\b")


def lane_threads() -> int:
    """Torch threads for a test that wants the cores: one per lane under xdist (the other lane keeps
    the second core busy, and an OpenMP thread waiting for it made a forward 6x slower on a loaded
    2-core box), two in a plain run."""
    return 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@functools.lru_cache(maxsize=None)
def lane_of(module_path: str) -> str:
    """INTEGRATION for a module whose source carries the mark, else the module itself."""
    return INTEGRATION if DECLARES_INTEGRATION.search(Path(module_path).read_text()) else module_path


def check_lanes(items: list) -> None:
    """Every test marked `integration` lies in the integration lane (a mark set some other way,
    by a hook or a fixture, would let its clusters run beside another lane's)."""
    for item in items:
        if item.get_closest_marker("integration") and lane_of(str(item.path)) != INTEGRATION:
            raise RuntimeError(f"{item.nodeid} is marked integration, but its module's source does not "
                               "say `pytest.mark.integration` (tests/xdist_lanes.py)")


def lane_scheduler(config, log):
    """For xdist's load modes (`-n 2` alone is `--dist load`); None leaves `each` and `worksteal` to it."""
    if not config.getvalue("dist").startswith("load"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class LaneScheduling(LoadScopeScheduling):
        """xdist's per-module scheduling with the integration modules as one unit; the largest
        unit goes out first, so the integration lane starts at once."""

        def _split_scope(self, nodeid: str) -> str:
            return lane_of(str(config.rootpath / nodeid.split("::", 1)[0]))

    return LaneScheduling(config, log)
