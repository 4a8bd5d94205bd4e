"""The typed schema of a run, registered in Hydra's ConfigStore, and start-up validation.

Each config group's files extend a schema (`defaults: [<group>_schema, _self_]` style), so a
typo (`model.n_layr=4`) or a wrong type (`model.n_layer=four`) fails while Hydra composes, and
`validate` rejects values that type-check but make no sense (`model.d_model=130 model.n_head=4`)
before anything is built, with the key, the value and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from lmforge.data.config import DATA_SCHEMAS
from lmforge.model import ModelConfig
from lmforge.trainer import StrategyConfig, TrainerConfig
from lmforge.tracking import LOGGER_SCHEMAS


class ConfigError(ValueError):
    """A configuration value that cannot work, with the key to change."""


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    data: Any = MISSING
    algo: Any = MISSING
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: Any = field(default_factory=dict)
    seed: int = 1337
    # The chosen model config's name (tiny, nano, gpt2-small, ...), for run names.
    model_name: str = "${hydra:runtime.choices.model}"
    # The run's folder; Hydra's runtime output dir unless given.
    run_dir: str = "${hydra:runtime.output_dir}"
    # Initialize the stage's model from a previous stage's checkpoint.
    init_from: Optional[str] = None
    # Resume this run: a checkpoint path, or "auto" for the newest valid one in run_dir/checkpoints.
    resume: Optional[str] = None
    # torch.compile the model (first steps are slower while it compiles).
    compile: bool = False
    # A name for the experiment a run belongs to (W&B group); stages of one pipeline share it.
    experiment_name: Optional[str] = None


def algo_schemas() -> dict[str, type]:
    from lmforge.algos import ALGO_SCHEMAS

    return ALGO_SCHEMAS


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    for name, schema in DATA_SCHEMAS.items():
        cs.store(group="data", name=f"{name}_schema", node=schema)
    for name, schema in algo_schemas().items():
        cs.store(group="algo", name=f"{name}_schema", node=schema)
    for name, schema in LOGGER_SCHEMAS.items():
        cs.store(group="logger", name=f"{name}_schema", node={name: schema})
    cs.store(group="strategy", name="strategy_schema", node=StrategyConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: DictConfig) -> ModelConfig:
    """Cross-field checks with actionable messages. Returns the typed model config."""
    mc: ModelConfig = OmegaConf.to_object(cfg.model)
    mc.validate()
    algo, t = cfg.algo, cfg.trainer
    if "seq_len" in algo:
        _check(algo.seq_len <= mc.max_seq_len,
               f"algo.seq_len={algo.seq_len} exceeds model.max_seq_len={mc.max_seq_len}: "
               "lower algo.seq_len or raise model.max_seq_len")
        _check(algo.seq_len > 0, f"algo.seq_len={algo.seq_len} must be positive")
    if "batch_size" in algo:
        _check(algo.batch_size > 0, f"algo.batch_size={algo.batch_size} must be positive")
    _check(t.max_steps > 0, f"trainer.max_steps={t.max_steps} must be positive")
    _check(t.eval_every > 0, f"trainer.eval_every={t.eval_every} must be positive")
    _check(t.accumulate_grad_batches > 0,
           f"trainer.accumulate_grad_batches={t.accumulate_grad_batches} must be positive")
    d = cfg.data
    _check(0 < d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be between 0 and 1")
    _check(d.on_bad_record in ("error", "skip"),
           f"data.on_bad_record={d.on_bad_record!r}: use 'error' or 'skip'")
    if cfg.resume not in (None, "auto"):
        from pathlib import Path

        _check(Path(cfg.resume).is_file(), f"resume={cfg.resume}: no such checkpoint file (or use resume=auto)")
    if cfg.init_from is not None:
        from pathlib import Path

        _check(Path(cfg.init_from).exists(), f"init_from={cfg.init_from}: no such checkpoint")
    return mc
