"""Fault tolerance: what keeps a run going through a crash, a preemption, a full disk or a NaN.

- `RNGState`: torch (CPU and CUDA), Python and NumPy generator states travel in the checkpoint
  and are put back right before the first resumed training batch.
- `PeriodicCheckpoint`: `last.ckpt` at every validation (trainer.eval_every), every
  `trainer.checkpoint_every_minutes`, at the end of training and on SIGTERM (preemption);
  with `trainer.keep_last=k`, the k newest `step-NNNNNNN.ckpt` copies are kept too.
- `NonFiniteGuard`: an optimizer step whose loss or gradients are not finite is skipped and
  counted (`train/skipped_steps`); `trainer.max_bad_steps` in a row stop the run.
- `check_output_dir`: a writable run folder with room for the checkpoints, checked before training.
- `grads_are_finite`, `collapse_warning`: helpers for stages with manual optimization (PPO).

Writing checkpoint files atomically and finding the newest valid one for resume=auto are in
`checkpoint_io`.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmforge.training.checkpoint_io import tmp_name

log = logging.getLogger(__name__)

LAST = "last.ckpt"
STEP_PATTERN = re.compile(r"^step-(\d+)\.ckpt$")


class OutputDirError(RuntimeError):
    """The run folder cannot take this run's checkpoints (not writable, or too little space)."""


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradients."""


# ============================================================================ RNG state


def capture_rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from, as tensors and plain values
    (so the checkpoint stays loadable with weights_only=True)."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64).copy()),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            rank_zero_warn(
                f"the checkpoint has CUDA RNG states of {len(cuda)} devices, this machine has "
                f"{torch.cuda.device_count()}: CUDA random numbers will differ from the original run"
            )


def _process_group() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class RNGState(L.Callback):
    """Saves every rank's RNG states in each checkpoint; on resume, each rank gets its own back
    right before the first training batch, so anything drawn in between (DataLoader iterator
    seeds) does not shift them.

    Lightning restores the model, optimizer, schedulers and loops, but not the global RNGs.
    Saving gathers the ranks' states (trainer.save_checkpoint runs on every rank); a run resumed
    on another number of ranks gives every rank rank zero's states, with a warning.
    """

    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict[str, Any]:
        _, world = _process_group()
        mine = capture_rng_state()
        if world == 1:
            return {"ranks": [mine]}
        states: list = [None] * world
        torch.distributed.all_gather_object(states, mine)
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks") or []
        if not ranks:
            return
        rank, world = _process_group()
        if len(ranks) != world:
            rank_zero_warn(
                f"the checkpoint has the RNG states of {len(ranks)} ranks, this run has {world}: every rank "
                "continues from rank zero's, so random draws differ from the original run"
            )
            rank = 0
        self._pending = ranks[rank]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            restore_rng_state(self._pending)
            self._pending = None


# ============================================================================ periodic checkpoints


def step_checkpoint_name(step: int) -> str:
    return f"step-{step:07d}.ckpt"


class PeriodicCheckpoint(Checkpoint):
    """`last.ckpt` at every validation, every `every_minutes`, at the end and on SIGTERM.

    Lightning's ModelCheckpoint(monitor=...) rewrites `last.ckpt` only when the monitored metric
    improved; this one always does, so a resume never goes back further than `eval_every` steps
    (or `every_minutes`). With `keep_last=k`, each save is also kept as `step-NNNNNNN.ckpt`
    (a hard link to `last.ckpt`, no extra write) and the k newest of those are kept.
    It is a `Checkpoint` callback so Lightning runs it after the best-model ModelCheckpoint:
    the state it saves includes the updated best-model bookkeeping.
    """

    def __init__(self, dirpath: str | os.PathLike, every_minutes: float | None = None, keep_last: int = 0):
        self.dirpath = Path(dirpath)
        self.every_s = every_minutes * 60.0 if every_minutes else None
        self.keep_last = keep_last
        self._last_saved_step = -1
        self._last_save_time = time.monotonic()
        self._sigterm_held = False
        self.preempted_at: int | None = None

    @property
    def last_path(self) -> Path:
        return self.dirpath / LAST

    @staticmethod
    def _fitting(trainer) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def save(self, trainer, reason: str) -> None:
        step = trainer.global_step
        if step == self._last_saved_step or step == 0:
            return
        trainer.save_checkpoint(str(self.last_path), weights_only=False)
        self._last_saved_step = step
        self._last_save_time = time.monotonic()
        log.debug("checkpoint at step %d (%s): %s", step, reason, self.last_path)
        if self.keep_last > 0 and trainer.is_global_zero:
            self._keep_copy(step)

    def _keep_copy(self, step: int) -> None:
        dest = self.dirpath / step_checkpoint_name(step)
        tmp = tmp_name(dest)
        try:
            os.link(self.last_path, tmp)  # same inode: last.ckpt is later replaced, not rewritten
        except OSError:
            shutil.copyfile(self.last_path, tmp)
        os.replace(tmp, dest)
        steps = sorted((int(m.group(1)), p) for p in self.dirpath.iterdir() if (m := STEP_PATTERN.match(p.name)))
        for _, old in steps[: max(0, len(steps) - self.keep_last)]:
            old.unlink(missing_ok=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_save_time = time.monotonic()
        self._last_saved_step = trainer.global_step  # a resumed run starts from a saved step
        self._hold_sigterm_within_accumulation(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._fitting(trainer):
            self.save(trainer, "validation")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        boundary = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if boundary and self._sigterm_held:
            trainer._signal_connector.received_sigterm, self._sigterm_held = True, False
        if self.every_s is None or trainer.global_step == self._last_saved_step or not boundary:
            return
        due = time.monotonic() - self._last_save_time >= self.every_s
        if trainer.world_size > 1:
            due = trainer.strategy.broadcast(due, src=0)
        if due:
            self.save(trainer, f"every {self.every_s / 60:g} min")

    def _hold_sigterm_within_accumulation(self, trainer) -> None:
        """Lightning stops right after the micro-batch in which SIGTERM arrived. Within a gradient
        accumulation that would checkpoint half an optimizer step (accumulated gradients are not
        saved), so with accumulation the signal is held (Lightning's handler runs, then its flag
        is taken back) and re-raised at the end of the next accumulation's last micro-batch."""
        if (
            trainer.accumulate_grad_batches <= 1
            or trainer.world_size > 1
            or threading.current_thread() is not threading.main_thread()
        ):
            return  # several ranks must agree: there Lightning broadcasts the flag itself
        conn = trainer._signal_connector
        lightning_handler = signal.getsignal(signal.SIGTERM)

        def hold(signum, frame):
            if callable(lightning_handler):
                lightning_handler(signum, frame)
            if conn.received_sigterm:
                conn.received_sigterm, self._sigterm_held = False, True

        signal.signal(signal.SIGTERM, hold)  # Lightning restores the original handler after fit

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, "end of training")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) or (
            isinstance(exception, SystemExit) and getattr(trainer, "received_sigterm", False)
        ):
            self.save(trainer, "preemption")
            self.preempted_at = trainer.global_step
            log.info(
                f"Preempted (SIGTERM) at step {trainer.global_step}: saved {self.last_path}. "
                "Run the same command with resume=auto to continue."
            )


# ============================================================================ non-finite steps


def _grad_list(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's gradient tensors (a sharded DTensor gradient: its local shard)."""
    grads = []
    for p in params:
        g = p.grad
        if g is not None:
            grads.append(g.to_local() if hasattr(g, "to_local") else g)
    return grads


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One boolean tensor (no host sync): every element of every tensor is finite."""
    if not tensors:
        return torch.tensor(True)
    # The norm of a tensor with an inf or NaN is inf or NaN; one fused kernel per device/dtype.
    try:
        norms = torch._foreach_norm(tensors)
    except (RuntimeError, AttributeError):  # pragma: no cover - sparse grads, old torch
        norms = [torch.linalg.vector_norm(t.float()) for t in tensors]
    return torch.stack([n.float().to(norms[0].device) for n in norms]).isfinite().all()


def grads_are_finite(params_or_module: torch.nn.Module | Iterable[torch.Tensor]) -> bool:
    """True when every gradient of the parameters (or the module's) on this rank is finite.

    For stages with manual optimization (PPO): call after backward (and after unscaling), before
    `opt.step()`; when False, `opt.zero_grad(set_to_none=True)` and skip the step. With sharded
    gradients (FSDP) ranks can disagree: combine with
    `trainer.strategy.reduce_boolean_decision(ok, all=True)`. (NonFiniteGuard, which every
    stage's Trainer has, already does this at each `opt.step()`.)
    """
    params = params_or_module.parameters() if isinstance(params_or_module, torch.nn.Module) else params_or_module
    return bool(_all_finite(_grad_list(params)))


class NonFiniteGuard(L.Callback):
    """Skips an optimizer step whose loss or gradients are not finite, counts it, and stops the
    run after `max_bad_steps` such steps in a row (the last checkpoint, written before them, is
    kept: nothing is saved on the way out).

    Works for automatic and manual optimization (Lightning calls `on_before_backward` from
    `manual_backward` and `on_before_optimizer_step` from `LightningOptimizer.step`). A skipped
    step leaves weights and optimizer moments untouched (every gradient is dropped, so AdamW
    updates nothing); the step counter, the data position and the LR schedule still advance.
    Under fp16 (a GradScaler), overflowing gradients are the scaler's to skip; only the loss is
    checked here.
    """

    def __init__(self, max_bad_steps: int = 5, checkpoint_dir: str | os.PathLike | None = None):
        self.max_bad_steps = max_bad_steps
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.skipped = 0
        self.in_a_row = 0
        self._loss_ok: torch.Tensor | None = None

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.in_a_row = int(state_dict.get("in_a_row", 0))

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        ok = torch.tensor(True) if self._loss_ok is None else self._loss_ok.cpu()
        self._loss_ok = None
        if not str(trainer.precision).startswith("16"):
            ok = ok & _all_finite(_grad_list(params)).cpu()
        good = bool(trainer.strategy.reduce_boolean_decision(bool(ok), all=True))
        if good:
            self.in_a_row = 0
        else:
            for p in params:
                p.grad = None  # the optimizer skips parameters without a gradient
            self.skipped += 1
            self.in_a_row += 1
            step = trainer.global_step + 1
            rank_zero_warn(
                f"step {step}: non-finite loss or gradients; optimizer step skipped "
                f"({self.in_a_row} in a row, {self.skipped} in total)"
            )
        pl_module.log("train/skipped_steps", float(self.skipped))
        if self.in_a_row >= self.max_bad_steps:
            last = self.checkpoint_dir / LAST if self.checkpoint_dir else None
            kept = (
                f"The last good checkpoint is {last} (kept unchanged)."
                if last is not None and last.exists()
                else "No checkpoint had been written yet."
            )
            raise NonFiniteError(
                f"stopping at step {trainer.global_step + 1}: {self.in_a_row} optimizer steps in a row had "
                f"a non-finite loss or gradients (trainer.max_bad_steps={self.max_bad_steps}). {kept} "
                "Likely causes: a learning rate too high for this model (lower algo.optim.lr or raise "
                "algo.optim.warmup_steps), fp16 overflow (use precision=bf16-mixed or 32-true), or bad "
                "input data. Resume from the checkpoint with resume=auto after changing the config."
            )


# ============================================================================ PPO collapse


def collapse_warning(
    entropy: float, kl: float, *, min_entropy: float = 0.05, max_kl: float = 20.0, step: int | None = None
) -> str | None:
    """Warn (and return the message) when a policy is collapsing: mean per-token entropy near zero
    (it always says the same thing) or the KL to the reference exploding (it left the language
    model behind). `entropy` in nats per token, `kl` in nats per sequence; None when healthy."""
    entropy, kl = float(entropy), float(kl)
    at = f"step {step}: " if step is not None else ""
    problems = []
    if not math.isfinite(entropy) or entropy < min_entropy:
        problems.append(
            f"policy entropy {entropy:.3g} nats/token is below {min_entropy:g}: the policy is "
            "collapsing to deterministic outputs"
        )
    if not math.isfinite(kl) or kl > max_kl:
        problems.append(
            f"KL to the reference {kl:.3g} nats exceeds {max_kl:g}: the policy is drifting away "
            "from the language model (reward hacking?)"
        )
    if not problems:
        return None
    msg = (
        at
        + "; ".join(problems)
        + (
            ". Consider a lower algo.optim.lr, a higher algo.kl_coef (or algo.adaptive_kl=true), "
            "a positive algo.ent_coef, or stopping at an earlier checkpoint."
        )
    )
    rank_zero_warn(msg)
    return msg


# ============================================================================ disk preflight


def estimate_checkpoint_bytes(module: torch.nn.Module) -> int:
    """fp32 weights (4 B) + AdamW moments (8 B) per parameter, plus 5% and 1 MiB of metadata."""
    n = sum(p.numel() for p in module.parameters())
    return int(n * 12 * 1.05) + (1 << 20)


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n}"


def check_output_dir(run_dir: str | os.PathLike, checkpoint_bytes: int | None = None, n_kept: int = 2) -> None:
    """Fail before training when the run folder is not writable or lacks room for the checkpoints.

    Room needed: `n_kept` checkpoints (last, best, keep_last copies) plus one being written,
    less what the checkpoints already there take (they are replaced).
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe = ckpt_dir / f".write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"lmforge")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise OutputDirError(
            f"run_dir={run_dir} is not writable ({e.strerror or e}: {e.filename or ckpt_dir}): checkpoints go to "
            f"{ckpt_dir}. Point hydra.run.dir (or run_dir) at a writable folder."
        ) from None
    if not checkpoint_bytes:
        return
    free = shutil.disk_usage(ckpt_dir).free
    existing = sum(p.stat().st_size for p in ckpt_dir.glob("*.ckpt") if p.is_file())
    need = max(checkpoint_bytes, checkpoint_bytes * (n_kept + 1) - existing)
    if free < need:
        raise OutputDirError(
            f"run_dir={run_dir}: {_fmt(free)} free, but this run needs about {_fmt(need)} for its checkpoints "
            f"(~{_fmt(checkpoint_bytes)} each: parameters x 12 bytes for fp32 weights and AdamW moments; "
            f"{n_kept} kept + 1 being written). Free some space, point hydra.run.dir at a bigger disk, lower "
            "trainer.keep_last, or set trainer.check_disk_space=false to skip this check."
        )


__all__ = [
    "NonFiniteError",
    "NonFiniteGuard",
    "OutputDirError",
    "PeriodicCheckpoint",
    "RNGState",
    "capture_rng_state",
    "check_output_dir",
    "collapse_warning",
    "estimate_checkpoint_bytes",
    "grads_are_finite",
    "restore_rng_state",
]
