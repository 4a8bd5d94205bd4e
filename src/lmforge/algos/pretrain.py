"""Stage 0: next-token pretraining of the backbone (algo=pretrain).

loss = mean over positions t of -log p(x_{t+1} | x_{<=t}). Everything else here is
bookkeeping a demanding user expects: AdamW with decay groups, warmup + cosine, perplexity,
bits per byte (tokenizer independent), and a few text samples at each validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lmforge.algos.base import StageModule, check_vocab
from lmforge.training.optim import OptimConfig


@dataclass
class PretrainConfig:
    name: str = "pretrain"
    batch_size: int = 16  # micro-batch per device; global = batch * accumulation * world size
    seq_len: int = 128
    optim: OptimConfig = field(default_factory=OptimConfig)
    val_batches: int = 20  # validation windows = val_batches * batch_size
    # Rows of logits per chunk of a chunked LM-head + cross-entropy (model/lm_loss.py) that never
    # holds the (tokens, vocab) logits: same loss, O(chunk x vocab) memory -- for large vocabularies
    # (GPT-2's 50k: 400 MB less per 2k tokens). 0 = plain cross-entropy on the full logits, as
    # fast or faster on a CPU at vocab 2-4k (bench/README.md).
    loss_chunk: int = 0
    # Text samples generated at each validation from the data's sample prompts.
    n_samples: int = 3
    sample_tokens: int = 48
    sample_temperature: float = 0.8


class PretrainModule(StageModule):
    stage = "pretrain"

    def __init__(self, cfg, tokenizer, bytes_per_token: float | None = None):
        super().__init__(cfg, tokenizer)
        self.model = self.build_causal_lm()
        self.bytes_per_token = bytes_per_token

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def lm_loss(self, batch) -> torch.Tensor:
        x, y = batch
        # Summed in fp32 (under bf16 autocast the logits' log-softmax loses precision), then averaged.
        return self.model(x, targets=y, loss_chunk=self.cfg.algo.loss_chunk) / y.numel()

    def training_step(self, batch, batch_idx):
        loss = self.lm_loss(batch)
        self.count_tokens(batch[0].numel())
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach()))
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.lm_loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is None:
            return
        loss = float(loss)
        # From the already reduced val/loss, so the same on every rank: sync_dist=True is a no-op
        # mean that spares the DDP warning "It is recommended to use sync_dist=True".
        self.log("val/ppl", math.exp(min(loss, 50.0)), sync_dist=True)
        if self.bytes_per_token:
            # nats/token -> bits/byte: divide by ln 2 and by the bytes each token covers.
            self.log("val/bpb", loss / math.log(2) / self.bytes_per_token, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.log_samples()

    def configure_optimizers(self):
        return self.adamw_with_schedule(self.model, self.cfg.algo.optim)


def build(cfg, run_dir):
    """The pretraining stage: a tokenizer and token files from data.*, a fresh (or init_from) model."""
    from lmforge.algos.base import stage_tokenizer
    from lmforge.data.pretrain_data import PretrainBatching, PretrainDataModule
    from lmforge.data.prompts import sample_prompts

    tokenizer = stage_tokenizer(cfg)  # init_from's (e.g. a Hugging Face model's), else data.tokenizer's
    check_vocab(tokenizer, cfg)
    dm = PretrainDataModule(
        cfg.data,
        PretrainBatching(cfg.algo.batch_size, cfg.algo.seq_len, cfg.algo.val_batches, cfg.seed),
        tokenizer,
    )
    dm.prepare_data()
    module = PretrainModule(cfg, tokenizer, bytes_per_token=dm.bytes_per_token)
    if cfg.init_from:
        module.init_model_from(cfg.init_from, allowed=("pretrain", "sft"))
    module.sample_prompts = sample_prompts(cfg.data, cfg.algo.n_samples)
    return module, dm


CONFIG = PretrainConfig
