"""The converter's command line, the model config it writes, and its refusals (these need
neither transformers nor any weights: a config.json is enough)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lmforge.convert import main
from lmforge.hf.hf_config import UnsupportedModelError, family_of, hf_to_model_config, model_config_to_hf
from lmforge.model import ModelConfig

LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
}  # fmt: skip


def with_(**changes):
    return {**LLAMA, **changes}


@pytest.mark.parametrize(
    "hf, message",
    [
        (with_(model_type="qwen3", architectures=["Qwen3ForCausalLM"]), "model_type='qwen3'"),
        (with_(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn'"),
        (with_(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling type 'dynamic'"),
        (with_(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "'longrope'"),
        (with_(model_type="mistral", sliding_window=32), "sliding_window=32 .* Import with max_seq_len=32"),
        (with_(model_type="qwen2", use_sliding_window=True, sliding_window=64), "sliding_window=64"),
        (with_(head_dim=32), "head_dim=32"),
        (with_(hidden_act="gelu"), "hidden_act='gelu'"),
        (with_(attention_bias=True, mlp_bias=False), "attention_bias=True with mlp_bias=False"),
        (with_(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
        (
            {
                "model_type": "gpt2",
                "n_embd": 64,
                "n_layer": 2,
                "n_head": 4,
                "vocab_size": 100,
                "activation_function": "relu",
            },
            "activation_function='relu'",
        ),
    ],
)
def test_unsupported_models_are_refused_by_name(hf, message):
    with pytest.raises(UnsupportedModelError, match=message):
        hf_to_model_config(hf)


@pytest.mark.parametrize(
    "archs, labels, message",
    [(["LlamaForTokenClassification"], None, "LlamaForTokenClassification"),
     (["LlamaForSequenceClassification"], 3, "3 labels")],
)  # fmt: skip
def test_heads_other_than_lm_and_one_label_score_are_refused(tmp_path, archs, labels, message):
    from lmforge.hf.importer import import_hf

    (tmp_path / "config.json").write_text(json.dumps(with_(architectures=archs, num_labels=labels)))
    with pytest.raises(UnsupportedModelError, match=message):
        import_hf(tmp_path)


def test_sliding_window_model_imports_when_the_context_fits_the_window():
    mc = hf_to_model_config(with_(model_type="mistral", sliding_window=32), max_seq_len=32)
    assert mc.max_seq_len == 32
    hf_to_model_config(with_(model_type="qwen2", use_sliding_window=False, sliding_window=8))  # window unused


@pytest.mark.parametrize(
    "hf",
    [
        LLAMA,
        with_(tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 4.0}),
        with_(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 5e5,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),
        with_(model_type="qwen2"),
        with_(attention_bias=True, mlp_bias=True),
        {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100, "n_positions": 32},
    ],
)
def test_config_survives_export_and_reimport(hf):
    mc = hf_to_model_config(hf)
    assert hf_to_model_config(model_config_to_hf(mc, family_of(mc))) == mc


def test_export_refuses_what_no_family_computes():
    with pytest.raises(UnsupportedModelError, match="norm='layernorm', pos='rope'"):
        family_of(ModelConfig(2, 4, 4, 64, 128, 100, 64, norm="layernorm"))
    qwen_like = hf_to_model_config(with_(model_type="qwen2"))
    with pytest.raises(UnsupportedModelError, match="export as model_type=qwen2"):
        family_of(qwen_like, "llama")


def test_config_command_writes_a_model_config_hydra_composes(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmforge.config import register_configs

    src = tmp_path / "SmolThing-135M"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(with_(rope_scaling={"rope_type": "linear", "factor": 2.0})))
    assert main(["config", str(src), f"out={tmp_path / 'out'}"]) == 0
    assert (tmp_path / "out" / "conf" / "model" / "smolthing-135m.yaml").is_file()

    register_configs()
    GlobalHydra.instance().clear()
    conf = str(Path(__file__).resolve().parents[2] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose(
            "train", overrides=[f"hydra.searchpath=[file://{tmp_path / 'out' / 'conf'}]", "model=smolthing-135m"]
        )
    GlobalHydra.instance().clear()
    assert OmegaConf.to_object(cfg.model) == hf_to_model_config(json.loads((src / "config.json").read_text()))


def test_command_line_errors_are_one_clear_line(tmp_path, capsys):
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(with_(rope_scaling={"type": "yarn", "factor": 4.0})))
    assert main(["import", str(src), f"out={tmp_path / 'o'}"]) == 1
    assert "rope_scaling type 'yarn'" in capsys.readouterr().err
    assert main(["import", str(src)]) == 2  # no out=
    assert main(["export", str(tmp_path / "missing.ckpt"), f"out={tmp_path / 'o'}"]) == 1
    assert "no such checkpoint" in capsys.readouterr().err
    (src / "config.json").write_text(json.dumps(LLAMA))
    (src / "pytorch_model.bin").write_bytes(b"")
    assert main(["import", str(src), f"out={tmp_path / 'o'}"]) == 1
    assert "PyTorch pickle weights" in capsys.readouterr().err


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rope_scaling": "yarn"}, "model.rope_scaling='yarn' is not supported"),
        ({"rope_scaling": "linear", "pos": "learned"}, "scales rotary positions"),
        ({"rope_scaling": "linear", "rope_factor": 0.0}, "model.rope_factor=0.0"),
        ({"rope_scaling": "llama3", "rope_low_freq_factor": 4.0}, "0 < low < high"),
        ({"rope_original_max_seq_len": 0}, "model.rope_original_max_seq_len=0"),
    ],
)
def test_model_config_validates_the_hf_fields(changes, message):
    from dataclasses import replace

    from lmforge.model import ModelConfigError

    base = ModelConfig(2, 4, 2, 64, 128, 100, 64)
    with pytest.raises(ModelConfigError, match=message):
        replace(base, **changes).validate()


def test_qkv_bias_biases_the_fused_projection_only():
    from lmforge.model import Transformer

    block = Transformer(ModelConfig(2, 4, 2, 64, 128, 100, 64, qkv_bias=True)).blocks[0]
    assert block.attn.qkv.bias.shape == ((4 + 2 * 2) * 16,)
    assert block.attn.out_proj.bias is None and block.mlp.up.bias is None
