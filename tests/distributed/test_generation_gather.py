"""gathered_for_generation: one all-gather per FSDP unit for a whole generation, the same tokens
as the unsharded model, and parameters sharded again afterwards (2 processes, gloo)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_helpers import clean_env, free_port

pytestmark = [pytest.mark.distributed]

WORKER = Path(__file__).with_name("_fsdp_generate_worker.py")


def test_generation_gathers_once_per_unit(tmp_path):
    port, out = str(free_port()), str(tmp_path / "result")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), "2", port, out],
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    for rank in (0, 1):
        r = torch.load(f"{out}.rank{rank}.pt", weights_only=True)
        blocks = 4  # and the root, which FSDP keeps gathered after a forward until a backward
        assert blocks <= r["once"] <= blocks + 1  # once per unit for the whole generation
        assert r["per_token"] >= blocks * 12  # without it: every block, for every forward
        assert torch.equal(r["gathered"], r["expected"]) and torch.equal(r["plain"], r["expected"])
        assert r["resharded"] and r["grads"]
