"""scripts/pipeline.sh, the whole RLHF pipeline as README shows it, run as a user runs it at
nano sizes: every stage's checkpoint, the on-policy labels (LABEL_PROMPTS) and a start from an
existing pretraining checkpoint (PRETRAINED)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import PINNED_PRECISION, ROOT

SIZES = {"MODEL": "nano", "PRETRAIN_STEPS": "4", "SFT_STEPS": "4", "REWARD_STEPS": "2", "PPO_STEPS": "2"}
OVERRIDES = [
    "data.n_docs=500",
    "data.n_sft=500",
    f"trainer.precision={PINNED_PRECISION}",
]


def pipeline(out, tmp_path, **env_extra):
    env = {
        **os.environ,
        **SIZES,
        **env_extra,
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = ["bash", str(ROOT / "scripts" / "pipeline.sh"), str(out), *OVERRIDES, f"data.cache_dir={tmp_path / 'cache'}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_pipeline_script_runs_every_stage_and_labels_on_policy_pairs(tmp_path):
    out = tmp_path / "p"
    proc = pipeline(out, tmp_path, LABEL_PROMPTS="10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("pretrain", "sft", "reward", "ppo"):
        assert (out / stage / "checkpoints" / "last.ckpt").is_file(), stage
    assert "Held-out ground-truth judge score:" in proc.stdout
    summary = json.loads((out / "labels.summary.json").read_text())
    labels = (out / "labels.jsonl").read_text().splitlines()
    assert summary["prompts"] == 10 and summary["pairs"] == len(labels)
    assert "data.extra_pairs=" in (out / "reward" / ".hydra" / "overrides.yaml").read_text()

    # From that pretraining checkpoint: no pretraining stage; a missing one is refused up front.
    again = pipeline(tmp_path / "q", tmp_path, PRETRAINED=str(out / "pretrain" / "checkpoints" / "last.ckpt"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert not (tmp_path / "q" / "pretrain").exists()
    assert (tmp_path / "q" / "ppo" / "checkpoints" / "last.ckpt").is_file()
    missing = pipeline(tmp_path / "r", tmp_path, PRETRAINED=str(tmp_path / "nope.ckpt"))
    assert missing.returncode == 2 and "error: PRETRAINED=" in missing.stderr and not (tmp_path / "r").exists()
