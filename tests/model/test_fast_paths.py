"""Every fast path is a switch, and switching it changes speed, not results.

attention implementations, static-shape KV cache, AdamW implementations, CPU bf16 autocast
selection, pinned memory, torch.compile (+ its cache folder). Activation checkpointing is
checked in tests/distributed/test_strategy_config.py, length bucketing in tests/data.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lmforge.model import CausalLM, ModelConfig, generate
from lmforge.model.kv_cache import KVCache
from lmforge.model.transformer import ModelConfigError
from lmforge.training.optim import OptimConfig, build_adamw

CFG = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, vocab_size=61, max_seq_len=48)
ROWS = [[5, 17, 3, 28, 9, 41, 7, 2, 60], [12, 4, 59, 31], [27]]


def lm(cfg: ModelConfig = CFG, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(cfg)
    with torch.no_grad():  # larger weights than the init: peaked, input-dependent outputs
        for p in model.parameters():
            p.mul_(8.0)
    return model


def right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    idx = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
    return idx, mask


def loss_and_grads(model: CausalLM, idx, mask) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad()
    logits = model(idx, attention_mask=mask)
    mask = torch.ones_like(idx, dtype=torch.bool) if mask is None else mask
    loss = F.cross_entropy(logits[:, :-1][mask[:, 1:]], idx[:, 1:][mask[:, 1:]])
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("impl", ["eager", "flash", "sdpa"])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_implementations_agree_forward_and_backward(impl, padded):
    idx, mask = right_padded(ROWS) if padded else (torch.randint(0, 61, (3, 12)), None)
    reference = lm()
    other = lm(replace(CFG, attention=impl))
    other.load_state_dict(reference.state_dict())
    ref_logits, ref_loss, ref_grads = loss_and_grads(reference, idx, mask)
    logits, loss, grads = loss_and_grads(other, idx, mask)
    real = mask if mask is not None else torch.ones_like(idx, dtype=torch.bool)
    torch.testing.assert_close(logits[real], ref_logits[real], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    for name, g in ref_grads.items():
        # Summation order differs: compare to the gradient's scale (these weights are x8, grads ~40).
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-4 * float(g.abs().max()), msg=name)


def test_eager_attention_with_the_kv_cache_matches_sdpa():
    prompts = [[5, 17, 3, 8, 9], [12, 4], [7, 1, 22, 30, 31, 2, 6, 11]]
    reference = lm()
    eager = lm(replace(CFG, attention="eager"))
    eager.load_state_dict(reference.state_dict())
    kwargs = dict(max_new_tokens=10, eos_id=60, pad_id=0, temperature=0.0)
    assert torch.equal(generate(eager, prompts, **kwargs).sequences, generate(reference, prompts, **kwargs).sequences)


def test_unknown_attention_implementation_names_the_key():
    with pytest.raises(ModelConfigError, match=r"model.attention='fast'.*auto"):
        CausalLM(replace(CFG, attention="fast"))


def test_static_cache_generation_matches_the_dynamic_cache():
    prompts = [[5, 17, 3, 8, 9], [12, 4], [7, 1, 22, 30, 31, 2, 6, 11]]
    model = lm()
    kwargs = dict(max_new_tokens=12, eos_id=60, pad_id=0)
    greedy = generate(model, prompts, temperature=0.0, **kwargs)
    static = generate(model, prompts, temperature=0.0, static_cache=True, **kwargs)
    assert torch.equal(static.sequences, greedy.sequences)
    assert torch.equal(static.response_mask, greedy.response_mask)
    # Sampling too: the same generator draws the same tokens from the same distributions.
    sampled = [
        generate(
            model, prompts, temperature=1.0, generator=torch.Generator().manual_seed(3), static_cache=s, **kwargs
        ).sequences
        for s in (False, True)
    ]
    assert torch.equal(*sampled)


def test_static_cache_gives_every_decode_step_the_same_shapes():
    model = lm()
    key_shapes = []
    handle = model.backbone.blocks[0].attn.register_forward_hook(
        lambda mod, args, out: key_shapes.append((tuple(args[0].shape), tuple(args[2].shape)))
    )
    try:
        generate(model, [[5, 17, 3], [12]], max_new_tokens=6, eos_id=60, pad_id=0, temperature=0.0, static_cache=True)
    finally:
        handle.remove()
    prefill, *decode = key_shapes
    assert prefill == ((2, 3, 32), (2, 1, 3, 9))  # 3 prompt columns, masks over all 9 cache columns
    assert len(decode) == 5 and set(decode) == {((2, 1, 32), (2, 1, 1, 9))}


def test_static_cache_wants_a_mask_over_all_of_its_columns():
    model = lm()
    cache = KVCache.allocate(CFG, 1, 10, static=True)
    with pytest.raises(ValueError, match="static KV cache"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 3, dtype=torch.bool), kv_cache=cache)


@pytest.mark.parametrize("impl", ["loop", "fused"])
def test_adamw_implementations_take_the_same_steps(impl):
    torch.manual_seed(0)
    base = CausalLM(CFG)
    models = {"foreach": base, impl: copy.deepcopy(base)}
    opts = {k: build_adamw(m, OptimConfig(lr=1e-2, impl=k)) for k, m in models.items()}
    assert opts[impl].defaults["fused"] if impl == "fused" else opts[impl].defaults["foreach"] is False
    start = base.backbone.wte.weight.detach().clone()
    idx = torch.randint(0, 61, (4, 16))
    for _ in range(5):
        for k, m in models.items():
            F.cross_entropy(m(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
            opts[k].step()
            opts[k].zero_grad()
    for (name, a), b in zip(models["foreach"].named_parameters(), models[impl].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(models[impl].backbone.wte.weight, start)  # they did train


def test_measuring_the_matmul_peak_leaves_the_global_rng_alone():
    from lmforge.training.throughput import measure_matmul_peak

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    measure_matmul_peak(torch.device("cpu"), torch.float32, n=64, iters=1)
    assert torch.equal(torch.rand(3), expected)


def test_pinned_memory_follows_the_config(monkeypatch):
    from lmforge.data.config import use_pinned_memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert use_pinned_memory(OmegaConf.create({"pin_memory": None})) is False
    assert use_pinned_memory(OmegaConf.create({"pin_memory": True})) is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert use_pinned_memory(OmegaConf.create({"pin_memory": None})) is True
    assert use_pinned_memory(OmegaConf.create({"pin_memory": False})) is False


def test_compile_cache_dir_goes_to_inductor_unless_the_user_set_one(monkeypatch, tmp_path):
    from lmforge.run import use_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    use_compile_cache(OmegaConf.create({"compile": False, "compile_cache_dir": str(tmp_path)}))
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    use_compile_cache(OmegaConf.create({"compile": True, "compile_cache_dir": str(tmp_path / "c")}))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "c" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/mine")
    use_compile_cache(OmegaConf.create({"compile": True, "compile_cache_dir": str(tmp_path / "d")}))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/mine"


@pytest.mark.slow
def test_compiled_model_matches_eager_and_fills_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    idx, mask = torch.randint(0, 61, (2, 12)), None
    eager = lm()
    compiled = lm()
    compiled.compile()
    ref_logits, ref_loss, ref_grads = loss_and_grads(eager, idx, mask)
    logits, loss, grads = loss_and_grads(compiled, idx, mask)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-3, atol=1e-4 * float(g.abs().max()), msg=name)
    assert any(p.is_file() for p in Path(tmp_path / "inductor").rglob("*")), "nothing cached"
    torch._dynamo.reset()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_lm_loss_matches_the_full_logits_loss_and_gradients(chunk, autocast):
    from lmforge.model.lm_loss import IGNORE_INDEX

    idx = torch.randint(0, 61, (3, 21))
    targets = torch.randint(0, 61, (3, 21))
    targets[0, :5] = IGNORE_INDEX  # e.g. SFT's prompt positions
    results = []
    for loss_chunk in (0, chunk):
        model = lm()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            total = model(idx, targets=targets, loss_chunk=loss_chunk)
        total.backward()
        results.append((total.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_grads), (chunked, grads) = results
    assert plain.dtype == chunked.dtype == torch.float32
    tol = dict(rtol=2e-2, atol=1e-2) if autocast else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(chunked, plain, **tol)
    for name, g in plain_grads.items():
        scale = float(g.abs().max())
        torch.testing.assert_close(grads[name], g, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=name)
    # Without gradients (validation) the chunked path computes the loss alone, the same value.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        torch.testing.assert_close(lm()(idx, targets=targets, loss_chunk=chunk), plain, **tol)


def test_ignored_targets_carry_no_loss_and_no_gradient():
    from lmforge.model.lm_loss import IGNORE_INDEX, chunked_cross_entropy_sum

    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.tensor([3, IGNORE_INDEX, 5, IGNORE_INDEX, 0, 10])
    total = chunked_cross_entropy_sum(hidden, weight, targets, chunk=4)
    total.backward()
    real = targets != IGNORE_INDEX
    hand = -torch.log_softmax(hidden.detach() @ weight.detach().T, -1)[real].gather(1, targets[real, None]).sum()
    torch.testing.assert_close(total.detach(), hand)
    assert (hidden.grad[~real] == 0).all() and (hidden.grad[real] != 0).any()
