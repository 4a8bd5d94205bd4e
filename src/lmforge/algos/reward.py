"""Stage 2: the reward model (algo=reward), step 2 of InstructGPT.

A scalar head on the shared backbone reads the hidden state at the last real token of
prompt + response + EOS (the position the policy ends on) and is trained on human (or
simulated) comparisons with the Bradley-Terry loss

    loss = -mean log sigmoid(r(x, y_chosen) - r(x, y_rejected) - margin) + center_coef * mean(r^2)

Chosen and rejected responses go through the model in ONE forward pass (a (2B, T) batch).
After each validation the mean and std of the rewards of the validation pairs' responses are
stored in the checkpoint (`lmforge.reward_stats`), so PPO can normalize rewards.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from lmforge.algos.base import StageModule, check_vocab
from lmforge.hf.importer import load_any_checkpoint
from lmforge.model import ScalarModel, gather_last
from lmforge.rl import bradley_terry_loss
from lmforge.training.checkpoint import (
    CheckpointError,
    check_compatible,
    load_matching,
    require_stage,
    submodule_state,
)
from lmforge.training.optim import OptimConfig
from lmforge.training.tracking import log_text_samples

log = logging.getLogger(__name__)


@dataclass
class RewardConfig:
    name: str = "reward"
    batch_size: int = 32  # pairs per micro-batch per device (2x sequences per forward)
    seq_len: int = 128  # prompt + response + EOS; prompts are cut from the left to fit
    optim: OptimConfig = field(default_factory=OptimConfig)
    val_batches: int = 8  # validation pairs = val_batches * batch_size (at most)
    # Text samples do not apply to a reward model (it has no LM head); kept for the shared schema.
    n_samples: int = 0
    sample_tokens: int = 48
    sample_temperature: float = 0.8
    # Batches are formed from groups of length_group * batch_size pairs sorted by length (less
    # padding: ~1.4x faster on the synthetic data); 1 = plain random batches.
    length_group: int = 8
    # Demand r_chosen - r_rejected >= margin (Llama 2); 0 = the plain Bradley-Terry loss.
    margin: float = 0.0
    # center_coef * mean((r_c + r_r)^2): pulls rewards to zero mean (Eisenstein et al., 2023).
    center_coef: float = 0.0


@dataclass
class JudgeSet:
    """Held-out pairs with the noiseless judge's verdict, batched as the model reads them."""

    batches: list[dict[str, torch.Tensor]]
    sign: torch.Tensor  # +1 where the judge prefers the first response of a pair
    kinds: list[str]  # each pair's task kind


class RewardModule(StageModule):
    stage = "reward"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.model = ScalarModel(self.model_cfg)
        if getattr(cfg, "compile", False):
            self.model.compile()
        # Synthetic data: held-out pairs labelled by the noiseless judge (data.PreferenceSplits),
        # by name: "" = pairs of the held-out test prompts, "seen" = new pairs of training prompts.
        self.judge_sets: dict[str, JudgeSet] = {}
        self.data_counts: dict[str, int] = {}
        self.reward_stats: dict | None = None
        self._val_rewards: list[torch.Tensor] = []

    # -- the model -------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, T) padded sequences -> (N,) fp32 rewards read at each row's last real token."""
        values = self.model(input_ids, attention_mask=attention_mask)
        return gather_last(values, attention_mask).float()

    def pair_loss(self, batch: dict[str, torch.Tensor]):
        rewards = self(batch["input_ids"], batch["attention_mask"])
        r_chosen, r_rejected = rewards.chunk(2)  # rows [0, B) chosen, [B, 2B) rejected
        algo = self.cfg.algo
        loss, stats = bradley_terry_loss(r_chosen, r_rejected, margin=algo.margin or None, center_coef=algo.center_coef)
        return loss, stats, rewards

    def _log_pair_stats(self, split: str, loss, stats, n_pairs: int) -> None:
        sync = split == "val"
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=n_pairs, sync_dist=sync)
        self.log(f"{split}/accuracy", stats["accuracy"], prog_bar=True, batch_size=n_pairs, sync_dist=sync)
        self.log(f"{split}/margin", stats["margin_mean"], batch_size=n_pairs, sync_dist=sync)
        self.log(f"{split}/reward_mean", stats["reward_mean"], batch_size=n_pairs, sync_dist=sync)
        self.log(f"{split}/reward_std", stats["reward_std"], batch_size=n_pairs, sync_dist=sync)

    # -- training --------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        loss, stats, _ = self.pair_loss(batch)
        self.count_tokens(int(batch["attention_mask"].sum()))
        self._log_pair_stats("train", loss, stats, batch["input_ids"].shape[0] // 2)
        return loss

    def on_train_start(self) -> None:
        if self.data_counts:
            for lg in self.loggers:
                lg.log_metrics({f"data/{k}": float(v) for k, v in self.data_counts.items()}, step=0)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Lightning validates (and so checkpoints) only every trainer.eval_every steps; a
        # requested stop makes it validate at the final step too, so last.ckpt holds the final
        # weights and the reward statistics computed from them.
        if self.trainer.global_step >= self.trainer.max_steps:
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        # ModelCheckpoint(monitor="val/loss", save_last=True) rewrites last.ckpt only when the
        # monitored loss improved, so without this last.ckpt could hold older weights (and
        # reward statistics) than the run ended with. Every rank calls it; rank zero writes.
        cb = self.trainer.checkpoint_callback
        if cb is not None and cb.dirpath and self.trainer.global_step > 0:
            self.trainer.save_checkpoint(os.path.join(cb.dirpath, "last.ckpt"))

    # -- validation ------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_rewards = []
        self._val_examples: list[dict] = []

    def validation_step(self, batch, batch_idx):
        loss, stats, rewards = self.pair_loss(batch)
        self._val_rewards.append(rewards.detach())
        self._log_pair_stats("val", loss, stats, batch["input_ids"].shape[0] // 2)
        if batch_idx == 0:
            self._val_examples = self.scored_pairs(batch, rewards)

    def scored_pairs(self, batch, rewards, n: int = 4) -> list[dict]:
        """The first pairs of a validation batch, decoded, with the rewards the model gives them."""
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        half = ids.shape[0] // 2  # rows [0, half) chosen, [half, 2 half) rejected
        text = lambda i: self.tokenizer.decode(ids[i][mask[i]].tolist())  # noqa: E731
        return [
            {
                "step": self.global_step,
                "chosen": text(i),
                "rejected": text(half + i),
                "reward_chosen": round(float(rewards[i]), 4),
                "reward_rejected": round(float(rewards[half + i]), 4),
            }
            for i in range(min(n, half))
        ]

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self._val_rewards:
            return
        rewards = torch.cat(self._val_rewards)
        if self.trainer.world_size > 1:
            rewards = self.all_gather(rewards).reshape(-1)
        self.reward_stats = {
            "mean": float(rewards.mean()),
            "std": float(rewards.std(unbiased=False)),
            "n": int(rewards.numel()),
        }
        self.log("val/reward_stats_mean", self.reward_stats["mean"])
        self.log("val/reward_stats_std", self.reward_stats["std"])
        if self._val_examples:  # a bounded W&B table `reward_samples`, and reward_samples.jsonl
            log_text_samples(self.trainer, "reward_samples", self._val_examples)
        for name in self.judge_sets:
            self.log_judge_agreement(name)

    @torch.no_grad()
    def judge_rewards(self, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        first, second = [], []
        for batch in self.judge_sets[name].batches:
            r = self(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            a, b = r.chunk(2)
            first.append(a)
            second.append(b)
        return torch.cat(first).cpu(), torch.cat(second).cpu()

    def log_judge_agreement(self, name: str = "") -> None:
        """How often the RM prefers what the NOISELESS judge prefers: val/judge_agreement (and per
        task kind) on the held-out test prompts' pairs, val/judge_agreement_seen on new pairs of
        the training prompts."""
        judged = self.judge_sets[name]
        r_a, r_b = self.judge_rewards(name)
        agree = ((r_a - r_b) * judged.sign > 0).float()
        if name:
            self.log(f"val/judge_agreement_{name}", agree.mean())
            return
        self.log("val/judge_agreement", agree.mean())
        for kind in sorted(set(judged.kinds)):
            idx = torch.tensor([k == kind for k in judged.kinds])
            self.log(f"val/judge_agreement_{kind}", agree[idx].mean())

    def set_judge_pairs(self, encoded, pairs, batch_size: int, name: str = "") -> None:
        """Held-out pairs with ground truth; ties (no preference) are left out."""
        from lmforge.data.preference_data import collate_pairs

        keep = [i for i, p in enumerate(pairs) if p.chosen_score != p.rejected_score]
        encoded = [encoded[i] for i in keep]
        pairs = [pairs[i] for i in keep]
        batches = [
            collate_pairs(encoded[i : i + batch_size], self.tokenizer.pad_id)
            for i in range(0, len(encoded), batch_size)
        ]
        sign = torch.tensor([1.0 if p.chosen_score > p.rejected_score else -1.0 for p in pairs])
        self.judge_sets[name] = JudgeSet(batches, sign, [p.kind or "?" for p in pairs])

    # -- checkpoints -----------------------------------------------------------------
    def checkpoint_metadata(self) -> dict:
        meta = super().checkpoint_metadata()
        if self.reward_stats is not None:
            meta["reward_stats"] = dict(self.reward_stats)
        return meta

    def on_load_checkpoint(self, checkpoint: dict) -> None:  # resume
        stats = (checkpoint.get("lmforge") or {}).get("reward_stats")
        if stats is not None:
            self.reward_stats = dict(stats)

    def init_backbone_from(self, path: str) -> None:
        """The backbone of a pretraining or SFT checkpoint; the scalar head stays fresh."""
        ckpt = load_any_checkpoint(path)
        require_stage(ckpt, ("pretrain", "sft"), "init_from")
        check_compatible(ckpt, self.model_cfg)
        if ckpt.tokenizer.proto() != self.tokenizer.proto():
            raise CheckpointError(f"init_from={path} was trained with a different tokenizer than this run's")
        backbone = submodule_state(ckpt.state_dict, "model.backbone")
        if not backbone:
            raise CheckpointError(f"init_from={path} has no model.backbone.* weights")
        load_matching(self.model.backbone, backbone, f"init_from={path} (backbone)")
        self.lineage["init_from"] = str(path)

    def configure_optimizers(self):
        return self.adamw_with_schedule(self.model, self.cfg.algo.optim)


def build(cfg, run_dir):
    """The reward stage: a tokenizer and backbone from init_from, preference pairs from data.*."""
    from lmforge.algos.base import stage_tokenizer
    from lmforge.data.preference_data import PreferenceBatching, PreferenceDataModule, preference_tokenizer

    if cfg.init_from:
        tokenizer = stage_tokenizer(cfg)
    else:
        log.warning(
            "algo=reward without init_from: training a reward model from scratch, with a tokenizer "
            "trained on the data. Give init_from=<SFT or pretraining checkpoint> for a useful one."
        )
        tokenizer = preference_tokenizer(cfg.data)
    check_vocab(tokenizer, cfg)
    module = RewardModule(cfg, tokenizer)
    if cfg.init_from:  # before reading data: a wrong checkpoint fails fast
        module.init_backbone_from(cfg.init_from)
    algo = cfg.algo
    batching = PreferenceBatching(algo.batch_size, algo.seq_len, algo.val_batches, cfg.seed, algo.length_group)
    dm = PreferenceDataModule(cfg.data, batching, tokenizer)
    splits = dm.load()
    module.data_counts = dict(splits.counts)
    if splits.judge:
        module.set_judge_pairs(splits.judge, splits.judge_pairs, cfg.algo.batch_size)
    if splits.judge_seen:
        module.set_judge_pairs(splits.judge_seen, splits.judge_seen_pairs, cfg.algo.batch_size, "seen")
    return module, dm


CONFIG = RewardConfig
