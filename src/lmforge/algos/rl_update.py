"""The optimizer updates of one RL iteration over its scored rollout (step 3 in rl_stage.py):
minibatching the rollout, the loss denominators, gradient accumulation, the step accounting
and PPO-ptx.

`RLUpdateMixin` is the part of `RLStageModule` (rl_stage.py) that runs them, apart so the
bookkeeping of an update is in one file, away from sampling and scoring (rollout.py) and the
module's hooks (rl_stage.py). It reads what that LightningModule provides: `cfg`, the stage's
`loss`, `reduce`, `ptx_data`, the optimizer and the trainer.

3. update: `ppo_epochs` passes over the rollout in shuffled minibatches of `minibatch_size`
   sequences, each one optimizer update accumulated over micro-batches of `micro_batch_size`.

The bookkeeping of an update (`update`), each in one place:

- Loss normalization. Before an update's first micro-batch, `update_norm` counts its real
  response tokens and sequences on every rank (one all-reduce) and divides them by the number
  of ranks, because DDP AVERAGES the ranks' gradients. Each micro-batch's loss is its token (or
  sequence) SUM over those denominators (`lmforge.rl.losses.aggregate`, `algo.loss_agg`), so
  the summed gradients are those of one loss over the whole update: the same for any
  `micro_batch_size` and any number of ranks. The logged train/* figures are built the same
  way: summed over an update's micro-batches, averaged over its updates and ranks.
- Accumulation by hand (manual optimization): backward per micro-batch, DDP's gradient sync
  only at the last one (`opt.toggle_model(sync_grad=...)`), then gradient clipping and one
  optimizer step. Step accounting: trainer.max_steps, eval_every, log_every, the LR schedule and
  resume count RL ITERATIONS, not updates (ppo_epochs * rows / minibatch_size per iteration;
  `train/updates` logs the total). Lightning counts every `LightningOptimizer.step()` as a
  global step, so all but the iteration's last update call `trainer.strategy.optimizer_step(opt,
  closure=lambda: None)` instead (`_optimizer_step`): the same precision plugin and strategy
  step minus the counter; the closure is a no-op because the gradients are already there.
- PPO-ptx (`ptx_coef > 0`): `ptx_coef` x the mean SFT loss of ONE batch of SFT pairs is added
  to the last micro-batch's loss of every update, so it counts once per update whatever the
  split.
- On-policy. With `clip_eps: null` (the plain policy gradient, no importance ratio) an
  iteration makes exactly one update (`ppo_epochs: 1`, `minibatch_size` = the rollout's rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.algos.rollout import Rollout, seed_for
from lmforge.rl import LossNorm


class RLUpdateMixin:
    """Turns a scored `Rollout` into optimizer updates; a part of `RLStageModule` (rl_stage.py)."""

    # -- loss denominators ---------------------------------------------------------------------
    @property
    def loss_agg_const(self) -> float:
        a = self.cfg.algo
        return float(a.loss_agg_const or a.max_new_tokens)

    def update_norm(self, response_mask: Tensor) -> LossNorm:
        """The denominators of one optimizer update whose rows (on this rank) have `response_mask`:
        real tokens and sequences summed over ranks (one all-reduce), divided by the number of
        ranks because DDP AVERAGES the ranks' gradients. Each micro-batch's loss is then its
        share of the update's loss, whatever the micro-batch split and the number of ranks."""
        counts = torch.tensor(
            [float(response_mask.sum()), float(response_mask.shape[0])], dtype=torch.float64, device=self.device
        )
        world = 1
        if self.reduce is not None:
            counts = self.reduce(counts)
            world = torch.distributed.get_world_size()
        n_tokens, n_seqs = (counts / world).tolist()
        return LossNorm(n_tokens=n_tokens, n_seqs=n_seqs, const=self.loss_agg_const)

    def norm_of(self, mb: dict) -> LossNorm:
        """mb's update denominators (set by `update`); a lone batch is a whole update."""
        return mb.get("norm") or LossNorm(const=self.loss_agg_const)

    # -- 3. the update -----------------------------------------------------------------------
    def minibatch_fields(self, ro: Rollout) -> dict[str, Tensor]:
        """Per-row tensors the loss reads, indexed by minibatch rows."""
        f = {
            "sequences": ro.sequences,
            "attention_mask": ro.attention_mask,
            "response_mask": ro.response_mask,
            "old_logprobs": ro.logprobs,
            "ref_logprobs": ro.ref_logprobs,
            "advantages": ro.advantages,
        }
        if ro.returns is not None:
            f["returns"] = ro.returns
        if ro.values is not None:
            f["old_values"] = ro.values
        return f

    @staticmethod
    def take(fields: dict[str, Tensor], idx: Tensor, prompt_len: int) -> dict[str, Tensor]:
        """Rows idx of every field, trimmed to the longest response among them."""
        mb = {k: v[idx] for k, v in fields.items()}
        n = max(1, int(mb["response_mask"].sum(-1).max()))
        for k, v in mb.items():
            if k in ("sequences", "attention_mask"):
                mb[k] = v[:, : prompt_len + n]
            elif v.dim() == 2:
                mb[k] = v[:, :n]
        mb["prompt_len"] = prompt_len
        return mb

    def _optimizer_step(self, opt, counted: bool) -> None:
        if counted:
            opt.step()  # Lightning's global_step += 1: once per iteration
        else:
            self.trainer.strategy.optimizer_step(opt.optimizer, closure=lambda: None)

    def _ptx_loss(self) -> Tensor:
        from lmforge.data.sft_data import IGNORE_INDEX

        if self._ptx_iter is None:
            # One ptx batch per optimizer update: a resumed run reads on where it stopped.
            a = self.cfg.algo
            updates = a.ppo_epochs * (a.rollout_batch_size * a.samples_per_prompt // a.minibatch_size)
            self._ptx_iter = self.ptx_data.ptx_batches(
                self.global_rank, self.trainer.world_size, self.global_step * updates
            )
        batch = {k: v.to(self.device) for k, v in next(self._ptx_iter).items()}
        logits = self.model(batch["input_ids"])
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)

    def update(self, ro: Rollout, step: int) -> dict[str, Tensor]:
        algo = self.cfg.algo
        opt = self.optimizers()
        fields = self.minibatch_fields(ro)
        B = ro.size
        n_mb = B // algo.minibatch_size
        n_updates = algo.ppo_epochs * n_mb
        shuffle = torch.Generator().manual_seed(seed_for(self.cfg.seed, "shuffle", step, self.global_rank))
        # Every stat a loss returns is its micro-batch's SHARE of the update's figure (same
        # denominators as the loss): summed over an update's micro-batches, averaged over updates.
        sums: dict[str, Tensor] = {}
        update = 0
        for _ in range(algo.ppo_epochs):
            perm = torch.randperm(B, generator=shuffle).to(self.device)
            for j in range(n_mb):
                rows = perm[j * algo.minibatch_size : (j + 1) * algo.minibatch_size]
                norm = self.update_norm(ro.response_mask[rows])
                micro = rows.split(algo.micro_batch_size)
                for k, idx in enumerate(micro):
                    mb = self.take(fields, idx, ro.prompt_len)
                    mb["norm"] = norm
                    last = k == len(micro) - 1
                    # Gradients are all-reduced (DDP) once per update, at its last micro-batch.
                    with opt.toggle_model(sync_grad=last):
                        loss, stats = self.loss(mb)  # this micro-batch's share of the update's loss
                        if last and algo.ptx_coef > 0:
                            # PPO-ptx: one SFT batch per update, its mean loss added once.
                            ptx = self._ptx_loss()
                            loss = loss + algo.ptx_coef * ptx
                            stats = {**stats, "ptx_loss": ptx.detach()}
                        self.manual_backward(loss)
                    self.count_tokens(int(mb["attention_mask"].sum()))
                    for name, v in stats.items():
                        sums[name] = sums.get(name, 0.0) + v.detach().float()
                if algo.optim.grad_clip > 0:
                    self.clip_gradients(opt, gradient_clip_val=algo.optim.grad_clip, gradient_clip_algorithm="norm")
                update += 1
                self._optimizer_step(opt, counted=update == n_updates)
                opt.zero_grad(set_to_none=True)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        world = self.trainer.world_size
        out = {}
        for name, v in sums.items():
            mean = v / n_updates
            if self.reduce is not None:
                mean = self.reduce(mean) / world
            out[f"train/{name}"] = mean
        out["train/updates"] = torch.tensor(float(n_updates * (step + 1)))
        return out


__all__ = ["RLUpdateMixin"]
