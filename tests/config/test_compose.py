"""Every config file composes; every model x algo combination instantiates; bad values fail fast."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF, compose_config
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from lmforge.algos import STAGES
from lmforge.config import RL_ALGOS, ConfigError, validate
from lmforge.model import CausalLM, ModelConfigError

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
ALGOS = sorted(p.stem for p in (CONF / "algo").glob("*.yaml"))
REQUIRED_PATHS = {
    "text": ["data.paths=[x.txt]"],
    "jsonl": ["data.path=x.jsonl"],
    "hh": ["data.path=x.jsonl"],
    "feedback": ["data.db=x.db"],
}


def group_files(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,name",
    [(g, n) for g in ("model", "data", "algo", "strategy", "trainer", "logger", "experiment") for n in group_files(g)],
)
def test_every_config_file_composes(tmp_path, group, name):
    overrides = [f"{group}={name}"] + (REQUIRED_PATHS.get(name, []) if group == "data" else [])
    cfg = compose_config(overrides, run_dir=tmp_path)
    OmegaConf.resolve(cfg)
    if group == "model":
        OmegaConf.to_object(cfg.model).validate()


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_algo_combination_instantiates(tmp_path, model, algo):
    overrides = [f"model={model}", f"algo={algo}"]
    if algo in RL_ALGOS:  # validate() wants the policy and reward checkpoints to exist
        for name in ("policy.ckpt", "reward.ckpt"):
            (tmp_path / name).touch()
        overrides += [f"init_from={tmp_path / 'policy.ckpt'}", f"algo.reward.model={tmp_path / 'reward.ckpt'}"]
    cfg = compose_config(overrides, run_dir=tmp_path)
    OmegaConf.resolve(cfg)
    mc = validate(cfg)
    assert cfg.algo.name in STAGES
    # Build the network itself on the meta device: shapes and wiring without the memory.
    with torch.device("meta"):
        model = CausalLM(mc)
    assert model.num_params() > 0


def test_default_composition(tmp_path):
    cfg = compose_config([], run_dir=tmp_path)
    assert cfg.model_name == "tiny"
    assert cfg.algo.name == "pretrain"
    assert cfg.data.source == "synthetic"
    # Defined once by the model, interpolated into the tokenizer.
    assert cfg.data.tokenizer.vocab_size == cfg.model.vocab_size


def test_typo_in_key_fails_at_compose_naming_the_key(tmp_path):
    with pytest.raises(ConfigCompositionException) as e:
        compose_config(["model.n_layr=4"], run_dir=tmp_path)
    assert "n_layr" in str(e.value.__cause__ or e.value)


def test_wrong_type_fails_at_compose(tmp_path):
    with pytest.raises(ConfigCompositionException) as e:
        compose_config(["model.n_layer=four"], run_dir=tmp_path)
    assert "n_layer" in str(e.value.__cause__ or e.value)


def test_typo_in_algo_key_fails(tmp_path):
    with pytest.raises(ConfigCompositionException) as e:
        compose_config(["algo.optim.lrr=1"], run_dir=tmp_path)
    assert "lrr" in str(e.value.__cause__ or e.value)


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["model.d_model=130", "model.n_head=4"], "model.d_model=130"),
        (["model.n_kv_head=3"], "model.n_kv_head"),
        (["model.norm=batchnorm"], "model.norm"),
        (["algo.seq_len=4096"], "algo.seq_len=4096 exceeds model.max_seq_len"),
        (["trainer.max_steps=0"], "trainer.max_steps"),
        (["data.val_fraction=1.5"], "data.val_fraction"),
        (["resume=/nonexistent/last.ckpt"], "resume=/nonexistent/last.ckpt"),
    ],
)
def test_bad_values_fail_validation_with_the_key(tmp_path, overrides, fragment):
    cfg = compose_config(overrides, run_dir=tmp_path)
    OmegaConf.resolve(cfg)
    with pytest.raises((ConfigError, ModelConfigError)) as e:
        validate(cfg)
    assert fragment in str(e.value)


def test_multiple_loggers_compose(tmp_path):
    cfg = compose_config(["logger=[csv,tensorboard]"], run_dir=tmp_path)
    assert set(cfg.logger.keys()) == {"csv", "tensorboard"}
