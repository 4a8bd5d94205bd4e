"""Start-up checks: every config validation message names the key and the fix; an unwritable run
folder or a disk without room for the checkpoints fails before training starts."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from _reliability import tiny_cfg
from conftest import compose_config
from omegaconf import OmegaConf, open_dict

from lmforge.config import validate
from lmforge.errors import ConfigError
from lmforge.model import ModelConfigError
from lmforge.run import main
from lmforge.training import fault
from lmforge.training.fault import OutputDirError, check_output_dir, estimate_checkpoint_bytes


@pytest.fixture
def files(tmp_path):
    ckpt = tmp_path / "policy.ckpt"
    ckpt.write_bytes(b"x")
    (tmp_path / "a_dir").mkdir()
    return {"ckpt": str(ckpt), "dir": str(tmp_path / "a_dir")}


CASES = [
    (
        ["model.d_model=130", "model.n_head=4"],
        "model.d_model=130 is not divisible by model.n_head=4: pick d_model as a multiple of n_head",
    ),
    (["model=nano", "model.n_kv_head=3"], "model.n_head=4 is not divisible by model.n_kv_head=3"),
    (["algo.seq_len=4096"], "algo.seq_len=4096 exceeds model.max_seq_len=512: lower algo.seq_len or raise"),
    (["data=jsonl"], "data=jsonl needs data.path=<file.jsonl>: none given"),
    (["data=text"], "data=text needs data.paths=[corpus/*.txt]: none given"),
    (["data=jsonl", "data.path=/nonexistent/x.jsonl"], "data.path=/nonexistent/x.jsonl: no such JSONL file"),
    (["data=jsonl", "data.path={dir}"], "is a directory; give the JSONL file itself"),
    (["data=text", "data.paths=[/nonexistent/*.txt]"], "data.paths: no file matches '/nonexistent/*.txt'"),
    (
        ["data.tokenizer.path=/nonexistent/tok.model"],
        "data.tokenizer.path=/nonexistent/tok.model: no such sentencepiece model file",
    ),
    (["algo=ppo"], "algo=ppo improves an existing language model: set init_from="),
    (["algo=rloo", "init_from={ckpt}"], "algo=rloo needs a reward source: set algo.reward.model="),
    (
        ["algo=grpo", "init_from={ckpt}", "algo.reward.model=/nonexistent/rm.ckpt"],
        "algo.reward.model=/nonexistent/rm.ckpt: no such reward-model checkpoint",
    ),
    (["trainer.keep_last=-1"], "trainer.keep_last=-1 must be >= 0"),
    (["trainer.max_bad_steps=0"], "trainer.max_bad_steps=0 must be >= 1"),
    (["trainer.checkpoint_every_minutes=0"], "trainer.checkpoint_every_minutes=0.0 must be positive"),
]


@pytest.mark.parametrize("overrides,message", CASES, ids=[" ".join(o) for o, _ in CASES])
def test_config_validation_messages(tmp_path, files, overrides, message):
    cfg = compose_config([o.format(**files) for o in overrides], run_dir=tmp_path / "run")
    OmegaConf.resolve(cfg)
    with pytest.raises((ConfigError, ModelConfigError)) as e:
        validate(cfg)
    assert message in str(e.value)


def test_global_batch_not_divisible_by_the_world_size(tmp_path):
    cfg = compose_config(["trainer.devices=4", "trainer.num_nodes=2"], run_dir=tmp_path / "run")
    with open_dict(cfg):  # no stage has the field yet: a plain algo config with it
        cfg.algo = OmegaConf.create({**OmegaConf.to_container(cfg.algo), "global_batch_size": 36})
    with pytest.raises(
        ConfigError,
        match=r"algo.global_batch_size=36 is not divisible by the world size 8 "
        r"\(trainer.devices=4 x trainer.num_nodes=2\)",
    ):
        validate(cfg)
    cfg.algo.global_batch_size = 64
    validate(cfg)


def test_an_unwritable_run_folder_fails_before_anything_is_built(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputDirError, match=r"run_dir=.*a_file/run is not writable"):
        check_output_dir(blocker / "run")
    # main() checks before building data or the model (that would take a while, then fail on save).
    with pytest.raises(OutputDirError, match="Point hydra.run.dir"):
        main(tiny_cfg(blocker / "run", tmp_path / "cache"))


def test_too_little_free_space_for_the_checkpoints_is_refused(tmp_path, monkeypatch):
    model = torch.nn.Linear(1000, 1000)  # ~1M parameters: ~12 MB a checkpoint
    size = estimate_checkpoint_bytes(model)
    assert 12_000_000 < size < 14_000_000
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fault.shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 20_000_000, 20_000_000))
    check_output_dir(tmp_path / "run", size, n_kept=0)  # one checkpoint being written fits
    with pytest.raises(OutputDirError) as e:
        check_output_dir(tmp_path / "run", size, n_kept=2)  # last + best + one being written do not
    msg = str(e.value)
    assert "19.1 MiB free" in msg and "needs about" in msg and "trainer.check_disk_space=false" in msg, msg
