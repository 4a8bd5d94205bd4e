"""One LightningModule per training stage; each module reads top to bottom like its algorithm.

A stage is a module in this package that defines `CONFIG` (its typed config schema, whose
`name` default is the `algo.name` that selects it) and `build(cfg, run_dir) -> (module,
datamodule)`. Stages are discovered here, so adding one needs no edit elsewhere.
"""

from __future__ import annotations

import importlib
import pkgutil

_NOT_STAGES = {"base"}


def _discover() -> dict[str, object]:
    stages = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_STAGES or info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        for schema in getattr(mod, "CONFIGS", [getattr(mod, "CONFIG", None)]):
            if schema is not None:
                stages[schema.name] = (mod, schema)
    return stages


_STAGES = _discover()
# algo.name -> the module that builds the stage (a module may define several, e.g. pg.py)
STAGES = {name: mod.__name__ for name, (mod, _) in _STAGES.items()}
ALGO_SCHEMAS = {name: schema for name, (_, schema) in _STAGES.items()}
