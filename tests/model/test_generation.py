import math

import pytest
import torch
from torch import nn

from lmforge.model import (
    CausalLM,
    ModelConfig,
    ScalarModel,
    filter_logits,
    gather_last,
    generate,
    last_token_index,
    sample_from_logits,
)

CFG = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, vocab_size=50, max_seq_len=32)
PROMPTS = [[5, 17, 3, 8, 9], [12, 4], [7, 1, 22, 30, 31, 2, 6, 11]]
EOS, PAD = 2, 0


@pytest.fixture(scope="module")
def lm() -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(CFG)
    with torch.no_grad():  # larger weights than the init: peaked, prompt-dependent logits
        for p in model.parameters():
            p.mul_(10.0)
    return model


def greedy_alone(model: CausalLM, prompt: list[int], n: int) -> list[int]:
    """Reference: one unpadded prompt, no cache, argmax of the plain forward, stop after EOS."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
            if tokens[-1] == EOS:
                break
    return tokens[len(prompt) :]


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_batch_matches_each_prompt_alone(lm, use_cache):
    out = generate(lm, PROMPTS, max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=0.0, use_cache=use_cache)
    assert out.prompt_len == 8 and out.sequences.shape == (3, 16) and out.response_mask.shape == (3, 8)
    for row, prompt in enumerate(PROMPTS):
        expected = greedy_alone(lm, prompt, 8)
        response = out.sequences[row, 8:]
        assert response[out.response_mask[row]].tolist() == expected
        assert out.attention_mask[row, :8].sum() == len(prompt)
        assert out.sequences[row, 8 - len(prompt) : 8].tolist() == prompt


def test_cache_and_no_cache_give_identical_greedy_tokens(lm):
    kwargs = dict(max_new_tokens=10, eos_id=49, pad_id=PAD, temperature=0.0)
    cached = generate(lm, PROMPTS, use_cache=True, **kwargs)
    recomputed = generate(lm, PROMPTS, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert torch.equal(cached.attention_mask, recomputed.attention_mask)


class ScriptedLM(nn.Module):
    """Stands in for a CausalLM: row b emits script[b][step], whatever its input."""

    def __init__(self, script: list[list[int]], prompt_len: int):
        super().__init__()
        self.cfg = ModelConfig(n_layer=1, n_head=1, n_kv_head=1, d_model=2, d_ff=2, vocab_size=10, max_seq_len=32)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.script, self.prompt_len = torch.tensor(script), prompt_len
        self.calls, self.modes = 0, []

    def forward(self, idx, *, attention_mask, kv_cache=None, last_only=False):
        self.calls += 1
        self.modes.append(self.training)
        step = attention_mask.shape[1] - self.prompt_len
        if kv_cache is not None:
            kv_cache.length += idx.shape[1]
        return torch.nn.functional.one_hot(self.script[:, step], 10).float()[:, None] * 5.0


@pytest.mark.parametrize("use_cache", [True, False])
def test_everything_after_eos_is_pad_and_masked(use_cache):
    script = [[5, EOS, 7, 7, 7, 7], [6, 6, 6, 6, 6, 6], [EOS, 8, 8, 8, 8, 8]]
    model = ScriptedLM(script, prompt_len=3).train()
    seen = []
    out = generate(
        model, [[1, 1, 1], [1], [4, 4]], max_new_tokens=6, eos_id=EOS, pad_id=PAD, use_cache=use_cache,
        temperature=0.0, on_tokens=lambda t: seen.append(t.tolist()),
    )  # fmt: skip
    assert out.sequences[:, 3:].tolist() == [[5, EOS, 0, 0, 0, 0], [6, 6, 6, 6, 6, 6], [EOS, 0, 0, 0, 0, 0]]
    assert out.response_mask.tolist() == [[True, True] + [False] * 4, [True] * 6, [True] + [False] * 5]
    assert out.attention_mask[:, :3].tolist() == [[True] * 3, [False, False, True], [False, True, True]]
    assert out.ended_with_eos.tolist() == [True, False, True]
    assert seen[1] == [EOS, 6, PAD] and len(seen) == 6
    assert model.modes == [False] * 6 and model.training  # eval inside, train mode restored


def test_stops_once_every_row_has_ended():
    model = ScriptedLM([[3, EOS, 9, 9, 9, 9], [EOS, 9, 9, 9, 9, 9]], prompt_len=1)
    out = generate(model, [[1], [1]], max_new_tokens=6, eos_id=EOS, pad_id=PAD, temperature=0.0)
    assert model.calls == 2
    assert out.sequences.shape == (2, 7)  # still P + N wide: unfilled columns are pad, masked
    assert out.sequences[:, 1:].tolist() == [[3, EOS, 0, 0, 0, 0], [EOS, 0, 0, 0, 0, 0]]
    assert out.response_mask.sum(1).tolist() == [2, 1]


def test_top_k_1_is_greedy(lm):
    kwargs = dict(max_new_tokens=6, eos_id=EOS, pad_id=PAD)
    greedy = generate(lm, PROMPTS, temperature=0.0, **kwargs)
    top1 = generate(lm, PROMPTS, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(greedy.sequences, top1.sequences)


def test_seeded_sampling_repeats(lm):
    def sample(seed):
        gen = torch.Generator().manual_seed(seed)
        kw = dict(max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=1.0, top_k=20, top_p=0.95)
        return generate(lm, PROMPTS, generator=gen, **kw).sequences

    assert torch.equal(sample(7), sample(7))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5 (1), 0.3 (3), 0.15 (2), 0.05 (0)
    logits = probs.log()[None]
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].nonzero().flatten().tolist()  # noqa: E731
    assert kept(0.45) == [1]
    assert kept(0.75) == [1, 3]
    assert kept(0.9) == [1, 2, 3]
    assert kept(1.0) == [0, 1, 2, 3]
    assert kept(1e-6) == [1]  # the most likely token always survives


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))[0].nonzero().flatten().tolist()
    assert kept == [1, 3]
    assert torch.isfinite(filter_logits(logits, top_k=99)).all()
    assert filter_logits(logits, top_k=2)[0, 1] == 3.0  # survivors keep their logits


def test_sample_from_logits_samples_only_kept_tokens():
    logits = torch.zeros(4000, 6)
    logits[:, 0] = 2.0
    logits[:, 1] = 1.0
    tokens = sample_from_logits(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1}
    share = (tokens == 0).float().mean().item()
    assert share == pytest.approx(math.e / (math.e + 1), abs=0.03)
    assert sample_from_logits(logits[:2], temperature=0.0).tolist() == [0, 0]


def test_too_long_requests_and_bad_ids_are_clear_errors(lm):
    with pytest.raises(ValueError, match="max_seq_len=32"):
        generate(lm, [[1] * 30], max_new_tokens=3, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="pad_id=-1"):
        generate(lm, [[1]], max_new_tokens=3, eos_id=EOS, pad_id=-1)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(lm, [[1], []], max_new_tokens=3, eos_id=EOS, pad_id=PAD)


# ----------------------------------------------------------------------------- ScalarModel


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right-padded
            [0, 0, 1, 1, 1],  # left-padded
            [1, 1, 1, 1, 1],
            [0, 1, 0, 0, 0],
        ]
    )
    assert last_token_index(mask).tolist() == [2, 4, 4, 1]
    assert last_token_index(mask.bool()).tolist() == [2, 4, 4, 1]
    values = torch.arange(20.0).view(4, 5)
    assert gather_last(values, mask).tolist() == [2.0, 9.0, 14.0, 16.0]


def test_scalar_model_reads_the_same_reward_padded_or_not():
    torch.manual_seed(0)
    rm = ScalarModel(CFG).eval()
    assert set(rm.state_dict()) >= {"head.weight", "head.bias", "backbone.wte.weight"}
    rows = [[4, 9, 13, 2], [8, 8, 30, 31, 40, 2]]
    with torch.no_grad():
        for side in ("right", "left"):
            idx = torch.full((2, 7), PAD)
            mask = torch.zeros(2, 7, dtype=torch.long)
            for r, row in enumerate(rows):
                cols = slice(0, len(row)) if side == "right" else slice(7 - len(row), 7)
                idx[r, cols], mask[r, cols] = torch.tensor(row), 1
            rewards = gather_last(rm(idx, attention_mask=mask), mask)
            assert rewards.shape == (2,)
            for r, row in enumerate(rows):
                alone = rm(torch.tensor([row]))[0, -1]
                torch.testing.assert_close(rewards[r], alone, atol=1e-5, rtol=1e-5)


def test_state_dict_keys_are_stable():
    tied = CausalLM(CFG).state_dict()
    assert "lm_head.weight" not in tied and all(k.startswith("backbone.") for k in tied)
    untied = CausalLM(ModelConfig(**{**CFG.__dict__, "tie_embeddings": False}))
    assert "lm_head.weight" in untied.state_dict()
    assert untied.num_params() == CausalLM(CFG).num_params() + 50 * 32
