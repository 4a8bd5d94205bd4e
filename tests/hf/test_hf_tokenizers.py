"""HF tokenizers inside lmforge: the same ids and text as transformers on a multilingual text,
special tokens and chat templates carried along, and checkpoint bytes that round-trip."""

from __future__ import annotations

import json
import pickle

import pytest
from hf_helpers import CHATML, MULTILINGUAL, bpe_tokenizer_files, hf_transformers, write_files

from lmforge.data.hf_tokenizer import HFTokenizer, load_hf_tokenizer, save_lmforge_tokenizer, tokenizer_from_bytes

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Sum 2 + 2, 用中文回答 🚀"},
    {"role": "assistant", "content": "四"},
    {"role": "user", "content": "def f(x):\n\treturn x"},
]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bpe")
    write_files(directory, bpe_tokenizer_files())
    return directory


def test_bpe_tokenizer_json_matches_transformers(bpe_dir):
    transformers = hf_transformers()
    ours = HFTokenizer.from_dir(bpe_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(bpe_dir))
    ids = ours.encode(MULTILINGUAL)
    assert ids == theirs.encode(MULTILINGUAL, add_special_tokens=False)
    assert ours.decode(ids) == MULTILINGUAL == theirs.decode(ids)
    assert ours.encode_batch([MULTILINGUAL, "中文 🚀"]) == [ids, ours.encode("中文 🚀")]
    # The model's specials, not lmforge's 0..3: no BOS (Qwen2 style), ChatML EOS, its pad.
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (None, theirs.eos_token_id, theirs.pad_token_id)
    assert ours.encode("hi", bos=True, eos=True) == [*ours.encode("hi"), ours.eos_id]
    assert ours.vocab_size == len(theirs)


def test_chat_template_renders_and_encodes_like_transformers(bpe_dir):
    transformers = hf_transformers()
    ours = HFTokenizer.from_dir(bpe_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(bpe_dir))
    text = ours.apply_chat_template(CHAT)
    assert text == theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert ours.chat_template == CHATML
    # Special-token strings in rendered text become their ids, as in transformers.
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False)
    assert ids.count(ours.eos_id) == 4
    # decode drops pad/bos/eos, like lmforge's Tokenizer; other specials stay visible.
    assert "<|im_end|>" not in ours.decode(ids) and "<|im_start|>" in ours.decode(ids)


def test_checkpoint_bytes_round_trip_and_tell_the_kinds_apart(bpe_dir, tmp_path):
    ours = HFTokenizer.from_dir(bpe_dir)
    again = tokenizer_from_bytes(ours.proto())
    assert again == ours and again.encode(MULTILINGUAL) == ours.encode(MULTILINGUAL)
    assert pickle.loads(pickle.dumps(ours)) == ours
    assert again.fingerprint == ours.fingerprint
    again.save_pretrained(tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # written back verbatim
        assert (tmp_path / "out" / name).read_bytes() == (bpe_dir / name).read_bytes()

    from lmforge.data.tokenizer import Tokenizer, train_tokenizer

    sp = train_tokenizer([MULTILINGUAL] * 20, 400, tmp_path / "cache")
    assert isinstance(tokenizer_from_bytes(sp.proto()), Tokenizer)


def test_special_tokens_fall_back_to_config_json_ids(tmp_path):
    files = bpe_tokenizer_files()
    config = json.loads(files["tokenizer_config.json"])
    for key in ("eos_token", "pad_token"):
        del config[key]
    files["tokenizer_config.json"] = json.dumps(config)
    write_files(tmp_path, files)
    tok = HFTokenizer.from_dir(tmp_path, {"eos_token_id": [2, 0], "bos_token_id": None})
    assert tok.eos_id == 2 and tok.pad_id == 2  # EOS from config.json (first of a list); pad falls back


def test_lmforge_sentencepiece_exports_as_llama_tokenizer(tmp_path):
    transformers = hf_transformers()
    from lmforge.data.tokenizer import Tokenizer, train_tokenizer

    sp = train_tokenizer([MULTILINGUAL] * 20, 400, tmp_path / "cache")
    out = tmp_path / "out"
    written = save_lmforge_tokenizer(sp, out, model_max_length=4096)
    assert "tokenizer.json" in written  # transformers' conversion passed the parity probe
    ids = sp.encode(MULTILINGUAL)

    def check_llama_tokenizer():
        llama = transformers.AutoTokenizer.from_pretrained(str(out))
        assert "Llama" in type(llama).__name__
        assert llama.encode(MULTILINGUAL, add_special_tokens=False) == ids
        assert llama.decode(ids) == MULTILINGUAL
        assert (llama.pad_token_id, llama.bos_token_id, llama.eos_token_id, llama.unk_token_id) == (0, 1, 2, 3)

    check_llama_tokenizer()  # from tokenizer.json
    # And back: the exported tokenizer.model imports as lmforge's own Tokenizer, unchanged.
    back = load_hf_tokenizer(out)
    assert isinstance(back, Tokenizer) and back.proto() == sp.proto()
    (out / "tokenizer.json").unlink()
    check_llama_tokenizer()  # transformers converting tokenizer.model itself


def test_import_writes_the_chat_format_as_a_prompt_template_hydra_composes(bpe_dir, tmp_path):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from lmforge.config import register_configs
    from lmforge.hf.importer import import_to_dir

    src = tmp_path / "chat-model"
    src.mkdir()
    write_files(src, {**bpe_tokenizer_files(), "config.json": json.dumps({
        "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320,
        "max_position_embeddings": 64})})  # fmt: skip
    written = import_to_dir(src, tmp_path / "out", weights=False)
    assert written["chat_config"].endswith("chat/chat-model.yaml")
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra.searchpath=[file://{tmp_path / 'out' / 'conf'}]",
                                          "model=chat-model", "+chat=chat-model"])  # fmt: skip
    GlobalHydra.instance().clear()
    data = OmegaConf.to_container(cfg.data, resolve=True)
    tok = HFTokenizer.from_dir(src)
    rendered = tok.apply_chat_template([{"role": "user", "content": "What is {x}? 🚀"}])
    assert data["prompt_template"].format(prompt="What is {x}? 🚀") == rendered
    assert data["response_prefix"] == "" and cfg.model.qkv_bias
