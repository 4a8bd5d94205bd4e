import math
from dataclasses import replace

import pytest
import torch

from lmforge.model import CausalLM, KVCache, ModelConfig, ModelConfigError, Transformer
from lmforge.model.transformer import build_attention_mask

LLAMA = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, vocab_size=101, max_seq_len=64)
GPT2 = ModelConfig(
    n_layer=2, n_head=4, n_kv_head=4, d_model=32, d_ff=128, vocab_size=101, max_seq_len=64,
    norm="layernorm", pos="learned", activation="gelu", bias=True,
)  # fmt: skip
CONFIGS = {
    "llama-gqa": LLAMA,
    "llama-mqa": replace(LLAMA, n_kv_head=1),
    "llama-mha": replace(LLAMA, n_kv_head=4),
    "gpt2": GPT2,
}


def sharpen(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter larger than the init, so attention is far from uniform and
    biases/norm weights are not their trivial 0/1: wrong masks or positions then show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm_weight = "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.2 * noise if is_norm_weight else 0.3 * noise)
    return model.eval()


def tiny(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    return sharpen(Transformer(cfg))


# ----------------------------------------------------------------------------- a naive reference


def ref_norm(norm, x, cfg):
    if cfg.norm == "rmsnorm":
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * norm.weight
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
    out = (x - mean) / torch.sqrt(var + cfg.norm_eps) * norm.weight
    return out + norm.bias if norm.bias is not None else out


def ref_linear(layer, x):
    out = x @ layer.weight.T
    return out + layer.bias if layer.bias is not None else out


def ref_rope(x, cfg):
    """x (B, H, T, D): pair channel i with i + D/2 and rotate it by position * theta^(-2i/D)."""
    D, T = x.shape[-1], x.shape[-2]
    half = D // 2
    i = torch.arange(half, dtype=torch.float64)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * cfg.rope_theta ** (-2 * i / D)  # (T, D/2)
    cos, sin = angle.cos().float(), angle.sin().float()
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def ref_hidden(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    cfg = model.cfg
    B, T = idx.shape
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    x = model.wte.weight[idx]
    if cfg.pos == "learned":
        x = x + model.wpe.weight[:T]
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    for block in model.blocks:
        h = ref_norm(block.norm1, x, cfg)
        qkv = ref_linear(block.attn.qkv, h)
        q = qkv[..., : H * D].reshape(B, T, H, D).transpose(1, 2)
        k = qkv[..., H * D : (H + Hkv) * D].reshape(B, T, Hkv, D).transpose(1, 2)
        v = qkv[..., (H + Hkv) * D :].reshape(B, T, Hkv, D).transpose(1, 2)
        if cfg.pos == "rope":
            q, k = ref_rope(q, cfg), ref_rope(k, cfg)
        kv_head_of = [head // (H // Hkv) for head in range(H)]
        k, v = k[:, kv_head_of], v[:, kv_head_of]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        y = (weights @ v).transpose(1, 2).reshape(B, T, H * D)
        x = x + ref_linear(block.attn.out_proj, y)
        h = ref_norm(block.norm2, x, cfg)
        if cfg.activation == "swiglu":
            g = ref_linear(block.mlp.gate, h)
            hidden = g * torch.sigmoid(g) * ref_linear(block.mlp.up, h)
        else:
            u = ref_linear(block.mlp.up, h)
            hidden = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
        x = x + ref_linear(block.mlp.down, hidden)
    return ref_norm(model.norm_f, x, cfg)


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_naive_reference(name):
    model = tiny(CONFIGS[name])
    idx = torch.randint(0, 101, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref_hidden(model, idx), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_future_tokens_never_change_earlier_logits(name):
    torch.manual_seed(0)
    lm = sharpen(CausalLM(CONFIGS[name]))
    idx = torch.randint(0, 101, (2, 10))
    changed = idx.clone()
    changed[:, 6] = (idx[:, 6] + 1) % 101
    with torch.no_grad():
        before, after = lm(idx), lm(changed)
    torch.testing.assert_close(before[:, :6], after[:, :6], atol=0, rtol=0)
    assert not torch.allclose(before[:, 6:], after[:, 6:])


# ----------------------------------------------------------------------------- padding and the KV cache


def padded_batch(rows: list[list[int]], side: str, width: int):
    idx = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        idx[r, cols] = torch.tensor(row)
        mask[r, cols] = True
    return idx, mask


ROWS = [[5, 17, 3, 88, 9, 41, 7, 2, 60], [12, 4, 99, 31], [77]]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", CONFIGS)
def test_padded_batch_matches_each_row_alone(name, side):
    model = tiny(CONFIGS[name])
    idx, mask = padded_batch(ROWS, side, width=11)
    with torch.no_grad():
        batch = model(idx, attention_mask=mask)
        assert torch.isfinite(batch).all()  # pad rows included: no all-masked softmax
        for r, row in enumerate(ROWS):
            alone = model(torch.tensor([row]))[0]
            torch.testing.assert_close(batch[r][mask[r]], alone, atol=1e-5, rtol=1e-5)


def test_attention_mask_is_causal_hides_pads_and_never_empties_a_row():
    # Recent torch returns zeros for a fully masked SDPA row, older kernels NaN: check the mask.
    pad_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    mask = build_attention_mask(pad_mask, T=3, S=5, device=torch.device("cpu"))  # queries 2..4
    assert mask.shape == (2, 1, 3, 5)
    assert mask.any(dim=-1).all()
    assert mask[0, 0].int().tolist() == [[0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert mask[1, 0].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 1]]
    early_pad = build_attention_mask(torch.tensor([[0, 0, 1]]), T=3, S=3, device=torch.device("cpu"))
    assert early_pad[0, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_decoding_matches_full_forward(name):
    model = tiny(CONFIGS[name])
    idx, mask = padded_batch(ROWS, "left", width=12)
    prefill = 5  # row 2 is all padding here, row 1 half
    with torch.no_grad():
        full = model(idx, attention_mask=mask)
        cache = KVCache.allocate(model.cfg, batch_size=3, max_len=12)
        steps = [model(idx[:, :prefill], attention_mask=mask[:, :prefill], kv_cache=cache)]
        for t in range(prefill, 12):
            steps.append(model(idx[:, t : t + 1], attention_mask=mask[:, : t + 1], kv_cache=cache))
    assert cache.length == 12
    incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(incremental[mask], full[mask], atol=1e-5, rtol=1e-5)


def test_kv_cache_without_mask_matches_full_forward():
    model = tiny(LLAMA)
    idx = torch.randint(0, 101, (2, 8))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.allocate(LLAMA, 2, 8)
        steps = [model(idx[:, :3], kv_cache=cache)] + [model(idx[:, t : t + 1], kv_cache=cache) for t in range(3, 8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_overflow_is_an_error():
    model = tiny(LLAMA)
    cache = KVCache.allocate(LLAMA, 1, 4)
    with pytest.raises(ValueError, match="allocate it"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


# ----------------------------------------------------------------------------- positions


def test_rope_depends_only_on_relative_positions():
    model = tiny(LLAMA)
    idx = torch.randint(0, 101, (2, 9))
    shifted = torch.arange(7, 16).expand(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, positions=shifted), model(idx), atol=1e-5, rtol=1e-5)


def test_learned_positions_do_depend_on_absolute_positions():
    model = tiny(GPT2)
    idx = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        assert not torch.allclose(model(idx, positions=torch.arange(7, 16).expand(2, 9)), model(idx))


def test_positions_past_max_seq_len_are_errors():
    model = tiny(LLAMA)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(torch.zeros(1, 2, dtype=torch.long), positions=torch.tensor([[63, 64]]))


def test_rope_tables_stay_fp32_under_bf16_and_survive_meta_init():
    fresh = Transformer(LLAMA)
    bf16 = Transformer(LLAMA).to(torch.bfloat16)
    assert bf16.rope.cos.dtype == torch.float32
    torch.testing.assert_close(bf16.rope.cos, fresh.rope.cos, atol=0, rtol=0)
    assert bf16(torch.zeros(1, 4, dtype=torch.long)).dtype == torch.bfloat16

    with torch.device("meta"):
        meta = Transformer(LLAMA)
    meta.to_empty(device="cpu")
    meta.init_weights()
    torch.testing.assert_close(meta.rope.sin, fresh.rope.sin, atol=0, rtol=0)
    assert torch.isfinite(meta(torch.zeros(1, 4, dtype=torch.long))).all()


# ----------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "override, message",
    [
        ({"d_model": 30}, "model.d_model=30 is not divisible by model.n_head=4"),
        ({"n_kv_head": 3}, "model.n_kv_head=3"),
        ({"n_layer": 0}, "model.n_layer=0"),
        ({"vocab_size": 10.5}, "model.vocab_size=10.5"),
        ({"norm": "batchnorm"}, "model.norm='batchnorm'"),
        ({"pos": "alibi"}, "model.pos='alibi'"),
        ({"activation": "relu"}, "model.activation='relu'"),
        ({"dropout": 1.0}, "model.dropout=1.0"),
        ({"d_model": 12}, "even head_dim"),  # 12 / 4 heads = 3 channels per head
    ],
)
def test_invalid_configs_name_the_key(override, message):
    cfg = replace(LLAMA, **override)
    with pytest.raises(ModelConfigError, match=message):
        cfg.validate()
    with pytest.raises(ValueError, match=message):
        Transformer(cfg)


def test_odd_head_dim_is_fine_with_learned_positions():
    replace(GPT2, d_model=12).validate()


# ----------------------------------------------------------------------------- sizes, init, flops

GPT2_124M = ModelConfig(
    n_layer=12, n_head=12, n_kv_head=12, d_model=768, d_ff=3072, vocab_size=50257, max_seq_len=1024,
    norm="layernorm", pos="learned", activation="gelu", bias=True, tie_embeddings=True,
)  # fmt: skip
LLAMA_SHAPE = dict(norm="rmsnorm", pos="rope", activation="swiglu", bias=False, tie_embeddings=False)


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (GPT2_124M, 124_439_808),
        (replace(GPT2_124M, n_layer=24, n_head=16, n_kv_head=16, d_model=1024, d_ff=4096), 354_823_168),
        (ModelConfig(22, 32, 4, 2048, 5632, 32000, 2048, **LLAMA_SHAPE), 1_100_048_384),  # TinyLlama-1.1B
        (ModelConfig(32, 32, 32, 4096, 11008, 32000, 4096, **LLAMA_SHAPE), 6_738_415_616),  # Llama-2-7B
    ],
)
def test_parameter_counts_of_published_models(cfg, expected):
    with torch.device("meta"):
        lm = CausalLM(cfg)
    assert lm.num_params() == expected


def test_num_params_excluding_embeddings():
    model = Transformer(GPT2)
    embeddings = 101 * 32 + 64 * 32
    assert model.num_params(exclude_embeddings=True) == model.num_params() - embeddings


def test_residual_projections_start_smaller():
    torch.manual_seed(0)
    cfg = replace(LLAMA, n_layer=8, n_head=8, n_kv_head=8, d_model=256, d_ff=512)
    model = Transformer(cfg)
    residual_std = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks:
        assert block.attn.out_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.mlp.down.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.mlp.up.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_flops_per_token_by_hand():
    # Per layer: qkv 32 x (4 + 2 + 2) * 8 = 2048, out_proj 32 x 32 = 1024, gate/up/down 3 x 32 x 64.
    per_layer = 2048 + 1024 + 3 * 32 * 64
    lm_head = 101 * 32
    n = 2 * per_layer + lm_head
    assert Transformer(LLAMA).flops_per_token(16) == 6 * n + 12 * 2 * 32 * 16
    # GPT-2 shape: biases, norms and the position table are not matmul weights.
    n_gpt2 = 2 * (32 * 96 + 32 * 32 + 2 * 32 * 128) + lm_head
    assert Transformer(GPT2).flops_per_token(64) == 6 * n_gpt2 + 12 * 2 * 32 * 64


def test_sdpa_causal_fast_path_matches_explicit_all_ones_mask():
    model = tiny(LLAMA)
    idx = torch.randint(0, 101, (2, 7))
    with torch.no_grad():
        plain = model(idx)
        masked = model(idx, attention_mask=torch.ones(2, 7, dtype=torch.long))
    torch.testing.assert_close(plain, masked, atol=1e-6, rtol=1e-6)
