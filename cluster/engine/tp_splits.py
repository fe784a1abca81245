"""The launch-time check that every tensor-parallel group's model splits over its ranks (its own
module: it reads the model's metadata and `TpLayout`, which import torch, and does so only when a
group has tp > 1, so `pdcluster launch` of a cluster without tensor parallelism never loads torch)."""
from __future__ import annotations

from cluster.config_fields import ConfigError
from cluster.engine.model_files import model_config


def check_tp_splits(config) -> None:
    """ConfigError naming the group and the numbers when the model of a group with tp > 1 cannot
    split over its ranks; at `pdcluster launch` and worker start, so a bad split never becomes a
    worker restart loop. Reads only the model's metadata."""
    for key, g in config.group_keys():
        if g.tp > 1:
            from cluster.engine.parallel import TpLayout
            m = config.model
            try:
                TpLayout(model_config(m.name, g.path or m.path, m.load_format), g.tp)
            except ConfigError as e:
                raise ConfigError(config.source, f"{key}.tp", e.reason) from None
