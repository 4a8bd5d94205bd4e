"""What every strategy is configured by, and the multi-process plumbing the ddp and fsdp
strategies share: the `strategy` config group's schema (`StrategyConfig`, `StrategyError`,
`validate_strategy`), launching local ranks under Hydra (`HydraJobLauncher`), the run-folder
check and sweep teardown of both parallel strategies (`_LmforgeParallel`), rank zero before
start-up, and `stage_models` (the models a strategy acts on).

It sits below `lmforge.training.strategy` (choosing and applying a strategy, DDP) and
`lmforge.training.fsdp` (FSDP2) and imports neither, so both build on it without an import cycle.

Processes and outputs. Lightning re-launches ``train.py`` for local ranks 1..N-1; lmforge's
launcher (`HydraJobLauncher`) gives them the exact overrides and run folder of *this* Hydra job,
so all ranks share one run folder and ``-m`` sweeps work (each job launches its ranks, then tears
its process group down for the next job). Children write no Hydra config or log file. Ranks
started outside Lightning (torchrun, srun) must agree on the run folder: every distributed run
checks this at start-up and names the fix (pass ``hydra.run.dir``) when they do not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from torch import nn

STRATEGIES = ("single", "ddp", "fsdp")
SHARDINGS = ("full", "grad_op", "hybrid")
MIXED_PRECISION = ("auto", "bf16", "none")


@dataclass
class StrategyConfig:
    name: str = "single"  # single | ddp | fsdp
    # -- ddp ----------------------------------------------------------------------------------
    # None: on under automatic optimization, off for manual optimization (RL stages).
    static_graph: Optional[bool] = None
    find_unused_parameters: bool = False
    gradient_as_bucket_view: bool = True
    # -- fsdp ---------------------------------------------------------------------------------
    sharding: str = "full"  # full | grad_op | hybrid (shard within a node, replicate across nodes)
    mixed_precision: str = "auto"  # auto (bf16 params/fp32 reduce under bf16-mixed on GPU) | bf16 | none
    cpu_offload: bool = False
    # False: one consolidated checkpoint file written by rank zero; True: a sharded folder.
    save_distributed_checkpoint: bool = False
    # -- all ------------------------------------------------------------------------------------
    activation_checkpointing: bool = False
    process_group_backend: Optional[str] = None  # None: nccl on GPUs, gloo on CPUs
    timeout_minutes: int = 30  # collectives that wait longer than this fail instead of hanging


class StrategyError(ValueError):
    """A strategy setting that cannot work, with the key to change."""


def validate_strategy(cfg: StrategyConfig) -> None:
    if cfg.name not in STRATEGIES:
        raise StrategyError(f"strategy={cfg.name!r}: unknown strategy; use one of {STRATEGIES}")
    if cfg.sharding not in SHARDINGS:
        raise StrategyError(f"strategy.sharding={cfg.sharding!r}: use one of {SHARDINGS}")
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise StrategyError(f"strategy.mixed_precision={cfg.mixed_precision!r}: use one of {MIXED_PRECISION}")
    if cfg.timeout_minutes <= 0:
        raise StrategyError(f"strategy.timeout_minutes={cfg.timeout_minutes} must be positive")


# ============================================================================ processes and Hydra


def _hydra_job() -> Any | None:
    """The running Hydra job's config (hydra.*), or None outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover - hydra is a dependency
        return None
    return HydraConfig.get() if HydraConfig.initialized() else None


_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Hydra overrides of the parent a child must not repeat: it runs one job, in the parent's folder.
_NOT_FOR_CHILDREN = (
    "hydra.run",
    "hydra.sweep",
    "hydra.mode",
    "hydra.launcher",
    "hydra/launcher",
    "hydra.sweeper",
    "hydra/sweeper",
    "hydra.output_subdir",
    "hydra.job.name",
    "hydra.job_logging",
    "hydra/job_logging",
    "hydra.job.num",
    "hydra.job.id",
)


class HydraJobLauncher(_SubprocessScriptLauncher):
    """Lightning's script launcher (local ranks 1..N-1 re-run the entry script), made exact for
    Hydra: a child re-runs *this job* -- its resolved overrides (the one point of a ``-m`` sweep,
    not the whole sweep) in its run folder -- and writes no ``.hydra/`` config or log file.

    Lightning's own launcher re-passes ``sys.argv``: under ``-m`` every child would start the
    whole sweep and scatter outputs over several sweep folders."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saved_env: dict[str, str | None] | None = None

    def _call_children_scripts(self) -> None:
        hydra = _hydra_job()
        if hydra is None:
            return super()._call_children_scripts()
        self._check_can_spawn_children()
        self.saved_env = {k: os.environ.get(k) for k in _LAUNCH_ENV}
        os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
        os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
        os.environ["NODE_RANK"] = str(self.cluster_environment.node_rank())
        os.environ["LOCAL_RANK"] = str(self.cluster_environment.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        from hydra.utils import get_original_cwd, to_absolute_path

        script = [sys.executable, to_absolute_path(sys.argv[0])]
        import __main__

        if getattr(__main__, "__spec__", None) is not None:
            script = [sys.executable, "-m", __main__.__spec__.name]
        run_dir = str(Path(hydra.runtime.output_dir).resolve())
        for local_rank in range(1, self.num_processes):
            env = os.environ.copy()
            env["LOCAL_RANK"] = str(local_rank)
            if os.environ.get("PL_GLOBAL_SEED") is None:
                env.pop("PL_GLOBAL_SEED", None)
            command = [
                *script,
                *hydra.overrides.task,
                *[o for o in hydra.overrides.hydra if not o.lstrip("+~").startswith(_NOT_FOR_CHILDREN)],
                f'hydra.run.dir="{run_dir}"',
                f"hydra.job.name={hydra.job.name}_rank{local_rank}",
                "hydra.output_subdir=null",
                "hydra/job_logging=stdout",
            ]
            self.procs.append(subprocess.Popen(command, env=env, cwd=get_original_cwd()))

    def restore_env(self) -> None:
        if self.saved_env is None:
            return
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.saved_env = None


def _is_multirun() -> bool:
    hydra = _hydra_job()
    if hydra is None:
        return False
    from hydra.types import RunMode

    return hydra.mode == RunMode.MULTIRUN


class _LmforgeParallel:
    """What the ddp and fsdp strategies share: the launcher, the run-folder agreement check,
    and the clean-up that lets the next job of a ``-m`` sweep start its own process group."""

    lmforge_cfg: StrategyConfig

    def _configure_launcher(self) -> None:
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = HydraJobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def _check_same_run_dir(self, trainer) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        mine = str(Path(getattr(trainer, "lmforge_run_dir", trainer.default_root_dir)).resolve())
        everyone: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        if len(set(everyone)) > 1:
            shown = "\n".join(f"  rank {r}: {d}" for r, d in enumerate(everyone))
            raise RuntimeError(
                "the ranks of this job resolved different run folders:\n" + shown + "\n"
                "Ranks started outside Lightning (torchrun, srun, one command per node) each compose the "
                "config, and a run folder built from the time differs between them: pass the same "
                "hydra.run.dir=<folder> to every rank (scripts/torchrun_two_nodes.sh and "
                "scripts/slurm/train.sbatch do)."
            )

    def _lmforge_teardown(self) -> None:
        launcher = self._launcher
        if isinstance(launcher, HydraJobLauncher) and launcher.saved_env is not None and _is_multirun():
            # The next job of the sweep runs in this process: it must launch its own ranks, on a
            # fresh port, into a fresh process group.
            import torch.distributed as dist

            for proc in launcher.procs:
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            launcher.restore_env()


def stage_models(module: nn.Module) -> list[nn.Module]:
    """The CausalLM / ScalarModel instances registered on `module` (outermost only)."""
    from lmforge.model import CausalLM, ScalarModel

    found: list[nn.Module] = []
    for sub in module.modules():
        if isinstance(sub, (CausalLM, ScalarModel)) and not any(sub in set(m.modules()) for m in found):
            found.append(sub)
    return found


# ============================================================================ rank zero before start-up


def env_rank_is_zero() -> bool:
    """Whether this process will be global rank zero, from the launcher's environment alone
    (before the process group exists): RANK (torchrun), SLURM_PROCID (srun), LOCAL_RANK and
    NODE_RANK (Lightning's children, one command per node)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        value = os.environ.get(key)
        if value not in (None, "") and int(value) != 0:
            return False
    return True


def nonzero_rank_hydra_overrides() -> list[str]:
    """Hydra overrides for a process that is not rank zero (see train.py): no `.hydra/` config
    copy and no log file in the shared run folder; the console only."""
    if env_rank_is_zero():
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
