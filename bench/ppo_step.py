"""One PPO iteration's wall time, split into generation, scoring and updates, printed as JSON.

    python bench/ppo_step.py                          # algo=ppo defaults, model=tiny, 3 iterations
    python bench/ppo_step.py --iterations 8 -- algo.rollout_batch_size=128 algo.max_new_tokens=32

It runs the real stage through train.py (nothing is re-implemented here): first a one-step
pretraining run and a one-step reward model from it (random-ish weights: the timing does not
depend on them, except that an untrained policy rarely stops before max_new_tokens, the slowest
case for generation), then `algo=ppo` with the critic from the reward model. Each iteration logs

* time/generate_s: sampling the responses (batched, KV cache);
* time/score_s:    old policy log-probs + values, reference log-probs, reward model;
* time/update_s:   advantages (GAE) and the ppo_epochs x minibatches optimizer updates.

The first iteration is left out (allocator and thread-pool warm-up).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("time/generate_s", "time/score_s", "time/update_s")


def train(*overrides: str) -> None:
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(ROOT / "train.py"), "trainer.progress_bar=none", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"bench/ppo_step.py: {' '.join(overrides)} failed (exit {proc.returncode})")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("overrides", nargs="*", help="extra overrides for the PPO run (after --)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        common = [f"model={args.model}", "trainer.eval_every=1000", "trainer.check_disk_space=false"]
        quick = ["logger=none", "trainer.max_steps=1", "algo.val_batches=1"]  # only their checkpoints matter
        train("algo=pretrain", *common, *quick, "algo.n_samples=0", f"hydra.run.dir={out}/pretrain")
        policy = out / "pretrain/checkpoints/last.ckpt"
        train("algo=reward", *common, *quick, f"init_from={policy}", f"hydra.run.dir={out}/reward")
        train(
            "algo=ppo",
            *common,
            "logger=csv",
            "trainer.log_every=1",
            f"trainer.max_steps={args.iterations}",
            f"init_from={policy}",
            f"algo.reward.model={out}/reward/checkpoints/last.ckpt",
            "algo.eval_at_start=false",
            "algo.sample_every=0",
            *args.overrides,
            f"hydra.run.dir={out}/ppo",
        )
        with open(out / "ppo/csv/metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get(PHASES[0])]
    rows = rows[1:] if len(rows) > 1 else rows
    phases = {k.split("/")[1][:-2]: statistics.median(float(r[k]) for r in rows) for k in PHASES}
    total = sum(phases.values())
    result = {
        "bench": "ppo_step",
        "model": args.model,
        "overrides": args.overrides,
        "iterations_timed": len(rows),
        "iteration_s": round(total, 3),
        "phases_s": {k: round(v, 3) for k, v in phases.items()},
        "shares": {k: round(v / total, 3) for k, v in phases.items()},
        "response_len": round(statistics.median(float(r["rollout/response_len"]) for r in rows), 1),
    }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    main()
