"""What every stage's LightningModule shares: the model factory, optimizer wiring, token
counting for throughput, text samples, and the checkpoint metadata later stages read.

Stages never import each other; they share the backbone through `lmforge.model`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from lmforge.hf.importer import load_any_checkpoint
from lmforge.model import CausalLM, ModelConfig, generate
from lmforge.training.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    check_compatible,
    load_matching,
    require_stage,
    submodule_state,
)
from lmforge.training.optim import OptimConfig, build_adamw, build_scheduler
from lmforge.training.tracking import log_text_samples


def model_config(cfg) -> ModelConfig:
    """The typed, validated ModelConfig of a composed run config."""
    mc = OmegaConf.to_object(cfg.model) if not isinstance(cfg.model, ModelConfig) else cfg.model
    mc.validate()
    return mc


class StageModule(L.LightningModule):
    stage: str = "?"

    def __init__(self, cfg, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.model_cfg = model_config(cfg)
        self.sample_prompts: list[str] = []
        self.tokens_seen = 0  # this rank's tokens since the start of this process (throughput)
        self.lineage: dict[str, str] = {}  # checkpoints this run was initialized from

    def build_causal_lm(self) -> CausalLM:
        model = CausalLM(self.model_cfg)
        if getattr(self.cfg, "compile", False):
            model.compile()  # in place: state-dict keys stay free of `_orig_mod`
        return model

    def count_tokens(self, n: int) -> None:
        self.tokens_seen += n

    def flops_per_token(self) -> float:
        return self.model.backbone.flops_per_token(self.cfg.algo.seq_len)

    def configure_model(self) -> None:
        """Lightning's hook, run on every rank once the processes exist and before the optimizer
        is built: FSDP2 sharding of every model under strategy=fsdp, activation checkpointing
        where asked, the global-batch bookkeeping (lmforge.training.strategy.configure_for_strategy)."""
        from lmforge.training.strategy import configure_for_strategy

        configure_for_strategy(self)

    def adamw_with_schedule(self, model: torch.nn.Module, optim: OptimConfig):
        opt = build_adamw(model, optim)
        sched = build_scheduler(opt, optim, total_steps=optim.decay_steps or self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    # -- samples ---------------------------------------------------------------------
    def sample_texts(self, prompts: list[str], max_new_tokens: int, temperature: float) -> list[str]:
        tok = self.tokenizer
        ids = [tok.encode(p) if p else [tok.eos_id] for p in prompts]
        gen = torch.Generator(device=self.device).manual_seed(1234)
        out = generate(
            self.model,
            ids,
            max_new_tokens=max_new_tokens,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
            temperature=temperature,
            generator=gen,
        )
        resp = out.sequences[:, out.prompt_len :]
        return [tok.decode(r[m].tolist()) for r, m in zip(resp, out.response_mask)]

    def log_samples(self) -> None:
        algo = self.cfg.algo
        prompts = self.sample_prompts[: algo.n_samples]
        if not prompts or algo.n_samples <= 0:
            return
        texts = self.sample_texts(prompts, algo.sample_tokens, algo.sample_temperature)
        rows = [{"step": self.global_step, "prompt": p, "sample": t} for p, t in zip(prompts, texts)]
        log_text_samples(self.trainer, "samples", rows)

    # -- checkpoints -----------------------------------------------------------------
    def checkpoint_metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "stage": self.stage,
            "model_config": asdict(self.model_cfg),
            # The tokenizer travels inside the checkpoint, so every later stage, the sampler and
            # the feedback app decode exactly as this run encoded.
            "tokenizer": torch.frombuffer(bytearray(self.tokenizer.proto()), dtype=torch.uint8),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "lineage": dict(self.lineage),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lmforge"] = self.checkpoint_metadata()

    def init_model_from(self, path: str, allowed: tuple[str, ...]) -> None:
        """Start from a previous stage's weights (the whole LM: backbone and LM head)."""
        ckpt = load_any_checkpoint(path)
        require_stage(ckpt, allowed, "init_from")
        check_compatible(ckpt, self.model_cfg)
        if ckpt.tokenizer.proto() != self.tokenizer.proto():
            raise CheckpointError(
                f"init_from={path} was trained with a different tokenizer than this run's; "
                "run this stage with the checkpoint's tokenizer (it is used automatically when the "
                "stage takes its tokenizer from init_from)"
            )
        load_matching(self.model, submodule_state(ckpt.state_dict, "model"), f"init_from={path}")
        self.lineage["init_from"] = str(path)


def stage_tokenizer(cfg):
    """The tokenizer of a stage: the init_from checkpoint's (so ids mean the same), else the data's."""
    if cfg.init_from:
        return load_any_checkpoint(cfg.init_from).tokenizer
    from lmforge.data.pretrain_data import load_or_train_tokenizer

    return load_or_train_tokenizer(cfg.data)


def check_vocab(tokenizer, cfg) -> None:
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}: "
            f"raise model.vocab_size to at least {tokenizer.vocab_size}"
        )
