"""Checkpoints load with weights_only=True everywhere (lmforge's loader, Lightning's resume path,
resume=auto's probe): a pickle with code in it is refused, never run. A checkpoint of another
model shape or vocabulary names the mismatched keys and shapes; one of the wrong stage is
recognized and explained."""

from __future__ import annotations

import builtins
from dataclasses import replace

import pytest
import torch
from _reliability import one_thread, tiny_cfg, trained_run  # noqa: F401 (one_thread: a fixture)

from lmforge.model import CausalLM
from lmforge.run import main, prepare_resume
from lmforge.training.checkpoint import (
    CheckpointError,
    check_compatible,
    load_checkpoint,
    load_matching,
    require_stage,
    submodule_state,
)
from lmforge.training.checkpoint_io import AtomicCheckpointIO, newest_valid_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.fixture
def malicious(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(
        {
            "lmforge": {"stage": "pretrain"},
            "state_dict": {"w": torch.zeros(2)},
            "global_step": 9,
            "loops": {},
            "optimizer_states": [],
            "x": Payload(marker),
        },
        path,
    )
    # The payload is live: an unsafe load would run it.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"
    marker.unlink()
    return path, marker


def test_a_pickle_with_code_is_refused_by_every_loader(malicious, tmp_path):
    path, marker = malicious
    with pytest.raises(CheckpointError, match="refuses to execute"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        AtomicCheckpointIO().load_checkpoint(path)  # what trainer.fit(ckpt_path=...) reads through
    with pytest.warns(UserWarning, match="weights_only=True only"), pytest.raises(CheckpointError):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)  # asking for pickles is ignored
    said = []
    assert newest_valid_checkpoint(tmp_path / "run", say=said.append) is None  # resume=auto skips it
    assert "last.ckpt" in said[0]
    with pytest.raises(CheckpointError):
        main(tiny_cfg(tmp_path / "run2", tmp_path / "cache", f"resume={path}"))
    assert not marker.exists(), "the pickled code ran"


def test_the_trainer_reads_and_writes_through_the_safe_atomic_io(tmp_path):
    from lmforge.training.trainer import build_trainer

    cfg = tiny_cfg(tmp_path / "run", tmp_path / "cache")
    trainer = build_trainer(cfg, tmp_path / "run", [], _Stub())
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


class _Stub(torch.nn.Module):
    automatic_optimization = True


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_cache):
    return trained_run(tmp_path_factory, shared_cache) / "checkpoints" / "last.ckpt"


def test_another_model_shape_names_the_fields_and_the_tensors(trained):
    ckpt = load_checkpoint(trained)
    other = replace(ckpt.model_config, d_model=64, d_ff=256)
    with pytest.raises(CheckpointError) as e:
        check_compatible(ckpt, other)
    assert "model.d_model: checkpoint 128 vs config 64" in str(e.value)
    assert "model.d_ff: checkpoint 512 vs config 256" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        load_matching(CausalLM(other), submodule_state(ckpt.state_dict, "model"), "init_from=x")
    msg = str(e.value)
    assert "shape mismatch" in msg and "checkpoint (512, 128) vs model (512, 64)" in msg, msg


def test_another_vocabulary_names_vocab_size_and_the_embedding(trained):
    ckpt = load_checkpoint(trained)
    other = replace(ckpt.model_config, vocab_size=1024)
    with pytest.raises(CheckpointError, match=r"model.vocab_size: checkpoint 512 vs config 1024"):
        check_compatible(ckpt, other)
    with pytest.raises(CheckpointError) as e:
        load_matching(CausalLM(other), submodule_state(ckpt.state_dict, "model"), "init_from=x")
    assert "(512, 128) vs model (1024, 128)" in str(e.value)


def test_resume_refuses_another_shape_before_building_anything(trained, tmp_path):
    cfg = tiny_cfg(tmp_path / "run", tmp_path / "cache", f"resume={trained}", "model.n_layer=2")
    with pytest.raises(
        CheckpointError, match=r"resume=.*different model shape:\n  model.n_layer: checkpoint 4 vs config 2"
    ):
        prepare_resume(cfg, str(trained))


def test_a_checkpoint_of_the_wrong_stage_is_explained(trained, tmp_path):
    raw = torch.load(trained, weights_only=True)
    raw["lmforge"]["stage"] = "reward"
    reward = tmp_path / "reward.ckpt"
    torch.save(raw, reward)
    ckpt = load_checkpoint(reward)
    with pytest.raises(CheckpointError) as e:
        require_stage(ckpt, ("pretrain", "sft"), "init_from")
    assert "is a 'reward' checkpoint" in str(e.value) and "scalar head" in str(e.value)
    # resume= of another stage: this run's stage is named, and what to do instead.
    cfg = tiny_cfg(tmp_path / "run", tmp_path / "cache", f"resume={reward}")
    with pytest.raises(CheckpointError, match="is a 'reward' checkpoint, but this run is algo=pretrain"):
        prepare_resume(cfg, str(reward))
    cfg = tiny_cfg(tmp_path / "run", tmp_path / "cache", "algo=sft", f"resume={trained}")
    with pytest.raises(CheckpointError, match=r"'pretrain' checkpoint, but this run is algo=sft.*use init_from="):
        prepare_resume(cfg, str(trained))


def test_resume_with_other_data_order_settings_warns_naming_them(trained, tmp_path):
    cfg = tiny_cfg(tmp_path / "run", tmp_path / "cache", f"resume={trained}", "seed=7", "algo.batch_size=8")
    with pytest.warns(UserWarning) as record:
        prepare_resume(cfg, str(trained))
    msg = "\n".join(str(w.message) for w in record)
    assert "will not read what the original would have" in msg
    assert "seed: checkpoint 1337 vs now 7" in msg and "algo.batch_size: checkpoint 4 vs now 8" in msg
