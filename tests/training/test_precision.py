"""Every stage under every precision and AdamW implementation, on any CPU.

The product once crashed at the first optimizer step on every machine with bf16 (GPUs, CPUs with
AVX512-BF16/AMX): `precision=auto` meant bf16-mixed there, `optim.impl=auto` meant fused AdamW,
and Lightning's AMP plugin refuses to clip gradients for a fused optimizer. The suite had passed
because the machine it ran on had no native bf16. bf16 autocast runs on every x86 CPU (emulated
where it is not native), so these tests pin the precision and catch that class of failure on a
machine without bf16 hardware: the `nano` model and two steps per cell.

What each cell checks, beyond "it finished": the precision and optimizer really are the ones
asked for, every optimizer step saw gradients clipped to `grad_clip` (unscaled first under
16-mixed), and the losses are finite.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "algos"))  # the shared RL helpers

from conftest import compose_config  # noqa: E402
from test_rollout import build_rl_assets, rl_config  # noqa: E402

import lmforge.run  # noqa: E402
from lmforge.model import CausalLM, KVCache, ModelConfig, generate  # noqa: E402
from lmforge.training.checkpoint import load_checkpoint  # noqa: E402
from lmforge.training.precision import ClippingMixedPrecision, PrecisionError, mixed_precision_plugin  # noqa: E402
from lmforge.training.trainer import TrainerConfig, resolve_precision  # noqa: E402

CLIP = 1e-3  # far below any real gradient norm, so every step is clipped and the clip is visible


# ============================================================================ what `auto` means


@pytest.mark.parametrize(
    ("cuda", "cuda_bf16", "cpu_bf16", "accelerator", "expected"),
    [
        (True, True, False, "auto", "bf16-mixed"),  # an Ampere-or-newer GPU
        (True, True, False, "gpu", "bf16-mixed"),
        (True, False, False, "auto", "32-true"),  # a GPU without bf16 (V100, T4)
        (True, True, False, "cpu", "32-true"),  # a GPU machine told to train on its CPU
        (True, False, True, "cpu", "bf16-mixed"),  # ... whose CPU has native bf16
        (False, False, True, "auto", "bf16-mixed"),  # a CPU with AVX512-BF16 / AMX
        (False, False, True, "cpu", "bf16-mixed"),
        (False, False, False, "auto", "32-true"),  # an AVX2 CPU: bf16 would be emulated
        (False, False, False, "cpu", "32-true"),
    ],
)
def test_auto_precision_for_each_kind_of_machine(monkeypatch, cuda, cuda_bf16, cpu_bf16, accelerator, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr("lmforge.training.trainer.cpu_has_fast_bf16", lambda: cpu_bf16)
    assert resolve_precision(TrainerConfig(accelerator=accelerator)) == expected
    for pinned in ("32-true", "bf16-mixed"):
        assert resolve_precision(TrainerConfig(accelerator=accelerator, precision=pinned)) == pinned


def test_precision_names_are_normalized_and_typos_refused(make_cfg):
    from lmforge.config import validate
    from lmforge.errors import ConfigError

    assert resolve_precision(TrainerConfig(precision="bf16")) == "bf16-mixed"  # Lightning's short form
    assert resolve_precision(TrainerConfig(precision="32")) == "32-true"
    assert mixed_precision_plugin(resolve_precision(TrainerConfig(precision="bf16")), "cpu") is not None
    with pytest.raises(ConfigError, match=r"trainer.precision='bf16-mxed' is not a precision: use one of auto"):
        validate(make_cfg("model=nano", "trainer.precision=bf16-mxed"))


def test_tests_pin_their_precision():
    """The suite means the same on every machine: composed test configs never leave it to `auto`."""
    assert compose_config([]).trainer.precision == "32-true"
    assert compose_config(["trainer.precision=bf16-mixed"]).trainer.precision == "bf16-mixed"


def test_mixed_precision_plugin_choices():
    assert mixed_precision_plugin("32-true", "cpu") is None
    plugin = mixed_precision_plugin("bf16-mixed", "cpu")
    assert isinstance(plugin, ClippingMixedPrecision) and plugin.scaler is None and plugin.device == "cpu"
    with pytest.raises(PrecisionError, match="bf16-mixed"):
        mixed_precision_plugin("16-mixed", "cpu")
    with pytest.raises(PrecisionError, match="strategy=fsdp"):
        mixed_precision_plugin("16-mixed", "gpu", "fsdp")


# ============================================================================ the plugin alone


def record_grad_norms(opt: torch.optim.Optimizer, norms: list[float]) -> None:
    """Append to `norms` the global gradient norm each opt.step() updated with (read right after
    it: under automatic optimization Lightning runs forward, backward and clipping inside it)."""

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    opt.register_step_post_hook(record)


class Regression(L.LightningModule):
    """A linear model whose step records the gradient norm the optimizer's step() sees."""

    def __init__(self, impl: str, manual: bool):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 1))
        self.impl, self.automatic_optimization = impl, not manual
        self.norms: list[float] = []

    def configure_optimizers(self):
        kwargs = {"fused": True} if self.impl == "fused" else {"foreach": True}
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, **kwargs)
        record_grad_norms(opt, self.norms)
        return opt

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x).float().squeeze(-1), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad()
        return loss

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 16, generator=g)
        return torch.utils.data.DataLoader(list(zip(x, 10 * x.sum(-1))), batch_size=16)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("impl", ["fused", "foreach"])
@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_every_step_sees_gradients_clipped(tmp_path, precision, impl, manual):
    """bf16: clip as is. fp16 (a GradScaler, on the CPU here): unscale first, then clip, for a
    fused AdamW too, in automatic optimization and in the manual one the RL stages use."""
    model = Regression(impl, manual)
    # A modest loss scale (the default 2**16 overflows this loss in fp16 and skips steps); large
    # enough that clipping the still-scaled gradients would leave norms 256x too big.
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if precision == "16-mixed" else None
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        plugins=[ClippingMixedPrecision(precision, "cpu", scaler=scaler)],
        gradient_clip_val=None if manual else CLIP,
    )
    trainer.fit(model)
    assert model.norms == pytest.approx([CLIP] * 4, rel=1e-3), model.norms
    if scaler is not None:
        assert scaler.get_scale() == 256.0  # no step was skipped as inf/NaN


# ============================================================================ every stage x precision x AdamW


@pytest.fixture(scope="module")
def assets(tmp_path_factory, shared_cache):
    return build_rl_assets(tmp_path_factory, shared_cache)


class Probe(L.Callback):
    """What the trainer really ran with, and the gradient norm at every optimizer step."""

    def __init__(self):
        self.norms: list[float] = []
        self.precision = self.plugin = self.optimizer = None

    def on_train_start(self, trainer, pl_module):
        self.precision, self.plugin = trainer.precision, type(trainer.precision_plugin)
        self.optimizer = trainer.optimizers[0]
        record_grad_norms(self.optimizer, self.norms)


def stage_config(stage: str, assets: dict, run_dir: Path, *overrides: str):
    pin = [*overrides, f"algo.optim.grad_clip={CLIP}"]
    if stage in ("ppo", "reinforce", "rloo", "grpo"):
        k = 2 if stage in ("rloo", "grpo") else 1
        return rl_config(
            stage,
            assets,
            run_dir,
            f"algo.reward.model={assets['reward']}",
            f"algo.samples_per_prompt={k}",
            f"algo.rollout_batch_size={4 // k}",
            *pin,
        )
    common = [
        "model=nano",
        "logger=none",
        "trainer.progress_bar=none",
        "trainer.accelerator=cpu",
        "data.n_docs=2000",
        f"data.cache_dir={assets['cache']}",
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        "trainer.log_every=1",
        "algo.batch_size=4",
        "algo.val_batches=1",
    ]
    extra = {
        "pretrain": ["algo.seq_len=32", "algo.n_samples=0"],
        "sft": [f"init_from={assets['policy']}", "data.n_sft=200", "algo.eval_prompts=4", "algo.max_new_tokens=4"],
        "reward": [f"init_from={assets['policy']}", "data.n_pairs=200"],
    }[stage]
    return compose_config([f"algo={stage}", *common, *extra, *pin], run_dir=run_dir)


def run_probed(monkeypatch, cfg) -> tuple[dict, Probe]:
    probe = Probe()
    build = lmforge.run.build_trainer

    def build_with_probe(*args, extra_callbacks=None, **kwargs):
        return build(*args, extra_callbacks=[*(extra_callbacks or []), probe], **kwargs)

    monkeypatch.setattr(lmforge.run, "build_trainer", build_with_probe)
    return lmforge.run.main(cfg), probe


STAGES = ["pretrain", "sft", "reward", "ppo", "reinforce", "rloo", "grpo"]


@pytest.mark.parametrize("impl", ["fused", "foreach"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("stage", STAGES)
def test_stage_trains_in_each_precision_with_each_adamw(monkeypatch, tmp_path, assets, stage, precision, impl):
    cfg = stage_config(stage, assets, tmp_path / "run", f"trainer.precision={precision}", f"algo.optim.impl={impl}")
    result, probe = run_probed(monkeypatch, cfg)

    assert result["global_step"] == 2 and load_checkpoint(result["last_checkpoint"]).stage == stage
    assert probe.precision == precision
    if precision == "bf16-mixed":
        assert probe.plugin is ClippingMixedPrecision
    assert probe.optimizer.defaults["fused"] is (True if impl == "fused" else None)
    assert probe.optimizer.defaults["foreach"] is (True if impl == "foreach" else None)
    # Every update (RL stages make several per step) was clipped; nothing was skipped or NaN.
    assert len(probe.norms) >= 2
    assert probe.norms == pytest.approx([CLIP] * len(probe.norms), rel=1e-3), probe.norms
    losses = {k: v for k, v in result["metrics"].items() if "loss" in k}
    assert losses and all(math.isfinite(v) for v in losses.values()), result["metrics"]


@pytest.mark.parametrize(
    ("stage", "switch"),
    [
        ("pretrain", "algo.loss_chunk=64"),
        ("sft", "algo.loss_chunk=64"),
        ("ppo", "algo.static_cache=true"),
        ("grpo", "algo.static_cache=true"),
    ],
)
def test_fast_paths_train_in_bf16_mixed(monkeypatch, tmp_path, assets, stage, switch):
    """The chunked LM-head loss and the static-shape KV cache (rollouts under autocast) in bf16."""
    cfg = stage_config(stage, assets, tmp_path / "run", "trainer.precision=bf16-mixed", "algo.optim.impl=fused", switch)
    result, probe = run_probed(monkeypatch, cfg)
    assert result["global_step"] == 2 and probe.precision == "bf16-mixed"
    assert probe.norms == pytest.approx([CLIP] * len(probe.norms), rel=1e-3), probe.norms


# ============================================================================ generation with the KV cache


def small_lm() -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=32, d_ff=64)
    return CausalLM(cfg).eval()


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("mode", ["fp32", "bf16-autocast", "bf16-weights"])
def test_generation_with_the_cache_in_each_precision(mode, static):
    model = small_lm()
    if mode == "bf16-weights":
        model = model.to(torch.bfloat16)
    prompts = [[5, 17, 3, 9], [12, 2]]
    ctx = (
        torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16-autocast" else torch.autocast("cpu", enabled=False)
    )
    caches: list[KVCache] = []
    allocate = KVCache.allocate

    def keep(*args, **kwargs):
        caches.append(allocate(*args, **kwargs))
        return caches[-1]

    with ctx, pytest.MonkeyPatch.context() as mp:
        mp.setattr(KVCache, "allocate", keep)
        cached = generate(model, prompts, max_new_tokens=8, eos_id=60, pad_id=0, temperature=0.0, static_cache=static)
        recomputed = generate(model, prompts, max_new_tokens=8, eos_id=60, pad_id=0, temperature=0.0, use_cache=False)
    # The cache holds what attention computes with: bf16 under autocast and with bf16 weights.
    expected = torch.float32 if mode == "fp32" else torch.bfloat16
    assert [caches[0].dtype(layer) for layer in range(2)] == [expected, expected]
    # Greedy decoding with the cache matches re-running the whole context (bf16: the first tokens,
    # which no rounding difference of the two paths has had the chance to flip yet).
    n = 8 if mode == "fp32" else 3
    P = cached.prompt_len
    assert torch.equal(cached.sequences[:, P : P + n], recomputed.sequences[:, P : P + n])


def test_cache_keeps_an_explicit_dtype_and_casts_what_it_receives():
    model = small_lm()
    cache = KVCache.allocate(model.cfg, 1, 8, dtype=torch.float32, static=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 8, dtype=torch.bool), kv_cache=cache)
    assert cache.dtype(0) == torch.float32 and cache.length == 3
    assert cache.k[0][:, :, :3].abs().sum() > 0 and cache.k[0][:, :, 3:].abs().sum() == 0
