"""The gradient of one RL update on two ranks (DDP over gloo, unequal token counts per rank,
micro-batches of 2) equals the gradient of the same update over all its rows in one process,
for ppo, reinforce, rloo, grpo and Dr. GRPO (see _rl_ddp_update_worker.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "algos"))  # the shared RL helpers

from dist_helpers import clean_env, free_port  # noqa: E402
from test_rollout import build_rl_assets  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("_rl_ddp_update_worker.py")


def test_an_rl_update_has_the_same_gradient_on_two_ranks_as_in_one_process(tmp_path, tmp_path_factory, shared_cache):
    assets = build_rl_assets(tmp_path_factory, shared_cache)
    port, out = str(free_port()), str(tmp_path / "result")
    args = [out, str(assets["policy"]), str(assets["cache"]), str(tmp_path)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), "2", port, *args],
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-4000:] for log in logs)
    results = [torch.load(f"{out}.rank{r}.pt", weights_only=True) for r in (0, 1)]
    for algo in ("ppo", "reinforce", "rloo", "grpo", "dr-grpo"):
        a, b = results[0][algo], results[1][algo]
        assert torch.equal(a["sequences"], b["sequences"]), "both ranks hold the same rollout"
        assert a["rank_tokens"] > 2 * b["rank_tokens"], (a["rank_tokens"], b["rank_tokens"])
        assert a["rank_tokens"] + b["rank_tokens"] == a["tokens"]
        ref, ddp = a["reference"], a["ddp"]
        assert ref.keys() == ddp.keys() and ref
        diff = sum(float((ref[n] - ddp[n]).double().pow(2).sum()) for n in ref) ** 0.5
        norm = sum(float(ref[n].double().pow(2).sum()) for n in ref) ** 0.5
        assert norm > 0 and diff / norm < 1e-4, (algo, diff / norm)
        for n in ddp:  # DDP left every rank with the same (averaged) gradient
            torch.testing.assert_close(ddp[n], b["ddp"][n], rtol=0, atol=0)
