"""Prompts for the RL stages (PPO, REINFORCE, RLOO, GRPO): records -> rendered text -> token ids.

Sources (conf/data/<source>.yaml):

* ``data=synthetic``: every prompt of the world's ``train`` split for rollouts; for held-out
  evaluation ``algo.eval_prompts`` prompts of its ``test`` split, the same fixed subset the SFT
  stage evaluates on (``lmforge.world.generator.held_out_prompts``), so the numbers compare,
  and ``algo.eval_hard_prompts`` of its ``hard`` split (longer numbers; none by default);
* ``data=jsonl``: ``data.prompt_field`` of each record of ``data.path`` (other fields are
  ignored, so SFT or preference files serve as prompt files); evaluation prompts from
  ``data.val_path``, else a stable-hash ``data.val_fraction`` share of the file;
* ``data=hh``: the dialogue before the last ``data.assistant_marker`` of each ``chosen``.

Each prompt is rendered with ``data.prompt_template`` (hh: used verbatim) and tokenized without
BOS/EOS, as SFT and reward modeling encode prompts; a prompt longer than ``max_prompt_tokens``
loses tokens from the LEFT (its end, where the response starts, is kept).

Batches are lists of :class:`Prompt`, unpadded: the rollout left-pads them for generation.
Training prompts are read statelessly, like pretraining windows: global sample k is prompt
perm_e[k mod N] with e = k // N and perm_e a permutation seeded by (seed, e), so every prompt is
seen once per epoch, ranks read distinct prompts, and a resumed run reads on where it stopped
(RL stages count one trainer step per rollout batch).

With PPO-ptx (``algo.ptx_coef > 0``) the module also draws batches of the source's SFT pairs
(``ptx_batches``) for the language-modeling term.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lmforge.data.templates import BadRecords, render_prompt
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    text: str  # rendered with the template: what the policy reads
    raw: str  # before the template (the synthetic judge parses it)
    ids: list[int]
    origin: str  # "synthetic:train:17", "file.jsonl:3"


# ============================================================================ records


def synthetic_prompts(cfg, split: str) -> list[tuple[str, str, str]]:
    """(raw, rendered, origin) for every prompt of the world's `split`, in a fixed order."""
    from lmforge.world.generator import SyntheticWorld

    tasks = SyntheticWorld(cfg.seed).all_tasks(split)
    return [
        (t.prompt, render_prompt(cfg.prompt_template, t.prompt), f"synthetic:{split}:{i}") for i, t in enumerate(tasks)
    ]


def synthetic_held_out(cfg, n: int, split: str) -> list[tuple[str, str, str]]:
    """(raw, rendered, origin) of `n` prompts of the world's held-out `split` (test or hard): the
    fixed subset every stage evaluates on."""
    from lmforge.world.generator import held_out_prompts

    prompts = held_out_prompts(cfg.seed, n, split)
    return [(p, render_prompt(cfg.prompt_template, p), f"synthetic:{split}:{i}") for i, p in enumerate(prompts)]


def jsonl_prompts(cfg, path: str, bad: BadRecords, config_key: str) -> list[tuple[str, str, str]]:
    from lmforge.data.sft_data import iter_jsonl_tolerant

    out = []
    n_records = 0
    for lineno, obj in iter_jsonl_tolerant(path, bad, config_key):
        n_records += 1
        where = f"{path}:{lineno}"
        value = obj.get(cfg.prompt_field)
        if cfg.prompt_field not in obj:
            present = ", ".join(map(str, obj)) or "(none)"
            bad.report(
                "missing field", where, f"no field {cfg.prompt_field!r} (data.prompt_field); fields present: {present}"
            )
        elif not isinstance(value, str) or not value.strip():
            bad.report("empty or non-string prompt", where, f"field {cfg.prompt_field!r} (data.prompt_field)")
        else:
            out.append((value, render_prompt(cfg.prompt_template, value), where))
    if not out:
        raise DataError(
            f"{path} ({config_key}) has {n_records} record(s) and no usable prompt: check the file and "
            f"data.prompt_field={cfg.prompt_field!r}"
        )
    return out


def hh_prompts(cfg, path: str, bad: BadRecords, config_key: str) -> list[tuple[str, str, str]]:
    from lmforge.data.preference_records import split_dialogue
    from lmforge.data.sft_data import iter_jsonl_tolerant

    out = []
    for lineno, obj in iter_jsonl_tolerant(path, bad, config_key):
        where = f"{path}:{lineno}"
        chosen = obj.get(cfg.chosen_field)
        parts = split_dialogue(chosen, cfg.assistant_marker) if isinstance(chosen, str) else None
        if parts is None:
            bad.report("no assistant turn", where, f"field {cfg.chosen_field!r} has no {cfg.assistant_marker!r}")
            continue
        out.append((parts[0], parts[0], where))
    if not out:
        raise DataError(f"{path} ({config_key}) has no usable dialogue prompt")
    return out


def load_prompt_records(cfg, n_eval: int) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(train, eval) records (raw, rendered, origin) of the configured source."""
    if cfg.source == "synthetic":
        return synthetic_prompts(cfg, "train"), synthetic_held_out(cfg, n_eval, "test")
    if cfg.source in ("jsonl", "hh"):
        from lmforge.data.sft_data import hash_fraction

        read = jsonl_prompts if cfg.source == "jsonl" else hh_prompts
        bad = BadRecords(cfg.on_bad_record)
        train = read(cfg, cfg.path, bad, "data.path")
        if cfg.val_path:
            evals = read(cfg, cfg.val_path, bad, "data.val_path")
        else:
            is_eval = [hash_fraction(raw) < cfg.val_fraction for raw, _, _ in train]
            evals = [r for r, e in zip(train, is_eval) if e]
            train = [r for r, e in zip(train, is_eval) if not e]
            if not train:
                raise DataError(f"data.val_fraction={cfg.val_fraction} leaves no training prompt: lower it")
        bad.log_summary("RL prompts")
        return train, evals[: max(0, n_eval)]
    raise DataError(
        f"data.source={cfg.source!r} has no prompts for RL: use data=synthetic, data=jsonl (data.prompt_field) "
        "or data=hh"
    )


def encode_prompts(records, tok: Tokenizer, max_prompt_tokens: int) -> tuple[list[Prompt], int]:
    """Prompts with ids cut from the left to max_prompt_tokens; also the number truncated."""
    out, n_cut = [], 0
    for raw, text, origin in records:
        ids = tok.encode(text)
        if not ids:
            raise DataError(f"{origin}: the rendered prompt {text!r} has no tokens")
        if len(ids) > max_prompt_tokens:
            ids, n_cut = ids[-max_prompt_tokens:], n_cut + 1
        out.append(Prompt(text, raw, ids, origin))
    return out, n_cut


# ============================================================================ batches


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class PromptStream(IterableDataset):
    """An endless stream of training prompts; see the module docstring for the order."""

    def __init__(self, prompts: list[Prompt], seed: int, start_sample: int, rank: int, world_size: int):
        if not prompts:
            raise DataError("no training prompts")
        self.prompts, self.seed = prompts, seed
        self.start_sample, self.rank, self.world_size = start_sample, rank, world_size

    def sample(self, k: int) -> Prompt:
        n = len(self.prompts)
        return self.prompts[_permutation(n, self.seed, k // n)[k % n]]

    def __iter__(self) -> Iterator[Prompt]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        n = len(self.prompts)
        i = self.start_sample + worker
        perm_epoch, perm = -1, []
        while True:
            k = i * self.world_size + self.rank
            if k // n != perm_epoch:
                perm_epoch, perm = k // n, _permutation(n, self.seed, k // n)
            yield self.prompts[perm[k % n]]
            i += n_workers


def as_list(batch: list[Prompt]) -> list[Prompt]:
    return list(batch)


class PromptDataModule(L.LightningDataModule):
    def __init__(
        self,
        cfg,
        tokenizer: Tokenizer,
        *,
        prompts_per_step: int,
        max_prompt_tokens: int,
        eval_prompts: int,
        eval_batch_size: int,
        seed: int,
        ptx_batch_size: int = 0,
        ptx_seq_len: int = 128,
        eval_hard_prompts: int = 0,
    ):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.prompts_per_step, self.max_prompt_tokens = prompts_per_step, max_prompt_tokens
        self.n_eval, self.eval_batch_size, self.seed = eval_prompts, eval_batch_size, seed
        self.ptx_batch_size, self.ptx_seq_len = ptx_batch_size, ptx_seq_len
        self.n_eval_hard = eval_hard_prompts
        self.train_prompts: list[Prompt] = []
        self.eval_prompts: list[Prompt] = []
        self.eval_hard_prompts: list[Prompt] = []  # the synthetic world's hard split, reported apart
        self._ptx_examples = None

    def prepare_data(self) -> None:
        if not self.train_prompts:
            self._build()

    def setup(self, stage: str | None = None) -> None:
        if not self.train_prompts:
            self._build()

    def _build(self) -> None:
        train, evals = load_prompt_records(self.cfg, self.n_eval)
        self.train_prompts, cut_train = encode_prompts(train, self.tokenizer, self.max_prompt_tokens)
        self.eval_prompts, cut_eval = encode_prompts(evals, self.tokenizer, self.max_prompt_tokens)
        if self.n_eval_hard > 0:
            hard = synthetic_held_out(self.cfg, self.n_eval_hard, "hard")
            self.eval_hard_prompts, cut_hard = encode_prompts(hard, self.tokenizer, self.max_prompt_tokens)
            cut_eval += cut_hard
        if cut_train or cut_eval:
            log.warning(
                "%d train and %d eval prompts were longer than algo.max_prompt_tokens=%d and lost tokens from the left",
                cut_train,
                cut_eval,
                self.max_prompt_tokens,
            )
        log.info(
            "RL prompts: %d train, %d held out, %d hard",
            len(self.train_prompts),
            len(self.eval_prompts),
            len(self.eval_hard_prompts),
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # One trainer step per rollout batch: the prompts this rank already used.
        start = trainer.global_step * self.prompts_per_step
        ds = PromptStream(self.train_prompts, self.seed, start, trainer.global_rank, trainer.world_size)
        return DataLoader(ds, batch_size=self.prompts_per_step, collate_fn=as_list, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        if not self.eval_prompts:
            return []
        return DataLoader(self.eval_prompts, batch_size=self.eval_batch_size, shuffle=False, collate_fn=as_list)

    # -- PPO-ptx ---------------------------------------------------------------------
    def ptx_batches(self, rank: int = 0, world_size: int = 1, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless right-padded SFT batches (input_ids, labels with -100 off the response) of the
        source's training pairs, for the PPO-ptx language-modeling term."""
        from lmforge.data.sft_data import collate, encode_pairs, load_pairs

        if self._ptx_examples is None:
            pairs, _ = load_pairs(self.cfg, 0)
            self._ptx_examples = encode_pairs(pairs, self.tokenizer, self.ptx_seq_len, BadRecords("skip"))
            if not self._ptx_examples:
                raise DataError("algo.ptx_coef > 0 but the data has no SFT pair that fits algo.ptx_seq_len")
        examples = self._ptx_examples
        stream = PromptStream(examples, self.seed + 1, start * self.ptx_batch_size, rank, world_size)  # type: ignore[arg-type]
        it = iter(stream)
        while True:
            yield collate([next(it) for _ in range(self.ptx_batch_size)], self.tokenizer.pad_id)
