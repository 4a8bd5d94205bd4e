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
from lmforge.errors import ConfigError
from lmforge.model import ModelConfig
from lmforge.training.precision import PrecisionError, normalize_precision
from lmforge.training.tracking import LOGGER_SCHEMAS
from lmforge.training.trainer import StrategyConfig, TrainerConfig


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
    # Where torch.compile keeps its generated code between runs (shared across runs by default).
    compile_cache_dir: Optional[str] = "outputs/.compile_cache"
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


# Stages that improve an existing policy against a reward: they need both.
RL_ALGOS = ("ppo", "reinforce", "rloo", "grpo")


def _world_size(t) -> int | None:
    """Processes of the run when the config fixes it (devices an int or a list), else None."""
    devices = t.devices
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        n = devices
    elif OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        n = len(devices)
    else:  # "auto", "-1": known once the machine is
        return None
    return n * t.num_nodes if n > 0 else None


def _check_file(value: Any, key: str, what: str = "file") -> None:
    from pathlib import Path

    p = Path(str(value))
    if p.is_dir():
        raise ConfigError(f"{key}={value} is a directory; give the {what} itself")
    _check(
        p.is_file(),
        f"{key}={value}: no such {what} (relative paths resolve from {Path.cwd()}); "
        "check the path or use an absolute one",
    )


def _check_globs(patterns: Any, key: str) -> None:
    import glob
    from pathlib import Path

    for pattern in map(str, patterns):
        if any(c in pattern for c in "*?["):
            _check(
                any(Path(m).is_file() for m in glob.glob(pattern, recursive=True)),
                f"{key}: no file matches {pattern!r} (relative paths resolve from {Path.cwd()})",
            )
        else:
            _check_file(pattern, key)


def _check_data_paths(d: DictConfig) -> None:
    source = d.get("source")
    for key in ("path", "paths"):
        if key in d.keys() and OmegaConf.is_missing(d, key):  # noqa: SIM118 (`in d` is False for ???)
            example = "[corpus/*.txt]" if key == "paths" else "<file.jsonl>"
            raise ConfigError(f"data={source} needs data.{key}={example}: none given")
    if source == "feedback":
        if OmegaConf.is_missing(d, "db"):
            raise ConfigError(
                "data=feedback needs data.db=<feedback.db>: the database `python -m lmforge.feedback "
                "serve` writes (it prints the path when it starts)"
            )
        _check_file(d.db, "data.db", "feedback database")
    if source in ("jsonl", "hh") and "path" in d:
        _check_file(d.path, "data.path", "JSONL file")
    if d.get("val_path"):
        _check_file(d.val_path, "data.val_path", "JSONL file")
    if source == "text" and "paths" in d:
        paths = d.paths if OmegaConf.is_list(d.paths) else [d.paths]
        _check(len(paths) > 0, "data.paths is empty: list the text files or globs to train on")
        _check_globs(paths, "data.paths")
    tok = d.get("tokenizer")
    if tok is not None and tok.get("path"):
        _check_file(tok.path, "data.tokenizer.path", "sentencepiece model file")


def _check_rl(cfg: DictConfig) -> None:
    algo = cfg.algo
    _check(
        cfg.init_from is not None,
        f"algo={algo.name} improves an existing language model: set init_from=<an SFT (or pretraining) "
        "checkpoint>, e.g. init_from=outputs/<sft run>/checkpoints/last.ckpt",
    )
    reward = algo.get("reward")
    sources = list(reward.get("sources") or []) if reward is not None else []
    _check(
        reward is not None and (reward.get("model") or sources),
        f"algo={algo.name} needs a reward source: set algo.reward.model=<a reward-model checkpoint> "
        "(python train.py algo=reward ... trains one) or list algo.reward.sources",
    )
    if reward.get("model"):
        _check_file(reward.model, "algo.reward.model", "reward-model checkpoint")
    for i, src in enumerate(sources):
        if src.get("ckpt"):
            _check_file(src.ckpt, f"algo.reward.sources[{i}].ckpt", "reward-model checkpoint")
    for key in ("ref_from", "critic_from"):
        if algo.get(key):
            _check_file(algo[key], f"algo.{key}", "checkpoint")


def validate(cfg: DictConfig) -> ModelConfig:
    """Cross-field checks with actionable messages. Returns the typed model config."""
    mc: ModelConfig = OmegaConf.to_object(cfg.model)
    mc.validate()
    algo, t = cfg.algo, cfg.trainer
    if "seq_len" in algo:
        _check(
            algo.seq_len <= mc.max_seq_len,
            f"algo.seq_len={algo.seq_len} exceeds model.max_seq_len={mc.max_seq_len}: "
            "lower algo.seq_len or raise model.max_seq_len",
        )
        _check(algo.seq_len > 0, f"algo.seq_len={algo.seq_len} must be positive")
    if algo.get("ptx_coef") and "ptx_seq_len" in algo:
        _check(
            algo.ptx_seq_len <= mc.max_seq_len,
            f"algo.ptx_seq_len={algo.ptx_seq_len} exceeds model.max_seq_len={mc.max_seq_len}: "
            "lower algo.ptx_seq_len or raise model.max_seq_len",
        )
    if "batch_size" in algo:
        _check(algo.batch_size > 0, f"algo.batch_size={algo.batch_size} must be positive")
    if algo.get("global_batch_size") is not None:
        gbs, world = algo.global_batch_size, _world_size(t)
        _check(gbs > 0, f"algo.global_batch_size={gbs} must be positive")
        if world:
            _check(
                gbs % world == 0,
                f"algo.global_batch_size={gbs} is not divisible by the world size {world} (trainer.devices="
                f"{t.devices} x trainer.num_nodes={t.num_nodes}): every rank takes an equal share; pick a "
                f"multiple of {world}",
            )
    _check(t.max_steps > 0, f"trainer.max_steps={t.max_steps} must be positive")
    _check(t.eval_every > 0, f"trainer.eval_every={t.eval_every} must be positive")
    _check(
        t.accumulate_grad_batches > 0, f"trainer.accumulate_grad_batches={t.accumulate_grad_batches} must be positive"
    )
    _check(t.keep_last >= 0, f"trainer.keep_last={t.keep_last} must be >= 0 (0: keep no step-N copies)")
    _check(
        t.max_bad_steps >= 1,
        f"trainer.max_bad_steps={t.max_bad_steps} must be >= 1 (steps in a row with a non-finite loss "
        "or gradients before the run stops)",
    )
    _check(
        t.checkpoint_every_minutes is None or t.checkpoint_every_minutes > 0,
        f"trainer.checkpoint_every_minutes={t.checkpoint_every_minutes} must be positive (or null: "
        "checkpoints only every trainer.eval_every steps)",
    )
    try:
        normalize_precision(t.precision)
    except PrecisionError as e:
        raise ConfigError(str(e)) from None
    d = cfg.data
    _check(0 < d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be between 0 and 1")
    _check(d.on_bad_record in ("error", "skip"), f"data.on_bad_record={d.on_bad_record!r}: use 'error' or 'skip'")
    _check_data_paths(d)
    if cfg.resume not in (None, "auto"):
        from pathlib import Path

        _check(Path(cfg.resume).is_file(), f"resume={cfg.resume}: no such checkpoint file (or use resume=auto)")
    if cfg.init_from is not None:
        from pathlib import Path

        _check(Path(cfg.init_from).exists(), f"init_from={cfg.init_from}: no such checkpoint")
    if algo.name in RL_ALGOS:
        _check_rl(cfg)
    return mc
