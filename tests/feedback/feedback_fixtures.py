"""Helpers of the feedback tests: a nano checkpoint of each kind, a model-free pair source, a
uvicorn server in a thread, free ports. Imported by the test modules (a second conftest.py would
shadow tests/conftest.py for `from conftest import ...`)."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, compose_config

_BUILT: dict[str, dict[str, Path]] = {}


def build_checkpoints(base: Path) -> dict[str, Path]:
    """A pretraining checkpoint (nano, untrained: sampling only needs the shapes and the
    tokenizer) at <base>/run/checkpoints/last.ckpt, and a reward-model checkpoint, both written
    the way the stages write them (state_dict + the `lmforge` metadata)."""
    import torch

    from lmforge.algos.pretrain import PretrainModule
    from lmforge.algos.reward import RewardModule
    from lmforge.data.tokenizer import train_tokenizer
    from lmforge.world.generator import SyntheticWorld

    tok = train_tokenizer(SyntheticWorld(0).pretrain_documents(300), 512, base / "cache")
    out = {}
    for name, overrides, path in (
        ("lm", ["experiment=smoke", "logger=none"], base / "run" / "checkpoints" / "last.ckpt"),
        ("reward", ["experiment=smoke", "algo=reward", "logger=none"], base / "reward" / "last.ckpt"),
    ):
        torch.manual_seed(1)
        cfg = compose_config([*overrides, f"data.cache_dir={base / 'cache'}"], run_dir=path.parent.parent)
        module = (PretrainModule if name == "lm" else RewardModule)(cfg, tok)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": module.state_dict(), "lmforge": module.checkpoint_metadata()}, path)
        out[name] = path
    return out


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Built once per test session, whichever module asks first."""
    if "ckpts" not in _BUILT:
        _BUILT["ckpts"] = build_checkpoints(tmp_path_factory.mktemp("feedback-ckpts"))
    return _BUILT["ckpts"]


class FakeSource:
    """Two 'systems' answering instantly and deterministically (API tests need no model)."""

    def __init__(self):
        self.calls = 0
        self.generated: list[str] = []

    def systems(self):
        return (
            {"name": "1", "ckpt": "/x/one.ckpt", "ckpt_sha256": "1" * 64, "temperature": 0.7},
            {"name": "2", "ckpt": "/x/two.ckpt", "ckpt_sha256": "2" * 64, "temperature": 1.2},
        )

    def generate(self, rendered_prompts, seed):
        self.calls += 1
        self.generated += rendered_prompts
        return [
            (f" first answer to {p.splitlines()[0]}", f" second answer to {p.splitlines()[0]}")
            for p in rendered_prompts
        ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """A real uvicorn server for an app object, in a thread of the test process."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


PYTHON = sys.executable
__all__ = ["ROOT", "PYTHON", "FakeSource", "ThreadServer", "build_checkpoints", "ckpts", "free_port"]
