"""A quiet console: lmforge's own messages, the progress display and real warnings; not the
libraries' banners and tips, and no repeated deprecation notices we cannot act on.

`setup()` runs at the start of every run (lmforge.run.main), on every rank:

* lmforge logs through the `lmforge` logger (INFO on rank zero, WARNING elsewhere, so a DDP job
  says things once). Where nobody configured logging (no Hydra, no handlers), a plain handler on
  stderr prints them; under `train.py`, Hydra's job logging (conf/hydra/job_logging/lmforge.yaml:
  plain console lines, a timestamped train.log) does.
* Lightning's informational lines ("GPU available: ..., used: ...", "TPU available: ...",
  "💡 Tip: ... litlogger/litmodels", "`Trainer.fit` stopped: ...") go to the `lightning.pytorch`
  logger at INFO; its level is raised to WARNING, the way Lightning's docs suggest, so its
  warnings still show. LMFORGE_LIBRARY_LOG_LEVEL=INFO brings them back.
* Warning filters, each narrow (message, category and module) and each for something that cannot
  be fixed in lmforge (see `_IGNORED_WARNINGS`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator

# Library loggers whose INFO lines are noise in lmforge's console.
LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric")

# (message regex, category, module regex, why it is filtered instead of fixed)
_IGNORED_WARNINGS: list[tuple[str, type[Warning], str, str]] = [
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"lightning\.pytorch\.utilities\._pytree",
        # torch 2.13 deprecates LeafSpec; Lightning 2.6.6's CombinedLoader flattens every batch
        # with its own _pytree helper, which still builds LeafSpec. Lightning's code, not ours:
        # nothing to change here until Lightning moves to TreeSpec.is_leaf().
        "Lightning 2.6 uses torch's deprecated LeafSpec (torch >= 2.10)",
    ),
]


class ConsoleFormatter(logging.Formatter):
    """lmforge's INFO lines as they are; anything else prefixed by its level (and its logger, when
    it is not lmforge's), so a warning stands out."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            msg = f"{msg}\n{record.exc_text}"
        ours = record.name == "lmforge" or record.name.startswith("lmforge.")
        if record.levelno <= logging.INFO and ours:
            return msg
        where = "" if ours else f" [{record.name}]"
        return f"{record.levelname}{where}: {msg}"


def process_rank() -> int:
    """This process's global rank as the launchers set it (0 when not distributed)."""
    try:
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        rank = getattr(rank_zero_only, "rank", None)
        if rank is not None:
            return int(rank)
    except Exception:  # noqa: BLE001 - no Lightning: fall back to the environment
        pass
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def filter_warnings() -> None:
    for message, category, module, _why in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def setup(library_level: str | int | None = None) -> None:
    """Idempotent: call at the start of a run, before the Trainer exists."""
    filter_warnings()
    level = library_level or os.environ.get("LMFORGE_LIBRARY_LOG_LEVEL", "WARNING")
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        level = level if isinstance(level, int) else logging.WARNING
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    ours = logging.getLogger("lmforge")
    ours.setLevel(logging.INFO if process_rank() == 0 else logging.WARNING)
    root = logging.getLogger()
    if not root.handlers and not any(getattr(h, "_lmforge", False) for h in ours.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(ConsoleFormatter())
        handler._lmforge = True  # type: ignore[attr-defined]
        ours.addHandler(handler)


@contextlib.contextmanager
def fit_warnings(resuming: bool) -> Iterator[None]:
    """Around `trainer.fit`: warnings that are expected in this fit and say nothing, ignored for
    its duration only (elsewhere they may matter)."""
    with warnings.catch_warnings():
        if resuming:
            # A resumed run writes into the folder that holds the checkpoint it resumes from;
            # Lightning's ModelCheckpoint warns about any non-empty folder without knowing that.
            warnings.filterwarnings(
                "ignore",
                message=r"Checkpoint directory .* exists and is not empty",
                module=r"lightning\.pytorch\.callbacks\.model_checkpoint",
            )
        yield
