"""The launch-time check that every tensor-parallel group's model splits over its ranks (its own
module: it reads the loader, which imports the model, which imports parallel)."""
from __future__ import annotations

from cluster.config_fields import ConfigError
from cluster.engine.loader import model_config
from cluster.engine.parallel import TpLayout


def check_tp_splits(config) -> None:
    """ConfigError naming the group and the numbers when the model of a group with tp > 1 cannot
    split over its ranks; at `pdcluster launch` and worker start, so a bad split never becomes a
    worker restart loop. Reads only the model's metadata."""
    for key, g in config.group_keys():
        if g.tp > 1:
            m = config.model
            try:
                TpLayout(model_config(m.name, g.path or m.path, m.load_format), g.tp)
            except ConfigError as e:
                raise ConfigError(config.source, f"{key}.tp", e.reason) from None
