"""Reward models both ways: an lmforge reward checkpoint exports as a one-label
*ForSequenceClassification that scores like lmforge; an HF one imports as a reward stage."""

from __future__ import annotations

import warnings

import pytest
import torch
from hf_helpers import bpe_tokenizer_files, build_hf_model, hf_transformers, sharpen, write_files

from lmforge.data.hf_tokenizer import HFTokenizer
from lmforge.hf.exporter import ExportWarning, export_hf
from lmforge.hf.importer import import_hf, import_to_dir
from lmforge.model import ModelConfig, ScalarModel, gather_last

LLAMA = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, vocab_size=320, max_seq_len=64)
GPT2 = ModelConfig(n_layer=2, n_head=4, n_kv_head=4, d_model=32, d_ff=128, vocab_size=320, max_seq_len=64,
                   norm="layernorm", pos="learned", activation="gelu", bias=True)  # fmt: skip


def right_padded(pad_id: int):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    for row, n in enumerate((0, 4, 7)):
        if n:
            ids[row, -n:], mask[row, -n:] = pad_id, 0
    return ids, mask


def save_reward_checkpoint(path, cfg: ModelConfig, bias: float, tokenizer) -> ScalarModel:
    torch.manual_seed(0)
    model = sharpen(ScalarModel(cfg))
    with torch.no_grad():
        model.head.bias.fill_(bias)
    meta = {"format": 1, "stage": "reward", "model_config": cfg.__dict__, "config": {}, "lineage": {},
            "tokenizer": torch.frombuffer(bytearray(tokenizer.proto()), dtype=torch.uint8)}  # fmt: skip
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "lmforge": meta}, path)
    return model


@pytest.mark.parametrize("cfg, bias", [(LLAMA, 0.0), (GPT2, 0.7)], ids=["llama", "gpt2-bias-folded"])
def test_reward_export_scores_like_lmforge(cfg, bias, tmp_path):
    transformers = hf_transformers()
    write_files(tmp_path, bpe_tokenizer_files())
    tok = HFTokenizer.from_dir(tmp_path)
    model = save_reward_checkpoint(tmp_path / "rm.ckpt", cfg, bias, tok)
    result = export_hf(tmp_path / "rm.ckpt", tmp_path / "out")
    assert result["architecture"].endswith("ForSequenceClassification")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tok.pad_id
    ids, mask = right_padded(tok.pad_id)
    with torch.no_grad():
        ours = gather_last(model(ids, attention_mask=mask), mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_llama_reward_bias_is_recorded_and_warned(tmp_path):
    hf_transformers()
    write_files(tmp_path, bpe_tokenizer_files())
    save_reward_checkpoint(tmp_path / "rm.ckpt", LLAMA, 0.5, HFTokenizer.from_dir(tmp_path))
    with pytest.warns(ExportWarning, match="bias 0.5"):
        export_hf(tmp_path / "rm.ckpt", tmp_path / "out")
    import json

    assert json.loads((tmp_path / "out" / "config.json").read_text())["lmforge_score_bias"] == 0.5


@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_hf_sequence_classifier_imports_as_reward_model_and_round_trips(name, tmp_path):
    transformers = hf_transformers()
    src = tmp_path / "hf"
    src.mkdir()
    hf = build_hf_model(name, src, head="score")
    ckpt = import_hf(src)
    assert ckpt.stage == "reward"
    model = ScalarModel(ckpt.model_config).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt.state_dict.items()})
    ids, mask = right_padded(pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(
            gather_last(model(ids, attention_mask=mask), mask),
            hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1),
            atol=1e-5, rtol=0,
        )  # fmt: skip
    import_to_dir(src, tmp_path / "lmf")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)  # zero bias: nothing to warn about
        export_hf(tmp_path / "lmf" / "lmforge.ckpt", tmp_path / "out")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
    for key, t in hf.state_dict().items():
        assert torch.equal(t, back.state_dict()[key]), key
