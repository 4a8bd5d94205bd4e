"""Offline preference optimization (algo=dpo): DPO, conservative DPO, IPO and SimPO.

The policy learns from preference pairs directly, with no reward model and no sampling
(Rafailov et al., 2023). Per micro-batch of B pairs:

1. one forward of the policy over the (2B, T) batch (B chosen rows, then B rejected rows)
   gives the summed log-probability of each response (its tokens and EOS; the prompt is given);
2. the frozen reference policy (the init_from model) gives the same without gradients, or
   they were precomputed once for the whole dataset (algo.precompute_ref), or SimPO needs none;
3. `algo.loss` (lmforge.rl.preference: dpo | ipo | simpo) turns them into the loss.

Logged: train/ and val/ loss, rewards_chosen, rewards_rejected, reward_margin and accuracy
(the implicit rewards beta * log pi/ref), logps_chosen / logps_rejected (mean summed log-prob
of each side under the policy). At every validation, greedy responses to held-out prompts (the
world's test split for data=synthetic, else the validation pairs' prompts) give val/kl, the
exact KL to the reference summed over each response's tokens (the same measure as the RL
stages' val/kl), and for data=synthetic the ground-truth judge's val/gt_score and val/exact,
overall and per task kind, so DPO, IPO and SimPO compare directly with PPO.

Every preference source the reward stage reads works here (data=synthetic, jsonl, hh,
feedback; data.extra_pairs for the annotator's verdicts on the policy's own samples).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from lmforge.algos.base import StageModule, check_vocab, model_config
from lmforge.algos.rollout import gt_judge, judged_sums, response_logits, sample_rollout, token_kl
from lmforge.eval.heldout import kind_means
from lmforge.rl import logprobs_from_logits
from lmforge.rl.preference import PREFERENCE_LOSSES, dpo_loss, ipo_loss, sequence_logprobs, simpo_loss
from lmforge.training.checkpoint import POLICY_STAGES, require_stage
from lmforge.training.fsdp import gathered_for_generation
from lmforge.training.optim import OptimConfig
from lmforge.training.tracking import log_text_samples

log = logging.getLogger(__name__)


def _dpo_optim() -> OptimConfig:
    # A policy already fine-tuned: a small learning rate (DPO papers use 5e-7..1e-6 on 7B models;
    # the tiny models here move little at those).
    return OptimConfig(lr=1e-5, weight_decay=0.0, warmup_steps=10, min_lr_ratio=0.1)


@dataclass
class DPOConfig:
    name: str = "dpo"
    loss: str = "dpo"  # dpo | ipo | simpo (lmforge.rl.preference)
    # Strength of the KL regularization the loss implies (DPO, IPO: 1/(2 beta) is IPO's target
    # log-ratio margin); SimPO's reward scale (its papers use 2.0-2.5).
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO / SimPO: the assumed share of flipped labels
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    # Reference log-probabilities computed once for every training pair at the start of the run
    # (one pass over the data without gradients) instead of one reference forward per batch.
    precompute_ref: bool = False
    batch_size: int = 32  # pairs per micro-batch per device (2x sequences per forward)
    seq_len: int = 64  # prompt + response + EOS; prompts are cut from the left to fit
    val_batches: int = 8  # validation pairs = val_batches * batch_size (at most)
    length_group: int = 8  # batches cut from length-sorted groups of this many (less padding)
    optim: OptimConfig = field(default_factory=_dpo_optim)
    # -- held-out evaluation (every trainer.eval_every steps, and at step 0 with eval_at_start)
    eval_prompts: int = 128
    eval_hard_prompts: int = 0  # also this many of the synthetic world's hard split, as val_hard/*
    eval_batch_size: int = 64
    max_new_tokens: int = 16
    eval_at_start: bool = True
    n_samples: int = 3  # held-out responses logged as a table at each validation
    sample_tokens: int = 32
    sample_temperature: float = 0.0


def check_dpo_config(a) -> None:
    from lmforge.errors import ConfigError

    def check(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    check(a.loss in PREFERENCE_LOSSES, f"algo.loss={a.loss!r}: use one of {', '.join(PREFERENCE_LOSSES)}")
    check(a.beta > 0, f"algo.beta={a.beta} must be positive")
    check(0 <= a.label_smoothing < 0.5, f"algo.label_smoothing={a.label_smoothing} must be in [0, 0.5)")
    check(
        not (a.loss == "ipo" and a.label_smoothing),
        "algo.label_smoothing applies to dpo and simpo; IPO's squared loss has no labels to smooth: set it to 0",
    )
    check(a.max_new_tokens >= 1, f"algo.max_new_tokens={a.max_new_tokens} must be >= 1")
    check(a.eval_batch_size >= 1, f"algo.eval_batch_size={a.eval_batch_size} must be >= 1")


class DPOModule(StageModule):
    stage = "dpo"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        # Dropout off: the policy's and the reference's log-probabilities must come from the same
        # network at the start (the implicit rewards start at exactly 0).
        self.model_cfg = replace(self.model_cfg, dropout=0.0)
        self.model = self.build_causal_lm()
        # Frozen, never trained nor saved: not a submodule (out of the state dict, the optimizer,
        # DDP and FSDP). Kept for val/kl even when the loss needs none.
        object.__setattr__(self, "ref_model", None)
        self.judge = gt_judge(cfg.data)
        self.eval_prompts: list = []  # lmforge.data.prompt_data.Prompt
        self.eval_hard_prompts: list = []
        self.data_counts: dict[str, int] = {}
        self._val_sums: dict[str, Tensor] = {}

    # -- the models ------------------------------------------------------------------
    def init_policy(self, path: str) -> None:
        self.init_model_from(path, allowed=POLICY_STAGES)
        object.__setattr__(self, "ref_model", copy.deepcopy(self.model).eval().requires_grad_(False))

    def _ref_to_device(self) -> None:
        if self.ref_model is not None and next(self.ref_model.parameters()).device != self.device:
            self.ref_model.to(self.device)

    @property
    def needs_reference(self) -> bool:
        return self.cfg.algo.loss != "simpo"

    def response_logprobs(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(2B,) summed log-probability of each row's response tokens (and EOS) under `model`,
        and (2B,) their number. The batch is right-padded, so causal attention alone keeps real
        tokens from seeing padding (as in SFT): no attention mask."""
        ids = batch["input_ids"]
        logits = model(ids[:, :-1])  # position t predicts token t + 1
        token_logps = logprobs_from_logits(logits, ids[:, 1:])
        return sequence_logprobs(token_logps, batch["response_mask"][:, 1:])

    def reference_logprobs(self, batch: dict[str, Tensor]) -> Tensor | None:
        if not self.needs_reference:
            return None
        if "ref_logps" in batch:
            return batch["ref_logps"].to(self.device)
        self._ref_to_device()
        with torch.no_grad():
            return self.response_logprobs(self.ref_model, batch)[0]

    def pair_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        algo = self.cfg.algo
        logps, n_tokens = self.response_logprobs(self.model, batch)
        pi_c, pi_r = logps.chunk(2)
        if algo.loss == "simpo":
            n_c, n_r = n_tokens.clamp_min(1).float().chunk(2)
            loss, stats = simpo_loss(pi_c / n_c, pi_r / n_r, algo.beta, algo.simpo_gamma, algo.label_smoothing)
        else:
            ref_c, ref_r = self.reference_logprobs(batch).chunk(2)
            if algo.loss == "dpo":
                loss, stats = dpo_loss(pi_c, pi_r, ref_c, ref_r, algo.beta, algo.label_smoothing)
            else:
                loss, stats = ipo_loss(pi_c, pi_r, ref_c, ref_r, algo.beta)
        stats["logps_chosen"] = pi_c.detach().mean()
        stats["logps_rejected"] = pi_r.detach().mean()
        return loss, stats

    def _log_pair_stats(self, split: str, loss: Tensor, stats: dict[str, Tensor], n_pairs: int) -> None:
        sync = split == "val"
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=n_pairs, sync_dist=sync)
        for k, v in stats.items():
            self.log(f"{split}/{k}", v, prog_bar=k == "accuracy", batch_size=n_pairs, sync_dist=sync)

    # -- training --------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        loss, stats = self.pair_loss(batch)
        self.count_tokens(int(batch["attention_mask"].sum()))
        self._log_pair_stats("train", loss, stats, batch["input_ids"].shape[0] // 2)
        return loss

    def on_fit_start(self) -> None:
        algo = self.cfg.algo
        if algo.precompute_ref and self.needs_reference:
            self.precompute_reference()

    @torch.no_grad()
    def precompute_reference(self) -> None:
        """Every training pair's reference log-probabilities, once (each rank computes all: ranks
        read different pairs). Batches then carry them and the reference never runs in training."""
        from lmforge.data.preference_data import collate_pairs

        self._ref_to_device()
        pairs = self.trainer.datamodule.load().train
        bs = self.cfg.algo.batch_size
        for i in range(0, len(pairs), bs):
            chunk = pairs[i : i + bs]
            batch = collate_pairs(chunk, self.tokenizer.pad_id, response_mask=True)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            # The precision of the training steps (bf16-mixed: autocast), so a precomputed value
            # is the one a per-batch reference forward would give.
            with self.trainer.precision_plugin.forward_context():
                logps = self.response_logprobs(self.ref_model, batch)[0].float().cpu()
            c, r = logps.chunk(2)
            for pair, lc, lr in zip(chunk, c.tolist(), r.tolist()):
                pair.ref_logps = (lc, lr)
        log.info("DPO: reference log-probabilities precomputed for %d training pairs", len(pairs))

    def on_train_start(self) -> None:
        metrics = {f"data/{k}": float(v) for k, v in self.data_counts.items()}
        if self.global_step == 0 and self.cfg.algo.eval_at_start:
            held_out, examples = self.held_out_metrics()
            metrics.update(held_out)
            if held_out:
                log.info(
                    "DPO start (step 0, the initial policy): %s",
                    ", ".join(f"{k}={v:.4g}" for k, v in sorted(held_out.items())),
                )
            self._log_examples(examples, 0)
        if metrics:
            for lg in self.loggers:
                lg.log_metrics(metrics, step=self.global_step)

    # -- validation ------------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        loss, stats = self.pair_loss(batch)
        self._log_pair_stats("val", loss, stats, batch["input_ids"].shape[0] // 2)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        metrics, examples = self.held_out_metrics()
        for k, v in metrics.items():
            self.log(k, v, prog_bar=k in ("val/gt_score", "val/kl"))
        self._log_examples(examples, self.global_step)

    def _log_examples(self, examples: list[dict], step: int) -> None:
        n = self.cfg.algo.n_samples
        if n > 0 and examples:
            log_text_samples(self.trainer, "eval_samples", [{"step": step, **e} for e in examples[:n]])

    def held_out_metrics(self) -> tuple[dict[str, float], list[dict]]:
        """val/* (and val_hard/*) of greedy responses to the held-out prompts, each rank
        evaluating its share, the sums reduced over ranks; and this rank's examples."""
        metrics, examples = self._evaluate_all(self.eval_prompts, "val")
        if self.eval_hard_prompts:
            metrics.update(self._evaluate_all(self.eval_hard_prompts, "val_hard")[0])
        return metrics, examples

    def _evaluate_all(self, prompts: list, prefix: str) -> tuple[dict[str, float], list[dict]]:
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank if self._trainer is not None else 0
        mine, bs = prompts[rank::world], self.cfg.algo.eval_batch_size
        sums: dict[str, Tensor] = {"n": torch.zeros((), dtype=torch.float64, device=self.device)}
        examples: list[dict] = []
        for i in range(0, len(mine), bs):
            part, ex = self.evaluate_prompts(mine[i : i + bs])
            sums = {k: sums.get(k, 0) + v for k, v in part.items()}
            examples += ex
        if world > 1:
            sums = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in sorted(sums.items())}
        n = float(sums["n"])
        if n == 0:
            return {}, examples
        out = {f"{prefix}/{k}": float(v) / n for k, v in sums.items() if k != "n" and "/" not in k}
        out |= {f"{prefix}/{k}": v for k, v in kind_means({k: float(v) for k, v in sums.items() if "/" in k}).items()}
        return out, examples

    @torch.no_grad()
    def evaluate_prompts(self, prompts: list) -> tuple[dict[str, Tensor], list[dict]]:
        """Sums over `prompts` (greedy responses) of the KL to the reference, the response length
        and, with the synthetic world's judge, the ground-truth score; and the examples."""
        self._ref_to_device()
        with gathered_for_generation(self.model):
            ro = sample_rollout(
                self.model, prompts, self.tokenizer, max_new_tokens=self.cfg.algo.max_new_tokens, temperature=0.0
            )
            logits, _ = response_logits(self.model, ro.sequences, ro.attention_mask, ro.prompt_len)
        ref_logits, _ = response_logits(self.ref_model, ro.sequences, ro.attention_mask, ro.prompt_len)
        m = ro.response_mask
        kl = token_kl(logits, ref_logits).masked_fill(~m, 0.0).sum(-1)

        def total(x: Tensor) -> Tensor:
            return x.detach().double().sum()

        sums = {
            "n": torch.tensor(float(ro.size), dtype=torch.float64, device=self.device),
            "kl": total(kl),
            "response_len": total(ro.lengths().float()),
            "eos_frac": total(ro.ended.float()),
        }
        examples = [{"prompt": p.text, "sample": r} for p, r in zip(ro.prompts, ro.responses)]
        if self.judge is not None:
            sums.update(judged_sums(self.judge, ro, examples, self.device))
        return sums, examples

    # -- optimizer, checkpoints --------------------------------------------------------
    @property
    def checkpoint_monitor(self) -> tuple[str, str]:
        """best.ckpt: the highest held-out judge score where there is a judge, else the lowest loss."""
        return ("val/gt_score", "max") if self.judge is not None else ("val/loss", "min")

    def configure_optimizers(self):
        return self.adamw_with_schedule(self.model, self.cfg.algo.optim)


def held_out_prompts_of(cfg, splits, tokenizer, max_prompt_tokens: int) -> tuple[list, list]:
    """(held-out prompts, hard-split prompts) to evaluate on: the world's test (and hard) split for
    data=synthetic; else the distinct prompts of the validation pairs (no hard split)."""
    from lmforge.data.prompt_data import Prompt, encode_prompts, synthetic_held_out

    algo = cfg.algo
    if cfg.data.source == "synthetic":
        test, _ = encode_prompts(synthetic_held_out(cfg.data, algo.eval_prompts, "test"), tokenizer, max_prompt_tokens)
        hard = []
        if algo.eval_hard_prompts > 0:
            records = synthetic_held_out(cfg.data, algo.eval_hard_prompts, "hard")
            hard, _ = encode_prompts(records, tokenizer, max_prompt_tokens)
        return test, hard
    prompts, seen = [], set()
    for i, pair in enumerate(splits.val):
        ids = tuple(pair.chosen[: pair.n_prompt_chosen][-max_prompt_tokens:])
        if ids and ids not in seen and len(prompts) < algo.eval_prompts:
            seen.add(ids)
            text = tokenizer.decode(list(ids))
            prompts.append(Prompt(text, text, list(ids), f"validation pair {i}"))
    return prompts, []


def build(cfg, run_dir):
    """DPO: the policy and its reference from init_from, preference pairs from data.*."""
    from lmforge.algos.base import stage_tokenizer
    from lmforge.data.preference_data import PreferenceBatching, PreferenceDataModule
    from lmforge.errors import ConfigError
    from lmforge.hf.importer import load_any_checkpoint
    from lmforge.training.checkpoint import check_compatible

    algo = cfg.algo
    check_dpo_config(algo)
    if not cfg.init_from:
        raise ConfigError(
            "algo=dpo improves an existing language model: set init_from=<an SFT checkpoint>, e.g. "
            "init_from=outputs/<sft run>/checkpoints/last.ckpt (the reference policy is a frozen copy of it)"
        )
    if algo.eval_hard_prompts > 0 and cfg.data.source != "synthetic":
        raise ConfigError(
            f"algo.eval_hard_prompts={algo.eval_hard_prompts}: the hard split is the synthetic world's; "
            "set data=synthetic, or algo.eval_hard_prompts=0"
        )
    ckpt = load_any_checkpoint(cfg.init_from)  # fail fast, before any data work
    require_stage(ckpt, POLICY_STAGES, "init_from")
    check_compatible(ckpt, model_config(cfg))
    del ckpt
    tokenizer = stage_tokenizer(cfg)
    check_vocab(tokenizer, cfg)
    module = DPOModule(cfg, tokenizer)
    module.init_policy(cfg.init_from)
    batching = PreferenceBatching(algo.batch_size, algo.seq_len, algo.val_batches, cfg.seed, algo.length_group)
    dm = PreferenceDataModule(cfg.data, batching, tokenizer, response_mask=True)
    splits = dm.load()
    module.data_counts = dict(splits.counts)
    max_prompt = module.model_cfg.max_seq_len - algo.max_new_tokens
    module.eval_prompts, module.eval_hard_prompts = held_out_prompts_of(cfg, splits, tokenizer, max_prompt)
    return module, dm


CONFIG = DPOConfig
