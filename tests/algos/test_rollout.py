"""Rollouts shared by the RL stages: log-prob alignment, temperature, masking after EOS, scoring.

Also the helpers the RL tests share (imported by test_ppo.py, test_pg.py and test_rewards.py):
hand-made policy and reward checkpoints in the exact format the SFT and reward stages save.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import compose_config
from omegaconf import OmegaConf
from torch import nn

from lmforge.algos.rollout import (
    Rollout,
    mask_after_eos,
    response_logits,
    sample_rollout,
    seed_for,
    shape_scores,
    token_kl,
)
from lmforge.data.prompt_data import Prompt
from lmforge.model import CausalLM, ModelConfig, ScalarModel
from lmforge.rl import logprobs_from_logits
from lmforge.training.checkpoint import FORMAT_VERSION

# ============================================================================ shared helpers


def nano_config(**changes) -> ModelConfig:
    cfg = compose_config(["model=nano"])
    mc = ModelConfig(**OmegaConf.to_container(cfg.model))
    return replace(mc, **changes)


def nano_tokenizer(cache: Path):
    """The tokenizer a nano smoke run trains on the synthetic world (cached in `cache`)."""
    from lmforge.data.pretrain_data import load_or_train_tokenizer

    cfg = compose_config(["model=nano", "data.n_docs=2000"])
    cfg.data.cache_dir = str(cache)
    return load_or_train_tokenizer(cfg.data)


def save_stage_checkpoint(path: Path, stage: str, model: nn.Module, tokenizer, model_cfg: ModelConfig, **meta) -> Path:
    """A checkpoint as a stage's LightningModule saves it: `model.*` keys and `lmforge` metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lmforge = {
        "format": FORMAT_VERSION,
        "stage": stage,
        "model_config": asdict(model_cfg),
        "tokenizer": torch.frombuffer(bytearray(tokenizer.proto()), dtype=torch.uint8),
        "config": {},
        "lineage": {},
        **meta,
    }
    state = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "lmforge": lmforge, "global_step": 0}, path)
    return path


def make_policy_checkpoint(path: Path, tokenizer, stage: str = "sft", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    mc = nano_config()
    return save_stage_checkpoint(path, stage, CausalLM(mc), tokenizer, mc)


def make_reward_checkpoint(
    path: Path, tokenizer, mean: float = 0.5, std: float = 2.0, seed: int = 1, head_bias: float = 0.0
) -> Path:
    """A reward-stage checkpoint (ScalarModel `model.backbone.*` + `model.head.*`, reward_stats)."""
    torch.manual_seed(seed)
    mc = nano_config()
    rm = ScalarModel(mc)
    with torch.no_grad():
        rm.head.bias.fill_(head_bias)
    return save_stage_checkpoint(path, "reward", rm, tokenizer, mc, reward_stats={"mean": mean, "std": std, "n": 1000})


def build_rl_assets(tmp_path_factory, shared_cache) -> dict:
    """A nano tokenizer, an SFT-format policy checkpoint and a reward checkpoint (each RL test
    module makes its `rl_assets` fixture with it)."""
    d = tmp_path_factory.mktemp("rl-assets")
    tok = nano_tokenizer(shared_cache)
    return {
        "tokenizer": tok,
        "cache": shared_cache,
        "policy": make_policy_checkpoint(d / "sft" / "last.ckpt", tok),
        "reward": make_reward_checkpoint(d / "reward" / "last.ckpt", tok),
        "dir": d,
    }


def rl_config(algo: str, assets: dict, run_dir: Path, *overrides: str):
    """A small RL run on the nano model: the config `python train.py algo=<algo> ...` would run."""
    cfg = compose_config(
        [
            f"algo={algo}",
            "model=nano",
            "logger=none",
            "trainer.progress_bar=none",
            "trainer.accelerator=cpu",
            f"init_from={assets['policy']}",
            "data.n_docs=2000",
            f"data.cache_dir={assets['cache']}",
            "trainer.max_steps=2",
            "trainer.eval_every=2",
            "trainer.log_every=1",
            "algo.rollout_batch_size=4",
            "algo.minibatch_size=4",
            "algo.micro_batch_size=2",
            "algo.max_new_tokens=6",
            "algo.eval_max_new_tokens=6",
            "algo.eval_prompts=4",
            "algo.eval_batch_size=4",
            "algo.sample_every=1",
            "algo.n_samples=2",
            *overrides,
        ],
        run_dir=run_dir,
    )
    return cfg


class FirstTokenReward:
    """Toy reward read from the policy's tokens: 1 if the response starts with a token of `ids`."""

    name = "first_token"

    def __init__(self, ids: set[int]):
        self.ids = ids

    def __call__(self, batch) -> torch.Tensor:
        return torch.tensor([1.0 if r and r[0] in self.ids else 0.0 for r in batch.response_ids])


def first_token_mass(model, prompts, ids: set[int]) -> float:
    """Mean over prompts of the policy's probability that the response starts with a token of `ids`."""
    sel = torch.tensor(sorted(ids))
    total = 0.0
    with torch.no_grad():
        for p in prompts:
            probs = torch.softmax(model(torch.tensor([p.ids]))[0, -1].float(), -1)
            total += float(probs[sel].sum())
    return total / len(prompts)


def toy_update(algo: str, assets: dict, run_dir: Path, *overrides: str, prepare=None) -> tuple[float, float, object]:
    """One RL iteration where a response earns 1 iff its first token has an even id (about half of
    any prompt's samples, so every group has both kinds); returns the probability of that (on
    training prompts) before and after, and the module. `prepare(module)` runs before training."""
    import importlib

    from lmforge.algos import STAGES
    from lmforge.rewards.reward_function import RewardFunction
    from lmforge.training.trainer import build_trainer

    cfg = rl_config(
        algo,
        assets,
        run_dir,
        "trainer.max_steps=1",
        "trainer.eval_every=100",
        "algo.eval_at_start=false",
        "algo.reward.sources=[{_target_:lmforge.world.judge.ground_truth_reward}]",
        "algo.max_new_tokens=2",
        "algo.kl_coef=0.0",
        "algo.optim.lr=3e-3",
        *overrides,
    )
    module, dm = importlib.import_module(STAGES[cfg.algo.name]).build(cfg, Path(cfg.run_dir))
    rewarded = set(range(4, cfg.model.vocab_size, 2))
    module.reward = RewardFunction([(FirstTokenReward(rewarded), 1.0)])
    probe = dm.train_prompts[:16]
    before = first_token_mass(module.model, probe, rewarded)
    if prepare is not None:
        prepare(module)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(cfg, Path(cfg.run_dir), [], module)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1, "one trainer step per RL iteration"
    return before, first_token_mass(module.model, probe, rewarded), module


def cut_responses(module, lengths: list[int]) -> None:
    """Make `module`'s rollouts end (EOS) after lengths[i % len(lengths)] tokens at most, then
    score them again: a valid rollout whose responses have the given, unequal lengths."""
    sample = module.make_rollout

    def make_rollout(prompts, step):
        ro, times = sample(prompts, step)
        tok, P = module.tokenizer, ro.prompt_len
        for i in range(ro.size):
            n = min(lengths[i % len(lengths)], int(ro.response_mask[i].sum()))
            ro.sequences[i, P + n - 1] = tok.eos_id
            ro.sequences[i, P + n :] = tok.pad_id
            ro.response_mask[i] = torch.arange(ro.response_mask.shape[1]) < n
            ro.attention_mask[i, P:] = ro.response_mask[i]
            ro.ended[i] = True
        ro.responses = [tok.decode(r[m].tolist()) for r, m in zip(ro.response_tokens, ro.response_mask)]
        module.score_rollout(ro)
        return ro, times

    module.make_rollout = make_rollout


def record_updates(module) -> tuple[list[dict], list[dict]]:
    """Record, for every optimizer update of `module`, the gradient of each parameter just before
    the step (after any clipping), and every stat each micro-batch's loss returns."""
    grads, stats = [], []
    step, loss = module._optimizer_step, module.loss

    def optimizer_step(opt, counted):
        grads.append({n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None})
        step(opt, counted)

    def recorded_loss(mb):
        value, s = loss(mb)
        stats.append({k: float(v) for k, v in s.items()})
        return value, s

    module._optimizer_step, module.loss = optimizer_step, recorded_loss
    return grads, stats


def logprob_change(module) -> tuple[float, float]:
    """Mean change of the sequence log-prob of the last rollout's responses under the updated
    policy: over the rewarded responses and over the others."""
    ro = module.last_rollout
    with torch.no_grad():
        logits, _ = response_logits(module.model, ro.sequences, ro.attention_mask, ro.prompt_len)
        new = logprobs_from_logits(logits, ro.response_tokens, temperature=module.cfg.algo.temperature)
    delta = (new - ro.logprobs).masked_fill(~ro.response_mask, 0.0).sum(-1)
    good = ro.raw_scores > 0
    assert good.any() and (~good).any(), "the toy rollout needs rewarded and unrewarded responses"
    return float(delta[good].mean()), float(delta[~good].mean())


# ============================================================================ a rigged model


class ShiftLM(nn.Module):
    """A fake CausalLM whose next token after token i is (i + 1) mod V with probability
    ~1 - V e^-scale: the hidden state is the one-hot token, the LM head maps i -> i + 1."""

    def __init__(self, vocab: int = 16, scale: float = 12.0):
        super().__init__()
        self.cfg = ModelConfig(
            n_layer=1, n_head=1, n_kv_head=1, d_model=vocab, d_ff=vocab, vocab_size=vocab, max_seq_len=64
        )
        self.scale = scale
        w = torch.zeros(vocab, vocab)
        w[(torch.arange(vocab) + 1) % vocab, torch.arange(vocab)] = scale
        self.register_buffer("w", w)
        self.dummy = nn.Parameter(torch.zeros(()))  # generate() reads device/dtype from a parameter

    def backbone(self, idx, attention_mask=None, **_):
        return F.one_hot(idx, self.cfg.vocab_size).float() + 0 * self.dummy

    @property
    def lm_head_weight(self):
        return self.w

    def forward(
        self,
        idx,
        *,
        last_only=False,
        columns=None,
        return_hidden=False,
        attention_mask=None,
        kv_cache=None,
        positions=None,
    ):
        # No cache: generate() then feeds the whole sequence every step (kv_cache.length stays 0).
        hidden = self.backbone(idx)
        hidden = hidden[:, -1:] if last_only else hidden if columns is None else hidden[:, columns]
        logits = F.linear(hidden, self.w)
        return (logits, hidden) if return_hidden else logits


class FakeTok:
    pad_id, bos_id, eos_id = 0, 1, 2

    def decode(self, ids):
        return " ".join(str(i) for i in ids if i not in (0, 1, 2))


def prompts_of(*id_lists) -> list[Prompt]:
    return [Prompt(text=f"p{i}", raw=f"p{i}", ids=list(ids), origin=f"test:{i}") for i, ids in enumerate(id_lists)]


# ============================================================================ tests


def test_logprob_of_token_t_comes_from_logits_at_t_minus_1():
    model = ShiftLM(vocab=16)
    # Row 0 continues its own shift pattern; row 1 is left-padded (shorter prompt).
    seq = torch.tensor([[3, 4, 5, 6, 7, 8], [0, 9, 10, 11, 12, 13]])
    attn = seq != 0
    attn[0] = True
    P = 3
    logits, _ = response_logits(model, seq, attn, P)
    logp = logprobs_from_logits(logits, seq[:, P:])
    # Every response token is the predicted successor of the token before it: log-prob ~ 0.
    assert logp.shape == (2, 3)
    assert torch.all(logp > -1e-3), logp
    # Misaligned by one (logits at t scoring token t) every token would be ~impossible.
    wrong = logprobs_from_logits(F.linear(model.backbone(seq), model.w)[:, P:], seq[:, P:])
    assert torch.all(wrong < -5)


def test_rollout_logprobs_match_stepwise_sampling_distribution_at_temperature():
    """Recomputed log-probs (logits / T) equal the log-probs of the distribution each token was
    sampled from, for left-padded prompts of different lengths (real nano model)."""
    torch.manual_seed(0)
    model = CausalLM(nano_config()).eval()
    tok = FakeTok()
    prompts = prompts_of([5, 6, 7, 8, 9], [10, 11], [12, 13, 14])
    T = 0.7
    ro = sample_rollout(
        model, prompts, tok, max_new_tokens=6, temperature=T, generator=torch.Generator().manual_seed(1)
    )
    logits, _ = response_logits(model, ro.sequences, ro.attention_mask, ro.prompt_len)
    logp = logprobs_from_logits(logits, ro.response_tokens, temperature=T)
    for row, p in enumerate(prompts):
        ids = list(p.ids)
        for t in range(int(ro.response_mask[row].sum())):
            tok_t = int(ro.response_tokens[row, t])
            with torch.no_grad():
                ref = F.log_softmax(model(torch.tensor([ids]))[0, -1].float() / T, -1)[tok_t]
            torch.testing.assert_close(logp[row, t], ref, atol=2e-4, rtol=0)
            ids.append(tok_t)


def test_everything_after_the_first_eos_is_masked():
    model = ShiftLM(vocab=16)
    tok = FakeTok()
    # Greedy: row 0 ends 3 -> ... no; row 1: prompt ends at 1 -> next 2 = EOS at once;
    # row 0: 12 -> 13, 14, 15, 0 (pad id, a real token here), 1, 2=EOS after 6 tokens.
    prompts = prompts_of([11, 12], [1])
    ro = sample_rollout(model, prompts, tok, max_new_tokens=10, temperature=0.0)
    assert ro.ended.tolist() == [True, True]
    assert ro.lengths().tolist() == [6, 1]
    assert ro.response_tokens[1, 0] == tok.eos_id
    # Nothing after EOS is part of the response: mask, attention and the text.
    assert not ro.response_mask[1, 1:].any()
    assert not ro.attention_mask[1, ro.prompt_len + 1 :].any()
    assert (ro.response_tokens[1, 1:] == tok.pad_id).all()
    assert ro.responses[1] == ""
    # The mask function itself: up to and including the first EOS only.
    toks = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 2, 3, 4]])
    assert mask_after_eos(toks, 2).tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]


def test_algo_static_cache_samples_the_same_rollout():
    torch.manual_seed(0)
    model = CausalLM(nano_config())
    prompts = prompts_of([3, 4, 5], [6], [7, 8, 9, 10])
    a, b = (
        sample_rollout(
            model,
            prompts,
            FakeTok(),
            max_new_tokens=6,
            temperature=1.0,
            static_cache=static,
            generator=torch.Generator().manual_seed(0),
        )
        for static in (False, True)
    )
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.response_mask, b.response_mask)
    assert a.responses == b.responses


def test_response_cut_by_the_length_limit_is_not_ended_and_is_penalized():
    model = ShiftLM(vocab=16)
    ro = sample_rollout(model, prompts_of([3]), FakeTok(), max_new_tokens=4, temperature=0.0)
    assert ro.ended.tolist() == [False] and ro.lengths().tolist() == [4]
    scores = shape_scores(torch.tensor([0.5, 0.5, 30.0]), torch.tensor([False, True, True]), 1.0, 10.0)
    assert scores.tolist() == [-0.5, 0.5, 10.0]


def test_exact_token_kl_is_zero_for_identical_models_and_positive_otherwise():
    a = torch.randn(2, 3, 11)
    assert token_kl(a, a).abs().max() < 1e-6
    assert (token_kl(a, a + torch.randn(2, 3, 11)) > 0).all()


def test_sampling_seeds_differ_per_rank_and_step_and_are_reproducible():
    seeds = {seed_for(7, "sample", step, rank) for step in range(5) for rank in range(4)}
    assert len(seeds) == 20
    assert seed_for(7, "sample", 3, 1) == seed_for(7, "sample", 3, 1)
    assert seed_for(7, "sample", 3, 1) != seed_for(8, "sample", 3, 1)


def test_rollout_is_a_dataclass_of_the_documented_shapes():
    model = ShiftLM(vocab=16)
    ro: Rollout = sample_rollout(
        model,
        prompts_of([3, 4, 5], [6]),
        FakeTok(),
        max_new_tokens=3,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    B, W = ro.sequences.shape
    assert ro.attention_mask.shape == (B, W) and ro.response_mask.shape == (B, W - ro.prompt_len)
    assert ro.prompt_len == 3 and len(ro.responses) == B == 2
