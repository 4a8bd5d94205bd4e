"""Stage 1: supervised fine-tuning on prompt/response demonstrations (algo=sft).

loss = sum over RESPONSE target tokens of -log p(y_t | prompt, y_<t) / number of them.
Prompt and padding targets carry no loss (IGNORE_INDEX); EOS ends every response, so the
model learns to stop. Data, templates, truncation and length bucketing: data/sft_data.py.

On validation: val/loss and val/ppl over response tokens (a token-weighted mean over the whole
validation set, not a mean of batch means), and for data=synthetic the ground-truth judge on
`algo.eval_prompts` held-out test prompts with greedy decoding: val/judge_score (mean) and
val/exact (share answered exactly), and both per task kind (val/judge_score/add, val/exact/add,
...). With algo.eval_hard_prompts > 0 (off by default), the same figures on that many prompts of
the world's hard split (longer numbers) as val_hard/*, reported apart. With algo.eval_at_start
they are also logged at step 0 for the initial (e.g. pretrained) model, so one run shows SFT's
gain.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from lmforge.algos.base import StageModule, check_vocab, model_config, stage_tokenizer
from lmforge.training.optim import OptimConfig

log = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    name: str = "sft"
    batch_size: int = 32  # micro-batch per device (examples)
    # Longest example the model reads (prompt + response; prompts are cut from the left).
    seq_len: int = 128
    optim: OptimConfig = field(default_factory=OptimConfig)
    val_batches: int = 8  # validation examples = val_batches * batch_size
    loss_chunk: int = 0  # chunked LM-head + cross-entropy, rows per chunk (0 = plain; see algo=pretrain)
    # Text samples generated at each validation from validation prompts.
    n_samples: int = 3
    sample_tokens: int = 32
    sample_temperature: float = 0.0
    # bucket: batches of similar length (less padding); none: shuffled batches. Both pad each
    # batch to its longest example. (True packing needs a block-diagonal attention mask the
    # Transformer does not take; see data/sft_data.py.)
    packing: str = "bucket"
    bucket_size: int = 64  # batches per length-sorted mega-batch
    # Ground-truth judge on held-out test prompts (data=synthetic), greedy decoding.
    eval_prompts: int = 128
    eval_hard_prompts: int = 0  # also on this many prompts of the hard split (val_hard/*); 0 = off
    max_new_tokens: int = 16
    eval_at_start: bool = True  # also evaluate the initial model (logged at step 0)


def sft_loss_terms(model, batch: dict, loss_chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the response tokens' cross-entropy, number of response tokens) of a batch.

    No attention mask is passed: batches are RIGHT-padded, so causal attention already keeps
    every real token from seeing a pad, and positions 0..T-1 are each example's own."""
    from lmforge.data.sft_data import IGNORE_INDEX

    labels = batch["labels"]
    # Summed in fp32: under bf16 autocast the logits' log-softmax loses precision.
    total = model(batch["input_ids"], targets=labels, loss_chunk=loss_chunk)
    return total, (labels != IGNORE_INDEX).sum()


class SFTModule(StageModule):
    stage = "sft"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.model = self.build_causal_lm()
        self.eval_prompts: list[str] = []  # raw held-out prompts for the judge (synthetic data)
        self.eval_hard_prompts: list[str] = []  # raw prompts of the hard split (eval_hard_prompts)
        self.data_stats: dict[str, float] = {}
        self._val_sum = self._val_count = None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch, batch_idx):
        total, count = sft_loss_terms(self.model, batch, self.cfg.algo.loss_chunk)
        loss = total / count.clamp(min=1)
        mask = batch["attention_mask"]
        real = int(mask.sum())
        self.count_tokens(real)  # real tokens only: perf/tokens_per_s excludes padding
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach().clamp(max=50)))
        self.log("train/pad_fraction", 1.0 - real / mask.numel())
        return loss

    # -- validation ------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch, batch_idx):
        total, count = sft_loss_terms(self.model, batch, self.cfg.algo.loss_chunk)
        self._val_sum += total.detach().double()
        self._val_count += count.double()

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        if float(count) > 0:
            loss = float(total / count)
            self.log("val/loss", loss, prog_bar=True)
            self.log("val/ppl", math.exp(min(loss, 50.0)))
        if self.trainer.sanity_checking:
            return
        for k, v in self.judge_metrics().items():
            self.log(k, v)
        self.log_samples()

    def judge_metrics(self) -> dict[str, float]:
        """val/judge_score and val/exact of the current model, overall and per kind, and the same
        as val_hard/* on the hard split's prompts (empty without eval prompts)."""
        metrics = {}
        if self.eval_prompts and self.cfg.algo.eval_prompts > 0:
            metrics.update(self._judge(self.eval_prompts, "val"))
        if self.eval_hard_prompts:
            metrics.update(self._judge(self.eval_hard_prompts, "val_hard"))
        return metrics

    def _judge(self, prompts: list[str], prefix: str) -> dict[str, float]:
        from lmforge.eval.heldout import evaluate_judge

        res = evaluate_judge(
            self.model,
            self.tokenizer,
            prompts,
            prompt_template=self.cfg.data.prompt_template,
            max_new_tokens=self.cfg.algo.max_new_tokens,
        )
        for ex in res["examples"]:
            log.info("%s judge %.2f  %r -> %r", prefix, ex["score"], ex["prompt"], ex["response"])
        metrics = {f"{prefix}/judge_score": res["judge_score"], f"{prefix}/exact": res["exact"]}
        return metrics | {f"{prefix}/{k}": v for k, v in res["by_kind"].items()}

    def on_train_start(self) -> None:
        metrics = dict(self.data_stats)
        if self.global_step == 0 and self.cfg.algo.eval_at_start:
            metrics.update(self.judge_metrics())
        if metrics:
            log.info("SFT start: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            for lg in self.loggers:
                lg.log_metrics(metrics, step=self.global_step)

    def configure_optimizers(self):
        return self.adamw_with_schedule(self.model, self.cfg.algo.optim)


def sft_tokenizer(cfg):
    """The init_from checkpoint's tokenizer; else data.tokenizer.path; else one trained on the
    data: the synthetic world's pretraining text (the same tokenizer pretraining trains), or
    for JSONL the rendered prompts and responses themselves."""
    d = cfg.data
    if cfg.init_from or d.tokenizer.path or d.source != "jsonl":
        return stage_tokenizer(cfg)
    from lmforge.data.sft_data import jsonl_pairs
    from lmforge.data.templates import BadRecords
    from lmforge.data.tokenizer import train_tokenizer

    bad = BadRecords("skip")  # bad records are reported when the data is built
    texts = [p.prompt + p.response for p in jsonl_pairs(d, d.path, bad, "data.path")]
    return train_tokenizer(
        texts[: d.tokenizer.max_train_docs], d.tokenizer.vocab_size, d.cache_dir, model_type=d.tokenizer.model_type
    )


def build(cfg, run_dir):
    """SFT: the init_from checkpoint's tokenizer and weights (else a tokenizer from the data and a
    fresh model), prompt/response pairs from data.*, held-out judge prompts for synthetic data."""
    from lmforge.data.sft_data import PACKING_MODES, SFTBatching, SFTDataModule
    from lmforge.errors import ConfigError
    from lmforge.hf.importer import load_any_checkpoint
    from lmforge.training.checkpoint import check_compatible, require_stage
    from lmforge.world.generator import held_out_prompts

    algo = cfg.algo
    if algo.packing not in PACKING_MODES:
        raise ConfigError(f"algo.packing={algo.packing!r}: use one of {PACKING_MODES}")
    if algo.eval_hard_prompts > 0 and cfg.data.source != "synthetic":
        raise ConfigError(
            f"algo.eval_hard_prompts={algo.eval_hard_prompts}: the hard split is the synthetic world's; "
            "set data=synthetic, or algo.eval_hard_prompts=0"
        )
    if cfg.init_from:
        # Fail fast, before any data work, on a checkpoint of the wrong kind or shape.
        ckpt = load_any_checkpoint(cfg.init_from)
        require_stage(ckpt, ("pretrain", "sft"), "init_from")
        check_compatible(ckpt, model_config(cfg))
        tokenizer = ckpt.tokenizer
        del ckpt
    else:
        tokenizer = sft_tokenizer(cfg)
    check_vocab(tokenizer, cfg)
    module = SFTModule(cfg, tokenizer)
    if cfg.init_from:
        module.init_model_from(cfg.init_from, allowed=("pretrain", "sft"))
    dm = SFTDataModule(
        cfg.data,
        SFTBatching(algo.batch_size, algo.seq_len, algo.val_batches, cfg.seed, algo.packing, algo.bucket_size),
        tokenizer,
    )
    dm.prepare_data()
    module.data_stats = dm.data_stats()
    module.sample_prompts = [p.prompt for p in dm.val_pairs[: max(0, algo.n_samples)]]
    if cfg.data.source == "synthetic":
        module.eval_prompts = held_out_prompts(cfg.data.seed, algo.eval_prompts, "test")
        if algo.eval_hard_prompts > 0:
            module.eval_hard_prompts = held_out_prompts(cfg.data.seed, algo.eval_hard_prompts, "hard")
    return module, dm


CONFIG = SFTConfig
