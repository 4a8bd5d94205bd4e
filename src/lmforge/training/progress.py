"""Progress display (trainer.progress_bar): a rich bar on a terminal, plain periodic lines elsewhere
(CI, a log file: no carriage returns), both showing the step, the progress-bar metrics, tokens/s
(and rollouts/s for the RL stages), seconds per step and the ETA. Only rank zero shows anything.

    auto   rich when stderr is a terminal (and not CI / TERM=dumb), plain otherwise
    rich   a live bar on stderr
    plain  one line every trainer.log_every steps, one per validation, one at the end
    none   nothing
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any

from lightning.pytorch.callbacks.progress import ProgressBar

log = logging.getLogger(__name__)


def _fmt_num(v: float) -> str:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a != 0 and a < 1e-3:
        return f"{v:.2e}"
    return f"{v:.4g}"


def _fmt_time(s: float | None) -> str:
    if s is None or math.isnan(s) or math.isinf(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class StepProgress(ProgressBar):
    """What the two displays share: the step counter, rates measured since the first step of this
    process (start-up and compilation excluded) and the ETA."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._t_ref: float | None = None  # time, step and tokens at the end of the first step
        self._step_ref = 0
        self._tokens_ref = 0
        self._t_start: float | None = None
        self._step_start = 0
        self._shown_step = -1

    # ProgressBar's interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    # measurements
    def on_train_start(self, trainer, pl_module) -> None:
        self._t_start = time.perf_counter()
        self._step_start = trainer.global_step
        self._t_ref = None

    def _mark(self, trainer, pl_module) -> None:
        if self._t_ref is None and trainer.global_step > self._step_start:
            self._t_ref = time.perf_counter()
            self._step_ref = trainer.global_step
            self._tokens_ref = getattr(pl_module, "tokens_seen", 0)

    def rates(self, trainer, pl_module) -> dict[str, float]:
        """s/step, tokens/s (all ranks), rollouts/s (RL stages), ETA seconds; {} before 2 steps."""
        if self._t_ref is None:
            return {}
        steps = trainer.global_step - self._step_ref
        dt = time.perf_counter() - self._t_ref
        if steps <= 0 or dt <= 0:
            return {}
        out = {"s_per_step": dt / steps}
        world = max(1, trainer.world_size)
        tokens = (getattr(pl_module, "tokens_seen", 0) - self._tokens_ref) * world
        if tokens > 0:
            out["tokens_per_s"] = tokens / dt
        algo = getattr(getattr(pl_module, "cfg", None), "algo", None)
        if algo is not None and "rollout_batch_size" in algo:
            per_step = algo.rollout_batch_size * algo.get("samples_per_prompt", 1) * world
            out["rollouts_per_s"] = per_step * steps / dt
        if trainer.max_steps and trainer.max_steps > 0:
            out["eta_s"] = max(0, trainer.max_steps - trainer.global_step) * out["s_per_step"]
        return out

    def train_metrics(self, trainer, pl_module) -> dict[str, Any]:
        """The progress-bar metrics of training (val/* are shown once per validation)."""
        m = self.get_metrics(trainer, pl_module)
        return {k: v for k, v in m.items() if k != "v_num" and not k.startswith("val/")}

    @staticmethod
    def val_metrics(trainer) -> dict[str, float]:
        out = {}
        for k, v in trainer.callback_metrics.items():
            if k.startswith("val/") and getattr(v, "numel", lambda: 1)() == 1:
                out[k] = float(v)
        return out

    def status(self, trainer, pl_module) -> str:
        parts = [
            f"{k} {_fmt_num(float(v)) if isinstance(v, (int, float)) else v}"
            for k, v in self.train_metrics(trainer, pl_module).items()
        ]
        r = self.rates(trainer, pl_module)
        if "rollouts_per_s" in r:
            parts.append(f"{_fmt_num(r['rollouts_per_s'])} rollouts/s")
        if "tokens_per_s" in r:
            parts.append(f"{_fmt_num(r['tokens_per_s'])} tok/s")
        if "s_per_step" in r:
            parts.append(f"{_fmt_num(r['s_per_step'])} s/step")
        if "eta_s" in r:
            parts.append(f"ETA {_fmt_time(r['eta_s'])}")
        return " | ".join(parts)


class PlainProgress(StepProgress):
    """Not a terminal (CI, a log file): one line every `every` steps, one per validation and one at
    the end, through the `lmforge.training.progress` logger (printed where no logging is configured)."""

    def __init__(self, every: int = 10):
        super().__init__()
        self.every = max(1, int(every))

    def _emit(self, line: str) -> None:
        if log.hasHandlers():  # logging is configured (lmforge.training.console, Hydra): it decides
            log.info(line)
        else:
            print(line, flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._enabled:
            return
        self._mark(trainer, pl_module)
        step = trainer.global_step
        if step == self._shown_step or step == 0:
            return
        if step % self.every == 0 or step == trainer.max_steps:
            self._shown_step = step
            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            head = f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"
            status = self.status(trainer, pl_module)
            self._emit(head + (" | " + status if status else ""))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        vals = self.val_metrics(trainer)
        if vals:
            self._emit(
                f"val @ step {trainer.global_step} | " + " ".join(f"{k} {_fmt_num(v)}" for k, v in sorted(vals.items()))
            )

    def on_train_end(self, trainer, pl_module) -> None:
        if not self._enabled or self._t_start is None:
            return
        steps = trainer.global_step - self._step_start
        wall = time.perf_counter() - self._t_start
        self._emit(
            f"trained {steps} steps in {_fmt_time(wall)}" + (f" ({_fmt_num(wall / steps)} s/step)" if steps > 0 else "")
        )


class RichProgress(StepProgress):
    """A terminal: one live bar over the run's steps (not per epoch) on stderr, with the status."""

    def __init__(self) -> None:
        super().__init__()
        self._progress = None
        self._task = None
        self._swapped: list[tuple[logging.StreamHandler, Any]] = []

    def _start(self, trainer) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            console=Console(stderr=True),
            refresh_per_second=4,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, completed=trainer.global_step, status="")
        self._redirect_logging()

    def _redirect_logging(self) -> None:
        """Log lines go above the live bar: rich swapped sys.stdout/stderr for proxies that print
        there, but logging handlers still hold the streams they were given (Hydra's, ours)."""
        real = {id(sys.__stdout__), id(sys.__stderr__)}
        for name in (None, "lmforge", "lightning.pytorch"):
            for h in logging.getLogger(name).handlers:
                if type(h) is logging.StreamHandler and id(h.stream) in real:
                    proxy = sys.stdout if h.stream is sys.__stdout__ else sys.stderr
                    self._swapped.append((h, h.setStream(proxy)))

    def _stop(self) -> None:
        for h, stream in reversed(self._swapped):
            h.setStream(stream)
        self._swapped = []
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self._enabled:
            self._start(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._progress is None:
            return
        self._mark(trainer, pl_module)
        if trainer.global_step != self._shown_step:
            self._shown_step = trainer.global_step
            self._progress.update(
                self._task, completed=trainer.global_step, description="train", status=self.status(trainer, pl_module)
            )

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._progress is not None and not trainer.sanity_checking:
            self._progress.update(self._task, description="validating")

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._progress is None or trainer.sanity_checking:
            return
        self._progress.update(self._task, description="train")
        vals = self.val_metrics(trainer)
        if vals:
            self._progress.console.print(
                f"val @ step {trainer.global_step}: " + " ".join(f"{k} {_fmt_num(v)}" for k, v in sorted(vals.items()))
            )

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop()

    def teardown(self, trainer, pl_module, stage) -> None:
        self._stop()


def is_terminal(stream=None) -> bool:
    """A person watching: a TTY, not CI, not TERM=dumb."""
    stream = stream or sys.stderr
    if os.environ.get("CI") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_callback(cfg):
    """The progress display trainer.progress_bar (cfg: the trainer config) asks for, or None."""
    mode = cfg.progress_bar
    if mode == "auto":
        mode = "rich" if is_terminal() else "plain"
    if mode == "rich":
        return RichProgress()
    if mode == "plain":
        return PlainProgress(cfg.log_every)
    if mode in ("none", None, False):
        return None
    raise ValueError(f"trainer.progress_bar={mode!r}: use auto, rich, plain or none")
