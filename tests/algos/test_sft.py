"""The SFT stage: response-only loss, bucketing equivalence, init_from checks, judge evaluation,
and an end-to-end pretrain -> SFT run through train.py."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import train_py_cmd
from omegaconf import open_dict

from lmforge.algos.sft import SFTConfig, SFTModule, build, sft_loss_terms
from lmforge.data.sft_data import IGNORE_INDEX, Pair, collate, encode_pairs, plan_epoch
from lmforge.data.templates import BadRecords
from lmforge.data.tokenizer import train_tokenizer
from lmforge.eval.heldout import evaluate_judge
from lmforge.model import CausalLM, ModelConfig
from lmforge.model.lm_loss import lm_loss_sum
from lmforge.training.checkpoint import CheckpointError, load_checkpoint
from lmforge.world.generator import SyntheticWorld, held_out_prompts

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = "User: {prompt}\nAssistant:"
SMALL = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, vocab_size=400, max_seq_len=128)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(SyntheticWorld(0).pretrain_documents(300), 400, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def examples(tok):
    tasks = SyntheticWorld(0).tasks(48)
    pairs = [Pair(TEMPLATE.format(prompt=t.prompt), " " + t.answer, str(i)) for i, t in enumerate(tasks)]
    # Some long-winded responses too, so lengths vary a lot.
    pairs += [
        Pair(TEMPLATE.format(prompt=t.prompt), " " + " ".join([t.answer] * (i % 5 + 1)), f"x{i}")
        for i, t in enumerate(tasks[:16])
    ]
    return encode_pairs(pairs, tok, 64, BadRecords())


def model(seed=0) -> CausalLM:
    torch.manual_seed(seed)
    m = CausalLM(SMALL)
    with torch.no_grad():  # far from the init, so a wrong position or mask would show
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


# ------------------------------------------------------------------ the loss


class FixedLogits(torch.nn.Module):
    """A CausalLM whose final hidden states are `logits` and whose head is the identity, so
    sft_loss_terms reaches the real loss code (plain or chunked) with logits the test chooses."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, idx, targets, loss_chunk):
        return lm_loss_sum(self.logits, torch.eye(self.logits.shape[-1]), targets, loss_chunk)


@pytest.mark.parametrize("loss_chunk", [0, 5])
def test_loss_is_the_mean_over_response_tokens_only(tok, examples, loss_chunk):
    batch = collate(examples[:6], tok.pad_id)
    logits = torch.randn(*batch["input_ids"].shape, SMALL.vocab_size)
    fake = FixedLogits(logits.clone())
    total, count = sft_loss_terms(fake, batch, loss_chunk)
    # By hand: -log softmax at the target of every response position, nothing else.
    hand, n = 0.0, 0
    for row, ex in enumerate(examples[:6]):
        for t in range(ex.n_prompt - 1, len(ex.ids) - 1):
            hand -= torch.log_softmax(logits[row, t], -1)[ex.ids[t + 1]].item()
            n += 1
    assert int(count) == n
    assert float(total.detach()) == pytest.approx(hand, rel=1e-5)
    # Gradient reaches the logits of response positions only: prompt and pad carry none.
    total.backward()
    grad_rows = fake.logits.grad.abs().sum(-1) > 0
    assert torch.equal(grad_rows, batch["labels"] != IGNORE_INDEX)


@pytest.mark.parametrize("loss_chunk", [0, 5])
def test_prompt_targets_and_padding_do_not_change_the_loss(tok, examples, loss_chunk):
    batch = collate(examples[:6], tok.pad_id)
    logits = torch.randn(*batch["input_ids"].shape, SMALL.vocab_size)
    base = sft_loss_terms(FixedLogits(logits), batch, loss_chunk)[0]
    ignored = batch["labels"] == IGNORE_INDEX
    noisy = logits + 5 * torch.randn_like(logits) * ignored[..., None]
    assert torch.allclose(sft_loss_terms(FixedLogits(noisy), batch, loss_chunk)[0], base)
    # ... whereas the same noise on response positions does change it (the test can fail).
    noisy = logits + 5 * torch.randn_like(logits) * (~ignored)[..., None]
    assert not torch.allclose(sft_loss_terms(FixedLogits(noisy), batch, loss_chunk)[0], base)
    # A real model: whatever sits in the (right) padding cannot reach a real position.
    m = model()
    b2 = {k: v.clone() for k, v in batch.items()}
    b2["input_ids"][~batch["attention_mask"]] = 5
    assert (~batch["attention_mask"]).any()
    assert torch.equal(sft_loss_terms(m, b2)[0], sft_loss_terms(m, batch)[0])


@pytest.mark.parametrize("packing", ["bucket", "none"])
def test_batched_loss_equals_per_example_loss(tok, examples, packing):
    m = model()
    with torch.no_grad():
        # Unbatched: each example alone, no padding at all.
        ref_sum, ref_n = 0.0, 0
        for ex in examples:
            x = torch.tensor([ex.ids[:-1]])
            logits = m(x)[0]
            targets = torch.tensor(ex.ids[1:])
            keep = torch.arange(len(targets)) >= ex.n_prompt - 1
            ref_sum += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            ref_n += int(keep.sum())
        # Batched: padded batches of mixed lengths in the stage's plan.
        total, n = 0.0, 0
        lengths = [e.n_inputs for e in examples]
        for b in plan_epoch(lengths, 8, packing, seed=0, epoch=0, bucket_size=2):
            s, c = sft_loss_terms(m, collate([examples[i] for i in b], tok.pad_id))
            total, n = total + float(s), n + int(c)
    assert n == ref_n
    assert total / n == pytest.approx(ref_sum / ref_n, abs=1e-5)


# ------------------------------------------------------------------ init_from


def save_stage_checkpoint(make_cfg, tok, path, *overrides, stage="pretrain"):
    """A real lmforge checkpoint of a fresh model (what a finished stage writes)."""
    from lmforge.algos.pretrain import PretrainModule

    cfg = make_cfg("experiment=smoke", *overrides)
    module = PretrainModule(cfg, tok)
    module.stage = stage
    torch.save({"state_dict": module.state_dict(), "lmforge": module.checkpoint_metadata()}, path)
    return path


@pytest.mark.parametrize(
    "ckpt_overrides,keys",
    [
        (["model.d_model=64", "model.n_layer=2"], ["model.d_model", "model.n_layer"]),
        (["model.vocab_size=1024"], ["model.vocab_size"]),
    ],
)
def test_init_from_a_checkpoint_of_another_shape_names_the_keys(make_cfg, tok, tmp_path, ckpt_overrides, keys):
    ckpt = save_stage_checkpoint(make_cfg, tok, tmp_path / "pre.ckpt", *ckpt_overrides)
    cfg = make_cfg("experiment=smoke", "algo=sft", f"init_from={ckpt}")
    with pytest.raises(CheckpointError) as e:
        build(cfg, tmp_path / "run")
    msg = str(e.value)
    for k in keys:
        assert k in msg
    assert "different model shape" in msg and "model.d_ff" not in msg


def test_init_from_refuses_a_reward_checkpoint(make_cfg, tok, tmp_path):
    ckpt = save_stage_checkpoint(make_cfg, tok, tmp_path / "rm.ckpt", stage="reward")
    with pytest.raises(CheckpointError, match="'reward' checkpoint"):
        build(make_cfg("experiment=smoke", "algo=sft", f"init_from={ckpt}"), tmp_path / "run")


def test_init_from_loads_weights_and_takes_the_checkpoints_tokenizer(make_cfg, tok, tmp_path):
    ckpt = save_stage_checkpoint(make_cfg, tok, tmp_path / "pre.ckpt")
    cfg = make_cfg("experiment=smoke", "algo=sft", f"init_from={ckpt}", "data.n_sft=64", "algo.eval_prompts=4")
    module, dm = build(cfg, tmp_path / "run")
    assert isinstance(module, SFTModule) and module.tokenizer == tok
    src = load_checkpoint(ckpt).state_dict
    for k, v in module.state_dict().items():
        assert torch.equal(v, src[k]), k
    assert module.lineage == {"init_from": str(ckpt)}
    assert len(module.eval_prompts) == 4 and module.sample_prompts[0].startswith("User: ")
    assert module.checkpoint_metadata()["stage"] == "sft"
    assert dm.data_stats()["data/train_examples"] == 64


def test_unknown_packing_mode_is_a_config_error(make_cfg, tmp_path):
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="algo.packing='pack'"):
        build(make_cfg("experiment=smoke", "algo=sft", "algo.packing=pack"), tmp_path / "run")


def test_config_mirrors_pretrain_fields():
    from dataclasses import fields

    from lmforge.algos.pretrain import PretrainConfig

    shared = {f.name for f in fields(PretrainConfig)} - {"name"}
    assert shared <= {f.name for f in fields(SFTConfig)}


# ------------------------------------------------------------------ the judge


class Scripted(torch.nn.Module):
    """A 'model' that answers every prompt with the same tokens, then EOS."""

    def __init__(self, cfg, script):
        super().__init__()
        self.cfg, self.script, self.w = cfg, script, torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, attention_mask=None, kv_cache=None, last_only=False):
        step = attention_mask.shape[1] - self.prompt_len
        logits = torch.zeros(idx.shape[0], 1, self.cfg.vocab_size)
        logits[:, :, self.script[min(step, len(self.script) - 1)]] = 1.0
        return logits


def test_evaluate_judge_scores_greedy_responses(tok):
    prompts = ["What is 7 + 12?", "What is 1 + 1?"]
    m = Scripted(SMALL, tok.encode(" 19") + [tok.eos_id])
    m.prompt_len = max(len(tok.encode(TEMPLATE.format(prompt=p))) for p in prompts)
    res = evaluate_judge(m, tok, prompts, prompt_template=TEMPLATE, max_new_tokens=8)
    assert res["n"] == 2
    assert res["exact"] == 0.5
    assert res["judge_score"] == pytest.approx((1.0 + 0.0) / 2)
    assert res["examples"][0] == {"prompt": "What is 7 + 12?", "response": " 19", "score": 1.0}
    assert res["by_kind"] == {"judge_score/add": 0.5, "exact/add": 0.5}  # both are add prompts


def test_judge_metrics_per_kind_and_on_the_hard_split(make_cfg, tok, tmp_path):
    from lmforge.config import ConfigError
    from lmforge.world.splits import split_of
    from lmforge.world.tasks import parse_task

    ckpt = save_stage_checkpoint(make_cfg, tok, tmp_path / "pre.ckpt")
    common = ("experiment=smoke", "algo=sft", f"init_from={ckpt}", "data.n_sft=64", "algo.max_new_tokens=4")
    module, _ = build(make_cfg(*common, "algo.eval_prompts=12", "algo.eval_hard_prompts=6"), tmp_path / "run")
    assert {split_of(p) for p in module.eval_hard_prompts} == {"hard"} and len(module.eval_hard_prompts) == 6
    metrics = module.judge_metrics()
    for prefix, prompts in (("val", module.eval_prompts), ("val_hard", module.eval_hard_prompts)):
        kinds = {parse_task(p).kind for p in prompts}
        assert {k for k in metrics if k.startswith(prefix + "/")} == {
            f"{prefix}/{stat}" + suffix
            for stat in ("judge_score", "exact")
            for suffix in ["", *(f"/{k}" for k in kinds)]
        }
        # the per-kind means, weighted by their prompts, make the overall mean
        count = {k: sum(parse_task(p).kind == k for p in prompts) for k in kinds}
        for stat in ("judge_score", "exact"):
            total = sum(metrics[f"{prefix}/{stat}/{k}"] * n for k, n in count.items())
            assert total / len(prompts) == pytest.approx(metrics[f"{prefix}/{stat}"])
    # off by default: no hard prompt, no val_hard metric
    module, _ = build(make_cfg(*common, "algo.eval_prompts=4"), tmp_path / "run2")
    assert not module.eval_hard_prompts and not any(k.startswith("val_hard") for k in module.judge_metrics())
    with pytest.raises(ConfigError, match="algo.eval_hard_prompts=2"):
        build(make_cfg("algo=sft", "data=jsonl", "algo.eval_hard_prompts=2"), tmp_path / "run3")


def test_held_out_prompts_are_distinct_test_prompts():
    from lmforge.world.splits import split_of

    p = held_out_prompts(0, 50)
    assert len(set(p)) == 50 and {split_of(x) for x in p} == {"test"}
    assert p == held_out_prompts(0, 50) and held_out_prompts(0, 10) == p[:10]
    assert len(held_out_prompts(0, 10_000)) == len(SyntheticWorld(0).all_tasks("test"))


# ------------------------------------------------------------------ end to end


def run_train(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = train_py_cmd("experiment=smoke", "logger=csv", "trainer.progress_bar=none", *args)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_pretrain_then_sft_end_to_end(tmp_path):
    cache = tmp_path / "cache"
    pre = tmp_path / "pre"
    run_train(
        "algo=pretrain",
        f"data.cache_dir={cache}",
        "trainer.max_steps=10",
        "trainer.eval_every=10",
        f"hydra.run.dir={pre}",
    )
    sft = tmp_path / "sft"
    run_train(
        "algo=sft",
        f"init_from={pre / 'checkpoints' / 'last.ckpt'}",
        f"data.cache_dir={cache}",
        "trainer.max_steps=20",
        "data.n_sft=400",
        "algo.eval_prompts=16",
        f"hydra.run.dir={sft}",
    )
    for name in ("last.ckpt", "best.ckpt"):
        ckpt = load_checkpoint(sft / "checkpoints" / name)
        assert ckpt.stage == "sft"
        assert ckpt.meta["lineage"]["init_from"].endswith("last.ckpt")
    rows = (sft / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    for col in (
        "train/loss",
        "val/loss",
        "val/ppl",
        "val/judge_score",
        "val/exact",
        "perf/tokens_per_s",
        "data/train_truncated",
    ):
        assert col in header, header
    last = {k: v for row in rows[1:] for k, v in zip(header, row.split(",")) if v}
    assert 0.0 <= float(last["val/judge_score"]) <= 1.0
    assert math.isfinite(float(last["val/loss"]))


def test_jsonl_from_scratch_trains_a_tokenizer_on_the_pairs(make_cfg, tmp_path):
    rows = [{"prompt": f"Spell the word number {i} backwards", "response": f"{i}"[::-1] + " ok"} for i in range(60)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    # (experiment=smoke sets data.n_docs, which data=jsonl does not have)
    cfg = make_cfg(
        "model=nano",
        "logger=csv",
        "algo=sft",
        "algo.batch_size=8",
        "algo.seq_len=64",
        "algo.val_batches=2",
        "data=jsonl",
        f"data.path={path}",
        "data.val_fraction=0.1",
        "data.on_bad_record=skip",
    )
    module, dm = build(cfg, tmp_path / "run")
    assert module.eval_prompts == []  # no judge outside the synthetic world
    stats = dm.data_stats()
    assert stats["data/train_examples"] + stats["data/val_examples"] == 60
    assert module.tokenizer.decode(module.tokenizer.encode("Spell the word")) == "Spell the word"
    batch = next(iter(dm.val_dataloader()))
    assert float(sft_loss_terms(module.model, batch)[1]) > 0
    with open_dict(cfg):
        cfg.data.on_bad_record = "error"
    with pytest.raises(Exception, match=r"sft.jsonl:61: unreadable line \(malformed JSON"):
        build(cfg, tmp_path / "run2")
