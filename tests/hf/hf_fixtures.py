"""The session's tiny HF models (see hf_helpers.py), built once and shared by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_helpers import build_hf_model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """name -> (directory, transformers model) for every family, built once per session."""
    cache: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(name: str):
        if name not in cache:
            directory = tmp_path_factory.mktemp(f"hf-{name}")
            cache[name] = (directory, build_hf_model(name, directory))
        return cache[name]

    return get
