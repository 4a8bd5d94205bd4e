"""Curves and a summary of runs from their local files, no W&B needed:

    python -m lmforge.report <run dir> [<run dir> ...] [--out DIR]

A run dir is a `train.py` output folder (csv/metrics.csv, .hydra/, checkpoints/, summary.json);
a folder of runs (a `-m` sweep) stands for all the runs in it. Writes DIR/report.png (every run
on the same axes: loss and validation curves; reward-model accuracy; for RL runs reward,
ground-truth score, KL and response length over steps, and the gold and proxy reward against
sqrt(KL) on the same held-out prompts; whichever of these the runs logged) and
DIR/report.md (per run: config choices and overrides, steps, wall time, checkpoints; then the
final value of every metric, one column per run). DIR defaults to the run dir for one run and
to ./lmforge-report for several.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# (title, metrics): a panel is drawn when any run logged one of its metrics.
PANELS: list[tuple[str, list[str]]] = [
    ("Loss", ["train/loss", "val/loss"]),
    ("Validation bits per byte", ["val/bpb"]),
    ("Reward model accuracy", ["train/accuracy", "val/accuracy"]),
    ("Reward", ["rollout/reward_mean", "val/reward"]),
    ("Ground-truth score", ["rollout/gt_score", "val/gt_score", "val/judge_score"]),
    ("Ground-truth score, hard split", ["val_hard/gt_score", "val_hard/judge_score"]),
    ("KL to the reference", ["rollout/kl", "val/kl"]),
    ("Response length (tokens)", ["rollout/response_len", "val/response_len"]),
    ("RL losses", ["train/policy_loss", "train/value_loss"]),
]
# Columns of metrics.csv that are not metrics.
_NOT_METRICS = {"epoch", "step", "trainer/global_step"}


class ReportError(ValueError):
    """Nothing to report, with what was expected."""


@dataclass
class RunData:
    path: Path
    label: str = ""
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    final: dict[str, tuple[int, float]] = field(default_factory=dict)  # metric -> (step, last value)
    stage: str | None = None
    choices: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[tuple[str, int]] = field(default_factory=list)

    @property
    def is_rl(self) -> bool:
        return any(k.startswith("rollout/") for k in self.series)

    @property
    def last_step(self) -> int | None:
        steps = [s[-1][0] for s in self.series.values() if s]
        return max(steps) if steps else None


def metrics_file(run_dir: Path) -> Path | None:
    for p in (run_dir / "csv" / "metrics.csv", run_dir / "metrics.csv"):
        if p.is_file():
            return p
    return None


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run dirs: each path that holds metrics, else the runs below it (a sweep), in order."""
    runs: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file() and p.name == "metrics.csv":
            p = p.parent.parent if p.parent.name == "csv" else p.parent
        if not p.exists():
            raise ReportError(f"{p}: no such run folder")
        if metrics_file(p):
            runs.append(p)
            continue
        below = sorted(
            {m.parent.parent if m.parent.name == "csv" else m.parent for m in p.rglob("metrics.csv")},
            key=lambda d: (len(d.parts), _natural(str(d))),
        )
        if not below:
            raise ReportError(
                f"{p}: no csv/metrics.csv in it or below it. The report reads the CSV logger's file: "
                "run with logger=csv, logger=wandb (which includes it) or logger=[wandb,csv]"
            )
        runs += below
    return runs


def _natural(s: str) -> list:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def read_metrics(path: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, tuple[int, float]]]:
    """Per metric: the (step, value) series (one value per step, the last logged, ascending) and
    the final (step, value): the value logged last at the highest step."""
    per: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = int(float(row.get("step") or 0))
            except ValueError:
                continue
            for k, v in row.items():
                if k in _NOT_METRICS or k is None or v in ("", None):
                    continue
                try:
                    per.setdefault(k, {})[step] = float(v)
                except ValueError:
                    continue
    series = {k: sorted(d.items()) for k, d in per.items()}
    final = {k: s[-1] for k, s in series.items() if s}
    return series, final


def _load_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - a damaged file: report without it
        return None


def load_run(run_dir: Path) -> RunData:
    run = RunData(run_dir)
    mf = metrics_file(run_dir)
    if mf is not None:
        run.series, run.final = read_metrics(mf)
    hydra_dir = run_dir / ".hydra"
    config = _load_yaml(hydra_dir / "config.yaml") or {}
    hydra = _load_yaml(hydra_dir / "hydra.yaml") or {}
    run.overrides = [str(o) for o in (_load_yaml(hydra_dir / "overrides.yaml") or [])]
    choices = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    if not config or not choices:
        # No .hydra/ (a run started from Python): the CSV logger's hparams.yaml holds the resolved
        # config and lmforge's run metadata (choices, overrides).
        hparams = _load_yaml(run_dir / "csv" / "hparams.yaml") or {}
        meta = hparams.get("meta") or {}
        config = config or hparams
        choices = choices or meta.get("choices") or {}
        run.overrides = run.overrides or [str(o) for o in meta.get("overrides") or []]
    run.choices = {
        str(k): str(v) for k, v in choices.items() if v is not None and not str(k).startswith("hydra") and k != "logger"
    }
    run.stage = ((config.get("algo") or {}).get("name")) or run.choices.get("algo")
    try:
        run.summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        run.summary = {}
    ck = run_dir / "checkpoints"
    if ck.is_dir():
        run.checkpoints = [(str(p.relative_to(run_dir)), p.stat().st_size) for p in sorted(ck.glob("*.ckpt"))]
    return run


def label_runs(runs: list[RunData]) -> None:
    """Labels that tell runs apart: the overrides that differ between them, else the folder names."""
    names = [r.path.name for r in runs]
    if len(runs) > 1:
        common = set.intersection(*[set(r.overrides) for r in runs])
        diffs = [" ".join(o for o in r.overrides if o not in common and not o.startswith("hydra.")) for r in runs]
        if all(diffs) and len(set(diffs)) == len(diffs):
            names = diffs
        elif len(set(names)) < len(names):
            names = [f"{r.path.parent.name}/{r.path.name}" for r in runs]
    for r, n in zip(runs, names):
        r.label = n


def panels_for(runs: list[RunData]) -> list[tuple[str, list[str]]]:
    out = []
    for title, metrics in PANELS:
        present = [m for m in metrics if any(_plotted(r, m) for r in runs)]
        if present:
            out.append((title, present))
    return out


# The over-optimization panel: x = sqrt(val/kl), y = the gold score (the judge) and the proxy
# (the reward the policy optimized), both on the same held-out prompts at each validation.
OVEROPT_TITLE = "Gold (judge) and proxy (reward) vs sqrt(KL)"


def overoptimization_curve(run: RunData) -> list[tuple[float, float, float | None]]:
    """(sqrt KL, gold, proxy) at each validation step where the RL run logged val/kl and val/gt_score,
    in step order: the curve of Gao et al. (2022), on which a learned reward's gold score peaks and
    then falls while the proxy keeps rising."""
    kl = dict(run.series.get("val/kl", []))
    gold = dict(run.series.get("val/gt_score", []))
    proxy = dict(run.series.get("val/reward", []))
    return [
        (math.sqrt(max(kl[s], 0.0)), gold[s], proxy.get(s)) for s in sorted(kl) if s in gold and math.isfinite(kl[s])
    ]


def _plot_overoptimization(ax, runs: list[RunData], colors: list[str]) -> None:
    for i, run in enumerate(runs):
        points = overoptimization_curve(run)
        if not points:
            continue
        x, gold, proxy = zip(*points)
        color = colors[i % len(colors)]
        prefix = "" if len(runs) == 1 else f"{run.label}: "
        ax.plot(x, gold, color=color, marker="o", markersize=3, label=f"{prefix}gold (val/gt_score)")
        if all(v is not None for v in proxy):
            ax.plot(
                x, proxy, color=color, linestyle="--", marker="x", markersize=3, label=f"{prefix}proxy (val/reward)"
            )
    ax.set_xlabel("sqrt(KL to the reference), nats^0.5", fontsize=8)


def _plotted(run: RunData, metric: str) -> bool:
    # RL stages log val/loss = -val/gt_score only to pick the best checkpoint: not a loss curve.
    if metric == "val/loss" and run.is_rl:
        return False
    return bool(run.series.get(metric))


def plot(runs: list[RunData], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[str] | None]] = list(panels_for(runs))
    if any(overoptimization_curve(r) for r in runs):
        panels.append((OVEROPT_TITLE, None))
    if not panels:
        raise ReportError(
            "the runs logged none of the plotted metrics: " + ", ".join(sorted({m for _, ms in PANELS for m in ms}))
        )
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, metrics) in zip(axes.flat, panels):
        if metrics is None:  # the over-optimization panel
            _plot_overoptimization(ax, runs, colors)
            ax.set_title(title, fontsize=10)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            continue
        for i, run in enumerate(runs):
            for j, metric in enumerate(metrics):
                if not _plotted(run, metric):
                    continue
                # One run: a color per metric; several: a color per run (val dashed either way).
                color = colors[(j if len(runs) == 1 else i) % len(colors)]
                steps, values = zip(*run.series[metric])
                val = metric.startswith("val/")
                name = metric if len(runs) == 1 else f"{run.label}: {metric}"
                ax.plot(
                    steps,
                    values,
                    color=color,
                    linestyle="--" if val else "-",
                    marker="o" if val else None,
                    markersize=3,
                    linewidth=1.2 if val else 1.0,
                    alpha=0.95 if val else 0.8,
                    label=name,
                )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(", ".join(r.label for r in runs)[:150], fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _duration(s: float | None) -> str:
    if s is None:
        return "unknown"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def wall_time(run: RunData) -> tuple[float | None, str]:
    s = run.summary
    if s.get("wall_s_total") is not None:
        n = len(s.get("attempts") or [])
        return float(s["wall_s_total"]), (f" ({n} attempts)" if n > 1 else "")
    if s.get("wall_s") is not None:
        return float(s["wall_s"]), ""
    return None, " (no summary.json: the run did not finish)"


def markdown(runs: list[RunData], figure: Path | None, out_dir: Path) -> str:
    lines = ["# lmforge report", ""]
    if figure is not None:
        rel = figure.name if figure.parent == out_dir else str(figure)
        lines += [f"![curves]({rel})", ""]
    for run in runs:
        lines += [f"## {run.label}", "", f"- folder: `{run.path}`"]
        if run.stage:
            lines.append(f"- stage: {run.stage}")
        if run.choices:
            lines.append("- config: " + ", ".join(f"{k}={v}" for k, v in sorted(run.choices.items())))
        if run.overrides:
            lines.append("- overrides: `" + " ".join(run.overrides) + "`")
        wall, note = wall_time(run)
        step = run.summary.get("global_step")
        steps = f"steps: {step}" if step is not None else f"last logged step: {run.last_step}"
        lines.append(f"- {steps} · wall time: {_duration(wall)}{note}")
        if run.summary.get("preempted"):
            lines.append("- status: preempted (resume with resume=auto)")
        if run.checkpoints:
            lines.append("- checkpoints: " + ", ".join(f"`{n}` ({_size(sz)})" for n, sz in run.checkpoints))
        best = run.summary.get("best_checkpoint")
        if best:
            lines.append(f"- best checkpoint: `{best}`")
        lines.append("")
    metrics = sorted({k for r in runs for k in r.final}, key=lambda k: (not k.startswith("val/"), k))
    if metrics:
        lines += ["## Final metrics", "", "The last value logged of each metric (its step in parentheses).", ""]
        lines.append("| metric | " + " | ".join(r.label for r in runs) + " |")
        lines.append("|---|" + "---|" * len(runs))
        for k in metrics:
            cells = [f"{_fmt(r.final[k][1])} ({r.final[k][0]})" if k in r.final else "" for r in runs]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def report(paths: list[str | Path], out: str | Path | None = None) -> dict[str, Path]:
    run_dirs = find_runs(paths)
    runs = [load_run(d) for d in run_dirs]
    label_runs(runs)
    out_dir = Path(out) if out else (run_dirs[0] if len(run_dirs) == 1 else Path("lmforge-report"))
    out_dir.mkdir(parents=True, exist_ok=True)
    figure: Path | None
    try:
        figure = plot(runs, out_dir / "report.png")
    except ReportError as e:
        print(f"report: no figure: {e}", file=sys.stderr)
        figure = None
    except ImportError:
        print("report: no figure: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        figure = None
    md = out_dir / "report.md"
    md.write_text(markdown(runs, figure, out_dir), encoding="utf-8")
    return {"figure": figure, "summary": md} if figure else {"summary": md}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lmforge.report",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("runs", nargs="+", help="run folders (or sweep folders holding runs)")
    ap.add_argument("--out", help="output folder (default: the run folder for one run, ./lmforge-report for several)")
    args = ap.parse_args(argv)
    try:
        written = report(args.runs, args.out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in written.values():
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
