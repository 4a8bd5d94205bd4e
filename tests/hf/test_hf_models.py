"""lmforge's backbone computes what transformers computes, for every supported family; export
gives transformers the same model back; import -> export returns the very tensors."""

from __future__ import annotations

import json

import pytest
import torch
from hf_fixtures import hf_models  # noqa: F401  (a session fixture)
from hf_helpers import build_hf_model, family_configs, hf_transformers, left_padded_batch, positions_of

from lmforge.hf.exporter import export_hf, read_checkpoint
from lmforge.hf.importer import import_hf, import_to_dir
from lmforge.model import CausalLM, KVCache, generate

FAMILIES = list(family_configs())
ATOL = 1e-5


def lmforge_lm(directory) -> CausalLM:
    ckpt = import_hf(directory)
    lm = CausalLM(ckpt.model_config).eval()
    lm.load_state_dict({k.removeprefix("model."): v for k, v in ckpt.state_dict.items()})
    return lm


def max_diff(a, b, mask):
    return (a - b).abs()[mask.bool()].max().item()


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers_with_and_without_kv_cache(name, hf_models, record_property):
    directory, hf = hf_models(name)
    lm = lmforge_lm(directory)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask)).logits
        full = lm(ids, attention_mask=mask)
        # The KV cache: a 10-token prefill, then one token per call, as generate() runs it.
        cache = KVCache.allocate(lm.cfg, ids.shape[0], ids.shape[1])
        steps = [lm(ids[:, :10], attention_mask=mask[:, :10], kv_cache=cache)]
        for t in range(10, ids.shape[1]):
            steps.append(lm(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], kv_cache=cache))
        cached = torch.cat(steps, dim=1)
    diff, diff_cached = max_diff(full, expected, mask), max_diff(cached, expected, mask)
    record_property("max_logit_diff", max(diff, diff_cached))
    print(f"\n{name}: max |logit diff| {diff:.3g} (no cache), {diff_cached:.3g} (KV cache)")
    assert diff <= ATOL and diff_cached <= ATOL


@pytest.mark.parametrize("name", ["llama", "llama-tied", "qwen2-tied", "gpt2"])
def test_export_loads_in_transformers_with_same_logits_and_greedy_tokens(name, hf_models, tmp_path):
    transformers = hf_transformers()
    directory, hf = hf_models(name)
    import_to_dir(directory, tmp_path / "lmf")
    export_hf(tmp_path / "lmf" / "lmforge.ckpt", tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids, mask = left_padded_batch(seed=2)
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask)).logits
        b = reloaded(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask)).logits
    assert torch.equal(a[mask.bool()], b[mask.bool()])

    # Greedy generation: transformers (its own KV cache, left padding) vs lmforge's generate.
    lm = lmforge_lm(directory)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    eos = pad = 0  # never sampled by these random weights' argmax? compared up to it anyway
    ours = generate(lm, prompts, max_new_tokens=8, eos_id=eos, pad_id=pad, temperature=0.0)
    theirs = reloaded.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=pad
    )
    new_ours, new_theirs = ours.sequences[:, ours.prompt_len :], theirs[:, ids.shape[1] :]
    n = min(new_ours.shape[1], new_theirs.shape[1])
    assert torch.equal(new_ours[:, :n] * ours.response_mask[:, :n], new_theirs[:, :n] * ours.response_mask[:, :n])


def tensors_of(directory):
    from safetensors import safe_open

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize(
    "name, dtype", [("llama", torch.bfloat16), ("qwen2", torch.float32), ("gpt2-untied", torch.float16)]
)
def test_import_then_export_gives_byte_identical_tensors(name, dtype, tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    build_hf_model(name, src, dtype=dtype, max_shard_size="40KB")  # sharded: read through the index
    assert (src / "model.safetensors.index.json").is_file()
    import_to_dir(src, tmp_path / "lmf")
    ckpt = read_checkpoint(tmp_path / "lmf" / "lmforge.ckpt")
    assert {t.dtype for t in ckpt["state_dict"].values()} == {dtype}  # kept, never cast
    result = export_hf(tmp_path / "lmf" / "lmforge.ckpt", tmp_path / "out", max_shard_bytes=30_000)
    assert "model.safetensors.index.json" in result["files"]
    before, after = tensors_of(src), tensors_of(tmp_path / "out")
    assert sorted(before) == sorted(after)
    for key, t in before.items():
        assert t.dtype == after[key].dtype and t.shape == after[key].shape, key
        assert torch.equal(t.contiguous().view(torch.uint8), after[key].contiguous().view(torch.uint8)), key
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.")


def test_lmforge_model_exports_with_its_sentencepiece_tokenizer(tmp_path):
    """A model lmforge trained (random here) -> HF: logits and tokenizer both match."""
    transformers = hf_transformers()
    from hf_helpers import MULTILINGUAL, sharpen

    from lmforge.data.tokenizer import train_tokenizer
    from lmforge.model import ModelConfig

    tok = train_tokenizer([MULTILINGUAL] * 20, 400, tmp_path / "cache")
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, vocab_size=416, max_seq_len=64,
                      tie_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    lm = sharpen(CausalLM(cfg))
    meta = {"format": 1, "stage": "sft", "model_config": cfg.__dict__, "config": {}, "lineage": {},
            "tokenizer": torch.frombuffer(bytearray(tok.proto()), dtype=torch.uint8)}  # fmt: skip
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in lm.state_dict().items()}, "lmforge": meta}, tmp_path / "sft.ckpt"
    )
    export_hf(tmp_path / "sft.ckpt", tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    ids = tok.encode(MULTILINGUAL)[:40]
    assert hf_tok.encode(MULTILINGUAL, add_special_tokens=False)[:40] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, lm(x), atol=ATOL, rtol=0)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)


def test_sft_stage_starts_from_an_hf_directory(hf_models, make_cfg, tmp_path):
    """init_from=<HF dir> with the model config `convert config` writes: the stage gets the HF
    weights and tokenizer (through lmforge.hf.importer.load_any_checkpoint's directory dispatch)."""
    from lmforge.algos.sft import build
    from lmforge.convert import main

    directory, hf = hf_models("qwen2-tied")
    assert main(["config", str(directory), f"out={tmp_path / 'conv'}", "name=tiny-qwen"]) == 0
    cfg = make_cfg(f"hydra.searchpath=[file://{tmp_path / 'conv' / 'conf'}]", "model=tiny-qwen", "algo=sft",
                   f"init_from={directory}", "algo.seq_len=32", "data.n_docs=200", "data.n_sft=16",
                   "algo.eval_prompts=2")  # fmt: skip
    module, _ = build(cfg, tmp_path / "run")
    assert module.tokenizer == import_hf(directory).tokenizer
    assert module.lineage["init_from"] == str(directory)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask)).logits
        got = module.model.eval()(ids, attention_mask=mask)
    assert max_diff(got, expected, mask) <= ATOL


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_legacy_key_layouts_import_and_unknown_tensors_are_refused(name, hf_models, tmp_path):
    """The original `gpt2` checkpoint has no `transformer.` prefix and stores causal-mask
    buffers; old Llama conversions store rotary inv_freq buffers. A tensor with no place in
    lmforge's model (here a Qwen3-style q_norm) is refused by name, never dropped."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lmforge.hf.hf_config import UnsupportedModelError

    directory, hf = hf_models(name)
    legacy = tmp_path / "legacy"
    shutil.copytree(directory, legacy)
    state = load_file(str(legacy / "model.safetensors"))
    if name == "gpt2":
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        state.update({"h.0.attn.bias": torch.ones(1, 1, 64, 64), "h.0.attn.masked_bias": torch.tensor(-1e4)})
    else:
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(state, str(legacy / "model.safetensors"))
    lm = lmforge_lm(legacy)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask)).logits
        assert max_diff(lm(ids, attention_mask=mask), expected, mask) <= ATOL

    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    save_file(state, str(legacy / "model.safetensors"))
    with pytest.raises(UnsupportedModelError, match="q_norm"):
        import_hf(legacy)
